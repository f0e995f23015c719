//! Arbitrary bytes from a DERP server, before and after a valid login. Never a panic; the
//! client either consumes them or says what was wrong.
#![no_main]

use crypto_box::aead::Aead;
use libfuzzer_sys::fuzz_target;
use vpn_agent::derp::{self, Client};

fn logged_in() -> Client {
    let (ours, server) = (
        crypto_box::SecretKey::from([1; 32]),
        crypto_box::SecretKey::from([2; 32]),
    );
    let mut c = Client::new(ours.clone(), [3; 24], true);
    let mut key = b"DERP\xf0\x9f\x94\x91".to_vec();
    key.extend_from_slice(server.public_key().as_bytes());
    let sealed = crypto_box::SalsaBox::new(&ours.public_key(), &server)
        .encrypt(&[4u8; 24].into(), &b"{\"version\":2}"[..])
        .unwrap();
    let mut info = vec![4u8; 24];
    info.extend_from_slice(&sealed);
    let (mut w, mut ev) = (vec![], vec![]);
    c.receive(&derp::encode(derp::FRAME_SERVER_KEY, &key), &mut w, &mut ev)
        .unwrap();
    c.receive(&derp::encode(derp::FRAME_SERVER_INFO, &info), &mut w, &mut ev)
        .unwrap();
    assert!(c.is_ready());
    c
}

fuzz_target!(|data: &[u8]| {
    let (mut w, mut ev) = (vec![], vec![]);
    let mut fresh = Client::new(crypto_box::SecretKey::from([1; 32]), [0; 24], false);
    let _ = fresh.receive(data, &mut w, &mut ev);
    let mut ready = logged_in();
    // Split the input at an arbitrary point: frames may arrive in pieces.
    let cut = data.first().map_or(0, |b| *b as usize).min(data.len());
    if ready.receive(&data[..cut], &mut w, &mut ev).is_ok() {
        let _ = ready.receive(&data[cut..], &mut w, &mut ev);
    }
});
