//! IMAP framing: the client's byte stream, in arbitrary chunks, through `Framer::next` the way
//! the session uses it. Never panics; frames lie inside the buffer and end at a newline; the
//! buffer stays bounded; and the frames do not depend on how the stream was cut.
//!
//! Input layout: byte 0 = limits, bytes 1..9 = seed of the chunk sizes, the rest = stream.
#![no_main]

use kermail::imap::framing::{first_token, take_line, Frame, Framer};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq, Eq)]
enum Event {
    Command(Vec<u8>),
    Continuation,
    TooBig(String, usize),
    Fatal(&'static str),
}

/// Feeds `chunks` to a framer; returns what it said (without `Incomplete`).
fn frame<'a>(
    chunks: impl Iterator<Item = &'a [u8]>,
    max_line: usize,
    max_literal: u32,
) -> Vec<Event> {
    let mut framer = Framer::new(max_line, max_literal);
    let mut buffer: Vec<u8> = Vec::new();
    let mut events = Vec::new();
    // Bytes the framer may hold: one command (literal and lines) plus the last chunk.
    let bound = max_literal as usize + 5 * max_line + 2;
    for chunk in chunks {
        buffer.extend_from_slice(chunk);
        loop {
            match framer.next(&buffer) {
                Frame::Incomplete => {
                    assert!(
                        buffer.len() <= bound + chunk.len(),
                        "framer buffers {} bytes (limit {bound})",
                        buffer.len()
                    );
                    break;
                }
                Frame::Command { len } => {
                    assert!(len > 0 && len <= buffer.len(), "command outside the buffer");
                    assert_eq!(buffer[len - 1], b'\n', "command does not end a line");
                    assert!(len <= bound, "command of {len} bytes over {bound}");
                    events.push(Event::Command(buffer.drain(..len).collect()));
                }
                Frame::ContinuationNeeded => events.push(Event::Continuation),
                Frame::LiteralTooBig { tag, len } => {
                    assert!(len > 0 && len <= buffer.len(), "refusal outside the buffer");
                    assert_eq!(tag, first_token(&buffer));
                    buffer.drain(..len);
                    events.push(Event::TooBig(tag, len));
                }
                Frame::Spill { .. } => unreachable!("no spill threshold was set"),
                Frame::Fatal(why) => {
                    events.push(Event::Fatal(why));
                    return events;
                }
            }
        }
    }
    events
}

/// The lines `take_line` yields from `chunks`; `Err(())` last if it refused one.
fn lines<'a>(chunks: impl Iterator<Item = &'a [u8]>, max_line: usize) -> Vec<Result<Vec<u8>, ()>> {
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

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let flags = data[0];
    let mut seed = u64::from_le_bytes(data[1..9].try_into().unwrap_or([0; 8])) | 1;
    let stream = &data[9..];
    let max_line = [16, 64, 1024, 64 * 1024][(flags & 3) as usize];
    let max_literal = [0, 8, 100, 4096][((flags >> 2) & 3) as usize];
    let max_chunk = 1 + ((flags >> 4) as usize) * 4;

    let mut chunks = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let n = 1 + (seed as usize) % max_chunk;
        let (chunk, tail) = rest.split_at(n.min(rest.len()));
        chunks.push(chunk);
        rest = tail;
    }
    let chunked = frame(chunks.iter().copied(), max_line, max_literal);
    let whole = frame(std::iter::once(stream), max_line, max_literal);
    assert_eq!(chunked, whole, "frames depend on how the stream was cut");

    // The plain-line reader of AUTHENTICATE and IDLE: bounded lines, and the same verdicts
    // however the stream was cut.
    let chunked = lines(chunks.iter().copied(), max_line);
    let whole = lines(std::iter::once(stream), max_line);
    assert_eq!(chunked, whole, "lines depend on how the stream was cut");
    for line in whole.iter().flatten() {
        assert!(!line.contains(&b'\n'));
        assert!(
            line.len() <= max_line,
            "line of {} bytes over {max_line}",
            line.len()
        );
    }
});
