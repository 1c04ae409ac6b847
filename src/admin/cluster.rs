//! Text rendering of `kermail mesh status` and `kermail cluster status`.

use kermail_cluster::mesh::{LinkState, MeshStatus};
use kermail_cluster::ClusterView;

/// The verdict line of `kermail cluster status` (scripts match it).
pub fn verdict_line(view: &ClusterView) -> String {
    if view.survives_site_loss {
        "survives the loss of any one site: yes".to_owned()
    } else {
        let sites: Vec<String> = view
            .critical_sites
            .iter()
            .map(|site| format!("losing site {site} stops writes"))
            .collect();
        format!(
            "survives the loss of any one site: no ({})",
            sites.join("; ")
        )
    }
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> Vec<String> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.len());
        }
    }
    let render = |cells: Vec<String>| -> String {
        cells
            .iter()
            .enumerate()
            .map(|(i, cell)| format!("{cell:<width$}", width = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = vec![render(header.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.into_iter().map(render));
    out
}

fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.to_owned()
}

pub fn cluster_status_lines(view: &ClusterView) -> Vec<String> {
    let rows = view
        .nodes
        .iter()
        .map(|node| {
            vec![
                node.name.clone(),
                node.site.clone(),
                node.role.clone(),
                yes_no(node.voter),
                yes_no(node.reachable),
                node.applied.to_string(),
                node.commit.to_string(),
                node.lag.to_string(),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "NAME",
            "SITE",
            "ROLE",
            "VOTER",
            "REACHABLE",
            "APPLIED",
            "COMMIT",
            "LAG",
        ],
        rows,
    );
    out.push(String::new());
    out.push(format!(
        "leader: {}",
        view.leader.as_deref().unwrap_or("none")
    ));
    out.push(format!("term: {}", view.term));
    out.push(verdict_line(view));
    if !view.survives_site_loss {
        for site in &view.critical_sites {
            out.push(format!(
                "WARNING: losing site {site} stops all writes (mail is refused with 4xx): \
                 add voters on a third site so that no site holds half of them"
            ));
        }
    }
    out
}

fn link_text(link: &LinkState) -> String {
    match link {
        LinkState::Direct { addr } => format!("direct {addr}"),
        LinkState::Relayed { via } => format!("relayed via {via}"),
        LinkState::Down => "down".to_owned(),
    }
}

fn handshake_text(unix_ms: Option<u64>) -> String {
    let Some(unix_ms) = unix_ms else {
        return "never".to_owned();
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    format!("{} s ago", now_ms.saturating_sub(unix_ms) / 1000)
}

pub fn mesh_status_lines(status: &MeshStatus) -> Vec<String> {
    let mut out = vec![
        format!("node: {} (site {})", status.node, status.site),
        format!("public key: {}", status.public_key),
        format!("listening on: {}", status.listen.join(", ")),
        format!(
            "handshakes refused: {}{}",
            status.handshakes_refused,
            status
                .last_refusal
                .as_deref()
                .map(|r| format!(" (last: {r})"))
                .unwrap_or_default()
        ),
        String::new(),
    ];
    let rows = status
        .peers
        .iter()
        .map(|peer| {
            vec![
                peer.name.clone(),
                peer.site.clone(),
                link_text(&peer.link),
                peer.rtt_ms
                    .map_or_else(|| "-".to_owned(), |rtt| format!("{rtt:.2}")),
                peer.bytes_sent.to_string(),
                peer.bytes_received.to_string(),
                peer.messages_sent.to_string(),
                peer.messages_received.to_string(),
                handshake_text(peer.last_handshake_unix_ms),
                peer.last_error.clone().unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    out.extend(table(
        &[
            "PEER",
            "SITE",
            "LINK",
            "RTT_MS",
            "BYTES_OUT",
            "BYTES_IN",
            "MSGS_OUT",
            "MSGS_IN",
            "LAST_HANDSHAKE",
            "LAST_ERROR",
        ],
        rows,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kermail_cluster::NodeView;

    fn view(critical: &[&str]) -> ClusterView {
        ClusterView {
            leader: Some("n1".into()),
            term: 3,
            nodes: vec![NodeView {
                name: "n1".into(),
                site: "a".into(),
                role: "leader".into(),
                voter: true,
                reachable: true,
                applied: 10,
                commit: 10,
                lag: 0,
            }],
            survives_site_loss: critical.is_empty(),
            critical_sites: critical.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn verdict_lines_name_each_critical_site_and_warn() {
        assert_eq!(
            verdict_line(&view(&[])),
            "survives the loss of any one site: yes"
        );
        assert_eq!(
            verdict_line(&view(&["a"])),
            "survives the loss of any one site: no (losing site a stops writes)"
        );
        assert_eq!(
            verdict_line(&view(&["a", "b"])),
            "survives the loss of any one site: no (losing site a stops writes; losing site b stops writes)"
        );
        let text = cluster_status_lines(&view(&["a"])).join("\n");
        assert!(
            text.contains("WARNING: losing site a stops all writes"),
            "{text}"
        );
        assert!(text.starts_with("NAME  SITE  ROLE"), "{text}");
    }
}
