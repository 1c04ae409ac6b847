//! NOTIFY (RFC 5465) over real sockets: a session that asked for notifications is told about
//! changes made by other sessions and by SMTP delivery while it waits (no command, no IDLE)
//! and while it idles. Every wait reads with a deadline (the socket timeout and `expect`'s
//! clock); nothing sleeps.

use crate::harness::{Node, PY_IMAP_RAW};

/// `expect(c, pattern)` reads lines until one matches the regular expression and returns
/// (that line, every line read); it fails after `DEADLINE` seconds or if the server closes.
/// `append(c, mailbox, subject)` APPENDs a small message through imaplib.
const NOTIFY_HELPERS: &str = r#"
DEADLINE = 30.0

def watcher():
    c = imap()
    c.sock.settimeout(DEADLINE)
    return c

def expect(c, pattern, deadline=DEADLINE):
    end = time.monotonic() + deadline
    seen = []
    while True:
        if time.monotonic() > end:
            raise SystemExit(f"no line matching {pattern!r} within {deadline}s; read {seen!r}")
        try:
            line = c.readline()
        except socket.timeout:
            raise SystemExit(f"no line matching {pattern!r} within {deadline}s; read {seen!r}")
        if not line:
            raise SystemExit(f"server closed the session; read {seen!r}")
        line = line.decode(errors="replace").rstrip("\r\n")
        seen.append(line)
        if re.search(pattern, line):
            return line, seen

def append(c, mailbox, subject):
    ok(c.append(mailbox, None, None, message(subject)), "APPEND")
"#;

fn run(node: &Node, script: &str) -> String {
    node.py(&format!("{PY_IMAP_RAW}\n{NOTIFY_HELPERS}\n{script}"), &[])
}

#[test]
fn a_waiting_session_gets_status_when_another_session_appends_elsewhere() {
    let node = Node::with_account();
    let out = run(
        &node,
        r#"
other = imap()
ok(other.create("Lists"), "CREATE")
c = watcher()
status, lines = raw(c, "CAPABILITY")
assert " NOTIFY" in lines[0], lines
# The STATUS indicator: the current STATUS of every watched mailbox before the OK.
status, lines = raw(c, "NOTIFY SET STATUS (personal (MessageNew MessageExpunge FlagChange))")
assert " OK " in status, (status, lines)
assert '* STATUS "INBOX" (MESSAGES 0 UIDNEXT 1 ' in "\n".join(lines), lines
assert any(l.startswith('* STATUS "Lists" (MESSAGES 0 UIDNEXT 1 ') for l in lines), lines
# The watcher sends nothing more: the notification comes on its own.
append(other, "Lists", "to the list")
line, _ = expect(c, r'^\* STATUS "Lists"')
assert re.match(r'^\* STATUS "Lists" \(MESSAGES 1 UIDNEXT 2 UIDVALIDITY \d+ UNSEEN 1\)$', line), line
# A flag change (FlagChange asked for): the new UNSEEN.
ok(other.select("Lists"), "SELECT")
ok(other.store("1", "+FLAGS", "(\\Seen)"), "STORE")
line, _ = expect(c, r'^\* STATUS "Lists"')
assert "MESSAGES 1 UIDNEXT 2" in line and "UNSEEN 0" in line, line
# An expunge elsewhere is a STATUS too.
ok(other.store("1", "+FLAGS", "(\\Deleted)"), "STORE")
ok(other.expunge(), "EXPUNGE")
line, _ = expect(c, r'^\* STATUS "Lists"')
assert "MESSAGES 0 UIDNEXT 2" in line, line
print("ok")
"#,
    );
    assert_eq!(out.trim(), "ok");
}

#[test]
fn mail_delivered_over_smtp_triggers_a_status() {
    let node = Node::with_account();
    let out = run(
        &node,
        r#"
c = watcher()
status, lines = raw(c, "ENABLE CONDSTORE")
assert " OK " in status, status
status, lines = raw(c, "NOTIFY SET (inboxes (MessageNew MessageExpunge))")
assert " OK " in status and not lines, (status, lines)
s = smtp()
assert s.sendmail("bob@example.org", [USER], message("by smtp")) == {}
s.quit()
line, _ = expect(c, r'^\* STATUS "INBOX"')
assert "MESSAGES 1 UIDNEXT 2" in line and "UNSEEN 1" in line, line
# CONDSTORE is on: HIGHESTMODSEQ comes too.
assert re.search(r"HIGHESTMODSEQ [1-9]\d*\)$", line), line
print("ok")
"#,
    );
    assert_eq!(out.trim(), "ok");
}

#[test]
fn the_selected_mailbox_gets_exists_fetch_flags_and_expunge_as_they_happen() {
    let node = Node::with_account();
    let out = run(
        &node,
        r#"
other = imap()
append(other, "INBOX", "already there")
c = watcher()
ok(c.select("INBOX"), "SELECT")
status, lines = raw(c, "NOTIFY SET (selected (MessageNew (UID BODY.PEEK[HEADER.FIELDS (SUBJECT)]) MessageExpunge FlagChange))")
assert " OK " in status, (status, lines)
append(other, "INBOX", "pushed")
_, lines = expect(c, r"^Subject: pushed")
assert "* 2 EXISTS" in lines, lines
fetch = [l for l in lines if " FETCH " in l]
assert fetch and fetch[0].startswith("* 2 FETCH (UID 2 BODY[HEADER.FIELDS (SUBJECT)] {"), lines
# A notification's FETCH must not set \Seen (the items were made PEEK).
ok(other.select("INBOX"), "SELECT")
data = ok(other.uid("FETCH", "2", "(FLAGS)"), "FETCH")
assert b"\\Seen" not in data[0], data
# A flag change by the other session.
ok(other.uid("STORE", "1", "+FLAGS", "(\\Flagged)"), "STORE")
line, _ = expect(c, r"^\* 1 FETCH \(FLAGS")
assert "\\Flagged" in line, line
# An expunge: reported at once with the `selected` filter.
ok(other.uid("STORE", "1", "+FLAGS", "(\\Deleted)"), "STORE")
ok(other.expunge(), "EXPUNGE")
expect(c, r"^\* 1 EXPUNGE$")
status, lines = raw(c, "NOOP")
assert " OK " in status and not any("EXPUNGE" in l for l in lines), lines
print("ok")
"#,
    );
    assert_eq!(out.trim(), "ok");
}

#[test]
fn an_idling_session_gets_status_of_other_mailboxes() {
    let node = Node::with_account();
    let out = run(
        &node,
        r#"
other = imap()
ok(other.create("Lists"), "CREATE")
c = watcher()
status, lines = raw(c, "NOTIFY SET (selected (MessageNew MessageExpunge)) (personal (MessageNew MessageExpunge))")
assert " OK " in status, (status, lines)
ok(c.select("INBOX"), "SELECT")
tag = c._new_tag().decode()
c.send(f"{tag} IDLE\r\n".encode())
expect(c, r"^\+")
append(other, "Lists", "while idling")
line, _ = expect(c, r'^\* STATUS "Lists"')
assert "MESSAGES 1" in line, line
# The selected mailbox is told as EXISTS, not STATUS.
append(other, "INBOX", "into the selected one")
_, lines = expect(c, r"^\* 1 EXISTS$")
assert not any('STATUS "INBOX"' in l for l in lines), lines
c.send(b"DONE\r\n")
line, _ = expect(c, "^" + tag + " ")
assert " OK " in line, line
print("ok")
"#,
    );
    assert_eq!(out.trim(), "ok");
}

#[test]
fn mailbox_create_rename_delete_and_subscriptions_are_listed() {
    let node = Node::with_account();
    let out = run(
        &node,
        r#"
other = imap()
c = watcher()
status, lines = raw(c, "NOTIFY SET (personal (MailboxName SubscriptionChange))")
assert " OK " in status, (status, lines)
ok(other.create("Projects"), "CREATE")
expect(c, r'^\* LIST \(\) "/" "Projects"$')
ok(other.rename("Projects", "Done"), "RENAME")
expect(c, r'^\* LIST \(\) "/" "Done" \("OLDNAME" \("Projects"\)\)$')
ok(other.subscribe("Done"), "SUBSCRIBE")
expect(c, r'^\* LIST \(\\Subscribed\) "/" "Done"$')
ok(other.unsubscribe("Done"), "UNSUBSCRIBE")
expect(c, r'^\* LIST \(\) "/" "Done"$')
ok(other.delete("Done"), "DELETE")
expect(c, r'^\* LIST \(\\NonExistent\) "/" "Done"$')
print("ok")
"#,
    );
    assert_eq!(out.trim(), "ok");
}

#[test]
fn notify_none_stops_the_notifications() {
    let node = Node::with_account();
    let out = run(
        &node,
        r#"
other = imap()
ok(other.create("Lists"), "CREATE")
c = watcher()
status, lines = raw(c, "NOTIFY SET (personal (MessageNew MessageExpunge))")
assert " OK " in status, (status, lines)
append(other, "Lists", "first")
expect(c, r'^\* STATUS "Lists" \(MESSAGES 1 ')
status, lines = raw(c, "NOTIFY NONE")
assert " OK " in status, (status, lines)
append(other, "Lists", "second")
# The change was applied before the APPEND's OK: a session still notifying would have
# written its STATUS by the end of the second NOOP (the first may overtake it).
seen = []
for _ in range(2):
    status, lines = raw(c, "NOOP")
    assert " OK " in status, status
    seen += lines
assert not any("STATUS" in l for l in seen), seen
print("ok")
"#,
    );
    assert_eq!(out.trim(), "ok");
}

#[test]
fn unsupported_events_are_refused_with_badevent_and_broken_rules_with_bad() {
    let node = Node::with_account();
    let out = run(
        &node,
        r#"
c = watcher()
status, lines = raw(c, "NOTIFY SET (personal (AnnotationChange))")
assert re.match(r"\S+ NO \[BADEVENT \(MessageNew MessageExpunge FlagChange MailboxName SubscriptionChange\)\]", status), status
status, lines = raw(c, "NOTIFY SET (selected (MessageNew))")
assert " BAD " in status, status
status, lines = raw(c, "NOTIFY SET (inboxes (MessageNew (UID) MessageExpunge))")
assert " BAD " in status, status
status, lines = raw(c, "NOTIFY SET (nowhere (MessageNew MessageExpunge))")
assert " BAD " in status, status
# The session is still usable and NOTIFY works after the refusals.
status, lines = raw(c, "NOTIFY SET (personal (MailboxName))")
assert " OK " in status, status
print("ok")
"#,
    );
    assert_eq!(out.trim(), "ok");
}

#[test]
fn a_session_too_far_behind_gets_notificationoverflow_and_notify_goes_off() {
    let node = Node::with_account();
    let out = run(
        &node,
        r#"
other = imap()
ok(other.create("Lists"), "CREATE")
append(other, "Lists", "flag me")
append(other, "INBOX", "flag me too")
c = watcher()
status, lines = raw(c, "NOTIFY SET (mailboxes Lists (MessageNew MessageExpunge FlagChange))")
assert " OK " in status, (status, lines)
n_changes = 300

def changes_while_the_watcher_is_inside_a_command(tag, mailbox):
    # The watcher's APPEND literal has not arrived yet: it cannot be told anything, so the
    # changes pile up.
    c.send(f"{tag} APPEND INBOX {{5}}\r\n".encode())
    expect(c, r"^\+")
    ok(other.select(mailbox), "SELECT")
    burst = b"".join(
        f"F{i} UID STORE 1 {'+' if i % 2 == 0 else '-'}FLAGS (\\Seen)\r\n".encode()
        for i in range(n_changes))
    other.send(burst)
    for i in range(n_changes):
        read_tagged(other, f"F{i}")
    c.send(b"hello\r\n")

# Changes of a mailbox the watcher did not ask about do not count.
changes_while_the_watcher_is_inside_a_command("W0", "INBOX")
_, lines = expect(c, r"^W0 OK")
status, more = raw(c, "NOOP")
assert not any("NOTIFICATIONOVERFLOW" in l for l in lines + more), lines + more
# Changes of the watched one do.
changes_while_the_watcher_is_inside_a_command("W1", "Lists")
_, lines = expect(c, r"^\* OK \[NOTIFICATIONOVERFLOW\]")
assert any(l.startswith("W1 OK") for l in lines), lines
assert not any("STATUS" in l for l in lines), lines
# NOTIFY is off now.
append(other, "Lists", "after the overflow")
seen = []
for _ in range(2):
    status, lines = raw(c, "NOOP")
    seen += lines
assert not any("STATUS" in l for l in seen), seen
print("ok")
"#,
    );
    assert_eq!(out.trim(), "ok");
}

#[test]
fn selected_delayed_holds_expunges_for_a_command_that_may_report_them() {
    let node = Node::with_account();
    let out = run(
        &node,
        r#"
other = imap()
append(other, "INBOX", "one")
append(other, "INBOX", "two")
c = watcher()
ok(c.select("INBOX"), "SELECT")
status, lines = raw(c, "NOTIFY SET (selected-delayed (MessageNew MessageExpunge))")
assert " OK " in status, (status, lines)
ok(other.select("INBOX"), "SELECT")
ok(other.uid("STORE", "1", "+FLAGS", "(\\Deleted)"), "STORE")
ok(other.expunge(), "EXPUNGE")
append(other, "INBOX", "three")
# The arrival is told at once; the expunged message keeps its sequence number meanwhile.
_, lines = expect(c, r"^\* 3 EXISTS$")
assert not any("EXPUNGE" in l for l in lines), lines
status, lines = raw(c, "NOOP")
assert "* 1 EXPUNGE" in lines, lines
print("ok")
"#,
    );
    assert_eq!(out.trim(), "ok");
}

/// Cluster id offset of the multi-node test (`KERMAIL_IT_CLUSTER_ID_BASE` + 20).
const CLUSTER_OFFSET: u32 = 20;

/// Changes applied through the cluster log notify a session on another node: an APPEND on
/// one node and an SMTP delivery on a third both reach a NOTIFY session that sends nothing.
#[test]
fn changes_on_other_nodes_reach_a_waiting_session() {
    let Some(cluster) = crate::cluster::Cluster::up(CLUSTER_OFFSET, 3, None) else {
        return;
    };
    cluster.account();
    let out = cluster.py(
        &format!(
            "{PY_IMAP_RAW}\n{}",
            r#"
def expect(c, pattern, deadline=60.0):
    end = time.monotonic() + deadline
    seen = []
    while time.monotonic() < end:
        try:
            line = c.readline()
        except socket.timeout:
            break
        if not line:
            raise SystemExit(f"server closed the session; read {seen!r}")
        line = line.decode(errors="replace").rstrip("\r\n")
        seen.append(line)
        if re.search(pattern, line):
            return line
    raise SystemExit(f"no line matching {pattern!r} within {deadline}s; read {seen!r}")

names = sorted(NODES)
watcher = wait_until(lambda: imap(names[1]), f"login on {names[1]}")
watcher.sock.settimeout(60)
status, lines = raw(watcher, "NOTIFY SET STATUS (inboxes (MessageNew MessageExpunge))")
assert " OK " in status, (status, lines)
assert any(l.startswith('* STATUS "INBOX" (MESSAGES 0 ') for l in lines), lines
writer = wait_until(lambda: imap(names[0]), f"login on {names[0]}")
body = (f"From: bob@example.org\r\nTo: {USER}\r\nSubject: far\r\n\r\nfrom another node\r\n").encode()
ok(writer.append("INBOX", None, None, body), "APPEND")
line = expect(watcher, r'^\* STATUS "INBOX"')
assert "MESSAGES 1 UIDNEXT 2" in line, line
s = wait_until(lambda: smtp(names[2]), f"SMTP on {names[2]}")
s.sendmail("bob@example.org", [USER], body)
s.quit()
line = expect(watcher, r'^\* STATUS "INBOX"')
assert "MESSAGES 2 UIDNEXT 3" in line, line
print("ok")
"#
        ),
        &[],
    );
    assert_eq!(out.trim(), "ok", "{out}");
}
