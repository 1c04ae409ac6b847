//! Backups (issue 11) with real processes: `kermail backup now` to a folder and to a local S3
//! server (moto), incremental bytes, no plaintext at the target, `verify` catching a flipped
//! bit, a wrong key refused clearly, and `kermail restore --to` giving a folder that
//! `kermail serve` runs with the same messages, UIDs, flags and UIDVALIDITY.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::{files_under, free_port, python, wait_for, Node, PASSWORD, USER};

/// Delivers COUNT messages of SIZE bytes of random text with a canary line, flags every
/// third one \Flagged and the first \Seen.
const DELIVER: &str = r#"
import base64, os
count = int(ENV["COUNT"]); size = int(ENV["SIZE"]); canary = ENV["CANARY"]
s = smtp()
for i in range(count):
    text = base64.b64encode(os.urandom(size * 3 // 4)).decode()
    lines = "\r\n".join(text[j:j+76] for j in range(0, len(text), 76))
    raw = (f"From: bob@example.org\r\nTo: {USER}\r\nSubject: m{i}\r\n\r\n{canary}\r\n{lines}\r\n").encode()
    assert s.sendmail("bob@example.org", [USER], raw) == {}
s.quit()
c = imap()
ok(c.select("INBOX"))
ok(c.uid("STORE", "1:*", "+FLAGS", "(\\Seen)")) if ENV.get("SEEN") else None
typ, data = c.uid("SEARCH", "ALL")
uids = data[0].split()
for u in uids[::3]:
    ok(c.uid("STORE", u, "+FLAGS", "(\\Flagged $Restored-Test)"))
c.logout()
"#;

/// UIDVALIDITY, and UID, flags and body of every INBOX message, as JSON.
const SNAPSHOT: &str = r#"
c = imap()
ok(c.select("INBOX"))
validity = c.untagged_responses.get("UIDVALIDITY", [b"?"])[0].decode()
msgs = inbox_messages(c)
c.logout()
print(json.dumps({"uidvalidity": validity,
                  "messages": [[u, sorted(f), strip_trace_headers(b).decode()] for u, f, b in msgs]}))
"#;

fn node_with_backup_target(target_toml: &str) -> Node {
    let mut node = Node::create();
    let mut config = std::fs::read_to_string(&node.config).expect("config");
    config.push_str(target_toml);
    std::fs::write(&node.config, config).expect("write config");
    node.spawn();
    node.add_account(USER, PASSWORD);
    node
}

fn deliver(node: &Node, count: usize, size: usize, canary: &str) {
    let count = format!("COUNT={count}");
    let size = format!("SIZE={size}");
    let canary = format!("CANARY={canary}");
    node.py(DELIVER, &[&count, &size, &canary]);
}

/// `backup now`; returns (id, bytes new, bytes total) from its summary line.
fn backup_now(node: &Node) -> (String, u64, u64) {
    let out = node.cli_ok(&["backup", "now"]);
    let line = out
        .lines()
        .find(|l| l.starts_with("backup "))
        .unwrap_or_else(|| panic!("no summary in {out:?}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let id = words[1].to_owned();
    let number_before = |what: &str| -> u64 {
        let at = words
            .windows(3)
            .position(|w| w[1] == "bytes" && w[2].trim_end_matches(',') == what)
            .unwrap_or_else(|| panic!("no '{what}' in {line:?}"));
        words[at].parse().expect("number")
    };
    (id, number_before("new"), number_before("total"))
}

fn assert_no_plaintext(dir: &Path, canary: &str) {
    let files = files_under(dir);
    assert!(!files.is_empty(), "nothing at the target");
    for file in files {
        let bytes = std::fs::read(&file).expect("read target file");
        assert!(
            !bytes.windows(canary.len()).any(|w| w == canary.as_bytes()),
            "{} holds plaintext",
            file.display()
        );
    }
}

fn chunk_files(dir: &Path) -> Vec<PathBuf> {
    files_under(&dir.join("chunks"))
}

#[test]
fn a_folder_backup_is_encrypted_incremental_verifiable_and_restores_to_a_serving_folder() {
    let target_dir = tempfile::tempdir().expect("tempdir");
    let node = node_with_backup_target(&format!(
        "[backup]\n[[backup.targets]]\nname = \"disk\"\nkind = \"dir\"\npath = \"{}\"\n",
        target_dir.path().display()
    ));
    let canary = "kermail-backup-canary-7f3a9c";
    deliver(&node, 40, 20_000, canary);

    let (first, first_new, first_total) = backup_now(&node);
    assert!(
        first_new > 40 * 10_000,
        "first backup sent only {first_new} bytes"
    );
    assert_no_plaintext(target_dir.path(), canary);
    // A body in the clear would also show its Subject line.
    assert_no_plaintext(target_dir.path(), "Subject: m1");

    // 100 more messages of 2 KB: the second backup moves about their size, not everything.
    deliver(&node, 100, 2_000, canary);
    let new_raw_bytes = 100 * 2_100;
    let (second, second_new, second_total) = backup_now(&node);
    assert_ne!(first, second);
    assert!(
        second_new <= new_raw_bytes * 3 / 2 && second_new >= new_raw_bytes / 3,
        "second backup moved {second_new} bytes for {new_raw_bytes} new raw bytes"
    );
    assert!(second_total > first_total);
    let listed = node.cli_ok(&["backup", "list"]);
    assert!(
        listed.contains(&first) && listed.contains(&second),
        "{listed}"
    );
    assert!(
        listed.contains(&format!("{second_new}/{second_total}")),
        "{listed}"
    );

    // A wrong key is refused with a clear message, and nothing is written.
    let key = node.cli_ok(&["backup", "key", "export"]).trim().to_owned();
    assert_eq!(key.len(), 64, "{key}");
    let wrong_key = node.dir.path().join("wrong.key");
    std::fs::write(&wrong_key, "00".repeat(32)).expect("write key");
    let refused_folder = node.dir.path().join("refused");
    let out = node.cli(&[
        "restore",
        &second,
        "--to",
        refused_folder.to_str().expect("utf-8"),
        "--key-file",
        wrong_key.to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("wrong backup key"), "{stderr}");
    assert!(!refused_folder.join("restore-base.bin").exists());

    // A full restore, with the exported key and no help from the node, serves the same mail.
    let before = node.py(SNAPSHOT, &[]);
    let key_file = node.dir.path().join("backup.key");
    std::fs::write(&key_file, &key).expect("write key");
    let mut restored = Node::create();
    let mut config = std::fs::read_to_string(&restored.config).expect("config");
    config.push_str(&format!(
        "[backup]\n[[backup.targets]]\nname = \"disk\"\nkind = \"dir\"\npath = \"{}\"\n",
        target_dir.path().display()
    ));
    std::fs::write(&restored.config, config).expect("write config");
    let out = restored.cli_ok(&[
        "restore",
        &second,
        "--to",
        restored.data_dir.to_str().expect("utf-8"),
        "--key-file",
        key_file.to_str().expect("utf-8"),
    ]);
    assert!(out.contains("140 messages"), "{out}");
    restored.spawn();
    assert!(
        restored.stderr().contains("restored state snapshotted"),
        "a restored folder must snapshot its base state before others can join it"
    );
    assert_eq!(restored.py(SNAPSHOT, &[]), before, "restored mail differs");
    // It is a working node: it takes new mail, and keeps everything over a restart.
    deliver(&restored, 1, 500, "after-restore");
    restored.restart();
    let after: serde_json::Value = serde_json::from_str(&restored.py(SNAPSHOT, &[])).expect("json");
    assert_eq!(after["messages"].as_array().map(Vec::len), Some(141));

    // verify reads every chunk; one flipped bit is found.
    let ok = node.cli_ok(&["backup", "verify", &second]);
    assert!(ok.contains("ok"), "{ok}");
    let chunks = chunk_files(target_dir.path());
    let victim = chunks
        .iter()
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("a chunk");
    let mut bytes = std::fs::read(victim).expect("read chunk");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(victim, bytes).expect("write chunk");
    let out = node.cli(&["backup", "verify", &second]);
    assert!(!out.status.success(), "verify missed a flipped bit");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("damaged"), "{stderr}");
}

#[test]
fn a_backup_to_a_local_s3_server_lists_and_verifies_without_plaintext() {
    let port = free_port();
    let state_dir = tempfile::tempdir().expect("tempdir");
    let mut moto = std::process::Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .current_dir(state_dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("moto_server (pip install 'moto[server]')");
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _moto = Kill(&mut moto);
    wait_for("moto_server", Duration::from_secs(60), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    let endpoint = format!("http://127.0.0.1:{port}");
    python(
        r#"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="test",
                  aws_secret_access_key="test", region_name="us-east-1")
s3.create_bucket(Bucket="kermail-backups")
"#,
        &[&endpoint],
    );
    let node = node_with_backup_target(&format!(
        "[backup]\n[[backup.targets]]\nname = \"s3\"\nkind = \"s3\"\nendpoint = \"{endpoint}\"\n\
         bucket = \"kermail-backups\"\nregion = \"us-east-1\"\nprefix = \"site-a/\"\n\
         access_key_id = \"test\"\nsecret_access_key = \"test\"\n"
    ));
    let canary = "kermail-s3-canary-51c2";
    deliver(&node, 20, 5_000, canary);
    let (id, new, _) = backup_now(&node);
    assert!(new > 20 * 3_000, "sent only {new} bytes");
    // Everything in the bucket, read back through S3: no plaintext.
    let found = python(
        r#"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="test",
                  aws_secret_access_key="test", region_name="us-east-1")
n = 0; leaked = 0
for page in s3.get_paginator("list_objects_v2").paginate(Bucket="kermail-backups"):
    for obj in page.get("Contents", []):
        n += 1
        assert obj["Key"].startswith("site-a/"), obj["Key"]
        body = s3.get_object(Bucket="kermail-backups", Key=obj["Key"])["Body"].read()
        leaked += sys.argv[2].encode() in body
print(n, leaked)
"#,
        &[&endpoint, canary],
    );
    let counts: Vec<u64> = found
        .split_whitespace()
        .map(|w| w.parse().expect("count"))
        .collect();
    assert!(counts[0] >= 22, "objects in the bucket: {found}");
    assert_eq!(counts[1], 0, "plaintext in the bucket");
    let listed = node.cli_ok(&["backup", "list", "--target", "s3"]);
    assert!(listed.contains(&id), "{listed}");
    let verified = node.cli_ok(&["backup", "verify", &id, "--target", "s3"]);
    assert!(verified.contains("20 messages"), "{verified}");
    // A second backup with nothing new sends only the manifest (and unchanged metadata: none).
    let (_, second_new, _) = backup_now(&node);
    assert!(
        second_new < 2_000,
        "an unchanged backup sent {second_new} bytes"
    );
}

/// Bodies and flags of every message of one mailbox, as JSON (mailbox name in POS[0]).
const MAILBOX_CONTENT: &str = r#"
c = imap(ENV.get("AS"), PASSWORD)
typ, names = c.list()
mailbox = [n.decode().rsplit(' "/" ', 1)[1].strip('"') for n in names if b"Restored/" in n] if POS[0] == "restored" else [POS[0]]
assert len(mailbox) == 1, names
msgs = inbox_messages(c, mailbox[0])
c.logout()
print(json.dumps(sorted([sorted(f), strip_trace_headers(b).decode()] for u, f, b in msgs)))
"#;

#[test]
fn an_account_restore_after_user_remove_brings_its_mail_back() {
    let target_dir = tempfile::tempdir().expect("tempdir");
    let node = node_with_backup_target(&format!(
        "[backup]\n[[backup.targets]]\nname = \"disk\"\nkind = \"dir\"\npath = \"{}\"\n",
        target_dir.path().display()
    ));
    deliver(&node, 6, 3_000, "account-restore-canary");
    let before = node.py(MAILBOX_CONTENT, &["INBOX"]);
    let (id, _, _) = backup_now(&node);

    node.cli_ok(&["user", "remove", USER]);
    node.add_account(USER, PASSWORD);
    assert_eq!(node.py(MAILBOX_CONTENT, &["INBOX"]).trim(), "[]");
    let out = node.cli_ok(&["restore", &id, "--account", USER]);
    assert!(out.contains("restored 6 messages"), "{out}");
    // Same bodies and flags, as new messages in Restored/<date>; INBOX untouched.
    assert_eq!(node.py(MAILBOX_CONTENT, &["restored"]), before);
    assert_eq!(node.py(MAILBOX_CONTENT, &["INBOX"]).trim(), "[]");

    // --as another account, --mailbox one mailbox.
    let other = "carol@kermail.test";
    node.add_account(other, PASSWORD);
    let out = node.cli_ok(&[
        "restore",
        &id,
        "--account",
        USER,
        "--as",
        other,
        "--mailbox",
        "INBOX",
    ]);
    assert!(out.contains("restored 6 messages"), "{out}");
    let as_other = format!("AS={other}");
    assert_eq!(node.py(MAILBOX_CONTENT, &["restored", &as_other]), before);
    // An unknown account in the backup is refused clearly.
    let out = node.cli(&["restore", &id, "--account", "nobody@kermail.test"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no account"));
}
