//! Rate limits shared by every session of the node's SMTP listeners: failed logins per
//! client address and per account, and messages submitted per account.
//!
//! Sans-IO like the session: the time is passed in. Each limit is a sliding window of event
//! times per key; a table holds at most [`MAX_TRACKED_KEYS`] keys (expired ones are pruned
//! first, then the least recently active is forgotten), and each key at most its limit of
//! events, so memory is bounded whatever clients do.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::SmtpConfig;
use crate::store::AccountId;

/// Keys one table remembers at most (client addresses, login names or accounts).
pub const MAX_TRACKED_KEYS: usize = 65_536;

/// The window of the sending limit.
const SEND_WINDOW: Duration = Duration::from_secs(60);

/// Why an AUTH is refused before its password is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthBlock {
    /// Too many recent failures from this client address.
    ClientAddress,
}

impl AuthBlock {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthBlock::ClientAddress => "client address",
        }
    }
}

/// The node-wide limiter. Cheap to share behind an `Arc`.
#[derive(Debug, Default)]
pub struct Limiter {
    failures_by_client: Mutex<Window<IpAddr>>,
    sent_by_account: Mutex<Window<AccountId>>,
    srs_failures_by_client: Mutex<Window<IpAddr>>,
    srs_bounces_by_client: Mutex<Window<IpAddr>>,
}

impl Limiter {
    pub fn new() -> Limiter {
        Limiter::default()
    }

    /// Whether an AUTH from `client` for `login` must be refused without checking it.
    pub fn auth_blocked(
        &self,
        client: IpAddr,
        login: &str,
        config: &SmtpConfig,
        now: SystemTime,
    ) -> Option<AuthBlock> {
        let window = Duration::from_secs(config.auth_failure_window_secs);
        let n_client = lock(&self.failures_by_client).count(&client_key(client), now, window);
        if n_client >= config.max_auth_failures_per_ip as usize {
            return Some(AuthBlock::ClientAddress);
        }
        // No refusal per account: strangers could lock its owner out. Accounts get capped
        // delays from the shared login throttle instead (`crate::auth::throttle`).
        let _ = login;
        None
    }

    /// Records a failed AUTH from `client` for `login`.
    pub fn auth_failed(&self, client: IpAddr, login: &str, config: &SmtpConfig, now: SystemTime) {
        let window = Duration::from_secs(config.auth_failure_window_secs);
        lock(&self.failures_by_client).record(
            client_key(client),
            now,
            window,
            config.max_auth_failures_per_ip as usize,
        );
        let _ = login;
    }

    /// Whether SRS recipients from `client` are refused for now: too many wrong SRS
    /// addresses (guessing hashes), or too many bounces through SRS addresses.
    pub fn srs_blocked(&self, client: IpAddr, config: &SmtpConfig, now: SystemTime) -> bool {
        let window = Duration::from_secs(config.srs_window_secs);
        let key = client_key(client);
        lock(&self.srs_failures_by_client).count(&key, now, window)
            >= config.max_srs_failures_per_ip as usize
            || lock(&self.srs_bounces_by_client).count(&key, now, window)
                >= config.max_srs_bounces_per_ip as usize
    }

    /// Records an SRS-shaped recipient from `client` that is not one of ours.
    pub fn srs_failed(&self, client: IpAddr, config: &SmtpConfig, now: SystemTime) {
        let window = Duration::from_secs(config.srs_window_secs);
        lock(&self.srs_failures_by_client).record(
            client_key(client),
            now,
            window,
            config.max_srs_failures_per_ip as usize,
        );
    }

    /// Records a bounce from `client` to one of our SRS addresses.
    pub fn srs_bounce(&self, client: IpAddr, config: &SmtpConfig, now: SystemTime) {
        let window = Duration::from_secs(config.srs_window_secs);
        lock(&self.srs_bounces_by_client).record(
            client_key(client),
            now,
            window,
            config.max_srs_bounces_per_ip as usize,
        );
    }

    /// Whether `account` may start another message now.
    pub fn may_send(&self, account: AccountId, config: &SmtpConfig, now: SystemTime) -> bool {
        let n_sent = lock(&self.sent_by_account).count(&account, now, SEND_WINDOW);
        n_sent < config.max_messages_per_account_per_minute as usize
    }

    /// Records a message submitted by `account`.
    pub fn sent(&self, account: AccountId, config: &SmtpConfig, now: SystemTime) {
        lock(&self.sent_by_account).record(
            account,
            now,
            SEND_WINDOW,
            config.max_messages_per_account_per_minute as usize,
        );
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub use crate::auth::throttle::client_key;

/// Event times (milliseconds since the epoch) per key, oldest first.
#[derive(Debug)]
struct Window<K> {
    events: HashMap<K, VecDeque<u64>>,
}

impl<K> Default for Window<K> {
    fn default() -> Self {
        Window {
            events: HashMap::new(),
        }
    }
}

fn millis(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn window_millis(window: Duration) -> u64 {
    u64::try_from(window.as_millis()).unwrap_or(u64::MAX)
}

impl<K: Hash + Eq + Clone> Window<K> {
    /// Events of `key` within `window` before `now`.
    fn count(&mut self, key: &K, now: SystemTime, window: Duration) -> usize {
        let (now, window) = (millis(now), window_millis(window));
        let Some(times) = self.events.get_mut(key) else {
            return 0;
        };
        prune(times, now, window);
        let n_events = times.len();
        if n_events == 0 {
            self.events.remove(key);
        }
        n_events
    }

    /// Adds an event; keeps at most `keep` events for the key (older ones cannot matter).
    fn record(&mut self, key: K, now: SystemTime, window: Duration, keep: usize) {
        let (now, window) = (millis(now), window_millis(window));
        if !self.events.contains_key(&key) && self.events.len() >= MAX_TRACKED_KEYS {
            self.events.retain(|_, times| {
                prune(times, now, window);
                !times.is_empty()
            });
            if self.events.len() >= MAX_TRACKED_KEYS {
                let stalest = self
                    .events
                    .iter()
                    .min_by_key(|(_, times)| times.back().copied().unwrap_or(0))
                    .map(|(key, _)| key.clone());
                if let Some(stalest) = stalest {
                    self.events.remove(&stalest);
                }
            }
        }
        let times = self.events.entry(key).or_default();
        prune(times, now, window);
        times.push_back(now);
        while times.len() > keep.max(1) {
            times.pop_front();
        }
    }
}

fn prune(times: &mut VecDeque<u64>, now: u64, window: u64) {
    while times
        .front()
        .is_some_and(|&time| time.saturating_add(window) <= now)
    {
        times.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    #[test]
    fn failures_block_the_client_address_then_expire_after_the_window() {
        let config = SmtpConfig::default();
        let limiter = Limiter::new();
        let client = IpAddr::from([192, 0, 2, 1]);
        for index in 0..5 {
            assert_eq!(
                limiter.auth_blocked(client, &format!("u{index}@x"), &config, at(index)),
                None
            );
            limiter.auth_failed(client, &format!("u{index}@x"), &config, at(index));
        }
        assert_eq!(
            limiter.auth_blocked(client, "other@x", &config, at(10)),
            Some(AuthBlock::ClientAddress)
        );
        let elsewhere = IpAddr::from([192, 0, 2, 2]);
        assert_eq!(
            limiter.auth_blocked(elsewhere, "u0@x", &config, at(10)),
            None
        );
        // The first failure was at 0: at 300 it has left the 300-second window.
        assert_eq!(
            limiter.auth_blocked(client, "other@x", &config, at(300)),
            None
        );
    }

    #[test]
    fn ipv6_clients_count_per_slash_64() {
        let config = SmtpConfig {
            max_auth_failures_per_ip: 2,
            ..SmtpConfig::default()
        };
        let limiter = Limiter::new();
        let first: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let second: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other_net: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        limiter.auth_failed(first, "a@x", &config, at(0));
        limiter.auth_failed(second, "b@x", &config, at(0));
        assert_eq!(
            limiter.auth_blocked(first, "c@x", &config, at(1)),
            Some(AuthBlock::ClientAddress)
        );
        assert_eq!(limiter.auth_blocked(other_net, "c@x", &config, at(1)), None);
    }

    #[test]
    fn sending_is_limited_per_account_per_minute() {
        let config = SmtpConfig {
            max_messages_per_account_per_minute: 3,
            ..SmtpConfig::default()
        };
        let limiter = Limiter::new();
        for second in 0..3 {
            assert!(limiter.may_send(1, &config, at(second)));
            limiter.sent(1, &config, at(second));
        }
        assert!(!limiter.may_send(1, &config, at(59)));
        assert!(limiter.may_send(2, &config, at(59)));
        assert!(limiter.may_send(1, &config, at(60)));
    }

    #[test]
    fn tables_stay_bounded() {
        let config = SmtpConfig::default();
        let limiter = Limiter::new();
        for index in 0..(MAX_TRACKED_KEYS as u32 + 100) {
            limiter.auth_failed(IpAddr::from(index.to_be_bytes()), "a@x", &config, at(1));
        }
        assert!(lock(&limiter.failures_by_client).events.len() <= MAX_TRACKED_KEYS);
    }
}
