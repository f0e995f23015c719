//! Arbitrary bytes from the control server: as a handshake answer, and as a record stream
//! arriving in pieces. Each must give records or errors, never a panic, and never more
//! than one record's worth of plaintext at a time.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vpn_agent::control::noise::{CipherState, Initiator};
use vpn_agent::control::record::{MAX_PLAINTEXT, RecordReader};
use x25519_dalek::{PublicKey, StaticSecret};

fuzz_target!(|data: &[u8]| {
    // Handshake answers (types 2 and 3) are rare: only then pay for the key exchange.
    if matches!(data.first(), Some(2 | 3)) {
        let (init, _) = Initiator::start(
            &StaticSecret::from([2; 32]),
            &PublicKey::from(&StaticSecret::from([1; 32])),
            130,
            StaticSecret::from([3; 32]),
        );
        let _ = init.finish(data);
    }
    let mut cipher = CipherState::new([7; 32]);
    let mut r = RecordReader::default();
    for chunk in data.chunks(5) {
        r.push(chunk);
        loop {
            match r.next(&mut cipher) {
                Ok(Some(p)) => assert!(p.len() <= MAX_PLAINTEXT),
                Ok(None) | Err(_) => break,
            }
        }
    }
});
