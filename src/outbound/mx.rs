//! Destination resolution: override map, relay host, MX (preference order, random among
//! equals), A/AAAA fallback when there is no MX (RFC 5321 §5.1), null MX = permanent failure,
//! filtered by the policy's address family. DNS is behind the [`Dns`] trait; the hickory
//! implementation is not written yet.

use std::net::{IpAddr, SocketAddr};

use rand::seq::SliceRandom;
use rand::Rng;

use super::policy::IpFamily;
use super::OutboundConfig;

/// Upper bound on addresses returned for one domain.
pub const MAX_DESTINATION_ADDRESSES: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MxError {
    #[error("{0} publishes a null MX: it accepts no mail")]
    NullMx(String),
    #[error("{0} has no address of the allowed family")]
    NoAddress(String),
    #[error("invalid override or relay address {0:?}")]
    InvalidAddress(String),
    #[error("temporary DNS failure for {0}")]
    Temporary(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxRecord {
    pub preference: u16,
    pub exchange: String,
}

/// The DNS look-ups resolution needs. `mx` returns none when the domain has no MX records.
#[allow(async_fn_in_trait)]
pub trait Dns {
    async fn mx(&self, domain: &str) -> Result<Option<Vec<MxRecord>>, MxError>;
    async fn ips(&self, host: &str) -> Result<Vec<IpAddr>, MxError>;
}

/// MX hosts in preference order, shuffled among equal preferences. A null MX (a single
/// record whose exchange is ".") is a permanent failure.
pub fn order_mx(
    domain: &str,
    mut records: Vec<MxRecord>,
    rng: &mut impl Rng,
) -> Result<Vec<String>, MxError> {
    if records
        .iter()
        .any(|r| r.exchange == "." || r.exchange.is_empty())
    {
        return Err(MxError::NullMx(domain.to_owned()));
    }
    records.shuffle(rng);
    records.sort_by_key(|r| r.preference); // stable: keeps the shuffle among equals
    Ok(records
        .into_iter()
        .map(|r| r.exchange.trim_end_matches('.').to_owned())
        .collect())
}

/// Parses `ip:port` / `[ipv6]:port` entries of an override.
pub fn parse_addresses(entries: &[String]) -> Result<Vec<SocketAddr>, MxError> {
    entries
        .iter()
        .map(|e| e.parse().map_err(|_| MxError::InvalidAddress(e.clone())))
        .collect()
}

/// Keeps the addresses the family allows.
pub fn filter_family(addresses: Vec<SocketAddr>, family: IpFamily) -> Vec<SocketAddr> {
    addresses
        .into_iter()
        .filter(|a| family.allows(&a.ip()))
        .collect()
}

/// Resolves the addresses to try for `domain`, in order.
pub async fn resolve(
    config: &OutboundConfig,
    dns: &impl Dns,
    domain: &str,
    family: IpFamily,
    rng: &mut impl Rng,
) -> Result<Vec<SocketAddr>, MxError> {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let mut addresses = Vec::new();
    if let Some(entries) = config.overrides.get(&domain) {
        addresses = parse_addresses(entries)?;
    } else if let Some(relay) = &config.relay_host {
        if let Ok(address) = relay.parse::<SocketAddr>() {
            addresses.push(address);
        } else {
            let (host, port) = match relay.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_owned(),
                    p.parse()
                        .map_err(|_| MxError::InvalidAddress(relay.clone()))?,
                ),
                None => (relay.clone(), config.smtp_port),
            };
            for ip in dns.ips(&host).await? {
                addresses.push(SocketAddr::new(ip, port));
            }
        }
    } else {
        let hosts = match dns.mx(&domain).await? {
            Some(records) if !records.is_empty() => order_mx(&domain, records, rng)?,
            _ => vec![domain.clone()],
        };
        for host in hosts {
            for ip in dns.ips(&host).await? {
                addresses.push(SocketAddr::new(ip, config.smtp_port));
            }
        }
    }
    let mut addresses = filter_family(addresses, family);
    addresses.truncate(MAX_DESTINATION_ADDRESSES);
    if addresses.is_empty() {
        return Err(MxError::NoAddress(domain));
    }
    Ok(addresses)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use std::collections::HashMap;

    struct FakeDns {
        mx: HashMap<String, Vec<MxRecord>>,
        ips: HashMap<String, Vec<IpAddr>>,
    }

    impl Dns for FakeDns {
        async fn mx(&self, domain: &str) -> Result<Option<Vec<MxRecord>>, MxError> {
            Ok(self.mx.get(domain).cloned())
        }
        async fn ips(&self, host: &str) -> Result<Vec<IpAddr>, MxError> {
            Ok(self.ips.get(host).cloned().unwrap_or_default())
        }
    }

    fn mx(preference: u16, exchange: &str) -> MxRecord {
        MxRecord {
            preference,
            exchange: exchange.to_owned(),
        }
    }

    fn fake() -> FakeDns {
        let mut dns = FakeDns {
            mx: HashMap::new(),
            ips: HashMap::new(),
        };
        dns.mx
            .insert("a.test".into(), vec![mx(20, "b.mx."), mx(10, "a.mx.")]);
        dns.mx.insert("null.test".into(), vec![mx(0, ".")]);
        dns.ips.insert(
            "a.mx".into(),
            vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
        );
        dns.ips
            .insert("b.mx".into(), vec!["192.0.2.2".parse().unwrap()]);
        dns.ips
            .insert("nomx.test".into(), vec!["192.0.2.9".parse().unwrap()]);
        dns
    }

    #[tokio::test]
    async fn override_is_used_before_dns_and_filtered_by_family() {
        let mut config = OutboundConfig::default();
        config.overrides.insert(
            "example.test".into(),
            vec!["127.0.0.1:2526".into(), "[::1]:2526".into()],
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let any = resolve(&config, &fake(), "Example.Test.", IpFamily::Any, &mut rng)
            .await
            .unwrap();
        assert_eq!(any.len(), 2);
        let v4 = resolve(
            &config,
            &fake(),
            "example.test",
            IpFamily::Ipv4Only,
            &mut rng,
        )
        .await
        .unwrap();
        assert_eq!(v4, vec!["127.0.0.1:2526".parse::<SocketAddr>().unwrap()]);
        let v6 = resolve(
            &config,
            &fake(),
            "example.test",
            IpFamily::Ipv6Only,
            &mut rng,
        )
        .await
        .unwrap();
        assert!(v6.iter().all(|a| a.is_ipv6()));
    }

    #[tokio::test]
    async fn mx_order_fallback_null_mx_and_relay() {
        let config = OutboundConfig::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let a = resolve(&config, &fake(), "a.test", IpFamily::Ipv4Only, &mut rng)
            .await
            .unwrap();
        assert_eq!(
            a,
            vec![
                "192.0.2.1:25".parse().unwrap(),
                "192.0.2.2:25".parse::<SocketAddr>().unwrap()
            ]
        );
        let fallback = resolve(&config, &fake(), "nomx.test", IpFamily::Any, &mut rng)
            .await
            .unwrap();
        assert_eq!(
            fallback,
            vec!["192.0.2.9:25".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            resolve(&config, &fake(), "null.test", IpFamily::Any, &mut rng).await,
            Err(MxError::NullMx("null.test".into()))
        );
        let relay = OutboundConfig {
            relay_host: Some("b.mx:587".into()),
            ..OutboundConfig::default()
        };
        let via = resolve(&relay, &fake(), "a.test", IpFamily::Any, &mut rng)
            .await
            .unwrap();
        assert_eq!(via, vec!["192.0.2.2:587".parse::<SocketAddr>().unwrap()]);
    }

    #[test]
    fn equal_preferences_are_shuffled_but_stay_behind_lower_ones() {
        let records = vec![mx(10, "x1"), mx(10, "x2"), mx(5, "first"), mx(10, "x3")];
        let mut seen_first_x = std::collections::HashSet::new();
        for seed in 0..50 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let order = order_mx("d", records.clone(), &mut rng).unwrap();
            assert_eq!(order[0], "first");
            seen_first_x.insert(order[1].clone());
        }
        assert!(seen_first_x.len() > 1);
    }
}
