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
    let rc = node.dir.path().join("mbsyncrc");
    std::fs::write(
        &rc,
        format!(
            "IMAPAccount kermail\nHost 127.0.0.1\nPort {port}\nUser {USER}\nPass {PASSWORD}\n\
             SSLType None\nAuthMechs LOGIN\n\n\
             IMAPStore remote\nAccount kermail\n\n\
             MaildirStore local\nPath {local}/\nInbox {local}/INBOX\n\n\
             Channel sync\nFar :remote:\nNear :local:\nPatterns INBOX\nCreate Both\n\
             Expunge Both\nSyncState *\nSync All\n",
            port = node.imap_port,
            local = local.display()
        ),
    )
    .expect("write mbsyncrc");

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
