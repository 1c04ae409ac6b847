//! The Raft log as a plain append-only segment log, plus one small meta file for the vote, the
//! commit index, the last purged log id and the node id.
//!
//! Layout of the folder (`<data>/raft`):
//! - `seg-<index of its first entry, 20 digits>.log`: segments. A segment is a run of records
//!   for consecutive log indexes; each record is a little-endian `u32` payload length, a
//!   little-endian `u32` CRC-32 of the payload, then the payload (bincode of the openraft
//!   `Entry`). A new segment starts once the active one would exceed [`SEGMENT_BYTES`]
//!   (a single larger entry gets a segment of its own).
//! - `meta`: length, CRC-32 and bincode of [`Meta`], replaced atomically (written to
//!   `meta.tmp`, fdatasync, rename, fsync of the folder).
//! - `lock`: held with an exclusive `flock` while the store is open; a second opener is refused.
//!
//! In memory the store keeps, per segment, the offset of each record; reads use `pread` on the
//! segment file (the page cache serves recent entries), so nothing is cached twice.
//!
//! Durability: every `append` writes all its records with one `pwrite` per segment touched,
//! then `fdatasync`s them and only then calls `log_io_completed`. openraft 0.9 waits for that
//! callback before it takes the next write, so one append is one flush; group commit comes
//! from packing concurrent proposals into one entry (see `node.rs`). Entries are readable as
//! soon as they are written (before the flush), as openraft allows. Creating a segment fsyncs
//! the previous one first, then the folder, so that only the last segment can have a torn tail.
//! `save_vote`, `purge` and the node id are durable before they return (meta file replaced as
//! above); `truncate` deletes later segments (newest first, folder fsync'd after each) and cuts
//! the segment holding the first removed entry, then fdatasyncs it. `save_committed` is not
//! flushed on its own (losing the latest commit index in a crash is allowed): it is written
//! with the next meta write, by [`LogStoreProbe::flush`] at shutdown and when the store is
//! dropped.
//!
//! Storage faults: with openraft 0.9 a `StorageError` stops Raft for good. So an append, a
//! truncate, a purge (segment removal) or a meta file write (vote, purge marker) that fails with an OS error (no space left, an
//! I/O error, too many open files) is not returned: the partial write is rolled back (the
//! segment cut to its size before the append, segments the append created removed) and the
//! whole operation is retried with backoff (`health::retry_delay`) until it succeeds, while
//! the shared [`StorageHealth`] reports the failure (a truncate or purge is simply done again:
//! both change the in-memory view only for what is done on disk). `log_io_completed` is called only once
//! the entries are durable, so a leader whose disk is full acknowledges nothing (its Raft core
//! waits in the append: it stops sending heartbeats and the other nodes elect a leader); a
//! follower does not answer, and its leader carries on with the others. A failed fsync is
//! handled by rewriting the records, never by retrying the fsync alone (after a failed fsync
//! the kernel may have dropped the dirty pages). Shutdown stops the retries
//! ([`LogStoreProbe::stop_retrying`]); the pending append then fails (fatal, as before).
//!
//! Recovery at open: the meta file is read (a damaged meta file is refused), segments are
//! scanned in order and every record is checked (length bounds, CRC, decodable, index in
//! sequence). The first invalid record of the LAST segment is a torn write: the segment is cut
//! there (logged at warn), an empty last segment is removed. An invalid record in an earlier
//! segment, or a gap between segments, is corruption: the store refuses to open. (openraft
//! never appends after a hole; its conformance suite does, and `append` then starts a new
//! segment and logs a warning, so such a log is readable until it is reopened.) Segments
//! entirely at or below the last purged index (left by a purge interrupted by a crash) are
//! removed; entries below it in a partly purged segment stay on disk but are never read.
//!
//! Restart: this node's own vote, if committed (it led), is restored NOT committed, so that
//! openraft does not resume leadership in that term at startup: a leader replicates entries
//! before its own flush, so after a crash (or a disk that lost flushed entries) followers
//! may hold entries of that term that its log lacks, and a leader resuming the term would
//! write other entries under the same log ids (found by `scripts/chaos` with a cut tail). It
//! leads again only through an election, in a later term. A commit index beyond the last
//! entry on disk is lowered to it (see `restore_after_restart`).
//!
//! Import: data folders of earlier versions hold a sled database at the same path (files `db`
//! and `conf`). `open` then imports it once: it copies the meta values and every entry into a
//! new log in `<path>.seglog-import` (fsync'd), renames the sled folder to
//! `<path>.sled-imported`, then renames the new log to `<path>`. A crash before the first
//! rename restarts the import from scratch; after it, `open` finishes the second rename. The
//! sled folder is kept for the operator to delete.

// openraft fixes the error type of the storage traits (`StorageError`, about 224 bytes); the
// helpers here return it too rather than boxing and unboxing at every call.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{self, File};
use std::io;
use std::ops::{Bound, RangeBounds};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, ErrorSubject, ErrorVerb, RaftLogReader, StorageIOError, Vote};

use crate::health::{self, StorageComponent, StorageHealth};

use super::recovery::LOST_TAIL_FILE_NAME;

use super::types::{Entry, LogId, NodeId, StorageError, TypeConfig};

/// A segment rolls over once the next record would take it past this size.
pub(crate) const SEGMENT_BYTES: u64 = 64 << 20;
/// Record header: payload length and CRC-32, both little-endian `u32`.
const RECORD_HEADER_BYTES: usize = 8;
/// Largest record payload accepted (written or read). Above the largest command
/// (`MAX_COMMAND_BYTES`, 256 MiB) plus its entry framing.
const MAX_RECORD_BYTES: usize = 1 << 30;
/// Largest meta file accepted at open.
const MAX_META_BYTES: usize = 64 << 10;
const META_FILE_NAME: &str = "meta";
const META_TEMP_FILE_NAME: &str = "meta.tmp";
const LOCK_FILE_NAME: &str = "lock";
const SEGMENT_PREFIX: &str = "seg-";
const SEGMENT_SUFFIX: &str = ".log";
/// Suffixes of the folders beside the log used by the one-time sled import.
const IMPORT_TEMP_SUFFIX: &str = ".seglog-import";
const SLED_IMPORTED_SUFFIX: &str = ".sled-imported";
/// Entries copied (and flushed) per append while importing a sled log.
const IMPORT_CHUNK_ENTRIES: usize = 1024;

/// The sled layout of earlier versions (sled 0.34), read only by the import.
mod sled_layout {
    pub(super) const LOG_TREE: &str = "log";
    pub(super) const META_TREE: &str = "meta";
    pub(super) const KEY_VOTE: &[u8] = b"vote";
    pub(super) const KEY_COMMITTED: &[u8] = b"committed";
    pub(super) const KEY_LAST_PURGED: &[u8] = b"last_purged";
    pub(super) const KEY_NODE_ID: &[u8] = b"node_id";
    /// The segment size the earlier store created its databases with (sled refuses to open a
    /// database with another value; the import falls back to sled's default).
    pub(super) const SEGMENT_BYTES: usize = 4 << 20;
    pub(super) const DATA_FILE_NAME: &str = "db";
    pub(super) const CONF_FILE_NAME: &str = "conf";
}

/// Errors opening the log store or setting its node id.
#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("{0} is in use by another log store")]
    Locked(PathBuf),
    #[error("the raft store already belongs to node id {existing}, not {requested}")]
    OtherNodeId { existing: NodeId, requested: NodeId },
    #[error("importing the sled log at {path}: {detail}")]
    Import { path: PathBuf, detail: String },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> LogStoreError + '_ {
    move |source| LogStoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The values kept beside the log.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct Meta {
    node_id: Option<NodeId>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
}

/// One segment file and the offset of each of its records.
struct Segment {
    first_index: u64,
    path: PathBuf,
    file: Arc<File>,
    /// Offset of the record of entry `first_index + i`; it ends where the next one starts
    /// (the last one at `size`).
    offsets: Vec<u64>,
    size: u64,
}

impl Segment {
    fn next_index(&self) -> u64 {
        self.first_index + self.offsets.len() as u64
    }

    fn record_end(&self, position: usize) -> u64 {
        self.offsets.get(position + 1).copied().unwrap_or(self.size)
    }
}

struct Inner {
    /// By index of their first entry. Never holds an empty segment once an operation ends.
    segments: BTreeMap<u64, Segment>,
    last_log_id: Option<LogId>,
    meta: Meta,
    /// `meta.committed` changed since the meta file was last written.
    committed_dirty: bool,
    /// Set after a failed flush or a failed rollback of a partial write: the files no longer
    /// match what the store believes, so every later write is refused.
    failed: bool,
    segment_bytes: u64,
}

/// The state shared by the store and its readers.
struct Shared {
    dir: PathBuf,
    inner: Mutex<Inner>,
    /// Serializes meta file replacements.
    meta_write: Mutex<()>,
    /// The vote term when entries this node had acknowledged were found lost (a torn last
    /// record or a commit index past the log), until a leader gave them back (marker file
    /// `lost-tail`; see `recovery`).
    lost_tail: Option<u64>,
    /// `lock`, flock'ed for as long as the store is open.
    _lock: File,
    /// Number of log flushes (fsyncs) done by `append`, for the group-commit test and status.
    n_append_flushes: Arc<AtomicU64>,
    /// The committed index + 1 (0: nothing committed), for status.
    committed_index_plus_one: Arc<AtomicU64>,
    /// Where failed writes are reported while they are retried.
    health: std::sync::RwLock<Arc<StorageHealth>>,
    /// Set at shutdown: a write being retried gives up.
    stop_retrying: std::sync::atomic::AtomicBool,
    /// Test hook: the next this many writes or flushes fail with `injected_errno`.
    #[cfg(test)]
    injected_failures: std::sync::atomic::AtomicU32,
    #[cfg(test)]
    injected_errno: std::sync::atomic::AtomicI32,
}

/// Where an append started, to undo it after a failure.
struct RollbackPoint {
    /// First index, size and record count of the active segment.
    active: Option<(u64, u64, usize)>,
    last_log_id: Option<LogId>,
}

/// The Raft log store. Cloning gives another handle on the same log (used as the log reader).
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

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, bincode::Error> {
    bincode::deserialize(bytes)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves consistent data (every update is completed or
    // not started before a fallible call), so a poisoned lock is still usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn segment_file_name(first_index: u64) -> String {
    format!("{SEGMENT_PREFIX}{first_index:020}{SEGMENT_SUFFIX}")
}

fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name
        .strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Removes a file; one that is already gone (removed by an earlier, failed attempt) is fine.
fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Appends a record (header and payload) holding `value` to `buf`.
fn push_record<T: serde::Serialize>(buf: &mut Vec<u8>, value: &T) -> io::Result<()> {
    let start = buf.len();
    buf.extend_from_slice(&[0; RECORD_HEADER_BYTES]);
    bincode::serialize_into(&mut *buf, value).map_err(io::Error::other)?;
    let payload_len = buf.len() - start - RECORD_HEADER_BYTES;
    if payload_len > MAX_RECORD_BYTES {
        buf.truncate(start);
        return Err(io::Error::other(format!(
            "a log record of {payload_len} bytes is above the limit of {MAX_RECORD_BYTES}"
        )));
    }
    let crc = crc32fast::hash(&buf[start + RECORD_HEADER_BYTES..]);
    buf[start..start + 4].copy_from_slice(&(payload_len as u32).to_le_bytes());
    buf[start + 4..start + RECORD_HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Parses the record at the start of `bytes`: its payload and total length, or why it is
/// invalid (too short, bad length, bad CRC).
fn parse_record(bytes: &[u8]) -> Result<(&[u8], usize), String> {
    let Some(header) = bytes.get(..RECORD_HEADER_BYTES) else {
        return Err(format!("{} bytes, less than a record header", bytes.len()));
    };
    let mut len_bytes = [0; 4];
    len_bytes.copy_from_slice(&header[..4]);
    let mut crc_bytes = [0; 4];
    crc_bytes.copy_from_slice(&header[4..]);
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len == 0 || len > MAX_RECORD_BYTES {
        return Err(format!("record length {len} out of bounds"));
    }
    let Some(payload) = bytes.get(RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + len) else {
        return Err(format!(
            "record of {len} bytes runs past the end ({} left)",
            bytes.len() - RECORD_HEADER_BYTES
        ));
    };
    if crc32fast::hash(payload) != u32::from_le_bytes(crc_bytes) {
        return Err("record checksum mismatch".to_string());
    }
    Ok((payload, RECORD_HEADER_BYTES + len))
}

fn read_meta_file(dir: &Path) -> Result<Meta, LogStoreError> {
    let path = dir.join(META_FILE_NAME);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Meta::default()),
        Err(e) => return Err(io_at(&path)(e)),
    };
    let corrupt = |detail: String| LogStoreError::Corrupt {
        path: path.clone(),
        detail,
    };
    if bytes.len() > MAX_META_BYTES {
        return Err(corrupt(format!("{} bytes", bytes.len())));
    }
    let (payload, used) = parse_record(&bytes).map_err(corrupt)?;
    if used != bytes.len() {
        return Err(corrupt("trailing bytes".to_string()));
    }
    decode(payload).map_err(|e| corrupt(e.to_string()))
}

/// Replaces the meta file atomically and durably.
fn write_meta_file(dir: &Path, meta: &Meta) -> io::Result<()> {
    let mut bytes = Vec::new();
    push_record(&mut bytes, meta)?;
    let temp = dir.join(META_TEMP_FILE_NAME);
    {
        let mut file = File::create(&temp)?;
        io::Write::write_all(&mut file, &bytes)?;
        file.sync_data()?;
    }
    fs::rename(&temp, dir.join(META_FILE_NAME))?;
    sync_dir(dir)
}

/// Reads and checks the records of one segment file. Returns the segment (cut at the first
/// invalid record when `is_last`), the log id of its last entry and whether it was cut.
fn load_segment(
    path: PathBuf,
    first_index: u64,
    is_last: bool,
) -> Result<(Segment, Option<LogId>, bool), LogStoreError> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_at(&path))?;
    let bytes = fs::read(&path).map_err(io_at(&path))?;
    let mut offsets = Vec::new();
    let mut offset = 0usize;
    let mut last_log_id = None;
    let mut invalid = None;
    while offset < bytes.len() {
        let expected = first_index + offsets.len() as u64;
        let checked = parse_record(&bytes[offset..]).and_then(|(payload, len)| {
            let entry: Entry = decode(payload).map_err(|e| format!("undecodable entry: {e}"))?;
            if entry.log_id.index != expected {
                return Err(format!(
                    "entry index {} where {expected} was expected",
                    entry.log_id.index
                ));
            }
            Ok((entry.log_id, len))
        });
        match checked {
            Ok((log_id, len)) => {
                offsets.push(offset as u64);
                last_log_id = Some(log_id);
                offset += len;
            }
            Err(detail) => {
                invalid = Some(detail);
                break;
            }
        }
    }
    let torn = invalid.is_some();
    if let Some(detail) = invalid {
        if !is_last {
            return Err(LogStoreError::Corrupt {
                path,
                detail: format!("at offset {offset}: {detail} (not the last segment)"),
            });
        }
        tracing::warn!(
            path = %path.display(),
            offset,
            dropped_bytes = bytes.len() - offset,
            %detail,
            "raft log: torn tail in the last segment, cut at its last whole record"
        );
        file.set_len(offset as u64).map_err(io_at(&path))?;
        file.sync_data().map_err(io_at(&path))?;
    }
    Ok((
        Segment {
            first_index,
            path,
            file: Arc::new(file),
            offsets,
            size: offset as u64,
        },
        last_log_id,
        torn,
    ))
}

/// Adjusts the persisted vote and commit index to the log found at open (see the module
/// documentation, "Restart").
///
/// - This node's own vote, if committed (it was leader), is restored as not committed, so that
///   openraft does not resume leadership in that term at startup. A leader appends before its
///   own flush and replicates in parallel, so after a crash (or a cut tail) the followers may
///   hold entries of that term that this node's log no longer has; a leader resuming in the
///   same term would write different entries under the same log ids. Not committed, the vote
///   still keeps this node from voting for another node in that term, and the only way back
///   to leadership is an election, in a later term.
/// - A commit index beyond the last entry on disk (the log lost entries it had flushed: a
///   lying disk, or a copy of the folder) is lowered to the last entry; the node learns the
///   rest again from the leader.
///
/// Returns whether the commit index was lowered.
fn restore_after_restart(meta: &mut Meta, last_log_id: Option<LogId>) -> bool {
    if let (Some(vote), Some(node_id)) = (meta.vote, meta.node_id) {
        if vote.is_committed() && vote.leader_id().voted_for() == Some(node_id) {
            let term = vote.leader_id().get_term();
            tracing::info!(
                term,
                "raft log: this node led term {term} before the restart; it leads again only \
                 after an election in a later term"
            );
            meta.vote = Some(Vote::new(term, node_id));
        }
    }
    let last = last_log_id.or(meta.last_purged);
    if let Some(committed) = meta.committed {
        if last.is_none_or(|last| last.index < committed.index) {
            tracing::warn!(
                committed = %committed,
                last = ?last,
                "raft log: the log ends before its recorded commit index (entries flushed \
                 earlier are gone); the commit index is lowered to the last entry"
            );
            meta.committed = last;
            return true;
        }
    }
    false
}

/// The vote term recorded by the lost-tail marker in `dir`, if there is one.
fn read_lost_tail_marker(dir: &Path) -> Result<Option<u64>, LogStoreError> {
    let path = dir.join(LOST_TAIL_FILE_NAME);
    match fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|e| LogStoreError::Corrupt {
                path,
                detail: format!("not a term: {e}"),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_at(&path)(e)),
    }
}

/// Writes the lost-tail marker durably (see `recovery`).
fn write_lost_tail_marker(dir: &Path, term: u64) -> io::Result<()> {
    let path = dir.join(LOST_TAIL_FILE_NAME);
    let mut file = File::create(&path)?;
    io::Write::write_all(&mut file, format!("{term}\n").as_bytes())?;
    file.sync_data()?;
    sync_dir(dir)
}

/// Test hook: removes the last `n` whole records of the last segment of the log in `dir`
/// (what a disk that lost flushed data leaves: nothing torn to detect). Returns the log
/// index of the first removed entry.
#[cfg(test)]
pub(crate) fn cut_last_records(dir: &Path, n: usize) -> u64 {
    let mut firsts: Vec<u64> = fs::read_dir(dir)
        .expect("list the log folder")
        .filter_map(|item| parse_segment_file_name(&item.ok()?.file_name().to_string_lossy()))
        .collect();
    firsts.sort_unstable();
    let first = *firsts.last().expect("a segment");
    let path = dir.join(segment_file_name(first));
    let bytes = fs::read(&path).expect("read the segment");
    let mut ends = vec![0usize];
    while *ends.last().expect("ends") < bytes.len() {
        let at = *ends.last().expect("ends");
        let (_, len) = parse_record(&bytes[at..]).expect("a whole record");
        ends.push(at + len);
    }
    let n_records = ends.len() - 1;
    assert!(
        n <= n_records,
        "the last segment holds only {n_records} records"
    );
    let keep = n_records - n;
    File::options()
        .write(true)
        .open(&path)
        .expect("open the segment")
        .set_len(ends[keep] as u64)
        .expect("cut the segment");
    first + keep as u64
}

/// Test hook: cuts `n` bytes off the end of the last segment of the log in `dir` (what the
/// chaos `truncate` fault does: the last record is left torn). Returns the new size.
#[cfg(test)]
pub(crate) fn cut_tail_bytes(dir: &Path, n: u64) -> u64 {
    let mut firsts: Vec<u64> = fs::read_dir(dir)
        .expect("list the log folder")
        .filter_map(|item| parse_segment_file_name(&item.ok()?.file_name().to_string_lossy()))
        .collect();
    firsts.sort_unstable();
    let first = *firsts.last().expect("a segment");
    let path = dir.join(segment_file_name(first));
    let file = File::options()
        .write(true)
        .open(&path)
        .expect("open the segment");
    let size = file.metadata().expect("segment size").len();
    let kept = size.saturating_sub(n);
    file.set_len(kept).expect("cut the segment");
    kept
}

impl Shared {
    /// Opens (or creates) the segment log in `dir` (no import).
    fn open_dir(dir: &Path, segment_bytes: u64) -> Result<Shared, LogStoreError> {
        let created = !dir.exists();
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        if created {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent).map_err(io_at(parent))?;
            }
        }
        let lock_path = dir.join(LOCK_FILE_NAME);
        let lock_file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_at(&lock_path))?;
        match lock_file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(LogStoreError::Locked(dir.to_path_buf()))
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_at(&lock_path)(e)),
        }
        let meta = read_meta_file(dir)?;
        let mut firsts = Vec::new();
        for item in fs::read_dir(dir).map_err(io_at(dir))? {
            let item = item.map_err(io_at(dir))?;
            let name = item.file_name();
            let name = name.to_string_lossy();
            if name == META_TEMP_FILE_NAME {
                fs::remove_file(item.path()).map_err(io_at(&item.path()))?;
            } else if let Some(first) = parse_segment_file_name(&name) {
                firsts.push(first);
            }
        }
        firsts.sort_unstable();
        let purged_next = meta.last_purged.map(|id| id.index + 1).unwrap_or(0);
        let mut segments = BTreeMap::new();
        let mut last_log_id = None;
        let mut removed_any = false;
        let mut torn = false;
        for (position, &first) in firsts.iter().enumerate() {
            let path = dir.join(segment_file_name(first));
            let is_last = position + 1 == firsts.len();
            let (segment, segment_last, segment_torn) = load_segment(path, first, is_last)?;
            torn |= segment_torn;
            if segment.offsets.is_empty() || segment.next_index() <= purged_next {
                // Empty (a torn first record) or entirely purged (an interrupted purge).
                fs::remove_file(&segment.path).map_err(io_at(&segment.path))?;
                removed_any = true;
                continue;
            }
            if let Some((_, previous)) = segments.last_key_value() {
                let previous: &Segment = previous;
                if previous.next_index() != first {
                    return Err(LogStoreError::Corrupt {
                        path: segment.path.clone(),
                        detail: format!(
                            "starts at index {first}, the previous segment ends before {}",
                            previous.next_index()
                        ),
                    });
                }
            }
            last_log_id = segment_last;
            segments.insert(first, segment);
        }
        if removed_any {
            sync_dir(dir).map_err(io_at(dir))?;
        }
        let mut meta = meta;
        let lowered = restore_after_restart(&mut meta, last_log_id);
        let mut lost_tail = read_lost_tail_marker(dir)?;
        if (torn || lowered) && lost_tail.is_none() {
            let term = meta.vote.map(|v| v.leader_id().get_term()).unwrap_or(0);
            write_lost_tail_marker(dir, term).map_err(io_at(dir))?;
            lost_tail = Some(term);
        }
        let committed_plus_one = meta.committed.map(|id| id.index + 1).unwrap_or(0);
        Ok(Shared {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner {
                segments,
                last_log_id,
                meta,
                committed_dirty: false,
                failed: false,
                segment_bytes,
            }),
            meta_write: Mutex::new(()),
            lost_tail,
            _lock: lock_file,
            n_append_flushes: Arc::new(AtomicU64::new(0)),
            committed_index_plus_one: Arc::new(AtomicU64::new(committed_plus_one)),
            health: std::sync::RwLock::new(Arc::new(StorageHealth::new())),
            stop_retrying: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            injected_failures: std::sync::atomic::AtomicU32::new(0),
            #[cfg(test)]
            injected_errno: std::sync::atomic::AtomicI32::new(0),
        })
    }

    /// Test hook: fails the call if a failure is injected.
    #[cfg(test)]
    fn injected(&self) -> io::Result<()> {
        let remaining = self.injected_failures.load(Ordering::Acquire);
        if remaining > 0 {
            self.injected_failures
                .store(remaining - 1, Ordering::Release);
            return Err(io::Error::from_raw_os_error(
                self.injected_errno.load(Ordering::Acquire),
            ));
        }
        Ok(())
    }

    #[cfg(not(test))]
    fn injected(&self) -> io::Result<()> {
        Ok(())
    }

    fn health(&self) -> Arc<StorageHealth> {
        self.health
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Undoes a failed append: removes the segments it created and cuts the segment that was
    /// active back to its size. On failure the store refuses writes until reopened.
    fn rollback(&self, inner: &mut Inner, point: &RollbackPoint) {
        let created: Vec<u64> = inner
            .segments
            .keys()
            .copied()
            .filter(|first| point.active.is_none_or(|(active, _, _)| *first > active))
            .collect();
        let mut ok = true;
        for first in created {
            if let Some(segment) = inner.segments.remove(&first) {
                ok &= fs::remove_file(&segment.path).is_ok();
            }
        }
        if let Some((first, size, n_records)) = point.active {
            if let Some(segment) = inner.segments.get_mut(&first) {
                ok &= segment.file.set_len(size).is_ok();
                segment.size = size;
                segment.offsets.truncate(n_records);
            }
        }
        inner.last_log_id = point.last_log_id;
        if !ok {
            tracing::error!(
                "raft log: cannot undo a failed append; the store refuses writes until restarted"
            );
            inner.failed = true;
        }
    }

    /// Writes the meta file with the current values, durably.
    fn write_meta(&self) -> io::Result<()> {
        let _writing = lock(&self.meta_write);
        let meta = {
            let mut inner = lock(&self.inner);
            inner.committed_dirty = false;
            inner.meta.clone()
        };
        let result = write_meta_file(&self.dir, &meta);
        if result.is_err() {
            lock(&self.inner).committed_dirty = true;
        }
        result
    }

    /// Appends encoded records (`records`: index, start and end in `buf`), then flushes every
    /// segment written.
    fn append(&self, buf: &[u8], records: &[(LogId, usize, usize)]) -> io::Result<()> {
        let Some(&(last_id, _, _)) = records.last() else {
            return Ok(());
        };
        let mut to_sync: Vec<Arc<File>> = Vec::new();
        let point;
        {
            let mut inner = lock(&self.inner);
            if inner.failed {
                return Err(io::Error::other(
                    "the raft log store failed earlier and refuses writes until reopened",
                ));
            }
            point = RollbackPoint {
                active: inner
                    .segments
                    .last_key_value()
                    .map(|(first, s)| (*first, s.size, s.offsets.len())),
                last_log_id: inner.last_log_id,
            };
            // openraft appends after the last entry (it truncates before overwriting). A
            // hole (which openraft never makes, but its conformance suite does) starts a new
            // segment; `open` refuses a log with a hole as corrupt.
            let mut next = inner
                .segments
                .last_key_value()
                .map(|(_, segment)| segment.next_index())
                .unwrap_or(0);
            for (log_id, _, _) in records {
                if log_id.index < next {
                    return Err(io::Error::other(format!(
                        "append of index {} where the log continues at {next}",
                        log_id.index
                    )));
                }
                if log_id.index > next && next > 0 {
                    tracing::warn!(
                        index = log_id.index,
                        next,
                        "raft log: append after a hole, starting a new segment"
                    );
                }
                next = log_id.index + 1;
            }
            let segment_bytes = inner.segment_bytes;
            let mut chunk_start = 0;
            while chunk_start < records.len() {
                let first = records[chunk_start].0.index;
                let active = inner
                    .segments
                    .last_key_value()
                    .map(|(_, s)| (s.size, s.next_index()));
                let mut chunk_end = chunk_start;
                let mut chunk_bytes = 0u64;
                // Records that continue the active segment and fit in it (at least one in an
                // empty segment).
                if let Some((used, next)) = active {
                    while chunk_end < records.len() {
                        let (log_id, start, end) = records[chunk_end];
                        if log_id.index != next + (chunk_end - chunk_start) as u64 {
                            break;
                        }
                        let total = used + chunk_bytes + (end - start) as u64;
                        if used + chunk_bytes > 0 && total > segment_bytes {
                            break;
                        }
                        chunk_bytes += (end - start) as u64;
                        chunk_end += 1;
                    }
                }
                if chunk_end == chunk_start {
                    // Roll over: the previous segment is made durable before a later one
                    // exists, so only the last segment can have a torn tail.
                    if let Some((_, previous)) = inner.segments.last_key_value() {
                        if let Err(e) = self.injected().and_then(|()| previous.file.sync_data()) {
                            self.rollback(&mut inner, &point);
                            return Err(e);
                        }
                    }
                    let segment = match self.create_segment(first) {
                        Ok(segment) => segment,
                        Err(e) => {
                            self.rollback(&mut inner, &point);
                            return Err(e);
                        }
                    };
                    inner.segments.insert(first, segment);
                    continue;
                }
                let Some(mut active) = inner.segments.last_entry() else {
                    return Err(io::Error::other("no active segment"));
                };
                let segment = active.get_mut();
                let bytes = &buf[records[chunk_start].1..records[chunk_end - 1].2];
                if let Err(e) = self
                    .injected()
                    .and_then(|()| segment.file.write_all_at(bytes, segment.size))
                {
                    // Undo the partial write so that the next append lands after whole records.
                    self.rollback(&mut inner, &point);
                    return Err(e);
                }
                let base = records[chunk_start].1 as u64;
                for &(_, start, _) in &records[chunk_start..chunk_end] {
                    segment.offsets.push(segment.size + start as u64 - base);
                }
                segment.size += bytes.len() as u64;
                if !to_sync.iter().any(|f| Arc::ptr_eq(f, &segment.file)) {
                    to_sync.push(segment.file.clone());
                }
                chunk_start = chunk_end;
            }
            inner.last_log_id = Some(last_id);
        }
        for file in to_sync {
            if let Err(e) = self.injected().and_then(|()| file.sync_data()) {
                // The records are written again by the retry (the kernel may have dropped
                // the dirty pages a failed fsync did not write).
                let mut inner = lock(&self.inner);
                self.rollback(&mut inner, &point);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Creates an empty segment file for entries from `first_index` and fsyncs the folder.
    fn create_segment(&self, first_index: u64) -> io::Result<Segment> {
        let path = self.dir.join(segment_file_name(first_index));
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        if let Err(e) = sync_dir(&self.dir) {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        Ok(Segment {
            first_index,
            path,
            file: Arc::new(file),
            offsets: Vec::new(),
            size: 0,
        })
    }

    /// Removes every entry at or after `index`, durably. Safe to call again after it failed
    /// (it is retried, see [`LogStore::retrying`]): the in-memory view changes only for what
    /// is done on disk, and a segment already unlinked by a failed attempt counts as removed.
    fn truncate(&self, index: u64) -> io::Result<()> {
        let mut inner = lock(&self.inner);
        if inner.failed {
            return Err(io::Error::other(
                "the raft log store failed earlier and refuses writes until reopened",
            ));
        }
        // Newest first, each unlink made durable before the next: a crash leaves a prefix.
        let later: Vec<u64> = inner
            .segments
            .range(index..)
            .map(|(k, _)| *k)
            .rev()
            .collect();
        for first in later {
            if let Some(segment) = inner.segments.get(&first) {
                self.injected()?;
                remove_if_present(&segment.path)?;
                sync_dir(&self.dir)?;
            }
            inner.segments.remove(&first);
        }
        if let Some(mut active) = inner.segments.last_entry() {
            let segment = active.get_mut();
            if segment.next_index() > index {
                let position = (index - segment.first_index) as usize;
                let cut = segment.offsets[position];
                // On failure nothing changes in memory and the retry cuts again: the cut
                // drops only bytes that are discarded anyway, and the retried set_len and
                // fdatasync make the new size durable.
                self.injected()
                    .and_then(|()| segment.file.set_len(cut))
                    .and_then(|()| segment.file.sync_data())?;
                segment.offsets.truncate(position);
                segment.size = cut;
            }
        }
        // A segment left empty by a failed write holds nothing to keep.
        while let Some(empty) = inner
            .segments
            .last_key_value()
            .filter(|(_, segment)| segment.offsets.is_empty())
            .map(|(first, _)| *first)
        {
            if let Some(segment) = inner.segments.get(&empty) {
                remove_if_present(&segment.path)?;
                sync_dir(&self.dir)?;
            }
            inner.segments.remove(&empty);
        }
        let new_last = match inner.segments.last_key_value() {
            Some((_, segment)) => Some(read_log_id(segment, segment.offsets.len() - 1)?),
            None => None,
        };
        inner.last_log_id = new_last;
        Ok(())
    }

    /// Deletes the segments whose entries are all at or below `index` (the caller recorded
    /// the purge in the meta file first). Safe to call again after it failed: a segment
    /// leaves the in-memory view once its file is gone.
    fn remove_purged(&self, index: u64) -> io::Result<()> {
        let mut inner = lock(&self.inner);
        let purged: Vec<u64> = inner
            .segments
            .iter()
            .take_while(|(_, segment)| segment.next_index() <= index.saturating_add(1))
            .map(|(first, _)| *first)
            .collect();
        if purged.is_empty() {
            return Ok(());
        }
        for first in purged {
            if let Some(segment) = inner.segments.get(&first) {
                self.injected()?;
                remove_if_present(&segment.path)?;
            }
            inner.segments.remove(&first);
        }
        if inner.segments.is_empty() {
            inner.last_log_id = None;
        }
        sync_dir(&self.dir)
    }

    /// Reads the entries with index in `start..end` that are present and not purged.
    fn read(&self, start: u64, end: u64) -> io::Result<Vec<Entry>> {
        struct Span {
            file: Arc<File>,
            first_index: u64,
            offsets: Vec<u64>,
            end: u64,
        }
        let mut spans = Vec::new();
        {
            let inner = lock(&self.inner);
            let purged_next = inner.meta.last_purged.map(|id| id.index + 1).unwrap_or(0);
            let start = start.max(purged_next);
            for segment in inner.segments.values() {
                let low = start.max(segment.first_index);
                let high = end.min(segment.next_index());
                if low >= high {
                    continue;
                }
                let from = (low - segment.first_index) as usize;
                let to = (high - segment.first_index) as usize;
                spans.push(Span {
                    file: segment.file.clone(),
                    first_index: low,
                    offsets: segment.offsets[from..to].to_vec(),
                    end: segment.record_end(to - 1),
                });
            }
        }
        let mut entries = Vec::new();
        for span in spans {
            let base = span.offsets[0];
            let len = usize::try_from(span.end - base).map_err(io::Error::other)?;
            let mut bytes = vec![0; len];
            span.file.read_exact_at(&mut bytes, base)?;
            for (i, &offset) in span.offsets.iter().enumerate() {
                let at = (offset - base) as usize;
                let (payload, _) = parse_record(&bytes[at..]).map_err(io::Error::other)?;
                let entry: Entry = decode(payload).map_err(io::Error::other)?;
                let expected = span.first_index + i as u64;
                if entry.log_id.index != expected {
                    return Err(io::Error::other(format!(
                        "read entry {} where {expected} was expected",
                        entry.log_id.index
                    )));
                }
                entries.push(entry);
            }
        }
        Ok(entries)
    }

    /// Flushes the active segment and writes a changed commit index.
    fn durable_flush(&self) -> io::Result<()> {
        let (file, dirty) = {
            let inner = lock(&self.inner);
            (
                inner
                    .segments
                    .last_key_value()
                    .map(|(_, segment)| segment.file.clone()),
                inner.committed_dirty,
            )
        };
        if let Some(file) = file {
            file.sync_data()?;
        }
        if dirty {
            self.write_meta()?;
        }
        Ok(())
    }
}

impl Drop for Shared {
    /// Writes a changed commit index when the last handle goes (openraft may drop the store
    /// before the shutdown flush reaches it).
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        if inner.committed_dirty && !inner.failed {
            let meta = inner.meta.clone();
            if let Err(error) = write_meta_file(&self.dir, &meta) {
                tracing::warn!(%error, "raft log: cannot write the commit index at close");
            }
        }
    }
}

/// The log id of the record at `position` in `segment`.
fn read_log_id(segment: &Segment, position: usize) -> io::Result<LogId> {
    let start = segment.offsets[position];
    let len = usize::try_from(segment.record_end(position) - start).map_err(io::Error::other)?;
    let mut bytes = vec![0; len];
    segment.file.read_exact_at(&mut bytes, start)?;
    let (payload, _) = parse_record(&bytes).map_err(io::Error::other)?;
    let entry: Entry = decode(payload).map_err(io::Error::other)?;
    Ok(entry.log_id)
}

/// True when `path` holds a sled database (the layout of earlier versions).
fn is_sled_layout(path: &Path) -> bool {
    path.join(sled_layout::CONF_FILE_NAME).is_file()
        && path.join(sled_layout::DATA_FILE_NAME).is_file()
}

fn sibling(path: &Path, suffix: &str) -> Result<PathBuf, LogStoreError> {
    let Some(name) = path.file_name() else {
        return Err(LogStoreError::Import {
            path: path.to_path_buf(),
            detail: "the log path has no folder name".to_string(),
        });
    };
    let mut name = name.to_os_string();
    name.push(suffix);
    Ok(path.with_file_name(name))
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Finishes or performs the one-time import of a sled log at `path` (see the module
/// documentation for the steps and their crash safety).
fn import_sled_if_present(path: &Path) -> Result<(), LogStoreError> {
    let temp = sibling(path, IMPORT_TEMP_SUFFIX)?;
    let imported = sibling(path, SLED_IMPORTED_SUFFIX)?;
    let parent = parent_dir(path);
    if !path.exists() && temp.is_dir() && imported.is_dir() {
        // A crash between the two renames: the new log in `temp` is complete.
        fs::rename(&temp, path).map_err(io_at(path))?;
        sync_dir(&parent).map_err(io_at(&parent))?;
        tracing::info!(path = %path.display(), "raft log: finished the import of the sled log");
        return Ok(());
    }
    if !is_sled_layout(path) {
        return Ok(());
    }
    if imported.exists() {
        return Err(LogStoreError::Import {
            path: path.to_path_buf(),
            detail: format!(
                "{} already exists; move it away to import again",
                imported.display()
            ),
        });
    }
    if temp.exists() {
        // Left by an import interrupted before its first rename: start again.
        fs::remove_dir_all(&temp).map_err(io_at(&temp))?;
    }
    let n_entries = copy_sled_log(path, &temp)?;
    sync_dir(&parent).map_err(io_at(&parent))?;
    fs::rename(path, &imported).map_err(io_at(path))?;
    sync_dir(&parent).map_err(io_at(&parent))?;
    fs::rename(&temp, path).map_err(io_at(path))?;
    sync_dir(&parent).map_err(io_at(&parent))?;
    tracing::info!(
        path = %path.display(),
        n_entries,
        sled_folder = %imported.display(),
        "raft log: imported the sled log; the sled folder can be deleted"
    );
    Ok(())
}

/// Copies the sled log at `sled_path` into a new segment log at `dest`, durably. Returns the
/// number of entries copied.
fn copy_sled_log(sled_path: &Path, dest: &Path) -> Result<u64, LogStoreError> {
    let import_error = |detail: String| LogStoreError::Import {
        path: sled_path.to_path_buf(),
        detail,
    };
    let db = match sled::Config::new()
        .path(sled_path)
        .segment_size(sled_layout::SEGMENT_BYTES)
        .open()
    {
        Ok(db) => db,
        // Created with sled's default segment size.
        Err(_) => sled::Config::new()
            .path(sled_path)
            .open()
            .map_err(|e| import_error(e.to_string()))?,
    };
    let sled_error = |e: sled::Error| import_error(e.to_string());
    let log = db.open_tree(sled_layout::LOG_TREE).map_err(sled_error)?;
    let meta_tree = db.open_tree(sled_layout::META_TREE).map_err(sled_error)?;
    let get = |key: &[u8]| meta_tree.get(key).map_err(sled_error);
    let mut meta = Meta::default();
    if let Some(bytes) = get(sled_layout::KEY_NODE_ID)? {
        let array: [u8; 8] = bytes
            .as_ref()
            .try_into()
            .map_err(|_| import_error("node id is not 8 bytes".to_string()))?;
        meta.node_id = Some(u64::from_be_bytes(array));
    }
    if let Some(bytes) = get(sled_layout::KEY_VOTE)? {
        meta.vote = Some(decode(&bytes).map_err(|e| import_error(format!("vote: {e}")))?);
    }
    if let Some(bytes) = get(sled_layout::KEY_COMMITTED)? {
        meta.committed =
            decode::<Option<LogId>>(&bytes).map_err(|e| import_error(format!("committed: {e}")))?;
    }
    if let Some(bytes) = get(sled_layout::KEY_LAST_PURGED)? {
        meta.last_purged =
            Some(decode(&bytes).map_err(|e| import_error(format!("last purged: {e}")))?);
    }
    let purged_next = meta.last_purged.map(|id| id.index + 1).unwrap_or(0);
    let shared = Shared::open_dir(dest, SEGMENT_BYTES)?;
    let mut n_entries = 0u64;
    let mut buf = Vec::new();
    let mut records = Vec::new();
    let flush = |buf: &mut Vec<u8>, records: &mut Vec<(LogId, usize, usize)>| {
        let result = shared.append(buf, records).map_err(io_at(dest));
        buf.clear();
        records.clear();
        result
    };
    for item in log.range(purged_next.to_be_bytes()..) {
        let (_, bytes) = item.map_err(sled_error)?;
        let entry: Entry = decode(&bytes).map_err(|e| import_error(format!("entry: {e}")))?;
        let start = buf.len();
        push_record(&mut buf, &entry).map_err(io_at(dest))?;
        records.push((entry.log_id, start, buf.len()));
        n_entries += 1;
        if records.len() >= IMPORT_CHUNK_ENTRIES {
            flush(&mut buf, &mut records)?;
        }
    }
    flush(&mut buf, &mut records)?;
    write_meta_file(dest, &meta).map_err(io_at(dest))?;
    drop(shared);
    drop(log);
    drop(meta_tree);
    drop(db);
    Ok(n_entries)
}

impl LogStore {
    /// Opens (or creates) the segment log in the folder `path`, importing a sled log found
    /// there first. Fails when another store has it open.
    pub fn open(path: &Path) -> Result<Self, LogStoreError> {
        Self::open_with_segment_bytes(path, SEGMENT_BYTES)
    }

    /// [`LogStore::open`] with another segment size (tests roll over with small segments).
    pub(crate) fn open_with_segment_bytes(
        path: &Path,
        segment_bytes: u64,
    ) -> Result<Self, LogStoreError> {
        import_sled_if_present(path)?;
        let shared = Shared::open_dir(path, segment_bytes)?;
        Ok(Self {
            shared: Arc::new(shared),
        })
    }

    /// Returns this node's id, choosing a random non-zero one and persisting it (flushed) on
    /// the first call ever.
    pub async fn node_id_or_create(&self) -> Result<NodeId, LogStoreError> {
        let node_id = {
            let mut inner = lock(&self.shared.inner);
            if let Some(node_id) = inner.meta.node_id {
                return Ok(node_id);
            }
            let mut node_id: u64 = 0;
            while node_id == 0 {
                node_id = rand::random();
            }
            inner.meta.node_id = Some(node_id);
            node_id
        };
        self.write_meta()
            .await
            .map_err(io_at(&self.shared.dir.join(META_FILE_NAME)))?;
        Ok(node_id)
    }

    /// Sets this node's id on a fresh store (a node joining with the id its invitation
    /// names). Fails when the store already carries another id.
    pub async fn set_node_id(&self, node_id: NodeId) -> Result<NodeId, LogStoreError> {
        {
            let mut inner = lock(&self.shared.inner);
            match inner.meta.node_id {
                Some(existing) if existing == node_id => return Ok(node_id),
                Some(existing) => {
                    return Err(LogStoreError::OtherNodeId {
                        existing,
                        requested: node_id,
                    })
                }
                None => inner.meta.node_id = Some(node_id),
            }
        }
        self.write_meta()
            .await
            .map_err(io_at(&self.shared.dir.join(META_FILE_NAME)))?;
        Ok(node_id)
    }

    /// The recovery state of a node whose log lost a tail it had acknowledged (see
    /// `recovery`); inactive for a whole log.
    pub(crate) fn tail_recovery(&self) -> super::recovery::TailRecovery {
        match self.shared.lost_tail {
            Some(term) => {
                super::recovery::TailRecovery::lost(term, self.shared.dir.join(LOST_TAIL_FILE_NAME))
            }
            None => super::recovery::TailRecovery::inactive(),
        }
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

    /// Reports storage failures to `health` (shared with the application) from now on.
    pub fn set_health(&self, health: Arc<StorageHealth>) {
        *self
            .shared
            .health
            .write()
            .unwrap_or_else(|p| p.into_inner()) = health;
    }

    /// Writes the meta file on a blocking thread, retrying OS errors (see the module comment).
    async fn write_meta(&self) -> io::Result<()> {
        self.retrying(|shared| shared.write_meta()).await
    }

    /// Runs `work` on a blocking thread until it succeeds, retrying OS errors with backoff
    /// (reported to the storage health) unless the store is shutting down.
    async fn retrying(
        &self,
        work: impl Fn(&Shared) -> io::Result<()> + Send + Sync + 'static,
    ) -> io::Result<()> {
        let work = Arc::new(work);
        let mut attempt = 0;
        loop {
            let shared = self.shared.clone();
            let step = work.clone();
            let result = tokio::task::spawn_blocking(move || step(&shared))
                .await
                .map_err(io::Error::other)?;
            match result {
                Ok(()) => {
                    if attempt > 0 {
                        self.shared.health().report_ok(StorageComponent::RaftLog);
                    }
                    return Ok(());
                }
                Err(e)
                    if health::is_retryable(&e)
                        && !self.shared.stop_retrying.load(Ordering::Acquire)
                        && !lock(&self.shared.inner).failed =>
                {
                    self.shared
                        .health()
                        .report_failure(StorageComponent::RaftLog, &e);
                    tokio::time::sleep(health::retry_delay(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Appends encoded records durably, retrying OS errors (see the module comment).
    async fn append_durably(
        &self,
        buf: Vec<u8>,
        records: Vec<(LogId, usize, usize)>,
    ) -> io::Result<()> {
        let buf = Arc::new(buf);
        let records = Arc::new(records);
        self.retrying(move |shared| shared.append(&buf, &records))
            .await
    }
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

    /// Flushes the store durably (log and commit index) if it is still open.
    pub(crate) async fn flush(&self) -> io::Result<()> {
        if let Some(shared) = self.shared.upgrade() {
            tokio::task::spawn_blocking(move || shared.durable_flush())
                .await
                .map_err(io::Error::other)??;
        }
        Ok(())
    }

    /// Makes a write being retried give up (at shutdown: openraft's core waits in it).
    pub(crate) fn stop_retrying(&self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.stop_retrying.store(true, Ordering::Release);
        }
    }

    /// True once every handle on the store is dropped, so that its lock is released.
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
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        if start >= end {
            return Ok(Vec::new());
        }
        self.shared
            .read(start, end)
            .map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Read, &e))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let inner = lock(&self.shared.inner);
        let last_purged_log_id = inner.meta.last_purged;
        let last_log_id = inner.last_log_id.or(last_purged_log_id);
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
        lock(&self.shared.inner).meta.vote = Some(*vote);
        self.write_meta()
            .await
            .map_err(|e| io_error(ErrorSubject::Vote, ErrorVerb::Write, &e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        Ok(lock(&self.shared.inner).meta.vote)
    }

    /// Not flushed on its own: losing the latest commit index in a crash is allowed (it is
    /// learnt again from the leader, or recomputed by a lone voter's election); the next meta
    /// write or the shutdown flush persists it.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        {
            let mut inner = lock(&self.shared.inner);
            if inner.meta.committed != committed {
                inner.meta.committed = committed;
                inner.committed_dirty = true;
            }
        }
        self.set_committed_probe(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(lock(&self.shared.inner).meta.committed)
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
        let mut buf = Vec::new();
        let mut records = Vec::new();
        for entry in entries {
            let start = buf.len();
            if let Err(e) = push_record(&mut buf, &entry) {
                callback.log_io_completed(Err(io::Error::other(e.to_string())));
                return Err(io_error(
                    ErrorSubject::Log(entry.log_id),
                    ErrorVerb::Write,
                    &e,
                ));
            }
            records.push((entry.log_id, start, buf.len()));
        }
        let n_entries = records.len();
        // The acknowledgement below is the durability promise: only after the fdatasync.
        match self.append_durably(buf, records).await {
            Ok(()) => {
                self.shared.n_append_flushes.fetch_add(1, Ordering::Release);
                tracing::trace!(n_entries, "log entries flushed");
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(io::Error::other(e.to_string())));
                Err(io_error(ErrorSubject::Logs, ErrorVerb::Write, &e))
            }
        }
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Durable before returning, so that truncated entries cannot come back after a crash
        // once newer ones were acknowledged in their place.
        let index = log_id.index;
        self.retrying(move |shared| shared.truncate(index))
            .await
            .map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Delete, &e))
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // The marker goes first and is flushed: a crash in between leaves entries below it,
        // which `open` removes, never a log that starts after a hole.
        {
            let mut inner = lock(&self.shared.inner);
            if inner
                .meta
                .last_purged
                .is_some_and(|p| p.index >= log_id.index)
            {
                return Ok(());
            }
            inner.meta.last_purged = Some(log_id);
        }
        self.write_meta()
            .await
            .map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Write, &e))?;
        let index = log_id.index;
        self.retrying(move |shared| shared.remove_purged(index))
            .await
            .map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Delete, &e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::types::CommandBatch;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    /// An entry carrying `size` bytes of command.
    fn entry(term: u64, index: u64, size: usize) -> Entry {
        Entry {
            log_id: log_id(term, index),
            payload: EntryPayload::Normal(CommandBatch(vec![vec![(index % 251) as u8; size]])),
        }
    }

    /// Appends like `RaftLogStorage::append` (whose callback cannot be built outside openraft).
    fn append(store: &LogStore, entries: impl IntoIterator<Item = Entry>) {
        let mut buf = Vec::new();
        let mut records = Vec::new();
        for entry in entries {
            let start = buf.len();
            push_record(&mut buf, &entry).expect("encode");
            records.push((entry.log_id, start, buf.len()));
        }
        store.shared.append(&buf, &records).expect("append");
    }

    async fn indexes(store: &mut LogStore) -> Vec<u64> {
        let entries = store.try_get_log_entries(..).await.expect("read");
        for entry in &entries {
            let EntryPayload::Normal(batch) = &entry.payload else {
                panic!("not a normal entry");
            };
            assert_eq!(batch.0[0][0], (entry.log_id.index % 251) as u8);
        }
        entries.iter().map(|e| e.log_id.index).collect()
    }

    fn segment_files(dir: &Path) -> Vec<u64> {
        let mut firsts: Vec<u64> = fs::read_dir(dir)
            .expect("list")
            .filter_map(|item| parse_segment_file_name(&item.ok()?.file_name().to_string_lossy()))
            .collect();
        firsts.sort_unstable();
        firsts
    }

    fn last_segment_path(dir: &Path) -> PathBuf {
        let last = *segment_files(dir).last().expect("a segment");
        dir.join(segment_file_name(last))
    }

    /// An I/O error on the write or the flush of an append is not returned to openraft (that
    /// would stop Raft): the append is undone and retried until it is durable, the failure is
    /// reported meanwhile, and the log holds every entry exactly once afterwards.
    #[tokio::test]
    async fn an_append_failing_with_eio_is_retried_until_durable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft");
        let health = Arc::new(StorageHealth::new());
        {
            let mut store = LogStore::open_with_segment_bytes(&path, 4096).expect("open");
            store.set_health(health.clone());
            append(&store, (1..=3).map(|i| entry(1, i, 100)));
            // EIO on the next writes and flushes (write, flush, roll-over...).
            const EIO: i32 = 5;
            store.shared.injected_errno.store(EIO, Ordering::Release);
            store.shared.injected_failures.store(4, Ordering::Release);
            let mut buf = Vec::new();
            let mut records = Vec::new();
            for entry in (4..=60).map(|i| entry(1, i, 300)) {
                let start = buf.len();
                push_record(&mut buf, &entry).expect("encode");
                records.push((entry.log_id, start, buf.len()));
            }
            let appending = {
                let store = store.clone();
                tokio::spawn(async move { store.append_durably(buf, records).await })
            };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !health.is_failed() && !appending.is_finished() {
                assert!(std::time::Instant::now() < deadline, "no failure reported");
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            // Four failures mean at least 50 + 100 + 200 + 400 ms of retrying.
            assert!(health.is_failed(), "the failure is reported while retrying");
            appending
                .await
                .expect("join")
                .expect("the append succeeds once the errors stop");
            assert!(!health.is_failed(), "the failure is cleared");
            assert_eq!(store.shared.injected_failures.load(Ordering::Acquire), 0);
            assert_eq!(indexes(&mut store).await, (1..=60).collect::<Vec<_>>());
        }
        let mut reopened = LogStore::open_with_segment_bytes(&path, 4096).expect("reopen");
        assert_eq!(indexes(&mut reopened).await, (1..=60).collect::<Vec<_>>());
    }

    /// A truncate or a purge whose unlink, cut or flush fails with an OS error is not returned
    /// to openraft either: it is done again until it succeeds, reported meanwhile.
    #[tokio::test]
    async fn a_truncate_or_purge_failing_with_eio_is_retried_and_reported() {
        const EIO: i32 = 5;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft");
        let segment_bytes = 3 * 1100;
        let health = Arc::new(StorageHealth::new());
        let (cut, from) = {
            let mut store = LogStore::open_with_segment_bytes(&path, segment_bytes).expect("open");
            store.set_health(health.clone());
            append(&store, (1..=20).map(|i| entry(1, i, 1000)));
            let firsts = segment_files(&path);
            assert!(firsts.len() >= 6, "{firsts:?}");

            // Truncate across segments: the first unlink and the retried one fail.
            let from = firsts[3] + 1;
            store.shared.injected_errno.store(EIO, Ordering::Release);
            store.shared.injected_failures.store(2, Ordering::Release);
            let truncating = {
                let mut store = store.clone();
                tokio::spawn(async move { store.truncate(log_id(1, from)).await })
            };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !health.is_failed() && !truncating.is_finished() {
                assert!(std::time::Instant::now() < deadline, "no failure reported");
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            assert!(health.is_failed(), "the failure is reported while retrying");
            truncating
                .await
                .expect("join")
                .expect("the truncate succeeds once the errors stop");
            assert!(!health.is_failed(), "the failure is cleared");
            assert_eq!(indexes(&mut store).await, (1..from).collect::<Vec<_>>());
            assert_eq!(*segment_files(&path).last().expect("last"), firsts[3]);

            // Purge: the removal of the first segment fails twice.
            let cut = firsts[2] + 1;
            store.shared.injected_failures.store(2, Ordering::Release);
            let purging = {
                let mut store = store.clone();
                tokio::spawn(async move { store.purge(log_id(1, cut)).await })
            };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !health.is_failed() && !purging.is_finished() {
                assert!(std::time::Instant::now() < deadline, "no failure reported");
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            assert!(health.is_failed(), "the failure is reported while retrying");
            purging
                .await
                .expect("join")
                .expect("the purge succeeds once the errors stop");
            assert!(!health.is_failed(), "the failure is cleared");
            assert_eq!(segment_files(&path)[0], firsts[2]);
            assert_eq!(
                indexes(&mut store).await,
                (cut + 1..from).collect::<Vec<_>>()
            );
            // The log goes on after both.
            append(&store, (from..from + 3).map(|i| entry(2, i, 1000)));
            (cut, from)
        };
        let mut reopened = LogStore::open_with_segment_bytes(&path, segment_bytes).expect("reopen");
        assert_eq!(
            indexes(&mut reopened).await,
            (cut + 1..from + 3).collect::<Vec<_>>()
        );
        let state = reopened.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id, Some(log_id(1, cut)));
        assert_eq!(state.last_log_id, Some(log_id(2, from + 2)));
    }

    #[tokio::test]
    async fn restart_after_drop_finds_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft");
        {
            let mut store = LogStore::open(&path).expect("open");
            let node_id = store.node_id_or_create().await.expect("node id");
            assert_eq!(store.set_node_id(node_id).await.expect("same id"), node_id);
            assert!(matches!(
                store.set_node_id(node_id + 1).await,
                Err(LogStoreError::OtherNodeId { .. })
            ));
            store.save_vote(&Vote::new(3, node_id)).await.expect("vote");
            append(&store, (0..10).map(|i| entry(1, i, 100)));
            append(&store, (10..20).map(|i| entry(2, i, 100)));
            store
                .save_committed(Some(log_id(2, 15)))
                .await
                .expect("committed");
        }
        let mut store = LogStore::open(&path).expect("reopen");
        assert_eq!(
            store
                .read_vote()
                .await
                .expect("vote")
                .map(|v| v.leader_id.term),
            Some(3)
        );
        assert_eq!(
            store.read_committed().await.expect("c"),
            Some(log_id(2, 15))
        );
        assert_eq!(store.probe().committed_index(), Some(15));
        let state = store.get_log_state().await.expect("state");
        assert_eq!(state.last_log_id, Some(log_id(2, 19)));
        assert_eq!(state.last_purged_log_id, None);
        assert_eq!(indexes(&mut store).await, (0..20).collect::<Vec<_>>());
        let some = store.try_get_log_entries(5..=7).await.expect("range");
        assert_eq!(
            some.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
            vec![5, 6, 7]
        );
        let node_id = store.node_id_or_create().await.expect("node id");
        drop(store);
        let store = LogStore::open(&path).expect("reopen");
        assert_eq!(store.node_id_or_create().await.expect("same"), node_id);
    }

    #[tokio::test]
    async fn torn_tail_keeps_whole_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft");
        {
            let store = LogStore::open(&path).expect("open");
            append(&store, (1..=10).map(|i| entry(1, i, 1000)));
        }
        // Cut the last record in its middle.
        let segment = last_segment_path(&path);
        let size = fs::metadata(&segment).expect("meta").len();
        File::options()
            .write(true)
            .open(&segment)
            .expect("open")
            .set_len(size - 500)
            .expect("cut");
        {
            let mut store = LogStore::open(&path).expect("reopen torn");
            assert_eq!(indexes(&mut store).await, (1..=9).collect::<Vec<_>>());
            let state = store.get_log_state().await.expect("state");
            assert_eq!(state.last_log_id, Some(log_id(1, 9)));
            // Appending continues after the whole records.
            append(&store, [entry(2, 10, 10)]);
        }
        // Garbage after the last record, and a header promising more than there is.
        {
            let mut file = File::options().append(true).open(&segment).expect("open");
            io::Write::write_all(&mut file, b"\x10\x00\x00\x00garbagegarbage").expect("garbage");
        }
        let mut store = LogStore::open(&path).expect("reopen garbage");
        assert_eq!(indexes(&mut store).await, (1..=10).collect::<Vec<_>>());
        append(&store, [entry(2, 11, 10)]);
        drop(store);
        // A flipped bit in the last record fails its CRC: cut there too.
        let size = fs::metadata(&segment).expect("meta").len();
        let mut bytes = fs::read(&segment).expect("read");
        let last = bytes.len() - 3;
        bytes[last] ^= 0x40;
        fs::write(&segment, &bytes).expect("write");
        let mut store = LogStore::open(&path).expect("reopen flipped");
        assert_eq!(indexes(&mut store).await, (1..=10).collect::<Vec<_>>());
        assert!(fs::metadata(&segment).expect("meta").len() < size);
    }

    /// A node that led a term does not lead it again after a restart (its vote comes back
    /// not committed), and a commit index beyond a log that lost flushed entries is lowered
    /// to the last entry on disk.
    #[tokio::test]
    async fn restart_demotes_the_own_leader_vote_and_clamps_the_commit_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft");
        let node_id = {
            let mut store = LogStore::open(&path).expect("open");
            let node_id = store.node_id_or_create().await.expect("node id");
            append(&store, (1..=10).map(|i| entry(5, i, 100)));
            let mut vote = Vote::new(5, node_id);
            vote.commit();
            store.save_vote(&vote).await.expect("vote");
            store
                .save_committed(Some(log_id(5, 10)))
                .await
                .expect("committed");
            node_id
        };
        assert_eq!(cut_last_records(&path, 3), 8);
        {
            let mut store = LogStore::open(&path).expect("reopen");
            let vote = store.read_vote().await.expect("vote").expect("a vote");
            assert!(
                !vote.is_committed(),
                "the own leader vote comes back not committed"
            );
            assert_eq!(vote, Vote::new(5, node_id));
            assert_eq!(
                store.read_committed().await.expect("committed"),
                Some(log_id(5, 7))
            );
            // Another node's committed vote (this node followed it) stays as it is.
            let mut other = Vote::new(6, node_id + 1);
            other.commit();
            store.save_vote(&other).await.expect("vote");
        }
        let mut store = LogStore::open(&path).expect("reopen");
        let vote = store.read_vote().await.expect("vote").expect("a vote");
        assert!(vote.is_committed());
        assert_eq!(vote.leader_id().voted_for(), Some(node_id + 1));
    }

    #[tokio::test]
    async fn corruption_in_an_earlier_segment_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft");
        {
            let store = LogStore::open_with_segment_bytes(&path, 4096).expect("open");
            append(&store, (1..=20).map(|i| entry(1, i, 1000)));
        }
        let firsts = segment_files(&path);
        assert!(firsts.len() >= 3, "{firsts:?}");
        let first = path.join(segment_file_name(firsts[0]));
        let mut bytes = fs::read(&first).expect("read");
        bytes[RECORD_HEADER_BYTES + 20] ^= 0x01;
        fs::write(&first, &bytes).expect("write");
        match LogStore::open_with_segment_bytes(&path, 4096) {
            Err(LogStoreError::Corrupt { path: bad, .. }) => assert_eq!(bad, first),
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("a corrupt segment was accepted"),
        }
        // A missing middle segment (a hole) is refused too.
        bytes[RECORD_HEADER_BYTES + 20] ^= 0x01;
        fs::write(&first, &bytes).expect("write");
        fs::remove_file(path.join(segment_file_name(firsts[1]))).expect("remove");
        assert!(matches!(
            LogStore::open_with_segment_bytes(&path, 4096),
            Err(LogStoreError::Corrupt { .. })
        ));
    }

    #[tokio::test]
    async fn segments_roll_over_purge_and_truncate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft");
        // About three 1 KB entries per segment.
        let segment_bytes = 3 * 1100;
        let mut store = LogStore::open_with_segment_bytes(&path, segment_bytes).expect("open");
        // One append spanning several segments, then single ones.
        append(&store, (1..=10).map(|i| entry(1, i, 1000)));
        for i in 11..=20 {
            append(&store, [entry(1, i, 1000)]);
        }
        let firsts = segment_files(&path);
        assert!(firsts.len() >= 6, "{firsts:?}");
        assert_eq!(firsts[0], 1);
        for first in &firsts {
            let len = fs::metadata(path.join(segment_file_name(*first)))
                .expect("m")
                .len();
            assert!(len <= segment_bytes, "segment {first} holds {len} bytes");
        }
        assert_eq!(indexes(&mut store).await, (1..=20).collect::<Vec<_>>());

        // Purge in the middle of a segment: whole segments below go, the partial one stays
        // but its purged entries are not read.
        let cut = firsts[2] + 1;
        store.purge(log_id(1, cut)).await.expect("purge");
        let after = segment_files(&path);
        assert_eq!(after[0], firsts[2]);
        assert_eq!(
            indexes(&mut store).await,
            (cut + 1..=20).collect::<Vec<_>>()
        );
        assert!(store
            .try_get_log_entries(1..=cut)
            .await
            .expect("read")
            .is_empty());

        // Truncate across a segment boundary: from the second entry of an earlier segment.
        let boundary = firsts[4];
        let from = firsts[3] + 1;
        assert!(from < boundary);
        store.truncate(log_id(1, from)).await.expect("truncate");
        assert_eq!(*segment_files(&path).last().expect("last"), firsts[3]);
        assert_eq!(
            indexes(&mut store).await,
            (cut + 1..from).collect::<Vec<_>>()
        );
        let state = store.get_log_state().await.expect("state");
        assert_eq!(state.last_log_id, Some(log_id(1, from - 1)));
        // New entries with a new term continue the log and survive a reopen.
        append(&store, (from..from + 5).map(|i| entry(2, i, 1000)));
        drop(store);
        let mut store = LogStore::open_with_segment_bytes(&path, segment_bytes).expect("reopen");
        assert_eq!(
            indexes(&mut store).await,
            (cut + 1..from + 5).collect::<Vec<_>>()
        );
        let state = store.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id, Some(log_id(1, cut)));
        assert_eq!(state.last_log_id, Some(log_id(2, from + 4)));

        // Truncating at a segment's first entry removes that file.
        let last_first = *segment_files(&path).last().expect("last");
        store
            .truncate(log_id(2, last_first))
            .await
            .expect("truncate");
        assert!(!segment_files(&path).contains(&last_first));

        // Purging everything leaves no segment; the log continues after the purge point.
        let state = store.get_log_state().await.expect("state");
        let last = state.last_log_id.expect("last");
        store.purge(last).await.expect("purge all");
        assert!(segment_files(&path).is_empty());
        let state = store.get_log_state().await.expect("state");
        assert_eq!(state.last_log_id, Some(last));
        append(&store, [entry(3, last.index + 1, 10)]);
        drop(store);
        let mut store = LogStore::open_with_segment_bytes(&path, segment_bytes).expect("reopen");
        assert_eq!(indexes(&mut store).await, vec![last.index + 1]);
    }

    #[tokio::test]
    async fn purge_interrupted_by_a_crash_is_finished_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft");
        {
            let store = LogStore::open_with_segment_bytes(&path, 2048).expect("open");
            append(&store, (1..=10).map(|i| entry(1, i, 1000)));
            // The marker written, the segments not yet deleted.
            lock(&store.shared.inner).meta.last_purged = Some(log_id(1, 6));
            store.shared.write_meta().expect("meta");
        }
        let mut store = LogStore::open_with_segment_bytes(&path, 2048).expect("reopen");
        assert_eq!(indexes(&mut store).await, (7..=10).collect::<Vec<_>>());
        assert!(segment_files(&path)[0] <= 7);
        assert!(segment_files(&path)[0] > 2);
    }

    #[tokio::test]
    async fn a_second_open_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft");
        let store = LogStore::open(&path).expect("open");
        assert!(matches!(
            LogStore::open(&path),
            Err(LogStoreError::Locked(_))
        ));
        let probe = store.probe();
        assert!(!probe.is_closed());
        drop(store);
        assert!(probe.is_closed());
        LogStore::open(&path).expect("open after drop");
    }

    #[test]
    fn damaged_meta_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft");
        drop(LogStore::open(&path).expect("open"));
        let mut meta = Vec::new();
        push_record(&mut meta, &Meta::default()).expect("encode");
        let last = meta.len() - 1;
        meta[last] ^= 0x01;
        fs::write(path.join(META_FILE_NAME), &meta).expect("write");
        assert!(matches!(
            LogStore::open(&path),
            Err(LogStoreError::Corrupt { .. })
        ));
    }

    /// Writes a sled database in the layout of the earlier store.
    fn write_sled_log(path: &Path, entries: &[Entry], meta: &Meta) {
        let db = sled::Config::new()
            .path(path)
            .segment_size(sled_layout::SEGMENT_BYTES)
            .open()
            .expect("sled");
        let log = db.open_tree(sled_layout::LOG_TREE).expect("tree");
        let meta_tree = db.open_tree(sled_layout::META_TREE).expect("tree");
        for entry in entries {
            log.insert(
                entry.log_id.index.to_be_bytes(),
                bincode::serialize(entry).expect("encode"),
            )
            .expect("insert");
        }
        let put = |key: &[u8], value: Vec<u8>| {
            meta_tree.insert(key, value).expect("insert");
        };
        if let Some(node_id) = meta.node_id {
            put(sled_layout::KEY_NODE_ID, node_id.to_be_bytes().to_vec());
        }
        if let Some(vote) = &meta.vote {
            put(sled_layout::KEY_VOTE, bincode::serialize(vote).expect("e"));
        }
        put(
            sled_layout::KEY_COMMITTED,
            bincode::serialize(&meta.committed).expect("e"),
        );
        if let Some(purged) = &meta.last_purged {
            put(
                sled_layout::KEY_LAST_PURGED,
                bincode::serialize(purged).expect("e"),
            );
        }
        db.flush().expect("flush");
    }

    #[tokio::test]
    async fn sled_log_is_imported_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft");
        let meta = Meta {
            node_id: Some(42),
            vote: Some(Vote::new(5, 42)),
            committed: Some(log_id(5, 30)),
            last_purged: Some(log_id(4, 9)),
        };
        // Entries at or below the purge point are dropped by the import.
        let entries: Vec<Entry> = (5..=40).map(|i| entry(5, i, 300)).collect();
        write_sled_log(&path, &entries, &meta);
        // A leftover of an import interrupted before its first rename is discarded.
        let temp = sibling(&path, IMPORT_TEMP_SUFFIX).expect("temp");
        fs::create_dir_all(&temp).expect("temp");
        fs::write(temp.join(segment_file_name(1)), b"junk").expect("junk");

        let check = |mut store: LogStore| async move {
            assert_eq!(store.node_id_or_create().await.expect("id"), 42);
            assert_eq!(store.read_vote().await.expect("v"), meta.vote);
            assert_eq!(store.read_committed().await.expect("c"), meta.committed);
            let state = store.get_log_state().await.expect("state");
            assert_eq!(state.last_purged_log_id, meta.last_purged);
            assert_eq!(state.last_log_id, Some(log_id(5, 40)));
            assert_eq!(indexes(&mut store).await, (10..=40).collect::<Vec<_>>());
        };
        let store = LogStore::open(&path).expect("open imports");
        let imported = sibling(&path, SLED_IMPORTED_SUFFIX).expect("imported");
        assert!(is_sled_layout(&imported));
        assert!(!is_sled_layout(&path));
        assert!(!temp.exists());
        check(store).await;

        // A crash between the two renames: the next open finishes the switch.
        fs::rename(&path, &temp).expect("simulate");
        let store = LogStore::open(&path).expect("open finishes");
        assert!(!temp.exists());
        check(store).await;

        // Later opens do not import again.
        let store = LogStore::open(&path).expect("open again");
        append(&store, [entry(6, 41, 10)]);
        drop(store);
        let mut store = LogStore::open(&path).expect("open again");
        assert_eq!(indexes(&mut store).await.last(), Some(&41));
    }
}
