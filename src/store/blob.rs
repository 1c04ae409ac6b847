//! Content-addressed message bodies: one file per distinct body, `<data_dir>/blobs/ab/<hex>`,
//! holding the zstd-compressed bytes (compressed by the proposer, carried by the log).
//!
//! Durability: files are written during apply through a temporary file and a rename, without
//! fsync. Until the log is compacted the Raft log holds every body, so a replay rewrites a file
//! lost in a crash (a file whose size is wrong is rewritten too). Compaction only happens after
//! a snapshot, and a snapshot carries the compressed bytes of every referenced body, so after
//! compaction the snapshot rebuilds any file that is missing.
//!
//! Deletion: reference counts live in the state. A body whose count drops to zero is deleted
//! at once, unless a snapshot build is running (it may still be reading the file for its
//! point-in-time view); then the deletion waits until the last running build ends. A pending
//! deletion is cancelled if the same body is written again meanwhile.
//!
//! Staging: the proposing node writes a body's file before proposing it (on a blocking thread,
//! in parallel with other sessions), so that its own apply, which runs one command at a time,
//! finds the file in place and only checks its size. A staged body is never deleted until the
//! proposal is answered; then it is deleted if no message references it (refused or failed).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{self, Read, Seek, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use super::command::{MAX_COMMAND_BYTES, MAX_MESSAGE_BYTES};
use super::BlobId;

/// Decompressed bodies kept in memory for IMAP FETCH; evicted least recently used first.
pub const BODY_CACHE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Bodies above this size are never cached (they would evict everything else).
pub const BODY_CACHE_ENTRY_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Restore compares a snapshot's body with the file in place in chunks of this size.
const COMPARE_CHUNK_BYTES: usize = 64 * 1024;
/// A temporary file older than this is left over from a crash (writes take milliseconds).
const TEMP_FILE_AGE_MAX: Duration = Duration::from_secs(3600);
/// zstd level used by proposers: level 3 is zstd's default, fast on 2 cores.
pub const ZSTD_LEVEL: i32 = 3;

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

/// The blob folder, its deferred deletions and the cache of decompressed bodies.
pub struct BlobStore {
    root: PathBuf,
    /// Makes temporary file names unique when two threads write the same body.
    temp_counter: AtomicU64,
    collector: Mutex<Collector>,
    cache: Mutex<BodyCache>,
}

/// Held by a snapshot build: deletions wait until every guard is gone.
pub struct ReadGuard {
    store: Arc<BlobStore>,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut collector = lock(&self.store.collector);
        collector.running_builds -= 1;
        if collector.running_builds == 0 {
            let pending = std::mem::take(&mut collector.pending);
            for id in pending {
                self.store.remove_file(&id);
            }
        }
    }
}

impl BlobStore {
    pub fn open(root: PathBuf) -> io::Result<Arc<BlobStore>> {
        fs::create_dir_all(&root)?;
        Ok(Arc::new(BlobStore {
            root,
            temp_counter: AtomicU64::new(0),
            collector: Mutex::new(Collector::default()),
            cache: Mutex::new(BodyCache::default()),
        }))
    }

    pub fn path(&self, id: &BlobId) -> PathBuf {
        let hex = hex::encode(id.0);
        self.root.join(&hex[..2]).join(hex)
    }

    /// The size of the body's file, if there is one.
    pub fn file_size(&self, id: &BlobId) -> Option<u64> {
        fs::metadata(self.path(id)).ok().map(|m| m.len())
    }

    /// Makes sure the body's file exists with these bytes, and cancels a pending deletion of
    /// it. Called by apply.
    ///
    /// A staged file of the right size was written whole by this process (files appear only
    /// by rename), so its size is checked only. Any other file of the right size may be left
    /// from before a crash (a replay after restart), so its bytes are compared with the
    /// command's, and a damaged file is replaced.
    pub fn write(&self, id: &BlobId, compressed: &[u8]) -> io::Result<()> {
        let mut collector = lock(&self.collector);
        collector.pending.remove(id);
        let staged = collector.staged.contains_key(id);
        drop(collector);
        if self.file_size(id) == Some(compressed.len() as u64)
            && (staged || fs::read(self.path(id)).is_ok_and(|bytes| bytes == compressed))
        {
            return Ok(());
        }
        self.write_file(id, |file| file.write_all(compressed))
    }

    /// Makes sure a body's file holds the next `len` bytes of `input` (a snapshot stream): an
    /// existing file with the same bytes is kept; otherwise the bytes are written to a new file
    /// that replaces the old one only if it decompresses to content matching `id`. So a corrupt
    /// stream never damages a good file, and a damaged file (a crash can leave one of the right
    /// size) is repaired. Used by restore.
    pub fn write_from(&self, id: &BlobId, len: u64, input: &mut dyn io::Read) -> io::Result<()> {
        let mut collector = lock(&self.collector);
        collector.pending.remove(id);
        drop(collector);
        let mut input = Read::take(&mut *input, len);
        // Compare with the file in place, chunk by chunk.
        let mut matched: u64 = 0;
        let mut chunk = vec![0u8; COMPARE_CHUNK_BYTES];
        let mut mismatch_len = 0;
        if self.file_size(id) == Some(len) {
            let mut existing = io::BufReader::new(fs::File::open(self.path(id))?);
            let mut from_file = vec![0u8; COMPARE_CHUNK_BYTES];
            while matched < len {
                let n = COMPARE_CHUNK_BYTES.min((len - matched) as usize);
                input.read_exact(&mut chunk[..n])?;
                let same = existing.read_exact(&mut from_file[..n]).is_ok()
                    && chunk[..n] == from_file[..n];
                if !same {
                    mismatch_len = n;
                    break;
                }
                matched += n as u64;
            }
            if matched == len {
                return Ok(());
            }
        }
        // Rewrite: the matching prefix from the old file, the chunk that differed, the rest of
        // the stream; then check the result before it replaces anything.
        let path = self.path(id);
        self.write_file(id, |file| {
            if matched > 0 {
                let copied = io::copy(&mut fs::File::open(&path)?.take(matched), file)?;
                if copied != matched {
                    return Err(corrupt("body file changed during restore"));
                }
            }
            file.write_all(&chunk[..mismatch_len])?;
            let rest = len - matched - mismatch_len as u64;
            if io::copy(&mut input, file)? != rest {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "snapshot ends inside a message body",
                ));
            }
            file.flush()?;
            file.seek(io::SeekFrom::Start(0))?;
            check_content(id, file)
        })
    }

    /// Writes a file through a unique temporary file and a rename (no fsync: see the module
    /// comment); nothing is renamed into place when `fill` fails.
    fn write_file(
        &self,
        id: &BlobId,
        fill: impl FnOnce(&mut fs::File) -> io::Result<()>,
    ) -> io::Result<()> {
        let path = self.path(id);
        let dir = path.parent().unwrap_or(&self.root);
        let unique = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        let temp = dir.join(format!(".{}.{unique}.tmp", hex::encode(id.0)));
        let result = (|| {
            let open = || {
                fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&temp)
            };
            // The fan-out folder usually exists: create it only when the open says it does
            // not (two syscalls saved per body).
            let mut file = match open() {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir_all(dir)?;
                    open()?
                }
                other => other?,
            };
            fill(&mut file)?;
            file.flush()?;
            drop(file);
            fs::rename(&temp, &path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }

    /// Writes a body's file ahead of its proposal. Every successful call must be matched by
    /// one [`BlobStore::unstage`] once the proposal is answered (or abandoned).
    pub fn stage(&self, id: &BlobId, compressed: &[u8]) -> io::Result<()> {
        {
            let mut collector = lock(&self.collector);
            collector.pending.remove(id);
            *collector.staged.entry(*id).or_insert(0) += 1;
        }
        // Written outside the lock: a staged body is never deleted, and concurrent writers of
        // the same body use distinct temporary files and rename identical bytes into place.
        let result = if self.file_size(id) == Some(compressed.len() as u64) {
            Ok(())
        } else {
            self.write_file(id, |file| file.write_all(compressed))
        };
        if result.is_err() {
            self.unstage(id, false);
        }
        result
    }

    /// Ends one staging of a body; `referenced` tells whether the state references it now
    /// (the caller holds the state's read lock, so that no apply changes that meanwhile).
    pub fn unstage(&self, id: &BlobId, referenced: bool) {
        let mut collector = lock(&self.collector);
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
            if collector.running_builds == 0 {
                self.remove_file(id);
            } else {
                collector.pending.insert(*id);
            }
        }
    }

    /// Bodies that lost their last reference: deleted now, or when the running snapshot builds
    /// are done. Staged bodies are left to their [`BlobStore::unstage`].
    pub fn release(&self, ids: impl IntoIterator<Item = BlobId>) {
        let mut collector = lock(&self.collector);
        for id in ids {
            if collector.staged.contains_key(&id) {
                continue;
            }
            if collector.running_builds == 0 {
                self.remove_file(&id);
            } else {
                collector.pending.insert(id);
            }
        }
    }

    fn remove_file(&self, id: &BlobId) {
        match fs::remove_file(self.path(id)) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(blob = %hex::encode(id.0), %error, "cannot delete an unused body file")
            }
        }
    }

    /// Registers a snapshot build: no file is deleted while the guard lives.
    pub fn begin_read(self: &Arc<Self>) -> ReadGuard {
        lock(&self.collector).running_builds += 1;
        ReadGuard {
            store: self.clone(),
        }
    }

    /// Deletes every file that is not one of `keep` (after a restore replaced the state), unless
    /// a snapshot build is running. Returns how many files were deleted.
    pub fn sweep(&self, keep: &BTreeMap<BlobId, super::state::BlobInfo>) -> io::Result<u64> {
        let collector = lock(&self.collector);
        if collector.running_builds > 0 {
            return Ok(0);
        }
        let mut removed = 0;
        for dir in fs::read_dir(&self.root)? {
            let dir = dir?;
            if !dir.file_type()?.is_dir() {
                continue;
            }
            for file in fs::read_dir(dir.path())? {
                let file = file?;
                let name = file.file_name();
                let name = name.to_string_lossy();
                let wanted = match parse_hex_id(&name) {
                    Some(id) => keep.contains_key(&id) || collector.staged.contains_key(&id),
                    // A temporary file may belong to a write in progress; one left by a crash
                    // goes once it is old.
                    None => name.ends_with(".tmp") && !is_older_than(&file, TEMP_FILE_AGE_MAX),
                };
                if !wanted {
                    fs::remove_file(file.path())?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// A body from the cache only (no I/O).
    pub fn cached(&self, id: &BlobId) -> Option<Arc<Vec<u8>>> {
        lock(&self.cache).get(id)
    }

    /// Reads, decompresses and verifies a body (blocking: call from a blocking thread).
    pub fn read(&self, id: &BlobId, raw_size: u32) -> io::Result<Arc<Vec<u8>>> {
        if let Some(body) = lock(&self.cache).get(id) {
            return Ok(body);
        }
        let body = Arc::new(self.read_uncached(id, raw_size)?);
        lock(&self.cache).insert(*id, body.clone());
        Ok(body)
    }

    fn read_uncached(&self, id: &BlobId, raw_size: u32) -> io::Result<Vec<u8>> {
        // One path lookup (open), then the size from the descriptor.
        let mut file = fs::File::open(self.path(id))?;
        let len = file.metadata()?.len();
        if len > MAX_COMMAND_BYTES {
            return Err(corrupt("body file is larger than any message"));
        }
        let mut compressed = Vec::with_capacity(len as usize);
        file.read_to_end(&mut compressed)?;
        let raw = DECOMPRESSOR
            .with(|cell| -> io::Result<Vec<u8>> {
                let mut slot = cell.try_borrow_mut().map_err(io::Error::other)?;
                let decompressor = match &mut *slot {
                    Some(decompressor) => decompressor,
                    empty => empty.insert(zstd::bulk::Decompressor::new()?),
                };
                decompressor.decompress(&compressed, raw_size as usize)
            })
            .map_err(|_| corrupt("body file does not decompress"))?;
        if raw.len() != raw_size as usize || blake3::hash(&raw).as_bytes() != &id.0 {
            return Err(corrupt("body file does not match its hash"));
        }
        Ok(raw)
    }

    /// Opens a body's compressed file for a snapshot build.
    pub fn open_compressed(&self, id: &BlobId) -> io::Result<fs::File> {
        fs::File::open(self.path(id))
    }

    #[cfg(test)]
    pub fn root(&self) -> &std::path::Path {
        &self.root
    }
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

fn is_older_than(file: &fs::DirEntry, age: Duration) -> bool {
    file.metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|modified| SystemTime::now().duration_since(modified).ok())
        .is_some_and(|elapsed| elapsed > age)
}

fn parse_hex_id(name: &str) -> Option<BlobId> {
    let bytes = hex::decode(name).ok()?;
    Some(BlobId(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_is_idempotent_and_read_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("blobs")).unwrap();
        let raw = b"Subject: hi\r\n\r\nhello\r\n".to_vec();
        let (id, compressed) = compress(&raw).unwrap();
        store.write(&id, &compressed).unwrap();
        store.write(&id, &compressed).unwrap();
        assert_eq!(*store.read(&id, raw.len() as u32).unwrap(), raw);
        // A corrupt file is an error, never a wrong body.
        let (other, _) = compress(b"other").unwrap();
        fs::create_dir_all(store.path(&other).parent().unwrap()).unwrap();
        fs::write(store.path(&other), &compressed).unwrap();
        assert!(store.read(&other, raw.len() as u32).is_err());
        // A short file is replaced on the next write, and so is one of the right size whose
        // bytes are wrong (as a crash can leave it).
        fs::write(store.path(&id), b"x").unwrap();
        store.write(&id, &compressed).unwrap();
        assert_eq!(fs::read(store.path(&id)).unwrap(), compressed);
        fs::write(store.path(&id), vec![0u8; compressed.len()]).unwrap();
        store.write(&id, &compressed).unwrap();
        assert_eq!(fs::read(store.path(&id)).unwrap(), compressed);
    }

    #[test]
    fn restore_repairs_damaged_files_and_never_damages_good_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("blobs")).unwrap();
        let raw = b"Subject: restore\r\n\r\nsome text to compress\r\n".repeat(50);
        let (id, compressed) = compress(&raw).unwrap();
        let len = compressed.len() as u64;

        // Missing: written.
        store
            .write_from(&id, len, &mut compressed.as_slice())
            .unwrap();
        assert_eq!(*store.read(&id, raw.len() as u32).unwrap(), raw);
        // Same size, same bytes: kept, and the stream is consumed exactly.
        let mut stream = [compressed.clone(), b"next".to_vec()].concat();
        let mut reader = stream.as_slice();
        store.write_from(&id, len, &mut reader).unwrap();
        assert_eq!(reader, b"next");
        // Same size, damaged (as a crash can leave it): repaired.
        let mut damaged = compressed.clone();
        let middle = damaged.len() / 2;
        damaged[middle] ^= 0xff;
        fs::write(store.path(&id), &damaged).unwrap();
        store
            .write_from(&id, len, &mut compressed.as_slice())
            .unwrap();
        assert_eq!(fs::read(store.path(&id)).unwrap(), compressed);
        // A corrupt stream is refused and leaves the good file alone.
        stream = damaged.clone();
        assert!(store.write_from(&id, len, &mut stream.as_slice()).is_err());
        assert_eq!(fs::read(store.path(&id)).unwrap(), compressed);
        assert!(store.write_from(&id, len, &mut &compressed[..10]).is_err());
        assert_eq!(fs::read(store.path(&id)).unwrap(), compressed);
        let files = fs::read_dir(store.path(&id).parent().unwrap())
            .unwrap()
            .count();
        assert_eq!(files, 1, "no temporary file is left behind");
    }

    #[test]
    fn deletion_waits_for_running_builds() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("blobs")).unwrap();
        let (id, compressed) = compress(b"body").unwrap();
        store.write(&id, &compressed).unwrap();
        let guard = store.begin_read();
        store.release([id]);
        assert!(store.path(&id).exists());
        drop(guard);
        assert!(!store.path(&id).exists());
        // A write during a build cancels the pending deletion.
        store.write(&id, &compressed).unwrap();
        let guard = store.begin_read();
        store.release([id]);
        store.write(&id, &compressed).unwrap();
        drop(guard);
        assert!(store.path(&id).exists());
    }

    #[test]
    fn staged_body_outlives_release_until_unstaged() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("blobs")).unwrap();
        let (id, compressed) = compress(b"in flight").unwrap();
        store.stage(&id, &compressed).unwrap();
        store.stage(&id, &compressed).unwrap();
        store.release([id]);
        assert!(store.path(&id).exists());
        store.unstage(&id, false);
        assert!(
            store.path(&id).exists(),
            "a second proposal is still in flight"
        );
        store.unstage(&id, true);
        assert!(store.path(&id).exists(), "referenced bodies stay");
        store.stage(&id, &compressed).unwrap();
        store.unstage(&id, false);
        assert!(!store.path(&id).exists(), "an unreferenced body goes");
        // No temporary file is left behind.
        let leftovers: usize = fs::read_dir(store.root())
            .unwrap()
            .map(|d| fs::read_dir(d.unwrap().path()).unwrap().count())
            .sum();
        assert_eq!(leftovers, 0);
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
