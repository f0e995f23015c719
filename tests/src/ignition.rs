//! Running the real Ignition on a config, into a root directory, the way the target image
//! would: flatcar Ignition v0.36.2 (spec 2.x) as metal-stack's os-installer runs it, and
//! coreos Ignition (spec 3.x) through its `ignition-apply` entry point: Debian's 2.14 for
//! 3.0-3.3, a pinned current release for 3.4 and later.

use crate::cmd;
use crate::netns::Netns;
use crate::tools;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A coreos Ignition: the binary (`ignition-apply` is the same binary under another name)
/// and its validator.
#[derive(Debug, Clone)]
pub struct Coreos {
    pub ignition: PathBuf,
    pub validate: PathBuf,
}

impl Coreos {
    /// Debian bookworm's Ignition 2.14 (spec 3.0-3.3).
    pub fn debian() -> Coreos {
        Coreos {
            ignition: "/usr/lib/dracut/modules.d/30ignition/ignition".into(),
            validate: "/usr/bin/ignition-validate".into(),
        }
    }

    /// The pinned current release that `cargo xtask setup` builds (spec 3.0-3.6).
    pub fn current() -> Coreos {
        Coreos {
            ignition: tools::COREOS_IGNITION.bin("ignition"),
            validate: tools::COREOS_IGNITION.bin("ignition-validate"),
        }
    }

    /// The one that reads spec `3.minor`.
    pub fn for_spec_3(minor: u8) -> Coreos {
        if minor <= 3 {
            Self::debian()
        } else {
            Self::current()
        }
    }
}

/// Applies a spec 2.x `config` into `root` with flatcar Ignition's files stage, exactly as
/// os-installer does (`-oem file`, `config.ign` in the working directory, a fresh config
/// cache). Returns Ignition's log.
pub fn apply_flatcar(config: &str, root: &Path, work: &Path) -> Result<String> {
    apply_flatcar_in(None, config, root, work)
}

/// `program`, inside `ns` when given (for configs that fetch from a lab host).
fn command(ns: Option<&Netns>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match ns {
        Some(ns) => ns.command(program),
        None => Command::new(program),
    }
}

/// Like [`apply_flatcar`], run inside `ns` when given, where the config's remote sources
/// are fetched from.
pub fn apply_flatcar_in(
    ns: Option<&Netns>,
    config: &str,
    root: &Path,
    work: &Path,
) -> Result<String> {
    std::fs::create_dir_all(root)?;
    std::fs::create_dir_all(work)?;
    std::fs::write(work.join("config.ign"), config)?;
    let cache = work.join("ignition-cache.json");
    let _ = std::fs::remove_file(&cache);
    let out = cmd::quiet_output(
        command(ns, tools::flatcar_ignition_bin())
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

/// Applies a spec 3.x `config` into `root` with `ignition-apply` of `ignition`, offline.
pub fn apply_coreos(ignition: &Coreos, config: &str, root: &Path, work: &Path) -> Result<String> {
    apply_coreos_in(None, ignition, config, root, work)
}

/// Like [`apply_coreos`]; with `ns`, online inside it, where remote sources are fetched from.
pub fn apply_coreos_in(
    ns: Option<&Netns>,
    ignition: &Coreos,
    config: &str,
    root: &Path,
    work: &Path,
) -> Result<String> {
    std::fs::create_dir_all(root)?;
    std::fs::create_dir_all(work)?;
    let cfg = work.join("config.ign");
    let config = match ns {
        Some(_) => as_merged_child(config)?,
        None => config.to_string(),
    };
    std::fs::write(&cfg, config)?;
    let apply = work.join("ignition-apply");
    let _ = std::fs::remove_file(&apply);
    std::os::unix::fs::symlink(&ignition.ignition, &apply)
        .with_context(|| format!("cannot link {}", apply.display()))?;
    let mut c = command(ns, &apply);
    // It refuses to run outside a container unless told it is in one.
    c.env("container", "1");
    if ns.is_none() {
        c.arg("--offline");
    }
    let out = cmd::quiet_output(c.arg("--root").arg(root).arg(&cfg))?;
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "ignition-apply ({}) failed ({}):\n{log}",
            ignition.ignition.display(),
            out.status
        );
    }
    Ok(log)
}

/// `config` as the one `merge` child of an empty config of its version. On a real boot
/// Ignition trusts the CAs in `ignition.security.tls` of the config it fetched before it
/// fetches anything else; `ignition-apply` (v2.14 to v2.26) only reads them from child
/// configs (`exec.ConfigFetcher.RenderConfig`), so a remote file behind a private CA needs
/// this wrapper to be fetched as the boot would.
fn as_merged_child(config: &str) -> Result<String> {
    use base64::Engine;
    let doc: serde_json::Value = serde_json::from_str(config)?;
    let version = doc["ignition"]["version"].clone();
    let data = base64::engine::general_purpose::STANDARD.encode(config);
    Ok(serde_json::json!({
        "ignition": {
            "version": version,
            "config": { "merge": [{ "source": format!("data:;base64,{data}") }] },
        }
    })
    .to_string())
}

/// `ignition-validate` of `ignition` on a spec 3.x `config`: `Ok` when valid.
pub fn validate_coreos(ignition: &Coreos, config: &str, work: &Path) -> Result<()> {
    std::fs::create_dir_all(work)?;
    let cfg = work.join("validate.ign");
    std::fs::write(&cfg, config)?;
    cmd::run_quiet(Command::new(&ignition.validate).arg(&cfg)).map(drop)
}

/// `ignition-validate` of flatcar v0.36.2 (spec 2.x) on `config`: `Ok` when valid.
pub fn validate_flatcar(config: &str, work: &Path) -> Result<()> {
    std::fs::create_dir_all(work)?;
    let cfg = work.join("validate.ign");
    std::fs::write(&cfg, config)?;
    cmd::run_quiet(Command::new(tools::flatcar_ignition_validate_bin()).arg(&cfg)).map(drop)
}
