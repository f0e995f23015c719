//! `vpn-agent status`: a snapshot the daemon keeps current, served as JSON on a Unix socket
//! that only root can open, and rendered like `tailscale status`.

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub name: String,
    pub addresses: Vec<String>,
    pub online: Option<bool>,
    pub node_key: String,
    pub home_derp: u32,
    pub endpoints: Vec<String>,
    /// The path WireGuard uses: the peer's `ip:port`, or none yet.
    #[serde(default)]
    pub path: Option<String>,
    /// Seconds since the last WireGuard handshake.
    #[serde(default)]
    pub last_handshake_secs: Option<u64>,
    #[serde(default)]
    pub tx_bytes: u64,
    #[serde(default)]
    pub rx_bytes: u64,
    /// Subnet and exit routes headscale lists for the peer (beyond its own addresses).
    #[serde(default)]
    pub routes: Vec<String>,
    /// Those of `routes` this agent sends to the peer and accepts from it.
    #[serde(default)]
    pub accepted_routes: Vec<String>,
    /// The peer's node key has expired: the agent neither sends to it nor accepts from it.
    #[serde(default)]
    pub key_expired: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// NeedsLogin, Starting, Running.
    pub backend_state: String,
    /// The last error that stopped progress, if any (a refused key, an unreachable server).
    pub error: Option<String>,
    pub hostname: String,
    pub server_url: String,
    pub self_addresses: Vec<String>,
    /// The subnets we offer to route (`AdvertiseRoutes`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advertised_routes: Vec<String>,
    /// Those of them headscale approved: the only ones forwarded into.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approved_routes: Vec<String>,
    pub interface: String,
    pub control_connected: bool,
    /// Unix seconds of the last message from control.
    pub last_contact: Option<u64>,
    /// Unix seconds since when control is unreachable (none while connected).
    #[serde(default)]
    pub control_lost_since: Option<u64>,
    /// While the agent runs on the netmap it cached, the Unix seconds when headscale sent it.
    #[serde(default)]
    pub cached_netmap_of: Option<u64>,
    /// When our node key expires (RFC 3339), if it does.
    #[serde(default)]
    pub key_expiry: Option<String>,
    /// The map updates applied since the agent started.
    #[serde(default)]
    pub map_updates: MapUpdates,
    /// Peers in the netmap, kept current; `peers` is rebuilt only for a client.
    #[serde(default)]
    pub peer_count: usize,
    pub peers: Vec<PeerStatus>,
}

/// Map messages after a stream's first (keep-alives aside), and what applying them cost:
/// what a benchmark reads to tell the agent's cost per update from the load's events.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct MapUpdates {
    pub count: u64,
    /// Peers they named (changed, patched or removed).
    pub peers: u64,
    /// From the message decoded to every change applied (netmap, data plane, routes, filter):
    /// in all, and the longest.
    pub apply_micros: u64,
    pub apply_max_micros: u64,
}

impl MapUpdates {
    pub fn record(&mut self, peers: usize, took: std::time::Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.count += 1;
        self.peers += peers as u64;
        self.apply_micros = self.apply_micros.saturating_add(micros);
        self.apply_max_micros = self.apply_max_micros.max(micros);
    }
}

impl Status {
    /// One line for systemd's `STATUS=`: the control state and where the netmap comes from.
    pub fn summary(&self, now: u64) -> String {
        let control = match (self.control_connected, self.control_lost_since) {
            (true, _) => "control connected".to_string(),
            (false, Some(t)) => format!(
                "control unreachable since {} ({}s)",
                crate::control::netmap::format_time(at(t)),
                now.saturating_sub(t)
            ),
            (false, None) => "connecting to control".to_string(),
        };
        let map = match self.cached_netmap_of {
            Some(t) => format!(
                ", running on the netmap of {}",
                crate::control::netmap::format_time(at(t))
            ),
            None => String::new(),
        };
        let peers = match self.peer_count {
            1 => "1 peer".to_string(),
            n => format!("{n} peers"),
        };
        format!("{}: {control}{map}, {peers}", self.backend_state)
    }
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + std::time::Duration::from_secs(secs)
}

/// How long a client of the status socket waits for the daemon to bring its peer list up to
/// date before it gets the list as it stands.
const FRESH_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

/// The peer list of the status is rebuilt from the netmap only when a client asks for the
/// status and peers changed since the last time: at 1 000 peers under endpoint churn,
/// rebuilding it once a second took a third of the agent's CPU time (`bench scale`, perf),
/// and a tailnet of thousands changes all day while nobody looks.
pub fn peer_list() -> (PeerListAsk, PeerListStale) {
    let stale = Arc::new(AtomicBool::new(false));
    let (ask, asked) = watch::channel(0);
    let (done_tx, done) = watch::channel(0);
    (
        PeerListAsk {
            stale: stale.clone(),
            ask,
            done,
        },
        PeerListStale {
            stale,
            asked,
            done: done_tx,
        },
    )
}

/// The status server's side: a fresh list before the answer.
pub struct PeerListAsk {
    stale: Arc<AtomicBool>,
    ask: watch::Sender<u64>,
    done: watch::Receiver<u64>,
}

impl PeerListAsk {
    /// Returns once the daemon has rebuilt a stale list, or after [`FRESH_WITHIN`].
    async fn fresh(&mut self) {
        if !self.stale.load(Ordering::Acquire) {
            return;
        }
        let mut asked = 0;
        self.ask.send_modify(|n| {
            *n += 1;
            asked = *n;
        });
        let _ = tokio::time::timeout(FRESH_WITHIN, self.done.wait_for(|&d| d >= asked)).await;
    }
}

/// The daemon's side: marks the list stale as peers change, and rebuilds it when asked.
pub struct PeerListStale {
    stale: Arc<AtomicBool>,
    asked: watch::Receiver<u64>,
    done: watch::Sender<u64>,
}

impl PeerListStale {
    pub fn mark(&self) {
        self.stale.store(true, Ordering::Release);
    }

    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Acquire)
    }

    /// What a session waits on: changes when a client wants the list (never, once the
    /// server is gone).
    pub fn asked(&self) -> watch::Receiver<u64> {
        self.asked.clone()
    }

    /// The list was rebuilt: clients waiting for it go on.
    pub fn rebuilt(&self) {
        self.stale.store(false, Ordering::Release);
        self.done.send_replace(*self.asked.borrow());
    }
}

/// Serves `snapshot()` as JSON to every client of the Unix socket at `path` (mode 0600),
/// once `peers` says the peer list is fresh.
pub fn serve(
    path: &std::path::Path,
    mut peers: PeerListAsk,
    snapshot: impl Fn() -> Status + Send + 'static,
) -> crate::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::AsyncWriteExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path).map_err(|e| crate::Error::io(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| crate::Error::io(path, e))?;
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            peers.fresh().await;
            let body = serde_json::to_vec(&snapshot()).unwrap_or_default();
            tokio::spawn(async move {
                let _ = conn.write_all(&body).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    Ok(())
}

/// Reads the status from the daemon's socket.
pub fn fetch(path: &std::path::Path) -> crate::Result<Status> {
    use std::io::Read;
    let mut conn = std::os::unix::net::UnixStream::connect(path).map_err(|e| {
        crate::Error::Control(format!(
            "cannot reach the agent at {}: {e} (is vpn-agent running, and are you root?)",
            path.display()
        ))
    })?;
    let mut buf = vec![];
    conn.read_to_end(&mut buf)
        .map_err(|e| crate::Error::io(path, e))?;
    serde_json::from_slice(&buf)
        .map_err(|e| crate::Error::Control(format!("status socket answered garbage: {e}")))
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn first_v4(addrs: &[String]) -> String {
    addrs
        .iter()
        .map(|a| a.split('/').next().unwrap_or_default())
        .find(|a| a.contains('.'))
        .or_else(|| {
            addrs
                .first()
                .map(|a| a.split('/').next().unwrap_or_default())
        })
        .unwrap_or("-")
        .to_string()
}

/// The human form, shaped like `tailscale status`.
pub fn render(s: &Status, now: u64) -> String {
    let mut out = String::new();
    let contact = match s.last_contact {
        Some(t) => format!("last contact {}s ago", now.saturating_sub(t)),
        None => "no contact yet".into(),
    };
    out.push_str(&format!(
        "# {} ({}, {contact})\n",
        s.summary(now),
        s.server_url
    ));
    if let Some(e) = &s.error {
        out.push_str(&format!("# error: {e}\n"));
    }
    if !s.advertised_routes.is_empty() {
        let waiting: Vec<_> = s
            .advertised_routes
            .iter()
            .filter(|r| !s.approved_routes.contains(r))
            .cloned()
            .collect();
        out.push_str(&format!(
            "# routes: approved {:?}, not approved {waiting:?}\n",
            s.approved_routes
        ));
        if !waiting.is_empty() {
            // headscale shows a router its approved routes only where its policy lets the
            // router itself reach them.
            out.push_str(
                "#   (approve with `headscale nodes approve-routes`; the policy must also let \
                 this node reach them, or headscale does not tell it they are approved)\n",
            );
        }
    }
    let short = |n: &str| n.split('.').next().unwrap_or(n).to_string();
    out.push_str(&format!(
        "{:<15} {:<38} {}\n",
        first_v4(&s.self_addresses),
        s.hostname,
        "self"
    ));
    for p in &s.peers {
        let state = match p.online {
            Some(true) => "online",
            Some(false) => "offline",
            None => "-",
        };
        let path = match (&p.path, p.last_handshake_secs) {
            (Some(a), Some(h)) => format!(
                "; direct {a}, handshake {h}s ago, tx {} rx {}",
                p.tx_bytes, p.rx_bytes
            ),
            _ => String::new(),
        };
        out.push_str(&format!(
            "{:<15} {:<38} {state}{path}\n",
            first_v4(&p.addresses),
            short(&p.name)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_client_gets_the_peer_list_rebuilt_for_it_or_after_a_second_the_old_one() {
        use std::sync::Mutex;
        let dir = std::env::temp_dir().join(format!("vpn-agent-status-{}", std::process::id()));
        let socket = dir.join("status.sock");
        let (ask, stale) = peer_list();
        let status = Arc::new(Mutex::new(Status {
            peers: vec![PeerStatus::default()],
            ..Status::default()
        }));
        let shared = status.clone();
        serve(&socket, ask, move || shared.lock().unwrap().clone()).unwrap();
        let fetch = |socket: std::path::PathBuf| {
            tokio::task::spawn_blocking(move || {
                let started = std::time::Instant::now();
                (fetch(&socket).unwrap(), started.elapsed())
            })
        };
        let named = |name: &str| PeerStatus {
            name: name.into(),
            ..PeerStatus::default()
        };

        // Not stale: served as it is, nobody asked to rebuild.
        let (s, _) = fetch(socket.clone()).await.unwrap();
        assert_eq!(s.peers, vec![PeerStatus::default()]);

        // Stale: the daemon rebuilds the list when asked, and the client gets that one.
        stale.mark();
        let mut asked = stale.asked();
        let client = fetch(socket.clone());
        asked.changed().await.unwrap();
        status.lock().unwrap().peers = vec![named("rebuilt")];
        stale.rebuilt();
        let (s, _) = client.await.unwrap();
        assert_eq!(s.peers, vec![named("rebuilt")]);
        assert!(!stale.is_stale());

        // Stale, and the daemon does not answer: the list as it stands, after FRESH_WITHIN.
        stale.mark();
        let (s, took) = fetch(socket.clone()).await.unwrap();
        assert_eq!(s.peers, vec![named("rebuilt")]);
        assert!(took >= FRESH_WITHIN, "{took:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn map_updates_add_up_and_an_older_agents_status_still_reads() {
        let mut u = MapUpdates::default();
        u.record(3, std::time::Duration::from_micros(40));
        u.record(1, std::time::Duration::from_micros(900));
        u.record(0, std::time::Duration::from_micros(60));
        assert_eq!(
            u,
            MapUpdates {
                count: 3,
                peers: 4,
                apply_micros: 1000,
                apply_max_micros: 900
            }
        );
        let old = r#"{"backend_state":"Running","error":null,"hostname":"fw","server_url":"x",
            "self_addresses":[],"interface":"tailscale0","control_connected":true,
            "last_contact":null,"peers":[]}"#;
        let s: Status = serde_json::from_str(old).unwrap();
        assert_eq!(s.map_updates, MapUpdates::default());
    }

    #[test]
    fn renders_like_tailscale_status() {
        let s = Status {
            backend_state: "Running".into(),
            hostname: "fw-1".into(),
            server_url: "https://hs".into(),
            self_addresses: vec!["fd7a::1/128".into(), "100.64.0.2/32".into()],
            control_connected: true,
            last_contact: Some(100),
            peer_count: 1,
            peers: vec![PeerStatus {
                name: "op.mesh.vdc.test.".into(),
                addresses: vec!["100.64.0.1/32".into()],
                online: Some(true),
                ..Default::default()
            }],
            ..Default::default()
        };
        let r = render(&s, 103);
        assert!(
            r.starts_with(
                "# Running: control connected, 1 peer (https://hs, last contact 3s ago)\n"
            ),
            "{r}"
        );
        assert!(r.contains("100.64.0.2      fw-1"), "{r}");
        assert!(r.contains("100.64.0.1      op "), "{r}");
        assert!(r.contains("online"));
    }

    #[test]
    fn says_since_when_control_is_away_and_which_netmap_is_in_force() {
        let s = Status {
            backend_state: "Running".into(),
            control_lost_since: Some(1_796_166_000),
            cached_netmap_of: Some(1_796_165_000),
            ..Default::default()
        };
        assert_eq!(
            s.summary(1_796_166_040),
            "Running: control unreachable since 2026-12-01T23:00:00Z (40s), \
             running on the netmap of 2026-12-01T22:43:20Z, 0 peers"
        );
    }
}
