//! RFC 3501 points Dovecot gets right and kermail did not (issue 13, point 1), each through
//! Python's imaplib over a real socket: `\Recent` owned by exactly one session, LSUB's
//! `\Noselect` parent of a subscribed child, untagged FLAGS/PERMANENTFLAGS when a new keyword
//! appears in the selected mailbox, and SEARCH FROM/TO/CC/BCC on parsed, comment-free
//! addresses.

use crate::harness::Node;

/// Helpers shared by the scripts: `run` sends a command and returns (status, untagged
/// responses by name), so that a test can look at exactly what one command produced.
const PRELUDE: &str = r#"
def run(c, name, *args):
    c.untagged_responses.clear()
    typ, data = c._simple_command(name, *args)
    got = {k: list(v) for k, v in c.untagged_responses.items()}
    c.untagged_responses.clear()
    return typ, got

def search(c, *criteria):
    typ, data = c.uid("SEARCH", *criteria)
    assert typ == "OK", (criteria, typ, data)
    return [int(x) for x in data[0].split()]

def select(c, mailbox, readonly=False):
    typ, data = c.select(mailbox, readonly)
    got = {k: list(v) for k, v in c.untagged_responses.items()}
    c.untagged_responses.clear()
    return typ, got

def recent_count(got):
    return [int(x) for x in got.get("RECENT", [])]
"#;

fn script(body: &str) -> String {
    format!("{PRELUDE}\n{body}")
}

/// Two messages arrive; STATUS and EXAMINE see them as recent without taking them; the first
/// read-write SELECT owns them (`* 2 RECENT`, `\Recent` in FETCH FLAGS, SEARCH RECENT/NEW/OLD),
/// a second session selecting the same mailbox sees none; a message arriving later is
/// reported recent to the session that polls first (NOOP), and to it only.
const RECENT: &str = r#"
a, b, watcher = imap(), imap(), imap()
ok(a.append("INBOX", None, None, message("one")), "APPEND")
ok(a.append("INBOX", None, None, message("two")), "APPEND")

typ, data = watcher.status("INBOX", "(MESSAGES RECENT)")
assert typ == "OK" and b"RECENT 2" in data[0], data
# EXAMINE does not claim: it reports them and leaves them for a read-write SELECT.
typ, got = select(watcher, "INBOX", readonly=True)
assert typ == "OK" and recent_count(got) == [2], got

typ, got = select(a, "INBOX")
assert typ == "OK" and recent_count(got) == [2], got
data = ok(a.fetch("1:2", "(FLAGS)"), "FETCH")
assert all(b"\\Recent" in d for d in data), data
assert search(a, "RECENT") == [1, 2]
assert search(a, "NEW") == [1, 2]
assert search(a, "OLD") == []
ok(a.store("1", "+FLAGS", "(\\Seen)"), "STORE")
assert search(a, "NEW") == [2]

typ, got = select(b, "INBOX")
assert typ == "OK" and recent_count(got) == [0], got
data = ok(b.fetch("1:2", "(FLAGS)"), "FETCH")
assert not any(b"\\Recent" in d for d in data), data
assert search(b, "RECENT") == []
assert search(b, "OLD") == [1, 2]
typ, data = watcher.status("INBOX", "(RECENT)")
assert typ == "OK" and b"RECENT 0" in data[0], data

# A third message arrives: the session that polls first owns it.
s = smtp(); s.sendmail("bob@example.org", [USER], message("three")); s.quit()
def exists(c):
    typ, got = run(c, "NOOP")
    assert typ == "OK", got
    return got
deadline = time.time() + 30
got = exists(a)
while b"3" not in got.get("EXISTS", []):
    assert time.time() < deadline, got
    got = exists(a)
assert recent_count(got) == [3], got
assert search(a, "RECENT") == [1, 2, 3]
got = exists(b)
assert recent_count(got) in ([], [0]), got
assert search(b, "RECENT") == []
assert search(b, "UNSEEN") == [2, 3]
for c in (a, b, watcher):
    c.logout()
print("recent ok")
"#;

#[test]
fn recent_belongs_to_the_first_read_write_session() {
    let node = Node::with_account();
    let out = node.py(&script(RECENT), &[]);
    assert!(out.contains("recent ok"), "{out}");
}

/// `CREATE a/b/c`, `SUBSCRIBE a/b/c`: `LSUB "" %` gives `a` as `\Noselect`, `LSUB "" a/%`
/// gives `a/b` as `\Noselect`, and `LSUB "" *` gives only `a/b/c` (RFC 3501 6.3.9).
const LSUB: &str = r#"
c = imap()
ok(c.create("a/b/c"), "CREATE")
ok(c.subscribe("a/b/c"), "SUBSCRIBE")
def lsub(pattern):
    data = ok(c.lsub('""', pattern), "LSUB")
    # Names may come quoted or not.
    return sorted(d.decode().replace('"/"', "/").replace('"', "") for d in data if d)
top = lsub("%")
assert '(\\Noselect) / a' in top, top
assert not any(l.endswith(" a/b/c") for l in top), top
assert lsub("a/%") == ['(\\Noselect) / a/b'], lsub("a/%")
assert lsub("a/b/%") == ['() / a/b/c'], lsub("a/b/%")
everything = lsub("*")
assert '() / a/b/c' in everything and not any(l.endswith(" a") or l.endswith(" a/b") for l in everything), everything
# A subscribed parent keeps its own attributes.
ok(c.subscribe("a"), "SUBSCRIBE")
assert '() / a' in lsub("%"), lsub("%")
c.logout()
print("lsub ok")
"#;

#[test]
fn lsub_lists_the_noselect_parent_of_a_subscribed_child() {
    let node = Node::with_account();
    let out = node.py(&script(LSUB), &[]);
    assert!(out.contains("lsub ok"), "{out}");
}

/// A STORE that adds a keyword the mailbox has never had is preceded by `* FLAGS (...)` and
/// `* OK [PERMANENTFLAGS (...)]` naming it, in the storing session and in another session
/// selected on the same mailbox (at its next NOOP); a known keyword sends no FLAGS again.
const KEYWORDS: &str = r#"
a, b = imap(), imap()
ok(a.append("INBOX", None, None, message("one")), "APPEND")
ok(a.select("INBOX"), "SELECT")
ok(b.select("INBOX"), "SELECT")
typ, got = run(a, "STORE", "1", "+FLAGS", "(Project1)")
assert typ == "OK", got
assert "FLAGS" in got and b"Project1" in got["FLAGS"][0], got
assert "PERMANENTFLAGS" in got and b"Project1" in got["PERMANENTFLAGS"][0] and b"\\*" in got["PERMANENTFLAGS"][0], got
typ, got = run(b, "NOOP")
assert typ == "OK" and "FLAGS" in got and b"Project1" in got["FLAGS"][0], got
# Known now: no second announcement.
typ, got = run(a, "STORE", "1", "+FLAGS", "(project1 \\Flagged)")
assert typ == "OK" and "FLAGS" not in got, got
a.logout(); b.logout()
print("keywords ok")
"#;

/// APPEND with a new keyword while selected: the FLAGS update comes with the APPEND itself.
const APPEND_KEYWORD: &str = r#"
a = imap()
ok(a.append("INBOX", None, None, message("one")), "APPEND")
ok(a.select("INBOX"), "SELECT")
a.untagged_responses.clear()
typ, data = a.append("INBOX", "(Later)", None, message("two"))
assert typ == "OK", data
got = {k: list(v) for k, v in a.untagged_responses.items()}
assert "FLAGS" in got and b"Later" in got["FLAGS"][0], got
assert "PERMANENTFLAGS" in got and b"Later" in got["PERMANENTFLAGS"][0], got
a.logout()
print("append keyword ok")
"#;

#[test]
fn a_new_keyword_is_announced_with_flags_and_permanentflags() {
    let node = Node::with_account();
    let out = node.py(&script(KEYWORDS), &[]);
    assert!(out.contains("keywords ok"), "{out}");
    let out = node.py(&script(APPEND_KEYWORD), &[]);
    assert!(out.contains("append keyword ok"), "{out}");
}

/// Address keys match parsed addresses without comments: `FROM user-from@domain.org` finds
/// `From: <user-from (comment)@ (comment) domain.org>`, the comment's words find nothing, a
/// display name and a domain are found, and CC/BCC/TO behave the same.
const ADDRESSES: &str = r#"
c = imap()
raw = (b"From: <user-from (comment)@ (comment) domain.org>\r\n"
       b"To: \"Joe Q. Public\" <joe (the man) @ example.org>, Mary <mary@x.test>\r\n"
       b"Cc: group: <cc-one@cc.test>, cc two <cc-two@cc.test>;\r\n"
       b"Bcc: hidden (very secret) <hid@den.test>\r\n"
       b"Subject: addresses\r\n\r\nbody\r\n")
ok(c.append("INBOX", None, None, raw), "APPEND")
ok(c.append("INBOX", None, None, message("plain")), "APPEND")
ok(c.select("INBOX"), "SELECT")
assert search(c, "FROM", "user-from@domain.org") == [1]
assert search(c, "FROM", "domain.org") == [1]
assert search(c, "FROM", "comment") == []
assert search(c, "TO", "joe@example.org") == [1]
assert search(c, "TO", '"Joe Q. Public"') == [1]
assert search(c, "TO", '"the man"') == []
assert search(c, "CC", "cc-two@cc.test") == [1]
assert search(c, "CC", "cc-one@cc.test") == [1]
assert search(c, "BCC", "hid@den.test") == [1]
assert search(c, "BCC", "secret") == []
assert search(c, "FROM", "bob@example.org") == [2]
c.logout()
print("addresses ok")
"#;

#[test]
fn address_keys_match_parsed_addresses_without_comments() {
    let node = Node::with_account();
    let out = node.py(&script(ADDRESSES), &[]);
    assert!(out.contains("addresses ok"), "{out}");
}

/// ESEARCH (RFC 4731): `SEARCH RETURN (MIN MAX COUNT ALL)` and `UID SEARCH RETURN (...)`
/// answer one `* ESEARCH` line, `RETURN ()` means ALL, no match gives `COUNT 0` alone, and an
/// unsupported option is refused with BAD.
const ESEARCH: &str = r#"
c = imap()
typ, data = c.capability()
assert b"ESEARCH" in data[0].split(), data
for i in range(5):
    ok(c.append("INBOX", "(\\Seen)" if i in (0, 3) else None, None, message(f"m{i}")), "APPEND")
ok(c.select("INBOX"), "SELECT")
typ, got = run(c, "SEARCH", "RETURN", "(MIN MAX COUNT ALL)", "UNSEEN")
assert typ == "OK", got
line = got["ESEARCH"][0].decode()
assert re.fullmatch(r'\(TAG "[A-Z0-9]+"\) MIN 2 MAX 5 COUNT 3 ALL 2:3,5', line), line
typ, got = run(c, "UID", "SEARCH", "RETURN", "(COUNT)", "SEEN")
line = got["ESEARCH"][0].decode()
assert typ == "OK" and re.fullmatch(r'\(TAG "[A-Z0-9]+"\) UID COUNT 2', line), line
typ, got = run(c, "SEARCH", "RETURN", "()", "ALL")
line = got["ESEARCH"][0].decode()
assert re.fullmatch(r'\(TAG "[A-Z0-9]+"\) ALL 1:5', line), line
typ, got = run(c, "SEARCH", "RETURN", "(MIN MAX COUNT)", "KEYWORD", "nothing")
line = got["ESEARCH"][0].decode()
assert re.fullmatch(r'\(TAG "[A-Z0-9]+"\) COUNT 0', line), line
assert "SEARCH" not in got, got
try:
    typ, got = run(c, "SEARCH", "RETURN", "(FUZZY)", "ALL")
    raise AssertionError(f"FUZZY accepted: {typ} {got}")
except imaplib.IMAP4.error as e:
    assert "BAD" in str(e) or "RETURN" in str(e), e
# A plain SEARCH still answers * SEARCH.
assert search(c, "UNSEEN") == [2, 3, 5]
c.logout()
print("esearch ok")
"#;

#[test]
fn esearch_returns_min_max_count_all() {
    let node = Node::with_account();
    let out = node.py(&script(ESEARCH), &[]);
    assert!(out.contains("esearch ok"), "{out}");
}

/// `\Recent` in a cluster: messages delivered on one node are recent in exactly one session,
/// whichever nodes the sessions are on. A read-write SELECT on n2 owns the first two; a SELECT
/// on n3 (whose boundary may lag) owns none; then, five times, a new message and two SELECTs
/// at once on n2 and n3: their RECENT counts add up to exactly 1.
const CLUSTER_RECENT: &str = r#"
def selected_recent(node):
    c = imap(node)
    ok(c.select("INBOX"), "SELECT")
    count = int(c.untagged_responses["RECENT"][-1])
    data = ok(c.uid("SEARCH", "RECENT"), "SEARCH RECENT")
    c.logout()
    return count, [int(x) for x in data[0].split()]

def wait_count(node, n):
    def count():
        c = imap(node)
        typ, data = c.status("INBOX", "(MESSAGES)")
        c.logout()
        return int(re.search(rb"MESSAGES (\d+)", data[0]).group(1)) == n
    wait_until(count, f"{n} messages on {node}")

s = smtp("n1")
for i in range(2):
    assert s.sendmail("bob@example.org", [USER], message(f"first-{i}")) == {}
s.quit()
for n in ("n2", "n3"):
    wait_count(n, 2)
assert selected_recent("n2") == (2, [1, 2])
assert selected_recent("n3") == (0, [])
counts = []
for round in range(5):
    s = smtp("n1")
    assert s.sendmail("bob@example.org", [USER], message(f"round-{round}")) == {}
    s.quit()
    for n in ("n2", "n3"):
        wait_count(n, 3 + round)
    results = {}
    def select(node):
        results[node] = selected_recent(node)
    threads = [threading.Thread(target=select, args=(n,)) for n in ("n2", "n3")]
    for t in threads: t.start()
    for t in threads: t.join(120)
    assert len(results) == 2, results
    assert sum(c for c, _ in results.values()) == 1, results
    owner = [uids for c, uids in results.values() if c == 1][0]
    assert owner == [3 + round], results
    counts.append(results)
print(json.dumps(counts))
print("cluster recent ok")
"#;

#[test]
fn recent_is_owned_by_one_session_across_cluster_nodes() {
    let Some(cluster) = crate::cluster::Cluster::up(10, 3, None) else {
        return;
    };
    cluster.account();
    let out = cluster.py(CLUSTER_RECENT, &[]);
    println!("{out}");
    assert!(out.contains("cluster recent ok"), "{out}");
}
