//! The Raft half of the replication engine: openraft 0.9 wired to an append-only segment log,
//! snapshot files and the application's state machine.
//!
//! Module map:
//! - [`types`]: the openraft type configuration ([`TypeConfig`]), the log payload
//!   ([`CommandBatch`]), its response ([`CommandResponses`]) and the node record ([`NodeInfo`]).
//! - [`config`]: [`ClusterConfig`] and the [`RaftTimings`] presets.
//! - [`log_store`]: [`LogStore`], the Raft log in append-only segment files with CRC'd records,
//!   and the vote and commit index in an atomically replaced meta file (fsync before ack).
//! - [`state_machine`]: [`StateMachineStore`], which feeds committed commands to the
//!   [`crate::AppStateMachine`] and builds, installs and restores snapshots.
//! - [`snapshot_file`]: the on-disk snapshot format (versioned header, then the app stream
//!   through zstd) and its atomic write.
//! - [`network`]: [`MeshNetwork`], openraft's network over the Noise mesh (AppendEntries and
//!   Vote on the `raft` channel, snapshot chunks on `bulk`), and the RPC server that binds node
//!   ids to mesh peers.
//! - [`wire`]: the messages nodes exchange (bincode).
//! - [`fetch`]: a node installing a snapshot fetches the bodies it lacks from its peers
//!   ([`fetch::ObjectFetcher`]) and serves theirs ([`fetch::serve`]), on the `bulk` channel.
//! - [`backup_store`]: backup chunks this node keeps for other nodes (target kind `node`),
//!   requested on the `bulk` channel beside snapshot chunks.
//! - [`service`]: forwarded writes, membership changes on the leader (invite, join, remove,
//!   leave), the join driver, `cluster status` ([`ClusterView`]) and the task keeping the
//!   mesh's member list equal to the Raft membership.
//! - [`membership`]: invitation tokens, join state files, the site-loss verdict.
//! - [`applied`]: the applied index with its waiters (a follower's read-your-writes wait wakes
//!   once, when its entry is applied, not at every metrics change).
//! - [`node`]: [`Cluster`], the handle the mail node uses (open, propose, status, snapshot,
//!   shutdown), with the proposal batcher that gives group commit.
//!
//! Invariants:
//! - An entry is acknowledged to openraft (`LogFlushed::log_io_completed`) only after the
//!   segment files it was written to were fdatasync'd. The vote is flushed before `save_vote` returns.
//! - The application sees every committed command exactly once per process lifetime, in log
//!   order, starting after the snapshot it was restored from. Several commands proposed
//!   concurrently may share one log entry (a [`CommandBatch`]); they are then applied in batch
//!   order with the same `log_index`.

pub(crate) mod applied;
pub mod backup_store;
pub mod config;
pub mod fetch;
pub mod log_store;
pub mod membership;
pub mod network;
pub mod node;
pub(crate) mod recovery;
pub mod service;
pub mod snapshot_file;
pub mod state_machine;
pub mod types;
pub mod wire;

#[cfg(test)]
mod cluster_tests;
#[cfg(test)]
mod tests;

pub use config::{ClusterConfig, RaftTimings};
pub use log_store::{LogStore, LogStoreError};
pub use membership::{critical_sites, InviteToken, JoinPhase};
pub use network::MeshNetwork;
pub use node::{
    Cluster, ClusterError, ClusterRole, ClusterStatus, JoinReport, MemberStatus, ProposeError,
};
pub use service::{ClusterView, NodeView};
pub use state_machine::StateMachineStore;
pub use types::{CommandBatch, CommandResponses, Joining, NodeId, NodeInfo, TypeConfig};
