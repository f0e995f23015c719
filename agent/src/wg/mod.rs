//! WireGuard with boringtun: one `Tunn` per peer, keyed by node keys. `Wg` takes packets
//! from the network and from the TUN device and returns what to send to which peer; which
//! path (direct UDP or DERP) carries it is `dataplane`'s choice.
//!
//! Anyone can send to our UDP port, so what a datagram costs before it is known to come
//! from someone who holds our public key matters: every handshake message has its `mac1`
//! checked (one keyed BLAKE2s) before any X25519, and one rate limiter shared by all peers
//! answers handshakes with cookie replies once more than [`HANDSHAKES_PER_SECOND`] arrive
//! in a second, as wireguard-go and boringtun's own device do.
//!
//! A peer's `Tunn` is made when we first send to it or it sends us a handshake: making one
//! costs an X25519 (the static-static secret), and of thousands of peers in a large tailnet a
//! firewall talks to a few. Only peers with a `Tunn` have timers to drive.

mod table;

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult, handshake::parse_handshake_anon};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use table::Table;
use x25519_dalek::{PublicKey, StaticSecret};

/// Handshake messages per second (all peers together) before the limiter wants cookies:
/// boringtun's device uses the same figure.
pub const HANDSHAKES_PER_SECOND: u64 = 100;

/// What to do with a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// A WireGuard datagram for the peer with this node key.
    ToPeer([u8; 32], Vec<u8>),
    /// A cookie reply, for the address the datagram came from (a handshake under load).
    Reply(Vec<u8>),
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
    /// The prefixes this peer is trusted with: its own addresses, and the routes it serves
    /// that we accept. Packets from it must come from one of them (longest match among all
    /// peers), and packets to them go to it.
    pub allowed: Vec<(IpAddr, u8)>,
}

struct Peer {
    spec: PeerSpec,
    /// Made at first use (see the module's comment). Boxed: a `Tunn` is 11 KB, and kept in
    /// the slot itself that would be 11 KB for each of thousands of peers that have none.
    tunn: Option<Box<Tunn>>,
}

/// `peer`'s tunnel in `slot`, made now if it has none (and `slot` noted in `live`).
fn tunnel<'a>(
    peer: &'a mut Peer,
    slot: usize,
    our: &StaticSecret,
    limiter: &Arc<RateLimiter>,
    live: &mut Vec<usize>,
) -> &'a mut Tunn {
    let key = peer.spec.node_key;
    peer.tunn.get_or_insert_with(|| {
        live.push(slot);
        Box::new(Tunn::new(
            our.clone(),
            PublicKey::from(key),
            None,
            None,
            slot as u32,
            Some(limiter.clone()),
        ))
    })
}

pub struct Wg {
    our: StaticSecret,
    our_pub: PublicKey,
    slots: Vec<Option<Peer>>,
    /// Empty slots, for the next new peer.
    free: Vec<usize>,
    by_key: HashMap<[u8; 32], usize>,
    /// The slots of peers that have a `Tunn`: the only ones `tick` visits.
    live: Vec<usize>,
    /// Every peer's allowed prefixes: where packets go, and which sources each may use.
    table: Table,
    limiter: Arc<RateLimiter>,
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

/// Room for any handshake message boringtun writes (an initiation is 148 bytes) in place
/// of the packet it was given.
const HANDSHAKE_ROOM: usize = 256;

/// A buffer from the pool for boringtun to write one packet into, so that the packet needs
/// no copy afterwards. A reused buffer is only zeroed beyond what it held before: for a
/// stream of same-sized packets, nothing.
fn room(pool: &mut Vec<Vec<u8>>, n: usize) -> Vec<u8> {
    let mut v = pool.pop().unwrap_or_default();
    v.resize(n.max(HANDSHAKE_ROOM), 0);
    v
}

/// `buf` cut down to `p`, a packet boringtun wrote into it (which it does from its start).
fn keep(mut buf: Vec<u8>, p: std::ops::Range<usize>) -> Vec<u8> {
    buf.truncate(p.end);
    buf.drain(..p.start);
    buf
}

/// Where `p`, a slice of the buffer that starts at `base`, lies in it.
fn span(base: *const u8, p: &[u8]) -> std::ops::Range<usize> {
    let start = p.as_ptr() as usize - base as usize;
    start..start + p.len()
}

/// What boringtun wrote into a buffer of ours, and where in it.
enum Written {
    Network(std::ops::Range<usize>),
    Tun(std::ops::Range<usize>),
    Nothing,
}

/// Whether `datagram` is a WireGuard transport data message (type 4).
pub fn is_data(datagram: &[u8]) -> bool {
    datagram.len() >= 32 && datagram[..4] == [4, 0, 0, 0]
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
    /// Starts with no peers and a filter that lets nothing in: until headscale's policy is
    /// in force, no packet from a peer reaches the host (tailscaled starts allow-none too).
    pub fn new(our: StaticSecret) -> Wg {
        let our_pub = PublicKey::from(&our);
        Wg {
            limiter: Arc::new(RateLimiter::new(&our_pub, HANDSHAKES_PER_SECOND)),
            our,
            our_pub,
            slots: vec![],
            free: vec![],
            by_key: HashMap::new(),
            live: vec![],
            table: Table::default(),
            buf: vec![0u8; 65536 + 256],
            filter: crate::filter::Filter::deny_all(),
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
    /// existing ones keep their session and learn new allowed IPs. The engine keeps its own
    /// peer set and calls [`Wg::upsert`] and [`Wg::remove`]; the tests set up with this.
    #[cfg(test)]
    pub fn sync(&mut self, peers: Vec<PeerSpec>) {
        let wanted: HashMap<[u8; 32], PeerSpec> =
            peers.into_iter().map(|p| (p.node_key, p)).collect();
        let gone: Vec<[u8; 32]> = self
            .by_key
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .copied()
            .collect();
        for key in gone {
            self.remove(&key);
        }
        for spec in wanted.into_values() {
            self.upsert(spec);
        }
    }

    /// Adds a peer, or gives a known one (its session kept) new allowed IPs. Costs the
    /// peer's own prefixes, whatever the number of peers.
    pub fn upsert(&mut self, spec: PeerSpec) {
        let key = spec.node_key;
        if let Some(&slot) = self.by_key.get(&key) {
            let Some(p) = self.slots[slot].as_mut() else {
                return;
            };
            if p.spec.allowed == spec.allowed {
                return;
            }
            for &(ip, len) in &p.spec.allowed {
                self.table.remove(ip, len, &key);
            }
            for &(ip, len) in &spec.allowed {
                self.table.insert(ip, len, key, slot);
            }
            p.spec = spec;
            return;
        }
        let slot = self.free.pop().unwrap_or(self.slots.len());
        for &(ip, len) in &spec.allowed {
            self.table.insert(ip, len, key, slot);
        }
        let peer = Peer { spec, tunn: None };
        if slot == self.slots.len() {
            self.slots.push(Some(peer));
        } else {
            self.slots[slot] = Some(peer);
        }
        self.by_key.insert(key, slot);
    }

    /// Removes a peer and its session.
    pub fn remove(&mut self, key: &[u8; 32]) {
        let Some(slot) = self.by_key.remove(key) else {
            return;
        };
        if let Some(p) = self.slots[slot].take() {
            for &(ip, len) in &p.spec.allowed {
                self.table.remove(ip, len, key);
            }
            if p.tunn.is_some()
                && let Some(i) = self.live.iter().position(|&s| s == slot)
            {
                self.live.swap_remove(i);
            }
        }
        self.free.push(slot);
    }

    /// The peer a verified packet belongs to. Only a handshake initiation needs our private
    /// key to tell (the sender's static key is encrypted), and only one whose `mac1` proved
    /// that its sender knows our public key gets that far.
    fn slot_for(&self, packet: Packet) -> Option<usize> {
        match packet {
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
        let mut cookie = [0u8; 64];
        let packet = match self.limiter.verify_packet(src_ip, datagram, &mut cookie) {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(c)) => {
                out.push(Action::Reply(take(&mut self.pool, c)));
                return None;
            }
            // Not WireGuard, a wrong mac1, or under load via DERP (no address for a cookie).
            Err(_) => return None,
        };
        let initiation = matches!(packet, Packet::HandshakeInit(_));
        let slot = self.slot_for(packet)?;
        let peer = self.slots.get_mut(slot).and_then(Option::as_mut)?;
        let key = peer.spec.node_key;
        // Only an initiation may start a tunnel; anything else for a peer without one
        // answers nothing we sent.
        let tunn = if initiation {
            tunnel(peer, slot, &self.our, &self.limiter, &mut self.live)
        } else {
            peer.tunn.as_mut()?
        };
        // `decapsulate` checks the macs once more with the same limiter: boringtun keeps the
        // path that takes a verified packet to itself. That second BLAKE2s is paid only by
        // datagrams that passed the first.
        // Decrypted straight into the buffer that goes on to the TUN device: one copy
        // less of every packet (ciphertext into it, then opened in place, as boringtun does).
        let mut dst = room(&mut self.pool, datagram.len());
        let base = dst.as_ptr();
        let written = match tunn.decapsulate(src_ip, datagram, &mut dst) {
            TunnResult::WriteToNetwork(p) => Written::Network(span(base, p)),
            TunnResult::WriteToTunnelV4(p, src) if self.admits(slot, src.into(), p) => {
                Written::Tun(span(base, p))
            }
            TunnResult::WriteToTunnelV6(p, src) if self.admits(slot, src.into(), p) => {
                Written::Tun(span(base, p))
            }
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => Written::Nothing,
            TunnResult::Done => Written::Nothing,
            TunnResult::Err(e) => {
                tracing::debug!(?src_ip, error = ?e, "WireGuard packet dropped");
                self.pool.push(dst);
                return None;
            }
        };
        match written {
            Written::Network(p) => {
                out.push(Action::ToPeer(key, keep(dst, p)));
                // Packets queued while the handshake ran go out now.
                let tunn = self.slots[slot].as_mut()?.tunn.as_mut()?;
                while let TunnResult::WriteToNetwork(p) = tunn.decapsulate(None, &[], &mut self.buf)
                {
                    out.push(Action::ToPeer(key, take(&mut self.pool, p)));
                }
            }
            Written::Tun(p) => out.push(Action::WriteTun(keep(dst, p))),
            Written::Nothing => self.pool.push(dst),
        }
        Some(key)
    }

    /// An IP packet from the TUN device.
    pub fn from_tun(&mut self, packet: &[u8], out: &mut Vec<Action>) {
        let Some((slot, peer)) = destination(packet)
            .and_then(|dst| self.table.lookup(dst))
            .and_then(|slot| Some((slot, self.slots.get_mut(slot)?.as_mut()?)))
        else {
            return;
        };
        self.filter.note_out(packet);
        let key = peer.spec.node_key;
        let tunn = tunnel(peer, slot, &self.our, &self.limiter, &mut self.live);
        // Sealed straight into the buffer that goes out (boringtun copies it in, then seals
        // in place); the room also holds a handshake initiation if there is no session yet.
        let mut dst = room(&mut self.pool, packet.len() + 32);
        let base = dst.as_ptr();
        match tunn.encapsulate(packet, &mut dst) {
            TunnResult::WriteToNetwork(p) => {
                let p = span(base, p);
                out.push(Action::ToPeer(key, keep(dst, p)));
            }
            _ => self.pool.push(dst),
        }
    }

    /// A decrypted packet from the peer in `slot` goes to the host only if its source
    /// routes back to that very peer (cryptokey routing: a peer that also serves routes
    /// cannot borrow another node's address) and the filter lets it in.
    fn admits(&mut self, slot: usize, src: IpAddr, p: &[u8]) -> bool {
        let ok = self.table.lookup(src) == Some(slot) && self.filter.allow_in(p);
        if !ok {
            tracing::trace!(peer = slot, %src, "inbound packet refused (source or filter)");
        }
        ok
    }

    /// Starts a handshake with the peer `key` unless one is under way.
    pub fn initiate(&mut self, key: &[u8; 32], out: &mut Vec<Action>) {
        let Some((slot, peer)) = self
            .by_key
            .get(key)
            .and_then(|&slot| Some((slot, self.slots.get_mut(slot)?.as_mut()?)))
        else {
            return;
        };
        let tunn = tunnel(peer, slot, &self.our, &self.limiter, &mut self.live);
        if let TunnResult::WriteToNetwork(p) =
            tunn.format_handshake_initiation(&mut self.buf, false)
        {
            out.push(Action::ToPeer(*key, take(&mut self.pool, p)));
        }
    }

    /// Per peer with a tunnel, by node key: the last handshake's age and the byte counts
    /// (a peer without one has neither).
    pub fn stats(&self) -> HashMap<[u8; 32], PeerStats> {
        self.slots
            .iter()
            .flatten()
            .filter_map(|p| Some((p, p.tunn.as_ref()?)))
            .map(|(p, tunn)| {
                let (handshake, tx, rx, _, _) = tunn.stats();
                let s = PeerStats {
                    last_handshake: handshake,
                    tx_bytes: tx as u64,
                    rx_bytes: rx as u64,
                };
                (p.spec.node_key, s)
            })
            .collect()
    }

    /// Drives handshake and keep-alive timers of the peers with a tunnel; call every 100-250
    /// ms.
    pub fn tick(&mut self, out: &mut Vec<Action>) {
        // The limiter counts handshakes per second; it checks itself that a second passed.
        self.limiter.reset_count();
        for &slot in &self.live {
            let Some(Peer {
                spec,
                tunn: Some(tunn),
            }) = self.slots[slot].as_mut()
            else {
                continue;
            };
            if let TunnResult::WriteToNetwork(p) = tunn.update_timers(&mut self.buf) {
                out.push(Action::ToPeer(spec.node_key, take(&mut self.pool, p)));
            }
        }
    }

    /// How many peers have a tunnel (and so timers).
    pub fn live(&self) -> usize {
        self.live.len()
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

    /// Two instances, 100.64.0.1 and 100.64.0.2, each the other's only peer, letting
    /// everything in; with their public keys.
    fn pair() -> (Wg, Wg, [u8; 32], [u8; 32]) {
        let (ka, kb) = (StaticSecret::from([1; 32]), StaticSecret::from([2; 32]));
        let (mut a, mut b) = (Wg::new(ka.clone()), Wg::new(kb.clone()));
        a.sync(vec![spec(&kb, "100.64.0.2")]);
        b.sync(vec![spec(&ka, "100.64.0.1")]);
        a.set_filter(crate::filter::Filter::allow_all());
        b.set_filter(crate::filter::Filter::allow_all());
        let (pa, pb) = (
            *PublicKey::from(&ka).as_bytes(),
            *PublicKey::from(&kb).as_bytes(),
        );
        (a, b, pa, pb)
    }

    /// Packets are sealed and opened straight into reused buffers: whatever a buffer held
    /// before (longer, shorter, junk), what goes out is exactly the packet.
    #[test]
    fn reused_buffers_carry_exactly_the_packet() {
        let (mut a, mut b, _, pb) = pair();
        let mut big = ping([100, 64, 0, 1], [100, 64, 0, 2]);
        big.resize(1400, 0x5a);
        big[2..4].copy_from_slice(&1400u16.to_be_bytes());
        let small = ping([100, 64, 0, 1], [100, 64, 0, 2]);
        let mut delivered = vec![];
        let mut out = vec![];
        for (round, p) in [&small, &big, &small, &big, &small].into_iter().enumerate() {
            a.recycle([vec![0xee; 3000], vec![0xdd; 10]]);
            b.recycle([vec![0xcc; 3000], vec![0xbb; 10]]);
            a.from_tun(p, &mut out);
            // The first packet waits for the handshake; the rounds after go at once.
            for _ in 0..4 {
                let mut next = vec![];
                for act in out.drain(..) {
                    match act {
                        Action::ToPeer(to, d) if to == pb => {
                            // Data, not a keep-alive (32 bytes, no packet in it).
                            if round > 0 && is_data(&d) && d.len() > 32 {
                                assert_eq!(d.len(), p.len() + 32, "round {round}");
                            }
                            b.from_network(None, &d, &mut next);
                        }
                        Action::ToPeer(_, d) => {
                            a.from_network(None, &d, &mut next);
                        }
                        Action::WriteTun(d) => delivered.push(d),
                        Action::Reply(_) => panic!("cookie reply without load"),
                    }
                }
                out = next;
            }
        }
        assert_eq!(
            delivered,
            vec![small.clone(), big.clone(), small.clone(), big, small]
        );
    }

    #[test]
    fn two_instances_talk_through_a_handshake() {
        let (mut a, mut b, pa, pb) = pair();
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
                    Action::Reply(p) => panic!("cookie reply without load: {p:?}"),
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
    fn a_peer_without_a_tunnel_holds_no_room_for_one() {
        // At 5 000 peers an inline `Option<Tunn>` (11 KB) was 55 MB of the agent's heap.
        assert!(std::mem::size_of::<Tunn>() > 4096);
        assert!(std::mem::size_of::<Option<Peer>>() <= 128);
    }

    #[test]
    fn tunnels_are_made_for_the_peers_we_talk_to() {
        let ours = StaticSecret::from([1; 32]);
        let mut w = Wg::new(ours.clone());
        let peers: Vec<StaticSecret> = (0..200u8).map(|i| StaticSecret::from([i; 32])).collect();
        for (i, k) in peers.iter().enumerate() {
            w.upsert(spec(k, &format!("100.64.1.{i}")));
        }
        assert_eq!(w.live(), 0);
        assert!(w.stats().is_empty());
        // Data or a response for a peer without a tunnel makes none.
        let mut out = vec![];
        let mut data = vec![4, 0, 0, 0];
        data.extend_from_slice(&(5u32 << 8).to_le_bytes());
        data.resize(64, 0);
        assert_eq!(w.from_network(None, &data, &mut out), None);
        assert_eq!(w.live(), 0);
        // A packet to one makes its tunnel (and a handshake), and only its.
        w.from_tun(&ping([100, 64, 0, 1], [100, 64, 1, 5]), &mut out);
        assert!(
            matches!(&out[..], [Action::ToPeer(k, _)] if *k == *PublicKey::from(&peers[5]).as_bytes())
        );
        assert_eq!(w.live(), 1);
        assert_eq!(w.stats().len(), 1);
        w.remove(PublicKey::from(&peers[5]).as_bytes());
        assert_eq!(w.live(), 0);
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

    /// Runs packets between `a` (key `ka`) and the peers in `others` until nothing moves;
    /// returns what each delivered to its TUN device, by node key.
    fn exchange(
        nodes: &mut [(&StaticSecret, &mut Wg)],
        mut out: Vec<([u8; 32], Action)>,
    ) -> HashMap<[u8; 32], Vec<Vec<u8>>> {
        let mut delivered: HashMap<[u8; 32], Vec<Vec<u8>>> = HashMap::new();
        for _ in 0..8 {
            let mut next = vec![];
            for (from, act) in out.drain(..) {
                match act {
                    Action::ToPeer(to, p) => {
                        let (_, w) = nodes
                            .iter_mut()
                            .find(|(k, _)| *PublicKey::from(*k).as_bytes() == to)
                            .expect("a known peer");
                        let mut o = vec![];
                        w.from_network(None, &p, &mut o);
                        next.extend(o.into_iter().map(|a| (to, a)));
                    }
                    Action::WriteTun(p) => delivered.entry(from).or_default().push(p),
                    Action::Reply(_) => {}
                }
            }
            out = next;
        }
        delivered
    }

    #[test]
    fn the_longest_prefix_picks_the_peer_and_sources_must_route_back() {
        let (kf, ko, kr) = (
            StaticSecret::from([1; 32]),
            StaticSecret::from([2; 32]),
            StaticSecret::from([3; 32]),
        );
        let key = |k: &StaticSecret| *PublicKey::from(k).as_bytes();
        // The firewall knows the operator (its /32) and a router that serves a subnet and
        // the whole internet (as the daemon would hand it only with routes accepted).
        let router = PeerSpec {
            node_key: key(&kr),
            allowed: vec![
                ("100.64.0.3".parse().unwrap(), 32),
                ("198.51.100.0".parse().unwrap(), 24),
                ("0.0.0.0".parse().unwrap(), 0),
            ],
        };
        for order in [false, true] {
            let mut fw = Wg::new(kf.clone());
            let mut peers = vec![spec(&ko, "100.64.0.2"), router.clone()];
            if order {
                peers.reverse();
            }
            fw.sync(peers);
            fw.set_filter(crate::filter::Filter::allow_all());
            let (mut op, mut rt) = (Wg::new(ko.clone()), Wg::new(kr.clone()));
            op.sync(vec![spec(&kf, "100.64.0.1")]);
            rt.sync(vec![spec(&kf, "100.64.0.1")]);
            for w in [&mut op, &mut rt] {
                w.set_filter(crate::filter::Filter::allow_all());
            }
            // Outbound: the operator's /32 beats the router's /0, the subnet goes to the router.
            let mut out = vec![];
            fw.from_tun(&ping([100, 64, 0, 1], [100, 64, 0, 2]), &mut out);
            fw.from_tun(&ping([100, 64, 0, 1], [198, 51, 100, 7]), &mut out);
            let dests: Vec<[u8; 32]> = out
                .iter()
                .map(|a| match a {
                    Action::ToPeer(k, _) => *k,
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(dests, vec![key(&ko), key(&kr)], "order {order}");
            // Inbound: the router may send from its own address and its subnet, not from
            // the operator's address, though its /0 covers it.
            let mut out = vec![];
            rt.from_tun(&ping([100, 64, 0, 3], [100, 64, 0, 1]), &mut out);
            rt.from_tun(&ping([198, 51, 100, 7], [100, 64, 0, 1]), &mut out);
            rt.from_tun(&ping([100, 64, 0, 2], [100, 64, 0, 1]), &mut out);
            let out = out.into_iter().map(|a| (key(&kr), a)).collect();
            let got = exchange(&mut [(&kf, &mut fw), (&kr, &mut rt)], out);
            assert_eq!(
                got[&key(&kf)],
                vec![
                    ping([100, 64, 0, 3], [100, 64, 0, 1]),
                    ping([198, 51, 100, 7], [100, 64, 0, 1])
                ]
            );
        }
    }

    /// A handshake initiation as an attacker who knows our public key sends it: random
    /// content under a correct `mac1`.
    fn initiation_with_mac1(to: &PublicKey, seed: u8) -> Vec<u8> {
        use blake2::digest::{FixedOutput, Mac};
        use blake2::{Blake2s256, Blake2sMac, Digest};
        let mut p = vec![seed; 148];
        p[..4].copy_from_slice(&[1, 0, 0, 0]);
        let key = Blake2s256::new()
            .chain_update(b"mac1----")
            .chain_update(to.as_bytes())
            .finalize();
        let mut mac = Blake2sMac::<blake2::digest::consts::U16>::new_from_slice(&key).unwrap();
        mac.update(&p[..116]);
        p[116..132].copy_from_slice(&mac.finalize_fixed());
        p
    }

    #[test]
    fn junk_handshakes_are_dropped_and_a_flood_gets_cookies() {
        let ours = StaticSecret::from([1; 32]);
        let mut w = Wg::new(ours.clone());
        w.sync(vec![spec(&StaticSecret::from([2; 32]), "100.64.0.2")]);
        let from = Some("192.0.2.66".parse().unwrap());
        let mut out = vec![];
        // Without a valid mac1: nothing, however many.
        for seed in 0..200u8 {
            let mut p = vec![seed; 148];
            p[..4].copy_from_slice(&[1, 0, 0, 0]);
            assert_eq!(w.from_network(from, &p, &mut out), None);
        }
        assert!(out.is_empty(), "{out:?}");
        // With one: the first hundred a second are looked at (and fail: junk inside), then
        // the limiter answers with cookie replies, which only the real sender receives.
        let us = PublicKey::from(&ours);
        for seed in 0..=HANDSHAKES_PER_SECOND as u8 + 10 {
            w.from_network(from, &initiation_with_mac1(&us, seed), &mut out);
        }
        assert!(
            out.iter()
                .all(|a| matches!(a, Action::Reply(c) if c.len() == 64)),
            "{out:?}"
        );
        assert!(out.len() >= 5, "{}", out.len());
        // Via DERP there is no address to send a cookie to: dropped under load.
        let mut derp = vec![];
        w.from_network(None, &initiation_with_mac1(&us, 1), &mut derp);
        assert!(derp.is_empty());
    }
}
