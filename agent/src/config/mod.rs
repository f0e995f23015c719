//! The agent's configuration: tailscale's `--config` file (`alpha0`) for the mesh, and our
//! own settings file (the format `userdata-gen` writes).

use crate::error::{Error, Result};
use std::net::IpAddr;
use std::path::Path;
use vpn_contract::Protocol;
pub use vpn_contract::{AgentSettings, AuthKey, MeshConfig};

#[derive(Debug, Clone)]
pub struct Config {
    pub server_url: String,
    pub auth_key: Option<AuthKey>,
    pub hostname: String,
    pub enabled: bool,
    /// tailscaled's `AcceptRoutes` (`--accept-routes`): use the subnet routes other nodes
    /// serve. Off unless the config says so: a firewall should not start routing into
    /// networks because some node in the tailnet offers them.
    pub accept_routes: bool,
    /// tailscaled's `AdvertiseRoutes`: the subnets we route into from the mesh, once
    /// headscale approves them.
    pub advertise_routes: Vec<(IpAddr, u8)>,
    pub settings: AgentSettings,
    /// A map stream that brought nothing but keep-alives this long, or that is
    /// [`MAP_MAX_AGE_FACTOR`] times as old, is replaced by a new one (`vpn-agent run
    /// --map-refresh-after`): headscale up to v0.28 stops updating a stream it could not hand
    /// an update to within 50 ms, and keeps it alive; and it loses an update now and then
    /// when changes come in concurrently, which a busy stream never shows. Stretched when
    /// headscale is slow to answer: a renewal costs it a full map.
    pub map_refresh_after: std::time::Duration,
    /// No map message (keep-alives included) for this long means a dead stream (`vpn-agent
    /// run --map-watchdog`); a new stream's full map gets as long at first, and twice as long
    /// after each stream that brought none ([`FIRST_MAP_WAIT_FACTOR`]).
    pub map_watchdog: std::time::Duration,
}

/// The default of [`Config::map_refresh_after`]: how long a firewall may miss a new operator
/// or keep a removed one when headscale drops its stream under load (the scale benchmark saw
/// it at 1 000 nodes). A refresh costs headscale one full map and tells every peer we are
/// online, which in turn resets their clocks: a quiet tailnet sees about one refresh per
/// period, whatever its size. headscale sends a keep-alive every 50 to 59 s.
pub const MAP_REFRESH_AFTER: std::time::Duration = std::time::Duration::from_secs(120);

/// The default of [`Config::map_watchdog`]: tailscaled's. headscale sends a keep-alive every
/// 50 to 59 s, and a dead server is noticed sooner by the session's HTTP/2 PINGs.
pub const MAP_WATCHDOG: std::time::Duration = std::time::Duration::from_secs(120);

/// A new stream's full map may take up to this many times [`Config::map_watchdog`]: the wait
/// doubles after each stream that brought none within it. headscale v0.28 on two busy cores
/// needs about that long for a map of 5 000 nodes; asked again after each timeout, it starts
/// over each time, and the node would never get one.
pub const FIRST_MAP_WAIT_FACTOR: u32 = 4;

/// A map stream, however busy, is replaced once its full map is this many times
/// [`Config::map_refresh_after`] old. headscale v0.28 keeps a node's pending changes in a map
/// that concurrent registrations and its batch ticker update without a lock, and so drops
/// one now and then (fixed upstream in 57070680, v0.29); the stream goes on with the next
/// change and nothing says one is missing. A full map every ten minutes (by default) bounds
/// how long a firewall may miss a new operator that way, at a fifth of a quiet stream's cost.
pub const MAP_MAX_AGE_FACTOR: u32 = 5;

/// Parses a tailscale `alpha0` config file's text (see [`MeshConfig::parse`]); the error
/// names the file.
pub fn parse_mesh(text: &str, path: &Path) -> Result<MeshConfig> {
    MeshConfig::parse(text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

/// Reads the agent's own settings file, and refuses settings that would leave a port open
/// or make the firewall rules match more than the tunnel: nothing is loaded from them.
pub fn load_settings(path: &Path) -> Result<AgentSettings> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let s: AgentSettings = serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    check_settings(&s).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    Ok(s)
}

/// Whether `name` names exactly one interface in nftables: 1 to 15 characters, none of
/// which nft reads as a wildcard (`*`) or escape, no spaces or slashes.
pub fn valid_interface(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The settings' own rules; the message names the field.
pub fn check_settings(s: &AgentSettings) -> std::result::Result<(), String> {
    if s.version != 1 {
        return Err(format!(
            "version {} is not supported (expected 1)",
            s.version
        ));
    }
    if !valid_interface(&s.interface) {
        return Err(format!(
            "interface {:?} is not one interface name (1-15 letters, digits, '-', '_', '.'; \
             a wildcard would let SSH in on other interfaces)",
            s.interface
        ));
    }
    if let Some(d) = &s.bind_device
        && !valid_interface(d)
    {
        return Err(format!("bind_device {d:?} is not one interface name"));
    }
    if s.ssh_port == 0 || !s.closed_tcp_ports.contains(&s.ssh_port) {
        return Err(format!(
            "ssh_port {} is not among closed_tcp_ports {:?}: SSH would stay open on every \
             interface",
            s.ssh_port, s.closed_tcp_ports
        ));
    }
    if s.closed_tcp_ports.contains(&0) || s.listen_port == 0 {
        return Err("port 0 in closed_tcp_ports or listen_port".into());
    }
    for svc in &s.services {
        if svc.name.is_empty() || svc.port == 0 {
            return Err(format!("service {svc:?} needs a name and a port"));
        }
        if svc.protocol == Protocol::Udp && svc.port == s.listen_port {
            return Err(format!(
                "service {:?} is udp/{}, the agent's own listen_port: closing it would cut \
                 the mesh",
                svc.name, svc.port
            ));
        }
    }
    Ok(())
}

impl Config {
    /// Reads both files; any problem names the file and the field.
    pub fn load(mesh: &Path, settings: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(mesh).map_err(|e| Error::io(mesh, e))?;
        let m = parse_mesh(&text, mesh)?;
        let settings = load_settings(settings)?;
        let hostname = match m.hostname {
            Some(h) => h,
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "vpn-agent".into()),
        };
        Ok(Config {
            server_url: m.server_url,
            auth_key: m.auth_key,
            hostname,
            enabled: m.enabled,
            accept_routes: m.accept_routes,
            advertise_routes: m.advertise_routes,
            settings,
            map_refresh_after: MAP_REFRESH_AFTER,
            map_watchdog: MAP_WATCHDOG,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_userdata_gen_writes() {
        let text = MeshConfig::for_node("https://hs.example:443", "m1", &[]);
        let m = parse_mesh(&text, Path::new("t.conf")).unwrap();
        assert_eq!(m.server_url, "https://hs.example:443");
        assert_eq!(
            m.auth_key,
            Some(AuthKey::File("/etc/vpn-agent/authkey".into()))
        );
        assert_eq!(m.hostname.as_deref(), Some("m1"));
        assert!(m.enabled);
        assert!(!m.accept_routes, "routes are accepted only when asked for");
    }

    #[test]
    fn settings_that_would_leave_ssh_open_are_refused() {
        assert_eq!(check_settings(&AgentSettings::default()), Ok(()));
        for (change, want) in [
            (
                (|s: &mut AgentSettings| s.ssh_port = 2222) as fn(&mut AgentSettings),
                "ssh_port 2222 is not among closed_tcp_ports",
            ),
            (
                |s| s.closed_tcp_ports = vec![],
                "not among closed_tcp_ports",
            ),
            (
                |s| s.interface = "tailscale*".into(),
                "not one interface name",
            ),
            (|s| s.interface = String::new(), "not one interface name"),
            (
                |s| s.interface = "tailscale0 ".into(),
                "not one interface name",
            ),
            (
                |s| s.interface = "a-very-long-name0".into(),
                "not one interface name",
            ),
            (|s| s.closed_tcp_ports.push(0), "port 0"),
            (|s| s.version = 2, "version 2"),
        ] {
            let mut s = AgentSettings::default();
            change(&mut s);
            let e = check_settings(&s).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn accept_routes_as_tailscale_spells_it() {
        let base = r#""Version":"alpha0","ServerURL":"https://h""#;
        for (extra, want) in [
            ("", false),
            (r#","AcceptRoutes":true"#, true),
            (r#","acceptRoutes":"true""#, true),
            (r#","AcceptRoutes":false"#, false),
            (r#","ExitNode":"""#, false),
        ] {
            let m = parse_mesh(&format!("{{{base}{extra}}}"), Path::new("t")).unwrap();
            assert_eq!(m.accept_routes, want, "{extra}");
        }
        let e = parse_mesh(
            &format!(r#"{{{base},"ExitNode":"100.64.0.9"}}"#),
            Path::new("/etc/x.conf"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("ExitNode") && e.contains("/etc/x.conf"), "{e}");
    }

    #[test]
    fn advertised_routes_as_tailscale_writes_them() {
        let m = parse_mesh(
            r#"{"Version":"alpha0","ServerURL":"https://h","AdvertiseRoutes":["198.51.100.0/24","2001:db8::/32","198.51.100.0/24"]}"#,
            Path::new("t"),
        )
        .unwrap();
        assert_eq!(
            m.advertise_routes,
            vec![
                ("198.51.100.0".parse().unwrap(), 24),
                ("2001:db8::".parse().unwrap(), 32)
            ]
        );
    }

    #[test]
    fn a_mesh_only_service_may_not_close_the_mesh_port() {
        let mut s = AgentSettings::default();
        s.services
            .push("bmc-reverse-proxy:tcp/3333".parse().unwrap());
        assert_eq!(check_settings(&s), Ok(()));
        s.services.push("wg:udp/41641".parse().unwrap());
        assert!(check_settings(&s).unwrap_err().contains("listen_port"));
    }

    #[test]
    fn errors_name_the_field() {
        for (text, want) in [
            ("{", "not valid JSON"),
            (r#"{"Version":"beta"}"#, "Version"),
            (r#"{"Version":"alpha0"}"#, "ServerURL is missing"),
            (
                r#"{"Version":"alpha0","ServerURL":"hs:443"}"#,
                "must start with https://",
            ),
            (
                r#"{"Version":"alpha0","ServerURL":"https://h","Enabled":3}"#,
                "Enabled",
            ),
            (
                r#"{"Version":"alpha0","ServerURL":"https://h","Hostname":1}"#,
                "Hostname must be a string",
            ),
            (
                r#"{"Version":"alpha0","ServerURL":"https://h","AcceptRoutes":"yes"}"#,
                "AcceptRoutes must be true or false",
            ),
            (
                r#"{"Version":"alpha0","ServerURL":"https://h","AdvertiseRoutes":"10.0.0.0/8"}"#,
                "AdvertiseRoutes: must be a list",
            ),
            (
                r#"{"Version":"alpha0","ServerURL":"https://h","AdvertiseRoutes":["0.0.0.0/0"]}"#,
                "exit route",
            ),
            (
                r#"{"Version":"alpha0","ServerURL":"https://h","AdvertiseRoutes":["100.64.0.0/24"]}"#,
                "overlaps the mesh",
            ),
        ] {
            let e = parse_mesh(text, Path::new("/etc/x.conf"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want) && e.contains("/etc/x.conf"), "{text}: {e}");
        }
    }
}
