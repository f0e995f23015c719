//! `vpn-agent`: the firewall's mesh agent, a Rust equivalent of `tailscaled`.
//!
//! This binary so far only identifies itself; the control plane, the data plane and the
//! firewall arrive in their own issues (see ARCHITECTURE.md).

use clap::Parser;

/// Joins this firewall to the headscale mesh and keeps SSH reachable only through it.
#[derive(Parser, Debug)]
#[command(name = "vpn-agent", version, about, long_about = None)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    eprintln!(
        "vpn-agent {}: no command is implemented yet; see --help",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
