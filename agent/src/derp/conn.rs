//! One DERP region's connection: TLS, the `/derp` upgrade, then frames both ways. Reconnects
//! with backoff until the region is dropped. Packets received go to `inbound`; frames to send
//! come from `outbound`.

use super::{Client, Event};
use crate::backoff::{Backoff, jitter};
use crate::control::client::{self, ServerUrl};
use crate::error::{Error, Result};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// After this long without a byte from the server we send a DERP ping; the server answers
/// at once (its own keep-alives come only every minute).
const PING_AFTER: Duration = Duration::from_secs(15);
/// Without a byte from the server for this long the connection is dead: a stream dropped
/// silently is noticed in half a minute, not tailscaled's two.
const DEAD_AFTER: Duration = Duration::from_secs(30);
/// A write that cannot finish in this long (the server stopped reading) ends the connection;
/// it must not hold up the read side's deadline.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where one region's DERP server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub region: u32,
    /// The name TLS verifies (the node's HostName).
    pub url: ServerUrl,
    /// Where to connect: the node's IPv4 if the map gives one, else the host name.
    pub connect: String,
}

/// Handles to a running region connection.
pub struct Handle {
    pub outbound: mpsc::Sender<Vec<u8>>,
    pub preferred: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Handle {
    /// Tells the server whether it is our home (only the home region gets it set).
    pub fn set_preferred(&self, preferred: bool) {
        if self.preferred.swap(preferred, Ordering::Relaxed) != preferred {
            let _ = self.outbound.try_send(super::encode(
                super::FRAME_NOTE_PREFERRED,
                &[preferred as u8],
            ));
        }
    }
}

/// Starts the connection task for `target`.
pub fn spawn(
    rt: &tokio::runtime::Handle,
    target: Target,
    node: crypto_box::SecretKey,
    tls: Arc<rustls::ClientConfig>,
    preferred: bool,
    inbound: mpsc::Sender<(u32, Event)>,
) -> Handle {
    let (outbound, rx) = mpsc::channel(512);
    let preferred = Arc::new(AtomicBool::new(preferred));
    let task = rt.spawn(run(target, node, tls, preferred.clone(), rx, inbound));
    Handle {
        outbound,
        preferred,
        task,
    }
}

async fn run(
    target: Target,
    node: crypto_box::SecretKey,
    tls: Arc<rustls::ClientConfig>,
    preferred: Arc<AtomicBool>,
    mut outbound: mpsc::Receiver<Vec<u8>>,
    inbound: mpsc::Sender<(u32, Event)>,
) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        let pref = preferred.load(Ordering::Relaxed);
        let started = tokio::time::Instant::now();
        let err = match session(&target, &node, &tls, pref, &mut outbound, &inbound).await {
            Ok(never) => match never {},
            Err(e) => derp_err(e),
        };
        if started.elapsed() > Duration::from_secs(60) {
            backoff.reset();
        }
        let delay = match err {
            Error::Derp(ref m) if m.starts_with("restarting") => Duration::from_secs(1),
            _ => backoff.next(jitter()),
        };
        warn!(region = target.region, error = %err, retry_in = ?delay, "DERP connection lost");
        // Packets queued for a dead connection are stale; the peers retransmit.
        while outbound.try_recv().is_ok() {}
        tokio::time::sleep(delay).await;
    }
}

fn derp_err(e: Error) -> Error {
    match e {
        Error::Control(m) | Error::Unreachable(m) => Error::Derp(m),
        other => other,
    }
}

/// `GET /derp` with `Upgrade: DERP`; returns the bytes after the answer's head.
async fn upgrade(target: &Target, io: &mut Box<dyn client::Io>) -> Result<Vec<u8>> {
    let req = format!(
        "GET /derp HTTP/1.1\r\nHost: {}\r\nUser-Agent: vpn-agent\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n",
        target.url.host_header()
    );
    io.write_all(req.as_bytes())
        .await
        .map_err(|e| Error::Derp(format!("sending the /derp upgrade: {e}")))?;
    let (status, _, rest) = client::read_head(io).await?;
    if status != 101 {
        return Err(Error::Derp(format!(
            "{} answered /derp with HTTP {status} instead of switching to DERP",
            target.url.host_header()
        )));
    }
    Ok(rest)
}

/// One connection, until it fails.
async fn session(
    target: &Target,
    node: &crypto_box::SecretKey,
    tls: &Arc<rustls::ClientConfig>,
    preferred: bool,
    outbound: &mut mpsc::Receiver<Vec<u8>>,
    inbound: &mpsc::Sender<(u32, Event)>,
) -> Result<std::convert::Infallible> {
    let mut io = client::dial_via(&target.connect, &target.url, tls).await?;
    let rest = client::deadline(
        "the /derp upgrade",
        client::STEP_TIMEOUT,
        upgrade(target, &mut io),
    )
    .await?;
    let mut nonce = [0u8; 24];
    getrandom::getrandom(&mut nonce).map_err(|e| Error::Derp(format!("random nonce: {e}")))?;
    let mut client = Client::new(node.clone(), nonce, preferred);
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut buf = vec![0u8; 64 << 10];
    let (mut write, mut events) = (vec![], vec![]);
    let mut pending = rest;
    let mut last_read = tokio::time::Instant::now();
    let mut pinged = false;
    loop {
        client
            .receive(&pending, &mut write, &mut events)
            .map_err(|e| Error::Derp(e.to_string()))?;
        if !write.is_empty() {
            tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&write))
                .await
                .map_err(|_| {
                    Error::Derp(format!("a write did not finish within {WRITE_TIMEOUT:?}"))
                })?
                .map_err(|e| Error::Derp(format!("write: {e}")))?;
            write.clear();
        }
        for ev in events.drain(..) {
            match ev {
                Event::Ready => {
                    info!(region = target.region, server = %target.url.host_header(), preferred, "DERP connected")
                }
                Event::Restarting { reconnect_ms, .. } => {
                    return Err(Error::Derp(format!(
                        "restarting: the server restarts, reconnecting in {reconnect_ms} ms"
                    )));
                }
                Event::Health(h) if !h.is_empty() => {
                    warn!(region = target.region, problem = %h, "DERP server health")
                }
                Event::PeerGone { key, reason } => {
                    debug!(region = target.region, peer = ?&key[..4], reason, "DERP peer gone")
                }
                ev => {
                    if inbound.send((target.region, ev)).await.is_err() {
                        return Err(Error::Derp("data plane stopped".into()));
                    }
                }
            }
        }
        pending.clear();
        let quiet_until = last_read + if pinged { DEAD_AFTER } else { PING_AFTER };
        tokio::select! {
            r = rd.read(&mut buf) => {
                let n = r.map_err(|e| Error::Derp(format!("read: {e}")))?;
                if n == 0 {
                    return Err(Error::Derp("the server closed the connection".into()));
                }
                pending.extend_from_slice(&buf[..n]);
                last_read = tokio::time::Instant::now();
                pinged = false;
            }
            _ = tokio::time::sleep_until(quiet_until) => {
                if pinged {
                    return Err(Error::Derp(format!("nothing from the server for {DEAD_AFTER:?}, not even a pong")));
                }
                let mut data = [0u8; 8];
                let _ = getrandom::getrandom(&mut data);
                write.extend_from_slice(&super::encode(super::FRAME_PING, &data));
                pinged = true;
            }
            Some(frame) = outbound.recv(), if client.is_ready() => {
                write.extend_from_slice(&frame);
                // Batch what is already queued into one TLS write.
                while write.len() < 64 << 10 {
                    match outbound.try_recv() {
                        Ok(f) => write.extend_from_slice(&f),
                        Err(_) => break,
                    }
                }
            }
        }
    }
}
