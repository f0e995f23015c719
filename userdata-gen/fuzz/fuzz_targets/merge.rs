//! Arbitrary userdata through the whole merge path: decoding, classification, the Ignition
//! and cloud-config merges. It must never panic; what it accepts must hold our additions.
#![no_main]

use libfuzzer_sys::fuzz_target;
use userdata_gen::{AgentSettings, Format, MeshSettings, Payload, Secret, Target, generate};

fuzz_target!(|data: &[u8]| {
    let settings = MeshSettings {
        login_server: "https://headscale.example:443".into(),
        hostname: "fuzz".into(),
        ca_pem: None,
        vrf: None,
        advertise_routes: vec![],
        agent: AgentSettings::default(),
        // Half the inputs with a pinned remote binary and its CA: the other merge path.
        agent_binary: (data.len() % 2 == 1).then(|| {
            userdata_gen::payload::RemoteBinary::new(
                "https://repo.example/vpn-agent",
                &"0".repeat(128),
                Some("-----BEGIN CERTIFICATE-----\n".into()),
            )
            .expect("a valid remote binary")
        }),
    };
    let payload = Payload::new(&settings, &Secret::new("hskey-auth-fuzz"));
    let fresh = Format::Ignition(userdata_gen::ignition::DEFAULT_SPEC);
    if let Ok(out) = generate(data, &payload, fresh, Target::MetalStackV036) {
        let (text, _) = userdata_gen::userdata::decode(&out.bytes).expect("our output decodes");
        match out.format {
            Format::Ignition(_) => {
                let v: serde_json::Value = serde_json::from_str(&text).expect("our output is JSON");
                let files = v["storage"]["files"].as_array().expect("files list");
                assert!(files.iter().any(|f| f["path"] == "/etc/vpn-agent/authkey"));
            }
            Format::CloudConfig => assert!(text.contains("/etc/vpn-agent/authkey")),
        }
    }
});
