//! The admin CLI: the commands work, and every mistake exits non-zero with a message
//! (unknown domain, duplicate account, short password, node not running, ...).

use std::process::Output;

use crate::harness::{Node, PASSWORD};

fn assert_fails(out: &Output, what: &str, mention: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{what}: expected failure, got {}",
        out.status
    );
    assert!(
        stderr.to_lowercase().contains(&mention.to_lowercase()),
        "{what}: the message should mention {mention:?}; stderr: {stderr:?}"
    );
}

#[test]
fn cli_manages_domains_accounts_and_aliases() {
    let node = Node::start();
    node.cli_ok(&["domain", "add", "one.test"]);
    node.cli_ok(&["domain", "add", "two.test"]);
    let domains = node.cli_ok(&["domain", "list"]);
    assert!(
        domains.contains("one.test") && domains.contains("two.test"),
        "{domains}"
    );

    node.cli_stdin_ok(
        &["user", "add", "a@one.test", "--password-stdin"],
        "first-password-1\n",
    );
    node.cli_stdin_ok(
        &["user", "add", "b@two.test", "--password-stdin"],
        "second-password-2\n",
    );
    let users = node.cli_ok(&["user", "list", "one.test"]);
    assert!(
        users.contains("a@one.test") && !users.contains("b@two.test"),
        "{users}"
    );
    let all = node.cli_ok(&["user", "list"]);
    assert!(
        all.contains("a@one.test") && all.contains("b@two.test"),
        "{all}"
    );

    node.cli_ok(&["alias", "add", "info@one.test", "a@one.test"]);
    let aliases = node.cli_ok(&["alias", "list", "one.test"]);
    assert!(
        aliases.contains("info@one.test") && aliases.contains("a@one.test"),
        "{aliases}"
    );

    // The new password works over IMAP, the old one no longer does.
    node.cli_stdin_ok(
        &["user", "passwd", "a@one.test", "--password-stdin"],
        "changed-password-3\n",
    );
    node.py(
        r#"
imap("a@one.test", "changed-password-3").logout()
try:
    imap("a@one.test", "first-password-1")
    raise SystemExit("old password still accepted")
except imaplib.IMAP4.error:
    pass
"#,
        &[],
    );

    node.cli_ok(&["alias", "remove", "info@one.test", "a@one.test"]);
    assert!(!node.cli_ok(&["alias", "list"]).contains("info@one.test"));
    node.cli_ok(&["user", "remove", "b@two.test"]);
    assert!(!node.cli_ok(&["user", "list"]).contains("b@two.test"));
    node.cli_ok(&["domain", "remove", "two.test"]);
    assert!(!node.cli_ok(&["domain", "list"]).contains("two.test"));

    let status = node.cli_ok(&["status"]);
    assert!(
        status.contains("role: leader"),
        "a lone node leads: {status}"
    );
    assert!(!status.contains("leader: none"), "{status}");
    let n_domains = node.cli_ok(&["domain", "list"]).lines().count();
    let n_accounts = node.cli_ok(&["user", "list"]).lines().count();
    assert!(
        status.contains(&format!("domains: {n_domains}\n")),
        "{status}"
    );
    assert!(
        status.contains(&format!("accounts: {n_accounts}\n")),
        "{status}"
    );
    assert!(status.contains("data folder size on disk: "), "{status}");
}

#[test]
fn cli_mistakes_exit_non_zero_with_a_message() {
    let node = Node::start();
    node.cli_ok(&["domain", "add", "known.test"]);
    let pw = format!("{PASSWORD}\n");

    let out = node.cli_stdin(&["user", "add", "x@unknown.test", "--password-stdin"], &pw);
    assert_fails(&out, "account in an unknown domain", "unknown.test");

    node.cli_stdin_ok(&["user", "add", "x@known.test", "--password-stdin"], &pw);
    let out = node.cli_stdin(&["user", "add", "x@known.test", "--password-stdin"], &pw);
    assert_fails(&out, "duplicate account", "x@known.test");

    let out = node.cli_stdin(
        &["user", "add", "y@known.test", "--password-stdin"],
        "short\n",
    );
    assert_fails(&out, "password shorter than 10 characters", "password");
    assert!(!node.cli_ok(&["user", "list"]).contains("y@known.test"));

    let out = node.cli(&["domain", "add", "known.test"]);
    assert_fails(&out, "duplicate domain", "known.test");

    let out = node.cli(&["alias", "add", "a@unknown.test", "x@known.test"]);
    assert_fails(&out, "alias in an unknown domain", "unknown.test");

    let out = node.cli(&["user", "remove", "nobody@known.test"]);
    assert_fails(&out, "removing a missing account", "nobody@known.test");

    let out = node.cli(&["user", "add", "not-an-address", "--password-stdin"]);
    assert!(!out.status.success(), "malformed address accepted");
    assert!(!out.stderr.is_empty(), "malformed address: no message");

    let out = node.cli(&["frobnicate"]);
    assert!(
        !out.status.success() && !out.stderr.is_empty(),
        "unknown command"
    );
}

#[test]
fn cli_without_a_running_node_fails_clearly() {
    let node = Node::create(); // configuration written, nothing started
    for args in [
        &["status"][..],
        &["domain", "list"][..],
        &["domain", "add", "x.test"][..],
    ] {
        let out = node.cli(args);
        assert!(!out.status.success(), "{args:?} succeeded without a node");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.trim().is_empty(), "{args:?}: no message");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
}
