//! Shared by the store targets: a state machine in a temporary folder, and the encoded
//! commands of a realistic setup (recorded from `MailStore` calls, so they are exactly what a
//! node proposes).

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use kermail::store::{
    BoxFuture, Delivery, Flag, FlagOp, FlagSet, MailStateMachine, MailStore, Propose, StoreError,
};
use kermail_cluster::AppStateMachine;

/// Applies every proposed command to its machine at once, and keeps the bytes.
struct Recorder {
    machine: Arc<MailStateMachine>,
    log: Mutex<Vec<Vec<u8>>>,
}

impl Propose for Recorder {
    fn propose(&self, command: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, StoreError>> {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.push(command.clone());
        let response = self.machine.apply(log.len() as u64, &command);
        Box::pin(async move { Ok(response) })
    }
}

fn message(subject: &str) -> Vec<u8> {
    format!(
        "From: carol@example.net\r\nTo: alice@example.org\r\nSubject: {subject}\r\n\r\nHello.\r\n"
    )
    .into_bytes()
}

/// The encoded commands of a small but complete state: a domain, two accounts, an alias,
/// mailboxes, delivered and appended messages, flags, a copy, a move and an expunge.
pub fn setup_commands(dir: &Path) -> Vec<Vec<u8>> {
    let machine = MailStateMachine::open(dir).expect("state machine");
    let recorder = Arc::new(Recorder {
        machine: machine.clone(),
        log: Mutex::new(Vec::new()),
    });
    let store = MailStore::new(machine, recorder.clone());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        store.add_domain("example.org").await.expect("domain");
        let alice = store
            .add_account("alice@example.org", "correct horse battery")
            .await
            .expect("alice");
        store
            .add_account("bob@example.org", "correct horse battery")
            .await
            .expect("bob");
        store
            .add_alias("postmaster@example.org", "alice@example.org")
            .await
            .expect("alias");
        for i in 0..3 {
            store
                .deliver(Delivery {
                    mail_from: "carol@example.net".into(),
                    recipients: vec!["alice@example.org".into(), "bob@example.org".into()],
                    body: message(&format!("m{i}")).into(),
                    received_at: 1_700_000_000 + i,
                })
                .await
                .expect("delivery");
        }
        let inbox = store.mailbox_by_name(alice, "INBOX").expect("inbox").id;
        let work = store
            .create_mailbox(alice, "Work", None)
            .await
            .expect("mailbox");
        let flags: FlagSet = [Flag::Seen, Flag::Keyword("$Label1".into())].into();
        store
            .append(
                alice,
                work,
                flags.clone(),
                1_700_000_100,
                60,
                message("appended"),
            )
            .await
            .expect("append");
        store
            .store_flags(alice, inbox, vec![1, 2], FlagOp::Add, flags)
            .await
            .expect("flags");
        store.copy(alice, inbox, vec![1], work).await.expect("copy");
        store
            .move_messages(alice, inbox, vec![2], work)
            .await
            .expect("move");
        store
            .store_flags(
                alice,
                work,
                vec![2],
                FlagOp::Replace,
                [Flag::Deleted].into(),
            )
            .await
            .expect("flags");
        store.expunge(alice, work, None).await.expect("expunge");
        store
            .rename_mailbox(alice, "Work", "Projects/2023")
            .await
            .expect("rename");
        store
            .set_subscribed(alice, "Projects/2023", true)
            .await
            .expect("subscribe");
    });
    let log = recorder
        .log
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    log
}

/// The machine's state as the snapshot bytes a follower receives (state and every body
/// inlined: the node's own snapshot holds references, turned into this by `write_transfer`).
pub fn snapshot(machine: &MailStateMachine) -> Vec<u8> {
    let mut local = Vec::new();
    machine
        .begin_snapshot()
        .write_to(&mut local)
        .expect("snapshot of a live state");
    let mut bytes = Vec::new();
    machine
        .write_transfer(&mut local.as_slice(), &mut bytes)
        .expect("transfer of a live state");
    bytes
}

/// Writes `files` into the folder named by `KERMAIL_FUZZ_WRITE_SEEDS`, if set (to refresh
/// `fuzz/seeds/`).
pub fn maybe_write_seeds(target: &str, files: &[(String, Vec<u8>)]) {
    let Some(root) = std::env::var_os("KERMAIL_FUZZ_WRITE_SEEDS") else {
        return;
    };
    let dir = Path::new(&root).join(target);
    std::fs::create_dir_all(&dir).expect("seed folder");
    for (name, bytes) in files {
        let mut file = std::fs::File::create(dir.join(name)).expect("seed file");
        file.write_all(bytes).expect("seed bytes");
    }
}
