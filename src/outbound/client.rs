use serde::{Deserialize, Serialize};

/// SMTP client timeouts (`[outbound.timeouts]`), defaults from RFC 5321 §4.5.3.2.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutConfig {
    pub connect_secs: u64,
    pub greeting_secs: u64,
    pub ehlo_secs: u64,
    pub starttls_secs: u64,
    pub mail_from_secs: u64,
    pub rcpt_to_secs: u64,
    pub data_secs: u64,
    pub data_block_secs: u64,
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
