//! SPF, DKIM and DMARC on incoming mail, with mail-auth over one shared, cached resolver.
//!
//! [`InboundAuth::check`] takes what the SMTP session knows (client address, HELO name,
//! envelope sender) and the message, and returns the `Authentication-Results` field to
//! prepend and a [`Disposition`]. [`InboundAuth::filter_delivery`] applies it to a
//! [`Delivery`]: forged results with our authserv-id out, ours in.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use mail_auth::common::headers::HeaderWriter;

use crate::outbound::dkim::DkimKeyRecord;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::dmarc::{Dmarc, Policy};
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimOutput, DkimResult, DmarcOutput, DmarcResult,
    MessageAuthenticator, Parameters, ResolverCache, SpfOutput, SpfResult, Txt, MX,
};
use serde::{Deserialize, Serialize};

use crate::store::Delivery;

/// Most entries each parsed-record cache (TXT, MX, A, AAAA, PTR) holds; past it, expired
/// entries are dropped, and if none were, the cache starts over (bounded memory, simple).
pub const DNS_CACHE_ENTRIES_DEFAULT: usize = 10_000;

/// The `[inbound]` section: checks of mail arriving on the MX listener.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct InboundConfig {
    /// Run the checks and add `Authentication-Results`. Default false: the checks need a
    /// working DNS resolver (a node without one would defer every message with `451`).
    pub enabled: bool,
    /// The authserv-id of our `Authentication-Results` fields (RFC 8601 section 2.5); fields
    /// already in a message with this id are removed. Default "": the node's `hostname`.
    pub authserv_id: String,
    /// DNS servers asked (UDP, TCP on truncation), e.g. `["127.0.0.1:53"]`. Default []: the
    /// system's (`/etc/resolv.conf`).
    pub dns_servers: Vec<SocketAddr>,
    /// Time for one DNS request before it is retried or fails. Default 3000.
    pub dns_timeout_ms: u64,
    /// Tries per DNS request. Default 2.
    pub dns_attempts: usize,
    /// Entries of the resolver's own cache and of each parsed-record cache. Default 10000.
    pub dns_cache_entries: usize,
    /// Total time all checks of one message may take; past it `451 4.7.0`. Default 30.
    pub check_deadline_secs: u64,
    /// SPF (RFC 7208) of the HELO name and the MAIL FROM domain. Default true.
    pub spf: bool,
    /// DKIM (RFC 6376): every signature is verified. Default true.
    pub dkim: bool,
    /// DMARC (RFC 7489): the From domain's policy; needs `spf` and `dkim` for a full
    /// verdict. Default true.
    pub dmarc: bool,
    /// Apply a failing message's DMARC policy: `p=reject` is `550 5.7.1` at the end of
    /// DATA, `p=quarantine` files it into Junk. false: only the header says so. Default true.
    pub dmarc_enforce: bool,
    /// ARC (RFC 8617): the chain of seals added by earlier forwarders is verified and its
    /// result (`arc=pass/fail/none`) written in `Authentication-Results`; it decides nothing
    /// on its own. Default true.
    pub arc: bool,
}

impl Default for InboundConfig {
    fn default() -> Self {
        InboundConfig {
            enabled: false,
            authserv_id: String::new(),
            dns_servers: Vec::new(),
            dns_timeout_ms: 3000,
            dns_attempts: 2,
            dns_cache_entries: DNS_CACHE_ENTRIES_DEFAULT,
            check_deadline_secs: 30,
            spf: true,
            dkim: true,
            dmarc: true,
            dmarc_enforce: true,
            arc: true,
        }
    }
}

impl InboundConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.dns_timeout_ms == 0 || self.dns_attempts == 0 || self.check_deadline_secs == 0 {
            return Err(
                "inbound.dns_timeout_ms, dns_attempts and check_deadline_secs must be > 0".into(),
            );
        }
        if self
            .authserv_id
            .contains(|c: char| c.is_whitespace() || c == ';')
        {
            return Err("inbound.authserv_id must be one token (no space, no ';')".into());
        }
        Ok(())
    }
}

/// What happens to a checked message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Deliver as usual (with our `Authentication-Results`).
    Deliver,
    /// DMARC `p=quarantine`: every local copy goes to Junk.
    Junk,
    /// Refused for good (DMARC `p=reject`): this SMTP reply, nothing stored.
    Reject(String),
    /// A check could not finish (DNS failure, deadline): this `451` reply, nothing stored.
    Defer(String),
}

/// The checks' verdict on one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked<'a> {
    /// `Authentication-Results: ...\r\n`, ready to prepend.
    pub header: String,
    pub disposition: Disposition,
    /// Short summary for the log line (`spf=pass dkim=fail dmarc=none`).
    pub summary: String,
    /// The results as mail-auth built them (the content of an `ARC-Authentication-Results`
    /// when the message is sealed); None when the checks did not finish.
    pub results: Option<AuthenticationResults<'a>>,
}

/// A bounded cache with expiry, shared by every check of the node.
pub struct DnsCache<K, V> {
    entries: Mutex<HashMap<K, (V, Instant)>>,
    capacity: usize,
}

impl<K: Hash + Eq, V: Clone> DnsCache<K, V> {
    pub fn new(capacity: usize) -> Self {
        DnsCache {
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, (V, Instant)>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<K: Hash + Eq, V: Clone> ResolverCache<K, V> for DnsCache<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut entries = self.lock();
        match entries.get(name) {
            Some((value, expires)) if *expires > Instant::now() => Some(value.clone()),
            Some(_) => {
                entries.remove(name);
                None
            }
            None => None,
        }
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.lock().remove(name).map(|(value, _)| value)
    }

    fn insert(&self, key: K, value: V, valid_until: Instant) {
        let mut entries = self.lock();
        if entries.len() >= self.capacity {
            let now = Instant::now();
            entries.retain(|_, (_, expires)| *expires > now);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(key, (value, valid_until));
    }
}

/// mail-auth's parameters of one check, with our caches.
type CachedParameters<'x, P> = Parameters<
    'x,
    P,
    DnsCache<String, Txt>,
    DnsCache<String, Arc<Vec<MX>>>,
    DnsCache<String, Arc<Vec<Ipv4Addr>>>,
    DnsCache<String, Arc<Vec<Ipv6Addr>>>,
    DnsCache<IpAddr, Arc<Vec<String>>>,
>;

/// The parsed-record caches mail-auth consults before it asks the resolver.
struct Caches {
    txt: DnsCache<String, Txt>,
    mx: DnsCache<String, Arc<Vec<MX>>>,
    ipv4: DnsCache<String, Arc<Vec<Ipv4Addr>>>,
    ipv6: DnsCache<String, Arc<Vec<Ipv6Addr>>>,
    ptr: DnsCache<IpAddr, Arc<Vec<String>>>,
}

/// The node's inbound checker: one resolver (with hickory's cache) and the parsed-record
/// caches, shared by every SMTP session.
pub struct InboundAuth {
    config: InboundConfig,
    authserv_id: String,
    authenticator: MessageAuthenticator,
    caches: Caches,
}

impl std::fmt::Debug for InboundAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundAuth")
            .field("authserv_id", &self.authserv_id)
            .field("dns_servers", &self.config.dns_servers)
            .finish()
    }
}

/// The organisational domain (RFC 7489 section 3.2): the registrable domain by the public
/// suffix list; a name the list does not know stays itself.
pub fn organizational_domain(domain: &str) -> &str {
    psl::domain_str(domain).unwrap_or(domain)
}

fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map_or("", |(_, domain)| domain)
}

/// The resolver configuration and options `[inbound]` describes (its DNS servers, or the
/// system's; timeouts, attempts, cache size; names used as given).
fn resolver_parts(config: &InboundConfig) -> Result<(ResolverConfig, ResolverOpts), String> {
    let resolver_config = if config.dns_servers.is_empty() {
        let (system, _) = hickory_resolver::system_conf::read_system_conf()
            .map_err(|e| format!("cannot read the system DNS configuration: {e}"))?;
        system
    } else {
        let mut group = NameServerConfigGroup::with_capacity(config.dns_servers.len() * 2);
        for server in &config.dns_servers {
            group.merge(NameServerConfigGroup::from_ips_clear(
                &[server.ip()],
                server.port(),
                true,
            ));
        }
        ResolverConfig::from_parts(None, Vec::new(), group)
    };
    let mut options = ResolverOpts::default();
    options.timeout = Duration::from_millis(config.dns_timeout_ms);
    options.attempts = config.dns_attempts;
    options.cache_size = config.dns_cache_entries;
    // Names are used as given (no search list): they come from mail, not from users.
    options.ndots = 0;
    Ok((resolver_config, options))
}

/// A resolver with `[inbound]`'s DNS settings, for checks that run without [`InboundAuth`]
/// (the spam filter's DNSBL lookups when `[inbound]` is off).
pub fn build_resolver(config: &InboundConfig) -> Result<hickory_resolver::TokioResolver, String> {
    let (resolver_config, options) = resolver_parts(config)?;
    Ok(hickory_resolver::TokioResolver::builder_with_config(
        resolver_config,
        hickory_resolver::name_server::TokioConnectionProvider::default(),
    )
    .with_options(options)
    .build())
}

impl InboundAuth {
    /// The checker `config` describes; `hostname` is the authserv-id unless the config names
    /// one.
    pub fn new(config: &InboundConfig, hostname: &str) -> Result<InboundAuth, String> {
        config.validate()?;
        let (resolver_config, options) = resolver_parts(config)?;
        let authenticator = MessageAuthenticator::new(resolver_config, options)
            .map_err(|e| format!("cannot build the DNS resolver: {e}"))?;
        let entries = config.dns_cache_entries;
        Ok(InboundAuth {
            config: config.clone(),
            authserv_id: if config.authserv_id.is_empty() {
                hostname.to_owned()
            } else {
                config.authserv_id.clone()
            },
            authenticator,
            caches: Caches {
                txt: DnsCache::new(entries),
                mx: DnsCache::new(entries),
                ipv4: DnsCache::new(entries),
                ipv6: DnsCache::new(entries),
                ptr: DnsCache::new(entries),
            },
        })
    }

    pub fn authserv_id(&self) -> &str {
        &self.authserv_id
    }

    /// The resolver of every check (hickory's cache in it): DNSBL lookups share it.
    pub fn resolver(&self) -> hickory_resolver::TokioResolver {
        self.authenticator.resolver().clone()
    }

    fn params<P>(&self, params: P) -> CachedParameters<'_, P> {
        Parameters::new(params)
            .with_txt_cache(&self.caches.txt)
            .with_mx_cache(&self.caches.mx)
            .with_ipv4_cache(&self.caches.ipv4)
            .with_ipv6_cache(&self.caches.ipv6)
            .with_ptr_cache(&self.caches.ptr)
    }

    /// SPF `check_host` of one identity: `mail_from` ("" for the HELO identity, then
    /// `postmaster@helo`).
    pub async fn spf(&self, client_ip: IpAddr, helo: &str, mail_from: &str) -> SpfOutput {
        let params = if mail_from.is_empty() {
            SpfParameters::verify_ehlo(client_ip, helo, &self.authserv_id)
        } else {
            SpfParameters::verify_mail_from(client_ip, helo, &self.authserv_id, mail_from)
        };
        self.authenticator.verify_spf(self.params(params)).await
    }

    /// Whether the TXT records of `name` cannot be had for now (SERVFAIL, REFUSED, a
    /// timeout). mail-auth 0.7.5 takes any answer without records, SERVFAIL included, as
    /// "no record": a `none` result is asked again here (from hickory's cache) so that a
    /// failing server is a temporary error, never a silent pass.
    async fn txt_unavailable(&self, name: &str) -> bool {
        let Ok(name) = hickory_resolver::Name::from_str_relaxed(name) else {
            return false;
        };
        match self.authenticator.resolver().txt_lookup(name).await {
            Ok(_) => false,
            Err(error) => {
                crate::outbound::dns::classify(&error)
                    == crate::outbound::dns::LookupFailure::Temporary
            }
        }
    }

    /// Every check on one message, within `check_deadline_secs`.
    pub async fn check(
        &self,
        client_ip: IpAddr,
        helo: &str,
        mail_from: &str,
        message: &[u8],
    ) -> Checked<'_> {
        use futures::FutureExt as _;
        let deadline = Duration::from_secs(self.config.check_deadline_secs);
        // A panic in the checks (a bug in a parser of remote records) defers the message
        // instead of ending the session without an answer.
        let checks =
            std::panic::AssertUnwindSafe(self.check_now(client_ip, helo, mail_from, message))
                .catch_unwind();
        match tokio::time::timeout(deadline, checks).await {
            Ok(Ok(checked)) => checked,
            Ok(Err(_)) => {
                tracing::error!(client = %client_ip, from = %mail_from, "inbound checks panicked");
                Checked {
                    header: String::new(),
                    disposition: Disposition::Defer(
                        "451 4.7.0 Error: sender authentication checks failed, try again later"
                            .to_owned(),
                    ),
                    summary: "panic".to_owned(),
                    results: None,
                }
            }
            Err(_) => Checked {
                header: String::new(),
                disposition: Disposition::Defer(
                    "451 4.7.0 Error: sender authentication checks timed out, try again later"
                        .to_owned(),
                ),
                summary: "deadline".to_owned(),
                results: None,
            },
        }
    }

    async fn check_now(
        &self,
        client_ip: IpAddr,
        helo: &str,
        mail_from: &str,
        message: &[u8],
    ) -> Checked<'_> {
        let mut results = AuthenticationResults::new(&self.authserv_id);
        let mut summary = Vec::new();
        let mut defer: Option<String> = None;
        let mut no_signature = false;

        // SPF: HELO, then MAIL FROM (the null sender's identity is the HELO one).
        let mut spf_mail_from = SpfOutput::new(String::new()).with_result(SpfResult::None);
        if self.config.spf {
            let helo_output = self.spf(client_ip, helo, "").await;
            results = results.with_spf_ehlo_result(&helo_output, client_ip, helo);
            spf_mail_from = if mail_from.is_empty() {
                helo_output.clone()
            } else {
                self.spf(client_ip, helo, mail_from).await
            };
            results = results.with_spf_mailfrom_result(&spf_mail_from, client_ip, mail_from, helo);
            summary.push(format!("spf={}", spf_mail_from.result()));
            let mut helo_output = helo_output;
            if spf_mail_from.result() == SpfResult::None
                && !spf_mail_from.domain().is_empty()
                && self
                    .txt_unavailable(&format!("{}.", spf_mail_from.domain()))
                    .await
            {
                spf_mail_from = spf_mail_from.with_result(SpfResult::TempError);
            }
            if helo_output.result() == SpfResult::None
                && !helo_output.domain().is_empty()
                && self
                    .txt_unavailable(&format!("{}.", helo_output.domain()))
                    .await
            {
                helo_output = helo_output.with_result(SpfResult::TempError);
            }
            if spf_mail_from.result() == SpfResult::TempError
                || helo_output.result() == SpfResult::TempError
            {
                defer = Some(format!(
                    "451 4.7.24 Error: temporary DNS failure checking the SPF record of {}, try again later",
                    if spf_mail_from.result() == SpfResult::TempError {
                        spf_mail_from.domain()
                    } else {
                        helo_output.domain()
                    }
                ));
            }
        }

        let parsed = AuthenticatedMessage::parse(message);
        let header_from = parsed
            .as_ref()
            .map(|m| m.from().to_owned())
            .unwrap_or_default();

        // DKIM: every signature.
        let dkim: Vec<DkimOutput<'_>> = match (&parsed, self.config.dkim) {
            (Some(parsed), true) => self.authenticator.verify_dkim(self.params(parsed)).await,
            _ => Vec::new(),
        };
        if self.config.dkim {
            if dkim.is_empty() {
                no_signature = true;
                summary.push("dkim=none".to_owned());
            } else {
                results = results.with_dkim_results(&dkim, &header_from);
                let words: Vec<String> = dkim
                    .iter()
                    .map(|o| dkim_word(o.result()).to_owned())
                    .collect();
                summary.push(format!("dkim={}", words.join(",")));
            }
            if defer.is_none() {
                if let Some(output) = dkim
                    .iter()
                    .find(|o| matches!(o.result(), DkimResult::TempError(_)))
                {
                    let domain = output.signature().map(|s| s.d.as_str()).unwrap_or("?");
                    defer = Some(format!(
                        "451 4.7.5 Error: temporary DNS failure checking a DKIM key of {domain}, try again later"
                    ));
                }
            }
        }

        // ARC: verified on the message as it arrived (before our own field is added).
        if let (Some(parsed), true) = (&parsed, self.config.arc) {
            let arc = self.authenticator.verify_arc(self.params(parsed)).await;
            results = results.with_arc_result(&arc, client_ip);
            summary.push(format!(
                "arc={}",
                match arc.result() {
                    DkimResult::Pass | DkimResult::None | DkimResult::TempError(_) =>
                        dkim_word(arc.result()),
                    _ => "fail",
                }
            ));
        }

        // DMARC.
        let mut disposition = Disposition::Deliver;
        if let (Some(parsed), true) = (&parsed, self.config.dmarc) {
            let mail_from_domain = if mail_from.is_empty() {
                helo
            } else {
                domain_of(mail_from)
            };
            let dmarc = self
                .authenticator
                .verify_dmarc(
                    self.params(
                        DmarcParameters::new(parsed, &dkim, mail_from_domain, &spf_mail_from)
                            .with_domain_suffix_fn(organizational_domain),
                    ),
                )
                .await;
            // mail-auth leaves both results at none when neither SPF nor DKIM passed; with
            // a record that is a failure (RFC 7489 section 6.6.2), and the header says so.
            let dmarc = if dmarc.dmarc_record().is_some()
                && dmarc.spf_result() == &DmarcResult::None
                && dmarc.dkim_result() == &DmarcResult::None
            {
                dmarc
                    .with_spf_result(DmarcResult::Fail(mail_auth::Error::NotAligned))
                    .with_dkim_result(DmarcResult::Fail(mail_auth::Error::NotAligned))
            } else {
                dmarc
            };
            results = results.with_dmarc_result(&dmarc);
            let passed = dmarc.spf_result() == &DmarcResult::Pass
                || dmarc.dkim_result() == &DmarcResult::Pass;
            // No record found: make sure the From domain's server did not just fail.
            let unavailable = dmarc.dmarc_record().is_none()
                && !dmarc.domain().is_empty()
                && self
                    .txt_unavailable(&format!("_dmarc.{}.", dmarc.domain()))
                    .await;
            let temporary = unavailable
                || matches!(dmarc.spf_result(), DmarcResult::TempError(_))
                || matches!(dmarc.dkim_result(), DmarcResult::TempError(_));
            summary.push(format!(
                "dmarc={}",
                if passed {
                    "pass"
                } else if temporary {
                    "temperror"
                } else if dmarc.dmarc_record().is_some() {
                    "fail"
                } else {
                    "none"
                }
            ));
            if temporary && defer.is_none() {
                defer = Some(format!(
                    "451 4.7.0 Error: temporary DNS failure checking the DMARC policy of {}, try again later",
                    dmarc.domain()
                ));
            }
            if !passed && !temporary && self.config.dmarc_enforce {
                if let Some(record) = dmarc.dmarc_record() {
                    let policy = self.failed_policy(&dmarc, record).await;
                    summary.push(format!("policy={policy}"));
                    disposition = match policy {
                        Policy::Reject => Disposition::Reject(format!(
                            "550 5.7.1 Error: rejected by the DMARC policy of {}",
                            dmarc.domain()
                        )),
                        Policy::Quarantine => Disposition::Junk,
                        Policy::None | Policy::Unspecified => Disposition::Deliver,
                    };
                }
            }
        }
        if let Some(reply) = defer {
            disposition = Disposition::Defer(reply);
        }
        // A body hash that does not match is a failure (RFC 8601 section 2.7.1: "the
        // signature failed to verify"); mail-auth reports it as neutral.
        // ARC results are none, pass or fail (RFC 8617 section 4.4): mail-auth's neutral
        // (a body hash that does not match) and permerror (a broken seal) are failures.
        let mut header = results
            .to_header()
            .replace(
                "dkim=neutral (body hash did not verify)",
                "dkim=fail (body hash did not verify)",
            )
            .replace("\tarc=neutral", "\tarc=fail")
            .replace("\tarc=permerror", "\tarc=fail");
        if no_signature {
            // mail-auth writes results of signatures only: RFC 8601's `dkim=none` by hand.
            header.truncate(header.len() - 2);
            if header.ends_with("; none") {
                header.truncate(header.len() - "; none".len());
            }
            header.push_str(";\r\n\tdkim=none\r\n");
        }
        Checked {
            header,
            disposition,
            summary: summary.join(" "),
            results: Some(results),
        }
    }

    /// The policy a failing message gets (RFC 7489 section 6.6.3): `p` when the record is the
    /// From domain's own, `sp` when it was found at the organisational domain; `pct` below
    /// 100 applies it to that share of messages and the next milder one to the rest.
    async fn failed_policy(&self, dmarc: &DmarcOutput, record: &Dmarc) -> Policy {
        let own = self
            .authenticator
            .txt_lookup::<Dmarc>(
                format!("_dmarc.{}.", dmarc.domain()),
                Some(&self.caches.txt),
            )
            .await
            .is_ok();
        let policy = if own { record.p } else { record.sp };
        if record.pct >= 100 || rand::random::<u8>() % 100 < record.pct {
            return policy;
        }
        match policy {
            Policy::Reject => Policy::Quarantine,
            _ => Policy::None,
        }
    }

    /// Checks a message received on the MX listener and applies the result to `delivery`:
    /// forged `Authentication-Results` with our id removed, ours prepended (for every
    /// disposition but a refusal). The driver then delivers, files into Junk, or answers.
    /// Also returns the results' summary (`spf=pass dkim=none dmarc=fail`) for spam scoring.
    /// `arc_seal`: the DKIM key of the domain whose alias forwards the message outside; a
    /// delivered message then gets our ARC set (RFC 8617) on top, so that the next hop can
    /// trust our results although SPF (and maybe DKIM) no longer pass there.
    pub async fn filter_delivery(
        &self,
        client_ip: IpAddr,
        helo: &str,
        delivery: &mut Delivery,
        arc_seal: Option<&DkimKeyRecord>,
    ) -> (Disposition, String) {
        // DKIM needs the whole message: a spilled body is read back (bounded by the SMTP
        // message size limit).
        let whole;
        let message: &[u8] = if delivery.body.is_spilled() {
            whole = match delivery.body.to_vec() {
                Ok(whole) => whole,
                Err(error) => {
                    tracing::warn!(%error, "cannot read a message back for its checks");
                    return (
                        Disposition::Defer(
                            "451 4.3.0 Error: cannot check the message now, try again later".into(),
                        ),
                        String::new(),
                    );
                }
            };
            &whole
        } else {
            delivery.body.head()
        };
        let checked = self
            .check(client_ip, helo, &delivery.mail_from, message)
            .await;
        tracing::info!(
            client = %client_ip,
            from = %delivery.mail_from,
            results = %checked.summary,
            disposition = ?checked.disposition,
            "inbound checks"
        );
        if matches!(
            checked.disposition,
            Disposition::Deliver | Disposition::Junk
        ) {
            if let Some(head) =
                super::headers::strip_forged_results(delivery.body.head(), &self.authserv_id)
            {
                tracing::info!(client = %client_ip, "forged Authentication-Results removed");
                delivery.body.set_head(head);
            }
            delivery.body.prepend(checked.header.as_bytes());
        }
        if let (Some(key), Disposition::Deliver, Some(results), true) = (
            arc_seal,
            &checked.disposition,
            &checked.results,
            self.config.arc,
        ) {
            match self.arc_set(key, results, delivery).await {
                Ok(Some(fields)) => delivery.body.prepend(fields.as_bytes()),
                Ok(None) => {
                    tracing::info!(client = %client_ip, "ARC chain failed: not sealed over")
                }
                Err(error) => tracing::warn!(%error, domain = %key.domain, "cannot ARC-seal"),
            }
        }
        (checked.disposition, checked.summary)
    }

    /// Our ARC set for `delivery` as it stands (our `Authentication-Results` on top): the
    /// chain it carries is verified again (its keys come from the caches), then sealed; None
    /// when that chain failed (RFC 8617 section 5.1.2: a `cv=fail` chain is not sealed over).
    /// The signatures are computed here, on the session's task (two signatures per forwarded
    /// message).
    async fn arc_set(
        &self,
        key: &DkimKeyRecord,
        results: &AuthenticationResults<'_>,
        delivery: &Delivery,
    ) -> Result<Option<String>, String> {
        let whole;
        let message: &[u8] = if delivery.body.is_spilled() {
            whole = delivery.body.to_vec().map_err(|e| e.to_string())?;
            &whole
        } else {
            delivery.body.head()
        };
        let parsed = AuthenticatedMessage::parse(message)
            .ok_or_else(|| "the message cannot be parsed".to_owned())?;
        let chain = self.authenticator.verify_arc(self.params(&parsed)).await;
        if !chain.can_be_sealed() || matches!(chain.result(), DkimResult::Fail(_)) {
            return Ok(None);
        }
        key.arc_seal(&parsed, results, &chain)
            .map(Some)
            .map_err(|e| e.to_string())
    }
}

fn dkim_word(result: &DkimResult) -> &'static str {
    match result {
        DkimResult::Pass => "pass",
        DkimResult::Neutral(mail_auth::Error::FailedBodyHashMatch) => "fail",
        DkimResult::Neutral(_) => "neutral",
        DkimResult::Fail(_) => "fail",
        DkimResult::PermError(_) => "permerror",
        DkimResult::TempError(_) => "temperror",
        DkimResult::None => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_organizational_domain_comes_from_the_public_suffix_list() {
        assert_eq!(organizational_domain("mail.example.com"), "example.com");
        assert_eq!(organizational_domain("a.b.example.co.uk"), "example.co.uk");
        assert_eq!(organizational_domain("sub.sender.test"), "sender.test");
    }

    #[test]
    fn config_defaults_round_trip_and_bad_values_are_refused() {
        let text = toml::to_string(&InboundConfig::default()).unwrap();
        let parsed: InboundConfig = toml::from_str(&text).unwrap();
        assert_eq!(parsed, InboundConfig::default());
        assert!(toml::from_str::<InboundConfig>("no_such_key = 1").is_err());
        let bad = InboundConfig {
            authserv_id: "two words".into(),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn the_cache_expires_entries_and_stays_bounded() {
        let cache: DnsCache<String, u32> = DnsCache::new(2);
        let later = Instant::now() + Duration::from_secs(60);
        cache.insert("a".into(), 1, later);
        cache.insert("b".into(), 2, Instant::now());
        assert_eq!(cache.get("a"), Some(1));
        assert_eq!(cache.get("b"), None, "expired");
        cache.insert("c".into(), 3, later);
        cache.insert("d".into(), 4, later);
        assert!(cache.lock().len() <= 2);
        assert_eq!(cache.get("d"), Some(4));
    }
}
