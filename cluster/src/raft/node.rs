//! [`Cluster`]: the handle the mail node holds. Wires the log store, the state machine and the
//! network into openraft, and batches concurrent proposals so that they share one fsync.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::ClientWriteError;
use openraft::{ServerState, SnapshotPolicy};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tracing::Instrument;

use crate::app::AppStateMachine;

use super::config::{ClusterConfig, RaftTimings};
use super::log_store::{LogStore, LogStoreProbe};
use super::network::UnreachableNetwork;
use super::state_machine::StateMachineStore;
use super::types::{CommandBatch, CommandResponses, NodeId, NodeInfo, Raft};

/// Largest command [`Cluster::propose`] accepts. Commands carry whole messages; the SMTP and
/// IMAP size limits are far below this.
pub const MAX_COMMAND_BYTES: usize = 256 << 20;
/// At most this many commands share one log entry (and one fsync).
pub const MAX_BATCH_COMMANDS: usize = 512;
/// A batch stops growing once it holds this many bytes (a single larger command goes alone).
/// Small enough that a batch stays inline in sled's segments (see `log_store.rs`).
pub const MAX_BATCH_BYTES: usize = 512 << 10;
/// Proposals waiting for a batch; `propose` waits for room (within its timeout) beyond this.
pub const PROPOSAL_QUEUE_CAPACITY: usize = 4096;
/// Batches submitted to Raft and not yet applied. A new batch is handed to Raft only once the
/// previous one is flushed (see [`LOG_BUSY_WAIT_MAX`]), so this bounds how far apply may lag
/// behind the log, not the batch size.
pub const MAX_IN_FLIGHT_BATCHES: usize = 4;
/// The batcher hands Raft its next batch when the log has flushed the previous one (or that
/// one was answered): proposals arriving during an fsync all share the next one, instead of a
/// small batch queued behind the fsync in progress. If neither happens within this time (a
/// flush done for something else, a stuck disk), the batch goes anyway.
pub const LOG_BUSY_WAIT_MAX: Duration = Duration::from_millis(50);
/// How long `shutdown` waits for openraft's tasks to release the log store.
const SHUTDOWN_RELEASE_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll period while waiting for a condition that has no notification (store release).
const POLL_INTERVAL: Duration = Duration::from_millis(5);
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
        source: sled::Error,
    },
    #[error("invalid raft settings: {0}")]
    Config(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("{0}")]
    Timeout(String),
    #[error("the cluster is shut down")]
    ShutDown,
}

/// Why a proposal did not commit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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
}

/// A proposal waiting for its batch.
struct Pending {
    command: Vec<u8>,
    reply: oneshot::Sender<Result<Vec<u8>, ProposeError>>,
}

struct Inner {
    raft: Raft,
    node_id: NodeId,
    name: String,
    site: String,
    timings: RaftTimings,
    proposals: mpsc::Sender<Pending>,
    stop_batcher: watch::Sender<bool>,
    is_shut_down: AtomicBool,
    log_probe: LogStoreProbe,
}

/// The replication engine of one node. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

impl Cluster {
    /// Opens the node's Raft storage under `config.data_dir`, restores the application from
    /// the newest snapshot, starts Raft, initialises a one-voter membership on a fresh store
    /// and, when this node is the only voter, waits (bounded) until it leads and has applied
    /// everything committed.
    ///
    /// `app` must hold no state yet: it is restored from the snapshot, then fed the log.
    pub async fn open(
        config: ClusterConfig,
        app: Arc<dyn AppStateMachine>,
    ) -> Result<Cluster, ClusterError> {
        let span = tracing::info_span!("cluster_open", name = %config.name, site = %config.site);
        Self::open_inner(config, app).instrument(span).await
    }

    async fn open_inner(
        config: ClusterConfig,
        app: Arc<dyn AppStateMachine>,
    ) -> Result<Cluster, ClusterError> {
        let timings = config.raft.clone();
        let data_dir = config.data_dir.clone();
        std::fs::create_dir_all(&data_dir).map_err(|source| ClusterError::Io {
            path: data_dir.clone(),
            source,
        })?;
        let raft_path = data_dir.join("raft");
        let open_path = raft_path.clone();
        let log_store = tokio::task::spawn_blocking(move || LogStore::open(&open_path))
            .await
            .map_err(|e| ClusterError::Raft(format!("log store open task failed: {e}")))?
            .map_err(|source| ClusterError::LogStore {
                path: raft_path.clone(),
                source,
            })?;
        let node_id =
            log_store
                .node_id_or_create()
                .await
                .map_err(|source| ClusterError::LogStore {
                    path: raft_path.clone(),
                    source,
                })?;
        let snapshot_dir = data_dir.join("snapshots");
        let state_machine =
            StateMachineStore::open(app, &snapshot_dir)
                .await
                .map_err(|source| ClusterError::Io {
                    path: snapshot_dir.clone(),
                    source,
                })?;
        let raft_config = raft_config(&timings)?;
        let log_probe = log_store.probe();
        let raft = Raft::new(
            node_id,
            Arc::new(raft_config),
            UnreachableNetwork,
            log_store,
            state_machine,
        )
        .await
        .map_err(|e| ClusterError::Raft(e.to_string()))?;

        let me = NodeInfo {
            name: config.name.clone(),
            site: config.site.clone(),
            addr: String::new(),
        };
        let is_initialized = raft
            .is_initialized()
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        if !is_initialized {
            tracing::info!(node_id, "fresh store: initialising a one-voter cluster");
            raft.initialize(BTreeMap::from([(node_id, me)]))
                .await
                .map_err(|e| ClusterError::Raft(e.to_string()))?;
        }

        // Metrics are published by the Raft task; wait until they show the membership (a
        // fresh store was just initialised, an old one has one in its log or snapshot).
        let metrics = raft
            .wait(Some(Duration::from_millis(timings.propose_timeout_ms)))
            .metrics(
                |m| m.membership_config.log_id().is_some(),
                "membership loaded",
            )
            .await
            .map_err(|e| ClusterError::Timeout(format!("raft did not load its membership: {e}")))?;
        let voters: Vec<NodeId> = metrics.membership_config.membership().voter_ids().collect();
        if voters == [node_id] {
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
        }

        let (proposals, proposal_rx) = mpsc::channel(PROPOSAL_QUEUE_CAPACITY);
        let (stop_batcher, stop_rx) = watch::channel(false);
        tokio::spawn(
            run_batcher(raft.clone(), proposal_rx, stop_rx, log_probe.clone())
                .instrument(tracing::info_span!("raft_batcher", node_id)),
        );
        let status_metrics = raft.metrics().borrow().clone();
        tracing::info!(
            node_id,
            term = status_metrics.current_term,
            applied = ?status_metrics.last_applied,
            "cluster open"
        );
        Ok(Cluster {
            inner: Arc::new(Inner {
                raft,
                node_id,
                name: config.name,
                site: config.site,
                timings,
                proposals,
                stop_batcher,
                is_shut_down: AtomicBool::new(false),
                log_probe,
            }),
        })
    }

    #[cfg(test)]
    pub(crate) fn inner_raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// Replicates `command` and returns the application's response once the command is
    /// committed and applied on this node.
    pub async fn propose(&self, command: Vec<u8>) -> Result<Vec<u8>, ProposeError> {
        let n_bytes = command.len();
        let span = tracing::debug_span!("raft_propose", node_id = self.inner.node_id, n_bytes);
        async {
            if n_bytes > MAX_COMMAND_BYTES {
                return Err(ProposeError::TooLarge {
                    size_bytes: n_bytes,
                    max_bytes: MAX_COMMAND_BYTES,
                });
            }
            if self.inner.is_shut_down.load(Ordering::Acquire) {
                return Err(ProposeError::Fatal("the cluster is shut down".to_string()));
            }
            let timeout_ms = self.inner.timings.propose_timeout_ms;
            let (reply, response) = oneshot::channel();
            let work = async {
                self.inner
                    .proposals
                    .send(Pending { command, reply })
                    .await
                    .map_err(|_| ProposeError::Fatal("the cluster is shut down".to_string()))?;
                response
                    .await
                    .map_err(|_| ProposeError::Fatal("raft stopped before answering".to_string()))?
            };
            match tokio::time::timeout(Duration::from_millis(timeout_ms), work).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!(timeout_ms, "proposal timed out");
                    Err(ProposeError::Unavailable(format!(
                        "no commit within {timeout_ms} ms (no leader or no quorum?)"
                    )))
                }
            }
        }
        .instrument(span)
        .await
    }

    /// A point-in-time view of this node.
    pub fn status(&self) -> ClusterStatus {
        let metrics = self.inner.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        ClusterStatus {
            node_id: self.inner.node_id,
            name: self.inner.name.clone(),
            site: self.inner.site.clone(),
            role: metrics.state.into(),
            term: metrics.current_term,
            leader: metrics.current_leader,
            last_log_index: metrics.last_log_index,
            committed_index: self.inner.log_probe.committed_index(),
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
            log_flushes: self.inner.log_probe.n_append_flushes(),
        }
    }

    /// Builds a snapshot of everything applied now and waits (bounded by the propose timeout
    /// plus the snapshot timeout) until it is written. Returns the snapshot's last index.
    pub async fn trigger_snapshot(&self) -> Result<Option<u64>, ClusterError> {
        if self.inner.is_shut_down.load(Ordering::Acquire) {
            return Err(ClusterError::ShutDown);
        }
        let raft = &self.inner.raft;
        let applied = raft.metrics().borrow().last_applied.map(|id| id.index);
        raft.trigger()
            .snapshot()
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let Some(applied) = applied else {
            return Ok(None);
        };
        let wait_ms =
            self.inner.timings.propose_timeout_ms + self.inner.timings.install_snapshot_timeout_ms;
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

    /// Stops Raft, flushes the log store and waits (bounded) until it is closed, so that the
    /// same data folder can be opened again. Proposals get `Fatal` afterwards. Idempotent.
    pub async fn shutdown(&self) -> Result<(), ClusterError> {
        if self.inner.is_shut_down.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let _ = self.inner.stop_batcher.send(true);
        let raft_result = self.inner.raft.shutdown().await;
        let flush_result = self.inner.log_probe.flush().await;
        let deadline = Instant::now() + SHUTDOWN_RELEASE_TIMEOUT;
        while !self.inner.log_probe.is_closed() {
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
        tracing::info!(node_id = self.inner.node_id, "cluster shut down");
        Ok(())
    }
}

fn raft_config(timings: &RaftTimings) -> Result<openraft::Config, ClusterError> {
    let snapshot_policy = if timings.snapshot_after_logs == 0 {
        SnapshotPolicy::Never
    } else {
        SnapshotPolicy::LogsSinceLast(timings.snapshot_after_logs)
    };
    openraft::Config {
        cluster_name: RAFT_CLUSTER_NAME.to_string(),
        heartbeat_interval: timings.heartbeat_interval_ms,
        election_timeout_min: timings.election_timeout_min_ms,
        election_timeout_max: timings.election_timeout_max_ms,
        install_snapshot_timeout: timings.install_snapshot_timeout_ms,
        snapshot_policy,
        max_in_snapshot_log_to_keep: timings.logs_kept_after_snapshot,
        ..Default::default()
    }
    .validate()
    .map_err(|e| ClusterError::Config(e.to_string()))
}

/// The batch handed to Raft last: the flush count before it was submitted, and whether it
/// was answered.
struct Submitted {
    flushes_before: u64,
    answered: Arc<AtomicBool>,
}

/// Waits (bounded by [`LOG_BUSY_WAIT_MAX`]) until the log flushed since `previous` was
/// submitted, or `previous` was answered. Returns false when the batcher must stop.
async fn wait_log_free(
    previous: &Submitted,
    probe: &LogStoreProbe,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let progress = probe.flushed().clone();
    let deadline = tokio::time::Instant::now() + LOG_BUSY_WAIT_MAX;
    loop {
        let notified = progress.notified();
        tokio::pin!(notified);
        // Registered before the check, so a flush between the check and the wait wakes us.
        notified.as_mut().enable();
        if probe.n_append_flushes() > previous.flushes_before
            || previous.answered.load(Ordering::Acquire)
        {
            return true;
        }
        tokio::select! {
            biased;
            _ = stop.changed() => return false,
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(deadline) => return true,
        }
    }
}

/// Packs waiting proposals into one log entry per batch. The next batch is formed when the log
/// has flushed the previous one, so everything that arrived during that fsync leaves together
/// (group commit) while the previous batch is applied; at most [`MAX_IN_FLIGHT_BATCHES`]
/// batches are unanswered at a time.
async fn run_batcher(
    raft: Raft,
    mut proposals: mpsc::Receiver<Pending>,
    mut stop: watch::Receiver<bool>,
    probe: LogStoreProbe,
) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BATCHES));
    let mut previous: Option<Submitted> = None;
    loop {
        let permit = tokio::select! {
            biased;
            _ = stop.changed() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        if let Some(previous) = previous.take() {
            if !wait_log_free(&previous, &probe, &mut stop).await {
                break;
            }
        }
        let first = tokio::select! {
            biased;
            _ = stop.changed() => break,
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
        let submitted = Submitted {
            flushes_before: probe.n_append_flushes(),
            answered: Arc::new(AtomicBool::new(false)),
        };
        let answered = submitted.answered.clone();
        let progress = probe.flushed().clone();
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
                previous = Some(submitted);
                tokio::spawn(
                    async move {
                        let outcome = receiver.await;
                        match outcome {
                            Ok(Ok(response)) => {
                                deliver(replies, response.data, response.log_id.index)
                            }
                            Ok(Err(ClientWriteError::ForwardToLeader(forward))) => answer_all(
                                replies,
                                Err(ProposeError::Unavailable(match forward.leader_id {
                                    Some(leader) => {
                                        format!("this node is not the leader; node {leader} is")
                                    }
                                    None => "no leader at the moment".to_string(),
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
                        answered.store(true, Ordering::Release);
                        progress.notify_waiters();
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
        }
    }
    tracing::debug!("proposal batcher stopped");
}

fn deliver(
    replies: Vec<oneshot::Sender<Result<Vec<u8>, ProposeError>>>,
    responses: CommandResponses,
    log_index: u64,
) {
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
        let _ = reply.send(Ok(response));
    }
}

fn answer_all(
    replies: Vec<oneshot::Sender<Result<Vec<u8>, ProposeError>>>,
    result: Result<Vec<u8>, ProposeError>,
) {
    for reply in replies {
        let _ = reply.send(result.clone());
    }
}
