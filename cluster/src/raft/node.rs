//! [`Cluster`]: the handle the mail node holds. Wires the log store, the state machine and the
//! network into openraft, and batches concurrent proposals so that they share one fsync.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock as StdRwLock, Weak};
use std::time::{Duration, Instant};

use openraft::error::ClientWriteError;
use openraft::{ServerState, SnapshotPolicy};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::app::AppStateMachine;
use crate::mesh::{Channel, Identity, Member, Mesh, MeshConfig, MeshError, MeshStatus};

use super::applied::{AppliedIndex, WaitError};
use super::config::{ClusterConfig, RaftTimings};
use super::fetch::ObjectFetcher;
use super::log_store::{LogStore, LogStoreProbe};
use super::membership::{self, JoinPhase, JoinState, PersistedIdentity};
use super::network::{serve_raft, Contacts, MeshNetwork, SenderCheck};
use super::service;
use super::state_machine::StateMachineStore;
use super::types::{CommandBatch, CommandResponses, NodeId, NodeInfo, Raft};

/// Largest command [`Cluster::propose`] accepts. Commands carry whole messages; the SMTP and
/// IMAP size limits are far below this.
pub const MAX_COMMAND_BYTES: usize = 256 << 20;
/// At most this many commands share one log entry (and one fsync).
pub const MAX_BATCH_COMMANDS: usize = 512;
/// A batch stops growing once it holds this many bytes (a single larger command goes alone).
pub const MAX_BATCH_BYTES: usize = 512 << 10;
/// Proposals waiting for a batch; `propose` waits for room (within its timeout) beyond this.
pub const PROPOSAL_QUEUE_CAPACITY: usize = 4096;
/// Batches submitted to Raft and not yet answered. One: the next batch is formed when the
/// previous one is committed and applied, so everything proposed meanwhile shares one entry,
/// one fsync per node and one replication round. Measured on 2 cores with 3 nodes and one
/// disk (`scripts/bench/cluster`): 4 batches in flight, each handed over after the previous
/// one's leader fsync, gave twice as many entries and 10-20% fewer messages per second, on
/// one node as on three. Raft commits in log order anyway, so a second batch in flight
/// would not commit sooner.
pub const MAX_IN_FLIGHT_BATCHES: usize = 1;
/// How long `shutdown` waits for openraft's tasks to release the log store.
const SHUTDOWN_RELEASE_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll period while waiting for a condition that has no notification (store release).
const POLL_INTERVAL: Duration = Duration::from_millis(5);
/// How long a new mesh retries binding a port the previous one (before a join) still holds.
const MESH_BIND_RETRY: Duration = Duration::from_secs(5);
/// Pause before retrying a forward that was not proposed (leader unknown or unreachable),
/// unless Raft reports news sooner.
pub const FORWARD_RETRY_PAUSE: Duration = Duration::from_millis(50);
/// A follower that has not heard its leader for this many maximum election timeouts answers
/// proposals `Unavailable` at once (it is cut off from the majority), instead of after the
/// propose timeout.
pub const CUT_OFF_ELECTION_TIMEOUTS: u64 = 2;
/// The openraft cluster name (appears in its logs).
const RAFT_CLUSTER_NAME: &str = "kermail";

/// Errors opening or driving the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot use {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("raft log store at {path}: {source}")]
    LogStore {
        path: PathBuf,
        #[source]
        source: super::log_store::LogStoreError,
    },
    #[error("invalid raft settings: {0}")]
    Config(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("{0}")]
    Timeout(String),
    #[error("mesh: {0}")]
    Mesh(String),
    /// A membership command was refused (the message says why and what to do).
    #[error("{0}")]
    Refused(String),
    #[error("the cluster is shut down")]
    ShutDown,
}

/// Why a proposal did not commit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum ProposeError {
    /// No leader, no quorum, timeout, or this node is not the leader (issue 4 forwards). The
    /// command may or may not commit later: answer the client with a temporary failure.
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    /// The command exceeds [`MAX_COMMAND_BYTES`].
    #[error("command of {size_bytes} bytes exceeds the limit of {max_bytes} bytes")]
    TooLarge { size_bytes: usize, max_bytes: usize },
    /// The node is stopped or broken (storage failure): it will not recover by itself.
    #[error("cluster node failed: {0}")]
    Fatal(String),
}

/// A node's role in the Raft group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ClusterRole {
    Leader,
    Candidate,
    Follower,
    Learner,
    Shutdown,
}

impl From<ServerState> for ClusterRole {
    fn from(state: ServerState) -> Self {
        match state {
            ServerState::Leader => Self::Leader,
            ServerState::Candidate => Self::Candidate,
            ServerState::Follower => Self::Follower,
            ServerState::Learner => Self::Learner,
            ServerState::Shutdown => Self::Shutdown,
        }
    }
}

/// One member of the current membership.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemberStatus {
    pub node_id: NodeId,
    pub info: NodeInfo,
    pub voter: bool,
}

/// A point-in-time view of this node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClusterStatus {
    pub node_id: NodeId,
    pub name: String,
    pub site: String,
    pub role: ClusterRole,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub last_log_index: Option<u64>,
    pub committed_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub membership: Vec<MemberStatus>,
    pub snapshot_index: Option<u64>,
    /// Log flushes (fsyncs) by appends since this node started: compare with the proposals to
    /// see group commit at work.
    pub log_flushes: u64,
    /// This node restarted with a torn log tail (entries it had acknowledged may be gone) and
    /// neither votes nor stands until a leader gave them back (see `raft::recovery`).
    pub recovering_lost_tail: bool,
}

/// A proposal waiting for its batch: answered with the response and the log index.
struct Pending {
    command: Vec<u8>,
    reply: oneshot::Sender<Result<(Vec<u8>, u64), ProposeError>>,
}

/// One incarnation of the node's Raft and mesh. A join replaces it (new key, id, name).
pub(crate) struct Engine {
    pub(crate) raft: Raft,
    pub(crate) node_id: NodeId,
    pub(crate) name: String,
    pub(crate) site: String,
    pub(crate) mesh: Mesh,
    pub(crate) addrs: Vec<String>,
    pub(crate) timings: RaftTimings,
    /// The mesh settings in force (a join replaces the cluster id and psk by the token's).
    pub(crate) mesh_config: MeshConfig,
    proposals: mpsc::Sender<Pending>,
    stop: CancellationToken,
    log_probe: LogStoreProbe,
    /// Members named by the invitation token, for a joining node that has no membership yet.
    pub(crate) known: BTreeMap<NodeId, NodeInfo>,
    /// Backup-only stores this node sends backups to: mesh members, never Raft members.
    pub(crate) backup_peers: Vec<Member>,
    pub(crate) holds_app_data: Arc<AtomicBool>,
    /// The join driver's last report, on a joining node.
    pub(crate) join_report: watch::Sender<Option<JoinReport>>,
    /// What this node's state machine applied (read-your-writes waits).
    applied: Arc<AppliedIndex>,
    /// The current leader, changed only when Raft names another one (forwarded writes watch
    /// it; Raft's own metrics change several times per entry).
    pub(crate) leader: watch::Receiver<Option<NodeId>>,
    /// When each peer was last heard at the Raft level (elections, check-quorum).
    pub(crate) contacts: Arc<Contacts>,
    /// On the leader: whether a majority of the voters answered within the minimum election
    /// timeout (check-quorum, kept by `service::run_elections`). A leader without it refuses
    /// writes at once instead of letting them wait for a commit that cannot come.
    pub(crate) quorum: watch::Sender<bool>,
    /// Set when this node vetoed another's pre-vote (it holds a better claim and hears no
    /// leader either): it stands at its next election step without waiting for its own timeout.
    pub(crate) stand_now: AtomicBool,
    /// Set when this node restarted with a torn log tail: it neither votes nor stands until a
    /// leader gave its entries back (`recovery`).
    pub(crate) recovery: Arc<super::recovery::TailRecovery>,
}

/// Where a join stands, on the joining node (`kermail cluster join` polls it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JoinReport {
    pub phase: JoinPhase,
    pub name: String,
    pub site: String,
    /// The leader's last log index and this node's applied index, while catching up.
    pub leader_last_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub error: Option<String>,
}

struct Inner {
    config: ClusterConfig,
    app: Arc<dyn AppStateMachine>,
    engine: StdRwLock<Option<Arc<Engine>>>,
    /// One membership change at a time on this node (the leader refuses a second one while
    /// the first is visible in the membership).
    pub(crate) membership_lock: tokio::sync::Mutex<()>,
    is_shut_down: AtomicBool,
}

/// The replication engine of one node. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

/// Resolves a path from the configuration against the data folder.
fn in_data_dir(data_dir: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        data_dir.join(path)
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ClusterError + '_ {
    move |source| ClusterError::Io {
        path: path.to_path_buf(),
        source,
    }
}

async fn blocking<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ClusterError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ClusterError::Raft(format!("{what} task failed: {e}")))
}

/// Starts the mesh, retrying the bind for a while: after a join the previous mesh's listener
/// may take a moment to close.
async fn start_mesh(
    config: MeshConfig,
    identity: Identity,
    members: Vec<Member>,
) -> Result<Mesh, ClusterError> {
    let deadline = Instant::now() + MESH_BIND_RETRY;
    loop {
        match Mesh::start(config.clone(), identity.clone(), members.clone()).await {
            Ok(mesh) => return Ok(mesh),
            Err(MeshError::Listen { addr, source })
                if source.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline =>
            {
                tracing::debug!(%addr, "mesh port still in use, retrying");
                tokio::time::sleep(POLL_INTERVAL * 10).await;
            }
            Err(error) => return Err(ClusterError::Mesh(error.to_string())),
        }
    }
}

impl Cluster {
    /// Opens the node: its mesh key (`node.key`, created on first start), its Raft storage
    /// under `config.data_dir`, the application restored from the newest snapshot, the mesh
    /// and Raft. A fresh store forms a one-voter cluster (unless a join is in progress); when
    /// this node is the only voter, waits (bounded) until it leads and has applied everything
    /// committed.
    ///
    /// `app` must hold no state yet: it is restored from the snapshot, then fed the log.
    pub async fn open(
        config: ClusterConfig,
        app: Arc<dyn AppStateMachine>,
    ) -> Result<Cluster, ClusterError> {
        let span = tracing::info_span!("cluster_open", name = %config.name, site = %config.site);
        async move {
            let data_dir = config.data_dir.clone();
            std::fs::create_dir_all(&data_dir).map_err(io_error(&data_dir))?;
            let join_file = membership::join_path(&data_dir);
            let mut join: Option<JoinState> =
                membership::read_json(&join_file).map_err(io_error(&join_file))?;
            if let Some(state) = join.as_mut() {
                if state.phase == JoinPhase::Prepared {
                    // A restart between writing the join and wiping the old store: wipe now.
                    wipe_raft_dirs(&data_dir).await?;
                    state.phase = JoinPhase::Joining;
                    let write_state = state.clone();
                    let path = join_file.clone();
                    blocking("join state", move || {
                        membership::write_json_atomic(&path, &write_state)
                    })
                    .await?
                    .map_err(io_error(&join_file))?;
                }
            }
            let engine = start_engine(&config, app.clone(), join.as_ref()).await?;
            Ok(Cluster {
                inner: Arc::new(Inner {
                    config,
                    app,
                    engine: StdRwLock::new(Some(engine)),
                    membership_lock: tokio::sync::Mutex::new(()),
                    is_shut_down: AtomicBool::new(false),
                }),
            })
        }
        .instrument(span)
        .await
    }

    pub(crate) fn engine(&self) -> Result<Arc<Engine>, ClusterError> {
        let guard = self
            .inner
            .engine
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        guard.clone().ok_or(ClusterError::ShutDown)
    }

    #[cfg(test)]
    pub(crate) fn inner_raft(&self) -> Raft {
        self.engine()
            .map(|e| e.raft.clone())
            .expect("engine running")
    }

    /// This node's id (0 while a join swaps the engine).
    pub fn node_id(&self) -> NodeId {
        self.engine().map(|e| e.node_id).unwrap_or_default()
    }

    /// The mesh of this node (for status; the cluster owns it).
    pub fn mesh_status(&self) -> Result<MeshStatus, ClusterError> {
        Ok(self.engine()?.mesh.status())
    }

    /// Replicates `command` and returns the application's response once the command is
    /// committed and applied on this node. A follower forwards the command to the leader over
    /// the mesh, then waits until its own state machine applied the entry (read-your-writes).
    /// Without a leader reachable with a quorum, fails with `Unavailable` within the propose
    /// timeout.
    pub async fn propose(&self, command: Vec<u8>) -> Result<Vec<u8>, ProposeError> {
        let n_bytes = command.len();
        if n_bytes > MAX_COMMAND_BYTES {
            return Err(ProposeError::TooLarge {
                size_bytes: n_bytes,
                max_bytes: MAX_COMMAND_BYTES,
            });
        }
        if self.inner.is_shut_down.load(Ordering::Acquire) {
            return Err(ProposeError::Fatal("the cluster is shut down".to_string()));
        }
        let engine = self
            .engine()
            .map_err(|_| ProposeError::Unavailable("the node is joining a cluster".to_string()))?;
        let span = tracing::debug_span!("raft_propose", node_id = engine.node_id, n_bytes);
        let timeout_ms = engine.timings.propose_timeout_ms;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
        let outcome = engine
            .propose_until(command, deadline)
            .instrument(span)
            .await;
        if let Err(ProposeError::Unavailable(reason)) = &outcome {
            tracing::warn!(timeout_ms, %reason, "proposal failed");
        }
        outcome.map(|(response, _)| response)
    }

    /// A point-in-time view of this node.
    pub fn status(&self) -> ClusterStatus {
        match self.engine() {
            Ok(engine) => engine.status(),
            Err(_) => ClusterStatus {
                node_id: 0,
                name: self.inner.config.name.clone(),
                site: self.inner.config.site.clone(),
                role: ClusterRole::Shutdown,
                term: 0,
                leader: None,
                last_log_index: None,
                committed_index: None,
                applied_index: None,
                membership: Vec::new(),
                snapshot_index: None,
                log_flushes: 0,
                recovering_lost_tail: false,
            },
        }
    }

    /// Builds a snapshot of everything applied now and waits (bounded by the propose timeout
    /// plus the snapshot timeout) until it is written. Returns the snapshot's last index.
    pub async fn trigger_snapshot(&self) -> Result<Option<u64>, ClusterError> {
        if self.inner.is_shut_down.load(Ordering::Acquire) {
            return Err(ClusterError::ShutDown);
        }
        let engine = self.engine()?;
        let raft = &engine.raft;
        let applied = raft.metrics().borrow().last_applied.map(|id| id.index);
        raft.trigger()
            .snapshot()
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let Some(applied) = applied else {
            return Ok(None);
        };
        let wait_ms =
            engine.timings.propose_timeout_ms + engine.timings.install_snapshot_timeout_ms;
        let metrics = raft
            .wait(Some(Duration::from_millis(wait_ms)))
            .metrics(
                |m| m.snapshot.is_some_and(|id| id.index >= applied),
                "snapshot at the applied index",
            )
            .await
            .map_err(|e| {
                ClusterError::Timeout(format!("snapshot not written within {wait_ms} ms: {e}"))
            })?;
        Ok(metrics.snapshot.map(|id| id.index))
    }

    /// Purges the log up to the kept snapshot, whatever `logs_kept_after_snapshot` says, so
    /// that a node joining later gets that snapshot instead of the log from its start (a data
    /// folder restored from a backup starts from a state the log does not hold). Returns the
    /// snapshot's index; openraft may purge a little later.
    pub async fn purge_log_to_snapshot(&self) -> Result<Option<u64>, ClusterError> {
        let engine = self.engine()?;
        let snapshot = engine.raft.metrics().borrow().snapshot.map(|id| id.index);
        if let Some(index) = snapshot {
            engine
                .raft
                .trigger()
                .purge_log(index)
                .await
                .map_err(|e| ClusterError::Raft(e.to_string()))?;
        }
        Ok(snapshot)
    }

    /// Stops Raft and the mesh, flushes the log store and waits (bounded) until it is closed,
    /// so that the same data folder can be opened again. Proposals get `Fatal` afterwards.
    /// Idempotent.
    pub async fn shutdown(&self) -> Result<(), ClusterError> {
        if self.inner.is_shut_down.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let engine = self
            .inner
            .engine
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        match engine {
            Some(engine) => engine.stop().await,
            None => Ok(()),
        }
    }

    pub(crate) fn config(&self) -> &ClusterConfig {
        &self.inner.config
    }

    pub(crate) fn membership_lock(&self) -> &tokio::sync::Mutex<()> {
        &self.inner.membership_lock
    }

    /// Replaces the running engine (a join): stops the old one, runs `between` (wipe, write
    /// state) and starts the new one. Proposals meanwhile fail as unavailable.
    pub(crate) async fn swap_engine(&self, join: JoinState) -> Result<(), ClusterError> {
        let old = self
            .inner
            .engine
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(old) = old {
            old.stop().await?;
        }
        let data_dir = self.inner.config.data_dir.clone();
        wipe_raft_dirs(&data_dir).await?;
        let mut join = join;
        join.phase = JoinPhase::Joining;
        let join_file = membership::join_path(&data_dir);
        let state = join.clone();
        let path = join_file.clone();
        blocking("join state", move || {
            membership::write_json_atomic(&path, &state)
        })
        .await?
        .map_err(io_error(&join_file))?;
        let engine = start_engine(&self.inner.config, self.inner.app.clone(), Some(&join)).await?;
        *self
            .inner
            .engine
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(engine);
        Ok(())
    }

    /// Whether the application has been given any command or snapshot.
    pub fn holds_app_data(&self) -> bool {
        self.engine()
            .map(|e| e.holds_app_data.load(Ordering::Acquire))
            .unwrap_or(true)
    }
}

/// Removes the Raft log and the snapshots (a node about to join another cluster).
async fn wipe_raft_dirs(data_dir: &Path) -> Result<(), ClusterError> {
    for dir in [data_dir.join("raft"), data_dir.join("snapshots")] {
        let path = dir.clone();
        blocking("wipe", move || match std::fs::remove_dir_all(&path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        })
        .await?
        .map_err(io_error(&dir))?;
    }
    Ok(())
}

/// Starts one engine: identity, log store, mesh, state machine, Raft and the tasks around it.
async fn start_engine(
    config: &ClusterConfig,
    app: Arc<dyn AppStateMachine>,
    join: Option<&JoinState>,
) -> Result<Arc<Engine>, ClusterError> {
    let timings = config.raft.clone();
    let data_dir = config.data_dir.clone();
    let key_path = in_data_dir(&data_dir, &config.mesh.key_file);
    let load_path = key_path.clone();
    let identity = blocking("key", move || Identity::load_or_create(&load_path))
        .await?
        .map_err(|e| ClusterError::Mesh(e.to_string()))?;
    let identity_file = membership::identity_path(&data_dir);
    let persisted: Option<PersistedIdentity> =
        membership::read_json(&identity_file).map_err(io_error(&identity_file))?;
    let (name, site) = match persisted {
        Some(p) => (p.name, p.site),
        None => (config.name.clone(), config.site.clone()),
    };
    let mut mesh_config = config.mesh.clone();
    // A node that joined speaks the cluster's mesh settings, from its token.
    if let Some(join) = join.filter(|j| j.phase != JoinPhase::Failed) {
        mesh_config.cluster_id = join.token.cluster_id.clone();
        mesh_config.psk_base64 = join.token.psk_base64.clone();
    }
    let joining = join.filter(|j| j.phase == JoinPhase::Joining);

    let raft_path = data_dir.join("raft");
    let open_path = raft_path.clone();
    let log_store = blocking("log store open", move || LogStore::open(&open_path))
        .await?
        .map_err(|source| ClusterError::LogStore {
            path: raft_path.clone(),
            source,
        })?;
    log_store.set_health(app.storage_health());
    let node_id = match joining {
        Some(join) => log_store.set_node_id(join.token.node_id).await,
        None => log_store.node_id_or_create().await,
    }
    .map_err(|source| ClusterError::LogStore {
        path: raft_path.clone(),
        source,
    })?;

    let public_key = identity.public_key_base64();
    let listen_addrs: Vec<std::net::SocketAddr> = mesh_config.listen.clone();
    let mut initial_members = vec![Member {
        name: name.clone(),
        site: site.clone(),
        public_key: public_key.clone(),
        addrs: listen_addrs,
    }];
    let mut known = BTreeMap::new();
    if let Some(join) = join.filter(|j| j.phase != JoinPhase::Failed) {
        for (id, info) in &join.token.members {
            known.insert(*id, info.clone());
        }
        initial_members.extend(
            membership::mesh_members(join.token.members.iter().map(|(id, info)| (id, info)), 0)
                .into_iter()
                .filter(|m| m.name != name),
        );
    }
    for peer in &config.backup_peers {
        if !initial_members.iter().any(|m| m.name == peer.name) {
            initial_members.push(peer.clone());
        }
    }
    let mesh = start_mesh(mesh_config.clone(), identity, initial_members).await?;
    let addrs: Vec<String> = mesh.local_addrs().iter().map(|a| a.to_string()).collect();

    let snapshot_dir = data_dir.join("snapshots");
    let objects = app.clone();
    let state_machine = StateMachineStore::open(app, &snapshot_dir)
        .await
        .map_err(io_error(&snapshot_dir))?;
    let fetcher_slot = state_machine.fetcher_slot();
    let holds_app_data = state_machine.holds_app_data();
    let applied = state_machine.applied_index();
    let raft_config = raft_config(&timings)?;
    let log_probe = log_store.probe();
    let recovery = Arc::new(log_store.tail_recovery());
    let contacts = Arc::new(Contacts::default());
    let raft = Raft::new(
        node_id,
        Arc::new(raft_config),
        MeshNetwork::new(mesh.clone(), contacts.clone()),
        log_store,
        state_machine,
    )
    .await
    .map_err(|e| ClusterError::Raft(e.to_string()))?;

    let me = NodeInfo {
        name: name.clone(),
        site: site.clone(),
        public_key: public_key.clone(),
        addrs: addrs.clone(),
        joining: None,
    };
    let is_initialized = raft
        .is_initialized()
        .await
        .map_err(|e| ClusterError::Raft(e.to_string()))?;
    if !is_initialized && joining.is_none() {
        tracing::info!(node_id, "fresh store: initialising a one-voter cluster");
        raft.initialize(BTreeMap::from([(node_id, me.clone())]))
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
    }
    if joining.is_none() {
        wait_lone_voter_ready(&raft, node_id, &timings).await?;
    }

    let stop = CancellationToken::new();
    let (leader_tx, leader) = watch::channel(raft.metrics().borrow().current_leader);
    tokio::spawn(
        publish_leader(raft.metrics(), leader_tx, stop.clone())
            .instrument(tracing::info_span!("leader_watch", node_id)),
    );
    let (proposals, proposal_rx) = mpsc::channel(PROPOSAL_QUEUE_CAPACITY);
    tokio::spawn(
        run_batcher(raft.clone(), proposal_rx, stop.clone())
            .instrument(tracing::info_span!("raft_batcher", node_id)),
    );
    let (join_report, _) = watch::channel(joining.map(|j| JoinReport {
        phase: j.phase,
        name: name.clone(),
        site: site.clone(),
        leader_last_index: None,
        applied_index: None,
        error: None,
    }));
    let engine = Arc::new(Engine {
        raft: raft.clone(),
        node_id,
        name,
        site,
        mesh: mesh.clone(),
        addrs,
        timings,
        mesh_config,
        proposals,
        stop: stop.clone(),
        log_probe,
        known,
        backup_peers: config.backup_peers.clone(),
        holds_app_data,
        join_report,
        applied,
        leader,
        contacts: contacts.clone(),
        quorum: watch::channel(true).0,
        stand_now: AtomicBool::new(false),
        recovery: recovery.clone(),
    });
    let check: Arc<dyn SenderCheck> = Arc::new(EngineCheck(Arc::downgrade(&engine)));
    let _ = fetcher_slot.set(Arc::new(ObjectFetcher::new(
        mesh.clone(),
        Arc::downgrade(&engine),
    )));
    for channel in [Channel::Raft, Channel::Bulk] {
        if let Some(mut incoming) = mesh.incoming(channel) {
            if channel == Channel::Bulk {
                // Backup chunks other nodes store here travel on bulk too (backup_store.rs).
                let root = data_dir.join(super::backup_store::BACKUP_STORE_DIR);
                let quota = config.backup_store_quota_bytes;
                let store = blocking("backup store open", move || {
                    super::backup_store::Store::open(root, quota)
                })
                .await?
                .map_err(|e| ClusterError::Mesh(format!("cannot open the backup store: {e}")))?;
                let members = EngineCheck(Arc::downgrade(&engine));
                incoming = super::backup_store::serve_beside(
                    incoming,
                    Arc::new(store),
                    Arc::new(move |from: &str| members.in_membership(from)),
                    stop.clone(),
                );
            }
            // Snapshot bodies are served on `bulk` only.
            let objects = (channel == Channel::Bulk).then(|| objects.clone());
            tokio::spawn(
                serve_raft(
                    raft.clone(),
                    incoming,
                    check.clone(),
                    contacts.clone(),
                    recovery.clone(),
                    objects,
                    stop.clone(),
                )
                .instrument(tracing::info_span!("raft_rpcs", node_id, ?channel)),
            );
        }
    }
    if let Some(incoming) = mesh.incoming(Channel::Writes) {
        tokio::spawn(
            service::serve_forward(Arc::downgrade(&engine), incoming, stop.clone())
                .instrument(tracing::info_span!("forwarded_writes", node_id)),
        );
    }
    if let Some(incoming) = mesh.incoming(Channel::Control) {
        tokio::spawn(
            service::serve_control(Arc::downgrade(&engine), incoming, stop.clone())
                .instrument(tracing::info_span!("control", node_id)),
        );
    }
    tokio::spawn(
        service::follow_membership(Arc::downgrade(&engine), stop.clone())
            .instrument(tracing::info_span!("membership", node_id)),
    );
    tokio::spawn(
        service::run_elections(Arc::downgrade(&engine), stop.clone())
            .instrument(tracing::info_span!("elections", node_id)),
    );
    if let Some(join) = joining {
        tokio::spawn(
            service::drive_join(
                Arc::downgrade(&engine),
                join.clone(),
                membership::join_path(&data_dir),
                stop.clone(),
            )
            .instrument(tracing::info_span!("join", node_id)),
        );
    }
    let status_metrics = raft.metrics().borrow().clone();
    tracing::info!(
        node_id,
        term = status_metrics.current_term,
        applied = ?status_metrics.last_applied,
        mesh = ?engine.addrs,
        "cluster open"
    );
    Ok(engine)
}

/// On a store with a membership where this node is the only voter, makes it leader at once
/// and waits until everything committed is applied.
async fn wait_lone_voter_ready(
    raft: &Raft,
    node_id: NodeId,
    timings: &RaftTimings,
) -> Result<(), ClusterError> {
    // Metrics are published by the Raft task; wait until they show the membership (a fresh
    // store was just initialised, an old one has one in its log or snapshot).
    let metrics = raft
        .wait(Some(Duration::from_millis(timings.propose_timeout_ms)))
        .metrics(
            |m| m.membership_config.log_id().is_some(),
            "membership loaded",
        )
        .await
        .map_err(|e| ClusterError::Timeout(format!("raft did not load its membership: {e}")))?;
    let voters: Vec<NodeId> = metrics.membership_config.membership().voter_ids().collect();
    if voters != [node_id] {
        return Ok(());
    }
    if metrics.state != ServerState::Leader {
        // A lone voter needs nobody's vote: do not wait an election timeout for it.
        raft.trigger()
            .elect()
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
    }
    let wait_ms = timings.propose_timeout_ms + 2 * timings.election_timeout_max_ms;
    raft.wait(Some(Duration::from_millis(wait_ms)))
        .metrics(
            |m| {
                m.state == ServerState::Leader
                    && m.current_leader == Some(node_id)
                    && m.last_applied.map(|id| id.index) == m.last_log_index
            },
            "leader with every entry applied",
        )
        .await
        .map_err(|e| {
            ClusterError::Timeout(format!(
                "node did not become leader with its log applied within {wait_ms} ms: {e}"
            ))
        })?;
    Ok(())
}

/// Binds node ids to mesh peers: a peer may only speak for the node whose record (in the
/// membership, or in the invitation token of a joining node) carries its name, and, since
/// every Raft request comes from a leader or a candidate, only if that node may lead.
pub(crate) struct EngineCheck(pub(crate) Weak<Engine>);

impl SenderCheck for EngineCheck {
    fn in_membership(&self, from: &str) -> bool {
        self.0.upgrade().is_some_and(|engine| {
            engine.member_named(from).is_some()
                || engine.known.values().any(|info| info.name == from)
        })
    }

    fn check(&self, claimed: NodeId, from: &str) -> Result<(), String> {
        let Some(engine) = self.0.upgrade() else {
            return Err("this node is shutting down".to_string());
        };
        if engine.name_of(claimed).is_none_or(|name| name != from) {
            return Err(format!(
                "mesh peer {from} is not node {claimed} of this cluster"
            ));
        }
        let metrics = engine.raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        let Some(info) = membership.get_node(&claimed) else {
            // Only a joining node knows members from its token before it has a membership:
            // the token's members are the cluster's voters.
            return if membership.nodes().next().is_none() {
                Ok(())
            } else {
                Err(format!("{from} is not a member"))
            };
        };
        let is_voter = membership.voter_ids().any(|id| id == claimed);
        membership::may_lead(info, is_voter)
            .then_some(())
            .ok_or_else(|| format!("{from} is a learner: it may not lead or stand"))
    }
}

impl Engine {
    /// The name of node `id`, from the membership or the invitation token.
    pub(crate) fn name_of(&self, id: NodeId) -> Option<String> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        if let Some(info) = metrics.membership_config.membership().get_node(&id) {
            return Some(info.name.clone());
        }
        self.known.get(&id).map(|info| info.name.clone())
    }

    /// The membership record of the member called `name`.
    pub(crate) fn member_named(&self, name: &str) -> Option<(NodeId, NodeInfo, bool)> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let found = membership
            .nodes()
            .find(|(_, info)| info.name == name)
            .map(|(id, info)| (*id, info.clone(), voters.contains(id)));
        found
    }

    pub(crate) fn status(&self) -> ClusterStatus {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        ClusterStatus {
            node_id: self.node_id,
            name: self.name.clone(),
            site: self.site.clone(),
            role: metrics.state.into(),
            term: metrics.current_term,
            leader: metrics.current_leader,
            last_log_index: metrics.last_log_index,
            committed_index: self.log_probe.committed_index(),
            applied_index: metrics.last_applied.map(|id| id.index),
            membership: membership
                .nodes()
                .map(|(id, info)| MemberStatus {
                    node_id: *id,
                    info: info.clone(),
                    voter: voters.contains(id),
                })
                .collect(),
            snapshot_index: metrics.snapshot.map(|id| id.index),
            log_flushes: self.log_probe.n_append_flushes(),
            recovering_lost_tail: self.recovery.is_active(),
        }
    }

    /// Proposes through the local batcher (this node leads). Returns the response and the
    /// entry's log index.
    pub(crate) async fn propose_local(
        &self,
        command: Vec<u8>,
        deadline: tokio::time::Instant,
    ) -> Result<(Vec<u8>, u64), ProposeError> {
        let mut quorum = self.quorum.subscribe();
        if !*quorum.borrow_and_update() {
            return Err(self.unavailable_no_quorum());
        }
        let quorum_lost = async {
            loop {
                if quorum.changed().await.is_err() {
                    return std::future::pending().await;
                }
                if !*quorum.borrow_and_update() {
                    return;
                }
            }
        };
        let (reply, response) = oneshot::channel();
        let work = async {
            self.proposals
                .send(Pending { command, reply })
                .await
                .map_err(|_| ProposeError::Fatal("the cluster is shut down".to_string()))?;
            response
                .await
                .map_err(|_| ProposeError::Fatal("raft stopped before answering".to_string()))?
        };
        tokio::select! {
            outcome = tokio::time::timeout_at(deadline, work) => match outcome {
                Ok(result) => result,
                Err(_) => Err(ProposeError::Unavailable(format!(
                    "no commit within {} ms (no quorum?)",
                    self.timings.propose_timeout_ms
                ))),
            },
            () = quorum_lost => Err(self.unavailable_no_quorum()),
        }
    }

    fn unavailable_no_quorum(&self) -> ProposeError {
        ProposeError::Unavailable(format!(
            "this leader has not heard from a majority of the voters for {} ms; outcome unknown, retry",
            self.timings.election_timeout_min_ms
        ))
    }

    /// Proposes here when leading, else forwards to the leader; retries only while nothing
    /// was proposed (no leader known, leader unreachable, the target is no longer leader).
    pub(crate) async fn propose_until(
        &self,
        command: Vec<u8>,
        deadline: tokio::time::Instant,
    ) -> Result<(Vec<u8>, u64), ProposeError> {
        let mut metrics = self.raft.metrics();
        loop {
            let (leader, state) = {
                let m = metrics.borrow_and_update();
                (m.current_leader, m.state)
            };
            match leader {
                Some(leader) if leader == self.node_id && state == ServerState::Leader => {
                    return self.propose_local(command, deadline).await;
                }
                Some(leader) if leader != self.node_id => {
                    if let Some(error) = self.cut_off_from(leader) {
                        return Err(error);
                    }
                    match service::forward(self, leader, &command, deadline).await {
                        service::Forwarded::Done(result) => return result,
                        service::Forwarded::Retry(reason) => {
                            tracing::debug!(%reason, "forward not done, retrying");
                            // Wait for news (a new leader) or a short pause, then retry.
                            let pause = tokio::time::Instant::now() + FORWARD_RETRY_PAUSE;
                            let until = pause.min(deadline);
                            if let Ok(Err(_)) =
                                tokio::time::timeout_at(until, metrics.changed()).await
                            {
                                // Raft stopped: `changed` would return at once, every time.
                                return Err(ProposeError::Fatal("raft stopped".to_string()));
                            }
                        }
                    }
                }
                _ => {
                    // No leader known: wait for one.
                    match tokio::time::timeout_at(deadline, metrics.changed()).await {
                        Ok(Ok(())) => continue,
                        Err(_) => return Err(self.unavailable_no_leader()),
                        // Raft stopped: `changed` would return at once, every time.
                        Ok(Err(_)) => return Err(ProposeError::Fatal("raft stopped".to_string())),
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(self.unavailable_no_leader());
            }
        }
    }

    /// `Unavailable` at once when this follower has not heard its leader `leader` for
    /// [`CUT_OFF_ELECTION_TIMEOUTS`] maximum election timeouts: a majority that could elect
    /// a leader would have done so by then (and this node would hear it), so this node is cut
    /// off from the majority and a write would only wait out the propose timeout.
    fn cut_off_from(&self, leader: NodeId) -> Option<ProposeError> {
        let threshold =
            Duration::from_millis(self.timings.election_timeout_max_ms * CUT_OFF_ELECTION_TIMEOUTS);
        let silence = self.contacts.silence(leader)?;
        (silence >= threshold).then(|| {
            ProposeError::Unavailable(format!(
                "no leader heard for {} ms: this node is cut off from the majority",
                silence.as_millis()
            ))
        })
    }

    fn unavailable_no_leader(&self) -> ProposeError {
        ProposeError::Unavailable(format!(
            "no leader with a quorum reachable within {} ms",
            self.timings.propose_timeout_ms
        ))
    }

    /// Waits until this node applied `log_index` (read-your-writes after a forward).
    pub(crate) async fn wait_applied(
        &self,
        log_index: u64,
        deadline: tokio::time::Instant,
    ) -> Result<(), ProposeError> {
        match self.applied.wait(log_index, deadline).await {
            Ok(()) => Ok(()),
            Err(WaitError::Closed) => Err(ProposeError::Fatal("raft stopped".to_string())),
            Err(WaitError::Timeout) => Err(ProposeError::Unavailable(format!(
                "committed at index {log_index} but not applied on this node in time"
            ))),
        }
    }

    /// Stops the tasks, Raft and the mesh, and waits (bounded) until the log store is closed.
    async fn stop(&self) -> Result<(), ClusterError> {
        self.stop.cancel();
        // openraft's core may be waiting in an append retried on a full disk.
        self.log_probe.stop_retrying();
        let raft_result = self.raft.shutdown().await;
        self.applied.close();
        self.mesh.shutdown();
        let flush_result = self.log_probe.flush().await;
        let deadline = Instant::now() + SHUTDOWN_RELEASE_TIMEOUT;
        while !self.log_probe.is_closed() {
            if Instant::now() >= deadline {
                return Err(ClusterError::Timeout(format!(
                    "raft tasks still hold the log store {} s after shutdown",
                    SHUTDOWN_RELEASE_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        raft_result.map_err(|e| ClusterError::Raft(format!("raft task failed: {e}")))?;
        flush_result.map_err(|e| ClusterError::Raft(format!("final log flush failed: {e}")))?;
        tracing::info!(node_id = self.node_id, "cluster shut down");
        Ok(())
    }
}

/// Publishes Raft's current leader on `leader` whenever it changes (and only then).
async fn publish_leader(
    mut metrics: watch::Receiver<openraft::RaftMetrics<NodeId, NodeInfo>>,
    leader: watch::Sender<Option<NodeId>>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            changed = metrics.changed() => if changed.is_err() { return },
        }
        let current = metrics.borrow_and_update().current_leader;
        leader.send_if_modified(|known| {
            let changed = *known != current;
            *known = current;
            changed
        });
    }
}

/// openraft's leader lease under [`raft_config`]: after its leader's last AppendEntries a
/// follower refuses every vote for this long (openraft's maximum election timeout).
pub(crate) fn leader_lease(timings: &RaftTimings) -> Duration {
    Duration::from_millis(timings.heartbeat_interval_ms + 2)
}

fn raft_config(timings: &RaftTimings) -> Result<openraft::Config, ClusterError> {
    let snapshot_policy = if timings.snapshot_after_logs == 0 {
        SnapshotPolicy::Never
    } else {
        SnapshotPolicy::LogsSinceLast(timings.snapshot_after_logs)
    };
    // Elections are run by `service::run_elections` (pre-vote, then `trigger().elect()`), never
    // by openraft's own timer, so that a node cut off and healed cannot depose a working
    // leader with a term it raised alone. openraft still uses the election timeouts for two
    // things: the Vote RPC timeout (the minimum) and the leader lease (the maximum: a follower
    // refuses every vote that long after its leader's last AppendEntries). The pre-vote already
    // keeps a working leader in place, so the lease is cut to about one heartbeat: a candidate
    // that passed its pre-vote is not refused for a second and a half more.
    let openraft_election_timeout_min = timings.heartbeat_interval_ms + 1;
    openraft::Config {
        cluster_name: RAFT_CLUSTER_NAME.to_string(),
        heartbeat_interval: timings.heartbeat_interval_ms,
        election_timeout_min: openraft_election_timeout_min,
        election_timeout_max: openraft_election_timeout_min + 1,
        enable_elect: false,
        install_snapshot_timeout: timings.install_snapshot_timeout_ms,
        snapshot_policy,
        max_in_snapshot_log_to_keep: timings.logs_kept_after_snapshot,
        ..Default::default()
    }
    .validate()
    .map_err(|e| ClusterError::Config(e.to_string()))
}

/// Packs waiting proposals into one log entry per batch (group commit): a batch takes every
/// proposal waiting when a slot frees up, and at most [`MAX_IN_FLIGHT_BATCHES`] batches are
/// unanswered at a time.
async fn run_batcher(raft: Raft, mut proposals: mpsc::Receiver<Pending>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BATCHES));
    loop {
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let first = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            pending = proposals.recv() => match pending {
                Some(pending) => pending,
                None => break,
            },
        };
        let mut n_bytes = first.command.len();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_COMMANDS && n_bytes < MAX_BATCH_BYTES {
            match proposals.try_recv() {
                Ok(pending) => {
                    n_bytes += pending.command.len();
                    batch.push(pending);
                }
                Err(_) => break,
            }
        }
        // Proposers that timed out meanwhile are not written at all.
        batch.retain(|pending| !pending.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let n_commands = batch.len();
        let (commands, replies): (Vec<Vec<u8>>, Vec<_>) = batch
            .into_iter()
            .map(|pending| (pending.command, pending.reply))
            .unzip();
        let span = tracing::debug_span!("raft_write", n_commands, n_bytes);
        // The term this batch is proposed in: if the node stops leading it before openraft
        // answers, the batch is answered here (see `leadership_lost`).
        let metrics = raft.metrics();
        let term = metrics.borrow().current_term;
        match raft
            .client_write_ff(CommandBatch(commands))
            .instrument(span.clone())
            .await
        {
            Err(fatal) => {
                tracing::error!(error = %fatal, "raft refused a write");
                answer_all(replies, Err(ProposeError::Fatal(fatal.to_string())));
            }
            Ok(receiver) => {
                tokio::spawn(
                    async move {
                        let outcome = tokio::select! {
                            outcome = receiver => outcome,
                            () = leadership_lost(metrics, term) => {
                                answer_all(
                                    replies,
                                    Err(ProposeError::Unavailable(
                                        "this node lost the leadership while the write was in \
                                         flight; outcome unknown, retry"
                                            .to_string(),
                                    )),
                                );
                                drop(permit);
                                return;
                            }
                        };
                        match outcome {
                            Ok(Ok(response)) => {
                                deliver(replies, response.data, response.log_id.index)
                            }
                            Ok(Err(ClientWriteError::ForwardToLeader(forward))) => answer_all(
                                replies,
                                Err(ProposeError::Unavailable(match forward.leader_id {
                                    Some(leader) => {
                                        format!("this node lost the leadership to node {leader}")
                                    }
                                    None => "this node lost the leadership".to_string(),
                                })),
                            ),
                            Ok(Err(ClientWriteError::ChangeMembershipError(e))) => {
                                answer_all(replies, Err(ProposeError::Fatal(e.to_string())))
                            }
                            Err(_) => answer_all(
                                replies,
                                Err(ProposeError::Fatal(
                                    "raft stopped before answering".to_string(),
                                )),
                            ),
                        }
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
        }
    }
    tracing::debug!("proposal batcher stopped");
}

/// Resolves once this node is no longer the leader of `term`.
///
/// openraft 0.9 answers a write's responder when its entry is applied or truncated as a
/// conflict, but not when a snapshot installed from the next leader covers it: a leader that
/// was cut off, stepped down and caught up by a snapshot keeps the responder of its last,
/// never committed batch forever. The batcher's in-flight slot would stay taken and the node,
/// once elected again, could never write (seen in `scripts/bench/failover` cut mode).
async fn leadership_lost(
    mut metrics: watch::Receiver<openraft::RaftMetrics<NodeId, NodeInfo>>,
    term: u64,
) {
    loop {
        {
            let m = metrics.borrow_and_update();
            if m.current_term != term || m.state != ServerState::Leader {
                return;
            }
        }
        if metrics.changed().await.is_err() {
            // Raft stopped: the responder is dropped and answers `Err` on its own.
            return std::future::pending().await;
        }
    }
}

type Reply = oneshot::Sender<Result<(Vec<u8>, u64), ProposeError>>;

fn deliver(replies: Vec<Reply>, responses: CommandResponses, log_index: u64) {
    if responses.0.len() != replies.len() {
        tracing::error!(
            log_index,
            n_responses = responses.0.len(),
            n_commands = replies.len(),
            "state machine returned a wrong number of responses"
        );
        answer_all(
            replies,
            Err(ProposeError::Fatal(
                "state machine returned a wrong number of responses".to_string(),
            )),
        );
        return;
    }
    tracing::debug!(
        log_index,
        n_commands = replies.len(),
        "batch committed and applied"
    );
    for (reply, response) in replies.into_iter().zip(responses.0) {
        // A proposer that timed out meanwhile no longer listens: nothing to do.
        let _ = reply.send(Ok((response, log_index)));
    }
}

fn answer_all(replies: Vec<Reply>, result: Result<(Vec<u8>, u64), ProposeError>) {
    for reply in replies {
        let _ = reply.send(result.clone());
    }
}
