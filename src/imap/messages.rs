//! Selected-state commands on messages: FETCH, STORE, SEARCH, COPY, MOVE, EXPUNGE (and UID
//! EXPUNGE), CLOSE and UNSELECT.

use std::io::Write;
use std::sync::Arc;

use imap_codec::imap_types::command::CommandBody;
use imap_codec::imap_types::core::AString;
use imap_codec::imap_types::fetch::{
    MacroOrMessageDataItemNames, MessageDataItem, MessageDataItemName, Part, Section,
};
use imap_codec::imap_types::flag::{StoreResponse, StoreType};
use imap_codec::imap_types::search::SearchKey;
use imap_codec::imap_types::sequence::SequenceSet;

use super::binary::{
    binary_content, section_text as binary_section_text, write_value as write_binary_value,
    BinaryKind,
};
use super::cache::read_bodies;
use super::cache::BODY_BATCH;
use super::esearch::write_esearch;
use super::fetch::{apply_partial, header_fields_subset, top_header, ParsedMessage};
use super::mailboxes::{no, to_flag_set};
use super::order_cache::{OrderAnswer, OrderKey};
use super::response::{codec_item, flag_list_recent, internal_date, literal, tagged, uid_set};
use super::search::{matches, needs_body, SearchInput};
use super::session::send_ahead;
use super::session::{mailbox_name, Session, State};
use super::sort::Ordering;
use super::sort_keys::{found_metas, groups, order_response, BlobKeys};
use crate::store::{BlobId, Flag, FlagOp, FlagSet, MessageList, Rights, Uid};

impl Session {
    pub(super) async fn selected_command(
        &mut self,
        tag: &str,
        body: CommandBody<'_>,
        out: &mut Vec<u8>,
    ) {
        // ACL: the rights on the selected mailbox, as they are now (`acl.rs`).
        let rights = self.selected_rights();
        let State::Selected { account, mailbox } = &mut self.state else {
            match body {
                CommandBody::Close
                | CommandBody::Unselect
                | CommandBody::Expunge
                | CommandBody::Search { .. }
                | CommandBody::Fetch { .. }
                | CommandBody::Store { .. }
                | CommandBody::Copy { .. }
                | CommandBody::Move { .. } => tagged(out, tag, "BAD", None, "no mailbox selected"),
                _ => tagged(out, tag, "BAD", None, "command not supported"),
            }
            return;
        };
        let account = *account;
        let owner = mailbox.owner;
        let leaves = matches!(body, CommandBody::Close | CommandBody::Unselect);
        if !leaves && !rights.contains(Rights::READ) {
            tagged(
                out,
                tag,
                "NO",
                Some("NOPERM"),
                "permission denied: the r right on the selected mailbox is gone",
            );
            return;
        }
        match body {
            CommandBody::Close => {
                // ACL: without e, CLOSE leaves the mailbox without expunging (RFC 4314 4).
                if !mailbox.read_only && rights.contains(Rights::EXPUNGE) {
                    if let Err(error) = self.store.expunge(owner, mailbox.id, None).await {
                        no(out, tag, &error);
                        return;
                    }
                }
                self.state = State::Authenticated { account };
                tagged(out, tag, "OK", None, "CLOSE completed");
            }
            CommandBody::Unselect => {
                self.state = State::Authenticated { account };
                tagged(out, tag, "OK", None, "UNSELECT completed");
            }
            CommandBody::Expunge => self.expunge(tag, None, out).await,
            CommandBody::Search {
                charset,
                criteria,
                uid,
            } => {
                if let Some(charset) = charset {
                    let name = charset.as_ref().to_ascii_uppercase();
                    if name != "US-ASCII" && name != "UTF-8" {
                        tagged(
                            out,
                            tag,
                            "NO",
                            Some("BADCHARSET (US-ASCII UTF-8)"),
                            "unsupported charset",
                        );
                        self.saved_search_failed();
                        return;
                    }
                }
                self.search(tag, &criteria, uid, out).await
            }
            CommandBody::Fetch {
                sequence_set,
                macro_or_item_names,
                uid,
            } => {
                let expanded;
                let items = match &macro_or_item_names {
                    MacroOrMessageDataItemNames::Macro(m) => {
                        expanded = m.expand();
                        expanded.as_slice()
                    }
                    MacroOrMessageDataItemNames::MessageDataItemNames(items) => items.as_slice(),
                };
                self.fetch(tag, &sequence_set, items, uid, out).await
            }
            CommandBody::Store {
                sequence_set,
                kind,
                response,
                flags,
                uid,
            } => {
                let op = match kind {
                    StoreType::Add => FlagOp::Add,
                    StoreType::Remove => FlagOp::Remove,
                    StoreType::Replace => FlagOp::Replace,
                };
                let silent = response == StoreResponse::Silent;
                self.store_command(
                    tag,
                    &sequence_set,
                    op,
                    to_flag_set(&flags),
                    silent,
                    uid,
                    out,
                )
                .await
            }
            CommandBody::Copy {
                sequence_set,
                mailbox,
                uid,
            } => {
                self.copy(tag, &sequence_set, mailbox_name(&mailbox), uid, false, out)
                    .await
            }
            CommandBody::Move {
                sequence_set,
                mailbox,
                uid,
            } => {
                self.copy(tag, &sequence_set, mailbox_name(&mailbox), uid, true, out)
                    .await
            }
            _ => tagged(out, tag, "BAD", None, "command not supported"),
        }
    }

    /// EXPUNGE, or UID EXPUNGE of `uids`.
    pub(super) async fn expunge(
        &mut self,
        tag: &str,
        uids: Option<&SequenceSet>,
        out: &mut Vec<u8>,
    ) {
        let rights = self.selected_rights();
        let State::Selected { mailbox, .. } = &mut self.state else {
            tagged(out, tag, "BAD", None, "no mailbox selected");
            return;
        };
        if mailbox.read_only {
            tagged(out, tag, "NO", Some("READ-ONLY"), "mailbox is read-only");
            return;
        }
        // ACL: EXPUNGE needs e (RFC 4314 4).
        if super::acl::refuse(out, tag, rights, Rights::EXPUNGE) {
            return;
        }
        let owner = mailbox.owner;
        let uids = match uids {
            None => None,
            Some(set) => match mailbox.resolve(set, true) {
                Ok(indexes) => Some(indexes.iter().map(|&i| mailbox.messages[i].uid).collect()),
                Err(reason) => {
                    tagged(out, tag, "BAD", None, reason);
                    return;
                }
            },
        };
        match self.store.expunge(owner, mailbox.id, uids).await {
            Ok(_) => {
                mailbox.refresh(&self.store, owner, true, &[], out);
                tagged(out, tag, "OK", None, "EXPUNGE completed");
            }
            Err(error) => no(out, tag, &error),
        }
    }

    /// The indexes (into `messages`, the selected list) of the messages matching
    /// `criteria`, in mailbox order.
    pub(super) async fn matching(
        &self,
        messages: &MessageList,
        criteria: &SearchKey<'_>,
        last_uid: Uid,
    ) -> Vec<usize> {
        let last_seq = messages.len() as u32;
        let body_needed = needs_body(criteria);
        let header_is_enough = body_needed && header_only(criteria);
        let mut found = Vec::new();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let all: Vec<usize> = (0..messages.len()).collect();
        for chunk in all.chunks(BODY_BATCH) {
            let blobs: Vec<BlobId> = chunk.iter().map(|&i| messages[i].blob).collect();
            let headers = if header_is_enough {
                self.headers.headers_of(&self.store, &blobs).await
            } else {
                Vec::new()
            };
            let raws = if body_needed && !header_is_enough {
                read_bodies(&self.store, &blobs).await
            } else {
                Vec::new()
            };
            for (k, &i) in chunk.iter().enumerate() {
                let meta = &messages[i];
                let header = headers.get(k).and_then(|h| h.as_deref());
                let raw = raws.get(k).and_then(|r| r.as_deref()).map(|r| r.as_slice());
                let input = SearchInput {
                    seq: i as u32 + 1,
                    meta,
                    raw: header.or(raw),
                    last_seq,
                    last_uid,
                    recent: self.recent.contains(meta.uid),
                    now,
                };
                if matches(criteria, &input) {
                    found.push(i);
                }
            }
        }
        found
    }

    async fn search(&mut self, tag: &str, criteria: &SearchKey<'_>, uid: bool, out: &mut Vec<u8>) {
        if let Some(ordering) = self.ordering.take() {
            return self.ordered(tag, criteria, uid, ordering, out).await;
        }
        let State::Selected { mailbox, .. } = &self.state else {
            return;
        };
        let messages = mailbox.messages.clone();
        let last_uid = mailbox.last_uid();
        let view_stamp = mailbox.view_stamp();
        let esearch = self.search_return();
        let found = self.matching(&messages, criteria, last_uid).await;
        let results: Vec<u32> = found
            .iter()
            .map(|&i| if uid { messages[i].uid } else { i as u32 + 1 })
            .collect();
        // RFC 7162 3.1.5: with a MODSEQ key, the answer ends with the highest modseq found.
        let highest_match = found.iter().map(|&i| messages[i].modseq).max().unwrap_or(0);
        let modseq_note =
            (self.modifiers.search_modseq && highest_match > 0).then_some(highest_match);
        match esearch {
            None => {
                out.extend_from_slice(b"* SEARCH");
                for found in &results {
                    let _ = write!(out, " {found}");
                }
                if let Some(modseq) = modseq_note {
                    let _ = write!(out, " (MODSEQ {modseq})");
                }
                out.extend_from_slice(b"\r\n")
            }
            Some(options) if !options.answers() => {}
            Some(options) => {
                write_esearch(out, tag, uid, options, &results);
                if let Some(modseq) = modseq_note {
                    out.truncate(out.len() - 2);
                    let _ = write!(out, " MODSEQ {modseq}\r\n");
                }
            }
        }
        let State::Selected { mailbox, .. } = &mut self.state else {
            return;
        };
        if let Some(options) = esearch.filter(|options| options.save) {
            let uids: Vec<Uid> = found.iter().map(|&i| messages[i].uid).collect();
            let saved = super::searchres::saved_selection(&options, &uids);
            mailbox.searchres.save(saved);
        }
        if esearch.is_some_and(|options| options.update) {
            let uids: Vec<Uid> = found.iter().map(|&i| messages[i].uid).collect();
            if !mailbox.contexts.register(tag, uid, uids, view_stamp) {
                let _ = write!(
                    out,
                    "* NO [NOUPDATE \"{tag}\"] too many search contexts; cancel some\r\n"
                );
            }
        }
        let owner = mailbox.owner;
        mailbox.refresh(&self.store, owner, false, &[], out);
        tagged(out, tag, "OK", None, "SEARCH completed");
    }

    /// SORT and THREAD: the messages matching `criteria`, ordered or threaded. The sort
    /// values and threads are computed from the selected list and the cached headers; over
    /// [`ORDER_INLINE_MAX_MESSAGES`] messages that work runs on the blocking pool, so that a
    /// large mailbox does not hold up the other sessions of this worker thread.
    async fn ordered(
        &mut self,
        tag: &str,
        criteria: &SearchKey<'_>,
        uid: bool,
        ordering: Ordering,
        out: &mut Vec<u8>,
    ) {
        let State::Selected { mailbox, .. } = &self.state else {
            return;
        };
        let messages = mailbox.messages.clone();
        let last_uid = mailbox.last_uid();
        let key = OrderKey::new(
            mailbox.owner,
            mailbox.id,
            &messages,
            criteria,
            &ordering,
            uid,
        );
        let cached = key.as_ref().and_then(|key| self.headers.orders.get(key));
        if let Some(answer) = cached {
            self.write_ordered(tag, &ordering, &answer, uid, out);
            return;
        }
        let found = if matches!(criteria, SearchKey::All) {
            (0..messages.len()).collect()
        } else {
            self.matching(&messages, criteria, last_uid).await
        };
        let keys = self.sort_keys_of(&messages, &found, &ordering).await;
        let highest_match = found_metas(&messages, &found)
            .map(|m| m.modseq)
            .max()
            .unwrap_or(0);
        let verb = match ordering {
            Ordering::Sort(_) => "SORT",
            Ordering::Thread(_) => "THREAD",
        };
        let n_found = found.len();
        let ordering_of_work = ordering.clone();
        let work = move || order_response(&messages, &found, &keys, uid, &ordering_of_work);
        let started = std::time::Instant::now();
        let mut response = if n_found > ORDER_INLINE_MAX_MESSAGES {
            match tokio::task::spawn_blocking(work).await {
                Ok(response) => response,
                Err(error) => {
                    tracing::warn!(%error, "{verb} task failed");
                    tagged(
                        out,
                        tag,
                        "NO",
                        Some("SERVERBUG"),
                        "could not order messages",
                    );
                    return;
                }
            }
        } else {
            work()
        };
        tracing::debug!(
            verb,
            n_found,
            elapsed_us = started.elapsed().as_micros() as u64,
            "ordered"
        );
        let answer = OrderAnswer {
            response: Arc::from(std::mem::take(&mut response)),
            highest_match,
        };
        if let Some(key) = key {
            self.headers.orders.insert(key, answer.clone());
        }
        self.write_ordered(tag, &ordering, &answer, uid, out);
    }

    /// The cached SORT/THREAD keys of the messages `found`, the groups `ordering` reads
    /// filled from their headers where missing (a message whose header cannot be read gets
    /// empty keys, not cached).
    async fn sort_keys_of(
        &self,
        messages: &MessageList,
        found: &[usize],
        ordering: &Ordering,
    ) -> Vec<Arc<BlobKeys>> {
        let cache = &self.headers.keys;
        let groups = groups(ordering);
        let blobs: Vec<BlobId> = found_metas(messages, found).map(|m| m.blob).collect();
        let mut keys = cache.entries(blobs.iter().copied());
        let missing: Vec<usize> = (0..keys.len())
            .filter(|&k| !keys[k].has_all(&groups))
            .collect();
        for chunk in missing.chunks(BODY_BATCH) {
            let chunk_blobs: Vec<BlobId> = chunk.iter().map(|&k| blobs[k]).collect();
            let headers = self.headers.headers_of(&self.store, &chunk_blobs).await;
            for (&k, header) in chunk.iter().zip(headers) {
                match header {
                    Some(header) => cache.grew(keys[k].fill(&groups, Some(&header))),
                    None => {
                        let empty = Arc::new(BlobKeys::default());
                        empty.fill(&groups, None);
                        keys[k] = empty;
                    }
                }
            }
        }
        keys
    }

    /// Writes a SORT or THREAD answer (with CONDSTORE's MODSEQ note when asked for), then
    /// the mailbox's news and the tagged OK.
    fn write_ordered(
        &mut self,
        tag: &str,
        ordering: &Ordering,
        answer: &OrderAnswer,
        uid: bool,
        out: &mut Vec<u8>,
    ) {
        let (verb, sort) = match ordering {
            Ordering::Sort(_) => ("SORT", true),
            Ordering::Thread(_) => ("THREAD", false),
        };
        let response = &answer.response;
        let modseq_note = self.modifiers.search_modseq && answer.highest_match > 0 && sort;
        if let (Some(options), true) = (self.esearch.take(), sort) {
            // ESORT: the sorted numbers as `* ESEARCH`, MIN/MAX/ALL/PARTIAL in sort order.
            let numbers: Vec<u32> = response
                .strip_prefix(b"* SORT")
                .unwrap_or_default()
                .split(|&b| b == b' ' || b == b'\r' || b == b'\n')
                .filter_map(|word| std::str::from_utf8(word).ok()?.parse().ok())
                .collect();
            write_esearch(out, tag, uid, options, &numbers);
            if modseq_note {
                out.truncate(out.len() - 2);
                let _ = write!(out, " MODSEQ {}\r\n", answer.highest_match);
            }
        } else if modseq_note {
            out.extend_from_slice(&response[..response.len() - 2]);
            let _ = write!(out, " (MODSEQ {})\r\n", answer.highest_match);
        } else {
            out.extend_from_slice(response);
        }
        let State::Selected { mailbox, .. } = &mut self.state else {
            return;
        };
        let owner = mailbox.owner;
        mailbox.refresh(&self.store, owner, false, &[], out);
        tagged(out, tag, "OK", None, &format!("{verb} completed"));
    }

    async fn fetch(
        &mut self,
        tag: &str,
        set: &SequenceSet,
        items: &[MessageDataItemName<'_>],
        uid: bool,
        out: &mut Vec<u8>,
    ) {
        let rights = self.selected_rights();
        let State::Selected { mailbox, .. } = &mut self.state else {
            return;
        };
        // ACL: every store call names the mailbox's owner.
        let account = mailbox.owner;
        let mut indexes = match mailbox.resolve(set, uid) {
            Ok(indexes) => indexes,
            Err(reason) => {
                tagged(out, tag, "BAD", None, reason);
                return;
            }
        };
        // CONDSTORE (RFC 7162): CHANGEDSINCE keeps the messages changed after it (and adds
        // MODSEQ); VANISHED first reports the set's UIDs expunged after it.
        let changed_since = self.modifiers.changed_since;
        let with_modseq = self.modifiers.fetch_modseq || changed_since.is_some();
        if let Some(since) = changed_since {
            if self.modifiers.vanished {
                let uidnext = self
                    .store
                    .mailbox_view(account, mailbox.id)
                    .map_or(0, |view| view.uidnext);
                let largest = uidnext.saturating_sub(1).max(mailbox.last_uid());
                let within = super::condstore::uid_ranges_of(set, largest);
                let present: Vec<Uid> = mailbox.messages.iter().map(|m| m.uid).collect();
                let vanished = super::condstore::vanished_in(
                    &self.store,
                    account,
                    mailbox.id,
                    since,
                    &within,
                    &present,
                );
                super::condstore::write_vanished(out, true, &vanished);
            }
            indexes.retain(|&i| mailbox.messages[i].modseq > since);
        }
        let uid = uid || self.qresync;
        let mut needs_parsed = false;
        let mut needs_raw = false;
        // OBJECTID (RFC 8474): THREADID reads the header.
        let fetch_ids = self.fetch_ids;
        let fetch_savedate = self.fetch_savedate;
        let mut needs_header = fetch_ids.thread_id;
        // BINARY (RFC 3516): these positions of `items` are answered decoded.
        let binary = std::mem::take(&mut self.binary);
        let binary_at = |position: usize| {
            binary
                .iter()
                .find(|(at, _)| *at == position)
                .map(|(_, kind)| *kind)
        };
        if !binary.is_empty() {
            needs_parsed = true;
            needs_raw = true;
        }
        for item in items {
            match item {
                MessageDataItemName::Body
                | MessageDataItemName::BodyStructure
                | MessageDataItemName::Envelope => {
                    needs_parsed = true;
                    needs_raw = true;
                }
                MessageDataItemName::Rfc822 | MessageDataItemName::Rfc822Text => needs_raw = true,
                MessageDataItemName::Rfc822Header => needs_header = true,
                MessageDataItemName::BodyExt { section, .. } => match section {
                    None | Some(Section::Text(None)) => needs_raw = true,
                    Some(Section::Header(None))
                    | Some(Section::HeaderFields(None, _))
                    | Some(Section::HeaderFieldsNot(None, _)) => needs_header = true,
                    Some(_) => {
                        needs_parsed = true;
                        needs_raw = true;
                    }
                },
                _ => {}
            }
        }
        if needs_raw {
            let total: u64 = indexes
                .iter()
                .map(|&i| u64::from(mailbox.messages[i].size))
                .sum();
            if total > self.config.max_fetch_body_bytes {
                tagged(
                    out,
                    tag,
                    "NO",
                    Some("LIMIT"),
                    "too much at once; fetch fewer messages",
                );
                return;
            }
        }
        let sets_seen = !mailbox.read_only
            && items.iter().any(|item| {
                matches!(
                    item,
                    MessageDataItemName::BodyExt { peek: false, .. }
                        | MessageDataItemName::Rfc822
                        | MessageDataItemName::Rfc822Text
                )
            });
        let mut seen_now: Vec<Uid> = Vec::new();
        // ACL: without s, a FETCH of a body leaves \Seen alone (RFC 4314 4).
        if sets_seen && rights.contains(Rights::SEEN) {
            let unseen: Vec<Uid> = indexes
                .iter()
                .map(|&i| &mailbox.messages[i])
                .filter(|m| !m.flags.contains(&Flag::Seen))
                .map(|m| m.uid)
                .collect();
            if !unseen.is_empty() {
                let seen: FlagSet = [Flag::Seen].into_iter().collect();
                match self
                    .store
                    .store_flags(account, mailbox.id, unseen, FlagOp::Add, seen)
                    .await
                {
                    Ok(changed) => seen_now = changed.into_iter().map(|(uid, _)| uid).collect(),
                    Err(error) => {
                        no(out, tag, &error);
                        return;
                    }
                }
                seen_now.sort_unstable();
                mailbox.refresh(&self.store, account, false, &seen_now, out);
            }
        }
        let messages = mailbox.messages.clone();

        let flags_listed = items.contains(&MessageDataItemName::Flags);
        let uid_listed = items.contains(&MessageDataItemName::Uid);
        let mut failures = 0usize;
        let mut unknown_cte = false;
        let mut unknown_cte_uids: Vec<Uid> = Vec::new();
        for chunk in indexes.chunks(BODY_BATCH) {
            let blobs: Vec<BlobId> = chunk.iter().map(|&i| messages[i].blob).collect();
            let raws = if needs_raw {
                read_bodies(&self.store, &blobs).await
            } else {
                Vec::new()
            };
            let headers = if needs_header && !needs_raw {
                self.headers.headers_of(&self.store, &blobs).await
            } else {
                Vec::new()
            };
            for (k, &index) in chunk.iter().enumerate() {
                let meta = &messages[index];
                let raw = raws.get(k).cloned().flatten();
                if needs_raw && raw.is_none() {
                    failures += 1;
                    continue;
                }
                let header: Option<Arc<[u8]>> = match (&raw, needs_header) {
                    (_, false) => None,
                    (Some(raw), true) => Some(Arc::from(top_header(raw))),
                    (None, true) => match headers.get(k).cloned().flatten() {
                        Some(header) => Some(header),
                        None => {
                            failures += 1;
                            continue;
                        }
                    },
                };
                let raw_bytes: &[u8] = raw.as_deref().map_or(&[], |r| r.as_slice());
                let header_bytes: &[u8] = header.as_deref().unwrap_or(&[]);
                let parsed = needs_parsed.then(|| ParsedMessage::parse(raw_bytes));
                // Decoded before the response starts: an unknown encoding leaves the
                // message out and makes the FETCH a NO [UNKNOWN-CTE].
                let mut decoded: Vec<Option<Vec<u8>>> = vec![None; items.len()];
                if let Some(parsed) = &parsed {
                    for &(position, _) in &binary {
                        let Some(MessageDataItemName::BodyExt { section, .. }) =
                            items.get(position)
                        else {
                            continue;
                        };
                        // `None` (an unknown transfer encoding) is handled below.
                        decoded[position] = binary_content(parsed, section.as_ref()).ok();
                    }
                }
                if binary
                    .iter()
                    .any(|&(position, _)| decoded[position].is_none())
                {
                    // RFC 3516 4.2: the command fails with NO [UNKNOWN-CTE]. The other
                    // messages are answered in full; this one gets no BINARY answer, but a
                    // \Seen that BINARY[...] has just set is still announced, and the tagged
                    // NO names it, so the client knows which message to fetch otherwise.
                    if unknown_cte_uids.len() < MAX_UNKNOWN_CTE_UIDS_NAMED {
                        unknown_cte_uids.push(meta.uid);
                    }
                    unknown_cte = true;
                    if seen_now.binary_search(&meta.uid).is_ok() {
                        let _ = write!(out, "* {} FETCH (", index + 1);
                        if uid {
                            let _ = write!(out, "UID {} ", meta.uid);
                        }
                        out.extend_from_slice(b"FLAGS ");
                        flag_list_recent(out, &meta.flags, self.recent.contains(meta.uid));
                        out.extend_from_slice(b")\r\n");
                    }
                    continue;
                }

                let _ = write!(out, "* {} FETCH (", index + 1);
                let mut first = true;
                let mut separate = |out: &mut Vec<u8>| {
                    if !first {
                        out.push(b' ');
                    }
                    first = false;
                };
                if uid && !uid_listed {
                    separate(out);
                    let _ = write!(out, "UID {}", meta.uid);
                }
                let flags_set_now = seen_now.binary_search(&meta.uid).is_ok();
                if !flags_listed && flags_set_now {
                    separate(out);
                    out.extend_from_slice(b"FLAGS ");
                    flag_list_recent(out, &meta.flags, self.recent.contains(meta.uid));
                }
                for (position, item) in items.iter().enumerate() {
                    separate(out);
                    if let (
                        Some(kind),
                        MessageDataItemName::BodyExt {
                            section, partial, ..
                        },
                    ) = (binary_at(position), item)
                    {
                        let bytes = decoded[position].as_deref().unwrap_or_default();
                        let section = binary_section_text(section.as_ref());
                        match kind {
                            BinaryKind::Size => {
                                let _ = write!(out, "BINARY.SIZE[{section}] {}", bytes.len());
                            }
                            BinaryKind::Content => {
                                let _ = write!(out, "BINARY[{section}]");
                                if let Some((origin, _)) = partial {
                                    let _ = write!(out, "<{origin}>");
                                }
                                out.push(b' ');
                                write_binary_value(out, apply_partial(bytes, *partial));
                            }
                        }
                        continue;
                    }
                    match item {
                        MessageDataItemName::Uid => {
                            let _ = write!(out, "UID {}", meta.uid);
                        }
                        MessageDataItemName::Flags => {
                            out.extend_from_slice(b"FLAGS ");
                            flag_list_recent(out, &meta.flags, self.recent.contains(meta.uid));
                        }
                        MessageDataItemName::InternalDate => {
                            out.extend_from_slice(b"INTERNALDATE ");
                            internal_date(out, meta.internal_date, meta.internal_date_offset_min);
                        }
                        MessageDataItemName::Rfc822Size => {
                            let _ = write!(out, "RFC822.SIZE {}", meta.size);
                        }
                        MessageDataItemName::Rfc822 => {
                            out.extend_from_slice(b"RFC822 ");
                            literal(out, raw_bytes);
                        }
                        MessageDataItemName::Rfc822Header => {
                            out.extend_from_slice(b"RFC822.HEADER ");
                            literal(out, header_bytes);
                        }
                        MessageDataItemName::Rfc822Text => {
                            out.extend_from_slice(b"RFC822.TEXT ");
                            literal(out, &raw_bytes[top_header(raw_bytes).len()..]);
                        }
                        MessageDataItemName::Envelope => {
                            if let Some(parsed) = &parsed {
                                codec_item(out, MessageDataItem::Envelope(parsed.envelope()));
                            }
                        }
                        MessageDataItemName::Body => {
                            if let Some(parsed) = &parsed {
                                codec_item(
                                    out,
                                    MessageDataItem::Body(parsed.body_structure(false)),
                                );
                            }
                        }
                        MessageDataItemName::BodyStructure => {
                            if let Some(parsed) = &parsed {
                                codec_item(
                                    out,
                                    MessageDataItem::BodyStructure(parsed.body_structure(true)),
                                );
                            }
                        }
                        MessageDataItemName::BodyExt {
                            section, partial, ..
                        } => {
                            out.extend_from_slice(b"BODY[");
                            if let Some(section) = section {
                                section_spec(out, section);
                            }
                            out.push(b']');
                            if let Some((origin, _)) = partial {
                                let _ = write!(out, "<{origin}>");
                            }
                            out.push(b' ');
                            let scratch: Vec<u8>;
                            let bytes: &[u8] = match section {
                                None => raw_bytes,
                                Some(Section::Text(None)) => {
                                    &raw_bytes[top_header(raw_bytes).len()..]
                                }
                                Some(Section::Header(None)) => header_bytes,
                                Some(Section::HeaderFields(None, names)) => {
                                    scratch =
                                        header_fields_subset(header_bytes, names.as_ref(), false);
                                    &scratch
                                }
                                Some(Section::HeaderFieldsNot(None, names)) => {
                                    scratch =
                                        header_fields_subset(header_bytes, names.as_ref(), true);
                                    &scratch
                                }
                                Some(section) => {
                                    scratch = parsed
                                        .as_ref()
                                        .map(|p| p.section(Some(section)))
                                        .unwrap_or_default();
                                    &scratch
                                }
                            };
                            literal(out, apply_partial(bytes, *partial));
                        }
                    }
                }
                if with_modseq || (self.condstore && flags_set_now) {
                    separate(out);
                    let _ = write!(out, "MODSEQ ({})", meta.modseq);
                }
                if fetch_ids.email_id {
                    separate(out);
                    let _ = write!(out, "EMAILID ({})", super::objectid::email_id(&meta.blob));
                }
                if fetch_ids.thread_id {
                    separate(out);
                    let thread = super::objectid::thread_id(header.as_deref(), &meta.blob);
                    let _ = write!(out, "THREADID ({thread})");
                }
                if fetch_savedate {
                    separate(out);
                    super::savedate::write_item(out, meta);
                }
                out.extend_from_slice(b")\r\n");
            }
            send_ahead(&self.output_ahead, out).await;
        }
        mailbox.refresh(&self.store, account, false, &seen_now, out);
        if unknown_cte {
            let uids: Vec<String> = unknown_cte_uids.iter().map(|u| u.to_string()).collect();
            let text = format!(
                "cannot decode the content-transfer-encoding of a part of UID {}; \
                 the other messages were answered",
                uids.join(",")
            );
            tagged(out, tag, "NO", Some("UNKNOWN-CTE"), &text);
        } else if failures > 0 {
            tagged(
                out,
                tag,
                "NO",
                Some("UNAVAILABLE"),
                "some messages could not be read",
            );
        } else {
            tagged(out, tag, "OK", None, "FETCH completed");
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn store_command(
        &mut self,
        tag: &str,
        set: &SequenceSet,
        op: FlagOp,
        flags: FlagSet,
        silent: bool,
        uid: bool,
        out: &mut Vec<u8>,
    ) {
        let rights = self.selected_rights();
        let State::Selected { mailbox, .. } = &mut self.state else {
            return;
        };
        if mailbox.read_only {
            tagged(out, tag, "NO", Some("READ-ONLY"), "mailbox is read-only");
            return;
        }
        // ACL: s for \Seen, t for \Deleted, w for the others (RFC 4314 4).
        if super::acl::refuse(out, tag, rights, super::acl::rights_for_flags(op, &flags)) {
            return;
        }
        let owner = mailbox.owner;
        let uids: Vec<Uid> = match mailbox.resolve(set, uid) {
            Ok(indexes) => indexes.iter().map(|&i| mailbox.messages[i].uid).collect(),
            Err(reason) => {
                tagged(out, tag, "BAD", None, reason);
                return;
            }
        };
        if uids.is_empty() {
            tagged(out, tag, "OK", None, "STORE completed");
            return;
        }
        let condstore = self.condstore;
        let unchanged_since = self.modifiers.unchanged_since;
        // The modseqs the client saw, to tell which messages this STORE changed.
        let before: Vec<(Uid, u64)> = if silent && condstore {
            mailbox.messages.iter().map(|m| (m.uid, m.modseq)).collect()
        } else {
            Vec::new()
        };
        let result = if condstore {
            self.store
                .store_flags_since(owner, mailbox.id, uids, op, flags, unchanged_since)
                .await
        } else {
            self.store
                .store_flags(owner, mailbox.id, uids, op, flags)
                .await
                .map(|changed| {
                    let changed = changed
                        .into_iter()
                        .map(|(uid, flags)| (uid, flags, 0))
                        .collect();
                    (changed, Vec::new())
                })
        };
        let (mut changed, modified) = match result {
            Ok(result) => result,
            Err(error) => {
                no(out, tag, &error);
                return;
            }
        };
        changed.sort_unstable_by_key(|(uid, _, _)| *uid);
        let reported: Vec<Uid> = changed.iter().map(|(uid, _, _)| *uid).collect();
        mailbox.refresh(&self.store, owner, false, &reported, out);
        let uid = uid || self.qresync;
        for (message_uid, flags, modseq) in &changed {
            let Ok(index) = mailbox
                .messages
                .binary_search_by_key(message_uid, |m| m.uid)
            else {
                continue;
            };
            let modseq_changed = before
                .binary_search_by_key(message_uid, |(uid, _)| *uid)
                .map_or(true, |k| before[k].1 != *modseq);
            if silent && !(condstore && modseq_changed) {
                continue;
            }
            let _ = write!(out, "* {} FETCH (", index + 1);
            if !silent {
                out.extend_from_slice(b"FLAGS ");
                flag_list_recent(out, flags, self.recent.contains(*message_uid));
            }
            if uid {
                let _ = write!(out, "{}UID {message_uid}", if silent { "" } else { " " });
            }
            if condstore {
                let space = if silent && !uid { "" } else { " " };
                let _ = write!(out, "{space}MODSEQ ({modseq})");
            }
            out.extend_from_slice(b")\r\n");
        }
        if modified.is_empty() {
            tagged(out, tag, "OK", None, "STORE completed");
            return;
        }
        // RFC 7162 3.1.3: the messages left alone, as UIDs or sequence numbers.
        let mut names: Vec<u32> = if uid {
            modified
        } else {
            modified
                .iter()
                .filter_map(|m| {
                    mailbox
                        .messages
                        .binary_search_by_key(m, |meta| meta.uid)
                        .ok()
                        .map(|i| i as u32 + 1)
                })
                .collect()
        };
        names.sort_unstable();
        let mut code = b"MODIFIED ".to_vec();
        uid_set(&mut code, &names);
        let code = String::from_utf8_lossy(&code).into_owned();
        tagged(out, tag, "OK", Some(&code), "conditional STORE failed");
    }

    async fn copy(
        &mut self,
        tag: &str,
        set: &SequenceSet,
        destination: Option<String>,
        uid: bool,
        move_messages: bool,
        out: &mut Vec<u8>,
    ) {
        let rights = self.selected_rights();
        let Some(user) = self.account() else {
            return;
        };
        // ACL: the destination needs i (RFC 4314 4), and must belong to the source's owner:
        // the store copies within one account.
        let Some((target_owner, target, _)) = self.accessible_mailbox(
            tag,
            user,
            destination.as_deref(),
            Rights::INSERT,
            "TRYCREATE",
            out,
        ) else {
            return;
        };
        let State::Selected { mailbox, .. } = &mut self.state else {
            return;
        };
        let account = mailbox.owner;
        if target_owner != account {
            tagged(
                out,
                tag,
                "NO",
                Some("CANNOT"),
                "copying between accounts is not supported: FETCH and APPEND instead",
            );
            return;
        }
        // ACL: MOVE takes the messages away: t and e on the source (RFC 6851 3.1).
        if move_messages
            && super::acl::refuse(
                out,
                tag,
                rights,
                Rights::DELETE_MESSAGES.union(Rights::EXPUNGE),
            )
        {
            return;
        }
        if move_messages && mailbox.read_only {
            tagged(out, tag, "NO", Some("READ-ONLY"), "mailbox is read-only");
            return;
        }
        let uids: Vec<Uid> = match mailbox.resolve(set, uid) {
            Ok(indexes) => indexes.iter().map(|&i| mailbox.messages[i].uid).collect(),
            Err(reason) => {
                tagged(out, tag, "BAD", None, reason);
                return;
            }
        };
        let verb = if move_messages { "MOVE" } else { "COPY" };
        if uids.is_empty() {
            tagged(out, tag, "OK", None, &format!("{verb} completed"));
            return;
        }
        let result = if move_messages {
            self.store
                .move_messages(account, mailbox.id, uids, target.id)
                .await
        } else {
            self.store.copy(account, mailbox.id, uids, target.id).await
        };
        let (uidvalidity, mut pairs) = match result {
            Ok(result) => result,
            Err(error) => {
                no(out, tag, &error);
                return;
            }
        };
        pairs.sort_unstable();
        let mut code = Vec::new();
        if !pairs.is_empty() {
            let sources: Vec<Uid> = pairs.iter().map(|p| p.0).collect();
            let targets: Vec<Uid> = pairs.iter().map(|p| p.1).collect();
            let _ = write!(code, "COPYUID {uidvalidity} ");
            uid_set(&mut code, &sources);
            code.push(b' ');
            uid_set(&mut code, &targets);
        }
        let code = String::from_utf8_lossy(&code).into_owned();
        let code = (!code.is_empty()).then_some(code.as_str());
        if move_messages {
            if let Some(code) = code {
                let _ = write!(out, "* OK [{code}] moved\r\n");
            }
            mailbox.refresh(&self.store, account, true, &[], out);
            tagged(out, tag, "OK", None, "MOVE completed");
        } else {
            // A copy into the selected mailbox itself is announced with EXISTS.
            mailbox.refresh(&self.store, account, true, &[], out);
            tagged(out, tag, "OK", code, "COPY completed");
        }
    }
}

/// SORT or THREAD over more messages than this computes its order on the blocking pool
/// (below it, the hand-off costs more than the work: about 2 us a message).
const ORDER_INLINE_MAX_MESSAGES: usize = 500;

/// A FETCH that meets unknown content-transfer-encodings names at most this many of their
/// messages in its tagged `NO [UNKNOWN-CTE]` (the line stays short whatever the set).
const MAX_UNKNOWN_CTE_UIDS_NAMED: usize = 20;

/// Whether a search key looks at nothing of a message's bytes but its header.
fn header_only(key: &SearchKey<'_>) -> bool {
    match key {
        SearchKey::And(keys) => keys.as_ref().iter().all(header_only),
        SearchKey::Or(a, b) => header_only(a) && header_only(b),
        SearchKey::Not(a) => header_only(a),
        SearchKey::Body(_) | SearchKey::Text(_) | SearchKey::Larger(_) | SearchKey::Smaller(_) => {
            false
        }
        _ => true,
    }
}

/// The section text inside `BODY[...]` of a response.
fn section_spec(out: &mut Vec<u8>, section: &Section<'_>) {
    let part = |out: &mut Vec<u8>, part: &Part, dot: bool| {
        for (i, n) in part.0.as_ref().iter().enumerate() {
            if i > 0 {
                out.push(b'.');
            }
            let _ = write!(out, "{n}");
        }
        if dot {
            out.push(b'.');
        }
    };
    let names = |out: &mut Vec<u8>, names: &[AString<'_>]| {
        out.extend_from_slice(b" (");
        for (i, name) in names.iter().enumerate() {
            if i > 0 {
                out.push(b' ');
            }
            let bytes: &[u8] = name.as_ref();
            if !bytes.is_empty()
                && bytes
                    .iter()
                    .all(|&b| b.is_ascii_graphic() && !b"(){%*\"\\]".contains(&b))
            {
                out.extend_from_slice(bytes);
            } else {
                super::response::astring(out, bytes);
            }
        }
        out.push(b')');
    };
    match section {
        Section::Part(p) => part(out, p, false),
        Section::Header(p) => {
            if let Some(p) = p {
                part(out, p, true);
            }
            out.extend_from_slice(b"HEADER");
        }
        Section::HeaderFields(p, fields) => {
            if let Some(p) = p {
                part(out, p, true);
            }
            out.extend_from_slice(b"HEADER.FIELDS");
            names(out, fields.as_ref());
        }
        Section::HeaderFieldsNot(p, fields) => {
            if let Some(p) = p {
                part(out, p, true);
            }
            out.extend_from_slice(b"HEADER.FIELDS.NOT");
            names(out, fields.as_ref());
        }
        Section::Text(p) => {
            if let Some(p) = p {
                part(out, p, true);
            }
            out.extend_from_slice(b"TEXT");
        }
        Section::Mime(p) => {
            part(out, p, true);
            out.extend_from_slice(b"MIME");
        }
    }
}

/// Timing of SORT and THREAD's ordering work (what runs on the blocking pool) over
/// `KERMAIL_TIMING_MESSAGES` messages (1,000 by default) with headers like the IMAP
/// benchmark's. Prints the figures; asserts only the results.
/// `KERMAIL_TIMING_MESSAGES=10000 cargo test --release --lib imap::messages::order_timing -- --nocapture`
#[cfg(test)]
mod order_timing {
    use super::*;
    use crate::imap::sort::{SortCriterion, SortKey, ThreadAlgorithm};
    use std::time::Instant;

    fn header(i: usize) -> Arc<[u8]> {
        let reply = if i.is_multiple_of(3) {
            String::new()
        } else {
            format!("References: <m{}@example.org>\r\n", i - i % 3)
        };
        Arc::from(
            format!(
                "From: Sender {} <sender{}@example.org>\r\nTo: bench@bench.test\r\n\
                 Subject: {}Weekly report {} status\r\n\
                 Date: Mon, 2 Nov 2026 {:02}:{:02}:{:02} +0000\r\n\
                 Message-ID: <m{i}@example.org>\r\n{reply}\r\n",
                i % 37,
                i % 37,
                if reply.is_empty() { "" } else { "Re: " },
                i - i % 3,
                i / 3600 % 24,
                i / 60 % 60,
                i % 60
            )
            .into_bytes(),
        )
    }

    #[test]
    fn sort_and_thread_of_a_large_mailbox() {
        let count: usize = std::env::var("KERMAIL_TIMING_MESSAGES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000);
        let mut messages = MessageList::new();
        for i in 0..count {
            messages.push(crate::store::MessageMeta {
                uid: i as u32 + 1,
                blob: BlobId([0; 32]),
                size: 1_000 + (i % 17) as u32,
                internal_date: 1_704_189_600 + i as i64,
                internal_date_offset_min: 0,
                flags: Default::default(),
                modseq: 1,
                saved_at: 0,
            });
        }
        let found: Vec<usize> = (0..count).collect();
        let headers: Vec<Option<Arc<[u8]>>> = (0..count).map(|i| Some(header(i))).collect();
        let cases = [
            (
                "SORT (SUBJECT)",
                Ordering::Sort(vec![SortCriterion {
                    key: SortKey::Subject,
                    reverse: false,
                }]),
            ),
            (
                "SORT (REVERSE DATE)",
                Ordering::Sort(vec![SortCriterion {
                    key: SortKey::Date,
                    reverse: true,
                }]),
            ),
            (
                "SORT (FROM SIZE)",
                Ordering::Sort(vec![
                    SortCriterion {
                        key: SortKey::From,
                        reverse: false,
                    },
                    SortCriterion {
                        key: SortKey::Size,
                        reverse: false,
                    },
                ]),
            ),
            (
                "SORT (ARRIVAL)",
                Ordering::Sort(vec![SortCriterion {
                    key: SortKey::Arrival,
                    reverse: false,
                }]),
            ),
            (
                "THREAD REFERENCES",
                Ordering::Thread(ThreadAlgorithm::References),
            ),
            (
                "THREAD ORDEREDSUBJECT",
                Ordering::Thread(ThreadAlgorithm::OrderedSubject),
            ),
        ];
        for (name, ordering) in cases {
            // Keys parsed from the headers (the first SORT after SELECT), then the order from
            // the keys (any later SORT, the cold path after a change of the mailbox).
            let started = Instant::now();
            let keys: Vec<Arc<BlobKeys>> = headers
                .iter()
                .map(|header| {
                    let keys = Arc::new(BlobKeys::default());
                    keys.fill(&groups(&ordering), header.as_deref());
                    keys
                })
                .collect();
            let parsed = started.elapsed();
            let started = Instant::now();
            let response = order_response(&messages, &found, &keys, true, &ordering);
            let elapsed = started.elapsed();
            println!(
                "{count} messages: {name} keys {:.1} ms, order {:.2} ms ({} bytes)",
                parsed.as_secs_f64() * 1e3,
                elapsed.as_secs_f64() * 1e3,
                response.len()
            );
            let numbers = response
                .split(|b| !b.is_ascii_digit())
                .filter(|w| !w.is_empty())
                .count();
            assert_eq!(numbers, count, "{name}");
        }
    }
}
