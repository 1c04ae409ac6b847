//! Greylisting (as postgrey and rspamd do it), its pure parts: the `[greylist]` section, the
//! triplet's network part, and the decision for one RCPT. The records live in the
//! replicated state (`store::sieve_state`), so a retry to another node passes; the store
//! proposes them (`store::sieve_api`).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// `[greylist]`. Off by default: it delays every first message from an unknown sender by
/// at least the retry delay, which an administrator turns on knowingly (postgrey is an
/// opt-in policy service; rspamd greylists only mail that already looks suspicious).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct GreylistConfig {
    /// Greylist unauthenticated mail on the MX listener. Default false.
    pub enabled: bool,
    /// A retry passes this long after the first attempt. Default 300 (postgrey's 5 minutes).
    pub delay_secs: u64,
    /// A first attempt waits this long for its retry; later it counts as new. Default 86400
    /// (rspamd's one day).
    pub retry_window_secs: u64,
    /// A triplet that passed stays whitelisted this long. Default 36 (postgrey's max-age).
    pub whitelist_days: u64,
    /// Client networks never greylisted (CIDR, e.g. "192.0.2.0/24", "2001:db8::/32", or a
    /// single address). Default: loopback.
    pub skip_networks: Vec<String>,
}

impl Default for GreylistConfig {
    fn default() -> Self {
        GreylistConfig {
            enabled: false,
            delay_secs: 300,
            retry_window_secs: 86_400,
            whitelist_days: 36,
            skip_networks: vec!["127.0.0.0/8".to_owned(), "::1/128".to_owned()],
        }
    }
}

impl GreylistConfig {
    /// Checks the networks (at start: a typo is an error, not a silent hole).
    pub fn validate(&self) -> Result<(), String> {
        for network in &self.skip_networks {
            parse_network(network)?;
        }
        if self.whitelist_days == 0 || self.retry_window_secs <= self.delay_secs {
            return Err(
                "[greylist] needs whitelist_days > 0 and retry_window_secs > delay_secs".into(),
            );
        }
        Ok(())
    }

    /// Whether `client` is in one of the networks never greylisted.
    pub fn skips(&self, client: IpAddr) -> bool {
        self.skip_networks
            .iter()
            .filter_map(|n| parse_network(n).ok())
            .any(|(network, prefix)| in_network(client, network, prefix))
    }
}

/// "a.b.c.d/n", "x::/n" or a single address.
pub fn parse_network(text: &str) -> Result<(IpAddr, u8), String> {
    let (address, prefix) = match text.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (text, None),
    };
    let address: IpAddr = address
        .trim()
        .parse()
        .map_err(|_| format!("invalid network {text:?}"))?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(prefix) => prefix
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("invalid prefix in {text:?}"))?,
        None => max,
    };
    Ok((address, prefix))
}

fn in_network(client: IpAddr, network: IpAddr, prefix: u8) -> bool {
    let client = match client {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(client),
        v4 => v4,
    };
    match (client, network) {
        (IpAddr::V4(c), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(c) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(c), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(c) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// The triplet's network part: the client's /24 (IPv4) or /64 (IPv6), so that a sender's
/// pool of outgoing servers retries as one.
pub fn network_of(client: IpAddr) -> String {
    let client = match client {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(client),
        v4 => v4,
    };
    match client {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        IpAddr::V6(v6) => {
            let masked = u128::from(v6) & (u128::MAX << 64);
            format!("{}/64", std::net::Ipv6Addr::from(masked))
        }
    }
}

/// What is recorded of a triplet, as the decision needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Known {
    pub first_seen_ms: i64,
    pub passed: bool,
}

/// The decision for one RCPT and the record to propose with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Whitelisted: pass, nothing to record.
    Pass,
    /// The retry came after the delay: pass and whitelist.
    PassAndWhitelist,
    /// First attempt: `451`, record it.
    DeferAndRecord,
    /// A retry before the delay: `451`, `retry_in_secs` left.
    Defer { retry_in_secs: u64 },
}

pub fn decide(known: Option<Known>, now_ms: i64, config: &GreylistConfig) -> Decision {
    let delay_ms = i64::try_from(config.delay_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    match known {
        None => Decision::DeferAndRecord,
        Some(Known { passed: true, .. }) => Decision::Pass,
        Some(Known { first_seen_ms, .. }) => {
            let due_ms = first_seen_ms.saturating_add(delay_ms);
            if now_ms >= due_ms {
                Decision::PassAndWhitelist
            } else {
                Decision::Defer {
                    retry_in_secs: ((due_ms - now_ms) as u64).div_ceil(1000),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_are_slash_24_and_slash_64() {
        assert_eq!(network_of("192.0.2.77".parse().unwrap()), "192.0.2.0/24");
        assert_eq!(
            network_of("2001:db8:1:2:3:4:5:6".parse().unwrap()),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            network_of("::ffff:192.0.2.9".parse().unwrap()),
            "192.0.2.0/24"
        );
    }

    #[test]
    fn skip_networks_match_by_prefix() {
        let config = GreylistConfig {
            skip_networks: vec![
                "10.1.0.0/16".into(),
                "2001:db8::/32".into(),
                "192.0.2.5".into(),
            ],
            ..GreylistConfig::default()
        };
        assert!(config.validate().is_ok());
        assert!(config.skips("10.1.200.3".parse().unwrap()));
        assert!(!config.skips("10.2.0.1".parse().unwrap()));
        assert!(config.skips("2001:db8:ffff::1".parse().unwrap()));
        assert!(config.skips("192.0.2.5".parse().unwrap()));
        assert!(!config.skips("192.0.2.6".parse().unwrap()));
        let bad = GreylistConfig {
            skip_networks: vec!["10.0.0.0/33".into()],
            ..GreylistConfig::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn first_defers_early_retry_defers_late_retry_passes_then_whitelisted() {
        let config = GreylistConfig::default();
        assert_eq!(decide(None, 0, &config), Decision::DeferAndRecord);
        let known = Known {
            first_seen_ms: 1_000,
            passed: false,
        };
        assert_eq!(
            decide(Some(known), 61_000, &config),
            Decision::Defer { retry_in_secs: 240 }
        );
        assert_eq!(
            decide(Some(known), 301_000, &config),
            Decision::PassAndWhitelist
        );
        let passed = Known {
            passed: true,
            ..known
        };
        assert_eq!(decide(Some(passed), 1_001, &config), Decision::Pass);
    }
}
