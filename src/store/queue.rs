//! The replicated outbound queue and the DKIM keys: their state and their part of `apply`.
//!
//! A queue entry is one accepted message for remote recipients: its body (a reference on the
//! content-addressed blob, like a mailbox message), the envelope, each recipient's status,
//! the attempt count, the next attempt time, and at most one lease. Every time in here was
//! chosen by the proposer and travels in the command, so apply stays pure.
//!
//! The lease invariant: `TakeLeases` grants an entry to a node only if, at the `now_ms` the
//! command carries, the entry is due and no other lease on it is unexpired. The log orders
//! every `TakeLeases`, so two nodes proposing at once cannot both be granted one entry: the
//! second command sees the first one's lease. A lease ends when its holder records an attempt
//! or when it expires (the holder died). A result from a node whose lease was taken over is
//! still recorded for the recipients it finished (they were really delivered or refused), but
//! it no longer moves the entry's schedule.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::command::{ApplyError, BodyV1, CommandV2, Response, SrsKey};
use super::names::{domain_of, normalize_address, normalize_domain};
use super::state::{Effects, Outcome, State, MAX_ALIAS_DEPTH, MAX_RECIPIENTS_PER_DELIVERY};
use super::BlobId;
use crate::outbound::dkim::DkimKeyRecord;

pub type QueueId = u64;

/// Entries in the queue at once; an accept beyond it is refused (SMTP answers 451).
pub const MAX_QUEUE_ENTRIES: usize = 100_000;
/// Entries one `TakeLeases` may grant.
pub const MAX_LEASES_PER_COMMAND: u32 = 1_000;
/// DKIM keys per domain: the signing one and, during a rotation, its successor.
pub const MAX_DKIM_KEYS_PER_DOMAIN: usize = 2;
/// Longest reply text kept per recipient (the remote server chooses it).
pub const MAX_REPLY_BYTES: usize = 512;
/// Longest node name carried by a lease.
pub const MAX_NODE_NAME_BYTES: usize = 255;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecipientStatus {
    /// Not delivered yet: retried until it is delivered, fails, or the entry expires.
    Pending,
    /// The receiver accepted it.
    Delivered,
    /// Refused permanently, or given up at expiry.
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRecipient {
    pub address: String,
    pub status: RecipientStatus,
    /// Attempts that reached a verdict for this recipient.
    pub attempts: u32,
    /// The last reply (or local reason) for this recipient.
    pub last_reply: Option<String>,
}

/// Who delivers an entry now, and until when (Unix milliseconds).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub node: String,
    pub expires_at_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueEntry {
    pub id: QueueId,
    /// The envelope sender used for delivery (SRS-rewritten for forwarded mail; "" for none).
    pub mail_from: String,
    /// The local address whose INBOX receives DSNs (none for forwarded mail from outside).
    pub notify: Option<String>,
    pub blob: BlobId,
    pub raw_size: u32,
    pub created_at_ms: i64,
    pub next_attempt_at_ms: i64,
    /// Delivery attempts recorded for the entry.
    pub attempts: u32,
    pub recipients: Vec<QueueRecipient>,
    pub lease: Option<Lease>,
    pub delay_warned: bool,
}

impl QueueEntry {
    pub fn pending(&self) -> impl Iterator<Item = (usize, &QueueRecipient)> {
        self.recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| r.status == RecipientStatus::Pending)
    }

    fn is_finished(&self) -> bool {
        self.pending().next().is_none()
    }

    /// Whether some lease on this entry is still running at `now_ms`.
    pub fn is_leased_at(&self, now_ms: i64) -> bool {
        self.lease
            .as_ref()
            .is_some_and(|lease| lease.expires_at_ms > now_ms)
    }
}

/// The replicated outbound state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outbound {
    pub queue: BTreeMap<QueueId, QueueEntry>,
    pub next_queue_id: QueueId,
    /// Domain -> its keys, oldest first. The oldest signs; a second one is its successor
    /// during a rotation (published, not signing until the old one is removed).
    pub dkim: BTreeMap<String, Vec<DkimKeyRecord>>,
    /// (next attempt, id) of every entry, so that finding due entries does not scan the
    /// queue. Derived (not serialized; rebuilt by [`Outbound::rebuild_due`]).
    #[serde(skip)]
    pub due: BTreeSet<(i64, QueueId)>,
    /// The SRS key ([`CommandV2::InitSrsKey`]); None until the first forwarded message.
    /// Not serialized with the rest (snapshots written before it still load): the snapshot
    /// carries it on its own.
    #[serde(skip)]
    pub srs_key: Option<SrsKey>,
}

impl Default for Outbound {
    fn default() -> Self {
        Outbound {
            queue: BTreeMap::new(),
            next_queue_id: 1,
            dkim: BTreeMap::new(),
            due: BTreeSet::new(),
            srs_key: None,
        }
    }
}

impl Outbound {
    /// Rebuilds the due index from the entries (after a snapshot restore).
    pub fn rebuild_due(&mut self) {
        self.due = self
            .queue
            .values()
            .map(|entry| (entry.next_attempt_at_ms, entry.id))
            .collect();
    }

    /// The earliest time (Unix ms) at which an entry becomes takeable: its next attempt, or
    /// the end of an unexpired lease on it (ignored when held by `own_node`).
    pub fn next_due_ms(&self, now_ms: i64, own_node: Option<&str>) -> Option<i64> {
        let mut best: Option<i64> = None;
        for &(next, id) in &self.due {
            if best.is_some_and(|best| next >= best) {
                break;
            }
            let takeable_at = match self.queue.get(&id).and_then(|e| e.lease.as_ref()) {
                Some(lease)
                    if lease.expires_at_ms > now_ms
                        && own_node.is_none_or(|own| own != lease.node) =>
                {
                    next.max(lease.expires_at_ms)
                }
                _ => next,
            };
            best = Some(best.map_or(takeable_at, |best| best.min(takeable_at)));
        }
        best
    }
}

/// The remote part of an accepted message, as the proposer decided it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewQueueEntry {
    pub mail_from: String,
    pub notify: Option<String>,
    pub recipients: Vec<String>,
    pub created_at_ms: i64,
    pub next_attempt_at_ms: i64,
}

/// What one attempt did to one recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttemptVerdict {
    Delivered,
    /// Temporary failure: stays pending.
    Deferred,
    /// Permanent failure, or given up: no more attempts.
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientResult {
    /// Index into the entry's recipients.
    pub index: u32,
    pub verdict: AttemptVerdict,
    pub reply: String,
}

/// A message (DSN or delay warning) delivered into a local INBOX with an attempt's results.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    pub to: String,
    pub received_at: i64,
    pub body: BodyV1,
}

impl std::fmt::Debug for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Notice({}, {:?})", self.to, self.body)
    }
}

fn truncated(text: &str) -> String {
    if text.len() <= MAX_REPLY_BYTES {
        return text.to_owned();
    }
    let mut end = MAX_REPLY_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

impl State {
    /// Applies one version-2 command (queue and DKIM keys). Pure, and a refusal changes
    /// nothing, like [`State::apply`].
    pub fn apply_v2(&mut self, command: CommandV2) -> Outcome {
        let mut effects = Effects::default();
        let carried: Vec<BlobId> = command.bodies().iter().map(|b| b.blob).collect();
        let result = match command {
            CommandV2::Accept {
                mail_from: _,
                local_recipients,
                remote,
                received_at,
                body,
            } => self.accept(&local_recipients, remote, received_at, &body, &mut effects),
            CommandV2::TakeLeases {
                node,
                now_ms,
                expires_at_ms,
                max_entries,
                reclaim_own,
            } => self.take_leases(node, now_ms, expires_at_ms, max_entries, reclaim_own),
            CommandV2::RecordAttempt {
                id,
                node,
                results,
                next_attempt_at_ms,
                delay_warned,
                notice,
            } => self.record_attempt(
                id,
                &node,
                &results,
                next_attempt_at_ms,
                delay_warned,
                notice,
                &mut effects,
            ),
            CommandV2::RetryQueueEntry { id, now_ms } => self.retry_entry(id, now_ms),
            CommandV2::DeleteQueueEntry { id } => self.delete_entry(id, &mut effects),
            CommandV2::AddDkimKey { key } => self.add_dkim_key(key),
            CommandV2::RemoveDkimKey { domain, selector } => {
                self.remove_dkim_key(&domain, &selector)
            }
            CommandV2::InitSrsKey { key } => {
                // The first key wins: a second node that proposed at the same time reads the
                // same one back.
                if self.outbound.srs_key.is_none() {
                    self.outbound.srs_key = Some(key);
                }
                Ok(Response::Done)
            }
        };
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                effects = Effects::default();
                for blob in carried {
                    if !self.blobs.contains_key(&blob) {
                        effects.released.push(blob);
                    }
                }
                Response::Refused(error)
            }
        };
        Outcome { response, effects }
    }

    /// Like [`State::expand_recipient`] from `address` (normalized), also collecting the
    /// foreign targets reached through aliases (forwarding), in order, without duplicates.
    pub fn expand_with_forwards(
        &self,
        address: &str,
        accounts: &mut Vec<super::AccountId>,
        forwards: &mut Vec<String>,
    ) {
        self.expand_recipient(
            address,
            &mut BTreeSet::new(),
            accounts,
            &mut BTreeSet::new(),
        );
        // Walk the alias graph breadth-first, bounded like the local expansion.
        let mut seen = BTreeSet::new();
        let mut level = vec![address.to_owned()];
        for _ in 0..=MAX_ALIAS_DEPTH {
            let mut next = Vec::new();
            for source in level {
                if !seen.insert(source.clone()) {
                    continue;
                }
                let Some(targets) = self.aliases.get(&source) else {
                    continue;
                };
                for target in targets {
                    if self.domains.contains(domain_of(target)) {
                        next.push(target.clone());
                    } else if !forwards.contains(target) {
                        forwards.push(target.clone());
                    }
                }
            }
            if next.is_empty() {
                break;
            }
            level = next;
        }
    }

    /// Checks that `entries` can be queued (recipient counts, room in the queue), before
    /// anything changes.
    pub(super) fn check_new_queue_entries(
        &self,
        entries: &[&NewQueueEntry],
    ) -> Result<(), ApplyError> {
        for remote in entries {
            if remote.recipients.is_empty() || remote.recipients.len() > MAX_RECIPIENTS_PER_DELIVERY
            {
                return Err(ApplyError::Invalid(format!(
                    "a queue entry has 1 to {MAX_RECIPIENTS_PER_DELIVERY} recipients"
                )));
            }
        }
        if self.outbound.queue.len() + entries.len() > MAX_QUEUE_ENTRIES {
            return Err(ApplyError::Invalid(format!(
                "the queue is full ({MAX_QUEUE_ENTRIES} entries)"
            )));
        }
        Ok(())
    }

    /// Queues a checked entry for `body` (one more reference to it).
    pub(super) fn insert_queue_entry(&mut self, remote: NewQueueEntry, body: &BodyV1) -> QueueId {
        let id = self.outbound.next_queue_id;
        let entry = QueueEntry {
            id,
            mail_from: remote.mail_from,
            notify: remote.notify,
            blob: body.blob,
            raw_size: body.raw_size,
            created_at_ms: remote.created_at_ms,
            next_attempt_at_ms: remote.next_attempt_at_ms,
            attempts: 0,
            recipients: remote
                .recipients
                .into_iter()
                .map(|address| QueueRecipient {
                    address,
                    status: RecipientStatus::Pending,
                    attempts: 0,
                    last_reply: None,
                })
                .collect(),
            lease: None,
            delay_warned: false,
        };
        self.outbound.next_queue_id += 1;
        self.outbound.due.insert((entry.next_attempt_at_ms, id));
        self.outbound.queue.insert(id, entry);
        self.add_ref(body.blob, body.raw_size, body.compressed.len() as u64);
        id
    }

    fn accept(
        &mut self,
        local_recipients: &[String],
        remote: Option<NewQueueEntry>,
        received_at: i64,
        body: &BodyV1,
        effects: &mut Effects,
    ) -> Result<Response, ApplyError> {
        Self::check_body(body)?;
        if local_recipients.is_empty() && remote.is_none() {
            return Err(ApplyError::Invalid("a message needs a recipient".into()));
        }
        if let Some(remote) = &remote {
            self.check_new_queue_entries(&[remote])?;
        }
        // The local part first: it is the one that can be refused (every check comes before
        // any change), so a refusal leaves the queue untouched too.
        let delivered = if local_recipients.is_empty() {
            Vec::new()
        } else {
            match self.deliver(local_recipients, received_at, body, effects)? {
                Response::Delivered(delivered) => delivered,
                _ => Vec::new(),
            }
        };
        let queued = remote.map(|remote| self.insert_queue_entry(remote, body));
        Ok(Response::Accepted { delivered, queued })
    }

    fn take_leases(
        &mut self,
        node: String,
        now_ms: i64,
        expires_at_ms: i64,
        max_entries: u32,
        reclaim_own: bool,
    ) -> Result<Response, ApplyError> {
        if node.is_empty() || node.len() > MAX_NODE_NAME_BYTES {
            return Err(ApplyError::Invalid("invalid node name".into()));
        }
        if expires_at_ms <= now_ms {
            return Err(ApplyError::Invalid(
                "a lease must end after it starts".into(),
            ));
        }
        let max_entries = max_entries.min(MAX_LEASES_PER_COMMAND) as usize;
        // Oldest due first; the leased entries skipped on the way are at most the deliveries in
        // flight over the cluster.
        let mut due: Vec<QueueId> = Vec::new();
        for &(next, id) in &self.outbound.due {
            if next > now_ms || due.len() >= max_entries {
                break;
            }
            let Some(entry) = self.outbound.queue.get(&id) else {
                continue;
            };
            let own = reclaim_own && entry.lease.as_ref().is_some_and(|lease| lease.node == node);
            if (own || !entry.is_leased_at(now_ms)) && !entry.is_finished() {
                due.push(id);
            }
        }
        let mut granted = Vec::with_capacity(due.len());
        for id in due {
            if let Some(entry) = self.outbound.queue.get_mut(&id) {
                entry.lease = Some(Lease {
                    node: node.clone(),
                    expires_at_ms,
                });
                granted.push(id);
            }
        }
        Ok(Response::Leased(granted))
    }

    #[allow(clippy::too_many_arguments)]
    fn record_attempt(
        &mut self,
        id: QueueId,
        node: &str,
        results: &[RecipientResult],
        next_attempt_at_ms: i64,
        delay_warned: bool,
        notice: Option<Notice>,
        effects: &mut Effects,
    ) -> Result<Response, ApplyError> {
        let entry = self
            .outbound
            .queue
            .get(&id)
            .ok_or_else(|| ApplyError::NotFound(format!("queue entry {id}")))?;
        for result in results {
            if result.index as usize >= entry.recipients.len() {
                return Err(ApplyError::Invalid(format!(
                    "queue entry {id} has no recipient {}",
                    result.index
                )));
            }
        }
        if let Some(notice) = &notice {
            Self::check_body(&notice.body)?;
        }
        // The holder (or a node recording without any lease) moves the schedule; a node whose
        // lease was taken over only records what it finished.
        let holds_schedule = entry.lease.as_ref().is_none_or(|lease| lease.node == node);
        let entry = self
            .outbound
            .queue
            .get_mut(&id)
            .ok_or_else(|| ApplyError::NotFound(format!("queue entry {id}")))?;
        for result in results {
            let recipient = &mut entry.recipients[result.index as usize];
            if recipient.status != RecipientStatus::Pending {
                continue;
            }
            recipient.attempts = recipient.attempts.saturating_add(1);
            recipient.last_reply = Some(truncated(&result.reply));
            recipient.status = match result.verdict {
                AttemptVerdict::Delivered => RecipientStatus::Delivered,
                AttemptVerdict::Deferred => RecipientStatus::Pending,
                AttemptVerdict::Failed => RecipientStatus::Failed,
            };
        }
        if holds_schedule {
            entry.attempts = entry.attempts.saturating_add(1);
            self.outbound.due.remove(&(entry.next_attempt_at_ms, id));
            self.outbound.due.insert((next_attempt_at_ms, id));
            entry.next_attempt_at_ms = next_attempt_at_ms;
            entry.lease = None;
            entry.delay_warned |= delay_warned;
        }
        let finished = entry.is_finished();
        if let Some(notice) = notice {
            self.deliver_notice(&notice, effects);
        }
        if finished {
            if let Some(entry) = self.outbound.queue.remove(&id) {
                self.outbound.due.remove(&(entry.next_attempt_at_ms, id));
                self.drop_ref(entry.blob, effects);
            }
        }
        Ok(Response::QueueUpdated { removed: finished })
    }

    /// A DSN or warning into the INBOX of `notice.to`; nothing when that address no longer
    /// reaches an account (the attempt's results are recorded all the same).
    fn deliver_notice(&mut self, notice: &Notice, effects: &mut Effects) {
        let Ok(address) = normalize_address(&notice.to) else {
            return;
        };
        let mut accounts = Vec::new();
        self.expand_recipient(
            &address,
            &mut BTreeSet::new(),
            &mut accounts,
            &mut BTreeSet::new(),
        );
        if accounts.is_empty() {
            return;
        }
        let mut notice_effects = Effects::default();
        // A full mailbox refuses it: the notice is dropped, the results stand.
        if self
            .deliver(
                std::slice::from_ref(&address),
                notice.received_at,
                &notice.body,
                &mut notice_effects,
            )
            .is_ok()
        {
            effects.changed.extend(notice_effects.changed);
            effects.released.extend(notice_effects.released);
        }
    }

    fn retry_entry(&mut self, id: QueueId, now_ms: i64) -> Result<Response, ApplyError> {
        let entry = self
            .outbound
            .queue
            .get_mut(&id)
            .ok_or_else(|| ApplyError::NotFound(format!("queue entry {id}")))?;
        let next = entry.next_attempt_at_ms.min(now_ms);
        self.outbound.due.remove(&(entry.next_attempt_at_ms, id));
        self.outbound.due.insert((next, id));
        entry.next_attempt_at_ms = next;
        Ok(Response::Done)
    }

    fn delete_entry(&mut self, id: QueueId, effects: &mut Effects) -> Result<Response, ApplyError> {
        let entry = self
            .outbound
            .queue
            .remove(&id)
            .ok_or_else(|| ApplyError::NotFound(format!("queue entry {id}")))?;
        self.outbound.due.remove(&(entry.next_attempt_at_ms, id));
        self.drop_ref(entry.blob, effects);
        Ok(Response::Done)
    }

    fn add_dkim_key(&mut self, key: DkimKeyRecord) -> Result<Response, ApplyError> {
        let domain = normalize_domain(&key.domain)?;
        if !self.domains.contains(&domain) {
            return Err(ApplyError::NotFound(format!("domain {domain}")));
        }
        if key.selector.is_empty() || key.selector.len() > 63 {
            return Err(ApplyError::Invalid("invalid DKIM selector".into()));
        }
        let keys = self.outbound.dkim.get(&domain);
        if keys.is_some_and(|keys| keys.iter().any(|k| k.selector == key.selector)) {
            return Err(ApplyError::AlreadyExists(format!(
                "DKIM key {} for {domain}",
                key.selector
            )));
        }
        if keys.is_some_and(|keys| keys.len() >= MAX_DKIM_KEYS_PER_DOMAIN) {
            return Err(ApplyError::Invalid(format!(
                "{domain} already has {MAX_DKIM_KEYS_PER_DOMAIN} DKIM keys: remove the old one first"
            )));
        }
        let key = DkimKeyRecord { domain, ..key };
        self.outbound
            .dkim
            .entry(key.domain.clone())
            .or_default()
            .push(key);
        Ok(Response::Done)
    }

    fn remove_dkim_key(&mut self, domain: &str, selector: &str) -> Result<Response, ApplyError> {
        let domain = normalize_domain(domain)?;
        let not_found = || ApplyError::NotFound(format!("DKIM key {selector} for {domain}"));
        let keys = self.outbound.dkim.get_mut(&domain).ok_or_else(not_found)?;
        let before = keys.len();
        keys.retain(|key| key.selector != selector);
        if keys.len() == before {
            return Err(not_found());
        }
        if keys.is_empty() {
            self.outbound.dkim.remove(&domain);
        }
        Ok(Response::Done)
    }

    /// The queue's part of [`State::check_invariants`].
    pub fn check_outbound_invariants(&self) -> Result<(), String> {
        if self.outbound.queue.len() > MAX_QUEUE_ENTRIES {
            return Err("too many queue entries".into());
        }
        for (&id, entry) in &self.outbound.queue {
            if entry.id != id || id >= self.outbound.next_queue_id || id == 0 {
                return Err(format!("queue entry {id} has a bad id"));
            }
            if entry.recipients.is_empty()
                || entry.recipients.len() > MAX_RECIPIENTS_PER_DELIVERY
                || entry.is_finished()
            {
                return Err(format!("queue entry {id} has bad recipients"));
            }
        }
        let derived: BTreeSet<(i64, QueueId)> = self
            .outbound
            .queue
            .values()
            .map(|entry| (entry.next_attempt_at_ms, entry.id))
            .collect();
        if derived != self.outbound.due {
            return Err("the queue's due index does not match its entries".into());
        }
        for (domain, keys) in &self.outbound.dkim {
            if keys.is_empty() || keys.len() > MAX_DKIM_KEYS_PER_DOMAIN {
                return Err(format!("domain {domain} has a bad number of DKIM keys"));
            }
            if keys.iter().any(|key| &key.domain != domain) {
                return Err(format!(
                    "a DKIM key is filed under the wrong domain {domain}"
                ));
            }
        }
        Ok(())
    }
}
