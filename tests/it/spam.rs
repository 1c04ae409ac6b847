//! Spam scoring (issue 12, point 3) through real SMTP (smtplib) and IMAP (imaplib) against a
//! real `kermail serve`: the builtin rules with a loopback DNS server (the inbound tests'
//! dns_server.py) for SPF/DMARC and DNSBL zones, the Bayes classifier trained by IMAP MOVE,
//! and the rspamd backend against a real rspamd (Debian package) started by the test.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{free_port, wait_for, Node, PASSWORD, USER};
use crate::inbound_auth::DnsServer;

/// Python helpers for these tests (after the harness prelude).
const CLIENT: &str = r#"
import email, ssl
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
def send(subject, body="Hello.\r\n", sender="bob@spf-pass.test", raw=None):
    msg = raw or message(subject, body=body)
    s = smtp()
    try:
        s.sendmail(sender, [USER], msg)
        outcome = "250"
    except smtplib.SMTPDataError as e:
        outcome = "%d %s" % (e.smtp_code, e.smtp_error.decode())
    s.quit()
    return outcome
def find(subject, mailbox="INBOX"):
    """The X-Spam-Status of the message with this subject in the mailbox ("" without one),
    None when it is not there."""
    for uid, flags, raw in inbox_messages(mailbox=mailbox):
        parsed = email.message_from_bytes(raw)
        if parsed["Subject"] == subject:
            value = parsed.get("X-Spam-Status")
            return "" if value is None else "X-Spam-Status: " + re.sub(r"\s+", " ", value)
    return None
def score(status):
    return float(re.search(r"score=(-?[0-9.]+)", status).group(1))
def move(subject, source, target):
    c = imap()
    ok(c.select(source), "SELECT")
    uids = ok(c.uid("SEARCH", None, "SUBJECT", '"%s"' % subject), "SEARCH")[0].split()
    assert uids, "no %r in %s" % (subject, source)
    ok(c.uid("MOVE", b",".join(uids).decode(), target), "MOVE")
    c.logout()
"#;

fn txt(value: &str) -> Value {
    json!(["TXT", [value]])
}

/// SPF passes for the test client; `listed` names the DNSBL zones listing 127.0.0.1.
fn zone(listed: &[&str]) -> Value {
    let mut zone = json!({
        "client.test": [txt("v=spf1 ip4:127.0.0.1 -all"), ["A", "127.0.0.1"]],
        "spf-pass.test": [txt("v=spf1 ip4:127.0.0.1 -all")],
        "spf-fail.test": [txt("v=spf1 ip4:192.0.2.1 -all")],
        // A block list whose server never answers: counts as not listed, within the timeout.
        "1.0.0.127.slow.test": [["TIMEOUT"]],
    });
    for list in listed {
        zone[format!("1.0.0.127.{list}")] = json!([["A", "127.0.0.2"]]);
    }
    zone
}

struct Fixture {
    node: Node,
    _dns: Option<DnsServer>,
    submission_port: u16,
}

impl Fixture {
    /// A node with `[inbound]` on (asking a fresh loopback DNS server serving `zone`) and
    /// `spam` as its `[spam]` section.
    fn start(zone: Option<Value>, spam: &str) -> Fixture {
        let dns = zone.map(|zone| DnsServer::start(&zone));
        let mut node = Node::create();
        let mut text = std::fs::read_to_string(&node.config).expect("config");
        if let Some(dns) = &dns {
            text.push_str(&format!(
                "[inbound]\nenabled = true\ndns_servers = [\"{}\"]\n\
                 dns_timeout_ms = 500\ndns_attempts = 1\n",
                dns.address()
            ));
        }
        text.push_str(spam);
        std::fs::write(&node.config, &text).expect("write config");
        let submission_port = text
            .split("submission_listen = [\"127.0.0.1:")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .and_then(|port| port.parse().ok())
            .expect("submission port in the config");
        node.spawn();
        node.add_account(USER, PASSWORD);
        Fixture {
            node,
            _dns: dns,
            submission_port,
        }
    }

    fn client(&self, script: &str) -> String {
        self.node.py(
            &format!("{CLIENT}\n{script}"),
            &[&format!("SUB={}", self.submission_port)],
        )
    }
}

const BUILTIN: &str = r#"
[spam]
enabled = true
bayes_min_learned = 1
dnsbl = [{ zone = "dnsbl.test", weight = 9.0 }, { zone = "slow.test", weight = 9.0 }]
dnsbl_timeout_ms = 1500
"#;

#[test]
fn clean_mail_gets_no_gtube_is_refused_and_submissions_are_not_scored() {
    let fixture = Fixture::start(Some(zone(&[])), BUILTIN);
    let out = fixture.client(
        r#"
assert send("clean") == "250"
status = find("clean")
assert status.startswith("X-Spam-Status: No, score="), status
# SPF passes, no DKIM signature, no DMARC record; no DNSBL lists the client.
assert "DKIM_NONE=0.50" in status and "DMARC_NONE=0.50" in status, status
assert "SPF" not in status and "DNSBL" not in status, status

# SPF fails for this envelope sender: the rule adds its weight.
assert send("spf fails", sender="bob@spf-fail.test") == "250"
status = find("spf fails")
assert "SPF_FAIL=3.00" in status and score(status) == 4.0, status

outcome = send("gtube", body=GTUBE + "\r\n")
assert outcome.startswith("550 5.7.1"), outcome
assert find("gtube") is None and find("gtube", "Junk") is None

# A forged status from outside is replaced by ours.
forged = b"X-Spam-Status: No, score=-100\r\n" + message("forged", body=GTUBE + "\r\n")
assert send("forged", raw=forged).startswith("550 5.7.1")

# The same GTUBE message from an authenticated user is not scored.
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
s = smtplib.SMTP(HOST, int(ENV["SUB"]), timeout=60)
s.ehlo("client.test")
s.starttls(context=ctx)
s.ehlo("client.test")
s.login(USER, PASSWORD)
assert not s.sendmail(USER, [USER], message("submitted", sender=USER, body=GTUBE + "\r\n"))
s.quit()
assert find("submitted") == "", find("submitted")
print("builtin ok")
"#,
    );
    assert!(out.contains("builtin ok"), "{out}");
}

#[test]
fn a_dnsbl_listed_client_is_filed_into_junk() {
    let fixture = Fixture::start(Some(zone(&["dnsbl.test"])), BUILTIN);
    let out = fixture.client(
        r#"
t0 = time.time()
assert send("listed") == "250"
assert find("listed") is None
status = find("listed", "Junk")
assert status.startswith("X-Spam-Status: Yes,"), status
assert "DNSBL_DNSBL_TEST=9.00" in status and "DNSBL_SLOW_TEST" not in status, status
assert score(status) >= 8.0, status
# The unanswered list cost at most its timeout.
assert time.time() - t0 < 10, time.time() - t0
print("dnsbl ok")
"#,
    );
    assert!(out.contains("dnsbl ok"), "{out}");
}

#[test]
fn bayes_learns_from_imap_moves_into_and_out_of_junk() {
    let fixture = Fixture::start(Some(zone(&[])), BUILTIN);
    let out = fixture.client(
        r#"
spam_body = ("Cheap replica watches and designer handbags at discount prices, order now "
             "from our online pharmacy store, limited offer, free shipping worldwide.\r\n")
assert send("replica watches", body=spam_body) == "250"
first = find("replica watches")
assert first is not None and "BAYES" not in first, first

# The user moves it into Junk: the classifier learns spam.
move("replica watches", "INBOX", "Junk")
assert send("designer watches", body=spam_body) == "250"
second = find("designer watches")
assert second is not None and "BAYES=" in second, second
assert score(second) > score(first) + 1.0, (first, second)

# Moved back out of Junk, the same words are learned as ham as well: the score drops.
move("replica watches", "Junk", "INBOX")
assert send("discount watches", body=spam_body) == "250"
third = find("discount watches")
assert third is not None and score(third) < score(second), (second, third)

# One more lesson: the Subject word "designer" is now spam only.
move("designer watches", "INBOX", "Junk")
assert send("designer offer", body=spam_body) == "250"
fourth = find("designer offer")
assert fourth is not None and "BAYES=" in fourth, fourth
print("bayes ok", first, "|", second, "|", third, "|", fourth)
"#,
    );
    assert!(out.contains("bayes ok"), "{out}");
    // The lessons are replicated state: they survive a restart (log replay).
    let mut node = fixture.node;
    node.terminate();
    node.spawn();
    let fixture = Fixture {
        node,
        _dns: fixture._dns,
        submission_port: fixture.submission_port,
    };
    let out = fixture.client(
        r#"
spam_body = ("Cheap replica watches and designer handbags at discount prices, order now "
             "from our online pharmacy store, limited offer, free shipping worldwide.\r\n")
assert send("designer deal", body=spam_body) == "250"
status = find("designer deal")
before = find("designer offer")
bayes = lambda st: re.search(r"BAYES=(-?[0-9.]+)", st).group(1)
assert status is not None and "BAYES=" in status, status
assert bayes(status) == bayes(before), (before, status)
print("restart ok")
"#,
    );
    assert!(out.contains("restart ok"), "{out}");
}

/// A real rspamd (Debian package) on a loopback port, with a minimal configuration in a
/// temporary folder: the packaged rules, console logging, one normal worker, the actions
/// `reject` at 15 and `add header` at 4 (no greylist, no subject rewrite). Killed on drop.
struct Rspamd {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Rspamd {
    fn start() -> Rspamd {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let local = dir.path().join("local");
        std::fs::create_dir_all(local.join("override.d")).expect("mkdir");
        std::fs::write(
            local.join("override.d/actions.conf"),
            "reject = 15;\nadd_header = 4;\nrewrite_subject = null;\ngreylist = null;\n",
        )
        .expect("write actions");
        let config = dir.path().join("rspamd.conf");
        std::fs::write(
            &config,
            format!(
                ".include \"$CONFDIR/common.conf\"\n\
                 options {{\n  pidfile = \"$RUNDIR/rspamd.pid\";\n  .include \"$CONFDIR/options.inc\"\n\
                 dns {{ nameserver = [\"127.0.0.1:1\"]; timeout = 0.5s; retransmits = 1; }}\n}}\n\
                 logging {{ type = \"console\"; level = \"error\"; }}\n\
                 worker \"normal\" {{\n  bind_socket = \"127.0.0.1:{port}\";\n  mime = true;\n  count = 1;\n}}\n"
            ),
        )
        .expect("write rspamd.conf");
        let var = |name: &str, value: &std::path::Path| format!("--var={name}={}", value.display());
        let child = Command::new("rspamd")
            .args(["-f", "-i", "-u", "root", "-g", "root", "-c"])
            .arg(&config)
            .arg("--var=CONFDIR=/etc/rspamd")
            .arg(var("LOCAL_CONFDIR", &local))
            .arg(var("RUNDIR", dir.path()))
            .arg(var("DBDIR", dir.path()))
            .arg(var("LOGDIR", dir.path()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start rspamd (Debian package rspamd)");
        let mut rspamd = Rspamd {
            child,
            port,
            _dir: dir,
        };
        wait_for("rspamd to listen", Duration::from_secs(120), || {
            if let Ok(Some(status)) = rspamd.child.try_wait() {
                panic!("rspamd exited: {status}");
            }
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        rspamd
    }

    fn stop(&mut self) {
        // SAFETY: kill(2) on the rspamd main process this test started; it stops its workers.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let port = self.port;
        wait_for("rspamd to stop listening", Duration::from_secs(30), || {
            TcpStream::connect(("127.0.0.1", port))
                .is_err()
                .then_some(())
        });
    }
}

impl Drop for Rspamd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

#[test]
fn rspamd_actions_reject_file_into_junk_or_pass_and_unreachable_defers() {
    let mut rspamd = Rspamd::start();
    let fixture = Fixture::start(
        None,
        &format!(
            "[spam]\nenabled = true\nbackend = \"rspamd\"\n\
             rspamd_url = \"http://127.0.0.1:{}\"\nrspamd_unreachable = \"defer\"\n",
            rspamd.port
        ),
    );
    let out = fixture.client(
        r#"
outcome = send("gtube", body=GTUBE + "\r\n")
assert outcome.startswith("550 5.7.1"), outcome
assert find("gtube") is None and find("gtube", "Junk") is None

assert send("clean") == "250"
status = find("clean")
assert status.startswith("X-Spam-Status: No,"), status

# No Date, no Message-ID, no To: rspamd says "add header" (score >= 4): Junk.
sloppy = b"From: bob@spf-pass.test\r\nSubject: sloppy\r\n\r\nHello.\r\n"
assert send("sloppy", raw=sloppy) == "250"
assert find("sloppy") is None
status = find("sloppy", "Junk")
assert status.startswith("X-Spam-Status: Yes,") and "MISSING_MID" in status, status
print("rspamd ok")
"#,
    );
    assert!(out.contains("rspamd ok"), "{out}");
    rspamd.stop();
    let out = fixture.client(
        r#"
outcome = send("unreachable")
assert outcome.startswith("451 4.7.1"), outcome
print("unreachable ok")
"#,
    );
    assert!(out.contains("unreachable ok"), "{out}");
}
