//! `cargo xtask lab ...` and `cargo xtask demo`.

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use std::time::Instant;
use vdc::lab::{self, DEV_ID};
use vdc::{Lab, LabOptions};

#[derive(Subcommand)]
pub enum LabCmd {
    /// Build the lab (ctl with headscale, fw, op with a joined tailscaled) and leave it up.
    Up,
    /// Tear the lab down, and every lab left behind by a killed test run.
    Down,
    /// Show the lab's hosts, knobs, headscale nodes and the operator's tailscale status.
    Status,
    /// Run a command inside a lab host: `cargo xtask lab exec op -- tailscale status`.
    /// `tailscale` is pointed at the host's tailscaled, `headscale` at the lab's config.
    Exec {
        host: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// The lab's own proof: two stock tailscaled reach each other via DERP and directly.
    Smoke,
}

pub fn run(cmd: LabCmd) -> Result<()> {
    match cmd {
        LabCmd::Up => up(),
        LabCmd::Down => down(),
        LabCmd::Status => status(),
        LabCmd::Exec { host, cmd } => exec(&host, &cmd),
        LabCmd::Smoke => smoke(false),
    }
}

fn need_lab() -> Result<()> {
    if let Some(why) = vdc::lab_unavailable() {
        bail!("the lab cannot run here: {why}");
    }
    Ok(())
}

fn up() -> Result<()> {
    need_lab()?;
    let start = Instant::now();
    let lab = Lab::start(LabOptions {
        hosts: vec!["fw".into(), "op".into()],
        persistent_id: Some(DEV_ID.into()),
        ..LabOptions::default()
    })?;
    let result = (|| {
        let op = lab.join_tailscaled("op", "ops")?;
        anyhow::Ok(op.ipv4()?)
    })();
    match result {
        Ok(op_ip) => {
            println!("lab {DEV_ID} is up in {:.1?}", start.elapsed());
            print_hosts(&lab);
            println!("  headscale: {} (user `ops`)", lab.headscale().url());
            println!("  op's tailscale address: {op_ip}");
            println!("try: cargo xtask lab exec op -- tailscale status");
            println!("     cargo xtask lab exec ctl -- headscale nodes list");
            println!("     cargo xtask lab down");
            Ok(())
        }
        Err(e) => {
            lab.dump_logs();
            lab.down();
            Err(e)
        }
    }
}

fn down() -> Result<()> {
    if let Ok(lab) = Lab::attach(DEV_ID) {
        lab.down();
        println!("lab {DEV_ID}: down");
    } else {
        // A half-built dev lab has namespaces but maybe no state file.
        lab::teardown(DEV_ID, &lab::base_dir().join(DEV_ID), false);
    }
    for id in lab::gc_stale() {
        println!("removed lab {id}, left behind by a test run that no longer runs");
    }
    let rest = lab::lab_ids();
    if !rest.is_empty() {
        println!(
            "labs of running test processes are left alone: {}",
            rest.join(" ")
        );
    }
    Ok(())
}

fn print_hosts(lab: &Lab) {
    let st = lab.state();
    for h in st.hosts.values() {
        println!("  {:<4} {:<15} netns {}", h.name, h.addr, h.netns);
    }
}

fn status() -> Result<()> {
    let lab = Lab::attach(DEV_ID)?;
    let st = lab.state();
    println!("lab {} (files in {})", st.id, st.dir.display());
    print_hosts(&lab);
    println!(
        "  knobs: udp blocked {:?}, cut off {:?}",
        st.knobs.udp_blocked, st.knobs.cut_off
    );
    println!("headscale {}:", lab.headscale().url());
    for n in lab.headscale().nodes()? {
        println!(
            "  node {} {:<10} user {:<8} {} {}",
            n.id,
            n.given_name,
            n.user,
            if n.online { "online " } else { "offline" },
            n.addresses.join(" ")
        );
    }
    for host in &st.tailscaled {
        if let Some(ts) = lab.tailscaled(host) {
            println!("tailscale status on {host}:");
            let out = vdc::cmd::output(ts.cli().arg("status"))?;
            print!("{}", String::from_utf8_lossy(&out.stdout));
        }
    }
    Ok(())
}

fn exec(host: &str, cmd: &[String]) -> Result<()> {
    let lab = Lab::attach(DEV_ID)?;
    let st = lab.state();
    if !st.hosts.contains_key(host) {
        bail!(
            "lab {DEV_ID} has no host {host}; hosts: {}",
            st.hosts.keys().cloned().collect::<Vec<_>>().join(" ")
        );
    }
    let mut c = match cmd[0].as_str() {
        "tailscale" => {
            let ts = lab
                .tailscaled(host)
                .with_context(|| format!("no tailscaled runs on {host}"))?;
            ts.cli()
        }
        "headscale" => lab.headscale().cli(),
        prog => lab.host(host).ns().command(prog),
    };
    c.args(&cmd[1..]);
    let status = c.status()?;
    std::process::exit(status.code().unwrap_or(1));
}

/// Runs the smoke scenario on a fresh lab; `demo` shows every command and its output.
pub fn smoke(demo: bool) -> Result<()> {
    need_lab()?;
    vdc::cmd::set_echo(demo);
    let start = Instant::now();
    println!("[lab] building the virtual data center: ctl (headscale), fw, op");
    let lab = Lab::start(LabOptions::hosts(vdc::smoke::HOSTS))?;
    println!("[lab] up in {:.1?}", start.elapsed());
    print_hosts(&lab);
    println!("[lab] headscale at {}", lab.headscale().url());
    let mut n = 0;
    let mut last = Instant::now();
    let report = vdc::smoke::run(&lab, &mut |s| {
        if n > 0 {
            println!("    ({:.1?})", last.elapsed());
        }
        last = Instant::now();
        n += 1;
        println!("[{n}] {s}");
    });
    match report {
        Ok(r) => {
            println!("[result] relayed path: {}", r.relayed);
            println!(
                "         {}",
                r.relayed_ping.lines().last().unwrap_or_default()
            );
            println!("[result] direct path:  {}", r.direct);
            println!(
                "         {}",
                r.direct_ping.lines().last().unwrap_or_default()
            );
            println!("smoke: ok in {:.1?}", start.elapsed());
            Ok(())
        }
        Err(e) => {
            lab.dump_logs();
            Err(e.context("smoke failed"))
        }
    }
}

pub fn demo() -> Result<()> {
    println!("demo: the virtual data center with real headscale, tailscale and Ignition.");
    crate::step(
        "build userdata-gen and vpn-agent",
        crate::cargo(&["build", "--workspace", "--bins"]),
    )?;
    smoke(true)?;
    userdata_demo()
}

/// The whole story in a fresh lab, every command echoed with its output: metal-api's call,
/// Ignition, boot with closed ports, the agent joining, an operator's SSH over the mesh,
/// DERP when UDP is blocked, a crash and a power cycle. The same code runs in the tests.
fn userdata_demo() -> Result<()> {
    vdc::cmd::set_echo(true);
    println!(
        "\n[firewall] a fresh lab: ctl (headscale), fw (the firewall), op (an operator), dc (the data center)"
    );
    let lab = vdc::story::lab()?;
    let mut n = 0;
    let result = vdc::story::run(&lab, &mut |title| {
        n += 1;
        println!("[{n}] {title}");
    });
    if let Err(e) = result {
        lab.dump_logs();
        return Err(e.context("the firewall part of the demo failed"));
    }
    println!("demo: ok. Every step above was checked.");
    Ok(())
}
