//! WireGuard's cryptokey routing table: prefixes to peers, longest match wins. It answers
//! both questions the data path asks, with the same rule as wireguard-go's `AllowedIPs`:
//! which peer a packet to an address goes to, and whether a packet that came from a peer
//! may carry its source address (the peer that address routes to must be that peer).
//!
//! One hash map per prefix length that is in use: a lookup costs one probe per distinct
//! length (two in the common case, the mesh's /32s and /128s), whatever the number of peers.
//! Peers come and go one at a time ([`Table::insert`], [`Table::remove`]): a change costs
//! the changed peer's prefixes, never a rebuild. A prefix two peers claim goes to the one
//! with the smaller node key, whatever the order they arrived in (headscale makes one node
//! primary per route; a tie is a misconfiguration, and must not flip with each restart).

use std::collections::HashMap;
use std::net::IpAddr;

/// The peers that claim one prefix, smallest node key first: the first one routes.
type Owners = Vec<([u8; 32], usize)>;

/// Prefixes of one address family, as integers, to their owners.
#[derive(Debug, Clone)]
struct Family<K> {
    /// Per prefix length in use, longest first: masked address → owners.
    by_len: Vec<(u8, HashMap<K, Owners>)>,
}

impl<K> Default for Family<K> {
    fn default() -> Self {
        Family { by_len: vec![] }
    }
}

trait Bits: Copy + Eq + std::hash::Hash {
    const MAX: u8;
    fn mask(self, len: u8) -> Self;
}

impl Bits for u32 {
    const MAX: u8 = 32;
    fn mask(self, len: u8) -> u32 {
        self & u32::MAX
            .checked_shl(u32::from(32 - len.min(32)))
            .unwrap_or(0)
    }
}

impl Bits for u128 {
    const MAX: u8 = 128;
    fn mask(self, len: u8) -> u128 {
        self & u128::MAX
            .checked_shl(u32::from(128 - len.min(128)))
            .unwrap_or(0)
    }
}

impl<K: Bits> Family<K> {
    fn insert(&mut self, prefix: K, len: u8, key: [u8; 32], slot: usize) {
        let len = len.min(K::MAX);
        let i = match self.by_len.iter().position(|(l, _)| *l <= len) {
            Some(i) if self.by_len[i].0 == len => i,
            Some(i) => {
                self.by_len.insert(i, (len, HashMap::new()));
                i
            }
            None => {
                self.by_len.push((len, HashMap::new()));
                self.by_len.len() - 1
            }
        };
        let owners = self.by_len[i].1.entry(prefix.mask(len)).or_default();
        match owners.binary_search_by(|(k, _)| k.cmp(&key)) {
            Ok(at) => owners[at].1 = slot,
            Err(at) => owners.insert(at, (key, slot)),
        }
    }

    fn remove(&mut self, prefix: K, len: u8, key: &[u8; 32]) {
        let len = len.min(K::MAX);
        let Some(i) = self.by_len.iter().position(|(l, _)| *l == len) else {
            return;
        };
        let map = &mut self.by_len[i].1;
        let masked = prefix.mask(len);
        if let Some(owners) = map.get_mut(&masked) {
            owners.retain(|(k, _)| k != key);
            if owners.is_empty() {
                map.remove(&masked);
            }
        }
        if map.is_empty() {
            self.by_len.remove(i);
        }
    }

    fn lookup(&self, addr: K) -> Option<usize> {
        self.by_len
            .iter()
            .find_map(|(len, m)| m.get(&addr.mask(*len)).and_then(|o| o.first()))
            .map(|(_, slot)| *slot)
    }
}

/// The routing table of a peer set: prefix → the slot of the peer that owns it.
#[derive(Debug, Clone, Default)]
pub struct Table {
    v4: Family<u32>,
    v6: Family<u128>,
}

impl Table {
    /// Routes `ip/len` to the peer `key` in `slot` (unless a peer with a smaller key claims
    /// the same prefix).
    pub fn insert(&mut self, ip: IpAddr, len: u8, key: [u8; 32], slot: usize) {
        match ip {
            IpAddr::V4(a) => self.v4.insert(u32::from(a), len, key, slot),
            IpAddr::V6(a) => self.v6.insert(u128::from(a), len, key, slot),
        }
    }

    /// Withdraws peer `key`'s claim on `ip/len`; another claimant takes over.
    pub fn remove(&mut self, ip: IpAddr, len: u8, key: &[u8; 32]) {
        match ip {
            IpAddr::V4(a) => self.v4.remove(u32::from(a), len, key),
            IpAddr::V6(a) => self.v6.remove(u128::from(a), len, key),
        }
    }

    /// The slot of the longest prefix that contains `ip`.
    pub fn lookup(&self, ip: IpAddr) -> Option<usize> {
        match ip {
            IpAddr::V4(a) => self.v4.lookup(u32::from(a)),
            IpAddr::V6(a) => self.v6.lookup(u128::from(a)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_whatever_the_insert_order() {
        let routes = [
            ("0.0.0.0", 0, 1),
            ("198.51.100.0", 24, 2),
            ("100.64.0.2", 32, 3),
            ("::", 0, 1),
            ("fd7a:115c:a1e0::2", 128, 3),
        ];
        for order in [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4, 1, 3]] {
            let mut t = Table::default();
            for i in order {
                let (a, l, s) = routes[i];
                t.insert(ip(a), l, key(s), s);
            }
            assert_eq!(t.lookup(ip("100.64.0.2")), Some(3));
            assert_eq!(t.lookup(ip("100.64.0.3")), Some(1));
            assert_eq!(t.lookup(ip("198.51.100.7")), Some(2));
            assert_eq!(t.lookup(ip("fd7a:115c:a1e0::2")), Some(3));
            assert_eq!(t.lookup(ip("2001:db8::1")), Some(1));
        }
    }

    fn key(n: usize) -> [u8; 32] {
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&(n as u64).to_be_bytes());
        k
    }

    #[test]
    fn no_route_no_peer_and_the_smallest_key_owns_a_prefix() {
        let mut t = Table::default();
        assert_eq!(t.lookup(ip("100.64.0.1")), None);
        t.insert(ip("198.51.100.0"), 24, key(6), 6);
        t.insert(ip("198.51.100.0"), 24, key(5), 5);
        // Host bits in the prefix do not matter: the network is what routes.
        t.insert(ip("198.51.100.77"), 24, key(7), 7);
        assert_eq!(t.lookup(ip("198.51.100.1")), Some(5));
        assert_eq!(t.lookup(ip("198.51.101.1")), None);
        assert_eq!(t.lookup(ip("::1")), None);
        // When the owner goes, the next claimant routes; when all go, nothing does.
        t.remove(ip("198.51.100.0"), 24, &key(5));
        assert_eq!(t.lookup(ip("198.51.100.1")), Some(6));
        t.remove(ip("198.51.100.0"), 24, &key(6));
        t.remove(ip("198.51.100.0"), 24, &key(7));
        assert_eq!(t.lookup(ip("198.51.100.1")), None);
        assert!(t.v4.by_len.is_empty());
    }

    proptest! {
        /// The table agrees with a scan of all prefixes for the longest match.
        #[test]
        fn agrees_with_a_linear_scan(
            prefixes in proptest::collection::vec((any::<u32>(), 0u8..=32), 0..40),
            probes in proptest::collection::vec(any::<u32>(), 1..40),
        ) {
            // Peer i claims prefix i; the odd ones leave again.
            let mut t = Table::default();
            for (i, (a, l)) in prefixes.iter().enumerate() {
                t.insert(IpAddr::V4((*a).into()), *l, key(i), i);
            }
            for (i, (a, l)) in prefixes.iter().enumerate().filter(|(i, _)| i % 2 == 1) {
                t.remove(IpAddr::V4((*a).into()), *l, &key(i));
            }
            for p in probes {
                // Among the remaining prefixes that contain the probe: the longest, and of
                // equal ones (the same network) the smallest key.
                let want = prefixes
                    .iter()
                    .enumerate()
                    .filter(|(i, (a, l))| i % 2 == 0 && a.mask(*l) == p.mask(*l))
                    .max_by_key(|(i, (_, l))| (*l, std::cmp::Reverse(*i)))
                    .map(|(i, _)| i);
                prop_assert_eq!(t.lookup(IpAddr::V4(p.into())), want);
            }
        }
    }
}
