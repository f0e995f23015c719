//! `vdc-load`: registers N nodes with headscale and churns some of them (see `vdc::load`).
//! Runs inside a lab host until killed; progress goes to `--progress` as JSON.

use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
struct Args {
    /// headscale's URL.
    #[arg(long)]
    server: String,
    /// The CA that signed headscale's certificate.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// A file holding a reusable pre-auth key.
    #[arg(long)]
    auth_key_file: PathBuf,
    /// Nodes to register.
    #[arg(long)]
    nodes: usize,
    /// How many of them keep a map stream open; the churn happens among them.
    #[arg(long, default_value_t = 0)]
    online: usize,
    /// Changes per second once all are registered.
    #[arg(long, default_value_t = 0.0)]
    churn_per_sec: f64,
    /// Hostname prefix: <prefix>-<i>.
    #[arg(long, default_value = "load")]
    prefix: String,
    /// Registrations in flight at once (the scale benchmark asks for more).
    #[arg(long, default_value_t = 16)]
    parallel: usize,
    /// Where progress is written (JSON), about once a second.
    #[arg(long)]
    progress: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let auth_key = std::fs::read_to_string(&a.auth_key_file)?
        .trim()
        .to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(vdc::load::run(vdc::load::LoadSpec {
        server: a.server,
        ca_file: a.ca_file,
        auth_key,
        nodes: a.nodes,
        online: a.online,
        churn_per_sec: a.churn_per_sec,
        prefix: a.prefix,
        parallel: a.parallel,
        progress: a.progress,
    }))
}
