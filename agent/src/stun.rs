//! STUN binding requests, as tailscale's netcheck sends them, to learn the address our UDP
//! socket has as seen from a DERP region (our endpoint behind NAT). Pure.
//!
//! headscale's STUN server only answers requests with SOFTWARE "tailnode" and a valid
//! FINGERPRINT; others are ignored silently.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
const BINDING_REQUEST: [u8; 2] = [0x00, 0x01];
const BINDING_SUCCESS: [u8; 2] = [0x01, 0x01];
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const ATTR_XOR_MAPPED_ADDRESS_OLD: u16 = 0x8020;
const ATTR_SOFTWARE: u16 = 0x8022;
const ATTR_FINGERPRINT: u16 = 0x8028;
const SOFTWARE: &[u8; 8] = b"tailnode";
const FINGERPRINT_XOR: u32 = 0x5354_554e;

pub type TxId = [u8; 12];

/// A binding request with transaction id `tx`.
pub fn request(tx: TxId) -> Vec<u8> {
    let attrs_len = (4 + SOFTWARE.len() + 8) as u16;
    let mut p = Vec::with_capacity(20 + attrs_len as usize);
    p.extend_from_slice(&BINDING_REQUEST);
    p.extend_from_slice(&attrs_len.to_be_bytes());
    p.extend_from_slice(&COOKIE);
    p.extend_from_slice(&tx);
    p.extend_from_slice(&ATTR_SOFTWARE.to_be_bytes());
    p.extend_from_slice(&(SOFTWARE.len() as u16).to_be_bytes());
    p.extend_from_slice(SOFTWARE);
    let crc = crc32fast::hash(&p) ^ FINGERPRINT_XOR;
    p.extend_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
    p.extend_from_slice(&4u16.to_be_bytes());
    p.extend_from_slice(&crc.to_be_bytes());
    p
}

/// The transaction id and mapped address of a binding response; `None` for anything else.
pub fn parse_response(p: &[u8]) -> Option<(TxId, SocketAddr)> {
    if p.len() < 20 || p[..2] != BINDING_SUCCESS || p[4..8] != COOKIE {
        return None;
    }
    let tx: TxId = p[8..20].try_into().ok()?;
    let len = u16::from_be_bytes([p[2], p[3]]) as usize;
    let mut attrs = p.get(20..20 + len)?;
    let mut fallback = None;
    while attrs.len() >= 4 {
        let kind = u16::from_be_bytes([attrs[0], attrs[1]]);
        let alen = u16::from_be_bytes([attrs[2], attrs[3]]) as usize;
        let value = attrs.get(4..4 + alen)?;
        match kind {
            ATTR_XOR_MAPPED_ADDRESS | ATTR_XOR_MAPPED_ADDRESS_OLD => {
                return Some((tx, address(value, Some(&tx))?));
            }
            ATTR_MAPPED_ADDRESS => fallback = address(value, None),
            _ => {}
        }
        // Attributes are padded to four bytes.
        attrs = attrs.get((4 + alen).next_multiple_of(4).min(attrs.len())..)?;
    }
    fallback.map(|a| (tx, a))
}

/// A (XOR-)MAPPED-ADDRESS value: reserved, family, port, address.
fn address(v: &[u8], xor_tx: Option<&TxId>) -> Option<SocketAddr> {
    let mut key = [0u8; 16];
    if let Some(tx) = xor_tx {
        key[..4].copy_from_slice(&COOKIE);
        key[4..].copy_from_slice(tx);
    }
    let port = u16::from_be_bytes([v.get(2)? ^ key[0], v.get(3)? ^ key[1]]);
    let ip = match v.get(1)? {
        1 => {
            let b: [u8; 4] = v.get(4..8)?.try_into().ok()?;
            IpAddr::V4(Ipv4Addr::from(std::array::from_fn::<u8, 4, _>(|i| {
                b[i] ^ key[i]
            })))
        }
        2 => {
            let b: [u8; 16] = v.get(4..20)?.try_into().ok()?;
            IpAddr::V6(Ipv6Addr::from(std::array::from_fn::<u8, 16, _>(|i| {
                b[i] ^ key[i]
            })))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response as tailscale's stun.Response builds it.
    fn response(tx: TxId, addr: SocketAddr) -> Vec<u8> {
        let mut v = vec![0u8, 0];
        let mut key = COOKIE.to_vec();
        key.extend_from_slice(&tx);
        let port = addr.port() ^ 0x2112;
        let ip: Vec<u8> = match addr.ip() {
            IpAddr::V4(a) => {
                v[1] = 1;
                a.octets().to_vec()
            }
            IpAddr::V6(a) => {
                v[1] = 2;
                a.octets().to_vec()
            }
        };
        v.extend_from_slice(&port.to_be_bytes());
        v.extend(ip.iter().zip(&key).map(|(a, k)| a ^ k));
        let mut p = BINDING_SUCCESS.to_vec();
        p.extend_from_slice(&((4 + v.len()) as u16).to_be_bytes());
        p.extend_from_slice(&COOKIE);
        p.extend_from_slice(&tx);
        p.extend_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
        p.extend_from_slice(&(v.len() as u16).to_be_bytes());
        p.extend(v);
        p
    }

    #[test]
    fn request_has_software_and_fingerprint() {
        let r = request([7; 12]);
        assert_eq!(r.len(), 20 + 12 + 8);
        assert_eq!(&r[2..4], &[0, 20]);
        assert_eq!(&r[24..32], b"tailnode");
        let crc = crc32fast::hash(&r[..32]) ^ FINGERPRINT_XOR;
        assert_eq!(&r[36..], &crc.to_be_bytes());
        assert_eq!(crate::disco::classify(&r), crate::disco::Kind::Stun);
    }

    #[test]
    fn responses_round_trip_v4_and_v6() {
        for a in ["203.0.113.2:61234", "[2001:db8::7]:41641"] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(parse_response(&response([3; 12], a)), Some(([3; 12], a)));
        }
    }

    #[test]
    fn junk_is_none() {
        assert_eq!(parse_response(&request([1; 12])), None);
        let mut r = response([3; 12], "192.0.2.1:1".parse().unwrap());
        r[3] = 200;
        assert_eq!(parse_response(&r), None);
        assert_eq!(parse_response(&r[..10]), None);
    }
}
