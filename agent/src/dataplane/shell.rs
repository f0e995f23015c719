//! The data plane's IO shell: tokio tasks that move bytes between the UDP socket, the TUN
//! device and the DERP connections, and hand them to the `Engine`. No decisions here.

use super::offload::{self, Coalescer};
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
/// Datagrams taken from the socket per system call, and the room for each.
const BATCH: usize = 64;
const DATAGRAM: usize = 4096;

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

    /// Carries out the engine's actions; packets for the TUN device go through `tun_out`,
    /// which merges TCP segments of one batch.
    async fn run(&self, actions: &mut Vec<Action>, tun_out: &mut Coalescer) {
        let (mut v4, mut v6) = (vec![], vec![]);
        for a in actions.drain(..) {
            match a {
                Action::SendUdp(to @ SocketAddr::V4(_), p) => v4.push((to, p)),
                Action::SendUdp(to, p) => v6.push((to, p)),
                Action::WriteTun(p) => tun_out.push(&p),
                Action::SendDerp { region, to, packet } => self
                    .derps
                    .lock()
                    .expect("derps lock")
                    .send(region, &to, &packet),
            }
        }
        send_all(&self.udp4, &v4).await;
        if let Some(u6) = &self.udp6 {
            send_all(u6, &v6).await;
        }
        if tun_out.is_empty() {
            return;
        }
        let bufs = tun_out.finish();
        for b in &bufs {
            if let Err(e) = self.tun.send(b).await {
                debug!(error = %e, "TUN write failed");
            }
        }
        tun_out.recycle(bufs);
    }

    /// Reads the socket in batches (recvmmsg): one system call for many datagrams, and a
    /// batch's TCP segments reach the kernel as one.
    async fn udp_loop(self, udp: Arc<UdpSocket>) {
        let mut batch = RecvBatch::new();
        let (mut out, mut tun_out) = (vec![], Coalescer::default());
        loop {
            let n = match udp
                .async_io(tokio::io::Interest::READABLE, || batch.recv(&udp))
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
                    if let Some((from, p)) = batch.get(i) {
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
            self.engine().tick(Instant::now(), &mut out);
            self.run(&mut out, &mut tun_out).await;
            self.publish();
        }
    }
}

/// Sends datagrams with `sendmmsg`: one system call for a whole batch.
async fn send_all(udp: &UdpSocket, datagrams: &[(SocketAddr, Vec<u8>)]) {
    let mut sent = 0;
    while sent < datagrams.len() {
        let rest = &datagrams[sent..];
        match udp
            .async_io(tokio::io::Interest::WRITABLE, || sendmmsg(udp, rest))
            .await
        {
            Ok(n) => sent += n.max(1),
            Err(e) => {
                // One bad destination must not hold up the rest: skip it.
                debug!(to = %rest[0].0, error = %e, "UDP send failed");
                sent += 1;
            }
        }
    }
}

fn sendmmsg(udp: &UdpSocket, datagrams: &[(SocketAddr, Vec<u8>)]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let batch = &datagrams[..datagrams.len().min(BATCH)];
    let names: Vec<socket2::SockAddr> = batch.iter().map(|(a, _)| (*a).into()).collect();
    let mut iov: Vec<libc::iovec> = batch
        .iter()
        .map(|(_, p)| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect();
    // SAFETY: mmsghdr is plain old data; every pointer set below points into `names` and
    // `iov`, which outlive the call, and the kernel only reads through them.
    let mut hdrs: Vec<libc::mmsghdr> = (0..batch.len())
        .map(|_| unsafe { std::mem::zeroed() })
        .collect();
    for (i, h) in hdrs.iter_mut().enumerate() {
        h.msg_hdr.msg_name = names[i].as_ptr() as *mut libc::c_void;
        h.msg_hdr.msg_namelen = names[i].len();
        h.msg_hdr.msg_iov = &mut iov[i];
        h.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: `hdrs` holds `batch.len()` valid headers.
    let n = unsafe {
        libc::sendmmsg(
            udp.as_raw_fd(),
            hdrs.as_mut_ptr(),
            hdrs.len() as u32,
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Buffers and headers for one `recvmmsg` call.
struct RecvBatch {
    data: Vec<u8>,
    lens: [usize; BATCH],
    names: [libc::sockaddr_storage; BATCH],
    name_lens: [libc::socklen_t; BATCH],
}

impl RecvBatch {
    fn new() -> Box<RecvBatch> {
        Box::new(RecvBatch {
            data: vec![0u8; BATCH * DATAGRAM],
            lens: [0; BATCH],
            // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
            names: unsafe { std::mem::zeroed() },
            name_lens: [0; BATCH],
        })
    }

    /// One non-blocking `recvmmsg`; the number of datagrams, or WouldBlock.
    fn recv(&mut self, udp: &UdpSocket) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        let mut iov: [libc::iovec; BATCH] = std::array::from_fn(|i| libc::iovec {
            iov_base: self.data[i * DATAGRAM..].as_mut_ptr().cast(),
            iov_len: DATAGRAM,
        });
        // SAFETY: mmsghdr is plain old data; zeroed, then every pointer is set below to
        // memory (`iov`, `self.names`) that outlives the call.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (i, h) in hdrs.iter_mut().enumerate() {
            h.msg_hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            h.msg_hdr.msg_iov = &mut iov[i];
            h.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: `hdrs` holds BATCH valid headers whose buffers are DATAGRAM bytes each.
        let n = unsafe {
            libc::recvmmsg(
                udp.as_raw_fd(),
                hdrs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        for (i, h) in hdrs.iter().take(n as usize).enumerate() {
            // A truncated datagram is not one we could use: mark it empty.
            let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            self.lens[i] = if truncated { 0 } else { h.msg_len as usize };
            self.name_lens[i] = h.msg_hdr.msg_namelen;
        }
        Ok(n as usize)
    }

    /// The i-th datagram of the last `recv` and its sender.
    fn get(&self, i: usize) -> Option<(SocketAddr, &[u8])> {
        if self.lens[i] == 0 {
            return None;
        }
        let from = socket_addr(&self.names[i], self.name_lens[i])?;
        Some((from, &self.data[i * DATAGRAM..i * DATAGRAM + self.lens[i]]))
    }
}

/// A socket address the kernel wrote into `storage` (`len` bytes).
fn socket_addr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match storage.ss_family as i32 {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says it is a sockaddr_in, and it fits in the storage.
            let a =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::new(ip.into(), u16::from_be(a.sin_port)))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the family says it is a sockaddr_in6, and it fits in the storage.
            let a = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
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
