"""Helpers of scripts/bench/outbound: a counting SMTP sink and a submission client.

    outbound_bench.py sink PORT COUNT_FILE
        An SMTP server on 127.0.0.1:PORT (no TLS, no AUTH) that accepts everything and keeps
        the number of messages it accepted in COUNT_FILE (rewritten every 20 ms).
    outbound_bench.py submit PORT USER PASSWORD TO COUNT SESSIONS SIZE
        COUNT messages of about SIZE bytes from USER to TO over SESSIONS concurrent smtplib
        sessions, each STARTTLS + AUTH PLAIN once, then its share of the messages. Prints the
        wall time in nanoseconds.
"""
import asyncio, multiprocessing, os, smtplib, ssl, sys, time


def sink(port, count_file):
    count = 0

    async def session(reader, writer):
        try:
            await converse(reader, writer)
        except (ConnectionResetError, BrokenPipeError):
            pass  # a client that goes away (Postfix closing cached connections on stop)

    async def converse(reader, writer):
        nonlocal count
        writer.write(b"220 sink.test ESMTP\r\n")
        in_data = False
        while True:
            line = await reader.readline()
            if not line:
                break
            if in_data:
                if line == b".\r\n":
                    in_data = False
                    count += 1
                    writer.write(b"250 2.0.0 Ok: queued\r\n")
                continue
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n")
            elif verb == b"HELO":
                writer.write(b"250 sink.test\r\n")
            elif verb == b"DATA":
                in_data = True
                writer.write(b"354 go ahead\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"250 2.0.0 Ok\r\n")
            await writer.drain()
        writer.close()

    async def report():
        last = None
        while True:
            if count != last:
                tmp = count_file + ".tmp"
                with open(tmp, "w") as f:
                    f.write(str(count))
                os.replace(tmp, count_file)
                last = count
            await asyncio.sleep(0.02)

    async def main():
        server = await asyncio.start_server(session, "127.0.0.1", port, backlog=1024)
        asyncio.get_running_loop().create_task(report())
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def one_session(args):
    port, user, password, to, count, size, index = args
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    filler = ("x" * 76 + "\r\n") * max(1, size // 78)
    s = smtplib.SMTP("127.0.0.1", port, timeout=300)
    s.ehlo("client.test")
    s.starttls(context=ctx)
    s.ehlo("client.test")
    s.login(user, password)
    for n in range(count):
        msg = (f"From: <{user}>\r\nTo: <{to}>\r\nSubject: bench {index}-{n}\r\n"
               f"Message-ID: <bench-{index}-{n}-{time.time_ns()}@client.test>\r\n"
               f"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n\r\n{filler}").encode()
        refused = s.sendmail(user, [to], msg)
        assert not refused, refused
    s.quit()


def submit(port, user, password, to, count, sessions, size):
    shares = [count // sessions + (1 if i < count % sessions else 0) for i in range(sessions)]
    jobs = [(port, user, password, to, share, size, i) for i, share in enumerate(shares) if share]
    t0 = time.time_ns()
    with multiprocessing.Pool(len(jobs)) as pool:
        pool.map(one_session, jobs)
    print(time.time_ns() - t0)


if __name__ == "__main__":
    if sys.argv[1] == "sink":
        sink(int(sys.argv[2]), sys.argv[3])
    elif sys.argv[1] == "submit":
        port, user, password, to = int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
        submit(port, user, password, to, int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8]))
    else:
        sys.exit(__doc__)
