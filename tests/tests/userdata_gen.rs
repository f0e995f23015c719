//! userdata-gen against the real tools: every output is executed by the Ignition that would
//! run it, and keys are minted by a real headscale in the lab.

use base64::Engine;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use vdc::{Lab, LabOptions, require_lab, tools};

const KEY: &str = "hskey-auth-TESTONLY-0123456789";

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("vdc-udg-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(tools::workspace_root().join("ignition/fixtures").join(name)).unwrap()
}

fn udg(cmd: &mut Command) -> Output {
    vdc::cmd::quiet_output(cmd).unwrap()
}

/// `userdata-gen generate` with a pre-minted key file, no headscale involved.
fn generate_offline(s: &Scratch, userdata: Option<&str>, extra: &[&str]) -> (Output, PathBuf) {
    std::fs::write(s.path("key"), KEY).unwrap();
    let out = s.path("out");
    let _ = std::fs::remove_file(&out);
    let mut c = Command::new(tools::project_bin("userdata-gen"));
    c.args([
        "generate",
        "--machine-id",
        "0cfc7e24-aaaa-4bbb-8ccc-000000000001",
        "--project",
        "p1",
    ])
    .args([
        "--login-server",
        "https://headscale.example:443",
        "--auth-key-file",
    ])
    .arg(s.path("key"))
    .arg("--output")
    .arg(&out)
    .arg("--metadata-out")
    .arg(s.path("meta.json"))
    .args(extra);
    if let Some(u) = userdata {
        std::fs::write(s.path("userdata"), u).unwrap();
        c.arg("--userdata").arg(s.path("userdata"));
    }
    (udg(&mut c), out)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// What every applied root must hold: our files with their modes, our units enabled.
fn assert_mesh_installed(root: &Path) {
    let etc = root.join("etc/vpn-agent");
    assert_eq!(std::fs::read_to_string(etc.join("authkey")).unwrap(), KEY);
    assert_eq!(mode(&etc.join("authkey")), 0o600);
    assert_eq!(mode(&etc.join("tailscaled.conf")), 0o600);
    assert_eq!(mode(&etc.join("agent.json")), 0o644);
    let conf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(etc.join("tailscaled.conf")).unwrap())
            .unwrap();
    assert_eq!(conf["Version"], "alpha0");
    assert_eq!(conf["AuthKey"], "file:/etc/vpn-agent/authkey");
    assert_eq!(conf["Hostname"], "0cfc7e24-aaaa-4bbb-8ccc-000000000001");
    for unit in ["tailscaled.service", "vpn-agent-firewall.service"] {
        let shipped =
            std::fs::read_to_string(tools::workspace_root().join("systemd").join(unit)).unwrap();
        let written = std::fs::read_to_string(root.join("etc/systemd/system").join(unit)).unwrap();
        assert_eq!(written, shipped, "{unit} differs from systemd/{unit}");
    }
    let preset =
        std::fs::read_to_string(root.join("etc/systemd/system-preset/20-ignition.preset")).unwrap();
    for unit in ["tailscaled.service", "vpn-agent-firewall.service"] {
        assert!(
            preset.contains(&format!("enable {unit}")),
            "{unit} not enabled: {preset}"
        );
    }
}

#[test]
fn flatcar_ignition_applies_generated_spec_2_userdata() {
    require_lab!();
    let fcm = fixture("fcm-firewall-2.3.0.json");
    let b64 = base64::engine::general_purpose::STANDARD.encode(&fcm);
    let cases: Vec<(&str, Option<String>)> = vec![
        ("fcm", Some(fcm.clone())),
        ("fcm-base64", Some(b64)),
        ("none", None),
        ("v2.0", Some(r#"{"ignition":{"version":"2.0.0"}}"#.into())),
        ("v2.4", Some(r#"{"ignition":{"version":"2.4.0"}}"#.into())),
    ];
    for (name, userdata) in cases {
        let s = Scratch::new(&format!("flatcar-{name}"));
        let (out, path) = generate_offline(&s, userdata.as_deref(), &[]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut config = std::fs::read_to_string(&path).unwrap();
        if name.ends_with("base64") {
            assert!(!config.contains('{'), "base64 in, base64 out");
            config = String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(config.trim())
                    .unwrap(),
            )
            .unwrap();
        }
        vdc::ignition::validate_flatcar(&config, &s.path("work")).unwrap();
        let root = s.path("root");
        vdc::ignition::apply_flatcar(&config, &root, &s.path("work"))
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_mesh_installed(&root);
        if name.starts_with("fcm") {
            let kc = root.join("etc/firewall-controller/.kubeconfig");
            assert_eq!(
                std::fs::read_to_string(&kc).unwrap(),
                "apiVersion: v1\nkind: Config\n"
            );
            assert_eq!(mode(&kc), 0o600);
            assert!(root.join("etc/systemd/system/user-hello.service").exists());
            let preset =
                std::fs::read_to_string(root.join("etc/systemd/system-preset/20-ignition.preset"))
                    .unwrap();
            assert!(
                preset.contains("enable firewall-controller.service"),
                "{preset}"
            );
        }
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(s.path("meta.json")).unwrap()).unwrap();
        assert!(!meta.to_string().contains(KEY), "metadata holds the key");
        assert!(meta["warnings"].as_array().unwrap().is_empty(), "{meta}");
    }
}

#[test]
fn coreos_ignition_applies_generated_spec_3_userdata() {
    require_lab!();
    for minor in 0..=6 {
        let coreos = vdc::ignition::Coreos::for_spec_3(minor);
        let s = Scratch::new(&format!("coreos-3.{minor}"));
        let user = fixture("user-3.x.json").replace("\"3.0.0\"", &format!("\"3.{minor}.0\""));
        let (out, path) = generate_offline(&s, Some(&user), &["--target", "coreos"]);
        assert!(
            out.status.success(),
            "3.{minor}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let config = std::fs::read_to_string(&path).unwrap();
        assert!(
            config.contains(&format!("\"version\": \"3.{minor}.0\"")),
            "keeps the user's version"
        );
        vdc::ignition::validate_coreos(&coreos, &config, &s.path("work")).unwrap();
        let root = s.path("root");
        vdc::ignition::apply_coreos(&coreos, &config, &root, &s.path("work"))
            .unwrap_or_else(|e| panic!("3.{minor}: {e:#}"));
        assert_mesh_installed(&root);
        assert_eq!(
            std::fs::read_to_string(root.join("etc/motd")).unwrap(),
            "managed by the user\n"
        );
        assert_eq!(
            mode(&root.join("etc/vpn-agent")),
            0o700,
            "the user's directory mode stays"
        );
        assert!(
            root.join("etc/systemd/system/user-hello.service.d/10-env.conf")
                .exists()
        );
    }
}

#[test]
fn spec_3_for_metal_stack_is_reported_on_stderr_and_in_metadata() {
    require_lab!();
    let s = Scratch::new("v3-warning");
    let (out, _) = generate_offline(&s, Some(r#"{"ignition":{"version":"3.4.0"}}"#), &[]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot run on metal-stack's images"),
        "{stderr}"
    );
    let meta = std::fs::read_to_string(s.path("meta.json")).unwrap();
    assert!(
        meta.contains("cannot run on metal-stack's images"),
        "{meta}"
    );
}

#[test]
fn without_headscale_settings_userdata_passes_through_byte_for_byte() {
    require_lab!();
    let s = Scratch::new("passthrough");
    for input in [
        &b"#!/bin/sh\necho not even a supported format\n"[..],
        b"",
        &[0xff, 0x00, 0x10],
    ] {
        std::fs::write(s.path("in"), input).unwrap();
        let out = udg(Command::new(tools::project_bin("userdata-gen"))
            .args([
                "generate",
                "--machine-id",
                "m",
                "--project",
                "p",
                "--userdata",
            ])
            .arg(s.path("in"))
            .arg("--output")
            .arg(s.path("out")));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(std::fs::read(s.path("out")).unwrap(), input);
    }
}

#[test]
fn bad_input_fails_with_exit_2_and_writes_nothing() {
    require_lab!();
    let cases = [
        ("#!/bin/sh\necho hi\n", "script"),
        (
            "{\"ignition\":{\"version\":\"2.3.0\"},\n \"storage\": {",
            "line 2",
        ),
        (r#"{"ignition":{"version":"3.7.0"}}"#, "3.7.0"),
        (
            r#"{"ignition":{"version":"2.3.0"},"storage":{"files":[{"filesystem":"root","path":"/etc/vpn-agent/authkey"}]}}"#,
            "$.storage.files[0]",
        ),
        (
            r#"{"ignition":{"version":"2.3.0","config":{"replace":{"source":"http://x/y"}}}}"#,
            "replace",
        ),
        ("#cloud-config\nruncmd: echo\n", "runcmd must be a list"),
    ];
    for (input, want) in cases {
        let s = Scratch::new("bad");
        let (out, path) = generate_offline(&s, Some(input), &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{input}: {stderr}");
        assert!(stderr.contains(want), "{input}: {stderr}");
        assert!(stderr.contains("--userdata /"), "names the file: {stderr}");
        assert!(!stderr.contains(KEY));
        assert!(!path.exists(), "output written despite the error");
        assert!(!s.path("meta.json").exists());
    }
}

#[test]
fn cloud_config_keeps_the_users_lines() {
    require_lab!();
    let s = Scratch::new("cloud-config");
    let user = fixture("user-cloud-config.yaml");
    let (out, path) = generate_offline(&s, Some(&user), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let merged = std::fs::read_to_string(path).unwrap();
    // Every line the user wrote is still there, in order.
    let mut rest = merged.as_str();
    for line in user.lines() {
        let at = rest
            .find(line)
            .unwrap_or_else(|| panic!("lost line {line:?}:\n{merged}"));
        rest = &rest[at + line.len()..];
    }
    assert_eq!(merged.matches("\nwrite_files:").count(), 1);
    assert_eq!(merged.matches("\nruncmd:").count(), 1);
    assert!(merged.contains("systemctl', 'enable', '--now', '--no-block'"));
}

/// Runs `userdata-gen` inside lab host `host`, where headscale is reachable.
fn udg_in(lab: &Lab, host: &str, args: &[&str], env_key: Option<&str>) -> Output {
    let mut c = lab
        .host(host)
        .ns()
        .command(tools::project_bin("userdata-gen"));
    c.args(args);
    if let Some(k) = env_key {
        c.env("HEADSCALE_API_KEY", k);
    }
    udg(&mut c)
}

#[test]
fn generated_userdata_joins_a_stock_tailscaled_to_real_headscale() {
    require_lab!();
    let lab = Lab::start(LabOptions::hosts(&["fw", "op"])).unwrap();
    let hs = lab.headscale();
    let api_key = hs.create_api_key().unwrap();
    let dir = lab.host_dir("ctl");
    let ca = hs.ca_path();
    let out_path = dir.join("userdata.ign");
    let meta_path = dir.join("meta.json");
    let machine = "0cfc7e24-aaaa-4bbb-8ccc-000000000042";
    let generate = |userdata: &str, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--machine-id",
            machine,
            "--project",
            "project-a",
        ];
        let url = hs.url();
        let (ca, out, meta) = (
            ca.to_str().unwrap(),
            out_path.to_str().unwrap(),
            meta_path.to_str().unwrap(),
        );
        args.extend([
            "--login-server",
            &url,
            "--ca-file",
            ca,
            "--userdata",
            userdata,
        ]);
        args.extend(["--output", out, "--metadata-out", meta]);
        args.extend(extra);
        udg_in(&lab, "ctl", &args, Some(&api_key))
    };
    let out = generate(dir.join("none").to_str().unwrap(), &[]);
    // --userdata names a file that does not exist: bad input, nothing minted.
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        hs.rest(&api_key).get_json("/api/v1/preauthkey").unwrap()["preAuthKeys"]
            .as_array()
            .is_none_or(|a| a.is_empty())
    );

    std::fs::write(dir.join("user.ign"), fixture("fcm-firewall-2.3.0.json")).unwrap();
    let out = generate(
        dir.join("user.ign").to_str().unwrap(),
        &["--tags", "tag:firewall"],
    );

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    assert_eq!(meta["user"], "project-a");
    assert_eq!(meta["format"], "ignition-2.3.0");

    // The key, read back from headscale: single-use, not ephemeral, about an hour, right user.
    let rest = hs.rest(&api_key);
    let users = rest.get_json("/api/v1/user?name=project-a").unwrap();
    let user_id = users["users"][0]["id"].as_str().unwrap().to_string();
    let keys = rest
        .get_json(&format!("/api/v1/preauthkey?user={user_id}"))
        .unwrap();
    let key = keys["preAuthKeys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == meta["key_id"])
        .unwrap_or_else(|| panic!("key {} not in {keys}", meta["key_id"]))
        .clone();
    assert_eq!(key["reusable"], false);
    assert_eq!(key["ephemeral"], false);
    assert_eq!(key["used"], false);
    let exp = humantime::parse_rfc3339(key["expiration"].as_str().unwrap()).unwrap();
    let left = exp
        .duration_since(std::time::SystemTime::now())
        .unwrap()
        .as_secs();
    assert!((3500..=3600).contains(&left), "key expires in {left}s");

    // The real Ignition writes the firewall's root; a stock tailscaled runs from its files.
    let root = lab.host_dir("fw").join("root");
    let config = std::fs::read_to_string(&out_path).unwrap();
    vdc::ignition::apply_flatcar(&config, &root, &lab.host_dir("fw").join("ignition")).unwrap();
    let ts = lab
        .start_tailscaled_from_root(
            "fw",
            &root,
            "/etc/vpn-agent/tailscaled.conf",
            "/etc/vpn-agent/ca.pem",
        )
        .unwrap();
    let nodes = hs
        .wait_nodes(
            "the firewall online",
            std::time::Duration::from_secs(60),
            |n| n.iter().any(|n| n.name == machine && n.online),
        )
        .unwrap();
    let node = nodes.iter().find(|n| n.name == machine).unwrap();
    // headscale v0.28 hands a node registered with a tagged key to the tags: it lists such
    // nodes under its pseudo-user `tagged-devices`; the key itself belongs to the project.
    assert_eq!(key["user"]["name"], "project-a");
    assert_eq!(node.user, "tagged-devices");
    assert_eq!(node.tags, vec!["tag:firewall".to_string()], "{node:?}");
    assert_eq!(key["aclTags"], serde_json::json!(["tag:firewall"]));
    drop(ts);

    // The same key a second time: headscale refuses it.
    let op = lab.start_tailscaled("op").unwrap();
    let key_file = root.join("etc/vpn-agent/authkey");
    let second = vdc::cmd::quiet_output(op.cli().args([
        "up",
        &format!("--login-server={}", hs.url()),
        &format!("--auth-key=file:{}", key_file.display()),
        "--hostname=second",
        "--netfilter-mode=off",
        "--timeout=20s",
    ]))
    .unwrap();
    let text = String::from_utf8_lossy(&second.stderr).into_owned()
        + &String::from_utf8_lossy(&second.stdout);
    assert!(
        !second.status.success(),
        "a used single-use key registered again: {text}"
    );
    assert!(text.contains("already used"), "{text}");
}

/// `userdata-gen generate` from `fw` against headscale's REST API at `api_url`, trusting
/// `ca`, with API key `key`: its exit code and stderr.
fn generate_against(lab: &Lab, api_url: &str, ca: &Path, key: &str) -> (Option<i32>, String) {
    let hs = lab.headscale();
    let url = hs.url();
    let args = [
        "generate",
        "--machine-id",
        "m1",
        "--project",
        "p",
        "--login-server",
        &url,
        "--headscale-api-url",
        api_url,
        "--ca-file",
        ca.to_str().unwrap(),
        "--timeout",
        "3s",
    ];
    let o = udg_in(lab, "fw", &args, Some(key));
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn headscale_failures_are_exit_3_with_a_reason() {
    require_lab!();
    let lab = Lab::start(LabOptions::hosts(&["fw"])).unwrap();
    let hs = lab.headscale();
    let (url, ca) = (hs.url(), hs.ca_path());
    // A wrong API key.
    let (code, err) = generate_against(&lab, &url, &ca, "not-a-valid-api-key");
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("refused the API key"), "{err}");
    assert!(!err.contains("not-a-valid-api-key"), "{err}");
    // A CA that did not sign headscale's certificate.
    let other = vdc::pki::generate("192.0.2.1".parse().unwrap(), "other").unwrap();
    let other_ca = lab.host_dir("fw").join("other-ca.pem");
    std::fs::write(&other_ca, other.ca_pem).unwrap();
    let good_key = hs.create_api_key().unwrap();
    let (code, err) = generate_against(&lab, &url, &other_ca, &good_key);
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("TLS certificate was not accepted") && err.contains("--ca-file"),
        "{err}"
    );
    // A server that does not speak headscale's API.
    let (code, err) = generate_against(&lab, &format!("{url}/not-the-api"), &ca, &good_key);
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("does not speak headscale v0.28's REST API"),
        "{err}"
    );
    // headscale unreachable.
    lab.cut_off("ctl").unwrap();
    let (code, err) = generate_against(&lab, &url, &ca, &good_key);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("cannot reach headscale"), "{err}");
}

#[test]
fn an_expired_certificate_is_exit_3() {
    require_lab!();
    let lab = Lab::start(LabOptions {
        hosts: vec!["fw".into()],
        expired_tls: true,
        ..LabOptions::default()
    })
    .unwrap();
    let hs = lab.headscale();
    let (url, ca) = (hs.url(), hs.ca_path());
    // headscale needs a moment to listen; it cannot be health-checked through the bad chain.
    let mut last = (None, String::new());
    for _ in 0..50 {
        last = generate_against(&lab, &url, &ca, "some-api-key");
        if last.1.contains("TLS certificate") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (code, err) = last;
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("TLS certificate was not accepted") && err.to_lowercase().contains("expired"),
        "{err}"
    );
}

/// `cloud-init schema` on a file: its exit status and its list of schema errors.
fn cloud_init_schema(path: &Path) -> (bool, Vec<String>) {
    let o = udg(Command::new("cloud-init")
        .args(["schema", "--config-file"])
        .arg(path));
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    let errors = text
        .lines()
        .filter_map(|l| l.strip_prefix("Cloud config schema errors: "))
        .flat_map(|l| l.split(", ").map(str::to_string).collect::<Vec<_>>())
        .collect();
    (o.status.success(), errors)
}

#[test]
fn cloud_init_accepts_generated_cloud_config() {
    require_lab!();
    let s = Scratch::new("cloud-init");
    // A fresh cloud-config passes cloud-init's own schema check.
    let (out, path) = generate_offline(&s, None, &["--format", "cloud-config"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, errors) = cloud_init_schema(&path);
    assert!(ok, "{errors:?}");
    // The user's fixture has YAML 1.1 mistakes of its own; merging adds none.
    let user = fixture("user-cloud-config.yaml");
    std::fs::write(s.path("user.yaml"), &user).unwrap();
    let (_, before) = cloud_init_schema(&s.path("user.yaml"));
    let (out, path) = generate_offline(&s, Some(&user), &[]);
    assert!(out.status.success());
    let (_, after) = cloud_init_schema(&path);
    assert_eq!(before, after);
    // PyYAML (what cloud-init parses with) reads our entries as meant.
    let py = udg(Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(&path));
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
    let key = doc["write_files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "/etc/vpn-agent/authkey")
        .unwrap();
    assert_eq!(key["permissions"], "0600");
    assert_eq!(key["owner"], "root:root");
    assert_eq!(key["encoding"], "b64");
    let content = base64::engine::general_purpose::STANDARD
        .decode(key["content"].as_str().unwrap())
        .unwrap();
    assert_eq!(content, KEY.as_bytes());
    assert_eq!(doc["hostname"], "fw-1", "the user's keys keep their values");
    assert_eq!(
        doc["write_files"][0]["permissions"], 420,
        "the user's YAML 1.1 octal stays theirs"
    );
    let runcmd = doc["runcmd"].as_array().unwrap();
    assert_eq!(runcmd[0], "echo hello");
    assert_eq!(runcmd.last().unwrap()[1], "enable");
}

#[test]
fn a_vrf_binds_the_agents_sockets_to_it() {
    require_lab!();
    let s = Scratch::new("vrf");
    let fcm = fixture("fcm-firewall-2.3.0.json");
    let (out, path) = generate_offline(&s, Some(&fcm), &["--vrf", "vrf104009"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = s.path("root");
    vdc::ignition::apply_flatcar(
        &std::fs::read_to_string(&path).unwrap(),
        &root,
        &s.path("work"),
    )
    .unwrap();
    assert_mesh_installed(&root);
    let settings: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("etc/vpn-agent/agent.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(settings["bind_device"], "vrf104009", "{settings}");
    // The unit runs the agent as it is: no `ip vrf exec`, which the hardened unit could
    // not run (it needs cgroup and BPF privileges).
    assert!(
        !root
            .join("etc/systemd/system/tailscaled.service.d")
            .exists()
    );
    let (out, _) = generate_offline(&s, Some(&fcm), &["--vrf", "vrf; rm -rf /"]);
    assert_eq!(out.status.code(), Some(2));
}

/// The tenant writes the userdata; metal-api runs us in its allocation path. A gzip bomb
/// in a `data:` child and a "billion laughs" cloud-config are refused with exit 2, quickly
/// and within 1 GiB of address space; the output holding the key is 0600; http:// URLs
/// for headscale are refused unless a lab allows them.
#[test]
fn hostile_userdata_is_refused_quickly_within_bounded_memory() {
    require_lab!();
    // 64 MiB of zeros, gzipped (~65 KiB), as a spec 3.3 child config.
    let bomb = vdc::cmd::run_quiet(Command::new("python3").args([
        "-c",
        "import gzip,base64,sys; sys.stdout.write(base64.b64encode(gzip.compress(b' ' * (64 << 20), 9)).decode())",
    ]))
    .unwrap();
    let gzip_bomb = format!(
        r#"{{"ignition":{{"version":"3.3.0","config":{{"merge":[{{"source":"data:;base64,{}","compression":"gzip"}}]}}}}}}"#,
        bomb.trim()
    );
    let mut laughs = String::from(
        "#cloud-config\nl0: &l0 [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    for i in 1..10 {
        let refs = vec![format!("*l{}", i - 1); 9].join(",");
        laughs.push_str(&format!("l{i}: &l{i} [{refs}]\n"));
    }
    for (input, want) in [
        (gzip_bomb.as_str(), "limit of 16 MiB"),
        (laughs.as_str(), "more than 100000 YAML nodes"),
    ] {
        let s = Scratch::new("hostile");
        std::fs::write(s.path("key"), KEY).unwrap();
        std::fs::write(s.path("userdata"), input).unwrap();
        let started = std::time::Instant::now();
        let out = udg(Command::new("sh")
            .args(["-c", r#"ulimit -v 1048576 && exec "$@""#, "sh"])
            .arg(tools::project_bin("userdata-gen"))
            .args(["generate", "--machine-id", "m1", "--project", "p1"])
            .args(["--login-server", "https://headscale.example:443"])
            .arg("--auth-key-file")
            .arg(s.path("key"))
            .arg("--userdata")
            .arg(s.path("userdata"))
            .arg("--output")
            .arg(s.path("out")));
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!(
            "{want}: exit {:?} after {:.0?} ({} bytes of input)",
            out.status.code(),
            started.elapsed(),
            input.len()
        );
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(want), "{stderr}");
        assert!(!s.path("out").exists());
    }

    // The output holds the key: 0600.
    let s = Scratch::new("mode");
    let (out, path) = generate_offline(&s, None, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode(&path), 0o600);

    // Plain http for headscale: refused, unless a lab says so.
    for (extra, ok) in [(&[][..], false), (&["--allow-plaintext"][..], true)] {
        std::fs::write(s.path("key"), KEY).unwrap();
        let out = udg(Command::new(tools::project_bin("userdata-gen"))
            .args(["generate", "--machine-id", "m1", "--project", "p1"])
            .args(["--login-server", "http://headscale.example:8080"])
            .arg("--auth-key-file")
            .arg(s.path("key"))
            .arg("--output")
            .arg(s.path("plain"))
            .args(extra));
        let stderr = String::from_utf8_lossy(&out.stderr);
        if ok {
            assert!(out.status.success(), "{stderr}");
        } else {
            assert_eq!(out.status.code(), Some(2), "{stderr}");
            assert!(stderr.contains("plain http"), "{stderr}");
            assert!(!s.path("plain").exists());
        }
    }
}
