//! The SMTP client's configuration. The client itself (one transaction to one host with
//! per-recipient outcomes, STARTTLS, bound source address) is not written yet; see the
//! report on branch `outbound` for the plan (mail-send's `SmtpClient { stream, timeout }` over
//! a socket we bind ourselves, `cmd()` per RCPT for per-recipient replies).

use serde::{Deserialize, Serialize};

/// SMTP client timeouts (`[outbound.timeouts]`), defaults from RFC 5321 §4.5.3.2.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutConfig {
    /// TCP connect. Default: 60 s (not in the RFC; Postfix uses 30 s).
    pub connect_secs: u64,
    /// Initial 220 greeting. Default: 300 s.
    pub greeting_secs: u64,
    /// EHLO reply. Default: 300 s.
    pub ehlo_secs: u64,
    /// STARTTLS reply and TLS handshake. Default: 120 s.
    pub starttls_secs: u64,
    /// MAIL FROM reply. Default: 300 s.
    pub mail_from_secs: u64,
    /// Each RCPT TO reply. Default: 300 s.
    pub rcpt_to_secs: u64,
    /// DATA initiation (354). Default: 120 s.
    pub data_secs: u64,
    /// Each block of data written. Default: 180 s.
    pub data_block_secs: u64,
    /// Reply to the final dot. Default: 600 s.
    pub data_end_secs: u64,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        Self {
            connect_secs: 60,
            greeting_secs: 300,
            ehlo_secs: 300,
            starttls_secs: 120,
            mail_from_secs: 300,
            rcpt_to_secs: 300,
            data_secs: 120,
            data_block_secs: 180,
            data_end_secs: 600,
        }
    }
}
