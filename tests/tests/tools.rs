//! The real peers that `cargo xtask setup` installs are there, at the pinned versions.

use std::process::Command;
use vdc::{require_lab, tools};

fn stdout(cmd: &mut Command) -> String {
    let out = vdc::cmd::output(cmd).unwrap();
    assert!(out.status.success(), "{}: {out:?}", vdc::cmd::render(cmd));
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn tailscale_is_the_pinned_version() {
    require_lab!();
    let want = tools::TAILSCALE.version.trim_start_matches('v');
    for bin in [tools::tailscale_bin(), tools::tailscaled_bin()] {
        let out = stdout(Command::new(&bin).arg("--version"));
        assert_eq!(out.lines().next(), Some(want), "{}", bin.display());
    }
}

#[test]
fn headscale_runs() {
    require_lab!();
    let out = stdout(Command::new(tools::headscale_bin()).arg("version"));
    assert!(out.contains("headscale version"), "{out}");
}

#[test]
fn flatcar_ignition_is_the_pinned_version_and_reads_only_spec_2() {
    require_lab!();
    let out = stdout(Command::new(tools::flatcar_ignition_bin()).arg("-version"));
    assert!(out.contains(tools::FLATCAR_IGNITION.version), "{out}");
    let dir = std::env::temp_dir().join(format!("vdc-tools-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let validate = |version: &str| {
        let f = dir.join(format!("{version}.ign"));
        std::fs::write(&f, format!(r#"{{"ignition":{{"version":"{version}"}}}}"#)).unwrap();
        Command::new(tools::flatcar_ignition_validate_bin())
            .arg(&f)
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(validate("2.3.0"));
    assert!(!validate("3.3.0"), "flatcar v0.36.2 must reject spec 3.x");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn coreos_ignition_is_the_pinned_version() {
    require_lab!();
    let out = stdout(Command::new(tools::COREOS_IGNITION.bin("ignition")).arg("-version"));
    assert!(out.contains(tools::COREOS_IGNITION.version), "{out}");
}
