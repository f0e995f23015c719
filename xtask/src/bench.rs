//! `cargo xtask bench`: runs the benchmarks and writes their tables into the README between
//! markers, so the numbers there are always ones this command measured.

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

/// Which benchmark `cargo xtask bench` runs; all when none is named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    /// userdata-gen's generation, no network.
    UserdataGen,
    /// iperf3 and ping through vpn-agent against a stock tailscaled, in the lab.
    Dataplane,
    /// What junk on the agent's UDP port costs per packet, no network.
    Flood,
    /// iperf3 through vpn-agent as a subnet router against a stock tailscaled, in the lab.
    Subnet,
    /// A large tailnet's first map and patches in the agent, no network.
    Patch,
    /// vpn-agent against a stock tailscaled in a tailnet of 100 to 5 000 churning nodes, in
    /// the lab.
    Scale,
}

pub fn run(which: Option<Which>, profile: bool, sizes: Vec<usize>) -> Result<()> {
    if profile && which.is_some_and(|w| w != Which::Dataplane) {
        bail!("--profile profiles the agent: it goes with `cargo xtask bench dataplane`");
    }
    if !sizes.is_empty() && which != Some(Which::Scale) {
        bail!("--sizes sets the tailnet sizes: it goes with `cargo xtask bench scale`");
    }
    if !profile && which.is_none_or(|w| w == Which::UserdataGen) {
        userdata_gen()?;
    }
    if !profile && which.is_none_or(|w| w == Which::Flood) {
        flood()?;
    }
    if !profile && which.is_none_or(|w| w == Which::Patch) {
        patch()?;
    }
    if which.is_none_or(|w| w == Which::Dataplane) {
        dataplane(profile)?;
    }
    if !profile && which.is_none_or(|w| w == Which::Subnet) {
        subnet()?;
    }
    if !profile && which.is_none_or(|w| w == Which::Scale) {
        scale(sizes)?;
    }
    Ok(())
}

/// Runs `cargo bench -p PACKAGE --bench NAME` and returns the JSON objects it printed.
fn cargo_bench(package: &str, name: &str) -> Result<Vec<Value>> {
    let out = cargo()
        .args(["bench", "-q", "-p", package, "--bench", name])
        .output()
        .context("cannot run cargo bench")?;
    if !out.status.success() {
        bail!(
            "cargo bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

/// The cost of junk on the agent's UDP port (release build, one core, no network).
fn flood() -> Result<()> {
    let root = vdc::tools::workspace_root();
    println!("==> bench: junk packets into the agent's data-plane engine (release build)");
    let built_from = commit();
    let mut table = String::from(
        "| junk packet | time per packet | packets per second on one core |\n|---|---|---|\n",
    );
    for v in cargo_bench("vpn-agent", "flood")? {
        table.push_str(&format!(
            "| {} | {:.2} µs | {:.0} |\n",
            v["case"].as_str().unwrap_or_default(),
            v["ns_per_packet"].as_f64().unwrap_or_default() / 1e3,
            v["packets_per_core_second"].as_f64().unwrap_or_default(),
        ));
    }
    print!("{table}");
    write_section(
        &root.join("README.md"),
        "flood",
        &format!(
            "Measured by `cargo xtask bench flood` on {}, {} (release build of {built_from}):\n\n{table}",
            machine(),
            vdc::bench::today(),
        ),
    )
}

const MIB: f64 = 1024.0 * 1024.0;

/// The first map and one patch for tailnets of 100 to 5 000 peers (release build, no
/// network).
fn patch() -> Result<()> {
    let root = vdc::tools::workspace_root();
    println!("==> bench: a large tailnet's first map and patches in the agent (release build)");
    let built_from = commit();
    let mut table = String::from(
        "| peers | first map (JSON / zstd) | first map decoded and applied | a patch, as now (the named peer) | a patch, as before (every peer again) | a data-plane tick, every peer idle | the netmap cache written (its size) | heap held for the peers (peak while applying the first map) |\n|---|---|---|---|---|---|---|---|\n",
    );
    for v in cargo_bench("vpn-agent", "patch")? {
        let f = |k: &str| v[k].as_f64().unwrap_or_default();
        table.push_str(&format!(
            "| {} | {:.2} MB / {:.2} MB | {:.0} ms | {:.1} µs | {:.0} µs | {:.1} µs | {:.1} ms ({:.2} MB) | {:.1} MiB ({:.1} MiB) |\n",
            v["peers"],
            f("first_map_bytes") / 1e6,
            f("first_map_zstd_bytes") / 1e6,
            f("first_map_ms"),
            f("patch_us"),
            f("patch_full_refresh_us"),
            f("tick_us"),
            f("cache_encode_ms") + f("cache_save_ms"),
            f("cache_bytes") / 1e6,
            f("heap_held_bytes") / MIB,
            f("heap_peak_bytes") / MIB,
        ));
    }
    print!("{table}");
    write_section(
        &root.join("README.md"),
        "patch",
        &format!(
            "Measured by `cargo xtask bench patch` on {}, {} (release build of {built_from}):\n\n{table}",
            machine(),
            vdc::bench::today(),
        ),
    )
}

fn userdata_gen() -> Result<()> {
    let root = vdc::tools::workspace_root();
    println!("==> bench: userdata-gen generation, no network (release build)");
    let mut table = String::from("| case | input | runs | median | p95 |\n|---|---|---|---|---|\n");
    for v in cargo_bench("userdata-gen", "generate")? {
        table.push_str(&format!(
            "| {} | {} bytes | {} | {:.2} ms | {:.2} ms |\n",
            v["case"].as_str().unwrap_or_default(),
            v["input_bytes"],
            v["runs"],
            v["median_ms"].as_f64().unwrap_or_default(),
            v["p95_ms"].as_f64().unwrap_or_default(),
        ));
    }
    print!("{table}");
    write_section(
        &root.join("README.md"),
        "userdata-gen",
        &format!(
            "Measured by `cargo xtask bench` on {}:\n\n{table}",
            machine()
        ),
    )
}

/// The data plane in the lab: vpn-agent (release build) against a stock tailscaled, both
/// reached from an operator's stock tailscaled.
fn dataplane(profile: bool) -> Result<()> {
    if profile {
        crate::setup::apt(vdc::tools::PROFILE_PACKAGES)?;
    }
    let root = vdc::tools::workspace_root();
    println!("==> bench: data plane, vpn-agent (release build) against tailscaled, in the lab");
    let (agent_bin, built_from) = release_agent()?;
    let bench = vdc::bench::Bench::start(&agent_bin)?;
    println!(
        "  lab up: vpn-agent {} on fw, tailscaled {} on ts, both direct from op",
        bench.agent_ip, bench.ts_ip
    );
    if profile {
        let out = target_dir().join("bench");
        println!(
            "==> bench: profiling vpn-agent under iperf3 (perf, strace) into {}",
            out.display()
        );
        print!("{}", bench.profile(&out, 10)?);
        return Ok(());
    }
    let opts = vdc::bench::Options::default();
    let results = bench.measure(&opts, &mut |line| println!("  {line}"))?;
    let table = results.table();
    print!("{table}");
    write_section(
        &root.join("README.md"),
        "dataplane",
        &format!(
            "Measured by `cargo xtask bench dataplane` on {}, {} (vpn-agent release build \
             of {}, tailscale {}, MTU 1280 on both):\n\n{table}",
            machine(),
            vdc::bench::today(),
            built_from,
            vdc::tools::TAILSCALE.version,
        ),
    )?;
    Ok(())
}

/// Builds the agent under test (release) and the debug binaries the lab provisions with;
/// returns the release binary and the commit it was built from.
fn release_agent() -> Result<(PathBuf, String)> {
    // What the agent is built from, taken before the build: others may edit meanwhile.
    let built_from = commit();
    // The release agent under test; debug userdata-gen provisions the firewall, the debug
    // vpn-agent answers `status`, and vdc-load makes a tailnet large, as in the tests.
    for args in [
        &[
            "build",
            "-q",
            "--release",
            "-p",
            "vpn-agent",
            "--bin",
            "vpn-agent",
        ][..],
        &[
            "build",
            "-q",
            "-p",
            "vpn-agent",
            "-p",
            "userdata-gen",
            "-p",
            "vdc",
            "--bins",
        ][..],
    ] {
        let status = cargo().args(args).status().context("cannot run cargo")?;
        if !status.success() {
            bail!("cargo {} failed ({status})", args.join(" "));
        }
    }
    if let Some(why) = vdc::lab_unavailable() {
        bail!("the lab benchmarks need the lab, which cannot run here: {why}");
    }
    Ok((target_dir().join("release/vpn-agent"), built_from))
}

/// vpn-agent as a subnet router (release build) against a stock tailscaled doing the same job.
fn subnet() -> Result<()> {
    println!("==> bench: subnet router, op -> bmc through vpn-agent and through tailscaled");
    let (agent_bin, built_from) = release_agent()?;
    let r = vdc::bench::subnet::measure(&agent_bin, 10, 3, &mut |line| println!("  {line}"))?;
    let table = r.table();
    print!("{table}");
    write_section(
        &vdc::tools::workspace_root().join("README.md"),
        "subnet",
        &format!(
            "Measured by `cargo xtask bench subnet` on {}, {} (vpn-agent release build of {}, \
             tailscale {}):\n\n{table}",
            machine(),
            vdc::bench::today(),
            built_from,
            vdc::tools::TAILSCALE.version,
        ),
    )
}

/// vpn-agent (release build) and a stock tailscaled in one tailnet as it grows to thousands of
/// nodes, some of them churning.
fn scale(sizes: Vec<usize>) -> Result<()> {
    println!("==> bench: vpn-agent and tailscaled in a tailnet of 100 to 5 000 churning nodes");
    let (agent_bin, built_from) = release_agent()?;
    let trial = !sizes.is_empty();
    let mut opts = vdc::bench::scale::Options::default();
    if trial {
        opts = vdc::bench::scale::Options {
            coming_and_going_up_to: sizes[0].min(opts.coming_and_going_up_to),
            sizes,
            churn_secs: 10,
            iperf_secs: 3,
            iperf_reps: 1,
            pings: 20,
        };
    }
    let r = vdc::bench::scale::measure(&agent_bin, &opts, &mut |line| println!("  {line}"))?;
    let table = r.table();
    print!("{table}");
    if trial {
        println!("==> bench: a trial run (--sizes): README.md left as it is");
        return Ok(());
    }
    write_section(
        &vdc::tools::workspace_root().join("README.md"),
        "scale",
        &format!(
            "Measured by `cargo xtask bench scale` on {}, {} (vpn-agent release build of {}, \
             tailscale {}, headscale {}; {} of the nodes change {} times a second, frozen while \
             nodes register and the daemons restart; CPU over {} s of churn alone, {} s where \
             only endpoints change; iperf3: the median of {} runs of {} s per direction):\n\n{table}",
            machine(),
            vdc::bench::today(),
            built_from,
            vdc::tools::TAILSCALE.version,
            vdc::tools::HEADSCALE.version,
            vdc::bench::scale::CHURNING,
            vdc::bench::scale::CHURN_PER_SEC,
            opts.churn_secs,
            opts.churn_secs
                .max(vdc::bench::scale::ENDPOINTS_ONLY_WINDOW_SECS),
            opts.iperf_reps,
            opts.iperf_secs,
        ),
    )
}

/// Replaces what stands between `<!-- bench:NAME:start -->` and its end marker in `readme`.
fn write_section(readme: &std::path::Path, name: &str, body: &str) -> Result<()> {
    let (start, end) = (
        format!("<!-- bench:{name}:start -->"),
        format!("<!-- bench:{name}:end -->"),
    );
    let text = std::fs::read_to_string(readme)?;
    let (Some(a), Some(b)) = (text.find(&start), text.find(&end)) else {
        bail!("README.md has no {start} ... {end} markers");
    };
    std::fs::write(
        readme,
        format!(
            "{}{start}\n{body}{end}{}",
            &text[..a],
            &text[b + end.len()..]
        ),
    )?;
    println!("==> bench: {name} table written to README.md");
    Ok(())
}

/// "N cores of <CPU model>".
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!(
        "{} cores of {cpu}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )
}

/// The commit the agent was built from, marked when the working tree differs from it.
fn commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(vdc::tools::workspace_root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let head = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    match git(&["status", "--porcelain", "--", "agent"]) {
        Some(s) if !s.is_empty() => format!("{head} with uncommitted changes in agent/"),
        _ => head,
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| vdc::tools::workspace_root().join("target"))
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(vdc::tools::workspace_root());
    c
}
