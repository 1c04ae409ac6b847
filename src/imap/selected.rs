//! The selected mailbox as this session's client knows it: the message list that gives
//! sequence numbers their meaning, and the reconciliation with the store that reports
//! EXPUNGE, EXISTS and flag changes when RFC 3501 allows it.

use std::io::Write;

use imap_codec::imap_types::sequence::SequenceSet;

use super::response::{flags_line, permanent_flags_line};
use super::seqset::Ranges;
use crate::store::{
    diff_message_lists, AccountId, MailStore, MailboxId, MailboxView, MessageList, MessageListDiff,
    MessageMeta, Uid,
};

/// What [`Selected::release`] keeps.
pub struct Released {
    /// The list as the client knew it (a persistent vector: keeping it costs nothing).
    messages: MessageList,
    change_counter: u64,
}

pub struct Selected {
    pub id: MailboxId,
    /// ACL: the account the mailbox belongs to (the session's own, or another account of its
    /// domain for a shared mailbox): every store call on the selected mailbox names it.
    pub owner: AccountId,
    pub read_only: bool,
    pub uidvalidity: u32,
    /// The messages the client knows, in sequence-number order (sorted by UID). May hold
    /// messages already expunged from the store whose EXPUNGE was not yet reported.
    /// A persistent vector shared with the store: a write to the mailbox copies O(log n) of
    /// it, not the list, and [`Selected::refresh`] skips the parts both still share.
    pub messages: MessageList,
    change_counter: u64,
    /// `messages` holds entries the store no longer has.
    has_ghosts: bool,
    /// How many of the mailbox's keywords the client was told of in FLAGS.
    pub announced_keywords: usize,
    /// CONDSTORE is on: flag updates carry MODSEQ (RFC 7162; set by the session).
    pub condstore: bool,
    /// QRESYNC is on: `VANISHED` instead of EXPUNGE, and UID in flag updates.
    pub qresync: bool,
    /// SEARCHRES (RFC 5182): the saved result `$`.
    pub searchres: super::searchres::SavedResult,
    /// CONTEXT=SEARCH (RFC 5267): the searches whose changes are reported.
    pub contexts: super::context_search::Contexts,
}

impl Selected {
    pub fn open(view: MailboxView, read_only: bool, owner: AccountId) -> Selected {
        Selected {
            id: view.id,
            owner,
            read_only,
            uidvalidity: view.uidvalidity,
            messages: view.messages,
            change_counter: view.change_counter,
            has_ghosts: false,
            announced_keywords: view.keyword_count,
            condstore: false,
            qresync: false,
            searchres: Default::default(),
            contexts: Default::default(),
        }
    }

    /// Sends FLAGS and PERMANENTFLAGS again when the mailbox has gained keywords since the
    /// client was last told (RFC 3501 7.2.6), before any FETCH that shows them.
    fn announce_keywords(
        &mut self,
        store: &MailStore,
        account: AccountId,
        keyword_count: usize,
        out: &mut Vec<u8>,
    ) {
        if keyword_count == self.announced_keywords {
            return;
        }
        let keywords = store.mailbox_keywords(account, self.id);
        flags_line(out, &keywords);
        permanent_flags_line(out, &keywords, self.read_only);
        self.announced_keywords = keywords.len();
    }

    /// Changes whenever `messages` may have: for search contexts to know when to look again.
    pub fn view_stamp(&self) -> (u64, bool, usize) {
        (self.change_counter, self.has_ghosts, self.messages.len())
    }

    pub fn last_uid(&self) -> Uid {
        self.messages.last().map_or(0, |m| m.uid)
    }

    /// Brings the client's view up to date and writes the untagged responses for it.
    /// Without `allow_expunge` (during FETCH, STORE, SEARCH), expunged messages stay in the
    /// list until a later command may report them. Flag changes of `skip_flag_uids` (sorted;
    /// already reported by the running command) are not written.
    pub fn refresh(
        &mut self,
        store: &MailStore,
        account: AccountId,
        allow_expunge: bool,
        skip_flag_uids: &[Uid],
        out: &mut Vec<u8>,
    ) {
        let (new_messages, counter, keyword_count) = match store.mailbox_view(account, self.id) {
            Some(view) => (view.messages, view.change_counter, view.keyword_count),
            // The mailbox was deleted under us: every message is gone.
            None => (
                MessageList::new(),
                self.change_counter.wrapping_add(1),
                self.announced_keywords,
            ),
        };
        if counter == self.change_counter && !self.has_ghosts {
            return;
        }
        self.announce_keywords(store, account, keyword_count, out);
        let old = self.messages.clone();
        let MessageListDiff {
            expunged: expunged_indexes,
            changed: changed_entries,
            appended: n_appended,
        } = diff_message_lists(&old, &new_messages);
        // (sequence number in the old list, index in the new list) of changed flags.
        let changed: Vec<(usize, usize)> = changed_entries
            .iter()
            .filter(|&&(i, j)| {
                new_messages[j].flags != old[i].flags
                    && skip_flag_uids.binary_search(&old[i].uid).is_err()
            })
            .map(|&(i, j)| (i + 1, j))
            .collect();
        let expunged_seqs: Vec<usize> = expunged_indexes.iter().map(|i| i + 1).collect();

        if expunged_seqs.is_empty() || allow_expunge {
            self.write_expunged(out, &expunged_seqs, |seq| old[seq - 1].uid);
            if n_appended > 0 {
                let _ = write!(out, "* {} EXISTS\r\n", new_messages.len());
            }
            for &(_, j) in &changed {
                self.write_flags(out, j + 1, &new_messages[j]);
            }
            self.messages = new_messages;
            self.has_ghosts = false;
        } else {
            // Keep the expunged entries (their sequence numbers must not move yet), take the
            // new flags of the others and append the new messages. Only the changed entries
            // are written: the rest stays shared.
            let mut merged = old.clone();
            for &(i, j) in &changed_entries {
                if let Some(message) = merged.get_mut(i) {
                    *message = new_messages[j].clone();
                }
            }
            merged.extend(
                new_messages
                    .iter()
                    .skip(new_messages.len() - n_appended)
                    .cloned(),
            );
            if n_appended > 0 {
                let _ = write!(out, "* {} EXISTS\r\n", merged.len());
            }
            for &(seq, j) in &changed {
                self.write_flags(out, seq, &new_messages[j]);
            }
            self.messages = merged;
            self.has_ghosts = true;
        }
        self.change_counter = counter;
    }

    /// Before this session appends to the mailbox: remembers the list as the client knows it
    /// (an O(1) clone of the persistent vector; the store's append copies O(log n) of it).
    /// `None` while unreported expunges need the full list.
    pub fn release(&mut self) -> Option<Released> {
        if self.has_ghosts {
            return None;
        }
        Some(Released {
            messages: self.messages.clone(),
            change_counter: self.change_counter,
        })
    }

    /// After the append: takes the store's list again and reports what changed. When more
    /// than the one append happened meanwhile, the flags of every message are reported
    /// (redundant but allowed).
    pub fn reacquire(
        &mut self,
        released: Released,
        store: &MailStore,
        account: AccountId,
        out: &mut Vec<u8>,
    ) {
        let (new_messages, counter, keyword_count) = match store.mailbox_view(account, self.id) {
            Some(view) => (view.messages, view.change_counter, view.keyword_count),
            None => (
                MessageList::new(),
                released.change_counter.wrapping_add(2),
                self.announced_keywords,
            ),
        };
        self.announce_keywords(store, account, keyword_count, out);
        let only_the_append = counter == released.change_counter.wrapping_add(1);
        let diff = diff_message_lists(&released.messages, &new_messages);
        let expunged_seqs: Vec<usize> = diff.expunged.iter().map(|i| i + 1).collect();
        self.write_expunged(out, &expunged_seqs, |seq| released.messages[seq - 1].uid);
        if diff.appended > 0 {
            let _ = write!(out, "* {} EXISTS\r\n", new_messages.len());
        }
        if !only_the_append {
            // Every message the client knew and the store still has, in order: O(n), but
            // only when something else changed the mailbox during the append.
            let mut j = 0;
            for message in &released.messages {
                while j < new_messages.len() && new_messages[j].uid < message.uid {
                    j += 1;
                }
                if j < new_messages.len() && new_messages[j].uid == message.uid {
                    self.write_flags(out, j + 1, &new_messages[j]);
                    j += 1;
                }
            }
        }
        self.messages = new_messages;
        self.change_counter = counter;
        self.has_ghosts = false;
    }

    /// EXPUNGE for each of `seqs` (ascending; written from the last), or one `VANISHED` of
    /// their UIDs under QRESYNC (RFC 7162 3.2.10).
    fn write_expunged(&self, out: &mut Vec<u8>, seqs: &[usize], uid_of: impl Fn(usize) -> Uid) {
        if self.qresync {
            let uids: Vec<Uid> = seqs.iter().map(|&seq| uid_of(seq)).collect();
            super::condstore::write_vanished(out, false, &uid_ranges(&uids));
        } else {
            for seq in seqs.iter().rev() {
                let _ = write!(out, "* {seq} EXPUNGE\r\n");
            }
        }
    }

    /// An unsolicited flag update (with UID and MODSEQ as CONDSTORE/QRESYNC want).
    fn write_flags(&self, out: &mut Vec<u8>, seq: usize, message: &MessageMeta) {
        super::condstore::write_flags_update(
            out,
            seq,
            self.qresync.then_some(message.uid),
            &message.flags,
            false,
            self.condstore.then_some(message.modseq),
        );
    }

    /// Indexes into `messages` of a sequence set (message numbers, or UIDs with `uid`),
    /// ascending and without duplicates. The set is merged into ranges first, so the result
    /// never holds more than the mailbox has, however often the set repeats itself.
    pub fn resolve(&self, set: &SequenceSet, uid: bool) -> Result<Vec<usize>, &'static str> {
        let messages = &self.messages;
        if self.searchres.in_use {
            // The set was `$` (RFC 5182).
            return Ok(self.searchres.indexes_in(messages));
        }
        if messages.is_empty() {
            // `1:*` on an empty mailbox names nothing; clients send it routinely.
            return Ok(Vec::new());
        }
        let largest = if uid {
            self.last_uid()
        } else {
            messages.len() as u32
        };
        let ranges = Ranges::of(set, largest);
        let mut indexes: Vec<usize> = Vec::new();
        if uid {
            for &(low, high) in &ranges.0 {
                let start = messages.partition_point(|m| m.uid < low);
                let end = messages.partition_point(|m| m.uid <= high);
                indexes.extend(start..end);
            }
        } else {
            match ranges.bounds() {
                Some((low, high)) if low == 0 || high as usize > messages.len() => {
                    return Err("invalid message sequence number");
                }
                _ => {}
            }
            for &(low, high) in &ranges.0 {
                indexes.extend(low as usize - 1..high as usize);
            }
        }
        Ok(indexes)
    }
}

#[cfg(test)]
#[path = "selected_cost_tests.rs"]
mod cost_tests;
/// Ascending UIDs as inclusive ranges.
fn uid_ranges(uids: &[Uid]) -> Vec<(Uid, Uid)> {
    let mut ranges: Vec<(Uid, Uid)> = Vec::new();
    for &uid in uids {
        match ranges.last_mut() {
            Some((_, last)) if last.checked_add(1) == Some(uid) => *last = uid,
            _ => ranges.push((uid, uid)),
        }
    }
    ranges
}
