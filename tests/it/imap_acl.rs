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
