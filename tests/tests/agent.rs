//! vpn-agent against real headscale: registration with a key minted by userdata-gen, from
//! the files real Ignition wrote, restarts without a key, and refusals.

use std::time::Duration;
use vdc::firewall::{AGENT_LOG, provision, start_agent, wait_online};
use vdc::headscale::KeyOptions;
use vdc::{Lab, LabOptions, require_lab};

const MACHINE: &str = "0cfc7e24-aaaa-4bbb-8ccc-0000000000f1";

#[test]
fn agent_joins_with_the_generated_userdata_and_rejoins_without_a_key() {
    require_lab!();
    let lab = Lab::start(LabOptions::hosts(&["fw"])).unwrap();
    let fw = provision(&lab, "fw", MACHINE, "project-a", &[]).unwrap();
    let key_file = fw.root.join("etc/vpn-agent/authkey");
    assert!(key_file.exists());

    start_agent(&lab, "fw", &fw.root).unwrap();
    let node = wait_online(&lab, "fw", MACHINE).unwrap();
    assert_eq!(node.user, "project-a");
    assert_eq!(node.addresses.len(), 2, "{node:?}");
    lab.wait_log(
        "fw",
        AGENT_LOG,
        "used pre-auth key scrubbed",
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(!key_file.exists(), "the used key is still on disk");
    let log = lab.log("fw", AGENT_LOG);
    let key = fw.root.join("var/lib/vpn-agent/identity.json");
    assert!(
        !log.contains("hskey-auth-"),
        "the key is in the log:\n{log}"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // A restart (the key is gone) re-attaches the same node: headscale keeps one, not two.
    lab.stop("fw", AGENT_LOG).unwrap();
    lab.headscale()
        .wait_nodes("the agent offline", Duration::from_secs(30), |n| {
            n.iter().all(|n| !n.online)
        })
        .unwrap();
    start_agent(&lab, "fw", &fw.root).unwrap();
    let again = wait_online(&lab, "fw", MACHINE).unwrap();
    assert_eq!(again.id, node.id);
    assert_eq!(again.addresses, node.addresses);
    lab.wait_log(
        "fw",
        AGENT_LOG,
        "re-attached to headscale",
        Duration::from_secs(10),
    )
    .unwrap();
}

#[test]
fn refused_keys_say_why_and_back_off() {
    require_lab!();
    let lab = Lab::start(LabOptions::hosts(&["fw"])).unwrap();
    let hs = lab.headscale();
    let fw = provision(&lab, "fw", MACHINE, "project-b", &[]).unwrap();
    let key_file = fw.root.join("etc/vpn-agent/authkey");
    let user = hs.create_user("other").unwrap();
    let cases = [
        ("already used", {
            let k = hs
                .create_preauth_key(&user, &KeyOptions::default())
                .unwrap();
            let ts = lab.start_tailscaled("fw").unwrap();
            ts.up(&hs.url(), &k.key, "first").unwrap();
            lab.stop("fw", "tailscaled").unwrap();
            k.key
        }),
        ("expired", {
            let k = hs
                .create_preauth_key(
                    &user,
                    &KeyOptions {
                        expiration: Duration::from_secs(1),
                        ..KeyOptions::default()
                    },
                )
                .unwrap();
            std::thread::sleep(Duration::from_secs(2));
            k.key
        }),
        (
            "does not know this pre-auth key",
            format!("hskey-auth-{}-{}", "a".repeat(12), "b".repeat(64)),
        ),
    ];
    for (i, (want, key)) in cases.into_iter().enumerate() {
        std::fs::write(&key_file, &key).unwrap();
        let state = fw.root.join("var/lib/vpn-agent");
        let _ = std::fs::remove_dir_all(&state);
        start_agent(&lab, "fw", &fw.root).unwrap();
        let log = lab
            .wait_log(
                "fw",
                AGENT_LOG,
                "headscale refused the registration",
                Duration::from_secs(20),
            )
            .unwrap();
        assert!(log.contains(want), "case {i}: {log}");
        assert!(log.contains("retry_in="), "case {i}: no backoff in {log}");
        assert!(!log.contains(&key), "case {i}: the key is in the log");
        lab.stop("fw", AGENT_LOG).unwrap();
    }
}
