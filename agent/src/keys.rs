//! The node's keys: the machine key (identity on the control channel) and the node key
//! (WireGuard), kept in the state directory, and the disco key, kept there too: after a
//! restart while control is away, peers know no other disco key of ours, and must still
//! recognise our path discovery. Text forms as
//! tailscale writes them (`privkey:`, `mkey:`, `nodekey:`, `discokey:` + 64 hex digits).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use x25519_dalek::{PublicKey, StaticSecret};

/// A fresh private key from the OS's randomness.
pub fn generate() -> StaticSecret {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).expect("the OS provides randomness");
    StaticSecret::from(b)
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `prefix` + hex of a public key.
pub fn public_text(prefix: &str, key: &PublicKey) -> String {
    format!("{prefix}:{}", hex(key.as_bytes()))
}

/// Parses `prefix:<64 hex>`.
pub fn parse_text(prefix: &str, s: &str) -> Option<[u8; 32]> {
    let h = s.strip_prefix(prefix)?.strip_prefix(':')?;
    if h.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

pub fn parse_public(prefix: &str, s: &str) -> Option<PublicKey> {
    parse_text(prefix, s).map(PublicKey::from)
}

/// The persistent identity.
pub struct Identity {
    pub machine: StaticSecret,
    pub node: StaticSecret,
    pub disco: StaticSecret,
    /// Whether headscale accepted this node key once (a restart then needs no auth key).
    pub registered: bool,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    machine: String,
    node: String,
    /// Absent in identities written before the disco key was kept: a new one is made.
    #[serde(default)]
    disco: Option<String>,
    #[serde(default)]
    registered: bool,
}

impl Identity {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("identity.json")
    }

    /// Loads the identity from `state_dir`, or creates and saves a new one.
    pub fn load_or_create(state_dir: &Path) -> Result<Identity> {
        let path = Self::path(state_dir);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let s: Stored = serde_json::from_str(&text)
                    .map_err(|e| Error::State(format!("{} is corrupt: {e}", path.display())))?;
                let key = |v: &str, what: &str| {
                    parse_text("privkey", v)
                        .map(StaticSecret::from)
                        .ok_or_else(|| {
                            Error::State(format!(
                                "{}: the {what} key is not a privkey:<hex> value",
                                path.display()
                            ))
                        })
                };
                let id = Identity {
                    machine: key(&s.machine, "machine")?,
                    node: key(&s.node, "node")?,
                    disco: match &s.disco {
                        Some(d) => key(d, "disco")?,
                        None => generate(),
                    },
                    registered: s.registered,
                };
                if s.disco.is_none() {
                    id.save(state_dir)?;
                }
                Ok(id)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Identity {
                    machine: generate(),
                    node: generate(),
                    disco: generate(),
                    registered: false,
                };
                id.save(state_dir)?;
                Ok(id)
            }
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Writes the identity atomically, readable by root only.
    pub fn save(&self, state_dir: &Path) -> Result<()> {
        let s = Stored {
            machine: format!("privkey:{}", hex(&self.machine.to_bytes())),
            node: format!("privkey:{}", hex(&self.node.to_bytes())),
            disco: Some(format!("privkey:{}", hex(&self.disco.to_bytes()))),
            registered: self.registered,
        };
        let text = serde_json::to_string_pretty(&s).expect("serializes");
        crate::fsutil::write_private_atomic(&Self::path(state_dir), text.as_bytes())
    }

    pub fn machine_public(&self) -> PublicKey {
        PublicKey::from(&self.machine)
    }

    pub fn node_public(&self) -> PublicKey {
        PublicKey::from(&self.node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_forms_round_trip() {
        let k = PublicKey::from(&StaticSecret::from([5; 32]));
        let t = public_text("nodekey", &k);
        assert!(t.starts_with("nodekey:") && t.len() == 8 + 64);
        assert_eq!(
            parse_public("nodekey", &t).unwrap().as_bytes(),
            k.as_bytes()
        );
        assert!(parse_public("mkey", &t).is_none());
        assert!(parse_public("nodekey", "nodekey:abc").is_none());
        assert!(parse_public("nodekey", &format!("nodekey:{}", "zz".repeat(32))).is_none());
    }

    #[test]
    fn identity_persists_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("vpn-agent-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = Identity::load_or_create(&dir).unwrap();
        let b = Identity::load_or_create(&dir).unwrap();
        assert_eq!(a.node_public().as_bytes(), b.node_public().as_bytes());
        assert_eq!(a.machine_public().as_bytes(), b.machine_public().as_bytes());
        assert_eq!(a.disco.to_bytes(), b.disco.to_bytes());
        let mode = std::fs::metadata(Identity::path(&dir))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(Identity::path(&dir), "{").unwrap();
        assert!(Identity::load_or_create(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
