//! [`MailStore`] methods for outbound mail: accepting a message for local and remote
//! recipients in one command (with DKIM signing for authenticated senders and SRS for
//! forwarded mail), the queue operations the delivery worker and the admin commands use, and
//! the DKIM keys.

use std::collections::BTreeSet;

use super::command::{CommandV2, SrsKey};
use super::names;
use super::queue::{NewQueueEntry, Notice, QueueEntry, QueueId, RecipientResult};
use super::{
    now_secs, prepare_body, unexpected, AccountId, Delivery, DeliveryReceipt, MailStore, Response,
    StoreError,
};
use crate::outbound::dkim::{DkimAlgorithm, DkimKeyRecord};

/// What an accepted message became.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptReceipt {
    pub receipt: DeliveryReceipt,
    /// The queue entry for the remote recipients, if there were any.
    pub queued: Option<QueueId>,
    /// Remote recipients in that entry.
    pub n_remote: usize,
    /// Whether the message was DKIM-signed before being committed.
    pub dkim_signed: bool,
}

/// SRS (Sender Rewriting Scheme) timestamp: days, modulo 1024, in two base32 characters.
const SRS_TIMESTAMP_MODULUS_DAYS: i64 = 1024;
const SRS_BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
/// Characters of the SRS hash kept in the address: 8 base32 characters, 40 bits. With the
/// per-address limit on wrong SRS recipients (`[smtp] max_srs_failures_per_ip`), guessing one
/// takes about 2^39 tries, not the 2^19 a 4-character hash allowed.
pub const SRS_HASH_CHARS: usize = 8;
/// A bounce to an SRS address older than this (days) is refused (the usual convention, as in
/// libsrs2: 21 days).
pub const SRS_MAX_AGE_DAYS: usize = 21;
/// Domain separation of the SRS hash (a new scheme gets a new tag).
const SRS_HASH_CONTEXT: &[u8] = b"kermail srs v2";

fn srs_timestamp(days: usize) -> String {
    [days >> 5, days & 31]
        .iter()
        .map(|&v| SRS_BASE32[v & 31] as char)
        .collect()
}

/// The hash of (timestamp, domain, local) under `key`: each field length-prefixed, so that
/// moving a character from one field to the next changes the hash.
fn srs_hash(key: &SrsKey, timestamp: &str, domain: &str, local: &str) -> [u8; SRS_HASH_CHARS] {
    let mut hasher = blake3::Hasher::new_keyed(&key.0);
    hasher.update(SRS_HASH_CONTEXT);
    let domain = domain.to_ascii_lowercase();
    for field in [timestamp, domain.as_str(), local] {
        hasher.update(&(field.len() as u64).to_le_bytes());
        hasher.update(field.as_bytes());
    }
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_bytes()[..8]);
    let bits = u64::from_le_bytes(first);
    let mut hash = [0u8; SRS_HASH_CHARS];
    for (index, character) in hash.iter_mut().enumerate() {
        *character = SRS_BASE32[((bits >> (5 * index)) & 31) as usize];
    }
    hash
}

/// Compares without an early exit, so that the time taken says nothing about how many
/// leading characters of a guess were right.
fn constant_time_eq(left: &[u8], right: &[u8]) -> bool {
    if left.len() != right.len() {
        return false;
    }
    left.iter()
        .zip(right)
        .fold(0u8, |difference, (a, b)| difference | (a ^ b))
        == 0
}

/// Whether the local part of `address` has the shape of an SRS address (`SRS0=` or `SRS1=`),
/// whether or not its hash checks: such recipients are rate-limited per client.
pub fn looks_like_srs(address: &str) -> bool {
    let local = address.rsplit_once('@').map_or(address, |(local, _)| local);
    let prefix = local.get(..5).unwrap_or("");
    prefix.eq_ignore_ascii_case("SRS0=") || prefix.eq_ignore_ascii_case("SRS1=")
}

/// The original address of an SRS0 address we made (`SRS0=HHHHHHHH=TT=domain=local@...`),
/// if its hash checks under `key` and it is at most [`SRS_MAX_AGE_DAYS`] old; compared
/// case-insensitively, as addresses reach us lowercased.
pub fn srs_reverse(key: &SrsKey, address: &str, now_secs: i64) -> Option<String> {
    let (local_part, _) = address.rsplit_once('@')?;
    let mut fields = local_part.splitn(5, '=');
    let (tag, hash, timestamp, domain, local) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    if !tag.eq_ignore_ascii_case("SRS0")
        || hash.len() != SRS_HASH_CHARS
        || domain.is_empty()
        || local.is_empty()
    {
        return None;
    }
    let timestamp = timestamp.to_ascii_uppercase();
    let stamp = timestamp.as_bytes();
    if stamp.len() != 2 {
        return None;
    }
    let expected = srs_hash(key, &timestamp, domain, &local.to_ascii_lowercase());
    if !constant_time_eq(hash.to_ascii_uppercase().as_bytes(), &expected) {
        return None;
    }
    let value = |c: u8| SRS_BASE32.iter().position(|&b| b == c);
    let then = value(stamp[0])? * 32 + value(stamp[1])?;
    let modulus = SRS_TIMESTAMP_MODULUS_DAYS as usize;
    let today = now_secs
        .div_euclid(86_400)
        .rem_euclid(SRS_TIMESTAMP_MODULUS_DAYS) as usize;
    if (today + modulus - then) % modulus > SRS_MAX_AGE_DAYS {
        return None;
    }
    Some(format!("{local}@{domain}"))
}

/// The SRS0 form of `mail_from` for mail forwarded by `forwarding_domain`:
/// `SRS0=HHHHHHHH=TT=original.domain=local@forwarding_domain`, so that the destination's SPF
/// check sees our domain, and a bounce comes back to us.
pub fn srs_rewrite(
    key: &SrsKey,
    mail_from: &str,
    forwarding_domain: &str,
    now_secs: i64,
) -> String {
    let Some((local, domain)) = mail_from.rsplit_once('@') else {
        return mail_from.to_owned();
    };
    let days = now_secs
        .div_euclid(86_400)
        .rem_euclid(SRS_TIMESTAMP_MODULUS_DAYS) as usize;
    let timestamp = srs_timestamp(days);
    // Hashed over the lowercased local part: addresses reach us lowercased on the way back.
    let hash = srs_hash(key, &timestamp, domain, &local.to_ascii_lowercase());
    let hash = String::from_utf8_lossy(&hash);
    format!("SRS0={hash}={timestamp}={domain}={local}@{forwarding_domain}")
}

/// The address of the first From header field, if readable.
fn from_header_domain(message: &[u8]) -> Option<String> {
    let parsed = mail_parser::MessageParser::new().parse_headers(message)?;
    let field = parsed
        .headers()
        .iter()
        .find(|header| header.name == mail_parser::HeaderName::From)?;
    let address = field.value.as_address()?.first()?.address.as_deref()?;
    address
        .rsplit_once('@')
        .map(|(_, domain)| domain.to_ascii_lowercase())
}

pub(super) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl MailStore {
    /// Accepts one message: local recipients (and local aliases) get it in INBOX, remote
    /// recipients (aliases forwarding outside, and, for an authenticated `submitter`, foreign
    /// addresses) become one queue entry, all in ONE command, so that `250` means both are
    /// committed. A foreign recipient without `submitter` is refused (never an open relay);
    /// so is an envelope sender the submitter may not use. Messages of a submitter are
    /// DKIM-signed when the From domain has a key; forwarded mail from a foreign sender gets
    /// an SRS envelope sender.
    pub async fn accept(
        &self,
        delivery: Delivery,
        submitter: Option<AccountId>,
    ) -> Result<AcceptReceipt, StoreError> {
        let Delivery {
            mail_from,
            recipients,
            mut body,
            received_at,
        } = delivery;
        if recipients.is_empty() {
            return Err(StoreError::Invalid("a delivery needs a recipient".into()));
        }
        if recipients.len() > super::state::MAX_RECIPIENTS_PER_DELIVERY {
            return Err(StoreError::Invalid(format!(
                "more than {} recipients",
                super::state::MAX_RECIPIENTS_PER_DELIVERY
            )));
        }
        if let Some(account) = submitter {
            let sender = names::normalize_address(&mail_from)
                .map_err(|_| StoreError::Invalid("sender address not owned by the user".into()))?;
            if !self.sender_addresses(account).contains(&sender) {
                return Err(StoreError::Invalid(
                    "sender address not owned by the user".into(),
                ));
            }
        }
        let srs_key = self.srs_key();
        let mut local_recipients = Vec::new();
        let mut remote: Vec<String> = Vec::new();
        let mut forwarding_domain = None;
        let notify;
        {
            let state = self.state();
            for recipient in &recipients {
                let raw = recipient.trim();
                let Some((local_part, domain)) = raw.rsplit_once('@') else {
                    return Err(StoreError::Invalid(format!("invalid address {raw:?}")));
                };
                let domain = domain.trim_end_matches('.').to_ascii_lowercase();
                if !state.domains.contains(&domain) {
                    if submitter.is_none() {
                        return Err(StoreError::Invalid(format!("relaying to {raw} denied")));
                    }
                    // A foreign local part is the destination's business: kept as given (an
                    // address it cannot take is refused by the client, with a DSN).
                    let address = format!("{local_part}@{domain}");
                    if !remote.contains(&address) {
                        remote.push(address);
                    }
                    continue;
                }
                let address = names::normalize_address(raw)?;
                let mut accounts = Vec::new();
                let mut forwards = Vec::new();
                state.expand_with_forwards(&address, &mut accounts, &mut forwards);
                if accounts.is_empty() && forwards.is_empty() && mail_from.is_empty() {
                    // A bounce (null sender: nothing else may use an SRS address, or it would
                    // be a relay) to an address our forwarding rewrote: back to the original.
                    if let Some(original) = srs_key
                        .as_ref()
                        .and_then(|key| srs_reverse(key, &address, now_secs()))
                    {
                        forwards.push(original);
                    }
                }
                if !accounts.is_empty() {
                    local_recipients.push(address.clone());
                }
                if !forwards.is_empty() && forwarding_domain.is_none() {
                    forwarding_domain = Some(domain);
                }
                for target in forwards {
                    if !remote.contains(&target) {
                        remote.push(target);
                    }
                }
            }
            notify = names::normalize_address(&mail_from).ok().filter(|sender| {
                let mut accounts = Vec::new();
                state.expand_recipient(
                    sender,
                    &mut BTreeSet::new(),
                    &mut accounts,
                    &mut BTreeSet::new(),
                );
                !accounts.is_empty()
            });
        }
        if local_recipients.is_empty() && remote.is_empty() {
            return Err(StoreError::NotFound("local recipient".into()));
        }
        if remote.len() > super::state::MAX_RECIPIENTS_PER_DELIVERY {
            return Err(StoreError::Invalid("too many forwarding targets".into()));
        }

        let mut dkim_signed = false;
        if submitter.is_some() {
            let domain = from_header_domain(body.head()).or_else(|| {
                names::normalize_address(&mail_from)
                    .ok()
                    .map(|a| names::domain_of(&a).to_owned())
            });
            if let Some(key) = domain.and_then(|domain| self.dkim_signing_key(&domain)) {
                // The signer takes the message in one piece: a spilled body is read back
                // here (authenticated submissions only), and dropped once signed.
                let (signed, result) = tokio::task::spawn_blocking(move || {
                    let result = body.to_vec().map(|whole| key.sign(&whole));
                    (body, result)
                })
                .await
                .map_err(|e| StoreError::Io(format!("signing task failed: {e}")))?;
                body = signed;
                let result = result
                    .map_err(|e| StoreError::Io(format!("cannot read the message back: {e}")))?;
                match result {
                    Ok(header) => {
                        body.prepend(header.as_bytes());
                        dkim_signed = true;
                    }
                    // Unsigned mail is still mail: deliver it, but say so loudly.
                    Err(error) => tracing::error!(%error, "cannot DKIM-sign a message"),
                }
            }
        }

        let n_remote = remote.len();
        let now = now_ms();
        let remote_entry = if remote.is_empty() {
            None
        } else {
            let queue_mail_from = match (&forwarding_domain, submitter) {
                (Some(forwarding_domain), None)
                    if !mail_from.is_empty() && !self.is_sender_local(&mail_from) =>
                {
                    let key = self.srs_key_or_init().await?;
                    srs_rewrite(&key, &mail_from, forwarding_domain, now_secs())
                }
                _ => mail_from.clone(),
            };
            Some(NewQueueEntry {
                mail_from: queue_mail_from,
                notify,
                recipients: remote,
                created_at_ms: now,
                next_attempt_at_ms: now,
            })
        };

        // Recipients with an active Sieve script: the scripts run here, before proposing,
        // and their results commit with the delivery (`sieve_api.rs`).
        if let Some(plan) = self.sieve_plan(&local_recipients) {
            let receipt = self
                .accept_filtered(
                    plan,
                    super::sieve_api::Envelope {
                        mail_from,
                        n_recipients: recipients.len(),
                        received_at,
                        now_ms: now,
                    },
                    remote_entry,
                    // Scripts read the whole message (body tests): a spilled body is read back.
                    body.to_vec().map_err(|e| {
                        StoreError::Io(format!("cannot read the message body: {e}"))
                    })?,
                )
                .await?;
            return Ok(AcceptReceipt {
                n_remote: if receipt.queued.is_some() {
                    n_remote
                } else {
                    0
                },
                queued: receipt.queued,
                receipt: receipt.receipt,
                dkim_signed,
            });
        }

        let Some(remote_entry) = remote_entry else {
            let receipt = self
                .deliver(Delivery {
                    mail_from,
                    recipients: local_recipients,
                    body,
                    received_at,
                })
                .await?;
            return Ok(AcceptReceipt {
                receipt,
                queued: None,
                n_remote: 0,
                dkim_signed,
            });
        };

        let (body, staged) = prepare_body(&self.machine, body).await?;
        let blob = body.blob;
        let command = CommandV2::Accept {
            mail_from,
            local_recipients,
            remote: Some(remote_entry),
            received_at,
            body,
        };
        let result = self.submit_v2(command).await;
        staged.finish().await;
        match result? {
            Response::Accepted { delivered, queued } => Ok(AcceptReceipt {
                receipt: DeliveryReceipt { blob, delivered },
                queued,
                n_remote,
                dkim_signed,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// Whether `address` (normalized) is an SRS address this cluster made and still honours.
    pub fn is_srs_address(&self, address: &str) -> bool {
        self.srs_key()
            .is_some_and(|key| srs_reverse(&key, address, now_secs()).is_some())
    }

    fn is_sender_local(&self, address: &str) -> bool {
        address
            .rsplit_once('@')
            .is_some_and(|(_, domain)| self.is_local_domain(domain))
    }

    /// The cluster's SRS key, if one was chosen yet.
    fn srs_key(&self) -> Option<SrsKey> {
        self.state().outbound.srs_key.clone()
    }

    /// The cluster's SRS key; the first call anywhere in the cluster chooses it (32 random
    /// bytes, through the log, so that every node uses the same one; when two nodes race,
    /// apply keeps the first and both read it back). No command prints it.
    async fn srs_key_or_init(&self) -> Result<SrsKey, StoreError> {
        if let Some(key) = self.srs_key() {
            return Ok(key);
        }
        let key = SrsKey(rand::random());
        self.submit_v2(CommandV2::InitSrsKey { key }).await?;
        self.srs_key()
            .ok_or_else(|| StoreError::Io("the SRS key was not recorded".into()))
    }

    /// Resolves once an entry was queued or made due (on any node: it fires when such a
    /// command is applied here) since the last call returned. One waiter: the delivery worker.
    pub async fn queue_changed(&self) {
        self.machine.queue_changed.notified().await
    }

    // ----- the queue -----

    /// Every queue entry, by id.
    pub fn queue_entries(&self) -> Vec<QueueEntry> {
        self.state().outbound.queue.values().cloned().collect()
    }

    pub fn queue_entry(&self, id: QueueId) -> Option<QueueEntry> {
        self.state().outbound.queue.get(&id).cloned()
    }

    /// The earliest time (Unix ms) an entry nobody holds becomes due; none when the queue has
    /// nothing to deliver. An entry leased at `now_ms` counts from its lease's end, unless the
    /// lease is `own_node`'s (a node reclaiming after a restart).
    pub fn next_queue_due_ms(&self, now_ms: i64, own_node: Option<&str>) -> Option<i64> {
        self.state().outbound.next_due_ms(now_ms, own_node)
    }

    /// Leases up to `max_entries` due entries to `node` for `lease_ms` from `now_ms`
    /// (decided in apply, in log order: an entry is never leased to two nodes at once).
    /// `reclaim_own` also takes entries still leased to `node` itself (only for a node's first
    /// scan after it started: nothing of its own is in flight then). Returns the leased
    /// entries as applied.
    pub async fn take_leases(
        &self,
        node: &str,
        now_ms: i64,
        lease_ms: i64,
        max_entries: u32,
        reclaim_own: bool,
    ) -> Result<Vec<QueueEntry>, StoreError> {
        let command = CommandV2::TakeLeases {
            node: node.to_owned(),
            now_ms,
            expires_at_ms: now_ms.saturating_add(lease_ms.max(1)),
            max_entries,
            reclaim_own,
        };
        match self.submit_v2(command).await? {
            Response::Leased(ids) => {
                let state = self.state();
                Ok(ids
                    .iter()
                    .filter_map(|id| state.outbound.queue.get(id).cloned())
                    .collect())
            }
            other => Err(unexpected(other)),
        }
    }

    /// Records one attempt's per-recipient results and the next attempt time, releases
    /// `node`'s lease, and delivers `notice` (recipient address, message) into that local
    /// INBOX in the same command. Returns whether the entry is finished (and removed).
    pub async fn record_attempt(
        &self,
        id: QueueId,
        node: &str,
        results: Vec<RecipientResult>,
        next_attempt_at_ms: i64,
        delay_warned: bool,
        notice: Option<(String, Vec<u8>)>,
    ) -> Result<bool, StoreError> {
        let mut staged_notice = None;
        let notice = match notice {
            Some((to, message)) => {
                let (body, staged) = prepare_body(&self.machine, message).await?;
                staged_notice = Some(staged);
                Some(Notice {
                    to,
                    received_at: now_secs(),
                    body,
                })
            }
            None => None,
        };
        let command = CommandV2::RecordAttempt {
            id,
            node: node.to_owned(),
            results,
            next_attempt_at_ms,
            delay_warned,
            notice,
        };
        let result = self.submit_v2(command).await;
        if let Some(staged) = staged_notice {
            staged.finish().await;
        }
        match result? {
            Response::QueueUpdated { removed } => Ok(removed),
            other => Err(unexpected(other)),
        }
    }

    /// Makes an entry due now (`kermail queue retry`).
    pub async fn retry_queue_entry(&self, id: QueueId) -> Result<(), StoreError> {
        match self
            .submit_v2(CommandV2::RetryQueueEntry {
                id,
                now_ms: now_ms(),
            })
            .await?
        {
            Response::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Drops an entry without delivering it (`kermail queue delete`).
    pub async fn delete_queue_entry(&self, id: QueueId) -> Result<(), StoreError> {
        match self.submit_v2(CommandV2::DeleteQueueEntry { id }).await? {
            Response::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    // ----- DKIM keys -----

    /// Generates a key for a local domain and stores it. Without `rotate`, the domain must
    /// have no key yet; with it, exactly one (the new key is its successor: it is published
    /// now and signs once the old one is removed). The selector is `kYYYYMMDD` (with a
    /// suffix when taken).
    pub async fn generate_dkim_key(
        &self,
        domain: &str,
        algorithm: DkimAlgorithm,
        rotate: bool,
    ) -> Result<DkimKeyRecord, StoreError> {
        let domain = names::normalize_domain(domain)?;
        if !self.state().domains.contains(&domain) {
            return Err(StoreError::NotFound(format!("domain {domain}")));
        }
        let existing: Vec<String> = self
            .dkim_keys()
            .into_iter()
            .filter(|key| key.domain == domain)
            .map(|key| key.selector)
            .collect();
        match (rotate, existing.len()) {
            (false, 0) | (true, 1) => {}
            (false, _) => {
                return Err(StoreError::AlreadyExists(format!(
                    "a DKIM key for {domain} (use `kermail dkim rotate {domain}`)"
                )))
            }
            (true, 0) => {
                return Err(StoreError::NotFound(format!(
                    "DKIM key for {domain} to rotate (use `kermail dkim generate {domain}`)"
                )))
            }
            (true, _) => {
                return Err(StoreError::Invalid(format!(
                    "{domain} is already rotating: remove the old key first"
                )))
            }
        }
        let now = now_secs();
        let date = time::OffsetDateTime::from_unix_timestamp(now)
            .map(|t| format!("{:04}{:02}{:02}", t.year(), u8::from(t.month()), t.day()))
            .unwrap_or_else(|_| "0".into());
        let mut selector = format!("k{date}");
        let mut suffix = 2;
        while existing.contains(&selector) {
            selector = format!("k{date}-{suffix}");
            suffix += 1;
        }
        let generate_domain = domain.clone();
        let key = tokio::task::spawn_blocking(move || {
            DkimKeyRecord::generate(&generate_domain, &selector, algorithm, now.max(0) as u64)
        })
        .await
        .map_err(|e| StoreError::Io(format!("key generation task failed: {e}")))?
        .map_err(|e| StoreError::Io(e.to_string()))?;
        match self
            .submit_v2(CommandV2::AddDkimKey { key: key.clone() })
            .await?
        {
            Response::Done => Ok(key),
            other => Err(unexpected(other)),
        }
    }

    pub async fn remove_dkim_key(&self, domain: &str, selector: &str) -> Result<(), StoreError> {
        let domain = names::normalize_domain(domain)?;
        match self
            .submit_v2(CommandV2::RemoveDkimKey {
                domain,
                selector: selector.to_owned(),
            })
            .await?
        {
            Response::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Every DKIM key, by domain, oldest first.
    pub fn dkim_keys(&self) -> Vec<DkimKeyRecord> {
        self.state()
            .outbound
            .dkim
            .values()
            .flat_map(|keys| keys.iter().cloned())
            .collect()
    }

    /// The key that signs for `domain`: its oldest.
    /// The key an ARC seal is made with for a message to `recipients` (MX deliveries):
    /// the first RSA key (RFC 8617 defines `a=rsa-sha256` only) of the first recipient's
    /// domain whose address forwards outside (an alias to a foreign address); None when
    /// nothing is forwarded or that domain has no RSA key.
    pub fn arc_seal_key(&self, recipients: &[String]) -> Option<DkimKeyRecord> {
        let domain = {
            let state = self.state();
            recipients.iter().find_map(|recipient| {
                let address = names::normalize_address(recipient.trim()).ok()?;
                let mut accounts = Vec::new();
                let mut forwards = Vec::new();
                state.expand_with_forwards(&address, &mut accounts, &mut forwards);
                (!forwards.is_empty()).then(|| names::domain_of(&address).to_owned())
            })?
        };
        let domain = names::normalize_domain(&domain).ok()?;
        self.state().outbound.dkim.get(&domain).and_then(|keys| {
            keys.iter()
                .find(|key| key.algorithm == crate::outbound::dkim::DkimAlgorithm::Rsa)
                .cloned()
        })
    }

    pub fn dkim_signing_key(&self, domain: &str) -> Option<DkimKeyRecord> {
        let domain = names::normalize_domain(domain).ok()?;
        self.state()
            .outbound
            .dkim
            .get(&domain)
            .and_then(|keys| keys.first().cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: SrsKey = SrsKey([7; 32]);
    const OTHER: SrsKey = SrsKey([8; 32]);

    #[test]
    fn srs_addresses_reverse_only_with_the_right_hash_and_age() {
        let now = 1_700_000_000;
        let rewritten = srs_rewrite(&SECRET, "Bob@Remote.example", "example.org", now);
        let lowered = rewritten.to_ascii_lowercase();
        assert_eq!(
            srs_reverse(&SECRET, &lowered, now + 86_400).as_deref(),
            Some("bob@remote.example")
        );
        assert_eq!(srs_reverse(&OTHER, &lowered, now), None);
        assert_eq!(srs_reverse(&SECRET, &lowered, now + 22 * 86_400), None);
        let forged = lowered.replacen("srs0=", "srs0=aaaa", 1);
        assert_eq!(srs_reverse(&SECRET, &forged, now), None);
        assert_eq!(srs_reverse(&SECRET, "bob@example.org", now), None);
        // One character of the hash changed.
        let hash = lowered.split('=').nth(1).unwrap();
        assert_eq!(hash.len(), SRS_HASH_CHARS);
        let flipped = if hash.starts_with('a') { "b" } else { "a" };
        let other_hash = format!("{flipped}{}", &hash[1..]);
        assert_eq!(
            srs_reverse(&SECRET, &lowered.replacen(hash, &other_hash, 1), now),
            None
        );
    }

    #[test]
    fn srs_fields_are_separated_in_the_hash() {
        // Moving a character between the domain and the local part changes the hash.
        let now = 1_700_000_000;
        let one = srs_rewrite(&SECRET, "ab@c.example", "example.org", now);
        let two = srs_rewrite(&SECRET, "a@bc.example", "example.org", now);
        assert_ne!(one.split('=').nth(1), two.split('=').nth(1));
        let hash_one = srs_hash(&SECRET, "AA", "xy", "z");
        let hash_two = srs_hash(&SECRET, "AA", "x", "yz");
        assert_ne!(hash_one, hash_two);
    }

    #[test]
    fn srs_shape_is_recognised_case_insensitively() {
        assert!(looks_like_srs("srs0=x@example.org"));
        assert!(looks_like_srs("SRS1=x@example.org"));
        assert!(!looks_like_srs("srs@example.org"));
        assert!(!looks_like_srs("é@example.org"));
    }

    #[test]
    fn srs_keeps_the_original_and_uses_our_domain() {
        let rewritten = srs_rewrite(&SECRET, "bob@remote.example", "example.org", 1_700_000_000);
        assert!(rewritten.starts_with("SRS0="), "{rewritten}");
        assert!(
            rewritten.ends_with("=remote.example=bob@example.org"),
            "{rewritten}"
        );
        // Deterministic for a key and a day; another key gives another hash.
        assert_eq!(
            rewritten,
            srs_rewrite(&SECRET, "bob@remote.example", "example.org", 1_700_000_001)
        );
        assert_ne!(
            rewritten,
            srs_rewrite(&OTHER, "bob@remote.example", "example.org", 1_700_000_000)
        );
    }
}
