//! COMPRESS=DEFLATE (RFC 4978): after `tag COMPRESS DEFLATE` is answered OK, both directions
//! of the connection are raw deflate (RFC 1951, no zlib header).
//!
//! As in Dovecot, the command is accepted once logged in (and only once per connection); the
//! session answers it ([`Action::Compress`](super::session::Action::Compress)) and the driver
//! wraps its stream, TLS or plain, in a [`Deflate`] stream. Every response the driver writes
//! is followed by a flush, which ends the compressed block with a sync flush
//! (`Z_SYNC_FLUSH`), so the client can decompress each response as soon as it arrives.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Compressed bytes read from the socket at a time.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// A stream whose bytes are deflated on the way out and inflated on the way in.
pub struct Deflate<S> {
    inner: S,
    deflate: Compress,
    inflate: Decompress,
    /// Compressed input not inflated yet: `input[input_pos..]`.
    input: Vec<u8>,
    input_pos: usize,
    /// Compressed output not written to `inner` yet: `output[output_pos..]`.
    output: Vec<u8>,
    output_pos: usize,
    /// The peer closed its side.
    eof: bool,
    /// Bytes were deflated since the last sync flush.
    dirty: bool,
}

impl<S> Deflate<S> {
    pub fn new(inner: S) -> Deflate<S> {
        Deflate {
            inner,
            deflate: Compress::new(Compression::default(), false),
            inflate: Decompress::new(false),
            input: Vec::new(),
            input_pos: 0,
            output: Vec::new(),
            output_pos: 0,
            eof: false,
            dirty: false,
        }
    }

    /// Deflates `data` (all of it) into `output`.
    fn deflate_into_output(&mut self, data: &[u8], flush: FlushCompress) -> io::Result<()> {
        let mut consumed = 0usize;
        loop {
            if self.output.capacity() - self.output.len() < 1024 {
                self.output.reserve(data.len() - consumed + 4096);
            }
            let before_in = self.deflate.total_in();
            let before_len = self.output.len();
            self.deflate
                .compress_vec(&data[consumed..], &mut self.output, flush)
                .map_err(io::Error::other)?;
            consumed += (self.deflate.total_in() - before_in) as usize;
            let room_left = self.output.capacity() > self.output.len();
            let progressed = self.output.len() > before_len;
            // Done when all input is taken and the stream stopped writing short of the room
            // it had (a flush is complete then).
            if consumed == data.len() && (room_left || !progressed) {
                return Ok(());
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> Deflate<S> {
    /// Writes the pending compressed output to `inner`.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.output_pos < self.output.len() {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.output[self.output_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.output_pos += n;
        }
        self.output.clear();
        self.output_pos = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Deflate<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if this.input_pos < this.input.len() || this.eof {
                let unfilled = buf.initialize_unfilled();
                let before_in = this.inflate.total_in();
                let before_out = this.inflate.total_out();
                let status = this
                    .inflate
                    .decompress(
                        &this.input[this.input_pos..],
                        unfilled,
                        FlushDecompress::None,
                    )
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                let consumed = (this.inflate.total_in() - before_in) as usize;
                this.input_pos += consumed;
                let produced = (this.inflate.total_out() - before_out) as usize;
                buf.advance(produced);
                if produced > 0 {
                    return Poll::Ready(Ok(()));
                }
                if this.eof || status == Status::StreamEnd {
                    // End of input: a read of nothing.
                    return Poll::Ready(Ok(()));
                }
                if this.input_pos < this.input.len() && consumed > 0 && status != Status::BufError {
                    continue;
                }
            }
            // Need more compressed bytes (keeping the ones not inflated yet).
            if this.input_pos > 0 {
                this.input.drain(..this.input_pos);
                this.input_pos = 0;
            }
            let start = this.input.len();
            this.input.resize(start + READ_CHUNK_BYTES, 0);
            let mut read = ReadBuf::new(&mut this.input[start..]);
            let polled = Pin::new(&mut this.inner).poll_read(cx, &mut read);
            let n = read.filled().len();
            this.input.truncate(start + n);
            ready!(polled)?;
            if n == 0 {
                this.eof = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Deflate<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Bounded buffering: what was compressed before goes out first.
        if this.output.len() - this.output_pos > READ_CHUNK_BYTES {
            ready!(this.poll_drain(cx))?;
        }
        this.deflate_into_output(data, FlushCompress::None)?;
        this.dirty = true;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.dirty {
            // End the block with a sync flush, so the peer can inflate all of it now.
            this.deflate_into_output(&[], FlushCompress::Sync)?;
            this.dirty = false;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn both_directions_round_trip_through_raw_deflate() {
        let (a, b) = tokio::io::duplex(1024);
        let mut a = Deflate::new(a);
        let mut b = Deflate::new(b);
        let message: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = message.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&sent).await.unwrap();
            a.flush().await.unwrap();
            a.write_all(b"second\r\n").await.unwrap();
            a.flush().await.unwrap();
            a
        });
        let mut got = vec![0u8; message.len() + 8];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..message.len()], &message[..]);
        assert_eq!(&got[message.len()..], b"second\r\n");
        let _a = writer.await.unwrap();
    }
}
