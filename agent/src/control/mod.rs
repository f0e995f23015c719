//! The control plane: tailscale's ts2021 protocol to headscale. `noise`, `record`, `types`, `cache`
//! and `netmap` are pure; `conn` and `client` move bytes.

pub mod cache;
pub mod client;
pub mod conn;
pub mod netmap;
pub mod noise;
pub mod record;
pub mod types;
