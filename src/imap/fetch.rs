//! PLACEHOLDER for the imapmsg branch (message parsing for FETCH). Only the contract's
//! signatures with crude bodies, so the imap branch builds until that branch is merged.

use std::num::NonZeroU32;

use imap_codec::imap_types::body::{BasicFields, Body, BodyStructure, SpecificFields};
use imap_codec::imap_types::core::{IString, NString};
use imap_codec::imap_types::envelope::Envelope;
use imap_codec::imap_types::fetch::Section;

pub struct ParsedMessage<'a> {
    raw: &'a [u8],
}

impl<'a> ParsedMessage<'a> {
    pub fn parse(raw: &'a [u8]) -> ParsedMessage<'a> {
        ParsedMessage { raw }
    }

    pub fn envelope(&self) -> Envelope<'static> {
        Envelope {
            date: NString(None),
            subject: NString(None),
            from: Vec::new(),
            sender: Vec::new(),
            reply_to: Vec::new(),
            to: Vec::new(),
            cc: Vec::new(),
            bcc: Vec::new(),
            in_reply_to: NString(None),
            message_id: NString(None),
        }
    }

    pub fn body_structure(&self, _extended: bool) -> BodyStructure<'static> {
        let text = |s: &'static str| {
            IString::try_from(s).unwrap_or(IString::Quoted(
                "x".try_into().unwrap_or_else(|_| unreachable!()),
            ))
        };
        BodyStructure::Single {
            body: Body {
                basic: BasicFields {
                    parameter_list: Vec::new(),
                    id: NString(None),
                    description: NString(None),
                    content_transfer_encoding: text("7BIT"),
                    size: self.raw.len() as u32,
                },
                specific: SpecificFields::Basic {
                    r#type: text("TEXT"),
                    subtype: text("PLAIN"),
                },
            },
            extension_data: None,
        }
    }

    pub fn section(&self, section: Option<&Section<'_>>) -> Vec<u8> {
        match section {
            None => self.raw.to_vec(),
            Some(_) => Vec::new(),
        }
    }
}

pub fn apply_partial(bytes: &[u8], partial: Option<(u32, NonZeroU32)>) -> &[u8] {
    match partial {
        None => bytes,
        Some((origin, length)) => {
            let start = (origin as usize).min(bytes.len());
            let end = start.saturating_add(length.get() as usize).min(bytes.len());
            &bytes[start..end]
        }
    }
}
