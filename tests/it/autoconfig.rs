//! Mail client autoconfiguration (issue 13, point 5) through curl against a real node:
//! Thunderbird's config-v1.1.xml over plain HTTP (by the `autoconfig.DOMAIN` host) and over
//! HTTPS with the node's certificate (`/.well-known/...?emailaddress=`), Microsoft's
//! autodiscover POST, 404 for a domain that is not local, and the DNS records printed by
//! `kermail domain add`.

use std::process::Command;

use crate::harness::{python, Node, DOMAIN, USER};

/// Runs curl; returns (HTTP status, body).
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("status line");
    (code.trim().parse().expect("status"), body.to_owned())
}

/// Parses `xml` with Python's ElementTree and prints `path` texts, one per line, so that
/// the test checks a well-formed document and not just substrings.
fn xml_texts(xml: &str, path: &str) -> Vec<String> {
    let script = r#"
import sys, xml.etree.ElementTree as ET
root = ET.fromstring(sys.argv[1])
for element in root.iterfind(sys.argv[2]):
    print(element.text)
"#;
    python(script, &[xml, path])
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn thunderbird_and_outlook_get_the_servers_of_local_domains_only() {
    let node = Node::with_account();
    let http = format!("http://127.0.0.1:{}", node.autoconfig_port);
    let https = format!("https://127.0.0.1:{}", node.autoconfig_tls_port);

    // Thunderbird asks http(s)://autoconfig.DOMAIN/mail/config-v1.1.xml.
    let (status, body) = curl(&[
        "-H",
        &format!("Host: autoconfig.{DOMAIN}"),
        &format!("{http}/mail/config-v1.1.xml?emailaddress={USER}"),
    ]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        xml_texts(&body, "./emailProvider/domain"),
        vec![DOMAIN.to_owned()]
    );
    assert_eq!(
        xml_texts(&body, "./emailProvider/incomingServer/port"),
        vec!["993", "143"]
    );
    assert_eq!(
        xml_texts(&body, "./emailProvider/incomingServer/socketType"),
        vec!["SSL", "STARTTLS"]
    );
    assert_eq!(
        xml_texts(&body, "./emailProvider/outgoingServer/port"),
        vec!["465", "587"]
    );
    assert!(xml_texts(&body, "./emailProvider/incomingServer/hostname")
        .iter()
        .all(|h| h == "mx.kermail.test"));

    // The well-known path on the domain itself, over HTTPS with the node's (self-signed)
    // certificate, the domain taken from the address.
    let (status, body) = curl(&[
        "-k",
        &format!(
            "{https}/.well-known/autoconfig/mail/config-v1.1.xml?emailaddress=alice%40{DOMAIN}"
        ),
    ]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        xml_texts(&body, "./emailProvider/outgoingServer/username"),
        vec!["%EMAILADDRESS%", "%EMAILADDRESS%"]
    );

    // Outlook's autodiscover POST.
    let request = format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?><Autodiscover xmlns=\"http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006\"><Request><EMailAddress>{USER}</EMailAddress><AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema></Request></Autodiscover>"
    );
    let (status, body) = curl(&[
        "-k",
        "-H",
        "Content-Type: text/xml",
        "--data-binary",
        &request,
        &format!("{https}/autodiscover/autodiscover.xml"),
    ]);
    assert_eq!(status, 200, "{body}");
    let ns = "{http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a}";
    let protocol = format!(".//{ns}Protocol");
    assert_eq!(
        xml_texts(&body, &format!("{protocol}/{ns}Type")),
        vec!["IMAP", "SMTP"]
    );
    assert_eq!(
        xml_texts(&body, &format!("{protocol}/{ns}LoginName")),
        vec![USER, USER]
    );

    // Not a local domain: nothing is told.
    let (status, _) = curl(&[
        "-H",
        "Host: autoconfig.elsewhere.test",
        &format!("{http}/mail/config-v1.1.xml"),
    ]);
    assert_eq!(status, 404);
    let (status, _) = curl(&[
        "-k",
        "--data-binary",
        "<Autodiscover><Request><EMailAddress>bob@elsewhere.test</EMailAddress></Request></Autodiscover>",
        &format!("{https}/autodiscover/autodiscover.xml"),
    ]);
    assert_eq!(status, 404);
    let (status, _) = curl(&[&format!("{http}/anything-else")]);
    assert_eq!(status, 404);
}

#[test]
fn domain_add_prints_the_dns_records_to_publish() {
    let node = Node::start();
    let out = node.cli_ok(&["domain", "add", "zone.test"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "domain zone.test added", "{out}");
    for expected in [
        "_imaps._tcp.zone.test. 3600 IN SRV 0 1 993 mx.kermail.test.",
        "_imap._tcp.zone.test. 3600 IN SRV 10 1 143 mx.kermail.test.",
        "_submissions._tcp.zone.test. 3600 IN SRV 0 1 465 mx.kermail.test.",
        "_submission._tcp.zone.test. 3600 IN SRV 10 1 587 mx.kermail.test.",
        "_pop3._tcp.zone.test. 3600 IN SRV 0 0 0 .",
        "autoconfig.zone.test. 3600 IN CNAME mx.kermail.test.",
        "autodiscover.zone.test. 3600 IN CNAME mx.kermail.test.",
    ] {
        assert!(lines.contains(&expected), "missing {expected:?} in:\n{out}");
    }
    // The autoconfig listener answers for the new domain at once.
    let (status, _) = curl(&[
        "-H",
        "Host: autoconfig.zone.test",
        &format!(
            "http://127.0.0.1:{}/mail/config-v1.1.xml",
            node.autoconfig_port
        ),
    ]);
    assert_eq!(status, 200);
}
