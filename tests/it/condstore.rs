//! CONDSTORE and QRESYNC (RFC 7162, issue 13 point 2) over real sockets: Python's imaplib
//! with raw commands for the protocol details, Python's `imapclient` (PyPI) for interop, and
//! a QRESYNC resync that fails over from one cluster node to another with the modseq the
//! client had from the first (modseqs are the same on every replica).

use crate::harness::Node;

/// `raw(c, "FETCH 1:* (FLAGS) (CHANGEDSINCE 5)")`: (status line, untagged lines) of one
/// command, read off the socket as it is (imaplib does not know VANISHED or MODIFIED).
const PRELUDE: &str = r#"
def raw(c, command):
    tag = c._new_tag().decode()
    c.send(f"{tag} {command}\r\n".encode())
    lines = []
    while True:
        line = c.readline().decode()
        if line.startswith(tag + " "):
            if command.split()[0].upper() in ("SELECT", "EXAMINE") and " OK " in line:
                c.state = "SELECTED"
            return line.strip(), lines
        lines.append(line.strip())

def modseq_of(line):
    return int(re.search(r"MODSEQ \(?(\d+)", line).group(1))

def fetch_uids(lines):
    return sorted(int(re.search(r"UID (\d+)", l).group(1)) for l in lines if " FETCH (" in l)
"#;

const BASICS: &str = r#"
c = imap()
for n in range(4):
    ok(c.append("INBOX", None, None, message(f"m{n}")), "APPEND")
status, lines = raw(c, "CAPABILITY")
assert "CONDSTORE" in lines[0] and "QRESYNC" in lines[0], lines
status, lines = raw(c, "SELECT INBOX (CONDSTORE)")
assert "OK [READ-WRITE]" in status, status
start = modseq_of([l for l in lines if "HIGHESTMODSEQ" in l][0])
status, lines = raw(c, "STATUS INBOX (HIGHESTMODSEQ)")
assert modseq_of(lines[0].replace("HIGHESTMODSEQ ", "MODSEQ (")) == start, (lines, start)

# A flag change: HIGHESTMODSEQ grows and the STORE answer carries the new modseq.
status, lines = raw(c, "STORE 2 +FLAGS (\\Flagged)")
assert status.endswith("OK STORE completed"), status
m2 = modseq_of(lines[0])
assert m2 > start, (m2, start)
status, lines = raw(c, "STATUS INBOX (HIGHESTMODSEQ)")
assert f"HIGHESTMODSEQ {m2}" in lines[0], lines

# CHANGEDSINCE returns only what changed after it.
status, lines = raw(c, f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {start})")
assert fetch_uids(lines) == [2], lines
assert modseq_of(lines[0]) == m2, lines
status, lines = raw(c, f"FETCH 1:* (FLAGS) (CHANGEDSINCE {m2})")
assert fetch_uids(lines) == [] and " FETCH (" not in "".join(lines), lines
status, lines = raw(c, "FETCH 1:4 (MODSEQ)")
assert len(lines) == 4 and max(modseq_of(l) for l in lines) == m2, lines

# UNCHANGEDSINCE: a message changed after it is left alone and named in MODIFIED.
other = imap()
ok(other.select("INBOX"), "SELECT")
ok(other.store("3", "+FLAGS", "(\\Answered)"), "STORE by another session")
other.logout()
status, lines = raw(c, f"STORE 1,3 (UNCHANGEDSINCE {m2}) +FLAGS.SILENT (\\Seen)")
assert "OK [MODIFIED 3]" in status, (status, lines)
assert any(l.startswith("* 1 FETCH (MODSEQ (") for l in lines), lines
data = ok(c.fetch("3", "(FLAGS)"), "FETCH")
assert b"\\Seen" not in data[0], data

# SEARCH MODSEQ: the messages changed at or after it, and the highest modseq found.
status, lines = raw(c, f"SEARCH MODSEQ {m2 + 1}")
found = [l for l in lines if l.startswith("* SEARCH")][0]
assert re.match(r"\* SEARCH 1 3 \(MODSEQ \d+\)$", found), found

# QRESYNC: the old modseq gives VANISHED (EARLIER) for the expunged message and a FETCH
# for each message changed since, nothing else.
ok(c.store("4", "+FLAGS", "(\\Deleted)"), "STORE")
ok(c.expunge(), "EXPUNGE")
status, lines = raw(c, "STATUS INBOX (UIDVALIDITY HIGHESTMODSEQ)")
uidvalidity = int(re.search(r"UIDVALIDITY (\d+)", lines[0]).group(1))
q = imap()
status, lines = raw(q, f"SELECT INBOX (QRESYNC ({uidvalidity} {m2}))")
assert status.split()[1] == "BAD", status
assert raw(q, "ENABLE QRESYNC")[1] == ["* ENABLED QRESYNC"]
status, lines = raw(q, f"SELECT INBOX (QRESYNC ({uidvalidity} {m2} 1:4))")
assert "OK [READ-WRITE]" in status, status
assert "* VANISHED (EARLIER) 4" in lines, lines
assert fetch_uids(lines) == [1, 3], lines
# An expunge seen by a QRESYNC session is VANISHED, not EXPUNGE.
ok(c.store("1", "+FLAGS", "(\\Deleted)"), "STORE")
ok(c.expunge(), "EXPUNGE")
status, lines = raw(q, "NOOP")
assert lines == ["* VANISHED 1"], lines
print("condstore basics ok")
"#;

#[test]
fn condstore_and_qresync_basics_with_imaplib() {
    let node = Node::with_account();
    let out = node.py(&format!("{PRELUDE}\n{BASICS}"), &[]);
    assert!(out.contains("condstore basics ok"), "{out}");
}

/// The same through `imapclient`, a real client library that knows CONDSTORE: its
/// `select_folder`, `fetch(..., modifiers=["CHANGEDSINCE n"])` and MODSEQ parsing.
const IMAPCLIENT: &str = r#"
import imapclient
c = imap()
for n in range(3):
    ok(c.append("INBOX", None, None, message(f"ic{n}")), "APPEND")
c.logout()
client = imapclient.IMAPClient(HOST, port=IMAP_PORT, ssl=False, timeout=60)
client.login(USER, PASSWORD)
assert client.has_capability("CONDSTORE"), client.capabilities()
assert b"CONDSTORE" in client.enable("CONDSTORE")
info = client.select_folder("INBOX")
start = info[b"HIGHESTMODSEQ"]
assert start >= 1, info
client.add_flags([2], [b"\\Flagged"])
changed = client.fetch([1, 2, 3], ["FLAGS"], modifiers=[f"CHANGEDSINCE {start}"])
assert list(changed) == [2], changed
assert changed[2][b"MODSEQ"][0] > start, changed
assert b"\\Flagged" in changed[2][b"FLAGS"], changed
full = client.fetch([1, 2, 3], ["MODSEQ"])
assert sorted(full) == [1, 2, 3] and all(v[b"MODSEQ"][0] >= 1 for v in full.values()), full
status = client.folder_status("INBOX", ["HIGHESTMODSEQ"])
assert status[b"HIGHESTMODSEQ"] == changed[2][b"MODSEQ"][0], status
client.logout()
print("imapclient ok")
"#;

#[test]
fn imapclient_condstore_interop() {
    let node = Node::with_account();
    let out = node.py(IMAPCLIENT, &[]);
    assert!(out.contains("imapclient ok"), "{out}");
}

/// A client synced on n1 (its UIDVALIDITY and HIGHESTMODSEQ kept), then changes made on n1
/// (a flag, an expunge, a new message), n1 killed, and the client resyncs with QRESYNC on n2
/// with the modseq it had from n1: exactly the expunged UID as VANISHED (EARLIER), a FETCH
/// for the changed and the new message only; and every replica reports the same modseqs.
const CLUSTER_QRESYNC: &str = r#"
def raw(c, command):
    tag = c._new_tag().decode()
    c.send(f"{tag} {command}\r\n".encode())
    lines = []
    while True:
        line = c.readline().decode()
        if line.startswith(tag + " "):
            if command.split()[0].upper() in ("SELECT", "EXAMINE") and " OK " in line:
                c.state = "SELECTED"
            return line.strip(), lines
        lines.append(line.strip())

def fetch_uids(lines):
    return sorted(int(re.search(r"UID (\d+)", l).group(1)) for l in lines if " FETCH (" in l)

def modseqs(node):
    c = imap(node)
    status, lines = raw(c, "EXAMINE INBOX (CONDSTORE)")
    highest = int(re.search(r"HIGHESTMODSEQ (\d+)", " ".join(lines)).group(1))
    status, lines = raw(c, "UID FETCH 1:* (MODSEQ)")
    c.logout()
    per = sorted((int(re.search(r"UID (\d+)", l).group(1)), int(re.search(r"MODSEQ \((\d+)", l).group(1)))
                 for l in lines if " FETCH (" in l)
    return highest, per

names = sorted(NODES)
c = imap("n1")
for n in range(5):
    ok(c.append("INBOX", None, None, message(f"q{n}")), "APPEND")
status, lines = raw(c, "SELECT INBOX (CONDSTORE)")
uidvalidity = int(re.search(r"UIDVALIDITY (\d+)", " ".join(lines)).group(1))
known = int(re.search(r"HIGHESTMODSEQ (\d+)", " ".join(lines)).group(1))
# Changes on n1 after the client's last sync.
ok(c.store("2", "+FLAGS", "(\\Flagged)"), "STORE")
ok(c.store("4", "+FLAGS", "(\\Deleted)"), "STORE")
ok(c.expunge(), "EXPUNGE")
ok(c.append("INBOX", None, None, message("q-new")), "APPEND")
c.logout()
reference = modseqs("n1")
assert reference[0] > known, (reference, known)
for n in names:
    wait_until(lambda: modseqs(n) == reference, f"the same modseqs on {n} as on n1")
local_cluster("kill", "n1")
q = wait_until(lambda: imap("n2"), "login on n2 after the kill")
assert raw(q, "ENABLE QRESYNC")[1] == ["* ENABLED QRESYNC"]
status, lines = raw(q, f"SELECT INBOX (QRESYNC ({uidvalidity} {known} 1:5))")
assert "OK [READ-WRITE]" in status, (status, lines)
assert f"* OK [HIGHESTMODSEQ {reference[0]}] highest modseq" in lines, (lines, reference)
vanished = [l for l in lines if "VANISHED" in l]
assert vanished == ["* VANISHED (EARLIER) 4"], lines
# The flag change of 2; the new message 6 is outside the known UIDs 1:5.
assert fetch_uids(lines) == [2], lines
status, lines = raw(q, f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {known} VANISHED)")
assert [l for l in lines if "VANISHED" in l] == ["* VANISHED (EARLIER) 4"], lines
assert fetch_uids(lines) == [2, 6], lines
q.logout()
print("cluster qresync ok")
"#;

#[test]
fn qresync_after_failover_to_another_node_gets_the_minimal_delta() {
    let Some(cluster) = crate::cluster::Cluster::up(6, 3, None) else {
        return;
    };
    cluster.account();
    let out = cluster.py(CLUSTER_QRESYNC, &[]);
    assert!(out.contains("cluster qresync ok"), "{out}");
}
