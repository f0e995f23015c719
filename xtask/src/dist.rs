//! `cargo xtask dist`: the release artifacts. Static binaries (`x86_64-unknown-linux-musl`,
//! so they run on any firewall image whatever its libc), the Debian package for image
//! builders, and `SHA512SUMS`, in `target/dist/`. `--check` builds everything a second time,
//! from scratch in the same place, and fails unless every artifact has the same sha512.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "x86_64-unknown-linux-musl";
const BINARIES: &[&str] = &["vpn-agent", "userdata-gen"];

pub fn run(check: bool) -> Result<()> {
    setup()?;
    let root = vdc::tools::workspace_root();
    let out = root.join("target/dist");
    let first = build(&root, &out, false)?;
    if check {
        println!("==> dist --check: building everything again from scratch");
        let second = build(&root, &out, true)?;
        if first != second {
            bail!(
                "dist --check: the two builds differ\nfirst:\n{}\nsecond:\n{}",
                first,
                second
            );
        }
        println!("dist --check: both builds are identical (sha512)");
    }
    println!("dist: artifacts in {}:\n{first}", out.display());
    Ok(())
}

/// The musl target (rustup) and a C compiler for it (the TLS crypto is C).
fn setup() -> Result<()> {
    crate::setup::apt(&["musl-tools"])?;
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("cannot run rustup")?;
    if !String::from_utf8_lossy(&installed.stdout).contains(TARGET) {
        let ok = Command::new("rustup")
            .args(["target", "add", TARGET])
            .status()?
            .success();
        if !ok {
            bail!("dist: `rustup target add {TARGET}` failed");
        }
    }
    Ok(())
}

/// The commit to stamp into the binaries; a tree with uncommitted changes is marked.
fn commit(root: &Path) -> Result<(String, u64)> {
    let git = |args: &[&str]| -> Result<String> {
        let out = Command::new("git").args(args).current_dir(root).output()?;
        if !out.status.success() {
            bail!("git {} failed", args.join(" "));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let hash = git(&["rev-parse", "--short=12", "HEAD"])?;
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"])?.is_empty();
    // Timestamps in the package are the commit's, so they do not change between builds.
    let epoch = git(&["log", "-1", "--format=%ct"])?.parse()?;
    Ok((if dirty { format!("{hash}-dirty") } else { hash }, epoch))
}

/// Builds the binaries and the package into `out` (`fresh`: from an empty build directory,
/// at the same path); returns the `SHA512SUMS` text.
fn build(root: &Path, out: &Path, fresh: bool) -> Result<String> {
    let (commit, epoch) = commit(root)?;
    let build_dir = root.join("target/dist-build");
    if fresh {
        let _ = std::fs::remove_dir_all(&build_dir);
    }
    let _ = std::fs::remove_dir_all(out);
    std::fs::create_dir_all(out)?;
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    // Paths of this machine stay out of the binaries (panic messages); no debug info, which
    // would be most of a binary that firewalls download at boot.
    let rustflags = format!(
        "-C target-feature=+crt-static -C strip=debuginfo --remap-path-prefix={}=/cargo \
         --remap-path-prefix={}=/src",
        home.display(),
        root.display()
    );
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root)
        .env("VPN_BUILD_COMMIT", &commit)
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .env("CARGO_TARGET_DIR", &build_dir)
        .env("RUSTFLAGS", rustflags)
        .args(["build", "--release", "--locked", "--target", TARGET])
        .args(["-p", "vpn-agent", "-p", "userdata-gen", "--bins"]);
    println!("==> dist: {} ({commit})", vdc::cmd::render(&c));
    if !c.status()?.success() {
        bail!("dist: the release build failed");
    }
    for b in BINARIES {
        let bin = build_dir.join(TARGET).join("release").join(b);
        if !vdc::dist::is_static_elf(&bin)? {
            bail!("dist: {} is not statically linked", bin.display());
        }
        std::fs::copy(&bin, out.join(b))?;
    }
    let version = env!("CARGO_PKG_VERSION");
    let deb = vdc::dist::build_deb(out, version, out, epoch, "xz")?;
    let _ = std::fs::remove_dir_all(out.join("deb-root"));
    let names: Vec<String> = BINARIES
        .iter()
        .map(|b| b.to_string())
        .chain(deb.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    let sums = vdc::cmd::run_quiet(Command::new("sha512sum").args(&names).current_dir(out))?;
    std::fs::write(out.join("SHA512SUMS"), &sums)?;
    Ok(sums)
}
