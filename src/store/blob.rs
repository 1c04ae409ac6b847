//! Content-addressed message bodies (zstd-compressed by the proposer, carried by the log),
//! stored as records appended to pack files, so that a body costs no inode of its own.
//!
//! Layout of `<data_dir>/blobs/`:
//! - `pack-<8-digit seq>.dat`: records, each a 44-byte header (magic `KMB1`, the 32-byte
//!   `BlobId`, the payload length as u32 LE, a CRC-32 over the id and the payload) and the
//!   compressed bytes. New bodies go to the active pack (the one with the highest number):
//!   one positioned write per record, under one lock that owns the append offset.
//! - `pack-<seq>.idx`: written when a pack is sealed (it reached `pack_bytes`; a record may
//!   overshoot): one entry per record live at that time (id, payload offset u64, length u32),
//!   then a trailer (magic `KMI1`, entry count u64, the .dat length u64, a CRC-32 of all that).
//!
//! The index (id → pack, offset, length) lives in memory. Open loads each sealed pack's .idx;
//! a pack without a valid .idx (the active one, one whose sealing a crash interrupted, or a
//! damaged .idx) is scanned record by record and truncated at its first short or invalid
//! record (the torn tail of a crash). When an id appears twice, the later pack (then the
//! later offset) wins. Open also imports the former layout, one file per body
//! (`blobs/ab/<hex>`): every file whose content matches its name is appended to the active
//! pack, the packs are fsynced, then the files and their folders are removed.
//!
//! Durability: records are written during apply without fsync. Until the log is compacted
//! the Raft log holds every body, so a replay rewrites a record lost in a crash (open drops a
//! torn one: its checksum fails). Compaction only happens after a snapshot, and a snapshot
//! carries the compressed bytes of every referenced body, so after compaction the snapshot
//! rebuilds any record that is missing. A sealed pack is fsynced before its .idx is written,
//! and the .idx is fsynced and renamed into place, so an .idx never describes bytes that may
//! be missing. Since an indexed record is whole (checksummed at open, or written by this
//! process), writing a body that is already indexed does nothing.
//!
//! Deletion: reference counts live in the state. A body whose count drops to zero leaves the
//! index at once (its bytes count as dead in their pack), unless a snapshot build is running
//! (it may still be reading it for its point-in-time view); then the deletion waits until the
//! last running build ends. A pending deletion is cancelled if the same body is written again
//! meanwhile. Deletions are not written to disk: after a restart, a body deleted since its pack
//! was sealed (or in the active pack) is indexed again, and goes again when the replay of the
//! log releases it or the restore of a snapshot sweeps it.
//!
//! Compaction: when the dead bytes of a sealed pack reach `compact_dead_fraction` of its size,
//! a background thread copies the pack's live records (those the index still points to) to
//! the active pack, one append at a time, moving each index entry only if it still points to
//! the old record; it fsyncs the destination packs and the folder, then, once no snapshot build
//! is running, drops the pack from memory and unlinks its files. Readers holding the old file
//! keep reading it (an unlinked file stays readable while open). A crash in between leaves
//! duplicates, which open resolves. Apply never waits for compaction work beyond one append.
//!
//! Staging: the proposing node writes a body before proposing it (on a blocking thread, in
//! parallel with other sessions), so that its own apply, which runs one command at a time,
//! finds it indexed. A staged body is never deleted until the proposal is answered; then it is
//! deleted if no message references it (refused or failed).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};

use super::command::{MAX_COMMAND_BYTES, MAX_MESSAGE_BYTES};
use super::BlobId;

/// Decompressed bodies kept in memory for IMAP FETCH; evicted least recently used first.
pub const BODY_CACHE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Bodies above this size are never cached (they would evict everything else).
pub const BODY_CACHE_ENTRY_BYTES_MAX: usize = 8 * 1024 * 1024;
/// zstd level used by proposers: level 3 is zstd's default, fast on 2 cores.
pub const ZSTD_LEVEL: i32 = 3;
/// A pack is sealed (and a new one started) once it holds this many bytes.
pub const PACK_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;
/// A sealed pack is compacted once this fraction of its bytes is dead.
pub const COMPACT_DEAD_FRACTION_DEFAULT: f64 = 0.5;
/// Record header: magic u32, id 32 bytes, payload length u32, CRC-32 u32.
const RECORD_HEADER_BYTES: u64 = 44;
const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"KMB1");
/// .idx entry: id 32 bytes, payload offset u64, payload length u32.
const INDEX_ENTRY_BYTES: usize = 44;
/// .idx trailer: magic u32, entry count u64, .dat length u64, CRC-32 u32.
const INDEX_TRAILER_BYTES: usize = 24;
const INDEX_MAGIC: u32 = u32::from_le_bytes(*b"KMI1");
/// Held locked while a store has the folder open.
const LOCK_FILE_NAME: &str = "lock";
/// Read buffer of the scan of a pack at open.
const SCAN_BUFFER_BYTES: usize = 1024 * 1024;
/// Chunk in which a scanned record's payload is checksummed.
const SCAN_CHUNK_BYTES: usize = 64 * 1024;

thread_local! {
    /// One zstd context per thread, reused: creating one per message (what
    /// `zstd::bulk::compress` does) allocates and clears its tables every time, about a tenth
    /// of the CPU of an SMTP delivery of 4 KB.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

thread_local! {
    /// One zstd decompression context per thread, reused (creating one per body read was
    /// about 7% of a cold header fetch).
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Compresses a raw body and computes its content address (done by the proposer).
pub fn compress(raw: &[u8]) -> io::Result<(BlobId, Vec<u8>)> {
    let id = BlobId(*blake3::hash(raw).as_bytes());
    let compressed = COMPRESSOR.with(|cell| -> io::Result<Vec<u8>> {
        let mut slot = cell.try_borrow_mut().map_err(io::Error::other)?;
        let compressor = match &mut *slot {
            Some(compressor) => compressor,
            empty => empty.insert(zstd::bulk::Compressor::new(ZSTD_LEVEL)?),
        };
        compressor.compress(raw)
    })?;
    Ok((id, compressed))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep serving.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Default)]
struct Collector {
    running_builds: usize,
    pending: BTreeSet<BlobId>,
    /// Bodies written ahead of their proposal, with the number of proposals in flight.
    staged: BTreeMap<BlobId, usize>,
    /// Compacted packs whose files go when the running builds are done.
    awaiting_unlink: BTreeSet<u32>,
    /// A snapshot was captured (or restored) in this process: from then on, a body that loses
    /// its last reference may still be referenced by the kept snapshot (which holds references
    /// only, not the bytes), so its deletion waits until a snapshot captured after it is kept.
    /// Tracked by sequence, not as the set of bodies the kept snapshot references, so that a
    /// snapshot costs what changed and not every body stored.
    snapshots_pin: bool,
    /// Advanced by every capture ([`BlobStore::snapshot_captured`]).
    release_seq: u64,
    /// Bodies whose deletion waits for a kept snapshot, with the `release_seq` at release.
    deferred: BTreeMap<BlobId, u64>,
    /// Bodies first written after the latest capture: no snapshot references them, so their
    /// deletion need not wait.
    born: BTreeSet<BlobId>,
    /// Until then, a kept snapshot deletes nothing (a peer installing a snapshot is fetching
    /// bodies from this node: [`BlobStore::hold_deletions`]).
    hold_until: Option<std::time::Instant>,
}

impl Collector {
    /// The body is wanted again (written, staged): cancel its deferred deletions.
    fn keep(&mut self, id: &BlobId) {
        self.pending.remove(id);
        self.deferred.remove(id);
    }

    /// Deletes a body now (once no build is running), or once a snapshot captured after this
    /// point is kept if a captured snapshot may reference it.
    fn delete(&mut self, shared: &Shared, id: &BlobId) {
        if self.snapshots_pin && !self.born.contains(id) {
            self.deferred.insert(*id, self.release_seq);
        } else if self.running_builds > 0 {
            self.pending.insert(*id);
        } else {
            self.born.remove(id);
            shared.forget(id);
        }
    }
}

#[derive(Default)]
struct BodyCache {
    entries: HashMap<BlobId, (Arc<Vec<u8>>, u64)>,
    by_age: BTreeMap<u64, BlobId>,
    bytes: usize,
    tick: u64,
}

impl BodyCache {
    fn get(&mut self, id: &BlobId) -> Option<Arc<Vec<u8>>> {
        self.tick += 1;
        let tick = self.tick;
        let (body, last_used) = self.entries.get_mut(id)?;
        self.by_age.remove(last_used);
        *last_used = tick;
        self.by_age.insert(tick, *id);
        Some(body.clone())
    }

    fn insert(&mut self, id: BlobId, body: Arc<Vec<u8>>) {
        if body.len() > BODY_CACHE_ENTRY_BYTES_MAX || self.entries.contains_key(&id) {
            return;
        }
        while self.bytes + body.len() > BODY_CACHE_BYTES_MAX {
            let Some((_, oldest)) = self.by_age.pop_first() else {
                break;
            };
            if let Some((evicted, _)) = self.entries.remove(&oldest) {
                self.bytes -= evicted.len();
            }
        }
        self.tick += 1;
        self.bytes += body.len();
        self.by_age.insert(self.tick, id);
        self.entries.insert(id, (body, self.tick));
    }
}

/// Sizes that drive sealing and compaction ([`BlobStore::open`] uses the defaults).
#[derive(Debug, Clone, Copy)]
pub struct PackConfig {
    /// The active pack is sealed once it holds this many bytes.
    pub pack_bytes: u64,
    /// A sealed pack is compacted once this fraction of its bytes is dead (0.0 to 1.0).
    pub compact_dead_fraction: f64,
}

impl Default for PackConfig {
    fn default() -> Self {
        PackConfig {
            pack_bytes: PACK_BYTES_DEFAULT,
            compact_dead_fraction: COMPACT_DEAD_FRACTION_DEFAULT,
        }
    }
}

/// What the packs hold, for stats and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskStats {
    pub packs: usize,
    pub bodies: usize,
    /// Bytes of records the index points to (headers included).
    pub live_bytes: u64,
    /// Bytes of deleted or superseded records, reclaimed by compaction.
    pub dead_bytes: u64,
}

/// Where a body's compressed bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    pack: u32,
    /// Offset of the payload (after the record header).
    offset: u64,
    len: u32,
}

impl Loc {
    fn record_bytes(&self) -> u64 {
        RECORD_HEADER_BYTES + u64::from(self.len)
    }
}

struct Pack {
    file: Arc<fs::File>,
    /// Bytes written (the end of the last record).
    size: u64,
    live: u64,
    dead: u64,
    sealed: bool,
    compaction_queued: bool,
}

impl Pack {
    fn new(file: Arc<fs::File>, size: u64, sealed: bool) -> Pack {
        Pack {
            file,
            size,
            live: 0,
            dead: 0,
            sealed,
            compaction_queued: false,
        }
    }
}

#[derive(Default)]
struct Index {
    locs: HashMap<BlobId, Loc>,
    packs: BTreeMap<u32, Pack>,
}

impl Index {
    /// Counts a record as dead; true if its pack is now due for compaction (and marks it
    /// queued, so that it is queued once).
    fn kill(&mut self, loc: Loc, fraction: f64) -> bool {
        let Some(pack) = self.packs.get_mut(&loc.pack) else {
            return false;
        };
        pack.live = pack.live.saturating_sub(loc.record_bytes());
        pack.dead += loc.record_bytes();
        Self::due(pack, fraction)
    }

    fn due(pack: &mut Pack, fraction: f64) -> bool {
        let due = pack.sealed
            && !pack.compaction_queued
            && pack.size > 0
            && pack.dead as f64 >= fraction * pack.size as f64;
        if due {
            pack.compaction_queued = true;
        }
        due
    }

    fn entries_of(&self, pack: u32) -> Vec<(BlobId, Loc)> {
        let mut entries: Vec<(BlobId, Loc)> = self
            .locs
            .iter()
            .filter(|(_, loc)| loc.pack == pack)
            .map(|(id, loc)| (*id, *loc))
            .collect();
        entries.sort_by_key(|(_, loc)| loc.offset);
        entries
    }
}

/// The pack records are appended to.
struct Appender {
    seq: u32,
    file: Arc<fs::File>,
    end: u64,
}

enum Job {
    Seal(u32),
    Compact(u32),
    /// Answered once every job sent before it is done (tests wait on it).
    #[cfg(test)]
    Flush(mpsc::Sender<()>),
    Stop,
}

/// Everything the background thread shares with the store.
struct Shared {
    root: PathBuf,
    config: PackConfig,
    /// Lock order: collector, then appender, then index.
    appender: Mutex<Appender>,
    index: Mutex<Index>,
    collector: Mutex<Collector>,
    cache: Mutex<BodyCache>,
    jobs: mpsc::Sender<Job>,
    /// Jobs sent (tests wait until the thread has caught up).
    jobs_sent: AtomicU64,
    stopping: AtomicBool,
}

/// The pack folder, its index, deferred deletions and the cache of decompressed bodies.
pub struct BlobStore {
    shared: Arc<Shared>,
    worker: Option<std::thread::JoinHandle<()>>,
    /// `blobs/lock`, locked (flock) while the store is open: a second process (or store)
    /// opening the folder would scan, truncate and append to the same active pack.
    _lock: fs::File,
}

/// Held by a snapshot build: deletions (and the unlinking of compacted packs) wait until
/// every guard is gone.
pub struct ReadGuard {
    store: Arc<BlobStore>,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let shared = &self.store.shared;
        let mut collector = lock(&shared.collector);
        collector.running_builds -= 1;
        if collector.running_builds == 0 {
            for id in std::mem::take(&mut collector.pending) {
                collector.born.remove(&id);
                shared.forget(&id);
            }
            for pack in std::mem::take(&mut collector.awaiting_unlink) {
                shared.unlink_pack(pack);
            }
        }
    }
}

impl Drop for BlobStore {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        let _ = self.shared.jobs.send(Job::Stop);
        if let Some(worker) = self.worker.take() {
            if worker.join().is_err() {
                tracing::error!("the blob compaction thread panicked");
            }
        }
    }
}

/// A body's compressed bytes inside its pack (for a snapshot build).
pub struct PackReader {
    file: Arc<fs::File>,
    pos: u64,
    end: u64,
}

impl PackReader {
    /// Bytes left to read.
    pub fn remaining_bytes(&self) -> u64 {
        self.end - self.pos
    }
}

impl Read for PackReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf
            .len()
            .min(usize::try_from(self.remaining_bytes()).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl BlobStore {
    /// Opens (or creates) the pack folder with the default sizes.
    pub fn open(root: PathBuf) -> io::Result<Arc<BlobStore>> {
        Self::open_with(root, PackConfig::default())
    }

    /// Opens (or creates) the pack folder: loads or scans the packs, imports the former
    /// one-file-per-body layout, and starts the compaction thread.
    pub fn open_with(root: PathBuf, config: PackConfig) -> io::Result<Arc<BlobStore>> {
        fs::create_dir_all(&root)?;
        let lock_file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(root.join(LOCK_FILE_NAME))?;
        match lock_file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("{} is in use by another store", root.display()),
                ))
            }
            Err(fs::TryLockError::Error(error)) => return Err(error),
        }
        let mut seqs = BTreeSet::new();
        for entry in fs::read_dir(&root)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(seq) = parse_pack_name(&name, ".dat") {
                seqs.insert(seq);
            } else if name.ends_with(".idx.tmp")
                || parse_pack_name(&name, ".idx")
                    .is_some_and(|seq| !root.join(pack_name(seq, ".dat")).exists())
            {
                fs::remove_file(entry.path())?;
            }
        }
        let mut index = Index::default();
        let mut unsealed = Vec::new();
        for &seq in &seqs {
            let path = root.join(pack_name(seq, ".dat"));
            let file = fs::OpenOptions::new().read(true).write(true).open(&path)?;
            let file_len = file.metadata()?.len();
            let loaded = match read_index_file(&root, seq, file_len) {
                Ok(loaded) => loaded,
                Err(error) => {
                    tracing::warn!(pack = seq, %error, "pack index is invalid: scanning the pack");
                    None
                }
            };
            let (entries, size, sealed) = match loaded {
                Some(entries) => (entries, file_len, true),
                None => {
                    let (entries, valid) = scan_pack(&file, seq, file_len)?;
                    if valid < file_len {
                        tracing::warn!(
                            pack = seq,
                            kept_bytes = valid,
                            dropped_bytes = file_len - valid,
                            "pack ends with a torn record (a crash): truncated"
                        );
                        file.set_len(valid)?;
                    }
                    unsealed.push(seq);
                    (entries, valid, false)
                }
            };
            index
                .packs
                .insert(seq, Pack::new(Arc::new(file), size, sealed));
            // Packs in ascending order, entries in ascending offsets: later duplicates win.
            index.locs.extend(entries);
        }
        let mut live: HashMap<u32, u64> = HashMap::new();
        for loc in index.locs.values() {
            *live.entry(loc.pack).or_default() += loc.record_bytes();
        }
        for (seq, pack) in index.packs.iter_mut() {
            pack.live = live.get(seq).copied().unwrap_or(0);
            pack.dead = pack.size.saturating_sub(pack.live);
        }
        // The active pack: the last one if it is not sealed, else a new one.
        let last = seqs.last().copied();
        let appender = match last {
            Some(seq) if unsealed.last() == Some(&seq) => {
                unsealed.pop();
                let pack = &index.packs[&seq];
                Appender {
                    seq,
                    file: pack.file.clone(),
                    end: pack.size,
                }
            }
            _ => {
                let seq = last.map_or(1, |seq| seq + 1);
                let file = Arc::new(create_pack(&root, seq)?);
                index.packs.insert(seq, Pack::new(file.clone(), 0, false));
                Appender { seq, file, end: 0 }
            }
        };
        let mut jobs_due: Vec<Job> = unsealed.into_iter().map(Job::Seal).collect();
        for (seq, pack) in index.packs.iter_mut() {
            if Index::due(pack, config.compact_dead_fraction) {
                jobs_due.push(Job::Compact(*seq));
            }
        }
        let (sender, receiver) = mpsc::channel();
        let shared = Arc::new(Shared {
            root,
            config,
            appender: Mutex::new(appender),
            index: Mutex::new(index),
            collector: Mutex::new(Collector::default()),
            cache: Mutex::new(BodyCache::default()),
            jobs: sender,
            jobs_sent: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        });
        shared.import_file_per_body_layout()?;
        for job in jobs_due {
            shared.send(job);
        }
        let worker = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("blob-packs".into())
                .spawn(move || shared.run_worker(receiver))?
        };
        let store = Arc::new(BlobStore {
            shared,
            worker: Some(worker),
            _lock: lock_file,
        });
        tracing::info!(stats = ?store.disk_stats(), "blob packs opened");
        Ok(store)
    }

    /// Whether a body is indexed (readable).
    pub fn contains(&self, id: &BlobId) -> bool {
        lock(&self.shared.index).locs.contains_key(id)
    }

    /// The stored (compressed) length of an indexed body.
    pub fn stored_len(&self, id: &BlobId) -> Option<u64> {
        lock(&self.shared.index)
            .locs
            .get(id)
            .map(|loc| u64::from(loc.len))
    }

    /// Pack count, indexed bodies, live and dead bytes.
    pub fn disk_stats(&self) -> DiskStats {
        let index = lock(&self.shared.index);
        DiskStats {
            packs: index.packs.len(),
            bodies: index.locs.len(),
            live_bytes: index.packs.values().map(|p| p.live).sum(),
            dead_bytes: index.packs.values().map(|p| p.dead).sum(),
        }
    }

    /// Makes sure the body is stored with these bytes, and cancels a pending deletion of it.
    /// Called by apply. A body already indexed is whole (see the module comment): nothing to do.
    pub fn write(&self, id: &BlobId, compressed: &[u8]) -> io::Result<()> {
        {
            let mut collector = lock(&self.shared.collector);
            collector.keep(id);
            if self.contains(id) {
                return Ok(());
            }
            collector.born.insert(*id);
        }
        self.shared
            .append(id, compressed, |current| current.is_none())
            .map(drop)
    }

    /// Makes sure a body is stored, from the next `len` bytes of `input` (a snapshot stream),
    /// which are always consumed: an indexed body is kept as it is; otherwise the bytes are
    /// appended only if they decompress to content matching `id`, so a corrupt stream never
    /// enters the index. Used by restore.
    pub fn write_from(&self, id: &BlobId, len: u64, input: &mut dyn io::Read) -> io::Result<()> {
        lock(&self.shared.collector).keep(id);
        if len > MAX_COMMAND_BYTES {
            return Err(corrupt("body is larger than any message"));
        }
        let mut input = Read::take(&mut *input, len);
        let short = || {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "snapshot ends inside a message body",
            )
        };
        if self.contains(id) {
            if io::copy(&mut input, &mut io::sink())? != len {
                return Err(short());
            }
            return Ok(());
        }
        let mut bytes = Vec::new();
        if input.read_to_end(&mut bytes)? as u64 != len {
            return Err(short());
        }
        check_content(id, &mut bytes.as_slice())?;
        self.shared
            .append(id, &bytes, |current| current.is_none())
            .map(drop)
    }

    /// Writes a body ahead of its proposal. Every successful call must be matched by one
    /// [`BlobStore::unstage`] once the proposal is answered (or abandoned).
    pub fn stage(&self, id: &BlobId, compressed: &[u8]) -> io::Result<()> {
        {
            let mut collector = lock(&self.shared.collector);
            collector.keep(id);
            *collector.staged.entry(*id).or_insert(0) += 1;
            if !self.contains(id) {
                collector.born.insert(*id);
            }
        }
        // Appended outside the collector lock: a staged body is never deleted, and the append
        // lock makes concurrent stagings of the same body append it once.
        let result = if self.contains(id) {
            Ok(())
        } else {
            self.shared
                .append(id, compressed, |current| current.is_none())
                .map(drop)
        };
        if result.is_err() {
            self.unstage(id, false);
        }
        result
    }

    /// Ends one staging of a body; `referenced` tells whether the state references it now
    /// (the caller holds the state's read lock, so that no apply changes that meanwhile).
    pub fn unstage(&self, id: &BlobId, referenced: bool) {
        let mut collector = lock(&self.shared.collector);
        let remaining = match collector.staged.get_mut(id) {
            Some(count) => {
                *count -= 1;
                *count
            }
            None => return,
        };
        if remaining > 0 {
            return;
        }
        collector.staged.remove(id);
        if !referenced {
            collector.delete(&self.shared, id);
        }
    }

    /// Bodies that lost their last reference: deleted now, or when the running snapshot builds
    /// are done. Staged bodies are left to their [`BlobStore::unstage`].
    pub fn release(&self, ids: impl IntoIterator<Item = BlobId>) {
        let mut collector = lock(&self.shared.collector);
        for id in ids {
            if collector.staged.contains_key(&id) {
                continue;
            }
            collector.delete(&self.shared, &id);
        }
    }

    /// Registers a snapshot build: no body is deleted (and no compacted pack unlinked) while
    /// the guard lives.
    pub fn begin_read(self: &Arc<Self>) -> ReadGuard {
        lock(&self.shared.collector).running_builds += 1;
        ReadGuard {
            store: self.clone(),
        }
    }

    /// Deletes every body that is not one of `keep` nor staged (after a restore replaced the
    /// state), unless a snapshot build is running. Returns how many bodies were deleted.
    pub fn sweep(&self, keep: &BTreeMap<BlobId, super::state::BlobInfo>) -> io::Result<u64> {
        let mut collector = lock(&self.shared.collector);
        if collector.running_builds > 0 {
            return Ok(0);
        }
        let unwanted: Vec<BlobId> = lock(&self.shared.index)
            .locs
            .keys()
            .filter(|id| !keep.contains_key(id) && !collector.staged.contains_key(id))
            .copied()
            .collect();
        for id in &unwanted {
            // Not in the restored state, which is the kept snapshot now: nothing pins it.
            collector.deferred.remove(id);
            self.shared.forget(id);
        }
        Ok(unwanted.len() as u64)
    }

    /// A snapshot is being captured (call under the state lock): returns its mark. Bodies
    /// released from now on may be referenced by it, so they stay until a snapshot with a
    /// greater mark is kept.
    pub fn snapshot_captured(&self) -> u64 {
        let mut collector = lock(&self.shared.collector);
        collector.snapshots_pin = true;
        collector.release_seq += 1;
        collector.born.clear();
        collector.release_seq
    }

    /// The snapshot captured with `mark` is now the kept one: bodies released before its
    /// capture are in no snapshot any more and go (once no build is running).
    pub fn snapshot_kept(&self, mark: u64) {
        let mut collector = lock(&self.shared.collector);
        if collector
            .hold_until
            .is_some_and(|until| std::time::Instant::now() < until)
        {
            // A peer is fetching the bodies of a snapshot this node sent (or kept) earlier:
            // they stay until a snapshot is kept after the hold.
            return;
        }
        let released: Vec<BlobId> = collector
            .deferred
            .iter()
            .filter(|(_, &seq)| seq < mark)
            .map(|(id, _)| *id)
            .collect();
        for id in released {
            collector.deferred.remove(&id);
            if collector.running_builds == 0 {
                self.shared.forget(&id);
            } else {
                collector.pending.insert(id);
            }
        }
    }

    /// A peer is fetching bodies from this node to install a snapshot: bodies released since
    /// then may be referenced by the snapshot it is installing, so no kept snapshot deletes any
    /// for `hold` from now (they go with the first snapshot kept after that).
    pub fn hold_deletions(&self, hold: std::time::Duration) {
        let until = std::time::Instant::now() + hold;
        let mut collector = lock(&self.shared.collector);
        if collector.hold_until.is_none_or(|current| current < until) {
            collector.hold_until = Some(until);
        }
    }

    /// Ends a [`BlobStore::hold_deletions`] at once (tests).
    #[cfg(test)]
    pub fn end_hold(&self) {
        lock(&self.shared.collector).hold_until = None;
    }

    /// A restored state is now the kept snapshot: what it references stays (a deferred
    /// deletion of it is cancelled), the rest goes with the [`BlobStore::sweep`] that follows.
    pub fn snapshot_restored(&self) {
        let mut collector = lock(&self.shared.collector);
        collector.snapshots_pin = true;
        collector.deferred.clear();
    }

    /// Makes every record written so far durable: fsyncs the packs not sealed yet (a sealed
    /// pack was fsynced before its .idx was written) and the folder. A snapshot holding only
    /// references calls this before it is kept, since the log entries carrying those bodies
    /// may be purged after it.
    pub fn sync(&self) -> io::Result<()> {
        // A pack rotated away meanwhile is either still unsealed here or fsynced by its seal.
        let files: Vec<Arc<fs::File>> = lock(&self.shared.index)
            .packs
            .values()
            .filter(|pack| !pack.sealed)
            .map(|pack| pack.file.clone())
            .collect();
        for file in files {
            file.sync_data()?;
        }
        sync_dir(&self.shared.root)
    }

    /// A body from the cache only (no I/O).
    pub fn cached(&self, id: &BlobId) -> Option<Arc<Vec<u8>>> {
        lock(&self.shared.cache).get(id)
    }

    /// Reads, decompresses and verifies a body (blocking: call from a blocking thread).
    pub fn read(&self, id: &BlobId, raw_size: u32) -> io::Result<Arc<Vec<u8>>> {
        if let Some(body) = lock(&self.shared.cache).get(id) {
            return Ok(body);
        }
        let body = Arc::new(self.read_uncached(id, raw_size)?);
        lock(&self.shared.cache).insert(*id, body.clone());
        Ok(body)
    }

    fn read_uncached(&self, id: &BlobId, raw_size: u32) -> io::Result<Vec<u8>> {
        let (file, loc) = self.shared.lookup(id)?;
        let mut compressed = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut compressed, loc.offset)?;
        let raw = DECOMPRESSOR
            .with(|cell| -> io::Result<Vec<u8>> {
                let mut slot = cell.try_borrow_mut().map_err(io::Error::other)?;
                let decompressor = match &mut *slot {
                    Some(decompressor) => decompressor,
                    empty => empty.insert(zstd::bulk::Decompressor::new()?),
                };
                decompressor.decompress(&compressed, raw_size as usize)
            })
            .map_err(|_| corrupt("body does not decompress"))?;
        if raw.len() != raw_size as usize || blake3::hash(&raw).as_bytes() != &id.0 {
            return Err(corrupt("body does not match its hash"));
        }
        Ok(raw)
    }

    /// A reader of a body's compressed bytes, for a snapshot build.
    pub fn open_compressed(&self, id: &BlobId) -> io::Result<PackReader> {
        let (file, loc) = self.shared.lookup(id)?;
        Ok(PackReader {
            file,
            pos: loc.offset,
            end: loc.offset + u64::from(loc.len),
        })
    }

    /// Waits until the background thread has done every job queued so far (and the jobs
    /// those queued).
    #[cfg(test)]
    pub fn wait_idle(&self) {
        loop {
            let sent = self.shared.jobs_sent.load(Ordering::Acquire);
            let (done, finished) = mpsc::channel();
            self.shared.send(Job::Flush(done));
            finished
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("the blob thread answers");
            if self.shared.jobs_sent.load(Ordering::Acquire) == sent + 1 {
                return;
            }
        }
    }
}

impl Shared {
    fn send(&self, job: Job) {
        self.jobs_sent.fetch_add(1, Ordering::AcqRel);
        // The thread is gone only when the store is being dropped.
        let _ = self.jobs.send(job);
    }

    fn lookup(&self, id: &BlobId) -> io::Result<(Arc<fs::File>, Loc)> {
        let index = lock(&self.index);
        let loc =
            index.locs.get(id).copied().ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "no such body in the packs")
            })?;
        let pack = index
            .packs
            .get(&loc.pack)
            .ok_or_else(|| io::Error::other("a body points to a pack that is gone"))?;
        Ok((pack.file.clone(), loc))
    }

    /// Removes a body from the index; its record becomes dead bytes.
    fn forget(&self, id: &BlobId) {
        let mut index = lock(&self.index);
        let Some(loc) = index.locs.remove(id) else {
            return;
        };
        if index.kill(loc, self.config.compact_dead_fraction) {
            drop(index);
            self.send(Job::Compact(loc.pack));
        }
    }

    /// Appends a record if `wanted` says so for the id's current location (checked before
    /// the write and again before indexing it, under the append lock), and returns where the
    /// record went if it was indexed.
    fn append(
        &self,
        id: &BlobId,
        payload: &[u8],
        wanted: impl Fn(Option<&Loc>) -> bool,
    ) -> io::Result<Option<Loc>> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&len| u64::from(len) <= MAX_COMMAND_BYTES)
            .ok_or_else(|| corrupt("body is larger than any message"))?;
        let record = encode_record(id, payload, len);
        let mut appender = lock(&self.appender);
        if !wanted(lock(&self.index).locs.get(id)) {
            return Ok(None);
        }
        let offset = appender.end;
        // On failure the offset stays: the next record overwrites what was partly written.
        appender.file.write_all_at(&record, offset)?;
        appender.end += record.len() as u64;
        let loc = Loc {
            pack: appender.seq,
            offset: offset + RECORD_HEADER_BYTES,
            len,
        };
        let mut compact = None;
        let indexed = {
            let mut index = lock(&self.index);
            let indexed = wanted(index.locs.get(id));
            if let Some(pack) = index.packs.get_mut(&loc.pack) {
                pack.size = appender.end;
                if indexed {
                    pack.live += loc.record_bytes();
                } else {
                    pack.dead += loc.record_bytes();
                }
            }
            if indexed {
                if let Some(old) = index.locs.insert(*id, loc) {
                    if index.kill(old, self.config.compact_dead_fraction) {
                        compact = Some(old.pack);
                    }
                }
            }
            indexed
        };
        if appender.end >= self.config.pack_bytes {
            if let Err(error) = self.rotate(&mut appender) {
                // Appends go on into the current pack; the next one tries again.
                tracing::error!(%error, "cannot start a new pack");
            }
        }
        drop(appender);
        if let Some(pack) = compact {
            self.send(Job::Compact(pack));
        }
        Ok(indexed.then_some(loc))
    }

    /// Starts the next pack and has the full one sealed in the background.
    fn rotate(&self, appender: &mut Appender) -> io::Result<()> {
        let seq = appender.seq + 1;
        let file = Arc::new(create_pack(&self.root, seq)?);
        lock(&self.index)
            .packs
            .insert(seq, Pack::new(file.clone(), 0, false));
        let full = std::mem::replace(appender, Appender { seq, file, end: 0 });
        self.send(Job::Seal(full.seq));
        Ok(())
    }

    fn run_worker(&self, jobs: mpsc::Receiver<Job>) {
        while let Ok(job) = jobs.recv() {
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            match job {
                Job::Seal(pack) => {
                    if let Err(error) = self.seal(pack) {
                        // Open scans the pack and seals it again.
                        tracing::error!(pack, %error, "cannot seal a pack");
                    }
                }
                Job::Compact(pack) => {
                    if let Err(error) = self.compact(pack) {
                        // What was copied is indexed; the pack stays until the next open.
                        tracing::error!(pack, %error, "cannot compact a pack");
                    }
                }
                #[cfg(test)]
                Job::Flush(done) => {
                    let _ = done.send(());
                }
                Job::Stop => return,
            }
        }
    }

    /// Fsyncs a full pack, then writes its .idx.
    fn seal(&self, seq: u32) -> io::Result<()> {
        // No longer the active pack: its size is final.
        let (file, size) = match lock(&self.index).packs.get(&seq) {
            Some(pack) if !pack.sealed => (pack.file.clone(), pack.size),
            _ => return Ok(()),
        };
        // A failed write may have left bytes past the last record.
        if file.metadata()?.len() > size {
            file.set_len(size)?;
        }
        file.sync_all()?;
        let entries = lock(&self.index).entries_of(seq);
        write_index_file(&self.root, seq, &entries, size)?;
        let mut index = lock(&self.index);
        let due = match index.packs.get_mut(&seq) {
            Some(pack) => {
                pack.sealed = true;
                Index::due(pack, self.config.compact_dead_fraction)
            }
            None => false,
        };
        drop(index);
        if due {
            self.send(Job::Compact(seq));
        }
        Ok(())
    }

    /// Copies a sealed pack's live records to the active pack, then unlinks it (now, or
    /// when the running snapshot builds are done).
    fn compact(&self, seq: u32) -> io::Result<()> {
        let (file, entries) = {
            let index = lock(&self.index);
            match index.packs.get(&seq) {
                Some(pack) if pack.sealed => (pack.file.clone(), index.entries_of(seq)),
                _ => return Ok(()),
            }
        };
        let mut destinations = BTreeSet::new();
        let mut payload = Vec::new();
        for (id, loc) in entries {
            if self.stopping.load(Ordering::Acquire) {
                return Ok(());
            }
            payload.resize(loc.len as usize, 0);
            file.read_exact_at(&mut payload, loc.offset)?;
            if let Some(new) = self.append(&id, &payload, |current| current == Some(&loc))? {
                destinations.insert(new.pack);
            }
        }
        self.sync_packs(&destinations)?;
        let mut collector = lock(&self.collector);
        if collector.running_builds > 0 {
            collector.awaiting_unlink.insert(seq);
        } else {
            self.unlink_pack(seq);
        }
        Ok(())
    }

    /// Fsyncs these packs and the folder.
    fn sync_packs(&self, packs: &BTreeSet<u32>) -> io::Result<()> {
        let files: Vec<Arc<fs::File>> = {
            let index = lock(&self.index);
            packs
                .iter()
                .filter_map(|seq| index.packs.get(seq).map(|pack| pack.file.clone()))
                .collect()
        };
        for file in files {
            file.sync_all()?;
        }
        sync_dir(&self.root)
    }

    /// Drops a compacted pack and unlinks its files (readers holding it keep reading).
    fn unlink_pack(&self, seq: u32) {
        {
            let mut index = lock(&self.index);
            match index.packs.get(&seq) {
                Some(pack) if pack.live == 0 => {}
                Some(_) => {
                    tracing::error!(pack = seq, "a compacted pack still holds live bodies");
                    return;
                }
                None => return,
            }
            index.packs.remove(&seq);
        }
        for suffix in [".idx", ".dat"] {
            match fs::remove_file(self.root.join(pack_name(seq, suffix))) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => tracing::warn!(pack = seq, %error, "cannot unlink a compacted pack"),
            }
        }
    }

    /// Moves the bodies of the former layout (`<root>/ab/<hex>`, one file each) into the
    /// packs: appended, fsynced, then the files and their folders removed.
    fn import_file_per_body_layout(&self) -> io::Result<()> {
        let mut folders = Vec::new();
        for entry in fs::read_dir(&self.root)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if entry.file_type()?.is_dir()
                && name.len() == 2
                && name.bytes().all(|b| b.is_ascii_hexdigit())
            {
                folders.push(entry.path());
            }
        }
        if folders.is_empty() {
            return Ok(());
        }
        let mut imported = 0u64;
        let mut destinations = BTreeSet::new();
        let mut done = Vec::new();
        for folder in &folders {
            for entry in fs::read_dir(folder)? {
                let entry = entry?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if let Some(id) = parse_hex_id(&name) {
                    let bytes = if entry.metadata()?.len() > MAX_COMMAND_BYTES {
                        Vec::new()
                    } else {
                        fs::read(entry.path())?
                    };
                    if let Err(error) = check_content(&id, &mut bytes.as_slice()) {
                        // A replay or a snapshot writes it again.
                        tracing::warn!(blob = %hex::encode(id.0), %error, "dropping a damaged body file");
                    } else if let Some(loc) =
                        self.append(&id, &bytes, |current| current.is_none())?
                    {
                        destinations.insert(loc.pack);
                        imported += 1;
                    }
                    done.push(entry.path());
                } else if name.ends_with(".tmp") {
                    done.push(entry.path());
                }
            }
        }
        self.sync_packs(&destinations)?;
        for path in done {
            fs::remove_file(path)?;
        }
        for folder in folders {
            // Left in place if it holds anything else.
            let _ = fs::remove_dir(folder);
        }
        tracing::info!(imported, "moved body files into packs");
        Ok(())
    }
}

fn pack_name(seq: u32, suffix: &str) -> String {
    format!("pack-{seq:08}{suffix}")
}

fn parse_pack_name(name: &str, suffix: &str) -> Option<u32> {
    let digits = name.strip_prefix("pack-")?.strip_suffix(suffix)?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn create_pack(root: &Path, seq: u32) -> io::Result<fs::File> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(root.join(pack_name(seq, ".dat")))
}

fn sync_dir(root: &Path) -> io::Result<()> {
    fs::File::open(root)?.sync_all()
}

fn record_checksum(id: &BlobId, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&id.0);
    hasher.update(payload);
    hasher.finalize()
}

fn encode_record(id: &BlobId, payload: &[u8], len: u32) -> Vec<u8> {
    let mut record = Vec::with_capacity(RECORD_HEADER_BYTES as usize + payload.len());
    record.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    record.extend_from_slice(&id.0);
    record.extend_from_slice(&len.to_le_bytes());
    record.extend_from_slice(&record_checksum(id, payload).to_le_bytes());
    record.extend_from_slice(payload);
    record
}

/// Reads a pack's records from the start; returns them and the length of the whole records
/// (where a torn or invalid record starts, if any).
fn scan_pack(file: &fs::File, seq: u32, file_len: u64) -> io::Result<(Vec<(BlobId, Loc)>, u64)> {
    let mut reader = io::BufReader::with_capacity(
        SCAN_BUFFER_BYTES,
        PackReader {
            file: Arc::new(file.try_clone()?),
            pos: 0,
            end: file_len,
        },
    );
    let mut entries = Vec::new();
    let mut pos = 0u64;
    let mut chunk = vec![0u8; SCAN_CHUNK_BYTES];
    while pos < file_len {
        let mut header = [0u8; RECORD_HEADER_BYTES as usize];
        if reader.read_exact(&mut header).is_err() {
            break;
        }
        let field = |at: usize| {
            u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let mut id = [0u8; 32];
        id.copy_from_slice(&header[4..36]);
        let id = BlobId(id);
        let len = field(36);
        let end = pos + RECORD_HEADER_BYTES + u64::from(len);
        if field(0) != RECORD_MAGIC || u64::from(len) > MAX_COMMAND_BYTES || end > file_len {
            break;
        }
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&id.0);
        let mut left = len as usize;
        while left > 0 {
            let n = left.min(SCAN_CHUNK_BYTES);
            reader.read_exact(&mut chunk[..n])?;
            hasher.update(&chunk[..n]);
            left -= n;
        }
        if hasher.finalize() != field(40) {
            break;
        }
        entries.push((
            id,
            Loc {
                pack: seq,
                offset: pos + RECORD_HEADER_BYTES,
                len,
            },
        ));
        pos = end;
    }
    Ok((entries, pos))
}

/// Writes a sealed pack's .idx through a temporary file, fsynced, renamed, folder fsynced.
fn write_index_file(
    root: &Path,
    seq: u32,
    entries: &[(BlobId, Loc)],
    dat_len: u64,
) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(entries.len() * INDEX_ENTRY_BYTES + INDEX_TRAILER_BYTES);
    for (id, loc) in entries {
        bytes.extend_from_slice(&id.0);
        bytes.extend_from_slice(&loc.offset.to_le_bytes());
        bytes.extend_from_slice(&loc.len.to_le_bytes());
    }
    bytes.extend_from_slice(&INDEX_MAGIC.to_le_bytes());
    bytes.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&dat_len.to_le_bytes());
    let checksum = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&checksum.to_le_bytes());
    let temp = root.join(pack_name(seq, ".idx.tmp"));
    let mut file = fs::File::create(&temp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temp, root.join(pack_name(seq, ".idx")))?;
    sync_dir(root)
}

/// Loads a sealed pack's .idx: `None` if there is none, an error if it is invalid or does not
/// describe a .dat of `dat_len` bytes.
fn read_index_file(root: &Path, seq: u32, dat_len: u64) -> io::Result<Option<Vec<(BlobId, Loc)>>> {
    let path = root.join(pack_name(seq, ".idx"));
    let mut file = match fs::File::open(&path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    // Each entry stands for a record at least as long, so the .idx is never larger than
    // its .dat plus the trailer.
    let len = file.metadata()?.len();
    if len > dat_len + INDEX_TRAILER_BYTES as u64 || len < INDEX_TRAILER_BYTES as u64 {
        return Err(corrupt("pack index has an impossible size"));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.read_to_end(&mut bytes)?;
    if bytes.len() as u64 != len {
        return Err(corrupt("pack index changed while read"));
    }
    let (body, checksum) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != checksum {
        return Err(corrupt("pack index checksum does not match"));
    }
    let trailer = &body[body.len() - (INDEX_TRAILER_BYTES - 4)..];
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&trailer[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let magic = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    let count = u64_at(4);
    let described = u64_at(12);
    let entries_bytes = body.len() - (INDEX_TRAILER_BYTES - 4);
    if magic != INDEX_MAGIC
        || described != dat_len
        || count.checked_mul(INDEX_ENTRY_BYTES as u64) != Some(entries_bytes as u64)
    {
        return Err(corrupt("pack index does not describe this pack"));
    }
    let mut entries = Vec::with_capacity(count as usize);
    for raw in body[..entries_bytes].chunks_exact(INDEX_ENTRY_BYTES) {
        let mut id = [0u8; 32];
        id.copy_from_slice(&raw[..32]);
        let mut offset = [0u8; 8];
        offset.copy_from_slice(&raw[32..40]);
        let offset = u64::from_le_bytes(offset);
        let len = u32::from_le_bytes([raw[40], raw[41], raw[42], raw[43]]);
        if offset < RECORD_HEADER_BYTES || offset.saturating_add(u64::from(len)) > dat_len {
            return Err(corrupt("pack index points outside its pack"));
        }
        entries.push((
            BlobId(id),
            Loc {
                pack: seq,
                offset,
                len,
            },
        ));
    }
    entries.sort_by_key(|(_, loc)| loc.offset);
    Ok(Some(entries))
}

/// Checks that a compressed body decompresses to at most the largest message and hashes to
/// its id.
fn check_content(id: &BlobId, compressed: &mut dyn Read) -> io::Result<()> {
    let decoder = zstd::stream::read::Decoder::new(compressed)
        .map_err(|_| corrupt("body does not decompress"))?;
    let mut hasher = blake3::Hasher::new();
    let limit = MAX_MESSAGE_BYTES as u64;
    let raw_len = io::copy(&mut decoder.take(limit + 1), &mut hasher)
        .map_err(|_| corrupt("body does not decompress"))?;
    if raw_len > limit || hasher.finalize().as_bytes() != &id.0 {
        return Err(corrupt("body does not match its hash"));
    }
    Ok(())
}

fn corrupt(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

fn parse_hex_id(name: &str) -> Option<BlobId> {
    let bytes = hex::decode(name).ok()?;
    Some(BlobId(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body that zstd cannot shrink much (so that pack sizes are predictable).
    fn body(n: u32, bytes: usize) -> (BlobId, Vec<u8>, Vec<u8>) {
        let mut raw = format!("Subject: {n}\r\n\r\n").into_bytes();
        let mut seed = blake3::hash(&n.to_le_bytes());
        while raw.len() < bytes {
            raw.extend_from_slice(&hex::encode(seed.as_bytes()).as_bytes()[..32]);
            seed = blake3::hash(seed.as_bytes());
        }
        let (id, compressed) = compress(&raw).unwrap();
        (id, raw, compressed)
    }

    fn small_packs(pack_bytes: u64) -> PackConfig {
        PackConfig {
            pack_bytes,
            compact_dead_fraction: 0.5,
        }
    }

    fn files_ending(root: &Path, suffix: &str) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(root)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.to_string_lossy().ends_with(suffix))
            .collect();
        files.sort();
        files
    }

    fn keep_only(ids: &[BlobId]) -> BTreeMap<BlobId, super::super::state::BlobInfo> {
        ids.iter()
            .map(|id| {
                let info = super::super::state::BlobInfo {
                    refs: 1,
                    raw_size: 0,
                    stored_size: 0,
                };
                (*id, info)
            })
            .collect()
    }

    #[test]
    fn write_is_idempotent_and_read_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("blobs")).unwrap();
        let raw = b"Subject: hi\r\n\r\nhello\r\n".to_vec();
        let (id, compressed) = compress(&raw).unwrap();
        store.write(&id, &compressed).unwrap();
        store.write(&id, &compressed).unwrap();
        assert!(store.contains(&id));
        assert_eq!(*store.read(&id, raw.len() as u32).unwrap(), raw);
        let stats = store.disk_stats();
        assert_eq!((stats.bodies, stats.dead_bytes), (1, 0), "written once");
        assert_eq!(
            stats.live_bytes,
            RECORD_HEADER_BYTES + compressed.len() as u64
        );
        // A body whose bytes do not match its id is an error, never a wrong body.
        let (other, _) = compress(b"other").unwrap();
        store.write(&other, &compressed).unwrap();
        assert!(store.read(&other, raw.len() as u32).is_err());
        assert!(store.read(&BlobId([7; 32]), 1).is_err(), "unknown body");
    }

    #[test]
    fn restore_keeps_indexed_bodies_and_never_indexes_a_corrupt_stream() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("blobs")).unwrap();
        let raw = b"Subject: restore\r\n\r\nsome text to compress\r\n".repeat(50);
        let (id, compressed) = compress(&raw).unwrap();
        let len = compressed.len() as u64;
        let mut damaged = compressed.clone();
        let middle = damaged.len() / 2;
        damaged[middle] ^= 0xff;

        // Missing, corrupt stream: refused, nothing indexed.
        assert!(store.write_from(&id, len, &mut damaged.as_slice()).is_err());
        assert!(!store.contains(&id));
        assert!(store.write_from(&id, len, &mut &compressed[..10]).is_err());
        assert!(!store.contains(&id));
        // Missing: written.
        store
            .write_from(&id, len, &mut compressed.as_slice())
            .unwrap();
        assert_eq!(*store.read(&id, raw.len() as u32).unwrap(), raw);
        // Indexed: kept, and the stream is consumed exactly.
        let stream = [damaged.clone(), b"next".to_vec()].concat();
        let mut reader = stream.as_slice();
        store.write_from(&id, len, &mut reader).unwrap();
        assert_eq!(reader, b"next");
        assert_eq!(*store.read_uncached(&id, raw.len() as u32).unwrap(), raw);
        // A stream that ends early is an error.
        assert!(store.write_from(&id, len, &mut &compressed[..10]).is_err());
        assert_eq!(store.disk_stats().bodies, 1);
        // The snapshot reader gives the stored bytes.
        let mut stored = Vec::new();
        let mut reader = store.open_compressed(&id).unwrap();
        assert_eq!(reader.remaining_bytes(), len);
        reader.read_to_end(&mut stored).unwrap();
        assert_eq!(stored, compressed);
    }

    #[test]
    fn restart_finds_every_body_through_indexes_or_scans() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("blobs");
        let store = BlobStore::open_with(root.clone(), small_packs(8 * 1024)).unwrap();
        let bodies: Vec<_> = (0..60).map(|n| body(n, 1500)).collect();
        // Released before its pack is sealed: its .idx leaves it out.
        let (gone, _, _) = &bodies[0];
        for (id, _, compressed) in &bodies {
            store.write(id, compressed).unwrap();
            if id == gone {
                store.release([*gone]);
            }
        }
        store.wait_idle();
        let packs = store.disk_stats().packs;
        assert!(packs > 3, "{packs} packs");
        assert_eq!(
            files_ending(&root, ".idx").len(),
            packs - 1,
            "all but the active one"
        );
        drop(store);

        let check = |store: &BlobStore| {
            for (id, raw, _) in &bodies[1..] {
                assert_eq!(*store.read_uncached(id, raw.len() as u32).unwrap(), *raw);
            }
        };
        let store = BlobStore::open_with(root.clone(), small_packs(8 * 1024)).unwrap();
        check(&store);
        assert!(!store.contains(gone), "the sealed .idx was used");
        drop(store);

        // Without the .idx (or with a damaged one), the pack is scanned: every record is
        // found again, the released one too (deletions are not on disk).
        let idx = files_ending(&root, ".idx");
        fs::remove_file(&idx[0]).unwrap();
        let mut damaged = fs::read(&idx[1]).unwrap();
        damaged[3] ^= 1;
        fs::write(&idx[1], damaged).unwrap();
        let store = BlobStore::open_with(root.clone(), small_packs(8 * 1024)).unwrap();
        check(&store);
        assert!(store.contains(gone));
        // The scanned packs are sealed again.
        store.wait_idle();
        assert_eq!(files_ending(&root, ".idx").len(), idx.len());
    }

    #[test]
    fn a_torn_tail_is_dropped_and_the_body_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("blobs");
        let store = BlobStore::open(root.clone()).unwrap();
        let bodies: Vec<_> = (0..3).map(|n| body(n, 3000)).collect();
        for (id, _, compressed) in &bodies {
            store.write(id, compressed).unwrap();
        }
        drop(store);
        let pack = files_ending(&root, ".dat").pop().unwrap();
        let whole = fs::metadata(&pack).unwrap().len();
        let last = RECORD_HEADER_BYTES + bodies[2].2.len() as u64;
        let kept = whole - last;
        // The last record is cut in its middle, and garbage follows (a torn tail).
        let file = fs::OpenOptions::new().write(true).open(&pack).unwrap();
        file.set_len(kept + last / 2).unwrap();
        file.write_all_at(&[0x5a; 100], kept + last / 2).unwrap();
        drop(file);

        let store = BlobStore::open(root.clone()).unwrap();
        assert_eq!(fs::metadata(&pack).unwrap().len(), kept, "truncated");
        for (id, raw, _) in &bodies[..2] {
            assert_eq!(*store.read(id, raw.len() as u32).unwrap(), *raw);
        }
        let (id, raw, compressed) = &bodies[2];
        assert!(!store.contains(id));
        store.write(id, compressed).unwrap();
        assert_eq!(*store.read(id, raw.len() as u32).unwrap(), *raw);
        drop(store);
        let store = BlobStore::open(root).unwrap();
        for (id, raw, _) in &bodies {
            assert_eq!(*store.read(id, raw.len() as u32).unwrap(), *raw);
        }
        assert_eq!(store.disk_stats().dead_bytes, 0);
    }

    #[test]
    fn deletion_waits_for_running_builds() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("blobs")).unwrap();
        let (id, compressed) = compress(b"body").unwrap();
        store.write(&id, &compressed).unwrap();
        let guard = store.begin_read();
        store.release([id]);
        assert!(store.contains(&id));
        drop(guard);
        assert!(!store.contains(&id));
        // A write during a build cancels the pending deletion.
        store.write(&id, &compressed).unwrap();
        let guard = store.begin_read();
        store.release([id]);
        store.write(&id, &compressed).unwrap();
        drop(guard);
        assert!(store.contains(&id));
        // The first record is dead, the second live.
        let stats = store.disk_stats();
        let record = RECORD_HEADER_BYTES + compressed.len() as u64;
        assert_eq!((stats.live_bytes, stats.dead_bytes), (record, record));
    }

    #[test]
    fn staged_body_outlives_release_until_unstaged() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("blobs")).unwrap();
        let (id, compressed) = compress(b"in flight").unwrap();
        store.stage(&id, &compressed).unwrap();
        store.stage(&id, &compressed).unwrap();
        store.release([id]);
        assert!(store.contains(&id));
        assert_eq!(
            store.sweep(&keep_only(&[])).unwrap(),
            0,
            "sweep spares it too"
        );
        store.unstage(&id, false);
        assert!(store.contains(&id), "a second proposal is still in flight");
        store.unstage(&id, true);
        assert!(store.contains(&id), "referenced bodies stay");
        store.stage(&id, &compressed).unwrap();
        store.unstage(&id, false);
        assert!(!store.contains(&id), "an unreferenced body goes");
        assert_eq!(store.disk_stats().bodies, 0);
    }

    #[test]
    fn concurrent_stagings_of_one_body_append_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("blobs")).unwrap();
        let (id, _, compressed) = body(1, 4000);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| store.stage(&id, &compressed).unwrap());
            }
        });
        let stats = store.disk_stats();
        assert_eq!(stats.bodies, 1);
        assert_eq!(
            stats.live_bytes,
            RECORD_HEADER_BYTES + compressed.len() as u64
        );
        assert_eq!(stats.dead_bytes, 0);
    }

    #[test]
    fn sweep_deletes_what_is_neither_kept_nor_staged() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("blobs")).unwrap();
        let bodies: Vec<_> = (0..4).map(|n| body(n, 500)).collect();
        for (id, _, compressed) in &bodies[..3] {
            store.write(id, compressed).unwrap();
        }
        store.stage(&bodies[3].0, &bodies[3].2).unwrap();
        // Not while a build runs.
        let guard = store.begin_read();
        assert_eq!(store.sweep(&keep_only(&[bodies[0].0])).unwrap(), 0);
        drop(guard);
        assert_eq!(store.sweep(&keep_only(&[bodies[0].0])).unwrap(), 2);
        assert!(store.contains(&bodies[0].0));
        assert!(!store.contains(&bodies[1].0));
        assert!(!store.contains(&bodies[2].0));
        assert!(store.contains(&bodies[3].0), "staged");
    }

    #[test]
    fn compaction_reclaims_space_and_every_live_body_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("blobs");
        let store = BlobStore::open_with(root.clone(), small_packs(16 * 1024)).unwrap();
        let bodies: Vec<_> = (0..200).map(|n| body(n, 2000)).collect();
        for (id, _, compressed) in &bodies {
            store.write(id, compressed).unwrap();
        }
        store.wait_idle();
        let before = crate::store::tests::allocated_bytes(&root);
        let packs_before = store.disk_stats().packs;
        // Three bodies out of four go.
        let (gone, kept): (Vec<_>, Vec<_>) =
            bodies.iter().enumerate().partition(|(n, _)| n % 4 != 0);
        // Readers run while the packs are compacted under them.
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let mut rounds = 0;
                while !stop.load(Ordering::Acquire) || rounds == 0 {
                    for (_, (id, raw, _)) in &kept {
                        assert_eq!(*store.read_uncached(id, raw.len() as u32).unwrap(), *raw);
                    }
                    rounds += 1;
                }
                rounds
            });
            store.release(gone.iter().map(|(_, (id, _, _))| *id));
            store.wait_idle();
            stop.store(true, Ordering::Release);
            assert!(reader.join().unwrap() > 0);
        });
        let stats = store.disk_stats();
        let after = crate::store::tests::allocated_bytes(&root);
        assert!(
            after * 2 < before,
            "allocated {before} bytes in {packs_before} packs before, {after} in {} after",
            stats.packs
        );
        assert!(stats.packs < packs_before);
        assert!(stats.dead_bytes * 2 < stats.live_bytes, "{stats:?}");
        for (_, (id, raw, _)) in &kept {
            assert_eq!(*store.read_uncached(id, raw.len() as u32).unwrap(), *raw);
        }
        // And after a restart.
        drop(store);
        let store = BlobStore::open_with(root, small_packs(16 * 1024)).unwrap();
        for (_, (id, raw, _)) in &kept {
            assert_eq!(*store.read_uncached(id, raw.len() as u32).unwrap(), *raw);
        }
    }

    #[test]
    fn a_compacted_pack_is_unlinked_only_after_the_running_build() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("blobs");
        let store = BlobStore::open_with(root.clone(), small_packs(16 * 1024)).unwrap();
        let bodies: Vec<_> = (0..12).map(|n| body(n, 2000)).collect();
        for (id, _, compressed) in &bodies {
            store.write(id, compressed).unwrap();
        }
        // Most of the (still active) first pack is dead; the survivor is being read by a
        // snapshot build.
        store.release(bodies[1..].iter().map(|(id, _, _)| *id));
        let guard = store.begin_read();
        let mut reader = store.open_compressed(&bodies[0].0).unwrap();
        let first = files_ending(&root, ".dat");
        assert_eq!(first.len(), 1);
        // Filling the pack seals it, which makes it due for compaction.
        let filler: Vec<_> = (100..110).map(|n| body(n, 2000)).collect();
        for (id, _, compressed) in &filler {
            store.write(id, compressed).unwrap();
        }
        store.wait_idle();
        assert_ne!(
            store.shared.lookup(&bodies[0].0).unwrap().1.pack,
            1,
            "the survivor was copied"
        );
        assert!(first[0].exists(), "kept while the build runs");
        let (id, raw, compressed) = &bodies[0];
        assert_eq!(*store.read_uncached(id, raw.len() as u32).unwrap(), *raw);
        drop(guard);
        assert!(!first[0].exists(), "unlinked when the build is done");
        // A reader opened before still reads the unlinked file.
        let mut bytes = Vec::new();
        reader.read_to_end(&mut bytes).unwrap();
        assert_eq!(&bytes, compressed);
        assert_eq!(*store.read_uncached(id, raw.len() as u32).unwrap(), *raw);
        for (id, raw, _) in &filler {
            assert_eq!(*store.read_uncached(id, raw.len() as u32).unwrap(), *raw);
        }
    }

    #[test]
    fn the_file_per_body_layout_is_imported() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("blobs");
        let bodies: Vec<_> = (0..20).map(|n| body(n, 800)).collect();
        for (id, _, compressed) in &bodies {
            let hex = hex::encode(id.0);
            fs::create_dir_all(root.join(&hex[..2])).unwrap();
            fs::write(root.join(&hex[..2]).join(&hex), compressed).unwrap();
        }
        // A leftover temporary file, and a damaged body.
        let hex = hex::encode(bodies[0].0 .0);
        fs::write(root.join(&hex[..2]).join(format!(".{hex}.1.tmp")), b"x").unwrap();
        let (damaged, _) = compress(b"damaged").unwrap();
        let hex = hex::encode(damaged.0);
        fs::create_dir_all(root.join(&hex[..2])).unwrap();
        fs::write(root.join(&hex[..2]).join(&hex), b"not zstd").unwrap();

        let store = BlobStore::open(root.clone()).unwrap();
        for (id, raw, _) in &bodies {
            assert_eq!(*store.read(id, raw.len() as u32).unwrap(), *raw);
        }
        assert!(!store.contains(&damaged));
        let mut left: Vec<_> = fs::read_dir(&root)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["lock", "pack-00000001.dat"]);
        drop(store);
        let store = BlobStore::open(root).unwrap();
        assert_eq!(store.disk_stats().bodies, bodies.len());
    }

    #[test]
    fn the_background_thread_ends_with_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("blobs")).unwrap();
        let shared = Arc::downgrade(&store.shared);
        assert!(
            BlobStore::open(dir.path().join("blobs")).is_err(),
            "one store per folder"
        );
        drop(store);
        assert!(shared.upgrade().is_none(), "the thread let go of the store");
        BlobStore::open(dir.path().join("blobs")).unwrap();
    }

    #[test]
    fn cache_stays_within_its_byte_budget() {
        let mut cache = BodyCache::default();
        let entry = BODY_CACHE_ENTRY_BYTES_MAX;
        for n in 0..20u8 {
            cache.insert(BlobId([n; 32]), Arc::new(vec![0; entry]));
            assert!(cache.bytes <= BODY_CACHE_BYTES_MAX);
        }
        assert!(cache.get(&BlobId([19; 32])).is_some());
        assert!(cache.get(&BlobId([0; 32])).is_none());
    }
}
