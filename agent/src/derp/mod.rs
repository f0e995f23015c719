//! DERP, tailscale's relay: the frame codec and the client's login state machine. Pure:
//! bytes in, frames to write and events out. `derp::conn` moves the bytes over TLS.
//!
//! Frame: `[type u8][length u32 BE][payload]`. Login: the server sends its key, we send a
//! NaCl box of `{"version":2,"CanAckPings":true}` from our node key, it answers with a box
//! of its own info; then packets are addressed by node key.

pub mod conn;

use crypto_box::aead::Aead;
use crypto_box::{PublicKey, SalsaBox, SecretKey};

pub const PROTOCOL_VERSION: u32 = 2;
/// tailscale's client refuses larger frames; so do we.
pub const MAX_FRAME: usize = 1 << 20;
/// The largest packet a SendPacket may carry.
pub const MAX_PACKET: usize = 64 << 10;
const MAGIC: &[u8; 8] = b"DERP\xf0\x9f\x94\x91";
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;

pub const FRAME_SERVER_KEY: u8 = 0x01;
pub const FRAME_CLIENT_INFO: u8 = 0x02;
pub const FRAME_SERVER_INFO: u8 = 0x03;
pub const FRAME_SEND_PACKET: u8 = 0x04;
pub const FRAME_RECV_PACKET: u8 = 0x05;
pub const FRAME_KEEP_ALIVE: u8 = 0x06;
pub const FRAME_NOTE_PREFERRED: u8 = 0x07;
pub const FRAME_PEER_GONE: u8 = 0x08;
pub const FRAME_PING: u8 = 0x12;
pub const FRAME_PONG: u8 = 0x13;
pub const FRAME_HEALTH: u8 = 0x14;
pub const FRAME_RESTARTING: u8 = 0x15;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DerpError {
    #[error("DERP frame of {0} bytes exceeds the 1 MiB limit")]
    TooLarge(usize),
    #[error("DERP server key frame is malformed (not a DERP server?)")]
    BadServerKey,
    #[error("DERP server info does not open with our node key")]
    BadServerInfo,
    #[error("DERP frame type {kind:#04x} is malformed: {why}")]
    Malformed { kind: u8, why: &'static str },
    #[error("DERP server sent frame type {0:#04x} before the login finished")]
    Unexpected(u8),
}

/// One frame: type and payload.
pub fn encode(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(kind);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A SendPacket frame for `dst` (a node key).
pub fn send_packet(dst: &[u8; 32], packet: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + KEY_LEN + packet.len());
    out.push(FRAME_SEND_PACKET);
    out.extend_from_slice(&((KEY_LEN + packet.len()) as u32).to_be_bytes());
    out.extend_from_slice(dst);
    out.extend_from_slice(packet);
    out
}

/// Splits a byte stream into frames.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
}

impl Decoder {
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<(u8, Vec<u8>)>, DerpError> {
        let b = &self.buf[self.start..];
        if b.len() < 5 {
            self.compact();
            return Ok(None);
        }
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        if len > MAX_FRAME {
            return Err(DerpError::TooLarge(len));
        }
        if b.len() < 5 + len {
            self.compact();
            return Ok(None);
        }
        let frame = (b[0], b[5..5 + len].to_vec());
        self.start += 5 + len;
        Ok(Some(frame))
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

/// What the server told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Login done: packets can flow.
    Ready,
    /// A packet (WireGuard or disco) from the peer with node key `src`.
    Packet { src: [u8; 32], packet: Vec<u8> },
    /// The peer is not (or no longer) connected to this server.
    PeerGone { key: [u8; 32], reason: u8 },
    /// A problem the server reports; empty clears it.
    Health(String),
    /// The server restarts: reconnect after `reconnect_ms`.
    Restarting { reconnect_ms: u32, try_for_ms: u32 },
}

#[derive(Debug)]
enum State {
    AwaitServerKey,
    AwaitServerInfo(PublicKey),
    Ready,
}

/// The client side of one DERP connection.
pub struct Client {
    secret: SecretKey,
    nonce: [u8; NONCE_LEN],
    preferred: bool,
    state: State,
    decoder: Decoder,
}

impl Client {
    /// `secret` is our node key; `nonce` (random) seals our login; `preferred` says whether
    /// this region is our home.
    pub fn new(secret: SecretKey, nonce: [u8; NONCE_LEN], preferred: bool) -> Client {
        Client {
            secret,
            nonce,
            preferred,
            state: State::AwaitServerKey,
            decoder: Decoder::default(),
        }
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.state, State::Ready)
    }

    /// Bytes read from the server: frames to write go to `write`, what happened to `events`.
    pub fn receive(
        &mut self,
        bytes: &[u8],
        write: &mut Vec<u8>,
        events: &mut Vec<Event>,
    ) -> Result<(), DerpError> {
        self.decoder.push(bytes);
        while let Some((kind, payload)) = self.decoder.next_frame()? {
            self.frame(kind, payload, write, events)?;
        }
        Ok(())
    }

    fn frame(
        &mut self,
        kind: u8,
        payload: Vec<u8>,
        write: &mut Vec<u8>,
        events: &mut Vec<Event>,
    ) -> Result<(), DerpError> {
        match (&self.state, kind) {
            (State::AwaitServerKey, FRAME_SERVER_KEY) => {
                if payload.len() < MAGIC.len() + KEY_LEN || !payload.starts_with(MAGIC) {
                    return Err(DerpError::BadServerKey);
                }
                let server: [u8; 32] = payload[8..40].try_into().expect("32 bytes");
                let server = PublicKey::from(server);
                write.extend_from_slice(&self.client_info(&server));
                self.state = State::AwaitServerInfo(server);
            }
            (State::AwaitServerInfo(server), FRAME_SERVER_INFO) => {
                if payload.len() < NONCE_LEN {
                    return Err(DerpError::BadServerInfo);
                }
                let nonce: [u8; NONCE_LEN] = payload[..NONCE_LEN].try_into().expect("24");
                SalsaBox::new(server, &self.secret)
                    .decrypt(&nonce.into(), &payload[NONCE_LEN..])
                    .map_err(|_| DerpError::BadServerInfo)?;
                write.extend_from_slice(&encode(FRAME_NOTE_PREFERRED, &[self.preferred as u8]));
                self.state = State::Ready;
                events.push(Event::Ready);
            }
            (State::Ready, _) => ready_frame(kind, payload, write, events)?,
            (_, FRAME_PING) => write.extend_from_slice(&encode(FRAME_PONG, &ping_data(&payload)?)),
            (_, FRAME_KEEP_ALIVE | FRAME_HEALTH) => {}
            (_, other) => return Err(DerpError::Unexpected(other)),
        }
        Ok(())
    }

    fn client_info(&self, server: &PublicKey) -> Vec<u8> {
        let info = format!(r#"{{"version":{PROTOCOL_VERSION},"CanAckPings":true}}"#);
        let sealed = SalsaBox::new(server, &self.secret)
            .encrypt(&self.nonce.into(), info.as_bytes())
            .expect("sealing cannot fail");
        let mut p = Vec::with_capacity(KEY_LEN + NONCE_LEN + sealed.len());
        p.extend_from_slice(self.secret.public_key().as_bytes());
        p.extend_from_slice(&self.nonce);
        p.extend_from_slice(&sealed);
        encode(FRAME_CLIENT_INFO, &p)
    }
}

fn ping_data(payload: &[u8]) -> Result<[u8; 8], DerpError> {
    payload
        .get(..8)
        .and_then(|d| d.try_into().ok())
        .ok_or(DerpError::Malformed {
            kind: FRAME_PING,
            why: "shorter than 8 bytes",
        })
}

fn key_of(kind: u8, payload: &[u8]) -> Result<[u8; 32], DerpError> {
    payload
        .get(..KEY_LEN)
        .and_then(|k| k.try_into().ok())
        .ok_or(DerpError::Malformed {
            kind,
            why: "shorter than a key",
        })
}

/// Frames after login. Unknown types are skipped, as the protocol asks.
fn ready_frame(
    kind: u8,
    mut payload: Vec<u8>,
    write: &mut Vec<u8>,
    events: &mut Vec<Event>,
) -> Result<(), DerpError> {
    match kind {
        FRAME_RECV_PACKET => {
            let src = key_of(kind, &payload)?;
            payload.drain(..KEY_LEN);
            events.push(Event::Packet {
                src,
                packet: payload,
            });
        }
        FRAME_PING => write.extend_from_slice(&encode(FRAME_PONG, &ping_data(&payload)?)),
        FRAME_PEER_GONE => events.push(Event::PeerGone {
            key: key_of(kind, &payload)?,
            reason: payload.get(KEY_LEN).copied().unwrap_or(0),
        }),
        FRAME_HEALTH => events.push(Event::Health(
            String::from_utf8_lossy(&payload).into_owned(),
        )),
        FRAME_RESTARTING => {
            let ms = |i: usize| {
                payload
                    .get(i..i + 4)
                    .map(|b| u32::from_be_bytes(b.try_into().expect("4")))
                    .unwrap_or(0)
            };
            events.push(Event::Restarting {
                reconnect_ms: ms(0),
                try_for_ms: ms(4),
            });
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server's half of the login, as tailscale's derpserver does it.
    fn server_key_frame(server: &SecretKey) -> Vec<u8> {
        let mut p = MAGIC.to_vec();
        p.extend_from_slice(server.public_key().as_bytes());
        encode(FRAME_SERVER_KEY, &p)
    }

    fn logged_in() -> (Client, SecretKey, SecretKey) {
        let (ours, server) = (SecretKey::from([1; 32]), SecretKey::from([2; 32]));
        let mut c = Client::new(ours.clone(), [3; 24], true);
        let (mut w, mut ev) = (vec![], vec![]);
        c.receive(&server_key_frame(&server), &mut w, &mut ev)
            .unwrap();
        // The client info: our key, a nonce, the sealed JSON.
        let mut d = Decoder::default();
        d.push(&w);
        let (kind, p) = d.next_frame().unwrap().unwrap();
        assert_eq!(kind, FRAME_CLIENT_INFO);
        assert_eq!(&p[..32], ours.public_key().as_bytes());
        let json = SalsaBox::new(&ours.public_key(), &server)
            .decrypt(crypto_box::Nonce::from_slice(&p[32..56]), &p[56..])
            .unwrap();
        assert_eq!(json, br#"{"version":2,"CanAckPings":true}"#);
        let info = SalsaBox::new(&ours.public_key(), &server)
            .encrypt(&[4u8; 24].into(), &b"{\"version\":2}"[..])
            .unwrap();
        let mut p = vec![4u8; 24];
        p.extend_from_slice(&info);
        let (mut w, mut ev) = (vec![], vec![]);
        c.receive(&encode(FRAME_SERVER_INFO, &p), &mut w, &mut ev)
            .unwrap();
        assert_eq!(ev, vec![Event::Ready]);
        assert_eq!(w, encode(FRAME_NOTE_PREFERRED, &[1]));
        (c, ours, server)
    }

    #[test]
    fn login_then_packets_byte_by_byte() {
        let (mut c, _, _) = logged_in();
        let mut stream = vec![];
        let mut recv = vec![9u8; 32];
        recv.extend_from_slice(b"wireguard");
        stream.extend(encode(FRAME_RECV_PACKET, &recv));
        stream.extend(encode(FRAME_PING, b"12345678"));
        stream.extend(encode(FRAME_KEEP_ALIVE, &[]));
        stream.extend(encode(0x7f, b"future"));
        let mut gone = vec![8u8; 32];
        gone.push(1);
        stream.extend(encode(FRAME_PEER_GONE, &gone));
        let (mut w, mut ev) = (vec![], vec![]);
        for b in &stream {
            c.receive(std::slice::from_ref(b), &mut w, &mut ev).unwrap();
        }
        assert_eq!(
            ev,
            vec![
                Event::Packet {
                    src: [9; 32],
                    packet: b"wireguard".to_vec()
                },
                Event::PeerGone {
                    key: [8; 32],
                    reason: 1
                }
            ]
        );
        assert_eq!(w, encode(FRAME_PONG, b"12345678"));
        let f = send_packet(&[7; 32], b"x");
        assert_eq!(&f[..5], &[FRAME_SEND_PACKET, 0, 0, 0, 33]);
    }

    #[test]
    fn bad_servers_are_errors() {
        let mut c = Client::new(SecretKey::from([1; 32]), [0; 24], false);
        let (mut w, mut ev) = (vec![], vec![]);
        assert_eq!(
            c.receive(&encode(FRAME_SERVER_KEY, b"HTTP/1.1 200"), &mut w, &mut ev),
            Err(DerpError::BadServerKey)
        );
        let mut c = Client::new(SecretKey::from([1; 32]), [0; 24], false);
        assert_eq!(
            c.receive(&[FRAME_RECV_PACKET, 0xff, 0, 0, 0], &mut w, &mut ev),
            Err(DerpError::TooLarge(0xff00_0000))
        );
        let mut c = Client::new(SecretKey::from([1; 32]), [0; 24], false);
        assert_eq!(
            c.receive(&encode(FRAME_RECV_PACKET, &[0; 40]), &mut w, &mut ev),
            Err(DerpError::Unexpected(FRAME_RECV_PACKET))
        );
        let server = SecretKey::from([2; 32]);
        let mut c = Client::new(SecretKey::from([1; 32]), [0; 24], false);
        c.receive(&server_key_frame(&server), &mut w, &mut ev)
            .unwrap();
        assert_eq!(
            c.receive(&encode(FRAME_SERVER_INFO, &[0; 60]), &mut w, &mut ev),
            Err(DerpError::BadServerInfo)
        );
        let (mut c, _, _) = logged_in();
        assert!(
            c.receive(&encode(FRAME_RECV_PACKET, &[1; 5]), &mut w, &mut ev)
                .is_err()
        );
        assert!(
            c.receive(&encode(FRAME_PING, &[1; 5]), &mut w, &mut ev)
                .is_err()
        );
    }
}
