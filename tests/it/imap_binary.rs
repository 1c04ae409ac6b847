//! BINARY (RFC 3516) over real sockets (Python's imaplib): FETCH BINARY[section]<partial>,
//! BINARY.PEEK, BINARY.SIZE with base64 and quoted-printable undone, literal8 for NUL
//! content, \Seen set by BINARY only, NO [UNKNOWN-CTE].

use crate::harness::{Node, PY_IMAP_RAW};

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
