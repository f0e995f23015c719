//! The partition-scale line of `cargo xtask bench scale` (#15): vpn-agent and a stock
//! tailscaled side by side in one tailnet on one headscale, as that tailnet grows to 100,
//! 1 000 and 5 000 nodes registered over ts2021 by `vdc-load`, 50 of which keep coming,
//! going and changing endpoints ten times a second (past 1 000, changing endpoints only:
//! [`Options::coming_and_going_up_to`]).
//!
//! | host | address | runs |
//! |---|---|---|
//! | `fw` | 192.0.2.11 | `vpn-agent` (release build), `iperf3 -s` |
//! | `ts` | 192.0.2.12 | a stock tailscaled, `iperf3 -s` |
//! | `op` | 192.0.2.13 | the operator's stock tailscaled, the iperf3 and ping clients |
//! | `load` | 192.0.2.14 | `vdc-load`: the churning nodes, and each step's new nodes |
//!
//! At each size both daemons are restarted (the agent without its netmap cache, so both wait
//! for headscale's first map), and each figure is taken from both in the same window. The
//! churn is frozen (SIGSTOP) while nodes register and the daemons restart, and runs for the
//! CPU and traffic windows. A size the run cannot get through ends it, and the table says
//! why and keeps what that size measured.
//!
//! At thousands of nodes headscale takes a whole core: it rebuilds its peer map over all pairs
//! of nodes at every batch of changes (v0.28, `PolicyManager.BuildPeerMap`). In production it
//! runs on a machine of its own, so here it gets cores of its own: the machine's cores are
//! split ([`Cores`]), headscale and the load on one half, the daemons, the operator, iperf3 and
//! ping on the other, for every figure including the 2-peer baseline. The load runs at nice
//! 19 beside headscale. headscale does not: it gives up on a stream its send to does not leave
//! within 50 ms, and a starved headscale would give up on streams for its own slowness.
//!
//! The CPU cost of map updates is counted by the daemons themselves: the map messages past a
//! stream's first each one received in a window (the agent's status, tailscaled's
//! `controlclient_map_response_map_delta`), not the load's events, which headscale holds up
//! behind its rebuilds and passes on in batches, sometimes after the window.

use super::{Bench, Rtt, Target, clock_ticks, cpu_ticks, peak_rss_kib};
use crate::firewall::{AGENT_LOG, agent_command_with, agent_status, map_open_field};
use crate::headscale::metric_value;
use crate::load::Load;
use anyhow::{Result, bail};
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use std::time::{Duration, Instant};
use vpn_agent::status::MapUpdates;

const LOAD_HOST: &str = "load";
const LOAD_USER: &str = "load";
/// The nodes that churn, and how often one of them changes.
pub const CHURNING: usize = 50;
pub const CHURN_PER_SEC: f64 = 10.0;
/// Registrations in flight while the tailnet grows: headscale (v0.28) writes its node store
/// in batches (up to 100, or what came within 500 ms) and rebuilds its peer map over all
/// pairs of nodes once per batch, so registrations in flight together share that rebuild.
const REGISTER_PARALLEL: usize = 64;
/// How long one step's registrations may take. headscale (v0.28) slows with the square of
/// the nodes: on two shared cores it registered 2.6 nodes a second at 1 800 nodes, which
/// puts 5 000 more than an hour away.
const REGISTER_LIMIT: Duration = Duration::from_secs(900);
/// New nodes a step registers over ts2021 at most. A step that adds more writes them into
/// headscale's database while headscale is stopped: at 5 000 nodes headscale (v0.28) would
/// take hours to register them one by one on this machine (after about 2 200 it stopped
/// answering), and right after its start on 5 000 it answered no registration within 30 s.
/// The daemons see the same tailnet either way: the benchmark's new nodes never connect.
/// The first map's size is then the agent's (zstd as received; its JSON is not measured).
const REGISTER_AT_MOST: usize = 1000;
/// How long headscale may take to start on a seeded database (v0.28 was not up within 30 s
/// with 5 000 nodes).
const HEADSCALE_START_LIMIT: Duration = Duration::from_secs(600);
/// How long each CPU window lasts where the churn is endpoint changes only: headscale
/// (v0.28) takes 38 s to rebuild its peer map at 5 000 nodes here, and an endpoint change
/// goes through only with a rebuild; a 30 s window saw none.
pub const ENDPOINTS_ONLY_WINDOW_SECS: u32 = 120;
/// headscale's time rebuilding its peer map (`peersByNode` over every pair of nodes, at every
/// batch of node changes): a histogram's sum and count.
const PEER_MAP_METRIC: &str = "headscale_nodestore_peers_calculation_duration_seconds";
/// How long a restarted daemon may take to `Running`: at 5 000 nodes headscale (v0.28) took
/// 110 to 170 s for a first map here, and the agent waits up to twice what it learned a map
/// takes (tailscaled gives up at 120 s and asks again).
const RUNNING_LIMIT: Duration = Duration::from_secs(300);
/// tailscaled's count of map messages past a stream's first (keep-alives aside).
const TS_MAP_UPDATES: &str = "controlclient_map_response_map_delta";

/// What to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Tailnet sizes, in the order they are grown to: peers in each daemon's netmap.
    pub sizes: Vec<usize>,
    /// The largest size at which the nodes churn by coming and going: past it they only
    /// change endpoints, with no map stream open (see [`Step::endpoints_only`]).
    pub coming_and_going_up_to: usize,
    /// How long CPU time is counted under churn alone.
    pub churn_secs: u32,
    /// Length of one iperf3 run, and runs per direction and daemon (the median counts): the
    /// goal at 5 000 is within 5 % of the 2-peer figure, and one run varies by more.
    pub iperf_secs: u32,
    pub iperf_reps: usize,
    /// Echo requests per daemon.
    pub pings: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            sizes: vec![100, 1000, 5000],
            coming_and_going_up_to: 1000,
            churn_secs: 30,
            iperf_secs: 10,
            iperf_reps: 3,
            pings: 100,
        }
    }
}

/// Ping and iperf3 from op to one daemon.
#[derive(Debug, Clone, Default)]
pub struct Traffic {
    pub rtt: Rtt,
    /// op sends, the daemon receives; and back (bit/s).
    pub forward: f64,
    pub reverse: f64,
}

/// What a daemon used over one window: CPU time (user + system, seconds) and the map updates
/// (messages past a stream's first, keep-alives aside) it received, as it counts them.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Usage {
    pub cpu: f64,
    pub updates: u64,
}

/// One daemon at one size.
#[derive(Debug, Clone, Default)]
pub struct Daemon {
    /// From the end of the registrations until it listed every node (within 180 s), and how
    /// many it listed last.
    pub caught_up: Option<Duration>,
    pub listed: usize,
    /// From its start (no netmap yet) to `Running`; none within [`RUNNING_LIMIT`].
    pub to_running: Option<Duration>,
    /// From the first map's last byte to the map applied (the agent logs it).
    pub first_map_applied: Option<Duration>,
    /// VmHWM after everything at this size.
    pub peak_rss_kib: u64,
    /// A window of churn alone, and one as long with the load frozen (none if the run
    /// stopped before it).
    pub churn_window: Usage,
    pub quiet_window: Option<Usage>,
    /// The agent's own time from an update decoded to applied, over the churning window:
    /// mean, and the longest since its restart at this size (µs).
    pub apply_micros: Option<(f64, u64)>,
    /// With the churn paused, and while it runs.
    pub quiet: Traffic,
    pub churning: Traffic,
}

/// Both daemons at one size.
#[derive(Debug, Clone, Default)]
pub struct Step {
    /// Peers in each daemon's netmap.
    pub peers: usize,
    /// The first message of a new map stream at this size (zstd as sent, JSON).
    pub map_zstd_bytes: u64,
    pub map_json_bytes: u64,
    /// Churn events while CPU time was counted (none: not counted).
    pub churn_events: Option<u64>,
    /// Whether the churn was endpoint changes only. A node that comes online costs headscale
    /// (v0.28) a full map of every node; at 5 000 on two shared cores it made none within
    /// 30 s, so no churn went through at all. An endpoint change is one lite map request,
    /// which headscale passes on to the streaming nodes as a patch.
    pub endpoints_only: bool,
    /// Churn events in that window that headscale failed (a busy headscale drops a node's
    /// connection or answers no map in time), and the last one's error.
    pub churn_errors: u64,
    pub churn_error: Option<String>,
    pub agent: Daemon,
    pub tailscaled: Daemon,
    /// headscale's peer-map rebuilds while the CPU and traffic windows ran: how many, and
    /// their time in all (see [`PEER_MAP_METRIC`]).
    pub peer_map_rebuilds: Option<(u64, f64)>,
    /// Whether both daemons were restarted at this size.
    pub restarted: bool,
    /// New nodes of this step written into headscale's database rather than registered
    /// (see [`REGISTER_AT_MOST`]).
    pub seeded: usize,
    /// Why the run stopped at this size; what it measured before stays.
    pub failed: Option<String>,
}

impl Step {
    /// How long each CPU window lasts.
    pub fn window_secs(&self, opts: &Options) -> u32 {
        if self.endpoints_only {
            opts.churn_secs.max(ENDPOINTS_ONLY_WINDOW_SECS)
        } else {
            opts.churn_secs
        }
    }

    /// What 1 000 map updates cost `t` in CPU time beyond its background (timers,
    /// keep-alives, the firewall check), which both windows hold alike: the CPU time the
    /// churning window took beyond the frozen one, over the updates it received beyond the
    /// frozen one's (headscale passes on changes it held up behind a rebuild after the load
    /// is frozen). None where the churning window received no more updates, or cost less.
    pub fn cpu_per_1000(&self, t: Target) -> Option<f64> {
        let d = self.get(t);
        let (churning, quiet) = (d.churn_window, d.quiet_window?);
        let more = churning
            .updates
            .checked_sub(quiet.updates)
            .filter(|&n| n > 0)?;
        Some((churning.cpu - quiet.cpu) * 1000.0 / more as f64).filter(|&c| c >= 0.0)
    }

    fn get_mut(&mut self, t: Target) -> &mut Daemon {
        match t {
            Target::Agent => &mut self.agent,
            Target::Tailscaled => &mut self.tailscaled,
        }
    }

    fn get(&self, t: Target) -> &Daemon {
        match t {
            Target::Agent => &self.agent,
            Target::Tailscaled => &self.tailscaled,
        }
    }
}

/// The baseline (the operator and the other daemon only, no churn), then one step per size.
#[derive(Debug, Clone, Default)]
pub struct Results {
    pub baseline: Step,
    pub steps: Vec<Step>,
    /// How the machine's cores were shared out; none on a single core.
    pub cores: Option<Cores>,
}

/// The machine's cores in two halves: `control` for headscale and the load (other machines in
/// production), `nodes` for everything else, while anything is measured; all of them for all
/// while nodes register and the daemons restart. On one core of two, headscale (v0.28) took
/// over 120 s for a first map at 5 000 nodes, and the operator's restarted tailscaled gave up
/// on it (its watchdog) twice in the 300 s it had (run of 49b32d0).
#[derive(Debug, Clone, PartialEq)]
pub struct Cores {
    pub control: Vec<usize>,
    pub nodes: Vec<usize>,
}

/// The hosts on the `control` half; the others are on `nodes`.
const CONTROL_HOSTS: [&str; 2] = [crate::lab::CTL, LOAD_HOST];
const NODE_HOSTS: [&str; 3] = [super::AGENT_HOST, super::TS_HOST, super::OP_HOST];

impl Cores {
    /// The cores of `set`, split; none where there is only one.
    fn of(set: &CpuSet) -> Option<Cores> {
        let allowed: Vec<usize> = (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect();
        Cores::split(&allowed)
    }

    fn split(allowed: &[usize]) -> Option<Cores> {
        let half = allowed.len() / 2;
        (half > 0).then(|| Cores {
            control: allowed[..half].to_vec(),
            nodes: allowed[half..].to_vec(),
        })
    }

    fn set(cores: &[usize]) -> Result<CpuSet> {
        let mut set = CpuSet::new();
        for &c in cores {
            set.set(c)?;
        }
        Ok(set)
    }

    /// Every process of the lab on its half, and this thread (which starts iperf3 and ping)
    /// on `nodes`. Threads made later inherit their creator's.
    fn split_up(&self, b: &Bench) -> Result<()> {
        let (control, nodes) = (Self::set(&self.control)?, Self::set(&self.nodes)?);
        CONTROL_HOSTS.iter().for_each(|h| pin(b, h, &control));
        NODE_HOSTS.iter().for_each(|h| pin(b, h, &nodes));
        sched_setaffinity(Pid::from_raw(0), &nodes)?;
        Ok(())
    }

    /// Every process of the lab, and this thread, on all the cores.
    fn share(&self, b: &Bench) -> Result<()> {
        let all: Vec<usize> = self.control.iter().chain(&self.nodes).copied().collect();
        let all = Self::set(&all)?;
        CONTROL_HOSTS
            .iter()
            .chain(&NODE_HOSTS)
            .for_each(|h| pin(b, h, &all));
        sched_setaffinity(Pid::from_raw(0), &all)?;
        Ok(())
    }

    fn describe(&self) -> String {
        let list = |c: &[usize]| c.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        format!(
            "headscale and the load on core {}, the daemons, the operator, iperf3 and ping on \
             core {} while anything is measured; all cores for all while nodes register and \
             the daemons restart",
            list(&self.control),
            list(&self.nodes)
        )
    }
}

/// Every thread of every process on `host` to `cores`.
fn pin(b: &Bench, host: &str, cores: &CpuSet) {
    for tid in tids(b, host) {
        // A thread that ended meanwhile is no error.
        let _ = sched_setaffinity(Pid::from_raw(tid), cores);
    }
}

/// Every thread of every process on `host`.
fn tids(b: &Bench, host: &str) -> Vec<i32> {
    let mut tids = vec![];
    for pid in b.lab.host(host).ns().pids() {
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            tids.extend(
                tasks
                    .flatten()
                    .filter_map(|t| t.file_name().to_str()?.parse::<i32>().ok()),
            );
        }
    }
    tids
}

/// Runs the whole benchmark on a lab of its own; `progress` gets a line per step.
pub fn measure(
    agent_bin: &std::path::Path,
    opts: &Options,
    progress: &mut dyn FnMut(&str),
) -> Result<Results> {
    let restore = sched_getaffinity(Pid::from_raw(0))?;
    let cores = Cores::of(&restore);
    let r = measure_on(agent_bin, opts, cores.as_ref(), progress);
    sched_setaffinity(Pid::from_raw(0), &restore)?;
    r.map(|mut r| {
        r.cores = cores;
        r
    })
}

fn measure_on(
    agent_bin: &std::path::Path,
    opts: &Options,
    cores: Option<&Cores>,
    progress: &mut dyn FnMut(&str),
) -> Result<Results> {
    let mut b = Bench::start_with(agent_bin, &[LOAD_HOST])?;
    match cores {
        Some(c) => {
            c.split_up(&b)?;
            progress(&format!("cores: {}", c.describe()));
        }
        None => progress("cores: one only, shared by headscale and everything else"),
    }
    progress(&format!(
        "lab up: vpn-agent {} on fw, tailscaled {} on ts, both direct from op",
        b.agent_ip, b.ts_ip
    ));
    let mut r = Results::default();
    r.baseline.peers = 2;
    traffic(&b, &mut r.baseline, opts, false, progress)?;
    rss(&b, &mut r.baseline, progress)?;

    let churn = Load::start(
        &b.lab,
        LOAD_HOST,
        "churn",
        LOAD_USER,
        CHURNING,
        CHURNING,
        CHURN_PER_SEC,
    )?;
    to_background(&b, LOAD_HOST)?;
    if let Some(c) = cores {
        c.split_up(&b)?;
    }
    churn.wait("the churning nodes online", Duration::from_secs(120), |p| {
        p.registered_after_secs.is_some()
    })?;
    // Peers each daemon has besides the load: the operator and the other daemon.
    let mut peers = 2 + CHURNING;
    for &size in &opts.sizes {
        if size <= peers {
            bail!("size {size}: the tailnet already has {peers} peers");
        }
        let mut step = Step {
            peers: size,
            ..Step::default()
        };
        let res = step_to(
            &mut b,
            &churn,
            &mut step,
            size - peers,
            opts,
            cores,
            progress,
        );
        peers = size;
        if let Err(e) = res {
            b.lab.keep_logs();
            progress(&format!(
                "{size} peers: stopped: {e:#} (the lab's logs stay in {})",
                b.lab.dir().display()
            ));
            step.failed = Some(format!("{e:#}"));
            r.steps.push(step);
            break;
        }
        r.steps.push(step);
    }
    b.lab.stop(LOAD_HOST, &churn.log)?;
    Ok(r)
}

/// Grows the tailnet by `count` and measures both daemons at the new size. The churn is
/// frozen (SIGSTOP) while nodes register and the daemons restart: on two shared cores
/// headscale (v0.28, whose cost per batch of changes grows with the square of the nodes)
/// cannot keep up with both at once from about 1 000 nodes on.
fn step_to(
    b: &mut Bench,
    churn: &Load,
    step: &mut Step,
    count: usize,
    opts: &Options,
    cores: Option<&Cores>,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    if step.peers > opts.coming_and_going_up_to {
        // Pending while the load is stopped; taken at SIGCONT.
        b.lab.signal(LOAD_HOST, &churn.log, Signal::SIGUSR1)?;
        step.endpoints_only = true;
    }
    b.lab.signal(LOAD_HOST, &churn.log, Signal::SIGSTOP)?;
    if let Some(c) = cores {
        c.share(b)?;
    }
    let frozen = grow_and_restart(b, step, count, progress);
    if let Some(c) = cores {
        c.split_up(b)?;
    }
    b.lab.signal(LOAD_HOST, &churn.log, Signal::SIGCONT)?;
    frozen?;
    for t in Target::BOTH {
        b.wait_direct(t)?;
        if b.op.peer(b.ip(t)).is_ok_and(|p| p["Online"] != true) {
            progress(&format!(
                "{} peers: the operator lists {t} offline while its path is direct \
                 (headscale v0.28 marked it so when it reconnected)",
                step.peers
            ));
        }
    }
    if step.endpoints_only {
        // Their streams went offline first (one event each, headscale's restart had ended
        // most): the window counts endpoint changes alone.
        churn.wait(
            "the churning nodes offline, changing endpoints",
            Duration::from_secs(60),
            |p| p.endpoints_only && p.online == 0,
        )?;
    }
    let rebuilds = peer_map_rebuilds(b);
    cpu_under_churn(b, churn, step, opts, progress)?;
    traffic(b, step, opts, true, progress)?;
    // The same with the load frozen: what the size costs, apart from what the churn costs
    // the daemons and takes from them (headscale and the load share the machine's cores).
    b.lab.signal(LOAD_HOST, &churn.log, Signal::SIGSTOP)?;
    let quiet =
        cpu_quiet(b, step, opts, progress).and_then(|()| traffic(b, step, opts, false, progress));
    b.lab.signal(LOAD_HOST, &churn.log, Signal::SIGCONT)?;
    quiet?;
    if let (Some(before), Some(after)) = (rebuilds, peer_map_rebuilds(b)) {
        let (n, secs) = (after.0.saturating_sub(before.0), after.1 - before.1);
        step.peer_map_rebuilds = Some((n, secs));
        progress(&format!(
            "{} peers: headscale rebuilt its peer map {n} times meanwhile, {:.2} s each",
            step.peers,
            secs / n.max(1) as f64
        ));
    }
    rss(b, step, progress)
}

/// headscale's peer-map rebuilds since it started: how many, and their time in all.
fn peer_map_rebuilds(b: &Bench) -> Option<(u64, f64)> {
    let text = b.lab.headscale().metrics().ok()?;
    let count = metric_value(&text, &format!("{PEER_MAP_METRIC}_count"))?;
    let sum = metric_value(&text, &format!("{PEER_MAP_METRIC}_sum"))?;
    Some((count as u64, sum))
}

/// Registers `count` nodes; waits for both daemons to list them (180 s at most: how far
/// each got is a result); restarts both and waits until they list every node again.
fn grow_and_restart(
    b: &mut Bench,
    step: &mut Step,
    count: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    let size = step.peers;
    grow(b, step, count, progress)?;
    // How long each takes to learn of the new nodes; then both are restarted, once that
    // is over, not into headscale's backlog.
    let seen = wait_peers(b, size, Duration::from_secs(180))?;
    for (i, t) in Target::BOTH.into_iter().enumerate() {
        let (count, after) = seen[i];
        step.get_mut(t).caught_up = after;
        step.get_mut(t).listed = count;
        progress(&format!(
            "{size} peers: {t} {}",
            match after {
                Some(d) => format!(
                    "listed every node {:.0} s after the registrations",
                    d.as_secs_f64()
                ),
                None => format!("listed {count} of {size} after 180 s"),
            }
        ));
    }
    restart(b, step, progress)?;
    let seen = wait_peers(b, size, Duration::from_secs(300))?;
    if let Some((t, (count, _))) = Target::BOTH
        .into_iter()
        .zip(seen)
        .find(|(_, s)| s.1.is_none())
    {
        bail!("{t} lists {count} of {size} peers 300 s after its restart");
    }
    Ok(())
}

/// Registers `count` more nodes (never online), or seeds them when they are many
/// ([`REGISTER_AT_MOST`]), and records the size of the first map.
fn grow(b: &Bench, step: &mut Step, count: usize, progress: &mut dyn FnMut(&str)) -> Result<()> {
    if count > REGISTER_AT_MOST {
        step.seeded = count;
        return seed(b, step, progress);
    }
    let name = format!("reg{}", step.peers);
    let load = Load::register(
        &b.lab,
        LOAD_HOST,
        &name,
        LOAD_USER,
        count,
        REGISTER_PARALLEL,
    )?;
    to_background(b, LOAD_HOST)?;
    let registered = load.wait(&format!("{count} nodes registered"), REGISTER_LIMIT, |p| {
        p.first_map_zstd_bytes.is_some() || p.errors > 0
    });
    let p = load.progress();
    b.lab.stop(LOAD_HOST, &load.log)?;
    if registered.is_err() {
        bail!(
            "headscale registered {} of the {count} new nodes in {} s (64 at a time)",
            p.registered,
            REGISTER_LIMIT.as_secs()
        );
    }
    if p.errors > 0 {
        bail!("registering {count} nodes: {:?}", p.last_error);
    }
    step.map_zstd_bytes = p.first_map_zstd_bytes.unwrap_or_default();
    step.map_json_bytes = p.first_map_json_bytes.unwrap_or_default();
    progress(&format!(
        "{} peers: {count} more nodes registered in {:.0} s; a first map is {:.2} MB zstd, {:.2} MB JSON",
        step.peers,
        p.registered_after_secs.unwrap_or_default(),
        step.map_zstd_bytes as f64 / 1e6,
        step.map_json_bytes as f64 / 1e6
    ));
    Ok(())
}

/// Writes `step.seeded` nodes into headscale's database, headscale stopped meanwhile. The
/// daemons and the load lose their streams and come back as from a headscale restart.
fn seed(b: &Bench, step: &Step, progress: &mut dyn FnMut(&str)) -> Result<()> {
    let hs = b.lab.headscale();
    let started = Instant::now();
    b.lab.stop_headscale()?;
    // Copies of a node an earlier step registered.
    let seeded = hs.seed_nodes("reg%", &format!("seed{}", step.peers), step.seeded);
    b.lab.start_headscale_within(HEADSCALE_START_LIMIT)?;
    seeded?;
    progress(&format!(
        "{} peers: {} nodes written into headscale's database, headscale back up after {:.0} s",
        step.peers,
        step.seeded,
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Every thread of every process on `host` to nice 19 (threads made later inherit it).
fn to_background(b: &Bench, host: &str) -> Result<()> {
    let tids = tids(b, host);
    if !tids.is_empty() {
        crate::cmd::run_quiet(
            std::process::Command::new("renice")
                .args(["-n", "19", "-p"])
                .args(tids.iter().map(i32::to_string)),
        )?;
    }
    Ok(())
}

/// Restarts both daemons together, each with its node key but no netmap, so both wait for
/// the same headscale; times each to `Running`.
fn restart(b: &mut Bench, step: &mut Step, progress: &mut dyn FnMut(&str)) -> Result<()> {
    let (fw, ts) = (super::AGENT_HOST, super::TS_HOST);
    b.lab.stop(fw, AGENT_LOG)?;
    b.lab.stop(ts, "tailscaled")?;
    let state = b.agent_root.join("var/lib/vpn-agent");
    let _ = std::fs::remove_file(vpn_agent::control::cache::path(&state));
    // The new agent's log starts afresh; the old one stays beside it.
    let dir = b.lab.host_dir(fw);
    let _ = std::fs::rename(
        dir.join(format!("{AGENT_LOG}.log")),
        dir.join(format!("{AGENT_LOG}-before-{}.log", step.peers)),
    );
    let agent_start = Instant::now();
    b.lab.spawn(
        fw,
        AGENT_LOG,
        agent_command_with(&b.lab, fw, &b.agent_root, &b.agent_bin)?,
    )?;
    let ts_start = Instant::now();
    b.ts = b.lab.start_tailscaled(ts)?;
    let (mut agent, mut tailscaled) = (None, None);
    while agent.is_none() || tailscaled.is_none() {
        // Not running yet, or its socket not up yet: both mean keep polling.
        if agent.is_none()
            && agent_status(&b.lab, fw).is_ok_and(|s| s["backend_state"] == "Running")
        {
            agent = Some(agent_start.elapsed());
        }
        if tailscaled.is_none() && b.ts.status().is_ok_and(|s| s["BackendState"] == "Running") {
            tailscaled = Some(ts_start.elapsed());
        }
        if agent_start.elapsed() > RUNNING_LIMIT {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    step.restarted = true;
    step.agent.to_running = agent;
    step.tailscaled.to_running = tailscaled;
    if let Some(t) = Target::BOTH
        .into_iter()
        .find(|&t| step.get(t).to_running.is_none())
    {
        bail!("{t} not Running within {RUNNING_LIMIT:?} of its restart");
    }
    // The operator's stock tailscaled too, untimed: headscale (v0.28) may have given up on its
    // stream under the registrations, and without the restarted daemons' new disco keys it
    // finds no path to them.
    b.lab.stop(super::OP_HOST, "tailscaled")?;
    b.op = b.lab.start_tailscaled(super::OP_HOST)?;
    let start = Instant::now();
    while !b.op.status().is_ok_and(|s| s["BackendState"] == "Running") {
        if start.elapsed() > RUNNING_LIMIT {
            bail!("the operator's tailscaled is not Running {RUNNING_LIMIT:?} after its restart");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (applied, bytes) = first_map(b)?;
    step.agent.first_map_applied = Some(applied);
    if step.seeded > 0 {
        step.map_zstd_bytes = bytes;
    }
    for t in Target::BOTH {
        progress(&format!(
            "{} peers: {t} Running {:.2} s after its start",
            step.peers,
            step.get(t).to_running.unwrap_or_default().as_secs_f64()
        ));
    }
    Ok(())
}

/// `first_map_applied_ms` and `first_map_bytes` from the agent's "map stream open" line,
/// once it is logged.
fn first_map(b: &Bench) -> Result<(Duration, u64)> {
    let start = Instant::now();
    loop {
        let log = b.lab.log(super::AGENT_HOST, AGENT_LOG);
        if let (Some(ms), Some(bytes)) = (
            map_open_field(&log, "first_map_applied_ms"),
            map_open_field(&log, "first_map_bytes"),
        ) {
            return Ok((Duration::from_millis(ms), bytes));
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("the agent logged no \"map stream open\" with first_map_applied_ms");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until both daemons list at least `peers` peers, for up to `limit`: per daemon, how
/// many it listed last and when it first listed them all.
fn wait_peers(b: &Bench, peers: usize, limit: Duration) -> Result<[(usize, Option<Duration>); 2]> {
    let start = Instant::now();
    let mut seen = [(0, None); 2];
    loop {
        let agent = agent_status(&b.lab, super::AGENT_HOST)?["peers"]
            .as_array()
            .map_or(0, |p| p.len());
        let ts = b.ts.status()?["Peer"].as_object().map_or(0, |p| p.len());
        for (i, count) in [agent, ts].into_iter().enumerate() {
            seen[i].0 = count;
            if count >= peers && seen[i].1.is_none() {
                seen[i].1 = Some(start.elapsed());
            }
        }
        if seen.iter().all(|s| s.1.is_some()) || start.elapsed() > limit {
            return Ok(seen);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// What both daemons did over one window.
struct Window {
    /// CPU time (seconds).
    cpu: [f64; 2],
    /// Map updates each received.
    updates: [u64; 2],
    /// The agent's own count over the window, with the longest apply since its start.
    agent: MapUpdates,
}

/// Both daemons' CPU time and map updates over the same window of `secs`. The updates are
/// read outside the CPU window: the agent's status holds every peer, and making it costs
/// the agent CPU time.
fn window(b: &Bench, secs: u32) -> Result<Window> {
    let tick = clock_ticks()?;
    let pids = [b.pid(Target::Agent)?, b.pid(Target::Tailscaled)?];
    let (agent0, ts0) = map_updates(b)?;
    let cpu0 = [cpu_ticks(pids[0])?, cpu_ticks(pids[1])?];
    std::thread::sleep(Duration::from_secs(secs.into()));
    let cpu1 = [cpu_ticks(pids[0])?, cpu_ticks(pids[1])?];
    let (agent1, ts1) = map_updates(b)?;
    Ok(Window {
        cpu: [0, 1].map(|i| (cpu1[i] - cpu0[i]) as f64 / tick),
        updates: [
            agent1.count.saturating_sub(agent0.count),
            ts1.saturating_sub(ts0),
        ],
        agent: MapUpdates {
            count: agent1.count.saturating_sub(agent0.count),
            peers: agent1.peers.saturating_sub(agent0.peers),
            apply_micros: agent1.apply_micros.saturating_sub(agent0.apply_micros),
            apply_max_micros: agent1.apply_max_micros,
        },
    })
}

/// The map updates each daemon counted since its start: the agent's status, and tailscaled's
/// client metric (absent until it first counts).
fn map_updates(b: &Bench) -> Result<(MapUpdates, u64)> {
    let status = agent_status(&b.lab, super::AGENT_HOST)?;
    let agent: MapUpdates = serde_json::from_value(status["map_updates"].clone())?;
    let metrics = crate::cmd::run_quiet(b.ts.cli().args(["debug", "metrics"]))?;
    let ts = metric_value(&metrics, TS_MAP_UPDATES).unwrap_or(0.0) as u64;
    Ok((agent, ts))
}

/// Both daemons' CPU time over one window of churn alone, and the churn events in it.
fn cpu_under_churn(
    b: &Bench,
    churn: &Load,
    step: &mut Step,
    opts: &Options,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    let p0 = churn.progress();
    let w = window(b, step.window_secs(opts))?;
    let p = churn.progress();
    // What headscale fails is reported, not fatal: the daemons are measured under the
    // churn that did happen.
    step.churn_errors = p.errors - p0.errors;
    step.churn_error = p.last_error.clone().filter(|_| step.churn_errors > 0);
    step.churn_events = Some(p.churn_events() - p0.churn_events());
    if step.churn_events == Some(0) {
        // Unexpected, and only headscale's log says why.
        b.lab.keep_logs();
        progress(&format!(
            "{} peers: no churn went through (the load: {p:?}); the lab's logs stay in {}",
            step.peers,
            b.lab.dir().display()
        ));
    }
    for (i, t) in Target::BOTH.into_iter().enumerate() {
        let d = step.get_mut(t);
        d.churn_window = Usage {
            cpu: w.cpu[i],
            updates: w.updates[i],
        };
        progress(&format!(
            "{} peers: {t} used {:.2} s CPU in {} s of churn ({} changes from the load, {} map \
             updates received)",
            step.peers,
            w.cpu[i],
            step.window_secs(opts),
            step.churn_events.unwrap_or_default(),
            w.updates[i]
        ));
    }
    let a = w.agent;
    if a.count > 0 {
        let mean = a.apply_micros as f64 / a.count as f64;
        step.agent.apply_micros = Some((mean, a.apply_max_micros));
        progress(&format!(
            "{} peers: vpn-agent applied an update in {mean:.0} µs on average ({} peers named \
             in all), {} µs at most since its start",
            step.peers, a.peers, a.apply_max_micros
        ));
    }
    Ok(())
}

/// Both daemons' CPU time over a window as long, with the load frozen.
fn cpu_quiet(
    b: &Bench,
    step: &mut Step,
    opts: &Options,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    let w = window(b, step.window_secs(opts))?;
    for (i, t) in Target::BOTH.into_iter().enumerate() {
        let d = step.get_mut(t);
        d.quiet_window = Some(Usage {
            cpu: w.cpu[i],
            updates: w.updates[i],
        });
        progress(&format!(
            "{} peers: {t} used {:.2} s CPU in {} s quiet ({} map updates received); {} per \
             1000 updates beyond that",
            step.peers,
            w.cpu[i],
            step.window_secs(opts),
            w.updates[i],
            step.cpu_per_1000(t)
                .map_or("-".into(), |c| format!("{c:.2} s"))
        ));
    }
    Ok(())
}

/// Ping, then iperf3 both ways, from op to each daemon; recorded as `churning` or quiet.
fn traffic(
    b: &Bench,
    step: &mut Step,
    opts: &Options,
    churning: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    for t in Target::BOTH {
        b.warm_up(b.ip(t))?;
        let rtt = b.ping(b.ip(t), opts.pings, "0.05")?;
        let median_of_runs = |reverse: bool| -> Result<f64> {
            let runs = (0..opts.iperf_reps.max(1))
                .map(|_| Ok(b.iperf(b.ip(t), reverse, opts.iperf_secs)?.bits_per_second))
                .collect::<Result<Vec<f64>>>()?;
            Ok(super::median(&runs))
        };
        let forward = median_of_runs(false)?;
        let reverse = median_of_runs(true)?;
        progress(&format!(
            "{} peers{}: {t}: ping {:.3} ms (loss {}%), op sends {:.2} Gbit/s, {t} sends {:.2} Gbit/s",
            step.peers,
            if churning { ", churning" } else { ", quiet" },
            rtt.avg,
            rtt.loss_percent,
            forward / 1e9,
            reverse / 1e9
        ));
        let d = step.get_mut(t);
        let into = if churning {
            &mut d.churning
        } else {
            &mut d.quiet
        };
        *into = Traffic {
            rtt,
            forward,
            reverse,
        };
    }
    Ok(())
}

fn rss(b: &Bench, step: &mut Step, progress: &mut dyn FnMut(&str)) -> Result<()> {
    for t in Target::BOTH {
        let kib = peak_rss_kib(b.pid(t)?)?;
        progress(&format!(
            "{} peers: peak RSS of {t}: {:.1} MiB",
            step.peers,
            kib as f64 / 1024.0
        ));
        step.get_mut(t).peak_rss_kib = kib;
    }
    Ok(())
}

impl Results {
    /// Per size and daemon: the map updates each received in the CPU windows, their CPU
    /// cost, and the agent's own time per update.
    fn updates_table(&self) -> String {
        let mut t = String::from(
            "\n| peers | daemon | map updates, quiet / churning | CPU, quiet / churning | CPU per 1000 updates | update applied, mean / longest |\n\
             |---|---|---|---|---|---|\n",
        );
        for s in self.steps.iter().filter(|s| s.churn_events.is_some()) {
            for target in Target::BOTH {
                let d = s.get(target);
                let per = s
                    .cpu_per_1000(target)
                    .map_or("-".into(), |per| format!("{per:.2} s"));
                let applied = d
                    .apply_micros
                    .map_or("-".into(), |(mean, max)| format!("{mean:.0} µs / {max} µs"));
                let (updates_quiet, cpu_quiet) =
                    d.quiet_window.map_or(("-".into(), "-".into()), |q| {
                        (q.updates.to_string(), format!("{:.2} s", q.cpu))
                    });
                t.push_str(&format!(
                    "| {} | {target} | {updates_quiet} / {} | {cpu_quiet} / {:.2} s | {per} | {applied} |\n",
                    s.peers, d.churn_window.updates, d.churn_window.cpu,
                ));
            }
        }
        t
    }

    /// The README tables: the control side per size and daemon, then the data plane against
    /// the same daemon with only two peers.
    pub fn table(&self) -> String {
        let mut t = String::from(
            "| peers | first map (zstd / JSON) | daemon | new nodes listed | start → Running | first map → applied | peak RSS |\n\
             |---|---|---|---|---|---|---|\n",
        );
        for s in std::iter::once(&self.baseline).chain(&self.steps) {
            let is_base = std::ptr::eq(s, &self.baseline);
            for target in Target::BOTH {
                let d = s.get(target);
                let listed = match (is_base, d.caught_up) {
                    (true, _) => "-".to_string(),
                    (false, Some(after)) => format!("all within {:.0} s", after.as_secs_f64()),
                    (false, None) if d.listed > 0 => {
                        format!("{} of {} after 180 s", d.listed, s.peers)
                    }
                    (false, None) => "-".to_string(),
                };
                let (map, running) = if is_base || !s.restarted {
                    ("-".to_string(), "-".to_string())
                } else {
                    (
                        if s.map_json_bytes > 0 || s.seeded == 0 {
                            format!(
                                "{:.2} MB / {:.2} MB",
                                s.map_zstd_bytes as f64 / 1e6,
                                s.map_json_bytes as f64 / 1e6
                            )
                        } else {
                            format!("{:.2} MB / -", s.map_zstd_bytes as f64 / 1e6)
                        },
                        d.to_running
                            .map_or(format!("not within {} s", RUNNING_LIMIT.as_secs()), |r| {
                                format!("{:.2} s", r.as_secs_f64())
                            }),
                    )
                };
                let applied = d
                    .first_map_applied
                    .map_or("-".into(), |a| format!("{} ms", a.as_millis()));
                let rss = if d.peak_rss_kib > 0 {
                    format!("{:.1} MiB", d.peak_rss_kib as f64 / 1024.0)
                } else {
                    "-".into()
                };
                t.push_str(&format!(
                    "| {} | {map} | {target} | {listed} | {running} | {applied} | {rss} |\n",
                    s.peers,
                ));
            }
        }
        t.push_str(&self.updates_table());
        t.push_str(
            "\n| peers | daemon | ping avg, quiet / churning | op sends, quiet / churning | daemon sends, quiet / churning |\n\
             |---|---|---|---|---|\n",
        );
        let measured = |s: &&Step| s.agent.quiet.forward > 0.0;
        for s in std::iter::once(&self.baseline)
            .chain(&self.steps)
            .filter(measured)
        {
            let is_base = std::ptr::eq(s, &self.baseline);
            for target in Target::BOTH {
                let (d, base) = (s.get(target), &self.baseline.get(target).quiet);
                let gbit = |v: f64, b: f64| {
                    if is_base {
                        format!("{:.2} Gbit/s", v / 1e9)
                    } else {
                        format!("{:.2} Gbit/s ({:.2})", v / 1e9, v / b)
                    }
                };
                let pair = |q: String, c: String| if is_base { q } else { format!("{q} / {c}") };
                t.push_str(&format!(
                    "| {} | {target} | {} | {} | {} |\n",
                    s.peers,
                    pair(
                        format!("{:.3} ms", d.quiet.rtt.avg),
                        format!("{:.3} ms", d.churning.rtt.avg)
                    ),
                    pair(
                        gbit(d.quiet.forward, base.forward),
                        gbit(d.churning.forward, base.forward)
                    ),
                    pair(
                        gbit(d.quiet.reverse, base.reverse),
                        gbit(d.churning.reverse, base.reverse)
                    ),
                ));
            }
        }
        if let Some(c) = &self.cores {
            t.push_str(&format!(
                "\nCores: {}; the 2-peer figures too.\n",
                c.describe()
            ));
        }
        for s in self.steps.iter().filter(|s| s.seeded > 0) {
            t.push_str(&format!(
                "\nAt {} peers, the {} new nodes were written into headscale's database while \
                 it was stopped, not registered over ts2021; the first map's size is the \
                 agent's, as received.\n",
                s.peers, s.seeded
            ));
        }
        for s in self.steps.iter().filter(|s| s.endpoints_only) {
            t.push_str(&format!(
                "\nAt {} peers, the {CHURNING} churning nodes only changed endpoints (a lite map \
                 request each, which headscale passes on as a patch), offline: a node coming \
                 online costs headscale a full map of every node, which it does not make several \
                 times a second at this size (with nodes coming and going, no churn at all went \
                 through at 5 000). Each CPU window lasted {ENDPOINTS_ONLY_WINDOW_SECS} s: \
                 headscale passes a change on only once it has rebuilt its peer map.\n",
                s.peers
            ));
        }
        let rebuilds: Vec<String> = self
            .steps
            .iter()
            .filter_map(|s| {
                let (n, secs) = s.peer_map_rebuilds?;
                Some(if n == 0 {
                    format!("{}: none", s.peers)
                } else {
                    format!("{}: {n} × {:.2} s", s.peers, secs / n as f64)
                })
            })
            .collect();
        if !rebuilds.is_empty() {
            t.push_str(&format!(
                "\nheadscale rebuilt its peer map (every pair of nodes, at each batch of node \
                 changes; its `{PEER_MAP_METRIC}`) while the CPU and traffic windows ran, by \
                 size: {}.\n",
                rebuilds.join("; ")
            ));
        }
        for s in self.steps.iter().filter(|s| s.churn_events == Some(0)) {
            // Each node that comes online costs headscale a full map of every node: past
            // some size it cannot serve the load's rate, and the daemons are measured under
            // the churn that was asked for, not under the churn that went through.
            t.push_str(&format!(
                "\nAt {} peers, none of the load's churn events went through while CPU time was \
                 counted: headscale answered no new map stream nor endpoint update in that time.\n",
                s.peers
            ));
        }
        for s in self.steps.iter().filter(|s| s.churn_errors > 0) {
            t.push_str(&format!(
                "\nAt {} peers, headscale failed {} of the load's churn events while CPU time \
                 was counted ({} went through; the last error: {}).\n",
                s.peers,
                s.churn_errors,
                s.churn_events.unwrap_or_default(),
                s.churn_error.as_deref().unwrap_or("-")
            ));
        }
        for s in &self.steps {
            if let Some(why) = &s.failed {
                // The first line: an error may carry a log's tail after it.
                let why = why.lines().next().unwrap_or_default();
                t.push_str(&format!("\nThe run stopped at {} peers: {why}.\n", s.peers));
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cost_per_update_counts_the_updates_the_daemon_received_not_the_loads_events() {
        let mut s = Step {
            churn_events: Some(95),
            agent: daemon(1.0, 1, 1.0),
            ..Step::default()
        };
        // At 5 000 (run of 189ae27) headscale passed on in the frozen window what it had
        // held up: more updates there, and more CPU.
        let usage = |cpu, updates| Usage { cpu, updates };
        s.agent.churn_window = usage(0.37, 4);
        s.agent.quiet_window = Some(usage(0.59, 6));
        assert_eq!(s.cpu_per_1000(Target::Agent), None);
        s.agent.churn_window = usage(0.37, 6);
        assert_eq!(s.cpu_per_1000(Target::Agent), None, "no more updates");
        (s.agent.churn_window, s.agent.quiet_window) = (usage(0.37, 110), Some(usage(0.59, 10)));
        assert_eq!(s.cpu_per_1000(Target::Agent), None, "cost less");
        s.agent.quiet_window = Some(usage(0.17, 10));
        assert!((s.cpu_per_1000(Target::Agent).unwrap() - 2.0).abs() < 1e-9);
        // A run that stopped before the frozen window (c3dd0d9 at 5 000) has no cost.
        s.agent.quiet_window = None;
        assert_eq!(s.cpu_per_1000(Target::Agent), None);
    }

    #[test]
    fn cores_split_in_halves_and_one_core_is_not_split() {
        assert_eq!(Cores::split(&[3]), None);
        assert_eq!(
            Cores::split(&[0, 1]),
            Some(Cores {
                control: vec![0],
                nodes: vec![1]
            })
        );
        let c = Cores::split(&[0, 2, 4, 6, 7]).unwrap();
        assert_eq!((c.control, c.nodes), (vec![0, 2], vec![4, 6, 7]));
    }

    fn daemon(running: f64, rss: u64, gbit: f64) -> Daemon {
        let t = |g: f64| Traffic {
            rtt: Rtt {
                avg: 0.5,
                ..Rtt::default()
            },
            forward: g * 1e9,
            reverse: g * 1e9,
        };
        Daemon {
            caught_up: Some(Duration::from_secs(3)),
            listed: 0,
            to_running: Some(Duration::from_secs_f64(running)),
            first_map_applied: None,
            peak_rss_kib: rss,
            churn_window: Usage {
                cpu: 1.5,
                updates: 260,
            },
            quiet_window: Some(Usage {
                cpu: 0.5,
                updates: 10,
            }),
            apply_micros: None,
            quiet: t(gbit),
            churning: t(gbit / 2.0),
        }
    }

    #[test]
    fn tables_have_a_row_per_size_and_daemon_with_ratios_to_two_peers() {
        let r = Results {
            baseline: Step {
                peers: 2,
                agent: daemon(0.0, 10240, 2.0),
                tailscaled: daemon(0.0, 102400, 1.0),
                ..Step::default()
            },
            steps: vec![Step {
                peers: 5000,
                map_zstd_bytes: 700_000,
                map_json_bytes: 3_750_000,
                churn_events: Some(250),
                endpoints_only: true,
                peer_map_rebuilds: Some((3, 114.0)),
                churn_errors: 3,
                churn_error: Some("churn-7: control: no answer within 30s".into()),
                agent: Daemon {
                    apply_micros: Some((42.2, 310)),
                    ..daemon(1.25, 40960, 1.9)
                },
                tailscaled: daemon(3.5, 409600, 1.0),
                restarted: true,
                seeded: 4898,
                failed: None,
            }],
            cores: Some(Cores {
                control: vec![0],
                nodes: vec![1],
            }),
        };
        let mut stopped = Step {
            peers: 10000,
            restarted: true,
            failed: Some("tailscaled not Running within 180s of its restart".into()),
            ..Step::default()
        };
        stopped.agent.to_running = Some(Duration::from_secs(2));
        stopped.agent.caught_up = Some(Duration::from_secs(9));
        stopped.tailscaled.listed = 4000;
        let mut r = r;
        r.steps.push(stopped);
        assert!(
            r.table()
                .contains("At 5000 peers, the 50 churning nodes only changed endpoints")
                && r.table().contains("by size: 5000: 3 × 38.00 s.")
                && !r.table().contains("At 10000 peers, the 50"),
            "{}",
            r.table()
        );
        let mut no_churn = r.clone();
        no_churn.steps[0].churn_events = Some(0);
        let t = no_churn.table();
        assert!(
            t.contains("At 5000 peers, none of the load's churn events went through")
                && !t.contains("At 10000 peers, none"),
            "{t}"
        );
        assert!(
            t.contains("| 5000 | 0.70 MB / 3.75 MB | vpn-agent | all within 3 s | 1.25 s | - | 40.0 MiB |\n"),
            "{t}"
        );
        let t = r.table();
        assert!(
            t.contains("| 10000 | 0.00 MB / 0.00 MB | tailscaled | 4000 of 10000 after 180 s | not within 300 s | - | - |\n"),
            "{t}"
        );
        assert!(
            t.contains("| 10000 | 0.00 MB / 0.00 MB | vpn-agent | all within 9 s | 2.00 s |"),
            "{t}"
        );
        assert!(
            !t.contains("| 10000 | vpn-agent |"),
            "no traffic measured: {t}"
        );
        assert!(
            t.contains(
                "At 5000 peers, headscale failed 3 of the load's churn events while CPU time was \
                 counted (250 went through; the last error: churn-7: control: no answer within \
                 30s)."
            ),
            "{t}"
        );
        assert!(
            t.contains(
                "The run stopped at 10000 peers: tailscaled not Running within 180s of its restart."
            ),
            "{t}"
        );
        assert!(
            t.contains(
                "| 5000 | vpn-agent | 10 / 260 | 0.50 s / 1.50 s | 4.00 s | 42 µs / 310 µs |"
            ),
            "{t}"
        );
        assert!(
            t.contains("| 5000 | tailscaled | 10 / 260 | 0.50 s / 1.50 s | 4.00 s | - |"),
            "{t}"
        );
        assert!(
            !t.contains("| 10000 | vpn-agent | 0 / 0"),
            "no CPU windows at 10000: {t}"
        );
        assert!(
            t.contains("| 2 | - | tailscaled | - | - | - | 100.0 MiB |\n"),
            "{t}"
        );
        assert!(
            t.contains(
                "Cores: headscale and the load on core 0, the daemons, the operator, iperf3 and \
                 ping on core 1 while anything is measured; all cores for all while nodes \
                 register and the daemons restart; the 2-peer figures too."
            ),
            "{t}"
        );
        assert!(
            t.contains("At 5000 peers, the 4898 new nodes were written into headscale's database"),
            "{t}"
        );
        let log = "x INFO vpn_agent::daemon: map stream open server=https://192.0.2.1:443 \
                   endpoints=[] home_derp=0 first_map_bytes=700 first_map_applied_ms=142\n";
        assert_eq!(map_open_field(log, "first_map_applied_ms"), Some(142));
        assert_eq!(map_open_field(log, "first_map_bytes"), Some(700));
        assert_eq!(
            map_open_field("map stream open server=x", "first_map_bytes"),
            None
        );
        assert!(
            t.contains("| 5000 | vpn-agent | 0.500 ms / 0.500 ms | 1.90 Gbit/s (0.95) / 0.95 Gbit/s (0.47) |"),
            "{t}"
        );
        assert!(
            t.contains("| 2 | vpn-agent | 0.500 ms | 2.00 Gbit/s | 2.00 Gbit/s |"),
            "{t}"
        );
    }
}
