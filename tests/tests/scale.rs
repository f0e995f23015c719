//! The agent in a large, busy tailnet (#15): real headscale with hundreds of other nodes,
//! registered over ts2021 by `vdc-load`, dozens of them coming, going and changing endpoints
//! all the while.

use nix::sys::signal::Signal;
use std::time::Duration;
use vdc::firewall::{
    AGENT_LOG, join_operator, mesh_ipv4, ssh, start_firewall, start_firewall_args, start_sshd,
    wait_banner, wait_status_for,
};
use vdc::load::Load;
use vdc::{Lab, LabOptions, cmd, require_lab};

const MACHINE: &str = "0cfc7e24-aaaa-4bbb-8ccc-0000000005ca";
/// Nodes besides the firewall and the operator, and how many of them churn.
const NODES: usize = 200;
const CHURNING: usize = 50;
const CHURN_PER_SEC: f64 = 10.0;
/// How long the operator's session runs under churn.
const SESSION_SECS: u32 = 30;
/// The agent's `--map-refresh-after`: headscale v0.28 may stop updating the stream of a
/// node that reads slowly while hundreds register (see `outage.rs`), which the agent sees
/// within this; or lose an update on a busy stream, which the agent makes good within five
/// times this (see the last test). The checks below allow for both.
const REFRESH_SECS: u64 = 10;
/// How long a change headscale lost may take to reach the agent: two age limits.
const HEAL_SECS: u64 = REFRESH_SECS * 5 * 2 + 10;

/// The firewall `fw` of `machine`, its agent run with `--map-refresh-after REFRESH_SECS`;
/// its node as headscale lists it.
fn start_agent(lab: &Lab, machine: &str) -> vdc::headscale::Node {
    let refresh = REFRESH_SECS.to_string();
    let (_, node) = start_firewall_args(
        lab,
        "fw",
        machine,
        "project-s",
        &[],
        &["--map-refresh-after", &refresh],
    )
    .unwrap();
    node
}

#[test]
fn the_operators_ssh_stays_up_while_50_of_200_nodes_come_and_go() {
    require_lab!();
    let lab = Lab::start(LabOptions::hosts(&["fw", "op", "load"])).unwrap();
    let fw = start_agent(&lab, MACHINE);
    let fw_ip = mesh_ipv4(&fw).unwrap();
    let (_op, _) = join_operator(&lab, "op", "fw").unwrap();
    let authorized = start_sshd(&lab, "fw").unwrap();
    wait_banner(&lab.host("op").ns(), (fw_ip, 22).into()).unwrap();

    let load = Load::start(&lab, "load", "load", "load", NODES, CHURNING, CHURN_PER_SEC).unwrap();
    let registered = load
        .wait("every node registered", Duration::from_secs(180), |p| {
            p.registered_after_secs.is_some()
        })
        .unwrap();
    println!(
        "    {NODES} nodes registered in {:.1} s",
        registered.registered_after_secs.unwrap()
    );
    wait_status_for(
        &lab,
        "fw",
        "every node in the netmap",
        Duration::from_secs(HEAL_SECS),
        |s| s["peers"].as_array().is_some_and(|p| p.len() > NODES),
    )
    .unwrap();
    let log_before = lab.log("fw", AGENT_LOG).lines().count();
    let events_before = load.progress().churn_events();

    // The operator's session under churn: an SSH command that ticks for 30 s, and pings
    // beside it, five a second; not one may be lost.
    let ping = {
        let ns = lab.host("op").ns();
        let count = (SESSION_SECS * 5).to_string();
        std::thread::spawn(move || {
            cmd::run_quiet(
                ns.command("ping")
                    .args(["-i", "0.2", "-c", &count, "-W", "2"])
                    .arg(fw_ip.to_string()),
            )
        })
    };
    let ticks = ssh(
        &lab,
        "op",
        fw_ip,
        &authorized,
        &format!("for i in $(seq {SESSION_SECS}); do echo tick $i; sleep 1; done"),
    )
    .unwrap();
    assert_eq!(ticks.lines().count(), SESSION_SECS as usize, "{ticks}");
    let ping = ping.join().unwrap().unwrap();
    assert!(ping.contains(" 0% packet loss"), "{ping}");

    let p = load.progress();
    let events = p.churn_events() - events_before;
    assert!(
        events as f64 >= CHURN_PER_SEC * f64::from(SESSION_SECS) * 0.8,
        "the load churned only {events} times: {p:?}"
    );
    assert_eq!(p.errors, 0, "{p:?}");
    // The agent kept up: it still lists every node, and it is quiet about each change.
    let st = vdc::firewall::agent_status(&lab, "fw").unwrap();
    assert_eq!(st["backend_state"], "Running");
    assert!(st["peers"].as_array().unwrap().len() > NODES, "{st}");
    let log = lab.log("fw", AGENT_LOG);
    let during: Vec<&str> = log.lines().skip(log_before).collect();
    assert!(
        during.len() < 10,
        "{} log lines for {events} changes:\n{}",
        during.len(),
        during.join("\n")
    );
    // When the load stops, its streams close and headscale says so in patches: the agent
    // ends up with the operator as its only online peer. headscale waits a few seconds
    // before it calls a closed stream offline, and 50 close at once.
    lab.stop("load", "load").unwrap();
    wait_status_for(
        &lab,
        "fw",
        "only the operator online",
        Duration::from_secs(90),
        |s| {
            s["peers"]
                .as_array()
                .is_some_and(|p| p.iter().filter(|p| p["online"] == true).count() == 1)
        },
    )
    .unwrap();
    println!(
        "    {events} changes in {SESSION_SECS} s: ssh and {} pings unbroken, {} agent log lines; \
         streams headscale stopped updating and the agent replaced: {}",
        SESSION_SECS * 5,
        during.len(),
        lab.log("fw", AGENT_LOG)
            .matches("changes it never sent")
            .count()
    );
}

/// headscale v0.28 loses a queued update now and then when changes come in at once: its
/// batcher appends to a node's pending changes with an unlocked load-append-store, and its
/// batch ticker deletes the list after reading it (fixed upstream in 57070680, v0.29). The
/// stream goes on with later changes and nothing shows the gap; CI caught the agent short of
/// one node that way in the test above. Here hundreds register while 50 churn, so the
/// agent's stream is never quiet. The agent renews any stream at five times
/// `--map-refresh-after`, and what headscale lost comes with that full map. tailscaled,
/// beside it, is only watched.
#[test]
fn updates_headscale_lost_on_a_busy_stream_come_with_the_next_full_map() {
    const REGISTERING: usize = 300;
    require_lab!();
    let lab = Lab::start(LabOptions::hosts(&["fw", "op", "load"])).unwrap();
    let fw = start_agent(&lab, "0cfc7e24-aaaa-4bbb-8ccc-0000000005cb");
    let (op, _) = join_operator(&lab, "op", "fw").unwrap();
    let churn = Load::start(&lab, "load", "churn", "load", CHURNING, CHURNING, 20.0).unwrap();
    churn
        .wait("the churning nodes online", Duration::from_secs(120), |p| {
            p.registered_after_secs.is_some()
        })
        .unwrap();
    let reg = Load::register(&lab, "load", "reg", "load", REGISTERING, 32).unwrap();
    let registered = reg
        .wait("every node registered", Duration::from_secs(300), |p| {
            p.registered_after_secs.is_some()
        })
        .unwrap();
    // headscale sends what it batched every 800 ms; its map workers may be behind.
    std::thread::sleep(Duration::from_secs(10));

    let others: std::collections::BTreeSet<String> = lab
        .headscale()
        .nodes()
        .unwrap()
        .iter()
        .filter(|n| n.id != fw.id)
        .map(|n| mesh_ipv4(n).unwrap().to_string())
        .collect();
    let agent_lacks = |s: &serde_json::Value| -> usize {
        let listed: std::collections::BTreeSet<&str> = s["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|p| p["addresses"].as_array().into_iter().flatten())
            .filter_map(|a| a.as_str()?.strip_suffix("/32"))
            .collect();
        others
            .iter()
            .filter(|ip| !listed.contains(ip.as_str()))
            .count()
    };
    let ts = op.status().unwrap();
    let ts_listed: std::collections::BTreeSet<&str> = ts["Peer"]
        .as_object()
        .into_iter()
        .flatten()
        .flat_map(|(_, p)| p["TailscaleIPs"].as_array().into_iter().flatten())
        .filter_map(|a| a.as_str())
        .collect();
    let own_ip = op.ipv4().unwrap().to_string();
    let ts_lacks = others
        .iter()
        .filter(|ip| **ip != own_ip && !ts_listed.contains(ip.as_str()))
        .count();
    let st = vdc::firewall::agent_status(&lab, "fw").unwrap();
    // Which streams headscale gave up on (the other way it loses updates, see `outage.rs`).
    let hs_log = std::fs::read_to_string(lab.headscale().log_path()).unwrap_or_default();
    let dropped = |id: u64| {
        hs_log
            .lines()
            .filter(|l| l.contains("timeout sending to channel"))
            .any(|l| l.contains(&format!("node.id={id} ")))
    };
    let op_id = lab.headscale().node_id("op").unwrap();
    println!(
        "    {REGISTERING} registered in {:.1} s beside 50 churning; 10 s later the agent \
         lacked {} (its stream dropped by headscale: {}) and tailscaled {} (dropped: {}) \
         of {} nodes",
        registered.registered_after_secs.unwrap(),
        agent_lacks(&st),
        dropped(fw.id),
        ts_lacks,
        dropped(op_id),
        others.len()
    );

    // The churn goes on all along, so only the age limit renews the stream.
    let limit = Duration::from_secs(HEAL_SECS);
    let started = std::time::Instant::now();
    wait_status_for(&lab, "fw", "every node in the netmap", limit, |s| {
        agent_lacks(s) == 0
    })
    .unwrap();
    println!(
        "    the agent listed every node {:.1} s later; it renewed its stream {} times",
        started.elapsed().as_secs_f64(),
        lab.log("fw", AGENT_LOG)
            .matches("renewed at its age limit")
            .count()
    );
    let p = churn.progress();
    assert_eq!(p.errors, 0, "{p:?}");
    assert!(p.churn_events() > 0, "{p:?}");
}

/// Every map request costs headscale (v0.28) a rebuild of its peer map over every pair of
/// nodes, 48 s at 5 000 nodes (bench scale): an agent with nothing new to say must ask
/// nothing, or a fleet of them keeps headscale rebuilding. Before, the agent sent an endpoint
/// update every minute to learn whether headscale still knew it.
#[test]
fn a_quiet_agent_costs_headscale_no_peer_map_rebuild() {
    const QUIET: Duration = Duration::from_secs(90);
    const REBUILDS: &str = "headscale_nodestore_peers_calculation_duration_seconds_count";
    require_lab!();
    let lab = Lab::start(LabOptions::hosts(&["fw", "op"])).unwrap();
    start_firewall(
        &lab,
        "fw",
        "0cfc7e24-aaaa-4bbb-8ccc-0000000005cc",
        "project-s",
        &[],
    )
    .unwrap();
    join_operator(&lab, "op", "fw").unwrap();
    // The agent's second stream (RECONNECT_SETTLE) is the last request it has reason for:
    // its next comes when the stream has been quiet for 120 s (`--map-refresh-after`).
    vdc::firewall::wait_settled(&lab, "fw").unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let rebuilds = || {
        let text = lab.headscale().metrics().unwrap();
        vdc::headscale::metric_value(&text, REBUILDS).unwrap()
    };
    let before = rebuilds();
    std::thread::sleep(QUIET);
    let after = rebuilds();
    println!(
        "    headscale rebuilt its peer map {} times in {QUIET:?} of quiet",
        after - before
    );
    assert_eq!(
        after,
        before,
        "headscale rebuilt its peer map in a quiet tailnet; the agent's log:\n{}",
        lab.log_tail("fw", AGENT_LOG)
    );
}

/// A quiet stream's renewal costs headscale a full map, which a large tailnet's headscale
/// (v0.28) takes long to make: 48 s at 5 000 nodes (bench scale), most of it a rebuild of
/// its peer map. The agent spaces renewals by ten times what the last full map took. Here
/// headscale is made slow by stopping it for 8 s out of every 8.3 (SIGSTOP; the HTTP/2
/// PINGs' 10 s are not reached): a full map then takes it 14 to 23 s. Renewals every
/// `REFRESH_SECS` after the last answer cost it four full maps in 150 s; spaced by the
/// answer, at most two (headscale logs each stream it serves: "node has connected").
#[test]
fn a_headscale_slow_to_answer_is_renewed_less_often() {
    const SLOW: Duration = Duration::from_secs(150);
    require_lab!();
    let lab = Lab::start(LabOptions::hosts(&["fw", "op"])).unwrap();
    let machine = "0cfc7e24-aaaa-4bbb-8ccc-0000000005cd";
    start_agent(&lab, machine);
    join_operator(&lab, "op", "fw").unwrap();
    vdc::firewall::wait_settled(&lab, "fw").unwrap();
    let streams = || {
        // The agent's hostname is its machine's ID.
        let name = format!("node.name={machine} ");
        let log = lab.log("ctl", "headscale");
        log.lines()
            .filter(|l| l.contains("node has connected") && l.contains(&name))
            .count()
    };
    let before = streams();
    let start = std::time::Instant::now();
    while start.elapsed() < SLOW {
        lab.signal("ctl", "headscale", Signal::SIGSTOP).unwrap();
        std::thread::sleep(Duration::from_secs(8));
        lab.signal("ctl", "headscale", Signal::SIGCONT).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    let served = streams() - before;
    println!("    headscale served the agent {served} full maps in {SLOW:?} of slow answers");
    let status = vdc::firewall::agent_status(&lab, "fw").unwrap();
    assert!(
        status["control_connected"] == true,
        "{}",
        lab.log_tail("fw", AGENT_LOG)
    );
    assert!(
        served <= 2,
        "headscale served the agent {served} full maps; the agent's log:\n{}",
        lab.log_tail("fw", AGENT_LOG)
    );
}
