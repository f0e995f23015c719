//! controlbase record framing, pure: `[type=4][u16 BE length][ciphertext]`, at most 4096
//! bytes on the wire per record, so at most 4077 bytes of plaintext.

use super::noise::{CipherState, MSG_RECORD, NoiseError};

pub const MAX_FRAME: usize = 4096;
pub const HEADER: usize = 3;
pub const TAG: usize = 16;
pub const MAX_PLAINTEXT: usize = MAX_FRAME - HEADER - TAG;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("control record of type {0}, expected {MSG_RECORD}")]
    Type(u8),
    #[error("control record of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLong(usize),
    #[error(transparent)]
    Noise(#[from] NoiseError),
}

/// Seals `plain` into as many records as needed, appended to `out`.
pub fn seal_records(
    cipher: &mut CipherState,
    plain: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), RecordError> {
    for chunk in plain.chunks(MAX_PLAINTEXT) {
        let sealed = cipher.encrypt(chunk)?;
        out.push(MSG_RECORD);
        out.extend_from_slice(&(sealed.len() as u16).to_be_bytes());
        out.extend_from_slice(&sealed);
    }
    Ok(())
}

/// Collects bytes from the wire and opens whole records.
#[derive(Default)]
pub struct RecordReader {
    buf: Vec<u8>,
}

impl RecordReader {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next record's plaintext, `None` until a whole record has arrived.
    pub fn next(&mut self, cipher: &mut CipherState) -> Result<Option<Vec<u8>>, RecordError> {
        if self.buf.len() < HEADER {
            return Ok(None);
        }
        if self.buf[0] != MSG_RECORD {
            return Err(RecordError::Type(self.buf[0]));
        }
        let len = u16::from_be_bytes([self.buf[1], self.buf[2]]) as usize;
        if HEADER + len > MAX_FRAME {
            return Err(RecordError::TooLong(HEADER + len));
        }
        if self.buf.len() < HEADER + len {
            return Ok(None);
        }
        let plain = cipher.decrypt(&self.buf[HEADER..HEADER + len])?;
        self.buf.drain(..HEADER + len);
        Ok(Some(plain))
    }
}

#[cfg(test)]
mod tests {
    use super::super::noise::{
        Initiator,
        tests::{key, respond},
    };
    use super::*;
    use x25519_dalek::PublicKey;

    fn pair() -> (
        super::super::noise::Transport,
        super::super::noise::Transport,
    ) {
        let (init, msg) = Initiator::start(&key(2), &PublicKey::from(&key(1)), 130, key(3));
        let (resp, srv, _) = respond(&key(1), &msg, key(4));
        (init.finish(&resp).unwrap(), srv)
    }

    #[test]
    fn large_writes_split_and_arrive_byte_by_byte() {
        let (mut cli, mut srv) = pair();
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut wire = vec![];
        seal_records(&mut cli.send, &data, &mut wire).unwrap();
        assert_eq!(wire.len(), data.len() + 3 * (HEADER + TAG));
        let mut r = RecordReader::default();
        let mut got = vec![];
        for b in &wire {
            r.push(&[*b]);
            while let Some(p) = r.next(&mut srv.recv).unwrap() {
                assert!(p.len() <= MAX_PLAINTEXT);
                got.extend(p);
            }
        }
        assert_eq!(got, data);
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        let (_, mut srv) = pair();
        let mut r = RecordReader::default();
        r.push(&[9, 0, 0]);
        assert_eq!(r.next(&mut srv.recv), Err(RecordError::Type(9)));
        let mut r = RecordReader::default();
        r.push(&[4, 0xff, 0xff]);
        assert!(matches!(
            r.next(&mut srv.recv),
            Err(RecordError::TooLong(_))
        ));
        let mut r = RecordReader::default();
        r.push(&[4, 0, 17]);
        r.push(&[0; 17]);
        assert!(matches!(r.next(&mut srv.recv), Err(RecordError::Noise(_))));
    }
}
