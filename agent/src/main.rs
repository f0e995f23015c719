//! `vpn-agent`: the firewall's mesh agent.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use vpn_agent::config::Config;
use vpn_agent::daemon::Daemon;

/// Joins this firewall to the headscale mesh and keeps SSH reachable only through it.
/// `--version`: the release and the commit it was built from.
const VERSION: &str = concat!(
    env!("VPN_BUILD_VERSION"),
    " (commit ",
    env!("VPN_BUILD_COMMIT"),
    ")"
);

#[derive(Parser)]
#[command(name = "vpn-agent", version = VERSION, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Join headscale and follow the network map (the daemon).
    Run {
        /// The mesh settings, in tailscale's `--config` format (alpha0).
        #[arg(long, default_value = "/etc/vpn-agent/tailscaled.conf")]
        config: PathBuf,
        /// The agent's own settings.
        #[arg(long, default_value = "/etc/vpn-agent/agent.json")]
        settings: PathBuf,
        /// Where the machine and node keys are kept.
        #[arg(long, default_value = "/var/lib/vpn-agent")]
        state_dir: PathBuf,
        /// The status socket (root only).
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Seconds after which a map stream that carried nothing but keep-alives is replaced
        /// by a new one (headscale up to v0.28 may silently stop updating a stream); a busy
        /// stream is replaced at five times this age (headscale v0.28 may silently lose an
        /// update). Stretched to ten times what headscale took for the last full map, so
        /// that renewals take a large tailnet's headscale at most a tenth of its time.
        /// 5 to 86400.
        #[arg(long, value_name = "SECS", default_value_t = vpn_agent::config::MAP_REFRESH_AFTER.as_secs(),
              value_parser = clap::value_parser!(u64).range(5..=86_400))]
        map_refresh_after: u64,
        /// Seconds without any map message (keep-alives included) after which the map stream
        /// counts as dead. A new stream's full map gets as long, and twice as long after each
        /// stream that brought none, up to four times: a control server busy with a large
        /// tailnet may take longer. 10 to 3600.
        #[arg(long, value_name = "SECS", default_value_t = vpn_agent::config::MAP_WATCHDOG.as_secs(),
              value_parser = clap::value_parser!(u64).range(10..=3_600))]
        map_watchdog: u64,
    },
    /// The agent's nftables table: SSH only over the mesh, the public ports closed.
    Firewall {
        #[command(subcommand)]
        cmd: FirewallCmd,
        /// The agent's own settings.
        #[arg(long, global = true, default_value = "/etc/vpn-agent/agent.json")]
        settings: PathBuf,
        /// The mesh settings, for the subnets a subnet router forwards into
        /// (`AdvertiseRoutes`). Unreadable: no forwarding rules (which forward nothing).
        #[arg(long, global = true, default_value = "/etc/vpn-agent/tailscaled.conf")]
        config: PathBuf,
    },
    /// Show the agent's state and peers, like `tailscale status`.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

const DEFAULT_SOCKET: &str = "/run/vpn-agent/vpn-agent.sock";

#[derive(Subcommand)]
enum FirewallCmd {
    /// Load the agent's nftables table (one transaction; other tables untouched).
    Apply,
    /// Print the live table.
    Show,
    /// Compare the live table with the intended one; exit 1 when they differ.
    Check,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VPN_AGENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Run {
            config,
            settings,
            state_dir,
            socket,
            map_refresh_after,
            map_watchdog,
        } => run(
            config,
            settings,
            state_dir,
            socket,
            std::time::Duration::from_secs(map_refresh_after),
            std::time::Duration::from_secs(map_watchdog),
        ),
        Cmd::Firewall {
            cmd,
            settings,
            config,
        } => firewall(cmd, &settings, &config),
        Cmd::Status { json, socket } => vpn_agent::status::fetch(&socket).map(|s| {
            if json {
                println!("{}", serde_json::to_string_pretty(&s).expect("serializes"));
            } else {
                print!(
                    "{}",
                    vpn_agent::status::render(&s, vpn_agent::status::now_secs())
                );
            }
        }),
    };
    if let Err(e) = res {
        eprintln!("vpn-agent: error: {e}");
        std::process::exit(1);
    }
}

fn run(
    config: PathBuf,
    settings: PathBuf,
    state_dir: PathBuf,
    socket: PathBuf,
    map_refresh_after: std::time::Duration,
    map_watchdog: std::time::Duration,
) -> vpn_agent::Result<()> {
    let mut cfg = Config::load(&config, &settings)?;
    cfg.map_refresh_after = map_refresh_after;
    cfg.map_watchdog = map_watchdog;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| vpn_agent::Error::io("tokio runtime", e))?;
    rt.block_on(async move {
        let mut d = Daemon::new(cfg, state_dir, socket)?;
        tokio::select! {
            r = d.run() => r,
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })
}

fn firewall(
    cmd: FirewallCmd,
    settings: &std::path::Path,
    config: &std::path::Path,
) -> vpn_agent::Result<()> {
    let s = vpn_agent::config::load_settings(settings)?;
    // The early unit must close the ports even when the mesh settings are broken: without
    // them it loads no forward chain. At boot IP forwarding is off until the daemon turns it
    // on, and a running daemon puts its own forward chain back at once.
    let routes = match std::fs::read_to_string(config)
        .map_err(|e| vpn_agent::Error::io(config, e))
        .and_then(|t| vpn_agent::config::parse_mesh(&t, config))
    {
        Ok(m) => m.advertise_routes,
        Err(e) => {
            eprintln!("vpn-agent: {e}; loading the table without forwarding rules");
            vec![]
        }
    };
    let s = vpn_agent::firewall::Intent::of(&s, &routes);
    match cmd {
        FirewallCmd::Apply => vpn_agent::firewall::apply(&s),
        FirewallCmd::Show => {
            let out = std::process::Command::new("nft")
                .args(["list", "table", "inet", vpn_agent::firewall::TABLE])
                .output()
                .map_err(|e| vpn_agent::Error::io("nft", e))?;
            print!("{}", String::from_utf8_lossy(&out.stdout));
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
            Ok(())
        }
        FirewallCmd::Check => {
            let d = vpn_agent::firewall::check(&s)?;
            if d.is_empty() {
                println!("table inet {} is as intended", vpn_agent::firewall::TABLE);
                Ok(())
            } else {
                for line in &d {
                    println!("{line}");
                }
                std::process::exit(1);
            }
        }
    }
}
