//! The JSON of tailscale's control protocol (tailcfg), as much as the agent uses. Go's field
//! names; unknown fields are ignored and `null` is accepted wherever Go may send it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The capability version we claim (tailcfg's `CapabilityVersion`): the newest whose
/// client obligations the agent meets, and no newer, because a control server that passes
/// it on to peers (`Node.Cap`) has them act on it. (headscale v0.27 to v0.29 do not: they
/// show each viewer its own version as every peer's; only their minimum gates us.)
///
/// - 111: a peer's home DERP comes in `HomeDERP` (read, with `DERPRegion` patches);
/// - 112: `AllowedIPs` absent means the node's `Addresses` ([`crate::daemon::PeerRoutes`]);
/// - 113: funnel state in `Hostinfo.IngressEnabled` (the agent runs no funnel, so absent
///   is right); the oldest headscale v0.29 accepts ([`MIN_CAPABILITY_VERSIONS`]).
///
/// Not 121 or later: tailscaled takes a peer with `Cap >= 121` for one that speaks peer
/// relay disco (`capVerIsRelayCapable`), and may pick it as a relay server; the agent
/// speaks none of it. The versions between 106 and 113 that ask for features the agent
/// does not offer (c2n, VIP services, capability sources in filters) are ones control
/// uses only when asked to: headscale sends no c2n, and a filter rule with a capability
/// source matches no packet here (fail closed).
pub const CAPABILITY_VERSION: u16 = 113;

/// The oldest capability version each supported headscale accepts
/// (`capver.MinSupportedCapabilityVersion`): the agent must claim at least each.
pub const MIN_CAPABILITY_VERSIONS: &[(&str, u16)] =
    &[("v0.27.1", 90), ("v0.28.0", 106), ("v0.29.2", 113)];

/// tailscaled treats a peer claiming this or later as able to serve and use peer relays.
pub const PEER_RELAY_CAPABILITY_VERSION: u16 = 121;

// Checked at compile time: a claim below a supported headscale's minimum, or one that
// promises peer relay, does not build.
const _: () = {
    let mut i = 0;
    while i < MIN_CAPABILITY_VERSIONS.len() {
        assert!(CAPABILITY_VERSION >= MIN_CAPABILITY_VERSIONS[i].1);
        i += 1;
    }
    assert!(CAPABILITY_VERSION < PEER_RELAY_CAPABILITY_VERSION);
};

#[derive(Debug, Clone, Serialize, Default)]
pub struct NetInfo {
    #[serde(rename = "PreferredDERP", skip_serializing_if = "is_zero")]
    pub preferred_derp: u32,
    #[serde(rename = "WorkingUDP", skip_serializing_if = "Option::is_none")]
    pub working_udp: Option<bool>,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Hostinfo {
    #[serde(rename = "IPNVersion")]
    pub ipn_version: String,
    #[serde(rename = "OS")]
    pub os: String,
    #[serde(rename = "Hostname")]
    pub hostname: String,
    /// The subnets we offer to route (`AdvertiseRoutes`); headscale lists them for an admin
    /// to approve.
    #[serde(rename = "RoutableIPs", skip_serializing_if = "Vec::is_empty")]
    pub routable_ips: Vec<String>,
    #[serde(rename = "GoArch")]
    pub arch: String,
    #[serde(rename = "NetInfo", skip_serializing_if = "Option::is_none")]
    pub net_info: Option<NetInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuthInfo {
    #[serde(rename = "AuthKey")]
    pub auth_key: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RegisterRequest {
    #[serde(rename = "Version")]
    pub version: u16,
    #[serde(rename = "NodeKey")]
    pub node_key: String,
    #[serde(rename = "OldNodeKey")]
    pub old_node_key: String,
    #[serde(rename = "Auth", skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthInfo>,
    #[serde(rename = "Expiry")]
    pub expiry: String,
    #[serde(rename = "Hostinfo")]
    pub hostinfo: Hostinfo,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct RegisterResponse {
    #[serde(rename = "MachineAuthorized")]
    pub machine_authorized: bool,
    #[serde(rename = "NodeKeyExpired")]
    pub node_key_expired: bool,
    #[serde(rename = "AuthURL")]
    pub auth_url: String,
    #[serde(rename = "Error")]
    pub error: String,
    #[serde(rename = "User")]
    pub user: Option<RegisterUser>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct RegisterUser {
    #[serde(rename = "DisplayName")]
    pub display_name: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct MapRequest {
    #[serde(rename = "Version")]
    pub version: u16,
    #[serde(rename = "Compress")]
    pub compress: String,
    #[serde(rename = "KeepAlive")]
    pub keep_alive: bool,
    #[serde(rename = "NodeKey")]
    pub node_key: String,
    #[serde(rename = "DiscoKey")]
    pub disco_key: String,
    #[serde(rename = "Stream")]
    pub stream: bool,
    #[serde(rename = "OmitPeers")]
    pub omit_peers: bool,
    #[serde(rename = "Hostinfo")]
    pub hostinfo: Hostinfo,
    #[serde(rename = "Endpoints", skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    #[serde(rename = "EndpointTypes", skip_serializing_if = "Vec::is_empty")]
    pub endpoint_types: Vec<u8>,
}

/// A node in the map (self or peer).
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct Node {
    #[serde(rename = "ID")]
    pub id: i64,
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Key")]
    pub key: String,
    #[serde(rename = "DiscoKey")]
    pub disco_key: String,
    #[serde(rename = "Addresses", deserialize_with = "null_vec")]
    pub addresses: Vec<String>,
    #[serde(rename = "AllowedIPs", deserialize_with = "null_vec")]
    pub allowed_ips: Vec<String>,
    #[serde(rename = "Endpoints", deserialize_with = "null_vec")]
    pub endpoints: Vec<String>,
    #[serde(rename = "HomeDERP")]
    pub home_derp: u32,
    #[serde(rename = "Online")]
    pub online: Option<bool>,
    #[serde(rename = "Tags", deserialize_with = "null_vec")]
    pub tags: Vec<String>,
    #[serde(rename = "User")]
    pub user: i64,
    /// When the node key expires (RFC 3339); Go's zero time or absent means never.
    #[serde(rename = "KeyExpiry", skip_serializing_if = "Option::is_none")]
    pub key_expiry: Option<String>,
    /// Set by control for a node whose key has expired.
    #[serde(rename = "Expired")]
    pub expired: bool,
}

/// A partial update of one peer.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct PeerChange {
    #[serde(rename = "NodeID")]
    pub node_id: i64,
    #[serde(rename = "DERPRegion")]
    pub derp_region: Option<u32>,
    #[serde(rename = "Endpoints")]
    pub endpoints: Option<Vec<String>>,
    #[serde(rename = "Key")]
    pub key: Option<String>,
    #[serde(rename = "DiscoKey")]
    pub disco_key: Option<String>,
    #[serde(rename = "Online")]
    pub online: Option<bool>,
    #[serde(rename = "KeyExpiry")]
    pub key_expiry: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct DerpNode {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "RegionID")]
    pub region_id: u32,
    #[serde(rename = "HostName")]
    pub host_name: String,
    #[serde(rename = "IPv4")]
    pub ipv4: String,
    #[serde(rename = "STUNPort")]
    pub stun_port: i32,
    #[serde(rename = "DERPPort")]
    pub derp_port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct DerpRegion {
    #[serde(rename = "RegionID")]
    pub region_id: u32,
    #[serde(rename = "RegionCode")]
    pub region_code: String,
    #[serde(rename = "Nodes", deserialize_with = "null_vec")]
    pub nodes: Vec<DerpNode>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct DerpMap {
    #[serde(rename = "Regions")]
    pub regions: BTreeMap<String, DerpRegion>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct MapResponse {
    #[serde(rename = "KeepAlive")]
    pub keep_alive: bool,
    #[serde(rename = "Node")]
    pub node: Option<Node>,
    #[serde(rename = "DERPMap")]
    pub derp_map: Option<DerpMap>,
    #[serde(rename = "Peers")]
    pub peers: Option<Vec<Node>>,
    #[serde(rename = "PeersChanged", deserialize_with = "null_vec")]
    pub peers_changed: Vec<Node>,
    #[serde(rename = "PeersRemoved", deserialize_with = "null_vec")]
    pub peers_removed: Vec<i64>,
    #[serde(rename = "PeersChangedPatch", deserialize_with = "null_vec")]
    pub peers_changed_patch: Vec<PeerChange>,
    /// The legacy single filter: tailscale treats it as the named set "base", applied before
    /// `PacketFilters`.
    #[serde(rename = "PacketFilter")]
    pub packet_filter: Option<serde_json::Value>,
    #[serde(rename = "PacketFilters")]
    pub packet_filters: Option<BTreeMap<String, Option<serde_json::Value>>>,
    #[serde(rename = "PingRequest")]
    pub ping_request: Option<PingRequest>,
}

/// Control asks the node to prove it is alive (tailcfg.PingRequest). With no `Types`, a
/// HEAD request to `URL` answers it.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct PingRequest {
    #[serde(rename = "URL")]
    pub url: String,
    #[serde(rename = "Types")]
    pub types: String,
    #[serde(rename = "Log")]
    pub log: bool,
    #[serde(rename = "IP")]
    pub ip: String,
}

fn null_vec<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

/// The zero time, Go's "not set".
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";
