//! Arbitrary datagrams on the shared UDP socket and arbitrary packets from the TUN device:
//! classification, disco opening and decoding, WireGuard dispatch. Never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vpn_agent::disco;
use vpn_agent::wg::{PeerSpec, Wg};
use x25519_dalek::{PublicKey, StaticSecret};

fuzz_target!(|data: &[u8]| {
    let _ = disco::classify(data);
    let _ = disco::sender(data);
    let _ = disco::Message::decode(data);
    let ours = crypto_box::SecretKey::from([1; 32]);
    let _ = disco::open(&ours, data);

    let mut wg = Wg::new(StaticSecret::from([2; 32]));
    wg.sync(vec![PeerSpec {
        node_key: *PublicKey::from(&StaticSecret::from([3; 32])).as_bytes(),
        allowed: vec![("100.64.0.2".parse().unwrap(), 32)],
        endpoints: vec!["192.0.2.12:41641".parse().unwrap()],
    }]);
    let mut out = vec![];
    wg.from_network("192.0.2.12:41641".parse().unwrap(), data, &mut out);
    wg.from_tun(data, &mut out);
    wg.tick(&mut out);
});
