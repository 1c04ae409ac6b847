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

/// Delivers mail on a cluster (through n1): POS = canary, count per user, size, subject tag,
/// comma-separated users. Every third message of each user gets \Flagged, the first \Seen;
/// the last user also gets a `Projects` mailbox with copies of its first three messages.
const CLUSTER_DELIVER: &str = r#"
import base64
canary, count, size, tag, users = POS[0], int(POS[1]), int(POS[2]), POS[3], POS[4].split(",")
s = smtp("n1")
for i in range(count):
    for u in users:
        text = base64.b64encode(os.urandom(size * 3 // 4)).decode()
        lines = "\r\n".join(text[j:j+76] for j in range(0, len(text), 76))
        raw = (f"From: bob@example.org\r\nTo: {u}\r\nSubject: {tag}-{i}\r\n\r\n{canary}\r\n{lines}\r\n").encode()
        assert s.sendmail("bob@example.org", [u], raw) == {}
s.quit()
for n, u in enumerate(users):
    host, port = addr("n1", "IMAPS")
    c = imaplib.IMAP4_SSL(host, port, ssl_context=TLS, timeout=60)
    c.login(u, PASSWORD)
    ok(c.select("INBOX"))
    uids = ok(c.uid("SEARCH", "ALL"))[0].split()
    for uid in uids[::3]:
        ok(c.uid("STORE", uid, "+FLAGS", "(\\Flagged)"))
    ok(c.uid("STORE", uids[0], "+FLAGS", "(\\Seen $Backup-Test)"))
    if n == len(users) - 1 and tag == "first":
        ok(c.create("Projects"))
        ok(c.uid("COPY", b",".join(uids[:3]), "Projects"))
    c.logout()
"#;

/// Every mailbox of every account in POS (comma-separated): UIDVALIDITY, and UID, flags
/// (without \Recent) and the SHA-256 of the whole stored message; JSON. `connect(user)` comes
/// from the caller's prelude.
const ACCOUNTS_VIEW: &str = r#"
import hashlib
def account_view(user):
    c = connect(user)
    typ, names = c.list()
    boxes = sorted(n.decode().rsplit(' "/" ', 1)[1].strip('"') for n in names)
    out = {}
    for box in boxes:
        typ, _ = c.select('"' + box + '"', readonly=True)
        if typ != "OK":
            continue
        validity = int(c.untagged_responses.get("UIDVALIDITY", [b"0"])[-1])
        typ, data = c.uid("FETCH", "1:*", "(UID FLAGS BODY.PEEK[])")
        msgs = []
        for item in (data if typ == "OK" else []):
            if isinstance(item, tuple):
                meta = item[0].decode()
                uid = int(re.search(r"UID (\d+)", meta).group(1))
                flags = sorted(f for f in re.search(r"FLAGS \(([^)]*)\)", meta).group(1).split()
                               if f != "\\Recent")
                msgs.append([uid, flags, hashlib.sha256(item[1]).hexdigest()])
        out[box] = [validity, sorted(msgs)]
    c.logout()
    return out
print(json.dumps({u: account_view(u) for u in USERS_TO_VIEW}, sort_keys=True))
"#;

fn cluster_view(
    cluster: &crate::cluster::Cluster,
    node: &str,
    users: &[&str],
) -> serde_json::Value {
    let code = format!(
        r#"
USERS_TO_VIEW = POS[1].split(",")
def connect(user):
    host, port = addr(POS[0], "IMAPS")
    c = imaplib.IMAP4_SSL(host, port, ssl_context=TLS, timeout=60)
    c.login(user, PASSWORD)
    return c
{ACCOUNTS_VIEW}"#
    );
    let out = cluster.py(&code, &[node, &users.join(",")]);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("view: {e}: {out}"))
}

fn node_view(node: &Node, users: &[&str]) -> serde_json::Value {
    let code = format!(
        r#"
USERS_TO_VIEW = POS[0].split(",")
def connect(user):
    return imap(user, PASSWORD)
{ACCOUNTS_VIEW}"#
    );
    let out = node.py(&code, &[&users.join(",")]);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("view: {e}: {out}"))
}

/// `backup now --target TARGET` on a cluster node: (id, bytes new, bytes total).
fn cluster_backup(
    cluster: &crate::cluster::Cluster,
    node: &str,
    target: &str,
) -> (String, u64, u64) {
    let out = cluster.kermail(node, &["backup", "now", "--target", target]);
    parse_summary(&out)
}

fn parse_summary(out: &str) -> (String, u64, u64) {
    let line = out
        .lines()
        .find(|l| l.starts_with("backup ") && l.contains(" done: "))
        .unwrap_or_else(|| panic!("no summary in {out:?}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let number_before = |what: &str| -> u64 {
        let at = words
            .windows(3)
            .position(|w| w[1] == "bytes" && w[2].trim_end_matches(',') == what)
            .unwrap_or_else(|| panic!("no '{what}' in {line:?}"));
        words[at].parse().expect("number")
    };
    (
        words[1].to_owned(),
        number_before("new"),
        number_before("total"),
    )
}

fn bytes_under(dir: &Path) -> u64 {
    files_under(dir)
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum()
}

/// Kills a helper process when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP server that accepts connections and never answers: an S3 endpoint that hangs.
const BLACK_HOLE: &str = r#"
import socket, sys, threading, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64)
held = []
while True:
    conn, _ = s.accept()
    held.append(conn)
"#;

const S3_CREATE_BUCKET: &str = r#"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="test",
                  aws_secret_access_key="test", region_name="us-east-1")
s3.create_bucket(Bucket="kermail-backups")
"#;

/// Prints how many objects the bucket holds and how many of them contain POS[1].
const S3_GREP: &str = r#"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="test",
                  aws_secret_access_key="test", region_name="us-east-1")
n = 0; leaked = 0
for page in s3.get_paginator("list_objects_v2").paginate(Bucket="kermail-backups"):
    for obj in page.get("Contents", []):
        n += 1
        body = s3.get_object(Bucket="kermail-backups", Key=obj["Key"])["Body"].read()
        leaked += sys.argv[2].encode() in body
print(n, leaked)
"#;

fn start_moto(host: &str, port: u16, state_dir: &Path) -> KillOnDrop {
    let moto = std::process::Command::new("moto_server")
        .args(["-H", host, "-p", &port.to_string()])
        .current_dir(state_dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("moto_server (pip install 'moto[server]')");
    let moto = KillOnDrop(moto);
    wait_for("moto_server", Duration::from_secs(60), || {
        std::net::TcpStream::connect((host, port)).ok()
    });
    python(S3_CREATE_BUCKET, &[&format!("http://{host}:{port}")]);
    moto
}

/// Issue 11's acceptance on a real 3-node cluster (network namespaces): mail in several
/// accounts and mailboxes; backups to another node over the mesh (n1 to n3), to a folder (from
/// n2) and to S3 (from n3); the second backup after 100 new messages moves about their size;
/// no target holds plaintext; `verify` passes, then catches a flipped bit; the folder n3 keeps
/// restores (as a `dir` target, with the exported key and no node) to a fresh folder serving
/// the same messages, UIDs, flags and UIDVALIDITY in every account; a wrong key is refused
/// clearly; an account restore after `user remove` brings its mail back; and two nodes backing
/// up at once: the second is refused by the lease.
#[test]
fn a_three_node_cluster_backs_up_to_another_node_a_folder_and_s3_and_restores() {
    let target_dir = tempfile::tempdir().expect("tempdir");
    let s3_port = free_port();
    let hole_port = free_port();
    let Some(cluster) = crate::cluster::Cluster::up_with(6, 3, None, |host| {
        Some(format!(
            r#"
[smtp]
max_messages_per_account_per_minute = 100000
[backup]
[[backup.targets]]
name = "site-c"
kind = "node"
node = "n3"
keep_last = 3
[[backup.targets]]
name = "disk"
kind = "dir"
path = "{}"
[[backup.targets]]
name = "s3"
kind = "s3"
endpoint = "http://{host}:{s3_port}"
bucket = "kermail-backups"
region = "us-east-1"
access_key_id = "test"
secret_access_key = "test"
[[backup.targets]]
name = "hangs"
kind = "s3"
endpoint = "http://{host}:{hole_port}"
bucket = "kermail-backups"
region = "us-east-1"
access_key_id = "test"
secret_access_key = "test"
"#,
            target_dir.path().display()
        ))
    }) else {
        return;
    };
    let host = cluster.ok(&["host"]).trim().to_string();
    let moto_dir = tempfile::tempdir().expect("tempdir");
    let _moto = start_moto(&host, s3_port, moto_dir.path());
    let endpoint = format!("http://{host}:{s3_port}");

    cluster.account();
    let bob = "bob@kermail.test";
    let carol = "carol@kermail.test";
    let users = [USER, bob, carol];
    for user in [bob, carol] {
        cluster.ok_stdin(
            &[
                "exec",
                "n1",
                "--",
                "kermail",
                "user",
                "add",
                user,
                "--password-stdin",
            ],
            &format!("{PASSWORD}\n"),
        );
    }
    let canary = "kermail-3node-canary-e41b07";
    cluster.py(
        CLUSTER_DELIVER,
        &[canary, "20", "3000", "first", &users.join(",")],
    );

    // 1. To another node over the mesh: n3 keeps ciphertext in data/backup-store.
    let store = cluster.node_dir("n3").join("data").join("backup-store");
    let (first, first_new, _) = cluster_backup(&cluster, "n1", "site-c");
    assert!(
        first_new > 60 * 2_000,
        "first backup sent {first_new} bytes"
    );
    assert_no_plaintext(&store, canary);
    assert_no_plaintext(&store, "Subject: first-1");
    for other in ["n1", "n2"] {
        let dir = cluster.node_dir(other).join("data").join("backup-store");
        assert!(files_under(&dir).is_empty(), "{other} holds backup chunks");
    }
    let stored_after_first = bytes_under(&store);

    // 2. 100 new messages of ~4 KB: the next backup moves about their size.
    cluster.py(CLUSTER_DELIVER, &[canary, "100", "4000", "second", USER]);
    let new_raw: u64 = 100 * 4_100;
    let (second, second_new, second_total) = cluster_backup(&cluster, "n1", "site-c");
    let grown = bytes_under(&store) - stored_after_first;
    eprintln!(
        "incremental: {second_new} bytes sent, {grown} bytes more at n3, for {new_raw} new raw bytes"
    );
    assert!(
        second_new <= new_raw * 3 / 2 && second_new >= new_raw / 3,
        "second backup sent {second_new} bytes for {new_raw} new raw bytes"
    );
    assert!(
        grown <= new_raw * 3 / 2 && grown >= new_raw / 3,
        "n3 grew by {grown} bytes for {new_raw} new raw bytes"
    );
    assert!(second_total >= stored_after_first);
    let at_second = cluster_view(&cluster, "n1", &users);
    assert_eq!(
        at_second[carol]["Projects"][1].as_array().map(Vec::len),
        Some(3),
        "{at_second}"
    );

    // 3. To a folder (from n2) and to S3 (from n3): any node backs up, none holds plaintext.
    let (_, disk_new, _) = cluster_backup(&cluster, "n2", "disk");
    assert!(disk_new > new_raw, "{disk_new}");
    assert_no_plaintext(target_dir.path(), canary);
    let (s3_id, _, _) = cluster_backup(&cluster, "n3", "s3");
    let counts: Vec<u64> = python(S3_GREP, &[&endpoint, canary])
        .split_whitespace()
        .map(|w| w.parse().expect("count"))
        .collect();
    assert!(counts[0] > 160, "objects in the bucket: {counts:?}");
    assert_eq!(counts[1], 0, "plaintext in the bucket");
    let verified = cluster.kermail("n1", &["backup", "verify", &s3_id, "--target", "s3"]);
    assert!(verified.contains(" ok: "), "{verified}");

    // list and verify of the node target, from a node that did not make the backup.
    let listed = cluster.kermail("n2", &["backup", "list", "--target", "site-c"]);
    assert!(
        listed.contains(&first) && listed.contains(&second),
        "{listed}"
    );
    let verified = cluster.kermail("n2", &["backup", "verify", &second, "--target", "site-c"]);
    assert!(verified.contains(" ok: "), "{verified}");
    // The replicated record of the last success shows on every node.
    let status = cluster.kermail("n3", &["status"]);
    assert!(
        status.contains("backup site-c: last success")
            && status.contains(&format!("({second}, by n1)")),
        "{status}"
    );

    // 4. Full restore from what n3 keeps, read as a folder, with the exported key.
    let key = cluster.kermail("n1", &["backup", "key", "export"]);
    let mut restored = Node::create();
    let key_file = restored.dir.path().join("backup.key");
    std::fs::write(&key_file, key.trim()).expect("write key");
    let wrong_key = restored.dir.path().join("wrong.key");
    std::fs::write(&wrong_key, "11".repeat(32)).expect("write key");
    let mut config = std::fs::read_to_string(&restored.config).expect("config");
    config.push_str(&format!(
        "[backup]\n[[backup.targets]]\nname = \"from-n3\"\nkind = \"dir\"\npath = \"{}\"\n",
        store.display()
    ));
    std::fs::write(&restored.config, config).expect("write config");
    let data_dir = restored.data_dir.to_str().expect("utf-8").to_owned();
    let out = restored.cli(&[
        "restore",
        &second,
        "--to",
        &data_dir,
        "--key-file",
        wrong_key.to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("wrong backup key"), "{stderr}");
    let out = restored.cli_ok(&[
        "restore",
        &second,
        "--to",
        &data_dir,
        "--key-file",
        key_file.to_str().expect("utf-8"),
    ]);
    assert!(out.contains("163 messages"), "{out}");
    restored.spawn();
    assert_eq!(
        node_view(&restored, &users),
        at_second,
        "the restored folder serves other mail, UIDs, flags or UIDVALIDITY"
    );
    drop(restored);

    // 5. An account restore after `user remove` (run on n2, read on n3).
    let bob_before = at_second[bob]["INBOX"][1].clone();
    cluster.kermail("n2", &["user", "remove", bob]);
    cluster.ok_stdin(
        &[
            "exec",
            "n2",
            "--",
            "kermail",
            "user",
            "add",
            bob,
            "--password-stdin",
        ],
        &format!("{PASSWORD}\n"),
    );
    let out = cluster.kermail(
        "n2",
        &["restore", &second, "--account", bob, "--target", "site-c"],
    );
    assert!(out.contains("restored 20 messages"), "{out}");
    let bob_now = wait_for("the restored mail on n3", Duration::from_secs(120), || {
        let view = cluster_view(&cluster, "n3", &[bob]);
        let boxes = view[bob].as_object()?.clone();
        let (_, restored) = boxes
            .iter()
            .find(|(name, _)| name.starts_with("Restored/"))?;
        (restored[1].as_array()?.len() == 20).then(|| restored[1].clone())
    });
    // Same bodies and flags (new UIDs in a new mailbox).
    let strip = |v: &serde_json::Value| -> Vec<(serde_json::Value, serde_json::Value)> {
        let mut out: Vec<_> = v
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| (m[1].clone(), m[2].clone()))
            .collect();
        out.sort_by_key(|(f, h)| (f.to_string(), h.to_string()));
        out
    };
    assert_eq!(strip(&bob_now), strip(&bob_before));

    // 6. verify catches one flipped bit in a chunk at n3.
    let victim = files_under(&store.join("chunks"))
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("a chunk");
    let mut bytes = std::fs::read(&victim).expect("read chunk");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&victim, bytes).expect("write chunk");
    let out = cluster.run(&[
        "exec", "n1", "--", "kermail", "backup", "verify", &second, "--target", "site-c",
    ]);
    assert!(!out.status.success(), "verify missed a flipped bit");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("damaged"), "{stderr}");

    // 7. Two nodes at once: n1's backup hangs on an S3 endpoint that never answers, holding
    // the lease; n2's is refused, naming n1.
    let hole = std::process::Command::new("python3")
        .arg("-c")
        .arg(BLACK_HOLE)
        .arg(&host)
        .arg(hole_port.to_string())
        .spawn()
        .expect("python3");
    let _hole = KillOnDrop(hole);
    wait_for("the black hole", Duration::from_secs(30), || {
        std::net::TcpStream::connect((host.as_str(), hole_port)).ok()
    });
    let hanging = cluster.spawn_kermail("n1", &["backup", "now", "--target", "hangs"]);
    let _hanging = KillOnDrop(hanging);
    wait_for("n1's lease, seen on n2", Duration::from_secs(120), || {
        cluster
            .kermail("n2", &["status"])
            .contains("backup running on node n1")
            .then_some(())
    });
    let out = cluster.run(&[
        "exec", "n2", "--", "kermail", "backup", "now", "--target", "disk",
    ]);
    assert!(!out.status.success(), "two backups ran at once");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("backup refused: a backup is running on node n1"),
        "{stderr}"
    );
}

const EXPUNGE_INBOX: &str = r#"
c = imap()
ok(c.select("INBOX"))
ok(c.store("1:*", "+FLAGS", "(\\Deleted)"))
ok(c.expunge())
c.logout()
"#;

fn chunk_names(dir: &Path) -> std::collections::BTreeSet<PathBuf> {
    chunk_files(dir).into_iter().collect()
}

/// `prune`: a target with `keep_last = 2` keeps the two newest of three backups after the
/// third (pruned by itself), deletes the chunks only the dropped one used (bodies expunged
/// since) and keeps every chunk the kept ones use (both still verify); `backup prune` with the
/// calendar retention keeps the newest backup of each day. The last success per target shown
/// by `kermail status` is the replicated record: it is still there after a restart.
#[test]
fn prune_keeps_what_retention_asks_and_every_chunk_a_kept_backup_uses() {
    let keep2 = tempfile::tempdir().expect("tempdir");
    let daily = tempfile::tempdir().expect("tempdir");
    let mut node = node_with_backup_target(&format!(
        "[backup]\n[[backup.targets]]\nname = \"keep2\"\nkind = \"dir\"\npath = \"{}\"\nkeep_last = 2\n\
         [[backup.targets]]\nname = \"daily\"\nkind = \"dir\"\npath = \"{}\"\n",
        keep2.path().display(),
        daily.path().display()
    ));
    let backup = |target: &str| -> String {
        let out = node.cli_ok(&["backup", "now", "--target", target]);
        parse_summary(&out).0
    };
    deliver(&node, 5, 3_000, "prune-a");
    let b1 = backup("keep2");
    let d1 = backup("daily");
    let after_b1 = chunk_names(keep2.path());
    assert_eq!(after_b1.len(), 6, "5 bodies and 1 metadata chunk");

    node.py(EXPUNGE_INBOX, &[]);
    deliver(&node, 5, 3_000, "prune-b");
    let b2 = backup("keep2");
    let d2 = backup("daily");
    let after_b2 = chunk_names(keep2.path());
    let only_b2: Vec<_> = after_b2.difference(&after_b1).cloned().collect();
    assert_eq!(only_b2.len(), 6, "5 new bodies and 1 metadata chunk");

    deliver(&node, 5, 3_000, "prune-c");
    let b3 = backup("keep2");
    let d3 = backup("daily");

    let listed = node.cli_ok(&["backup", "list", "--target", "keep2"]);
    assert!(
        !listed.contains(&b1) && listed.contains(&b2) && listed.contains(&b3),
        "{listed}"
    );
    let now = chunk_names(keep2.path());
    assert!(
        after_b1.iter().all(|c| !now.contains(c)),
        "a chunk only the dropped backup used is still there"
    );
    assert!(
        only_b2.iter().all(|c| now.contains(c)),
        "a chunk a kept backup uses was deleted"
    );
    assert_eq!(
        now.len(),
        5 + 5 + 2,
        "bodies of B and C, and two metadata chunks"
    );
    for id in [&b2, &b3] {
        let out = node.cli_ok(&["backup", "verify", id, "--target", "keep2"]);
        assert!(out.contains(" ok: "), "{out}");
    }

    // Calendar retention (daily 7, weekly 4, monthly 12): the newest of each day is kept.
    let days: std::collections::BTreeSet<&str> =
        [&d1, &d2, &d3].iter().map(|id| &id[..8]).collect();
    let out = node.cli_ok(&["backup", "prune", "--target", "daily"]);
    assert!(
        out.contains(&format!("pruned {} backups", 3 - days.len())),
        "{out}"
    );
    let listed = node.cli_ok(&["backup", "list", "--target", "daily"]);
    assert!(listed.contains(&d3), "{listed}");
    assert_eq!(listed.lines().count(), 1 + days.len(), "{listed}");
    let out = node.cli_ok(&["backup", "verify", &d3, "--target", "daily"]);
    assert!(out.contains(" ok: "), "{out}");

    // The last success per target survives a restart (it is in the replicated state).
    let status = node.cli_ok(&["status"]);
    assert!(status.contains(&format!("({b3}, by ")), "{status}");
    assert!(status.contains(&format!("({d3}, by ")), "{status}");
    node.restart();
    let status = node.cli_ok(&["status"]);
    assert!(
        status.contains("backup keep2: last success") && status.contains(&format!("({b3}, by ")),
        "the last success was lost on restart: {status}"
    );
}

/// A target whose backups fail is warned about once its last success is older than twice the
/// schedule's period (`every 1s`: after 2 s).
#[test]
fn a_target_without_a_recent_backup_is_warned_about_in_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a folder").expect("write");
    let node = node_with_backup_target(&format!(
        "[backup]\nschedule = \"every 1s\"\n[[backup.targets]]\nname = \"broken\"\nkind = \"dir\"\n\
         path = \"{}\"\n",
        file.join("backups").display()
    ));
    wait_for("the stale backup warning", Duration::from_secs(60), || {
        let log = node.stderr();
        log.lines()
            .any(|l| {
                l.contains("WARN")
                    && l.contains("older than twice its schedule")
                    && l.contains("broken")
            })
            .then_some(())
    });
    let status = node.cli_ok(&["status"]);
    assert!(
        status.contains("backup broken: no successful backup yet"),
        "{status}"
    );
}

/// Issue 11's backup-only member: b1 runs `[node] role = "backup-store"` outside the Raft
/// membership (the cluster's nodes know it by its mesh key and address, it knows them by
/// theirs). A backup from n1 to it and a verify from n2 work; b1 holds no backup key (its
/// exported hex and raw bytes appear in none of its files), no Raft log, no mail state, no
/// plaintext, and refuses `backup key export`. Its quota refuses a backup that would pass it,
/// with an error naming the quota, while `list` and `verify` of what it holds keep working.
/// The folder it keeps restores, with the exported key, to the same messages.
#[test]
fn a_backup_only_member_holds_only_ciphertext_without_the_key_and_within_its_quota() {
    let keys = tempfile::tempdir().expect("tempdir");
    let b1_key = keys.path().join("b1.key");
    let keygen_config = keys.path().join("keygen.toml");
    std::fs::write(
        &keygen_config,
        format!(
            "[node]\ndata_dir = \"{}\"\n[mesh]\nkey_file = \"{}\"\n",
            keys.path().display(),
            b1_key.display()
        ),
    )
    .expect("write config");
    let out = std::process::Command::new(crate::harness::KERMAIL)
        .args(["--config", keygen_config.to_str().expect("utf-8"), "keygen"])
        .output()
        .expect("kermail keygen");
    assert!(out.status.success(), "{out:?}");
    let b1_public = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let mut b1_address = String::new();
    let Some(cluster) = crate::cluster::Cluster::up_with(12, 3, None, |host| {
        // The fourth node of the cluster's network: 10.213.ID.14.
        let base = host.rsplit_once('.').expect("IPv4 host").0;
        b1_address = format!("{base}.14:7655");
        Some(format!(
            r#"
[smtp]
max_messages_per_account_per_minute = 100000
[backup]
[[backup.targets]]
name = "site-b"
kind = "node"
node = "b1"
public_key = "{b1_public}"
addrs = ["{b1_address}"]
site = "s4"
"#
        ))
    }) else {
        return;
    };
    cluster.account();
    let canary = "kermail-backup-only-canary-93d1";
    cluster.py(CLUSTER_DELIVER, &[canary, "20", "3000", "first", USER]);

    // b1: only the cluster's nodes, by their mesh keys, may store there; 1 MiB at most.
    let mut b1_config = format!(
        "[node]\nrole = \"backup-store\"\n[mesh]\nkey_file = \"{}\"\n[backup_store]\nquota_mb = 1\n",
        b1_key.display()
    );
    for node in ["n1", "n2", "n3"] {
        let status: serde_json::Value =
            serde_json::from_str(&cluster.kermail(node, &["mesh", "status", "--json"]))
                .expect("mesh status json");
        b1_config.push_str(&format!(
            "[[backup_store.clients]]\nname = \"{node}\"\npublic_key = \"{}\"\n",
            status["public_key"].as_str().expect("public_key")
        ));
    }
    let b1_extra = keys.path().join("b1.toml");
    std::fs::write(&b1_extra, b1_config).expect("write b1 config");
    cluster.ok(&[
        "add",
        "b1",
        "--site",
        "s4",
        "--config",
        b1_extra.to_str().expect("utf-8"),
    ]);
    let status = cluster.kermail("b1", &["status"]);
    assert!(status.contains("role: backup-store"), "{status}");
    // Not a member of the Raft cluster.
    let members = cluster.kermail("n1", &["cluster", "status"]);
    assert!(!members.contains("b1"), "{members}");

    let (first, first_new, _) = cluster_backup(&cluster, "n1", "site-b");
    assert!(
        first_new > 20 * 2_000,
        "first backup sent {first_new} bytes"
    );
    let b1_data = cluster.node_dir("b1").join("data");
    let store = b1_data.join("backup-store");
    assert!(!files_under(&store.join("chunks")).is_empty());
    let verified = cluster.kermail("n2", &["backup", "verify", &first, "--target", "site-b"]);
    assert!(verified.contains(" ok: "), "{verified}");

    // What b1 holds: ciphertext, and nothing to open it with.
    let key_hex = cluster
        .kermail("n1", &["backup", "key", "export"])
        .trim()
        .to_owned();
    let key_raw = hex::decode(&key_hex).expect("hex key");
    // Every regular file of b1's data folder (not its admin socket).
    let b1_files: Vec<PathBuf> = files_under(&b1_data)
        .into_iter()
        .filter(|p| std::fs::metadata(p).map(|m| m.is_file()).unwrap_or(false))
        .collect();
    assert!(b1_files.len() > 20, "{b1_files:?}");
    for file in &b1_files {
        let bytes = std::fs::read(file).expect("read");
        for secret in [
            canary.as_bytes(),
            b"Subject: first-1".as_slice(),
            key_hex.as_bytes(),
            key_raw.as_slice(),
        ] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret),
                "{} holds {:?}",
                file.display(),
                String::from_utf8_lossy(secret)
            );
        }
    }
    for absent in ["raft", "blobs", "snapshots"] {
        assert!(!b1_data.join(absent).exists(), "b1 has a {absent} folder");
    }
    let out = cluster.run(&["exec", "b1", "--", "kermail", "backup", "key", "export"]);
    assert!(!out.status.success(), "b1 exported a backup key");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("backup store"), "{stderr}");

    // The quota: 400 more messages of 4 KB do not fit in 1 MiB; the backup fails naming it.
    cluster.py(CLUSTER_DELIVER, &[canary, "400", "4000", "second", USER]);
    let out = cluster.run(&[
        "exec", "n1", "--", "kermail", "backup", "now", "--target", "site-b",
    ]);
    assert!(!out.status.success(), "a backup over b1's quota succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("backup store quota reached"), "{stderr}");
    let used = bytes_under(&store);
    assert!(used <= 1024 * 1024, "b1 holds {used} bytes, over its quota");
    assert!(
        files_under(&store)
            .iter()
            .all(|p| !p.to_string_lossy().contains(".tmp-")),
        "temporary files left at b1"
    );
    // Reads go on: list and verify of the first backup.
    let listed = cluster.kermail("n3", &["backup", "list", "--target", "site-b"]);
    assert!(listed.contains(&first), "{listed}");
    let verified = cluster.kermail("n3", &["backup", "verify", &first, "--target", "site-b"]);
    assert!(verified.contains(" ok: "), "{verified}");
    let status = cluster.kermail("b1", &["status"]);
    assert!(status.contains("quota 1048576 bytes"), "{status}");

    // b1's folder restores with the exported key, as a `dir` target, with no node running.
    let restored = Node::create();
    let key_file = restored.dir.path().join("backup.key");
    std::fs::write(&key_file, &key_hex).expect("write key");
    let mut config = std::fs::read_to_string(&restored.config).expect("config");
    config.push_str(&format!(
        "[backup]\n[[backup.targets]]\nname = \"from-b1\"\nkind = \"dir\"\npath = \"{}\"\n",
        store.display()
    ));
    std::fs::write(&restored.config, config).expect("write config");
    let out = restored.cli_ok(&[
        "restore",
        &first,
        "--to",
        restored.data_dir.to_str().expect("utf-8"),
        "--key-file",
        key_file.to_str().expect("utf-8"),
    ]);
    assert!(out.contains("23 messages, 20 bodies"), "{out}");
}

/// A folder target on a 1 MiB tmpfs: the backup fails (no space) and leaves no temporary file;
/// the chunks that fully arrived are kept. With room again (and a leftover temporary file
/// planted, as a kill would leave it), the next backup removes the leftover, sends only what
/// the failed one did not, and verifies.
#[test]
fn an_interrupted_folder_backup_leaves_no_temporary_files_and_resumes() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root (tmpfs mount)");
        return;
    }
    let mount = tempfile::tempdir().expect("tempdir");
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs"])
        .arg(mount.path())
        .status()
        .expect("mount");
    assert!(status.success(), "mount tmpfs");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0)
                .status();
        }
    }
    let _unmount = Unmount(mount.path());
    let node = node_with_backup_target(&format!(
        "[backup]\n[[backup.targets]]\nname = \"disk\"\nkind = \"dir\"\npath = \"{}\"\n",
        mount.path().display()
    ));
    let temporary = |dir: &Path| -> Vec<PathBuf> {
        files_under(dir)
            .into_iter()
            .filter(|p| p.to_string_lossy().contains(".tmp-"))
            .collect()
    };
    // About 2 MB of sealed chunks: twice the tmpfs.
    deliver(&node, 150, 16_000, "kermail-interrupted-canary");
    let out = node.cli(&["backup", "now"]);
    assert!(!out.status.success(), "a backup onto a full disk succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot write to the target"), "{stderr}");
    assert_eq!(temporary(mount.path()), Vec::<PathBuf>::new());
    let kept = chunk_files(mount.path()).len();
    assert!(kept > 10, "the failed backup kept {kept} chunks");

    let status = std::process::Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(mount.path())
        .status()
        .expect("remount");
    assert!(status.success(), "remount");
    let leftover = mount.path().join("chunks/ab/0123.tmp-00000000deadbeef");
    std::fs::create_dir_all(leftover.parent().expect("parent")).expect("mkdir");
    std::fs::write(&leftover, b"half a chunk").expect("plant");
    let (id, new, total) = backup_now(&node);
    assert!(
        !leftover.exists(),
        "the leftover temporary file is still there"
    );
    assert_eq!(temporary(mount.path()), Vec::<PathBuf>::new());
    assert!(
        new < total,
        "the resumed backup sent everything again ({new} of {total} bytes)"
    );
    assert!(chunk_files(mount.path()).len() > kept);
    let ok = node.cli_ok(&["backup", "verify", &id]);
    assert!(ok.contains("ok"), "{ok}");
}
