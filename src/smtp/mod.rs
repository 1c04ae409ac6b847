//! SMTP server, MX role (RFC 5321): receives mail for the local domains.
//!
//! Module map:
//! - [`session`]: the sans-IO session. An explicit state ([`session::Mode`]) and one transition
//!   function, [`session::Session::step`]: bytes, time and driver events in; replies and
//!   [`session::Action`]s (start TLS, deliver, close) out. Recipient checks go through the
//!   [`session::Recipients`] trait, so the session is tested without a store.
//! - [`data`]: the DATA reader (end-of-data detection and dot-unstuffing).
//! - [`server`]: the tokio driver: accept loop, concurrency limits, timeouts, STARTTLS,
//!   delivery through [`crate::store::MailStore::deliver`], graceful shutdown.
//!
//! Invariants:
//! - `250` to the end of a message is written only after `MailStore::deliver` returned `Ok`,
//!   which it does only after the delivery command is committed. Any failure: `451 4.3.0`.
//! - A recipient is accepted only when the store says it is local; a foreign domain from an
//!   unauthenticated client is `550 5.7.1` (this role never authenticates).
//! - After STARTTLS, nothing the client sent in plaintext behind the command is used.
//! - Every buffer is bounded: command lines by `max_command_line_length_bytes`, messages by
//!   `max_message_size_bytes`, unprocessed input by one read buffer.
//!
//! Submission (port 587/465, AUTH, the queue for foreign recipients) will reuse the session:
//! its relay decision already depends on one `authenticated` flag that the MX role never sets.

pub mod data;
pub mod server;
pub mod session;
#[cfg(test)]
mod test_client;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use server::serve;

/// The `[smtp]` section of the node's configuration. Every limit has a documented default.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    /// Addresses the MX listener binds. Default `["127.0.0.1:2525"]`.
    pub listen: Vec<SocketAddr>,
    /// Longest command line accepted, CRLF included. Longer lines get `500 5.5.2 line too
    /// long` and are discarded up to their end. Default 2048 (RFC 5321 asks for at least 512;
    /// extensions make lines longer).
    pub max_command_line_length_bytes: usize,
    /// Largest message accepted, before the trace headers are added (capped at the store's
    /// `MAX_MESSAGE_BYTES`, 128 MiB, minus 4 KiB for those headers). Advertised in the EHLO
    /// `SIZE` line, checked against `MAIL FROM ... SIZE=` and while receiving (`552 5.3.4`).
    /// Lines inside DATA have no limit of their own: they are stored unchanged (wrapping would
    /// break DKIM signatures and byte-exact storage), and this limit bounds the memory.
    /// Default 25 MiB (26214400).
    pub max_message_size_bytes: usize,
    /// Recipients accepted per message; the next ones get `452 4.5.3` (the client sends them
    /// in another transaction). Capped at the store's `MAX_RECIPIENTS_PER_DELIVERY` (1000).
    /// Default 100.
    pub max_recipients_per_message: usize,
    /// Permanent (5xx) replies a session may earn before it is closed with `421 4.7.0`.
    /// Default 20.
    pub max_errors_per_session: u32,
    /// Idle time allowed while waiting for a command, then `421 4.4.2` and close.
    /// Default 300 (RFC 5321 section 4.5.3.2.7).
    pub command_timeout_secs: u64,
    /// Idle time allowed between two reads of message data (DATA or BDAT), then `421 4.4.2`
    /// and close, storing nothing. Default 180 (RFC 5321 section 4.5.3.2.5).
    pub data_timeout_secs: u64,
    /// Sessions open at once over all clients; extra connections get `421 4.7.0` and are
    /// closed. Default 1000.
    pub max_sessions: usize,
    /// Sessions open at once from one client IP address. Default 100 (the benchmark opens 50
    /// from 127.0.0.1).
    pub max_sessions_per_ip: usize,
    /// On shutdown, how long sessions in the middle of a transaction may take to finish it
    /// before they are cut. Default 30.
    pub shutdown_grace_period_secs: u64,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 2525))],
            max_command_line_length_bytes: 2048,
            max_message_size_bytes: 25 * 1024 * 1024,
            max_recipients_per_message: 100,
            max_errors_per_session: 20,
            command_timeout_secs: 300,
            data_timeout_secs: 180,
            max_sessions: 1000,
            max_sessions_per_ip: 100,
            shutdown_grace_period_secs: 30,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_round_trip_through_toml_and_an_empty_section_means_defaults() {
        let text = toml::to_string(&SmtpConfig::default()).unwrap();
        let parsed: SmtpConfig = toml::from_str(&text).unwrap();
        assert_eq!(parsed, SmtpConfig::default());
        let empty: SmtpConfig = toml::from_str("").unwrap();
        assert_eq!(empty, SmtpConfig::default());
        assert!(toml::from_str::<SmtpConfig>("no_such_key = 1").is_err());
    }
}
