//! Two engines on a simulated network: a UDP link that can be cut, and a DERP relay.

use super::*;

const A: &str = "192.0.2.11:41641";
const B: &str = "192.0.2.12:41641";

fn counter_rng(seed: u8) -> Rng {
    let mut n = 0u64;
    Box::new(move |b| {
        n += 1;
        for (i, x) in b.iter_mut().enumerate() {
            *x = seed ^ (n.wrapping_mul(31).wrapping_add(i as u64) as u8);
        }
    })
}

struct Node {
    e: Engine,
    key: [u8; 32],
    addr: SocketAddr,
    delivered: Vec<Vec<u8>>,
}

fn node(seed: u8, addr: &str) -> (Node, PeerInfo, String) {
    let node_secret = StaticSecret::from([seed; 32]);
    let disco = crypto_box::SecretKey::from([seed + 100; 32]);
    let key = *PublicKey::from(&node_secret).as_bytes();
    let info = PeerInfo {
        node_key: key,
        disco_key: Some(*disco.public_key().as_bytes()),
        allowed: vec![(format!("100.64.0.{seed}").parse().unwrap(), 32)],
        endpoints: vec![addr.parse().unwrap()],
        home_derp: 999,
    };
    let mut e = Engine::new(node_secret, disco, counter_rng(seed));
    e.set_local_endpoints(vec![addr.parse().unwrap()]);
    e.set_derp_map(vec![Region {
        id: 999,
        code: "headscale".into(),
        stun: Some("192.0.2.1:3478".parse().unwrap()),
    }]);
    let n = Node {
        e,
        key,
        addr: addr.parse().unwrap(),
        delivered: vec![],
    };
    (n, info, format!("100.64.0.{seed}"))
}

struct Net {
    a: Node,
    b: Node,
    udp_blocked: bool,
    now: Instant,
    udp_sent: usize,
    derp_sent: usize,
}

fn icmp(src: &str, dst: &str) -> Vec<u8> {
    let (s, d): (Ipv4Addr, Ipv4Addr) = (src.parse().unwrap(), dst.parse().unwrap());
    let mut p = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0];
    p.extend_from_slice(&s.octets());
    p.extend_from_slice(&d.octets());
    p.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0]);
    p
}

impl Net {
    fn new() -> Net {
        let (mut a, ia, _) = node(1, A);
        let (mut b, ib, _) = node(2, B);
        a.e.set_peers(vec![ib]);
        b.e.set_peers(vec![ia]);
        a.e.set_filter(crate::filter::Filter::allow_all());
        b.e.set_filter(crate::filter::Filter::allow_all());
        Net {
            a,
            b,
            udp_blocked: true,
            now: Instant::now(),
            udp_sent: 0,
            derp_sent: 0,
        }
    }

    /// Delivers actions until the network is quiet. `from_a` says who produced `out`.
    fn deliver(&mut self, mut queue: Vec<(bool, Action)>) {
        for _ in 0..50 {
            if queue.is_empty() {
                return;
            }
            let mut next = vec![];
            for (from_a, act) in queue.drain(..) {
                let (src, dst) = if from_a {
                    (&mut self.a, &mut self.b)
                } else {
                    (&mut self.b, &mut self.a)
                };
                let mut out = vec![];
                match act {
                    Action::WriteTun(p) => src.delivered.push(p),
                    Action::SendUdp(to, p) if to == dst.addr => {
                        self.udp_sent += 1;
                        if !self.udp_blocked {
                            dst.e.on_udp(src.addr, &p, self.now, &mut out);
                        }
                    }
                    Action::SendUdp(..) => {} // STUN: no server here
                    Action::SendDerp { region, to, packet } => {
                        assert_eq!((region, to), (999, dst.key));
                        self.derp_sent += 1;
                        dst.e.on_derp(999, src.key, &packet, self.now, &mut out);
                    }
                }
                next.extend(out.into_iter().map(|a| (!from_a, a)));
            }
            queue = next;
        }
        panic!("the network never went quiet");
    }

    fn send_a_to_b(&mut self) {
        let mut out = vec![];
        self.a
            .e
            .on_tun(&icmp("100.64.0.1", "100.64.0.2"), self.now, &mut out);
        self.deliver(out.into_iter().map(|a| (true, a)).collect());
    }

    fn tick(&mut self, d: Duration) {
        self.now += d;
        let (mut oa, mut ob) = (vec![], vec![]);
        self.a.e.tick(self.now, &mut oa);
        self.b.e.tick(self.now, &mut ob);
        let mut q: Vec<_> = oa.into_iter().map(|a| (true, a)).collect();
        q.extend(ob.into_iter().map(|a| (false, a)));
        self.deliver(q);
    }

    fn path_of_b(&self) -> Option<String> {
        self.a.e.stats(self.now)[&self.b.key].path.clone()
    }
}

#[test]
fn derp_first_then_direct_then_derp_again_without_losing_the_tunnel() {
    let mut n = Net::new();
    // UDP blocked: the handshake and the packet go through DERP.
    n.send_a_to_b();
    assert_eq!(n.b.delivered.len(), 1, "delivered via DERP");
    assert_eq!(n.path_of_b().as_deref(), Some("DERP(headscale)"));
    // Discovery runs on ticks but pings get no pongs.
    n.tick(Duration::from_millis(250));
    assert_eq!(n.path_of_b().as_deref(), Some("DERP(headscale)"));
    // UDP opens: the next discovery round proves the direct path.
    n.udp_blocked = false;
    n.tick(path::DISCOVERY);
    assert_eq!(n.path_of_b().as_deref(), Some(B));
    let derp_before = n.derp_sent;
    n.send_a_to_b();
    assert_eq!(n.b.delivered.len(), 2);
    assert_eq!(n.derp_sent, derp_before, "a trusted direct path skips DERP");
    // UDP breaks: trust lapses, traffic falls back to DERP with the same session.
    n.udp_blocked = true;
    n.tick(path::TRUST);
    assert_eq!(n.path_of_b().as_deref(), Some("DERP(headscale)"));
    n.send_a_to_b();
    assert_eq!(n.b.delivered.len(), 3);
    let st = &n.a.e.stats(n.now)[&n.b.key];
    assert!(st.last_handshake.is_some() && st.tx_bytes > 0);
}

#[test]
fn call_me_maybe_makes_the_other_side_ping() {
    let mut n = Net::new();
    n.udp_blocked = false;
    // A's first send starts a discovery round: pings to B and call-me-maybe via DERP.
    n.send_a_to_b();
    n.tick(Duration::from_millis(1));
    assert_eq!(n.path_of_b().as_deref(), Some(B));
    // B learned A's path from the call-me-maybe pings without sending data itself.
    assert_eq!(
        n.b.e.stats(n.now)[&n.a.key].path.as_deref(),
        Some(A),
        "B pinged A back"
    );
}

#[test]
fn strangers_and_forgeries_get_nothing() {
    let (mut a, _, _) = node(1, A);
    let (stranger, _, _) = node(3, "192.0.2.13:41641");
    let ping = disco::seal(
        &crypto_box::SecretKey::from([103; 32]),
        &a.e.disco.public_key(),
        [0; 24],
        &Message::Ping {
            tx_id: [1; 12],
            node_key: stranger.key,
        },
    );
    let mut out = vec![];
    a.e.on_udp(stranger.addr, &ping, Instant::now(), &mut out);
    a.e.on_derp(999, stranger.key, &ping, Instant::now(), &mut out);
    a.e.on_udp(stranger.addr, &[1, 0, 0, 0, 9, 9], Instant::now(), &mut out);
    a.e.on_derp(999, [0; 32], &[], Instant::now(), &mut out);
    assert!(out.is_empty(), "{out:?}");
    a.delivered.clear();
}

#[test]
fn stun_learns_our_mapped_address_and_the_home_region() {
    let (mut a, _, _) = node(1, A);
    let now = Instant::now();
    a.e.set_derp_map(vec![
        Region {
            id: 1,
            code: "far".into(),
            stun: Some("198.51.100.1:3478".parse().unwrap()),
        },
        Region {
            id: 2,
            code: "near".into(),
            stun: Some("203.0.113.1:3478".parse().unwrap()),
        },
    ]);
    assert_eq!(a.e.net_info().home_derp, 1, "first region until measured");
    let mut out = vec![];
    a.e.tick(now, &mut out);
    let reqs: Vec<(SocketAddr, Vec<u8>)> = out
        .into_iter()
        .filter_map(|x| match x {
            Action::SendUdp(to, p) if disco::classify(&p) == Kind::Stun => Some((to, p)),
            _ => None,
        })
        .collect();
    assert_eq!(reqs.len(), 2);
    let mapped: SocketAddr = "203.0.113.2:61000".parse().unwrap();
    // The near region answers first, the far one much later.
    for (i, (_, req)) in reqs.iter().enumerate().rev() {
        let tx: [u8; 12] = req[8..20].try_into().unwrap();
        let at = now + Duration::from_millis(if i == 0 { 90 } else { 5 });
        a.e.on_udp(reqs[i].0, &stun_response(tx, mapped), at, &mut vec![]);
    }
    let info = a.e.net_info();
    assert_eq!(info.home_derp, 2);
    assert_eq!(
        info.endpoints,
        vec![
            (A.parse().unwrap(), ENDPOINT_LOCAL),
            (mapped, ENDPOINT_STUN)
        ]
    );
}

fn stun_response(tx: [u8; 12], a: SocketAddr) -> Vec<u8> {
    let SocketAddr::V4(a) = a else { panic!() };
    let cookie = [0x21, 0x12, 0xa4, 0x42];
    let mut v = vec![0, 1];
    v.extend_from_slice(&(a.port() ^ 0x2112).to_be_bytes());
    v.extend(a.ip().octets().iter().zip(cookie).map(|(x, k)| x ^ k));
    let mut p = vec![1, 1, 0, 12];
    p.extend_from_slice(&cookie);
    p.extend_from_slice(&tx);
    p.extend_from_slice(&[0, 0x20, 0, 8]);
    p.extend(v);
    p
}

#[test]
fn nothing_reaches_the_host_before_a_policy_and_then_only_what_parses() {
    let mut n = Net::new();
    n.b.e.set_filter(crate::filter::Filter::default());
    n.send_a_to_b();
    assert!(n.b.delivered.is_empty(), "delivered before any policy");
    let sets = |rules: serde_json::Value| {
        let sets = serde_json::from_value(serde_json::json!({ "base": rules })).unwrap();
        crate::filter::Filter::from_sets(&sets)
    };
    // A rule that would open everything, but does not parse (host bits set), and a rule
    // that opens port 22 of b to a (which lets ICMP through, as in tailscale).
    let bad = serde_json::json!({"SrcIPs":["*"],"DstPorts":[{"IP":"100.64.0.2/24","Ports":{"First":0,"Last":65535}}]});
    let good = serde_json::json!({"SrcIPs":["100.64.0.1"],"DstPorts":[{"IP":"100.64.0.2","Ports":{"First":22,"Last":22}}]});
    let only_bad = sets(serde_json::json!([bad.clone()]));
    assert_eq!(only_bad.skipped.len(), 1);
    n.b.e.set_filter(only_bad.filter);
    n.send_a_to_b();
    assert!(
        n.b.delivered.is_empty(),
        "the unparsable rule let a packet in"
    );
    let both = sets(serde_json::json!([bad, good]));
    assert_eq!(both.skipped.len(), 1, "{:?}", both.skipped);
    n.b.e.set_filter(both.filter);
    n.send_a_to_b();
    assert_eq!(n.b.delivered, vec![icmp("100.64.0.1", "100.64.0.2")]);
}

/// b restarts with the same keys and no session (control is away: a never hears of it).
fn restart_b(n: &mut Net) {
    let (mut b, _, _) = node(2, B);
    let (_, ia, _) = node(1, A);
    b.e.set_peers(vec![ia]);
    b.e.set_filter(crate::filter::Filter::allow_all());
    n.b = b;
}

#[test]
fn data_for_a_session_lost_in_a_restart_is_answered_with_a_handshake() {
    for udp in [false, true] {
        let mut n = Net::new();
        n.send_a_to_b();
        if udp {
            n.udp_blocked = false;
            n.tick(path::DISCOVERY);
            assert_eq!(n.path_of_b().as_deref(), Some(B));
        }
        assert_eq!(n.b.delivered.len(), 1);
        restart_b(&mut n);
        // a's packet is lost, but b answers it with a handshake (direct: to where the data
        // came from; via DERP: to the node that sent it)...
        n.send_a_to_b();
        assert!(n.b.delivered.is_empty());
        // ...so the next one arrives, not only after a's own rekey timers.
        n.send_a_to_b();
        assert_eq!(
            n.b.delivered.len(),
            1,
            "udp {udp}: the session was not rebuilt"
        );
    }
}

#[test]
fn junk_data_from_an_unknown_address_starts_no_handshake() {
    let mut n = Net::new();
    let mut junk = vec![4u8, 0, 0, 0];
    junk.extend_from_slice(&[7u8; 60]);
    let mut out = vec![];
    n.b.e.on_udp(
        "198.51.100.7:41641".parse().unwrap(),
        &junk,
        n.now,
        &mut out,
    );
    assert!(out.is_empty(), "{out:?}");
    // From the peer's known endpoint it does, once per rekey interval.
    n.b.e.on_udp(A.parse().unwrap(), &junk, n.now, &mut out);
    assert_eq!(out.len(), 1);
    n.b.e.on_udp(A.parse().unwrap(), &junk, n.now, &mut out);
    assert_eq!(out.len(), 1, "a second handshake while one is under way");
}

/// A peer as a large tailnet's other nodes look: its own key and address, no traffic.
fn bystander(i: u16) -> PeerInfo {
    let secret = StaticSecret::from([(i % 251) as u8 + 3; 32]);
    let mut key = *PublicKey::from(&secret).as_bytes();
    key[30..].copy_from_slice(&i.to_be_bytes());
    PeerInfo {
        node_key: key,
        disco_key: None,
        allowed: vec![(
            format!("100.65.{}.{}", i / 256, i % 256).parse().unwrap(),
            32,
        )],
        endpoints: vec![
            format!("203.0.113.{}:{}", i % 250 + 1, 1000 + i)
                .parse()
                .unwrap(),
        ],
        home_derp: 999,
    }
}

#[test]
fn peers_coming_and_going_leave_the_others_sessions_and_paths_alone() {
    let mut n = Net::new();
    n.udp_blocked = false;
    n.send_a_to_b();
    n.tick(path::DISCOVERY);
    assert_eq!(n.path_of_b().as_deref(), Some(B));
    assert!(n.a.e.stats(n.now)[&n.b.key].last_handshake.is_some());

    // Hundreds of others arrive, some leave, one changes its endpoints: B's session and
    // its proven direct path stay as they were.
    let others: Vec<PeerInfo> = (0..300).map(bystander).collect();
    n.a.e.update_peers(others.clone(), &[]);
    let gone: Vec<[u8; 32]> = others[..150].iter().map(|p| p.node_key).collect();
    let mut moved = others[200].clone();
    moved.endpoints = vec!["203.0.113.250:9".parse().unwrap()];
    n.a.e.update_peers(vec![moved.clone()], &gone);
    assert_eq!(n.a.e.peers.len(), 1 + 150);
    assert_eq!(
        n.a.e.by_endpoint.get(&moved.endpoints[0]),
        Some(&moved.node_key)
    );
    assert!(!n.a.e.by_endpoint.contains_key(&others[200].endpoints[0]));
    assert!(!n.a.e.by_endpoint.contains_key(&others[0].endpoints[0]));
    assert_eq!(n.path_of_b().as_deref(), Some(B));
    let udp = n.udp_sent;
    n.send_a_to_b();
    assert_eq!(n.b.delivered.len(), 2);
    assert_eq!(n.udp_sent, udp + 1, "one data packet, no new handshake");

    // B leaves: nothing goes to its address any more. It comes back: a new session.
    n.a.e.update_peers(vec![], &[n.b.key]);
    n.send_a_to_b();
    assert_eq!(n.b.delivered.len(), 2);
    let (_, ib, _) = node(2, B);
    n.a.e.update_peers(vec![ib], &[]);
    n.send_a_to_b();
    assert_eq!(n.b.delivered.len(), 3);

    // The full set replaces the lot: only B is left.
    let ib = n.a.e.peers[&n.b.key].info.clone();
    n.a.e.set_peers(vec![ib]);
    assert_eq!(n.a.e.peers.len(), 1);
    assert_eq!(n.a.e.by_endpoint.len(), 1);
    assert_eq!(n.a.e.by_disco.len(), 1);
}

#[test]
fn idle_peers_cost_neither_x25519_nor_ticks() {
    let (mut a, _, _) = node(1, A);
    let others: Vec<PeerInfo> = (0..1000)
        .map(|i| PeerInfo {
            disco_key: Some([i as u8 ^ 0x5a; 32]),
            ..bystander(i)
        })
        .collect();
    let target = others[7].clone();
    a.e.update_peers(others, &[]);
    // A thousand peers, none talked to: no tunnel, no disco box, nothing to visit.
    let made = |e: &Engine| e.peers.values().filter(|p| p.disco.get().is_some()).count();
    assert_eq!((a.e.wg.live(), made(&a.e)), (0, 0));
    let mut t = Instant::now();
    let mut out = vec![];
    a.e.tick(t, &mut out);
    assert!(a.e.awake.is_empty());
    assert!(
        out.iter()
            .all(|o| matches!(o, Action::SendUdp(to, _) if to.port() == 3478)),
        "only STUN: {out:?}"
    );

    // A packet to one of them: that peer alone gets a tunnel (a handshake goes out), a
    // disco box (pings and call-me-maybe) and a place among the peers a tick visits.
    let dst = target.allowed[0].0.to_string();
    a.e.on_tun(&icmp("100.64.0.1", &dst), t, &mut out);
    for _ in 0..3 {
        t += Duration::from_secs(1);
        a.e.tick(t, &mut out);
    }
    assert_eq!((a.e.wg.live(), made(&a.e)), (1, 1));
    assert_eq!(a.e.awake, vec![target.node_key]);

    // It never answers. Once WireGuard gives up its handshakes and nothing was sent for
    // `ACTIVE`, ticks stop visiting it; the tunnel stays for the next packet.
    for _ in 0..240 {
        t += Duration::from_secs(1);
        a.e.tick(t, &mut out);
    }
    assert!(a.e.awake.is_empty());
    assert_eq!(a.e.wg.live(), 1);
    // Removed: its tunnel goes too.
    a.e.update_peers(vec![], &[target.node_key]);
    assert_eq!(a.e.wg.live(), 0);
}
