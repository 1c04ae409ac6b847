//! IMAP session: arbitrary client bytes, in arbitrary chunks, through `Session::handle_input`
//! over a local store (a temporary folder made once per process), before or after LOGIN.
//! Never panics, every output ends a line, and nothing the session does changes the data of
//! another account (bob's mailboxes stay as they were).
//!
//! The store is shared by all runs (opening one per run would cost more than the run), so
//! what earlier inputs created (mailboxes, appended messages) is still there: a crash found
//! here may need the run's whole sequence to reproduce.
//!
//! Input layout: byte 0 = flags, bytes 1..9 = seed of the chunk sizes, the rest = stream.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kermail::imap::{Action, AuthCache, ConnectionInfo, HeaderCache, ImapConfig, Session};
use kermail::store::{AccountId, Delivery, MailStore};
use libfuzzer_sys::fuzz_target;

const USER: &str = "alice@example.org";
const OTHER: &str = "bob@example.org";
const PASSWORD: &str = "correct horse battery";

struct World {
    _dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
    store: MailStore,
    config: Arc<ImapConfig>,
    headers: Arc<HeaderCache>,
    logins: Arc<AuthCache>,
    bob: AccountId,
    bob_before: String,
}

fn message(subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: Carol <carol@example.net>\r\nTo: alice@example.org\r\nSubject: {subject}\r\n\
         Date: Tue, 14 Nov 2023 22:13:20 +0000\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n--b1\r\n\
         Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n\
         aGVsbG8=\r\n--b1--\r\n"
    )
    .into_bytes()
}

/// Everything of bob's that alice's session must not change.
fn bob_state(store: &MailStore, bob: AccountId) -> String {
    let mut text = format!("{:?}", store.list_mailboxes(bob));
    for mailbox in store.list_mailboxes(bob) {
        if let Some(view) = store.mailbox_view(bob, mailbox.id) {
            text.push_str(&format!("{:?}", view.messages));
        }
    }
    text
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary folder");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let store = MailStore::open_local(dir.path()).expect("local store");
        let bob = runtime.block_on(async {
            store.add_domain("example.org").await.expect("domain");
            store.add_account(USER, PASSWORD).await.expect("alice");
            store.add_account(OTHER, PASSWORD).await.expect("bob");
            for (i, to) in [USER, USER, OTHER, USER].iter().enumerate() {
                store
                    .deliver(Delivery {
                        mail_from: "carol@example.net".into(),
                        recipients: vec![(*to).into()],
                        body: message(&format!("hello {i}"), "caf\u{e9} body text").into(),
                        received_at: 1_700_000_000 + i as i64,
                    })
                    .await
                    .expect("delivery");
            }
            store.authenticate(OTHER, PASSWORD).await.expect("bob id")
        });
        let config = ImapConfig::default();
        let headers = Arc::new(HeaderCache::new(config.header_cache_bytes));
        let bob_before = bob_state(&store, bob);
        World {
            _dir: dir,
            runtime,
            store,
            config: Arc::new(config),
            headers,
            logins: Arc::new(AuthCache::new(Duration::from_secs(3600))),
            bob,
            bob_before,
        }
    })
}

fn check_output(out: &[u8]) {
    assert!(
        out.is_empty() || out.ends_with(b"\r\n"),
        "output does not end a line: {:?}",
        String::from_utf8_lossy(&out[out.len().saturating_sub(200)..])
    );
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let w = world();
    let flags = data[0];
    let mut seed = u64::from_le_bytes(data[1..9].try_into().unwrap_or([0; 8])) | 1;
    let stream = &data[9..];
    let logged_in = flags & 1 == 0;
    let max_chunk = 1 + ((flags >> 2) as usize) * 16;

    let mut session = Session::new(
        w.store.clone(),
        w.config.clone(),
        w.headers.clone(),
        w.logins.clone(),
        ConnectionInfo {
            peer: "127.0.0.1:40000".parse().expect("address"),
            secure: flags & 2 != 0,
            loopback: true,
        },
    );
    w.runtime.block_on(async {
        let mut out = Vec::new();
        session.greeting(&mut out);
        if logged_in {
            let login = format!("L LOGIN {USER} \"{PASSWORD}\"\r\n");
            let action = session.handle_input(login.as_bytes(), &mut out).await;
            assert_eq!(action, Action::Continue);
            assert!(
                session.is_authenticated(),
                "{}",
                String::from_utf8_lossy(&out)
            );
        }
        let mut rest = stream;
        while !rest.is_empty() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let n = 1 + (seed as usize) % max_chunk;
            let (chunk, tail) = rest.split_at(n.min(rest.len()));
            rest = tail;
            out.clear();
            let action = session.handle_input(chunk, &mut out).await;
            check_output(&out);
            match action {
                Action::Continue => {}
                Action::StartTls => session.tls_established(),
                Action::Close => break,
            }
            if session.is_idling() {
                out.clear();
                session.idle_wakeup(&mut out);
                check_output(&out);
            }
        }
        out.clear();
        session.shutdown(&mut out);
        check_output(&out);
    });
    assert_eq!(
        bob_state(&w.store, w.bob),
        w.bob_before,
        "alice's session changed bob's data"
    );
});
