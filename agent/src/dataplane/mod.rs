//! The data plane's sans-IO core, like tailscale's magicsock: WireGuard (`wg`), per-peer
//! path state (`path`), disco, STUN and the DERP routing decisions, behind one `Engine`
//! that takes packets, DERP events and time in and gives `Action`s out. The daemon's tasks
//! only move bytes between the UDP socket, the TUN device and the DERP connections.

pub mod offload;
pub mod path;
pub mod shell;
pub mod udp;

use crate::disco::{self, Kind, Message};
use crate::stun;
use crate::wg::{self, Wg};
use path::PeerPath;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use x25519_dalek::{PublicKey, StaticSecret};

/// How often the DERP regions' STUN servers are asked for our address.
const STUN_INTERVAL: Duration = Duration::from_secs(20);
/// A STUN answer older than this no longer counts for the home-region choice.
const STUN_FRESH: Duration = Duration::from_secs(65);
/// tailscale's address for "via DERP region N" in pongs: 127.3.3.40:N.
const DERP_MAGIC_IP: Ipv4Addr = Ipv4Addr::new(127, 3, 3, 40);
/// Endpoint types in a MapRequest (tailcfg.EndpointType).
pub const ENDPOINT_LOCAL: u8 = 1;
pub const ENDPOINT_STUN: u8 = 2;

/// What the IO shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    SendUdp(SocketAddr, Vec<u8>),
    SendDerp {
        region: u32,
        to: [u8; 32],
        packet: Vec<u8>,
    },
    WriteTun(Vec<u8>),
}

/// A peer as the netmap describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub node_key: [u8; 32],
    pub disco_key: Option<[u8; 32]>,
    pub allowed: Vec<(IpAddr, u8)>,
    pub endpoints: Vec<SocketAddr>,
    pub home_derp: u32,
}

/// A DERP region from the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub id: u32,
    pub code: String,
    pub stun: Option<SocketAddr>,
}

/// What control must know about our connectivity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetInfo {
    pub home_derp: u32,
    /// Our endpoints with their tailcfg type (local or STUN).
    pub endpoints: Vec<(SocketAddr, u8)>,
}

/// Per peer, for `vpn-agent status`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerStats {
    /// `ip:port` of a proven direct path, or `DERP(<region code>)`.
    pub path: Option<String>,
    pub last_handshake: Option<Duration>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

/// Randomness for nonces and transaction ids; injected so tests are deterministic.
pub type Rng = Box<dyn FnMut(&mut [u8]) + Send>;

pub fn os_rng() -> Rng {
    Box::new(|b| getrandom::getrandom(b).expect("the OS has randomness"))
}

struct Peer {
    info: PeerInfo,
    path: PeerPath,
    /// The disco box shared with the peer's disco key, made at first use (see
    /// [`Peer::disco_box`]).
    disco: std::cell::OnceCell<crypto_box::SalsaBox>,
    /// Whether the peer is in `Engine::awake`.
    awake: bool,
}

impl Peer {
    /// The box shared with the peer's disco key. Making it costs an X25519, which most peers
    /// of a large tailnet never need; once made it is kept, so junk claiming the peer's key
    /// costs a lookup, not an X25519 each.
    fn disco_box(&self, ours: &crypto_box::SecretKey) -> Option<&crypto_box::SalsaBox> {
        let key = self.info.disco_key?;
        Some(self.disco.get_or_init(|| disco::shared(ours, &key)))
    }
}

#[derive(Default)]
struct Netcheck {
    pending: Vec<(stun::TxId, u32, Instant)>,
    last_round: Option<Instant>,
    /// Per region: the last round trip and when it was measured.
    latency: HashMap<u32, (Duration, Instant)>,
    mapped: Option<SocketAddr>,
}

pub struct Engine {
    wg: Wg,
    node_pub: [u8; 32],
    disco: crypto_box::SecretKey,
    disco_pub: [u8; 32],
    peers: HashMap<[u8; 32], Peer>,
    /// The peers we sent to lately (their path may want pings): the only ones `tick` visits,
    /// so an idle peer costs nothing per tick, however many there are.
    awake: Vec<[u8; 32]>,
    /// Disco key → node key, for the peers in the netmap (only they get answers).
    by_disco: HashMap<[u8; 32], [u8; 32]>,
    /// Node keys by the endpoints control lists for them.
    by_endpoint: HashMap<SocketAddr, [u8; 32]>,
    regions: Vec<Region>,
    home: u32,
    netcheck: Netcheck,
    local: Vec<SocketAddr>,
    rng: Rng,
    wg_out: Vec<wg::Action>,
}

impl Engine {
    pub fn new(node: StaticSecret, disco: crypto_box::SecretKey, rng: Rng) -> Engine {
        Engine {
            node_pub: *PublicKey::from(&node).as_bytes(),
            wg: Wg::new(node),
            disco_pub: *disco.public_key().as_bytes(),
            disco,
            peers: HashMap::new(),
            awake: vec![],
            by_disco: HashMap::new(),
            by_endpoint: HashMap::new(),
            regions: vec![],
            home: 0,
            netcheck: Netcheck::default(),
            local: vec![],
            rng,
            wg_out: vec![],
        }
    }

    /// Takes back the buffers of carried-out actions for reuse.
    pub fn recycle(&mut self, bufs: impl IntoIterator<Item = Vec<u8>>) {
        self.wg.recycle(bufs);
    }

    pub fn set_filter(&mut self, f: crate::filter::Filter) {
        self.wg.set_filter(f);
    }

    /// Makes the peer set equal to `peers`. A peer keeps its path state unless its disco key
    /// changed (it restarted: its old pongs mean nothing).
    pub fn set_peers(&mut self, peers: Vec<PeerInfo>) {
        let wanted: HashSet<[u8; 32]> = peers.iter().map(|p| p.node_key).collect();
        let gone: Vec<[u8; 32]> = self
            .peers
            .keys()
            .filter(|k| !wanted.contains(*k))
            .copied()
            .collect();
        self.update_peers(peers, &gone);
    }

    /// Adds or changes the peers in `changed` and drops those in `removed`; every other peer
    /// is left as it is. Costs the changed peers, whatever the number of peers.
    pub fn update_peers(&mut self, changed: Vec<PeerInfo>, removed: &[[u8; 32]]) {
        for key in removed {
            self.wg.remove(key);
            if let Some(p) = self.peers.remove(key) {
                self.unindex(&p.info);
                if p.awake {
                    self.awake.retain(|k| k != key);
                }
            }
        }
        for info in changed {
            self.wg.upsert(wg::PeerSpec {
                node_key: info.node_key,
                allowed: info.allowed.clone(),
            });
            let (path, disco, awake) = match self.peers.remove(&info.node_key) {
                Some(mut p) => {
                    self.unindex(&p.info);
                    if p.info.disco_key == info.disco_key {
                        p.path.home_derp = info.home_derp;
                        p.path.endpoints = info.endpoints.clone();
                        (p.path, p.disco, p.awake)
                    } else {
                        (
                            PeerPath::new(info.home_derp, info.endpoints.clone()),
                            Default::default(),
                            p.awake,
                        )
                    }
                }
                None => (
                    PeerPath::new(info.home_derp, info.endpoints.clone()),
                    Default::default(),
                    false,
                ),
            };
            if let Some(d) = info.disco_key {
                self.by_disco.insert(d, info.node_key);
            }
            for e in &info.endpoints {
                self.by_endpoint.insert(*e, info.node_key);
            }
            self.peers.insert(
                info.node_key,
                Peer {
                    info,
                    path,
                    disco,
                    awake,
                },
            );
        }
    }

    /// Forgets the disco key and endpoints `info` was indexed under (those still pointing to
    /// it: another peer may have taken an endpoint over).
    fn unindex(&mut self, info: &PeerInfo) {
        if let Some(d) = info.disco_key
            && self.by_disco.get(&d) == Some(&info.node_key)
        {
            self.by_disco.remove(&d);
        }
        for e in &info.endpoints {
            if self.by_endpoint.get(e) == Some(&info.node_key) {
                self.by_endpoint.remove(e);
            }
        }
    }

    /// The DERP map changed. Until STUN says otherwise the first region is home.
    pub fn set_derp_map(&mut self, regions: Vec<Region>) {
        self.regions = regions;
        if !self.regions.iter().any(|r| r.id == self.home) {
            self.home = self.regions.first().map_or(0, |r| r.id);
        }
        self.netcheck.last_round = None;
    }

    /// Our local addresses with the UDP port (endpoint type "local").
    pub fn set_local_endpoints(&mut self, endpoints: Vec<SocketAddr>) {
        self.local = endpoints;
    }

    pub fn net_info(&self) -> NetInfo {
        let mut endpoints: Vec<_> = self.local.iter().map(|a| (*a, ENDPOINT_LOCAL)).collect();
        if let Some(m) = self.netcheck.mapped
            && !self.local.contains(&m)
        {
            endpoints.push((m, ENDPOINT_STUN));
        }
        NetInfo {
            home_derp: self.home,
            endpoints,
        }
    }

    fn random<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        (self.rng)(&mut b);
        b
    }

    /// Seals `msg` for the peer with node key `key`; `None` when it has no disco key.
    fn seal(&mut self, key: &[u8; 32], msg: &Message) -> Option<Vec<u8>> {
        let nonce = self.random();
        let b = self.peers.get(key)?.disco_box(&self.disco)?;
        Some(disco::seal_with(b, &self.disco_pub, nonce, msg))
    }

    /// A datagram on the shared UDP socket.
    pub fn on_udp(&mut self, from: SocketAddr, p: &[u8], now: Instant, out: &mut Vec<Action>) {
        match disco::classify(p) {
            Kind::WireGuard => {
                let mut wg_out = std::mem::take(&mut self.wg_out);
                match self.wg.from_network(Some(from.ip()), p, &mut wg_out) {
                    Some(key) => {
                        if let Some(peer) = self.peers.get_mut(&key) {
                            peer.path.wg_from(from);
                        }
                    }
                    // Data for a session we do not have: the peer kept its session across
                    // our restart (control away, it never heard of it). Waiting for its
                    // own rekey costs the operator 15 s; a handshake now costs one packet,
                    // and boringtun sends at most one per peer every few seconds. It goes
                    // where the data came from: only the real peer can answer it.
                    None if wg::is_data(p) => {
                        if let Some(key) = self.by_endpoint.get(&from) {
                            let mut init = vec![];
                            self.wg.initiate(key, &mut init);
                            for a in init {
                                if let wg::Action::ToPeer(_, p) = a {
                                    out.push(Action::SendUdp(from, p));
                                }
                            }
                        }
                    }
                    None => {}
                }
                self.route(&mut wg_out, Some(from), now, out);
                self.wg_out = wg_out;
            }
            Kind::Disco => self.on_disco(Via::Udp(from), p, now, out),
            Kind::Stun => self.on_stun(p, now),
        }
    }

    /// A packet relayed by DERP region `region` from the peer with node key `src`.
    pub fn on_derp(
        &mut self,
        region: u32,
        src: [u8; 32],
        p: &[u8],
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        if disco::classify(p) == Kind::Disco {
            return self.on_disco(Via::Derp(region, src), p, now, out);
        }
        let mut wg_out = std::mem::take(&mut self.wg_out);
        // DERP vouches for the sender's node key: data it has no session for gets a
        // handshake, as on a direct path (see `on_udp`).
        if self.wg.from_network(None, p, &mut wg_out).is_none() && wg::is_data(p) {
            self.wg.initiate(&src, &mut wg_out);
        }
        self.route(&mut wg_out, None, now, out);
        self.wg_out = wg_out;
    }

    /// An IP packet from the TUN device.
    pub fn on_tun(&mut self, packet: &[u8], now: Instant, out: &mut Vec<Action>) {
        let mut wg_out = std::mem::take(&mut self.wg_out);
        self.wg.from_tun(packet, &mut wg_out);
        self.route(&mut wg_out, None, now, out);
        self.wg_out = wg_out;
    }

    /// Timers: WireGuard's, disco pings and call-me-maybe, STUN rounds. Every 100-250 ms.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        let mut wg_out = std::mem::take(&mut self.wg_out);
        self.wg.tick(&mut wg_out);
        self.route(&mut wg_out, None, now, out);
        self.wg_out = wg_out;
        let mut awake = std::mem::take(&mut self.awake);
        awake.retain(|key| {
            let Some(p) = self.peers.get_mut(key) else {
                return false;
            };
            if !p.path.active(now) {
                p.awake = false;
                return false;
            }
            self.discover(*key, now, out);
            true
        });
        self.awake = awake;
        self.stun_round(now, out);
    }

    /// WireGuard's datagrams onto the paths their peers' state picks.
    /// `from`: where the datagram being handled came from, for cookie replies.
    fn route(
        &mut self,
        wg_out: &mut Vec<wg::Action>,
        from: Option<SocketAddr>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        for a in wg_out.drain(..) {
            match a {
                wg::Action::WriteTun(p) => out.push(Action::WriteTun(p)),
                wg::Action::Reply(p) => {
                    if let Some(to) = from {
                        out.push(Action::SendUdp(to, p));
                    }
                }
                wg::Action::ToPeer(key, p) => {
                    let Some(peer) = self.peers.get_mut(&key) else {
                        continue;
                    };
                    if !peer.awake {
                        peer.awake = true;
                        self.awake.push(key);
                    }
                    match peer.path.route(now) {
                        path::Route {
                            udp: Some(u),
                            derp: Some(region),
                        } => {
                            out.push(Action::SendUdp(u, p.clone()));
                            out.push(Action::SendDerp {
                                region,
                                to: key,
                                packet: p,
                            });
                        }
                        path::Route { udp: Some(u), .. } => out.push(Action::SendUdp(u, p)),
                        path::Route {
                            derp: Some(region), ..
                        } => out.push(Action::SendDerp {
                            region,
                            to: key,
                            packet: p,
                        }),
                        path::Route { .. } => {}
                    }
                }
            }
        }
    }

    fn ping(&mut self, key: [u8; 32], to: SocketAddr, now: Instant, out: &mut Vec<Action>) {
        let tx_id = self.random();
        let msg = Message::Ping {
            tx_id,
            node_key: self.node_pub,
        };
        let Some(packet) = self.seal(&key, &msg) else {
            return;
        };
        if let Some(peer) = self.peers.get_mut(&key) {
            peer.path.ping_sent(tx_id, to, now);
        }
        out.push(Action::SendUdp(to, packet));
    }

    /// Pings the peer's candidates when it is due; with a discovery round, tells the peer
    /// via DERP to ping us too (call-me-maybe), so both NATs open.
    fn discover(&mut self, key: [u8; 32], now: Instant, out: &mut Vec<Action>) {
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        let due = peer.path.due_pings(now);
        let cmm = peer.path.discovering(now) && peer.path.home_derp != 0;
        let region = peer.path.home_derp;
        for to in due {
            self.ping(key, to, now, out);
        }
        if !cmm {
            return;
        }
        let endpoints: Vec<SocketAddr> = self.net_info().endpoints.iter().map(|e| e.0).collect();
        if !endpoints.is_empty()
            && let Some(packet) = self.seal(&key, &Message::CallMeMaybe { endpoints })
        {
            out.push(Action::SendDerp {
                region,
                to: key,
                packet,
            });
        }
    }

    fn on_disco(&mut self, via: Via, p: &[u8], now: Instant, out: &mut Vec<Action>) {
        let Some(key) = disco::sender(p)
            .ok()
            .and_then(|d| self.by_disco.get(&d).copied())
        else {
            tracing::trace!(?via, "disco packet from a sender not in the netmap");
            return;
        };
        if let Via::Derp(_, src) = via
            && src != key
        {
            tracing::debug!(
                ?via,
                "disco packet via DERP from another node's key; dropped"
            );
            return;
        }
        let opened = match self.peers.get(&key).and_then(|p| p.disco_box(&self.disco)) {
            Some(b) => disco::open_with(b, p),
            None => return,
        };
        let msg = match opened {
            Ok(m) => m,
            Err(e) => {
                tracing::trace!(?via, error = %e, "disco packet dropped");
                return;
            }
        };
        match (msg, via) {
            (Message::Ping { tx_id, .. }, Via::Udp(from)) => {
                if let Some(pong) = self.seal(&key, &Message::Pong { tx_id, src: from }) {
                    out.push(Action::SendUdp(from, pong));
                }
                let ping_back = self
                    .peers
                    .get_mut(&key)
                    .is_some_and(|peer| peer.path.learn(from, now));
                if ping_back {
                    self.ping(key, from, now, out);
                }
            }
            (Message::Ping { tx_id, .. }, Via::Derp(region, src)) => {
                let magic = SocketAddr::new(DERP_MAGIC_IP.into(), region as u16);
                if let Some(packet) = self.seal(&key, &Message::Pong { tx_id, src: magic }) {
                    out.push(Action::SendDerp {
                        region,
                        to: src,
                        packet,
                    });
                }
            }
            (Message::Pong { tx_id, .. }, Via::Udp(from)) => {
                if let Some(peer) = self.peers.get_mut(&key)
                    && peer.path.on_pong(tx_id, from, now)
                {
                    tracing::debug!(%from, "disco pong: direct path confirmed");
                }
            }
            (Message::CallMeMaybe { endpoints }, Via::Derp(..)) => {
                let to_ping = match self.peers.get_mut(&key) {
                    Some(peer) => peer.path.call_me_maybe(&endpoints, now),
                    None => vec![],
                };
                for to in to_ping {
                    self.ping(key, to, now, out);
                }
            }
            // Pongs via DERP answer pings we never send there; call-me-maybe only counts
            // via DERP (tailscale's rule: it proves the sender's node key).
            _ => {}
        }
    }

    fn stun_round(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.netcheck
            .pending
            .retain(|(_, _, sent)| now.saturating_duration_since(*sent) < Duration::from_secs(5));
        if self
            .netcheck
            .last_round
            .is_some_and(|t| now.saturating_duration_since(t) < STUN_INTERVAL)
        {
            return;
        }
        self.netcheck.last_round = Some(now);
        let targets: Vec<(u32, SocketAddr)> = self
            .regions
            .iter()
            .filter_map(|r| Some((r.id, r.stun?)))
            .collect();
        for (region, addr) in targets {
            let tx = self.random();
            self.netcheck.pending.push((tx, region, now));
            out.push(Action::SendUdp(addr, stun::request(tx)));
        }
    }

    fn on_stun(&mut self, p: &[u8], now: Instant) {
        let Some((tx, mapped)) = stun::parse_response(p) else {
            return;
        };
        let Some(i) = self.netcheck.pending.iter().position(|(t, ..)| *t == tx) else {
            return;
        };
        let (_, region, sent) = self.netcheck.pending.swap_remove(i);
        let rtt = now.saturating_duration_since(sent);
        self.netcheck.latency.insert(region, (rtt, now));
        self.netcheck.mapped = Some(mapped);
        self.choose_home(now);
    }

    /// The lowest-latency region that answered lately; the current one stays unless it went
    /// silent or another is clearly faster.
    fn choose_home(&mut self, now: Instant) {
        let fresh = |r: &u32| {
            self.netcheck
                .latency
                .get(r)
                .filter(|(_, at)| now.saturating_duration_since(*at) < STUN_FRESH)
                .map(|(rtt, _)| *rtt)
        };
        let Some((best, best_rtt)) = self
            .regions
            .iter()
            .filter_map(|r| Some((r.id, fresh(&r.id)?)))
            .min_by_key(|(_, rtt)| *rtt)
        else {
            return;
        };
        match fresh(&self.home) {
            Some(cur) if best_rtt * 3 >= cur * 2 => {}
            _ => self.home = best,
        }
    }

    /// Per peer, by node key: path, handshake age, bytes.
    pub fn stats(&self, now: Instant) -> HashMap<[u8; 32], PeerStats> {
        let wg = self.wg.stats();
        self.peers
            .iter()
            .map(|(key, p)| {
                let w = wg.get(key).copied();
                let path = match p.path.direct(now) {
                    Some(a) => Some(a.to_string()),
                    None if p.path.home_derp != 0 => {
                        Some(format!("DERP({})", self.region_code(p.path.home_derp)))
                    }
                    None => None,
                };
                let s = PeerStats {
                    path,
                    last_handshake: w.and_then(|w| w.last_handshake),
                    tx_bytes: w.map_or(0, |w| w.tx_bytes),
                    rx_bytes: w.map_or(0, |w| w.rx_bytes),
                };
                (*key, s)
            })
            .collect()
    }

    fn region_code(&self, id: u32) -> String {
        self.regions
            .iter()
            .find(|r| r.id == id)
            .map_or_else(|| id.to_string(), |r| r.code.clone())
    }
}

#[derive(Debug, Clone, Copy)]
enum Via {
    Udp(SocketAddr),
    Derp(u32, [u8; 32]),
}

#[cfg(test)]
mod tests;
