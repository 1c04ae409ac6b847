//! The delivery worker: every node runs one; the replicated queue's leases make them share the
//! work safely.
//!
//! Loop: when an entry nobody holds is due, propose `TakeLeases` for as many as there are free
//! delivery slots (apply grants each entry to one node only), deliver each leased entry in its
//! own task, and wait for the next due time, a newly queued message (the store fires an event
//! when such a command is applied here, whichever node proposed it), a finished delivery, or
//! the poll interval.
//!
//! One attempt of one entry: its pending recipients grouped by domain (at most
//! `MAX_RECIPIENTS_PER_TRANSACTION` per transaction), each group delivered with
//! [`OutboundClient::deliver_to_domain`] under its policy (rate, connections, IP family, TLS,
//! source address), the whole attempt cut before the lease ends. Then one `RecordAttempt`:
//! per-recipient verdicts, the next attempt (exponential backoff with jitter), and, in the
//! same command, a DSN for recipients that failed permanently or expired and a delay warning
//! when one is due, for the sender's INBOX. One log line per attempt with every recipient's
//! outcome.
//!
//! Cluster safety: a node delivers only entries it holds a lease on; the lease is given up by
//! recording the attempt, or expires (the node died) and another node takes the entry. A
//! recipient is sent twice only if a node dies between the receiver's reply and the commit
//! of that attempt (or the attempt outlived its lease, which the deadline prevents).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::SeedableRng;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::client::{
    Envelope, OutboundClient, RecipientOutcome, Reply, MAX_RECIPIENTS_PER_TRANSACTION,
};
use super::dns::HickoryDns;
use super::dsn::{build_dsn, DsnAction, DsnInput, DsnRecipient};
use super::policy::{Limiters, Policies};
use super::OutboundConfig;
use crate::store::{AttemptVerdict, MailStore, QueueEntry, RecipientResult, StoreError};

/// An attempt is cut this long before its lease ends, so that its results are committed while
/// the lease still holds.
pub const LEASE_MARGIN_SECS: u64 = 60;
/// Shortest lease the worker takes (a shorter `lease_secs` is raised to it).
pub const MIN_LEASE_SECS: u64 = 2;
/// Tries to commit one attempt's results before giving up (the lease then expires and the
/// entry is tried again, possibly by another node).
pub const RECORD_TRIES_MAX: u32 = 5;
/// Pause between those tries.
pub const RECORD_RETRY_DELAY_MS: u64 = 500;
/// On shutdown, how long deliveries in flight may take to finish and commit.
pub const SHUTDOWN_GRACE_SECS: u64 = 25;
/// Pause after a failed `TakeLeases` (no quorum) before trying again.
pub const LEASE_ERROR_BACKOFF_MS: u64 = 1_000;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// What one recipient got in one attempt.
struct Outcome {
    index: usize,
    address: String,
    outcome: RecipientOutcome,
    host: Option<SocketAddr>,
}

/// The worker of one node.
pub struct Worker {
    store: MailStore,
    config: OutboundConfig,
    node: String,
    client: OutboundClient,
    dns: HickoryDns,
    policies: Policies,
    limiters: Limiters,
}

/// Runs the delivery worker of node `node_name` until `shutdown`; it greets as
/// `config.ehlo_hostname`, or as `node_hostname` when that is left at its default.
pub async fn run(
    store: MailStore,
    mut config: OutboundConfig,
    node_name: String,
    node_hostname: String,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if config.ehlo_hostname == OutboundConfig::default().ehlo_hostname {
        config.ehlo_hostname = node_hostname;
    }
    if !config.srs_secret.is_empty() {
        tracing::warn!(
            "[outbound] srs_secret is ignored: the cluster generates its own SRS key on first use"
        );
    }
    let worker = Arc::new(Worker {
        client: OutboundClient::from_config(&config),
        dns: HickoryDns::from_system(),
        policies: Policies::new(config.policies.clone(), config.default_policy.clone()),
        limiters: Limiters::new(),
        store,
        node: node_name,
        config,
    });
    worker.run(shutdown).await;
    Ok(())
}

impl Worker {
    fn lease_ms(&self) -> i64 {
        let secs = self.config.lease_secs.max(MIN_LEASE_SECS);
        i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX / 2)
    }

    /// The longest one attempt may take: up to the lease's end minus the margin (half the
    /// lease when the lease is shorter than twice the margin).
    fn attempt_deadline(&self) -> Duration {
        let lease = self.config.lease_secs.max(MIN_LEASE_SECS);
        let margin = LEASE_MARGIN_SECS.min(lease / 2);
        Duration::from_secs(lease - margin)
    }

    async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        tracing::info!(node = %self.node, "delivery worker started");
        let poll_ms = i64::try_from(self.config.poll_interval_secs.max(1).saturating_mul(1000))
            .unwrap_or(i64::MAX);
        let max_in_flight = self.config.max_concurrent_deliveries.max(1);
        let mut in_flight: JoinSet<()> = JoinSet::new();
        // Until the first successful scan, this node's own unexpired leases (left by a crash
        // of its previous run) are taken back at once: nothing of its own is in flight yet.
        let mut reclaim_own = true;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let now = now_ms();
            let free = max_in_flight.saturating_sub(in_flight.len());
            let mut wait_ms = poll_ms;
            let own = reclaim_own.then_some(self.node.as_str());
            match self.store.next_queue_due_ms(now, own) {
                Some(due) if due <= now && free > 0 => {
                    let max = u32::try_from(free).unwrap_or(u32::MAX);
                    match self
                        .store
                        .take_leases(&self.node, now, self.lease_ms(), max, reclaim_own)
                        .await
                    {
                        Ok(entries) if !entries.is_empty() => {
                            reclaim_own = false;
                            for entry in entries {
                                in_flight.spawn(self.clone().deliver_entry(entry));
                            }
                            continue;
                        }
                        Ok(_) => reclaim_own = false,
                        Err(error) => {
                            tracing::warn!(%error, "cannot take queue leases");
                            wait_ms = wait_ms.min(LEASE_ERROR_BACKOFF_MS as i64);
                        }
                    }
                }
                Some(due) if due > now => {
                    reclaim_own = false;
                    wait_ms = wait_ms.min(due - now);
                }
                _ => reclaim_own = false,
            }
            let wait = Duration::from_millis(u64::try_from(wait_ms.max(1)).unwrap_or(1));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.store.queue_changed() => {}
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {
                    // Every delivery already done frees its slot too: one lease command for
                    // all of them.
                    while in_flight.try_join_next().is_some() {}
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
        if !in_flight.is_empty() {
            tracing::info!(
                n_in_flight = in_flight.len(),
                "delivery worker stopping: finishing deliveries in flight"
            );
            let grace = Duration::from_secs(SHUTDOWN_GRACE_SECS);
            let drained = tokio::time::timeout(grace, async {
                while in_flight.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                // Their leases expire; the entries are tried again.
                in_flight.abort_all();
            }
        }
        tracing::info!("delivery worker stopped");
    }

    /// One attempt at one leased entry, then its results committed.
    async fn deliver_entry(self: Arc<Self>, entry: QueueEntry) {
        let attempt = entry.attempts.saturating_add(1);
        let (outcomes, message) = match self.store.body(entry.blob).await {
            Ok(body) => {
                let message: Arc<Vec<u8>> = Arc::new(without_return_path(&body));
                let outcomes = tokio::time::timeout(
                    self.attempt_deadline(),
                    self.send(&entry, message.clone()),
                )
                .await
                .unwrap_or_else(|_| {
                    let reply = Reply::local(451, "4.4.1", "attempt outlived its deadline");
                    all_pending(&entry, RecipientOutcome::TempFail { reply })
                });
                (outcomes, message)
            }
            Err(error) => {
                tracing::error!(queue_id = entry.id, %error, "cannot read a queued body");
                let reply = Reply::local(451, "4.3.0", "queued body unreadable");
                let outcomes = all_pending(&entry, RecipientOutcome::TempFail { reply });
                (outcomes, Arc::new(Vec::new()))
            }
        };
        self.record(entry, attempt, outcomes, &message).await;
    }

    /// Delivers the pending recipients, grouped by domain, each group in its own task.
    async fn send(self: &Arc<Self>, entry: &QueueEntry, message: Arc<Vec<u8>>) -> Vec<Outcome> {
        let mut by_domain: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
        for (index, recipient) in entry.pending() {
            let domain = recipient
                .address
                .rsplit_once('@')
                .map(|(_, domain)| domain.to_ascii_lowercase())
                .unwrap_or_default();
            by_domain
                .entry(domain)
                .or_default()
                .push((index, recipient.address.clone()));
        }
        let mut outcomes = Vec::new();
        let mut groups = JoinSet::new();
        for (domain, recipients) in by_domain {
            for chunk in recipients.chunks(MAX_RECIPIENTS_PER_TRANSACTION) {
                let chunk = chunk.to_vec();
                let domain = domain.clone();
                let message = message.clone();
                let mail_from = entry.mail_from.clone();
                let worker = self.clone();
                groups.spawn(
                    async move { worker.send_group(domain, chunk, mail_from, message).await },
                );
            }
        }
        while let Some(done) = groups.join_next().await {
            match done {
                Ok(group) => outcomes.extend(group),
                Err(error) => tracing::error!(%error, "a delivery task failed"),
            }
        }
        // A group whose task failed: its recipients stay pending, tried again later.
        for (index, recipient) in entry.pending() {
            if !outcomes.iter().any(|o| o.index == index) {
                outcomes.push(Outcome {
                    index,
                    address: recipient.address.clone(),
                    outcome: RecipientOutcome::TempFail {
                        reply: Reply::local(451, "4.3.0", "delivery task failed"),
                    },
                    host: None,
                });
            }
        }
        outcomes.sort_by_key(|o| o.index);
        outcomes
    }

    /// One transaction (or one failure) for one domain's recipients.
    async fn send_group(
        &self,
        domain: String,
        recipients: Vec<(usize, String)>,
        mail_from: String,
        message: Arc<Vec<u8>>,
    ) -> Vec<Outcome> {
        let addresses: Vec<String> = recipients.iter().map(|(_, a)| a.clone()).collect();
        let envelope = Envelope {
            mail_from: &mail_from,
            recipients: &addresses,
            message: &message,
        };
        let report = self
            .client
            .deliver_to_domain(
                &self.config,
                &self.dns,
                &self.policies,
                &self.limiters,
                &domain,
                &envelope,
            )
            .await;
        recipients
            .into_iter()
            .zip(report.outcomes)
            .map(|((index, address), outcome)| Outcome {
                index,
                address,
                outcome,
                host: report.host,
            })
            .collect()
    }

    /// Commits the attempt: verdicts, next attempt, DSN or warning.
    async fn record(
        &self,
        entry: QueueEntry,
        attempt: u32,
        outcomes: Vec<Outcome>,
        message: &[u8],
    ) {
        let now = now_ms();
        let mut rng = rand::rngs::StdRng::from_entropy();
        let created = u64::try_from(entry.created_at_ms).unwrap_or(0);
        let now_u = u64::try_from(now).unwrap_or(0);
        let next = self
            .config
            .retry
            .next_attempt(attempt, created, now_u, &mut rng);
        let expired = next.is_none();
        let mut results = Vec::with_capacity(outcomes.len());
        let mut failed = Vec::new();
        let mut deferred = Vec::new();
        let mut log_parts = Vec::with_capacity(outcomes.len());
        for outcome in &outcomes {
            let reply = outcome.outcome.reply().clone();
            let (verdict, label) = match &outcome.outcome {
                RecipientOutcome::Delivered { .. } => (AttemptVerdict::Delivered, "delivered"),
                RecipientOutcome::PermFail { .. } => (AttemptVerdict::Failed, "bounced"),
                RecipientOutcome::TempFail { .. } if expired => (AttemptVerdict::Failed, "expired"),
                RecipientOutcome::TempFail { .. } => (AttemptVerdict::Deferred, "deferred"),
            };
            let host = outcome
                .host
                .map(|host| host.to_string())
                .unwrap_or_else(|| "-".into());
            log_parts.push(format!("{}={label} [{host}] {reply}", outcome.address));
            match verdict {
                AttemptVerdict::Failed => failed.push(outcome),
                AttemptVerdict::Deferred => deferred.push(outcome),
                AttemptVerdict::Delivered => {}
            }
            results.push(RecipientResult {
                index: u32::try_from(outcome.index).unwrap_or(u32::MAX),
                verdict,
                reply: reply.to_string(),
            });
        }
        let warn_delay = !deferred.is_empty()
            && self
                .config
                .retry
                .delay_warning_due(created, now_u, entry.delay_warned);
        let next_attempt_at_ms = next
            .and_then(|next| i64::try_from(next).ok())
            .unwrap_or(now);
        tracing::info!(
            queue_id = entry.id,
            attempt,
            node = %self.node,
            from = %entry.mail_from,
            outcomes = %log_parts.join("; "),
            next_attempt_in_secs = if deferred.is_empty() { 0 } else { (next_attempt_at_ms - now) / 1000 },
            "outbound attempt"
        );
        let delayed: &[&Outcome] = if warn_delay { &deferred } else { &[] };
        let mut notice = self.notice(&entry, &failed, delayed, message, now);
        for try_number in 1..=RECORD_TRIES_MAX {
            match self
                .store
                .record_attempt(
                    entry.id,
                    &self.node,
                    results.clone(),
                    next_attempt_at_ms,
                    warn_delay,
                    notice.clone(),
                )
                .await
            {
                Ok(_) => return,
                Err(StoreError::NotFound(_)) => {
                    // Deleted meanwhile (`kermail queue delete`).
                    return;
                }
                Err(error) if try_number < RECORD_TRIES_MAX => {
                    tracing::warn!(queue_id = entry.id, %error, "cannot record an attempt yet");
                    tokio::time::sleep(Duration::from_millis(RECORD_RETRY_DELAY_MS)).await;
                }
                Err(error) => {
                    tracing::error!(
                        queue_id = entry.id,
                        %error,
                        "cannot record an attempt: the entry will be tried again after its lease"
                    );
                    notice = None;
                }
            }
        }
        drop(notice);
    }

    /// The DSN (failed and, when due, delayed recipients) for the sender's INBOX, if the
    /// sender is local and not the null sender.
    fn notice(
        &self,
        entry: &QueueEntry,
        failed: &[&Outcome],
        delayed: &[&Outcome],
        message: &[u8],
        now_ms: i64,
    ) -> Option<(String, Vec<u8>)> {
        if failed.is_empty() && delayed.is_empty() {
            return None;
        }
        let to = entry.notify.clone()?;
        if entry.mail_from.is_empty() {
            return None;
        }
        let recipients: Vec<DsnRecipient> = failed
            .iter()
            .map(|o| (o, DsnAction::Failed))
            .chain(delayed.iter().map(|o| (o, DsnAction::Delayed)))
            .map(|(outcome, action)| {
                let reply = outcome.outcome.reply();
                let status = if action == DsnAction::Failed && !reply.is_permanent() {
                    // Given up at expiry.
                    "4.4.7".to_owned()
                } else {
                    reply.status.clone()
                };
                DsnRecipient {
                    address: outcome.address.clone(),
                    action,
                    status,
                    diagnostic: reply
                        .remote
                        .then(|| format!("{} {} {}", reply.code, reply.status, reply.text)),
                    remote_mta: outcome.host.map(|host| host.ip().to_string()),
                }
            })
            .collect();
        let message_id = format!(
            "<dsn.{}.{}.{}@{}>",
            entry.id, entry.attempts, now_ms, self.config.ehlo_hostname
        );
        let input = DsnInput {
            reporting_mta: &self.config.ehlo_hostname,
            to: &to,
            recipients: &recipients,
            original_message: message,
            date_unix_secs: u64::try_from(now_ms / 1000).unwrap_or(0),
            message_id: &message_id,
        };
        match build_dsn(&input) {
            Ok(message) => Some((to, message)),
            Err(error) => {
                tracing::error!(queue_id = entry.id, %error, "cannot build a DSN");
                None
            }
        }
    }
}

fn all_pending(entry: &QueueEntry, outcome: RecipientOutcome) -> Vec<Outcome> {
    entry
        .pending()
        .map(|(index, recipient)| Outcome {
            index,
            address: recipient.address.clone(),
            outcome: outcome.clone(),
            host: None,
        })
        .collect()
}

/// The message without its `Return-Path` header field (added by our SMTP session for the
/// local copies; the receiving server adds its own).
pub fn without_return_path(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len());
    let mut rest = message;
    let mut skipping = false;
    let mut removed = false;
    while !rest.is_empty() {
        let line_end = memchr::memchr(b'\n', rest).map_or(rest.len(), |p| p + 1);
        let (line, tail) = rest.split_at(line_end);
        if line == b"\r\n" || line == b"\n" {
            // End of the header block: the body follows unchanged.
            out.extend_from_slice(rest);
            return out;
        }
        let continuation = line.first().is_some_and(|&b| b == b' ' || b == b'\t');
        if skipping && continuation {
            rest = tail;
            continue;
        }
        skipping = false;
        if !removed && line.len() >= 12 && line[..12].eq_ignore_ascii_case(b"return-path:") {
            skipping = true;
            removed = true;
            rest = tail;
            continue;
        }
        out.extend_from_slice(line);
        rest = tail;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_path_goes_and_the_rest_stays_byte_exact() {
        let cases: [(&[u8], &[u8]); 4] = [
            (
                b"DKIM-Signature: a\r\n\tb\r\nReturn-Path: <a@b>\r\nReceived: x\r\n\r\nReturn-Path: body\r\n",
                b"DKIM-Signature: a\r\n\tb\r\nReceived: x\r\n\r\nReturn-Path: body\r\n",
            ),
            (
                b"Return-Path: <a@b>\r\n  folded\r\nFrom: a\r\n\r\nhi\r\n",
                b"From: a\r\n\r\nhi\r\n",
            ),
            (b"From: a\r\n\r\nhi\r\n", b"From: a\r\n\r\nhi\r\n"),
            (b"no header block", b"no header block"),
        ];
        for (input, expected) in cases {
            assert_eq!(
                String::from_utf8_lossy(&without_return_path(input)),
                String::from_utf8_lossy(expected)
            );
        }
    }
}
