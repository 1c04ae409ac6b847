//! Sans-IO Noise handshake between two members: `Noise_IK_25519_ChaChaPoly_BLAKE2s`, or
//! `Noise_IKpsk2_...` when the cluster has a pre-shared key.
//!
//! Message 1 (initiator to responder) carries the initiator's static key, encrypted, and a hello
//! payload (protocol version, the initiator's name, a timestamp). The responder checks the static
//! key against the membership before it looks at the payload; an unknown key, or a known key
//! claiming another member's name, ends the handshake with no answer. Message 2 carries the
//! responder's name. The prologue binds the cluster id and the protocol version, so nodes of
//! another cluster or version fail the handshake. Neither payload is secret: IK's first payload
//! has no forward secrecy.
//!
//! Anti-replay (as WireGuard's TAI64N): IK's message 1 can be replayed by anyone who captured
//! it, and the responder would answer it as a new link. So message 1 carries the initiator's
//! timestamp (nanoseconds since the Unix epoch, strictly increasing per process), and the
//! responder's [`ReplayGuard`] keeps the greatest one accepted per initiator key and refuses
//! any message 1 whose timestamp is not greater. Only the initiator's own clock is compared
//! with itself, so clock skew between nodes does not matter; a node whose clock steps back
//! across a restart is refused by peers that saw it until its clock passes the old value. A
//! responder that restarts forgets the timestamps: a replay then gets an answer and a link
//! that never confirms (the replayer cannot send one transport frame), which the link registry
//! never prefers to a confirmed one (see `node.rs`).
//!
//! This file depends only on `snow` and `thiserror` (and on `codec` for limits) so that the fuzz
//! project can include it.

use snow::{Builder, HandshakeState, StatelessTransportState};

/// Version of the mesh protocol, bound into the prologue. 2: message 1 carries a timestamp.
pub const PROTOCOL_VERSION: u16 = 2;
/// Noise pattern without a pre-shared key.
pub const NOISE_PARAMS_IK: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
/// Noise pattern with the cluster-wide pre-shared key mixed in after message 2's `ee`/`se`.
pub const NOISE_PARAMS_IKPSK2: &str = "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
/// Largest handshake message we produce or accept.
pub const MAX_HANDSHAKE_MESSAGE_BYTES: usize = 1024;
const PROLOGUE_TAG: &[u8] = b"kermail-mesh\0";
const KEY_BYTES: usize = 32;
/// Bytes of the anti-replay timestamp at the end of message 1's payload.
const TIMESTAMP_BYTES: usize = 8;

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("noise: {0}")]
    Noise(String),
    #[error("refused unknown static key {0}")]
    UnknownKey(String),
    #[error("static key of member {member} presented with the name {claimed}")]
    WrongKeyForName { member: String, claimed: String },
    #[error("peer answered as {got}, expected {expected}")]
    UnexpectedPeer { expected: String, got: String },
    #[error("peer speaks mesh protocol version {0}, we speak {PROTOCOL_VERSION}")]
    Version(u16),
    #[error("malformed handshake payload")]
    BadPayload,
    #[error("handshake message of {0} bytes is too long")]
    TooLong(usize),
    #[error("replayed or stale handshake from {member}: its timestamp is not newer than the last accepted")]
    Replayed { member: String },
}

impl From<snow::Error> for HandshakeError {
    fn from(error: snow::Error) -> Self {
        HandshakeError::Noise(error.to_string())
    }
}

/// What both sides need to build a handshake.
#[derive(Clone, Copy)]
pub struct HandshakeParams<'a> {
    /// Our static private key.
    pub local_private_key: &'a [u8; KEY_BYTES],
    /// Our name in the membership.
    pub local_name: &'a str,
    /// Cluster id, bound into the prologue.
    pub cluster_id: &'a str,
    /// Optional cluster-wide pre-shared key (IKpsk2).
    pub psk: Option<&'a [u8; KEY_BYTES]>,
}

/// The prologue both sides mix in: a tag, the protocol version and the cluster id.
pub fn prologue(cluster_id: &str) -> Vec<u8> {
    let mut out = PROLOGUE_TAG.to_vec();
    out.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    out.extend_from_slice(cluster_id.as_bytes());
    out
}

fn builder<'a>(
    params: &HandshakeParams<'a>,
    prologue: &'a [u8],
) -> Result<Builder<'a>, HandshakeError> {
    let pattern = if params.psk.is_some() {
        NOISE_PARAMS_IKPSK2
    } else {
        NOISE_PARAMS_IK
    };
    let noise_params = pattern
        .parse()
        .map_err(|e: snow::Error| HandshakeError::Noise(e.to_string()))?;
    let mut builder = Builder::new(noise_params)
        .local_private_key(params.local_private_key)?
        .prologue(prologue)?;
    if let Some(psk) = params.psk {
        builder = builder.psk(2, psk)?;
    }
    Ok(builder)
}

/// Hello payload: version (2 bytes), name length (1), name, and in message 1 the timestamp
/// (8 bytes, big-endian).
fn encode_hello(name: &str, timestamp: Option<u64>) -> Result<Vec<u8>, HandshakeError> {
    let len = u8::try_from(name.len()).map_err(|_| HandshakeError::BadPayload)?;
    let mut out = PROTOCOL_VERSION.to_be_bytes().to_vec();
    out.push(len);
    out.extend_from_slice(name.as_bytes());
    if let Some(timestamp) = timestamp {
        out.extend_from_slice(&timestamp.to_be_bytes());
    }
    Ok(out)
}

fn decode_hello(
    payload: &[u8],
    with_timestamp: bool,
) -> Result<(String, Option<u64>), HandshakeError> {
    let [v0, v1, len, rest @ ..] = payload else {
        return Err(HandshakeError::BadPayload);
    };
    let version = u16::from_be_bytes([*v0, *v1]);
    if version != PROTOCOL_VERSION {
        return Err(HandshakeError::Version(version));
    }
    let name_len = usize::from(*len);
    let extra = if with_timestamp { TIMESTAMP_BYTES } else { 0 };
    if rest.len() != name_len + extra {
        return Err(HandshakeError::BadPayload);
    }
    let (name, tail) = rest.split_at(name_len);
    let name = String::from_utf8(name.to_vec()).map_err(|_| HandshakeError::BadPayload)?;
    let timestamp = match <[u8; TIMESTAMP_BYTES]>::try_from(tail) {
        Ok(bytes) => Some(u64::from_be_bytes(bytes)),
        Err(_) => None,
    };
    Ok((name, timestamp))
}

/// The responder's anti-replay state: the greatest message-1 timestamp accepted per initiator
/// static key. Only keys of members (or pending invitees) reach it, after their key and name
/// were checked, so it holds at most one entry per member; [`ReplayGuard::retain`] drops the
/// keys of departed members.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    greatest: std::collections::HashMap<[u8; KEY_BYTES], u64>,
}

impl ReplayGuard {
    /// Accepts `timestamp` from `key` if it is greater than every one accepted before.
    fn admit(
        &mut self,
        key: &[u8; KEY_BYTES],
        member: &str,
        timestamp: u64,
    ) -> Result<(), HandshakeError> {
        match self.greatest.get(key) {
            Some(seen) if timestamp <= *seen => Err(HandshakeError::Replayed {
                member: member.to_string(),
            }),
            _ => {
                self.greatest.insert(*key, timestamp);
                Ok(())
            }
        }
    }

    /// Keeps only the keys for which `keep` holds.
    pub fn retain(&mut self, keep: impl Fn(&[u8; KEY_BYTES]) -> bool) {
        self.greatest.retain(|key, _| keep(key));
    }
}

fn remote_key(state: &HandshakeState) -> Result<[u8; KEY_BYTES], HandshakeError> {
    let key = state
        .get_remote_static()
        .ok_or(HandshakeError::BadPayload)?;
    key.try_into().map_err(|_| HandshakeError::BadPayload)
}

/// A finished handshake: the transport keys and who the peer is.
pub struct Established {
    /// Transport keys; nonces are kept by the caller (reader and writer each keep their own).
    pub transport: StatelessTransportState,
    /// The peer's member name.
    pub peer_name: String,
    /// The peer's static public key.
    pub peer_key: [u8; KEY_BYTES],
}

impl std::fmt::Debug for Established {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Established")
            .field("peer_name", &self.peer_name)
            .finish()
    }
}

/// The initiator, waiting for message 2.
pub struct Initiator {
    state: HandshakeState,
    expected_name: String,
    expected_key: [u8; KEY_BYTES],
}

impl Initiator {
    /// Starts a handshake with the member `remote_name` whose key is `remote_key`; returns the
    /// initiator and message 1 to send. `timestamp` must be greater than that of every earlier
    /// handshake this key started (nanoseconds since the Unix epoch, made strictly increasing).
    pub fn start(
        params: HandshakeParams<'_>,
        remote_name: &str,
        remote_key: &[u8; KEY_BYTES],
        timestamp: u64,
    ) -> Result<(Initiator, Vec<u8>), HandshakeError> {
        let prologue = prologue(params.cluster_id);
        let mut state = builder(&params, &prologue)?
            .remote_public_key(remote_key)?
            .build_initiator()?;
        let mut message = vec![0u8; MAX_HANDSHAKE_MESSAGE_BYTES];
        let hello = encode_hello(params.local_name, Some(timestamp))?;
        let len = state.write_message(&hello, &mut message)?;
        message.truncate(len);
        Ok((
            Initiator {
                state,
                expected_name: remote_name.to_string(),
                expected_key: *remote_key,
            },
            message,
        ))
    }

    /// Reads message 2 and finishes.
    pub fn finish(mut self, message: &[u8]) -> Result<Established, HandshakeError> {
        if message.len() > MAX_HANDSHAKE_MESSAGE_BYTES {
            return Err(HandshakeError::TooLong(message.len()));
        }
        let mut payload = vec![0u8; MAX_HANDSHAKE_MESSAGE_BYTES];
        let len = self.state.read_message(message, &mut payload)?;
        let peer_key = remote_key(&self.state)?;
        if peer_key != self.expected_key {
            return Err(HandshakeError::UnexpectedPeer {
                expected: self.expected_name,
                got: "another key".into(),
            });
        }
        let (name, _) = decode_hello(&payload[..len], false)?;
        if name != self.expected_name {
            return Err(HandshakeError::UnexpectedPeer {
                expected: self.expected_name,
                got: name,
            });
        }
        let transport = self.state.into_stateless_transport_mode()?;
        Ok(Established {
            transport,
            peer_name: name,
            peer_key,
        })
    }
}

/// The responder's single step: reads message 1, checks the initiator against the membership
/// (`member_name_of_key` gives the member name of a static key, `None` for non-members) and its
/// timestamp against `replay`, and returns the established link and message 2 to send back.
pub fn respond(
    params: HandshakeParams<'_>,
    message: &[u8],
    member_name_of_key: impl Fn(&[u8; KEY_BYTES]) -> Option<String>,
    replay: &mut ReplayGuard,
) -> Result<(Established, Vec<u8>), HandshakeError> {
    if message.len() > MAX_HANDSHAKE_MESSAGE_BYTES {
        return Err(HandshakeError::TooLong(message.len()));
    }
    let prologue = prologue(params.cluster_id);
    let mut state = builder(&params, &prologue)?.build_responder()?;
    let mut payload = vec![0u8; MAX_HANDSHAKE_MESSAGE_BYTES];
    let len = state.read_message(message, &mut payload)?;
    // The static key decides before the payload is looked at.
    let peer_key = remote_key(&state)?;
    let Some(member) = member_name_of_key(&peer_key) else {
        return Err(HandshakeError::UnknownKey(base64_key(&peer_key)));
    };
    let (claimed, timestamp) = decode_hello(&payload[..len], true)?;
    if claimed != member {
        return Err(HandshakeError::WrongKeyForName { member, claimed });
    }
    replay.admit(
        &peer_key,
        &member,
        timestamp.ok_or(HandshakeError::BadPayload)?,
    )?;
    let mut reply = vec![0u8; MAX_HANDSHAKE_MESSAGE_BYTES];
    let reply_len = state.write_message(&encode_hello(params.local_name, None)?, &mut reply)?;
    reply.truncate(reply_len);
    let transport = state.into_stateless_transport_mode()?;
    Ok((
        Established {
            transport,
            peer_name: member,
            peer_key,
        },
        reply,
    ))
}

fn base64_key(key: &[u8; KEY_BYTES]) -> String {
    // Kept local (no base64 dependency) so the fuzz project can include this file.
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in key.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::identity::{encode_key, Identity};

    struct Node {
        name: &'static str,
        identity: Identity,
    }

    fn node(name: &'static str, seed: u8) -> Node {
        Node {
            name,
            identity: Identity::from_private([seed; 32]),
        }
    }

    fn params<'a>(
        node: &'a Node,
        cluster: &'a str,
        psk: Option<&'a [u8; 32]>,
    ) -> HandshakeParams<'a> {
        HandshakeParams {
            local_private_key: node.identity.private_key(),
            local_name: node.name,
            cluster_id: cluster,
            psk,
        }
    }

    fn members<'a>(nodes: &'a [&'a Node]) -> impl Fn(&[u8; 32]) -> Option<String> + 'a {
        move |key| {
            nodes
                .iter()
                .find(|n| &n.identity.public_key() == key)
                .map(|n| n.name.to_string())
        }
    }

    fn run(
        a: &Node,
        a_cluster: &str,
        b: &Node,
        b_cluster: &str,
        psk_a: Option<&[u8; 32]>,
        psk_b: Option<&[u8; 32]>,
        known: &[&Node],
    ) -> Result<(Established, Established), HandshakeError> {
        let (initiator, m1) = Initiator::start(
            params(a, a_cluster, psk_a),
            b.name,
            &b.identity.public_key(),
            1,
        )?;
        let (responder_side, m2) = respond(
            params(b, b_cluster, psk_b),
            &m1,
            members(known),
            &mut ReplayGuard::default(),
        )?;
        let initiator_side = initiator.finish(&m2)?;
        Ok((initiator_side, responder_side))
    }

    #[test]
    fn members_complete_and_transport_works() {
        let (a, b) = (node("a", 1), node("b", 2));
        let psk = [9u8; 32];
        for psk in [None, Some(&psk)] {
            let (ia, rb) = run(&a, "c1", &b, "c1", psk, psk, &[&a, &b]).unwrap();
            assert_eq!(ia.peer_name, "b");
            assert_eq!(rb.peer_name, "a");
            let mut ct = vec![0u8; 64];
            let n = ia.transport.write_message(0, b"hello", &mut ct).unwrap();
            let mut pt = vec![0u8; 64];
            let m = rb.transport.read_message(0, &ct[..n], &mut pt).unwrap();
            assert_eq!(&pt[..m], b"hello");
            // A replayed nonce does not decrypt.
            assert!(rb.transport.read_message(1, &ct[..n], &mut pt).is_err());
        }
    }

    #[test]
    fn unknown_key_is_refused() {
        let (a, b, x) = (node("a", 1), node("b", 2), node("a", 3));
        let err = run(&x, "c1", &b, "c1", None, None, &[&a, &b]).unwrap_err();
        assert_eq!(
            err,
            HandshakeError::UnknownKey(encode_key(&x.identity.public_key()))
        );
    }

    #[test]
    fn member_key_with_another_name_is_refused() {
        let (a, b, c) = (node("a", 1), node("b", 2), node("c", 3));
        let liar = Node {
            name: "a",
            identity: c.identity.clone(),
        };
        let err = run(&liar, "c1", &b, "c1", None, None, &[&a, &b, &c]).unwrap_err();
        assert_eq!(
            err,
            HandshakeError::WrongKeyForName {
                member: "c".into(),
                claimed: "a".into()
            }
        );
    }

    #[test]
    fn responder_with_wrong_key_fails() {
        // The initiator expects b's key; an impostor at b's address cannot read message 1.
        let (a, b, impostor) = (node("a", 1), node("b", 2), node("b", 4));
        let (_initiator, m1) =
            Initiator::start(params(&a, "c1", None), "b", &b.identity.public_key(), 1).unwrap();
        assert!(matches!(
            respond(
                params(&impostor, "c1", None),
                &m1,
                members(&[&a, &b]),
                &mut ReplayGuard::default()
            ),
            Err(HandshakeError::Noise(_))
        ));
    }

    #[test]
    fn other_cluster_or_psk_fails() {
        let (a, b) = (node("a", 1), node("b", 2));
        assert!(matches!(
            run(&a, "c1", &b, "c2", None, None, &[&a, &b]),
            Err(HandshakeError::Noise(_))
        ));
        let (p1, p2) = ([1u8; 32], [2u8; 32]);
        assert!(matches!(
            run(&a, "c1", &b, "c1", Some(&p1), Some(&p2), &[&a, &b]),
            Err(HandshakeError::Noise(_))
        ));
        assert!(matches!(
            run(&a, "c1", &b, "c1", None, Some(&p2), &[&a, &b]),
            Err(HandshakeError::Noise(_))
        ));
    }

    #[test]
    fn garbage_message_one_is_an_error() {
        let b = node("b", 2);
        for len in [0usize, 1, 31, 32, 48, 96, 200, 2000] {
            let garbage = vec![0x5a; len];
            let mut guard = ReplayGuard::default();
            let answer = respond(
                params(&b, "c1", None),
                &garbage,
                |_| Some("a".into()),
                &mut guard,
            );
            assert!(answer.is_err());
        }
    }

    #[test]
    fn replayed_or_older_message_one_is_refused() {
        let (a, b, c) = (node("a", 1), node("b", 2), node("c", 3));
        let known = [&a, &b, &c];
        let mut guard = ReplayGuard::default();
        let start = |from: &Node, timestamp: u64| {
            Initiator::start(
                params(from, "c1", None),
                "b",
                &b.identity.public_key(),
                timestamp,
            )
            .unwrap()
        };
        let answer = |m1: &[u8], guard: &mut ReplayGuard| {
            respond(params(&b, "c1", None), m1, members(&known), guard).map(|(e, _)| e.peer_name)
        };
        let (_, m1_at_10) = start(&a, 10);
        assert_eq!(answer(&m1_at_10, &mut guard).unwrap(), "a");
        // The same bytes again: refused, before any answer.
        let replayed = HandshakeError::Replayed { member: "a".into() };
        assert_eq!(answer(&m1_at_10, &mut guard).unwrap_err(), replayed);
        // A genuine but older or equal message 1 (say, delayed): refused too.
        let (_, m1_at_9) = start(&a, 9);
        assert_eq!(answer(&m1_at_9, &mut guard).unwrap_err(), replayed);
        let (_, m1_at_10_again) = start(&a, 10);
        assert_eq!(answer(&m1_at_10_again, &mut guard).unwrap_err(), replayed);
        // Newer: accepted. Timestamps are per initiator key: c's 5 is fine.
        let (_, m1_at_11) = start(&a, 11);
        assert_eq!(answer(&m1_at_11, &mut guard).unwrap(), "a");
        let (_, c_at_5) = start(&c, 5);
        assert_eq!(answer(&c_at_5, &mut guard).unwrap(), "c");
        // A refused handshake (unknown key) leaves no entry: the guard holds members only.
        let stranger = node("x", 9);
        let (_, x_at_1) = start(&stranger, 1);
        assert!(matches!(
            answer(&x_at_1, &mut guard),
            Err(HandshakeError::UnknownKey(_))
        ));
        assert_eq!(guard.greatest.len(), 2);
        // A departed member's entry goes.
        guard.retain(|key| *key != c.identity.public_key());
        assert_eq!(guard.greatest.len(), 1);
    }

    #[test]
    fn message_one_without_timestamp_is_malformed() {
        assert_eq!(
            decode_hello(&encode_hello("a", None).unwrap(), true),
            Err(HandshakeError::BadPayload)
        );
        assert_eq!(
            decode_hello(&encode_hello("a", Some(3)).unwrap(), true),
            Ok(("a".to_string(), Some(3)))
        );
        assert_eq!(
            decode_hello(&encode_hello("a", Some(3)).unwrap(), false),
            Err(HandshakeError::BadPayload)
        );
    }

    #[test]
    fn base64_matches_the_base64_crate() {
        for seed in 0..5u8 {
            let key = [seed.wrapping_mul(37); 32];
            assert_eq!(base64_key(&key), encode_key(&key));
        }
    }
}
