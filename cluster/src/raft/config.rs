//! The cluster's configuration section.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::mesh::{Member, MeshConfig};

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
    /// Backup-only stores outside the Raft membership that this node sends backups to: they
    /// join the mesh's member list (so a link to them is allowed) but never the Raft
    /// membership (no log, no snapshot, no application state reaches them). Default none.
    pub backup_peers: Vec<Member>,
    /// Bytes this node's backup store (`<data_dir>/backup-store`, chunks other nodes send it)
    /// may hold; `None`: no limit but the disk. Default none.
    pub backup_store_quota_bytes: Option<u64>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("kermail-data"),
            name: "kermail".to_string(),
            site: "default".to_string(),
            raft: RaftTimings::default(),
            mesh: MeshConfig::default(),
            backup_peers: Vec::new(),
            backup_store_quota_bytes: None,
        }
    }
}

/// Raft timings and log compaction.
///
/// openraft uses `heartbeat_interval_ms` both as the heartbeat period and as the timeout of
/// every AppendEntries RPC (and of the read-index heartbeat), so it must exceed the worst round
/// trip plus the follower's fsync. Elections are the application's (`service::run_elections`):
/// a voter whose leader has been silent for a random time in the election timeout range, or
/// whose mesh link to the leader dropped, asks the others for a pre-vote and stands only with
/// a majority; a leader that heard no majority for `election_timeout_min_ms` refuses writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftTimings {
    /// Heartbeat period and AppendEntries RPC timeout.
    pub heartbeat_interval_ms: u64,
    /// A follower that hears no leader for a random time in
    /// `[election_timeout_min_ms, election_timeout_max_ms)` asks for a pre-vote (and stands if
    /// a majority hears no leader either); a leader that hears no majority for
    /// `election_timeout_min_ms` refuses writes (check-quorum).
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
    /// on a loaded 2-core box. A leader silent for 0.5 to 0.8 s (more than three heartbeats)
    /// is suspected; the pre-vote keeps a false suspicion harmless (the other voters still hear
    /// the leader and refuse). A silently cut leader is replaced about 0.6 s after the cut (the
    /// goal: writes flow again within 1 s median, 3 s worst); a crashed one as soon as its links
    /// drop and openraft's lease (one heartbeat) ran out. Snapshot chunks of 3 MiB cross a LAN
    /// well within 10 s.
    pub fn lan() -> Self {
        Self {
            heartbeat_interval_ms: 150,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 800,
            install_snapshot_timeout_ms: 10_000,
            propose_timeout_ms: 5_000,
            snapshot_after_logs: 5_000,
            logs_kept_after_snapshot: 1_000,
        }
    }

    /// Sites across the internet: round trips up to about 150 ms, plus a follower's fsync (up
    /// to about 50 ms on a busy disk), plus margin: a 300 ms heartbeat (and AppendEntries
    /// timeout). A leader silent for 1.2 to 2.4 s (four to eight heartbeats, eight to sixteen
    /// round trips) is suspected (the goal: writes flow again within 3 s median, 10 s worst).
    /// A 3 MiB snapshot chunk over a 5 Mbit/s home uplink takes about 5 s: 60 s per chunk.
    /// Proposals wait up to 10 s, enough for an election plus a commit.
    pub fn wan() -> Self {
        Self {
            heartbeat_interval_ms: 300,
            election_timeout_min_ms: 1_200,
            election_timeout_max_ms: 2_400,
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
