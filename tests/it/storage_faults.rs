//! Storage faults are survived, not silent: a node whose data folder fills up refuses new mail
//! with `452 4.3.1` (under the free-space reserve) or `451 4.3.1` (the disk itself is full),
//! never answers `250` for a message it did not store, says so in `kermail status`, and takes
//! mail again by itself once space returns; every message that got a `250` is there after.
//!
//! The data folder is a small tmpfs mounted over the node's data path before it starts (root
//! only: without root the tests print why and pass).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::harness::{wait_for, Node, PASSWORD, USER};

/// Size of the tmpfs holding the data folder.
const TMPFS_MB: u64 = 48;
/// How long writes may take to resume once space returns.
const RESUME_DEADLINE: Duration = Duration::from_secs(30);

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// A tmpfs mounted at a path, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size_mb: u64) -> Tmpfs {
        std::fs::create_dir_all(path).expect("create mount point");
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mb}m,mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount tmpfs on {}", path.display());
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system of `dir` with `name` until only `leave_bytes` are free (0: until
/// the disk is full).
fn fill(dir: &Path, name: &str, leave_bytes: u64) {
    use std::io::Write as _;
    let free = kermail::store::free_disk_bytes(dir).expect("statvfs");
    let mut file = std::fs::File::create(dir.join(name)).expect("filler");
    let chunk = vec![0x5au8; 1 << 20];
    let mut to_write = free.saturating_sub(leave_bytes);
    // Until full: MiB chunks, then pages, so that not even a page is left.
    let mut step = chunk.len();
    while leave_bytes == 0 || to_write > 0 {
        let n = if leave_bytes == 0 {
            step
        } else {
            (to_write as usize).min(chunk.len())
        };
        match file.write(&chunk[..n]) {
            Ok(0) | Err(_) if leave_bytes == 0 && step > 4096 => step = 4096,
            Ok(0) | Err(_) => break,
            Ok(written) => to_write = to_write.saturating_sub(written as u64),
        }
    }
    let _ = file.sync_all();
}

/// Sends one ~24 KB message (incompressible) and prints the server's reply code and text.
const SEND: &str = r#"
import os, base64
subject = POS[0]
s = smtp()
body = base64.b64encode(os.urandom(18000)).decode()
body = "\r\n".join(body[i:i+76] for i in range(0, len(body), 76))
code, text = None, b""
try:
    s.sendmail("bob@example.org", [USER], message(subject, body + "\r\n"))
    code, text = 250, b"ok"
except smtplib.SMTPDataError as e:
    code, text = e.smtp_code, e.smtp_error
except smtplib.SMTPRecipientsRefused as e:
    code, text = list(e.recipients.values())[0]
print(code, text.decode(errors="replace"))
"#;

const SUBJECTS: &str = r#"
msgs = inbox_messages()
print("\n".join(re.search(rb"Subject: ([^\r]*)", m[2]).group(1).decode() for m in msgs))
"#;

fn send(node: &Node, subject: &str) -> String {
    node.py(SEND, &[subject]).trim().to_owned()
}

fn status(node: &Node) -> String {
    node.cli_ok(&["status"])
}

fn storage_line(node: &Node) -> String {
    status(node)
        .lines()
        .find(|l| l.starts_with("storage:"))
        .unwrap_or("")
        .to_owned()
}

/// Starts a node whose data folder is a small tmpfs, with the given reserve.
fn node_on_tmpfs(min_free_disk_mb: u64) -> Option<(Node, Tmpfs)> {
    if !is_root() {
        eprintln!("storage fault tests need root (tmpfs mount): skipped");
        return None;
    }
    let mut node = Node::create();
    let tmpfs = Tmpfs::mount(&node.data_dir, TMPFS_MB);
    let text = std::fs::read_to_string(&node.config).expect("read config");
    let text = text.replacen(
        "[node]\n",
        &format!("[node]\nmin_free_disk_mb = {min_free_disk_mb}\n"),
        1,
    );
    std::fs::write(&node.config, text).expect("write config");
    node.spawn();
    node.add_account(USER, PASSWORD);
    Some((node, tmpfs))
}

/// Every message that got a 250 is in the INBOX, in order.
fn assert_delivered(node: &Node, accepted: &[String]) {
    let subjects: Vec<String> = node
        .py(SUBJECTS, &[])
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect();
    for subject in accepted {
        assert!(
            subjects.contains(subject),
            "{subject} got a 250 but is missing: {subjects:?}"
        );
    }
}

#[test]
fn under_the_free_space_reserve_new_mail_gets_452_until_space_returns() {
    let Some((node, _tmpfs)) = node_on_tmpfs(8) else {
        return;
    };
    let mut accepted = Vec::new();
    assert!(send(&node, "before").starts_with("250"));
    accepted.push("before".to_owned());
    assert_eq!(storage_line(&node), "storage: ok");

    // Leave 4 MB: under the 8 MB reserve.
    fill(&node.data_dir, "filler", 4 << 20);
    let reply = send(&node, "while low");
    assert!(reply.starts_with("452 4.3.1"), "{reply}");
    let line = storage_line(&node);
    assert!(line.starts_with("storage: low ("), "{line}");

    std::fs::remove_file(node.data_dir.join("filler")).expect("remove filler");
    let resumed = wait_for("a 250 after space returned", RESUME_DEADLINE, || {
        let reply = send(&node, "after");
        reply.starts_with("250").then_some(reply)
    });
    assert!(resumed.starts_with("250"));
    accepted.push("after".to_owned());
    assert_eq!(storage_line(&node), "storage: ok");
    assert_delivered(&node, &accepted);
}

#[test]
fn a_full_disk_gets_451_and_a_status_line_and_writes_resume_when_space_returns() {
    let Some((mut node, _tmpfs)) = node_on_tmpfs(0) else {
        return;
    };
    let mut accepted = Vec::new();
    for n in 0..3 {
        let subject = format!("before {n}");
        assert!(send(&node, &subject).starts_with("250"));
        accepted.push(subject);
    }

    fill(&node.data_dir, "filler", 0);
    // Every reply while full is a temporary 4.3.1, never a 250 for an unstored message.
    let mut saw_failure = false;
    for n in 0..3 {
        let subject = format!("while full {n}");
        let reply = send(&node, &subject);
        if reply.starts_with("250") {
            // Stored in the last pages the file system had: it must be there at the end.
            accepted.push(subject);
            continue;
        }
        assert!(reply.starts_with("451 4.3.1"), "{reply}");
        saw_failure = true;
    }
    assert!(saw_failure, "a full disk never refused a message");
    let line = storage_line(&node);
    assert!(
        line.starts_with("storage: failed (no space left on device) since "),
        "{line}"
    );
    let log = node.stderr();
    let failed_lines = log.matches("storage failed").count();
    assert!(
        (1..=3).contains(&failed_lines),
        "one log line per failed component, not a flood: {failed_lines}"
    );

    std::fs::remove_file(node.data_dir.join("filler")).expect("remove filler");
    wait_for("a 250 after space returned", RESUME_DEADLINE, || {
        send(&node, "after").starts_with("250").then_some(())
    });
    accepted.push("after".to_owned());
    wait_for("storage: ok", RESUME_DEADLINE, || {
        (storage_line(&node) == "storage: ok").then_some(())
    });
    assert!(node.stderr().contains("storage recovered"));
    assert_delivered(&node, &accepted);

    // And a restart finds every accepted message.
    node.terminate();
    node.spawn();
    assert_delivered(&node, &accepted);
}

/// Offset of the three-node test's cluster id above `KERMAIL_IT_CLUSTER_ID_BASE` (cluster.rs
/// uses 0..9, chaos.rs 9).
const CLUSTER_OFFSET: u32 = 11;
/// Size of the tmpfs holding the third node's data folder in the three-node test.
const CLUSTER_TMPFS_MB: u64 = 48;

/// One reply per send of a ~24 KB message: `250` (acked, the subject is printed on an `ACKED` line) or the 4xx
/// code and text. `send(node, subject)` never raises for a 4xx or a dropped connection.
const CLUSTER_SEND: &str = r#"
import base64
ACKED = []
def big_message(subject):
    # About 24 KB, incompressible: a write that a full tmpfs cannot take in a page it already
    # gave the file (small Raft entries can fit in the last page of a log segment).
    body = base64.b64encode(os.urandom(18000)).decode()
    body = "\r\n".join(body[i:i+76] for i in range(0, len(body), 76))
    return (f"From: Bob <bob@example.org>\r\nTo: {USER}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@example.org>\r\n\r\n{body}\r\n").encode()

def send(node, subject):
    try:
        s = smtp(node, timeout=60)
        try:
            s.sendmail("bob@example.org", [USER], big_message(subject))
        finally:
            try: s.quit()
            except Exception: pass
    except smtplib.SMTPResponseException as e:
        return f"{e.smtp_code} {e.smtp_error.decode(errors='replace')}"
    except smtplib.SMTPRecipientsRefused as e:
        code, text = list(e.recipients.values())[0]
        return f"{code} {text.decode(errors='replace')}"
    except (smtplib.SMTPException, OSError) as e:
        return f"000 {type(e).__name__}: {e}"
    ACKED.append(subject)
    print("ACKED", subject, flush=True)
    return "250"

def send_until_250(node, subject, secs=120):
    replies = []
    def attempt():
        reply = send(node, f"{subject}-{len(replies)}")
        replies.append(reply)
        return reply == "250"
    wait_until(attempt, f"a 250 from {node} (replies: {replies[-3:]})", secs)

def storage_line(node):
    res = local_cluster("exec", node, "--", "kermail", "status")
    return next((l for l in res.stdout.splitlines() if l.startswith("storage:")), "")
"#;

/// A full disk on one node of three: that node refuses new mail with `451 4.3.1` and says
/// `storage: failed` in `kermail status`, the other two keep committing (`250`), and once
/// space returns the node recovers by itself and holds every acked message, with the same
/// UIDs as the others.
#[test]
fn a_full_disk_on_one_node_of_three_the_others_commit_and_it_catches_up() {
    let Some(cluster) =
        crate::cluster::Cluster::up_with(CLUSTER_OFFSET, 3, Some("s1,s2,s3"), |_| {
            // No free-space reserve: the disk itself runs full (451, not the reserve's 452).
            Some("[node]\nmin_free_disk_mb = 0\n".to_owned())
        })
    else {
        return;
    };
    cluster.account();

    // n3's data folder moves onto a small tmpfs (n3 stopped meanwhile).
    cluster.ok(&["stop", "n3"]);
    let data = cluster.node_dir("n3").join("data");
    let before = cluster.node_dir("n3").join("data.before-tmpfs");
    std::fs::rename(&data, &before).expect("move the data folder aside");
    let _tmpfs = Tmpfs::mount(&data, CLUSTER_TMPFS_MB);
    let copied = Command::new("cp")
        .arg("-a")
        .arg(before.join("."))
        .arg(&data)
        .status()
        .expect("run cp");
    assert!(copied.success(), "copy the data folder onto the tmpfs");
    let _ = std::fs::remove_file(data.join("admin.sock"));
    std::fs::remove_dir_all(&before).expect("remove the old data folder");
    cluster.ok(&["start", "n3"]);

    let mut acked: Vec<String> = Vec::new();
    let take_acked = |out: &str, acked: &mut Vec<String>| {
        acked.extend(
            out.lines()
                .filter_map(|l| l.strip_prefix("ACKED "))
                .map(str::to_owned),
        );
    };
    let out = cluster.py(
        &format!(
            "{CLUSTER_SEND}\nfor n in NODES: send_until_250(n, f'before-{{n}}')\n\
             assert storage_line('n3') == 'storage: ok', storage_line('n3')"
        ),
        &[],
    );
    take_acked(&out, &mut acked);

    fill(&data, "filler", 0);
    let out = cluster.py(
        &format!(
            "{CLUSTER_SEND}\n\
             refused = 0\n\
             for i in range(5):\n\
             \x20   reply = send('n3', f'while-full-n3-{{i}}')\n\
             \x20   print(f'n3 while full: {{reply}}', file=sys.stderr)\n\
             \x20   if reply != '250':\n\
             \x20       assert reply.startswith('451 4.3.1'), reply\n\
             \x20       refused += 1\n\
             assert refused, 'the full node never refused a message'\n\
             wait_until(lambda: storage_line('n3').startswith('storage: failed (no space left on device) since '), \
             f'storage: failed on n3 (now {{storage_line(\"n3\")!r}})', 60)\n\
             for n in ('n1', 'n2'):\n\
             \x20   for i in range(3):\n\
             \x20       send_until_250(n, f'while-full-via-{{n}}-{{i}}')\n\
             assert storage_line('n3').startswith('storage: failed'), storage_line('n3')\n"
        ),
        &[],
    );
    take_acked(&out, &mut acked);
    assert!(
        acked.iter().any(|s| s.starts_with("while-full-via-n1"))
            && acked.iter().any(|s| s.starts_with("while-full-via-n2")),
        "n1 and n2 committed while n3 was full: {acked:?}"
    );

    std::fs::remove_file(data.join("filler")).expect("remove filler");
    let out = cluster.py(
        &format!(
            "{CLUSTER_SEND}\n\
             acked = set(POS)\n\
             wait_until(lambda: storage_line('n3') == 'storage: ok', 'storage: ok on n3', 120)\n\
             send_until_250('n3', 'after-n3')\n\
             acked |= set(ACKED)\n\
             def caught_up():\n\
             \x20   views = [view(n) for n in ('n1', 'n2', 'n3')]\n\
             \x20   subjects = [s for (_, _, s) in views[2][1]]\n\
             \x20   return views[0] == views[1] == views[2] and acked <= set(subjects) and len(subjects) == len(set(subjects))\n\
             wait_until(caught_up, 'n3 holds every acked message, with the same UIDs as n1 and n2', 180)\n"
        ),
        &acked.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    take_acked(&out, &mut acked);
}
