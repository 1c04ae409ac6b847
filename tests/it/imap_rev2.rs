//! SEARCHRES (RFC 5182), CONTEXT=SEARCH (RFC 5267, with RFC 9394's PARTIAL ranges) and
//! IMAP4rev2 (RFC 9051) over real sockets (Python's imaplib, raw command lines).

use crate::harness::{Node, PY_IMAP_RAW};

/// `esearch(lines)`: the `* ESEARCH` lines among untagged lines.
const HELPERS: &str = r#"
def esearch(lines):
    return [l for l in lines if l.startswith("* ESEARCH")]

def expect_ok(c, command):
    status, lines = raw(c, command)
    assert status.split()[1] == "OK", (command, status, lines)
    return lines

def fetched_uids(lines):
    return sorted(int(m.group(1)) for l in lines for m in [re.search(r"UID (\d+)", l)] if m)
"#;

fn script(body: &str) -> String {
    format!("{PY_IMAP_RAW}\n{HELPERS}\n{body}")
}

/// `SEARCH RETURN (SAVE)` answers no ESEARCH and keeps the matches as `$`, which FETCH,
/// STORE, COPY, MOVE, SEARCH and UID EXPUNGE (UID or not) then act on; MIN/MAX alone save
/// only those; a failed SEARCH with SAVE empties `$`; SELECT forgets it; expunged messages
/// leave it.
const SEARCHRES: &str = r#"
c = imap()
status, lines = raw(c, "CAPABILITY")
assert " SEARCHRES" in lines[0], lines
for i in range(6):
    ok(c.append("INBOX", "(\\Flagged)" if i in (1, 2, 4) else None, None, message(f"m{i}")), "APPEND")
ok(c.create("Saved"), "CREATE")
ok(c.select("INBOX"), "SELECT")
lines = expect_ok(c, "SEARCH RETURN (SAVE) FLAGGED")
assert esearch(lines) == [], lines
lines = expect_ok(c, "FETCH $ (UID)")
assert fetched_uids(lines) == [2, 3, 5], lines
assert [l.split()[1] for l in lines if "FETCH" in l] == ["2", "3", "5"], lines
lines = expect_ok(c, "UID FETCH $ (FLAGS)")
assert fetched_uids(lines) == [2, 3, 5], lines
# `$` inside search keys, alone and combined.
lines = expect_ok(c, "UID SEARCH RETURN (ALL) NOT $")
assert esearch(lines)[0].endswith("UID ALL 1,4,6"), lines
lines = expect_ok(c, "SEARCH OR $ 1")
assert "* SEARCH 1 2 3 5" in lines, lines
# STORE and COPY through `$`.
expect_ok(c, "STORE $ +FLAGS.SILENT (\\Seen)")
lines = expect_ok(c, "UID SEARCH RETURN (ALL) SEEN")
assert esearch(lines)[0].endswith("UID ALL 2:3,5"), lines
status, lines = raw(c, "UID COPY $ Saved")
assert re.match(r"\S+ OK \[COPYUID \d+ 2:3,5 1:3\]", status), (status, lines)
# MIN alone saves only the first match; MIN MAX both ends; COUNT everything.
expect_ok(c, "SEARCH RETURN (SAVE MIN) FLAGGED")
lines = expect_ok(c, "UID FETCH $ (UID)")
assert fetched_uids(lines) == [2], lines
lines = expect_ok(c, "SEARCH RETURN (SAVE MIN MAX) FLAGGED")
assert esearch(lines)[0].endswith("MIN 2 MAX 5"), lines
lines = expect_ok(c, "UID FETCH $ (UID)")
assert fetched_uids(lines) == [2, 5], lines
lines = expect_ok(c, "SEARCH RETURN (SAVE COUNT) FLAGGED")
assert esearch(lines)[0].endswith("COUNT 3"), lines
lines = expect_ok(c, "UID FETCH $ (UID)")
assert fetched_uids(lines) == [2, 3, 5], lines
# A failed SEARCH with SAVE empties `$`: commands on it then touch nothing.
status, lines = raw(c, "SEARCH RETURN (SAVE) CHARSET KOI8-R ALL")
assert status.split()[1] == "NO", status
lines = expect_ok(c, "FETCH $ (UID)")
assert fetched_uids(lines) == [], lines
lines = expect_ok(c, "SEARCH $")
assert "* SEARCH" in lines, lines
# Expunged messages leave the saved result; MOVE and UID EXPUNGE take `$` too.
expect_ok(c, "UID SEARCH RETURN (SAVE) UID 1:3")
expect_ok(c, "UID STORE 2 +FLAGS.SILENT (\\Deleted)")
lines = expect_ok(c, "UID EXPUNGE $")
assert "* 2 EXPUNGE" in lines, lines
lines = expect_ok(c, "UID FETCH $ (UID)")
assert fetched_uids(lines) == [1, 3], lines
status, lines = raw(c, "MOVE $ Saved")
assert re.match(r"\S+ OK", status) and "* 1 EXPUNGE" in lines, (status, lines)
lines = expect_ok(c, "UID FETCH 1:* (UID)")
assert fetched_uids(lines) == [4, 5, 6], lines
# SELECT forgets the saved result.
expect_ok(c, "SEARCH RETURN (SAVE) ALL")
ok(c.select("INBOX"), "SELECT")
lines = expect_ok(c, "FETCH $ (UID)")
assert fetched_uids(lines) == [], lines
# Outside the selected state `$` is an error.
ok(c.unselect() if hasattr(c, "unselect") else c.close(), "UNSELECT")
status, lines = raw(c, "FETCH $ (UID)")
assert status.split()[1] == "BAD", status
c.logout()
print("searchres ok")
"#;

#[test]
fn searchres_saves_a_result_for_later_commands() {
    let node = Node::with_account();
    let out = node.py(&script(SEARCHRES), &[]);
    assert!(out.contains("searchres ok"), "{out}");
}
