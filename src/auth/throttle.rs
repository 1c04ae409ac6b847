//! The login throttle shared by IMAP and SMTP AUTH (issue 10).
//!
//! Every password check goes through [`LoginThrottle::begin`], which may make it wait or
//! refuse it ([`Throttled`]) before any hashing:
//! - Per client address (IPv6: per /64): at most `max_concurrent_logins_per_ip` checks at
//!   once (so that 100 simultaneous guesses cannot all pass before the first failure is
//!   counted), and after `free_failures_per_ip` recent failures, attempts are spaced by an
//!   exponential delay (`ip_delay_base_ms` doubled per further failure, at most
//!   `ip_delay_max_ms`): a slot is reserved per attempt, so concurrency does not help.
//! - Per account (the login name as given, normalized): after `free_failures_per_account`
//!   recent failures each attempt waits an exponential delay capped at
//!   `account_delay_max_ms`. Capped and never a refusal: strangers can slow an account's
//!   logins down, never lock its owner out.
//! - Node-wide: at most `max_concurrent_password_checks` argon2 verifications at once (each
//!   takes about 19 MiB), the others wait.
//!
//! A wait longer than `max_wait_ms` is refused at once instead. Failures are forgotten
//! `failure_memory_secs` after the last one. Tables are bounded by [`MAX_TRACKED_KEYS`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Keys (client networks or login names) one table remembers at most.
pub const MAX_TRACKED_KEYS: usize = 65_536;
/// Longest login name used as a key.
const LOGIN_KEY_LENGTH_MAX: usize = 320;
/// The largest doubling exponent (2^20 times the base is far beyond any cap).
const DOUBLINGS_MAX: u32 = 20;

/// The `[auth]` section: login throttling for IMAP and SMTP AUTH.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ThrottleConfig {
    /// Recent failures from one client address (IPv6: one /64) before its attempts are spaced
    /// out. Default 3.
    pub free_failures_per_ip: u32,
    /// Spacing of attempts from a client address after its free failures; doubles with each
    /// further failure. Default 1000.
    pub ip_delay_base_ms: u64,
    /// Largest spacing per client address. Default 60000.
    pub ip_delay_max_ms: u64,
    /// Password checks running at once for one client address; more wait. Default 4.
    pub max_concurrent_logins_per_ip: usize,
    /// Recent failures for one login name before its attempts are delayed. Default 5.
    pub free_failures_per_account: u32,
    /// Delay of attempts for a login name after its free failures; doubles with each further
    /// failure. Default 250.
    pub account_delay_base_ms: u64,
    /// Largest delay per login name (so that nobody can lock an account out: its owner gets
    /// in after at most this, from an address without failures). Default 5000.
    pub account_delay_max_ms: u64,
    /// Failures are forgotten this long after the last one. Default 900.
    pub failure_memory_secs: u64,
    /// Password hashes (argon2id, about 19 MiB each) verified at once on this node; more
    /// wait. Default 4.
    pub max_concurrent_password_checks: usize,
    /// A login that would wait longer than this is refused at once (IMAP `NO
    /// [UNAVAILABLE]`, SMTP `454 4.7.0`). Default 30000.
    pub max_wait_ms: u64,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            free_failures_per_ip: 3,
            ip_delay_base_ms: 1000,
            ip_delay_max_ms: 60_000,
            max_concurrent_logins_per_ip: 4,
            free_failures_per_account: 5,
            account_delay_base_ms: 250,
            account_delay_max_ms: 5000,
            failure_memory_secs: 900,
            max_concurrent_password_checks: 4,
            max_wait_ms: 30_000,
        }
    }
}

/// A login refused before its password was checked: too many recent failures, retry later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many failed logins, try again later")]
pub struct Throttled;

#[derive(Debug, Default)]
struct Failures {
    count: u32,
    last_ms: u64,
}

impl Failures {
    fn current(&mut self, now_ms: u64, memory_ms: u64) -> u32 {
        if self.count > 0 && now_ms.saturating_sub(self.last_ms) >= memory_ms {
            self.count = 0;
        }
        self.count
    }
}

#[derive(Debug)]
struct ClientState {
    failures: Failures,
    /// The earliest time the next attempt may start (ms since the throttle's epoch).
    next_slot_ms: u64,
    in_flight: Arc<Semaphore>,
}

/// The node-wide throttle. Share it behind an `Arc`.
#[derive(Debug)]
pub struct LoginThrottle {
    config: ThrottleConfig,
    epoch: Instant,
    clients: Mutex<HashMap<IpAddr, ClientState>>,
    accounts: Mutex<HashMap<String, Failures>>,
    password_checks: Arc<Semaphore>,
    /// The most password checks seen running at once (logged when it grows).
    checks_peak: std::sync::atomic::AtomicUsize,
}

/// One admitted login: holds its places until [`LoginAttempt::finish`] (or drop, which
/// counts nothing).
#[derive(Debug)]
pub struct LoginAttempt {
    throttle: Arc<LoginThrottle>,
    client: IpAddr,
    login: String,
    _client_permit: OwnedSemaphorePermit,
    _check_permit: OwnedSemaphorePermit,
}

impl LoginAttempt {
    /// Records the outcome: a failure counts against the client address and the login name.
    pub fn finish(self, succeeded: bool) {
        if !succeeded {
            self.throttle.record_failure(self.client, &self.login);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// IPv4 addresses count alone; IPv6 ones by /64, the block one subscriber usually holds.
pub fn client_key(client: IpAddr) -> IpAddr {
    match client.to_canonical() {
        IpAddr::V6(ip) => IpAddr::V6((u128::from(ip) & !((1u128 << 64) - 1)).into()),
        ip => ip,
    }
}

/// Login names as the store normalizes addresses (trimmed, lowercase, domain without
/// trailing dots), so that every spelling of one account counts against it.
fn login_key(login: &str) -> String {
    let login: String = login
        .trim()
        .chars()
        .take(LOGIN_KEY_LENGTH_MAX)
        .collect::<String>()
        .to_ascii_lowercase();
    match login.rsplit_once('@') {
        Some((local, domain)) => format!("{local}@{}", domain.trim().trim_end_matches('.')),
        None => login,
    }
}

/// `base * 2^(failures - free)`, at most `max`; zero while `failures < free`.
fn backoff_ms(failures: u32, free: u32, base_ms: u64, max_ms: u64) -> u64 {
    if failures < free {
        return 0;
    }
    let doublings = (failures - free).min(DOUBLINGS_MAX);
    base_ms.saturating_mul(1u64 << doublings).min(max_ms)
}

impl LoginThrottle {
    pub fn new(config: ThrottleConfig) -> LoginThrottle {
        let checks = config.max_concurrent_password_checks.max(1);
        LoginThrottle {
            config,
            epoch: Instant::now(),
            clients: Mutex::new(HashMap::new()),
            accounts: Mutex::new(HashMap::new()),
            password_checks: Arc::new(Semaphore::new(checks)),
            checks_peak: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    pub fn config(&self) -> &ThrottleConfig {
        &self.config
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Admits one login from `client` for `login`, after the waits it owes; refuses it when
    /// they would exceed `max_wait_ms`.
    pub async fn begin(
        self: &Arc<Self>,
        client: IpAddr,
        login: &str,
    ) -> Result<LoginAttempt, Throttled> {
        let max_wait = Duration::from_millis(self.config.max_wait_ms);
        let deadline = tokio::time::Instant::now() + max_wait;
        let key = client_key(client);
        let in_flight = {
            let mut clients = lock(&self.clients);
            self.make_room(&mut clients);
            clients
                .entry(key)
                .or_insert_with(|| ClientState {
                    failures: Failures::default(),
                    next_slot_ms: 0,
                    in_flight: Arc::new(Semaphore::new(
                        self.config.max_concurrent_logins_per_ip.max(1),
                    )),
                })
                .in_flight
                .clone()
        };
        let client_permit = tokio::time::timeout_at(deadline, in_flight.acquire_owned())
            .await
            .map_err(|_| Throttled)?
            .map_err(|_| Throttled)?;
        let memory_ms = self.config.failure_memory_secs.saturating_mul(1000);
        let now_ms = self.now_ms();
        let client_wait_ms = {
            let mut clients = lock(&self.clients);
            let Some(state) = clients.get_mut(&key) else {
                return Err(Throttled);
            };
            let failures = state.failures.current(now_ms, memory_ms);
            let spacing = backoff_ms(
                failures,
                self.config.free_failures_per_ip,
                self.config.ip_delay_base_ms,
                self.config.ip_delay_max_ms,
            );
            let start_ms = state.next_slot_ms.max(now_ms);
            let wait_ms = start_ms - now_ms;
            if wait_ms > self.config.max_wait_ms {
                return Err(Throttled);
            }
            state.next_slot_ms = start_ms.saturating_add(spacing);
            wait_ms
        };
        let login = login_key(login);
        let account_wait_ms = {
            let mut accounts = lock(&self.accounts);
            let failures = accounts
                .get_mut(&login)
                .map_or(0, |failures| failures.current(now_ms, memory_ms));
            backoff_ms(
                failures,
                self.config.free_failures_per_account,
                self.config.account_delay_base_ms,
                self.config.account_delay_max_ms,
            )
        };
        let wait = Duration::from_millis(client_wait_ms.max(account_wait_ms));
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let check_permit = tokio::time::timeout_at(
            deadline.max(tokio::time::Instant::now() + max_wait),
            self.password_checks.clone().acquire_owned(),
        )
        .await
        .map_err(|_| Throttled)?
        .map_err(|_| Throttled)?;
        let limit = self.config.max_concurrent_password_checks.max(1);
        let running = limit - self.password_checks.available_permits();
        let previous = self
            .checks_peak
            .fetch_max(running, std::sync::atomic::Ordering::Relaxed);
        if running > previous {
            tracing::info!(
                password_checks_peak = running,
                limit,
                "login throttle: most password checks at once so far"
            );
        }
        Ok(LoginAttempt {
            throttle: self.clone(),
            client: key,
            login,
            _client_permit: client_permit,
            _check_permit: check_permit,
        })
    }

    fn record_failure(&self, client: IpAddr, login: &str) {
        let now_ms = self.now_ms();
        let memory_ms = self.config.failure_memory_secs.saturating_mul(1000);
        if let Some(state) = lock(&self.clients).get_mut(&client) {
            state.failures.current(now_ms, memory_ms);
            state.failures.count = state.failures.count.saturating_add(1);
            state.failures.last_ms = now_ms;
        }
        let mut accounts = lock(&self.accounts);
        if !accounts.contains_key(login) && accounts.len() >= MAX_TRACKED_KEYS {
            accounts.retain(|_, failures| failures.current(now_ms, memory_ms) > 0);
            if accounts.len() >= MAX_TRACKED_KEYS {
                let stalest = accounts
                    .iter()
                    .min_by_key(|(_, failures)| failures.last_ms)
                    .map(|(key, _)| key.clone());
                if let Some(stalest) = stalest {
                    accounts.remove(&stalest);
                }
            }
        }
        let failures = accounts.entry(login.to_owned()).or_default();
        failures.current(now_ms, memory_ms);
        failures.count = failures.count.saturating_add(1);
        failures.last_ms = now_ms;
    }

    /// Keeps the client table under [`MAX_TRACKED_KEYS`]: forgets idle clients without
    /// failures first, then the stalest.
    fn make_room(&self, clients: &mut HashMap<IpAddr, ClientState>) {
        if clients.len() < MAX_TRACKED_KEYS {
            return;
        }
        let now_ms = self.now_ms();
        let memory_ms = self.config.failure_memory_secs.saturating_mul(1000);
        clients.retain(|_, state| {
            let busy = state.in_flight.available_permits()
                < self.config.max_concurrent_logins_per_ip.max(1);
            busy || state.failures.current(now_ms, memory_ms) > 0 || state.next_slot_ms > now_ms
        });
        if clients.len() >= MAX_TRACKED_KEYS {
            let stalest = clients
                .iter()
                .min_by_key(|(_, state)| state.failures.last_ms)
                .map(|(key, _)| *key);
            if let Some(stalest) = stalest {
                clients.remove(&stalest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast() -> ThrottleConfig {
        ThrottleConfig {
            ip_delay_base_ms: 50,
            ip_delay_max_ms: 200,
            account_delay_base_ms: 20,
            account_delay_max_ms: 80,
            max_wait_ms: 5_000,
            ..ThrottleConfig::default()
        }
    }

    #[test]
    fn backoff_doubles_after_the_free_failures_and_is_capped() {
        assert_eq!(backoff_ms(2, 3, 1000, 60_000), 0);
        assert_eq!(backoff_ms(3, 3, 1000, 60_000), 1000);
        assert_eq!(backoff_ms(5, 3, 1000, 60_000), 4000);
        assert_eq!(backoff_ms(500, 3, 1000, 60_000), 60_000);
    }

    #[test]
    fn ipv6_clients_count_per_slash_64_and_logins_per_account() {
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let two: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(client_key(one), client_key(two));
        assert_eq!(login_key(" Alice@Example.org. "), "alice@example.org");
    }

    #[tokio::test]
    async fn failures_space_out_a_clients_attempts_but_not_another_clients() {
        let throttle = Arc::new(LoginThrottle::new(fast()));
        let attacker = IpAddr::from([192, 0, 2, 1]);
        for index in 0..6 {
            let attempt = throttle
                .begin(attacker, &format!("u{index}@x"))
                .await
                .unwrap();
            attempt.finish(false);
        }
        // 6 failures: the next attempts from the attacker are spaced (50 << 3, capped at 200 ms).
        let started = tokio::time::Instant::now();
        throttle.begin(attacker, "v@x").await.unwrap().finish(false);
        throttle.begin(attacker, "w@x").await.unwrap().finish(false);
        assert!(started.elapsed() >= Duration::from_millis(200));
        // Another client is not slowed down.
        let started = tokio::time::Instant::now();
        let other = IpAddr::from([198, 51, 100, 7]);
        throttle.begin(other, "v@x").await.unwrap().finish(true);
        assert!(started.elapsed() < Duration::from_millis(150));
    }

    #[tokio::test]
    async fn an_attacked_account_is_delayed_by_at_most_the_cap_for_its_owner() {
        let throttle = Arc::new(LoginThrottle::new(fast()));
        for index in 0..200u8 {
            let attacker = IpAddr::from([203, 0, 113, index]);
            throttle
                .begin(attacker, "alice@example.org")
                .await
                .unwrap()
                .finish(false);
        }
        let owner = IpAddr::from([198, 51, 100, 1]);
        let started = tokio::time::Instant::now();
        let attempt = throttle.begin(owner, "Alice@example.org").await.unwrap();
        attempt.finish(true);
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    #[tokio::test]
    async fn concurrent_checks_never_exceed_the_limits() {
        let throttle = Arc::new(LoginThrottle::new(ThrottleConfig {
            max_concurrent_password_checks: 2,
            ..fast()
        }));
        let mut held = Vec::new();
        for index in 0..2u8 {
            held.push(
                throttle
                    .begin(IpAddr::from([10, 0, 0, index]), "a@x")
                    .await
                    .unwrap(),
            );
        }
        let third = tokio::time::timeout(
            Duration::from_millis(100),
            throttle.begin(IpAddr::from([10, 0, 0, 9]), "a@x"),
        )
        .await;
        assert!(third.is_err(), "a third check ran beside two");
        drop(held);
        assert!(throttle
            .begin(IpAddr::from([10, 0, 0, 9]), "a@x")
            .await
            .is_ok());
    }
}
