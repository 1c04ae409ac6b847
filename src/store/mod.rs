//! The mail store: the one door between mail code and the replicated mail state.
//!
//! Mail code (SMTP, IMAP, admin commands for domains, accounts and aliases) reads the local
//! replica through [`MailStore`]'s read methods and changes state only through its write
//! methods, which build a command (choosing time, ids and hashes first), propose it through a
//! [`Propose`] implementation (Raft in a node, a direct local applier in unit tests), and return
//! once it is committed and applied on this node.
//!
//! THIS FILE IS THE CONTRACT shared by the SMTP, IMAP and admin code. The signatures below are
//! fixed.
//!
//! Code map:
//! - `command.rs`: the closed, versioned command enum carried by the log ([`Propose`] bytes
//!   are bincode of `Command::V1`), and the response enum.
//! - `state.rs`: the in-memory state (BTreeMaps only) and the pure `apply`.
//! - `blob.rs`: content-addressed zstd bodies appended to pack files `blobs/pack-<seq>.dat`
//!   (in-memory index, `.idx` per sealed pack, background compaction), staging, deferred
//!   deletion, the cache of decompressed bodies.
//! - `snapshot.rs`: the snapshot stream (state + a reference to every body + BLAKE3 trailer;
//!   the stream sent to a follower inlines the bodies).
//! - `names.rs`: syntax of domains, addresses, mailbox names and keywords.
//! - `quota.rs`: per-account quotas (limits, usage, their apply; `[store]`).
//! - here: [`MailStateMachine`] (the `kermail_cluster::AppStateMachine` the cluster drives),
//!   [`LocalProposer`] (direct apply for tests) and [`MailStore`].
//!
//! The write path of a message: the session's call compresses and hashes the body and writes
//! its file (staging, on a blocking thread), proposes the command (which carries the
//! compressed bytes, so followers and replays can write the file), and answers once the
//! command is committed and applied here. Apply on the proposing node only checks the staged
//! file. Body records are not fsync'd when written: the log holds every body until a snapshot,
//! a snapshot fsyncs the packs before it is kept and pins the bodies it references, and the
//! cluster restores its last snapshot before replaying the log at start (it does), which
//! rewrites any record lost in a crash.
//!
//! Storage faults: a body that cannot be written during apply (no space left, an I/O error)
//! is kept in memory ([`UNWRITTEN_BODIES_BYTES_MAX`]) and retried; meanwhile, and while the
//! cluster's log store or snapshots report a failure, the shared
//! [`kermail_cluster::StorageHealth`] is failed and every write is refused with
//! [`StoreError::StorageFailed`] (SMTP `451 4.3.1`). New messages are also refused
//! ([`StoreError::InsufficientStorage`], SMTP `452 4.3.1`) while the data folder's free space
//! is under the reserve ([`MailStateMachine::set_min_free_disk_bytes`]).

mod acl_api;
mod acl_state;
mod backup_state;
pub mod bayes;
mod blob;
mod body;
mod command;
mod imap_state;
mod message_list;
mod multiappend_state;
mod names;
mod outbound_api;
mod queue;
mod quota;
mod savedate_state;
mod sieve_api;
pub mod sieve_state;
mod snapshot;
mod snapshot_chunks;
mod state;

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, Weak};

use kermail_cluster::{StorageComponent, StorageHealth};

use serde::{Deserialize, Serialize};

pub use acl_api::{SharedMailbox, ANYONE};
pub use acl_state::{Grantee, Rights, RightsChange, RIGHT_LETTERS};
pub use backup_state::{
    BackupKey, BackupLease, BackupMeta, BackupState, BackupSuccess, BackupView, CommandV4,
    RESTORE_BASE_FILE,
};
use blob::BlobStore;
pub use blob::BlobStore as BodyStore;
use command::{
    decode_command, decode_response, encode_command, encode_response, uids_to_ranges, ApplyError,
    BodyV1, Command, CommandV1, CommandV2, CommandV3, Response,
};
pub use outbound_api::{looks_like_srs, srs_reverse, srs_rewrite, AcceptReceipt};
pub use queue::{
    AttemptVerdict, Lease, QueueEntry, QueueId, QueueRecipient, RecipientResult, RecipientStatus,
    MAX_QUEUE_ENTRIES,
};
pub use quota::{
    AccountQuota, QuotaLimits, QuotaReport, QuotaSetting, StoreConfig, Usage as QuotaUsage,
    DEFAULT_QUOTA_BYTES, DEFAULT_QUOTA_MESSAGES,
};
pub use sieve_api::{FilterSettings, GreylistVerdict, ScriptInfo};
use state::State;

/// The largest message the store accepts, in bytes (SMTP and IMAP limits must stay below).
pub use body::{BodyWriter, MessageBody, BODY_MEMORY_BYTES_MAX};
pub use command::{SrsKey, MAX_MESSAGE_BYTES};
pub use message_list::{diff as diff_message_lists, Diff as MessageListDiff, MessageList};
pub use multiappend_state::MAX_MESSAGES_PER_MULTIAPPEND;
/// The most envelope recipients one delivery may name.
pub use state::MAX_RECIPIENTS_PER_DELIVERY;

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
    /// RFC 7162 modification sequence of the message's last change (append, copy, flags);
    /// the same on every replica (`imap_state.rs`). The field is last, so a message chunk of
    /// a snapshot from before it is recognized (`decode_legacy_messages`).
    #[serde(default)]
    pub modseq: u64,
    /// RFC 8514 save date: when the message was saved into this mailbox (APPEND, delivery,
    /// COPY, MOVE), seconds since the Unix epoch, chosen by the proposer
    /// (`savedate_state.rs`); 0 when unknown (stored before save dates were kept). A u32
    /// fills the struct's padding, so a message costs no more memory. Not serialized with
    /// the struct (backups, whole-state snapshots keep their layout): a snapshot's message
    /// chunks carry it in their own format (`savedate_state::encode_message_chunk`).
    #[serde(skip)]
    pub saved_at: u32,
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
    /// HIGHESTMODSEQ (RFC 7162).
    pub highest_modseq: u64,
}

/// A point-in-time copy of a mailbox's message list (for SELECT, FETCH, SEARCH, NOOP/IDLE).
#[derive(Clone, Debug)]
pub struct MailboxView {
    pub id: MailboxId,
    pub name: String,
    pub uidvalidity: u32,
    pub uidnext: Uid,
    /// Sorted by UID.
    pub messages: MessageList,
    /// Increases with every applied change to this mailbox (its messages or their flags).
    pub change_counter: u64,
    /// How many keywords the mailbox knows (they are never forgotten, so a greater count
    /// means new ones: [`MailStore::mailbox_keywords`]).
    pub keyword_count: usize,
    /// HIGHESTMODSEQ (RFC 7162), read under the same lock as `messages`.
    pub highest_modseq: u64,
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
    /// An SRS address our forwarding made (hash and age check): it takes bounces (null
    /// sender) only, which go back to the original sender.
    SrsBounce,
}

/// A message accepted by SMTP for local recipients.
#[derive(Debug)]
pub struct Delivery {
    /// The envelope sender ("" for the null sender).
    pub mail_from: String,
    /// Envelope recipients, each already checked as [`RecipientCheck::Local`].
    pub recipients: Vec<String>,
    /// The message as it will be stored (trace headers already prepended); a large one is
    /// partly in a temporary file.
    pub body: MessageBody,
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
    /// The write would bring an account over its quota; nothing was stored. SMTP answers
    /// `552 5.2.2`, IMAP `NO [OVERQUOTA]`.
    #[error("{0}")]
    OverQuota(String),
    #[error("storage error: {0}")]
    Io(String),
    /// This node's storage failed (no space left, an I/O error): writes are refused until it
    /// recovers. Nothing was stored. SMTP `451 4.3.1`, IMAP `NO [UNAVAILABLE]`.
    #[error("the storage of this node failed ({0}); writes are refused until it recovers")]
    StorageFailed(String),
    /// The data folder's free space is under the configured reserve: new messages are refused.
    /// Nothing was stored. SMTP `452 4.3.1`, IMAP `NO [LIMIT]`.
    #[error("insufficient storage on this node: {0}")]
    InsufficientStorage(String),
    /// The recipient's Sieve script rejected the message (RFC 5429); nothing was stored.
    /// SMTP `550 5.7.1` with the reason.
    #[error("rejected by the recipient: {0}")]
    Rejected(String),
    /// ACL: the account lacks a right on another account's mailbox (RFC 4314); nothing was
    /// changed. IMAP `NO [NOPERM]`.
    #[error("permission denied: {0}")]
    NoPermission(String),
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Proposes an encoded command and resolves to the encoded response once the command is
/// committed and applied on this node.
pub trait Propose: Send + Sync + 'static {
    fn propose(&self, command: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, StoreError>>;
}

/// Capacity of the change broadcast: a receiver that falls further behind gets `Lagged` and
/// treats every selected mailbox as changed.
pub const CHANGE_CHANNEL_CAPACITY: usize = 1024;
/// Passwords are at least this many characters.
pub const MIN_PASSWORD_CHARS: usize = 10;
/// And at most this many bytes (argon2 would take more, but nobody types that).
pub const MAX_PASSWORD_BYTES: usize = 1024;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Bodies whose write failed during apply are kept in memory up to this many bytes and
/// retried; beyond it they are dropped and only a restart (which replays the log still holding
/// them: no snapshot is written meanwhile) writes them.
pub const UNWRITTEN_BODIES_BYTES_MAX: usize = 256 * 1024 * 1024;

/// Bodies committed and applied whose record could not be written yet.
#[derive(Default)]
struct Unwritten {
    bodies: BTreeMap<BlobId, Vec<u8>>,
    bytes: usize,
    /// Bodies dropped over the bound: a snapshot is refused while any is listed.
    dropped: std::collections::BTreeSet<BlobId>,
    /// The OS error of the last failure (given back to a snapshot that must wait).
    last_os_error: Option<i32>,
}

/// The replicated mail state machine: the cluster applies committed commands to it in log
/// order; the store reads it. Readers take the lock briefly and never do I/O under it.
pub struct MailStateMachine {
    state: RwLock<State>,
    blobs: Arc<BlobStore>,
    /// The metadata chunks of this node's snapshots (`snapshot_chunks.rs`).
    chunks: Arc<snapshot_chunks::ChunkStore>,
    data_dir: PathBuf,
    health: Arc<StorageHealth>,
    unwritten: Mutex<Unwritten>,
    /// New messages are refused while the data folder has less free space than this.
    min_free_disk_bytes: AtomicU64,
    self_ref: Weak<MailStateMachine>,
    changes: tokio::sync::broadcast::Sender<MailboxChanged>,
    /// Accounts whose mailbox names or subscriptions changed ([`MailStore::subscribe_listings`]).
    listings: tokio::sync::broadcast::Sender<AccountId>,
    /// Serializes apply and restore (the cluster already calls them one at a time).
    apply_lock: Mutex<()>,
    last_applied: AtomicU64,
    /// Fired when a queue entry is added or made due (the delivery worker waits on it).
    queue_changed: tokio::sync::Notify,
}

impl MailStateMachine {
    /// Opens the state machine over `data_dir` (bodies in `data_dir/blobs`). The state starts
    /// empty: the cluster restores its last snapshot and replays the log after it.
    pub fn open(data_dir: &Path) -> Result<Arc<Self>, StoreError> {
        let blobs = BlobStore::open(data_dir.join("blobs")).map_err(|e| {
            StoreError::Io(format!(
                "cannot create the blob folder in {}: {e}",
                data_dir.display()
            ))
        })?;
        let chunks = snapshot_chunks::ChunkStore::open(data_dir.join(snapshot_chunks::CHUNK_DIR))
            .map_err(|e| {
            StoreError::Io(format!(
                "cannot open the snapshot chunk folder in {}: {e}",
                data_dir.display()
            ))
        })?;
        let (changes, _) = tokio::sync::broadcast::channel(CHANGE_CHANNEL_CAPACITY);
        let (listings, _) = tokio::sync::broadcast::channel(CHANGE_CHANNEL_CAPACITY);
        // A folder made by `kermail restore --to` starts from the restored state (issue 11).
        let initial = backup_state::load_restore_base(data_dir, &blobs)?.unwrap_or_default();
        Ok(Arc::new_cyclic(|self_ref| MailStateMachine {
            state: RwLock::new(initial),
            blobs,
            chunks,
            data_dir: data_dir.to_path_buf(),
            health: Arc::new(StorageHealth::new()),
            unwritten: Mutex::new(Unwritten::default()),
            min_free_disk_bytes: AtomicU64::new(0),
            self_ref: self_ref.clone(),
            changes,
            listings,
            apply_lock: Mutex::new(()),
            last_applied: AtomicU64::new(0),
            queue_changed: tokio::sync::Notify::new(),
        }))
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The log index of the last command applied (0 after a restore or at start).
    pub fn last_applied_index(&self) -> u64 {
        self.last_applied.load(Ordering::Acquire)
    }

    fn notify(&self, changed: impl IntoIterator<Item = MailboxChanged>) {
        for change in changed {
            // No receiver is fine: nobody is idling.
            let _ = self.changes.send(change);
        }
    }

    /// Ends one staging of a body. Serialized with apply, so that a command carrying the
    /// same body cannot be between writing its file and referencing it meanwhile.
    fn unstage(&self, blob: &BlobId) {
        let _serial = lock(&self.apply_lock);
        self.unstage_serialized(blob);
    }

    /// [`MailStateMachine::unstage`] if no apply or restore is running right now (it never
    /// waits, so an async task may call it); false if the caller must unstage on a blocking
    /// thread instead.
    fn try_unstage(&self, blob: &BlobId) -> bool {
        match self.apply_lock.try_lock() {
            Ok(_serial) => {
                self.unstage_serialized(blob);
                true
            }
            Err(std::sync::TryLockError::Poisoned(poisoned)) => {
                let _serial = poisoned.into_inner();
                self.unstage_serialized(blob);
                true
            }
            Err(std::sync::TryLockError::WouldBlock) => false,
        }
    }

    fn unstage_serialized(&self, blob: &BlobId) {
        let referenced = self.read().blobs.contains_key(blob);
        self.blobs.unstage(blob, referenced);
    }

    fn write_body(&self, body: &BodyV1) {
        // Apply cannot fail half-way: a replica that cannot write a body keeps the same state
        // as the others, reports its storage as failed (writes are refused), keeps the bytes
        // and writes them when it can (see `retry_unwritten_bodies`).
        let has_unwritten = !lock(&self.unwritten).bodies.is_empty();
        if has_unwritten {
            let _ = self.retry_unwritten_bodies();
        }
        if let Err(error) = self.blobs.write(&body.blob, &body.compressed) {
            self.health
                .report_failure(StorageComponent::AppData, &error);
            let mut unwritten = lock(&self.unwritten);
            unwritten.last_os_error = error.raw_os_error().or(unwritten.last_os_error);
            if unwritten.bytes + body.compressed.len() <= UNWRITTEN_BODIES_BYTES_MAX {
                if unwritten
                    .bodies
                    .insert(body.blob, body.compressed.clone())
                    .is_none()
                {
                    unwritten.bytes += body.compressed.len();
                }
            } else {
                tracing::error!(
                    blob = %hex::encode(body.blob.0),
                    "cannot write a body and too many are waiting: it is written again by the \
                     replay of the log at the next restart"
                );
                unwritten.dropped.insert(body.blob);
            }
        }
    }

    /// Writes the bodies whose write failed during apply (those still referenced). Ok once
    /// none is waiting; the storage health recovers then. Fails with the OS error while some
    /// cannot be written.
    pub fn retry_unwritten_bodies(&self) -> io::Result<()> {
        let mut unwritten = lock(&self.unwritten);
        if unwritten.bodies.is_empty() && unwritten.dropped.is_empty() {
            if self.health.is_failed() {
                // A failed staging: see whether the disk takes a write again.
                probe_disk(&self.data_dir.join("blobs"))?;
                self.health.report_ok(StorageComponent::AppData);
            }
            return Ok(());
        }
        let ids: Vec<BlobId> = unwritten.bodies.keys().copied().collect();
        for id in ids {
            if !self.read().blobs.contains_key(&id) {
                // No longer referenced: nothing to keep.
                if let Some(bytes) = unwritten.bodies.remove(&id) {
                    unwritten.bytes -= bytes.len();
                }
                continue;
            }
            let result = match unwritten.bodies.get(&id) {
                Some(bytes) => self.blobs.write(&id, bytes),
                None => Ok(()),
            };
            match result {
                Ok(()) => {
                    if let Some(bytes) = unwritten.bodies.remove(&id) {
                        unwritten.bytes -= bytes.len();
                    }
                }
                Err(error) => {
                    unwritten.last_os_error = error.raw_os_error().or(unwritten.last_os_error);
                    return Err(error);
                }
            }
        }
        let state = self.read();
        let still_dropped = unwritten
            .dropped
            .iter()
            .any(|id| state.blobs.contains_key(id) && !self.blobs.contains(id));
        drop(state);
        if still_dropped {
            // Only a replay of the log writes these: keep the log (no snapshot) until then.
            return Err(io::Error::from_raw_os_error(
                unwritten.last_os_error.unwrap_or(libc::EIO),
            ));
        }
        unwritten.dropped.clear();
        self.health.report_ok(StorageComponent::AppData);
        Ok(())
    }

    /// The storage health this node's log store, snapshots and bodies report to.
    pub fn health(&self) -> &Arc<StorageHealth> {
        &self.health
    }

    /// New messages are refused while the data folder has less free space than this.
    pub fn set_min_free_disk_bytes(&self, bytes: u64) {
        self.min_free_disk_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Free space of the data folder's file system and the reserve, in bytes, if it is low.
    pub fn low_disk_space(&self) -> Option<(u64, u64)> {
        let reserve = self.min_free_disk_bytes.load(Ordering::Relaxed);
        if reserve == 0 {
            return None;
        }
        let free = free_disk_bytes(&self.data_dir)?;
        (free < reserve).then_some((free, reserve))
    }

    /// Refuses a write while the storage is failed.
    fn check_health(&self) -> Result<(), StoreError> {
        if self.health.is_failed() {
            let reason = self
                .health
                .failure()
                .map(|f| f.reason)
                .unwrap_or_else(|| "storage failure".to_owned());
            return Err(StoreError::StorageFailed(reason));
        }
        Ok(())
    }

    fn apply_command(&self, log_index: u64, command: Command) -> Response {
        match &command {
            Command::V1(CommandV1::Deliver { body, .. } | CommandV1::Append { body, .. }) => {
                self.write_body(body)
            }
            Command::V1(_)
            | Command::V3(_)
            | Command::V4(_)
            | Command::V6(_)
            | Command::V7(_)
            | Command::V8(_)
            | Command::V10(_) => {}
            Command::V2(command) => {
                for body in command.bodies() {
                    self.write_body(body);
                }
            }
            Command::V5(command) => {
                for body in command.bodies() {
                    self.write_body(body);
                }
            }
            Command::V9(command) => {
                for body in command.bodies() {
                    self.write_body(body);
                }
            }
            Command::V11(command) => {
                for body in command.bodies() {
                    self.write_body(body);
                }
            }
        }
        let wakes_worker = matches!(
            command,
            Command::V2(CommandV2::Accept { .. } | CommandV2::RetryQueueEntry { .. })
        ) || matches!(&command, Command::V5(command) if command.queues());
        let outcome = {
            let mut state = self
                .state
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            // Modseqs derive from the log index (the same on every replica).
            state.imap.modseq.clock = log_index;
            match command {
                Command::V1(command) => state.apply(command),
                Command::V2(command) => state.apply_v2(command),
                Command::V3(command) => state.apply_v3(command),
                Command::V4(command) => state.apply_v4(command),
                Command::V5(command) => state.apply_v5(command),
                Command::V6(command) => state.apply_v6(command),
                Command::V7(command) => state.apply_v7(command),
                Command::V8(command) => state.apply_v8(command),
                Command::V9(command) => state.apply_v9(command),
                Command::V10(command) => state.apply_v10(command),
                Command::V11(command) => state.apply_v11(command),
            }
        };
        self.blobs.release(outcome.effects.released);
        self.notify(outcome.effects.changed);
        for account in outcome.effects.listings {
            // No receiver is fine: no session watches mailbox names.
            let _ = self.listings.send(account);
        }
        if wakes_worker {
            self.queue_changed.notify_one();
        }
        outcome.response
    }
}

impl kermail_cluster::AppStateMachine for MailStateMachine {
    fn apply(&self, log_index: u64, command: &[u8]) -> Vec<u8> {
        let _serial = lock(&self.apply_lock);
        let response = match decode_command(command) {
            Ok(command) => {
                tracing::debug!(log_index, ?command, "apply");
                self.apply_command(log_index, command)
            }
            Err(error) => {
                tracing::warn!(log_index, %error, "undecodable command in the log");
                Response::Refused(ApplyError::Invalid("undecodable command".into()))
            }
        };
        self.last_applied.store(log_index, Ordering::Release);
        encode_response(&response)
    }

    fn begin_snapshot(&self) -> Box<dyn kermail_cluster::SnapshotBuilder> {
        let state = self.read();
        // Taken under the state lock: a body dropped after this point is not deleted until the
        // build is done, so every file of the captured state stays readable.
        let guard = self.blobs.begin_read();
        let mark = self.blobs.snapshot_captured();
        Box::new(snapshot::Builder {
            state: state.capture(),
            blobs: self.blobs.clone(),
            chunks: self.chunks.clone(),
            _guard: guard,
            machine: self.self_ref.clone(),
            mark,
            build: self.chunks.begin_build(),
            written: Mutex::new(None),
        })
    }

    fn write_transfer(
        &self,
        local_snapshot: &mut dyn io::Read,
        out: &mut dyn io::Write,
    ) -> io::Result<()> {
        snapshot::write_transfer(local_snapshot, &self.blobs, &self.chunks, out)
    }

    fn missing_objects(
        &self,
        snapshot: &mut dyn io::Read,
    ) -> io::Result<Vec<kermail_cluster::ObjectRef>> {
        Ok(snapshot::missing_bodies(snapshot, &self.blobs)?
            .into_iter()
            .map(|(id, len)| kermail_cluster::ObjectRef { id: id.0, len })
            .collect())
    }

    fn read_objects(
        &self,
        ids: &[kermail_cluster::ObjectId],
        max_bytes: u64,
    ) -> Vec<Option<Vec<u8>>> {
        // Keeps every body readable while it is copied (a deletion waits for the guard), and
        // the bodies of the snapshot the peer is installing for a while longer (a snapshot
        // kept here meanwhile would otherwise delete those released since).
        self.blobs.hold_deletions(snapshot::FETCH_HOLD);
        let _guard = self.blobs.begin_read();
        let mut total = 0u64;
        ids.iter()
            .map(|id| {
                if total >= max_bytes {
                    return None;
                }
                let mut body = self.blobs.open_compressed(&BlobId(*id)).ok()?;
                let mut bytes = Vec::with_capacity(body.remaining_bytes() as usize);
                match io::Read::read_to_end(&mut body, &mut bytes) {
                    Ok(_) => {
                        total += bytes.len() as u64;
                        Some(bytes)
                    }
                    Err(error) => {
                        tracing::warn!(blob = %hex::encode(id), %error, "cannot read a body a peer asked for");
                        None
                    }
                }
            })
            .collect()
    }

    fn store_object(&self, id: &kermail_cluster::ObjectId, bytes: &[u8]) -> io::Result<()> {
        // Checked against its content address before it enters the packs.
        self.blobs
            .write_from(&BlobId(*id), bytes.len() as u64, &mut &bytes[..])
    }

    fn storage_health(&self) -> Arc<StorageHealth> {
        self.health.clone()
    }

    fn restore(&self, input: &mut dyn io::Read, local: bool) -> io::Result<()> {
        let _serial = lock(&self.apply_lock);
        let restored = snapshot::read_snapshot(input, &self.blobs, &self.chunks, local)?;
        // The restored state is the kept snapshot now: what it references stays.
        self.blobs.snapshot_restored();
        let old = {
            let mut state = self
                .state
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            std::mem::replace(&mut *state, restored)
        };
        let (changed, keep, listings) = {
            let state = self.read();
            let mut changed = Vec::new();
            let mut listings = std::collections::BTreeSet::new();
            for snapshot in [&old, &*state] {
                for account in snapshot.accounts.values() {
                    listings.insert(account.id);
                    changed.extend(account.mailboxes.keys().map(|&mailbox| MailboxChanged {
                        account: account.id,
                        mailbox,
                    }));
                }
            }
            (changed, state.blobs.clone(), listings)
        };
        match self.blobs.sweep(&keep) {
            Ok(removed) if removed > 0 => {
                tracing::info!(removed, "removed bodies no longer referenced")
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "cannot sweep the blob folder"),
        }
        self.last_applied.store(0, Ordering::Release);
        self.notify(changed);
        for account in listings {
            let _ = self.listings.send(account);
        }
        Ok(())
    }
}

/// For fuzzing only (`fuzz/`): whether an encoded [`kermail_cluster::AppStateMachine::apply`]
/// response is a refusal; `None` if the bytes are not a response.
#[doc(hidden)]
pub fn fuzz_response_is_refused(response: &[u8]) -> Option<bool> {
    decode_response(response)
        .ok()
        .map(|response| matches!(response, Response::Refused(_)))
}

/// Applies commands directly, in order, without Raft: for unit tests of SMTP, IMAP and admin.
pub struct LocalProposer {
    machine: Arc<MailStateMachine>,
    next_index: Arc<Mutex<u64>>,
}

impl LocalProposer {
    pub fn new(machine: Arc<MailStateMachine>) -> Self {
        LocalProposer {
            machine,
            next_index: Arc::new(Mutex::new(0)),
        }
    }
}

impl Propose for LocalProposer {
    fn propose(&self, command: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, StoreError>> {
        let machine = self.machine.clone();
        let next_index = self.next_index.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                use kermail_cluster::AppStateMachine;
                let mut index = lock(&next_index);
                *index += 1;
                machine.apply(*index, &command)
            })
            .await
            .map_err(|e| StoreError::Unavailable(format!("local apply failed: {e}")))
        })
    }
}

/// The handle every part of the mail node uses. Cheap to clone.
#[derive(Clone)]
pub struct MailStore {
    machine: Arc<MailStateMachine>,
    proposer: Arc<dyn Propose>,
    password_params: argon2::Params,
    /// Verified against when the account does not exist, so that a login to an unknown
    /// account costs the same time as a wrong password.
    dummy_hash: Arc<OnceLock<String>>,
    /// Login throttling shared by IMAP and SMTP AUTH ([`MailStore::authenticate_from`]).
    login_throttle: Arc<crate::auth::LoginThrottle>,
    /// Sieve at delivery and greylisting (`sieve_api.rs`).
    filters: Arc<sieve_api::FilterSettings>,
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn hash_password(params: &argon2::Params, password: &str) -> Result<String, StoreError> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes)
        .map_err(|e| StoreError::Io(format!("cannot encode a salt: {e}")))?;
    let argon = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        params.clone(),
    );
    argon
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| StoreError::Io(format!("cannot hash the password: {e}")))
}

fn verify_password(hash: &str, password: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    match PasswordHash::new(hash) {
        Ok(parsed) => argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

fn check_password_rules(password: &str) -> Result<(), StoreError> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(StoreError::Invalid(format!(
            "password must be at least {MIN_PASSWORD_CHARS} characters"
        )));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(StoreError::Invalid(format!(
            "password must be at most {MAX_PASSWORD_BYTES} bytes"
        )));
    }
    Ok(())
}

fn unexpected(response: Response) -> StoreError {
    StoreError::Io(format!(
        "unexpected response from the state machine: {response:?}"
    ))
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| StoreError::Io(format!("blocking task failed: {e}")))?
}

/// A body written ahead of its proposal; dropping it (answered, refused or abandoned) ends the
/// staging, which deletes the file if no message references it.
struct StagedBody {
    machine: Option<Arc<MailStateMachine>>,
    blob: BlobId,
}

impl StagedBody {
    /// Ends the staging once the proposal is answered, before the caller answers its client.
    async fn finish(mut self) {
        if let Some(machine) = self.machine.take() {
            let blob = self.blob;
            // Usually apply is idle and this takes microseconds: no blocking thread for it.
            if !machine.try_unstage(&blob) {
                let _ = tokio::task::spawn_blocking(move || machine.unstage(&blob)).await;
            }
        }
    }
}

impl Drop for StagedBody {
    /// The proposal was abandoned (its session went away): end the staging in the background.
    fn drop(&mut self) {
        let Some(machine) = self.machine.take() else {
            return;
        };
        let blob = self.blob;
        let unstage = move || machine.unstage(&blob);
        // Unstaging waits for the apply in progress (which may be a long restore): never on an
        // async worker thread.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(unstage)),
            Err(_) => unstage(),
        }
    }
}

/// Compresses and hashes a body and writes its file, on a blocking thread: the proposer's
/// work, done in parallel by concurrent sessions, so that apply only checks the file is there.
async fn prepare_body(
    machine: &Arc<MailStateMachine>,
    body: impl Into<MessageBody>,
) -> Result<(BodyV1, StagedBody), StoreError> {
    let body: MessageBody = body.into();
    if body.len() > MAX_MESSAGE_BYTES {
        return Err(StoreError::Invalid(format!(
            "message is larger than {MAX_MESSAGE_BYTES} bytes"
        )));
    }
    machine.check_health()?;
    let machine = machine.clone();
    blocking(move || {
        if let Some((free, reserve)) = machine.low_disk_space() {
            return Err(StoreError::InsufficientStorage(format!(
                "{} MB free in the data folder, under the reserve of {} MB",
                free / (1024 * 1024),
                reserve / (1024 * 1024)
            )));
        }
        let (blob, compressed) = body
            .hash_and_compress()
            .map_err(|e| StoreError::Io(format!("cannot compress: {e}")))?;
        machine.blobs.stage(&blob, &compressed).map_err(|error| {
            tracing::warn!(blob = %hex::encode(blob.0), %error, "cannot write a body");
            if kermail_cluster::health::is_retryable(&error) {
                machine
                    .health
                    .report_failure(StorageComponent::AppData, &error);
                StoreError::StorageFailed(kermail_cluster::health::reason(&error))
            } else {
                StoreError::Io(format!("cannot write the message body: {error}"))
            }
        })?;
        let staged = StagedBody {
            machine: Some(machine),
            blob,
        };
        Ok((
            BodyV1 {
                blob,
                raw_size: body.len() as u32,
                compressed,
            },
            staged,
        ))
    })
    .await
}

/// Bytes the storage probe writes (and fsyncs, then removes) to see whether the disk takes
/// writes again after a failure.
const PROBE_BYTES: usize = 64 * 1024;

/// Writes, fsyncs and removes a probe file in `dir`.
fn probe_disk(dir: &Path) -> io::Result<()> {
    use std::io::Write as _;
    let path = dir.join("storage-probe.tmp");
    let result = (|| {
        let mut file = std::fs::File::create(&path)?;
        file.write_all(&[0u8; PROBE_BYTES])?;
        file.sync_all()
    })();
    let _ = std::fs::remove_file(&path);
    result
}

/// Free space (for unprivileged users) of the file system holding `path`, in bytes.
pub fn free_disk_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a zeroed statvfs the call fills in.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    if rc != 0 {
        return None;
    }
    Some((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

fn mailbox_view(state: &State, account: AccountId, mailbox: &state::Mailbox) -> MailboxView {
    MailboxView {
        highest_modseq: state.imap.modseq.highest(account, mailbox.id),
        id: mailbox.id,
        name: mailbox.name.clone(),
        uidvalidity: mailbox.uidvalidity,
        uidnext: mailbox.uidnext,
        messages: mailbox.messages.clone(),
        change_counter: mailbox.change_counter,
        keyword_count: mailbox.keywords.len(),
    }
}

impl MailStore {
    /// A store over a state machine and the proposer that reaches it (Raft in a node).
    pub fn new(machine: Arc<MailStateMachine>, proposer: Arc<dyn Propose>) -> MailStore {
        MailStore {
            machine,
            proposer,
            password_params: argon2::Params::default(),
            dummy_hash: Arc::new(OnceLock::new()),
            login_throttle: Arc::new(crate::auth::LoginThrottle::new(Default::default())),
            filters: Arc::new(sieve_api::FilterSettings::default()),
        }
    }

    /// The same store with login throttling configured by `config` (`[auth]`).
    pub fn with_login_throttle(mut self, config: crate::auth::ThrottleConfig) -> MailStore {
        self.login_throttle = Arc::new(crate::auth::LoginThrottle::new(config));
        self
    }

    /// [`MailStore::authenticate`] for a login from `client`, through the node's login
    /// throttle (per client address and per account delays, bounded password checks at
    /// once). `Err` means refused before any check: too many recent failures.
    pub async fn authenticate_from(
        &self,
        client: std::net::IpAddr,
        address: &str,
        password: &str,
    ) -> Result<Option<AccountId>, crate::auth::Throttled> {
        let attempt = self.login_throttle.begin(client, address).await?;
        let verified = self.authenticate(address, password).await;
        attempt.finish(verified.is_some());
        Ok(verified)
    }

    /// Opens (or creates) a store in `data_dir` whose commands are applied directly, without
    /// Raft: for unit and session tests. Nodes build the store over the cluster instead.
    ///
    /// The state lives in memory only (bodies go to `data_dir/blobs`), and passwords are hashed
    /// with argon2id at its minimum cost so that tests stay fast; verification reads the cost
    /// from each hash, so both kinds verify alike.
    pub fn open_local(data_dir: &std::path::Path) -> Result<MailStore, StoreError> {
        let machine = MailStateMachine::open(data_dir)?;
        let proposer = Arc::new(LocalProposer::new(machine.clone()));
        let mut store = MailStore::new(machine, proposer);
        store.password_params = argon2::Params::new(argon2::Params::MIN_M_COST, 1, 1, None)
            .map_err(|e| StoreError::Invalid(format!("argon2 parameters: {e}")))?;
        Ok(store)
    }

    /// The state machine under this store (for the node wiring and tests).
    pub fn machine(&self) -> &Arc<MailStateMachine> {
        &self.machine
    }

    /// The folder of temporary files (message bodies being received): `tmp` in the data
    /// folder. Its files are unlinked at creation.
    pub fn spool_dir(&self) -> PathBuf {
        self.machine.data_dir.join(body::TMP_DIR_NAME)
    }

    fn state(&self) -> RwLockReadGuard<'_, State> {
        self.machine.read()
    }

    async fn submit(&self, command: CommandV1) -> Result<Response, StoreError> {
        self.submit_command(Command::V1(command)).await
    }

    async fn submit_v2(&self, command: CommandV2) -> Result<Response, StoreError> {
        self.submit_command(Command::V2(command)).await
    }

    /// Proposes a command and turns a refusal by the state machine into an error.
    async fn submit_command(&self, command: Command) -> Result<Response, StoreError> {
        self.machine.check_health()?;
        let bytes = encode_command(&command)
            .map_err(|e| StoreError::Invalid(format!("command cannot be encoded: {e}")))?;
        let reply = self.proposer.propose(bytes).await?;
        match decode_response(&reply)
            .map_err(|e| StoreError::Io(format!("undecodable response: {e}")))?
        {
            Response::Refused(error) => Err(error.into()),
            response => Ok(response),
        }
    }

    /// Proposes a command that saves messages (APPEND, COPY, MOVE, MULTIAPPEND) with this
    /// node's clock as their save date (RFC 8514, `savedate_state.rs`).
    async fn submit_saved(
        &self,
        command: savedate_state::SavedCommand,
    ) -> Result<Response, StoreError> {
        self.submit_command(Command::V11(savedate_state::CommandV11::Saved {
            saved_at: now_secs(),
            command,
        }))
        .await
    }

    async fn submit_done(&self, command: CommandV1) -> Result<(), StoreError> {
        match self.submit(command).await? {
            Response::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn hash(&self, password: &str) -> Result<String, StoreError> {
        check_password_rules(password)?;
        let params = self.password_params.clone();
        let password = password.to_string();
        blocking(move || hash_password(&params, &password)).await
    }

    // ----- accounts and authentication -----

    /// Checks a password (argon2id, on a blocking thread). The address is case-insensitive.
    pub async fn authenticate(&self, address: &str, password: &str) -> Option<AccountId> {
        if password.len() > MAX_PASSWORD_BYTES {
            return None;
        }
        let found = names::normalize_address(address).ok().and_then(|address| {
            self.state()
                .account_by_address(&address)
                .map(|account| (account.id, account.password_hash.clone()))
        });
        let password = password.to_string();
        let params = self.password_params.clone();
        let dummy = self.dummy_hash.clone();
        let verified = tokio::task::spawn_blocking(move || match found {
            Some((id, hash)) => verify_password(&hash, &password).then_some(id),
            None => {
                let hash = dummy.get_or_init(|| {
                    hash_password(&params, "kermail-no-such-account").unwrap_or_default()
                });
                let _ = verify_password(hash, &password);
                None
            }
        })
        .await;
        verified.ok().flatten()
    }

    pub fn account_address(&self, account: AccountId) -> Option<String> {
        self.state()
            .accounts
            .get(&account)
            .map(|a| a.address.clone())
    }

    /// The addresses `account` may send as (submission's sender check): its own address and
    /// every alias source whose expansion (nested aliases included) reaches it, sorted and
    /// normalized (lowercase). Empty for an unknown account.
    pub fn sender_addresses(&self, account: AccountId) -> Vec<String> {
        let state = self.state();
        let Some(own) = state.accounts.get(&account).map(|a| a.address.clone()) else {
            return Vec::new();
        };
        let mut addresses = vec![own];
        for source in state.aliases.keys() {
            let mut accounts = Vec::new();
            state.expand_recipient(
                source,
                &mut std::collections::BTreeSet::new(),
                &mut accounts,
                &mut std::collections::BTreeSet::new(),
            );
            if accounts.contains(&account) && !addresses.contains(source) {
                addresses.push(source.clone());
            }
        }
        addresses.sort();
        addresses
    }

    // ----- SMTP -----

    pub fn is_local_domain(&self, domain: &str) -> bool {
        names::normalize_domain(domain).is_ok_and(|domain| self.state().domains.contains(&domain))
    }

    pub fn check_recipient(&self, address: &str) -> RecipientCheck {
        let Some((_, domain)) = address.trim().rsplit_once('@') else {
            return RecipientCheck::UnknownUser;
        };
        if !self.is_local_domain(domain) {
            return RecipientCheck::ForeignDomain;
        }
        let Ok(address) = names::normalize_address(address) else {
            return RecipientCheck::UnknownUser;
        };
        // Local when at least one local account would receive it or an alias forwards it
        // outside (queued by `accept`); an alias whose targets are all dangling is unknown, as
        // delivery would store nothing.
        let state = self.state();
        let mut accounts = Vec::new();
        let mut forwards = Vec::new();
        state.expand_with_forwards(&address, &mut accounts, &mut forwards);
        if !accounts.is_empty() || !forwards.is_empty() {
            RecipientCheck::Local
        } else if self.is_srs_address(&address) {
            RecipientCheck::SrsBounce
        } else {
            RecipientCheck::UnknownUser
        }
    }

    /// Stores one message for its local recipients in one command: each recipient's account
    /// (aliases expanded during apply) gets it in INBOX.
    pub async fn deliver(&self, delivery: Delivery) -> Result<DeliveryReceipt, StoreError> {
        if delivery.recipients.is_empty() {
            return Err(StoreError::Invalid("a delivery needs a recipient".into()));
        }
        if delivery.recipients.len() > state::MAX_RECIPIENTS_PER_DELIVERY {
            return Err(StoreError::Invalid(format!(
                "more than {} recipients",
                state::MAX_RECIPIENTS_PER_DELIVERY
            )));
        }
        let (body, staged) = prepare_body(&self.machine, delivery.body).await?;
        let blob = body.blob;
        let command = CommandV1::Deliver {
            mail_from: delivery.mail_from,
            recipients: delivery.recipients,
            received_at: delivery.received_at,
            body,
        };
        let result = self.submit(command).await;
        staged.finish().await;
        match result? {
            Response::Delivered(delivered) => Ok(DeliveryReceipt { blob, delivered }),
            other => Err(unexpected(other)),
        }
    }

    // ----- IMAP reads (local replica) -----

    /// Every mailbox of the account, sorted by name.
    pub fn list_mailboxes(&self, account: AccountId) -> Vec<MailboxInfo> {
        let state = self.state();
        let Some(account) = state.accounts.get(&account) else {
            return Vec::new();
        };
        account
            .names
            .values()
            .filter_map(|id| account.mailboxes.get(id))
            .map(|mailbox| MailboxInfo {
                highest_modseq: state.imap.modseq.highest(account.id, mailbox.id),
                id: mailbox.id,
                name: mailbox.name.clone(),
                special_use: mailbox.special_use,
                subscribed: account.subscriptions.contains(&mailbox.name),
                uidvalidity: mailbox.uidvalidity,
                uidnext: mailbox.uidnext,
                exists: mailbox.messages.len() as u32,
                unseen: mailbox
                    .messages
                    .iter()
                    .filter(|m| !m.flags.contains(&Flag::Seen))
                    .count() as u32,
            })
            .collect()
    }

    /// The mailbox by name (INBOX matched case-insensitively).
    pub fn mailbox_by_name(&self, account: AccountId, name: &str) -> Option<MailboxView> {
        let name = names::normalize_mailbox_name(name).ok()?;
        let state = self.state();
        state
            .accounts
            .get(&account)?
            .mailbox_by_name(&name)
            .map(|mailbox| mailbox_view(&state, account, mailbox))
    }

    pub fn mailbox_view(&self, account: AccountId, mailbox: MailboxId) -> Option<MailboxView> {
        let state = self.state();
        state
            .accounts
            .get(&account)?
            .mailboxes
            .get(&mailbox)
            .map(|mailbox| mailbox_view(&state, account, mailbox))
    }

    /// The raw bytes of a stored message if they are in the body cache (no I/O, no blocking
    /// thread): bodies are immutable and content-addressed, so a cached one is never stale.
    pub fn cached_body(&self, blob: &BlobId) -> Option<Arc<Vec<u8>>> {
        self.machine.blobs.cached(blob)
    }

    /// The raw bytes of a stored message.
    pub async fn body(&self, blob: BlobId) -> Result<Arc<Vec<u8>>, StoreError> {
        if let Some(body) = self.machine.blobs.cached(&blob) {
            return Ok(body);
        }
        let raw_size = self.state().blobs.get(&blob).map(|info| info.raw_size);
        let blobs = self.machine.blobs.clone();
        let Some(raw_size) = raw_size else {
            // Expunged meanwhile: a session still showing the message may get it from the
            // cache; otherwise it is gone.
            return blobs
                .cached(&blob)
                .ok_or_else(|| StoreError::NotFound("message body".into()));
        };
        blocking(move || {
            blobs.read(&blob, raw_size).map_err(|error| {
                tracing::error!(blob = %hex::encode(blob.0), %error, "cannot read a body");
                StoreError::Io(format!("cannot read message body: {error}"))
            })
        })
        .await
    }

    /// The raw bytes of several stored messages, in order, read one after the other on one
    /// blocking thread (cached ones without I/O): cheaper than one [`MailStore::body`] task
    /// each when many bodies are read at once. `None` for a body that cannot be read (logged).
    pub async fn bodies(&self, blobs: Vec<BlobId>) -> Vec<Option<Arc<Vec<u8>>>> {
        let mut out: Vec<Option<Arc<Vec<u8>>>> = blobs
            .iter()
            .map(|blob| self.machine.blobs.cached(blob))
            .collect();
        if out.iter().all(Option::is_some) {
            return out;
        }
        let wanted: Vec<(usize, BlobId, Option<u32>)> = {
            let state = self.state();
            out.iter()
                .enumerate()
                .filter(|(_, body)| body.is_none())
                .map(|(k, _)| (k, blobs[k], state.blobs.get(&blobs[k]).map(|i| i.raw_size)))
                .collect()
        };
        let store = self.machine.blobs.clone();
        let read = tokio::task::spawn_blocking(move || {
            wanted
                .into_iter()
                .map(|(k, blob, raw_size)| {
                    let body = match raw_size {
                        Some(raw_size) => match store.read(&blob, raw_size) {
                            Ok(body) => Some(body),
                            Err(error) => {
                                tracing::error!(blob = %hex::encode(blob.0), %error, "cannot read a body");
                                None
                            }
                        },
                        // Expunged meanwhile: only the cache may still have it.
                        None => store.cached(&blob),
                    };
                    (k, body)
                })
                .collect::<Vec<_>>()
        })
        .await;
        match read {
            Ok(read) => {
                for (k, body) in read {
                    out[k] = body;
                }
            }
            Err(error) => tracing::warn!(%error, "body read task failed"),
        }
        out
    }

    /// Every applied change to any mailbox. A lagged receiver should treat every selected
    /// mailbox as changed.
    pub fn subscribe_changes(&self) -> tokio::sync::broadcast::Receiver<MailboxChanged> {
        self.machine.changes.subscribe()
    }

    /// Every applied change to an account's mailbox names or subscriptions (NOTIFY's
    /// MailboxName and SubscriptionChange events); a receiver compares names itself, so a
    /// lagged one loses nothing but the wake-up.
    pub fn subscribe_listings(&self) -> tokio::sync::broadcast::Receiver<AccountId> {
        self.machine.listings.subscribe()
    }

    // ----- IMAP writes -----

    pub async fn create_mailbox(
        &self,
        account: AccountId,
        name: &str,
        special_use: Option<SpecialUse>,
    ) -> Result<MailboxId, StoreError> {
        let name = names::normalize_mailbox_name(name)?;
        let command = CommandV1::CreateMailbox {
            account,
            name,
            special_use,
            now: now_secs(),
        };
        match self.submit(command).await? {
            Response::Mailbox(id) => Ok(id),
            other => Err(unexpected(other)),
        }
    }

    pub async fn delete_mailbox(&self, account: AccountId, name: &str) -> Result<(), StoreError> {
        let name = names::normalize_mailbox_name(name)?;
        self.submit_done(CommandV1::DeleteMailbox { account, name })
            .await
    }

    /// RFC 3501 RENAME, children included; renaming INBOX moves its messages to a new mailbox
    /// and leaves INBOX empty.
    pub async fn rename_mailbox(
        &self,
        account: AccountId,
        from: &str,
        to: &str,
    ) -> Result<(), StoreError> {
        let from = names::normalize_mailbox_name(from)?;
        let to = names::normalize_mailbox_name(to)?;
        self.submit_done(CommandV1::RenameMailbox {
            account,
            from,
            to,
            now: now_secs(),
        })
        .await
    }

    /// Subscription is by name and may name a mailbox that does not exist.
    pub async fn set_subscribed(
        &self,
        account: AccountId,
        name: &str,
        subscribed: bool,
    ) -> Result<(), StoreError> {
        let name = names::normalize_mailbox_name(name)?;
        self.submit_done(CommandV1::SetSubscribed {
            account,
            name,
            subscribed,
        })
        .await
    }

    pub fn subscriptions(&self, account: AccountId) -> Vec<String> {
        self.state()
            .accounts
            .get(&account)
            .map(|a| a.subscriptions.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Every keyword the mailbox has known, in its first spelling, sorted case-insensitively.
    pub fn mailbox_keywords(&self, account: AccountId, mailbox: MailboxId) -> Vec<String> {
        let state = self.state();
        state
            .accounts
            .get(&account)
            .and_then(|a| a.mailboxes.get(&mailbox))
            .map(|m| m.keywords.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The greatest UID of a mailbox already given to some IMAP session as `\Recent`
    /// (`imap_state.rs`).
    pub fn recent_boundary(&self, account: AccountId, mailbox: MailboxId) -> Uid {
        self.state().imap.recent_boundary(account, mailbox)
    }

    /// Claims the UIDs of `mailbox` above its recent boundary, up to `up_to`, as `\Recent`
    /// for the calling session; answers the inclusive range it now owns, if any. Proposes
    /// nothing when this node already sees the boundary at `up_to` or above (a follower's
    /// boundary is never ahead of the leader's, so nothing could be claimed).
    pub async fn claim_recent(
        &self,
        account: AccountId,
        mailbox: MailboxId,
        up_to: Uid,
    ) -> Result<Option<(Uid, Uid)>, StoreError> {
        if self.recent_boundary(account, mailbox) >= up_to {
            return Ok(None);
        }
        let command = imap_state::CommandV6::ClaimRecent {
            account,
            mailbox,
            up_to,
        };
        match self.submit_command(Command::V6(command)).await? {
            Response::RecentClaimed { previous, up_to } => {
                Ok((up_to > previous).then_some((previous + 1, up_to)))
            }
            other => Err(unexpected(other)),
        }
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
        if self.mailbox_view(account, mailbox).is_none() {
            return Err(StoreError::NotFound("mailbox".into()));
        }
        self.precheck_quota(account, quota::Usage::one(body.len() as u32))?;
        let (body, staged) = prepare_body(&self.machine, body).await?;
        let command = CommandV1::Append {
            account,
            mailbox,
            flags,
            internal_date,
            internal_date_offset_min,
            body,
        };
        let result = self
            .submit_saved(savedate_state::SavedCommand::V1(command))
            .await;
        staged.finish().await;
        match result? {
            Response::Appended { uidvalidity, uid } => Ok((uidvalidity, uid)),
            other => Err(unexpected(other)),
        }
    }

    /// MULTIAPPEND: appends every message of `messages` (flags, internal date, its offset in
    /// minutes, body) to `mailbox`, all or none, in one replicated command. Returns
    /// UIDVALIDITY and the new UIDs in order.
    pub async fn append_many(
        &self,
        account: AccountId,
        mailbox: MailboxId,
        messages: Vec<(FlagSet, i64, i16, Vec<u8>)>,
    ) -> Result<(u32, Vec<Uid>), StoreError> {
        if self.mailbox_view(account, mailbox).is_none() {
            return Err(StoreError::NotFound("mailbox".into()));
        }
        let total: usize = messages.iter().map(|m| m.3.len()).sum();
        if total > MAX_MESSAGE_BYTES {
            return Err(StoreError::Invalid(format!(
                "the messages of one MULTIAPPEND hold at most {MAX_MESSAGE_BYTES} bytes"
            )));
        }
        if messages.len() > multiappend_state::MAX_MESSAGES_PER_MULTIAPPEND {
            return Err(StoreError::Invalid(format!(
                "a MULTIAPPEND holds at most {} messages",
                multiappend_state::MAX_MESSAGES_PER_MULTIAPPEND
            )));
        }
        self.precheck_quota(
            account,
            quota::Usage {
                bytes: total as u64,
                messages: messages.len() as u64,
            },
        )?;
        let mut batch = Vec::with_capacity(messages.len());
        let mut staged = Vec::with_capacity(messages.len());
        for (flags, internal_date, internal_date_offset_min, body) in messages {
            let (body, stage) = prepare_body(&self.machine, body).await?;
            staged.push(stage);
            batch.push(multiappend_state::NewMessage {
                flags,
                internal_date,
                internal_date_offset_min,
                body,
            });
        }
        let command = multiappend_state::CommandV9::AppendMany {
            account,
            mailbox,
            messages: batch,
        };
        let result = self
            .submit_saved(savedate_state::SavedCommand::V9(command))
            .await;
        for stage in staged {
            stage.finish().await;
        }
        match result? {
            Response::AppendedMany { uidvalidity, uids } => Ok((uidvalidity, uids)),
            other => Err(unexpected(other)),
        }
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
        let command = CommandV1::StoreFlags {
            account,
            mailbox,
            uids: uids_to_ranges(uids),
            op,
            flags,
        };
        match self.submit(command).await? {
            Response::Flags(flags) => Ok(flags),
            other => Err(unexpected(other)),
        }
    }

    /// STORE with RFC 7162's UNCHANGEDSINCE: (UID, flags, modseq) of every message of `uids`
    /// that still exists and was not modified after `unchanged_since`, and the UIDs that
    /// were (left alone).
    #[allow(clippy::type_complexity)]
    pub async fn store_flags_since(
        &self,
        account: AccountId,
        mailbox: MailboxId,
        uids: Vec<Uid>,
        op: FlagOp,
        flags: FlagSet,
        unchanged_since: Option<u64>,
    ) -> Result<(Vec<(Uid, FlagSet, u64)>, Vec<Uid>), StoreError> {
        let command = imap_state::CommandV7::StoreFlags {
            account,
            mailbox,
            uids: uids_to_ranges(uids),
            op,
            flags,
            unchanged_since,
        };
        match self.submit_command(Command::V7(command)).await? {
            Response::FlagsModseq { changed, modified } => Ok((changed, modified)),
            other => Err(unexpected(other)),
        }
    }

    /// The UIDs expunged from `mailbox` after modseq `since` (sorted, disjoint inclusive
    /// ranges), or `None` when that is too long ago to know (RFC 7162 VANISHED).
    pub fn vanished_since(
        &self,
        account: AccountId,
        mailbox: MailboxId,
        since: u64,
    ) -> Option<Vec<(Uid, Uid)>> {
        self.state()
            .imap
            .modseq
            .vanished_since(account, mailbox, since)
    }

    /// Removes the messages flagged \Deleted (only those among `uids` when given); returns
    /// their UIDs, ascending.
    pub async fn expunge(
        &self,
        account: AccountId,
        mailbox: MailboxId,
        uids: Option<Vec<Uid>>,
    ) -> Result<Vec<Uid>, StoreError> {
        let command = CommandV1::Expunge {
            account,
            mailbox,
            uids: uids.map(uids_to_ranges),
        };
        match self.submit(command).await? {
            Response::Expunged(uids) => Ok(uids),
            other => Err(unexpected(other)),
        }
    }

    async fn copy_or_move(
        &self,
        account: AccountId,
        from: MailboxId,
        uids: Vec<Uid>,
        to: MailboxId,
        remove_source: bool,
    ) -> Result<(u32, Vec<(Uid, Uid)>), StoreError> {
        if !remove_source {
            let copied = self.mailbox_view(account, from).map(|view| {
                let wanted: std::collections::BTreeSet<Uid> = uids.iter().copied().collect();
                quota::Usage::of_messages(view.messages.iter().filter(|m| wanted.contains(&m.uid)))
            });
            if let Some(copied) = copied {
                self.precheck_quota(account, copied)?;
            }
        }
        // Into Junk teaches the Bayes classifier spam, out of it (but not to Trash) ham.
        let lesson = self.bayes_lesson(account, from, &uids, to);
        let command = CommandV1::Copy {
            account,
            from,
            uids: uids_to_ranges(uids),
            to,
            remove_source,
        };
        let copied = match self
            .submit_saved(savedate_state::SavedCommand::V1(command))
            .await?
        {
            Response::Copied { uidvalidity, pairs } => (uidvalidity, pairs),
            other => return Err(unexpected(other)),
        };
        if let Some((spam, blobs)) = lesson {
            self.bayes_train(spam, blobs).await;
        }
        Ok(copied)
    }

    /// Returns the destination's UIDVALIDITY and (source UID, new UID) pairs.
    pub async fn copy(
        &self,
        account: AccountId,
        from: MailboxId,
        uids: Vec<Uid>,
        to: MailboxId,
    ) -> Result<(u32, Vec<(Uid, Uid)>), StoreError> {
        self.copy_or_move(account, from, uids, to, false).await
    }

    /// COPY then EXPUNGE of the sources, in one command.
    pub async fn move_messages(
        &self,
        account: AccountId,
        from: MailboxId,
        uids: Vec<Uid>,
        to: MailboxId,
    ) -> Result<(u32, Vec<(Uid, Uid)>), StoreError> {
        self.copy_or_move(account, from, uids, to, true).await
    }

    // ----- administration -----

    pub async fn add_domain(&self, domain: &str) -> Result<(), StoreError> {
        let domain = names::normalize_domain(domain)?;
        self.submit_done(CommandV1::AddDomain { domain }).await
    }

    /// Refused while the domain still has accounts or aliases.
    pub async fn remove_domain(&self, domain: &str) -> Result<(), StoreError> {
        let domain = names::normalize_domain(domain)?;
        self.submit_done(CommandV1::RemoveDomain { domain }).await
    }

    pub fn list_domains(&self) -> Vec<String> {
        self.state().domains.iter().cloned().collect()
    }

    /// Hashes the password (argon2id) before proposing; creates INBOX, Sent, Drafts, Trash,
    /// Junk and Archive. Refuses unknown domains, duplicates and passwords under 10 characters.
    pub async fn add_account(
        &self,
        address: &str,
        password: &str,
    ) -> Result<AccountId, StoreError> {
        let address = names::normalize_address(address)?;
        {
            // Early refusals, so that a mistake costs neither a hash nor a log entry (apply
            // checks again).
            let state = self.state();
            let domain = names::domain_of(&address);
            if !state.domains.contains(domain) {
                return Err(StoreError::NotFound(format!("domain {domain}")));
            }
            if state.account_ids.contains_key(&address) {
                return Err(StoreError::AlreadyExists(format!("account {address}")));
            }
        }
        let password_hash = self.hash(password).await?;
        let command = CommandV1::AddAccount {
            address,
            password_hash,
            now: now_secs(),
        };
        match self.submit(command).await? {
            Response::Account(id) => Ok(id),
            other => Err(unexpected(other)),
        }
    }

    pub async fn set_password(&self, address: &str, password: &str) -> Result<(), StoreError> {
        let address = names::normalize_address(address)?;
        if !self.state().account_ids.contains_key(&address) {
            return Err(StoreError::NotFound(format!("account {address}")));
        }
        let password_hash = self.hash(password).await?;
        self.submit_done(CommandV1::SetPassword {
            address,
            password_hash,
        })
        .await
    }

    /// Removes the account, its mailboxes and its messages.
    pub async fn remove_account(&self, address: &str) -> Result<(), StoreError> {
        let address = names::normalize_address(address)?;
        self.submit_done(CommandV1::RemoveAccount { address }).await
    }

    pub fn list_accounts(&self, domain: Option<&str>) -> Vec<AccountInfo> {
        let domain = domain.map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase());
        self.state()
            .account_ids
            .iter()
            .filter(|(address, _)| {
                domain
                    .as_deref()
                    .is_none_or(|d| names::domain_of(address) == d)
            })
            .map(|(address, &id)| AccountInfo {
                id,
                address: address.clone(),
            })
            .collect()
    }

    /// `source` must be in a local domain; `target` may be local or foreign.
    pub async fn add_alias(&self, source: &str, target: &str) -> Result<(), StoreError> {
        let source = names::normalize_address(source)?;
        let target = names::normalize_address(target)?;
        self.submit_done(CommandV1::AddAlias { source, target })
            .await
    }

    pub async fn remove_alias(&self, source: &str, target: &str) -> Result<(), StoreError> {
        let source = names::normalize_address(source)?;
        let target = names::normalize_address(target)?;
        self.submit_done(CommandV1::RemoveAlias { source, target })
            .await
    }

    pub fn list_aliases(&self, domain: Option<&str>) -> Vec<AliasInfo> {
        let domain = domain.map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase());
        let state = self.state();
        state
            .aliases
            .iter()
            .filter(|(source, _)| {
                domain
                    .as_deref()
                    .is_none_or(|d| names::domain_of(source) == d)
            })
            .flat_map(|(source, targets)| {
                targets.iter().map(move |target| AliasInfo {
                    source: source.clone(),
                    target: target.clone(),
                })
            })
            .collect()
    }

    pub fn stats(&self) -> StoreStats {
        self.state().stats()
    }

    // ----- quotas (`quota.rs`) -----

    /// An account's usage and limits (local replica).
    pub fn quota(&self, account: AccountId) -> Option<QuotaReport> {
        let state = self.state();
        state
            .accounts
            .contains_key(&account)
            .then(|| state.quota_report(account))
    }

    /// [`MailStore::quota`] by address.
    pub fn quota_of(&self, address: &str) -> Result<QuotaReport, StoreError> {
        let address = names::normalize_address(address)?;
        let state = self.state();
        let id = *state
            .account_ids
            .get(&address)
            .ok_or_else(|| StoreError::NotFound(format!("account {address}")))?;
        Ok(state.quota_report(id))
    }

    /// The cluster's default limits (replicated).
    pub fn default_quota(&self) -> QuotaLimits {
        self.state().quotas.default
    }

    /// Sets the cluster's default limits (a node does it at start from its `[store]` section
    /// when the replicated value differs).
    pub async fn set_default_quota(&self, limits: QuotaLimits) -> Result<(), StoreError> {
        match self
            .submit_command(Command::V3(CommandV3::SetDefaultQuota { limits }))
            .await?
        {
            Response::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Sets an account's own limits; `None` leaves that one as it is.
    pub async fn set_account_quota(
        &self,
        address: &str,
        storage: Option<QuotaSetting>,
        messages: Option<QuotaSetting>,
    ) -> Result<(), StoreError> {
        let address = names::normalize_address(address)?;
        if !self.state().account_ids.contains_key(&address) {
            return Err(StoreError::NotFound(format!("account {address}")));
        }
        let command = CommandV3::SetAccountQuota {
            address,
            storage,
            messages,
        };
        match self.submit_command(Command::V3(command)).await? {
            Response::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Whether a message of `size` bytes (at least 1) to `address` would bring one of the
    /// local accounts it reaches (aliases expanded) over its quota: SMTP's check at RCPT,
    /// with the size declared by `MAIL FROM ... SIZE=` if any. Apply checks again.
    pub fn recipient_over_quota(&self, address: &str, size: u64) -> bool {
        let Ok(address) = names::normalize_address(address) else {
            return false;
        };
        let state = self.state();
        let mut accounts = Vec::new();
        state.expand_recipient(
            &address,
            &mut std::collections::BTreeSet::new(),
            &mut accounts,
            &mut std::collections::BTreeSet::new(),
        );
        let added = quota::Usage {
            bytes: size.max(1),
            messages: 1,
        };
        accounts
            .into_iter()
            .any(|account| state.check_quota(account, added).is_err())
    }

    /// The early refusal of a write that apply would refuse for quota, so that a hopeless
    /// command costs no log entry.
    fn precheck_quota(&self, account: AccountId, added: quota::Usage) -> Result<(), StoreError> {
        self.state()
            .check_quota(account, added)
            .map_err(StoreError::from)
    }
}

/// How often [`keep_default_quota`] looks whether the state holds a domain yet.
const DEFAULT_QUOTA_POLL: std::time::Duration = std::time::Duration::from_secs(1);
/// Pauses between its attempts while the cluster cannot commit.
const DEFAULT_QUOTA_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// Makes the cluster's default quota the configured one (`[store]`), once per start: as soon
/// as the replicated state holds a domain, proposes it if the replicated value differs,
/// retrying while the cluster cannot commit, until done or `shutdown`. It waits for a domain
/// so that a new, empty node stays empty (a node holding any replicated data cannot join a
/// cluster) and proposes nothing before it has joined one.
pub async fn keep_default_quota(
    store: MailStore,
    wanted: QuotaLimits,
    shutdown: tokio_util::sync::CancellationToken,
) -> io::Result<()> {
    let mut pause = DEFAULT_QUOTA_POLL;
    loop {
        let (holds_data, current) = {
            let state = store.state();
            (!state.domains.is_empty(), state.quotas.default)
        };
        if holds_data {
            if current == wanted {
                return Ok(());
            }
            match store.set_default_quota(wanted).await {
                Ok(()) => {
                    tracing::info!(?wanted, "default quota set from the configuration");
                    return Ok(());
                }
                Err(error) => {
                    tracing::debug!(%error, "cannot set the default quota yet; retrying");
                    pause = (pause * 2).min(DEFAULT_QUOTA_RETRY_MAX);
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(pause) => {}
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod queue_tests;

#[cfg(test)]
mod sender_address_tests {
    use super::*;

    #[tokio::test]
    async fn sender_addresses_are_the_own_address_and_aliases_reaching_the_account() {
        let dir = tempfile::tempdir().unwrap();
        let store = MailStore::open_local(dir.path()).unwrap();
        store.add_domain("example.org").await.unwrap();
        let alice = store
            .add_account("Alice@example.org", "correct horse battery")
            .await
            .unwrap();
        let bob = store
            .add_account("bob@example.org", "correct horse battery")
            .await
            .unwrap();
        store
            .add_alias("info@example.org", "alice@example.org")
            .await
            .unwrap();
        store
            .add_alias("team@example.org", "bob@example.org")
            .await
            .unwrap();
        store
            .add_alias("team@example.org", "info@example.org")
            .await
            .unwrap();
        store
            .add_alias("sales@example.org", "bob@example.org")
            .await
            .unwrap();
        store
            .add_alias("out@example.org", "someone@example.net")
            .await
            .unwrap();
        assert_eq!(
            store.sender_addresses(alice),
            vec![
                "alice@example.org".to_owned(),
                "info@example.org".to_owned(),
                "team@example.org".to_owned(),
            ]
        );
        assert_eq!(
            store.sender_addresses(bob),
            vec![
                "bob@example.org".to_owned(),
                "sales@example.org".to_owned(),
                "team@example.org".to_owned(),
            ]
        );
        assert!(store.sender_addresses(9999).is_empty());
    }
}
