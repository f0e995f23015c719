use super::*;

#[test]
fn the_mesh_config_userdata_gen_writes_reads_back() {
    for routes in [vec![], vec!["198.51.100.0/24".to_string()]] {
        let text = MeshConfig::for_node("https://hs.example:443", "m1", &routes);
        let m = MeshConfig::parse(&text).unwrap();
        assert_eq!(
            m,
            MeshConfig {
                server_url: "https://hs.example:443".into(),
                auth_key: Some(AuthKey::File(AUTH_KEY_PATH.into())),
                hostname: Some("m1".into()),
                enabled: true,
                accept_routes: false,
                advertise_routes: routes.iter().map(|r| subnet_route(r).unwrap()).collect(),
            }
        );
    }
}

#[test]
fn agent_settings_round_trip_and_refuse_unknown_fields() {
    let mut s = AgentSettings::default();
    let plain = serde_json::to_string(&s).unwrap();
    assert_eq!(
        plain,
        r#"{"version":1,"interface":"tailscale0","ssh_port":22,"closed_tcp_ports":[22],"listen_port":41641}"#,
        "the default file is what agents of every version read"
    );
    s.services
        .push("bmc-reverse-proxy:tcp/3333".parse().unwrap());
    s.bind_device = Some("vrf104009".into());
    let text = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<AgentSettings>(&text).unwrap(), s);
    // An agent that does not know a field refuses the file instead of ignoring what it asks.
    let future = plain.replace("}", r#","mesh_only_everything":true}"#);
    assert!(serde_json::from_str::<AgentSettings>(&future).is_err());
}

#[test]
fn secrets_do_not_print() {
    let s = Secret::new("hskey-auth-very-secret");
    assert_eq!(format!("{s} {s:?}"), "<redacted> Secret(<redacted>)");
    let k = AuthKey::Inline(s);
    assert!(!format!("{k:?}").contains("very-secret"));
}

#[test]
fn subnet_routes_are_networks_outside_the_mesh() {
    assert!(subnet_route("198.51.100.0/24").is_ok());
    assert!(subnet_route("2001:db8::/32").is_ok());
    assert!(subnet_route("198.51.100.7/32").is_ok());
    for (text, why) in [
        ("198.51.100.0", "not ip/len"),
        ("198.51.100.0/33", "prefix length"),
        ("0.0.0.0/0", "exit route"),
        ("::/0", "exit route"),
        ("198.51.100.1/24", "host bits"),
        ("100.64.0.0/10", "mesh"),
        ("100.0.0.0/8", "mesh"),
        ("100.100.1.0/24", "mesh"),
        ("fd7a:115c:a1e0::/64", "mesh"),
    ] {
        let e = subnet_route(text).unwrap_err();
        assert!(e.contains(why) && e.contains(text), "{text}: {e}");
    }
}

#[test]
fn services_parse_from_the_command_line_form() {
    let s: Service = "bmc-reverse-proxy:tcp/3333".parse().unwrap();
    assert_eq!(
        (s.name.as_str(), s.protocol, s.port),
        ("bmc-reverse-proxy", Protocol::Tcp, 3333)
    );
    for bad in ["x:tcp/0", "x:icmp/1", ":tcp/1", "x/1", "x:tcp/70000"] {
        assert!(bad.parse::<Service>().is_err(), "{bad}");
    }
}
