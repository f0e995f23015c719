//! The real peers the lab runs, pinned, and where `cargo xtask setup` puts them.
//!
//! One source of truth: xtask installs exactly these, and the lab looks them up here.

use std::path::{Path, PathBuf};

/// A Go program built from a published module at a pinned version.
#[derive(Debug, Clone, Copy)]
pub struct GoTool {
    pub name: &'static str,
    pub module: &'static str,
    pub version: &'static str,
    /// (package path inside the module, binary name)
    pub binaries: &'static [(&'static str, &'static str)],
    /// Linker flags the project's own release build sets (version stamps); `{v}` is the
    /// version without its leading `v`.
    pub ldflags: &'static str,
    /// Whether the build needs cgo (and so a C toolchain and headers).
    pub cgo: bool,
}

/// headscale: the version metal-api uses.
pub const HEADSCALE: GoTool = GoTool {
    name: "headscale",
    module: "github.com/juanfont/headscale",
    version: "v0.28.0",
    binaries: &[("cmd/headscale", "headscale")],
    ldflags: "",
    cgo: false,
};

/// tailscale and tailscaled: the version metal-stack's firewall images ship.
pub const TAILSCALE: GoTool = GoTool {
    name: "tailscale",
    module: "tailscale.com",
    version: "v1.102.2",
    binaries: &[
        ("cmd/tailscale", "tailscale"),
        ("cmd/tailscaled", "tailscaled"),
    ],
    ldflags: "-X tailscale.com/version.longStamp={v} -X tailscale.com/version.shortStamp={v}",
    cgo: false,
};

/// flatcar's Ignition: what metal-stack's images run at first boot (spec 2.x only).
pub const FLATCAR_IGNITION: GoTool = GoTool {
    name: "flatcar-ignition",
    module: "github.com/flatcar/ignition",
    version: "v0.36.2",
    binaries: &[("internal", "ignition"), ("validate", "ignition-validate")],
    ldflags: "-X github.com/flatcar/ignition/internal/version.Raw=v{v}",
    cgo: true,
};

/// A current coreos Ignition, for spec 3.4-3.6 that Debian's 2.14 does not read.
pub const COREOS_IGNITION: GoTool = GoTool {
    name: "coreos-ignition",
    module: "github.com/coreos/ignition/v2",
    version: "v2.26.0",
    binaries: &[("internal", "ignition"), ("validate", "ignition-validate")],
    ldflags: "-X github.com/coreos/ignition/v2/internal/version.Raw=v{v}",
    cgo: true,
};

pub const GO_TOOLS: &[GoTool] = &[HEADSCALE, TAILSCALE, FLATCAR_IGNITION, COREOS_IGNITION];

/// The headscale versions a lab can run ([`crate::LabOptions::headscale`], or
/// `$VDC_HEADSCALE` for a whole run); [`HEADSCALE`]'s is the default.
pub const HEADSCALE_VERSIONS: &[&str] = &["v0.27.1", "v0.28.0", "v0.29.2"];

/// headscale at `version`, built with the same recipe as the default.
pub fn headscale_at(version: &'static str) -> GoTool {
    GoTool {
        version,
        ..HEADSCALE
    }
}

/// The headscale version labs run unless their options say otherwise: `$VDC_HEADSCALE`,
/// else [`HEADSCALE`]'s.
pub fn headscale_version() -> &'static str {
    chosen("VDC_HEADSCALE", HEADSCALE_VERSIONS, HEADSCALE.version)
}

/// `version` as one of [`HEADSCALE_VERSIONS`].
pub fn supported_headscale(version: &str) -> Option<&'static str> {
    HEADSCALE_VERSIONS.iter().copied().find(|v| *v == version)
}

/// The tailscale versions the lab's stock clients can be (`$VDC_TAILSCALE` for a whole run);
/// [`TAILSCALE`]'s is the default. v1.74.0 is the oldest headscale v0.27 and v0.28 support,
/// v1.80.3 the oldest (newest patch) v0.29 supports.
pub const TAILSCALE_VERSIONS: &[&str] = &["v1.74.0", "v1.80.3", "v1.102.2", "v1.102.3"];

/// tailscale at `version`, built with the same recipe as the default.
pub fn tailscale_at(version: &'static str) -> GoTool {
    GoTool {
        version,
        ..TAILSCALE
    }
}

/// The tailscale version the lab's clients run: `$VDC_TAILSCALE`, else [`TAILSCALE`]'s.
pub fn tailscale_version() -> &'static str {
    chosen("VDC_TAILSCALE", TAILSCALE_VERSIONS, TAILSCALE.version)
}

/// `version` as one of [`TAILSCALE_VERSIONS`].
pub fn supported_tailscale(version: &str) -> Option<&'static str> {
    TAILSCALE_VERSIONS.iter().copied().find(|v| *v == version)
}

/// The version `$var` names, one of `supported`, or `default`. Panics on a version the lab
/// does not know: a run must not quietly test another one.
fn chosen(var: &str, supported: &'static [&'static str], default: &'static str) -> &'static str {
    match std::env::var(var) {
        Ok(v) => supported
            .iter()
            .copied()
            .find(|s| *s == v)
            .unwrap_or_else(|| panic!("{var}={v}: the lab runs one of {supported:?}")),
        Err(_) => default,
    }
}

/// Every Go tool `cargo xtask setup` builds: [`GO_TOOLS`] and the other headscale and
/// tailscale versions.
pub fn go_tools() -> Vec<GoTool> {
    let mut tools = GO_TOOLS.to_vec();
    fn others(
        all: &'static [&'static str],
        default: &'static str,
    ) -> impl Iterator<Item = &'static str> {
        all.iter().copied().filter(move |v| *v != default)
    }
    tools.extend(others(HEADSCALE_VERSIONS, HEADSCALE.version).map(headscale_at));
    tools.extend(others(TAILSCALE_VERSIONS, TAILSCALE.version).map(tailscale_at));
    tools
}

/// cargo-fuzz, installed with `cargo install` at a pinned version; it runs on the
/// machine's nightly toolchain.
pub const CARGO_FUZZ: (&str, &str) = ("cargo-fuzz", "0.13.2");

/// Where cargo-fuzz is installed (`bin/cargo-fuzz` below it).
pub fn cargo_fuzz_root() -> PathBuf {
    tools_dir().join(format!("{}-{}", CARGO_FUZZ.0, CARGO_FUZZ.1))
}

/// The fuzz targets `cargo xtask test` runs briefly: (crate directory, target name).
pub const FUZZ_TARGETS: &[(&str, &str)] = &[
    ("userdata-gen", "merge"),
    ("agent", "control_records"),
    ("agent", "map_message"),
    ("agent", "udp_packet"),
    ("agent", "derp_frames"),
    ("agent", "packet_filter"),
];

/// Debian packages the lab, the tests and the demo use.
pub const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "nftables",
    "openssh-server",
    "openssh-client",
    "iperf3",
    "ignition",
    "iputils-ping",
    "procps",
    // The scale benchmark writes nodes into headscale's database.
    "sqlite3",
    // cloud-init's own schema check and its YAML 1.1 parser judge generated cloud-config.
    "cloud-init",
    "python3-yaml",
    // flatcar Ignition links libblkid through cgo.
    "libblkid-dev",
    "pkg-config",
];

/// Debian packages only `cargo xtask bench dataplane --profile` needs (perf and strace of
/// the agent under load); installed when it runs.
pub const PROFILE_PACKAGES: &[&str] = &["linux-perf", "strace"];

/// Programs from those packages that the lab calls, with the package that provides each.
pub const APT_PROGRAMS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("ping", "iputils-ping"),
];

/// The repository root (the workspace).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the vdc crate lives one level below the workspace root")
        .to_path_buf()
}

/// Where built tools are cached: `$VDC_TOOLS_DIR`, else `<target>/tools`.
pub fn tools_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VDC_TOOLS_DIR") {
        return PathBuf::from(dir);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("tools")
}

impl GoTool {
    /// The versioned cache directory: a new pin builds into a new directory.
    pub fn dir(&self) -> PathBuf {
        tools_dir().join(format!("{}-{}", self.name, self.version))
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        self.dir().join("bin").join(name)
    }

    /// What the cached build was made from; a change of recipe means a rebuild.
    pub fn recipe(&self) -> String {
        format!(
            "{}@{} binaries={:?} ldflags={:?} cgo={}\n",
            self.module, self.version, self.binaries, self.ldflags, self.cgo
        )
    }

    pub fn recipe_path(&self) -> PathBuf {
        self.dir().join("recipe")
    }

    /// True when every binary of this tool is in the cache, built from this recipe.
    pub fn installed(&self) -> bool {
        self.binaries.iter().all(|(_, b)| self.bin(b).is_file())
            && std::fs::read_to_string(self.recipe_path()).is_ok_and(|r| r == self.recipe())
    }
}

/// The default headscale's binary (see [`headscale_version`]).
pub fn headscale_bin() -> PathBuf {
    headscale_at(headscale_version()).bin("headscale")
}

/// flatcar Ignition v0.36.2 (spec 2.x), as metal-stack's firewall images run it.
pub fn flatcar_ignition_bin() -> PathBuf {
    FLATCAR_IGNITION.bin("ignition")
}

pub fn flatcar_ignition_validate_bin() -> PathBuf {
    FLATCAR_IGNITION.bin("ignition-validate")
}

/// A binary of this workspace, as `cargo build --workspace --bins` leaves it (`cargo xtask
/// test` builds them before the end-to-end suite). `$VDC_BIN_DIR` overrides the directory.
pub fn project_bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("VDC_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("debug").join(name)
}

/// The version string of the agent [`next_agent_bin`] returns: this release with `-next`.
pub const NEXT_AGENT_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "-next");

/// A `vpn-agent` built from this source with another version string, for the upgrade test:
/// `$VDC_NEXT_AGENT` (`cargo xtask test` builds it there), else built now into a target
/// directory of its own (slow the first time: every dependency once more).
pub fn next_agent_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("VDC_NEXT_AGENT") {
        return Ok(PathBuf::from(p));
    }
    let target = workspace_root().join("target/vdc-next");
    crate::cmd::run_quiet(
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "build",
                "-p",
                "vpn-agent",
                "--bin",
                "vpn-agent",
                "--target-dir",
            ])
            .arg(&target)
            .env("VPN_BUILD_VERSION", NEXT_AGENT_VERSION)
            .current_dir(workspace_root()),
    )?;
    Ok(target.join("debug/vpn-agent"))
}

/// The workspace's own binaries that the end-to-end suite runs.
pub const PROJECT_BINARIES: &[&str] = &["userdata-gen", "vpn-agent", "vdc-load"];

/// Every binary the lab needs, with a name for error messages.
pub fn required_binaries() -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = go_tools()
        .into_iter()
        .flat_map(|t| {
            t.binaries
                .iter()
                .map(move |(_, b)| (format!("{b} {}", t.version), t.bin(b)))
        })
        .collect();
    for b in PROJECT_BINARIES {
        out.push((
            format!("{b} (run `cargo build --workspace --bins`)"),
            project_bin(b),
        ));
    }
    for (prog, pkg) in APT_PROGRAMS {
        let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(prog))
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from(format!("/usr/sbin/{prog}")));
        out.push((format!("`{prog}` (Debian package {pkg})"), found));
    }
    out
}
