//! Per-peer path state, as tailscale's magicsock keeps it: which direct UDP address is
//! proven by a disco pong and for how long, which candidates to probe, and whether a
//! packet goes direct, via DERP, or both. Pure: instants in, decisions out.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A direct path is trusted this long after a pong (tailscale's `trustUDPAddrDuration`).
pub const TRUST: Duration = Duration::from_millis(6500);
/// While a peer is active, its trusted path is re-pinged this often.
pub const HEARTBEAT: Duration = Duration::from_secs(3);
/// Without a trusted path, all candidates are pinged at most this often.
pub const DISCOVERY: Duration = Duration::from_secs(5);
/// A ping without a pong after this long is given up.
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// A peer we sent to within this long is active.
pub const ACTIVE: Duration = Duration::from_secs(45);
/// Bounds that keep a misbehaving peer from growing our state.
const MAX_LEARNED: usize = 16;
const MAX_PINGS: usize = 64;

/// Where one WireGuard datagram goes: a direct address, the peer's DERP region, or both
/// (while a direct path is unproven, as tailscale does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Route {
    pub udp: Option<SocketAddr>,
    pub derp: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Best {
    addr: SocketAddr,
    latency: Duration,
    trusted_until: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Ping {
    tx: [u8; 12],
    to: SocketAddr,
    sent: Instant,
}

/// The path state of one peer.
#[derive(Debug, Clone)]
pub struct PeerPath {
    pub home_derp: u32,
    /// Endpoints control reported for the peer.
    pub endpoints: Vec<SocketAddr>,
    /// Endpoints learned from call-me-maybe and from pings that reached us.
    learned: Vec<SocketAddr>,
    best: Option<Best>,
    pings: Vec<Ping>,
    last_send: Option<Instant>,
    last_discovery: Option<Instant>,
    last_heartbeat: Option<Instant>,
    /// Where valid WireGuard last came from directly: a fallback when there is no DERP.
    last_wg_src: Option<SocketAddr>,
}

fn older_than(t: Option<Instant>, now: Instant, d: Duration) -> bool {
    t.is_none_or(|t| now.saturating_duration_since(t) >= d)
}

impl PeerPath {
    pub fn new(home_derp: u32, endpoints: Vec<SocketAddr>) -> PeerPath {
        PeerPath {
            home_derp,
            endpoints,
            learned: vec![],
            best: None,
            pings: vec![],
            last_send: None,
            last_discovery: None,
            last_heartbeat: None,
            last_wg_src: None,
        }
    }

    /// The proven direct address, if still trusted.
    pub fn direct(&self, now: Instant) -> Option<SocketAddr> {
        self.best.filter(|b| now < b.trusted_until).map(|b| b.addr)
    }

    fn derp(&self) -> Option<u32> {
        (self.home_derp != 0).then_some(self.home_derp)
    }

    /// Where a datagram sent now goes; counts as activity.
    pub fn route(&mut self, now: Instant) -> Route {
        self.last_send = Some(now);
        match self.best {
            Some(b) if now < b.trusted_until => Route {
                udp: Some(b.addr),
                derp: None,
            },
            Some(b) => Route {
                udp: Some(b.addr),
                derp: self.derp(),
            },
            None => Route {
                udp: if self.derp().is_none() {
                    self.last_wg_src.or_else(|| self.endpoints.first().copied())
                } else {
                    None
                },
                derp: self.derp(),
            },
        }
    }

    /// Whether we sent to the peer within [`ACTIVE`].
    pub fn active(&self, now: Instant) -> bool {
        !older_than(self.last_send, now, ACTIVE)
    }

    /// Every address worth a ping: control's endpoints and learned ones.
    pub fn candidates(&self) -> Vec<SocketAddr> {
        let mut c = self.endpoints.clone();
        for a in &self.learned {
            if !c.contains(a) {
                c.push(*a);
            }
        }
        c
    }

    /// Addresses to ping now: all candidates when an active peer has no trusted path (at most
    /// every `DISCOVERY`), or the trusted one as a heartbeat. The caller sends the pings and
    /// reports each with `ping_sent`.
    pub fn due_pings(&mut self, now: Instant) -> Vec<SocketAddr> {
        self.pings
            .retain(|p| now.saturating_duration_since(p.sent) < PING_TIMEOUT);
        if !self.active(now) {
            return vec![];
        }
        if let Some(addr) = self.direct(now) {
            if older_than(self.last_heartbeat, now, HEARTBEAT) {
                self.last_heartbeat = Some(now);
                return vec![addr];
            }
            return vec![];
        }
        if older_than(self.last_discovery, now, DISCOVERY) {
            self.last_discovery = Some(now);
            return self.candidates();
        }
        vec![]
    }

    /// Whether a discovery round just started (call-me-maybe goes out with it).
    pub fn discovering(&self, now: Instant) -> bool {
        self.last_discovery == Some(now)
    }

    pub fn ping_sent(&mut self, tx: [u8; 12], to: SocketAddr, now: Instant) {
        if self.pings.len() >= MAX_PINGS {
            self.pings.remove(0);
        }
        self.pings.push(Ping { tx, to, sent: now });
    }

    fn pinging(&self, to: SocketAddr) -> bool {
        self.pings.iter().any(|p| p.to == to)
    }

    /// A pong for one of our pings arrived from `from`. The lowest-latency address wins; a
    /// new one must be clearly better to replace a trusted path (no flapping).
    pub fn on_pong(&mut self, tx: [u8; 12], from: SocketAddr, now: Instant) -> bool {
        let Some(i) = self.pings.iter().position(|p| p.tx == tx && p.to == from) else {
            return false;
        };
        let ping = self.pings.swap_remove(i);
        let latency = now.saturating_duration_since(ping.sent);
        let trusted_until = now + TRUST;
        let take = match self.best {
            Some(b) if b.addr == from => true,
            Some(b) if now < b.trusted_until => latency * 10 < b.latency * 9,
            _ => true,
        };
        if take {
            self.best = Some(Best {
                addr: from,
                latency,
                trusted_until,
            });
        }
        true
    }

    /// Someone pinged us from `from`, or call-me-maybe named it: a candidate. Returns whether
    /// we should ping it back now (not trusted and not already being pinged).
    pub fn learn(&mut self, from: SocketAddr, now: Instant) -> bool {
        if !self.endpoints.contains(&from) && !self.learned.contains(&from) {
            if self.learned.len() >= MAX_LEARNED {
                self.learned.remove(0);
            }
            self.learned.push(from);
        }
        self.direct(now) != Some(from) && !self.pinging(from)
    }

    /// Call-me-maybe: the peer is about to ping us; ping its endpoints now.
    pub fn call_me_maybe(&mut self, endpoints: &[SocketAddr], now: Instant) -> Vec<SocketAddr> {
        for e in endpoints {
            self.learn(*e, now);
        }
        self.last_send.get_or_insert(now);
        endpoints
            .iter()
            .copied()
            .filter(|e| self.direct(now) != Some(*e) && !self.pinging(*e))
            .collect()
    }

    pub fn wg_from(&mut self, src: SocketAddr) {
        self.last_wg_src = Some(src);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn derp_until_a_pong_then_direct_until_trust_lapses() {
        let t0 = Instant::now();
        let a = addr("192.0.2.12:41641");
        let mut p = PeerPath::new(999, vec![a]);
        // Idle: nothing to ping.
        assert!(p.due_pings(t0).is_empty());
        assert_eq!(
            p.route(t0),
            Route {
                udp: None,
                derp: Some(999)
            }
        );
        // Active now: discovery pings every candidate, once per interval.
        assert_eq!(p.due_pings(t0), vec![a]);
        assert!(p.discovering(t0));
        p.ping_sent([1; 12], a, t0);
        assert!(p.due_pings(t0 + Duration::from_secs(1)).is_empty());
        // A pong from elsewhere is not ours.
        assert!(!p.on_pong([1; 12], addr("192.0.2.99:1"), t0));
        let t1 = t0 + Duration::from_millis(2);
        assert!(p.on_pong([1; 12], a, t1));
        assert_eq!(p.direct(t1), Some(a));
        assert_eq!(
            p.route(t1),
            Route {
                udp: Some(a),
                derp: None
            }
        );
        // Heartbeats keep it trusted while active.
        let t2 = t1 + HEARTBEAT;
        assert_eq!(p.due_pings(t2), vec![a]);
        // Without pongs, trust lapses: both paths, and discovery again.
        let t3 = t1 + TRUST;
        assert_eq!(p.direct(t3), None);
        assert_eq!(
            p.route(t3),
            Route {
                udp: Some(a),
                derp: Some(999)
            }
        );
        assert_eq!(p.due_pings(t3), vec![a]);
    }

    #[test]
    fn no_derp_falls_back_to_where_wireguard_came_from() {
        let t0 = Instant::now();
        let mut p = PeerPath::new(0, vec![addr("192.0.2.12:41641")]);
        assert_eq!(p.route(t0).udp, Some(addr("192.0.2.12:41641")));
        p.wg_from(addr("203.0.113.2:1234"));
        assert_eq!(
            p.route(t0),
            Route {
                udp: Some(addr("203.0.113.2:1234")),
                derp: None
            }
        );
    }

    #[test]
    fn a_better_path_must_be_clearly_better() {
        let t0 = Instant::now();
        let (a, b) = (addr("192.0.2.12:41641"), addr("198.51.100.7:41641"));
        let mut p = PeerPath::new(999, vec![a, b]);
        p.ping_sent([1; 12], a, t0);
        p.ping_sent([2; 12], b, t0);
        p.on_pong([1; 12], a, t0 + Duration::from_millis(10));
        p.on_pong([2; 12], b, t0 + Duration::from_millis(10));
        assert_eq!(p.direct(t0 + Duration::from_millis(10)), Some(a));
        p.ping_sent([3; 12], b, t0);
        p.on_pong([3; 12], b, t0 + Duration::from_millis(5));
        assert_eq!(p.direct(t0 + Duration::from_millis(5)), Some(b));
    }

    #[test]
    fn learned_addresses_are_bounded_and_pinged_back_once() {
        let t0 = Instant::now();
        let mut p = PeerPath::new(999, vec![]);
        let a = addr("203.0.113.2:5555");
        assert!(p.learn(a, t0));
        p.ping_sent([1; 12], a, t0);
        assert!(!p.learn(a, t0));
        for i in 0..100 {
            p.learn(SocketAddr::new([198, 51, 100, 1].into(), 1000 + i), t0);
        }
        assert_eq!(p.candidates().len(), MAX_LEARNED);
        let cmm = p.call_me_maybe(&[a, addr("192.0.2.5:1")], t0);
        assert_eq!(cmm, vec![addr("192.0.2.5:1")]);
    }
}
