//! Smaller IMAP extensions of issue 13 over real sockets (Python's imaplib): STATUS=SIZE
//! (RFC 8438), WITHIN (RFC 5032) and CREATE-SPECIAL-USE (RFC 6154).

use crate::harness::Node;

const RAW: &str = crate::harness::PY_IMAP_RAW;

const STATUS_SIZE: &str = r#"
c = imap()
status, lines = raw(c, "CAPABILITY")
assert " STATUS=SIZE" in lines[0], lines
ok(c.create("Other"), "CREATE")
for n in range(3):
    ok(c.append("INBOX", None, None, message(f"size {n}", body="x" * (100 * n) + "\r\n")), "APPEND")
ok(c.select("INBOX"), "SELECT")
data = ok(c.fetch("1:*", "(RFC822.SIZE)"), "FETCH")
total = sum(int(re.search(rb"RFC822.SIZE (\d+)", d).group(1)) for d in data)
status, lines = raw(c, "STATUS INBOX (MESSAGES SIZE UNSEEN)")
assert status.split()[1] == "OK", status
assert lines == [f'* STATUS "INBOX" (MESSAGES 3 UNSEEN 3 SIZE {total})'], (lines, total)
status, lines = raw(c, "STATUS INBOX (SIZE)")
assert lines == [f'* STATUS "INBOX" (SIZE {total})'], (lines, total)
status, lines = raw(c, "STATUS Other (size MESSAGES)")
assert lines == ['* STATUS "Other" (MESSAGES 0 SIZE 0)'], lines
status, lines = raw(c, "STATUS INBOX (MESSAGES)")
assert lines == ['* STATUS "INBOX" (MESSAGES 3)'], lines
print("status size ok")
"#;

#[test]
fn status_size_is_the_total_of_rfc822_sizes() {
    let node = Node::with_account();
    let out = node.py(&format!("{RAW}\n{STATUS_SIZE}"), &[]);
    assert!(out.contains("status size ok"), "{out}");
}

const WITHIN: &str = r#"
c = imap()
status, lines = raw(c, "CAPABILITY")
assert " WITHIN" in lines[0], lines
# Message 1 arrived (INTERNALDATE) in 2020; message 2 now.
ok(c.append("INBOX", None, '"01-Jan-2020 00:00:00 +0000"', message("old one")), "APPEND")
ok(c.append("INBOX", None, None, message("new one")), "APPEND")
ok(c.select("INBOX"), "SELECT")
def search(criteria):
    status, lines = raw(c, f"SEARCH {criteria}")
    assert status.split()[1] == "OK", (criteria, status)
    return [l for l in lines if l.startswith("* SEARCH")][0].split()[2:]
assert search("OLDER 86400") == ["1"], search("OLDER 86400")
assert search("YOUNGER 86400") == ["2"], search("YOUNGER 86400")
assert search("OR YOUNGER 86400 SUBJECT old") == ["1", "2"]
assert search("NOT OLDER 3600") == ["2"]
status, lines = raw(c, "UID SORT (SUBJECT) UTF-8 OLDER 60")
assert "* SORT 1" in lines, lines
for bad in ["SEARCH OLDER", "SEARCH YOUNGER 0", "SEARCH OLDER x"]:
    status, lines = raw(c, bad)
    assert status.split()[1] == "BAD", (bad, status)
print("within ok")
"#;

#[test]
fn within_older_and_younger_use_internaldate() {
    let node = Node::with_account();
    let out = node.py(&format!("{RAW}\n{WITHIN}"), &[]);
    assert!(out.contains("within ok"), "{out}");
}

const CREATE_SPECIAL_USE: &str = r#"
c = imap()
status, lines = raw(c, "CAPABILITY")
assert " CREATE-SPECIAL-USE" in lines[0], lines
status, _ = raw(c, "CREATE Arch (USE (\\Archive))")
assert status.split()[1] == "OK", status
status, _ = raw(c, "create \"My Sent\" (use (\\sent))")
assert status.split()[1] == "OK", status
status, _ = raw(c, "CREATE Plain (USE ())")
assert status.split()[1] == "OK", status
status, _ = raw(c, "CREATE Everything (USE (\\All))")
assert "NO [USEATTR]" in status, status
status, _ = raw(c, "CREATE Two (USE (\\Sent \\Junk))")
assert "NO [USEATTR]" in status, status
listing = {}
for line in ok(c.list(), "LIST"):
    m = re.match(rb'\((.*)\) "/" "?([^"]*)"?$', line)
    listing[m.group(2).decode()] = m.group(1).decode().split()
assert "\\Archive" in listing["Arch"], listing
assert "\\Sent" in listing["My Sent"], listing
assert not any(a in listing["Plain"] for a in ("\\Archive", "\\Sent", "\\Junk")), listing
assert "Everything" not in listing and "Two" not in listing, listing
print("create special use ok")
"#;

#[test]
fn create_with_a_special_use() {
    let node = Node::with_account();
    let out = node.py(&format!("{RAW}\n{CREATE_SPECIAL_USE}"), &[]);
    assert!(out.contains("create special use ok"), "{out}");
}
