//! PLACEHOLDER for the imapmsg branch (SEARCH keys). Only the contract's signatures with crude
//! bodies, so the imap branch builds until that branch is merged.

use imap_codec::imap_types::search::SearchKey;

pub struct SearchInput<'a> {
    pub seq: u32,
    pub meta: &'a crate::store::MessageMeta,
    pub raw: Option<&'a [u8]>,
    pub last_seq: u32,
    pub last_uid: u32,
}

pub fn needs_body(key: &SearchKey<'_>) -> bool {
    match key {
        SearchKey::And(keys) => keys.as_ref().iter().any(needs_body),
        SearchKey::Or(a, b) => needs_body(a) || needs_body(b),
        SearchKey::Not(a) => needs_body(a),
        SearchKey::Subject(_) | SearchKey::From(_) | SearchKey::Body(_) | SearchKey::Text(_) => {
            true
        }
        _ => false,
    }
}

pub fn matches(key: &SearchKey<'_>, input: &SearchInput<'_>) -> bool {
    use crate::store::Flag;
    let contains = |needle: &[u8]| {
        let hay = input.raw.unwrap_or_default().to_ascii_lowercase();
        let needle = needle.to_ascii_lowercase();
        needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle.as_slice())
    };
    match key {
        SearchKey::And(keys) => keys.as_ref().iter().all(|k| matches(k, input)),
        SearchKey::Or(a, b) => matches(a, input) || matches(b, input),
        SearchKey::Not(a) => !matches(a, input),
        SearchKey::All => true,
        SearchKey::Seen => input.meta.flags.contains(&Flag::Seen),
        SearchKey::Unseen => !input.meta.flags.contains(&Flag::Seen),
        SearchKey::Deleted => input.meta.flags.contains(&Flag::Deleted),
        SearchKey::Flagged => input.meta.flags.contains(&Flag::Flagged),
        SearchKey::Subject(s) | SearchKey::From(s) | SearchKey::Body(s) | SearchKey::Text(s) => {
            contains(s.as_ref())
        }
        _ => false,
    }
}
