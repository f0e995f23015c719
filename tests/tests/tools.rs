//! The real peers that `cargo xtask setup` installs are there, at the pinned versions.

use std::process::Command;
use vdc::{require_lab, tools};

fn stdout(cmd: &mut Command) -> String {
    let out = vdc::cmd::output(cmd).unwrap();
    assert!(out.status.success(), "{}: {out:?}", vdc::cmd::render(cmd));
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn every_supported_tailscale_is_its_version() {
    require_lab!();
    for v in tools::TAILSCALE_VERSIONS {
        let tool = tools::tailscale_at(v);
        for bin in [tool.bin("tailscale"), tool.bin("tailscaled")] {
            let out = stdout(Command::new(&bin).arg("--version"));
            assert_eq!(
                out.lines().next(),
                Some(v.trim_start_matches('v')),
                "{}",
                bin.display()
            );
        }
    }
}

/// headscale built from the module cache reports itself as `dev` (it reads its version from
/// VCS build info only); the cache's recipe says which version each binary is.
#[test]
fn every_supported_headscale_is_built_from_its_version_and_runs() {
    require_lab!();
    for v in tools::HEADSCALE_VERSIONS {
        let tool = tools::headscale_at(v);
        assert!(
            tool.installed(),
            "headscale {v} is not in {}",
            tool.dir().display()
        );
        let out = stdout(Command::new(tool.bin("headscale")).arg("version"));
        assert!(out.contains("headscale version"), "{v}: {out}");
    }
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

/// `cargo xtask test` fuzzes every listed target from its committed seeds: each must be a
/// `[[bin]]` of its fuzz crate and have seed inputs (git keeps no empty directory).
#[test]
fn every_fuzz_target_is_declared_and_has_committed_seeds() {
    let root = tools::workspace_root();
    for (dir, target) in tools::FUZZ_TARGETS {
        let manifest = std::fs::read_to_string(root.join(dir).join("fuzz/Cargo.toml")).unwrap();
        assert!(
            manifest.contains(&format!("name = \"{target}\"")),
            "{dir}/fuzz/Cargo.toml has no [[bin]] {target}"
        );
        let seeds = root.join(dir).join("fuzz/corpus").join(target);
        let count = std::fs::read_dir(&seeds).map(|d| d.count()).unwrap_or(0);
        assert!(count > 0, "no seed inputs in {}", seeds.display());
    }
}
