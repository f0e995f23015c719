//! The subnet-router line of `cargo xtask bench`: iperf3 from an operator's stock tailscaled
//! (`--accept-routes`) to a host on a management network, through a router host running
//! `vpn-agent` with `AdvertiseRoutes`, then through the same host running a stock tailscaled
//! with `--advertise-routes` instead.
//!
//! | host | address | runs |
//! |---|---|---|
//! | `rtr` | 192.0.2.11, 198.51.100.1 | `vpn-agent` (release build), later a stock tailscaled |
//! | `op` | 192.0.2.12 | the operator's stock tailscaled, the iperf3 client |
//! | `bmc` | 198.51.100.10 (management network only) | `iperf3 -s` |
//!
//! Each router gets a lab of its own. The agent masquerades into the network; the lab's
//! tailscaled runs with `--netfilter-mode=off`, so it cannot, and `bmc` gets a route back to
//! the mesh instead.

use super::{iperf, median, wait_direct};
use crate::{Lab, LabOptions, cmd, firewall};
use anyhow::{Result, bail};
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

const ROUTER: &str = "rtr";
const OP: &str = "op";
const BMC: &str = "bmc";
const MACHINE: &str = "0cfc7e24-aaaa-4bbb-8ccc-0000000000b2";
const NET: &str = "198.51.100.0/24";

/// Throughput op → bmc and back, per router (bit/s, one per run).
#[derive(Debug, Clone, Default)]
pub struct Results {
    pub seconds: u32,
    pub agent: (Vec<f64>, Vec<f64>),
    pub tailscaled: (Vec<f64>, Vec<f64>),
}

/// Runs both routers in turn, `reps` iperf3 runs of `seconds` per direction each.
pub fn measure(
    agent_bin: &Path,
    seconds: u32,
    reps: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<Results> {
    let mut r = Results {
        seconds,
        ..Results::default()
    };
    {
        let (lab, bmc) = router_lab()?;
        let extra = ["--advertise-routes", NET];
        let (_, ip) =
            firewall::start_firewall_with(&lab, ROUTER, MACHINE, "bench", &extra, agent_bin)?;
        lab.headscale().approve_routes(MACHINE, &[NET])?;
        let op = lab.join_tailscaled_with(OP, "ops", &["--accept-routes"])?;
        wait_direct(&op, ip, &lab.host(ROUTER))?;
        r.agent = runs(&lab, bmc, seconds, reps, "vpn-agent", progress)?;
    }
    // A lab of its own, so nothing of the agent's (table, conntrack, the node) is left over.
    let (lab, bmc) = router_lab()?;
    cmd::run_quiet(
        lab.host(ROUTER)
            .ns()
            .command("sysctl")
            .args(["-qw", "net.ipv4.ip_forward=1"]),
    )?;
    lab.host(BMC)
        .ns()
        .ip(&["route", "add", "100.64.0.0/10", "via", "198.51.100.1"])?;
    let ts = lab.join_tailscaled_with(ROUTER, "subnet", &[&format!("--advertise-routes={NET}")])?;
    lab.headscale().approve_routes(ROUTER, &[NET])?;
    let op = lab.join_tailscaled_with(OP, "ops", &["--accept-routes"])?;
    wait_direct(&op, ts.ipv4()?, &lab.host(ROUTER))?;
    r.tailscaled = runs(&lab, bmc, seconds, reps, "tailscaled", progress)?;
    Ok(r)
}

/// The router, the operator, and bmc on the router's management network with `iperf3 -s`.
fn router_lab() -> Result<(Lab, IpAddr)> {
    let lab = Lab::start(LabOptions {
        lan: Some((ROUTER.into(), vec![BMC.into()])),
        ..LabOptions::hosts(&[ROUTER, OP])
    })?;
    let mut c = lab.host(BMC).ns().command("iperf3");
    c.arg("-s");
    lab.spawn(BMC, "iperf3", c)?;
    Ok((lab, crate::lab::lan_addr(0).into()))
}

/// `reps` runs each way, after waiting until bmc answers through the router at all.
fn runs(
    lab: &Lab,
    bmc: IpAddr,
    seconds: u32,
    reps: usize,
    who: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<(Vec<f64>, Vec<f64>)> {
    let start = Instant::now();
    while iperf(&lab.host(OP).ns(), bmc, false, 1).is_err() {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("bmc never answered through {who}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let (mut fwd, mut rev) = (vec![], vec![]);
    for _ in 0..reps {
        for (reverse, out) in [(false, &mut fwd), (true, &mut rev)] {
            let run = iperf(&lab.host(OP).ns(), bmc, reverse, seconds)?;
            let dir = if reverse { "<-" } else { "->" };
            progress(&format!(
                "op {dir} bmc through {who}: {:.3} Gbit/s",
                run.bits_per_second / 1e9
            ));
            out.push(run.bits_per_second);
        }
    }
    Ok((fwd, rev))
}

impl Results {
    /// The markdown table for the README.
    pub fn table(&self) -> String {
        let gbit = |v: &[f64]| format!("{:.2} Gbit/s", median(v) / 1e9);
        let ratio = |x: &[f64], y: &[f64]| {
            let (x, y) = (median(x), median(y));
            if y > 0.0 {
                format!("{:.2}", x / y)
            } else {
                "n/a".into()
            }
        };
        let runs = self.agent.0.len();
        let mut s = String::from(
            "| op → bmc through the subnet router | vpn-agent | tailscaled | agent / tailscaled |\n\
             |---|---|---|---|\n",
        );
        for (what, a, t) in [
            ("op sends (iperf3)", &self.agent.0, &self.tailscaled.0),
            ("bmc sends (iperf3 -R)", &self.agent.1, &self.tailscaled.1),
        ] {
            s.push_str(&format!(
                "| TCP throughput, {what}, median of {runs} × {} s | {} | {} | {} |\n",
                self.seconds,
                gbit(a),
                gbit(t),
                ratio(a, t)
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_medians_and_ratios() {
        let r = Results {
            seconds: 5,
            agent: (vec![2e9, 3e9, 1e9], vec![1e9]),
            tailscaled: (vec![1e9, 1e9, 1e9], vec![2e9]),
        };
        let t = r.table();
        assert!(t.contains("| TCP throughput, op sends (iperf3), median of 3 × 5 s | 2.00 Gbit/s | 1.00 Gbit/s | 2.00 |"), "{t}");
        assert!(t.contains("| 1.00 Gbit/s | 2.00 Gbit/s | 0.50 |"), "{t}");
    }
}
