//! A cursor over a command's raw bytes, for the extensions that cut or rewrite parts of a
//! command before imap-codec decodes the rest (`condstore`, `savedate`): words, quoted
//! strings, literals and nested lists skipped as IMAP frames them, never past the line.

/// Most bytes of a modifier or parameter list `Cursor::skip_list` looks at.
pub(super) const MAX_LIST_BYTES: usize = 64 * 1024;

/// A cursor over a command's bytes.
pub(super) struct Cursor<'a> {
    pub bytes: &'a [u8],
    pub pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    pub fn space(&mut self) -> bool {
        if self.peek() == Some(b' ') {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// An atom-like word up to a space, paren or line end.
    pub fn word(&mut self) -> &'a [u8] {
        let start = self.pos;
        while let Some(b) = self.peek() {
            if matches!(b, b' ' | b'(' | b')' | b'\r' | b'\n') {
                break;
            }
            self.pos += 1;
        }
        &self.bytes[start..self.pos]
    }

    /// Skips a quoted string (at `"`) and returns its inside (escapes left as they are);
    /// `None` if it does not end on this line.
    pub fn quoted(&mut self) -> Option<&'a [u8]> {
        let start = self.pos + 1;
        self.pos += 1;
        while let Some(b) = self.peek() {
            self.pos += 1;
            match b {
                b'\\' => self.pos += 1,
                b'"' => return self.bytes.get(start..self.pos - 1),
                b'\r' | b'\n' => return None,
                _ => {}
            }
        }
        None
    }

    /// Skips a quoted string (at `"`); false if it does not end.
    pub fn skip_quoted(&mut self) -> bool {
        self.quoted().is_some()
    }

    /// Skips a literal (at `{`) with its bytes; false if malformed.
    pub fn skip_literal(&mut self) -> bool {
        let Some(close) = self.bytes[self.pos..].iter().position(|&b| b == b'}') else {
            return false;
        };
        let spec = &self.bytes[self.pos + 1..self.pos + close];
        let spec = spec.strip_suffix(b"+").unwrap_or(spec);
        let Some(len) = std::str::from_utf8(spec)
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
        else {
            return false;
        };
        self.pos += close + 1;
        if self.bytes[self.pos..].starts_with(b"\r\n") {
            self.pos += 2;
        } else if self.bytes[self.pos..].starts_with(b"\n") {
            self.pos += 1;
        } else {
            return false;
        }
        self.pos = self.pos.saturating_add(len);
        self.pos <= self.bytes.len()
    }

    /// Skips one argument: quoted string, literal, parenthesized list (nested, with quoted
    /// strings) or word (which may hold `[...]` with spaces, as `BODY[HEADER.FIELDS (A)]`).
    pub fn skip_argument(&mut self) -> bool {
        match self.peek() {
            Some(b'"') => self.skip_quoted(),
            Some(b'{') => self.skip_literal(),
            Some(b'(') => self.skip_list(),
            Some(_) => {
                let start = self.pos;
                let mut brackets = 0usize;
                while let Some(b) = self.peek() {
                    match b {
                        b'[' => brackets += 1,
                        b']' => brackets = brackets.saturating_sub(1),
                        b'"' if brackets > 0 => {
                            if !self.skip_quoted() {
                                return false;
                            }
                            continue;
                        }
                        b' ' | b'(' | b')' if brackets > 0 => {}
                        b' ' | b'(' | b')' | b'\r' | b'\n' => break,
                        _ => {}
                    }
                    self.pos += 1;
                }
                self.pos > start
            }
            None => false,
        }
    }

    /// Skips a parenthesized list (at `(`).
    pub fn skip_list(&mut self) -> bool {
        let start = self.pos;
        self.pos += 1;
        loop {
            if self.pos - start > MAX_LIST_BYTES {
                return false;
            }
            match self.peek() {
                None | Some(b'\r') | Some(b'\n') => return false,
                Some(b')') => {
                    self.pos += 1;
                    return true;
                }
                Some(b' ') => self.pos += 1,
                Some(_) => {
                    if !self.skip_argument() {
                        return false;
                    }
                }
            }
        }
    }
}

/// The line end of a command (`\r\n` or `\n`), as an index.
pub(super) fn line_end(bytes: &[u8]) -> usize {
    let mut end = bytes.len();
    if bytes[..end].ends_with(b"\n") {
        end -= 1;
    }
    if bytes[..end].ends_with(b"\r") {
        end -= 1;
    }
    end
}

/// Search keys followed by one string argument (a key name there is that argument).
const ONE_STRING_KEYS: [&[u8]; 10] = [
    b"BCC",
    b"BODY",
    b"CC",
    b"FROM",
    b"SUBJECT",
    b"TEXT",
    b"TO",
    b"KEYWORD",
    b"UNKEYWORD",
    b"CHARSET",
];

/// Walks the search keys of a command from `cursor` up to `end` and calls `on_key` with each
/// key word (uppercased) and where it starts; the arguments of FROM, HEADER and the like are
/// skipped, so a key name given as an argument is not taken for a key. `on_key` may read the
/// key's own arguments from the cursor. `Ok(false)` when the command is malformed (the walk
/// stops there); an error of `on_key` ends the walk with it.
pub(super) fn walk_search_keys<E>(
    cursor: &mut Cursor<'_>,
    end: usize,
    mut on_key: impl FnMut(&[u8], usize, &mut Cursor<'_>) -> Result<(), E>,
) -> Result<bool, E> {
    // Arguments still to skip after the last key (1 after FROM, 2 after HEADER).
    let mut skip_args = 0usize;
    while cursor.pos < end {
        match cursor.peek() {
            Some(b' ') | Some(b'(') | Some(b')') => {
                cursor.pos += 1;
                continue;
            }
            Some(b'"') | Some(b'{') => {
                if !cursor.skip_argument() {
                    return Ok(false);
                }
                skip_args = skip_args.saturating_sub(1);
                continue;
            }
            _ => {}
        }
        let start = cursor.pos;
        let word = cursor.word();
        if word.is_empty() {
            return Ok(false);
        }
        if skip_args > 0 {
            skip_args -= 1;
            continue;
        }
        let upper = word.to_ascii_uppercase();
        if ONE_STRING_KEYS.contains(&upper.as_slice()) {
            skip_args = 1;
        } else if upper == b"HEADER" {
            skip_args = 2;
        } else {
            on_key(&upper, start, cursor)?;
        }
    }
    Ok(true)
}
