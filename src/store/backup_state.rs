//! The replicated part of backups (issue 11): the cluster's backup key and the lease that keeps
//! two nodes from backing up at once. One struct, [`BackupState`], kept in `State` and carried
//! by the snapshot as one field of its own (`SnapshotMeta::V4`).
//!
//! Everything random or timed is chosen by the proposer: the key is generated before
//! `InitBackupKey` is proposed (the first one applied wins, like the SRS key), and a lease
//! carries the proposer's `now_ms`, so apply stays a pure function of (state, command).

use serde::{Deserialize, Serialize};

use super::command::{ApplyError, Command, Response};
use super::state::{Effects, Outcome, State};
use super::{MailStore, StoreError};

/// The cluster's backup key: 32 random bytes from which the chunk encryption key and the chunk
/// id key are derived (`src/backup/crypto.rs`). `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupKey(pub [u8; 32]);

impl std::fmt::Debug for BackupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackupKey(<redacted>)")
    }
}

/// Who is running a backup, until when (proposer's clock, Unix milliseconds).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupLease {
    pub node: String,
    pub expires_at_ms: i64,
}

/// The last successful backup to one target (the proposer's clock, chosen before proposing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupSuccess {
    /// Unix seconds.
    pub at_secs: i64,
    pub id: String,
    pub node: String,
}

/// Everything about backups that is replicated.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupState {
    pub key: Option<BackupKey>,
    pub lease: Option<BackupLease>,
    /// Last success per target name, for `kermail status` and the age warning. Not in this
    /// struct's encoding (which snapshots and backups written before it still use): the
    /// snapshot carries it as a section of its own ([`SECTION_BACKUP_SUCCESS`]).
    #[serde(skip)]
    pub last_success: std::collections::BTreeMap<String, BackupSuccess>,
}

/// The snapshot section holding [`BackupState::last_success`].
pub const SECTION_BACKUP_SUCCESS: &str = "backup_success";

/// Backup commands (issue 11).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandV4 {
    /// The first key applied is kept; later ones are ignored.
    InitBackupKey { key: BackupKey },
    /// Granted unless another node holds an unexpired lease at `now_ms`.
    TakeBackupLease {
        node: String,
        now_ms: i64,
        expires_at_ms: i64,
    },
    /// Drops `node`'s lease (nothing if another node holds it).
    ReleaseBackupLease { node: String },
    /// A backup to `target` succeeded at `at_secs`; an older record than the one kept is
    /// ignored.
    RecordBackupSuccess {
        target: String,
        success: BackupSuccess,
    },
}

impl State {
    pub fn apply_v4(&mut self, command: CommandV4) -> Outcome {
        let response = match command {
            CommandV4::InitBackupKey { key } => {
                if self.backup.key.is_none() {
                    self.backup.key = Some(key);
                }
                Response::Done
            }
            CommandV4::TakeBackupLease {
                node,
                now_ms,
                expires_at_ms,
            } => match &self.backup.lease {
                Some(lease) if lease.node != node && lease.expires_at_ms > now_ms => {
                    Response::Refused(ApplyError::AlreadyExists(format!(
                        "a backup is running on node {} (lease until {} ms)",
                        lease.node, lease.expires_at_ms
                    )))
                }
                _ => {
                    self.backup.lease = Some(BackupLease {
                        node,
                        expires_at_ms,
                    });
                    Response::Done
                }
            },
            CommandV4::ReleaseBackupLease { node } => {
                if self.backup.lease.as_ref().is_some_and(|l| l.node == node) {
                    self.backup.lease = None;
                }
                Response::Done
            }
            CommandV4::RecordBackupSuccess { target, success } => {
                let newer = self
                    .backup
                    .last_success
                    .get(&target)
                    .is_none_or(|kept| kept.at_secs <= success.at_secs);
                if newer {
                    self.backup.last_success.insert(target, success);
                }
                Response::Done
            }
        };
        Outcome {
            response,
            effects: Effects::default(),
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A consistent view for a backup: the metadata cloned under the state lock (a few ms), the
/// index it was applied up to, and a guard that keeps every body it references readable.
pub struct BackupView {
    pub state: State,
    pub applied_index: u64,
    pub blobs: std::sync::Arc<super::blob::BlobStore>,
    pub _guard: super::blob::ReadGuard,
}

impl MailStore {
    async fn submit_v4(&self, command: CommandV4) -> Result<Response, StoreError> {
        self.submit_command(Command::V4(command)).await
    }

    /// The cluster's backup key, created (at random, before proposing) on first use.
    pub async fn backup_key_or_init(&self) -> Result<BackupKey, StoreError> {
        if let Some(key) = self.state().backup.key.clone() {
            return Ok(key);
        }
        let key = BackupKey(rand::random());
        self.submit_v4(CommandV4::InitBackupKey { key }).await?;
        self.state()
            .backup
            .key
            .clone()
            .ok_or_else(|| StoreError::Io("the backup key was not recorded".into()))
    }

    /// The backup key if one exists (`kermail backup key export`).
    pub fn backup_key(&self) -> Option<BackupKey> {
        self.state().backup.key.clone()
    }

    pub async fn take_backup_lease(&self, node: &str, lease_ms: i64) -> Result<(), StoreError> {
        let now = now_ms();
        self.submit_v4(CommandV4::TakeBackupLease {
            node: node.to_owned(),
            now_ms: now,
            expires_at_ms: now.saturating_add(lease_ms),
        })
        .await
        .map(|_| ())
    }

    pub async fn release_backup_lease(&self, node: &str) -> Result<(), StoreError> {
        self.submit_v4(CommandV4::ReleaseBackupLease {
            node: node.to_owned(),
        })
        .await
        .map(|_| ())
    }

    /// Records a successful backup to `target` (the time was chosen by the caller, before
    /// proposing).
    pub async fn record_backup_success(
        &self,
        target: &str,
        success: BackupSuccess,
    ) -> Result<(), StoreError> {
        self.submit_v4(CommandV4::RecordBackupSuccess {
            target: target.to_owned(),
            success,
        })
        .await
        .map(|_| ())
    }

    /// The replicated backup records: the lease and the last success per target.
    pub fn backup_records(
        &self,
    ) -> (
        Option<BackupLease>,
        std::collections::BTreeMap<String, BackupSuccess>,
    ) {
        let state = self.state();
        (
            state.backup.lease.clone(),
            state.backup.last_success.clone(),
        )
    }

    /// Clones the metadata under the read lock; bodies are immutable and stay readable while
    /// the view's guard lives.
    pub fn backup_view(&self) -> BackupView {
        let machine = self.machine();
        let state = machine.read();
        let guard = machine.blobs.begin_read();
        BackupView {
            state: state.capture(),
            applied_index: machine.last_applied_index(),
            blobs: machine.blobs.clone(),
            _guard: guard,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_key_wins_and_a_lease_refuses_another_node_until_it_expires() {
        let mut state = State::default();
        state.apply_v4(CommandV4::InitBackupKey {
            key: BackupKey([1; 32]),
        });
        state.apply_v4(CommandV4::InitBackupKey {
            key: BackupKey([2; 32]),
        });
        assert_eq!(state.backup.key, Some(BackupKey([1; 32])));
        let take = |node: &str, now_ms| CommandV4::TakeBackupLease {
            node: node.into(),
            now_ms,
            expires_at_ms: now_ms + 100,
        };
        assert_eq!(state.apply_v4(take("a", 0)).response, Response::Done);
        assert!(matches!(
            state.apply_v4(take("b", 50)).response,
            Response::Refused(_)
        ));
        assert_eq!(state.apply_v4(take("b", 100)).response, Response::Done);
        state.apply_v4(CommandV4::ReleaseBackupLease { node: "a".into() });
        assert!(state.backup.lease.is_some());
        state.apply_v4(CommandV4::ReleaseBackupLease { node: "b".into() });
        assert!(state.backup.lease.is_none());
    }

    #[test]
    fn a_backup_carries_acls_sieve_scripts_and_modseqs() {
        use super::super::acl_state::{CommandV10, Grantee, Rights, RightsChange};
        use super::super::command::CommandV1;
        let mut state = State::default();
        state.apply(CommandV1::AddDomain {
            domain: "example.org".into(),
        });
        for address in ["owner@example.org", "friend@example.org"] {
            let outcome = state.apply(CommandV1::AddAccount {
                address: address.into(),
                password_hash: "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$9Yc4dSHW1rjZn6HLZoPRDw"
                    .into(),
                now: 1_700_000_000,
            });
            assert!(matches!(outcome.response, Response::Account(_)));
        }
        let owner = state.account_id_of("owner@example.org").unwrap();
        let friend = state.account_id_of("friend@example.org").unwrap();
        let mailbox = state.accounts[&owner].inbox_id().unwrap();
        let outcome = state.apply_v10(CommandV10::SetAcl {
            actor: owner,
            owner,
            mailbox,
            grantee: Grantee::Account(friend),
            change: RightsChange::Replace,
            rights: Rights::parse("lr").unwrap(),
        });
        assert_eq!(outcome.response, Response::Done);
        // A Sieve script and a modseq that snapshots carry in sections of their own.
        let outcome = state.apply_v5(super::super::sieve_state::CommandV5::PutScript {
            account: owner,
            name: "main".into(),
            source: "keep;".into(),
        });
        assert_eq!(outcome.response, Response::Done);
        let outcome = state.apply(CommandV1::Append {
            account: owner,
            mailbox,
            flags: Default::default(),
            internal_date: 1_700_000_000,
            internal_date_offset_min: 0,
            body: super::super::command::BodyV1 {
                blob: super::super::BlobId([7; 32]),
                raw_size: 3,
                compressed: Vec::new(),
            },
        });
        assert!(matches!(outcome.response, Response::Appended { .. }));
        assert!(!state.imap.modseq.mailboxes.is_empty());
        let dir = tempfile::tempdir().unwrap();
        let blobs = super::super::blob::BlobStore::open(dir.path().join("blobs")).unwrap();
        let view = BackupView {
            state: state.clone(),
            applied_index: 0,
            _guard: blobs.begin_read(),
            blobs,
        };
        let meta = BackupMeta::decode(&view.encode_meta().unwrap()).unwrap();
        assert_eq!(meta.state.acl, state.acl);
        assert_eq!(meta.state.sieve, state.sieve);
        assert_eq!(meta.state.imap, state.imap);
        assert_eq!(meta.state.imap.modseq, state.imap.modseq);
        assert_eq!(meta.state.bayes, state.bayes);
        assert_eq!(
            meta.state.acl.rights_of(friend, owner, mailbox).to_string(),
            "lr"
        );
    }

    #[test]
    fn the_newest_success_per_target_is_kept() {
        let mut state = State::default();
        let record = |at_secs, id: &str| CommandV4::RecordBackupSuccess {
            target: "disk".into(),
            success: BackupSuccess {
                at_secs,
                id: id.into(),
                node: "n1".into(),
            },
        };
        state.apply_v4(record(20, "b"));
        state.apply_v4(record(10, "a"));
        assert_eq!(state.backup.last_success["disk"].id, "b");
        state.apply_v4(record(30, "c"));
        assert_eq!(state.backup.last_success["disk"].id, "c");
        // Carried by a snapshot (its own section), with the key and lease.
        state.apply_v4(CommandV4::InitBackupKey {
            key: BackupKey([3; 32]),
        });
        let dir = tempfile::tempdir().unwrap();
        let blobs = super::super::blob::BlobStore::open(dir.path().join("blobs")).unwrap();
        let chunks =
            super::super::snapshot_chunks::ChunkStore::open(dir.path().join("chunks")).unwrap();
        let mut bytes = Vec::new();
        super::super::snapshot::write_snapshot(&state, &chunks, &mut bytes).unwrap();
        let restored =
            super::super::snapshot::read_snapshot(&mut bytes.as_slice(), &blobs, &chunks, false)
                .unwrap();
        assert_eq!(restored.backup, state.backup);
    }
}

/// The file `kermail restore --to` leaves in a fresh data folder: the restored metadata
/// ([`BackupMeta::encode`]). The state machine starts from it instead of an empty state (the
/// log of the new one-node cluster is applied on top, and once a snapshot exists it is
/// restored instead); it is kept so that every start replays onto the same base.
pub const RESTORE_BASE_FILE: &str = "restore-base.bin";

/// The largest encoded backup metadata (same bound as a snapshot's).
pub const MAX_BACKUP_META_BYTES: u64 = super::snapshot::MAX_META_BYTES;

#[derive(Serialize)]
struct BackupMetaRef<'a> {
    state: &'a State,
    outbound: &'a super::queue::Outbound,
    quotas: &'a super::quota::Quotas,
    backup: &'a BackupState,
}

#[derive(Deserialize)]
struct BackupMetaOwned {
    state: State,
    outbound: super::queue::Outbound,
    quotas: super::quota::Quotas,
    backup: BackupState,
}

/// What V2 adds to the state's own encoding, which leaves these out (snapshots carry them
/// as sections of their own): every message's RFC 8514 save date (`MessageMeta::saved_at`, in
/// the order of `saved_dates`), the RFC 4314 ACLs, the Sieve scripts, the IMAP state (recent
/// boundaries, and each mailbox's highest modseq and expunged ranges, so CONDSTORE never goes
/// backwards after a restore) and the Bayes classifier.
#[derive(Serialize)]
struct BackupExtraRef<'a> {
    saved_dates: Vec<u32>,
    acl: &'a super::acl_state::AclState,
    sieve: &'a super::sieve_state::SieveState,
    imap: &'a super::imap_state::ImapState,
    modseq: &'a super::imap_state::ModseqState,
    bayes: &'a super::bayes::BayesState,
}

#[derive(Deserialize)]
struct BackupExtra {
    saved_dates: Vec<u32>,
    acl: super::acl_state::AclState,
    sieve: super::sieve_state::SieveState,
    imap: super::imap_state::ImapState,
    modseq: super::imap_state::ModseqState,
    bayes: super::bayes::BayesState,
}

/// Versioned envelope of the backup metadata; a V1 backup restores without what V2 adds.
#[derive(Serialize)]
enum BackupMetaVersionRef<'a> {
    #[allow(dead_code)]
    V1(BackupMetaRef<'a>),
    V2(BackupMetaRef<'a>, BackupExtraRef<'a>),
}

#[derive(Deserialize)]
enum BackupMetaVersion {
    V1(BackupMetaOwned),
    V2(BackupMetaOwned, Box<BackupExtra>),
}

/// Every message's save date, by account, mailbox and UID order (all `BTreeMap`s and sorted
/// lists: the same order when the decoded state is walked again).
fn saved_dates(state: &State) -> Vec<u32> {
    state
        .accounts
        .values()
        .flat_map(|a| a.mailboxes.values())
        .flat_map(|m| m.messages.iter().map(|message| message.saved_at))
        .collect()
}

/// Puts back the save dates `saved_dates` gave, refusing a list that does not fit the state.
fn restore_saved_dates(state: &mut State, dates: &[u32]) -> Result<(), String> {
    if dates.len() as u64 != count_messages(state) {
        return Err(format!(
            "backup metadata holds {} save dates for {} messages",
            dates.len(),
            count_messages(state)
        ));
    }
    let mut dates = dates.iter();
    for mailbox in state
        .accounts
        .values_mut()
        .flat_map(|a| a.mailboxes.values_mut())
    {
        for index in 0..mailbox.messages.len() {
            if let (Some(message), Some(&date)) = (mailbox.messages.get_mut(index), dates.next()) {
                message.saved_at = date;
            }
        }
    }
    Ok(())
}

fn meta_codec() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new().with_limit(MAX_BACKUP_META_BYTES)
}

impl BackupView {
    /// The metadata of the view (state, outbound queue and DKIM keys, SRS key, quotas, backup
    /// key), bincode.
    pub fn encode_meta(&self) -> Result<Vec<u8>, String> {
        use bincode::Options;
        // The lease changes with every backup: left out, unchanged mail gives unchanged bytes.
        let backup = BackupState {
            key: self.state.backup.key.clone(),
            lease: None,
            last_success: Default::default(),
        };
        meta_codec()
            .serialize(&BackupMetaVersionRef::V2(
                BackupMetaRef {
                    state: &self.state,
                    outbound: &self.state.outbound,
                    quotas: &self.state.quotas,
                    backup: &backup,
                },
                BackupExtraRef {
                    saved_dates: saved_dates(&self.state),
                    acl: &self.state.acl,
                    sieve: &self.state.sieve,
                    imap: &self.state.imap,
                    modseq: &self.state.imap.modseq,
                    bayes: &self.state.bayes,
                },
            ))
            .map_err(|e| format!("cannot encode the state: {e}"))
    }

    /// Every body the view references.
    pub fn referenced(&self) -> std::collections::BTreeSet<super::BlobId> {
        self.state.referenced_blobs()
    }

    pub fn messages(&self) -> u64 {
        count_messages(&self.state)
    }
}

fn count_messages(state: &State) -> u64 {
    state
        .accounts
        .values()
        .flat_map(|a| a.mailboxes.values())
        .map(|m| m.messages.len() as u64)
        .sum()
}

/// Backup metadata read back (the state of one backup).
pub struct BackupMeta {
    state: State,
}

impl BackupMeta {
    /// The largest decoded metadata.
    pub const MAX_BYTES: u64 = MAX_BACKUP_META_BYTES;

    pub fn decode(bytes: &[u8]) -> Result<BackupMeta, String> {
        use bincode::Options;
        let (meta, extra) = match meta_codec()
            .deserialize(bytes)
            .map_err(|e| format!("backup metadata is corrupt: {e}"))?
        {
            BackupMetaVersion::V1(meta) => (meta, None),
            BackupMetaVersion::V2(meta, extra) => (meta, Some(*extra)),
        };
        let mut state = meta.state;
        if let Some(extra) = extra {
            restore_saved_dates(&mut state, &extra.saved_dates)?;
            state.acl = extra.acl;
            state.sieve = extra.sieve;
            state.imap = extra.imap;
            state.imap.modseq = extra.modseq;
            state.bayes = extra.bayes;
        }
        state.outbound = meta.outbound;
        state.outbound.rebuild_due();
        state.quotas = meta.quotas;
        // A restored cluster holds no lease of the old one.
        state.backup = BackupState {
            key: meta.backup.key,
            lease: None,
            last_success: Default::default(),
        };
        state
            .check_invariants()
            .map_err(|why| format!("backup state is inconsistent: {why}"))?;
        Ok(BackupMeta { state })
    }

    pub fn referenced(&self) -> std::collections::BTreeSet<super::BlobId> {
        self.state.referenced_blobs()
    }

    pub fn messages(&self) -> u64 {
        count_messages(&self.state)
    }

    /// One account's mailboxes (all, or the one named) and their messages, by name order.
    pub fn account_mail(
        &self,
        address: &str,
        mailbox: Option<&str>,
    ) -> Option<Vec<(String, Vec<super::MessageMeta>)>> {
        let address = super::names::normalize_address(address).ok()?;
        let account = self.state.account_by_address(&address)?;
        Some(
            account
                .names
                .iter()
                .filter(|(name, _)| mailbox.is_none_or(|wanted| wanted == name.as_str()))
                .filter_map(|(name, id)| {
                    let mailbox = account.mailboxes.get(id)?;
                    Some((name.clone(), mailbox.messages.to_vec()))
                })
                .collect(),
        )
    }
}

/// The restored state of a folder made by `kermail restore --to`, if it is one.
pub(super) fn load_restore_base(
    data_dir: &std::path::Path,
    blobs: &super::blob::BlobStore,
) -> Result<Option<State>, StoreError> {
    let path = data_dir.join(RESTORE_BASE_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(StoreError::Io(format!(
                "cannot read {}: {error}",
                path.display()
            )))
        }
    };
    let mut state = BackupMeta::decode(&bytes)
        .map_err(|why| StoreError::Io(format!("{}: {why}", path.display())))?
        .state;
    state.rebuild_blobs(|id| blobs.stored_len(id).unwrap_or(0));
    if let Some(missing) = state.blobs.keys().find(|id| !blobs.contains(id)) {
        return Err(StoreError::Io(format!(
            "{}: the restored state references body {} which the folder lacks",
            path.display(),
            hex::encode(missing.0)
        )));
    }
    Ok(Some(state))
}
