//! Splits the client's byte stream into complete commands, literals included.
//!
//! imap-codec parses a command only once it is complete; this framer finds where a command
//! ends (a line that does not announce a literal), tells the session when a synchronizing
//! literal needs a continuation request, and enforces the line and literal limits before any
//! byte is buffered beyond them. "Need more bytes" is an ordinary result, not an error.

/// What the buffer holds so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete command fills `buffer[..len]`.
    Command { len: usize },
    /// A synchronizing literal was announced: send a continuation request, then call again.
    ContinuationNeeded,
    /// More bytes are needed.
    Incomplete,
    /// A synchronizing literal over the limit: answer `tag NO [TOOBIG]`, drop `buffer[..len]`.
    LiteralTooBig { tag: String, len: usize },
    /// The stream cannot be resynchronised (an overlong line, an oversized non-synchronizing
    /// literal): say BYE and close.
    Fatal(&'static str),
}

#[derive(Debug)]
pub struct Framer {
    max_line_length_bytes: usize,
    max_literal_size_bytes: u32,
    /// Where the current line segment (after the last literal) starts.
    segment_start: usize,
    /// Where to resume looking for the end of the current line.
    scan: usize,
    /// The announced literal ends here; the command goes on after it.
    literal_end: Option<usize>,
}

impl Framer {
    pub fn new(max_line_length_bytes: usize, max_literal_size_bytes: u32) -> Framer {
        Framer {
            max_line_length_bytes,
            max_literal_size_bytes,
            segment_start: 0,
            scan: 0,
            literal_end: None,
        }
    }

    fn reset(&mut self) {
        self.segment_start = 0;
        self.scan = 0;
        self.literal_end = None;
    }

    /// Looks at `buffer` (which only ever grows between calls until a command is taken out
    /// of its front) and says what it holds.
    pub fn next(&mut self, buffer: &[u8]) -> Frame {
        let max_command_bytes =
            self.max_literal_size_bytes as usize + 4 * self.max_line_length_bytes;
        loop {
            if let Some(end) = self.literal_end {
                if buffer.len() < end {
                    return Frame::Incomplete;
                }
                self.literal_end = None;
                self.segment_start = end;
                self.scan = end;
            }
            let Some(offset) = memchr(b'\n', &buffer[self.scan..]) else {
                self.scan = buffer.len();
                if buffer.len() - self.segment_start > self.max_line_length_bytes {
                    self.reset();
                    return Frame::Fatal("command line too long");
                }
                return Frame::Incomplete;
            };
            let newline = self.scan + offset;
            let mut line = &buffer[self.segment_start..newline];
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            if line.len() > self.max_line_length_bytes {
                self.reset();
                return Frame::Fatal("command line too long");
            }
            match literal_announcement(line) {
                None => {
                    self.reset();
                    return Frame::Command { len: newline + 1 };
                }
                Some((length, synchronizing)) => {
                    let end = (newline + 1).saturating_add(length as usize);
                    if length > self.max_literal_size_bytes || end > max_command_bytes {
                        self.reset();
                        if synchronizing {
                            return Frame::LiteralTooBig {
                                tag: first_token(buffer),
                                len: newline + 1,
                            };
                        }
                        return Frame::Fatal("literal too large");
                    }
                    self.literal_end = Some(end);
                    if synchronizing {
                        return Frame::ContinuationNeeded;
                    }
                }
            }
        }
    }
}

/// `{N}` or `{N+}` at the end of a line: (N, synchronizing).
fn literal_announcement(line: &[u8]) -> Option<(u32, bool)> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let mut digits = &inner[open + 1..];
    let mut synchronizing = true;
    if let Some(stripped) = digits.strip_suffix(b"+") {
        digits = stripped;
        synchronizing = false;
    }
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let length = std::str::from_utf8(digits).ok()?.parse::<u64>().ok()?;
    Some((u32::try_from(length).unwrap_or(u32::MAX), synchronizing))
}

/// The first space-separated token of the buffer (the tag, when there is one).
pub fn first_token(buffer: &[u8]) -> String {
    let end = buffer
        .iter()
        .position(|&b| b == b' ' || b == b'\r' || b == b'\n')
        .unwrap_or(buffer.len())
        .min(64);
    String::from_utf8_lossy(&buffer[..end]).into_owned()
}

/// Position of the first `needle` in `haystack`.
pub fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}

/// Takes one line (without its line ending) off the front of `buffer`, for the modes that read
/// plain lines (AUTHENTICATE responses, IDLE's DONE). `Err` when the line is too long.
// `Err(())` means only "line too long"; it became public for the fuzz targets.
#[allow(clippy::result_unit_err)]
pub fn take_line(buffer: &mut Vec<u8>, max_len: usize) -> Result<Option<Vec<u8>>, ()> {
    match memchr(b'\n', buffer) {
        None if buffer.len() > max_len => Err(()),
        None => Ok(None),
        Some(newline) => {
            let rest = buffer.split_off(newline + 1);
            let mut line = std::mem::replace(buffer, rest);
            line.truncate(newline);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            Ok(Some(line))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_ends_at_the_first_line_without_a_literal() {
        let mut framer = Framer::new(100, 1000);
        assert_eq!(framer.next(b"A1 NOO"), Frame::Incomplete);
        assert_eq!(framer.next(b"A1 NOOP\r\nA2"), Frame::Command { len: 9 });
    }

    #[test]
    fn synchronizing_literals_ask_for_a_continuation_and_wait_for_their_bytes() {
        let mut framer = Framer::new(100, 1000);
        let mut input = b"A1 LOGIN {3}\r\n".to_vec();
        assert_eq!(framer.next(&input), Frame::ContinuationNeeded);
        assert_eq!(framer.next(&input), Frame::Incomplete);
        input.extend_from_slice(b"a\nb {2+}\r\n");
        assert_eq!(framer.next(&input), Frame::Incomplete);
        input.extend_from_slice(b"pw\r\n");
        assert_eq!(framer.next(&input), Frame::Command { len: input.len() });
    }

    #[test]
    fn limits_are_enforced_before_buffering() {
        let mut framer = Framer::new(10, 5);
        assert_eq!(
            framer.next(b"T APPEND x {6}\r\n"),
            Frame::Fatal("command line too long")
        );
        let mut framer = Framer::new(100, 5);
        assert_eq!(
            framer.next(b"T APPEND x {6}\r\n"),
            Frame::LiteralTooBig {
                tag: "T".into(),
                len: 16
            }
        );
        assert_eq!(
            framer.next(b"T APPEND x {6+}\r\n"),
            Frame::Fatal("literal too large")
        );
        let mut framer = Framer::new(10, 5);
        assert_eq!(
            framer.next(&[b'x'; 11]),
            Frame::Fatal("command line too long")
        );
    }
}
