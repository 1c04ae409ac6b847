//! The replicated commands and their responses.
//!
//! A command is a closed, versioned enum, encoded with bincode and carried by the Raft log.
//! Everything non-deterministic (the time, password hashes, the body's BLAKE3 hash and its zstd
//! bytes) is decided by the proposer and travels inside the command, so that applying it is a
//! pure function of (state, command) on every replica. New variants go into a new version
//! (`Command::V2`) so that an old log stays readable.

use bincode::Options;
use serde::{Deserialize, Serialize};

use super::queue::{NewQueueEntry, Notice, QueueId, RecipientResult};
use super::quota::{QuotaLimits, QuotaSetting};
use super::{AccountId, BlobId, FlagOp, FlagSet, MailboxId, SpecialUse, Uid};
use crate::outbound::dkim::DkimKeyRecord;

/// The largest raw message the store accepts (RFC822.SIZE is a u32; SMTP has its own, smaller,
/// configurable limit).
pub const MAX_MESSAGE_BYTES: usize = 128 * 1024 * 1024;

/// The largest encoded command or response: a compressed body (zstd can grow incompressible
/// input by a little) plus room for the metadata and the recipient list.
pub const MAX_COMMAND_BYTES: u64 = MAX_MESSAGE_BYTES as u64 + 8 * 1024 * 1024;

/// One command as it is carried by the log. Closed and versioned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    V1(CommandV1),
    /// The outbound queue and DKIM keys (issue 5).
    V2(CommandV2),
    /// Quotas (issue 10).
    V3(CommandV3),
    /// Backups: the backup key and lease (issue 11, `backup_state.rs`).
    V4(super::backup_state::CommandV4),
    /// Sieve scripts, filtered deliveries, greylisting (issue 12; `sieve_state.rs`).
    V5(super::sieve_state::CommandV5),
    /// IMAP state (issue 13): `\Recent` claims (`imap_state.rs`).
    V6(super::imap_state::CommandV6),
    /// CONDSTORE (issue 13): STORE with UNCHANGEDSINCE (`imap_state.rs`).
    V7(super::imap_state::CommandV7),
    /// Spam scoring (issue 12): the Bayes classifier learns (`bayes.rs`).
    V8(super::bayes::CommandV8),
    /// MULTIAPPEND (issue 13): several messages in one command (`multiappend_state.rs`).
    V9(super::multiappend_state::CommandV9),
    /// ACL (RFC 4314, issue 13): SETACL and DELETEACL (`acl_state.rs`).
    V10(super::acl_state::CommandV10),
    /// SAVEDATE (issue 13): APPEND, MULTIAPPEND, COPY and MOVE with the proposer's save time
    /// (`savedate_state.rs`).
    V11(super::savedate_state::CommandV11),
}

/// An inclusive range of UIDs; commands carry sorted, disjoint ranges so that `1:*` on a big
/// mailbox stays small in the log.
pub type UidRange = (Uid, Uid);

/// A body as the log carries it: its content address, raw size and zstd-compressed bytes.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BodyV1 {
    pub blob: BlobId,
    pub raw_size: u32,
    #[serde(with = "byte_buf")]
    pub compressed: Vec<u8>,
}

/// Encodes a body as one byte string rather than a sequence of u8 (same bincode bytes), so
/// that decoding in apply copies it at once instead of visiting every byte.
mod byte_buf {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        deserializer.deserialize_byte_buf(ByteBufVisitor)
    }

    struct ByteBufVisitor;

    impl<'de> Visitor<'de> for ByteBufVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: Error>(self, bytes: &[u8]) -> Result<Vec<u8>, E> {
            Ok(bytes.to_vec())
        }

        fn visit_byte_buf<E: Error>(self, bytes: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(bytes)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut bytes = Vec::new();
            while let Some(byte) = seq.next_element()? {
                bytes.push(byte);
            }
            Ok(bytes)
        }
    }
}

impl std::fmt::Debug for BodyV1 {
    // Never print a body, not even compressed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyV1")
            .field("blob", &hex::encode(self.blob.0))
            .field("raw_size", &self.raw_size)
            .field("compressed_len", &self.compressed.len())
            .finish()
    }
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandV1 {
    AddDomain {
        domain: String,
    },
    RemoveDomain {
        domain: String,
    },
    /// `now` (seconds since the epoch) seeds the UIDVALIDITY of the six initial mailboxes.
    AddAccount {
        address: String,
        password_hash: String,
        now: i64,
    },
    SetPassword {
        address: String,
        password_hash: String,
    },
    RemoveAccount {
        address: String,
    },
    AddAlias {
        source: String,
        target: String,
    },
    RemoveAlias {
        source: String,
        target: String,
    },
    /// One message for local recipients: every expanded account gets it in INBOX.
    Deliver {
        mail_from: String,
        recipients: Vec<String>,
        received_at: i64,
        body: BodyV1,
    },
    CreateMailbox {
        account: AccountId,
        name: String,
        special_use: Option<SpecialUse>,
        now: i64,
    },
    DeleteMailbox {
        account: AccountId,
        name: String,
    },
    /// `now` seeds the UIDVALIDITY of the mailbox created when INBOX is renamed.
    RenameMailbox {
        account: AccountId,
        from: String,
        to: String,
        now: i64,
    },
    SetSubscribed {
        account: AccountId,
        name: String,
        subscribed: bool,
    },
    Append {
        account: AccountId,
        mailbox: MailboxId,
        flags: FlagSet,
        internal_date: i64,
        internal_date_offset_min: i16,
        body: BodyV1,
    },
    StoreFlags {
        account: AccountId,
        mailbox: MailboxId,
        uids: Vec<UidRange>,
        op: FlagOp,
        flags: FlagSet,
    },
    Expunge {
        account: AccountId,
        mailbox: MailboxId,
        uids: Option<Vec<UidRange>>,
    },
    /// COPY, or MOVE when `remove_source` is set.
    Copy {
        account: AccountId,
        from: MailboxId,
        uids: Vec<UidRange>,
        to: MailboxId,
        remove_source: bool,
    },
}

impl std::fmt::Debug for CommandV1 {
    // Addresses and names are fine in logs; password hashes and bodies are not.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommandV1::AddDomain { domain } => write!(f, "AddDomain({domain})"),
            CommandV1::RemoveDomain { domain } => write!(f, "RemoveDomain({domain})"),
            CommandV1::AddAccount { address, now, .. } => {
                write!(f, "AddAccount({address}, now={now})")
            }
            CommandV1::SetPassword { address, .. } => write!(f, "SetPassword({address})"),
            CommandV1::RemoveAccount { address } => write!(f, "RemoveAccount({address})"),
            CommandV1::AddAlias { source, target } => write!(f, "AddAlias({source} -> {target})"),
            CommandV1::RemoveAlias { source, target } => {
                write!(f, "RemoveAlias({source} -> {target})")
            }
            CommandV1::Deliver {
                recipients, body, ..
            } => write!(f, "Deliver({} recipients, {body:?})", recipients.len()),
            CommandV1::CreateMailbox { account, name, .. } => {
                write!(f, "CreateMailbox({account}, {name:?})")
            }
            CommandV1::DeleteMailbox { account, name } => {
                write!(f, "DeleteMailbox({account}, {name:?})")
            }
            CommandV1::RenameMailbox {
                account, from, to, ..
            } => write!(f, "RenameMailbox({account}, {from:?} -> {to:?})"),
            CommandV1::SetSubscribed {
                account,
                name,
                subscribed,
            } => write!(f, "SetSubscribed({account}, {name:?}, {subscribed})"),
            CommandV1::Append {
                account,
                mailbox,
                body,
                ..
            } => write!(f, "Append({account}, {mailbox}, {body:?})"),
            CommandV1::StoreFlags {
                account,
                mailbox,
                uids,
                op,
                ..
            } => write!(
                f,
                "StoreFlags({account}, {mailbox}, {} ranges, {op:?})",
                uids.len()
            ),
            CommandV1::Expunge {
                account, mailbox, ..
            } => write!(f, "Expunge({account}, {mailbox})"),
            CommandV1::Copy {
                account,
                from,
                to,
                remove_source,
                ..
            } => write!(f, "Copy({account}, {from} -> {to}, move={remove_source})"),
        }
    }
}

/// Outbound queue and DKIM key commands. Every time is chosen by the proposer (Unix
/// milliseconds, `_ms`; INTERNALDATE in seconds).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandV2 {
    /// One accepted message in one commit: the local recipients' copies (aliases expanded
    /// in apply, like `Deliver`) and the queue entry for the remote ones.
    Accept {
        mail_from: String,
        local_recipients: Vec<String>,
        remote: Option<NewQueueEntry>,
        received_at: i64,
        body: BodyV1,
    },
    /// Leases the due entries nobody holds at `now_ms` (oldest due first, at most
    /// `max_entries`) to `node` until `expires_at_ms`. With `reclaim_own`, entries whose
    /// unexpired lease is `node`'s own count as free: a node's first scan after a restart
    /// takes back what it held when it died, instead of waiting for those leases to expire.
    TakeLeases {
        node: String,
        now_ms: i64,
        expires_at_ms: i64,
        max_entries: u32,
        reclaim_own: bool,
    },
    /// One delivery attempt's per-recipient results, the next attempt time, and an optional
    /// DSN or delay warning for the sender's INBOX. Releases `node`'s lease; removes the entry
    /// (and its body reference) once no recipient is pending.
    RecordAttempt {
        id: QueueId,
        node: String,
        results: Vec<RecipientResult>,
        next_attempt_at_ms: i64,
        delay_warned: bool,
        notice: Option<Notice>,
    },
    /// Makes an entry due at `now_ms` (admin `queue retry`).
    RetryQueueEntry {
        id: QueueId,
        now_ms: i64,
    },
    /// Drops an entry and its body reference (admin `queue delete`).
    DeleteQueueEntry {
        id: QueueId,
    },
    AddDkimKey {
        key: DkimKeyRecord,
    },
    RemoveDkimKey {
        domain: String,
        selector: String,
    },
    /// The cluster's SRS key, chosen at random by the first node that needs it (issue 10).
    /// Apply keeps the first one it sees and ignores the later ones, so nodes that propose at
    /// once end up with the same key. Added last: logs written before it still decode.
    InitSrsKey {
        key: SrsKey,
    },
}

/// The key of SRS hashes, 32 random bytes. Its `Debug` never shows it, so neither a log line
/// nor a command dump prints it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SrsKey(pub [u8; 32]);

impl std::fmt::Debug for SrsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SrsKey(<redacted>)")
    }
}

impl CommandV2 {
    /// The bodies this command carries (their files are written before it is applied).
    pub fn bodies(&self) -> Vec<&BodyV1> {
        match self {
            CommandV2::Accept { body, .. } => vec![body],
            CommandV2::RecordAttempt {
                notice: Some(notice),
                ..
            } => vec![&notice.body],
            _ => Vec::new(),
        }
    }
}

/// Quota settings (issue 10; `quota.rs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandV3 {
    /// The limits of every account without settings of its own (from the proposer's
    /// `[store]` configuration).
    SetDefaultQuota { limits: QuotaLimits },
    /// An account's own limits (`kermail user quota`); `None` leaves that one unchanged.
    SetAccountQuota {
        address: String,
        storage: Option<QuotaSetting>,
        messages: Option<QuotaSetting>,
    },
}

/// Why the state machine refused a command. The state is unchanged when this is answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApplyError {
    NotFound(String),
    AlreadyExists(String),
    Invalid(String),
    /// The command would bring an account over its quota (SMTP 552 5.2.2, IMAP OVERQUOTA).
    OverQuota(String),
    /// ACL: the acting account lacks a right the command needs (IMAP `NO [NOPERM]`).
    NoPermission(String),
}

impl From<ApplyError> for super::StoreError {
    fn from(error: ApplyError) -> Self {
        match error {
            ApplyError::NotFound(what) => super::StoreError::NotFound(what),
            ApplyError::AlreadyExists(what) => super::StoreError::AlreadyExists(what),
            ApplyError::Invalid(why) => super::StoreError::Invalid(why),
            ApplyError::OverQuota(why) => super::StoreError::OverQuota(why),
            ApplyError::NoPermission(why) => super::StoreError::NoPermission(why),
        }
    }
}

/// The answer of `apply`, handed back to the proposer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Done,
    Account(AccountId),
    Mailbox(MailboxId),
    Delivered(Vec<(AccountId, MailboxId, Uid)>),
    Appended {
        uidvalidity: u32,
        uid: Uid,
    },
    Flags(Vec<(Uid, FlagSet)>),
    Expunged(Vec<Uid>),
    Copied {
        uidvalidity: u32,
        pairs: Vec<(Uid, Uid)>,
    },
    Refused(ApplyError),
    /// `Accept`: the local copies and the queue entry, if any.
    Accepted {
        delivered: Vec<(AccountId, MailboxId, Uid)>,
        queued: Option<QueueId>,
    },
    /// `TakeLeases`: the entries now leased to the proposer.
    Leased(Vec<QueueId>),
    /// `RecordAttempt`: whether the entry is finished and gone.
    QueueUpdated {
        removed: bool,
    },
    /// `ClaimRecent`: the proposer owns the UIDs in `previous + 1 ..= up_to` as `\Recent`
    /// (none when they are equal).
    RecentClaimed {
        previous: Uid,
        up_to: Uid,
    },
    /// `CommandV7::StoreFlags`: (UID, flags, modseq) of each message of the set that still
    /// exists and passed the UNCHANGEDSINCE test, and the UIDs that failed it.
    FlagsModseq {
        changed: Vec<(Uid, FlagSet, u64)>,
        modified: Vec<Uid>,
    },
    /// `CommandV9::AppendMany`: the UIDs of the new messages, in the batch's order.
    AppendedMany {
        uidvalidity: u32,
        uids: Vec<Uid>,
    },
}

fn codec() -> impl Options {
    bincode::DefaultOptions::new().with_limit(MAX_COMMAND_BYTES)
}

pub fn encode_command(command: &Command) -> Result<Vec<u8>, bincode::Error> {
    codec().serialize(command)
}

pub fn decode_command(bytes: &[u8]) -> Result<Command, bincode::Error> {
    codec().deserialize(bytes)
}

pub fn encode_response(response: &Response) -> Vec<u8> {
    // A response is built by apply from bounded state; encoding into a Vec cannot fail short of
    // the size limit, and a refusal is the safe fallback even then.
    codec().serialize(response).unwrap_or_else(|_| {
        let fallback = Response::Refused(ApplyError::Invalid("response too large".into()));
        codec().serialize(&fallback).unwrap_or_default()
    })
}

pub fn decode_response(bytes: &[u8]) -> Result<Response, bincode::Error> {
    codec().deserialize(bytes)
}

/// Sorted, duplicate-free UIDs as inclusive ranges.
pub fn uids_to_ranges(mut uids: Vec<Uid>) -> Vec<UidRange> {
    uids.sort_unstable();
    uids.dedup();
    let mut ranges: Vec<UidRange> = Vec::new();
    for uid in uids {
        match ranges.last_mut() {
            Some((_, end)) if end.checked_add(1) == Some(uid) => *end = uid,
            _ => ranges.push((uid, uid)),
        }
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_ranges_compress_and_match() {
        assert_eq!(
            uids_to_ranges(vec![5, 1, 2, 3, 9, 3, 10]),
            vec![(1, 3), (5, 5), (9, 10)]
        );
        assert_eq!(
            uids_to_ranges(vec![u32::MAX, u32::MAX - 1]),
            vec![(u32::MAX - 1, u32::MAX)]
        );
    }

    #[test]
    fn body_bytes_encode_like_a_byte_vector() {
        // The byte-string encoding must not change the log format bincode gives a Vec<u8>.
        let body = BodyV1 {
            blob: crate::store::BlobId([1; 32]),
            raw_size: 3,
            compressed: vec![7, 8, 9],
        };
        #[derive(Serialize)]
        struct Plain {
            blob: crate::store::BlobId,
            raw_size: u32,
            compressed: Vec<u8>,
        }
        let plain = Plain {
            blob: body.blob,
            raw_size: 3,
            compressed: vec![7, 8, 9],
        };
        assert_eq!(
            codec().serialize(&body).unwrap(),
            codec().serialize(&plain).unwrap()
        );
        let decoded: BodyV1 = codec()
            .deserialize(&codec().serialize(&body).unwrap())
            .unwrap();
        assert_eq!(decoded, body);
    }

    #[test]
    fn command_round_trips_and_garbage_is_refused() {
        let command = Command::V1(CommandV1::AddDomain {
            domain: "example.org".into(),
        });
        let bytes = encode_command(&command).unwrap();
        assert_eq!(decode_command(&bytes).unwrap(), command);
        assert!(decode_command(&[0xff, 0xff, 0xff]).is_err());
        // A length prefix claiming a huge string must not allocate it.
        assert!(decode_command(&[0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
    }
}
