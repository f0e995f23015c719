//! `cargo xtask setup`: Debian packages through apt, and headscale and tailscale built with
//! the machine's Go toolchain at pinned versions into a versioned cache. Idempotent: a
//! second run only checks.

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::process::Command;
use std::time::Instant;
use vdc::tools::{self, APT_PACKAGES, GoTool};

pub fn run() -> Result<()> {
    let start = Instant::now();
    apt(APT_PACKAGES)?;
    for tool in &tools::go_tools() {
        go_tool(tool)?;
    }
    cargo_fuzz()?;
    println!("setup: done in {:.1?}", start.elapsed());
    Ok(())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs whichever of `packages` are missing, with apt.
pub fn apt(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        println!("setup: Debian packages present: {}", packages.join(" "));
        return Ok(());
    }
    if !vdc::is_root() {
        bail!(
            "setup: Debian packages missing ({}) and installing them needs root",
            missing.join(" ")
        );
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    let ok = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
    if !ok(Command::new("apt-get").args(["update", "-qq"])) {
        bail!("setup: `apt-get update` failed; is the Debian mirror reachable?");
    }
    if !ok(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing))
    {
        bail!("setup: `apt-get install {}` failed", missing.join(" "));
    }
    Ok(())
}

/// Builds a Go module's binaries at a pinned version. `go install module@version` would
/// ask the module proxy for the module's version list (to check deprecation), which the
/// proxy refuses for some modules here; downloading the exact version and building it
/// with its own go.mod and go.sum gives the same binaries without that request.
fn go_tool(tool: &GoTool) -> Result<()> {
    if tool.installed() {
        println!(
            "setup: {} {} cached in {}",
            tool.name,
            tool.version,
            tool.dir().display()
        );
        return Ok(());
    }
    let go = Command::new("go").arg("version").output();
    if !go.as_ref().is_ok_and(|o| o.status.success()) {
        bail!(
            "setup: the Go toolchain (`go`) is needed to build {} {} and was not found",
            tool.name,
            tool.version
        );
    }
    let start = Instant::now();
    println!(
        "setup: building {} {} with {} (the first time takes minutes)",
        tool.name,
        tool.version,
        String::from_utf8_lossy(&go.unwrap().stdout).trim()
    );
    let bin_dir = tool.dir().join("bin");
    std::fs::create_dir_all(&bin_dir)?;
    let spec = format!("{}@{}", tool.module, tool.version);
    let out = Command::new("go")
        .args(["mod", "download", "-json", &spec])
        .current_dir(tools::tools_dir())
        .env("GOWORK", "off")
        .output()
        .context("cannot run `go mod download`")?;
    let info: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let Some(src) = info["Dir"].as_str().filter(|_| out.status.success()) else {
        bail!(
            "setup: cannot download {spec}: {}{}",
            info["Error"].as_str().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    };
    for (pkg, bin) in tool.binaries {
        let tmp = bin_dir.join(format!(".{bin}.partial"));
        let ldflags = tool
            .ldflags
            .replace("{v}", tool.version.trim_start_matches('v'));
        let status = Command::new("go")
            .args(["build", "-trimpath", "-ldflags", &ldflags, "-o"])
            .arg(&tmp)
            .arg(format!("./{pkg}"))
            .current_dir(src)
            .env("GOWORK", "off")
            .env("GOFLAGS", "-mod=readonly -buildvcs=false")
            .env("CGO_ENABLED", if tool.cgo { "1" } else { "0" })
            .status()
            .context("cannot run `go build`")?;
        if !status.success() {
            bail!("setup: `go build ./{pkg}` of {spec} failed ({status})");
        }
        std::fs::rename(&tmp, tool.bin(bin))?;
    }
    std::fs::write(tool.recipe_path(), tool.recipe())?;
    println!(
        "setup: built {} {} in {:.0?}",
        tool.name,
        tool.version,
        start.elapsed()
    );
    Ok(())
}

/// cargo-fuzz at its pinned version, and the nightly toolchain it needs.
fn cargo_fuzz() -> Result<()> {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output();
    if !nightly.as_ref().is_ok_and(|o| o.status.success()) {
        bail!(
            "setup: the fuzz targets need a nightly Rust toolchain (`rustup toolchain install nightly`)"
        );
    }
    let (name, version) = tools::CARGO_FUZZ;
    let root = tools::cargo_fuzz_root();
    if root.join("bin").join(name).is_file() {
        println!("setup: {name} {version} cached in {}", root.display());
        return Ok(());
    }
    let start = Instant::now();
    println!("setup: installing {name} {version}");
    let status = Command::new("cargo")
        .args([
            "install",
            "--locked",
            "--quiet",
            name,
            "--version",
            version,
            "--root",
        ])
        .arg(&root)
        .status()
        .context("cannot run `cargo install`")?;
    if !status.success() {
        bail!("setup: `cargo install {name} --version {version}` failed ({status})");
    }
    println!(
        "setup: installed {name} {version} in {:.0?}",
        start.elapsed()
    );
    Ok(())
}
