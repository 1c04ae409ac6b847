//! The network-facing parsers of BINARY and CATENATE: arbitrary bytes as a CATENATE list, an
//! IMAP URL, an APPEND (`multiappend::split`, literal8 and CATENATE data), a FETCH with
//! BINARY items, and as a message whose parts are decoded (`binary_content`) and named by
//! URL sections. Never panics; what parses keeps its promises (non-zero UIDs, no `]` in a
//! section, literals inside the command, BINARY positions in order, decoded base64 no longer
//! than its input).
//!
//! Input layout: byte 0 = a part path selector, the rest = the text under test, also used as
//! the message.
#![no_main]

use std::num::NonZeroU32;

use imap_codec::imap_types::core::NonEmptyVec;
use imap_codec::imap_types::fetch::{Part, Section};
use kermail::imap::binary::{binary_content, decode, rewrite_fetch};
use kermail::imap::catenate::{parse_catenate, parse_url, section_content, CatPart};
use kermail::imap::fetch::ParsedMessage;
use kermail::imap::multiappend::{split, Content};
use libfuzzer_sys::fuzz_target;

fn prefixed(prefix: &[u8], text: &[u8]) -> Vec<u8> {
    let mut bytes = prefix.to_vec();
    bytes.extend_from_slice(text);
    bytes
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, text)) = data.split_first() else {
        return;
    };

    // CATENATE lists: every TEXT part lies inside the command, every URL is bounded.
    for command in [
        prefixed(b"CATENATE (", text),
        prefixed(b"CATENATE (TEXT ", text),
    ] {
        if let Ok(Some((parts, end))) = parse_catenate(&command, 0, None) {
            assert!(end <= command.len());
            for part in parts {
                match part {
                    CatPart::Text { bytes, .. } => assert!(bytes.len() <= command.len()),
                    CatPart::Url(url) => assert!(!url.is_empty() && url.len() <= 1024),
                }
            }
        }
    }

    // URLs, and the sections they name read from the input as a message.
    for url in [text.to_vec(), prefixed(b"/INBOX/;UID=1/;SECTION=", text)] {
        if let Ok(url) = parse_url(&url) {
            assert!(url.uid > 0 && !url.mailbox.is_empty());
            if let Some(section) = &url.section {
                assert!(!section.contains(']') && !section.contains('\r'));
                if let Ok(bytes) = section_content(text, Some(section)) {
                    if !section.contains("FIELDS") {
                        assert!(bytes.len() <= text.len());
                    }
                }
            }
        }
    }

    // APPEND with literal8 or CATENATE data: each part is a complete one-message command.
    for command in [
        prefixed(b"A APPEND INBOX ", text),
        prefixed(b"A APPEND ", text),
    ] {
        if let Ok(Some(parts)) = split(&command, None) {
            for part in parts {
                assert!(part.command.ends_with(b"\r\n"));
                if let Content::Literal8(bytes) = &part.content {
                    assert!(bytes.len() <= command.len());
                }
            }
        }
    }

    // FETCH with BINARY items: positions point into the rewritten item list.
    for command in [
        prefixed(b"A FETCH 1 (", text),
        prefixed(b"A UID FETCH 1:* ", text),
    ] {
        if let Ok(Some((rewritten, items))) = rewrite_fetch(&command) {
            assert!(!items.is_empty() && rewritten.starts_with(b"A "));
            assert!(items.windows(2).all(|pair| pair[0].0 < pair[1].0));
        }
    }

    // Transfer decodings of the input, and the BINARY content of its parts.
    for cte in [&b"base64"[..], b"quoted-printable", b"8bit", b"x-unknown"] {
        if let Ok(decoded) = decode(cte, text) {
            if cte == b"base64" {
                assert!(decoded.len() <= text.len() / 4 * 3 + 3);
            }
        }
    }
    let message = ParsedMessage::parse(text);
    let depth = 1 + (selector % 3) as usize;
    let path: Vec<NonZeroU32> = (0..depth)
        .map(|i| {
            NonZeroU32::new(1 + u32::from((selector >> (2 * i)) % 4)).unwrap_or(NonZeroU32::MIN)
        })
        .collect();
    let section = Section::Part(Part(NonEmptyVec::unvalidated(path)));
    let _ = binary_content(&message, Some(&section));
    assert_eq!(binary_content(&message, None).ok().as_deref(), Some(text));
});
