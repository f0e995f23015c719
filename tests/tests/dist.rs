//! The Debian package for image builders, built with the real `dpkg-deb` from this build's
//! binaries, installed into an empty root: every file where the units expect it, with its
//! mode, owned by root, byte for byte what the repository holds.

use std::process::Command;
use vdc::dist::{build_deb, deb_files};
use vdc::{cmd, tools};

#[test]
fn the_debian_package_installs_every_file_with_its_mode_into_an_empty_root() {
    if Command::new("dpkg-deb").arg("--version").output().is_err() {
        eprintln!("SKIPPED: dpkg-deb is missing (cargo xtask setup installs dpkg on Debian)");
        return;
    }
    let bins = tools::project_bin("vpn-agent")
        .parent()
        .expect("a directory")
        .to_path_buf();
    let dir = std::env::temp_dir().join(format!("vdc-deb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Uncompressed: xz would spend minutes on the debug binaries; the layout is the same.
    let deb = build_deb(&bins, "0.1.0", &dir, 1_700_000_000, "none").unwrap();

    let field = |f: &str| cmd::run_quiet(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(f));
    assert_eq!(field("Package").unwrap().trim(), "vpn-agent");
    assert_eq!(field("Conflicts").unwrap().trim(), "tailscale");
    let listing = cmd::run_quiet(Command::new("dpkg-deb").arg("-c").arg(&deb)).unwrap();
    for line in listing.lines() {
        assert!(line.contains(" root/root "), "not owned by root: {line}");
    }

    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    cmd::run_quiet(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root)).unwrap();
    let expected = deb_files(&bins);
    for f in &expected {
        use std::os::unix::fs::PermissionsExt;
        let installed = root.join(&f.path);
        let meta = std::fs::metadata(&installed)
            .unwrap_or_else(|e| panic!("{} is not installed: {e}", f.path));
        assert_eq!(meta.permissions().mode() & 0o7777, f.mode, "{}", f.path);
        assert_eq!(
            std::fs::read(&installed).unwrap(),
            std::fs::read(&f.source).unwrap(),
            "{} differs from {}",
            f.path,
            f.source.display()
        );
    }
    let files = cmd::run_quiet(Command::new("find").arg(&root).args(["-type", "f"])).unwrap();
    assert_eq!(
        files.lines().count(),
        expected.len(),
        "extra files:\n{files}"
    );
    // The units run the agent from where the package put it.
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/tailscaled.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/bin/vpn-agent run"),
        "{unit}"
    );
    let version =
        cmd::run_quiet(Command::new(root.join("usr/local/bin/vpn-agent")).arg("--version"))
            .unwrap();
    assert!(version.starts_with("vpn-agent 0.1.0 (commit "), "{version}");
    println!(
        "    {} ({} files): {}",
        deb.display(),
        expected.len(),
        version.trim()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
