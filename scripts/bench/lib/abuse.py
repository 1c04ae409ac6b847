"""Abuse benchmark client (scripts/bench/abuse): slow DATA senders and repeated failed logins.

  abuse.py slowloris SMTP_PORT PID CLIENTS SECONDS PREFILL_BYTES
      CLIENTS sessions, spread over the loopback addresses 127.0.0.2.. (the per-address session
      limit would refuse most of them from one address), each EHLO, MAIL, RCPT, DATA, then
      PREFILL_BYTES at once, then one byte a second until SECONDS have passed. Samples the
      server's resident memory (VmRSS of PID) all along; prints the peak in kB and how many
      sessions were still open at the end.
  abuse.py logins IMAP_PORT USER SECONDS
      One address sends wrong IMAP LOGINs for SECONDS (reconnecting after each BYE); prints
      the attempts per second after the first 5 failures.
"""
import socket
import sys
import threading
import time


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def slow_client(port, source, seconds, prefill, rcpt, alive, index):
    end = time.time() + seconds
    try:
        sock = socket.create_connection(("127.0.0.1", port), 30, source_address=(source, 0))
        f = sock.makefile("rb")
        if not f.readline().startswith(b"220"):
            return
        for command in (b"EHLO slow.test\r\n", b"MAIL FROM:<slow@elsewhere.test>\r\n",
                        f"RCPT TO:<{rcpt}>\r\n".encode(), b"DATA\r\n"):
            sock.sendall(command)
            while True:
                line = f.readline()
                if not line or line[3:4] != b"-":
                    break
        if not line.startswith(b"354"):
            return
        sock.sendall(b"Subject: slow\r\n\r\n" + b"x" * prefill)
        alive[index] = True
        while time.time() < end:
            sock.sendall(b"x")
            time.sleep(1)
    except OSError:
        alive[index] = False
        return
    alive[index] = True


def slowloris(port, pid, clients, seconds, prefill, rcpt):
    alive = [False] * clients
    threads = []
    for index in range(clients):
        source = f"127.0.0.{2 + index % 200}"
        t = threading.Thread(target=slow_client,
                             args=(port, source, seconds, prefill, rcpt, alive, index),
                             daemon=True)
        t.start()
        threads.append(t)
    peak = 0
    end = time.time() + seconds
    while time.time() < end:
        peak = max(peak, rss_kb(pid))
        time.sleep(0.2)
    for t in threads:
        t.join(timeout=5)
    peak = max(peak, rss_kb(pid))
    print(f"slowloris clients={clients} open_at_end={sum(alive)} peak_rss_kb={peak}",
          file=sys.stderr)
    print(f"rss_kb_under_slowloris={peak}")


def logins(port, user, seconds):
    import imaplib
    start = time.time()
    times = []
    client = None
    while time.time() - start < seconds:
        try:
            if client is None:
                client = imaplib.IMAP4("127.0.0.1", port, timeout=120)
            client.login(user, "wrong password, bench")
        except imaplib.IMAP4.abort:
            client = None
        except imaplib.IMAP4.error:
            times.append(time.time())
        except OSError:
            client = None
    late = times[5:]
    rate = (len(late) - 1) / (late[-1] - late[0]) if len(late) >= 2 and late[-1] > late[0] else 0.0
    print(f"logins failures={len(times)} in {seconds}s", file=sys.stderr)
    print(f"login_attempts_per_s_per_ip={rate:.2f}")


if __name__ == "__main__":
    if sys.argv[1] == "slowloris":
        slowloris(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]),
                  int(sys.argv[6]), sys.argv[7])
    else:
        logins(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]))
