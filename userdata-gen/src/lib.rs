//! userdata-gen: what metal-api runs while it allocates a firewall.
//!
//! It mints a single-use headscale pre-auth key ([`headscale`]) and merges the vpn-agent's
//! configuration and systemd units ([`payload`]) into the user's own userdata ([`userdata`]:
//! Ignition 2.x or 3.x via [`ignition`], cloud-config via [`cloud_config`], or none), keeping
//! everything the user wrote.
//!
//! The merge is pure: [`generate`] takes the user's bytes, the settings and the key and
//! returns the new bytes and a report; it does no IO. The binary reads files, calls headscale
//! and writes the output, all or nothing.
//!
//! Invariant: the pre-auth key and the API key never appear in errors, logs or metadata;
//! they travel as [`Secret`], whose `Debug` and `Display` are redacted.

pub mod cloud_config;
pub mod error;
#[cfg(feature = "client")]
pub mod headscale;
pub mod ignition;
pub mod payload;
pub mod userdata;

pub use error::{Error, Result};
pub use payload::{AgentSettings, MeshSettings, Payload, Secret};
pub use userdata::{Encoding, Format, Generated, Target, generate};
