//! The lab's own end-to-end tests: real headscale, real tailscaled, real namespaces.

use std::time::Duration;
use vdc::headscale::KeyOptions;
use vdc::{Lab, LabOptions, require_lab};

#[test]
fn hosts_cannot_reach_outside_the_lab() {
    require_lab!();
    let lab = Lab::start(LabOptions::hosts(&["fw", "op"])).unwrap();
    for host in ["ctl", "fw", "op"] {
        lab.assert_isolated(host).unwrap();
    }
    // Hosts do reach each other on the underlay.
    let ctl = lab.host("ctl").addr.to_string();
    vdc::cmd::run(
        lab.host("fw")
            .ns()
            .command("ping")
            .args(["-c", "1", "-W", "2", &ctl]),
    )
    .unwrap();
}

#[test]
fn headscale_cli_and_rest_agree() {
    require_lab!();
    let lab = Lab::start(LabOptions::hosts(&[])).unwrap();
    let hs = lab.headscale();
    let user = hs.create_user("alice").unwrap();
    let rest = hs.rest(&hs.create_api_key().unwrap());
    assert_eq!(rest.ensure_user("alice").unwrap(), user);
    let bob = rest.ensure_user("bob").unwrap();
    assert_ne!(bob.id, user.id);
    let opts = KeyOptions {
        expiration: Duration::from_secs(600),
        tags: vec![],
        ..KeyOptions::default()
    };
    let a = hs.create_preauth_key(&user, &opts).unwrap();
    let b = rest.create_preauth_key(&bob, &opts).unwrap();
    assert!(a.key.starts_with("hskey-auth-"), "unexpected key format");
    assert!(b.key.starts_with("hskey-auth-"), "unexpected key format");
    assert!(rest.nodes().unwrap().is_empty());
}

#[test]
fn a_cut_off_host_is_unreachable_until_reconnected() {
    require_lab!();
    let lab = Lab::start(LabOptions::hosts(&["fw"])).unwrap();
    let ctl = lab.host("ctl").addr.to_string();
    let ping = || {
        vdc::cmd::output(
            lab.host("fw")
                .ns()
                .command("ping")
                .args(["-c", "1", "-W", "1", &ctl]),
        )
        .unwrap()
        .status
        .success()
    };
    assert!(ping());
    lab.cut_off("ctl").unwrap();
    assert!(!ping(), "ctl still answers while cut off");
    lab.reconnect("ctl").unwrap();
    assert!(ping());
}

#[test]
fn two_tailscale_nodes_reach_each_other_via_derp_then_direct() {
    require_lab!();
    let lab = Lab::start(LabOptions::hosts(vdc::smoke::HOSTS)).unwrap();
    let report = vdc::smoke::run(&lab, &mut |_| {}).unwrap();
    eprintln!("relayed: {}, direct: {}", report.relayed, report.direct);
}

#[test]
fn a_tailscale_node_behind_nat_reaches_a_peer_directly_through_its_gateway() {
    require_lab!();
    let lab = Lab::start(LabOptions {
        hosts: vec!["fw".into()],
        behind_nat: vec!["home".into()],
        ..LabOptions::default()
    })
    .unwrap();
    lab.assert_isolated("home").unwrap();
    let hs = lab.headscale();
    let user = hs.create_user("nat").unwrap();
    let fw = lab.start_tailscaled("fw").unwrap();
    let home = lab.start_tailscaled("home").unwrap();
    for (ts, name) in [(&fw, "fw"), (&home, "home")] {
        let key = hs
            .create_preauth_key(&user, &KeyOptions::default())
            .unwrap();
        ts.up(&hs.url(), &key.key, name).unwrap();
    }
    // fw sees the NATed node at its gateway's underlay address, not its private one.
    let out = fw.ping(home.ipv4().unwrap(), true).unwrap();
    let gw = lab.host("homegw").addr.to_string();
    assert!(out.contains(&format!("via {gw}:")), "{out}");
    vdc::smoke::icmp(&lab, "home", fw.ipv4().unwrap()).unwrap();
}
