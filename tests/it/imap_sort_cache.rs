//! The cache of recent SORT/THREAD answers (src/imap/order_cache.rs): a repeated SORT or
//! THREAD gives the same answer, in the same and in another session, and every change to the
//! mailbox (APPEND, STORE, EXPUNGE) gives the new answer, not the remembered one.

use crate::harness::Node;

const SCRIPT: &str = r#"
def msg(subject):
    return f"From: a@x.test\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()

def answer(c, command, verb):
    status, lines = raw(c, command)
    assert status.split()[1] == "OK", (command, status, lines)
    found = [l for l in lines if l.startswith(f"* {verb}")]
    assert len(found) == 1, (command, lines)
    return found[0]

def sort(c, criteria, search="ALL", uid=False):
    line = answer(c, f"{'UID ' if uid else ''}SORT ({criteria}) UTF-8 {search}", "SORT")
    return [int(n) for n in line.split()[2:]]

def thread(c, uid=False):
    return answer(c, f"{'UID ' if uid else ''}THREAD ORDEREDSUBJECT UTF-8 ALL", "THREAD")

c = imap()
for subject in ["b", "c", "a", "Re: b"]:
    ok(c.append("INBOX", None, None, msg(subject)), "APPEND")
ok(c.select("INBOX"), "SELECT")
assert sort(c, "SUBJECT") == [3, 1, 4, 2]
assert sort(c, "SUBJECT") == [3, 1, 4, 2]
assert sort(c, "SUBJECT", uid=True) == [3, 1, 4, 2]
assert thread(c) == "* THREAD (1 4)(2)(3)", thread(c)
assert thread(c) == "* THREAD (1 4)(2)(3)"
# Another session over the same mailbox gets the same answers.
d = imap()
ok(d.select("INBOX"), "SELECT")
assert sort(d, "SUBJECT") == [3, 1, 4, 2]
assert thread(d) == "* THREAD (1 4)(2)(3)"
# STORE: a flag search changes.
assert sort(c, "SUBJECT", search="FLAGGED") == []
ok(c.store("1", "+FLAGS", "(\\Flagged)"), "STORE")
assert sort(c, "SUBJECT", search="FLAGGED") == [1]
ok(c.store("3", "+FLAGS", "(\\Flagged)"), "STORE")
assert sort(c, "SUBJECT", search="FLAGGED") == [3, 1]
ok(c.store("3", "-FLAGS", "(\\Flagged)"), "STORE")
assert sort(c, "SUBJECT", search="FLAGGED") == [1]
# APPEND: the new message is ordered in.
ok(c.append("INBOX", None, None, msg("aa")), "APPEND")
ok(c.noop(), "NOOP")
assert sort(c, "SUBJECT") == [3, 5, 1, 4, 2]
assert thread(c) == "* THREAD (1 4)(2)(3)(5)", thread(c)
# EXPUNGE: sequence numbers shift, UIDs do not.
ok(c.store("3", "+FLAGS", "(\\Deleted)"), "STORE")
ok(c.expunge(), "EXPUNGE")
assert sort(c, "SUBJECT") == [4, 1, 3, 2], sort(c, "SUBJECT")
assert sort(c, "SUBJECT", uid=True) == [5, 1, 4, 2]
assert thread(c) == "* THREAD (1 3)(2)(4)", thread(c)
assert thread(c, uid=True) == "* THREAD (1 4)(2)(5)", thread(c, uid=True)
# The other session, once it has seen the expunge, too.
ok(d.noop(), "NOOP")
assert sort(d, "SUBJECT") == [4, 1, 3, 2], sort(d, "SUBJECT")
print("sort cache ok")
"#;

#[test]
fn repeated_sort_and_thread_answers_follow_every_change() {
    let node = Node::with_account();
    let out = node.py(&format!("{}\n{SCRIPT}", crate::harness::PY_IMAP_RAW), &[]);
    assert!(out.contains("sort cache ok"), "{out}");
}
