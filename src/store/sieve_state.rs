//! The replicated state of user filters (issue 12): Sieve scripts per account, vacation
//! records (RFC 5230 `:days`) and greylisting triplets, all in ONE struct, [`SieveState`],
//! kept in `State` and carried by the snapshot as a field of its own (`SnapshotMeta::V5`);
//! and their apply, for `Command::V5(CommandV5)`.
//!
//! Times are chosen by the proposer and travel in the commands (`now_ms`); expiry is a
//! function of the command's time, so every replica drops the same records at the same
//! point of the log. Expiring records are indexed by their expiry time, so that dropping
//! them costs only what is dropped.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::command::{ApplyError, BodyV1, Response};
use super::names::normalize_mailbox_name;
use super::queue::NewQueueEntry;
use super::quota::Usage;
use super::state::{Effects, Outcome, State, MAX_RECIPIENTS_PER_DELIVERY};
use super::{AccountId, BlobId, Flag, FlagSet, MailboxId, MessageMeta};
use crate::sieve::{check_script_name, MAX_SCRIPTS_PER_ACCOUNT, MAX_SCRIPT_BYTES};

/// Vacation records kept over the cluster; a new one beyond it replaces nothing and is not
/// kept (the sender may get a second reply sooner: the safe side of a full table).
pub const MAX_VACATION_RECORDS: usize = 200_000;
/// Longest vacation record id (sieve-rs: `_v` + sender + handle or reason), in bytes.
pub const MAX_VACATION_ID_BYTES: usize = 4096;
/// Greylisting triplets kept over the cluster; when full, new triplets are not recorded
/// and their mail passes (greylisting fails open, like postgrey on a database error).
pub const MAX_GREYLIST_ENTRIES: usize = 500_000;
/// Longest greylisting key part (network, sender, recipient), in bytes.
pub const MAX_GREYLIST_PART_BYTES: usize = 512;
/// Replies (vacation, rejection notices) one delivery may queue.
pub const MAX_REPLIES_PER_DELIVERY: usize = 64;
/// Expired records dropped by one command at most (the rest by the next ones), so that
/// one apply stays short whatever piled up.
pub const MAX_EXPIRED_PER_COMMAND: usize = 1_000;

/// One account's scripts: name -> source, and the active one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountScripts {
    pub scripts: BTreeMap<String, String>,
    pub active: Option<String>,
}

/// A map whose entries expire at a time of their own, with the index by expiry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expiring<K: Ord, V> {
    entries: BTreeMap<K, (i64, V)>,
    by_expiry: BTreeSet<(i64, K)>,
}

impl<K: Ord, V> Default for Expiring<K, V> {
    fn default() -> Self {
        Expiring {
            entries: BTreeMap::new(),
            by_expiry: BTreeSet::new(),
        }
    }
}

impl<K: Ord + Clone, V> Expiring<K, V> {
    /// The entry, if it has not expired at `now_ms`.
    pub fn get(&self, key: &K, now_ms: i64) -> Option<&V> {
        self.entries
            .get(key)
            .filter(|(expires_at_ms, _)| *expires_at_ms > now_ms)
            .map(|(_, value)| value)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn insert(&mut self, key: K, expires_at_ms: i64, value: V) {
        if let Some((old, _)) = self.entries.remove(&key) {
            self.by_expiry.remove(&(old, key.clone()));
        }
        self.by_expiry.insert((expires_at_ms, key.clone()));
        self.entries.insert(key, (expires_at_ms, value));
    }

    /// Drops up to [`MAX_EXPIRED_PER_COMMAND`] entries expired at `now_ms`, oldest first.
    fn expire(&mut self, now_ms: i64) {
        for _ in 0..MAX_EXPIRED_PER_COMMAND {
            let Some((expires_at_ms, key)) = self.by_expiry.first().cloned() else {
                return;
            };
            if expires_at_ms > now_ms {
                return;
            }
            self.by_expiry.remove(&(expires_at_ms, key.clone()));
            self.entries.remove(&key);
        }
    }

    fn retain_keys(&mut self, mut keep: impl FnMut(&K) -> bool) {
        let dropped: Vec<K> = self.entries.keys().filter(|k| !keep(k)).cloned().collect();
        for key in dropped {
            if let Some((expires_at_ms, _)) = self.entries.remove(&key) {
                self.by_expiry.remove(&(expires_at_ms, key));
            }
        }
    }
}

/// A greylisting triplet: the client's network (/24 or /64), the envelope sender and the
/// recipient (both lowercased).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GreylistKey {
    pub network: String,
    pub sender: String,
    pub recipient: String,
}

/// What is known of a triplet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GreylistEntry {
    /// First attempt (Unix ms): a retry passes from `first_seen_ms + delay`.
    pub first_seen_ms: i64,
    /// A retry passed: whitelisted (until the entry's expiry).
    pub passed: bool,
}

/// Every replicated record of issue 12.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SieveState {
    pub scripts: BTreeMap<AccountId, AccountScripts>,
    /// (account, vacation id) -> nothing: the reply was sent and the record lasts until its
    /// expiry (`:days`).
    pub vacation: Expiring<(AccountId, String), ()>,
    pub greylist: Expiring<GreylistKey, GreylistEntry>,
}

/// A copy of a message into a named mailbox (INBOX when the name does not resolve).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FiledCopy {
    pub account: AccountId,
    pub mailbox: String,
    pub flags: FlagSet,
}

/// A message the delivery sends (vacation reply, rejection notice): its own body and queue
/// entry (null sender).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedReply {
    pub body: BodyV1,
    pub entry: NewQueueEntry,
}

/// A vacation reply was sent: no other to the same sender (same id) until `expires_at_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VacationRecord {
    pub account: AccountId,
    pub id: String,
    pub expires_at_ms: i64,
}

/// One message after the recipients' Sieve scripts, in one commit: the copies, the queue
/// entry for remote recipients (forwarding), the replies and the vacation records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilteredDelivery {
    pub mail_from: String,
    pub received_at: i64,
    /// The proposer's clock (Unix ms): expiry of the vacation records.
    pub now_ms: i64,
    /// None when no copy and no remote recipient needs it (every script rejected or
    /// discarded).
    pub body: Option<BodyV1>,
    pub filed: Vec<FiledCopy>,
    pub remote: Option<NewQueueEntry>,
    pub replies: Vec<QueuedReply>,
    pub vacation: Vec<VacationRecord>,
}

/// Sieve and greylisting commands (`Command::V5`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandV5 {
    /// Stores (or replaces) a script; the proposer compiled it.
    PutScript {
        account: AccountId,
        name: String,
        source: String,
    },
    /// Deletes a script; the active one is refused (RFC 5804 `ACTIVE`).
    DeleteScript {
        account: AccountId,
        name: String,
    },
    RenameScript {
        account: AccountId,
        from: String,
        to: String,
    },
    /// Makes `name` the active script; None deactivates.
    SetActive {
        account: AccountId,
        name: Option<String>,
    },
    Deliver(Box<FilteredDelivery>),
    /// A first attempt of a triplet: recorded (if unknown or expired) until `expires_at_ms`.
    GreylistSeen {
        key: GreylistKey,
        now_ms: i64,
        expires_at_ms: i64,
    },
    /// A retry passed: whitelisted until `expires_at_ms`.
    GreylistPassed {
        key: GreylistKey,
        now_ms: i64,
        expires_at_ms: i64,
    },
}

impl CommandV5 {
    /// The bodies this command carries (written before it is applied).
    pub fn bodies(&self) -> Vec<&BodyV1> {
        match self {
            CommandV5::Deliver(delivery) => delivery
                .body
                .iter()
                .chain(delivery.replies.iter().map(|r| &r.body))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Whether applying it may add a queue entry (the delivery worker is woken).
    pub fn queues(&self) -> bool {
        matches!(self, CommandV5::Deliver(d) if d.remote.is_some() || !d.replies.is_empty())
    }
}

fn invalid(why: impl Into<String>) -> ApplyError {
    ApplyError::Invalid(why.into())
}

impl State {
    /// Applies one version-5 command. Pure, and a refusal changes nothing.
    pub fn apply_v5(&mut self, command: CommandV5) -> Outcome {
        let mut effects = Effects::default();
        let carried: Vec<BlobId> = command.bodies().iter().map(|b| b.blob).collect();
        let result = match command {
            CommandV5::PutScript {
                account,
                name,
                source,
            } => self.put_script(account, name, source),
            CommandV5::DeleteScript { account, name } => self.delete_script(account, &name),
            CommandV5::RenameScript { account, from, to } => self.rename_script(account, &from, to),
            CommandV5::SetActive { account, name } => self.set_active(account, name),
            CommandV5::Deliver(delivery) => self.deliver_filtered(*delivery, &mut effects),
            CommandV5::GreylistSeen {
                key,
                now_ms,
                expires_at_ms,
            } => self.greylist_seen(key, now_ms, expires_at_ms),
            CommandV5::GreylistPassed {
                key,
                now_ms,
                expires_at_ms,
            } => self.greylist_passed(key, now_ms, expires_at_ms),
        };
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                effects = Effects::default();
                Response::Refused(error)
            }
        };
        // A carried body nothing references (a refusal) is released.
        for blob in carried {
            if !self.blobs.contains_key(&blob) && !effects.released.contains(&blob) {
                effects.released.push(blob);
            }
        }
        Outcome { response, effects }
    }

    fn existing_account(&self, account: AccountId) -> Result<(), ApplyError> {
        if self.accounts.contains_key(&account) {
            Ok(())
        } else {
            Err(ApplyError::NotFound("account".into()))
        }
    }

    fn put_script(
        &mut self,
        account: AccountId,
        name: String,
        source: String,
    ) -> Result<Response, ApplyError> {
        self.existing_account(account)?;
        check_script_name(&name).map_err(invalid)?;
        if source.len() > MAX_SCRIPT_BYTES {
            return Err(invalid(format!(
                "a script has at most {MAX_SCRIPT_BYTES} bytes"
            )));
        }
        let scripts = self.sieve.scripts.entry(account).or_default();
        if !scripts.scripts.contains_key(&name) && scripts.scripts.len() >= MAX_SCRIPTS_PER_ACCOUNT
        {
            return Err(ApplyError::OverQuota(format!(
                "at most {MAX_SCRIPTS_PER_ACCOUNT} scripts per account"
            )));
        }
        scripts.scripts.insert(name, source);
        Ok(Response::Done)
    }

    fn delete_script(&mut self, account: AccountId, name: &str) -> Result<Response, ApplyError> {
        let scripts = self
            .sieve
            .scripts
            .get_mut(&account)
            .filter(|s| s.scripts.contains_key(name))
            .ok_or_else(|| ApplyError::NotFound(format!("script {name:?}")))?;
        if scripts.active.as_deref() == Some(name) {
            return Err(invalid("the active script cannot be deleted"));
        }
        scripts.scripts.remove(name);
        if scripts.scripts.is_empty() {
            self.sieve.scripts.remove(&account);
        }
        Ok(Response::Done)
    }

    fn rename_script(
        &mut self,
        account: AccountId,
        from: &str,
        to: String,
    ) -> Result<Response, ApplyError> {
        check_script_name(&to).map_err(invalid)?;
        let scripts = self
            .sieve
            .scripts
            .get_mut(&account)
            .filter(|s| s.scripts.contains_key(from))
            .ok_or_else(|| ApplyError::NotFound(format!("script {from:?}")))?;
        if scripts.scripts.contains_key(&to) {
            return Err(ApplyError::AlreadyExists(format!("script {to:?}")));
        }
        if let Some(source) = scripts.scripts.remove(from) {
            scripts.scripts.insert(to.clone(), source);
        }
        if scripts.active.as_deref() == Some(from) {
            scripts.active = Some(to);
        }
        Ok(Response::Done)
    }

    fn set_active(
        &mut self,
        account: AccountId,
        name: Option<String>,
    ) -> Result<Response, ApplyError> {
        match name {
            None => {
                if let Some(scripts) = self.sieve.scripts.get_mut(&account) {
                    scripts.active = None;
                }
            }
            Some(name) => {
                let scripts = self
                    .sieve
                    .scripts
                    .get_mut(&account)
                    .filter(|s| s.scripts.contains_key(&name))
                    .ok_or_else(|| ApplyError::NotFound(format!("script {name:?}")))?;
                scripts.active = Some(name);
            }
        }
        Ok(Response::Done)
    }

    /// The mailbox a filed copy goes to: the named one if it exists, else INBOX (RFC 5228
    /// section 4.1: an error in fileinto keeps the message).
    fn filing_target(&self, copy: &FiledCopy) -> Option<MailboxId> {
        let account = self.accounts.get(&copy.account)?;
        normalize_mailbox_name(&copy.mailbox)
            .ok()
            .and_then(|name| account.names.get(&name).copied())
            .or_else(|| account.inbox_id())
    }

    fn deliver_filtered(
        &mut self,
        delivery: FilteredDelivery,
        effects: &mut Effects,
    ) -> Result<Response, ApplyError> {
        let FilteredDelivery {
            mail_from: _,
            received_at,
            now_ms,
            body,
            filed,
            remote,
            replies,
            vacation,
        } = delivery;
        if filed.len() > MAX_RECIPIENTS_PER_DELIVERY * crate::sieve::MAX_FILEINTO_TARGETS
            || replies.len() > MAX_REPLIES_PER_DELIVERY
        {
            return Err(invalid("too many copies or replies"));
        }
        if (!filed.is_empty() || remote.is_some()) && body.is_none() {
            return Err(invalid("copies without a body"));
        }
        if let Some(body) = &body {
            Self::check_body(body)?;
        }
        for reply in &replies {
            Self::check_body(&reply.body)?;
        }
        // Every check before any change.
        let mut targets: Vec<(AccountId, MailboxId, FlagSet, Vec<String>)> = Vec::new();
        let mut per_account: BTreeMap<AccountId, u64> = BTreeMap::new();
        for copy in &filed {
            // An account removed since the proposal receives nothing.
            let Some(mailbox_id) = self.filing_target(copy) else {
                continue;
            };
            if targets
                .iter()
                .any(|(a, m, _, _)| *a == copy.account && *m == mailbox_id)
            {
                continue;
            }
            let mailbox = self.account(copy.account)?.mailbox(mailbox_id)?;
            mailbox.has_room_for(1)?;
            let (flags, new_keywords) = mailbox.canonical_flags(&copy.flags)?;
            *per_account.entry(copy.account).or_default() += 1;
            targets.push((copy.account, mailbox_id, flags, new_keywords));
        }
        if let Some(body) = &body {
            for (&account, &count) in &per_account {
                self.check_quota(
                    account,
                    Usage {
                        bytes: u64::from(body.raw_size) * count,
                        messages: count,
                    },
                )?;
            }
        }
        let mut new_entries = Vec::new();
        if let Some(remote) = &remote {
            new_entries.push(remote);
        }
        new_entries.extend(replies.iter().map(|r| &r.entry));
        self.check_new_queue_entries(&new_entries)?;
        for record in &vacation {
            if record.id.len() > MAX_VACATION_ID_BYTES {
                return Err(invalid("vacation id too long"));
            }
        }

        let mut delivered = Vec::with_capacity(targets.len());
        if let Some(body) = &body {
            for (account_id, mailbox_id, flags, new_keywords) in targets {
                let modseq = self.imap.modseq.bump(account_id, mailbox_id);
                let mailbox = self.account_mut(account_id)?.mailbox_mut(mailbox_id)?;
                mailbox.remember_keywords(new_keywords);
                let uid = mailbox.uidnext;
                mailbox.uidnext += 1;
                mailbox.messages.push(MessageMeta {
                    uid,
                    blob: body.blob,
                    size: body.raw_size,
                    internal_date: received_at,
                    internal_date_offset_min: 0,
                    flags,
                    modseq,
                    saved_at: super::savedate_state::saved_at_of(received_at),
                });
                mailbox.touch(account_id, effects);
                delivered.push((account_id, mailbox_id, uid));
                self.add_ref(body.blob, body.raw_size, body.compressed.len() as u64);
                self.charge_usage(account_id, Usage::one(body.raw_size));
            }
        }
        let queued = match (remote, &body) {
            (Some(remote), Some(body)) => Some(self.insert_queue_entry(remote, body)),
            _ => None,
        };
        for reply in replies {
            self.insert_queue_entry(reply.entry, &reply.body);
        }
        self.sieve.vacation.expire(now_ms);
        for record in vacation {
            if self.sieve.vacation.len() < MAX_VACATION_RECORDS
                && self.accounts.contains_key(&record.account)
            {
                self.sieve
                    .vacation
                    .insert((record.account, record.id), record.expires_at_ms, ());
            }
        }
        Ok(Response::Accepted { delivered, queued })
    }

    fn check_greylist_key(key: &GreylistKey) -> Result<(), ApplyError> {
        if [&key.network, &key.sender, &key.recipient]
            .iter()
            .any(|part| part.len() > MAX_GREYLIST_PART_BYTES)
        {
            return Err(invalid("greylisting key too long"));
        }
        Ok(())
    }

    fn greylist_seen(
        &mut self,
        key: GreylistKey,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<Response, ApplyError> {
        Self::check_greylist_key(&key)?;
        self.sieve.greylist.expire(now_ms);
        // Two nodes seeing the same first attempt: the first record wins.
        if self.sieve.greylist.get(&key, now_ms).is_none()
            && self.sieve.greylist.len() < MAX_GREYLIST_ENTRIES
        {
            self.sieve.greylist.insert(
                key,
                expires_at_ms,
                GreylistEntry {
                    first_seen_ms: now_ms,
                    passed: false,
                },
            );
        }
        Ok(Response::Done)
    }

    fn greylist_passed(
        &mut self,
        key: GreylistKey,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<Response, ApplyError> {
        Self::check_greylist_key(&key)?;
        self.sieve.greylist.expire(now_ms);
        let first_seen_ms = self
            .sieve
            .greylist
            .get(&key, now_ms)
            .map_or(now_ms, |entry| entry.first_seen_ms);
        if self.sieve.greylist.len() < MAX_GREYLIST_ENTRIES
            || self.sieve.greylist.get(&key, now_ms).is_some()
        {
            self.sieve.greylist.insert(
                key,
                expires_at_ms,
                GreylistEntry {
                    first_seen_ms,
                    passed: true,
                },
            );
        }
        Ok(Response::Done)
    }

    /// Drops the scripts and vacation records of a removed account (account ids are never
    /// reused, but the records would linger).
    pub(super) fn forget_sieve(&mut self, account: AccountId) {
        self.sieve.scripts.remove(&account);
        self.sieve.vacation.retain_keys(|(id, _)| *id != account);
    }
}

/// IMAP flags as sieve-rs gives them (`\Seen`, `$label`) to the store's flags; unusable
/// ones are left out.
pub fn flags_from_sieve(flags: &[String]) -> FlagSet {
    let mut set = FlagSet::new();
    for flag in flags {
        for word in flag.split_whitespace() {
            let parsed = match word.to_ascii_lowercase().as_str() {
                "\\seen" => Some(Flag::Seen),
                "\\answered" => Some(Flag::Answered),
                "\\flagged" => Some(Flag::Flagged),
                "\\deleted" => Some(Flag::Deleted),
                "\\draft" => Some(Flag::Draft),
                _ if word.starts_with('\\') => None,
                _ => super::names::check_keyword(word)
                    .ok()
                    .map(|_| Flag::Keyword(word.to_owned())),
            };
            set.extend(parsed);
        }
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(sender: &str) -> GreylistKey {
        GreylistKey {
            network: "192.0.2.0/24".into(),
            sender: sender.into(),
            recipient: "bob@example.org".into(),
        }
    }

    #[test]
    fn expiring_entries_leave_in_order_and_only_when_due() {
        let mut map: Expiring<GreylistKey, u8> = Expiring::default();
        map.insert(key("a"), 100, 1);
        map.insert(key("b"), 50, 2);
        map.insert(key("a"), 200, 3);
        assert_eq!(map.get(&key("a"), 150), Some(&3));
        map.expire(100);
        assert_eq!(map.len(), 1);
        assert_eq!(map.get(&key("b"), 0), None);
        map.expire(200);
        assert!(map.is_empty());
    }

    #[test]
    fn greylisting_records_the_first_attempt_once_and_passes_later() {
        let mut state = State::default();
        let seen = |now_ms| CommandV5::GreylistSeen {
            key: key("s@remote.example"),
            now_ms,
            expires_at_ms: now_ms + 1_000,
        };
        assert_eq!(state.apply_v5(seen(10)).response, Response::Done);
        assert_eq!(state.apply_v5(seen(20)).response, Response::Done);
        let entry = *state
            .sieve
            .greylist
            .get(&key("s@remote.example"), 30)
            .unwrap();
        assert_eq!(entry.first_seen_ms, 10);
        assert!(!entry.passed);
        state.apply_v5(CommandV5::GreylistPassed {
            key: key("s@remote.example"),
            now_ms: 400,
            expires_at_ms: 10_000,
        });
        let entry = *state
            .sieve
            .greylist
            .get(&key("s@remote.example"), 5_000)
            .unwrap();
        assert!(entry.passed && entry.first_seen_ms == 10);
        // Another command far later drops it: expiry follows the log, not a clock.
        state.apply_v5(CommandV5::GreylistSeen {
            key: key("other@remote.example"),
            now_ms: 20_000,
            expires_at_ms: 21_000,
        });
        assert_eq!(state.sieve.greylist.len(), 1);
    }

    #[test]
    fn script_commands_keep_the_active_script_consistent() {
        let mut state = State::default();
        // No such account.
        let put = |name: &str| CommandV5::PutScript {
            account: 1,
            name: name.into(),
            source: "keep;".into(),
        };
        assert!(matches!(
            state.apply_v5(put("a")).response,
            Response::Refused(ApplyError::NotFound(_))
        ));
        state.apply(super::super::command::CommandV1::AddDomain {
            domain: "example.org".into(),
        });
        let added = state.apply(super::super::command::CommandV1::AddAccount {
            address: "bob@example.org".into(),
            password_hash: "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo".into(),
            now: 1,
        });
        let Response::Account(account) = added.response else {
            panic!("{:?}", added.response)
        };
        let put = |name: &str| CommandV5::PutScript {
            account,
            name: name.into(),
            source: "keep;".into(),
        };
        assert_eq!(state.apply_v5(put("a")).response, Response::Done);
        state.apply_v5(CommandV5::SetActive {
            account,
            name: Some("a".into()),
        });
        assert!(matches!(
            state
                .apply_v5(CommandV5::DeleteScript {
                    account,
                    name: "a".into()
                })
                .response,
            Response::Refused(ApplyError::Invalid(_))
        ));
        state.apply_v5(CommandV5::RenameScript {
            account,
            from: "a".into(),
            to: "b".into(),
        });
        assert_eq!(state.sieve.scripts[&account].active.as_deref(), Some("b"));
        for n in 1..MAX_SCRIPTS_PER_ACCOUNT {
            assert_eq!(
                state.apply_v5(put(&format!("s{n}"))).response,
                Response::Done
            );
        }
        assert!(matches!(
            state.apply_v5(put("one-too-many")).response,
            Response::Refused(ApplyError::OverQuota(_))
        ));
    }

    #[test]
    fn sieve_flags_become_store_flags() {
        let flags = flags_from_sieve(&["\\Seen $Label".into(), "\\Bogus".into()]);
        assert!(flags.contains(&Flag::Seen));
        assert!(flags.contains(&Flag::Keyword("$Label".into())));
        assert_eq!(flags.len(), 2);
    }

    #[test]
    fn the_snapshot_carries_scripts_vacation_records_and_greylisting() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = super::super::blob::BlobStore::open(dir.path().join("blobs")).unwrap();
        let mut state = State::default();
        state.sieve.scripts.insert(
            3,
            AccountScripts {
                scripts: BTreeMap::from([("main".to_owned(), "keep;".to_owned())]),
                active: Some("main".to_owned()),
            },
        );
        state.sieve.vacation.insert((3, "_vx".into()), 500, ());
        state.sieve.greylist.insert(
            key("s@remote.example"),
            900,
            GreylistEntry {
                first_seen_ms: 1,
                passed: true,
            },
        );
        let mut bytes = Vec::new();
        let chunks =
            super::super::snapshot_chunks::ChunkStore::open(dir.path().join("chunks")).unwrap();
        super::super::snapshot::write_snapshot(&state, &chunks, &mut bytes).unwrap();
        let restored =
            super::super::snapshot::read_snapshot(&mut bytes.as_slice(), &blobs, &chunks, true)
                .unwrap();
        assert_eq!(restored.sieve, state.sieve);
    }
}
