//! The agent version metal-api picks (#16): a release served over HTTPS from a lab host with a
//! CA of its own, fetched at first boot by the real Ignitions (flatcar v0.36.2 for spec 2.x,
//! coreos for 3.x) and by cloud-init's `bootcmd` script, refused when its sha512 is not the
//! pinned one; an upgrade in place; and `userdata-gen nodes` showing what each node runs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use vdc::dist::{Release, serve_release};
use vdc::firewall::{
    AGENT_LOG, join_operator, retry, ssh, start_agent, start_firewall, start_sshd, wait_banner,
};
use vdc::{Lab, LabOptions, cmd, require_lab, tools};

const KEY: &str = "hskey-auth-TESTONLY-release";
const MACHINE: &str = "0cfc7e24-aaaa-4bbb-8ccc-0000000000f1";

/// `userdata-gen generate` for `MACHINE` with a key file (no headscale call), the pinned
/// release `sha512` at `release.url`, and `extra` flags; returns the userdata.
fn generate(dir: &Path, release: &Release, sha512: &str, extra: &[&str]) -> String {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("key"), KEY).unwrap();
    let out = dir.join("userdata");
    cmd::run_quiet(
        Command::new(tools::project_bin("userdata-gen"))
            .args(["generate", "--machine-id", MACHINE, "--project", "p1"])
            .args(["--login-server", "https://headscale.example:443"])
            .arg("--auth-key-file")
            .arg(dir.join("key"))
            .args(["--agent-url", &release.url, "--agent-sha512", sha512])
            .arg("--agent-ca-file")
            .arg(&release.ca_file)
            .arg("--output")
            .arg(&out)
            .args(extra),
    )
    .unwrap();
    std::fs::read_to_string(out).unwrap()
}

/// Where the agent lands in a firewall's root.
fn agent_in(root: &Path) -> PathBuf {
    root.join("usr/local/bin/vpn-agent")
}

/// The fetched agent is the served one, executable, and runs.
fn assert_fetched(root: &Path, what: &str) {
    let bin = agent_in(root);
    let want = std::fs::read(tools::project_bin("vpn-agent")).unwrap();
    let got = std::fs::read(&bin).unwrap_or_else(|e| panic!("{what}: {}: {e}", bin.display()));
    assert!(
        got == want,
        "{what}: the fetched agent differs from the served one"
    );
    let mode = std::fs::metadata(&bin).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o755, "{what}");
    let v = cmd::run_quiet(Command::new(&bin).arg("--version")).unwrap();
    assert!(v.starts_with("vpn-agent "), "{what}: {v}");
}

/// A sha512 that is not the release's.
fn wrong_sha512(release: &Release) -> String {
    let mut h = release.sha512.clone();
    let last = if h.ends_with('0') { "1" } else { "0" };
    h.replace_range(127.., last);
    h
}

#[test]
fn ignition_fetches_the_pinned_agent_and_fails_the_boot_on_other_bytes() {
    require_lab!();
    let lab = Lab::start(LabOptions::hosts(&["repo", "fw"])).unwrap();
    let release = serve_release(&lab, "repo", &tools::project_bin("vpn-agent")).unwrap();
    let fw = lab.host("fw").ns();
    let wrong = wrong_sha512(&release);
    let coreos = vdc::ignition::Coreos::current();
    let debian = vdc::ignition::Coreos::debian();
    type Apply<'a> = Box<dyn Fn(&str, &Path, &Path) -> anyhow::Result<String> + 'a>;
    let cases: Vec<(&str, &[&str], Apply)> = vec![
        (
            "flatcar v0.36.2, spec 2.3.0",
            &[],
            Box::new(|c, r, w| vdc::ignition::apply_flatcar_in(Some(&fw), c, r, w)),
        ),
        (
            "coreos (current), spec 3.4.0",
            &["--format", "ignition-3.4.0", "--target", "coreos"],
            Box::new(|c, r, w| vdc::ignition::apply_coreos_in(Some(&fw), &coreos, c, r, w)),
        ),
        (
            "coreos (Debian's 2.14), spec 3.3.0",
            &["--format", "ignition-3.3.0", "--target", "coreos"],
            Box::new(|c, r, w| vdc::ignition::apply_coreos_in(Some(&fw), &debian, c, r, w)),
        ),
    ];
    for (i, (what, flags, apply)) in cases.iter().enumerate() {
        let dir = lab.host_dir("fw").join(format!("case{i}"));
        let config = generate(&dir, &release, &release.sha512, flags);
        let root = dir.join("root");
        apply(&config, &root, &dir.join("work")).unwrap_or_else(|e| panic!("{what}: {e:#}"));
        assert_fetched(&root, what);
        assert!(root.join("etc/vpn-agent/agent.json").exists(), "{what}");

        let config = generate(&dir.join("wrong"), &release, &wrong, flags);
        let root = dir.join("wrong/root");
        let e = apply(&config, &root, &dir.join("wrong/work"))
            .map(|log| format!("applied:\n{log}"))
            .expect_err(&format!("{what}: Ignition accepted other bytes"));
        let e = format!("{e:#}");
        assert!(e.contains("hash"), "{what}: {e}");
        assert!(
            !agent_in(&root).exists(),
            "{what}: the wrong agent is in place"
        );
        println!("    {what}: pinned release fetched; a wrong sha512 fails Ignition");
    }
}

/// Runs `argv` on lab host `ns` with `root/usr/local/bin` as `/usr/local/bin` (a private
/// mount namespace), as cloud-init would on the firewall.
fn run_with_bin_dir(ns: &vdc::netns::Netns, root: &Path, argv: &[String]) -> (bool, String) {
    let bin = agent_in(root).parent().unwrap().to_path_buf();
    std::fs::create_dir_all(&bin).unwrap();
    let out = cmd::quiet_output(
        ns.command("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind "$0" /usr/local/bin && exec "$@""#)
            .arg(&bin)
            .args(argv),
    )
    .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The first `bootcmd` entry of a cloud-config, as PyYAML (cloud-init's parser) reads it.
fn first_bootcmd(cloud_config: &str, dir: &Path) -> Vec<String> {
    let path = dir.join("userdata.yaml");
    std::fs::write(&path, cloud_config).unwrap();
    let json = cmd::run_quiet(
        Command::new("python3")
            .args([
                "-c",
                "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))['bootcmd'][0]))",
            ])
            .arg(&path),
    )
    .unwrap();
    serde_json::from_str(&json).unwrap()
}

#[test]
fn cloud_init_fetches_the_pinned_agent_and_locks_the_ports_on_other_bytes() {
    require_lab!();
    let lab = Lab::start(LabOptions::hosts(&["repo", "fw"])).unwrap();
    let release = serve_release(&lab, "repo", &tools::project_bin("vpn-agent")).unwrap();
    let fw = lab.host("fw").ns();
    let flags = &["--format", "cloud-config"];

    let dir = lab.host_dir("fw").join("right");
    let fetch = first_bootcmd(&generate(&dir, &release, &release.sha512, flags), &dir);
    assert!(fetch[2].contains("sha512sum"), "{fetch:?}");
    let root = dir.join("root");
    let (ok, err) = run_with_bin_dir(&fw, &root, &fetch);
    assert!(ok, "{err}");
    assert_fetched(&root, "cloud-init");
    // Every boot runs bootcmd: with the pinned agent in place it fetches nothing, so a
    // reboot while the release server is down still boots.
    lab.stop("repo", "files").unwrap();
    let (ok, err) = run_with_bin_dir(&fw, &root, &fetch);
    assert!(ok, "a second boot fetched again: {err}");

    let release = serve_release(&lab, "repo", &tools::project_bin("vpn-agent")).unwrap();
    let dir = lab.host_dir("fw").join("wrong");
    let fetch = first_bootcmd(
        &generate(&dir, &release, &wrong_sha512(&release), flags),
        &dir,
    );
    let root = dir.join("root");
    // An agent of another version from the image is not what metal-api pinned: it goes.
    std::fs::create_dir_all(agent_in(&root).parent().unwrap()).unwrap();
    std::fs::write(agent_in(&root), "#!/bin/sh\n").unwrap();
    let (ok, err) = run_with_bin_dir(&fw, &root, &fetch);
    assert!(!ok, "a wrong sha512 was accepted");
    assert!(err.contains("does not have the pinned sha512"), "{err}");
    assert!(!agent_in(&root).exists(), "an agent is in place: {err}");
    // Without an agent the early unit cannot close the ports: the script did.
    let table = cmd::run_quiet(
        fw.command("nft")
            .args(["list", "table", "inet", "vpn_agent"]),
    )
    .unwrap();
    assert!(table.contains("tcp dport 22 drop"), "{table}");
    println!(
        "    cloud-init: pinned release fetched once; a wrong sha512 leaves no agent and port 22 dropped"
    );
}

/// `userdata-gen nodes --json` for `project`, run on headscale's host (its debug listener
/// answers loopback): the nodes it lists.
fn nodes(lab: &Lab, project: &str) -> Vec<serde_json::Value> {
    let hs = lab.headscale();
    let out = cmd::run_quiet(
        lab.host("ctl")
            .ns()
            .command(tools::project_bin("userdata-gen"))
            .env("HEADSCALE_API_KEY", hs.create_api_key().unwrap())
            .args(["nodes", "--project", project, "--json"])
            .args(["--headscale-api-url", &hs.url()])
            .arg("--ca-file")
            .arg(hs.ca_path())
            .args(["--headscale-debug-url", "http://127.0.0.1:9090"]),
    )
    .unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The version `vpn-agent --version` of `bin` reports to headscale: `vpn-agent-<v>-<commit>`.
fn ipn_version(bin: &Path) -> String {
    let v = cmd::run_quiet(Command::new(bin).arg("--version")).unwrap();
    let (release, commit) = v
        .trim()
        .strip_prefix("vpn-agent ")
        .and_then(|v| v.strip_suffix(')')?.split_once(" (commit "))
        .unwrap_or_else(|| panic!("vpn-agent --version printed {v:?}"));
    format!("vpn-agent-{release}-{commit}")
}

#[test]
fn an_upgrade_in_place_keeps_the_node_and_needs_no_key() {
    require_lab!();
    let next = tools::next_agent_bin().unwrap();
    let (old_version, new_version) = (
        ipn_version(&tools::project_bin("vpn-agent")),
        ipn_version(&next),
    );
    assert_ne!(old_version, new_version);
    assert!(
        new_version.contains(tools::NEXT_AGENT_VERSION),
        "{new_version}"
    );

    let lab = Lab::start(LabOptions::hosts(&["fw", "op"])).unwrap();
    let project = "project-up";
    let (fw, fw_ip) = start_firewall(&lab, "fw", MACHINE, project, &[]).unwrap();
    let (op, _) = join_operator(&lab, "op", "fw").unwrap();
    let authorized = start_sshd(&lab, "fw").unwrap();
    wait_banner(&lab.host("op").ns(), (fw_ip, 22).into()).unwrap();
    ssh(&lab, "op", fw_ip, &authorized, "true").unwrap();

    let before = nodes(&lab, project);
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["hostname"], MACHINE);
    assert_eq!(before[0]["online"], true);
    assert_eq!(before[0]["version"], old_version.as_str());

    // The upgrade as an operator or a rollout does it: stop, new binary, start.
    lab.stop("fw", AGENT_LOG).unwrap();
    let bin = agent_in(&fw.root);
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::copy(&next, &bin).unwrap();
    assert!(!fw.root.join("etc/vpn-agent/authkey").exists());
    start_agent(&lab, "fw", &fw.root).unwrap();

    let after = retry(Duration::from_secs(30), || {
        let n = nodes(&lab, project);
        anyhow::ensure!(
            n.len() == 1 && n[0]["online"] == true && n[0]["version"] == new_version.as_str(),
            "{n:?}"
        );
        Ok(n)
    })
    .unwrap();
    assert_eq!(after[0]["id"], before[0]["id"]);
    assert_eq!(after[0]["addresses"], before[0]["addresses"]);
    let log = lab.log("fw", AGENT_LOG);
    assert!(!log.contains("registering with the auth key"), "{log}");
    assert!(
        log.contains("re-attached to headscale with the stored node key"),
        "{log}"
    );
    wait_banner(&lab.host("op").ns(), (fw_ip, 22).into()).unwrap();
    ssh(&lab, "op", fw_ip, &authorized, "true").unwrap();
    // The operator's stock tailscale sees the new version too.
    retry(Duration::from_secs(30), || {
        let peer = op.netmap_peer(fw_ip)?;
        anyhow::ensure!(
            peer["Hostinfo"]["IPNVersion"] == new_version.as_str(),
            "{}",
            peer["Hostinfo"]
        );
        Ok(())
    })
    .unwrap();
    println!(
        "    {old_version} -> {new_version} in place: node {} kept, no key",
        after[0]["id"]
    );
}
