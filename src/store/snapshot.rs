//! Snapshot streams. A node's own snapshot (version 3) is a manifest of content-addressed
//! metadata chunks kept in the chunk store (`snapshot_chunks.rs`): a build writes only the
//! chunks that changed since the previous one, so its time and size follow the changes, not
//! the mail stored; bodies are not in it at all (they are immutable, content-addressed and
//! already in the pack files). The stream sent to a follower (version 4) carries the manifest,
//! every chunk's bytes and the bodies.
//!
//! Layout (integers little-endian):
//! ```text
//! MAGIC (16 bytes) | version u32
//! meta_len u64 | meta [meta_len]
//!   versions 1, 2: bincode of SnapshotMeta (varint, limited to meta_len), the whole state
//!   versions 3, 4: bincode of Manifest (named sections, then each mailbox's UID ranges)
//! version 4 only: each chunk's bytes [len], in manifest order (sections, then ranges)
//! versions 1, 2, 4: blob_count u64 | blob_count × ( blob id [32] | len u64 | kind u8 |
//!                  zstd bytes [len] if kind = 1 ), ids ascending; kind 0: a reference to a
//!                  body in this node's packs, kind 1: the body's compressed bytes follow
//! BLAKE3 of every byte above [32]
//! ```
//! Version 1 (still read) has no kind byte: every body's bytes follow its length. Version 2
//! (still read) holds the whole state and a reference per body.
//!
//! Bodies: before a snapshot is kept, the packs are fsynced (the log entries that carried the
//! bodies may be purged after it), and a body released after a snapshot was captured stays in
//! the packs until a snapshot captured after its release is kept (`BlobStore::snapshot_kept`),
//! so that compaction never drops a body the kept snapshot needs.
//!
//! Reading is bounded everywhere: a corrupt or hostile stream gives an error, never a panic or
//! an allocation sized by the stream. The state is replaced only after the trailing hash, every
//! chunk's hash and the state's invariants have been checked; bodies and chunks written before
//! a failure are content-addressed and harmless (the next restore's sweep removes bodies, the
//! next kept snapshot removes chunk packs).

use std::collections::BTreeMap;
#[cfg(test)]
use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::sync::Arc;

use bincode::Options;
use serde::{Deserialize, Serialize};

use super::blob::{BlobStore, ReadGuard};
use super::command::SrsKey;
use super::command::MAX_COMMAND_BYTES;
use super::queue::Outbound;
use super::quota::Quotas;
use super::snapshot_chunks::{
    range_of, BuildHandle, ChunkRef, ChunkStore, Manifest, MAX_CHUNKS, MAX_CHUNK_BYTES,
    SECTION_BACKUP, SECTION_IMAP, SECTION_MODSEQ, SECTION_OUTBOUND, SECTION_QUOTAS, SECTION_SIEVE,
    SECTION_SRS_KEY, SECTION_STATE,
};
use super::state::State;
use super::{BlobId, MailboxId, MessageMeta};

pub const MAGIC: &[u8; 16] = b"kermail-snapshot";
/// The version of a node's own snapshot: a manifest of chunks.
pub const VERSION: u32 = 3;
/// The version of the stream a follower receives: manifest, chunks, bodies.
pub const VERSION_TRANSFER: u32 = 4;
/// The whole state and a reference per body (read for snapshots of earlier versions).
const VERSION_REFERENCES: u32 = 2;
/// The whole state and every body inlined (read for snapshots of earlier versions).
const VERSION_INLINE_ONLY: u32 = 1;
/// Kind byte of a body entry (version 2).
const KIND_REFERENCE: u8 = 0;
const KIND_INLINE: u8 = 1;
/// The encoded metadata (accounts, mailboxes, message lists): 1 GiB is about ten million
/// messages, far above a small provider.
pub const MAX_META_BYTES: u64 = 1024 * 1024 * 1024;
/// Distinct bodies in one snapshot.
pub const MAX_BLOBS: u64 = 100_000_000;
/// After serving bodies to a peer installing a snapshot, how long this node deletes no body
/// (the peer fetches in rounds; a body released meanwhile may be one its snapshot references).
pub const FETCH_HOLD: std::time::Duration = std::time::Duration::from_secs(600);

/// V1: before the outbound queue (its state restores empty). V2: the state and the outbound
/// part (queue, DKIM keys), which `State` does not serialize itself.
#[derive(Serialize, Deserialize)]
enum SnapshotMeta {
    V1(State),
    V2(State, Outbound),
    /// V2 plus the SRS key (issue 10) and the quota settings (usage is derived at restore).
    V3(State, Outbound, Option<SrsKey>, Quotas),
}

#[cfg(test)]
#[derive(Serialize)]
enum SnapshotMetaRef<'a> {
    /// Written only by the compatibility test.
    #[cfg_attr(not(test), allow(dead_code))]
    V1(&'a State),
    /// Written only by the compatibility tests.
    #[cfg_attr(not(test), allow(dead_code))]
    V2(&'a State, &'a Outbound),
}

fn meta_codec(limit: u64) -> impl Options {
    bincode::DefaultOptions::new().with_limit(limit)
}

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// Buffer between bincode's many small reads and writes and the stream (and the hasher).
const IO_BUFFER_BYTES: usize = 64 * 1024;

struct HashingWriter<W: Write> {
    inner: W,
    hasher: blake3::Hasher,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.hasher.update(&buf[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct HashingReader<R: Read> {
    inner: R,
    hasher: blake3::Hasher,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        self.hasher.update(&buf[..read]);
        Ok(read)
    }
}

/// A point-in-time view of the state and a guard that keeps its bodies readable.
pub struct Builder {
    pub(super) state: State,
    pub(super) blobs: Arc<BlobStore>,
    pub(super) chunks: Arc<ChunkStore>,
    pub(super) _guard: ReadGuard,
    /// Bodies still to be written after a storage failure (the app retries them first).
    pub(super) machine: std::sync::Weak<super::MailStateMachine>,
    /// The blob store's mark at capture ([`BlobStore::snapshot_captured`]).
    pub(super) mark: u64,
    /// Keeps the chunk packs this build names until it is kept or dropped.
    pub(super) build: BuildHandle,
    /// The manifest the last `write_to` wrote.
    pub(super) written: std::sync::Mutex<Option<Manifest>>,
}

impl kermail_cluster::SnapshotBuilder for Builder {
    fn write_to(&self, out: &mut dyn Write) -> io::Result<()> {
        if let Some(machine) = self.machine.upgrade() {
            // A body whose write failed must reach the packs before a snapshot that only
            // references it lets the log that carries it be purged.
            machine.retry_unwritten_bodies()?;
        }
        self.blobs.sync()?;
        let started = std::time::Instant::now();
        let (manifest, stats) = write_chunks(&self.state, &self.chunks, Some(&self.build))?;
        write_manifest_stream(&manifest, out)?;
        tracing::info!(
            chunks = manifest.chunk_count(),
            chunks_written = stats.written,
            bytes_written = stats.bytes_written,
            rewritten = stats.rewritten,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot metadata written"
        );
        *self
            .written
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(manifest);
        Ok(())
    }

    fn kept(&self) {
        self.blobs.snapshot_kept(self.mark);
        let written = self
            .written
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(manifest) = written.as_ref() {
            self.build.kept(manifest);
        }
    }
}

/// What one build wrote.
#[derive(Debug, Default, Clone, Copy)]
pub struct ChunkStats {
    /// Chunks serialized (changed since the previous build, or unknown).
    pub written: usize,
    /// Bytes of those chunks.
    pub bytes_written: u64,
    /// Whether the packs were rewritten (full snapshot).
    pub rewritten: bool,
}

fn encode<T: Serialize + ?Sized>(value: &T) -> io::Result<Vec<u8>> {
    meta_codec(MAX_CHUNK_BYTES)
        .serialize(value)
        .map_err(|e| invalid(format!("cannot encode the state: {e}")))
}

/// The named sections of a state, in stream order. A new piece of replicated state is one more
/// entry here and one more arm in [`decode_chunks`].
fn encode_sections(state: &State) -> io::Result<Vec<(&'static str, Vec<u8>)>> {
    Ok(vec![
        (SECTION_STATE, encode(&state.without_messages())?),
        (SECTION_OUTBOUND, encode(&state.outbound)?),
        (SECTION_SRS_KEY, encode(&state.outbound.srs_key)?),
        (SECTION_QUOTAS, encode(&state.quotas)?),
        (SECTION_BACKUP, encode(&state.backup)?),
        (SECTION_SIEVE, encode(&state.sieve)?),
        (SECTION_IMAP, encode(&state.imap)?),
        (
            super::backup_state::SECTION_BACKUP_SUCCESS,
            encode(&state.backup.last_success)?,
        ),
        (SECTION_MODSEQ, encode(&state.imap.modseq)?),
        (super::bayes::SECTION_BAYES, encode(&state.bayes)?),
        (super::acl_state::SECTION_ACL, encode(&state.acl)?),
    ])
}

/// Writes the chunks of `state` that the chunk store does not hold yet (fsync'd) and returns
/// the manifest naming all of them.
pub fn write_chunks(
    state: &State,
    chunks: &ChunkStore,
    build: Option<&BuildHandle>,
) -> io::Result<(Manifest, ChunkStats)> {
    let mut writer = chunks.writer();
    let mut manifest = Manifest::default();
    let mut stats = ChunkStats::default();
    for (name, bytes) in encode_sections(state)? {
        manifest
            .sections
            .push((name.to_string(), writer.put(&bytes)?));
    }
    for account in state.accounts.values() {
        for mailbox in account.mailboxes.values() {
            let messages = &mailbox.messages;
            if messages.is_empty() {
                continue;
            }
            let mut ranges = Vec::new();
            let mut start = 0;
            while let Some(first) = messages.get(start) {
                let range = range_of(first.uid);
                // UIDs ascend, so the range ends where the whole list's partition point is.
                let end = messages.partition_point(|m| range_of(m.uid) <= range);
                let last_uid = messages[end - 1].uid;
                let stamp = mailbox.chunk_stamps.get(range);
                let chunk =
                    match writer.known_range(mailbox.id, range, stamp, end - start, last_uid) {
                        Some(chunk) => chunk,
                        None => {
                            let bytes = super::savedate_state::encode_message_chunk(
                                messages.to_vec_range(start..end).as_slice(),
                                MAX_CHUNK_BYTES,
                            )
                            .map_err(invalid)?;
                            stats.written += 1;
                            stats.bytes_written += bytes.len() as u64;
                            let chunk = writer.put(&bytes)?;
                            writer.remember_range(
                                mailbox.id,
                                range,
                                stamp,
                                end - start,
                                last_uid,
                                chunk,
                            );
                            chunk
                        }
                    };
                ranges.push((range, chunk));
                start = end;
            }
            manifest.mailboxes.push((mailbox.id, ranges));
        }
    }
    manifest.mailboxes.sort_unstable_by_key(|(id, _)| *id);
    stats.rewritten = writer.rewrite_if_sparse(&mut manifest)?;
    writer.finish(&manifest, build)?;
    Ok((manifest, stats))
}

/// A node's own snapshot stream: header, manifest, checksum.
fn write_manifest_stream(manifest: &Manifest, out: &mut dyn Write) -> io::Result<()> {
    let mut out = HashingWriter {
        inner: io::BufWriter::with_capacity(IO_BUFFER_BYTES, out),
        hasher: blake3::Hasher::new(),
    };
    let bytes = meta_codec(MAX_META_BYTES)
        .serialize(manifest)
        .map_err(|e| invalid(format!("cannot encode the manifest: {e}")))?;
    write_header(&mut out, VERSION, bytes.len() as u64)?;
    out.write_all(&bytes)?;
    let hash = out.hasher.finalize();
    out.inner.write_all(hash.as_bytes())?;
    out.inner.flush()
}

/// Writes the state's chunks and the manifest stream naming them (this node's own snapshot).
#[cfg(test)]
pub fn write_snapshot(state: &State, chunks: &ChunkStore, out: &mut dyn Write) -> io::Result<()> {
    let (manifest, _) = write_chunks(state, chunks, None)?;
    write_manifest_stream(&manifest, out)
}

/// Decodes a manifest, bounded and checked (counts, order, unique names).
fn decode_manifest(bytes: &[u8]) -> io::Result<Manifest> {
    let manifest: Manifest = meta_codec(bytes.len() as u64)
        .deserialize(bytes)
        .map_err(|e| invalid(format!("snapshot manifest is corrupt: {e}")))?;
    if manifest.chunk_count() > MAX_CHUNKS {
        return Err(invalid("snapshot names too many chunks"));
    }
    let mut previous: Option<MailboxId> = None;
    for (mailbox, ranges) in &manifest.mailboxes {
        if previous.is_some_and(|p| p >= *mailbox) {
            return Err(invalid("snapshot mailboxes are not in ascending order"));
        }
        previous = Some(*mailbox);
        if ranges.is_empty() || ranges.windows(2).any(|pair| pair[0].0 >= pair[1].0) {
            return Err(invalid(
                "snapshot ranges of a mailbox are empty or out of order",
            ));
        }
    }
    for chunk in manifest.chunks() {
        if chunk.len > MAX_CHUNK_BYTES {
            return Err(invalid("snapshot chunk is too large"));
        }
    }
    Ok(manifest)
}

/// Rebuilds the state from a manifest's chunks, which `fetch` gives in stream order (sections,
/// then ranges). Checks each range chunk's UIDs against its range.
fn decode_chunks(
    manifest: &Manifest,
    mut fetch: impl FnMut(&ChunkRef) -> io::Result<Vec<u8>>,
) -> io::Result<State> {
    let mut state: Option<State> = None;
    let mut outbound: Option<Outbound> = None;
    let mut srs_key: Option<Option<SrsKey>> = None;
    let mut quotas: Option<Quotas> = None;
    let mut backup: Option<super::backup_state::BackupState> = None;
    let mut sieve: Option<super::sieve_state::SieveState> = None;
    let mut imap: Option<super::imap_state::ImapState> = None;
    let mut backup_success: Option<
        std::collections::BTreeMap<String, super::backup_state::BackupSuccess>,
    > = None;
    let mut modseq: Option<super::imap_state::ModseqState> = None;
    let mut bayes: Option<super::bayes::BayesState> = None;
    let mut acl: Option<super::acl_state::AclState> = None;
    fn decode<T: serde::de::DeserializeOwned>(name: &str, bytes: &[u8]) -> io::Result<T> {
        meta_codec(bytes.len() as u64)
            .deserialize(bytes)
            .map_err(|e| invalid(format!("snapshot section {name} is corrupt: {e}")))
    }
    fn once<T>(slot: &mut Option<T>, name: &str, value: T) -> io::Result<()> {
        if slot.replace(value).is_some() {
            return Err(invalid(format!("snapshot section {name} appears twice")));
        }
        Ok(())
    }
    for (name, chunk) in &manifest.sections {
        let bytes = fetch(chunk)?;
        match name.as_str() {
            SECTION_STATE => once(&mut state, name, decode(name, &bytes)?)?,
            SECTION_OUTBOUND => once(&mut outbound, name, decode(name, &bytes)?)?,
            SECTION_SRS_KEY => once(&mut srs_key, name, decode(name, &bytes)?)?,
            SECTION_QUOTAS => once(&mut quotas, name, decode(name, &bytes)?)?,
            SECTION_BACKUP => once(&mut backup, name, decode(name, &bytes)?)?,
            SECTION_SIEVE => once(&mut sieve, name, decode(name, &bytes)?)?,
            SECTION_IMAP => once(&mut imap, name, decode(name, &bytes)?)?,
            super::backup_state::SECTION_BACKUP_SUCCESS => {
                once(&mut backup_success, name, decode(name, &bytes)?)?
            }
            SECTION_MODSEQ => once(&mut modseq, name, decode(name, &bytes)?)?,
            super::bayes::SECTION_BAYES => once(&mut bayes, name, decode(name, &bytes)?)?,
            super::acl_state::SECTION_ACL => once(&mut acl, name, decode(name, &bytes)?)?,
            other => {
                return Err(invalid(format!(
                    "snapshot section {other:?} is not known to this version"
                )))
            }
        }
    }
    let mut state = state.ok_or_else(|| invalid("snapshot has no state section"))?;
    state.outbound = outbound.unwrap_or_default();
    state.outbound.srs_key = srs_key.unwrap_or_default();
    state.outbound.rebuild_due();
    // Usage is derived: recomputed from the messages by `rebuild_blobs`.
    state.quotas = quotas.unwrap_or_default();
    state.backup = backup.unwrap_or_default();
    state.backup.last_success = backup_success.unwrap_or_default();
    state.sieve = sieve.unwrap_or_default();
    state.imap = imap.unwrap_or_default();
    state.imap.modseq = modseq.unwrap_or_default();
    state.bayes = bayes.unwrap_or_default();
    // Written before ACLs: no mailbox is shared.
    state.acl = acl.unwrap_or_default();

    let mut owners: BTreeMap<MailboxId, super::AccountId> = BTreeMap::new();
    for account in state.accounts.values() {
        for mailbox in account.mailboxes.values() {
            if !mailbox.messages.is_empty() {
                return Err(invalid("snapshot state section holds messages"));
            }
            owners.insert(mailbox.id, account.id);
        }
    }
    for (mailbox_id, ranges) in &manifest.mailboxes {
        let mut messages: Vec<MessageMeta> = Vec::new();
        for (range, chunk) in ranges {
            let bytes = fetch(chunk)?;
            // Chunks with save dates have a marker; older ones decode as before.
            let part: Vec<MessageMeta> =
                super::savedate_state::decode_message_chunk(&bytes, |bytes| {
                    match decode::<Vec<MessageMeta>>("messages", bytes) {
                        Ok(part) => Ok(part),
                        // Written before modseqs: every message gets the initial one.
                        Err(error) => super::imap_state::decode_legacy_messages(bytes)
                            .ok_or_else(|| error.to_string()),
                    }
                })
                .map_err(invalid)?;
            if part.is_empty() || part.iter().any(|m| range_of(m.uid) != *range) {
                return Err(invalid("snapshot range chunk holds UIDs of another range"));
            }
            messages.extend(part);
        }
        let mailbox = owners
            .get(mailbox_id)
            .and_then(|account| state.accounts.get_mut(account))
            .and_then(|account| account.mailboxes.get_mut(mailbox_id))
            .ok_or_else(|| invalid("snapshot has messages of an unknown mailbox"))?;
        mailbox.messages = messages.into();
    }
    Ok(state)
}

fn write_header(out: &mut dyn Write, version: u32, meta_len: u64) -> io::Result<()> {
    out.write_all(MAGIC)?;
    out.write_all(&version.to_le_bytes())?;
    out.write_all(&meta_len.to_le_bytes())
}

fn missing_body(id: &BlobId, error: io::Error) -> io::Error {
    tracing::error!(blob = %hex::encode(id.0), %error, "a referenced body is missing");
    io::Error::new(
        error.kind(),
        format!("body {} is missing: {error}", hex::encode(id.0)),
    )
}

/// Copies one body's compressed bytes from the packs (`len` of them).
fn copy_body_as(
    blobs: &BlobStore,
    id: &BlobId,
    version: u32,
    out: &mut dyn Write,
) -> io::Result<u64> {
    let mut body = blobs.open_compressed(id).map_err(|e| missing_body(id, e))?;
    let len = body.remaining_bytes();
    out.write_all(&len.to_le_bytes())?;
    if version != VERSION_INLINE_ONLY {
        out.write_all(&[KIND_INLINE])?;
    }
    let copied = io::copy(&mut body, out)?;
    if copied != len {
        return Err(invalid(format!(
            "body {} shrank while being read",
            hex::encode(id.0)
        )));
    }
    Ok(len)
}

#[cfg(test)]
fn write_snapshot_with(
    meta: SnapshotMetaRef<'_>,
    referenced: &BTreeSet<BlobId>,
    blobs: &BlobStore,
    inline: bool,
    out: &mut dyn Write,
) -> io::Result<()> {
    write_snapshot_as(meta, referenced, blobs, inline, VERSION_REFERENCES, out)
}

/// [`write_snapshot_with`] in a given layout version (1 only for the compatibility test).
#[cfg(test)]
fn write_snapshot_as(
    meta: SnapshotMetaRef<'_>,
    referenced: &BTreeSet<BlobId>,
    blobs: &BlobStore,
    inline: bool,
    version: u32,
    out: &mut dyn Write,
) -> io::Result<()> {
    let inline = inline || version == VERSION_INLINE_ONLY;
    let mut out = HashingWriter {
        inner: io::BufWriter::with_capacity(IO_BUFFER_BYTES, out),
        hasher: blake3::Hasher::new(),
    };
    let meta_len = meta_codec(MAX_META_BYTES)
        .serialized_size(&meta)
        .map_err(|e| invalid(format!("cannot encode the state: {e}")))?;
    write_header(&mut out, version, meta_len)?;
    meta_codec(MAX_META_BYTES)
        .serialize_into(&mut out, &meta)
        .map_err(|e| invalid(format!("cannot encode the state: {e}")))?;
    // The referenced bodies come from the message lists, not from `state.blobs`: the capture
    // for a snapshot leaves that table out to stay cheap.
    out.write_all(&(referenced.len() as u64).to_le_bytes())?;
    for id in referenced {
        out.write_all(&id.0)?;
        if inline {
            copy_body_as(blobs, id, version, &mut out)?;
        } else {
            // A body missing here was lost before this snapshot (logged); the reference keeps
            // the state whole, and its reader reports the body as missing.
            let len = match blobs.stored_len(id) {
                Some(len) => len,
                None => {
                    tracing::error!(
                        blob = %hex::encode(id.0),
                        "a body referenced by the snapshot is not in the packs"
                    );
                    0
                }
            };
            out.write_all(&len.to_le_bytes())?;
            out.write_all(&[KIND_REFERENCE])?;
        }
    }
    let hash = out.hasher.finalize();
    out.inner.write_all(hash.as_bytes())?;
    out.inner.flush()
}

fn read_u64(input: &mut impl Read) -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    input.read_exact(&mut bytes)?;
    Ok(u64::from_le_bytes(bytes))
}

/// Reads the fixed header and the encoded metadata, bounded.
fn read_header_and_meta(input: &mut impl Read) -> io::Result<(u32, Vec<u8>)> {
    let mut magic = [0u8; 16];
    input.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(invalid("not a kermail snapshot"));
    }
    let mut version = [0u8; 4];
    input.read_exact(&mut version)?;
    let version = u32::from_le_bytes(version);
    if !(VERSION_INLINE_ONLY..=VERSION_TRANSFER).contains(&version) {
        return Err(invalid(format!(
            "snapshot version {version} is not supported (this node reads 1 to \
             {VERSION_TRANSFER})"
        )));
    }
    let meta_len = read_u64(input)?;
    if meta_len > MAX_META_BYTES {
        return Err(invalid("snapshot metadata is too large"));
    }
    // Read into memory as the bytes arrive (never sized by the claimed length), then decode
    // from the slice, where every length is checked against the bytes actually there.
    let mut meta_bytes = Vec::new();
    input.take(meta_len).read_to_end(&mut meta_bytes)?;
    if meta_bytes.len() as u64 != meta_len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "snapshot ends inside its metadata",
        ));
    }
    Ok((version, meta_bytes))
}

/// One body entry's id, length and kind; checks the order.
fn read_body_entry(
    input: &mut impl Read,
    version: u32,
    previous: &mut Option<BlobId>,
) -> io::Result<(BlobId, u64, u8)> {
    let mut id = [0u8; 32];
    input.read_exact(&mut id)?;
    let id = BlobId(id);
    if previous.is_some_and(|p| p >= id) {
        return Err(invalid("snapshot bodies are not in ascending order"));
    }
    *previous = Some(id);
    let len = read_u64(input)?;
    if len > MAX_COMMAND_BYTES {
        return Err(invalid("snapshot body is larger than any message"));
    }
    let kind = if version == VERSION_INLINE_ONLY {
        KIND_INLINE
    } else {
        let mut kind = [0u8; 1];
        input.read_exact(&mut kind)?;
        kind[0]
    };
    if kind != KIND_INLINE && kind != KIND_REFERENCE {
        return Err(invalid("snapshot body entry of an unknown kind"));
    }
    Ok((id, len, kind))
}

fn check_trailer<R: Read>(input: HashingReader<R>) -> io::Result<()> {
    let HashingReader { mut inner, hasher } = input;
    let expected = hasher.finalize();
    let mut hash = [0u8; 32];
    inner.read_exact(&mut hash)?;
    if &hash != expected.as_bytes() {
        return Err(invalid("snapshot checksum does not match"));
    }
    let mut extra = [0u8; 1];
    if inner.read(&mut extra)? != 0 {
        return Err(invalid("snapshot has trailing bytes"));
    }
    Ok(())
}

/// Reads a snapshot: writes the inlined bodies that `blobs` lacks and returns the checked
/// state. A referenced body must be in `blobs` already: with `local` (this node's own snapshot
/// at a restart) a missing one is logged and the restore goes on (it was lost before the
/// snapshot was written); otherwise it is an error. Chunks of a version 3 stream are read
/// from `chunks`; those of a version 4 stream are written there. On success, `chunks` knows
/// the restored state's chunks and the state's ranges carry stamps for them, so the next
/// build writes only what changes after this.
pub fn read_snapshot(
    input: &mut dyn Read,
    blobs: &BlobStore,
    chunks: &ChunkStore,
    local: bool,
) -> io::Result<State> {
    let mut input = HashingReader {
        inner: io::BufReader::with_capacity(IO_BUFFER_BYTES, input),
        hasher: blake3::Hasher::new(),
    };
    let (version, meta_bytes) = read_header_and_meta(&mut input)?;
    let mut stored_sizes: BTreeMap<BlobId, u64> = BTreeMap::new();
    let mut missing = Vec::new();
    let (mut state, manifest) = match version {
        VERSION_INLINE_ONLY | VERSION_REFERENCES => {
            let state = decode_whole_state(&meta_bytes)?;
            drop(meta_bytes);
            read_bodies(&mut input, version, blobs, &mut stored_sizes, &mut missing)?;
            check_trailer(input)?;
            (state, None)
        }
        VERSION => {
            let manifest = decode_manifest(&meta_bytes)?;
            drop(meta_bytes);
            check_trailer(input)?;
            let mut files = BTreeMap::new();
            let state = decode_chunks(&manifest, |chunk| chunks.read(chunk, &mut files))?;
            for id in state.referenced_blobs() {
                match blobs.stored_len(&id) {
                    Some(stored) => {
                        stored_sizes.insert(id, stored);
                    }
                    None => missing.push(id),
                }
            }
            (state, Some(manifest))
        }
        _ => {
            let sent = decode_manifest(&meta_bytes)?;
            drop(meta_bytes);
            let mut writer = chunks.writer();
            let mut local_manifest = sent.clone();
            let mut local_refs = Vec::with_capacity(sent.chunk_count());
            let state = decode_chunks(&sent, |chunk| {
                let bytes = read_chunk_bytes(&mut input, chunk)?;
                local_refs.push(writer.put(&bytes)?);
                Ok(bytes)
            })?;
            for (slot, local) in local_manifest_slots(&mut local_manifest).zip(local_refs) {
                *slot = local;
            }
            read_bodies(&mut input, version, blobs, &mut stored_sizes, &mut missing)?;
            check_trailer(input)?;
            writer.finish(&local_manifest, None)?;
            (state, Some(local_manifest))
        }
    };
    if let Some(first) = missing.first() {
        if !local {
            return Err(invalid(format!(
                "snapshot references body {} which this node does not have",
                hex::encode(first.0)
            )));
        }
        tracing::error!(
            n_missing = missing.len(),
            first = %hex::encode(first.0),
            "bodies referenced by the local snapshot are missing from the packs"
        );
        for id in &missing {
            stored_sizes.insert(*id, 0);
        }
    }

    state
        .check_invariants()
        .map_err(|why| invalid(format!("snapshot state is inconsistent: {why}")))?;
    state.rebuild_blobs(|id| stored_sizes.get(id).copied().unwrap_or(0));
    if let Some(missing) = state.blobs.keys().find(|id| !stored_sizes.contains_key(id)) {
        return Err(invalid(format!(
            "snapshot lacks body {}",
            hex::encode(missing.0)
        )));
    }
    // Every range starts with a fresh stamp; the chunks just read are remembered for them.
    for account in state.accounts.values_mut() {
        for mailbox in account.mailboxes.values_mut() {
            let messages = mailbox.messages.clone();
            mailbox.chunk_stamps.touch_messages(&messages);
        }
    }
    if let Some(manifest) = &manifest {
        chunks.adopt(manifest, local && version == VERSION);
        let mut by_mailbox: BTreeMap<MailboxId, &[(u32, ChunkRef)]> = BTreeMap::new();
        for (mailbox, ranges) in &manifest.mailboxes {
            by_mailbox.insert(*mailbox, ranges);
        }
        for account in state.accounts.values_mut() {
            for mailbox in account.mailboxes.values_mut() {
                if let Some(ranges) = by_mailbox.get(&mailbox.id) {
                    chunks.adopt_ranges(
                        mailbox.id,
                        &mailbox.chunk_stamps,
                        &mailbox.messages,
                        ranges,
                    );
                }
            }
        }
    }
    Ok(state)
}

/// The chunk references of a manifest, mutable, in stream order.
fn local_manifest_slots(manifest: &mut Manifest) -> impl Iterator<Item = &mut ChunkRef> {
    manifest.sections.iter_mut().map(|(_, chunk)| chunk).chain(
        manifest
            .mailboxes
            .iter_mut()
            .flat_map(|(_, ranges)| ranges.iter_mut().map(|(_, chunk)| chunk)),
    )
}

/// One chunk's bytes from a transfer stream, checked against its hash.
fn read_chunk_bytes(input: &mut impl Read, chunk: &ChunkRef) -> io::Result<Vec<u8>> {
    if chunk.len > MAX_CHUNK_BYTES {
        return Err(invalid("snapshot chunk is too large"));
    }
    let mut bytes = Vec::new();
    input.take(chunk.len).read_to_end(&mut bytes)?;
    if bytes.len() as u64 != chunk.len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "snapshot ends inside a chunk",
        ));
    }
    if blake3::hash(&bytes).as_bytes() != &chunk.hash {
        return Err(invalid("snapshot chunk does not match its hash"));
    }
    Ok(bytes)
}

/// The whole state of a version 1 or 2 stream.
fn decode_whole_state(meta_bytes: &[u8]) -> io::Result<State> {
    let meta: SnapshotMeta = meta_codec(meta_bytes.len() as u64)
        .deserialize(meta_bytes)
        .map_err(|e| invalid(format!("snapshot metadata is corrupt: {e}")))?;
    Ok(match meta {
        SnapshotMeta::V1(state) => state,
        SnapshotMeta::V2(mut state, outbound) => {
            state.outbound = outbound;
            state.outbound.rebuild_due();
            state
        }
        SnapshotMeta::V3(mut state, outbound, srs_key, quotas) => {
            state.outbound = outbound;
            state.outbound.srs_key = srs_key;
            state.outbound.rebuild_due();
            // Usage is derived: it is recomputed from the messages later.
            state.quotas = quotas;
            state
        }
    })
}

/// The body section: inlined bodies are written to `blobs`; references are looked up there.
fn read_bodies(
    input: &mut impl Read,
    version: u32,
    blobs: &BlobStore,
    stored_sizes: &mut BTreeMap<BlobId, u64>,
    missing: &mut Vec<BlobId>,
) -> io::Result<()> {
    let blob_count = read_u64(input)?;
    if blob_count > MAX_BLOBS {
        return Err(invalid("snapshot holds too many bodies"));
    }
    let mut previous: Option<BlobId> = None;
    for _ in 0..blob_count {
        let (id, len, kind) = read_body_entry(input, version, &mut previous)?;
        if kind == KIND_INLINE {
            blobs.write_from(&id, len, input)?;
            stored_sizes.insert(id, len);
        } else {
            match blobs.stored_len(&id) {
                Some(stored) => {
                    stored_sizes.insert(id, stored);
                }
                None => missing.push(id),
            }
        }
    }
    Ok(())
}

/// Turns this node's own snapshot stream (`local`) into the stream a follower installs. A
/// version 3 stream (manifest) becomes a version 4 stream: the manifest, every chunk's bytes
/// from `chunks`, every referenced body inlined from the packs. A version 1 or 2 stream keeps
/// its version, with every body inlined. The input's checksum is verified on the way.
pub fn write_transfer(
    local: &mut dyn Read,
    blobs: &BlobStore,
    chunks: &ChunkStore,
    out: &mut dyn Write,
) -> io::Result<()> {
    let mut input = HashingReader {
        inner: io::BufReader::with_capacity(IO_BUFFER_BYTES, local),
        hasher: blake3::Hasher::new(),
    };
    let (version, meta_bytes) = read_header_and_meta(&mut input)?;
    let mut out = HashingWriter {
        inner: io::BufWriter::with_capacity(IO_BUFFER_BYTES, out),
        hasher: blake3::Hasher::new(),
    };
    if version == VERSION {
        let manifest = decode_manifest(&meta_bytes)?;
        check_trailer(input)?;
        drop(meta_bytes);
        // Where the chunks are in this node's packs means nothing to the receiver: left out,
        // so that two nodes with the same state send the same bytes.
        let mut sent = manifest.clone();
        for chunk in local_manifest_slots(&mut sent) {
            chunk.pack = 0;
            chunk.offset = 0;
        }
        let sent_bytes = meta_codec(MAX_META_BYTES)
            .serialize(&sent)
            .map_err(|e| invalid(format!("cannot encode the manifest: {e}")))?;
        write_header(&mut out, VERSION_TRANSFER, sent_bytes.len() as u64)?;
        out.write_all(&sent_bytes)?;
        drop(sent_bytes);
        let mut files = BTreeMap::new();
        let mut write_error = None;
        let state = decode_chunks(&manifest, |chunk| {
            let bytes = chunks.read(chunk, &mut files)?;
            if let Err(e) = out.write_all(&bytes) {
                write_error.get_or_insert(e);
            }
            Ok(bytes)
        })?;
        if let Some(e) = write_error {
            return Err(e);
        }
        // References only: the follower fetches the bodies it lacks from its peers
        // (`missing_bodies` there, then `AppStateMachine::read_objects` here).
        let referenced = state.referenced_blobs();
        drop(state);
        out.write_all(&(referenced.len() as u64).to_le_bytes())?;
        for id in &referenced {
            let len = blobs
                .stored_len(id)
                .ok_or_else(|| missing_body(id, io::ErrorKind::NotFound.into()))?;
            out.write_all(&id.0)?;
            out.write_all(&len.to_le_bytes())?;
            out.write_all(&[KIND_REFERENCE])?;
        }
        let hash = out.hasher.finalize();
        out.inner.write_all(hash.as_bytes())?;
        return out.inner.flush();
    }
    if version == VERSION_TRANSFER {
        return Err(invalid("a transfer stream is not a node's own snapshot"));
    }
    write_header(&mut out, version, meta_bytes.len() as u64)?;
    out.write_all(&meta_bytes)?;
    drop(meta_bytes);
    let blob_count = read_u64(&mut input)?;
    if blob_count > MAX_BLOBS {
        return Err(invalid("snapshot holds too many bodies"));
    }
    out.write_all(&blob_count.to_le_bytes())?;
    let mut previous = None;
    for _ in 0..blob_count {
        let (id, len, kind) = read_body_entry(&mut input, version, &mut previous)?;
        out.write_all(&id.0)?;
        if kind == KIND_INLINE {
            out.write_all(&len.to_le_bytes())?;
            if version != VERSION_INLINE_ONLY {
                out.write_all(&[KIND_INLINE])?;
            }
            let copied = io::copy(&mut (&mut input).take(len), &mut out)?;
            if copied != len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "snapshot ends inside a message body",
                ));
            }
        } else {
            copy_body_as(blobs, &id, version, &mut out)?;
        }
    }
    check_trailer(input)?;
    let hash = out.hasher.finalize();
    out.inner.write_all(hash.as_bytes())?;
    out.inner.flush()
}

/// The bodies a received stream (a transfer, version 4, or a stream of versions 1 and 2)
/// references that `blobs` does not hold, with their stored lengths, in id order. Reads the
/// stream once without decoding the state (chunk bytes and inlined bodies are skipped; the
/// restore checks them). A version 3 stream (a node's own snapshot) is refused: its chunks are
/// in another node's chunk store.
pub fn missing_bodies(input: &mut dyn Read, blobs: &BlobStore) -> io::Result<Vec<(BlobId, u64)>> {
    let mut input = io::BufReader::with_capacity(IO_BUFFER_BYTES, input);
    let (version, meta_bytes) = read_header_and_meta(&mut input)?;
    if version == VERSION {
        return Err(invalid(
            "a node's own snapshot (version 3) cannot be installed on another node",
        ));
    }
    if version == VERSION_TRANSFER {
        let manifest = decode_manifest(&meta_bytes)?;
        drop(meta_bytes);
        for chunk in manifest.chunks() {
            let skipped = io::copy(&mut (&mut input).take(chunk.len), &mut io::sink())?;
            if skipped != chunk.len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "snapshot ends inside a chunk",
                ));
            }
        }
    }
    let blob_count = read_u64(&mut input)?;
    if blob_count > MAX_BLOBS {
        return Err(invalid("snapshot holds too many bodies"));
    }
    let mut missing = Vec::new();
    let mut previous = None;
    for _ in 0..blob_count {
        let (id, len, kind) = read_body_entry(&mut input, version, &mut previous)?;
        if kind == KIND_INLINE {
            let skipped = io::copy(&mut (&mut input).take(len), &mut io::sink())?;
            if skipped != len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "snapshot ends inside a message body",
                ));
            }
        } else if !blobs.contains(&id) {
            missing.push((id, len));
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_from_before_the_queue_restores_with_an_empty_queue() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path().join("blobs")).unwrap();
        let blobs_chunks = ChunkStore::open(dir.path().join("chunks")).unwrap();
        let mut state = State::default();
        state.domains.insert("example.org".into());
        state.outbound.next_queue_id = 42;
        let mut legacy = Vec::new();
        write_snapshot_with(
            SnapshotMetaRef::V1(&state),
            &state.referenced_blobs(),
            &blobs,
            false,
            &mut legacy,
        )
        .unwrap();
        let restored = read_snapshot(&mut legacy.as_slice(), &blobs, &blobs_chunks, false).unwrap();
        assert_eq!(restored.domains, state.domains);
        assert_eq!(restored.outbound, super::super::queue::Outbound::default());
        // And the current format carries the outbound part.
        let mut current = Vec::new();
        write_snapshot(&state, &blobs_chunks, &mut current).unwrap();
        let restored =
            read_snapshot(&mut current.as_slice(), &blobs, &blobs_chunks, false).unwrap();
        assert_eq!(restored.outbound.next_queue_id, 42);
    }

    /// Snapshots of earlier versions (layout 1: every body inlined, no kind byte) still load,
    /// bodies included, and their transfer stream is a copy.
    #[test]
    fn a_version_1_snapshot_with_inlined_bodies_restores() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path().join("blobs")).unwrap();
        let blobs_chunks = ChunkStore::open(dir.path().join("chunks")).unwrap();
        let id = BlobId(*blake3::hash(b"body").as_bytes());
        let (_, compressed) = super::super::blob::compress(b"body").unwrap();
        blobs.write(&id, &compressed).unwrap();
        let state = State::default();
        let mut referenced = BTreeSet::new();
        referenced.insert(id);
        let mut v1 = Vec::new();
        write_snapshot_as(
            SnapshotMetaRef::V2(&state, &state.outbound),
            &referenced,
            &blobs,
            true,
            VERSION_INLINE_ONLY,
            &mut v1,
        )
        .unwrap();
        assert_eq!(&v1[16..20], &1u32.to_le_bytes());
        let other_dir = tempfile::tempdir().unwrap();
        let other = BlobStore::open(other_dir.path().join("blobs")).unwrap();
        let other_chunks = ChunkStore::open(other_dir.path().join("chunks")).unwrap();
        // The body is read from the stream (the state references none: the fixture's bodies
        // table is empty, so only the parse and the write are checked).
        read_snapshot(&mut v1.as_slice(), &other, &other_chunks, false).unwrap();
        assert!(other.contains(&id));
        let mut transfer = Vec::new();
        write_transfer(&mut v1.as_slice(), &other, &other_chunks, &mut transfer).unwrap();
        assert_eq!(transfer, v1);
        // A version 2 stream referencing a body the reader lacks is refused (not local) ...
        let mut refs = Vec::new();
        write_snapshot_as(
            SnapshotMetaRef::V2(&state, &state.outbound),
            &referenced,
            &blobs,
            false,
            VERSION_REFERENCES,
            &mut refs,
        )
        .unwrap();
        let empty_dir = tempfile::tempdir().unwrap();
        let empty = BlobStore::open(empty_dir.path().join("blobs")).unwrap();
        let empty_chunks = ChunkStore::open(empty_dir.path().join("chunks")).unwrap();
        assert!(read_snapshot(&mut refs.as_slice(), &empty, &empty_chunks, false).is_err());
        // ... and its transfer inlines the body, which then restores anywhere.
        let mut inlined = Vec::new();
        write_transfer(&mut refs.as_slice(), &blobs, &blobs_chunks, &mut inlined).unwrap();
        read_snapshot(&mut inlined.as_slice(), &empty, &empty_chunks, false).unwrap();
        assert!(empty.contains(&id));
    }

    fn v2_snapshot(state: &State, blobs: &BlobStore) -> Vec<u8> {
        let mut legacy = Vec::new();
        write_snapshot_with(
            SnapshotMetaRef::V2(state, &state.outbound),
            &state.referenced_blobs(),
            blobs,
            false,
            &mut legacy,
        )
        .unwrap();
        legacy
    }

    #[test]
    fn a_snapshot_from_before_the_srs_key_restores_without_one_and_the_key_survives() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path().join("blobs")).unwrap();
        let blobs_chunks = ChunkStore::open(dir.path().join("chunks")).unwrap();
        let mut state = State::default();
        state.outbound.next_queue_id = 7;
        state.outbound.srs_key = Some(SrsKey([9; 32]));
        let legacy = v2_snapshot(&state, &blobs);
        let restored = read_snapshot(&mut legacy.as_slice(), &blobs, &blobs_chunks, false).unwrap();
        assert_eq!(restored.outbound.next_queue_id, 7);
        assert_eq!(restored.outbound.srs_key, None);
        let mut current = Vec::new();
        write_snapshot(&state, &blobs_chunks, &mut current).unwrap();
        let restored =
            read_snapshot(&mut current.as_slice(), &blobs, &blobs_chunks, false).unwrap();
        assert_eq!(restored.outbound.srs_key, Some(SrsKey([9; 32])));
    }

    #[test]
    fn quota_settings_survive_a_snapshot_and_older_snapshots_get_the_default() {
        use super::super::quota::{AccountQuota, QuotaLimits, QuotaSetting};
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path().join("blobs")).unwrap();
        let blobs_chunks = ChunkStore::open(dir.path().join("chunks")).unwrap();
        let mut state = State::default();
        state.quotas.default = QuotaLimits::from_config(1000, 0);
        state.quotas.accounts.clear();
        let v2 = v2_snapshot(&state, &blobs);
        let restored = read_snapshot(&mut v2.as_slice(), &blobs, &blobs_chunks, false).unwrap();
        assert_eq!(restored.quotas.default, QuotaLimits::default());
        let mut current = Vec::new();
        write_snapshot(&state, &blobs_chunks, &mut current).unwrap();
        let restored =
            read_snapshot(&mut current.as_slice(), &blobs, &blobs_chunks, false).unwrap();
        assert_eq!(restored.quotas.default, state.quotas.default);
        // Settings of an account that is not in the state are dropped at restore.
        state.quotas.accounts.insert(
            7,
            AccountQuota {
                storage: QuotaSetting::Limit(5),
                messages: QuotaSetting::Default,
            },
        );
        let mut current = Vec::new();
        write_snapshot(&state, &blobs_chunks, &mut current).unwrap();
        let restored =
            read_snapshot(&mut current.as_slice(), &blobs, &blobs_chunks, false).unwrap();
        assert!(restored.quotas.accounts.is_empty());
    }
}
