//! Sequence sets as normalised ranges: sorted, disjoint, non-adjacent, inclusive `(low, high)`.
//!
//! A client may repeat `1:*` thousands of times in one 64 KiB line; the set is merged before
//! anything is expanded, so what a command touches is bounded by the mailbox, not by the
//! product of the set's length and the mailbox's size.

use imap_codec::imap_types::sequence::{SeqOrUid, Sequence, SequenceSet};

/// Normalised inclusive ranges (ascending, disjoint, not touching).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ranges(pub Vec<(u32, u32)>);

impl Ranges {
    /// The ranges of `set`, `*` standing for `largest` (the last sequence number or UID).
    pub fn of(set: &SequenceSet, largest: u32) -> Ranges {
        let value = |v: &SeqOrUid| match v {
            SeqOrUid::Value(n) => n.get(),
            SeqOrUid::Asterisk => largest,
        };
        let pairs = set.0.as_ref().iter().map(|sequence| {
            let (a, b) = match sequence {
                Sequence::Single(v) => (value(v), value(v)),
                Sequence::Range(a, b) => (value(a), value(b)),
            };
            (a.min(b), a.max(b))
        });
        Ranges::from_pairs(pairs)
    }

    /// Sorts and merges inclusive pairs (each `low <= high`).
    pub fn from_pairs(pairs: impl IntoIterator<Item = (u32, u32)>) -> Ranges {
        let mut pairs: Vec<(u32, u32)> = pairs.into_iter().collect();
        pairs.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(pairs.len().min(64));
        for (low, high) in pairs {
            match merged.last_mut() {
                Some(last) if u64::from(low) <= u64::from(last.1) + 1 => {
                    last.1 = last.1.max(high);
                }
                _ => merged.push((low, high)),
            }
        }
        Ranges(merged)
    }

    /// The smallest and largest values named, if any.
    pub fn bounds(&self) -> Option<(u32, u32)> {
        Some((self.0.first()?.0, self.0.last()?.1))
    }

    /// How many values the ranges name.
    pub fn count(&self) -> u64 {
        self.0
            .iter()
            .map(|&(low, high)| u64::from(high - low) + 1)
            .sum()
    }
}

/// Parses the text of a sequence set (as UID EXPUNGE carries it) and normalises it.
pub fn parse(text: &[u8], largest: u32) -> Option<Ranges> {
    let set = std::str::from_utf8(text)
        .ok()?
        .parse::<SequenceSet>()
        .ok()?;
    Some(Ranges::of(&set, largest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn repeated_ranges_merge() {
        let text = vec!["1:*"; 16000].join(",");
        assert_eq!(
            parse(text.as_bytes(), 100_000),
            Some(Ranges(vec![(1, 100_000)]))
        );
        assert_eq!(
            parse(b"5,3:4,9,7:6,20:*", 12).map(|r| r.0),
            Some(vec![(3, 7), (9, 9), (12, 20)])
        );
        assert_eq!(parse(b"0", 5), None);
        assert_eq!(parse(b"", 5), None);
    }

    proptest! {
        #[test]
        fn ranges_name_what_the_expansion_names(
            pairs in proptest::collection::vec((1u32..60, 1u32..60, any::<bool>(), any::<bool>()), 1..20),
            largest in 1u32..60,
        ) {
            let text: Vec<String> = pairs.iter().map(|&(a, b, star, single)| {
                let a = a.to_string();
                let b = if star { "*".to_owned() } else { b.to_string() };
                if single { b } else { format!("{a}:{b}") }
            }).collect();
            let ranges = parse(text.join(",").as_bytes(), largest).expect("valid set");
            let mut expanded: Vec<u32> = Vec::new();
            for &(a, b, star, single) in &pairs {
                let b = if star { largest } else { b };
                let (low, high) = if single { (b, b) } else { (a.min(b), a.max(b)) };
                expanded.extend(low..=high);
            }
            expanded.sort_unstable();
            expanded.dedup();
            let flat: Vec<u32> = ranges.0.iter().flat_map(|&(l, h)| l..=h).collect();
            prop_assert_eq!(&flat, &expanded);
            prop_assert_eq!(ranges.count(), expanded.len() as u64);
            for w in ranges.0.windows(2) {
                prop_assert!(u64::from(w[0].1) + 1 < u64::from(w[1].0));
            }
        }
    }
}
