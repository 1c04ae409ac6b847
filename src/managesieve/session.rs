//! The ManageSieve session: framing (atoms, quoted strings, literals `{n+}` / `{n}`),
//! then one function per command. Input bytes in, response bytes out; the store is the
//! only thing awaited.

use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine as _;

use super::ManageSieveConfig;
use crate::store::{AccountId, MailStore, StoreError};

/// Longest command line without its literals.
pub const MAX_LINE_BYTES: usize = 8 * 1024;
/// Largest literal before login (AUTHENTICATE data only).
pub const MAX_PREAUTH_LITERAL_BYTES: usize = 4 * 1024;
/// Largest literal after login: one script.
pub const MAX_LITERAL_BYTES: usize = crate::sieve::MAX_SCRIPT_BYTES;
/// Arguments of one command.
const MAX_ARGUMENTS: usize = 8;

/// What the driver does after a piece of input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    StartTls,
    Close,
}

/// A complete command, or why the input is not one yet.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Incomplete,
    Command {
        words: Vec<Vec<u8>>,
        consumed: usize,
    },
    Bad(&'static str),
}

/// Parses one command (or one AUTHENTICATE continuation) from the front of `input`.
fn parse(input: &[u8], literal_max: usize) -> Parsed {
    let mut words = Vec::new();
    let mut pos = 0;
    let mut line_bytes = 0;
    loop {
        while pos < input.len() && input[pos] == b' ' {
            pos += 1;
        }
        let Some(&byte) = input.get(pos) else {
            return if line_bytes > MAX_LINE_BYTES || input.len() - pos > MAX_LINE_BYTES {
                Parsed::Bad("line too long")
            } else {
                Parsed::Incomplete
            };
        };
        if words.len() > MAX_ARGUMENTS {
            return Parsed::Bad("too many arguments");
        }
        match byte {
            b'\r' | b'\n' => {
                let end = if byte == b'\r' {
                    match input.get(pos + 1) {
                        None => return Parsed::Incomplete,
                        Some(b'\n') => pos + 2,
                        Some(_) => return Parsed::Bad("bare CR"),
                    }
                } else {
                    pos + 1
                };
                return Parsed::Command {
                    words,
                    consumed: end,
                };
            }
            b'"' => {
                let mut word = Vec::new();
                let mut i = pos + 1;
                loop {
                    match input.get(i) {
                        None => {
                            return if i - pos > MAX_LINE_BYTES {
                                Parsed::Bad("line too long")
                            } else {
                                Parsed::Incomplete
                            }
                        }
                        Some(b'\\') => match input.get(i + 1) {
                            None => return Parsed::Incomplete,
                            Some(&c @ (b'"' | b'\\')) => {
                                word.push(c);
                                i += 2;
                            }
                            Some(_) => return Parsed::Bad("invalid escape in a quoted string"),
                        },
                        Some(b'"') => break,
                        Some(b'\r' | b'\n') => return Parsed::Bad("line break in a quoted string"),
                        Some(&c) => {
                            word.push(c);
                            i += 1;
                        }
                    }
                }
                line_bytes += i + 1 - pos;
                pos = i + 1;
                words.push(word);
            }
            b'{' => {
                let Some(close) = input[pos..].iter().position(|&b| b == b'}') else {
                    return if input.len() - pos > 24 {
                        Parsed::Bad("invalid literal")
                    } else {
                        Parsed::Incomplete
                    };
                };
                let inner = &input[pos + 1..pos + close];
                let digits = inner.strip_suffix(b"+").unwrap_or(inner);
                let Some(length) = std::str::from_utf8(digits)
                    .ok()
                    .filter(|d| !d.is_empty() && d.len() <= 10)
                    .and_then(|d| d.parse::<usize>().ok())
                else {
                    return Parsed::Bad("invalid literal");
                };
                if length > literal_max {
                    return Parsed::Bad("literal too large");
                }
                let after = pos + close + 1;
                let start = match (input.get(after), input.get(after + 1)) {
                    (Some(b'\r'), Some(b'\n')) => after + 2,
                    (Some(b'\n'), _) => after + 1,
                    (None, _) | (Some(b'\r'), None) => return Parsed::Incomplete,
                    _ => return Parsed::Bad("a literal is followed by CRLF"),
                };
                if input.len() < start + length {
                    return Parsed::Incomplete;
                }
                words.push(input[start..start + length].to_vec());
                pos = start + length;
            }
            _ => {
                let end = input[pos..]
                    .iter()
                    .position(|&b| matches!(b, b' ' | b'\r' | b'\n' | b'"' | b'{'))
                    .map(|p| pos + p);
                let Some(end) = end else {
                    return if input.len() - pos > MAX_LINE_BYTES {
                        Parsed::Bad("line too long")
                    } else {
                        Parsed::Incomplete
                    };
                };
                line_bytes += end - pos;
                words.push(input[pos..end].to_vec());
                pos = end;
            }
        }
    }
}

/// A quoted string (or a literal when it cannot be one).
fn string(text: &str) -> String {
    if text.contains(['\r', '\n']) || text.len() > 1024 {
        format!("{{{}}}\r\n{}", text.len(), text)
    } else {
        format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// Facts about the connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionInfo {
    pub client: IpAddr,
    pub secure: bool,
    /// A loopback listener: plaintext passwords are acceptable (as for IMAP).
    pub loopback: bool,
}

pub struct Session {
    store: MailStore,
    config: Arc<ManageSieveConfig>,
    conn: ConnectionInfo,
    account: Option<(AccountId, String)>,
    /// AUTHENTICATE PLAIN sent without an initial response: the next line is its data.
    awaiting_sasl: bool,
    failed_auth: u32,
    input: Vec<u8>,
}

impl Session {
    pub fn new(store: MailStore, config: Arc<ManageSieveConfig>, conn: ConnectionInfo) -> Self {
        Session {
            store,
            config,
            conn,
            account: None,
            awaiting_sasl: false,
            failed_auth: 0,
            input: Vec::new(),
        }
    }

    pub fn is_authenticated(&self) -> bool {
        self.account.is_some()
    }

    fn may_login(&self) -> bool {
        self.conn.secure || self.conn.loopback
    }

    /// The capability lines (greeting, CAPABILITY, after STARTTLS).
    fn capabilities(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"\"IMPLEMENTATION\" \"kermail\"\r\n");
        if self.account.is_none() {
            if self.may_login() {
                out.extend_from_slice(b"\"SASL\" \"PLAIN\"\r\n");
            } else {
                out.extend_from_slice(b"\"SASL\" \"\"\r\n");
            }
        }
        let extensions = crate::sieve::EXTENSIONS.join(" ");
        out.extend_from_slice(format!("\"SIEVE\" \"{extensions}\"\r\n").as_bytes());
        if !self.conn.secure {
            out.extend_from_slice(b"\"STARTTLS\"\r\n");
        }
        out.extend_from_slice(b"\"VERSION\" \"1.0\"\r\n");
    }

    pub fn greeting(&self, out: &mut Vec<u8>) {
        self.capabilities(out);
        out.extend_from_slice(b"OK \"kermail ManageSieve ready\"\r\n");
    }

    /// After the STARTTLS handshake: capabilities again (RFC 5804 section 2.2).
    pub fn tls_established(&mut self, out: &mut Vec<u8>) {
        self.conn.secure = true;
        self.input.clear();
        self.capabilities(out);
        out.extend_from_slice(b"OK \"TLS negotiation successful\"\r\n");
    }

    pub fn timed_out(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"BYE \"Timeout\"\r\n");
    }

    pub fn shutdown(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"BYE (TRYLATER) \"Server shutting down\"\r\n");
    }

    /// Takes bytes from the client and answers every complete command in them.
    pub async fn handle_input(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Action {
        self.input.extend_from_slice(bytes);
        loop {
            let literal_max = if self.account.is_some() {
                MAX_LITERAL_BYTES
            } else {
                MAX_PREAUTH_LITERAL_BYTES
            };
            match parse(&self.input, literal_max) {
                Parsed::Incomplete => return Action::Continue,
                Parsed::Bad(why) => {
                    tracing::info!(client = %self.conn.client, why, "managesieve protocol error");
                    out.extend_from_slice(format!("BYE \"Protocol error: {why}\"\r\n").as_bytes());
                    return Action::Close;
                }
                Parsed::Command { words, consumed } => {
                    self.input.drain(..consumed);
                    let action = if self.awaiting_sasl {
                        self.awaiting_sasl = false;
                        self.sasl_response(words.first().map(|w| w.as_slice()), out)
                            .await
                    } else if words.is_empty() {
                        Action::Continue
                    } else {
                        self.command(words, out).await
                    };
                    if action != Action::Continue {
                        return action;
                    }
                }
            }
        }
    }

    async fn command(&mut self, words: Vec<Vec<u8>>, out: &mut Vec<u8>) -> Action {
        let name = String::from_utf8_lossy(&words[0]).to_ascii_uppercase();
        let args: Vec<String> = words[1..]
            .iter()
            .map(|w| String::from_utf8_lossy(w).into_owned())
            .collect();
        let no = |out: &mut Vec<u8>, text: &str| {
            out.extend_from_slice(format!("NO {}\r\n", string(text)).as_bytes());
        };
        match (name.as_str(), self.account.clone()) {
            ("CAPABILITY", _) => {
                self.capabilities(out);
                out.extend_from_slice(b"OK \"Capability completed\"\r\n");
            }
            ("NOOP", _) => match args.first() {
                Some(tag) => out
                    .extend_from_slice(format!("OK (TAG {}) \"Done\"\r\n", string(tag)).as_bytes()),
                None => out.extend_from_slice(b"OK \"Done\"\r\n"),
            },
            ("LOGOUT", _) => {
                out.extend_from_slice(b"OK \"Bye\"\r\n");
                return Action::Close;
            }
            ("STARTTLS", None) if !self.conn.secure => {
                out.extend_from_slice(b"OK \"Begin TLS negotiation now\"\r\n");
                return Action::StartTls;
            }
            ("AUTHENTICATE", None) => {
                if !self.may_login() {
                    no(out, "Use STARTTLS before AUTHENTICATE");
                    return Action::Continue;
                }
                if !args
                    .first()
                    .is_some_and(|m| m.eq_ignore_ascii_case("PLAIN"))
                {
                    no(out, "Only the PLAIN mechanism is offered");
                    return Action::Continue;
                }
                match words.get(2) {
                    Some(initial) => {
                        let initial = initial.clone();
                        return self.sasl_response(Some(&initial), out).await;
                    }
                    None => {
                        self.awaiting_sasl = true;
                        out.extend_from_slice(b"\"\"\r\n");
                    }
                }
            }
            ("LISTSCRIPTS", Some((account, _))) => {
                for script in self.store.list_scripts(account) {
                    out.extend_from_slice(string(&script.name).as_bytes());
                    if script.active {
                        out.extend_from_slice(b" ACTIVE");
                    }
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"OK \"Listscripts completed\"\r\n");
            }
            ("GETSCRIPT", Some((account, _))) if args.len() == 1 => {
                match self.store.get_script(account, &args[0]) {
                    Some(source) => {
                        out.extend_from_slice(
                            format!(
                                "{{{}}}\r\n{}\r\nOK \"Getscript completed\"\r\n",
                                source.len(),
                                source
                            )
                            .as_bytes(),
                        );
                    }
                    None => {
                        out.extend_from_slice(b"NO (NONEXISTENT) \"There is no such script\"\r\n")
                    }
                }
            }
            ("PUTSCRIPT", Some((account, address))) if args.len() == 2 => {
                if !self
                    .store
                    .script_fits(account, &args[0], args[1].len() as u64)
                {
                    out.extend_from_slice(
                        b"NO (QUOTA/MAXSCRIPTS) \"Too many or too large scripts\"\r\n",
                    );
                    return Action::Continue;
                }
                match self.store.put_script(account, &args[0], &args[1]).await {
                    Ok(()) => {
                        tracing::info!(account = %address, script = %args[0], "managesieve script stored");
                        out.extend_from_slice(b"OK \"Putscript completed\"\r\n");
                    }
                    Err(error) => self.store_error(&error, out),
                }
            }
            ("CHECKSCRIPT", Some(_)) if args.len() == 1 => {
                match crate::sieve::compile(args[0].as_bytes()) {
                    Ok(_) => out.extend_from_slice(b"OK \"Script is valid\"\r\n"),
                    Err(failure) => no(out, &failure.to_string()),
                }
            }
            ("SETACTIVE", Some((account, _))) if args.len() == 1 => {
                let name = (!args[0].is_empty()).then_some(args[0].as_str());
                match self.store.set_active_script(account, name).await {
                    Ok(()) => out.extend_from_slice(b"OK \"Setactive completed\"\r\n"),
                    Err(error) => self.store_error(&error, out),
                }
            }
            ("DELETESCRIPT", Some((account, _))) if args.len() == 1 => {
                let active = self
                    .store
                    .list_scripts(account)
                    .iter()
                    .any(|s| s.active && s.name == args[0]);
                if active {
                    out.extend_from_slice(
                        b"NO (ACTIVE) \"You may not delete an active script\"\r\n",
                    );
                    return Action::Continue;
                }
                match self.store.delete_script(account, &args[0]).await {
                    Ok(()) => out.extend_from_slice(b"OK \"Deletescript completed\"\r\n"),
                    Err(error) => self.store_error(&error, out),
                }
            }
            ("RENAMESCRIPT", Some((account, _))) if args.len() == 2 => {
                match self.store.rename_script(account, &args[0], &args[1]).await {
                    Ok(()) => out.extend_from_slice(b"OK \"Renamescript completed\"\r\n"),
                    Err(error) => self.store_error(&error, out),
                }
            }
            ("HAVESPACE", Some((account, _))) if args.len() == 2 => {
                let size = args[1].parse::<u64>().unwrap_or(u64::MAX);
                if self.store.script_fits(account, &args[0], size) {
                    out.extend_from_slice(b"OK \"Putscript would succeed\"\r\n");
                } else {
                    out.extend_from_slice(b"NO (QUOTA/MAXSIZE) \"Quota exceeded\"\r\n");
                }
            }
            (
                "LISTSCRIPTS" | "GETSCRIPT" | "PUTSCRIPT" | "CHECKSCRIPT" | "SETACTIVE"
                | "DELETESCRIPT" | "RENAMESCRIPT" | "HAVESPACE",
                None,
            ) => no(out, "Authenticate first"),
            ("AUTHENTICATE" | "STARTTLS", _) => no(out, "Not allowed now"),
            _ => {
                tracing::info!(client = %self.conn.client, command = %printable(&name), "managesieve unknown or malformed command");
                no(out, "Unknown command or wrong arguments");
            }
        }
        Action::Continue
    }

    fn store_error(&self, error: &StoreError, out: &mut Vec<u8>) {
        let code = match error {
            StoreError::NotFound(_) => "(NONEXISTENT) ",
            StoreError::AlreadyExists(_) => "(ALREADYEXISTS) ",
            StoreError::OverQuota(_) => "(QUOTA) ",
            StoreError::Unavailable(_) | StoreError::StorageFailed(_) => "(TRYLATER) ",
            _ => "",
        };
        out.extend_from_slice(format!("NO {code}{}\r\n", string(&error.to_string())).as_bytes());
    }

    /// The PLAIN response (base64 of `authzid NUL authcid NUL password`).
    async fn sasl_response(&mut self, data: Option<&[u8]>, out: &mut Vec<u8>) -> Action {
        let decoded = data.and_then(|d| {
            base64::engine::general_purpose::STANDARD
                .decode(d.trim_ascii())
                .ok()
        });
        let parts: Option<(String, String, String)> = decoded.and_then(|bytes| {
            let mut fields = bytes.split(|&b| b == 0);
            let authzid = String::from_utf8(fields.next()?.to_vec()).ok()?;
            let authcid = String::from_utf8(fields.next()?.to_vec()).ok()?;
            let password = String::from_utf8(fields.next()?.to_vec()).ok()?;
            fields
                .next()
                .is_none()
                .then_some((authzid, authcid, password))
        });
        let Some((authzid, username, password)) = parts else {
            out.extend_from_slice(b"NO \"Malformed PLAIN response\"\r\n");
            return self.count_failure(out);
        };
        if !authzid.is_empty() && !authzid.eq_ignore_ascii_case(&username) {
            out.extend_from_slice(b"NO \"Authorization identity must be empty or the login\"\r\n");
            return self.count_failure(out);
        }
        match self
            .store
            .authenticate_from(self.conn.client, &username, &password)
            .await
        {
            Ok(Some(account)) => {
                tracing::info!(client = %self.conn.client, user = %printable(&username), "managesieve login");
                self.account = Some((account, username));
                out.extend_from_slice(b"OK \"Logged in\"\r\n");
                Action::Continue
            }
            Ok(None) => {
                tracing::info!(client = %self.conn.client, user = %printable(&username), "managesieve login failed");
                out.extend_from_slice(b"NO \"Authentication failed\"\r\n");
                self.count_failure(out)
            }
            Err(_) => {
                tracing::info!(client = %self.conn.client, "managesieve login refused: throttled");
                out.extend_from_slice(
                    b"NO (TRYLATER) \"Too many failed logins, try again later\"\r\n",
                );
                self.count_failure(out)
            }
        }
    }

    fn count_failure(&mut self, out: &mut Vec<u8>) -> Action {
        self.failed_auth += 1;
        if self.failed_auth >= self.config.max_failed_auth_per_session {
            out.extend_from_slice(b"BYE \"Too many failed authentication attempts\"\r\n");
            return Action::Close;
        }
        Action::Continue
    }
}

fn printable(text: &str) -> String {
    text.chars()
        .take(64)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(input: &[u8]) -> (Vec<String>, usize) {
        match parse(input, 100) {
            Parsed::Command { words, consumed } => (
                words
                    .iter()
                    .map(|w| String::from_utf8_lossy(w).into_owned())
                    .collect(),
                consumed,
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn atoms_quoted_strings_and_literals() {
        let (w, n) = words(b"PUTSCRIPT \"my \\\"s\\\"\" {5+}\r\nkeep;\r\nNOOP\r\n");
        assert_eq!(w, vec!["PUTSCRIPT", "my \"s\"", "keep;"]);
        assert_eq!(n, 34);
        let (w, _) = words(b"HAVESPACE \"a\" 100\r\n");
        assert_eq!(w, vec!["HAVESPACE", "a", "100"]);
        let (w, _) = words(b"putscript \"x\" {2}\r\nab\r\n");
        assert_eq!(w, vec!["putscript", "x", "ab"]);
    }

    #[test]
    fn incomplete_input_waits_and_bad_input_is_refused() {
        assert_eq!(
            parse(b"PUTSCRIPT \"x\" {5+}\r\nke", 100),
            Parsed::Incomplete
        );
        assert_eq!(parse(b"NOOP", 100), Parsed::Incomplete);
        assert_eq!(parse(b"NOOP \"abc", 100), Parsed::Incomplete);
        assert_eq!(
            parse(b"PUTSCRIPT \"x\" {500+}\r\n", 100),
            Parsed::Bad("literal too large")
        );
        assert_eq!(parse(b"X {abc}\r\n", 100), Parsed::Bad("invalid literal"));
        assert_eq!(
            parse(b"X \"a\rb\"\r\n", 100),
            Parsed::Bad("line break in a quoted string")
        );
        assert_eq!(
            parse(&vec![b'A'; MAX_LINE_BYTES + 10], 100),
            Parsed::Bad("line too long")
        );
    }

    #[test]
    fn strings_are_quoted_or_literal() {
        assert_eq!(string("a\"b"), "\"a\\\"b\"");
        assert_eq!(string("a\r\nb"), "{4}\r\na\r\nb");
    }
}
