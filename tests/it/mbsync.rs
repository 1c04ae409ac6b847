//! mbsync (isync) syncs the account to a local Maildir and back: a flag set and a message
//! deleted on the Maildir side show up on the server (read with imaplib), and a message added
//! to the Maildir is uploaded.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::{files_under, Node, PASSWORD, USER};

fn mbsync(node: &Node, rc: &Path) {
    let out = Command::new("mbsync")
        .arg("-c")
        .arg(rc)
        .arg("-a")
        .output()
        .expect("run mbsync (Debian package isync)");
    assert!(
        out.status.success(),
        "mbsync failed ({}):\nstdout: {}\nstderr: {}\n--- server stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        node.stderr()
    );
}

/// Maildir files (new/ and cur/) of the local INBOX with the Subject they carry.
fn local_messages(inbox: &Path) -> Vec<(PathBuf, String)> {
    let mut out: Vec<(PathBuf, String)> = files_under(inbox)
        .into_iter()
        .filter(|p| {
            p.parent()
                .and_then(|d| d.file_name())
                .is_some_and(|d| d == "cur" || d == "new")
        })
        .map(|p| {
            let text = String::from_utf8_lossy(&std::fs::read(&p).expect("read")).into_owned();
            let subject = text
                .lines()
                .find_map(|l| l.strip_prefix("Subject: "))
                .unwrap_or("")
                .trim()
                .to_owned();
            (p, subject)
        })
        .collect();
    out.sort_by(|a, b| a.1.cmp(&b.1));
    out
}

#[test]
fn mbsync_round_trip_flag_delete_and_upload() {
    let node = Node::with_account();
    node.py(
        r#"
s = smtp()
for name in ("keep", "flag me", "delete me"):
    assert s.sendmail("bob@example.org", [USER], message(name)) == {}
s.quit()
"#,
        &[],
    );

    let local = node.dir.path().join("maildir");
    std::fs::create_dir_all(&local).expect("mkdir");
    let rc = write_mbsyncrc(&node, &local, "");

    mbsync(&node, &rc);
    let inbox = local.join("INBOX");
    let msgs = local_messages(&inbox);
    let subjects: Vec<&str> = msgs.iter().map(|m| m.1.as_str()).collect();
    assert_eq!(subjects, ["delete me", "flag me", "keep"]);

    // Maildir side: flag one (add F to the info part), delete one, add a new one.
    let (flag_path, _) = &msgs[1];
    let name = flag_path.file_name().unwrap().to_str().unwrap().to_owned();
    let (base, flags) = match name.split_once(":2,") {
        Some((b, f)) => (b.to_owned(), f.to_owned()),
        None => (name.clone(), String::new()),
    };
    let mut flags: Vec<char> = flags.chars().chain(['F']).collect();
    flags.sort();
    flags.dedup();
    let flagged = inbox
        .join("cur")
        .join(format!("{base}:2,{}", flags.iter().collect::<String>()));
    std::fs::rename(flag_path, &flagged).expect("flag");
    std::fs::remove_file(&msgs[0].0).expect("delete");
    std::fs::write(
        inbox.join("new").join("1700000000.kermailtest.localhost"),
        "From: Alice <alice@kermail.test>\r\nSubject: uploaded\r\n\r\nwritten in the Maildir\r\n",
    )
    .expect("new local message");

    mbsync(&node, &rc);
    let out = node.py(
        r#"
msgs = inbox_messages()
got = {}
for uid, flags, raw in msgs:
    subject = re.search(rb"Subject: ([^\r]*)", raw).group(1).decode()
    got[subject] = flags
assert sorted(got) == ["flag me", "keep", "uploaded"], got
assert "\\Flagged" in got["flag me"], got
assert "\\Flagged" not in got["keep"], got
print("ok")
"#,
        &[],
    );
    assert_eq!(out.trim(), "ok");
}

/// Maildir flag letters (the info part after ":2,") of a local message file.
fn maildir_flags(path: &Path) -> String {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.split_once(":2,")
        .map(|(_, f)| f.to_owned())
        .unwrap_or_default()
}

/// Renames a Maildir message into cur/ with `flag` added to its info part.
fn add_maildir_flag(inbox: &Path, path: &Path, flag: char) {
    let name = path.file_name().unwrap().to_str().unwrap().to_owned();
    let (base, flags) = match name.split_once(":2,") {
        Some((b, f)) => (b.to_owned(), f.to_owned()),
        None => (name.clone(), String::new()),
    };
    let mut flags: Vec<char> = flags.chars().chain([flag]).collect();
    flags.sort();
    flags.dedup();
    let to = inbox
        .join("cur")
        .join(format!("{base}:2,{}", flags.iter().collect::<String>()));
    std::fs::rename(path, to).expect("rename Maildir message");
}

/// The Maildir letters mbsync maps IMAP flags to (isync's manual: D F P R S T).
fn imap_flags_as_maildir(flags: &[String]) -> String {
    let mut out: Vec<char> = flags
        .iter()
        .filter_map(|f| match f.as_str() {
            "\\Draft" => Some('D'),
            "\\Flagged" => Some('F'),
            "\\Answered" => Some('R'),
            "\\Seen" => Some('S'),
            "\\Deleted" => Some('T'),
            _ => None,
        })
        .collect();
    out.sort();
    out.into_iter().collect()
}

/// Server side of the 1,000-change test: every message of INBOX as (Subject, flags, UID).
const PY_SUBJECT_FLAGS: &str = r#"
c = imap()
ok(c.select("INBOX"), "SELECT")
data = ok(c.uid("FETCH", "1:*", "(UID FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])"), "UID FETCH")
out = []
for item in data:
    if isinstance(item, tuple):
        meta = item[0].decode()
        uid = int(re.search(r"UID (\d+)", meta).group(1))
        flags = sorted(f for f in re.search(r"FLAGS \(([^)]*)\)", meta).group(1).split()
                       if f != "\\Recent")
        subject = re.search(rb"Subject: ([^\r]*)", item[1]).group(1).decode()
        out.append([subject, flags, uid])
c.logout()
print(json.dumps(out))
"#;

/// The expected end state of `mbsync_sync_all_after_1000_changes_on_each_side`: Subject →
/// Maildir flag letters.
fn expected_after_changes() -> std::collections::BTreeMap<String, String> {
    let mut want = std::collections::BTreeMap::new();
    for i in 0..1300 {
        let flags = match i {
            0..=299 => "F",          // flagged on the server
            300..=499 => "S",        // seen on the server
            500..=699 => continue,   // expunged on the server
            700..=999 => "R",        // answered in the Maildir
            1000..=1199 => continue, // deleted from the Maildir
            _ => "",
        };
        want.insert(format!("m{i:04}"), flags.to_owned());
    }
    for i in 0..300 {
        want.insert(format!("s{i:04}"), String::new()); // appended on the server
    }
    for i in 0..500 {
        want.insert(format!("l{i:04}"), String::new()); // written into the Maildir
    }
    want
}

/// The issue's interop point: 1,300 messages synced, then 1,000 changes on the server
/// (300 flagged, 200 seen, 200 expunged, 300 appended) and 1,000 in the Maildir (300
/// answered, 200 deleted, 500 new), then ONE `mbsync -a` with `Sync All` reconciles both
/// sides exactly, and a second run changes nothing (no duplicate, no lost flag).
#[test]
fn mbsync_sync_all_after_1000_changes_on_each_side() {
    let node = Node::with_account();
    node.py(
        r#"
c = imap()
for i in range(1300):
    ok(c.append("INBOX", None, None, message(f"m{i:04}")), "APPEND")
c.logout()
"#,
        &[],
    );
    let local = node.dir.path().join("maildir");
    std::fs::create_dir_all(&local).expect("mkdir");
    let rc = write_mbsyncrc(&node, &local, "PipelineDepth 50\n");
    mbsync(&node, &rc);
    let inbox = local.join("INBOX");
    let first = local_messages(&inbox);
    assert_eq!(
        first.len(),
        1300,
        "first sync should bring every message down"
    );

    // 1,000 changes on the server.
    node.py(
        r#"
c = imap()
ok(c.select("INBOX"), "SELECT")
ok(c.store("1:300", "+FLAGS.SILENT", "(\\Flagged)"), "STORE flagged")
ok(c.store("301:500", "+FLAGS.SILENT", "(\\Seen)"), "STORE seen")
ok(c.store("501:700", "+FLAGS.SILENT", "(\\Deleted)"), "STORE deleted")
ok(c.expunge(), "EXPUNGE")
for i in range(300):
    ok(c.append("INBOX", None, None, message(f"s{i:04}")), "APPEND")
c.logout()
"#,
        &[],
    );
    // 1,000 changes in the Maildir (messages sorted by Subject: m0000 .. m1299).
    for (path, subject) in &first {
        let i: usize = subject[1..].parse().expect("subject number");
        match i {
            700..=999 => add_maildir_flag(&inbox, path, 'R'),
            1000..=1199 => std::fs::remove_file(path).expect("delete local message"),
            _ => {}
        }
    }
    for i in 0..500 {
        std::fs::write(
            inbox
                .join("new")
                .join(format!("1700000000.kmlocal{i:04}.localhost")),
            format!(
                "From: Alice <alice@kermail.test>\r\nSubject: l{i:04}\r\n\
                 Message-ID: <l{i:04}@kermail.test>\r\n\r\nwritten in the Maildir\r\n"
            ),
        )
        .expect("new local message");
    }

    mbsync(&node, &rc);
    let want = expected_after_changes();
    let server_state = || -> (std::collections::BTreeMap<String, String>, Vec<u64>) {
        let out = node.py(PY_SUBJECT_FLAGS, &[]);
        let rows: Vec<(String, Vec<String>, u64)> =
            serde_json::from_str(out.trim()).expect("server state json");
        let mut uids: Vec<u64> = rows.iter().map(|r| r.2).collect();
        uids.sort_unstable();
        let mut map = std::collections::BTreeMap::new();
        for (subject, flags, _) in rows {
            let previous = map.insert(subject.clone(), imap_flags_as_maildir(&flags));
            assert!(previous.is_none(), "{subject} is on the server twice");
        }
        (map, uids)
    };
    let local_state = || -> std::collections::BTreeMap<String, String> {
        let mut map = std::collections::BTreeMap::new();
        for (path, subject) in local_messages(&inbox) {
            let previous = map.insert(subject.clone(), maildir_flags(&path));
            assert!(previous.is_none(), "{subject} is in the Maildir twice");
        }
        map
    };
    let (server, uids) = server_state();
    assert_eq!(server.len(), 1700);
    assert_eq!(server, want, "server after Sync All");
    assert_eq!(local_state(), want, "Maildir after Sync All");

    // A second run has nothing left to do.
    mbsync(&node, &rc);
    let (server_again, uids_again) = server_state();
    assert_eq!(server_again, want, "server after a second run");
    assert_eq!(
        uids_again, uids,
        "a second run must not re-upload or expunge"
    );
    assert_eq!(local_state(), want, "Maildir after a second run");
}

/// An mbsyncrc syncing the test account's INBOX (plain IMAP, LOGIN) with the Maildir `local`,
/// `Sync All` both ways; `extra` adds lines to the IMAP account.
fn write_mbsyncrc(node: &Node, local: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let rc = node.dir.path().join("mbsyncrc");
    std::fs::write(
        &rc,
        format!(
            "IMAPAccount kermail\nHost 127.0.0.1\nPort {port}\nUser {USER}\nPass {PASSWORD}\n\
             SSLType None\nAuthMechs LOGIN\n{extra}\n\
             IMAPStore remote\nAccount kermail\n\n\
             MaildirStore local\nPath {local}/\nInbox {local}/INBOX\n\n\
             Channel sync\nFar :remote:\nNear :local:\nPatterns INBOX\nCreate Both\n\
             Expunge Both\nSyncState *\nSync All\n",
            port = node.imap_port,
            local = local.display()
        ),
    )
    .expect("write mbsyncrc");
    rc
}
