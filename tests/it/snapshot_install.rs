//! A follower that missed so much that the leader's log no longer holds what it lacks gets a
//! snapshot: metadata and body references only; it fetches from its peers the bodies it does
//! not have (and only those), then installs, and serves every message with the same UIDs.
//!
//! Three nodes on three sites (`scripts/local-cluster`, root only, see `cluster.rs`), snapshots
//! every 40 entries and 5 entries kept after one, so that the leader purges its log past the
//! cut node's index within a few dozen deliveries.

use crate::cluster::Cluster;

/// Cluster id offset of this test (`KERMAIL_IT_CLUSTER_ID_BASE` + 11).
const OFFSET: u32 = 11;
/// Messages delivered before the cut (the cut node has their bodies).
const BEFORE: usize = 20;
/// Messages delivered while the node is cut off (the bodies it lacks).
const DURING: usize = 150;
/// Size of each message's body text (random, so it does not compress much).
const BODY_BYTES: usize = 16 * 1024;

#[test]
fn cut_follower_installs_a_snapshot_fetching_only_the_bodies_it_lacks() {
    let Some(cluster) = Cluster::up_with(OFFSET, 3, None, |_| {
        Some("[cluster]\nsnapshot_after_logs = 40\nlogs_kept_after_snapshot = 5\n".to_string())
    }) else {
        return;
    };
    cluster.account();
    let leader = cluster.leader("n1");
    let victim = ["n1", "n2", "n3"]
        .into_iter()
        .find(|n| *n != leader)
        .expect("a follower")
        .to_string();
    let out = cluster.py(
        r#"
import base64, random
victim = POS[0]; leader = POS[1]
names = sorted(NODES)
majority = [n for n in names if n != victim]
site = NODES[victim]["site"]
BEFORE = int(POS[2]); DURING = int(POS[3]); BODY = int(POS[4])
rng = random.Random(7)
def big(tag):
    text = base64.b64encode(rng.randbytes(BODY * 3 // 4)).decode()
    lines = "\r\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    return (f"From: Bob <bob@example.org>\r\nTo: {USER}\r\nSubject: {tag}\r\n"
            f"Date: Mon, 2 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{tag}@example.org>\r\n\r\n"
            f"{lines}\r\n").encode()
def deliver(node, tags):
    s = smtp(node)
    for tag in tags:
        assert s.sendmail("bob@example.org", [USER], big(tag)) == {}, tag
    s.quit()
deliver(leader, [f"before-{i}" for i in range(BEFORE)])
wait_until(lambda: all(message_count(n) == BEFORE for n in names), "the first messages everywhere")
local_cluster("cut", site)
# One message per SMTP transaction, one after the other: one log entry each at least, so the
# leader snapshots several times and purges its log far past the cut node's last index.
deliver(leader, [f"during-{i}" for i in range(DURING)])
st = status(leader)
print("leader status after the cut deliveries:", json.dumps(st)[:400], file=sys.stderr)
local_cluster("heal", site)
want = view(leader)
assert len(want[1]) == BEFORE + DURING, len(want[1])
wait_until(lambda: view(victim) == want, "the healed node to serve every message with the same UIDs", 240)
# Raft still runs there: it takes mail again, and the others see it.
wait_until(lambda: smtp(victim).sendmail("bob@example.org", [USER], message("after-heal")) == {},
           "a 250 from the healed node", 120)
wait_until(lambda: all(message_count(n) == BEFORE + DURING + 1 for n in names), "after-heal everywhere")
# Every body is readable on the healed node (not only the headers).
c = imap(victim)
ok(c.select("INBOX", readonly=True))
typ, data = c.uid("FETCH", "1:*", "(RFC822.SIZE BODY.PEEK[])")
assert typ == "OK", data
bodies = [item[1] for item in data if isinstance(item, tuple)]
assert len(bodies) == BEFORE + DURING + 1, len(bodies)
for b in bodies:
    assert b"Subject:" in b and len(b) > 100, b[:200]
c.logout()
print(BEFORE + DURING)
"#,
        &[
            &victim,
            &leader,
            &BEFORE.to_string(),
            &DURING.to_string(),
            &BODY_BYTES.to_string(),
        ],
    );
    eprintln!("snapshot install: {out}");
    let log = std::fs::read_to_string(cluster.node_dir(&victim).join("kermail.log"))
        .expect("the healed node's log");
    assert!(
        !log.contains("quit RaftCore::main"),
        "Raft stopped on the healed node"
    );
    assert!(
        log.contains("snapshot installed"),
        "the healed node installed no snapshot (the leader's log still reached it?)"
    );
    // The fetch: some bodies, at most those delivered during the cut, and about their size.
    let fetched: Vec<(u64, u64)> = log
        .lines()
        .filter(|l| l.contains("snapshot bodies fetched"))
        .map(|l| (field(l, "bodies="), field(l, "bytes=")))
        .collect();
    eprintln!("fetch rounds on {victim}: {fetched:?}");
    let bodies: u64 = fetched.iter().map(|f| f.0).sum();
    let bytes: u64 = fetched.iter().map(|f| f.1).sum();
    assert!(bodies > 0, "no body was fetched: {fetched:?}");
    assert!(
        bodies <= DURING as u64,
        "fetched {bodies} bodies, more than the {DURING} the node lacked"
    );
    // Stored (compressed) bodies: at most the raw size of what was missing, and each fetched
    // body is a real one (base64 compresses to about 3/4).
    let raw_max = bodies * (BODY_BYTES as u64 + 1024);
    assert!(
        bytes <= raw_max,
        "fetched {bytes} bytes for {bodies} bodies (at most {raw_max})"
    );
    assert!(
        bytes >= bodies * (BODY_BYTES as u64 / 2),
        "fetched {bytes} bytes for {bodies} bodies: too few"
    );
}

/// The number after `key` in a tracing line (`key=123`).
fn field(line: &str, key: &str) -> u64 {
    let at = line
        .find(&format!(" {key}"))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"));
    line[at + 1 + key.len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap_or_else(|e| panic!("{key} in {line:?}: {e}"))
}
