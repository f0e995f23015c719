//! tailcfg `FilterRule`s from the map, turned into address ranges, port ranges and protocol
//! sets (tailscale:wgengine/filter/tailcfg.go `MatchesFromFilterRules`, `parseIPSet`).

use super::packet::{Ip, Packet, proto};
use serde::Deserialize;
use std::net::IpAddr;

/// One `FilterRule` as headscale sends it. Absent and `null` lists are empty, as in Go.
#[derive(Debug, Deserialize)]
struct RawRule {
    #[serde(rename = "SrcIPs", default)]
    src_ips: Option<Vec<String>>,
    #[serde(rename = "SrcBits", default)]
    src_bits: Option<Vec<serde_json::Value>>,
    #[serde(rename = "DstPorts", default)]
    dst_ports: Option<Vec<RawNetPortRange>>,
    #[serde(rename = "IPProto", default)]
    ip_proto: Option<Vec<i64>>,
    // `CapGrant` (application capabilities) grants nothing at the packet level: ignored.
}

#[derive(Debug, Deserialize)]
struct RawNetPortRange {
    #[serde(rename = "IP")]
    ip: String,
    #[serde(rename = "Bits", default)]
    bits: Option<serde_json::Value>,
    #[serde(rename = "Ports", default)]
    ports: Option<RawPorts>,
}

#[derive(Debug, Default, Deserialize)]
struct RawPorts {
    #[serde(rename = "First", default)]
    first: u16,
    #[serde(rename = "Last", default)]
    last: u16,
}

/// An inclusive range of addresses of one family (a single address, a CIDR or "a-b").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    lo: Ip,
    hi: Ip,
}

impl Range {
    pub fn contains(&self, a: Ip) -> bool {
        match (self.lo, self.hi, a) {
            (Ip::V4(lo), Ip::V4(hi), Ip::V4(a)) => lo <= a && a <= hi,
            (Ip::V6(lo), Ip::V6(hi), Ip::V6(a)) => lo <= a && a <= hi,
            _ => false,
        }
    }

    /// The addresses of the prefix `ip/len`; `len` must fit the family.
    pub fn prefix(ip: IpAddr, len: u8) -> Range {
        match Ip::from(ip) {
            Ip::V4(a) => {
                let host = u32::MAX.checked_shr(u32::from(len)).unwrap_or(0);
                Range {
                    lo: Ip::V4(a & !host),
                    hi: Ip::V4(a | host),
                }
            }
            Ip::V6(a) => {
                let host = u128::MAX.checked_shr(u32::from(len)).unwrap_or(0);
                Range {
                    lo: Ip::V6(a & !host),
                    hi: Ip::V6(a | host),
                }
            }
        }
    }

    /// Everything of both families ("*").
    const ANY: [Range; 2] = [
        Range {
            lo: Ip::V4(0),
            hi: Ip::V4(u32::MAX),
        },
        Range {
            lo: Ip::V6(0),
            hi: Ip::V6(u128::MAX),
        },
    ];
}

/// The IP protocols a rule applies to, one bit each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protocols([u64; 4]);

impl Protocols {
    /// tailscale's `defaultProtos`, for rules without `IPProto`.
    const DEFAULT: [u8; 4] = [proto::TCP, proto::UDP, proto::ICMP4, proto::ICMP6];

    fn of(list: impl IntoIterator<Item = u8>) -> Protocols {
        let mut bits = [0u64; 4];
        for p in list {
            bits[usize::from(p / 64)] |= 1 << (p % 64);
        }
        Protocols(bits)
    }

    pub fn contains(&self, p: u8) -> bool {
        self.0[usize::from(p / 64)] & (1 << (p % 64)) != 0
    }
}

/// Destinations of a rule: addresses and a port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dst {
    net: Range,
    first: u16,
    last: u16,
}

impl Dst {
    fn all_ports(&self) -> bool {
        self.first == 0 && self.last == u16::MAX
    }
}

/// One parsed rule: packets from `srcs` with a protocol in `protos` to `dsts` pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    protos: Protocols,
    srcs: Vec<Range>,
    dsts: Vec<Dst>,
}

impl Rule {
    /// Everything from everyone to anywhere, any protocol.
    pub fn everything() -> Rule {
        Rule {
            protos: Protocols([u64::MAX; 4]),
            srcs: Range::ANY.to_vec(),
            dsts: Range::ANY
                .iter()
                .map(|&net| Dst {
                    net,
                    first: 0,
                    last: u16::MAX,
                })
                .collect(),
        }
    }

    fn has_src(&self, p: &Packet) -> bool {
        self.srcs.iter().any(|r| r.contains(p.src))
    }

    /// Source, protocol, destination address and port all match (TCP, UDP, SCTP).
    pub fn matches(&self, p: &Packet) -> bool {
        self.protos.contains(p.proto)
            && self.has_src(p)
            && self
                .dsts
                .iter()
                .any(|d| d.net.contains(p.dst) && d.first <= p.dst_port && p.dst_port <= d.last)
    }

    /// Source and destination address match, whatever the protocol and ports: tailscale lets
    /// ICMP in to an address if any port of it is open to the sender (`matchIPsOnly`).
    pub fn matches_addresses(&self, p: &Packet) -> bool {
        self.has_src(p) && self.dsts.iter().any(|d| d.net.contains(p.dst))
    }

    /// For protocols without ports: protocol and addresses match, and the rule opens all
    /// ports (`matchProtoAndIPsOnlyIfAllPorts`).
    pub fn matches_portless(&self, p: &Packet) -> bool {
        self.protos.contains(p.proto)
            && self.has_src(p)
            && self
                .dsts
                .iter()
                .any(|d| d.all_ports() && d.net.contains(p.dst))
    }
}

/// Parses one named set (a JSON array of `FilterRule`), appending its rules to `out` and
/// a message naming each rule that does not parse to `skipped`. Rules that end up without
/// sources or destinations (capability grants) are left out: they could never match.
pub fn parse_set(
    name: &str,
    rules: &serde_json::Value,
    out: &mut Vec<Rule>,
    skipped: &mut Vec<String>,
) {
    let list = match rules {
        serde_json::Value::Null => return,
        serde_json::Value::Array(list) => list,
        other => {
            skipped.push(format!("set {name:?}: not a list of rules: {other}"));
            return;
        }
    };
    for (i, raw) in list.iter().enumerate() {
        let rule = RawRule::deserialize(raw)
            .map_err(|e| e.to_string())
            .and_then(parse_rule);
        match rule {
            Ok(rule) if !rule.srcs.is_empty() && !rule.dsts.is_empty() => out.push(rule),
            Ok(_) => {}
            Err(e) => skipped.push(format!("set {name:?}, rule {i}: {e}: {raw}")),
        }
    }
}

fn parse_rule(r: RawRule) -> Result<Rule, String> {
    // Like tailscale, which refuses these outright: a control server sending them speaks an
    // older protocol than we understand.
    if r.src_bits.is_some_and(|b| !b.is_empty()) {
        return Err("SrcBits is not supported".into());
    }
    let protos = match r.ip_proto.unwrap_or_default() {
        v if v.is_empty() => Protocols::of(Protocols::DEFAULT),
        // Out-of-range numbers are dropped, as tailscale does; a rule left with none matches
        // nothing rather than everything.
        v => Protocols::of(v.into_iter().filter_map(|n| u8::try_from(n).ok())),
    };
    let mut srcs = vec![];
    for s in r.src_ips.unwrap_or_default() {
        match parse_ip_set(&s)? {
            // A capability source needs the peer's node capabilities, which the agent does not
            // track: it grants nothing here.
            IpSet::Capability => {}
            IpSet::Ranges(r) => srcs.extend(r),
        }
    }
    let mut dsts = vec![];
    for d in r.dst_ports.unwrap_or_default() {
        if d.bits.is_some_and(|b| !b.is_null()) {
            return Err("DstPorts Bits is not supported".into());
        }
        let ports = d.ports.unwrap_or_default();
        let IpSet::Ranges(nets) = parse_ip_set(&d.ip)? else {
            return Err(format!("a capability {:?} as a destination", d.ip));
        };
        dsts.extend(nets.into_iter().map(|net| Dst {
            net,
            first: ports.first,
            last: ports.last,
        }));
    }
    Ok(Rule { protos, srcs, dsts })
}

/// One or two ranges ("*" is both families), or a capability.
enum IpSet {
    Ranges(Vec<Range>),
    Capability,
}

/// tailscale's `parseIPSet`: "*", "cap:…", a CIDR (no host bits), "a-b", or one address.
fn parse_ip_set(s: &str) -> Result<IpSet, String> {
    if s == "*" {
        return Ok(IpSet::Ranges(Range::ANY.to_vec()));
    }
    if s.starts_with("cap:") {
        return Ok(IpSet::Capability);
    }
    if let Some((ip, len)) = s.split_once('/') {
        return parse_prefix(ip, len).map(|r| IpSet::Ranges(vec![r]));
    }
    if s.matches('-').count() == 1 {
        let (a, b) = s.split_once('-').unwrap_or_default();
        let range = match (Ip::from(parse_ip(a)?), Ip::from(parse_ip(b)?)) {
            (lo @ Ip::V4(x), hi @ Ip::V4(y)) if x <= y => Range { lo, hi },
            (lo @ Ip::V6(x), hi @ Ip::V6(y)) if x <= y => Range { lo, hi },
            _ => return Err(format!("invalid address range {s:?}")),
        };
        return Ok(IpSet::Ranges(vec![range]));
    }
    let ip = parse_ip(s)?;
    Ok(IpSet::Ranges(vec![Range::prefix(ip, max_len(ip))]))
}

fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.parse().map_err(|_| format!("invalid IP address {s:?}"))
}

fn max_len(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

/// A CIDR as Go's `netip.ParsePrefix` takes it (decimal length, no sign, no leading zero), and
/// like tailscale refused when host bits are set: such a rule is a mistake in the policy.
fn parse_prefix(ip: &str, len: &str) -> Result<Range, String> {
    let addr = parse_ip(ip)?;
    let valid_digits = !len.is_empty()
        && len.bytes().all(|c| c.is_ascii_digit())
        && !(len.len() > 1 && len.starts_with('0'));
    let bits = len
        .parse::<u8>()
        .ok()
        .filter(|&b| valid_digits && b <= max_len(addr))
        .ok_or_else(|| format!("invalid prefix length in {ip}/{len}"))?;
    let range = Range::prefix(addr, bits);
    if range.lo != Ip::from(addr) {
        return Err(format!("{ip}/{len} has host bits set"));
    }
    Ok(range)
}
