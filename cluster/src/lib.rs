//! kermail-cluster: the replication engine. It knows nothing about mail.
//!
//! Module map:
//! - [`app`]: the trait the application implements ([`AppStateMachine`]); the cluster feeds it
//!   committed commands in log order and asks it for snapshots.
//! - [`health`]: whether the node's disk takes writes ([`StorageHealth`]); storage failures are
//!   retried and reported there instead of stopping Raft.
//! - [`raft`]: openraft wired to a segment-file log store, file snapshots and the application; its
//!   [`Cluster`] handle is what the mail node opens, proposes through and asks for status.
//! - [`mesh`]: the Noise-encrypted links between nodes (identity, handshake, framing, channels,
//!   relaying).

pub mod app;
pub mod health;
pub mod mesh;
pub mod raft;

pub use app::{AppStateMachine, ObjectId, ObjectRef, SnapshotBuilder};
pub use health::{StorageComponent, StorageFailure, StorageHealth};
pub use raft::{
    Cluster, ClusterConfig, ClusterError, ClusterRole, ClusterStatus, ClusterView, JoinPhase,
    JoinReport, MemberStatus, NodeInfo, NodeView, ProposeError, RaftTimings,
};
