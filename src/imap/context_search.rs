//! CONTEXT=SEARCH (RFC 5267): `SEARCH RETURN (UPDATE ...)` keeps the search as a context of
//! the selected mailbox, and the session reports how its matches change as
//! `* ESEARCH (TAG "t") UID ADDTO (0 uids)` / `REMOVEFROM (0 uids)` (position 0: a SEARCH
//! context is unordered), until CANCELUPDATE or the end of the selection. PARTIAL is parsed
//! and answered in `esearch`.
//!
//! A context holds the SEARCH command as imap-codec decodes it (RETURN clause out, `$`
//! already replaced by the saved UIDs, so a later SAVE does not move it) and the UIDs it
//! last reported. Whenever the client's view of the mailbox changed (after a command, and
//! during IDLE as other sessions append, expunge or change flags) each context is searched
//! again over that view, the view the client was told of by EXISTS/EXPUNGE/FETCH, so an
//! ADDTO never names a message before its EXISTS. A UID SEARCH context's updates carry
//! UIDs (and the UID indicator), a SEARCH context's carry message numbers of that view; a
//! message whose EXPUNGE the client already has is not named by number (the EXPUNGE took
//! it out of the client's results).

use std::io::Write;

use imap_codec::decode::Decoder;
use imap_codec::imap_types::command::CommandBody;
use imap_codec::CommandCodec;

use super::response::{tagged, uid_set};
use super::session::{Session, State};
use crate::store::{MessageList, Uid};

/// Most live contexts per selected mailbox: each costs a search per mailbox change. Past it,
/// a SEARCH with UPDATE is answered with `NO [NOUPDATE "tag"]` (and its results).
pub const MAX_SEARCH_CONTEXTS: usize = 16;

/// Longest SEARCH command kept as a context (the command line and its literals).
const MAX_CONTEXT_COMMAND_BYTES: usize = 16 * 1024;

struct SearchContext {
    tag: String,
    /// A UID SEARCH: updates name UIDs.
    uid: bool,
    /// The SEARCH command imap-codec decoded (rewritten as the session ran it).
    command: Vec<u8>,
    /// The matching UIDs last reported, ascending.
    uids: Vec<Uid>,
}

/// The live search contexts of the selected mailbox.
#[derive(Default)]
pub struct Contexts {
    list: Vec<SearchContext>,
    /// The command of the running `SEARCH RETURN (UPDATE)`, until the search registers it.
    pending: Option<Vec<u8>>,
    /// The view (`Selected::view_stamp`) the contexts were last searched over.
    seen: Option<(u64, bool, usize)>,
}

impl Contexts {
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Makes the running search (whose command was kept by [`Session::keep_context_command`])
    /// a context with `uids` (ascending) as its reported matches. False when there are too
    /// many contexts already or the command was too long to keep.
    pub fn register(
        &mut self,
        tag: &str,
        uid: bool,
        uids: Vec<Uid>,
        stamp: (u64, bool, usize),
    ) -> bool {
        let Some(command) = self.pending.take() else {
            return false;
        };
        if self.list.len() >= MAX_SEARCH_CONTEXTS {
            return false;
        }
        // A reused tag replaces its context (RFC 5267 forbids reuse; keep one answer).
        self.list.retain(|context| context.tag != tag);
        self.list.push(SearchContext {
            tag: tag.to_owned(),
            uid,
            command,
            uids,
        });
        if self.seen.is_none() || self.list.len() == 1 {
            self.seen = Some(stamp);
        }
        true
    }

    /// Ends the contexts of `tags`; false (nothing ended) if one of them is not a context.
    fn cancel(&mut self, tags: &[String]) -> bool {
        if !tags
            .iter()
            .all(|tag| self.list.iter().any(|context| &context.tag == tag))
        {
            return false;
        }
        self.list.retain(|context| !tags.contains(&context.tag));
        true
    }
}

/// The tags of `CANCELUPDATE "t1" "t2"` (quoted strings or atoms); `None` when malformed.
fn cancel_tags(arguments: &[u8]) -> Option<Vec<String>> {
    let mut tags = Vec::new();
    for word in arguments.split(|&b| b == b' ').filter(|w| !w.is_empty()) {
        let word = match word.strip_prefix(b"\"") {
            Some(quoted) => quoted.strip_suffix(b"\"")?,
            None => word,
        };
        if word.is_empty() || word.iter().any(|&b| b == b'"' || b == b'\\') {
            return None;
        }
        tags.push(String::from_utf8(word.to_vec()).ok()?);
    }
    (!tags.is_empty()).then_some(tags)
}

/// `* ESEARCH (TAG "tag") [UID] REMOVEFROM/ADDTO (0 set)` for what left and joined `old`
/// (UIDs, ascending); without `uid` the set holds the message numbers in `messages`.
fn write_update(
    out: &mut Vec<u8>,
    tag: &str,
    uid: bool,
    old: &[Uid],
    new: &[Uid],
    messages: &MessageList,
) {
    let removed: Vec<Uid> = old
        .iter()
        .copied()
        .filter(|uid| new.binary_search(uid).is_err())
        .collect();
    let added: Vec<Uid> = new
        .iter()
        .copied()
        .filter(|uid| old.binary_search(uid).is_err())
        .collect();
    for (name, uids) in [("REMOVEFROM", removed), ("ADDTO", added)] {
        let numbers: Vec<u32> = if uid {
            uids
        } else {
            uids.iter()
                .filter_map(|uid| messages.binary_search_by_key(uid, |m| m.uid).ok())
                .map(|i| i as u32 + 1)
                .collect()
        };
        if numbers.is_empty() {
            continue;
        }
        let indicator = if uid { " UID" } else { "" };
        let _ = write!(out, "* ESEARCH (TAG \"{tag}\"){indicator} {name} (0 ");
        uid_set(out, &numbers);
        out.extend_from_slice(b")\r\n");
    }
}

impl Session {
    /// Before a `SEARCH RETURN (UPDATE)` runs: keeps its command for the context.
    pub(super) fn keep_context_command(&mut self, bytes: &[u8]) {
        let State::Selected { mailbox, .. } = &mut self.state else {
            return;
        };
        mailbox.contexts.pending =
            (bytes.len() <= MAX_CONTEXT_COMMAND_BYTES).then(|| bytes.to_vec());
    }

    /// `CANCELUPDATE "tag" ...` (RFC 5267 4.3.2).
    pub(super) fn cancel_update(&mut self, tag: &str, arguments: Option<&[u8]>, out: &mut Vec<u8>) {
        let State::Selected { mailbox, .. } = &mut self.state else {
            tagged(out, tag, "BAD", None, "no mailbox selected");
            return;
        };
        let Some(tags) = arguments.and_then(cancel_tags) else {
            tagged(
                out,
                tag,
                "BAD",
                None,
                "CANCELUPDATE needs the tags of searches",
            );
            return;
        };
        if mailbox.contexts.cancel(&tags) {
            tagged(out, tag, "OK", None, "CANCELUPDATE completed");
        } else {
            tagged(out, tag, "BAD", None, "no such search context");
        }
    }

    /// After a command (`mark`: where its output began in `out`): the context updates,
    /// written before its tagged line.
    pub(super) async fn search_updates_after_command(&mut self, mark: usize, out: &mut Vec<u8>) {
        let State::Selected { mailbox, .. } = &self.state else {
            return;
        };
        if mailbox.contexts.is_empty() {
            return;
        }
        let mut updates = Vec::new();
        self.search_updates(&mut updates).await;
        if updates.is_empty() {
            return;
        }
        // The tagged line is the last one; a long FETCH may have sent part of `out` ahead,
        // then the updates simply follow.
        let body = out.len().saturating_sub(2);
        let last_line = out[..body]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let tagged_last = last_line >= mark.min(out.len())
            && last_line < out.len()
            && !out[last_line..].starts_with(b"* ")
            && !out[last_line..].starts_with(b"+ ");
        if tagged_last {
            let tail = out.split_off(last_line);
            out.extend_from_slice(&updates);
            out.extend_from_slice(&tail);
        } else {
            out.extend_from_slice(&updates);
        }
    }

    /// Searches each context again if the client's view changed, and writes what changed.
    pub async fn search_updates(&mut self, out: &mut Vec<u8>) {
        let State::Selected { mailbox, .. } = &mut self.state else {
            return;
        };
        let stamp = mailbox.view_stamp();
        if mailbox.contexts.is_empty() || mailbox.contexts.seen == Some(stamp) {
            return;
        }
        mailbox.contexts.seen = Some(stamp);
        let mut contexts = std::mem::take(&mut mailbox.contexts.list);
        let messages = mailbox.messages.clone();
        let last_uid = mailbox.last_uid();
        for context in &mut contexts {
            let criteria = match CommandCodec::default().decode(&context.command) {
                Ok((_, command)) => match command.body {
                    CommandBody::Search { criteria, .. } => criteria,
                    _ => continue,
                },
                Err(_) => continue,
            };
            let found = self.matching(&messages, &criteria, last_uid).await;
            let uids: Vec<Uid> = found.iter().map(|&i| messages[i].uid).collect();
            write_update(
                out,
                &context.tag,
                context.uid,
                &context.uids,
                &uids,
                &messages,
            );
            context.uids = uids;
        }
        if let State::Selected { mailbox, .. } = &mut self.state {
            // Contexts made meanwhile cannot exist (one command at a time), but keep any.
            contexts.append(&mut mailbox.contexts.list);
            mailbox.contexts.list = contexts;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(uids: &[Uid]) -> MessageList {
        uids.iter()
            .map(|&uid| crate::store::MessageMeta {
                uid,
                blob: crate::store::BlobId([0; 32]),
                size: 1,
                internal_date: 0,
                internal_date_offset_min: 0,
                flags: Default::default(),
                modseq: 1,
                saved_at: 0,
            })
            .collect::<Vec<_>>()
            .into()
    }

    #[test]
    fn updates_name_what_left_and_what_joined() {
        // UID 1 was expunged (and reported); 7 lost a flag; 8 and 9 arrived.
        let messages = view(&[2, 3, 7, 8, 9]);
        let mut out = Vec::new();
        write_update(
            &mut out,
            "A1",
            true,
            &[1, 2, 3, 7],
            &[2, 3, 8, 9],
            &messages,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "* ESEARCH (TAG \"A1\") UID REMOVEFROM (0 1,7)\r\n\
             * ESEARCH (TAG \"A1\") UID ADDTO (0 8:9)\r\n"
        );
        let mut out = Vec::new();
        write_update(
            &mut out,
            "B1",
            false,
            &[1, 2, 3, 7],
            &[2, 3, 8, 9],
            &messages,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "* ESEARCH (TAG \"B1\") REMOVEFROM (0 3)\r\n\
             * ESEARCH (TAG \"B1\") ADDTO (0 4:5)\r\n"
        );
        let mut out = Vec::new();
        write_update(&mut out, "A1", true, &[1], &[1], &messages);
        assert!(out.is_empty());
    }

    #[test]
    fn cancel_takes_quoted_tags_and_refuses_unknown_ones() {
        assert_eq!(
            cancel_tags(b"\"A1\" B2"),
            Some(vec!["A1".to_owned(), "B2".to_owned()])
        );
        assert_eq!(cancel_tags(b""), None);
        assert_eq!(cancel_tags(b"\"A1"), None);
        let mut contexts = Contexts::default();
        for tag in ["A1", "B2"] {
            contexts.pending = Some(b"x".to_vec());
            assert!(contexts.register(tag, true, vec![1], (0, false, 1)));
        }
        assert!(!contexts.cancel(&["A1".to_owned(), "C3".to_owned()]));
        assert!(contexts.cancel(&["A1".to_owned()]));
        assert_eq!(contexts.list.len(), 1);
        for n in 0..MAX_SEARCH_CONTEXTS {
            contexts.pending = Some(b"x".to_vec());
            contexts.register(&format!("T{n}"), true, vec![], (0, false, 1));
        }
        assert_eq!(contexts.list.len(), MAX_SEARCH_CONTEXTS);
        contexts.pending = Some(b"x".to_vec());
        assert!(!contexts.register("late", true, vec![], (0, false, 1)));
    }
}
