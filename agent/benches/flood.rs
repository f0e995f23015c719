//! What junk on the agent's UDP port costs (`cargo xtask bench flood` runs this and writes the
//! table into the README). An attacker in the data center can send anything to UDP 41641:
//! the cost per packet decides how many packets per second take a core. Prints one JSON
//! object per case on stdout.

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use vpn_agent::dataplane::{Engine, PeerInfo};
use x25519_dalek::{PublicKey, StaticSecret};

/// A deterministic byte stream (xorshift), so the junk differs per packet without the cost
/// of a CSPRNG in the measurement.
struct Junk(u64);

impl Junk {
    fn fill(&mut self, b: &mut [u8]) {
        for x in b {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *x = self.0 as u8;
        }
    }
}

/// An engine with one peer in its netmap, as the firewall has its operator.
fn engine() -> (Engine, [u8; 32]) {
    let peer_disco = crypto_box::SecretKey::from([7u8; 32]);
    let peer_node = StaticSecret::from([8u8; 32]);
    let mut e = Engine::new(
        StaticSecret::from([1u8; 32]),
        crypto_box::SecretKey::from([2u8; 32]),
        Box::new(|b| b.fill(3)),
    );
    e.set_peers(vec![PeerInfo {
        node_key: *PublicKey::from(&peer_node).as_bytes(),
        disco_key: Some(*peer_disco.public_key().as_bytes()),
        allowed: vec![("100.64.0.2".parse().unwrap(), 32)],
        endpoints: vec![],
        home_derp: 0,
    }]);
    (e, *peer_disco.public_key().as_bytes())
}

/// A WireGuard handshake initiation (type 1, 148 bytes) with random content: what a flood of
/// "initiations" from anyone who does not hold our public key looks like.
fn junk_initiation(j: &mut Junk) -> Vec<u8> {
    let mut p = vec![0u8; 148];
    j.fill(&mut p[4..]);
    p[0] = 1;
    p
}

/// An initiation under a correct `mac1` for `to`: someone who knows our public key (every
/// peer does). Past the limiter's 100 per second these get cookie replies.
fn initiation_with_mac1(j: &mut Junk, to: &[u8; 32]) -> Vec<u8> {
    use blake2::digest::{FixedOutput, Mac};
    use blake2::{Blake2s256, Blake2sMac, Digest};
    let mut p = junk_initiation(j);
    let key = Blake2s256::new()
        .chain_update(b"mac1----")
        .chain_update(to)
        .finalize();
    let mut mac = Blake2sMac::<blake2::digest::consts::U16>::new_from_slice(&key).unwrap();
    mac.update(&p[..116]);
    p[116..132].copy_from_slice(&mac.finalize_fixed());
    p
}

/// A disco-shaped packet (magic, a peer's real disco key, random nonce and box): disco keys
/// are not secret, anyone who saw one on the wire can send these.
fn junk_disco(j: &mut Junk, sender: &[u8; 32]) -> Vec<u8> {
    let mut p = Vec::with_capacity(6 + 32 + 24 + 48);
    p.extend_from_slice(vpn_agent::disco::MAGIC);
    p.extend_from_slice(sender);
    let mut rest = [0u8; 24 + 48];
    j.fill(&mut rest);
    p.extend_from_slice(&rest);
    p
}

fn measure(name: &str, mut packet: impl FnMut() -> Vec<u8>) {
    let (mut e, _) = engine();
    let from: SocketAddr = "192.0.2.66:40000".parse().unwrap();
    let packets: Vec<Vec<u8>> = (0..4096).map(|_| packet()).collect();
    let mut out = vec![];
    let now = Instant::now();
    let (mut n, start) = (0u64, Instant::now());
    while start.elapsed() < Duration::from_secs(2) {
        for p in &packets {
            e.on_udp(from, p, now, &mut out);
            out.clear();
        }
        n += packets.len() as u64;
    }
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    println!(
        r#"{{"case":"{name}","packets":{n},"ns_per_packet":{ns:.0},"packets_per_core_second":{:.0}}}"#,
        1e9 / ns
    );
}

fn main() {
    let mut j = Junk(0x9e37_79b9_7f4a_7c15);
    measure("junk handshake initiation", || junk_initiation(&mut j));
    let ours = *PublicKey::from(&StaticSecret::from([1u8; 32])).as_bytes();
    let mut j = Junk(0x1234_5678_9abc_def1);
    measure("handshake initiation with a valid mac1", || {
        initiation_with_mac1(&mut j, &ours)
    });
    let (_, sender) = engine();
    let mut j = Junk(0x2545_f491_4f6c_dd1d);
    measure("junk disco packet, known sender key", || {
        junk_disco(&mut j, &sender)
    });
}
