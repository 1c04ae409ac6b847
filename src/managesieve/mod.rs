//! ManageSieve (RFC 5804): users upload, list, activate and delete their Sieve scripts
//! (Roundcube's filter page, `sieve-connect`). `session.rs`: parsing and commands (bytes in,
//! bytes out; the store is the only I/O); `server.rs`: the tokio driver (STARTTLS, pre-auth
//! deadline, session limits). Scripts live in the replicated state (`store::sieve_state`).
//!
//! Rules shared with IMAP: AUTHENTICATE PLAIN only after STARTTLS (loopback listeners
//! excepted, like IMAP), passwords checked through the node's login throttle
//! (`MailStore::authenticate_from`), a total pre-auth deadline, bounded lines and literals.

pub mod server;
pub mod session;

use serde::{Deserialize, Serialize};

/// `[managesieve]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ManageSieveConfig {
    /// Listeners (STARTTLS offered). Default `["127.0.0.1:4190"]` (4190 is the registered
    /// port and needs no privilege); production: `["0.0.0.0:4190"]`.
    pub listen: Vec<String>,
    /// A client that has not logged in this long after connecting is dropped (TLS and
    /// everything included). Default 60.
    pub preauth_timeout_secs: u64,
    /// An authenticated client silent this long is dropped. Default 600.
    pub idle_timeout_secs: u64,
    /// Concurrent sessions. Default 200.
    pub max_sessions: usize,
    /// Concurrent sessions from one address (IPv6: one /64). Default 10.
    pub max_sessions_per_ip: usize,
    /// Failed AUTHENTICATE attempts before the session is closed. Default 3.
    pub max_failed_auth_per_session: u32,
}

impl Default for ManageSieveConfig {
    fn default() -> Self {
        ManageSieveConfig {
            listen: vec!["127.0.0.1:4190".to_owned()],
            preauth_timeout_secs: 60,
            idle_timeout_secs: 600,
            max_sessions: 200,
            max_sessions_per_ip: 10,
            max_failed_auth_per_session: 3,
        }
    }
}
