//! SEARCHRES (RFC 5182): `SEARCH RETURN (SAVE ...)` keeps its matches, and `$` names them in
//! later commands of the same selected mailbox.
//!
//! The saved result is a list of UIDs in the selected mailbox ([`SavedResult`] in
//! `Selected`), so it ends with the selection (SELECT, EXAMINE, CLOSE, UNSELECT), loses
//! expunged messages by itself (they leave the list the UIDs are looked up in) and never
//! gains new ones. imap-codec 1.0 knows no `$`, so before it decodes a command:
//! - a `$` standing for the sequence set of a UID command (UID FETCH, STORE, COPY, MOVE,
//!   EXPUNGE) becomes the saved UIDs, so that whatever reads the set (QRESYNC's VANISHED
//!   too) sees them; that of FETCH, STORE, COPY, MOVE, or of a UID command when nothing is
//!   saved, becomes `1` and [`SavedResult::in_use`] makes `Selected::resolve` answer the
//!   saved messages instead (an empty result names no message, which no set text can say);
//! - a `$` among SEARCH (SORT, THREAD) keys becomes `UID <saved set>`, or `NOT ALL` when
//!   nothing is saved.

use super::esearch::{partial_slice, ReturnOptions};
use super::response::uid_set;
use super::session::{Session, State};
use crate::store::{MessageList, Uid};

/// The result of the last `SEARCH RETURN (SAVE)` in the selected mailbox.
#[derive(Debug, Default)]
pub struct SavedResult {
    /// Ascending UIDs.
    uids: Vec<Uid>,
    /// The running command's sequence set was `$`.
    pub in_use: bool,
}

impl SavedResult {
    /// Keeps `uids` (ascending) as the new `$`.
    pub fn save(&mut self, uids: Vec<Uid>) {
        debug_assert!(uids.windows(2).all(|w| w[0] < w[1]));
        self.uids = uids;
    }

    /// A failed SEARCH with SAVE leaves `$` empty (RFC 5182 2.1).
    pub fn clear(&mut self) {
        self.uids.clear();
    }

    /// Indexes into `messages` (sorted by UID) of the saved messages still there, ascending.
    pub fn indexes_in(&self, messages: &MessageList) -> Vec<usize> {
        self.uids
            .iter()
            .filter_map(|uid| messages.binary_search_by_key(uid, |m| m.uid).ok())
            .collect()
    }

    /// The search keys `$` stands for.
    fn as_search_key(&self) -> Vec<u8> {
        if self.uids.is_empty() {
            return b"NOT ALL".to_vec();
        }
        let mut key = b"UID ".to_vec();
        uid_set(&mut key, &self.uids);
        key
    }
}

/// What a SEARCH with these options saves (`uids`: its matches, ascending): MIN and MAX
/// without ALL or COUNT save only those (RFC 5182 2.1), PARTIAL only its part.
pub fn saved_selection(options: &ReturnOptions, uids: &[Uid]) -> Vec<Uid> {
    if options.all || options.count || !(options.min || options.max || options.partial.is_some()) {
        return uids.to_vec();
    }
    let mut kept: Vec<Uid> = Vec::new();
    if options.min {
        kept.extend(uids.first());
    }
    if options.max {
        kept.extend(uids.last());
    }
    if let Some(range) = options.partial {
        kept.extend_from_slice(partial_slice(uids, range));
    }
    kept.sort_unstable();
    kept.dedup();
    kept
}

/// Offsets of the words of `tag [UID] VERB rest`: (start of VERB, end of VERB).
fn verb_span(bytes: &[u8]) -> Option<(usize, usize)> {
    let word_end = |from: usize| -> Option<usize> {
        bytes[from..]
            .iter()
            .position(|&b| b == b' ')
            .map(|len| from + len)
    };
    let tag_end = word_end(0)?;
    let mut start = tag_end + 1;
    let mut end = word_end(start)?;
    if bytes[start..end].eq_ignore_ascii_case(b"UID") {
        start = end + 1;
        end = word_end(start)?;
    }
    Some((start, end))
}

/// For `tag [UID] VERB $ ...` with a verb taking a sequence set first: the command with
/// `set_text(uid command)` in place of `$`. `None` otherwise.
pub fn dollar_set(bytes: &[u8], set_text: impl FnOnce(bool) -> Vec<u8>) -> Option<Vec<u8>> {
    let (start, end) = verb_span(bytes)?;
    let verb = bytes[start..end].to_ascii_uppercase();
    let uid = start > 0 && bytes[..start].to_ascii_uppercase().ends_with(b" UID ");
    let takes_set = matches!(verb.as_slice(), b"FETCH" | b"STORE" | b"COPY" | b"MOVE")
        || (uid && verb == b"EXPUNGE");
    if !takes_set {
        return None;
    }
    let set = end + 1;
    if bytes.get(set) != Some(&b'$') || !matches!(bytes.get(set + 1), Some(b' ' | b'\r' | b'\n')) {
        return None;
    }
    let mut rewritten = bytes[..set].to_vec();
    rewritten.extend_from_slice(&set_text(uid));
    rewritten.extend_from_slice(&bytes[set + 1..]);
    Some(rewritten)
}

/// For a `SEARCH` whose keys hold `$`: the command with `key` in place of each `$` (quoted
/// strings and literals are left alone). `None` when no key is `$`.
pub fn dollar_in_search(bytes: &[u8], key: &[u8]) -> Option<Vec<u8>> {
    let (start, end) = verb_span(bytes)?;
    if !bytes[start..end].eq_ignore_ascii_case(b"SEARCH") {
        return None;
    }
    let mut rewritten: Vec<u8> = Vec::new();
    let mut copied = 0;
    let mut at = end;
    while at < bytes.len() {
        match bytes[at] {
            b'"' => {
                at += 1;
                while at < bytes.len() && bytes[at] != b'"' {
                    at += if bytes[at] == b'\\' { 2 } else { 1 };
                }
                at += 1;
            }
            b'{' => {
                // A literal: `{n}` or `{n+}`, CRLF, then n bytes not to be looked at.
                let close = bytes[at..].iter().position(|&b| b == b'}')? + at;
                let digits = std::str::from_utf8(&bytes[at + 1..close]).ok()?;
                let length: usize = digits.trim_end_matches('+').parse().ok()?;
                at = close + 3 + length;
            }
            b'$' if matches!(bytes[at - 1], b' ' | b'(')
                && matches!(bytes.get(at + 1), Some(b' ' | b')' | b'\r' | b'\n') | None) =>
            {
                rewritten.extend_from_slice(&bytes[copied..at]);
                rewritten.extend_from_slice(key);
                at += 1;
                copied = at;
            }
            _ => at += 1,
        }
    }
    if copied == 0 {
        return None;
    }
    rewritten.extend_from_slice(&bytes[copied.min(bytes.len())..]);
    Some(rewritten)
}

impl Session {
    /// Replaces a `$` of the command (see the module comment). Outside the selected state the
    /// command is left alone: imap-codec then refuses the `$`.
    pub(super) fn substitute_saved(&mut self, bytes: &[u8]) -> Option<Vec<u8>> {
        let State::Selected { mailbox, .. } = &mut self.state else {
            return None;
        };
        mailbox.searchres.in_use = false;
        if !bytes.contains(&b'$') {
            return None;
        }
        let saved = &mut mailbox.searchres;
        let mut in_use = false;
        let rewritten = dollar_set(bytes, |uid| {
            if uid && !saved.uids.is_empty() {
                let mut set = Vec::new();
                uid_set(&mut set, &saved.uids);
                set
            } else {
                in_use = true;
                b"1".to_vec()
            }
        });
        if rewritten.is_some() {
            saved.in_use = in_use;
            return rewritten;
        }
        dollar_in_search(bytes, &mailbox.searchres.as_search_key())
    }

    /// A SEARCH with SAVE failed: `$` is empty from now on.
    pub(super) fn saved_search_failed(&mut self) {
        if !self.esearch.is_some_and(|options| options.save) {
            return;
        }
        if let State::Selected { mailbox, .. } = &mut self.state {
            mailbox.searchres.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(bytes: Option<Vec<u8>>) -> Option<String> {
        bytes.map(|b| String::from_utf8(b).unwrap())
    }

    #[test]
    fn dollar_as_the_sequence_set_becomes_a_placeholder() {
        let check = |input: &str, expected: Option<&str>| {
            assert_eq!(
                text(dollar_set(input.as_bytes(), |uid| if uid {
                    b"4:5".to_vec()
                } else {
                    b"1".to_vec()
                }))
                .as_deref(),
                expected,
                "{input}"
            );
        };
        check("a FETCH $ (FLAGS)\r\n", Some("a FETCH 1 (FLAGS)\r\n"));
        check(
            "a uid store $ +FLAGS (x)\r\n",
            Some("a uid store 4:5 +FLAGS (x)\r\n"),
        );
        check("a UID COPY $ Trash\r\n", Some("a UID COPY 4:5 Trash\r\n"));
        check("a MOVE $ Trash\r\n", Some("a MOVE 1 Trash\r\n"));
        check("a UID EXPUNGE $\r\n", Some("a UID EXPUNGE 4:5\r\n"));
        check("a EXPUNGE\r\n", None);
        check("a FETCH $1 (FLAGS)\r\n", None);
        check("a FETCH 1:3 (FLAGS)\r\n", None);
        check("a SELECT $\r\n", None);
    }

    #[test]
    fn dollar_among_search_keys_becomes_the_saved_uids() {
        let key = b"UID 3:5,9";
        let check = |input: &str, expected: Option<&str>| {
            assert_eq!(
                text(dollar_in_search(input.as_bytes(), key)).as_deref(),
                expected,
                "{input}"
            );
        };
        check("a SEARCH $ SEEN\r\n", Some("a SEARCH UID 3:5,9 SEEN\r\n"));
        check(
            "a UID SEARCH OR $ (FLAGGED $)\r\n",
            Some("a UID SEARCH OR UID 3:5,9 (FLAGGED UID 3:5,9)\r\n"),
        );
        check(
            "a SEARCH SUBJECT \"$\" $\r\n",
            Some("a SEARCH SUBJECT \"$\" UID 3:5,9\r\n"),
        );
        check(
            "a SEARCH SUBJECT {1}\r\n$ $\r\n",
            Some("a SEARCH SUBJECT {1}\r\n$ UID 3:5,9\r\n"),
        );
        check("a SEARCH KEYWORD $Junk\r\n", None);
        check("a FETCH $ (FLAGS)\r\n", None);
    }

    #[test]
    fn save_with_min_or_max_alone_keeps_only_those() {
        let uids = [2, 5, 7, 9];
        let options = |f: fn(&mut ReturnOptions)| {
            let mut options = ReturnOptions {
                save: true,
                ..ReturnOptions::default()
            };
            f(&mut options);
            options
        };
        assert_eq!(saved_selection(&options(|_| {}), &uids), uids);
        assert_eq!(saved_selection(&options(|o| o.min = true), &uids), [2]);
        assert_eq!(
            saved_selection(
                &options(|o| {
                    o.min = true;
                    o.max = true
                }),
                &uids
            ),
            [2, 9]
        );
        assert_eq!(
            saved_selection(
                &options(|o| {
                    o.max = true;
                    o.count = true
                }),
                &uids
            ),
            uids
        );
        assert_eq!(
            saved_selection(&options(|o| o.partial = Some((-1, -2))), &uids),
            [7, 9]
        );
        assert_eq!(
            saved_selection(&options(|o| o.min = true), &[]),
            [] as [Uid; 0]
        );
    }
}
