//! More IMAP extensions of issue 13 over real sockets (Python's imaplib): MULTIAPPEND
//! (RFC 3502), LIST-EXTENDED (RFC 5258) with LIST-STATUS (RFC 5819), OBJECTID (RFC 8474),
//! COMPRESS=DEFLATE (RFC 4978).

use crate::harness::{Node, PY_IMAP_RAW, USER};

/// `multiappend(c, mailbox, [(flags, date, bytes)], sync)` sends one APPEND of several
/// messages, with synchronizing literals (waiting for each `+`) or LITERAL+ ones.
const MULTIAPPEND_HELPER: &str = r#"
def multiappend(c, mailbox, messages, sync=True):
    tag = c._new_tag().decode()
    head = f"{tag} APPEND {mailbox}".encode()
    for i, (flags, date, body) in enumerate(messages):
        head += b" "
        if flags:
            head += f"({flags}) ".encode()
        if date:
            head += f'"{date}" '.encode()
        head += f"{{{len(body)}{'' if sync else '+'}}}\r\n".encode()
        c.send(head)
        if sync:
            line = c.readline()
            if not line.startswith(b"+"):
                # Refused before the literal: the tagged answer.
                rest = read_tagged(c, tag) if not line.decode().startswith(tag + " ") else (line.decode().strip(), [])
                return rest
        head = body
    c.send(head + b"\r\n")
    return read_tagged(c, tag)
"#;

const MULTIAPPEND: &str = r#"
c = imap()
status, lines = raw(c, "CAPABILITY")
assert " MULTIAPPEND" in lines[0], lines
ok(c.create("Outbox"), "CREATE")
watcher = imap()
ok(watcher.select("Outbox"), "SELECT")
big = message("big one", body=("z" * 99 + "\r\n") * 1500)  # over the 64 KiB spill threshold
batch = [
    ("\\Seen", "06-Dec-2026 10:00:00 +0100", message("first")),
    (None, None, big),
    ("\\Flagged $Work", None, message("third")),
]
status, lines = multiappend(c, "Outbox", batch, sync=True)
m = re.match(r"\S+ OK \[APPENDUID (\d+) 1:3\]", status)
assert m, (status, lines)
stored = inbox_messages(c, "Outbox")
assert [s[0] for s in stored] == [1, 2, 3], stored
assert [s[2] for s in stored] == [b[2] for b in batch], "bodies differ"
assert stored[0][1] == ["\\Seen"], stored[0][1]
assert sorted(stored[2][1]) == sorted(["\\Flagged", "$Work"]), stored[2][1]
data = ok(c.fetch("1", "(INTERNALDATE)"), "FETCH")
assert b'"06-Dec-2026 10:00:00 +0100"' in data[0], data
# Another session sees all three at once.
status, lines = raw(watcher, "NOOP")
assert [l for l in lines if l.endswith("EXISTS")] == ["* 3 EXISTS"], lines
# LITERAL+ and a quoted mailbox name, selected: EXISTS comes with the answer.
ok(c.select("Outbox"), "SELECT")
status, lines = multiappend(c, '"Outbox"', [(None, None, message("four")), (None, None, message("five"))], sync=False)
assert re.match(r"\S+ OK \[APPENDUID \d+ 4:5\]", status), (status, lines)
assert "* 5 EXISTS" in lines, lines
# All or nothing: a bad date in the second message appends nothing.
status, lines = multiappend(c, "Outbox", [(None, None, message("six")), (None, "not a date", message("seven"))], sync=False)
assert status.split()[1] == "BAD", status
# A missing mailbox: TRYCREATE.
status, lines = multiappend(c, "Nowhere", [(None, None, message("a")), (None, None, message("b"))], sync=False)
assert status.split()[1] == "NO" and "[TRYCREATE]" in status, status
assert len(inbox_messages(c, "Outbox")) == 5
print("multiappend ok")
"#;

/// The account may hold 4 messages: a MULTIAPPEND of 3 after 2 is refused whole (the quota
/// check covers the batch), one of 2 goes in.
const MULTIAPPEND_QUOTA: &str = r#"
c = imap()
for n in range(2):
    ok(c.append("INBOX", None, None, message(f"single {n}")), "APPEND")
status, lines = multiappend(c, "INBOX", [(None, None, message(f"batch {n}")) for n in range(3)], sync=False)
assert status.split()[1] == "NO" and "[OVERQUOTA]" in status, status
assert len(inbox_messages(c)) == 2
status, lines = multiappend(c, "INBOX", [(None, None, message(f"batch {n}")) for n in range(2)], sync=False)
assert re.match(r"\S+ OK \[APPENDUID \d+ 3:4\]", status), status
assert len(inbox_messages(c)) == 4
print("multiappend quota ok")
"#;

#[test]
fn multiappend_appends_every_message_at_once_or_none() {
    let node = Node::with_account();
    let out = node.py(
        &format!("{PY_IMAP_RAW}\n{MULTIAPPEND_HELPER}\n{MULTIAPPEND}"),
        &[],
    );
    assert!(out.contains("multiappend ok"), "{out}");
}

#[test]
fn multiappend_over_the_quota_appends_nothing() {
    let node = Node::with_account();
    node.cli_ok(&["user", "quota", USER, "1M", "--messages", "4"]);
    let out = node.py(
        &format!("{PY_IMAP_RAW}\n{MULTIAPPEND_HELPER}\n{MULTIAPPEND_QUOTA}"),
        &[],
    );
    assert!(out.contains("multiappend quota ok"), "{out}");
}

const LIST_EXTENDED: &str = r#"
c = imap()
status, lines = raw(c, "CAPABILITY")
assert " LIST-EXTENDED" in lines[0] and " LIST-STATUS" in lines[0], lines
for name in ["Work", "Work/Projects", "Work/Old", "Play"]:
    ok(c.create(name), "CREATE")
for name in ["Work/Projects", "Gone"]:
    ok(c.subscribe(name), "SUBSCRIBE")
ok(c.append("Work/Projects", "\\Seen", None, message("seen")), "APPEND")
ok(c.append("Work/Projects", None, None, message("unseen", body="more text\r\n")), "APPEND")
ok(c.select("Work/Projects"), "SELECT")
data = ok(c.fetch("1:*", "(RFC822.SIZE)"), "FETCH")
size = sum(int(re.search(rb"RFC822.SIZE (\d+)", d).group(1)) for d in data)
ok(c.unselect(), "UNSELECT")
def listing(command):
    status, lines = raw(c, command)
    assert status.split()[1] == "OK", (command, status)
    return lines
lines = listing('LIST (SUBSCRIBED) "" "Work*"')
assert lines == ['* LIST (\\HasNoChildren \\Subscribed) "/" "Work/Projects"'], lines
lines = listing('LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"')
assert '* LIST (\\HasChildren) "/" "Work" ("CHILDINFO" ("SUBSCRIBED"))' in lines, lines
assert '* LIST (\\NonExistent \\Subscribed) "/" "Gone"' in lines, lines
assert not any('"Play"' in l for l in lines), lines
lines = listing('LIST "" ("Work" "Play" "Nothing*") RETURN (SUBSCRIBED CHILDREN)')
assert lines == ['* LIST (\\HasNoChildren) "/" "Play"', '* LIST (\\HasChildren) "/" "Work"'], lines
lines = listing('LIST "" "Work/%" RETURN (SUBSCRIBED STATUS (MESSAGES UNSEEN SIZE))')
assert lines == [
    '* LIST (\\HasNoChildren) "/" "Work/Old"',
    '* STATUS "Work/Old" (MESSAGES 0 UNSEEN 0 SIZE 0)',
    '* LIST (\\HasNoChildren \\Subscribed) "/" "Work/Projects"',
    f'* STATUS "Work/Projects" (MESSAGES 2 UNSEEN 1 SIZE {size})',
], lines
# A mailbox that does not exist gets no STATUS.
lines = listing('LIST (SUBSCRIBED) "" "Gone" RETURN (STATUS (MESSAGES))')
assert lines == ['* LIST (\\NonExistent \\Subscribed) "/" "Gone"'], lines
lines = listing('LIST (SPECIAL-USE) "" "*"')
assert lines and all(re.search(r"\\(Sent|Drafts|Trash|Junk|Archive)", l) for l in lines), lines
assert not any('"Work' in l for l in lines), lines
for bad in ['LIST (RECURSIVEMATCH) "" "%"', 'LIST "" "%" RETURN (BOGUS)', 'LIST (NOPE) "" "%"']:
    status, lines = raw(c, bad)
    assert status.split()[1] == "BAD", (bad, status)
# The RFC 3501 LIST is unchanged.
data = ok(c.list('""', "Work/%"), "LIST")
assert data == [b'(\\HasNoChildren) "/" "Work/Old"', b'(\\HasNoChildren) "/" "Work/Projects"'], data
print("list extended ok")
"#;

#[test]
fn list_extended_selects_returns_and_reports_status() {
    let node = Node::with_account();
    let out = node.py(
        &format!("{PY_IMAP_RAW}\n{MULTIAPPEND_HELPER}\n{LIST_EXTENDED}"),
        &[],
    );
    assert!(out.contains("list extended ok"), "{out}");
}

const OBJECTID: &str = r#"
def ids(lines, item):
    return [re.search(item + r" \(([A-Za-z0-9_-]+)\)", l).group(1) for l in lines if " FETCH (" in l]
c = imap()
status, lines = raw(c, "CAPABILITY")
assert " OBJECTID" in lines[0], lines
status, lines = raw(c, "CREATE Box")
m = re.match(r"\S+ OK \[MAILBOXID \(([A-Za-z0-9_-]{1,255})\)\]", status)
assert m, status
box = m.group(1)
status, lines = raw(c, "SELECT Box")
assert f"* OK [MAILBOXID ({box})] Ok" in lines, (lines, box)
status, lines = raw(c, "STATUS Box (MAILBOXID)")
assert lines == [f'* STATUS "Box" (MAILBOXID ({box}))'], lines
status, lines = raw(c, "UNSELECT")
ok(c.rename("Box", "Box2"), "RENAME")
status, lines = raw(c, "STATUS Box2 (MESSAGES MAILBOXID)")
assert lines == [f'* STATUS "Box2" (MESSAGES 0 MAILBOXID ({box}))'], (lines, box)
status, lines = raw(c, 'LIST "" "Box2" RETURN (STATUS (MAILBOXID))')
assert lines[1] == f'* STATUS "Box2" (MAILBOXID ({box}))', lines
status, lines = raw(c, "STATUS INBOX (MAILBOXID)")
assert box not in lines[0], lines
ok(c.delete("Box2"), "DELETE")
status, lines = raw(c, "CREATE Box2")
assert box not in status, (status, box)
# Messages: a thread of two and an unrelated one.
root = message("root")
reply = message("reply").replace(b"Subject:", b"References: <root@example.org>\r\nIn-Reply-To: <root@example.org>\r\nSubject:")
other = message("other")
for m in (root, reply, other):
    ok(c.append("INBOX", None, None, m), "APPEND")
ok(c.select("INBOX"), "SELECT")
status, lines = raw(c, "FETCH 1:3 (EMAILID THREADID FLAGS)")
emails, threads = ids(lines, "EMAILID"), ids(lines, "THREADID")
assert len(set(emails)) == 3 and all(e[0] != "T" for e in emails), emails
assert threads[0] == threads[1] != threads[2], threads
status, lines = raw(c, "UID FETCH 3 EMAILID")
assert ids(lines, "EMAILID") == [emails[2]], lines
# A copy keeps its EMAILID.
ok(c.copy("1", "Box2"), "COPY")
ok(c.select("Box2"), "SELECT")
status, lines = raw(c, "FETCH 1 (EMAILID THREADID)")
assert ids(lines, "EMAILID") == [emails[0]] and ids(lines, "THREADID") == [threads[0]], lines
print("objectid ok")
"#;

#[test]
fn objectid_gives_stable_mailbox_email_and_thread_ids() {
    let node = Node::with_account();
    let out = node.py(
        &format!("{PY_IMAP_RAW}\n{MULTIAPPEND_HELPER}\n{OBJECTID}"),
        &[],
    );
    assert!(out.contains("objectid ok"), "{out}");
}

/// The ids are derived from replicated state: every node of a cluster gives the same ones.
const CLUSTER_OBJECTID: &str = r#"
def ids_on(node):
    c = imap(node)
    status, lines = raw(c, "STATUS INBOX (MESSAGES MAILBOXID)")
    if "MESSAGES 2 " not in lines[0]:
        c.logout()
        return None
    status, fetched = raw(c, "EXAMINE INBOX")
    status, fetched = raw(c, "UID FETCH 1:* (EMAILID THREADID)")
    c.logout()
    return lines[0], sorted(fetched)

c = imap("n1")
for subject in ("one", "two"):
    body = f"From: b@example.org\r\nSubject: {subject}\r\nMessage-ID: <{subject}@example.org>\r\n\r\nx\r\n"
    ok(c.append("INBOX", None, None, body.encode()), "APPEND")
c.logout()
reference = wait_until(lambda: ids_on("n1"), "the messages on n1")
assert "MAILBOXID (M" in reference[0] and all("EMAILID (E" in l and "THREADID (T" in l for l in reference[1]), reference
for n in sorted(NODES):
    assert wait_until(lambda: ids_on(n), f"the messages on {n}") == reference, (n, reference)
print("cluster objectid ok")
"#;

#[test]
fn objectids_are_the_same_on_every_replica() {
    let Some(cluster) = crate::cluster::Cluster::up(7, 3, None) else {
        return;
    };
    cluster.account();
    let out = cluster.py(&format!("{PY_IMAP_RAW}\n{CLUSTER_OBJECTID}"), &[]);
    assert!(out.contains("cluster objectid ok"), "{out}");
}

/// COMPRESS=DEFLATE driven with Python's zlib (raw deflate, wbits -15) over the socket
/// imaplib opened: refused before login, then every command and response deflated, on a
/// plaintext connection and inside implicit TLS.
const COMPRESS: &str = r#"
import zlib
pre = imaplib.IMAP4(HOST, IMAP_PORT, timeout=60)
status, lines = raw(pre, "COMPRESS DEFLATE")
assert status.split()[1] == "BAD", status
pre.logout()
c = imap()
status, lines = raw(c, "CAPABILITY")
assert " COMPRESS=DEFLATE" in lines[0], lines
big = message("big", body="compressible line of text\r\n" * 3000)
ok(c.append("INBOX", None, None, big), "APPEND")
status, lines = raw(c, "COMPRESS DEFLATE")
assert re.match(r"\S+ OK", status), status
sock = c.sock
comp = zlib.compressobj(6, zlib.DEFLATED, -15)
decomp = zlib.decompressobj(-15)
wire = [0]
plain = bytearray()
def send(data):
    sock.sendall(comp.compress(data) + comp.flush(zlib.Z_SYNC_FLUSH))
def fill():
    data = sock.recv(65536)
    assert data, "connection closed"
    wire[0] += len(data)
    plain.extend(decomp.decompress(data))
def readline():
    while b"\r\n" not in plain:
        fill()
    i = plain.index(b"\r\n") + 2
    line = bytes(plain[:i]); del plain[:i]
    return line
def read_exact(n):
    while len(plain) < n:
        fill()
    data = bytes(plain[:n]); del plain[:n]
    return data
def zraw(tag, command):
    """(tagged line, [(line, literal or None)])"""
    send(f"{tag} {command}\r\n".encode())
    out = []
    while True:
        line = readline()
        if line.startswith(f"{tag} ".encode()):
            return line.decode().strip(), out
        m = re.search(rb"\{(\d+)\}\r\n$", line)
        literal = read_exact(int(m.group(1))) if m else None
        if literal is not None:
            line = line + literal + readline()
        out.append((line, literal))
status, out = zraw("z1", "CAPABILITY")
assert "OK" in status and b"IMAP4rev1" in out[0][0] and b"COMPRESS=DEFLATE" not in out[0][0], out
status, out = zraw("z2", "COMPRESS DEFLATE")
assert status.startswith("z2 NO [COMPRESSIONACTIVE]"), status
status, out = zraw("z3", "SELECT INBOX")
assert "OK [READ-WRITE]" in status, status
before = wire[0]
status, out = zraw("z4", "FETCH 1 (BODY.PEEK[])")
assert "OK" in status, status
assert out[0][1] == big, "FETCH through deflate differs"
# The response went compressed: far fewer bytes on the wire than in the message.
assert wire[0] - before < len(big) // 10, (wire[0] - before, len(big))
small = message("after compress")
send(f"z5 APPEND INBOX (\\Seen) {{{len(small)}+}}\r\n".encode() + small + b"\r\n")
while True:
    line = readline()
    if line.startswith(b"z5 "):
        break
assert b"OK [APPENDUID" in line, line
status, out = zraw("z6", "FETCH 2 (FLAGS BODY.PEEK[])")
assert out[-1][1] == small and b"\\Seen" in out[-1][0], out
status, out = zraw("z7", "LOGOUT")
assert out[0][0].startswith(b"* BYE") and "OK" in status, (out, status)
# The same over implicit TLS: deflate inside TLS.
import ssl
tls = ssl.create_default_context(); tls.check_hostname = False; tls.verify_mode = ssl.CERT_NONE
t = imaplib.IMAP4_SSL(HOST, int(ENV["IMAPS_PORT"]), ssl_context=tls, timeout=60)
t.login(USER, PASSWORD)
status, lines = raw(t, "COMPRESS DEFLATE")
assert re.match(r"\S+ OK", status), status
sock = t.sock
comp = zlib.compressobj(6, zlib.DEFLATED, -15)
decomp = zlib.decompressobj(-15)
plain.clear()
status, out = zraw("t1", "SELECT INBOX")
assert "OK [READ-WRITE]" in status, status
status, out = zraw("t2", "FETCH 1 (BODY.PEEK[])")
assert out[0][1] == big, "FETCH through deflate over TLS differs"
status, out = zraw("t3", "LOGOUT")
assert "OK" in status, status
print("compress ok")
"#;

#[test]
fn compress_deflate_carries_commands_and_responses() {
    let node = Node::with_account();
    let out = node.py(
        &format!("{PY_IMAP_RAW}\n{MULTIAPPEND_HELPER}\n{COMPRESS}"),
        &[],
    );
    assert!(out.contains("compress ok"), "{out}");
}
