//! TUN offloads, the way tailscaled (wireguard-go) gets its speed: the TUN device is opened
//! with a virtio-net header in front of every packet, and consecutive TCP segments of one
//! flow that arrive in one batch from the network are coalesced into a single large packet
//! the kernel takes as one GSO unit (TCP receive work per 64 KiB, not per 1280 bytes).
//! Pure: packets in, the parts of each packet to write out.

/// `struct virtio_net_hdr` (legacy, little-endian): flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset.
pub const VNET_HDR_LEN: usize = 10;
const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
/// A GSO packet's IP length field caps it; wireguard-go also caps the segment count.
const MAX_SUPER: usize = 65535;
const MAX_SEGMENTS: usize = 64;
const TCP: u8 = 6;
const TCP_FLAGS_ACK: u8 = 0x10;
const TCP_FLAGS_PSH: u8 = 0x08;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flow {
    v6: bool,
    src: [u8; 16],
    dst: [u8; 16],
    ports: [u8; 4],
    ack: [u8; 4],
}

/// The parts of a TCP packet coalescing looks at.
#[derive(Debug, Clone, Copy)]
struct Segment {
    flow: Flow,
    ip_hlen: usize,
    tcp_hlen: usize,
    seq: u32,
    psh: bool,
    /// IPv4 TOS/TTL/DF or IPv6 traffic class/hop limit: must match to merge.
    ip_attrs: [u8; 3],
}

fn segment(p: &[u8]) -> Option<Segment> {
    let (v6, ip_hlen, proto, attrs, src, dst) = match p.first()? >> 4 {
        4 => {
            let ihl = (p[0] & 0x0f) as usize * 4;
            let frag = u16::from_be_bytes([*p.get(6)?, *p.get(7)?]);
            // Options or fragments: not worth the care; passed on alone.
            if ihl != 20 || frag & 0x3fff != 0 || p.len() < 40 {
                return None;
            }
            let total = u16::from_be_bytes([p[2], p[3]]) as usize;
            if total != p.len() {
                return None;
            }
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src[..4].copy_from_slice(&p[12..16]);
            dst[..4].copy_from_slice(&p[16..20]);
            (false, 20, p[9], [p[1], p[8], p[6] & 0x40], src, dst)
        }
        6 => {
            if p.len() < 60 || u16::from_be_bytes([p[4], p[5]]) as usize + 40 != p.len() {
                return None;
            }
            let tc = (p[0] << 4) | (p[1] >> 4);
            (
                true,
                40,
                p[6],
                [tc, p[7], 0],
                p[8..24].try_into().ok()?,
                p[24..40].try_into().ok()?,
            )
        }
        _ => return None,
    };
    if proto != TCP {
        return None;
    }
    let tcp = &p[ip_hlen..];
    let tcp_hlen = (tcp.get(12)? >> 4) as usize * 4;
    let flags = tcp[13];
    // Only plain data segments merge: no SYN/FIN/RST/URG/ECE/CWR, and some payload.
    if tcp_hlen < 20 || tcp.len() <= tcp_hlen || flags & !TCP_FLAGS_PSH != TCP_FLAGS_ACK {
        return None;
    }
    Some(Segment {
        flow: Flow {
            v6,
            src,
            dst,
            ports: tcp[..4].try_into().ok()?,
            ack: tcp[8..12].try_into().ok()?,
        },
        ip_hlen,
        tcp_hlen,
        seq: u32::from_be_bytes(tcp[4..8].try_into().ok()?),
        psh: flags & TCP_FLAGS_PSH != 0,
        ip_attrs: attrs,
    })
}

struct Group {
    /// The first packet whole, then the others, of which only the payload goes out: the
    /// merged packet is written from them as they are (`writev`), not copied together.
    packets: Vec<Vec<u8>>,
    first: Option<Segment>,
    /// The merged packet's IP length.
    len: usize,
    gso_size: usize,
    next_seq: u32,
    closed: bool,
}

impl Group {
    /// Whether `s` (whole packet `p`) continues this group's flow exactly.
    fn takes(&self, s: &Segment, p: &[u8]) -> bool {
        let Some(f) = &self.first else { return false };
        let payload = p.len() - s.ip_hlen - s.tcp_hlen;
        let options = s.ip_hlen + 20..s.ip_hlen + s.tcp_hlen;
        !self.closed
            && f.flow == s.flow
            && f.ip_attrs == s.ip_attrs
            && f.tcp_hlen == s.tcp_hlen
            && self.next_seq == s.seq
            && payload <= self.gso_size
            && self.packets.len() < MAX_SEGMENTS
            && self.len + payload <= MAX_SUPER
            && self.packets[0][options.clone()] == p[options]
    }
}

/// Collects one batch of packets for the TUN device and merges TCP segments per flow.
#[derive(Default)]
pub struct Coalescer {
    groups: Vec<Group>,
    /// Emptied packet lists of written groups, so the next batch allocates none.
    spare: Vec<Vec<Vec<u8>>>,
}

impl Coalescer {
    fn new_group(&mut self, p: Vec<u8>, first: Option<Segment>) {
        let (gso_size, next_seq) = match &first {
            Some(s) => {
                let payload = p.len() - s.ip_hlen - s.tcp_hlen;
                (payload, s.seq.wrapping_add(payload as u32))
            }
            None => (0, 0),
        };
        let mut packets = self.spare.pop().unwrap_or_default();
        let len = p.len();
        packets.push(p);
        self.groups.push(Group {
            packets,
            closed: first.is_none_or(|s| s.psh),
            first,
            len,
            gso_size,
            next_seq,
        });
    }

    /// One IP packet for the TUN device.
    pub fn push(&mut self, p: Vec<u8>) {
        let Some(s) = segment(&p) else {
            return self.new_group(p, None);
        };
        // The flow's group is usually the last one; look back a little for interleaved flows.
        let found = self
            .groups
            .iter()
            .rev()
            .take(8)
            .position(|g| g.takes(&s, &p))
            .map(|i| self.groups.len() - 1 - i);
        let Some(i) = found else {
            return self.new_group(p, Some(s));
        };
        let g = &mut self.groups[i];
        let payload = p.len() - s.ip_hlen - s.tcp_hlen;
        g.len += payload;
        g.next_seq = g.next_seq.wrapping_add(payload as u32);
        // A short segment or PSH ends what the kernel may resegment evenly.
        g.closed = payload < g.gso_size || s.psh;
        if s.psh {
            // PSH of the last segment carries over to the merged packet.
            g.packets[0][s.ip_hlen + 13] |= TCP_FLAGS_PSH;
        }
        g.packets.push(p);
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Hands `write` each packet to write, as a virtio-net header and the parts of the
    /// packet (the first packet whole, the payloads of those merged into it); the packets'
    /// buffers go to `spent` afterwards.
    pub fn finish(
        &mut self,
        mut write: impl FnMut(&[std::io::IoSlice<'_>]),
        spent: &mut Vec<Vec<u8>>,
    ) {
        for mut g in self.groups.drain(..) {
            let mut hdr = [0u8; VNET_HDR_LEN];
            if let (Some(s), true) = (g.first, g.packets.len() > 1) {
                hdr = finalize(&mut g.packets[0], g.len, &s, g.gso_size);
            }
            let skip = g.first.map_or(0, |s| s.ip_hlen + s.tcp_hlen);
            let mut iov = [std::io::IoSlice::new(&[]); MAX_SEGMENTS + 1];
            iov[0] = std::io::IoSlice::new(&hdr);
            for (i, p) in g.packets.iter().enumerate() {
                iov[i + 1] = std::io::IoSlice::new(if i == 0 { p } else { &p[skip..] });
            }
            write(&iov[..g.packets.len() + 1]);
            spent.append(&mut g.packets);
            self.spare.push(g.packets);
        }
        self.spare.truncate(64);
    }
}

/// Lengths, the IPv4 header checksum and the TCP pseudo-header checksum of the merged
/// packet (`ip_len` long) in its first packet's headers; returns its GSO header.
fn finalize(packet: &mut [u8], ip_len: usize, s: &Segment, gso_size: usize) -> [u8; VNET_HDR_LEN] {
    let tcp_len = ip_len - s.ip_hlen;
    if s.flow.v6 {
        packet[4..6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
    } else {
        packet[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
        packet[10..12].copy_from_slice(&[0, 0]);
        let c = !fold(sum(&packet[..20], 0));
        packet[10..12].copy_from_slice(&c.to_be_bytes());
    }
    let addr_len = if s.flow.v6 { 16 } else { 4 };
    let mut pseudo = sum(&s.flow.src[..addr_len], 0);
    pseudo = sum(&s.flow.dst[..addr_len], pseudo);
    pseudo += TCP as u32 + tcp_len as u32;
    // CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum; the kernel adds the rest.
    let off = s.ip_hlen + 16;
    packet[off..off + 2].copy_from_slice(&fold(pseudo).to_be_bytes());
    let mut hdr = [0u8; VNET_HDR_LEN];
    hdr[0] = F_NEEDS_CSUM;
    hdr[1] = if s.flow.v6 { GSO_TCPV6 } else { GSO_TCPV4 };
    hdr[2..4].copy_from_slice(&((s.ip_hlen + s.tcp_hlen) as u16).to_le_bytes());
    hdr[4..6].copy_from_slice(&(gso_size as u16).to_le_bytes());
    hdr[6..8].copy_from_slice(&(s.ip_hlen as u16).to_le_bytes());
    hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
    hdr
}

fn sum(b: &[u8], mut acc: u32) -> u32 {
    let mut chunks = b.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u32) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// A read from the TUN device (virtio-net header, then a packet): each IP packet it holds
/// goes to `each`, with checksums complete. With TSO enabled the kernel hands us up to
/// 64 KiB of one TCP flow at once; it is cut into segments of the size it asks for, as the
/// NIC would (`scratch` holds one segment at a time). Malformed reads are dropped.
pub fn from_tun(buf: &mut [u8], scratch: &mut Vec<u8>, mut each: impl FnMut(&[u8])) {
    let Some((hdr, packet)) = buf.split_at_mut_checked(VNET_HDR_LEN) else {
        return;
    };
    let gso_size = u16::from_le_bytes([hdr[4], hdr[5]]) as usize;
    match hdr[1] {
        GSO_NONE => {
            if hdr[0] & F_NEEDS_CSUM != 0 {
                let start = u16::from_le_bytes([hdr[6], hdr[7]]) as usize;
                let off = start + u16::from_le_bytes([hdr[8], hdr[9]]) as usize;
                if start > packet.len() || off + 2 > packet.len() {
                    return;
                }
                // The field holds the pseudo-header sum; sum the rest over it, complement.
                let c = !fold(sum(&packet[start..], 0));
                packet[off..off + 2].copy_from_slice(&c.to_be_bytes());
            }
            each(packet)
        }
        GSO_TCPV4 | GSO_TCPV6 if gso_size > 0 => split(packet, gso_size, scratch, each),
        _ => {}
    }
}

/// TSO in software: every segment gets the headers, its sequence number, lengths, the IPv4
/// id and checksum, and a full TCP checksum; FIN and PSH stay on the last, CWR on the first.
fn split(packet: &[u8], mss: usize, seg: &mut Vec<u8>, mut each: impl FnMut(&[u8])) {
    let v6 = packet.first().is_some_and(|b| b >> 4 == 6);
    let ip_hlen = if v6 {
        40
    } else {
        packet.first().map_or(0, |b| (b & 0x0f) as usize * 4)
    };
    let Some(tcp_hlen) = packet.get(ip_hlen + 12).map(|b| (b >> 4) as usize * 4) else {
        return;
    };
    let hlen = ip_hlen + tcp_hlen;
    if ip_hlen < 20 || tcp_hlen < 20 || packet.len() <= hlen {
        return;
    }
    let (head, payload) = packet.split_at(hlen);
    let seq0 = u32::from_be_bytes(head[ip_hlen + 4..ip_hlen + 8].try_into().expect("4"));
    let id0 = u16::from_be_bytes([head[4], head[5]]);
    let chunks = payload.len().div_ceil(mss);
    for (i, chunk) in payload.chunks(mss).enumerate() {
        seg.clear();
        seg.extend_from_slice(head);
        seg.extend_from_slice(chunk);
        let tcp_len = tcp_hlen + chunk.len();
        if v6 {
            seg[4..6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
        } else {
            seg[2..4].copy_from_slice(&((ip_hlen + tcp_len) as u16).to_be_bytes());
            seg[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
            seg[10..12].copy_from_slice(&[0, 0]);
            let c = !fold(sum(&seg[..ip_hlen], 0));
            seg[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let t = ip_hlen;
        let seq = seq0.wrapping_add((i * mss) as u32);
        seg[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        if i + 1 < chunks {
            seg[t + 13] &= !(0x01 | TCP_FLAGS_PSH);
        }
        if i > 0 {
            seg[t + 13] &= !0x80;
        }
        seg[t + 16..t + 18].copy_from_slice(&[0, 0]);
        let (src, dst) = if v6 {
            (8..24, 24..40)
        } else {
            (12..16, 16..20)
        };
        let mut acc = sum(&seg[src], 0);
        acc = sum(&seg[dst], acc) + TCP as u32 + tcp_len as u32;
        let c = !fold(sum(&seg[t..], acc));
        seg[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
        each(seg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP/IPv4 segment with valid checksums.
    fn tcp4(seq: u32, payload: &[u8], flags: u8) -> Vec<u8> {
        let total = 20 + 32 + payload.len();
        let mut p = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, TCP, 0, 0];
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p.extend_from_slice(&[100, 64, 0, 2, 100, 64, 0, 1]);
        let c = !fold(sum(&p, 0));
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let mut t = vec![0x9c, 0x40, 0, 22];
        t.extend_from_slice(&seq.to_be_bytes());
        t.extend_from_slice(&7u32.to_be_bytes());
        t.extend_from_slice(&[0x80, flags, 0x01, 0xf5, 0, 0, 0, 0]);
        // Timestamps option, as Linux sends it: NOP NOP TS.
        t.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        t.extend_from_slice(payload);
        let mut pseudo = sum(&p[12..20], 0) + TCP as u32 + t.len() as u32;
        pseudo = sum(&t, pseudo);
        let c = !fold(pseudo);
        t[16..18].copy_from_slice(&c.to_be_bytes());
        p.extend(t);
        p
    }

    fn valid_tcp_checksum(packet: &[u8]) -> bool {
        let t = &packet[20..];
        let pseudo = sum(&packet[12..20], 0) + TCP as u32 + t.len() as u32;
        fold(sum(t, pseudo)) == 0xffff
    }

    /// What the TUN device gets from a batch: each write's parts put together.
    fn merged(c: &mut Coalescer) -> Vec<Vec<u8>> {
        let (mut out, mut spent) = (vec![], vec![]);
        let mut pushed = 0;
        c.finish(
            |parts| {
                pushed += parts.len() - 1;
                out.push(parts.iter().flat_map(|p| p.iter().copied()).collect());
            },
            &mut spent,
        );
        assert!(c.is_empty());
        assert_eq!(spent.len(), pushed, "every packet's buffer comes back");
        out
    }

    #[test]
    fn a_run_of_segments_becomes_one_gso_packet() {
        let mut c = Coalescer::default();
        let mss = 1188;
        for i in 0..5u32 {
            c.push(tcp4(
                1000 + i * mss,
                &vec![i as u8; mss as usize],
                TCP_FLAGS_ACK,
            ));
        }
        c.push(tcp4(
            1000 + 5 * mss,
            &[9; 100],
            TCP_FLAGS_ACK | TCP_FLAGS_PSH,
        ));
        let out = merged(&mut c);
        assert_eq!(out.len(), 1);
        let b = &out[0];
        assert_eq!(b[0], F_NEEDS_CSUM);
        assert_eq!(b[1], GSO_TCPV4);
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), 52);
        assert_eq!(u16::from_le_bytes([b[4], b[5]]) as u32, mss);
        assert_eq!(
            (
                u16::from_le_bytes([b[6], b[7]]),
                u16::from_le_bytes([b[8], b[9]])
            ),
            (20, 16)
        );
        let p = &b[VNET_HDR_LEN..];
        assert_eq!(p.len(), 52 + 5 * mss as usize + 100);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]) as usize, p.len());
        assert_eq!(fold(sum(&p[..20], 0)), 0xffff, "IPv4 header checksum");
        assert_ne!(
            p[20 + 13] & TCP_FLAGS_PSH,
            0,
            "PSH of the last segment kept"
        );
        // What the kernel does with CHECKSUM_PARTIAL: sum from csum_start over the field.
        let mut done = b.clone();
        let fixed = from_tun_partial(&mut done);
        assert!(valid_tcp_checksum(&fixed));
        assert_eq!(&p[52..52 + mss as usize], &vec![0u8; mss as usize][..]);
    }

    fn read(b: &mut [u8]) -> Vec<Vec<u8>> {
        let mut got = vec![];
        from_tun(b, &mut vec![], |p| got.push(p.to_vec()));
        got
    }

    /// A GSO packet's checksum completed as for a single packet (what the kernel does).
    fn from_tun_partial(b: &mut [u8]) -> Vec<u8> {
        b[1] = GSO_NONE;
        read(b).remove(0)
    }

    #[test]
    fn gaps_other_flows_and_control_segments_stay_apart() {
        let mut c = Coalescer::default();
        c.push(tcp4(1, &[1; 100], TCP_FLAGS_ACK));
        c.push(tcp4(500, &[2; 100], TCP_FLAGS_ACK)); // a gap: new group
        c.push(tcp4(600, &[3; 100], TCP_FLAGS_ACK | 0x01)); // FIN: alone
        c.push(tcp4(600, &[], TCP_FLAGS_ACK)); // pure ACK: alone
        c.push(vec![0x45, 0, 0, 20]); // not even a whole header
        let out = merged(&mut c);
        assert_eq!(out.len(), 5);
        for b in &out {
            assert_eq!(
                &b[..VNET_HDR_LEN],
                &[0; VNET_HDR_LEN],
                "single packets need no offload"
            );
        }
        assert!(valid_tcp_checksum(&out[0][VNET_HDR_LEN..]));
        assert!(c.is_empty());
        // A longer segment after a shorter one cannot merge (the kernel splits evenly).
        c.push(tcp4(1, &[1; 100], TCP_FLAGS_ACK));
        c.push(tcp4(101, &[1; 200], TCP_FLAGS_ACK));
        assert_eq!(merged(&mut c).len(), 2);
    }

    #[test]
    fn reads_complete_partial_checksums_and_refuse_gso() {
        let mut p = tcp4(1, &[5; 33], TCP_FLAGS_ACK);
        let good = p.clone();
        // The kernel leaves the pseudo-header sum in the field for CHECKSUM_PARTIAL.
        let pseudo = fold(sum(&p[12..20], 0) + TCP as u32 + (p.len() - 20) as u32);
        p[36..38].copy_from_slice(&pseudo.to_be_bytes());
        let mut b = vec![F_NEEDS_CSUM, GSO_NONE, 0, 0, 0, 0, 20, 0, 16, 0];
        b.extend_from_slice(&p);
        assert_eq!(read(&mut b), vec![good]);
        let mut gso = vec![0, GSO_TCPV4, 0, 0, 100, 0, 0, 0, 0, 0, 0x45];
        assert!(read(&mut gso).is_empty());
        assert!(read(&mut [0u8; 3]).is_empty());
    }

    #[test]
    fn tso_reads_split_back_into_the_segments() {
        let mss = 1000u32;
        let originals: Vec<Vec<u8>> = (0..4u32)
            .map(|i| {
                let len = if i == 3 { 10 } else { mss as usize };
                let flags = if i == 3 {
                    TCP_FLAGS_ACK | TCP_FLAGS_PSH
                } else {
                    TCP_FLAGS_ACK
                };
                tcp4(7 + i * mss, &vec![i as u8 + 1; len], flags)
            })
            .collect();
        let mut c = Coalescer::default();
        for o in &originals {
            c.push(o.clone());
        }
        let mut merged = merged(&mut c).remove(0);
        assert_eq!(merged[1], GSO_TCPV4);
        let got = read(&mut merged);
        assert_eq!(got.len(), 4);
        for (i, (g, o)) in got.iter().zip(&originals).enumerate() {
            assert!(valid_tcp_checksum(g), "segment {i}");
            assert_eq!(fold(sum(&g[..20], 0)), 0xffff, "segment {i} IPv4 checksum");
            assert_eq!(
                u16::from_be_bytes([g[4], g[5]]),
                0x1234 + i as u16,
                "IPv4 id"
            );
            // Equal to what was merged, apart from the id and the checksums it changes.
            let strip = |p: &[u8]| {
                let mut p = p.to_vec();
                p[4..6].fill(0);
                p[10..12].fill(0);
                p[36..38].fill(0);
                p
            };
            assert_eq!(strip(g), strip(o), "segment {i}");
        }
    }
}
