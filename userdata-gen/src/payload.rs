//! What we add to the firewall: the agent's configuration files and our systemd units.

use serde::{Deserialize, Serialize};

/// The directory holding the agent's configuration on the firewall.
pub const CONFIG_DIR: &str = "/etc/vpn-agent";
/// The mesh settings in tailscaled's own `--config` format (`alpha0`).
pub const MESH_CONFIG_PATH: &str = "/etc/vpn-agent/tailscaled.conf";
/// The pre-auth key, referenced from the mesh settings as `file:`; scrubbed once used.
pub const AUTH_KEY_PATH: &str = "/etc/vpn-agent/authkey";
/// The agent's own settings (interface, SSH port, ports to close).
pub const AGENT_SETTINGS_PATH: &str = "/etc/vpn-agent/agent.json";
/// The CA that signed headscale's certificate, when it is not a public one.
pub const CA_PATH: &str = "/etc/vpn-agent/ca.pem";
/// Where systemd units go.
pub const UNIT_DIR: &str = "/etc/systemd/system";

/// Our units, from `systemd/` at the repository root: one source for the repo and the userdata.
pub const UNITS: &[(&str, &str)] = &[
    (
        "vpn-agent-firewall.service",
        include_str!("../../systemd/vpn-agent-firewall.service"),
    ),
    (
        "tailscaled.service",
        include_str!("../../systemd/tailscaled.service"),
    ),
];

/// Drop-ins for units that are not ours, as files under [`UNIT_DIR`] (not as Ignition unit
/// entries: the user's config may list these units itself, and two entries for one unit
/// conflict). nftables.service puts our table back after every (re)load of its ruleset;
/// sshd waits for our table and does not start without it.
pub const FOREIGN_DROPINS: &[(&str, &str)] = &[
    (
        "nftables.service.d/50-vpn-agent.conf",
        include_str!("../../systemd/nftables.service.d/50-vpn-agent.conf"),
    ),
    (
        "ssh.service.d/50-vpn-agent.conf",
        include_str!("../../systemd/ssh.service.d/50-vpn-agent.conf"),
    ),
    (
        "sshd.service.d/50-vpn-agent.conf",
        include_str!("../../systemd/ssh.service.d/50-vpn-agent.conf"),
    ),
];

/// The unit that loads our table early at boot.
pub const FIREWALL_UNIT: &str = "vpn-agent-firewall.service";

/// Whether `name` is a usable VRF device name (an interface name: 1-15 safe characters).
pub fn valid_vrf(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A secret string (pre-auth key, API key). It never prints itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself, for the one place that must send or write it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The agent-only settings, written to [`AGENT_SETTINGS_PATH`] as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// Format version of this file.
    pub version: u32,
    /// The tunnel interface; `tailscale0` so rules written for tailscale keep matching.
    pub interface: String,
    /// The SSH port accepted on the tunnel interface.
    pub ssh_port: u16,
    /// TCP ports closed on every interface but the tunnel.
    pub closed_tcp_ports: Vec<u16>,
    /// The UDP port for WireGuard and disco.
    pub listen_port: u16,
    /// The tags minted into the pre-auth key, for the operator's information; the agent
    /// does not request them again (headscale applies the key's tags).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advertise_tags: Vec<String>,
    /// A CA file to trust for headscale, besides the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// The device the agent's own sockets are bound to (`SO_BINDTODEVICE`): the VRF whose
    /// table holds the routes to headscale and the peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind_device: Option<String>,
    /// Services besides SSH reachable only over the mesh: accepted on the tunnel interface,
    /// dropped on every other (on a management server, bmc-reverse-proxy's port).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Service>,
}

/// A port reachable only over the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// For people and logs: `bmc-reverse-proxy`.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl std::str::FromStr for Service {
    type Err = String;

    /// `NAME:PROTO/PORT`, e.g. `bmc-reverse-proxy:tcp/3333`.
    fn from_str(text: &str) -> Result<Service, String> {
        let bad = || format!("{text:?} is not NAME:tcp/PORT or NAME:udp/PORT");
        let (name, rest) = text.rsplit_once(':').ok_or_else(bad)?;
        let (proto, port) = rest.split_once('/').ok_or_else(bad)?;
        let protocol = match proto {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => return Err(bad()),
        };
        let port = port.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
        if name.is_empty() {
            return Err(bad());
        }
        Ok(Service {
            name: name.into(),
            protocol,
            port,
        })
    }
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            version: 1,
            interface: "tailscale0".into(),
            ssh_port: 22,
            closed_tcp_ports: vec![22],
            listen_port: 41641,
            advertise_tags: vec![],
            ca_file: None,
            bind_device: None,
            services: vec![],
        }
    }
}

/// The mesh's own ranges (headscale's default prefixes, tailscale's CGNAT and ULA ranges).
const MESH_RANGES: &[(std::net::IpAddr, u8)] = &[
    (
        std::net::IpAddr::V4(std::net::Ipv4Addr::new(100, 64, 0, 0)),
        10,
    ),
    (
        std::net::IpAddr::V6(std::net::Ipv6Addr::new(
            0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0,
        )),
        48,
    ),
];

/// Whether two prefixes share an address (one contains the other).
fn overlap((a, a_len): (std::net::IpAddr, u8), (b, b_len): (std::net::IpAddr, u8)) -> bool {
    use std::net::IpAddr::{V4, V6};
    let len = a_len.min(b_len) as u32;
    match (a, b) {
        (V4(a), V4(b)) => len == 0 || u32::from(a) >> (32 - len) == u32::from(b) >> (32 - len),
        (V6(a), V6(b)) => len == 0 || u128::from(a) >> (128 - len) == u128::from(b) >> (128 - len),
        _ => false,
    }
}

/// A subnet route as `AdvertiseRoutes` may list it: an `ip/len` network (no host bits),
/// neither an exit route (`/0`: the agent is no exit node) nor one overlapping the mesh's own
/// ranges (the mesh addresses are routed by the mesh already). The message says which.
pub fn subnet_route(text: &str) -> Result<(std::net::IpAddr, u8), String> {
    let bad = |why: &str| format!("route {text:?} {why}");
    let (ip, len) = text.split_once('/').ok_or_else(|| bad("is not ip/len"))?;
    let ip: std::net::IpAddr = ip.parse().map_err(|_| bad("is not ip/len"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= max)
        .ok_or_else(|| bad("has no valid prefix length"))?;
    if len == 0 {
        return Err(bad("is an exit route; vpn-agent is no exit node"));
    }
    let host_bits = len < max
        && match ip {
            std::net::IpAddr::V4(a) => u32::from(a) & (u32::MAX >> len) != 0,
            std::net::IpAddr::V6(a) => u128::from(a) & (u128::MAX >> len) != 0,
        };
    if host_bits {
        return Err(bad("has host bits set"));
    }
    if MESH_RANGES.iter().any(|m| overlap(*m, (ip, len))) {
        return Err(bad("overlaps the mesh's own addresses"));
    }
    Ok((ip, len))
}

/// Everything that decides what goes onto the firewall, besides the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshSettings {
    /// headscale's URL as clients log in to it.
    pub login_server: String,
    /// The node's hostname in the mesh: the machine id.
    pub hostname: String,
    /// PEM of a CA to trust for headscale, if not a public one.
    pub ca_pem: Option<String>,
    /// The VRF the agent runs in (metal-stack firewalls reach the internet through one).
    pub vrf: Option<String>,
    /// Subnets the node routes into from the mesh (tailscaled's `AdvertiseRoutes`), once
    /// headscale approves them: a management server's management network.
    pub advertise_routes: Vec<String>,
    pub agent: AgentSettings,
}

/// One file we add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadFile {
    pub path: String,
    pub mode: u32,
    pub contents: Vec<u8>,
}

/// One unit we add, enabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadUnit {
    pub name: String,
    pub contents: String,
}

/// The files and units we add, in the order they are added.
#[derive(Clone, PartialEq, Eq)]
pub struct Payload {
    pub files: Vec<PayloadFile>,
    pub units: Vec<PayloadUnit>,
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // File contents include the key: list paths only.
        f.debug_struct("Payload")
            .field("files", &self.file_paths())
            .field("units", &self.unit_names())
            .finish()
    }
}

impl Payload {
    /// Builds our files and units for `settings`, with `auth_key` in its own 0600 file.
    pub fn new(settings: &MeshSettings, auth_key: &Secret) -> Payload {
        let mut agent = settings.agent.clone();
        if let Some(vrf) = &settings.vrf {
            agent.bind_device = Some(vrf.clone());
        }
        let mut files = vec![];
        if let Some(ca) = &settings.ca_pem {
            agent.ca_file = Some(CA_PATH.into());
            files.push(PayloadFile {
                path: CA_PATH.into(),
                mode: 0o644,
                contents: ca.as_bytes().to_vec(),
            });
        }
        files.push(PayloadFile {
            path: MESH_CONFIG_PATH.into(),
            mode: 0o600,
            contents: mesh_config(settings).into_bytes(),
        });
        files.push(PayloadFile {
            path: AUTH_KEY_PATH.into(),
            mode: 0o600,
            contents: auth_key.expose().as_bytes().to_vec(),
        });
        files.push(PayloadFile {
            path: AGENT_SETTINGS_PATH.into(),
            mode: 0o644,
            contents: (serde_json::to_string_pretty(&agent).expect("settings serialize") + "\n")
                .into_bytes(),
        });
        files.extend(FOREIGN_DROPINS.iter().map(|(path, contents)| PayloadFile {
            path: format!("{UNIT_DIR}/{path}"),
            mode: 0o644,
            contents: contents.as_bytes().to_vec(),
        }));
        let units = UNITS
            .iter()
            .map(|(name, contents)| PayloadUnit {
                name: name.to_string(),
                contents: contents.to_string(),
            })
            .collect();
        Payload { files, units }
    }

    pub fn file_paths(&self) -> Vec<String> {
        self.files.iter().map(|f| f.path.clone()).collect()
    }

    pub fn unit_names(&self) -> Vec<String> {
        self.units.iter().map(|u| u.name.clone()).collect()
    }

    /// Every path on the firewall that our additions own: our files, our unit files and
    /// their drop-in directories.
    pub fn owned_paths(&self) -> Vec<String> {
        let mut out = self.file_paths();
        for u in &self.units {
            out.push(format!("{UNIT_DIR}/{}", u.name));
            out.push(format!("{UNIT_DIR}/{}.d", u.name));
        }
        out
    }
}

/// The mesh settings in tailscaled's `--config` format, so a stock tailscaled could run
/// from the same file. `alpha0` has no field for tags: they are on the pre-auth key and in
/// the agent's settings.
pub fn mesh_config(settings: &MeshSettings) -> String {
    let mut v = serde_json::json!({
        "Version": "alpha0",
        "ServerURL": settings.login_server,
        "AuthKey": format!("file:{AUTH_KEY_PATH}"),
        "Hostname": settings.hostname,
        "Enabled": true,
    });
    if !settings.advertise_routes.is_empty() {
        v["AdvertiseRoutes"] = serde_json::json!(settings.advertise_routes);
    }
    serde_json::to_string_pretty(&v).expect("config serializes") + "\n"
}

/// The payload the unit tests merge: defaults, a dummy key.
#[cfg(test)]
pub(crate) fn test_payload() -> Payload {
    Payload::new(
        &MeshSettings {
            login_server: "https://hs.test".into(),
            hostname: "m1".into(),
            ca_pem: None,
            vrf: None,
            advertise_routes: vec![],
            agent: AgentSettings::default(),
        },
        &Secret::new("hskey-auth-x"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> MeshSettings {
        MeshSettings {
            login_server: "https://hs.example:443".into(),
            hostname: "machine-1".into(),
            ca_pem: None,
            vrf: None,
            advertise_routes: vec![],
            agent: AgentSettings::default(),
        }
    }

    #[test]
    fn subnet_routes_are_networks_outside_the_mesh() {
        assert!(subnet_route("198.51.100.0/24").is_ok());
        assert!(subnet_route("2001:db8::/32").is_ok());
        assert!(subnet_route("198.51.100.7/32").is_ok());
        for (text, why) in [
            ("198.51.100.0", "not ip/len"),
            ("198.51.100.0/33", "prefix length"),
            ("0.0.0.0/0", "exit route"),
            ("::/0", "exit route"),
            ("198.51.100.1/24", "host bits"),
            ("100.64.0.0/10", "mesh"),
            ("100.0.0.0/8", "mesh"),
            ("100.100.1.0/24", "mesh"),
            ("fd7a:115c:a1e0::/64", "mesh"),
        ] {
            let e = subnet_route(text).unwrap_err();
            assert!(e.contains(why) && e.contains(text), "{text}: {e}");
        }
    }

    #[test]
    fn services_parse_from_the_command_line_form() {
        let s: Service = "bmc-reverse-proxy:tcp/3333".parse().unwrap();
        assert_eq!(
            (s.name.as_str(), s.protocol, s.port),
            ("bmc-reverse-proxy", Protocol::Tcp, 3333)
        );
        for bad in ["x:tcp/0", "x:icmp/1", ":tcp/1", "x/1", "x:tcp/70000"] {
            assert!(bad.parse::<Service>().is_err(), "{bad}");
        }
    }

    /// The bytes of the agent's own settings file in `p`.
    fn agent_json(p: &Payload) -> &[u8] {
        &p.files
            .iter()
            .find(|f| f.path == AGENT_SETTINGS_PATH)
            .expect("the payload has agent.json")
            .contents
    }

    #[test]
    fn the_key_is_only_in_its_own_file() {
        let p = Payload::new(&settings(), &Secret::new("hskey-auth-SECRET"));
        let holders: Vec<_> = p
            .files
            .iter()
            .filter(|f| String::from_utf8_lossy(&f.contents).contains("SECRET"))
            .map(|f| (f.path.as_str(), f.mode))
            .collect();
        assert_eq!(holders, vec![(AUTH_KEY_PATH, 0o600)]);
        assert!(!format!("{p:?}").contains("SECRET"));
        assert!(!format!("{:?}", Secret::new("SECRET")).contains("SECRET"));
    }

    #[test]
    fn mesh_config_is_tailscale_alpha0() {
        let v: serde_json::Value = serde_json::from_str(&mesh_config(&settings())).unwrap();
        assert_eq!(v["Version"], "alpha0");
        assert_eq!(v["AuthKey"], "file:/etc/vpn-agent/authkey");
        assert_eq!(v["Hostname"], "machine-1");
        assert_eq!(v["ServerURL"], "https://hs.example:443");
    }

    #[test]
    fn a_ca_is_shipped_and_referenced() {
        let mut s = settings();
        s.ca_pem = Some("-----BEGIN CERTIFICATE-----\n".into());
        let p = Payload::new(&s, &Secret::new("k"));
        assert!(p.file_paths().contains(&CA_PATH.to_string()));
        let a: AgentSettings = serde_json::from_slice(agent_json(&p)).unwrap();
        assert_eq!(a.ca_file.as_deref(), Some(CA_PATH));
    }

    #[test]
    fn a_vrf_binds_the_agents_sockets_to_it() {
        let mut s = settings();
        s.vrf = Some("vrf104009".into());
        let p = Payload::new(&s, &Secret::new("k"));
        let agent: AgentSettings = serde_json::from_slice(agent_json(&p)).unwrap();
        assert_eq!(agent.bind_device.as_deref(), Some("vrf104009"));
        // No `ip vrf exec`: the unit runs the agent as it is, with no drop-in of ours.
        assert!(
            !p.file_paths()
                .iter()
                .any(|f| f.contains("tailscaled.service.d"))
        );
        let plain = Payload::new(&settings(), &Secret::new("k"));
        assert!(!String::from_utf8_lossy(agent_json(&plain)).contains("bind_device"));
        assert!(valid_vrf("vrf104009") && !valid_vrf("vrf;rm") && !valid_vrf(""));
    }

    #[test]
    fn units_come_from_the_systemd_directory() {
        let p = Payload::new(&settings(), &Secret::new("k"));
        assert_eq!(
            p.unit_names(),
            vec!["vpn-agent-firewall.service", "tailscaled.service"]
        );
        assert!(p.units[1].contents.contains("Type=notify"));
    }
}
