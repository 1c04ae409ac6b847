//! Tests of the outbound queue and DKIM keys: through `MailStore` (what SMTP, the worker and
//! the admin commands use) and through the state machine (leases, determinism, snapshots).

use kermail_cluster::AppStateMachine;

use super::command::{decode_response, encode_command, BodyV1, Command, CommandV2, Response};
use super::queue::{AttemptVerdict, RecipientResult, RecipientStatus};
use super::*;
use crate::outbound::dkim::DkimAlgorithm;

const PASSWORD: &str = "correct horse battery";

fn message(from: &str, subject: &str) -> Vec<u8> {
    format!(
        "From: {from}\r\nTo: x@remote.example\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n"
    )
    .into_bytes()
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: MailStore,
    alice: AccountId,
    bob: AccountId,
}

impl Fixture {
    async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = MailStore::open_local(dir.path()).unwrap();
        store.add_domain("example.org").await.unwrap();
        let alice = store
            .add_account("alice@example.org", PASSWORD)
            .await
            .unwrap();
        let bob = store
            .add_account("bob@example.org", PASSWORD)
            .await
            .unwrap();
        store
            .add_alias("fwd@example.org", "someone@remote.example")
            .await
            .unwrap();
        Fixture {
            _dir: dir,
            store,
            alice,
            bob,
        }
    }

    fn inbox_len(&self, account: AccountId) -> usize {
        self.store
            .mailbox_by_name(account, "INBOX")
            .unwrap()
            .messages
            .len()
    }

    async fn submit(&self, recipients: &[&str]) -> AcceptReceipt {
        self.store
            .accept(
                Delivery {
                    mail_from: "alice@example.org".into(),
                    recipients: recipients.iter().map(|r| r.to_string()).collect(),
                    body: message("alice@example.org", "hello").into(),
                    received_at: 1_700_000_000,
                },
                Some(self.alice),
            )
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn local_and_remote_recipients_are_one_commit_with_one_body() {
    let fx = Fixture::new().await;
    let accepted = fx
        .submit(&["bob@example.org", "x@remote.example", "y@remote.example"])
        .await;
    assert_eq!(accepted.receipt.delivered.len(), 1);
    assert_eq!(fx.inbox_len(fx.bob), 1);
    let id = accepted.queued.unwrap();
    let entry = fx.store.queue_entry(id).unwrap();
    assert_eq!(entry.mail_from, "alice@example.org");
    assert_eq!(entry.notify.as_deref(), Some("alice@example.org"));
    assert_eq!(
        entry
            .recipients
            .iter()
            .map(|r| r.address.as_str())
            .collect::<Vec<_>>(),
        vec!["x@remote.example", "y@remote.example"]
    );
    assert!(entry
        .recipients
        .iter()
        .all(|r| r.status == RecipientStatus::Pending));
    // One body, two references (bob's copy and the queue entry); the queue is no message.
    let stats = fx.store.stats();
    assert_eq!((stats.blobs, stats.messages), (1, 1));
    assert_eq!(entry.blob, accepted.receipt.blob);
}

#[tokio::test]
async fn the_store_refuses_relaying_and_foreign_senders_itself() {
    let fx = Fixture::new().await;
    // No submitter: a foreign recipient is a relay attempt.
    let refused = fx
        .store
        .accept(
            Delivery {
                mail_from: "a@remote.example".into(),
                recipients: vec!["x@remote.example".into()],
                body: message("a@remote.example", "relay").into(),
                received_at: 0,
            },
            None,
        )
        .await;
    assert!(
        matches!(refused, Err(StoreError::Invalid(_))),
        "{refused:?}"
    );
    // A submitter sending as someone else's address.
    let refused = fx
        .store
        .accept(
            Delivery {
                mail_from: "bob@example.org".into(),
                recipients: vec!["x@remote.example".into()],
                body: message("bob@example.org", "forged").into(),
                received_at: 0,
            },
            Some(fx.alice),
        )
        .await;
    assert!(
        matches!(refused, Err(StoreError::Invalid(_))),
        "{refused:?}"
    );
    assert!(fx.store.queue_entries().is_empty());
    assert_eq!(fx.store.stats().blobs, 0);
}

#[tokio::test]
async fn a_forwarding_alias_queues_with_an_srs_sender_and_no_dsn_target() {
    let fx = Fixture::new().await;
    assert_eq!(
        fx.store.check_recipient("fwd@example.org"),
        RecipientCheck::Local
    );
    let accepted = fx
        .store
        .accept(
            Delivery {
                mail_from: "sender@elsewhere.example".into(),
                recipients: vec!["fwd@example.org".into()],
                body: message("sender@elsewhere.example", "forward me").into(),
                received_at: 0,
            },
            None,
        )
        .await
        .unwrap();
    let entry = fx.store.queue_entry(accepted.queued.unwrap()).unwrap();
    assert!(entry.mail_from.starts_with("SRS0="), "{}", entry.mail_from);
    assert!(entry
        .mail_from
        .ends_with("=elsewhere.example=sender@example.org"));
    assert_eq!(entry.notify, None);
    assert_eq!(entry.recipients[0].address, "someone@remote.example");

    // The destination bounces to the SRS address: the bounce goes back to the original sender.
    let srs_address = entry.mail_from.to_ascii_lowercase();
    assert_eq!(
        fx.store.check_recipient(&srs_address),
        RecipientCheck::SrsBounce
    );
    // Anything but a bounce through it would be relaying.
    let relayed = fx
        .store
        .accept(
            Delivery {
                mail_from: "spammer@evil.example".into(),
                recipients: vec![srs_address.clone()],
                body: message("spammer@evil.example", "spam").into(),
                received_at: 0,
            },
            None,
        )
        .await;
    assert!(relayed.is_err(), "{relayed:?}");
    assert_eq!(fx.store.queue_entries().len(), 1);
    let bounce = fx
        .store
        .accept(
            Delivery {
                mail_from: String::new(),
                recipients: vec![srs_address.clone()],
                body: message("mailer-daemon@remote.example", "bounce").into(),
                received_at: 0,
            },
            None,
        )
        .await
        .unwrap();
    let entry = fx.store.queue_entry(bounce.queued.unwrap()).unwrap();
    assert_eq!(entry.mail_from, "");
    assert_eq!(entry.recipients[0].address, "sender@elsewhere.example");
    // A forged SRS address is unknown.
    let forged = srs_address.replacen("srs0=", "srs0=x", 1);
    assert_eq!(
        fx.store.check_recipient(&forged),
        RecipientCheck::UnknownUser
    );
}

#[tokio::test]
async fn leases_are_exclusive_until_they_expire_and_results_finish_the_entry() {
    let fx = Fixture::new().await;
    let id = fx
        .submit(&["x@remote.example", "y@remote.example"])
        .await
        .queued
        .unwrap();
    let created = fx.store.queue_entry(id).unwrap().created_at_ms;
    let now = created + 10;
    let first = fx
        .store
        .take_leases("node-a", now, 60_000, 10, false)
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].lease.as_ref().unwrap().node, "node-a");
    // Another node at the same time gets nothing; after expiry it takes the entry.
    assert!(fx
        .store
        .take_leases("node-b", now + 1, 60_000, 10, false)
        .await
        .unwrap()
        .is_empty());
    let taken_over = fx
        .store
        .take_leases("node-b", now + 60_000, 60_000, 10, false)
        .await
        .unwrap();
    assert_eq!(taken_over.len(), 1);
    // Reclaiming takes back only one's own lease (node-b restarted), never another node's.
    assert!(fx
        .store
        .take_leases("node-a", now + 60_001, 60_000, 10, true)
        .await
        .unwrap()
        .is_empty());
    let reclaimed = fx
        .store
        .take_leases("node-b", now + 60_001, 60_000, 10, true)
        .await
        .unwrap();
    assert_eq!(reclaimed.len(), 1);
    // node-a's late result still counts for the recipient it finished, but leaves node-b's
    // lease and schedule alone.
    let removed = fx
        .store
        .record_attempt(
            id,
            "node-a",
            vec![RecipientResult {
                index: 0,
                verdict: AttemptVerdict::Delivered,
                reply: "250 2.0.0 ok".into(),
            }],
            now + 999_999,
            false,
            None,
        )
        .await
        .unwrap();
    assert!(!removed);
    let entry = fx.store.queue_entry(id).unwrap();
    assert_eq!(entry.recipients[0].status, RecipientStatus::Delivered);
    assert_eq!(entry.lease.as_ref().unwrap().node, "node-b");
    assert_eq!(entry.attempts, 0);
    // node-b defers y, then fails it permanently with a DSN for alice: the entry goes.
    fx.store
        .record_attempt(
            id,
            "node-b",
            vec![RecipientResult {
                index: 1,
                verdict: AttemptVerdict::Deferred,
                reply: "451 4.0.0 later".into(),
            }],
            now + 120_000,
            false,
            None,
        )
        .await
        .unwrap();
    let entry = fx.store.queue_entry(id).unwrap();
    assert_eq!(
        (entry.attempts, entry.next_attempt_at_ms),
        (1, now + 120_000)
    );
    assert!(entry.lease.is_none());
    // Not due yet: no lease.
    assert!(fx
        .store
        .take_leases("node-b", now + 60_001, 60_000, 10, false)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        fx.store
            .take_leases("node-b", now + 120_000, 60_000, 10, false)
            .await
            .unwrap()
            .len(),
        1
    );
    let inbox_before = fx.inbox_len(fx.alice);
    let removed = fx
        .store
        .record_attempt(
            id,
            "node-b",
            vec![RecipientResult {
                index: 1,
                verdict: AttemptVerdict::Failed,
                reply: "550 5.1.1 no such user".into(),
            }],
            now + 200_000,
            false,
            Some((
                "alice@example.org".into(),
                b"Subject: Undelivered\r\n\r\nDSN\r\n".to_vec(),
            )),
        )
        .await
        .unwrap();
    assert!(removed);
    assert!(fx.store.queue_entry(id).is_none());
    assert_eq!(fx.inbox_len(fx.alice), inbox_before + 1);
    // Only the DSN body remains referenced.
    assert_eq!(fx.store.stats().blobs, 1);
}

#[tokio::test]
async fn retry_and_delete_from_the_admin_side() {
    let fx = Fixture::new().await;
    let id = fx.submit(&["x@remote.example"]).await.queued.unwrap();
    let entry = fx.store.queue_entry(id).unwrap();
    fx.store
        .take_leases("n", entry.created_at_ms, 1_000, 1, false)
        .await
        .unwrap();
    fx.store
        .record_attempt(
            id,
            "n",
            vec![RecipientResult {
                index: 0,
                verdict: AttemptVerdict::Deferred,
                reply: "421 busy".into(),
            }],
            i64::MAX / 2,
            false,
            None,
        )
        .await
        .unwrap();
    fx.store.retry_queue_entry(id).await.unwrap();
    assert!(fx.store.queue_entry(id).unwrap().next_attempt_at_ms < i64::MAX / 2);
    fx.store.delete_queue_entry(id).await.unwrap();
    assert!(fx.store.queue_entry(id).is_none());
    assert_eq!(fx.store.stats().blobs, 0);
    assert!(matches!(
        fx.store.delete_queue_entry(id).await,
        Err(StoreError::NotFound(_))
    ));
}

#[tokio::test]
async fn dkim_keys_generate_rotate_sign_and_remove() {
    let fx = Fixture::new().await;
    let first = fx
        .store
        .generate_dkim_key("example.org", DkimAlgorithm::Ed25519, false)
        .await
        .unwrap();
    assert!(matches!(
        fx.store
            .generate_dkim_key("example.org", DkimAlgorithm::Ed25519, false)
            .await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert!(matches!(
        fx.store
            .generate_dkim_key("nope.example", DkimAlgorithm::Ed25519, false)
            .await,
        Err(StoreError::NotFound(_))
    ));
    let second = fx
        .store
        .generate_dkim_key("example.org", DkimAlgorithm::Ed25519, true)
        .await
        .unwrap();
    assert_ne!(first.selector, second.selector);
    assert!(fx
        .store
        .generate_dkim_key("example.org", DkimAlgorithm::Ed25519, true)
        .await
        .is_err());
    // The oldest signs during the rotation.
    assert_eq!(
        fx.store.dkim_signing_key("example.org").unwrap().selector,
        first.selector
    );
    let accepted = fx.submit(&["bob@example.org", "x@remote.example"]).await;
    assert!(accepted.dkim_signed);
    let body = fx.store.body(accepted.receipt.blob).await.unwrap();
    assert!(body.starts_with(b"DKIM-Signature:"));
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains(&format!("s={}", first.selector)), "{text}");
    fx.store
        .remove_dkim_key("example.org", &first.selector)
        .await
        .unwrap();
    assert_eq!(
        fx.store.dkim_signing_key("example.org").unwrap().selector,
        second.selector
    );
    assert!(matches!(
        fx.store
            .remove_dkim_key("example.org", &first.selector)
            .await,
        Err(StoreError::NotFound(_))
    ));
}

fn body(byte: u8) -> BodyV1 {
    let raw = vec![byte; 100];
    let (blob, compressed) = blob::compress(&raw).unwrap();
    BodyV1 {
        blob,
        raw_size: raw.len() as u32,
        compressed,
    }
}

/// A log mixing mail, queue and lease commands (several nodes proposing at once).
fn queue_log() -> Vec<Vec<u8>> {
    let mut commands: Vec<Command> = vec![
        Command::V1(CommandV1::AddDomain {
            domain: "example.org".into(),
        }),
        Command::V1(CommandV1::AddAccount {
            address: "alice@example.org".into(),
            password_hash: "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo".into(),
            now: 1_700_000_000,
        }),
    ];
    for n in 0..6u8 {
        commands.push(Command::V2(CommandV2::Accept {
            mail_from: "alice@example.org".into(),
            local_recipients: if n % 2 == 0 {
                vec!["alice@example.org".into()]
            } else {
                Vec::new()
            },
            remote: Some(queue::NewQueueEntry {
                mail_from: "alice@example.org".into(),
                notify: Some("alice@example.org".into()),
                recipients: vec![format!("r{n}@remote.example"), "s@remote.example".into()],
                created_at_ms: 1_000 + i64::from(n),
                next_attempt_at_ms: 1_000 + i64::from(n),
            }),
            received_at: 1_700_000_000,
            body: body(n % 3),
        }));
    }
    for (node, now) in [("a", 2_000), ("b", 2_001), ("b", 70_000), ("c", 70_001)] {
        commands.push(Command::V2(CommandV2::TakeLeases {
            node: node.into(),
            now_ms: now,
            expires_at_ms: now + 60_000,
            max_entries: 4,
            reclaim_own: false,
        }));
    }
    commands.push(Command::V2(CommandV2::RecordAttempt {
        id: 1,
        node: "a".into(),
        results: vec![
            RecipientResult {
                index: 0,
                verdict: AttemptVerdict::Delivered,
                reply: "250 ok".into(),
            },
            RecipientResult {
                index: 1,
                verdict: AttemptVerdict::Failed,
                reply: "550 no".into(),
            },
        ],
        next_attempt_at_ms: 0,
        delay_warned: false,
        notice: Some(queue::Notice {
            to: "alice@example.org".into(),
            received_at: 1_700_000_001,
            body: body(9),
        }),
    }));
    commands.push(Command::V2(CommandV2::DeleteQueueEntry { id: 2 }));
    commands
        .iter()
        .map(|c| encode_command(c).unwrap())
        .collect()
}

#[test]
fn queue_commands_apply_identically_and_survive_a_snapshot() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let machines = [
        MailStateMachine::open(dirs[0].path()).unwrap(),
        MailStateMachine::open(dirs[1].path()).unwrap(),
    ];
    let log = queue_log();
    let mut leased = Vec::new();
    for (index, bytes) in log.iter().enumerate() {
        let replies: Vec<Vec<u8>> = machines
            .iter()
            .map(|m| m.apply(index as u64 + 1, bytes))
            .collect();
        assert_eq!(replies[0], replies[1]);
        if let Response::Leased(ids) = decode_response(&replies[0]).unwrap() {
            leased.push(ids);
        }
        assert_eq!(machines[0].read().check_invariants(), Ok(()));
    }
    // a takes the 4 oldest; b at the same time gets the other 2 only; after a's leases
    // expired, b takes the 4 oldest again; c right after gets the other 2.
    assert_eq!(
        leased,
        vec![vec![1, 2, 3, 4], vec![5, 6], vec![1, 2, 3, 4], vec![5, 6]]
    );
    {
        let state = machines[0].read();
        assert_eq!(*state, *machines[1].read());
        // Entry 1 finished (removed) by a's late result; 2 deleted.
        assert_eq!(
            state.outbound.queue.keys().copied().collect::<Vec<_>>(),
            vec![3, 4, 5, 6]
        );
        let mut rebuilt = state.clone();
        rebuilt.rebuild_blobs(|id| state.blobs.get(id).map_or(0, |b| b.stored_size));
        assert_eq!(rebuilt.blobs, state.blobs);
        assert_eq!(rebuilt.totals, state.totals);
    }
    let mut local = Vec::new();
    machines[0].begin_snapshot().write_to(&mut local).unwrap();
    let mut snapshot = Vec::new();
    machines[0]
        .write_transfer(&mut local.as_slice(), &mut snapshot)
        .unwrap();
    let restored_dir = tempfile::tempdir().unwrap();
    let restored = MailStateMachine::open(restored_dir.path()).unwrap();
    super::tests::install(&restored, &machines[0], &snapshot).unwrap();
    assert_eq!(*restored.read(), *machines[0].read());
    assert_eq!(restored.read().stats(), machines[0].read().stats());
    // Every queued body travelled with the snapshot.
    for entry in restored.read().outbound.queue.values() {
        assert!(restored.blobs.contains(&entry.blob));
    }
}

#[test]
fn a_refused_accept_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let machine = MailStateMachine::open(dir.path()).unwrap();
    let log = queue_log();
    machine.apply(1, &log[0]);
    machine.apply(2, &log[1]);
    let before = machine.read().clone();
    // Local recipient unknown: the whole command is refused, queue included.
    let command = Command::V2(CommandV2::Accept {
        mail_from: "alice@example.org".into(),
        local_recipients: vec!["nobody@example.org".into()],
        remote: Some(queue::NewQueueEntry {
            mail_from: "alice@example.org".into(),
            notify: None,
            recipients: vec!["x@remote.example".into()],
            created_at_ms: 1,
            next_attempt_at_ms: 1,
        }),
        received_at: 0,
        body: body(1),
    });
    let reply = decode_response(&machine.apply(3, &encode_command(&command).unwrap())).unwrap();
    assert!(matches!(reply, Response::Refused(_)), "{reply:?}");
    assert_eq!(*machine.read(), before);
}
