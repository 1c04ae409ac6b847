//! The SORT/THREAD keys cached per message body (src/imap/sort_keys.rs): two messages with
//! the same body share keys but not INTERNALDATE or size-independent order; keys a first
//! ordering did not need are parsed when a later one does; and the first answer after a
//! change (which the answer cache cannot give) is right, in the same and another mailbox.

use crate::harness::Node;

const SCRIPT: &str = r#"
def msg(subject, sender, extra=""):
    return f"From: {sender}\r\nSubject: {subject}\r\n{extra}\r\nbody\r\n".encode()

def answer(c, command, verb):
    status, lines = raw(c, command)
    assert status.split()[1] == "OK", (command, status, lines)
    found = [l for l in lines if l.startswith(f"* {verb}")]
    assert len(found) == 1, (command, lines)
    return found[0]

def sort(c, criteria, uid=False):
    line = answer(c, f"{'UID ' if uid else ''}SORT ({criteria}) UTF-8 ALL", "SORT")
    return [int(n) for n in line.split()[2:]]

def thread(c, algorithm):
    return answer(c, f"THREAD {algorithm} UTF-8 ALL", "THREAD")

c = imap()
same = msg("same", "m@x.test")  # no Date: its sent date is each copy's INTERNALDATE
ok(c.append("INBOX", None, '"03-Jan-2020 00:00:00 +0000"', same), "APPEND")
ok(c.append("INBOX", None, '"01-Jan-2020 00:00:00 +0000"',
            msg("b", "z@x.test", "Date: Thu, 2 Jan 2020 00:00:00 +0000\r\nMessage-ID: <b@x>\r\n")), "APPEND")
ok(c.append("INBOX", None, '"02-Jan-2020 00:00:00 +0000"', same), "APPEND")
ok(c.append("INBOX", None, '"04-Jan-2020 00:00:00 +0000"',
            msg("Re: b", "a@x.test", "In-Reply-To: <b@x>\r\n")), "APPEND")
ok(c.select("INBOX"), "SELECT")
# SUBJECT first: only the subject keys are parsed.
assert sort(c, "SUBJECT") == [2, 4, 1, 3], sort(c, "SUBJECT")
# The two copies of one body order by their own INTERNALDATE (2 Jan 00:00 ties with the Date
# of message 2: mailbox order).
assert sort(c, "DATE") == [2, 3, 1, 4], sort(c, "DATE")
assert sort(c, "REVERSE ARRIVAL") == [4, 1, 3, 2], sort(c, "REVERSE ARRIVAL")
# Keys the first orderings did not need.
assert sort(c, "FROM") == [4, 1, 3, 2], sort(c, "FROM")
assert thread(c, "REFERENCES") == "* THREAD (2 4)((3)(1))", thread(c, "REFERENCES")
# Cold: a flag change defeats the answer cache; the keys answer the same.
ok(c.store("1", "+FLAGS", "(\\Flagged)"), "STORE")
assert sort(c, "DATE") == [2, 3, 1, 4]
assert thread(c, "ORDEREDSUBJECT") == "* THREAD (2 4)(3 1)", thread(c, "ORDEREDSUBJECT")
# New mail with the body of messages 1 and 3, in another mailbox, copied back: each message
# keeps its own date.
ok(c.create("Other"), "CREATE")
ok(c.append("Other", None, '"01-Jan-2019 00:00:00 +0000"', same), "APPEND")
ok(c.copy("1:2", "Other"), "COPY")
ok(c.select("Other"), "SELECT")
assert sort(c, "DATE") == [1, 3, 2], sort(c, "DATE")
assert sort(c, "SUBJECT") == [3, 1, 2], sort(c, "SUBJECT")
ok(c.copy("1", "INBOX"), "COPY")
ok(c.select("INBOX"), "SELECT")
assert sort(c, "DATE") == [5, 2, 3, 1, 4], sort(c, "DATE")
assert sort(c, "DATE", uid=True) == [5, 2, 3, 1, 4]
print("sort keys ok")
"#;

#[test]
fn cached_keys_give_each_message_its_own_dates_and_fill_lazily() {
    let node = Node::with_account();
    let out = node.py(&format!("{}\n{SCRIPT}", crate::harness::PY_IMAP_RAW), &[]);
    assert!(out.contains("sort keys ok"), "{out}");
}
