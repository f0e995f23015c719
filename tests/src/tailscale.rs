//! A stock tailscaled on a lab host: the operator's client and the reference peer.

use crate::cmd;
use crate::headscale::write_private;
use crate::netns::Netns;
use crate::tools;
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The UDP port tailscaled listens on for WireGuard and disco.
pub const PORT: u16 = 41641;

/// A running tailscaled with its own state dir and socket.
#[derive(Debug, Clone)]
pub struct Tailscaled {
    version: &'static str,
    ns: Netns,
    dir: PathBuf,
}

/// What `tailscale status --json` says about the path to one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerPath {
    /// A direct UDP path to this `ip:port`.
    Direct(String),
    /// Relayed through this DERP region.
    Derp(String),
}

impl std::fmt::Display for PeerPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerPath::Direct(a) => write!(f, "direct {a}"),
            PeerPath::Derp(r) => write!(f, "DERP({r})"),
        }
    }
}

impl Tailscaled {
    /// Starts tailscaled in `ns` with a real TUN device (`tailscale0`), trusting the lab
    /// CA (`ca`), with logging to the outside world turned off.
    pub fn start(
        version: &'static str,
        ns: &Netns,
        dir: &Path,
        ca: &Path,
    ) -> Result<(Self, Child)> {
        let mut c = ns.command("env");
        c.arg(format!("SSL_CERT_FILE={}", ca.display()));
        Self::spawn(version, ns, dir, c, &[])
    }

    /// Starts tailscaled as a firewall would after Ignition wrote `root`: in a private
    /// mount namespace where `root/etc` is `/etc`, driven by the config file `config` (a path
    /// inside that `/etc`), trusting the CA file `ca` (also a path there).
    pub fn start_from_root(
        version: &'static str,
        ns: &Netns,
        dir: &Path,
        root: &Path,
        config: &str,
        ca: &str,
    ) -> Result<(Self, Child)> {
        let mut c = ns.command_in_root(root, "env");
        c.arg(format!("SSL_CERT_FILE={ca}"));
        Self::spawn(version, ns, dir, c, &[format!("--config={config}")])
    }

    fn spawn(
        version: &'static str,
        ns: &Netns,
        dir: &Path,
        mut c: Command,
        extra: &[String],
    ) -> Result<(Self, Child)> {
        std::fs::create_dir_all(dir.join("state"))?;
        let me = Self {
            version,
            ns: ns.clone(),
            dir: dir.to_path_buf(),
        };
        let log = std::fs::File::create(me.log_path())?;
        let child = c
            .arg(me.bin("tailscaled"))
            .arg("--tun=tailscale0")
            .arg(format!("--statedir={}", dir.join("state").display()))
            .arg(format!("--socket={}", me.socket().display()))
            .arg(format!("--port={PORT}"))
            .arg("--no-logs-no-support")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start tailscaled")?;
        me.wait_socket(Duration::from_secs(20))?;
        Ok((me, child))
    }

    /// Reattaches to a tailscaled started earlier (a persistent `lab up`).
    pub fn attach(version: &'static str, ns: Netns, dir: PathBuf) -> Self {
        Self { version, ns, dir }
    }

    /// The tailscale version this daemon runs.
    pub fn version(&self) -> &'static str {
        self.version
    }

    fn bin(&self, name: &str) -> PathBuf {
        tools::tailscale_at(self.version).bin(name)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("tailscaled.sock")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("tailscaled.log")
    }

    fn wait_socket(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        while !self.socket().exists() {
            if start.elapsed() > timeout {
                bail!(
                    "tailscaled made no socket within {timeout:?}\n--- {} ---\n{}",
                    self.log_path().display(),
                    crate::lab::tail(&self.log_path(), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// A `tailscale` CLI command aimed at this daemon.
    pub fn cli(&self) -> Command {
        let mut c = self.ns.command(self.bin("tailscale"));
        c.arg(format!("--socket={}", self.socket().display()));
        c
    }

    /// `tailscale up` with a pre-auth key, passed as a file so it never shows in argv.
    pub fn up(&self, login_server: &str, auth_key: &str, hostname: &str) -> Result<()> {
        self.up_with(login_server, auth_key, hostname, &[])
    }

    /// [`Tailscaled::up`] with more flags (`--advertise-routes=…`, `--accept-routes`).
    pub fn up_with(
        &self,
        login_server: &str,
        auth_key: &str,
        hostname: &str,
        extra: &[&str],
    ) -> Result<()> {
        let key_file = self.dir.join("authkey");
        write_private(&key_file, auth_key.as_bytes())?;
        let res = cmd::run(
            self.cli()
                .args([
                    "up",
                    &format!("--login-server={login_server}"),
                    &format!("--auth-key=file:{}", key_file.display()),
                    &format!("--hostname={hostname}"),
                    "--accept-dns=false",
                    "--netfilter-mode=off",
                    "--timeout=60s",
                ])
                .args(extra),
        );
        let _ = std::fs::remove_file(&key_file);
        res.map(drop).with_context(|| {
            format!(
                "tailscale up on {} failed\n--- {} ---\n{}",
                self.ns.name(),
                self.log_path().display(),
                crate::lab::tail(&self.log_path(), 30)
            )
        })
    }

    /// `tailscale status --json`.
    pub fn status(&self) -> Result<Value> {
        let out = cmd::run_quiet(self.cli().args(["status", "--json"]))?;
        serde_json::from_str(&out).context("tailscale status --json printed no JSON")
    }

    /// This node's network map (`tailscale debug netmap`): the tailcfg nodes as control sent
    /// them, `Cap` and all.
    pub fn netmap(&self) -> Result<Value> {
        let out = cmd::run_quiet(self.cli().args(["debug", "netmap"]))?;
        serde_json::from_str(&out).context("tailscale debug netmap printed no JSON")
    }

    /// The peer with mesh address `ip` in this node's network map, as control sent it
    /// (`Hostinfo`, `Cap`, ...).
    pub fn netmap_peer(&self, ip: IpAddr) -> Result<Value> {
        let prefix = format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 });
        self.netmap()?["Peers"]
            .as_array()
            .and_then(|peers| {
                peers.iter().find(|n| {
                    n["Addresses"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(&prefix)))
                })
            })
            .cloned()
            .with_context(|| format!("{ip} is not in the network map"))
    }

    /// This node's first mesh IPv4 address.
    pub fn ipv4(&self) -> Result<IpAddr> {
        let out = cmd::run(self.cli().args(["ip", "-4"]))?;
        out.trim()
            .parse()
            .with_context(|| format!("`tailscale ip -4` printed {out:?}"))
    }

    /// The peer with mesh address `ip` in `tailscale status --json`.
    pub fn peer(&self, ip: IpAddr) -> Result<Value> {
        let status = self.status()?;
        let ip = ip.to_string();
        status["Peer"]
            .as_object()
            .and_then(|peers| {
                peers.values().find(|p| {
                    p["TailscaleIPs"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(&ip)))
                })
            })
            .cloned()
            .with_context(|| format!("{ip} is not a peer in tailscale status"))
    }

    /// Waits until the peer with mesh address `ip` is in this node's network map and
    /// online: a node that just joined reaches the others' maps a moment later.
    pub fn wait_peer(&self, ip: IpAddr, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            match self.peer(ip) {
                Ok(p) if p["Online"].as_bool() == Some(true) => return Ok(()),
                Ok(_) | Err(_) if start.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Ok(p) => bail!("peer {ip} is still offline after {timeout:?}: {p}"),
                Err(e) => return Err(e.context(format!("waited {timeout:?}"))),
            }
        }
    }

    /// The path to the peer with mesh address `ip`, from `tailscale status --json`.
    pub fn path_to(&self, ip: IpAddr) -> Result<PeerPath> {
        let peer = self.peer(ip)?;
        let cur = peer["CurAddr"].as_str().unwrap_or_default();
        Ok(if cur.is_empty() {
            PeerPath::Derp(peer["Relay"].as_str().unwrap_or_default().to_string())
        } else {
            PeerPath::Direct(cur.to_string())
        })
    }

    /// `tailscale ping` (a disco ping): returns its output when it got a pong.
    /// `until_direct` keeps pinging (up to 20 times) until the path is direct, as the CLI
    /// does by default; otherwise it sends 3 pings, whatever the path.
    pub fn ping(&self, ip: IpAddr, until_direct: bool) -> Result<String> {
        self.wait_peer(ip, Duration::from_secs(30))?;
        self.disco_ping(ip, until_direct)
    }

    /// [`Self::ping`] whether or not control lists the peer online: tailscaled pings a peer
    /// control calls offline all the same.
    pub fn disco_ping(&self, ip: IpAddr, until_direct: bool) -> Result<String> {
        let out = cmd::output(self.cli().args([
            "ping",
            "-c",
            if until_direct { "20" } else { "3" },
            "--timeout=3s",
            &format!("--until-direct={until_direct}"),
            &ip.to_string(),
        ]))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!(
                "tailscale ping {ip} failed ({}): {}",
                out.status,
                text.trim()
            );
        }
        Ok(text)
    }
}
