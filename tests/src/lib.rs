//! The virtual data center ("vdc"): hosts as network namespaces on one machine, joined by a
//! bridge on a TEST-NET underlay, running the real control server (headscale) and the real
//! operator client (tailscaled). Every end-to-end test, `cargo xtask lab` and
//! `cargo xtask demo` build on this crate.
//!
//! What it is not: a mock. Nothing here speaks a protocol itself; it starts the real
//! programs and reads their real output.
//!
//! Invariant: no packet leaves the machine. Namespaces have no link to the host's namespace
//! and no default route; `Lab::assert_isolated` proves it without sending anything.
//!
//! The lab is test infrastructure, so it reports errors with `anyhow` like a binary does.

pub mod bench;
pub mod cmd;
pub mod dist;
pub mod firewall;
pub mod flood;
pub mod headscale;
pub mod ignition;
pub mod lab;
pub mod load;
pub mod netns;
pub mod pki;
pub mod smoke;
pub mod story;
pub mod tailscale;
pub mod tools;

pub use lab::{LAN_ROUTER, Lab, LabOptions, lan_addr};

/// Why the end-to-end suite cannot run here, or `None` when it can.
///
/// The suite needs root (namespaces, TUN, nftables) and the pinned binaries that
/// `cargo xtask setup` builds.
pub fn lab_unavailable() -> Option<String> {
    if !is_root() {
        return Some("not running as root (network namespaces need it)".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    for (what, path) in tools::required_binaries() {
        if !path.exists() {
            return Some(format!(
                "{what} is not installed at {} (run `cargo xtask setup`)",
                path.display()
            ));
        }
    }
    None
}

/// Skips the calling test loudly when the lab cannot run here, and fails it instead when
/// `VDC_REQUIRE_LAB=1` (set by `cargo xtask test`, so CI never skips silently).
#[macro_export]
macro_rules! require_lab {
    () => {
        if let Some(why) = $crate::lab_unavailable() {
            if std::env::var_os("VDC_REQUIRE_LAB").is_some_and(|v| v == "1") {
                panic!("the lab is required (VDC_REQUIRE_LAB=1) but cannot run: {why}");
            }
            eprintln!("\n*** SKIPPED: the virtual data center cannot run here: {why} ***\n");
            return;
        }
    };
}

/// True when this process runs as root.
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}
