//! SMTP session: arbitrary client bytes, cut into arbitrary chunks, through `Session::step`
//! with a driver that performs every action. Never panics; a `Deliver` only follows MAIL,
//! RCPT and a complete DATA or BDAT, and carries only local recipients.
//!
//! Input layout: byte 0 = flags (config, TLS, delivery outcome), bytes 1..9 = seed of the
//! chunk sizes, the rest = the client's byte stream.
#![no_main]

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kermail::smtp::limits::Limiter;
use kermail::smtp::session::{Action, Input, Mode, Output, Recipients, Session, SessionParams};
use kermail::smtp::{ListenerKind, SmtpConfig};
use kermail::store::{BlobId, DeliveryReceipt, RecipientCheck, StoreError};
use libfuzzer_sys::fuzz_target;

/// Local domain `example.org` with users alice and bob.
struct Table;

impl Recipients for Table {
    fn check_recipient(&self, address: &str) -> RecipientCheck {
        let lower = address.to_ascii_lowercase();
        match lower.rsplit_once('@') {
            Some((user, "example.org")) if user == "alice" || user == "bob" => {
                RecipientCheck::Local
            }
            Some((_, "example.org")) => RecipientCheck::UnknownUser,
            _ => RecipientCheck::ForeignDomain,
        }
    }
}

/// Bytes the session may add in front of a message (Return-Path, Received).
const TRACE_HEADERS_MAX_BYTES: usize = 4096;

fn contains_ci(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

fn check_reply(reply: &[u8]) {
    if reply.is_empty() {
        return;
    }
    assert!(
        reply.ends_with(b"\r\n"),
        "reply not CRLF-terminated: {reply:?}"
    );
    for line in reply.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        assert!(
            line.len() >= 4
                && (b'2'..=b'5').contains(&line[0])
                && line[1].is_ascii_digit()
                && line[2].is_ascii_digit()
                && (line[3] == b' ' || line[3] == b'-' || line[3] == b'\r'),
            "malformed reply line {:?}",
            String::from_utf8_lossy(line)
        );
    }
}

struct Driver {
    session: Session<Table>,
    config: Arc<SmtpConfig>,
    /// Every byte handed to the session so far.
    seen: Vec<u8>,
    deliver_ok: bool,
    closed: bool,
    n_deliveries: usize,
}

impl Driver {
    fn perform(&mut self, mut output: Output, now: SystemTime) {
        loop {
            check_reply(&output.reply);
            let mut next = None;
            let n_deliver = output
                .actions
                .iter()
                .filter(|a| matches!(a, Action::Deliver(_)))
                .count();
            assert!(n_deliver <= 1, "two deliveries in one step");
            for action in std::mem::take(&mut output.actions) {
                match action {
                    Action::Deliver(pending) => {
                        self.check_delivery(&pending.delivery);
                        assert!(
                            pending.submitter.is_none(),
                            "an MX delivery with a submitter"
                        );
                        assert!(matches!(self.session.mode(), Mode::AwaitingDelivery));
                        self.n_deliveries += 1;
                        let result = if self.deliver_ok {
                            Ok(DeliveryReceipt {
                                blob: BlobId([0; 32]),
                                delivered: vec![(1, 1, 1)],
                            })
                        } else {
                            Err(StoreError::Unavailable("no quorum".into()))
                        };
                        next = Some(self.session.step(Input::DeliveryDone(result), now));
                    }
                    Action::StartTls => {
                        next = Some(self.session.step(Input::TlsEstablished, now));
                    }
                    Action::Authenticate(_) => panic!("a password check on the MX listener"),
                    Action::Close => self.closed = true,
                }
            }
            match next {
                Some(n) => output = n,
                None => return,
            }
        }
    }

    fn check_delivery(&self, delivery: &kermail::store::Delivery) {
        let seen = &self.seen;
        assert!(contains_ci(seen, b"MAIL FROM:"), "delivery without MAIL");
        assert!(contains_ci(seen, b"RCPT TO:"), "delivery without RCPT");
        let bdat = contains_ci(seen, b"BDAT");
        assert!(
            bdat || (contains_ci(seen, b"DATA") && seen.windows(2).any(|w| w == b"\n.")),
            "delivery without a complete DATA or BDAT"
        );
        assert!(
            !delivery.recipients.is_empty(),
            "delivery without recipients"
        );
        for rcpt in &delivery.recipients {
            assert!(
                matches!(Table.check_recipient(rcpt), RecipientCheck::Local),
                "non-local recipient delivered: {rcpt}"
            );
        }
        assert!(
            delivery.body.len() <= self.config.max_message_size_bytes + TRACE_HEADERS_MAX_BYTES,
            "message over the size limit: {}",
            delivery.body.len()
        );
        assert!(
            self.n_deliveries < seen.len(),
            "more deliveries than input bytes"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let flags = data[0];
    let mut seed = u64::from_le_bytes(data[1..9].try_into().unwrap_or([0; 8])) | 1;
    let stream = &data[9..];

    let mut config = SmtpConfig::default();
    if flags & 1 != 0 {
        // Small limits so that the fuzzer reaches them.
        config.max_command_line_length_bytes = 64;
        config.max_message_size_bytes = 256;
        config.max_recipients_per_message = 2;
        config.max_errors_per_session = 3;
    }
    let config = Arc::new(config);
    let params = SessionParams {
        config: config.clone(),
        hostname: Arc::from("mx.example.org"),
        client_ip: IpAddr::from([192, 0, 2, 7]),
        tls_available: flags & 2 != 0,
        id_seed: 7,
        kind: ListenerKind::Mx,
        limits: Arc::new(Limiter::new()),
        spool_dir: None,
    };
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let mut driver = Driver {
        session: Session::new(params, Table),
        config,
        seen: Vec::new(),
        deliver_ok: flags & 4 == 0,
        closed: false,
        n_deliveries: 0,
    };
    let out = driver.session.step(Input::Connected, now);
    driver.perform(out, now);

    let max_chunk = 1 + ((flags >> 3) as usize) * 8;
    let mut rest = stream;
    while !rest.is_empty() && !driver.closed {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let n = 1 + (seed as usize) % max_chunk;
        let (chunk, tail) = rest.split_at(n.min(rest.len()));
        rest = tail;
        driver.seen.extend_from_slice(chunk);
        let out = driver.session.step(Input::Bytes(chunk), now);
        driver.perform(out, now);
    }
    let end = match flags >> 6 {
        0 => Input::Closed,
        1 => Input::Timeout,
        _ => Input::Shutdown,
    };
    let out = driver.session.step(end, now);
    driver.perform(out, now);
});
