//! `kermail backup ...` on the node side: start a backup job and report its progress, export
//! the key, restore an account. `list`, `verify`, `prune` and `restore --to` run in the CLI
//! (src/main.rs) with the key, so that they work with no node running; for a `node` target,
//! which only a running node reaches over the mesh, the CLI asks the node to run them
//! ([`BackupRequest::Offline`]).

use serde::{Deserialize, Serialize};

use super::server::AdminContext;
use super::AdminResponse;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "backup_op", rename_all = "snake_case")]
pub enum BackupRequest {
    /// Starts a backup; the answer's only line is the job number.
    Now { target: Option<String> },
    /// One line of JSON: [`crate::backup::ProgressReport`].
    Job { id: u64 },
    /// The backup key in hex (created if the cluster has none yet).
    KeyExport,
    /// `list`, `verify`, `prune` or `restore --to` run by the node (a `node` target).
    Offline {
        target: Option<String>,
        what: OfflineOp,
    },
    /// `kermail restore ID --account ADDRESS [--as ADDRESS2] [--mailbox NAME]`.
    RestoreAccount {
        id: String,
        target: Option<String>,
        account: String,
        as_address: Option<String>,
        mailbox: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "offline_op", rename_all = "snake_case")]
pub enum OfflineOp {
    List,
    Verify {
        id: String,
    },
    Prune,
    RestoreTo {
        id: String,
        folder: std::path::PathBuf,
    },
}

/// Runs a `list`, `verify`, `prune` or `restore --to` against an open target; the lines to
/// print.
pub async fn run_offline(
    target: &dyn crate::backup::Target,
    keys: &crate::backup::Keys,
    config: &crate::backup::BackupConfig,
    target_config: &crate::backup::TargetConfig,
    op: OfflineOp,
    on_body: &(dyn Fn(u64, u64) + Sync),
) -> Result<Vec<String>, String> {
    match op {
        OfflineOp::List => crate::backup::list(target, keys)
            .await
            .map(|m| crate::backup::list_lines(&m)),
        OfflineOp::Verify { id } => crate::backup::verify(target, keys, &id)
            .await
            .map(|l| vec![l]),
        OfflineOp::Prune => {
            crate::backup::prune(target, keys, config.retention, target_config.keep_last)
                .await
                .map(|l| vec![l])
        }
        OfflineOp::RestoreTo { id, folder } => {
            crate::backup::restore_to(target, keys, &id, &folder, on_body)
                .await
                .map(|l| vec![l])
        }
    }
}

pub async fn handle(request: BackupRequest, context: &AdminContext) -> AdminResponse {
    let error = |message: String| AdminResponse::Error { message };
    match request {
        BackupRequest::Now { target } => match context.backup_jobs.start(
            context.store.clone(),
            context.backup_config.clone(),
            target,
            context.node_name.clone(),
            Some(&context.cluster),
        ) {
            Ok(id) => AdminResponse::Ok {
                lines: vec![id.to_string()],
            },
            Err(message) => error(message),
        },
        BackupRequest::Job { id } => match context.backup_jobs.report(id) {
            Some(report) => match serde_json::to_string(&report) {
                Ok(line) => AdminResponse::Ok { lines: vec![line] },
                Err(e) => error(e.to_string()),
            },
            None => error(format!("no backup job {id} on this node")),
        },
        BackupRequest::KeyExport => match context.store.backup_key_or_init().await {
            Ok(key) => {
                tracing::info!("admin: backup key exported");
                AdminResponse::Ok {
                    lines: vec![hex::encode(key.0)],
                }
            }
            Err(e) => error(format!("cannot get the backup key: {e}")),
        },
        BackupRequest::Offline { target, what: op } => {
            let result = async {
                let key = context
                    .store
                    .backup_key()
                    .ok_or("this cluster has no backup key: no backup was ever made")?;
                let keys = crate::backup::Keys::derive(&key.0);
                let target_config = context.backup_config.target(target.as_deref())?;
                let target = crate::backup::target::open(target_config, Some(&context.cluster))
                    .map_err(|e| e.to_string())?;
                tracing::info!(target = %target_config.name, ?op, "admin: backup operation");
                run_offline(
                    target.as_ref(),
                    &keys,
                    &context.backup_config,
                    target_config,
                    op,
                    &|_, _| {},
                )
                .await
            }
            .await;
            match result {
                Ok(lines) => AdminResponse::Ok { lines },
                Err(message) => error(message.to_string()),
            }
        }
        BackupRequest::RestoreAccount {
            id,
            target,
            account,
            as_address,
            mailbox,
        } => {
            let result = async {
                let key = context
                    .store
                    .backup_key()
                    .ok_or("this cluster has no backup key: no backup was ever made")?;
                let keys = crate::backup::Keys::derive(&key.0);
                let target_config = context.backup_config.target(target.as_deref())?;
                let target = crate::backup::target::open(target_config, Some(&context.cluster))
                    .map_err(|e| e.to_string())?;
                crate::backup::restore_account(
                    &context.store,
                    target.as_ref(),
                    &keys,
                    &id,
                    &account,
                    as_address.as_deref(),
                    mailbox.as_deref(),
                )
                .await
            }
            .await;
            match result {
                Ok(line) => AdminResponse::Ok { lines: vec![line] },
                Err(message) => error(message.to_string()),
            }
        }
    }
}
