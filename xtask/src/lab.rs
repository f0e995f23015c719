//! `cargo xtask lab ...` and `cargo xtask demo`.

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use std::time::Instant;
use vdc::headscale::KeyOptions;
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
        let hs = lab.headscale();
        let user = hs.create_user("ops")?;
        let key = hs.create_preauth_key(&user, &KeyOptions::default())?;
        let op = lab.start_tailscaled("op")?;
        op.up(&hs.url(), &key.key, "op")?;
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

/// metal-api's part and the firewall's: userdata-gen mints a key from headscale and merges
/// the agent into the user's Ignition; the real flatcar Ignition writes it into the
/// firewall's root; vpn-agent starts from exactly those files and joins; an operator joins
/// with stock tailscale and shows up in `vpn-agent status`.
fn userdata_demo() -> Result<()> {
    use vdc::firewall::{AGENT_LOG, start_agent, status_command, wait_online, wait_status};
    vdc::cmd::set_echo(true);
    println!("\n[firewall] a fresh lab: ctl (headscale), fw (the firewall), op (an operator)");
    let lab = Lab::start(LabOptions::hosts(&["fw", "op"]))?;
    let result = (|| {
        let hs = lab.headscale();
        let ctl = lab.host_dir("ctl");
        let p = |f: &str| ctl.join(f).display().to_string();
        let udg = || {
            lab.host("ctl")
                .ns()
                .command(vdc::tools::project_bin("userdata-gen"))
        };
        println!("[1] metal-api's API key for headscale, in a file only root can read");
        let key = hs.create_api_key()?;
        vdc::headscale::write_private(&ctl.join("api.key"), key.as_bytes())?;
        println!("[2] the user's userdata: firewall-controller-manager's Ignition 2.3.0");
        std::fs::copy(
            vdc::tools::workspace_root().join("ignition/fixtures/fcm-firewall-2.3.0.json"),
            ctl.join("user.ign"),
        )?;
        println!("[3] userdata-gen, as metal-api runs it while allocating the firewall");
        let machine = "0cfc7e24-aaaa-4bbb-8ccc-000000000001";
        vdc::cmd::run(
            udg()
                .args([
                    "generate",
                    "--machine-id",
                    machine,
                    "--project",
                    "project-a",
                ])
                .args([
                    "--login-server",
                    &hs.url(),
                    "--headscale-api-key-file",
                    &p("api.key"),
                ])
                .args(["--ca-file", &hs.ca_path().display().to_string()])
                .args(["--userdata", &p("user.ign"), "--output", &p("userdata.ign")])
                .args(["--metadata-out", &p("meta.json")]),
        )?;
        vdc::cmd::run(std::process::Command::new("cat").arg(p("meta.json")))?;
        let merged: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(ctl.join("userdata.ign"))?)?;
        let names = |v: &serde_json::Value, key: &str| {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x[key].as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default()
        };
        println!(
            "    merged files: {}",
            names(&merged["storage"]["files"], "path")
        );
        println!(
            "    merged units: {}",
            names(&merged["systemd"]["units"], "name")
        );
        println!(
            "[4] flatcar Ignition v0.36.2 writes it into the firewall's root, as os-installer runs it"
        );
        let root = lab.host_dir("fw").join("root");
        let config = std::fs::read_to_string(ctl.join("userdata.ign"))?;
        vdc::ignition::apply_flatcar(&config, &root, &lab.host_dir("fw").join("ignition"))?;
        vdc::cmd::run(
            std::process::Command::new("find")
                .arg(&root)
                .args(["-type", "f", "-exec", "stat", "-c", "%a %U %n", "{}", "+"]),
        )?;
        println!("[5] vpn-agent starts from exactly those files, as its unit would, and joins");
        start_agent(&lab, "fw", &root)?;
        let fw_node = wait_online(&lab, "fw", machine)?;
        wait_status(&lab, "fw", "Running", |s| s["backend_state"] == "Running")?;
        print!("{}", indent(&lab.log("fw", AGENT_LOG)));
        vdc::cmd::run(lab.host("fw").ns().command("ip").args([
            "-br",
            "addr",
            "show",
            "dev",
            "tailscale0",
        ]))?;
        println!(
            "    the used pre-auth key is gone: {}",
            !root.join("etc/vpn-agent/authkey").exists()
        );
        println!("[6] an operator mints a key for their laptop and joins with stock tailscale");
        let op_key = vdc::cmd::run_quiet(
            udg()
                .env("HEADSCALE_API_KEY", &key)
                .args([
                    "auth-key",
                    "--project",
                    "project-a",
                    "--headscale-api-url",
                    &hs.url(),
                ])
                .args(["--ca-file", &hs.ca_path().display().to_string()]),
        )?;
        println!(
            "  $ userdata-gen auth-key --project project-a --headscale-api-url {} ... (key not shown)",
            hs.url()
        );
        let op = lab.start_tailscaled("op")?;
        op.up(&hs.url(), op_key.trim(), "op")?;
        println!("[7] vpn-agent status on the firewall lists the operator's node");
        let op_ip = format!("{}/32", op.ipv4()?);
        wait_status(&lab, "fw", "the operator", |s| {
            vdc::firewall::lists_online_peer(s, &op_ip)
        })?;
        vdc::cmd::run(&mut status_command(&lab, "fw"))?;
        vdc::cmd::run(hs.cli().args(["nodes", "list"]))?;
        println!("[8] the operator pings the firewall and logs in with ssh, over the mesh");
        let fw_ip: std::net::IpAddr = fw_node
            .addresses
            .first()
            .and_then(|a| a.parse().ok())
            .context("the firewall has no mesh address")?;
        vdc::cmd::run(op.cli().args(["ping", "-c", "5", &fw_ip.to_string()]))?;
        vdc::smoke::icmp(&lab, "op", fw_ip)?;
        let authorized = vdc::firewall::start_sshd(&lab, "fw")?;
        vdc::firewall::wait_banner(&lab.host("op").ns(), (fw_ip, 22).into())?;
        vdc::firewall::ssh(
            &lab,
            "op",
            fw_ip,
            &authorized,
            "echo logged in to $(ip -o -4 addr show dev tailscale0 | cut -d' ' -f7) over the mesh",
        )?;
        vdc::cmd::run(&mut status_command(&lab, "fw"))?;
        println!("[9] the same sshd on the firewall's public address: closed");
        let public: std::net::SocketAddr = (lab.host("fw").addr, 22).into();
        match vdc::firewall::banner(
            &lab.host("op").ns(),
            public,
            std::time::Duration::from_secs(2),
        ) {
            Ok(b) => anyhow::bail!("public SSH answered: {b}"),
            Err(_) => println!("    {public}: no answer (dropped by table inet vpn_agent)"),
        }
        anyhow::Ok(())
    })();
    if let Err(e) = result {
        lab.dump_logs();
        return Err(e.context("the firewall part of the demo failed"));
    }
    println!("demo: ok. Next: DERP relaying, path upgrades and the packet filter.");
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}
