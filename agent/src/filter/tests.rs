//! Hand-made packets against filters as headscale sends them.

use super::*;
use serde_json::json;

const US: &str = "100.64.0.1";
const OP: &str = "100.64.0.2";
const OTHER: &str = "100.64.0.3";
const US6: &str = "fd7a:115c:a1e0::1";
const OP6: &str = "fd7a:115c:a1e0::2";

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// An IP packet of the family of `src` around `payload`.
fn ip_packet(proto: u8, src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
    match (ip(src), ip(dst)) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0];
            p[2..4].copy_from_slice(&(20 + payload.len() as u16).to_be_bytes());
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(payload);
            p
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut p = vec![0x60, 0, 0, 0, 0, 0, proto, 64];
            p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(payload);
            p
        }
        _ => panic!("mixed families"),
    }
}

fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = flags;
    ip_packet(proto::TCP, src, dst, &h)
}

fn ports(proto: u8, src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    let mut h = vec![0u8; if proto == proto::SCTP { 12 } else { 8 }];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(b"data");
    ip_packet(proto, src, dst, &h)
}

fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    ports(proto::UDP, src, sport, dst, dport)
}

/// ICMP (v4 or v6 by the addresses) of `kind` and `code`, with an 8-byte header.
fn icmp(src: &str, dst: &str, kind: u8, code: u8) -> Vec<u8> {
    let proto = if ip(src).is_ipv4() {
        proto::ICMP4
    } else {
        proto::ICMP6
    };
    ip_packet(proto, src, dst, &[kind, code, 0, 0, 0, 1, 0, 1])
}

fn echo_request(src: &str, dst: &str) -> Vec<u8> {
    icmp(src, dst, if ip(src).is_ipv4() { 8 } else { 128 }, 0)
}

fn echo_reply(src: &str, dst: &str) -> Vec<u8> {
    icmp(src, dst, if ip(src).is_ipv4() { 0 } else { 129 }, 0)
}

fn filter(sets: serde_json::Value) -> Filter {
    let sets: BTreeMap<String, serde_json::Value> = serde_json::from_value(sets).unwrap();
    let parsed = Filter::from_sets(&sets);
    assert_eq!(parsed.skipped, Vec::<String>::new());
    parsed.filter
}

fn parse_error(sets: serde_json::Value) -> String {
    let sets: BTreeMap<String, serde_json::Value> = serde_json::from_value(sets).unwrap();
    let parsed = Filter::from_sets(&sets);
    assert!(!parsed.skipped.is_empty(), "parsed without errors");
    parsed.skipped.join("; ")
}

/// headscale's filter without a policy (tailcfg.FilterAllowAll).
fn headscale_default() -> Filter {
    filter(
        json!({"base":[{"SrcIPs":["*"],"DstPorts":[{"IP":"*","Ports":{"First":0,"Last":65535}}]}]}),
    )
}

/// What headscale v0.28 sends the firewall for `{"src":["ops@"],"dst":["tag:fw:22"]}`:
/// the operator's addresses to ours, port 22, TCP and UDP (no `proto`).
fn ssh_only() -> Filter {
    filter(json!({"base":[{
        "SrcIPs":[format!("{OP}/32"), format!("{OP6}/128")],
        "DstPorts":[
            {"IP":format!("{US}/32"),"Ports":{"First":22,"Last":22}},
            {"IP":format!("{US6}/128"),"Ports":{"First":22,"Last":22}}
        ],
        "IPProto":[6,17]
    }]}))
}

fn deny_all() -> Filter {
    filter(json!({}))
}

#[test]
fn headscale_default_accepts_new_flows_of_both_families() {
    let mut f = headscale_default();
    assert!(f.allow_in(&tcp(OP, 40000, US, 22, SYN)));
    assert!(f.allow_in(&tcp(OP, 40000, US, 8080, SYN)));
    assert!(f.allow_in(&udp(OP, 40000, US, 53)));
    assert!(f.allow_in(&echo_request(OP, US)));
    assert!(f.allow_in(&tcp(OP6, 40000, US6, 22, SYN)));
    assert!(f.allow_in(&echo_request(OP6, US6)));
    // Its default protocols are TCP, UDP and ICMP: GRE has no rule.
    assert!(!f.allow_in(&ip_packet(47, OP, US, &[0; 8])));
}

#[test]
fn no_rules_accept_no_new_flows_but_replies() {
    for mut f in [
        deny_all(),
        filter(json!({"base":[]})),
        filter(json!({"base":null})),
    ] {
        assert_eq!(f.rule_count(), 0);
        assert!(!f.allow_in(&tcp(OP, 40000, US, 22, SYN)));
        assert!(!f.allow_in(&udp(OP, 40000, US, 53)));
        assert!(!f.allow_in(&echo_request(OP, US)));
        assert!(!f.allow_in(&echo_request(OP6, US6)));
        // Replies to what we started.
        assert!(f.allow_in(&tcp(OP, 22, US, 40000, SYN | ACK)));
        assert!(f.allow_in(&tcp(OP, 22, US, 40000, ACK)));
        assert!(f.allow_in(&echo_reply(OP, US)));
        assert!(f.allow_in(&echo_reply(OP6, US6)));
    }
}

#[test]
fn ssh_only_opens_port_22_to_the_operator() {
    let mut f = ssh_only();
    assert!(f.allow_in(&tcp(OP, 40000, US, 22, SYN)));
    assert!(f.allow_in(&tcp(OP6, 40000, US6, 22, SYN)));
    assert!(!f.allow_in(&tcp(OP, 40000, US, 8080, SYN)));
    assert!(!f.allow_in(&tcp(OP, 40000, US, 21, SYN)));
    assert!(!f.allow_in(&tcp(OP, 40000, US, 23, SYN)));
    assert!(!f.allow_in(&tcp(OTHER, 40000, US, 22, SYN)));
    // UDP 22 is in the rule (headscale's default protocols), 23 not.
    assert!(f.allow_in(&udp(OP, 40000, US, 22)));
    assert!(!f.allow_in(&udp(OP, 40000, US, 23)));
    // A v4 source never matches a v6 destination of the rule, and vice versa.
    assert!(!f.allow_in(&tcp(OP6, 40000, US6, 8080, SYN)));
}

#[test]
fn tcp_without_syn_passes_whatever_the_port() {
    let mut f = ssh_only();
    // tailscale lets every non-SYN segment in: a connection cannot start without a SYN, and
    // our own connections' answers (SYN-ACK included) must arrive.
    for flags in [
        ACK,
        SYN | ACK,
        0x01, /* FIN */
        0x04, /* RST */
        0x18, /* PSH ACK */
    ] {
        assert!(
            f.allow_in(&tcp(OTHER, 8080, US, 40000, flags)),
            "{flags:#x}"
        );
    }
    // SYN with other flags is still a SYN.
    assert!(!f.allow_in(&tcp(OTHER, 8080, US, 40000, SYN | 0x08)));
    assert!(!f.allow_in(&tcp(OTHER, 8080, US, 40000, SYN | 0x01)));
}

#[test]
fn icmp_to_an_address_with_any_open_port_passes() {
    // tailscale's matchIPsOnly: the rule is for TCP and UDP port 22, yet the operator may
    // ping us; someone with no rule at all may not.
    let mut f = ssh_only();
    assert!(f.allow_in(&echo_request(OP, US)));
    assert!(f.allow_in(&echo_request(OP6, US6)));
    assert!(!f.allow_in(&echo_request(OTHER, US)));
    // Echo replies and errors need no rule.
    assert!(f.allow_in(&echo_reply(OTHER, US)));
    for kind in [3, 11, 12] {
        assert!(f.allow_in(&icmp(OTHER, US, kind, 1)), "{kind}");
    }
    for kind in [1, 2, 3, 4] {
        assert!(
            f.allow_in(&icmp("fd7a:115c:a1e0::3", US6, kind, 0)),
            "{kind}"
        );
    }
    // An echo reply with a code is not one; nor are timestamp or neighbour messages.
    assert!(!f.allow_in(&icmp(OTHER, US, 0, 1)));
    assert!(!f.allow_in(&icmp(OTHER, US, 13, 0)));
    assert!(!f.allow_in(&icmp("fd7a:115c:a1e0::3", US6, 135, 0)));
}

#[test]
fn an_icmp_header_shorter_than_eight_bytes_is_no_reply() {
    let mut f = deny_all();
    let short = ip_packet(proto::ICMP4, OP, US, &[0, 0, 0, 0]);
    assert!(!f.allow_in(&short));
    // Under three bytes it is no ICMP at all: dropped even when everything is allowed.
    assert!(!Filter::allow_all().allow_in(&ip_packet(proto::ICMP4, OP, US, &[0, 0, 0])));
    assert!(Filter::allow_all().allow_in(&short));
}

#[test]
fn udp_replies_to_our_flows_pass_and_nothing_else() {
    let mut f = deny_all();
    assert!(!f.allow_in(&udp(OP, 53, US, 5000)));
    f.note_out(&udp(US, 5000, OP, 53));
    assert!(f.allow_in(&udp(OP, 53, US, 5000)));
    assert!(
        f.allow_in(&udp(OP, 53, US, 5000)),
        "a flow answers more than once"
    );
    assert!(!f.allow_in(&udp(OP, 54, US, 5000)));
    assert!(!f.allow_in(&udp(OP, 53, US, 5001)));
    assert!(!f.allow_in(&udp(OTHER, 53, US, 5000)));
    // The flow is UDP's: TCP SYNs and SCTP between the same ports are new.
    assert!(!f.allow_in(&tcp(OP, 53, US, 5000, SYN)));
    assert!(!f.allow_in(&ports(proto::SCTP, OP, 53, US, 5000)));
    // A packet that arrives is no flow of ours.
    assert!(!f.allow_in(&udp(US, 5000, OP, 53)));

    f.note_out(&udp(US6, 5000, OP6, 53));
    assert!(f.allow_in(&udp(OP6, 53, US6, 5000)));
    assert!(!f.allow_in(&udp(OP6, 53, US6, 5002)));
}

#[test]
fn sctp_flows_are_tracked_like_udp() {
    let mut f = deny_all();
    f.note_out(&ports(proto::SCTP, US, 7000, OP, 9000));
    assert!(f.allow_in(&ports(proto::SCTP, OP, 9000, US, 7000)));
    assert!(!f.allow_in(&udp(OP, 9000, US, 7000)));
}

#[test]
fn a_new_filter_can_keep_the_flows_of_the_old() {
    let mut old = deny_all();
    old.note_out(&udp(US, 5000, OP, 53));
    let mut new = ssh_only();
    assert!(!new.allow_in(&udp(OP, 53, US, 5000)));
    new.keep_flows_of(old);
    assert!(new.allow_in(&udp(OP, 53, US, 5000)));
}

#[test]
fn the_flow_table_stays_bounded_and_keeps_what_is_used() {
    let mut f = deny_all();
    f.note_out(&udp(US, 5000, OP, 53));
    for i in 0..20_000u32 {
        let port = (i % 60_000) as u16 + 1024;
        let dst = format!("100.65.{}.{}", (i >> 8) & 0xff, i & 0xff);
        f.note_out(&udp(US, port, &dst, 53));
        // The DNS flow keeps answering, so it stays.
        assert!(f.allow_in(&udp(OP, 53, US, 5000)), "evicted after {i}");
    }
    assert!(f.flows.len() <= flows::CAPACITY);
    assert!(f.flows.len() > flows::CAPACITY / 2, "{}", f.flows.len());
    // The newest flow is there, the first of the many is long gone.
    assert!(f.allow_in(&udp("100.65.78.31", 53, US, 19_999 + 1024)));
    assert!(!f.allow_in(&udp("100.65.0.0", 53, US, 1024)));
}

#[test]
fn ranges_cidrs_and_wildcards_match_as_tailscale_parses_them() {
    let mut f = filter(json!({"base":[
        {"SrcIPs":["100.64.0.10-100.64.0.20"],"DstPorts":[{"IP":US,"Ports":{"First":8000,"Last":8100}}]},
        {"SrcIPs":["fd7a:115c:a1e0::10-fd7a:115c:a1e0::20"],"DstPorts":[{"IP":"fd7a:115c:a1e0::/64","Ports":{"First":443,"Last":443}}]},
        {"SrcIPs":["10.0.0.0/8"],"DstPorts":[{"IP":"100.64.0.0-100.64.0.1","Ports":{"First":0,"Last":65535}}]},
        {"SrcIPs":["*"],"DstPorts":[{"IP":"*","Ports":{"First":7,"Last":7}}]}
    ]}));
    assert!(f.allow_in(&tcp("100.64.0.10", 1, US, 8000, SYN)));
    assert!(f.allow_in(&tcp("100.64.0.20", 1, US, 8100, SYN)));
    assert!(!f.allow_in(&tcp("100.64.0.21", 1, US, 8000, SYN)));
    assert!(!f.allow_in(&tcp("100.64.0.9", 1, US, 8000, SYN)));
    assert!(!f.allow_in(&tcp("100.64.0.15", 1, US, 8101, SYN)));
    assert!(f.allow_in(&tcp("fd7a:115c:a1e0::1a", 1, US6, 443, SYN)));
    assert!(!f.allow_in(&tcp("fd7a:115c:a1e0::21", 1, US6, 443, SYN)));
    assert!(f.allow_in(&udp("10.200.3.4", 1, US, 65535)));
    assert!(!f.allow_in(&udp("11.0.0.1", 1, US, 65535)));
    assert!(f.allow_in(&tcp(OTHER, 1, US, 7, SYN)));
    assert!(f.allow_in(&tcp("fd00::9", 1, US6, 7, SYN)));
}

#[test]
fn protocols_come_from_ipproto() {
    let mut f = filter(json!({"base":[
        {"SrcIPs":["*"],"DstPorts":[{"IP":"*","Ports":{"First":53,"Last":53}}],"IPProto":[17]},
        {"SrcIPs":[OP],"DstPorts":[{"IP":US,"Ports":{"First":0,"Last":65535}}],"IPProto":[47]},
        {"SrcIPs":[OTHER],"DstPorts":[{"IP":US,"Ports":{"First":1,"Last":65535}}],"IPProto":[47]},
        {"SrcIPs":["*"],"DstPorts":[{"IP":"*","Ports":{"First":0,"Last":65535}}],"IPProto":[300,-1]}
    ]}));
    assert!(f.allow_in(&udp(OTHER, 1, US, 53)));
    assert!(!f.allow_in(&tcp(OTHER, 1, US, 53, SYN)));
    // Protocols without ports pass only where all ports are open.
    assert!(f.allow_in(&ip_packet(47, OP, US, &[0; 8])));
    assert!(!f.allow_in(&ip_packet(47, OTHER, US, &[0; 8])));
    // Out-of-range numbers are dropped; the rule is left with none and matches nothing.
    assert!(!f.allow_in(&tcp(OTHER, 1, US, 80, SYN)));
}

#[test]
fn sets_are_concatenated() {
    let mut f = filter(json!({
        "a":[{"SrcIPs":[OP],"DstPorts":[{"IP":US,"Ports":{"First":22,"Last":22}}]}],
        "b":[{"SrcIPs":[OTHER],"DstPorts":[{"IP":US,"Ports":{"First":80,"Last":80}}]}]
    }));
    assert_eq!(f.rule_count(), 2);
    assert!(f.allow_in(&tcp(OP, 1, US, 22, SYN)));
    assert!(f.allow_in(&tcp(OTHER, 1, US, 80, SYN)));
    assert!(!f.allow_in(&tcp(OP, 1, US, 80, SYN)));
}

#[test]
fn capability_sources_and_grants_grant_no_packets() {
    let mut f = filter(json!({"base":[
        {"SrcIPs":["cap:ssh"],"DstPorts":[{"IP":"*","Ports":{"First":0,"Last":65535}}]},
        {"SrcIPs":["*"],"CapGrant":[{"Dsts":["100.64.0.1/32"],"Caps":["https://tailscale.com/cap/x"]}]},
        {"SrcIPs":["cap:ssh", OP],"DstPorts":[{"IP":US,"Ports":{"First":22,"Last":22}}]}
    ]}));
    assert_eq!(f.rule_count(), 1);
    assert!(!f.allow_in(&tcp(OTHER, 1, US, 22, SYN)));
    assert!(f.allow_in(&tcp(OP, 1, US, 22, SYN)));
}

#[test]
fn fields_as_go_writes_them() {
    // Bits null, Ports missing (port 0 only), SrcBits empty, unknown fields.
    let mut f = filter(json!({"base":[{
        "SrcIPs":["*"],"SrcBits":[],"Future":1,
        "DstPorts":[{"IP":US,"Bits":null}]
    }]}));
    assert!(f.allow_in(&udp(OP, 1, US, 0)));
    assert!(!f.allow_in(&udp(OP, 1, US, 1)));
}

#[test]
fn what_does_not_parse_is_an_error_naming_set_and_rule() {
    let rule = |src: &str, dst: &str| json!({"base":[{"SrcIPs":[src],"DstPorts":[{"IP":dst,"Ports":{"First":1,"Last":2}}]}]});
    for (sets, want) in [
        (json!({"base":{"SrcIPs":[]}}), "set \"base\""),
        (json!({"base":[{"SrcIPs":"*"}]}), "invalid type"),
        (rule("100.64.0.300", US), "100.64.0.300"),
        (rule("100.64.0.1/24", US), "host bits"),
        (rule("100.64.0.0/33", US), "prefix length"),
        (rule("100.64.0.0/+8", US), "prefix length"),
        (rule("100.64.0.0/08", US), "prefix length"),
        (rule("100.64.0.9-100.64.0.1", US), "range"),
        (rule("100.64.0.1-fd7a::1", US), "range"),
        (rule("100.64.0.1-2-3", US), "invalid IP address"),
        (rule("", US), "invalid IP address"),
        (rule(OP, "cap:x"), "capability"),
        (rule(OP, "*-*"), "invalid IP address"),
        (
            json!({"base":[{"SrcIPs":[OP],"SrcBits":[32],"DstPorts":[]}]}),
            "SrcBits",
        ),
        (
            json!({"base":[{"SrcIPs":[OP],"DstPorts":[{"IP":US,"Bits":32,"Ports":{"First":1,"Last":1}}]}]}),
            "Bits",
        ),
        (
            json!({"base":[{"SrcIPs":[OP],"DstPorts":[{"IP":US,"Ports":{"First":1,"Last":70000}}]}]}),
            "set \"base\"",
        ),
    ] {
        let e = parse_error(sets.clone());
        assert!(e.contains(want), "{sets}: {e}");
        assert!(e.starts_with("set \"base\""), "{e}");
    }
}

#[test]
fn only_our_addresses_are_destinations_once_we_know_them() {
    let ours = [(ip(US), 32), (ip(US6), 128)];
    let mut f = headscale_default().with_local(&ours);
    assert!(f.allow_in(&tcp(OP, 1, US, 22, SYN)));
    assert!(f.allow_in(&tcp(OP6, 1, US6, 22, SYN)));
    // A peer routing through us, even with packets that need no rule.
    assert!(!f.allow_in(&tcp(OP, 1, "192.0.2.7", 22, SYN)));
    assert!(!f.allow_in(&tcp(OP, 1, "192.0.2.7", 22, ACK)));
    assert!(!f.allow_in(&echo_reply(OP, OTHER)));
    assert!(!f.allow_in(&udp(OP6, 1, "fd7a:115c:a1e0::9", 53)));
    // No addresses yet: nothing is for us.
    let mut none = headscale_default().with_local(&[]);
    assert!(!none.allow_in(&tcp(OP, 1, US, 22, SYN)));
}

#[test]
fn multicast_and_link_local_destinations_never_pass() {
    let mut f = Filter::allow_all();
    assert!(f.allow_in(&udp(OP, 1, US, 5353)));
    for dst in ["224.0.0.251", "239.1.2.3", "169.254.1.1"] {
        assert!(!f.allow_in(&udp(OP, 1, dst, 5353)), "{dst}");
    }
    for dst in ["ff02::fb", "fe80::1", "febf::1"] {
        assert!(!f.allow_in(&udp(OP6, 1, dst, 5353)), "{dst}");
    }
    assert!(f.allow_in(&udp(OP6, 1, "fec0::1", 5353)));
}

/// An IPv4 packet with fragment offset `blocks` (8-byte units) and `more` fragments flag.
fn fragment4(mut p: Vec<u8>, blocks: u16, more: bool) -> Vec<u8> {
    let v = blocks | if more { 0x2000 } else { 0 };
    p[6..8].copy_from_slice(&v.to_be_bytes());
    p
}

#[test]
fn ipv4_fragments_as_tailscale_judges_them() {
    let mut f = ssh_only();
    // The first fragment carries the header and is judged by it.
    assert!(f.allow_in(&fragment4(tcp(OP, 1, US, 22, SYN), 0, true)));
    assert!(!f.allow_in(&fragment4(tcp(OP, 1, US, 80, SYN), 0, true)));
    // A first fragment too short for its transport header is refused.
    let cut = ip_packet(proto::TCP, OP, US, &[0, 1, 0, 22, 0, 0, 0, 0]);
    assert!(!f.allow_in(&fragment4(cut, 0, true)));
    // Later fragments pass once past any header they could overwrite...
    assert!(f.allow_in(&fragment4(
        ip_packet(proto::TCP, OTHER, US, &[0; 16]),
        10,
        false
    )));
    // ... and are refused where they could (RFC 1858).
    for blocks in [1, 2, 9] {
        let p = fragment4(ip_packet(proto::TCP, OTHER, US, &[0; 16]), blocks, true);
        assert!(!f.allow_in(&p), "{blocks}");
    }
    // Fragments to multicast still do not pass.
    assert!(!f.allow_in(&fragment4(
        ip_packet(17, OP, "224.0.0.1", &[0; 16]),
        10,
        false
    )));
}

/// An IPv6 packet whose payload is a Fragment header (offset `blocks`) and then `inner`.
fn fragment6(next: u8, blocks: u16, src: &str, dst: &str, inner: &[u8]) -> Vec<u8> {
    let mut h = vec![next, 0];
    h.extend_from_slice(&((blocks << 3) | 1).to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 7]);
    h.extend_from_slice(inner);
    ip_packet(proto::IPV6_FRAGMENT, src, dst, &h)
}

#[test]
fn ipv6_fragments_as_tailscale_judges_them() {
    let mut f = ssh_only();
    let syn = |port: u16| tcp(OP6, 1, US6, port, SYN)[40..].to_vec();
    assert!(f.allow_in(&fragment6(proto::TCP, 0, OP6, US6, &syn(22))));
    assert!(!f.allow_in(&fragment6(proto::TCP, 0, OP6, US6, &syn(80))));
    assert!(!f.allow_in(&fragment6(proto::TCP, 0, OP6, US6, &syn(22)[..19])));
    assert!(f.allow_in(&fragment6(proto::TCP, 10, OP6, US6, &[0; 16])));
    assert!(!f.allow_in(&fragment6(proto::TCP, 3, OP6, US6, &[0; 16])));
    // A fragment header cut off.
    let mut cut = ip_packet(proto::IPV6_FRAGMENT, OP6, US6, &[proto::TCP, 0, 0]);
    assert!(!f.allow_in(&cut));
    cut.truncate(41);
    assert!(!f.allow_in(&cut));
}

#[test]
fn other_ipv6_extension_headers_are_not_parsed() {
    let mut f = Filter::allow_all();
    // Hop-by-hop (0) is tailscale's "unknown": dropped even when all is allowed.
    let hbh = ip_packet(0, OP6, US6, &[proto::TCP, 0, 1, 4, 0, 0, 0, 0]);
    assert!(!f.allow_in(&hbh));
    // Routing (43) is just another protocol to the rules: only an all-protocols rule opens it.
    let routing = ip_packet(43, OP6, US6, &[proto::TCP, 0, 0, 0, 0, 0, 0, 0]);
    assert!(f.allow_in(&routing));
    assert!(!headscale_default().allow_in(&routing));
}

#[test]
fn malformed_packets_are_dropped_even_when_all_is_allowed() {
    let mut f = Filter::allow_all();
    let good = tcp(OP, 1, US, 22, SYN);
    assert!(f.allow_in(&good));
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("one byte", vec![0x45]),
        ("19 bytes", good[..19].to_vec()),
        ("cut off", good[..good.len() - 1].to_vec()),
        ("TCP header short", {
            let mut p = good[..39].to_vec();
            p[2..4].copy_from_slice(&39u16.to_be_bytes());
            p
        }),
        ("UDP header short", ip_packet(proto::UDP, OP, US, &[0; 7])),
        (
            "SCTP header short",
            ip_packet(proto::SCTP, OP, US, &[0; 11]),
        ),
        ("IGMP short", ip_packet(2, OP, US, &[0; 7])),
        ("protocol 0", ip_packet(0, OP, US, &[0; 8])),
        ("protocol 255", ip_packet(255, OP, US, &[0; 8])),
        ("v6 cut off", {
            let p = tcp(OP6, 1, US6, 22, SYN);
            p[..p.len() - 1].to_vec()
        }),
        (
            "v6 base header short",
            tcp(OP6, 1, US6, 22, SYN)[..39].to_vec(),
        ),
    ];
    for (ihl, what) in [(0x40, "IHL 0"), (0x44, "IHL 4"), (0x4f, "IHL past the end")] {
        let mut p = good.clone();
        p[0] = ihl;
        cases.push((what, p));
    }
    for version in [0u8, 5, 7, 15] {
        let mut p = good.clone();
        p[0] = version << 4 | 5;
        cases.push(("version", p));
    }
    for (what, p) in cases {
        assert!(!f.allow_in(&p), "{what}");
        f.note_out(&p);
    }
}

#[test]
fn trailing_bytes_past_the_ip_length_are_ignored() {
    let mut f = ssh_only();
    // A padded packet whose IP length ends before its TCP header does: no header.
    let mut p = tcp(OP, 1, US, 22, SYN);
    p[2..4].copy_from_slice(&24u16.to_be_bytes());
    assert!(!f.allow_in(&p));
    // Padding after a complete packet is fine.
    let mut p = tcp(OP, 1, US, 22, SYN);
    p.extend_from_slice(&[0; 6]);
    assert!(f.allow_in(&p));
}

#[test]
fn nothing_passes_before_a_policy_is_in_force() {
    let mut f = Filter::default();
    assert!(!f.allow_in(&tcp(OP, 1, US, 22, SYN)));
    assert!(!f.allow_in(&tcp(OP, 1, US, 22, ACK)));
    assert!(!f.allow_in(&echo_reply(OP, US)));
    assert!(!f.allow_in(&ip_packet(47, OP, US, &[0; 4])));
    f.note_out(&udp(US, 53, OP, 40000));
    assert!(!f.allow_in(&udp(OP, 40000, US, 53)));
}

#[test]
fn a_rule_that_does_not_parse_is_left_out_and_the_others_stay() {
    let sets = json!({"base":[
        {"SrcIPs":[OP],"DstPorts":[{"IP":"100.64.0.5/24","Ports":{"First":0,"Last":65535}}]},
        {"SrcIPs":[OP],"DstPorts":[{"IP":US,"Ports":{"First":22,"Last":22}}]},
        {"SrcIPs":"not a list"}
    ], "other": {"not": "a list"}});
    let sets: BTreeMap<String, serde_json::Value> = serde_json::from_value(sets).unwrap();
    let Parsed {
        mut filter,
        skipped,
    } = Filter::from_sets(&sets);
    assert_eq!(skipped.len(), 3, "{skipped:?}");
    assert!(
        skipped[0].contains("rule 0") && skipped[0].contains("host bits"),
        "{skipped:?}"
    );
    assert!(skipped[1].contains("rule 2"), "{skipped:?}");
    assert!(skipped[2].contains("\"other\""), "{skipped:?}");
    assert!(filter.allow_in(&tcp(OP, 1, US, 22, SYN)));
    assert!(!filter.allow_in(&tcp(OP, 1, US, 80, SYN)));
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    fn filters() -> Vec<Filter> {
        vec![
            Filter::allow_all(),
            deny_all(),
            ssh_only().with_local(&[(ip(US), 32), (ip(US6), 128)]),
        ]
    }

    /// Valid-looking headers with arbitrary bytes behind, so that parsing goes deep.
    fn packets() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..128),
            (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..96)).prop_map(|(p, rest)| {
                let mut v = tcp(OP, 1, US, 22, SYN);
                v[9] = p;
                v.truncate(20);
                v.extend(rest);
                v
            }),
            (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..96)).prop_map(|(p, rest)| {
                let mut v = ip_packet(p, OP6, US6, &rest);
                v[6] = p;
                v
            }),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in packets()) {
            for mut f in filters() {
                f.note_out(&data);
                let _ = f.allow_in(&data);
            }
        }

        #[test]
        fn arbitrary_address_strings_never_panic(s in "[0-9a-f:./*-]{0,48}", first: u16, last: u16) {
            let sets = json!({"base":[{"SrcIPs":[s.clone()],"DstPorts":[{"IP":s,"Ports":{"First":first,"Last":last}}]}]});
            let sets: BTreeMap<String, serde_json::Value> = serde_json::from_value(sets).unwrap();
            let mut f = Filter::from_sets(&sets).filter;
            let _ = f.allow_in(&tcp(OP, 1, US, first, SYN));
        }

        #[test]
        fn a_syn_passes_exactly_when_its_port_is_in_the_range(first: u16, last: u16, port: u16) {
            let mut f = filter(json!({"base":[{"SrcIPs":[OP],"DstPorts":[{"IP":US,"Ports":{"First":first,"Last":last}}]}]}));
            prop_assert_eq!(f.allow_in(&tcp(OP, 1, US, port, SYN)), first <= port && port <= last);
        }
    }
}
