#!/usr/bin/env python3
"""Leader failover under a steady SMTP load, on a 3-node scripts/local-cluster (run by
scripts/bench/failover, which sets KERMAIL_BIN, KERMAIL_LOCAL_CLUSTER_DIR/_ID).

  failover.py PRESET KILLS SESSIONS

Brings a 3-node cluster up with the Raft timing PRESET (lan or wan), starts SESSIONS SMTP
sessions (smtplib, spread over the three nodes, each sending one small message after another to
one account), then KILLS times: waits until all three nodes are up, caught up and mail flows,
SIGKILLs the leader (reading its pid from the local-cluster state, so that the kill instant is
exact), and measures the time from the kill to the first 250 to a message whose DATA was sent
after the kill (a 250 for a message sent before could come from the old leader's commit).
The killed node is started again before the next kill. A session whose node died, or that got a
4xx, moves to the next node. Prints one line per kill, then `failover_PRESET_median_s=X.XX`
(and the runs as JSON on the line before).
"""

import imaplib
import json
import os
import re
import signal
import smtplib
import ssl
import statistics
import subprocess
import sys
import threading
import time

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "local-cluster")
STATE = os.path.join(os.environ["KERMAIL_LOCAL_CLUSTER_DIR"], "state.json")
USER, PASSWORD = "bench@bench.test", "bench-password-1234"
# Deadline of any single wait (seconds).
WAIT_SECS = float(os.environ.get("BENCH_WAIT_SECS", "300"))
# A restarted node counts as caught up within this many log entries (the load goes on).
LAG_OK = 1000
TLS = ssl.create_default_context()
TLS.check_hostname = False
TLS.verify_mode = ssl.CERT_NONE


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def lc(*args, preset=None, input=None):
    env = dict(os.environ)
    if preset:
        env["KERMAIL_LOCAL_CLUSTER_PRESET"] = preset
    res = subprocess.run([SCRIPT, *args], capture_output=True, text=True, env=env, input=input, timeout=WAIT_SECS)
    if res.returncode != 0:
        raise SystemExit(f"local-cluster {' '.join(args)} failed: {res.stderr}")
    return res.stdout


def wait_until(cond, what):
    end = time.monotonic() + WAIT_SECS
    last = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except Exception as e:  # a node restarting, a status mid-election
            last = e
        if time.monotonic() > end:
            raise SystemExit(f"timed out after {WAIT_SECS:.0f}s waiting for {what} (last error: {last!r})")
        time.sleep(0.05)


def status(node):
    return json.loads(lc("exec", node, "--", "kermail", "cluster", "status", "--json"))


def healthy(nodes):
    """The leader's name once some node reports three reachable, caught-up voters."""
    for n in nodes:
        try:
            s = status(n)
        except SystemExit:
            continue
        members = s.get("nodes", [])
        if (
            s.get("leader")
            and len(members) == 3
            and all(m.get("reachable") and m.get("voter") and m.get("lag", LAG_OK) < LAG_OK for m in members)
        ):
            return s["leader"]
    return None


class Load:
    def __init__(self, addresses, sessions):
        self.addresses = addresses  # name -> (host, port)
        self.names = sorted(addresses)
        self.dead = set()
        self.lock = threading.Lock()
        self.acks = []  # (t_sent, t_250)
        self.failed = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.worker, args=(w,), daemon=True) for w in range(sessions)]

    def start(self):
        for t in self.threads:
            t.start()

    def worker(self, w):
        k, s, i = w, None, 0
        while not self.stop.is_set():
            node = self.names[k % len(self.names)]
            try:
                if s is None:
                    if node in self.dead:
                        k += 1
                        time.sleep(0.01)
                        continue
                    s = smtplib.SMTP(*self.addresses[node], timeout=30)
                    s.ehlo("client.test")
                i += 1
                msg = (
                    f"From: <bob@example.org>\r\nTo: <{USER}>\r\nSubject: failover {w}-{i}\r\n"
                    f"Message-ID: <failover-{w}-{i}-{time.time_ns()}@example.org>\r\n\r\nHello.\r\n"
                )
                t_sent = time.monotonic()
                s.sendmail("bob@example.org", [USER], msg.encode())
                with self.lock:
                    self.acks.append((t_sent, time.monotonic()))
            except (smtplib.SMTPException, OSError):
                with self.lock:
                    self.failed += 1
                try:
                    if s is not None:
                        s.close()
                except Exception:
                    pass
                s = None
                k += 1
                time.sleep(0.05)

    def first_ack_after(self, t):
        with self.lock:
            after = [done for sent, done in self.acks if sent > t]
        return min(after) if after else None

    def flowing(self):
        now = time.monotonic()
        return self.first_ack_after(now - 1.0) is not None


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


def inbox_count(address):
    host, port = address.rsplit(":", 1)
    c = imaplib.IMAP4_SSL(host, int(port), ssl_context=TLS)
    try:
        c.login(USER, PASSWORD)
        typ, data = c.status("INBOX", "(MESSAGES)")
        return int(re.search(rb"MESSAGES (\d+)", data[0]).group(1))
    finally:
        c.logout()


def pid_of(name):
    with open(STATE) as f:
        return json.load(f)["nodes"][name]["pid"]


def main():
    preset, kills, sessions = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    lines = lc("up", "3", preset=preset).splitlines()
    addresses, imaps = {}, {}
    for line in lines:
        words = line.split()
        keys = dict(w.split("=", 1) for w in words[2:])
        host, port = keys["SMTP"].rsplit(":", 1)
        addresses[words[0]] = (host, int(port))
        imaps[words[0]] = keys["IMAPS"]
    lc("exec", "n1", "--", "kermail", "domain", "add", "bench.test")
    lc("exec", "n1", "--", "kermail", "user", "add", USER, "--password-stdin", input=PASSWORD + "\n")
    load = Load(addresses, sessions)
    load.start()
    runs = []
    for run in range(1, kills + 1):
        leader = wait_until(lambda: healthy(sorted(addresses)), "three reachable, caught-up voters and a leader")
        wait_until(load.flowing, "250s flowing")
        pid = pid_of(leader)
        load.dead.add(leader)
        t_kill = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        first = wait_until(lambda: load.first_ack_after(t_kill), "a 250 after the kill")
        runs.append(first - t_kill)
        line = f"{preset} kill {run}: leader {leader}, kill to first 250: {first - t_kill:.3f} s"
        print(line, flush=True)
        wait_until(lambda: gone(pid), f"pid {pid} to exit")
        lc("start", leader, preset=preset)
        load.dead.discard(leader)
    load.stop.set()
    for t in load.threads:
        t.join(60)
    acked = len(load.acks)
    # Every 250 is in the INBOX of every node (read over IMAPS once each node has caught up).
    stored = {}
    for name in sorted(imaps):
        stored[name] = wait_until(
            lambda: (lambda n: n if n >= acked else None)(inbox_count(imaps[name])),
            f"{name} to hold the {acked} acknowledged messages",
        )
    lc("down", *(["--keep"] if os.environ.get("BENCH_KEEP") else []))
    median = statistics.median(runs)
    print(
        f"# {preset}: {len(runs)} kills, {acked} messages acknowledged ({load.failed} temporary failures), "
        f"stored per node {stored}; kill to first 250 (s): min {min(runs):.2f} median {median:.2f} max {max(runs):.2f}",
        flush=True,
    )
    print(json.dumps({"preset": preset, "runs_s": [round(r, 3) for r in runs]}), flush=True)
    print(f"failover_{preset}_median_s={median:.2f}", flush=True)


if __name__ == "__main__":
    main()
