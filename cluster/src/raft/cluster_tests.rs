//! Multi-node tests: several clusters in one process, each with its own mesh on a loopback
//! port, joined through the real invite and join path. Every wait is on a condition with a
//! deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::{ClusterConfig, RaftTimings};
use super::membership::JoinPhase;
use super::node::{Cluster, ClusterRole, ProposeError};
use super::tests::{loopback_mesh, MapApp};

/// Longest wait for anything in these tests (joins, elections on a loaded machine).
const DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(20);

struct TestNode {
    _dir: tempfile::TempDir,
    cluster: Cluster,
    app: Arc<MapApp>,
}

fn timings() -> RaftTimings {
    RaftTimings {
        propose_timeout_ms: 3_000,
        ..RaftTimings::lan()
    }
}

async fn start_node(name: &str, site: &str, timings: RaftTimings) -> TestNode {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = ClusterConfig {
        data_dir: dir.path().to_path_buf(),
        name: name.to_string(),
        site: site.to_string(),
        raft: timings,
        mesh: loopback_mesh(),
        ..Default::default()
    };
    let app = Arc::new(MapApp::default());
    let cluster = Cluster::open(config, app.clone()).await.expect("open");
    TestNode {
        _dir: dir,
        cluster,
        app,
    }
}

/// Waits until `condition` holds, panicking with `what` after [`DEADLINE`].
async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// Invites `name` through `inviter`, starts a fresh node and joins it; waits until done.
async fn join_new(inviter: &Cluster, name: &str, site: &str, learner: bool) -> TestNode {
    let token = inviter.invite(name, site, learner).await.expect("invite");
    let node = start_node("fresh", "nowhere", timings()).await;
    node.cluster.join(&token).await.expect("join starts");
    let cluster = node.cluster.clone();
    wait_for(&format!("{name} to join"), || {
        cluster
            .join_report()
            .is_some_and(|r| r.phase == JoinPhase::Done)
    })
    .await;
    let status = node.cluster.status();
    assert_eq!(status.name, name);
    assert_eq!(status.site, site);
    node
}

async fn form_cluster(n: usize) -> Vec<TestNode> {
    let first = start_node("n1", "s1", timings()).await;
    let mut nodes = vec![first];
    for i in 2..=n {
        let node = join_new(&nodes[0].cluster, &format!("n{i}"), &format!("s{i}"), false).await;
        nodes.push(node);
    }
    nodes
}

fn leader_index(nodes: &[TestNode]) -> Option<usize> {
    nodes.iter().position(|n| {
        let s = n.cluster.status();
        s.role == ClusterRole::Leader && s.leader == Some(s.node_id)
    })
}

/// Three nodes: writes on every node (followers forward to the leader) are visible on the node
/// that wrote them as soon as `propose` returns, and every replica ends up identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_replicate_forwarded_writes_with_read_your_writes() {
    let nodes = form_cluster(3).await;
    let status = nodes[0].cluster.status();
    assert_eq!(status.membership.iter().filter(|m| m.voter).count(), 3);
    for round in 0..5 {
        for (i, node) in nodes.iter().enumerate() {
            let key = format!("k{i}-{round}");
            node.cluster
                .propose(format!("{key}=v").into_bytes())
                .await
                .expect("propose");
            assert_eq!(
                node.app.snapshot_of_map().get(&key).map(String::as_str),
                Some("v"),
                "node {i} reads its own write at once"
            );
        }
    }
    let expected = nodes[0].app.snapshot_of_map();
    assert_eq!(expected.len(), 15);
    wait_for("every replica to apply everything", || {
        nodes.iter().all(|n| n.app.snapshot_of_map() == expected)
    })
    .await;
    let view = nodes[1].cluster.cluster_view().await.expect("view");
    assert_eq!(view.nodes.len(), 3);
    assert!(view.nodes.iter().all(|n| n.reachable && n.voter));
    assert!(view.survives_site_loss, "{view:?}");
    assert!(view.leader.is_some());
    for node in &nodes {
        node.cluster.shutdown().await.expect("shutdown");
    }
}

/// The leader is stopped: the two others elect a new one and take writes again; the time
/// from the stop to the first committed write is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_loss_elects_a_new_leader_and_writes_go_on() {
    let mut nodes = form_cluster(3).await;
    let old = leader_index(&nodes).expect("a leader");
    let old_node = nodes.remove(old);
    let old_id = old_node.cluster.node_id();
    let stopped_at = Instant::now();
    old_node.cluster.shutdown().await.expect("shutdown");
    drop(old_node);
    // Write through a survivor until it commits.
    let deadline = Instant::now() + DEADLINE;
    loop {
        match nodes[0].cluster.propose(b"after=1".to_vec()).await {
            Ok(_) => break,
            Err(ProposeError::Unavailable(reason)) => {
                assert!(
                    Instant::now() < deadline,
                    "no write after leader loss: {reason}"
                );
            }
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    println!(
        "leader stop to first commit: {} ms",
        stopped_at.elapsed().as_millis()
    );
    let new_leader = nodes[0].cluster.status().leader.expect("a leader");
    assert_ne!(new_leader, old_id);
    for node in &nodes {
        node.cluster
            .propose(b"both=1".to_vec())
            .await
            .expect("propose");
    }
    for node in &nodes {
        node.cluster.shutdown().await.expect("shutdown");
    }
}

/// A node alone (the two others gone) cannot commit: its proposals fail as unavailable within
/// the propose timeout, and nothing it was asked to write is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_cut_from_the_majority_fails_its_proposals() {
    let mut nodes = form_cluster(3).await;
    let survivor = nodes.remove(2);
    for node in nodes.drain(..) {
        node.cluster.shutdown().await.expect("shutdown");
    }
    let timeout = Duration::from_millis(timings().propose_timeout_ms);
    for attempt in 0..2 {
        let started = Instant::now();
        let outcome = survivor
            .cluster
            .propose(format!("lost{attempt}=1").into_bytes())
            .await;
        assert!(
            matches!(outcome, Err(ProposeError::Unavailable(_))),
            "got {outcome:?}"
        );
        assert!(
            started.elapsed() < timeout + Duration::from_secs(2),
            "failed after {:?}",
            started.elapsed()
        );
    }
    assert!(!survivor.app.snapshot_of_map().contains_key("lost0"));
    survivor.cluster.shutdown().await.expect("shutdown");
}

/// A node invited as a learner stays one and receives the log; one invited as a voter is
/// admitted as a learner, catches up, then is promoted. A second invitation while a join is
/// under way is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn learner_then_voter_and_one_change_at_a_time() {
    let first = start_node("n1", "s1", timings()).await;
    first
        .cluster
        .propose(b"before=1".to_vec())
        .await
        .expect("propose");
    let learner = join_new(&first.cluster, "n2", "s2", true).await;
    let status = first.cluster.status();
    let record = status
        .membership
        .iter()
        .find(|m| m.info.name == "n2")
        .expect("n2 in the membership");
    assert!(!record.voter, "invited as a learner");
    assert_eq!(
        learner
            .app
            .snapshot_of_map()
            .get("before")
            .map(String::as_str),
        Some("1")
    );

    // An invitation pending: a second one is refused until the first completes.
    let token = first
        .cluster
        .invite("n3", "s3", false)
        .await
        .expect("invite n3");
    let refused = first.cluster.invite("n4", "s4", false).await;
    let message = refused.expect_err("second invitation refused").to_string();
    assert!(
        message.contains("one membership change at a time"),
        "{message}"
    );

    let voter = start_node("fresh", "x", timings()).await;
    voter.cluster.join(&token).await.expect("join");
    let cluster = voter.cluster.clone();
    wait_for("n3 to join", || {
        cluster
            .join_report()
            .is_some_and(|r| r.phase == JoinPhase::Done)
    })
    .await;
    let status = first.cluster.status();
    let record = status
        .membership
        .iter()
        .find(|m| m.info.name == "n3")
        .expect("n3 in the membership");
    assert!(record.voter, "promoted to voter");
    // Writes through the learner are forwarded too.
    learner
        .cluster
        .propose(b"via-learner=1".to_vec())
        .await
        .expect("learner write");
    assert_eq!(
        learner
            .app
            .snapshot_of_map()
            .get("via-learner")
            .map(String::as_str),
        Some("1")
    );
    // Two sites of three voters? n1 (s1) and n3 (s3) are the voters: two sites never survive.
    let view = first.cluster.cluster_view().await.expect("view");
    assert!(!view.survives_site_loss);
    assert_eq!(view.critical_sites, ["s1", "s3"]);

    // The learner is removed, then n3 leaves.
    first.cluster.remove("n2").await.expect("remove n2");
    voter.cluster.leave().await.expect("n3 leaves");
    wait_for("membership of one", || {
        first.cluster.status().membership.len() == 1
    })
    .await;
    first
        .cluster
        .propose(b"alone=1".to_vec())
        .await
        .expect("lone voter writes");
    for node in [first, learner, voter] {
        node.cluster.shutdown().await.expect("shutdown");
    }
}

/// A node joining after the log was compacted receives a snapshot, then the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joining_node_catches_up_from_a_snapshot() {
    let mut small_log = timings();
    small_log.snapshot_after_logs = 0;
    small_log.logs_kept_after_snapshot = 0;
    let first = start_node("n1", "s1", small_log).await;
    for i in 0..40 {
        first
            .cluster
            .propose(format!("k{i}={i}").into_bytes())
            .await
            .expect("propose");
    }
    let snapshot_index = first
        .cluster
        .trigger_snapshot()
        .await
        .expect("snapshot")
        .expect("index");
    let raft = first.cluster.inner_raft();
    raft.wait(Some(DEADLINE))
        .metrics(
            |m| m.purged.is_some_and(|id| id.index >= snapshot_index),
            "log purged",
        )
        .await
        .expect("purged");
    let second = join_new(&first.cluster, "n2", "s2", false).await;
    assert!(
        second
            .app
            .n_restores
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1,
        "installed a snapshot"
    );
    first
        .cluster
        .propose(b"after=1".to_vec())
        .await
        .expect("propose");
    let expected = first.app.snapshot_of_map();
    wait_for("the joined node to hold everything", || {
        second.app.snapshot_of_map() == expected
    })
    .await;
    for node in [first, second] {
        node.cluster.shutdown().await.expect("shutdown");
    }
}

/// A Raft RPC is refused unless the mesh peer it came from is the node it claims to be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_claiming_another_node_is_refused() {
    let nodes = form_cluster(2).await;
    let engine = nodes[0].cluster.engine().expect("engine");
    let id_n1 = nodes[0].cluster.node_id();
    let id_n2 = nodes[1].cluster.node_id();
    assert_eq!(engine.name_of(id_n2).as_deref(), Some("n2"));
    let vote = openraft::raft::VoteRequest::new(openraft::Vote::new(99, id_n1), None);
    let reply =
        super::network::handle_rpc_for_test(&engine, "n2", super::wire::RaftRpc::Vote(vote)).await;
    assert!(
        matches!(reply, super::wire::RaftReply::Refused(_)),
        "n2 speaking for n1 must be refused: {reply:?}"
    );
    for node in nodes {
        node.cluster.shutdown().await.expect("shutdown");
    }
}

/// A node restarted in the middle of its join (after the swap, while catching up) resumes the
/// join on the next open and ends a member with the cluster's data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn join_resumes_after_a_restart() {
    let first = start_node("n1", "s1", timings()).await;
    for i in 0..20 {
        first
            .cluster
            .propose(format!("k{i}={i}").into_bytes())
            .await
            .expect("propose");
    }
    let token = first
        .cluster
        .invite("n2", "s2", false)
        .await
        .expect("invite");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = ClusterConfig {
        data_dir: dir.path().to_path_buf(),
        name: "fresh".to_string(),
        site: "x".to_string(),
        raft: timings(),
        mesh: loopback_mesh(),
        ..Default::default()
    };
    let app = Arc::new(MapApp::default());
    let joining = Cluster::open(config.clone(), app).await.expect("open");
    joining.join(&token).await.expect("join starts");
    joining.shutdown().await.expect("shutdown mid-join");
    drop(joining);

    let app = Arc::new(MapApp::default());
    let reopened = Cluster::open(config.clone(), app.clone())
        .await
        .expect("reopen");
    assert_eq!(
        reopened.status().name,
        "n2",
        "the name the token gave is kept"
    );
    let cluster = reopened.clone();
    wait_for("the resumed join", || {
        cluster
            .join_report()
            .is_some_and(|r| r.phase == JoinPhase::Done)
    })
    .await;
    let expected = first.app.snapshot_of_map();
    wait_for("the data", || app.snapshot_of_map() == expected).await;
    // A second join with the same token is refused: this node already joined.
    let again = reopened.join(&token).await;
    assert!(again.is_err(), "{again:?}");
    for cluster in [reopened, first.cluster] {
        cluster.shutdown().await.expect("shutdown");
    }
}

/// A node that already holds application data refuses to join (its data would be lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_with_data_refuses_to_join() {
    let first = start_node("n1", "s1", timings()).await;
    let other = start_node("m1", "s9", timings()).await;
    other
        .cluster
        .propose(b"mine=1".to_vec())
        .await
        .expect("propose");
    let token = first
        .cluster
        .invite("n2", "s2", false)
        .await
        .expect("invite");
    let refused = other.cluster.join(&token).await;
    let message = refused.expect_err("refused").to_string();
    assert!(message.contains("already holds"), "{message}");
    assert_eq!(other.cluster.status().name, "m1");
    other
        .cluster
        .propose(b"still=1".to_vec())
        .await
        .expect("still works");
    for node in [first, other] {
        node.cluster.shutdown().await.expect("shutdown");
    }
}

/// A learner has no authority: a voter refuses its Elect, Invite, Remove (of another node) and
/// PreVote requests, and its Raft requests (only a leader or a candidate sends those); the
/// cluster's term does not move and every voter stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn learner_may_not_elect_invite_remove_or_send_raft_requests() {
    use super::wire::{ControlReply, ControlRequest, RaftReply, RaftRpc};
    let nodes = form_cluster(2).await;
    let learner = join_new(&nodes[0].cluster, "n3", "s3", true).await;
    let id_n3 = learner.cluster.node_id();
    let engine = nodes[1].cluster.engine().expect("engine");
    wait_for("n2 to know n3", || engine.name_of(id_n3).is_some()).await;
    let term_before = nodes[0].cluster.status().term;
    let requests = [
        ControlRequest::Elect,
        ControlRequest::Invite {
            name: "n4".to_string(),
            site: "s4".to_string(),
            learner: false,
            valid_ms: 60_000,
        },
        ControlRequest::Remove {
            name: "n1".to_string(),
        },
        ControlRequest::PreVote { last_log: None },
    ];
    for request in requests {
        let what = format!("{request:?}");
        let reply = super::service::handle_control(&engine, "n3", request).await;
        match reply {
            ControlReply::Error(message) => {
                assert!(message.contains("learner"), "{what}: {message}")
            }
            other => panic!("{what} from a learner must be refused: {other:?}"),
        }
    }
    let vote = openraft::raft::VoteRequest::new(openraft::Vote::new(term_before + 5, id_n3), None);
    let reply = super::network::handle_rpc_for_test(&engine, "n3", RaftRpc::Vote(vote)).await;
    assert!(
        matches!(&reply, RaftReply::Refused(reason) if reason.contains("learner")),
        "a vote request from a learner must be refused: {reply:?}"
    );
    let append = openraft::raft::AppendEntriesRequest {
        vote: openraft::Vote::new_committed(term_before + 5, id_n3),
        prev_log_id: None,
        entries: Vec::new(),
        leader_commit: None,
    };
    let reply =
        super::network::handle_rpc_for_test(&engine, "n3", RaftRpc::AppendEntries(append)).await;
    assert!(
        matches!(&reply, RaftReply::Refused(reason) if reason.contains("learner")),
        "AppendEntries from a learner must be refused: {reply:?}"
    );
    let status = nodes[0].cluster.status();
    assert_eq!(status.term, term_before, "the term moved");
    assert_eq!(
        status.membership.iter().filter(|m| m.voter).count(),
        2,
        "a voter was removed: {:?}",
        status.membership
    );
    // A learner may still take itself out.
    let reply = super::service::handle_control(
        &engine,
        "n3",
        ControlRequest::Remove {
            name: "n3".to_string(),
        },
    )
    .await;
    assert!(
        !matches!(&reply, ControlReply::Error(message) if message.contains("learner")),
        "a learner's own leave must not be refused for being a learner: {reply:?}"
    );
    for node in nodes.into_iter().chain([learner]) {
        node.cluster.shutdown().await.expect("shutdown");
    }
}

/// A node config on a fixed loopback port (chosen free now), so that the node can be stopped
/// and started again at the address the others know.
fn fixed_port_config(dir: &std::path::Path, name: &str, site: &str) -> ClusterConfig {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("its address")
        .port();
    ClusterConfig {
        data_dir: dir.to_path_buf(),
        name: name.to_string(),
        site: site.to_string(),
        raft: timings(),
        mesh: crate::mesh::MeshConfig {
            listen: vec![std::net::SocketAddr::from(([127, 0, 0, 1], port))],
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A member whose data folder outlives its process.
struct Restartable {
    dir: tempfile::TempDir,
    config: ClusterConfig,
    running: Option<(Cluster, Arc<MapApp>)>,
}

impl Restartable {
    fn cluster(&self) -> &Cluster {
        &self.running.as_ref().expect("running").0
    }

    fn map(&self) -> std::collections::BTreeMap<String, String> {
        self.running
            .as_ref()
            .map(|(_, app)| app.snapshot_of_map())
            .unwrap_or_default()
    }

    async fn stop(&mut self) {
        let (cluster, _) = self.running.take().expect("running");
        cluster.shutdown().await.expect("shutdown");
    }

    async fn start(&mut self) {
        assert!(self.running.is_none());
        let app = Arc::new(MapApp::default());
        let cluster = Cluster::open(self.config.clone(), app.clone())
            .await
            .expect("reopen");
        self.running = Some((cluster, app));
    }

    /// Cuts `n` bytes off the tail of its stopped log (the chaos `truncate` fault).
    fn cut_log_tail(&self, n: u64) {
        assert!(self.running.is_none());
        super::log_store::cut_tail_bytes(&self.dir.path().join("raft"), n);
    }
}

/// `n` voters on fixed ports, joined through invitations.
async fn form_restartable_cluster(n: usize) -> Vec<Restartable> {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = fixed_port_config(dir.path(), "n1", "s1");
    let mut first = Restartable {
        dir,
        config,
        running: None,
    };
    first.start().await;
    let mut nodes = vec![first];
    for i in 2..=n {
        let token = nodes[0]
            .cluster()
            .invite(&format!("n{i}"), &format!("s{i}"), false)
            .await
            .expect("invite");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = fixed_port_config(dir.path(), "fresh", "nowhere");
        let mut node = Restartable {
            dir,
            config,
            running: None,
        };
        node.start().await;
        node.cluster().join(&token).await.expect("join starts");
        let cluster = node.cluster().clone();
        wait_for(&format!("n{i} to join"), || {
            cluster
                .join_report()
                .is_some_and(|r| r.phase == JoinPhase::Done)
        })
        .await;
        nodes.push(node);
    }
    nodes
}

fn restartable_leader(nodes: &[Restartable]) -> Option<usize> {
    nodes.iter().position(|n| {
        n.running.as_ref().is_some_and(|(c, _)| {
            let s = c.status();
            s.role == ClusterRole::Leader && s.leader == Some(s.node_id)
        })
    })
}

async fn propose_until_committed(cluster: &Cluster, command: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match cluster.propose(command.as_bytes().to_vec()).await {
            Ok(_) => return,
            Err(ProposeError::Unavailable(reason)) => {
                assert!(
                    Instant::now() < deadline,
                    "{command} never committed: {reason}"
                );
            }
            Err(other) => panic!("{command}: {other}"),
        }
    }
}

/// The chaos `truncate` fault in one process: a follower stops, a few bytes are cut off the
/// tail of its log (its last acknowledged entry is now torn), it starts again. The leader's
/// record of what that follower holds is now ahead of its log; the leader must take the
/// follower's answer (a conflict below what it had acknowledged) and send the entries again,
/// not panic ("follower log reversion is not allowed").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_restarted_with_a_torn_log_tail_gets_its_entries_again() {
    let mut nodes = form_restartable_cluster(3).await;
    let leader = restartable_leader(&nodes).expect("a leader");
    for i in 0..20 {
        propose_until_committed(nodes[leader].cluster(), &format!("k{i}={i}")).await;
    }
    let expected = nodes[leader].map();
    wait_for("every replica to apply the first writes", || {
        nodes.iter().all(|n| n.map() == expected)
    })
    .await;
    let victim = (leader + 1) % nodes.len();
    nodes[victim].stop().await;
    nodes[victim].cut_log_tail(5);
    nodes[victim].start().await;
    for i in 20..40 {
        let outcome = nodes[leader]
            .cluster()
            .propose(format!("k{i}={i}").into_bytes())
            .await;
        assert!(outcome.is_ok(), "write {i} after the restart: {outcome:?}");
    }
    let expected = nodes[leader].map();
    assert_eq!(expected.len(), 40);
    wait_for("the restarted follower to hold everything again", || {
        nodes.iter().all(|n| n.map() == expected)
    })
    .await;
    for node in &mut nodes {
        node.stop().await;
    }
}

/// A committed entry whose copy on one of the two nodes holding it was torn off must survive:
/// n1 (leader) and n2 hold `x` (n3 is down, so `x` committed on exactly those two); n2 loses
/// `x` from its log tail, n1 stops. n2 and n3 together are a majority, but neither holds `x`:
/// n2 must refuse to vote (and to stand) until it has its entries back, so no leader is
/// elected without n1, and once n1 is back `x` is on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_with_a_torn_log_tail_votes_only_once_it_has_its_entries_back() {
    let mut nodes = form_restartable_cluster(3).await;
    let a = restartable_leader(&nodes).expect("a leader");
    let (b, c) = ((a + 1) % 3, (a + 2) % 3);
    propose_until_committed(nodes[a].cluster(), "before=1").await;
    let expected = nodes[a].map();
    wait_for("every replica to apply the first write", || {
        nodes.iter().all(|n| n.map() == expected)
    })
    .await;
    nodes[c].stop().await;
    nodes[a]
        .cluster()
        .propose(b"x=1".to_vec())
        .await
        .expect("x commits on the leader and the other follower");
    nodes[b].stop().await;
    nodes[b].cut_log_tail(5);
    nodes[a].stop().await;
    nodes[b].start().await;
    nodes[c].start().await;
    // Several election timeouts: without n2's vote n3 cannot be elected.
    let window = Instant::now() + Duration::from_millis(6 * timings().election_timeout_max_ms);
    while Instant::now() < window {
        assert_eq!(
            restartable_leader(&nodes),
            None,
            "a leader was elected without the only intact copy of x"
        );
        assert!(nodes[b].cluster().status().recovering_lost_tail);
        tokio::time::sleep(POLL).await;
    }
    nodes[a].start().await;
    wait_for("x on every node", || {
        nodes
            .iter()
            .all(|n| n.map().get("x").map(String::as_str) == Some("1"))
    })
    .await;
    wait_for("n2 to vote again", || {
        !nodes[b].cluster().status().recovering_lost_tail
    })
    .await;
    let leader = restartable_leader(&nodes).expect("a leader");
    propose_until_committed(nodes[leader].cluster(), "after=1").await;
    for node in &mut nodes {
        node.stop().await;
    }
}
