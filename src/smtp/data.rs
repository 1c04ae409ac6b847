//! The DATA reader: finds the end of a message (`CRLF . CRLF`) and removes dot-stuffing.
//!
//! Only `<CRLF>.<CRLF>` ends a message; a dot after a bare LF or a bare CR is message content
//! (this is what defeats SMTP smuggling, where a second message hides behind `<LF>.<LF>`).
//! A line is dot-unstuffed only when it starts after a CRLF, matching the same rule.
//!
//! Why not smtp-proto's `DataReceiver`: in 0.2.5 it does not treat the start of the data as a
//! line start, so an empty message (`.` CRLF right after `354`) is not recognised as ended,
//! and a dot-stuffed first line keeps both dots (checked: `..x` CRLF `.` CRLF gives `..x`).
//! Commands are still parsed by smtp-proto's `Request::parse`, on lines framed here so that
//! the line length limit is ours (its `RequestReceiver` has a fixed 4096).

/// Where the reader stands between two calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DotState {
    /// At the start of a line (the start of the data, or just after CRLF).
    LineStart,
    /// A dot was read at the start of a line and dropped.
    Dot,
    /// A line-start dot then CR were read; LF now ends the message.
    DotCr,
    /// Inside a line; `last_cr` tells whether the last byte handed out was CR.
    Mid { last_cr: bool },
}

#[derive(Clone, Debug)]
pub struct DotReader {
    state: DotState,
}

impl Default for DotReader {
    fn default() -> Self {
        DotReader::new()
    }
}

impl DotReader {
    pub fn new() -> DotReader {
        DotReader {
            state: DotState::LineStart,
        }
    }

    /// Reads `input`, handing the unstuffed message bytes to `sink`. Returns how many input
    /// bytes were consumed and whether the end of the message was reached (then the bytes after
    /// the consumed ones belong to the next command).
    pub fn feed(&mut self, input: &[u8], sink: &mut impl FnMut(&[u8])) -> (usize, bool) {
        let mut index = 0;
        while index < input.len() {
            match self.state {
                DotState::LineStart => {
                    if input[index] == b'.' {
                        self.state = DotState::Dot;
                        index += 1;
                    } else {
                        self.state = DotState::Mid { last_cr: false };
                    }
                }
                DotState::Dot => {
                    if input[index] == b'\r' {
                        self.state = DotState::DotCr;
                        index += 1;
                    } else {
                        self.state = DotState::Mid { last_cr: false };
                    }
                }
                DotState::DotCr => {
                    if input[index] == b'\n' {
                        self.state = DotState::LineStart;
                        return (index + 1, true);
                    }
                    // ".\r" then something else: the dot was stuffing, the CR is content.
                    sink(b"\r");
                    self.state = DotState::Mid { last_cr: true };
                }
                DotState::Mid { last_cr } => {
                    let rest = &input[index..];
                    match rest.iter().position(|&byte| byte == b'\n') {
                        Some(newline) => {
                            sink(&rest[..=newline]);
                            let after_cr = if newline > 0 {
                                rest[newline - 1] == b'\r'
                            } else {
                                last_cr
                            };
                            self.state = if after_cr {
                                DotState::LineStart
                            } else {
                                DotState::Mid { last_cr: false }
                            };
                            index += newline + 1;
                        }
                        None => {
                            sink(rest);
                            self.state = DotState::Mid {
                                last_cr: rest.last() == Some(&b'\r'),
                            };
                            index = input.len();
                        }
                    }
                }
            }
        }
        (input.len(), false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` whole and byte by byte; both must give `expected` message bytes and leave
    /// `expected_rest` unconsumed (None: the message has not ended).
    fn check(input: &[u8], expected: Option<(&[u8], &[u8])>) {
        for split in [input.len().max(1), 1] {
            let mut reader = DotReader::new();
            let mut message = Vec::new();
            let mut offset = 0;
            let mut ended = false;
            while offset < input.len() {
                let end = (offset + split).min(input.len());
                let (consumed, done) = reader.feed(&input[offset..end], &mut |bytes| {
                    message.extend_from_slice(bytes)
                });
                offset += consumed;
                if done {
                    ended = true;
                    break;
                }
            }
            match expected {
                Some((expected_message, expected_rest)) => {
                    assert!(ended, "no end found in {input:?}");
                    assert_eq!(
                        String::from_utf8_lossy(&message),
                        String::from_utf8_lossy(expected_message)
                    );
                    assert_eq!(&input[offset..], expected_rest);
                }
                None => assert!(!ended, "unexpected end in {input:?}"),
            }
        }
    }

    #[test]
    fn plain_message_ends_at_crlf_dot_crlf() {
        check(
            b"a\r\nb\r\n.\r\nQUIT\r\n",
            Some((b"a\r\nb\r\n", b"QUIT\r\n")),
        );
    }

    #[test]
    fn empty_message() {
        check(b".\r\n", Some((b"", b"")));
    }

    #[test]
    fn dot_stuffed_lines_lose_one_dot() {
        check(
            b"..\r\n..a\r\n.b\r\n.\r\n",
            Some((b".\r\n.a\r\nb\r\n", b"")),
        );
        check(b".\rx\r\n.\r\n", Some((b"\rx\r\n", b"")));
    }

    #[test]
    fn bare_lf_or_cr_dot_never_ends_the_message() {
        check(b"a\n.\nb\r\n.\r\n", Some((b"a\n.\nb\r\n", b"")));
        check(
            b"a\n.\r\nMAIL FROM:<x@y>\r\n.\r\n",
            Some((b"a\n.\r\nMAIL FROM:<x@y>\r\n", b"")),
        );
        check(b"a\r.\r\nb\r\n.\r\n", Some((b"a\r.\r\nb\r\n", b"")));
        check(b"a\r\n.\n", None);
    }

    #[test]
    fn long_lines_pass_unchanged() {
        let mut input = vec![b'x'; 100_000];
        input.extend_from_slice(b"\r\n.\r\n");
        let mut expected = vec![b'x'; 100_000];
        expected.extend_from_slice(b"\r\n");
        check(&input, Some((&expected, b"")));
    }
}
