//! Snapshot stream: the whole mail state and a reference to every body, so that a snapshot
//! costs the metadata only (bodies are immutable, content-addressed and already in the pack
//! files); the stream sent to a follower inlines the bodies' bytes.
//!
//! Layout (integers little-endian):
//! ```text
//! MAGIC (16 bytes) | version u32 = 2
//! meta_len u64 | meta: bincode of SnapshotMeta (varint, limited to meta_len)
//! blob_count u64 | blob_count × ( blob id [32] | len u64 | kind u8 | zstd bytes [len] if kind = 1 )
//!                  ids ascending; kind 0: a reference to a body in this node's packs,
//!                  kind 1: the body's compressed bytes follow
//! BLAKE3 of every byte above [32]
//! ```
//! Version 1 (still read) has no kind byte: every body's bytes follow its length.
//!
//! A node's own snapshot ([`write_snapshot`]) holds references only: building it writes the
//! metadata, whatever the amount of mail, and restoring it at a restart reads the metadata and
//! touches no body. Before it is kept, the packs are fsynced (the log entries that carried the
//! bodies may be purged after it), and the bodies it references are pinned in the blob store
//! until a newer snapshot is kept, so that compaction never drops a body it needs. The stream
//! sent to a follower ([`write_transfer`]) is the same with every body inlined; the receiver
//! writes only the bodies its packs lack.
//!
//! Reading is bounded everywhere: a corrupt or hostile stream gives an error, never a panic or
//! an allocation sized by the stream. The state is replaced only after the trailing hash and
//! the state's invariants have been checked; bodies written before a failure are
//! content-addressed and harmless (the next restore's sweep removes them).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::sync::Arc;

use bincode::Options;
use serde::{Deserialize, Serialize};

use super::blob::{BlobStore, ReadGuard};
use super::command::SrsKey;
use super::command::MAX_COMMAND_BYTES;
use super::imap_state::ImapState;
use super::queue::Outbound;
use super::quota::Quotas;
use super::state::State;
use super::BlobId;

pub const MAGIC: &[u8; 16] = b"kermail-snapshot";
/// The version written. 1: every body inlined (read for snapshots of earlier versions).
pub const VERSION: u32 = 2;
const VERSION_INLINE_ONLY: u32 = 1;
/// Kind byte of a body entry (version 2).
const KIND_REFERENCE: u8 = 0;
const KIND_INLINE: u8 = 1;
/// The encoded metadata (accounts, mailboxes, message lists): 1 GiB is about ten million
/// messages, far above a small provider.
pub const MAX_META_BYTES: u64 = 1024 * 1024 * 1024;
/// Distinct bodies in one snapshot.
pub const MAX_BLOBS: u64 = 100_000_000;

/// V1: before the outbound queue (its state restores empty). V2: the state and the outbound
/// part (queue, DKIM keys), which `State` does not serialize itself.
#[derive(Serialize, Deserialize)]
enum SnapshotMeta {
    V1(State),
    V2(State, Outbound),
    /// V2 plus the SRS key (issue 10) and the quota settings (usage is derived at restore).
    V3(State, Outbound, Option<SrsKey>, Quotas),
    /// V3 plus the replicated IMAP state (issue 13, `\Recent` boundaries).
    V4(State, Outbound, Option<SrsKey>, Quotas, ImapState),
}

#[derive(Serialize)]
enum SnapshotMetaRef<'a> {
    /// Written only by the compatibility test.
    #[cfg_attr(not(test), allow(dead_code))]
    V1(&'a State),
    /// Written only by the compatibility tests.
    #[cfg_attr(not(test), allow(dead_code))]
    V2(&'a State, &'a Outbound),
    /// Written only by the compatibility tests (and keeps the variants numbered like
    /// `SnapshotMeta`'s).
    #[cfg_attr(not(test), allow(dead_code))]
    V3(&'a State, &'a Outbound, &'a Option<SrsKey>, &'a Quotas),
    V4(
        &'a State,
        &'a Outbound,
        &'a Option<SrsKey>,
        &'a Quotas,
        &'a ImapState,
    ),
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
    pub(super) _guard: ReadGuard,
    /// Bodies still to be written after a storage failure (the app retries them first).
    pub(super) machine: std::sync::Weak<super::MailStateMachine>,
    /// The bodies the view references, computed by the first write.
    pub(super) referenced: std::sync::OnceLock<BTreeSet<BlobId>>,
}

impl Builder {
    fn referenced(&self) -> &BTreeSet<BlobId> {
        self.referenced
            .get_or_init(|| self.state.referenced_blobs())
    }
}

impl kermail_cluster::SnapshotBuilder for Builder {
    fn write_to(&self, out: &mut dyn Write) -> io::Result<()> {
        if let Some(machine) = self.machine.upgrade() {
            // A body whose write failed must reach the packs before a snapshot that only
            // references it lets the log that carries it be purged.
            machine.retry_unwritten_bodies()?;
        }
        let referenced = self.referenced();
        // Kept pinned from now on (with the previous snapshot's, until this one is kept).
        self.blobs.pin(referenced.iter().copied());
        self.blobs.sync()?;
        write_snapshot_with(
            SnapshotMetaRef::V4(
                &self.state,
                &self.state.outbound,
                &self.state.outbound.srs_key,
                &self.state.quotas,
                &self.state.imap,
            ),
            referenced,
            &self.blobs,
            false,
            out,
        )
    }

    fn kept(&self) {
        self.blobs.replace_pins(self.referenced().clone());
    }
}

/// Writes the state and references to its bodies (this node's own snapshot).
#[cfg(test)]
pub fn write_snapshot(state: &State, blobs: &BlobStore, out: &mut dyn Write) -> io::Result<()> {
    write_snapshot_with(
        SnapshotMetaRef::V4(
            state,
            &state.outbound,
            &state.outbound.srs_key,
            &state.quotas,
            &state.imap,
        ),
        &state.referenced_blobs(),
        blobs,
        false,
        out,
    )
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
fn copy_body(blobs: &BlobStore, id: &BlobId, out: &mut dyn Write) -> io::Result<u64> {
    copy_body_as(blobs, id, VERSION, out)
}

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

fn write_snapshot_with(
    meta: SnapshotMetaRef<'_>,
    referenced: &BTreeSet<BlobId>,
    blobs: &BlobStore,
    inline: bool,
    out: &mut dyn Write,
) -> io::Result<()> {
    write_snapshot_as(meta, referenced, blobs, inline, VERSION, out)
}

/// [`write_snapshot_with`] in a given layout version (1 only for the compatibility test).
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
    if version != VERSION && version != VERSION_INLINE_ONLY {
        return Err(invalid(format!(
            "snapshot version {version} is not supported (this node reads 1 and {VERSION})"
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
/// snapshot was written); otherwise it is an error.
pub fn read_snapshot(input: &mut dyn Read, blobs: &BlobStore, local: bool) -> io::Result<State> {
    let mut input = HashingReader {
        inner: io::BufReader::with_capacity(IO_BUFFER_BYTES, input),
        hasher: blake3::Hasher::new(),
    };
    let (version, meta_bytes) = read_header_and_meta(&mut input)?;
    let meta: SnapshotMeta = meta_codec(meta_bytes.len() as u64)
        .deserialize(&meta_bytes)
        .map_err(|e| invalid(format!("snapshot metadata is corrupt: {e}")))?;
    drop(meta_bytes);
    let mut state = match meta {
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
            // Usage is derived: it is recomputed from the messages below.
            state.quotas = quotas;
            state
        }
        SnapshotMeta::V4(mut state, outbound, srs_key, quotas, imap) => {
            state.outbound = outbound;
            state.outbound.srs_key = srs_key;
            state.outbound.rebuild_due();
            state.quotas = quotas;
            state.imap = imap;
            state
        }
    };

    let blob_count = read_u64(&mut input)?;
    if blob_count > MAX_BLOBS {
        return Err(invalid("snapshot holds too many bodies"));
    }
    let mut stored_sizes: BTreeMap<BlobId, u64> = BTreeMap::new();
    let mut previous: Option<BlobId> = None;
    let mut missing = Vec::new();
    for _ in 0..blob_count {
        let (id, len, kind) = read_body_entry(&mut input, version, &mut previous)?;
        if kind == KIND_INLINE {
            blobs.write_from(&id, len, &mut input)?;
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
    check_trailer(input)?;
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
    Ok(state)
}

/// Turns this node's own snapshot stream (`local`, references) into the stream a follower
/// installs: the same metadata, every body inlined from the packs. A version 1 stream (bodies
/// inlined already) is copied as it is. The input's checksum is verified on the way.
pub fn write_transfer(
    local: &mut dyn Read,
    blobs: &BlobStore,
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
            copy_body(blobs, &id, &mut out)?;
        }
    }
    check_trailer(input)?;
    let hash = out.hasher.finalize();
    out.inner.write_all(hash.as_bytes())?;
    out.inner.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_from_before_the_queue_restores_with_an_empty_queue() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path().join("blobs")).unwrap();
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
        let restored = read_snapshot(&mut legacy.as_slice(), &blobs, false).unwrap();
        assert_eq!(restored.domains, state.domains);
        assert_eq!(restored.outbound, super::super::queue::Outbound::default());
        // And the current format carries the outbound part.
        let mut current = Vec::new();
        write_snapshot(&state, &blobs, &mut current).unwrap();
        let restored = read_snapshot(&mut current.as_slice(), &blobs, false).unwrap();
        assert_eq!(restored.outbound.next_queue_id, 42);
    }

    /// The current metadata carries the IMAP state (`\Recent` boundaries); a V3 snapshot,
    /// written before it existed, loads with every boundary at 0.
    #[test]
    fn the_imap_state_travels_and_a_v3_snapshot_loads_without_it() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path().join("blobs")).unwrap();
        let mut state = State::default();
        state.domains.insert("example.org".into());
        state.imap.recent_boundary.insert((3, 7), 42);
        let mut current = Vec::new();
        write_snapshot(&state, &blobs, &mut current).unwrap();
        let restored = read_snapshot(&mut current.as_slice(), &blobs, false).unwrap();
        assert_eq!(restored.imap, state.imap);
        let mut v3 = Vec::new();
        write_snapshot_with(
            SnapshotMetaRef::V3(
                &state,
                &state.outbound,
                &state.outbound.srs_key,
                &state.quotas,
            ),
            &state.referenced_blobs(),
            &blobs,
            false,
            &mut v3,
        )
        .unwrap();
        let restored = read_snapshot(&mut v3.as_slice(), &blobs, false).unwrap();
        assert_eq!(restored.domains, state.domains);
        assert_eq!(restored.imap, ImapState::default());
    }

    /// Snapshots of earlier versions (layout 1: every body inlined, no kind byte) still load,
    /// bodies included, and their transfer stream is a copy.
    #[test]
    fn a_version_1_snapshot_with_inlined_bodies_restores() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path().join("blobs")).unwrap();
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
        // The body is read from the stream (the state references none: the fixture's bodies
        // table is empty, so only the parse and the write are checked).
        read_snapshot(&mut v1.as_slice(), &other, false).unwrap();
        assert!(other.contains(&id));
        let mut transfer = Vec::new();
        write_transfer(&mut v1.as_slice(), &other, &mut transfer).unwrap();
        assert_eq!(transfer, v1);
        // A version 2 stream referencing a body the reader lacks is refused (not local) ...
        let mut refs = Vec::new();
        write_snapshot_as(
            SnapshotMetaRef::V2(&state, &state.outbound),
            &referenced,
            &blobs,
            false,
            VERSION,
            &mut refs,
        )
        .unwrap();
        let empty_dir = tempfile::tempdir().unwrap();
        let empty = BlobStore::open(empty_dir.path().join("blobs")).unwrap();
        assert!(read_snapshot(&mut refs.as_slice(), &empty, false).is_err());
        // ... and its transfer inlines the body, which then restores anywhere.
        let mut inlined = Vec::new();
        write_transfer(&mut refs.as_slice(), &blobs, &mut inlined).unwrap();
        read_snapshot(&mut inlined.as_slice(), &empty, false).unwrap();
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
        let mut state = State::default();
        state.outbound.next_queue_id = 7;
        state.outbound.srs_key = Some(SrsKey([9; 32]));
        let legacy = v2_snapshot(&state, &blobs);
        let restored = read_snapshot(&mut legacy.as_slice(), &blobs, false).unwrap();
        assert_eq!(restored.outbound.next_queue_id, 7);
        assert_eq!(restored.outbound.srs_key, None);
        let mut current = Vec::new();
        write_snapshot(&state, &blobs, &mut current).unwrap();
        let restored = read_snapshot(&mut current.as_slice(), &blobs, false).unwrap();
        assert_eq!(restored.outbound.srs_key, Some(SrsKey([9; 32])));
    }

    #[test]
    fn quota_settings_survive_a_snapshot_and_older_snapshots_get_the_default() {
        use super::super::quota::{AccountQuota, QuotaLimits, QuotaSetting};
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path().join("blobs")).unwrap();
        let mut state = State::default();
        state.quotas.default = QuotaLimits::from_config(1000, 0);
        state.quotas.accounts.clear();
        let v2 = v2_snapshot(&state, &blobs);
        let restored = read_snapshot(&mut v2.as_slice(), &blobs, false).unwrap();
        assert_eq!(restored.quotas.default, QuotaLimits::default());
        let mut current = Vec::new();
        write_snapshot(&state, &blobs, &mut current).unwrap();
        let restored = read_snapshot(&mut current.as_slice(), &blobs, false).unwrap();
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
        write_snapshot(&state, &blobs, &mut current).unwrap();
        let restored = read_snapshot(&mut current.as_slice(), &blobs, false).unwrap();
        assert!(restored.quotas.accounts.is_empty());
    }
}
