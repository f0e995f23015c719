//! Release artifacts for image builders: the Debian package, laid out from the binaries and
//! the units in `systemd/` (the same files `userdata-gen` embeds), built with `dpkg-deb`.
//! `cargo xtask dist` packages the static release build; the lab test packages the debug
//! build the same way and installs it into an empty root.

use crate::cmd;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

pub const PACKAGE: &str = "vpn-agent";
/// Where the binaries go: the path the units run them from (flatcar's `/usr` is read-only,
/// so Ignition puts them there too).
pub const BIN_DIR: &str = "usr/local/bin";
pub const UNIT_DIR: &str = "lib/systemd/system";

/// One file of the package: its path inside the root, its mode, and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebFile {
    pub path: String,
    pub mode: u32,
    pub source: PathBuf,
}

/// Every file of the package, for the binaries in `bin_dir`.
pub fn deb_files(bin_dir: &Path) -> Vec<DebFile> {
    let systemd = crate::tools::workspace_root().join("systemd");
    let mut files: Vec<DebFile> = ["vpn-agent", "userdata-gen"]
        .into_iter()
        .map(|b| DebFile {
            path: format!("{BIN_DIR}/{b}"),
            mode: 0o755,
            source: bin_dir.join(b),
        })
        .collect();
    for (path, source) in [
        ("vpn-agent-firewall.service", "vpn-agent-firewall.service"),
        ("tailscaled.service", "tailscaled.service"),
        (
            "nftables.service.d/50-vpn-agent.conf",
            "nftables.service.d/50-vpn-agent.conf",
        ),
        (
            "ssh.service.d/50-vpn-agent.conf",
            "ssh.service.d/50-vpn-agent.conf",
        ),
        (
            "sshd.service.d/50-vpn-agent.conf",
            "ssh.service.d/50-vpn-agent.conf",
        ),
    ] {
        files.push(DebFile {
            path: format!("{UNIT_DIR}/{path}"),
            mode: 0o644,
            source: systemd.join(source),
        });
    }
    files
}

/// The package's `DEBIAN/control`.
pub fn control(version: &str, installed_kib: u64) -> String {
    format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: amd64\n\
         Maintainer: vpn-agent maintainers <vpn-agent@localhost>\n\
         Installed-Size: {installed_kib}\n\
         Depends: nftables\n\
         Conflicts: tailscale\n\
         Section: net\n\
         Priority: optional\n\
         Description: headscale mesh agent that closes a bare-metal host's public ports\n \
         vpn-agent joins a headscale tailnet as tailscaled does (ts2021, WireGuard, DERP)\n \
         and keeps SSH and other services reachable only over it. The units are named\n \
         like tailscale's, which it replaces. Enable vpn-agent-firewall.service and\n \
         tailscaled.service in the image; userdata-gen writes the configuration.\n"
    )
}

/// Builds `<out>/vpn-agent_<version>_amd64.deb` from the binaries in `bin_dir`, compressed
/// with `compression` (dpkg-deb's `-Z`: `xz` for releases, `none` for the test's debug
/// binaries). Every timestamp is `epoch`, owners are root: the same inputs give the same
/// bytes.
pub fn build_deb(
    bin_dir: &Path,
    version: &str,
    out: &Path,
    epoch: u64,
    compression: &str,
) -> Result<PathBuf> {
    let root = out.join("deb-root");
    let _ = std::fs::remove_dir_all(&root);
    let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(epoch);
    let mut size = 0;
    for f in deb_files(bin_dir) {
        let dest = root.join(&f.path);
        std::fs::create_dir_all(dest.parent().expect("has a parent"))?;
        std::fs::copy(&f.source, &dest)
            .with_context(|| format!("cannot copy {} into the package", f.source.display()))?;
        set_mode(&dest, f.mode)?;
        size += std::fs::metadata(&dest)?.len();
    }
    let debian = root.join("DEBIAN");
    std::fs::create_dir_all(&debian)?;
    std::fs::write(
        debian.join("control"),
        control(version, size.div_ceil(1024)),
    )?;
    set_mode(&debian.join("control"), 0o644)?;
    stamp_tree(&root, mtime)?;
    let deb = out.join(format!("{PACKAGE}_{version}_amd64.deb"));
    cmd::run_quiet(
        Command::new("dpkg-deb")
            .env("SOURCE_DATE_EPOCH", epoch.to_string())
            .arg("--root-owner-group")
            .arg(format!("-Z{compression}"))
            .arg("--build")
            .arg(&root)
            .arg(&deb),
    )?;
    Ok(deb)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Sets the modification time of everything below `dir` (and `dir`) to `t`; directories
/// 0755.
fn stamp_tree(dir: &Path, t: SystemTime) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        if p.is_dir() {
            stamp_tree(&p, t)?;
        } else {
            std::fs::File::options()
                .write(true)
                .open(&p)?
                .set_modified(t)?;
        }
    }
    set_mode(dir, 0o755)?;
    std::fs::File::open(dir)?.set_modified(t)?;
    Ok(())
}

/// Whether the ELF file at `path` is statically linked: it asks for no program interpreter
/// (`PT_INTERP`) and needs no shared library (no `DT_NEEDED` in its dynamic section, which a
/// static-pie binary, as Rust builds for musl, has for relocating itself).
pub fn is_static_elf(path: &Path) -> Result<bool> {
    let b = std::fs::read(path)?;
    let cut = || anyhow::anyhow!("{} is cut off or not an ELF file", path.display());
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        bail!("{} is not a 64-bit little-endian ELF file", path.display());
    }
    let u64_at = |o: usize| -> Result<u64> {
        Ok(u64::from_le_bytes(
            b.get(o..o + 8).ok_or_else(cut)?.try_into()?,
        ))
    };
    let u32_at = |o: usize| -> Result<u32> {
        Ok(u32::from_le_bytes(
            b.get(o..o + 4).ok_or_else(cut)?.try_into()?,
        ))
    };
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    const DT_NEEDED: u64 = 1;
    let phoff = u64_at(32)? as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        match u32_at(ph)? {
            PT_INTERP => return Ok(false),
            PT_DYNAMIC => {
                let (off, size) = (u64_at(ph + 8)? as usize, u64_at(ph + 32)? as usize);
                for entry in (off..off + size).step_by(16) {
                    match u64_at(entry)? {
                        0 => break,
                        DT_NEEDED => return Ok(false),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_package_holds_both_binaries_and_every_unit_and_drop_in() {
        let files = deb_files(Path::new("/b"));
        let paths: Vec<_> = files.iter().map(|f| (f.path.as_str(), f.mode)).collect();
        assert_eq!(
            paths,
            [
                ("usr/local/bin/vpn-agent", 0o755),
                ("usr/local/bin/userdata-gen", 0o755),
                ("lib/systemd/system/vpn-agent-firewall.service", 0o644),
                ("lib/systemd/system/tailscaled.service", 0o644),
                (
                    "lib/systemd/system/nftables.service.d/50-vpn-agent.conf",
                    0o644
                ),
                ("lib/systemd/system/ssh.service.d/50-vpn-agent.conf", 0o644),
                ("lib/systemd/system/sshd.service.d/50-vpn-agent.conf", 0o644),
            ]
        );
        assert!(
            files.iter().skip(2).all(|f| f.source.is_file()),
            "{files:?}"
        );
        let c = control("0.1.0", 12);
        assert!(
            c.contains("Package: vpn-agent\nVersion: 0.1.0\n") && c.ends_with(".\n"),
            "{c}"
        );
    }

    #[test]
    fn static_and_dynamic_binaries_are_told_apart() {
        // This test binary is dynamically linked (the host target); a truncated ELF is an
        // error, not a verdict.
        let me = std::env::current_exe().unwrap();
        assert!(!is_static_elf(&me).unwrap());
        let dir = std::env::temp_dir().join(format!("vdc-elf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cut = dir.join("cut");
        std::fs::write(&cut, &std::fs::read(&me).unwrap()[..40]).unwrap();
        assert!(is_static_elf(&cut).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A release of the agent as metal-api pins it: where it is served, its sha512, and the CA
/// of the server's certificate.
#[derive(Debug, Clone)]
pub struct Release {
    pub url: String,
    pub sha512: String,
    pub ca_file: PathBuf,
}

/// The port lab release servers listen on.
pub const RELEASE_PORT: u16 = 8443;

/// Serves `bin` as `https://<host's address>:8443/vpn-agent` from lab host `host`, with a
/// certificate from a CA of its own (written beside the file).
pub fn serve_release(lab: &crate::Lab, host: &str, bin: &Path) -> Result<Release> {
    let dir = lab.host_dir(host).join("releases");
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(bin, dir.join("vpn-agent"))
        .with_context(|| format!("cannot copy {}", bin.display()))?;
    let ip: std::net::IpAddr = lab.host(host).addr.into();
    let ca = crate::firewall::serve_files_https(lab, host, ip, RELEASE_PORT, &dir)?;
    let ca_file = lab.host_dir(host).join("release-ca.pem");
    std::fs::write(&ca_file, ca)?;
    Ok(Release {
        url: format!("https://{ip}:{RELEASE_PORT}/vpn-agent"),
        sha512: sha512_hex(bin)?,
        ca_file,
    })
}

/// `sha512sum` of a file: 128 hex digits.
pub fn sha512_hex(path: &Path) -> Result<String> {
    let out = cmd::run_quiet(Command::new("sha512sum").arg(path))?;
    out.split_whitespace()
        .next()
        .filter(|h| h.len() == 128)
        .map(String::from)
        .with_context(|| format!("sha512sum of {}: {out:?}", path.display()))
}
