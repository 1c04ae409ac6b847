//! RFC 3464 delivery status notifications, built with mail-builder.

use mail_builder::headers::content_type::ContentType;
use mail_builder::mime::MimePart;
use mail_builder::MessageBuilder;

/// Upper bound on the original header block copied into the DSN.
pub const MAX_ORIGINAL_HEADERS_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsnAction {
    Failed,
    Delayed,
}

impl DsnAction {
    fn as_str(self) -> &'static str {
        match self {
            DsnAction::Failed => "failed",
            DsnAction::Delayed => "delayed",
        }
    }
}

/// One recipient's entry in the report.
#[derive(Debug, Clone)]
pub struct DsnRecipient {
    pub address: String,
    pub action: DsnAction,
    /// Enhanced status code, e.g. "5.1.1" or "4.4.1".
    pub status: String,
    /// The remote reply, e.g. "550 5.1.1 no such user"; none when there was no reply.
    pub diagnostic: Option<String>,
    pub remote_mta: Option<String>,
}

/// Everything a DSN needs; times are chosen by the caller.
#[derive(Debug, Clone)]
pub struct DsnInput<'a> {
    /// This node's public host name (Reporting-MTA, and the From: domain's postmaster).
    pub reporting_mta: &'a str,
    /// The envelope sender the report goes to.
    pub to: &'a str,
    pub recipients: &'a [DsnRecipient],
    /// The original message; only its header block is copied.
    pub original_message: &'a [u8],
    pub date_unix_secs: u64,
    pub message_id: &'a str,
}

fn original_headers(message: &[u8]) -> String {
    let end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 2)
        .or_else(|| message.windows(2).position(|w| w == b"\n\n").map(|p| p + 1))
        .unwrap_or(message.len());
    let end = end.min(MAX_ORIGINAL_HEADERS_BYTES);
    String::from_utf8_lossy(&message[..end]).into_owned()
}

/// Builds the DSN message (multipart/report; report-type=delivery-status).
pub fn build_dsn(input: &DsnInput<'_>) -> std::io::Result<Vec<u8>> {
    let any_failed = input
        .recipients
        .iter()
        .any(|r| r.action == DsnAction::Failed);
    let subject = if any_failed {
        "Undelivered Mail Returned to Sender"
    } else {
        "Delayed Mail (still being retried)"
    };
    let mut human = String::from(if any_failed {
        "Your message could not be delivered to the following recipients:\r\n\r\n"
    } else {
        "Your message has not been delivered yet; delivery will be retried:\r\n\r\n"
    });
    let mut status = format!("Reporting-MTA: dns; {}\r\n", input.reporting_mta);
    for r in input.recipients {
        human.push_str(&format!(
            "  {}: {}\r\n",
            r.address,
            r.diagnostic.as_deref().unwrap_or(r.status.as_str())
        ));
        status.push_str(&format!(
            "\r\nFinal-Recipient: rfc822; {}\r\nAction: {}\r\nStatus: {}\r\n",
            r.address,
            r.action.as_str(),
            r.status
        ));
        if let Some(mta) = &r.remote_mta {
            status.push_str(&format!("Remote-MTA: dns; {mta}\r\n"));
        }
        if let Some(diagnostic) = &r.diagnostic {
            status.push_str(&format!("Diagnostic-Code: smtp; {diagnostic}\r\n"));
        }
    }
    let report = MimePart::new(
        ContentType::new("multipart/report").attribute("report-type", "delivery-status"),
        vec![
            MimePart::new("text/plain", human),
            MimePart::new(ContentType::new("message/delivery-status"), status),
            MimePart::new(
                ContentType::new("text/rfc822-headers"),
                original_headers(input.original_message),
            ),
        ],
    );
    MessageBuilder::new()
        .from((
            "Mail Delivery System".to_owned(),
            format!("MAILER-DAEMON@{}", input.reporting_mta),
        ))
        .to(input.to.to_owned())
        .subject(subject)
        .date(input.date_unix_secs)
        .message_id(input.message_id.to_owned())
        .header(
            "Auto-Submitted",
            mail_builder::headers::raw::Raw::new("auto-replied"),
        )
        .body(report)
        .write_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_parser::MessageParser;

    #[test]
    fn dsn_parses_back_with_per_recipient_fields() {
        let original =
            b"From: alice@example.test\r\nSubject: hi\r\nMessage-ID: <o@x>\r\n\r\nsecret body\r\n";
        let recipients = [
            DsnRecipient {
                address: "bob@remote.test".into(),
                action: DsnAction::Failed,
                status: "5.1.1".into(),
                diagnostic: Some("550 5.1.1 no such user".into()),
                remote_mta: Some("mx.remote.test".into()),
            },
            DsnRecipient {
                address: "carol@remote.test".into(),
                action: DsnAction::Delayed,
                status: "4.4.1".into(),
                diagnostic: None,
                remote_mta: None,
            },
        ];
        let raw = build_dsn(&DsnInput {
            reporting_mta: "mx1.example.test",
            to: "alice@example.test",
            recipients: &recipients,
            original_message: original,
            date_unix_secs: 1_800_000_000,
            message_id: "dsn1@mx1.example.test",
        })
        .unwrap();
        let message = MessageParser::new().parse(&raw).unwrap();
        use mail_parser::MimeHeaders;
        let content_type = message.root_part().content_type().unwrap();
        assert_eq!(content_type.ctype(), "multipart");
        assert_eq!(content_type.subtype(), Some("report"));
        assert_eq!(
            content_type.attribute("report-type"),
            Some("delivery-status")
        );
        assert_eq!(message.parts.len(), 4, "root plus three parts");
        let text = String::from_utf8_lossy(&raw);
        for needle in [
            "Reporting-MTA: dns; mx1.example.test",
            "Final-Recipient: rfc822; bob@remote.test",
            "Action: failed",
            "Status: 5.1.1",
            "Diagnostic-Code: smtp; 550 5.1.1 no such user",
            "Final-Recipient: rfc822; carol@remote.test",
            "Action: delayed",
            "Status: 4.4.1",
            "text/rfc822-headers",
            "Subject: hi",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        assert!(!text.contains("secret body"), "the body is not copied");
        assert_eq!(
            message.subject(),
            Some("Undelivered Mail Returned to Sender")
        );
    }
}
