#!/usr/bin/python3
"""A small authoritative DNS server on loopback for kermail's inbound-check tests.

    dns_server.py serve ZONE.json
        Answers from ZONE.json on 127.0.0.1 (UDP and TCP, one port), prints the port on
        stdout, and exits when its standard input closes (the test that started it ended).
    dns_server.py spf-suite SUITE.yml OUT_DIR
        Turns the RFC 7208 test suite (pyspf's rfc7208-tests.yml) into OUT_DIR/zone-N.json
        (one zone per scenario) and OUT_DIR/cases.json.

Zone format: {"name": [[TYPE, VALUE], ...]} with lower-case names without the final dot;
TYPE is A, AAAA, TXT (VALUE a list of strings), SPF, MX (VALUE [preference, name]), PTR or
CNAME; VALUE "TIMEOUT" makes queries of that type unanswered; the entry ["TIMEOUT"] leaves
unanswered every query of a type no earlier entry of the name has; ["SERVFAIL"] answers
SERVFAIL. A name missing from the zone is NXDOMAIN, except names under "error." (no answer),
as in pyspf's test driver (test/testspf.py), whose semantics this follows.

Needs python3-dnslib (and python3-yaml for spf-suite): Debian packages.
"""

import json
import os
import socket
import socketserver
import struct
import sys
import threading

TIMEOUT = object()
SERVFAIL = object()


def lookup(zone, name, qtype, level=0):
    """Records (rtype, name, value) answering (name, qtype), TIMEOUT, SERVFAIL or None
    (NXDOMAIN)."""
    entries = zone.get(name.lower().rstrip("."))
    if entries is None:
        return TIMEOUT if name.lower().startswith("error.") else None
    answers = []
    seen_type = False
    for entry in entries:
        if entry[0] == "TIMEOUT":
            return TIMEOUT if not seen_type else answers
        if entry[0] == "SERVFAIL":
            return SERVFAIL
        rtype, value = entry
        if rtype == qtype:
            seen_type = True
        if value == "TIMEOUT":
            if rtype == qtype:
                return TIMEOUT
            continue
        if rtype == qtype:
            answers.append((rtype, name, value))
        elif rtype == "CNAME" and level == 0:
            answers.append((rtype, name, value))
            followed = lookup(zone, value, qtype, 1)
            if followed is TIMEOUT or followed is SERVFAIL:
                return followed
            answers.extend(followed or [])
    return answers


def answer(zone, data):
    """The response to the query `data`, or None to stay silent."""
    from dnslib import DNSRecord, RR, QTYPE, RCODE, A, AAAA, TXT, MX, PTR, CNAME

    request = DNSRecord.parse(data)
    reply = request.reply()
    reply.header.aa = 1
    question = request.q
    qname = str(question.qname)
    qtype = QTYPE.get(question.qtype)
    if any(len(label) > 63 for label in qname.rstrip(".").split(".")):
        return None
    found = lookup(zone, qname.rstrip("."), qtype)
    if found is TIMEOUT:
        return None
    if found is SERVFAIL:
        reply.header.rcode = RCODE.SERVFAIL
        return reply
    if found is None:
        reply.header.rcode = RCODE.NXDOMAIN
        return reply
    for rtype, name, value in found:
        if rtype == "A":
            rdata = A(value)
        elif rtype == "AAAA":
            rdata = AAAA(value)
        elif rtype in ("TXT", "SPF"):
            strings = value if isinstance(value, list) else [value]
            chunks = []
            for text in strings:
                raw = text.encode("utf-8")
                if raw:
                    chunks.extend(raw[i:i + 255] for i in range(0, len(raw), 255))
                else:
                    chunks.append(b"")
            rdata = TXT(chunks)
        elif rtype == "MX":
            rdata = MX(value[1], value[0])
        elif rtype == "PTR":
            rdata = PTR(value)
        elif rtype == "CNAME":
            rdata = CNAME(value)
        else:
            continue
        reply.add_answer(RR(name + ".", getattr(QTYPE, rtype), rdata=rdata, ttl=300))
    return reply


def serve(zone_path):
    with open(zone_path) as f:
        zone = {k.lower().rstrip("."): v for k, v in json.load(f).items()}

    class Udp(socketserver.BaseRequestHandler):
        def handle(self):
            data, sock = self.request
            try:
                reply = answer(zone, data)
            except Exception as error:  # a malformed query: no answer
                print("dns_server: %r" % error, file=sys.stderr)
                return
            if reply is None:
                return
            packed = reply.pack()
            limit = 512
            from dnslib import DNSRecord
            request = DNSRecord.parse(data)
            for rr in request.ar:
                if rr.rtype == 41:  # OPT: the client's UDP payload size
                    limit = max(512, rr.rclass)
            if len(packed) > limit:
                reply.rr = []
                reply.header.tc = 1
                packed = reply.pack()
            sock.sendto(packed, self.client_address)

    class Tcp(socketserver.BaseRequestHandler):
        def handle(self):
            while True:
                head = self.request.recv(2)
                if len(head) < 2:
                    return
                (length,) = struct.unpack("!H", head)
                data = b""
                while len(data) < length:
                    chunk = self.request.recv(length - len(data))
                    if not chunk:
                        return
                    data += chunk
                reply = answer(zone, data)
                if reply is None:
                    continue
                packed = reply.pack()
                self.request.sendall(struct.pack("!H", len(packed)) + packed)

    class ThreadedUdp(socketserver.ThreadingMixIn, socketserver.UDPServer):
        daemon_threads = True

    class ThreadedTcp(socketserver.ThreadingMixIn, socketserver.TCPServer):
        daemon_threads = True
        allow_reuse_address = True

    for _ in range(100):
        udp = ThreadedUdp(("127.0.0.1", 0), Udp)
        port = udp.server_address[1]
        try:
            tcp = ThreadedTcp(("127.0.0.1", port), Tcp)
            break
        except OSError:
            udp.server_close()
    else:
        sys.exit("dns_server: no port free for both UDP and TCP")
    threading.Thread(target=udp.serve_forever, daemon=True).start()
    threading.Thread(target=tcp.serve_forever, daemon=True).start()
    print(port, flush=True)
    # Lives as long as the test holds our standard input.
    sys.stdin.read()
    os._exit(0)


def spf_suite(suite_path, out_dir):
    import yaml

    os.makedirs(out_dir, exist_ok=True)
    cases = []
    with open(suite_path, "rb") as f:
        scenarios = list(yaml.safe_load_all(f))
    for number, scenario in enumerate(scenarios):
        zone = {}
        for name, records in (scenario.get("zonedata") or {}).items():
            entries = []
            generated = []
            has_txt = False
            for record in records:
                if record == "TIMEOUT":
                    entries.append(["TIMEOUT"])
                    continue
                for rtype, value in record.items():
                    if rtype in ("TXT", "SPF") and isinstance(value, str) and value != "TIMEOUT":
                        value = [value]
                    if rtype == "TXT":
                        has_txt = True
                    elif rtype == "SPF" and not has_txt:
                        generated.append(["TXT", value])
                    if value != ["NONE"]:
                        entries.append([rtype, value])
            if not has_txt:
                entries.extend(generated)
            zone[name.lower().rstrip(".")] = entries
        zone_file = os.path.join(out_dir, "zone-%d.json" % number)
        with open(zone_file, "w") as f:
            json.dump(zone, f)
        for name, test in scenario["tests"].items():
            result = test["result"]
            cases.append({
                "scenario": number,
                "description": scenario.get("description", ""),
                "name": name,
                "helo": test.get("helo", ""),
                "host": test["host"],
                "mailfrom": test.get("mailfrom", ""),
                "results": result if isinstance(result, list) else [result],
                "explanation": test.get("explanation"),
                "spec": str(test.get("spec", "")),
            })
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump({"n_scenarios": len(scenarios), "cases": cases}, f)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        serve(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "spf-suite":
        spf_suite(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
