//! The whole story, from metal-api's call to an operator's SSH session and a power cycle:
//! `cargo xtask demo` tells it with every command and its output, and the end-to-end suite
//! runs the same code, so the demo cannot rot. Every step checks what it claims.

use crate::firewall::{
    AGENT_LOG, banner, start_agent, start_sshd, status_command, wait_banner, wait_online,
    wait_status,
};
use crate::{Lab, LabOptions, cmd, tools};
use anyhow::{Context, Result, bail, ensure};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The hosts: headscale on `ctl`, the firewall, an operator's laptop, another machine in
/// the data center's network, and a management server with a BMC on its management network.
pub const HOSTS: &[&str] = &["fw", "op", "dc", "mgmt"];
/// The management server's name in the mesh, and its management network.
const MGMT: &str = "mgmt01";
const MGMT_NET: &str = "198.51.100.0/24";
/// bmc-reverse-proxy's port.
const PROXY: u16 = 3333;
pub const MACHINE: &str = "0cfc7e24-aaaa-4bbb-8ccc-000000000001";
const PROJECT: &str = "project-a";

/// A ruleset shaped like the one metal-stack's firewall-controller renders: policy drop,
/// `iifname "tailscale*" accept`, and the public SSH accept our table must override.
pub const METAL_RULESET: &str = r#"table inet metal {
	chain input {
		type filter hook input priority filter; policy drop;
		iif "lo" accept
		ct state established,related accept
		iifname "tailscale*" accept comment "tailscale"
		tcp dport 22 accept comment "ssh"
		udp dport 41641 accept comment "wireguard"
	}
}
"#;

pub fn lab() -> Result<Lab> {
    Lab::start(LabOptions {
        lan: Some(("mgmt".into(), vec!["bmc".into()])),
        ..LabOptions::hosts(HOSTS)
    })
}

/// Runs the story on a lab from [`lab`]; `step` hears each step's title.
pub fn run(lab: &Lab, step: &mut dyn FnMut(&str)) -> Result<()> {
    let hs = lab.headscale();
    let ctl = lab.host_dir("ctl");
    let p = |f: &str| ctl.join(f).display().to_string();
    let udg = || {
        lab.host("ctl")
            .ns()
            .command(tools::project_bin("userdata-gen"))
    };

    step("metal-api's API key for headscale, in a file only root can read");
    let api_key = hs.create_api_key()?;
    crate::headscale::write_private(&ctl.join("api.key"), api_key.as_bytes())?;

    step("the user's userdata: firewall-controller-manager's Ignition 2.3.0");
    std::fs::copy(
        tools::workspace_root().join("ignition/fixtures/fcm-firewall-2.3.0.json"),
        ctl.join("user.ign"),
    )?;
    let user: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ctl.join("user.ign"))?)?;

    step("the agent release metal-api pins, on the control plane's release server");
    let release = crate::dist::serve_release(lab, "ctl", &tools::project_bin("vpn-agent"))?;
    println_indented(&format!("{}\nsha512 {}", release.url, release.sha512));

    step("userdata-gen, as metal-api runs it while allocating the firewall");
    cmd::run(
        udg()
            .args(["generate", "--machine-id", MACHINE, "--project", PROJECT])
            .args([
                "--login-server",
                &hs.url(),
                "--headscale-api-key-file",
                &p("api.key"),
            ])
            .args(["--ca-file", &hs.ca_path().display().to_string()])
            .args([
                "--agent-url",
                &release.url,
                "--agent-sha512",
                &release.sha512,
            ])
            .arg("--agent-ca-file")
            .arg(&release.ca_file)
            .args(["--userdata", &p("user.ign"), "--output", &p("userdata.ign")])
            .args(["--metadata-out", &p("meta.json")]),
    )?;
    cmd::run(Command::new("cat").arg(p("meta.json")))?;

    step(
        "flatcar Ignition v0.36.2 writes it into the firewall's root, as os-installer runs it, \
         and fetches the pinned agent, checking its sha512",
    );
    let root = lab.host_dir("fw").join("root");
    let config = std::fs::read_to_string(ctl.join("userdata.ign"))?;
    crate::ignition::apply_flatcar_in(
        Some(&lab.host("fw").ns()),
        &config,
        &root,
        &lab.host_dir("fw").join("ignition"),
    )?;
    let fetched = root.join("usr/local/bin/vpn-agent");
    ensure!(
        crate::dist::sha512_hex(&fetched)? == release.sha512,
        "the agent Ignition wrote is not the pinned release"
    );
    cmd::run(
        Command::new("find")
            .arg(&root)
            .args(["-type", "f", "-exec", "stat", "-c", "%a %U %n", "{}", "+"]),
    )?;
    users_files_in_place(&user, &root)?;

    step("boot: the early unit closes the public ports before the network and sshd are up");
    boot_without_agent(lab, &root)?;
    let public: SocketAddr = (lab.host("fw").addr, 22).into();
    closed_from_the_data_center(lab, public)?;

    step("vpn-agent starts from exactly those files, as its unit would, and joins");
    start_agent(lab, "fw", &root)?;
    let node = wait_online(lab, "fw", MACHINE)?;
    wait_status(lab, "fw", "Running", |s| s["backend_state"] == "Running")?;
    ensure!(
        !root.join("etc/vpn-agent/authkey").exists(),
        "the used pre-auth key is still on disk"
    );
    println_indented(&lab.log("fw", AGENT_LOG));
    cmd::run(
        lab.host("fw")
            .ns()
            .command("ip")
            .args(["-br", "addr", "show", "dev", "tailscale0"]),
    )?;

    step("an operator mints a key for their laptop and joins with stock tailscale");
    let op_key = cmd::run_quiet(
        udg()
            .env("HEADSCALE_API_KEY", &api_key)
            .args([
                "auth-key",
                "--project",
                PROJECT,
                "--headscale-api-url",
                &hs.url(),
            ])
            .args(["--ca-file", &hs.ca_path().display().to_string()]),
    )?;
    let op = lab.start_tailscaled("op")?;
    op.up(&hs.url(), op_key.trim(), "op")?;
    let op_ip = op.ipv4()?;
    wait_status(lab, "fw", "the operator", |s| {
        crate::firewall::lists_online_peer(s, &format!("{op_ip}/32"))
    })?;
    cmd::run(&mut status_command(lab, "fw"))?;
    cmd::run(hs.cli().args(["nodes", "list"]))?;

    step("what each node of the project runs: userdata-gen nodes");
    let listed = list_nodes(lab, &api_key, PROJECT)?;
    let version = cmd::run_quiet(Command::new(&fetched).arg("--version"))?;
    let release_of = version
        .trim()
        .strip_prefix("vpn-agent ")
        .and_then(|v| v.split_once(' '))
        .map(|(v, _)| v)
        .unwrap_or_default();
    ensure!(
        listed.contains(&format!("vpn-agent-{release_of}-")) && listed.contains(MACHINE),
        "userdata-gen nodes does not show the firewall's agent version:\n{listed}"
    );

    step("the operator pings the firewall and logs in with ssh, over the mesh");
    let fw_ip: IpAddr = node.addresses.first().context("no mesh address")?.parse()?;
    cmd::run(op.cli().args(["ping", "-c", "5", &fw_ip.to_string()]))?;
    crate::smoke::icmp(lab, "op", fw_ip)?;
    let authorized = lab.host_dir("fw").join("sshd/authorized_keys");
    let whoami = "echo logged in to $(hostname -I | tr ' ' '\\n' | grep ^100.) over the mesh";
    crate::firewall::ssh(lab, "op", fw_ip, &authorized, whoami)?;
    cmd::run(&mut status_command(lab, "fw"))?;

    step("the same sshd on the public address: closed, and the firewall's own table unchanged");
    closed_from_the_data_center(lab, public)?;
    let metal = nft_list_metal(lab)?;
    ensure!(
        metal.contains("iifname \"tailscale*\" accept"),
        "metal's table changed:\n{metal}"
    );

    step("no UDP between the operator and the firewall: DERP relays, ssh still works");
    lab.block_udp("fw", "op")?;
    wait_status(lab, "fw", "the operator via DERP", |s| {
        s["peers"][0]["path"] == "DERP(headscale)"
    })?;
    cmd::run(op.cli().args([
        "ping",
        "-c",
        "2",
        "--until-direct=false",
        &fw_ip.to_string(),
    ]))?;
    crate::firewall::ssh(lab, "op", fw_ip, &authorized, whoami)?;
    cmd::run(&mut status_command(lab, "fw"))?;
    lab.unblock_udp("fw", "op")?;
    let out = op.ping(fw_ip, true)?;
    ensure!(
        out.contains("via 192.0.2."),
        "no direct path after UDP opened again: {out}"
    );
    println_indented(&out);

    step("the agent crashes (kill -9): the public port stays closed");
    lab.kill9("fw", AGENT_LOG)?;
    closed_from_the_data_center(lab, public)?;
    cmd::run(
        lab.host("fw")
            .ns()
            .command("nft")
            .args(["list", "table", "inet", "vpn_agent"]),
    )?;

    step("power cycle: the firewall's namespace is rebuilt, its disk kept; it boots again");
    lab.reboot("fw")?;
    boot_without_agent(lab, &root)?;
    closed_from_the_data_center(lab, public)?;
    start_agent(lab, "fw", &root)?;
    let again = wait_online(lab, "fw", MACHINE)?;
    ensure!(
        again.id == node.id,
        "the firewall came back as a new node: {again:?}"
    );
    let log = lab.wait_log(
        "fw",
        AGENT_LOG,
        "re-attached to headscale with the stored node key",
        Duration::from_secs(30),
    )?;
    println_indented(&log.lines().take(3).collect::<Vec<_>>().join("\n"));
    wait_status(lab, "fw", "the operator", |s| {
        crate::firewall::lists_online_peer(s, &format!("{op_ip}/32"))
    })?;
    wait_banner(&lab.host("op").ns(), (fw_ip, 22).into())?;
    crate::firewall::ssh(lab, "op", fw_ip, &authorized, whoami)?;
    closed_from_the_data_center(lab, public)?;
    cmd::run(&mut status_command(lab, "fw"))?;

    step(
        "headscale goes away, and the firewall power-cycles meanwhile: the agent starts on its cached netmap",
    );
    lab.cut_off("ctl")?;
    lab.reboot("fw")?;
    boot_without_agent(lab, &root)?;
    start_agent(lab, "fw", &root)?;
    let took = crate::firewall::time_to_connect(
        &lab.host("op").ns(),
        (fw_ip, 22).into(),
        Duration::from_secs(30),
    )
    .with_context(|| {
        format!(
            "the operator never got in with headscale away\n{}",
            lab.log_tail("fw", AGENT_LOG)
        )
    })?;
    println_indented(&format!(
        "the operator's ssh port answers {took:.1?} after the agent started"
    ));
    crate::firewall::ssh(lab, "op", fw_ip, &authorized, whoami)?;
    closed_from_the_data_center(lab, public)?;
    cmd::run(&mut status_command(lab, "fw"))?;

    step("headscale is back: the agent follows the live map again, without a key");
    lab.reconnect("ctl")?;
    wait_status(lab, "fw", "control back", |s| {
        s["control_connected"] == true && s["cached_netmap_of"].is_null()
    })?;
    cmd::run(&mut status_command(lab, "fw"))?;

    management_server(lab, step, &api_key, &op)
}

/// The last act: a management server, which metal-api does not allocate, joins with a key
/// from `userdata-gen auth-key` and config files written by hand; bmc-reverse-proxy and SSH
/// answer only over the mesh, and the operator opens the BMC through it.
fn management_server(
    lab: &Lab,
    step: &mut dyn FnMut(&str),
    api_key: &str,
    op: &crate::tailscale::Tailscaled,
) -> Result<()> {
    let hs = lab.headscale();
    step("a management server: a key from userdata-gen auth-key, the agent's files by hand");
    let key = cmd::run_quiet(
        lab.host("ctl")
            .ns()
            .command(tools::project_bin("userdata-gen"))
            .env("HEADSCALE_API_KEY", api_key)
            .args([
                "auth-key",
                "--project",
                "partition-mgmt",
                "--tags",
                "tag:mgmt",
            ])
            .args(["--headscale-api-url", &hs.url()])
            .args(["--ca-file", &hs.ca_path().display().to_string()]),
    )?;
    let etc = lab.host_dir("mgmt").join("root/etc/vpn-agent");
    std::fs::create_dir_all(&etc)?;
    crate::headscale::write_private(&etc.join("authkey"), key.trim().as_bytes())?;
    std::fs::copy(hs.ca_path(), etc.join("ca.pem"))?;
    let mesh = serde_json::json!({
        "Version": "alpha0",
        "ServerURL": hs.url(),
        "AuthKey": "file:/etc/vpn-agent/authkey",
        "Hostname": MGMT,
        "AdvertiseRoutes": [MGMT_NET],
    });
    let agent = serde_json::json!({
        "version": 1,
        "interface": "tailscale0",
        "ssh_port": 22,
        "closed_tcp_ports": [22],
        "listen_port": 41641,
        "ca_file": "/etc/vpn-agent/ca.pem",
        "services": [{"name": "bmc-reverse-proxy", "protocol": "tcp", "port": PROXY}],
    });
    for (file, v) in [("tailscaled.conf", mesh), ("agent.json", agent)] {
        crate::headscale::write_private(
            &etc.join(file),
            serde_json::to_string_pretty(&v)?.as_bytes(),
        )?;
        cmd::run(Command::new("cat").arg(etc.join(file)))?;
    }
    crate::firewall::serve_http(lab, "mgmt", "0.0.0.0".parse()?, PROXY)?;
    let mgmt_keys = start_sshd(lab, "mgmt")?;
    let bmc: IpAddr = crate::lab::lan_addr(0).into();
    let bmc_keys = start_sshd(lab, "bmc")?;
    let bmc_ca = crate::firewall::serve_https(lab, "bmc", bmc)?;
    start_agent(lab, "mgmt", &lab.host_dir("mgmt").join("root"))?;
    let node = wait_online(lab, "mgmt", MGMT)?;
    let mgmt_ip: IpAddr = node.addresses.first().context("no mesh address")?.parse()?;
    // A tagged node belongs to its tags, not the project's user: listed through its key.
    let listed = list_nodes(lab, api_key, "partition-mgmt")?;
    ensure!(
        listed.contains(MGMT) && listed.contains("vpn-agent-"),
        "userdata-gen nodes does not list the tagged management server:\n{listed}"
    );

    step(
        "from the data center, neither bmc-reverse-proxy nor SSH on the management server answers",
    );
    let dc = lab.host("dc").ns();
    let under: IpAddr = lab.host("mgmt").addr.into();
    for port in [PROXY, 22] {
        ensure!(
            !crate::firewall::connects(&dc, (under, port).into()),
            "the data center reached mgmt:{port}"
        );
        println_indented(&format!("{under}:{port} from dc: no answer"));
    }

    step("an admin approves the management network; the operator accepts routes");
    cmd::run(hs.cli().args(["nodes", "list-routes"]))?;
    hs.approve_routes(MGMT, &[MGMT_NET])?;
    cmd::run(op.cli().args(["set", "--accept-routes"]))?;
    wait_status(lab, "mgmt", "the approved route", |s| {
        s["approved_routes"] == serde_json::json!([MGMT_NET])
    })?;
    cmd::run(&mut status_command(lab, "mgmt"))?;

    step("over the mesh the operator reaches the console proxy, and opens the BMC through mgmt");
    let opns = lab.host("op").ns();
    ensure!(crate::firewall::connects(&opns, (mgmt_ip, PROXY).into()));
    crate::firewall::ssh(
        lab,
        "op",
        mgmt_ip,
        &mgmt_keys,
        "echo logged in to $(hostname)",
    )?;
    let page = crate::firewall::retry(Duration::from_secs(20), || {
        crate::firewall::https_get(&opns, bmc, &bmc_ca)
    })?;
    println_indented(&format!("https://{bmc}/ answers: {}", page.trim()));
    let seen = crate::firewall::ssh(lab, "op", bmc, &bmc_keys, "echo bmc sees $SSH_CONNECTION")?;
    ensure!(
        page.trim() == format!("client {}", crate::lab::LAN_ROUTER),
        "the BMC should see the management server's LAN address: {page}"
    );
    ensure!(seen.contains(&crate::lab::LAN_ROUTER.to_string()), "{seen}");
    Ok(())
}

/// What the early unit, the firewall's own ruleset and sshd do at boot, before the agent.
/// `userdata-gen nodes` for `project` on headscale's host (its debug listener answers
/// loopback, and gives the versions): the table it prints.
fn list_nodes(lab: &Lab, api_key: &str, project: &str) -> Result<String> {
    let hs = lab.headscale();
    cmd::run(
        lab.host("ctl")
            .ns()
            .command(tools::project_bin("userdata-gen"))
            .env("HEADSCALE_API_KEY", api_key)
            .args(["nodes", "--project", project])
            .args(["--headscale-api-url", &hs.url()])
            .args(["--ca-file", &hs.ca_path().display().to_string()])
            .args(["--headscale-debug-url", "http://127.0.0.1:9090"]),
    )
}

fn boot_without_agent(lab: &Lab, root: &Path) -> Result<()> {
    let ns = lab.host("fw").ns();
    crate::firewall::run_early_unit(lab, "fw", root)?;
    let metal = lab.host_dir("fw").join("metal.nft");
    std::fs::write(&metal, METAL_RULESET)?;
    cmd::run_quiet(ns.command("nft").arg("-f").arg(&metal))?;
    start_sshd(lab, "fw")?;
    // sshd answers locally, so what the data center sees is the firewall's doing.
    wait_banner(&ns, (std::net::Ipv4Addr::LOCALHOST, 22).into())?;
    Ok(())
}

fn closed_from_the_data_center(lab: &Lab, public: SocketAddr) -> Result<()> {
    match banner(&lab.host("dc").ns(), public, Duration::from_secs(2)) {
        Ok(b) => bail!("SSH on the public address {public} answered the data center: {b}"),
        Err(_) => {
            if cmd::echo_enabled() {
                println!("    {public} from dc: no answer (dropped by table inet vpn_agent)");
            }
            Ok(())
        }
    }
}

fn nft_list_metal(lab: &Lab) -> Result<String> {
    cmd::run_quiet(
        lab.host("fw")
            .ns()
            .command("nft")
            .args(["list", "table", "inet", "metal"]),
    )
}

/// Every file and unit of the user's own config is on the firewall's disk as asked.
fn users_files_in_place(user: &serde_json::Value, root: &Path) -> Result<()> {
    for f in user["storage"]["files"].as_array().into_iter().flatten() {
        let path = f["path"].as_str().context("file without a path")?;
        let on_disk = root.join(path.trim_start_matches('/'));
        ensure!(
            on_disk.exists(),
            "the user's {path} is missing after Ignition"
        );
    }
    for u in user["systemd"]["units"].as_array().into_iter().flatten() {
        let name = u["name"].as_str().context("unit without a name")?;
        if u["contents"].is_string() {
            let on_disk = root.join("etc/systemd/system").join(name);
            ensure!(
                on_disk.exists(),
                "the user's unit {name} is missing after Ignition"
            );
        }
    }
    Ok(())
}

fn println_indented(text: &str) {
    if cmd::echo_enabled() {
        for l in text.lines() {
            println!("    {l}");
        }
    }
}
