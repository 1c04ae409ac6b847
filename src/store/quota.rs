//! Quotas (issue 10): per-account limits on stored bytes and on messages, and their part of
//! `apply`.
//!
//! Usage is the sum, over every message entry of the account (all mailboxes), of the raw
//! message size (RFC822.SIZE), and the count of those entries. A copy of a message counts again
//! (RFC 9208's STORAGE is the size of the mailboxes' messages), even though its body is stored
//! once: the limit bounds what the account makes every replica hold in memory, and what a
//! client sees, not only the disk.
//!
//! Every check is made in apply, on the state the command meets there: a command that would
//! bring an account over one of its limits is refused whole (`ApplyError::OverQuota`) by every
//! replica alike, and the state is unchanged. So a replay of the log cannot grow an account
//! past its quota either. Commands that remove messages (EXPUNGE, DELETE, account removal) are
//! never refused, and MOVE inside an account changes nothing, so an account over its quota
//! (after its limit was lowered) can always clean up.
//!
//! The limits: the cluster's default (`Quotas::default`, replicated, set from `[store]
//! default_quota_bytes` / `default_quota_messages` by `SetDefaultQuota`) and each account's
//! own settings (`kermail user quota`), which name a limit, unlimited, or the default. Usage is
//! derived from the messages: not serialized, rebuilt at restore ([`State::rebuild_usage`]) and
//! kept up to date by apply.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::command::{ApplyError, CommandV3, Response};
use super::names::normalize_address;
use super::state::{Effects, Outcome, State};
use super::AccountId;

/// Default storage limit of an account: 2 GiB. A generous mailbox for a small provider's user
/// (years of ordinary mail), small enough that a runaway client (an APPEND loop, `COPY 1:*`
/// repeated) is stopped long before a node's disk or memory is.
pub const DEFAULT_QUOTA_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// Default message limit of an account: 200,000 entries. Each entry costs about 100 bytes of
/// memory on every replica (the mail state is in memory), so this bounds one account's share
/// to about 20 MB whatever the sizes of its messages, while staying far above real mailboxes
/// (Dovecot's users with 100,000 messages are rare).
pub const DEFAULT_QUOTA_MESSAGES: u64 = 200_000;

/// `[store]`: the default quota of every account without limits of its own. The value is
/// replicated: once per start, as soon as the state holds a domain, a node proposes its
/// configured one if the cluster's differs (`keep_default_quota`), so give every node the same.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Bytes of messages per account (each copy counts); 0 is unlimited.
    pub default_quota_bytes: u64,
    /// Messages per account; 0 is unlimited.
    pub default_quota_messages: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            default_quota_bytes: DEFAULT_QUOTA_BYTES,
            default_quota_messages: DEFAULT_QUOTA_MESSAGES,
        }
    }
}

impl StoreConfig {
    pub fn default_quota(&self) -> QuotaLimits {
        QuotaLimits::from_config(self.default_quota_bytes, self.default_quota_messages)
    }
}

/// Resolved limits; `None` is unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaLimits {
    pub storage_bytes: Option<u64>,
    pub messages: Option<u64>,
}

impl Default for QuotaLimits {
    fn default() -> Self {
        QuotaLimits {
            storage_bytes: Some(DEFAULT_QUOTA_BYTES),
            messages: Some(DEFAULT_QUOTA_MESSAGES),
        }
    }
}

impl QuotaLimits {
    /// From configuration values, where 0 means unlimited.
    pub fn from_config(storage_bytes: u64, messages: u64) -> QuotaLimits {
        QuotaLimits {
            storage_bytes: (storage_bytes != 0).then_some(storage_bytes),
            messages: (messages != 0).then_some(messages),
        }
    }
}

/// One limit of one account, as the administrator set it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum QuotaSetting {
    /// The cluster's default limit (the value of every account until it is set).
    #[default]
    Default,
    Unlimited,
    Limit(u64),
}

impl QuotaSetting {
    fn resolve(self, default: Option<u64>) -> Option<u64> {
        match self {
            QuotaSetting::Default => default,
            QuotaSetting::Unlimited => None,
            QuotaSetting::Limit(limit) => Some(limit),
        }
    }

    /// Parses `2G`, `500M`, `100K`, `1024` (bytes, binary units) or, for counts, `N`;
    /// `0`, `none` and `unlimited` are unlimited, `default` the cluster's default.
    pub fn parse(text: &str, with_units: bool) -> Result<QuotaSetting, String> {
        let text = text.trim();
        let lower = text.to_ascii_lowercase();
        match lower.as_str() {
            "none" | "unlimited" => return Ok(QuotaSetting::Unlimited),
            "default" => return Ok(QuotaSetting::Default),
            _ => {}
        }
        let (digits, multiplier) = match lower.as_bytes().last() {
            Some(b'k') if with_units => (&lower[..lower.len() - 1], 1u64 << 10),
            Some(b'm') if with_units => (&lower[..lower.len() - 1], 1 << 20),
            Some(b'g') if with_units => (&lower[..lower.len() - 1], 1 << 30),
            Some(b't') if with_units => (&lower[..lower.len() - 1], 1 << 40),
            _ => (lower.as_str(), 1),
        };
        let value = digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(multiplier))
            .ok_or_else(|| {
                if with_units {
                    format!("invalid size {text:?}: use a number of bytes with an optional K, M, G or T suffix, 0, none or default")
                } else {
                    format!("invalid count {text:?}: use a number, 0, none or default")
                }
            })?;
        Ok(if value == 0 {
            QuotaSetting::Unlimited
        } else {
            QuotaSetting::Limit(value)
        })
    }
}

/// An account's own settings (an account without any follows the default in both).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountQuota {
    pub storage: QuotaSetting,
    pub messages: QuotaSetting,
}

/// What an account holds: raw bytes and message entries over all its mailboxes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub messages: u64,
}

impl Usage {
    pub fn of_messages<'a>(sizes: impl IntoIterator<Item = &'a super::MessageMeta>) -> Usage {
        let mut usage = Usage::default();
        for message in sizes {
            usage.bytes += u64::from(message.size);
            usage.messages += 1;
        }
        usage
    }

    pub fn one(size: u32) -> Usage {
        Usage {
            bytes: u64::from(size),
            messages: 1,
        }
    }
}

/// The replicated quota state. Carried by the snapshot as a field of its own
/// (`SnapshotMeta::V3`), so that older snapshots still load (with the built-in default).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quotas {
    pub default: QuotaLimits,
    /// Accounts with settings of their own.
    pub accounts: BTreeMap<AccountId, AccountQuota>,
    /// Derived from the messages (rebuilt at restore, kept by apply).
    #[serde(skip)]
    pub usage: BTreeMap<AccountId, Usage>,
}

/// An account's quota as the admin command and IMAP show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaReport {
    pub usage: Usage,
    pub limits: QuotaLimits,
    pub settings: AccountQuota,
}

impl State {
    /// The limits that apply to `account` now.
    pub fn quota_limits(&self, account: AccountId) -> QuotaLimits {
        let settings = self
            .quotas
            .accounts
            .get(&account)
            .copied()
            .unwrap_or_default();
        QuotaLimits {
            storage_bytes: settings.storage.resolve(self.quotas.default.storage_bytes),
            messages: settings.messages.resolve(self.quotas.default.messages),
        }
    }

    pub fn quota_usage(&self, account: AccountId) -> Usage {
        self.quotas.usage.get(&account).copied().unwrap_or_default()
    }

    pub fn quota_report(&self, account: AccountId) -> QuotaReport {
        QuotaReport {
            usage: self.quota_usage(account),
            limits: self.quota_limits(account),
            settings: self
                .quotas
                .accounts
                .get(&account)
                .copied()
                .unwrap_or_default(),
        }
    }

    /// Refuses `added` on top of `account`'s usage when it would pass one of its limits.
    pub fn check_quota(&self, account: AccountId, added: Usage) -> Result<(), ApplyError> {
        if added == Usage::default() {
            return Ok(());
        }
        let usage = self.quota_usage(account);
        let limits = self.quota_limits(account);
        if let Some(limit) = limits.storage_bytes {
            if added.bytes > 0 && usage.bytes.saturating_add(added.bytes) > limit {
                return Err(ApplyError::OverQuota(format!(
                    "storage quota exceeded ({} of {limit} bytes used, {} more asked)",
                    usage.bytes, added.bytes
                )));
            }
        }
        if let Some(limit) = limits.messages {
            if added.messages > 0 && usage.messages.saturating_add(added.messages) > limit {
                return Err(ApplyError::OverQuota(format!(
                    "message quota exceeded ({} of {limit} messages, {} more asked)",
                    usage.messages, added.messages
                )));
            }
        }
        Ok(())
    }

    pub(super) fn charge_usage(&mut self, account: AccountId, added: Usage) {
        let usage = self.quotas.usage.entry(account).or_default();
        usage.bytes += added.bytes;
        usage.messages += added.messages;
    }

    pub(super) fn credit_usage(&mut self, account: AccountId, removed: Usage) {
        if let Some(usage) = self.quotas.usage.get_mut(&account) {
            usage.bytes = usage.bytes.saturating_sub(removed.bytes);
            usage.messages = usage.messages.saturating_sub(removed.messages);
            if *usage == Usage::default() {
                self.quotas.usage.remove(&account);
            }
        }
    }

    /// Forgets a removed account's settings and usage.
    pub(super) fn forget_quota(&mut self, account: AccountId) {
        self.quotas.accounts.remove(&account);
        self.quotas.usage.remove(&account);
    }

    /// Recomputes every account's usage from its messages (at restore).
    pub fn rebuild_usage(&mut self) {
        let mut usage = BTreeMap::new();
        for (&id, account) in &self.accounts {
            let total = Usage::of_messages(
                account
                    .mailboxes
                    .values()
                    .flat_map(|mailbox| mailbox.messages.iter()),
            );
            if total != Usage::default() {
                usage.insert(id, total);
            }
        }
        self.quotas.usage = usage;
        self.quotas
            .accounts
            .retain(|id, _| self.accounts.contains_key(id));
    }

    /// Whether the kept usage is the one the messages give (tests; restore rebuilds it).
    #[cfg(test)]
    pub fn check_quota_usage(&self) -> Result<(), String> {
        let mut rebuilt = self.clone();
        rebuilt.rebuild_usage();
        if rebuilt.quotas.usage != self.quotas.usage {
            return Err(format!(
                "quota usage {:?} differs from the messages' {:?}",
                self.quotas.usage, rebuilt.quotas.usage
            ));
        }
        Ok(())
    }

    /// Applies one quota command. Pure; a refusal changes nothing.
    pub fn apply_v3(&mut self, command: CommandV3) -> Outcome {
        let result = match command {
            CommandV3::SetDefaultQuota { limits } => {
                self.quotas.default = limits;
                Ok(Response::Done)
            }
            CommandV3::SetAccountQuota {
                address,
                storage,
                messages,
            } => self.set_account_quota(&address, storage, messages),
        };
        Outcome {
            response: result.unwrap_or_else(Response::Refused),
            effects: Effects::default(),
        }
    }

    fn set_account_quota(
        &mut self,
        address: &str,
        storage: Option<QuotaSetting>,
        messages: Option<QuotaSetting>,
    ) -> Result<Response, ApplyError> {
        let address = normalize_address(address)?;
        let id = self.account_id_of(&address)?;
        let settings = self.quotas.accounts.entry(id).or_default();
        if let Some(storage) = storage {
            settings.storage = storage;
        }
        if let Some(messages) = messages {
            settings.messages = messages;
        }
        if *settings == AccountQuota::default() {
            self.quotas.accounts.remove(&id);
        }
        Ok(Response::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        let cases = [
            ("2G", QuotaSetting::Limit(2 << 30)),
            ("500M", QuotaSetting::Limit(500 << 20)),
            ("100k", QuotaSetting::Limit(100 << 10)),
            ("1024", QuotaSetting::Limit(1024)),
            ("0", QuotaSetting::Unlimited),
            ("none", QuotaSetting::Unlimited),
            ("default", QuotaSetting::Default),
        ];
        for (text, expected) in cases {
            assert_eq!(QuotaSetting::parse(text, true), Ok(expected), "{text}");
        }
        for bad in ["", "G", "-1", "2X", "99999999999999999999G", "1.5G"] {
            assert!(QuotaSetting::parse(bad, true).is_err(), "{bad}");
        }
        assert_eq!(
            QuotaSetting::parse("1000", false),
            Ok(QuotaSetting::Limit(1000))
        );
        assert!(QuotaSetting::parse("10K", false).is_err());
    }
}
