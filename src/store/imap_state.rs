//! Replicated IMAP state (issue 13): which messages have already been given to a session as
//! `\Recent`.
//!
//! RFC 3501 makes a message recent in exactly one session. In a cluster the sessions of one
//! mailbox may sit on different nodes, so the choice goes through the log: each mailbox has a
//! *recent boundary*, a UID. Every message above it is still unclaimed. A read-write session
//! that sees UIDs above the boundary (at SELECT, or when it polls with NOOP/CHECK/IDLE)
//! proposes [`CommandV6::ClaimRecent`] up to the last UID it sees; apply moves the boundary and
//! answers the boundary it found, so the proposer owns exactly the UIDs between the two, and a
//! session whose claim comes second owns none of them. EXAMINE and STATUS read the boundary
//! and claim nothing.
//!
//! Modification sequences (RFC 7162, CONDSTORE and QRESYNC) live here too ([`ModseqState`]):
//! each mailbox's highest modseq and the UIDs it expunged, with the modseq of each expunge,
//! for `VANISHED`. A message's own modseq is [`super::MessageMeta::modseq`]. Apply gives a
//! change to a mailbox the modseq `max(highest + 1, log index)` ([`ModseqState::bump`]):
//! every replica applies the same command at the same log index to the same highest modseq,
//! so every replica numbers every change alike, and the log index makes replicas that once
//! disagreed (restored from snapshots written before modseqs existed, at different points)
//! agree again from the next change of each mailbox on.
//! [`CommandV7::StoreFlags`] is STORE with `UNCHANGEDSINCE`: the test against each message's
//! modseq runs in apply, so it holds against every other session on every node.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::command::{ApplyError, Response, UidRange};
use super::state::{Effects, Outcome, State};
use super::{AccountId, FlagOp, FlagSet, MailboxId, MessageMeta, Uid};

/// Expunged UID ranges remembered per mailbox for `VANISHED`; past this many, the oldest half
/// is forgotten and a QRESYNC from before them gets every UID the mailbox no longer has
/// (RFC 7162 3.2.5.1 allows reporting UIDs that were expunged earlier).
pub const MAX_VANISHED_RANGES_PER_MAILBOX: usize = 4_096;
/// The highest modseq of a mailbox no change has touched yet.
pub const INITIAL_MODSEQ: u64 = 1;

/// The replicated IMAP state: one struct, carried by the snapshot as a field of its own
/// (`SnapshotMeta::V4`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImapState {
    /// (account, mailbox) -> the greatest UID already given to a session as `\Recent`. No
    /// entry: 0 (every message is still recent).
    pub recent_boundary: BTreeMap<(AccountId, MailboxId), Uid>,
    /// Highest modseqs and expunges; carried by the snapshot as a section of its own
    /// (`modseq`), so snapshots written before it still load.
    #[serde(skip)]
    pub modseq: ModseqState,
}

/// The mailboxes' modification sequences (RFC 7162).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ModseqState {
    /// (account, mailbox) -> its modseq bookkeeping. No entry: nothing changed yet
    /// ([`INITIAL_MODSEQ`], nothing expunged).
    pub mailboxes: BTreeMap<(AccountId, MailboxId), MailboxModseq>,
    /// The log index of the command being applied (set before each apply from the log, so
    /// the same on every replica; 0 where commands are applied without a log).
    #[serde(skip)]
    pub clock: u64,
}

impl PartialEq for ModseqState {
    fn eq(&self, other: &Self) -> bool {
        // The clock is the apply loop's input, not state.
        self.mailboxes == other.mailboxes
    }
}
impl Eq for ModseqState {}

/// One mailbox's modseqs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxModseq {
    /// HIGHESTMODSEQ: the modseq of the last change (append, flag change, expunge).
    pub highest: u64,
    /// (modseq, first UID, last UID): expunged UIDs in ascending modseq order. Adjacent
    /// ranges merge under the later modseq (a resync may then hear of a few UIDs it already
    /// knew were gone, which RFC 7162 allows).
    pub vanished: Vec<(u64, Uid, Uid)>,
    /// Expunges at or below this modseq are forgotten.
    pub forgotten_through: u64,
}

impl MailboxModseq {
    fn new() -> Self {
        MailboxModseq {
            highest: INITIAL_MODSEQ,
            vanished: Vec::new(),
            forgotten_through: 0,
        }
    }
}

impl ModseqState {
    /// HIGHESTMODSEQ of a mailbox.
    pub fn highest(&self, account: AccountId, mailbox: MailboxId) -> u64 {
        self.mailboxes
            .get(&(account, mailbox))
            .map_or(INITIAL_MODSEQ, |m| m.highest)
    }

    /// The modseq of a change to `mailbox` being applied now; it becomes the highest.
    pub fn bump(&mut self, account: AccountId, mailbox: MailboxId) -> u64 {
        let clock = self.clock;
        let entry = self
            .mailboxes
            .entry((account, mailbox))
            .or_insert_with(MailboxModseq::new);
        entry.highest = entry.highest.saturating_add(1).max(clock);
        entry.highest
    }

    /// Sets a (new) mailbox's highest modseq to at least `at_least` (its messages came with
    /// their modseqs: INBOX renamed).
    pub fn raise(&mut self, account: AccountId, mailbox: MailboxId, at_least: u64) {
        let entry = self
            .mailboxes
            .entry((account, mailbox))
            .or_insert_with(MailboxModseq::new);
        entry.highest = entry.highest.max(at_least);
    }

    /// Remembers `uids` (ascending) as expunged from `mailbox` at `modseq`.
    pub fn expunged(
        &mut self,
        account: AccountId,
        mailbox: MailboxId,
        modseq: u64,
        uids: impl IntoIterator<Item = Uid>,
    ) {
        let entry = self
            .mailboxes
            .entry((account, mailbox))
            .or_insert_with(MailboxModseq::new);
        for uid in uids {
            match entry.vanished.last_mut() {
                Some((last_modseq, first, last))
                    if uid >= *first && (*last == uid || last.checked_add(1) == Some(uid)) =>
                {
                    *last = uid;
                    *last_modseq = modseq;
                }
                _ => entry.vanished.push((modseq, uid, uid)),
            }
        }
        if entry.vanished.len() > MAX_VANISHED_RANGES_PER_MAILBOX {
            let drop = entry.vanished.len() - MAX_VANISHED_RANGES_PER_MAILBOX / 2;
            let forgotten = entry.vanished[drop - 1].0;
            entry.vanished.drain(..drop);
            entry.forgotten_through = entry.forgotten_through.max(forgotten);
        }
    }

    /// The UIDs expunged from `mailbox` after modseq `since` (sorted, disjoint ranges), or
    /// `None` when expunges after `since` may have been forgotten.
    pub fn vanished_since(
        &self,
        account: AccountId,
        mailbox: MailboxId,
        since: u64,
    ) -> Option<Vec<UidRange>> {
        let Some(entry) = self.mailboxes.get(&(account, mailbox)) else {
            return Some(Vec::new());
        };
        if since < entry.forgotten_through {
            return None;
        }
        let start = entry
            .vanished
            .partition_point(|(modseq, _, _)| *modseq <= since);
        let ranges = entry.vanished[start..]
            .iter()
            .map(|&(_, first, last)| (first, last))
            .collect();
        Some(super::state::normalize_ranges(ranges))
    }

    /// Forgets a deleted mailbox.
    pub fn forget(&mut self, account: AccountId, mailbox: MailboxId) {
        self.mailboxes.remove(&(account, mailbox));
    }

    /// Forgets every mailbox of a removed account.
    pub fn forget_account(&mut self, account: AccountId) {
        let keys: Vec<(AccountId, MailboxId)> = self
            .mailboxes
            .range((account, 0)..=(account, MailboxId::MAX))
            .map(|(key, _)| *key)
            .collect();
        for key in keys {
            self.mailboxes.remove(&key);
        }
    }
}

/// A message list chunk of a snapshot written before modseqs (its messages get
/// [`INITIAL_MODSEQ`]); `None` if the bytes are not one either.
pub fn decode_legacy_messages(bytes: &[u8]) -> Option<Vec<MessageMeta>> {
    use bincode::Options;
    #[derive(Deserialize)]
    struct LegacyMessageMeta {
        uid: Uid,
        blob: super::BlobId,
        size: u32,
        internal_date: i64,
        internal_date_offset_min: i16,
        flags: FlagSet,
    }
    let legacy: Vec<LegacyMessageMeta> = bincode::DefaultOptions::new()
        .with_limit(bytes.len() as u64)
        .deserialize(bytes)
        .ok()?;
    Some(
        legacy
            .into_iter()
            .map(|m| MessageMeta {
                uid: m.uid,
                blob: m.blob,
                size: m.size,
                internal_date: m.internal_date,
                internal_date_offset_min: m.internal_date_offset_min,
                flags: m.flags,
                modseq: INITIAL_MODSEQ,
                saved_at: 0,
            })
            .collect(),
    )
}

/// IMAP commands of the CONDSTORE work (issue 13).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandV7 {
    /// STORE, with RFC 7162's `UNCHANGEDSINCE`: a message whose modseq is greater than
    /// `unchanged_since` is left alone and named in the answer's `modified`. Answered with
    /// [`Response::FlagsModseq`].
    StoreFlags {
        account: AccountId,
        mailbox: MailboxId,
        uids: Vec<UidRange>,
        op: FlagOp,
        flags: FlagSet,
        unchanged_since: Option<u64>,
    },
}

/// IMAP commands (issue 13).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandV6 {
    /// A read-write session takes the UIDs above the mailbox's recent boundary, up to `up_to`
    /// (the last UID it has seen), as its `\Recent` messages. Answered with
    /// [`Response::RecentClaimed`].
    ClaimRecent {
        account: AccountId,
        mailbox: MailboxId,
        up_to: Uid,
    },
}

impl ImapState {
    /// The greatest UID of `mailbox` already given to a session as `\Recent`.
    pub fn recent_boundary(&self, account: AccountId, mailbox: MailboxId) -> Uid {
        self.recent_boundary
            .get(&(account, mailbox))
            .copied()
            .unwrap_or(0)
    }
}

impl State {
    /// Applies one CONDSTORE command. Pure; a refusal changes nothing.
    pub fn apply_v7(&mut self, command: CommandV7) -> Outcome {
        let mut effects = Effects::default();
        let result = match command {
            CommandV7::StoreFlags {
                account,
                mailbox,
                uids,
                op,
                flags,
                unchanged_since,
            } => self
                .store_flags_since(
                    account,
                    mailbox,
                    uids,
                    op,
                    &flags,
                    unchanged_since,
                    &mut effects,
                )
                .map(|(changed, modified)| Response::FlagsModseq { changed, modified }),
        };
        Outcome {
            response: result.unwrap_or_else(Response::Refused),
            effects,
        }
    }

    /// Applies one IMAP command. Pure; a refusal changes nothing.
    pub fn apply_v6(&mut self, command: CommandV6) -> Outcome {
        let result = match command {
            CommandV6::ClaimRecent {
                account,
                mailbox,
                up_to,
            } => self.claim_recent(account, mailbox, up_to),
        };
        Outcome {
            response: result.unwrap_or_else(Response::Refused),
            effects: Effects::default(),
        }
    }

    fn claim_recent(
        &mut self,
        account_id: AccountId,
        mailbox_id: MailboxId,
        up_to: Uid,
    ) -> Result<Response, ApplyError> {
        let account = self
            .accounts
            .get(&account_id)
            .ok_or_else(|| ApplyError::NotFound("account".into()))?;
        let mailbox = account
            .mailboxes
            .get(&mailbox_id)
            .ok_or_else(|| ApplyError::NotFound("mailbox".into()))?;
        // Nobody can own a UID the mailbox has not given out yet.
        let up_to = up_to.min(mailbox.uidnext.saturating_sub(1));
        let previous = self.imap.recent_boundary(account_id, mailbox_id);
        if up_to > previous {
            // Entries of this account's deleted mailboxes go when it next claims something.
            let gone: Vec<(AccountId, MailboxId)> = self
                .imap
                .recent_boundary
                .range((account_id, 0)..=(account_id, MailboxId::MAX))
                .map(|(key, _)| *key)
                .filter(|(_, id)| !account.mailboxes.contains_key(id))
                .collect();
            for key in gone {
                self.imap.recent_boundary.remove(&key);
            }
            self.imap
                .recent_boundary
                .insert((account_id, mailbox_id), up_to);
        }
        Ok(Response::RecentClaimed {
            previous,
            up_to: up_to.max(previous),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::command::CommandV1;

    fn state_with_messages(count: usize) -> (State, AccountId, MailboxId) {
        let mut state = State::default();
        let outcome = state.apply(CommandV1::AddDomain {
            domain: "example.org".into(),
        });
        assert_eq!(outcome.response, Response::Done);
        let outcome = state.apply(CommandV1::AddAccount {
            address: "a@example.org".into(),
            password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
            now: 1,
        });
        let Response::Account(account) = outcome.response else {
            panic!("{:?}", outcome.response);
        };
        let inbox = state.accounts[&account].inbox_id().expect("inbox");
        // Raise uidnext as deliveries would; the claim only looks at it.
        if let Some(mailbox) = state
            .accounts
            .get_mut(&account)
            .and_then(|a| a.mailboxes.get_mut(&inbox))
        {
            mailbox.uidnext = count as Uid + 1;
        }
        (state, account, inbox)
    }

    fn claim(state: &mut State, account: AccountId, mailbox: MailboxId, up_to: Uid) -> Response {
        state
            .apply_v6(CommandV6::ClaimRecent {
                account,
                mailbox,
                up_to,
            })
            .response
    }

    #[test]
    fn the_first_claim_owns_the_uids_and_the_second_gets_none() {
        let (mut state, account, inbox) = state_with_messages(3);
        assert_eq!(
            claim(&mut state, account, inbox, 2),
            Response::RecentClaimed {
                previous: 0,
                up_to: 2
            }
        );
        // The same range again: nothing new (up_to never goes below the boundary).
        assert_eq!(
            claim(&mut state, account, inbox, 2),
            Response::RecentClaimed {
                previous: 2,
                up_to: 2
            }
        );
        // Beyond uidnext is cut to the last UID given out.
        assert_eq!(
            claim(&mut state, account, inbox, 99),
            Response::RecentClaimed {
                previous: 2,
                up_to: 3
            }
        );
        assert_eq!(state.imap.recent_boundary(account, inbox), 3);
        assert!(matches!(
            claim(&mut state, account, 999, 1),
            Response::Refused(ApplyError::NotFound(_))
        ));
        assert!(matches!(
            claim(&mut state, 999, inbox, 1),
            Response::Refused(ApplyError::NotFound(_))
        ));
    }

    fn append(state: &mut State, account: AccountId, mailbox: MailboxId, byte: u8) -> Uid {
        let body = crate::store::command::BodyV1 {
            blob: crate::store::BlobId([byte; 32]),
            raw_size: 10,
            compressed: vec![byte],
        };
        match state
            .apply(CommandV1::Append {
                account,
                mailbox,
                flags: FlagSet::new(),
                internal_date: 1,
                internal_date_offset_min: 0,
                body,
            })
            .response
        {
            Response::Appended { uid, .. } => uid,
            other => panic!("{other:?}"),
        }
    }

    fn modseq_of(state: &State, account: AccountId, mailbox: MailboxId, uid: Uid) -> u64 {
        state.accounts[&account].mailboxes[&mailbox]
            .messages
            .iter()
            .find(|m| m.uid == uid)
            .map(|m| m.modseq)
            .expect("message")
    }

    fn store_since(
        state: &mut State,
        account: AccountId,
        mailbox: MailboxId,
        uids: Vec<UidRange>,
        since: Option<u64>,
    ) -> (Vec<(Uid, FlagSet, u64)>, Vec<Uid>) {
        match state
            .apply_v7(CommandV7::StoreFlags {
                account,
                mailbox,
                uids,
                op: FlagOp::Add,
                flags: [crate::store::Flag::Flagged].into_iter().collect(),
                unchanged_since: since,
            })
            .response
        {
            Response::FlagsModseq { changed, modified } => (changed, modified),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_change_gets_a_greater_modseq_and_expunges_are_remembered() {
        let (mut state, account, inbox) = state_with_messages(0);
        assert_eq!(state.imap.modseq.highest(account, inbox), INITIAL_MODSEQ);
        let first = append(&mut state, account, inbox, 1);
        let second = append(&mut state, account, inbox, 2);
        let m1 = modseq_of(&state, account, inbox, first);
        let m2 = modseq_of(&state, account, inbox, second);
        assert!(INITIAL_MODSEQ < m1 && m1 < m2);
        assert_eq!(state.imap.modseq.highest(account, inbox), m2);

        // UNCHANGEDSINCE below the second message's modseq: only the first changes.
        let (changed, modified) =
            store_since(&mut state, account, inbox, vec![(first, second)], Some(m1));
        assert_eq!(modified, vec![second]);
        assert_eq!(changed.len(), 1);
        let m3 = changed[0].2;
        assert!(m3 > m2);
        assert_eq!(modseq_of(&state, account, inbox, first), m3);
        assert_eq!(modseq_of(&state, account, inbox, second), m2);
        // A STORE that changes nothing keeps the modseqs.
        let (changed, modified) =
            store_since(&mut state, account, inbox, vec![(first, first)], None);
        assert!(modified.is_empty());
        assert_eq!(changed[0].2, m3);
        assert_eq!(state.imap.modseq.highest(account, inbox), m3);
        // UNCHANGEDSINCE 0 fails for every message.
        let (_, modified) = store_since(&mut state, account, inbox, vec![(1, 9)], Some(0));
        assert_eq!(modified, vec![first, second]);

        // The log index carries the modseq forward when it is ahead of the counter.
        state.imap.modseq.clock = 1_000;
        state.apply(CommandV1::StoreFlags {
            account,
            mailbox: inbox,
            uids: vec![(second, second)],
            op: FlagOp::Add,
            flags: [crate::store::Flag::Deleted].into_iter().collect(),
        });
        assert_eq!(modseq_of(&state, account, inbox, second), 1_000);
        state.apply(CommandV1::Expunge {
            account,
            mailbox: inbox,
            uids: None,
        });
        assert_eq!(state.imap.modseq.highest(account, inbox), 1_001);
        assert_eq!(
            state.imap.modseq.vanished_since(account, inbox, 1_000),
            Some(vec![(second, second)])
        );
        assert_eq!(
            state.imap.modseq.vanished_since(account, inbox, 1_001),
            Some(vec![])
        );
    }

    #[test]
    fn vanished_ranges_merge_and_stay_bounded() {
        let mut modseqs = ModseqState::default();
        // Adjacent expunges merge under the later modseq.
        modseqs.expunged(1, 1, 10, [1, 2, 3]);
        modseqs.expunged(1, 1, 11, [4]);
        assert_eq!(modseqs.mailboxes[&(1, 1)].vanished, vec![(11, 1, 4)]);
        assert_eq!(modseqs.vanished_since(1, 1, 10), Some(vec![(1, 4)]));
        // Scattered expunges: bounded, the oldest are forgotten.
        for i in 0..(MAX_VANISHED_RANGES_PER_MAILBOX as u32 + 10) {
            modseqs.expunged(1, 1, 100 + u64::from(i), [10 + 2 * i]);
        }
        let entry = &modseqs.mailboxes[&(1, 1)];
        assert!(entry.vanished.len() <= MAX_VANISHED_RANGES_PER_MAILBOX);
        assert!(entry.forgotten_through > 11);
        assert_eq!(modseqs.vanished_since(1, 1, 10), None);
        let recent = modseqs
            .vanished_since(1, 1, entry.forgotten_through)
            .expect("still known");
        assert_eq!(recent.len(), entry.vanished.len());
        // An untouched mailbox has nothing vanished.
        assert_eq!(modseqs.vanished_since(1, 2, 0), Some(vec![]));
    }

    #[test]
    fn modseqs_survive_a_snapshot_and_old_message_chunks_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = crate::store::blob::BlobStore::open(dir.path().join("blobs")).unwrap();
        let (mut state, account, inbox) = state_with_messages(0);
        state.imap.modseq.clock = 500;
        let first = append(&mut state, account, inbox, 1);
        let second = append(&mut state, account, inbox, 2);
        store_since(&mut state, account, inbox, vec![(first, first)], None);
        state.apply(CommandV1::StoreFlags {
            account,
            mailbox: inbox,
            uids: vec![(second, second)],
            op: FlagOp::Add,
            flags: [crate::store::Flag::Deleted].into_iter().collect(),
        });
        state.apply(CommandV1::Expunge {
            account,
            mailbox: inbox,
            uids: None,
        });
        let chunks =
            crate::store::snapshot_chunks::ChunkStore::open(dir.path().join("chunks")).unwrap();
        let mut bytes = Vec::new();
        crate::store::snapshot::write_snapshot(&state, &chunks, &mut bytes).unwrap();
        let restored =
            crate::store::snapshot::read_snapshot(&mut bytes.as_slice(), &blobs, &chunks, true)
                .unwrap();
        assert_eq!(restored.imap.modseq, state.imap.modseq);
        assert_eq!(
            restored.accounts[&account].mailboxes[&inbox].messages,
            state.accounts[&account].mailboxes[&inbox].messages
        );
        assert_eq!(
            restored.imap.modseq.vanished_since(account, inbox, 501),
            Some(vec![(second, second)])
        );

        // A message chunk encoded before modseqs existed.
        #[derive(Serialize)]
        struct Old {
            uid: Uid,
            blob: crate::store::BlobId,
            size: u32,
            internal_date: i64,
            internal_date_offset_min: i16,
            flags: FlagSet,
        }
        use bincode::Options;
        let old = vec![Old {
            uid: 7,
            blob: crate::store::BlobId([3; 32]),
            size: 5,
            internal_date: -3,
            internal_date_offset_min: 60,
            flags: [crate::store::Flag::Seen].into_iter().collect(),
        }];
        let old_bytes = bincode::DefaultOptions::new().serialize(&old).unwrap();
        assert!(bincode::DefaultOptions::new()
            .with_limit(1 << 20)
            .deserialize::<Vec<MessageMeta>>(&old_bytes)
            .is_err());
        let decoded = decode_legacy_messages(&old_bytes).expect("legacy chunk");
        assert_eq!(decoded[0].uid, 7);
        assert_eq!(decoded[0].modseq, INITIAL_MODSEQ);
        assert!(decoded[0].flags.contains(&crate::store::Flag::Seen));
    }
}
