//! A mailbox's message list as a persistent vector (an RRB tree of 64-entry chunks,
//! [`imbl::Vector`]): a clone is O(1) and shares every chunk, a write copies only the chunks
//! on its path (O(log n)). The store hands clones to readers (SELECT, FETCH, SEARCH); a
//! delivery or STORE while a session has the mailbox selected no longer copies the whole
//! list under the state lock, and [`diff`] finds what changed between two versions by
//! skipping the chunks they still share.

use std::ops::Index;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use imbl::shared_ptr::DefaultSharedPtr;

use super::{MessageMeta, Uid};

/// An iterator over a [`MessageList`].
pub type Iter<'a> = imbl::vector::Iter<'a, MessageMeta, DefaultSharedPtr>;

/// A mailbox's messages, sorted by UID (strictly increasing).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct MessageList(imbl::Vector<MessageMeta>);

impl MessageList {
    pub fn new() -> MessageList {
        MessageList::default()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> Iter<'_> {
        self.0.iter()
    }

    pub fn get(&self, index: usize) -> Option<&MessageMeta> {
        self.0.get(index)
    }

    pub fn last(&self) -> Option<&MessageMeta> {
        self.0.last()
    }

    /// Appends a message (its UID must be greater than every other): O(log n).
    pub fn push(&mut self, message: MessageMeta) {
        self.0.push_back(message);
    }

    /// The entry at `index`, to change in place: copies only the chunks on its path.
    pub fn get_mut(&mut self, index: usize) -> Option<&mut MessageMeta> {
        self.0.get_mut(index)
    }

    /// The index of the first entry for which `pred` is false (`pred` must be true for a
    /// prefix and false after it), like [`slice::partition_point`]: O(log n).
    pub fn partition_point(&self, mut pred: impl FnMut(&MessageMeta) -> bool) -> usize {
        match self.0.binary_search_by(|m| {
            if pred(m) {
                std::cmp::Ordering::Less
            } else {
                std::cmp::Ordering::Greater
            }
        }) {
            Ok(index) | Err(index) => index,
        }
    }

    /// Like [`slice::binary_search_by_key`].
    pub fn binary_search_by_key<K: Ord>(
        &self,
        key: &K,
        f: impl FnMut(&MessageMeta) -> K,
    ) -> Result<usize, usize> {
        self.0.binary_search_by_key(key, f)
    }

    /// Index of the message with `uid`.
    pub fn position_of(&self, uid: Uid) -> Option<usize> {
        self.0.binary_search_by_key(&uid, |m| m.uid).ok()
    }

    /// Keeps the messages for which `keep` is true. A few removals out of many cost
    /// O(removed · log n), not a copy of the list.
    pub fn retain(&mut self, mut keep: impl FnMut(&MessageMeta) -> bool) {
        let doomed: Vec<usize> = self
            .0
            .iter()
            .enumerate()
            .filter(|(_, m)| !keep(m))
            .map(|(index, _)| index)
            .collect();
        if doomed.is_empty() {
            return;
        }
        if doomed.len().saturating_mul(16) < self.0.len() {
            for &index in doomed.iter().rev() {
                self.0.remove(index);
            }
        } else {
            let mut doomed = doomed.into_iter().peekable();
            self.0 = std::mem::take(&mut self.0)
                .into_iter()
                .enumerate()
                .filter(|(index, _)| {
                    if doomed.peek() == Some(index) {
                        doomed.next();
                        false
                    } else {
                        true
                    }
                })
                .map(|(_, m)| m)
                .collect();
        }
    }

    /// A plain copy of the entries `range` (for encoding them).
    pub fn to_vec_range(&self, range: std::ops::Range<usize>) -> Vec<MessageMeta> {
        self.0
            .iter()
            .skip(range.start)
            .take(range.len())
            .cloned()
            .collect()
    }

    pub fn to_vec(&self) -> Vec<MessageMeta> {
        self.0.iter().cloned().collect()
    }

    /// The leaf chunks, in order: slices a clone shares with its original until one of them
    /// writes to it.
    fn leaves(&self) -> imbl::vector::Chunks<'_, MessageMeta, DefaultSharedPtr> {
        self.0.leaves()
    }
}

impl Index<usize> for MessageList {
    type Output = MessageMeta;

    fn index(&self, index: usize) -> &MessageMeta {
        &self.0[index]
    }
}

impl std::fmt::Debug for MessageList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.iter()).finish()
    }
}

impl From<Vec<MessageMeta>> for MessageList {
    fn from(messages: Vec<MessageMeta>) -> MessageList {
        MessageList(messages.into_iter().collect())
    }
}

impl FromIterator<MessageMeta> for MessageList {
    fn from_iter<I: IntoIterator<Item = MessageMeta>>(iter: I) -> MessageList {
        MessageList(iter.into_iter().collect())
    }
}

impl Extend<MessageMeta> for MessageList {
    fn extend<I: IntoIterator<Item = MessageMeta>>(&mut self, iter: I) {
        self.0.extend(iter);
    }
}

impl<'a> IntoIterator for &'a MessageList {
    type Item = &'a MessageMeta;
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Encoded exactly as a `Vec<MessageMeta>` (a length, then the entries), as before.
impl Serialize for MessageList {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter())
    }
}

impl<'de> Deserialize<'de> for MessageList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<MessageList, D::Error> {
        Vec::<MessageMeta>::deserialize(deserializer).map(MessageList::from)
    }
}

/// What changed from `old` to `new` (two versions of one mailbox's list).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Indexes into `old` of the messages `new` no longer has, ascending.
    pub expunged: Vec<usize>,
    /// (index into `old`, index into `new`) of the messages kept whose entries changed
    /// (their flags, or anything else), ascending.
    pub changed: Vec<(usize, usize)>,
    /// How many messages at the end of `new` come after the last of `old`.
    pub appended: usize,
}

/// Compares two versions of a message list. Chunks both still share are skipped without
/// looking at their entries, so the cost is O(chunks + entries of the chunks that differ):
/// after one STORE or delivery, one or two chunks of 64 entries.
pub fn diff(old: &MessageList, new: &MessageList) -> Diff {
    let mut result = Diff::default();
    let mut new_leaves = new.leaves();
    // The new list's current leaf: (index of its first entry, entries).
    let mut new_leaf: Option<(usize, &[MessageMeta])> = new_leaves.next().map(|leaf| (0, leaf));
    let mut new_focus = new.0.focus();
    let mut i = 0;
    let mut j = 0;
    for old_leaf in old.leaves() {
        while let Some((start, leaf)) = new_leaf {
            if start + leaf.len() > j {
                break;
            }
            new_leaf = new_leaves.next().map(|next| (start + leaf.len(), next));
        }
        if let Some((start, leaf)) = new_leaf {
            // Both lists are alive, so equal addresses mean the same chunk: same entries.
            if start == j && leaf.len() == old_leaf.len() && std::ptr::eq(leaf, old_leaf) {
                i += old_leaf.len();
                j += old_leaf.len();
                continue;
            }
        }
        for message in old_leaf {
            while j < new.len() && new_focus.index(j).uid < message.uid {
                j += 1;
            }
            if j < new.len() && new_focus.index(j).uid == message.uid {
                if new_focus.index(j) != message {
                    result.changed.push((i, j));
                }
                j += 1;
            } else {
                result.expunged.push(i);
            }
            i += 1;
        }
    }
    let old_last_uid = old.last().map_or(0, |m| m.uid);
    result.appended = new
        .iter()
        .rev()
        .take_while(|m| m.uid > old_last_uid)
        .count();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Flag, FlagSet};
    use proptest::prelude::*;

    fn message(uid: Uid, seen: bool) -> MessageMeta {
        let mut flags = FlagSet::new();
        if seen {
            flags.insert(Flag::Seen);
        }
        MessageMeta {
            uid,
            blob: crate::store::BlobId([0; 32]),
            size: uid,
            internal_date: 0,
            internal_date_offset_min: 0,
            flags,
            modseq: 1,
            saved_at: 0,
        }
    }

    /// The plain O(n) merge the selected view used to do.
    fn naive_diff(old: &[MessageMeta], new: &[MessageMeta]) -> Diff {
        let mut result = Diff::default();
        let mut j = 0;
        for (i, message) in old.iter().enumerate() {
            while j < new.len() && new[j].uid < message.uid {
                j += 1;
            }
            if j < new.len() && new[j].uid == message.uid {
                if new[j] != *message {
                    result.changed.push((i, j));
                }
                j += 1;
            } else {
                result.expunged.push(i);
            }
        }
        let old_last_uid = old.last().map_or(0, |m| m.uid);
        result.appended = new
            .iter()
            .rev()
            .take_while(|m| m.uid > old_last_uid)
            .count();
        result
    }

    #[test]
    fn encoded_like_a_vec() {
        let messages: Vec<MessageMeta> = (1..=100).map(|uid| message(uid, uid % 3 == 0)).collect();
        let list = MessageList::from(messages.clone());
        assert_eq!(
            bincode::serialize(&list).unwrap(),
            bincode::serialize(&messages).unwrap()
        );
        let back: MessageList =
            bincode::deserialize(&bincode::serialize(&messages).unwrap()).unwrap();
        assert_eq!(back, list);
    }

    #[test]
    fn retain_and_partition_point_behave_like_a_vec() {
        let mut list: MessageList = (1..=1000).map(|uid| message(uid, false)).collect();
        list.retain(|m| m.uid != 500 && m.uid != 7);
        assert_eq!(list.len(), 998);
        assert_eq!(list.position_of(500), None);
        assert_eq!(list.partition_point(|m| m.uid < 500), 498);
        list.retain(|m| m.uid % 2 == 0);
        assert_eq!(list.len(), 499);
        assert!(list.iter().all(|m| m.uid % 2 == 0 && m.uid != 500));
    }

    /// A write to a shared list leaves most chunks shared: the diff after one flag change
    /// on a 100,000-message list looks at far fewer entries than the list holds (the
    /// untouched chunks compare by address), and finds exactly that change.
    #[test]
    fn one_change_in_a_large_list_is_found_through_shared_chunks() {
        let old: MessageList = (1..=100_000).map(|uid| message(uid, false)).collect();
        let mut new = old.clone();
        new.get_mut(54_321).unwrap().flags.insert(Flag::Seen);
        new.push(message(100_001, false));
        let shared = old
            .leaves()
            .zip(new.leaves())
            .filter(|(a, b)| std::ptr::eq(*a, *b))
            .count();
        let leaves = old.leaves().count();
        assert!(shared + 3 >= leaves, "{shared} of {leaves} chunks shared");
        let found = diff(&old, &new);
        assert_eq!(
            found,
            Diff {
                expunged: vec![],
                changed: vec![(54_321, 54_321)],
                appended: 1,
            }
        );
    }

    proptest! {
        #[test]
        fn diff_finds_what_the_plain_merge_finds(
            size in 0usize..400,
            edits in proptest::collection::vec((0u8..3, any::<prop::sample::Index>()), 0..20),
            appended in 0u32..100,
        ) {
            let old: MessageList = (1..=size as u32).map(|uid| message(uid * 2, false)).collect();
            let mut new = old.clone();
            for (kind, at) in edits {
                if new.is_empty() {
                    break;
                }
                let index = at.index(new.len());
                match kind {
                    0 => { new.get_mut(index).unwrap().flags.insert(Flag::Seen); }
                    1 => { let uid = new[index].uid; new.retain(|m| m.uid != uid); }
                    _ => { new.get_mut(index).unwrap().size += 1; }
                }
            }
            let next = new.last().map_or(1, |m| m.uid + 1).max(size as u32 * 2 + 1);
            for uid in next..next + appended {
                new.push(message(uid, uid % 2 == 0));
            }
            prop_assert_eq!(diff(&old, &new), naive_diff(&old.to_vec(), &new.to_vec()));
        }
    }
}
