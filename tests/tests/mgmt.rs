//! A management server behind the mesh: bmc-reverse-proxy's port and SSH answer only over
//! the tunnel, and the agent routes operators into the management network, where the BMCs
//! are, once headscale approves the route, masqueraded, within headscale's policy, and
//! nothing else.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use vdc::firewall::{
    connects, https_get, serve_http, serve_https, ssh, start_firewall, start_sshd, wait_banner,
    wait_status,
};
use vdc::{LAN_ROUTER, Lab, LabOptions, lan_addr, require_lab};

const MGMT_NET: &str = "198.51.100.0/24";
/// bmc-reverse-proxy's port (metal-stack's default for the serial console).
const PROXY: u16 = 3333;

fn tcp(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// Everyone reaches everything (headscale's behaviour without a policy).
const ALLOW_ALL: &str = r#"{
  "tagOwners": {"tag:mgmt": ["ops@"]},
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
}"#;

/// The operators reach the management server, and the BMC's web interface only. The last
/// rule is what a subnet router needs under any policy: headscale (v0.27 to v0.29) lists an
/// approved route in the router's own node only where the policy lets the router reach it
/// (`CanAccessRoute`); without it the agent cannot tell the route is approved, and forwards
/// nothing into it.
const HTTPS_ONLY: &str = r#"{
  "tagOwners": {"tag:mgmt": ["ops@"]},
  "acls": [
    {"action": "accept", "src": ["ops@"], "dst": ["tag:mgmt:*"]},
    {"action": "accept", "src": ["ops@"], "proto": "tcp", "dst": ["198.51.100.10/32:443"]},
    {"action": "accept", "src": ["tag:mgmt"], "dst": ["198.51.100.0/24:*"]},
  ],
}"#;

/// The operators reach the management server on all its ports, and nothing else.
const MGMT_ONLY: &str = r#"{
  "tagOwners": {"tag:mgmt": ["ops@"]},
  "acls": [{"action": "accept", "src": ["ops@"], "dst": ["tag:mgmt:*"]}],
}"#;

#[test]
fn a_management_server_serves_its_ports_and_its_network_only_over_the_mesh() {
    require_lab!();
    let lab = Lab::start(LabOptions {
        hosts: vec!["mgmt".into(), "op".into(), "dc".into()],
        lan: Some(("mgmt".into(), vec!["bmc".into()])),
        policy: Some(ALLOW_ALL.into()),
        ..LabOptions::default()
    })
    .unwrap();
    let bmc: IpAddr = lan_addr(0).into();
    let mgmt_underlay: IpAddr = lab.host("mgmt").addr.into();
    // The stand-in for bmc-reverse-proxy listens on every address, as the real one does.
    serve_http(&lab, "mgmt", "0.0.0.0".parse().unwrap(), PROXY).unwrap();
    let mgmt_keys = start_sshd(&lab, "mgmt").unwrap();
    let bmc_keys = start_sshd(&lab, "bmc").unwrap();
    let bmc_ca = serve_https(&lab, "bmc", bmc).unwrap();
    let (_m, mgmt_ip) = start_firewall(
        &lab,
        "mgmt",
        "0cfc7e24-aaaa-4bbb-8ccc-00000000b0c0",
        "mgmt",
        &[
            "--tags",
            "tag:mgmt",
            "--mesh-service",
            &format!("bmc-reverse-proxy:tcp/{PROXY}"),
            "--advertise-routes",
            MGMT_NET,
        ],
    )
    .unwrap();
    let op = lab
        .join_tailscaled_with("op", "ops", &["--accept-routes"])
        .unwrap();
    op.wait_peer(mgmt_ip, Duration::from_secs(30)).unwrap();

    // From the data center: neither the proxy nor SSH, and mgmt routes nobody into its LAN.
    let dc = lab.host("dc").ns();
    for port in [PROXY, 22] {
        assert!(
            !connects(&dc, tcp(mgmt_underlay, port)),
            "dc reached mgmt:{port}"
        );
    }
    dc.ip(&["route", "add", MGMT_NET, "via", &mgmt_underlay.to_string()])
        .unwrap();
    assert!(
        !connects(&dc, tcp(bmc, 22)),
        "dc was routed into the management network"
    );
    // Over the mesh: both.
    let opns = lab.host("op").ns();
    wait_banner(&opns, tcp(mgmt_ip, 22)).unwrap();
    assert!(connects(&opns, tcp(mgmt_ip, PROXY)));
    ssh(&lab, "op", mgmt_ip, &mgmt_keys, "true").unwrap();

    // Advertised but not approved: the agent says so, and nothing is forwarded.
    let st = wait_status(&lab, "mgmt", "the advertised route", |s| {
        s["advertised_routes"] == serde_json::json!([MGMT_NET])
    })
    .unwrap();
    assert!(st["approved_routes"].is_null(), "{st}");
    assert!(
        https_get(&opns, bmc, &bmc_ca).is_err(),
        "unapproved, yet bmc answered"
    );

    // Approved: the operator reaches the BMC, which sees mgmt's LAN address.
    let name = lab
        .headscale()
        .node_json("0cfc7e24-aaaa-4bbb-8ccc-00000000b0c0")
        .unwrap();
    println!(
        "    headscale's view of mgmt's routes: {}",
        route_fields(&name)
    );
    lab.headscale()
        .approve_routes("0cfc7e24-aaaa-4bbb-8ccc-00000000b0c0", &[MGMT_NET])
        .unwrap();
    wait_status(&lab, "mgmt", "the approved route", |s| {
        s["approved_routes"] == serde_json::json!([MGMT_NET])
    })
    .unwrap();
    let body = retry(|| https_get(&opns, bmc, &bmc_ca));
    assert_eq!(body.trim(), format!("client {LAN_ROUTER}"));
    let seen = ssh(&lab, "op", bmc, &bmc_keys, "echo $SSH_CONNECTION").unwrap();
    assert!(seen.starts_with(&format!("{LAN_ROUTER} ")), "{seen}");
    println!("    op -> bmc over the mesh: https {body:?}, ssh from {seen:?}");
    // Still nothing from the data center, now that forwarding is on.
    assert!(
        !connects(&dc, tcp(bmc, 22)),
        "dc was routed into the management network"
    );

    // A policy that opens the BMC's HTTPS but not its SSH: headscale still gives the operator
    // the route, its tailscaled sends the SYN to port 22, and the agent's filter, applied to
    // forwarded packets too, drops it.
    lab.set_policy(HTTPS_ONLY).unwrap();
    retry(|| {
        anyhow::ensure!(!connects(&opns, tcp(bmc, 22)), "bmc's ssh still answers");
        Ok(())
    });
    https_get(&opns, bmc, &bmc_ca).unwrap();
    assert!(connects(&opns, tcp(mgmt_ip, 22)));

    // A policy that gives the operators mgmt but not its network.
    lab.set_policy(MGMT_ONLY).unwrap();
    retry(|| match https_get(&opns, bmc, &bmc_ca) {
        Err(_) => Ok(()),
        Ok(b) => anyhow::bail!("bmc still answers: {b}"),
    });
    assert!(
        !connects(&opns, tcp(bmc, 22)),
        "the policy denies the subnet"
    );
    ssh(&lab, "op", mgmt_ip, &mgmt_keys, "true").unwrap();
    assert!(connects(&opns, tcp(mgmt_ip, PROXY)));
}

/// The route fields of headscale's node JSON (their names differ between versions).
fn route_fields(node: &serde_json::Value) -> String {
    node.as_object()
        .map(|o| {
            o.iter()
                .filter(|(k, _)| k.contains("route"))
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// `f` until it succeeds, for up to 20 s: routes reach the client a moment after approval.
fn retry<T>(f: impl FnMut() -> anyhow::Result<T>) -> T {
    vdc::firewall::retry(Duration::from_secs(20), f).unwrap_or_else(|e| panic!("{e:#}"))
}
