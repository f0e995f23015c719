//! The data-plane benchmark behind `cargo xtask bench dataplane`: on one lab, iperf3 TCP
//! throughput and ping latency from an operator's stock tailscaled to `vpn-agent` on one
//! firewall host and to a stock tailscaled on another, and what the two daemons cost in
//! memory and CPU. Both paths must be direct before anything is measured.
//!
//! | host | address | runs |
//! |---|---|---|
//! | `fw` | 192.0.2.11 | `vpn-agent` (provisioned like the tests, from the binary given), `iperf3 -s` |
//! | `ts` | 192.0.2.12 | a stock tailscaled joined with a pre-auth key, `iperf3 -s` |
//! | `op` | 192.0.2.13 | the operator's stock tailscaled, the iperf3 and ping clients |
//!
//! The parsers and the table are pure; [`Bench`] is the IO.

pub mod scale;
pub mod subnet;

use crate::cmd;
use crate::firewall;
use crate::tailscale::{PORT, Tailscaled};
use crate::{Lab, LabOptions};
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The firewall's machine id.
pub const MACHINE: &str = "0cfc7e24-aaaa-4bbb-8ccc-0000000000b1";
/// The host running vpn-agent, and the one running the stock tailscaled it is compared with.
pub const AGENT_HOST: &str = "fw";
pub const TS_HOST: &str = "ts";
/// The operator's host.
pub const OP_HOST: &str = "op";

/// How much to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Length of one iperf3 run.
    pub seconds: u32,
    /// iperf3 runs per target and direction (the table shows their median).
    pub reps: usize,
    /// Echo requests per target.
    pub pings: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            seconds: 10,
            reps: 3,
            pings: 100,
        }
    }
}

/// The two daemons on the firewall side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Agent,
    Tailscaled,
}

impl Target {
    pub const BOTH: [Target; 2] = [Target::Agent, Target::Tailscaled];

    pub fn host(self) -> &'static str {
        match self {
            Target::Agent => AGENT_HOST,
            Target::Tailscaled => TS_HOST,
        }
    }

    /// The process name (`/proc/<pid>/comm`) of the daemon.
    pub fn comm(self) -> &'static str {
        match self {
            Target::Agent => "vpn-agent",
            Target::Tailscaled => "tailscaled",
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.comm())
    }
}

/// One iperf3 run as the receiver saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Iperf {
    pub bits_per_second: f64,
    pub bytes: f64,
}

/// ping's round-trip summary, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Rtt {
    pub min: f64,
    pub avg: f64,
    pub max: f64,
    pub mdev: f64,
    pub loss_percent: f64,
}

/// What was measured for one target.
#[derive(Debug, Clone, Default)]
pub struct PerTarget {
    /// op sends, the firewall receives (bit/s, one per run).
    pub forward: Vec<f64>,
    /// The firewall sends, op receives (`iperf3 -R`).
    pub reverse: Vec<f64>,
    pub rtt: Rtt,
    /// The daemon's peak resident set (VmHWM), after all runs.
    pub peak_rss_kib: u64,
    /// CPU time (user + system) the daemon spent during the iperf3 runs, and the bytes moved.
    pub cpu_seconds: f64,
    pub bytes: f64,
}

/// Everything one `measure` found.
#[derive(Debug, Clone, Default)]
pub struct Results {
    pub seconds: u32,
    pub pings: u32,
    pub agent: PerTarget,
    pub tailscaled: PerTarget,
    /// Plain veth op → fw on the underlay, no tunnel (bit/s).
    pub underlay: Vec<f64>,
    /// The share of the machine's CPU time left idle during each tunnel run (0 to 1): what
    /// spreading the agent's work over more cores could use.
    pub idle: Vec<f64>,
}

/// The lab with both targets up, joined and on a direct path from op.
pub struct Bench {
    pub lab: Lab,
    /// The agent's binary, and the root Ignition wrote for its host.
    pub agent_bin: std::path::PathBuf,
    pub agent_root: std::path::PathBuf,
    pub op: Tailscaled,
    pub ts: Tailscaled,
    pub agent_ip: IpAddr,
    pub ts_ip: IpAddr,
}

impl Bench {
    /// Builds the lab: vpn-agent from `agent_bin` on `fw`, stock tailscaled on `ts` and `op`,
    /// `iperf3 -s` on both firewall hosts; returns once op reaches both directly.
    pub fn start(agent_bin: &Path) -> Result<Bench> {
        Self::start_with(agent_bin, &[])
    }

    /// [`Bench::start`] with more lab hosts, started empty.
    pub fn start_with(agent_bin: &Path, more_hosts: &[&str]) -> Result<Bench> {
        let mut hosts = vec![AGENT_HOST, TS_HOST, OP_HOST];
        hosts.extend_from_slice(more_hosts);
        let lab = Lab::start(LabOptions::hosts(&hosts))?;
        let (fw, agent_ip) =
            firewall::start_firewall_with(&lab, AGENT_HOST, MACHINE, "bench", &[], agent_bin)?;
        let ts = lab.join_tailscaled(TS_HOST, "firewalls")?;
        let ts_ip = ts.ipv4()?;
        let (op, _) = firewall::join_operator(&lab, OP_HOST, AGENT_HOST)?;
        for host in [AGENT_HOST, TS_HOST] {
            let mut c = lab.host(host).ns().command("iperf3");
            c.args(["-s"]);
            lab.spawn(host, "iperf3", c)?;
        }
        let bench = Bench {
            lab,
            agent_bin: agent_bin.to_path_buf(),
            agent_root: fw.root,
            op,
            ts,
            agent_ip,
            ts_ip,
        };
        for t in Target::BOTH {
            bench.wait_direct(t)?;
        }
        Ok(bench)
    }

    /// The mesh address of `t`.
    pub fn ip(&self, t: Target) -> IpAddr {
        match t {
            Target::Agent => self.agent_ip,
            Target::Tailscaled => self.ts_ip,
        }
    }

    /// Disco pings from op until the path to `t` is direct to its underlay address.
    pub fn wait_direct(&self, t: Target) -> Result<()> {
        wait_direct(&self.op, self.ip(t), &self.lab.host(t.host()))
    }

    /// The pid of the daemon of `t` (found by name among its host's processes).
    pub fn pid(&self, t: Target) -> Result<i32> {
        let pids: Vec<i32> = self
            .lab
            .host(t.host())
            .ns()
            .pids()
            .into_iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == t.comm())
            })
            .collect();
        match pids[..] {
            [pid] => Ok(pid),
            _ => bail!("{} processes named {t} on {}", pids.len(), t.host()),
        }
    }

    /// One iperf3 TCP run from op to `to` (`reverse`: `to` sends).
    pub fn iperf(&self, to: IpAddr, reverse: bool, seconds: u32) -> Result<Iperf> {
        iperf(&self.lab.host(OP_HOST).ns(), to, reverse, seconds)
    }

    /// A short iperf3 run, retried while the server is still starting.
    pub fn warm_up(&self, to: IpAddr) -> Result<()> {
        let start = Instant::now();
        loop {
            match self.iperf(to, false, 2) {
                Ok(_) => return Ok(()),
                Err(e) if start.elapsed() > Duration::from_secs(10) => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(300)),
            }
        }
    }

    /// `ping -c count -i interval -q` from op to `to` (`interval` in seconds, as ping takes it).
    pub fn ping(&self, to: IpAddr, count: u32, interval: &str) -> Result<Rtt> {
        let mut c = self.lab.host(OP_HOST).ns().command("ping");
        c.args(["-q", "-i", interval, "-W", "2", "-c", &count.to_string()])
            .arg(to.to_string());
        let out = cmd::run_quiet(&mut c)?;
        parse_ping(&out).with_context(|| format!("ping printed {out:?}"))
    }

    /// Measures everything; `progress` gets a line per step.
    pub fn measure(&self, opts: &Options, progress: &mut dyn FnMut(&str)) -> Result<Results> {
        let mut r = Results {
            seconds: opts.seconds,
            pings: opts.pings,
            ..Results::default()
        };
        let tick = clock_ticks()?;
        for t in Target::BOTH {
            self.warm_up(self.ip(t))?;
        }
        for reverse in [false, true] {
            for rep in 0..opts.reps {
                // Alternate who goes first, so neither always runs on a warmer machine.
                let order = if rep % 2 == 0 {
                    Target::BOTH
                } else {
                    [Target::Tailscaled, Target::Agent]
                };
                for t in order {
                    let pid = self.pid(t)?;
                    let cpu0 = cpu_ticks(pid)?;
                    let machine0 = machine_ticks()?;
                    let run = self.iperf(self.ip(t), reverse, opts.seconds)?;
                    let cpu = (cpu_ticks(pid)? - cpu0) as f64 / tick;
                    let (idle1, total1) = machine_ticks()?;
                    r.idle
                        .push((idle1 - machine0.0) as f64 / (total1 - machine0.1).max(1) as f64);
                    let dir = if reverse { "<-" } else { "->" };
                    progress(&format!(
                        "op {dir} {t}: {:.3} Gbit/s ({t} used {cpu:.1} s CPU)",
                        run.bits_per_second / 1e9
                    ));
                    let p = r.get_mut(t);
                    p.cpu_seconds += cpu;
                    p.bytes += run.bytes;
                    if reverse {
                        p.reverse.push(run.bits_per_second);
                    } else {
                        p.forward.push(run.bits_per_second);
                    }
                }
            }
        }
        for t in Target::BOTH {
            let rtt = self.ping(self.ip(t), opts.pings, "0.02")?;
            progress(&format!(
                "ping {t}: avg {:.3} ms, mdev {:.3} ms, loss {}%",
                rtt.avg, rtt.mdev, rtt.loss_percent
            ));
            r.get_mut(t).rtt = rtt;
        }
        for t in Target::BOTH {
            let kib = peak_rss_kib(self.pid(t)?)?;
            progress(&format!("peak RSS of {t}: {:.1} MiB", kib as f64 / 1024.0));
            r.get_mut(t).peak_rss_kib = kib;
        }
        let fw = IpAddr::V4(self.lab.host(AGENT_HOST).addr);
        for _ in 0..opts.reps {
            let run = self.iperf(fw, false, opts.seconds)?;
            progress(&format!(
                "underlay op -> fw: {:.3} Gbit/s",
                run.bits_per_second / 1e9
            ));
            r.underlay.push(run.bits_per_second);
        }
        Ok(r)
    }

    /// Profiles the agent under iperf3 from op, once per direction: `perf record` (DWARF call
    /// graphs: Rust builds have no frame pointers) for `seconds`, then `strace -c -f` for
    /// `seconds` while the packet counters of `tailscale0` and `eth0` tell how many packets
    /// the agent moved meanwhile. Writes `perf-<dir>.data`, `perf-<dir>.txt` (call graphs),
    /// `perf-<dir>-flat.txt` and `strace-<dir>.txt` into `out`; returns a summary.
    pub fn profile(&self, out: &Path, seconds: u32) -> Result<String> {
        std::fs::create_dir_all(out)?;
        let pid = self.pid(Target::Agent)?.to_string();
        let mut summary = String::new();
        for (dir, reverse) in [("forward", false), ("reverse", true)] {
            let data = out.join(format!("perf-{dir}.data"));
            let load = self.background_iperf(reverse, seconds + 3)?;
            std::thread::sleep(Duration::from_secs(1));
            cmd::run_quiet(
                Command::new("perf")
                    .args(["record", "-q", "-F", "999", "--call-graph", "dwarf,16384"])
                    .args(["-p", &pid, "-o"])
                    .arg(&data)
                    .args(["--", "sleep", &seconds.to_string()]),
            )?;
            let bps = finish_iperf(load)?;
            let report = |extra: &[&str]| {
                cmd::run_quiet(
                    Command::new("perf")
                        .args(["report", "--stdio", "--no-children", "-i"])
                        .arg(&data)
                        .args(extra),
                )
            };
            let graphs = report(&["--percent-limit", "2"])?;
            std::fs::write(out.join(format!("perf-{dir}.txt")), graphs)?;
            let flat = report(&["--percent-limit", "0.5", "-g", "none"])?;
            std::fs::write(out.join(format!("perf-{dir}-flat.txt")), &flat)?;
            let label = if reverse { "fw sends (-R)" } else { "op sends" };
            summary.push_str(&format!(
                "== {dir}, {label}: iperf3 under perf {:.3} Gbit/s; self time, top symbols:\n",
                bps / 1e9
            ));
            for l in flat
                .lines()
                .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
                .take(25)
            {
                summary.push_str(&format!("  {}\n", l.trim_end()));
            }

            let load = self.background_iperf(reverse, seconds + 3)?;
            std::thread::sleep(Duration::from_secs(1));
            let before = self.counters()?;
            let strace = out.join(format!("strace-{dir}.txt"));
            // strace runs until interrupted; timeout sends SIGINT after `seconds`.
            let st = cmd::quiet_output(
                Command::new("timeout")
                    .args(["-s", "INT", &seconds.to_string()])
                    .args(["strace", "-c", "-f", "-p", &pid, "-o"])
                    .arg(&strace),
            )?;
            let d = self.counters()?.since(&before);
            finish_iperf(load)?;
            let text = std::fs::read_to_string(&strace).with_context(|| {
                format!(
                    "strace wrote nothing ({}): {}",
                    st.status,
                    String::from_utf8_lossy(&st.stderr)
                )
            })?;
            let avg = |bytes: u64, n: u64| bytes / n.max(1);
            let udp = (d.udp_in + d.udp_out).max(1) as f64;
            let tun = (d.tun_rx + d.tun_tx).max(1) as f64;
            summary.push_str(&format!(
                "== {dir}, under strace for {seconds} s: {:.3} Gbit/s through tailscale0; the \
                 agent received {} UDP datagrams and sent {} (socket counts, /proc/net/snmp), \
                 wrote {} packets to the TUN device (avg {} bytes) and read {} (avg {} bytes); \
                 system calls (with -f: the nft runs every 2 s are in the table too):\n\
                 \x20 {:<16} {:>9} {:>12} {:>12}\n",
                (d.tun_rx_bytes + d.tun_tx_bytes) as f64 * 8.0 / seconds as f64 / 1e9,
                d.udp_in,
                d.udp_out,
                d.tun_rx,
                avg(d.tun_rx_bytes, d.tun_rx),
                d.tun_tx,
                avg(d.tun_tx_bytes, d.tun_tx),
                "syscall",
                "calls",
                "per datagram",
                "per TUN pkt"
            ));
            for (name, calls) in parse_strace(&text).into_iter().take(12) {
                summary.push_str(&format!(
                    "  {name:<16} {calls:>9} {:>12.3} {:>12.3}\n",
                    calls as f64 / udp,
                    calls as f64 / tun
                ));
            }
        }
        Ok(summary)
    }

    fn background_iperf(&self, reverse: bool, seconds: u32) -> Result<std::process::Child> {
        let mut c = self.lab.host(OP_HOST).ns().command("iperf3");
        c.args(["-c", &self.agent_ip.to_string(), "-J"])
            .args(["-t", &seconds.to_string()]);
        if reverse {
            c.arg("-R");
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start iperf3")
    }

    /// Packet counters on the agent's host.
    fn counters(&self) -> Result<Counters> {
        let ns = self.lab.host(AGENT_HOST).ns();
        let out = ns.ip(&["-s", "-j", "link", "show", "dev", "tailscale0"])?;
        let v: Value = serde_json::from_str(&out)?;
        let s = &v[0]["stats64"];
        let n = |dir: &str, what: &str| {
            s[dir][what]
                .as_u64()
                .with_context(|| format!("no {dir} {what} for tailscale0 in {out}"))
        };
        let snmp = cmd::run_quiet(ns.command("cat").arg("/proc/net/snmp"))?;
        let udp = |field| parse_snmp(&snmp, "Udp", field).context("no Udp counters in snmp");
        Ok(Counters {
            tun_rx: n("rx", "packets")?,
            tun_rx_bytes: n("rx", "bytes")?,
            tun_tx: n("tx", "packets")?,
            tun_tx_bytes: n("tx", "bytes")?,
            udp_in: udp("InDatagrams")?,
            udp_out: udp("OutDatagrams")?,
        })
    }
}

/// Counters of the agent's host: `tailscale0` rx is what the agent wrote to the TUN device,
/// tx what it read; UDP datagrams as the sockets saw them (after GRO/GSO).
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    tun_rx: u64,
    tun_rx_bytes: u64,
    tun_tx: u64,
    tun_tx_bytes: u64,
    udp_in: u64,
    udp_out: u64,
}

impl Counters {
    fn since(&self, b: &Counters) -> Counters {
        Counters {
            tun_rx: self.tun_rx - b.tun_rx,
            tun_rx_bytes: self.tun_rx_bytes - b.tun_rx_bytes,
            tun_tx: self.tun_tx - b.tun_tx,
            tun_tx_bytes: self.tun_tx_bytes - b.tun_tx_bytes,
            udp_in: self.udp_in - b.udp_in,
            udp_out: self.udp_out - b.udp_out,
        }
    }
}

/// A counter from `/proc/net/snmp` (a header line and a value line per protocol).
pub fn parse_snmp(text: &str, proto: &str, field: &str) -> Option<u64> {
    let prefix = format!("{proto}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let names = lines.next()?.split_whitespace();
    let values = lines.next()?.split_whitespace();
    names
        .zip(values)
        .find(|(n, _)| *n == field)
        .and_then(|(_, v)| v.parse().ok())
}

impl Results {
    pub fn get(&self, t: Target) -> &PerTarget {
        match t {
            Target::Agent => &self.agent,
            Target::Tailscaled => &self.tailscaled,
        }
    }

    fn get_mut(&mut self, t: Target) -> &mut PerTarget {
        match t {
            Target::Agent => &mut self.agent,
            Target::Tailscaled => &mut self.tailscaled,
        }
    }

    /// The markdown table for the README, with each run's numbers below it.
    pub fn table(&self) -> String {
        let (a, t) = (&self.agent, &self.tailscaled);
        let gbit = |v: f64| format!("{:.2} Gbit/s", v / 1e9);
        let ratio = |x: f64, y: f64| {
            if y > 0.0 {
                format!("{:.2}", x / y)
            } else {
                "n/a".into()
            }
        };
        let mut s = String::from(
            "| measure | op → vpn-agent | op → tailscaled | agent / tailscaled | goal |\n\
             |---|---|---|---|---|\n",
        );
        let runs = a.forward.len();
        for (what, how, x, y) in [
            ("op sends", "iperf3", &a.forward, &t.forward),
            ("firewall sends", "iperf3 -R", &a.reverse, &t.reverse),
        ] {
            let (mx, my) = (median(x), median(y));
            s.push_str(&format!(
                "| TCP throughput, {what} ({how}, median of {runs} × {} s) | {} | {} | {} | ≥ 1.0 |\n",
                self.seconds,
                gbit(mx),
                gbit(my),
                ratio(mx, my)
            ));
        }
        s.push_str(&format!(
            "| ping round trip, avg ± mdev ({} × 20 ms) | {:.3} ± {:.3} ms | {:.3} ± {:.3} ms | {} | ≤ 1.0 |\n",
            self.pings,
            a.rtt.avg,
            a.rtt.mdev,
            t.rtt.avg,
            t.rtt.mdev,
            ratio(a.rtt.avg, t.rtt.avg)
        ));
        let mib = |k: u64| k as f64 / 1024.0;
        s.push_str(&format!(
            "| peak RSS of the firewall's daemon (VmHWM) | {:.1} MiB | {:.1} MiB | {} | ≤ 0.25 |\n",
            mib(a.peak_rss_kib),
            mib(t.peak_rss_kib),
            ratio(a.peak_rss_kib as f64, t.peak_rss_kib as f64)
        ));
        let per_gb = |p: &PerTarget| {
            if p.bytes > 0.0 {
                p.cpu_seconds / (p.bytes / 1e9)
            } else {
                0.0
            }
        };
        s.push_str(&format!(
            "| CPU time of the firewall's daemon per GB moved | {:.2} s | {:.2} s | {} | |\n",
            per_gb(a),
            per_gb(t),
            ratio(per_gb(a), per_gb(t))
        ));
        let list = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{:.2}", x / 1e9))
                .collect::<Vec<_>>()
                .join(", ")
        };
        s.push_str(&format!(
            "\nEach run, Gbit/s: op sends to vpn-agent {}; to tailscaled {}; vpn-agent sends {}; \
             tailscaled sends {}.\nFor scale, the underlay without a tunnel (plain veth and \
             bridge, op → fw, iperf3): {} (runs: {}).\n\
             The machine's cores were idle {:.0} % of the time during the tunnel runs (median; \
             from {:.0} % to {:.0} %).\n",
            list(&a.forward),
            list(&t.forward),
            list(&a.reverse),
            list(&t.reverse),
            gbit(median(&self.underlay)),
            list(&self.underlay),
            median(&self.idle) * 100.0,
            self.idle.iter().copied().fold(f64::INFINITY, f64::min) * 100.0,
            self.idle.iter().copied().fold(0.0, f64::max) * 100.0,
        ));
        s
    }
}

/// Disco pings from `op` to mesh address `ip` until the path is direct to `host`'s underlay
/// address. The peer need not be listed online: headscale (v0.28) marks a node that
/// reconnects at the wrong moment offline while it is connected (b09af384 in v0.29), which
/// the agent puts right by itself and a stock tailscaled does not; the path is there either
/// way, and it is what the figures measure.
pub fn wait_direct(op: &Tailscaled, ip: IpAddr, host: &crate::lab::Host) -> Result<()> {
    let want = format!("via {}:{PORT}", host.addr);
    let start = Instant::now();
    while op.peer(ip).is_err() {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("op has no peer {} {ip} in its netmap after 30 s", host.name);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut last = String::new();
    for _ in 0..3 {
        match op.disco_ping(ip, true) {
            Ok(out) if out.contains(&want) => return Ok(()),
            Ok(out) => last = out,
            Err(e) => last = format!("{e:#}"),
        }
    }
    bail!(
        "op has no direct path to {} {ip} ({want}): {last}",
        host.name
    )
}

/// One iperf3 TCP run from namespace `ns` to `to` (`reverse`: `to` sends).
pub fn iperf(ns: &crate::netns::Netns, to: IpAddr, reverse: bool, seconds: u32) -> Result<Iperf> {
    let mut c = ns.command("iperf3");
    c.args(["-c", &to.to_string(), "-J", "--connect-timeout", "3000"])
        .args(["-t", &seconds.to_string()]);
    if reverse {
        c.arg("-R");
    }
    let out = cmd::quiet_output(&mut c)?;
    parse_iperf(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| format!("`{}` ({})", cmd::render(&c), out.status))
}

fn finish_iperf(child: std::process::Child) -> Result<f64> {
    let out = child.wait_with_output()?;
    Ok(parse_iperf(&String::from_utf8_lossy(&out.stdout))?.bits_per_second)
}

/// The receiver's throughput from `iperf3 -J` output.
pub fn parse_iperf(json: &str) -> Result<Iperf> {
    let v: Value = serde_json::from_str(json).context("iperf3 printed no JSON")?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let r = &v["end"]["sum_received"];
    match (r["bits_per_second"].as_f64(), r["bytes"].as_f64()) {
        (Some(bits_per_second), Some(bytes)) => Ok(Iperf {
            bits_per_second,
            bytes,
        }),
        _ => bail!("iperf3's JSON has no end.sum_received"),
    }
}

/// The summary of `ping -q`: loss and `rtt min/avg/max/mdev = a/b/c/d ms`.
pub fn parse_ping(out: &str) -> Option<Rtt> {
    let loss = out
        .split(',')
        .find(|p| p.contains("packet loss"))?
        .split('%')
        .next()?
        .trim()
        .parse()
        .ok()?;
    let line = out.lines().find(|l| l.starts_with("rtt "))?;
    // A reply that came after the next request was sent adds ", pipe N" to the line.
    let nums: Vec<f64> = line
        .split('=')
        .nth(1)?
        .split(',')
        .next()?
        .trim()
        .trim_end_matches("ms")
        .trim()
        .split('/')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    match nums[..] {
        [min, avg, max, mdev] => Some(Rtt {
            min,
            avg,
            max,
            mdev,
            loss_percent: loss,
        }),
        _ => None,
    }
}

/// The `VmHWM` line of a `/proc/<pid>/status`, in KiB.
pub fn parse_vmhwm(status: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// user + system time from a `/proc/<pid>/stat` line, in clock ticks.
/// The machine's idle (idle + iowait) and total CPU ticks, from `/proc/stat`'s `cpu` line.
pub fn parse_machine_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let total = f.iter().take(8).sum();
    Some((f.get(3)? + f.get(4)?, total))
}

fn machine_ticks() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    parse_machine_ticks(&stat).context("cannot read /proc/stat's cpu line")
}

pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces: count fields after its closing paren.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// (syscall, calls) rows of an `strace -c` table, most calls first.
pub fn parse_strace(text: &str) -> Vec<(String, u64)> {
    let mut rows: Vec<(String, u64)> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // % time, seconds, usecs/call, calls, [errors], syscall
            if f.len() < 5 || f[0].parse::<f64>().is_err() {
                return None;
            }
            let name = f.last()?.to_string();
            let calls = f[3].parse().ok()?;
            (name != "total").then_some((name, calls))
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1));
    rows
}

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

pub(crate) fn peak_rss_kib(pid: i32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_vmhwm(&status).with_context(|| format!("no VmHWM for pid {pid}"))
}

pub(crate) fn cpu_ticks(pid: i32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_cpu_ticks(&stat).with_context(|| format!("cannot read CPU time of pid {pid}"))
}

pub(crate) fn clock_ticks() -> Result<f64> {
    let out = cmd::run_quiet(Command::new("getconf").arg("CLK_TCK"))?;
    Ok(out.trim().parse()?)
}

/// Today's date (UTC), `YYYY-MM-DD`.
pub fn today() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()[..10].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iperf_json_gives_the_receivers_rate() {
        let j = r#"{"start":{},"end":{"sum_sent":{"bits_per_second":2e9,"bytes":1},
            "sum_received":{"bits_per_second":1.5e9,"bytes":1875000000}}}"#;
        assert_eq!(
            parse_iperf(j).unwrap(),
            Iperf {
                bits_per_second: 1.5e9,
                bytes: 1.875e9
            }
        );
        let e = r#"{"start":{},"end":{},"error":"unable to connect to server"}"#;
        assert!(format!("{:#}", parse_iperf(e).unwrap_err()).contains("unable to connect"));
    }

    #[test]
    fn ping_summary() {
        let out = "PING 100.64.0.1 (100.64.0.1) 56(84) bytes of data.\n\n\
                   --- 100.64.0.1 ping statistics ---\n\
                   100 packets transmitted, 99 received, 1% packet loss, time 2077ms\n\
                   rtt min/avg/max/mdev = 0.101/0.245/1.203/0.112 ms\n";
        assert_eq!(
            parse_ping(out).unwrap(),
            Rtt {
                min: 0.101,
                avg: 0.245,
                max: 1.203,
                mdev: 0.112,
                loss_percent: 1.0
            }
        );
        assert!(parse_ping("100 packets transmitted, 0 received, 100% packet loss").is_none());
        // What ended bench scale at 5 000 (run of c3dd0d9): one reply 66 ms late.
        let late = "PING 100.64.0.1 (100.64.0.1) 56(84) bytes of data.\n\n\
                    --- 100.64.0.1 ping statistics ---\n\
                    100 packets transmitted, 100 received, 0% packet loss, time 5536ms\n\
                    rtt min/avg/max/mdev = 0.205/1.219/66.280/6.683 ms, pipe 2\n";
        let r = parse_ping(late).unwrap();
        assert_eq!((r.avg, r.max, r.loss_percent), (1.219, 66.28, 0.0));
    }

    #[test]
    fn proc_fields() {
        assert_eq!(
            parse_vmhwm("Name:\tx\nVmPeak:\t 9 kB\nVmHWM:\t   12345 kB\n"),
            Some(12345)
        );
        assert_eq!(
            parse_machine_ticks("cpu  100 5 50 800 20 1 4 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n"),
            Some((820, 980))
        );
        let stat = "42 (a b) S 1 42 42 0 -1 4194560 100 0 0 0 70 30 0 0 20 0 4 0 5 6 7";
        assert_eq!(parse_cpu_ticks(stat), Some(100));
    }

    #[test]
    fn snmp_counters() {
        let t = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                 Udp: InDatagrams NoPorts InErrors OutDatagrams\nUdp: 120 3 0 77\n\
                 UdpLite: InDatagrams NoPorts InErrors OutDatagrams\nUdpLite: 0 0 0 0\n";
        assert_eq!(parse_snmp(t, "Udp", "InDatagrams"), Some(120));
        assert_eq!(parse_snmp(t, "Udp", "OutDatagrams"), Some(77));
        assert_eq!(parse_snmp(t, "Udp", "Nope"), None);
    }

    #[test]
    fn strace_table_rows() {
        let t = "% time     seconds  usecs/call     calls    errors syscall\n\
                 ------ ----------- ----------- --------- --------- ----------------\n \
                 60.00    0.600000           3    200000           sendto\n \
                 40.00    0.400000           2    150000      1000 recvfrom\n\
                 ------ ----------- ----------- --------- --------- ----------------\n\
                 100.00    1.000000           2    350000      1000 total\n";
        assert_eq!(
            parse_strace(t),
            vec![("sendto".into(), 200000), ("recvfrom".into(), 150000)]
        );
    }

    #[test]
    fn table_has_ratios_and_runs() {
        let p = |f: f64, rss| PerTarget {
            forward: vec![f, f * 2.0, f * 3.0],
            reverse: vec![f],
            rtt: Rtt {
                avg: 0.2,
                mdev: 0.01,
                ..Rtt::default()
            },
            peak_rss_kib: rss,
            cpu_seconds: 10.0,
            bytes: 5e9,
        };
        let r = Results {
            seconds: 10,
            pings: 100,
            agent: p(1e9, 10240),
            tailscaled: p(2e9, 40960),
            underlay: vec![19.6e9],
            idle: vec![0.02, 0.05, 0.03],
        };
        let t = r.table();
        assert!(
            t.contains("| 2.00 Gbit/s | 4.00 Gbit/s | 0.50 | ≥ 1.0 |"),
            "{t}"
        );
        assert!(t.contains("| 10.0 MiB | 40.0 MiB | 0.25 |"), "{t}");
        assert!(t.contains("19.60 Gbit/s"), "{t}");
        assert!(t.contains("idle 3 % of the time"), "{t}");
        assert_eq!(median(&[3.0, 1.0, 2.0, 10.0]), 2.5);
    }
}
