//! Arbitrary map messages: as zstd frames and as JSON, applied to a netmap. Errors are fine;
//! panics are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vpn_agent::control::client::decode_map_message;
use vpn_agent::control::netmap::Netmap;
use vpn_agent::control::types::MapResponse;

fuzz_target!(|data: &[u8]| {
    let mut m = Netmap::default();
    if let Ok(r) = decode_map_message(data) {
        m.apply(r);
    }
    if let Ok(r) = serde_json::from_slice::<MapResponse>(data) {
        m.apply(r);
        let _ = vpn_agent::netlink::plan(&m.addresses());
    }
});
