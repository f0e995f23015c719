//! The ts2021 Noise IK handshake (client side), as tailscale's `controlbase` does it, and
//! the transport cipher state it yields. Pure: the caller supplies the ephemeral key.
//!
//! `Noise_IK_25519_ChaChaPoly_BLAKE2s` with the prologue
//! `Tailscale Control Protocol v<capver>`; the 101-byte initiation carries a 2-byte protocol
//! version in front. Transport nonces are the counter as a **big-endian** u64 after four zero
//! bytes, unlike the Noise spec's little-endian (tailscale's choice; a snow-based transport
//! would fail on the second record).

use blake2::{Blake2s256, Digest};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Mac, SimpleHmac};
use x25519_dalek::{PublicKey, StaticSecret};

const PROTOCOL_NAME: &[u8] = b"Noise_IK_25519_ChaChaPoly_BLAKE2s";
const PROLOGUE: &str = "Tailscale Control Protocol v";

pub const MSG_INITIATION: u8 = 1;
pub const MSG_RESPONSE: u8 = 2;
pub const MSG_ERROR: u8 = 3;
pub const MSG_RECORD: u8 = 4;

/// Length of the client's first message.
pub const INITIATION_LEN: usize = 101;
/// Length of the server's answer.
pub const RESPONSE_LEN: usize = 51;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NoiseError {
    #[error("control server's handshake answer is malformed: {0}")]
    Malformed(&'static str),
    #[error("control server refused the handshake: {0}")]
    Refused(String),
    #[error("control server's handshake answer does not authenticate (wrong server key?)")]
    Authentication,
    #[error("a control record failed to decrypt")]
    Decrypt,
    #[error("the control connection's nonce space is exhausted")]
    NonceExhausted,
}

fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <SimpleHmac<Blake2s256> as Mac>::new_from_slice(key).expect("any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// Noise's HKDF with two outputs.
fn hkdf(ck: &[u8; 32], ikm: &[u8]) -> ([u8; 32], [u8; 32]) {
    let temp = hmac(ck, &[ikm]);
    let o1 = hmac(&temp, &[&[1]]);
    let o2 = hmac(&temp, &[&o1, &[2]]);
    (o1, o2)
}

fn seal(key: &[u8; 32], nonce: &[u8; 12], ad: &[u8], plain: &[u8]) -> Vec<u8> {
    ChaCha20Poly1305::new(Key::from_slice(key))
        .encrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: plain,
                aad: ad,
            },
        )
        .expect("encryption cannot fail")
}

fn open(key: &[u8; 32], nonce: &[u8; 12], ad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    ChaCha20Poly1305::new(Key::from_slice(key))
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: sealed,
                aad: ad,
            },
        )
        .ok()
}

/// The client's state between sending the initiation and reading the answer.
pub struct Initiator {
    h: [u8; 32],
    ck: [u8; 32],
    ephemeral: StaticSecret,
    machine: StaticSecret,
}

impl Initiator {
    /// Starts a handshake with the control server's static key `server`, as machine key
    /// `machine`, claiming capability version `version`. Returns the state and the
    /// 101-byte initiation message.
    pub fn start(
        machine: &StaticSecret,
        server: &PublicKey,
        version: u16,
        ephemeral: StaticSecret,
    ) -> (Initiator, [u8; INITIATION_LEN]) {
        let mut h = hash(&[PROTOCOL_NAME]);
        let mut ck = h;
        h = hash(&[&h, format!("{PROLOGUE}{version}").as_bytes()]);
        h = hash(&[&h, server.as_bytes()]);
        let e_pub = PublicKey::from(&ephemeral);
        h = hash(&[&h, e_pub.as_bytes()]);
        let (ck1, k) = hkdf(&ck, ephemeral.diffie_hellman(server).as_bytes());
        ck = ck1;
        let machine_pub = PublicKey::from(machine);
        let c = seal(&k, &[0; 12], &h, machine_pub.as_bytes());
        h = hash(&[&h, &c]);
        let (ck2, k) = hkdf(&ck, machine.diffie_hellman(server).as_bytes());
        ck = ck2;
        let t = seal(&k, &[0; 12], &h, &[]);
        h = hash(&[&h, &t]);

        let mut msg = [0u8; INITIATION_LEN];
        msg[..2].copy_from_slice(&version.to_be_bytes());
        msg[2] = MSG_INITIATION;
        msg[3..5].copy_from_slice(&96u16.to_be_bytes());
        msg[5..37].copy_from_slice(e_pub.as_bytes());
        msg[37..85].copy_from_slice(&c);
        msg[85..101].copy_from_slice(&t);
        (
            Initiator {
                h,
                ck,
                ephemeral,
                machine: machine.clone(),
            },
            msg,
        )
    }

    /// Reads the server's answer (the 51-byte response, or an error message) and returns
    /// the transport ciphers.
    pub fn finish(self, answer: &[u8]) -> Result<Transport, NoiseError> {
        let (&typ, rest) = answer.split_first().ok_or(NoiseError::Malformed("empty"))?;
        if rest.len() < 2 {
            return Err(NoiseError::Malformed("short header"));
        }
        let len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
        let body = rest
            .get(2..2 + len)
            .ok_or(NoiseError::Malformed("short body"))?;
        match typ {
            MSG_ERROR => {
                return Err(NoiseError::Refused(
                    String::from_utf8_lossy(body).into_owned(),
                ));
            }
            MSG_RESPONSE if len == 48 => {}
            MSG_RESPONSE => return Err(NoiseError::Malformed("response length is not 48")),
            _ => return Err(NoiseError::Malformed("unexpected message type")),
        }
        let re: [u8; 32] = body[..32].try_into().expect("48 bytes");
        let re = PublicKey::from(re);
        let tag = &body[32..48];
        let mut h = hash(&[&self.h, re.as_bytes()]);
        let (ck, _) = hkdf(&self.ck, self.ephemeral.diffie_hellman(&re).as_bytes());
        let (ck, k) = hkdf(&ck, self.machine.diffie_hellman(&re).as_bytes());
        open(&k, &[0; 12], &h, tag).ok_or(NoiseError::Authentication)?;
        h = hash(&[&h, tag]);
        let _ = h;
        let (send, recv) = hkdf(&ck, &[]);
        Ok(Transport {
            send: CipherState::new(send),
            recv: CipherState::new(recv),
        })
    }
}

/// One direction's key and nonce counter.
pub struct CipherState {
    key: [u8; 32],
    n: u64,
}

impl CipherState {
    pub fn new(key: [u8; 32]) -> Self {
        Self { key, n: 0 }
    }

    fn next_nonce(&mut self) -> Result<[u8; 12], NoiseError> {
        if self.n == u64::MAX {
            return Err(NoiseError::NonceExhausted);
        }
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&self.n.to_be_bytes());
        self.n += 1;
        Ok(nonce)
    }

    pub fn encrypt(&mut self, plain: &[u8]) -> Result<Vec<u8>, NoiseError> {
        let nonce = self.next_nonce()?;
        Ok(seal(&self.key, &nonce, &[], plain))
    }

    pub fn decrypt(&mut self, sealed: &[u8]) -> Result<Vec<u8>, NoiseError> {
        let nonce = self.next_nonce()?;
        open(&self.key, &nonce, &[], sealed).ok_or(NoiseError::Decrypt)
    }
}

/// The ciphers for the established connection: `send` for client→server records.
pub struct Transport {
    pub send: CipherState,
    pub recv: CipherState,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The server side of the handshake, written from the Noise spec independently of the
    /// client code above, so the two check each other.
    pub(crate) fn respond(
        server: &StaticSecret,
        init: &[u8; INITIATION_LEN],
        eph: StaticSecret,
    ) -> ([u8; RESPONSE_LEN], Transport, [u8; 32]) {
        let version = u16::from_be_bytes([init[0], init[1]]);
        assert_eq!(init[2], MSG_INITIATION);
        let s_pub = PublicKey::from(server);
        let mut h = hash(&[PROTOCOL_NAME]);
        let ck = h;
        h = hash(&[&h, format!("{PROLOGUE}{version}").as_bytes()]);
        h = hash(&[&h, s_pub.as_bytes()]);
        let ie: [u8; 32] = init[5..37].try_into().unwrap();
        let ie = PublicKey::from(ie);
        h = hash(&[&h, ie.as_bytes()]);
        let (ck, k) = hkdf(&ck, server.diffie_hellman(&ie).as_bytes());
        let c = &init[37..85];
        let machine: [u8; 32] = open(&k, &[0; 12], &h, c).expect("machine key decrypts")[..]
            .try_into()
            .unwrap();
        h = hash(&[&h, c]);
        let machine = PublicKey::from(machine);
        let (ck, k) = hkdf(&ck, server.diffie_hellman(&machine).as_bytes());
        open(&k, &[0; 12], &h, &init[85..101]).expect("payload tag");
        h = hash(&[&h, &init[85..101]]);
        let e_pub = PublicKey::from(&eph);
        h = hash(&[&h, e_pub.as_bytes()]);
        let (ck, _) = hkdf(&ck, eph.diffie_hellman(&ie).as_bytes());
        let (ck, k) = hkdf(&ck, eph.diffie_hellman(&machine).as_bytes());
        let tag = seal(&k, &[0; 12], &h, &[]);
        let mut resp = [0u8; RESPONSE_LEN];
        resp[0] = MSG_RESPONSE;
        resp[1..3].copy_from_slice(&48u16.to_be_bytes());
        resp[3..35].copy_from_slice(e_pub.as_bytes());
        resp[35..51].copy_from_slice(&tag);
        let (c2s, s2c) = hkdf(&ck, &[]);
        (
            resp,
            Transport {
                send: CipherState::new(s2c),
                recv: CipherState::new(c2s),
            },
            *machine.as_bytes(),
        )
    }

    pub(crate) fn key(b: u8) -> StaticSecret {
        StaticSecret::from([b; 32])
    }

    #[test]
    fn handshake_agrees_with_an_independent_responder() {
        let server = key(1);
        let machine = key(2);
        let (init, msg) = Initiator::start(&machine, &PublicKey::from(&server), 130, key(3));
        assert_eq!(&msg[..5], &[0, 130, 1, 0, 96]);
        let (resp, mut srv, seen_machine) = respond(&server, &msg, key(4));
        assert_eq!(seen_machine, *PublicKey::from(&machine).as_bytes());
        let mut cli = init.finish(&resp).unwrap();
        for i in 0..3 {
            let m = format!("record {i}");
            let sealed = cli.send.encrypt(m.as_bytes()).unwrap();
            assert_eq!(srv.recv.decrypt(&sealed).unwrap(), m.as_bytes());
            let back = srv.send.encrypt(b"pong").unwrap();
            assert_eq!(cli.recv.decrypt(&back).unwrap(), b"pong");
        }
    }

    #[test]
    fn nonces_are_big_endian() {
        let mut c = CipherState::new([7; 32]);
        c.n = 1;
        assert_eq!(
            c.next_nonce().unwrap(),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
        );
        c.n = u64::MAX;
        assert_eq!(c.next_nonce(), Err(NoiseError::NonceExhausted));
    }

    #[test]
    fn a_wrong_server_key_or_an_error_answer_fails() {
        let (init, msg) = Initiator::start(&key(2), &PublicKey::from(&key(1)), 130, key(3));
        let (resp, _, _) = respond(&key(1), &msg, key(4));
        let mut bad = resp;
        bad[40] ^= 1;
        assert_eq!(init.finish(&bad).err(), Some(NoiseError::Authentication));
        let (init, _) = Initiator::start(&key(2), &PublicKey::from(&key(1)), 130, key(3));
        let err = [MSG_ERROR, 0, 4, b'n', b'o', b'p', b'e'];
        assert_eq!(
            init.finish(&err).err(),
            Some(NoiseError::Refused("nope".into()))
        );
        let (init, _) = Initiator::start(&key(2), &PublicKey::from(&key(1)), 130, key(3));
        assert!(init.finish(&[MSG_RESPONSE, 0, 48, 1]).is_err());
    }
}
