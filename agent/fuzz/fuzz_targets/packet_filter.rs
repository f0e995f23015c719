//! A packet filter from arbitrary JSON, then arbitrary packets in and out through it. The
//! input is the filter sets' JSON up to the first zero byte, then packets, each a length
//! byte (its top bit: outbound) and that many bytes. Rules that do not parse are fine; panics are not, and no
//! filter may accept what allowing everything would not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use vpn_agent::filter::Filter;

fuzz_target!(|data: &[u8]| {
    let (json, mut rest) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(sets) = serde_json::from_slice::<BTreeMap<String, serde_json::Value>>(json) else {
        return;
    };
    let mut filter = Filter::from_sets(&sets).filter;
    let mut all = Filter::allow_all();
    while let Some((&head, tail)) = rest.split_first() {
        let len = usize::from(head & 0x7f).min(tail.len());
        let (packet, next) = tail.split_at(len);
        rest = next;
        if head & 0x80 != 0 {
            filter.note_out(packet);
        } else if filter.allow_in(packet) {
            assert!(
                all.allow_in(packet),
                "accepted what allow_all drops: {packet:?}"
            );
        }
    }
});
