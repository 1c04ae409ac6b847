//! Sieve (RFC 5228) at delivery, with sieve-rs: compiling a script (ManageSieve and the
//! store check every script before it is stored) and running an account's active script on
//! one message, before the delivery is proposed.
//!
//! Pure: [`run`] takes the message, the envelope, the account's scripts and a way to ask
//! whether a vacation reply was already sent, and returns a [`Verdict`]: where the message
//! goes (mailbox names and flags), whether it is rejected, the vacation reply to queue and
//! the vacation record to keep. The store turns that into one command with the delivery
//! (`store::sieve_state`), so everything commits together. A runtime error is returned as
//! `Err`; the caller delivers to INBOX and logs one line.

pub mod greylist;

use std::collections::BTreeMap;
use std::sync::Arc;

use ::sieve::compiler::grammar::Capability;
use ::sieve::{Compiler, Event, Input, Recipient, Runtime, Sieve};

/// The largest script, in bytes (Dovecot's default `sieve_max_script_size` is 1 MiB; a
/// filter page's script is a few KiB, and every script lives in the replicated state).
pub const MAX_SCRIPT_BYTES: usize = 64 * 1024;
/// Scripts an account may keep (ManageSieve `HAVESPACE` and `PUTSCRIPT` check it).
pub const MAX_SCRIPTS_PER_ACCOUNT: usize = 16;
/// The longest script name, in bytes.
pub const MAX_SCRIPT_NAME_BYTES: usize = 128;
/// Instructions a script may run on one message (sieve-rs's CPU limit): a loop or a huge
/// `foreverypart` cannot hold a delivery.
pub const CPU_LIMIT_INSTRUCTIONS: usize = 20_000;
/// Nested `include`s.
pub const MAX_NESTED_INCLUDES: usize = 3;
/// Vacation's `:days` default when the script gives none (RFC 5230 suggests 7).
pub const DEFAULT_VACATION_DAYS: u64 = 7;
/// Mailboxes one script may file a message into (each is one more copy).
pub const MAX_FILEINTO_TARGETS: usize = 32;

/// The extensions kermail runs, advertised by ManageSieve's `SIEVE` capability. Scripts
/// requiring anything else fail at run time (and deliver to INBOX).
pub const EXTENSIONS: &[&str] = &[
    "fileinto",
    "reject",
    "ereject",
    "envelope",
    "encoded-character",
    "body",
    "relational",
    "comparator-i;ascii-numeric",
    "subaddress",
    "imap4flags",
    "copy",
    "include",
    "variables",
    "vacation",
    "vacation-seconds",
    "regex",
    "date",
    "index",
    "mailbox",
];

/// Why a script does not compile: the line (1-based) and the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct CompileFailure {
    pub line: usize,
    pub message: String,
}

fn compiler() -> Compiler {
    Compiler::new().with_max_script_size(MAX_SCRIPT_BYTES)
}

/// Compiles a script (checks it).
pub fn compile(script: &[u8]) -> Result<Arc<Sieve>, CompileFailure> {
    compiler().compile(script).map(Arc::new).map_err(|error| {
        // sieve-rs counts lines from 0 in some errors (before the first newline): RFC 5804
        // clients show 1-based lines.
        CompileFailure {
            line: error.line_num().max(1),
            message: error.to_string(),
        }
    })
}

fn runtime(hostname: &str) -> Runtime {
    let allowed: Vec<String> = EXTENSIONS.iter().map(|e| e.to_string()).collect();
    let disallowed: Vec<Capability> = Capability::all()
        .iter()
        .filter(|capability| !allowed.contains(&capability.to_string()))
        .cloned()
        .collect();
    Runtime::new()
        .without_capabilities(disallowed)
        .with_cpu_limit(CPU_LIMIT_INSTRUCTIONS)
        .with_max_nested_includes(MAX_NESTED_INCLUDES)
        .with_max_redirects(0)
        .with_max_out_messages(1)
        .with_default_vacation_expiry(DEFAULT_VACATION_DAYS * 86_400)
        .with_local_hostname(hostname.to_owned())
}

/// One message, as the script sees it.
pub struct Message<'a> {
    pub raw: &'a [u8],
    /// Envelope sender (empty for the null sender).
    pub mail_from: &'a str,
    /// The envelope recipient that reached the account.
    pub rcpt_to: &'a str,
    /// The account's own address (vacation never answers it, and replies from it).
    pub account_address: &'a str,
}

/// One mailbox a message is filed into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filing {
    pub mailbox: String,
    pub flags: Vec<String>,
}

/// A vacation reply: the message sieve-rs built (RFC 5230 headers, `Auto-Submitted`) and
/// its recipient; sent with the null sender.
#[derive(Clone, PartialEq, Eq)]
pub struct VacationReply {
    pub to: String,
    pub message: Vec<u8>,
}

impl std::fmt::Debug for VacationReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VacationReply({}, {} bytes)",
            self.to,
            self.message.len()
        )
    }
}

/// What a script decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Where the message goes (INBOX for the implicit keep). Empty: discarded or rejected.
    pub filings: Vec<Filing>,
    /// `reject`/`ereject` with its reason.
    pub reject: Option<String>,
    pub vacation: Option<VacationReply>,
    /// The vacation record to keep: (id, seconds it lasts).
    pub vacation_record: Option<(String, u64)>,
}

/// Runs `scripts[active]` on `message`. `scripts` holds every script of the account
/// (`include :personal` reads them). `vacation_sent(id)` tells whether a vacation reply
/// with that id is still recorded (RFC 5230 `:days`).
pub fn run(
    hostname: &str,
    message: &Message<'_>,
    scripts: &BTreeMap<String, String>,
    active: &str,
    vacation_sent: &dyn Fn(&str) -> bool,
) -> Result<Verdict, String> {
    let source = scripts
        .get(active)
        .ok_or_else(|| format!("active script {active:?} not found"))?;
    let script = compile(source.as_bytes()).map_err(|e| e.to_string())?;
    let runtime = runtime(hostname);
    let mut context = runtime.filter(message.raw);
    if !message.mail_from.is_empty() {
        context.set_envelope("from", message.mail_from);
    }
    context.set_envelope("to", message.rcpt_to);
    context.set_user_address(message.account_address);

    let mut verdict = Verdict::default();
    let mut created: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
    let mut input = Input::script(active.to_owned(), script);
    while let Some(result) = context.run(input) {
        let event = result.map_err(|error| format!("{error:?}"))?;
        input = Input::True;
        match event {
            Event::IncludeScript { name, optional } => {
                let name = name.as_str();
                input = match scripts.get(name) {
                    Some(source) => Input::script(
                        name.clone(),
                        compile(source.as_bytes()).map_err(|e| e.to_string())?,
                    ),
                    None if optional => Input::False,
                    None => return Err(format!("included script {name:?} not found")),
                };
            }
            // `mailboxexists`: INBOX only is certain here; the store files into INBOX when a
            // named mailbox does not exist.
            Event::MailboxExists { .. } => input = Input::False,
            Event::ListContains { .. } => input = Input::False,
            Event::DuplicateId { id, expiry, .. } => {
                let duplicate = vacation_sent(&id);
                if !duplicate {
                    verdict.vacation_record = Some((id, expiry));
                }
                input = duplicate.into();
            }
            Event::Keep {
                flags,
                message_id: 0,
            } => {
                push_filing(&mut verdict, "INBOX", flags)?;
            }
            Event::FileInto {
                folder,
                flags,
                message_id: 0,
                ..
            } => {
                push_filing(&mut verdict, &folder, flags)?;
            }
            Event::Discard => {}
            Event::Reject { reason, .. } => {
                verdict.reject = Some(if reason.is_empty() {
                    "rejected by the recipient's filter".to_owned()
                } else {
                    reason
                });
            }
            Event::CreatedMessage {
                message_id,
                message,
            } => {
                created.insert(message_id, message);
            }
            Event::SendMessage {
                recipient: Recipient::Address(to),
                message_id,
                ..
            } => {
                if let Some(message) = created.remove(&message_id) {
                    verdict.vacation = Some(VacationReply { to, message });
                }
            }
            // Redirect, notify, copies of created messages: not offered (see EXTENSIONS).
            _ => {}
        }
    }
    if verdict.vacation.is_none() {
        // The id was asked for but no reply went out (a test that was not followed by the
        // action): nothing to remember.
        verdict.vacation_record = None;
    }
    Ok(verdict)
}

fn push_filing(verdict: &mut Verdict, mailbox: &str, flags: Vec<String>) -> Result<(), String> {
    if let Some(existing) = verdict.filings.iter_mut().find(|f| f.mailbox == mailbox) {
        existing.flags = flags;
        return Ok(());
    }
    if verdict.filings.len() >= MAX_FILEINTO_TARGETS {
        return Err(format!("more than {MAX_FILEINTO_TARGETS} fileinto targets"));
    }
    verdict.filings.push(Filing {
        mailbox: mailbox.to_owned(),
        flags,
    });
    Ok(())
}

/// Checks a script name (ManageSieve and the store): 1 to [`MAX_SCRIPT_NAME_BYTES`] bytes,
/// no control characters (RFC 5804 section 1.6), no `/`.
pub fn check_script_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_SCRIPT_NAME_BYTES {
        return Err(format!(
            "a script name has 1 to {MAX_SCRIPT_NAME_BYTES} bytes"
        ));
    }
    if name
        .chars()
        .any(|c| c.is_control() || c == '/' || c == '\u{2028}' || c == '\u{2029}')
    {
        return Err("a script name has no control characters and no '/'".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESSAGE: &[u8] = b"From: Alice <alice@remote.example>\r\nTo: bob@example.org\r\nSubject: Report for Q3\r\nMessage-ID: <m1@remote.example>\r\n\r\nThe quarterly figures are attached.\r\n";

    fn check(script: &str, vacation_sent: bool) -> Result<Verdict, String> {
        let scripts = BTreeMap::from([("main".to_owned(), script.to_owned())]);
        run(
            "mx.example.org",
            &Message {
                raw: MESSAGE,
                mail_from: "alice@remote.example",
                rcpt_to: "bob+reports@example.org",
                account_address: "bob@example.org",
            },
            &scripts,
            "main",
            &|_| vacation_sent,
        )
    }

    fn filings(verdict: &Verdict) -> Vec<(&str, Vec<&str>)> {
        verdict
            .filings
            .iter()
            .map(|f| {
                (
                    f.mailbox.as_str(),
                    f.flags.iter().map(|s| s.as_str()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn no_action_keeps_in_inbox() {
        let verdict = check("# nothing\r\n", false).unwrap();
        assert_eq!(filings(&verdict), vec![("INBOX", vec![])]);
    }

    #[test]
    fn fileinto_with_flags_subaddress_envelope_body_relational_and_copy() {
        let script = r#"require ["fileinto", "imap4flags", "subaddress", "envelope", "body", "relational", "comparator-i;ascii-numeric", "copy", "variables"];
if allof (envelope :detail "to" "reports", body :contains "quarterly", header :value "ge" :comparator "i;ascii-numeric" "X-Missing" "0") {
  fileinto "Wrong";
}
if allof (envelope :detail "to" "reports", body :contains "quarterly") {
  set "box" "Reports";
  addflag "$report";
  fileinto :copy "${box}";
  fileinto "Archive";
}
"#;
        let verdict = check(script, false).unwrap();
        assert_eq!(
            filings(&verdict),
            vec![("Reports", vec!["$report"]), ("Archive", vec!["$report"])]
        );
        assert_eq!(verdict.reject, None);
    }

    #[test]
    fn reject_and_discard() {
        let verdict = check("require \"reject\";\r\nreject \"not here\";\r\n", false).unwrap();
        assert_eq!(verdict.reject.as_deref(), Some("not here"));
        assert!(verdict.filings.is_empty());
        let verdict = check("discard;\r\n", false).unwrap();
        assert!(verdict.filings.is_empty() && verdict.reject.is_none());
    }

    #[test]
    fn vacation_replies_once_per_record() {
        let script =
            "require \"vacation\";\r\nvacation :days 3 :subject \"Away\" \"I am away.\";\r\n";
        let verdict = check(script, false).unwrap();
        let reply = verdict.vacation.as_ref().expect("a reply");
        assert_eq!(reply.to, "alice@remote.example");
        let text = String::from_utf8_lossy(&reply.message);
        assert!(text.contains("Subject: Away"), "{text}");
        assert!(text.contains("Auto-Submitted: auto-replied"), "{text}");
        let (id, seconds) = verdict.vacation_record.clone().unwrap();
        assert!(id.contains("alice@remote.example"));
        assert_eq!(seconds, 3 * 86_400);
        assert_eq!(filings(&verdict), vec![("INBOX", vec![])]);
        // Recorded: no second reply.
        let verdict = check(script, true).unwrap();
        assert!(verdict.vacation.is_none() && verdict.vacation_record.is_none());
    }

    #[test]
    fn include_reads_the_accounts_other_scripts() {
        let scripts = BTreeMap::from([
            (
                "main".to_owned(),
                "require [\"include\"];\r\ninclude :personal \"lib\";\r\n".to_owned(),
            ),
            (
                "lib".to_owned(),
                "require \"fileinto\";\r\nfileinto \"Lib\";\r\n".to_owned(),
            ),
        ]);
        let message = Message {
            raw: MESSAGE,
            mail_from: "alice@remote.example",
            rcpt_to: "bob@example.org",
            account_address: "bob@example.org",
        };
        let verdict = run("mx", &message, &scripts, "main", &|_| false).unwrap();
        assert_eq!(filings(&verdict), vec![("Lib", vec![])]);
    }

    #[test]
    fn a_disallowed_extension_is_a_runtime_error() {
        assert!(check(
            "require \"enotify\";\r\nnotify \"mailto:a@b.c\";\r\n",
            false
        )
        .is_err());
    }

    #[test]
    fn compile_errors_carry_the_line() {
        let failure =
            compile(b"require \"fileinto\";\r\n\r\nfileinto \"x\"\r\nkeep;\r\n").unwrap_err();
        assert_eq!(failure.line, 4, "{failure}");
        assert!(compile(b"keep;").is_ok());
        assert!(compile(&vec![b'#'; MAX_SCRIPT_BYTES + 1]).is_err());
    }

    #[test]
    fn script_names() {
        assert!(check_script_name("vacation").is_ok());
        assert!(check_script_name("").is_err());
        assert!(check_script_name("a/b").is_err());
        assert!(check_script_name("a\nb").is_err());
        assert!(check_script_name(&"x".repeat(MAX_SCRIPT_NAME_BYTES + 1)).is_err());
    }
}
