//! Outbound delivery: the self-contained pieces the delivery worker is assembled from.
//!
//! Module map:
//! - [`dkim`]: DKIM key generation (ed25519, RSA-2048), the DNS TXT record to publish, signing.
//! - [`policy`]: per-destination policies (rate, connections, IP family, TLS, source address),
//!   the one-second-window rate limiter, the connection limiter, and the retry schedule.
//! - [`mx`]: destination resolution (override map, relay host, MX order, A/AAAA fallback,
//!   null MX, address family filter) behind a `Dns` trait.
//! - [`dsn`]: RFC 3464 delivery status notifications for failed and delayed recipients.
//! - [`client`]: the SMTP client (one message to one destination, per-recipient outcomes,
//!   STARTTLS, policy limits, address failover) and its timeouts section.
//! - [`dns`]: the hickory-resolver implementation of [`mx::Dns`].
//! - [`worker`]: the delivery worker every node runs: takes leases on due queue entries,
//!   delivers them with the client under the policies, commits per-recipient results,
//!   retries, and puts DSNs and delay warnings into the sender's INBOX.
//!
//! The replicated queue (entries, leases) lives in the store, not here.

pub mod client;
pub mod dkim;
pub mod dns;
pub mod dsn;
pub mod mx;
pub mod policy;
pub mod worker;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use policy::PolicyConfig;

/// The `[outbound]` configuration section.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OutboundConfig {
    /// Public host name this node greets with in EHLO (its reverse DNS must give it).
    /// Default: "localhost" (the node wiring should set it from the node's public name).
    pub ehlo_hostname: String,
    /// When set, all mail goes to this smarthost (`host` or `host:port`), bypassing MX lookup.
    /// Default: none.
    pub relay_host: Option<String>,
    /// Destination overrides used before DNS: domain -> list of `ip:port` / `[ipv6]:port`.
    /// Default: empty.
    pub overrides: BTreeMap<String, Vec<String>>,
    /// Port used for MX and A/AAAA destinations. Default: 25.
    pub smtp_port: u16,
    /// Per-destination policies; the first whose match fits wins. Default: the shipped
    /// examples (orange.fr/wanadoo.fr at 3 msg/s, gmail.com/googlemail.com IPv4 only).
    #[serde(rename = "policy")]
    pub policies: Vec<PolicyConfig>,
    /// Policy for destinations no entry matches. Default: no rate limit, 10 connections,
    /// any family, opportunistic TLS.
    pub default_policy: PolicyConfig,
    /// Retry schedule for temporary failures.
    pub retry: policy::RetryConfig,
    /// Deliveries in flight on this node at once. Default: 20.
    pub max_concurrent_deliveries: usize,
    /// SMTP client timeouts (RFC 5321 §4.5.3.2 defaults).
    pub timeouts: client::TimeoutConfig,
    /// How long a node holds a queue entry it took for delivery; another node may take it
    /// once it expires (the holder died). An attempt is cut `LEASE_MARGIN_SECS` (60) before
    /// it, so it must exceed the longest attempt worth waiting for. Default: 900 s.
    pub lease_secs: u64,
    /// The worker looks at the queue at least this often (it is also woken when a message is
    /// queued or a retry is asked). Default: 5 s.
    pub poll_interval_secs: u64,
    /// Obsolete and ignored (a warning is logged when set): the SRS key is 32 random bytes
    /// the cluster generates into its replicated state on first use, the same on every node
    /// and printed by no command. Kept so that older configuration files still load.
    /// Default: empty.
    pub srs_secret: String,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            ehlo_hostname: "localhost".to_owned(),
            relay_host: None,
            overrides: BTreeMap::new(),
            smtp_port: 25,
            policies: policy::shipped_example_policies(),
            default_policy: PolicyConfig::default_policy(),
            retry: policy::RetryConfig::default(),
            max_concurrent_deliveries: 20,
            timeouts: client::TimeoutConfig::default(),
            lease_secs: 900,
            poll_interval_secs: 5,
            srs_secret: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The snippet given to the lead for config/kermail.toml must parse into the defaults.
    pub(crate) const EXAMPLE_TOML: &str = r#"
[outbound]
ehlo_hostname = "localhost"
smtp_port = 25
max_concurrent_deliveries = 20
lease_secs = 900
poll_interval_secs = 5
srs_secret = ""

[outbound.overrides]
# "example.test" = ["127.0.0.1:2526", "[::1]:2526"]

[[outbound.policy]]
name = "orange"
match_domains = ["orange.fr", "wanadoo.fr"]
match_mx = ["*.orange.fr", "*.wanadoo.fr"]
max_messages_per_second = 3.0
max_connections = 3
ip_family = "any"
require_tls = false

[[outbound.policy]]
name = "gmail"
match_domains = ["gmail.com", "googlemail.com"]
match_mx = ["*.google.com", "*.googlemail.com"]
max_connections = 10
ip_family = "ipv4-only"
require_tls = false

[outbound.default_policy]
name = "default"
max_connections = 10
ip_family = "any"
require_tls = false

[outbound.retry]
first_retry_delay_secs = 300
retry_delay_secs_max = 14400
backoff_factor = 2.0
jitter_fraction = 0.2
max_age_secs = 432000
delay_warning_secs = 14400

[outbound.timeouts]
connect_secs = 60
greeting_secs = 300
ehlo_secs = 300
starttls_secs = 120
mail_from_secs = 300
rcpt_to_secs = 300
data_secs = 120
data_block_secs = 180
data_end_secs = 600
"#;

    #[derive(Deserialize)]
    struct Wrapper {
        outbound: OutboundConfig,
    }

    #[test]
    fn example_snippet_parses_to_the_defaults() {
        let parsed: Wrapper = toml::from_str(EXAMPLE_TOML).unwrap();
        assert_eq!(parsed.outbound, OutboundConfig::default());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = "[outbound]\nrelay = \"x\"\n";
        assert!(toml::from_str::<Wrapper>(text).is_err());
    }

    #[test]
    fn empty_section_gives_defaults() {
        let parsed: Wrapper = toml::from_str("[outbound]\n").unwrap();
        assert_eq!(parsed.outbound, OutboundConfig::default());
    }
}
