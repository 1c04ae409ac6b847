//! The encrypted mesh between nodes: Noise (snow) links over TCP, replacing tinc.
//!
//! Module map:
//! - [`identity`]: the node's static X25519 key and `node.key` ([`keygen`]).
//! - [`handshake`]: sans-IO `Noise_IK(psk2)` handshake; refuses non-members before any payload.
//! - [`codec`]: sans-IO wire format: 2-byte length frames, records, message splitting and
//!   bounded reassembly, [`Channel`]s.
//! - [`routing`]: sans-IO routing table (direct, relayed via a neighbour, unreachable).
//! - `link` (private): the tokio driver of one link (reader and writer tasks, priorities,
//!   keepalives, rekey, relaying).
//! - `node` (private): [`Mesh`], the handle: listeners, dialers with backoff, one link per
//!   pair, send/request/incoming, status.
//!
//! Peers are identified by their member **name**; the name is bound to the member's public key
//! by the membership, and the handshake checks both.
//!
//! Invariants: every byte between nodes is inside a Noise transport message; a frame that does
//! not decrypt, parse or fit the limits closes its link (and the dialer reconnects); a relay
//! only moves ciphertext of an inner Noise link between the two endpoints; at most one link per
//! pair carries traffic (direct preferred, then the lower initiator key, then the newest).

pub mod codec;
pub mod handshake;
pub mod identity;
mod link;
mod node;
pub mod routing;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::PathBuf;

pub use codec::Channel;
pub use identity::{keygen, Identity, IdentityError};
pub use node::{Incoming, Mesh, Responder};

/// Default largest application message: holds a Raft entry with a maximum-size mail, and a
/// snapshot chunk.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// The `[mesh]` section of the node configuration.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeshConfig {
    /// Addresses to listen on for links from other nodes. Default `127.0.0.1:7655` (loopback
    /// only, like every embedded default; a real deployment lists its public addresses).
    pub listen: Vec<SocketAddr>,
    /// The node's key file (created on first start, mode 0600). Default `node.key`.
    pub key_file: PathBuf,
    /// Cluster id, bound into every handshake. Default `kermail`.
    pub cluster_id: String,
    /// Optional cluster-wide pre-shared key, base64 of 32 bytes (switches to IKpsk2).
    pub psk_base64: Option<String>,
    /// Largest application message. Default 64 MiB.
    pub max_message_bytes: usize,
    /// Interval of keepalive pings (which also measure the round trip). Default 1,000 ms.
    pub keepalive_interval_ms: u64,
    /// A link that receives nothing for this long is closed. Default 5,000 ms.
    pub dead_peer_timeout_ms: u64,
    /// Time allowed for a TCP connect. Default 3,000 ms.
    pub connect_timeout_ms: u64,
    /// Time allowed for a handshake. Default 5,000 ms.
    pub handshake_timeout_ms: u64,
    /// First reconnection delay; doubles after each failure, with jitter. Default 200 ms.
    pub backoff_initial_ms: u64,
    /// Largest reconnection delay. Default 30,000 ms.
    pub backoff_max_ms: u64,
    /// Rekey a link's sending direction after this many bytes. Default 1 GiB.
    pub rekey_after_bytes: u64,
    /// Rekey a link's sending direction after this long. Default 120 s.
    pub rekey_after_secs: u64,
    /// Messages queued per channel and link before `send` waits. Default 256.
    pub send_queue_messages: usize,
    /// Messages queued per channel for the application before the link stops reading.
    /// Default 1,024.
    pub receive_queue_messages: usize,
    /// TCP send and receive buffer size; `None` lets the kernel tune it. Smaller buffers bound
    /// how long a high-priority frame can wait behind bulk bytes already in the socket.
    pub tcp_buffer_bytes: Option<usize>,
    /// Most bytes written to a link's socket but not yet sent (Linux `TCP_NOTSENT_LOWAT`):
    /// keeps the send queue in the mesh, where raft frames overtake bulk frames, instead of in
    /// the kernel, without limiting the bytes in flight. 0 leaves the kernel default.
    /// Default 128 KiB.
    pub tcp_notsent_lowat_bytes: u32,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 7655))],
            key_file: PathBuf::from("node.key"),
            cluster_id: "kermail".into(),
            psk_base64: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            keepalive_interval_ms: 1_000,
            dead_peer_timeout_ms: 5_000,
            connect_timeout_ms: 3_000,
            handshake_timeout_ms: 5_000,
            backoff_initial_ms: 200,
            backoff_max_ms: 30_000,
            rekey_after_bytes: 1 << 30,
            rekey_after_secs: 120,
            send_queue_messages: 256,
            receive_queue_messages: 1_024,
            tcp_buffer_bytes: None,
            tcp_notsent_lowat_bytes: 128 * 1024,
        }
    }
}

/// A cluster member as the mesh sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Member {
    /// Unique node name; the peer id of every mesh call.
    pub name: String,
    /// Site label.
    pub site: String,
    /// Static public key, base64 (as printed by `kermail keygen`).
    pub public_key: String,
    /// Addresses to dial, tried in order (IPv4 and IPv6 welcome).
    pub addrs: Vec<SocketAddr>,
}

/// Errors of the mesh API.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("no member {0} in the mesh")]
    UnknownPeer(String),
    #[error("peer {0} is unreachable (no direct or relayed link)")]
    Unreachable(String),
    /// The last link to the peer dropped while the request was out: it may or may not have
    /// been handled there.
    #[error("the link to {0} dropped while the request was in flight (outcome unknown)")]
    LinkLost(String),
    #[error("no answer from {peer} within {timeout_ms} ms")]
    Timeout { peer: String, timeout_ms: u64 },
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    MessageTooLarge { len: usize, max: usize },
    #[error("our public key is not in the member list; add this node first")]
    NotAMember,
    #[error("member {name} has an invalid public key")]
    BadMemberKey { name: String },
    #[error("invalid mesh psk: expected base64 of 32 bytes")]
    BadPsk,
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the mesh is shut down")]
    Shutdown,
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// State of the link to a peer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LinkState {
    /// A direct TCP link, to or from this address.
    Direct { addr: String },
    /// An end-to-end encrypted link relayed by another member.
    Relayed { via: String },
    /// No link.
    Down,
}

/// One peer in [`MeshStatus`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub site: String,
    pub public_key: String,
    pub link: LinkState,
    /// Last keepalive round trip on the current link.
    pub rtt_ms: Option<f64>,
    /// Wire bytes (frames, encrypted) sent to and received from this peer.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Application messages sent to and received from this peer.
    pub messages_sent: u64,
    pub messages_received: u64,
    /// Completion of the last handshake, milliseconds since the Unix epoch.
    pub last_handshake_unix_ms: Option<u64>,
    pub last_error: Option<String>,
    /// A pending invitee (see [`Mesh::set_pending`]), not a member yet.
    #[serde(default)]
    pub pending: bool,
}

/// What `kermail mesh status` prints (as JSON or a table).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MeshStatus {
    pub node: String,
    pub site: String,
    pub public_key: String,
    pub listen: Vec<String>,
    /// Handshakes refused (unknown key, wrong name, bad cluster id or psk, garbage).
    pub handshakes_refused: u64,
    pub last_refusal: Option<String>,
    pub peers: Vec<PeerStatus>,
}
