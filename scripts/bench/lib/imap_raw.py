#!/usr/bin/env python3
"""Raw-socket IMAP benchmark client: the server's time, not imaplib's parsing.

  imap_raw.py pair PORT_A PID_A PORT_B PID_B USER PASSWORD RUNS
      A is Dovecot (PID_A: its master process), B is kermail (PID_B: the node). Prints one JSON
      object {"a": {...}, "b": {...}}, each with "times" (median wall seconds per operation),
      "cpu" (mean server CPU seconds per operation) and "results" (checks that must be equal).
  imap_raw.py loop PORT USER PASSWORD OP N
      runs operation OP (a name below) N times against one server, to profile it.

The client writes each command in one send() and reads until the tagged completion line: the
only parsing while a reply is timed is looking at the last line of what arrived (does it start
with the tag?). Literal lengths are walked once the clock is stopped, to check that the tagged
line was really the end of the reply (and to count literals and their bytes for the checks).

Server CPU: utime+stime from /proc/PID/stat, read before and after each operation (outside the
timed window). kermail is one process (all its threads are in its stat). Dovecot forks: the
master, then auth, config, log, anvil, stats, imap-login and one imap process per session; its
figure is the master's own and reaped children's time (utime+stime+cutime+cstime) plus
utime+stime of every living descendant of the master. The clock tick is 10 ms, so per-operation
CPU is the sum over all runs divided by the number of runs (cheap operations are coarse).

Operations (each run interleaves the servers: A, B, A, B, ...):
  login_select          connect, greeting, LOGIN, SELECT INBOX
  uid_fetch_flags       UID FETCH 1:* (FLAGS)
  fetch_headers_all     FETCH 1:* (BODY.PEEK[HEADER.FIELDS (From Subject Date)])
  fetch_body_1000       FETCH 1:1000 (BODY.PEEK[])
  uid_search_subject    UID SEARCH SUBJECT quasar
  uid_sort_* / uid_thread_*   as imaplib's run, over ALL
  *_cold                the same SORT or THREAD right after a change of the mailbox: timed
                        together, STORE 1 +FLAGS.SILENT (\\Flagged) then the command (a flag
                        change defeats an answer cache, as new mail does); the flag is taken
                        off again outside the timed window; runs after all read runs
  qresync_100_changes   ENABLE QRESYNC + SELECT INBOX (QRESYNC (uidvalidity modseq)) on a
                        logged-in session, after another session made 100 flag changes
                        (STORE n +FLAGS.SILENT (\\Flagged), 100 messages) since modseq
  append_1000_seq       1,000 APPENDs (synchronising literal) on one connection, to the
                        mailbox RawAppend (median of 3 runs)
  mix_20_clients        20 concurrent sessions, each LOGIN, SELECT, then 5 rounds of NOOP,
                        UID FETCH of 200 FLAGS, FETCH of 50 headers, FETCH of 5 bodies (setting
                        \\Seen), UID SEARCH, STORE +FLAGS / -FLAGS on 5, APPEND to RawAppend,
                        STATUS; LOGOUT. Wall time until the last session is done (median of 3).
"""
import hashlib
import json
import os
import re
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imap_bench import SEARCH_WORD, message  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
APPEND_MAILBOX = "RawAppend"


class ImapError(Exception):
    pass


class Raw:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(float(os.environ.get("BENCH_RAW_TIMEOUT", "300")))
        self.last = b"(greeting)"
        self.n = 0
        self.greeting = self._read_line_reply()

    def _read_line_reply(self):
        data = b""
        while not data.endswith(b"\r\n"):
            d = self.sock.recv(65536)
            if not d:
                raise ImapError("connection closed")
            data += d
        return data

    def _read_until(self, tag):
        """Reads until the last line received starts with `tag `; returns everything."""
        start = tag + b" "
        chunks = []
        total = 0
        tail = b""
        while True:
            try:
                d = self.sock.recv(1 << 20)
            except socket.timeout:
                raise ImapError(f"no tagged reply to {self.last!r}; got {b''.join(chunks)[-300:]!r}")
            if not d:
                raise ImapError(f"connection closed before {tag!r}")
            chunks.append(d)
            total += len(d)
            tail = (tail + d)[-4096:]
            if tail.endswith(b"\r\n"):
                i = tail.rfind(b"\r\n", 0, len(tail) - 2)
                if i >= 0:
                    line = tail[i + 2 :]
                elif total == len(tail):
                    line = tail
                else:
                    continue
                if line.startswith(start):
                    return b"".join(chunks) if len(chunks) > 1 else chunks[0]

    def _read_continuation(self, tag):
        data = b""
        while True:
            d = self.sock.recv(65536)
            if not d:
                raise ImapError("connection closed")
            data += d
            if data.endswith(b"\r\n"):
                i = data.rfind(b"\r\n", 0, len(data) - 2)
                last = data[i + 2 :] if i >= 0 else data
                if last.startswith(b"+"):
                    return
                if last.startswith(tag + b" "):
                    raise ImapError(f"APPEND refused: {last!r}")

    def next_tag(self):
        self.n += 1
        return b"R%05d" % self.n

    def cmd(self, text):
        """Sends `TAG text`, reads the reply (raw bytes, timed part) and returns it."""
        tag = self.next_tag()
        self.last = tag + b" " + text
        self.sock.sendall(tag + b" " + text + b"\r\n")
        return tag, self._read_until(tag)

    def append(self, mailbox, msg):
        tag = self.next_tag()
        self.last = b"%s APPEND %s" % (tag, mailbox)
        self.sock.sendall(b"%s APPEND %s {%d}\r\n" % (tag, mailbox, len(msg)))
        self._read_continuation(tag)
        self.sock.sendall(msg + b"\r\n")
        return tag, self._read_until(tag)

    def close(self):
        try:
            self.cmd(b"LOGOUT")
        except (ImapError, OSError):
            pass
        self.sock.close()


def walk(tag, data):
    """After the clock: walks lines and literals; checks the tagged OK is the end. Returns
    (untagged lines outside literals, literal count, literal bytes)."""
    pos, lines, lits, lit_bytes, n = 0, [], 0, 0, len(data)
    while pos < n:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            raise ImapError("reply without a final CRLF")
        line = data[pos:eol]
        pos = eol + 2
        m = re.search(rb"\{(\d+)\+?\}$", line)
        if m:
            size = int(m.group(1))
            lits += 1
            lit_bytes += size
            pos += size
            lines.append(line)
            continue
        if line.startswith(tag + b" "):
            if pos != n:
                raise ImapError(f"tagged line before the end of the reply: {line!r}")
            if not line.startswith(tag + b" OK"):
                raise ImapError(f"command failed: {line!r}")
            return lines, lits, lit_bytes
        lines.append(line)
    raise ImapError("no tagged line")


# ---------------------------------------------------------------------------------------------
# CPU from /proc


def stat_fields(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        s = f.read()
    return s[s.rfind(b")") + 2 :].split()  # fields from 3 (state) on


def children(pid):
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
    except OSError:
        pass
    return out


def cpu_ticks(pid, tree):
    """utime+stime(+cutime+cstime) of pid, plus utime+stime of its living descendants when
    `tree` (Dovecot)."""
    try:
        f = stat_fields(pid)
    except OSError:
        return 0
    total = int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    if tree:
        todo = children(pid)
        while todo:
            p = todo.pop()
            try:
                g = stat_fields(p)
            except OSError:
                continue  # exited: its time is in its parent's cutime once reaped
            total += int(g[11]) + int(g[12])
            todo.extend(children(p))
    return total


class Server:
    def __init__(self, name, port, pid, tree, user, password):
        self.name, self.port, self.pid, self.tree = name, port, pid, tree
        self.user, self.password = user.encode(), password.encode()
        self.times = {}
        self.cpu = {}
        self.results = {}

    def ticks(self):
        return cpu_ticks(self.pid, self.tree)

    def record(self, op, seconds, ticks):
        self.times.setdefault(op, []).append(seconds)
        self.cpu.setdefault(op, []).append(ticks)

    def check(self, key, value):
        old = self.results.get(key)
        if old is not None and old != value:
            raise SystemExit(f"{self.name}: {key} changed between runs: {old} vs {value}")
        self.results[key] = value

    def login(self):
        c = Raw(self.port)
        tag, data = c.cmd(b'LOGIN "%s" "%s"' % (self.user, self.password))
        walk(tag, data)
        return c

    def summary(self):
        return {
            "times": {k: statistics.median(v) for k, v in self.times.items()},
            "cpu": {k: sum(v) / len(v) / CLK_TCK for k, v in self.cpu.items()},
            "cpu_ticks": {k: sum(v) for k, v in self.cpu.items()},
            "results": self.results,
        }


def timed(server, op, fn):
    k0 = server.ticks()
    t0 = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - t0
    server.record(op, elapsed, server.ticks() - k0)
    return out


def digest(lines, prefix):
    answer = b"".join(l for l in lines if l.startswith(prefix))
    return f"{len(re.findall(rb'[0-9]+', answer))} {hashlib.sha1(answer).hexdigest()[:12]}"


READ_OPS = (
    ("uid_fetch_flags", b"UID FETCH 1:* (FLAGS)"),
    ("fetch_headers_all", b"FETCH 1:* (BODY.PEEK[HEADER.FIELDS (From Subject Date)])"),
    ("fetch_body_1000", b"FETCH 1:1000 (BODY.PEEK[])"),
    ("uid_search_subject", b"UID SEARCH SUBJECT " + SEARCH_WORD.encode()),
    ("uid_sort_reverse_date", b"UID SORT (REVERSE DATE) UTF-8 ALL"),
    ("uid_sort_subject", b"UID SORT (SUBJECT) UTF-8 ALL"),
    ("uid_sort_from_size", b"UID SORT (FROM SIZE) UTF-8 ALL"),
    ("uid_thread_references", b"UID THREAD REFERENCES UTF-8 ALL"),
    ("uid_thread_orderedsubject", b"UID THREAD ORDEREDSUBJECT UTF-8 ALL"),
)

# The SORT and THREAD operations, each also measured right after a flag change ("_cold").
COLD_OPS = tuple(
    (op + "_cold", command)
    for op, command in READ_OPS
    if b" SORT " in command or b" THREAD " in command
)


def cold(c, command):
    """STORE then `command`, the part that is timed; returns the second reply."""
    walk(*c.cmd(b"STORE 1 +FLAGS.SILENT (\\Flagged)"))
    return c.cmd(command)


def uncold(c):
    walk(*c.cmd(b"STORE 1 -FLAGS.SILENT (\\Flagged)"))


def run_reads(s):
    def login_select():
        c = Raw(s.port)
        walk(*c.cmd(b'LOGIN "%s" "%s"' % (s.user, s.password)))
        return c, c.cmd(b"SELECT INBOX")

    c, (tag, data) = timed(s, "login_select", login_select)
    lines, _, _ = walk(tag, data)
    s.check("exists", next(int(l.split()[1]) for l in lines if l.endswith(b" EXISTS")))
    for op, command in READ_OPS:
        tag, data = timed(s, op, lambda: c.cmd(command))
        lines, lits, lit_bytes = walk(tag, data)
        if op == "uid_fetch_flags":
            s.check(op, sum(1 for l in lines if b" FETCH " in l))
        elif op == "fetch_headers_all":
            s.check(op, lits)
        elif op == "fetch_body_1000":
            s.check(op, (lits, lit_bytes))
        elif op == "uid_search_subject":
            s.check(op, digest(lines, b"* SEARCH"))
        else:
            s.check(op, digest(lines, b"* SORT" if "sort" in op else b"* THREAD"))
    c.close()


def run_cold(s):
    """The SORT and THREAD operations, each right after a flag change. A phase of its own,
    after the read runs: a change between read runs would make their repeats cold too."""
    c = s.login()
    walk(*c.cmd(b"SELECT INBOX"))
    for op, command in COLD_OPS:
        tag, data = timed(s, op, lambda: cold(c, command))
        lines, _, _ = walk(tag, data)
        uncold(c)
        # The same answer as without the flag change.
        s.check(op[: -len("_cold")], digest(lines, b"* SORT" if "sort" in op else b"* THREAD"))
    c.close()


def run_qresync(s, run):
    """100 flag changes by one session, then a resync by another (already logged in)."""
    other = s.login()
    walk(*other.cmd(b"ENABLE QRESYNC"))
    tag, data = other.cmd(b"SELECT INBOX (CONDSTORE)")
    walk(tag, data)
    validity = re.search(rb"UIDVALIDITY (\d+)", data).group(1)
    modseq = re.search(rb"HIGHESTMODSEQ (\d+)", data).group(1)
    exists = s.results["exists"]
    first = 1 + (1000 + run * 100) % max(exists - 100, 1)  # after the 1,000 bodies read
    for n in range(first, first + 100):
        walk(*other.cmd(b"STORE %d +FLAGS.SILENT (\\Flagged)" % n))
    other.close()
    c = s.login()

    def resync():
        walk(*c.cmd(b"ENABLE QRESYNC"))
        return c.cmd(b"SELECT INBOX (QRESYNC (%s %s))" % (validity, modseq))

    tag, data = timed(s, "qresync_100_changes", resync)
    lines, _, _ = walk(tag, data)
    s.check("qresync_100_changes", sum(1 for l in lines if re.match(rb"\* \d+ FETCH ", l)))
    c.close()


def run_appends(s, base):
    c = s.login()

    def appends():
        for i in range(base, base + 1000):
            walk(*c.append(APPEND_MAILBOX.encode(), message(i)))

    timed(s, "append_1000_seq", appends)
    c.close()


def run_mix(s, base, clients=20, rounds=5):
    errors = []
    exists = s.results["exists"]

    def client(k):
        try:
            c = s.login()
            walk(*c.cmd(b"SELECT INBOX"))
            for r in range(rounds):
                lo = 1 + ((k * rounds + r) * 50) % max(exists - 200, 1)
                walk(*c.cmd(b"NOOP"))
                walk(*c.cmd(b"UID FETCH %d:%d (FLAGS)" % (lo, lo + 199)))
                walk(*c.cmd(b"FETCH %d:%d (BODY.PEEK[HEADER.FIELDS (From Subject Date)])" % (lo, lo + 49)))
                walk(*c.cmd(b"FETCH %d:%d (BODY[])" % (lo, lo + 4)))
                walk(*c.cmd(b"UID SEARCH SUBJECT " + SEARCH_WORD.encode()))
                walk(*c.cmd(b"STORE %d:%d +FLAGS (\\Answered)" % (lo, lo + 4)))
                walk(*c.cmd(b"STORE %d:%d -FLAGS (\\Answered \\Seen)" % (lo, lo + 4)))
                walk(*c.append(APPEND_MAILBOX.encode(), message(base + k * rounds + r)))
                walk(*c.cmd(b"STATUS INBOX (MESSAGES UIDNEXT)"))
            c.close()
        except Exception as e:  # noqa: BLE001 - reported below, the run fails
            errors.append(f"client {k}: {e!r}")

    def mix():
        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    timed(s, "mix_20_clients", mix)
    if errors:
        raise SystemExit(f"{s.name} mix: {errors[:3]}")


def pair(a, b, runs):
    servers = (a, b)
    for s in servers:
        c = s.login()
        walk(*c.cmd(b"CREATE " + APPEND_MAILBOX.encode()))
        c.close()
        run_reads(s)  # warm-up, not recorded
        s.times.clear()
        s.cpu.clear()
        # Not compared either: Dovecot's first UID SORT (FROM SIZE) after the 3,000 imaplib
        # APPENDs may order ties differently from the next ones (seen once).
        s.results = {"exists": s.results["exists"]}
    for _ in range(runs):
        for s in servers:
            run_reads(s)
    for _ in range(runs):
        for s in servers:
            run_cold(s)
    for r in range(runs):
        for s in servers:
            run_qresync(s, r)
    base = 3_000_000
    for r in range(3):
        for s in servers:
            run_appends(s, base + r * 1000)
    base = 4_000_000
    for r in range(3):
        for s in servers:
            run_mix(s, base + r * 1000)
    return {s.name: s.summary() for s in servers}


def loop(port, user, password, op, n):
    """Runs one operation n times against one server (for a profiler attached to it)."""
    s = Server("s", port, 0, False, user, password)
    c = s.login()
    tag, data = c.cmd(b"SELECT INBOX")
    lines, _, _ = walk(tag, data)
    s.results["exists"] = next(int(l.split()[1]) for l in lines if l.endswith(b" EXISTS"))
    if op != "login_select":
        c.cmd(b"CREATE " + APPEND_MAILBOX.encode())  # NO if it exists: not checked
    commands = dict(READ_OPS)
    cold_commands = dict(COLD_OPS)
    for r in range(n):
        if op in commands:
            walk(*c.cmd(commands[op]))
        elif op in cold_commands:
            walk(*cold(c, cold_commands[op]))
            uncold(c)
        elif op == "login_select":
            run_reads_login = s.login()
            walk(*run_reads_login.cmd(b"SELECT INBOX"))
            run_reads_login.close()
        elif op == "qresync_100_changes":
            run_qresync(s, r)
        elif op == "append_1000_seq":
            run_appends(s, 5_000_000 + r * 1000)
        elif op == "mix_20_clients":
            run_mix(s, 6_000_000 + r * 1000)
        else:
            raise SystemExit(f"unknown operation {op}")
    c.close()


def main():
    if sys.argv[1] == "loop":
        loop(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
        return
    if sys.argv[1] != "pair":
        raise SystemExit(__doc__)
    port_a, pid_a, port_b, pid_b = (int(x) for x in sys.argv[2:6])
    user, password, runs = sys.argv[6], sys.argv[7], int(sys.argv[8])
    a = Server("a", port_a, pid_a, True, user, password)
    b = Server("b", port_b, pid_b, False, user, password)
    out = pair(a, b, runs)
    if out["a"]["results"] != out["b"]["results"]:
        raise SystemExit(f"raw results differ: dovecot {out['a']['results']} kermail {out['b']['results']}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
