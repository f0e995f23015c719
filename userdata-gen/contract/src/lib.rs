//! The contract between `userdata-gen`, which writes the files, and `vpn-agent`, which reads
//! them: where they live, the units' names, the agent's own settings (`agent.json`) and the
//! mesh settings in tailscaled's `--config` format (`alpha0`). Both sides depend on this
//! crate and nothing else of each other, so a change to a file's shape is a change here,
//! where a round-trip test sees it.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::PathBuf;

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
/// The agent's binary, where the units run it from (the image's, the Debian package's, or
/// one Ignition or cloud-init downloaded at first boot).
pub const AGENT_BINARY_PATH: &str = "/usr/local/bin/vpn-agent";
/// The agent's nftables table (family `inet`). A first boot that could not fetch the agent
/// loads a table of this name that only drops, which the agent replaces when it runs.
pub const NFT_TABLE: &str = "vpn_agent";

/// Our units' names: the early firewall unit, and the agent's (named as tailscaled's, so
/// metal-stack's firewall-controller restarts it).
pub const FIREWALL_UNIT: &str = "vpn-agent-firewall.service";
pub const AGENT_UNIT: &str = "tailscaled.service";

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

impl AgentSettings {
    /// The ports of `proto` that only the tunnel may reach, sorted: the mesh-only services,
    /// and for TCP the closed ports.
    pub fn closed_ports(&self, proto: Protocol) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .services
            .iter()
            .filter(|svc| svc.protocol == proto)
            .map(|svc| svc.port)
            .collect();
        if proto == Protocol::Tcp {
            ports.extend(&self.closed_tcp_ports);
        }
        ports.sort_unstable();
        ports.dedup();
        ports
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

/// Where the pre-auth key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthKey {
    Inline(Secret),
    /// `file:<path>`: the file is scrubbed once registration succeeded.
    File(PathBuf),
}

/// The mesh settings file (tailscaled's `--config`, `Version: alpha0`), as much as the agent
/// reads, so that a stock tailscaled could run from the same file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshConfig {
    pub server_url: String,
    pub auth_key: Option<AuthKey>,
    pub hostname: Option<String>,
    pub enabled: bool,
    /// `AcceptRoutes`: use the subnet routes other nodes serve.
    pub accept_routes: bool,
    /// `AdvertiseRoutes`: the subnets this node routes into, checked by [`subnet_route`].
    pub advertise_routes: Vec<(std::net::IpAddr, u8)>,
}

/// The value of `name` in `v`, with Go's case-insensitive match of JSON keys (tailscale's
/// own files spell some keys `acceptRoutes`, the struct fields `AcceptRoutes`).
fn key<'a>(v: &'a Value, name: &str) -> &'a Value {
    v.as_object()
        .and_then(|o| {
            o.get(name).or_else(|| {
                o.iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|e| e.1)
            })
        })
        .unwrap_or(&Value::Null)
}

fn field<'a>(v: &'a Value, name: &str) -> Result<Option<&'a str>, String> {
    match key(v, name) {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s)),
        other => Err(format!("{name} must be a string, found {other}")),
    }
}

/// A boolean as tailscale's `opt.Bool` reads it: true, false, "true", "false", or absent.
fn flag(v: &Value, name: &str, default: bool) -> Result<bool, String> {
    match key(v, name) {
        Value::Null => Ok(default),
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s == "true" || s == "false" => Ok(s == "true"),
        Value::String(s) if s.is_empty() => Ok(default),
        other => Err(format!("{name} must be true or false, found {other}")),
    }
}

/// `AdvertiseRoutes`: a list of subnets (see [`subnet_route`]), sorted, without repeats.
fn routes(v: &Value) -> Result<Vec<(std::net::IpAddr, u8)>, String> {
    let err = |e: String| format!("AdvertiseRoutes: {e}");
    let list = match key(v, "AdvertiseRoutes") {
        Value::Null => return Ok(vec![]),
        Value::Array(a) => a,
        other => return Err(err(format!("must be a list of subnets, found {other}"))),
    };
    let mut out = list
        .iter()
        .map(|r| match r {
            Value::String(s) => subnet_route(s).map_err(err),
            other => Err(err(format!("{other} is not a subnet"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    out.sort();
    out.dedup();
    Ok(out)
}

impl MeshConfig {
    /// What `userdata-gen` writes: the key in [`AUTH_KEY_PATH`], enabled.
    pub fn for_node(server_url: &str, hostname: &str, advertise_routes: &[String]) -> String {
        let mut v = serde_json::json!({
            "Version": "alpha0",
            "ServerURL": server_url,
            "AuthKey": format!("file:{AUTH_KEY_PATH}"),
            "Hostname": hostname,
            "Enabled": true,
        });
        if !advertise_routes.is_empty() {
            v["AdvertiseRoutes"] = serde_json::json!(advertise_routes);
        }
        serde_json::to_string_pretty(&v).expect("config serializes") + "\n"
    }

    /// Reads the file's text; the message names the field (the caller adds the path).
    pub fn parse(text: &str) -> Result<MeshConfig, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        match field(&v, "Version")? {
            Some("alpha0") => {}
            other => return Err(format!("Version is {other:?}; this agent reads \"alpha0\"")),
        }
        let server = field(&v, "ServerURL")?.ok_or("ServerURL is missing (the headscale URL)")?;
        if !server.starts_with("https://") && !server.starts_with("http://") {
            return Err(format!("ServerURL {server:?} must start with https://"));
        }
        // An exit node would carry the host's own traffic, control and DERP included, through
        // another node: for a firewall whose only way in is this mesh, a lock-out waiting to
        // happen. Refused rather than ignored, so nobody believes it is in use.
        if field(&v, "ExitNode")?.is_some_and(|s| !s.is_empty()) {
            return Err(
                "ExitNode is set; vpn-agent never sends its host's traffic through \
                        an exit node (remove the key)"
                    .into(),
            );
        }
        let auth_key = field(&v, "AuthKey")?.filter(|s| !s.is_empty()).map(|s| {
            match s.strip_prefix("file:") {
                Some(p) => AuthKey::File(PathBuf::from(p)),
                None => AuthKey::Inline(Secret::new(s)),
            }
        });
        Ok(MeshConfig {
            server_url: server.trim_end_matches('/').to_string(),
            auth_key,
            hostname: field(&v, "Hostname")?.map(str::to_string),
            enabled: flag(&v, "Enabled", true)?,
            accept_routes: flag(&v, "AcceptRoutes", false)?,
            advertise_routes: routes(&v)?,
        })
    }
}

#[cfg(test)]
mod tests;
