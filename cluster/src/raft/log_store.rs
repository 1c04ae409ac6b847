//! The Raft log on sled: entries keyed by big-endian index, and a meta tree for the vote, the
//! commit index, the last purged log id and the node id.
//!
//! Durability: every `append` writes its entries as one sled batch, then makes them durable
//! ([`LogStore`]'s durable flush) and only then calls `log_io_completed`. openraft 0.9 waits for
//! that callback before it takes the next write, so one append is one flush; group commit comes
//! from packing concurrent proposals into one entry (see `node.rs`).
//!
//! sled's own `flush` is not enough on Linux (checked in sled 0.34.7's source and under
//! strace): it writes its buffers with `pwrite` and then calls `sync_file_range`, which does
//! not write the file's metadata (the size of a growing file) nor flush the disk's write cache,
//! and values above a quarter of a segment go to files under `blobs/` that are never synced.
//! So after sled's flush the durable flush calls `fdatasync` on sled's `db` file (through our
//! own descriptor: fsync works on the inode) and, when a value large enough to become a blob
//! was written since the last flush, `fdatasync` on every blob file it has not synced yet, then
//! fsyncs the `blobs` folder. Segments are 4 MiB here, so entries up to 1 MiB
//! stay inline and blobs are rare.

// openraft fixes the error type of the storage traits (`StorageError`, about 224 bytes); the
// helpers here return it too rather than boxing and unboxing at every call.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, ErrorSubject, ErrorVerb, RaftLogReader, StorageIOError, Vote};

use super::types::{Entry, LogId, NodeId, StorageError, TypeConfig};

const LOG_TREE: &str = "log";
const META_TREE: &str = "meta";
const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
const KEY_NODE_ID: &[u8] = b"node_id";
/// sled's segment size. Values above a quarter of it become separate blob files; 4 MiB keeps
/// batches up to 1 MiB inline (the batcher closes a batch at `MAX_BATCH_BYTES`). sled records
/// it at creation and refuses to open a database with another value.
const SLED_SEGMENT_BYTES: usize = 4 << 20;
/// A value at least this large may be stored by sled as a blob file (sled's threshold is a
/// quarter of a segment, measured with its own framing; an eighth leaves a wide margin).
const SLED_BLOB_MIN_BYTES: usize = SLED_SEGMENT_BYTES / 8;
/// sled's data file and blob folder inside its directory (sled 0.34 layout).
const SLED_DATA_FILE_NAME: &str = "db";
const SLED_BLOB_DIR_NAME: &str = "blobs";

/// The state shared by the store and its readers.
struct Shared {
    db: sled::Db,
    /// Our own descriptor on sled's data file, to fdatasync it.
    data_file: std::fs::File,
    blob_dir: std::path::PathBuf,
    /// Blob files already synced (sled never rewrites a blob file in place).
    synced_blobs: std::sync::Mutex<std::collections::HashSet<std::ffi::OsString>>,
    /// Set when a value large enough to become a sled blob file was written since the last
    /// durable flush (and at open): only then does the flush list the blob folder.
    blobs_maybe_new: std::sync::atomic::AtomicBool,
    log: sled::Tree,
    meta: sled::Tree,
    /// Number of log flushes (fsyncs) done by `append`, for the group-commit test and status.
    n_append_flushes: Arc<AtomicU64>,
    /// The committed index + 1 (0: nothing committed), for status.
    committed_index_plus_one: Arc<AtomicU64>,
}

/// The Raft log store. Cloning gives another handle on the same sled trees (used as the
/// log reader).
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
}

/// Counters a [`LogStore`] exposes while openraft owns it.
#[derive(Clone)]
pub(crate) struct LogStoreProbe {
    shared: std::sync::Weak<Shared>,
    committed_index_plus_one: Arc<AtomicU64>,
    n_append_flushes: Arc<AtomicU64>,
}

fn io_error(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    e: impl Into<AnyError>,
) -> StorageError {
    StorageIOError::new(subject, verb, e).into()
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, bincode::Error> {
    bincode::deserialize(bytes)
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, bincode::Error> {
    bincode::serialize(value)
}

impl LogStore {
    /// Opens (or creates) the sled database at `path`. Entries at or below the last purged
    /// index left by a purge interrupted by a crash are removed.
    pub fn open(path: &Path) -> Result<Self, sled::Error> {
        let db = sled::Config::new()
            .path(path)
            .segment_size(SLED_SEGMENT_BYTES)
            .open()?;
        let log = db.open_tree(LOG_TREE)?;
        let meta = db.open_tree(META_TREE)?;
        let data_file = std::fs::File::open(path.join(SLED_DATA_FILE_NAME))?;
        let blob_dir = path.join(SLED_BLOB_DIR_NAME);
        // The files sled created on first open must survive a crash too.
        std::fs::File::open(path)?.sync_all()?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::File::open(parent)?.sync_all()?;
        }
        if blob_dir.is_dir() {
            std::fs::File::open(&blob_dir)?.sync_all()?;
        }
        let store = Self {
            shared: Arc::new(Shared {
                db,
                data_file,
                blob_dir,
                synced_blobs: std::sync::Mutex::new(std::collections::HashSet::new()),
                blobs_maybe_new: std::sync::atomic::AtomicBool::new(true),
                log,
                meta,
                n_append_flushes: Arc::new(AtomicU64::new(0)),
                committed_index_plus_one: Arc::new(AtomicU64::new(0)),
            }),
        };
        if let Some(purged) = store.last_purged().map_err(to_sled_error)? {
            store.remove_up_to(purged.index)?;
        }
        if let Some(committed) = store.committed().map_err(to_sled_error)? {
            store.set_committed_probe(Some(committed));
        }
        Ok(store)
    }

    /// Returns this node's id, choosing a random non-zero one and persisting it (flushed) on
    /// the first call ever.
    pub async fn node_id_or_create(&self) -> Result<NodeId, sled::Error> {
        if let Some(bytes) = self.shared.meta.get(KEY_NODE_ID)? {
            let array: [u8; 8] = bytes
                .as_ref()
                .try_into()
                .map_err(|_| sled::Error::Corruption { at: None, bt: () })?;
            return Ok(u64::from_be_bytes(array));
        }
        let mut node_id: u64 = 0;
        while node_id == 0 {
            node_id = rand::random();
        }
        self.shared
            .meta
            .insert(KEY_NODE_ID, &node_id.to_be_bytes())?;
        self.durable_flush().await.map_err(sled::Error::Io)?;
        Ok(node_id)
    }

    /// Sets this node's id on a fresh store (a node joining with the id its invitation
    /// names). Fails when the store already carries another id.
    pub async fn set_node_id(&self, node_id: NodeId) -> Result<NodeId, sled::Error> {
        if let Some(bytes) = self.shared.meta.get(KEY_NODE_ID)? {
            if bytes.as_ref() != node_id.to_be_bytes() {
                return Err(sled::Error::Unsupported(
                    "the raft store already belongs to another node id".to_string(),
                ));
            }
            return Ok(node_id);
        }
        self.shared
            .meta
            .insert(KEY_NODE_ID, &node_id.to_be_bytes())?;
        self.durable_flush().await.map_err(sled::Error::Io)?;
        Ok(node_id)
    }

    /// The number of flushes `append` did since this store was opened.
    pub fn n_append_flushes(&self) -> u64 {
        self.shared.n_append_flushes.load(Ordering::Relaxed)
    }

    pub(crate) fn probe(&self) -> LogStoreProbe {
        LogStoreProbe {
            shared: Arc::downgrade(&self.shared),
            committed_index_plus_one: self.shared.committed_index_plus_one.clone(),
            n_append_flushes: self.shared.n_append_flushes.clone(),
        }
    }

    fn set_committed_probe(&self, committed: Option<LogId>) {
        let value = committed.map(|id| id.index + 1).unwrap_or(0);
        self.shared
            .committed_index_plus_one
            .store(value, Ordering::Relaxed);
    }

    fn last_purged(&self) -> Result<Option<LogId>, StorageError> {
        self.read_meta(KEY_LAST_PURGED, ErrorSubject::Logs)
    }

    fn committed(&self) -> Result<Option<LogId>, StorageError> {
        Ok(self
            .read_meta::<Option<LogId>>(KEY_COMMITTED, ErrorSubject::Store)?
            .flatten())
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
        subject: ErrorSubject<NodeId>,
    ) -> Result<Option<T>, StorageError> {
        let bytes = self
            .shared
            .meta
            .get(key)
            .map_err(|e| io_error(subject.clone(), ErrorVerb::Read, &e))?;
        match bytes {
            None => Ok(None),
            Some(bytes) => decode(&bytes)
                .map(Some)
                .map_err(|e| io_error(subject, ErrorVerb::Read, &e)),
        }
    }

    fn write_meta<T: serde::Serialize>(
        &self,
        key: &[u8],
        value: &T,
        subject: ErrorSubject<NodeId>,
    ) -> Result<(), StorageError> {
        let bytes = encode(value).map_err(|e| io_error(subject.clone(), ErrorVerb::Write, &e))?;
        self.shared
            .meta
            .insert(key, bytes)
            .map_err(|e| io_error(subject, ErrorVerb::Write, &e))?;
        Ok(())
    }

    async fn flush(&self, subject: ErrorSubject<NodeId>) -> Result<(), StorageError> {
        self.durable_flush()
            .await
            .map_err(|e| io_error(subject, ErrorVerb::Write, &e))
    }

    /// sled's flush, then fdatasync of its data file and of new blob files (see the module
    /// documentation for why sled's flush alone is not durable). Runs on a blocking thread.
    async fn durable_flush(&self) -> std::io::Result<()> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.durable_flush())
            .await
            .map_err(std::io::Error::other)?
    }

    /// Removes every entry with an index at or below `index` (one batch, not flushed).
    fn remove_up_to(&self, index: u64) -> Result<(), sled::Error> {
        let mut batch = sled::Batch::default();
        for key in self.shared.log.range(..=index_key(index)).keys() {
            batch.remove(key?);
        }
        self.shared.log.apply_batch(batch)
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId>, StorageError> {
        match self
            .shared
            .log
            .last()
            .map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Read, &e))?
        {
            None => Ok(None),
            Some((_, bytes)) => {
                let entry: Entry = decode(&bytes)
                    .map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Read, &e))?;
                Ok(Some(entry.log_id))
            }
        }
    }
}

impl Shared {
    fn durable_flush(&self) -> std::io::Result<()> {
        self.db.flush().map_err(std::io::Error::other)?;
        self.data_file.sync_data()?;
        // Cleared before listing: a large value written meanwhile sets it again.
        if self.blobs_maybe_new.swap(false, Ordering::AcqRel) {
            if let Err(error) = self.sync_new_blobs() {
                self.blobs_maybe_new.store(true, Ordering::Release);
                return Err(error);
            }
        }
        Ok(())
    }

    fn sync_new_blobs(&self) -> std::io::Result<()> {
        let items = match std::fs::read_dir(&self.blob_dir) {
            Ok(items) => items,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut synced = self
            .synced_blobs
            .lock()
            .map_err(|_| std::io::Error::other("blob sync lock poisoned"))?;
        let mut present = std::collections::HashSet::new();
        let mut any_new = false;
        for item in items {
            let item = item?;
            let name = item.file_name();
            if !synced.contains(&name) {
                match std::fs::File::open(item.path()) {
                    Ok(file) => file.sync_data()?,
                    // Collected by sled meanwhile: nothing to make durable.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                synced.insert(name.clone());
                any_new = true;
            }
            present.insert(name);
        }
        synced.retain(|name| present.contains(name));
        if any_new {
            std::fs::File::open(&self.blob_dir)?.sync_all()?;
        }
        Ok(())
    }
}

fn to_sled_error(e: StorageError) -> sled::Error {
    sled::Error::Io(std::io::Error::other(e.to_string()))
}

impl LogStoreProbe {
    /// The highest index openraft reported committed, if any.
    pub(crate) fn committed_index(&self) -> Option<u64> {
        self.committed_index_plus_one
            .load(Ordering::Relaxed)
            .checked_sub(1)
    }

    /// Flushes done by `append` since the store was opened.
    pub(crate) fn n_append_flushes(&self) -> u64 {
        self.n_append_flushes.load(Ordering::Acquire)
    }

    /// Flushes the store durably if it is still open.
    pub(crate) async fn flush(&self) -> std::io::Result<()> {
        if let Some(shared) = self.shared.upgrade() {
            tokio::task::spawn_blocking(move || shared.durable_flush())
                .await
                .map_err(std::io::Error::other)??;
        }
        Ok(())
    }

    /// True once every handle on the store is dropped, so that sled's lock is released.
    pub(crate) fn is_closed(&self) -> bool {
        self.shared.strong_count() == 0
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut entries = Vec::new();
        for item in self.shared.log.range((start, end)) {
            let (_, bytes) = item.map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Read, &e))?;
            let entry: Entry =
                decode(&bytes).map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Read, &e))?;
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id = self.last_purged()?;
        let last_log_id = self.last_entry_log_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.write_meta(KEY_VOTE, vote, ErrorSubject::Vote)?;
        self.flush(ErrorSubject::Vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.read_meta(KEY_VOTE, ErrorSubject::Vote)
    }

    /// Not flushed on its own: losing the latest commit index in a crash is allowed (it is
    /// learnt again from the leader, or recomputed by a lone voter's election); the next
    /// append's flush persists it.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.write_meta(KEY_COMMITTED, &committed, ErrorSubject::Store)?;
        self.set_committed_probe(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.committed()
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = sled::Batch::default();
        let mut n_entries = 0usize;
        for entry in entries {
            let bytes = encode(&entry)
                .map_err(|e| io_error(ErrorSubject::Log(entry.log_id), ErrorVerb::Write, &e))?;
            if bytes.len() >= SLED_BLOB_MIN_BYTES {
                self.shared.blobs_maybe_new.store(true, Ordering::Release);
            }
            batch.insert(&index_key(entry.log_id.index), bytes);
            n_entries += 1;
        }
        if let Err(e) = self.shared.log.apply_batch(batch) {
            let message = e.to_string();
            callback.log_io_completed(Err(std::io::Error::other(message)));
            return Err(io_error(ErrorSubject::Logs, ErrorVerb::Write, &e));
        }
        // The acknowledgement below is the durability promise: only after the fdatasync.
        match self.durable_flush().await {
            Ok(_) => {
                self.shared.n_append_flushes.fetch_add(1, Ordering::Release);
                tracing::trace!(n_entries, "log entries flushed");
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(io_error(ErrorSubject::Logs, ErrorVerb::Write, &e))
            }
        }
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for key in self.shared.log.range(index_key(log_id.index)..).keys() {
            let key = key.map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Delete, &e))?;
            batch.remove(key);
        }
        self.shared
            .log
            .apply_batch(batch)
            .map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Delete, &e))?;
        // Flushed so that truncated entries cannot come back after a crash once newer ones
        // were acknowledged in their place.
        self.flush(ErrorSubject::Logs).await
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // The marker goes first and is flushed: a crash in between leaves entries below it,
        // which `open` removes, never a log that starts after a hole.
        self.write_meta(KEY_LAST_PURGED, &log_id, ErrorSubject::Logs)?;
        self.flush(ErrorSubject::Logs).await?;
        self.remove_up_to(log_id.index)
            .map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Delete, &e))
    }
}
