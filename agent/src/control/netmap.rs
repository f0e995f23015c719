//! The network map, kept equal to what headscale holds by applying map responses. Pure.

use super::types::{DerpMap, MapResponse, Node};
use std::collections::BTreeMap;

#[derive(Debug, Default, Clone)]
pub struct Netmap {
    pub self_node: Option<Node>,
    pub peers: BTreeMap<i64, Node>,
    pub derp_map: DerpMap,
    /// Named packet filter sets; the effective filter is their concatenation.
    pub packet_filters: BTreeMap<String, serde_json::Value>,
}

/// What changed with one map response, for logging and for the data plane.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub self_changed: bool,
    pub peers_changed: usize,
    pub peers_removed: usize,
    pub derp_changed: bool,
    pub filter_changed: bool,
}

impl Netmap {
    /// Applies one (non-keep-alive) map response, in tailscale's order: full peer list or
    /// changed/removed, then patches.
    pub fn apply(&mut self, r: MapResponse) -> Changes {
        let mut c = Changes::default();
        if let Some(n) = r.node
            && self.self_node.as_ref() != Some(&n)
        {
            self.self_node = Some(n);
            c.self_changed = true;
        }
        if let Some(d) = r.derp_map
            && d != self.derp_map
        {
            self.derp_map = d;
            c.derp_changed = true;
        }
        if let Some(peers) = r.peers {
            c.peers_removed = self
                .peers
                .keys()
                .filter(|id| !peers.iter().any(|p| p.id == **id))
                .count();
            c.peers_changed = peers.len();
            self.peers = peers.into_iter().map(|p| (p.id, p)).collect();
        } else {
            for p in r.peers_changed {
                self.peers.insert(p.id, p);
                c.peers_changed += 1;
            }
            for id in r.peers_removed {
                if self.peers.remove(&id).is_some() {
                    c.peers_removed += 1;
                }
            }
        }
        for patch in r.peers_changed_patch {
            let Some(p) = self.peers.get_mut(&patch.node_id) else {
                continue;
            };
            if let Some(d) = patch.derp_region {
                p.home_derp = d;
            }
            if let Some(e) = patch.endpoints {
                p.endpoints = e;
            }
            if let Some(k) = patch.key {
                p.key = k;
            }
            if let Some(k) = patch.disco_key {
                p.disco_key = k;
            }
            if let Some(o) = patch.online {
                p.online = Some(o);
            }
            c.peers_changed += 1;
        }
        if let Some(base) = r.packet_filter {
            self.packet_filters.insert("base".into(), base);
            c.filter_changed = true;
        }
        if let Some(sets) = r.packet_filters {
            if sets.get("*").is_some_and(|v| v.is_none()) {
                self.packet_filters.clear();
            }
            for (name, rules) in sets {
                match rules {
                    Some(r) => {
                        self.packet_filters.insert(name, r);
                    }
                    None => {
                        self.packet_filters.remove(&name);
                    }
                }
            }
            c.filter_changed = true;
        }
        c
    }

    /// Our mesh addresses (`100.64.x.y/32`, `fd7a:...::/128`).
    pub fn addresses(&self) -> Vec<String> {
        self.self_node
            .as_ref()
            .map(|n| n.addresses.clone())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(json: &str) -> MapResponse {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn full_map_then_deltas() {
        let mut m = Netmap::default();
        let c = m.apply(resp(r#"{"Node":{"ID":1,"Addresses":["100.64.0.1/32","fd7a:115c:a1e0::1/128"]},
            "DERPMap":{"Regions":{"999":{"RegionID":999,"RegionCode":"headscale","Nodes":[{"Name":"999","RegionID":999,"HostName":"192.0.2.1","DERPPort":443,"STUNPort":3478}]}}},
            "Peers":[{"ID":2,"Key":"nodekey:aa","Endpoints":null,"Online":true},{"ID":3}],
            "PacketFilters":{"base":[{"SrcIPs":["*"]}]}, "SomethingNew": 1}"#));
        assert!(c.self_changed && c.derp_changed && c.filter_changed);
        assert_eq!(
            m.addresses(),
            vec!["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]
        );
        assert_eq!(m.peers.len(), 2);
        m.apply(resp(r#"{"PeersChanged":[{"ID":4}],"PeersRemoved":[3]}"#));
        assert_eq!(m.peers.keys().copied().collect::<Vec<_>>(), vec![2, 4]);
        m.apply(resp(r#"{"PeersChangedPatch":[{"NodeID":2,"Online":false,"Endpoints":["192.0.2.12:41641"],"DERPRegion":999},{"NodeID":77}]}"#));
        let p = &m.peers[&2];
        assert_eq!(p.online, Some(false));
        assert_eq!(p.endpoints, vec!["192.0.2.12:41641"]);
        assert_eq!(p.home_derp, 999);
        m.apply(resp(r#"{"PacketFilters":{"*":null,"other":[]}}"#));
        assert_eq!(m.packet_filters.keys().collect::<Vec<_>>(), vec!["other"]);
        let c = m.apply(resp(r#"{"Peers":[]}"#));
        assert_eq!(c.peers_removed, 2);
        assert!(m.peers.is_empty());
    }

    #[test]
    fn the_legacy_packet_filter_is_the_set_base_and_packet_filters_win() {
        let mut m = Netmap::default();
        let c = m.apply(resp(r#"{"PacketFilter":[{"SrcIPs":["*"]}]}"#));
        assert!(c.filter_changed);
        assert_eq!(m.packet_filters.keys().collect::<Vec<_>>(), vec!["base"]);
        // Both in one response: the legacy one first, then the named sets over it.
        m.apply(resp(
            r#"{"PacketFilter":[{"SrcIPs":["a"]}],"PacketFilters":{"*":null,"x":[]}}"#,
        ));
        assert_eq!(m.packet_filters.keys().collect::<Vec<_>>(), vec!["x"]);
        // null is Go's nil slice: no change.
        let c = m.apply(resp(r#"{"PacketFilter":null}"#));
        assert!(!c.filter_changed);
    }
}
