//! SORT and THREAD keys per message body, computed once and shared by all sessions of a
//! listener, and the `* SORT` / `* THREAD` line built from them.
//!
//! Every key SORT and THREAD read from a header (RFC 5256 base subject, sent date, first
//! From/To/Cc mailbox, RFC 5957 display names, Message-ID and References) is a pure function
//! of the message's bytes. Bodies are immutable and content-addressed, so keys cached by
//! [`BlobId`] never go stale: after any change of a mailbox (new mail, a flag, an expunge)
//! the next SORT or THREAD only looks its keys up and orders them, instead of parsing every
//! header again. Each group of keys is computed the first time an ordering needs it (a SORT
//! by DATE does not pay for address parsing).
//!
//! INTERNALDATE and RFC822.SIZE belong to the message, not to its body (two copies of one
//! body may differ), so they come from the message list at answer time, as does the number
//! the answer names each message by.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, OnceLock};

use super::cache::BlobIdHasher;
use super::fetch::first_field;
use super::sort::{
    base_subject, casemap, header_date, subject_text, text_key, Ordering, SortCriterion, SortKey,
    ThreadAlgorithm,
};
use super::thread::{
    message_ids, ordered_subject, references, write_thread_response, ThreadMessage,
};
use crate::store::{BlobId, MessageList, MessageMeta};

/// What one cached entry costs besides its strings (the entry, its map slot and its `Arc`),
/// an estimate used for the byte bound.
const ENTRY_OVERHEAD_BYTES: usize = std::mem::size_of::<BlobKeys>() + 64;

/// The keys of one message body; each group is filled once, when first needed.
#[derive(Default)]
pub struct BlobKeys {
    /// The base subject, case-mapped, and whether its extraction found a reply or forward.
    subject: OnceLock<(Arc<str>, bool)>,
    /// The Date field as seconds since the epoch (UTC), `None` when absent or unparsable.
    date: OnceLock<Option<i64>>,
    from: OnceLock<Box<str>>,
    to: OnceLock<Box<str>>,
    cc: OnceLock<Box<str>>,
    display_from: OnceLock<Box<str>>,
    display_to: OnceLock<Box<str>>,
    /// Message-ID, and References (or else In-Reply-To's first id).
    thread: OnceLock<ThreadIds>,
}

/// A message's Message-ID and the ids of its References (or else In-Reply-To's first id).
type ThreadIds = (Option<Arc<str>>, Arc<[Arc<str>]>);

/// One group of keys, filled together from a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Subject,
    Date,
    From,
    To,
    Cc,
    DisplayFrom,
    DisplayTo,
    Thread,
}

/// The groups an ordering reads (none for ARRIVAL and SIZE).
pub fn groups(ordering: &Ordering) -> Vec<Group> {
    match ordering {
        Ordering::Sort(criteria) => criteria
            .iter()
            .filter_map(|c| match c.key {
                SortKey::Arrival | SortKey::Size => None,
                SortKey::Subject => Some(Group::Subject),
                SortKey::Date => Some(Group::Date),
                SortKey::From => Some(Group::From),
                SortKey::To => Some(Group::To),
                SortKey::Cc => Some(Group::Cc),
                SortKey::DisplayFrom => Some(Group::DisplayFrom),
                SortKey::DisplayTo => Some(Group::DisplayTo),
            })
            .collect(),
        Ordering::Thread(_) => vec![Group::Subject, Group::Date, Group::Thread],
    }
}

impl BlobKeys {
    fn has(&self, group: Group) -> bool {
        match group {
            Group::Subject => self.subject.get().is_some(),
            Group::Date => self.date.get().is_some(),
            Group::From => self.from.get().is_some(),
            Group::To => self.to.get().is_some(),
            Group::Cc => self.cc.get().is_some(),
            Group::DisplayFrom => self.display_from.get().is_some(),
            Group::DisplayTo => self.display_to.get().is_some(),
            Group::Thread => self.thread.get().is_some(),
        }
    }

    /// Whether every group of `groups` (see [`groups`]) is filled.
    pub fn has_all(&self, groups: &[Group]) -> bool {
        groups.iter().all(|&g| self.has(g))
    }

    /// Fills `groups` from `header` (`None`: the message has no header we could read, every
    /// key is empty); returns the bytes added.
    pub fn fill(&self, groups: &[Group], header: Option<&[u8]>) -> usize {
        let mut added = 0;
        for &group in groups {
            if self.has(group) {
                continue;
            }
            added += match group {
                Group::Subject => {
                    let (base, reply) = base_subject(&subject_text(header));
                    let key: Arc<str> = Arc::from(casemap(&base));
                    let len = key.len();
                    let _ = self.subject.set((key, reply));
                    len
                }
                Group::Date => {
                    let _ = self.date.set(header_date(header));
                    0
                }
                Group::From | Group::To | Group::Cc | Group::DisplayFrom | Group::DisplayTo => {
                    let (key, cell) = match group {
                        Group::From => (SortKey::From, &self.from),
                        Group::To => (SortKey::To, &self.to),
                        Group::Cc => (SortKey::Cc, &self.cc),
                        Group::DisplayFrom => (SortKey::DisplayFrom, &self.display_from),
                        _ => (SortKey::DisplayTo, &self.display_to),
                    };
                    let text = text_key(key, header).into_boxed_str();
                    let len = text.len();
                    let _ = cell.set(text);
                    len
                }
                Group::Thread => {
                    let field_ids = |name: &[u8]| {
                        header
                            .and_then(|h| first_field(h, name))
                            .map(|f| message_ids(f.value))
                            .unwrap_or_default()
                    };
                    let mut refs = field_ids(b"references");
                    if refs.is_empty() {
                        refs = field_ids(b"in-reply-to");
                        refs.truncate(1);
                    }
                    let id: Option<Arc<str>> =
                        field_ids(b"message-id").into_iter().next().map(Arc::from);
                    let len = id.as_ref().map_or(0, |i| i.len())
                        + refs.iter().map(|r| r.len() + 16).sum::<usize>();
                    let refs: Arc<[Arc<str>]> = refs.into_iter().map(Arc::from).collect();
                    let _ = self.thread.set((id, refs));
                    len
                }
            };
        }
        added
    }

    fn text(&self, key: SortKey) -> &str {
        let cell = match key {
            SortKey::Subject => return self.subject.get().map_or("", |(s, _)| s),
            SortKey::From => &self.from,
            SortKey::To => &self.to,
            SortKey::Cc => &self.cc,
            SortKey::DisplayFrom => &self.display_from,
            SortKey::DisplayTo => &self.display_to,
            SortKey::Arrival | SortKey::Size | SortKey::Date => return "",
        };
        cell.get().map_or("", |s| s)
    }

    /// The sent date (RFC 5256 section 2.2): the Date field, or else INTERNALDATE.
    fn sent_date(&self, meta: &MessageMeta) -> i64 {
        self.date
            .get()
            .copied()
            .flatten()
            .unwrap_or(meta.internal_date)
    }

    fn thread_message(&self, number: u32, meta: &MessageMeta) -> ThreadMessage {
        let (base_subject, reply_or_forward) = self
            .subject
            .get()
            .cloned()
            .unwrap_or_else(|| (Arc::from(""), false));
        let (message_id, references) = self
            .thread
            .get()
            .cloned()
            .unwrap_or_else(|| (None, Arc::from(Vec::new())));
        ThreadMessage {
            number,
            message_id,
            references,
            base_subject,
            reply_or_forward,
            sent_date: self.sent_date(meta),
        }
    }
}

/// Keys by message body, bounded in bytes (estimated: strings plus a fixed cost an entry).
pub struct SortKeyCache {
    max_bytes: usize,
    map: Mutex<HashMap<BlobId, Arc<BlobKeys>, BuildHasherDefault<BlobIdHasher>>>,
    /// Bytes held (entries' overhead plus the strings of their filled groups).
    bytes: AtomicUsize,
}

impl SortKeyCache {
    pub fn new(max_bytes: usize) -> SortKeyCache {
        SortKeyCache {
            max_bytes,
            map: Mutex::new(HashMap::default()),
            bytes: AtomicUsize::new(0),
        }
    }

    /// The entries of `blobs`, created empty where missing (not kept when the cache is
    /// disabled). One lock for the whole list.
    pub fn entries(&self, blobs: impl ExactSizeIterator<Item = BlobId>) -> Vec<Arc<BlobKeys>> {
        let mut out = Vec::with_capacity(blobs.len());
        if self.max_bytes == 0 {
            out.extend(blobs.map(|_| Arc::new(BlobKeys::default())));
            return out;
        }
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        for blob in blobs {
            if let Some(keys) = map.get(&blob) {
                out.push(Arc::clone(keys));
                continue;
            }
            let held = self
                .bytes
                .fetch_add(ENTRY_OVERHEAD_BYTES, AtomicOrdering::Relaxed);
            if held + ENTRY_OVERHEAD_BYTES > self.max_bytes {
                // Simplest bounded policy, as the header cache: start over. Entries still in
                // use elsewhere are dropped by their last user.
                map.clear();
                self.bytes
                    .store(ENTRY_OVERHEAD_BYTES, AtomicOrdering::Relaxed);
            }
            let keys = Arc::new(BlobKeys::default());
            map.insert(blob, Arc::clone(&keys));
            out.push(keys);
        }
        out
    }

    /// Counts bytes just added to a cached entry's strings.
    pub fn grew(&self, bytes: usize) {
        self.bytes.fetch_add(bytes, AtomicOrdering::Relaxed);
    }

    #[cfg(test)]
    fn held_bytes(&self) -> usize {
        self.bytes.load(AtomicOrdering::Relaxed)
    }
}

/// Appends `n` in decimal (the answers hold thousands of numbers; `write!` costs several
/// times more per number).
pub fn push_decimal(out: &mut Vec<u8>, n: u32) {
    let mut digits = [0u8; 10];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// The messages at the indexes `found` (ascending) of `messages`, in one walk: indexing the
/// list (a tree) once per message costs more than the whole walk.
pub fn found_metas<'m>(
    messages: &'m MessageList,
    found: &'m [usize],
) -> impl Iterator<Item = &'m MessageMeta> + 'm {
    let mut wanted = found.iter().peekable();
    messages
        .iter()
        .enumerate()
        .take(found.last().map_or(0, |&last| last + 1))
        .filter_map(move |(i, meta)| {
            if wanted.peek() == Some(&&i) {
                wanted.next();
                Some(meta)
            } else {
                None
            }
        })
}

/// One message's value for one sort criterion, borrowed from its keys.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Value<'k> {
    Number(i64),
    Text(&'k str),
}

/// The `* SORT` or `* THREAD` line for the messages `found` (indexes into `messages`, in
/// mailbox order), `keys[k]` being the filled keys of `found[k]`.
pub fn order_response(
    messages: &MessageList,
    found: &[usize],
    keys: &[Arc<BlobKeys>],
    uid: bool,
    ordering: &Ordering,
) -> Vec<u8> {
    let metas: Vec<&MessageMeta> = found_metas(messages, found).collect();
    // The number the answer names found[k] by.
    let number = |k: usize| {
        if uid {
            metas[k].uid
        } else {
            found[k] as u32 + 1
        }
    };
    let mut out = Vec::with_capacity(16 + 7 * found.len());
    match ordering {
        Ordering::Sort(criteria) => {
            out.extend_from_slice(b"* SORT");
            for position in sort_positions(criteria, &metas, keys) {
                out.push(b' ');
                push_decimal(&mut out, number(position));
            }
            out.extend_from_slice(b"\r\n");
        }
        Ordering::Thread(algorithm) => {
            let threaded: Vec<ThreadMessage> = (0..found.len())
                .map(|k| keys[k].thread_message(number(k), metas[k]))
                .collect();
            let forest = match algorithm {
                ThreadAlgorithm::OrderedSubject => ordered_subject(&threaded),
                ThreadAlgorithm::References => references(&threaded),
            };
            write_thread_response(&mut out, &forest, &threaded);
        }
    }
    out
}

/// Positions into `found` in the order of `criteria`; ties keep mailbox order.
fn sort_positions(
    criteria: &[SortCriterion],
    metas: &[&MessageMeta],
    keys: &[Arc<BlobKeys>],
) -> Vec<usize> {
    let stride = criteria.len();
    let mut values: Vec<Value<'_>> = Vec::with_capacity(stride * metas.len());
    for (&meta, keys) in metas.iter().zip(keys) {
        values.extend(criteria.iter().map(|c| match c.key {
            SortKey::Arrival => Value::Number(meta.internal_date),
            SortKey::Size => Value::Number(i64::from(meta.size)),
            SortKey::Date => Value::Number(keys.sent_date(meta)),
            key => Value::Text(keys.text(key)),
        }));
    }
    let mut order: Vec<usize> = (0..metas.len()).collect();
    // Unstable sort with the position as the last key: the same order as a stable sort,
    // without its buffer.
    order.sort_unstable_by(|&a, &b| {
        let (va, vb) = (
            &values[a * stride..][..stride],
            &values[b * stride..][..stride],
        );
        for (k, criterion) in criteria.iter().enumerate() {
            let ordering = va[k].cmp(&vb[k]);
            let ordering = if criterion.reverse {
                ordering.reverse()
            } else {
                ordering
            };
            if ordering != std::cmp::Ordering::Equal {
                return ordering;
            }
        }
        a.cmp(&b)
    });
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::sort::{sort_value, sorted_positions, SortValue};
    use crate::imap::thread::thread_message;

    fn meta(uid: u32, size: u32, internal_date: i64) -> MessageMeta {
        MessageMeta {
            uid,
            blob: BlobId([uid as u8; 32]),
            size,
            internal_date,
            internal_date_offset_min: 0,
            flags: Default::default(),
            modseq: 1,
            saved_at: 0,
        }
    }

    const HEADERS: &[&[u8]] = &[
        b"From: =?utf-8?q?Zo=C3=AB?= <Zoe (c) @example.org>\r\nTo: <Bob@example.org>\r\n\
          Cc: group: dave@example.org;\r\nSubject: Re: [list] =?utf-8?q?=C3=9Cber?= (fwd)\r\n\
          Date: Tue, 2 Jan 2024 10:00:00 +0200\r\nMessage-ID: <a@x>\r\n\r\n",
        b"From: bob@example.org\r\nSubject: hello\r\nMessage-ID: <b@x>\r\n\
          In-Reply-To: <a@x> <z@x>\r\n\r\n",
        b"From: \"Al\" <al@example.org>\r\nTo: zed@example.org\r\nSubject: Fwd: Hello\r\n\
          Date: garbage\r\nReferences: <a@x> <b@x>\r\n\r\n",
        b"Subject: uber\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n",
        b"From: bob@example.org\r\nSubject: hello\r\n\r\n",
    ];

    fn ordering(keys: &[SortKey], reverse: bool) -> Ordering {
        Ordering::Sort(
            keys.iter()
                .map(|&key| SortCriterion { key, reverse })
                .collect(),
        )
    }

    /// The cached keys order exactly as the values computed from the headers each time.
    #[test]
    fn cached_keys_order_as_the_header_values() {
        let mut messages = MessageList::new();
        for (k, _) in HEADERS.iter().enumerate() {
            messages.push(meta(k as u32 + 10, 100 - k as u32 % 2, 50 + k as i64));
        }
        let found: Vec<usize> = (0..HEADERS.len()).collect();
        let cache = SortKeyCache::new(1 << 20);
        let all = [
            SortKey::Arrival,
            SortKey::Cc,
            SortKey::Date,
            SortKey::From,
            SortKey::Size,
            SortKey::Subject,
            SortKey::To,
            SortKey::DisplayFrom,
            SortKey::DisplayTo,
        ];
        let mut criteria_lists: Vec<Vec<SortKey>> = all.iter().map(|&k| vec![k]).collect();
        criteria_lists.push(vec![SortKey::From, SortKey::Size]);
        criteria_lists.push(vec![SortKey::Subject, SortKey::Date]);
        for list in &criteria_lists {
            for reverse in [false, true] {
                let ordering = ordering(list, reverse);
                let Ordering::Sort(criteria) = &ordering else {
                    unreachable!()
                };
                let keys = cache.entries(messages.iter().map(|m| m.blob));
                for (k, entry) in keys.iter().enumerate() {
                    cache.grew(entry.fill(&groups(&ordering), Some(HEADERS[k])));
                    assert!(entry.has_all(&groups(&ordering)));
                }
                let values: Vec<Vec<SortValue>> = (0..HEADERS.len())
                    .map(|k| {
                        criteria
                            .iter()
                            .map(|c| sort_value(c.key, Some(HEADERS[k]), &messages[k]))
                            .collect()
                    })
                    .collect();
                let expected: Vec<u8> = {
                    let mut out = b"* SORT".to_vec();
                    for p in sorted_positions(criteria, &values) {
                        out.extend_from_slice(format!(" {}", messages[p].uid).as_bytes());
                    }
                    out.extend_from_slice(b"\r\n");
                    out
                };
                let got = order_response(&messages, &found, &keys, true, &ordering);
                assert_eq!(
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(&expected),
                    "{list:?} reverse {reverse}"
                );
            }
        }
        for algorithm in [ThreadAlgorithm::References, ThreadAlgorithm::OrderedSubject] {
            let ordering = Ordering::Thread(algorithm);
            let keys = cache.entries(messages.iter().map(|m| m.blob));
            for (k, entry) in keys.iter().enumerate() {
                entry.fill(&groups(&ordering), Some(HEADERS[k]));
            }
            let threaded: Vec<ThreadMessage> = (0..HEADERS.len())
                .map(|k| {
                    let date = crate::imap::sort::sent_date(Some(HEADERS[k]), &messages[k]);
                    thread_message(k as u32 + 1, Some(HEADERS[k]), date)
                })
                .collect();
            let forest = match algorithm {
                ThreadAlgorithm::OrderedSubject => ordered_subject(&threaded),
                ThreadAlgorithm::References => references(&threaded),
            };
            let mut expected = Vec::new();
            write_thread_response(&mut expected, &forest, &threaded);
            let got = order_response(&messages, &found, &keys, false, &ordering);
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&expected)
            );
        }
    }

    #[test]
    fn groups_are_filled_only_when_asked_and_the_cache_stays_bounded() {
        let entry = BlobKeys::default();
        let by_date = groups(&ordering(&[SortKey::Date], false));
        assert!(!entry.has_all(&by_date));
        entry.fill(&by_date, Some(HEADERS[0]));
        assert!(entry.has_all(&by_date));
        assert!(!entry.has_all(&groups(&ordering(&[SortKey::Subject], false))));
        assert!(entry.has_all(&groups(&ordering(
            &[SortKey::Arrival, SortKey::Size],
            false
        ))));

        let cache = SortKeyCache::new(10 * ENTRY_OVERHEAD_BYTES);
        for n in 0..100u8 {
            cache.entries(std::iter::once(BlobId([n; 32])));
            assert!(cache.held_bytes() <= 10 * ENTRY_OVERHEAD_BYTES);
        }
        // The same body is the same entry.
        let a = cache.entries(std::iter::once(BlobId([7; 32])));
        let b = cache.entries(std::iter::once(BlobId([7; 32])));
        assert!(Arc::ptr_eq(&a[0], &b[0]));
        // Disabled: fresh entries every time.
        let off = SortKeyCache::new(0);
        let a = off.entries(std::iter::once(BlobId([7; 32])));
        let b = off.entries(std::iter::once(BlobId([7; 32])));
        assert!(!Arc::ptr_eq(&a[0], &b[0]));
    }

    #[test]
    fn found_metas_walks_the_found_indexes() {
        let mut messages = MessageList::new();
        for uid in 1..=6 {
            messages.push(meta(uid, 1, 1));
        }
        let uids = |found: &[usize]| -> Vec<u32> {
            found_metas(&messages, found).map(|m| m.uid).collect()
        };
        assert_eq!(uids(&[]), Vec::<u32>::new());
        assert_eq!(uids(&[0, 2, 5]), vec![1, 3, 6]);
        assert_eq!(uids(&[0, 1, 2, 3, 4, 5]), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(uids(&[4]), vec![5]);
    }

    #[test]
    fn numbers_are_written_in_decimal() {
        let mut out = Vec::new();
        for n in [0, 7, 10, 4_294_967_295] {
            out.push(b' ');
            push_decimal(&mut out, n);
        }
        assert_eq!(out, b" 0 7 10 4294967295");
    }
}
