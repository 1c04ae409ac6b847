//! Incremental snapshots: the metadata cut into content-addressed chunks, so that a snapshot
//! writes what changed since the previous one and not the whole state.
//!
//! The chunks:
//! - named sections ([`SECTION_STATE`]: accounts, mailbox headers, aliases, counters, without
//!   the message lists; [`SECTION_OUTBOUND`], [`SECTION_SRS_KEY`], [`SECTION_QUOTAS`]); a new
//!   piece of replicated state is one more named section;
//! - the message list of each mailbox cut by UID range ([`RANGE_UIDS`] UIDs per range): UIDs
//!   only grow, so new mail touches the last range of a mailbox, and a flag change or an
//!   expunge touches the ranges of its UIDs.
//!
//! Dirty tracking is local bookkeeping, not replicated state: every change to a mailbox's
//! messages gives the ranges it touched a fresh [`ChunkStamps`] stamp (a process-wide counter;
//! it never feeds back into apply, so apply stays deterministic). A snapshot build serializes
//! and hashes a range only if its stamp is not the one of the chunk it wrote for that range
//! before; sections are small and are serialized every time, then written only if their hash
//! is new.
//!
//! Storage: `<data_dir>/snapshot-chunks/chunks-<8-digit seq>.pack`, one pack per snapshot
//! build that wrote anything (the chunks' bytes back to back, fsync'd with the folder before
//! the snapshot naming them is returned). A chunk is named by its BLAKE3 hash, pack and
//! offset ([`ChunkRef`]); reading one checks its hash. The snapshot stream itself is a
//! [`Manifest`] of these references. Once a snapshot is kept, the packs it does not reference
//! (and no other build in progress does) are deleted. When the packs hold more than
//! [`REWRITE_FACTOR`] times the bytes the new snapshot references, the build copies its
//! chunks into its new pack (a full rewrite, amortized over the snapshots since the last one).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::{MailboxId, MessageList, MessageMeta, Uid};

/// The folder of chunk packs inside the data folder.
pub const CHUNK_DIR: &str = "snapshot-chunks";
/// UIDs per message range chunk: 4,096 messages of ~100 bytes of metadata, ~400 KiB.
pub const RANGE_UIDS: u32 = 4096;
/// One chunk's bytes: the state section of a very large deployment, far above a small
/// provider (a range is a few hundred KiB).
pub const MAX_CHUNK_BYTES: u64 = 512 * 1024 * 1024;
/// Chunks named by one manifest (sections, plus one per non-empty mailbox range).
pub const MAX_CHUNKS: usize = 50_000_000;
/// The packs are rewritten when they hold more than this many times the live chunk bytes.
pub const REWRITE_FACTOR: u64 = 2;
/// ... and more than this many bytes in all (small stores are not worth rewriting).
pub const REWRITE_MIN_BYTES: u64 = 8 * 1024 * 1024;

pub const SECTION_STATE: &str = "state";
pub const SECTION_OUTBOUND: &str = "outbound";
pub const SECTION_SRS_KEY: &str = "srs_key";
pub const SECTION_QUOTAS: &str = "quotas";
/// The backup key and lease (`backup_state.rs`).
pub const SECTION_BACKUP: &str = "backup";
/// Sieve scripts, vacation records, greylisting (`sieve_state.rs`).
pub const SECTION_SIEVE: &str = "sieve";
/// The replicated IMAP state (`imap_state.rs`: `\Recent` boundaries).
pub const SECTION_IMAP: &str = "imap";
/// RFC 7162 modseqs (`imap_state::ModseqState`).
pub const SECTION_MODSEQ: &str = "modseq";

const PACK_PREFIX: &str = "chunks-";
const PACK_SUFFIX: &str = ".pack";

/// The UID range a UID belongs to.
pub fn range_of(uid: Uid) -> u32 {
    uid / RANGE_UIDS
}

static NEXT_STAMP: AtomicU64 = AtomicU64::new(1);

fn fresh_stamp() -> u64 {
    NEXT_STAMP.fetch_add(1, Ordering::Relaxed)
}

/// Per mailbox: the stamp of each message range's last change (local bookkeeping). A range
/// without a stamp is unknown and is serialized by every build. Always equal to any other:
/// it is no part of the replicated state.
#[derive(Clone, Debug, Default)]
pub struct ChunkStamps(BTreeMap<u32, u64>);

impl PartialEq for ChunkStamps {
    fn eq(&self, _other: &Self) -> bool {
        true
    }
}

impl Eq for ChunkStamps {}

impl ChunkStamps {
    /// The range holding `uid` changed.
    pub fn touch(&mut self, uid: Uid) {
        self.0.insert(range_of(uid), fresh_stamp());
    }

    /// The ranges holding these UIDs changed.
    pub fn touch_all(&mut self, uids: impl IntoIterator<Item = Uid>) {
        let mut previous = None;
        for uid in uids {
            let range = range_of(uid);
            if previous != Some(range) {
                self.0.insert(range, fresh_stamp());
                previous = Some(range);
            }
        }
    }

    /// Every range of `messages` changed (their list was replaced).
    pub fn touch_messages<'a>(&mut self, messages: impl IntoIterator<Item = &'a MessageMeta>) {
        self.touch_all(messages.into_iter().map(|m| m.uid));
    }

    /// The stamp of a range's last change, 0 if unknown.
    pub fn get(&self, range: u32) -> u64 {
        self.0.get(&range).copied().unwrap_or(0)
    }
}

/// Where a chunk is in this node's chunk packs, and its hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub hash: [u8; 32],
    pub len: u64,
    pub pack: u32,
    pub offset: u64,
}

/// What a snapshot stream of version 3 holds: references to its chunks. The order of
/// `sections` and `mailboxes` is the order of the chunks in a transfer stream.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Named sections, each once.
    pub sections: Vec<(String, ChunkRef)>,
    /// Mailboxes with messages, ascending, each with its non-empty ranges, ascending.
    pub mailboxes: Vec<(MailboxId, Vec<(u32, ChunkRef)>)>,
}

impl Manifest {
    /// Every chunk reference, in stream order.
    pub fn chunks(&self) -> impl Iterator<Item = &ChunkRef> {
        self.sections.iter().map(|(_, chunk)| chunk).chain(
            self.mailboxes
                .iter()
                .flat_map(|(_, ranges)| ranges.iter().map(|(_, chunk)| chunk)),
        )
    }

    fn chunks_mut(&mut self) -> impl Iterator<Item = &mut ChunkRef> {
        self.sections.iter_mut().map(|(_, chunk)| chunk).chain(
            self.mailboxes
                .iter_mut()
                .flat_map(|(_, ranges)| ranges.iter_mut().map(|(_, chunk)| chunk)),
        )
    }

    pub fn chunk_count(&self) -> usize {
        self.sections.len()
            + self
                .mailboxes
                .iter()
                .map(|(_, ranges)| ranges.len())
                .sum::<usize>()
    }

    fn packs(&self) -> BTreeSet<u32> {
        self.chunks().map(|chunk| chunk.pack).collect()
    }
}

/// What a build remembers about the chunk it wrote for one mailbox range.
#[derive(Clone, Copy)]
struct RangeEntry {
    stamp: u64,
    count: usize,
    last_uid: Uid,
    chunk: ChunkRef,
}

#[derive(Default)]
struct Inner {
    next_pack: u32,
    /// Bytes of each pack on disk.
    pack_bytes: BTreeMap<u32, u64>,
    by_hash: HashMap<[u8; 32], ChunkRef>,
    ranges: HashMap<(MailboxId, u32), RangeEntry>,
    /// Packs named by snapshots built and not yet kept or dropped, per build.
    protected: BTreeMap<u64, BTreeSet<u32>>,
    next_build: u64,
}

impl Inner {
    fn drop_packs(&mut self, dir: &Path, gone: &BTreeSet<u32>) {
        for pack in gone {
            match fs::remove_file(pack_path(dir, *pack)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::warn!(pack, %error, "cannot remove a snapshot chunk pack");
                    continue;
                }
            }
            self.pack_bytes.remove(pack);
        }
        self.by_hash.retain(|_, chunk| !gone.contains(&chunk.pack));
        self.ranges
            .retain(|_, entry| !gone.contains(&entry.chunk.pack));
    }
}

/// The chunk packs of one node.
pub struct ChunkStore {
    dir: PathBuf,
    inner: Mutex<Inner>,
}

fn pack_path(dir: &Path, pack: u32) -> PathBuf {
    dir.join(format!("{PACK_PREFIX}{pack:08}{PACK_SUFFIX}"))
}

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    inner
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ChunkStore {
    /// Opens (creates) the chunk folder and lists its packs.
    pub fn open(dir: PathBuf) -> io::Result<Arc<ChunkStore>> {
        fs::create_dir_all(&dir)?;
        let mut inner = Inner::default();
        for item in fs::read_dir(&dir)? {
            let item = item?;
            let name = item.file_name();
            let name = name.to_string_lossy();
            let Some(seq) = name
                .strip_prefix(PACK_PREFIX)
                .and_then(|rest| rest.strip_suffix(PACK_SUFFIX))
                .and_then(|digits| digits.parse::<u32>().ok())
            else {
                continue;
            };
            inner.pack_bytes.insert(seq, item.metadata()?.len());
            inner.next_pack = inner.next_pack.max(seq + 1);
        }
        Ok(Arc::new(ChunkStore {
            dir,
            inner: Mutex::new(inner),
        }))
    }

    /// Starts writing chunks (one build or one restore at a time: holds the store's lock).
    pub fn writer(&self) -> ChunkWriter<'_> {
        ChunkWriter {
            store: self,
            inner: lock(&self.inner),
            pack: None,
            written: 0,
        }
    }

    /// Registers a build so that the packs its snapshot names survive until it is kept or
    /// dropped.
    pub fn begin_build(self: &Arc<Self>) -> BuildHandle {
        let mut inner = lock(&self.inner);
        inner.next_build += 1;
        BuildHandle {
            store: self.clone(),
            id: inner.next_build,
        }
    }

    /// Reads one chunk and checks it against its hash.
    pub fn read(&self, chunk: &ChunkRef, files: &mut BTreeMap<u32, File>) -> io::Result<Vec<u8>> {
        if chunk.len > MAX_CHUNK_BYTES {
            return Err(invalid("snapshot chunk is too large"));
        }
        let file = match files.entry(chunk.pack) {
            std::collections::btree_map::Entry::Occupied(file) => file.into_mut(),
            std::collections::btree_map::Entry::Vacant(slot) => {
                let file = File::open(pack_path(&self.dir, chunk.pack)).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("snapshot chunk pack {} is missing: {e}", chunk.pack),
                    )
                })?;
                slot.insert(file)
            }
        };
        let mut bytes = vec![0u8; chunk.len as usize];
        file.read_exact_at(&mut bytes, chunk.offset)?;
        if blake3::hash(&bytes).as_bytes() != &chunk.hash {
            return Err(invalid(format!(
                "snapshot chunk {} does not match its hash",
                hex::encode(chunk.hash)
            )));
        }
        Ok(bytes)
    }

    /// After a restore from `manifest` (references into this store): remembers its chunks so
    /// that the next build reuses them ([`ChunkStore::adopt_ranges`] then gives the ranges
    /// their stamps). With `collect`, the packs it does not name are removed (a crash between
    /// keeping a snapshot and removing the previous one's packs leaves them).
    pub fn adopt(&self, manifest: &Manifest, collect: bool) {
        let mut inner = lock(&self.inner);
        inner.ranges.clear();
        for chunk in manifest.chunks() {
            inner.by_hash.insert(chunk.hash, *chunk);
        }
        if collect {
            let mut keep = manifest.packs();
            for packs in inner.protected.values() {
                keep.extend(packs.iter().copied());
            }
            let gone: BTreeSet<u32> = inner
                .pack_bytes
                .keys()
                .filter(|pack| !keep.contains(pack))
                .copied()
                .collect();
            inner.drop_packs(&self.dir, &gone);
        }
    }

    /// Remembers one mailbox range's chunk with its stamp.
    fn remember_range(inner: &mut Inner, mailbox: MailboxId, range: u32, entry: RangeEntry) {
        inner.ranges.insert((mailbox, range), entry);
    }

    /// Remembers a restored mailbox's range chunks under the stamps its ranges now have.
    pub fn adopt_ranges(
        &self,
        mailbox: MailboxId,
        stamps: &ChunkStamps,
        messages: &MessageList,
        ranges: &[(u32, ChunkRef)],
    ) {
        let mut inner = lock(&self.inner);
        let mut start = 0;
        for (range, chunk) in ranges {
            // UIDs ascend: the range ends at the whole list's partition point.
            let end = messages
                .partition_point(|m| range_of(m.uid) <= *range)
                .max(start);
            let count = end - start;
            start = end;
            let stamp = stamps.get(*range);
            let Some(last) = end
                .checked_sub(1)
                .filter(|_| count > 0 && stamp != 0)
                .map(|index| &messages[index])
            else {
                continue;
            };
            Self::remember_range(
                &mut inner,
                mailbox,
                *range,
                RangeEntry {
                    stamp,
                    count,
                    last_uid: last.uid,
                    chunk: *chunk,
                },
            );
        }
    }

    /// Bytes of all packs on disk.
    #[cfg(test)]
    pub fn disk_bytes(&self) -> u64 {
        lock(&self.inner).pack_bytes.values().sum()
    }
}

/// A build registered with [`ChunkStore::begin_build`]; dropping it releases its packs.
pub struct BuildHandle {
    store: Arc<ChunkStore>,
    id: u64,
}

impl BuildHandle {
    /// The snapshot this build wrote (`manifest`) is the kept one: every pack neither it nor
    /// another build in progress names is removed.
    pub fn kept(&self, manifest: &Manifest) {
        let mut inner = lock(&self.store.inner);
        inner.protected.remove(&self.id);
        let mut keep = manifest.packs();
        for packs in inner.protected.values() {
            keep.extend(packs.iter().copied());
        }
        let gone: BTreeSet<u32> = inner
            .pack_bytes
            .keys()
            .filter(|pack| !keep.contains(pack))
            .copied()
            .collect();
        inner.drop_packs(&self.store.dir, &gone);
    }
}

impl Drop for BuildHandle {
    fn drop(&mut self) {
        lock(&self.store.inner).protected.remove(&self.id);
    }
}

/// Writes one build's (or one restore's) new chunks into one new pack.
pub struct ChunkWriter<'a> {
    store: &'a ChunkStore,
    inner: MutexGuard<'a, Inner>,
    pack: Option<(u32, io::BufWriter<File>)>,
    written: u64,
}

impl ChunkWriter<'_> {
    /// The chunk with these bytes: an existing one if any, else appended to the new pack.
    pub fn put(&mut self, bytes: &[u8]) -> io::Result<ChunkRef> {
        let hash = *blake3::hash(bytes).as_bytes();
        if let Some(existing) = self.inner.by_hash.get(&hash) {
            return Ok(*existing);
        }
        self.append(hash, bytes)
    }

    fn append(&mut self, hash: [u8; 32], bytes: &[u8]) -> io::Result<ChunkRef> {
        if bytes.len() as u64 > MAX_CHUNK_BYTES {
            return Err(invalid("snapshot chunk is too large"));
        }
        if self.pack.is_none() {
            let seq = self.inner.next_pack;
            self.inner.next_pack += 1;
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(pack_path(&self.store.dir, seq))?;
            self.pack = Some((seq, io::BufWriter::with_capacity(256 * 1024, file)));
        }
        let Some((seq, out)) = self.pack.as_mut() else {
            return Err(io::Error::other("chunk pack not open"));
        };
        out.write_all(bytes)?;
        let chunk = ChunkRef {
            hash,
            len: bytes.len() as u64,
            pack: *seq,
            offset: self.written,
        };
        self.written += bytes.len() as u64;
        self.inner.by_hash.insert(hash, chunk);
        Ok(chunk)
    }

    /// The chunk written before for `mailbox`'s `range`, if its stamp and shape still match.
    pub fn known_range(
        &self,
        mailbox: MailboxId,
        range: u32,
        stamp: u64,
        count: usize,
        last_uid: Uid,
    ) -> Option<ChunkRef> {
        if stamp == 0 {
            return None;
        }
        let entry = self.inner.ranges.get(&(mailbox, range))?;
        (entry.stamp == stamp && entry.count == count && entry.last_uid == last_uid)
            .then_some(entry.chunk)
    }

    /// Remembers the chunk of `mailbox`'s `range` at `stamp`.
    pub fn remember_range(
        &mut self,
        mailbox: MailboxId,
        range: u32,
        stamp: u64,
        count: usize,
        last_uid: Uid,
        chunk: ChunkRef,
    ) {
        if stamp != 0 {
            ChunkStore::remember_range(
                &mut self.inner,
                mailbox,
                range,
                RangeEntry {
                    stamp,
                    count,
                    last_uid,
                    chunk,
                },
            );
        }
    }

    /// Rewrites the packs when they hold much more than `manifest` needs: copies every chunk
    /// not in this writer's pack into it. Returns whether it did.
    pub fn rewrite_if_sparse(&mut self, manifest: &mut Manifest) -> io::Result<bool> {
        let mut live: BTreeMap<[u8; 32], u64> = BTreeMap::new();
        for chunk in manifest.chunks() {
            live.insert(chunk.hash, chunk.len);
        }
        let live_bytes: u64 = live.values().sum();
        let total = self.inner.pack_bytes.values().sum::<u64>() + self.written;
        if total <= REWRITE_MIN_BYTES || total <= REWRITE_FACTOR.saturating_mul(live_bytes) {
            return Ok(false);
        }
        let own = self.pack.as_ref().map(|(seq, _)| *seq);
        let mut files = BTreeMap::new();
        let mut moved: HashMap<[u8; 32], ChunkRef> = HashMap::new();
        let old: Vec<ChunkRef> = manifest
            .chunks()
            .filter(|chunk| Some(chunk.pack) != own)
            .copied()
            .collect();
        for chunk in old {
            if moved.contains_key(&chunk.hash) {
                continue;
            }
            let bytes = self.store.read(&chunk, &mut files)?;
            let copy = self.append(chunk.hash, &bytes)?;
            moved.insert(chunk.hash, copy);
        }
        for chunk in manifest.chunks_mut() {
            if let Some(copy) = moved.get(&chunk.hash) {
                *chunk = *copy;
            }
        }
        let moved_ranges: Vec<((MailboxId, u32), RangeEntry)> = self
            .inner
            .ranges
            .iter()
            .filter_map(|(key, entry)| {
                moved.get(&entry.chunk.hash).map(|copy| {
                    (
                        *key,
                        RangeEntry {
                            chunk: *copy,
                            ..*entry
                        },
                    )
                })
            })
            .collect();
        self.inner.ranges.extend(moved_ranges);
        Ok(true)
    }

    /// Makes the new pack durable (file and folder fsync'd) and registers the packs
    /// `manifest` names as `build`'s. On an error the new pack is removed.
    pub fn finish(mut self, manifest: &Manifest, build: Option<&BuildHandle>) -> io::Result<()> {
        if let Some((seq, out)) = self.pack.take() {
            let result = (|| {
                let file = out.into_inner().map_err(|e| e.into_error())?;
                file.sync_all()?;
                File::open(&self.store.dir)?.sync_all()
            })();
            if let Err(error) = result {
                let gone = BTreeSet::from([seq]);
                self.inner.drop_packs(&self.store.dir, &gone);
                return Err(error);
            }
            self.inner.pack_bytes.insert(seq, self.written);
        }
        if let Some(build) = build {
            self.inner.protected.insert(build.id, manifest.packs());
        }
        Ok(())
    }
}

impl Drop for ChunkWriter<'_> {
    fn drop(&mut self) {
        // Not finished (an error): the partial pack goes, with what was learnt from it.
        if let Some((seq, _)) = self.pack.take() {
            let gone = BTreeSet::from([seq]);
            self.inner.drop_packs(&self.store.dir, &gone);
        }
    }
}
