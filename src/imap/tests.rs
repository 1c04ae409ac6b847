//! Byte-transcript tests of the session against a local store, and real-socket tests of the
//! driver (STARTTLS, IMAPS, IDLE, shutdown).

use std::sync::Arc;
use std::time::Duration;

use super::cache::{AuthCache, HeaderCache};
use super::config::ImapConfig;
use super::session::{Action, ConnectionInfo, Session};
use crate::store::{Delivery, MailStore};

const PASSWORD: &str = "correct horse battery";
const USER: &str = "alice@example.org";

struct Harness {
    _dir: tempfile::TempDir,
    store: MailStore,
    session: Session,
}

async fn store() -> (tempfile::TempDir, MailStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = MailStore::open_local(dir.path()).unwrap();
    store.add_domain("example.org").await.unwrap();
    store.add_account(USER, PASSWORD).await.unwrap();
    store
        .add_account("bob@example.org", PASSWORD)
        .await
        .unwrap();
    (dir, store)
}

fn session(store: &MailStore, loopback: bool, secure: bool) -> Session {
    Session::new(
        store.clone(),
        Arc::new(ImapConfig::default()),
        Arc::new(HeaderCache::new(ImapConfig::default().header_cache_bytes)),
        Arc::new(AuthCache::new(Duration::from_secs(60))),
        ConnectionInfo {
            peer: "127.0.0.1:40000".parse().unwrap(),
            secure,
            loopback,
        },
    )
}

impl Harness {
    async fn new() -> Harness {
        let (dir, store) = store().await;
        let session = session(&store, true, false);
        Harness {
            _dir: dir,
            store,
            session,
        }
    }

    async fn logged_in() -> Harness {
        let mut h = Harness::new().await;
        let out = h.run(&format!("L LOGIN {USER} \"{PASSWORD}\"\r\n")).await;
        assert!(out.starts_with("L OK [CAPABILITY"), "{out}");
        h
    }

    async fn selected(subjects: &[&str]) -> Harness {
        let mut h = Harness::logged_in().await;
        for subject in subjects {
            h.deliver(subject).await;
        }
        let out = h.run("S SELECT INBOX\r\n").await;
        assert!(out.contains("S OK [READ-WRITE]"), "{out}");
        h
    }

    async fn deliver(&self, subject: &str) {
        self.store
            .deliver(Delivery {
                mail_from: "a@example.net".into(),
                recipients: vec![USER.into()],
                body: message(subject).into(),
                received_at: 1_700_000_000,
            })
            .await
            .unwrap();
    }

    async fn run_bytes(&mut self, input: &[u8]) -> (Vec<u8>, Action) {
        let mut out = Vec::new();
        let action = self.session.handle_input(input, &mut out).await;
        (out, action)
    }

    async fn run(&mut self, input: &str) -> String {
        let (out, _) = self.run_bytes(input.as_bytes()).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Runs `input` and checks the output is exactly `expected`.
    async fn check(&mut self, input: &str, expected: &str) {
        let out = self.run(input).await;
        assert_eq!(out, expected, "after {input:?}");
    }
}

fn message(subject: &str) -> Vec<u8> {
    format!(
        "From: Ann <a@example.net>\r\nTo: alice@example.org\r\nSubject: {subject}\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\r\n\r\nbody of {subject}\r\n"
    )
    .into_bytes()
}

#[tokio::test]
async fn greeting_capability_noop_logout() {
    let mut h = Harness::new().await;
    let mut out = Vec::new();
    h.session.greeting(&mut out);
    let greeting = String::from_utf8(out).unwrap();
    assert!(greeting.starts_with("* OK [CAPABILITY IMAP4rev1 "));
    assert!(greeting.contains(" AUTH=PLAIN") && greeting.contains(" STARTTLS"));
    let out = h.run("A1 CAPABILITY\r\n").await;
    assert!(out.contains("IDLE") && out.contains("UIDPLUS") && out.contains("MOVE"));
    assert!(out.contains("LITERAL+") && out.contains("SASL-IR") && out.contains("SPECIAL-USE"));
    assert!(out.ends_with("A1 OK CAPABILITY completed\r\n"));
    h.check("A2 NOOP\r\n", "A2 OK completed\r\n").await;
    let (out, action) = h.run_bytes(b"A3 LOGOUT\r\n").await;
    assert_eq!(out, b"* BYE logging out\r\nA3 OK LOGOUT completed\r\n");
    assert_eq!(action, Action::Close);
}

#[tokio::test]
async fn plaintext_login_is_refused_off_loopback_until_tls() {
    let (_dir, store) = store().await;
    let mut s = session(&store, false, false);
    let mut out = Vec::new();
    s.handle_input(b"A1 CAPABILITY\r\n", &mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(text.contains("STARTTLS") && text.contains("LOGINDISABLED"));
    assert!(!text.contains("AUTH=PLAIN"));
    out.clear();
    s.handle_input(
        format!("A2 LOGIN {USER} \"{PASSWORD}\"\r\nA3 AUTHENTICATE PLAIN\r\n").as_bytes(),
        &mut out,
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out),
        "A2 NO [PRIVACYREQUIRED] use STARTTLS first\r\nA3 NO [PRIVACYREQUIRED] use STARTTLS first\r\n"
    );
    out.clear();
    // Pipelined plaintext after STARTTLS is discarded.
    let action = s
        .handle_input(b"A4 STARTTLS\r\nA5 NOOP\r\n", &mut out)
        .await;
    assert_eq!(action, Action::StartTls);
    assert_eq!(out, b"A4 OK begin TLS negotiation now\r\n");
    s.tls_established();
    out.clear();
    s.handle_input(
        format!("A6 LOGIN {USER} \"{PASSWORD}\"\r\n").as_bytes(),
        &mut out,
    )
    .await;
    assert!(String::from_utf8_lossy(&out).starts_with("A6 OK [CAPABILITY"));
}

#[tokio::test]
async fn authenticate_plain_with_and_without_initial_response() {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("\0{USER}\0{PASSWORD}"));
    let mut h = Harness::new().await;
    let out = h.run(&format!("A1 AUTHENTICATE PLAIN {encoded}\r\n")).await;
    assert!(out.starts_with("A1 OK [CAPABILITY"), "{out}");

    let mut h = Harness::new().await;
    h.check("A1 AUTHENTICATE PLAIN\r\n", "+ \r\n").await;
    let out = h.run(&format!("{encoded}\r\n")).await;
    assert!(out.starts_with("A1 OK [CAPABILITY"), "{out}");

    let mut h = Harness::new().await;
    h.check("A1 AUTHENTICATE PLAIN\r\n", "+ \r\n").await;
    h.check("*\r\n", "A1 BAD AUTHENTICATE cancelled\r\n").await;
}

#[tokio::test]
async fn failed_logins_close_the_session_after_the_limit() {
    let mut h = Harness::new().await;
    for tag in ["A1", "A2"] {
        h.check(
            &format!("{tag} LOGIN {USER} wrongpassword\r\n"),
            &format!("{tag} NO [AUTHENTICATIONFAILED] invalid credentials\r\n"),
        )
        .await;
    }
    let (out, action) = h
        .run_bytes(format!("A3 LOGIN {USER} nope\r\n").as_bytes())
        .await;
    assert!(String::from_utf8_lossy(&out).ends_with("* BYE too many failed login attempts\r\n"));
    assert_eq!(action, Action::Close);
}

#[tokio::test]
async fn commands_before_login_and_garbage_get_bad() {
    let mut h = Harness::new().await;
    h.check("A1 SELECT INBOX\r\n", "A1 BAD log in first\r\n")
        .await;
    h.check("A2 FROB\r\n", "A2 BAD syntax error in command\r\n")
        .await;
    h.check("\x01\x02\r\n", "* BAD syntax error in command\r\n")
        .await;
    h.check("A3 NOOP\r\n", "A3 OK completed\r\n").await;
}

#[tokio::test]
async fn list_shows_special_use_children_and_lsub() {
    let mut h = Harness::logged_in().await;
    let out = h.run("C CREATE Work/Projects\r\n").await;
    assert!(
        out.starts_with("C OK [MAILBOXID (M") && out.ends_with(")] CREATE completed\r\n"),
        "{out}"
    );
    let out = h.run("L LIST \"\" \"*\"\r\n").await;
    for expected in [
        "* LIST (\\HasNoChildren) \"/\" \"INBOX\"\r\n",
        "* LIST (\\HasNoChildren \\Sent) \"/\" \"Sent\"\r\n",
        "* LIST (\\HasNoChildren \\Drafts) \"/\" \"Drafts\"\r\n",
        "* LIST (\\HasNoChildren \\Trash) \"/\" \"Trash\"\r\n",
        "* LIST (\\HasNoChildren \\Junk) \"/\" \"Junk\"\r\n",
        "* LIST (\\HasNoChildren \\Archive) \"/\" \"Archive\"\r\n",
        "* LIST (\\HasNoChildren) \"/\" \"Work/Projects\"\r\n",
    ] {
        assert!(out.contains(expected), "{expected:?} missing from {out}");
    }
    assert!(
        out.contains("\"Work\"\r\n") && out.contains("\\HasChildren"),
        "{out}"
    );
    let out = h.run("L2 LIST \"\" \"%\"\r\n").await;
    assert!(!out.contains("Work/Projects"), "{out}");
    h.check(
        "L3 LIST \"\" \"\"\r\n",
        "* LIST (\\Noselect) \"/\" \"\"\r\nL3 OK LIST completed\r\n",
    )
    .await;
    h.check(
        "L4 LIST \"\" inbox\r\n",
        "* LIST (\\HasNoChildren) \"/\" \"INBOX\"\r\nL4 OK LIST completed\r\n",
    )
    .await;
    h.check("S SUBSCRIBE Work/Projects\r\n", "S OK completed\r\n")
        .await;
    let out = h.run("L5 LSUB \"\" \"Work/*\"\r\n").await;
    assert_eq!(
        out,
        "* LSUB () \"/\" \"Work/Projects\"\r\nL5 OK LSUB completed\r\n"
    );
    h.check("U UNSUBSCRIBE Work/Projects\r\n", "U OK completed\r\n")
        .await;
    h.check("L6 LSUB \"\" \"Work/*\"\r\n", "L6 OK LSUB completed\r\n")
        .await;
}

#[tokio::test]
async fn create_rename_delete_and_their_errors() {
    let mut h = Harness::logged_in().await;
    let out = h.run("C1 CREATE Lists\r\n").await;
    assert!(
        out.starts_with("C1 OK [MAILBOXID (M") && out.ends_with(")] CREATE completed\r\n"),
        "{out}"
    );
    let out = h.run("C2 CREATE Lists\r\n").await;
    assert!(out.starts_with("C2 NO [ALREADYEXISTS]"), "{out}");
    h.check(
        "C3 CREATE inbox\r\n",
        "C3 NO [ALREADYEXISTS] INBOX always exists\r\n",
    )
    .await;
    h.check("R1 RENAME Lists Groups\r\n", "R1 OK RENAME completed\r\n")
        .await;
    let out = h.run("R2 RENAME Lists Other\r\n").await;
    assert!(out.starts_with("R2 NO [NONEXISTENT]"), "{out}");
    h.check("D1 DELETE Groups\r\n", "D1 OK DELETE completed\r\n")
        .await;
    let out = h.run("D2 DELETE Groups\r\n").await;
    assert!(out.starts_with("D2 NO [NONEXISTENT]"), "{out}");
    h.check(
        "D3 DELETE INBOX\r\n",
        "D3 NO [CANNOT] INBOX cannot be deleted\r\n",
    )
    .await;
    h.check(
        "S1 SELECT Nowhere\r\n",
        "S1 NO [NONEXISTENT] no such mailbox\r\n",
    )
    .await;
}

#[tokio::test]
async fn select_examine_status_reports_counts() {
    let mut h = Harness::logged_in().await;
    h.deliver("one").await;
    h.deliver("two").await;
    let view = h
        .store
        .mailbox_by_name(1, "INBOX")
        .or_else(|| {
            h.store
                .mailbox_by_name(h.session.account().unwrap(), "INBOX")
        })
        .unwrap();
    let out = h.run("S SELECT INBOX\r\n").await;
    let expected = format!(
        "* FLAGS (\\Seen \\Answered \\Flagged \\Deleted \\Draft)\r\n* 2 EXISTS\r\n* 2 RECENT\r\n* OK [UNSEEN 1] first unseen message\r\n* OK [PERMANENTFLAGS (\\Seen \\Answered \\Flagged \\Deleted \\Draft \\*)] flags permitted\r\n* OK [UIDVALIDITY {}] UIDs valid\r\n* OK [UIDNEXT 3] predicted next UID\r\n* OK [MAILBOXID ({})] Ok\r\n* OK [HIGHESTMODSEQ {}] highest modseq\r\nS OK [READ-WRITE] SELECT completed\r\n",
        view.uidvalidity,
        super::objectid::mailbox_id(view.id, view.uidvalidity),
        view.highest_modseq
    );
    assert_eq!(out, expected);
    let out = h.run("E EXAMINE INBOX\r\n").await;
    assert!(
        out.starts_with("* OK [CLOSED]") && out.ends_with("E OK [READ-ONLY] EXAMINE completed\r\n"),
        "{out}"
    );
    let out = h.run("T STORE 1 +FLAGS (\\Seen)\r\n").await;
    assert_eq!(out, "T NO [READ-ONLY] mailbox is read-only\r\n");
    let out = h
        .run("U STATUS INBOX (MESSAGES UIDNEXT UNSEEN UIDVALIDITY RECENT)\r\n")
        .await;
    assert_eq!(
        out,
        format!("* STATUS \"INBOX\" (MESSAGES 2 UIDNEXT 3 UNSEEN 2 UIDVALIDITY {} RECENT 0)\r\nU OK STATUS completed\r\n", view.uidvalidity)
    );
    h.check("V UNSELECT\r\n", "V OK UNSELECT completed\r\n")
        .await;
    h.check("W FETCH 1 FLAGS\r\n", "W BAD no mailbox selected\r\n")
        .await;
}

#[tokio::test]
async fn append_with_flags_date_and_both_literal_kinds_reads_back_byte_exact() {
    let mut h = Harness::logged_in().await;
    let body = "Subject: appended\r\n\r\nhello\r\n";
    let out = h
        .run(&format!(
            "A1 APPEND Drafts (\\Draft \\Seen) \"14-Nov-2023 23:13:20 +0100\" {{{}}}\r\n",
            body.len()
        ))
        .await;
    assert_eq!(out, "+ Ready for literal data\r\n");
    let out = h.run(&format!("{body}\r\n")).await;
    let uidvalidity = h
        .store
        .mailbox_by_name(h.session.account().unwrap(), "Drafts")
        .unwrap()
        .uidvalidity;
    assert_eq!(
        out,
        format!("A1 OK [APPENDUID {uidvalidity} 1] APPEND completed\r\n")
    );
    let out = h
        .run(&format!(
            "A2 APPEND Drafts {{{}+}}\r\n{body}\r\n",
            body.len()
        ))
        .await;
    assert_eq!(
        out,
        format!("A2 OK [APPENDUID {uidvalidity} 2] APPEND completed\r\n")
    );
    let out = h.run("A3 APPEND Nowhere {1+}\r\nx\r\n").await;
    assert_eq!(out, "A3 NO [TRYCREATE] no such mailbox\r\n");

    h.run("S SELECT Drafts\r\n").await;
    let out = h
        .run("F UID FETCH 1 (FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[])\r\n")
        .await;
    assert_eq!(
        out,
        format!(
            "* 1 FETCH (UID 1 FLAGS (\\Seen \\Draft \\Recent) INTERNALDATE \"14-Nov-2023 23:13:20 +0100\" RFC822.SIZE {} BODY[] {{{}}}\r\n{body})\r\nF OK FETCH completed\r\n",
            body.len(),
            body.len()
        )
    );
}

#[tokio::test]
async fn oversized_literals_and_lines_are_refused() {
    let (_dir, store) = store().await;
    let config = ImapConfig {
        max_literal_size_bytes: 10,
        max_line_length_bytes: 100,
        ..ImapConfig::default()
    };
    let mut s = Session::new(
        store.clone(),
        Arc::new(config),
        Arc::new(HeaderCache::new(0)),
        Arc::new(AuthCache::new(Duration::ZERO)),
        ConnectionInfo {
            peer: "127.0.0.1:1".parse().unwrap(),
            secure: false,
            loopback: true,
        },
    );
    let mut out = Vec::new();
    s.handle_input(b"A1 APPEND INBOX {11}\r\nA2 NOOP\r\n", &mut out)
        .await;
    assert_eq!(
        out,
        b"A1 NO [TOOBIG] literal too large\r\nA2 OK completed\r\n"
    );
    out.clear();
    let action = s.handle_input(&[b'x'; 200], &mut out).await;
    assert_eq!(out, b"* BYE command line too long\r\n");
    assert_eq!(action, Action::Close);
}

#[tokio::test]
async fn fetch_items_sections_and_implicit_seen() {
    let mut h = Harness::selected(&["first", "second"]).await;
    let raw = message("first");
    let out = h
        .run("F1 FETCH 1:* (BODY.PEEK[HEADER.FIELDS (From Subject)])\r\n")
        .await;
    assert_eq!(
        out,
        "* 1 FETCH (BODY[HEADER.FIELDS (From Subject)] {45}\r\nFrom: Ann <a@example.net>\r\nSubject: first\r\n\r\n)\r\n\
         * 2 FETCH (BODY[HEADER.FIELDS (From Subject)] {46}\r\nFrom: Ann <a@example.net>\r\nSubject: second\r\n\r\n)\r\n\
         F1 OK FETCH completed\r\n"
    );
    let out = h
        .run("F2 FETCH 1 (BODY.PEEK[TEXT]<0.4> RFC822.SIZE)\r\n")
        .await;
    assert_eq!(
        out,
        format!(
            "* 1 FETCH (BODY[TEXT]<0> {{4}}\r\nbody RFC822.SIZE {})\r\nF2 OK FETCH completed\r\n",
            raw.len()
        )
    );
    let out = h.run("F3 FETCH 1 (ENVELOPE BODYSTRUCTURE)\r\n").await;
    assert!(out.starts_with("* 1 FETCH (ENVELOPE (\"Tue, 14 Nov 2023 22:13:20 +0000\" \"first\" ((\"Ann\" NIL \"a\" \"example.net\"))"), "{out}");
    assert!(out.contains("BODYSTRUCTURE (\"TEXT\" \"plain\""), "{out}");
    // A non-peek body fetch sets \Seen and reports the new flags.
    let out = h.run("F4 FETCH 2 BODY[]\r\n").await;
    assert!(
        out.starts_with("* 2 FETCH (FLAGS (\\Seen \\Recent) BODY[] {"),
        "{out}"
    );
    h.check(
        "F5 FETCH 2 FLAGS\r\n",
        "* 2 FETCH (FLAGS (\\Seen \\Recent))\r\nF5 OK FETCH completed\r\n",
    )
    .await;
    h.check(
        "F6 FETCH 3 FLAGS\r\n",
        "F6 BAD invalid message sequence number\r\n",
    )
    .await;
    h.check(
        "F7 UID FETCH 5:* UID\r\n",
        "* 2 FETCH (UID 2)\r\nF7 OK FETCH completed\r\n",
    )
    .await;
    let out = h.run("F8 FETCH 1 FAST\r\n").await;
    assert_eq!(out, format!("* 1 FETCH (FLAGS (\\Recent) INTERNALDATE \"14-Nov-2023 22:13:20 +0000\" RFC822.SIZE {})\r\nF8 OK FETCH completed\r\n", raw.len()));
}

#[tokio::test]
async fn fetch_refuses_more_body_bytes_than_the_limit() {
    let (_dir, store) = store().await;
    let config = ImapConfig {
        max_fetch_body_bytes: 200,
        ..ImapConfig::default()
    };
    let mut h = Harness {
        session: Session::new(
            store.clone(),
            Arc::new(config),
            Arc::new(HeaderCache::new(0)),
            Arc::new(AuthCache::new(Duration::ZERO)),
            ConnectionInfo {
                peer: "127.0.0.1:1".parse().unwrap(),
                secure: false,
                loopback: true,
            },
        ),
        _dir,
        store,
    };
    h.run(&format!("L LOGIN {USER} \"{PASSWORD}\"\r\n")).await;
    h.deliver("a").await;
    h.deliver("b").await;
    h.run("S SELECT INBOX\r\n").await;
    h.check(
        "F1 FETCH 1:2 BODY[]\r\n",
        "F1 NO [LIMIT] too much at once; fetch fewer messages\r\n",
    )
    .await;
    // Nothing was marked \Seen by the refused fetch.
    h.check(
        "F2 FETCH 1:2 FLAGS\r\n",
        "* 1 FETCH (FLAGS (\\Recent))\r\n* 2 FETCH (FLAGS (\\Recent))\r\nF2 OK FETCH completed\r\n",
    )
    .await;
    let out = h.run("F3 FETCH 1 BODY.PEEK[]\r\n").await;
    assert!(out.ends_with("F3 OK FETCH completed\r\n"), "{out}");
}

#[tokio::test]
async fn store_reports_flags_unless_silent() {
    let mut h = Harness::selected(&["a", "b", "c"]).await;
    h.check(
        "T1 STORE 1:2 +FLAGS (\\Flagged $Work)\r\n",
        // $Work is new to the mailbox: FLAGS and PERMANENTFLAGS name it first.
        "* FLAGS (\\Seen \\Answered \\Flagged \\Deleted \\Draft $Work)\r\n\
         * OK [PERMANENTFLAGS (\\Seen \\Answered \\Flagged \\Deleted \\Draft $Work \\*)] flags permitted\r\n\
         * 1 FETCH (FLAGS (\\Flagged $Work \\Recent))\r\n* 2 FETCH (FLAGS (\\Flagged $Work \\Recent))\r\nT1 OK STORE completed\r\n",
    )
    .await;
    h.check(
        "T2 UID STORE 2 -FLAGS.SILENT ($Work)\r\n",
        "T2 OK STORE completed\r\n",
    )
    .await;
    h.check(
        "T3 UID STORE 3 FLAGS (\\Seen)\r\n",
        "* 3 FETCH (FLAGS (\\Seen \\Recent) UID 3)\r\nT3 OK STORE completed\r\n",
    )
    .await;
    h.check(
        "T4 FETCH 1:* FLAGS\r\n",
        "* 1 FETCH (FLAGS (\\Flagged $Work \\Recent))\r\n* 2 FETCH (FLAGS (\\Flagged \\Recent))\r\n* 3 FETCH (FLAGS (\\Seen \\Recent))\r\nT4 OK FETCH completed\r\n",
    )
    .await;
}

#[tokio::test]
async fn search_by_flags_and_headers() {
    let mut h = Harness::selected(&["apple pie", "banana", "apple tart"]).await;
    h.run("T STORE 2 +FLAGS.SILENT (\\Seen)\r\n").await;
    h.check(
        "S1 SEARCH SUBJECT apple\r\n",
        "* SEARCH 1 3\r\nS1 OK SEARCH completed\r\n",
    )
    .await;
    h.check(
        "S2 UID SEARCH SEEN\r\n",
        "* SEARCH 2\r\nS2 OK SEARCH completed\r\n",
    )
    .await;
    h.check(
        "S3 SEARCH UNSEEN BODY tart\r\n",
        "* SEARCH 3\r\nS3 OK SEARCH completed\r\n",
    )
    .await;
    h.check(
        "S4 SEARCH CHARSET UTF-8 SUBJECT banana\r\n",
        "* SEARCH 2\r\nS4 OK SEARCH completed\r\n",
    )
    .await;
    let out = h.run("S5 SEARCH CHARSET KOI8-R SUBJECT x\r\n").await;
    assert!(out.starts_with("S5 NO [BADCHARSET"), "{out}");
}

#[tokio::test]
async fn copy_and_move_answer_copyuid() {
    let mut h = Harness::selected(&["a", "b", "c"]).await;
    let account = h.session.account().unwrap();
    let archive = h
        .store
        .mailbox_by_name(account, "Archive")
        .unwrap()
        .uidvalidity;
    h.check(
        "C1 COPY 1:2 Archive\r\n",
        &format!("C1 OK [COPYUID {archive} 1:2 1:2] COPY completed\r\n"),
    )
    .await;
    h.check(
        "C2 COPY 1 Nowhere\r\n",
        "C2 NO [TRYCREATE] no such mailbox\r\n",
    )
    .await;
    let inbox = h
        .store
        .mailbox_by_name(account, "INBOX")
        .unwrap()
        .uidvalidity;
    h.check(
        "C3 COPY 3 INBOX\r\n",
        &format!("* 4 EXISTS\r\nC3 OK [COPYUID {inbox} 3 4] COPY completed\r\n"),
    )
    .await;
    h.check(
        "M1 UID MOVE 2 Archive\r\n",
        &format!("* OK [COPYUID {archive} 2 3] moved\r\n* 2 EXPUNGE\r\nM1 OK MOVE completed\r\n"),
    )
    .await;
    assert_eq!(
        h.store
            .mailbox_by_name(account, "Archive")
            .unwrap()
            .messages
            .len(),
        3
    );
    h.check(
        "F UID FETCH 1:* UID\r\n",
        "* 1 FETCH (UID 1)\r\n* 2 FETCH (UID 3)\r\n* 3 FETCH (UID 4)\r\nF OK FETCH completed\r\n",
    )
    .await;
}

#[tokio::test]
async fn expunge_uid_expunge_and_close() {
    let mut h = Harness::selected(&["a", "b", "c", "d"]).await;
    h.run("T STORE 1:4 +FLAGS.SILENT (\\Deleted)\r\n").await;
    h.check(
        "X1 UID EXPUNGE 2\r\n",
        "* 2 EXPUNGE\r\nX1 OK EXPUNGE completed\r\n",
    )
    .await;
    h.run("T STORE 3 -FLAGS.SILENT (\\Deleted)\r\n").await;
    h.check(
        "X2 EXPUNGE\r\n",
        "* 2 EXPUNGE\r\n* 1 EXPUNGE\r\nX2 OK EXPUNGE completed\r\n",
    )
    .await;
    h.check(
        "F FETCH 1:* UID\r\n",
        "* 1 FETCH (UID 4)\r\nF OK FETCH completed\r\n",
    )
    .await;
    h.run("T STORE 1 +FLAGS.SILENT (\\Deleted)\r\n").await;
    h.check("C CLOSE\r\n", "C OK CLOSE completed\r\n").await;
    let account = h.session.account().unwrap();
    assert!(h
        .store
        .mailbox_by_name(account, "INBOX")
        .unwrap()
        .messages
        .is_empty());
}

#[tokio::test]
async fn other_sessions_changes_wait_for_a_command_that_may_report_them() {
    let mut h = Harness::selected(&["a", "b"]).await;
    let mut other = session(&h.store, true, false);
    let mut out = Vec::new();
    other
        .handle_input(format!("L LOGIN {USER} \"{PASSWORD}\"\r\nS SELECT INBOX\r\nT STORE 1 +FLAGS.SILENT (\\Deleted)\r\nX EXPUNGE\r\nU STORE 1 +FLAGS.SILENT (\\Flagged)\r\n").as_bytes(), &mut out)
        .await;
    h.deliver("c").await;
    // No EXPUNGE during FETCH: message 1 keeps its number, the new one is announced.
    h.check(
        "F FETCH 1:* UID\r\n",
        "* 1 FETCH (UID 1)\r\n* 2 FETCH (UID 2)\r\n* 3 EXISTS\r\n* 2 FETCH (FLAGS (\\Flagged))\r\nF OK FETCH completed\r\n",
    )
    .await;
    // The NOOP also claims the new message as \Recent (the SELECT had claimed the others).
    h.check(
        "N NOOP\r\n",
        "* 1 EXPUNGE\r\n* 2 RECENT\r\nN OK completed\r\n",
    )
    .await;
    h.check(
        "G FETCH 1:* UID\r\n",
        "* 1 FETCH (UID 2)\r\n* 2 FETCH (UID 3)\r\nG OK FETCH completed\r\n",
    )
    .await;
}

#[tokio::test]
async fn idle_reports_a_delivery_and_ends_with_done() {
    let mut h = Harness::selected(&[]).await;
    h.check("F FETCH 1:* FLAGS\r\n", "F OK FETCH completed\r\n")
        .await;
    h.check("I IDLE\r\n", "+ idling\r\n").await;
    assert!(h.session.is_idling());
    h.deliver("new").await;
    let mut out = Vec::new();
    h.session.idle_wakeup(&mut out);
    assert_eq!(out, b"* 1 EXISTS\r\n");
    // The end of IDLE claims the new message as \Recent.
    h.check("DONE\r\n", "* 1 RECENT\r\nI OK IDLE terminated\r\n")
        .await;
    assert!(!h.session.is_idling());
}

#[tokio::test]
async fn append_to_the_selected_mailbox_reports_exists_and_others_changes() {
    let mut h = Harness::selected(&["a", "b"]).await;
    let mut other = session(&h.store, true, false);
    let mut out = Vec::new();
    other
        .handle_input(
            format!("L LOGIN {USER} \"{PASSWORD}\"\r\nS SELECT INBOX\r\nT STORE 1 +FLAGS.SILENT (\\Deleted)\r\nX EXPUNGE\r\n")
                .as_bytes(),
            &mut out,
        )
        .await;
    let uidvalidity = h
        .store
        .mailbox_by_name(h.session.account().unwrap(), "INBOX")
        .unwrap()
        .uidvalidity;
    h.check(
        "A APPEND INBOX {1+}\r\nx\r\n",
        &format!(
            "* 1 EXPUNGE\r\n* 2 EXISTS\r\nA OK [APPENDUID {uidvalidity} 3] APPEND completed\r\n"
        ),
    )
    .await;
    h.check(
        "A2 APPEND INBOX {1+}\r\ny\r\n",
        &format!("* 3 EXISTS\r\nA2 OK [APPENDUID {uidvalidity} 4] APPEND completed\r\n"),
    )
    .await;
    h.check(
        "F UID FETCH 1:* FLAGS\r\n",
        "* 1 FETCH (UID 2 FLAGS (\\Recent))\r\n* 2 FETCH (UID 3 FLAGS ())\r\n* 3 FETCH (UID 4 FLAGS ())\r\nF OK FETCH completed\r\n",
    )
    .await;
}

/// A cluster that cannot commit: every proposal fails as unavailable.
struct NoQuorum;

impl crate::store::Propose for NoQuorum {
    fn propose(
        &self,
        _command: Vec<u8>,
    ) -> crate::store::BoxFuture<'_, Result<Vec<u8>, crate::store::StoreError>> {
        Box::pin(async { Err(crate::store::StoreError::Unavailable("no quorum".into())) })
    }
}

/// A proposer whose proposals never complete (a leader that does not answer).
struct Stalled;

impl crate::store::Propose for Stalled {
    fn propose(
        &self,
        _command: Vec<u8>,
    ) -> crate::store::BoxFuture<'_, Result<Vec<u8>, crate::store::StoreError>> {
        Box::pin(std::future::pending())
    }
}

/// A SELECT whose \Recent claim does not commit goes on without it after
/// `RECENT_CLAIM_WAIT` instead of hanging until the proposal times out.
#[tokio::test]
async fn select_does_not_wait_for_a_stalled_recent_claim() {
    let h = Harness::selected(&[]).await;
    h.deliver("new").await;
    let machine = Arc::clone(h.store.machine());
    let stalled = MailStore::new(machine, Arc::new(Stalled));
    let mut s = session(&stalled, true, false);
    let mut out = Vec::new();
    let started = std::time::Instant::now();
    let answered = tokio::time::timeout(
        super::recent::RECENT_CLAIM_WAIT * 5,
        s.handle_input(
            format!("L LOGIN {USER} \"{PASSWORD}\"\r\nS SELECT INBOX\r\n").as_bytes(),
            &mut out,
        ),
    )
    .await;
    assert!(answered.is_ok(), "SELECT hung");
    assert!(started.elapsed() >= super::recent::RECENT_CLAIM_WAIT);
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("* 1 EXISTS\r\n* 0 RECENT\r\n") && text.contains("S OK [READ-WRITE]"),
        "{text}"
    );
}

#[tokio::test]
async fn writes_without_quorum_answer_no_unavailable_and_reads_still_work() {
    let mut h = Harness::selected(&["a"]).await;
    // A message nobody has claimed as \Recent: the SELECT below tries and goes on without.
    h.deliver("b").await;
    let machine = Arc::clone(h.store.machine());
    let read_only = MailStore::new(machine, Arc::new(NoQuorum));
    let mut s = session(&read_only, true, false);
    let mut out = Vec::new();
    // The login verifies against the local replica; no write is needed.
    s.handle_input(
        format!("L LOGIN {USER} \"{PASSWORD}\"\r\nS SELECT INBOX\r\nA APPEND INBOX {{1+}}\r\nx\r\nT STORE 1 +FLAGS (\\Flagged)\r\nC CREATE New\r\nF FETCH 1 (UID FLAGS)\r\n")
            .as_bytes(),
        &mut out,
    )
    .await;
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("* 2 EXISTS\r\n* 0 RECENT\r\n") && text.contains("S OK [READ-WRITE]"),
        "{text}"
    );
    assert!(text.contains("A NO [UNAVAILABLE]"), "{text}");
    assert!(text.contains("T NO [UNAVAILABLE]"), "{text}");
    assert!(text.contains("C NO [UNAVAILABLE]"), "{text}");
    assert!(
        text.contains("* 1 FETCH (UID 1 FLAGS ())\r\nF OK"),
        "{text}"
    );
    h.check(
        "N NOOP\r\n",
        // h owned "a" since its SELECT and now claims "b" too.
        "* 2 EXISTS\r\n* 2 RECENT\r\nN OK completed\r\n",
    )
    .await;
}

#[tokio::test]
async fn namespace_id_enable() {
    let mut h = Harness::logged_in().await;
    h.check(
        "N NAMESPACE\r\n",
        // ACL: other accounts' shared mailboxes are under "Other Users/".
        "* NAMESPACE ((\"\" \"/\")) ((\"Other Users/\" \"/\")) NIL\r\nN OK NAMESPACE completed\r\n",
    )
    .await;
    let out = h.run("I ID (\"name\" \"imaplib\")\r\n").await;
    assert!(
        out.starts_with("* ID (\"name\" \"kermail\"") && out.ends_with("I OK ID completed\r\n")
    );
    h.check(
        "E ENABLE CONDSTORE\r\n",
        "* ENABLED CONDSTORE\r\nE OK ENABLE completed\r\n",
    )
    .await;
}

#[tokio::test]
async fn one_account_cannot_open_another_accounts_mailboxes() {
    let mut h = Harness::logged_in().await;
    h.check(
        "S SELECT bob@example.org/INBOX\r\n",
        "S NO [NONEXISTENT] no such mailbox\r\n",
    )
    .await;
    let out = h.run("L LIST \"\" \"*\"\r\n").await;
    assert!(!out.contains("bob"), "{out}");
}

// ----- real sockets -----

mod sockets {
    use super::*;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};
    use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
    use tokio::net::TcpStream;
    use tokio_util::sync::CancellationToken;

    const DEADLINE: Duration = Duration::from_secs(10);

    /// Test client: accepts the server's self-signed certificate.
    #[derive(Debug)]
    struct AcceptAny;

    impl ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    fn connector() -> tokio_rustls::TlsConnector {
        crate::tls::install_crypto_provider();
        let config = rustls::ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny))
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    struct Server {
        _dir: tempfile::TempDir,
        store: MailStore,
        addr: std::net::SocketAddr,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    async fn server(implicit_tls: bool) -> Server {
        server_with(implicit_tls, ImapConfig::default()).await
    }

    async fn server_with(implicit_tls: bool, config: ImapConfig) -> Server {
        let (dir, store) = super::store().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls = crate::tls::self_signed(&["localhost".into()]).unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(crate::imap::serve(
            listener,
            implicit_tls,
            Arc::new(config),
            store.clone(),
            tls,
            shutdown.clone(),
        ));
        Server {
            _dir: dir,
            store,
            addr,
            shutdown,
            task,
        }
    }

    /// Reads lines until one starts with `prefix`; returns everything read.
    async fn read_until<S: AsyncRead + Unpin>(reader: &mut BufReader<S>, prefix: &str) -> String {
        let mut all = String::new();
        tokio::time::timeout(DEADLINE, async {
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).await.unwrap() == 0 {
                    panic!("connection closed; read so far: {all}");
                }
                all.push_str(&line);
                if line.starts_with(prefix) {
                    break;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no line starting with {prefix:?}; read: {all}"));
        all
    }

    async fn send<S: AsyncWrite + Unpin>(stream: &mut S, line: &str) {
        stream.write_all(line.as_bytes()).await.unwrap();
        stream.flush().await.unwrap();
    }

    #[tokio::test]
    async fn sessions_over_the_per_ip_limit_get_bye() {
        let config = ImapConfig {
            max_sessions_per_ip: 1,
            ..ImapConfig::default()
        };
        let server = server_with(false, config).await;
        let first = TcpStream::connect(server.addr).await.unwrap();
        let mut first = BufReader::new(first);
        read_until(&mut first, "* OK").await;
        let second = TcpStream::connect(server.addr).await.unwrap();
        let mut second = BufReader::new(second);
        read_until(&mut second, "* BYE too many connections").await;
        send(first.get_mut(), "A1 LOGOUT\r\n").await;
        read_until(&mut first, "A1 OK").await;
        server.shutdown.cancel();
        server.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn starttls_then_login_over_tls() {
        let server = server(false).await;
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let mut reader = BufReader::new(tcp);
        let greeting = read_until(&mut reader, "* OK").await;
        assert!(greeting.contains("STARTTLS"));
        send(reader.get_mut(), "A1 STARTTLS\r\n").await;
        read_until(&mut reader, "A1 OK").await;
        let tcp = reader.into_inner();
        let tls = connector()
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let mut reader = BufReader::new(tls);
        send(reader.get_mut(), "A2 CAPABILITY\r\n").await;
        let caps = read_until(&mut reader, "A2 OK").await;
        assert!(
            !caps.contains("STARTTLS") && caps.contains("AUTH=PLAIN"),
            "{caps}"
        );
        send(
            reader.get_mut(),
            &format!("A3 LOGIN {USER} \"{PASSWORD}\"\r\n"),
        )
        .await;
        let out = read_until(&mut reader, "A3 ").await;
        assert!(out.starts_with("A3 OK"), "{out}");
        server.shutdown.cancel();
        server.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn idle_over_implicit_tls_wakes_on_a_delivery_and_shutdown_says_bye() {
        let server = server(true).await;
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let tls = connector()
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let mut reader = BufReader::new(tls);
        read_until(&mut reader, "* OK").await;
        send(
            reader.get_mut(),
            &format!("A1 LOGIN {USER} \"{PASSWORD}\"\r\nA2 SELECT INBOX\r\nA3 IDLE\r\n"),
        )
        .await;
        read_until(&mut reader, "A2 OK").await;
        read_until(&mut reader, "+ ").await;
        server
            .store
            .deliver(Delivery {
                mail_from: "a@example.net".into(),
                recipients: vec![USER.into()],
                body: message("wake up").into(),
                received_at: 1_700_000_000,
            })
            .await
            .unwrap();
        read_until(&mut reader, "* 1 EXISTS").await;
        send(reader.get_mut(), "DONE\r\n").await;
        read_until(&mut reader, "A3 OK").await;
        server.shutdown.cancel();
        read_until(&mut reader, "* BYE").await;
        tokio::time::timeout(DEADLINE, server.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

/// Times the operations of `scripts/bench/imap` through the session (no sockets) on a mailbox
/// of KERMAIL_IMAP_BENCH_MESSAGES messages (default 300) and checks their answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn benchmark_operations_on_a_large_mailbox() {
    let n: usize = std::env::var("KERMAIL_IMAP_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let (_dir, store) = store().await;
    let account = store.authenticate(USER, PASSWORD).await.unwrap();
    let inbox = store.mailbox_by_name(account, "INBOX").unwrap().id;
    let filler = "x".repeat(800);
    for i in 0..n {
        let subject = if i % 10 == 0 {
            format!("needle {i}")
        } else {
            format!("message {i}")
        };
        let body = format!(
            "From: Sender {i} <s{i}@example.net>\r\nTo: {USER}\r\nSubject: {subject}\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\r\nMessage-ID: <{i}@example.net>\r\n\r\n{filler}\r\n"
        );
        store
            .append(
                account,
                inbox,
                Default::default(),
                1_700_000_000,
                0,
                body.into_bytes(),
            )
            .await
            .unwrap();
    }
    let mut s = session(&store, true, false);
    let mut out = Vec::new();
    let timed = |label: &str, started: std::time::Instant| {
        eprintln!(
            "imap bench n={n} {label}: {:.1} ms",
            started.elapsed().as_secs_f64() * 1000.0
        );
    };
    let started = std::time::Instant::now();
    s.handle_input(
        format!("A LOGIN {USER} \"{PASSWORD}\"\r\nB SELECT INBOX\r\n").as_bytes(),
        &mut out,
    )
    .await;
    timed("LOGIN+SELECT", started);
    assert!(String::from_utf8_lossy(&out).contains(&format!("* {n} EXISTS")));
    let count = |out: &[u8]| {
        String::from_utf8_lossy(out)
            .split("\r\n")
            .filter(|line| line.starts_with("* ") && line.contains(" FETCH ("))
            .count()
    };
    out.clear();
    let started = std::time::Instant::now();
    s.handle_input(b"C UID FETCH 1:* (FLAGS)\r\n", &mut out)
        .await;
    timed("UID FETCH 1:* (FLAGS)", started);
    assert_eq!(count(&out), n);
    for round in ["cold", "warm"] {
        out.clear();
        let started = std::time::Instant::now();
        s.handle_input(
            b"D FETCH 1:* (BODY.PEEK[HEADER.FIELDS (From Subject Date)])\r\n",
            &mut out,
        )
        .await;
        timed(&format!("FETCH 1:* header fields ({round})"), started);
        assert_eq!(count(&out), n);
    }
    out.clear();
    let started = std::time::Instant::now();
    let last = n.min(1000);
    s.handle_input(
        format!("E FETCH 1:{last} (BODY.PEEK[])\r\n").as_bytes(),
        &mut out,
    )
    .await;
    timed("FETCH 1:1000 (BODY.PEEK[])", started);
    assert_eq!(count(&out), last);
    out.clear();
    let started = std::time::Instant::now();
    s.handle_input(b"F UID SEARCH SUBJECT needle\r\n", &mut out)
        .await;
    timed("UID SEARCH SUBJECT", started);
    let hits = String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap()
        .split(' ')
        .count()
        - 2;
    assert_eq!(hits, n.div_ceil(10));
    let appends = n.min(1000) / 10;
    let message = format!("Subject: appended\r\n\r\n{filler}\r\n");
    let started = std::time::Instant::now();
    for i in 0..appends {
        out.clear();
        s.handle_input(
            format!("G{i} APPEND INBOX {{{}+}}\r\n{message}\r\n", message.len()).as_bytes(),
            &mut out,
        )
        .await;
        assert!(String::from_utf8_lossy(&out).contains("OK [APPENDUID"));
    }
    timed(&format!("{appends} sequential APPENDs"), started);
}

/// A long FETCH sent ahead in pieces gives exactly the bytes of the same FETCH kept whole:
/// the pieces in order, then what is left in `out`.
#[tokio::test]
async fn fetch_sent_ahead_in_pieces_equals_the_whole_response() {
    let subjects: Vec<String> = (0..400).map(|i| format!("piece {i}")).collect();
    let refs: Vec<&str> = subjects.iter().map(String::as_str).collect();
    let mut h = Harness::selected(&refs).await;
    let command = "F FETCH 1:* (UID FLAGS BODY.PEEK[])\r\n";
    let whole = h.run(command).await;
    assert!(whole.len() > 2 * super::session::OUTPUT_AHEAD_CHUNK_BYTES);

    let (ahead, mut pieces) = tokio::sync::mpsc::channel(1);
    h.session.set_output_ahead(Some(ahead));
    let collector = tokio::spawn(async move {
        let mut bytes = Vec::new();
        let mut n_pieces = 0;
        while let Some(piece) = pieces.recv().await {
            n_pieces += 1;
            bytes.extend_from_slice(&piece);
        }
        (bytes, n_pieces)
    });
    let (rest, action) = h.run_bytes(command.as_bytes()).await;
    h.session.set_output_ahead(None);
    let (mut streamed, n_pieces) = collector.await.unwrap();
    assert_eq!(action, Action::Continue);
    assert!(n_pieces >= 2, "{n_pieces} pieces");
    streamed.extend_from_slice(&rest);
    assert_eq!(String::from_utf8_lossy(&streamed), whole);
    assert!(String::from_utf8_lossy(&rest).ends_with("F OK FETCH completed\r\n"));
}

/// The number after `key (` or `key ` in `text`.
fn number_after(text: &str, key: &str) -> u64 {
    let at = text.find(key).unwrap_or_else(|| panic!("{key} in {text}")) + key.len();
    text[at..]
        .trim_start_matches([' ', '('])
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("number after {key} in {text}"))
}

#[tokio::test]
async fn condstore_and_qresync_in_one_session() {
    let mut h = Harness::selected(&["one", "two", "three"]).await;
    h.check(
        "E ENABLE QRESYNC CONDSTORE\r\n",
        "* ENABLED QRESYNC\r\nE OK ENABLE completed\r\n",
    )
    .await;
    let out = h.run("T STATUS INBOX (HIGHESTMODSEQ)\r\n").await;
    let start = number_after(&out, "HIGHESTMODSEQ");
    let out = h.run("F FETCH 1:* (FLAGS MODSEQ)\r\n").await;
    assert_eq!(out.matches("MODSEQ (").count(), 3, "{out}");
    assert!(
        out.contains("UID 1"),
        "QRESYNC puts UID in every FETCH: {out}"
    );

    // A silent STORE still reports the new modseq; CHANGEDSINCE then finds only it.
    let out = h.run("S1 STORE 1 +FLAGS.SILENT (\\Flagged)\r\n").await;
    let m1 = number_after(&out, "MODSEQ");
    assert!(m1 > start, "{out}");
    assert!(out.starts_with("* 1 FETCH (UID 1 MODSEQ ("), "{out}");
    let out = h
        .run(
            "F2 FETCH 1:* (FLAGS) (CHANGEDSINCE {start})\r\n"
                .replace("{start}", &start.to_string())
                .as_str(),
        )
        .await;
    assert_eq!(out.matches(" FETCH (").count(), 1, "{out}");
    assert!(
        out.contains("* 1 FETCH (UID 1 FLAGS (\\Flagged \\Recent) MODSEQ ("),
        "{out}"
    );

    // UNCHANGEDSINCE below a message's modseq: refused for it, done for the others.
    let out = h
        .run(&format!(
            "S2 STORE 1,2 (UNCHANGEDSINCE {start}) +FLAGS (\\Seen)\r\n"
        ))
        .await;
    assert!(
        out.ends_with("S2 OK [MODIFIED 1] conditional STORE failed\r\n"),
        "{out}"
    );
    assert!(
        out.contains("* 2 FETCH (FLAGS (\\Seen \\Recent) UID 2 MODSEQ ("),
        "{out}"
    );

    // Expunge under QRESYNC: VANISHED, not EXPUNGE.
    h.run("S3 STORE 3 +FLAGS.SILENT (\\Deleted)\r\n").await;
    let out = h.run("X EXPUNGE\r\n").await;
    assert!(out.starts_with("* VANISHED 3\r\n"), "{out}");
    assert!(!out.contains("EXPUNGE\r\n* "), "{out}");

    let out = h
        .run(&format!(
            "F3 UID FETCH 1:* (FLAGS) (CHANGEDSINCE {start} VANISHED)\r\n"
        ))
        .await;
    assert!(out.starts_with("* VANISHED (EARLIER) 3\r\n"), "{out}");
    assert_eq!(out.matches(" FETCH (").count(), 2, "{out}");

    let out = h.run(&format!("Q SEARCH MODSEQ {}\r\n", m1 + 1)).await;
    assert!(out.starts_with("* SEARCH 2 (MODSEQ "), "{out}");
    let out = h.run("Q2 SEARCH MODSEQ 999999999\r\n").await;
    assert!(out.starts_with("* SEARCH\r\n"), "{out}");

    // A new session resyncs from the first modseq.
    let view = h.store.mailbox_by_name(1, "INBOX").unwrap();
    let mut h2 = Harness {
        _dir: tempfile::tempdir().unwrap(),
        store: h.store.clone(),
        session: session(&h.store, true, false),
    };
    h2.run(&format!("L LOGIN {USER} \"{PASSWORD}\"\r\n")).await;
    let out = h2
        .run(&format!(
            "R SELECT INBOX (QRESYNC ({} {start} 1:3))\r\n",
            view.uidvalidity
        ))
        .await;
    assert!(out.contains("R BAD"), "QRESYNC needs ENABLE first: {out}");
    h2.run("E ENABLE QRESYNC\r\n").await;
    let out = h2
        .run(&format!(
            "R SELECT INBOX (QRESYNC ({} {start} 1:3))\r\n",
            view.uidvalidity
        ))
        .await;
    assert!(
        out.contains(&format!("* OK [HIGHESTMODSEQ {}]", view.highest_modseq)),
        "{out}"
    );
    assert!(out.contains("* VANISHED (EARLIER) 3\r\n"), "{out}");
    assert_eq!(out.matches(" FETCH (").count(), 2, "{out}");
    // Up to date: nothing but the usual SELECT answers.
    let out = h2
        .run(&format!(
            "R2 SELECT INBOX (QRESYNC ({} {}))\r\n",
            view.uidvalidity, view.highest_modseq
        ))
        .await;
    assert!(!out.contains("VANISHED") && !out.contains("FETCH"), "{out}");
}
