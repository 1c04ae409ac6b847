//! Quotas (issue 10) through real clients: repeated `COPY 1:* INBOX` stops at the quota with
//! `NO [OVERQUOTA]`, APPEND over quota is refused the same way, SMTP answers `552 5.2.2` for a
//! full account while another still receives, GETQUOTAROOT/GETQUOTA match the usage, and
//! `kermail user quota` changes a limit that then takes effect.

use std::time::Duration;

use crate::harness::{Node, PASSWORD, USER};

/// Doubles INBOX with `COPY 1:* INBOX` up to 16 times on the built-in default quota (2 GiB;
/// the node's configuration names no quota): with a 1 MiB message the 12th COPY would pass it
/// and must be refused whole, and every later one too, so INBOX stays at 1,024 messages.
/// Before quotas existed, nothing stopped it (65,536 copies after 16 rounds, and every replica
/// and every log replay did the same).
const COPY_DOUBLING: &str = r#"
c = imap()
body = message("big", body="x" * (1024 * 1024) + "\r\n")
ok(c.append("INBOX", None, None, body), "APPEND")
ok(c.select("INBOX"), "SELECT")
counts = []
refusal = None
for round in range(16):
    typ, data = c.copy("1:*", "INBOX")
    if typ != "OK":
        refusal = (round, data[0].decode())
        break
    ok(c.noop(), "NOOP")
    counts.append(int(c.select("INBOX")[1][0]))
assert refusal is not None, f"COPY never refused: INBOX sizes {counts}"
assert "[OVERQUOTA]" in refusal[1], refusal
size = len(body)
limit = 2 * 1024 ** 3
exists = int(c.select("INBOX")[1][0])
assert exists * size <= limit < 2 * exists * size, (exists, size)
# Refused whole every time after that: the mailbox stays bounded.
for _ in range(3):
    typ, data = c.copy("1:*", "INBOX")
    assert typ == "NO" and b"[OVERQUOTA]" in data[0], (typ, data)
assert int(c.select("INBOX")[1][0]) == exists
c.logout()
print(json.dumps({"exists": exists, "round": refusal[0]}))
"#;

#[test]
fn repeated_copy_of_everything_stops_at_the_quota() {
    let node = Node::with_account();
    let out = node.py(COPY_DOUBLING, &[]);
    println!("{out}");
    let parsed: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(parsed["exists"], 1024, "{out}");
    assert_eq!(parsed["round"], 10, "{out}");
    let listing = node.cli_ok(&["user", "list"]);
    assert!(
        listing.contains(&format!("{USER} storage ")) && listing.contains("messages 1024/"),
        "{listing}"
    );
}

/// One account with a small quota set by `kermail user quota`: GETQUOTAROOT and GETQUOTA give
/// its usage; APPEND over it is `NO [OVERQUOTA]`; SMTP refuses it at RCPT (with SIZE=) with
/// 552 5.2.2 while another recipient of the same message gets it, and at DATA when no size was
/// declared; raising the limit lets the same APPEND through.
const SMALL_QUOTA: &str = r#"
OTHER = ENV["OTHER"]
def quota(c):
    typ, data = c.getquotaroot("INBOX")
    assert typ == "OK", data
    roots, quotas = data
    assert re.fullmatch(rb'"?INBOX"? ""', roots[0]), roots
    typ, direct = c.getquota('""')
    assert typ == "OK", direct
    assert direct == quotas, (direct, quotas)
    m = re.fullmatch(rb'"" \(STORAGE (\d+) (\d+) MESSAGE (\d+) (\d+)\)', quotas[0])
    assert m, quotas
    return tuple(int(x) for x in m.groups())

def sizes(c):
    if int(ok(c.select("INBOX"), "SELECT")[0]) == 0:
        return []
    data = ok(c.fetch("1:*", "(RFC822.SIZE)"), "FETCH")
    return [int(re.search(rb"RFC822.SIZE (\d+)", d).group(1)) for d in data]

c = imap()
caps = ok(c.capability(), "CAPABILITY")[0].split()
assert b"QUOTA" in caps and b"QUOTA=RES-STORAGE" in caps and b"QUOTA=RES-MESSAGE" in caps, caps
assert quota(c) == (0, 20, 0, 5), quota(c)
s = smtp()
for n in range(2):
    assert s.sendmail("bob@example.org", [USER], message(f"small {n}")) == {}
ok(c.append("INBOX", None, None, message("appended")), "APPEND")
used = sizes(c)
assert len(used) == 3, used
assert quota(c) == (-(-sum(used) // 1024), 20, 3, 5), (quota(c), used)
# 30 KiB does not fit in 20 KiB.
big = message("big", body="y" * 30000 + "\r\n")
typ, data = c.append("INBOX", None, None, big)
assert typ == "NO" and b"[OVERQUOTA]" in data[0], (typ, data)
# SETQUOTA is the administrator's.
typ, data = c._simple_command("SETQUOTA", '""', "(STORAGE 100000)")
assert typ == "NO", (typ, data)
# SMTP: smtplib declares SIZE=; the full recipient is refused at RCPT, the other gets it.
refused = s.sendmail("bob@example.org", [USER, OTHER], big)
assert set(refused) == {USER}, refused
assert refused[USER][0] == 552 and refused[USER][1].startswith(b"5.2.2"), refused
try:
    s.sendmail("bob@example.org", [USER], big)
    raise AssertionError("a message to a full account alone was accepted")
except smtplib.SMTPRecipientsRefused as e:
    assert e.recipients[USER][0] == 552, e.recipients
# Without SIZE=, the recipient passes RCPT (it has room for something) and DATA gets 552.
code, _ = s.mail("bob@example.org")
assert code == 250, code
code, _ = s.rcpt(USER)
assert code == 250, code
code, reply = s.data(big)
assert code == 552 and reply.startswith(b"5.2.2"), (code, reply)
s.quit()
assert len(sizes(c)) == 3
assert quota(c)[2] == 3
other = imap(OTHER, PASSWORD)
assert len(sizes(other)) == 1
other.logout()
c.logout()
print("ok")
"#;

const APPEND_BIG: &str = r#"
c = imap()
big = message("big", body="y" * 30000 + "\r\n")
ok(c.append("INBOX", None, None, big), "APPEND after raising the quota")
typ, data = c.getquota('""')
assert typ == "OK", data
m = re.fullmatch(rb'"" \(STORAGE (\d+) 1024 MESSAGE 4 5\)', data[0])
assert m, data
c.logout()
print("ok")
"#;

#[test]
fn small_quota_imap_smtp_and_the_admin_command() {
    let node = Node::with_account();
    let other = "other@kermail.test";
    node.add_account(other, PASSWORD);
    let set = node.cli_ok(&["user", "quota", USER, "20K", "--messages", "5"]);
    assert_eq!(
        set.trim(),
        format!("{USER} storage 0/20480 messages 0/5"),
        "{set}"
    );
    // Bad sizes are refused before anything is sent.
    let bad = node.cli(&["user", "quota", USER, "20Q"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid size"));
    let unknown = node.cli(&["user", "quota", "nobody@kermail.test", "1M"]);
    assert!(!unknown.status.success());

    node.py(SMALL_QUOTA, &[&format!("OTHER={other}")]);

    let shown = node.cli_ok(&["user", "quota", USER]);
    assert!(shown.contains("/20480 messages 3/5"), "{shown}");
    node.cli_ok(&["user", "quota", USER, "1M"]);
    node.py(APPEND_BIG, &[]);
    // The other account still follows the default.
    let listing = node.cli_ok(&["user", "list"]);
    assert!(
        listing
            .lines()
            .any(|line| line.starts_with(&format!("{other} storage "))
                && line.ends_with("/2147483648 (default) messages 1/200000 (default)")),
        "{listing}"
    );
    assert!(
        listing
            .lines()
            .any(|line| line.starts_with(&format!("{USER} storage "))
                && line.ends_with("/1048576 messages 4/5")),
        "{listing}"
    );
}

/// `[store] default_quota_*` becomes the cluster's default (replicated through the log, once
/// the node has started), for existing accounts too, and a restart keeps it.
#[test]
fn configured_default_quota_applies_to_every_account() {
    let mut node = Node::with_account();
    let before = node.cli_ok(&["user", "quota", USER]);
    assert!(
        before.contains("/2147483648 (default) messages 0/200000 (default)"),
        "{before}"
    );
    node.terminate();
    let mut config = std::fs::read_to_string(&node.config).expect("config");
    config.push_str("[store]\ndefault_quota_bytes = 0\ndefault_quota_messages = 2\n");
    std::fs::write(&node.config, config).expect("write config");
    node.spawn();
    let wanted = format!("{USER} storage 0/unlimited (default) messages 0/2 (default)");
    crate::harness::wait_for(
        "the configured default quota",
        Duration::from_secs(60),
        || (node.cli_ok(&["user", "quota", USER]).trim() == wanted).then_some(()),
    );
    node.py(
        r#"
s = smtp()
for n in range(2):
    assert s.sendmail("bob@example.org", [USER], message(f"m{n}")) == {}
try:
    s.sendmail("bob@example.org", [USER], message("third"))
    raise AssertionError("a third message was accepted")
except smtplib.SMTPRecipientsRefused as e:
    assert e.recipients[USER][0] == 552, e.recipients
s.quit()
"#,
        &[],
    );
    node.restart();
    let after = node.cli_ok(&["user", "quota", USER]);
    assert!(
        after.contains("/unlimited (default) messages 2/2 (default)"),
        "{after}"
    );
}
