//! Arbitrary datagrams on the shared UDP socket, from DERP, and arbitrary packets from the
//! TUN device, through the whole data-plane engine: classification, STUN, disco opening and
//! decoding, WireGuard dispatch, path state; and the TUN offloads. Never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};
use vpn_agent::dataplane::{Engine, PeerInfo, Region, offload};
use vpn_agent::disco;
use x25519_dalek::{PublicKey, StaticSecret};

fuzz_target!(|data: &[u8]| {
    let _ = disco::Message::decode(data);
    let _ = vpn_agent::stun::parse_response(data);

    let peer = *PublicKey::from(&StaticSecret::from([3; 32])).as_bytes();
    let mut e = Engine::new(
        StaticSecret::from([2; 32]),
        crypto_box::SecretKey::from([4; 32]),
        Box::new(|b: &mut [u8]| b.fill(7)),
    );
    e.set_derp_map(vec![Region {
        id: 999,
        code: "headscale".into(),
        stun: Some("192.0.2.1:3478".parse().unwrap()),
    }]);
    e.set_peers(vec![PeerInfo {
        node_key: peer,
        disco_key: Some(*crypto_box::SecretKey::from([5; 32]).public_key().as_bytes()),
        allowed: vec![("100.64.0.2".parse().unwrap(), 32)],
        endpoints: vec!["192.0.2.12:41641".parse().unwrap()],
        home_derp: 999,
    }]);
    let now = Instant::now();
    let mut out = vec![];
    e.tick(now, &mut out);
    e.on_udp("192.0.2.12:41641".parse().unwrap(), data, now, &mut out);
    e.on_udp("192.0.2.1:3478".parse().unwrap(), data, now, &mut out);
    e.on_derp(999, peer, data, now, &mut out);
    e.on_tun(data, now, &mut out);
    e.tick(now + Duration::from_secs(7), &mut out);
    let _ = e.stats(now);

    // The TUN side's offloads: reads (with TSO splitting) and write coalescing.
    let mut read = data.to_vec();
    let mut coalesce = offload::Coalescer::default();
    offload::from_tun(&mut read, &mut vec![], |p| coalesce.push(p.to_vec()));
    coalesce.push(data.to_vec());
    coalesce.push(data.to_vec());
    let (mut parts_out, mut spent) = (0, vec![]);
    coalesce.finish(
        |parts| {
            // A merged packet never outgrows what one TUN write may carry.
            let len: usize = parts.iter().map(|p| p.len()).sum();
            assert!(len <= offload::VNET_HDR_LEN + 65535 || parts.len() == 2);
            parts_out += parts.len() - 1;
        },
        &mut spent,
    );
    assert_eq!(spent.len(), parts_out, "every packet's buffer comes back");
});
