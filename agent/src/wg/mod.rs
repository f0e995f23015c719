//! WireGuard with boringtun: one `Tunn` per peer, keyed by node keys. `Wg` takes packets
//! from the network and from the TUN device and returns what to send to which peer; which
//! path (direct UDP or DERP) carries it is `dataplane`'s choice.

use boringtun::noise::{Packet, Tunn, TunnResult, handshake::parse_handshake_anon};
use std::collections::HashMap;
use std::net::IpAddr;
use x25519_dalek::{PublicKey, StaticSecret};

/// What to do with a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// A WireGuard datagram for the peer with this node key.
    ToPeer([u8; 32], Vec<u8>),
    WriteTun(Vec<u8>),
}

/// What `Wg::stats` reports for one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerStats {
    pub last_handshake: Option<std::time::Duration>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

/// A peer as the netmap describes it.
#[derive(Debug, Clone)]
pub struct PeerSpec {
    pub node_key: [u8; 32],
    pub allowed: Vec<(IpAddr, u8)>,
}

struct Peer {
    spec: PeerSpec,
    tunn: Tunn,
}

pub struct Wg {
    our: StaticSecret,
    our_pub: PublicKey,
    slots: Vec<Option<Peer>>,
    by_key: HashMap<[u8; 32], usize>,
    buf: Vec<u8>,
    filter: crate::filter::Filter,
    /// Spent packet buffers, reused so the data path does not allocate per packet.
    pool: Vec<Vec<u8>>,
}

/// Most buffers kept for reuse: a few batches' worth.
const POOL: usize = 512;

fn take(pool: &mut Vec<Vec<u8>>, p: &[u8]) -> Vec<u8> {
    let mut v = pool.pop().unwrap_or_default();
    v.clear();
    v.extend_from_slice(p);
    v
}

fn contains(net: &(IpAddr, u8), ip: IpAddr) -> bool {
    match (net.0, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            net.1 == 0
                || u32::from(n) >> (32 - net.1.min(32)) == u32::from(a) >> (32 - net.1.min(32))
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            net.1 == 0
                || u128::from(n) >> (128 - net.1.min(128))
                    == u128::from(a) >> (128 - net.1.min(128))
        }
        _ => false,
    }
}

/// The destination address of an IP packet.
pub fn destination(p: &[u8]) -> Option<IpAddr> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => Some(IpAddr::from(<[u8; 4]>::try_from(&p[16..20]).ok()?)),
        6 if p.len() >= 40 => Some(IpAddr::from(<[u8; 16]>::try_from(&p[24..40]).ok()?)),
        _ => None,
    }
}

impl Wg {
    pub fn new(our: StaticSecret) -> Wg {
        let our_pub = PublicKey::from(&our);
        Wg {
            our,
            our_pub,
            slots: vec![],
            by_key: HashMap::new(),
            buf: vec![0u8; 65536 + 256],
            filter: crate::filter::Filter::allow_all(),
            pool: vec![],
        }
    }

    /// The packet filter that inbound packets must pass.
    /// Takes back buffers of packets that were sent or written.
    pub fn recycle(&mut self, bufs: impl IntoIterator<Item = Vec<u8>>) {
        let room = POOL.saturating_sub(self.pool.len());
        self.pool.extend(bufs.into_iter().take(room));
    }

    /// Open flows carry over, so replies on them keep passing across policy updates.
    pub fn set_filter(&mut self, mut filter: crate::filter::Filter) {
        filter.keep_flows_of(std::mem::take(&mut self.filter));
        self.filter = filter;
    }

    /// Makes the peer set equal to `peers`: new ones get a tunnel, gone ones lose theirs,
    /// existing ones keep their session and learn new allowed IPs.
    pub fn sync(&mut self, peers: Vec<PeerSpec>) {
        let wanted: HashMap<[u8; 32], PeerSpec> =
            peers.into_iter().map(|p| (p.node_key, p)).collect();
        for (key, slot) in self.by_key.clone() {
            if !wanted.contains_key(&key) {
                self.slots[slot] = None;
                self.by_key.remove(&key);
            }
        }
        for (key, spec) in wanted {
            match self.by_key.get(&key) {
                Some(&slot) => {
                    if let Some(p) = self.slots[slot].as_mut() {
                        p.spec = spec;
                    }
                }
                None => {
                    let slot = self
                        .slots
                        .iter()
                        .position(Option::is_none)
                        .unwrap_or(self.slots.len());
                    let tunn = Tunn::new(
                        self.our.clone(),
                        PublicKey::from(key),
                        None,
                        None,
                        slot as u32,
                        None,
                    );
                    let peer = Peer { spec, tunn };
                    if slot == self.slots.len() {
                        self.slots.push(Some(peer));
                    } else {
                        self.slots[slot] = Some(peer);
                    }
                    self.by_key.insert(key, slot);
                }
            }
        }
    }

    fn slot_for(&self, datagram: &[u8]) -> Option<usize> {
        match Tunn::parse_incoming_packet(datagram).ok()? {
            Packet::HandshakeInit(init) => {
                let half = parse_handshake_anon(&self.our, &self.our_pub, &init).ok()?;
                self.by_key.get(&half.peer_static_public).copied()
            }
            Packet::HandshakeResponse(r) => Some((r.receiver_idx >> 8) as usize),
            Packet::PacketCookieReply(r) => Some((r.receiver_idx >> 8) as usize),
            Packet::PacketData(d) => Some((d.receiver_idx >> 8) as usize),
        }
    }

    /// A datagram from the network (`src_ip` is the sender's address on a direct path,
    /// `None` via DERP). Returns the peer it belongs to if it was valid WireGuard.
    pub fn from_network(
        &mut self,
        src_ip: Option<IpAddr>,
        datagram: &[u8],
        out: &mut Vec<Action>,
    ) -> Option<[u8; 32]> {
        let slot = self.slot_for(datagram)?;
        let peer = self.slots.get_mut(slot).and_then(Option::as_mut)?;
        let key = peer.spec.node_key;
        match peer.tunn.decapsulate(src_ip, datagram, &mut self.buf) {
            TunnResult::WriteToNetwork(p) => {
                out.push(Action::ToPeer(key, take(&mut self.pool, p)));
                // Packets queued while the handshake ran go out now.
                while let TunnResult::WriteToNetwork(p) =
                    peer.tunn.decapsulate(None, &[], &mut self.buf)
                {
                    out.push(Action::ToPeer(key, take(&mut self.pool, p)));
                }
            }
            TunnResult::WriteToTunnelV4(p, a) => {
                if peer.spec.allowed.iter().any(|n| contains(n, IpAddr::V4(a)))
                    && self.filter.allow_in(p)
                {
                    out.push(Action::WriteTun(take(&mut self.pool, p)));
                }
            }
            TunnResult::WriteToTunnelV6(p, a) => {
                if peer.spec.allowed.iter().any(|n| contains(n, IpAddr::V6(a)))
                    && self.filter.allow_in(p)
                {
                    out.push(Action::WriteTun(take(&mut self.pool, p)));
                }
            }
            TunnResult::Done => {}
            TunnResult::Err(e) => {
                tracing::debug!(?src_ip, error = ?e, "WireGuard packet dropped");
                return None;
            }
        }
        Some(key)
    }

    /// An IP packet from the TUN device.
    pub fn from_tun(&mut self, packet: &[u8], out: &mut Vec<Action>) {
        let Some(dst) = destination(packet) else {
            return;
        };
        let Some(peer) = self
            .slots
            .iter_mut()
            .flatten()
            .find(|p| p.spec.allowed.iter().any(|n| contains(n, dst)))
        else {
            return;
        };
        self.filter.note_out(packet);
        if let TunnResult::WriteToNetwork(p) = peer.tunn.encapsulate(packet, &mut self.buf) {
            out.push(Action::ToPeer(peer.spec.node_key, take(&mut self.pool, p)));
        }
    }

    /// Per peer, by node key: the path in use, the last handshake's age and the byte counts.
    pub fn stats(&self) -> HashMap<[u8; 32], PeerStats> {
        self.slots
            .iter()
            .flatten()
            .map(|p| {
                let (handshake, tx, rx, _, _) = p.tunn.stats();
                let s = PeerStats {
                    last_handshake: handshake,
                    tx_bytes: tx as u64,
                    rx_bytes: rx as u64,
                };
                (p.spec.node_key, s)
            })
            .collect()
    }

    /// Drives handshake and keep-alive timers; call every 100-250 ms.
    pub fn tick(&mut self, out: &mut Vec<Action>) {
        for peer in self.slots.iter_mut().flatten() {
            if let TunnResult::WriteToNetwork(p) = peer.tunn.update_timers(&mut self.buf) {
                out.push(Action::ToPeer(peer.spec.node_key, take(&mut self.pool, p)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(key: &StaticSecret, ip: &str) -> PeerSpec {
        PeerSpec {
            node_key: *PublicKey::from(key).as_bytes(),
            allowed: vec![(ip.parse().unwrap(), 32)],
        }
    }

    fn ping(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0]);
        p
    }

    #[test]
    fn two_instances_talk_through_a_handshake() {
        let (ka, kb) = (StaticSecret::from([1; 32]), StaticSecret::from([2; 32]));
        let (pa, pb) = (
            *PublicKey::from(&ka).as_bytes(),
            *PublicKey::from(&kb).as_bytes(),
        );
        let (mut a, mut b) = (Wg::new(ka.clone()), Wg::new(kb.clone()));
        a.sync(vec![spec(&kb, "100.64.0.2")]);
        b.sync(vec![spec(&ka, "100.64.0.1")]);
        // a sends to b: the first packet starts a handshake.
        let mut out = vec![];
        a.from_tun(&ping([100, 64, 0, 1], [100, 64, 0, 2]), &mut out);
        let mut delivered = vec![];
        for _ in 0..4 {
            let mut next = vec![];
            for act in out.drain(..) {
                match act {
                    Action::ToPeer(to, p) if to == pb => {
                        assert_eq!(b.from_network(None, &p, &mut next), Some(pa));
                    }
                    Action::ToPeer(_, p) => {
                        assert_eq!(a.from_network(None, &p, &mut next), Some(pb));
                    }
                    Action::WriteTun(p) => delivered.push(p),
                }
            }
            out = next;
        }
        assert_eq!(delivered, vec![ping([100, 64, 0, 1], [100, 64, 0, 2])]);
        let mut out = vec![];
        b.from_tun(&ping([100, 64, 0, 2], [100, 64, 0, 1]), &mut out);
        let Action::ToPeer(_, p) = &out[0] else {
            panic!("{out:?}")
        };
        let mut got = vec![];
        a.from_network(None, p, &mut got);
        assert!(matches!(&got[..], [Action::WriteTun(_)]));
        // A source outside the peer's allowed IPs is not delivered.
        let mut out = vec![];
        b.from_tun(&ping([100, 64, 0, 9], [100, 64, 0, 1]), &mut out);
        let Action::ToPeer(_, p) = &out[0] else {
            panic!("{out:?}")
        };
        let mut got = vec![];
        a.from_network(None, p, &mut got);
        assert!(got.is_empty());
        let st = a.stats()[&pb];
        assert!(
            st.last_handshake.is_some() && st.tx_bytes > 0 && st.rx_bytes > 0,
            "{st:?}"
        );
        b.sync(vec![]);
        assert!(b.stats().is_empty());
    }

    #[test]
    fn garbage_is_dropped() {
        let mut w = Wg::new(StaticSecret::from([1; 32]));
        let mut out = vec![];
        assert_eq!(
            w.from_network(
                Some([192, 0, 2, 9].into()),
                &[4, 0, 0, 0, 1, 2, 3],
                &mut out
            ),
            None
        );
        w.from_tun(&[0x45, 0], &mut out);
        assert!(out.is_empty());
    }
}
