//! The data plane's IO shell: tokio tasks that move bytes between the UDP socket, the TUN
//! device and the DERP connections, and hand them to the `Engine`. No decisions here.

use super::{Action, Engine, NetInfo, PeerInfo, PeerStats, Region};
use crate::control::client::ServerUrl;
use crate::control::types::DerpMap;
use crate::derp::{self, conn};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

const TICK: Duration = Duration::from_millis(250);

/// The DERP connections: one per region we talk to; the home region's is always up.
struct Derps {
    targets: HashMap<u32, conn::Target>,
    conns: HashMap<u32, conn::Handle>,
    home: u32,
    node: crypto_box::SecretKey,
    tls: Arc<rustls::ClientConfig>,
    inbound: mpsc::Sender<(u32, derp::Event)>,
}

impl Derps {
    fn ensure(&mut self, region: u32) -> Option<&conn::Handle> {
        if !self.conns.contains_key(&region) {
            let target = self.targets.get(&region)?.clone();
            info!(region, server = %target.url.host_header(), "connecting to DERP");
            let h = conn::spawn(
                target,
                self.node.clone(),
                self.tls.clone(),
                region == self.home,
                self.inbound.clone(),
            );
            self.conns.insert(region, h);
        }
        self.conns.get(&region)
    }

    fn send(&mut self, region: u32, to: &[u8; 32], packet: &[u8]) {
        if packet.len() > derp::MAX_PACKET {
            return;
        }
        let Some(h) = self.ensure(region) else {
            debug!(
                region,
                "no DERP server known for the region; packet dropped"
            );
            return;
        };
        // A full queue means the relay is slower than we are: drop, as UDP would.
        let _ = h.outbound.try_send(derp::send_packet(to, packet));
    }

    fn set_home(&mut self, home: u32) {
        if home == self.home && (home == 0 || self.conns.contains_key(&home)) {
            return;
        }
        if home != self.home {
            info!(region = home, "home DERP region");
        }
        self.home = home;
        for (id, h) in &self.conns {
            h.set_preferred(*id == home);
        }
        if home != 0 {
            self.ensure(home);
        }
    }

    fn set_targets(&mut self, targets: HashMap<u32, conn::Target>) {
        self.conns
            .retain(|id, _| targets.get(id) == self.targets.get(id) && targets.contains_key(id));
        self.targets = targets;
        let home = self.home;
        self.home = 0;
        self.set_home(home);
    }
}

/// Handles to the running data plane.
#[derive(Clone)]
pub struct Shell {
    engine: Arc<Mutex<Engine>>,
    derps: Arc<Mutex<Derps>>,
    udp4: Arc<UdpSocket>,
    /// `None` where the host has no IPv6.
    udp6: Option<Arc<UdpSocket>>,
    tun: Arc<tun::AsyncDevice>,
    net_info: watch::Sender<NetInfo>,
}

impl Shell {
    /// Starts the tasks. `node` is our node key (DERP logs in with it).
    pub fn start(
        engine: Engine,
        (udp4, udp6): (UdpSocket, Option<UdpSocket>),
        tun: Arc<tun::AsyncDevice>,
        node: crypto_box::SecretKey,
        tls: Arc<rustls::ClientConfig>,
    ) -> Shell {
        let (inbound, inbound_rx) = mpsc::channel(1024);
        let shell = Shell {
            net_info: watch::Sender::new(engine.net_info()),
            engine: Arc::new(Mutex::new(engine)),
            derps: Arc::new(Mutex::new(Derps {
                targets: HashMap::new(),
                conns: HashMap::new(),
                home: 0,
                node,
                tls,
                inbound,
            })),
            udp4: Arc::new(udp4),
            udp6: udp6.map(Arc::new),
            tun,
        };
        tokio::spawn(shell.clone().udp_loop(shell.udp4.clone()));
        if let Some(u) = &shell.udp6 {
            tokio::spawn(shell.clone().udp_loop(u.clone()));
        }
        tokio::spawn(shell.clone().tun_loop());
        tokio::spawn(shell.clone().derp_loop(inbound_rx));
        tokio::spawn(shell.clone().timer_loop());
        shell
    }

    fn engine(&self) -> std::sync::MutexGuard<'_, Engine> {
        self.engine.lock().expect("engine lock")
    }

    /// Changes of our home region and endpoints, for control.
    pub fn net_info(&self) -> watch::Receiver<NetInfo> {
        self.net_info.subscribe()
    }

    pub fn has_ipv6(&self) -> bool {
        self.udp6.is_some()
    }

    pub fn set_peers(&self, peers: Vec<PeerInfo>) {
        self.engine().set_peers(peers);
    }

    pub fn set_filter(&self, f: crate::filter::Filter) {
        self.engine().set_filter(f);
    }

    pub fn set_local_endpoints(&self, endpoints: Vec<SocketAddr>) {
        self.engine().set_local_endpoints(endpoints);
        self.publish();
    }

    pub fn stats(&self) -> HashMap<[u8; 32], PeerStats> {
        self.engine().stats(Instant::now())
    }

    /// A new DERP map: STUN addresses for the engine, servers for the connections.
    pub async fn set_derp_map(&self, map: &DerpMap) {
        let mut regions = vec![];
        let mut targets = HashMap::new();
        for r in map.regions.values() {
            let Some(node) = r.nodes.first() else {
                continue;
            };
            let host = node.host_name.clone();
            let connect = if node.ipv4.is_empty() {
                host.clone()
            } else {
                node.ipv4.clone()
            };
            let stun = match node.stun_port {
                p if p < 0 => None,
                p => resolve(&connect, if p == 0 { 3478 } else { p as u16 }).await,
            };
            regions.push(Region {
                id: r.region_id,
                code: r.region_code.clone(),
                stun,
            });
            let port = if node.derp_port == 0 {
                443
            } else {
                node.derp_port
            };
            targets.insert(
                r.region_id,
                conn::Target {
                    region: r.region_id,
                    url: ServerUrl {
                        https: true,
                        host,
                        port,
                    },
                    connect,
                },
            );
        }
        regions.sort_by_key(|r| r.id);
        info!(regions = ?regions.iter().map(|r| (r.id, &r.code)).collect::<Vec<_>>(), "DERP map");
        self.engine().set_derp_map(regions);
        let home = self.engine().net_info().home_derp;
        let mut d = self.derps.lock().expect("derps lock");
        d.set_targets(targets);
        d.set_home(home);
        drop(d);
        self.publish();
    }

    fn publish(&self) {
        let ni = self.engine().net_info();
        self.derps
            .lock()
            .expect("derps lock")
            .set_home(ni.home_derp);
        self.net_info.send_if_modified(|cur| {
            let changed = *cur != ni;
            *cur = ni;
            changed
        });
    }

    async fn run(&self, actions: &mut Vec<Action>) {
        for a in actions.drain(..) {
            match a {
                Action::SendUdp(to, p) => {
                    let udp = match (to, &self.udp6) {
                        (SocketAddr::V6(_), Some(u6)) => u6,
                        (SocketAddr::V6(_), None) => continue,
                        (SocketAddr::V4(_), _) => &self.udp4,
                    };
                    if let Err(e) = udp.send_to(&p, to).await {
                        debug!(%to, error = %e, "UDP send failed");
                    }
                }
                Action::WriteTun(p) => {
                    if let Err(e) = self.tun.send(&p).await {
                        debug!(error = %e, "TUN write failed");
                    }
                }
                Action::SendDerp { region, to, packet } => self
                    .derps
                    .lock()
                    .expect("derps lock")
                    .send(region, &to, &packet),
            }
        }
    }

    async fn udp_loop(self, udp: Arc<UdpSocket>) {
        let mut buf = vec![0u8; 65536];
        let mut out = vec![];
        loop {
            let (n, from) = match udp.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "UDP receive failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            self.engine()
                .on_udp(from, &buf[..n], Instant::now(), &mut out);
            self.run(&mut out).await;
        }
    }

    async fn tun_loop(self) {
        let mut buf = vec![0u8; 65536];
        let mut out = vec![];
        loop {
            let n = match self.tun.recv(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    warn!(error = %e, "TUN read failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            self.engine().on_tun(&buf[..n], Instant::now(), &mut out);
            self.run(&mut out).await;
        }
    }

    async fn derp_loop(self, mut inbound: mpsc::Receiver<(u32, derp::Event)>) {
        let mut out = vec![];
        while let Some((region, ev)) = inbound.recv().await {
            if let derp::Event::Packet { src, packet } = ev {
                self.engine()
                    .on_derp(region, src, &packet, Instant::now(), &mut out);
                self.run(&mut out).await;
            }
        }
    }

    async fn timer_loop(self) {
        let mut tick = tokio::time::interval(TICK);
        let mut out = vec![];
        loop {
            tick.tick().await;
            self.engine().tick(Instant::now(), &mut out);
            self.run(&mut out).await;
            self.publish();
        }
    }
}

/// The UDP sockets for WireGuard, disco and STUN on `port`: IPv4, and IPv6 (v6-only, so
/// both can have the port) where the host has it.
pub fn bind(port: u16) -> crate::Result<(UdpSocket, Option<UdpSocket>)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let open = |v6: bool| -> std::io::Result<UdpSocket> {
        let (domain, addr): (Domain, SocketAddr) = if v6 {
            (Domain::IPV6, (std::net::Ipv6Addr::UNSPECIFIED, port).into())
        } else {
            (Domain::IPV4, (std::net::Ipv4Addr::UNSPECIFIED, port).into())
        };
        let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
        if v6 {
            s.set_only_v6(true)?;
        }
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        UdpSocket::from_std(s.into())
    };
    let v4 = open(false).map_err(|e| crate::Error::io(format!("UDP port {port}"), e))?;
    let v6 = match open(true) {
        Ok(s) => Some(s),
        Err(e) => {
            info!(error = %e, "no IPv6 UDP socket; IPv4 only");
            None
        }
    };
    Ok((v4, v6))
}

async fn resolve(host: &str, port: u16) -> Option<SocketAddr> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Some(SocketAddr::new(ip, port));
    }
    let lookup = tokio::net::lookup_host((host, port));
    match tokio::time::timeout(Duration::from_secs(3), lookup).await {
        Ok(Ok(mut addrs)) => addrs.find(SocketAddr::is_ipv4),
        _ => {
            warn!(%host, "cannot resolve the DERP node's STUN address");
            None
        }
    }
}
