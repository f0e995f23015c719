//! What differs between the headscale versions the agent supports, each checked against the
//! version that does it (see `vdc::tools::HEADSCALE_VERSIONS`).

use std::io::{Read, Write};
use std::time::Duration;
use vdc::firewall::{
    AGENT_LOG, join_operator, ssh, start_firewall, start_sshd, wait_banner, wait_status_for,
};
use vdc::{Lab, LabOptions, require_lab};

/// `GET path` on headscale's debug listener (127.0.0.1:9090 inside the control-plane host).
fn debug_page(lab: &Lab, path: &str) -> String {
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    lab.host("ctl")
        .ns()
        .enter(move || {
            let mut s = std::net::TcpStream::connect("127.0.0.1:9090")?;
            s.set_read_timeout(Some(std::time::Duration::from_secs(60)))?;
            s.write_all(req.as_bytes())?;
            let mut page = String::new();
            s.read_to_string(&mut page)?;
            Ok(page)
        })
        .unwrap()
}

/// headscale v0.29 asks nodes to prove they are alive with a `PingRequest` (its HA subnet
/// router prober, and its debug page); the agent answers it as tailscaled does, with a HEAD
/// request to the URL it names. v0.27 and v0.28 never send one.
#[test]
fn headscale_v0_29_ping_requests_are_answered() {
    require_lab!();
    let lab = Lab::start(LabOptions {
        hosts: vec!["fw".into()],
        headscale: Some("v0.29.2"),
        ..LabOptions::default()
    })
    .unwrap();
    let machine = "0cfc7e24-aaaa-4bbb-8ccc-0000000000a9";
    start_firewall(&lab, "fw", machine, "project-v", &[]).unwrap();
    let id = lab.headscale().node_id(machine).unwrap();
    // The page sends the PingRequest and waits up to 30 s for the answer.
    let page = debug_page(&lab, &format!("/debug/ping?node={id}"));
    let verdict = page
        .find("responded in")
        .or_else(|| page.find("did not respond"))
        .map(|i| &page[i.saturating_sub(12)..(i + 40).min(page.len())]);
    println!("    headscale v0.29.2 /debug/ping: {verdict:?}");
    assert!(
        page.contains(&format!("Node {id} responded in")),
        "{page}\n{}",
        lab.log_tail("fw", vdc::firewall::AGENT_LOG)
    );
}

/// Peers act on the capability version a node claims: tailscale v1.102 takes a peer at 121
/// or later for one that speaks peer relay. headscale does not pass the agent's claim on: it
/// stamps every peer's `Cap` with the viewer's own version (`mapper/builder.go`, v0.27 to
/// v0.29), so the claim (113, see `CAPABILITY_VERSION`) only has to pass headscale's gate,
/// which v0.29.2 sets at 113. If a headscale starts passing it on, this test says so.
#[test]
fn headscale_shows_peers_the_viewers_own_capability_version() {
    require_lab!();
    let lab = Lab::start(LabOptions {
        hosts: vec!["fw".into(), "op".into()],
        headscale: Some("v0.29.2"),
        tailscale: Some("v1.102.3"),
        ..LabOptions::default()
    })
    .unwrap();
    let machine = "0cfc7e24-aaaa-4bbb-8ccc-0000000000ab";
    let (_fw, fw_ip) = start_firewall(&lab, "fw", machine, "project-w", &[]).unwrap();
    let (op, _) = join_operator(&lab, "op", "fw").unwrap();
    assert_eq!(op.version(), "v1.102.3");
    op.wait_peer(fw_ip, Duration::from_secs(30)).unwrap();
    let map = op.netmap().unwrap();
    let fw = op.netmap_peer(fw_ip).unwrap();
    // The agent's version and commit reach the peers in Hostinfo, as tailscaled's do.
    let version = vdc::cmd::run_quiet(
        std::process::Command::new(vdc::tools::project_bin("vpn-agent")).arg("--version"),
    )
    .unwrap();
    let (release, commit) = version
        .trim()
        .strip_prefix("vpn-agent ")
        .and_then(|v| v.strip_suffix(')')?.split_once(" (commit "))
        .unwrap_or_else(|| panic!("vpn-agent --version printed {version:?}"));
    assert_eq!(
        fw["Hostinfo"]["IPNVersion"],
        format!("vpn-agent-{release}-{commit}"),
        "{fw}"
    );
    let (theirs, own) = (fw["Cap"].as_u64(), map["SelfNode"]["Cap"].as_u64());
    println!("    tailscale v1.102.3's netmap: the firewall's Cap {theirs:?}, its own {own:?}");
    assert!(own.is_some_and(|c| c >= 121), "{own:?}");
    assert_eq!(
        theirs, own,
        "headscale v0.29.2 passes on the viewer's own version"
    );
}

/// metal-stack upgrades headscale under running firewalls: one registered under v0.28.0 keeps
/// its node, its identity and its operator's ssh after headscale is upgraded in place to
/// v0.29.2 (same database, `headscale serve` restarted on the new binary).
#[test]
fn a_firewall_keeps_its_node_and_its_operator_across_a_headscale_upgrade() {
    require_lab!();
    let mut lab = Lab::start(LabOptions {
        hosts: vec!["fw".into(), "op".into()],
        headscale: Some("v0.28.0"),
        ..LabOptions::default()
    })
    .unwrap();
    let machine = "0cfc7e24-aaaa-4bbb-8ccc-0000000000aa";
    let (_fw, fw_ip) = start_firewall(&lab, "fw", machine, "project-u", &[]).unwrap();
    join_operator(&lab, "op", "fw").unwrap();
    let authorized = start_sshd(&lab, "fw").unwrap();
    wait_banner(&lab.host("op").ns(), (fw_ip, 22).into()).unwrap();
    ssh(&lab, "op", fw_ip, &authorized, "true").unwrap();
    let before = lab.headscale().node_json(machine).unwrap();

    lab.upgrade_headscale("v0.29.2").unwrap();
    let st = wait_status_for(
        &lab,
        "fw",
        "control back after the upgrade",
        Duration::from_secs(60),
        |s| s["control_connected"] == true && s["backend_state"] == "Running",
    )
    .unwrap();
    let after = lab.headscale().node_json(machine).unwrap();
    assert_eq!(after["id"], before["id"], "{after}");
    assert_eq!(after["node_key"], before["node_key"], "{after}");
    assert_eq!(after["ip_addresses"], before["ip_addresses"], "{after}");
    let log = lab.log("fw", AGENT_LOG);
    assert_eq!(
        log.matches("re-attached to headscale with the stored node key")
            .count(),
        1,
        "the agent re-attaches once, after the upgrade, and never needs a key\n{log}"
    );
    assert!(!log.contains("registering with the auth key"), "{log}");
    wait_banner(&lab.host("op").ns(), (fw_ip, 22).into()).unwrap();
    ssh(&lab, "op", fw_ip, &authorized, "true").unwrap();
    // It is v0.29 that answers now: it pings, and the agent answers.
    let id = lab.headscale().node_id(machine).unwrap();
    let page = debug_page(&lab, &format!("/debug/ping?node={id}"));
    assert!(page.contains(&format!("Node {id} responded in")), "{page}");
    println!(
        "    headscale v0.28.0 -> v0.29.2 in place: node {} kept, agent {}",
        after["id"], st["backend_state"]
    );
}
