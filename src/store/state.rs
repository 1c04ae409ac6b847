//! The in-memory mail state and the pure `apply` function.
//!
//! Only BTreeMap/BTreeSet are used so that every iteration order is the same on every replica.
//! `apply` reads no clock and no RNG: times, hashes and bodies come inside the command. A
//! refused command leaves the state exactly as it was: every handler checks everything first
//! and only then mutates.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::command::{ApplyError, BodyV1, CommandV1, Response, UidRange, MAX_MESSAGE_BYTES};
use super::imap_state::ImapState;
use super::names::{
    ancestors, check_keyword, domain_of, normalize_address, normalize_domain,
    normalize_mailbox_name, INBOX, SEPARATOR,
};
use super::queue::Outbound;
use super::quota::{Quotas, Usage};
use super::sieve_state::SieveState;
use super::snapshot_chunks::ChunkStamps;
use super::{
    AccountId, BlobId, Flag, FlagOp, FlagSet, MailboxChanged, MailboxId, MessageList, MessageMeta,
    SpecialUse, StoreStats, Uid,
};

/// The mailboxes every new account gets.
pub const INITIAL_MAILBOXES: [(&str, Option<SpecialUse>); 6] = [
    (INBOX, None),
    ("Sent", Some(SpecialUse::Sent)),
    ("Drafts", Some(SpecialUse::Drafts)),
    ("Trash", Some(SpecialUse::Trash)),
    ("Junk", Some(SpecialUse::Junk)),
    ("Archive", Some(SpecialUse::Archive)),
];
/// Mailboxes per account: LIST answers and snapshot entries stay bounded.
pub const MAX_MAILBOXES_PER_ACCOUNT: usize = 10_000;
/// Subscribed names per account (they may name mailboxes that do not exist).
pub const MAX_SUBSCRIPTIONS_PER_ACCOUNT: usize = 10_000;
/// Distinct keywords per mailbox (PERMANENTFLAGS lists them all).
pub const MAX_KEYWORDS_PER_MAILBOX: usize = 256;
/// Targets of one alias.
pub const MAX_ALIAS_TARGETS: usize = 1_000;
/// Alias chains longer than this are not followed (and loops stop at the first repeat).
pub const MAX_ALIAS_DEPTH: usize = 8;
/// Envelope recipients of one delivery command.
pub const MAX_RECIPIENTS_PER_DELIVERY: usize = 1_000;
/// A password hash (PHC string); argon2id's is about 100 bytes.
pub const MAX_PASSWORD_HASH_LEN: usize = 512;

/// Reference count and sizes of one stored body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    /// Message entries (over all mailboxes and accounts) that point to this body.
    pub refs: u64,
    pub raw_size: u32,
    /// Bytes of the compressed file.
    pub stored_size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mailbox {
    pub id: MailboxId,
    pub name: String,
    pub special_use: Option<SpecialUse>,
    pub uidvalidity: u32,
    pub uidnext: Uid,
    /// Sorted by UID, strictly increasing. Shared with readers' views (a persistent vector:
    /// a write copies O(log n), never the list).
    pub messages: MessageList,
    pub change_counter: u64,
    /// Lowercased keyword -> the first spelling seen in this mailbox.
    pub keywords: BTreeMap<String, String>,
    /// Which UID ranges of `messages` changed when: local bookkeeping for incremental
    /// snapshots (`snapshot_chunks.rs`), no part of the replicated state. Every change to
    /// `messages` touches the ranges of the UIDs it added, removed or changed.
    #[serde(skip)]
    pub chunk_stamps: ChunkStamps,
}

impl Mailbox {
    fn new(id: MailboxId, name: String, special_use: Option<SpecialUse>, uidvalidity: u32) -> Self {
        Mailbox {
            id,
            name,
            special_use,
            uidvalidity,
            uidnext: 1,
            messages: MessageList::new(),
            change_counter: 0,
            keywords: BTreeMap::new(),
            chunk_stamps: ChunkStamps::default(),
        }
    }

    /// Indices into `messages` of the UIDs in `ranges` (normalized: sorted, disjoint), ascending.
    fn indices_in(&self, ranges: &[UidRange]) -> Vec<usize> {
        let mut indices = Vec::new();
        for &(start, end) in ranges {
            let low = self.messages.partition_point(|m| m.uid < start);
            let high = self.messages.partition_point(|m| m.uid <= end);
            indices.extend(low..high);
        }
        indices
    }

    /// Gives the flags with every keyword in this mailbox's first spelling, and the keywords
    /// this mailbox has not seen yet.
    pub(super) fn canonical_flags(
        &self,
        flags: &FlagSet,
    ) -> Result<(FlagSet, Vec<String>), ApplyError> {
        let mut canonical = FlagSet::new();
        let mut new_keywords = Vec::new();
        for flag in flags {
            match flag {
                Flag::Keyword(keyword) => {
                    check_keyword(keyword)?;
                    let lower = keyword.to_ascii_lowercase();
                    match self.keywords.get(&lower) {
                        Some(spelling) => {
                            canonical.insert(Flag::Keyword(spelling.clone()));
                        }
                        None => {
                            if !new_keywords
                                .iter()
                                .any(|k: &String| k.to_ascii_lowercase() == lower)
                            {
                                new_keywords.push(keyword.clone());
                                canonical.insert(Flag::Keyword(keyword.clone()));
                            }
                        }
                    }
                }
                other => {
                    canonical.insert(other.clone());
                }
            }
        }
        if self.keywords.len() + new_keywords.len() > MAX_KEYWORDS_PER_MAILBOX {
            return Err(ApplyError::Invalid(format!(
                "a mailbox holds at most {MAX_KEYWORDS_PER_MAILBOX} distinct keywords"
            )));
        }
        Ok((canonical, new_keywords))
    }

    pub(super) fn remember_keywords(&mut self, new_keywords: Vec<String>) {
        for keyword in new_keywords {
            self.keywords
                .entry(keyword.to_ascii_lowercase())
                .or_insert(keyword);
        }
    }

    pub(super) fn has_room_for(&self, count: usize) -> Result<(), ApplyError> {
        let count = u64::try_from(count).unwrap_or(u64::MAX);
        if u64::from(self.uidnext).saturating_add(count) > u64::from(u32::MAX) {
            return Err(ApplyError::Invalid(format!(
                "mailbox {:?} has used up its UIDs: rename it and create a new one",
                self.name
            )));
        }
        Ok(())
    }

    pub(super) fn touch(&mut self, account: AccountId, effects: &mut Effects) {
        self.change_counter += 1;
        effects.changed.push(MailboxChanged {
            account,
            mailbox: self.id,
        });
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub id: AccountId,
    pub address: String,
    /// argon2id PHC string.
    pub password_hash: String,
    pub mailboxes: BTreeMap<MailboxId, Mailbox>,
    /// Mailbox name -> id.
    pub names: BTreeMap<String, MailboxId>,
    pub subscriptions: BTreeSet<String>,
}

impl Account {
    pub(super) fn mailbox(&self, id: MailboxId) -> Result<&Mailbox, ApplyError> {
        self.mailboxes
            .get(&id)
            .ok_or_else(|| ApplyError::NotFound("mailbox".into()))
    }

    pub(super) fn mailbox_mut(&mut self, id: MailboxId) -> Result<&mut Mailbox, ApplyError> {
        self.mailboxes
            .get_mut(&id)
            .ok_or_else(|| ApplyError::NotFound("mailbox".into()))
    }

    pub fn mailbox_by_name(&self, name: &str) -> Option<&Mailbox> {
        self.names.get(name).and_then(|id| self.mailboxes.get(id))
    }

    pub fn inbox_id(&self) -> Option<MailboxId> {
        self.names.get(INBOX).copied()
    }
}

/// The whole replicated mail state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub domains: BTreeSet<String>,
    pub accounts: BTreeMap<AccountId, Account>,
    /// Lowercase address -> account.
    pub account_ids: BTreeMap<String, AccountId>,
    /// Source address -> targets (local or foreign).
    pub aliases: BTreeMap<String, BTreeSet<String>>,
    pub next_account_id: AccountId,
    pub next_mailbox_id: MailboxId,
    /// The greatest UIDVALIDITY ever given to any mailbox: a new one is always greater, so a
    /// deleted and recreated mailbox (or account) never reuses one.
    pub uidvalidity_high: u32,
    /// Derived from the messages (not serialized; rebuilt by [`State::rebuild_blobs`]).
    #[serde(skip)]
    pub blobs: BTreeMap<BlobId, BlobInfo>,
    #[serde(skip)]
    pub totals: Totals,
    /// The outbound queue and the DKIM keys. Carried by the snapshot as a field of its own
    /// (`SnapshotMeta::V2`), so that snapshots written before the queue existed still load.
    #[serde(skip)]
    pub outbound: Outbound,
    /// Quota settings and usage (`quota.rs`); carried by the snapshot as a field of its own
    /// (`SnapshotMeta::V3`).
    #[serde(skip)]
    pub quotas: Quotas,
    /// The backup key and lease (`backup_state.rs`); carried by the snapshot as a field of its
    /// own (`SnapshotMeta::V4`).
    #[serde(skip)]
    pub backup: super::backup_state::BackupState,
    /// Sieve scripts, vacation records and greylisting (`sieve_state.rs`); carried by the
    /// snapshot as a field of its own (`SnapshotMeta::V5`).
    #[serde(skip)]
    pub sieve: SieveState,
    /// Replicated IMAP state (`\Recent` boundaries, `imap_state.rs`); carried by the snapshot
    /// as a field of its own (`SnapshotMeta::V4`).
    #[serde(skip)]
    pub imap: ImapState,
    /// The Bayes classifier's token counts (`bayes.rs`); carried by the snapshot as a
    /// section of its own (`bayes`; absent: empty).
    #[serde(skip)]
    pub bayes: super::bayes::BayesState,
    /// ACL: access control lists (RFC 4314, `acl_state.rs`); carried by the snapshot as a
    /// section of its own (`acl`; absent: no ACLs).
    #[serde(skip)]
    pub acl: super::acl_state::AclState,
    /// The save time of the `CommandV11::Saved` being applied (`savedate_state.rs`); `None`
    /// between commands. Apply's input, not state: never serialized, reset after each command.
    #[serde(skip)]
    pub saved_clock: Option<u32>,
}

/// Running sums over `blobs`, so that stats stay O(1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub refs: u64,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
}

impl Default for State {
    fn default() -> Self {
        State {
            domains: BTreeSet::new(),
            accounts: BTreeMap::new(),
            account_ids: BTreeMap::new(),
            aliases: BTreeMap::new(),
            next_account_id: 1,
            next_mailbox_id: 1,
            uidvalidity_high: 0,
            blobs: BTreeMap::new(),
            totals: Totals::default(),
            outbound: Outbound::default(),
            quotas: Quotas::default(),
            backup: Default::default(),
            sieve: SieveState::default(),
            imap: ImapState::default(),
            bayes: Default::default(),
            acl: Default::default(),
            saved_clock: None,
        }
    }
}

/// What applying a command did besides its response: which mailboxes changed, which bodies
/// lost their last reference (their files can go).
#[derive(Debug, Default)]
pub struct Effects {
    pub changed: Vec<MailboxChanged>,
    pub released: Vec<BlobId>,
    /// Accounts whose mailbox names or subscriptions changed (create, delete, rename,
    /// subscribe, unsubscribe).
    pub listings: Vec<AccountId>,
}

pub struct Outcome {
    pub response: Response,
    pub effects: Effects,
}

/// Sorts and merges ranges, dropping empty ones, so that each UID is visited once.
pub fn normalize_ranges(mut ranges: Vec<UidRange>) -> Vec<UidRange> {
    ranges.retain(|&(start, end)| start <= end);
    ranges.sort_unstable();
    let mut merged: Vec<UidRange> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some((_, last_end)) if start <= last_end.saturating_add(1) => {
                *last_end = (*last_end).max(end);
            }
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// The largest time taken as a UIDVALIDITY floor (early 2096): a proposer with a clock far in
/// the future must not use up the u32 space, which would stop mailbox creation for good; above
/// this, values just count up from the last one.
pub const UIDVALIDITY_TIME_MAX: u32 = u32::MAX - (1 << 28);

fn uidvalidity_floor(now: i64) -> u32 {
    u32::try_from(now.clamp(1, i64::from(UIDVALIDITY_TIME_MAX))).unwrap_or(UIDVALIDITY_TIME_MAX)
}

impl State {
    // ----- reads used by the store -----

    pub fn account_by_address(&self, address: &str) -> Option<&Account> {
        self.account_ids
            .get(address)
            .and_then(|id| self.accounts.get(id))
    }

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            domains: self.domains.len() as u64,
            accounts: self.accounts.len() as u64,
            aliases: self.aliases.values().map(|t| t.len() as u64).sum(),
            // Every queue entry holds one reference too.
            messages: self
                .totals
                .refs
                .saturating_sub(self.outbound.queue.len() as u64),
            blobs: self.blobs.len() as u64,
            blob_bytes_raw: self.totals.raw_bytes,
            blob_bytes_stored: self.totals.stored_bytes,
        }
    }

    /// Local accounts that receive a message sent to `address` (already normalized): the
    /// account of that address if any, plus the expansion of its alias if any. Foreign targets
    /// are ignored (forwarding is a later feature).
    pub fn expand_recipient(
        &self,
        address: &str,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<AccountId>,
        out_set: &mut BTreeSet<AccountId>,
    ) {
        self.expand(address, 0, seen, out, out_set);
    }

    fn expand(
        &self,
        address: &str,
        depth: usize,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<AccountId>,
        out_set: &mut BTreeSet<AccountId>,
    ) {
        if !seen.insert(address.to_string()) {
            return;
        }
        if let Some(&id) = self.account_ids.get(address) {
            if out_set.insert(id) {
                out.push(id);
            }
        }
        if depth >= MAX_ALIAS_DEPTH {
            return;
        }
        if let Some(targets) = self.aliases.get(address) {
            for target in targets {
                self.expand(target, depth + 1, seen, out, out_set);
            }
        }
    }

    // ----- derived data -----

    /// A copy for a snapshot build, taken under the read lock: message lists are shared
    /// (persistent vectors), and the blob table, derivable from them, is left out.
    pub fn capture(&self) -> State {
        State {
            domains: self.domains.clone(),
            accounts: self.accounts.clone(),
            account_ids: self.account_ids.clone(),
            aliases: self.aliases.clone(),
            next_account_id: self.next_account_id,
            next_mailbox_id: self.next_mailbox_id,
            uidvalidity_high: self.uidvalidity_high,
            blobs: BTreeMap::new(),
            totals: Totals::default(),
            outbound: self.outbound.clone(),
            quotas: self.quotas.clone(),
            backup: self.backup.clone(),
            sieve: self.sieve.clone(),
            imap: self.imap.clone(),
            bayes: self.bayes.clone(),
            acl: self.acl.clone(),
            saved_clock: None,
        }
    }

    /// The state without its message lists (the snapshot's state section: the lists are
    /// chunks of their own). Costs the accounts and mailboxes, not the messages.
    pub fn without_messages(&self) -> State {
        let mut state = State {
            domains: self.domains.clone(),
            accounts: self.accounts.clone(),
            account_ids: self.account_ids.clone(),
            aliases: self.aliases.clone(),
            next_account_id: self.next_account_id,
            next_mailbox_id: self.next_mailbox_id,
            uidvalidity_high: self.uidvalidity_high,
            ..State::default()
        };
        for account in state.accounts.values_mut() {
            for mailbox in account.mailboxes.values_mut() {
                mailbox.messages = MessageList::new();
            }
        }
        state
    }

    /// Every body some message references, ascending.
    pub fn referenced_blobs(&self) -> BTreeSet<BlobId> {
        let mut referenced = BTreeSet::new();
        for account in self.accounts.values() {
            for mailbox in account.mailboxes.values() {
                referenced.extend(mailbox.messages.iter().map(|m| m.blob));
            }
        }
        referenced.extend(self.outbound.queue.values().map(|entry| entry.blob));
        referenced
    }

    /// Rebuilds the blob table from the messages; `stored_size` gives each body's file size.
    pub fn rebuild_blobs(&mut self, stored_size: impl Fn(&BlobId) -> u64) {
        let mut blobs: BTreeMap<BlobId, BlobInfo> = BTreeMap::new();
        for account in self.accounts.values() {
            for mailbox in account.mailboxes.values() {
                for message in mailbox.messages.iter() {
                    blobs
                        .entry(message.blob)
                        .and_modify(|info| info.refs += 1)
                        .or_insert(BlobInfo {
                            refs: 1,
                            raw_size: message.size,
                            stored_size: stored_size(&message.blob),
                        });
                }
            }
        }
        for entry in self.outbound.queue.values() {
            blobs
                .entry(entry.blob)
                .and_modify(|info| info.refs += 1)
                .or_insert(BlobInfo {
                    refs: 1,
                    raw_size: entry.raw_size,
                    stored_size: stored_size(&entry.blob),
                });
        }
        let mut totals = Totals::default();
        for info in blobs.values() {
            totals.refs += info.refs;
            totals.raw_bytes += u64::from(info.raw_size);
            totals.stored_bytes += info.stored_size;
        }
        self.blobs = blobs;
        self.totals = totals;
        self.rebuild_usage();
    }

    /// Checks the structural invariants (used on restore, where the input is untrusted, and by
    /// tests after every step).
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut mailbox_ids = BTreeSet::new();
        if self.account_ids.len() != self.accounts.len() {
            return Err("address index does not match the accounts".into());
        }
        for (address, id) in &self.account_ids {
            match self.accounts.get(id) {
                Some(account) if &account.address == address => {}
                _ => return Err(format!("address index entry {address} is wrong")),
            }
        }
        for (&id, account) in &self.accounts {
            if account.id != id || id >= self.next_account_id {
                return Err(format!("account {id} has a bad id"));
            }
            if account.inbox_id().is_none() {
                return Err(format!("account {id} has no INBOX"));
            }
            if account.names.len() != account.mailboxes.len() {
                return Err(format!("account {id}: mailbox names do not match"));
            }
            for (name, mailbox_id) in &account.names {
                match account.mailboxes.get(mailbox_id) {
                    Some(mailbox) if &mailbox.name == name => {}
                    _ => return Err(format!("account {id}: name {name:?} is wrong")),
                }
            }
            for (&mailbox_id, mailbox) in &account.mailboxes {
                if mailbox.id != mailbox_id
                    || mailbox_id >= self.next_mailbox_id
                    || !mailbox_ids.insert(mailbox_id)
                {
                    return Err(format!("mailbox {mailbox_id} has a bad id"));
                }
                if mailbox.uidvalidity == 0 || mailbox.uidvalidity > self.uidvalidity_high {
                    return Err(format!("mailbox {mailbox_id} has a bad uidvalidity"));
                }
                let mut previous: Uid = 0;
                for message in mailbox.messages.iter() {
                    if message.uid <= previous || message.uid >= mailbox.uidnext {
                        return Err(format!("mailbox {mailbox_id}: uids out of order"));
                    }
                    previous = message.uid;
                }
            }
        }
        self.check_outbound_invariants()
    }

    // ----- blob references -----

    pub(super) fn add_ref(&mut self, blob: BlobId, raw_size: u32, stored_size: u64) {
        let info = self.blobs.entry(blob).or_insert_with(|| {
            self.totals.raw_bytes += u64::from(raw_size);
            self.totals.stored_bytes += stored_size;
            BlobInfo {
                refs: 0,
                raw_size,
                stored_size,
            }
        });
        info.refs += 1;
        self.totals.refs += 1;
    }

    pub(super) fn drop_ref(&mut self, blob: BlobId, effects: &mut Effects) {
        if let Some(info) = self.blobs.get_mut(&blob) {
            info.refs -= 1;
            self.totals.refs -= 1;
            if info.refs == 0 {
                let info = *info;
                self.blobs.remove(&blob);
                self.totals.raw_bytes -= u64::from(info.raw_size);
                self.totals.stored_bytes -= info.stored_size;
                effects.released.push(blob);
            }
        }
    }

    fn drop_mailbox_refs(&mut self, messages: &MessageList, effects: &mut Effects) {
        for message in messages {
            self.drop_ref(message.blob, effects);
        }
    }

    // ----- apply -----

    /// Applies one command. Pure: the same state and command give the same result everywhere.
    pub fn apply(&mut self, command: CommandV1) -> Outcome {
        let mut effects = Effects::default();
        let carried_body = match &command {
            CommandV1::Deliver { body, .. } | CommandV1::Append { body, .. } => Some(body.blob),
            _ => None,
        };
        // NOTIFY (RFC 5465): sessions watching this account's mailbox names or subscriptions
        // learn of the change through `Effects::listings`.
        let listing_account = match &command {
            CommandV1::CreateMailbox { account, .. }
            | CommandV1::DeleteMailbox { account, .. }
            | CommandV1::RenameMailbox { account, .. }
            | CommandV1::SetSubscribed { account, .. } => Some(*account),
            _ => None,
        };
        let result = match command {
            CommandV1::AddDomain { domain } => self.add_domain(&domain),
            CommandV1::RemoveDomain { domain } => self.remove_domain(&domain),
            CommandV1::AddAccount {
                address,
                password_hash,
                now,
            } => self.add_account(&address, password_hash, now),
            CommandV1::SetPassword {
                address,
                password_hash,
            } => self.set_password(&address, password_hash),
            CommandV1::RemoveAccount { address } => self.remove_account(&address, &mut effects),
            CommandV1::AddAlias { source, target } => self.add_alias(&source, &target),
            CommandV1::RemoveAlias { source, target } => self.remove_alias(&source, &target),
            CommandV1::Deliver {
                mail_from: _,
                recipients,
                received_at,
                body,
            } => self.deliver(&recipients, received_at, &body, &mut effects),
            CommandV1::CreateMailbox {
                account,
                name,
                special_use,
                now,
            } => self.create_mailbox(account, &name, special_use, now),
            CommandV1::DeleteMailbox { account, name } => {
                self.delete_mailbox(account, &name, &mut effects)
            }
            CommandV1::RenameMailbox {
                account,
                from,
                to,
                now,
            } => self.rename_mailbox(account, &from, &to, now, &mut effects),
            CommandV1::SetSubscribed {
                account,
                name,
                subscribed,
            } => self.set_subscribed(account, &name, subscribed),
            CommandV1::Append {
                account,
                mailbox,
                flags,
                internal_date,
                internal_date_offset_min,
                body,
            } => self.append(
                account,
                mailbox,
                &flags,
                internal_date,
                internal_date_offset_min,
                &body,
                &mut effects,
            ),
            CommandV1::StoreFlags {
                account,
                mailbox,
                uids,
                op,
                flags,
            } => self.store_flags(account, mailbox, uids, op, &flags, &mut effects),
            CommandV1::Expunge {
                account,
                mailbox,
                uids,
            } => self.expunge(account, mailbox, uids, &mut effects),
            CommandV1::Copy {
                account,
                from,
                uids,
                to,
                remove_source,
            } => self.copy(account, from, uids, to, remove_source, &mut effects),
        };
        let response = match result {
            Ok(response) => {
                effects.listings.extend(listing_account);
                response
            }
            Err(error) => {
                // Nothing was changed; a body that arrived with the refused command and that no
                // message references may be removed again.
                effects = Effects::default();
                if let Some(blob) = carried_body {
                    if !self.blobs.contains_key(&blob) {
                        effects.released.push(blob);
                    }
                }
                Response::Refused(error)
            }
        };
        Outcome { response, effects }
    }

    pub(super) fn account(&self, id: AccountId) -> Result<&Account, ApplyError> {
        self.accounts
            .get(&id)
            .ok_or_else(|| ApplyError::NotFound("account".into()))
    }

    pub(super) fn account_mut(&mut self, id: AccountId) -> Result<&mut Account, ApplyError> {
        self.accounts
            .get_mut(&id)
            .ok_or_else(|| ApplyError::NotFound("account".into()))
    }

    /// The next `count` UIDVALIDITY values, each from the command's time but strictly greater
    /// than any given before.
    fn next_uidvalidities(&self, now: i64, count: usize) -> Result<Vec<u32>, ApplyError> {
        let mut values = Vec::with_capacity(count);
        let mut high = self.uidvalidity_high;
        for _ in 0..count {
            let next = high
                .checked_add(1)
                .ok_or_else(|| ApplyError::Invalid("UIDVALIDITY values are used up".into()))?
                .max(uidvalidity_floor(now));
            values.push(next);
            high = next;
        }
        Ok(values)
    }

    fn add_domain(&mut self, domain: &str) -> Result<Response, ApplyError> {
        let domain = normalize_domain(domain)?;
        if self.domains.contains(&domain) {
            return Err(ApplyError::AlreadyExists(format!("domain {domain}")));
        }
        self.domains.insert(domain);
        Ok(Response::Done)
    }

    fn remove_domain(&mut self, domain: &str) -> Result<Response, ApplyError> {
        let domain = normalize_domain(domain)?;
        if !self.domains.contains(&domain) {
            return Err(ApplyError::NotFound(format!("domain {domain}")));
        }
        if self.account_ids.keys().any(|a| domain_of(a) == domain) {
            return Err(ApplyError::Invalid(format!(
                "domain {domain} still has accounts: remove them first"
            )));
        }
        if self.aliases.keys().any(|a| domain_of(a) == domain) {
            return Err(ApplyError::Invalid(format!(
                "domain {domain} still has aliases: remove them first"
            )));
        }
        self.domains.remove(&domain);
        Ok(Response::Done)
    }

    fn check_password_hash(hash: &str) -> Result<(), ApplyError> {
        if !hash.starts_with("$argon2id$") || hash.len() > MAX_PASSWORD_HASH_LEN {
            return Err(ApplyError::Invalid("password hash is not argon2id".into()));
        }
        Ok(())
    }

    fn add_account(
        &mut self,
        address: &str,
        password_hash: String,
        now: i64,
    ) -> Result<Response, ApplyError> {
        let address = normalize_address(address)?;
        let domain = domain_of(&address);
        if !self.domains.contains(domain) {
            return Err(ApplyError::NotFound(format!("domain {domain}")));
        }
        if self.account_ids.contains_key(&address) {
            return Err(ApplyError::AlreadyExists(format!("account {address}")));
        }
        Self::check_password_hash(&password_hash)?;
        let uidvalidities = self.next_uidvalidities(now, INITIAL_MAILBOXES.len())?;
        let id = self.next_account_id;
        let mut account = Account {
            id,
            address: address.clone(),
            password_hash,
            mailboxes: BTreeMap::new(),
            names: BTreeMap::new(),
            subscriptions: BTreeSet::new(),
        };
        for ((name, special_use), uidvalidity) in INITIAL_MAILBOXES.iter().zip(uidvalidities) {
            let mailbox_id = self.next_mailbox_id;
            self.next_mailbox_id += 1;
            self.uidvalidity_high = uidvalidity;
            account.names.insert(name.to_string(), mailbox_id);
            account.subscriptions.insert(name.to_string());
            account.mailboxes.insert(
                mailbox_id,
                Mailbox::new(mailbox_id, name.to_string(), *special_use, uidvalidity),
            );
        }
        self.next_account_id += 1;
        self.accounts.insert(id, account);
        self.account_ids.insert(address, id);
        Ok(Response::Account(id))
    }

    fn set_password(
        &mut self,
        address: &str,
        password_hash: String,
    ) -> Result<Response, ApplyError> {
        let address = normalize_address(address)?;
        Self::check_password_hash(&password_hash)?;
        let id = self.account_id_of(&address)?;
        self.account_mut(id)?.password_hash = password_hash;
        Ok(Response::Done)
    }

    /// The id of the account with this (normalized) address.
    pub(super) fn account_id_of(&self, address: &str) -> Result<AccountId, ApplyError> {
        self.account_ids
            .get(address)
            .copied()
            .ok_or_else(|| ApplyError::NotFound(format!("account {address}")))
    }

    fn remove_account(
        &mut self,
        address: &str,
        effects: &mut Effects,
    ) -> Result<Response, ApplyError> {
        let address = normalize_address(address)?;
        let id = self.account_id_of(&address)?;
        let account = self
            .accounts
            .remove(&id)
            .ok_or_else(|| ApplyError::NotFound(format!("account {address}")))?;
        self.account_ids.remove(&address);
        self.forget_quota(id);
        self.forget_sieve(id);
        self.imap.modseq.forget_account(id);
        // ACL: the account's ACLs and the rights granted to it go with it.
        self.acl.forget_account(id);
        for mailbox in account.mailboxes.values() {
            self.drop_mailbox_refs(&mailbox.messages, effects);
            effects.changed.push(MailboxChanged {
                account: id,
                mailbox: mailbox.id,
            });
        }
        Ok(Response::Done)
    }

    fn add_alias(&mut self, source: &str, target: &str) -> Result<Response, ApplyError> {
        let source = normalize_address(source)?;
        let target = normalize_address(target)?;
        let domain = domain_of(&source);
        if !self.domains.contains(domain) {
            return Err(ApplyError::NotFound(format!("domain {domain}")));
        }
        if source == target {
            return Err(ApplyError::Invalid(
                "an alias cannot point to itself".into(),
            ));
        }
        let targets = self.aliases.get(&source);
        if targets.is_some_and(|t| t.contains(&target)) {
            return Err(ApplyError::AlreadyExists(format!(
                "alias {source} -> {target}"
            )));
        }
        if targets.is_some_and(|t| t.len() >= MAX_ALIAS_TARGETS) {
            return Err(ApplyError::Invalid(format!(
                "alias {source} already has {MAX_ALIAS_TARGETS} targets"
            )));
        }
        self.aliases.entry(source).or_default().insert(target);
        Ok(Response::Done)
    }

    fn remove_alias(&mut self, source: &str, target: &str) -> Result<Response, ApplyError> {
        let source = normalize_address(source)?;
        let target = normalize_address(target)?;
        let not_found = || ApplyError::NotFound(format!("alias {source} -> {target}"));
        let targets = self.aliases.get_mut(&source).ok_or_else(not_found)?;
        if !targets.remove(&target) {
            return Err(not_found());
        }
        if targets.is_empty() {
            self.aliases.remove(&source);
        }
        Ok(Response::Done)
    }

    pub(super) fn check_body(body: &BodyV1) -> Result<(), ApplyError> {
        if body.raw_size as usize > MAX_MESSAGE_BYTES {
            return Err(ApplyError::Invalid(format!(
                "message is larger than {MAX_MESSAGE_BYTES} bytes"
            )));
        }
        Ok(())
    }

    pub(super) fn deliver(
        &mut self,
        recipients: &[String],
        received_at: i64,
        body: &BodyV1,
        effects: &mut Effects,
    ) -> Result<Response, ApplyError> {
        Self::check_body(body)?;
        if recipients.len() > MAX_RECIPIENTS_PER_DELIVERY {
            return Err(ApplyError::Invalid(format!(
                "more than {MAX_RECIPIENTS_PER_DELIVERY} recipients"
            )));
        }
        let mut seen = BTreeSet::new();
        let mut accounts = Vec::new();
        let mut account_set = BTreeSet::new();
        for recipient in recipients {
            // The proposer checked every recipient; one that became invalid or unknown since
            // simply receives nothing.
            if let Ok(address) = normalize_address(recipient) {
                self.expand(&address, 0, &mut seen, &mut accounts, &mut account_set);
            }
        }
        let mut targets = Vec::with_capacity(accounts.len());
        for &account_id in &accounts {
            let account = self.account(account_id)?;
            let inbox_id = account
                .inbox_id()
                .ok_or_else(|| ApplyError::NotFound("INBOX".into()))?;
            account.mailbox(inbox_id)?.has_room_for(1)?;
            self.check_quota(account_id, Usage::one(body.raw_size))?;
            targets.push((account_id, inbox_id));
        }
        if targets.is_empty() {
            return Err(ApplyError::NotFound("local recipient".into()));
        }
        let mut delivered = Vec::with_capacity(targets.len());
        for (account_id, inbox_id) in targets {
            let modseq = self.imap.modseq.bump(account_id, inbox_id);
            let account = self.account_mut(account_id)?;
            let inbox = account.mailbox_mut(inbox_id)?;
            let uid = inbox.uidnext;
            inbox.uidnext += 1;
            inbox.chunk_stamps.touch(uid);
            inbox.messages.push(MessageMeta {
                uid,
                blob: body.blob,
                size: body.raw_size,
                internal_date: received_at,
                internal_date_offset_min: 0,
                flags: FlagSet::new(),
                modseq,
                saved_at: super::savedate_state::saved_at_of(received_at),
            });
            inbox.touch(account_id, effects);
            delivered.push((account_id, inbox_id, uid));
            self.add_ref(body.blob, body.raw_size, body.compressed.len() as u64);
            self.charge_usage(account_id, Usage::one(body.raw_size));
        }
        Ok(Response::Delivered(delivered))
    }

    fn create_mailbox(
        &mut self,
        account_id: AccountId,
        name: &str,
        special_use: Option<SpecialUse>,
        now: i64,
    ) -> Result<Response, ApplyError> {
        let name = normalize_mailbox_name(name)?;
        let account = self.account(account_id)?;
        if account.names.contains_key(&name) {
            return Err(ApplyError::AlreadyExists(format!("mailbox {name:?}")));
        }
        let mut to_create: Vec<(String, Option<SpecialUse>)> = ancestors(&name)
            .into_iter()
            .filter(|parent| !account.names.contains_key(parent))
            .map(|parent| (parent, None))
            .collect();
        to_create.push((name, special_use));
        if account.mailboxes.len() + to_create.len() > MAX_MAILBOXES_PER_ACCOUNT {
            return Err(ApplyError::Invalid(format!(
                "an account holds at most {MAX_MAILBOXES_PER_ACCOUNT} mailboxes"
            )));
        }
        let uidvalidities = self.next_uidvalidities(now, to_create.len())?;
        let mut last_id = 0;
        for ((name, special_use), uidvalidity) in to_create.into_iter().zip(uidvalidities) {
            last_id = self.insert_mailbox(account_id, name, special_use, uidvalidity)?;
        }
        Ok(Response::Mailbox(last_id))
    }

    /// Adds an empty mailbox (the caller checked that the name is free).
    fn insert_mailbox(
        &mut self,
        account_id: AccountId,
        name: String,
        special_use: Option<SpecialUse>,
        uidvalidity: u32,
    ) -> Result<MailboxId, ApplyError> {
        let id = self.next_mailbox_id;
        let account = self
            .accounts
            .get_mut(&account_id)
            .ok_or_else(|| ApplyError::NotFound("account".into()))?;
        account.names.insert(name.clone(), id);
        account
            .mailboxes
            .insert(id, Mailbox::new(id, name, special_use, uidvalidity));
        self.next_mailbox_id += 1;
        self.uidvalidity_high = self.uidvalidity_high.max(uidvalidity);
        Ok(id)
    }

    fn delete_mailbox(
        &mut self,
        account_id: AccountId,
        name: &str,
        effects: &mut Effects,
    ) -> Result<Response, ApplyError> {
        let name = normalize_mailbox_name(name)?;
        if name == INBOX {
            return Err(ApplyError::Invalid("INBOX cannot be deleted".into()));
        }
        let account = self.account_mut(account_id)?;
        let id = account
            .names
            .remove(&name)
            .ok_or_else(|| ApplyError::NotFound(format!("mailbox {name:?}")))?;
        let mailbox = account
            .mailboxes
            .remove(&id)
            .ok_or_else(|| ApplyError::NotFound(format!("mailbox {name:?}")))?;
        self.drop_mailbox_refs(&mailbox.messages, effects);
        self.credit_usage(account_id, Usage::of_messages(mailbox.messages.iter()));
        self.imap.modseq.forget(account_id, id);
        // ACL: the mailbox's ACL goes with it (a new mailbox of that name starts with none).
        self.acl.forget_mailbox(account_id, id);
        effects.changed.push(MailboxChanged {
            account: account_id,
            mailbox: id,
        });
        Ok(Response::Done)
    }

    fn rename_mailbox(
        &mut self,
        account_id: AccountId,
        from: &str,
        to: &str,
        now: i64,
        effects: &mut Effects,
    ) -> Result<Response, ApplyError> {
        let from = normalize_mailbox_name(from)?;
        let to = normalize_mailbox_name(to)?;
        let account = self.account(account_id)?;
        let from_id = *account
            .names
            .get(&from)
            .ok_or_else(|| ApplyError::NotFound(format!("mailbox {from:?}")))?;
        if account.names.contains_key(&to) {
            return Err(ApplyError::AlreadyExists(format!("mailbox {to:?}")));
        }
        let from_prefix = format!("{from}{SEPARATOR}");
        if to.starts_with(&from_prefix) {
            return Err(ApplyError::Invalid(
                "a mailbox cannot be renamed into itself".into(),
            ));
        }
        let parents: Vec<String> = ancestors(&to)
            .into_iter()
            .filter(|parent| !account.names.contains_key(parent))
            .collect();

        if from == INBOX {
            // RFC 3501: INBOX's messages move to a new mailbox; INBOX stays, empty, with its
            // UIDVALIDITY and UIDNEXT (its UIDs are never reused); its children stay.
            if account.mailboxes.len() + parents.len() + 1 > MAX_MAILBOXES_PER_ACCOUNT {
                return Err(ApplyError::Invalid(format!(
                    "an account holds at most {MAX_MAILBOXES_PER_ACCOUNT} mailboxes"
                )));
            }
            let uidvalidities = self.next_uidvalidities(now, parents.len() + 1)?;
            let (new_validity, parent_validities) = match uidvalidities.split_last() {
                Some((last, rest)) => (*last, rest.to_vec()),
                None => return Err(ApplyError::Invalid("UIDVALIDITY values are used up".into())),
            };
            for (parent, uidvalidity) in parents.into_iter().zip(parent_validities) {
                self.insert_mailbox(account_id, parent, None, uidvalidity)?;
            }
            let new_id = self.insert_mailbox(account_id, to, None, new_validity)?;
            // INBOX's messages leave it (VANISHED for its sessions) and keep their modseqs
            // in the new mailbox, whose highest modseq covers them.
            let modseq = self.imap.modseq.bump(account_id, from_id);
            let moved_uids: Vec<Uid> = self
                .account(account_id)?
                .mailbox(from_id)?
                .messages
                .iter()
                .map(|m| m.uid)
                .collect();
            self.imap
                .modseq
                .expunged(account_id, from_id, modseq, moved_uids);
            self.imap.modseq.raise(account_id, new_id, modseq);
            let account = self.account_mut(account_id)?;
            let inbox = account.mailbox_mut(from_id)?;
            let messages = std::mem::take(&mut inbox.messages);
            inbox.chunk_stamps.touch_messages(&messages);
            let uidnext = inbox.uidnext;
            let keywords = inbox.keywords.clone();
            inbox.touch(account_id, effects);
            let new_mailbox = account.mailbox_mut(new_id)?;
            new_mailbox.chunk_stamps.touch_messages(&messages);
            new_mailbox.messages = messages;
            new_mailbox.uidnext = uidnext;
            new_mailbox.keywords = keywords;
            new_mailbox.touch(account_id, effects);
            return Ok(Response::Done);
        }

        // Every mailbox at or below `from` moves below `to`.
        let moving: Vec<(String, MailboxId, String)> = account
            .names
            .iter()
            .filter(|(name, _)| **name == from || name.starts_with(&from_prefix))
            .map(|(name, &id)| (name.clone(), id, format!("{to}{}", &name[from.len()..])))
            .collect();
        for (_, _, new_name) in &moving {
            let checked = normalize_mailbox_name(new_name)?;
            if &checked != new_name {
                return Err(ApplyError::Invalid(format!(
                    "invalid mailbox name {new_name:?}"
                )));
            }
            if let Some(existing) = account.names.get(new_name) {
                if !moving.iter().any(|(_, id, _)| id == existing) {
                    return Err(ApplyError::AlreadyExists(format!("mailbox {new_name:?}")));
                }
            }
        }
        if account.mailboxes.len() + parents.len() > MAX_MAILBOXES_PER_ACCOUNT {
            return Err(ApplyError::Invalid(format!(
                "an account holds at most {MAX_MAILBOXES_PER_ACCOUNT} mailboxes"
            )));
        }
        let uidvalidities = self.next_uidvalidities(now, parents.len())?;
        for (parent, uidvalidity) in parents.into_iter().zip(uidvalidities) {
            self.insert_mailbox(account_id, parent, None, uidvalidity)?;
        }
        let account = self.account_mut(account_id)?;
        for (old_name, _, _) in &moving {
            account.names.remove(old_name);
        }
        for (_, id, new_name) in moving {
            account.names.insert(new_name.clone(), id);
            let mailbox = account.mailbox_mut(id)?;
            mailbox.name = new_name;
            effects.changed.push(MailboxChanged {
                account: account_id,
                mailbox: id,
            });
        }
        Ok(Response::Done)
    }

    fn set_subscribed(
        &mut self,
        account_id: AccountId,
        name: &str,
        subscribed: bool,
    ) -> Result<Response, ApplyError> {
        let name = normalize_mailbox_name(name)?;
        let account = self.account_mut(account_id)?;
        if subscribed {
            if !account.subscriptions.contains(&name)
                && account.subscriptions.len() >= MAX_SUBSCRIPTIONS_PER_ACCOUNT
            {
                return Err(ApplyError::Invalid(format!(
                    "an account has at most {MAX_SUBSCRIPTIONS_PER_ACCOUNT} subscriptions"
                )));
            }
            account.subscriptions.insert(name);
        } else {
            account.subscriptions.remove(&name);
        }
        Ok(Response::Done)
    }

    #[allow(clippy::too_many_arguments)]
    fn append(
        &mut self,
        account_id: AccountId,
        mailbox_id: MailboxId,
        flags: &FlagSet,
        internal_date: i64,
        internal_date_offset_min: i16,
        body: &BodyV1,
        effects: &mut Effects,
    ) -> Result<Response, ApplyError> {
        Self::check_body(body)?;
        let mailbox = self.account(account_id)?.mailbox(mailbox_id)?;
        mailbox.has_room_for(1)?;
        self.check_quota(account_id, Usage::one(body.raw_size))?;
        let (flags, new_keywords) = mailbox.canonical_flags(flags)?;
        let modseq = self.imap.modseq.bump(account_id, mailbox_id);
        let saved_at = self.save_time();
        let mailbox = self.account_mut(account_id)?.mailbox_mut(mailbox_id)?;
        mailbox.remember_keywords(new_keywords);
        let uid = mailbox.uidnext;
        mailbox.uidnext += 1;
        let uidvalidity = mailbox.uidvalidity;
        mailbox.chunk_stamps.touch(uid);
        mailbox.messages.push(MessageMeta {
            uid,
            blob: body.blob,
            size: body.raw_size,
            internal_date,
            internal_date_offset_min,
            flags,
            modseq,
            saved_at,
        });
        mailbox.touch(account_id, effects);
        self.add_ref(body.blob, body.raw_size, body.compressed.len() as u64);
        self.charge_usage(account_id, Usage::one(body.raw_size));
        Ok(Response::Appended { uidvalidity, uid })
    }

    fn store_flags(
        &mut self,
        account_id: AccountId,
        mailbox_id: MailboxId,
        uids: Vec<UidRange>,
        op: FlagOp,
        flags: &FlagSet,
        effects: &mut Effects,
    ) -> Result<Response, ApplyError> {
        let (result, _) =
            self.store_flags_since(account_id, mailbox_id, uids, op, flags, None, effects)?;
        Ok(Response::Flags(
            result
                .into_iter()
                .map(|(uid, flags, _)| (uid, flags))
                .collect(),
        ))
    }

    /// STORE: the flags and modseq of every message of `uids` that still exists, and the
    /// UIDs left alone because their modseq is above `unchanged_since` (RFC 7162).
    /// Only messages whose flags change get a new modseq.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    pub(super) fn store_flags_since(
        &mut self,
        account_id: AccountId,
        mailbox_id: MailboxId,
        uids: Vec<UidRange>,
        op: FlagOp,
        flags: &FlagSet,
        unchanged_since: Option<u64>,
        effects: &mut Effects,
    ) -> Result<(Vec<(Uid, FlagSet, u64)>, Vec<Uid>), ApplyError> {
        let ranges = normalize_ranges(uids);
        let mailbox = self.account(account_id)?.mailbox(mailbox_id)?;
        let (flags, new_keywords) = mailbox.canonical_flags(flags)?;
        let indices = mailbox.indices_in(&ranges);
        let mut updates: Vec<(usize, FlagSet)> = Vec::with_capacity(indices.len());
        let mut modified: Vec<Uid> = Vec::new();
        for index in indices {
            let message = &mailbox.messages[index];
            if unchanged_since.is_some_and(|since| message.modseq > since) {
                modified.push(message.uid);
                continue;
            }
            let current = &message.flags;
            let updated = match op {
                FlagOp::Add => current.union(&flags).cloned().collect(),
                FlagOp::Remove => current.difference(&flags).cloned().collect(),
                FlagOp::Replace => flags.clone(),
            };
            updates.push((index, updated));
        }
        let changed = updates
            .iter()
            .any(|(index, updated)| &mailbox.messages[*index].flags != updated);
        if !changed {
            let result = updates
                .iter()
                .map(|(index, updated)| {
                    let message = &mailbox.messages[*index];
                    (message.uid, updated.clone(), message.modseq)
                })
                .collect();
            return Ok((result, modified));
        }
        let modseq = self.imap.modseq.bump(account_id, mailbox_id);
        let mailbox = self.account_mut(account_id)?.mailbox_mut(mailbox_id)?;
        // Only keywords that were actually set are remembered.
        if op != FlagOp::Remove {
            mailbox.remember_keywords(new_keywords);
        }
        let messages = &mut mailbox.messages;
        mailbox
            .chunk_stamps
            .touch_all(updates.iter().map(|(index, _)| messages[*index].uid));
        let mut result = Vec::with_capacity(updates.len());
        for (index, updated) in updates {
            let Some(message) = messages.get_mut(index) else {
                continue;
            };
            if message.flags != updated {
                message.flags = updated;
                message.modseq = modseq;
            }
            result.push((message.uid, message.flags.clone(), message.modseq));
        }
        mailbox.touch(account_id, effects);
        Ok((result, modified))
    }

    fn expunge(
        &mut self,
        account_id: AccountId,
        mailbox_id: MailboxId,
        uids: Option<Vec<UidRange>>,
        effects: &mut Effects,
    ) -> Result<Response, ApplyError> {
        let mailbox = self.account(account_id)?.mailbox(mailbox_id)?;
        let candidates: Vec<usize> = match uids {
            Some(ranges) => mailbox.indices_in(&normalize_ranges(ranges)),
            None => (0..mailbox.messages.len()).collect(),
        };
        let doomed: BTreeSet<Uid> = candidates
            .into_iter()
            .filter(|&index| mailbox.messages[index].flags.contains(&Flag::Deleted))
            .map(|index| mailbox.messages[index].uid)
            .collect();
        if doomed.is_empty() {
            return Ok(Response::Expunged(Vec::new()));
        }
        let modseq = self.imap.modseq.bump(account_id, mailbox_id);
        self.imap
            .modseq
            .expunged(account_id, mailbox_id, modseq, doomed.iter().copied());
        let mailbox = self.account_mut(account_id)?.mailbox_mut(mailbox_id)?;
        mailbox.chunk_stamps.touch_all(doomed.iter().copied());
        let messages = &mut mailbox.messages;
        let mut removed = Vec::with_capacity(doomed.len());
        let mut freed = Usage::default();
        messages.retain(|message| {
            if doomed.contains(&message.uid) {
                removed.push(message.blob);
                freed.bytes += u64::from(message.size);
                freed.messages += 1;
                false
            } else {
                true
            }
        });
        mailbox.touch(account_id, effects);
        self.credit_usage(account_id, freed);
        for blob in removed {
            self.drop_ref(blob, effects);
        }
        Ok(Response::Expunged(doomed.into_iter().collect()))
    }

    fn copy(
        &mut self,
        account_id: AccountId,
        from: MailboxId,
        uids: Vec<UidRange>,
        to: MailboxId,
        remove_source: bool,
        effects: &mut Effects,
    ) -> Result<Response, ApplyError> {
        let ranges = normalize_ranges(uids);
        let account = self.account(account_id)?;
        let source = account.mailbox(from)?;
        let destination = account.mailbox(to)?;
        let selected: Vec<MessageMeta> = source
            .indices_in(&ranges)
            .into_iter()
            .map(|index| source.messages[index].clone())
            .collect();
        let uidvalidity = destination.uidvalidity;
        if selected.is_empty() {
            return Ok(Response::Copied {
                uidvalidity,
                pairs: Vec::new(),
            });
        }
        destination.has_room_for(selected.len())?;
        // A MOVE stays inside the account: its usage does not change. A COPY is refused whole
        // when its result would pass the quota.
        let copied = Usage::of_messages(&selected);
        if !remove_source {
            self.check_quota(account_id, copied)?;
        }
        let account = self.account(account_id)?;
        let destination = account.mailbox(to)?;
        let mut all_flags = FlagSet::new();
        for message in &selected {
            all_flags.extend(message.flags.iter().cloned());
        }
        let (_, new_keywords) = destination.canonical_flags(&all_flags)?;

        let modseq = self.imap.modseq.bump(account_id, to);
        let saved_at = self.save_time();
        let destination = self.account_mut(account_id)?.mailbox_mut(to)?;
        destination.remember_keywords(new_keywords);
        let mut pairs = Vec::with_capacity(selected.len());
        let mut copies = Vec::with_capacity(selected.len());
        for message in &selected {
            let uid = destination.uidnext;
            destination.uidnext += 1;
            let flags = message
                .flags
                .iter()
                .map(|flag| match flag {
                    Flag::Keyword(k) => Flag::Keyword(
                        destination
                            .keywords
                            .get(&k.to_ascii_lowercase())
                            .cloned()
                            .unwrap_or_else(|| k.clone()),
                    ),
                    other => other.clone(),
                })
                .collect();
            copies.push(MessageMeta {
                uid,
                flags,
                modseq,
                saved_at,
                ..message.clone()
            });
            pairs.push((message.uid, uid));
        }
        destination.chunk_stamps.touch_messages(&copies);
        destination.messages.extend(copies);
        destination.touch(account_id, effects);
        for message in &selected {
            // The copy's file is the source's, so the stored size is already known.
            self.add_ref(message.blob, message.size, 0);
        }
        self.charge_usage(account_id, copied);
        if remove_source {
            let moved: BTreeSet<Uid> = selected.iter().map(|m| m.uid).collect();
            let modseq = self.imap.modseq.bump(account_id, from);
            self.imap
                .modseq
                .expunged(account_id, from, modseq, moved.iter().copied());
            let source = self.account_mut(account_id)?.mailbox_mut(from)?;
            source.chunk_stamps.touch_all(moved.iter().copied());
            source.messages.retain(|m| !moved.contains(&m.uid));
            source.touch(account_id, effects);
            self.credit_usage(account_id, copied);
            for message in &selected {
                self.drop_ref(message.blob, effects);
            }
        }
        Ok(Response::Copied { uidvalidity, pairs })
    }
}
