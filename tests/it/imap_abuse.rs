//! Abusive IMAP clients (issue 10): each test drives a real node over raw sockets and bounds
//! what one client can cost it, in time or in memory.
//!
//! - pre-auth: a literal over a few KiB is refused without a continuation (NO), a LITERAL+
//!   one closes the session with BYE, and a client trickling a byte at a time is dropped when
//!   the pre-auth deadline (`preauth_timeout_secs`, counted from connect) passes;
//! - an APPEND literal is spilled to a file while it arrives, not held in memory;
//! - LIST with a pathological pattern answers in time, and other sessions meanwhile;
//! - a sequence set repeating `1:*` thousands of times costs no more than the mailbox;
//! - pipelined input is consumed without copying the rest of the buffer per command;
//! - a huge username is logged capped.

use std::time::{Duration, Instant};

use crate::harness::{wait_for, Node, PASSWORD, USER};

/// Raw-socket helpers for the scripts (after the harness prelude).
const RAW: &str = r#"
import threading
def raw(timeout=10):
    s = socket.create_connection((HOST, IMAP_PORT), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = s.makefile("rb")
    greeting = f.readline()
    assert greeting.startswith(b"* OK"), greeting
    return s, f
def raw_login(timeout=10):
    s, f = raw(timeout)
    s.sendall(b'L LOGIN "' + USER.encode() + b'" "' + PASSWORD.encode() + b'"\r\n')
    until_tagged(f, b"L", b"OK")
    return s, f
def until_tagged(f, tag, status=None):
    """Reads lines up to the one tagged `tag`; returns (untagged lines, tagged line)."""
    lines = []
    while True:
        l = f.readline()
        assert l, f"connection closed before {tag!r}; got {lines[-5:]!r}"
        if l.startswith(tag + b" "):
            if status is not None:
                assert l.startswith(tag + b" " + status), (l, lines[-5:])
            return lines, l
        lines.append(l)
def closed(f):
    """Reads until the server closes; returns what it sent meanwhile."""
    got = b""
    while True:
        try:
            l = f.readline()
        except (ConnectionResetError, socket.timeout):
            return got, False
        if not l:
            return got, True
        got += l
def server_rss_kb(key="VmRSS"):
    for l in open(f"/proc/{ENV['PID']}/status"):
        if l.startswith(key + ":"):
            return int(l.split()[1])
"#;

/// A node with an account whose `[imap]` section gets `imap_extra` lines.
fn node_with(imap_extra: &str) -> Node {
    let mut node = Node::create();
    let text = std::fs::read_to_string(&node.config).expect("read config");
    let text = text.replacen("[imap]\n", &format!("[imap]\n{imap_extra}\n"), 1);
    std::fs::write(&node.config, text).expect("write config");
    node.spawn();
    node.add_account(USER, PASSWORD);
    node
}

fn py(node: &Node, script: &str) -> String {
    let pid = format!("PID={}", node.server_pid());
    node.py(&format!("{RAW}\n{script}"), &[&pid])
}

/// Issue 10.2: before login, no literal over a few KiB is buffered (NO without `+`; LITERAL+
/// gets BYE), and the pre-auth phase has a total deadline that trickling bytes cannot extend.
#[test]
fn preauth_literals_are_refused_and_the_preauth_phase_has_a_deadline() {
    let node = node_with("preauth_timeout_secs = 3");
    let out = py(
        &node,
        r#"
# A synchronizing literal of 100 kB before login: refused at once, no continuation.
s, f = raw(timeout=5)
s.sendall(b"a1 LOGIN {100000}\r\n")
l = f.readline()
assert l.startswith(b"a1 NO") or l.startswith(b"a1 BAD"), l
s.sendall(b"a2 NOOP\r\n")
until_tagged(f, b"a2", b"OK")
s.close()
# A non-synchronizing one: BYE and close, without waiting for its bytes.
s, f = raw(timeout=5)
s.sendall(b"b1 LOGIN {100000+}\r\n" + b"x" * 100)
got, eof = closed(f)
assert eof and b"* BYE" in got, (got, eof)
s.close()
# A small literal is still fine before login.
s, f = raw(timeout=5)
s.sendall(b"c1 LOGIN {" + str(len(USER)).encode() + b"}\r\n")
assert f.readline().startswith(b"+")
s.sendall(USER.encode() + b" " + PASSWORD.encode() + b"\r\n")
until_tagged(f, b"c1", b"OK")
# Logged in: the pre-auth deadline no longer applies to this session.
# Trickling one byte every 0.3 s: dropped once 3 s have passed since connect.
t, tf = raw(timeout=10)
start = time.monotonic()
t.settimeout(0.3)
dropped = None
while time.monotonic() - start < 10:
    try:
        t.sendall(b"x")
    except (BrokenPipeError, ConnectionResetError):
        dropped = time.monotonic() - start
        break
    try:
        d = t.recv(4096)
        if d == b"" or b"BYE" in d:
            dropped = time.monotonic() - start
            break
    except socket.timeout:
        pass
assert dropped is not None, "a trickling pre-auth client was never dropped"
assert 2.5 <= dropped <= 6, dropped
s.sendall(b"c2 NOOP\r\n")
until_tagged(f, b"c2", b"OK")
print("ok", round(dropped, 1))
"#,
    );
    assert!(out.starts_with("ok"), "{out}");
}

/// Issue 10.2: a large APPEND literal is written to a spill file while it arrives: the
/// server's memory does not grow by the literal's size while the client is still sending.
#[test]
fn append_literal_is_spilled_not_held_in_memory() {
    let node = Node::with_account();
    let out = py(
        &node,
        r#"
SIZE = 48 * 1024 * 1024
s, f = raw_login(timeout=60)
port = s.getsockname()[1]
before = server_rss_kb()
s.sendall(b"A1 APPEND INBOX {" + str(SIZE).encode() + b"}\r\n")
assert f.readline().startswith(b"+")
head = b"Subject: big\r\n\r\n"
chunk = b"y" * 1022 + b"\r\n"
sent = len(head)
s.sendall(head)
while sent + len(chunk) < SIZE - 10:
    n = min(64, (SIZE - 10 - sent) // len(chunk))
    s.sendall(chunk * n)
    sent += len(chunk) * n
rest = b"z" * (SIZE - sent)
s.sendall(rest[:-2])
# Wait until the server has read everything sent so far: the client side's send queue and the
# server side's receive queue of this connection are empty (/proc/net/tcp).
def queues():
    tx = rx = None
    for l in open("/proc/net/tcp").readlines()[1:]:
        parts = l.split()
        lport, rport = int(parts[1].split(":")[1], 16), int(parts[2].split(":")[1], 16)
        txq, rxq = (int(x, 16) for x in parts[4].split(":"))
        if (lport, rport) == (IMAP_PORT, port):
            rx = rxq
        if (lport, rport) == (port, IMAP_PORT):
            tx = txq
    return tx, rx
deadline = time.monotonic() + 60
while queues() != (0, 0):
    assert time.monotonic() < deadline, ("server did not read the literal", queues())
    time.sleep(0.05)
during = server_rss_kb()
grown = during - before
s.sendall(rest[-2:] + b"\r\n")
until_tagged(f, b"A1", b"OK")
s.sendall(b"A2 SELECT INBOX\r\n")
until_tagged(f, b"A2", b"OK")
s.sendall(b"A3 FETCH 1 (RFC822.SIZE)\r\n")
lines, _ = until_tagged(f, b"A3", b"OK")
assert any(b"RFC822.SIZE " + str(SIZE).encode() in l for l in lines), lines
print(grown)
"#,
    );
    let grown: i64 = out.trim().parse().expect("rss growth");
    eprintln!("RSS growth while a 48 MiB literal was arriving: {grown} kB");
    assert!(
        grown < 16 * 1024,
        "server RSS grew by {grown} kB while a 48 MiB literal was arriving"
    );
}

/// Issue 10.3: LIST/LSUB with many wildcards against a long name answers within 2 s, and a
/// NOOP on another connection answers within 1 s meanwhile.
#[test]
fn list_with_a_pathological_pattern_answers_in_time() {
    let node = Node::with_account();
    let out = py(
        &node,
        r#"
c = imap()
name = "a" * 250
ok(c.create(name), "CREATE")
ok(c.subscribe(name), "SUBSCRIBE")
c.logout()
s, f = raw_login(timeout=10)
o, of = raw_login(timeout=10)
for verb in (b"LIST", b"LSUB"):
    for pattern in (b"********b", b"%%%%%%%%b", b"*%*%*%*%b"):
        start = time.monotonic()
        s.sendall(b"P " + verb + b' "" "' + pattern + b'"\r\n')
        # Another session is served meanwhile.
        o.sendall(b"N NOOP\r\n")
        until_tagged(of, b"N", b"OK")
        assert time.monotonic() - start < 1.0, ("NOOP", verb, pattern, time.monotonic() - start)
        lines, tagged = until_tagged(f, b"P", b"OK")
        assert lines == [], lines
        assert time.monotonic() - start < 2.0, (verb, pattern, time.monotonic() - start)
# Wildcards still match what they should.
s.sendall(b'Q LIST "" "*a"\r\n')
lines, _ = until_tagged(f, b"Q", b"OK")
assert any(name.encode() in l for l in lines), lines
s.sendall(b'R LIST "" "%%%%%%%%a"\r\n')
lines, _ = until_tagged(f, b"R", b"OK")
assert any(name.encode() in l for l in lines), lines
print("ok")
"#,
    );
    assert_eq!(out.trim(), "ok");
}

/// Issue 10.4: a sequence set of thousands of `1:*` costs what the mailbox holds, not the
/// product (FETCH, STORE, COPY, UID EXPUNGE): memory bounded and answers in time.
#[test]
fn repeated_sequence_ranges_cost_no_more_than_the_mailbox() {
    let node = Node::with_account();
    let out = py(
        &node,
        r#"
N = 1000
s, f = raw_login(timeout=120)
msg = b"Subject: m\r\n\r\nbody\r\n"
batch = b"".join(b"A%d APPEND INBOX {%d+}\r\n" % (i, len(msg)) + msg + b"\r\n" for i in range(N))
s.sendall(batch)
for i in range(N):
    until_tagged(f, b"A%d" % i, b"OK")
s.sendall(b"S SELECT INBOX\r\n")
until_tagged(f, b"S", b"OK")
s.sendall(b'C CREATE other\r\n')
until_tagged(f, b"C", b"OK")
# 64 KiB line limit: 16,000 elements of "1:*".
many = b",".join([b"1:*"] * 16000)
hwm_before = server_rss_kb("VmHWM")
for i, (cmd, expect) in enumerate([
        (b"FETCH " + many + b" (UID)", N),
        (b"UID FETCH " + many + b" (FLAGS)", N),
        (b"STORE " + many + b" +FLAGS.SILENT (\\Flagged)", 0),
        (b"UID STORE " + many + b" -FLAGS (\\Flagged)", N),
        (b"COPY " + many + b" other", 0),
        (b"UID EXPUNGE " + many, 0)]):
    tag = b"F%d" % i
    start = time.monotonic()
    s.sendall(tag + b" " + cmd + b"\r\n")
    lines, _ = until_tagged(f, tag, b"OK")
    elapsed = time.monotonic() - start
    fetches = [l for l in lines if b" FETCH " in l]
    assert len(fetches) == expect, (cmd[:20], len(fetches))
    assert elapsed < 5.0, (cmd[:20], elapsed)
grown = server_rss_kb("VmHWM") - hwm_before
print(grown)
"#,
    );
    let grown: i64 = out.trim().parse().expect("hwm growth");
    eprintln!("peak RSS growth over the sequence-set commands: {grown} kB");
    assert!(
        grown < 32 * 1024,
        "server peak RSS grew by {grown} kB for sequence sets over 1,000 messages"
    );
}

/// Issue 10.9: pipelined commands are consumed from the input without copying the rest of the
/// buffer for each one (before login). On the code before the fix (a `split_off` per command)
/// 2 Mi one-byte command lines (each answered `* BAD`) sent in one burst cost the server about
/// twice the CPU of linear consumption (2.5 s against 1.3 s in a debug build then). An absolute
/// bound depends on the machine (1.9 s on one, 2.7 s on another, for the same code), so the
/// test compares two runs on the same node: the burst, and the same lines sent 4,096 at a time
/// (each batch answered before the next is sent, so the buffer never holds more than 4 KiB and
/// copying it costs little). Linear consumption costs the same per line
/// either way; copying the rest of a large buffer for each command would make the burst cost
/// well over 1.3 times the batches (measured with the linear code: 3.19 s against
/// 3.66 s, a ratio of 0.87).
#[test]
fn pipelined_input_is_consumed_in_linear_time() {
    let node = Node::with_account();
    let out = py(
        &node,
        r#"
LINES = 2 * 1024 * 1024
BATCH = 4096
import os
def server_cpu():
    fields = open(f"/proc/{ENV['PID']}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
def run(batches, tag):
    s, f = raw(timeout=60)
    lines = LINES // batches
    data = b"\n" * lines + tag + b" NOOP\r\n"
    bad = 0
    before = server_cpu()
    for _ in range(batches):
        sender = threading.Thread(target=s.sendall, args=(data,), daemon=True)
        sender.start()
        tail = b""
        while True:
            d = s.recv(1 << 20)
            assert d, "server closed"
            chunk = tail + d
            bad += chunk.count(b"* BAD") - tail.count(b"* BAD")
            tail = chunk[-64:]
            if b"\r\n" + tag + b" OK" in chunk[-200:] or chunk.startswith(tag + b" OK"):
                break
        sender.join()
    assert bad == lines * batches, bad
    cpu = server_cpu() - before
    s.close()
    return cpu
burst = run(1, b"Z")
batched = run(LINES // BATCH, b"Y")
print(round(burst, 2), round(batched, 2))
"#,
    );
    let mut figures = out
        .split_whitespace()
        .map(|v| v.parse::<f64>().expect("cpu seconds"));
    let (burst, batched) = (figures.next().unwrap(), figures.next().unwrap());
    eprintln!(
        "server CPU for 2 Mi pipelined one-byte lines: {burst} s in one burst, {batched} s in batches of 4,096"
    );
    assert!(
        burst < 1.3 * batched.max(0.5),
        "2 Mi pipelined one-byte command lines cost the server {burst} s of CPU in one burst \
         against {batched} s in batches of 4,096: consumption is not linear"
    );
}

/// Issue 10.10: a username of 60,000 bytes is logged capped (at most 256 bytes of it).
#[test]
fn client_strings_are_capped_in_logs() {
    let node = Node::with_account();
    py(
        &node,
        r#"
s, f = raw(timeout=10)
s.sendall(b'L1 LOGIN "' + b"u" * 60000 + b'" "whatever-password"\r\n')
_, l = until_tagged(f, b"L1")
assert b" NO" in l, l
s.sendall(b'L2 AUTHENTICATE PLAIN\r\n')
assert f.readline().startswith(b"+")
import base64
s.sendall(base64.b64encode(b"\0" + b"v" * 6000 + b"\0pw") + b"\r\n")
_, l = until_tagged(f, b"L2")
assert b" NO" in l, l
print("ok")
"#,
    );
    let start = Instant::now();
    // The log lines are written by the server asynchronously: wait for both.
    let log = wait_for("both failed logins logged", Duration::from_secs(10), || {
        let log = node.stderr();
        (log.matches("outcome=\"failed\"").count() + log.matches("outcome=failed").count() >= 2)
            .then_some(log)
    });
    let longest = |c: char| {
        log.split(|x| x != c)
            .map(str::len)
            .max()
            .unwrap_or_default()
    };
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(
        longest('u') <= 256 && longest('v') <= 256,
        "usernames logged uncapped: runs of {} and {} bytes",
        longest('u'),
        longest('v')
    );
}
