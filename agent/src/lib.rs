//! vpn-agent: a Rust equivalent of `tailscaled` for bare-metal firewalls.
//!
//! Pure cores (`control::noise`, `control::record`, `control::netmap`, `derp`, `disco`, `stun`,
//! `wg`, `filter`, `dataplane` with `dataplane::path` and `dataplane::offload`, `backoff`) take
//! bytes, events and time and return results or actions; `control::client`, `control::conn`,
//! `derp::conn`, `dataplane::shell`, `dataplane::udp`, `netlink` and `daemon` move bytes.
//! Invariant: the pre-auth key and private keys never appear in logs or errors.

pub mod backoff;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod derp;
pub mod disco;
pub mod error;
pub mod filter;
pub mod firewall;
pub mod fsutil;
pub mod keys;
pub mod netlink;
pub mod status;
pub mod stun;
pub mod uplink;
pub mod wg;

pub use error::{Error, Result};
