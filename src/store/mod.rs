//! The mail store: the one door between mail code and the replicated mail state.
//!
//! Mail code (SMTP, IMAP, admin commands for domains, accounts and aliases) reads the local
//! replica through [`MailStore`]'s read methods and changes state only through its write
//! methods, which build a command (choosing time, ids and hashes first), propose it through a
//! [`Propose`] implementation (Raft in a node, a direct local applier in unit tests), and return
//! once it is committed and applied on this node.
//!
//! THIS FILE IS THE CONTRACT shared by the SMTP, IMAP and admin code. The signatures below are
//! fixed; the bodies are being written in the store branch.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub type AccountId = u64;
pub type MailboxId = u64;
pub type Uid = u32;

/// Content address of a stored body: BLAKE3 of the raw message bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BlobId(pub [u8; 32]);

/// A message flag. System flags are their own variants; anything else is a keyword.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Flag {
    Seen,
    Answered,
    Flagged,
    Deleted,
    Draft,
    /// A keyword, stored as given (IMAP keywords are case-insensitive atoms; the store keeps
    /// the first spelling it saw).
    Keyword(String),
}

/// A sorted, duplicate-free set of flags.
pub type FlagSet = std::collections::BTreeSet<Flag>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SpecialUse {
    Sent,
    Drafts,
    Trash,
    Junk,
    Archive,
}

/// What a STORE does with the given flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FlagOp {
    Add,
    Remove,
    Replace,
}

/// One message in a mailbox, as the replica holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageMeta {
    pub uid: Uid,
    pub blob: BlobId,
    /// Size of the raw message in bytes (RFC822.SIZE).
    pub size: u32,
    /// INTERNALDATE, seconds since the Unix epoch, chosen before the command was proposed.
    pub internal_date: i64,
    /// Offset of INTERNALDATE's zone from UTC, in minutes (0 for SMTP deliveries).
    pub internal_date_offset_min: i16,
    pub flags: FlagSet,
}

/// A mailbox as LIST/STATUS need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MailboxInfo {
    pub id: MailboxId,
    /// Full name, hierarchy separated by '/'. INBOX is always spelled "INBOX".
    pub name: String,
    pub special_use: Option<SpecialUse>,
    pub subscribed: bool,
    pub uidvalidity: u32,
    pub uidnext: Uid,
    pub exists: u32,
    pub unseen: u32,
}

/// A point-in-time copy of a mailbox's message list (for SELECT, FETCH, SEARCH, NOOP/IDLE).
#[derive(Clone, Debug)]
pub struct MailboxView {
    pub id: MailboxId,
    pub name: String,
    pub uidvalidity: u32,
    pub uidnext: Uid,
    /// Sorted by UID.
    pub messages: Arc<Vec<MessageMeta>>,
    /// Increases with every applied change to this mailbox (its messages or their flags).
    pub change_counter: u64,
}

/// A change applied to some mailbox; sent to every [`MailStore::subscribe_changes`] receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MailboxChanged {
    pub account: AccountId,
    pub mailbox: MailboxId,
}

/// What the store knows about an address given as an SMTP recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecipientCheck {
    /// An account or an alias of a local domain.
    Local,
    /// A local domain, but no such account or alias.
    UnknownUser,
    /// Not one of our domains.
    ForeignDomain,
}

/// A message accepted by SMTP for local recipients.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The envelope sender ("" for the null sender).
    pub mail_from: String,
    /// Envelope recipients, each already checked as [`RecipientCheck::Local`].
    pub recipients: Vec<String>,
    /// The message as it will be stored (trace headers already prepended).
    pub body: Vec<u8>,
    /// Seconds since the Unix epoch: becomes the INTERNALDATE.
    pub received_at: i64,
}

/// Where a delivered message landed: one entry per account (aliases expanded, duplicates
/// removed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryReceipt {
    pub blob: BlobId,
    pub delivered: Vec<(AccountId, MailboxId, Uid)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountInfo {
    pub id: AccountId,
    pub address: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AliasInfo {
    pub source: String,
    pub target: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct StoreStats {
    pub domains: u64,
    pub accounts: u64,
    pub aliases: u64,
    /// Message entries over all mailboxes.
    pub messages: u64,
    /// Distinct bodies and their raw (uncompressed) size.
    pub blobs: u64,
    pub blob_bytes_raw: u64,
    /// Size of the blob folder on disk (compressed).
    pub blob_bytes_stored: u64,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The command could not be committed (no quorum, no leader, timeout). Nothing was stored.
    /// SMTP answers 451 4.3.0 (or 4.4.3), IMAP `NO [UNAVAILABLE]`.
    #[error("the cluster cannot commit writes right now: {0}")]
    Unavailable(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The request was refused by a rule (bad name, mailbox not empty, short password...).
    #[error("{0}")]
    Invalid(String),
    #[error("storage error: {0}")]
    Io(String),
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Proposes an encoded command and resolves to the encoded response once the command is
/// committed and applied on this node.
pub trait Propose: Send + Sync + 'static {
    fn propose(&self, command: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, StoreError>>;
}

/// The handle every part of the mail node uses. Cheap to clone.
#[derive(Clone)]
pub struct MailStore {
    _private: (),
}

impl MailStore {
    /// Opens (or creates) a store in `data_dir` whose commands are applied directly, without
    /// Raft: for unit and session tests. Nodes build the store over the cluster instead.
    pub fn open_local(data_dir: &std::path::Path) -> Result<MailStore, StoreError> {
        let _ = data_dir;
        todo!()
    }

    // ----- accounts and authentication -----

    /// Checks a password (argon2id, on a blocking thread). The address is case-insensitive.
    pub async fn authenticate(&self, address: &str, password: &str) -> Option<AccountId> {
        let _ = (address, password);
        todo!()
    }

    pub fn account_address(&self, account: AccountId) -> Option<String> {
        let _ = account;
        todo!()
    }

    // ----- SMTP -----

    pub fn is_local_domain(&self, domain: &str) -> bool {
        let _ = domain;
        todo!()
    }

    pub fn check_recipient(&self, address: &str) -> RecipientCheck {
        let _ = address;
        todo!()
    }

    /// Stores one message for its local recipients in one command: each recipient's account
    /// (aliases expanded during apply) gets it in INBOX.
    pub async fn deliver(&self, delivery: Delivery) -> Result<DeliveryReceipt, StoreError> {
        let _ = delivery;
        todo!()
    }

    // ----- IMAP reads (local replica) -----

    /// Every mailbox of the account, sorted by name.
    pub fn list_mailboxes(&self, account: AccountId) -> Vec<MailboxInfo> {
        let _ = account;
        todo!()
    }

    /// The mailbox by name (INBOX matched case-insensitively).
    pub fn mailbox_by_name(&self, account: AccountId, name: &str) -> Option<MailboxView> {
        let _ = (account, name);
        todo!()
    }

    pub fn mailbox_view(&self, account: AccountId, mailbox: MailboxId) -> Option<MailboxView> {
        let _ = (account, mailbox);
        todo!()
    }

    /// The raw bytes of a stored message.
    pub async fn body(&self, blob: BlobId) -> Result<Arc<Vec<u8>>, StoreError> {
        let _ = blob;
        todo!()
    }

    /// Every applied change to any mailbox. A lagged receiver should treat every selected
    /// mailbox as changed.
    pub fn subscribe_changes(&self) -> tokio::sync::broadcast::Receiver<MailboxChanged> {
        todo!()
    }

    // ----- IMAP writes -----

    pub async fn create_mailbox(
        &self,
        account: AccountId,
        name: &str,
        special_use: Option<SpecialUse>,
    ) -> Result<MailboxId, StoreError> {
        let _ = (account, name, special_use);
        todo!()
    }

    pub async fn delete_mailbox(&self, account: AccountId, name: &str) -> Result<(), StoreError> {
        let _ = (account, name);
        todo!()
    }

    /// RFC 3501 RENAME, children included; renaming INBOX moves its messages to a new mailbox
    /// and leaves INBOX empty.
    pub async fn rename_mailbox(
        &self,
        account: AccountId,
        from: &str,
        to: &str,
    ) -> Result<(), StoreError> {
        let _ = (account, from, to);
        todo!()
    }

    /// Subscription is by name and may name a mailbox that does not exist.
    pub async fn set_subscribed(
        &self,
        account: AccountId,
        name: &str,
        subscribed: bool,
    ) -> Result<(), StoreError> {
        let _ = (account, name, subscribed);
        todo!()
    }

    pub fn subscriptions(&self, account: AccountId) -> Vec<String> {
        let _ = account;
        todo!()
    }

    /// Returns (UIDVALIDITY, UID) of the new message.
    pub async fn append(
        &self,
        account: AccountId,
        mailbox: MailboxId,
        flags: FlagSet,
        internal_date: i64,
        internal_date_offset_min: i16,
        body: Vec<u8>,
    ) -> Result<(u32, Uid), StoreError> {
        let _ = (
            account,
            mailbox,
            flags,
            internal_date,
            internal_date_offset_min,
            body,
        );
        todo!()
    }

    /// Returns the new flags of every message that still exists among `uids`.
    pub async fn store_flags(
        &self,
        account: AccountId,
        mailbox: MailboxId,
        uids: Vec<Uid>,
        op: FlagOp,
        flags: FlagSet,
    ) -> Result<Vec<(Uid, FlagSet)>, StoreError> {
        let _ = (account, mailbox, uids, op, flags);
        todo!()
    }

    /// Removes the messages flagged \Deleted (only those among `uids` when given); returns
    /// their UIDs, ascending.
    pub async fn expunge(
        &self,
        account: AccountId,
        mailbox: MailboxId,
        uids: Option<Vec<Uid>>,
    ) -> Result<Vec<Uid>, StoreError> {
        let _ = (account, mailbox, uids);
        todo!()
    }

    /// Returns the destination's UIDVALIDITY and (source UID, new UID) pairs.
    pub async fn copy(
        &self,
        account: AccountId,
        from: MailboxId,
        uids: Vec<Uid>,
        to: MailboxId,
    ) -> Result<(u32, Vec<(Uid, Uid)>), StoreError> {
        let _ = (account, from, uids, to);
        todo!()
    }

    /// COPY then EXPUNGE of the sources, in one command.
    pub async fn move_messages(
        &self,
        account: AccountId,
        from: MailboxId,
        uids: Vec<Uid>,
        to: MailboxId,
    ) -> Result<(u32, Vec<(Uid, Uid)>), StoreError> {
        let _ = (account, from, uids, to);
        todo!()
    }

    // ----- administration -----

    pub async fn add_domain(&self, domain: &str) -> Result<(), StoreError> {
        let _ = domain;
        todo!()
    }

    /// Refused while the domain still has accounts or aliases.
    pub async fn remove_domain(&self, domain: &str) -> Result<(), StoreError> {
        let _ = domain;
        todo!()
    }

    pub fn list_domains(&self) -> Vec<String> {
        todo!()
    }

    /// Hashes the password (argon2id) before proposing; creates INBOX, Sent, Drafts, Trash,
    /// Junk and Archive. Refuses unknown domains, duplicates and passwords under 10 characters.
    pub async fn add_account(&self, address: &str, password: &str) -> Result<AccountId, StoreError> {
        let _ = (address, password);
        todo!()
    }

    pub async fn set_password(&self, address: &str, password: &str) -> Result<(), StoreError> {
        let _ = (address, password);
        todo!()
    }

    /// Removes the account, its mailboxes and its messages.
    pub async fn remove_account(&self, address: &str) -> Result<(), StoreError> {
        let _ = address;
        todo!()
    }

    pub fn list_accounts(&self, domain: Option<&str>) -> Vec<AccountInfo> {
        let _ = domain;
        todo!()
    }

    /// `source` must be in a local domain; `target` may be local or foreign.
    pub async fn add_alias(&self, source: &str, target: &str) -> Result<(), StoreError> {
        let _ = (source, target);
        todo!()
    }

    pub async fn remove_alias(&self, source: &str, target: &str) -> Result<(), StoreError> {
        let _ = (source, target);
        todo!()
    }

    pub fn list_aliases(&self, domain: Option<&str>) -> Vec<AliasInfo> {
        let _ = domain;
        todo!()
    }

    pub fn stats(&self) -> StoreStats {
        todo!()
    }
}
