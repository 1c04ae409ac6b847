//! Sans-IO wire format of a mesh link: frames, records, splitting and reassembly.
//!
//! On the wire a link is a sequence of frames: a 2-byte big-endian length, then that many bytes
//! of one Noise transport message (ciphertext plus a 16-byte tag). Decrypted, each frame holds
//! one [`Record`]. Application messages of any size (up to the configured limit) travel as one or
//! more [`Record::Data`] chunks; chunks of different channels may interleave, chunks of one
//! channel never do, so the reassembler keeps at most one partial message per channel.
//!
//! This file depends only on `bytes` and `thiserror` so that the fuzz project can include it.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes of the length prefix in front of every Noise message.
pub const FRAME_LEN_BYTES: usize = 2;
/// Largest Noise message (the Noise specification's limit, tag included).
pub const MAX_NOISE_MESSAGE_BYTES: usize = 65_535;
/// Bytes of the ChaChaPoly authentication tag at the end of every transport message.
pub const NOISE_TAG_BYTES: usize = 16;
/// Largest decrypted record.
pub const MAX_RECORD_BYTES: usize = MAX_NOISE_MESSAGE_BYTES - NOISE_TAG_BYTES;
/// Record header of a data chunk: type, channel, flags.
pub const DATA_HEADER_BYTES: usize = 3;
/// Extra header of the first chunk of a message: total length (u32), kind (u8), request id (u64).
pub const MESSAGE_HEAD_BYTES: usize = 13;
/// Longest peer name carried in routing and relay records.
pub const MAX_NAME_BYTES: usize = 255;
/// Most names in one routing advertisement (clusters are a handful of nodes).
pub const MAX_ROUTE_NAMES: usize = 256;
/// Initial buffer of a reassembled message, so that a forged length does not allocate the maximum.
const REASSEMBLY_INITIAL_CAPACITY_BYTES: usize = 1 << 20;

const RECORD_DATA: u8 = 0;
const RECORD_PING: u8 = 1;
const RECORD_PONG: u8 = 2;
const RECORD_REKEY: u8 = 3;
const RECORD_ROUTES: u8 = 4;
const RECORD_RELAY: u8 = 5;

const FLAG_FIRST: u8 = 1;
const FLAG_LAST: u8 = 2;
const RELAY_FLAG_DELIVER: u8 = 1;
const RELAY_FLAG_CLOSE: u8 = 2;
const RELAY_FLAG_INITIATOR: u8 = 4;

const KIND_ONE_WAY: u8 = 0;
const KIND_REQUEST: u8 = 1;
const KIND_RESPONSE: u8 = 2;

/// A logical channel multiplexed on a link. The declaration order is the sending priority:
/// control first, bulk last, so a snapshot never delays a heartbeat.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// Mesh and cluster control traffic (membership, status).
    Control = 0,
    /// Raft RPCs (append entries, votes, heartbeats).
    Raft = 1,
    /// Client writes forwarded from a follower to the leader.
    Writes = 2,
    /// Snapshot chunks and backups.
    Bulk = 3,
}

/// Number of channels.
pub const CHANNEL_COUNT: usize = 4;

impl Channel {
    /// All channels, highest priority first.
    pub const ALL: [Channel; CHANNEL_COUNT] = [
        Channel::Control,
        Channel::Raft,
        Channel::Writes,
        Channel::Bulk,
    ];

    /// Position of the channel in [`Channel::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The channel with the given wire number.
    pub fn from_wire(value: u8) -> Result<Channel, CodecError> {
        Channel::ALL
            .get(usize::from(value))
            .copied()
            .ok_or(CodecError::UnknownChannel(value))
    }
}

/// What an application message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// Fire and forget.
    OneWay,
    /// A request awaiting a response with the same id.
    Request(u64),
    /// The response to the request with this id.
    Response(u64),
}

/// Header carried by the first chunk of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageHead {
    /// Length of the whole message body.
    pub total_len: u32,
    /// What the message is.
    pub kind: MessageKind,
}

/// One chunk of an application message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataChunk {
    /// The channel the message travels on.
    pub channel: Channel,
    /// Present on the first chunk only.
    pub head: Option<MessageHead>,
    /// Set on the last chunk.
    pub last: bool,
    /// This chunk's part of the body.
    pub body: Bytes,
}

/// One decrypted frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A chunk of an application message.
    Data(DataChunk),
    /// Keepalive; the peer answers with a pong carrying the same value.
    Ping { sent_at_us: u64 },
    /// Answer to a ping.
    Pong { sent_at_us: u64 },
    /// The sender switches its sending key after this record (Noise rekey).
    Rekey,
    /// The names of the nodes the sender has direct links to.
    Routes(Vec<String>),
    /// Relayed bytes. `deliver == false`: "forward these bytes to `peer`" (sent to the relay);
    /// `deliver == true`: "these bytes come from `peer`" (sent by the relay). `close` ends the
    /// relayed stream. The bytes are an inner Noise link the relay cannot read.
    ///
    /// A relayed stream is named by the endpoint that opened it: `stream` is that endpoint's
    /// id for it, and `initiator` says the bytes travel from that endpoint. So two streams
    /// opened at the same time by both ends never mix.
    Relay {
        deliver: bool,
        close: bool,
        initiator: bool,
        stream: u64,
        peer: String,
        bytes: Bytes,
    },
}

/// Wire errors. Every one of them closes the link.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {0} bytes is shorter than a noise tag")]
    FrameTooShort(usize),
    #[error("empty record")]
    EmptyRecord,
    #[error("unknown record type {0}")]
    UnknownRecord(u8),
    #[error("unknown channel {0}")]
    UnknownChannel(u8),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("truncated record")]
    Truncated,
    #[error("trailing bytes after record")]
    TrailingBytes,
    #[error("record of {0} bytes exceeds the noise payload limit")]
    RecordTooLarge(usize),
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    MessageTooLarge { len: u64, max: usize },
    #[error("chunk without a message start on channel {0:?}")]
    OrphanChunk(Channel),
    #[error("new message started on channel {0:?} before the previous one ended")]
    InterleavedMessage(Channel),
    #[error("message on channel {channel:?} declared {declared} bytes but carried {carried}")]
    LengthMismatch {
        channel: Channel,
        declared: usize,
        carried: usize,
    },
    #[error("peer name is not valid utf-8 or too long")]
    BadName,
    #[error("too many names in a route advertisement")]
    TooManyRoutes,
}

/// Takes one complete frame (the Noise message, without its length prefix) off the front of
/// `buffer`. `Ok(None)` means more bytes are needed.
pub fn decode_frame(buffer: &mut BytesMut) -> Result<Option<BytesMut>, CodecError> {
    if buffer.len() < FRAME_LEN_BYTES {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([buffer[0], buffer[1]]));
    if len < NOISE_TAG_BYTES {
        return Err(CodecError::FrameTooShort(len));
    }
    if buffer.len() < FRAME_LEN_BYTES + len {
        buffer.reserve(FRAME_LEN_BYTES + len - buffer.len());
        return Ok(None);
    }
    buffer.advance(FRAME_LEN_BYTES);
    Ok(Some(buffer.split_to(len)))
}

/// The length prefix of a Noise message of `len` bytes.
pub fn frame_header(len: usize) -> Result<[u8; FRAME_LEN_BYTES], CodecError> {
    let len = u16::try_from(len).map_err(|_| CodecError::RecordTooLarge(len))?;
    Ok(len.to_be_bytes())
}

fn put_name(out: &mut Vec<u8>, name: &str) -> Result<(), CodecError> {
    let len = u8::try_from(name.len()).map_err(|_| CodecError::BadName)?;
    out.put_u8(len);
    out.extend_from_slice(name.as_bytes());
    Ok(())
}

fn take_name(input: &mut Bytes) -> Result<String, CodecError> {
    if input.is_empty() {
        return Err(CodecError::Truncated);
    }
    let len = usize::from(input.get_u8());
    if input.len() < len {
        return Err(CodecError::Truncated);
    }
    let raw = input.split_to(len);
    String::from_utf8(raw.to_vec()).map_err(|_| CodecError::BadName)
}

fn need(input: &Bytes, n: usize) -> Result<(), CodecError> {
    if input.len() < n {
        Err(CodecError::Truncated)
    } else {
        Ok(())
    }
}

impl Record {
    /// Appends the record's plaintext to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), CodecError> {
        let start = out.len();
        match self {
            Record::Data(chunk) => {
                out.put_u8(RECORD_DATA);
                out.put_u8(chunk.channel as u8);
                let mut flags = 0;
                if chunk.head.is_some() {
                    flags |= FLAG_FIRST;
                }
                if chunk.last {
                    flags |= FLAG_LAST;
                }
                out.put_u8(flags);
                if let Some(head) = chunk.head {
                    out.put_u32(head.total_len);
                    let (kind, id) = match head.kind {
                        MessageKind::OneWay => (KIND_ONE_WAY, 0),
                        MessageKind::Request(id) => (KIND_REQUEST, id),
                        MessageKind::Response(id) => (KIND_RESPONSE, id),
                    };
                    out.put_u8(kind);
                    out.put_u64(id);
                }
                out.extend_from_slice(&chunk.body);
            }
            Record::Ping { sent_at_us } => {
                out.put_u8(RECORD_PING);
                out.put_u64(*sent_at_us);
            }
            Record::Pong { sent_at_us } => {
                out.put_u8(RECORD_PONG);
                out.put_u64(*sent_at_us);
            }
            Record::Rekey => out.put_u8(RECORD_REKEY),
            Record::Routes(names) => {
                if names.len() > MAX_ROUTE_NAMES {
                    return Err(CodecError::TooManyRoutes);
                }
                out.put_u8(RECORD_ROUTES);
                out.put_u16(names.len() as u16);
                for name in names {
                    put_name(out, name)?;
                }
            }
            Record::Relay {
                deliver,
                close,
                initiator,
                stream,
                peer,
                bytes,
            } => {
                out.put_u8(RECORD_RELAY);
                let mut flags = 0;
                if *deliver {
                    flags |= RELAY_FLAG_DELIVER;
                }
                if *close {
                    flags |= RELAY_FLAG_CLOSE;
                }
                if *initiator {
                    flags |= RELAY_FLAG_INITIATOR;
                }
                out.put_u8(flags);
                out.put_u64(*stream);
                put_name(out, peer)?;
                out.extend_from_slice(bytes);
            }
        }
        let len = out.len() - start;
        if len > MAX_RECORD_BYTES {
            out.truncate(start);
            return Err(CodecError::RecordTooLarge(len));
        }
        Ok(())
    }

    /// Parses one decrypted record.
    pub fn decode(mut input: Bytes) -> Result<Record, CodecError> {
        if input.len() > MAX_RECORD_BYTES {
            return Err(CodecError::RecordTooLarge(input.len()));
        }
        if input.is_empty() {
            return Err(CodecError::EmptyRecord);
        }
        let record = match input.get_u8() {
            RECORD_DATA => {
                need(&input, 2)?;
                let channel = Channel::from_wire(input.get_u8())?;
                let flags = input.get_u8();
                let head = if flags & FLAG_FIRST != 0 {
                    need(&input, MESSAGE_HEAD_BYTES)?;
                    let total_len = input.get_u32();
                    let kind_byte = input.get_u8();
                    let id = input.get_u64();
                    let kind = match kind_byte {
                        KIND_ONE_WAY => MessageKind::OneWay,
                        KIND_REQUEST => MessageKind::Request(id),
                        KIND_RESPONSE => MessageKind::Response(id),
                        other => return Err(CodecError::UnknownKind(other)),
                    };
                    Some(MessageHead { total_len, kind })
                } else {
                    None
                };
                let last = flags & FLAG_LAST != 0;
                return Ok(Record::Data(DataChunk {
                    channel,
                    head,
                    last,
                    body: input,
                }));
            }
            RECORD_PING => {
                need(&input, 8)?;
                Record::Ping {
                    sent_at_us: input.get_u64(),
                }
            }
            RECORD_PONG => {
                need(&input, 8)?;
                Record::Pong {
                    sent_at_us: input.get_u64(),
                }
            }
            RECORD_REKEY => Record::Rekey,
            RECORD_ROUTES => {
                need(&input, 2)?;
                let count = usize::from(input.get_u16());
                if count > MAX_ROUTE_NAMES {
                    return Err(CodecError::TooManyRoutes);
                }
                let mut names = Vec::with_capacity(count);
                for _ in 0..count {
                    names.push(take_name(&mut input)?);
                }
                Record::Routes(names)
            }
            RECORD_RELAY => {
                need(&input, 9)?;
                let flags = input.get_u8();
                let stream = input.get_u64();
                let peer = take_name(&mut input)?;
                return Ok(Record::Relay {
                    deliver: flags & RELAY_FLAG_DELIVER != 0,
                    close: flags & RELAY_FLAG_CLOSE != 0,
                    initiator: flags & RELAY_FLAG_INITIATOR != 0,
                    stream,
                    peer,
                    bytes: input,
                });
            }
            other => return Err(CodecError::UnknownRecord(other)),
        };
        if !input.is_empty() {
            return Err(CodecError::TrailingBytes);
        }
        Ok(record)
    }
}

/// Cuts one application message into [`DataChunk`]s that each fit in one record.
#[derive(Debug)]
pub struct Splitter {
    channel: Channel,
    kind: MessageKind,
    body: Bytes,
    started: bool,
    done: bool,
}

impl Splitter {
    /// A splitter for `body`; fails when the body does not fit the 32-bit length field.
    pub fn new(channel: Channel, kind: MessageKind, body: Bytes) -> Result<Splitter, CodecError> {
        if u32::try_from(body.len()).is_err() {
            return Err(CodecError::MessageTooLarge {
                len: body.len() as u64,
                max: u32::MAX as usize,
            });
        }
        Ok(Splitter {
            channel,
            kind,
            body,
            started: false,
            done: false,
        })
    }

    /// The channel of the message being split.
    pub fn channel(&self) -> Channel {
        self.channel
    }
}

impl Iterator for Splitter {
    type Item = DataChunk;

    fn next(&mut self) -> Option<DataChunk> {
        if self.done {
            return None;
        }
        let head = if self.started {
            None
        } else {
            Some(MessageHead {
                total_len: self.body.len() as u32,
                kind: self.kind,
            })
        };
        let room = MAX_RECORD_BYTES
            - DATA_HEADER_BYTES
            - if head.is_some() {
                MESSAGE_HEAD_BYTES
            } else {
                0
            };
        let take = room.min(self.body.len());
        let body = self.body.split_to(take);
        self.started = true;
        let last = self.body.is_empty();
        self.done = last;
        Some(DataChunk {
            channel: self.channel,
            head,
            last,
            body,
        })
    }
}

/// A complete application message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub channel: Channel,
    pub kind: MessageKind,
    pub body: Bytes,
}

#[derive(Debug)]
struct Partial {
    kind: MessageKind,
    declared: usize,
    buffer: BytesMut,
}

/// Rebuilds messages from chunks, one partial message per channel, bounded in size.
#[derive(Debug)]
pub struct Reassembler {
    max_message_bytes: usize,
    partial: [Option<Partial>; CHANNEL_COUNT],
}

impl Reassembler {
    /// A reassembler refusing messages longer than `max_message_bytes`.
    pub fn new(max_message_bytes: usize) -> Reassembler {
        Reassembler {
            max_message_bytes,
            partial: [None, None, None, None],
        }
    }

    /// Adds one chunk; returns the message it completes, if any.
    pub fn push(&mut self, chunk: DataChunk) -> Result<Option<Message>, CodecError> {
        let channel = chunk.channel;
        let slot = &mut self.partial[channel.index()];
        match (chunk.head, slot.as_mut()) {
            (Some(_), Some(_)) => Err(CodecError::InterleavedMessage(channel)),
            (None, None) => Err(CodecError::OrphanChunk(channel)),
            (Some(head), None) => {
                let declared = head.total_len as usize;
                if declared > self.max_message_bytes {
                    return Err(CodecError::MessageTooLarge {
                        len: u64::from(head.total_len),
                        max: self.max_message_bytes,
                    });
                }
                if chunk.last {
                    if chunk.body.len() != declared {
                        return Err(CodecError::LengthMismatch {
                            channel,
                            declared,
                            carried: chunk.body.len(),
                        });
                    }
                    return Ok(Some(Message {
                        channel,
                        kind: head.kind,
                        body: chunk.body,
                    }));
                }
                if chunk.body.len() > declared {
                    return Err(CodecError::LengthMismatch {
                        channel,
                        declared,
                        carried: chunk.body.len(),
                    });
                }
                let mut buffer =
                    BytesMut::with_capacity(declared.min(REASSEMBLY_INITIAL_CAPACITY_BYTES));
                buffer.extend_from_slice(&chunk.body);
                *slot = Some(Partial {
                    kind: head.kind,
                    declared,
                    buffer,
                });
                Ok(None)
            }
            (None, Some(partial)) => {
                let carried = partial.buffer.len() + chunk.body.len();
                if carried > partial.declared || (chunk.last && carried != partial.declared) {
                    let declared = partial.declared;
                    *slot = None;
                    return Err(CodecError::LengthMismatch {
                        channel,
                        declared,
                        carried,
                    });
                }
                partial.buffer.extend_from_slice(&chunk.body);
                if !chunk.last {
                    return Ok(None);
                }
                let Some(done) = slot.take() else {
                    return Ok(None);
                };
                Ok(Some(Message {
                    channel,
                    kind: done.kind,
                    body: done.buffer.freeze(),
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(record: Record) {
        let mut out = Vec::new();
        record.encode(&mut out).unwrap();
        assert_eq!(Record::decode(Bytes::from(out)).unwrap(), record);
    }

    #[test]
    fn records_roundtrip() {
        roundtrip(Record::Ping { sent_at_us: 42 });
        roundtrip(Record::Pong {
            sent_at_us: u64::MAX,
        });
        roundtrip(Record::Rekey);
        roundtrip(Record::Routes(vec!["a".into(), "b".into()]));
        roundtrip(Record::Relay {
            deliver: true,
            close: false,
            initiator: true,
            stream: 77,
            peer: "c".into(),
            bytes: Bytes::from_static(b"xyz"),
        });
        roundtrip(Record::Data(DataChunk {
            channel: Channel::Raft,
            head: Some(MessageHead {
                total_len: 3,
                kind: MessageKind::Request(7),
            }),
            last: true,
            body: Bytes::from_static(b"abc"),
        }));
    }

    #[test]
    fn record_transcripts() {
        // A ping is its type byte and a big-endian timestamp.
        let mut out = Vec::new();
        Record::Ping { sent_at_us: 1 }.encode(&mut out).unwrap();
        assert_eq!(out, [1, 0, 0, 0, 0, 0, 0, 0, 1]);
        // A one-chunk one-way message on the raft channel.
        let mut out = Vec::new();
        Record::Data(DataChunk {
            channel: Channel::Raft,
            head: Some(MessageHead {
                total_len: 2,
                kind: MessageKind::OneWay,
            }),
            last: true,
            body: Bytes::from_static(b"hi"),
        })
        .encode(&mut out)
        .unwrap();
        assert_eq!(
            out,
            [0, 1, 3, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, b'h', b'i']
        );
    }

    #[test]
    fn malformed_records_are_errors() {
        let check = |bytes: &[u8], expected: CodecError| {
            assert_eq!(Record::decode(Bytes::copy_from_slice(bytes)), Err(expected));
        };
        check(&[], CodecError::EmptyRecord);
        check(&[9], CodecError::UnknownRecord(9));
        check(&[0, 7, 0], CodecError::UnknownChannel(7));
        check(&[1, 0, 0], CodecError::Truncated);
        check(&[3, 0], CodecError::TrailingBytes);
        check(
            &[0, 0, 1, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0],
            CodecError::UnknownKind(9),
        );
        check(&[4, 0, 1, 5, b'a'], CodecError::Truncated);
        check(&[4, 0, 1, 1, 0xff], CodecError::BadName);
    }

    #[test]
    fn frames_decode_incrementally() {
        let mut buffer = BytesMut::new();
        buffer.extend_from_slice(&[0, 16]);
        assert_eq!(decode_frame(&mut buffer), Ok(None));
        buffer.extend_from_slice(&[7; 15]);
        assert_eq!(decode_frame(&mut buffer), Ok(None));
        buffer.extend_from_slice(&[7; 1]);
        buffer.extend_from_slice(&[0]);
        assert_eq!(decode_frame(&mut buffer).unwrap().unwrap().len(), 16);
        assert_eq!(decode_frame(&mut buffer), Ok(None));
        let mut short = BytesMut::from(&[0u8, 3, 1, 2, 3][..]);
        assert_eq!(decode_frame(&mut short), Err(CodecError::FrameTooShort(3)));
    }

    #[test]
    fn oversized_and_inconsistent_messages_are_refused() {
        let mut reassembler = Reassembler::new(10);
        let first = |total_len, last, body: &'static [u8]| DataChunk {
            channel: Channel::Bulk,
            head: Some(MessageHead {
                total_len,
                kind: MessageKind::OneWay,
            }),
            last,
            body: Bytes::from_static(body),
        };
        assert!(matches!(
            reassembler.push(first(11, false, b"")),
            Err(CodecError::MessageTooLarge { .. })
        ));
        assert!(matches!(
            reassembler.push(first(3, true, b"ab")),
            Err(CodecError::LengthMismatch { .. })
        ));
        let rest = DataChunk {
            channel: Channel::Bulk,
            head: None,
            last: true,
            body: Bytes::from_static(b"x"),
        };
        assert_eq!(
            reassembler.push(rest.clone()),
            Err(CodecError::OrphanChunk(Channel::Bulk))
        );
        assert_eq!(reassembler.push(first(4, false, b"ab")), Ok(None));
        assert_eq!(
            reassembler.push(first(4, false, b"ab")),
            Err(CodecError::InterleavedMessage(Channel::Bulk))
        );
        assert!(matches!(
            reassembler.push(rest),
            Err(CodecError::LengthMismatch { .. })
        ));
    }

    proptest! {
        // Any set of messages, split and interleaved across channels, reassembles to the same
        // messages in per-channel order.
        #[test]
        fn split_then_reassemble(
            sizes in proptest::collection::vec((0usize..4, 0usize..200_000), 1..6),
            seed in any::<u64>(),
        ) {
            let mut splitters: Vec<Splitter> = Vec::new();
            let mut expected: Vec<Vec<Bytes>> = vec![Vec::new(); CHANNEL_COUNT];
            for (i, (channel, size)) in sizes.iter().enumerate() {
                let body: Bytes = (0..*size).map(|j| (j as u8) ^ (i as u8)).collect::<Vec<u8>>().into();
                let channel = Channel::ALL[*channel];
                expected[channel.index()].push(body.clone());
                splitters.push(Splitter::new(channel, MessageKind::Request(i as u64), body).unwrap());
            }
            // Interleave: per channel queue of splitters; pick a channel pseudo-randomly.
            let mut queues: Vec<std::collections::VecDeque<Splitter>> = (0..CHANNEL_COUNT).map(|_| Default::default()).collect();
            for s in splitters { queues[s.channel().index()].push_back(s); }
            let mut reassembler = Reassembler::new(1 << 20);
            let mut got: Vec<Vec<Bytes>> = vec![Vec::new(); CHANNEL_COUNT];
            let mut state = seed | 1;
            while queues.iter().any(|q| !q.is_empty()) {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                let c = (state % CHANNEL_COUNT as u64) as usize;
                let Some(splitter) = queues[c].front_mut() else { continue };
                match splitter.next() {
                    Some(chunk) => {
                        let mut out = Vec::new();
                        Record::Data(chunk).encode(&mut out).unwrap();
                        prop_assert!(out.len() <= MAX_RECORD_BYTES);
                        let Record::Data(chunk) = Record::decode(Bytes::from(out)).unwrap() else { panic!("not data") };
                        if let Some(message) = reassembler.push(chunk).unwrap() {
                            got[message.channel.index()].push(message.body);
                        }
                    }
                    None => { queues[c].pop_front(); }
                }
            }
            prop_assert_eq!(got, expected);
        }

        // Arbitrary wire bytes, fed in arbitrary pieces: frames are taken off, parsed as
        // records and reassembled; every outcome is a value or an error, never a panic, and a
        // completed message never exceeds the limit.
        #[test]
        fn arbitrary_wire_bytes_never_panic(
            wire in proptest::collection::vec(any::<u8>(), 0..4096),
            piece in 1usize..600,
        ) {
            let mut buffer = BytesMut::new();
            let mut reassembler = Reassembler::new(1024);
            'outer: for part in wire.chunks(piece) {
                buffer.extend_from_slice(part);
                loop {
                    let frame = match decode_frame(&mut buffer) {
                        Ok(Some(frame)) => frame,
                        Ok(None) => break,
                        Err(_) => break 'outer,
                    };
                    prop_assert!(frame.len() >= NOISE_TAG_BYTES);
                    let Ok(record) = Record::decode(frame.freeze()) else { break 'outer };
                    if let Record::Data(chunk) = record {
                        match reassembler.push(chunk) {
                            Ok(Some(message)) => prop_assert!(message.body.len() <= 1024),
                            Ok(None) => {}
                            Err(_) => break 'outer,
                        }
                    }
                }
            }
        }

        // Arbitrary record bytes: a record that parses encodes back to the same bytes.
        #[test]
        fn arbitrary_records_parse_or_fail_and_reencode(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            if let Ok(record) = Record::decode(Bytes::from(bytes.clone())) {
                let mut out = Vec::new();
                record.encode(&mut out).unwrap();
                // Flags carry unused bits that decoding ignores; compare the records.
                prop_assert_eq!(Record::decode(Bytes::from(out)).unwrap(), record);
            }
        }
    }
}
