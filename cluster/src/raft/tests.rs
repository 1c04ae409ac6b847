//! Tests of the Raft wiring: openraft's storage conformance suite, restart, snapshot and group
//! commit, with a tiny key-value application.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use openraft::storage::RaftLogStorage;
use openraft::testing::{StoreBuilder, Suite};

use crate::app::{AppStateMachine, SnapshotBuilder};

use super::config::{ClusterConfig, RaftTimings};
use super::log_store::LogStore;
use super::node::Cluster;
use super::state_machine::StateMachineStore;
use super::types::{StorageError, TypeConfig};

/// A map from key to value. A command is `key=value`; the response is the previous value.
#[derive(Default)]
pub(crate) struct MapApp {
    pub(crate) map: Mutex<BTreeMap<String, String>>,
    n_applied: AtomicU64,
    last_applied_index: AtomicU64,
    pub(crate) n_restores: AtomicU64,
}

struct MapSnapshot(BTreeMap<String, String>);

impl SnapshotBuilder for MapSnapshot {
    fn write_to(&self, out: &mut dyn io::Write) -> io::Result<()> {
        serde_json::to_writer(out, &self.0).map_err(io::Error::other)
    }
}

impl MapApp {
    pub(crate) fn snapshot_of_map(&self) -> BTreeMap<String, String> {
        self.map.lock().map(|map| map.clone()).unwrap_or_default()
    }
}

impl AppStateMachine for MapApp {
    fn apply(&self, log_index: u64, command: &[u8]) -> Vec<u8> {
        self.n_applied.fetch_add(1, Ordering::SeqCst);
        self.last_applied_index.store(log_index, Ordering::SeqCst);
        let text = String::from_utf8_lossy(command);
        let Some((key, value)) = text.split_once('=') else {
            return b"error: not key=value".to_vec();
        };
        let Ok(mut map) = self.map.lock() else {
            return b"error: poisoned".to_vec();
        };
        map.insert(key.to_string(), value.to_string())
            .unwrap_or_default()
            .into_bytes()
    }

    fn begin_snapshot(&self) -> Box<dyn SnapshotBuilder> {
        Box::new(MapSnapshot(self.snapshot_of_map()))
    }

    fn restore(&self, snapshot: &mut dyn io::Read, _local: bool) -> io::Result<()> {
        let restored: BTreeMap<String, String> =
            serde_json::from_reader(snapshot).map_err(io::Error::other)?;
        *self.map.lock().map_err(|_| io::Error::other("poisoned"))? = restored;
        self.n_restores.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct SuiteBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for SuiteBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().map_err(|e| openraft::StorageIOError::<u64>::write(&e))?;
        let log_store = LogStore::open(&dir.path().join("raft"))
            .map_err(|e| openraft::StorageIOError::<u64>::write(&e))?;
        let app: Arc<dyn AppStateMachine> = Arc::new(MapApp::default());
        let state_machine = StateMachineStore::open(app, &dir.path().join("snapshots"))
            .await
            .map_err(|e| openraft::StorageIOError::<u64>::write(&e))?;
        Ok((dir, log_store, state_machine))
    }
}

/// openraft's own storage conformance suite over the segment log store and the state machine.
#[test]
fn storage_passes_openraft_conformance_suite() {
    if let Err(e) = Suite::test_all(SuiteBuilder) {
        panic!("conformance suite failed: {e}");
    }
}

fn test_config(dir: &std::path::Path) -> ClusterConfig {
    ClusterConfig {
        data_dir: dir.to_path_buf(),
        name: "test-node".to_string(),
        site: "test-site".to_string(),
        raft: RaftTimings::lan(),
        mesh: loopback_mesh(),
        ..Default::default()
    }
}

/// A mesh on a free loopback port.
pub(crate) fn loopback_mesh() -> crate::mesh::MeshConfig {
    crate::mesh::MeshConfig {
        listen: vec![std::net::SocketAddr::from(([127, 0, 0, 1], 0))],
        ..Default::default()
    }
}

async fn open(config: &ClusterConfig) -> (Cluster, Arc<MapApp>) {
    let app = Arc::new(MapApp::default());
    let cluster = Cluster::open(config.clone(), app.clone())
        .await
        .expect("cluster opens");
    (cluster, app)
}

/// A restarted node re-applies its committed log: same state, same applied index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reapplies_committed_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = test_config(dir.path());
    let (cluster, app) = open(&config).await;
    let status = cluster.status();
    assert_eq!(status.leader, Some(status.node_id));
    assert_eq!(status.membership.len(), 1);
    assert!(status.membership[0].voter);
    assert_eq!(status.membership[0].info.name, "test-node");
    for i in 0..20 {
        let previous = cluster
            .propose(format!("k{}=v{i}", i % 5).into_bytes())
            .await
            .expect("propose");
        let expected = if i < 5 {
            String::new()
        } else {
            format!("v{}", i - 5)
        };
        assert_eq!(previous, expected.into_bytes());
    }
    let before = cluster.status();
    let state_before = app.snapshot_of_map();
    assert_eq!(state_before.len(), 5);
    assert_eq!(before.committed_index, before.applied_index);
    cluster.shutdown().await.expect("shutdown");
    drop(cluster);

    let (cluster, app) = open(&config).await;
    let after = cluster.status();
    assert_eq!(after.node_id, before.node_id, "node id is persisted");
    // A restarted leader leads again only after an election in a later term, whose leader
    // commits one blank entry.
    assert!(after.term > before.term, "a new term after the restart");
    let plus_blank = before.committed_index.map(|i| i + 1);
    assert_eq!(
        after.committed_index, plus_blank,
        "commit index is persisted (and the new term's blank entry committed)"
    );
    assert_eq!(app.snapshot_of_map(), state_before);
    assert_eq!(
        app.n_applied.load(Ordering::SeqCst),
        20,
        "every command re-applied once"
    );
    assert_eq!(
        after.applied_index, plus_blank,
        "same applied index after restart, plus the blank entry"
    );
    // And it still takes writes.
    cluster
        .propose(b"k0=after".to_vec())
        .await
        .expect("propose after restart");
    cluster.shutdown().await.expect("shutdown");
}

/// Every entry of the log in `raft_dir`, by index (the store must be closed).
async fn log_entries(raft_dir: &std::path::Path) -> BTreeMap<u64, Vec<u8>> {
    let mut store = LogStore::open(raft_dir).expect("open the log");
    let entries = openraft::RaftLogReader::try_get_log_entries(&mut store, ..)
        .await
        .expect("read the log");
    entries
        .into_iter()
        .map(|e| (e.log_id.index, bincode::serialize(&e).expect("encode")))
        .collect()
}

/// The chaos script's torn tail (issue 9): a leader restarted after its log lost its last
/// entries (flushed ones included: nothing torn to detect) must not lead again in the term it
/// wrote them in, or it writes different entries under log ids the followers may already
/// hold (two entries with one log id: the replicas diverge for good). After the restart,
/// no log id names a different entry than before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_restarted_after_losing_its_log_tail_never_reuses_a_log_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = test_config(dir.path());
    let raft_dir = dir.path().join("raft");
    let (cluster, _app) = open(&config).await;
    for i in 0..10 {
        cluster
            .propose(format!("k{i}=before").into_bytes())
            .await
            .expect("propose");
    }
    let term_before = cluster.status().term;
    cluster.shutdown().await.expect("shutdown");
    drop(cluster);
    let before = log_entries(&raft_dir).await;
    let first_cut = super::log_store::cut_last_records(&raft_dir, 4);

    let (cluster, _app) = open(&config).await;
    assert!(
        cluster.status().term > term_before,
        "leads again only in a later term"
    );
    for i in 0..10 {
        cluster
            .propose(format!("k{i}=after").into_bytes())
            .await
            .expect("propose after the restart");
    }
    cluster.shutdown().await.expect("shutdown");
    drop(cluster);
    let after = log_entries(&raft_dir).await;
    let mut n_rewritten = 0;
    for (index, entry) in &after {
        let Some(old) = before.get(index) else {
            continue;
        };
        let log_id_of = |bytes: &[u8]| {
            bincode::deserialize::<super::types::Entry>(bytes)
                .expect("decode")
                .log_id
        };
        if *index >= first_cut {
            n_rewritten += 1;
            assert_ne!(
                log_id_of(entry),
                log_id_of(old),
                "index {index} was cut and rewritten: it needs another log id"
            );
        } else {
            assert_eq!(entry, old, "index {index} below the cut is unchanged");
        }
    }
    assert!(n_rewritten > 0, "the cut indexes were written again");
}

/// A snapshot is written, the log purged, and a restart restores from the snapshot then
/// applies only the log after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_restores_snapshot_then_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    config.raft.snapshot_after_logs = 0;
    config.raft.logs_kept_after_snapshot = 0;
    let (cluster, _app) = open(&config).await;
    for i in 0..30 {
        cluster
            .propose(format!("k{i}=v{i}").into_bytes())
            .await
            .expect("propose");
    }
    let snapshot_index = cluster
        .trigger_snapshot()
        .await
        .expect("snapshot")
        .expect("a snapshot index");
    assert_eq!(Some(snapshot_index), cluster.status().applied_index);
    assert_eq!(cluster.status().snapshot_index, Some(snapshot_index));
    // The purge follows the snapshot; wait for it before writing more, so the test knows
    // which entries are left.
    cluster
        .inner_raft()
        .wait(Some(std::time::Duration::from_secs(10)))
        .metrics(
            |m| m.purged.is_some_and(|id| id.index >= snapshot_index),
            "purged",
        )
        .await
        .expect("log purged up to the snapshot");
    for i in 30..35 {
        cluster
            .propose(format!("k{i}=v{i}").into_bytes())
            .await
            .expect("propose");
    }
    // Only the newest snapshot is kept, and no temporary file is left.
    let snapshot_files: Vec<String> = std::fs::read_dir(dir.path().join("snapshots"))
        .expect("snapshot folder")
        .filter_map(|item| item.ok())
        .map(|item| item.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        snapshot_files,
        vec![super::snapshot_file::CURRENT_FILE_NAME.to_string()]
    );
    let before = cluster.status();
    cluster.shutdown().await.expect("shutdown");
    drop(cluster);

    // The purge reached the disk.
    {
        let mut log_store = LogStore::open(&dir.path().join("raft")).expect("log store");
        let state = log_store.get_log_state().await.expect("log state");
        assert!(state
            .last_purged_log_id
            .is_some_and(|id| id.index >= snapshot_index));
    }

    let (cluster, app) = open(&config).await;
    assert_eq!(
        app.n_restores.load(Ordering::SeqCst),
        1,
        "restored from the snapshot"
    );
    assert_eq!(
        app.n_applied.load(Ordering::SeqCst),
        5,
        "only the log after the snapshot applied"
    );
    let map = app.snapshot_of_map();
    assert_eq!(map.len(), 35);
    assert_eq!(map.get("k0").map(String::as_str), Some("v0"));
    assert_eq!(map.get("k34").map(String::as_str), Some("v34"));
    let after = cluster.status();
    // Plus the blank entry of the restarted leader's new term.
    assert_eq!(after.applied_index, before.applied_index.map(|i| i + 1));
    assert_eq!(after.snapshot_index, Some(snapshot_index));
    cluster.shutdown().await.expect("shutdown");
}

/// Concurrent proposers share flushes: far fewer fsyncs than proposals. Prints proposals/s at
/// 1, 10 and 50 concurrent proposers of 4 KB commands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_proposals_share_flushes() {
    const N_PROPOSALS: usize = 1_000;
    const COMMAND_BYTES: usize = 4_096;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = test_config(dir.path());
    let (cluster, app) = open(&config).await;
    let mut flushes_at_50 = 0;
    for n_proposers in [1usize, 10, 50] {
        let flushes_before = cluster.status().log_flushes;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for proposer in 0..n_proposers {
            let cluster = cluster.clone();
            let n_mine = N_PROPOSALS / n_proposers;
            tasks.push(tokio::spawn(async move {
                for i in 0..n_mine {
                    let mut command = format!("p{proposer}-{i}=").into_bytes();
                    command.resize(COMMAND_BYTES, b'x');
                    cluster.propose(command).await.expect("propose");
                }
            }));
        }
        for task in tasks {
            task.await.expect("proposer task");
        }
        let elapsed = started.elapsed();
        let flushes = cluster.status().log_flushes - flushes_before;
        println!(
            "group_commit: proposers={n_proposers} proposals={N_PROPOSALS} bytes={COMMAND_BYTES} \
             flushes={flushes} proposals_per_s={:.0} ({} build)",
            N_PROPOSALS as f64 / elapsed.as_secs_f64(),
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
        );
        if n_proposers == 50 {
            flushes_at_50 = flushes;
        }
    }
    assert_eq!(app.n_applied.load(Ordering::SeqCst), 3 * N_PROPOSALS as u64);
    let (n_bytes_apparent, n_bytes_allocated) = disk_usage(&dir.path().join("raft"));
    println!(
        "group_commit: raft store on disk: {n_bytes_apparent} bytes apparent, {n_bytes_allocated} \
         bytes allocated, for {} bytes of commands written",
        3 * N_PROPOSALS * COMMAND_BYTES
    );
    assert!(
        flushes_at_50 * 5 < N_PROPOSALS as u64,
        "50 proposers needed {flushes_at_50} flushes for {N_PROPOSALS} proposals"
    );
    cluster.shutdown().await.expect("shutdown");
}

/// After shutdown, proposals fail as fatal and the folder can be reopened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propose_after_shutdown_is_fatal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = test_config(dir.path());
    let (cluster, _app) = open(&config).await;
    cluster.shutdown().await.expect("shutdown");
    cluster.shutdown().await.expect("shutdown is idempotent");
    let result = cluster.propose(b"a=b".to_vec()).await;
    assert!(
        matches!(result, Err(super::node::ProposeError::Fatal(_))),
        "{result:?}"
    );
}

/// Both presets and a partial section deserialize; unknown keys are refused.
#[test]
fn config_deserializes_with_defaults() {
    let config: ClusterConfig =
        serde_json::from_str(r#"{"name":"a","raft":{"heartbeat_interval_ms":300}}"#)
            .expect("config");
    assert_eq!(config.name, "a");
    assert_eq!(config.raft.heartbeat_interval_ms, 300);
    assert_eq!(
        config.raft.election_timeout_min_ms,
        RaftTimings::lan().election_timeout_min_ms
    );
    assert!(serde_json::from_str::<ClusterConfig>(r#"{"nme":"a"}"#).is_err());
    // Elections start after silence of several heartbeats (with pre-vote, a healed or slow
    // node cannot depose a working leader, so the margin need not be ten heartbeats).
    for preset in [RaftTimings::lan(), RaftTimings::wan()] {
        assert!(preset.heartbeat_interval_ms * 3 <= preset.election_timeout_min_ms);
        assert!(preset.election_timeout_min_ms < preset.election_timeout_max_ms);
    }
}

/// Command batches survive bincode (the log's encoding) and JSON unchanged.
#[test]
fn command_batch_round_trips() {
    use super::types::CommandBatch;
    let batch = CommandBatch(vec![Vec::new(), b"a=b".to_vec(), vec![0u8, 255, 10, 13]]);
    let encoded = bincode::serialize(&batch).expect("bincode");
    assert_eq!(
        bincode::deserialize::<CommandBatch>(&encoded).expect("bincode back"),
        batch
    );
    let json = serde_json::to_string(&batch).expect("json");
    assert_eq!(
        serde_json::from_str::<CommandBatch>(&json).expect("json back"),
        batch
    );
}

/// A large command (one multi-megabyte log record) commits and survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_command_survives_restart() {
    const LARGE_COMMAND_BYTES: usize = 3 << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = test_config(dir.path());
    let (cluster, _app) = open(&config).await;
    let mut command = b"big=".to_vec();
    command.resize(LARGE_COMMAND_BYTES, b'y');
    cluster
        .propose(command)
        .await
        .expect("propose a large command");
    cluster.shutdown().await.expect("shutdown");
    drop(cluster);
    let (cluster, app) = open(&config).await;
    let map = app.snapshot_of_map();
    assert_eq!(
        map.get("big").map(String::len),
        Some(LARGE_COMMAND_BYTES - 4)
    );
    cluster.shutdown().await.expect("shutdown");
}

/// A snapshot file round-trips through the format, and damaged files are refused with an
/// error, never restored half-way silently.
#[test]
fn snapshot_file_round_trips_and_refuses_damage() {
    use super::snapshot_file;
    use super::types::SnapshotMeta;
    let dir = tempfile::tempdir().expect("tempdir");
    snapshot_file::prepare_dir(dir.path()).expect("prepare");
    let source = MapApp::default();
    for i in 0..100 {
        source.apply(i + 1, format!("k{i}=v{i}").as_bytes());
    }
    let meta = SnapshotMeta {
        last_log_id: Some(openraft::LogId::new(
            openraft::CommittedLeaderId::new(1, 7),
            100,
        )),
        last_membership: Default::default(),
        snapshot_id: "1-7-100-test".to_string(),
    };
    let temp = snapshot_file::write_temp(dir.path(), &meta, source.begin_snapshot().as_ref())
        .expect("write");
    snapshot_file::commit(dir.path(), &temp).expect("commit");
    assert_eq!(
        snapshot_file::read_current_meta(dir.path()).expect("meta"),
        Some(meta.clone())
    );
    let restored = MapApp::default();
    let path = snapshot_file::current_path(dir.path());
    assert_eq!(
        snapshot_file::restore(&path, &restored, true).expect("restore"),
        meta
    );
    assert_eq!(restored.snapshot_of_map(), source.snapshot_of_map());

    let bytes = std::fs::read(&path).expect("read");
    let check_refused = |damaged: Vec<u8>, what: &str| {
        let damaged_path = dir.path().join("damaged.snap");
        std::fs::write(&damaged_path, damaged).expect("write damaged");
        let result = snapshot_file::restore(&damaged_path, &MapApp::default(), true);
        assert!(result.is_err(), "{what} was accepted");
    };
    let mut bad_magic = bytes.clone();
    bad_magic[0] ^= 0xff;
    check_refused(bad_magic, "a bad magic");
    let mut bad_version = bytes.clone();
    bad_version[11] = 99;
    check_refused(bad_version, "an unknown version");
    check_refused(bytes[..bytes.len() - 10].to_vec(), "a truncated stream");
    let mut flipped = bytes.clone();
    let last = flipped.len() - 6;
    flipped[last] ^= 0x01;
    check_refused(flipped, "a corrupted stream");
}

/// Apparent and allocated bytes of the files under `path`.
fn disk_usage(path: &std::path::Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut totals = (0, 0);
    let Ok(items) = std::fs::read_dir(path) else {
        return totals;
    };
    for item in items.flatten() {
        let Ok(metadata) = item.metadata() else {
            continue;
        };
        if metadata.is_dir() {
            let (apparent, allocated) = disk_usage(&item.path());
            totals.0 += apparent;
            totals.1 += allocated;
        } else {
            totals.0 += metadata.len();
            totals.1 += metadata.blocks() * 512;
        }
    }
    totals
}
