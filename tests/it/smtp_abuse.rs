//! Abuse of the SMTP side by strangers (issue 10): the MX listener is never an open relay,
//! not even through SRS addresses; a mail loop is refused; failed logins are throttled per
//! client address and per account on SMTP AUTH and IMAP LOGIN alike. Every client is Python's
//! smtplib or imaplib over real sockets against a real `kermail serve`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::harness::{free_port, wait_for, Node, DOMAIN, PASSWORD, USER};

/// The public secret the example configuration used to ship.
const PUBLIC_EXAMPLE_SECRET: &str = "change me to a long random string";

/// A node whose outbound deliveries go to a closed loopback port (so queue entries stay),
/// with `extra` appended to its configuration and the account `USER`.
fn node_with(extra: &str) -> Node {
    let mut node = Node::create();
    let mut config = std::fs::read_to_string(&node.config).expect("read config");
    config.push_str(&format!(
        "\n[outbound]\npoll_interval_secs = 1\n{extra}\n[outbound.overrides]\n\
         \"remote.test\" = [\"127.0.0.1:{}\"]\n\"elsewhere.test\" = [\"127.0.0.1:{}\"]\n",
        free_port(),
        free_port()
    ));
    std::fs::write(&node.config, &config).expect("write config");
    node.spawn();
    node.add_account(USER, PASSWORD);
    node
}

/// The SRS address the scheme of kermail <= 0.1 gave for `original` (4-character hash over
/// `TT || domain || local` with a blake3 key derived from `secret`): what a stranger who
/// knows the default or the example secret computes offline.
fn legacy_srs_address(secret: &[u8], original: &str, forwarding_domain: &str) -> String {
    const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let now_secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let days = (now_secs / 86_400 % 1024) as usize;
    let timestamp: String = [days >> 5, days & 31]
        .iter()
        .map(|&v| BASE32[v & 31] as char)
        .collect();
    let (local, domain) = original.rsplit_once('@').expect("address");
    let key = blake3::derive_key("kermail srs 2026", secret);
    let digest = blake3::keyed_hash(&key, format!("{timestamp}{domain}{local}").as_bytes());
    let hash: String = digest.as_bytes()[..4]
        .iter()
        .map(|&b| BASE32[usize::from(b) & 31] as char)
        .collect();
    format!("SRS0={hash}={timestamp}={domain}={local}@{forwarding_domain}")
}

/// Every queue entry's envelope sender, from `kermail queue list`.
fn queued_senders(node: &Node) -> Vec<String> {
    node.cli_ok(&["queue", "list"])
        .lines()
        .filter_map(|line| {
            let from = line.split(" from=<").nth(1)?;
            Some(from.split('>').next()?.to_owned())
        })
        .collect()
}

/// Tries to relay through `srs_address` as an unauthenticated stranger on the MX listener,
/// with the null sender and with a real one. Prints the RCPT and DATA replies.
const RELAY_ATTEMPT: &str = r#"
for sender in ("", "spammer@evil.example"):
    s = smtp()
    code, text = s.mail(sender)
    assert code == 250, (code, text)
    code, text = s.rcpt(ENV["RCPT"])
    print("rcpt", sender or "<>", code)
    if code == 250:
        code, text = s.data(b"Subject: buy now\r\n\r\nspam\r\n")
        print("data", sender or "<>", code)
    s.quit()
"#;

#[test]
fn forged_srs_addresses_with_known_secrets_relay_nothing() {
    for secret in ["", PUBLIC_EXAMPLE_SECRET] {
        let extra = if secret.is_empty() {
            String::new()
        } else {
            format!("srs_secret = \"{secret}\"")
        };
        let node = node_with(&extra);
        let forged = legacy_srs_address(secret.as_bytes(), "victim@remote.test", DOMAIN);
        let output = node.py(RELAY_ATTEMPT, &[&format!("RCPT={forged}")]);
        assert!(
            !output.contains("rcpt <> 250") && !output.contains("rcpt spammer@evil.example 250"),
            "secret {secret:?}: a forged SRS address was accepted:\n{output}"
        );
        assert_eq!(
            queued_senders(&node),
            Vec::<String>::new(),
            "secret {secret:?}: something was queued:\n{output}"
        );
    }
}

#[test]
fn a_genuine_srs_address_takes_bounces_only_and_guessing_is_rate_limited() {
    let node = node_with("");
    node.cli_ok(&[
        "alias",
        "add",
        &format!("fwd@{DOMAIN}"),
        "carol@remote.test",
    ]);
    node.py(
        r#"
s = smtp()
s.sendmail("someone@elsewhere.test", [ENV["TO"]], message("forwarded", sender="someone@elsewhere.test", to=ENV["TO"]))
s.quit()
"#,
        &[&format!("TO=fwd@{DOMAIN}")],
    );
    let senders = queued_senders(&node);
    assert_eq!(senders.len(), 1, "{senders:?}");
    let srs_address = senders[0].clone();
    assert!(
        srs_address.starts_with("SRS0=")
            && srs_address.ends_with(&format!("=elsewhere.test=someone@{DOMAIN}")),
        "{srs_address}"
    );
    // At least 8 hash characters (40 bits), not 4.
    let hash = srs_address.split('=').nth(1).expect("hash field");
    assert!(hash.len() >= 8, "{srs_address}");

    // A stranger with a real sender gets nothing through it; a bounce (null sender) does.
    let output = node.py(RELAY_ATTEMPT, &[&format!("RCPT={srs_address}")]);
    assert!(
        output.contains("rcpt spammer@evil.example 550"),
        "a non-bounce to an SRS address: {output}"
    );
    assert!(output.contains("data <> 250"), "the bounce: {output}");
    wait_for("the bounce queued", Duration::from_secs(30), || {
        let senders = queued_senders(&node);
        (senders.len() == 2).then_some(())
    });
    let senders = queued_senders(&node);
    assert!(senders.contains(&String::new()), "{senders:?}");
    let shown = node.cli_ok(&["queue", "list"]);
    assert_eq!(shown.matches("recipients=1/1").count(), 2, "{shown}");

    // Guessing hashes from one address is cut off: after a few wrong ones even the right
    // address is refused for a while, with a temporary error.
    let output = node.py(
        r#"
s = smtp()
s.mail("")
codes = []
base = ENV["RCPT"]
parts = base.split("=")
for n in range(40):
    guess = "=".join([parts[0], ("A" * 7) + "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"[n % 32]] + parts[2:])
    code, _ = s.rcpt(guess)
    codes.append(code)
    if code == 421:
        break
print("codes", codes)
try:
    s2 = smtp()
    s2.mail("")
    print("genuine", s2.rcpt(base)[0])
except smtplib.SMTPServerDisconnected:
    print("genuine disconnected")
"#,
        &[&format!("RCPT={srs_address}")],
    );
    let codes_line = output
        .lines()
        .find(|l| l.starts_with("codes"))
        .unwrap_or("");
    assert!(
        codes_line.contains("450"),
        "wrong SRS guesses are never limited: {output}"
    );
    assert!(
        !output.contains("genuine 250"),
        "the guessing address is still served: {output}"
    );
}
