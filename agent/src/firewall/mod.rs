//! The agent's own nftables table: SSH only on the tunnel interface, the closed ports shut on
//! every other interface. `intended` is pure (the ruleset as nftables JSON); `apply`, `live`
//! and `check` run `nft` through the nftables crate. The table is replaced in one
//! transaction, never touches other tables, and stays when the agent stops (fail closed).

pub mod watch;

use crate::error::{Error, Result};
use nftables::helper;
use nftables::schema::{NfListObject, NfObject, Nftables};
use serde_json::{Value, json};
use userdata_gen::payload::AgentSettings;

/// Our table, in the `inet` family (IPv4 and IPv6 at once).
pub const TABLE: &str = "vpn_agent";
pub const CHAIN: &str = "input";

fn m(left: Value, right: Value) -> Value {
    json!({ "match": { "op": "==", "left": left, "right": right } })
}

fn not(left: Value, right: Value) -> Value {
    json!({ "match": { "op": "!=", "left": left, "right": right } })
}

/// Our chain as nft lists it: what drift detection compares besides the rules.
pub fn chain() -> Value {
    json!({ "name": CHAIN, "type": "filter", "hook": "input", "prio": 0, "policy": "accept" })
}

/// The mesh's own prefixes may only come in through the tunnel: as sources (tailscaled's
/// anti-spoofing rule) and as destinations (our mesh addresses, which a data-center host
/// could otherwise reach by routing the mesh range to our underlay address).
fn mesh_only_via_tunnel(interface: &str) -> Vec<Vec<Value>> {
    let mut out = vec![];
    for field in ["saddr", "daddr"] {
        for (ip, len) in crate::netlink::MESH_ROUTES {
            let proto = if ip.is_ipv4() { "ip" } else { "ip6" };
            out.push(vec![
                not(json!({ "meta": { "key": "iifname" } }), json!(interface)),
                m(
                    json!({ "payload": { "protocol": proto, "field": field } }),
                    json!({ "prefix": { "addr": ip.to_string(), "len": len } }),
                ),
                json!({ "drop": null }),
            ]);
        }
    }
    out
}

/// The rules of our input chain, as nftables JSON statements, in order.
pub fn rules(s: &AgentSettings) -> Vec<Vec<Value>> {
    let tcp_dport = json!({ "payload": { "protocol": "tcp", "field": "dport" } });
    let ports = |p: &[u16]| {
        if p.len() == 1 {
            json!(p[0])
        } else {
            json!({ "set": p })
        }
    };
    let mut out = vec![vec![
        m(json!({ "meta": { "key": "iif" } }), json!("lo")),
        json!({ "accept": null }),
    ]];
    out.extend(mesh_only_via_tunnel(&s.interface));
    out.extend([
        vec![
            json!({ "match": { "op": "in", "left": { "ct": { "key": "state" } }, "right": ["established", "related"] } }),
            json!({ "accept": null }),
        ],
        vec![
            m(json!({ "meta": { "key": "iifname" } }), json!(s.interface)),
            m(tcp_dport.clone(), json!(s.ssh_port)),
            json!({ "accept": null }),
        ],
    ]);
    let mut closed = s.closed_tcp_ports.clone();
    closed.sort_unstable();
    closed.dedup();
    if !closed.is_empty() {
        out.push(vec![m(tcp_dport, ports(&closed)), json!({ "drop": null })]);
    }
    out
}

/// The whole transaction: create the table if missing, delete it, create it anew with our
/// chain and rules. nft applies all of it or nothing.
pub fn intended(s: &AgentSettings) -> Value {
    let table = json!({ "family": "inet", "name": TABLE });
    let mut cmds = vec![
        json!({ "add": { "table": table } }),
        json!({ "delete": { "table": table } }),
        json!({ "add": { "table": table } }),
        json!({ "add": { "chain": {
            "family": "inet", "table": TABLE, "name": CHAIN,
            "type": "filter", "hook": "input", "prio": 0, "policy": "accept"
        } } }),
    ];
    for expr in rules(s) {
        cmds.push(json!({ "add": { "rule": { "family": "inet", "table": TABLE, "chain": CHAIN, "expr": expr } } }));
    }
    json!({ "nftables": cmds })
}

fn nft_err(e: impl std::fmt::Display) -> Error {
    Error::Firewall(format!("nft: {e}"))
}

/// Loads the intended table, atomically.
pub fn apply(s: &AgentSettings) -> Result<()> {
    let ruleset: Nftables = serde_json::from_value(intended(s)).map_err(nft_err)?;
    helper::apply_ruleset(&ruleset).map_err(nft_err)
}

/// Our table as nft lists it: its chains (name, type, hook, priority, policy) and the rules.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Live {
    pub chains: Vec<Value>,
    pub rules: Vec<Vec<Value>>,
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
                live.rules.push(v.as_array().cloned().unwrap_or_default());
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

/// How the live table differs from the intended one; empty when they agree. The chain
/// counts as much as the rules: a policy of drop, another hook or a priority after a
/// table that accepts would change what the rules mean.
pub fn diff(intended: &[Vec<Value>], live: Option<&Live>) -> Vec<String> {
    let Some(live) = live else {
        return vec![format!("table inet {TABLE} is missing")];
    };
    let mut out = vec![];
    if live.chains != [chain()] {
        out.push(format!(
            "chains: expected only {}, found {}",
            chain(),
            Value::from(live.chains.clone())
        ));
    }
    let live = &live.rules;
    for (i, want) in intended.iter().enumerate() {
        match live.get(i) {
            Some(have) if have == want => {}
            Some(have) => out.push(format!(
                "rule {i}: expected {}, found {}",
                Value::from(want.clone()),
                Value::from(have.clone())
            )),
            None => out.push(format!(
                "rule {i} is missing: {}",
                Value::from(want.clone())
            )),
        }
    }
    for (i, extra) in live.iter().enumerate().skip(intended.len()) {
        out.push(format!(
            "rule {i} is not ours: {}",
            Value::from(extra.clone())
        ));
    }
    out
}

/// Compares the live table with the intended one.
pub fn check(s: &AgentSettings) -> Result<Vec<String>> {
    let live = live()?;
    Ok(diff(&rules(s), live.as_ref()))
}

/// Re-applies the table when it drifted; returns what differed.
pub fn restore_if_changed(s: &AgentSettings) -> Result<Vec<String>> {
    let d = check(s)?;
    if !d.is_empty() {
        apply(s)?;
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_parses_as_nftables_json() {
        let s = AgentSettings {
            closed_tcp_ports: vec![2222, 22, 22],
            ..AgentSettings::default()
        };
        let parsed: Nftables = serde_json::from_value(intended(&s)).unwrap();
        assert_eq!(parsed.objects.len(), 4 + 8);
        let r = rules(&s);
        // The mesh's prefixes only through the tunnel, sources then destinations.
        assert_eq!(r[1][0]["match"]["op"], "!=");
        assert_eq!(r[1][1]["match"]["left"]["payload"]["field"], "saddr");
        assert_eq!(
            r[1][1]["match"]["right"],
            json!({ "prefix": { "addr": "100.64.0.0", "len": 10 } })
        );
        assert_eq!(r[2][1]["match"]["left"]["payload"]["protocol"], "ip6");
        assert_eq!(r[4][1]["match"]["left"]["payload"]["field"], "daddr");
        assert_eq!(r[6][0]["match"]["right"], "tailscale0");
        assert_eq!(r[7][0]["match"]["right"], json!({ "set": [22, 2222] }));
        assert_eq!(r[7][1], json!({ "drop": null }));
    }

    #[test]
    fn diff_names_what_differs() {
        let s = AgentSettings::default();
        let want = rules(&s);
        let same = Live {
            chains: vec![chain()],
            rules: want.clone(),
        };
        assert!(diff(&want, Some(&same)).is_empty());
        assert_eq!(diff(&want, None), vec!["table inet vpn_agent is missing"]);
        let mut have = same.clone();
        have.rules.pop();
        have.rules.push(vec![json!({ "accept": null })]);
        have.rules.push(vec![json!({ "drop": null })]);
        let last = want.len() - 1;
        let d = diff(&want, Some(&have));
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].starts_with(&format!("rule {last}: expected")));
        assert!(d[1].starts_with(&format!("rule {} is not ours", last + 1)));
        // Same rules, another policy: drift too.
        let mut policy = same.clone();
        policy.chains[0]["policy"] = json!("drop");
        let d = diff(&want, Some(&policy));
        assert!(
            d.len() == 1 && d[0].starts_with("chains: expected"),
            "{d:?}"
        );
    }
}
