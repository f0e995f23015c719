use clap::Parser;

/// Mints a headscale join key and merges the vpn-agent into a firewall's userdata.
#[derive(Parser, Debug)]
#[command(name = "userdata-gen", version, about, long_about = None)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    eprintln!(
        "userdata-gen {}: no command is implemented yet; see --help",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
