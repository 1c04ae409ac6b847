//! ACL (RFC 4314) over real sockets (Python's imaplib): the owner `alice` shares mailboxes
//! with `bob` of the same domain; `eve` of another domain is never reached.

use crate::harness::{Node, PASSWORD, PY_IMAP_RAW};

const FRIEND: &str = "bob@kermail.test";
const STRANGER: &str = "eve@elsewhere.test";

/// A node with alice (the harness's USER), bob of her domain and eve of another.
fn node() -> Node {
    let node = Node::with_account();
    node.add_account(FRIEND, PASSWORD);
    node.add_account(STRANGER, PASSWORD);
    node
}

fn py(node: &Node, script: &str) -> String {
    let friend = format!("FRIEND={FRIEND}");
    let stranger = format!("STRANGER={STRANGER}");
    node.py(&format!("{PY_IMAP_RAW}\n{script}"), &[&friend, &stranger])
}

/// The ACL commands on the owner's own mailbox: capabilities, SETACL forms, GETACL, MYRIGHTS,
/// LISTRIGHTS, DELETEACL, and the refusals (other domain, unknown right, negative rights).
const COMMANDS: &str = r#"
FRIEND = ENV["FRIEND"]; STRANGER = ENV["STRANGER"]
c = imap()
status, lines = raw(c, "CAPABILITY")
assert " ACL " in lines[0] + " " and "RIGHTS=texk" in lines[0], lines
status, lines = raw(c, "MYRIGHTS INBOX")
assert status.split()[1] == "OK" and lines == ['* MYRIGHTS "INBOX" lrswipkxtea'], (status, lines)
status, lines = raw(c, "GETACL INBOX")
assert lines == [f'* ACL "INBOX" "{USER}" lrswipkxtea'], lines
status, lines = raw(c, f"SETACL INBOX {FRIEND} lr")
assert status.split()[1] == "OK", status
status, lines = raw(c, f'SETACL "INBOX" "{FRIEND}" +s')
assert status.split()[1] == "OK", status
status, lines = raw(c, "SETACL INBOX anyone l")
assert status.split()[1] == "OK", status
status, lines = raw(c, "GETACL INBOX")
assert lines == [f'* ACL "INBOX" "{USER}" lrswipkxtea "anyone" l "{FRIEND}" lrs'], lines
status, lines = raw(c, f"SETACL INBOX {FRIEND} -s")
status, lines = raw(c, "GETACL INBOX")
assert f'"{FRIEND}" lr ' in lines[0] + " ", lines
# Obsolete rights: c is k and x, d is x, t and e.
status, lines = raw(c, f"SETACL INBOX {FRIEND} lcd")
assert status.split()[1] == "OK", status
status, lines = raw(c, "GETACL INBOX")
assert f'"{FRIEND}" lkxte ' in lines[0] + " ", lines
status, lines = raw(c, f"LISTRIGHTS INBOX {FRIEND}")
assert lines == [f'* LISTRIGHTS "INBOX" "{FRIEND}" "" l r s w i p k x t e a'], lines
status, lines = raw(c, f"LISTRIGHTS INBOX {USER}")
assert lines == [f'* LISTRIGHTS "INBOX" "{USER}" lrswipkxtea'], lines
# Another domain's account cannot be granted anything.
status, lines = raw(c, f"SETACL INBOX {STRANGER} lr")
assert status.split()[1] == "NO" and "[NOPERM]" in status, status
# Unknown rights, negative rights, unknown accounts, the owner's own rights.
status, lines = raw(c, f"SETACL INBOX {FRIEND} lz")
assert status.split()[1] == "BAD", status
status, lines = raw(c, f"SETACL INBOX -{FRIEND} l")
assert status.split()[1] == "NO", status
status, lines = raw(c, "SETACL INBOX nobody@kermail.test l")
assert status.split()[1] == "NO" and "[NONEXISTENT]" in status, status
status, lines = raw(c, f"SETACL INBOX {USER} l")
assert status.split()[1] == "NO", status
status, lines = raw(c, "SETACL Nowhere anyone l")
assert status.split()[1] == "NO" and "[NONEXISTENT]" in status, status
status, lines = raw(c, "SETACL INBOX")
assert status.split()[1] == "BAD", status
status, lines = raw(c, f"DELETEACL INBOX {FRIEND}")
assert status.split()[1] == "OK", status
status, lines = raw(c, "DELETEACL INBOX anyone")
status, lines = raw(c, "GETACL INBOX")
assert lines == [f'* ACL "INBOX" "{USER}" lrswipkxtea'], lines
print("acl commands ok")
"#;

#[test]
fn acl_commands_answer_and_refuse_on_the_owner_mailbox() {
    let node = node();
    let out = py(&node, COMMANDS);
    assert!(out.contains("acl commands ok"), "{out}");
}

/// Nobody but the owner (or a holder of `a`) reads or changes an ACL; someone without any
/// right cannot even tell the mailbox exists; eve of another domain gets nothing from `anyone`.
const ADMIN_REFUSALS: &str = r#"
FRIEND = ENV["FRIEND"]; STRANGER = ENV["STRANGER"]
owner = imap()
ok(owner.create("Team"), "CREATE")
bob = imap(FRIEND)
eve = imap(STRANGER)
shared = f'"Other Users/{USER}/Team"'
for c in (bob, eve):
    for command in (f"MYRIGHTS {shared}", f"GETACL {shared}", f"SETACL {shared} {FRIEND} lra",
                    f"DELETEACL {shared} anyone", f"LISTRIGHTS {shared} {FRIEND}"):
        status, lines = raw(c, command)
        assert status.split()[1] == "NO" and "[NONEXISTENT]" in status, (command, status)
        assert lines == [], lines
status, lines = raw(owner, "SETACL Team anyone lr")
assert status.split()[1] == "OK", status
# Bob sees his rights (through anyone), but may not administer.
status, lines = raw(bob, f"MYRIGHTS {shared}")
assert lines == [f'* MYRIGHTS "Other Users/{USER}/Team" lr'], lines
for command in (f"GETACL {shared}", f"SETACL {shared} {FRIEND} +a", f"DELETEACL {shared} anyone"):
    status, lines = raw(bob, command)
    assert status.split()[1] == "NO" and "[NOPERM]" in status, (command, status)
# Eve is of another domain: anyone is not her.
status, lines = raw(eve, f"MYRIGHTS {shared}")
assert status.split()[1] == "NO" and "[NONEXISTENT]" in status, status
# With a, bob administers: he may grant within the domain.
status, lines = raw(owner, f"SETACL Team {FRIEND} lra")
status, lines = raw(bob, f"SETACL {shared} anyone lrs")
assert status.split()[1] == "OK", status
status, lines = raw(bob, f"GETACL {shared}")
assert '"anyone" lrs' in lines[0], lines
status, lines = raw(bob, f"SETACL {shared} {STRANGER} lr")
assert status.split()[1] == "NO" and "[NOPERM]" in status, status
print("acl refusals ok")
"#;

#[test]
fn acl_commands_refuse_accounts_without_the_admin_right() {
    let node = node();
    let out = py(&node, ADMIN_REFUSALS);
    assert!(out.contains("acl refusals ok"), "{out}");
}

const GRANT: &str = r#"
FRIEND = ENV["FRIEND"]
c = imap()
ok(c.create("Kept"), "CREATE")
status, lines = raw(c, f"SETACL Kept {FRIEND} lrsi")
assert status.split()[1] == "OK", status
print("granted")
"#;

const CHECK_KEPT: &str = r#"
FRIEND = ENV["FRIEND"]
c = imap()
status, lines = raw(c, "GETACL Kept")
assert lines == [f'* ACL "Kept" "{USER}" lrswipkxtea "{FRIEND}" lrsi'], lines
bob = imap(FRIEND)
status, lines = raw(bob, f'MYRIGHTS "Other Users/{USER}/Kept"')
assert lines == [f'* MYRIGHTS "Other Users/{USER}/Kept" lrsi'], lines
print("kept")
"#;

/// The ACL is replicated state: a restart (snapshot, then log replay) keeps it.
#[test]
fn acl_survives_a_node_restart() {
    let mut node = node();
    assert!(py(&node, GRANT).contains("granted"));
    node.restart();
    assert!(py(&node, CHECK_KEPT).contains("kept"));
}

/// Sharing a mailbox step by step: nothing before a grant; `lr` lets bob list, select,
/// fetch and search it but not store, expunge, append, copy or move (NOPERM), nor set
/// `\Seen` by reading; more rights let him; a revoke hides it again, even from his open
/// session. Eve of another domain never sees it.
const SHARING: &str = r#"
FRIEND = ENV["FRIEND"]; STRANGER = ENV["STRANGER"]
owner = imap()
ok(owner.create("Team"), "CREATE")
for n in range(3):
    ok(owner.append("Team", None, None, message(f"team {n}")), "APPEND")
ok(owner.append("INBOX", None, None, message("private")), "APPEND")
bob = imap(FRIEND)
eve = imap(STRANGER)
SHARED = f'"Other Users/{USER}/Team"'
PRIVATE = f'"Other Users/{USER}/INBOX"'

status, lines = raw(bob, "NAMESPACE")
assert lines == ['* NAMESPACE (("" "/")) (("Other Users/" "/")) NIL'], lines

def listed(c):
    status, lines = raw(c, 'LIST "" "*"')
    assert status.split()[1] == "OK", status
    return [l for l in lines if "Other Users" in l]

def expect(c, command, code):
    status, lines = raw(c, command)
    assert status.split()[1] == "NO" and f"[{code}]" in status, (command, status, lines)
    return lines

# Before any grant: nothing listed, and the mailbox looks like one that does not exist.
assert listed(bob) == [], listed(bob)
for c in (bob, eve):
    for command in (f"SELECT {SHARED}", f"EXAMINE {SHARED}", f"STATUS {SHARED} (MESSAGES)", f"SELECT {PRIVATE}"):
        expect(c, command, "NONEXISTENT")
    status, lines = raw(c, f"SELECT \"Other Users/nobody@kermail.test/Team\"")
    assert status.split()[1] == "NO" and "[NONEXISTENT]" in status, status
    expect(c, f"APPEND {SHARED} {{5+}}\r\nhello", "TRYCREATE")

# l only: listed, but not readable (NOPERM, it may be seen).
ok(owner._simple_command("SETACL", "Team", FRIEND, "l"), "SETACL")
assert listed(bob) == [
    '* LIST (\\Noselect \\HasChildren) "/" "Other Users"',
    f'* LIST (\\Noselect \\HasChildren) "/" "Other Users/{USER}"',
    f'* LIST (\\HasNoChildren) "/" "Other Users/{USER}/Team"',
], listed(bob)
expect(bob, f"SELECT {SHARED}", "NOPERM")
expect(bob, f"STATUS {SHARED} (MESSAGES)", "NOPERM")
assert listed(eve) == [], listed(eve)
# The owner's other mailboxes stay hidden.
expect(bob, f"SELECT {PRIVATE}", "NONEXISTENT")

# lr: select, fetch, search, status; no change of any kind.
ok(owner._simple_command("SETACL", "Team", FRIEND, "lr"), "SETACL")
status, lines = raw(bob, f"STATUS {SHARED} (MESSAGES UNSEEN)")
assert lines == [f'* STATUS "Other Users/{USER}/Team" (MESSAGES 3 UNSEEN 3)'], lines
status, lines = raw(bob, f"SELECT {SHARED}")
assert status.split()[1] == "OK" and "* 3 EXISTS" in lines, (status, lines)
status, lines = raw(bob, "FETCH 1:3 (BODY[HEADER.FIELDS (SUBJECT)])")
assert status.split()[1] == "OK", status
status, lines = raw(bob, "FETCH 1 BODY[]")
assert status.split()[1] == "OK", status
status, lines = raw(bob, "SEARCH SUBJECT \"team 2\"")
assert "* SEARCH 3" in lines, lines
# Reading without s left \Seen alone.
data = ok(owner.select("Team"), "SELECT")
data = ok(owner.fetch("1", "(FLAGS)"), "FETCH")
assert b"\\Seen" not in data[0], data
for command, code in (("STORE 1 +FLAGS (\\Seen)", "NOPERM"), ("STORE 1 +FLAGS (\\Deleted)", "NOPERM"),
                      ("STORE 1 +FLAGS (\\Flagged)", "NOPERM"), ("STORE 1 +FLAGS ($Work)", "NOPERM"),
                      ("STORE 1 FLAGS ()", "NOPERM"), ("STORE 1 -FLAGS (\\Seen)", "NOPERM"),
                      ("EXPUNGE", "NOPERM"), ("UID EXPUNGE 1", "NOPERM"), ("MOVE 1 INBOX", "CANNOT"),
                      (f"COPY 1 {SHARED}", "NOPERM"), (f"MOVE 1 {SHARED}", "NOPERM"),
                      (f"APPEND {SHARED} {{5+}}\r\nhello", "NOPERM")):
    expect(bob, command, code)
# Copying into bob's own mailbox would cross accounts: refused.
expect(bob, "COPY 1 INBOX", "CANNOT")
# Creating, deleting or renaming under Other Users is refused.
expect(bob, f'CREATE "Other Users/{USER}/Team/Sub"', "NOPERM")
expect(bob, f"DELETE {SHARED}", "NOPERM")
expect(bob, f'RENAME {SHARED} "Mine"', "NOPERM")
# CLOSE without e expunges nothing.
ok(owner.store("1", "+FLAGS", "(\\Deleted)"), "STORE")
status, lines = raw(bob, "CLOSE")
assert status.split()[1] == "OK", status
assert len(inbox_messages(owner, "Team")) == 3

# More rights: s, w, t, e, i.
ok(owner._simple_command("SETACL", "Team", FRIEND, "lrswtei"), "SETACL")
status, lines = raw(bob, f"SELECT {SHARED}")
assert status.split()[1] == "OK", status
status, lines = raw(bob, "STORE 2 +FLAGS (\\Seen $Work)")
assert status.split()[1] == "OK", status
# A replacement may take any flag away: with s, w and t it is allowed.
status, lines = raw(bob, "STORE 3 FLAGS (\\Answered)")
assert status.split()[1] == "OK", status
status, lines = raw(bob, f"APPEND {SHARED} (\\Flagged) {{{len(message('from bob'))}+}}\r\n" + message("from bob").decode())
assert status.split()[1] == "OK" and "APPENDUID" in status, status
status, lines = raw(bob, f"COPY 2 {SHARED}")
assert status.split()[1] == "OK", status
status, lines = raw(bob, "EXPUNGE")
assert status.split()[1] == "OK" and "* 1 EXPUNGE" in lines, lines
stored = inbox_messages(owner, "Team")
assert len(stored) == 4, stored
assert sorted(stored[0][1]) == ["$Work", "\\Seen"], stored

# Revoke: gone from LIST, refused to the open session and to a new SELECT.
status, lines = raw(owner, f"DELETEACL Team {FRIEND}")
assert status.split()[1] == "OK", status
assert listed(bob) == [], listed(bob)
expect(bob, "FETCH 1 (FLAGS)", "NOPERM")
# The open session hears of no more changes.
ok(owner.append("Team", None, None, message("after revoke")), "APPEND")
status, lines = raw(bob, "NOOP")
assert status.split()[1] == "OK" and lines == [], (status, lines)
expect(bob, "STORE 1 +FLAGS (\\Flagged)", "NOPERM")
expect(bob, f"SELECT {SHARED}", "NONEXISTENT")

# anyone: the whole domain, never eve.
ok(owner._simple_command("SETACL", "Team", "anyone", "lr"), "SETACL")
assert len(listed(bob)) == 3, listed(bob)
assert listed(eve) == [], listed(eve)
expect(eve, f"SELECT {SHARED}", "NONEXISTENT")
status, lines = raw(bob, f"EXAMINE {SHARED}")
assert status.split()[1] == "OK", status
print("sharing ok")
"#;

#[test]
fn shared_mailbox_access_follows_each_right() {
    let node = node();
    let out = py(&node, SHARING);
    assert!(out.contains("sharing ok"), "{out}");
}
