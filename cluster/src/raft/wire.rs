//! Messages between cluster nodes over the mesh, encoded with bincode.
//!
//! - Channel `raft`: [`RaftRpc`] requests (AppendEntries, Vote) answered by [`RaftReply`].
//! - Channel `bulk`: [`RaftRpc::InstallSnapshot`] chunks (openraft's chunked transport), so that
//!   a snapshot never delays a heartbeat.
//! - Channel `bulk` too: [`RaftRpc::FetchObjects`], a node installing a snapshot asking a peer
//!   for the bodies it lacks, answered by [`RaftReply::Objects`].
//! - Channel `writes`: [`ForwardRequest`], a follower's proposal for the leader.
//! - Channel `control`: [`ControlRequest`], membership and status.

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::LogId;
use serde::{Deserialize, Serialize};

use super::node::{ClusterStatus, ProposeError};
use super::types::{NodeId, TypeConfig};

/// A Raft RPC as sent over the mesh.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpc {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A node installing a snapshot asks for objects (bodies) it lacks. Sent by any member
    /// (a follower or a learner), not only a leader or a candidate.
    FetchObjects(FetchObjects),
}

/// Objects asked for by a node installing a snapshot (at most
/// [`crate::raft::fetch::MAX_FETCH_IDS`] ids).
#[derive(Debug, Serialize, Deserialize)]
pub struct FetchObjects {
    pub ids: Vec<crate::app::ObjectId>,
}

/// The answer to [`FetchObjects`].
#[derive(Debug, Serialize, Deserialize)]
pub struct FetchedObjects {
    /// Per id asked, in order: whether its bytes are in `bytes` (false: not held, or left for
    /// a later request because the answer reached its size bound).
    pub found: Vec<bool>,
    /// The found objects' bytes, in order (byte strings on the wire).
    pub bytes: super::types::CommandBatch,
}

impl RaftRpc {
    /// The node id the sender claims to be (the leader or the candidate).
    pub fn claimed_sender(&self) -> NodeId {
        match self {
            RaftRpc::AppendEntries(rpc) => rpc.vote.leader_id().voted_for().unwrap_or_default(),
            RaftRpc::Vote(rpc) => rpc.vote.leader_id().voted_for().unwrap_or_default(),
            RaftRpc::InstallSnapshot(rpc) => rpc.vote.leader_id().voted_for().unwrap_or_default(),
            // Not checked against a node id: served to any mesh peer (see `serve_raft`).
            RaftRpc::FetchObjects(_) => NodeId::default(),
        }
    }
}

/// The answer to a [`RaftRpc`].
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    /// The receiver refused the request before handing it to Raft (unknown sender, a sender
    /// whose mesh identity is not the node it claims, malformed bytes).
    Refused(String),
    /// The answer to [`RaftRpc::FetchObjects`].
    Objects(FetchedObjects),
}

/// A proposal forwarded by a follower to the leader.
#[derive(Debug, Serialize, Deserialize)]
pub struct ForwardRequest {
    pub command: Vec<u8>,
}

/// The leader's answer to a [`ForwardRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum ForwardReply {
    /// Committed and applied by the leader at `log_index`.
    Committed { log_index: u64, response: Vec<u8> },
    /// Not proposed: the receiver is not the leader (it names the one it knows).
    NotLeader { leader: Option<NodeId> },
    /// Proposed or refused, and failed; the outcome of an `Unavailable` is unknown.
    Failed(ProposeError),
}

/// Membership and status requests between nodes.
#[derive(Debug, Serialize, Deserialize)]
pub enum ControlRequest {
    /// This node's view (for `kermail cluster status`).
    Status,
    /// Invite a new node (run on the leader).
    Invite {
        name: String,
        site: String,
        learner: bool,
        valid_ms: u64,
    },
    /// An invited node asks to join (sent by the invitee, with its invitation key). The leader
    /// records its addresses, lets it catch up and promotes it.
    Join { node_id: NodeId, addrs: Vec<String> },
    /// Remove a node from the membership (run on the leader).
    Remove { name: String },
    /// The leader left the membership: the receiver should start an election now instead of
    /// waiting for its election timeout. Only a voter (or the receiver's leader) may ask.
    Elect,
    /// A voter that no longer hears its leader asks whether it may stand (pre-vote): the
    /// receiver grants it only when it does not hear a leader either, and vetoes it when it
    /// holds a better claim itself (a longer log, or the same log and a lower node id).
    /// Nothing changes on the receiver: no term, no vote.
    PreVote {
        /// The candidate's last log id.
        last_log: Option<LogId<NodeId>>,
    },
}

/// The answer to a [`ControlRequest::PreVote`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PreVoteVerdict {
    /// The receiver hears no leader and would vote for the candidate.
    Granted,
    /// The receiver still hears a leader (or leads): no election.
    Refused(String),
    /// The receiver hears no leader either, and would make a better candidate: let it stand.
    Veto(String),
}

/// The answer to a [`ControlRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum ControlReply {
    Status(Box<ClusterStatus>),
    /// An invitation token.
    Invited(String),
    /// Where a join stands.
    Join(JoinProgress),
    Done(String),
    NotLeader {
        leader: Option<NodeId>,
    },
    PreVote(PreVoteVerdict),
    Error(String),
}

/// The leader's view of a joining node, returned to it on each [`ControlRequest::Join`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinProgress {
    /// Admitted as a learner, catching up: the leader's last log index and what it matched.
    CatchingUp {
        leader_last_index: u64,
        matched_index: Option<u64>,
    },
    /// A full member (voter, or learner when invited as one).
    Member { voter: bool },
}

/// Encodes a wire message.
pub fn encode<T: Serialize>(value: &T) -> Result<bytes::Bytes, String> {
    bincode::serialize(value)
        .map(bytes::Bytes::from)
        .map_err(|e| format!("cannot encode a cluster message: {e}"))
}

/// Decodes a wire message from a peer. bincode's size limit bounds what a malformed length
/// could make us allocate.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .allow_trailing_bytes()
        .with_limit(bytes.len() as u64 * 2 + 1024)
        .deserialize(bytes)
        .map_err(|e| format!("malformed cluster message: {e}"))
}
