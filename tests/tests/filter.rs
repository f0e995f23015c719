//! The agent enforces headscale's policy as tailscaled does: a stock operator node reaches
//! the firewall only where the policy lets it, and the firewall's own flows get their replies.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};
use vdc::firewall::{
    AGENT_LOG, connects, join_operator, mesh_ipv4, serve_http, start_firewall_args, start_sshd,
    wait_banner_for, wait_connects,
};
use vdc::netns::Netns;
use vdc::{Lab, LabOptions, require_lab};

const MACHINE: &str = "0cfc7e24-aaaa-4bbb-8ccc-0000000000f7";
/// A second service on the firewall, which the policy may or may not open.
const WEB: u16 = 8080;
/// Services on the operator's host that the firewall's flows go to.
const OP_UDP: u16 = 9999;
const OP_TCP: u16 = 8081;
/// The agent's `--map-refresh-after` (see the test).
const REFRESH_SECS: u64 = 10;

/// Operators (user `ops`) reach the firewalls (`tag:firewall`) on SSH only, over TCP; the
/// firewalls may ping the operators and reach two of their services. `extra` adds
/// destinations to the operators' rule.
fn policy(extra: &str) -> String {
    format!(
        r#"{{
  // The firewalls register with tagged keys; the operators are a user.
  "tagOwners": {{"tag:firewall": ["ops@"]}},
  "acls": [
    {{"action": "accept", "src": ["ops@"], "proto": "tcp", "dst": ["tag:firewall:22"{extra}]}},
    {{"action": "accept", "src": ["tag:firewall"], "proto": "icmp", "dst": ["ops@:*"]}},
    {{"action": "accept", "src": ["tag:firewall"], "proto": "udp", "dst": ["ops@:{OP_UDP}"]}},
    {{"action": "accept", "src": ["tag:firewall"], "proto": "tcp", "dst": ["ops@:{OP_TCP}"]}},
  ],
}}"#
    )
}

#[test]
fn the_agent_lets_in_what_the_policy_allows_and_the_replies_to_its_own_flows() {
    require_lab!();
    let lab = Lab::start(LabOptions {
        hosts: vec!["fw".into(), "op".into()],
        policy: Some(policy("")),
        ..LabOptions::default()
    })
    .unwrap();
    // headscale v0.28 may leave the firewall with the filter it computed before the
    // operator's node existed (session 7 saw `rules=0` after the operator joined, and nothing
    // more): it loses an update now and then, and with more than one map worker (from three
    // cores on) it may send them out of order (both fixed in v0.29). The agent's answer is its
    // map stream refresh; a short one here, and the first SSH attempt waits for it.
    let (_fw, fw) = start_firewall_args(
        &lab,
        "fw",
        MACHINE,
        "project-f",
        &["--tags", "tag:firewall"],
        &["--map-refresh-after", &REFRESH_SECS.to_string()],
    )
    .unwrap();
    let fw_ip = mesh_ipv4(&fw).unwrap();
    let (_op, op_ip) = join_operator(&lab, "op", "fw").unwrap();

    // Services: sshd and a web server on the firewall, a UDP echo on both hosts, and a
    // TCP service on the operator's host.
    let (fw_ns, op_ns) = (lab.host("fw").ns(), lab.host("op").ns());
    let authorized = start_sshd(&lab, "fw").unwrap();
    serve_http(&lab, "fw", fw_ip, WEB).unwrap();
    serve_http(&lab, "op", op_ip, OP_TCP).unwrap();
    udp_echo(&lab, "fw", OP_UDP);
    udp_echo(&lab, "op", OP_UDP);
    let web: SocketAddr = (fw_ip, WEB).into();
    wait_connects(&fw_ns, web, Duration::from_secs(10)).unwrap();
    wait_connects(&op_ns, (op_ip, OP_TCP).into(), Duration::from_secs(10)).unwrap();
    assert!(
        udp_answers(&fw_ns, (fw_ip, OP_UDP).into(), 10),
        "fw's own echo"
    );

    // The operator: SSH yes, the web server no; the agent's filter drops the SYN.
    let mesh_ssh: SocketAddr = (fw_ip, 22).into();
    let banner =
        wait_banner_for(&op_ns, mesh_ssh, Duration::from_secs(REFRESH_SECS * 2 + 5)).unwrap();
    assert!(banner.starts_with("SSH-2.0-OpenSSH"), "{banner}");
    let out =
        vdc::firewall::ssh(&lab, "op", fw_ip, &authorized, "echo through-the-filter").unwrap();
    assert!(out.contains("through-the-filter"), "{out}");
    assert!(!connects(&op_ns, web), "the operator reached port {WEB}");
    assert!(
        !udp_answers(&op_ns, (fw_ip, OP_UDP).into(), 3),
        "UDP got in"
    );
    // As in tailscale, ICMP may reach an address that has any port open to the sender.
    vdc::smoke::icmp(&lab, "op", fw_ip).unwrap();

    // The firewall's own flows: no rule lets their answers in, yet they arrive (ICMP echo
    // replies, a TCP SYN-ACK, UDP from the flow table).
    vdc::smoke::icmp(&lab, "fw", op_ip).unwrap();
    assert!(connects(&fw_ns, (op_ip, OP_TCP).into()));
    assert!(
        udp_answers(&fw_ns, (op_ip, OP_UDP).into(), 10),
        "no UDP reply"
    );

    // The same web server, the same nftables, a policy that opens it: now it answers. So the
    // drop above was the agent's filter, following headscale's policy while running.
    let updates = lab
        .log("fw", AGENT_LOG)
        .matches("packet filter updated")
        .count();
    lab.set_policy(&policy(&format!(r#", "tag:firewall:{WEB}""#)))
        .unwrap();
    wait_log_count(&lab, "packet filter updated", updates + 1);
    // headscale may have sent another update first; the new filter follows within seconds.
    wait_connects(&op_ns, web, Duration::from_secs(10)).unwrap();
    vdc::firewall::ssh(&lab, "op", fw_ip, &authorized, "true").unwrap();
    let log = lab.log("fw", AGENT_LOG);
    assert!(!log.contains("not understood"), "{log}");
}

/// A UDP echo server on `host`, all addresses.
fn udp_echo(lab: &Lab, host: &str, port: u16) {
    let script = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('0.0.0.0', {port}))\nwhile True:\n    d, a = s.recvfrom(2048)\n    s.sendto(d, a)\n"
    );
    let mut c = lab.host(host).ns().command("python3");
    c.args(["-c", &script]);
    lab.spawn(host, &format!("udp-echo-{port}"), c).unwrap();
}

/// Whether a datagram from `ns` to a UDP echo at `addr` comes back, trying `tries` times a
/// second (the first may race a path still being set up).
fn udp_answers(ns: &Netns, addr: SocketAddr, tries: u32) -> bool {
    ns.enter(move || {
        let s = UdpSocket::bind(("0.0.0.0", 0))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut buf = [0u8; 64];
        for _ in 0..tries {
            s.send_to(b"ping", addr)?;
            if let Ok((n, from)) = s.recv_from(&mut buf)
                && from == addr
                && &buf[..n] == b"ping"
            {
                return Ok(true);
            }
        }
        Ok(false)
    })
    .unwrap()
}

/// Waits until the agent's log has `text` at least `count` times.
fn wait_log_count(lab: &Lab, text: &str, count: usize) {
    let start = Instant::now();
    while lab.log("fw", AGENT_LOG).matches(text).count() < count {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{text:?} not logged {count} times:\n{}",
            lab.log_tail("fw", AGENT_LOG)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
