//! Sans-IO routing table: which link carries traffic to a peer.
//!
//! Every node advertises the names of the peers it has direct links to, over each direct link.
//! A peer is reached directly when a direct link is up; otherwise through the first neighbour
//! (in name order, so the choice is deterministic) that advertises a direct link to it; otherwise
//! it is unreachable. One relay hop is enough for the 3 to 5 nodes of a cluster.

use std::collections::{BTreeMap, BTreeSet};

/// How to reach a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Direct,
    Via(String),
    Unreachable,
}

/// Direct links and the neighbours' advertisements.
#[derive(Debug, Default, Clone)]
pub struct RoutingTable {
    direct: BTreeSet<String>,
    advertised: BTreeMap<String, BTreeSet<String>>,
}

impl RoutingTable {
    /// Records that the direct link to `peer` went up or down. A neighbour that goes down
    /// takes its advertisement with it.
    pub fn set_direct(&mut self, peer: &str, up: bool) {
        if up {
            self.direct.insert(peer.to_string());
        } else {
            self.direct.remove(peer);
            self.advertised.remove(peer);
        }
    }

    /// Records the direct peers that `neighbour` advertised; returns whether they changed.
    pub fn set_advertised(
        &mut self,
        neighbour: &str,
        peers: impl IntoIterator<Item = String>,
    ) -> bool {
        let peers: BTreeSet<String> = peers.into_iter().collect();
        let previous = self.advertised.insert(neighbour.to_string(), peers.clone());
        previous.as_ref() != Some(&peers)
    }

    /// The peers we have direct links to, in name order.
    pub fn direct_peers(&self) -> Vec<String> {
        self.direct.iter().cloned().collect()
    }

    /// Whether a direct link to `peer` is up.
    pub fn is_direct(&self, peer: &str) -> bool {
        self.direct.contains(peer)
    }

    /// The route to `destination`.
    pub fn route(&self, destination: &str) -> Route {
        if self.direct.contains(destination) {
            return Route::Direct;
        }
        self.direct
            .iter()
            .find(|neighbour| {
                self.advertised
                    .get(*neighbour)
                    .is_some_and(|peers| peers.contains(destination))
            })
            .map_or(Route::Unreachable, |neighbour| {
                Route::Via(neighbour.clone())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_follow_links() {
        let mut table = RoutingTable::default();
        assert_eq!(table.route("c"), Route::Unreachable);
        table.set_direct("b", true);
        table.set_advertised("b", ["a".to_string(), "c".to_string()]);
        assert_eq!(table.route("c"), Route::Via("b".into()));
        table.set_direct("c", true);
        assert_eq!(table.route("c"), Route::Direct);
        table.set_direct("c", false);
        assert_eq!(table.route("c"), Route::Via("b".into()));
        table.set_direct("b", false);
        assert_eq!(table.route("c"), Route::Unreachable);
        // Deterministic choice between two relays: name order.
        table.set_direct("e", true);
        table.set_direct("d", true);
        table.set_advertised("e", ["c".to_string()]);
        table.set_advertised("d", ["c".to_string()]);
        assert_eq!(table.route("c"), Route::Via("d".into()));
    }
}
