//! Generation time without the network (`cargo xtask bench` runs this and writes the table
//! into the README). Prints one JSON object per case on stdout.

use std::time::{Duration, Instant};
use userdata_gen::{AgentSettings, Format, MeshSettings, Payload, Secret, Target, generate};

/// An Ignition 2.3.0 config of about `size` bytes: many user files, as a big firewall
/// userdata would have.
fn ignition_of(size: usize) -> String {
    let mut files = vec![];
    let mut len = 0;
    let mut i = 0;
    while len < size {
        let f = format!(
            r#"{{"filesystem":"root","path":"/etc/user/file-{i}","mode":420,"contents":{{"source":"data:,{}"}}}}"#,
            "x".repeat(200)
        );
        len += f.len() + 1;
        files.push(f);
        i += 1;
    }
    format!(
        r#"{{"ignition":{{"version":"2.3.0"}},"storage":{{"files":[{}]}}}}"#,
        files.join(",")
    )
}

fn cloud_config_of(size: usize) -> String {
    let mut s = String::from("#cloud-config\nwrite_files:\n");
    let mut i = 0;
    while s.len() < size {
        s.push_str(&format!(
            "  - path: /etc/user/file-{i}\n    content: {}\n",
            "x".repeat(200)
        ));
        i += 1;
    }
    s.push_str("runcmd:\n  - echo done\n");
    s
}

fn measure(name: &str, input: &str, payload: &Payload) {
    let fresh = Format::Ignition(userdata_gen::ignition::DEFAULT_SPEC);
    let run = || generate(input.as_bytes(), payload, fresh, Target::MetalStackV036).unwrap();
    run();
    let mut samples = vec![];
    let start = Instant::now();
    while samples.len() < 20 || (start.elapsed() < Duration::from_secs(2) && samples.len() < 2000) {
        let t = Instant::now();
        std::hint::black_box(run());
        samples.push(t.elapsed());
    }
    samples.sort();
    let p = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    println!(
        r#"{{"case":"{name}","input_bytes":{},"runs":{},"median_ms":{:.3},"p95_ms":{:.3}}}"#,
        input.len(),
        samples.len(),
        p(0.5),
        p(0.95)
    );
}

fn main() {
    let payload = Payload::new(
        &MeshSettings {
            login_server: "https://headscale.example:443".into(),
            hostname: "0cfc7e24-aaaa-4bbb-8ccc-000000000001".into(),
            ca_pem: None,
            vrf: None,
            advertise_routes: vec![],
            agent: AgentSettings::default(),
            agent_binary: None,
        },
        &Secret::new("hskey-auth-bench"),
    );
    measure("ignition-2.3.0, 1 KiB", &ignition_of(1024), &payload);
    measure("ignition-2.3.0, 1 MiB", &ignition_of(1 << 20), &payload);
    measure("cloud-config, 1 KiB", &cloud_config_of(1024), &payload);
    measure("cloud-config, 1 MiB", &cloud_config_of(1 << 20), &payload);
}
