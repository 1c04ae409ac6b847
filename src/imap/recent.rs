//! `\Recent`: the UIDs this session owns as recent in its selected mailbox, and the claims that
//! give them to it (the replicated boundary is in `store/imap_state.rs`).
//!
//! A read-write SELECT claims every UID above the mailbox's boundary; NOOP, CHECK and the end
//! of IDLE claim the ones that arrived since (and report `* n RECENT`). Other commands claim
//! nothing, so a message that arrives while a session only FETCHes stays unclaimed until some
//! session polls or selects. EXAMINE sees the unclaimed UIDs as recent without claiming them.

use std::io::Write;
use std::time::Duration;

use super::session::{Session, State};
use crate::store::{AccountId, MailStore, MailboxId, MessageList, Uid};

/// Most separate UID ranges one session keeps as recent; past it, the oldest range stops
/// being recent for this session (claims by other sessions in between make the gaps).
const MAX_RECENT_RANGES: usize = 1_024;

/// How long a SELECT or NOOP waits for its claim to commit. `\Recent` is worth less than an
/// answer: without a quorum (when a proposal waits for its timeout) the command goes on with
/// no new recent messages instead of hanging. A claim that commits later leaves those
/// messages recent in no session, which RFC 3501 tolerates better than two.
pub const RECENT_CLAIM_WAIT: Duration = Duration::from_secs(2);

/// Claims `..= up_to` of `mailbox` within [`RECENT_CLAIM_WAIT`]; the range now owned, if any.
pub async fn claim(
    store: &MailStore,
    account: AccountId,
    mailbox: MailboxId,
    up_to: Uid,
) -> Option<(Uid, Uid)> {
    match tokio::time::timeout(
        RECENT_CLAIM_WAIT,
        store.claim_recent(account, mailbox, up_to),
    )
    .await
    {
        Ok(Ok(range)) => range,
        Ok(Err(error)) => {
            tracing::info!(%error, "cannot claim \\Recent messages");
            None
        }
        Err(_) => {
            tracing::info!("claiming \\Recent messages took too long; going on without");
            None
        }
    }
}

/// Inclusive UID ranges, ascending and disjoint.
#[derive(Debug, Default)]
pub struct RecentUids {
    ranges: Vec<(Uid, Uid)>,
}

impl RecentUids {
    pub fn contains(&self, uid: Uid) -> bool {
        let index = self.ranges.partition_point(|&(_, high)| high < uid);
        self.ranges.get(index).is_some_and(|&(low, _)| low <= uid)
    }

    /// Adds a range above every range held (claims only move up).
    pub fn add(&mut self, (low, high): (Uid, Uid)) {
        if low > high {
            return;
        }
        match self.ranges.last_mut() {
            Some((_, last_high)) if last_high.saturating_add(1) >= low => {
                *last_high = (*last_high).max(high);
            }
            _ => self.ranges.push((low, high)),
        }
        if self.ranges.len() > MAX_RECENT_RANGES {
            self.ranges.remove(0);
        }
    }

    /// How many of `messages` (sorted by UID) are recent.
    pub fn count_in(&self, messages: &MessageList) -> usize {
        self.ranges
            .iter()
            .map(|&(low, high)| {
                messages.partition_point(|m| m.uid <= high)
                    - messages.partition_point(|m| m.uid < low)
            })
            .sum()
    }
}

impl Session {
    /// Takes the UIDs of the selected mailbox above its recent boundary as this session's own
    /// (read-write sessions only) and writes `* n RECENT` when that gave it new ones. A failed
    /// claim (no quorum, or no commit within [`RECENT_CLAIM_WAIT`]) only means no new
    /// `\Recent` messages; it is logged.
    pub(super) async fn claim_new_recent(&mut self, out: &mut Vec<u8>) {
        let State::Selected { account, mailbox } = &self.state else {
            return;
        };
        // ACL: another account's mailbox keeps its \Recent messages for its owner; IMAP4rev2
        // has no \Recent.
        if mailbox.read_only || mailbox.last_uid() == 0 || mailbox.owner != *account || self.rev2 {
            return;
        }
        // ACL: the owner's mailbox, whoever selected it.
        if let Some(range) = claim(&self.store, mailbox.owner, mailbox.id, mailbox.last_uid()).await
        {
            self.recent.add(range);
            let count = self.recent.count_in(&mailbox.messages);
            let _ = write!(out, "* {count} RECENT\r\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{BlobId, FlagSet, MessageMeta};

    fn message(uid: Uid) -> MessageMeta {
        MessageMeta {
            uid,
            blob: BlobId([0; 32]),
            size: 1,
            internal_date: 0,
            internal_date_offset_min: 0,
            flags: FlagSet::new(),
            modseq: 1,
            saved_at: 0,
        }
    }

    #[test]
    fn ranges_merge_and_count() {
        let mut recent = RecentUids::default();
        recent.add((3, 5));
        recent.add((6, 7));
        recent.add((10, 10));
        recent.add((9, 8));
        assert_eq!(recent.ranges, vec![(3, 7), (10, 10)]);
        for (uid, expected) in [(2, false), (3, true), (7, true), (8, false), (10, true)] {
            assert_eq!(recent.contains(uid), expected, "{uid}");
        }
        let messages: Vec<MessageMeta> = [1, 4, 5, 9, 10, 11].map(message).to_vec();
        assert_eq!(recent.count_in(&messages.into()), 3);
        for i in 0..(MAX_RECENT_RANGES as Uid + 5) {
            recent.add((20 + 2 * i, 20 + 2 * i));
        }
        assert_eq!(recent.ranges.len(), MAX_RECENT_RANGES);
        assert!(!recent.contains(3));
    }
}
