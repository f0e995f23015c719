//! The packet filter from the map (`PacketFilters`), enforced on packets arriving from
//! peers, as tailscaled does. Pure: packets in, verdicts out.
//!
//! STUB: allows everything until the real filter lands.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Default)]
pub struct Filter {}

impl Filter {
    /// Everything passes (before the first map, and headscale's default policy).
    pub fn allow_all() -> Filter {
        Filter {}
    }

    /// The effective filter of the netmap's named sets (their concatenation, by name).
    pub fn from_sets(_sets: &BTreeMap<String, serde_json::Value>) -> Result<Filter, String> {
        Ok(Filter {})
    }

    /// Whether an IP packet that arrived from a peer may be delivered.
    pub fn allow_in(&mut self, _packet: &[u8]) -> bool {
        true
    }

    /// Notes a packet we send to a peer, so that its replies pass.
    pub fn note_out(&mut self, _packet: &[u8]) {}
}
