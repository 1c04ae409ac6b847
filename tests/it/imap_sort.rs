//! SORT (RFC 5256, RFC 5957 SORT=DISPLAY) and THREAD (RFC 5256 ORDEREDSUBJECT, REFERENCES)
//! over real sockets: Python's imaplib for the protocol, Python's `imapclient` (PyPI) for
//! interop (its `sort` and `thread`, which check the capabilities and parse the answers).

use crate::harness::Node;

/// Four messages whose every sort key gives a different order, loaded after one message that
/// is expunged (so UIDs are sequence numbers + 1).
const SORT_PRELUDE: &str = r#"
def msg(headers, body_len):
    body = ("x" * 70 + "\r\n") * (body_len // 72)
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode()

MESSAGES = [
    (["From: \"Zed\" <alice@x.test>", "To: bob@x.test", "Cc: zz@x.test",
      "Subject: Re: Banana", "Date: Tue, 2 Jan 2024 10:00:00 +0000"], 1000, "05-Jan-2024"),
    (["From: Bob Builder <bob@x.test>", "To: \"Alpha\" <zed@x.test>",
      "Subject: apple", "Date: Mon, 1 Jan 2024 09:00:00 -0500"], 3000, "03-Jan-2024"),
    (["From: carol@x.test", "To: =?utf-8?q?=C3=89mile?= <emile@x.test>", "Cc: aa@x.test",
      "Subject: [list] Fwd: Cherry"], 10, "01-Jan-2024"),
    (["From: =?utf-8?q?=C3=81lvaro?= <dave@x.test>", "To: carl@x.test",
      "Subject: =?utf-8?q?=C3=84pfel?=", "Date: Wed, 3 Jan 2024 08:00:00 +0000"], 2000, "04-Jan-2024"),
]

def load(c):
    ok(c.append("INBOX", None, None, msg(["Subject: gone"], 10)), "APPEND")
    ok(c.select("INBOX"), "SELECT")
    ok(c.store("1", "+FLAGS", "(\\Deleted)"), "STORE")
    ok(c.expunge(), "EXPUNGE")
    for headers, size, day in MESSAGES:
        ok(c.append("INBOX", None, f'"{day} 00:00:00 +0000"', msg(headers, size)), "APPEND")
    ok(c.select("INBOX"), "SELECT")

def sort(c, criteria, search="ALL", uid=False, charset="UTF-8"):
    status, lines = raw(c, f"{'UID ' if uid else ''}SORT ({criteria}) {charset} {search}")
    assert status.split()[1] == "OK", (criteria, status, lines)
    found = [l for l in lines if l.startswith("* SORT")]
    assert len(found) == 1, lines
    return [int(n) for n in found[0].split()[2:]]
"#;

const SORT_KEYS: &str = r#"
c = imap()
status, lines = raw(c, "CAPABILITY")
for cap in ("SORT", "SORT=DISPLAY", "THREAD=ORDEREDSUBJECT", "THREAD=REFERENCES"):
    assert f" {cap} " in lines[0] + " ", (cap, lines)
status, _ = raw(c, "SORT (DATE) UTF-8 ALL")
assert status.split()[1] == "BAD", status
load(c)
# Every order below is also what Dovecot 2.3.19 answers for these messages.
expected = {
    # Base subjects apple, banana, cherry, "äpfel" (NFKD: "a" + U+0308, just after "apple").
    "SUBJECT": [2, 4, 1, 3],
    # Sent dates (the Date field in UTC; without one, INTERNALDATE).
    "DATE": [3, 2, 1, 4],
    "REVERSE DATE": [4, 1, 2, 3],
    "ARRIVAL": [3, 2, 4, 1],
    "SIZE": [3, 1, 4, 2],
    "REVERSE FROM": [4, 3, 2, 1],
    "TO": [1, 4, 3, 2],
    # No Cc sorts as the empty string; ties keep mailbox order or go to the next key.
    "CC": [2, 4, 3, 1],
    "CC REVERSE SUBJECT": [4, 2, 3, 1],
    # RFC 5957: display names (decoded, case-mapped), else the address ("Álvaro" first).
    "DISPLAYFROM": [4, 2, 3, 1],
    "DISPLAYTO": [2, 1, 4, 3],
}
for criteria, order in expected.items():
    got = sort(c, criteria)
    assert got == order, (criteria, got, order)
assert sort(c, "SUBJECT", uid=True) == [3, 5, 2, 4]
assert sort(c, "date", search="OR FROM alice FROM dave") == [1, 4]
assert sort(c, "SUBJECT", search="UID 3:5 SMALLER 2500", uid=True) == [5, 4]
assert sort(c, "SIZE", charset="US-ASCII") == [3, 1, 4, 2]
assert sort(c, "SIZE", charset='"utf-8"') == [3, 1, 4, 2]
# imaplib's own sort().
typ, data = c.sort("(REVERSE ARRIVAL)", "UTF-8", "ALL")
assert typ == "OK" and data[0].split() == [b"1", b"4", b"2", b"3"], (typ, data)
status, lines = raw(c, "SORT (DATE) ISO-8859-1 ALL")
assert "NO [BADCHARSET" in status, status
for bad in ["SORT DATE UTF-8 ALL", "SORT (DATE) UTF-8", "SORT (NAME) UTF-8 ALL",
            "SORT (DATE REVERSE) UTF-8 ALL", "SORT () UTF-8 ALL"]:
    status, lines = raw(c, bad)
    assert status.split()[1] == "BAD", (bad, status)
# Still usable after the errors.
assert sort(c, "SUBJECT") == [2, 4, 1, 3]
# A MODSEQ key (RFC 7162 3.1.5) ends the answer with the highest modseq of the matches.
status, lines = raw(c, "SORT (DATE) UTF-8 MODSEQ 1")
found = [l for l in lines if l.startswith("* SORT")]
assert len(found) == 1 and re.match(r"\* SORT 3 2 1 4 \(MODSEQ \d+\)$", found[0]), lines
print("sort keys ok")
"#;

#[test]
fn sort_by_every_key_with_imaplib() {
    let node = Node::with_account();
    let out = node.py(
        &format!(
            "{}\n{SORT_PRELUDE}\n{SORT_KEYS}",
            crate::harness::PY_IMAP_RAW
        ),
        &[],
    );
    assert!(out.contains("sort keys ok"), "{out}");
}

/// Ten messages with replies, a missing parent, a References cycle, a duplicate Message-ID
/// and a reply without references.
const THREAD_PRELUDE: &str = r#"
def tmsg(n, extra, subject, hhmm):
    headers = [f"From: t{n}@x.test", f"Subject: {subject}",
               f"Date: Mon, 1 Jan 2024 {hhmm}:00 +0000"] + extra
    return ("\r\n".join(headers) + "\r\n\r\nbody\r\n").encode()

THREADED = [
    (["Message-ID: <a@x>"], "Plan", "10:00"),
    (["Message-ID: <b@x>", "References: <a@x>"], "Re: Plan", "11:00"),
    (["Message-ID: <c@x>", "In-Reply-To: <b@x>"], "Re: Plan", "12:00"),
    (["Message-ID: <d@x>", "References: <a@x>"], "Re: Plan", "10:30"),
    (["Message-ID: <e@x>", "References: <missing@x>"], "Re: Lost", "09:00"),
    (["Message-ID: <f@x>", "References: <missing@x>"], "Re: Lost", "09:30"),
    (["Message-ID: <g@x>", "References: <h@x>"], "Loop", "13:00"),
    (["Message-ID: <h@x>", "References: <g@x>"], "Loop", "14:00"),
    (["Message-ID: <a@x>"], "Plan", "15:00"),
    ([], "Re: Plan", "16:00"),
]

def load_threads(c):
    for n, (extra, subject, hhmm) in enumerate(THREADED, 1):
        ok(c.append("INBOX", None, None, tmsg(n, extra, subject, hhmm)), "APPEND")
    ok(c.select("INBOX"), "SELECT")

def thread(c, algorithm, search="ALL", uid=False):
    tag = c._new_tag().decode()
    c.send(f"{tag} {'UID ' if uid else ''}THREAD {algorithm} UTF-8 {search}\r\n".encode())
    lines = []
    while True:
        line = c.readline().decode().strip()
        if line.startswith(tag + " "):
            assert line.split()[1] == "OK", (algorithm, line, lines)
            found = [l for l in lines if l.startswith("* THREAD")]
            assert len(found) == 1, lines
            return found[0][len("* THREAD"):].strip()
        lines.append(line)
"#;

const THREADS: &str = r#"
c = imap()
load_threads(c)
# Dovecot 2.3.19 gives the same three answers for these messages.
# REFERENCES: the dummy parent of 5 and 6 stays (two children at the root); the duplicate
# <a@x> (9) and the reply without references (10) join 1 by subject under a dummy; the
# References cycle between 7 and 8 is broken (8 keeps 7, 7's link back is refused).
assert thread(c, "REFERENCES") == "((5)(6))((1 (4)(2 3))(9)(10))(8 7)", thread(c, "REFERENCES")
assert thread(c, "ORDEREDSUBJECT") == "(5 6)(1 (4)(2)(3)(9)(10))(7 8)", thread(c, "ORDEREDSUBJECT")
assert thread(c, "references", search="SUBJECT loop", uid=True) == "(8 7)"
assert thread(c, "REFERENCES", search="1:3") == "(1 2 3)"
assert thread(c, "REFERENCES", search="SUBJECT nothing-matches") == ""
typ, data = c.thread("ORDEREDSUBJECT", "UTF-8", "SUBJECT lost")
assert typ == "OK" and data[0] == b"(5 6)", (typ, data)
tag = c._new_tag().decode()
c.send(f"{tag} THREAD X-UNKNOWN UTF-8 ALL\r\n".encode())
line = c.readline().decode()
assert line.startswith(f"{tag} BAD"), line
tag = c._new_tag().decode()
c.send(f"{tag} THREAD REFERENCES KOI8-R ALL\r\n".encode())
line = c.readline().decode()
assert line.startswith(f"{tag} NO [BADCHARSET"), line
print("threads ok")
"#;

#[test]
fn thread_references_and_orderedsubject_with_imaplib() {
    let node = Node::with_account();
    let out = node.py(&format!("{THREAD_PRELUDE}\n{THREADS}"), &[]);
    assert!(out.contains("threads ok"), "{out}");
}

/// `imapclient` decides from CAPABILITY whether it may SORT or THREAD, sends UID SORT / UID
/// THREAD and parses the answers itself.
const IMAPCLIENT: &str = r#"
import imapclient
c = imap()
load_threads(c)
c.logout()
client = imapclient.IMAPClient(HOST, port=IMAP_PORT, ssl=False, timeout=60)
client.login(USER, PASSWORD)
client.select_folder("INBOX")
assert client.sort(["DATE"]) == [5, 6, 1, 4, 2, 3, 7, 8, 9, 10], client.sort(["DATE"])
assert client.sort(["REVERSE DATE"], ["FROM", "t1"]) == [10, 1], client.sort(["REVERSE DATE"], ["FROM", "t1"])
assert client.sort(["SUBJECT", "REVERSE DATE"])[:2] == [8, 7]
threads = client.thread("REFERENCES")
assert threads == (((5,), (6,)), ((1, (4,), (2, 3)), (9,), (10,)), (8, 7)), threads
threads = client.thread("ORDEREDSUBJECT", ["SUBJECT", "plan"])
assert threads == ((1, (4,), (2,), (3,), (9,), (10,)),), threads
client.logout()
print("imapclient ok")
"#;

#[test]
fn imapclient_sorts_and_threads() {
    let node = Node::with_account();
    let out = node.py(&format!("{THREAD_PRELUDE}\n{IMAPCLIENT}"), &[]);
    assert!(out.contains("imapclient ok"), "{out}");
}
