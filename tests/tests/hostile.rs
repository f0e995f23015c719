//! The agent against people who are not on its side: a router inside the tailnet that
//! serves routes (and could borrow other nodes' addresses), an attacker in the data center
//! flooding the WireGuard port, and a policy that lets the operator in nowhere. Every peer
//! here is real: headscale v0.28, stock tailscaled v1.102, the real sshd.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vdc::firewall::{
    AGENT_LOG, agent_status, join_operator, serve_http, ssh, start_agent, start_firewall,
    start_sshd, wait_status,
};
use vdc::{Lab, LabOptions, require_lab};

/// The subnet the router serves (TEST-NET-2), and its address there.
const SUBNET: &str = "198.51.100.0/24";
const SUBNET_HOST: &str = "198.51.100.1";
/// A UDP port on the firewall where a sink records what arrives.
const SINK: u16 = 9998;

/// The peer with mesh address `ip` in an agent status.
fn peer(status: &serde_json::Value, ip: IpAddr) -> Option<&serde_json::Value> {
    let want = format!("{ip}/32");
    status["peers"].as_array()?.iter().find(|p| {
        p["addresses"]
            .as_array()
            .is_some_and(|a| a.iter().any(|a| a.as_str() == Some(&want)))
    })
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// A UDP server on `host`, all addresses, that appends every datagram's text to a file.
fn udp_sink(lab: &Lab, host: &str, port: u16) -> PathBuf {
    let file = lab.host_dir(host).join(format!("sink-{port}.txt"));
    let script = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('0.0.0.0', {port}))\nwhile True:\n    d, a = s.recvfrom(2048)\n    \
         f = open({file:?}, 'a')\n    f.write(d.decode(errors='replace') + ' from ' + a[0] + '\\n')\n    f.close()\n",
        file = file.display().to_string()
    );
    let mut c = lab.host(host).ns().command("python3");
    c.args(["-c", &script]);
    lab.spawn(host, &format!("udp-sink-{port}"), c).unwrap();
    file
}

/// Sends `count` UDP datagrams with `text` from `host` to `dst`, with source address `src`
/// (any address: a raw socket builds the IP header, as an attacker on that host would).
fn send_raw_udp(lab: &Lab, host: &str, src: IpAddr, dst: SocketAddr, text: &str, count: u32) {
    let script = r#"
import socket, struct, sys, time
src, dst, port, text, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode(), int(sys.argv[5])
udp = struct.pack('!HHHH', 40000, port, 8 + len(text), 0) + text
ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                 socket.inet_aton(src), socket.inet_aton(dst))
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for _ in range(count):
    s.sendto(ip + udp, (dst, 0))
    time.sleep(0.1)
"#;
    vdc::cmd::run_quiet(lab.host(host).ns().command("python3").args([
        "-c",
        script,
        &src.to_string(),
        &dst.ip().to_string(),
        &dst.port().to_string(),
        text,
        &count.to_string(),
    ]))
    .unwrap();
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn restart_agent(lab: &Lab, root: &Path) {
    lab.stop("fw", AGENT_LOG).unwrap();
    start_agent(lab, "fw", root).unwrap();
}

/// Waits until the agent is running and lists the operator and the router with its routes.
fn wait_for_peers(lab: &Lab, op_ip: IpAddr, rtr_ip: IpAddr) -> serde_json::Value {
    wait_status(
        lab,
        "fw",
        "the operator and the router with its routes",
        |s| {
            s["backend_state"] == "Running"
                && peer(s, op_ip).is_some_and(|p| p["online"] == true)
                && peer(s, rtr_ip).is_some_and(|p| {
                    let r = strings(&p["routes"]);
                    r.iter().any(|r| r == "0.0.0.0/0") && r.iter().any(|r| r == SUBNET)
                })
        },
    )
    .unwrap()
}

/// headscale puts an approved exit node's `0.0.0.0/0` and its subnet routes into its
/// `AllowedIPs`. The agent must trust the router with its own address only (and its subnet
/// when `AcceptRoutes` is on), as tailscaled does: it may not send with the operator's
/// address, and the firewall's traffic to the operator must never go to it.
#[test]
fn a_router_in_the_tailnet_is_trusted_with_its_own_addresses_only() {
    require_lab!();
    let lab = Lab::start(LabOptions::hosts(&["fw", "op", "rtr"])).unwrap();
    let machine = "0cfc7e24-aaaa-4bbb-8ccc-0000000000e1";
    let (fw, fw_ip) = start_firewall(&lab, "fw", machine, "project-r", &[]).unwrap();
    let (_op, op_ip) = join_operator(&lab, "op", "fw").unwrap();

    // The router: a stock tailscaled that serves a LAN (a veth pair inside its namespace,
    // holding 198.51.100.1; this kernel has no dummy devices) and offers itself as exit
    // node; an admin approves both.
    let rtr_ns = lab.host("rtr").ns();
    rtr_ns
        .ip(&[
            "link", "add", "lan0", "type", "veth", "peer", "name", "lan1",
        ])
        .unwrap();
    rtr_ns
        .ip(&["addr", "add", &format!("{SUBNET_HOST}/24"), "dev", "lan0"])
        .unwrap();
    for dev in ["lan0", "lan1"] {
        rtr_ns.ip(&["link", "set", dev, "up"]).unwrap();
    }
    let rtr = lab
        .join_tailscaled_with(
            "rtr",
            "routers",
            &[
                "--advertise-exit-node",
                &format!("--advertise-routes={SUBNET}"),
            ],
        )
        .unwrap();
    let rtr_ip = rtr.ipv4().unwrap();
    lab.headscale()
        .approve_routes("rtr", &["0.0.0.0/0", "::/0", SUBNET])
        .unwrap();
    wait_for_peers(&lab, op_ip, rtr_ip);

    // (b) Ten restarts: the operator's traffic goes to the operator every time, the
    // router gets none of it, and the router's subnet is not routed (AcceptRoutes is off).
    for round in 1..=10 {
        if round > 1 {
            restart_agent(&lab, &fw.root);
        }
        let status = wait_for_peers(&lab, op_ip, rtr_ip);
        assert!(
            strings(&peer(&status, rtr_ip).unwrap()["accepted_routes"]).is_empty(),
            "routes accepted without AcceptRoutes: {status}"
        );
        vdc::smoke::icmp(&lab, "fw", op_ip)
            .unwrap_or_else(|e| panic!("round {round}: {e:#}\n{status}"));
        let status = agent_status(&lab, "fw").unwrap();
        let (to_op, to_rtr) = (
            peer(&status, op_ip).unwrap()["tx_bytes"].as_u64().unwrap(),
            peer(&status, rtr_ip).unwrap()["tx_bytes"].as_u64().unwrap(),
        );
        println!("round {round}: bytes to the operator {to_op}, to the router {to_rtr}");
        assert!(to_op > 0 && to_rtr == 0, "round {round}: {status}");
    }
    let unrouted =
        vdc::cmd::run_quiet(
            lab.host("fw")
                .ns()
                .command("ip")
                .args(["route", "get", SUBNET_HOST]),
        );
    assert!(unrouted.is_err(), "the subnet is routed: {unrouted:?}");

    // (a) The router sends to the firewall from its own address (delivered), then with the
    // operator's address as source (dropped): its /0 does not make it the operator.
    let sink = udp_sink(&lab, "fw", SINK);
    let dst: SocketAddr = (fw_ip, SINK).into();
    let read = || std::fs::read_to_string(&sink).unwrap_or_default();
    wait_until("the router's own packet", Duration::from_secs(20), || {
        send_raw_udp(&lab, "rtr", rtr_ip, dst, "honest", 3);
        read().contains("honest")
    });
    send_raw_udp(&lab, "rtr", op_ip, dst, "spoofed", 20);
    send_raw_udp(&lab, "rtr", rtr_ip, dst, "after", 3);
    wait_until(
        "the packet after the spoofed ones",
        Duration::from_secs(10),
        || read().contains("after"),
    );
    let got = read();
    println!("what the sink on the firewall received:\n{got}");
    assert!(!got.contains("spoofed"), "{got}");

    // (c) With AcceptRoutes on, the subnet is routed to the router (and only the subnet:
    // the exit routes stay refused).
    let conf = fw.root.join("etc/vpn-agent/tailscaled.conf");
    let mut mesh: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&conf).unwrap()).unwrap();
    mesh["AcceptRoutes"] = true.into();
    std::fs::write(&conf, mesh.to_string()).unwrap();
    restart_agent(&lab, &fw.root);
    let status = wait_for_peers(&lab, op_ip, rtr_ip);
    assert_eq!(
        strings(&peer(&status, rtr_ip).unwrap()["accepted_routes"]),
        vec![SUBNET.to_string()],
        "{status}"
    );
    vdc::smoke::icmp(&lab, "fw", SUBNET_HOST.parse().unwrap()).unwrap();
    let status = agent_status(&lab, "fw").unwrap();
    assert!(
        peer(&status, rtr_ip).unwrap()["tx_bytes"].as_u64().unwrap() > 0,
        "{status}"
    );
    vdc::smoke::icmp(&lab, "fw", op_ip).unwrap();
}

/// The process id of the agent on `host`.
fn agent_pid(lab: &Lab, host: &str) -> i32 {
    lab.host(host)
        .ns()
        .pids()
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() == "vpn-agent")
        })
        .expect("the agent runs")
}

fn key_bytes(text: &str, prefix: &str) -> [u8; 32] {
    let hex = text.strip_prefix(prefix).expect("a typed key");
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    out
}

/// An attacker in the data center floods the agent's UDP port (50 000 packets/s for 20 s:
/// handshake initiations, a third of them with a valid mac1, and disco packets that claim
/// the operator's disco key). The operator's ssh over the mesh keeps working throughout,
/// and the control session keeps following headscale (a rename shows up).
#[test]
fn a_flood_on_the_wireguard_port_does_not_lock_the_operator_out() {
    require_lab!();
    let lab = Lab::start(LabOptions::hosts(&["fw", "op", "dc"])).unwrap();
    let machine = "0cfc7e24-aaaa-4bbb-8ccc-0000000000e2";
    let (_fw, fw_ip) = start_firewall(&lab, "fw", machine, "project-d", &[]).unwrap();
    let (_op, op_ip) = join_operator(&lab, "op", "fw").unwrap();
    let authorized = start_sshd(&lab, "fw").unwrap();
    vdc::firewall::wait_banner(&lab.host("op").ns(), (fw_ip, 22).into()).unwrap();
    ssh(&lab, "op", fw_ip, &authorized, "true").unwrap();

    let hs = lab.headscale();
    let target = vdc::flood::Target {
        addr: (lab.host("fw").addr, 41641).into(),
        node_key: key_bytes(
            hs.node_json(machine).unwrap()["node_key"].as_str().unwrap(),
            "nodekey:",
        ),
        peer_disco_key: key_bytes(
            hs.node_json("op").unwrap()["disco_key"].as_str().unwrap(),
            "discokey:",
        ),
    };
    let pid = agent_pid(&lab, "fw");
    let cpu_before = vdc::flood::cpu_time(pid).unwrap();
    let dc = lab.host("dc").ns();
    let attack = std::thread::spawn(move || {
        dc.enter(move || vdc::flood::flood(target, 50_000, Duration::from_secs(20)))
    });

    let started = Instant::now();
    let (mut ok, mut failed) = (0, vec![]);
    // Control under fire: five seconds in, headscale announces a change (a rename) that the
    // agent must take in while the flood goes on.
    let (mut renamed_at, mut rename_seen) = (None, None);
    while !attack.is_finished() {
        match ssh(&lab, "op", fw_ip, &authorized, "echo still-in") {
            Ok(out) if out.contains("still-in") => ok += 1,
            other => failed.push(format!("{:.1?}: {other:?}", started.elapsed())),
        }
        if renamed_at.is_none() && started.elapsed() > Duration::from_secs(5) {
            let id = hs.node_json("op").unwrap()["id"].as_u64().unwrap();
            vdc::cmd::run_quiet(hs.cli().args([
                "nodes",
                "rename",
                "-i",
                &id.to_string(),
                "op-renamed",
            ]))
            .unwrap();
            renamed_at = Some(Instant::now());
        }
        if let Some(at) = renamed_at
            && rename_seen.is_none()
            && agent_status(&lab, "fw").is_ok_and(|s| {
                peer(&s, op_ip)
                    .is_some_and(|p| p["name"].as_str().unwrap_or("").starts_with("op-renamed"))
            })
        {
            rename_seen = Some(at.elapsed());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let sent = attack.join().unwrap().unwrap();
    let cpu = vdc::flood::cpu_time(pid).unwrap() - cpu_before;
    println!(
        "flood: {} packets in {:.1?} ({:.0}/s); agent CPU {:.2?} ({:.0} % of one core); \
         operator ssh {ok} ok, {} failed",
        sent.packets,
        sent.elapsed,
        sent.packets as f64 / sent.elapsed.as_secs_f64(),
        cpu,
        100.0 * cpu.as_secs_f64() / sent.elapsed.as_secs_f64(),
        failed.len()
    );
    println!("the agent saw the rename after {rename_seen:.1?} (during the flood)");
    assert!(
        failed.is_empty() && ok >= 5,
        "ssh during the flood: {ok} ok, failed: {failed:#?}"
    );
    assert!(
        rename_seen.is_some_and(|d| d < Duration::from_secs(10)),
        "the control session did not follow headscale during the flood"
    );
    let status = agent_status(&lab, "fw").unwrap();
    assert_eq!(status["control_connected"], true, "{status}");
    ssh(&lab, "op", fw_ip, &authorized, "true").unwrap();
}

/// A policy that lets the firewall reach the operators and the operators reach nothing: the
/// operator sees the firewall (so the mesh is up) and yet no port of it answers, not SSH,
/// not a web server, not ICMP. The agent starts with nothing allowed and adds only what the
/// policy opens.
#[test]
fn a_policy_that_lets_the_operator_in_nowhere_leaves_every_port_shut() {
    require_lab!();
    let policy = r#"{
  "tagOwners": {"tag:firewall": ["ops@"]},
  "acls": [{"action": "accept", "src": ["tag:firewall"], "dst": ["ops@:*"]}],
}"#;
    let lab = Lab::start(LabOptions {
        hosts: vec!["fw".into(), "op".into()],
        policy: Some(policy.into()),
        ..LabOptions::default()
    })
    .unwrap();
    let machine = "0cfc7e24-aaaa-4bbb-8ccc-0000000000e3";
    let (_fw, fw_ip) = start_firewall(
        &lab,
        "fw",
        machine,
        "project-n",
        &["--tags", "tag:firewall"],
    )
    .unwrap();
    let (op, op_ip) = join_operator(&lab, "op", "fw").unwrap();
    start_sshd(&lab, "fw").unwrap();
    serve_http(&lab, "fw", [0, 0, 0, 0].into(), 8080).unwrap();

    // The operator sees the firewall, and the firewall reaches the operator (replies
    // included): the mesh works.
    op.wait_peer(fw_ip, Duration::from_secs(30)).unwrap();
    wait_until(
        "the firewall pings the operator",
        Duration::from_secs(20),
        || vdc::smoke::icmp(&lab, "fw", op_ip).is_ok(),
    );
    let ns = lab.host("op").ns();
    for port in [22, 8080] {
        let b = vdc::firewall::banner(&ns, (fw_ip, port).into(), Duration::from_secs(3));
        assert!(b.is_err(), "port {port} answered the operator: {b:?}");
    }
    let ping =
        vdc::cmd::run_quiet(
            ns.command("ping")
                .args(["-c", "2", "-W", "2", &fw_ip.to_string()]),
        );
    assert!(ping.is_err(), "the firewall answered the operator's ping");
    // Still there on the firewall's own side: its sshd listens on every address.
    vdc::firewall::wait_banner(&lab.host("fw").ns(), (fw_ip, 22).into()).unwrap();
    let log = lab.log("fw", AGENT_LOG);
    assert!(log.contains("packet filter updated"), "{log}");
}
