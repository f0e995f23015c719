//! The lab's own proof: two stock tailscaled join headscale and reach each other, first
//! relayed through the embedded DERP server (UDP between them blocked), then directly.

use crate::Lab;
use crate::headscale::{DERP_REGION_CODE, KeyOptions};
use crate::tailscale::{PeerPath, Tailscaled};
use anyhow::{Context, Result, bail};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The hosts the smoke test needs.
pub const HOSTS: &[&str] = &["fw", "op"];

/// What the smoke test saw.
#[derive(Debug, Clone)]
pub struct SmokeReport {
    pub relayed: PeerPath,
    pub relayed_ping: String,
    pub direct: PeerPath,
    pub direct_ping: String,
}

/// Runs the smoke scenario on `lab`, announcing each step through `step`.
pub fn run(lab: &Lab, step: &mut dyn FnMut(&str)) -> Result<SmokeReport> {
    let hs = lab.headscale();
    step("create a headscale user and an API key (headscale CLI)");
    let user = hs.create_user("smoke")?;
    let api_key = hs.create_api_key()?;
    let rest = hs.rest(&api_key);

    step("mint one pre-auth key with the CLI and one with the REST API (bearer API key)");
    let key_fw = hs.create_preauth_key(&user, &KeyOptions::default())?;
    let key_op = rest.create_preauth_key(&user, &KeyOptions::default())?;

    step("block UDP between fw and op in the lab switch, so only the DERP relay connects them");
    lab.block_udp("fw", "op")?;

    step("start stock tailscaled on fw and op, and join both to headscale");
    let fw = lab.start_tailscaled("fw")?;
    let op = lab.start_tailscaled("op")?;
    fw.up(&hs.url(), &key_fw.key, "fw")?;
    op.up(&hs.url(), &key_op.key, "op")?;
    let nodes = rest.nodes()?;
    for want in ["fw", "op"] {
        let n = nodes
            .iter()
            .find(|n| n.given_name == want || n.name == want)
            .with_context(|| format!("headscale lists no node {want}: {nodes:?}"))?;
        if !n.online {
            bail!("headscale lists node {want} as offline: {n:?}");
        }
    }
    let fw_ip = fw.ipv4()?;
    let op_ip = op.ipv4()?;

    step("ping op -> fw: the path must be the DERP relay");
    let relayed_ping = op.ping(fw_ip, false)?;
    let fw_addr = lab.host("fw").addr.to_string();
    if !relayed_ping.contains(&format!("via DERP({DERP_REGION_CODE})"))
        || relayed_ping.contains(&format!("via {fw_addr}:"))
    {
        bail!("with UDP blocked, tailscale ping did not go via DERP: {relayed_ping}");
    }
    icmp(lab, "op", fw_ip)?;
    icmp(lab, "fw", op_ip)?;
    let relayed = wait_path(
        &op,
        fw_ip,
        |p| matches!(p, PeerPath::Derp(r) if r == DERP_REGION_CODE),
    )?;

    step("unblock UDP: the path must upgrade to direct");
    lab.unblock_udp("fw", "op")?;
    let direct_ping = op.ping(fw_ip, true)?;
    if !direct_ping.contains(&format!("via {fw_addr}:")) {
        bail!("with UDP open, tailscale ping did not go direct to {fw_addr}: {direct_ping}");
    }
    icmp(lab, "op", fw_ip)?;
    let direct = wait_path(
        &op,
        fw_ip,
        |p| matches!(p, PeerPath::Direct(a) if a.starts_with(&fw_addr)),
    )?;
    Ok(SmokeReport {
        relayed,
        relayed_ping,
        direct,
        direct_ping,
    })
}

/// Plain ICMP through the tunnel, from `host` to `ip`: proves data moves, not only disco.
pub fn icmp(lab: &Lab, host: &str, ip: IpAddr) -> Result<String> {
    crate::cmd::run(lab.host(host).ns().command("ping").args([
        "-c",
        "3",
        "-i",
        "0.2",
        "-W",
        "3",
        &ip.to_string(),
    ]))
    .with_context(|| format!("ICMP from {host} to {ip} over the mesh"))
}

fn wait_path(ts: &Tailscaled, ip: IpAddr, ok: impl Fn(&PeerPath) -> bool) -> Result<PeerPath> {
    let start = Instant::now();
    loop {
        let p = ts.path_to(ip)?;
        if ok(&p) {
            return Ok(p);
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("tailscale status shows path {p} to {ip}, not the expected one");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}
