//! Admin commands for outbound mail: DKIM keys (`kermail dkim ...`) and the queue
//! (`kermail queue ...`). The clap definitions live here too, so that `main.rs` only routes.

use clap::Subcommand;
use serde::{Deserialize, Serialize};
use tracing::info;

use super::AdminResponse;
use crate::outbound::dkim::{DkimAlgorithm, DkimKeyRecord};
use crate::store::{MailStore, QueueEntry, RecipientStatus};

/// Longest TXT character-string (RFC 1035): longer records are split into several.
const TXT_STRING_BYTES_MAX: usize = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AlgorithmArg {
    Ed25519,
    Rsa,
}

impl From<AlgorithmArg> for DkimAlgorithm {
    fn from(value: AlgorithmArg) -> Self {
        match value {
            AlgorithmArg::Ed25519 => DkimAlgorithm::Ed25519,
            AlgorithmArg::Rsa => DkimAlgorithm::Rsa,
        }
    }
}

/// `kermail dkim ...`
#[derive(Debug, Subcommand)]
pub enum DkimCommand {
    /// Create the DKIM key of a local domain and print the DNS TXT record to publish.
    Generate {
        domain: String,
        #[arg(long, value_enum, default_value = "ed25519")]
        algorithm: AlgorithmArg,
    },
    /// Create the successor of a domain's key (publish its record; it signs once the old key
    /// is removed with `kermail dkim remove`).
    Rotate {
        domain: String,
        #[arg(long, value_enum, default_value = "ed25519")]
        algorithm: AlgorithmArg,
    },
    /// List every key: domain, selector, algorithm, role (signing or next), creation time,
    /// and its DNS record.
    List,
    /// Remove one key of a domain.
    Remove { domain: String, selector: String },
}

/// `kermail queue ...`
#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// One line per entry: id, age, attempts, pending recipients, next attempt, lease.
    List,
    /// An entry's envelope and every recipient's status, attempts and last reply.
    Show { id: u64 },
    /// Try an entry again now.
    Retry { id: u64 },
    /// Drop an entry without delivering it (no DSN).
    Delete { id: u64 },
}

/// The outbound admin requests (one variant of `AdminRequest`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum OutboundRequest {
    DkimGenerate {
        domain: String,
        algorithm: AlgorithmArg,
        rotate: bool,
    },
    DkimList,
    DkimRemove {
        domain: String,
        selector: String,
    },
    QueueList,
    QueueShow {
        id: u64,
    },
    QueueRetry {
        id: u64,
    },
    QueueDelete {
        id: u64,
    },
}

impl From<DkimCommand> for OutboundRequest {
    fn from(command: DkimCommand) -> Self {
        match command {
            DkimCommand::Generate { domain, algorithm } => OutboundRequest::DkimGenerate {
                domain,
                algorithm,
                rotate: false,
            },
            DkimCommand::Rotate { domain, algorithm } => OutboundRequest::DkimGenerate {
                domain,
                algorithm,
                rotate: true,
            },
            DkimCommand::List => OutboundRequest::DkimList,
            DkimCommand::Remove { domain, selector } => {
                OutboundRequest::DkimRemove { domain, selector }
            }
        }
    }
}

impl From<QueueCommand> for OutboundRequest {
    fn from(command: QueueCommand) -> Self {
        match command {
            QueueCommand::List => OutboundRequest::QueueList,
            QueueCommand::Show { id } => OutboundRequest::QueueShow { id },
            QueueCommand::Retry { id } => OutboundRequest::QueueRetry { id },
            QueueCommand::Delete { id } => OutboundRequest::QueueDelete { id },
        }
    }
}

/// The zone-file line of a key's record: `NAME. IN TXT "..." "..."`.
pub fn zone_line(key: &DkimKeyRecord) -> String {
    let record = key.dns_txt_record();
    let strings: Vec<String> = record
        .as_bytes()
        .chunks(TXT_STRING_BYTES_MAX)
        .map(|chunk| format!("\"{}\"", String::from_utf8_lossy(chunk)))
        .collect();
    format!("{}. IN TXT {}", key.dns_name(), strings.join(" "))
}

fn time_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

fn lease_text(entry: &QueueEntry, now_ms: i64) -> String {
    match &entry.lease {
        Some(lease) if lease.expires_at_ms > now_ms => {
            format!("{} until {}", lease.node, time_ms(lease.expires_at_ms))
        }
        Some(lease) => format!("none (expired: {})", lease.node),
        None => "none".to_owned(),
    }
}

fn status_text(status: RecipientStatus) -> &'static str {
    match status {
        RecipientStatus::Pending => "pending",
        RecipientStatus::Delivered => "delivered",
        RecipientStatus::Failed => "failed",
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn error(message: impl std::fmt::Display) -> AdminResponse {
    AdminResponse::Error {
        message: message.to_string(),
    }
}

/// Executes one outbound admin request.
pub async fn handle(request: OutboundRequest, store: &MailStore) -> AdminResponse {
    match request {
        OutboundRequest::DkimGenerate {
            domain,
            algorithm,
            rotate,
        } => {
            let result = store
                .generate_dkim_key(&domain, algorithm.into(), rotate)
                .await;
            info!(%domain, rotate, ok = result.is_ok(), "admin: dkim generate");
            match result {
                Ok(key) => {
                    let mut lines = vec![zone_line(&key)];
                    if rotate {
                        lines.push(format!(
                            "; publish this record; {} keeps signing until you run: kermail dkim remove {} OLD_SELECTOR",
                            key.domain, key.domain
                        ));
                    }
                    AdminResponse::Ok { lines }
                }
                Err(e) => error(e),
            }
        }
        OutboundRequest::DkimList => {
            let keys = store.dkim_keys();
            let mut lines = Vec::with_capacity(keys.len() * 2);
            for (index, key) in keys.iter().enumerate() {
                let signing = index == 0 || keys[index - 1].domain != key.domain;
                let algorithm = match key.algorithm {
                    DkimAlgorithm::Ed25519 => "ed25519",
                    DkimAlgorithm::Rsa => "rsa",
                };
                let created = time_ms(
                    i64::try_from(key.created_at_unix_secs)
                        .unwrap_or(0)
                        .saturating_mul(1000),
                );
                lines.push(format!(
                    "{} {} {algorithm} {} {created}",
                    key.domain,
                    key.selector,
                    if signing { "signing" } else { "next" }
                ));
                lines.push(format!("  {}", zone_line(key)));
            }
            AdminResponse::Ok { lines }
        }
        OutboundRequest::DkimRemove { domain, selector } => {
            let result = store.remove_dkim_key(&domain, &selector).await;
            info!(%domain, %selector, ok = result.is_ok(), "admin: dkim remove");
            match result {
                Ok(()) => AdminResponse::Ok {
                    lines: vec![format!("DKIM key {selector} of {domain} removed")],
                },
                Err(e) => error(e),
            }
        }
        OutboundRequest::QueueList => {
            let now = now_ms();
            let lines = store
                .queue_entries()
                .iter()
                .map(|entry| {
                    let pending = entry.pending().count();
                    format!(
                        "{} from=<{}> recipients={}/{} pending attempts={} next={} lease={} age={}s",
                        entry.id,
                        entry.mail_from,
                        pending,
                        entry.recipients.len(),
                        entry.attempts,
                        time_ms(entry.next_attempt_at_ms),
                        lease_text(entry, now),
                        (now - entry.created_at_ms).max(0) / 1000,
                    )
                })
                .collect();
            AdminResponse::Ok { lines }
        }
        OutboundRequest::QueueShow { id } => {
            let Some(entry) = store.queue_entry(id) else {
                return error(format!("queue entry {id} not found"));
            };
            let now = now_ms();
            let mut lines = vec![
                format!("id: {}", entry.id),
                format!("from: <{}>", entry.mail_from),
                format!(
                    "dsn to: {}",
                    entry.notify.as_deref().unwrap_or("none (sender not local)")
                ),
                format!("size: {}", entry.raw_size),
                format!("queued: {}", time_ms(entry.created_at_ms)),
                format!("attempts: {}", entry.attempts),
                format!("next attempt: {}", time_ms(entry.next_attempt_at_ms)),
                format!("lease: {}", lease_text(&entry, now)),
                format!("delay warning sent: {}", entry.delay_warned),
            ];
            for recipient in &entry.recipients {
                lines.push(format!(
                    "recipient: {} {} attempts={} last={}",
                    recipient.address,
                    status_text(recipient.status),
                    recipient.attempts,
                    recipient.last_reply.as_deref().unwrap_or("-")
                ));
            }
            AdminResponse::Ok { lines }
        }
        OutboundRequest::QueueRetry { id } => {
            let result = store.retry_queue_entry(id).await;
            info!(id, ok = result.is_ok(), "admin: queue retry");
            match result {
                Ok(()) => AdminResponse::Ok {
                    lines: vec![format!("queue entry {id} will be tried now")],
                },
                Err(e) => error(e),
            }
        }
        OutboundRequest::QueueDelete { id } => {
            let result = store.delete_queue_entry(id).await;
            info!(id, ok = result.is_ok(), "admin: queue delete");
            match result {
                Ok(()) => AdminResponse::Ok {
                    lines: vec![format!("queue entry {id} deleted")],
                },
                Err(e) => error(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::AdminRequest;

    #[test]
    fn outbound_requests_travel_inside_admin_requests() {
        for request in [
            OutboundRequest::DkimGenerate {
                domain: "example.org".into(),
                algorithm: AlgorithmArg::Rsa,
                rotate: true,
            },
            OutboundRequest::QueueShow { id: 7 },
            OutboundRequest::DkimList,
        ] {
            let wrapped = AdminRequest::Outbound(request);
            let json = serde_json::to_string(&wrapped).unwrap();
            let back: AdminRequest = serde_json::from_str(&json).unwrap();
            assert_eq!(back, wrapped, "{json}");
        }
    }

    #[test]
    fn long_records_are_split_into_txt_strings() {
        let key = DkimKeyRecord {
            domain: "example.org".into(),
            selector: "k1".into(),
            algorithm: DkimAlgorithm::Rsa,
            private_key_pkcs8_der: Vec::new(),
            public_key_base64: "A".repeat(400),
            created_at_unix_secs: 0,
        };
        let line = zone_line(&key);
        assert!(line.starts_with("k1._domainkey.example.org. IN TXT \"v=DKIM1; k=rsa; p=AAA"));
        assert_eq!(line.matches('"').count(), 4, "{line}");
    }
}
