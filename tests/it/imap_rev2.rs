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
# Under QRESYNC, UID FETCH $ ... VANISHED reports the saved UIDs expunged since.
expect_ok(c, "ENABLE QRESYNC")
ok(c.select("INBOX"), "SELECT")
expect_ok(c, "UID SEARCH RETURN (SAVE) UID 4:6")
expect_ok(c, "UID STORE 5 +FLAGS.SILENT (\\Deleted)")
expect_ok(c, "UID EXPUNGE 5")
lines = expect_ok(c, "UID FETCH $ (FLAGS) (CHANGEDSINCE 1 VANISHED)")
assert "* VANISHED (EARLIER) 5" in lines, lines
assert fetched_uids(lines) == [4, 6], lines
c.logout()
print("searchres ok")
"#;

#[test]
fn searchres_saves_a_result_for_later_commands() {
    let node = Node::with_account();
    let out = node.py(&script(SEARCHRES), &[]);
    assert!(out.contains("searchres ok"), "{out}");
}

/// `UID SEARCH RETURN (UPDATE) UNSEEN` answers its matches, then reports as ADDTO/REMOVEFROM
/// how they change as another session appends, flags and expunges: after its commands
/// (ADDTO after the EXISTS, before the tagged line) and during IDLE; CANCELUPDATE ends it.
const CONTEXT_UPDATE: &str = r#"
c = imap()
status, lines = raw(c, "CAPABILITY")
assert " CONTEXT=SEARCH" in lines[0], lines
other = imap()
for i in range(4):
    ok(other.append("INBOX", "(\\Seen)" if i == 0 else None, None, message(f"m{i}")), "APPEND")
ok(c.select("INBOX"), "SELECT")
ok(other.select("INBOX"), "SELECT")
c.send(b'U1 UID SEARCH RETURN (UPDATE) UNSEEN\r\n')
status, lines = read_tagged(c, "U1")
assert status.startswith("U1 OK"), (status, lines)
assert esearch(lines) == ['* ESEARCH (TAG "U1") UID ALL 2:4'], lines
# A delivery: ADDTO after its EXISTS, before the tagged line.
ok(other.append("INBOX", None, None, message("new")), "APPEND")
lines = expect_ok(c, "NOOP")
assert "* 5 EXISTS" in lines, lines
assert esearch(lines) == ['* ESEARCH (TAG "U1") UID ADDTO (0 5)'], lines
assert lines.index("* 5 EXISTS") < lines.index(esearch(lines)[0]), lines
# A flag change elsewhere takes a message out.
ok(other.uid("STORE", "3", "+FLAGS", "(\\Seen)"), "STORE")
lines = expect_ok(c, "NOOP")
assert esearch(lines) == ['* ESEARCH (TAG "U1") UID REMOVEFROM (0 3)'], lines
# This session's own STORE counts too, and the update comes before the tagged OK.
c.send(b'S1 UID STORE 1 -FLAGS (\\Seen)\r\n')
status, lines = read_tagged(c, "S1")
assert status.startswith("S1 OK"), status
assert esearch(lines) == ['* ESEARCH (TAG "U1") UID ADDTO (0 1)'], lines
# An expunge elsewhere.
ok(other.uid("STORE", "2", "+FLAGS", "(\\Deleted)"), "STORE")
ok(other.expunge(), "EXPUNGE")
lines = expect_ok(c, "NOOP")
assert "* 2 EXPUNGE" in lines, lines
assert esearch(lines) == ['* ESEARCH (TAG "U1") UID REMOVEFROM (0 2)'], lines
# During IDLE, as the other session appends.
c.send(b"I1 IDLE\r\n")
assert c.readline().startswith(b"+"), "no continuation"
ok(other.append("INBOX", None, None, message("while idle")), "APPEND")
seen = []
while True:
    line = c.readline().decode().strip()
    seen.append(line)
    if line.startswith("* ESEARCH"):
        break
assert seen[-1] == '* ESEARCH (TAG "U1") UID ADDTO (0 6)', seen
c.send(b"DONE\r\n")
status, lines = read_tagged(c, "I1")
assert status.startswith("I1 OK"), status
# A second context, and CANCELUPDATE of the first: only the second hears of the next one.
c.send(b'U2 UID SEARCH RETURN (UPDATE COUNT) ALL\r\n')
status, lines = read_tagged(c, "U2")
assert esearch(lines) == ['* ESEARCH (TAG "U2") UID COUNT 5'], lines
lines = expect_ok(c, 'CANCELUPDATE "U1"')
ok(other.append("INBOX", None, None, message("after cancel")), "APPEND")
lines = expect_ok(c, "NOOP")
assert esearch(lines) == ['* ESEARCH (TAG "U2") UID ADDTO (0 7)'], lines
status, lines = raw(c, 'CANCELUPDATE "U1"')
assert status.split()[1] == "BAD", status
# A SEARCH (not UID) context: its updates name message numbers, without UID.
c.send(b"N1 SEARCH RETURN (UPDATE) FLAGGED\r\n")
status, lines = read_tagged(c, "N1")
assert esearch(lines) == ['* ESEARCH (TAG "N1")'], lines
ok(other.uid("STORE", "5", "+FLAGS", "(\\Flagged)"), "STORE")
lines = expect_ok(c, "NOOP")
assert esearch(lines) == ['* ESEARCH (TAG "N1") ADDTO (0 4)'], lines
# A new selection ends every context.
ok(c.select("INBOX"), "SELECT")
ok(other.append("INBOX", None, None, message("after select")), "APPEND")
lines = expect_ok(c, "NOOP")
assert esearch(lines) == [], lines
c.logout(); other.logout()
print("context ok")
"#;

#[test]
fn context_search_reports_changes_until_cancelled() {
    let node = Node::with_account();
    let out = node.py(&script(CONTEXT_UPDATE), &[]);
    assert!(out.contains("context ok"), "{out}");
}

/// PARTIAL (RFC 5267 4.4, ranges of RFC 9394): positions counted from the first match or,
/// negative, from the last; NIL when the range is past the matches; not with ALL. ESORT
/// (RFC 5267 3): `SORT RETURN (...)` answers `* ESEARCH` in sort order.
const PARTIAL: &str = r#"
c = imap()
for i in range(6):
    ok(c.append("INBOX", "(\\Seen)" if i == 2 else None, None, message(f"m{i}")), "APPEND")
ok(c.select("INBOX"), "SELECT")
c.send(b"P1 UID SEARCH RETURN (PARTIAL 1:3) UNSEEN\r\n")
status, lines = read_tagged(c, "P1")
assert esearch(lines) == ['* ESEARCH (TAG "P1") UID PARTIAL (1:3 1:2,4)'], lines
c.send(b"P2 SEARCH RETURN (PARTIAL -1:-2 COUNT) UNSEEN\r\n")
status, lines = read_tagged(c, "P2")
assert esearch(lines) == ['* ESEARCH (TAG "P2") COUNT 5 PARTIAL (-1:-2 5:6)'], lines
c.send(b"P4 SEARCH RETURN (PARTIAL 2:1) ALL\r\n")
status, lines = read_tagged(c, "P4")
assert esearch(lines) == ['* ESEARCH (TAG "P4") PARTIAL (2:1 1:2)'], lines
c.send(b"P3 SEARCH RETURN (PARTIAL 7:9) ALL\r\n")
status, lines = read_tagged(c, "P3")
assert esearch(lines) == ['* ESEARCH (TAG "P3") PARTIAL (7:9 NIL)'], lines
status, lines = raw(c, "SEARCH RETURN (PARTIAL 1:2 ALL) ALL")
assert status.split()[1] == "BAD", status
status, lines = raw(c, "SEARCH RETURN (PARTIAL 0:2) ALL")
assert status.split()[1] == "BAD", status
# ESORT (RFC 5267 3): SORT RETURN answers ESEARCH in sort order.
status, lines = raw(c, "CAPABILITY")
assert " ESORT" in lines[0], lines
c.send(b"E1 UID SORT RETURN (MIN MAX COUNT ALL) (REVERSE SUBJECT) UTF-8 UNSEEN\r\n")
status, lines = read_tagged(c, "E1")
assert lines == ['* ESEARCH (TAG "E1") UID MIN 6 MAX 1 COUNT 5 ALL 6,5,4,2,1'], lines
c.send(b"E2 SORT RETURN (PARTIAL 1:2) (REVERSE SUBJECT) UTF-8 ALL\r\n")
status, lines = read_tagged(c, "E2")
assert lines == ['* ESEARCH (TAG "E2") PARTIAL (1:2 6,5)'], lines
status, lines = raw(c, "SORT RETURN (SAVE) (SUBJECT) UTF-8 ALL")
assert status.split()[1] == "BAD", status
# A plain SORT is unchanged.
status, lines = raw(c, "SORT (REVERSE SUBJECT) UTF-8 ALL")
assert lines == ["* SORT 6 5 4 3 2 1"], lines
c.logout()
print("partial ok")
"#;

#[test]
fn partial_and_esort_return_windows_and_sorted_results() {
    let node = Node::with_account();
    let out = node.py(&script(PARTIAL), &[]);
    assert!(out.contains("partial ok"), "{out}");
}

/// IMAP4rev2 is advertised beside IMAP4rev1; after `ENABLE IMAP4rev2` SELECT and NOOP send no
/// RECENT, FETCH shows no `\Recent`, a plain SEARCH is answered with ESEARCH, LIST calls a
/// parent that is no mailbox `\NonExistent`, STATUS has DELETED and SIZE. A session that did
/// not enable it keeps IMAP4rev1's answers (and the messages stay `\Recent` for it).
const REV2: &str = r#"
c = imap()
status, lines = raw(c, "CAPABILITY")
caps = lines[0].split()
assert "IMAP4rev1" in caps and "IMAP4rev2" in caps, lines
other = imap()
for i in range(3):
    ok(other.append("INBOX", "(\\Deleted)" if i == 1 else None, None, message(f"m{i}")), "APPEND")
ok(other.create("Parent/Child"), "CREATE")
ok(other.delete("Parent"), "DELETE")
lines = expect_ok(c, "ENABLE IMAP4rev2")
assert "* ENABLED IMAP4rev2" in lines, lines
# Enabling twice reports nothing new.
lines = expect_ok(c, "ENABLE IMAP4rev2")
assert "* ENABLED" in lines, lines
c.send(b"S1 SELECT INBOX\r\n")
status, lines = read_tagged(c, "S1")
assert status.startswith("S1 OK"), status
assert "* 3 EXISTS" in lines and not [l for l in lines if "RECENT" in l], lines
assert '* LIST () "/" "INBOX"' in lines and not [l for l in lines if "UNSEEN" in l], lines
lines = expect_ok(c, "FETCH 1:* (FLAGS)")
assert len(lines) == 3 and not [l for l in lines if "\\Recent" in l], lines
ok(other.append("INBOX", None, None, message("later")), "APPEND")
lines = expect_ok(c, "NOOP")
assert "* 4 EXISTS" in lines and not [l for l in lines if "RECENT" in l], lines
c.send(b"Q1 SEARCH NOT DELETED\r\n")
status, lines = read_tagged(c, "Q1")
assert lines == ['* ESEARCH (TAG "Q1") ALL 1,3:4'], lines
c.send(b"Q2 UID SEARCH KEYWORD nothing\r\n")
status, lines = read_tagged(c, "Q2")
assert lines == ['* ESEARCH (TAG "Q2") UID'], lines
c.send(b"Q3 SEARCH RETURN (COUNT) ALL\r\n")
status, lines = read_tagged(c, "Q3")
assert lines == ['* ESEARCH (TAG "Q3") COUNT 4'], lines
lines = expect_ok(c, 'LIST "" "*"')
assert '* LIST (\\NonExistent \\HasChildren) "/" "Parent"' in lines, lines
lines = expect_ok(c, "STATUS INBOX (MESSAGES DELETED SIZE)")
assert re.fullmatch(r"\* STATUS \"?INBOX\"? \(MESSAGES 4 DELETED 1 SIZE \d+\)", lines[0]), lines
# UTF-8 in quoted strings: a mailbox name, listed back (as a literal) and selectable.
expect_ok(c, 'CREATE "Küche"')
lines = expect_ok(c, 'LIST "" "K*"')
assert lines == ['* LIST (\\HasNoChildren) "/" {6}', "Küche"], lines
expect_ok(c, 'SELECT "Küche"')
# The IMAP4rev1 session is unchanged: * SEARCH, RECENT, \Recent, \Noselect, ASCII quoted.
plain = imap()
status, lines = raw(plain, 'CREATE "Straße"')
assert status.split()[1] == "BAD", status
status, lines = raw(plain, "SELECT INBOX")
assert "* 4 RECENT" in lines and "* OK [UNSEEN 1] first unseen message" in lines, lines
assert not [l for l in lines if l.startswith("* LIST")], lines
status, lines = raw(plain, "SEARCH NOT DELETED")
assert "* SEARCH 1 3 4" in lines and not esearch(lines), lines
status, lines = raw(plain, "FETCH 1 (FLAGS)")
assert "\\Recent" in lines[0], lines
status, lines = raw(plain, 'LIST "" "*"')
assert '* LIST (\\Noselect \\HasChildren) "/" "Parent"' in lines, lines
c.logout(); other.logout(); plain.logout()
print("rev2 ok")
"#;

#[test]
fn enable_imap4rev2_switches_the_session_to_rev2_answers() {
    let node = Node::with_account();
    let out = node.py(&script(REV2), &[]);
    assert!(out.contains("rev2 ok"), "{out}");
}
