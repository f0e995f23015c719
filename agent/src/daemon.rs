//! `vpn-agent run`: keep a control session up, registered, and the netmap current.

use crate::backoff::{Backoff, jitter};
use crate::config::{AuthKey, Config, FIRST_MAP_WAIT_FACTOR, MAP_MAX_AGE_FACTOR};
use crate::control::cache;
use crate::control::client::{self, ServerUrl, Session};
use crate::control::netmap::{Changes, Netmap, format_time, is_expired, is_full_map, key_expiry};
use crate::control::types::{
    AuthInfo, CAPABILITY_VERSION, Hostinfo, MapRequest, MapResponse, NetInfo as TsNetInfo, Node,
    PingRequest, RegisterRequest, ZERO_TIME,
};
use crate::dataplane::shell::Shell;
use crate::dataplane::{Engine, NetInfo, PeerInfo};
use crate::error::{Error, Result};
use crate::keys::{self, Identity};
use crate::netlink::Tunnel;
use crate::status::{PeerListAsk, PeerListStale, PeerStatus, Status, now_secs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{debug, error, info, warn};
use vpn_contract::Secret;
use x25519_dalek::PublicKey;

/// How often the firewall table is compared with the intended one besides every change
/// nftables announces: a backstop should the announcements ever fail.
const FIREWALL_POLL: Duration = Duration::from_secs(10);

/// How often local addresses are re-read for our endpoints (DHCP, a new uplink).
const ENDPOINT_REFRESH: Duration = Duration::from_secs(30);

/// The first and the longest wait before a failed endpoint update is tried again
/// (tailscaled backs off up to 30 s).
const LITE_RETRY: (Duration, Duration) = (Duration::from_secs(2), Duration::from_secs(30));

/// An endpoint update under way beside the map stream.
type LiteUpdate = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;

/// How long a new map stream may take to bring its full map: the watchdog at first, twice as
/// long after each stream that brought none in time, and twice as long as the last full map
/// took once one came; never less than the watchdog nor more than
/// [`FIRST_MAP_WAIT_FACTOR`] times it. A headscale that needs longer than the watchdog for a
/// large tailnet's map would otherwise be asked for it again and again, starting over each
/// time; a stalled one is still given up on. The wait is kept in the state directory
/// ([`FIRST_MAP_WAIT_FILE`]): an agent restarted in that tailnet (a crash, an update, a
/// reboot) would otherwise give up on its first map as the last one did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FirstMapWait {
    watchdog: Duration,
    limit: Duration,
}

/// Where [`FirstMapWait`] is kept: its limit in whole seconds.
const FIRST_MAP_WAIT_FILE: &str = "first-map-wait";

impl FirstMapWait {
    /// Starts at what an earlier run learned (`kept`, the file's text), if anything.
    fn new(watchdog: Duration, kept: Option<&str>) -> Self {
        let mut w = FirstMapWait {
            watchdog,
            limit: watchdog,
        };
        if let Some(secs) = kept.and_then(|t| t.trim().parse::<u64>().ok()) {
            w.limit = w.bounded(Duration::from_secs(secs));
        }
        w
    }

    /// What [`FirstMapWait::new`] reads back.
    fn kept(&self) -> String {
        format!("{}\n", self.limit.as_secs())
    }

    fn limit(&self) -> Duration {
        self.limit
    }

    fn timed_out(&mut self) {
        self.limit = self.bounded(self.limit * 2);
    }

    fn got_map(&mut self, took: Duration) {
        self.limit = self.bounded(took * 2);
    }

    fn bounded(&self, d: Duration) -> Duration {
        d.clamp(self.watchdog, self.watchdog * FIRST_MAP_WAIT_FACTOR)
    }
}

/// A stream's first map as it came: its size (zstd) and when its last byte arrived.
struct FirstMap {
    bytes: usize,
    received: tokio::time::Instant,
}

/// How soon a lasting change of the netmap (see [`Changes::lasting`]) is in the cache.
const CACHE_FLUSH: Duration = Duration::from_secs(5);

/// How soon a change of peers' whereabouts alone is: under churn they change all the time,
/// and at 5 000 peers each write of the cache cost 4-9 ms of CPU (bench patch), most of the
/// agent's CPU under churn. A restart finds moved peers again through disco and DERP.
const CACHE_FLUSH_WHEREABOUTS: Duration = Duration::from_secs(300);

/// A session whose map stream was open this long was healthy: the next failure starts the
/// backoff afresh.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);

/// What we report as our version to control (tailscaled's `IPNVersion`): peers see it in
/// their netmaps.
pub const IPN_VERSION: &str = concat!(
    "vpn-agent-",
    env!("VPN_BUILD_VERSION"),
    "-",
    env!("VPN_BUILD_COMMIT")
);

/// A map stream opened this soon after the agent's start or its last stream's end is
/// replaced once, this long after it opened (stretched by up to a third by our node key, so
/// that agents back together after a headscale restart do not ask for full maps together).
/// headscale v0.28 gives a node whose stream ended 10 s to come back, looking once a second,
/// then marks it offline without a last look (fixed upstream in b09af384, v0.29): a stream
/// that opened in that last second is live while every peer lists us offline. The
/// replacement opens before the old stream ends, so it is never marked so itself, and marks
/// us online again. Long enough for the old session's 10 s on a slow headscale.
const RECONNECT_SETTLE: Duration = Duration::from_secs(30);

/// At most this often a subnet router opens a new map stream to learn its approved routes.
const RESYNC_INTERVAL: Duration = Duration::from_secs(5);

/// How often the pre-auth key file is looked at while a key is wanted.
const KEY_FILE_POLL: Duration = Duration::from_secs(1);

pub struct Daemon {
    status: Arc<Mutex<Status>>,
    socket: PathBuf,
    tunnel: Option<Tunnel>,
    /// The running data plane (after `start_local`).
    data: Option<Shell>,
    /// When the current session's map stream opened.
    stream_opened: Option<tokio::time::Instant>,
    /// When the agent started, and when its last map stream ended: a stream opened soon
    /// after either is replaced once ([`RECONNECT_SETTLE`]).
    started: tokio::time::Instant,
    stream_ended: Option<tokio::time::Instant>,
    first_map_wait: FirstMapWait,
    /// How long headscale took for the last full map it gave us: what a renewal costs it
    /// ([`renewal_period`]).
    map_answered_in: Duration,
    /// The last `STATUS=` line sent to systemd, without its figures.
    status_line: Mutex<String>,
    /// The URL of the last ping request answered: control repeats it.
    last_ping_url: Option<String>,
    /// headscale told us it does not know this node (any more).
    forgotten: bool,
    cfg: Config,
    url: ServerUrl,
    tls: Arc<rustls::ClientConfig>,
    state_dir: PathBuf,
    identity: Identity,
    pub netmap: Netmap,
    /// The next key expiry in the netmap, kept up to date as expiries change (a patch of
    /// endpoints or online state does not look at every peer for it).
    next_expiry: Option<std::time::SystemTime>,
    /// Whether the peer list of `vpn-agent status` is behind the netmap: it is rebuilt when a
    /// client asks, not for every patch (see [`crate::status::peer_list`]).
    peer_list: PeerListStale,
    /// The server's side of it, until the status socket is served.
    peer_list_ask: Option<PeerListAsk>,
}

impl Daemon {
    pub fn new(cfg: Config, state_dir: PathBuf, socket: PathBuf) -> Result<Daemon> {
        let url = ServerUrl::parse(&cfg.server_url)?;
        let tls = client::tls_config(cfg.settings.ca_file.as_deref().map(Path::new))?;
        std::fs::create_dir_all(&state_dir).map_err(|e| Error::io(&state_dir, e))?;
        let identity = Identity::load_or_create(&state_dir)?;
        let (peer_list_ask, peer_list) = crate::status::peer_list();
        let status = Status {
            backend_state: if identity.registered {
                "Starting"
            } else {
                "NeedsLogin"
            }
            .into(),
            hostname: cfg.hostname.clone(),
            server_url: cfg.server_url.clone(),
            interface: cfg.settings.interface.clone(),
            ..Status::default()
        };
        Ok(Daemon {
            status: Arc::new(Mutex::new(status)),
            socket,
            tunnel: None,
            data: None,
            stream_opened: None,
            started: tokio::time::Instant::now(),
            stream_ended: None,
            first_map_wait: FirstMapWait::new(
                cfg.map_watchdog,
                std::fs::read_to_string(state_dir.join(FIRST_MAP_WAIT_FILE))
                    .ok()
                    .as_deref(),
            ),
            map_answered_in: Duration::ZERO,
            status_line: Mutex::new(String::new()),
            last_ping_url: None,
            forgotten: false,
            cfg,
            url,
            tls,
            state_dir,
            identity,
            netmap: Netmap::default(),
            next_expiry: None,
            peer_list,
            peer_list_ask: Some(peer_list_ask),
        })
    }

    /// What we tell control about this node. No `RequestTags`: tags come with the pre-auth
    /// key, and asking for them again makes headscale v0.28 check them against its policy's
    /// tagOwners and refuse the whole registration when the policy does not list them.
    fn hostinfo(&self, net: &NetInfo) -> Hostinfo {
        Hostinfo {
            ipn_version: IPN_VERSION.into(),
            os: "linux".into(),
            hostname: self.cfg.hostname.clone(),
            routable_ips: prefix_texts(&self.cfg.advertise_routes),
            arch: std::env::consts::ARCH
                .replace("x86_64", "amd64")
                .replace("aarch64", "arm64"),
            net_info: Some(TsNetInfo {
                preferred_derp: net.home_derp,
                working_udp: None,
            }),
        }
    }

    fn firewall_intent(&self) -> crate::firewall::Intent {
        crate::firewall::Intent::of(&self.cfg.settings, &self.cfg.advertise_routes)
    }

    /// A subnet router needs the kernel to forward; our table's forward chain (loaded
    /// before this) decides what may be: only the mesh into the advertised routes.
    fn enable_forwarding(&self) -> Result<()> {
        let routes = &self.cfg.advertise_routes;
        let mut knobs = vec![];
        if routes.iter().any(|r| r.0.is_ipv4()) {
            knobs.push("/proc/sys/net/ipv4/ip_forward");
        }
        if routes.iter().any(|r| r.0.is_ipv6()) {
            knobs.push("/proc/sys/net/ipv6/conf/all/forwarding");
        }
        for path in knobs {
            std::fs::write(path, "1").map_err(|e| crate::Error::io(path, e))?;
            info!(sysctl = path, "IP forwarding on for the advertised routes");
        }
        Ok(())
    }

    fn node_key_text(&self) -> String {
        keys::public_text("nodekey", &self.identity.node_public())
    }

    fn set(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().expect("status lock"));
        self.publish_status();
    }

    /// Brings up what does not need control: the firewall table (again: the early unit
    /// loaded it already), the status socket, the TUN device, the UDP port, the data plane.
    async fn start_local(&mut self) -> Result<()> {
        crate::firewall::apply(&self.firewall_intent())?;
        self.enable_forwarding()?;
        crate::uplink::set(self.cfg.settings.bind_device.as_deref());
        self.guard_firewall();
        let port = self.cfg.settings.listen_port;
        let rt = crate::dataplane::shell::runtime()?;
        let (udp, device) = {
            let _in_dataplane = rt.enter();
            (
                crate::dataplane::udp::bind(port)?,
                crate::netlink::open_tun(&self.cfg.settings.interface)?,
            )
        };
        self.tunnel = Some(Tunnel::create(&self.cfg.settings.interface, device).await?);
        let engine = Engine::new(
            self.identity.node.clone(),
            crypto_box::SecretKey::from(self.identity.disco.to_bytes()),
            crate::dataplane::os_rng(),
        );
        let tun = self.tunnel.as_ref().expect("created above").device.clone();
        let node = crypto_box::SecretKey::from(self.identity.node.to_bytes());
        let data = Shell::start(rt, engine, udp, tun, node, self.tls.clone());
        self.data = Some(data.clone());
        self.refresh_endpoints().await;
        let status = self.status.clone();
        let ask = self
            .peer_list_ask
            .take()
            .expect("the status socket is served once");
        crate::status::serve(&self.socket, ask, move || {
            let mut s = status.lock().expect("status lock").clone();
            let stats = data.stats();
            for p in &mut s.peers {
                let Some(st) = keys::parse_text("nodekey", &p.node_key).and_then(|k| stats.get(&k))
                else {
                    continue;
                };
                p.path = st.path.clone();
                p.last_handshake_secs = st.last_handshake.map(|d| d.as_secs());
                p.tx_bytes = st.tx_bytes;
                p.rx_bytes = st.rx_bytes;
            }
            s
        })?;
        info!(
            interface = %self.cfg.settings.interface,
            udp_port = port,
            bind_device = crate::uplink::device(),
            "local setup done"
        );
        Ok(())
    }

    fn data(&self) -> &Shell {
        self.data.as_ref().expect("start_local ran")
    }

    /// Puts the table back whenever someone else removes or changes it: at once on every
    /// ruleset change nftables announces (an `nft flush ruleset` by a reload of
    /// nftables.service), and every [`FIREWALL_POLL`] in any case.
    fn guard_firewall(&self) {
        let intent = self.firewall_intent();
        tokio::spawn(async move {
            let mut watch = match crate::firewall::watch::Watch::open() {
                Ok(w) => Some(w),
                Err(e) => {
                    warn!(error = %e, "no nftables change events; checking the table by polling only");
                    None
                }
            };
            let mut tick = tokio::time::interval(FIREWALL_POLL);
            loop {
                let changed = async {
                    match watch.as_mut() {
                        Some(w) => w.changed().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = changed => if let Err(e) = r {
                        warn!(error = %e, "nftables change events failed; polling only");
                        watch = None;
                    },
                    _ = tick.tick() => {}
                }
                let started = std::time::Instant::now();
                let i = intent.clone();
                match tokio::task::spawn_blocking(move || crate::firewall::restore_if_changed(&i))
                    .await
                {
                    Ok(Ok(d)) if !d.is_empty() => warn!(
                        differences = ?d,
                        restored_in = ?started.elapsed(),
                        "nftables table was changed by someone else; restored"
                    ),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => error!(error = %e, "cannot check the nftables table"),
                    Err(e) => error!(error = %e, "firewall check task failed"),
                }
            }
        });
    }

    /// Our local addresses with the UDP port: the "local" endpoints peers try first.
    async fn refresh_endpoints(&self) {
        let Some(t) = &self.tunnel else { return };
        let port = self.cfg.settings.listen_port;
        match t.local_addresses().await {
            Ok(ips) => self.data().set_local_endpoints(
                ips.into_iter()
                    .filter(|ip| ip.is_ipv4() || self.data().has_ipv6())
                    .map(|ip| std::net::SocketAddr::new(ip, port))
                    .collect(),
            ),
            Err(e) => warn!(error = %e, "cannot list local addresses for endpoints"),
        }
    }

    fn map_request(&self, net: &NetInfo, stream: bool) -> MapRequest {
        MapRequest {
            version: CAPABILITY_VERSION,
            compress: "zstd".into(),
            keep_alive: stream,
            node_key: self.node_key_text(),
            disco_key: keys::public_text("discokey", &PublicKey::from(&self.identity.disco)),
            stream,
            omit_peers: !stream,
            hostinfo: self.hostinfo(net),
            endpoints: net.endpoints.iter().map(|e| e.0.to_string()).collect(),
            endpoint_types: net.endpoints.iter().map(|e| e.1).collect(),
        }
    }

    /// Runs until the process is stopped: reconnects with capped, jittered backoff.
    pub async fn run(&mut self) -> Result<()> {
        self.start_local().await?;
        if self.cfg.enabled {
            self.start_from_cache().await;
        }
        // The local side is in place: the table, the TUN device, the cached mesh if any.
        // Waiting for headscale here would make systemd kill a firewall whose control
        // server is down, again and again.
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        self.publish_status();
        self.keep_watchdog_fed();
        if !self.cfg.enabled {
            info!("Enabled is false in the mesh config: not connecting");
            std::future::pending::<()>().await;
        }
        // Nothing answers (in time): trying again costs headscale little, and the mesh gets
        // its control back within seconds of headscale's return.
        let mut unreachable = Backoff::new(Duration::from_secs(1), Duration::from_secs(3));
        // headscale answers, but badly or slowly: spare it, within reason.
        let mut failing = Backoff::new(Duration::from_secs(1), Duration::from_secs(15));
        let mut refused = Backoff::new(Duration::from_secs(30), Duration::from_secs(600));
        loop {
            let err = match self.session().await {
                Ok(never) => match never {},
                Err(e) => e,
            };
            // Patches of the session that ended are in the list before the next one begins:
            // only a session answers clients that ask for it.
            self.publish_peer_status_if_stale();
            let opened = self.stream_opened.take();
            if opened.is_some() {
                self.stream_ended = Some(tokio::time::Instant::now());
            }
            if opened.is_some_and(|t| t.elapsed() >= HEALTHY_SESSION) {
                unreachable.reset();
                failing.reset();
                refused.reset();
            }
            self.set(|s| {
                if s.control_connected || s.control_lost_since.is_none() {
                    s.control_lost_since = Some(s.last_contact.unwrap_or_else(now_secs));
                }
                s.control_connected = false;
            });
            let (delay, key_wanted) = match err {
                Error::NodeGone(msg) => {
                    self.identity.registered = false;
                    self.forgotten = true;
                    if let Err(e) = self.identity.save(&self.state_dir) {
                        error!(error = %e, "cannot save the identity");
                    }
                    let d = refused.next(jitter());
                    error!(reason = %msg, retry_in = ?d, "headscale no longer knows this node");
                    self.needs_login(msg);
                    (d, true)
                }
                Error::Refused(msg) => {
                    let d = refused.next(jitter());
                    error!(reason = %msg, retry_in = ?d, "headscale refused the registration");
                    self.needs_login(msg);
                    (d, true)
                }
                e => {
                    let d = match e {
                        Error::Unreachable(_) => unreachable.next(jitter()),
                        _ => failing.next(jitter()),
                    };
                    warn!(error = %e, retry_in = ?d, "control connection failed");
                    self.set(|s| s.error = Some(e.to_string()));
                    (d, false)
                }
            };
            if key_wanted {
                self.wait_for_new_key(delay).await;
            } else {
                tokio::time::sleep(delay).await;
            }
        }
    }

    fn needs_login(&self, msg: String) {
        self.set(|s| {
            s.backend_state = "NeedsLogin".into();
            s.error = Some(msg);
        });
    }

    /// Sleeps `delay`, or less once the pre-auth key file changes: a key dropped in by an
    /// operator is used at once, not after the refusal backoff.
    async fn wait_for_new_key(&self, delay: Duration) {
        let Some(AuthKey::File(path)) = &self.cfg.auth_key else {
            return tokio::time::sleep(delay).await;
        };
        let stamp = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .filter(|m| m.len() > 0)
                .and_then(|m| m.modified().ok())
        };
        let before = stamp(path);
        let until = tokio::time::Instant::now() + delay;
        while tokio::time::Instant::now() < until {
            tokio::time::sleep(KEY_FILE_POLL.min(until - tokio::time::Instant::now())).await;
            let now = stamp(path);
            if now.is_some() && now != before {
                info!(path = %path.display(), "a new pre-auth key file appeared; registering");
                return;
            }
        }
    }

    /// Brings the mesh up from the netmap cached by the last run, before control is reached:
    /// the operator's way in survives a restart or a reboot while headscale is away. The
    /// live map replaces it as soon as headscale answers.
    async fn start_from_cache(&mut self) {
        let cached = match cache::load(&self.state_dir, &self.node_key_text()) {
            Ok(Some(c)) => c,
            Ok(None) => return,
            Err(e) => {
                warn!(error = %e, "the cached netmap is not used");
                return;
            }
        };
        let of = cached
            .saved_at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        info!(
            netmap_of = %format_time(cached.saved_at),
            peers = cached.netmap.peers.len(),
            "starting on the cached netmap until headscale answers"
        );
        self.netmap = cached.netmap;
        self.set(|s| s.cached_netmap_of = Some(of));
        let everything = Changes::everything(&self.netmap);
        if let Err(e) = self.apply_changes(everything).await {
            warn!(error = %e, "the cached netmap could not be applied");
        }
    }

    /// Tells systemd's watchdog we live, as long as both the daemon's runtime and the data
    /// plane's thread do their work: a wedged agent is restarted.
    fn keep_watchdog_fed(&self) {
        let Some(limit) = sd_notify::watchdog_enabled() else {
            return;
        };
        let data = self.data().clone();
        let every = limit / 3;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let quiet = now_secs().saturating_sub(data.last_tick());
                if Duration::from_secs(quiet) < limit / 2 {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                } else {
                    error!(
                        quiet_secs = quiet,
                        "the data plane's thread stopped ticking; not feeding the watchdog"
                    );
                }
            }
        });
    }

    /// Sends the status line to systemd when it changed.
    fn publish_status(&self) {
        let line = self.status.lock().expect("status lock").summary(now_secs());
        let mut last = self.status_line.lock().expect("status line lock");
        // The seconds in the line change every second; only the words matter here.
        let words: String = line.chars().filter(|c| !c.is_ascii_digit()).collect();
        if *last != words {
            *last = words;
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&line)]);
        }
    }

    /// One control session: connect, register if needed, follow the map stream; tell
    /// control when our home DERP region or endpoints change (a "lite" map request), and
    /// ask it now and then whether it still knows us.
    async fn session(&mut self) -> Result<std::convert::Infallible> {
        let mut s = client::connect(&self.url, &self.tls, &self.identity.machine).await?;
        self.ensure_registered(&mut s).await?;
        self.refresh_endpoints().await;
        let mut net_rx = self.data().net_info();
        let net = net_rx.borrow_and_update().clone();
        let req = self.map_request(&net, true);
        let (mut body, mut first, first_map) = self.open_stream(&mut s, &req).await?;
        let opened = tokio::time::Instant::now();
        self.stream_opened = Some(opened);
        let mut settle = settle_at(
            opened,
            self.stream_ended.unwrap_or(self.started),
            &self.identity.node_public(),
        );
        self.set(|s| {
            s.control_connected = true;
            s.control_lost_since = None;
            s.cached_netmap_of = None;
            s.last_contact = Some(now_secs());
            s.error = None;
            if s.backend_state == "NeedsLogin" {
                s.backend_state = "Starting".into();
            }
        });
        let ping = first.ping_request.take();
        let c = self.netmap.replace_with(first);
        self.apply_changes(c).await?;
        // After the first map is applied, so the line says what a large map costs us.
        info!(
            server = %self.cfg.server_url,
            endpoints = ?req.endpoints,
            home_derp = net.home_derp,
            first_map_bytes = first_map.bytes,
            first_map_applied_ms = first_map.received.elapsed().as_millis() as u64,
            "map stream open"
        );
        self.answer_ping(ping);
        self.save_cache().await;
        let (mut ended, mut pong) = s.liveness();
        let mut last_message = tokio::time::Instant::now();
        let mut refresh = tokio::time::interval(ENDPOINT_REFRESH);
        let mut peer_list_asked = self.peer_list.asked();
        // When the netmap is next written to the cache; none while the cache holds it.
        let mut cache_due: Option<tokio::time::Instant> = None;
        // When to open a new stream for a full map (see `needs_self_node`).
        let mut resync: Option<tokio::time::Instant> = None;
        let mut last_resync = tokio::time::Instant::now();
        // The last message that was more than a keep-alive, or the last full map; and the
        // last full map.
        let mut last_update = tokio::time::Instant::now();
        let mut last_full = last_update;
        // Endpoint updates run beside the stream, one at a time: one asked for meanwhile
        // (`lite_wanted`) starts when it ends; a failed one is retried after a backoff. Only
        // headscale's "node not found" ends the session: a busy or broken headscale that
        // cannot store our endpoints still feeds the stream, and a new session would cost
        // it a full map on top.
        let mut lite: Option<LiteUpdate> = None;
        let mut lite_wanted = false;
        let mut lite_retry: Option<tokio::time::Instant> = None;
        let mut lite_failures = 0u32;
        let mut lite_backoff = Backoff::new(LITE_RETRY.0, LITE_RETRY.1);
        loop {
            if lite.is_none() && lite_wanted && lite_retry.is_none() {
                lite_wanted = false;
                lite = Some(self.lite_update(s.requests(), &net_rx.borrow()));
            }
            let next_expiry = self.next_expiry;
            // Follows how long headscale took for the last full map.
            let refresh_after = self.refresh_after();
            tokio::select! {
                msg = body.next_message() => {
                    let Some(mut msg) = msg? else {
                        return Err(Error::Control("the map stream ended".into()));
                    };
                    last_message = tokio::time::Instant::now();
                    let contact = now_secs();
                    if msg.keep_alive {
                        self.set(|s| s.last_contact = Some(contact));
                    } else {
                        last_update = last_message;
                        if self.needs_self_node(&msg) && resync.is_none() {
                            resync = Some(last_resync + RESYNC_INTERVAL);
                        }
                        let ping = msg.ping_request.take();
                        let applying = std::time::Instant::now();
                        let c = self.netmap.apply(msg);
                        let named = c.changed_peers.len() + c.removed_peers.len();
                        cache_due = cache_due_after(cache_due, c.lasting);
                        self.apply_changes(c).await?;
                        let took = applying.elapsed();
                        self.set(|s| {
                            s.last_contact = Some(contact);
                            s.map_updates.record(named, took);
                        });
                        self.answer_ping(ping);
                    }
                }
                r = ended.wait_for(Option::is_some) => {
                    let reason = r.ok().and_then(|r| r.clone()).unwrap_or_default();
                    return Err(Error::Control(reason));
                }
                Ok(()) = pong.changed() => {
                    let t = *pong.borrow_and_update();
                    self.set(|s| s.last_contact = Some(t));
                }
                changed = net_rx.changed() => {
                    if changed.is_err() {
                        return Err(Error::Control("the data plane stopped".into()));
                    }
                    let net = net_rx.borrow_and_update();
                    info!(home_derp = net.home_derp, endpoints = ?net.endpoints, "telling control our new endpoints");
                    lite_wanted = true;
                }
                r = async { lite.as_mut().expect("guarded").await }, if lite.is_some() => {
                    lite = None;
                    match r {
                        Ok(()) => {
                            if lite_failures > 0 {
                                info!(failures = lite_failures, "control took our endpoint update");
                            }
                            lite_failures = 0;
                            lite_backoff.reset();
                        }
                        Err(e @ Error::NodeGone(_)) => return Err(e),
                        Err(e) => {
                            lite_failures += 1;
                            let wait = lite_backoff.next(jitter());
                            warn!(error = %e, retry_in = ?wait, "endpoint update failed; the map stream goes on");
                            lite_wanted = true;
                            lite_retry = Some(tokio::time::Instant::now() + wait);
                        }
                    }
                }
                _ = tokio::time::sleep_until(lite_retry.unwrap_or(last_message)), if lite_retry.is_some() => {
                    lite_retry = None;
                }
                _ = refresh.tick() => self.refresh_endpoints().await,
                Ok(()) = peer_list_asked.changed() => self.publish_peer_status_if_stale(),
                _ = tokio::time::sleep_until(cache_due.unwrap_or(last_message)), if cache_due.is_some() => {
                    cache_due = None;
                    self.save_cache().await;
                }
                _ = sleep_until_system(next_expiry), if next_expiry.is_some() => {
                    info!("a node key expired; peers updated");
                    self.refresh_peers().await;
                }
                _ = tokio::time::sleep_until(resync.unwrap_or(last_message)), if resync.is_some() => {
                    resync = None;
                    last_resync = tokio::time::Instant::now();
                    let net = net_rx.borrow().clone();
                    let renewed;
                    (body, renewed) = self.replace_stream(&mut s, &net).await?;
                    debug!("new map stream for our own node's routes");
                    last_update = tokio::time::Instant::now();
                    last_full = last_update;
                    cache_due = renewed.cache_due(cache_due);
                }
                _ = tokio::time::sleep_until(settle.unwrap_or(opened)), if settle.is_some() => {
                    settle = None;
                    let net = net_rx.borrow().clone();
                    let renewed;
                    (body, renewed) = self.replace_stream(&mut s, &net).await?;
                    info!(changed = renewed.changed, "map stream replaced once after the reconnect");
                    last_update = tokio::time::Instant::now();
                    last_full = last_update;
                    cache_due = renewed.cache_due(cache_due);
                }
                _ = tokio::time::sleep_until(next_refresh(last_update, last_full, refresh_after)) => {
                    let quiet = last_update + refresh_after <= tokio::time::Instant::now();
                    let net = net_rx.borrow().clone();
                    let renewed;
                    (body, renewed) = self.replace_stream(&mut s, &net).await?;
                    let missed = renewed.changed;
                    if missed > 0 && quiet {
                        warn!(
                            quiet_secs = refresh_after.as_secs(),
                            missed,
                            "the map stream brought only keep-alives, and a new one shows \
                             changes it never sent: headscale had stopped updating it"
                        );
                    } else if missed > 0 {
                        // A busy stream: what differs may be news of the last moment as well
                        // as an update headscale lost, so this says no more than it knows.
                        info!(
                            age_secs = (refresh_after * MAP_MAX_AGE_FACTOR).as_secs(),
                            changed = missed,
                            "map stream renewed at its age limit; its full map changed what \
                             the old one had brought"
                        );
                    } else {
                        debug!(
                            quiet,
                            answered_ms = self.map_answered_in.as_millis(),
                            next_secs = self.refresh_after().as_secs(),
                            "map stream refreshed; nothing was missed"
                        );
                    }
                    last_update = tokio::time::Instant::now();
                    last_full = last_update;
                    cache_due = renewed.cache_due(cache_due);
                }
                _ = tokio::time::sleep_until(last_message + self.cfg.map_watchdog) => {
                    return Err(Error::Control(format!("no map message for {:?}", self.cfg.map_watchdog)));
                }
            }
        }
    }

    /// Opens a map stream and reads up to its full map, within [`FirstMapWait`].
    /// headscale (v0.28) hands a new stream the changes of the moment before its full map
    /// at times (it joins the stream to its batcher before it makes the full map); applied
    /// as a full map, such a change would empty our addresses, DERP map and filter until
    /// the next message. The full map is newer than what came before it, so those go unread.
    async fn open_stream(
        &mut self,
        s: &mut Session,
        req: &MapRequest,
    ) -> Result<(client::Body, MapResponse, FirstMap)> {
        let limit = self.first_map_wait.limit();
        let asked = tokio::time::Instant::now();
        let r = match tokio::time::timeout(limit, Self::read_full_map(s, req)).await {
            Ok(Ok(opened)) => {
                self.map_answered_in = opened.2.received - asked;
                self.first_map_wait.got_map(self.map_answered_in);
                Ok(opened)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => {
                self.first_map_wait.timed_out();
                Err(Error::Unreachable(format!(
                    "opening the map stream: no full map within {limit:?} (the next stream \
                     gets {:?})",
                    self.first_map_wait.limit()
                )))
            }
        };
        if self.first_map_wait.limit() != limit {
            self.keep_first_map_wait();
        }
        r
    }

    fn keep_first_map_wait(&self) {
        let path = self.state_dir.join(FIRST_MAP_WAIT_FILE);
        let text = self.first_map_wait.kept();
        if let Err(e) = crate::fsutil::write_private_atomic(&path, text.as_bytes()) {
            // Only the next start's first wait depends on it.
            warn!(error = %e, "could not keep the wait for a first map");
        }
    }

    async fn read_full_map(
        s: &mut Session,
        req: &MapRequest,
    ) -> Result<(client::Body, MapResponse, FirstMap)> {
        let mut body = s.map(req).await?;
        let mut skipped = 0;
        loop {
            let raw = body
                .next_raw_message()
                .await?
                .ok_or_else(|| Error::Control("the map stream ended before the full map".into()))?;
            let received = tokio::time::Instant::now();
            let first = body.decode(&raw)?;
            if is_full_map(&first) {
                if skipped > 0 {
                    debug!(skipped, "messages before the full map of a new stream");
                }
                let bytes = raw.len();
                return Ok((body, first, FirstMap { bytes, received }));
            }
            skipped += 1;
        }
    }

    /// Opens a new map stream in session `s` and applies its full map. The old stream ends
    /// when its body is dropped, after the new one is complete: headscale never sees us
    /// offline. Returns the new body and how many things the full map changed.
    async fn replace_stream(
        &mut self,
        s: &mut Session,
        net: &NetInfo,
    ) -> Result<(client::Body, Renewed)> {
        let req = self.map_request(net, true);
        let (body, first, _) = self.open_stream(s, &req).await?;
        let c = self.netmap.replace_with(first);
        let renewed = Renewed {
            changed: c.changed_peers.len()
                + c.removed_peers.len()
                + usize::from(c.self_changed)
                + usize::from(c.filter_changed)
                + usize::from(c.derp_changed),
            lasting: c.lasting,
        };
        self.apply_changes(c).await?;
        Ok((body, renewed))
    }

    fn refresh_after(&self) -> Duration {
        let period = renewal_period(self.cfg.map_refresh_after, self.map_answered_in);
        refresh_after(period, &self.identity.node_public())
    }

    /// Whether `msg` may have changed what headscale approved of our routes without saying
    /// so: headscale (v0.27 to v0.29) answers an approval, or a policy change, with packet
    /// filters and peers but not our own node, whose `AllowedIPs` list the approved routes.
    /// A subnet router then asks for a full map.
    fn needs_self_node(&self, msg: &MapResponse) -> bool {
        needs_self_node(&self.cfg.advertise_routes, msg)
    }

    /// A non-streaming map request (endpoints, home DERP), to run beside the map stream.
    /// Sent only when they changed, and given as long as a map message (the watchdog, as
    /// tailscaled does): every map request costs headscale (v0.28) a rebuild of its peer
    /// map over all pairs of nodes, 48 s at 5 000 nodes (bench scale), and one abandoned
    /// and sent again would only cost it another.
    fn lite_update(&self, requests: client::Requests, net: &NetInfo) -> LiteUpdate {
        let req = self.map_request(net, false);
        let wait = self.cfg.map_watchdog;
        Box::pin(async move {
            let lite = async { requests.map(&req).await?.read_all().await };
            client::deadline("the endpoint update", wait, lite)
                .await
                .map(|_| ())
        })
    }

    /// Answers control's ping as tailscaled does: a HEAD request to the URL it gave (headscale
    /// v0.29 checks HA subnet routers this way). Each URL once; in the background.
    fn answer_ping(&mut self, pr: Option<PingRequest>) {
        let Some(pr) = pr else { return };
        if !pr.types.is_empty() {
            debug!(types = %pr.types, "ping request of a kind the agent does not answer");
            return;
        }
        if self.last_ping_url.as_deref() == Some(pr.url.as_str()) {
            return;
        }
        self.last_ping_url = Some(pr.url.clone());
        let (url, tls) = (pr.url, self.tls.clone());
        tokio::spawn(async move {
            match client::head(&url, &tls).await {
                Ok(status) => debug!(status, "answered control's ping"),
                Err(e) => warn!(error = %e, "could not answer control's ping"),
            }
        });
    }

    /// Writes the netmap to the state directory (off the daemon's thread: a large map
    /// takes a while to sync).
    async fn save_cache(&self) {
        let bytes = cache::encode(
            &self.netmap,
            &self.node_key_text(),
            std::time::SystemTime::now(),
        );
        let dir = self.state_dir.clone();
        match tokio::task::spawn_blocking(move || cache::save(&dir, &bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "cannot cache the netmap"),
            Err(e) => warn!(error = %e, "netmap cache task failed"),
        }
    }

    /// Applies what changed in the netmap: addresses, DERP map, peers, filter.
    async fn apply_changes(&mut self, c: Changes) -> Result<()> {
        if c.self_changed {
            let addrs = crate::netlink::plan(&self.netmap.addresses())?;
            if let Some(t) = &self.tunnel {
                t.set_addresses(&addrs).await?;
            }
            let approved = prefix_texts(&self.approved_routes());
            info!(addresses = ?self.netmap.addresses(), approved_routes = ?approved, "self node");
            self.set(|s| {
                s.self_addresses = self.netmap.addresses();
                s.advertised_routes = prefix_texts(&self.cfg.advertise_routes);
                s.approved_routes = approved;
            });
        }
        if c.derp_changed {
            self.data().set_derp_map(&self.netmap.derp_map).await;
        }
        // Our addresses are part of the filter: it accepts only packets addressed to us.
        if c.filter_changed || c.self_changed {
            self.update_filter();
        }
        if c.expiry_changed {
            self.next_expiry = self.netmap.next_expiry(std::time::SystemTime::now());
        }
        // Every peer's use depends on our key, not on the rest of our node: headscale echoes
        // our endpoints back as a new self node, and at 1 000 peers a refresh of them all for
        // it took 9 ms (bench scale).
        if c.self_key_changed || c.all_peers {
            self.refresh_peers().await;
        } else if c.peers_changed() {
            self.update_peers(&c).await;
        }
        Ok(())
    }

    /// Hands the data plane only the peers `c` names; the kernel's routes only if a peer's
    /// routes may have changed. What a patch costs does not grow with the tailnet.
    async fn update_peers(&mut self, c: &Changes) {
        let now = std::time::SystemTime::now();
        let mut removed: Vec<[u8; 32]> = c
            .stale_keys
            .iter()
            .filter_map(|k| keys::parse_text("nodekey", k))
            .collect();
        let mut changed = vec![];
        for id in &c.changed_peers {
            let Some(p) = self.netmap.peers.get(id) else {
                continue;
            };
            match self.peer_info(p, now) {
                Some(info) => changed.push(info),
                None => removed.extend(keys::parse_text("nodekey", &p.key)),
            }
        }
        debug!(
            changed = changed.len(),
            removed = removed.len(),
            peers = self.netmap.peers.len(),
            "peers updated"
        );
        self.data().update_peers(changed, &removed);
        if c.routes_changed {
            let routes = self.accepted_routes();
            if let Some(t) = &mut self.tunnel {
                t.set_routes(&routes).await;
            }
        }
        self.peer_list.mark();
        let count = self.netmap.peers.len();
        if self.status.lock().expect("status lock").peer_count != count {
            self.set(|s| s.peer_count = count);
        }
    }

    /// The peer list of `vpn-agent status`, from the netmap as it is now.
    fn publish_peer_status(&mut self) {
        let peers = self.peer_status(std::time::SystemTime::now());
        self.set(|s| {
            s.peer_count = peers.len();
            s.peers = peers;
        });
        self.peer_list.rebuilt();
    }

    fn publish_peer_status_if_stale(&mut self) {
        if self.peer_list.is_stale() {
            self.publish_peer_status();
        } else {
            self.peer_list.rebuilt();
        }
    }

    /// Hands the data plane the peers, the kernel the accepted routes, and status both;
    /// again whenever a key expires.
    async fn refresh_peers(&mut self) {
        let now = std::time::SystemTime::now();
        let self_expiry = self.netmap.self_node.as_ref().and_then(key_expiry);
        if self.netmap.self_expired(now) {
            let file = match &self.cfg.auth_key {
                Some(AuthKey::File(p)) => p.display().to_string(),
                _ => "the AuthKey file".into(),
            };
            let msg = format!(
                "this node's key expired{}: headscale lets it back only with a new pre-auth key; \
                 put one into {file} and restart vpn-agent (SSH over the mesh is closed until then: \
                 use the serial console)",
                self_expiry
                    .filter(|t| *t > std::time::UNIX_EPOCH)
                    .map(|t| format!(" at {}", format_time(t)))
                    .unwrap_or_default()
            );
            error!("{msg}");
            self.needs_login(msg);
        } else if self.netmap.self_node.is_some()
            && self.status.lock().expect("status lock").backend_state != "Running"
        {
            // The first map (live or cached), or a key that is valid again.
            self.set(|s| {
                if s.backend_state == "NeedsLogin" {
                    s.error = None;
                }
                s.backend_state = "Running".into();
            });
            info!("running");
        }
        info!(peers = self.netmap.peers.len(), "peers updated");
        self.next_expiry = self.netmap.next_expiry(now);
        self.data().set_peers(self.peer_infos(now));
        let routes = self.accepted_routes();
        if let Some(t) = &mut self.tunnel {
            t.set_routes(&routes).await;
        }
        self.publish_peer_status();
        self.set(|s| s.key_expiry = self_expiry.map(format_time));
    }

    /// Hands the data plane the filter of the netmap's packet filter sets and our addresses.
    /// Rules that do not parse are left out and named in the log: what is left can only be
    /// narrower than what headscale meant, never wider.
    fn update_filter(&self) {
        let parsed = crate::filter::Filter::from_sets(&self.netmap.packet_filters);
        for rule in &parsed.skipped {
            error!(rule = %rule, "packet filter rule not understood; left out (it grants nothing)");
        }
        // An invalid self address already failed the map; none at all means we have no
        // address yet, and nothing is addressed to us.
        let mut ours = crate::netlink::plan(&self.netmap.addresses()).unwrap_or_default();
        ours.extend(self.approved_routes());
        let f = parsed.filter.with_local(&ours);
        info!(
            rules = f.rule_count(),
            skipped = parsed.skipped.len(),
            "packet filter updated"
        );
        self.data().set_filter(f);
    }

    /// The advertised routes headscale approved: those it lists in our own node's
    /// `AllowedIPs`. Only they are forwarded into; the rest of the advertised ones wait.
    fn approved_routes(&self) -> Vec<(std::net::IpAddr, u8)> {
        approved_routes(&self.cfg.advertise_routes, self.netmap.self_node.as_ref())
    }

    /// The data plane's view of the netmap's peers: each is trusted with its own addresses,
    /// and with the routes it serves only where we accept them (see [`PeerRoutes`]).
    /// Peers whose keys have expired are left out, as tailscaled does; all of them while
    /// our own key has expired.
    fn peer_infos(&self, now: std::time::SystemTime) -> Vec<PeerInfo> {
        if self.netmap.self_expired(now) {
            return vec![];
        }
        self.netmap
            .peers
            .values()
            .filter_map(|p| self.peer_info(p, now))
            .collect()
    }

    /// One peer for the data plane (see [`peer_info`]); none at all while our own key has
    /// expired.
    fn peer_info(&self, p: &Node, now: std::time::SystemTime) -> Option<PeerInfo> {
        if self.netmap.self_expired(now) {
            return None;
        }
        peer_info(p, self.cfg.accept_routes, now)
    }

    /// The subnet routes of all peers that we accept: the kernel sends them to the tunnel.
    fn accepted_routes(&self) -> Vec<(std::net::IpAddr, u8)> {
        let mut routes: Vec<_> = self
            .netmap
            .peers
            .values()
            .filter_map(|p| PeerRoutes::of(p, self.cfg.accept_routes).ok())
            .flat_map(|r| r.accepted)
            .filter(|r| !crate::netlink::in_mesh(*r))
            .collect();
        routes.sort();
        routes.dedup();
        routes
    }

    fn peer_status(&self, now: std::time::SystemTime) -> Vec<PeerStatus> {
        self.netmap
            .peers
            .values()
            .map(|p| {
                let routes = PeerRoutes::of(p, self.cfg.accept_routes).unwrap_or_default();
                PeerStatus {
                    name: p.name.clone(),
                    addresses: p.addresses.clone(),
                    online: p.online,
                    node_key: p.key.clone(),
                    home_derp: p.home_derp,
                    endpoints: p.endpoints.clone(),
                    routes: prefix_texts(&routes.served),
                    accepted_routes: prefix_texts(&routes.accepted),
                    key_expired: is_expired(p, now),
                    ..PeerStatus::default()
                }
            })
            .collect()
    }

    async fn ensure_registered(&mut self, s: &mut Session) -> Result<()> {
        let mut req = RegisterRequest {
            version: CAPABILITY_VERSION,
            node_key: self.node_key_text(),
            old_node_key: keys::public_text("nodekey", &PublicKey::from([0u8; 32])),
            auth: None,
            expiry: ZERO_TIME.into(),
            hostinfo: self.hostinfo(&self.data().net_info().borrow().clone()),
        };
        if self.identity.registered {
            // A known node key re-attaches without a key (a restart).
            let r = s.register(&req).await?;
            if r.error.is_empty() && r.machine_authorized {
                info!("re-attached to headscale with the stored node key");
                // A crash between saving the identity and scrubbing leaves the used key
                // on disk; it goes now.
                self.scrub_used_key();
                return Ok(());
            }
            // No error and no authorization: headscale does not know the key (it offers an
            // interactive login instead), i.e. the node was deleted there.
            self.forgotten = !r.node_key_expired;
            warn!(error = %r.error, key_expired = r.node_key_expired, "stored node key not accepted; registering with the auth key");
        }
        let key = self.auth_key()?;
        req.auth = Some(AuthInfo {
            auth_key: key.expose().to_string(),
        });
        let r = s.register(&req).await?;
        if !r.error.is_empty() {
            return Err(Error::Refused(explain(&r.error)));
        }
        if !r.machine_authorized {
            return Err(Error::Refused(
                "headscale did not authorize this node (an interactive login is not supported)"
                    .into(),
            ));
        }
        self.identity.registered = true;
        self.forgotten = false;
        self.identity.save(&self.state_dir)?;
        info!(hostname = %self.cfg.hostname, "registered with headscale");
        self.scrub_used_key();
        Ok(())
    }

    /// Overwrites and removes the pre-auth key file, if there is one: once this node is
    /// registered, the key is used up and only a secret lying around.
    fn scrub_used_key(&self) {
        let Some(AuthKey::File(path)) = &self.cfg.auth_key else {
            return;
        };
        if !path.exists() {
            return;
        }
        match crate::fsutil::scrub(path) {
            Ok(()) => info!(path = %path.display(), "used pre-auth key scrubbed"),
            Err(e) => warn!(error = %e, "could not scrub the used pre-auth key"),
        }
    }

    fn auth_key(&self) -> Result<Secret> {
        match &self.cfg.auth_key {
            Some(AuthKey::Inline(k)) => Ok(k.clone()),
            Some(AuthKey::File(p)) => match std::fs::read_to_string(p) {
                Ok(t) if !t.trim().is_empty() => Ok(Secret::new(t.trim())),
                Ok(_) => Err(Error::Refused(format!(
                    "the pre-auth key file {} is empty",
                    p.display()
                ))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::Refused(format!(
                    "{} and its pre-auth key file {} is gone (already used?); put a new key \
                     there: it is picked up at once",
                    if self.forgotten {
                        "headscale no longer knows this node (deleted there?)"
                    } else {
                        "this node is not registered with headscale"
                    },
                    p.display()
                ))),
                Err(e) => Err(Error::io(p, e)),
            },
            None => Err(Error::Refused(
                "this node is not registered and the config holds no AuthKey".into(),
            )),
        }
    }
}

/// Sleeps until the wall-clock time `at` (key expiry is wall-clock), or forever for none.
async fn sleep_until_system(at: Option<std::time::SystemTime>) {
    match at {
        Some(t) => {
            let left = t
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            tokio::time::sleep(left).await
        }
        None => std::future::pending().await,
    }
}

/// What a peer may be trusted with, as tailscaled's route manager decides: its own
/// addresses always; the routes it serves (headscale's `AllowedIPs` beyond its addresses)
/// only when `AcceptRoutes` is on, and exit routes (`0.0.0.0/0`, `::/0`) never, since the
/// agent uses no exit node. Taking `AllowedIPs` as they come would let an approved exit
/// node send with any source address, and draw our traffic to itself.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PeerRoutes {
    pub own: Vec<(std::net::IpAddr, u8)>,
    /// The subnet and exit routes headscale lists for the peer.
    pub served: Vec<(std::net::IpAddr, u8)>,
    /// Those of `served` that we use.
    pub accepted: Vec<(std::net::IpAddr, u8)>,
}

impl PeerRoutes {
    pub fn of(node: &Node, accept_routes: bool) -> Result<PeerRoutes> {
        let own = crate::netlink::plan(&node.addresses)?;
        let served: Vec<_> = crate::netlink::plan(&node.allowed_ips)?
            .into_iter()
            .filter(|r| !own.contains(r))
            .collect();
        let accepted = served
            .iter()
            .copied()
            .filter(|&(_, len)| accept_routes && len != 0)
            .collect();
        Ok(PeerRoutes {
            own,
            served,
            accepted,
        })
    }

    /// The prefixes the data plane trusts the peer with.
    pub fn trusted(self) -> Vec<(std::net::IpAddr, u8)> {
        let mut out = self.own;
        out.extend(self.accepted);
        out
    }
}

/// A netmap peer for the data plane: trusted with its addresses and, with `accept_routes`,
/// the routes it serves. `None` if it must not be one: its key expired, or its key or
/// routes do not parse.
pub fn peer_info(p: &Node, accept_routes: bool, now: std::time::SystemTime) -> Option<PeerInfo> {
    if is_expired(p, now) {
        return None;
    }
    Some(PeerInfo {
        node_key: keys::parse_text("nodekey", &p.key)?,
        disco_key: keys::parse_text("discokey", &p.disco_key),
        allowed: PeerRoutes::of(p, accept_routes).ok()?.trusted(),
        endpoints: p.endpoints.iter().filter_map(|e| e.parse().ok()).collect(),
        home_derp: p.home_derp,
    })
}

/// headscale's refusal texts, said in words an operator can act on. The wordings of every
/// supported headscale version (see the tests); an unknown one still names headscale's text.
pub fn explain(error: &str) -> String {
    let e = error.to_ascii_lowercase();
    let hint = if e.contains("already used") {
        "the single-use pre-auth key was used before; generate the userdata again"
    } else if e.contains("expired") {
        "the pre-auth key expired; generate the userdata again"
    } else if e.contains("not found")
        || e.contains("failed to parse")
        || e.contains("invalid pre auth key")
        || e.contains("invalid auth key")
    {
        "headscale does not know this pre-auth key (a key for another server?)"
    } else {
        "see headscale's log"
    };
    format!("{error} ({hint})")
}

/// Prefixes as `ip/len` text, as control and status spell them.
fn prefix_texts(v: &[(std::net::IpAddr, u8)]) -> Vec<String> {
    v.iter().map(|(ip, len)| format!("{ip}/{len}")).collect()
}

/// Those of `advertised` that our own node's `AllowedIPs` list: the approved ones.
pub fn approved_routes(
    advertised: &[(std::net::IpAddr, u8)],
    node: Option<&Node>,
) -> Vec<(std::net::IpAddr, u8)> {
    let Some(node) = node else { return vec![] };
    let listed = crate::netlink::plan(&node.allowed_ips).unwrap_or_default();
    advertised
        .iter()
        .copied()
        .filter(|r| listed.contains(r))
        .collect()
}

/// Whether a subnet router (`advertised` not empty) should ask for its own node after `msg`:
/// packet filters without our node are how headscale answers a route approval.
pub fn needs_self_node(advertised: &[(std::net::IpAddr, u8)], msg: &MapResponse) -> bool {
    !advertised.is_empty()
        && msg.node.is_none()
        && (msg.packet_filter.is_some() || msg.packet_filters.is_some())
}

/// When the netmap is to be written to the cache, it having been due at `due` (if at all)
/// before a change that is `lasting` or not.
fn cache_due_after(
    due: Option<tokio::time::Instant>,
    lasting: bool,
) -> Option<tokio::time::Instant> {
    let wait = if lasting {
        CACHE_FLUSH
    } else {
        CACHE_FLUSH_WHEREABOUTS
    };
    let at = tokio::time::Instant::now() + wait;
    Some(due.map_or(at, |d| d.min(at)))
}

/// What a new stream's full map changed against the netmap we had: how many things (peers,
/// our node, the filter, the DERP map), and whether a restart would need any of them.
#[derive(Debug, Clone, Copy)]
struct Renewed {
    changed: usize,
    lasting: bool,
}

impl Renewed {
    /// When the cache is next written ([`cache_due_after`]): a full map that changed
    /// nothing leaves it as it was, as most renewals of a quiet stream do.
    fn cache_due(self, due: Option<tokio::time::Instant>) -> Option<tokio::time::Instant> {
        if self.changed == 0 {
            due
        } else {
            cache_due_after(due, self.lasting)
        }
    }
}

/// When to replace the map stream: once it brought only keep-alives for `refresh_after`, or
/// once its full map is [`MAP_MAX_AGE_FACTOR`] times that old, however busy it is.
fn next_refresh(
    last_update: tokio::time::Instant,
    last_full: tokio::time::Instant,
    refresh_after: Duration,
) -> tokio::time::Instant {
    (last_update + refresh_after).min(last_full + refresh_after * MAP_MAX_AGE_FACTOR)
}

/// When to replace a stream opened at `opened`, the agent having started or its last stream
/// having ended at `since` ([`RECONNECT_SETTLE`]); none if that was long enough before.
fn settle_at(
    opened: tokio::time::Instant,
    since: tokio::time::Instant,
    node_key: &PublicKey,
) -> Option<tokio::time::Instant> {
    (opened.duration_since(since) < RECONNECT_SETTLE).then(|| {
        opened + RECONNECT_SETTLE + RECONNECT_SETTLE * u32::from(node_key.as_bytes()[1]) / 765
    })
}

/// A map stream's renewal costs headscale about what its full map took it to answer: it
/// rebuilds its peer map over every pair of nodes first (v0.28; 48 s at 5 000 nodes, bench
/// scale), and tells every peer we are online. Renewals are spaced so that they take at most
/// this share of its time.
const RENEWAL_SHARE: u32 = 10;

/// How long a quiet stream is kept: `base` ([`Config::map_refresh_after`]), or longer when
/// headscale took `answered_in` for our last full map, so that a large or busy headscale is
/// not kept busy by our renewals ([`RENEWAL_SHARE`]).
fn renewal_period(base: Duration, answered_in: Duration) -> Duration {
    base.max(answered_in * RENEWAL_SHARE)
}

/// `base` ([`renewal_period`]) stretched by up to a tenth by our node key, so
/// that agents that connected together (after a headscale restart) do not refresh together.
fn refresh_after(base: Duration, node_key: &PublicKey) -> Duration {
    base + base * u32::from(node_key.as_bytes()[0]) / 2550
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refreshes_spread_over_a_tenth_of_the_period() {
        let base = Duration::from_secs(600);
        let key = |b: u8| PublicKey::from([b; 32]);
        assert_eq!(refresh_after(base, &key(0)), base);
        assert_eq!(refresh_after(base, &key(255)), Duration::from_secs(660));
        assert_ne!(refresh_after(base, &key(1)), refresh_after(base, &key(2)));
    }

    #[test]
    fn a_renewal_that_changed_nothing_leaves_the_cache_alone() {
        let nothing = Renewed {
            changed: 0,
            lasting: false,
        };
        assert_eq!(nothing.cache_due(None), None);
        let soon = Some(tokio::time::Instant::now() + Duration::from_secs(3));
        assert_eq!(nothing.cache_due(soon), soon);
        let now = tokio::time::Instant::now();
        let moved = Renewed {
            changed: 4,
            lasting: false,
        };
        let due = moved.cache_due(None).unwrap();
        assert!(due >= now + CACHE_FLUSH_WHEREABOUTS, "{due:?}");
        assert_eq!(moved.cache_due(soon), soon);
        let lasting = Renewed {
            changed: 1,
            lasting: true,
        };
        let due = lasting.cache_due(None).unwrap();
        assert!(due < now + CACHE_FLUSH_WHEREABOUTS, "{due:?}");
    }

    #[test]
    fn a_headscale_slow_to_answer_is_asked_for_full_maps_less_often() {
        let s = Duration::from_secs;
        let base = s(120);
        // A small tailnet: the configured period.
        assert_eq!(renewal_period(base, Duration::from_millis(40)), base);
        assert_eq!(renewal_period(base, s(12)), base);
        // 5 000 nodes on headscale v0.28 (bench scale): 48 s a map, one every 8 min.
        assert_eq!(renewal_period(base, s(48)), s(480));
        // And back once it answers fast again.
        assert_eq!(renewal_period(base, Duration::ZERO), base);
    }

    #[test]
    fn the_wait_for_a_first_map_grows_after_a_timeout_and_follows_what_a_map_took() {
        let s = Duration::from_secs;
        let mut w = FirstMapWait::new(s(120), None);
        assert_eq!(w.limit(), s(120));
        w.timed_out();
        assert_eq!(w.limit(), s(240));
        w.timed_out();
        w.timed_out();
        assert_eq!(w.limit(), s(480), "never more than four times the watchdog");
        // A slow map keeps the next stream's wait long: its refreshes cost as much.
        w.got_map(s(150));
        assert_eq!(w.limit(), s(300));
        w.got_map(Duration::from_millis(80));
        assert_eq!(w.limit(), s(120), "never less than the watchdog");
    }

    #[test]
    fn a_restart_starts_from_the_wait_the_last_run_learned() {
        let s = Duration::from_secs;
        let mut w = FirstMapWait::new(s(120), None);
        w.timed_out();
        let kept = w.kept();
        assert_eq!(FirstMapWait::new(s(120), Some(&kept)).limit(), s(240));
        // Within the same bounds, whatever the file says; junk is the watchdog.
        assert_eq!(FirstMapWait::new(s(120), Some("99999")).limit(), s(480));
        assert_eq!(FirstMapWait::new(s(120), Some("3\n")).limit(), s(120));
        assert_eq!(FirstMapWait::new(s(120), Some("soon")).limit(), s(120));
        // A shorter watchdog now bounds what a run with a longer one kept.
        assert_eq!(FirstMapWait::new(s(35), Some(&kept)).limit(), s(140));
    }

    #[test]
    fn a_stream_opened_soon_after_the_last_one_ended_is_replaced_once_later() {
        let t0 = tokio::time::Instant::now();
        let key = |b: u8| PublicKey::from([b; 32]);
        let s = Duration::from_secs;
        // Back within seconds (a crash, a restart, a blip): replaced after 30 to 40 s.
        assert_eq!(settle_at(t0 + s(2), t0, &key(0)), Some(t0 + s(32)));
        assert_eq!(settle_at(t0 + s(2), t0, &key(255)), Some(t0 + s(42)));
        // headscale's 10 s for the old stream are long over: nothing to put right.
        assert_eq!(settle_at(t0 + s(30), t0, &key(0)), None);
        assert_eq!(settle_at(t0 + s(600), t0, &key(9)), None);
    }

    #[test]
    fn a_busy_stream_is_replaced_at_its_age_limit() {
        let t0 = tokio::time::Instant::now();
        let every = Duration::from_secs(120);
        // Quiet since its full map: due after one period.
        assert_eq!(next_refresh(t0, t0, every), t0 + every);
        // An update pushes the quiet deadline on.
        let busy = t0 + Duration::from_secs(300);
        assert_eq!(next_refresh(busy, t0, every), busy + every);
        // Updates all the time: due at five periods, not later.
        let busier = t0 + Duration::from_secs(590);
        assert_eq!(
            next_refresh(busier, t0, every),
            t0 + Duration::from_secs(600)
        );
    }

    fn net(text: &str) -> (std::net::IpAddr, u8) {
        vpn_contract::subnet_route(text).unwrap()
    }

    #[test]
    fn only_routes_our_own_node_lists_are_approved() {
        let advertised = [net("198.51.100.0/24"), net("203.0.113.0/24")];
        let node = Node {
            addresses: vec!["100.64.0.1/32".into()],
            allowed_ips: vec![
                "100.64.0.1/32".into(),
                "198.51.100.0/24".into(),
                // Listed, but not ours to route: never forwarded into.
                "192.0.2.0/24".into(),
            ],
            ..Node::default()
        };
        assert_eq!(
            approved_routes(&advertised, Some(&node)),
            [net("198.51.100.0/24")]
        );
        assert!(approved_routes(&advertised, None).is_empty());
        assert!(approved_routes(&[], Some(&node)).is_empty());
    }

    #[test]
    fn a_router_asks_for_its_node_after_filters_without_it() {
        let routes = [net("198.51.100.0/24")];
        let policy: MapResponse =
            serde_json::from_str(r#"{"PacketFilters":{"base":[]},"PeersChanged":[{"ID":2}]}"#)
                .unwrap();
        assert!(needs_self_node(&routes, &policy));
        assert!(!needs_self_node(&[], &policy), "not a router");
        let with_node: MapResponse =
            serde_json::from_str(r#"{"PacketFilters":{"base":[]},"Node":{"ID":1}}"#).unwrap();
        assert!(!needs_self_node(&routes, &with_node));
        let patch: MapResponse =
            serde_json::from_str(r#"{"PeersChangedPatch":[{"NodeID":2}]}"#).unwrap();
        assert!(
            !needs_self_node(&routes, &patch),
            "a patch is no policy change"
        );
    }

    /// The texts of `RegisterResponse.Error` as each version's source writes them
    /// (hscontrol/auth.go, hscontrol/state/state.go, hscontrol/db/preauth_keys.go).
    #[test]
    fn refusals_of_every_supported_headscale_version_are_explained() {
        let unknown = "headscale does not know this pre-auth key";
        for (version, text, hint) in [
            (
                "v0.27.1",
                "handling register with auth key: AuthKey not found",
                unknown,
            ),
            (
                "v0.28.0",
                "handling register with auth key: auth-key not found",
                unknown,
            ),
            (
                "v0.28.0",
                "handling register with auth key: failed to parse auth-key: x",
                unknown,
            ),
            (
                "v0.28.0",
                "handling register with auth key: invalid auth key: crypto/bcrypt: \
                 hashedPassword is not the hash of the given password",
                unknown,
            ),
            ("v0.29.2", "invalid pre auth key", unknown),
            ("v0.27.1", "authkey expired", "expired"),
            ("v0.29.2", "authkey expired", "expired"),
            ("v0.27.1", "authkey already used", "used before"),
            ("v0.29.2", "authkey already used", "used before"),
        ] {
            let said = explain(text);
            assert!(said.contains(hint), "{version}: {text:?} -> {said}");
            assert!(said.starts_with(text), "{version}: {said}");
        }
        assert!(explain("something new").contains("see headscale's log"));
    }

    #[test]
    fn a_peer_is_trusted_with_its_routes_only_when_they_are_accepted_and_never_exit_routes() {
        let node: Node = serde_json::from_str(
            r#"{"Addresses":["100.64.0.3/32","fd7a:115c:a1e0::3/128"],
                "AllowedIPs":["100.64.0.3/32","fd7a:115c:a1e0::3/128","198.51.100.0/24","0.0.0.0/0","::/0"]}"#,
        )
        .unwrap();
        let p = |s: &str| crate::netlink::plan(&[s.to_string()]).unwrap()[0];
        let off = PeerRoutes::of(&node, false).unwrap();
        assert_eq!(
            off.own,
            vec![p("100.64.0.3/32"), p("fd7a:115c:a1e0::3/128")]
        );
        assert_eq!(
            off.served,
            vec![p("198.51.100.0/24"), p("0.0.0.0/0"), p("::/0")]
        );
        assert!(off.accepted.is_empty());
        assert_eq!(off.trusted().len(), 2);
        let on = PeerRoutes::of(&node, true).unwrap();
        assert_eq!(on.accepted, vec![p("198.51.100.0/24")]);
        assert_eq!(on.trusted().last(), Some(&p("198.51.100.0/24")));
    }
}
