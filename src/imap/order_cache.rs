//! Recent SORT and THREAD answers, per mailbox view, shared by all sessions of a listener:
//! a repeated SORT over an unchanged mailbox (what webmail clients send at every page view)
//! writes the remembered answer instead of searching, reading headers and ordering again.
//!
//! An answer is keyed by the account, the mailbox, the ordering, the search program (both
//! by their debug text), UID or sequence numbers, and a fingerprint of the session's view
//! of the mailbox: its message count, last UID, highest modseq and a hash of every
//! (UID, modseq) pair. Any APPEND, flag change or EXPUNGE changes that view, so a stale
//! answer is never found; sequence numbers are those of an identical view, hence right.
//! Search programs that depend on the session (RECENT, NEW, OLD) or on the clock
//! (OLDER, YOUNGER) are never cached.

use std::collections::VecDeque;
use std::sync::Mutex;

use imap_codec::imap_types::search::SearchKey;

use super::search::within_key;
use super::sort::Ordering;
use crate::store::{AccountId, MailboxId, MessageList};

/// Answers remembered (the oldest is forgotten first).
const MAX_ENTRIES: usize = 16;
/// Largest answer remembered, in bytes (about 7 bytes a message).
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// What identifies one answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderKey {
    account: AccountId,
    mailbox: MailboxId,
    view: [u64; 4],
    uid: bool,
    request: String,
}

impl OrderKey {
    /// The key of an answer, or `None` when the search program must not be cached.
    pub fn new(
        account: AccountId,
        mailbox: MailboxId,
        messages: &MessageList,
        criteria: &SearchKey<'_>,
        ordering: &Ordering,
        uid: bool,
    ) -> Option<OrderKey> {
        if !cacheable(criteria) {
            return None;
        }
        Some(OrderKey {
            account,
            mailbox,
            view: fingerprint(messages),
            uid,
            request: format!("{ordering:?} {criteria:?}"),
        })
    }
}

/// A remembered answer: the `* SORT` / `* THREAD` line and the highest modseq of the
/// matching messages (for CONDSTORE's MODSEQ note).
#[derive(Clone)]
pub struct OrderAnswer {
    pub response: std::sync::Arc<[u8]>,
    pub highest_match: u64,
}

#[derive(Default)]
pub struct OrderCache {
    entries: Mutex<VecDeque<(OrderKey, OrderAnswer)>>,
}

impl OrderCache {
    pub fn get(&self, key: &OrderKey) -> Option<OrderAnswer> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, answer)| answer.clone())
    }

    pub fn insert(&self, key: OrderKey, answer: OrderAnswer) {
        if answer.response.len() > MAX_ANSWER_BYTES {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        // Answers about older views of the same mailbox can never be found again.
        entries.retain(|(k, _)| {
            !(k.account == key.account && k.mailbox == key.mailbox && k.view != key.view)
                && *k != key
        });
        if entries.len() >= MAX_ENTRIES {
            entries.pop_front();
        }
        entries.push_back((key, answer));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }
}

/// Whether the matches of `key` depend on nothing but the view of the mailbox.
fn cacheable(key: &SearchKey<'_>) -> bool {
    match key {
        SearchKey::And(keys) => keys.as_ref().iter().all(cacheable),
        SearchKey::Or(a, b) => cacheable(a) && cacheable(b),
        SearchKey::Not(a) => cacheable(a),
        SearchKey::Recent | SearchKey::New | SearchKey::Old => false,
        SearchKey::Header(name, value) => within_key(name, value).is_none(),
        _ => true,
    }
}

/// Count, last UID, highest modseq and a hash of the (UID, modseq) pairs of a view.
fn fingerprint(messages: &MessageList) -> [u64; 4] {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut highest = 0;
    let mut last = 0;
    for m in messages.iter() {
        let pair = (u64::from(m.uid) << 40) ^ m.modseq;
        hash = (hash ^ pair)
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(29);
        highest = highest.max(m.modseq);
        last = m.uid;
    }
    [messages.len() as u64, u64::from(last), highest, hash]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MessageMeta;
    use imap_codec::imap_types::search::SearchKey;
    use std::sync::Arc;

    fn view(pairs: &[(u32, u64)]) -> MessageList {
        let mut list = MessageList::new();
        for &(uid, modseq) in pairs {
            list.push(MessageMeta {
                uid,
                blob: crate::store::BlobId([0; 32]),
                size: 1,
                internal_date: 0,
                internal_date_offset_min: 0,
                flags: Default::default(),
                modseq,
                saved_at: 0,
            });
        }
        list
    }

    fn key(messages: &MessageList, criteria: &SearchKey<'_>) -> Option<OrderKey> {
        let ordering = Ordering::Thread(super::super::sort::ThreadAlgorithm::References);
        OrderKey::new(1, 2, messages, criteria, &ordering, true)
    }

    fn answer(text: &str) -> OrderAnswer {
        OrderAnswer {
            response: Arc::from(text.as_bytes()),
            highest_match: 0,
        }
    }

    #[test]
    fn any_change_of_the_view_misses_and_old_views_are_dropped() {
        let cache = OrderCache::default();
        let before = view(&[(1, 5), (2, 6), (3, 7)]);
        let k = key(&before, &SearchKey::All).unwrap();
        assert!(cache.get(&k).is_none());
        cache.insert(k.clone(), answer("one"));
        assert_eq!(&*cache.get(&k).unwrap().response, b"one");
        // STORE (a modseq changes), APPEND, EXPUNGE (of a middle or the last message).
        for changed in [
            view(&[(1, 5), (2, 8), (3, 7)]),
            view(&[(1, 5), (2, 6), (3, 7), (4, 8)]),
            view(&[(1, 5), (3, 7)]),
            view(&[(1, 5), (2, 6)]),
        ] {
            assert!(cache
                .get(&key(&changed, &SearchKey::All).unwrap())
                .is_none());
        }
        let after = key(&view(&[(1, 5), (3, 7)]), &SearchKey::All).unwrap();
        cache.insert(after.clone(), answer("two"));
        assert_eq!(cache.len(), 1);
        assert!(cache.get(&k).is_none());
        assert_eq!(&*cache.get(&after).unwrap().response, b"two");
    }

    #[test]
    fn session_or_clock_dependent_searches_are_not_cached() {
        let messages = view(&[(1, 1)]);
        assert!(key(&messages, &SearchKey::Recent).is_none());
        assert!(key(&messages, &SearchKey::Not(Box::new(SearchKey::New))).is_none());
        assert!(key(&messages, &SearchKey::Seen).is_some());
    }
}
