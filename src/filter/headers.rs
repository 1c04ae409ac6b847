//! Header-section surgery for inbound checks: finding and removing `Authentication-Results`
//! fields that claim to come from us (RFC 8601 section 5: a receiver MUST remove or rename
//! such fields it did not add, or downstream readers would trust a forgery).

/// The end of the header section of `message`: the offset just past the empty line (CRLF
/// CRLF or LF LF), or the whole length when there is no body.
pub fn header_section_end(message: &[u8]) -> usize {
    let mut offset = 0;
    while offset < message.len() {
        let line_end = match memchr::memchr(b'\n', &message[offset..]) {
            Some(position) => offset + position + 1,
            None => return message.len(),
        };
        let line = &message[offset..line_end];
        if line == b"\r\n" || line == b"\n" {
            return line_end;
        }
        offset = line_end;
    }
    message.len()
}

/// The authserv-id of an `Authentication-Results` value: its first token, after comments
/// and white space, up to `;`, white space or a comment.
fn authserv_id(value: &[u8]) -> &[u8] {
    let mut index = 0;
    let mut depth = 0usize;
    // Skip CFWS: white space, folding and (nested) comments.
    while index < value.len() {
        match value[index] {
            b'(' => depth += 1,
            b')' if depth > 0 => depth -= 1,
            b' ' | b'\t' | b'\r' | b'\n' => {}
            _ if depth > 0 => {}
            _ => break,
        }
        index += 1;
    }
    let start = index;
    while index < value.len() && !matches!(value[index], b';' | b' ' | b'\t' | b'\r' | b'\n' | b'(')
    {
        index += 1;
    }
    &value[start..index]
}

/// `message` with every `Authentication-Results` field whose authserv-id is `our_id`
/// (case-insensitively) removed from its header section; None when there is none. Only the
/// header section is read (`message` may be just the in-memory head of a larger body, as
/// long as the header section ends within it).
pub fn strip_forged_results(message: &[u8], our_id: &str) -> Option<Vec<u8>> {
    const NAME: &[u8] = b"authentication-results:";
    let end = header_section_end(message);
    let mut kept = Vec::with_capacity(message.len());
    let mut removed = false;
    let mut offset = 0;
    while offset < end {
        // One field: its first line and the continuation lines (starting with WSP).
        let mut field_end = offset;
        loop {
            field_end = match memchr::memchr(b'\n', &message[field_end..end]) {
                Some(position) => field_end + position + 1,
                None => end,
            };
            if field_end >= end || !matches!(message[field_end], b' ' | b'\t') {
                break;
            }
        }
        let field = &message[offset..field_end];
        let is_ours = field.len() > NAME.len()
            && field[..NAME.len()].eq_ignore_ascii_case(NAME)
            && authserv_id(&field[NAME.len()..]).eq_ignore_ascii_case(our_id.as_bytes());
        if is_ours {
            removed = true;
        } else {
            kept.extend_from_slice(field);
        }
        offset = field_end;
    }
    if !removed {
        return None;
    }
    kept.extend_from_slice(&message[end..]);
    Some(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Option<&str>) {
        let output = strip_forged_results(input.as_bytes(), "mx.kermail.test");
        assert_eq!(
            output.as_deref().map(|o| std::str::from_utf8(o).unwrap()),
            expected,
            "input: {input:?}"
        );
    }

    #[test]
    fn forged_fields_with_our_id_are_removed_and_others_kept() {
        check(
            "Authentication-Results: mx.kermail.test; dkim=pass\r\nSubject: x\r\n\r\nbody\r\n",
            Some("Subject: x\r\n\r\nbody\r\n"),
        );
        // Folded, upper case, with a leading comment and a version.
        check(
            "From: a@b\r\nAUTHENTICATION-RESULTS: (forged) MX.Kermail.Test 1;\r\n\tspf=pass\r\n smtp.mailfrom=a@b\r\nTo: c@d\r\n\r\nAuthentication-Results: mx.kermail.test; in the body\r\n",
            Some("From: a@b\r\nTo: c@d\r\n\r\nAuthentication-Results: mx.kermail.test; in the body\r\n"),
        );
        // Another receiver's results stay; so does a look-alike id.
        check(
            "Authentication-Results: mx.other.example; dkim=pass\r\nAuthentication-Results: mx.kermail.test.evil; spf=pass\r\n\r\n",
            None,
        );
        // No body, LF line ends.
        check(
            "Authentication-Results: mx.kermail.test;spf=pass\nSubject: y\n",
            Some("Subject: y\n"),
        );
    }

    #[test]
    fn the_header_section_ends_at_the_first_empty_line() {
        assert_eq!(header_section_end(b"A: b\r\n\r\nbody"), 8);
        assert_eq!(header_section_end(b"A: b\n\nbody"), 6);
        assert_eq!(header_section_end(b"A: b\r\n"), 6);
        assert_eq!(header_section_end(b""), 0);
    }
}
