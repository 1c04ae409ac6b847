//! [`Mesh`]: the handle the rest of the cluster uses. Listeners, one dialer per peer (jittered
//! exponential backoff, direct first, then relayed), the link registry with its one-link-per-pair
//! rule, the request table and status.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rand::Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::codec::{frame_header, MessageKind, Record, CHANNEL_COUNT};
use super::handshake::{
    self, HandshakeError, HandshakeParams, Initiator, ReplayGuard, MAX_HANDSHAKE_MESSAGE_BYTES,
};
use super::identity::{decode_key, Identity, KEY_BYTES};
use super::link::{self, LinkHandle, LinkPath, Outgoing, PeerStats};
use super::routing::{Route, RoutingTable};
use super::{Channel, LinkState, Member, MeshConfig, MeshError, MeshStatus, PeerStatus};

/// Bytes of the in-memory pipe between a relayed inner link and its pumps.
const RELAY_PIPE_BYTES: usize = 256 * 1024;
/// Largest piece of inner-link bytes carried by one relay record.
pub(crate) const RELAY_CHUNK_BYTES: usize = 60 * 1024;
/// Relay chunks queued towards an inner link before the carrying link stops reading.
const RELAY_QUEUE_CHUNKS: usize = 64;
/// Relayed streams open at once (both ends, all peers); more are refused.
const MAX_RELAY_STREAMS: usize = 64;
/// Links tried by one send before it reports the peer unreachable.
const SEND_ATTEMPTS: usize = 3;
/// A direct link that lived this long resets its dialer's backoff.
const STABLE_LINK: Duration = Duration::from_secs(2);

/// A message or request from a peer.
#[derive(Debug)]
pub struct Incoming {
    /// The sending member's name.
    pub from: String,
    pub channel: Channel,
    pub body: Bytes,
    /// Present for requests: answer through it (dropping it leaves the requester to time out).
    pub responder: Option<Responder>,
}

/// Answers one request.
#[derive(Debug)]
pub struct Responder {
    inner: Weak<Inner>,
    peer: String,
    channel: Channel,
    id: u64,
}

impl Responder {
    /// Sends the response back to the requester.
    pub async fn respond(self, body: Bytes) -> Result<(), MeshError> {
        let inner = self.inner.upgrade().ok_or(MeshError::Shutdown)?;
        inner
            .send_kind(
                &self.peer,
                self.channel,
                MessageKind::Response(self.id),
                body,
            )
            .await
    }
}

struct ShutdownGuard(CancellationToken);

impl Drop for ShutdownGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Handle to the running mesh. Cloning is cheap; the mesh stops when the last handle is dropped
/// (or at [`Mesh::shutdown`]).
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<Inner>,
    _guard: Arc<ShutdownGuard>,
}

pub(crate) struct Inner {
    pub(crate) config: MeshConfig,
    pub(crate) identity: Identity,
    psk: Option<[u8; KEY_BYTES]>,
    pub(crate) local_name: String,
    local_site: String,
    local_addrs: Vec<SocketAddr>,
    epoch: Instant,
    pub(crate) shutdown: CancellationToken,
    state: Mutex<State>,
    incoming: Vec<mpsc::Sender<Incoming>>,
    incoming_rx: Mutex<Vec<Option<mpsc::Receiver<Incoming>>>>,
    pending: Mutex<HashMap<u64, (String, oneshot::Sender<Bytes>)>>,
    next_id: AtomicU64,
    /// Woken whenever links or routes change; dialers wait on it.
    pub(crate) topology: Notify,
    handshakes_refused: AtomicU64,
    /// The greatest handshake timestamp accepted per initiator key (anti-replay). Locked
    /// before `state` when both are held.
    replay: Mutex<ReplayGuard>,
}

/// Members by name, with their decoded keys.
type KeyedMembers = BTreeMap<String, (Member, [u8; KEY_BYTES])>;

#[derive(Default)]
struct State {
    members: KeyedMembers,
    /// Invited nodes: accepted when they dial us (join), never dialed; a name in both lists
    /// counts as a member.
    pending: KeyedMembers,
    routing: RoutingTable,
    peers: BTreeMap<String, Peer>,
    /// Byte queues towards our ends of relayed inner links.
    relay_streams: HashMap<RelayKey, mpsc::Sender<Bytes>>,
    last_refusal: Option<String>,
}

impl State {
    /// The key of a member or pending invitee.
    fn known_key(&self, name: &str) -> Option<[u8; KEY_BYTES]> {
        self.members
            .get(name)
            .or_else(|| self.pending.get(name))
            .map(|(_, key)| *key)
    }
}

/// Names a relayed stream: the remote end, the relay, and the stream id given by the end
/// that opened it (`ours`: this node opened it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RelayKey {
    peer: String,
    via: String,
    stream: u64,
    ours: bool,
}

#[derive(Default)]
struct Peer {
    /// Confirmed links, the one carrying traffic first.
    links: Vec<LinkHandle>,
    /// Links we answered a handshake for whose initiator has not yet sent a transport frame:
    /// a replayed message 1 also gets an answer, so such a link carries nothing, takes part in
    /// no ranking and retires nothing until it is confirmed (see [`Inner::confirm`]).
    unconfirmed: Vec<LinkHandle>,
    stats: Arc<PeerStats>,
    last_handshake_unix_ms: Option<u64>,
    last_error: Option<String>,
    dialer: Option<CancellationToken>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock is a bug; keep serving with the state as it is.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The last handshake timestamp this process used (see [`handshake_timestamp`]).
static LAST_HANDSHAKE_TIMESTAMP: AtomicU64 = AtomicU64::new(0);

/// A timestamp for a handshake's message 1: nanoseconds since the Unix epoch, strictly greater
/// than every earlier one of this process (two dials in the same nanosecond, or a clock that
/// steps back while we run, still give increasing values).
fn handshake_timestamp() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let previous = LAST_HANDSHAKE_TIMESTAMP
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
            Some(now.max(last.saturating_add(1)))
        })
        .unwrap_or(0);
    now.max(previous.saturating_add(1))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn parse_members(members: Vec<Member>) -> Result<KeyedMembers, MeshError> {
    let mut out = BTreeMap::new();
    for member in members {
        let key = decode_key(&member.public_key).map_err(|_| MeshError::BadMemberKey {
            name: member.name.clone(),
        })?;
        out.insert(member.name.clone(), (member, key));
    }
    Ok(out)
}

/// Ranks links of one peer: direct before relayed, then the lower initiator key, then newest.
fn better(a: &LinkHandle, b: &LinkHandle) -> bool {
    let direct_a = matches!(a.path, LinkPath::Direct(_));
    let direct_b = matches!(b.path, LinkPath::Direct(_));
    if direct_a != direct_b {
        return direct_a;
    }
    if a.initiator_key != b.initiator_key {
        return a.initiator_key < b.initiator_key;
    }
    a.id > b.id
}

pub(crate) async fn bind_listener(
    addr: SocketAddr,
    buffer_bytes: Option<usize>,
) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if let Some(bytes) = buffer_bytes {
        socket.set_recv_buffer_size(bytes as u32)?;
        socket.set_send_buffer_size(bytes as u32)?;
    }
    socket.bind(addr)?;
    socket.listen(128)
}

impl Mesh {
    /// Starts the mesh: binds the listeners and dials every other member. `members` must contain
    /// this node (found by its public key); its name and site come from there.
    pub async fn start(
        config: MeshConfig,
        identity: Identity,
        members: Vec<Member>,
    ) -> Result<Mesh, MeshError> {
        let psk = match &config.psk_base64 {
            Some(text) => Some(decode_key(text).map_err(|_| MeshError::BadPsk)?),
            None => None,
        };
        let members = parse_members(members)?;
        let local = members
            .values()
            .find(|(_, key)| *key == identity.public_key())
            .map(|(member, _)| member.clone())
            .ok_or(MeshError::NotAMember)?;
        let mut listeners = Vec::new();
        let mut local_addrs = Vec::new();
        for addr in &config.listen {
            let listener = bind_listener(*addr, config.tcp_buffer_bytes)
                .await
                .map_err(|source| MeshError::Listen {
                    addr: *addr,
                    source,
                })?;
            local_addrs.push(listener.local_addr().map_err(|source| MeshError::Listen {
                addr: *addr,
                source,
            })?);
            listeners.push(listener);
        }
        let mut incoming = Vec::new();
        let mut incoming_rx = Vec::new();
        for _ in 0..CHANNEL_COUNT {
            let (tx, rx) = mpsc::channel(config.receive_queue_messages.max(1));
            incoming.push(tx);
            incoming_rx.push(Some(rx));
        }
        let shutdown = CancellationToken::new();
        let inner = Arc::new(Inner {
            config,
            identity,
            psk,
            local_name: local.name.clone(),
            local_site: local.site.clone(),
            local_addrs,
            epoch: Instant::now(),
            shutdown: shutdown.clone(),
            state: Mutex::new(State::default()),
            incoming,
            incoming_rx: Mutex::new(incoming_rx),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            topology: Notify::new(),
            handshakes_refused: AtomicU64::new(0),
            replay: Mutex::new(ReplayGuard::default()),
        });
        for listener in listeners {
            tokio::spawn(accept_loop(inner.clone(), listener));
        }
        inner.apply_membership(Some(members), None);
        info!(node = %inner.local_name, "mesh started");
        Ok(Mesh {
            inner,
            _guard: Arc::new(ShutdownGuard(shutdown)),
        })
    }

    /// Replaces the member list (membership changes come from Raft). Links to removed members
    /// or to members whose key changed are closed; new members are dialed.
    pub fn set_members(&self, members: Vec<Member>) -> Result<(), MeshError> {
        let members = parse_members(members)?;
        if !members
            .values()
            .any(|(_, key)| *key == self.inner.identity.public_key())
        {
            return Err(MeshError::NotAMember);
        }
        self.inner.apply_membership(Some(members), None);
        Ok(())
    }

    /// Replaces the pending invitations: nodes that are not members yet but whose key the
    /// responder accepts (a joining node dials a member before the membership change that adds
    /// it). They are not dialed; messages and requests to and from them work while their link
    /// is up. A name that is also in the member list counts as a member. Withdrawing an
    /// invitation closes its links.
    pub fn set_pending(&self, pending: Vec<Member>) -> Result<(), MeshError> {
        let pending = parse_members(pending)?;
        self.inner.apply_membership(None, Some(pending));
        Ok(())
    }

    /// Sends a one-way message. Waits while the channel's queue on the link is full.
    pub async fn send(&self, peer: &str, channel: Channel, body: Bytes) -> Result<(), MeshError> {
        self.inner
            .send_kind(peer, channel, MessageKind::OneWay, body)
            .await
    }

    /// Sends a request and waits for its response, at most `timeout`.
    pub async fn request(
        &self,
        peer: &str,
        channel: Channel,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, MeshError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.pending).insert(id, (peer.to_string(), tx));
        let outcome = tokio::time::timeout(timeout, async {
            self.inner
                .send_kind(peer, channel, MessageKind::Request(id), body)
                .await?;
            // The sender is dropped when the mesh shuts down or the peer's last link drops.
            rx.await.map_err(|_| {
                if self.inner.shutdown.is_cancelled() {
                    MeshError::Shutdown
                } else {
                    MeshError::LinkLost(peer.to_string())
                }
            })
        })
        .await;
        lock(&self.inner.pending).remove(&id);
        match outcome {
            Ok(result) => result,
            Err(_) => Err(MeshError::Timeout {
                peer: peer.to_string(),
                timeout_ms: timeout.as_millis() as u64,
            }),
        }
    }

    /// The receiver of messages and requests on `channel`; `None` after the first call.
    pub fn incoming(&self, channel: Channel) -> Option<mpsc::Receiver<Incoming>> {
        lock(&self.inner.incoming_rx)[channel.index()].take()
    }

    /// The addresses the listeners are bound to.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.inner.local_addrs.clone()
    }

    /// This node's member name.
    pub fn local_name(&self) -> &str {
        &self.inner.local_name
    }

    /// Status of every peer (`kermail mesh status`).
    pub fn status(&self) -> MeshStatus {
        self.inner.status()
    }

    /// Stops listeners, dialers and links.
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }
}

impl Inner {
    pub(crate) fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn params(&self) -> HandshakeParams<'_> {
        HandshakeParams {
            local_private_key: self.identity.private_key(),
            local_name: &self.local_name,
            cluster_id: &self.config.cluster_id,
            psk: self.psk.as_ref(),
        }
    }

    /// Replaces the member list and/or the pending invitations. Links to peers that are no
    /// longer known, or whose key changed, are closed; members without a dialer get one.
    fn apply_membership(
        self: &Arc<Self>,
        members: Option<KeyedMembers>,
        pending: Option<KeyedMembers>,
    ) {
        let mut state = lock(&self.state);
        let before: Vec<(String, Option<[u8; KEY_BYTES]>)> = state
            .peers
            .keys()
            .map(|name| (name.clone(), state.known_key(name)))
            .collect();
        if let Some(members) = members {
            state.members = members;
        }
        if let Some(pending) = pending {
            state.pending = pending;
        }
        let mut to_close = Vec::new();
        for (name, old_key) in before {
            if state.known_key(&name) == old_key {
                continue;
            }
            if let Some(peer) = state.peers.remove(&name) {
                if let Some(dialer) = peer.dialer {
                    dialer.cancel();
                }
                to_close.extend(peer.links);
                to_close.extend(peer.unconfirmed);
            }
        }
        let names: Vec<String> = state
            .members
            .keys()
            .filter(|n| **n != self.local_name)
            .cloned()
            .collect();
        for name in names {
            let peer = state.peers.entry(name.clone()).or_default();
            if peer.dialer.as_ref().is_none_or(|d| d.is_cancelled()) {
                let token = self.shutdown.child_token();
                peer.dialer = Some(token.clone());
                tokio::spawn(dial_loop(self.clone(), name, token));
            }
        }
        let known: Vec<[u8; KEY_BYTES]> = state
            .members
            .values()
            .chain(state.pending.values())
            .map(|(_, key)| *key)
            .collect();
        drop(state);
        lock(&self.replay).retain(|key| known.contains(key));
        for link in to_close {
            link.close.cancel();
        }
        self.topology.notify_waiters();
    }

    /// The member (or pending invitee) name of a static key; never our own.
    fn member_name_of_key(&self, key: &[u8; KEY_BYTES]) -> Option<String> {
        let state = lock(&self.state);
        state
            .members
            .values()
            .chain(state.pending.values())
            .find(|(member, k)| k == key && member.name != self.local_name)
            .map(|(member, _)| member.name.clone())
    }

    fn refuse(&self, from: &str, error: &HandshakeError) {
        self.handshakes_refused.fetch_add(1, Ordering::Relaxed);
        warn!(from, %error, "mesh handshake refused");
        lock(&self.state).last_refusal = Some(format!("{from}: {error}"));
    }

    fn active_link(&self, peer: &str) -> Result<LinkHandle, MeshError> {
        let state = lock(&self.state);
        let entry = state
            .peers
            .get(peer)
            .ok_or_else(|| MeshError::UnknownPeer(peer.to_string()))?;
        entry
            .links
            .first()
            .cloned()
            .ok_or_else(|| MeshError::Unreachable(peer.to_string()))
    }

    pub(crate) async fn send_kind(
        &self,
        peer: &str,
        channel: Channel,
        kind: MessageKind,
        body: Bytes,
    ) -> Result<(), MeshError> {
        if body.len() > self.config.max_message_bytes {
            return Err(MeshError::MessageTooLarge {
                len: body.len(),
                max: self.config.max_message_bytes,
            });
        }
        let mut outgoing = Outgoing { kind, body };
        // A link that is replaced or breaks while we wait hands the message back; it then goes
        // on the peer's current link.
        for _ in 0..SEND_ATTEMPTS {
            let link = self.active_link(peer)?;
            match link.channels[channel.index()].send(outgoing).await {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(back)) => outgoing = back,
            }
        }
        Err(MeshError::Unreachable(peer.to_string()))
    }

    /// Registers an established link. A confirmed one (we initiated it: message 2 proved the
    /// peer live) is ranked at once; an unconfirmed one (we answered message 1, which anyone
    /// could have replayed) waits for [`Inner::confirm`].
    pub(crate) fn register(&self, handle: LinkHandle, confirmed: bool) -> Option<Arc<PeerStats>> {
        let mut state = lock(&self.state);
        // Only members and pending invitees have links.
        state.known_key(&handle.peer)?;
        let peer = state.peers.entry(handle.peer.clone()).or_default();
        let stats = peer.stats.clone();
        if confirmed {
            drop(state);
            self.rank(handle);
        } else {
            peer.unconfirmed.push(handle);
        }
        Some(stats)
    }

    /// The initiator of an unconfirmed link sent its first transport frame: it holds the keys,
    /// so the link is live and takes part in the ranking.
    pub(crate) fn confirm(&self, peer_name: &str, link_id: u64) {
        let mut state = lock(&self.state);
        let Some(peer) = state.peers.get_mut(peer_name) else {
            return;
        };
        let Some(position) = peer.unconfirmed.iter().position(|l| l.id == link_id) else {
            return;
        };
        let handle = peer.unconfirmed.swap_remove(position);
        drop(state);
        self.rank(handle);
    }

    /// Adds a confirmed link: the best link of the peer is kept first in the list, every
    /// other one is retired.
    fn rank(&self, handle: LinkHandle) {
        let mut state = lock(&self.state);
        let Some(peer) = state.peers.get_mut(&handle.peer) else {
            // Removed meanwhile (membership change): not a link any more.
            drop(state);
            handle.close.cancel();
            return;
        };
        peer.last_handshake_unix_ms = Some(unix_ms());
        peer.links.push(handle.clone());
        let mut best = 0;
        for (i, link) in peer.links.iter().enumerate() {
            if better(link, &peer.links[best]) {
                best = i;
            }
        }
        let winner = peer.links.swap_remove(best);
        let losers: Vec<LinkHandle> = std::mem::take(&mut peer.links);
        peer.links.push(winner);
        let direct = matches!(handle.path, LinkPath::Direct(_));
        if direct {
            state.routing.set_direct(&handle.peer, true);
        }
        drop(state);
        for loser in losers {
            debug!(peer = %loser.peer, link = loser.id, "retiring redundant link");
            loser.retire.cancel();
        }
        if direct {
            self.advertise_routes();
        }
        self.topology.notify_waiters();
    }

    pub(crate) fn unregister(&self, peer_name: &str, link_id: u64, error: Option<String>) {
        let mut state = lock(&self.state);
        let Some(peer) = state.peers.get_mut(peer_name) else {
            return;
        };
        peer.links.retain(|link| link.id != link_id);
        peer.unconfirmed.retain(|link| link.id != link_id);
        if let Some(error) = error {
            peer.last_error = Some(error);
        }
        if peer.links.is_empty() {
            // No path left: requests waiting on this peer get `LinkLost` now rather than
            // their timeout (a forwarded write to a leader that died answers at once).
            lock(&self.pending).retain(|_, (to, _)| to != peer_name);
        }
        let direct_left = peer
            .links
            .iter()
            .any(|l| matches!(l.path, LinkPath::Direct(_)));
        let was_direct = state.routing.is_direct(peer_name);
        if was_direct && !direct_left {
            state.routing.set_direct(peer_name, false);
            drop(state);
            self.advertise_routes();
        } else {
            drop(state);
        }
        self.topology.notify_waiters();
    }

    pub(crate) fn set_last_error(&self, peer_name: &str, error: String) {
        if let Some(peer) = lock(&self.state).peers.get_mut(peer_name) {
            peer.last_error = Some(error);
        }
    }

    /// The names of our direct peers.
    pub(crate) fn direct_peers(&self) -> Vec<String> {
        lock(&self.state).routing.direct_peers()
    }

    /// Sends our direct peers to every direct link (best effort: keepalives repeat it).
    fn advertise_routes(&self) {
        let state = lock(&self.state);
        let names = state.routing.direct_peers();
        for peer in state.peers.values() {
            for link in &peer.links {
                if matches!(link.path, LinkPath::Direct(_)) {
                    let _ = link.records.try_send(Record::Routes(names.clone()));
                }
            }
        }
    }

    pub(crate) fn set_advertised(&self, neighbour: &str, names: Vec<String>) {
        let changed = {
            let mut state = lock(&self.state);
            if !state.routing.is_direct(neighbour) {
                return;
            }
            state.routing.set_advertised(neighbour, names)
        };
        if changed {
            self.topology.notify_waiters();
        }
    }

    /// The direct link to `peer`, if any (relays only use direct links).
    pub(crate) fn direct_link(&self, peer: &str) -> Option<LinkHandle> {
        let state = lock(&self.state);
        state
            .peers
            .get(peer)?
            .links
            .iter()
            .find(|l| matches!(l.path, LinkPath::Direct(_)))
            .cloned()
    }

    /// Delivers a complete message from `from`.
    pub(crate) async fn deliver(
        self: &Arc<Self>,
        from: &str,
        channel: Channel,
        kind: MessageKind,
        body: Bytes,
    ) {
        let responder = match kind {
            MessageKind::Response(id) => {
                let waiter = {
                    let mut pending = lock(&self.pending);
                    match pending.get(&id) {
                        Some((peer, _)) if peer == from => pending.remove(&id),
                        _ => None,
                    }
                };
                if let Some((_, tx)) = waiter {
                    let _ = tx.send(body);
                }
                return;
            }
            MessageKind::Request(id) => Some(Responder {
                inner: Arc::downgrade(self),
                peer: from.to_string(),
                channel,
                id,
            }),
            MessageKind::OneWay => None,
        };
        let incoming = Incoming {
            from: from.to_string(),
            channel,
            body,
            responder,
        };
        // Backpressure: a full application queue stops this link's reader.
        let _ = self.incoming[channel.index()].send(incoming).await;
    }

    /// Bytes for a relayed inner link from `peer` through `via`: hands them to its stream,
    /// opening it (as responder) when the peer opens a new one. `from_initiator` tells whether
    /// the peer opened the stream (else it is one of ours).
    pub(crate) async fn relay_deliver(
        self: &Arc<Self>,
        peer: &str,
        via: &str,
        stream: u64,
        from_initiator: bool,
        close: bool,
        bytes: Bytes,
    ) {
        let key = RelayKey {
            peer: peer.to_string(),
            via: via.to_string(),
            stream,
            ours: !from_initiator,
        };
        if close {
            // Dropping the queue's sender ends the pipe: the inner link sees end of stream.
            lock(&self.state).relay_streams.remove(&key);
            return;
        }
        let existing = lock(&self.state).relay_streams.get(&key).cloned();
        let tx = match existing {
            Some(tx) => tx,
            None if from_initiator => {
                let too_many = {
                    let state = lock(&self.state);
                    state.known_key(peer).is_none()
                        || state.relay_streams.len() >= MAX_RELAY_STREAMS
                };
                if too_many {
                    return;
                }
                let Some((pipe, tx)) = self.open_relay_stream(key) else {
                    return;
                };
                let inner = self.clone();
                let via_name = via.to_string();
                let peer_name = peer.to_string();
                tokio::spawn(async move {
                    inner
                        .accept_stream(pipe, LinkPath::Relayed(via_name), &peer_name)
                        .await;
                });
                tx
            }
            // Bytes for a stream of ours that is gone.
            None => return,
        };
        let _ = tx.send(bytes).await;
    }

    /// Opens our end of the relayed stream `key`; the returned pipe carries the inner Noise
    /// link, two pumps move its bytes as relay records over the direct link to `key.via`.
    fn open_relay_stream(
        self: &Arc<Self>,
        key: RelayKey,
    ) -> Option<(tokio::io::DuplexStream, mpsc::Sender<Bytes>)> {
        let carrier = self.direct_link(&key.via)?;
        let (ours, theirs) = tokio::io::duplex(RELAY_PIPE_BYTES);
        let (mut pipe_read, mut pipe_write) = tokio::io::split(theirs);
        let (tx, mut rx) = mpsc::channel::<Bytes>(RELAY_QUEUE_CHUNKS);
        lock(&self.state)
            .relay_streams
            .insert(key.clone(), tx.clone());
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    next = rx.recv() => match next {
                        Some(bytes) => if pipe_write.write_all(&bytes).await.is_err() { break },
                        None => break,
                    },
                }
            }
            let _ = pipe_write.shutdown().await;
        });
        let inner = self.clone();
        tokio::spawn(async move {
            let mut buffer = vec![0u8; RELAY_CHUNK_BYTES];
            let record = |close: bool, bytes: Bytes| Record::Relay {
                deliver: false,
                close,
                initiator: key.ours,
                stream: key.stream,
                peer: key.peer.clone(),
                bytes,
            };
            loop {
                let read = tokio::select! {
                    _ = inner.shutdown.cancelled() => break,
                    _ = carrier.close.cancelled() => break,
                    read = pipe_read.read(&mut buffer) => read,
                };
                let n = match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if carrier
                    .relay
                    .send(record(false, Bytes::copy_from_slice(&buffer[..n])))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            let _ = carrier.relay.try_send(record(true, Bytes::new()));
            lock(&inner.state).relay_streams.remove(&key);
        });
        Some((ours, tx))
    }

    /// Runs the responder side of a handshake on `stream` and, if it succeeds, the link.
    async fn accept_stream<S>(self: &Arc<Self>, mut stream: S, path: LinkPath, shown_from: &str)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let timeout = Duration::from_millis(self.config.handshake_timeout_ms);
        let outcome = tokio::time::timeout(timeout, async {
            let message = read_handshake_frame(&mut stream)
                .await
                .map_err(|e| HandshakeError::Noise(e.to_string()))?;
            let (established, reply) = {
                let mut replay = lock(&self.replay);
                handshake::respond(
                    self.params(),
                    &message,
                    |key| self.member_name_of_key(key),
                    &mut replay,
                )?
            };
            write_handshake_frame(&mut stream, &reply)
                .await
                .map_err(|e| HandshakeError::Noise(e.to_string()))?;
            Ok::<_, HandshakeError>(established)
        })
        .await;
        match outcome {
            Ok(Ok(established)) => {
                let initiator_key = established.peer_key;
                link::spawn(
                    self.clone(),
                    stream,
                    established,
                    path,
                    initiator_key,
                    false,
                );
            }
            Ok(Err(error)) => self.refuse(shown_from, &error),
            Err(_) => self.refuse(
                shown_from,
                &HandshakeError::Noise("handshake timed out".into()),
            ),
        }
    }

    /// Dials `peer` over `stream` (a TCP connection or a relayed pipe) and starts the link.
    async fn initiate<S>(
        self: &Arc<Self>,
        mut stream: S,
        peer: &str,
        key: &[u8; KEY_BYTES],
        path: LinkPath,
    ) -> Result<(), String>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let timeout = Duration::from_millis(self.config.handshake_timeout_ms);
        let established = tokio::time::timeout(timeout, async {
            let (initiator, message) =
                Initiator::start(self.params(), peer, key, handshake_timestamp())
                    .map_err(|e| e.to_string())?;
            write_handshake_frame(&mut stream, &message)
                .await
                .map_err(|e| e.to_string())?;
            let reply = read_handshake_frame(&mut stream)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            initiator.finish(&reply).map_err(|e| e.to_string())
        })
        .await
        .map_err(|_| "handshake timed out".to_string())??;
        if link::spawn(
            self.clone(),
            stream,
            established,
            path,
            self.identity.public_key(),
            true,
        ) {
            Ok(())
        } else {
            Err("peer is no longer a member".into())
        }
    }

    fn status(&self) -> MeshStatus {
        let state = lock(&self.state);
        let mut peers = Vec::new();
        let pending_only = state
            .pending
            .iter()
            .filter(|(name, _)| !state.members.contains_key(*name));
        for (name, (member, _)) in state.members.iter().chain(pending_only) {
            if *name == self.local_name {
                continue;
            }
            let peer = state.peers.get(name);
            let active = peer.and_then(|p| p.links.first());
            let link = match active.map(|l| &l.path) {
                Some(LinkPath::Direct(addr)) => LinkState::Direct {
                    addr: addr.to_string(),
                },
                Some(LinkPath::Relayed(via)) => LinkState::Relayed { via: via.clone() },
                None => LinkState::Down,
            };
            let rtt_us = active.map_or(0, |l| l.rtt_us.load(Ordering::Relaxed));
            let stats = peer.map(|p| p.stats.clone()).unwrap_or_default();
            peers.push(PeerStatus {
                name: name.clone(),
                site: member.site.clone(),
                public_key: member.public_key.clone(),
                link,
                rtt_ms: (rtt_us > 0).then(|| rtt_us as f64 / 1000.0),
                bytes_sent: stats.bytes_sent.load(Ordering::Relaxed),
                bytes_received: stats.bytes_received.load(Ordering::Relaxed),
                messages_sent: stats.messages_sent.load(Ordering::Relaxed),
                messages_received: stats.messages_received.load(Ordering::Relaxed),
                last_handshake_unix_ms: peer.and_then(|p| p.last_handshake_unix_ms),
                last_error: peer.and_then(|p| p.last_error.clone()),
                pending: !state.members.contains_key(name),
            });
        }
        MeshStatus {
            node: self.local_name.clone(),
            site: self.local_site.clone(),
            public_key: self.identity.public_key_base64(),
            listen: self.local_addrs.iter().map(|a| a.to_string()).collect(),
            handshakes_refused: self.handshakes_refused.load(Ordering::Relaxed),
            last_refusal: state.last_refusal.clone(),
            peers,
        }
    }
}

pub(crate) async fn read_handshake_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> std::io::Result<Vec<u8>> {
    let mut header = [0u8; 2];
    stream.read_exact(&mut header).await?;
    let len = usize::from(u16::from_be_bytes(header));
    if len > MAX_HANDSHAKE_MESSAGE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "handshake message too long",
        ));
    }
    let mut message = vec![0u8; len];
    stream.read_exact(&mut message).await?;
    Ok(message)
}

pub(crate) async fn write_handshake_frame<S: AsyncWrite + Unpin>(
    stream: &mut S,
    message: &[u8],
) -> std::io::Result<()> {
    let header = frame_header(message.len())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut out = header.to_vec();
    out.extend_from_slice(message);
    stream.write_all(&out).await?;
    stream.flush().await
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, addr)) => {
                if let Err(error) = tune_stream(&inner.config, &stream) {
                    debug!(%error, "cannot tune an accepted mesh socket");
                }
                let inner = inner.clone();
                tokio::spawn(async move {
                    inner
                        .accept_stream(stream, LinkPath::Direct(addr), &addr.to_string())
                        .await;
                });
            }
            Err(error) => {
                warn!(%error, "mesh accept failed");
                // Out of file descriptors and the like: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Jittered exponential backoff.
struct Backoff {
    initial_ms: u64,
    max_ms: u64,
    current_ms: u64,
}

impl Backoff {
    fn new(config: &MeshConfig) -> Backoff {
        let initial_ms = config.backoff_initial_ms.max(1);
        Backoff {
            initial_ms,
            max_ms: config.backoff_max_ms.max(initial_ms),
            current_ms: initial_ms,
        }
    }

    fn reset(&mut self) {
        self.current_ms = self.initial_ms;
    }

    /// The next delay: uniformly between half and all of the current step, which then doubles.
    fn next_delay(&mut self) -> Duration {
        let step = self.current_ms;
        self.current_ms = (self.current_ms.saturating_mul(2)).min(self.max_ms);
        Duration::from_millis(rand::thread_rng().gen_range(step / 2..=step))
    }
}

async fn connect(inner: &Inner, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(bytes) = inner.config.tcp_buffer_bytes {
        socket.set_recv_buffer_size(bytes as u32)?;
        socket.set_send_buffer_size(bytes as u32)?;
    }
    let timeout = Duration::from_millis(inner.config.connect_timeout_ms);
    let stream = tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    tune_stream(&inner.config, &stream)?;
    Ok(stream)
}

/// Socket options of every link: no Nagle delay (frames are batched by the writer), and a
/// small unsent queue in the kernel so that priorities are decided in the mesh.
fn tune_stream(config: &MeshConfig, stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if config.tcp_notsent_lowat_bytes > 0 {
        socket2::SockRef::from(stream).set_tcp_notsent_lowat(config.tcp_notsent_lowat_bytes)?;
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = config;
    Ok(())
}

/// Keeps a link to `peer` up: direct when possible, relayed otherwise.
///
/// Every failed round (all addresses, then the relay) waits a jittered backoff delay, cut short
/// by a topology change. A direct link that lived at least [`STABLE_LINK`] resets the backoff,
/// so a link that breaks after a long life is redialed at once, while one that keeps dying
/// right after its handshake is redialed ever more slowly.
async fn dial_loop(inner: Arc<Inner>, peer: String, cancel: CancellationToken) {
    let mut backoff = Backoff::new(&inner.config);
    let mut direct_since: Option<Instant> = None;
    let mut wait_first = false;
    loop {
        let notified = inner.topology.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if cancel.is_cancelled() {
            return;
        }
        let (member, key, has_direct, has_any, route) = {
            let state = lock(&inner.state);
            let Some((member, key)) = state.members.get(&peer).cloned() else {
                // No longer a member: a later membership change starts a new dialer.
                cancel.cancel();
                return;
            };
            let links = state
                .peers
                .get(&peer)
                .map(|p| p.links.clone())
                .unwrap_or_default();
            let has_direct = links.iter().any(|l| matches!(l.path, LinkPath::Direct(_)));
            (
                member,
                key,
                has_direct,
                !links.is_empty(),
                state.routing.route(&peer),
            )
        };
        if has_direct {
            direct_since.get_or_insert_with(Instant::now);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = &mut notified => continue,
            }
        }
        if let Some(since) = direct_since.take() {
            if since.elapsed() >= STABLE_LINK {
                backoff.reset();
                wait_first = false;
            }
        }
        if wait_first {
            wait_first = false;
            let delay = backoff.next_delay();
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            continue;
        }
        wait_first = true;
        let mut connected = false;
        for addr in &member.addrs {
            let attempt = async {
                let stream = connect(&inner, *addr)
                    .await
                    .map_err(|e| format!("connect {addr}: {e}"))?;
                inner
                    .initiate(stream, &peer, &key, LinkPath::Direct(*addr))
                    .await
                    .map_err(|e| format!("{addr}: {e}"))
            };
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                result = attempt => result,
            };
            match result {
                Ok(()) => {
                    connected = true;
                    break;
                }
                Err(error) => {
                    debug!(peer = %peer, %error, "direct dial failed");
                    inner.set_last_error(&peer, error);
                }
            }
        }
        if connected {
            continue;
        }
        if !has_any {
            if let Route::Via(via) = route {
                let stream_key = RelayKey {
                    peer: peer.clone(),
                    via: via.clone(),
                    stream: inner.next_id.fetch_add(1, Ordering::Relaxed),
                    ours: true,
                };
                if let Some((stream, _)) = inner.open_relay_stream(stream_key) {
                    let attempt =
                        inner.initiate(stream, &peer, &key, LinkPath::Relayed(via.clone()));
                    let result = tokio::select! {
                        _ = cancel.cancelled() => return,
                        result = attempt => result,
                    };
                    match result {
                        Ok(()) => info!(peer = %peer, via = %via, "relayed link up"),
                        Err(error) => inner.set_last_error(&peer, format!("via {via}: {error}")),
                    }
                }
            }
        }
        wait_first = false;
        let delay = backoff.next_delay();
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
            _ = &mut notified => {}
        }
    }
}
