//! [`MailStore`] methods for user filters (issue 12): running the recipients' Sieve scripts
//! before a delivery is proposed and proposing their results with it (one command), the
//! script operations ManageSieve uses, and the greylisting check SMTP calls at RCPT.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::command::Command;
use super::names;
use super::outbound_api::now_ms;
use super::queue::NewQueueEntry;
use super::sieve_state::{
    flags_from_sieve, CommandV5, FiledCopy, FilteredDelivery, GreylistKey, QueuedReply,
    VacationRecord,
};
use super::{
    prepare_body, unexpected, AccountId, DeliveryReceipt, MailStore, Response, StagedBody,
    StoreError,
};
use crate::sieve::greylist::{self, Decision, GreylistConfig, Known};

/// The special-use folder quarantined mail goes to (created with every account).
const JUNK: &str = "Junk";

/// What the filters need from the node's configuration.
#[derive(Debug, Clone)]
pub struct FilterSettings {
    /// This node's public host name (vacation Message-IDs, rejection notices).
    pub hostname: String,
    pub greylist: GreylistConfig,
    /// SPF, DKIM and DMARC on the MX listener (`[inbound]`); None when off.
    pub inbound: Option<std::sync::Arc<crate::filter::InboundAuth>>,
    /// Spam scoring on the MX listener (`[spam]`); None when off.
    pub spam: Option<std::sync::Arc<crate::filter::SpamFilter>>,
}

impl Default for FilterSettings {
    fn default() -> Self {
        FilterSettings {
            hostname: "localhost".to_owned(),
            greylist: GreylistConfig::default(),
            inbound: None,
            spam: None,
        }
    }
}

/// A script as ManageSieve lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptInfo {
    pub name: String,
    pub active: bool,
}

/// The greylisting answer for one RCPT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GreylistVerdict {
    Pass,
    /// `451 4.7.1`: try again in this many seconds.
    Defer {
        retry_in_secs: u64,
    },
}

/// One account a filtered delivery reaches.
pub(super) struct PlannedAccount {
    account: AccountId,
    account_address: String,
    /// The envelope recipient that reached it.
    rcpt_to: String,
    /// The account's scripts and the active one's name (None: INBOX, as without Sieve).
    scripts: Option<(BTreeMap<String, String>, String)>,
    /// DMARC quarantine: the copy goes to Junk, no script runs.
    quarantine: bool,
}

pub(super) struct Envelope {
    pub mail_from: String,
    /// Envelope recipients of the whole transaction (a rejection is answered at SMTP time
    /// only when there is one).
    pub n_recipients: usize,
    pub received_at: i64,
    pub now_ms: i64,
}

impl MailStore {
    /// The same store with the filters configured (host name, `[greylist]`, `[inbound]`).
    pub fn with_filters(mut self, settings: FilterSettings) -> MailStore {
        self.filters = std::sync::Arc::new(settings);
        self
    }

    /// The filters' configuration.
    pub fn filter_settings(&self) -> &FilterSettings {
        &self.filters
    }

    /// Stores a message that failed DMARC under `p=quarantine`: a copy in the Junk folder of
    /// every local account its recipients reach (INBOX when the account has no Junk), in one
    /// command, like a Sieve delivery. No script runs, and aliases that forward outside do not
    /// forward it (we do not pass on mail its own domain disowns). `250` means committed.
    pub async fn accept_quarantined(
        &self,
        delivery: super::Delivery,
    ) -> Result<DeliveryReceipt, StoreError> {
        let super::Delivery {
            mail_from,
            recipients,
            body,
            received_at,
        } = delivery;
        if recipients.len() > super::state::MAX_RECIPIENTS_PER_DELIVERY {
            return Err(StoreError::Invalid("too many recipients".into()));
        }
        let mut plan: Vec<PlannedAccount> = Vec::new();
        {
            let state = self.state();
            for recipient in &recipients {
                let Ok(address) = names::normalize_address(recipient) else {
                    continue;
                };
                let mut accounts = Vec::new();
                state.expand_recipient(
                    &address,
                    &mut Default::default(),
                    &mut accounts,
                    &mut Default::default(),
                );
                for account in accounts {
                    if plan.iter().any(|p| p.account == account) {
                        continue;
                    }
                    let Some(account_address) =
                        state.accounts.get(&account).map(|a| a.address.clone())
                    else {
                        continue;
                    };
                    plan.push(PlannedAccount {
                        account,
                        account_address,
                        rcpt_to: address.clone(),
                        scripts: None,
                        quarantine: true,
                    });
                }
            }
        }
        if plan.is_empty() {
            return Err(StoreError::NotFound("local recipient".into()));
        }
        let body = body
            .to_vec()
            .map_err(|e| StoreError::Io(format!("cannot read the message body: {e}")))?;
        let accepted = self
            .accept_filtered(
                plan,
                Envelope {
                    mail_from,
                    n_recipients: recipients.len(),
                    received_at,
                    now_ms: now_ms(),
                },
                None,
                body,
            )
            .await?;
        Ok(accepted.receipt)
    }

    async fn submit_v5(&self, command: CommandV5) -> Result<Response, StoreError> {
        self.submit_command(Command::V5(command)).await
    }

    async fn submit_v5_done(&self, command: CommandV5) -> Result<(), StoreError> {
        match self.submit_v5(command).await? {
            Response::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The accounts `local_recipients` reach, when at least one has an active script;
    /// None when no script is involved (the delivery goes on as without Sieve).
    pub(super) fn sieve_plan(&self, local_recipients: &[String]) -> Option<Vec<PlannedAccount>> {
        let state = self.state();
        if state.sieve.scripts.values().all(|s| s.active.is_none()) {
            return None;
        }
        let mut plan: Vec<PlannedAccount> = Vec::new();
        let mut any_script = false;
        for recipient in local_recipients {
            let mut accounts = Vec::new();
            state.expand_recipient(
                recipient,
                &mut Default::default(),
                &mut accounts,
                &mut Default::default(),
            );
            for account in accounts {
                if plan.iter().any(|p| p.account == account) {
                    continue;
                }
                let Some(address) = state.accounts.get(&account).map(|a| a.address.clone()) else {
                    continue;
                };
                let scripts = state.sieve.scripts.get(&account).and_then(|s| {
                    s.active
                        .as_ref()
                        .map(|active| (s.scripts.clone(), active.clone()))
                });
                any_script |= scripts.is_some();
                plan.push(PlannedAccount {
                    account,
                    account_address: address,
                    rcpt_to: recipient.clone(),
                    scripts,
                    quarantine: false,
                });
            }
        }
        any_script.then_some(plan)
    }

    /// Runs the scripts of `plan` and proposes ONE command with the copies, the remote
    /// queue entry, the replies (vacation, rejection notices) and the vacation records.
    pub(super) async fn accept_filtered(
        &self,
        plan: Vec<PlannedAccount>,
        envelope: Envelope,
        remote: Option<NewQueueEntry>,
        body: Vec<u8>,
    ) -> Result<AcceptedFiltered, StoreError> {
        let store = self.clone();
        let hostname = self.filters.hostname.clone();
        let now_ms = envelope.now_ms;
        let mail_from = envelope.mail_from.clone();
        // Scripts are CPU work (bounded by the sieve-rs CPU limit): off the async threads.
        let (body, outcomes) = tokio::task::spawn_blocking(move || {
            let outcomes: Vec<(PlannedAccount, Result<crate::sieve::Verdict, String>)> = plan
                .into_iter()
                .map(|planned| {
                    let result = match &planned.scripts {
                        _ if planned.quarantine => Ok(crate::sieve::Verdict {
                            filings: vec![crate::sieve::Filing {
                                mailbox: JUNK.to_owned(),
                                flags: Vec::new(),
                            }],
                            ..Default::default()
                        }),
                        None => Ok(crate::sieve::Verdict {
                            filings: vec![crate::sieve::Filing {
                                mailbox: names::INBOX.to_owned(),
                                flags: Vec::new(),
                            }],
                            ..Default::default()
                        }),
                        Some((scripts, active)) => {
                            let account = planned.account;
                            let vacation_sent = |id: &str| {
                                store
                                    .state()
                                    .sieve
                                    .vacation
                                    .get(&(account, id.to_owned()), now_ms)
                                    .is_some()
                            };
                            crate::sieve::run(
                                &hostname,
                                &crate::sieve::Message {
                                    raw: &body,
                                    mail_from: &mail_from,
                                    rcpt_to: &planned.rcpt_to,
                                    account_address: &planned.account_address,
                                },
                                scripts,
                                active,
                                &vacation_sent,
                            )
                        }
                    };
                    (planned, result)
                })
                .collect();
            (body, outcomes)
        })
        .await
        .map_err(|e| StoreError::Io(format!("sieve task failed: {e}")))?;

        let mut filed = Vec::new();
        let mut rejected: Vec<(String, String)> = Vec::new();
        let mut vacation_replies = Vec::new();
        let mut vacation = Vec::new();
        for (planned, result) in outcomes {
            let verdict = match result {
                Ok(verdict) => verdict,
                Err(error) => {
                    tracing::warn!(
                        account = %planned.account_address,
                        %error,
                        "sieve script failed: message delivered to INBOX"
                    );
                    filed.push(FiledCopy {
                        account: planned.account,
                        mailbox: names::INBOX.to_owned(),
                        flags: Default::default(),
                    });
                    continue;
                }
            };
            for filing in &verdict.filings {
                filed.push(FiledCopy {
                    account: planned.account,
                    mailbox: filing.mailbox.clone(),
                    flags: flags_from_sieve(&filing.flags),
                });
            }
            if let Some(reason) = verdict.reject {
                tracing::info!(account = %planned.account_address, "sieve rejected a message");
                rejected.push((planned.rcpt_to.clone(), reason));
            }
            if let (Some(reply), Some((id, seconds))) = (verdict.vacation, verdict.vacation_record)
            {
                tracing::info!(account = %planned.account_address, to = %reply.to, "sieve vacation reply");
                vacation_replies.push(reply);
                vacation.push(VacationRecord {
                    account: planned.account,
                    id,
                    expires_at_ms: now_ms.saturating_add(
                        i64::try_from(seconds.saturating_mul(1000)).unwrap_or(i64::MAX),
                    ),
                });
            }
        }

        // A single recipient that rejects: answered at SMTP time (550 5.7.1), nothing kept.
        if filed.is_empty() && remote.is_none() && envelope.n_recipients == 1 {
            if let Some((_, reason)) = rejected.first() {
                return Err(StoreError::Rejected(reason.clone()));
            }
        }

        let mut staged: Vec<StagedBody> = Vec::new();
        let mut replies = Vec::new();
        for reply in vacation_replies {
            let (reply_body, stage) = prepare_body(&self.machine, reply.message).await?;
            staged.push(stage);
            replies.push(QueuedReply {
                body: reply_body,
                entry: null_sender_entry(reply.to, now_ms),
            });
        }
        // Other rejections go back to the sender as a delivery status notification.
        if !rejected.is_empty() && !envelope.mail_from.is_empty() {
            let recipients: Vec<crate::outbound::dsn::DsnRecipient> = rejected
                .iter()
                .map(|(address, reason)| crate::outbound::dsn::DsnRecipient {
                    address: address.clone(),
                    action: crate::outbound::dsn::DsnAction::Failed,
                    status: "5.7.1".to_owned(),
                    diagnostic: Some(format!("550 5.7.1 {}", reason.replace(['\r', '\n'], " "))),
                    remote_mta: None,
                })
                .collect();
            let message_id = format!(
                "{}.{}@{}",
                now_ms,
                hex::encode(rand::random::<[u8; 8]>()),
                self.filters.hostname
            );
            let notice = crate::outbound::dsn::build_dsn(&crate::outbound::dsn::DsnInput {
                reporting_mta: &self.filters.hostname,
                to: &envelope.mail_from,
                recipients: &recipients,
                original_message: &body,
                date_unix_secs: u64::try_from(now_ms / 1000).unwrap_or(0),
                message_id: &message_id,
            })
            .map_err(|e| StoreError::Io(format!("cannot build a rejection notice: {e}")))?;
            let (notice_body, stage) = prepare_body(&self.machine, notice).await?;
            staged.push(stage);
            replies.push(QueuedReply {
                body: notice_body,
                entry: null_sender_entry(envelope.mail_from.clone(), now_ms),
            });
        }

        let needs_body = !filed.is_empty() || remote.is_some();
        let (stored_body, blob) = if needs_body {
            let (stored, stage) = prepare_body(&self.machine, body).await?;
            staged.push(stage);
            let blob = stored.blob;
            (Some(stored), Some(blob))
        } else {
            (None, None)
        };
        let command = CommandV5::Deliver(Box::new(FilteredDelivery {
            mail_from: envelope.mail_from,
            received_at: envelope.received_at,
            now_ms,
            body: stored_body,
            filed,
            remote,
            replies,
            vacation,
        }));
        let result = self.submit_v5(command).await;
        for stage in staged {
            stage.finish().await;
        }
        match result? {
            Response::Accepted { delivered, queued } => Ok(AcceptedFiltered {
                receipt: DeliveryReceipt {
                    blob: blob.unwrap_or(super::BlobId([0; 32])),
                    delivered,
                },
                queued,
            }),
            other => Err(unexpected(other)),
        }
    }

    // ----- scripts (ManageSieve) -----

    /// The account's scripts, by name.
    pub fn list_scripts(&self, account: AccountId) -> Vec<ScriptInfo> {
        let state = self.state();
        let Some(scripts) = state.sieve.scripts.get(&account) else {
            return Vec::new();
        };
        scripts
            .scripts
            .keys()
            .map(|name| ScriptInfo {
                name: name.clone(),
                active: scripts.active.as_deref() == Some(name.as_str()),
            })
            .collect()
    }

    pub fn get_script(&self, account: AccountId, name: &str) -> Option<String> {
        self.state()
            .sieve
            .scripts
            .get(&account)
            .and_then(|s| s.scripts.get(name).cloned())
    }

    /// Whether one more script of `size_bytes` named `name` fits (HAVESPACE).
    pub fn script_fits(&self, account: AccountId, name: &str, size_bytes: u64) -> bool {
        if size_bytes > crate::sieve::MAX_SCRIPT_BYTES as u64 {
            return false;
        }
        let state = self.state();
        state.sieve.scripts.get(&account).is_none_or(|s| {
            s.scripts.contains_key(name) || s.scripts.len() < crate::sieve::MAX_SCRIPTS_PER_ACCOUNT
        })
    }

    /// Stores a script after compiling it (a script that does not compile is refused with
    /// [`StoreError::Invalid`] carrying "line N: ...").
    pub async fn put_script(
        &self,
        account: AccountId,
        name: &str,
        source: &str,
    ) -> Result<(), StoreError> {
        crate::sieve::check_script_name(name).map_err(StoreError::Invalid)?;
        crate::sieve::compile(source.as_bytes())
            .map_err(|failure| StoreError::Invalid(failure.to_string()))?;
        self.submit_v5_done(CommandV5::PutScript {
            account,
            name: name.to_owned(),
            source: source.to_owned(),
        })
        .await
    }

    pub async fn delete_script(&self, account: AccountId, name: &str) -> Result<(), StoreError> {
        self.submit_v5_done(CommandV5::DeleteScript {
            account,
            name: name.to_owned(),
        })
        .await
    }

    pub async fn rename_script(
        &self,
        account: AccountId,
        from: &str,
        to: &str,
    ) -> Result<(), StoreError> {
        self.submit_v5_done(CommandV5::RenameScript {
            account,
            from: from.to_owned(),
            to: to.to_owned(),
        })
        .await
    }

    /// Activates `name`; None (an empty name in ManageSieve) deactivates.
    pub async fn set_active_script(
        &self,
        account: AccountId,
        name: Option<&str>,
    ) -> Result<(), StoreError> {
        self.submit_v5_done(CommandV5::SetActive {
            account,
            name: name.map(str::to_owned),
        })
        .await
    }

    // ----- greylisting -----

    /// Whether greylisting is on.
    pub fn greylisting(&self) -> bool {
        self.filters.greylist.enabled
    }

    /// The greylisting check of one RCPT from an unauthenticated `client`: reads the
    /// replicated record and decides; a record to keep (first attempt, or the retry that
    /// passes) is proposed in the background, with its times chosen here. The RCPT is
    /// answered at once either way: a lost record only means one more 451 later.
    pub fn greylist_check(
        &self,
        client: IpAddr,
        mail_from: &str,
        recipient: &str,
    ) -> GreylistVerdict {
        let config = &self.filters.greylist;
        if !config.enabled || config.skips(client) {
            return GreylistVerdict::Pass;
        }
        // A sender domain that passed DMARC before: not greylisted at RCPT; if this message
        // then fails DMARC, `greylist_after_checks` greylists it at the end of DATA.
        if self.greylist_trusts(mail_from) {
            return GreylistVerdict::Pass;
        }
        self.greylist_triplet(client, mail_from, recipient)
    }

    /// The key under which a sender domain that passed DMARC is remembered (beside the
    /// triplets, with the same expiry): its organisational domain.
    fn greylist_trust_key(mail_from: &str) -> Option<GreylistKey> {
        let domain = mail_from.rsplit_once('@')?.1.trim_end_matches('.');
        if domain.is_empty() {
            return None;
        }
        let domain = domain.to_ascii_lowercase();
        Some(GreylistKey {
            network: "dmarc-pass".to_owned(),
            sender: crate::filter::inbound::organizational_domain(&domain).to_owned(),
            recipient: String::new(),
        })
    }

    fn greylist_trusts(&self, mail_from: &str) -> bool {
        Self::greylist_trust_key(mail_from).is_some_and(|key| {
            self.state()
                .sieve
                .greylist
                .get(&key, now_ms())
                .is_some_and(|entry| entry.passed)
        })
    }

    /// After the inbound checks of an MX message (`dmarc_pass`: its DMARC verdict): a pass
    /// remembers the envelope sender's domain (committed before answering, so the next
    /// message finds it), a failure from a domain remembered before, which skipped
    /// greylisting at RCPT, gets its triplets decided now. `Some(seconds)`: answer `451 4.7.1`.
    pub async fn greylist_after_checks(
        &self,
        client: IpAddr,
        mail_from: &str,
        recipients: &[String],
        dmarc_pass: bool,
    ) -> Option<u64> {
        let config = &self.filters.greylist;
        if !config.enabled || config.skips(client) {
            return None;
        }
        if dmarc_pass {
            if !self.greylist_trusts(mail_from) {
                if let Some(key) = Self::greylist_trust_key(mail_from) {
                    let now = now_ms();
                    let lifetime_ms = i64::try_from(
                        config
                            .whitelist_days
                            .saturating_mul(86_400)
                            .saturating_mul(1000),
                    )
                    .unwrap_or(i64::MAX);
                    let command = CommandV5::GreylistPassed {
                        key,
                        now_ms: now,
                        expires_at_ms: now.saturating_add(lifetime_ms),
                    };
                    if let Err(error) = self.submit_v5(command).await {
                        tracing::warn!(%error, "cannot record a DMARC-passing sender domain");
                    }
                }
            }
            return None;
        }
        if !self.greylist_trusts(mail_from) {
            return None;
        }
        recipients
            .iter()
            .filter_map(
                |recipient| match self.greylist_triplet(client, mail_from, recipient) {
                    GreylistVerdict::Pass => None,
                    GreylistVerdict::Defer { retry_in_secs } => Some(retry_in_secs),
                },
            )
            .max()
    }

    /// The triplet's decision (and its record, proposed in the background).
    fn greylist_triplet(
        &self,
        client: IpAddr,
        mail_from: &str,
        recipient: &str,
    ) -> GreylistVerdict {
        let config = &self.filters.greylist;
        let key = GreylistKey {
            network: greylist::network_of(client),
            sender: mail_from.to_ascii_lowercase(),
            recipient: recipient.to_ascii_lowercase(),
        };
        let now = now_ms();
        let known = self
            .state()
            .sieve
            .greylist
            .get(&key, now)
            .map(|entry| Known {
                first_seen_ms: entry.first_seen_ms,
                passed: entry.passed,
            });
        let secs_ms = |secs: u64| i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        let (verdict, command) = match greylist::decide(known, now, config) {
            Decision::Pass => (GreylistVerdict::Pass, None),
            Decision::PassAndWhitelist => (
                GreylistVerdict::Pass,
                Some(CommandV5::GreylistPassed {
                    key,
                    now_ms: now,
                    expires_at_ms: now
                        .saturating_add(secs_ms(config.whitelist_days.saturating_mul(86_400))),
                }),
            ),
            Decision::DeferAndRecord => (
                GreylistVerdict::Defer {
                    retry_in_secs: config.delay_secs,
                },
                Some(CommandV5::GreylistSeen {
                    key,
                    now_ms: now,
                    expires_at_ms: now.saturating_add(secs_ms(config.retry_window_secs)),
                }),
            ),
            Decision::Defer { retry_in_secs } => (GreylistVerdict::Defer { retry_in_secs }, None),
        };
        if let Some(command) = command {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let store = self.clone();
                runtime.spawn(async move {
                    if let Err(error) = store.submit_v5(command).await {
                        tracing::warn!(%error, "cannot record a greylisting triplet");
                    }
                });
            }
        }
        verdict
    }
}

/// What a filtered delivery became.
pub(super) struct AcceptedFiltered {
    pub receipt: DeliveryReceipt,
    pub queued: Option<super::QueueId>,
}

fn null_sender_entry(to: String, now_ms: i64) -> NewQueueEntry {
    NewQueueEntry {
        mail_from: String::new(),
        notify: None,
        recipients: vec![to],
        created_at_ms: now_ms,
        next_attempt_at_ms: now_ms,
    }
}
