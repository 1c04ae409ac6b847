//! Mesh wire input: arbitrary bytes into the frame decoder, record parser and reassembler, and
//! into both sides of the Noise handshake. Never panics; the reassembler never yields a message
//! longer than its limit or different from its declared length; the responder never accepts a
//! key that is not a member, nor a member's key under another name.
//!
//! Input layout: byte 0 = mode (modulo 5), the rest is the input of that mode:
//! - 0: bytes as the responder's message 1.
//! - 1: a genuine message 1 from key `rest[0] % 3` (member a, member c, a stranger) claiming
//!   the name `rest[1..]`, with `rest[0] >> 2` bits flipped at positions from the name bytes.
//! - 2: bytes as the initiator's message 2.
//! - 3: bytes as the wire of an established link (length-prefixed frames), each frame parsed
//!   as a record without decryption, data chunks reassembled.
//! - 4: bytes cut into records (2-byte length prefixes), each sealed with the real transport
//!   keys, framed, then decoded, decrypted, parsed and reassembled like a link's reader.
#![no_main]

use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use kermail_cluster::mesh::codec::{
    decode_frame, frame_header, Reassembler, Record, FRAME_LEN_BYTES, MAX_NOISE_MESSAGE_BYTES,
    MAX_RECORD_BYTES,
};
use kermail_cluster::mesh::handshake::{
    respond, HandshakeError, HandshakeParams, Initiator, ReplayGuard,
};
use kermail_cluster::mesh::Identity;
use libfuzzer_sys::fuzz_target;

const CLUSTER: &str = "fuzz";
/// Reassembly limit of the fuzzed reader: small, so that the limit is reached.
const MAX_MESSAGE_BYTES: usize = 256 * 1024;
const KEY_A: [u8; 32] = [1; 32];
const KEY_B: [u8; 32] = [2; 32];
const KEY_C: [u8; 32] = [3; 32];
const KEY_STRANGER: [u8; 32] = [9; 32];

fn public(private: [u8; 32]) -> [u8; 32] {
    Identity::from_private(private).public_key()
}

fn params<'a>(private: &'a [u8; 32], name: &'a str) -> HandshakeParams<'a> {
    HandshakeParams {
        local_private_key: private,
        local_name: name,
        cluster_id: CLUSTER,
        psk: None,
    }
}

/// b's membership: a and c.
fn member_of(key: &[u8; 32]) -> Option<String> {
    if *key == public(KEY_A) {
        Some("a".into())
    } else if *key == public(KEY_C) {
        Some("c".into())
    } else {
        None
    }
}

/// A pair of transport states from one genuine handshake (a to b).
struct Pair {
    sender: snow::StatelessTransportState,
    receiver: snow::StatelessTransportState,
}

fn pair() -> &'static Pair {
    static PAIR: OnceLock<Pair> = OnceLock::new();
    PAIR.get_or_init(|| {
        let (initiator, m1) =
            Initiator::start(params(&KEY_A, "a"), "b", &public(KEY_B), 1).expect("message 1");
        let (responder, m2) = respond(
            params(&KEY_B, "b"),
            &m1,
            member_of,
            &mut ReplayGuard::default(),
        )
        .expect("message 2");
        let initiator = initiator.finish(&m2).expect("handshake");
        Pair {
            sender: initiator.transport,
            receiver: responder.transport,
        }
    })
}

/// A link reader without the socket: frames in, messages out, errors end it.
fn read_wire(wire: &[u8], decrypt: bool) {
    let mut reassembler = Reassembler::new(MAX_MESSAGE_BYTES);
    let mut buffer = BytesMut::new();
    let mut nonce = 0u64;
    // Feed in uneven pieces, as a socket would.
    for piece in wire.chunks(7919) {
        buffer.extend_from_slice(piece);
        loop {
            let frame = match decode_frame(&mut buffer) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => return,
            };
            assert!(frame.len() <= MAX_NOISE_MESSAGE_BYTES);
            let plain = if decrypt {
                let mut plain = vec![0u8; frame.len()];
                let Ok(len) = pair().receiver.read_message(nonce, &frame, &mut plain) else {
                    return;
                };
                nonce += 1;
                plain.truncate(len);
                Bytes::from(plain)
            } else {
                frame.freeze()
            };
            let record = match Record::decode(plain) {
                Ok(record) => record,
                Err(_) => return,
            };
            if let Record::Data(chunk) = record {
                match reassembler.push(chunk) {
                    Ok(Some(message)) => assert!(message.body.len() <= MAX_MESSAGE_BYTES),
                    Ok(None) => {}
                    Err(_) => return,
                }
            }
        }
    }
}

fn flip_bits(message: &mut [u8], count: u8, positions: &[u8]) {
    if message.is_empty() {
        return;
    }
    for (i, p) in positions.iter().take(usize::from(count)).enumerate() {
        let at = (usize::from(*p) * 7 + i * 31) % message.len();
        message[at] ^= 1 << (p % 8);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 5 {
        0 => {
            if let Ok((established, _)) = respond(
                params(&KEY_B, "b"),
                rest,
                member_of,
                &mut ReplayGuard::default(),
            ) {
                // Only a forged message 1 of a member could get here: impossible without its key.
                panic!("accepted arbitrary bytes from {}", established.peer_name);
            }
        }
        1 => {
            let Some((&choice, name)) = rest.split_first() else {
                return;
            };
            let (private, key_name) = match choice % 3 {
                0 => (KEY_A, Some("a")),
                1 => (KEY_C, Some("c")),
                _ => (KEY_STRANGER, None),
            };
            let name = String::from_utf8_lossy(name);
            let Ok((_, mut m1)) = Initiator::start(params(&private, &name), "b", &public(KEY_B), 1)
            else {
                return;
            };
            let flips = choice >> 2;
            flip_bits(&mut m1, flips, name.as_bytes());
            match respond(
                params(&KEY_B, "b"),
                &m1,
                member_of,
                &mut ReplayGuard::default(),
            ) {
                Ok((established, _)) => {
                    assert_eq!(Some(established.peer_name.as_str()), key_name);
                    assert_eq!(established.peer_name, name);
                }
                Err(HandshakeError::UnknownKey(_)) => {
                    assert!(key_name.is_none() || flips > 0)
                }
                Err(HandshakeError::WrongKeyForName { member, claimed }) => {
                    assert_eq!(Some(member.as_str()), key_name);
                    assert_ne!(member, claimed);
                }
                Err(_) => {}
            }
        }
        2 => {
            let Ok((initiator, _)) = Initiator::start(params(&KEY_A, "a"), "b", &public(KEY_B), 1)
            else {
                return;
            };
            assert!(
                initiator.finish(rest).is_err(),
                "accepted a forged message 2"
            );
        }
        3 => read_wire(rest, false),
        _ => {
            // Cut the input into records, seal them as a link's writer would.
            let mut wire = Vec::new();
            let mut input = rest;
            let mut nonce = 0u64;
            while input.len() >= 2 {
                let want = usize::from(u16::from_be_bytes([input[0], input[1]]));
                let take = want.min(input.len() - 2).min(MAX_RECORD_BYTES);
                let record = &input[2..2 + take];
                input = &input[2 + take..];
                let start = wire.len();
                wire.resize(start + FRAME_LEN_BYTES + MAX_NOISE_MESSAGE_BYTES, 0);
                let written = pair()
                    .sender
                    .write_message(nonce, record, &mut wire[start + FRAME_LEN_BYTES..])
                    .expect("seal");
                nonce += 1;
                wire[start..start + FRAME_LEN_BYTES]
                    .copy_from_slice(&frame_header(written).expect("frame fits"));
                wire.truncate(start + FRAME_LEN_BYTES + written);
            }
            read_wire(&wire, true);
        }
    }
});
