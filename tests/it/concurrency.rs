//! 1,000 messages over 20 concurrent SMTP sessions: every one stored exactly once, UIDs unique
//! and dense (1..=1000 in a fresh INBOX).

use crate::harness::Node;

#[test]
fn thousand_messages_over_twenty_sessions_stored_once_with_dense_uids() {
    let node = Node::with_account();
    let out = node.py(
        r#"
import threading
SESSIONS, PER = 20, 50
errors = []
def worker(w):
    try:
        s = smtp()
        for j in range(PER):
            n = w * PER + j
            refused = s.sendmail("bob@example.org", [USER], message(f"parallel {n}"))
            assert refused == {}, refused
        s.quit()
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=worker, args=(w,)) for w in range(SESSIONS)]
for t in threads: t.start()
for t in threads: t.join(timeout=600)
assert not any(t.is_alive() for t in threads), "a session hung"
assert not errors, errors
c = imap()
ok(c.select("INBOX"))
data = ok(c.uid("FETCH", "1:*", "(UID BODY.PEEK[HEADER.FIELDS (Subject)])"))
seen = {}
for item in data:
    if isinstance(item, tuple):
        uid = int(re.search(rb"UID (\d+)", item[0]).group(1))
        n = int(re.search(rb"parallel (\d+)", item[1]).group(1))
        seen.setdefault(n, []).append(uid)
dupes = {n: u for n, u in seen.items() if len(u) != 1}
assert not dupes, f"stored more than once: {dupes}"
assert sorted(seen) == list(range(SESSIONS * PER)), f"missing: {set(range(SESSIONS * PER)) - set(seen)}"
uids = sorted(u[0] for u in seen.values())
assert uids == list(range(1, SESSIONS * PER + 1)), f"UIDs not dense: {uids[:5]}...{uids[-5:]}"
print(len(uids))
"#,
        &[],
    );
    assert_eq!(out.trim(), "1000");
}
