//! The openraft type configuration of kermail's cluster.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A node's id in the Raft group: a random `u64` chosen on the node's first start and kept in
/// its log store.
pub type NodeId = u64;

/// What the cluster knows about a member: its name and site (for status and the site-loss
/// verdict), its mesh identity (static public key, base64) and the addresses its mesh listens
/// on. The mesh's member list is built from these records, so a node id is bound to a key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub site: String,
    /// The node's static X25519 public key, base64 (as `kermail keygen` prints it).
    pub public_key: String,
    /// Mesh addresses (`ip:port`), tried in order.
    pub addrs: Vec<String>,
    /// Present while the node is joining: invited, then catching up, until it is a full
    /// member (a voter, or a learner when invited as one).
    pub joining: Option<Joining>,
}

/// The progress of a node invited by `kermail cluster invite`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Joining {
    /// The invitation is refused after this time (milliseconds since the Unix epoch) unless
    /// the node has already connected (`connected`).
    pub expires_unix_ms: u64,
    /// Promote to voter once caught up (false: stays a learner).
    pub as_voter: bool,
    /// The invited node connected and asked to join.
    pub connected: bool,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{} ({})", self.name, self.site, self.addrs.join(","))
    }
}

/// The payload of one Raft log entry: one or more application commands, each encoded by the
/// application, applied in order.
///
/// openraft 0.9 appends and fsyncs every `client_write` on its own, so the proposal batcher in
/// [`crate::raft::node`] packs the commands of concurrent proposers into one entry: that is how
/// many proposals share one fsync (group commit).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandBatch(#[serde(with = "byte_strings")] pub Vec<Vec<u8>>);

/// The application's responses to the commands of one [`CommandBatch`], in the same order.
/// Blank and membership entries get an empty list.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResponses(#[serde(with = "byte_strings")] pub Vec<Vec<u8>>);

/// Serialises a list of byte vectors as serde byte strings: bincode then writes each as a length
/// and a copy, instead of one serde call per byte (which costs milliseconds for a batch of
/// messages, even optimised).
mod byte_strings {
    use std::fmt;

    use serde::de::{SeqAccess, Visitor};
    use serde::ser::SerializeSeq;
    use serde::{Deserializer, Serializer};

    /// Bound on the capacity reserved from a length read off the wire.
    const MAX_PREALLOCATED_ITEMS: usize = 4096;

    struct AsBytes<'a>(&'a [u8]);

    impl serde::Serialize for AsBytes<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.serialize_bytes(self.0)
        }
    }

    struct ByteBuf(Vec<u8>);

    impl<'de> serde::Deserialize<'de> for ByteBuf {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct BytesVisitor;
            impl<'de> Visitor<'de> for BytesVisitor {
                type Value = ByteBuf;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a byte string")
                }
                fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<ByteBuf, E> {
                    Ok(ByteBuf(v.to_vec()))
                }
                fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<ByteBuf, E> {
                    Ok(ByteBuf(v))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ByteBuf, A::Error> {
                    let mut bytes = Vec::new();
                    while let Some(byte) = seq.next_element::<u8>()? {
                        bytes.push(byte);
                    }
                    Ok(ByteBuf(bytes))
                }
            }
            deserializer.deserialize_byte_buf(BytesVisitor)
        }
    }

    pub fn serialize<S: Serializer>(items: &[Vec<u8>], serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(items.len()))?;
        for item in items {
            seq.serialize_element(&AsBytes(item))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Vec<u8>>, D::Error> {
        struct ListVisitor;
        impl<'de> Visitor<'de> for ListVisitor {
            type Value = Vec<Vec<u8>>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of byte strings")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items =
                    Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_PREALLOCATED_ITEMS));
                while let Some(ByteBuf(item)) = seq.next_element()? {
                    items.push(item);
                }
                Ok(items)
            }
        }
        deserializer.deserialize_seq(ListVisitor)
    }
}

// Commands carry message bodies and responses may carry account data: logs show sizes only.
impl fmt::Debug for CommandBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n_bytes: usize = self.0.iter().map(Vec::len).sum();
        write!(
            f,
            "CommandBatch(n_commands={}, n_bytes={})",
            self.0.len(),
            n_bytes
        )
    }
}

impl fmt::Display for CommandBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl fmt::Debug for CommandResponses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n_bytes: usize = self.0.iter().map(Vec::len).sum();
        write!(
            f,
            "CommandResponses(n_responses={}, n_bytes={})",
            self.0.len(),
            n_bytes
        )
    }
}

openraft::declare_raft_types!(
    /// openraft's type configuration for kermail. Snapshots are files, so that a mailbox-sized
    /// state never has to fit in memory.
    pub TypeConfig:
        D = CommandBatch,
        R = CommandResponses,
        NodeId = NodeId,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A log entry of kermail's Raft log.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id (leader term and node, index).
pub type LogId = openraft::LogId<NodeId>;
/// Openraft's storage error for this configuration.
pub type StorageError = openraft::StorageError<NodeId>;
/// The membership as last applied, with the log id that carried it.
pub type StoredMembership = openraft::StoredMembership<NodeId, NodeInfo>;
/// A snapshot's metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, NodeInfo>;
/// The Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;
