//! The flows we opened (UDP, SCTP), so that their replies pass without a rule: tailscale's
//! `filterState`, an LRU of 512 flows. Ours is set-associative, 128 sets of 4 ways, least
//! recently used out within a set: the memory is allocated once, a lookup compares at most 4
//! entries, and nothing allocates per packet.

use super::packet::Ip;

const SETS: usize = 128;
const WAYS: usize = 4;
/// As many flows as tailscale remembers (`lruMax`).
pub const CAPACITY: usize = SETS * WAYS;

/// One direction of a flow, as the packets of that direction carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub proto: u8,
    pub src: Ip,
    pub src_port: u16,
    pub dst: Ip,
    pub dst_port: u16,
}

impl Flow {
    /// The other direction.
    pub fn reversed(self) -> Flow {
        Flow {
            proto: self.proto,
            src: self.dst,
            src_port: self.dst_port,
            dst: self.src,
            dst_port: self.src_port,
        }
    }

    /// Which set the flow lives in. Only our own outbound packets insert, so a peer cannot
    /// aim collisions at the table; a fixed mix keeps the filter deterministic.
    fn set(&self) -> usize {
        let mut h = 0xcbf2_9ce4_8422_2325u64 ^ u64::from(self.proto);
        for word in [
            addr_word(self.src),
            addr_word(self.dst),
            u64::from(self.src_port) << 16 | u64::from(self.dst_port),
        ] {
            h = (h ^ word).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            h ^= h >> 29;
        }
        (h as usize) % SETS
    }
}

fn addr_word(a: Ip) -> u64 {
    match a {
        Ip::V4(a) => u64::from(a),
        Ip::V6(a) => (a as u64) ^ ((a >> 64) as u64).rotate_left(17),
    }
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    flow: Flow,
    /// When it was last used (a counter, not a clock); 0 = empty.
    used: u64,
}

/// A bounded set of flows.
#[derive(Debug, Clone)]
pub struct Flows {
    slots: Box<[Slot]>,
    tick: u64,
}

impl Default for Flows {
    fn default() -> Self {
        let empty = Slot {
            flow: Flow {
                proto: 0,
                src: Ip::V4(0),
                src_port: 0,
                dst: Ip::V4(0),
                dst_port: 0,
            },
            used: 0,
        };
        Flows {
            slots: vec![empty; CAPACITY].into_boxed_slice(),
            tick: 0,
        }
    }
}

impl Flows {
    fn ways(&mut self, flow: &Flow) -> &mut [Slot] {
        let start = flow.set() * WAYS;
        &mut self.slots[start..start + WAYS]
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Remembers `flow` as just used, evicting its set's least recently used one if full.
    pub fn insert(&mut self, flow: Flow) {
        let now = self.next_tick();
        let ways = self.ways(&flow);
        let slot = match ways.iter().position(|s| s.used != 0 && s.flow == flow) {
            Some(i) => i,
            // Empty slots have `used` 0, so they go first.
            None => (0..WAYS).min_by_key(|&i| ways[i].used).unwrap_or(0),
        };
        ways[slot] = Slot { flow, used: now };
    }

    /// Whether `flow` is known; a hit counts as a use (an LRU `Get`).
    pub fn hit(&mut self, flow: &Flow) -> bool {
        let now = self.next_tick();
        let ways = self.ways(flow);
        match ways.iter_mut().find(|s| s.used != 0 && s.flow == *flow) {
            Some(s) => {
                s.used = now;
                true
            }
            None => false,
        }
    }

    /// How many flows are remembered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.used != 0).count()
    }
}
