//! The data plane's IO shell: tokio tasks that move bytes between the UDP sockets, the TUN
//! device and the DERP connections, and hand them to the `Engine`, which makes the decisions.
//! The shell only keeps DERP connections open where the engine sends packets.
//!
//! The tasks run on a thread and runtime of their own ([`runtime`]): whatever arrives on the
//! UDP port, a flood included, is paid for there, and the control session on the main
//! runtime keeps its own core time (the operator's way in depends on it).

use super::offload::{self, Coalescer};
use super::udp::{self, RecvBatch};
use super::{Action, Engine, NetInfo, PeerInfo, PeerStats, Region};
use crate::control::client::ServerUrl;
use crate::control::types::DerpMap;
use crate::derp::{self, conn};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

const TICK: Duration = Duration::from_millis(250);
/// A connection to a region other than home closes after this long unused (tailscale's
/// figure): peers homed elsewhere come and go.
const DERP_IDLE: Duration = Duration::from_secs(60);

/// The DERP connections: one per region we talk to; the home region's is always up.
struct Derps {
    targets: HashMap<u32, conn::Target>,
    conns: HashMap<u32, conn::Handle>,
    /// When each connection last carried a packet of ours.
    used: HashMap<u32, Instant>,
    home: u32,
    node: crypto_box::SecretKey,
    tls: Arc<rustls::ClientConfig>,
    inbound: mpsc::Sender<(u32, derp::Event)>,
    /// The data plane's runtime: connections run there, whoever asks for them.
    rt: tokio::runtime::Handle,
}

impl Derps {
    fn ensure(&mut self, region: u32) -> Option<&conn::Handle> {
        if !self.conns.contains_key(&region) {
            let target = self.targets.get(&region)?.clone();
            info!(region, server = %target.url.host_header(), "connecting to DERP");
            let h = conn::spawn(
                &self.rt,
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
        self.used.insert(region, Instant::now());
    }

    /// Closes connections to other regions that nothing used for a while.
    fn close_idle(&mut self, now: Instant) {
        let (home, used) = (self.home, &self.used);
        self.conns.retain(|id, _| {
            *id == home
                || used
                    .get(id)
                    .is_some_and(|t| now.saturating_duration_since(*t) < DERP_IDLE)
        });
        let conns = &self.conns;
        self.used.retain(|id, _| conns.contains_key(id));
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

    /// New servers: connections to changed or vanished ones close; `set_home` (via
    /// `Shell::publish`) then opens the home region's if it closed.
    fn set_targets(&mut self, targets: HashMap<u32, conn::Target>) {
        self.conns
            .retain(|id, _| targets.get(id) == self.targets.get(id) && targets.contains_key(id));
        self.targets = targets;
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
    /// Unix seconds of the timer loop's last tick: proof for systemd's watchdog that the
    /// data plane's thread still works.
    last_tick: Arc<std::sync::atomic::AtomicU64>,
}

/// Starts the data plane's thread with a single-threaded runtime of its own, and returns its
/// handle. Sockets and the TUN device must be made inside it (`Handle::enter`), so that
/// their readiness comes from this runtime's reactor, not the main one's.
pub fn runtime() -> crate::Result<tokio::runtime::Handle> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| crate::Error::io("the data plane's tokio runtime", e))?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("dataplane".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))
        .map_err(|e| crate::Error::io("the data plane's thread", e))?;
    Ok(handle)
}

impl Shell {
    /// Starts the tasks on `rt` (from [`runtime`]). `node` is our node key (DERP logs in
    /// with it).
    pub fn start(
        rt: tokio::runtime::Handle,
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
                used: HashMap::new(),
                home: 0,
                node,
                tls,
                inbound,
                rt: rt.clone(),
            })),
            udp4: Arc::new(udp4),
            udp6: udp6.map(Arc::new),
            tun,
            last_tick: Arc::new(crate::status::now_secs().into()),
        };
        rt.spawn(shell.clone().udp_loop(shell.udp4.clone()));
        if let Some(u) = &shell.udp6 {
            rt.spawn(shell.clone().udp_loop(u.clone()));
        }
        rt.spawn(shell.clone().tun_loop());
        rt.spawn(shell.clone().derp_loop(inbound_rx));
        rt.spawn(shell.clone().timer_loop());
        shell
    }

    fn engine(&self) -> std::sync::MutexGuard<'_, Engine> {
        self.engine.lock().expect("engine lock")
    }

    /// Changes of our home region and endpoints, for control.
    pub fn net_info(&self) -> watch::Receiver<NetInfo> {
        self.net_info.subscribe()
    }

    /// Unix seconds of the data plane's last timer tick (every quarter second when it works).
    pub fn last_tick(&self) -> u64 {
        self.last_tick.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn has_ipv6(&self) -> bool {
        self.udp6.is_some()
    }

    pub fn set_peers(&self, peers: Vec<PeerInfo>) {
        self.engine().set_peers(peers);
    }

    pub fn update_peers(&self, changed: Vec<PeerInfo>, removed: &[[u8; 32]]) {
        self.engine().update_peers(changed, removed);
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
        self.derps.lock().expect("derps lock").set_targets(targets);
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

    /// Carries out the engine's actions; packets for the TUN device go through `tun_out`,
    /// which merges TCP segments of one batch.
    async fn run(&self, actions: &mut Vec<Action>, tun_out: &mut Coalescer) {
        let (mut v4, mut v6, mut spent) = (vec![], vec![], vec![]);
        for a in actions.drain(..) {
            match a {
                Action::SendUdp(to @ SocketAddr::V4(_), p) => v4.push((to, p)),
                Action::SendUdp(to, p) => v6.push((to, p)),
                Action::WriteTun(p) => tun_out.push(p),
                Action::SendDerp { region, to, packet } => {
                    self.derps
                        .lock()
                        .expect("derps lock")
                        .send(region, &to, &packet);
                    spent.push(packet);
                }
            }
        }
        udp::send_all(&self.udp4, &v4).await;
        if let Some(u6) = &self.udp6 {
            udp::send_all(u6, &v6).await;
        }
        spent.extend(v4.into_iter().chain(v6).map(|(_, p)| p));
        if !tun_out.is_empty() {
            let fd = self.tun.as_raw_fd();
            tun_out.finish(
                |parts| {
                    if let Err(e) = write_parts(fd, parts) {
                        debug!(error = %e, "TUN write failed");
                    }
                },
                &mut spent,
            );
        }
        if !spent.is_empty() {
            self.engine().recycle(spent);
        }
    }

    /// Reads the socket in batches (recvmmsg, GRO): one system call for many datagrams,
    /// and a batch's TCP segments reach the kernel as one.
    async fn udp_loop(self, sock: Arc<UdpSocket>) {
        let mut batch = RecvBatch::new();
        let (mut out, mut tun_out) = (vec![], Coalescer::default());
        loop {
            let n = match sock
                .async_io(tokio::io::Interest::READABLE, || batch.recv(&sock))
                .await
            {
                Ok(n) => n,
                Err(e) => {
                    warn!(error = %e, "UDP receive failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            {
                let now = Instant::now();
                let mut engine = self.engine();
                for i in 0..n {
                    let Some((from, datagrams)) = batch.datagrams(i) else {
                        continue;
                    };
                    for p in datagrams {
                        engine.on_udp(from, p, now, &mut out);
                    }
                }
            }
            self.run(&mut out, &mut tun_out).await;
        }
    }

    async fn tun_loop(self) {
        let mut buf = vec![0u8; 65536 + offload::VNET_HDR_LEN];
        let mut scratch = Vec::with_capacity(65536);
        let (mut out, mut tun_out) = (vec![], Coalescer::default());
        loop {
            let n = match self.tun.recv(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    warn!(error = %e, "TUN read failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            {
                let now = Instant::now();
                let mut engine = self.engine();
                offload::from_tun(&mut buf[..n], &mut scratch, |p| {
                    engine.on_tun(p, now, &mut out)
                });
            }
            self.run(&mut out, &mut tun_out).await;
        }
    }

    async fn derp_loop(self, mut inbound: mpsc::Receiver<(u32, derp::Event)>) {
        let (mut out, mut tun_out) = (vec![], Coalescer::default());
        while let Some((region, ev)) = inbound.recv().await {
            if let derp::Event::Packet { src, packet } = ev {
                self.engine()
                    .on_derp(region, src, &packet, Instant::now(), &mut out);
                self.run(&mut out, &mut tun_out).await;
            }
        }
    }

    async fn timer_loop(self) {
        let mut tick = tokio::time::interval(TICK);
        let (mut out, mut tun_out) = (vec![], Coalescer::default());
        loop {
            tick.tick().await;
            let now = Instant::now();
            self.engine().tick(now, &mut out);
            self.run(&mut out, &mut tun_out).await;
            self.publish();
            self.derps.lock().expect("derps lock").close_idle(now);
            self.last_tick.store(
                crate::status::now_secs(),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }
}

/// One packet to the TUN device from its parts (`writev`). Not awaited: a TUN device takes
/// a write at once (its socket's send buffer is unlimited), so this never waits; a write it
/// refuses is dropped like a packet lost on a link, which TCP resends.
fn write_parts(fd: std::os::fd::RawFd, parts: &[std::io::IoSlice<'_>]) -> std::io::Result<()> {
    // SAFETY: IoSlice is ABI-compatible with iovec on Unix; the slices outlive the call.
    let n = unsafe { libc::writev(fd, parts.as_ptr().cast(), parts.len() as libc::c_int) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
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
