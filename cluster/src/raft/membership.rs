//! Membership pieces that need no Raft: invitation tokens, the join state kept in the data
//! folder, the site-loss verdict and the mesh member list derived from the Raft membership.
//!
//! An invitation is a learner entry in the Raft membership whose [`NodeInfo::joining`] is set
//! and whose key is a key pair generated at invite time. Because it goes through Raft, every
//! member's mesh accepts that key. The token carries the private half, so the invited node
//! takes that key as its own `node.key` (the token is a secret: one use, short-lived).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::types::{NodeId, NodeInfo};
use crate::mesh::{Identity, Member};

/// Prefix of every invitation token (the version is part of it).
pub const TOKEN_PREFIX: &str = "kermail-invite-1.";
/// Longest token accepted (a few dozen members fit easily).
pub const MAX_TOKEN_BYTES: usize = 64 * 1024;
/// How long an invitation stays valid by default.
pub const DEFAULT_INVITE_VALID_MS: u64 = 60 * 60 * 1000;
/// File in the data folder holding the name and site a join gave this node.
pub const IDENTITY_FILE: &str = "cluster-identity.json";
/// File in the data folder holding a join in progress (or done).
pub const JOIN_FILE: &str = "join.json";

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a new node needs to reach the cluster and be recognised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteToken {
    pub cluster_id: String,
    pub psk_base64: Option<String>,
    /// The node id, name and site the invited node takes.
    pub node_id: NodeId,
    pub name: String,
    pub site: String,
    /// The invited node's mesh private key, base64 (generated at invite time; its public half
    /// is in the Raft membership).
    pub private_key_base64: String,
    pub learner: bool,
    pub expires_unix_ms: u64,
    /// The current members (not pending invitations): ids, names, sites, keys, addresses.
    pub members: Vec<(NodeId, NodeInfo)>,
}

impl InviteToken {
    /// The token as one line of text.
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
        )
    }

    /// Parses a token produced by [`InviteToken::encode`].
    pub fn decode(text: &str) -> Result<InviteToken, String> {
        let text = text.trim();
        if text.len() > MAX_TOKEN_BYTES {
            return Err("the invitation token is too long".to_string());
        }
        let body = text.strip_prefix(TOKEN_PREFIX).ok_or_else(|| {
            "not a kermail invitation token (get one with `kermail cluster invite`)".to_string()
        })?;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| "the invitation token is damaged (bad base64)".to_string())?;
        serde_json::from_slice(&json).map_err(|e| format!("the invitation token is damaged: {e}"))
    }

    /// The key pair the invited node takes.
    pub fn identity(&self) -> Result<Identity, String> {
        crate::mesh::identity::decode_key(&self.private_key_base64)
            .map(Identity::from_private)
            .map_err(|_| "the invitation token carries a malformed key".to_string())
    }
}

/// The phase of a join, persisted so that a restart resumes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinPhase {
    /// Key, name and site written; the old one-node Raft store must still be wiped.
    Prepared,
    /// Raft store wiped and reopened under the token's node id; catching up.
    Joining,
    /// A full member.
    Done,
    /// The cluster refused the join (expired or removed invitation).
    Failed,
}

/// The join state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinState {
    pub token: InviteToken,
    pub phase: JoinPhase,
    /// Why the join failed, for `Failed`.
    pub error: Option<String>,
}

/// The name and site this node took when it joined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedIdentity {
    pub name: String,
    pub site: String,
}

/// Writes `value` as JSON to `path` atomically (temp file, fsync, rename, fsync the folder),
/// with mode 0600.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` atomically with mode 0600.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let temp = path.with_extension("tmp");
    {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&temp, path)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Reads a JSON file; `Ok(None)` when it does not exist.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> std::io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display()))),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

/// Writes a key pair as a key file (the format `kermail keygen` writes), mode 0600, replacing
/// any file there.
pub fn write_key_file(path: &Path, identity: &Identity) -> std::io::Result<()> {
    let text = format!(
        "{}\n",
        crate::mesh::identity::encode_key(identity.private_key())
    );
    write_atomic(path, text.as_bytes())
}

/// Paths of the join files in a data folder.
pub fn identity_path(data_dir: &Path) -> PathBuf {
    data_dir.join(IDENTITY_FILE)
}

pub fn join_path(data_dir: &Path) -> PathBuf {
    data_dir.join(JOIN_FILE)
}

/// Whether an invitation in the membership is still waiting for its node and has expired.
pub fn invitation_expired(info: &NodeInfo, now_unix_ms: u64) -> bool {
    info.joining
        .as_ref()
        .is_some_and(|j| !j.connected && j.expires_unix_ms <= now_unix_ms)
}

/// Whether a node is an invitation whose node has not connected yet (the mesh accepts its key
/// as a pending invitee but does not dial it).
pub fn is_pending_invitation(info: &NodeInfo) -> bool {
    info.joining.as_ref().is_some_and(|j| !j.connected)
}

/// Whether a member may act as a leader or a candidate (send AppendEntries, Vote or snapshot
/// requests): a voter, or a node invited as a voter that connected and is being promoted (a
/// replica that has not seen the promotion yet must still follow it once it leads). A learner
/// never may.
pub fn may_lead(info: &NodeInfo, is_voter: bool) -> bool {
    is_voter
        || info
            .joining
            .as_ref()
            .is_some_and(|j| j.as_voter && j.connected)
}

/// The mesh member list for a membership: every node with a valid key, except invitations
/// that expired before their node connected.
pub fn mesh_members<'a>(
    nodes: impl IntoIterator<Item = (&'a NodeId, &'a NodeInfo)>,
    now_unix_ms: u64,
) -> Vec<Member> {
    let mut members: BTreeMap<String, Member> = BTreeMap::new();
    for (_, info) in nodes {
        if invitation_expired(info, now_unix_ms) || info.public_key.is_empty() {
            continue;
        }
        members.insert(
            info.name.clone(),
            Member {
                name: info.name.clone(),
                site: info.site.clone(),
                public_key: info.public_key.clone(),
                addrs: info.addrs.iter().filter_map(|a| a.parse().ok()).collect(),
            },
        );
    }
    members.into_values().collect()
}

/// The site-loss verdict: the sites whose loss would leave fewer than a majority of the voters.
/// A site holding `v` of `n` voters is critical when `n - v <= n / 2`, that is `2 v >= n`.
/// Returns the critical sites, sorted; empty means the cluster survives the loss of any one
/// site.
pub fn critical_sites<'a>(voter_sites: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut per_site: BTreeMap<&str, usize> = BTreeMap::new();
    let mut n_voters = 0;
    for site in voter_sites {
        *per_site.entry(site).or_default() += 1;
        n_voters += 1;
    }
    per_site
        .into_iter()
        .filter(|(_, n)| 2 * n >= n_voters)
        .map(|(site, _)| site.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(sites: &[&str], expected: &[&str]) {
        assert_eq!(
            critical_sites(sites.iter().copied()),
            expected.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            "voters on {sites:?}"
        );
    }

    #[test]
    fn verdict_names_each_site_whose_loss_stops_writes() {
        // One node: its site is critical.
        check(&["a"], &["a"]);
        // Two sites never survive: each holds half or more.
        check(&["a", "b"], &["a", "b"]);
        check(&["a", "a", "b"], &["a"]);
        check(&["a", "a", "b", "b"], &["a", "b"]);
        check(&["a", "a", "a", "b", "b"], &["a"]);
        // Three sites, one voter each: survives.
        check(&["a", "b", "c"], &[]);
        // Three sites, but one holds half of four voters.
        check(&["a", "a", "b", "c"], &["a"]);
        check(&["a", "a", "b", "b", "c"], &[]);
        check(&["a", "b", "c", "d"], &[]);
        // Everything on one site.
        check(&["a", "a", "a"], &["a"]);
        // No voters at all (cannot happen in a running cluster): nothing to lose.
        check(&[], &[]);
    }

    #[test]
    fn token_round_trips_and_refuses_damage() {
        let token = InviteToken {
            cluster_id: "kermail".into(),
            psk_base64: None,
            node_id: 7,
            name: "n4".into(),
            site: "s4".into(),
            private_key_base64: crate::mesh::identity::encode_key(&[3u8; 32]),
            learner: false,
            expires_unix_ms: 1,
            members: vec![(
                1,
                NodeInfo {
                    name: "n1".into(),
                    site: "s1".into(),
                    public_key: "k".into(),
                    addrs: vec!["127.0.0.1:7655".into()],
                    joining: None,
                },
            )],
        };
        let text = token.encode();
        assert!(!text.contains(char::is_whitespace));
        assert_eq!(InviteToken::decode(&format!("  {text}\n")), Ok(token));
        assert!(InviteToken::decode("hello").is_err());
        assert!(InviteToken::decode(&format!("{TOKEN_PREFIX}!!!")).is_err());
        assert!(InviteToken::decode(&text[..text.len() - 5]).is_err());
    }

    #[test]
    fn expired_invitations_leave_the_mesh_member_list() {
        let member = |name: &str, joining: Option<super::super::types::Joining>| NodeInfo {
            name: name.into(),
            site: "s".into(),
            public_key: crate::mesh::identity::encode_key(&[1u8; 32]),
            addrs: vec!["127.0.0.1:1".into()],
            joining,
        };
        let invite = |connected| super::super::types::Joining {
            expires_unix_ms: 100,
            as_voter: true,
            connected,
        };
        let nodes: BTreeMap<NodeId, NodeInfo> = BTreeMap::from([
            (1, member("a", None)),
            (2, member("b", Some(invite(false)))),
            (3, member("c", Some(invite(true)))),
        ]);
        let names = |now| -> Vec<String> {
            mesh_members(&nodes, now)
                .into_iter()
                .map(|m| m.name)
                .collect()
        };
        assert_eq!(names(50), ["a", "b", "c"]);
        assert_eq!(names(100), ["a", "c"]);
    }
}
