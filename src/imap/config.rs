//! The `[imap]` configuration section.

use serde::{Deserialize, Serialize};

/// Limits and listeners of the IMAP server. Every field has a documented default.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImapConfig {
    /// Plain listeners offering STARTTLS. Default `["127.0.0.1:2143"]`.
    pub listen: Vec<String>,
    /// Implicit-TLS listeners (IMAPS). Default `["127.0.0.1:2993"]`.
    pub listen_tls: Vec<String>,
    /// Longest command line (without literals) a client may send. Default 64 KiB.
    pub max_line_length_bytes: usize,
    /// Largest literal, and so the largest APPEND. Default 64 MiB.
    pub max_literal_size_bytes: u32,
    /// An authenticated client silent this long is logged out (RFC 3501 asks for at least
    /// 30 minutes). Default 1800.
    pub idle_timeout_secs: u64,
    /// A client that has not logged in this long after connecting is dropped: a total
    /// deadline for the pre-auth phase (TLS handshakes, STARTTLS, reads and writes), which
    /// trickling bytes cannot extend. Default 60.
    pub preauth_timeout_secs: u64,
    /// Concurrent sessions over all clients. Default 1000.
    pub max_sessions: usize,
    /// Concurrent sessions from one IP address (IPv6: from one /64). Default 50.
    pub max_sessions_per_ip: usize,
    /// Failed LOGIN/AUTHENTICATE attempts before the session is closed. Default 3.
    pub max_failed_auth_per_session: u32,
    /// On shutdown, sessions get this long to finish their current command. Default 10.
    pub shutdown_grace_secs: u64,
    /// Headers of recently read messages kept in memory for header fetches and searches.
    /// Default 64 MiB; 0 disables the cache.
    pub header_cache_bytes: usize,
    /// A successful login is remembered this long (as a keyed hash, never the password), so
    /// repeat logins skip argon2id. It is also how long an old password keeps working for
    /// repeat logins after a password change. Default 60; 0 disables the cache.
    pub auth_cache_ttl_secs: u64,
    /// A FETCH whose messages' bodies add up to more than this is refused with
    /// `NO [LIMIT]` (its response is built in memory). Default 256 MiB.
    pub max_fetch_body_bytes: u64,
}

impl Default for ImapConfig {
    fn default() -> Self {
        ImapConfig {
            listen: vec!["127.0.0.1:2143".to_owned()],
            listen_tls: vec!["127.0.0.1:2993".to_owned()],
            max_line_length_bytes: 64 * 1024,
            max_literal_size_bytes: 64 * 1024 * 1024,
            idle_timeout_secs: 30 * 60,
            preauth_timeout_secs: 60,
            max_sessions: 1000,
            max_sessions_per_ip: 50,
            max_failed_auth_per_session: 3,
            shutdown_grace_secs: 10,
            header_cache_bytes: 64 * 1024 * 1024,
            auth_cache_ttl_secs: 60,
            max_fetch_body_bytes: 256 * 1024 * 1024,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_section_gives_the_defaults_and_unknown_keys_are_refused() {
        let config: ImapConfig = toml::from_str("").unwrap();
        assert_eq!(config.listen, vec!["127.0.0.1:2143".to_owned()]);
        assert_eq!(config.max_literal_size_bytes, 64 * 1024 * 1024);
        assert!(toml::from_str::<ImapConfig>("bogus = 1").is_err());
    }
}
