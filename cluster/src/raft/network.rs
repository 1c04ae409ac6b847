//! openraft's network over the Noise mesh.
//!
//! A [`MeshNetwork`] hands openraft one [`MeshClient`] per peer. AppendEntries and Vote travel
//! as requests on the mesh's `raft` channel, snapshot chunks (openraft's chunked transport:
//! `install_snapshot`, one chunk of `snapshot_max_chunk_size` bytes per RPC) on the `bulk`
//! channel, so a snapshot never delays a heartbeat. Each RPC waits at most openraft's
//! `hard_ttl` (for AppendEntries that is the heartbeat interval).
//!
//! A peer the mesh has no link to (direct or relayed) is reported as `Unreachable`, so openraft
//! backs off instead of retrying in a loop, and the log stays quiet (one debug line).
//!
//! The receiving side is [`serve_raft`]: it refuses an RPC unless the mesh peer it came from
//! is the member whose node id the RPC claims (node ids are bound to mesh keys through the
//! membership's [`NodeInfo`] records) and that member may lead: every Raft request is sent by a
//! leader or a candidate, which a learner never is.
//!
//! Both sides note when they last heard from each peer ([`Contacts`]): a follower how long its
//! leader has been silent (elections, pre-votes), a leader whether a majority still answers
//! (check-quorum).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::RPCTypes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::recovery::TailRecovery;
use super::types::{NodeId, NodeInfo, Raft, TypeConfig};
use super::wire::{decode, encode, RaftReply, RaftRpc};
use crate::mesh::{Channel, Incoming, Mesh, MeshError};

/// The Raft RPCs a node serves at once; more wait in the mesh's receive queue.
pub const MAX_CONCURRENT_RAFT_RPCS: usize = 64;
/// Backoff between RPCs to an unreachable peer.
const UNREACHABLE_BACKOFF: Duration = Duration::from_millis(500);

/// The error carried by `Unreachable` and network failures.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MeshRpcError(String);

/// When this node last heard from each peer at the Raft level: an RPC it accepted from the
/// peer (a follower hears its leader's AppendEntries), or the peer's answer to an RPC (a leader
/// hears its followers' acknowledgements).
#[derive(Debug, Default)]
pub struct Contacts {
    heard: Mutex<BTreeMap<NodeId, Instant>>,
}

impl Contacts {
    /// Notes that `peer` was heard now.
    pub fn heard_from(&self, peer: NodeId) {
        let mut heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        heard.insert(peer, Instant::now());
    }

    /// How long ago `peer` was last heard (`None`: never since this node started).
    pub fn silence(&self, peer: NodeId) -> Option<Duration> {
        let heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        heard.get(&peer).map(|at| at.elapsed())
    }
}

/// The network factory: one client per target, all over the same mesh.
#[derive(Clone)]
pub struct MeshNetwork {
    mesh: Mesh,
    contacts: Arc<Contacts>,
}

impl MeshNetwork {
    pub fn new(mesh: Mesh, contacts: Arc<Contacts>) -> Self {
        Self { mesh, contacts }
    }
}

/// A client sending one peer's RPCs through the mesh.
#[derive(Clone)]
pub struct MeshClient {
    mesh: Mesh,
    target: NodeId,
    name: String,
    contacts: Arc<Contacts>,
}

impl RaftNetworkFactory<TypeConfig> for MeshNetwork {
    type Network = MeshClient;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Self::Network {
        MeshClient {
            mesh: self.mesh.clone(),
            target,
            name: node.name.clone(),
            contacts: self.contacts.clone(),
        }
    }
}

impl MeshClient {
    async fn call<E: std::error::Error>(
        &self,
        channel: Channel,
        rpc: RaftRpc,
        option: &RPCOption,
        action: RPCTypes,
    ) -> Result<RaftReply, RPCError<NodeId, NodeInfo, E>> {
        let body =
            encode(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&MeshRpcError(e))))?;
        let ttl = option.hard_ttl();
        match self.mesh.request(&self.name, channel, body, ttl).await {
            Ok(reply) => {
                let reply = decode::<RaftReply>(&reply)
                    .map_err(|e| RPCError::Network(NetworkError::new(&MeshRpcError(e))))?;
                if !matches!(reply, RaftReply::Refused(_)) {
                    self.contacts.heard_from(self.target);
                }
                Ok(reply)
            }
            Err(error @ (MeshError::Unreachable(_) | MeshError::UnknownPeer(_))) => {
                tracing::debug!(target = self.target, peer = %self.name, %error, "peer unreachable");
                Err(RPCError::Unreachable(Unreachable::new(&MeshRpcError(
                    error.to_string(),
                ))))
            }
            Err(MeshError::Timeout { .. }) => Err(RPCError::Timeout(Timeout {
                action,
                id: 0,
                target: self.target,
                timeout: ttl,
            })),
            Err(error) => Err(RPCError::Network(NetworkError::new(&MeshRpcError(
                error.to_string(),
            )))),
        }
    }

    fn unexpected<E: std::error::Error>(&self, reply: RaftReply) -> RPCError<NodeId, NodeInfo, E> {
        let message = match reply {
            RaftReply::Refused(reason) => format!("{} refused the rpc: {reason}", self.name),
            _ => format!("{} answered with the wrong reply type", self.name),
        };
        RPCError::Network(NetworkError::new(&MeshRpcError(message)))
    }

    fn remote<E: std::error::Error>(
        &self,
        error: RaftError<NodeId, E>,
    ) -> RPCError<NodeId, NodeInfo, RaftError<NodeId, E>> {
        RPCError::RemoteError(RemoteError::new(self.target, error))
    }
}

impl RaftNetwork<TypeConfig> for MeshClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        match self
            .call(
                Channel::Raft,
                RaftRpc::AppendEntries(rpc),
                &option,
                RPCTypes::AppendEntries,
            )
            .await?
        {
            RaftReply::AppendEntries(Ok(response)) => Ok(response),
            RaftReply::AppendEntries(Err(error)) => Err(self.remote(error)),
            other => Err(self.unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, NodeInfo, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self
            .call(
                Channel::Bulk,
                RaftRpc::InstallSnapshot(rpc),
                &option,
                RPCTypes::InstallSnapshot,
            )
            .await?
        {
            RaftReply::InstallSnapshot(Ok(response)) => Ok(response),
            RaftReply::InstallSnapshot(Err(error)) => Err(self.remote(error)),
            other => Err(self.unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        match self
            .call(Channel::Raft, RaftRpc::Vote(rpc), &option, RPCTypes::Vote)
            .await?
        {
            RaftReply::Vote(Ok(response)) => Ok(response),
            RaftReply::Vote(Err(error)) => Err(self.remote(error)),
            other => Err(self.unexpected(other)),
        }
    }

    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(UNREACHABLE_BACKOFF))
    }
}

/// Decides whether the mesh peer `from` may send a Raft request as node `claimed`: it must be
/// that member, and one that may lead (a voter, or a node invited as a voter that is joining);
/// `Err` says why not.
pub trait SenderCheck: Send + Sync + 'static {
    fn check(&self, claimed: NodeId, from: &str) -> Result<(), String>;
    /// Whether the mesh peer `from` is in the Raft membership (a member or an invited node):
    /// only those are served message bodies. A backup-only store is a mesh peer outside it.
    fn in_membership(&self, from: &str) -> bool;
}

/// Answers the requests arriving on one mesh channel until `stop`, or until `handle` gives
/// up (returns `None`, e.g. when the engine is gone): at most `max_concurrent` at a time, each
/// in its own task inside `span(from)`. `handle` turns a request (sender, body) into the work
/// that yields the encoded answer (`None`: nothing to send). One-way messages are ignored.
pub(crate) async fn serve_requests<H, F>(
    mut incoming: mpsc::Receiver<Incoming>,
    stop: CancellationToken,
    max_concurrent: usize,
    span: fn(&str) -> tracing::Span,
    mut handle: H,
) where
    H: FnMut(String, bytes::Bytes) -> Option<F>,
    F: std::future::Future<Output = Option<bytes::Bytes>> + Send + 'static,
{
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(max_concurrent));
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => break,
            message = incoming.recv() => match message {
                Some(message) => message,
                None => break,
            },
        };
        let Some(responder) = message.responder else {
            tracing::debug!(from = %message.from, "one-way message on a request channel ignored");
            continue;
        };
        let span = span(&message.from);
        let Some(work) = handle(message.from, message.body) else {
            break;
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        tokio::spawn(
            async move {
                if let Some(body) = work.await {
                    if let Err(error) = responder.respond(body).await {
                        tracing::debug!(%error, "cannot answer a request");
                    }
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// Serves the Raft RPCs arriving on one mesh channel until `stop`.
pub(crate) async fn serve_raft(
    raft: Raft,
    incoming: mpsc::Receiver<Incoming>,
    check: std::sync::Arc<dyn SenderCheck>,
    contacts: Arc<Contacts>,
    recovery: Arc<TailRecovery>,
    objects: Option<Arc<dyn crate::app::AppStateMachine>>,
    stop: CancellationToken,
) {
    let span: fn(&str) -> tracing::Span = |from| tracing::debug_span!("raft_rpc", from = %from);
    serve_requests(
        incoming,
        stop,
        MAX_CONCURRENT_RAFT_RPCS,
        span,
        move |from, body| {
            let raft = raft.clone();
            let check = check.clone();
            let contacts = contacts.clone();
            let recovery = recovery.clone();
            let objects = objects.clone();
            Some(async move {
                let reply = handle_rpc(
                    &raft,
                    check.as_ref(),
                    &contacts,
                    &recovery,
                    objects,
                    &from,
                    &body,
                )
                .await;
                encode(&reply)
                    .map_err(|error| tracing::error!(%error, "cannot encode a raft reply"))
                    .ok()
            })
        },
    )
    .await
}

async fn handle_rpc(
    raft: &Raft,
    check: &dyn SenderCheck,
    contacts: &Contacts,
    recovery: &TailRecovery,
    objects: Option<Arc<dyn crate::app::AppStateMachine>>,
    from: &str,
    body: &[u8],
) -> RaftReply {
    let rpc = match decode::<RaftRpc>(body) {
        Ok(rpc) => rpc,
        Err(error) => {
            tracing::warn!(from, %error, "malformed raft rpc");
            return RaftReply::Refused(error);
        }
    };
    // Bodies are served to the members of the Raft membership (and invited nodes), never to
    // another mesh peer (a backup-only store), on this channel only (`bulk`), bounded per
    // answer.
    if let RaftRpc::FetchObjects(request) = rpc {
        if !check.in_membership(from) {
            tracing::warn!(from, "body fetch refused: not in the Raft membership");
            return RaftReply::Refused(format!("{from} is not in the membership"));
        }
        return match objects {
            Some(app) => super::fetch::serve(app, from, request).await,
            None => RaftReply::Refused("objects are not served on this channel".to_string()),
        };
    }
    let claimed = rpc.claimed_sender();
    if let Err(reason) = check.check(claimed, from) {
        tracing::warn!(from, claimed, %reason, "raft rpc refused");
        return RaftReply::Refused(reason);
    }
    contacts.heard_from(claimed);
    match rpc {
        RaftRpc::AppendEntries(rpc) => {
            let leader = (rpc.vote.is_committed()).then(|| rpc.vote.leader_id().get_term());
            let leader_commit = rpc.leader_commit;
            let reply = raft.append_entries(rpc).await;
            if let (Some(term), Ok(AppendEntriesResponse::Success)) = (leader, &reply) {
                recovery.heard_leader(term, leader_commit);
            }
            RaftReply::AppendEntries(reply)
        }
        RaftRpc::Vote(rpc) => {
            if !recovery.may_vote_for(rpc.last_log_id) {
                tracing::info!(
                    from,
                    candidate_last_log = ?rpc.last_log_id,
                    "vote refused: this node is recovering a lost log tail"
                );
                let vote = raft.metrics().borrow().vote;
                return RaftReply::Vote(Ok(VoteResponse {
                    vote,
                    vote_granted: false,
                    last_log_id: None,
                }));
            }
            RaftReply::Vote(raft.vote(rpc).await)
        }
        RaftRpc::InstallSnapshot(rpc) => {
            let reply = raft.install_snapshot(rpc).await;
            if reply.is_ok() {
                recovery.heard_snapshot();
            }
            RaftReply::InstallSnapshot(reply)
        }
        RaftRpc::FetchObjects(_) => RaftReply::Refused("unreachable".to_string()),
    }
}

#[cfg(test)]
pub(crate) async fn handle_rpc_for_test(
    engine: &std::sync::Arc<super::node::Engine>,
    from: &str,
    rpc: RaftRpc,
) -> RaftReply {
    let check = super::node::EngineCheck(std::sync::Arc::downgrade(engine));
    let body = encode(&rpc).expect("encode");
    handle_rpc(
        &engine.raft,
        &check,
        &engine.contacts,
        &engine.recovery,
        None,
        from,
        &body,
    )
    .await
}
