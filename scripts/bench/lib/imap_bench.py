#!/usr/bin/env python3
"""IMAP benchmark client (imaplib), the same code against kermail and Dovecot.

  imap_bench.py load PORT USER PASSWORD COUNT      APPENDs COUNT generated ~1 KB messages to
                                                   INBOX on one connection; prints raw bytes.
  imap_bench.py measure PORT USER PASSWORD RUNS    times each operation RUNS times after one
                                                   warm-up run; prints one JSON object
                                                   {op: median seconds, ...} plus result checks.
  imap_bench.py measure-pair PORT_A PORT_B USER PASSWORD RUNS COUNT
                                                   the same against two servers, their runs
                                                   interleaved (A, B, A, B, ...) so that both see
                                                   the same background load; prints
                                                   {"a": {...}, "b": {...}}.
  imap_bench.py stress PORT USER PASSWORD SECONDS PID CLIENTS
                                                   CLIENTS threads (imaptest-style) loop over
                                                   LOGIN, SELECT, FETCH (flags, headers,
                                                   bodies), STORE, APPEND, EXPUNGE, LOGOUT for
                                                   SECONDS against a mailbox kept at about its
                                                   size; prints JSON with the operation count
                                                   and PID's VmHWM/VmRSS (kB) from /proc.
Messages are deterministic (message i is the same on both servers).
"""
import hashlib
import imaplib
import json
import re
import socket
import statistics
import sys
import time

SEARCH_WORD = "quasar"  # in the Subject of every 100th message


def message(i: int) -> bytes:
    subject = f"Weekly report {i} " + (SEARCH_WORD if i % 100 == 7 else "status")
    head = (
        f"From: Sender {i % 37} <sender{i % 37}@example.org>\r\n"
        f"To: bench@bench.test\r\n"
        f"Subject: {subject}\r\n"
        f"Date: Mon, 2 Nov 2026 {i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d} +0000\r\n"
        f"Message-ID: <bench-{i}@example.org>\r\n"
        f"MIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=us-ascii\r\n"
        f"\r\n"
    )
    line = f"Line of message {i}: the quick brown fox jumps over the lazy dog.\r\n"
    body = ""
    while len(head) + len(body) + len(line) <= 1024:
        body += line
    return (head + body).encode()


def connect(port, user, password):
    c = imaplib.IMAP4("127.0.0.1", port)
    # imaplib writes an APPEND literal and its closing CRLF in two send() calls; with Nagle on,
    # the CRLF waits for the server's delayed ACK (~25-40 ms per APPEND), which would measure
    # the client's TCP stack, not the server. Same client setting for both servers.
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.login(user, password)
    return c


def check(typ, data, what):
    if typ != "OK":
        raise SystemExit(f"{what} failed: {typ} {data!r}")
    return data


def load(port, user, password, count, start=0):
    c = connect(port, user, password)
    total = 0
    for i in range(start, start + count):
        m = message(i)
        check(*c.append("INBOX", None, None, m), f"APPEND {i}")
        total += len(m)
    c.logout()
    return total


def literal_bytes(data):
    return sum(len(part[1]) for part in data if isinstance(part, tuple))


def run_once(port, user, password, append_base):
    t = {}
    res = {}
    t0 = time.perf_counter()
    c = connect(port, user, password)
    typ, data = c.select("INBOX")
    check(typ, data, "SELECT")
    t["login_select"] = time.perf_counter() - t0
    res["exists"] = int(data[0])

    t0 = time.perf_counter()
    data = check(*c.uid("FETCH", "1:*", "(FLAGS)"), "UID FETCH FLAGS")
    t["uid_fetch_flags"] = time.perf_counter() - t0
    res["flags_lines"] = sum(1 for d in data if d and b"FLAGS" in (d if isinstance(d, bytes) else d[0]))

    t0 = time.perf_counter()
    data = check(*c.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (From Subject Date)])"), "FETCH headers")
    t["fetch_headers_all"] = time.perf_counter() - t0
    res["header_literals"] = sum(1 for d in data if isinstance(d, tuple))

    t0 = time.perf_counter()
    data = check(*c.fetch("1:1000", "(BODY.PEEK[])"), "FETCH bodies")
    t["fetch_body_1000"] = time.perf_counter() - t0
    res["body_bytes_1000"] = literal_bytes(data)

    t0 = time.perf_counter()
    data = check(*c.uid("SEARCH", None, "SUBJECT", SEARCH_WORD), "UID SEARCH")
    t["uid_search_subject"] = time.perf_counter() - t0
    res["search_hits"] = len(data[0].split())

    # SORT and THREAD (RFC 5256) over the whole mailbox; the answers are compared between the
    # servers by count and digest.
    for name, command, args in (
        ("uid_sort_reverse_date", "SORT", ("(REVERSE DATE)", "UTF-8", "ALL")),
        ("uid_sort_subject", "SORT", ("(SUBJECT)", "UTF-8", "ALL")),
        ("uid_sort_from_size", "SORT", ("(FROM SIZE)", "UTF-8", "ALL")),
        ("uid_thread_references", "THREAD", ("REFERENCES", "UTF-8", "ALL")),
        ("uid_thread_orderedsubject", "THREAD", ("ORDEREDSUBJECT", "UTF-8", "ALL")),
    ):
        t0 = time.perf_counter()
        data = check(*c.uid(command, *args), f"UID {command} {args[0]}")
        t[name] = time.perf_counter() - t0
        answer = data[0] or b""
        res[name] = f"{len(re.findall(rb'[0-9]+', answer))} {hashlib.sha1(answer).hexdigest()[:12]}"

    c.logout()
    return t, res


def appends(port, user, password, base, count=1000):
    c = connect(port, user, password)
    t0 = time.perf_counter()
    for i in range(base, base + count):
        check(*c.append("INBOX", None, None, message(i)), f"APPEND {i}")
    elapsed = time.perf_counter() - t0
    c.logout()
    return elapsed


def measure(port, user, password, runs, count):
    run_once(port, user, password, count)  # warm-up
    samples = {}
    results = None
    for _ in range(runs):
        t, res = run_once(port, user, password, count)
        for k, v in t.items():
            samples.setdefault(k, []).append(v)
        if results is not None and res != results:
            raise SystemExit(f"results changed between runs: {results} vs {res}")
        results = res
    app = []
    base = 1_000_000
    appended = 0
    for r in range(3):
        app.append(appends(port, user, password, base + r * 1000))
        appended += sum(len(message(i)) for i in range(base + r * 1000, base + r * 1000 + 1000))
    out = {k: statistics.median(v) for k, v in samples.items()}
    out["append_1000_seq"] = statistics.median(app)
    return {"times": out, "results": results, "appended_bytes": appended}


def measure_pair(port_a, port_b, user, password, runs, count):
    """Interleaves the runs of two servers: load from elsewhere on the machine drifts over
    minutes, so measuring one server after the other would compare different conditions."""
    ports = {"a": port_a, "b": port_b}
    samples = {name: {} for name in ports}
    results = {name: None for name in ports}
    for name, port in ports.items():
        run_once(port, user, password, count)  # warm-up
    for _ in range(runs):
        for name, port in ports.items():
            t, res = run_once(port, user, password, count)
            for k, v in t.items():
                samples[name].setdefault(k, []).append(v)
            if results[name] is not None and res != results[name]:
                raise SystemExit(f"results changed between runs: {results[name]} vs {res}")
            results[name] = res
    app = {name: [] for name in ports}
    base = 1_000_000
    appended = 0
    for r in range(3):
        first = base + r * 1000
        for name, port in ports.items():
            app[name].append(appends(port, user, password, first))
        appended += sum(len(message(i)) for i in range(first, first + 1000))
    out = {}
    for name in ports:
        times = {k: statistics.median(v) for k, v in samples[name].items()}
        times["append_1000_seq"] = statistics.median(app[name])
        out[name] = {"times": times, "results": results[name], "appended_bytes": appended}
    return out


def proc_status_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def stress(port, user, password, seconds, pid, clients):
    """Each client keeps a session (LOGIN, SELECT; LOGOUT and again every 10 rounds) and loops:
    NOOP, STATUS, FETCH flags of all, headers of all, bodies of the last 10 (setting \\Seen),
    STORE +/-FLAGS on a few, APPEND one, STORE \\Deleted on the first, EXPUNGE, until the
    time is up. The mailbox stays at about its size (one in, one out per round)."""
    import threading
    stop = time.monotonic() + seconds
    counts = {"rounds": 0, "commands": 0, "no": 0, "errors": 0}
    lock = threading.Lock()

    def client(k):
        i = 2_000_000 + k * 1_000_000
        c = None
        rounds = 0
        while time.monotonic() < stop:
            try:
                if c is None:
                    c = connect(port, user, password)
                    check(*c.select("INBOX"), "SELECT")
                    with lock:
                        counts["commands"] += 2
                typ, data = c.noop()
                typ, data = c.status("INBOX", "(MESSAGES)")
                exists = int(re.search(rb"MESSAGES (\d+)", data[0]).group(1))
                top = max(exists, 1)
                replies = [
                    c.fetch("1:*", "(UID FLAGS)"),
                    c.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (From Subject Date)])"),
                    c.fetch(f"{max(top - 9, 1)}:{top}", "(BODY[])"),
                    c.store(f"1:{min(5, top)}", "+FLAGS", "(\\Flagged)"),
                    c.store(f"1:{min(5, top)}", "-FLAGS", "(\\Flagged \\Seen)"),
                    c.append("INBOX", None, None, message(i)),
                    c.store("1", "+FLAGS.SILENT", "(\\Deleted)"),
                    c.expunge(),
                ]
                i += 1
                rounds += 1
                bad = sum(1 for typ, _ in replies if typ != "OK")
                with lock:
                    counts["rounds"] += 1
                    counts["commands"] += 2 + len(replies)
                    counts["no"] += bad
                # imaptest-style: sessions live on, and now and then log out and back in.
                if rounds % 10 == 0:
                    c.logout()
                    c = None
                    with lock:
                        counts["commands"] += 1
            except Exception:  # a session lost to a race is counted, the load goes on
                with lock:
                    counts["errors"] += 1
                c = None
        if c is not None:
            c.logout()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    peak_rss = 0
    while any(t.is_alive() for t in threads):
        peak_rss = max(peak_rss, proc_status_kb(pid, "VmRSS"))
        time.sleep(0.2)
    for t in threads:
        t.join()
    counts["vm_hwm_kb"] = proc_status_kb(pid, "VmHWM")
    counts["max_sampled_rss_kb"] = peak_rss
    counts["rss_after_kb"] = proc_status_kb(pid, "VmRSS")
    return counts


def main():
    if sys.argv[1] == "stress":
        port, user, password = int(sys.argv[2]), sys.argv[3], sys.argv[4]
        seconds, pid, clients = float(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
        print(json.dumps(stress(port, user, password, seconds, pid, clients)))
        return
    if sys.argv[1] == "measure-pair":
        port_a, port_b, user, password = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
        runs, count = int(sys.argv[6]), int(sys.argv[7])
        print(json.dumps(measure_pair(port_a, port_b, user, password, runs, count)))
        return
    cmd, port, user, password, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    if cmd == "load":
        print(load(port, user, password, n))
    elif cmd == "measure":
        count = int(sys.argv[6]) if len(sys.argv) > 6 else 10000
        print(json.dumps(measure(port, user, password, n, count)))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
