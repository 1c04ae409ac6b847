//! A message body on its way into the store, held in memory only up to a small size.
//!
//! [`BodyWriter`] takes the bytes of a message as a session receives them: the first
//! [`BODY_MEMORY_BYTES_MAX`] stay in memory, the rest goes to an unlinked temporary file
//! (`O_TMPFILE` in the data folder's `tmp`, mode 0600, gone with its last handle), so a slow
//! client holding a large DATA costs a file, not memory. [`MessageBody`] is the result: the
//! in-memory head (where the header section is, and where trace headers are prepended) and
//! the spilled tail.
//!
//! The store hashes (BLAKE3) and compresses (zstd, streaming) a spilled body from the file
//! in [`BODY_READ_CHUNK_BYTES`] pieces, so the raw message is never whole in memory; the
//! compressed bytes are, because the Raft command carries them (followers and replays write
//! the body from the log). The one place that reads a spilled body back in one piece is DKIM
//! signing of an authenticated submission (the signer takes the whole message).

use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::BlobId;

/// Bytes of a message kept in memory before the rest goes to a temporary file. The header
/// section of a message must end within them (SMTP refuses a longer one: see
/// [`MessageBody::head_is_complete`]).
pub const BODY_MEMORY_BYTES_MAX: usize = 256 * 1024;

/// Buffer of the writes to the temporary file, and size of the pieces it is read back in.
pub const BODY_READ_CHUNK_BYTES: usize = 64 * 1024;

/// The name of the folder of temporary files in the data folder.
pub const TMP_DIR_NAME: &str = "tmp";

/// A message body: `head` in memory, then, past [`BODY_MEMORY_BYTES_MAX`], `tail_len` bytes
/// in an unlinked temporary file.
#[derive(Debug, Default)]
pub struct MessageBody {
    head: Vec<u8>,
    tail: Option<File>,
    tail_len: u64,
}

impl From<Vec<u8>> for MessageBody {
    fn from(head: Vec<u8>) -> MessageBody {
        MessageBody {
            head,
            tail: None,
            tail_len: 0,
        }
    }
}

impl From<&[u8]> for MessageBody {
    fn from(head: &[u8]) -> MessageBody {
        MessageBody::from(head.to_vec())
    }
}

impl MessageBody {
    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.head.len() + self.tail_len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The part held in memory (the whole body unless [`MessageBody::is_spilled`]).
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// Whether part of the body is in a temporary file.
    pub fn is_spilled(&self) -> bool {
        self.tail.is_some()
    }

    /// Puts `bytes` in front of the body (trace headers, a DKIM signature).
    pub fn prepend(&mut self, bytes: &[u8]) {
        let mut head = Vec::with_capacity(bytes.len() + self.head.len());
        head.extend_from_slice(bytes);
        head.extend_from_slice(&self.head);
        self.head = head;
    }

    /// Replaces the in-memory head by `head`: the same head with header fields changed
    /// (forged `Authentication-Results` removed). The header section must stay within it.
    pub fn set_head(&mut self, head: Vec<u8>) {
        self.head = head;
    }

    /// The whole body in one piece (reads a spilled tail back).
    pub fn to_vec(&self) -> io::Result<Vec<u8>> {
        let mut whole = Vec::with_capacity(self.len());
        whole.extend_from_slice(&self.head);
        if let Some(tail) = &self.tail {
            let start = whole.len();
            whole.resize(start + self.tail_len as usize, 0);
            tail.read_exact_at(&mut whole[start..], 0)?;
        }
        Ok(whole)
    }

    /// The BLAKE3 content address and the zstd compression of the body. A spilled tail is
    /// read in [`BODY_READ_CHUNK_BYTES`] pieces and compressed as a stream.
    pub fn hash_and_compress(&self) -> io::Result<(BlobId, Vec<u8>)> {
        let Some(tail) = &self.tail else {
            return super::blob::compress(&self.head);
        };
        let mut hasher = blake3::Hasher::new();
        let mut encoder = zstd::stream::Encoder::new(Vec::new(), super::blob::ZSTD_LEVEL)?;
        encoder.set_pledged_src_size(Some(self.len() as u64))?;
        encoder.include_contentsize(true)?;
        hasher.update(&self.head);
        encoder.write_all(&self.head)?;
        let mut chunk = vec![0u8; BODY_READ_CHUNK_BYTES];
        let mut offset = 0u64;
        while offset < self.tail_len {
            let n = (self.tail_len - offset).min(chunk.len() as u64) as usize;
            tail.read_exact_at(&mut chunk[..n], offset)?;
            hasher.update(&chunk[..n]);
            encoder.write_all(&chunk[..n])?;
            offset += n as u64;
        }
        let compressed = encoder.finish()?;
        Ok((BlobId(*hasher.finalize().as_bytes()), compressed))
    }

    /// Whether the header section (up to the first empty line) ends within the in-memory
    /// head, or the body is not spilled at all (then checks of the headers see them all).
    pub fn head_is_complete(&self) -> bool {
        !self.is_spilled() || header_section_end(&self.head).is_some()
    }
}

/// Where the header section of `message` ends (after its CRLF CRLF or LF LF), if it does.
fn header_section_end(message: &[u8]) -> Option<usize> {
    if message.starts_with(b"\r\n") {
        return Some(2);
    }
    if message.starts_with(b"\n") {
        return Some(1);
    }
    let mut index = 0;
    while let Some(newline) = message[index..].iter().position(|&byte| byte == b'\n') {
        let next = index + newline + 1;
        match message.get(next..) {
            Some([b'\r', b'\n', ..]) => return Some(next + 2),
            Some([b'\n', ..]) => return Some(next + 1),
            _ => index = next,
        }
    }
    None
}

/// Collects a body as it arrives: in memory up to `memory_bytes_max`, then in an unlinked
/// temporary file created in `spool_dir`.
#[derive(Debug)]
pub struct BodyWriter {
    head: Vec<u8>,
    tail: Option<BufWriter<File>>,
    tail_len: u64,
    memory_bytes_max: usize,
    spool_dir: Option<PathBuf>,
}

impl BodyWriter {
    /// A writer spilling past [`BODY_MEMORY_BYTES_MAX`] into `spool_dir` (the system's
    /// temporary folder when None).
    pub fn new(spool_dir: Option<PathBuf>) -> BodyWriter {
        BodyWriter::with_memory_limit(spool_dir, BODY_MEMORY_BYTES_MAX)
    }

    pub fn with_memory_limit(spool_dir: Option<PathBuf>, memory_bytes_max: usize) -> BodyWriter {
        BodyWriter {
            head: Vec::new(),
            tail: None,
            tail_len: 0,
            memory_bytes_max,
            spool_dir,
        }
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.head.len() + self.tail_len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `bytes`. The file write goes to the page cache through a
    /// [`BODY_READ_CHUNK_BYTES`] buffer (no fsync): a short blocking call.
    pub fn write(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        if self.tail.is_none() {
            let room = self.memory_bytes_max.saturating_sub(self.head.len());
            let take = room.min(bytes.len());
            self.head.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if bytes.is_empty() {
                return Ok(());
            }
            let file = open_spool_file(self.spool_dir.as_deref())?;
            self.tail = Some(BufWriter::with_capacity(BODY_READ_CHUNK_BYTES, file));
        }
        if let Some(tail) = self.tail.as_mut() {
            tail.write_all(bytes)?;
            self.tail_len += bytes.len() as u64;
        }
        Ok(())
    }

    /// The body written.
    pub fn finish(self) -> io::Result<MessageBody> {
        let tail = match self.tail {
            Some(writer) => {
                let mut file = writer.into_inner().map_err(|error| error.into_error())?;
                file.seek(SeekFrom::Start(0))?;
                Some(file)
            }
            None => None,
        };
        Ok(MessageBody {
            head: self.head,
            tail,
            tail_len: self.tail_len,
        })
    }
}

/// An unlinked file, mode 0600, in `dir` (created 0700 if missing).
fn open_spool_file(dir: Option<&Path>) -> io::Result<File> {
    let file = match dir {
        Some(dir) => {
            if !dir.is_dir() {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)?;
            }
            tempfile::tempfile_in(dir)
        }
        None => tempfile::tempfile(),
    }?;
    // O_TMPFILE files take 0666 minus the umask: no name reaches them, but keep 0600 anyway.
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// Reads the whole of `file` (used by tests of spilled files).
#[cfg(test)]
fn read_file(mut file: &File) -> io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(bytes: &[u8], memory: usize, pieces: usize) -> MessageBody {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = BodyWriter::with_memory_limit(Some(dir.path().join("tmp")), memory);
        for piece in bytes.chunks(pieces.max(1)) {
            writer.write(piece).unwrap();
        }
        assert_eq!(writer.len(), bytes.len());
        writer.finish().unwrap()
    }

    #[test]
    fn a_small_body_stays_in_memory() {
        let body = written(b"Subject: x\r\n\r\nhello\r\n", 1024, 3);
        assert!(!body.is_spilled());
        assert_eq!(body.head(), b"Subject: x\r\n\r\nhello\r\n");
        assert!(body.head_is_complete());
    }

    #[test]
    fn a_large_body_spills_and_reads_back_unchanged() {
        let message: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut body = written(&message, 1000, 777);
        assert!(body.is_spilled());
        assert_eq!(body.head().len(), 1000);
        assert_eq!(body.len(), message.len());
        body.prepend(b"Received: x\r\n");
        let mut expected = b"Received: x\r\n".to_vec();
        expected.extend_from_slice(&message);
        assert_eq!(body.to_vec().unwrap(), expected);
        // Streamed hash and compression agree with the in-memory ones.
        let (id, compressed) = body.hash_and_compress().unwrap();
        let (expected_id, _) = super::super::blob::compress(&expected).unwrap();
        assert_eq!(id, expected_id);
        let raw = zstd::bulk::decompress(&compressed, expected.len()).unwrap();
        assert_eq!(raw, expected);
        // The file position did not matter.
        let tail = body.tail.as_ref().unwrap();
        assert_eq!(read_file(tail).unwrap().len(), message.len() - 1000);
    }

    #[test]
    fn the_spill_file_has_no_name_and_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("tmp");
        let mut writer = BodyWriter::with_memory_limit(Some(spool.clone()), 4);
        writer.write(b"0123456789").unwrap();
        let body = writer.finish().unwrap();
        assert!(body.is_spilled());
        assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
        let mode = body
            .tail
            .as_ref()
            .unwrap()
            .metadata()
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(&spool).unwrap().permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
    }

    #[test]
    fn the_header_section_end_is_found() {
        for (message, end) in [
            (&b"A: b\r\n\r\nbody"[..], Some(8)),
            (b"A: b\n\nbody", Some(6)),
            (b"\r\nbody", Some(2)),
            (b"A: b\r\nC: d\r\n", None),
        ] {
            assert_eq!(header_section_end(message), end, "{message:?}");
        }
    }
}
