//! BINARY (RFC 3516) over real sockets (Python's imaplib): FETCH BINARY[section]<partial>,
//! BINARY.PEEK, BINARY.SIZE with base64 and quoted-printable undone, literal8 for NUL
//! content, \Seen set by BINARY only, NO [UNKNOWN-CTE]; APPEND of literal8 data (also in
//! MULTIAPPEND) and CATENATE (RFC 4469) with TEXT and URL parts, BADURL and TOOBIG.

use crate::harness::{Node, PASSWORD, PY_IMAP_RAW, USER};

/// `fetch_raw(c, command)` sends one command and gives back (tagged line, every byte of the
/// untagged responses), reading literals (`{n}` and literal8 `~{n}`) by their length.
const FETCH_RAW_HELPER: &str = r#"
def fetch_raw(c, command):
    tag = c._new_tag().decode()
    c.send(f"{tag} {command}\r\n".encode())
    data = b""
    while True:
        line = c.readline()
        if line.decode(errors="replace").startswith(tag + " "):
            return line.decode().strip(), data
        data += line
        m = re.search(rb"~?\{(\d+)\}\r\n$", line)
        if m:
            data += c.read(int(m.group(1)))
"#;

const BINARY: &str = r#"
import base64
c = imap()
status, lines = raw(c, "CAPABILITY")
assert " BINARY" in lines[0], lines
part1 = b"\x00hello\x00\xff"
mixed = (b"From: a@example.org\r\nSubject: binary\r\nMIME-Version: 1.0\r\n"
         b"Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
         b"--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
         + base64.b64encode(part1) + b"\r\n"
         b"--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: Quoted-Printable\r\n\r\n"
         b"caf=C3=A9 =\r\nsoft\r\n--b--\r\n")
uuencoded = (b"From: a@example.org\r\nSubject: uu\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\n"
             b"begin 644 x\r\n`\r\nend\r\n")
ok(c.append("INBOX", None, None, mixed), "APPEND")
ok(c.append("INBOX", None, None, uuencoded), "APPEND")
ok(c.select("INBOX"), "SELECT")

# base64 decoded, holding NULs: a literal8.
status, data = fetch_raw(c, "FETCH 1 (BINARY.PEEK[1])")
assert status.split()[1] == "OK", status
assert b"BINARY[1] ~{8}\r\n" + part1 + b")" in data, data
# quoted-printable decoded (soft line break joined), an ordinary literal; sizes decoded.
status, data = fetch_raw(c, "UID FETCH 1 (BINARY.PEEK[2] BINARY.SIZE[1] binary.size[2])")
assert status.split()[1] == "OK", status
assert b"BINARY[2] {10}\r\ncaf\xc3\xa9 soft" in data, data
assert b"BINARY.SIZE[1] 8" in data and b"BINARY.SIZE[2] 10" in data, data
assert b"UID 1" in data, data
# <partial> counts decoded bytes.
status, data = fetch_raw(c, "FETCH 1 BINARY.PEEK[1]<1.5>")
assert b"BINARY[1]<1> {5}\r\nhello)" in data, data
# PEEK did not set \Seen; BINARY does, like BODY[].
status, data = fetch_raw(c, "FETCH 1 (FLAGS)")
assert b"\\Seen" not in data, data
status, data = fetch_raw(c, "FETCH 1 (BINARY[2])")
assert status.split()[1] == "OK", status
assert b"\\Seen" in data and b"BINARY[2] {10}" in data, data
# An encoding the server cannot undo.
status, data = fetch_raw(c, "FETCH 2 (BINARY.PEEK[1])")
assert status.split()[1] == "NO" and "[UNKNOWN-CTE]" in status, (status, data)
assert b"BINARY[" not in data, data
status, data = fetch_raw(c, "FETCH 2 (BINARY.SIZE[1])")
assert "[UNKNOWN-CTE]" in status, status
# BODY[] of the same part is still given as stored.
status, data = fetch_raw(c, "FETCH 2 (BODY.PEEK[1])")
assert status.split()[1] == "OK" and b"begin 644 x" in data, (status, data)
# Only part numbers are sections of BINARY.
status, data = fetch_raw(c, "FETCH 1 (BINARY[HEADER])")
assert status.split()[1] == "BAD", status
print("binary ok")
"#;

#[test]
fn binary_fetch_decodes_parts_and_refuses_unknown_encodings() {
    let node = Node::with_account();
    let out = node.py(&format!("{PY_IMAP_RAW}\n{FETCH_RAW_HELPER}\n{BINARY}"), &[]);
    assert!(out.contains("binary ok"), "{out}");
}

const NESTED_AND_UNKNOWN: &str = r#"
import base64
c = imap()
inner = b"\x00nested \xfe part\x00"
nested = (b"From: a@example.org\r\nSubject: nested\r\nMIME-Version: 1.0\r\n"
          b"Content-Type: multipart/mixed; boundary=\"outer\"\r\n\r\n"
          b"--outer\r\nContent-Type: text/plain\r\n\r\nfirst\r\n"
          b"--outer\r\nContent-Type: multipart/alternative; boundary=\"inner\"\r\n\r\n"
          b"--inner\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
          + base64.b64encode(inner) + b"\r\n"
          b"--inner\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
          b"a=3Db\r\n--inner--\r\n--outer--\r\n")
uuencoded = (b"From: a@example.org\r\nSubject: uu\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\n"
             b"begin 644 x\r\n`\r\nend\r\n")
ok(c.append("INBOX", None, None, nested), "APPEND")
ok(c.append("INBOX", None, None, uuencoded), "APPEND")
ok(c.append("INBOX", None, None, nested), "APPEND")
ok(c.select("INBOX"), "SELECT")

# A part inside a nested multipart is decoded with its own encoding.
status, data = fetch_raw(c, "FETCH 1 (BINARY.PEEK[2.1] BINARY.PEEK[2.2] BINARY.SIZE[2.1])")
assert status.split()[1] == "OK", status
assert b"BINARY[2.1] ~{%d}\r\n" % len(inner) + inner in data, data
assert b"BINARY[2.2] {3}\r\na=b" in data, data
assert b"BINARY.SIZE[2.1] %d" % len(inner) in data, data

# An unknown encoding in one message of several: the others are answered in full, the
# failing one gets no BINARY answer but its new \Seen is announced, and the tagged NO names
# its UID.
status, data = fetch_raw(c, "FETCH 1:3 (BINARY[1])")
assert status.split()[1] == "NO" and "[UNKNOWN-CTE]" in status, (status, data)
assert "UID 2" in status, status
assert data.count(b"BINARY[1] {5}\r\nfirst") == 2, data
assert b"* 1 FETCH" in data and b"* 3 FETCH" in data, data
second = [l for l in data.split(b"\r\n") if l.startswith(b"* 2 FETCH")]
assert len(second) == 1 and b"\\Seen" in second[0] and b"BINARY" not in second[0], data
# Fetched again (already seen), message 2 yields nothing, the others still do.
status, data = fetch_raw(c, "UID FETCH 1:3 (BINARY.PEEK[1])")
assert "[UNKNOWN-CTE]" in status and "UID 2" in status, status
assert b"* 2 FETCH" not in data and data.count(b"BINARY[1] {5}") == 2, data
print("nested ok")
"#;

#[test]
fn binary_decodes_nested_parts_and_unknown_encodings_fail_only_their_message() {
    let node = Node::with_account();
    let out = node.py(
        &format!("{PY_IMAP_RAW}\n{FETCH_RAW_HELPER}\n{NESTED_AND_UNKNOWN}"),
        &[],
    );
    assert!(out.contains("nested ok"), "{out}");
}

/// `command(c, piece, ...)` sends one command in pieces, waiting for the continuation request
/// after each piece that ends with a synchronizing literal announcement; gives back the
/// tagged line (or the line that came instead of `+`) and the untagged lines.
const COMMAND_HELPER: &str = r#"
def command(c, *pieces):
    tag = c._new_tag().decode()
    for i, piece in enumerate(pieces):
        data = (tag + " ").encode() + piece if i == 0 else piece
        c.send(data)
        if re.search(rb"~?\{\d+\}\r\n$", data):
            line = c.readline()
            if not line.startswith(b"+"):
                return line.decode().strip(), []
    return read_tagged(c, tag)

def appended(status):
    m = re.search(r"\[APPENDUID (\d+) ([0-9:,]+)\]", status)
    assert status.split()[1] == "OK" and m, status
    return int(m.group(1)), m.group(2)

def stored(c, uid):
    status, data = fetch_raw(c, f"UID FETCH {uid} (BINARY.PEEK[])")
    assert status.split()[1] == "OK", status
    m = re.search(rb"BINARY\[\] ~?\{(\d+)\}\r\n", data)
    assert m, data
    return data[m.end():m.end() + int(m.group(1))]
"#;

const LITERAL8_APPEND: &str = r#"
c = imap()
ok(c.select("INBOX"), "SELECT")
with_nul = b"Subject: nul\r\n\r\nzero\x00byte\x00\xff\r\n"
# A synchronizing literal8: accepted, stored byte for byte.
status, _ = command(c, b"APPEND INBOX ~{%d}\r\n" % len(with_nul), with_nul + b"\r\n")
_, uid = appended(status)
assert stored(c, uid) == with_nul
# The same bytes in an ordinary literal stay refused.
status, _ = command(c, b"APPEND INBOX {%d+}\r\n" % len(with_nul) + with_nul + b"\r\n")
assert status.split()[1] == "BAD", status
# A literal8 over the spill threshold (64 KiB) goes through the spill file.
big = b"Subject: big\r\n\r\n" + b"\x00\x01binary\r\n" * 20000
status, _ = command(c, b"APPEND INBOX (\\Seen) ~{%d}\r\n" % len(big), big + b"\r\n")
_, uid = appended(status)
assert stored(c, uid) == big
status, _ = command(c, b"APPEND INBOX {%d}\r\n" % len(big), big + b"\r\n")
assert status.split()[1] == "BAD", status
# MULTIAPPEND mixing literal8 (non-synchronizing and synchronizing) and a plain literal.
m1 = b"Subject: one\r\n\r\n\x00one\r\n"
m2 = b"Subject: two\r\n\r\ntwo\r\n"
m3 = b"Subject: three\r\n\r\nthree\x00\r\n"
status, _ = command(
    c,
    b"APPEND INBOX ~{%d+}\r\n" % len(m1) + m1 + b" (\\Flagged) {%d+}\r\n" % len(m2) + m2
    + b" ~{%d}\r\n" % len(m3),
    m3 + b"\r\n",
)
_, uids = appended(status)
first, last = map(int, uids.split(":"))
assert last == first + 2, uids
assert [stored(c, u) for u in range(first, last + 1)] == [m1, m2, m3]
# A MULTIAPPEND whose plain literal holds a NUL adds nothing.
status, lines = raw(c, "STATUS INBOX (MESSAGES)")
before = lines[0]
status, _ = command(c, b"APPEND INBOX ~{%d+}\r\n" % len(m1) + m1 + b" {%d+}\r\n" % len(m3) + m3 + b"\r\n")
assert status.split()[1] == "BAD", status
status, lines = raw(c, "STATUS INBOX (MESSAGES)")
assert lines[0] == before, (before, lines)
print("literal8 ok")
"#;

#[test]
fn append_takes_literal8_with_nuls_also_in_multiappend() {
    let node = Node::with_account();
    let out = node.py(
        &format!("{PY_IMAP_RAW}\n{FETCH_RAW_HELPER}\n{COMMAND_HELPER}\n{LITERAL8_APPEND}"),
        &[],
    );
    assert!(out.contains("literal8 ok"), "{out}");
}

const CATENATE: &str = r#"
c = imap()
status, lines = raw(c, "CAPABILITY")
assert " CATENATE" in lines[0] and "URLAUTH" not in lines[0], lines
source = (b"From: a@example.org\r\nSubject: source\r\nMIME-Version: 1.0\r\n"
          b"Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
          b"--b\r\nContent-Type: text/plain\r\n\r\nfirst part\r\n"
          b"--b\r\nContent-Type: application/octet-stream\r\n\r\nsecond\r\n--b--\r\n")
status, _ = command(c, b"APPEND INBOX {%d+}\r\n" % len(source) + source + b"\r\n")
validity, src = appended(status)
ok(c.select("INBOX"), "SELECT")

head = b"From: b@example.org\r\nSubject: catenated\r\n\r\n"
tail = b"\x00 the end\r\n"
status, _ = command(
    c,
    b"APPEND INBOX (\\Draft) CATENATE (TEXT {%d}\r\n" % len(head),
    head + b" URL \"/INBOX;UIDVALIDITY=%d/;UID=%s/;SECTION=1\" URL /%%49NBOX/;UID=%s/;SECTION=2/;PARTIAL=1.3"
    % (validity, src.encode(), src.encode())
    + b" TEXT ~{%d}\r\n" % len(tail),
    tail + b")\r\n",
)
_, uid = appended(status)
assert stored(c, uid) == head + b"first part" + b"eco" + tail, stored(c, uid)
# The whole message by URL, in a MULTIAPPEND next to a plain literal: one APPENDUID.
status, _ = command(
    c,
    b"APPEND INBOX CATENATE (URL \"/INBOX/;UID=%s\") (\\Seen) {5+}\r\nfinal\r\n" % src.encode(),
)
_, uids = appended(status)
first, last = map(int, uids.split(":"))
assert last == first + 1 and stored(c, first) == source and stored(c, last) == b"final"
# A client's own empty literal before a large one that the server spills to a file: each
# part keeps its own place (the empty TEXT must not take the spilled content).
big = b"y" * 100000 + b"\r\n"
status, _ = command(
    c,
    b"APPEND INBOX CATENATE (TEXT {0+}\r\n URL \"/INBOX/;UID=%s/;SECTION=1\" TEXT {%d+}\r\n"
    % (src.encode(), len(big)) + big + b")\r\n",
)
_, uid = appended(status)
assert stored(c, uid) == b"first part" + big, stored(c, uid)[:40]

# URLs that name nothing this account can read: NO [BADURL url], nothing appended.
bob = imap("bob@kermail.test", PASSWORD)
ok(bob.create("Secret"), "CREATE")
ok(bob.append("Secret", None, None, b"Subject: secret\r\n\r\nbob's\r\n"), "APPEND")
status, lines = raw(c, "STATUS INBOX (MESSAGES)")
before = lines[0]
for url in ["/Secret/;UID=1", "imap://bob@kermail.test/Secret/;UID=1",
            "/INBOX/;UID=9999", f"/INBOX;UIDVALIDITY={validity + 1}/;UID={src}",
            "/INBOX/;UID=1;URLAUTH=anonymous:internal:abc", "/INBOX/;UID=1/;SECTION=NOPE"]:
    status, _ = command(c, b"APPEND INBOX CATENATE (TEXT {2+}\r\nhi URL \"%s\")\r\n" % url.encode())
    assert status.split()[1] == "NO" and f"[BADURL {url}]" in status, (url, status)
status, lines = raw(c, "STATUS INBOX (MESSAGES)")
assert lines[0] == before, (before, lines)
# A TEXT part in an ordinary literal must not hold a NUL; a malformed list is a BAD.
status, _ = command(c, b"APPEND INBOX CATENATE (TEXT {2+}\r\n\x00x)\r\n")
assert status.split()[1] == "BAD", status
status, _ = command(c, b"APPEND INBOX CATENATE (TEXT)\r\n")
assert status.split()[1] == "BAD", status
print("catenate ok")
"#;

#[test]
fn catenate_joins_text_and_url_parts_and_refuses_bad_urls() {
    let node = Node::with_account();
    node.add_account("bob@kermail.test", PASSWORD);
    let out = node.py(
        &format!("{PY_IMAP_RAW}\n{FETCH_RAW_HELPER}\n{COMMAND_HELPER}\n{CATENATE}"),
        &[],
    );
    assert!(out.contains("catenate ok"), "{out}");
}

const TOOBIG: &str = r#"
c = imap()
source = b"Subject: large\r\n\r\n" + b"x" * 180000 + b"\r\n"
status, _ = command(c, b"APPEND INBOX {%d}\r\n" % len(source), source + b"\r\n")
_, src = appended(status)
status, _ = command(c, b"APPEND INBOX CATENATE (URL /INBOX/;UID=%s)\r\n" % src.encode())
appended(status)
status, _ = command(c, b"APPEND INBOX CATENATE (URL /INBOX/;UID=%s URL /INBOX/;UID=%s)\r\n"
                    % (src.encode(), src.encode()))
assert status.split()[1] == "NO" and "[TOOBIG]" in status, status
print("toobig ok")
"#;

/// The joined message counts against the literal limit (here 300 000 bytes).
#[test]
fn catenate_beyond_the_size_limit_is_toobig() {
    let mut node = Node::create();
    let config = std::fs::read_to_string(&node.config).expect("config");
    let config = config.replace("[imap]\n", "[imap]\nmax_literal_size_bytes = 300000\n");
    std::fs::write(&node.config, config).expect("write config");
    node.spawn();
    node.add_account(USER, PASSWORD);
    let out = node.py(
        &format!("{PY_IMAP_RAW}\n{FETCH_RAW_HELPER}\n{COMMAND_HELPER}\n{TOOBIG}"),
        &[],
    );
    assert!(out.contains("toobig ok"), "{out}");
}
