//! `cargo xtask`: everything a newcomer or CI runs, in Rust, with no hand-installed tools.

mod lab;
mod setup;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::process::Command;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Project tasks: setup, test, lab, demo")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install everything the tests and the demo need (Debian packages, headscale, tailscale).
    Setup,
    /// Setup, then fmt, clippy, unit tests and the end-to-end suite: what CI runs.
    Test,
    /// The whole flow in the virtual data center, step by step.
    Demo,
    /// Bring the virtual data center up and down by hand.
    Lab {
        #[command(subcommand)]
        cmd: lab::LabCmd,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::run(),
        Cmd::Test => test(),
        Cmd::Demo => {
            setup::run()?;
            lab::demo()
        }
        Cmd::Lab { cmd } => lab::run(cmd),
    }
}

fn test() -> Result<()> {
    let start = Instant::now();
    setup::run()?;
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
    e2e.env("VDC_REQUIRE_LAB", "1");
    step("end-to-end suite (virtual data center)", e2e)?;
    println!("xtask test: all green in {:.0?}", start.elapsed());
    Ok(())
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
