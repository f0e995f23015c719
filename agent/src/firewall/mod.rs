//! The agent's own nftables table: SSH and the other mesh-only services only on the tunnel
//! interface, the closed ports shut on every other interface, and, on a subnet router,
//! forwarding from the tunnel into the advertised subnets only, masqueraded. `intended` is
//! pure (the ruleset as nftables JSON); `apply`, `live` and `check` run `nft` through the
//! nftables crate. The table is replaced in one transaction, never touches other tables,
//! and stays when the agent stops (fail closed).

pub mod watch;

use crate::error::{Error, Result};
use nftables::helper;
use nftables::schema::{NfListObject, NfObject, Nftables};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::IpAddr;
use vpn_contract::{AgentSettings, Protocol};

/// Our table, in the `inet` family (IPv4 and IPv6 at once).
pub const TABLE: &str = vpn_contract::NFT_TABLE;
pub const CHAIN: &str = "input";
pub const FORWARD: &str = "forward";
pub const POSTROUTING: &str = "postrouting";

/// What the table is made of: the settings, and the subnets we route into from the mesh
/// (tailscaled's `AdvertiseRoutes`; none: no forwarding chains at all).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Intent {
    pub settings: AgentSettings,
    pub routes: Vec<(IpAddr, u8)>,
}

impl Intent {
    pub fn of(settings: &AgentSettings, routes: &[(IpAddr, u8)]) -> Intent {
        Intent {
            settings: settings.clone(),
            routes: routes.to_vec(),
        }
    }
}

fn m(left: Value, right: Value) -> Value {
    json!({ "match": { "op": "==", "left": left, "right": right } })
}

fn not(left: Value, right: Value) -> Value {
    json!({ "match": { "op": "!=", "left": left, "right": right } })
}

fn prefix((ip, len): (IpAddr, u8)) -> Value {
    json!({ "prefix": { "addr": ip.to_string(), "len": len } })
}

fn addr(ip: IpAddr, field: &str) -> Value {
    let proto = if ip.is_ipv4() { "ip" } else { "ip6" };
    json!({ "payload": { "protocol": proto, "field": field } })
}

fn established() -> Value {
    json!({ "match": { "op": "in", "left": { "ct": { "key": "state" } }, "right": ["established", "related"] } })
}

/// One base chain of ours with its rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Chain {
    pub name: &'static str,
    pub kind: &'static str,
    pub prio: i32,
    pub policy: &'static str,
    pub rules: Vec<Vec<Value>>,
}

impl Chain {
    /// The chain as nft lists it (name, type, hook, priority, policy): what drift detection
    /// compares besides the rules. Each chain hooks where its name says.
    pub fn spec(&self) -> Value {
        json!({ "name": self.name, "type": self.kind, "hook": self.name, "prio": self.prio, "policy": self.policy })
    }
}

/// The mesh's own prefixes may only come in through the tunnel: as sources (tailscaled's
/// anti-spoofing rule) and as destinations (our mesh addresses, which a data-center host
/// could otherwise reach by routing the mesh range to our underlay address).
fn mesh_only_via_tunnel(interface: &str) -> Vec<Vec<Value>> {
    let mut out = vec![];
    for field in ["saddr", "daddr"] {
        for (ip, len) in crate::netlink::MESH_ROUTES {
            out.push(vec![
                not(json!({ "meta": { "key": "iifname" } }), json!(interface)),
                m(addr(*ip, field), prefix((*ip, *len))),
                json!({ "drop": null }),
            ]);
        }
    }
    out
}

/// The rules of our input chain, as nftables JSON statements, in order.
pub fn rules(s: &AgentSettings) -> Vec<Vec<Value>> {
    let dport = |p: Protocol| json!({ "payload": { "protocol": p.as_str(), "field": "dport" } });
    let ports = |p: &[u16]| {
        if p.len() == 1 {
            json!(p[0])
        } else {
            json!({ "set": p })
        }
    };
    let tunnel = || m(json!({ "meta": { "key": "iifname" } }), json!(s.interface));
    let mut out = vec![vec![
        m(json!({ "meta": { "key": "iif" } }), json!("lo")),
        json!({ "accept": null }),
    ]];
    out.extend(mesh_only_via_tunnel(&s.interface));
    out.push(vec![established(), json!({ "accept": null })]);
    let ssh = std::iter::once((Protocol::Tcp, s.ssh_port));
    for (proto, port) in ssh.chain(s.services.iter().map(|svc| (svc.protocol, svc.port))) {
        out.push(vec![
            tunnel(),
            m(dport(proto), json!(port)),
            json!({ "accept": null }),
        ]);
    }
    for proto in [Protocol::Tcp, Protocol::Udp] {
        let closed = s.closed_ports(proto);
        if !closed.is_empty() {
            out.push(vec![
                m(dport(proto), ports(&closed)),
                json!({ "drop": null }),
            ]);
        }
    }
    out
}

/// A subnet router's forward chain: from the tunnel into the routes, and the replies; nothing
/// else is forwarded (its policy is drop).
fn forward_rules(i: &Intent) -> Vec<Vec<Value>> {
    let tun = &i.settings.interface;
    let mut out: Vec<Vec<Value>> = i
        .routes
        .iter()
        .map(|&r| {
            vec![
                m(json!({ "meta": { "key": "iifname" } }), json!(tun)),
                m(addr(r.0, "daddr"), prefix(r)),
                json!({ "accept": null }),
            ]
        })
        .collect();
    out.push(vec![
        m(json!({ "meta": { "key": "oifname" } }), json!(tun)),
        established(),
        json!({ "accept": null }),
    ]);
    out
}

/// Masquerade what the mesh sends into the routes, as tailscaled does by default: hosts there
/// answer our own LAN address and need no route to the mesh.
fn postrouting_rules(i: &Intent) -> Vec<Vec<Value>> {
    i.routes
        .iter()
        .filter_map(|&r| {
            let mesh = crate::netlink::MESH_ROUTES
                .iter()
                .find(|(ip, _)| ip.is_ipv4() == r.0.is_ipv4())?;
            Some(vec![
                not(
                    json!({ "meta": { "key": "oifname" } }),
                    json!(i.settings.interface),
                ),
                m(addr(r.0, "saddr"), prefix(*mesh)),
                m(addr(r.0, "daddr"), prefix(r)),
                json!({ "masquerade": null }),
            ])
        })
        .collect()
}

/// Our chains with their rules: input always; forward and postrouting on a subnet router.
pub fn chains(i: &Intent) -> Vec<Chain> {
    let mut out = vec![Chain {
        name: CHAIN,
        kind: "filter",
        prio: 0,
        policy: "accept",
        rules: rules(&i.settings),
    }];
    if !i.routes.is_empty() {
        out.push(Chain {
            name: FORWARD,
            kind: "filter",
            prio: 0,
            policy: "drop",
            rules: forward_rules(i),
        });
        out.push(Chain {
            name: POSTROUTING,
            kind: "nat",
            prio: 100,
            policy: "accept",
            rules: postrouting_rules(i),
        });
    }
    out
}

/// The whole transaction: create the table if missing, delete it, create it anew with our
/// chains and rules. nft applies all of it or nothing.
pub fn intended(i: &Intent) -> Value {
    let table = json!({ "family": "inet", "name": TABLE });
    let mut cmds = vec![
        json!({ "add": { "table": table } }),
        json!({ "delete": { "table": table } }),
        json!({ "add": { "table": table } }),
    ];
    let chains = chains(i);
    for c in &chains {
        cmds.push(json!({ "add": { "chain": {
            "family": "inet", "table": TABLE, "name": c.name,
            "type": c.kind, "hook": c.name, "prio": c.prio, "policy": c.policy
        } } }));
    }
    for c in &chains {
        for expr in &c.rules {
            cmds.push(json!({ "add": { "rule": { "family": "inet", "table": TABLE, "chain": c.name, "expr": expr } } }));
        }
    }
    json!({ "nftables": cmds })
}

fn nft_err(e: impl std::fmt::Display) -> Error {
    Error::Firewall(format!("nft: {e}"))
}

/// Loads the intended table, atomically.
pub fn apply(i: &Intent) -> Result<()> {
    let ruleset: Nftables = serde_json::from_value(intended(i)).map_err(nft_err)?;
    helper::apply_ruleset(&ruleset).map_err(nft_err)
}

/// Our table as nft lists it: its chains (name, type, hook, priority, policy) and the rules
/// of each, by chain name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Live {
    pub chains: Vec<Value>,
    pub rules: BTreeMap<String, Vec<Vec<Value>>>,
}

/// The live state of our table (`None` when the table is missing).
pub fn live() -> Result<Option<Live>> {
    let args = ["list", "table", "inet", TABLE];
    let listed = match helper::get_current_ruleset_with_args(helper::DEFAULT_NFT, args) {
        Ok(r) => r,
        // nft says ENOENT when the table is not there.
        Err(helper::NftablesError::NftFailed { stderr, .. })
            if stderr.contains("No such file or directory") =>
        {
            return Ok(None);
        }
        Err(helper::NftablesError::NftFailed { stderr, .. }) => return Err(nft_err(stderr.trim())),
        Err(e) => return Err(nft_err(e)),
    };
    let mut live = Live::default();
    for obj in listed.objects.iter() {
        match obj {
            NfObject::ListObject(NfListObject::Rule(r)) => {
                let v = serde_json::to_value(&r.expr).map_err(nft_err)?;
                live.rules
                    .entry(r.chain.to_string())
                    .or_default()
                    .push(v.as_array().cloned().unwrap_or_default());
            }
            NfObject::ListObject(NfListObject::Chain(c)) => {
                let v = serde_json::to_value(c).map_err(nft_err)?;
                let keep = ["name", "type", "hook", "prio", "policy"];
                let picked: serde_json::Map<String, Value> = keep
                    .iter()
                    .filter_map(|k| Some((k.to_string(), v.get(*k)?.clone())))
                    .collect();
                live.chains.push(Value::Object(picked));
            }
            _ => {}
        }
    }
    Ok(Some(live))
}

/// How the live table differs from the intended one; empty when they agree. The chains
/// count as much as the rules: a policy of drop, another hook or a priority after a
/// table that accepts would change what the rules mean.
pub fn diff(intended: &[Chain], live: Option<&Live>) -> Vec<String> {
    let Some(live) = live else {
        return vec![format!("table inet {TABLE} is missing")];
    };
    let mut out = vec![];
    let specs: Vec<Value> = intended.iter().map(Chain::spec).collect();
    if live.chains != specs {
        out.push(format!(
            "chains: expected {}, found {}",
            Value::from(specs),
            Value::from(live.chains.clone())
        ));
    }
    let none = vec![];
    for c in intended {
        let have = live.rules.get(c.name).unwrap_or(&none);
        for (i, want) in c.rules.iter().enumerate() {
            match have.get(i) {
                Some(h) if h == want => {}
                Some(h) => out.push(format!(
                    "{} rule {i}: expected {}, found {}",
                    c.name,
                    Value::from(want.clone()),
                    Value::from(h.clone())
                )),
                None => out.push(format!(
                    "{} rule {i} is missing: {}",
                    c.name,
                    Value::from(want.clone())
                )),
            }
        }
        for (i, extra) in have.iter().enumerate().skip(c.rules.len()) {
            out.push(format!(
                "{} rule {i} is not ours: {}",
                c.name,
                Value::from(extra.clone())
            ));
        }
    }
    for (chain, rules) in &live.rules {
        if !intended.iter().any(|c| c.name == chain) {
            out.push(format!(
                "chain {chain} with {} rules is not ours",
                rules.len()
            ));
        }
    }
    out
}

/// Compares the live table with the intended one.
pub fn check(i: &Intent) -> Result<Vec<String>> {
    let live = live()?;
    Ok(diff(&chains(i), live.as_ref()))
}

/// Re-applies the table when it drifted; returns what differed.
pub fn restore_if_changed(i: &Intent) -> Result<Vec<String>> {
    let d = check(i)?;
    if !d.is_empty() {
        apply(i)?;
    }
    Ok(d)
}

#[cfg(test)]
mod tests;
