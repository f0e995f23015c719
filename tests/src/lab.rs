//! The lab itself: a switch namespace with a bridge, hosts attached to it, headscale on
//! the control-plane host, and knobs that break the network on purpose.

use crate::cmd;
use crate::headscale::Headscale;
use crate::netns::{self, Netns};
use crate::tailscale::Tailscaled;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

/// All lab namespaces and directories start with this.
pub const PREFIX: &str = "vdc-";
/// The id of the persistent lab that `cargo xtask lab up` builds.
pub const DEV_ID: &str = "vdc-dev";
/// The data-center underlay (TEST-NET-1).
pub const UNDERLAY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 0);
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
/// The management network behind a lab's LAN router (TEST-NET-2): the router is `.1`, its
/// hosts `.10` on.
pub const LAN: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 0);
pub const LAN_ROUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// A NATed host's address on its private segment (TEST-NET-3), and its gateway's.
pub const NAT_HOST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
pub const NAT_GATEWAY: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The control-plane host's name; it always exists and runs headscale.
pub const CTL: &str = "ctl";

/// What lab to build.
#[derive(Debug, Clone, Default)]
pub struct LabOptions {
    /// Hosts on the underlay besides `ctl`, e.g. `["fw", "op"]`.
    pub hosts: Vec<String>,
    /// Hosts behind a masquerading NAT gateway: host `h` sits on its own private segment
    /// behind gateway host `hgw`, which is on the underlay.
    pub behind_nat: Vec<String>,
    /// A fixed id whose lab outlives this process (`lab up`); `None` for a test's own lab.
    pub persistent_id: Option<String>,
    /// headscale's certificate and its CA have expired (clients must refuse them).
    pub expired_tls: bool,
    /// headscale's ACL policy (HuJSON), read from a file; `None`: no policy, all traffic
    /// allowed. [`Lab::set_policy`] changes it while the lab runs.
    pub policy: Option<String>,
    /// The headscale version (one of [`crate::tools::HEADSCALE_VERSIONS`]); `None`: the run's
    /// default ([`crate::tools::headscale_version`]).
    pub headscale: Option<&'static str>,
    /// The version of the stock tailscale clients the lab starts (one of
    /// [`crate::tools::TAILSCALE_VERSIONS`]); `None`: the run's default
    /// ([`crate::tools::tailscale_version`]).
    pub tailscale: Option<&'static str>,
    /// A management network: `(router, hosts)`. The router (one of `hosts`) gets a second
    /// interface `lan0` with [`LAN_ROUTER`]; each host here sits only on that network, with
    /// no route beyond it (a BMC behind a management server).
    pub lan: Option<(String, Vec<String>)>,
}

impl LabOptions {
    pub fn hosts(names: &[&str]) -> Self {
        Self {
            hosts: names.iter().map(|s| s.to_string()).collect(),
            ..Self::default()
        }
    }
}

/// One host of the lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    pub netns: String,
    pub addr: Ipv4Addr,
}

impl Host {
    pub fn ns(&self) -> Netns {
        Netns::existing(&self.netns)
    }
}

/// Network faults, applied in the switch: the hosts themselves stay untouched.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Knobs {
    /// Host pairs between which UDP is dropped (forces DERP).
    pub udp_blocked: Vec<(String, String)>,
    /// Hosts cut off from everything (an outage).
    pub cut_off: Vec<String>,
}

/// What is written to `lab.json`, so `lab status|exec|down` find a persistent lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub id: String,
    pub dir: PathBuf,
    pub switch: String,
    pub hosts: BTreeMap<String, Host>,
    pub knobs: Knobs,
    /// Hosts running a tailscaled started by the lab.
    pub tailscaled: Vec<String>,
    /// The headscale version the lab runs.
    #[serde(default)]
    pub headscale_version: String,
    /// The tailscale version of the clients the lab starts.
    #[serde(default)]
    pub tailscale_version: String,
}

fn tailscale_of(st: &LabState) -> &'static str {
    crate::tools::supported_tailscale(&st.tailscale_version)
        .unwrap_or(crate::tools::TAILSCALE.version)
}

/// A running virtual data center. Dropping it stops every process and deletes every
/// namespace, also when a test panics; a persistent lab stays until `Lab::down`.
pub struct Lab {
    state: Mutex<LabState>,
    headscale: Headscale,
    children: Mutex<Vec<(String, Child)>>,
    persistent: bool,
    /// Keep the lab directory (its logs) when the lab goes down.
    keep_logs: std::sync::atomic::AtomicBool,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Where lab directories live. Short, because unix socket paths are limited to 108 bytes.
pub fn base_dir() -> PathBuf {
    std::env::var_os("VDC_LAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/vdc"))
}

impl Lab {
    /// Builds the lab: switch, hosts, underlay addresses, and headscale on `ctl`.
    pub fn start(opts: LabOptions) -> Result<Lab> {
        gc_stale();
        let id = match &opts.persistent_id {
            Some(id) => {
                if netns::list()
                    .iter()
                    .any(|n| n.starts_with(&format!("{id}-")))
                {
                    bail!("lab {id} is already up; run `cargo xtask lab down` first");
                }
                id.clone()
            }
            None => format!(
                "{PREFIX}{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ),
        };
        let dir = base_dir().join(&id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let lan_hosts = opts.lan.iter().flat_map(|(_, h)| h);
        for h in opts.hosts.iter().chain(&opts.behind_nat).chain(lan_hosts) {
            validate_host_name(h)?;
        }
        if let Some((router, _)) = &opts.lan
            && !opts.hosts.contains(router)
        {
            bail!("the LAN router {router} is not one of the underlay hosts");
        }
        let mut underlay: Vec<String> = vec![CTL.to_string()];
        underlay.extend(opts.hosts.iter().cloned());
        underlay.extend(opts.behind_nat.iter().map(|h| format!("{h}gw")));
        let mut names: Vec<&String> = underlay
            .iter()
            .chain(&opts.behind_nat)
            .chain(opts.lan.iter().flat_map(|(_, h)| h))
            .collect();
        names.sort();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            bail!("host {} is named twice", w[0]);
        }
        let switch = format!("{id}-sw");
        let state = LabState {
            id: id.clone(),
            dir: dir.clone(),
            switch: switch.clone(),
            hosts: BTreeMap::new(),
            knobs: Knobs::default(),
            tailscaled: vec![],
            headscale_version: String::new(),
            tailscale_version: opts
                .tailscale
                .unwrap_or_else(crate::tools::tailscale_version)
                .to_string(),
        };
        // From here on a failure must still clean up: build into a guard.
        let mut guard = Teardown(Some(state));
        let sw = Netns::create(&switch)?;
        sw.ip(&["link", "add", "br0", "type", "bridge"])?;
        sw.ip(&["link", "set", "br0", "up"])?;
        let mut add = |name: &str, ns: &Netns, addr: Ipv4Addr| -> Result<()> {
            std::fs::create_dir_all(dir.join(name))?;
            guard.0.as_mut().unwrap().hosts.insert(
                name.to_string(),
                Host {
                    name: name.to_string(),
                    netns: ns.name().to_string(),
                    addr,
                },
            );
            Ok(())
        };
        for (i, name) in underlay.iter().enumerate() {
            let addr = host_addr(i);
            let ns = underlay_host(&sw, &format!("{id}-{name}"), name, addr)?;
            add(name, &ns, addr)?;
        }
        for name in &opts.behind_nat {
            let gw = Netns::existing(&format!("{id}-{name}gw"));
            let ns = Netns::create(&format!("{id}-{name}"))?;
            build_nat(&gw, &ns)?;
            add(name, &ns, NAT_HOST)?;
        }
        if let Some((router, hosts)) = &opts.lan {
            let r = Netns::existing(&format!("{id}-{router}"));
            for (i, name) in hosts.iter().enumerate() {
                let ns = Netns::create(&format!("{id}-{name}"))?;
                let addr = lan_addr(i);
                build_lan_host(&r, i, &ns, addr)?;
                add(name, &ns, addr)?;
            }
        }
        apply_knobs(&sw, &Knobs::default())?;
        let ctl = guard.0.as_ref().unwrap().hosts[CTL].clone();
        let version = opts
            .headscale
            .unwrap_or_else(crate::tools::headscale_version);
        let (headscale, hs_child) = Headscale::start(
            &ctl.ns(),
            ctl.addr,
            &dir.join(CTL),
            opts.expired_tls,
            opts.policy.as_deref(),
            version,
        )?;
        let mut state = guard.0.take().unwrap();
        state.headscale_version = version.to_string();
        let lab = Lab {
            state: Mutex::new(state),
            headscale,
            children: Mutex::new(vec![("headscale@ctl".into(), hs_child)]),
            persistent: opts.persistent_id.is_some(),
            keep_logs: false.into(),
        };
        lab.save()?;
        Ok(lab)
    }

    /// Reattaches to a persistent lab (`lab status`, `lab exec`, `lab down`).
    pub fn attach(id: &str) -> Result<Lab> {
        let path = base_dir().join(id).join("lab.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("no lab {id} is up (cannot read {})", path.display()))?;
        let state: LabState = serde_json::from_str(&text)?;
        let ctl = state.hosts[CTL].clone();
        let version = crate::tools::supported_headscale(&state.headscale_version)
            .unwrap_or(crate::tools::HEADSCALE.version);
        let headscale = Headscale::attach(ctl.ns(), ctl.addr, state.dir.join(CTL), version);
        Ok(Lab {
            state: Mutex::new(state),
            headscale,
            children: Mutex::new(vec![]),
            persistent: true,
            keep_logs: false.into(),
        })
    }

    fn save(&self) -> Result<()> {
        let state = self.state.lock().unwrap();
        std::fs::write(
            state.dir.join("lab.json"),
            serde_json::to_string_pretty(&*state)?,
        )?;
        Ok(())
    }

    pub fn id(&self) -> String {
        self.state.lock().unwrap().id.clone()
    }

    pub fn dir(&self) -> PathBuf {
        self.state.lock().unwrap().dir.clone()
    }

    pub fn state(&self) -> LabState {
        self.state.lock().unwrap().clone()
    }

    pub fn headscale(&self) -> &Headscale {
        &self.headscale
    }

    /// The host `name`; panics on a name the lab was not built with (a test bug).
    pub fn host(&self, name: &str) -> Host {
        self.state
            .lock()
            .unwrap()
            .hosts
            .get(name)
            .unwrap_or_else(|| panic!("the lab has no host {name}"))
            .clone()
    }

    /// The directory for files of host `name`.
    pub fn host_dir(&self, name: &str) -> PathBuf {
        self.dir().join(name)
    }

    /// Starts a process inside host `name`, with stdout and stderr in `<host dir>/<log>.log`;
    /// the lab stops it at teardown.
    pub fn spawn(&self, host: &str, log: &str, mut command: Command) -> Result<()> {
        let file = std::fs::File::create(self.host_dir(host).join(format!("{log}.log")))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start `{}`", cmd::render(&command)))?;
        self.push_child(format!("{log}@{host}"), child);
        Ok(())
    }

    fn push_child(&self, name: String, child: Child) {
        self.children.lock().unwrap().push((name, child));
    }

    fn take_child(&self, host: &str, log: &str) -> Result<Child> {
        let mut children = self.children.lock().unwrap();
        let i = children
            .iter()
            .position(|(n, _)| n == &format!("{log}@{host}"))
            .with_context(|| format!("no process {log} runs on {host}"))?;
        Ok(children.remove(i).1)
    }

    /// Stops the process started as `log` on `host` (SIGTERM, then SIGKILL) and reaps it.
    pub fn stop(&self, host: &str, log: &str) -> Result<()> {
        let mut child = self.take_child(host, log)?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..50 {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Stops headscale and starts it again on the same state, as an operator's restart or a
    /// crash would.
    pub fn restart_headscale(&self) -> Result<()> {
        self.stop_headscale()?;
        self.start_headscale()
    }

    pub fn stop_headscale(&self) -> Result<()> {
        self.stop(CTL, "headscale")
    }

    /// Upgrades headscale in place to `version` (one of
    /// [`crate::tools::HEADSCALE_VERSIONS`]): stopped, its config rewritten for the new
    /// version, started on the new binary with the same database, keys and certificate.
    pub fn upgrade_headscale(&mut self, version: &'static str) -> Result<()> {
        self.stop_headscale()?;
        self.headscale.set_version(version)?;
        self.state.lock().unwrap().headscale_version = version.to_string();
        self.save()?;
        self.start_headscale()
    }

    /// Starts headscale on the lab's state; returns once it answers.
    pub fn start_headscale(&self) -> Result<()> {
        self.start_headscale_within(crate::headscale::HEALTHY_WITHIN)
    }

    /// [`Self::start_headscale`], giving it `limit` to become healthy.
    pub fn start_headscale_within(&self, limit: std::time::Duration) -> Result<()> {
        let child = self.headscale.spawn_within(Some(limit))?;
        self.push_child(format!("headscale@{CTL}"), child);
        Ok(())
    }

    /// Replaces headscale's policy file and has headscale reload it (SIGHUP), as an operator
    /// would; the lab must have started with a policy.
    pub fn set_policy(&self, policy: &str) -> Result<()> {
        let path = self
            .headscale
            .policy_path()
            .context("the lab started without a policy: headscale reads no policy file")?;
        std::fs::write(&path, policy)?;
        self.signal(CTL, "headscale", nix::sys::signal::Signal::SIGHUP)
    }

    /// Sends `signal` to the process started as `log` on `host`, and to no other: a
    /// SIGSTOP of this lab's headscale leaves every other lab's alone.
    pub fn signal(&self, host: &str, log: &str, signal: nix::sys::signal::Signal) -> Result<()> {
        let children = self.children.lock().unwrap();
        let (_, child) = children
            .iter()
            .find(|(n, _)| n == &format!("{log}@{host}"))
            .with_context(|| format!("no process {log} runs on {host}"))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal)?;
        Ok(())
    }

    /// Kills the process started as `log` on `host` with SIGKILL, as a crash would.
    pub fn kill9(&self, host: &str, log: &str) -> Result<()> {
        let mut child = self.take_child(host, log)?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// A power cycle of underlay host `name`: every process in it dies at once, and its
    /// namespace (interfaces, routes, nftables, the TUN device) is destroyed and built again
    /// with the same address and switch port. Its directory, the disk, stays as it was.
    pub fn reboot(&self, name: &str) -> Result<()> {
        let host = self.host(name);
        let suffix = format!("@{name}");
        let dying: Vec<(String, Child)> = {
            let mut children = self.children.lock().unwrap();
            let (dying, kept) = std::mem::take(&mut *children)
                .into_iter()
                .partition(|(n, _)| n.ends_with(&suffix));
            *children = kept;
            dying
        };
        for (_, mut c) in dying {
            let _ = c.kill();
            let _ = c.wait();
        }
        let ns = host.ns();
        // The NIC's address survives a power cycle; a new one would leave the other hosts'
        // neighbour caches pointing nowhere for seconds, which no real reboot does.
        let mac = ns
            .ip(&["-br", "link", "show", "eth0"])
            .ok()
            .and_then(|l| l.split_whitespace().nth(2).map(str::to_string));
        for pid in ns.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let sw = Netns::existing(&self.state().switch);
        // The kernel frees a deleted namespace's links lazily; the switch port must be gone
        // before a new one takes its name.
        sw.ip(&["link", "del", name])?;
        ns.destroy();
        let rebuilt = underlay_host(&sw, &host.netns, name, host.addr)?;
        if let Some(mac) = mac {
            rebuilt.ip(&["link", "set", "eth0", "address", &mac])?;
        }
        // The knobs name the switch port, which is new: load them again.
        apply_knobs(&sw, &self.state().knobs)
    }

    /// The log of the process started as `log` on `host`.
    pub fn log(&self, host: &str, log: &str) -> String {
        std::fs::read_to_string(self.host_dir(host).join(format!("{log}.log"))).unwrap_or_default()
    }

    /// The last lines of the log of `log` on `host`.
    pub fn log_tail(&self, host: &str, log: &str) -> String {
        tail_str(&self.log(host, log), 30)
    }

    /// Waits until the log of `log` on `host` contains `text`.
    pub fn wait_log(
        &self,
        host: &str,
        log: &str,
        text: &str,
        timeout: std::time::Duration,
    ) -> Result<String> {
        let start = std::time::Instant::now();
        loop {
            let l = self.log(host, log);
            if l.contains(text) {
                return Ok(l);
            }
            if start.elapsed() > timeout {
                bail!(
                    "{log} on {host} did not log {text:?} within {timeout:?}:\n{}",
                    tail_str(&l, 30)
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// A stock tailscaled on host `name`, joined to headscale as a new user `user` with a
    /// pre-auth key of its own.
    pub fn join_tailscaled(&self, name: &str, user: &str) -> Result<Tailscaled> {
        self.join_tailscaled_with(name, user, &[])
    }

    /// [`Lab::join_tailscaled`] with more `tailscale up` flags.
    pub fn join_tailscaled_with(
        &self,
        name: &str,
        user: &str,
        extra: &[&str],
    ) -> Result<Tailscaled> {
        let hs = &self.headscale;
        let user = hs.create_user(user)?;
        let key = hs.create_preauth_key(&user, &crate::headscale::KeyOptions::default())?;
        let ts = self.start_tailscaled(name)?;
        ts.up_with(&hs.url(), &key.key, name, extra)?;
        Ok(ts)
    }

    /// Starts a stock tailscaled on host `name`.
    pub fn start_tailscaled(&self, name: &str) -> Result<Tailscaled> {
        let host = self.host(name);
        let started = Tailscaled::start(
            self.tailscale_version(),
            &host.ns(),
            &self.host_dir(name).join("tailscaled"),
            &self.headscale.ca_path(),
        )?;
        self.adopt_tailscaled(name, started)
    }

    /// Starts a stock tailscaled on host `name` from the files Ignition wrote into `root`,
    /// as the firewall would boot: see [`Tailscaled::start_from_root`].
    pub fn start_tailscaled_from_root(
        &self,
        name: &str,
        root: &Path,
        config: &str,
        ca: &str,
    ) -> Result<Tailscaled> {
        let started = Tailscaled::start_from_root(
            self.tailscale_version(),
            &self.host(name).ns(),
            &self.host_dir(name).join("tailscaled"),
            root,
            config,
            ca,
        )?;
        self.adopt_tailscaled(name, started)
    }

    fn adopt_tailscaled(&self, name: &str, (ts, child): (Tailscaled, Child)) -> Result<Tailscaled> {
        self.push_child(format!("tailscaled@{name}"), child);
        {
            let mut st = self.state.lock().unwrap();
            if !st.tailscaled.iter().any(|h| h == name) {
                st.tailscaled.push(name.into());
            }
        }
        self.save()?;
        Ok(ts)
    }

    /// The tailscaled the lab started on `name` (for a reattached lab).
    pub fn tailscaled(&self, name: &str) -> Option<Tailscaled> {
        let st = self.state.lock().unwrap();
        st.tailscaled.iter().any(|h| h == name).then(|| {
            Tailscaled::attach(
                tailscale_of(&st),
                st.hosts[name].ns(),
                st.dir.join(name).join("tailscaled"),
            )
        })
    }

    /// The tailscale version of the clients this lab starts.
    pub fn tailscale_version(&self) -> &'static str {
        tailscale_of(&self.state.lock().unwrap())
    }

    fn set_knobs(&self, f: impl FnOnce(&mut Knobs)) -> Result<()> {
        let (switch, knobs) = {
            let mut st = self.state.lock().unwrap();
            f(&mut st.knobs);
            for h in st
                .knobs
                .cut_off
                .iter()
                .chain(st.knobs.udp_blocked.iter().flat_map(|(a, b)| [a, b]))
            {
                if !st.hosts.contains_key(h) {
                    bail!("the lab has no host {h}");
                }
            }
            (Netns::existing(&st.switch), st.knobs.clone())
        };
        apply_knobs(&switch, &knobs)?;
        self.save()
    }

    /// Drops all UDP between hosts `a` and `b`, as a firewall in the path would.
    pub fn block_udp(&self, a: &str, b: &str) -> Result<()> {
        let pair = ordered(a, b);
        self.set_knobs(|k| {
            if !k.udp_blocked.contains(&pair) {
                k.udp_blocked.push(pair)
            }
        })
    }

    pub fn unblock_udp(&self, a: &str, b: &str) -> Result<()> {
        let pair = ordered(a, b);
        self.set_knobs(|k| k.udp_blocked.retain(|p| *p != pair))
    }

    /// Cuts host `name` off the network entirely (its link stays up; packets vanish).
    pub fn cut_off(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.set_knobs(|k| {
            if !k.cut_off.contains(&name) {
                k.cut_off.push(name)
            }
        })
    }

    pub fn reconnect(&self, name: &str) -> Result<()> {
        self.set_knobs(|k| k.cut_off.retain(|h| h != name))
    }

    /// Proves that host `name` cannot send anywhere outside the lab: no default route and no
    /// route to addresses in the public and private ranges. Only route lookups: nothing is
    /// sent.
    pub fn assert_isolated(&self, name: &str) -> Result<()> {
        let ns = self.host(name).ns();
        for family in ["-4", "-6"] {
            let routes = ns.ip(&[family, "route", "show", "default"])?;
            if !routes.trim().is_empty() {
                bail!("host {name} has a default route ({family}): {routes}");
            }
        }
        for outside in OUTSIDE_PROBES {
            let out =
                cmd::output(Command::new("ip").args(["-n", ns.name(), "route", "get", outside]))?;
            if out.status.success() {
                bail!(
                    "host {name} has a route to {outside}, outside the lab: {}",
                    String::from_utf8_lossy(&out.stdout).trim()
                );
            }
        }
        Ok(())
    }

    /// Stops everything and deletes the namespaces and the lab directory.
    pub fn down(self) {
        let st = self.state.lock().unwrap().clone();
        teardown(&st.id, &st.dir, false);
        std::mem::forget(self);
    }

    /// Keeps the lab directory, and so its logs, once the lab is down: for a benchmark
    /// that records a failure and goes on.
    pub fn keep_logs(&self) {
        self.keep_logs
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Prints the tail of every log in the lab directory (for a failed test).
    pub fn dump_logs(&self) {
        let dir = self.dir();
        let mut logs = vec![];
        collect_logs(&dir, &mut logs);
        for log in logs {
            eprintln!("--- {} ---\n{}", log.display(), tail(&log, 40));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.persistent {
            return;
        }
        let failed = std::thread::panicking();
        if failed {
            self.dump_logs();
        }
        let st = self.state.lock().unwrap().clone();
        for (_, child) in self.children.lock().unwrap().iter_mut() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let keep = failed || self.keep_logs.load(std::sync::atomic::Ordering::Relaxed);
        teardown(&st.id, &st.dir, keep);
        for (_, child) in self.children.lock().unwrap().iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Cleans up a lab whose `start` failed half-way.
struct Teardown(Option<LabState>);

impl Drop for Teardown {
    fn drop(&mut self) {
        if let Some(st) = &self.0 {
            teardown(&st.id, &st.dir, true);
        }
    }
}

/// Addresses a host of the lab must have no route to. Looked up, never contacted.
pub const OUTSIDE_PROBES: &[&str] = &[
    "9.9.9.9",
    "10.0.0.1",
    "172.16.0.1",
    "192.168.0.1",
    "198.18.0.1",
    "2001:4860::1",
    "fd00::1",
];

fn ordered(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.into(), b.into())
    } else {
        (b.into(), a.into())
    }
}

fn validate_host_name(name: &str) -> Result<()> {
    // The name is also the switch port's interface name: at most 15 bytes.
    let ok = !name.is_empty()
        && name.len() <= 12
        && name != "sw"
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !ok {
        bail!("host name {name:?} must be 1-12 lowercase letters or digits, and not \"sw\"");
    }
    Ok(())
}

/// The underlay address of the i-th host: ctl is .1, the others .11, .12, ...
pub fn host_addr(i: usize) -> Ipv4Addr {
    let o = UNDERLAY.octets();
    let last = if i == 0 { 1 } else { 10 + i as u8 };
    Ipv4Addr::new(o[0], o[1], o[2], last)
}

/// Namespace `netns`, plugged into the switch's bridge as port `port` with underlay address
/// `addr` on its `eth0`.
fn underlay_host(sw: &Netns, netns: &str, port: &str, addr: Ipv4Addr) -> Result<Netns> {
    let ns = Netns::create(netns)?;
    veth(&ns, "eth0", sw, port)?;
    sw.ip(&["link", "set", port, "master", "br0", "up"])?;
    ns.ip(&[
        "addr",
        "add",
        &format!("{addr}/{UNDERLAY_PREFIX_LEN}"),
        "dev",
        "eth0",
    ])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    Ok(ns)
}

/// A veth pair: `a_name` in namespace `a`, `b_name` in namespace `b`. Created directly in
/// the namespaces, so parallel labs never clash on interface names.
fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) -> Result<()> {
    cmd::run_quiet(Command::new("ip").args([
        "link",
        "add",
        a_name,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_name,
        "netns",
        b.name(),
    ]))
    .map(drop)
}

/// Puts `host` on a private segment behind `gw`, which masquerades it onto the underlay.
/// The host gets a route to the underlay only: like every lab host, no default route.
/// The address of the `i`th host on the management network.
pub fn lan_addr(i: usize) -> Ipv4Addr {
    let o = LAN.octets();
    Ipv4Addr::new(o[0], o[1], o[2], 10 + i as u8)
}

/// Puts `host` on `router`'s management network: a bridge `lan0` in the router holding
/// [`LAN_ROUTER`], one veth per host. The host gets only its /24.
fn build_lan_host(router: &Netns, i: usize, host: &Netns, addr: Ipv4Addr) -> Result<()> {
    if i == 0 {
        router.ip(&["link", "add", "lan0", "type", "bridge"])?;
        router.ip(&["addr", "add", &format!("{LAN_ROUTER}/24"), "dev", "lan0"])?;
        router.ip(&["link", "set", "lan0", "up"])?;
    }
    let port = format!("lan{}", i + 1);
    veth(host, "eth0", router, &port)?;
    router.ip(&["link", "set", &port, "master", "lan0", "up"])?;
    host.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
    host.ip(&["link", "set", "eth0", "up"]).map(drop)
}

fn build_nat(gw: &Netns, host: &Netns) -> Result<()> {
    veth(host, "eth0", gw, "lan0")?;
    gw.ip(&["addr", "add", &format!("{NAT_GATEWAY}/24"), "dev", "lan0"])?;
    gw.ip(&["link", "set", "lan0", "up"])?;
    host.ip(&["addr", "add", &format!("{NAT_HOST}/24"), "dev", "eth0"])?;
    host.ip(&["link", "set", "eth0", "up"])?;
    let underlay = format!("{UNDERLAY}/{UNDERLAY_PREFIX_LEN}");
    host.ip(&["route", "add", &underlay, "via", &NAT_GATEWAY.to_string()])?;
    cmd::run_quiet(gw.command("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]))?;
    nft(
        gw,
        "table ip vdcnat {\n  chain post {\n    type nat hook postrouting priority srcnat; policy accept;\n    oifname \"eth0\" masquerade\n  }\n}\n",
    )
}

/// The switch's nftables ruleset for `knobs`: one `bridge` table, replaced atomically.
pub fn knob_ruleset(knobs: &Knobs) -> String {
    let mut rules = String::new();
    for (a, b) in &knobs.udp_blocked {
        for (i, o) in [(a, b), (b, a)] {
            rules.push_str(&format!(
                "    iifname \"{i}\" oifname \"{o}\" meta l4proto udp counter drop\n"
            ));
        }
    }
    for h in &knobs.cut_off {
        rules.push_str(&format!("    iifname \"{h}\" counter drop\n"));
        rules.push_str(&format!("    oifname \"{h}\" counter drop\n"));
    }
    format!(
        "table bridge vdc {{}}\ndelete table bridge vdc\ntable bridge vdc {{\n  chain forward {{\n    type filter hook forward priority 0; policy accept;\n{rules}  }}\n}}\n"
    )
}

fn apply_knobs(switch: &Netns, knobs: &Knobs) -> Result<()> {
    nft(switch, &knob_ruleset(knobs))
}

/// Loads `ruleset` with `nft -f -` inside `ns`, as one transaction.
fn nft(ns: &Netns, ruleset: &str) -> Result<()> {
    use std::io::Write;
    let mut child = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run nft in {}", ns.name()))?;
    child.stdin.take().unwrap().write_all(ruleset.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft in {} rejected the ruleset: {}\n{ruleset}",
            ns.name(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Deletes every namespace of lab `id` (stopping what runs in them) and its directory;
/// `keep_dir` keeps the logs of a failed run.
pub fn teardown(id: &str, dir: &Path, keep_dir: bool) {
    let prefix = format!("{id}-");
    for name in netns::list().into_iter().filter(|n| n.starts_with(&prefix)) {
        Netns::existing(&name).destroy();
    }
    if keep_dir {
        eprintln!(
            "vdc: lab {id} torn down; its logs stay in {}",
            dir.display()
        );
    } else {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The pid that owns a test lab id `vdc-<pid>-<seq>`, if it is one.
fn owner_pid(id: &str) -> Option<i32> {
    let rest = id.strip_prefix(PREFIX)?;
    let (pid, seq) = rest.split_once('-')?;
    seq.parse::<u32>().ok()?;
    pid.parse().ok()
}

/// Ids of all labs that have namespaces on this machine.
pub fn lab_ids() -> Vec<String> {
    let mut ids: Vec<String> = netns::list()
        .into_iter()
        .filter(|n| n.starts_with(PREFIX))
        .filter_map(|n| n.rsplit_once('-').map(|(id, _)| id.to_string()))
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Removes labs left behind by test processes that no longer run (killed runs).
pub fn gc_stale() -> Vec<String> {
    let mut removed = vec![];
    let dirs = std::fs::read_dir(base_dir())
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let mut ids = lab_ids();
    ids.extend(dirs);
    ids.sort();
    ids.dedup();
    for id in ids {
        if let Some(pid) = owner_pid(&id)
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            teardown(&id, &base_dir().join(&id), false);
            removed.push(id);
        }
    }
    removed
}

/// The last `n` lines of a file, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    tail_str(&std::fs::read_to_string(path).unwrap_or_default(), n)
}

fn tail_str(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn collect_logs(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_logs(&p, out);
        } else if p.extension().is_some_and(|x| x == "log") {
            out.push(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_in_test_net_1() {
        assert_eq!(host_addr(0), Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(host_addr(2), Ipv4Addr::new(192, 0, 2, 12));
    }

    #[test]
    fn headscale_reads_a_policy_file_only_when_the_lab_has_one() {
        let (addr, dir) = (host_addr(0), Path::new("/tmp/vdc/x/ctl"));
        let none = crate::headscale::config_yaml(addr, dir, None, "v0.28.0");
        assert!(
            none.contains("policy:\n  mode: file\n  path: \"\"\n"),
            "{none}"
        );
        let some =
            crate::headscale::config_yaml(addr, dir, Some(&dir.join("policy.hujson")), "v0.29.2");
        assert!(!some.contains("randomize_client_port"), "{some}");
        assert!(
            !some.contains("ephemeral_node_inactivity_timeout"),
            "{some}"
        );
        assert!(none.contains("randomize_client_port: false\n"), "{none}");
        assert!(
            some.contains("  path: \"/tmp/vdc/x/ctl/policy.hujson\"\n"),
            "{some}"
        );
    }

    #[test]
    fn empty_knobs_accept_everything() {
        let r = knob_ruleset(&Knobs::default());
        assert!(r.contains("policy accept;"));
        assert!(!r.contains("drop"));
    }

    #[test]
    fn blocked_udp_drops_both_directions() {
        let k = Knobs {
            udp_blocked: vec![("fw".into(), "op".into())],
            cut_off: vec!["ctl".into()],
        };
        let r = knob_ruleset(&k);
        assert!(r.contains("iifname \"fw\" oifname \"op\" meta l4proto udp counter drop"));
        assert!(r.contains("iifname \"op\" oifname \"fw\" meta l4proto udp counter drop"));
        assert!(r.contains("iifname \"ctl\" counter drop"));
        assert!(r.contains("oifname \"ctl\" counter drop"));
    }

    #[test]
    fn owner_pid_only_for_test_labs() {
        assert_eq!(owner_pid("vdc-1234-0"), Some(1234));
        assert_eq!(owner_pid("vdc-dev"), None);
        assert_eq!(owner_pid("vdc-abc-1"), None);
    }

    #[test]
    fn host_names_fit_interface_names() {
        assert!(validate_host_name("fw2").is_ok());
        assert!(validate_host_name("sw").is_err());
        assert!(validate_host_name("Firewall").is_err());
        assert!(validate_host_name("averyverylonghost").is_err());
    }
}
