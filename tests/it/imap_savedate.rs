//! SAVEDATE (RFC 8514) over real sockets (Python's imaplib): the FETCH item, the SAVEDBEFORE /
//! SAVEDON / SAVEDSINCE / SAVEDATESUPPORTED search keys, save dates kept across a restart
//! from a snapshot, and the same save dates on every node of a cluster.

use std::time::Duration;

use crate::harness::{wait_for, Node, PY_IMAP_RAW};

/// Cluster id offset of the cluster test (`KERMAIL_IT_CLUSTER_ID_BASE` + 19).
const CLUSTER_OFFSET: u32 = 19;
/// Snapshots this often in the single-node test, so that a restart restores one.
const SNAPSHOT_AFTER_LOGS: u32 = 10;
/// How long a snapshot may take to appear after enough log entries.
const SNAPSHOT_DEADLINE: Duration = Duration::from_secs(60);

/// `savedates(c, mailbox)`: {uid: (SAVEDATE seconds or None, INTERNALDATE seconds)} read
/// with a raw `UID FETCH 1:* (SAVEDATE INTERNALDATE)`; `wait_next_second(t)`: polls the
/// clock (with a deadline) until a whole second after `t` has begun, so that a later save
/// has a later save date.
const SAVEDATE_HELPERS: &str = r#"
from datetime import datetime

def seconds(text):
    return int(datetime.strptime(text, "%d-%b-%Y %H:%M:%S %z").timestamp())

def savedates(c, mailbox):
    ok(c.select(mailbox, readonly=True), "SELECT")
    status, lines = raw(c, "UID FETCH 1:* (SAVEDATE INTERNALDATE)")
    assert status.split()[1] == "OK", (status, lines)
    out = {}
    for line in lines:
        if " FETCH " not in line:
            continue
        uid = int(re.search(r"UID (\d+)", line).group(1))
        saved = re.search(r'SAVEDATE (NIL|"([^"]+)")', line)
        assert saved, line
        internal = re.search(r'INTERNALDATE "([^"]+)"', line).group(1)
        out[uid] = (None if saved.group(1) == "NIL" else seconds(saved.group(2)),
                    seconds(internal))
    return out

def wait_next_second(t):
    end = time.monotonic() + 10
    while int(time.time()) <= t:
        assert time.monotonic() < end, "the clock does not advance"
        time.sleep(0.02)

def search(c, command):
    status, lines = raw(c, command)
    assert status.split()[1] == "OK", (command, status, lines)
    found = [l for l in lines if l.startswith("* SEARCH") or l.startswith("* ESEARCH")
             or l.startswith("* SORT")]
    assert len(found) == 1, (command, lines)
    return found[0]

def uids(line):
    return sorted(int(w) for w in line.split()[2:])

def day(t):
    return time.strftime("%d-%b-%Y", time.gmtime(t))
"#;

/// APPEND with an old internal date, a delivery, then COPY and MOVE a second later: each
/// message's save date is the time it was saved into its mailbox; the keys select by it.
const SAVE_AND_SEARCH: &str = r#"
c = imap()
status, lines = raw(c, "CAPABILITY")
assert " SAVEDATE" in lines[0], lines
ok(c.create("Later"), "CREATE")
before = time.time()
ok(c.append("INBOX", None, '"01-Jan-2001 00:00:00 +0000"', message("appended")), "APPEND")
after = time.time()
s = smtp()
assert s.sendmail("bob@example.org", [USER], message("delivered")) == {}
s.quit()
inbox = savedates(c, "INBOX")
assert sorted(inbox) == [1, 2], inbox
saved, internal = inbox[1]
# Saved now, not at the old internal date the client gave.
assert int(before) - 1 <= saved <= after + 1, (before, saved, after)
assert internal == seconds("01-Jan-2001 00:00:00 +0000"), inbox
assert saved - internal > 10 * 365 * 86400, inbox
# A delivery is saved when it is received.
assert inbox[2][0] is not None and inbox[2][0] >= saved, inbox
assert inbox[2][0] == inbox[2][1], inbox

# COPY and MOVE in a later second: the new copies carry the later time.
wait_next_second(max(t for t, _ in inbox.values()))
ok(c.select("INBOX"), "SELECT")
status, lines = raw(c, "UID COPY 1 Later")
assert status.split()[1] == "OK", status
status, lines = raw(c, "UID MOVE 2 Later")
assert status.split()[1] == "OK", status
later = savedates(c, "Later")
assert sorted(later) == [1, 2], later
assert later[1][0] > inbox[1][0], (later, inbox)
assert later[1][1] == inbox[1][1], (later, inbox)
assert later[2][0] > inbox[2][0], (later, inbox)
# The original keeps its save date.
assert savedates(c, "INBOX") == {1: inbox[1]}, savedates(c, "INBOX")

# SEARCH by save date, in the save dates' own (UTC) days.
ok(c.select("INBOX"), "SELECT")
d = day(inbox[1][0])
next_day = day(inbox[1][0] + 86400)
assert uids(search(c, f"SEARCH SAVEDON {d}")) == [1]
assert uids(search(c, f'SEARCH SAVEDSINCE "{d}"')) == [1]
# The internal date is 2001: SINCE does not find what SAVEDSINCE does.
assert uids(search(c, f"SEARCH SINCE {d}")) == []
assert uids(search(c, f"SEARCH ON 1-Jan-2001")) == [1]
assert uids(search(c, f"SEARCH SAVEDON 1-Jan-2001")) == []
assert uids(search(c, f"SEARCH SAVEDBEFORE {d}")) == []
assert uids(search(c, f"SEARCH SAVEDBEFORE {next_day}")) == [1]
assert uids(search(c, f"SEARCH NOT SAVEDSINCE {next_day}")) == [1]
assert uids(search(c, "SEARCH SAVEDATESUPPORTED")) == [1]
assert uids(search(c, f"UID SEARCH OR SAVEDON 1-Jan-2001 SAVEDON {d}")) == [1]
# A key name as another key's argument is that argument.
assert uids(search(c, "SEARCH SUBJECT SAVEDON")) == []
assert uids(search(c, 'SEARCH SUBJECT "appended" SAVEDATESUPPORTED')) == [1]
# With ESEARCH's RETURN and in SORT.
assert search(c, f"SEARCH RETURN (COUNT) SAVEDSINCE {d}").endswith("COUNT 1"), \
    search(c, f"SEARCH RETURN (COUNT) SAVEDSINCE {d}")
ok(c.select("Later"), "SELECT")
assert uids(search(c, f"SORT (REVERSE ARRIVAL) UTF-8 SAVEDSINCE {d}")) == [1, 2]
assert search(c, f"SORT (REVERSE ARRIVAL) UTF-8 SAVEDSINCE {d}") == "* SORT 2 1"
# A malformed date is a BAD, not a match.
for bad in ["SAVEDON 31-Feb-2026", "SAVEDSINCE", "SAVEDBEFORE yesterday"]:
    status, lines = raw(c, f"SEARCH {bad}")
    assert status.split()[1] == "BAD", (bad, status)
# SAVEDATE alone, and among other items, in FETCH.
status, lines = raw(c, "FETCH 1 SAVEDATE")
assert status.split()[1] == "OK" and "SAVEDATE \"" in lines[0], (status, lines)
status, lines = raw(c, "FETCH 1:2 (FLAGS SAVEDATE RFC822.SIZE)")
fetched = [l for l in lines if " FETCH " in l]
assert status.split()[1] == "OK" and len(fetched) == 2, (status, lines)
assert all("SAVEDATE \"" in l and "RFC822.SIZE" in l for l in fetched), fetched
print(json.dumps({m: savedates(c, m) for m in ["INBOX", "Later"]}, sort_keys=True))
c.logout()
"#;

/// Save dates as the node gives them now.
const READ_BACK: &str = r#"
c = imap()
print(json.dumps({m: savedates(c, m) for m in ["INBOX", "Later"]}, sort_keys=True))
c.logout()
"#;

/// Many small log entries (flag changes), so that a snapshot follows the saves.
const MORE_ENTRIES: &str = r#"
c = imap()
ok(c.select("INBOX"), "SELECT")
for i in range(int(POS[0])):
    ok(c.uid("STORE", "1", "+FLAGS" if i % 2 == 0 else "-FLAGS", r"(\Flagged)"), "STORE")
c.logout()
"#;

fn snapshots_written(node: &Node) -> usize {
    node.stderr().matches("snapshot metadata written").count()
}

#[test]
fn save_dates_are_fetched_searched_and_kept_across_a_restart() {
    let mut node = Node::create();
    let mut config = std::fs::read_to_string(&node.config).expect("read config");
    config.push_str(&format!(
        "[cluster]\nsnapshot_after_logs = {SNAPSHOT_AFTER_LOGS}\nlogs_kept_after_snapshot = 0\n"
    ));
    std::fs::write(&node.config, config).expect("write config");
    node.spawn();
    node.add_account(crate::harness::USER, crate::harness::PASSWORD);
    let helpers = format!("{PY_IMAP_RAW}\n{SAVEDATE_HELPERS}");
    let saved = node.py(&format!("{helpers}\n{SAVE_AND_SEARCH}"), &[]);
    let saved = saved.trim().to_string();
    assert!(saved.contains("\"Later\""), "{saved}");

    // A snapshot taken after the saves (the log before it is purged), then a restart that
    // restores it: the save dates come back from the snapshot's message chunks.
    let before = snapshots_written(&node);
    let entries = (2 * SNAPSHOT_AFTER_LOGS).to_string();
    node.py(MORE_ENTRIES, &[&entries]);
    wait_for("a snapshot after the saves", SNAPSHOT_DEADLINE, || {
        (snapshots_written(&node) > before).then_some(())
    });
    node.restart();
    let restored = node.py(&format!("{helpers}\n{READ_BACK}"), &[]);
    assert_eq!(
        restored.trim(),
        saved,
        "save dates changed across the restart"
    );
}

/// The proposer chooses the save time: every replica gives the same SAVEDATE for every
/// message, whichever node saved it.
#[test]
fn save_dates_are_the_same_on_every_node() {
    let Some(cluster) = crate::cluster::Cluster::up(CLUSTER_OFFSET, 3, None) else {
        return;
    };
    cluster.account();
    let out = cluster.py(
        &format!(
            "{PY_IMAP_RAW}\n{SAVEDATE_HELPERS}\n{}",
            r#"
names = sorted(NODES)
c = imap(names[0])
ok(c.create("Later"), "CREATE")
ok(c.append("INBOX", None, '"01-Jan-2001 00:00:00 +0000"', message("appended")), "APPEND")
first = savedates(c, "INBOX")
c.logout()
assert first[1][0] is not None, first
wait_next_second(first[1][0])
# The COPY goes through another node.
c = wait_until(lambda: imap(names[1]), f"login on {names[1]}")
wait_until(lambda: 1 in savedates(c, "INBOX"), f"the message on {names[1]}")
ok(c.select("INBOX"), "SELECT")
status, lines = raw(c, "UID COPY 1 Later")
assert status.split()[1] == "OK", status
c.logout()
def both(n):
    c = imap(n)
    try:
        view = {m: savedates(c, m) for m in ["INBOX", "Later"]}
    finally:
        c.logout()
    return view if view["INBOX"] and view["Later"] else None
views = {n: wait_until(lambda: both(n), f"both mailboxes on {n}") for n in names}
reference = views[names[0]]
for n in names:
    assert views[n] == reference, f"{n} differs: {views[n]} vs {reference}"
assert reference["Later"][1][0] > reference["INBOX"][1][0], reference
assert reference["Later"][1][1] == reference["INBOX"][1][1], reference
print(json.dumps(reference, sort_keys=True))
"#
        ),
        &[],
    );
    assert!(out.contains("Later"), "{out}");
}
