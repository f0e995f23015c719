//! The agent's own nftables table: SSH only on the tunnel interface, the closed ports shut on
//! every other interface. `intended` is pure (the ruleset as nftables JSON); `apply`, `live`
//! and `check` run `nft` through the nftables crate. The table is replaced in one
//! transaction, never touches other tables, and stays when the agent stops (fail closed).

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
    let mut out = vec![
        vec![
            m(json!({ "meta": { "key": "iif" } }), json!("lo")),
            json!({ "accept": null }),
        ],
        vec![
            json!({ "match": { "op": "in", "left": { "ct": { "key": "state" } }, "right": ["established", "related"] } }),
            json!({ "accept": null }),
        ],
        vec![
            m(json!({ "meta": { "key": "iifname" } }), json!(s.interface)),
            m(tcp_dport.clone(), json!(s.ssh_port)),
            json!({ "accept": null }),
        ],
    ];
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

/// The live rules of our table (`None` when the table is missing).
pub fn live() -> Result<Option<Vec<Vec<Value>>>> {
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
    let mut rules = vec![];
    for obj in listed.objects.iter() {
        if let NfObject::ListObject(NfListObject::Rule(r)) = obj {
            let v = serde_json::to_value(&r.expr).map_err(nft_err)?;
            rules.push(v.as_array().cloned().unwrap_or_default());
        }
    }
    Ok(Some(rules))
}

/// How the live table differs from the intended one; empty when they agree.
pub fn diff(intended: &[Vec<Value>], live: Option<&[Vec<Value>]>) -> Vec<String> {
    let Some(live) = live else {
        return vec![format!("table inet {TABLE} is missing")];
    };
    let mut out = vec![];
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
    Ok(diff(&rules(s), live.as_deref()))
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
        assert_eq!(parsed.objects.len(), 4 + 4);
        let r = rules(&s);
        assert_eq!(r[2][0]["match"]["right"], "tailscale0");
        assert_eq!(r[3][0]["match"]["right"], json!({ "set": [22, 2222] }));
        assert_eq!(r[3][1], json!({ "drop": null }));
    }

    #[test]
    fn diff_names_what_differs() {
        let s = AgentSettings::default();
        let want = rules(&s);
        assert!(diff(&want, Some(&want)).is_empty());
        assert_eq!(diff(&want, None), vec!["table inet vpn_agent is missing"]);
        let mut have = want.clone();
        have.pop();
        have.push(vec![json!({ "accept": null })]);
        have.push(vec![json!({ "drop": null })]);
        let d = diff(&want, Some(&have));
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].starts_with("rule 3: expected"));
        assert!(d[1].starts_with("rule 4 is not ours"));
    }
}
