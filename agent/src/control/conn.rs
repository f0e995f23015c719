//! The IO shell of the control channel: a byte stream over the Noise records, for HTTP/2.

use super::noise::Transport;
use super::record::{MAX_PLAINTEXT, RecordReader, seal_records};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

/// Plaintext over controlbase records on top of `S` (TLS or TCP).
pub struct NoiseStream<S> {
    inner: S,
    transport: Transport,
    reader: RecordReader,
    /// Plaintext already opened but not yet read.
    plain: Vec<u8>,
    plain_pos: usize,
    /// Sealed bytes not yet written to `inner`.
    out: Vec<u8>,
    out_pos: usize,
    /// When bytes last came from the server.
    received: watch::Sender<Instant>,
}

impl<S> NoiseStream<S> {
    /// `leftover` are bytes read from `inner` past the handshake answer.
    pub fn new(inner: S, transport: Transport, leftover: &[u8]) -> Self {
        let mut reader = RecordReader::default();
        reader.push(leftover);
        Self {
            inner,
            transport,
            reader,
            plain: vec![],
            plain_pos: 0,
            out: vec![],
            out_pos: 0,
            received: watch::Sender::new(Instant::now()),
        }
    }

    /// When bytes last came from the server: a liveness sign that does not wait for an
    /// answer queued behind a large response.
    pub fn received(&self) -> watch::Receiver<Instant> {
        self.received.subscribe()
    }

    /// Puts plaintext back in front of the stream (after peeking at the early payload).
    pub fn unread(&mut self, bytes: &[u8]) {
        let mut v = bytes.to_vec();
        v.extend_from_slice(&self.plain[self.plain_pos..]);
        self.plain = v;
        self.plain_pos = 0;
    }
}

fn to_io(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl<S: AsyncRead + Unpin> AsyncRead for NoiseStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.plain_pos < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.plain_pos);
                buf.put_slice(&this.plain[this.plain_pos..this.plain_pos + n]);
                this.plain_pos += n;
                return Poll::Ready(Ok(()));
            }
            if let Some(p) = this.reader.next(&mut this.transport.recv).map_err(to_io)? {
                this.plain = p;
                this.plain_pos = 0;
                continue;
            }
            let mut tmp = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut tmp);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            this.received.send_replace(Instant::now());
            this.reader.push(rb.filled());
        }
    }
}

impl<S: AsyncWrite + Unpin> NoiseStream<S> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.out.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        self.out.clear();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for NoiseStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        // Take new data only once earlier records are on their way: bounded buffering.
        ready!(this.poll_drain(cx))?;
        let n = data.len().min(MAX_PLAINTEXT * 4);
        seal_records(&mut this.transport.send, &data[..n], &mut this.out).map_err(to_io)?;
        // Best effort now; what is left goes out on the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
