//! Authenticated-state commands on mailboxes: SELECT/EXAMINE, CREATE, DELETE, RENAME,
//! SUBSCRIBE/UNSUBSCRIBE, LIST/LSUB, STATUS, APPEND; and the dispatch of the selected-state
//! commands (in `messages.rs`).

use std::io::Write;

use imap_codec::imap_types::command::CommandBody;
use imap_codec::imap_types::datetime::DateTime;
use imap_codec::imap_types::flag::Flag as ImapFlag;
use imap_codec::imap_types::mailbox::{ListMailbox, Mailbox};
use imap_codec::imap_types::status::StatusDataItemName;

use super::create_special_use::UseRequest;
use super::recent::{claim, RecentUids};
use super::response::{astring, flags_line, permanent_flags_line, store_error, tagged, untagged};
use super::selected::Selected;
use super::session::{mailbox_name, Session, State};
use std::sync::Arc;

use super::fetch::top_header;
use crate::store::{BlobId, Flag, FlagSet, MailboxInfo, Rights, SpecialUse};

/// The hierarchy separator of every mailbox name.
const SEPARATOR: u8 = b'/';

impl Session {
    pub(super) async fn authenticated_command(
        &mut self,
        tag: &str,
        body: CommandBody<'_>,
        out: &mut Vec<u8>,
    ) {
        let name_of = |mailbox: &Mailbox<'_>| mailbox_name(mailbox);
        match body {
            CommandBody::Select { mailbox } => {
                self.select(tag, name_of(&mailbox), false, out).await
            }
            CommandBody::Examine { mailbox } => {
                self.select(tag, name_of(&mailbox), true, out).await
            }
            CommandBody::Create { mailbox } => self.create(tag, name_of(&mailbox), out).await,
            CommandBody::Delete { mailbox } => self.delete(tag, name_of(&mailbox), out).await,
            CommandBody::Rename { from, to } => {
                self.rename(tag, name_of(&from), name_of(&to), out).await
            }
            CommandBody::Subscribe { mailbox } => {
                self.subscribe(tag, name_of(&mailbox), true, out).await
            }
            CommandBody::Unsubscribe { mailbox } => {
                self.subscribe(tag, name_of(&mailbox), false, out).await
            }
            CommandBody::List {
                reference,
                mailbox_wildcard,
            } => self.list(tag, &reference, &mailbox_wildcard, false, out),
            CommandBody::Lsub {
                reference,
                mailbox_wildcard,
            } => self.list(tag, &reference, &mailbox_wildcard, true, out),
            CommandBody::Status {
                mailbox,
                item_names,
            } => self.status(tag, name_of(&mailbox), &item_names, out),
            CommandBody::Append {
                mailbox,
                flags,
                date,
                message,
            } => {
                self.append(
                    tag,
                    name_of(&mailbox),
                    &flags,
                    date.as_ref(),
                    message.data(),
                    out,
                )
                .await
            }
            CommandBody::GetQuotaRoot { mailbox } => {
                self.get_quota_root(tag, name_of(&mailbox), out)
            }
            CommandBody::GetQuota { root } => self.get_quota(tag, root.as_ref(), out),
            CommandBody::SetQuota { .. } => self.set_quota(tag, out),
            body => self.selected_command(tag, body, out).await,
        }
    }

    async fn select(
        &mut self,
        tag: &str,
        name: Option<String>,
        read_only: bool,
        out: &mut Vec<u8>,
    ) {
        let Some(account) = self.account() else {
            return;
        };
        if matches!(self.state, State::Selected { .. }) {
            untagged(out, "OK [CLOSED] previous mailbox closed");
        }
        self.state = State::Authenticated { account };
        self.recent = RecentUids::default();
        // ACL: own mailboxes, or another account's with the r right (`acl.rs`).
        let Some((owner, view, _)) = self.accessible_mailbox(
            tag,
            account,
            name.as_deref(),
            Rights::READ,
            "NONEXISTENT",
            out,
        ) else {
            return;
        };
        let highest_modseq = view.highest_modseq;
        let listed_name = self.rev2.then(|| view.name.clone());
        let mut mailbox = Selected::open(view, read_only, owner);
        mailbox.condstore = self.condstore;
        mailbox.qresync = self.qresync;
        let last_uid = mailbox.last_uid();
        if self.rev2 {
            // IMAP4rev2 has no \Recent (RFC 9051 Appendix E).
        } else if read_only || owner != account {
            // EXAMINE shows the unclaimed messages as recent and leaves them unclaimed; so
            // does a SELECT of another account's mailbox (ACL: \Recent stays the owner's).
            let boundary = self.store.recent_boundary(owner, mailbox.id);
            self.recent.add((boundary.saturating_add(1), last_uid));
        } else if last_uid > 0 {
            if let Some(range) = claim(&self.store, owner, mailbox.id, last_uid).await {
                self.recent.add(range);
            }
        }
        let messages = &mailbox.messages;
        let first_unseen = messages
            .iter()
            .position(|message| !message.flags.contains(&Flag::Seen))
            .map(|i| i + 1);
        let keywords = self.store.mailbox_keywords(owner, mailbox.id);
        mailbox.announced_keywords = keywords.len();
        flags_line(out, &keywords);
        let _ = write!(out, "* {} EXISTS\r\n", mailbox.messages.len());
        if !self.rev2 {
            let recent = self.recent.count_in(&mailbox.messages);
            let _ = write!(out, "* {recent} RECENT\r\n");
        }
        match (first_unseen, &listed_name) {
            // IMAP4rev2 has no UNSEEN code and names the mailbox in a LIST (RFC 9051 6.3.2).
            (_, Some(name)) => {
                out.extend_from_slice(b"* LIST () \"/\" ");
                astring(out, name.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            (Some(seq), None) => {
                let _ = write!(out, "* OK [UNSEEN {seq}] first unseen message\r\n");
            }
            (None, None) => {}
        }
        permanent_flags_line(out, &keywords, read_only);
        let uidnext = self
            .store
            .mailbox_view(owner, mailbox.id)
            .map_or(mailbox.last_uid() + 1, |v| v.uidnext);
        let _ = write!(
            out,
            "* OK [UIDVALIDITY {}] UIDs valid\r\n* OK [UIDNEXT {}] predicted next UID\r\n",
            mailbox.uidvalidity, uidnext
        );
        let _ = write!(
            out,
            "* OK [MAILBOXID ({})] Ok\r\n",
            super::objectid::mailbox_id(mailbox.id, mailbox.uidvalidity)
        );
        // RFC 7162 3.1.2.1: every mailbox has modseqs, so every SELECT says HIGHESTMODSEQ.
        let _ = write!(
            out,
            "* OK [HIGHESTMODSEQ {highest_modseq}] highest modseq\r\n"
        );
        if let Some(qresync) = self.modifiers.qresync.take() {
            super::condstore::resync(
                out,
                &self.store,
                owner,
                &mailbox,
                uidnext,
                &qresync,
                &self.recent,
            );
        }
        let (code, verb) = if read_only {
            ("READ-ONLY", "EXAMINE completed")
        } else {
            ("READ-WRITE", "SELECT completed")
        };
        tagged(out, tag, "OK", Some(code), verb);
        self.headers
            .warm(&self.store, owner, mailbox.id, &mailbox.messages);
        self.state = State::Selected {
            account,
            mailbox: Box::new(mailbox),
        };
    }

    async fn create(&mut self, tag: &str, name: Option<String>, out: &mut Vec<u8>) {
        let (Some(account), Some(name)) = (self.account(), name) else {
            tagged(out, tag, "BAD", None, "invalid mailbox name");
            return;
        };
        if name.eq_ignore_ascii_case("INBOX") {
            tagged(out, tag, "NO", Some("ALREADYEXISTS"), "INBOX always exists");
            return;
        }
        if refuse_other_users(tag, &[&name], out) {
            return;
        }
        let special_use = match self.create_use.take() {
            None | Some(UseRequest::Nothing) => None,
            Some(UseRequest::Use(special_use)) => Some(special_use),
            Some(UseRequest::Unsupported) => {
                tagged(
                    out,
                    tag,
                    "NO",
                    Some("USEATTR"),
                    "one of \\Sent \\Drafts \\Trash \\Junk \\Archive",
                );
                return;
            }
        };
        match self.store.create_mailbox(account, &name, special_use).await {
            Ok(id) => {
                // OBJECTID (RFC 8474 4.1): the new mailbox's MAILBOXID.
                let code = self.store.mailbox_view(account, id).map(|view| {
                    format!(
                        "MAILBOXID ({})",
                        super::objectid::mailbox_id(view.id, view.uidvalidity)
                    )
                });
                tagged(out, tag, "OK", code.as_deref(), "CREATE completed")
            }
            Err(error) => no(out, tag, &error),
        }
    }

    async fn delete(&mut self, tag: &str, name: Option<String>, out: &mut Vec<u8>) {
        let (Some(account), Some(name)) = (self.account(), name) else {
            tagged(out, tag, "BAD", None, "invalid mailbox name");
            return;
        };
        if name == "INBOX" {
            tagged(out, tag, "NO", Some("CANNOT"), "INBOX cannot be deleted");
            return;
        }
        if refuse_other_users(tag, &[&name], out) {
            return;
        }
        match self.store.delete_mailbox(account, &name).await {
            Ok(()) => tagged(out, tag, "OK", None, "DELETE completed"),
            Err(error) => no(out, tag, &error),
        }
    }

    async fn rename(
        &mut self,
        tag: &str,
        from: Option<String>,
        to: Option<String>,
        out: &mut Vec<u8>,
    ) {
        let (Some(account), Some(from), Some(to)) = (self.account(), from, to) else {
            tagged(out, tag, "BAD", None, "invalid mailbox name");
            return;
        };
        if refuse_other_users(tag, &[&from, &to], out) {
            return;
        }
        match self.store.rename_mailbox(account, &from, &to).await {
            Ok(()) => tagged(out, tag, "OK", None, "RENAME completed"),
            Err(error) => no(out, tag, &error),
        }
    }

    async fn subscribe(&mut self, tag: &str, name: Option<String>, on: bool, out: &mut Vec<u8>) {
        let (Some(account), Some(name)) = (self.account(), name) else {
            tagged(out, tag, "BAD", None, "invalid mailbox name");
            return;
        };
        match self.store.set_subscribed(account, &name, on).await {
            Ok(()) => tagged(out, tag, "OK", None, "completed"),
            Err(error) => no(out, tag, &error),
        }
    }

    fn list(
        &mut self,
        tag: &str,
        reference: &Mailbox<'_>,
        wildcard: &ListMailbox<'_>,
        lsub: bool,
        out: &mut Vec<u8>,
    ) {
        let Some(account) = self.account() else {
            return;
        };
        let verb = if lsub { "LSUB" } else { "LIST" };
        let reference: Vec<u8> = match reference {
            Mailbox::Inbox => b"INBOX".to_vec(),
            Mailbox::Other(other) => other.inner().as_ref().to_vec(),
        };
        let wildcard: &[u8] = match wildcard {
            ListMailbox::Token(token) => token.as_ref(),
            ListMailbox::String(string) => string.as_ref(),
        };
        if wildcard.is_empty() && !lsub {
            let _ = write!(out, "* LIST (\\Noselect) \"/\" \"\"\r\n");
            tagged(out, tag, "OK", None, "LIST completed");
            return;
        }
        let mut pattern = reference;
        pattern.extend_from_slice(wildcard);
        if pattern.len() >= 5
            && pattern[..5].eq_ignore_ascii_case(b"INBOX")
            && (pattern.len() == 5 || pattern[5] == SEPARATOR)
        {
            pattern[..5].copy_from_slice(b"INBOX");
        }
        let mailboxes = self.store.list_mailboxes(account);
        let names: Vec<&str> = mailboxes.iter().map(|m| m.name.as_str()).collect();
        if lsub {
            for (name, attributes) in
                lsub_entries(&pattern, &self.store.subscriptions(account), &names)
            {
                let _ = write!(out, "* LSUB {attributes} \"/\" ");
                astring(out, name.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        } else {
            // Parents that are not mailboxes themselves are listed as \Noselect when a
            // pattern reaches them.
            let mut listed: Vec<(String, Option<&MailboxInfo>)> = Vec::new();
            for info in &mailboxes {
                listed.push((info.name.clone(), Some(info)));
                let mut end = 0;
                while let Some(offset) = info.name[end..].find('/') {
                    let parent = &info.name[..end + offset];
                    if !names.contains(&parent) && !listed.iter().any(|(n, _)| n == parent) {
                        listed.push((parent.to_owned(), None));
                    }
                    end += offset + 1;
                }
            }
            listed.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, info) in &listed {
                if !matches_pattern(&pattern, name.as_bytes()) {
                    continue;
                }
                let prefix = format!("{name}/");
                let has_children = names.iter().any(|n| n.starts_with(&prefix));
                let mut attributes: Vec<&str> = Vec::new();
                if info.is_none() {
                    // IMAP4rev2 says what it is: no mailbox (\NonExistent implies \Noselect).
                    attributes.push(if self.rev2 {
                        "\\NonExistent"
                    } else {
                        "\\Noselect"
                    });
                }
                attributes.push(if has_children {
                    "\\HasChildren"
                } else {
                    "\\HasNoChildren"
                });
                if let Some(special) = info.and_then(|i| i.special_use) {
                    attributes.push(match special {
                        SpecialUse::Sent => "\\Sent",
                        SpecialUse::Drafts => "\\Drafts",
                        SpecialUse::Trash => "\\Trash",
                        SpecialUse::Junk => "\\Junk",
                        SpecialUse::Archive => "\\Archive",
                    });
                }
                let _ = write!(out, "* LIST ({}) \"/\" ", attributes.join(" "));
                astring(out, name.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            self.list_shared(account, &pattern, out);
        }
        tagged(out, tag, "OK", None, &format!("{verb} completed"));
    }

    fn status(
        &mut self,
        tag: &str,
        name: Option<String>,
        items: &[StatusDataItemName],
        out: &mut Vec<u8>,
    ) {
        let Some(account) = self.account() else {
            return;
        };
        // ACL: STATUS needs the r right (RFC 4314 4).
        let Some((owner, view, _)) = self.accessible_mailbox(
            tag,
            account,
            name.as_deref(),
            Rights::READ,
            "NONEXISTENT",
            out,
        ) else {
            return;
        };
        if items.contains(&StatusDataItemName::HighestModSeq) {
            // A CONDSTORE enabling command (RFC 7162 3.1).
            self.enable_condstore(false);
        }
        let size = self.status_size.take();
        let mut values = self.status_values(owner, &view, items, size);
        if let Some(mailbox_id) = self.status_mailboxid.take() {
            if mailbox_id.only {
                values.clear();
            }
            values.push(format!(
                "MAILBOXID ({})",
                super::objectid::mailbox_id(view.id, view.uidvalidity)
            ));
        }
        out.extend_from_slice(b"* STATUS ");
        let shown = self.name_for_user(account, owner, &view.name);
        astring(out, shown.as_bytes());
        let _ = write!(out, " ({})\r\n", values.join(" "));
        tagged(out, tag, "OK", None, "STATUS completed");
    }

    /// The `* STATUS` values of `view` for `items` (and SIZE when asked for).
    pub(super) fn status_values(
        &mut self,
        account: crate::store::AccountId,
        view: &crate::store::MailboxView,
        items: &[StatusDataItemName],
        size: Option<super::status_size::StatusSize>,
    ) -> Vec<String> {
        let mut values: Vec<String> = Vec::new();
        for item in items {
            match item {
                StatusDataItemName::Messages => {
                    values.push(format!("MESSAGES {}", view.messages.len()))
                }
                StatusDataItemName::Recent => {
                    // The messages no session has claimed as \Recent yet.
                    let boundary = self.store.recent_boundary(account, view.id);
                    let unclaimed =
                        view.messages.len() - view.messages.partition_point(|m| m.uid <= boundary);
                    values.push(format!("RECENT {unclaimed}"))
                }
                StatusDataItemName::UidNext => values.push(format!("UIDNEXT {}", view.uidnext)),
                StatusDataItemName::UidValidity => {
                    values.push(format!("UIDVALIDITY {}", view.uidvalidity))
                }
                StatusDataItemName::Unseen => {
                    let unseen = view
                        .messages
                        .iter()
                        .filter(|m| !m.flags.contains(&Flag::Seen))
                        .count();
                    values.push(format!("UNSEEN {unseen}"))
                }
                StatusDataItemName::HighestModSeq => {
                    values.push(format!("HIGHESTMODSEQ {}", view.highest_modseq))
                }
                StatusDataItemName::Deleted => {
                    let deleted = view
                        .messages
                        .iter()
                        .filter(|m| m.flags.contains(&Flag::Deleted))
                        .count();
                    values.push(format!("DELETED {deleted}"))
                }
                _ => {}
            }
        }
        if let Some(size) = size {
            if size.only {
                values.clear();
            }
            let total: u64 = view.messages.iter().map(|m| u64::from(m.size)).sum();
            values.push(format!("SIZE {total}"));
        }
        values
    }

    async fn append(
        &mut self,
        tag: &str,
        name: Option<String>,
        flags: &[ImapFlag<'_>],
        date: Option<&DateTime>,
        message: &[u8],
        out: &mut Vec<u8>,
    ) {
        let Some(account) = self.account() else {
            return;
        };
        // A large literal arrived in a spill file (the command itself carries `{0+}`).
        let body: Vec<u8> = match self.spilled.take() {
            Some(file) => match read_spill(file).await {
                // As imap-codec refuses it in a literal held in memory (RFC 3516 4.4: only
                // literal8 may carry NULs; `multiappend::split` takes those).
                Ok(body) if body.contains(&0) => {
                    tagged(
                        out,
                        tag,
                        "BAD",
                        None,
                        "a literal holds a NUL; send it as literal8",
                    );
                    return;
                }
                Ok(body) => body,
                Err(error) => {
                    tracing::warn!(%error, "cannot read an APPEND spill file");
                    tagged(out, tag, "NO", Some("SERVERBUG"), "try again later");
                    return;
                }
            },
            None => message.to_vec(),
        };
        // ACL: APPEND needs the i right (RFC 4314 4).
        let Some((owner, view, _)) = self.accessible_mailbox(
            tag,
            account,
            name.as_deref(),
            Rights::INSERT,
            "TRYCREATE",
            out,
        ) else {
            return;
        };
        // Later header fetches and searches need not read the body back.
        let blob = BlobId(*blake3::hash(&body).as_bytes());
        let header: Arc<[u8]> = Arc::from(top_header(&body));
        let (internal_date, offset_min) = match date {
            Some(date) => {
                let date = date.as_ref();
                (
                    date.timestamp(),
                    (date.offset().local_minus_utc() / 60) as i16,
                )
            }
            None => (now_secs(), 0),
        };
        let flags = to_flag_set(flags);
        let target = view.id;
        // The view holds the mailbox's message list: let go of it before the store changes it.
        drop(view);
        let mut released = None;
        if let State::Selected { mailbox, .. } = &mut self.state {
            if mailbox.id == target {
                mailbox.refresh(&self.store, owner, true, &[], out);
                released = mailbox.release();
            }
        }
        let result = self
            .store
            .append(owner, target, flags, internal_date, offset_min, body)
            .await;
        if let State::Selected { mailbox, .. } = &mut self.state {
            if mailbox.id == target {
                match released {
                    Some(released) => mailbox.reacquire(released, &self.store, owner, out),
                    None => mailbox.refresh(&self.store, owner, true, &[], out),
                }
            }
        }
        match result {
            Ok((uidvalidity, uid)) => {
                self.headers.insert(blob, header);
                let code = format!("APPENDUID {uidvalidity} {uid}");
                tagged(out, tag, "OK", Some(&code), "APPEND completed");
            }
            Err(error) => no(out, tag, &error),
        }
    }
}

/// The bytes of a spilled APPEND literal (read off the runtime's worker threads).
pub(super) async fn read_spill(mut file: std::fs::File) -> std::io::Result<Vec<u8>> {
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Seek};
        file.seek(std::io::SeekFrom::Start(0))?;
        let mut body = Vec::new();
        file.read_to_end(&mut body)?;
        Ok(body)
    })
    .await
    .map_err(std::io::Error::other)?
}

/// `tag NO [code] text` for a store error.
/// ACL: mailboxes are not created, deleted or renamed in the other users namespace (answers
/// and says so when a name is in it).
fn refuse_other_users(tag: &str, names: &[&str], out: &mut Vec<u8>) -> bool {
    if names.iter().any(|name| super::acl::is_other_users(name)) {
        tagged(
            out,
            tag,
            "NO",
            Some("NOPERM"),
            "mailboxes under Other Users cannot be created, deleted or renamed",
        );
        return true;
    }
    false
}

pub(super) fn no(out: &mut Vec<u8>, tag: &str, error: &crate::store::StoreError) {
    let (code, text) = store_error(error);
    tagged(out, tag, "NO", Some(code), &text);
}

pub(super) fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Converts client flags; \Recent and unknown system flags are not storable and are dropped.
pub(super) fn to_flag_set(flags: &[ImapFlag<'_>]) -> FlagSet {
    flags
        .iter()
        .filter_map(|flag| match flag {
            ImapFlag::Seen => Some(Flag::Seen),
            ImapFlag::Answered => Some(Flag::Answered),
            ImapFlag::Flagged => Some(Flag::Flagged),
            ImapFlag::Deleted => Some(Flag::Deleted),
            ImapFlag::Draft => Some(Flag::Draft),
            ImapFlag::Keyword(atom) => Some(Flag::Keyword(atom.inner().to_owned())),
            ImapFlag::Extension(_) => None,
        })
        .collect()
}

/// The LSUB answer for `pattern`: each subscribed name it matches (`\Noselect` when no such
/// mailbox exists), and, as RFC 3501 6.3.9 asks, each unsubscribed parent of a subscribed name
/// that the pattern matches while the child itself is not matched (`LSUB "" %` with only
/// `a/b/c` subscribed gives `a`), flagged `\Noselect`. Sorted by name.
fn lsub_entries(
    pattern: &[u8],
    subscriptions: &[String],
    existing: &[&str],
) -> Vec<(String, &'static str)> {
    let subscribed: std::collections::BTreeSet<&str> =
        subscriptions.iter().map(String::as_str).collect();
    let existing: std::collections::BTreeSet<&str> = existing.iter().copied().collect();
    let mut entries: std::collections::BTreeMap<String, &'static str> =
        std::collections::BTreeMap::new();
    for name in subscriptions {
        if matches_pattern(pattern, name.as_bytes()) {
            let exists = existing.contains(name.as_str());
            entries.insert(name.clone(), if exists { "()" } else { "(\\Noselect)" });
            continue;
        }
        let mut end = 0;
        while let Some(offset) = name[end..].find('/') {
            let parent = &name[..end + offset];
            end += offset + 1;
            if subscribed.contains(parent) || entries.contains_key(parent) {
                continue;
            }
            if matches_pattern(pattern, parent.as_bytes()) {
                entries.entry(parent.to_owned()).or_insert("(\\Noselect)");
            }
        }
    }
    entries.into_iter().collect()
}

/// LIST pattern matching: `*` matches anything, `%` anything but the separator.
///
/// Dynamic programming over (pattern byte, name position), O(pattern × name) with no
/// backtracking. Runs of wildcards collapse first (`*%*` is `*`, `%%` is `%`), so the pattern
/// is at most twice its literal bytes long, and a pattern with more literal bytes than the
/// longest mailbox name matches nothing: the cost per name is bounded whatever the client sends.
pub(super) fn matches_pattern(pattern: &[u8], name: &[u8]) -> bool {
    let mut compact: Vec<u8> = Vec::with_capacity(pattern.len().min(1024));
    let mut literal_bytes = 0usize;
    for &b in pattern {
        match (b, compact.last().copied()) {
            (b'*', Some(b'*')) | (b'%', Some(b'*')) | (b'%', Some(b'%')) => {}
            (b'*', Some(b'%')) => {
                compact.pop();
                // A `%` run before this `*` may itself follow a `*`.
                if compact.last() != Some(&b'*') {
                    compact.push(b'*');
                }
            }
            (b'*' | b'%', _) => compact.push(b),
            _ => {
                literal_bytes += 1;
                if literal_bytes > name.len() {
                    return false;
                }
                compact.push(b);
            }
        }
    }
    // reach[j]: the pattern so far matches name[..j].
    let mut reach = vec![false; name.len() + 1];
    reach[0] = true;
    let mut next = vec![false; name.len() + 1];
    for &p in &compact {
        match p {
            b'*' => {
                let mut any = false;
                for j in 0..=name.len() {
                    any |= reach[j];
                    next[j] = any;
                }
            }
            b'%' => {
                let mut run = false;
                for j in 0..=name.len() {
                    if j > 0 && name[j - 1] == SEPARATOR {
                        run = false;
                    }
                    run |= reach[j];
                    next[j] = run;
                }
            }
            c => {
                next[0] = false;
                for j in 1..=name.len() {
                    next[j] = reach[j - 1] && name[j - 1] == c;
                }
            }
        }
        std::mem::swap(&mut reach, &mut next);
        if !reach.contains(&true) {
            return false;
        }
    }
    reach[name.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The obvious backtracking definition (exponential, fine for tiny inputs).
    fn reference(pattern: &[u8], name: &[u8]) -> bool {
        match pattern.split_first() {
            None => name.is_empty(),
            Some((b'*', rest)) => (0..=name.len()).any(|i| reference(rest, &name[i..])),
            Some((b'%', rest)) => {
                let limit = name
                    .iter()
                    .position(|&b| b == SEPARATOR)
                    .unwrap_or(name.len());
                (0..=limit).any(|i| reference(rest, &name[i..]))
            }
            Some((&c, rest)) => name.first() == Some(&c) && reference(rest, &name[1..]),
        }
    }

    proptest! {
        #[test]
        fn matching_agrees_with_the_reference(
            pattern in proptest::collection::vec(prop_oneof![Just(b'*'), Just(b'%'), Just(b'/'), Just(b'a'), Just(b'b')], 0..10),
            name in proptest::collection::vec(prop_oneof![Just(b'/'), Just(b'a'), Just(b'b')], 0..10),
        ) {
            prop_assert_eq!(matches_pattern(&pattern, &name), reference(&pattern, &name));
        }
    }

    #[test]
    fn pathological_patterns_are_fast() {
        let name = [b'a'; 255];
        let start = std::time::Instant::now();
        for pattern in [
            &b"********b"[..],
            b"%%%%%%%%b",
            b"*%*%*%*%*%*%*%b",
            &[b'*'; 60000],
        ] {
            assert!(!matches_pattern(pattern, &name) || pattern.iter().all(|&b| b == b'*'));
        }
        let mut long = b"*a".repeat(300);
        long.push(b'b');
        assert!(!matches_pattern(&long, &name));
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
        assert!(matches_pattern(b"INBOX/%", b"INBOX/x"));
        assert!(!matches_pattern(b"INBOX/%", b"INBOX/x/y"));
        assert!(matches_pattern(b"%/*", b"a/b/c"));
    }
}
