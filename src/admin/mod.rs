//! Administration: a Unix socket in the data folder (mode 0600), so no admin port is ever on
//! the network. The CLI ([`client`]) sends one JSON request per connection; the node
//! ([`server`]) answers with text lines or an error.
//!
//! Mail administration (domains, accounts, aliases) goes through the mail store; cluster
//! administration goes to the cluster crate's own API.

pub mod backup;
pub mod client;
pub mod cluster;
pub mod outbound;
pub mod server;

use serde::{Deserialize, Serialize};

/// The largest request or response line accepted on the admin socket.
pub const MAX_ADMIN_MESSAGE_BYTES: usize = 1024 * 1024;

/// One admin request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminRequest {
    DomainAdd {
        domain: String,
    },
    DomainRemove {
        domain: String,
    },
    DomainList,
    UserAdd {
        address: String,
        password: String,
    },
    UserPasswd {
        address: String,
        password: String,
    },
    UserRemove {
        address: String,
    },
    UserList {
        domain: Option<String>,
    },
    /// `kermail user quota`: shows the account's quota and usage, after setting the limits
    /// given (none given: only shows).
    UserQuota {
        address: String,
        storage: Option<crate::store::QuotaSetting>,
        messages: Option<crate::store::QuotaSetting>,
    },
    AliasAdd {
        source: String,
        target: String,
    },
    AliasRemove {
        source: String,
        target: String,
    },
    AliasList {
        domain: Option<String>,
    },
    Status,
    /// DKIM keys and the outbound queue (`outbound.rs`).
    Outbound(outbound::OutboundRequest),
    /// The mesh links (`kermail mesh status`); `json`: one line of JSON.
    MeshStatus {
        json: bool,
    },
    /// Every node and the site-loss verdict (`kermail cluster status`).
    ClusterStatus {
        json: bool,
    },
    /// Records an invitation; the answer's only line is the token.
    ClusterInvite {
        name: String,
        site: String,
        learner: bool,
    },
    /// Starts joining the cluster a token invites this node to.
    ClusterJoin {
        token: String,
    },
    /// Where this node's join stands: one line of JSON ([`kermail_cluster::JoinReport`]).
    ClusterJoinStatus,
    /// Takes this node out of the cluster.
    ClusterLeave,
    /// Removes a member that is gone for good.
    ClusterRemove {
        name: String,
    },
    /// Backups (`backup.rs`).
    Backup(backup::BackupRequest),
}

/// The answer: lines to print, or an error to print on standard error (exit status 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AdminResponse {
    Ok { lines: Vec<String> },
    Error { message: String },
}
