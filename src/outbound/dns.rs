//! The [`Dns`] implementation used in production: hickory-resolver (the version mail-auth
//! already brings), configured from `/etc/resolv.conf`.
//!
//! Error mapping: NXDOMAIN and "no records of that type" (NOERROR with an empty answer) are
//! the trait's "none" results (`mx` → `Ok(None)`, `ips` → `Ok(vec![])`); every other
//! failure (SERVFAIL, REFUSED, timeouts, no reachable server, I/O) is
//! [`MxError::Temporary`], so the message is retried later rather than bounced.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfigGroup, ResolverConfig, ResolverOpts,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::{ProtoError, ProtoErrorKind};
use hickory_resolver::TokioResolver;

use super::mx::{Dns, MxError, MxRecord};

/// Timeout of one DNS request (one server, one attempt).
pub const DNS_REQUEST_TIMEOUT_SECS: u64 = 5;
/// Attempts per server before a look-up fails.
pub const DNS_ATTEMPTS: usize = 2;
/// Records kept per look-up (an MX or address set larger than this is truncated).
pub const MAX_RECORDS_PER_LOOKUP: usize = 64;

/// Where the resolver's configuration came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsConfigSource {
    /// `/etc/resolv.conf` (or the platform's equivalent).
    System,
    /// The system configuration could not be read or named no server: public resolvers
    /// (Cloudflare 1.1.1.1 / 1.0.0.1 and their IPv6 addresses) are used instead.
    PublicFallback,
    /// Name servers given explicitly.
    Explicit,
}

/// What a failed look-up means for delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupFailure {
    /// The name does not exist, or has no records of the asked type.
    NoRecords,
    /// Anything else: try again later.
    Temporary,
}

/// Classifies a resolver error (see the module documentation).
pub fn classify(error: &ProtoError) -> LookupFailure {
    match error.kind() {
        ProtoErrorKind::NoRecordsFound(no_records)
            if matches!(
                no_records.response_code,
                ResponseCode::NXDomain | ResponseCode::NoError
            ) =>
        {
            LookupFailure::NoRecords
        }
        _ => LookupFailure::Temporary,
    }
}

/// hickory-resolver behind the [`Dns`] trait.
#[derive(Clone)]
pub struct HickoryDns {
    resolver: TokioResolver,
    source: DnsConfigSource,
}

impl std::fmt::Debug for HickoryDns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HickoryDns")
            .field("source", &self.source)
            .field("name_servers", &self.resolver.config().name_servers().len())
            .finish()
    }
}

fn options(mut options: ResolverOpts, timeout: Duration) -> ResolverOpts {
    options.timeout = timeout;
    options.attempts = DNS_ATTEMPTS;
    // `ips` asks for A and AAAA itself; the strategy only matters for `lookup_ip`.
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    options
}

impl HickoryDns {
    /// A resolver from the system configuration, or public resolvers when it cannot be read
    /// (logged as a warning).
    pub fn from_system() -> Self {
        let timeout = Duration::from_secs(DNS_REQUEST_TIMEOUT_SECS);
        match hickory_resolver::system_conf::read_system_conf() {
            Ok((config, system_options)) if !config.name_servers().is_empty() => Self::build(
                config,
                options(system_options, timeout),
                DnsConfigSource::System,
            ),
            Ok(_) => {
                tracing::warn!("resolv.conf names no server; using public resolvers");
                Self::public_fallback(timeout)
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read the system DNS configuration; using public resolvers");
                Self::public_fallback(timeout)
            }
        }
    }

    fn public_fallback(timeout: Duration) -> Self {
        Self::build(
            ResolverConfig::cloudflare(),
            options(ResolverOpts::default(), timeout),
            DnsConfigSource::PublicFallback,
        )
    }

    /// A resolver asking the given servers (UDP, then TCP on truncation) with the given
    /// per-request timeout.
    pub fn with_name_servers(servers: &[SocketAddr], timeout: Duration) -> Self {
        let mut group = NameServerConfigGroup::with_capacity(servers.len() * 2);
        for server in servers {
            group.merge(NameServerConfigGroup::from_ips_clear(
                &[server.ip()],
                server.port(),
                true,
            ));
        }
        let config = ResolverConfig::from_parts(None, Vec::new(), group);
        Self::build(
            config,
            options(ResolverOpts::default(), timeout),
            DnsConfigSource::Explicit,
        )
    }

    fn build(config: ResolverConfig, options: ResolverOpts, source: DnsConfigSource) -> Self {
        let resolver =
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
                .with_options(options)
                .build();
        Self { resolver, source }
    }

    /// Where the configuration came from.
    pub fn source(&self) -> DnsConfigSource {
        self.source
    }
}

/// The name as an absolute DNS name, so no search domain is ever appended.
fn fqdn(name: &str) -> String {
    let name = name.trim_end_matches('.');
    format!("{name}.")
}

fn map_error<T>(error: ProtoError, name: &str, none: T) -> Result<T, MxError> {
    match classify(&error) {
        LookupFailure::NoRecords => Ok(none),
        LookupFailure::Temporary => {
            tracing::debug!(%error, name, "temporary DNS failure");
            Err(MxError::Temporary(name.to_owned()))
        }
    }
}

impl Dns for HickoryDns {
    async fn mx(&self, domain: &str) -> Result<Option<Vec<MxRecord>>, MxError> {
        match self.resolver.mx_lookup(fqdn(domain)).await {
            Ok(lookup) => {
                let records: Vec<MxRecord> = lookup
                    .iter()
                    .take(MAX_RECORDS_PER_LOOKUP)
                    .map(|mx| MxRecord {
                        preference: mx.preference(),
                        exchange: mx.exchange().to_ascii(),
                    })
                    .collect();
                Ok(if records.is_empty() {
                    None
                } else {
                    Some(records)
                })
            }
            Err(error) => map_error(error, domain, None),
        }
    }

    /// A and AAAA records, IPv4 first. When one family fails temporarily and the other has
    /// addresses, the addresses found are returned; both failing is a temporary error.
    async fn ips(&self, host: &str) -> Result<Vec<IpAddr>, MxError> {
        let name = fqdn(host);
        let (v4, v6) = tokio::join!(
            self.resolver.ipv4_lookup(name.clone()),
            self.resolver.ipv6_lookup(name.clone())
        );
        let mut ips = Vec::new();
        let mut temporary = false;
        match v4 {
            Ok(lookup) => ips.extend(lookup.iter().map(|a| IpAddr::V4(a.0))),
            Err(error) => temporary |= map_error(error, host, ()).is_err(),
        }
        match v6 {
            Ok(lookup) => ips.extend(lookup.iter().map(|a| IpAddr::V6(a.0))),
            Err(error) => temporary |= map_error(error, host, ()).is_err(),
        }
        ips.truncate(MAX_RECORDS_PER_LOOKUP);
        if ips.is_empty() && temporary {
            return Err(MxError::Temporary(host.to_owned()));
        }
        Ok(ips)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::op::Query;
    use hickory_resolver::proto::NoRecords;

    fn no_records(code: ResponseCode) -> ProtoError {
        ProtoError::from(ProtoErrorKind::NoRecordsFound(NoRecords::new(
            Query::default(),
            code,
        )))
    }

    #[test]
    fn nxdomain_and_empty_answers_are_none_other_failures_temporary() {
        assert_eq!(
            classify(&no_records(ResponseCode::NXDomain)),
            LookupFailure::NoRecords
        );
        assert_eq!(
            classify(&no_records(ResponseCode::NoError)),
            LookupFailure::NoRecords
        );
        for code in [
            ResponseCode::ServFail,
            ResponseCode::Refused,
            ResponseCode::FormErr,
        ] {
            assert_eq!(classify(&no_records(code)), LookupFailure::Temporary);
        }
        assert_eq!(
            classify(&ProtoError::from(ProtoErrorKind::Timeout)),
            LookupFailure::Temporary
        );
        assert_eq!(
            map_error(no_records(ResponseCode::NXDomain), "x.test", None::<u8>),
            Ok(None)
        );
        assert_eq!(
            map_error(no_records(ResponseCode::ServFail), "x.test", None::<u8>),
            Err(MxError::Temporary("x.test".into()))
        );
    }

    #[test]
    fn names_are_made_absolute() {
        assert_eq!(fqdn("example.org"), "example.org.");
        assert_eq!(fqdn("example.org."), "example.org.");
    }

    #[tokio::test]
    async fn system_configuration_builds() {
        let dns = HickoryDns::from_system();
        assert!(matches!(
            dns.source(),
            DnsConfigSource::System | DnsConfigSource::PublicFallback
        ));
        assert!(!dns.resolver.config().name_servers().is_empty());
    }

    /// Nothing listens on 127.0.0.1:1: the look-ups fail quickly and are temporary, never
    /// "no such domain" (which would bounce the message).
    #[tokio::test]
    async fn unreachable_server_is_a_temporary_error() {
        let dns = HickoryDns::with_name_servers(
            &["127.0.0.1:1".parse().unwrap()],
            Duration::from_millis(200),
        );
        assert_eq!(dns.source(), DnsConfigSource::Explicit);
        let started = std::time::Instant::now();
        let mx = tokio::time::timeout(Duration::from_secs(20), dns.mx("example.org"))
            .await
            .expect("look-up bounded by its timeout");
        assert_eq!(mx, Err(MxError::Temporary("example.org".into())));
        let ips = tokio::time::timeout(Duration::from_secs(20), dns.ips("mx.example.org"))
            .await
            .expect("look-up bounded by its timeout");
        assert_eq!(ips, Err(MxError::Temporary("mx.example.org".into())));
        assert!(started.elapsed() < Duration::from_secs(20));
    }
}
