//! Store tests: through `open_local` (the API SMTP and IMAP use) and through the state machine
//! directly (determinism, snapshots, timing).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use kermail_cluster::AppStateMachine;

use super::command::{encode_command, BodyV1, Command, CommandV1};
use super::*;

const PASSWORD: &str = "correct horse battery";

fn flags(list: &[Flag]) -> FlagSet {
    list.iter().cloned().collect()
}

fn message(subject: &str) -> Vec<u8> {
    format!("From: a@example.net\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n").into_bytes()
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: MailStore,
}

impl Fixture {
    async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = MailStore::open_local(dir.path()).unwrap();
        store.add_domain("example.org").await.unwrap();
        Fixture { _dir: dir, store }
    }

    async fn account(&self, address: &str) -> AccountId {
        self.store.add_account(address, PASSWORD).await.unwrap()
    }

    fn mailbox(&self, account: AccountId, name: &str) -> MailboxView {
        self.store.mailbox_by_name(account, name).unwrap()
    }

    async fn deliver(&self, recipients: &[&str], body: Vec<u8>) -> DeliveryReceipt {
        self.store
            .deliver(Delivery {
                mail_from: "a@example.net".into(),
                recipients: recipients.iter().map(|r| r.to_string()).collect(),
                body: body.into(),
                received_at: 1_700_000_000,
            })
            .await
            .unwrap()
    }

    fn blob_files(&self) -> usize {
        self.store.machine.blobs.disk_stats().bodies
    }
}

fn uids(view: &MailboxView) -> Vec<Uid> {
    view.messages.iter().map(|m| m.uid).collect()
}

#[tokio::test]
async fn domains_accounts_and_passwords() {
    let fx = Fixture::new().await;
    let store = &fx.store;
    assert_eq!(
        store.add_domain("Example.org").await,
        Err(StoreError::AlreadyExists("domain example.org".into()))
    );
    assert!(matches!(
        store.add_domain("bad_domain").await,
        Err(StoreError::Invalid(_))
    ));
    assert!(store.is_local_domain("EXAMPLE.ORG"));
    assert!(!store.is_local_domain("example.net"));

    assert_eq!(
        store.add_account("alice@example.org", "short").await,
        Err(StoreError::Invalid(
            "password must be at least 10 characters".into()
        ))
    );
    assert_eq!(
        store.add_account("bob@unknown.org", PASSWORD).await,
        Err(StoreError::NotFound("domain unknown.org".into()))
    );
    let alice = store
        .add_account("Alice@Example.org", PASSWORD)
        .await
        .unwrap();
    assert_eq!(
        store.add_account("alice@example.org", PASSWORD).await,
        Err(StoreError::AlreadyExists(
            "account alice@example.org".into()
        ))
    );
    assert_eq!(
        store.account_address(alice).as_deref(),
        Some("alice@example.org")
    );
    assert_eq!(
        store.authenticate("ALICE@example.org", PASSWORD).await,
        Some(alice)
    );
    assert_eq!(
        store
            .authenticate("alice@example.org", "wrong password!")
            .await,
        None
    );
    assert_eq!(
        store.authenticate("nobody@example.org", PASSWORD).await,
        None
    );

    store
        .set_password("alice@example.org", "another long one")
        .await
        .unwrap();
    assert_eq!(
        store.authenticate("alice@example.org", PASSWORD).await,
        None
    );
    assert_eq!(
        store
            .authenticate("alice@example.org", "another long one")
            .await,
        Some(alice)
    );
    assert!(store
        .set_password("alice@example.org", "short")
        .await
        .is_err());

    // Every account starts with the six special mailboxes, subscribed.
    let names: Vec<(String, Option<SpecialUse>)> = store
        .list_mailboxes(alice)
        .into_iter()
        .map(|m| (m.name, m.special_use))
        .collect();
    assert_eq!(
        names,
        vec![
            ("Archive".into(), Some(SpecialUse::Archive)),
            ("Drafts".into(), Some(SpecialUse::Drafts)),
            ("INBOX".into(), None),
            ("Junk".into(), Some(SpecialUse::Junk)),
            ("Sent".into(), Some(SpecialUse::Sent)),
            ("Trash".into(), Some(SpecialUse::Trash)),
        ]
    );
    assert_eq!(store.subscriptions(alice).len(), 6);

    store.add_domain("example.com").await.unwrap();
    let carol = store
        .add_account("carol@example.com", PASSWORD)
        .await
        .unwrap();
    let listed: Vec<String> = store
        .list_accounts(Some("example.com"))
        .into_iter()
        .map(|a| a.address)
        .collect();
    assert_eq!(listed, vec!["carol@example.com".to_string()]);
    assert_eq!(store.list_accounts(None).len(), 2);
    assert_eq!(store.list_domains(), vec!["example.com", "example.org"]);

    // A domain with accounts cannot go.
    assert!(matches!(
        store.remove_domain("example.com").await,
        Err(StoreError::Invalid(_))
    ));
    store.remove_account("carol@example.com").await.unwrap();
    assert_eq!(store.account_address(carol), None);
    assert_eq!(
        store.remove_account("carol@example.com").await,
        Err(StoreError::NotFound("account carol@example.com".into()))
    );
    store.remove_domain("example.com").await.unwrap();
    assert_eq!(store.list_domains(), vec!["example.org"]);
}

#[tokio::test]
async fn recipients_and_alias_expansion() {
    let fx = Fixture::new().await;
    let store = &fx.store;
    let alice = fx.account("alice@example.org").await;
    let bob = fx.account("bob@example.org").await;
    store
        .add_alias("team@example.org", "alice@example.org")
        .await
        .unwrap();
    store
        .add_alias("team@example.org", "bob@example.org")
        .await
        .unwrap();
    store
        .add_alias("team@example.org", "friend@example.net")
        .await
        .unwrap();
    store
        .add_alias("all@example.org", "team@example.org")
        .await
        .unwrap();
    store
        .add_alias("all@example.org", "alice@example.org")
        .await
        .unwrap();
    // A loop must not hang delivery.
    store
        .add_alias("loop1@example.org", "loop2@example.org")
        .await
        .unwrap();
    store
        .add_alias("loop2@example.org", "loop1@example.org")
        .await
        .unwrap();
    assert_eq!(
        store.add_alias("team@example.org", "bob@example.org").await,
        Err(StoreError::AlreadyExists(
            "alias team@example.org -> bob@example.org".into()
        ))
    );
    assert_eq!(
        store.add_alias("x@elsewhere.org", "bob@example.org").await,
        Err(StoreError::NotFound("domain elsewhere.org".into()))
    );

    assert_eq!(
        store.check_recipient("Alice@example.org"),
        RecipientCheck::Local
    );
    assert_eq!(
        store.check_recipient("team@example.org"),
        RecipientCheck::Local
    );
    assert_eq!(
        store.check_recipient("nobody@example.org"),
        RecipientCheck::UnknownUser
    );
    assert_eq!(
        store.check_recipient("someone@example.net"),
        RecipientCheck::ForeignDomain
    );
    assert_eq!(
        store.check_recipient("no-at-sign"),
        RecipientCheck::UnknownUser
    );

    // alice is reached three ways, bob twice: each account gets the message once.
    let receipt = fx
        .deliver(
            &[
                "all@example.org",
                "alice@example.org",
                "team@example.org",
                "loop1@example.org",
            ],
            message("hello"),
        )
        .await;
    let accounts: Vec<AccountId> = receipt.delivered.iter().map(|d| d.0).collect();
    assert_eq!(accounts, vec![alice, bob]);
    assert_eq!(uids(&fx.mailbox(alice, "INBOX")), vec![1]);
    assert_eq!(uids(&fx.mailbox(bob, "inbox")), vec![1]);

    // Only foreign or loop targets: nothing to deliver, nothing stored.
    let refused = store
        .deliver(Delivery {
            mail_from: String::new(),
            recipients: vec!["loop1@example.org".into()],
            body: message("lost").into(),
            received_at: 1,
        })
        .await;
    assert_eq!(refused, Err(StoreError::NotFound("local recipient".into())));
    assert_eq!(store.stats().blobs, 1);
    assert_eq!(fx.blob_files(), 1);

    let team: Vec<String> = store
        .list_aliases(Some("example.org"))
        .into_iter()
        .filter(|a| a.source == "team@example.org")
        .map(|a| a.target)
        .collect();
    assert_eq!(
        team,
        vec!["alice@example.org", "bob@example.org", "friend@example.net"]
    );
    store
        .remove_alias("team@example.org", "bob@example.org")
        .await
        .unwrap();
    assert!(store
        .remove_alias("team@example.org", "bob@example.org")
        .await
        .is_err());
    assert!(matches!(
        store.remove_domain("example.org").await,
        Err(StoreError::Invalid(_))
    ));
}

#[tokio::test]
async fn delivered_body_reads_back_byte_exact() {
    let fx = Fixture::new().await;
    let alice = fx.account("alice@example.org").await;
    let body = message("exact");
    let receipt = fx.deliver(&["alice@example.org"], body.clone()).await;
    let inbox = fx.mailbox(alice, "INBOX");
    let meta = &inbox.messages[0];
    assert_eq!(meta.blob, receipt.blob);
    assert_eq!(meta.size as usize, body.len());
    assert_eq!(meta.internal_date, 1_700_000_000);
    assert_eq!(*fx.store.body(meta.blob).await.unwrap(), body);
    // The second read comes from the cache and is the same.
    assert_eq!(*fx.store.body(meta.blob).await.unwrap(), body);
    assert_eq!(
        fx.store.body(BlobId([7; 32])).await,
        Err(StoreError::NotFound("message body".into()))
    );
    let stats = fx.store.stats();
    assert_eq!(stats.messages, 1);
    assert_eq!(stats.blob_bytes_raw, body.len() as u64);
    assert!(stats.blob_bytes_stored > 0);

    // Expunged while a session still shows it: served from the cache, the file is gone.
    fx.store
        .store_flags(
            alice,
            inbox.id,
            vec![1],
            FlagOp::Add,
            flags(&[Flag::Deleted]),
        )
        .await
        .unwrap();
    fx.store.expunge(alice, inbox.id, None).await.unwrap();
    assert_eq!(fx.blob_files(), 0);
    assert_eq!(*fx.store.body(meta.blob).await.unwrap(), body);
}

#[tokio::test]
async fn mailbox_create_delete_subscribe() {
    let fx = Fixture::new().await;
    let store = &fx.store;
    let alice = fx.account("alice@example.org").await;
    let work = store
        .create_mailbox(alice, "Work/2024/Q1", None)
        .await
        .unwrap();
    // Parents are created too.
    assert!(store.mailbox_by_name(alice, "Work").is_some());
    assert_eq!(
        store.mailbox_by_name(alice, "Work/2024/Q1").unwrap().id,
        work
    );
    assert_eq!(
        store.create_mailbox(alice, "Work", None).await,
        Err(StoreError::AlreadyExists("mailbox \"Work\"".into()))
    );
    assert!(matches!(
        store.create_mailbox(alice, "inbox", None).await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert!(matches!(
        store.create_mailbox(alice, "a//b", None).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        store.delete_mailbox(alice, "INBOX").await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(
        store.delete_mailbox(alice, "Nope").await,
        Err(StoreError::NotFound("mailbox \"Nope\"".into()))
    );

    // UIDVALIDITY changes when a mailbox is deleted and created again.
    let first = store.mailbox_view(alice, work).unwrap().uidvalidity;
    store.delete_mailbox(alice, "Work/2024/Q1").await.unwrap();
    assert!(store.mailbox_view(alice, work).is_none());
    let again = store
        .create_mailbox(alice, "Work/2024/Q1", None)
        .await
        .unwrap();
    assert_ne!(again, work);
    assert!(store.mailbox_view(alice, again).unwrap().uidvalidity > first);

    store.set_subscribed(alice, "Work", true).await.unwrap();
    store
        .set_subscribed(alice, "Not/There", true)
        .await
        .unwrap();
    store.set_subscribed(alice, "Junk", false).await.unwrap();
    let subscriptions = store.subscriptions(alice);
    assert!(subscriptions.contains(&"Not/There".to_string()));
    assert!(!subscriptions.contains(&"Junk".to_string()));
    let listed = store.list_mailboxes(alice);
    assert!(listed.iter().any(|m| m.name == "Work" && m.subscribed));
    assert!(listed.iter().any(|m| m.name == "Junk" && !m.subscribed));
}

#[tokio::test]
async fn rename_moves_children_and_inbox_rename_leaves_inbox() {
    let fx = Fixture::new().await;
    let store = &fx.store;
    let alice = fx.account("alice@example.org").await;
    let a = store.create_mailbox(alice, "A", None).await.unwrap();
    let ab = store.create_mailbox(alice, "A/B", None).await.unwrap();
    let validity = store.mailbox_view(alice, a).unwrap().uidvalidity;
    store.rename_mailbox(alice, "A", "X/Y").await.unwrap();
    assert!(store.mailbox_by_name(alice, "A").is_none());
    assert_eq!(store.mailbox_by_name(alice, "X/Y").unwrap().id, a);
    assert_eq!(store.mailbox_by_name(alice, "X/Y/B").unwrap().id, ab);
    assert!(store.mailbox_by_name(alice, "X").is_some());
    assert_eq!(store.mailbox_view(alice, a).unwrap().uidvalidity, validity);
    assert!(matches!(
        store.rename_mailbox(alice, "X/Y", "Sent").await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert!(matches!(
        store.rename_mailbox(alice, "X", "X/Z").await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        store.rename_mailbox(alice, "Nope", "Z").await,
        Err(StoreError::NotFound(_))
    ));

    // Renaming INBOX: messages move, INBOX stays (empty, same UIDVALIDITY, UIDs not reused).
    fx.deliver(&["alice@example.org"], message("one")).await;
    fx.deliver(&["alice@example.org"], message("two")).await;
    let inbox = fx.mailbox(alice, "INBOX");
    store
        .rename_mailbox(alice, "inbox", "Old mail")
        .await
        .unwrap();
    let old = fx.mailbox(alice, "Old mail");
    assert_eq!(uids(&old), vec![1, 2]);
    assert_ne!(old.uidvalidity, inbox.uidvalidity);
    let after = fx.mailbox(alice, "INBOX");
    assert_eq!(after.id, inbox.id);
    assert!(after.messages.is_empty());
    assert_eq!(after.uidvalidity, inbox.uidvalidity);
    let receipt = fx.deliver(&["alice@example.org"], message("three")).await;
    assert_eq!(receipt.delivered[0].2, 3);
}

#[tokio::test]
async fn append_store_expunge() {
    let fx = Fixture::new().await;
    let store = &fx.store;
    let alice = fx.account("alice@example.org").await;
    let drafts = fx.mailbox(alice, "Drafts");
    let mut appended = Vec::new();
    for n in 0..4 {
        let (validity, uid) = store
            .append(
                alice,
                drafts.id,
                flags(&[Flag::Draft, Flag::Keyword("$Work".into())]),
                1_600_000_000 + n,
                120,
                message(&format!("draft {n}")),
            )
            .await
            .unwrap();
        assert_eq!(validity, drafts.uidvalidity);
        appended.push(uid);
    }
    assert_eq!(appended, vec![1, 2, 3, 4]);
    let view = store.mailbox_view(alice, drafts.id).unwrap();
    assert_eq!(view.messages[0].internal_date_offset_min, 120);
    assert_eq!(view.uidnext, 5);

    // A keyword keeps its first spelling.
    let changed = store
        .store_flags(
            alice,
            drafts.id,
            vec![2, 3, 99],
            FlagOp::Add,
            flags(&[Flag::Deleted, Flag::Keyword("$work".into())]),
        )
        .await
        .unwrap();
    let expected = flags(&[Flag::Draft, Flag::Deleted, Flag::Keyword("$Work".into())]);
    assert_eq!(changed, vec![(2, expected.clone()), (3, expected)]);
    let counter = store.mailbox_view(alice, drafts.id).unwrap().change_counter;
    store
        .store_flags(
            alice,
            drafts.id,
            vec![4],
            FlagOp::Replace,
            flags(&[Flag::Seen]),
        )
        .await
        .unwrap();
    assert!(store.mailbox_view(alice, drafts.id).unwrap().change_counter > counter);
    let removed = store
        .store_flags(
            alice,
            drafts.id,
            vec![4],
            FlagOp::Remove,
            flags(&[Flag::Seen]),
        )
        .await
        .unwrap();
    assert_eq!(removed, vec![(4, FlagSet::new())]);

    // UID EXPUNGE limits to the given UIDs; only \Deleted messages go.
    assert_eq!(
        store
            .expunge(alice, drafts.id, Some(vec![1, 2]))
            .await
            .unwrap(),
        vec![2]
    );
    assert_eq!(
        store.expunge(alice, drafts.id, None).await.unwrap(),
        vec![3]
    );
    assert_eq!(
        store.expunge(alice, drafts.id, None).await.unwrap(),
        Vec::<Uid>::new()
    );
    assert_eq!(
        uids(&store.mailbox_view(alice, drafts.id).unwrap()),
        vec![1, 4]
    );

    assert!(matches!(
        store
            .append(alice, 999_999, FlagSet::new(), 0, 0, message("x"))
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store
            .store_flags(
                alice,
                drafts.id,
                vec![1],
                FlagOp::Add,
                flags(&[Flag::Keyword("bad word".into())])
            )
            .await,
        Err(StoreError::Invalid(_))
    ));
}

#[tokio::test]
async fn copy_and_move_give_dense_increasing_uids() {
    let fx = Fixture::new().await;
    let store = &fx.store;
    let alice = fx.account("alice@example.org").await;
    for n in 0..5 {
        fx.deliver(&["alice@example.org"], message(&format!("m{n}")))
            .await;
    }
    let inbox = fx.mailbox(alice, "INBOX");
    let archive = fx.mailbox(alice, "Archive");
    store
        .store_flags(
            alice,
            inbox.id,
            vec![2],
            FlagOp::Add,
            flags(&[Flag::Flagged]),
        )
        .await
        .unwrap();

    let (validity, pairs) = store
        .copy(alice, inbox.id, vec![4, 2, 9], archive.id)
        .await
        .unwrap();
    assert_eq!(validity, archive.uidvalidity);
    assert_eq!(pairs, vec![(2, 1), (4, 2)]);
    let copied = store.mailbox_view(alice, archive.id).unwrap();
    assert!(copied.messages[0].flags.contains(&Flag::Flagged));
    assert_eq!(uids(&fx.mailbox(alice, "INBOX")), vec![1, 2, 3, 4, 5]);

    let (_, pairs) = store
        .move_messages(alice, inbox.id, vec![1, 3, 5], archive.id)
        .await
        .unwrap();
    assert_eq!(pairs, vec![(1, 3), (3, 4), (5, 5)]);
    assert_eq!(uids(&fx.mailbox(alice, "INBOX")), vec![2, 4]);
    assert_eq!(uids(&fx.mailbox(alice, "Archive")), vec![1, 2, 3, 4, 5]);
    // Nothing selected: OK with no pairs.
    let (_, none) = store
        .copy(alice, inbox.id, vec![77], archive.id)
        .await
        .unwrap();
    assert!(none.is_empty());
    // Bodies are shared: 5 distinct bodies, 7 message entries.
    let stats = store.stats();
    assert_eq!((stats.blobs, stats.messages), (5, 7));
}

#[tokio::test]
async fn one_account_cannot_touch_another_accounts_mailbox() {
    let fx = Fixture::new().await;
    let store = &fx.store;
    let alice = fx.account("alice@example.org").await;
    let bob = fx.account("bob@example.org").await;
    fx.deliver(&["bob@example.org"], message("private")).await;
    let bob_inbox = fx.mailbox(bob, "INBOX");
    let alice_inbox = fx.mailbox(alice, "INBOX");
    let not_found = Err(StoreError::NotFound("mailbox".into()));

    assert!(store.mailbox_view(alice, bob_inbox.id).is_none());
    assert_eq!(
        store
            .store_flags(
                alice,
                bob_inbox.id,
                vec![1],
                FlagOp::Add,
                flags(&[Flag::Deleted])
            )
            .await,
        not_found.clone().map(|_: ()| Vec::new())
    );
    assert_eq!(
        store.expunge(alice, bob_inbox.id, None).await,
        not_found.clone().map(|_: ()| Vec::new())
    );
    assert_eq!(
        store
            .copy(alice, bob_inbox.id, vec![1], alice_inbox.id)
            .await,
        not_found.clone().map(|_: ()| (0, Vec::new()))
    );
    assert_eq!(
        store
            .move_messages(alice, alice_inbox.id, vec![1], bob_inbox.id)
            .await,
        not_found.clone().map(|_: ()| (0, Vec::new()))
    );
    assert!(matches!(
        store
            .append(alice, bob_inbox.id, FlagSet::new(), 0, 0, message("x"))
            .await,
        Err(StoreError::NotFound(_))
    ));
    // Bob's message is untouched.
    let after = fx.mailbox(bob, "INBOX");
    assert_eq!(uids(&after), vec![1]);
    assert!(after.messages[0].flags.is_empty());
    assert_eq!(after.change_counter, bob_inbox.change_counter);
}

#[tokio::test]
async fn blob_is_shared_and_removed_with_its_last_reference() {
    let fx = Fixture::new().await;
    let store = &fx.store;
    let alice = fx.account("alice@example.org").await;
    let bob = fx.account("bob@example.org").await;
    let receipt = fx
        .deliver(&["alice@example.org", "bob@example.org"], message("shared"))
        .await;
    let stored = || store.machine.blobs.contains(&receipt.blob);
    assert!(stored());
    assert_eq!(fx.blob_files(), 1);
    let inbox = fx.mailbox(alice, "INBOX");
    let trash = fx.mailbox(alice, "Trash");
    store
        .copy(alice, inbox.id, vec![1], trash.id)
        .await
        .unwrap();
    assert_eq!(fx.blob_files(), 1);
    assert_eq!(store.stats().messages, 3);

    for (account, mailbox) in [(alice, inbox.id), (alice, trash.id)] {
        store
            .store_flags(
                account,
                mailbox,
                vec![1],
                FlagOp::Add,
                flags(&[Flag::Deleted]),
            )
            .await
            .unwrap();
        store.expunge(account, mailbox, None).await.unwrap();
        assert!(stored(), "bob still holds a copy");
    }
    // Expunging bob's, the last copy, frees the body.
    let bob_inbox = fx.mailbox(bob, "INBOX");
    store
        .store_flags(
            bob,
            bob_inbox.id,
            vec![1],
            FlagOp::Add,
            flags(&[Flag::Deleted]),
        )
        .await
        .unwrap();
    store.expunge(bob, bob_inbox.id, None).await.unwrap();
    assert!(!stored());
    assert_eq!(fx.blob_files(), 0);
    // So does removing the account that holds the last copies.
    let second = fx.deliver(&["bob@example.org"], message("bob only")).await;
    let bob_trash = fx.mailbox(bob, "Trash");
    store
        .copy(bob, bob_inbox.id, vec![2], bob_trash.id)
        .await
        .unwrap();
    assert!(store.machine.blobs.contains(&second.blob));
    store.remove_account("bob@example.org").await.unwrap();
    assert_eq!(fx.blob_files(), 0);
    let stats = store.stats();
    assert_eq!(
        (
            stats.blobs,
            stats.messages,
            stats.blob_bytes_raw,
            stats.blob_bytes_stored
        ),
        (0, 0, 0, 0)
    );
}

/// A proposer whose proposals never commit (a cluster without quorum).
struct StuckProposer;

impl Propose for StuckProposer {
    fn propose(&self, _command: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, StoreError>> {
        Box::pin(std::future::pending())
    }
}

#[tokio::test]
async fn abandoned_or_failed_proposal_leaves_no_body_file() {
    let fx = Fixture::new().await;
    fx.account("alice@example.org").await;
    let stuck = MailStore::new(fx.store.machine.clone(), Arc::new(StuckProposer));
    let delivery = Delivery {
        mail_from: String::new(),
        recipients: vec!["alice@example.org".into()],
        body: message("never committed").into(),
        received_at: 0,
    };
    let attempt = tokio::time::timeout(
        std::time::Duration::from_millis(200),
        stuck.deliver(delivery),
    );
    assert!(attempt.await.is_err());
    // The abandoned staging ends in the background: wait for it, with a deadline.
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while fx.blob_files() != 0 {
        assert!(
            Instant::now() < deadline,
            "the staged body file was not removed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(fx.store.stats().messages, 0);
}

#[tokio::test]
async fn mailbox_name_and_subscription_changes_are_broadcast_per_account() {
    let fx = Fixture::new().await;
    let alice = fx.account("alice@example.org").await;
    let mut listings = fx.store.subscribe_listings();
    fx.store.create_mailbox(alice, "Lists", None).await.unwrap();
    assert_eq!(listings.try_recv().unwrap(), alice);
    fx.store.set_subscribed(alice, "Lists", true).await.unwrap();
    assert_eq!(listings.try_recv().unwrap(), alice);
    fx.store
        .rename_mailbox(alice, "Lists", "Old")
        .await
        .unwrap();
    assert_eq!(listings.try_recv().unwrap(), alice);
    fx.store.delete_mailbox(alice, "Old").await.unwrap();
    assert_eq!(listings.try_recv().unwrap(), alice);
    // A refused command changes nothing and says nothing.
    assert!(fx.store.delete_mailbox(alice, "Old").await.is_err());
    // Mail changes only the message lists.
    fx.deliver(&["alice@example.org"], message("ping")).await;
    assert!(listings.try_recv().is_err());
}

#[tokio::test]
async fn changes_are_broadcast_after_apply() {
    let fx = Fixture::new().await;
    let alice = fx.account("alice@example.org").await;
    let mut changes = fx.store.subscribe_changes();
    fx.deliver(&["alice@example.org"], message("ping")).await;
    let inbox = fx.mailbox(alice, "INBOX");
    let change = changes.try_recv().unwrap();
    assert_eq!(
        change,
        MailboxChanged {
            account: alice,
            mailbox: inbox.id
        }
    );
    // A view taken before a change is not affected by it.
    fx.deliver(&["alice@example.org"], message("pong")).await;
    assert_eq!(inbox.messages.len(), 1);
    assert_eq!(fx.mailbox(alice, "INBOX").messages.len(), 2);
}

// ----- state machine level -----

fn body_of(raw: &[u8]) -> BodyV1 {
    let (blob, compressed) = blob::compress(raw).unwrap();
    BodyV1 {
        blob,
        raw_size: raw.len() as u32,
        compressed,
    }
}

/// A fixed, valid argon2id hash (apply only checks the form; hashing is the proposer's job).
const HASH: &str = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$9Yc4dSHW1rjZn6HLZoPRDw";

fn encode(command: CommandV1) -> Vec<u8> {
    encode_command(&Command::V1(command)).unwrap()
}

fn apply(machine: &MailStateMachine, index: &mut u64, command: CommandV1) -> command::Response {
    *index += 1;
    command::decode_response(&machine.apply(*index, &encode(command))).unwrap()
}

/// A node's own snapshot stream (bodies by reference).
fn local_snapshot_bytes(machine: &MailStateMachine) -> Vec<u8> {
    let mut bytes = Vec::new();
    machine.begin_snapshot().write_to(&mut bytes).unwrap();
    bytes
}

/// What a follower does with a transfer stream (`raft::fetch` in the cluster crate): fetch the
/// bodies it lacks from `source`, store them, then restore.
pub(crate) fn install(
    target: &MailStateMachine,
    source: &MailStateMachine,
    transfer: &[u8],
) -> std::io::Result<()> {
    let missing = target.missing_objects(&mut &transfer[..])?;
    let ids: Vec<kermail_cluster::ObjectId> = missing.iter().map(|o| o.id).collect();
    for (id, bytes) in ids.iter().zip(source.read_objects(&ids, u64::MAX)) {
        target.store_object(id, &bytes.expect("the source holds the body"))?;
    }
    target.restore(&mut &transfer[..], false)
}

/// The stream a follower installs (metadata and body references).
fn snapshot_bytes(machine: &MailStateMachine) -> Vec<u8> {
    let local = local_snapshot_bytes(machine);
    let mut bytes = Vec::new();
    machine
        .write_transfer(&mut local.as_slice(), &mut bytes)
        .unwrap();
    bytes
}

fn setup_commands() -> Vec<CommandV1> {
    let mut commands = vec![CommandV1::AddDomain {
        domain: "example.org".into(),
    }];
    for name in ["alice", "bob", "carol"] {
        commands.push(CommandV1::AddAccount {
            address: format!("{name}@example.org"),
            password_hash: HASH.into(),
            now: 1_700_000_000,
        });
    }
    commands.push(CommandV1::AddAlias {
        source: "team@example.org".into(),
        target: "bob@example.org".into(),
    });
    commands.push(CommandV1::AddAlias {
        source: "team@example.org".into(),
        target: "carol@example.org".into(),
    });
    commands
}

#[test]
fn garbage_command_is_refused_without_change() {
    let dir = tempfile::tempdir().unwrap();
    let machine = MailStateMachine::open(dir.path()).unwrap();
    let before = snapshot_bytes(&machine);
    let reply = machine.apply(1, b"\x07garbage");
    assert!(matches!(
        command::decode_response(&reply).unwrap(),
        command::Response::Refused(command::ApplyError::Invalid(_))
    ));
    assert_eq!(snapshot_bytes(&machine), before);
}

#[test]
fn refused_command_leaves_state_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let machine = MailStateMachine::open(dir.path()).unwrap();
    let mut index = 0;
    for command in setup_commands() {
        apply(&machine, &mut index, command);
    }
    let before = snapshot_bytes(&machine);
    let refused = [
        CommandV1::AddAccount {
            address: "alice@example.org".into(),
            password_hash: HASH.into(),
            now: 0,
        },
        CommandV1::CreateMailbox {
            account: 1,
            name: "INBOX".into(),
            special_use: None,
            now: 5,
        },
        CommandV1::Append {
            account: 1,
            mailbox: 7, // bob's INBOX
            flags: FlagSet::new(),
            internal_date: 0,
            internal_date_offset_min: 0,
            body: body_of(b"sneaky"),
        },
        CommandV1::Deliver {
            mail_from: String::new(),
            recipients: vec!["nobody@example.org".into()],
            received_at: 0,
            body: body_of(b"lost"),
        },
        CommandV1::Copy {
            account: 1,
            from: 1,
            uids: vec![(1, u32::MAX)],
            to: 7,
            remove_source: true,
        },
    ];
    for command in refused {
        let response = apply(&machine, &mut index, command);
        assert!(
            matches!(response, command::Response::Refused(_)),
            "{response:?}"
        );
    }
    assert_eq!(snapshot_bytes(&machine), before);
    // Bodies of refused commands are not left behind.
    assert_eq!(machine.blobs.disk_stats().bodies, 0);
}

#[test]
fn uidvalidity_grows_with_time_and_survives_a_clock_in_the_far_future() {
    let dir = tempfile::tempdir().unwrap();
    let machine = MailStateMachine::open(dir.path()).unwrap();
    let mut index = 0;
    for command in setup_commands() {
        apply(&machine, &mut index, command);
    }
    let create = |name: &str, now: i64| CommandV1::CreateMailbox {
        account: 1,
        name: name.into(),
        special_use: None,
        now,
    };
    let validity = |machine: &MailStateMachine, name: &str| {
        machine.read().accounts[&1]
            .mailbox_by_name(name)
            .unwrap()
            .uidvalidity
    };
    apply(&machine, &mut index, create("Later", 1_800_000_000));
    assert_eq!(validity(&machine, "Later"), 1_800_000_000);
    // A clock going backwards still gives a greater value.
    apply(&machine, &mut index, create("Earlier", 1_000));
    assert_eq!(validity(&machine, "Earlier"), 1_800_000_001);
    apply(&machine, &mut index, create("Future", i64::MAX));
    assert_eq!(validity(&machine, "Future"), state::UIDVALIDITY_TIME_MAX);
    let response = apply(&machine, &mut index, create("After", i64::MAX));
    assert!(matches!(response, command::Response::Mailbox(_)));
    assert_eq!(validity(&machine, "After"), state::UIDVALIDITY_TIME_MAX + 1);
}

#[tokio::test]
async fn snapshot_round_trip_into_a_fresh_data_dir() {
    let fx = Fixture::new().await;
    let store = &fx.store;
    let alice = fx.account("alice@example.org").await;
    fx.account("bob@example.org").await;
    store
        .add_alias("team@example.org", "bob@example.org")
        .await
        .unwrap();
    let mut bodies = Vec::new();
    for n in 0..20 {
        let body = message(&format!("snap {n}"));
        fx.deliver(&["alice@example.org", "team@example.org"], body.clone())
            .await;
        bodies.push(body);
    }
    let inbox = fx.mailbox(alice, "INBOX");
    store
        .store_flags(
            alice,
            inbox.id,
            vec![3, 4],
            FlagOp::Add,
            flags(&[Flag::Seen, Flag::Keyword("Later".into())]),
        )
        .await
        .unwrap();
    store
        .create_mailbox(alice, "Projects/Old", None)
        .await
        .unwrap();

    let bytes = snapshot_bytes(&store.machine);
    let dir = tempfile::tempdir().unwrap();
    let restored = MailStateMachine::open(dir.path()).unwrap();
    install(&restored, &store.machine, &bytes).unwrap();
    assert_eq!(*restored.read(), *store.machine.read());
    assert_eq!(restored.read().stats(), store.stats());
    assert_eq!(snapshot_bytes(&restored), bytes);

    let copy = MailStore::new(
        restored.clone(),
        Arc::new(LocalProposer::new(restored.clone())),
    );
    let view = copy.mailbox_by_name(alice, "INBOX").unwrap();
    for (meta, body) in view.messages.iter().zip(&bodies) {
        assert_eq!(*copy.body(meta.blob).await.unwrap(), *body);
    }
    // The restored node keeps working and numbers like the original would.
    let receipt = copy
        .deliver(Delivery {
            mail_from: String::new(),
            recipients: vec!["alice@example.org".into()],
            body: message("after").into(),
            received_at: 5,
        })
        .await
        .unwrap();
    assert_eq!(receipt.delivered[0].2, 21);
    assert_eq!(
        copy.authenticate("alice@example.org", PASSWORD).await,
        Some(alice)
    );

    // Restoring again over existing files (and an orphan) gives the same state.
    let orphan = BlobId([0xab; 32]);
    restored.blobs.write(&orphan, b"orphan").unwrap();
    restored.restore(&mut bytes.as_slice(), false).unwrap();
    assert_eq!(*restored.read(), *store.machine.read());
    assert!(!restored.blobs.contains(&orphan));
}

#[test]
fn corrupt_snapshots_are_refused_without_panic() {
    let dir = tempfile::tempdir().unwrap();
    let machine = MailStateMachine::open(dir.path()).unwrap();
    let mut index = 0;
    for command in setup_commands() {
        apply(&machine, &mut index, command);
    }
    apply(
        &machine,
        &mut index,
        CommandV1::Deliver {
            mail_from: String::new(),
            recipients: vec!["alice@example.org".into()],
            received_at: 0,
            body: body_of(b"hello"),
        },
    );
    let good = snapshot_bytes(&machine);
    let target_dir = tempfile::tempdir().unwrap();
    let target = MailStateMachine::open(target_dir.path()).unwrap();
    let check_refused = |bytes: &[u8]| {
        assert!(target.restore(&mut &bytes[..], false).is_err());
        assert!(
            target.read().accounts.is_empty(),
            "state replaced by a bad snapshot"
        );
    };
    // Truncated anywhere.
    for cut in [0, 10, 20, 28, 40, good.len() / 2, good.len() - 1] {
        check_refused(&good[..cut]);
    }
    // Any flipped byte is caught (by the checksum at the latest).
    for at in (0..good.len()).step_by(7) {
        let mut bad = good.clone();
        bad[at] ^= 0x55;
        check_refused(&bad);
    }
    // Huge lengths are refused before any allocation.
    let mut huge = good[..20].to_vec();
    huge.extend_from_slice(&u64::MAX.to_le_bytes());
    check_refused(&huge);
    // A claimed length far above the bytes sent is an early end, not an allocation.
    let mut claims = good[..20].to_vec();
    claims.extend_from_slice(&snapshot::MAX_META_BYTES.to_le_bytes());
    claims.extend_from_slice(&[0, 0xfc, 0xff, 0xff, 0xff, 0x3f]);
    check_refused(&claims);
    let mut trailing = good.clone();
    trailing.push(0);
    check_refused(&trailing);
    install(&target, &machine, &good).unwrap();
    assert_eq!(*target.read(), *machine.read());
}

#[test]
fn snapshot_build_keeps_files_of_its_view() {
    let dir = tempfile::tempdir().unwrap();
    let machine = MailStateMachine::open(dir.path()).unwrap();
    let mut index = 0;
    for command in setup_commands() {
        apply(&machine, &mut index, command);
    }
    apply(
        &machine,
        &mut index,
        CommandV1::Deliver {
            mail_from: String::new(),
            recipients: vec!["alice@example.org".into()],
            received_at: 0,
            body: body_of(b"short-lived"),
        },
    );
    let builder = machine.begin_snapshot();
    // The message goes away while the build is pending.
    apply(
        &machine,
        &mut index,
        CommandV1::StoreFlags {
            account: 1,
            mailbox: 1,
            uids: vec![(1, 1)],
            op: FlagOp::Add,
            flags: flags(&[Flag::Deleted]),
        },
    );
    apply(
        &machine,
        &mut index,
        CommandV1::Expunge {
            account: 1,
            mailbox: 1,
            uids: None,
        },
    );
    let mut local = Vec::new();
    builder.write_to(&mut local).unwrap();
    drop(builder);
    // The build is done, but the snapshot references the body (it may be kept): pinned.
    assert_eq!(machine.read().blobs.len(), 0);
    let blob = body_of(b"short-lived").blob;
    assert!(machine.blobs.contains(&blob));
    // A follower gets it from the transfer stream.
    let mut bytes = Vec::new();
    machine
        .write_transfer(&mut local.as_slice(), &mut bytes)
        .unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let other = MailStateMachine::open(other_dir.path()).unwrap();
    install(&other, &machine, &bytes).unwrap();
    assert_eq!(other.read().blobs.len(), 1);
    assert!(other.blobs.contains(&blob));
    // While a peer fetches bodies from this node (the install above did), a kept snapshot
    // deletes nothing: the peer may be installing a snapshot that references the body.
    let newer = machine.begin_snapshot();
    newer.write_to(&mut Vec::new()).unwrap();
    newer.kept();
    drop(newer);
    assert!(machine.blobs.contains(&blob), "deleted during a fetch hold");
    // After the hold, once a newer snapshot (without it) is kept, the body goes.
    machine.blobs.end_hold();
    let newer = machine.begin_snapshot();
    newer.write_to(&mut Vec::new()).unwrap();
    assert!(machine.blobs.contains(&blob));
    newer.kept();
    drop(newer);
    assert!(!machine.blobs.contains(&blob));
}

/// Bytes the file system allocated for a folder tree (what `du` reports).
pub(crate) fn allocated_bytes(root: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(root).unwrap() {
        let entry = entry.unwrap();
        let metadata = entry.metadata().unwrap();
        total += metadata.blocks() * 512;
        if metadata.is_dir() {
            total += allocated_bytes(&entry.path());
        }
    }
    total
}

#[test]
fn apply_timing_for_ten_thousand_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let machine = MailStateMachine::open(dir.path()).unwrap();
    let mut index = 0;
    for command in setup_commands() {
        apply(&machine, &mut index, command);
    }
    const DELIVERIES: usize = 10_000;
    let started = Instant::now();
    let commands: Vec<Vec<u8>> = (0..DELIVERIES)
        .map(|n| {
            let mut raw = message(&format!("timing {n}"));
            raw.extend(std::iter::repeat_n(b'x', 1000));
            encode(CommandV1::Deliver {
                mail_from: "a@example.net".into(),
                recipients: vec!["alice@example.org".into()],
                received_at: 1_700_000_000 + n as i64,
                body: body_of(&raw),
            })
        })
        .collect();
    let prepared = started.elapsed();
    let started = Instant::now();
    for command in &commands {
        index += 1;
        machine.apply(index, command);
    }
    let applied = started.elapsed();
    // An IDLE session holding a view of the 10,000-message INBOX makes each delivery copy the
    // message list once (copy on write); the session then takes a fresh view.
    const HELD_VIEW_DELIVERIES: usize = 100;
    let mut held = machine.read().accounts[&1].mailboxes[&1].messages.clone();
    let started = Instant::now();
    for n in 0..HELD_VIEW_DELIVERIES {
        index += 1;
        machine.apply(
            index,
            &encode(CommandV1::Deliver {
                mail_from: String::new(),
                recipients: vec!["alice@example.org".into()],
                received_at: 0,
                body: body_of(format!("held view {n}").as_bytes()),
            }),
        );
        held = machine.read().accounts[&1].mailboxes[&1].messages.clone();
    }
    let with_held_view = started.elapsed() / HELD_VIEW_DELIVERIES as u32;
    assert_eq!(held.len(), DELIVERIES + HELD_VIEW_DELIVERIES);
    let started = Instant::now();
    let builder = machine.begin_snapshot();
    let captured = started.elapsed();
    let started = Instant::now();
    let mut bytes = Vec::new();
    builder.write_to(&mut bytes).unwrap();
    let written = started.elapsed();
    drop(builder);
    let mut transfer = Vec::new();
    machine
        .write_transfer(&mut bytes.as_slice(), &mut transfer)
        .unwrap();
    let bytes = transfer;
    let other_dir = tempfile::tempdir().unwrap();
    let other = MailStateMachine::open(other_dir.path()).unwrap();
    let started = Instant::now();
    install(&other, &machine, &bytes).unwrap();
    let restored = started.elapsed();
    let stats = machine.read().stats();
    assert_eq!(stats.messages, (DELIVERIES + HELD_VIEW_DELIVERIES) as u64);
    let allocated = allocated_bytes(&dir.path().join("blobs"));
    // A replay over the same data dir (the first store closed: it holds the folder's lock)
    // finds every body in place: state work only.
    drop(machine);
    let replay = MailStateMachine::open(dir.path()).unwrap();
    let mut replay_index = 0;
    for command in setup_commands() {
        apply(&replay, &mut replay_index, command);
    }
    let started = Instant::now();
    for command in &commands {
        replay_index += 1;
        replay.apply(replay_index, command);
    }
    let replayed = started.elapsed();
    println!(
        "store timing ({DELIVERIES} deliveries of ~1.1 KB): compress+hash+encode {:?}, apply {:?} \
         ({:.1} us each), apply while a view of the mailbox is held {:?} each, replay with \
         files present {:?}, begin_snapshot {:?}, write snapshot {:?} ({} bytes), restore {:?}; \
         raw {} bytes, stored {} bytes, allocated on disk {} bytes",
        prepared,
        applied,
        applied.as_secs_f64() * 1e6 / DELIVERIES as f64,
        with_held_view,
        replayed,
        captured,
        written,
        bytes.len(),
        restored,
        stats.blob_bytes_raw,
        stats.blob_bytes_stored,
        allocated,
    );
}

mod determinism {
    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    enum Op {
        Deliver(Vec<u8>, u8),
        Append(u8, u8, u8),
        Store(u8, u8, u8, u8),
        Expunge(u8, bool),
        Copy(u8, u8, u8, bool),
        Create(u8, u8),
        Delete(u8),
        Rename(u8, u8),
        RemoveAccount(u8),
        AddAccount(u8),
    }

    const ACCOUNTS: [&str; 4] = ["alice", "bob", "carol", "dave"];
    const NAMES: [&str; 5] = ["INBOX", "Work", "Work/Sub", "Trash", "Misc"];

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (proptest::collection::vec(any::<u8>(), 0..64), any::<u8>())
                .prop_map(|(b, r)| Op::Deliver(b, r)),
            (any::<u8>(), any::<u8>(), any::<u8>()).prop_map(|(a, m, b)| Op::Append(a, m, b)),
            (any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>())
                .prop_map(|(a, m, u, f)| Op::Store(a, m, u, f)),
            (any::<u8>(), any::<bool>()).prop_map(|(m, all)| Op::Expunge(m, all)),
            (any::<u8>(), any::<u8>(), any::<u8>(), any::<bool>())
                .prop_map(|(f, t, u, mv)| Op::Copy(f, t, u, mv)),
            (any::<u8>(), any::<u8>()).prop_map(|(a, n)| Op::Create(a, n)),
            any::<u8>().prop_map(Op::Delete),
            (any::<u8>(), any::<u8>()).prop_map(|(f, t)| Op::Rename(f, t)),
            any::<u8>().prop_map(Op::RemoveAccount),
            any::<u8>().prop_map(Op::AddAccount),
        ]
    }

    fn pick<T: Copy>(list: &[T], n: u8) -> T {
        list[n as usize % list.len()]
    }

    fn flag_set(bits: u8) -> FlagSet {
        let mut set = FlagSet::new();
        for (bit, flag) in [
            Flag::Seen,
            Flag::Deleted,
            Flag::Flagged,
            Flag::Keyword("Tag".into()),
        ]
        .into_iter()
        .enumerate()
        {
            if bits & (1 << bit) != 0 {
                set.insert(flag);
            }
        }
        set
    }

    /// Turns an op into a command; ids are small numbers so that many commands hit existing
    /// accounts and mailboxes (and many are refused, which must be deterministic too).
    fn command(op: Op, step: i64) -> CommandV1 {
        match op {
            Op::Deliver(body, r) => CommandV1::Deliver {
                mail_from: String::new(),
                recipients: vec![
                    format!("{}@example.org", pick(&ACCOUNTS, r)),
                    "team@example.org".into(),
                ],
                received_at: step,
                body: body_of(&body),
            },
            Op::Append(a, m, b) => CommandV1::Append {
                account: u64::from(a % 5),
                mailbox: u64::from(m % 30),
                flags: flag_set(b),
                internal_date: step,
                internal_date_offset_min: 0,
                body: body_of(&[b; 3]),
            },
            Op::Store(a, m, u, f) => CommandV1::StoreFlags {
                account: u64::from(a % 5),
                mailbox: u64::from(m % 30),
                uids: vec![(u32::from(u % 8), u32::from(u % 8) + 2)],
                op: pick(&[FlagOp::Add, FlagOp::Remove, FlagOp::Replace], f),
                flags: flag_set(f >> 2),
            },
            Op::Expunge(m, all) => CommandV1::Expunge {
                account: u64::from(m % 5),
                mailbox: u64::from(m % 30),
                uids: (!all).then(|| vec![(1, 3)]),
            },
            Op::Copy(f, t, u, remove_source) => CommandV1::Copy {
                account: u64::from(f % 5),
                from: u64::from(f % 30),
                uids: vec![(u32::from(u % 8), 20)],
                to: u64::from(t % 30),
                remove_source,
            },
            Op::Create(a, n) => CommandV1::CreateMailbox {
                account: u64::from(a % 5),
                name: pick(&NAMES, n).into(),
                special_use: None,
                now: 1_700_000_000 + step,
            },
            Op::Delete(a) => CommandV1::DeleteMailbox {
                account: u64::from(a % 5),
                name: pick(&NAMES, a / 5).into(),
            },
            Op::Rename(f, t) => CommandV1::RenameMailbox {
                account: u64::from(f % 5),
                from: pick(&NAMES, f / 5).into(),
                to: pick(&NAMES, t).into(),
                now: 1_700_000_000 + step,
            },
            Op::RemoveAccount(a) => CommandV1::RemoveAccount {
                address: format!("{}@example.org", pick(&ACCOUNTS, a)),
            },
            Op::AddAccount(a) => CommandV1::AddAccount {
                address: format!("{}@example.org", pick(&ACCOUNTS, a)),
                password_hash: HASH.into(),
                now: 1_700_000_000,
            },
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn random_bytes_never_panic_apply_or_restore(
            bytes in proptest::collection::vec(any::<u8>(), 0..256),
            prefix_len in 0usize..64,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let machine = MailStateMachine::open(dir.path()).unwrap();
            let mut index = 0;
            for command in setup_commands() {
                apply(&machine, &mut index, command);
            }
            let before = snapshot_bytes(&machine);
            // Garbage as a command, and garbage after a valid command prefix.
            let reply = machine.apply(100, &bytes);
            prop_assert!(command::decode_response(&reply).is_ok());
            let valid = encode(CommandV1::AddDomain { domain: "example.net".into() });
            let mut spliced = valid[..prefix_len.min(valid.len())].to_vec();
            spliced.extend_from_slice(&bytes);
            let _ = machine.apply(101, &spliced);
            // Garbage as a snapshot, and a real snapshot with garbage spliced in.
            prop_assert!(machine.restore(&mut bytes.as_slice(), false).is_err());
            let mut broken = before.clone();
            let at = prefix_len * before.len() / 64;
            broken.splice(at..at, bytes.iter().copied());
            if !bytes.is_empty() {
                prop_assert!(machine.restore(&mut broken.as_slice(), false).is_err());
            }
            prop_assert_eq!(machine.read().check_invariants(), Ok(()));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        #[test]
        fn same_commands_give_byte_identical_snapshots(ops in proptest::collection::vec(op(), 1..80)) {
            let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
            let machines = [
                MailStateMachine::open(dirs[0].path()).unwrap(),
                MailStateMachine::open(dirs[1].path()).unwrap(),
            ];
            let mut commands: Vec<Vec<u8>> = setup_commands().into_iter().map(encode).collect();
            commands.extend(ops.into_iter().enumerate().map(|(step, op)| encode(command(op, step as i64))));
            for (index, bytes) in commands.iter().enumerate() {
                let replies: Vec<Vec<u8>> = machines
                    .iter()
                    .map(|m| m.apply(index as u64 + 1, bytes))
                    .collect();
                prop_assert_eq!(&replies[0], &replies[1]);
                let state = machines[0].read();
                prop_assert_eq!(state.check_invariants(), Ok(()));
                // Reference counts always equal the message entries.
                let mut rebuilt = state.clone();
                rebuilt.rebuild_blobs(|id| state.blobs.get(id).map_or(0, |b| b.stored_size));
                prop_assert_eq!(&rebuilt.blobs, &state.blobs);
                prop_assert_eq!(rebuilt.totals, state.totals);
            }
            let snapshots = [snapshot_bytes(&machines[0]), snapshot_bytes(&machines[1])];
            prop_assert_eq!(&snapshots[0], &snapshots[1]);
            // A node restored from a snapshot taken half-way, then fed the rest of the log,
            // ends byte-identical too.
            let half = commands.len() / 2;
            let source_dir = tempfile::tempdir().unwrap();
            let source = MailStateMachine::open(source_dir.path()).unwrap();
            for (index, bytes) in commands[..half].iter().enumerate() {
                source.apply(index as u64 + 1, bytes);
            }
            let late_dir = tempfile::tempdir().unwrap();
            let late = MailStateMachine::open(late_dir.path()).unwrap();
            install(&late, &source, &snapshot_bytes(&source)).unwrap();
            for (index, bytes) in commands.iter().enumerate().skip(half) {
                late.apply(index as u64 + 1, bytes);
            }
            prop_assert_eq!(&snapshot_bytes(&late), &snapshots[0]);
            prop_assert_eq!(late.read().stats(), machines[0].read().stats());
            // Exactly the referenced bodies are on disk.
            let referenced: BTreeSet<BlobId> = machines[0].read().blobs.keys().copied().collect();
            for id in &referenced {
                prop_assert!(machines[0].blobs.contains(id));
            }
            prop_assert_eq!(machines[0].blobs.disk_stats().bodies, referenced.len());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Quota accounting (issue 10): after any sequence of commands, every account's usage
        /// is exactly the sum of its messages' sizes and their count, no account passes a
        /// limit that was never lowered, and a refusal for quota changes nothing.
        #[test]
        fn quota_usage_is_the_sum_of_sizes_and_stays_within_limits(
            ops in proptest::collection::vec(op(), 1..120),
            bytes_limit in 20u64..400,
            messages_limit in 1u64..12,
        ) {
            use super::super::quota::QuotaLimits;
            use super::super::command::CommandV3;
            let dir = tempfile::tempdir().unwrap();
            let machine = MailStateMachine::open(dir.path()).unwrap();
            let mut commands: Vec<Vec<u8>> = setup_commands().into_iter().map(encode).collect();
            let limits = QuotaLimits { storage_bytes: Some(bytes_limit), messages: Some(messages_limit) };
            commands.push(encode_command(&Command::V3(CommandV3::SetDefaultQuota { limits })).unwrap());
            commands.extend(ops.into_iter().enumerate().map(|(step, op)| encode(command(op, step as i64))));
            for (index, bytes) in commands.iter().enumerate() {
                let before = machine.read().clone();
                let reply = command::decode_response(&machine.apply(index as u64 + 1, bytes)).unwrap();
                let state = machine.read();
                if matches!(reply, command::Response::Refused(command::ApplyError::OverQuota(_))) {
                    prop_assert_eq!(&before.accounts, &state.accounts);
                    prop_assert_eq!(&before.quotas.usage, &state.quotas.usage);
                }
                prop_assert_eq!(state.check_quota_usage(), Ok(()));
                for (&id, account) in &state.accounts {
                    let usage = state.quota_usage(id);
                    let messages: Vec<&MessageMeta> = account
                        .mailboxes
                        .values()
                        .flat_map(|m| m.messages.iter())
                        .collect();
                    prop_assert_eq!(usage.messages, messages.len() as u64);
                    prop_assert_eq!(usage.bytes, messages.iter().map(|m| u64::from(m.size)).sum::<u64>());
                    prop_assert!(usage.messages <= messages_limit);
                    prop_assert!(usage.bytes <= bytes_limit);
                }
                // Removed accounts leave nothing behind.
                for id in state.quotas.usage.keys() {
                    prop_assert!(state.accounts.contains_key(id));
                }
            }
            // A restore recomputes the same usage.
            let restored_dir = tempfile::tempdir().unwrap();
            let restored = MailStateMachine::open(restored_dir.path()).unwrap();
            install(&restored, &machine, &snapshot_bytes(&machine)).unwrap();
            prop_assert_eq!(&restored.read().quotas, &machine.read().quotas);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deliveries_through_the_store() {
    // Throughput of the local write path (compress + stage on blocking threads, serial apply);
    // also checks that UIDs stay unique and dense under concurrency.
    const SESSIONS: usize = 10;
    const PER_SESSION: usize = 200;
    let fx = Fixture::new().await;
    let alice = fx.account("alice@example.org").await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for session in 0..SESSIONS {
        let store = fx.store.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..PER_SESSION {
                let mut body = message(&format!("session {session} message {n}"));
                body.extend(std::iter::repeat_n(b'y', 4000));
                store
                    .deliver(Delivery {
                        mail_from: String::new(),
                        recipients: vec!["alice@example.org".into()],
                        body: body.into(),
                        received_at: 0,
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed();
    let total = SESSIONS * PER_SESSION;
    println!(
        "store deliveries: {total} of ~4 KB over {SESSIONS} concurrent tasks in {elapsed:?} \
         ({:.0} msg/s, open_local, no Raft)",
        total as f64 / elapsed.as_secs_f64()
    );
    let inbox = fx.mailbox(alice, "INBOX");
    assert_eq!(uids(&inbox), (1..=total as Uid).collect::<Vec<_>>());
    assert_eq!(fx.blob_files(), total);
}

/// Quotas through the store (issue 10): COPY refused whole, MOVE allowed at the limit, a
/// delivery refused for all when one recipient is full, EXPUNGE and settings take effect.
#[tokio::test]
async fn quotas_refuse_whole_commands_and_follow_settings() {
    let fx = Fixture::new().await;
    let store = &fx.store;
    let alice = fx.account("alice@example.org").await;
    fx.account("bob@example.org").await;
    store
        .set_account_quota("alice@example.org", None, Some(QuotaSetting::Limit(4)))
        .await
        .unwrap();
    for n in 0..3 {
        fx.deliver(&["alice@example.org"], message(&format!("m{n}")))
            .await;
    }
    let inbox = fx.mailbox(alice, "INBOX");
    let archive = fx.mailbox(alice, "Archive");
    let sizes: u64 = inbox.messages.iter().map(|m| u64::from(m.size)).sum();
    let report = store.quota(alice).unwrap();
    assert_eq!(report.usage.messages, 3);
    assert_eq!(report.usage.bytes, sizes);
    assert_eq!(report.limits.messages, Some(4));
    assert_eq!(report.limits.storage_bytes, Some(DEFAULT_QUOTA_BYTES));

    // COPY 1:* would make 6: refused whole, nothing copied.
    let copied = store.copy(alice, inbox.id, uids(&inbox), inbox.id).await;
    assert!(
        matches!(copied, Err(StoreError::OverQuota(_))),
        "{copied:?}"
    );
    assert_eq!(uids(&fx.mailbox(alice, "INBOX")), vec![1, 2, 3]);
    // One more fits exactly; then the account is full.
    store
        .copy(alice, inbox.id, vec![1], inbox.id)
        .await
        .unwrap();
    assert!(store.recipient_over_quota("alice@example.org", 0));
    assert!(!store.recipient_over_quota("bob@example.org", 0));
    // MOVE keeps the usage: allowed at the limit.
    store
        .move_messages(alice, inbox.id, vec![1, 2], archive.id)
        .await
        .unwrap();
    assert_eq!(store.quota(alice).unwrap().usage.messages, 4);
    // A delivery to a full and a free account is refused for both (SMTP checks at RCPT).
    let refused = store
        .deliver(Delivery {
            mail_from: String::new(),
            recipients: vec!["alice@example.org".into(), "bob@example.org".into()],
            body: message("both").into(),
            received_at: 0,
        })
        .await;
    assert!(
        matches!(refused, Err(StoreError::OverQuota(_))),
        "{refused:?}"
    );
    fx.deliver(&["bob@example.org"], message("bob only")).await;
    let appended = store
        .append(alice, archive.id, FlagSet::new(), 0, 0, message("a"))
        .await;
    assert!(
        matches!(appended, Err(StoreError::OverQuota(_))),
        "{appended:?}"
    );

    // EXPUNGE frees room; a deleted mailbox too.
    let mut deleted = FlagSet::new();
    deleted.insert(Flag::Deleted);
    store
        .store_flags(alice, inbox.id, vec![3], FlagOp::Add, deleted)
        .await
        .unwrap();
    store.expunge(alice, inbox.id, None).await.unwrap();
    assert_eq!(store.quota(alice).unwrap().usage.messages, 3);
    store.delete_mailbox(alice, "Archive").await.unwrap();
    assert_eq!(store.quota(alice).unwrap().usage.messages, 1);

    // Unlimited, then back to the default.
    store
        .set_account_quota(
            "alice@example.org",
            Some(QuotaSetting::Limit(10)),
            Some(QuotaSetting::Unlimited),
        )
        .await
        .unwrap();
    let report = store.quota(alice).unwrap();
    assert_eq!(report.limits.messages, None);
    assert_eq!(report.limits.storage_bytes, Some(10));
    assert!(store.recipient_over_quota("alice@example.org", 0));
    store
        .set_account_quota(
            "alice@example.org",
            Some(QuotaSetting::Default),
            Some(QuotaSetting::Default),
        )
        .await
        .unwrap();
    assert_eq!(store.quota(alice).unwrap().limits, QuotaLimits::default());
    store.remove_account("alice@example.org").await.unwrap();
    assert!(store.quota(alice).is_none());
    assert!(!store.state().quotas.usage.contains_key(&alice));
}

/// Snapshot cost against the amount of mail. A snapshot writes the metadata chunks that
/// changed since the previous one (and references, no body), so the steady-state figure is the
/// periodic snapshot after `KERMAIL_SNAPSHOT_BENCH_CHANGES` (default 5,000: openraft's snapshot
/// interval) deliveries since the previous snapshot; the first (full) snapshot, the restore at
/// a restart, the transfer stream (chunks and body references) and its install on a follower
/// (one lacking no body, one lacking every body) are printed too. No timed assertion;
/// `scripts/bench/snapshot` runs it at 10,000 and 200,000 messages through
/// `KERMAIL_SNAPSHOT_BENCH_COUNTS` (default: small counts, for the test suite).
#[test]
fn snapshot_timing_against_the_number_of_messages() {
    const BODY_BYTES: usize = 4096;
    let counts: Vec<usize> = std::env::var("KERMAIL_SNAPSHOT_BENCH_COUNTS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![500, 2000]);
    let changes: usize = std::env::var("KERMAIL_SNAPSHOT_BENCH_CHANGES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(5000);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for count in counts {
        let dir = tempfile::tempdir().unwrap();
        let machine = MailStateMachine::open(dir.path()).unwrap();
        let mut index = 0;
        for command in setup_commands() {
            apply(&machine, &mut index, command);
        }
        let mut deliver = |machine: &MailStateMachine, index: &mut u64, n: usize| {
            let mut raw = message(&format!("snapshot timing {n}"));
            // Letters from a xorshift stream: every body distinct, compressing like text.
            raw.extend((0..BODY_BYTES).map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                b'a' + (seed % 26) as u8
            }));
            *index += 1;
            machine.apply(
                *index,
                &encode(CommandV1::Deliver {
                    mail_from: "a@example.net".into(),
                    recipients: vec!["alice@example.org".into()],
                    received_at: 1_700_000_000 + n as i64,
                    body: body_of(&raw),
                }),
            );
        };
        let started = Instant::now();
        let first_part = count.saturating_sub(changes);
        for n in 0..first_part {
            deliver(&machine, &mut index, n);
        }
        let filled = started.elapsed();
        let snapshot = |name: &str| {
            let started = Instant::now();
            let builder = machine.begin_snapshot();
            let path = dir.path().join(name);
            let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
            builder.write_to(&mut file).unwrap();
            let file = file.into_inner().unwrap();
            file.sync_all().unwrap();
            builder.kept();
            drop(builder);
            (started.elapsed(), path)
        };
        let (full_time, _) = snapshot("first.snap");
        let chunk_bytes_full = machine.chunks.disk_bytes();
        // The changes since the previous snapshot: deliveries, plus flag changes on old mail.
        for n in first_part..count {
            deliver(&machine, &mut index, n);
        }
        let (local_time, path) = snapshot("local.snap");
        let local_bytes = std::fs::metadata(&path).unwrap().len();
        let stats = machine.read().stats();
        assert_eq!(stats.messages, count as u64);

        let started = Instant::now();
        let mut transfer = Vec::new();
        machine
            .write_transfer(&mut std::fs::File::open(&path).unwrap(), &mut transfer)
            .unwrap();
        let transfer_time = started.elapsed();

        // A restart: the same folder, the snapshot restored, no body touched.
        drop(machine);
        let restarted = MailStateMachine::open(dir.path()).unwrap();
        let started = Instant::now();
        restarted
            .restore(&mut std::fs::File::open(&path).unwrap(), true)
            .unwrap();
        let restore_time = started.elapsed();
        assert_eq!(restarted.read().stats().messages, count as u64);
        let transfer_zstd = zstd::encode_all(transfer.as_slice(), 3).unwrap().len();
        // A follower that holds every body (it lagged on metadata only): nothing to fetch.
        let started = Instant::now();
        let lacks = restarted.missing_objects(&mut transfer.as_slice()).unwrap();
        assert!(lacks.is_empty());
        restarted.restore(&mut transfer.as_slice(), false).unwrap();
        let install_nothing_missing = started.elapsed();
        // An empty follower: every body fetched (here from the source's packs directly, as
        // `raft::fetch` does over the mesh), then the install.
        let empty_dir = tempfile::tempdir().unwrap();
        let empty = MailStateMachine::open(empty_dir.path()).unwrap();
        let started = Instant::now();
        let lacks = empty.missing_objects(&mut transfer.as_slice()).unwrap();
        let fetched_bytes: u64 = lacks.iter().map(|o| o.len).sum();
        let fetched_count = lacks.len();
        install(&empty, &restarted, &transfer).unwrap();
        let install_empty = started.elapsed();
        assert_eq!(empty.read().stats().messages, count as u64);
        println!(
            "snapshot timing: {count} messages of ~{BODY_BYTES} bytes ({} bytes stored, filled \
             in {filled:?}): periodic snapshot after {changes} changes {local_time:?}, stream \
             {local_bytes} bytes; first (full) snapshot {full_time:?}, {chunk_bytes_full} \
             chunk bytes; restore at restart {restore_time:?}; transfer to a follower \
             (chunks and body references) written in {transfer_time:?}, {} bytes ({transfer_zstd} \
             zstd); install on a follower lacking no body {install_nothing_missing:?}; install \
             on an empty follower (fetching {fetched_count} bodies, {fetched_bytes} bytes, from \
             local packs) {install_empty:?}",
            stats.blob_bytes_stored,
            transfer.len(),
        );
    }
}

/// Incremental snapshots restore to exactly the state they were taken from, after many rounds
/// of deliveries, flag changes, expunges, copies, moves and a renamed INBOX; and a snapshot
/// with no change since the previous one writes no chunk.
#[test]
fn incremental_snapshots_restore_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let machine = MailStateMachine::open(dir.path()).unwrap();
    let mut index = 0;
    for command in setup_commands() {
        apply(&machine, &mut index, command);
    }
    let archive = machine.read().accounts[&1].names["Archive"];
    let mut delivered = 0u32;
    let mut last_local = Vec::new();
    for round in 0..24u32 {
        for n in 0..400 {
            apply(
                &machine,
                &mut index,
                CommandV1::Deliver {
                    mail_from: String::new(),
                    recipients: vec!["alice@example.org".into(), "bob@example.org".into()],
                    received_at: i64::from(round * 1000 + n),
                    body: body_of(&message(&format!("round {round} message {n}"))),
                },
            );
        }
        delivered += 400;
        let inbox = machine.read().accounts[&1].inbox_id().unwrap();
        // Flags on old mail (an early range), deletions spread over every range.
        let low = 1 + round * 37;
        apply(
            &machine,
            &mut index,
            CommandV1::StoreFlags {
                account: 1,
                mailbox: inbox,
                uids: vec![(low, low + 20)],
                op: FlagOp::Add,
                flags: flags(&[Flag::Seen, Flag::Keyword(format!("k{round}"))]),
            },
        );
        let doomed: Vec<(u32, u32)> = (0..8)
            .map(|k| {
                let uid = 1 + (round * 131 + k * 1009) % delivered;
                (uid, uid)
            })
            .collect();
        apply(
            &machine,
            &mut index,
            CommandV1::StoreFlags {
                account: 1,
                mailbox: inbox,
                uids: doomed.clone(),
                op: FlagOp::Add,
                flags: flags(&[Flag::Deleted]),
            },
        );
        apply(
            &machine,
            &mut index,
            CommandV1::Expunge {
                account: 1,
                mailbox: inbox,
                uids: None,
            },
        );
        apply(
            &machine,
            &mut index,
            CommandV1::Copy {
                account: 1,
                from: inbox,
                uids: vec![(low + 100, low + 110)],
                to: archive,
                remove_source: round % 2 == 0,
            },
        );
        if round == 12 {
            apply(
                &machine,
                &mut index,
                CommandV1::RenameMailbox {
                    account: 2,
                    from: "INBOX".into(),
                    to: "Old".into(),
                    now: 2_000_000_000,
                },
            );
        }
        let builder = machine.begin_snapshot();
        let mut local = Vec::new();
        builder.write_to(&mut local).unwrap();
        builder.kept();
        drop(builder);
        // Nothing changed since: nothing to write.
        let (_, stats) =
            snapshot::write_chunks(&machine.read().capture(), &machine.chunks, None).unwrap();
        assert_eq!(stats.written, 0, "round {round}");
        last_local = local.clone();
        if round % 6 == 5 {
            // A follower installing it from the transfer stream.
            let mut transfer = Vec::new();
            machine
                .write_transfer(&mut local.as_slice(), &mut transfer)
                .unwrap();
            let other_dir = tempfile::tempdir().unwrap();
            let other = MailStateMachine::open(other_dir.path()).unwrap();
            install(&other, &machine, &transfer).unwrap();
            assert_eq!(*other.read(), *machine.read(), "round {round}");
        }
    }
    // A restart on the same folder restores the last snapshot from its chunks.
    let expected = machine.read().clone();
    drop(machine);
    let restarted = MailStateMachine::open(dir.path()).unwrap();
    restarted.restore(&mut last_local.as_slice(), true).unwrap();
    assert_eq!(*restarted.read(), expected);
}

/// MULTIAPPEND (`CommandV9::AppendMany`): a batch goes in with consecutive UIDs, or, when
/// apply refuses it (here: the keywords of the whole batch are too many for the mailbox,
/// though each message's alone would fit, which no check before proposing sees), nothing
/// of it does, and its bodies are not kept.
#[tokio::test]
async fn append_many_adds_the_whole_batch_or_nothing() {
    let fx = Fixture::new().await;
    let store = &fx.store;
    let alice = fx.account("alice@example.org").await;
    let inbox = fx.mailbox(alice, "INBOX");
    let seen: FlagSet = [Flag::Seen].into_iter().collect();
    let (uidvalidity, new) = store
        .append_many(
            alice,
            inbox.id,
            vec![
                (seen.clone(), 10, 60, message("one")),
                (FlagSet::new(), 20, 0, message("two")),
                (FlagSet::new(), 30, 0, message("three")),
            ],
        )
        .await
        .unwrap();
    assert_eq!(uidvalidity, inbox.uidvalidity);
    assert_eq!(new, vec![1, 2, 3]);
    let view = fx.mailbox(alice, "INBOX");
    assert_eq!(uids(&view), vec![1, 2, 3]);
    assert_eq!(view.messages[0].flags, seen);
    assert_eq!(view.messages[0].internal_date_offset_min, 60);
    let files = fx.blob_files();

    let keywords = |from: usize| -> FlagSet {
        (from..from + 200)
            .map(|k| Flag::Keyword(format!("k{k}")))
            .collect()
    };
    let refused = store
        .append_many(
            alice,
            inbox.id,
            vec![
                (keywords(0), 0, 0, message("four")),
                (keywords(200), 0, 0, message("five")),
            ],
        )
        .await;
    assert!(
        matches!(refused, Err(StoreError::Invalid(_))),
        "{refused:?}"
    );
    let view = fx.mailbox(alice, "INBOX");
    assert_eq!(uids(&view), vec![1, 2, 3]);
    assert_eq!(view.uidnext, 4);
    assert_eq!(store.mailbox_keywords(alice, inbox.id).len(), 0);
    assert_eq!(store.quota(alice).unwrap().usage.messages, 3);
    assert_eq!(fx.blob_files(), files);
}
