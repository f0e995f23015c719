//! What we add to the firewall: the agent's configuration files and our systemd units.

use crate::error::{Error, Result};
pub use vpn_contract::{
    AGENT_BINARY_PATH, AGENT_SETTINGS_PATH, AUTH_KEY_PATH, AgentSettings, CA_PATH, CONFIG_DIR,
    FIREWALL_UNIT, MESH_CONFIG_PATH, MeshConfig, NFT_TABLE, Protocol, Secret, Service, UNIT_DIR,
    subnet_route,
};

/// Our units, from `systemd/` at the repository root: one source for the repo and the userdata.
pub const UNITS: &[(&str, &str)] = &[
    (
        FIREWALL_UNIT,
        include_str!("../../systemd/vpn-agent-firewall.service"),
    ),
    (
        vpn_contract::AGENT_UNIT,
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

/// Whether `name` is a usable VRF device name (an interface name: 1-15 safe characters).
pub fn valid_vrf(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
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
    /// The agent's binary to fetch at first boot; `None`: the image's.
    pub agent_binary: Option<RemoteBinary>,
}

/// A release of the agent that the firewall downloads at first boot and refuses unless its
/// sha512 is the pinned one: metal-api picks the version per allocation, no image needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteBinary {
    /// `https://` (or `http://`: the hash, not the transport, vouches for the bytes).
    pub url: String,
    /// 128 lowercase hex digits.
    pub sha512: String,
    /// PEM of the CA that signed the server's certificate, if not a public one.
    pub ca_pem: Option<String>,
}

impl RemoteBinary {
    /// Checks `url` and `sha512` (hex, either case) as `--agent-url`/`--agent-sha512`.
    pub fn new(url: &str, sha512: &str, ca_pem: Option<String>) -> Result<RemoteBinary> {
        let scheme_ok = url.starts_with("https://") || url.starts_with("http://");
        let host = url.split_once("://").map(|(_, r)| r).unwrap_or_default();
        if !scheme_ok || host.is_empty() || host.starts_with('/') {
            return Err(Error::input(format!(
                "--agent-url {url:?}: expected an https:// (or http://) URL of the vpn-agent binary"
            )));
        }
        if let Some(c) = url.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(Error::input(format!(
                "--agent-url: {c:?} is not allowed in a URL; percent-encode it"
            )));
        }
        if sha512.len() != 128 || !sha512.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::input(format!(
                "--agent-sha512: expected 128 hex digits (sha512sum's output), got {} characters",
                sha512.len()
            )));
        }
        Ok(RemoteBinary {
            url: url.to_string(),
            sha512: sha512.to_ascii_lowercase(),
            ca_pem,
        })
    }
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
    /// Fetched at first boot into [`AGENT_BINARY_PATH`]; `None`: the image has it.
    pub agent_binary: Option<RemoteBinary>,
    /// The agent's settings, for what runs before the agent does (cloud-config's bootcmd).
    pub agent: AgentSettings,
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // File contents include the key: list paths only.
        f.debug_struct("Payload")
            .field("files", &self.file_paths())
            .field("units", &self.unit_names())
            .field("agent_binary", &self.agent_binary)
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
        Payload {
            files,
            units,
            agent_binary: settings.agent_binary.clone(),
            agent,
        }
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
        if self.agent_binary.is_some() {
            out.push(AGENT_BINARY_PATH.into());
        }
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
    MeshConfig::for_node(
        &settings.login_server,
        &settings.hostname,
        &settings.advertise_routes,
    )
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
            agent_binary: None,
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
            agent_binary: None,
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
        // The binary the units run is the one a download puts in place.
        for (_, unit) in UNITS.iter().chain(FOREIGN_DROPINS) {
            for exec in unit.lines().filter(|l| l.starts_with("Exec")) {
                let program = exec.split_once('=').unwrap().1.split_whitespace().next();
                assert_eq!(program, Some(AGENT_BINARY_PATH), "{exec}");
            }
        }
    }

    #[test]
    fn a_remote_binary_is_checked_and_owned() {
        let hex = "AB".repeat(64);
        let b = RemoteBinary::new("https://repo.example/vpn-agent", &hex, None).unwrap();
        assert_eq!(b.sha512, "ab".repeat(64));
        for (url, sha, want) in [
            ("ftp://x/a", hex.as_str(), "https://"),
            ("https://", hex.as_str(), "https://"),
            ("https:///a", hex.as_str(), "https://"),
            ("https://x/a b", hex.as_str(), "percent-encode"),
            ("https://x/a", "abc", "128 hex digits"),
            ("https://x/a", &"g".repeat(128), "128 hex digits"),
        ] {
            let e = RemoteBinary::new(url, sha, None).unwrap_err().to_string();
            assert!(e.contains(want), "{url}: {e}");
        }
        let mut s = settings();
        assert!(
            !Payload::new(&s, &Secret::new("k"))
                .owned_paths()
                .contains(&AGENT_BINARY_PATH.to_string())
        );
        s.agent_binary = Some(b);
        assert!(
            Payload::new(&s, &Secret::new("k"))
                .owned_paths()
                .contains(&AGENT_BINARY_PATH.to_string())
        );
    }
}
