#!/usr/bin/env python3
"""Leader failover under a steady SMTP load, on a 3-node scripts/local-cluster (run by
scripts/bench/failover, which sets KERMAIL_BIN, KERMAIL_LOCAL_CLUSTER_DIR/_ID).

  failover.py PRESET MODE CYCLES SESSIONS        # MODE: kill or cut

Brings a 3-node cluster (n1..n3 on sites s1..s3) up with the Raft timing PRESET (lan or wan),
starts SESSIONS SMTP sessions (smtplib, spread over the three nodes, each sending one small
message after another to one account), then CYCLES times: waits until all three nodes are up,
caught up and mail flows, then takes the leader away and measures the time to the first 250 to
a message whose DATA was sent after that instant (a 250 for a message sent before could come
from the old leader's commit).
- kill: SIGKILL of the leader (its pid read from the local-cluster state, so that the kill
  instant is exact); it is started again before the next cycle.
- cut: `local-cluster cut SITE` of the leader's site (a silent partition: packets vanish, no
  RST), timed from the moment the command returns (the cut is then complete), held CUT_HOLD_S
  seconds (and at least until the first 250), then `heal SITE`. After the
  heal, the cycle waits until the old leader follows again and counts a term change on the
  new leader as an election forced by the healed node.
A session whose node died, was cut or answered 4xx moves to the next node. Prints one line per
cycle, then `failover_MODE_PRESET_median_s=X.XX` and `failover_MODE_PRESET_max_s=X.XX` (and,
for kill, the older `failover_PRESET_median_s=X.XX`), the runs as JSON on the line before.
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
# How long a cut lasts (seconds), at least: the brief's scenario holds it 2 s.
CUT_HOLD_S = float(os.environ.get("BENCH_CUT_HOLD_S", "2"))
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
    found = healthy_view(nodes)
    return found[0] if found else None


def healthy_view(nodes):
    """(leader, term) once some node reports three reachable, caught-up voters."""
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
            return s["leader"], s.get("term")
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


def node_state(name):
    with open(STATE) as f:
        return json.load(f)["nodes"][name]


def pid_of(name):
    return node_state(name)["pid"]


def take_leader_away(mode, preset, leader, load):
    """Kills or cuts `leader`; returns (instant, undo) where undo() brings it back."""
    load.dead.add(leader)
    if mode == "kill":
        pid = pid_of(leader)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)

        def undo():
            wait_until(lambda: gone(pid), f"pid {pid} to exit")
            lc("start", leader, preset=preset)
            load.dead.discard(leader)

        return t0, undo
    site = node_state(leader)["site"]
    t_call = time.monotonic()
    lc("cut", site)
    # The cut is complete once `local-cluster cut` returns (its routes go in one namespace
    # after the other): measure from there. A message sent earlier may still commit through
    # the old leader.
    t0 = time.monotonic()
    log(f"cut {site}: the command took {t0 - t_call:.3f} s")

    def undo():
        rest = CUT_HOLD_S - (time.monotonic() - t0)
        if rest > 0:
            time.sleep(rest)  # the scenario holds the cut this long; nothing to wait for
        lc("heal", site)
        load.dead.discard(leader)

    return t0, undo


def main():
    preset, mode, cycles, sessions = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if mode not in ("kill", "cut"):
        raise SystemExit(f"unknown mode {mode!r}: kill or cut")
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
    forced = 0
    for run in range(1, cycles + 1):
        leader, _ = wait_until(lambda: healthy_view(sorted(addresses)), "three reachable, caught-up voters and a leader")
        wait_until(load.flowing, "250s flowing")
        t0, undo = take_leader_away(mode, preset, leader, load)
        first = wait_until(lambda: load.first_ack_after(t0), f"a 250 after the {mode}")
        runs.append(first - t0)
        new_leader, new_term = wait_until(
            lambda: (lambda v: v if v and v[0] != leader else None)(
                healthy_view([n for n in sorted(addresses) if n != leader]) or status_leader(addresses, leader)
            ),
            "the new leader",
        )
        undo()
        note = ""
        if mode == "cut":
            # After the heal: the old leader follows the new one, whose term did not move.
            view = wait_until(lambda: healthy_view(sorted(addresses)), "all three nodes back after the heal")
            if view != (new_leader, new_term):
                forced += 1
                note = f" (after the heal: leader {view[0]} term {view[1]}, was {new_leader} term {new_term}: election forced)"
        line = f"{preset} {mode} {run}: leader {leader}, {mode} to first 250: {first - t0:.3f} s, new leader {new_leader}{note}"
        print(line, flush=True)
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
    extra = f", elections forced by a heal: {forced}" if mode == "cut" else ""
    print(
        f"# {preset} {mode}: {len(runs)} cycles, {acked} messages acknowledged ({load.failed} temporary failures), "
        f"stored per node {stored}; {mode} to first 250 (s): min {min(runs):.2f} median {median:.2f} max {max(runs):.2f}{extra}",
        flush=True,
    )
    print(json.dumps({"preset": preset, "mode": mode, "runs_s": [round(r, 3) for r in runs]}), flush=True)
    if mode == "kill":
        print(f"failover_{preset}_median_s={median:.2f}", flush=True)
    print(f"failover_{mode}_{preset}_median_s={median:.2f}", flush=True)
    print(f"failover_{mode}_{preset}_max_s={max(runs):.2f}", flush=True)


def status_leader(addresses, old):
    """(leader, term) as a surviving node reports it (the cut node may still call itself leader)."""
    for n in sorted(addresses):
        if n == old:
            continue
        try:
            s = status(n)
        except SystemExit:
            continue
        if s.get("leader") and s["leader"] != old:
            return s["leader"], s.get("term")
    return None


if __name__ == "__main__":
    main()
