//! vpn-agent against real headscale: registration with a key minted by userdata-gen, from
//! the files real Ignition wrote, restarts without a key, and refusals.

use std::time::Duration;
use vdc::firewall::{
    AGENT_LOG, agent_status, join_operator, provision, start_agent, wait_online, wait_status,
};
use vdc::headscale::KeyOptions;
use vdc::{Lab, LabOptions, require_lab};

const MACHINE: &str = "0cfc7e24-aaaa-4bbb-8ccc-0000000000f1";

#[test]
fn agent_joins_with_the_generated_userdata_and_rejoins_without_a_key() {
    require_lab!();
    let lab = Lab::start(LabOptions::hosts(&["fw", "op"])).unwrap();
    let fw = provision(&lab, "fw", MACHINE, "project-a", &[]).unwrap();
    let key_file = fw.root.join("etc/vpn-agent/authkey");
    assert!(key_file.exists());

    start_agent(&lab, "fw", &fw.root).unwrap();
    let node = wait_online(&lab, "fw", MACHINE).unwrap();
    assert_eq!(node.user, "project-a");
    assert_eq!(node.addresses.len(), 2, "{node:?}");
    lab.wait_log(
        "fw",
        AGENT_LOG,
        "used pre-auth key scrubbed",
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(!key_file.exists(), "the used key is still on disk");
    let log = lab.log("fw", AGENT_LOG);
    let key = fw.root.join("var/lib/vpn-agent/identity.json");
    assert!(
        !log.contains("hskey-auth-"),
        "the key is in the log:\n{log}"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // The tunnel interface: MTU 1280, the mesh addresses, the mesh prefixes routed into it.
    let ns = lab.host("fw").ns();
    let link = ns.ip(&["-o", "link", "show", "tailscale0"]).unwrap();
    assert!(link.contains("mtu 1280") && link.contains("UP"), "{link}");
    let addrs = ns.ip(&["-o", "addr", "show", "dev", "tailscale0"]).unwrap();
    for a in &node.addresses {
        assert!(
            addrs.contains(&format!(" {a}/")),
            "{a} not on tailscale0: {addrs}"
        );
    }
    let routes4 = ns.ip(&["route", "show", "dev", "tailscale0"]).unwrap();
    assert!(routes4.contains("100.64.0.0/10"), "{routes4}");
    let routes6 = ns
        .ip(&["-6", "route", "show", "dev", "tailscale0"])
        .unwrap();
    assert!(routes6.contains("fd7a:115c:a1e0::/48"), "{routes6}");

    // The real sshd on fw: the agent's table (from the settings Ignition wrote) keeps the
    // data center's hosts off its public address.
    vdc::firewall::start_sshd(&lab, "fw").unwrap();
    let public: std::net::SocketAddr = (lab.host("fw").addr, 22).into();
    let local: std::net::SocketAddr = ([127, 0, 0, 1], 22).into();
    vdc::firewall::wait_banner(&ns, local).expect("sshd does not answer on loopback");
    assert!(vdc::firewall::banner(&lab.host("op").ns(), public, Duration::from_secs(2)).is_err());

    // Someone deletes the agent's nftables table: the agent puts it back.
    vdc::cmd::run_quiet(
        ns.command("nft")
            .args(["delete", "table", "inet", "vpn_agent"]),
    )
    .unwrap();
    lab.wait_log("fw", AGENT_LOG, "restored", Duration::from_secs(15))
        .unwrap();
    assert!(firewall_intact(&lab, &fw.root));

    // Status over the socket, and the netmap following headscale: a stock node joins...
    let st = wait_status(&lab, "fw", "Running", |s| s["backend_state"] == "Running").unwrap();
    assert_eq!(st["control_connected"], true);
    let hs = lab.headscale();
    let op = lab.join_tailscaled("op", "ops").unwrap();
    let op_ip = format!("{}/32", op.ipv4().unwrap());
    let has_op = |s: &serde_json::Value| vdc::firewall::lists_online_peer(s, &op_ip);
    let st = wait_status(&lab, "fw", "the operator's node", has_op).unwrap();
    let op_node = hs
        .nodes()
        .unwrap()
        .into_iter()
        .find(|n| n.name == "op")
        .unwrap();
    let peer = st["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str().unwrap().starts_with("op."))
        .unwrap();
    let want: Vec<String> = op_node
        .addresses
        .iter()
        .map(|a| {
            if a.contains(':') {
                format!("{a}/128")
            } else {
                format!("{a}/32")
            }
        })
        .collect();
    assert_eq!(peer["addresses"], serde_json::json!(want));
    // ... and is deleted: it leaves the netmap.
    lab.stop("op", "tailscaled").unwrap();
    vdc::cmd::run_quiet(hs.cli().args([
        "nodes",
        "delete",
        "--identifier",
        &op_node.id.to_string(),
        "--force",
    ]))
    .unwrap();
    if lab.headscale().version() == "v0.27.1" {
        // headscale v0.27 tells no one when the deleted node was their only peer, not even
        // that it went offline (fixed in v0.28): it stays in the map until the next full map.
        std::thread::sleep(Duration::from_secs(5));
        let st = vdc::firewall::agent_status(&lab, "fw").unwrap();
        assert_eq!(st["peers"].as_array().map(Vec::len), Some(1), "{st}");
    } else {
        wait_status(&lab, "fw", "the deleted node gone", |s| {
            s["peers"].as_array().is_some_and(|p| p.is_empty())
        })
        .unwrap();
    }

    // headscale restarts under the running agent: it reconnects and the map resumes.
    lab.restart_headscale().unwrap();
    lab.wait_log(
        "fw",
        AGENT_LOG,
        "control connection failed",
        Duration::from_secs(30),
    )
    .unwrap();
    wait_status(&lab, "fw", "control again", |s| {
        s["control_connected"] == true && s["error"].is_null()
    })
    .unwrap();
    wait_online(&lab, "fw", MACHINE).unwrap();

    // A restart (the key is gone) re-attaches the same node: headscale keeps one, not two.
    lab.stop("fw", AGENT_LOG).unwrap();
    lab.headscale()
        .wait_nodes("the agent offline", Duration::from_secs(30), |n| {
            n.iter().all(|n| !n.online)
        })
        .unwrap();
    start_agent(&lab, "fw", &fw.root).unwrap();
    let again = wait_online(&lab, "fw", MACHINE).unwrap();
    assert_eq!(again.id, node.id);
    assert_eq!(again.addresses, node.addresses);
    lab.wait_log(
        "fw",
        AGENT_LOG,
        "re-attached to headscale",
        Duration::from_secs(10),
    )
    .unwrap();

    // And after kill -9; meanwhile the public ports stay closed (fail closed). The crash
    // came, say, after the identity was saved but before the used key was scrubbed: the
    // key file is back on disk, and the re-attach scrubs it.
    lab.kill9("fw", AGENT_LOG).unwrap();
    assert!(firewall_intact(&lab, &fw.root));
    let key_file = fw.root.join("etc/vpn-agent/authkey");
    std::fs::write(&key_file, "hskey-auth-used-before-the-crash").unwrap();
    start_agent(&lab, "fw", &fw.root).unwrap();
    lab.wait_log(
        "fw",
        AGENT_LOG,
        "re-attached to headscale",
        Duration::from_secs(20),
    )
    .unwrap();
    let after = wait_online(&lab, "fw", MACHINE).unwrap();
    assert_eq!(after.id, node.id);
    let start = std::time::Instant::now();
    while key_file.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the used key stayed on disk after the re-attach:\n{}",
            lab.log_tail("fw", AGENT_LOG)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn refused_keys_say_why_and_back_off() {
    require_lab!();
    let lab = Lab::start(LabOptions::hosts(&["fw"])).unwrap();
    let hs = lab.headscale();
    let fw = provision(&lab, "fw", MACHINE, "project-b", &[]).unwrap();
    let key_file = fw.root.join("etc/vpn-agent/authkey");
    let user = hs.create_user("other").unwrap();
    let cases = [
        ("already used", {
            let k = hs
                .create_preauth_key(&user, &KeyOptions::default())
                .unwrap();
            let ts = lab.start_tailscaled("fw").unwrap();
            ts.up(&hs.url(), &k.key, "first").unwrap();
            lab.stop("fw", "tailscaled").unwrap();
            k.key
        }),
        ("expired", {
            let k = hs
                .create_preauth_key(
                    &user,
                    &KeyOptions {
                        expiration: Duration::from_secs(1),
                        ..KeyOptions::default()
                    },
                )
                .unwrap();
            std::thread::sleep(Duration::from_secs(2));
            k.key
        }),
        (
            "does not know this pre-auth key",
            format!("hskey-auth-{}-{}", "a".repeat(12), "b".repeat(64)),
        ),
    ];
    for (i, (want, key)) in cases.into_iter().enumerate() {
        std::fs::write(&key_file, &key).unwrap();
        let state = fw.root.join("var/lib/vpn-agent");
        let _ = std::fs::remove_dir_all(&state);
        start_agent(&lab, "fw", &fw.root).unwrap();
        let log = lab
            .wait_log(
                "fw",
                AGENT_LOG,
                "headscale refused the registration",
                Duration::from_secs(20),
            )
            .unwrap();
        assert!(log.contains(want), "case {i}: {log}");
        let st = agent_status(&lab, "fw").unwrap();
        assert_eq!(st["backend_state"], "NeedsLogin", "case {i}: {st}");
        assert!(
            st["error"].as_str().unwrap().contains(want),
            "case {i}: {st}"
        );
        assert!(log.contains("retry_in="), "case {i}: no backoff in {log}");
        assert!(!log.contains(&key), "case {i}: the key is in the log");
        lab.stop("fw", AGENT_LOG).unwrap();
    }
}

#[test]
fn tags_from_the_generated_userdata_reach_headscale() {
    require_lab!();
    let lab = Lab::start(LabOptions::hosts(&["fw"])).unwrap();
    let fw = provision(
        &lab,
        "fw",
        MACHINE,
        "project-c",
        &["--tags", "tag:firewall"],
    )
    .unwrap();
    // systemd's readiness protocol: the agent says READY=1 once its local side is up.
    let notify = vdc::firewall::Notify::bind(&lab, "fw");
    let mut c = vdc::firewall::agent_command(&lab, "fw", &fw.root).unwrap();
    c.env("NOTIFY_SOCKET", &notify.path);
    lab.spawn("fw", AGENT_LOG, c).unwrap();
    let first = notify.next(Duration::from_secs(60)).unwrap_or_default();
    assert!(first.contains("READY=1"), "{first:?}");
    let node = wait_online(&lab, "fw", MACHINE).unwrap();
    assert_eq!(node.tags, vec!["tag:firewall".to_string()]);
    // headscale v0.28 and later list tagged nodes under their pseudo-user; v0.27 under the
    // user the key belongs to, the project's.
    let owner = match lab.headscale().version() {
        "v0.27.1" => "project-c",
        _ => "tagged-devices",
    };
    assert_eq!(node.user, owner, "headscale {}", lab.headscale().version());
}

#[test]
fn a_bad_config_fails_before_touching_anything() {
    require_lab!();
    let lab = Lab::start(LabOptions::hosts(&["fw"])).unwrap();
    let dir = lab.host_dir("fw");
    std::fs::write(
        dir.join("bad.conf"),
        r#"{"Version":"alpha0","AuthKey":"file:/x"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("agent.json"),
        serde_json::to_string(&userdata_gen::AgentSettings::default()).unwrap(),
    )
    .unwrap();
    let out = vdc::cmd::quiet_output(
        lab.host("fw")
            .ns()
            .command(vdc::tools::project_bin("vpn-agent"))
            .args(["run", "--config"])
            .arg(dir.join("bad.conf"))
            .arg("--settings")
            .arg(dir.join("agent.json"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--socket")
            .arg(dir.join("s.sock")),
    )
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("bad.conf") && err.contains("ServerURL is missing"),
        "{err}"
    );
    assert!(
        !dir.join("state").exists(),
        "state written despite the bad config"
    );
    let links = lab.host("fw").ns().ip(&["-o", "link"]).unwrap();
    assert!(!links.contains("tailscale0"), "{links}");
}

/// `vpn-agent firewall check` on fw, with the settings Ignition wrote.
fn firewall_intact(lab: &Lab, root: &std::path::Path) -> bool {
    vdc::cmd::quiet_output(
        lab.host("fw")
            .ns()
            .command(vdc::tools::project_bin("vpn-agent"))
            .args(["firewall", "check", "--settings"])
            .arg(root.join("etc/vpn-agent/agent.json")),
    )
    .unwrap()
    .status
    .success()
}

#[test]
fn a_stock_tailscale_ping_finds_the_direct_path_to_the_agent() {
    require_lab!();
    let lab = Lab::start(LabOptions::hosts(&["fw", "op"])).unwrap();
    let fw = provision(&lab, "fw", MACHINE, "project-d", &[]).unwrap();
    start_agent(&lab, "fw", &fw.root).unwrap();
    let node = wait_online(&lab, "fw", MACHINE).unwrap();
    // The operator's node must be in the agent's netmap before the agent answers it.
    let (op, _) = join_operator(&lab, "op", "fw").unwrap();
    let fw_ip: std::net::IpAddr = node.addresses[0].parse().unwrap();
    // A disco ping (tailscale's default): answered over UDP from the firewall's address.
    let out = op.ping(fw_ip, true).unwrap();
    let direct = format!("via {}:41641", lab.host("fw").addr);
    assert!(out.contains(&direct), "{out}");
    // WireGuard through the agent: ICMP both ways, answered by the kernel behind tailscale0.
    vdc::smoke::icmp(&lab, "op", fw_ip).unwrap();
    vdc::smoke::icmp(&lab, "fw", op.ipv4().unwrap()).unwrap();
    // And the real sshd on the firewall, over the mesh only.
    let authorized = vdc::firewall::start_sshd(&lab, "fw").unwrap();
    let mesh: std::net::SocketAddr = (fw_ip, 22).into();
    let got = vdc::firewall::wait_banner(&lab.host("op").ns(), mesh).unwrap();
    assert!(got.starts_with("SSH-2.0-OpenSSH"), "{got}");
    let out = vdc::firewall::ssh(
        &lab,
        "op",
        fw_ip,
        &authorized,
        "ip -o -4 addr show dev tailscale0",
    )
    .unwrap();
    assert!(out.contains(&fw_ip.to_string()), "{out}");
    let public: std::net::SocketAddr = (lab.host("fw").addr, 22).into();
    assert!(vdc::firewall::banner(&lab.host("op").ns(), public, Duration::from_secs(2)).is_err());
    // Status shows the path, the handshake and the bytes.
    let st = agent_status(&lab, "fw").unwrap();
    let peer = &st["peers"][0];
    assert_eq!(
        peer["path"],
        format!("{}:41641", lab.host("op").addr),
        "{st}"
    );
    assert!(peer["last_handshake_secs"].as_u64().is_some(), "{st}");
    assert!(
        peer["tx_bytes"].as_u64() > Some(0) && peer["rx_bytes"].as_u64() > Some(0),
        "{st}"
    );
}

#[test]
fn two_agents_reach_each_other_directly() {
    require_lab!();
    let lab = Lab::start(LabOptions::hosts(&["fw", "fw2"])).unwrap();
    let m2 = "0cfc7e24-aaaa-4bbb-8ccc-0000000000f2";
    let a = provision(&lab, "fw", MACHINE, "project-e", &[]).unwrap();
    let b = provision(&lab, "fw2", m2, "project-e", &[]).unwrap();
    start_agent(&lab, "fw", &a.root).unwrap();
    start_agent(&lab, "fw2", &b.root).unwrap();
    let na = wait_online(&lab, "fw", MACHINE).unwrap();
    let nb = wait_online(&lab, "fw2", m2).unwrap();
    let (ipa, ipb) = (na.addresses[0].clone(), nb.addresses[0].clone());
    wait_status(&lab, "fw", "fw2 in the netmap", |s| {
        vdc::firewall::lists_online_peer(s, &format!("{ipb}/32"))
    })
    .unwrap();
    wait_status(&lab, "fw2", "fw in the netmap", |s| {
        vdc::firewall::lists_online_peer(s, &format!("{ipa}/32"))
    })
    .unwrap();
    vdc::smoke::icmp(&lab, "fw", ipb.parse().unwrap()).unwrap();
    vdc::smoke::icmp(&lab, "fw2", ipa.parse().unwrap()).unwrap();
}

#[test]
fn with_udp_blocked_the_agent_is_reached_via_derp_and_goes_direct_when_it_opens() {
    require_lab!();
    let lab = Lab::start(LabOptions::hosts(&["fw", "op"])).unwrap();
    // From the start, no UDP between the two: only the relay connects them.
    lab.block_udp("fw", "op").unwrap();
    let fw = provision(&lab, "fw", MACHINE, "project-f", &[]).unwrap();
    start_agent(&lab, "fw", &fw.root).unwrap();
    let node = wait_online(&lab, "fw", MACHINE).unwrap();
    let (op, op_ip) = join_operator(&lab, "op", "fw").unwrap();
    let fw_ip: std::net::IpAddr = node.addresses[0].parse().unwrap();
    // The agent reported headscale's region as its home: the operator knows where to relay.
    let peer = op.peer(fw_ip).unwrap();
    assert_eq!(peer["Relay"], "headscale", "{peer}");
    let out = op.ping(fw_ip, false).unwrap();
    assert!(out.contains("via DERP(headscale)"), "{out}");
    vdc::smoke::icmp(&lab, "op", fw_ip).unwrap();
    vdc::smoke::icmp(&lab, "fw", op_ip).unwrap();
    let authorized = vdc::firewall::start_sshd(&lab, "fw").unwrap();
    vdc::firewall::wait_banner(&lab.host("op").ns(), (fw_ip, 22).into()).unwrap();
    let out = vdc::firewall::ssh(&lab, "op", fw_ip, &authorized, "hostname").unwrap();
    assert!(!out.trim().is_empty(), "{out}");
    let derp_path = |s: &serde_json::Value| s["peers"][0]["path"] == "DERP(headscale)";
    wait_status(&lab, "fw", "the operator via DERP", derp_path).unwrap();
    // UDP opens: both sides find the direct path, the tunnel stays.
    lab.unblock_udp("fw", "op").unwrap();
    let out = op.ping(fw_ip, true).unwrap();
    assert!(
        out.contains(&format!("via {}:41641", lab.host("fw").addr)),
        "{out}"
    );
    let direct = format!("{}:41641", lab.host("op").addr);
    wait_status(&lab, "fw", "the operator directly", |s| {
        vdc::smoke::icmp(&lab, "fw", op_ip).is_ok() && s["peers"][0]["path"] == direct.as_str()
    })
    .unwrap();
    // And closes again: traffic falls back to the relay within seconds.
    lab.block_udp("fw", "op").unwrap();
    wait_status(&lab, "fw", "the operator via DERP again", |s| {
        vdc::smoke::icmp(&lab, "fw", op_ip).is_ok() && derp_path(s)
    })
    .unwrap();
    vdc::smoke::icmp(&lab, "op", fw_ip).unwrap();
}

#[test]
fn an_agent_behind_nat_learns_its_public_endpoint_by_stun_and_is_reached_directly() {
    require_lab!();
    let lab = Lab::start(LabOptions {
        hosts: vec!["op".into()],
        behind_nat: vec!["fw".into()],
        ..LabOptions::default()
    })
    .unwrap();
    let fw = provision(&lab, "fw", MACHINE, "project-g", &[]).unwrap();
    start_agent(&lab, "fw", &fw.root).unwrap();
    let node = wait_online(&lab, "fw", MACHINE).unwrap();
    let (op, _) = join_operator(&lab, "op", "fw").unwrap();
    let fw_ip: std::net::IpAddr = node.addresses[0].parse().unwrap();
    // The agent's private address means nothing to the operator; STUN against headscale
    // told the agent its address on the gateway, and control passed it on.
    let gw = lab.host("fwgw").addr.to_string();
    let log = lab
        .wait_log("fw", AGENT_LOG, &format!("({gw}:"), Duration::from_secs(30))
        .unwrap();
    assert!(log.contains("telling control our new endpoints"), "{log}");
    // Both sides ping (call-me-maybe through DERP), the NAT mapping opens: a direct path.
    let out = op.ping(fw_ip, true).unwrap();
    assert!(out.contains(&format!("via {gw}:")), "{out}");
    vdc::smoke::icmp(&lab, "op", fw_ip).unwrap();
    vdc::smoke::icmp(&lab, "fw", op.ipv4().unwrap()).unwrap();
}
