//! The packet filter from the map (`PacketFilters`), enforced on packets arriving from
//! peers, as tailscaled does (tailscale:wgengine/filter/filter.go `RunIn`, `RunOut`). Pure:
//! packets in, verdicts out; no clock, no allocation per packet.
//!
//! What passes, in tailscale's order:
//! 1. Not IP, cut off, or a transport header that does not fit: dropped. So are packets to
//!    multicast and link-local addresses.
//! 2. Later fragments (past any transport header): accepted; the first fragment was judged.
//! 3. Destinations that are not ours (once [`Filter::with_local`] told us ours): dropped, so
//!    that a peer cannot use us as a router.
//! 4. By protocol:
//!    - ICMP echo replies and errors: accepted (tailscale keeps no ICMP state). Other ICMP:
//!      accepted if some rule opens any port of the destination to the sender.
//!    - TCP without SYN (or with SYN and ACK): accepted; a new connection needs a SYN.
//!      A SYN: accepted if a rule matches sender, protocol, destination and port.
//!    - UDP and SCTP: replies to flows we opened (see [`Filter::note_out`]), or a rule match.
//!    - Anything else: a rule for that protocol that opens all ports of the destination.
//!      tailscale's own TSMP (protocol 99) is not special here: the agent does not speak it,
//!      so it would only reach the kernel.
//!
//!    Everything else is dropped; the rules only ever accept.

mod flows;
mod packet;
mod rules;

use flows::{Flow, Flows};
use packet::{Ip, Packet, proto};
use rules::{Range, Rule};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// The rules of the map, our addresses, and the UDP and SCTP flows we opened (512 at most,
/// as tailscale keeps; when full, a least recently used one makes room).
#[derive(Debug, Clone)]
pub struct Filter {
    rules: Vec<Rule>,
    /// Our own addresses; `None` = destinations are not checked.
    local: Option<Vec<Range>>,
    flows: Flows,
}

/// What parsing the map's filter sets gave: the filter of every rule that parsed, and one
/// message per rule (or set) that did not, naming it.
#[derive(Debug)]
pub struct Parsed {
    pub filter: Filter,
    pub skipped: Vec<String>,
}

impl Default for Filter {
    fn default() -> Self {
        Filter::deny_all()
    }
}

impl Filter {
    /// Nothing passes: no rules, and no address of ours to deliver to. What the data plane
    /// starts with, until headscale's policy is in force.
    pub fn deny_all() -> Filter {
        Filter {
            local: Some(vec![]),
            ..Filter::from_rules(vec![])
        }
    }

    /// Every well-formed packet passes. Malformed ones and multicast still do not.
    pub fn allow_all() -> Filter {
        Filter::from_rules(vec![Rule::everything()])
    }

    fn from_rules(rules: Vec<Rule>) -> Filter {
        Filter {
            rules,
            local: None,
            flows: Flows::default(),
        }
    }

    /// The effective filter of the netmap's named sets: their concatenation, by name. No
    /// sets, or empty ones, accept no new inbound flows (replies to ours still pass).
    /// A rule that does not parse is left out and reported: rules only ever accept, so
    /// leaving one out can only narrow access, never widen it (tailscaled, too, keeps the
    /// rules it understands).
    pub fn from_sets(sets: &BTreeMap<String, serde_json::Value>) -> Parsed {
        let (mut rules, mut skipped) = (vec![], vec![]);
        for (name, set) in sets {
            rules::parse_set(name, set, &mut rules, &mut skipped);
        }
        Parsed {
            filter: Filter::from_rules(rules),
            skipped,
        }
    }

    /// Restricts accepted destinations to our own addresses (`ip/len`, as the self node
    /// lists them), as tailscale's filter does with the node's addresses.
    pub fn with_local(mut self, prefixes: &[(IpAddr, u8)]) -> Filter {
        self.local = Some(
            prefixes
                .iter()
                .map(|&(ip, len)| Range::prefix(ip, len))
                .collect(),
        );
        self
    }

    /// How many rules the filter has (for the log).
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Takes over the flows `previous` remembered, so that a new filter from the map does not
    /// cut the replies of flows already open (tailscale's `shareStateWith`).
    pub fn keep_flows_of(&mut self, previous: Filter) {
        self.flows = previous.flows;
    }

    /// Whether an IP packet that arrived from a peer may be delivered.
    pub fn allow_in(&mut self, packet: &[u8]) -> bool {
        let Some(p) = packet::parse(packet) else {
            return false;
        };
        if p.dst.is_multicast_or_link_local() {
            return false;
        }
        if p.later_fragment {
            return true;
        }
        if !self.is_local(p.dst) {
            return false;
        }
        match p.proto {
            _ if p.is_icmp() => p.icmp_response || self.any(Rule::matches_addresses, &p),
            proto::TCP => !p.tcp_syn || self.any(Rule::matches, &p),
            proto::UDP | proto::SCTP => self.flows.hit(&flow_of(&p)) || self.any(Rule::matches, &p),
            _ => self.any(Rule::matches_portless, &p),
        }
    }

    /// Notes a packet we send to a peer, so that its replies pass: UDP and SCTP flows, as
    /// tailscale tracks (TCP replies pass without SYN, ICMP replies without state).
    pub fn note_out(&mut self, packet: &[u8]) {
        if let Some(p) = packet::parse(packet)
            && !p.later_fragment
            && matches!(p.proto, proto::UDP | proto::SCTP)
        {
            self.flows.insert(flow_of(&p).reversed());
        }
    }

    fn is_local(&self, dst: Ip) -> bool {
        self.local
            .as_ref()
            .is_none_or(|l| l.iter().any(|r| r.contains(dst)))
    }

    fn any(&self, matches: fn(&Rule, &Packet) -> bool, p: &Packet) -> bool {
        self.rules.iter().any(|r| matches(r, p))
    }
}

fn flow_of(p: &Packet) -> Flow {
    Flow {
        proto: p.proto,
        src: p.src,
        src_port: p.src_port,
        dst: p.dst,
        dst_port: p.dst_port,
    }
}

#[cfg(test)]
mod tests;
