//! Disco, tailscale's path discovery: sealed ping, pong and call-me-maybe messages on the
//! same UDP socket as WireGuard. Pure: bytes and keys in, messages or bytes out.
//!
//! Packet: `"TS💬"` (6 bytes), the sender's disco public key (32), a nonce (24), then a NaCl
//! box (XSalsa20-Poly1305, tag first) of `[type][version 0][payload]`.

use crypto_box::aead::Aead;
use crypto_box::{PublicKey, SalsaBox, SecretKey};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

pub const MAGIC: &[u8; 6] = b"TS\xf0\x9f\x92\xac";
const HEADER: usize = 6 + 32 + 24;
const TYPE_PING: u8 = 1;
const TYPE_PONG: u8 = 2;
const TYPE_CALL_ME_MAYBE: u8 = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `node_key` is the sender's WireGuard key (raw 32 bytes).
    Ping {
        tx_id: [u8; 12],
        node_key: [u8; 32],
    },
    /// `src` is where the responder saw the ping come from.
    Pong {
        tx_id: [u8; 12],
        src: SocketAddr,
    },
    CallMeMaybe {
        endpoints: Vec<SocketAddr>,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiscoError {
    #[error("not a disco packet")]
    NotDisco,
    #[error("disco packet does not open with our key (unknown sender or corrupt)")]
    Open,
    #[error("disco message malformed: {0}")]
    Malformed(&'static str),
    #[error("disco message type {0} is not supported")]
    Unsupported(u8),
}

/// What a packet on the shared UDP socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Stun,
    Disco,
    WireGuard,
}

/// Tells STUN, disco and WireGuard apart, as tailscale's magicsock does.
pub fn classify(p: &[u8]) -> Kind {
    if p.len() >= 20 && p[0] & 0xc0 == 0 && p[4..8] == [0x21, 0x12, 0xa4, 0x42] && p[1] == 0x01 {
        Kind::Stun
    } else if p.len() >= HEADER && p.starts_with(MAGIC) {
        Kind::Disco
    } else {
        Kind::WireGuard
    }
}

/// The sender's disco key of a disco packet, before opening it.
pub fn sender(p: &[u8]) -> Result<[u8; 32], DiscoError> {
    if classify(p) != Kind::Disco {
        return Err(DiscoError::NotDisco);
    }
    Ok(p[6..38].try_into().expect("32 bytes"))
}

fn put_addr(out: &mut Vec<u8>, a: &SocketAddr) {
    let v6 = match a.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out.extend_from_slice(&v6.octets());
    out.extend_from_slice(&a.port().to_be_bytes());
}

fn get_addr(b: &[u8]) -> SocketAddr {
    let ip: [u8; 16] = b[..16].try_into().expect("16 bytes");
    let ip = Ipv6Addr::from(ip);
    let ip = ip
        .to_ipv4_mapped()
        .map(IpAddr::V4)
        .unwrap_or(IpAddr::V6(ip));
    SocketAddr::new(ip, u16::from_be_bytes([b[16], b[17]]))
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![];
        match self {
            Message::Ping { tx_id, node_key } => {
                out.extend_from_slice(&[TYPE_PING, 0]);
                out.extend_from_slice(tx_id);
                out.extend_from_slice(node_key);
            }
            Message::Pong { tx_id, src } => {
                out.extend_from_slice(&[TYPE_PONG, 0]);
                out.extend_from_slice(tx_id);
                put_addr(&mut out, src);
            }
            Message::CallMeMaybe { endpoints } => {
                out.extend_from_slice(&[TYPE_CALL_ME_MAYBE, 0]);
                for e in endpoints {
                    put_addr(&mut out, e);
                }
            }
        }
        out
    }

    /// Decodes a plaintext; trailing bytes (padding) are ignored, as tailscale does.
    pub fn decode(b: &[u8]) -> Result<Message, DiscoError> {
        let (&t, rest) = b.split_first().ok_or(DiscoError::Malformed("empty"))?;
        let body = rest
            .get(1..)
            .ok_or(DiscoError::Malformed("no version byte"))?;
        match t {
            TYPE_PING => {
                let tx_id = body.get(..12).ok_or(DiscoError::Malformed("short ping"))?;
                let mut node_key = [0u8; 32];
                if let Some(k) = body.get(12..44) {
                    node_key.copy_from_slice(k);
                }
                Ok(Message::Ping {
                    tx_id: tx_id.try_into().expect("12"),
                    node_key,
                })
            }
            TYPE_PONG => {
                let b = body.get(..30).ok_or(DiscoError::Malformed("short pong"))?;
                Ok(Message::Pong {
                    tx_id: b[..12].try_into().expect("12"),
                    src: get_addr(&b[12..]),
                })
            }
            TYPE_CALL_ME_MAYBE => Ok(Message::CallMeMaybe {
                endpoints: body.chunks_exact(18).map(get_addr).collect(),
            }),
            other => Err(DiscoError::Unsupported(other)),
        }
    }
}

/// The box two disco keys share: one X25519 and a key derivation, so it is made once per
/// peer disco key and kept, not once per packet (anyone may send us packets claiming a
/// peer's disco key; they must cost a MAC check, not a key exchange).
pub fn shared(ours: &SecretKey, peer: &[u8; 32]) -> SalsaBox {
    SalsaBox::new(&PublicKey::from(*peer), ours)
}

/// Seals `msg` from `ours` to `peer` with `nonce` (24 random bytes from the caller).
pub fn seal(ours: &SecretKey, peer: &PublicKey, nonce: [u8; 24], msg: &Message) -> Vec<u8> {
    let b = shared(ours, peer.as_bytes());
    seal_with(&b, ours.public_key().as_bytes(), nonce, msg)
}

/// Seals `msg` with the box shared with the receiver; `ours` is our disco public key.
pub fn seal_with(b: &SalsaBox, ours: &[u8; 32], nonce: [u8; 24], msg: &Message) -> Vec<u8> {
    let sealed = b
        .encrypt(&nonce.into(), msg.encode().as_slice())
        .expect("sealing cannot fail");
    let mut out = Vec::with_capacity(HEADER + sealed.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(ours);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

/// Opens a disco packet addressed to `ours`.
pub fn open(ours: &SecretKey, p: &[u8]) -> Result<([u8; 32], Message), DiscoError> {
    let from = sender(p)?;
    Ok((from, open_with(&shared(ours, &from), p)?))
}

/// Opens a disco packet with the box shared with its claimed sender.
pub fn open_with(b: &SalsaBox, p: &[u8]) -> Result<Message, DiscoError> {
    if classify(p) != Kind::Disco {
        return Err(DiscoError::NotDisco);
    }
    let nonce: [u8; 24] = p[38..HEADER].try_into().expect("24 bytes");
    let plain = b
        .decrypt(&nonce.into(), &p[HEADER..])
        .map_err(|_| DiscoError::Open)?;
    Message::decode(&plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SecretKey {
        SecretKey::from([b; 32])
    }

    #[test]
    fn ping_pong_round_trip() {
        let (a, b) = (key(1), key(2));
        let ping = Message::Ping {
            tx_id: [7; 12],
            node_key: [9; 32],
        };
        let p = seal(&a, &b.public_key(), [3; 24], &ping);
        assert_eq!(classify(&p), Kind::Disco);
        assert_eq!(&p[..6], "TS💬".as_bytes());
        let (from, got) = open(&b, &p).unwrap();
        assert_eq!(from, *a.public_key().as_bytes());
        assert_eq!(got, ping);
        let pong = Message::Pong {
            tx_id: [7; 12],
            src: "192.0.2.12:41641".parse().unwrap(),
        };
        let enc = pong.encode();
        assert_eq!(&enc[14..26], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(Message::decode(&enc).unwrap(), pong);
        assert_eq!(open(&key(3), &p), Err(DiscoError::Open));
    }

    #[test]
    fn the_box_is_nacl_tag_first() {
        // XSalsa20-Poly1305 puts the 16-byte tag before the ciphertext: the sealed part is
        // 16 bytes longer than the plaintext, and flipping its first byte breaks the tag.
        let (a, b) = (key(1), key(2));
        let msg = Message::CallMeMaybe {
            endpoints: vec!["[2001:db8::1]:41641".parse().unwrap()],
        };
        let mut p = seal(&a, &b.public_key(), [5; 24], &msg);
        assert_eq!(p.len(), HEADER + 16 + msg.encode().len());
        assert_eq!(open(&b, &p).unwrap().1, msg);
        p[HEADER] ^= 1;
        assert!(open(&b, &p).is_err());
    }

    #[test]
    fn malformed_input_is_an_error() {
        assert_eq!(sender(b"TS"), Err(DiscoError::NotDisco));
        assert!(Message::decode(&[]).is_err());
        assert!(Message::decode(&[TYPE_PING, 0, 1]).is_err());
        assert!(Message::decode(&[TYPE_PONG, 0, 1, 2]).is_err());
        assert_eq!(Message::decode(&[9, 0]), Err(DiscoError::Unsupported(9)));
        let stun = [
            0u8, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(classify(&stun), Kind::Stun);
        assert_eq!(classify(&[1, 0, 0, 0]), Kind::WireGuard);
    }
}
