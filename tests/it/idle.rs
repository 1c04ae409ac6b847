//! IDLE: a waiting imaplib session is told about a delivery (`* N EXISTS`) within a deadline.

use crate::harness::Node;

#[test]
fn idle_reports_a_delivery_to_a_waiting_session() {
    let node = Node::with_account();
    let out = node.py(
        r#"
DEADLINE = 30.0
s = smtp()
assert s.sendmail("bob@example.org", [USER], message("before idle")) == {}
c = imap()
typ, data = c.select("INBOX")
assert typ == "OK" and int(data[0]) == 1, data
tag = c._new_tag()
c.send(tag + b" IDLE\r\n")
line = c.readline()
assert line.startswith(b"+"), line
# The session is idling: deliver on another connection.
assert s.sendmail("bob@example.org", [USER], message("during idle")) == {}
s.quit()
# The deadline is the socket timeout: readline raises if nothing arrives in time.
c.sock.settimeout(DEADLINE)
start, got = time.monotonic(), None
while got is None:
    if time.monotonic() - start > DEADLINE:
        raise SystemExit(f"no EXISTS within {DEADLINE}s")
    line = c.readline()
    if not line:
        raise SystemExit("server closed the IDLE session")
    m = re.match(rb"\* (\d+) EXISTS", line)
    if m:
        got = int(m.group(1))
c.sock.settimeout(60)
c.send(b"DONE\r\n")
while True:
    line = c.readline()
    assert line, "closed before the IDLE completion"
    if line.startswith(tag):
        assert b" OK" in line, line
        break
print(got)
"#,
        &[],
    );
    assert_eq!(out.trim(), "2");
}
