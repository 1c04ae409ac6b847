//! The Raft half of the replication engine: openraft 0.9 wired to sled, snapshot files and the
//! application's state machine.
//!
//! Module map:
//! - [`types`]: the openraft type configuration ([`TypeConfig`]), the log payload
//!   ([`CommandBatch`]), its response ([`CommandResponses`]) and the node record ([`NodeInfo`]).
//! - [`config`]: [`ClusterConfig`] and the [`RaftTimings`] presets.
//! - [`log_store`]: [`LogStore`], the Raft log, vote and commit index in sled (fsync before ack).
//! - [`state_machine`]: [`StateMachineStore`], which feeds committed commands to the
//!   [`crate::AppStateMachine`] and builds, installs and restores snapshots.
//! - [`snapshot_file`]: the on-disk snapshot format (versioned header, then the app stream
//!   through zstd) and its atomic write.
//! - [`network`]: [`UnreachableNetwork`], the network of a one-voter cluster; issue 4 replaces it
//!   with the Noise mesh.
//! - [`node`]: [`Cluster`], the handle the mail node uses (open, propose, status, snapshot,
//!   shutdown), with the proposal batcher that gives group commit.
//!
//! Invariants:
//! - An entry is acknowledged to openraft (`LogFlushed::log_io_completed`) only after sled's
//!   flush, which fsyncs, returned successfully. The vote is flushed before `save_vote` returns.
//! - The application sees every committed command exactly once per process lifetime, in log
//!   order, starting after the snapshot it was restored from. Several commands proposed
//!   concurrently may share one log entry (a [`CommandBatch`]); they are then applied in batch
//!   order with the same `log_index`.

pub mod config;
pub mod log_store;
pub mod network;
pub mod node;
pub mod snapshot_file;
pub mod state_machine;
pub mod types;

#[cfg(test)]
mod tests;

pub use config::{ClusterConfig, RaftTimings};
pub use log_store::LogStore;
pub use network::UnreachableNetwork;
pub use node::{Cluster, ClusterError, ClusterRole, ClusterStatus, MemberStatus, ProposeError};
pub use state_machine::StateMachineStore;
pub use types::{CommandBatch, CommandResponses, NodeId, NodeInfo, TypeConfig};
