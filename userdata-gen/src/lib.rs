//! userdata-gen: what metal-api runs while it allocates a firewall.
//!
//! It will mint a single-use headscale pre-auth key and merge the vpn-agent's configuration
//! and systemd units into the user's own userdata. The library is empty until that issue
//! lands; it exists so the binary and the end-to-end suite can depend on it from the start.
