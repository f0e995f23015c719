//! The network map, kept equal to what headscale holds by applying map responses. Pure.

use super::types::{DerpMap, MapResponse, Node};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Netmap {
    pub self_node: Option<Node>,
    pub peers: BTreeMap<i64, Node>,
    pub derp_map: DerpMap,
    /// Named packet filter sets; the effective filter is their concatenation.
    pub packet_filters: BTreeMap<String, serde_json::Value>,
}

/// What changed with one map response, for logging and for the data plane: which peers, so
/// that a patch costs the peers it names and not the whole tailnet.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    pub self_changed: bool,
    /// Our own node is new, or its key expiry changed: what every peer's use depends on (an
    /// expired key of ours stops them all). Other changes to our node (its endpoints, as
    /// headscale echoes them) leave the peers as they are.
    pub self_key_changed: bool,
    /// The peer set may have changed as a whole (a full peer list, a map from the cache).
    pub all_peers: bool,
    /// Peers added or changed, by node id, each once.
    pub changed_peers: Vec<i64>,
    /// Peers removed, as they were.
    pub removed_peers: Vec<Node>,
    /// Node keys no peer has any more: those of removed peers, and those a peer replaced.
    pub stale_keys: Vec<String>,
    /// A peer's subnet routes (`AllowedIPs` beyond its own addresses) may have changed. A
    /// peer with none that comes or goes leaves the kernel's routes as they are, so that
    /// adding a peer does not look at every other one for them.
    pub routes_changed: bool,
    /// A key expiry changed, or a peer with one came or went.
    pub expiry_changed: bool,
    pub derp_changed: bool,
    pub filter_changed: bool,
    /// Something changed that a restart from the cache needs: who the peers are, their keys
    /// and addresses, our node, the DERP map, the filter. Otherwise only where peers are
    /// now changed (endpoints, home DERP, online), which disco and DERP find out again.
    pub lasting: bool,
}

impl Changes {
    /// All of `m` is new: what a map brought up from the cache needs.
    pub fn everything(m: &Netmap) -> Changes {
        Changes {
            self_changed: true,
            self_key_changed: true,
            all_peers: true,
            changed_peers: m.peers.keys().copied().collect(),
            removed_peers: vec![],
            stale_keys: vec![],
            routes_changed: true,
            expiry_changed: true,
            derp_changed: true,
            filter_changed: true,
            lasting: true,
        }
    }

    pub fn peers_changed(&self) -> bool {
        self.all_peers || !self.changed_peers.is_empty() || !self.removed_peers.is_empty()
    }
}

impl Netmap {
    /// Applies one (non-keep-alive) map response, in tailscale's order: full peer list or
    /// changed/removed, then patches.
    pub fn apply(&mut self, r: MapResponse) -> Changes {
        let mut c = Changes::default();
        if let Some(n) = r.node
            && self.self_node.as_ref() != Some(&n)
        {
            c.lasting |= lasting_change(self.self_node.as_ref(), &n);
            let old = self.self_node.replace(n);
            c.self_key_changed = old
                .as_ref()
                .is_none_or(|o| key_expiry(o) != self.self_expiry());
            c.self_changed = true;
            c.expiry_changed = c.self_key_changed;
        }
        if let Some(d) = r.derp_map
            && d != self.derp_map
        {
            self.derp_map = d;
            c.derp_changed = true;
            c.lasting = true;
        }
        if let Some(peers) = r.peers {
            let mut old = std::mem::take(&mut self.peers);
            self.peers = peers.into_iter().map(|p| (p.id, p)).collect();
            old.retain(|id, _| !self.peers.contains_key(id));
            c.removed_peers = old.into_values().collect();
            c.changed_peers = self.peers.keys().copied().collect();
            c.all_peers = true;
            c.routes_changed = true;
            c.expiry_changed = true;
            c.lasting = true;
        } else {
            for p in r.peers_changed {
                let id = p.id;
                let old = self.peers.insert(id, p);
                let new = &self.peers[&id];
                let (old_subnets, old_expiry) = old
                    .as_ref()
                    .map_or((false, None), |o| (serves_subnets(o), key_expiry(o)));
                if (old_subnets || serves_subnets(new))
                    && old
                        .as_ref()
                        .is_none_or(|o| o.allowed_ips != new.allowed_ips)
                {
                    c.routes_changed = true;
                }
                c.expiry_changed |= old_expiry != key_expiry(new);
                c.lasting |= lasting_change(old.as_ref(), new);
                if let Some(o) = old
                    && o.key != new.key
                {
                    c.stale_keys.push(o.key);
                }
                c.changed_peers.push(id);
            }
            for id in r.peers_removed {
                if let Some(old) = self.peers.remove(&id) {
                    c.routes_changed |= serves_subnets(&old);
                    c.expiry_changed |= key_expiry(&old).is_some();
                    c.lasting = true;
                    c.removed_peers.push(old);
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
            if let Some(k) = patch.key
                && k != p.key
            {
                c.stale_keys.push(std::mem::replace(&mut p.key, k));
                c.lasting = true;
            }
            if let Some(k) = patch.disco_key
                && k != p.disco_key
            {
                p.disco_key = k;
                c.lasting = true;
            }
            if let Some(o) = patch.online {
                p.online = Some(o);
            }
            if let Some(e) = patch.key_expiry {
                p.key_expiry = Some(e);
                c.expiry_changed = true;
                c.lasting = true;
            }
            c.changed_peers.push(patch.node_id);
        }
        c.changed_peers.sort_unstable();
        c.changed_peers.dedup();
        // A peer removed and added back in one response is a change, not a removal.
        c.removed_peers.retain(|p| !self.peers.contains_key(&p.id));
        c.stale_keys
            .extend(c.removed_peers.iter().map(|p| p.key.clone()));
        self.drop_live_keys(&mut c.stale_keys);
        if let Some(base) = r.packet_filter {
            self.packet_filters.insert("base".into(), base);
            c.filter_changed = true;
            c.lasting = true;
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
            c.lasting = true;
        }
        c
    }

    /// The full map of a new map stream (see [`is_full_map`]) replaces what we held (from
    /// an earlier stream or the cache) outright, so that nothing of the old map, a filter
    /// set headscale no longer sends for instance, outlives it. The changes are those
    /// between the old map and the new one.
    pub fn replace_with(&mut self, r: MapResponse) -> Changes {
        let mut old = std::mem::take(self);
        self.apply(r);
        let changed_peers: Vec<i64> = self
            .peers
            .iter()
            .filter(|(id, p)| old.peers.get(id) != Some(p))
            .map(|(id, _)| *id)
            .collect();
        let peers_lasting = changed_peers
            .iter()
            .any(|id| lasting_change(old.peers.get(id), &self.peers[id]));
        old.peers.retain(|id, _| !self.peers.contains_key(id));
        let derp_changed = self.derp_map != old.derp_map;
        let filter_changed = self.packet_filters != old.packet_filters;
        // A renewed stream's full map mostly brings what we had: nothing for the cache.
        let lasting = derp_changed
            || filter_changed
            || !old.peers.is_empty()
            || peers_lasting
            || match &self.self_node {
                Some(n) => lasting_change(old.self_node.as_ref(), n),
                None => old.self_node.is_some(),
            };
        let mut stale_keys = old.peers.values().map(|p| p.key.clone()).collect();
        self.drop_live_keys(&mut stale_keys);
        Changes {
            self_changed: self.self_node != old.self_node,
            self_key_changed: old.self_expiry() != self.self_expiry(),
            all_peers: true,
            changed_peers,
            removed_peers: old.peers.into_values().collect(),
            stale_keys,
            routes_changed: true,
            expiry_changed: true,
            derp_changed,
            filter_changed,
            lasting,
        }
    }

    /// Keeps in `keys` only those no peer has now (a key can move between node ids).
    fn drop_live_keys(&self, keys: &mut Vec<String>) {
        if keys.is_empty() {
            return;
        }
        let live: std::collections::HashSet<&str> =
            self.peers.values().map(|p| p.key.as_str()).collect();
        keys.retain(|k| !live.contains(k.as_str()));
        keys.sort_unstable();
        keys.dedup();
    }

    /// Our mesh addresses (`100.64.x.y/32`, `fd7a:...::/128`).
    pub fn addresses(&self) -> Vec<String> {
        self.self_node
            .as_ref()
            .map(|n| n.addresses.clone())
            .unwrap_or_default()
    }
}

/// Whether `r` is a full map: it carries our own node and the DERP map, as every full map
/// does, and no delta of peers. The peer list itself is no sign: a full map of a node with
/// no peers has none (Go's `omitempty`).
pub fn is_full_map(r: &MapResponse) -> bool {
    r.node.is_some()
        && r.derp_map.is_some()
        && r.peers_changed.is_empty()
        && r.peers_changed_patch.is_empty()
        && r.peers_removed.is_empty()
}

/// When `node`'s key expires, if it does: absent, Go's zero time, or unparsable (logged by
/// the caller through [`expiry_error`]) mean never. `Expired` from control wins.
pub fn key_expiry(node: &Node) -> Option<SystemTime> {
    if node.expired {
        return Some(SystemTime::UNIX_EPOCH);
    }
    let text = node.key_expiry.as_deref()?;
    parse_time(text).filter(|t| *t > SystemTime::UNIX_EPOCH)
}

/// Whether `new`, as it was `old` (none: it is new), changed more than its whereabouts.
fn lasting_change(old: Option<&Node>, new: &Node) -> bool {
    old.is_none_or(|o| !same_but_whereabouts(o, new))
}

/// Whether `a` and `b` differ at most in where the node is now: its endpoints, home DERP
/// and online state. Every other field is named, so that a new one is not taken for one of
/// those by mistake.
fn same_but_whereabouts(a: &Node, b: &Node) -> bool {
    let Node {
        id,
        name,
        key,
        disco_key,
        addresses,
        allowed_ips,
        endpoints: _,
        home_derp: _,
        online: _,
        tags,
        user,
        key_expiry,
        expired,
    } = a;
    (id, name, key, disco_key, addresses, allowed_ips)
        == (
            &b.id,
            &b.name,
            &b.key,
            &b.disco_key,
            &b.addresses,
            &b.allowed_ips,
        )
        && (tags, user, key_expiry, expired) == (&b.tags, &b.user, &b.key_expiry, &b.expired)
}

/// Whether `node` serves routes beyond its own addresses (a subnet router, an exit node).
pub fn serves_subnets(node: &Node) -> bool {
    node.allowed_ips
        .iter()
        .any(|ip| !node.addresses.contains(ip))
}

/// Whether `node`'s key has expired at `now`.
pub fn is_expired(node: &Node, now: SystemTime) -> bool {
    key_expiry(node).is_some_and(|t| t <= now)
}

/// An RFC 3339 time as Go writes it; before 1970 (Go's zero time) comes out as the epoch.
pub fn parse_time(text: &str) -> Option<SystemTime> {
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    let secs = t.unix_timestamp();
    if secs < 0 {
        return Some(SystemTime::UNIX_EPOCH);
    }
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs as u64, t.nanosecond()))
}

/// A Unix time in RFC 3339 (UTC), for status and logs.
pub fn format_time(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

impl Netmap {
    /// The next moment after `now` at which a key in the map (ours or a peer's) expires:
    /// then the peer set must be worked out again.
    pub fn next_expiry(&self, now: SystemTime) -> Option<SystemTime> {
        self.self_node
            .iter()
            .chain(self.peers.values())
            .filter_map(key_expiry)
            .filter(|t| *t > now)
            .min()
    }

    /// Whether our own node key has expired: then no peer is used until a new key comes.
    pub fn self_expired(&self, now: SystemTime) -> bool {
        self.self_node.as_ref().is_some_and(|n| is_expired(n, now))
    }

    fn self_expiry(&self) -> Option<SystemTime> {
        self.self_node.as_ref().and_then(key_expiry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(json: &str) -> MapResponse {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn only_a_full_map_is_taken_for_one() {
        let derp = r#""DERPMap":{"Regions":{}}"#;
        // What headscale v0.28 sent first on a new stream under churn (bench scale, 1 000
        // nodes): taken for a full map, it emptied our addresses, DERP map and filter.
        assert!(!is_full_map(&resp(
            r#"{"PeersChangedPatch":[{"NodeID":7,"Online":false}]}"#
        )));
        assert!(!is_full_map(&resp(r#"{"PeersChanged":[{"ID":7}]}"#)));
        assert!(!is_full_map(&resp(r#"{"Node":{"ID":1}}"#)));
        assert!(!is_full_map(&resp(&format!(
            r#"{{"Node":{{"ID":1}},{derp},"PeersRemoved":[7]}}"#
        ))));
        assert!(is_full_map(&resp(&format!(
            r#"{{"Node":{{"ID":1}},{derp},"Peers":[{{"ID":7}}]}}"#
        ))));
        // No peers: Go leaves the list out.
        assert!(is_full_map(&resp(&format!(
            r#"{{"Node":{{"ID":1}},{derp}}}"#
        ))));
    }

    #[test]
    fn full_map_then_deltas() {
        let mut m = Netmap::default();
        let c = m.apply(resp(r#"{"Node":{"ID":1,"Addresses":["100.64.0.1/32","fd7a:115c:a1e0::1/128"]},
            "DERPMap":{"Regions":{"999":{"RegionID":999,"RegionCode":"headscale","Nodes":[{"Name":"999","RegionID":999,"HostName":"192.0.2.1","DERPPort":443,"STUNPort":3478}]}}},
            "Peers":[{"ID":2,"Key":"nodekey:aa","Endpoints":null,"Online":true},{"ID":3}],
            "PacketFilters":{"base":[{"SrcIPs":["*"]}]}, "SomethingNew": 1}"#));
        assert!(c.self_changed && c.self_key_changed && c.derp_changed && c.filter_changed);
        // headscale echoes our own endpoints: our node changed, our key did not.
        let c = m.apply(resp(
            r#"{"Node":{"ID":1,"Addresses":["100.64.0.1/32","fd7a:115c:a1e0::1/128"],"Endpoints":["192.0.2.11:41641"]}}"#,
        ));
        assert!(
            c.self_changed && !c.self_key_changed && !c.expiry_changed,
            "{c:?}"
        );
        let c = m.apply(resp(
            r#"{"Node":{"ID":1,"Addresses":["100.64.0.1/32","fd7a:115c:a1e0::1/128"],"Endpoints":["192.0.2.11:41641"],"KeyExpiry":"2026-12-01T23:00:00Z"}}"#,
        ));
        assert!(c.self_key_changed && c.expiry_changed, "{c:?}");
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
        assert_eq!(c.removed_peers.len(), 2);
        assert!(c.all_peers && m.peers.is_empty());
    }

    #[test]
    fn only_a_change_of_whereabouts_is_not_lasting() {
        let mut m = Netmap::default();
        let c = m.apply(resp(
            r#"{"Node":{"ID":1,"Addresses":["100.64.0.1/32"]},"DERPMap":{"Regions":{}},
            "Peers":[{"ID":2,"Key":"nodekey:aa","DiscoKey":"discokey:aa","Endpoints":["192.0.2.2:1"]}]}"#,
        ));
        assert!(c.lasting);
        // What a tailnet's churn is mostly made of: nodes move, come online and go.
        for whereabouts in [
            r#"{"PeersChangedPatch":[{"NodeID":2,"Endpoints":["192.0.2.2:2"],"DERPRegion":999,"Online":false}]}"#,
            r#"{"PeersChangedPatch":[{"NodeID":2,"DiscoKey":"discokey:aa"},{"NodeID":77,"Key":"nodekey:77"}]}"#,
            r#"{"PeersChanged":[{"ID":2,"Key":"nodekey:aa","DiscoKey":"discokey:aa","Endpoints":["192.0.2.2:3"],"Online":true}]}"#,
            r#"{"Node":{"ID":1,"Addresses":["100.64.0.1/32"],"Endpoints":["192.0.2.1:1"]}}"#,
        ] {
            let c = m.apply(resp(whereabouts));
            assert!(!c.lasting, "{whereabouts}: {c:?}");
        }
        for lasting in [
            r#"{"PeersChangedPatch":[{"NodeID":2,"DiscoKey":"discokey:bb"}]}"#,
            r#"{"PeersChangedPatch":[{"NodeID":2,"Key":"nodekey:bb"}]}"#,
            r#"{"PeersChangedPatch":[{"NodeID":2,"KeyExpiry":"2030-01-01T00:00:00Z"}]}"#,
            r#"{"PeersChanged":[{"ID":3}]}"#,
            r#"{"PeersChanged":[{"ID":3,"AllowedIPs":["10.0.0.0/8"]}]}"#,
            r#"{"PeersRemoved":[3]}"#,
            r#"{"Node":{"ID":1,"Addresses":["100.64.0.9/32"]}}"#,
            r#"{"DERPMap":{"Regions":{"1":{"RegionID":1}}}}"#,
            r#"{"PacketFilters":{"base":[]}}"#,
            r#"{"Peers":[]}"#,
        ] {
            let c = m.apply(resp(lasting));
            assert!(c.lasting, "{lasting}: {c:?}");
        }
    }

    #[test]
    fn a_full_map_that_only_moves_peers_is_not_lasting() {
        let full = |endpoint: &str, peers: &str| {
            resp(&format!(
                r#"{{"Node":{{"ID":1,"Addresses":["100.64.0.1/32"],"Endpoints":["{endpoint}"]}},
                "DERPMap":{{"Regions":{{}}}},"PacketFilters":{{"base":[]}},"Peers":[{peers}]}}"#
            ))
        };
        let peer = |endpoint: &str| {
            format!(r#"{{"ID":2,"Key":"nodekey:aa","Endpoints":["{endpoint}"],"Online":true}}"#)
        };
        let mut m = Netmap::default();
        assert!(
            m.replace_with(full("192.0.2.1:1", &peer("192.0.2.2:1")))
                .lasting
        );
        // A renewal that brings what we had, or where peers are now.
        let c = m.replace_with(full("192.0.2.1:1", &peer("192.0.2.2:1")));
        assert!(
            !c.lasting && c.changed_peers.is_empty() && !c.self_changed,
            "{c:?}"
        );
        let c = m.replace_with(full("192.0.2.1:2", &peer("192.0.2.2:2")));
        assert!(
            !c.lasting && c.changed_peers == [2] && c.self_changed,
            "{c:?}"
        );
        // A peer added, removed or re-keyed, or our own address: the cache needs them.
        let two = format!("{},{}", peer("192.0.2.2:2"), r#"{"ID":3}"#);
        assert!(m.replace_with(full("192.0.2.1:2", &two)).lasting);
        assert!(
            m.replace_with(full("192.0.2.1:2", &peer("192.0.2.2:2")))
                .lasting
        );
        let rekeyed = r#"{"ID":2,"Key":"nodekey:bb"}"#;
        assert!(m.replace_with(full("192.0.2.1:2", rekeyed)).lasting);
        let c = m.replace_with(resp(
            r#"{"Node":{"ID":1,"Addresses":["100.64.0.9/32"]},"DERPMap":{"Regions":{}},
            "PacketFilters":{"base":[]},"Peers":[{"ID":2,"Key":"nodekey:bb"}]}"#,
        ));
        assert!(c.lasting, "{c:?}");
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

    #[test]
    fn a_new_stream_replaces_the_map_and_reports_only_real_changes() {
        let mut m = Netmap::default();
        m.apply(resp(
            r#"{"Node":{"ID":1,"Addresses":["100.64.0.1/32"]},
            "Peers":[{"ID":2,"Key":"nodekey:aa"},{"ID":3}],
            "PacketFilters":{"base":[],"old":[{"SrcIPs":["*"]}]}}"#,
        ));
        let c = m.replace_with(resp(
            r#"{"Node":{"ID":1,"Addresses":["100.64.0.1/32"]},
            "Peers":[{"ID":2,"Key":"nodekey:aa"},{"ID":4}],"PacketFilters":{"base":[]}}"#,
        ));
        assert!(!c.self_changed && !c.derp_changed && c.filter_changed);
        assert_eq!(c.changed_peers, vec![4]);
        assert_eq!(
            c.removed_peers.iter().map(|p| p.id).collect::<Vec<_>>(),
            vec![3]
        );
        assert_eq!(m.packet_filters.keys().collect::<Vec<_>>(), vec!["base"]);
    }

    #[test]
    fn a_patch_names_only_the_peers_it_touches() {
        let mut m = Netmap::default();
        m.apply(resp(
            r#"{"Node":{"ID":1},"Peers":[{"ID":2,"AllowedIPs":["100.64.0.2/32"]},{"ID":3},{"ID":4}]}"#,
        ));
        let c = m.apply(resp(
            r#"{"PeersChangedPatch":[{"NodeID":3,"Online":true},{"NodeID":3,"Endpoints":["192.0.2.9:1"]},{"NodeID":77}]}"#,
        ));
        assert_eq!(c.changed_peers, vec![3]);
        assert!(!c.all_peers && !c.routes_changed && !c.expiry_changed && !c.self_changed);
        assert!(c.removed_peers.is_empty());
        // A changed node with new AllowedIPs may change routes; a removed one is named.
        let c = m.apply(resp(
            r#"{"PeersChanged":[{"ID":2,"AllowedIPs":["100.64.0.2/32","198.51.100.0/24"]}],"PeersRemoved":[4]}"#,
        ));
        assert!(
            c.stale_keys.is_empty(),
            "no key was set: {:?}",
            c.stale_keys
        );
        assert_eq!(c.changed_peers, vec![2]);
        assert_eq!(
            c.removed_peers.iter().map(|p| p.id).collect::<Vec<_>>(),
            vec![4]
        );
        assert!(c.routes_changed && !c.all_peers);
        let c = m.apply(resp(
            r#"{"PeersChanged":[{"ID":2,"AllowedIPs":["100.64.0.2/32","198.51.100.0/24"]}]}"#,
        ));
        assert!(!c.routes_changed);
        // A peer with nothing but its own addresses comes and goes: no route, no expiry to
        // look at again (adding a peer does not scan the others).
        let plain = r#"{"PeersChanged":[{"ID":9,"Addresses":["100.64.0.9/32"],"AllowedIPs":["100.64.0.9/32"]}]}"#;
        let c = m.apply(resp(plain));
        assert!(!c.routes_changed && !c.expiry_changed, "{c:?}");
        let c = m.apply(resp(r#"{"PeersRemoved":[9]}"#));
        assert!(!c.routes_changed && !c.expiry_changed, "{c:?}");
        let c = m.apply(resp(
            r#"{"PeersChanged":[{"ID":9,"AllowedIPs":["100.64.0.9/32"],"KeyExpiry":"2026-12-01T23:00:00Z"}]}"#,
        ));
        assert!(c.expiry_changed, "a new peer with an expiry: {c:?}");
        let c = m.apply(resp(r#"{"PeersRemoved":[9]}"#));
        assert!(c.expiry_changed, "a peer with an expiry gone: {c:?}");
        // A new node key: the old one is stale, for the data plane to drop.
        m.apply(resp(r#"{"PeersChanged":[{"ID":3,"Key":"nodekey:01"}]}"#));
        let c = m.apply(resp(
            r#"{"PeersChangedPatch":[{"NodeID":3,"Key":"nodekey:02"}]}"#,
        ));
        assert_eq!(c.stale_keys, vec!["nodekey:01"]);
        let c = m.apply(resp(r#"{"PeersRemoved":[3]}"#));
        assert_eq!(c.stale_keys, vec!["nodekey:02"]);
    }

    #[test]
    fn key_expiry_as_go_writes_it() {
        let at = |s: &str| SystemTime::UNIX_EPOCH + Duration::from_secs(s.parse().unwrap());
        let node = |json: &str| -> Node { serde_json::from_str(json).unwrap() };
        let never = node(r#"{"KeyExpiry":"0001-01-01T00:00:00Z"}"#);
        assert_eq!(key_expiry(&never), None);
        assert_eq!(key_expiry(&node("{}")), None);
        let later = node(r#"{"KeyExpiry":"2026-12-02T00:00:00.5+01:00"}"#);
        assert_eq!(
            key_expiry(&later),
            Some(at("1796166000") + Duration::from_millis(500))
        );
        assert!(!is_expired(&later, at("1796165999")));
        assert!(is_expired(&later, at("1796166001")));
        assert!(is_expired(&node(r#"{"Expired":true}"#), at("0")));
        let mut m = Netmap::default();
        m.apply(resp(r#"{"Node":{"ID":1},"Peers":[{"ID":2},{"ID":3}]}"#));
        assert_eq!(m.next_expiry(at("0")), None);
        m.apply(resp(
            r#"{"PeersChangedPatch":[{"NodeID":3,"KeyExpiry":"2026-12-01T23:00:00Z"}]}"#,
        ));
        assert_eq!(m.next_expiry(at("1796165999")), Some(at("1796166000")));
        assert_eq!(m.next_expiry(at("1796166000")), None);
        assert!(!m.self_expired(at("1796166000")));
        assert_eq!(format_time(at("1796166000")), "2026-12-01T23:00:00Z");
    }
}
