//! Per-destination delivery policies, the limiters that enforce them, and the retry schedule.
//!
//! A policy is matched on the recipient domain or on an MX host name; the first configured
//! policy that matches wins, otherwise the default policy applies. Limiters are keyed by
//! [`Policies::limiter_key`]: a named policy shares one rate and one connection budget across
//! all its domains (Orange counts per sender IP, not per domain), while the default policy is
//! applied per destination domain.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Added to the one-second window by [`Limiters`], so that jitter between the limiter and the
/// receiver's clock (connection set-up, scheduling) cannot squeeze N+1 messages into one
/// second as the receiver measures it.
pub const RATE_WINDOW_MARGIN_MS: u64 = 50;

/// Upper bound on `max_connections`, so a typo cannot open thousands of sockets.
pub const MAX_CONNECTIONS_PER_POLICY_LIMIT: usize = 1_000;

/// Upper bound on distinct limiter keys kept by [`Limiters`] (default-policy keys are per
/// domain); beyond it, idle keys are dropped.
pub const MAX_LIMITER_KEYS: usize = 100_000;

/// Which address families a destination may be reached over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IpFamily {
    Ipv4Only,
    Ipv6Only,
    #[default]
    Any,
}

impl IpFamily {
    /// Whether an address of this family may be used.
    pub fn allows(self, address: &std::net::IpAddr) -> bool {
        match self {
            IpFamily::Ipv4Only => address.is_ipv4(),
            IpFamily::Ipv6Only => address.is_ipv6(),
            IpFamily::Any => true,
        }
    }
}

/// One `[[outbound.policy]]` entry (also the shape of `[outbound.default_policy]`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Name used in logs and as the limiter key. Default: "unnamed".
    pub name: String,
    /// Recipient domains: exact (`orange.fr`) or `*.suffix` (any name below `suffix`).
    pub match_domains: Vec<String>,
    /// MX host patterns, same syntax as `match_domains`.
    pub match_mx: Vec<String>,
    /// Messages per second to this destination; none means unlimited. A value of 1 or more
    /// allows floor(value) messages in any one-second window; below 1, one message per
    /// 1/value seconds. Default: none.
    pub max_messages_per_second: Option<f64>,
    /// Concurrent connections to this destination. Default: 10.
    pub max_connections: usize,
    /// `ipv4-only`, `ipv6-only` or `any`. Default: `any`.
    pub ip_family: IpFamily,
    /// Refuse to send in clear, and verify the certificate against the webpki roots.
    /// Default: false (opportunistic STARTTLS, any certificate accepted).
    pub require_tls: bool,
    /// Source address for IPv4 connections. Default: chosen by the kernel.
    pub source_ipv4: Option<Ipv4Addr>,
    /// Source address for IPv6 connections. Default: chosen by the kernel.
    pub source_ipv6: Option<Ipv6Addr>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            name: "unnamed".to_owned(),
            match_domains: Vec::new(),
            match_mx: Vec::new(),
            max_messages_per_second: None,
            max_connections: 10,
            ip_family: IpFamily::Any,
            require_tls: false,
            source_ipv4: None,
            source_ipv6: None,
        }
    }
}

impl PolicyConfig {
    /// The policy for destinations no entry matches.
    pub fn default_policy() -> Self {
        Self {
            name: "default".to_owned(),
            ..Self::default()
        }
    }

    fn matches(&self, domain: &str, mx_hosts: &[&str]) -> bool {
        self.match_domains
            .iter()
            .any(|pattern| name_matches(pattern, domain))
            || mx_hosts
                .iter()
                .any(|host| self.match_mx.iter().any(|p| name_matches(p, host)))
    }
}

/// The examples shipped in the default configuration.
pub fn shipped_example_policies() -> Vec<PolicyConfig> {
    vec![
        PolicyConfig {
            name: "orange".to_owned(),
            match_domains: vec!["orange.fr".to_owned(), "wanadoo.fr".to_owned()],
            match_mx: vec!["*.orange.fr".to_owned(), "*.wanadoo.fr".to_owned()],
            max_messages_per_second: Some(3.0),
            max_connections: 3,
            ..PolicyConfig::default()
        },
        PolicyConfig {
            name: "gmail".to_owned(),
            match_domains: vec!["gmail.com".to_owned(), "googlemail.com".to_owned()],
            match_mx: vec!["*.google.com".to_owned(), "*.googlemail.com".to_owned()],
            ip_family: IpFamily::Ipv4Only,
            ..PolicyConfig::default()
        },
    ]
}

/// Case-insensitive name match: exact, or `*.suffix` for any name strictly below `suffix`.
/// A trailing dot on either side is ignored.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(suffix) => name.len() > suffix.len() + 1 && name.ends_with(&format!(".{suffix}")),
        None => pattern == name,
    }
}

/// The configured policies, first match wins.
#[derive(Debug, Clone)]
pub struct Policies {
    entries: Vec<PolicyConfig>,
    default_policy: PolicyConfig,
}

impl Policies {
    pub fn new(entries: Vec<PolicyConfig>, default_policy: PolicyConfig) -> Self {
        Self {
            entries,
            default_policy,
        }
    }

    /// The policy for a recipient domain whose MX hosts are `mx_hosts` (may be empty when
    /// they are not known yet). Returns whether it is the default policy, too.
    pub fn select(&self, domain: &str, mx_hosts: &[&str]) -> (&PolicyConfig, bool) {
        match self.entries.iter().find(|p| p.matches(domain, mx_hosts)) {
            Some(policy) => (policy, false),
            None => (&self.default_policy, true),
        }
    }

    /// The key under which limiters are shared: the policy name for configured policies,
    /// the domain for the default policy.
    pub fn limiter_key(&self, domain: &str, mx_hosts: &[&str]) -> String {
        match self.select(domain, mx_hosts) {
            (policy, false) => format!("policy:{}", policy.name),
            (_, true) => format!("domain:{}", domain.to_ascii_lowercase()),
        }
    }
}

/// Sliding-window rate limiter: never more than `max_in_window` acquisitions in any
/// half-open window of length `window`. Each acquisition reserves a time slot at least
/// `window` after the acquisition `max_in_window` places before it, then sleeps until it.
#[derive(Debug)]
pub struct RateLimiter {
    max_in_window: usize,
    window: Duration,
    reserved: Mutex<VecDeque<Instant>>,
}

impl RateLimiter {
    /// `max_in_window` is at least 1.
    pub fn new(max_in_window: usize, window: Duration) -> Self {
        let max_in_window = max_in_window.max(1);
        Self {
            max_in_window,
            window,
            reserved: Mutex::new(VecDeque::with_capacity(max_in_window)),
        }
    }

    /// The limiter for a rate in messages per second, plus a safety margin on the window:
    /// floor(rate) per (1 s + margin) when rate >= 1, one per (1/rate s + margin) below 1.
    /// Returns none for no limit (absent, zero, negative or not finite).
    pub fn per_second(rate: Option<f64>, margin: Duration) -> Option<Self> {
        let rate = rate.filter(|r| r.is_finite() && *r > 0.0)?;
        if rate >= 1.0 {
            let n = rate.floor().min(1_000_000.0) as usize;
            Some(Self::new(n, Duration::from_secs(1) + margin))
        } else {
            let window = Duration::from_secs_f64((1.0 / rate).min(86_400.0));
            Some(Self::new(1, window + margin))
        }
    }

    /// Reserves the next slot and waits until it. Cancelling the wait forfeits the slot
    /// (the limiter stays conservative).
    pub async fn acquire(&self) {
        let slot = self.reserve(Instant::now());
        tokio::time::sleep_until(slot).await;
    }

    /// Reserves the earliest slot at or after `now` that keeps the window guarantee.
    pub fn reserve(&self, now: Instant) -> Instant {
        let mut reserved = match self.reserved.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut slot = now;
        if let Some(last) = reserved.back() {
            slot = slot.max(*last);
        }
        if reserved.len() >= self.max_in_window {
            let nth_last = reserved[reserved.len() - self.max_in_window];
            slot = slot.max(nth_last + self.window);
        }
        reserved.push_back(slot);
        while reserved.len() > self.max_in_window {
            reserved.pop_front();
        }
        slot
    }
}

/// Connection limiter: at most `max_connections` permits out at once.
#[derive(Debug, Clone)]
pub struct ConnectionLimiter {
    semaphore: Arc<Semaphore>,
    max_connections: usize,
}

impl ConnectionLimiter {
    pub fn new(max_connections: usize) -> Self {
        let n = max_connections.clamp(1, MAX_CONNECTIONS_PER_POLICY_LIMIT);
        Self {
            semaphore: Arc::new(Semaphore::new(n)),
            max_connections: n,
        }
    }

    /// Waits for a free connection slot; the slot is returned when the permit drops.
    pub async fn acquire(&self) -> OwnedSemaphorePermit {
        // The semaphore is never closed, so acquisition cannot fail; fall back to a fresh
        // permit of a fresh semaphore rather than panic if that ever changes.
        match self.semaphore.clone().acquire_owned().await {
            Ok(permit) => permit,
            Err(_) => unreachable_permit(),
        }
    }

    /// No permit is out.
    pub fn is_idle(&self) -> bool {
        self.semaphore.available_permits() == self.max_connections
    }

    pub fn available(&self) -> usize {
        self.semaphore.available_permits()
    }
}

fn unreachable_permit() -> OwnedSemaphorePermit {
    // A semaphore that was just created and never closed always yields a permit.
    let semaphore = Arc::new(Semaphore::new(1));
    match semaphore.try_acquire_owned() {
        Ok(permit) => permit,
        Err(_) => unreachable!("a fresh semaphore with one permit is never empty"),
    }
}

/// The rate and connection limiters of one limiter key.
#[derive(Debug, Clone)]
pub struct DestinationLimits {
    pub rate: Option<Arc<RateLimiter>>,
    pub connections: ConnectionLimiter,
}

impl DestinationLimits {
    /// Waits for a connection slot, then for a rate slot. Hold the permit for the whole
    /// SMTP transaction.
    pub async fn acquire(&self) -> OwnedSemaphorePermit {
        let permit = self.connections.acquire().await;
        if let Some(rate) = &self.rate {
            rate.acquire().await;
        }
        permit
    }
}

/// Limiters per limiter key, created on first use from the policy.
#[derive(Debug, Default)]
pub struct Limiters {
    by_key: Mutex<HashMap<String, DestinationLimits>>,
}

impl Limiters {
    pub fn new() -> Self {
        Self::default()
    }

    /// The limits for `key`, created from `policy` on first use.
    pub fn get(&self, key: &str, policy: &PolicyConfig) -> DestinationLimits {
        let mut map = match self.by_key.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(limits) = map.get(key) {
            return limits.clone();
        }
        if map.len() >= MAX_LIMITER_KEYS {
            // Drop keys nobody is using (no permit out); their rate history is lost, which is
            // acceptable for default-policy domains that went quiet.
            map.retain(|_, limits| {
                !limits.connections.is_idle()
                    || Arc::strong_count(&limits.connections.semaphore) > 1
            });
        }
        let limits = DestinationLimits {
            rate: RateLimiter::per_second(
                policy.max_messages_per_second,
                Duration::from_millis(RATE_WINDOW_MARGIN_MS),
            )
            .map(Arc::new),
            connections: ConnectionLimiter::new(policy.max_connections),
        };
        map.insert(key.to_owned(), limits.clone());
        limits
    }
}

/// Retry schedule for temporary failures (`[outbound.retry]`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Delay after the first failed attempt. Default: 300 s.
    pub first_retry_delay_secs: u64,
    /// Cap on the delay between attempts. Default: 14,400 s (4 h).
    pub retry_delay_secs_max: u64,
    /// Each further delay is the previous one times this. Default: 2.0.
    pub backoff_factor: f64,
    /// Each delay is moved by a uniform random fraction in [-j, +j]. Default: 0.2.
    pub jitter_fraction: f64,
    /// Give up (and send a DSN) this long after the message was queued. Default: 432,000 s
    /// (5 days).
    pub max_age_secs: u64,
    /// Send a delay warning DSN once a recipient is still pending this long after queueing.
    /// Default: 14,400 s (4 h); 0 disables warnings.
    pub delay_warning_secs: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            first_retry_delay_secs: 300,
            retry_delay_secs_max: 14_400,
            backoff_factor: 2.0,
            jitter_fraction: 0.2,
            max_age_secs: 432_000,
            delay_warning_secs: 14_400,
        }
    }
}

/// Upper bound on the backoff exponent, so the factor cannot overflow to infinity.
const MAX_BACKOFF_EXPONENT: u32 = 64;

impl RetryConfig {
    /// The delay (before jitter) after `attempts` failed attempts (1 = after the first).
    pub fn base_delay_ms(&self, attempts: u32) -> u64 {
        let first_ms = self.first_retry_delay_secs.saturating_mul(1000) as f64;
        let cap_ms = self.retry_delay_secs_max.saturating_mul(1000) as f64;
        let factor = if self.backoff_factor.is_finite() && self.backoff_factor >= 1.0 {
            self.backoff_factor
        } else {
            1.0
        };
        let exponent = attempts.saturating_sub(1).min(MAX_BACKOFF_EXPONENT);
        let delay = first_ms * factor.powi(exponent as i32);
        delay.min(cap_ms).max(0.0) as u64
    }

    /// When to try again after `attempts` failed attempts, as Unix milliseconds, for a
    /// message queued at `queued_at_ms`, now being `now_ms`. None once the message has
    /// reached its maximum age: the caller then gives up and sends a DSN. The last retry is
    /// moved to the expiry time rather than skipped. Pure: all randomness comes from `rng`.
    pub fn next_attempt(
        &self,
        attempts: u32,
        queued_at_ms: u64,
        now_ms: u64,
        rng: &mut impl Rng,
    ) -> Option<u64> {
        let expires_at_ms = queued_at_ms.saturating_add(self.max_age_secs.saturating_mul(1000));
        if now_ms >= expires_at_ms {
            return None;
        }
        let base = self.base_delay_ms(attempts) as f64;
        let jitter = if self.jitter_fraction.is_finite() {
            self.jitter_fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let factor = if jitter > 0.0 {
            1.0 + rng.gen_range(-jitter..=jitter)
        } else {
            1.0
        };
        let delay_ms = (base * factor).max(1000.0) as u64;
        Some(now_ms.saturating_add(delay_ms).min(expires_at_ms))
    }

    /// Whether a delay warning is due for a message queued at `queued_at_ms` whose sender
    /// has not been warned yet.
    pub fn delay_warning_due(&self, queued_at_ms: u64, now_ms: u64, already_warned: bool) -> bool {
        !already_warned
            && self.delay_warning_secs > 0
            && now_ms.saturating_sub(queued_at_ms) >= self.delay_warning_secs.saturating_mul(1000)
            && now_ms.saturating_sub(queued_at_ms) < self.max_age_secs.saturating_mul(1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    #[test]
    fn name_patterns_match_exact_and_suffix() {
        let cases = [
            ("orange.fr", "orange.fr", true),
            ("orange.fr", "ORANGE.FR.", true),
            ("orange.fr", "smtp.orange.fr", false),
            ("*.orange.fr", "smtp-in.orange.fr", true),
            ("*.orange.fr", "orange.fr", false),
            ("*.orange.fr", "notorange.fr", false),
            ("*.google.com", "aspmx.l.google.com", true),
        ];
        for (pattern, name, expected) in cases {
            assert_eq!(name_matches(pattern, name), expected, "{pattern} vs {name}");
        }
    }

    #[test]
    fn first_matching_policy_wins_and_mx_patterns_match() {
        let mut first = PolicyConfig {
            name: "first".into(),
            match_domains: vec!["*.example".into()],
            ..PolicyConfig::default()
        };
        first.max_connections = 1;
        let second = PolicyConfig {
            name: "second".into(),
            match_domains: vec!["a.example".into()],
            ..PolicyConfig::default()
        };
        let mut entries = vec![first, second];
        entries.extend(shipped_example_policies());
        let policies = Policies::new(entries, PolicyConfig::default_policy());
        assert_eq!(policies.select("a.example", &[]).0.name, "first");
        assert_eq!(policies.select("wanadoo.fr", &[]).0.name, "orange");
        let (gmail, _) = policies.select("my-company.test", &["ASPMX.L.GOOGLE.COM."]);
        assert_eq!(gmail.name, "gmail");
        assert_eq!(gmail.ip_family, IpFamily::Ipv4Only);
        let (fallback, is_default) = policies.select("other.test", &["mx.other.test"]);
        assert!(is_default);
        assert_eq!(fallback.name, "default");
        assert_eq!(policies.limiter_key("orange.fr", &[]), "policy:orange");
        assert_eq!(policies.limiter_key("wanadoo.fr", &[]), "policy:orange");
        assert_eq!(policies.limiter_key("Other.test", &[]), "domain:other.test");
    }

    #[test]
    fn shipped_examples_limit_orange_and_keep_gmail_on_ipv4() {
        let policies = Policies::new(shipped_example_policies(), PolicyConfig::default_policy());
        assert_eq!(
            policies.select("orange.fr", &[]).0.max_messages_per_second,
            Some(3.0)
        );
        assert_eq!(
            policies.select("googlemail.com", &[]).0.ip_family,
            IpFamily::Ipv4Only
        );
        assert!(!IpFamily::Ipv4Only.allows(&"::1".parse().unwrap()));
        assert!(IpFamily::Ipv6Only.allows(&"::1".parse().unwrap()));
    }

    /// Checks that no half-open window [t, t + window) holds more than `n` of `times`.
    fn max_in_any_window(times: &[Instant], window: Duration) -> usize {
        let mut sorted = times.to_vec();
        sorted.sort();
        let mut best = 0;
        for (i, start) in sorted.iter().enumerate() {
            let count = sorted[i..]
                .iter()
                .take_while(|t| **t < *start + window)
                .count();
            best = best.max(count);
        }
        best
    }

    #[tokio::test]
    async fn rate_limiter_spaces_a_burst_in_real_time() {
        // A short window keeps the test fast; sleep_until never wakes early, so the spacing
        // measured after acquire() is at least the window whatever the machine's load.
        let window = Duration::from_millis(100);
        let limiter = Arc::new(RateLimiter::new(3, window));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let limiter = limiter.clone();
            tasks.push(tokio::spawn(async move {
                limiter.acquire().await;
                Instant::now()
            }));
        }
        let mut times = Vec::new();
        for task in tasks {
            times.push(task.await.unwrap());
        }
        times.sort();
        // The i-th caller (0-based) of a burst is released no earlier than (i / 3) windows.
        for (i, time) in times.iter().enumerate() {
            assert!(
                time.duration_since(start) >= window * (i as u32 / 3),
                "caller {i}"
            );
        }
    }

    #[test]
    fn burst_gets_slots_three_per_second() {
        let limiter = RateLimiter::per_second(Some(3.0), Duration::ZERO).unwrap();
        let now = Instant::now();
        let offsets: Vec<u64> = (0..10)
            .map(|_| limiter.reserve(now).duration_since(now).as_secs())
            .collect();
        assert_eq!(offsets, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]);
    }

    #[test]
    fn fractional_rates_round_down_and_slow_rates_space_out() {
        let limiter = RateLimiter::per_second(Some(2.5), Duration::ZERO).unwrap();
        let now = Instant::now();
        let slots: Vec<_> = (0..5).map(|_| limiter.reserve(now)).collect();
        assert_eq!(max_in_any_window(&slots, Duration::from_secs(1)), 2);
        let slow = RateLimiter::per_second(Some(0.5), Duration::ZERO).unwrap();
        assert_eq!(slow.reserve(now), now);
        assert_eq!(slow.reserve(now), now + Duration::from_secs(2));
        assert!(RateLimiter::per_second(Some(0.0), Duration::ZERO).is_none());
        assert!(RateLimiter::per_second(None, Duration::ZERO).is_none());
        assert!(RateLimiter::per_second(Some(f64::NAN), Duration::ZERO).is_none());
    }

    proptest! {
        /// For any rate and any pattern of arrivals (including arrivals that come back
        /// earlier than an earlier one, as concurrent callers can), no half-open one-second
        /// window holds more than floor(rate) (at least 1) reserved slots, and no slot is
        /// before its arrival. Time is synthetic, so this is deterministic.
        #[test]
        fn no_one_second_window_exceeds_the_rate(
            rate in 0.3f64..20.0,
            gaps_ms in proptest::collection::vec(0u64..1500, 1..80),
            margin_ms in 0u64..100,
        ) {
            let limiter = RateLimiter::per_second(Some(rate), Duration::from_millis(margin_ms)).unwrap();
            let start = Instant::now();
            let mut arrival = start;
            let mut slots = Vec::new();
            for gap in gaps_ms {
                arrival += Duration::from_millis(gap);
                let slot = limiter.reserve(arrival);
                prop_assert!(slot >= arrival);
                slots.push(slot);
            }
            let allowed = (rate.floor() as usize).max(1);
            prop_assert!(max_in_any_window(&slots, Duration::from_secs(1)) <= allowed);
        }
    }

    #[tokio::test]
    async fn connection_limiter_holds_back_the_third_connection() {
        let policy = PolicyConfig {
            max_connections: 2,
            ..PolicyConfig::default()
        };
        let limiters = Limiters::new();
        let limits = limiters.get("policy:x", &policy);
        let first = limits.acquire().await;
        let _second = limiters.get("policy:x", &policy).acquire().await;
        let (sender, mut receiver) = tokio::sync::oneshot::channel();
        let third = tokio::spawn({
            let limits = limits.clone();
            async move {
                let permit = limits.acquire().await;
                let _ = sender.send(());
                permit
            }
        });
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(
            receiver.try_recv().is_err(),
            "third connection got a slot early"
        );
        drop(first);
        let permit = tokio::time::timeout(Duration::from_secs(10), third).await;
        assert!(permit.is_ok());
    }

    #[test]
    fn retry_backoff_grows_caps_and_stops_at_max_age() {
        let retry = RetryConfig {
            jitter_fraction: 0.0,
            ..RetryConfig::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let queued = 1_000_000u64;
        assert_eq!(
            retry.next_attempt(1, queued, queued, &mut rng),
            Some(queued + 300_000)
        );
        assert_eq!(
            retry.next_attempt(2, queued, queued, &mut rng),
            Some(queued + 600_000)
        );
        assert_eq!(
            retry.next_attempt(3, queued, queued, &mut rng),
            Some(queued + 1_200_000)
        );
        assert_eq!(
            retry.next_attempt(30, queued, queued, &mut rng),
            Some(queued + 14_400_000)
        );
        let expiry = queued + 432_000_000;
        assert_eq!(
            retry.next_attempt(30, queued, expiry - 1000, &mut rng),
            Some(expiry)
        );
        assert_eq!(retry.next_attempt(31, queued, expiry, &mut rng), None);
    }

    #[test]
    fn retry_jitter_stays_within_its_fraction_and_is_seeded() {
        let retry = RetryConfig::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for attempts in 1..20 {
            let base = retry.base_delay_ms(attempts);
            let next = retry.next_attempt(attempts, 0, 0, &mut rng).unwrap();
            assert!(next as f64 >= base as f64 * 0.8 - 1.0, "{next} vs {base}");
            assert!(next as f64 <= base as f64 * 1.2 + 1.0, "{next} vs {base}");
        }
        let a = retry.next_attempt(3, 0, 0, &mut rand::rngs::StdRng::seed_from_u64(9));
        let b = retry.next_attempt(3, 0, 0, &mut rand::rngs::StdRng::seed_from_u64(9));
        assert_eq!(a, b);
    }

    #[test]
    fn delay_warning_is_due_once_between_threshold_and_expiry() {
        let retry = RetryConfig::default();
        assert!(!retry.delay_warning_due(0, 14_399_999, false));
        assert!(retry.delay_warning_due(0, 14_400_000, false));
        assert!(!retry.delay_warning_due(0, 14_400_000, true));
        assert!(!retry.delay_warning_due(0, 432_000_000, false));
    }
}
