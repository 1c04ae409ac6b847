//! The cluster's configuration section.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::mesh::MeshConfig;

/// The cluster section of the node's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// The node's data folder. The Raft log lives in `<data_dir>/raft` (segment files), snapshots in
    /// `<data_dir>/snapshots`. Default `kermail-data`.
    pub data_dir: PathBuf,
    /// This node's name, shown in status and membership. Default `kermail`.
    pub name: String,
    /// This node's site label (the failure domain). Default `default`.
    pub site: String,
    /// Raft timings and log compaction. Default [`RaftTimings::lan`].
    pub raft: RaftTimings,
    /// The mesh: listen addresses, key file (relative to `data_dir`), cluster id, psk, limits.
    pub mesh: MeshConfig,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("kermail-data"),
            name: "kermail".to_string(),
            site: "default".to_string(),
            raft: RaftTimings::default(),
            mesh: MeshConfig::default(),
        }
    }
}

/// Raft timings and log compaction.
///
/// openraft uses `heartbeat_interval_ms` both as the heartbeat period and as the timeout of
/// every AppendEntries RPC (and of the read-index heartbeat), so it must exceed the worst round
/// trip plus the follower's fsync. The election timeout is about ten heartbeats (etcd's
/// guidance), so that a slow fsync or one lost heartbeat does not start an election.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftTimings {
    /// Heartbeat period and AppendEntries RPC timeout.
    pub heartbeat_interval_ms: u64,
    /// A follower that hears no leader for a random time in
    /// `[election_timeout_min_ms, election_timeout_max_ms)` starts an election.
    pub election_timeout_min_ms: u64,
    /// See `election_timeout_min_ms`.
    pub election_timeout_max_ms: u64,
    /// Timeout of one snapshot chunk RPC (openraft sends 3 MiB chunks).
    pub install_snapshot_timeout_ms: u64,
    /// How long [`crate::Cluster::propose`] waits for commit and local apply before answering
    /// `Unavailable`. The command may still commit afterwards: the outcome is unknown.
    pub propose_timeout_ms: u64,
    /// Build a snapshot once this many entries were applied since the last one
    /// (openraft's `SnapshotPolicy::LogsSinceLast`; 0 never builds one automatically).
    pub snapshot_after_logs: u64,
    /// Entries kept in the log after a snapshot, so that a follower slightly behind catches up
    /// from the log instead of a full snapshot (openraft's `max_in_snapshot_log_to_keep`).
    pub logs_kept_after_snapshot: u64,
}

impl RaftTimings {
    /// One site, one LAN: round trips under 1 ms, fsync 1 to 30 ms on a busy shared disk. A
    /// 150 ms heartbeat (and AppendEntries timeout) leaves room for a 512 KiB batch plus fsync
    /// on a loaded 2-core box; elections after 0.8 to 1.6 s, five to ten heartbeats, so that a
    /// stalled heartbeat or two do not start one. With two survivors the first timer fires after
    /// about 1.07 s on average, so a killed leader is replaced, and writes flow again, in
    /// about 1.2 s (the failover goal is a median under 2 s). Snapshot chunks of 3 MiB cross a
    /// LAN well within 10 s.
    pub fn lan() -> Self {
        Self {
            heartbeat_interval_ms: 150,
            election_timeout_min_ms: 800,
            election_timeout_max_ms: 1_600,
            install_snapshot_timeout_ms: 10_000,
            propose_timeout_ms: 5_000,
            snapshot_after_logs: 5_000,
            logs_kept_after_snapshot: 1_000,
        }
    }

    /// Sites across the internet: round trips up to about 150 ms, plus a follower's fsync (up
    /// to about 50 ms on a busy disk), plus margin: a 300 ms heartbeat (and AppendEntries
    /// timeout). Elections after 3 to 6 s, about ten heartbeats and twenty round trips. A 3 MiB
    /// snapshot chunk over a 5 Mbit/s home uplink takes about 5 s: 60 s per chunk. Proposals
    /// wait up to 10 s, enough for an election plus a commit.
    pub fn wan() -> Self {
        Self {
            heartbeat_interval_ms: 300,
            election_timeout_min_ms: 3_000,
            election_timeout_max_ms: 6_000,
            install_snapshot_timeout_ms: 60_000,
            propose_timeout_ms: 10_000,
            snapshot_after_logs: 5_000,
            logs_kept_after_snapshot: 1_000,
        }
    }
}

impl Default for RaftTimings {
    fn default() -> Self {
        Self::lan()
    }
}
