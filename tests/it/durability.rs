//! Durability of a `250` to DATA: kill -9 right after it, restart, the message is there; and,
//! because a killed process leaves the page cache intact, the order on disk proven with strace:
//! every 250 to DATA is written to the socket after an fsync/fdatasync of the log file that
//! received the message. Also graceful shutdown on SIGTERM.

use crate::harness::{Node, PASSWORD};

/// Delivers one message and SIGKILLs the server the moment smtplib has the 250.
const DELIVER_THEN_KILL: &str = r#"
import os, signal
pid = int(POS[0]); subject = POS[1]
s = smtp()
assert s.sendmail("bob@example.org", [USER], message(subject)) == {}
os.kill(pid, signal.SIGKILL)   # right after the 250: no QUIT, no chance to flush
print("sent")
"#;

#[test]
fn kill9_right_after_250_keeps_the_message() {
    let mut node = Node::with_account();
    for round in 0..3 {
        let pid = node.server_pid().to_string();
        node.py(DELIVER_THEN_KILL, &[&pid, &format!("killed {round}")]);
        node.reap_killed();
        node.spawn();
        let out = node.py(
            r#"
n = int(POS[0])
msgs = inbox_messages()
subjects = [re.search(rb"Subject: ([^\r]*)", m[2]).group(1).decode() for m in msgs]
assert subjects == [f"killed {i}" for i in range(n + 1)], subjects
for i, (uid, flags, raw) in enumerate(msgs):
    assert strip_trace_headers(raw) == message(f"killed {i}"), raw
print(",".join(str(m[0]) for m in msgs))
"#,
            &[&round.to_string()],
        );
        let uids: Vec<u32> = out.trim().split(',').map(|u| u.parse().unwrap()).collect();
        assert!(
            uids.windows(2).all(|w| w[0] < w[1]),
            "UIDs not increasing: {uids:?}"
        );
    }
}

/// How the order is proven: the server runs under `strace -f -yy -s 65536`, tracing the
/// syscalls that read from or write to sockets and files and the syncs. `-yy` prints each file
/// descriptor's path (files) or connection endpoints (TCP), so a trace line says which file or
/// which client connection it touches. strace serialises the events of all threads into one
/// stream: a syscall's entry is its complete line (or its `<unfinished ...>` line), its exit is
/// the same complete line (or its `<... resumed>` line), and line order is event order.
///
/// For every write to a client socket that starts with `250` and answers a read on the same
/// connection that ended with `\r\n.\r\n` (the end of DATA; smtplib does not pipeline past it),
/// the parser requires a file F under the data folder such that, in this order:
///   1. the end-of-DATA read returned,
///   2. a write to F started (the log entry carrying the message),
///   3. an fsync or fdatasync of F started after that write returned and returned itself,
///   4. the 250 write started.
///
/// It also checks it found exactly one such 250 per message sent, so a change of reply text or
/// syscall would fail the test rather than pass it vacuously.
const STRACE_CHECK: &str = r#"
import collections
path, data_dir, expected = POS[0], POS[1], int(POS[2])
STR = re.compile(r'"((?:[^"\\]|\\.)*)"')
ENTRY = re.compile(r'^(\d+) +(\w+)\((\d+)<((?:TCP[^\]]*\])|[^>]*)>(.*)$')
RESUMED = re.compile(r'^(\d+) +<\.\.\. (\w+) resumed>(.*)$')
events = []          # dicts: name, target, text, entry, exit
pending = {}         # pid -> event
for n, line in enumerate(open(path, errors="replace")):
    line = line.rstrip("\n")
    m = RESUMED.match(line)
    if m:
        ev = pending.pop(m.group(1), None)
        if ev is not None:
            ev["text"] += m.group(3)
            ev["exit"] = n
        continue
    m = ENTRY.match(line)
    if not m:
        continue
    ev = {"name": m.group(2), "target": m.group(4), "text": m.group(5), "entry": n, "exit": None}
    events.append(ev)
    if line.endswith("<unfinished ...>"):
        pending[m.group(1)] = ev
    else:
        ev["exit"] = n

READS = {"read", "readv", "recvfrom", "recvmsg"}
WRITES = {"write", "writev", "sendto", "sendmsg", "pwrite64", "pwritev", "pwritev2"}
SYNCS = {"fsync", "fdatasync"}
def payload(ev):
    m = STR.search(ev["text"])
    return m.group(1) if m else ""
is_sock = lambda t: t.startswith("TCP")
in_data = lambda t: t.startswith(data_dir.rstrip("/") + "/")

last_read = {}       # connection -> event
checked, failures = 0, []
file_writes = [e for e in events if e["name"] in WRITES and in_data(e["target"]) and e["exit"] is not None]
syncs = [e for e in events if e["name"] in SYNCS and in_data(e["target"]) and e["exit"] is not None]
for ev in events:
    if not is_sock(ev["target"]):
        continue
    if ev["name"] in READS and ev["exit"] is not None and payload(ev):
        last_read[ev["target"]] = ev
    elif ev["name"] in WRITES and payload(ev).startswith("250"):
        rd = last_read.get(ev["target"])
        if not rd or not payload(rd).endswith(r"\r\n.\r\n"):
            continue
        checked += 1
        ok = any(w["entry"] > rd["exit"] and s["target"] == w["target"]
                 and s["entry"] > w["exit"] and s["exit"] < ev["entry"]
                 for w in file_writes for s in syncs)
        if not ok:
            failures.append({"reply": payload(ev), "line": ev["entry"] + 1})
print(json.dumps({"checked": checked, "failures": failures,
                  "syncs": len(syncs), "sync_files": sorted({s["target"] for s in syncs})}))
assert checked == expected, f"found {checked} DATA replies, expected {expected}"
assert not failures, f"250 before fsync of the log: {failures}"
"#;

#[test]
fn every_250_to_data_follows_an_fsync_of_the_log() {
    let trace_dir = tempfile::tempdir().expect("tempdir");
    let trace = trace_dir.path().join("server.strace");
    let trace_s = trace.to_str().expect("utf-8 path").to_owned();
    let mut node = Node::start_wrapped(&[
        "strace",
        "-f",
        "-qq",
        "-yy",
        "-s",
        "65536",
        "-e",
        "trace=read,readv,recvfrom,recvmsg,write,writev,sendto,sendmsg,pwrite64,pwritev,pwritev2,fsync,fdatasync",
        "-o",
        &trace_s,
    ]);
    node.add_account(crate::harness::USER, PASSWORD);
    // Three sessions of one message, then one session of three.
    node.py(
        r#"
for i in range(3):
    s = smtp()
    assert s.sendmail("bob@example.org", [USER], message(f"single {i}")) == {}
    s.quit()
s = smtp()
for i in range(3):
    assert s.sendmail("bob@example.org", [USER], message(f"batch {i}")) == {}
s.quit()
assert len(inbox_messages()) == 6
"#,
        &[],
    );
    // SIGTERM the server; strace exits (and has flushed its output) once the server has.
    node.terminate();
    let data_dir = node.data_dir.to_str().expect("utf-8 path").to_owned();
    let report = crate::harness::python(
        &format!("{}\n{STRACE_CHECK}", crate::harness::PY_PRELUDE),
        &[
            "SMTP_PORT=0",
            "IMAP_PORT=0",
            "USER=-",
            "PASSWORD=-",
            &trace_s,
            &data_dir,
            "6",
        ],
    );
    eprintln!("strace check: {report}");
}

#[test]
fn sigterm_finishes_the_transaction_in_flight_then_exits() {
    let mut node = Node::with_account();
    let pid = node.server_pid().to_string();
    node.py(
        r#"
import os, signal
s = smtp()
assert s.mail("bob@example.org")[0] == 250
assert s.rcpt(USER)[0] == 250
code, _ = s.docmd("DATA")
assert code == 354, code
s.send(b"Subject: in flight\r\n\r\nstarted before SIGTERM\r\n")
os.kill(int(POS[0]), signal.SIGTERM)
s.send(b"finished after SIGTERM\r\n.\r\n")
code, text = s.getreply()
assert code == 250, (code, text)
"#,
        &[&pid],
    );
    let status = node.reap_killed();
    assert!(status.success(), "SIGTERM exit status {status}");
    node.spawn();
    let out = node.py(
        r#"
msgs = inbox_messages()
assert len(msgs) == 1, msgs
assert strip_trace_headers(msgs[0][2]) == b"Subject: in flight\r\n\r\nstarted before SIGTERM\r\nfinished after SIGTERM\r\n"
print("ok")
"#,
        &[],
    );
    assert_eq!(out.trim(), "ok");
}
