//! What a large tailnet costs the agent, without the network (`cargo xtask bench patch`
//! writes the table into the README): the first map of N peers (size, decoding, applying
//! it to the netmap and the data plane), and one `PeersChangedPatch` (a peer's endpoints,
//! as headscale sends when a node moves or comes and goes) applied the way the agent does
//! now (only the named peer) and the way it did before (every peer handed to the data plane
//! again), and one data-plane tick (timers, path discovery) with every peer idle; one write
//! of the netmap cache (encoded and written to a temporary directory); and the heap the
//! netmap and the data plane hold for the N peers, and their peak while the first map is
//! decoded and applied. Prints one JSON object per N on stdout.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime};
use vpn_agent::control::client::decode_map_message;
use vpn_agent::control::netmap::Netmap;
use vpn_agent::control::types::MapResponse;
use vpn_agent::daemon::peer_info;
use vpn_agent::dataplane::Engine;
use x25519_dalek::{PublicKey, StaticSecret};

/// The system allocator, counting the bytes in use and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    PEAK.fetch_max(LIVE.fetch_add(by, Relaxed) + by, Relaxed);
}

// SAFETY: every call goes to `System` unchanged; only the counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        grew(l.size());
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, size: usize) -> *mut u8 {
        if size > l.size() {
            grew(size - l.size());
        } else {
            LIVE.fetch_sub(l.size() - size, Relaxed);
        }
        unsafe { System.realloc(p, l, size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A node as headscale v0.28 describes a peer, with realistic field sizes.
fn peer_json(i: usize) -> serde_json::Value {
    let key = |seed: u8| {
        let mut b = [seed; 32];
        b[..8].copy_from_slice(&(i as u64).to_be_bytes());
        vpn_agent::keys::hex(PublicKey::from(&StaticSecret::from(b)).as_bytes())
    };
    let (a, b) = (i / 250, i % 250 + 1);
    serde_json::json!({
        "ID": i + 2,
        "StableID": format!("{}", i + 2),
        "Name": format!("node-{i}.project.example.net."),
        "User": 1,
        "Key": format!("nodekey:{}", key(1)),
        "KeyExpiry": "0001-01-01T00:00:00Z",
        "Machine": format!("mkey:{}", key(2)),
        "DiscoKey": format!("discokey:{}", key(3)),
        "Addresses": [format!("100.64.{a}.{b}/32"), format!("fd7a:115c:a1e0::{a:x}:{b:x}/128")],
        "AllowedIPs": [format!("100.64.{a}.{b}/32"), format!("fd7a:115c:a1e0::{a:x}:{b:x}/128")],
        "Endpoints": [format!("192.0.2.{b}:41641"), format!("198.51.100.{b}:{}", 30000 + i % 30000)],
        "HomeDERP": 999,
        "Hostinfo": { "Hostname": format!("node-{i}"), "OS": "linux", "IPNVersion": "1.90.0" },
        "Created": "2026-12-01T00:00:00Z",
        "Tags": ["tag:firewall"],
        "Online": true,
        "MachineAuthorized": true,
        "Capabilities": [],
        "CapMap": {},
    })
}

fn first_map(n: usize) -> serde_json::Value {
    serde_json::json!({
        "Node": { "ID": 1, "Key": "nodekey:00", "Addresses": ["100.64.255.254/32"] },
        "Peers": (0..n).map(peer_json).collect::<Vec<_>>(),
        "PacketFilters": { "base": [{ "SrcIPs": ["*"], "DstPorts": [{ "IP": "*", "Ports": { "First": 0, "Last": 65535 } }] }] },
    })
}

fn engine() -> Engine {
    Engine::new(
        StaticSecret::from([1u8; 32]),
        crypto_box::SecretKey::from([2u8; 32]),
        Box::new(|b| b.fill(3)),
    )
}

/// The peers of `m` for the data plane, as the agent hands them over on a full refresh.
fn all_infos(m: &Netmap, now: SystemTime) -> Vec<vpn_agent::dataplane::PeerInfo> {
    m.peers
        .values()
        .filter_map(|p| peer_info(p, false, now))
        .collect()
}

/// Median of `runs` timings of `f`.
fn median(runs: usize, mut f: impl FnMut(usize)) -> Duration {
    let mut t: Vec<Duration> = (0..runs)
        .map(|i| {
            let start = Instant::now();
            f(i);
            start.elapsed()
        })
        .collect();
    t.sort();
    t[runs / 2]
}

fn main() {
    let now = SystemTime::now();
    for n in [100usize, 1000, 5000] {
        let json = serde_json::to_vec(&first_map(n)).unwrap();
        let compressed = zstd::encode_all(json.as_slice(), 3).unwrap();

        // The first map: decode, replace the netmap, hand every peer to the data plane.
        let apply_first = || {
            let msg: MapResponse = decode_map_message(&compressed).unwrap();
            let mut netmap = Netmap::default();
            netmap.replace_with(msg);
            let mut e = engine();
            e.set_peers(all_infos(&netmap, now));
            (netmap, e)
        };
        let before = LIVE.load(Relaxed);
        PEAK.store(before, Relaxed);
        let (mut netmap, mut e) = apply_first();
        let held = LIVE.load(Relaxed) - before;
        let peak = PEAK.load(Relaxed) - before;
        let first = median(5, |_| {
            (netmap, e) = apply_first();
        });

        // One patch: a peer's new endpoints.
        let patch = |i: usize| -> MapResponse {
            let id = 2 + (i * 7919) % n;
            serde_json::from_value(serde_json::json!({
                "PeersChangedPatch": [{ "NodeID": id, "Endpoints": [format!("203.0.113.{}:{}", i % 250 + 1, 1000 + i % 60000)] }]
            }))
            .unwrap()
        };
        let runs = 1000;
        let incremental = median(runs, |i| {
            let c = netmap.apply(patch(i));
            let changed = c
                .changed_peers
                .iter()
                .filter_map(|id| peer_info(&netmap.peers[id], false, now))
                .collect();
            e.update_peers(changed, &[]);
        });
        let mut out = vec![];
        let t0 = Instant::now();
        let tick = median(runs, |i| {
            out.clear();
            e.tick(t0 + Duration::from_millis(250 * i as u64), &mut out);
        });
        let dir = std::env::temp_dir().join(format!("patch-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cache_encode = median(20, |_| {
            std::hint::black_box(vpn_agent::control::cache::encode(
                &netmap,
                "nodekey:00",
                now,
            ));
        });
        let bytes = vpn_agent::control::cache::encode(&netmap, "nodekey:00", now);
        let cache_save = median(20, |_| {
            vpn_agent::control::cache::save(&dir, &bytes).unwrap();
        });
        std::fs::remove_dir_all(&dir).unwrap();
        let full = median(runs.min(200), |i| {
            netmap.apply(patch(i));
            e.set_peers(all_infos(&netmap, now));
        });
        println!(
            "{}",
            serde_json::json!({
                "peers": n,
                "first_map_bytes": json.len(),
                "first_map_zstd_bytes": compressed.len(),
                "first_map_ms": first.as_secs_f64() * 1e3,
                "patch_us": incremental.as_secs_f64() * 1e6,
                "patch_full_refresh_us": full.as_secs_f64() * 1e6,
                "tick_us": tick.as_secs_f64() * 1e6,
                "cache_bytes": bytes.len(),
                "cache_encode_ms": cache_encode.as_secs_f64() * 1e3,
                "cache_save_ms": cache_save.as_secs_f64() * 1e3,
                "heap_held_bytes": held,
                "heap_peak_bytes": peak,
            })
        );
    }
}
