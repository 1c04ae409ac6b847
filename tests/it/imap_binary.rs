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
