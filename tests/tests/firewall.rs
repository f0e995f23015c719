//! The agent's nftables table against real packets: real nft, real sshd, in namespaces.

use std::net::SocketAddr;
use std::time::Duration;
use vdc::firewall::{banner, fake_tunnel, start_sshd};
use vdc::{Lab, LabOptions, require_lab, tools};

use vdc::story::METAL_RULESET as METAL;

fn nft(ns: &vdc::netns::Netns, args: &[&str]) -> String {
    vdc::cmd::run_quiet(ns.command("nft").args(args)).unwrap()
}

fn agent(
    ns: &vdc::netns::Netns,
    settings: &std::path::Path,
    args: &[&str],
) -> std::process::Output {
    vdc::cmd::quiet_output(
        ns.command(tools::project_bin("vpn-agent"))
            .arg("firewall")
            .args(args)
            .arg("--settings")
            .arg(settings),
    )
    .unwrap()
}

#[test]
fn public_ssh_closes_mesh_ssh_stays_and_metals_table_is_untouched() {
    require_lab!();
    let lab = Lab::start(LabOptions::hosts(&["fw", "dc"])).unwrap();
    let fw = lab.host("fw").ns();
    let dc = lab.host("dc").ns();
    let (mesh, fw_mesh_ip) = fake_tunnel(&lab, "fw").unwrap();
    start_sshd(&lab, "fw").unwrap();
    let public: SocketAddr = (lab.host("fw").addr, 22).into();
    let over_mesh: SocketAddr = (fw_mesh_ip, 22).into();
    let t = Duration::from_secs(2);

    // metal's own table first: public SSH answers (real sshd).
    let metal = lab.host_dir("fw").join("metal.nft");
    std::fs::write(&metal, METAL).unwrap();
    nft(&fw, &["-f", metal.to_str().unwrap()]);
    let metal_before = nft(&fw, &["list", "table", "inet", "metal"]);
    let ok = vdc::firewall::wait_banner(&dc, public).unwrap();
    assert!(ok.starts_with("SSH-2.0-OpenSSH"), "{ok}");

    // Our table: the public port closes, the mesh keeps SSH, metal's table is as it was.
    let settings = lab.host_dir("fw").join("agent.json");
    std::fs::write(
        &settings,
        serde_json::to_string(&userdata_gen::AgentSettings::default()).unwrap(),
    )
    .unwrap();
    let out = agent(&fw, &settings, &["apply"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(banner(&dc, public, t).is_err(), "public SSH still answers");
    assert!(
        banner(&mesh, over_mesh, t)
            .unwrap()
            .starts_with("SSH-2.0-OpenSSH")
    );
    assert_eq!(nft(&fw, &["list", "table", "inet", "metal"]), metal_before);

    // Applying twice changes nothing; check agrees; a tampered table is reported and repaired.
    assert!(agent(&fw, &settings, &["apply"]).status.success());
    let rules = nft(&fw, &["list", "table", "inet", "vpn_agent"]);
    assert_eq!(rules.matches("tcp dport 22 drop").count(), 1, "{rules}");
    assert!(agent(&fw, &settings, &["check"]).status.success());
    nft(
        &fw,
        &[
            "add",
            "rule",
            "inet",
            "vpn_agent",
            "input",
            "tcp",
            "dport",
            "22",
            "accept",
        ],
    );
    let out = agent(&fw, &settings, &["check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("is not ours"));
    nft(&fw, &["delete", "table", "inet", "vpn_agent"]);
    let out = agent(&fw, &settings, &["check"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("is missing"));
    assert!(
        banner(&dc, public, t).is_ok(),
        "without our table metal's accept rules"
    );
    assert!(agent(&fw, &settings, &["apply"]).status.success());
    assert!(agent(&fw, &settings, &["check"]).status.success());
    assert!(banner(&dc, public, t).is_err());
}

#[test]
fn systemd_accepts_the_units() {
    require_lab!();
    // verify wants ExecStart's binary in place: bind our build over /usr/local/bin in a
    // private mount namespace, so the host stays untouched.
    let dir = std::env::temp_dir().join(format!("vdc-units-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(tools::project_bin("vpn-agent"), dir.join("vpn-agent")).unwrap();
    // Our units and the drop-ins for nftables.service and ssh.service, from a unit path of
    // their own in front of the system's (Debian's nftables and openssh units are there).
    let units = tools::workspace_root().join("systemd");
    let out = vdc::cmd::quiet_output(
        std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(
                r#"mount --bind "$0" /usr/local/bin && SYSTEMD_UNIT_PATH="$1:" exec systemd-analyze verify \
                   tailscaled.service vpn-agent-firewall.service nftables.service ssh.service"#,
            )
            .arg(&dir)
            .arg(&units),
    )
    .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.trim().is_empty(), "{text}");
}
