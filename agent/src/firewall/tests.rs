use super::*;

fn route(text: &str) -> (IpAddr, u8) {
    vpn_contract::subnet_route(text).unwrap()
}

#[test]
fn the_ruleset_parses_as_nftables_json() {
    let s = AgentSettings {
        closed_tcp_ports: vec![2222, 22, 22],
        ..AgentSettings::default()
    };
    let i = Intent::of(&s, &[]);
    let parsed: Nftables = serde_json::from_value(intended(&i)).unwrap();
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
    assert_eq!(chains(&i).len(), 1, "no forwarding chains without routes");
}

#[test]
fn mesh_only_services_are_accepted_on_the_tunnel_and_dropped_elsewhere() {
    let mut s = AgentSettings::default();
    s.services
        .push("bmc-reverse-proxy:tcp/3333".parse().unwrap());
    s.services.push("syslog:udp/514".parse().unwrap());
    let r = rules(&s);
    let accepts: Vec<_> = r
        .iter()
        .filter(|r| {
            r[0]["match"]["right"] == "tailscale0" && r.last() == Some(&json!({ "accept": null }))
        })
        .map(|r| {
            (
                r[1]["match"]["left"]["payload"]["protocol"].clone(),
                r[1]["match"]["right"].clone(),
            )
        })
        .collect();
    assert_eq!(
        accepts,
        [
            (json!("tcp"), json!(22)),
            (json!("tcp"), json!(3333)),
            (json!("udp"), json!(514))
        ]
    );
    let drops: Vec<_> = r[r.len() - 2..]
        .iter()
        .map(|r| r[0]["match"].clone())
        .collect();
    assert_eq!(drops[0]["left"]["payload"]["protocol"], "tcp");
    assert_eq!(drops[0]["right"], json!({ "set": [22, 3333] }));
    assert_eq!(drops[1]["left"]["payload"]["protocol"], "udp");
    assert_eq!(drops[1]["right"], json!(514));
    assert!(
        r[r.len() - 2..]
            .iter()
            .all(|r| r[1] == json!({ "drop": null }))
    );
}

#[test]
fn a_subnet_router_forwards_only_from_the_tunnel_into_its_routes_and_masquerades() {
    let i = Intent::of(
        &AgentSettings::default(),
        &[route("198.51.100.0/24"), route("2001:db8::/32")],
    );
    let c = chains(&i);
    let names: Vec<_> = c.iter().map(|c| (c.name, c.kind, c.policy)).collect();
    assert_eq!(
        names,
        [
            ("input", "filter", "accept"),
            ("forward", "filter", "drop"),
            ("postrouting", "nat", "accept")
        ]
    );
    let fwd = &c[1].rules;
    assert_eq!(fwd.len(), 3);
    assert_eq!(fwd[0][0]["match"]["right"], "tailscale0");
    assert_eq!(
        fwd[0][1]["match"]["right"],
        json!({ "prefix": { "addr": "198.51.100.0", "len": 24 } })
    );
    assert_eq!(fwd[1][1]["match"]["left"]["payload"]["protocol"], "ip6");
    assert_eq!(fwd[2][0]["match"]["left"]["meta"]["key"], "oifname");
    let nat = &c[2].rules;
    assert_eq!(nat.len(), 2);
    assert_eq!(
        nat[0][1]["match"]["right"],
        json!({ "prefix": { "addr": "100.64.0.0", "len": 10 } })
    );
    assert_eq!(
        nat[1][1]["match"]["right"]["prefix"]["addr"],
        "fd7a:115c:a1e0::"
    );
    assert!(
        nat.iter()
            .all(|r| r.last() == Some(&json!({ "masquerade": null })))
    );
    let parsed: Nftables = serde_json::from_value(intended(&i)).unwrap();
    let rule_count: usize = c.iter().map(|c| c.rules.len()).sum();
    assert_eq!(parsed.objects.len(), 3 + 3 + rule_count);
}

#[test]
fn diff_names_what_differs() {
    let i = Intent::default();
    let want = chains(&i);
    let same = Live {
        chains: want.iter().map(Chain::spec).collect(),
        rules: want
            .iter()
            .map(|c| (c.name.to_string(), c.rules.clone()))
            .collect(),
    };
    assert!(diff(&want, Some(&same)).is_empty());
    assert_eq!(diff(&want, None), vec!["table inet vpn_agent is missing"]);
    let mut have = same.clone();
    let input = have.rules.get_mut(CHAIN).unwrap();
    input.pop();
    input.push(vec![json!({ "accept": null })]);
    input.push(vec![json!({ "drop": null })]);
    let last = want[0].rules.len() - 1;
    let d = diff(&want, Some(&have));
    assert_eq!(d.len(), 2, "{d:?}");
    assert!(d[0].starts_with(&format!("input rule {last}: expected")));
    assert!(d[1].starts_with(&format!("input rule {} is not ours", last + 1)));
    // Same rules, another policy: drift too.
    let mut policy = same.clone();
    policy.chains[0]["policy"] = json!("drop");
    let d = diff(&want, Some(&policy));
    assert!(
        d.len() == 1 && d[0].starts_with("chains: expected"),
        "{d:?}"
    );
    // A forward chain someone added to our table is drift as well.
    let mut extra = same.clone();
    extra
        .rules
        .insert("forward".into(), vec![vec![json!({ "accept": null })]]);
    let d = diff(&want, Some(&extra));
    assert_eq!(d, ["chain forward with 1 rules is not ours"]);
}
