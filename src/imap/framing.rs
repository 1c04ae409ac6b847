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
    /// A literal of `length` bytes over the spill threshold was announced by the line ending
    /// at `buffer[..len]` (the command so far, `{N}` included): the caller takes those bytes,
    /// sends a continuation request if `synchronizing`, and stores the literal's bytes
    /// elsewhere. The framer starts afresh.
    Spill {
        len: usize,
        length: u32,
        synchronizing: bool,
    },
    /// The stream cannot be resynchronised (an overlong line, an oversized non-synchronizing
    /// literal): say BYE and close.
    Fatal(&'static str),
}

#[derive(Debug)]
pub struct Framer {
    max_line_length_bytes: usize,
    max_literal_size_bytes: u32,
    /// Literals over this many bytes are handed out as [`Frame::Spill`] (`None`: never).
    spill_threshold: Option<u32>,
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
            spill_threshold: None,
            segment_start: 0,
            scan: 0,
            literal_end: None,
        }
    }

    /// Changes the literal limit and the spill threshold (e.g. at login); they apply to
    /// literals announced from now on.
    pub fn set_limits(&mut self, max_literal_size_bytes: u32, spill_threshold: Option<u32>) {
        self.max_literal_size_bytes = max_literal_size_bytes;
        self.spill_threshold = spill_threshold;
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
                if unfinished_line_too_long(
                    &buffer[self.segment_start..],
                    self.max_line_length_bytes,
                ) {
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
                    if self
                        .spill_threshold
                        .is_some_and(|threshold| length > threshold)
                    {
                        self.reset();
                        return Frame::Spill {
                            len: newline + 1,
                            length,
                            synchronizing,
                        };
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

/// Whether a line still waiting for its `\n` is already over `max_len` bytes. The limit counts
/// the line without its ending, whether the line is complete or not, so a trailing `\r` (maybe
/// the first half of the CRLF) is not counted: the verdict must not depend on whether the `\n`
/// arrived in the same read as the rest of the line.
fn unfinished_line_too_long(pending: &[u8], max_len: usize) -> bool {
    let pending = pending.strip_suffix(b"\r").unwrap_or(pending);
    pending.len() > max_len
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
    ::memchr::memchr(needle, haystack)
}

/// The first line of `buffer` for the modes that read plain lines (AUTHENTICATE responses,
/// IDLE's DONE): `(line without its ending, bytes to consume)`. `Err` when the line (without its
/// ending) is longer than `max_len`, whether its end has arrived yet or not.
// `Err(())` means only "line too long"; it became public for the fuzz targets.
#[allow(clippy::result_unit_err)]
pub fn first_line(buffer: &[u8], max_len: usize) -> Result<Option<(&[u8], usize)>, ()> {
    match memchr(b'\n', buffer) {
        None if unfinished_line_too_long(buffer, max_len) => Err(()),
        None => Ok(None),
        Some(newline) => {
            let line = &buffer[..newline];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.len() > max_len {
                return Err(());
            }
            Ok(Some((line, newline + 1)))
        }
    }
}

/// Takes one line (without its line ending) off the front of `buffer` (see [`first_line`]).
#[allow(clippy::result_unit_err)]
pub fn take_line(buffer: &mut Vec<u8>, max_len: usize) -> Result<Option<Vec<u8>>, ()> {
    let Some((line, consumed)) = first_line(buffer, max_len)? else {
        return Ok(None);
    };
    let line = line.to_vec();
    buffer.drain(..consumed);
    Ok(Some(line))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What a framer says about `stream` fed in `chunks` (the fuzz target's driver, without
    /// `Incomplete`): complete commands, continuations, refusals, the fatal error.
    fn frames(chunks: &[&[u8]], max_line: usize, max_literal: u32) -> Vec<String> {
        let mut framer = Framer::new(max_line, max_literal);
        let mut buffer = Vec::new();
        let mut said = Vec::new();
        for chunk in chunks {
            buffer.extend_from_slice(chunk);
            loop {
                match framer.next(&buffer) {
                    Frame::Incomplete => break,
                    Frame::Command { len } => {
                        let command: Vec<u8> = buffer.drain(..len).collect();
                        said.push(format!("command {command:?}"));
                    }
                    Frame::ContinuationNeeded => said.push("continue".into()),
                    Frame::LiteralTooBig { tag, len } => {
                        buffer.drain(..len);
                        said.push(format!("too big {tag} {len}"));
                    }
                    Frame::Spill { .. } => unreachable!("no spill threshold"),
                    Frame::Fatal(why) => {
                        said.push(format!("fatal {why}"));
                        return said;
                    }
                }
            }
        }
        said
    }

    /// The lines `take_line` yields from `chunks`, then `Err` if it refused a line.
    fn lines(chunks: &[&[u8]], max_line: usize) -> Vec<Result<Vec<u8>, ()>> {
        let mut buffer = Vec::new();
        let mut said = Vec::new();
        for chunk in chunks {
            buffer.extend_from_slice(chunk);
            loop {
                match take_line(&mut buffer, max_line) {
                    Ok(Some(line)) => said.push(Ok(line)),
                    Ok(None) => break,
                    Err(()) => {
                        said.push(Err(()));
                        return said;
                    }
                }
            }
        }
        said
    }

    /// The fuzz finding (fuzz/fuzz_targets/imap_framing.rs, "frames depend on how the stream
    /// was cut"): a line of exactly the limit whose `\r` arrived before its `\n` was refused,
    /// the same bytes in one read were accepted.
    #[test]
    fn a_line_of_the_limit_is_accepted_however_its_crlf_is_cut() {
        let line = b"A1 NOOP 89ABCDEF\r\n";
        assert_eq!(line.len(), 16 + 2);
        let whole = frames(&[line], 16, 0);
        assert_eq!(whole, frames(&[&line[..17], &line[17..]], 16, 0));
        assert_eq!(
            whole,
            frames(
                &line.map(|b| [b]).iter().map(|b| &b[..]).collect::<Vec<_>>(),
                16,
                0
            )
        );
        assert_eq!(whole.len(), 1);
        assert!(whole[0].starts_with("command"), "{whole:?}");
        // One byte more is refused, however it is cut.
        let long = b"A1 NOOP 89ABCDEFG\r\n";
        for cut in 0..long.len() {
            assert_eq!(
                frames(&[&long[..cut], &long[cut..]], 16, 0),
                vec!["fatal command line too long".to_owned()]
            );
        }
        // The plain-line reader (AUTHENTICATE, IDLE) applies the same limit to complete lines.
        assert_eq!(lines(&[&line[2..]], 14), vec![Ok(line[2..16].to_vec())]);
        assert_eq!(
            lines(&[&line[2..17], &line[17..]], 14),
            vec![Ok(line[2..16].to_vec())]
        );
        assert_eq!(lines(&[&long[2..]], 14), vec![Err(())]);
        assert_eq!(lines(&[&long[2..18], &long[18..]], 14), vec![Err(())]);
    }

    proptest! {
        /// Whatever the stream and however it is cut into reads, the framer and the plain-line
        /// reader say the same.
        #[test]
        fn frames_do_not_depend_on_how_the_stream_is_cut(
            stream in proptest::collection::vec(
                prop_oneof![
                    Just(b'\r'), Just(b'\n'), Just(b'{'), Just(b'}'), Just(b'+'), Just(b' '),
                    Just(b'1'), Just(b'4'), b'a'..=b'c', Just(b'~'), Just(b'\0'),
                ],
                0..120,
            ),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
            max_line in 2usize..24,
            max_literal in 0u32..12,
        ) {
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            cuts.push(0);
            cuts.push(stream.len());
            cuts.sort_unstable();
            let chunks: Vec<&[u8]> = cuts.windows(2).map(|w| &stream[w[0]..w[1]]).collect();
            prop_assert_eq!(frames(&chunks, max_line, max_literal), frames(&[&stream], max_line, max_literal));
            prop_assert_eq!(lines(&chunks, max_line), lines(&[&stream], max_line));
        }
    }

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

    /// literal8 (`~{n}`, RFC 3516 4.4) is framed like a literal: the same continuation, the
    /// same limits, the same spill; its bytes may be anything, NULs included.
    #[test]
    fn literal8_is_framed_like_a_literal() {
        let mut framer = Framer::new(100, 1000);
        let mut input = b"A1 APPEND INBOX ~{4}\r\n".to_vec();
        assert_eq!(framer.next(&input), Frame::ContinuationNeeded);
        input.extend_from_slice(b"\0\r\n\0");
        assert_eq!(framer.next(&input), Frame::Incomplete);
        input.extend_from_slice(b" ~{1+}\r\n\n\r\n");
        assert_eq!(framer.next(&input), Frame::Command { len: input.len() });
        let mut framer = Framer::new(100, 5);
        assert_eq!(
            framer.next(b"T APPEND x ~{6}\r\n"),
            Frame::LiteralTooBig {
                tag: "T".into(),
                len: 17
            }
        );
        assert_eq!(
            framer.next(b"T APPEND x ~{6+}\r\n"),
            Frame::Fatal("literal too large")
        );
        let mut framer = Framer::new(100, 1000);
        framer.set_limits(1000, Some(10));
        let input = b"A1 APPEND INBOX ~{11+}\r\n";
        assert_eq!(
            framer.next(input),
            Frame::Spill {
                len: input.len(),
                length: 11,
                synchronizing: false
            }
        );
    }

    #[test]
    fn literals_over_the_spill_threshold_are_handed_out() {
        let mut framer = Framer::new(100, 1000);
        framer.set_limits(1000, Some(10));
        let input = b"A1 APPEND INBOX {11}\r\n";
        assert_eq!(
            framer.next(input),
            Frame::Spill {
                len: input.len(),
                length: 11,
                synchronizing: true
            }
        );
        assert_eq!(framer.next(b"A2 APPEND INBOX {10+}\r\n"), Frame::Incomplete);
        // A lower literal limit (before login) refuses what was fine before.
        let mut framer = Framer::new(100, 1000);
        framer.set_limits(4, None);
        assert_eq!(
            framer.next(b"A1 LOGIN {5}\r\n"),
            Frame::LiteralTooBig {
                tag: "A1".into(),
                len: 14
            }
        );
    }
}
