//! The snapshot file format and its atomic replacement. Blocking IO: call from
//! `spawn_blocking`.
//!
//! Layout of a snapshot file (the same bytes travel to followers as openraft's snapshot data):
//! - 8 bytes: [`MAGIC`];
//! - 4 bytes: big-endian format version ([`FORMAT_VERSION`]);
//! - 4 bytes: big-endian length of the metadata (at most [`MAX_META_BYTES`]);
//! - the metadata: openraft's `SnapshotMeta` (last applied log id, membership, snapshot id) as
//!   JSON;
//! - the application's snapshot stream compressed as one zstd frame with a content checksum.
//!
//! A node keeps one snapshot, `current.snap` in its snapshot folder. A new one is written to a
//! temporary file, fsync'd, renamed over it, and the folder is fsync'd.
//!
//! What a follower receives is not `current.snap` itself: the application's stream of its own
//! snapshot may refer to data it keeps elsewhere (the mail node's metadata chunks), so the
//! leader writes a transfer file once per kept snapshot ([`open_transfer`], the same layout,
//! the stream passed through [`AppStateMachine::write_transfer`]; the mail node's carries the
//! chunks and references to the bodies, which the follower fetches, see `raft::fetch`), named
//! `tmp-transfer-<snapshot id>.snap` so that it is removed at the next open, and removed when
//! a newer snapshot is kept.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::app::{AppStateMachine, SnapshotBuilder};

use super::types::SnapshotMeta;

/// Identifies a kermail snapshot file.
pub const MAGIC: &[u8; 8] = b"KMLSNAP\0";
/// Version of the layout above; bump it when the layout changes.
pub const FORMAT_VERSION: u32 = 1;
/// Bound on the metadata (a membership of a few nodes is a few hundred bytes).
pub const MAX_META_BYTES: u32 = 1 << 20;
/// zstd level for the application stream: fast, and most mail bodies are stored compressed
/// already by the application.
pub const ZSTD_LEVEL: i32 = 3;
/// The name of the snapshot a node keeps.
pub const CURRENT_FILE_NAME: &str = "current.snap";
/// Prefix of files being written; leftovers from a crash are removed on open.
pub const TEMP_FILE_PREFIX: &str = "tmp-";
/// Buffer size for reading and writing snapshot files.
const IO_BUFFER_BYTES: usize = 256 * 1024;

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// The path of the snapshot a node keeps in `dir`.
pub fn current_path(dir: &Path) -> PathBuf {
    dir.join(CURRENT_FILE_NAME)
}

/// Creates `dir` if needed and removes temporary files left by a crash.
pub fn prepare_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    // The folder's own entry must survive a crash before a snapshot is renamed into it.
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(parent)?.sync_all()?;
    }
    for item in fs::read_dir(dir)? {
        let item = item?;
        if item
            .file_name()
            .to_string_lossy()
            .starts_with(TEMP_FILE_PREFIX)
        {
            fs::remove_file(item.path())?;
        }
    }
    Ok(())
}

/// A fresh temporary path in `dir`.
pub fn temp_path(dir: &Path) -> PathBuf {
    dir.join(format!(
        "{TEMP_FILE_PREFIX}{:016x}.snap",
        rand::random::<u64>()
    ))
}

/// Writes the header.
pub fn write_header(out: &mut dyn Write, meta: &SnapshotMeta) -> io::Result<()> {
    let meta_bytes = serde_json::to_vec(meta).map_err(io::Error::other)?;
    let meta_len = u32::try_from(meta_bytes.len())
        .ok()
        .filter(|len| *len <= MAX_META_BYTES)
        .ok_or_else(|| {
            invalid(format!(
                "snapshot metadata of {} bytes is too large",
                meta_bytes.len()
            ))
        })?;
    out.write_all(MAGIC)?;
    out.write_all(&FORMAT_VERSION.to_be_bytes())?;
    out.write_all(&meta_len.to_be_bytes())?;
    out.write_all(&meta_bytes)
}

/// Reads and checks the header, leaving `input` at the start of the zstd stream.
pub fn read_header(input: &mut dyn Read) -> io::Result<SnapshotMeta> {
    let mut magic = [0u8; 8];
    input.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(invalid(
            "not a kermail snapshot file (bad magic)".to_string(),
        ));
    }
    let mut word = [0u8; 4];
    input.read_exact(&mut word)?;
    let version = u32::from_be_bytes(word);
    if version != FORMAT_VERSION {
        return Err(invalid(format!(
            "snapshot format version {version} is not supported (this build reads {FORMAT_VERSION})"
        )));
    }
    input.read_exact(&mut word)?;
    let meta_len = u32::from_be_bytes(word);
    if meta_len > MAX_META_BYTES {
        return Err(invalid(format!(
            "snapshot metadata of {meta_len} bytes is too large"
        )));
    }
    let mut meta_bytes = vec![0u8; meta_len as usize];
    input.read_exact(&mut meta_bytes)?;
    serde_json::from_slice(&meta_bytes).map_err(|e| invalid(format!("bad snapshot metadata: {e}")))
}

/// Reads the metadata of the snapshot kept in `dir`, if there is one.
pub fn read_current_meta(dir: &Path) -> io::Result<Option<SnapshotMeta>> {
    let file = match File::open(current_path(dir)) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    read_header(&mut BufReader::new(file)).map(Some)
}

/// Writes a snapshot to a new temporary file in `dir` and fsyncs it; returns its path.
pub fn write_temp(
    dir: &Path,
    meta: &SnapshotMeta,
    builder: &dyn SnapshotBuilder,
) -> io::Result<PathBuf> {
    let path = temp_path(dir);
    let result = (|| {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        let mut out = BufWriter::with_capacity(IO_BUFFER_BYTES, file);
        write_header(&mut out, meta)?;
        let mut encoder = zstd::Encoder::new(out, ZSTD_LEVEL)?;
        encoder.include_checksum(true)?;
        builder.write_to(&mut encoder)?;
        let out = encoder.finish()?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}

/// Restores `app` from a snapshot received from the leader (an unlinked file), checking that
/// its header names `meta`'s last log id.
pub fn restore_received(
    received: &mut File,
    meta: &SnapshotMeta,
    app: &dyn AppStateMachine,
) -> io::Result<()> {
    received.seek(SeekFrom::Start(0))?;
    let mut input = BufReader::with_capacity(IO_BUFFER_BYTES, received);
    let sent_meta = read_header(&mut input)?;
    if sent_meta.last_log_id != meta.last_log_id {
        return Err(invalid(format!(
            "received snapshot is for {:?}, expected {:?}",
            sent_meta.last_log_id, meta.last_log_id
        )));
    }
    let mut decoder = zstd::Decoder::with_buffer(input)?;
    app.restore(&mut decoder, false)?;
    io::copy(&mut decoder, &mut io::sink())?;
    Ok(())
}

/// The objects a snapshot received from the leader references that this node lacks
/// ([`AppStateMachine::missing_objects`] on its application stream), checking that its header
/// names `meta`'s last log id.
pub fn missing_objects(
    received: &mut File,
    meta: &SnapshotMeta,
    app: &dyn AppStateMachine,
) -> io::Result<Vec<crate::app::ObjectRef>> {
    received.seek(SeekFrom::Start(0))?;
    let mut input = BufReader::with_capacity(IO_BUFFER_BYTES, received);
    let sent_meta = read_header(&mut input)?;
    if sent_meta.last_log_id != meta.last_log_id {
        return Err(invalid(format!(
            "received snapshot is for {:?}, expected {:?}",
            sent_meta.last_log_id, meta.last_log_id
        )));
    }
    let mut decoder = zstd::Decoder::with_buffer(input)?;
    app.missing_objects(&mut decoder)
}

/// Restores `app` from the snapshot file at `path` and returns its metadata. The whole zstd
/// frame is read, so its checksum is verified.
pub fn restore(path: &Path, app: &dyn AppStateMachine, local: bool) -> io::Result<SnapshotMeta> {
    let file = File::open(path)?;
    let mut input = BufReader::with_capacity(IO_BUFFER_BYTES, file);
    let meta = read_header(&mut input)?;
    let mut decoder = zstd::Decoder::with_buffer(input)?;
    app.restore(&mut decoder, local)?;
    io::copy(&mut decoder, &mut io::sink())?;
    Ok(meta)
}

/// Makes the temporary snapshot at `temp` the one kept in `dir`: rename over the previous one,
/// then fsync the folder so that the rename survives a crash.
pub fn commit(dir: &Path, temp: &Path) -> io::Result<()> {
    fs::rename(temp, current_path(dir))?;
    File::open(dir)?.sync_all()
}

/// Opens the snapshot kept in `dir` for reading (header included: that is what followers get).
pub fn open_current(dir: &Path) -> io::Result<File> {
    File::open(current_path(dir))
}

/// A new anonymous read-write file in `dir` to receive a snapshot from the leader: it is
/// unlinked at once, so nothing is left behind whatever happens to the transfer.
pub fn receiving_file(dir: &Path) -> io::Result<File> {
    let path = temp_path(dir);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    fs::remove_file(&path)?;
    Ok(file)
}

/// Prefix of the transfer file written for followers (see the module comment).
const TRANSFER_FILE_PREFIX: &str = "tmp-transfer-";

/// The transfer file of the snapshot `snapshot_id` in `dir`.
pub fn transfer_path(dir: &Path, snapshot_id: &str) -> PathBuf {
    // Snapshot ids are made of digits, letters and dashes; keep the name safe regardless.
    let safe: String = snapshot_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("{TRANSFER_FILE_PREFIX}{safe}.snap"))
}

/// Opens the transfer file of the kept snapshot, writing it first if it is not there: the
/// header of `current.snap`, then the application's transfer stream of its content.
pub fn open_transfer(
    dir: &Path,
    meta: &SnapshotMeta,
    app: &dyn AppStateMachine,
) -> io::Result<File> {
    let path = transfer_path(dir, &meta.snapshot_id);
    match File::open(&path) {
        Ok(file) => return Ok(file),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let temp = temp_path(dir);
    let result = (|| {
        let current = File::open(current_path(dir))?;
        let mut input = BufReader::with_capacity(IO_BUFFER_BYTES, current);
        let kept_meta = read_header(&mut input)?;
        if kept_meta.snapshot_id != meta.snapshot_id {
            return Err(invalid(format!(
                "the kept snapshot is {}, not {}",
                kept_meta.snapshot_id, meta.snapshot_id
            )));
        }
        let mut decoder = zstd::Decoder::with_buffer(input)?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)?;
        let mut out = BufWriter::with_capacity(IO_BUFFER_BYTES, file);
        write_header(&mut out, meta)?;
        let mut encoder = zstd::Encoder::new(out, ZSTD_LEVEL)?;
        encoder.include_checksum(true)?;
        app.write_transfer(&mut decoder, &mut encoder)?;
        let out = encoder.finish()?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        // Not needed across a crash (it is removed at open): no fsync.
        drop(file);
        fs::rename(&temp, &path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&temp);
        return Err(e);
    }
    File::open(&path)
}

/// Removes the transfer files of snapshots other than `keep_id`.
pub fn remove_stale_transfers(dir: &Path, keep_id: Option<&str>) -> io::Result<()> {
    let keep = keep_id.map(|id| transfer_path(dir, id));
    for item in fs::read_dir(dir)? {
        let item = item?;
        let name = item.file_name();
        if name.to_string_lossy().starts_with(TRANSFER_FILE_PREFIX)
            && keep.as_deref() != Some(item.path().as_path())
        {
            fs::remove_file(item.path())?;
        }
    }
    Ok(())
}
