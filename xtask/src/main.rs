//! `cargo xtask`: everything a newcomer or CI runs, in Rust, with no hand-installed tools.

mod bench;
mod dist;
mod lab;
mod setup;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::process::Command;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Project tasks: setup, test, demo, bench, dist, lab"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install everything the tests and the demo need (Debian packages, headscale, tailscale).
    Setup,
    /// Setup, then fmt, clippy, unit tests, the end-to-end suite and the interoperability
    /// matrix: what CI runs.
    Test {
        /// Only the matrix: the story and the agent's end-to-end tests against every
        /// supported headscale version.
        #[arg(long)]
        matrix: bool,
    },
    /// The whole flow in the virtual data center, step by step.
    Demo,
    /// Benchmarks; writes the results as tables into the README.
    Bench {
        /// Run only this one (all when omitted).
        which: Option<bench::Which>,
        /// With `dataplane`: instead of measuring, profile vpn-agent under iperf3 load with
        /// perf and strace (reports in target/bench/; the README stays as it is).
        #[arg(long)]
        profile: bool,
        /// With `scale`: the tailnet sizes, comma-separated, instead of 100,1000,5000 (a
        /// trial run; the README table stays as it is). Past the first size the nodes churn
        /// by changing endpoints only, as they do past 1 000 in the full run.
        #[arg(long, value_delimiter = ',')]
        sizes: Vec<usize>,
    },
    /// Release artifacts in target/dist: static binaries, the Debian package, SHA512SUMS.
    Dist {
        /// Build everything twice from scratch and fail unless the sha512s agree.
        #[arg(long)]
        check: bool,
    },
    /// Bring the virtual data center up and down by hand.
    Lab {
        #[command(subcommand)]
        cmd: lab::LabCmd,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::run(),
        Cmd::Test { matrix } => test(matrix),
        Cmd::Demo => {
            setup::run()?;
            lab::demo()
        }
        Cmd::Bench {
            which,
            profile,
            sizes,
        } => bench::run(which, profile, sizes),
        Cmd::Dist { check } => dist::run(check),
        Cmd::Lab { cmd } => lab::run(cmd),
    }
}

fn test(matrix_only: bool) -> Result<()> {
    let start = Instant::now();
    setup::run()?;
    if matrix_only {
        step(
            "build the binaries the end-to-end suite runs",
            cargo(&["build", "--workspace", "--bins"]),
        )?;
        matrix()?;
        println!("xtask test --matrix: all green in {:.0?}", start.elapsed());
        return Ok(());
    }
    step("cargo fmt --check", cargo(&["fmt", "--all", "--check"]))?;
    step(
        "cargo clippy",
        cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    let next_agent = build_next_agent()?;
    step(
        "unit tests",
        cargo(&["test", "--workspace", "--lib", "--bins"]),
    )?;
    step(
        "build the binaries the end-to-end suite runs",
        cargo(&["build", "--workspace", "--bins"]),
    )?;
    // The end-to-end suite must run, never skip, where `cargo xtask test` runs.
    if let Some(why) = vdc::lab_unavailable() {
        bail!("the end-to-end suite cannot run here: {why}");
    }
    let mut e2e = cargo(&["test", "--workspace", "--test", "*"]);
    e2e.env("VDC_REQUIRE_LAB", "1")
        .env("VDC_NEXT_AGENT", &next_agent);
    step("end-to-end suite (virtual data center)", e2e)?;
    matrix()?;
    for (dir, target) in vdc::tools::FUZZ_TARGETS {
        step(
            &format!("fuzz {dir}/{target} for {FUZZ_SECONDS} s"),
            fuzz(dir, target),
        )?;
    }
    println!("xtask test: all green in {:.0?}", start.elapsed());
    Ok(())
}

/// The agent with another version string that the upgrade test moves to, built in the
/// usual target directory (only the agent crate recompiles, twice: now and when the next
/// step builds the binaries again) and kept as `target/vdc/vpn-agent-next`.
fn build_next_agent() -> Result<std::path::PathBuf> {
    let mut c = cargo(&["build", "-p", "vpn-agent", "--bin", "vpn-agent"]);
    c.env("VPN_BUILD_VERSION", vdc::tools::NEXT_AGENT_VERSION);
    step(
        &format!(
            "build vpn-agent {} for the upgrade test",
            vdc::tools::NEXT_AGENT_VERSION
        ),
        c,
    )?;
    let dir = vdc::tools::workspace_root().join("target/vdc");
    std::fs::create_dir_all(&dir)?;
    let next = dir.join("vpn-agent-next");
    std::fs::copy(vdc::tools::project_bin("vpn-agent"), &next)?;
    Ok(next)
}

/// The pairs the matrix runs besides the default (which the whole suite ran on): every
/// headscale version with the oldest tailscale it supports and the newest.
const MATRIX: &[(&str, &str)] = &[
    ("v0.27.1", "v1.74.0"),
    ("v0.27.1", "v1.102.3"),
    ("v0.28.0", "v1.74.0"),
    ("v0.28.0", "v1.102.3"),
    ("v0.29.2", "v1.80.3"),
    ("v0.29.2", "v1.102.3"),
];

/// The story, the agent's end-to-end tests and the management server's for every pair of
/// [`MATRIX`].
fn matrix() -> Result<()> {
    if let Some(why) = vdc::lab_unavailable() {
        bail!("the matrix cannot run here: {why}");
    }
    let mut rows = vec![];
    for (hs, ts) in MATRIX {
        let mut c = cargo(&[
            "test", "-p", "vdc", "--test", "story", "--test", "agent", "--test", "mgmt",
        ]);
        c.env("VDC_HEADSCALE", hs)
            .env("VDC_TAILSCALE", ts)
            .env("VDC_REQUIRE_LAB", "1");
        let started = Instant::now();
        step(
            &format!("matrix: headscale {hs} × tailscale {ts}: story, agent and mgmt tests"),
            c,
        )?;
        rows.push(format!(
            "| {hs} | {ts} | green | {:.0?} |",
            started.elapsed()
        ));
    }
    println!("| headscale | tailscale | story, agent and mgmt tests | took |\n|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}

/// How long `cargo xtask test` fuzzes each target: a smoke run, not a campaign.
const FUZZ_SECONDS: u32 = 30;

/// `cargo +nightly fuzz run`, with new inputs kept under target/ and the committed corpus
/// read as seeds.
fn fuzz(dir: &str, target: &str) -> Command {
    let root = vdc::tools::workspace_root();
    let work = root.join("target/fuzz-corpus").join(target);
    let _ = std::fs::create_dir_all(&work);
    let path = format!(
        "{}:{}",
        vdc::tools::cargo_fuzz_root().join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = Command::new("cargo");
    c.current_dir(root.join(dir))
        .env("PATH", path)
        .env("CARGO_TARGET_DIR", root.join("target/fuzz"))
        // rustup's proxy picks nightly from this; the outer cargo's own variables would pin stable.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .args(["+nightly", "fuzz", "run", target])
        .arg(&work)
        .arg(format!("fuzz/corpus/{target}"))
        .args([
            "--",
            &format!("-max_total_time={FUZZ_SECONDS}"),
            "-print_final_stats=1",
        ]);
    c
}

fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.args(args).current_dir(vdc::tools::workspace_root());
    c
}

fn step(what: &str, mut cmd: Command) -> Result<()> {
    println!("==> {what}");
    let start = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", vdc::cmd::render(&cmd)))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    println!("==> {what}: ok ({:.1?})", start.elapsed());
    Ok(())
}
