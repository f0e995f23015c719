//! The last good netmap, kept in the state directory so that a restart or a reboot while
//! headscale is away brings the mesh back at once. Encoding and checks are pure; `load` and
//! `save` only move the bytes.
//!
//! The cache never widens access: it holds the packet filter that was in force, and peers
//! whose keys have expired since are dropped when the peer set is built, as for a live map.

use super::netmap::Netmap;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Bumped whenever the layout changes; a cache of another version is ignored, not guessed at.
pub const VERSION: u32 = 1;

#[derive(Deserialize)]
struct Stored {
    version: u32,
    /// Unix seconds when the map was received from headscale.
    saved_at: u64,
    /// The node key the map was made for: a map of an earlier identity is worthless.
    node_key: String,
    netmap: Netmap,
}

/// [`Stored`] as it is written: borrowing the netmap rather than cloning it, which at 5 000
/// peers held another 5 MiB for the moment of each write (bench patch's heap count).
#[derive(Serialize)]
struct Storing<'a> {
    version: u32,
    saved_at: u64,
    node_key: &'a str,
    netmap: &'a Netmap,
}

/// A netmap read back from the cache.
#[derive(Debug)]
pub struct Cached {
    pub netmap: Netmap,
    pub saved_at: SystemTime,
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("netmap.json")
}

pub fn encode(netmap: &Netmap, node_key: &str, saved_at: SystemTime) -> Vec<u8> {
    let stored = Storing {
        version: VERSION,
        saved_at: secs(saved_at),
        node_key,
        netmap,
    };
    serde_json::to_vec(&stored).expect("a netmap serializes")
}

/// The cached map if it is one of ours: `Ok(None)` when it was made for another node key;
/// an error when it cannot be read as a cache of this version.
pub fn decode(bytes: &[u8], node_key: &str) -> Result<Option<Cached>> {
    let s: Stored = match serde_json::from_slice(bytes) {
        Ok(s) => s,
        // Only a cache that does not read as ours is read again, for its version: a large
        // map is parsed once on the way in.
        Err(e) => return Err(unreadable(bytes, e)),
    };
    if s.version != VERSION {
        return Err(other_version(s.version));
    }
    if s.node_key != node_key || s.netmap.self_node.is_none() {
        return Ok(None);
    }
    Ok(Some(Cached {
        netmap: s.netmap,
        saved_at: SystemTime::UNIX_EPOCH + Duration::from_secs(s.saved_at),
    }))
}

fn other_version(v: u32) -> Error {
    Error::State(format!(
        "netmap cache version {v} (this agent reads {VERSION})"
    ))
}

/// Why `bytes` is not a cache of this version: another version's layout, or not a cache.
fn unreadable(bytes: &[u8], e: serde_json::Error) -> Error {
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    match serde_json::from_slice::<Version>(bytes) {
        Ok(v) if v.version != VERSION => other_version(v.version),
        Ok(_) => Error::State(format!("netmap cache is corrupt: {e}")),
        Err(e) => Error::State(format!("not a netmap cache: {e}")),
    }
}

/// Reads the cache from `state_dir`: none when there is no file yet.
pub fn load(state_dir: &Path, node_key: &str) -> Result<Option<Cached>> {
    let p = path(state_dir);
    match std::fs::read(&p) {
        Ok(b) => decode(&b, node_key).map_err(|e| Error::State(format!("{}: {e}", p.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&p, e)),
    }
}

/// Writes the cache atomically, readable by root only (it names every peer's keys).
pub fn save(state_dir: &Path, bytes: &[u8]) -> Result<()> {
    crate::fsutil::write_private_atomic(&path(state_dir), bytes)
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> Netmap {
        let mut m = Netmap::default();
        m.apply(
            serde_json::from_str(
                r#"{"Node":{"ID":1,"Addresses":["100.64.0.1/32"],"KeyExpiry":"2027-01-01T00:00:00Z"},
                "DERPMap":{"Regions":{"999":{"RegionID":999,"Nodes":[{"Name":"a","RegionID":999,"HostName":"192.0.2.1"}]}}},
                "Peers":[{"ID":2,"Key":"nodekey:aa","DiscoKey":"discokey:bb","Endpoints":["192.0.2.3:41641"],
                          "AllowedIPs":["100.64.0.2/32"],"HomeDERP":999,"Online":true}],
                "PacketFilters":{"base":[{"SrcIPs":["100.64.0.2"],"DstPorts":[{"IP":"*","Ports":{"First":22,"Last":22}}]}]}}"#,
            )
            .unwrap(),
        );
        m
    }

    #[test]
    fn a_cached_map_comes_back_equal_for_its_own_node_key_only() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let bytes = encode(&map(), "nodekey:01", t);
        let c = decode(&bytes, "nodekey:01").unwrap().unwrap();
        assert_eq!(c.netmap, map());
        assert_eq!(c.saved_at, t);
        assert!(decode(&bytes, "nodekey:02").unwrap().is_none());
    }

    #[test]
    fn other_versions_and_garbage_are_errors_that_say_so() {
        let e = decode(br#"{"version":2,"saved_at":0}"#, "k").unwrap_err();
        assert!(e.to_string().contains("version 2"), "{e}");
        assert!(decode(b"{", "k").is_err());
        let e = decode(br#"{"version":1,"saved_at":"x"}"#, "k").unwrap_err();
        assert!(e.to_string().contains("corrupt"), "{e}");
    }

    #[test]
    fn the_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("vpn-agent-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        save(&dir, &encode(&map(), "k", SystemTime::now())).unwrap();
        let mode = std::fs::metadata(path(&dir)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(load(&dir, "k").unwrap().is_some());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(load(&dir, "k").unwrap().is_none());
    }
}
