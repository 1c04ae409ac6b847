//! Message rendering: arbitrary bytes as a stored message through `ParsedMessage` (ENVELOPE,
//! BODY, BODYSTRUCTURE, body sections whose part paths come from the input) and SEARCH keys.
//! Never panics; the structures encode into responses that imap-codec reads back to the same
//! bytes (what a client would parse); sections stay inside the message.
//!
//! Input layout: bytes 0..4 = a part path and a partial range, the rest = the message.
#![no_main]

use std::num::NonZeroU32;

use imap_codec::decode::Decoder;
use imap_codec::encode::Encoder;
use imap_codec::imap_types::command::CommandBody;
use imap_codec::imap_types::core::{AString, NonEmptyVec};
use imap_codec::imap_types::fetch::{MessageDataItem, Part, Section};
use imap_codec::imap_types::response::{Data, Response};
use imap_codec::{CommandCodec, ResponseCodec};
use kermail::imap::fetch::{apply_partial, ParsedMessage};
use kermail::imap::search::{matches, needs_body, SearchInput};
use kermail::store::{BlobId, FlagSet, MessageMeta};
use libfuzzer_sys::fuzz_target;

/// Encodes one FETCH item as the session does, and checks a client can read it back.
fn encode_and_reread(item: MessageDataItem<'static>) {
    let response = Response::Data(Data::Fetch {
        seq: NonZeroU32::MIN,
        items: NonEmptyVec::from(item),
    });
    let encoded = ResponseCodec::default().encode(&response).dump();
    assert!(encoded.starts_with(b"* 1 FETCH (") && encoded.ends_with(b")\r\n"));
    match ResponseCodec::default().decode(&encoded) {
        Ok((rest, decoded)) => {
            assert!(rest.is_empty(), "trailing bytes after the response");
            let again = ResponseCodec::default().encode(&decoded).dump();
            assert_eq!(
                String::from_utf8_lossy(&again),
                String::from_utf8_lossy(&encoded),
                "response changes when read back"
            );
        }
        Err(error) => panic!(
            "a client cannot parse our response ({error:?}): {:?}",
            String::from_utf8_lossy(&encoded)
        ),
    }
}

/// SEARCH commands, as the session receives them; the needle comes from the input.
fn search_commands(needle: &[u8]) -> Vec<Vec<u8>> {
    let mut texts: Vec<Vec<u8>> = [
        "SUBJECT hello",
        "FROM carol",
        "TO \"example.org\"",
        "BODY caf\u{e9}",
        "TEXT hello",
        "HEADER Content-Type multipart",
        "OR SENTBEFORE 1-Jan-2000 SENTSINCE 1-Jan-2020",
        "SENTON 14-Nov-2023",
        "NOT CC x LARGER 10",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    for key in ["BODY", "SUBJECT", "HEADER X-Fuzz"] {
        let mut text = format!("{key} {{{}+}}\r\n", needle.len()).into_bytes();
        text.extend_from_slice(needle);
        texts.push(text);
    }
    texts
        .into_iter()
        .map(|text| {
            let mut command = b"A SEARCH CHARSET UTF-8 ".to_vec();
            command.extend_from_slice(&text);
            command.extend_from_slice(b"\r\n");
            command
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let raw = &data[4..];
    let message = ParsedMessage::parse(raw);
    assert_eq!(message.raw(), raw);

    let envelope = message.envelope();
    encode_and_reread(MessageDataItem::Envelope(envelope));
    encode_and_reread(MessageDataItem::Body(message.body_structure(false)));
    encode_and_reread(MessageDataItem::BodyStructure(message.body_structure(true)));

    // A part path of one to three levels, each 1..=4, from the first bytes.
    let depth = 1 + (data[0] % 3) as usize;
    let path: Vec<NonZeroU32> = (0..depth)
        .map(|i| NonZeroU32::new(1 + u32::from(data[1 + i] % 4)).unwrap_or(NonZeroU32::MIN))
        .collect();
    let part = Part(NonEmptyVec::unvalidated(path));
    let names = || {
        NonEmptyVec::unvalidated(vec![
            AString::try_from("SUBJECT").expect("atom"),
            AString::try_from("Content-Type").expect("atom"),
        ])
    };
    let sections = [
        Section::Part(part.clone()),
        Section::Header(None),
        Section::Header(Some(part.clone())),
        Section::HeaderFields(None, names()),
        Section::HeaderFields(Some(part.clone()), names()),
        Section::HeaderFieldsNot(None, names()),
        Section::HeaderFieldsNot(Some(part.clone()), names()),
        Section::Text(None),
        Section::Text(Some(part.clone())),
        Section::Mime(part),
    ];
    assert_eq!(message.section(None), raw);
    for section in &sections {
        let bytes = message.section(Some(section));
        if !matches!(
            section,
            Section::HeaderFields(..) | Section::HeaderFieldsNot(..)
        ) {
            assert!(
                bytes.len() <= raw.len(),
                "{section:?} is longer than the message"
            );
        }
        let start = u32::from(data[0]);
        let length = NonZeroU32::new(1 + u32::from(data[3])).unwrap_or(NonZeroU32::MIN);
        let partial = apply_partial(&bytes, Some((start, length)));
        assert!(partial.len() <= length.get() as usize);
    }
    let _ = message.text_parts();

    let meta = MessageMeta {
        uid: 7,
        blob: BlobId([0; 32]),
        size: raw.len() as u32,
        internal_date: 1_700_000_000,
        internal_date_offset_min: 0,
        flags: FlagSet::new(),
        modseq: 1,
    };
    let needle = &raw[..raw.len().min(1 + usize::from(data[2] % 16))];
    for command in search_commands(needle) {
        let Ok((_, parsed)) = CommandCodec::default().decode(&command) else {
            continue;
        };
        let CommandBody::Search { criteria: key, .. } = parsed.body else {
            continue;
        };
        let input = SearchInput {
            seq: 1,
            meta: &meta,
            raw: Some(raw),
            last_seq: 1,
            last_uid: 7,
            recent: false,
            now: 0,
        };
        let found = matches(&key, &input);
        if !needs_body(&key) {
            let without = SearchInput { raw: None, ..input };
            assert_eq!(
                found,
                matches(&key, &without),
                "a metadata key read the body"
            );
        }
    }
});
