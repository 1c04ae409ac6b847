//! Spam scoring of mail on the MX listener (issue 12): a pipeline of named rules with weights
//! (`[spam]`), or an external rspamd ([`super::rspamd`]).
//!
//! Rules: the SPF/DKIM/DMARC results of [`super::InboundAuth`], DNSBL lookups of the client
//! address, header sanity, HTML-only bodies, many URLs, GTUBE, and a Bayes classifier whose
//! token counts live in the replicated state (`store::bayes`). The score decides the
//! `X-Spam-Status` field, Junk, or `550 5.7.1`. Everything here runs before proposing: the
//! field is part of the proposed body and the Junk filing part of the command.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hickory_resolver::TokioResolver;
use serde::{Deserialize, Serialize};

use crate::store::bayes::{BayesCounts, BAYES_MAX_TOKENS_PER_MESSAGE};
use crate::store::Delivery;

/// The GTUBE test string (SpamAssassin's Generic Test for Unsolicited Bulk Email).
pub const GTUBE: &[u8] = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

/// The rules and their default weights. `BAYES` is the most the classifier adds (at
/// probability 1) or takes off (at 0); `DNSBL_*` rules take their weight from `[[spam.dnsbl]]`.
pub const DEFAULT_WEIGHTS: &[(&str, f64)] = &[
    ("GTUBE", 1000.0),
    ("SPF_FAIL", 3.0),
    ("SPF_SOFTFAIL", 1.0),
    ("SPF_NONE", 0.5),
    ("DKIM_FAIL", 2.0),
    ("DKIM_NONE", 0.5),
    ("DMARC_FAIL", 3.0),
    ("DMARC_NONE", 0.5),
    ("MISSING_DATE", 1.5),
    ("MISSING_MESSAGE_ID", 1.0),
    ("FROM_MALFORMED", 2.5),
    ("DATE_IN_FUTURE", 2.0),
    ("HTML_ONLY", 1.5),
    ("MANY_URLS", 1.5),
    ("BAYES", 5.0),
];

/// How long a DNSBL's "not listed" (NXDOMAIN) is kept in the filter's cache (hickory keeps
/// negative answers only when the zone sends its SOA).
const DNSBL_NEGATIVE_CACHE_SECS: u64 = 300;

/// Most DNSBL answers the filter's cache keeps.
const DNSBL_CACHE_ENTRIES: usize = 10_000;

/// Tokens (the most distant from 0.5) the Bayes combination uses.
const BAYES_INTERESTING_TOKENS: usize = 150;

/// Which scorer runs.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SpamBackend {
    /// The rules of this module.
    #[default]
    Builtin,
    /// An external rspamd over HTTP (`/checkv2`).
    Rspamd,
}

/// What happens when rspamd cannot be asked.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Unreachable {
    /// Deliver unscored (one log line).
    #[default]
    Pass,
    /// `451 4.7.1`: the sender retries later.
    Defer,
}

/// One DNS block list: `zone` is asked for the client address (reversed octets or nibbles),
/// an A record in 127.0.0.0/8 means listed and adds `weight`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DnsblZone {
    pub zone: String,
    #[serde(default = "default_dnsbl_weight")]
    pub weight: f64,
}

fn default_dnsbl_weight() -> f64 {
    4.0
}

/// The `[spam]` section.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SpamConfig {
    /// Score mail on the MX listener. Default false.
    pub enabled: bool,
    /// `builtin` (the rules below) or `rspamd`. Default builtin.
    pub backend: SpamBackend,
    /// At or above this score `X-Spam-Status: Yes` (below: `No`); also its `required=`.
    /// Default 5.0.
    pub add_header: f64,
    /// At or above this score every local copy goes to Junk. Default 8.0.
    pub junk: f64,
    /// At or above this score the message is refused at DATA with `550 5.7.1`. Default 15.0.
    pub reject: f64,
    /// Weights replacing the defaults, by rule name (see README); 0 turns a rule off.
    pub rules: BTreeMap<String, f64>,
    /// DNS block lists asked for the client address. Default none.
    pub dnsbl: Vec<DnsblZone>,
    /// Time for all DNSBL lookups of one message; a list not answered in time counts as
    /// not listed (logged). Default 2000.
    pub dnsbl_timeout_ms: u64,
    /// `MANY_URLS` from this many `http(s)://` links in the text. Default 10.
    pub many_urls: usize,
    /// `DATE_IN_FUTURE` when `Date:` is more than this many hours ahead. Default 24.
    pub future_date_hours: u64,
    /// Use the Bayes classifier, and train it from moves into and out of Junk. Default true.
    pub bayes: bool,
    /// Messages (spam and ham together) learned before `BAYES` counts. Default 20.
    pub bayes_min_learned: u64,
    /// rspamd's normal worker. Default `http://127.0.0.1:11333`.
    pub rspamd_url: String,
    /// Time for one rspamd request. Default 15000.
    pub rspamd_timeout_ms: u64,
    /// rspamd unreachable (or an error): `pass` (deliver unscored, logged) or `defer`
    /// (`451 4.7.1`). Default pass.
    pub rspamd_unreachable: Unreachable,
}

impl Default for SpamConfig {
    fn default() -> Self {
        SpamConfig {
            enabled: false,
            backend: SpamBackend::Builtin,
            add_header: 5.0,
            junk: 8.0,
            reject: 15.0,
            rules: BTreeMap::new(),
            dnsbl: Vec::new(),
            dnsbl_timeout_ms: 2000,
            many_urls: 10,
            future_date_hours: 24,
            bayes: true,
            bayes_min_learned: 20,
            rspamd_url: "http://127.0.0.1:11333".to_owned(),
            rspamd_timeout_ms: 15_000,
            rspamd_unreachable: Unreachable::Pass,
        }
    }
}

impl SpamConfig {
    pub fn validate(&self) -> Result<(), String> {
        for name in self.rules.keys() {
            if !DEFAULT_WEIGHTS.iter().any(|(rule, _)| rule == name) {
                return Err(format!("spam.rules: unknown rule {name:?}"));
            }
        }
        if !(self.add_header <= self.junk && self.junk <= self.reject) {
            return Err("spam: add_header <= junk <= reject is required".into());
        }
        for zone in &self.dnsbl {
            if zone.zone.is_empty() || zone.zone.contains(|c: char| c.is_whitespace()) {
                return Err(format!("spam.dnsbl: bad zone {:?}", zone.zone));
            }
        }
        if self.dnsbl_timeout_ms == 0 || self.rspamd_timeout_ms == 0 {
            return Err("spam.dnsbl_timeout_ms and rspamd_timeout_ms must be > 0".into());
        }
        if self.enabled
            && self.backend == SpamBackend::Rspamd
            && !self.rspamd_url.starts_with("http://")
        {
            return Err("spam.rspamd_url must be an http:// URL".into());
        }
        Ok(())
    }
}

/// What the SMTP session knows of one message.
#[derive(Debug, Clone, Copy)]
pub struct ScanRequest<'a> {
    pub client_ip: IpAddr,
    pub helo: &'a str,
    pub mail_from: &'a str,
    pub recipients: &'a [String],
    pub message: &'a [u8],
    /// The inbound checks' summary (`spf=pass dkim=none dmarc=fail`), when they ran.
    pub auth: Option<&'a str>,
    pub now: SystemTime,
}

/// What the scorer decided.
#[derive(Debug, Clone, PartialEq)]
pub enum SpamAction {
    Deliver,
    /// Every local copy to Junk.
    Junk,
    /// This SMTP reply (`550 5.7.1`), nothing stored.
    Reject(String),
    /// This SMTP reply (`451 4.7.1`), nothing stored.
    Defer(String),
}

/// The verdict on one message.
#[derive(Debug, Clone, PartialEq)]
pub struct SpamVerdict {
    pub score: f64,
    /// Fired rules and their scores, in name order.
    pub tests: Vec<(String, f64)>,
    pub action: SpamAction,
    /// Header fields to prepend (`X-Spam-Status: ...\r\n`); empty when unscored.
    pub header: String,
    /// A new Subject (rspamd's "rewrite subject").
    pub subject: Option<String>,
}

impl SpamVerdict {
    fn unscored(action: SpamAction) -> SpamVerdict {
        SpamVerdict {
            score: 0.0,
            tests: Vec::new(),
            action,
            header: String::new(),
            subject: None,
        }
    }
}

/// The `X-Spam-Status` field (SpamAssassin's shape), folded after the score.
pub fn status_field(spam: bool, score: f64, required: f64, tests: &[(String, f64)]) -> String {
    let tests: Vec<String> = tests
        .iter()
        .map(|(name, score)| format!("{name}={score:.2}"))
        .collect();
    format!(
        "X-Spam-Status: {}, score={score:.2} required={required:.2}\r\n\ttests={}\r\n",
        if spam { "Yes" } else { "No" },
        if tests.is_empty() {
            "NONE".to_owned()
        } else {
            tests.join(",")
        }
    )
}

/// The node's scorer, shared by every SMTP session.
pub struct SpamFilter {
    config: SpamConfig,
    weights: BTreeMap<String, f64>,
    resolver: Option<TokioResolver>,
    /// DNSBL answers by query name (listed or not), until their TTL (positive) or
    /// [`DNSBL_NEGATIVE_CACHE_SECS`] (negative).
    dnsbl_cache: super::inbound::DnsCache<String, bool>,
    rspamd: Option<super::rspamd::Rspamd>,
}

impl std::fmt::Debug for SpamFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpamFilter")
            .field("backend", &self.config.backend)
            .finish()
    }
}

/// The DNSBL query name of `ip` in `zone`: reversed octets for IPv4, reversed nibbles for
/// IPv6 (RFC 5782 section 2.4), with the final dot.
pub fn dnsbl_name(ip: IpAddr, zone: &str) -> String {
    let zone = zone.trim_end_matches('.');
    // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d: they are listed as IPv4.
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}.{zone}.")
        }
        IpAddr::V6(v6) => {
            let mut name = String::with_capacity(64 + zone.len());
            for byte in v6.octets().iter().rev() {
                name.push(char::from_digit(u32::from(byte & 0x0f), 16).unwrap_or('0'));
                name.push('.');
                name.push(char::from_digit(u32::from(byte >> 4), 16).unwrap_or('0'));
                name.push('.');
            }
            name.push_str(zone);
            name.push('.');
            name
        }
    }
}

/// A DNSBL answer means listed when it is in 127.0.0.0/8, but not 127.255.255.0/24 (Spamhaus'
/// error codes: an open or over-quota resolver, not a listing).
fn listed(answer: std::net::Ipv4Addr) -> bool {
    let [a, b, c, _] = answer.octets();
    a == 127 && !(b == 255 && c == 255)
}

/// The rule name of a DNSBL zone: `DNSBL_ZEN_SPAMHAUS_ORG`.
pub fn dnsbl_rule(zone: &str) -> String {
    let mut name = String::from("DNSBL_");
    for c in zone.trim_end_matches('.').chars() {
        name.push(if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        });
    }
    name
}

fn token_hash(kind: &str, word: &str) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(kind.as_bytes());
    hasher.update(b":");
    hasher.update(word.as_bytes());
    let bytes = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

fn words(text: &str, kind: &str, out: &mut BTreeSet<u64>) {
    for word in text.split(|c: char| !c.is_alphanumeric() && c != '\'' && c != '$') {
        let word = word.trim_matches('\'');
        let n = word.chars().count();
        if (3..=24).contains(&n) {
            out.insert(token_hash(kind, &word.to_lowercase()));
        }
        if out.len() >= BAYES_MAX_TOKENS_PER_MESSAGE {
            return;
        }
    }
}

/// The Bayes tokens of a message: distinct hashes of the Subject's words, the From domain
/// and the words of the text parts (HTML as text), at most
/// [`BAYES_MAX_TOKENS_PER_MESSAGE`], ascending. The same bytes give the same tokens on every
/// node.
pub fn tokens(message: &[u8]) -> Vec<u64> {
    match mail_parser::MessageParser::default().parse(message) {
        Some(parsed) => tokens_of(&parsed),
        None => Vec::new(),
    }
}

/// [`tokens`] of an already parsed message.
fn tokens_of(parsed: &mail_parser::Message<'_>) -> Vec<u64> {
    let mut out = BTreeSet::new();
    if let Some(subject) = parsed.subject() {
        words(subject, "subject", &mut out);
    }
    if let Some(domain) = parsed
        .from()
        .and_then(|from| from.first())
        .and_then(|addr| addr.address())
        .and_then(|address| address.rsplit_once('@'))
        .map(|(_, domain)| domain.to_lowercase())
    {
        out.insert(token_hash("from", &domain));
    }
    for index in 0..parsed.text_body_count() {
        if out.len() >= BAYES_MAX_TOKENS_PER_MESSAGE {
            break;
        }
        if let Some(text) = parsed.body_text(index) {
            words(&text, "body", &mut out);
        }
    }
    out.into_iter().take(BAYES_MAX_TOKENS_PER_MESSAGE).collect()
}

/// The upper tail of the chi-square distribution with `freedom` (even) degrees, at `x2`.
fn chi2q(x2: f64, freedom: usize) -> f64 {
    let m = x2 / 2.0;
    let mut term = (-m).exp();
    let mut sum = term;
    for i in 1..freedom / 2 {
        term *= m / i as f64;
        sum += term;
    }
    sum.min(1.0)
}

/// The spam probability of a message from its tokens' counts (Robinson's per-token
/// estimate, Fisher's chi-square combination as in SpamBayes); None without a token that
/// says something.
pub fn bayes_probability(counts: &BayesCounts) -> Option<f64> {
    let n_spam = counts.spam_learned.max(1) as f64;
    let n_ham = counts.ham_learned.max(1) as f64;
    let mut interesting: Vec<f64> = counts
        .tokens
        .iter()
        .filter(|(s, h)| s + h > 0)
        .map(|&(s, h)| {
            let spam_ratio = f64::from(s) / n_spam;
            let ham_ratio = f64::from(h) / n_ham;
            let p = spam_ratio / (spam_ratio + ham_ratio);
            let n = f64::from(s + h);
            // Strength 1 of the prior 0.5.
            ((0.5 + n * p) / (1.0 + n)).clamp(0.01, 0.99)
        })
        .filter(|f| (f - 0.5).abs() > 0.1)
        .collect();
    if interesting.is_empty() {
        return None;
    }
    interesting.sort_by(|a, b| {
        (b - 0.5)
            .abs()
            .partial_cmp(&(a - 0.5).abs())
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    interesting.truncate(BAYES_INTERESTING_TOKENS);
    let n = interesting.len();
    let ln_ham: f64 = interesting.iter().map(|f| f.ln()).sum();
    let ln_spam: f64 = interesting.iter().map(|f| (1.0 - f).ln()).sum();
    let h = chi2q(-2.0 * ln_ham, 2 * n);
    let s = chi2q(-2.0 * ln_spam, 2 * n);
    Some((1.0 + h - s) / 2.0)
}

fn count_urls(text: &str) -> usize {
    let lower = text.to_ascii_lowercase();
    lower.matches("http://").count() + lower.matches("https://").count()
}

impl SpamFilter {
    /// The scorer `config` describes. `resolver`: the inbound checks' resolver (its cache is
    /// shared), or None to build one from `dns` (`[inbound]`'s DNS settings).
    pub fn new(
        config: &SpamConfig,
        resolver: Option<TokioResolver>,
        dns: &super::InboundConfig,
    ) -> Result<SpamFilter, String> {
        config.validate()?;
        let mut weights: BTreeMap<String, f64> = DEFAULT_WEIGHTS
            .iter()
            .map(|(name, weight)| ((*name).to_owned(), *weight))
            .collect();
        for (name, weight) in &config.rules {
            weights.insert(name.clone(), *weight);
        }
        let resolver = match (config.backend, config.dnsbl.is_empty(), resolver) {
            (SpamBackend::Builtin, false, Some(resolver)) => Some(resolver),
            (SpamBackend::Builtin, false, None) => Some(super::inbound::build_resolver(dns)?),
            _ => None,
        };
        let rspamd = match config.backend {
            SpamBackend::Rspamd => Some(super::rspamd::Rspamd::new(
                &config.rspamd_url,
                Duration::from_millis(config.rspamd_timeout_ms),
            )?),
            SpamBackend::Builtin => None,
        };
        Ok(SpamFilter {
            config: config.clone(),
            weights,
            resolver,
            dnsbl_cache: super::inbound::DnsCache::new(DNSBL_CACHE_ENTRIES),
            rspamd,
        })
    }

    /// Whether the classifier learns from moves into and out of Junk on this node.
    pub fn learns(&self) -> bool {
        self.config.backend == SpamBackend::Builtin
            && self.config.bayes
            && self.weight("BAYES") != 0.0
    }

    pub fn config(&self) -> &SpamConfig {
        &self.config
    }

    fn weight(&self, rule: &str) -> f64 {
        self.weights.get(rule).copied().unwrap_or(0.0)
    }

    /// Scores one message. `bayes` gives the replicated token counts.
    pub async fn scan(
        &self,
        request: &ScanRequest<'_>,
        bayes: impl FnOnce(&[u64]) -> BayesCounts,
    ) -> SpamVerdict {
        if let Some(rspamd) = &self.rspamd {
            return match rspamd.check(request).await {
                Ok(reply) => reply.verdict(request.message),
                Err(error) => {
                    tracing::warn!(%error, client = %request.client_ip, "rspamd unreachable");
                    SpamVerdict::unscored(match self.config.rspamd_unreachable {
                        Unreachable::Pass => SpamAction::Deliver,
                        Unreachable::Defer => SpamAction::Defer(
                            "451 4.7.1 Error: the spam filter is unavailable, try again later"
                                .to_owned(),
                        ),
                    })
                }
            };
        }
        let parsed = mail_parser::MessageParser::default().parse(request.message);
        let mut tests = self.static_rules(request, parsed.as_ref());
        tests.extend(self.dnsbl(request.client_ip).await);
        if self.learns() {
            let tokens = parsed.as_ref().map(tokens_of).unwrap_or_default();
            let counts = bayes(&tokens);
            if counts.spam_learned + counts.ham_learned >= self.config.bayes_min_learned {
                if let Some(p) = bayes_probability(&counts) {
                    let score = self.weight("BAYES") * (2.0 * p - 1.0);
                    if score.abs() >= 0.005 {
                        tests.push(("BAYES".to_owned(), score));
                    }
                }
            }
        }
        tests.retain(|(_, score)| *score != 0.0);
        tests.sort_by(|a, b| a.0.cmp(&b.0));
        let score = tests.iter().fold(0.0, |sum, (_, s)| sum + s);
        self.verdict(score, tests)
    }

    fn verdict(&self, score: f64, tests: Vec<(String, f64)>) -> SpamVerdict {
        let config = &self.config;
        let action = if score >= config.reject {
            SpamAction::Reject(format!(
                "550 5.7.1 Error: message rejected as spam (score {score:.1})"
            ))
        } else if score >= config.junk {
            SpamAction::Junk
        } else {
            SpamAction::Deliver
        };
        SpamVerdict {
            header: status_field(score >= config.add_header, score, config.add_header, &tests),
            score,
            tests,
            action,
            subject: None,
        }
    }

    /// The rules that need no DNS: authentication results, headers, body.
    fn static_rules(
        &self,
        request: &ScanRequest<'_>,
        parsed: Option<&mail_parser::Message<'_>>,
    ) -> Vec<(String, f64)> {
        let mut fired: Vec<&'static str> = Vec::new();
        if memchr::memmem::find(request.message, GTUBE).is_some() {
            fired.push("GTUBE");
        }
        if let Some(auth) = request.auth {
            // The summary spells SPF results as mail-auth displays them (`spf=SoftFail`).
            let auth = auth.to_ascii_lowercase();
            for word in auth.split_whitespace() {
                let Some((method, result)) = word.split_once('=') else {
                    continue;
                };
                let results: Vec<&str> = result.split(',').collect();
                let any = |r: &str| results.contains(&r);
                match method {
                    "spf" if any("fail") => fired.push("SPF_FAIL"),
                    "spf" if any("softfail") => fired.push("SPF_SOFTFAIL"),
                    "spf" if any("none") => fired.push("SPF_NONE"),
                    "dkim" if !any("pass") && (any("fail") || any("permerror")) => {
                        fired.push("DKIM_FAIL")
                    }
                    "dkim" if any("none") => fired.push("DKIM_NONE"),
                    "dmarc" if any("fail") => fired.push("DMARC_FAIL"),
                    "dmarc" if any("none") => fired.push("DMARC_NONE"),
                    _ => {}
                }
            }
        }
        self.header_rules(request, parsed, &mut fired);
        fired
            .into_iter()
            .map(|rule| (rule.to_owned(), self.weight(rule)))
            .collect()
    }

    fn header_rules(
        &self,
        request: &ScanRequest<'_>,
        parsed: Option<&mail_parser::Message<'_>>,
        fired: &mut Vec<&'static str>,
    ) {
        let head = &request.message[..super::headers::header_section_end(request.message)];
        let has_field = |name: &str| {
            head.split(|&b| b == b'\n').any(|line| {
                line.len() > name.len()
                    && line[..name.len()].eq_ignore_ascii_case(name.as_bytes())
                    && line[name.len()] == b':'
            })
        };
        if !has_field("Date") {
            fired.push("MISSING_DATE");
        } else if let Some(date) = parsed.and_then(|p| p.date()) {
            let now = request
                .now
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let ahead = i64::try_from(self.config.future_date_hours.saturating_mul(3600))
                .unwrap_or(i64::MAX);
            if date.to_timestamp() > now.saturating_add(ahead) {
                fired.push("DATE_IN_FUTURE");
            }
        }
        if !has_field("Message-ID") {
            fired.push("MISSING_MESSAGE_ID");
        }
        let from_ok = has_field("From")
            && parsed
                .and_then(|p| p.from())
                .and_then(|from| from.first())
                .and_then(|addr| addr.address())
                .and_then(|address| address.rsplit_once('@'))
                .is_some_and(|(local, domain)| {
                    !local.is_empty()
                        && domain.contains('.')
                        && !domain.starts_with('.')
                        && !domain.ends_with('.')
                        && !domain.contains(|c: char| c.is_whitespace() || c == '@')
                });
        if !from_ok {
            fired.push("FROM_MALFORMED");
        }
        let Some(parsed) = parsed else {
            return;
        };
        let mut html = false;
        let mut text = false;
        let mut urls = 0;
        for part in &parsed.parts {
            match &part.body {
                mail_parser::PartType::Html(body) => {
                    html = true;
                    urls += count_urls(body);
                }
                mail_parser::PartType::Text(body) => {
                    text = true;
                    urls += count_urls(body);
                }
                _ => {}
            }
        }
        if html && !text {
            fired.push("HTML_ONLY");
        }
        if urls >= self.config.many_urls.max(1) {
            fired.push("MANY_URLS");
        }
    }

    /// Each configured list that lists `ip`, within `dnsbl_timeout_ms` for all of them. A list
    /// that fails or times out counts as not listed (logged): a block list is an opinion, not
    /// an authentication.
    async fn dnsbl(&self, ip: IpAddr) -> Vec<(String, f64)> {
        let Some(resolver) = &self.resolver else {
            return Vec::new();
        };
        use mail_auth::ResolverCache as _;
        let cache = &self.dnsbl_cache;
        let lookups = self.config.dnsbl.iter().map(|zone| async move {
            let name = dnsbl_name(ip, &zone.zone);
            let hit = (zone.weight != 0.0).then(|| (dnsbl_rule(&zone.zone), zone.weight));
            if let Some(is_listed) = cache.get(&name) {
                return if is_listed { hit } else { None };
            }
            match resolver.ipv4_lookup(name.as_str()).await {
                Ok(answers) => {
                    let is_listed = answers.iter().any(|a| listed(a.0));
                    cache.insert(name, is_listed, answers.valid_until());
                    if is_listed {
                        hit
                    } else {
                        None
                    }
                }
                Err(error) => {
                    if crate::outbound::dns::classify(&error)
                        == crate::outbound::dns::LookupFailure::Temporary
                    {
                        tracing::info!(zone = %zone.zone, %error, "DNSBL lookup failed");
                    } else {
                        cache.insert(
                            name,
                            false,
                            std::time::Instant::now()
                                + Duration::from_secs(DNSBL_NEGATIVE_CACHE_SECS),
                        );
                    }
                    None
                }
            }
        });
        let all = futures::future::join_all(lookups);
        match tokio::time::timeout(Duration::from_millis(self.config.dnsbl_timeout_ms), all).await {
            Ok(results) => results.into_iter().flatten().collect(),
            Err(_) => {
                tracing::info!(client = %ip, "DNSBL lookups timed out");
                Vec::new()
            }
        }
    }
}

impl SpamFilter {
    /// Scores a message received on the MX listener (after the inbound checks, `auth` their
    /// summary) with `store`'s Bayes counts, and applies the verdict to `delivery` unless it
    /// is refused. The driver then delivers, files into Junk, or answers.
    pub async fn filter_delivery(
        &self,
        store: &crate::store::MailStore,
        client_ip: IpAddr,
        helo: &str,
        auth: Option<&str>,
        delivery: &mut Delivery,
    ) -> SpamAction {
        let whole;
        let message: &[u8] = if delivery.body.is_spilled() {
            whole = match delivery.body.to_vec() {
                Ok(whole) => whole,
                Err(error) => {
                    tracing::warn!(%error, "cannot read a message back for spam scoring");
                    return SpamAction::Defer(
                        "451 4.3.0 Error: cannot check the message now, try again later".into(),
                    );
                }
            };
            &whole
        } else {
            delivery.body.head()
        };
        let request = ScanRequest {
            client_ip,
            helo,
            mail_from: &delivery.mail_from,
            recipients: &delivery.recipients,
            message,
            auth,
            now: SystemTime::now(),
        };
        let verdict = self
            .scan(&request, |tokens| store.bayes_counts(tokens))
            .await;
        let tests: Vec<&str> = verdict
            .tests
            .iter()
            .map(|(name, _)| name.as_str())
            .collect();
        tracing::info!(
            client = %client_ip,
            from = %delivery.mail_from,
            score = format!("{:.2}", verdict.score),
            tests = %tests.join(","),
            action = ?verdict.action,
            "spam scoring"
        );
        if matches!(verdict.action, SpamAction::Deliver | SpamAction::Junk) {
            apply_to_delivery(&verdict, delivery);
        }
        verdict.action
    }
}

/// Applies a verdict to a delivery: our `X-Spam-*` fields replace any the message brought,
/// and a rewritten Subject replaces the old one.
pub fn apply_to_delivery(verdict: &SpamVerdict, delivery: &mut Delivery) {
    if verdict.header.is_empty() && verdict.subject.is_none() {
        return;
    }
    let head = delivery.body.head();
    let mut new_head = strip_fields(head, &["x-spam-status", "x-spam-flag", "x-spam"])
        .unwrap_or_else(|| head.to_vec());
    if let Some(subject) = &verdict.subject {
        new_head = replace_subject(&new_head, subject);
    }
    delivery.body.set_head(new_head);
    delivery.body.prepend(verdict.header.as_bytes());
}

/// The header section's fields as (start, end) offsets, continuation lines included.
fn fields(message: &[u8]) -> Vec<(usize, usize)> {
    let end = super::headers::header_section_end(message);
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut offset = 0;
    while offset < end {
        let line_end = memchr::memchr(b'\n', &message[offset..end]).map_or(end, |p| offset + p + 1);
        let line = &message[offset..line_end];
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        match (line.first(), out.last_mut()) {
            (Some(b' ' | b'\t'), Some(last)) => last.1 = line_end,
            _ => out.push((offset, line_end)),
        }
        offset = line_end;
    }
    out
}

fn field_is(message: &[u8], (start, end): (usize, usize), name: &str) -> bool {
    let field = &message[start..end];
    field.len() > name.len()
        && field[..name.len()].eq_ignore_ascii_case(name.as_bytes())
        && matches!(field[name.len()], b':' | b' ' | b'\t')
        && field[name.len()..]
            .iter()
            .find(|b| !matches!(b, b' ' | b'\t'))
            == Some(&b':')
}

/// `message` without the header fields named in `names` (lower case); None when none is there.
pub fn strip_fields(message: &[u8], names: &[&str]) -> Option<Vec<u8>> {
    let fields = fields(message);
    let removed: Vec<&(usize, usize)> = fields
        .iter()
        .filter(|f| names.iter().any(|name| field_is(message, **f, name)))
        .collect();
    if removed.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(message.len());
    let mut offset = 0;
    for (start, end) in removed {
        out.extend_from_slice(&message[offset..*start]);
        offset = *end;
    }
    out.extend_from_slice(&message[offset..]);
    Some(out)
}

/// `message` with its Subject replaced by `subject` (added when missing).
fn replace_subject(message: &[u8], subject: &str) -> Vec<u8> {
    let clean: String = subject
        .chars()
        .filter(|c| *c != '\r' && *c != '\n')
        .collect();
    let line = format!("Subject: {clean}\r\n");
    let mut out = strip_fields(message, &["subject"]).unwrap_or_else(|| message.to_vec());
    let at = fields(&out).last().map_or(0, |(_, end)| *end);
    out.splice(at..at, line.bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(config: SpamConfig) -> SpamFilter {
        SpamFilter::new(&config, None, &super::super::InboundConfig::default()).unwrap()
    }

    fn request<'a>(message: &'a [u8], auth: Option<&'a str>) -> ScanRequest<'a> {
        ScanRequest {
            client_ip: "192.0.2.1".parse().unwrap(),
            helo: "client.test",
            mail_from: "a@client.test",
            recipients: &[],
            message,
            auth,
            now: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        }
    }

    const CLEAN: &[u8] = b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\n\
        Date: Tue, 14 Nov 2023 22:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n\
        Subject: lunch\r\n\r\nSee you at noon.\r\n";

    fn names(verdict: &SpamVerdict) -> Vec<&str> {
        verdict.tests.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[tokio::test]
    async fn a_clean_message_fires_nothing_and_gets_no() {
        let verdict = filter(SpamConfig::default())
            .scan(
                &request(CLEAN, Some("spf=pass dkim=pass dmarc=pass")),
                |_| BayesCounts::default(),
            )
            .await;
        assert_eq!(names(&verdict), Vec::<&str>::new());
        assert_eq!(verdict.action, SpamAction::Deliver);
        assert!(verdict
            .header
            .starts_with("X-Spam-Status: No, score=0.00 required=5.00"));
    }

    #[tokio::test]
    async fn header_sanity_html_urls_auth_and_gtube_rules_fire() {
        let links = "http://a.example/ ".repeat(12);
        let message = format!(
            "From: not an address\r\nDate: Tue, 14 Nov 2030 22:00:00 +0000\r\n\
             Content-Type: text/html\r\nSubject: win\r\n\r\n<p>{links}</p>\r\n"
        );
        let verdict = filter(SpamConfig::default())
            .scan(
                &request(message.as_bytes(), Some("spf=Fail dkim=none dmarc=fail")),
                |_| BayesCounts::default(),
            )
            .await;
        assert_eq!(
            names(&verdict),
            vec![
                "DATE_IN_FUTURE",
                "DKIM_NONE",
                "DMARC_FAIL",
                "FROM_MALFORMED",
                "HTML_ONLY",
                "MANY_URLS",
                "MISSING_MESSAGE_ID",
                "SPF_FAIL"
            ]
        );
        assert_eq!(
            verdict.action,
            SpamAction::Reject("550 5.7.1 Error: message rejected as spam (score 15.0)".into())
        );
        let gtube = [CLEAN, GTUBE].concat();
        let verdict = filter(SpamConfig::default())
            .scan(&request(&gtube, None), |_| BayesCounts::default())
            .await;
        assert_eq!(names(&verdict), vec!["GTUBE"]);
        assert!(matches!(verdict.action, SpamAction::Reject(_)));
    }

    #[tokio::test]
    async fn bayes_raises_the_score_of_a_message_like_learned_spam() {
        let spam = b"From: x@spam.example\r\nSubject: cheap pills online\r\n\r\n\
            Buy cheap pills online today, best offer\r\n";
        let config = SpamConfig {
            bayes_min_learned: 1,
            ..SpamConfig::default()
        };
        let learned = tokens(spam);
        let counts = |asked: &[u64]| BayesCounts {
            spam_learned: 1,
            ham_learned: 0,
            tokens: asked
                .iter()
                .map(|t| if learned.contains(t) { (1, 0) } else { (0, 0) })
                .collect(),
        };
        let verdict = filter(config).scan(&request(spam, None), counts).await;
        let bayes = verdict.tests.iter().find(|(n, _)| n == "BAYES").unwrap().1;
        assert!(bayes > 1.0, "{verdict:?}");
    }

    #[test]
    fn dnsbl_names_reverse_octets_and_nibbles() {
        assert_eq!(
            dnsbl_name("192.0.2.99".parse().unwrap(), "zen.spamhaus.org"),
            "99.2.0.192.zen.spamhaus.org."
        );
        assert_eq!(
            dnsbl_name("2001:db8::1".parse().unwrap(), "dnsbl.test."),
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.dnsbl.test."
        );
        assert_eq!(
            dnsbl_name("::ffff:192.0.2.99".parse().unwrap(), "zen.spamhaus.org"),
            "99.2.0.192.zen.spamhaus.org."
        );
        assert!(listed("127.0.0.2".parse().unwrap()));
        assert!(!listed("127.255.255.254".parse().unwrap()));
        assert_eq!(dnsbl_rule("zen.spamhaus.org"), "DNSBL_ZEN_SPAMHAUS_ORG");
    }

    #[test]
    fn forged_status_fields_go_and_the_subject_is_rewritten() {
        let message = b"X-Spam-Status: No,\r\n\tscore=-100\r\nSubject: hi\r\nFrom: a@b.c\r\n\r\nX-Spam-Status: body\r\n";
        let stripped = strip_fields(message, &["x-spam-status"]).unwrap();
        assert_eq!(
            stripped,
            b"Subject: hi\r\nFrom: a@b.c\r\n\r\nX-Spam-Status: body\r\n"
        );
        let rewritten = replace_subject(&stripped, "*** SPAM *** hi");
        assert_eq!(
            rewritten,
            b"From: a@b.c\r\nSubject: *** SPAM *** hi\r\n\r\nX-Spam-Status: body\r\n"
        );
    }

    #[test]
    fn config_round_trips_and_unknown_rules_are_refused() {
        let text = toml::to_string(&SpamConfig::default()).unwrap();
        assert_eq!(
            toml::from_str::<SpamConfig>(&text).unwrap(),
            SpamConfig::default()
        );
        let bad: SpamConfig = toml::from_str("rules = { NO_SUCH = 1.0 }").unwrap();
        assert!(bad.validate().is_err());
        let zones: SpamConfig =
            toml::from_str("dnsbl = [{ zone = \"zen.spamhaus.org\", weight = 6.0 }]").unwrap();
        assert_eq!(zones.dnsbl[0].weight, 6.0);
    }
}
