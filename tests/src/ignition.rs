//! Running the real Ignition on a config, into a root directory, the way the target image
//! would: flatcar Ignition v0.36.2 (spec 2.x) as metal-stack's os-installer runs it, and
//! Debian's coreos Ignition (spec 3.0-3.3) through its `ignition-apply` entry point.

use crate::cmd;
use crate::tools;
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::Command;

/// Debian's coreos Ignition binary; `ignition-apply` is the same binary under another name.
pub const DEBIAN_IGNITION: &str = "/usr/lib/dracut/modules.d/30ignition/ignition";
pub const DEBIAN_IGNITION_VALIDATE: &str = "/usr/bin/ignition-validate";

/// Applies a spec 2.x `config` into `root` with flatcar Ignition's files stage, exactly as
/// os-installer does (`-oem file`, `config.ign` in the working directory, a fresh config
/// cache). Returns Ignition's log.
pub fn apply_flatcar(config: &str, root: &Path, work: &Path) -> Result<String> {
    std::fs::create_dir_all(root)?;
    std::fs::create_dir_all(work)?;
    std::fs::write(work.join("config.ign"), config)?;
    let cache = work.join("ignition-cache.json");
    let _ = std::fs::remove_file(&cache);
    let out = cmd::quiet_output(
        Command::new(tools::flatcar_ignition_bin())
            .args(["-oem", "file", "-stage", "files", "-log-to-stdout", "-root"])
            .arg(root)
            .arg("-config-cache")
            .arg(&cache)
            .current_dir(work),
    )?;
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success()
        || log.contains("not a config")
        || log.contains("ignoring user-provided config")
    {
        bail!(
            "flatcar Ignition did not apply the config ({}):\n{log}",
            out.status
        );
    }
    Ok(log)
}

/// Applies a spec 3.0-3.3 `config` into `root` with Debian's `ignition-apply`.
pub fn apply_coreos(config: &str, root: &Path, work: &Path) -> Result<String> {
    std::fs::create_dir_all(root)?;
    std::fs::create_dir_all(work)?;
    let cfg = work.join("config.ign");
    std::fs::write(&cfg, config)?;
    let apply = work.join("ignition-apply");
    if !apply.exists() {
        std::os::unix::fs::symlink(DEBIAN_IGNITION, &apply)
            .with_context(|| format!("cannot link {}", apply.display()))?;
    }
    let out = cmd::quiet_output(
        Command::new(&apply)
            // It refuses to run outside a container unless told it is in one.
            .env("container", "1")
            .args(["--offline", "--root"])
            .arg(root)
            .arg(&cfg),
    )?;
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("ignition-apply failed ({}):\n{log}", out.status);
    }
    Ok(log)
}

/// `ignition-validate` (Debian, spec 3.0-3.3) on `config`: `Ok` when valid.
pub fn validate_coreos(config: &str, work: &Path) -> Result<()> {
    std::fs::create_dir_all(work)?;
    let cfg = work.join("validate.ign");
    std::fs::write(&cfg, config)?;
    cmd::run_quiet(Command::new(DEBIAN_IGNITION_VALIDATE).arg(&cfg)).map(drop)
}

/// `ignition-validate` of flatcar v0.36.2 (spec 2.x) on `config`: `Ok` when valid.
pub fn validate_flatcar(config: &str, work: &Path) -> Result<()> {
    std::fs::create_dir_all(work)?;
    let cfg = work.join("validate.ign");
    std::fs::write(&cfg, config)?;
    cmd::run_quiet(Command::new(tools::flatcar_ignition_validate_bin()).arg(&cfg)).map(drop)
}
