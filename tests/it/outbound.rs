//! Outbound mail through the real binary: submission (smtplib, STARTTLS + AUTH) to a recording
//! SMTP sink on loopback (Python's aiosmtpd, on 127.0.0.1 and ::1), reached through the
//! `[outbound.overrides]` map. DKIM checked by dkimpy and mail-auth, per-destination rate and
//! IP family, retries on 4xx, DSN on 5xx read back with imaplib, forwarding with SRS, the queue
//! commands, and the relay matrix. Every wait polls a condition against a deadline.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;

use crate::harness::{free_port, wait_for, Node, DOMAIN, PASSWORD, USER};

/// The Debian interpreter: it has python3-aiosmtpd and python3-dkim.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";
/// How long a delivery may take to reach the sink.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(60);

/// The sink: aiosmtpd on 127.0.0.1 and ::1 (same port), answering every DATA with the
/// configured reply and appending one JSON line per message: time of MAIL FROM, peer address,
/// envelope, data (base64), reply.
const SINK_SCRIPT: &str = r#"
import base64, json, sys, time
from aiosmtpd.controller import Controller
port, mode, out, ready = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
REPLIES = {"ok": "250 2.0.0 OK", "tempfail": "451 4.3.0 try again later",
           "permfail": "550 5.1.1 no such user here"}
class Handler:
    async def handle_MAIL(self, server, session, envelope, address, options):
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        envelope.mail_time = time.time()
        return "250 OK"
    async def handle_DATA(self, server, session, envelope):
        reply = REPLIES[mode]
        data = envelope.original_content or envelope.content
        event = {"t": getattr(envelope, "mail_time", time.time()), "peer": session.peer[0],
                 "from": envelope.mail_from, "to": envelope.rcpt_tos,
                 "data": base64.b64encode(data).decode(), "reply": reply}
        with open(out, "a") as f:
            f.write(json.dumps(event) + "\n")
        return reply
controllers = []
for host in ("127.0.0.1", "::1"):
    c = Controller(Handler(), hostname=host, port=port, ready_timeout=30)
    c.start()
    controllers.append(c)
with open(ready, "w") as f:
    f.write("ready")
while True:
    time.sleep(3600)
"#;

#[derive(Debug, Clone)]
struct SinkEvent {
    time_secs: f64,
    peer: String,
    mail_from: String,
    recipients: Vec<String>,
    data: Vec<u8>,
}

struct Sink {
    _dir: tempfile::TempDir,
    child: Child,
    events_path: PathBuf,
    port: u16,
}

impl Sink {
    fn start(mode: &str) -> Sink {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let events_path = dir.path().join("events.jsonl");
        let ready_path = dir.path().join("ready");
        let child = Command::new(SYSTEM_PYTHON)
            .arg("-c")
            .arg(SINK_SCRIPT)
            .arg(port.to_string())
            .arg(mode)
            .arg(&events_path)
            .arg(&ready_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run the aiosmtpd sink (apt-get install python3-aiosmtpd)");
        let mut sink = Sink {
            _dir: dir,
            child,
            events_path,
            port,
        };
        wait_for("the sink to listen", Duration::from_secs(30), || {
            if let Ok(Some(status)) = sink.child.try_wait() {
                panic!("the sink exited: {status}");
            }
            ready_path.exists().then_some(())
        });
        sink
    }

    fn events(&self) -> Vec<SinkEvent> {
        let text = std::fs::read_to_string(&self.events_path).unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .map(|value| SinkEvent {
                time_secs: value["t"].as_f64().unwrap_or(0.0),
                peer: value["peer"].as_str().unwrap_or("").to_owned(),
                mail_from: value["from"].as_str().unwrap_or("").to_owned(),
                recipients: value["to"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
                data: base64::engine::general_purpose::STANDARD
                    .decode(value["data"].as_str().unwrap_or(""))
                    .unwrap_or_default(),
            })
            .collect()
    }

    fn wait_events(&self, count: usize, deadline: Duration) -> Vec<SinkEvent> {
        wait_for(&format!("{count} messages at the sink"), deadline, || {
            let events = self.events();
            (events.len() >= count).then_some(events)
        })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node whose `[outbound]` section is `outbound` (`{PORT}` replaced by the sink's port),
/// with the account `USER`. Returns it with its submission port.
fn node_with(outbound: &str, sink_port: u16) -> (Node, u16) {
    let mut node = Node::create();
    let mut config = std::fs::read_to_string(&node.config).expect("read config");
    config.push_str(&outbound.replace("{PORT}", &sink_port.to_string()));
    std::fs::write(&node.config, &config).expect("write config");
    let submission_port = config
        .split("submission_listen = [\"127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|port| port.parse().ok())
        .expect("submission port in the config");
    node.spawn();
    node.add_account(USER, PASSWORD);
    (node, submission_port)
}

/// Short delays and the test destinations; `extra` adds policies.
fn outbound_section(extra: &str) -> String {
    format!(
        r#"
[outbound]
ehlo_hostname = "mx.kermail.test"
poll_interval_secs = 1
lease_secs = 30
[outbound.overrides]
"sink.test" = ["127.0.0.1:{{PORT}}"]
"rate.test" = ["127.0.0.1:{{PORT}}"]
"dual.test" = ["[::1]:{{PORT}}", "127.0.0.1:{{PORT}}"]
"dualany.test" = ["[::1]:{{PORT}}", "127.0.0.1:{{PORT}}"]
[outbound.retry]
first_retry_delay_secs = 1
retry_delay_secs_max = 4
backoff_factor = 2.0
jitter_fraction = 0.0
max_age_secs = 600
delay_warning_secs = 0
{extra}
"#
    )
}

/// Submits `count` messages from USER to `to` over STARTTLS + AUTH PLAIN with smtplib.
fn submit(node: &Node, submission_port: u16, to: &str, count: usize) {
    node.py(
        r#"
import ssl
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
s = smtplib.SMTP(HOST, int(ENV["SUB"]), timeout=60)
s.ehlo("client.test")
s.starttls(context=ctx)
s.ehlo("client.test")
s.login(USER, PASSWORD)
for n in range(int(ENV["COUNT"])):
    refused = s.sendmail(USER, [ENV["TO"]], message(f"outbound {n}", sender=USER, to=ENV["TO"]))
    assert not refused, refused
s.quit()
"#,
        &[
            &format!("SUB={submission_port}"),
            &format!("TO={to}"),
            &format!("COUNT={count}"),
        ],
    );
}

fn dkimpy_verifies(record: &str, message: &[u8]) -> bool {
    let script = r#"
import sys, dkim
record = sys.argv[1].encode()
message = sys.stdin.buffer.read()
print("PASS" if dkim.verify(message, dnsfunc=lambda name, timeout=5: record) else "FAIL")
"#;
    let mut child = Command::new(SYSTEM_PYTHON)
        .args(["-c", script, record])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run python3-dkim");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(message)
        .expect("write message");
    let output = child.wait_with_output().expect("dkimpy");
    String::from_utf8_lossy(&output.stdout).trim() == "PASS"
}

struct TxtCache(Mutex<HashMap<String, mail_auth::Txt>>);

impl mail_auth::ResolverCache<String, mail_auth::Txt> for TxtCache {
    fn get<Q>(&self, key: &Q) -> Option<mail_auth::Txt>
    where
        String: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.lock().ok()?.get(key).cloned()
    }
    fn remove<Q>(&self, key: &Q) -> Option<mail_auth::Txt>
    where
        String: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.lock().ok()?.remove(key)
    }
    fn insert(&self, key: String, value: mail_auth::Txt, _: std::time::Instant) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(key, value);
        }
    }
}

fn mail_auth_verifies(name: &str, record: &str, message: &[u8]) -> bool {
    use mail_auth::common::parse::TxtRecordParser;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let key = mail_auth::common::verify::DomainKey::parse(record.as_bytes()).expect("record");
        let cache = TxtCache(Mutex::new(HashMap::new()));
        cache
            .0
            .lock()
            .expect("cache")
            .insert(format!("{name}."), mail_auth::Txt::from(key));
        // The record is in the cache: no query leaves the machine.
        let authenticator = mail_auth::MessageAuthenticator::new_cloudflare().expect("resolver");
        let parsed = mail_auth::AuthenticatedMessage::parse(message).expect("parse");
        let params = mail_auth::Parameters::new(&parsed).with_txt_cache(&cache);
        let output = authenticator.verify_dkim(params).await;
        output
            .iter()
            .any(|o| o.result() == &mail_auth::DkimResult::Pass)
    })
}

/// `NAME. IN TXT "a" "b"` -> (NAME, "ab").
fn parse_zone_line(line: &str) -> (String, String) {
    let name = line
        .split_whitespace()
        .next()
        .expect("name")
        .trim_end_matches('.')
        .to_owned();
    let record: String = line.split('"').skip(1).step_by(2).collect();
    (name, record)
}

#[test]
fn submitted_mail_reaches_the_sink_dkim_signed_and_forwarding_uses_srs() {
    let sink = Sink::start("ok");
    let (node, submission) = node_with(&outbound_section(""), sink.port);
    let generated = node.cli_ok(&["dkim", "generate", DOMAIN]);
    let (name, record) = parse_zone_line(generated.lines().next().expect("zone line"));
    assert!(
        name.ends_with(&format!("._domainkey.{DOMAIN}")),
        "{generated}"
    );
    assert!(record.starts_with("v=DKIM1; k=ed25519; p="), "{generated}");
    let listed = node.cli_ok(&["dkim", "list"]);
    assert!(listed.contains("signing"), "{listed}");

    submit(&node, submission, "bob@sink.test", 1);
    let events = sink.wait_events(1, DELIVERY_DEADLINE);
    let event = &events[0];
    assert_eq!(event.mail_from, USER);
    assert_eq!(event.recipients, vec!["bob@sink.test".to_owned()]);
    let text = String::from_utf8_lossy(&event.data);
    assert!(text.starts_with("DKIM-Signature:"), "{text}");
    assert!(!text.contains("Return-Path:"), "{text}");
    assert!(text.contains("c=relaxed/relaxed"), "{text}");
    assert!(dkimpy_verifies(&record, &event.data), "dkimpy: {text}");
    assert!(
        mail_auth_verifies(&name, &record, &event.data),
        "mail-auth: {text}"
    );
    // The queue is empty once the sink accepted.
    wait_for("an empty queue", DELIVERY_DEADLINE, || {
        node.cli_ok(&["queue", "list"])
            .trim()
            .is_empty()
            .then_some(())
    });

    // A local alias forwarding outside: the envelope sender is rewritten with SRS.
    node.cli_ok(&["alias", "add", &format!("fwd@{DOMAIN}"), "carol@sink.test"]);
    node.py(
        r#"
s = smtp()
s.sendmail("someone@elsewhere.example", [ENV["TO"]], message("forwarded", sender="someone@elsewhere.example", to=ENV["TO"]))
s.quit()
"#,
        &[&format!("TO=fwd@{DOMAIN}")],
    );
    let events = sink.wait_events(2, DELIVERY_DEADLINE);
    let forwarded = &events[1];
    assert_eq!(forwarded.recipients, vec!["carol@sink.test".to_owned()]);
    assert!(
        forwarded.mail_from.starts_with("SRS0=")
            && forwarded
                .mail_from
                .ends_with(&format!("=elsewhere.example=someone@{DOMAIN}")),
        "{}",
        forwarded.mail_from
    );
}

#[test]
fn a_rate_limited_destination_never_gets_more_than_its_rate_in_any_second() {
    const RATE: usize = 2;
    const MESSAGES: usize = 9;
    let sink = Sink::start("ok");
    let policy = format!(
        r#"
[[outbound.policy]]
name = "slow"
match_domains = ["rate.test"]
max_messages_per_second = {RATE}.0
max_connections = 5
"#
    );
    let (node, submission) = node_with(&outbound_section(&policy), sink.port);
    submit(&node, submission, "x@rate.test", MESSAGES);
    let events = sink.wait_events(MESSAGES, DELIVERY_DEADLINE);
    let mut times: Vec<f64> = events.iter().map(|e| e.time_secs).collect();
    times.sort_by(f64::total_cmp);
    for (index, start) in times.iter().enumerate() {
        let in_window = times[index..]
            .iter()
            .take_while(|t| **t < start + 1.0)
            .count();
        assert!(
            in_window <= RATE,
            "{in_window} messages in the second from {start}: {times:?}"
        );
    }
}

#[test]
fn an_ipv4_only_destination_is_never_contacted_over_ipv6() {
    let sink = Sink::start("ok");
    let policy = r#"
[[outbound.policy]]
name = "v4"
match_domains = ["dual.test"]
ip_family = "ipv4-only"
"#;
    let (node, submission) = node_with(&outbound_section(policy), sink.port);
    submit(&node, submission, "x@dual.test", 3);
    let events = sink.wait_events(3, DELIVERY_DEADLINE);
    for event in &events {
        assert_eq!(event.peer, "127.0.0.1", "{event:?}");
    }
    // The same destination without the rule (::1 listed first) is reached over IPv6.
    submit(&node, submission, "x@dualany.test", 1);
    let events = sink.wait_events(4, DELIVERY_DEADLINE);
    assert!(
        events.iter().any(|e| e.peer == "::1"),
        "{:?}",
        events.iter().map(|e| &e.peer).collect::<Vec<_>>()
    );
}

#[test]
fn temporary_failures_are_retried_on_the_backoff_schedule_and_the_queue_commands_show_them() {
    let sink = Sink::start("tempfail");
    let (node, submission) = node_with(&outbound_section(""), sink.port);
    submit(&node, submission, "x@sink.test", 1);
    // Delays of 1, 2, 4 s (no jitter) between attempts.
    let events = sink.wait_events(4, Duration::from_secs(90));
    let times: Vec<f64> = events.iter().map(|e| e.time_secs).collect();
    for (gap, expected) in times.windows(2).zip([1.0, 2.0, 4.0]) {
        let actual = gap[1] - gap[0];
        assert!(
            actual >= expected - 0.05 && actual <= expected + 3.0,
            "gap {actual} s, expected about {expected} s: {times:?}"
        );
    }
    let listed = node.cli_ok(&["queue", "list"]);
    let id = listed
        .split_whitespace()
        .next()
        .expect("one entry")
        .to_owned();
    assert!(listed.contains("recipients=1/1 pending"), "{listed}");
    let shown = node.cli_ok(&["queue", "show", &id]);
    assert!(shown.contains("recipient: x@sink.test pending"), "{shown}");
    assert!(shown.contains("451 4.3.0 try again later"), "{shown}");
    assert!(shown.contains("next attempt: "), "{shown}");
    assert!(shown.contains("lease: "), "{shown}");
    node.cli_ok(&["queue", "retry", &id]);
    node.cli_ok(&["queue", "delete", &id]);
    assert!(node.cli_ok(&["queue", "list"]).trim().is_empty());
    // Mistakes: clear message, non-zero exit.
    for args in [
        vec!["queue", "show", &id],
        vec!["queue", "delete", "999999"],
        vec!["queue", "show", "not-a-number"],
        vec!["dkim", "generate", "unknown.example"],
        vec!["dkim", "rotate", DOMAIN],
        vec!["dkim", "remove", DOMAIN, "nosuchselector"],
        vec!["dkim", "generate", DOMAIN, "--algorithm", "dsa"],
    ] {
        let out = node.cli(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            !String::from_utf8_lossy(&out.stderr).trim().is_empty(),
            "{args:?}: no message"
        );
    }
}

#[test]
fn a_permanent_failure_puts_a_dsn_in_the_senders_inbox() {
    let sink = Sink::start("permfail");
    let (node, submission) = node_with(&outbound_section(""), sink.port);
    submit(&node, submission, "nobody@sink.test", 1);
    sink.wait_events(1, DELIVERY_DEADLINE);
    let found = wait_for("a DSN in the sender's INBOX", DELIVERY_DEADLINE, || {
        let out = node.py(
            r#"
for uid, flags, raw in inbox_messages():
    if b"multipart/report" in raw and b"nobody@sink.test" in raw:
        print("DSN")
        print(raw.decode(errors="replace"))
"#,
            &[],
        );
        out.starts_with("DSN").then_some(out)
    });
    assert!(found.contains("Action: failed"), "{found}");
    assert!(found.contains("550 5.1.1"), "{found}");
    assert!(node.cli_ok(&["queue", "list"]).trim().is_empty());
}

#[test]
fn the_relay_matrix_is_refused_on_every_port() {
    let sink = Sink::start("ok");
    let (node, submission) = node_with(&outbound_section(""), sink.port);
    node.add_account(&format!("bob@{DOMAIN}"), PASSWORD);
    node.cli_ok(&[
        "alias",
        "add",
        &format!("sales@{DOMAIN}"),
        &format!("bob@{DOMAIN}"),
    ]);
    let submissions_port: u16 = std::fs::read_to_string(&node.config)
        .expect("config")
        .split("submissions_listen = [\"127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|port| port.parse().ok())
        .expect("submissions port");
    let out = node.py(
        r#"
import ssl
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
SUB, SUBS, DOMAIN = int(ENV["SUB"]), int(ENV["SUBS"]), ENV["DOMAIN"]
victim = "victim@sink.test"
results = []
def refused(what, fn):
    try:
        fn()
    except (smtplib.SMTPException, smtplib.SMTPRecipientsRefused) as e:
        results.append(f"{what}: refused {e}")
        return
    results.append(f"{what}: ACCEPTED")

def mx():
    s = smtp()
    s.sendmail("x@elsewhere.example", [victim], message("relay 25", sender="x@elsewhere.example", to=victim))
refused("unauthenticated on 25", mx)

def sub_plain():
    s = smtplib.SMTP(HOST, SUB, timeout=30); s.ehlo("c")
    s.sendmail(USER, [victim], message("relay 587", sender=USER, to=victim))
refused("unauthenticated on 587", sub_plain)

def sub_tls_unauth():
    s = smtplib.SMTP(HOST, SUB, timeout=30); s.ehlo("c"); s.starttls(context=ctx); s.ehlo("c")
    s.sendmail(USER, [victim], message("relay 587 tls", sender=USER, to=victim))
refused("unauthenticated on 587 after STARTTLS", sub_tls_unauth)

def subs_unauth():
    s = smtplib.SMTP_SSL(HOST, SUBS, timeout=30, context=ctx); s.ehlo("c")
    s.sendmail(USER, [victim], message("relay 465", sender=USER, to=victim))
refused("unauthenticated on 465", subs_unauth)

def auth_before_tls():
    s = smtplib.SMTP(HOST, SUB, timeout=30); s.ehlo("c")
    code, text = s.docmd("AUTH", "PLAIN " + __import__("base64").b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode())
    if code == 530:
        raise smtplib.SMTPException(f"{code} {text}")
refused("AUTH before TLS on 587", auth_before_tls)

def logged_in():
    s = smtplib.SMTP(HOST, SUB, timeout=30); s.ehlo("c"); s.starttls(context=ctx); s.ehlo("c")
    s.login(USER, PASSWORD)
    return s
for sender in (f"bob@{DOMAIN}", f"sales@{DOMAIN}"):
    def as_other(sender=sender):
        s = logged_in()
        s.sendmail(sender, [victim], message("as other", sender=sender, to=victim))
    refused(f"authenticated as {sender}", as_other)
    def from_other(sender=sender):
        s = logged_in()
        s.sendmail(USER, [victim], message("from other", sender=sender, to=victim))
    refused(f"authenticated, From {sender}", from_other)
print("\n".join(results))
"#,
        &[
            &format!("SUB={submission}"),
            &format!("SUBS={submissions_port}"),
            &format!("DOMAIN={DOMAIN}"),
        ],
    );
    assert!(!out.contains("ACCEPTED"), "{out}");
    assert_eq!(out.lines().count(), 9, "{out}");
    assert!(node.cli_ok(&["queue", "list"]).trim().is_empty());
    // Nothing was queued, so nothing can reach the sink.
    assert!(sink.events().is_empty());
}

#[test]
fn a_delay_warning_then_an_expiry_dsn_reach_the_sender() {
    let sink = Sink::start("tempfail");
    let section = r#"
[outbound]
ehlo_hostname = "mx.kermail.test"
poll_interval_secs = 1
lease_secs = 30
[outbound.overrides]
"sink.test" = ["127.0.0.1:{PORT}"]
[outbound.retry]
first_retry_delay_secs = 1
retry_delay_secs_max = 1
backoff_factor = 1.0
jitter_fraction = 0.0
max_age_secs = 4
delay_warning_secs = 2
"#;
    let (node, submission) = node_with(section, sink.port);
    submit(&node, submission, "late@sink.test", 1);
    let reports = wait_for(
        "a delay warning and an expiry DSN",
        Duration::from_secs(60),
        || {
            let out = node.py(
                r#"
for uid, flags, raw in inbox_messages():
    if b"multipart/report" in raw:
        print("=====")
        print(raw.decode(errors="replace"))
"#,
                &[],
            );
            (out.matches("=====").count() >= 2).then_some(out)
        },
    );
    let (warning, failure) = reports
        .split("=====")
        .filter(|part| !part.trim().is_empty())
        .fold((None, None), |(w, f), part| {
            if part.contains("Action: delayed") {
                (Some(part.to_owned()), f)
            } else {
                (w, Some(part.to_owned()))
            }
        });
    let warning = warning.expect("a delay warning");
    let failure = failure.expect("a failure report");
    assert!(warning.contains("late@sink.test"), "{warning}");
    assert!(failure.contains("Action: failed"), "{failure}");
    assert!(failure.contains("Status: 4.4.7"), "{failure}");
    assert!(node.cli_ok(&["queue", "list"]).trim().is_empty());
    // One warning only, however many attempts it took.
    assert_eq!(reports.matches("Action: delayed").count(), 1, "{reports}");
}

/// ARC sealing (RFC 8617) when an alias forwards MX mail outside: the forwarded copy carries
/// our set (`i=1`, `cv=none`, `a=rsa-sha256`, our authserv-id in the ARC-Authentication-
/// Results) on top of our Authentication-Results, and dkimpy's `arc_verify` finds the chain
/// valid with the domain's published key. Mail not forwarded gets no seal.
#[test]
fn mail_forwarded_by_an_alias_is_arc_sealed_and_dkimpy_verifies_the_chain() {
    let dns = crate::inbound_auth::DnsServer::start(&serde_json::json!({
        "client.test": [["TXT", ["v=spf1 ip4:127.0.0.1 -all"]], ["A", "127.0.0.1"]],
        "elsewhere.example": [["TXT", ["v=spf1 ip4:127.0.0.1 -all"]]],
    }));
    let sink = Sink::start("ok");
    let inbound = format!(
        "[inbound]\nenabled = true\ndns_servers = [\"{}\"]\ndns_timeout_ms = 500\ndns_attempts = 1\n",
        dns.address()
    );
    let (node, _) = node_with(&outbound_section(&inbound), sink.port);
    let generated = node.cli_ok(&["dkim", "generate", DOMAIN, "--algorithm", "rsa"]);
    let (_, record) = parse_zone_line(generated.lines().next().expect("zone line"));
    node.cli_ok(&["alias", "add", &format!("fwd@{DOMAIN}"), "carol@sink.test"]);
    node.py(
        r#"
s = smtp()
s.sendmail("someone@elsewhere.example", [ENV["TO"]], message("sealed", sender="someone@elsewhere.example", to=ENV["TO"]))
s.sendmail("someone@elsewhere.example", [USER], message("kept", sender="someone@elsewhere.example", to=USER))
s.quit()
"#,
        &[&format!("TO=fwd@{DOMAIN}")],
    );
    let events = sink.wait_events(1, DELIVERY_DEADLINE);
    let text = String::from_utf8_lossy(&events[0].data).into_owned();
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    for field in [
        "ARC-Seal: i=1; a=rsa-sha256",
        "ARC-Message-Signature: i=1; a=rsa-sha256",
        "ARC-Authentication-Results: i=1; mx.kermail.test;",
    ] {
        assert!(head.contains(field), "{field} missing in:\n{head}");
    }
    assert!(head.contains("cv=none"), "{head}");
    assert!(
        head.contains("Authentication-Results: mx.kermail.test;"),
        "{head}"
    );
    let script = r#"
import sys, dkim
record = sys.argv[1].encode()
cv, results, comment = dkim.arc_verify(sys.stdin.buffer.read(), dnsfunc=lambda name, timeout=5: record)
print(cv.decode(), comment)
"#;
    let mut child = Command::new(SYSTEM_PYTHON)
        .args(["-c", script, &record])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3-dkim");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&events[0].data)
        .expect("write message");
    let output = child.wait_with_output().expect("dkimpy");
    let verdict = String::from_utf8_lossy(&output.stdout);
    assert!(
        verdict.starts_with("pass"),
        "dkimpy arc_verify: {verdict} {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The copy kept locally was not forwarded: no seal.
    let kept = node.py(
        r#"
c = imap()
c.select("INBOX")
typ, data = c.search(None, "SUBJECT", "kept")
num = data[0].split()[-1]
typ, data = c.fetch(num, "(BODY.PEEK[HEADER])")
print("SEALED" if b"ARC-Seal" in data[0][1] else "PLAIN")
"#,
        &[],
    );
    assert!(kept.contains("PLAIN"), "{kept}");
}
