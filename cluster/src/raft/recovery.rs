//! A node that restarted with a torn log tail: it may have lost entries it had acknowledged,
//! so it neither votes nor stands until a leader has given them back.
//!
//! Why: an entry is committed once a majority acknowledged it (fsync'd). If this node's copy
//! counted in that majority and is gone, the entry may now be held by a minority only; were
//! this node to vote for a candidate lacking it, the new leader would overwrite a committed
//! entry (a `250` lost). Raft assumes a disk keeps what it fsync'd; the chaos `truncate` fault
//! (and a disk with a volatile write cache) breaks that, and the log store sees it as a torn
//! last record (`log_store::LostTail`).
//!
//! The rule. Let `t0` be this node's vote term when the loss was found. Every entry committed
//! with this node's lost copy was committed before that restart, in a term `<= t0`.
//! - Vote (and pre-vote) only for a candidate whose last log term is `> t0`: a leader of a term
//!   `> t0` was elected without this node's damaged log (before the loss it had not voted in
//!   that term; after it, it refuses), so by Raft's usual argument its log holds every entry
//!   committed before, and the candidate's log, which ends with an entry of that leader, holds
//!   them too (log matching).
//! - Never stand while recovering.
//! - Leave the state once a leader of term `t` sent a commit index `C` of its own term `t`
//!   (it committed an entry of its own term, so `C` is past every entry it held when elected,
//!   which includes every entry committed before: by the argument above for `t > t0`, and for
//!   `t == t0` because that leader is the one that committed them, and its commit index only
//!   grows) and this node has applied up to `C`: its log then matches that leader's up to `C`
//!   and holds every entry committed with its lost copy.
//! - The state survives a restart (the marker file `lost-tail` beside the segments holds
//!   `t0`; the torn bytes are already cut, so a second open would not see them).
//! - Escape: a node that heard no leader for [`LOST_TAIL_VOTE_HOLD`] votes again (logged at
//!   warn). Without it a majority that restarted torn at once (a power loss across the
//!   cluster, where a torn last record is the honest, unacknowledged write in flight) would
//!   never elect a leader. The price: an entry committed with this node's lost copy is lost
//!   if every other node holding it stays down that long.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::types::{LogId, NodeId};

/// How long a node recovering a lost tail waits without hearing any leader before it votes
/// again (see the module documentation, "Escape").
pub const LOST_TAIL_VOTE_HOLD: Duration = Duration::from_secs(120);

/// The marker file (in the Raft log folder) of a node recovering a lost tail; holds `t0`.
pub(crate) const LOST_TAIL_FILE_NAME: &str = "lost-tail";

/// The recovery state of one node (see the module documentation).
#[derive(Debug)]
pub(crate) struct TailRecovery {
    active: AtomicBool,
    /// This node's vote term when the loss was found.
    lost_term: u64,
    /// A commit index of its own term a leader sent after the restart.
    target: Mutex<Option<LogId>>,
    /// Last AppendEntries or snapshot accepted from a leader (or the start).
    last_leader_contact: Mutex<Instant>,
    marker: Option<PathBuf>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl TailRecovery {
    /// A node with its whole log.
    pub(crate) fn inactive() -> Self {
        Self {
            active: AtomicBool::new(false),
            lost_term: 0,
            target: Mutex::new(None),
            last_leader_contact: Mutex::new(Instant::now()),
            marker: None,
        }
    }

    /// A node that lost entries after vote term `lost_term`; `marker` is removed when done.
    pub(crate) fn lost(lost_term: u64, marker: PathBuf) -> Self {
        tracing::warn!(
            lost_term,
            "raft log: entries this node had acknowledged may be lost (torn log tail): it \
             neither votes nor stands until a leader has given them back"
        );
        Self {
            active: AtomicBool::new(true),
            lost_term,
            target: Mutex::new(None),
            last_leader_contact: Mutex::new(Instant::now()),
            marker: Some(marker),
        }
    }

    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Whether this node may vote (or grant a pre-vote) for a candidate whose log ends at
    /// `candidate_last`.
    pub(crate) fn may_vote_for(&self, candidate_last: Option<LogId>) -> bool {
        !self.is_active() || candidate_last.is_some_and(|last| last.leader_id.term > self.lost_term)
    }

    /// An AppendEntries from the leader of `vote` (committed vote: an established leader),
    /// carrying `leader_commit`, was accepted.
    pub(crate) fn heard_leader(&self, leader_term: u64, leader_commit: Option<LogId>) {
        if !self.is_active() {
            return;
        }
        *lock(&self.last_leader_contact) = Instant::now();
        if let Some(commit) = leader_commit.filter(|c| c.leader_id.term == leader_term) {
            let mut target = lock(&self.target);
            if target.is_none() {
                tracing::info!(%commit, "lost tail: waiting to apply the leader's commit index");
                *target = Some(commit);
            }
        }
    }

    /// A snapshot was installed from a leader (leader contact, nothing more).
    pub(crate) fn heard_snapshot(&self) {
        if self.is_active() {
            *lock(&self.last_leader_contact) = Instant::now();
        }
    }

    /// Ends the state once `last_applied` reached the target, or after the hold without a
    /// leader. Returns whether it is still active.
    pub(crate) fn poll(&self, last_applied: Option<LogId>, node_id: NodeId) -> bool {
        if !self.is_active() {
            return false;
        }
        let target = *lock(&self.target);
        if let Some(target) = target.filter(|t| last_applied.is_some_and(|a| a.index >= t.index)) {
            tracing::info!(
                node_id,
                %target,
                "lost tail: applied the leader's commit index: voting again"
            );
            self.finish();
            return false;
        }
        let silent = lock(&self.last_leader_contact).elapsed();
        if silent >= LOST_TAIL_VOTE_HOLD {
            tracing::warn!(
                node_id,
                silent_s = silent.as_secs(),
                "lost tail: no leader heard for the hold: voting again (an entry committed with \
                 this node's lost copy is lost if no other node holds it)"
            );
            self.finish();
            return false;
        }
        true
    }

    /// This node leads (a lone voter elects itself): there is nobody to get entries from.
    pub(crate) fn leading(&self, node_id: NodeId) {
        if self.is_active() {
            tracing::info!(node_id, "lost tail: this node leads: the recovery ends");
            self.finish();
        }
    }

    fn finish(&self) {
        self.active.store(false, Ordering::Release);
        if let Some(marker) = &self.marker {
            if let Err(error) = remove_marker(marker) {
                tracing::warn!(path = %marker.display(), %error, "cannot remove the lost-tail marker");
            }
        }
    }
}

fn remove_marker(marker: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(marker) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    if let Some(dir) = marker.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    #[test]
    fn votes_only_for_later_terms_until_the_leaders_commit_is_applied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join(LOST_TAIL_FILE_NAME);
        std::fs::write(&marker, b"5").expect("marker");
        let r = TailRecovery::lost(5, marker.clone());
        assert!(!r.may_vote_for(Some(log_id(5, 100))));
        assert!(!r.may_vote_for(None));
        assert!(r.may_vote_for(Some(log_id(6, 3))));
        // A commit index of an earlier term than the leader's says nothing.
        r.heard_leader(5, Some(log_id(4, 90)));
        assert!(r.poll(Some(log_id(4, 95)), 1));
        r.heard_leader(5, Some(log_id(5, 98)));
        assert!(r.poll(Some(log_id(5, 97)), 1));
        assert!(marker.exists());
        assert!(!r.poll(Some(log_id(5, 98)), 1));
        assert!(r.may_vote_for(Some(log_id(1, 1))));
        assert!(!marker.exists());
    }
}
