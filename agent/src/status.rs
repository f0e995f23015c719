//! `vpn-agent status`: a snapshot the daemon keeps current, served as JSON on a Unix socket
//! that only root can open, and rendered like `tailscale status`.

use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

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
    pub peers: Vec<PeerStatus>,
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
        let peers = match self.peers.len() {
            1 => "1 peer".to_string(),
            n => format!("{n} peers"),
        };
        format!("{}: {control}{map}, {peers}", self.backend_state)
    }
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + std::time::Duration::from_secs(secs)
}

/// Serves `snapshot()` as JSON to every client of the Unix socket at `path` (mode 0600).
pub fn serve(
    path: &std::path::Path,
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

    #[test]
    fn renders_like_tailscale_status() {
        let s = Status {
            backend_state: "Running".into(),
            hostname: "fw-1".into(),
            server_url: "https://hs".into(),
            self_addresses: vec!["fd7a::1/128".into(), "100.64.0.2/32".into()],
            control_connected: true,
            last_contact: Some(100),
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
