//! Just enough IP parsing for the filter: addresses, protocol, ports, TCP flags and the ICMP
//! kind, read in place from the packet (no allocation), with tailscale's rules for what is too
//! short or too fragmented to judge (tailscale:net/packet/packet.go `decode4`, `decode6`).

/// An address of either family as one number, so that ranges compare with `<=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ip {
    V4(u32),
    V6(u128),
}

impl From<std::net::IpAddr> for Ip {
    fn from(a: std::net::IpAddr) -> Ip {
        match a {
            std::net::IpAddr::V4(a) => Ip::V4(a.into()),
            std::net::IpAddr::V6(a) => Ip::V6(a.into()),
        }
    }
}

impl Ip {
    /// Multicast destinations never come over the mesh (tailscale drops them first).
    fn is_multicast(self) -> bool {
        match self {
            Ip::V4(a) => a >> 28 == 0xe,
            Ip::V6(a) => a >> 120 == 0xff,
        }
    }

    /// Nor do link-local ones (169.254/16, fe80::/10).
    fn is_link_local(self) -> bool {
        match self {
            Ip::V4(a) => a >> 16 == 0xa9fe,
            Ip::V6(a) => a >> 118 == 0x3fa, // the top 10 bits of fe80::
        }
    }

    /// Where the mesh never carries packets to.
    pub fn is_multicast_or_link_local(self) -> bool {
        self.is_multicast() || self.is_link_local()
    }
}

/// IP protocol numbers the filter treats specially.
pub mod proto {
    pub const ICMP4: u8 = 1;
    pub const IGMP: u8 = 2;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const IPV6_FRAGMENT: u8 = 44;
    pub const ICMP6: u8 = 58;
    pub const SCTP: u8 = 132;
}

/// SYN and ACK, of which a new connection's first packet has only SYN.
const TCP_SYN_ACK: u8 = 0x12;
const TCP_SYN: u8 = 0x02;

/// Later fragments must start past the largest IPv4 header plus a basic TCP header, in 8-byte
/// blocks: smaller offsets could overwrite the transport header a first fragment showed us
/// (RFC 1858); tailscale's `minFragBlks`.
const MIN_FRAGMENT_BLOCKS: u16 = (60 + 20) / 8;

/// What the filter needs to know about one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub proto: u8,
    pub src: Ip,
    pub dst: Ip,
    /// Zero for protocols without ports.
    pub src_port: u16,
    pub dst_port: u16,
    /// A fragment after the first: no transport header, nothing to judge but the addresses.
    pub later_fragment: bool,
    /// TCP: only SYN of SYN and ACK is set, i.e. a new connection.
    pub tcp_syn: bool,
    /// ICMP (of the packet's own family): an echo reply or an error message, which tailscale
    /// lets in without state.
    pub icmp_response: bool,
}

impl Packet {
    /// The ICMP of this packet's address family.
    pub fn is_icmp(&self) -> bool {
        matches!(
            (self.src, self.proto),
            (Ip::V4(_), proto::ICMP4) | (Ip::V6(_), proto::ICMP6)
        )
    }
}

/// Parses an IPv4 or IPv6 packet; `None` for anything tailscale would call unknown (too short,
/// cut off, a transport header that does not fit, protocol 0, an IPv6 extension header other
/// than one leading Fragment header): those are dropped.
pub fn parse(b: &[u8]) -> Option<Packet> {
    match b.first()? >> 4 {
        4 => parse4(b),
        6 => parse6(b),
        _ => None,
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn parse4(b: &[u8]) -> Option<Packet> {
    if b.len() < 20 {
        return None;
    }
    let total = usize::from(be16(b, 2));
    let header = usize::from(b[0] & 0x0f) * 4;
    if total > b.len() || header < 20 || header > total {
        return None;
    }
    let src = Ip::V4(u32::from_be_bytes([b[12], b[13], b[14], b[15]]));
    let dst = Ip::V4(u32::from_be_bytes([b[16], b[17], b[18], b[19]]));
    let fragment_offset = be16(b, 6) & 0x1fff;
    packet(b[9], src, dst, fragment_offset, &b[header..total])
}

fn parse6(b: &[u8]) -> Option<Packet> {
    if b.len() < 40 {
        return None;
    }
    let total = 40 + usize::from(be16(b, 4));
    if total > b.len() {
        return None;
    }
    let addr = |at: usize| Ip::V6(u128::from_be_bytes(b[at..at + 16].try_into().unwrap()));
    let (src, dst) = (addr(8), addr(24));
    let (mut next, mut start, mut fragment_offset) = (b[6], 40, 0);
    // The one extension header tailscale steps over: a Fragment header right after the
    // base header (hosts send them for datagrams above the MTU; RFC 8200 wants them
    // reassembled, so they must pass).
    if next == proto::IPV6_FRAGMENT {
        if total < 48 {
            return None;
        }
        next = b[40];
        fragment_offset = be16(b, 42) >> 3;
        start = 48;
    }
    packet(next, src, dst, fragment_offset, &b[start..total])
}

/// The transport part, shared by both families. `sub` is the payload after the IP headers.
fn packet(proto: u8, src: Ip, dst: Ip, fragment_offset: u16, sub: &[u8]) -> Option<Packet> {
    // 0 is tailscale's "unknown" (and IPv6 hop-by-hop, which it does not parse); 255 is its
    // internal fragment marker, suspicious on the wire.
    if proto == 0 || proto == 255 {
        return None;
    }
    let mut p = Packet {
        proto,
        src,
        dst,
        src_port: 0,
        dst_port: 0,
        later_fragment: false,
        tcp_syn: false,
        icmp_response: false,
    };
    if fragment_offset != 0 {
        if fragment_offset < MIN_FRAGMENT_BLOCKS {
            return None;
        }
        p.later_fragment = true;
        return Some(p);
    }
    // Every first fragment must hold the whole transport header: a header split across
    // fragments is the classic way past port filters.
    let need = match proto {
        proto::TCP => 20,
        proto::UDP | proto::IGMP => 8,
        proto::SCTP => 12,
        _ if p.is_icmp() => 4,
        _ => 0,
    };
    if sub.len() < need {
        return None;
    }
    if matches!(proto, proto::TCP | proto::UDP | proto::SCTP) {
        p.src_port = be16(sub, 0);
        p.dst_port = be16(sub, 2);
    }
    if proto == proto::TCP {
        p.tcp_syn = sub[13] & TCP_SYN_ACK == TCP_SYN;
    }
    if p.is_icmp() {
        p.icmp_response = icmp_response(src, sub);
    }
    Some(p)
}

/// Echo replies and errors (unreachable, too big, time exceeded, parameter problem); like
/// tailscale, only when the 8-byte ICMP header is all there.
fn icmp_response(family: Ip, icmp: &[u8]) -> bool {
    if icmp.len() < 8 {
        return false;
    }
    let (kind, code) = (icmp[0], icmp[1]);
    match family {
        Ip::V4(_) => (kind == 0 && code == 0) || matches!(kind, 3 | 11 | 12),
        Ip::V6(_) => (kind == 129 && code == 0) || matches!(kind, 1..=4),
    }
}
