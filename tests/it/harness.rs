//! Test harness: a real `kermail serve` process on free loopback ports in a temporary folder,
//! and helpers to run independently written clients (python3 smtplib/imaplib scripts).
//!
//! Readiness follows the binary's contract: the admin socket is created last, after every
//! listener is bound and the node can commit, so `kermail status --config F` exiting 0 means the
//! node is ready. Every wait polls a condition against a deadline; nothing sleeps blindly.

#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The node binary built by cargo for this test run.
pub const KERMAIL: &str = env!("CARGO_BIN_EXE_kermail");

/// How long a node may take to become ready (generous: 2 shared cores, maybe under strace).
pub const READY_DEADLINE: Duration = Duration::from_secs(120);

/// How long a node may take to exit after SIGTERM.
pub const EXIT_DEADLINE: Duration = Duration::from_secs(60);

/// Polling interval for condition waits.
pub const POLL: Duration = Duration::from_millis(20);

/// A password long enough for the CLI's 10-character minimum.
pub const PASSWORD: &str = "correct-horse-battery";

/// The test domain and account every `Node::with_account` node gets.
pub const DOMAIN: &str = "kermail.test";
pub const USER: &str = "alice@kermail.test";

/// Polls `cond` until it returns `Some`, or panics with `what` after `deadline`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = cond() {
            return value;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(POLL);
    }
}

/// A port on 127.0.0.1 that was free when asked and that no other caller in this test process
/// has been given. Ports come from below the kernel's ephemeral range (32768-60999 by default),
/// so neither the outgoing connections of concurrent tests nor another `bind(0)` can take a port
/// between the moment it is handed out and the moment the node binds it; each process starts
/// at its own offset so two test processes rarely probe the same ports.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(2_654_435_761)) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN)
}

pub struct Node {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub data_dir: PathBuf,
    pub smtp_port: u16,
    pub imap_port: u16,
    pub imaps_port: u16,
    pub managesieve_port: u16,
    /// The autoconfiguration listeners (plain HTTP, HTTPS).
    pub autoconfig_port: u16,
    pub autoconfig_tls_port: u16,
    /// A command (and its arguments) the server runs under, e.g. strace.
    wrapper: Vec<String>,
    child: Option<Child>,
    stderr_path: PathBuf,
    starts: u32,
}

impl Node {
    /// A fresh node (empty data folder), started and ready.
    pub fn start() -> Node {
        Node::start_wrapped(&[])
    }

    /// A fresh node whose server process runs under `wrapper` (e.g. `["strace", "-f", ...]`).
    pub fn start_wrapped(wrapper: &[&str]) -> Node {
        let mut node = Node::create();
        node.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        node.spawn();
        node
    }

    /// A fresh node with the domain `DOMAIN` and the account `USER` / `PASSWORD`.
    pub fn with_account() -> Node {
        let node = Node::start();
        node.add_account(USER, PASSWORD);
        node
    }

    /// Writes the configuration without starting anything.
    pub fn create() -> Node {
        let dir = tempfile::Builder::new()
            .prefix("kermail-it-")
            .tempdir()
            .expect("tempdir");
        let data_dir = dir.path().join("data");
        let config = dir.path().join("kermail.toml");
        let (smtp_port, imap_port, imaps_port) = (free_port(), free_port(), free_port());
        let managesieve_port = free_port();
        let (autoconfig_port, autoconfig_tls_port) = (free_port(), free_port());
        let text = format!(
            "[node]\ndata_dir = \"{}\"\nhostname = \"mx.kermail.test\"\n\
             [smtp]\nlisten = [\"127.0.0.1:{smtp_port}\"]\n\
             submission_listen = [\"127.0.0.1:{}\"]\nsubmissions_listen = [\"127.0.0.1:{}\"]\n\
             [imap]\nlisten = [\"127.0.0.1:{imap_port}\"]\nlisten_tls = [\"127.0.0.1:{imaps_port}\"]\n\
             [mesh]\nlisten = [\"127.0.0.1:{}\"]\n\
             [managesieve]\nlisten = [\"127.0.0.1:{managesieve_port}\"]\n\
             [autoconfig]\nlisten = [\"127.0.0.1:{autoconfig_port}\"]\n\
             listen_tls = [\"127.0.0.1:{autoconfig_tls_port}\"]\n",
            data_dir.display(),
            free_port(),
            free_port(),
            free_port(),
        );
        std::fs::write(&config, text).expect("write config");
        let stderr_path = dir.path().join("server.stderr");
        Node {
            dir,
            config,
            data_dir,
            smtp_port,
            imap_port,
            imaps_port,
            managesieve_port,
            autoconfig_port,
            autoconfig_tls_port,
            wrapper: Vec::new(),
            child: None,
            stderr_path,
            starts: 0,
        }
    }

    /// From the next `spawn` on, the server process runs under `wrapper`.
    pub fn set_wrapper(&mut self, wrapper: &[&str]) {
        self.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
    }

    /// Starts `kermail serve --config` (under the wrapper, if any) and waits until ready.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "node already running");
        self.starts += 1;
        let stderr = File::options()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .expect("open stderr file");
        let mut cmd = if self.wrapper.is_empty() {
            Command::new(KERMAIL)
        } else {
            let mut c = Command::new(&self.wrapper[0]);
            c.args(&self.wrapper[1..]).arg(KERMAIL);
            c
        };
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config)
            .current_dir(self.dir.path())
            .env("KERMAIL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        self.child = Some(cmd.spawn().expect("spawn kermail serve"));
        self.wait_ready();
    }

    /// Waits until `kermail status` exits 0; panics (printing the server's stderr) if the
    /// server exits first or the deadline passes.
    pub fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    panic!(
                        "kermail serve exited ({status}) before it was ready; stderr:\n{}",
                        self.stderr()
                    );
                }
            }
            if self.cli(&["status"]).status.success() {
                return;
            }
            if start.elapsed() > READY_DEADLINE {
                panic!(
                    "kermail serve not ready after {READY_DEADLINE:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Runs `kermail ARGS --config FILE` and returns its output.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_stdin(args, "")
    }

    /// Runs `kermail ARGS --config FILE` with `input` on standard input.
    pub fn cli_stdin(&self, args: &[&str], input: &str) -> Output {
        let mut child = Command::new(KERMAIL)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .current_dir(self.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kermail CLI");
        if let Some(mut stdin) = child.stdin.take() {
            // The CLI may exit before reading (e.g. on a usage error): ignore a broken pipe.
            let _ = stdin.write_all(input.as_bytes());
        }
        child.wait_with_output().expect("wait for kermail CLI")
    }

    /// Runs a CLI command that must succeed; returns its standard output.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        self.cli_stdin_ok(args, "")
    }

    pub fn cli_stdin_ok(&self, args: &[&str], input: &str) -> String {
        let out = self.cli_stdin(args, input);
        assert!(
            out.status.success(),
            "kermail {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Adds the address's domain (if needed) and the account.
    pub fn add_account(&self, address: &str, password: &str) {
        let domain = address.rsplit('@').next().expect("address with @");
        let domains = self.cli_ok(&["domain", "list"]);
        if !domains
            .lines()
            .any(|l| l.split_whitespace().any(|w| w == domain))
        {
            self.cli_ok(&["domain", "add", domain]);
        }
        self.cli_stdin_ok(
            &["user", "add", address, "--password-stdin"],
            &format!("{password}\n"),
        );
    }

    /// The wrapper's (or server's) process id.
    pub fn child_pid(&self) -> u32 {
        self.child.as_ref().expect("node running").id()
    }

    /// The `kermail serve` process id (the wrapper's child when running under one).
    pub fn server_pid(&self) -> u32 {
        let pid = self.child_pid();
        if self.wrapper.is_empty() {
            return pid;
        }
        wait_for("the wrapped server process", READY_DEADLINE, || {
            let children =
                std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
            children.split_whitespace().next()?.parse().ok()
        })
    }

    /// True while the server process has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.server_pid() as libc::pid_t;
        // SAFETY: kill(2) on a process id we spawned; no memory is shared.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
    }

    fn reap(&mut self, deadline: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("node running");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if start.elapsed() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "kermail serve did not exit within {deadline:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits for a server that was killed from outside (e.g. by a client script) to exit.
    pub fn reap_killed(&mut self) -> ExitStatus {
        self.reap(EXIT_DEADLINE)
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        self.reap(EXIT_DEADLINE);
    }

    /// SIGTERM (graceful shutdown); returns the exit status once the process has exited.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.reap(EXIT_DEADLINE)
    }

    /// Starts the node again on the same data folder and ports (stopping it with SIGTERM first
    /// if it is running), and waits until ready.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.terminate();
        }
        self.spawn();
    }

    /// What the server wrote to standard error so far (all starts).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Runs a Python client script (see `python`) with the node's ports and the test account
    /// appended to `args` as KEY=VALUE words, available in the script as `ENV[...]`.
    pub fn py(&self, script: &str, args: &[&str]) -> String {
        let out = self.py_output(script, args);
        assert!(
            out.status.success(),
            "python client failed ({}):\nstdout: {}\nstderr: {}\n--- server stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.stderr()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn py_output(&self, script: &str, args: &[&str]) -> Output {
        let smtp = format!("SMTP_PORT={}", self.smtp_port);
        let imap = format!("IMAP_PORT={}", self.imap_port);
        let imaps = format!("IMAPS_PORT={}", self.imaps_port);
        let user = format!("USER={USER}");
        let pass = format!("PASSWORD={PASSWORD}");
        let mut all: Vec<&str> = vec![&smtp, &imap, &imaps, &user, &pass];
        all.extend_from_slice(args);
        python_output(&format!("{PY_PRELUDE}\n{script}"), &all)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if !self.wrapper.is_empty() {
                if let Ok(Some(pid)) =
                    std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id())).map(
                        |s| {
                            s.split_whitespace()
                                .next()
                                .and_then(|p| p.parse::<i32>().ok())
                        },
                    )
                {
                    // SAFETY: kill(2) on the server process we started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- kermail serve stderr ({}) ---\n{}",
                self.stderr_path.display(),
                self.stderr()
            );
        }
    }
}

/// Runs `python3 -c SCRIPT ARGS...`; panics with its output unless it exits 0; returns stdout.
pub fn python(script: &str, args: &[&str]) -> String {
    let out = python_output(script, args);
    assert!(
        out.status.success(),
        "python failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn python_output(script: &str, args: &[&str]) -> Output {
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run python3")
}

/// Python helpers for IMAP commands imaplib does not know, for the extension tests:
/// `read_tagged(c, tag)` reads up to the tagged line of `tag` and returns it with the untagged
/// lines before it; `raw(c, command)` sends one command line and reads its answer.
pub const PY_IMAP_RAW: &str = r#"
def read_tagged(c, tag):
    lines = []
    while True:
        line = c.readline().decode()
        if line.startswith(tag + " "):
            return line.strip(), lines
        lines.append(line.strip())

def raw(c, command):
    tag = c._new_tag().decode()
    c.send(f"{tag} {command}\r\n".encode())
    return read_tagged(c, tag)
"#;

/// Python helpers prepended to every `Node::py` script. `ENV` holds the KEY=VALUE arguments;
/// `POS` the others. Clients: smtplib and imaplib from the standard library.
pub const PY_PRELUDE: &str = r#"
import imaplib, smtplib, socket, sys, json, re, time
ENV = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
POS = [a for a in sys.argv[1:] if "=" not in a]
HOST = "127.0.0.1"
SMTP_PORT = int(ENV["SMTP_PORT"]); IMAP_PORT = int(ENV["IMAP_PORT"])
USER = ENV["USER"]; PASSWORD = ENV["PASSWORD"]

def smtp():
    s = smtplib.SMTP(HOST, SMTP_PORT, timeout=60)
    s.ehlo("client.test")
    return s

def imap(user=None, password=None):
    c = imaplib.IMAP4(HOST, IMAP_PORT, timeout=60)
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.login(user or USER, password or PASSWORD)
    return c

def ok(res, what="IMAP command"):
    typ, data = res
    assert typ == "OK", f"{what}: {typ} {data!r}"
    return data

def inbox_messages(c=None, mailbox="INBOX"):
    """[(uid, flags, raw_bytes)] of every message in the mailbox, in UID order (flags
    without \\Recent)."""
    own = c is None
    c = c or imap()
    ok(c.select(mailbox), "SELECT")
    data = ok(c.uid("FETCH", "1:*", "(UID FLAGS BODY.PEEK[])"), "UID FETCH")
    out = []
    for item in data:
        if isinstance(item, tuple):
            meta = item[0].decode()
            uid = int(re.search(r"UID (\d+)", meta).group(1))
            # \Recent depends on the session that asks (RFC 3501): left out.
            flags = [f for f in re.search(r"FLAGS \(([^)]*)\)", meta).group(1).split()
                     if f != "\\Recent"]
            out.append((uid, flags, item[1]))
    if own:
        c.logout()
    return sorted(out)

def strip_trace_headers(raw):
    """Drops the trace headers the server prepends (Return-Path, Received, with their
    continuation lines) from the top of a stored message."""
    lines = raw.split(b"\r\n")
    i = 0
    while i < len(lines) and re.match(rb"(?i)(return-path|received):", lines[i]):
        i += 1
        while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
            i += 1
    return b"\r\n".join(lines[i:])

def message(subject, body="Hello.\r\n", sender="bob@example.org", to=None):
    return (f"From: Bob <{sender}>\r\nTo: {to or USER}\r\nSubject: {subject}\r\n"
            f"Date: Mon, 2 Nov 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@example.org>\r\n\r\n{body}").encode()
"#;

/// Reads a file under `dir` recursively: every regular file's path.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
    }
    out
}
