//! RFC 9208 QUOTA: GETQUOTAROOT, GETQUOTA, and SETQUOTA (refused: limits are set by the
//! administrator with `kermail user quota`).
//!
//! Every account has one quota root, named `""`, governing all its mailboxes, with the
//! resources STORAGE (KiB of the messages' RFC822.SIZE: usage rounded up, so that a non-empty
//! account never shows 0, the limit rounded down) and MESSAGE (messages over all mailboxes). An
//! unlimited resource is left out of the QUOTA response.

use std::io::Write;

use super::response::{astring, tagged};
use super::session::Session;
use crate::store::QuotaReport;

/// The name of every account's one quota root.
const ROOT: &str = "";

/// `* QUOTA "" (STORAGE used limit MESSAGE used limit)`.
fn write_quota(out: &mut Vec<u8>, report: &QuotaReport) {
    let mut resources = Vec::new();
    if let Some(limit) = report.limits.storage_bytes {
        resources.push(format!(
            "STORAGE {} {}",
            report.usage.bytes.div_ceil(1024),
            limit / 1024
        ));
    }
    if let Some(limit) = report.limits.messages {
        resources.push(format!("MESSAGE {} {limit}", report.usage.messages));
    }
    out.extend_from_slice(b"* QUOTA ");
    astring(out, ROOT.as_bytes());
    let _ = write!(out, " ({})\r\n", resources.join(" "));
}

impl Session {
    pub(super) fn get_quota_root(&mut self, tag: &str, name: Option<String>, out: &mut Vec<u8>) {
        let Some(account) = self.account() else {
            return;
        };
        let Some(view) = name.and_then(|name| self.store.mailbox_by_name(account, &name)) else {
            tagged(out, tag, "NO", Some("NONEXISTENT"), "no such mailbox");
            return;
        };
        let Some(report) = self.store.quota(account) else {
            tagged(out, tag, "NO", Some("NONEXISTENT"), "no such account");
            return;
        };
        out.extend_from_slice(b"* QUOTAROOT ");
        astring(out, view.name.as_bytes());
        out.push(b' ');
        astring(out, ROOT.as_bytes());
        out.extend_from_slice(b"\r\n");
        write_quota(out, &report);
        tagged(out, tag, "OK", None, "GETQUOTAROOT completed");
    }

    pub(super) fn get_quota(&mut self, tag: &str, root: &[u8], out: &mut Vec<u8>) {
        let Some(account) = self.account() else {
            return;
        };
        if root != ROOT.as_bytes() {
            tagged(out, tag, "NO", Some("NONEXISTENT"), "no such quota root");
            return;
        }
        let Some(report) = self.store.quota(account) else {
            tagged(out, tag, "NO", Some("NONEXISTENT"), "no such account");
            return;
        };
        write_quota(out, &report);
        tagged(out, tag, "OK", None, "GETQUOTA completed");
    }

    pub(super) fn set_quota(&mut self, tag: &str, out: &mut Vec<u8>) {
        tagged(
            out,
            tag,
            "NO",
            Some("NOPERM"),
            "quotas are set by the administrator",
        );
    }
}
