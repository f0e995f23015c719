// The build script of vpn-agent and userdata-gen (each `include!`s this file): stamps the
// commit the binary is built from into `VPN_BUILD_COMMIT`, for `--version` and headscale,
// and the release into `VPN_BUILD_VERSION` (the package's version unless that variable is
// set at build time: the upgrade test builds an agent with another version string).
// `cargo xtask dist` sets the variable itself; elsewhere git says, and outside a checkout
// it is "unknown". (Uncommitted changes are not marked here: cargo would not rerun this
// script for them; `cargo xtask dist` marks them.)
fn main() {
    println!("cargo:rerun-if-env-changed=VPN_BUILD_COMMIT");
    println!("cargo:rerun-if-env-changed=VPN_BUILD_VERSION");
    let version = std::env::var("VPN_BUILD_VERSION")
        .unwrap_or_else(|_| std::env::var("CARGO_PKG_VERSION").expect("cargo sets it"));
    println!("cargo:rustc-env=VPN_BUILD_VERSION={version}");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = std::env::var("VPN_BUILD_COMMIT").ok().unwrap_or_else(|| {
        if let Some(p) = git(&["rev-parse", "--git-path", "HEAD"]) {
            println!("cargo:rerun-if-changed={p}");
        }
        if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"])
            .and_then(|r| git(&["rev-parse", "--git-path", &r]))
        {
            println!("cargo:rerun-if-changed={r}");
        }
        git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
    });
    println!("cargo:rustc-env=VPN_BUILD_COMMIT={commit}");
}
