//! What nodes ask each other besides Raft RPCs: forwarded writes, membership changes run on
//! the leader, status, and the joining node's driver; plus the task that keeps the mesh's
//! member list equal to the Raft membership.
//!
//! The data flow of a forwarded write: `Cluster::propose` on a follower sends a
//! [`ForwardRequest`] to the leader on the mesh's `writes` channel; the leader proposes it through its
//! batcher (group commit), answers [`ForwardReply::Committed`] with the log index once the entry
//! is committed and applied there; the follower then waits until its own state machine applied
//! that index and answers its caller. If the leader changes while the request is out, the
//! follower answers `Unavailable` at once (the outcome is unknown: the caller retries).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::membership::{self, InviteToken, JoinPhase, JoinState, PersistedIdentity};
use super::network::serve_requests;
use super::node::{
    Cluster, ClusterError, ClusterRole, ClusterStatus, Engine, JoinReport, ProposeError,
};
use super::types::{Joining, NodeId, NodeInfo};
use super::wire::{
    decode, encode, ControlReply, ControlRequest, ForwardReply, ForwardRequest, JoinProgress,
    PreVoteVerdict,
};
use crate::mesh::{Channel, Identity, Incoming, MeshError};

/// Forwarded writes a leader handles at once; more wait in the mesh's receive queue.
pub const MAX_CONCURRENT_FORWARDS: usize = 4096;
/// Control requests handled at once.
pub const MAX_CONCURRENT_CONTROL: usize = 64;
/// How long `cluster status` waits for each node's answer.
pub const STATUS_TIMEOUT: Duration = Duration::from_millis(1_500);
/// How often the joining node asks the leader where its join stands.
pub const JOIN_POLL: Duration = Duration::from_millis(500);
/// A learner is promoted once its replicated log is at most this many entries behind the
/// leader's.
pub const PROMOTION_LAG_MAX: u64 = 64;
/// How often the member list is recomputed even without a membership change (so that an
/// expired invitation's key is refused).
const MEMBER_REFRESH: Duration = Duration::from_secs(1);
/// How often a follower checks its leader's silence and a leader its quorum.
const LEADER_LINK_POLL: Duration = Duration::from_millis(25);
/// How long a member that left stays in the mesh's member list.
const DEPARTED_GRACE: Duration = Duration::from_secs(10);
/// Timeout of a control request whose handler changes the membership (two commits).
const MEMBERSHIP_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The outcome of one forward attempt.
pub(crate) enum Forwarded {
    /// Proposed (or definitively refused): the caller's answer.
    Done(Result<(Vec<u8>, u64), ProposeError>),
    /// Nothing was proposed: try again (with the leader Raft names next).
    Retry(String),
}

/// Sends `command` to `leader` and waits for commit there and apply here.
pub(crate) async fn forward(
    engine: &Engine,
    leader: NodeId,
    command: &[u8],
    deadline: tokio::time::Instant,
) -> Forwarded {
    let Some(name) = engine.name_of(leader) else {
        return Forwarded::Retry(format!("leader {leader} is not in the membership yet"));
    };
    let body = match encode(&ForwardRequest {
        command: command.to_vec(),
    }) {
        Ok(body) => body,
        Err(error) => return Forwarded::Done(Err(ProposeError::Fatal(error))),
    };
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    if remaining.is_zero() {
        return Forwarded::Done(Err(ProposeError::Unavailable(
            "no commit in time (leader unreachable?)".to_string(),
        )));
    }
    // If Raft names another leader (or none) while the request is out, the leader we asked
    // lost its position: answer at once rather than wait the whole timeout.
    let mut leader_watch = engine.leader.clone();
    let leader_changed = async {
        loop {
            if *leader_watch.borrow_and_update() != Some(leader) {
                return;
            }
            if leader_watch.changed().await.is_err() {
                return;
            }
        }
    };
    let reply = tokio::select! {
        reply = engine.mesh.request(&name, Channel::Writes, body, remaining) => reply,
        () = leader_changed => {
            return Forwarded::Done(Err(ProposeError::Unavailable(format!(
                "leader {name} lost its position while the write was in flight; outcome unknown, retry"
            ))));
        }
    };
    let reply = match reply {
        Ok(reply) => reply,
        Err(MeshError::Unreachable(_) | MeshError::UnknownPeer(_)) => {
            return Forwarded::Retry(format!("leader {name} unreachable"));
        }
        Err(MeshError::Timeout { .. }) => {
            return Forwarded::Done(Err(ProposeError::Unavailable(format!(
                "leader {name} did not commit in time (no quorum?)"
            ))));
        }
        Err(error) => {
            return Forwarded::Done(Err(ProposeError::Unavailable(format!(
                "forward to {name} failed: {error}"
            ))))
        }
    };
    match decode::<ForwardReply>(&reply) {
        Ok(ForwardReply::Committed {
            log_index,
            response,
        }) => Forwarded::Done(
            engine
                .wait_applied(log_index, deadline)
                .await
                .map(|()| (response, log_index)),
        ),
        Ok(ForwardReply::NotLeader { leader }) => {
            Forwarded::Retry(format!("{name} is not the leader (it names {leader:?})"))
        }
        Ok(ForwardReply::Failed(error)) => Forwarded::Done(Err(error)),
        Err(error) => Forwarded::Done(Err(ProposeError::Unavailable(error))),
    }
}

/// Whether the mesh peer `name` is a full member (not an invitation waiting for its node).
fn is_full_member(engine: &Engine, name: &str) -> bool {
    engine
        .member_named(name)
        .is_some_and(|(_, info, _)| info.joining.as_ref().is_none_or(|j| j.connected))
}

/// The leader side of forwarded writes.
pub(crate) async fn serve_forward(
    engine: Weak<Engine>,
    incoming: mpsc::Receiver<Incoming>,
    stop: CancellationToken,
) {
    let span: fn(&str) -> tracing::Span =
        |from| tracing::debug_span!("forwarded_write", from = %from);
    serve_requests(
        incoming,
        stop,
        MAX_CONCURRENT_FORWARDS,
        span,
        move |from, body| {
            let engine = engine.upgrade()?;
            Some(async move {
                let reply = if !is_full_member(&engine, &from) {
                    warn!(from, "forwarded write refused: not a member");
                    ForwardReply::Failed(ProposeError::Fatal(format!("{from} is not a member")))
                } else {
                    match decode::<ForwardRequest>(&body) {
                        Err(error) => ForwardReply::Failed(ProposeError::Fatal(error)),
                        Ok(request) => leader_propose(&engine, request.command).await,
                    }
                };
                encode(&reply).ok()
            })
        },
    )
    .await
}

async fn leader_propose(engine: &Engine, command: Vec<u8>) -> ForwardReply {
    let (leader, state) = {
        let metrics = engine.raft.metrics();
        let m = metrics.borrow();
        (m.current_leader, m.state)
    };
    if leader != Some(engine.node_id) || state != ServerState::Leader {
        return ForwardReply::NotLeader { leader };
    }
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(engine.timings.propose_timeout_ms);
    match engine.propose_local(command, deadline).await {
        Ok((response, log_index)) => ForwardReply::Committed {
            log_index,
            response,
        },
        Err(error) => ForwardReply::Failed(error),
    }
}

/// Control requests from other nodes.
pub(crate) async fn serve_control(
    engine: Weak<Engine>,
    incoming: mpsc::Receiver<Incoming>,
    stop: CancellationToken,
) {
    let span: fn(&str) -> tracing::Span = |from| tracing::info_span!("control", from = %from);
    serve_requests(
        incoming,
        stop,
        MAX_CONCURRENT_CONTROL,
        span,
        move |from, body| {
            let engine = engine.upgrade()?;
            Some(async move {
                let reply = match decode::<ControlRequest>(&body) {
                    Err(error) => ControlReply::Error(error),
                    Ok(request) => handle_control(&engine, &from, request).await,
                };
                encode(&reply).ok()
            })
        },
    )
    .await
}

pub(crate) async fn handle_control(
    engine: &Arc<Engine>,
    from: &str,
    request: ControlRequest,
) -> ControlReply {
    if let ControlRequest::Join { node_id, addrs } = request {
        // The only request an invited node may send.
        return match engine.name_of(node_id) {
            Some(name) if name == from => leader_join(engine, node_id, addrs).await,
            _ => {
                warn!(
                    from,
                    node_id, "join refused: the sender is not that invitation"
                );
                ControlReply::Error(format!("{from} holds no invitation for node {node_id}"))
            }
        };
    }
    if !is_full_member(engine, from) {
        warn!(from, "control request refused: not a member");
        return ControlReply::Error(format!("{from} is not a member"));
    }
    // Control authority: only voters change the membership or start elections. A learner may
    // ask for status and take itself out (`cluster leave`), nothing else.
    let from_voter = engine.member_named(from).is_some_and(|(_, _, voter)| voter);
    let allowed = match &request {
        ControlRequest::Status => true,
        ControlRequest::Remove { name } => from_voter || name == from,
        ControlRequest::Elect => {
            // The leader that just left (no longer a voter) hands over to a voter.
            let leader = engine.raft.metrics().borrow().current_leader;
            from_voter || leader.is_some_and(|l| engine.name_of(l).as_deref() == Some(from))
        }
        ControlRequest::Invite { .. } | ControlRequest::PreVote { .. } => from_voter,
        ControlRequest::Join { .. } => false,
    };
    if !allowed {
        warn!(
            from,
            request = request_kind(&request),
            "control request refused: the sender is a learner"
        );
        return ControlReply::Error(format!(
            "refused: {from} is a learner; only voters may {}",
            request_kind(&request)
        ));
    }
    match request {
        ControlRequest::Status => ControlReply::Status(Box::new(engine.status())),
        ControlRequest::Invite {
            name,
            site,
            learner,
            valid_ms,
        } => match leader_invite(engine, &name, &site, learner, valid_ms).await {
            Ok(token) => ControlReply::Invited(token),
            Err(reply) => reply,
        },
        ControlRequest::Remove { name } => match leader_remove(engine, &name).await {
            Ok(message) => ControlReply::Done(message),
            Err(reply) => reply,
        },
        ControlRequest::Elect if engine.recovery.is_active() => ControlReply::Error(
            "refused: this node is recovering a lost log tail and does not stand".to_string(),
        ),
        ControlRequest::Elect => {
            info!(from, "the leader left: starting an election");
            match engine.raft.trigger().elect().await {
                Ok(()) => ControlReply::Done("election started".to_string()),
                Err(error) => ControlReply::Error(error.to_string()),
            }
        }
        ControlRequest::PreVote { last_log } => {
            ControlReply::PreVote(pre_vote_verdict(engine, from, last_log))
        }
        ControlRequest::Join { .. } => ControlReply::Error("unreachable".to_string()),
    }
}

fn request_kind(request: &ControlRequest) -> &'static str {
    match request {
        ControlRequest::Status => "ask for status",
        ControlRequest::Invite { .. } => "invite nodes",
        ControlRequest::Join { .. } => "join",
        ControlRequest::Remove { .. } => "remove nodes",
        ControlRequest::Elect => "start elections",
        ControlRequest::PreVote { .. } => "stand for election",
    }
}

fn not_leader(engine: &Engine) -> Option<ControlReply> {
    let metrics = engine.raft.metrics();
    let m = metrics.borrow();
    if m.current_leader == Some(engine.node_id) && m.state == ServerState::Leader {
        None
    } else {
        Some(ControlReply::NotLeader {
            leader: m.current_leader,
        })
    }
}

fn membership_error(error: RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>) -> ControlReply {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
            ControlReply::NotLeader {
                leader: forward.leader_id,
            }
        }
        other => ControlReply::Error(format!("membership change failed: {other}")),
    }
}

/// A membership change in progress, if any: a joint configuration or a node still joining
/// (other than `except`). Expired invitations do not count.
fn change_in_progress(engine: &Engine, except: Option<NodeId>) -> Option<String> {
    let metrics = engine.raft.metrics();
    let m = metrics.borrow();
    let membership = m.membership_config.membership();
    if membership.get_joint_config().len() > 1 {
        return Some("a membership change is being committed; retry in a moment".to_string());
    }
    let now = membership::unix_ms();
    let found = membership
        .nodes()
        .filter(|(id, _)| Some(**id) != except)
        .find(|(_, info)| info.joining.is_some() && !membership::invitation_expired(info, now))
        .map(|(_, info)| {
            format!(
                "node {} is still joining (one membership change at a time): wait until \
                 `kermail cluster join` finishes on it, or cancel with `kermail cluster remove {}`",
                info.name, info.name
            )
        });
    found
}

fn expired_invitations(engine: &Engine) -> BTreeSet<NodeId> {
    let metrics = engine.raft.metrics();
    let m = metrics.borrow();
    let now = membership::unix_ms();
    m.membership_config
        .membership()
        .nodes()
        .filter(|(_, info)| membership::invitation_expired(info, now))
        .map(|(id, _)| *id)
        .collect()
}

fn fresh_node_id(engine: &Engine) -> NodeId {
    let metrics = engine.raft.metrics();
    let m = metrics.borrow();
    let membership = m.membership_config.membership();
    loop {
        let id: NodeId = rand::random();
        if id != 0 && membership.get_node(&id).is_none() {
            return id;
        }
    }
}

/// Validates a node or site name: it shows in status, logs and the mesh.
pub fn check_label(what: &str, label: &str) -> Result<(), String> {
    let ok = !label.is_empty()
        && label.len() <= 63
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {what} {label:?}: use 1 to 63 letters, digits, '-', '_' or '.'"
        ))
    }
}

/// Invites a node (this node leads). Records the invitation as a learner whose key is a key
/// pair made here, and returns the token.
async fn leader_invite(
    engine: &Arc<Engine>,
    name: &str,
    site: &str,
    learner: bool,
    valid_ms: u64,
) -> Result<String, ControlReply> {
    check_label("node name", name).map_err(ControlReply::Error)?;
    check_label("site", site).map_err(ControlReply::Error)?;
    if let Some(reply) = not_leader(engine) {
        return Err(reply);
    }
    // Expired invitations are cleared first.
    let expired = expired_invitations(engine);
    if !expired.is_empty() {
        engine
            .raft
            .change_membership(ChangeMembers::RemoveNodes(expired), false)
            .await
            .map_err(membership_error)?;
    }
    if let Some(reason) = change_in_progress(engine, None) {
        return Err(ControlReply::Error(format!("refused: {reason}")));
    }
    if engine.member_named(name).is_some() {
        return Err(ControlReply::Error(format!(
            "a member is already called {name}; pick another name or remove it first"
        )));
    }
    let identity = Identity::generate().map_err(|e| ControlReply::Error(e.to_string()))?;
    let node_id = fresh_node_id(engine);
    let expires_unix_ms = membership::unix_ms() + valid_ms;
    let info = NodeInfo {
        name: name.to_string(),
        site: site.to_string(),
        public_key: identity.public_key_base64(),
        addrs: Vec::new(),
        joining: Some(Joining {
            expires_unix_ms,
            as_voter: !learner,
            connected: false,
        }),
    };
    engine
        .raft
        .change_membership(
            ChangeMembers::AddNodes(BTreeMap::from([(node_id, info)])),
            true,
        )
        .await
        .map_err(membership_error)?;
    let members: Vec<(NodeId, NodeInfo)> = {
        let metrics = engine.raft.metrics();
        let m = metrics.borrow();
        m.membership_config
            .membership()
            .nodes()
            .filter(|(_, info)| info.joining.is_none())
            .map(|(id, info)| (*id, info.clone()))
            .collect()
    };
    let token = InviteToken {
        cluster_id: engine.mesh_config.cluster_id.clone(),
        psk_base64: engine.mesh_config.psk_base64.clone(),
        node_id,
        name: name.to_string(),
        site: site.to_string(),
        private_key_base64: crate::mesh::identity::encode_key(identity.private_key()),
        learner,
        expires_unix_ms,
        members,
    };
    info!(name, site, learner, node_id, "invitation recorded");
    Ok(token.encode())
}

/// An invited node asks to join (this node should lead): records its addresses, and once it
/// has caught up promotes it.
async fn leader_join(engine: &Arc<Engine>, node_id: NodeId, addrs: Vec<String>) -> ControlReply {
    if let Some(reply) = not_leader(engine) {
        return reply;
    }
    let (info, voter, leader_last, matched) = {
        let metrics = engine.raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        let Some(info) = membership.get_node(&node_id).cloned() else {
            return ControlReply::Error(
                "no invitation for this node any more (expired or removed): ask for a new one"
                    .to_string(),
            );
        };
        let voter = membership.voter_ids().any(|id| id == node_id);
        let matched = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&node_id).cloned().flatten())
            .map(|id| id.index);
        (info, voter, m.last_log_index.unwrap_or(0), matched)
    };
    let Some(joining) = info.joining.clone() else {
        return ControlReply::Join(JoinProgress::Member { voter });
    };
    if !joining.connected {
        if joining.expires_unix_ms <= membership::unix_ms() {
            return ControlReply::Error("the invitation expired: ask for a new one".to_string());
        }
        let mut updated = info.clone();
        updated.addrs = addrs;
        updated.joining = Some(Joining {
            connected: true,
            ..joining.clone()
        });
        info!(name = %info.name, "invited node connected; it catches up as a learner");
        if let Err(error) = engine
            .raft
            .change_membership(
                ChangeMembers::SetNodes(BTreeMap::from([(node_id, updated)])),
                true,
            )
            .await
        {
            return membership_error(error);
        }
        return ControlReply::Join(JoinProgress::CatchingUp {
            leader_last_index: leader_last,
            matched_index: matched,
        });
    }
    let caught_up = matched.is_some_and(|m| m + PROMOTION_LAG_MAX >= leader_last);
    if !caught_up {
        return ControlReply::Join(JoinProgress::CatchingUp {
            leader_last_index: leader_last,
            matched_index: matched,
        });
    }
    if joining.as_voter && !voter {
        info!(name = %info.name, "caught up: promoting to voter");
        if let Err(error) = engine
            .raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([node_id])), true)
            .await
        {
            return membership_error(error);
        }
    }
    let mut updated = info.clone();
    updated.joining = None;
    if let Err(error) = engine
        .raft
        .change_membership(
            ChangeMembers::SetNodes(BTreeMap::from([(node_id, updated)])),
            true,
        )
        .await
    {
        return membership_error(error);
    }
    info!(name = %info.name, voter = joining.as_voter, "node joined");
    ControlReply::Join(JoinProgress::Member {
        voter: joining.as_voter,
    })
}

/// Removes a member (this node should lead).
async fn leader_remove(engine: &Arc<Engine>, name: &str) -> Result<String, ControlReply> {
    if let Some(reply) = not_leader(engine) {
        return Err(reply);
    }
    let Some((node_id, _, voter)) = engine.member_named(name) else {
        return Err(ControlReply::Error(format!("no member called {name}")));
    };
    if let Some(reason) = change_in_progress(engine, Some(node_id)) {
        return Err(ControlReply::Error(format!("refused: {reason}")));
    }
    if voter {
        let n_voters = {
            let metrics = engine.raft.metrics();
            let m = metrics.borrow();
            m.membership_config.membership().voter_ids().count()
        };
        if n_voters <= 1 {
            return Err(ControlReply::Error(
                "refused: this is the last voter of the cluster".to_string(),
            ));
        }
        engine
            .raft
            .change_membership(
                ChangeMembers::RemoveVoters(BTreeSet::from([node_id])),
                false,
            )
            .await
            .map_err(membership_error)?;
    } else {
        engine
            .raft
            .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([node_id])), false)
            .await
            .map_err(membership_error)?;
    }
    info!(name, "member removed");
    if node_id == engine.node_id {
        // This leader left: ask the most up-to-date remaining voter to stand now rather than
        // let everyone wait an election timeout.
        hand_over(engine).await;
    }
    Ok(format!("{name} removed from the cluster"))
}

async fn hand_over(engine: &Arc<Engine>) {
    let candidate = {
        let metrics = engine.raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        m.replication.as_ref().and_then(|replication| {
            replication
                .iter()
                .filter(|(id, _)| voters.contains(id))
                .max_by_key(|(_, matched)| matched.map(|l| l.index))
                .and_then(|(id, _)| membership.get_node(id).map(|info| info.name.clone()))
        })
    };
    let Some(name) = candidate else {
        return;
    };
    if let Ok(body) = encode(&ControlRequest::Elect) {
        let timeout = Duration::from_millis(engine.timings.heartbeat_interval_ms * 10);
        if let Err(error) = engine
            .mesh
            .request(&name, Channel::Control, body, timeout)
            .await
        {
            warn!(%name, %error, "could not hand the leadership over; an election will follow");
        }
    }
}

/// Sends a control request to the leader (or runs it here when this node leads), following
/// `NotLeader` answers, within `timeout`.
async fn to_leader(
    engine: &Arc<Engine>,
    request: ControlRequest,
    timeout: Duration,
) -> Result<ControlReply, ClusterError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut metrics = engine.raft.metrics();
    loop {
        let leader = metrics.borrow_and_update().current_leader;
        let reply = match leader {
            Some(leader) if leader == engine.node_id => {
                let request = copy_request(&request);
                handle_control(engine, &engine.name.clone(), request).await
            }
            Some(leader) => {
                let Some(name) = engine.name_of(leader) else {
                    return Err(ClusterError::Refused(format!("leader {leader} unknown")));
                };
                let body = encode(&request).map_err(ClusterError::Raft)?;
                let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                match engine
                    .mesh
                    .request(&name, Channel::Control, body, remaining)
                    .await
                {
                    Ok(reply) => decode::<ControlReply>(&reply).map_err(ClusterError::Raft)?,
                    Err(error) => {
                        return Err(ClusterError::Refused(format!(
                            "cannot reach the leader {name}: {error}"
                        )))
                    }
                }
            }
            None => ControlReply::NotLeader { leader: None },
        };
        match reply {
            ControlReply::NotLeader { .. } => {
                match tokio::time::timeout_at(deadline, metrics.changed()).await {
                    Ok(Ok(())) => {}
                    Err(_) => {
                        return Err(ClusterError::Refused(
                            "no leader: the cluster has no quorum right now".to_string(),
                        ))
                    }
                    // Raft stopped: `changed` would return at once, every time.
                    Ok(Err(_)) => return Err(ClusterError::Refused("raft stopped".to_string())),
                }
            }
            other => return Ok(other),
        }
    }
}

fn copy_request(request: &ControlRequest) -> ControlRequest {
    match request {
        ControlRequest::Status => ControlRequest::Status,
        ControlRequest::Invite {
            name,
            site,
            learner,
            valid_ms,
        } => ControlRequest::Invite {
            name: name.clone(),
            site: site.clone(),
            learner: *learner,
            valid_ms: *valid_ms,
        },
        ControlRequest::Join { node_id, addrs } => ControlRequest::Join {
            node_id: *node_id,
            addrs: addrs.clone(),
        },
        ControlRequest::Remove { name } => ControlRequest::Remove { name: name.clone() },
        ControlRequest::Elect => ControlRequest::Elect,
        ControlRequest::PreVote { last_log } => ControlRequest::PreVote {
            last_log: *last_log,
        },
    }
}

/// Keeps the mesh's member list equal to the Raft membership (plus the token's members while
/// this node joins and knows no membership yet), and this node's own record up to date.
pub(crate) async fn follow_membership(engine: Weak<Engine>, stop: CancellationToken) {
    let Some(mut metrics) = engine.upgrade().map(|e| e.raft.metrics()) else {
        return;
    };
    let mut last: Option<Vec<crate::mesh::Member>> = None;
    // Members that left stay reachable a little longer, so that the answer to a `leave` and
    // the commit of their removal still reach them.
    let mut departed: BTreeMap<String, (crate::mesh::Member, tokio::time::Instant)> =
        BTreeMap::new();
    let mut last_raft: Option<Vec<crate::mesh::Member>> = None;
    loop {
        let Some(engine) = engine.upgrade() else {
            return;
        };
        let members = {
            let m = metrics.borrow_and_update();
            let membership = m.membership_config.membership();
            if membership.nodes().next().is_none() {
                None
            } else {
                Some(membership::mesh_members(
                    membership.nodes(),
                    membership::unix_ms(),
                ))
            }
        };
        refresh_own_record(&engine).await;
        if let Some(mut members) = members {
            let now = tokio::time::Instant::now();
            if let Some(previous) = &last_raft {
                for member in previous {
                    if !members.iter().any(|m| m.name == member.name) {
                        departed
                            .entry(member.name.clone())
                            .or_insert_with(|| (member.clone(), now + DEPARTED_GRACE));
                    }
                }
            }
            last_raft = Some(members.clone());
            departed.retain(|name, (_, until)| {
                *until > now && !members.iter().any(|m| &m.name == name)
            });
            members.extend(departed.values().map(|(member, _)| member.clone()));
            // Backup-only stores: on the mesh, never in the Raft membership.
            for peer in &engine.backup_peers {
                if !members.iter().any(|m| m.name == peer.name) {
                    members.push(peer.clone());
                }
            }
            members.sort_by(|a, b| a.name.cmp(&b.name));
            if last.as_ref() != Some(&members) {
                let pending_names: Vec<String> = {
                    let m = metrics.borrow();
                    m.membership_config
                        .membership()
                        .nodes()
                        .filter(|(_, info)| membership::is_pending_invitation(info))
                        .map(|(_, info)| info.name.clone())
                        .collect()
                };
                let (pending, full): (Vec<_>, Vec<_>) = members
                    .iter()
                    .cloned()
                    .partition(|m| pending_names.contains(&m.name));
                match engine.mesh.set_members(full) {
                    Ok(()) => {
                        tracing::debug!(n_members = members.len(), "mesh members updated");
                    }
                    Err(MeshError::NotAMember) => {
                        tracing::info!("this node is not in the membership (any more)");
                    }
                    Err(error) => warn!(%error, "cannot update the mesh members"),
                }
                if let Err(error) = engine.mesh.set_pending(pending) {
                    warn!(%error, "cannot update the pending invitations");
                }
                last = Some(members);
            }
        }
        drop(engine);
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = metrics.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(MEMBER_REFRESH) => {}
        }
    }
}

/// What [`run_elections`] remembers between two polls.
struct ElectionState {
    /// The silence after which this follower suspects its leader, drawn at random in
    /// `[election_timeout_min_ms, election_timeout_max_ms)` after each attempt.
    timeout: Duration,
    /// No pre-vote before this instant.
    next_attempt: tokio::time::Instant,
    /// Pre-votes in a row vetoed by a better candidate.
    n_vetoes: u32,
    /// When this node began to suspect the current leader (for the log lines).
    suspected_at: Option<tokio::time::Instant>,
    /// The last state seen, to log transitions.
    last_state: ServerState,
}

/// Pre-votes in a row a voter lets a better candidate veto before it stands anyway (the better
/// one may reach this node but not a majority).
const MAX_VETOES_IN_A_ROW: u32 = 3;

fn random_between(min_ms: u64, max_ms: u64) -> Duration {
    let max_ms = max_ms.max(min_ms + 1);
    Duration::from_millis(rand::Rng::gen_range(
        &mut rand::thread_rng(),
        min_ms..max_ms,
    ))
}

/// Whether this node has lost its leader `leader`: silent for at least `threshold` (and for
/// at least openraft's leader lease, so that a vote would no longer be refused), or silent for
/// the lease and its mesh link is down (its process died: the kernel closed the sockets).
fn leader_lost(engine: &Engine, leader: NodeId, threshold: Duration) -> bool {
    let silence = engine.contacts.silence(leader).unwrap_or(Duration::MAX);
    let lease = super::node::leader_lease(&engine.timings);
    if silence < lease {
        return false;
    }
    silence >= threshold || link_down(engine, leader)
}

fn link_down(engine: &Engine, node: NodeId) -> bool {
    let Some(name) = engine.name_of(node) else {
        return true;
    };
    engine
        .mesh
        .status()
        .peers
        .iter()
        .find(|p| p.name == name)
        .is_none_or(|p| p.link == crate::mesh::LinkState::Down)
}

/// Elections, run by the application instead of openraft's timer (which is off:
/// `enable_elect: false`), and check-quorum.
///
/// On a voter that follows (or stands): once its leader has been silent for a random
/// election timeout, or its mesh link to the leader drops (the leader's process died), it asks
/// the other voters for a pre-vote ([`ControlRequest::PreVote`]). They grant it only when they
/// do not hear a leader either, and veto it when they would make a better candidate (longer
/// log, or the same log and a lower id), so exactly one node stands and wins in one round trip.
/// With a majority of grants it starts the election (`trigger().elect()`). Nothing raises a
/// term without a majority agreeing that the leader is gone: a node cut off alone keeps its
/// term, and when the cut heals it follows the working leader without an election.
///
/// On the leader: when fewer than a majority of the voters answered within the minimum
/// election timeout, it stops accepting writes (`Engine::quorum`), so its clients get a
/// temporary failure at once instead of waiting for a commit that cannot come.
pub(crate) async fn run_elections(engine: Weak<Engine>, stop: CancellationToken) {
    let Some(timings) = engine.upgrade().map(|e| e.timings.clone()) else {
        return;
    };
    let mut state = ElectionState {
        timeout: random_between(
            timings.election_timeout_min_ms,
            timings.election_timeout_max_ms,
        ),
        next_attempt: tokio::time::Instant::now(),
        n_vetoes: 0,
        suspected_at: None,
        last_state: ServerState::Learner,
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(LEADER_LINK_POLL) => {}
        }
        let Some(engine) = engine.upgrade() else {
            return;
        };
        election_step(&engine, &timings, &mut state).await;
    }
}

async fn election_step(
    engine: &Arc<Engine>,
    timings: &super::config::RaftTimings,
    state: &mut ElectionState,
) {
    let (leader, term, server_state, voters, last_log) = {
        let metrics = engine.raft.metrics();
        let m = metrics.borrow();
        let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
        (
            m.current_leader,
            m.current_term,
            m.state,
            voters,
            engine.raft.data_metrics().borrow().last_log,
        )
    };
    let now = tokio::time::Instant::now();
    if server_state != state.last_state {
        if server_state == ServerState::Leader {
            let since = state
                .suspected_at
                .map(|t| now.duration_since(t).as_millis());
            info!(term, ms_since_suspicion = ?since, "elected leader");
        } else if state.last_state == ServerState::Leader {
            info!(term, state = ?server_state, "no longer the leader");
        }
        state.last_state = server_state;
    }
    let majority = voters.len() / 2 + 1;
    if server_state == ServerState::Leader {
        // Only a lone voter leads without standing: its log is the cluster's.
        engine.recovery.leading(engine.node_id);
        state.suspected_at = None;
        let threshold = Duration::from_millis(timings.election_timeout_min_ms);
        let heard = voters
            .iter()
            .filter(|id| {
                **id == engine.node_id
                    || engine
                        .contacts
                        .silence(**id)
                        .is_some_and(|silence| silence < threshold)
            })
            .count();
        let has_quorum = heard >= majority;
        let changed = engine.quorum.send_if_modified(|known| {
            let changed = *known != has_quorum;
            *known = has_quorum;
            changed
        });
        if changed {
            if has_quorum {
                info!(term, "a majority answers again: accepting writes");
            } else {
                warn!(
                    term,
                    heard,
                    n_voters = voters.len(),
                    "check-quorum: no answer from a majority within the election timeout; refusing writes"
                );
            }
        }
        return;
    }
    engine.quorum.send_if_modified(|known| {
        let changed = !*known;
        *known = true;
        changed
    });
    if !voters.contains(&engine.node_id) || server_state == ServerState::Shutdown {
        return;
    }
    let applied = engine.raft.data_metrics().borrow().last_applied;
    if engine.recovery.poll(applied, engine.node_id) {
        // A torn log tail: this node may lack entries it acknowledged; it does not stand.
        return;
    }
    let leader = leader.filter(|l| *l != engine.node_id);
    let hb = timings.heartbeat_interval_ms;
    let stand_now = engine
        .stand_now
        .swap(false, std::sync::atomic::Ordering::AcqRel);
    let suspect = match leader {
        Some(leader) => {
            leader_lost(engine, leader, state.timeout)
                || (stand_now && leader_lost(engine, leader, Duration::from_millis(2 * hb)))
        }
        // No leader known (a candidate, or a node that just started): the silence of the
        // last leader heard still counts, but nobody to wait for.
        None => true,
    };
    if !suspect {
        state.suspected_at = None;
        state.n_vetoes = 0;
        return;
    }
    if state.suspected_at.is_none() {
        state.suspected_at = Some(now);
        if let Some(leader) = leader {
            let silence_ms = engine.contacts.silence(leader).map(|d| d.as_millis());
            info!(
                leader,
                term,
                ?silence_ms,
                link_down = link_down(engine, leader),
                "leader lost: asking the other voters for a pre-vote"
            );
        }
    }
    if now < state.next_attempt && !stand_now {
        return;
    }
    let mut asks = JoinSet::new();
    let body = match encode(&ControlRequest::PreVote { last_log }) {
        Ok(body) => body,
        Err(error) => {
            warn!(%error, "cannot encode a pre-vote");
            return;
        }
    };
    for voter in voters.iter().copied() {
        if voter == engine.node_id || Some(voter) == leader {
            continue;
        }
        let Some(name) = engine.name_of(voter) else {
            continue;
        };
        let mesh = engine.mesh.clone();
        let body = body.clone();
        asks.spawn(async move {
            let reply = mesh
                .request(&name, Channel::Control, body, Duration::from_millis(hb))
                .await;
            let verdict = match reply {
                Ok(bytes) => match decode::<ControlReply>(&bytes) {
                    Ok(ControlReply::PreVote(verdict)) => verdict,
                    Ok(other) => PreVoteVerdict::Refused(format!("unexpected answer {other:?}")),
                    Err(error) => PreVoteVerdict::Refused(error),
                },
                Err(error) => PreVoteVerdict::Refused(error.to_string()),
            };
            (name, verdict)
        });
    }
    let mut n_granted = 1;
    let mut veto: Option<String> = None;
    let mut refusals: Vec<String> = Vec::new();
    while let Some(joined) = asks.join_next().await {
        let Ok((name, verdict)) = joined else {
            continue;
        };
        match verdict {
            PreVoteVerdict::Granted => n_granted += 1,
            PreVoteVerdict::Veto(reason) => veto = Some(format!("{name}: {reason}")),
            PreVoteVerdict::Refused(reason) => refusals.push(format!("{name}: {reason}")),
        }
    }
    let now = tokio::time::Instant::now();
    if let Some(reason) = veto.filter(|_| state.n_vetoes < MAX_VETOES_IN_A_ROW) {
        state.n_vetoes += 1;
        tracing::debug!(%reason, "pre-vote vetoed: a better candidate stands");
        state.next_attempt = now
            + random_between(
                timings.election_timeout_min_ms,
                timings.election_timeout_max_ms,
            );
        return;
    }
    if n_granted < majority {
        tracing::debug!(n_granted, majority, ?refusals, "pre-vote not granted");
        state.next_attempt = now + random_between(hb / 4, hb / 2 + 1);
        return;
    }
    state.n_vetoes = 0;
    let since = state
        .suspected_at
        .map(|t| now.duration_since(t).as_millis());
    info!(term, n_granted, ms_since_suspicion = ?since, "pre-vote granted: starting an election");
    if let Err(error) = engine.raft.trigger().elect().await {
        warn!(%error, "cannot start an election");
    }
    state.timeout = random_between(
        timings.election_timeout_min_ms,
        timings.election_timeout_max_ms,
    );
    // If this round does not end with a leader (a split or a vote lost to a lease), stand
    // again after one or two heartbeats.
    state.next_attempt = now + random_between(hb, 2 * hb);
}

/// A voter's answer to another voter's pre-vote (see [`run_elections`]).
fn pre_vote_verdict(
    engine: &Engine,
    from: &str,
    last_log: Option<openraft::LogId<NodeId>>,
) -> PreVoteVerdict {
    let Some((candidate, _, true)) = engine.member_named(from) else {
        warn!(from, "pre-vote refused: not a voter");
        return PreVoteVerdict::Refused(format!("{from} is not a voter"));
    };
    let (leader, server_state, is_voter) = {
        let metrics = engine.raft.metrics();
        let m = metrics.borrow();
        let is_voter = m
            .membership_config
            .membership()
            .voter_ids()
            .any(|id| id == engine.node_id);
        (m.current_leader, m.state, is_voter)
    };
    if server_state == ServerState::Leader {
        return PreVoteVerdict::Refused("I lead".to_string());
    }
    if !engine.recovery.may_vote_for(last_log) {
        return PreVoteVerdict::Refused(
            "I am recovering a lost log tail: I vote only once a leader gave it back".to_string(),
        );
    }
    let threshold = Duration::from_millis(engine.timings.heartbeat_interval_ms * 2);
    if let Some(leader) = leader.filter(|l| *l != engine.node_id && *l != candidate) {
        if !leader_lost(engine, leader, threshold) {
            return PreVoteVerdict::Refused(format!("I still hear the leader {leader}"));
        }
    }
    let mine = engine.raft.data_metrics().borrow().last_log;
    if is_voter && (mine > last_log || (mine == last_log && engine.node_id < candidate)) {
        engine
            .stand_now
            .store(true, std::sync::atomic::Ordering::Release);
        return PreVoteVerdict::Veto(format!(
            "my log ends at {mine:?}, the candidate's at {last_log:?}: I stand"
        ));
    }
    PreVoteVerdict::Granted
}

/// On the leader: when this node's record in the membership carries other addresses than the
/// mesh listens on (the configuration changed), updates it.
async fn refresh_own_record(engine: &Arc<Engine>) {
    let stale = {
        let metrics = engine.raft.metrics();
        let m = metrics.borrow();
        if m.current_leader != Some(engine.node_id) || m.state != ServerState::Leader {
            return;
        }
        let membership = m.membership_config.membership();
        if membership.get_joint_config().len() > 1 {
            return;
        }
        membership
            .get_node(&engine.node_id)
            .filter(|info| info.addrs != engine.addrs)
            .cloned()
    };
    if let Some(mut info) = stale {
        info.addrs = engine.addrs.clone();
        info!(addrs = ?info.addrs, "updating this node's mesh addresses in the membership");
        if let Err(error) = engine
            .raft
            .change_membership(
                ChangeMembers::SetNodes(BTreeMap::from([(engine.node_id, info)])),
                true,
            )
            .await
        {
            warn!(%error, "cannot update this node's mesh addresses");
        }
    }
}

/// The joining node's driver: asks the leader (or any member from the token) to admit it,
/// reports progress, and records the end of the join.
pub(crate) async fn drive_join(
    engine: Weak<Engine>,
    mut state: JoinState,
    join_file: PathBuf,
    stop: CancellationToken,
) {
    loop {
        let Some(engine) = engine.upgrade() else {
            return;
        };
        let outcome = join_step(&engine, &state).await;
        let applied = engine
            .raft
            .metrics()
            .borrow()
            .last_applied
            .map(|id| id.index);
        let mut report = JoinReport {
            phase: JoinPhase::Joining,
            name: state.token.name.clone(),
            site: state.token.site.clone(),
            leader_last_index: None,
            applied_index: applied,
            error: None,
        };
        match outcome {
            Ok(JoinProgress::Member { .. }) => {
                report.phase = JoinPhase::Done;
            }
            Ok(JoinProgress::CatchingUp {
                leader_last_index, ..
            }) => report.leader_last_index = Some(leader_last_index),
            Err(JoinStepError::Refused(message)) => {
                warn!(%message, "the cluster refused the join");
                report.phase = JoinPhase::Failed;
                report.error = Some(message);
            }
            Err(JoinStepError::Transient(message)) => {
                tracing::debug!(%message, "join step failed; retrying");
                report.error = Some(message);
            }
        }
        if report.phase != JoinPhase::Joining {
            state.phase = report.phase;
            state.error = report.error.clone();
            let write_state = state.clone();
            let path = join_file.clone();
            let written = tokio::task::spawn_blocking(move || {
                membership::write_json_atomic(&path, &write_state)
            })
            .await;
            if !matches!(written, Ok(Ok(()))) {
                warn!(path = %join_file.display(), "cannot record the end of the join");
            }
            info!(phase = ?state.phase, "join finished");
            engine.join_report.send_replace(Some(report));
            return;
        }
        engine.join_report.send_replace(Some(report));
        drop(engine);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(JOIN_POLL) => {}
        }
    }
}

enum JoinStepError {
    Refused(String),
    Transient(String),
}

async fn join_step(engine: &Arc<Engine>, state: &JoinState) -> Result<JoinProgress, JoinStepError> {
    // Done when this node's own replica shows it as a full member.
    {
        let metrics = engine.raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        if let Some(info) = membership.get_node(&engine.node_id) {
            if info.joining.is_none() {
                let voter = membership.voter_ids().any(|id| id == engine.node_id);
                return Ok(JoinProgress::Member { voter });
            }
        }
    }
    let request = ControlRequest::Join {
        node_id: engine.node_id,
        addrs: engine.addrs.clone(),
    };
    let body = encode(&request).map_err(JoinStepError::Transient)?;
    // The leader first, when known; else every member the token names.
    let mut targets: Vec<String> = Vec::new();
    if let Some(leader) = engine.raft.metrics().borrow().current_leader {
        if let Some(name) = engine.name_of(leader) {
            targets.push(name);
        }
    }
    for (_, info) in &state.token.members {
        if !targets.contains(&info.name) {
            targets.push(info.name.clone());
        }
    }
    let mut last_error = "no member reachable".to_string();
    for target in targets {
        match engine
            .mesh
            .request(
                &target,
                Channel::Control,
                body.clone(),
                MEMBERSHIP_REQUEST_TIMEOUT,
            )
            .await
        {
            Ok(reply) => match decode::<ControlReply>(&reply) {
                Ok(ControlReply::Join(progress)) => {
                    // The leader's answer is about its log; this node may still have to
                    // apply the entry that made it a member: report that via the loop.
                    return match progress {
                        JoinProgress::Member { .. } => Ok(JoinProgress::CatchingUp {
                            leader_last_index: engine
                                .raft
                                .metrics()
                                .borrow()
                                .last_log_index
                                .unwrap_or(0),
                            matched_index: None,
                        }),
                        other => Ok(other),
                    };
                }
                Ok(ControlReply::Error(message)) => return Err(JoinStepError::Refused(message)),
                Ok(ControlReply::NotLeader { .. }) => {
                    last_error = format!("{target} is not the leader");
                }
                Ok(_) => last_error = format!("{target} sent an unexpected answer"),
                Err(error) => last_error = error,
            },
            Err(error) => last_error = format!("{target}: {error}"),
        }
    }
    Err(JoinStepError::Transient(last_error))
}

/// One node in [`ClusterView`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeView {
    pub name: String,
    pub site: String,
    /// `leader`, `follower`, `learner` or `candidate` (an invitation not yet used is a
    /// `learner` that is not reachable).
    pub role: String,
    pub voter: bool,
    pub reachable: bool,
    pub applied: u64,
    pub commit: u64,
    pub lag: u64,
}

/// `kermail cluster status`: every node as seen from here, and the site-loss verdict.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClusterView {
    pub leader: Option<String>,
    pub term: u64,
    pub nodes: Vec<NodeView>,
    pub survives_site_loss: bool,
    pub critical_sites: Vec<String>,
}

fn role_name(role: ClusterRole) -> &'static str {
    match role {
        ClusterRole::Leader => "leader",
        ClusterRole::Candidate => "candidate",
        ClusterRole::Follower => "follower",
        ClusterRole::Learner => "learner",
        ClusterRole::Shutdown => "shutdown",
    }
}

impl Cluster {
    /// Invites a node: prints nothing, returns the token. Runs on the leader (forwarded there
    /// from any member).
    pub async fn invite(
        &self,
        name: &str,
        site: &str,
        learner: bool,
    ) -> Result<String, ClusterError> {
        let engine = self.engine()?;
        let _guard = self.membership_lock().lock().await;
        let request = ControlRequest::Invite {
            name: name.to_string(),
            site: site.to_string(),
            learner,
            valid_ms: membership::DEFAULT_INVITE_VALID_MS,
        };
        match to_leader(&engine, request, MEMBERSHIP_REQUEST_TIMEOUT).await? {
            ControlReply::Invited(token) => Ok(token),
            ControlReply::Error(message) => Err(ClusterError::Refused(message)),
            _ => Err(ClusterError::Refused(
                "unexpected answer from the leader".to_string(),
            )),
        }
    }

    /// Removes the member `name` (a node gone for good). Runs on the leader.
    pub async fn remove(&self, name: &str) -> Result<String, ClusterError> {
        let engine = self.engine()?;
        if name == engine.name {
            return Err(ClusterError::Refused(
                "this is the node you are talking to: use `kermail cluster leave` on it"
                    .to_string(),
            ));
        }
        let _guard = self.membership_lock().lock().await;
        match to_leader(
            &engine,
            ControlRequest::Remove {
                name: name.to_string(),
            },
            MEMBERSHIP_REQUEST_TIMEOUT,
        )
        .await?
        {
            ControlReply::Done(message) => Ok(message),
            ControlReply::Error(message) => Err(ClusterError::Refused(message)),
            _ => Err(ClusterError::Refused(
                "unexpected answer from the leader".to_string(),
            )),
        }
    }

    /// Takes this node out of the membership (gracefully: when it leads, it commits its own
    /// removal, steps down and asks the most up-to-date voter to stand at once).
    pub async fn leave(&self) -> Result<String, ClusterError> {
        let engine = self.engine()?;
        let _guard = self.membership_lock().lock().await;
        let request = ControlRequest::Remove {
            name: engine.name.clone(),
        };
        match to_leader(&engine, request, MEMBERSHIP_REQUEST_TIMEOUT).await? {
            ControlReply::Done(_) => Ok(format!(
                "{} left the cluster; stop this node now (its data is no longer replicated)",
                engine.name
            )),
            ControlReply::Error(message) => Err(ClusterError::Refused(message)),
            _ => Err(ClusterError::Refused(
                "unexpected answer from the leader".to_string(),
            )),
        }
    }

    /// Starts joining the cluster a token invites this node to. Refused when this node holds
    /// data or is part of a multi-node cluster. Returns once the join is under way; follow it
    /// with [`Cluster::join_report`].
    pub async fn join(&self, token_text: &str) -> Result<String, ClusterError> {
        let token = InviteToken::decode(token_text).map_err(ClusterError::Refused)?;
        if token.expires_unix_ms <= membership::unix_ms() {
            return Err(ClusterError::Refused(
                "the invitation expired: ask for a new one with `kermail cluster invite`"
                    .to_string(),
            ));
        }
        let identity = token.identity().map_err(ClusterError::Refused)?;
        let _guard = self.membership_lock().lock().await;
        let engine = self.engine()?;
        let data_dir = self.config().data_dir.clone();
        let join_file = membership::join_path(&data_dir);
        let existing: Option<JoinState> =
            membership::read_json(&join_file).map_err(|source| ClusterError::Io {
                path: join_file.clone(),
                source,
            })?;
        if let Some(existing) = existing.filter(|j| j.phase != JoinPhase::Failed) {
            if existing.token == token && existing.phase == JoinPhase::Joining {
                return Ok(format!("already joining as {}", token.name));
            }
            return Err(ClusterError::Refused(format!(
                "this node already joined a cluster as {}",
                existing.token.name
            )));
        }
        let status = engine.status();
        if status.membership.len() > 1 {
            return Err(ClusterError::Refused(
                "this node is already part of a cluster of several nodes: a join needs a new, empty node".to_string(),
            ));
        }
        if engine
            .holds_app_data
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(ClusterError::Refused(
                "this node already holds mail or accounts: a join needs a new, empty node \
                 (its data would be replaced by the cluster's)"
                    .to_string(),
            ));
        }
        drop(engine);
        // Key, name and site first (a restart from here on resumes the join).
        let key_path = if self.config().mesh.key_file.is_absolute() {
            self.config().mesh.key_file.clone()
        } else {
            data_dir.join(&self.config().mesh.key_file)
        };
        let state = JoinState {
            token: token.clone(),
            phase: JoinPhase::Prepared,
            error: None,
        };
        let identity_file = membership::identity_path(&data_dir);
        let persisted = PersistedIdentity {
            name: token.name.clone(),
            site: token.site.clone(),
        };
        let write_join = join_file.clone();
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            if key_path.exists() {
                let backup = key_path.with_extension("key.before-join");
                std::fs::copy(&key_path, backup)?;
            }
            membership::write_key_file(&key_path, &identity)?;
            membership::write_json_atomic(&identity_file, &persisted)?;
            membership::write_json_atomic(&write_join, &state)
        })
        .await
        .map_err(|e| ClusterError::Raft(e.to_string()))?;
        written.map_err(|source| ClusterError::Io {
            path: data_dir.clone(),
            source,
        })?;
        info!(name = %token.name, site = %token.site, "joining a cluster: replacing the one-node cluster");
        let state = JoinState {
            token: token.clone(),
            phase: JoinPhase::Prepared,
            error: None,
        };
        self.swap_engine(state).await?;
        Ok(format!("joining as {} (site {})", token.name, token.site))
    }

    /// Where this node's join stands (`None` when it is not joining and never joined).
    pub fn join_report(&self) -> Option<JoinReport> {
        let engine = self.engine().ok()?;
        let report = engine.join_report.borrow().clone();
        report.or_else(|| {
            let file = membership::join_path(&self.config().data_dir);
            membership::read_json::<JoinState>(&file)
                .ok()
                .flatten()
                .map(|state| JoinReport {
                    phase: state.phase,
                    name: state.token.name,
                    site: state.token.site,
                    leader_last_index: None,
                    applied_index: engine
                        .raft
                        .metrics()
                        .borrow()
                        .last_applied
                        .map(|id| id.index),
                    error: state.error,
                })
        })
    }

    /// Every member's view (asked over the mesh, each within [`STATUS_TIMEOUT`]) and the
    /// site-loss verdict.
    pub async fn cluster_view(&self) -> Result<ClusterView, ClusterError> {
        let engine = self.engine()?;
        let local = engine.status();
        let mut asks = JoinSet::new();
        for member in &local.membership {
            if member.node_id == local.node_id {
                continue;
            }
            let mesh = engine.mesh.clone();
            let name = member.info.name.clone();
            let id = member.node_id;
            asks.spawn(async move {
                let reply = match encode(&ControlRequest::Status) {
                    Ok(body) => mesh
                        .request(&name, Channel::Control, body, STATUS_TIMEOUT)
                        .await
                        .ok(),
                    Err(_) => None,
                };
                let status = reply
                    .and_then(|bytes| decode::<ControlReply>(&bytes).ok())
                    .and_then(|reply| match reply {
                        ControlReply::Status(status) => Some(*status),
                        _ => None,
                    });
                (id, status)
            });
        }
        let mut statuses: BTreeMap<NodeId, ClusterStatus> = BTreeMap::new();
        statuses.insert(local.node_id, local.clone());
        while let Some(joined) = asks.join_next().await {
            if let Ok((id, Some(status))) = joined {
                statuses.insert(id, status);
            }
        }
        let leader_id = statuses
            .values()
            .filter(|s| s.role == ClusterRole::Leader)
            .max_by_key(|s| s.term)
            .map(|s| s.node_id)
            .or(local.leader);
        let term = statuses
            .values()
            .map(|s| s.term)
            .max()
            .unwrap_or(local.term);
        let head = leader_id
            .and_then(|id| statuses.get(&id))
            .and_then(|s| s.last_log_index)
            .or_else(|| statuses.values().filter_map(|s| s.committed_index).max())
            .unwrap_or(0);
        let mut nodes = Vec::new();
        for member in &local.membership {
            let status = statuses.get(&member.node_id);
            let applied = status.and_then(|s| s.applied_index).unwrap_or(0);
            let commit = status.and_then(|s| s.committed_index).unwrap_or(0);
            let role = match status {
                _ if member.info.joining.as_ref().is_some_and(|j| !j.connected) => "learner",
                Some(s) => role_name(s.role),
                None if member.voter => "follower",
                None => "learner",
            };
            nodes.push(NodeView {
                name: member.info.name.clone(),
                site: member.info.site.clone(),
                role: role.to_string(),
                voter: member.voter,
                reachable: status.is_some(),
                applied,
                commit,
                lag: head.saturating_sub(applied),
            });
        }
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let critical_sites = membership::critical_sites(
            local
                .membership
                .iter()
                .filter(|m| m.voter)
                .map(|m| m.info.site.as_str()),
        );
        Ok(ClusterView {
            leader: leader_id.and_then(|id| {
                local
                    .membership
                    .iter()
                    .find(|m| m.node_id == id)
                    .map(|m| m.info.name.clone())
            }),
            term,
            nodes,
            survives_site_loss: critical_sites.is_empty(),
            critical_sites,
        })
    }
}
