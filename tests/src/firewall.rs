//! Provisioning a lab host as a metal-stack firewall: userdata from `userdata-gen` against the
//! lab's headscale, written by the real flatcar Ignition into the host's root, and the
//! `vpn-agent` started from exactly those files, as its unit would start it.

use crate::Lab;
use crate::cmd;
use crate::tools;
use anyhow::{Context, Result, bail};
use std::path::PathBuf;

/// What `provision` made.
pub struct Provisioned {
    /// The firewall's root directory as Ignition wrote it.
    pub root: PathBuf,
    /// userdata-gen's metadata.
    pub meta: serde_json::Value,
}

/// Runs `userdata-gen generate` in `ctl` for `machine` of `project` (`extra` adds flags),
/// then flatcar Ignition into `<host dir>/root`.
pub fn provision(
    lab: &Lab,
    host: &str,
    machine: &str,
    project: &str,
    extra: &[&str],
) -> Result<Provisioned> {
    let hs = lab.headscale();
    let dir = lab.host_dir(host);
    let api_key = dir.join("api.key");
    crate::headscale::write_private(&api_key, hs.create_api_key()?.as_bytes())?;
    let out = dir.join("userdata.ign");
    let meta = dir.join("meta.json");
    cmd::run_quiet(
        lab.host("ctl")
            .ns()
            .command(tools::project_bin("userdata-gen"))
            .args(["generate", "--machine-id", machine, "--project", project])
            .args(["--login-server", &hs.url()])
            .arg("--headscale-api-key-file")
            .arg(&api_key)
            .arg("--ca-file")
            .arg(hs.ca_path())
            .arg("--output")
            .arg(&out)
            .arg("--metadata-out")
            .arg(&meta)
            .args(extra),
    )?;
    let root = dir.join("root");
    let config = std::fs::read_to_string(&out)?;
    crate::ignition::apply_flatcar(&config, &root, &dir.join("ignition"))?;
    Ok(Provisioned {
        root,
        meta: serde_json::from_str(&std::fs::read_to_string(meta)?)?,
    })
}

/// The log name of the agent on a host.
pub const AGENT_LOG: &str = "vpn-agent";

/// Waits until the agent on `host` has replaced its first map stream once (30 to 60 s after
/// its start, RECONNECT_SETTLE): from then on it asks headscale nothing without a reason.
pub fn wait_settled(lab: &Lab, host: &str) -> Result<()> {
    let line = "map stream replaced once after the reconnect";
    lab.wait_log(host, AGENT_LOG, line, std::time::Duration::from_secs(90))
        .map(drop)
}

/// The `vpn-agent run` command for `host` from `root` (its `/etc`), with its state in
/// `<root>/var/lib/vpn-agent`, the unit's paths.
pub fn agent_command(
    lab: &Lab,
    host: &str,
    root: &std::path::Path,
) -> Result<std::process::Command> {
    agent_command_with(lab, host, root, &agent_bin(root))
}

/// The `vpn-agent` the units run on a firewall with `root`: the one Ignition or cloud-init
/// put at `/usr/local/bin/vpn-agent` (a pinned release fetched at first boot), else the
/// image's, for which our build stands in.
pub fn agent_bin(root: &std::path::Path) -> PathBuf {
    let fetched = root.join(vpn_contract::AGENT_BINARY_PATH.trim_start_matches('/'));
    if fetched.exists() {
        fetched
    } else {
        tools::project_bin("vpn-agent")
    }
}

/// Like [`agent_command`], running the `vpn-agent` binary at `bin` (the data-plane benchmark
/// runs a release build; the tests the debug one).
pub fn agent_command_with(
    lab: &Lab,
    host: &str,
    root: &std::path::Path,
    bin: &std::path::Path,
) -> Result<std::process::Command> {
    let state = root.join("var/lib/vpn-agent");
    std::fs::create_dir_all(&state)?;
    let mut c = lab.host(host).ns().command_in_root(root, bin);
    c.args([
        "run",
        "--config",
        "/etc/vpn-agent/tailscaled.conf",
        "--settings",
        "/etc/vpn-agent/agent.json",
    ])
    .arg("--state-dir")
    .arg(&state)
    .arg("--socket")
    .arg(agent_socket(lab, host))
    .env("NO_COLOR", "1")
    // VDC_AGENT_LOG raises the agents' log level for a run that needs it (`debug`).
    .env(
        "VPN_AGENT_LOG",
        std::env::var("VDC_AGENT_LOG").unwrap_or_else(|_| "info".into()),
    );
    Ok(c)
}

/// Starts the agent on `host` from `root`, as its unit would.
pub fn start_agent(lab: &Lab, host: &str, root: &std::path::Path) -> Result<()> {
    lab.spawn(host, AGENT_LOG, agent_command(lab, host, root)?)
}

/// Waits until headscale lists `machine` (the agent on `host`) online; returns its node.
pub fn wait_online(lab: &Lab, host: &str, machine: &str) -> Result<crate::headscale::Node> {
    let nodes = lab
        .headscale()
        .wait_nodes(
            &format!("{machine} online"),
            std::time::Duration::from_secs(60),
            |n| n.iter().any(|n| n.name == machine && n.online),
        )
        .with_context(|| format!("agent log:\n{}", lab.log_tail(host, AGENT_LOG)))?;
    let matching: Vec<_> = nodes.into_iter().filter(|n| n.name == machine).collect();
    if matching.len() != 1 {
        bail!(
            "headscale lists {} nodes named {machine}: {matching:?}",
            matching.len()
        );
    }
    Ok(matching.into_iter().next().unwrap())
}

/// The agent's status socket on `host` (per lab: `/run` is shared by all namespaces).
pub fn agent_socket(lab: &Lab, host: &str) -> PathBuf {
    lab.host_dir(host).join("vpn-agent.sock")
}

/// `vpn-agent status --json` on `host`.
pub fn agent_status(lab: &Lab, host: &str) -> Result<serde_json::Value> {
    let out = cmd::run_quiet(status_command(lab, host).arg("--json"))?;
    Ok(serde_json::from_str(&out)?)
}

/// `vpn-agent status` aimed at the agent on `host`.
pub fn status_command(lab: &Lab, host: &str) -> std::process::Command {
    let mut c = std::process::Command::new(tools::project_bin("vpn-agent"));
    c.args(["status", "--socket"]).arg(agent_socket(lab, host));
    c
}

/// An operator joins: a user `ops` and its key in headscale, a stock tailscaled on host
/// `op`, up; returns once the agent on `fw` lists the operator online, with its address.
pub fn join_operator(
    lab: &Lab,
    op: &str,
    fw: &str,
) -> Result<(crate::tailscale::Tailscaled, std::net::IpAddr)> {
    let ts = lab.join_tailscaled(op, "ops")?;
    let ip = ts.ipv4()?;
    wait_status(lab, fw, "the operator", |s| {
        lists_online_peer(s, &format!("{ip}/32"))
    })?;
    Ok((ts, ip))
}

/// Waits until the agent's status on `host` satisfies `pred`.
pub fn wait_status(
    lab: &Lab,
    host: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    wait_status_for(lab, host, what, std::time::Duration::from_secs(30), pred)
}

/// The last `field=N` of a "map stream open" line in the agent's log.
pub fn map_open_field(log: &str, field: &str) -> Option<u64> {
    let key = format!(" {field}=");
    log.lines()
        .rev()
        .filter(|l| l.contains("map stream open"))
        .find_map(|l| {
            let v = l.split(&key).nth(1)?;
            v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
        })
}

/// [`wait_status`] up to `limit`.
pub fn wait_status_for(
    lab: &Lab,
    host: &str,
    what: &str,
    limit: std::time::Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let start = std::time::Instant::now();
    loop {
        let s = agent_status(lab, host);
        if let Ok(s) = &s
            && pred(s)
        {
            return Ok(s.clone());
        }
        if start.elapsed() > limit {
            bail!(
                "agent status on {host}: {what} not seen within {limit:?}; status now: {s:?}\nlog:\n{}",
                lab.log_tail(host, AGENT_LOG)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Gives `host` an interface named `tailscale0` that leads to a namespace of its own (returned,
/// with the address to reach `host` through it): a stand-in for the mesh tunnel, so the
/// nftables rules can be tested on real packets before the data plane exists.
pub fn fake_tunnel(lab: &Lab, host: &str) -> Result<(crate::netns::Netns, std::net::Ipv4Addr)> {
    let h = lab.host(host).ns();
    let mesh = crate::netns::Netns::create(&format!("{}-{host}mesh", lab.id()))?;
    cmd::run_quiet(std::process::Command::new("ip").args([
        "link",
        "add",
        "tailscale0",
        "netns",
        h.name(),
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        mesh.name(),
    ]))?;
    h.ip(&["addr", "add", "100.64.99.1/30", "dev", "tailscale0"])?;
    h.ip(&["link", "set", "tailscale0", "up"])?;
    mesh.ip(&["addr", "add", "100.64.99.2/30", "dev", "eth0"])?;
    mesh.ip(&["link", "set", "eth0", "up"])?;
    Ok((mesh, std::net::Ipv4Addr::new(100, 64, 99, 1)))
}

/// Starts the real OpenSSH server on `host`, port 22, with a host key of its own; returns the
/// path of its `authorized_keys` file.
pub fn start_sshd(lab: &Lab, host: &str) -> Result<PathBuf> {
    let dir = lab.host_dir(host).join("sshd");
    std::fs::create_dir_all(&dir)?;
    let key = dir.join("host_ed25519");
    if !key.exists() {
        cmd::run_quiet(
            std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&key),
        )?;
    }
    let auth = dir.join("authorized_keys");
    std::fs::write(&auth, "")?;
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port 22\nListenAddress 0.0.0.0\nHostKey {}\nPidFile {}\nAuthorizedKeysFile {}\n\
             UsePAM no\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\n",
            key.display(),
            dir.join("sshd.pid").display(),
            auth.display()
        ),
    )?;
    // sshd insists on its privilege separation directory.
    std::fs::create_dir_all("/run/sshd")?;
    let mut c = lab.host(host).ns().command("/usr/sbin/sshd");
    c.args(["-D", "-e", "-f"]).arg(&config);
    lab.spawn(host, "sshd", c)?;
    Ok(auth)
}

/// Like [`banner`], retried for up to five seconds: for a server that is still starting.
pub fn wait_banner(ns: &crate::netns::Netns, addr: std::net::SocketAddr) -> Result<String> {
    wait_banner_for(ns, addr, std::time::Duration::from_secs(5))
}

/// [`wait_banner`] up to `limit`.
pub fn wait_banner_for(
    ns: &crate::netns::Netns,
    addr: std::net::SocketAddr,
    limit: std::time::Duration,
) -> Result<String> {
    let start = std::time::Instant::now();
    loop {
        match banner(ns, addr, std::time::Duration::from_secs(1)) {
            Ok(b) => return Ok(b),
            Err(e) if start.elapsed() > limit => {
                return Err(e.context(format!("nothing answered on {addr} within {limit:?}")));
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
}

/// Connects from namespace `ns` to `addr` and returns the first line the server sends (an
/// SSH banner); an error when nothing answers within `timeout`.
pub fn banner(
    ns: &crate::netns::Netns,
    addr: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> Result<String> {
    ns.enter(move || {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or_default()
            .to_string())
    })
}

/// Whether an agent status lists an online peer with mesh address `ip` (`100.64.x.y/32`).
pub fn lists_online_peer(status: &serde_json::Value, ip: &str) -> bool {
    status["peers"].as_array().is_some_and(|p| {
        p.iter().any(|p| {
            p["online"] == true
                && p["addresses"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|a| a.as_str() == Some(ip)))
        })
    })
}

/// Runs `command` over SSH (the real OpenSSH client, key authentication) from `from` to
/// `to`, where `start_sshd` runs with `authorized_keys`; returns its output.
pub fn ssh(
    lab: &Lab,
    from: &str,
    to: std::net::IpAddr,
    authorized_keys: &std::path::Path,
    command: &str,
) -> Result<String> {
    let dir = lab.host_dir(from).join("ssh");
    std::fs::create_dir_all(&dir)?;
    let key = dir.join("id_ed25519");
    if !key.exists() {
        cmd::run_quiet(
            std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "operator@lab", "-f"])
                .arg(&key),
        )?;
    }
    let public = std::fs::read_to_string(dir.join("id_ed25519.pub"))?;
    let mut existing = std::fs::read_to_string(authorized_keys).unwrap_or_default();
    if !existing.contains(public.trim()) {
        existing.push_str(&public);
        std::fs::write(authorized_keys, existing)?;
    }
    cmd::run(
        lab.host(from)
            .ns()
            .command("ssh")
            .arg("-i")
            .arg(&key)
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=5",
                "-o",
                "LogLevel=ERROR",
            ])
            .arg(format!("root@{to}"))
            .arg(command),
    )
}

/// The command lines of `key` (`ExecStart`, `ExecReload`, …) in the unit file or drop-in at
/// `path` inside the firewall's `root`, as Ignition wrote it.
pub fn unit_lines(root: &std::path::Path, path: &str, key: &str) -> Result<Vec<String>> {
    let file = root.join(path.trim_start_matches('/'));
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("{} (written by Ignition?)", file.display()))?;
    let prefix = format!("{key}=");
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// Runs a unit's command line on `host` as systemd would on the firewall: inside `root`'s
/// `/etc`, with our build standing in for `/usr/local/bin/vpn-agent`.
pub fn run_unit_line(lab: &Lab, host: &str, root: &std::path::Path, line: &str) -> Result<String> {
    let argv: Vec<String> = line.split_whitespace().map(String::from).collect();
    run_in_root(lab, host, root, &argv)
}

/// Runs `argv` on `host` inside `root`'s `/etc` (see [`run_unit_line`]).
pub fn run_in_root(
    lab: &Lab,
    host: &str,
    root: &std::path::Path,
    argv: &[String],
) -> Result<String> {
    let Some((program, args)) = argv.split_first() else {
        bail!("an empty command line");
    };
    let program = match program.as_str() {
        vpn_contract::AGENT_BINARY_PATH => agent_bin(root),
        p => PathBuf::from(p),
    };
    cmd::run_quiet(
        lab.host(host)
            .ns()
            .command_in_root(root, program)
            .args(args),
    )
}

/// What `vpn-agent-firewall.service` does first at boot: the table, before anything else.
pub fn run_early_unit(lab: &Lab, host: &str, root: &std::path::Path) -> Result<()> {
    let early = "/etc/systemd/system/vpn-agent-firewall.service";
    for line in unit_lines(root, early, "ExecStart")? {
        run_unit_line(lab, host, root, &line)?;
    }
    Ok(())
}

/// How long until `addr` accepts a TCP connection from `ns`, trying every 100 ms up to
/// `limit`; `None` if it never does.
pub fn time_to_connect(
    ns: &crate::netns::Netns,
    addr: std::net::SocketAddr,
    limit: std::time::Duration,
) -> Option<std::time::Duration> {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        let left = limit
            .saturating_sub(start.elapsed())
            .min(std::time::Duration::from_secs(1));
        let ok = ns
            .enter(move || Ok(std::net::TcpStream::connect_timeout(&addr, left).is_ok()))
            .expect("enter the lab namespace");
        if ok {
            return Some(start.elapsed());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    None
}

/// A firewall on `host` as it runs after boot: provisioned through userdata-gen and
/// Ignition (`extra` adds generator flags), its agent started and online in headscale.
/// Returns what Ignition wrote and the firewall's mesh IPv4 address.
pub fn start_firewall(
    lab: &Lab,
    host: &str,
    machine: &str,
    project: &str,
    extra: &[&str],
) -> Result<(Provisioned, std::net::IpAddr)> {
    start_firewall_with(
        lab,
        host,
        machine,
        project,
        extra,
        &tools::project_bin("vpn-agent"),
    )
}

/// Like [`start_firewall`], running the `vpn-agent` binary at `bin` (the benchmarks run a
/// release build).
pub fn start_firewall_with(
    lab: &Lab,
    host: &str,
    machine: &str,
    project: &str,
    extra: &[&str],
    bin: &std::path::Path,
) -> Result<(Provisioned, std::net::IpAddr)> {
    let fw = provision(lab, host, machine, project, extra)?;
    let node = spawn_agent(lab, host, machine, &fw, bin, &[])?;
    Ok((fw, mesh_ipv4(&node)?))
}

/// Like [`start_firewall`] (`extra` goes to `userdata-gen`), with `agent_args` added to
/// `vpn-agent run`; returns the firewall's node as headscale lists it.
pub fn start_firewall_args(
    lab: &Lab,
    host: &str,
    machine: &str,
    project: &str,
    extra: &[&str],
    agent_args: &[&str],
) -> Result<(Provisioned, crate::headscale::Node)> {
    let fw = provision(lab, host, machine, project, extra)?;
    let bin = tools::project_bin("vpn-agent");
    let node = spawn_agent(lab, host, machine, &fw, &bin, agent_args)?;
    Ok((fw, node))
}

fn spawn_agent(
    lab: &Lab,
    host: &str,
    machine: &str,
    fw: &Provisioned,
    bin: &std::path::Path,
    args: &[&str],
) -> Result<crate::headscale::Node> {
    let mut agent = agent_command_with(lab, host, &fw.root, bin)?;
    agent.args(args);
    lab.spawn(host, AGENT_LOG, agent)?;
    wait_online(lab, host, machine)
}

/// A node's IPv4 mesh address.
pub fn mesh_ipv4(node: &crate::headscale::Node) -> Result<std::net::IpAddr> {
    let ip = node
        .addresses
        .iter()
        .find_map(|a| a.parse::<std::net::Ipv4Addr>().ok())
        .with_context(|| format!("{} has no IPv4 mesh address: {node:?}", node.name))?;
    Ok(ip.into())
}

/// `python3 -m http.server` on `host`, port `port`, bound to `ip` (`0.0.0.0`: all).
pub fn serve_http(lab: &Lab, host: &str, ip: std::net::IpAddr, port: u16) -> Result<()> {
    let mut c = lab.host(host).ns().command("python3");
    c.args([
        "-m",
        "http.server",
        &port.to_string(),
        "--bind",
        &ip.to_string(),
    ])
    .current_dir(lab.host_dir(host));
    lab.spawn(host, &format!("http-{port}"), c)
}

/// Whether a TCP connection from `ns` to `addr` is set up within three seconds. Panics if
/// the namespace cannot be entered: "no connection" must mean the network said no.
pub fn connects(ns: &crate::netns::Netns, addr: std::net::SocketAddr) -> bool {
    ns.enter(move || {
        Ok(std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3)).is_ok())
    })
    .expect("enter the lab namespace")
}

/// Waits up to `timeout` for `addr` to accept a connection from `ns` (a server still
/// starting, a path still being set up).
pub fn wait_connects(
    ns: &crate::netns::Netns,
    addr: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> Result<()> {
    match time_to_connect(ns, addr, timeout) {
        Some(_) => Ok(()),
        None => bail!(
            "{addr} does not answer from {} within {timeout:?}",
            ns.name()
        ),
    }
}

/// systemd's side of its notify protocol for an agent on a lab host: the datagrams the agent
/// sends to `NOTIFY_SOCKET` (`READY=1`, `STATUS=…`, `WATCHDOG=1`), kept in order.
pub struct Notify {
    sock: std::os::unix::net::UnixDatagram,
    /// What `NOTIFY_SOCKET` must name.
    pub path: PathBuf,
    seen: std::cell::RefCell<Vec<String>>,
}

impl Notify {
    pub fn bind(lab: &Lab, host: &str) -> Notify {
        let path = lab.host_dir(host).join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let sock = std::os::unix::net::UnixDatagram::bind(&path).expect("bind the notify socket");
        sock.set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .expect("a read timeout");
        Notify {
            sock,
            path,
            seen: Default::default(),
        }
    }

    /// The next message not yet returned or seen, within `limit`.
    pub fn next(&self, limit: std::time::Duration) -> Option<String> {
        let start = std::time::Instant::now();
        let mut buf = [0u8; 4096];
        while start.elapsed() <= limit {
            // A timeout, or a signal to the test process (children exiting): read again.
            if let Ok(n) = self.sock.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).trim().to_string();
                self.seen.borrow_mut().push(m.clone());
                return Some(m);
            }
        }
        None
    }

    /// The first message so far, or within `limit`, that contains `what`.
    pub fn wait(&self, what: &str, limit: std::time::Duration) -> Option<String> {
        let start = std::time::Instant::now();
        loop {
            if let Some(m) = self.seen.borrow().iter().find(|m| m.contains(what)) {
                return Some(m.clone());
            }
            let left = limit.checked_sub(start.elapsed())?;
            self.next(left)?;
        }
    }
}

/// A stand-in for a BMC's web interface on `host`: HTTPS on 443, with a certificate for
/// `ip` from a CA of its own, answering every GET with the address it sees the client at.
/// Returns the CA (PEM) to trust.
pub fn serve_https(lab: &Lab, host: &str, ip: std::net::IpAddr) -> Result<String> {
    let handler = r#"
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("client " + self.client_address[0] + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
"#;
    https_server(lab, host, ip, 443, "https", handler)
}

/// A release server on `host`: the files of `dir` over HTTPS on `port`, with a certificate
/// for `ip` from a CA of its own, which it returns (PEM).
pub fn serve_files_https(
    lab: &Lab,
    host: &str,
    ip: std::net::IpAddr,
    port: u16,
    dir: &std::path::Path,
) -> Result<String> {
    let handler = format!(
        "import functools\nH = functools.partial(http.server.SimpleHTTPRequestHandler, directory={:?})\n",
        dir.display().to_string()
    );
    https_server(lab, host, ip, port, "files", &handler)
}

/// Python's HTTP server with `handler` (Python code defining `H`) behind TLS on `port`,
/// logged as `log`; returns the CA.
fn https_server(
    lab: &Lab,
    host: &str,
    ip: std::net::IpAddr,
    port: u16,
    log: &str,
    handler: &str,
) -> Result<String> {
    let dir = lab.host_dir(host).join(log);
    std::fs::create_dir_all(&dir)?;
    let pki = crate::pki::generate(ip, host)?;
    std::fs::write(dir.join("cert.pem"), &pki.cert_pem)?;
    crate::headscale::write_private(&dir.join("key.pem"), pki.key_pem.as_bytes())?;
    let script = format!(
        r#"
import http.server, ssl
{handler}
s = http.server.ThreadingHTTPServer(("0.0.0.0", {port}), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain("cert.pem", "key.pem")
s.socket = ctx.wrap_socket(s.socket, server_side=True)
s.serve_forever()
"#
    );
    let mut c = lab.host(host).ns().command("python3");
    c.args(["-c", &script]).current_dir(&dir);
    lab.spawn(host, log, c)?;
    wait_connects(
        &lab.host(host).ns(),
        (ip, port).into(),
        std::time::Duration::from_secs(10),
    )?;
    Ok(pki.ca_pem)
}

/// `f` until it succeeds, for up to `limit`; then its last error. For what reaches a host a
/// moment after control said so (routes after an approval, a policy change).
pub fn retry<T>(limit: std::time::Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let start = std::time::Instant::now();
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() > limit => return Err(e),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(500)),
        }
    }
}

/// `GET https://ip/` from inside `ns`, trusting `ca_pem`, within 5 s: the body.
pub fn https_get(ns: &crate::netns::Netns, ip: std::net::IpAddr, ca_pem: &str) -> Result<String> {
    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes())?;
    ns.enter(move || {
        // Built inside: the client's own threads stay in this namespace.
        let client = reqwest::blocking::Client::builder()
            .add_root_certificate(ca)
            .timeout(std::time::Duration::from_secs(5))
            .build()?;
        Ok(client
            .get(format!("https://{ip}/"))
            .send()?
            .error_for_status()?
            .text()?)
    })
}
