//! SMTP in, IMAP out: smtplib delivers, imaplib reads the message back byte-exact (apart from
//! the trace headers the server adds) in INBOX, with the same UID and UIDVALIDITY on every
//! later session, including after a restart.

use crate::harness::{Node, PASSWORD};

const DELIVER: &str = r#"
raw = (b"From: Bob <bob@example.org>\r\nTo: Alice <" + USER.encode() + b">\r\n"
       b"Subject: =?utf-8?q?caf=C3=A9?= byte exact\r\nDate: Mon, 2 Nov 2026 10:00:00 +0000\r\n"
       b"Message-ID: <byte-exact@example.org>\r\nMIME-Version: 1.0\r\n"
       b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
       b"Line one.\r\n..a line starting with a dot\r\n.\r\n \r\ntab\there, caf\xc3\xa9\r\n"
       + b"x" * 900 + b"\r\nlast line\r\n")
s = smtp()
refused = s.sendmail("bob@example.org", [USER], raw)
assert refused == {}, refused
s.quit()
msgs = inbox_messages()
assert len(msgs) == 1, f"expected 1 message in INBOX, got {len(msgs)}"
uid, flags, stored = msgs[0]
head = stored[: len(stored) - len(strip_trace_headers(stored))]
assert re.match(rb"(?i)return-path: <bob@example.org>\r\n", head), head
assert re.search(rb"(?im)^received: ", head), head
assert strip_trace_headers(stored) == raw, (strip_trace_headers(stored), raw)
print(uid)
"#;

const UID_AND_VALIDITY: &str = r#"
c = imap()
typ, data = c.select("INBOX")
assert typ == "OK", data
validity = c.untagged_responses.get("UIDVALIDITY", [b"?"])[0].decode()
msgs = inbox_messages(c)
c.logout()
print(json.dumps({"uidvalidity": validity, "uids": [m[0] for m in msgs],
                  "bodies": [strip_trace_headers(m[2]).decode("utf-8", "replace") for m in msgs]}))
"#;

#[test]
fn smtplib_delivery_reads_back_byte_exact_with_stable_uid() {
    let mut node = Node::with_account();
    let uid: u32 = node.py(DELIVER, &[]).trim().parse().expect("uid");

    let first = node.py(UID_AND_VALIDITY, &[]);
    let parsed: serde_json::Value = serde_json::from_str(&first).expect("json");
    assert_eq!(parsed["uids"], serde_json::json!([uid]));
    assert_ne!(parsed["uidvalidity"], "?", "SELECT must report UIDVALIDITY");
    for _ in 0..2 {
        assert_eq!(
            node.py(UID_AND_VALIDITY, &[]),
            first,
            "later session differs"
        );
    }
    node.restart();
    assert_eq!(
        node.py(UID_AND_VALIDITY, &[]),
        first,
        "session after a restart differs"
    );
}

#[test]
fn alias_delivers_to_its_target_and_other_accounts_see_nothing() {
    let node = Node::with_account();
    node.add_account("carol@kermail.test", PASSWORD);
    node.cli_ok(&["alias", "add", "info@kermail.test", "alice@kermail.test"]);
    let out = node.py(
        r#"
s = smtp()
assert s.sendmail("bob@example.org", ["info@kermail.test"], message("to the alias")) == {}
s.quit()
alice = inbox_messages()
carol = inbox_messages(imap("carol@kermail.test", PASSWORD))
assert len(alice) == 1 and b"Subject: to the alias" in alice[0][2], alice
assert carol == [], carol
# One account cannot log in with another's password.
try:
    imap("carol@kermail.test", "not-the-password")
    raise SystemExit("LOGIN with a wrong password succeeded")
except imaplib.IMAP4.error:
    pass
print("ok")
"#,
        &[],
    );
    assert_eq!(out.trim(), "ok");
}

/// swaks (an independent SMTP client) delivers over STARTTLS; imaplib reads the message over
/// implicit TLS (IMAPS) and over STARTTLS on the plain port.
#[test]
fn swaks_over_starttls_then_imaps_and_imap_starttls() {
    let node = Node::with_account();
    let out = std::process::Command::new("swaks")
        .args(["--server", &format!("127.0.0.1:{}", node.smtp_port)])
        .args(["--to", crate::harness::USER, "--from", "bob@example.org"])
        .args(["--helo", "client.test", "--tls"])
        .args([
            "--header",
            "Subject: over starttls",
            "--body",
            "sent by swaks",
        ])
        .output()
        .expect("run swaks");
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "swaks failed ({}):\n{transcript}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        transcript.contains("TLS started"),
        "no TLS handshake in swaks transcript:\n{transcript}"
    );
    let out = node.py(
        r#"
import ssl
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE   # self-signed certificate generated on first start
found = []
c = imaplib.IMAP4_SSL(HOST, int(ENV["IMAPS_PORT"]), ssl_context=ctx, timeout=60)
c.login(USER, PASSWORD)
found.append(inbox_messages(c))
c.logout()
c = imaplib.IMAP4(HOST, IMAP_PORT, timeout=60)
ok(c.starttls(ssl_context=ctx), "STARTTLS")
c.login(USER, PASSWORD)
found.append(inbox_messages(c))
c.logout()
assert found[0] == found[1], found
assert len(found[0]) == 1 and b"Subject: over starttls" in found[0][0][2], found
assert b"sent by swaks" in found[0][0][2]
print("ok")
"#,
        &[],
    );
    assert_eq!(out.trim(), "ok");
}
