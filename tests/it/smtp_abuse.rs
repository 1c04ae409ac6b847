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

#[test]
fn a_message_with_more_than_50_received_headers_is_refused_as_a_loop() {
    let node = node_with("");
    let output = node.py(
        r#"
def with_received(n):
    hops = "".join(f"Received: from hop{i}.example by hop{i+1}.example; Mon, 2 Nov 2026 10:00:00 +0000\r\n" for i in range(n))
    return hops.encode() + message(f"hops {n}")
s = smtp()
for n in (50, 51):
    try:
        s.sendmail("someone@elsewhere.test", [USER], with_received(n))
        print(n, "accepted")
    except smtplib.SMTPDataError as e:
        print(n, e.smtp_code, e.smtp_error.decode())
s.quit()
"#,
        &[],
    );
    assert!(output.contains("50 accepted"), "{output}");
    assert!(output.contains("51 554 5.4.6"), "{output}");
}

/// The submission (STARTTLS) port of `node`, from its configuration.
fn submission_port(node: &Node) -> u16 {
    std::fs::read_to_string(&node.config)
        .expect("read config")
        .split("submission_listen = [\"127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|port| port.parse().ok())
        .expect("submission port in the config")
}

/// Clients from a chosen loopback source address (127.0.0.x): `imap_from(src)` and
/// `submission_from(src)` (EHLO, STARTTLS, EHLO done), and `auth(s, user, password)` giving
/// the AUTH PLAIN reply code.
const SOURCE_CLIENTS: &str = r#"
import base64, ssl, threading
class SourcedIMAP(imaplib.IMAP4):
    def __init__(self, source, *args, **kwargs):
        self.source = source
        super().__init__(*args, **kwargs)
    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))
def imap_from(source):
    return SourcedIMAP(source, HOST, IMAP_PORT, timeout=120)
def submission_from(source):
    ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
    s = smtplib.SMTP(HOST, int(ENV["SUB"]), timeout=120, source_address=(source, 0))
    s.ehlo("client.test"); s.starttls(context=ctx); s.ehlo("client.test")
    return s
def auth(s, user, password):
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    code, _ = s.docmd("AUTH", "PLAIN " + token)
    return code
"#;

#[test]
fn failed_logins_are_throttled_per_address_and_never_lock_the_owner_out() {
    let node = Node::with_account();
    let sub = format!("SUB={}", submission_port(&node));
    // IMAP: one address guessing for 8 seconds, reconnecting after each BYE.
    let output = node.py(
        &format!(
            "{SOURCE_CLIENTS}{}",
            r#"
start = time.time(); times = []; c = None
while time.time() - start < 8:
    try:
        if c is None:
            c = imap_from("127.0.0.9")
        c.login(USER, "wrong password 123")
    except imaplib.IMAP4.abort:
        c = None; continue
    except imaplib.IMAP4.error:
        times.append(time.time())
    except OSError:
        c = None; continue
late = [t for t in times if t > start + 3]
print("imap_failures", len(times), "late_rate", len(late) / 5.0)
c2 = imap_from("127.0.0.10")
t0 = time.time()
c2.login(USER, PASSWORD)
print("imap_owner_login_secs", round(time.time() - t0, 2))
c2.logout()
"#
        ),
        &[&sub],
    );
    let value = |key: &str| -> f64 {
        output
            .split_whitespace()
            .skip_while(|word| *word != key)
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key} in {output}"))
    };
    assert!(
        value("late_rate") <= 5.0,
        "IMAP guesses per second from one address after its first failures: {output}"
    );
    assert!(value("imap_owner_login_secs") < 10.0, "{output}");

    // SMTP AUTH: two addresses guess the user's password at once; the owner, from a third
    // address, still gets in.
    let output = node.py(
        &format!(
            "{SOURCE_CLIENTS}{}",
            r#"
codes = []
def guesser(source):
    deadline = time.time() + 12
    s = None
    while time.time() < deadline and len([c for c in codes if c == 535]) < 12:
        try:
            if s is None:
                s = submission_from(source)
            codes.append(auth(s, USER, "wrong password 123"))
        except (smtplib.SMTPServerDisconnected, OSError):
            s = None
threads = [threading.Thread(target=guesser, args=(src,)) for src in ("127.0.0.11", "127.0.0.12")]
for t in threads: t.start()
for t in threads: t.join()
print("smtp_codes", sorted(set(codes)), "n", len(codes))
s = submission_from("127.0.0.13")
t0 = time.time()
print("owner_auth", auth(s, USER, PASSWORD), "secs", round(time.time() - t0, 2))
s.quit()
"#
        ),
        &[&sub],
    );
    assert!(
        output.contains("owner_auth 235"),
        "the owner was locked out: {output}"
    );
}

#[test]
fn concurrent_logins_never_run_more_password_checks_than_the_semaphore() {
    let node = Node::with_account();
    // 60 wrong LOGINs at once, from 60 addresses (no per-address limit applies): each
    // argon2id check takes 19 MiB, so 60 at once would take over 1 GiB. The node logs each new
    // peak of checks running at once; it must never pass the default limit of 4.
    let output = node.py(
        &format!(
            "{SOURCE_CLIENTS}{}",
            r#"
barrier = threading.Barrier(60)
failed = []
def one(n):
    c = imap_from(f"127.0.1.{n + 1}")
    barrier.wait()
    try:
        c.login(USER, "wrong password 123")
    except imaplib.IMAP4.error:
        failed.append(n)
threads = [threading.Thread(target=one, args=(n,)) for n in range(60)]
for t in threads: t.start()
for t in threads: t.join()
print("failed", len(failed))
"#
        ),
        &["SUB=0"],
    );
    assert!(output.contains("failed 60"), "{output}");
    let peaks: Vec<u32> = node
        .stderr()
        .split("password_checks_peak=")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect();
    let peak = peaks.iter().copied().max().unwrap_or(0);
    assert!(
        (1..=4).contains(&peak),
        "password checks at once: {peaks:?}"
    );
}

#[test]
fn trickling_clients_are_cut_at_the_total_deadlines_and_nothing_is_stored() {
    let mut node = Node::create();
    let config = std::fs::read_to_string(&node.config).expect("read config");
    let config = config.replacen(
        "[smtp]\n",
        "[smtp]\ndata_deadline_secs = 3\ncommand_phase_deadline_secs = 4\n",
        1,
    );
    std::fs::write(&node.config, config).expect("write config");
    node.spawn();
    node.add_account(USER, PASSWORD);
    let output = node.py(
        r#"
def trickle(commands, byte):
    sock = socket.create_connection((HOST, SMTP_PORT), timeout=30)
    f = sock.makefile("rb")
    f.readline()
    for command in commands:
        sock.sendall(command)
        while True:
            line = f.readline()
            if line[3:4] != b"-":
                break
    start = time.time()
    last = b""
    try:
        while time.time() - start < 20:
            sock.sendall(byte)
            sock.settimeout(0.5)
            try:
                chunk = sock.recv(4096)
                if chunk == b"":
                    break
                last += chunk
            except socket.timeout:
                pass
    except (BrokenPipeError, ConnectionResetError):
        pass
    return round(time.time() - start, 1), last.decode(errors="replace").strip()
secs, reply = trickle([b"EHLO client.test\r\n", f"MAIL FROM:<a@elsewhere.test>\r\n".encode(),
                       f"RCPT TO:<{USER}>\r\n".encode(), b"DATA\r\n"], b"x")
print("data", secs, reply.replace(" ", "_"))
secs, reply = trickle([b"EHLO client.test\r\n"], b"NOOP\r\n")
print("command", secs, reply.splitlines()[-1].replace(" ", "_") if reply else "")
c = imap()
print("messages", len(ok(c.search(None, "ALL") if c.select("INBOX")[0] == "OK" else ("NO", []))[0].split()))
c.logout()
"#,
        &[],
    );
    let line = |key: &str| -> (f64, String) {
        let line = output
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("{key} in {output}"));
        let mut words = line.split_whitespace().skip(1);
        let secs = words.next().and_then(|v| v.parse().ok()).unwrap_or(99.0);
        (secs, words.next().unwrap_or("").to_owned())
    };
    let (secs, reply) = line("data");
    assert!(
        (2.5..8.0).contains(&secs),
        "DATA trickle lasted {secs} s: {output}"
    );
    assert!(reply.contains("421_4.4.2"), "{output}");
    let (secs, reply) = line("command");
    assert!(
        (3.5..9.0).contains(&secs),
        "command trickle lasted {secs} s: {output}"
    );
    assert!(reply.contains("421_4.4.2"), "{output}");
    assert!(output.contains("messages 0"), "{output}");
}
