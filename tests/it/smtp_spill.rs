//! Bounded memory for large messages (issue 10, point 2): the body of a DATA or BDAT past
//! 256 KiB goes to an unlinked file in the data folder's `tmp`, so many clients holding large
//! messages open cost files, not the node's memory. Real `kermail serve`, Python sockets.

use crate::harness::{Node, PASSWORD, USER};

/// Concurrent clients, each in DATA with [`MESSAGE_BYTES`].
const N_CLIENTS: usize = 20;
/// Bytes each client sends in DATA (under the default 25 MiB limit).
const MESSAGE_BYTES: usize = 20 * 1000 * 1000;
/// How much the node's resident memory may grow while they are all in DATA (buffered whole,
/// it grows by their sum, 400 MB).
const RSS_GROWTH_KB_MAX: u64 = 40 * 1024;

/// `VmRSS` and `VmHWM` of a process, in kB.
fn memory_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {status}"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Open file descriptors of `pid` that point into `dir` (spill files show as
/// `dir/#<inode> (deleted)`).
fn fds_into(pid: u32, dir: &std::path::Path) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| {
            entries
                .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
                .filter(|target| target.starts_with(dir))
                .count()
        })
        .unwrap_or(0)
}

/// The clients: every one opens a transaction and DATA, then they send their bodies in
/// 64 KiB pieces, round robin (all of them slowly and at once), stop before the final dot
/// and print `all_sent`; on a line on standard input they end: the first client's message
/// with the dot (its reply and the stored message's size and hash are printed), the others
/// by closing. Messages are base64 lines (random, so not one compressible run).
const CLIENTS: &str = r#"
import base64, hashlib, os
n = int(ENV["N"]); size = int(ENV["SIZE"])
line = 76
chunk_lines = []
random = base64.b64encode(os.urandom(size))
header = f"From: <bob@example.org>\r\nTo: <{USER}>\r\nSubject: big\r\n\r\n".encode()
body = bytearray(header)
for i in range(0, size - len(header), line):
    body += random[i:i + line] + b"\r\n"
body = bytes(body[:size - 2]) + b"\r\n"
socks = []
for i in range(n):
    s = socket.create_connection((HOST, SMTP_PORT), timeout=120)
    f = s.makefile("rb")
    def reply():
        while True:
            l = f.readline()
            if l[3:4] != b"-":
                return l
    assert reply().startswith(b"220")
    for command in [b"EHLO client.test", b"MAIL FROM:<bob@example.org>", f"RCPT TO:<{USER}>".encode(), b"DATA"]:
        s.sendall(command + b"\r\n")
        r = reply()
        assert r[:1] in (b"2", b"3"), (command, r)
    socks.append((s, f))
piece = 64 * 1024
for offset in range(0, len(body), piece):
    for s, f in socks:
        s.sendall(body[offset:offset + piece])
print("all_sent", flush=True)
sys.stdin.readline()
s, f = socks[0]
s.sendall(b".\r\n")
print("reply", f.readline().decode().strip().replace(" ", "_"), flush=True)
s.sendall(b"QUIT\r\n")
for s, f in socks:
    s.close()
c = imap()
data = ok(c.select("INBOX"))
typ, fetched = c.fetch("1", "(BODY.PEEK[])")
raw = fetched[0][1]
c.logout()
at = raw.find(b"From: <bob@example.org>")
print("stored", len(raw) - at, hashlib.sha256(raw[at:]).hexdigest(), hashlib.sha256(body).hexdigest(), flush=True)
"#;

#[test]
fn many_large_messages_in_data_at_once_stay_out_of_memory() {
    let node = Node::with_account();
    let pid = node.server_pid();
    let spool = node.data_dir.join("tmp");
    let (rss_before_kb, _) = memory_kb(pid);
    let script = format!("{}\n{CLIENTS}", crate::harness::PY_PRELUDE);
    let mut clients = std::process::Command::new("python3")
        .arg("-c")
        .arg(&script)
        .args([
            format!("SMTP_PORT={}", node.smtp_port),
            format!("IMAP_PORT={}", node.imap_port),
            format!("USER={USER}"),
            format!("PASSWORD={PASSWORD}"),
            format!("N={N_CLIENTS}"),
            format!("SIZE={MESSAGE_BYTES}"),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run python3");
    let mut stdout = std::io::BufReader::new(clients.stdout.take().expect("stdout"));
    let mut line = String::new();
    use std::io::{BufRead as _, Write as _};
    stdout.read_line(&mut line).expect("read clients");
    assert_eq!(line.trim(), "all_sent", "clients said {line:?}");
    // Every byte was written to the sockets; wait until the node has read them: the spill
    // files are then as long as the messages (less the in-memory head). A node that buffers
    // messages in memory instead shows it sooner, in its resident size.
    crate::harness::wait_for("spill files", std::time::Duration::from_secs(120), || {
        let spilled: u64 = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .ok()?
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let target = std::fs::read_link(entry.path()).ok()?;
                target.starts_with(&spool).then_some(())?;
                std::fs::metadata(entry.path()).ok().map(|m| m.len())
            })
            .sum();
        let all_spilled = fds_into(pid, &spool) >= N_CLIENTS
            && spilled >= (N_CLIENTS * (MESSAGE_BYTES - 300 * 1024)) as u64;
        let (rss_kb, _) = memory_kb(pid);
        (all_spilled || rss_kb >= rss_before_kb + RSS_GROWTH_KB_MAX).then_some(())
    });
    let (rss_during_kb, hwm_during_kb) = memory_kb(pid);
    eprintln!(
        "rss before {rss_before_kb} kB, with {N_CLIENTS} x {MESSAGE_BYTES} B in DATA: \
         rss {rss_during_kb} kB, hwm {hwm_during_kb} kB"
    );
    assert!(
        rss_during_kb < rss_before_kb + RSS_GROWTH_KB_MAX,
        "rss grew from {rss_before_kb} kB to {rss_during_kb} kB"
    );
    assert_eq!(
        std::fs::read_dir(&spool).expect("tmp folder").count(),
        0,
        "spill files have no name"
    );
    let mut stdin = clients.stdin.take().expect("stdin");
    writeln!(stdin).expect("tell clients");
    let mut rest = String::new();
    for _ in 0..2 {
        stdout.read_line(&mut rest).expect("read clients");
    }
    let status = clients.wait().expect("clients exit");
    assert!(status.success(), "clients failed: {rest}");
    assert!(rest.contains("reply 250_2.0.0"), "{rest}");
    let stored: Vec<&str> = rest
        .lines()
        .find(|line| line.starts_with("stored "))
        .unwrap_or_else(|| panic!("{rest}"))
        .split_whitespace()
        .collect();
    assert_eq!(stored[1], MESSAGE_BYTES.to_string(), "{rest}");
    assert_eq!(
        stored[2], stored[3],
        "stored message differs from the sent one"
    );
    crate::harness::wait_for(
        "spill files closed",
        std::time::Duration::from_secs(30),
        || (fds_into(pid, &spool) == 0).then_some(()),
    );
    let (_, hwm_after_kb) = memory_kb(pid);
    eprintln!("hwm after storing one: {hwm_after_kb} kB");
}
