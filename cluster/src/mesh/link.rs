//! The tokio driver of one established link: a writer task that sends by channel priority and
//! a reader that decrypts, reassembles and dispatches. All wire rules live in `codec`; this file
//! only moves bytes, keeps nonces and timers, and reports to the node.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use snow::StatelessTransportState;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use super::codec::{
    decode_frame, frame_header, CodecError, MessageKind, Reassembler, Record, Splitter,
    CHANNEL_COUNT, FRAME_LEN_BYTES, MAX_RECORD_BYTES, NOISE_TAG_BYTES,
};
use super::handshake::Established;
use super::identity::KEY_BYTES;
use super::node::Inner;
use super::Channel;

/// Encrypted bytes gathered before one socket write; bounds how long a raft frame waits behind
/// bulk frames already sealed.
const WRITE_BATCH_BYTES: usize = 128 * 1024;
/// Initial read buffer.
const READ_BUFFER_BYTES: usize = 256 * 1024;
/// Internal records (pings, pongs, routes) queued per link.
const RECORD_QUEUE: usize = 64;
/// Relay records queued per link.
const RELAY_QUEUE: usize = 64;

/// How a link reaches its peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LinkPath {
    Direct(std::net::SocketAddr),
    Relayed(String),
}

/// An application message waiting to be sent.
pub(crate) struct Outgoing {
    pub(crate) kind: MessageKind,
    pub(crate) body: Bytes,
}

/// Counters of one peer, kept across its links.
#[derive(Debug, Default)]
pub(crate) struct PeerStats {
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) messages_sent: AtomicU64,
    pub(crate) messages_received: AtomicU64,
}

/// What the node keeps of a running link.
#[derive(Clone)]
pub(crate) struct LinkHandle {
    pub(crate) id: u64,
    pub(crate) peer: String,
    pub(crate) path: LinkPath,
    /// Static key of the side that dialed; the one-link-per-pair tie-break.
    pub(crate) initiator_key: [u8; KEY_BYTES],
    pub(crate) channels: Vec<mpsc::Sender<Outgoing>>,
    pub(crate) records: mpsc::Sender<Record>,
    pub(crate) relay: mpsc::Sender<Record>,
    /// Aborts the link at once (errors, member removal, shutdown).
    pub(crate) close: CancellationToken,
    /// Retires a link that lost the one-link-per-pair rule: it takes no new messages, sends
    /// what it already holds, then closes its sending direction; the reader runs until the
    /// peer does the same (bounded by the dead-peer timeout).
    pub(crate) retire: CancellationToken,
    pub(crate) rtt_us: Arc<AtomicU64>,
}

static NEXT_LINK_ID: AtomicU64 = AtomicU64::new(1);

#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("{0}")]
    Codec(#[from] CodecError),
    #[error("frame does not decrypt (corrupt, replayed or reordered)")]
    Decrypt,
    #[error("encryption failed")]
    Encrypt,
    #[error("no traffic for {0} ms: peer presumed dead")]
    DeadPeer(u64),
    #[error("no transport frame within {0} ms of the handshake: link not confirmed (replayed handshake?)")]
    Unconfirmed(u64),
    #[error("connection closed by peer")]
    Eof,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Registers the link and starts its tasks. Returns false if the peer is no longer a member.
/// `confirmed`: we initiated (message 2 proved the peer live); a responder's link is confirmed
/// by the first transport frame that decrypts, and closed if none comes within the handshake
/// timeout.
pub(crate) fn spawn<S>(
    inner: Arc<Inner>,
    stream: S,
    established: Established,
    path: LinkPath,
    initiator_key: [u8; KEY_BYTES],
    confirmed: bool,
) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let queue = inner.config.send_queue_messages.max(1);
    let mut channels = Vec::new();
    let mut receivers = Vec::new();
    for _ in 0..CHANNEL_COUNT {
        let (tx, rx) = mpsc::channel(queue);
        channels.push(tx);
        receivers.push(rx);
    }
    let (records, records_rx) = mpsc::channel(RECORD_QUEUE);
    let (relay, relay_rx) = mpsc::channel(RELAY_QUEUE);
    let handle = LinkHandle {
        id: NEXT_LINK_ID.fetch_add(1, Ordering::Relaxed),
        peer: established.peer_name.clone(),
        path,
        initiator_key,
        channels,
        records,
        relay,
        close: inner.shutdown.child_token(),
        retire: CancellationToken::new(),
        rtt_us: Arc::new(AtomicU64::new(0)),
    };
    let Some(stats) = inner.register(handle.clone(), confirmed) else {
        return false;
    };
    let span = info_span!("mesh_link", peer = %handle.peer, id = handle.id, path = ?handle.path);
    span.in_scope(|| info!(confirmed, "link up"));
    let transport = Arc::new(RwLock::new(established.transport));
    let (reader, writer) = tokio::io::split(stream);
    let writer_task = tokio::spawn(
        write_loop(
            inner.clone(),
            writer,
            transport.clone(),
            receivers,
            records_rx,
            relay_rx,
            handle.clone(),
            stats.clone(),
        )
        .instrument(span.clone()),
    );
    tokio::spawn(
        async move {
            let grace = Duration::from_millis(inner.config.dead_peer_timeout_ms.max(1));
            let retired = async {
                handle.retire.cancelled().await;
                tokio::time::sleep(grace).await;
            };
            let read_result = tokio::select! {
                result = read_loop(&inner, reader, &transport, &handle, &stats, confirmed) => result,
                _ = retired => Ok(()),
            };
            handle.close.cancel();
            let write_result = writer_task.await.unwrap_or(Ok(()));
            let error = match (read_result, write_result) {
                // The peer closing a retired link is the expected end.
                (Err(LinkError::Eof), Ok(())) if handle.retire.is_cancelled() => None,
                (Err(error), _) | (Ok(()), Err(error)) => Some(error.to_string()),
                _ => None,
            };
            match &error {
                Some(error) => warn!(%error, "link down"),
                None => info!("link closed"),
            }
            inner.unregister(&handle.peer, handle.id, error);
        }
        .instrument(span),
    );
    true
}

struct Sealer {
    transport: Arc<RwLock<StatelessTransportState>>,
    nonce: u64,
    plain: Vec<u8>,
    bytes_since_rekey: u64,
    last_rekey: Instant,
}

impl Sealer {
    /// Encrypts `record` and appends the frame to `out`.
    fn seal(&mut self, record: &Record, out: &mut Vec<u8>) -> Result<(), LinkError> {
        self.plain.clear();
        record.encode(&mut self.plain)?;
        let start = out.len();
        out.resize(
            start + FRAME_LEN_BYTES + self.plain.len() + NOISE_TAG_BYTES,
            0,
        );
        let written = {
            let transport = self.transport.read().map_err(|_| LinkError::Encrypt)?;
            transport
                .write_message(self.nonce, &self.plain, &mut out[start + FRAME_LEN_BYTES..])
                .map_err(|_| LinkError::Encrypt)?
        };
        self.nonce += 1;
        out[start..start + FRAME_LEN_BYTES].copy_from_slice(&frame_header(written)?);
        out.truncate(start + FRAME_LEN_BYTES + written);
        self.bytes_since_rekey += (FRAME_LEN_BYTES + written) as u64;
        Ok(())
    }

    /// Sends a rekey record and switches the sending key when the volume or age limit is hit.
    fn maybe_rekey(&mut self, inner: &Inner, out: &mut Vec<u8>) -> Result<(), LinkError> {
        let by_volume = self.bytes_since_rekey >= inner.config.rekey_after_bytes;
        let by_age =
            self.last_rekey.elapsed() >= Duration::from_secs(inner.config.rekey_after_secs);
        if !(by_volume || by_age) {
            return Ok(());
        }
        self.seal(&Record::Rekey, out)?;
        self.transport
            .write()
            .map_err(|_| LinkError::Encrypt)?
            .rekey_outgoing();
        self.bytes_since_rekey = 0;
        self.last_rekey = Instant::now();
        debug!("rekeyed sending direction");
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
async fn write_loop<S: AsyncWrite>(
    inner: Arc<Inner>,
    mut writer: WriteHalf<S>,
    transport: Arc<RwLock<StatelessTransportState>>,
    mut receivers: Vec<mpsc::Receiver<Outgoing>>,
    mut records: mpsc::Receiver<Record>,
    mut relay: mpsc::Receiver<Record>,
    handle: LinkHandle,
    stats: Arc<PeerStats>,
) -> Result<(), LinkError> {
    let mut sealer = Sealer {
        transport,
        nonce: 0,
        plain: Vec::with_capacity(MAX_RECORD_BYTES),
        bytes_since_rekey: 0,
        last_rekey: Instant::now(),
    };
    let mut splitters: Vec<Option<Splitter>> = (0..CHANNEL_COUNT).map(|_| None).collect();
    let mut out: Vec<u8> = Vec::with_capacity(WRITE_BATCH_BYTES + 2 * (MAX_RECORD_BYTES + 64));
    let mut keepalive = tokio::time::interval(Duration::from_millis(
        inner.config.keepalive_interval_ms.max(1),
    ));
    let is_direct = matches!(handle.path, LinkPath::Direct(_));
    // A first record at once: it confirms the link at the responder (and measures the RTT).
    sealer.seal(
        &Record::Ping {
            sent_at_us: inner.now_us(),
        },
        &mut out,
    )?;
    if is_direct {
        sealer.seal(&Record::Routes(inner.direct_peers()), &mut out)?;
    }
    // Relay records go after raft and forwarded writes, before bulk.
    const RELAY_SLOT: usize = 3;
    // Set once the link is retired and its queues are closed to new messages.
    let mut draining = false;
    // No pass of this loop may come back without progress: each one takes a record or a chunk
    // from a queue, writes `out` to the socket (emptying it), or waits in `select!`; a closed
    // link ends the loop (`flush` says so). The budget point below is a second line: even a
    // future mistake here yields to the runtime instead of pinning a worker thread.
    loop {
        tokio::task::consume_budget().await;
        // One unit of work, highest priority first, without waiting.
        let mut worked = false;
        if let Ok(record) = records.try_recv() {
            sealer.seal(&record, &mut out)?;
            worked = true;
        } else {
            for slot in 0..=CHANNEL_COUNT {
                if slot == RELAY_SLOT {
                    if let Ok(record) = relay.try_recv() {
                        sealer.seal(&record, &mut out)?;
                        worked = true;
                        break;
                    }
                }
                let c = if slot < RELAY_SLOT {
                    slot
                } else if slot == CHANNEL_COUNT {
                    CHANNEL_COUNT - 1
                } else {
                    continue;
                };
                if splitters[c].is_none() {
                    if let Ok(message) = receivers[c].try_recv() {
                        splitters[c] =
                            Some(Splitter::new(Channel::ALL[c], message.kind, message.body)?);
                        stats.messages_sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if let Some(splitter) = splitters[c].as_mut() {
                    if let Some(chunk) = splitter.next() {
                        if chunk.last {
                            splitters[c] = None;
                        }
                        sealer.seal(&Record::Data(chunk), &mut out)?;
                        worked = true;
                        break;
                    }
                    splitters[c] = None;
                }
            }
        }
        if worked {
            sealer.maybe_rekey(&inner, &mut out)?;
            if out.len() >= WRITE_BATCH_BYTES
                && flush(&mut writer, &mut out, &stats, &handle.close).await? == Flushed::Closed
            {
                return Ok(());
            }
            continue;
        }
        if !out.is_empty() {
            if flush(&mut writer, &mut out, &stats, &handle.close).await? == Flushed::Closed {
                return Ok(());
            }
            continue;
        }
        let [control_rx, raft_rx, writes_rx, bulk_rx] = &mut receivers[..] else {
            return Ok(());
        };
        tokio::select! {
            biased;
            _ = handle.close.cancelled() => return Ok(()),
            Some(record) = records.recv() => sealer.seal(&record, &mut out)?,
            Some(message) = control_rx.recv() => start(&mut splitters, Channel::Control, message, &stats)?,
            Some(message) = raft_rx.recv() => start(&mut splitters, Channel::Raft, message, &stats)?,
            Some(message) = writes_rx.recv() => start(&mut splitters, Channel::Writes, message, &stats)?,
            Some(record) = relay.recv() => sealer.seal(&record, &mut out)?,
            Some(message) = bulk_rx.recv() => start(&mut splitters, Channel::Bulk, message, &stats)?,
            _ = handle.retire.cancelled() => {
                if draining {
                    // Everything queued before the close is sent: end our direction.
                    let _ = writer.shutdown().await;
                    return Ok(());
                }
                // Senders racing with the close get their message back and retry on the
                // peer's new link; what is already queued is still sent.
                draining = true;
                for receiver in receivers.iter_mut() {
                    receiver.close();
                }
                records.close();
                relay.close();
            }
            _ = keepalive.tick(), if !draining => {
                sealer.seal(&Record::Ping { sent_at_us: inner.now_us() }, &mut out)?;
                if is_direct {
                    sealer.seal(&Record::Routes(inner.direct_peers()), &mut out)?;
                }
                sealer.maybe_rekey(&inner, &mut out)?;
            }
        }
    }
}

fn start(
    splitters: &mut [Option<Splitter>],
    channel: Channel,
    message: Outgoing,
    stats: &PeerStats,
) -> Result<(), LinkError> {
    splitters[channel.index()] = Some(Splitter::new(channel, message.kind, message.body)?);
    stats.messages_sent.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Whether [`flush`] wrote its bytes or found the link closed.
#[derive(Debug, PartialEq, Eq)]
enum Flushed {
    Written,
    /// The link was closed (the reader ended, shutdown, membership) before the bytes were
    /// written, typically because the socket stopped draining after a silent cut. The caller
    /// must stop: the bytes are still in `out`, so going round again would find the same bytes
    /// and the same cancelled token at once, a busy loop (issue 9).
    Closed,
}

async fn flush<S: AsyncWrite>(
    writer: &mut WriteHalf<S>,
    out: &mut Vec<u8>,
    stats: &PeerStats,
    close: &CancellationToken,
) -> Result<Flushed, LinkError> {
    tokio::select! {
        _ = close.cancelled() => return Ok(Flushed::Closed),
        written = writer.write_all(out) => written?,
    }
    stats
        .bytes_sent
        .fetch_add(out.len() as u64, Ordering::Relaxed);
    out.clear();
    Ok(Flushed::Written)
}

async fn read_loop<S: AsyncRead>(
    inner: &Arc<Inner>,
    mut reader: ReadHalf<S>,
    transport: &RwLock<StatelessTransportState>,
    handle: &LinkHandle,
    stats: &PeerStats,
    mut confirmed: bool,
) -> Result<(), LinkError> {
    let mut buffer = BytesMut::with_capacity(READ_BUFFER_BYTES);
    let mut nonce = 0u64;
    let mut reassembler = Reassembler::new(inner.config.max_message_bytes);
    let dead_ms = inner.config.dead_peer_timeout_ms.max(1);
    let confirm_ms = inner.config.handshake_timeout_ms.max(1);
    loop {
        while let Some(frame) = decode_frame(&mut buffer)? {
            stats
                .bytes_received
                .fetch_add((frame.len() + FRAME_LEN_BYTES) as u64, Ordering::Relaxed);
            let mut plain = BytesMut::zeroed(frame.len());
            let len = transport
                .read()
                .map_err(|_| LinkError::Decrypt)?
                .read_message(nonce, &frame, &mut plain)
                .map_err(|_| LinkError::Decrypt)?;
            nonce += 1;
            plain.truncate(len);
            if !confirmed {
                // Only the holder of the initiator's keys can produce this frame.
                confirmed = true;
                inner.confirm(&handle.peer, handle.id);
            }
            match Record::decode(plain.freeze())? {
                Record::Data(chunk) => {
                    if let Some(message) = reassembler.push(chunk)? {
                        stats.messages_received.fetch_add(1, Ordering::Relaxed);
                        inner
                            .deliver(&handle.peer, message.channel, message.kind, message.body)
                            .await;
                    }
                }
                Record::Ping { sent_at_us } => {
                    let _ = handle.records.try_send(Record::Pong { sent_at_us });
                }
                Record::Pong { sent_at_us } => {
                    let rtt = inner.now_us().saturating_sub(sent_at_us).max(1);
                    handle.rtt_us.store(rtt, Ordering::Relaxed);
                }
                Record::Rekey => {
                    transport
                        .write()
                        .map_err(|_| LinkError::Decrypt)?
                        .rekey_incoming();
                }
                Record::Routes(names) => {
                    if matches!(handle.path, LinkPath::Direct(_)) {
                        inner.set_advertised(&handle.peer, names);
                    }
                }
                Record::Relay {
                    deliver: false,
                    close,
                    initiator,
                    stream,
                    peer,
                    bytes,
                } => {
                    // We are the relay: pass the bytes on, marked with their authenticated
                    // source. Only direct links relay, and never back to the sender.
                    if !matches!(handle.path, LinkPath::Direct(_)) || peer == handle.peer {
                        continue;
                    }
                    let record = Record::Relay {
                        deliver: true,
                        close,
                        initiator,
                        stream,
                        peer: handle.peer.clone(),
                        bytes,
                    };
                    match inner.direct_link(&peer) {
                        Some(next) => {
                            let _ = next.relay.send(record).await;
                        }
                        None if !close => {
                            // No way on: close the sender's stream (seen from its side, the
                            // answer comes from the other end of the stream).
                            let _ = handle.relay.try_send(Record::Relay {
                                deliver: true,
                                close: true,
                                initiator: !initiator,
                                stream,
                                peer,
                                bytes: Bytes::new(),
                            });
                        }
                        None => {}
                    }
                }
                Record::Relay {
                    deliver: true,
                    close,
                    initiator,
                    stream,
                    peer,
                    bytes,
                } => {
                    if matches!(handle.path, LinkPath::Direct(_)) {
                        inner
                            .relay_deliver(&peer, &handle.peer, stream, initiator, close, bytes)
                            .await;
                    }
                }
            }
        }
        // Room for several frames per read, whatever the last frame left over.
        if buffer.capacity() - buffer.len() < READ_BUFFER_BYTES / 2 {
            buffer.reserve(READ_BUFFER_BYTES);
        }
        let wait_ms = if confirmed { dead_ms } else { confirm_ms };
        let read = tokio::select! {
            _ = handle.close.cancelled() => return Ok(()),
            read = tokio::time::timeout(Duration::from_millis(wait_ms), reader.read_buf(&mut buffer)) => read,
        };
        match read {
            Err(_) if !confirmed => return Err(LinkError::Unconfirmed(confirm_ms)),
            Err(_) => return Err(LinkError::DeadPeer(dead_ms)),
            Ok(Err(error)) => return Err(LinkError::Io(error)),
            Ok(Ok(0)) => return Err(LinkError::Eof),
            Ok(Ok(_)) => {}
        }
    }
}
