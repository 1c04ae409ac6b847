//! The cost of a write to a mailbox that sessions have selected: the store's apply plus the
//! selected views' refresh. With a shared immutable structure it must not grow with the
//! mailbox (it did: every STORE or delivery copied the whole message list, and every refresh
//! compared it whole).
//!
//! `cargo test --lib selected_cost -- --nocapture` prints one `selected_view_cost` line per size.

use std::time::{Duration, Instant};

use super::Selected;
use crate::store::{AccountId, Delivery, Flag, FlagOp, FlagSet, MailStore, MailboxId, Uid};

const STORES: usize = 1_000;
const DELIVERIES: usize = 200;

/// A store whose INBOX holds `at_least` messages (one delivery, then COPYs doubling it).
async fn mailbox_of(dir: &std::path::Path, at_least: usize) -> (MailStore, AccountId, MailboxId) {
    let store = MailStore::open_local(dir).expect("store");
    store.add_domain("example.org").await.expect("domain");
    store
        .add_account("alice@example.org", "correct horse")
        .await
        .expect("account");
    let alice = store
        .authenticate("alice@example.org", "correct horse")
        .await
        .expect("login");
    deliver(&store, 0).await;
    let inbox = store.mailbox_by_name(alice, "INBOX").expect("inbox").id;
    loop {
        let view = store.mailbox_view(alice, inbox).expect("view");
        if view.messages.len() >= at_least {
            break;
        }
        let uids: Vec<Uid> = view.messages.iter().map(|m| m.uid).collect();
        store.copy(alice, inbox, uids, inbox).await.expect("copy");
    }
    (store, alice, inbox)
}

async fn deliver(store: &MailStore, n: usize) {
    let raw = format!("From: a@example.net\r\nSubject: m{n}\r\n\r\nbody {n}\r\n").into_bytes();
    store
        .deliver(Delivery {
            mail_from: "a@example.net".into(),
            recipients: vec!["alice@example.org".into()],
            body: raw.into(),
            received_at: 1_700_000_000,
        })
        .await
        .expect("delivery");
}

/// (per STORE, per delivery) with two sessions holding the mailbox selected: the writer,
/// which reports its own change, and an idle one, which is told of it.
async fn cost_at(at_least: usize) -> (usize, Duration, Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, alice, inbox) = mailbox_of(dir.path(), at_least).await;
    let view = || store.mailbox_view(alice, inbox).expect("view");
    let size = view().messages.len();
    let mut writer = Selected::open(view(), false, 1);
    let mut idle = Selected::open(view(), false, 1);
    let mut out = Vec::new();
    let seen: FlagSet = [Flag::Seen].into();

    let started = Instant::now();
    let mut in_store = Duration::ZERO;
    for n in 0..STORES {
        // Spread over the mailbox, so the writes do not all land in one chunk.
        let uid = writer.messages[(n * 7919) % size].uid;
        let op = if n % 2 == 0 {
            FlagOp::Add
        } else {
            FlagOp::Remove
        };
        let t = Instant::now();
        store
            .store_flags(alice, inbox, vec![uid], op, seen.clone())
            .await
            .expect("store");
        in_store += t.elapsed();
        writer.refresh(&store, alice, false, &[uid], &mut out);
        idle.refresh(&store, alice, true, &[], &mut out);
        out.clear();
    }
    let per_store = started.elapsed() / STORES as u32;
    println!(
        "selected_view_cost messages={size} us_in_store_apply_per_store={}",
        (in_store / STORES as u32).as_micros()
    );

    let started = Instant::now();
    for n in 0..DELIVERIES {
        deliver(&store, n + 1).await;
        idle.refresh(&store, alice, true, &[], &mut out);
        writer.refresh(&store, alice, true, &[], &mut out);
        out.clear();
    }
    let per_delivery = started.elapsed() / DELIVERIES as u32;
    assert_eq!(idle.messages.len(), size + DELIVERIES);
    (size, per_store, per_delivery)
}

#[tokio::test]
async fn selected_cost_does_not_grow_with_the_mailbox() {
    let (small, small_store, small_delivery) = cost_at(1_000).await;
    let (large, large_store, large_delivery) = cost_at(100_000).await;
    for (size, store, delivery) in [
        (small, small_store, small_delivery),
        (large, large_store, large_delivery),
    ] {
        println!(
            "selected_view_cost messages={size} us_per_store={} us_per_delivery={} \
             (stores={STORES} deliveries={DELIVERIES}, two sessions selected)",
            store.as_micros(),
            delivery.as_micros()
        );
    }
    // Printed, not asserted: timings on a shared machine are noisy. What is asserted is
    // that both views followed every write (sizes above) with the lists shared.
    assert!(large >= 100_000 && small >= 1_000);
}
