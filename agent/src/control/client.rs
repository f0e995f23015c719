//! The control connection's IO: dial (TCP, TLS with rustls), fetch the server's Noise key,
//! upgrade `/ts2021`, run the handshake, skip the early payload, then HTTP/2 with `h2`.

use super::conn::NoiseStream;
use super::noise::{INITIATION_LEN, Initiator};
use super::types::{
    CAPABILITY_VERSION, MapRequest, MapResponse, RegisterRequest, RegisterResponse,
};
use crate::error::{Error, Result};
use crate::keys;
use base64::Engine;
use bytes::Bytes;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use x25519_dalek::{PublicKey, StaticSecret};

/// How long a TCP connect may take. Short: SYNs to a server that is away vanish, and the
/// next attempt comes soon (see the daemon's backoff) rather than after the kernel's two
/// minutes of retransmits.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long each later step may take: TLS, `GET /key`, the upgrade and Noise handshake,
/// the HTTP/2 handshake, one request's answer head.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Registration may make headscale check a key and write its database.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/2 PINGs on the control connection: a server that stopped answering is noticed
/// within `PING_EVERY + PING_TIMEOUT`, long before the map stream's own watchdog. An answer
/// may queue behind a large map on a slow link; while bytes keep coming, it is waited for.
const PING_EVERY: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// `fut`, or an error naming `what` once `limit` has passed. No answer counts as
/// unreachable: a stopped or wedged server is retried as soon as one that is away.
pub(crate) async fn deadline<T>(
    what: &str,
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| Error::Unreachable(format!("{what}: no answer within {limit:?}")))?
}

/// Largest early payload or non-streamed control response we accept (tailscale uses the
/// same bound for early payloads).
const MAX_MESSAGE: usize = 10 << 20;
/// Largest map message we accept, compressed or not. A full map costs about 1 KiB of JSON per
/// peer, so tens of thousands of peers fit; a broken or hostile server cannot make the agent
/// hold more than this.
pub const MAX_MAP_MESSAGE: usize = 256 << 20;
const EARLY_MAGIC: &[u8] = b"\xff\xff\xffTS";

/// headscale's address, from the config's ServerURL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    pub https: bool,
    pub host: String,
    pub port: u16,
}

impl ServerUrl {
    pub fn parse(url: &str) -> Result<ServerUrl> {
        let bad = || Error::Config(format!("ServerURL {url:?} is not http(s)://host[:port]"));
        let (https, rest) = match url.split_once("://") {
            Some(("https", r)) => (true, r),
            Some(("http", r)) => (false, r),
            _ => return Err(bad()),
        };
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse() {
                Ok(p) => (h, p),
                Err(_) => return Err(bad()),
            },
            _ => (authority, if https { 443 } else { 80 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad());
        }
        Ok(ServerUrl {
            https,
            host: host.to_string(),
            port,
        })
    }

    pub fn host_header(&self) -> String {
        let default = if self.https { 443 } else { 80 };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// TLS settings: the system's roots, plus a CA file if the config names one.
pub fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let certs: Vec<_> = CertificateDer::pem_file_iter(path)
            .map_err(|e| Error::Config(format!("ca_file {}: {e}", path.display())))?
            .collect::<Result<_, _>>()
            .map_err(|e| Error::Config(format!("ca_file {}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(Error::Config(format!(
                "ca_file {} holds no PEM certificate",
                path.display()
            )));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| Error::Config(format!("ca_file {}: {e}", path.display())))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn dial(url: &ServerUrl, tls: &Arc<rustls::ClientConfig>) -> Result<Box<dyn Io>> {
    dial_via(&url.host, url, tls).await
}

/// Connects to `connect` (an address for `url`'s host) and speaks TLS for `url`'s host.
pub(crate) async fn dial_via(
    connect: &str,
    url: &ServerUrl,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<Box<dyn Io>> {
    let unreachable =
        |e: String| Error::Unreachable(format!("cannot connect to {connect}:{}: {e}", url.port));
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, crate::uplink::connect(connect, url.port))
        .await
        .map_err(|_| unreachable(format!("no answer within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| unreachable(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    if !url.https {
        return Ok(Box::new(tcp));
    }
    let name = rustls::pki_types::ServerName::try_from(url.host.clone())
        .map_err(|e| Error::Config(format!("ServerURL host {:?}: {e}", url.host)))?;
    let tls = deadline("TLS handshake", STEP_TIMEOUT, async {
        tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| Error::Control(format!("TLS with {}:{} failed: {e}", url.host, url.port)))
    })
    .await?;
    Ok(Box::new(tls))
}

/// Reads an HTTP/1.1 response head; returns the status, the head text and the bytes after it.
pub(crate) async fn read_head(io: &mut Box<dyn Io>) -> Result<(u16, String, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| {
                    Error::Control(format!("not an HTTP answer: {:?}", head.lines().next()))
                })?;
            return Ok((status, head, buf[end + 4..].to_vec()));
        }
        if buf.len() > 64 * 1024 {
            return Err(Error::Control("HTTP answer head too long".into()));
        }
        let n = io
            .read(&mut chunk)
            .await
            .map_err(|e| Error::Control(format!("reading the HTTP answer: {e}")))?;
        if n == 0 {
            return Err(Error::Control(
                "the server closed the connection mid-answer".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = vec![];
    while let Some(line_end) = body.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&body[..line_end]).trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = line_end + 2;
        let end = (start + size).min(body.len());
        out.extend_from_slice(&body[start..end]);
        body = &body[(end + 2).min(body.len())..];
    }
    out
}

/// `GET /key?v=<capver>`: the control server's Noise public key.
pub async fn server_key(url: &ServerUrl, tls: &Arc<rustls::ClientConfig>) -> Result<PublicKey> {
    let mut io = dial(url, tls).await?;
    let body = deadline("GET /key", STEP_TIMEOUT, fetch_key(url, &mut io)).await?;
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        Error::Control(format!(
            "GET /key: not JSON ({e}); is this a headscale server?"
        ))
    })?;
    v["publicKey"]
        .as_str()
        .and_then(|s| keys::parse_public("mkey", s))
        .ok_or_else(|| {
            Error::Control(
                "GET /key: no publicKey in the answer; is this a headscale server?".into(),
            )
        })
}

/// Sends `method path` without a body, asking the server to close after its answer, and
/// reads the answer's head: status, head text, the bytes after it.
async fn simple_request(
    io: &mut Box<dyn Io>,
    method: &str,
    path: &str,
    url: &ServerUrl,
) -> Result<(u16, String, Vec<u8>)> {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: vpn-agent\r\nConnection: close\r\n\r\n",
        url.host_header()
    );
    io.write_all(req.as_bytes())
        .await
        .map_err(|e| Error::Control(format!("sending {method} {path}: {e}")))?;
    read_head(io).await
}

async fn fetch_key(url: &ServerUrl, io: &mut Box<dyn Io>) -> Result<Vec<u8>> {
    let path = format!("/key?v={CAPABILITY_VERSION}");
    let (status, head, mut body) = simple_request(io, "GET", &path, url).await?;
    io.read_to_end(&mut body)
        .await
        .map_err(|e| Error::Control(format!("reading GET /key: {e}")))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    if status != 200 {
        return Err(Error::Control(format!(
            "GET /key answered HTTP {status}: {}",
            String::from_utf8_lossy(&body).trim()
        )));
    }
    Ok(body)
}

/// `HEAD url` over plain HTTPS (how control's ping requests are answered); the status code.
pub async fn head(url: &str, tls: &Arc<rustls::ClientConfig>) -> Result<u16> {
    let (base, path) = split_url(url)?;
    let server = ServerUrl::parse(base)?;
    let mut io = dial(&server, tls).await?;
    deadline("HEAD", STEP_TIMEOUT, async {
        Ok(simple_request(&mut io, "HEAD", path, &server).await?.0)
    })
    .await
}

/// `scheme://authority` and the path with its query (`/` when there is none).
fn split_url(url: &str) -> Result<(&str, &str)> {
    let after_scheme = url
        .find("://")
        .map(|i| i + 3)
        .ok_or_else(|| Error::Control(format!("{url:?} is not a URL")))?;
    Ok(match url[after_scheme..].find('/') {
        Some(i) => url.split_at(after_scheme + i),
        None => (url, "/"),
    })
}

/// An established control session: HTTP/2 over Noise.
pub struct Session {
    requests: Requests,
    conn: tokio::task::JoinHandle<()>,
    /// Unix seconds of the last PONG: the server was alive then.
    last_pong: watch::Receiver<u64>,
}

/// A handle that sends requests on a session's connection, for a request that runs beside
/// the map stream (an endpoint update). Requests fail once the session is dropped.
#[derive(Clone)]
pub struct Requests {
    h2: h2::client::SendRequest<Bytes>,
    authority: String,
    /// Set once the connection is gone, with why.
    ended: watch::Receiver<Option<String>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl Session {
    /// Watches on the connection: why it ended (set once it did), and the Unix seconds of
    /// the last answered PING.
    pub fn liveness(&self) -> (watch::Receiver<Option<String>>, watch::Receiver<u64>) {
        (self.requests.ended.clone(), self.last_pong.clone())
    }

    pub fn requests(&self) -> Requests {
        self.requests.clone()
    }

    /// `POST /machine/register`. headscale reports refusals as HTTP 200 with `Error` set.
    pub async fn register(&mut self, req: &RegisterRequest) -> Result<RegisterResponse> {
        self.requests.register(req).await
    }

    /// `POST /machine/map`: with `Stream: true`, a body of map messages that lasts as long as
    /// the session.
    pub async fn map(&mut self, req: &MapRequest) -> Result<Body> {
        self.requests.map(req).await
    }
}

/// Connects to control as `machine`: key fetch, upgrade, handshake, HTTP/2. Each step has
/// its deadline ([`CONNECT_TIMEOUT`], [`STEP_TIMEOUT`]).
pub async fn connect(
    url: &ServerUrl,
    tls: &Arc<rustls::ClientConfig>,
    machine: &StaticSecret,
) -> Result<Session> {
    let server = server_key(url, tls).await?;
    let io = dial(url, tls).await?;
    let stream = deadline(
        "the /ts2021 upgrade",
        STEP_TIMEOUT,
        upgrade(url, io, machine, &server),
    )
    .await?;
    let received = stream.received();
    let (h2, mut conn) = deadline("the HTTP/2 handshake", STEP_TIMEOUT, async {
        h2::client::Builder::new()
            .initial_window_size(4 << 20)
            .initial_connection_window_size(8 << 20)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(|e| Error::Control(format!("HTTP/2 over the control channel: {e}")))
    })
    .await?;
    let (ended_tx, ended) = watch::channel(None);
    let (pong_tx, last_pong) = watch::channel(crate::status::now_secs());
    let ping_pong = conn.ping_pong();
    let conn = tokio::spawn(async move {
        let reason = tokio::select! {
            r = &mut conn => match r {
                Ok(()) => "the server closed the control connection".to_string(),
                Err(e) => format!("control connection failed: {e}"),
            },
            r = keep_pinging(ping_pong, pong_tx, received) => r,
        };
        tracing::debug!(reason, "control HTTP/2 connection ended");
        let _ = ended_tx.send(Some(reason));
        // Only now do the streams fail (h2 ends them as the connection drops): they find
        // the reason set.
        drop(conn);
    });
    Ok(Session {
        requests: Requests {
            h2,
            authority: url.host_header(),
            ended,
        },
        conn,
        last_pong,
    })
}

/// PINGs the server every [`PING_EVERY`]; returns why it stopped answering: no answer to a
/// PING within [`PING_TIMEOUT`] and no bytes from it over that time either.
async fn keep_pinging(
    ping_pong: Option<h2::PingPong>,
    pong: watch::Sender<u64>,
    received: watch::Receiver<tokio::time::Instant>,
) -> String {
    let Some(mut pp) = ping_pong else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(PING_EVERY).await;
        let ping = pp.ping(h2::Ping::opaque());
        tokio::pin!(ping);
        loop {
            match tokio::time::timeout(PING_TIMEOUT, &mut ping).await {
                Ok(Ok(_)) => {
                    let _ = pong.send(crate::status::now_secs());
                    break;
                }
                Ok(Err(e)) => return format!("HTTP/2 PING failed: {e}"),
                Err(_) if received.borrow().elapsed() < PING_TIMEOUT => {}
                Err(_) => {
                    return format!(
                        "no answer to an HTTP/2 PING and no bytes from the server within \
                         {PING_TIMEOUT:?}"
                    );
                }
            }
        }
    }
}

/// `POST /ts2021`, the Noise handshake and headscale's early payload: a Noise stream ready
/// for HTTP/2.
async fn upgrade(
    url: &ServerUrl,
    mut io: Box<dyn Io>,
    machine: &StaticSecret,
    server: &PublicKey,
) -> Result<NoiseStream<Box<dyn Io>>> {
    let (init, msg) = Initiator::start(machine, server, CAPABILITY_VERSION, keys::generate());
    debug_assert_eq!(msg.len(), INITIATION_LEN);
    let req = format!(
        "POST /ts2021 HTTP/1.1\r\nHost: {}\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\nX-Tailscale-Handshake: {}\r\n\r\n",
        url.host_header(),
        base64::engine::general_purpose::STANDARD.encode(msg)
    );
    io.write_all(req.as_bytes())
        .await
        .map_err(|e| Error::Control(format!("sending the /ts2021 upgrade: {e}")))?;
    let (status, head, mut rest) = read_head(&mut io).await?;
    if status != 101
        || !head
            .to_ascii_lowercase()
            .contains("upgrade: tailscale-control-protocol")
    {
        return Err(Error::Control(format!(
            "the server did not switch to the control protocol (HTTP {status}); is {} a headscale server?",
            url.host_header()
        )));
    }
    while rest.len() < 3 {
        read_more(&mut io, &mut rest).await?;
    }
    let need = 3 + u16::from_be_bytes([rest[1], rest[2]]) as usize;
    while rest.len() < need {
        read_more(&mut io, &mut rest).await?;
    }
    let transport = init
        .finish(&rest[..need])
        .map_err(|e| Error::Control(e.to_string()))?;
    let mut stream = NoiseStream::new(io, transport, &rest[need..]);
    skip_early_payload(&mut stream).await?;
    Ok(stream)
}

async fn read_more(io: &mut Box<dyn Io>, buf: &mut Vec<u8>) -> Result<()> {
    let mut chunk = [0u8; 512];
    let n = io
        .read(&mut chunk)
        .await
        .map_err(|e| Error::Control(format!("reading the handshake answer: {e}")))?;
    if n == 0 {
        return Err(Error::Control(
            "the server closed the connection during the handshake (it may reject our protocol version)".into(),
        ));
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// headscale first sends `ff ff ff 'T' 'S'`, a big-endian length and JSON (a node-key
/// challenge we do not need); anything else is already the server's HTTP/2 preface.
async fn skip_early_payload<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut NoiseStream<S>,
) -> Result<()> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head)
        .await
        .map_err(|e| Error::Control(format!("reading the first control bytes: {e}")))?;
    if &head[..5] != EARLY_MAGIC {
        s.unread(&head);
        return Ok(());
    }
    let len = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) as usize;
    if len > MAX_MESSAGE {
        return Err(Error::Control(format!(
            "early payload of {len} bytes is too large"
        )));
    }
    let mut json = vec![0u8; len];
    s.read_exact(&mut json)
        .await
        .map_err(|e| Error::Control(format!("reading the early payload: {e}")))?;
    Ok(())
}

/// A streamed HTTP/2 response body.
pub struct Body {
    recv: h2::RecvStream,
    buf: Vec<u8>,
    /// One zstd context for all of the stream's messages: a new one per message cost more
    /// than applying a patch.
    zstd: zstd::zstd_safe::DCtx<'static>,
    /// The session's end, with why: a stream cut by it reports that reason.
    ended: watch::Receiver<Option<String>>,
}

impl Body {
    /// More bytes, or `None` at the end of the body.
    async fn fill(&mut self) -> Result<bool> {
        match self.recv.data().await {
            Some(Ok(chunk)) => {
                let _ = self.recv.flow_control().release_capacity(chunk.len());
                self.buf.extend_from_slice(&chunk);
                Ok(true)
            }
            Some(Err(e)) => Err(Error::Control(match self.ended.borrow().clone() {
                Some(why) => why,
                None => format!("control stream failed: {e}"),
            })),
            None => Ok(false),
        }
    }

    pub async fn read_all(mut self) -> Result<Vec<u8>> {
        while self.fill().await? {
            if self.buf.len() > MAX_MESSAGE {
                return Err(Error::Control("control response too large".into()));
            }
        }
        Ok(self.buf)
    }

    /// One message of this stream, as [`decode_map_message`] does it.
    pub fn decode(&mut self, raw: &[u8]) -> Result<MapResponse> {
        decode_capped(raw, MAX_MAP_MESSAGE, &mut self.zstd)
    }

    /// The next length-prefixed (u32 little-endian) map message, zstd-decoded.
    pub async fn next_message(&mut self) -> Result<Option<MapResponse>> {
        match self.next_raw_message().await? {
            Some(raw) => self.decode(&raw).map(Some),
            None => Ok(None),
        }
    }

    /// The next map message as it came (zstd-compressed JSON), unparsed.
    pub async fn next_raw_message(&mut self) -> Result<Option<Vec<u8>>> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_le_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
                if len > MAX_MAP_MESSAGE {
                    return Err(Error::Control(format!(
                        "map message of {len} bytes is larger than the limit of {} MiB",
                        MAX_MAP_MESSAGE >> 20
                    )));
                }
                if self.buf.len() >= 4 + len {
                    return Ok(Some(self.buf.drain(..4 + len).skip(4).collect()));
                }
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }
}

/// One map message: zstd-compressed JSON, parsed as it is decompressed (a large map is
/// never held whole as text), and refused past [`MAX_MAP_MESSAGE`].
pub fn decode_map_message(raw: &[u8]) -> Result<MapResponse> {
    decode_capped(raw, MAX_MAP_MESSAGE, &mut zstd::zstd_safe::DCtx::create())
}

fn decode_capped(
    raw: &[u8],
    cap: usize,
    zstd: &mut zstd::zstd_safe::DCtx<'static>,
) -> Result<MapResponse> {
    let mut capped = Capped {
        inner: zstd::stream::read::Decoder::with_context(raw, zstd),
        left: cap,
        hit: false,
    };
    // A patch is a few hundred bytes: no 64 KiB buffer for it.
    let buffer = raw.len().saturating_mul(8).clamp(4 << 10, 64 << 10);
    let parsed = serde_json::from_reader(std::io::BufReader::with_capacity(buffer, &mut capped));
    parsed.map_err(|e| {
        Error::Control(if capped.hit {
            format!(
                "map message decompresses to more than the limit of {} MiB",
                cap >> 20
            )
        } else if e.is_io() {
            format!("map message is not valid zstd: {e}")
        } else {
            format!("map message is not a MapResponse: {e}")
        })
    })
}

/// A reader that yields at most `left` bytes, and fails (setting `hit`) when there are more.
struct Capped<R> {
    inner: R,
    left: usize,
    hit: bool,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? > 0 {
                self.hit = true;
                return Err(std::io::Error::other("over the size limit"));
            }
            return Ok(0);
        }
        let n = buf.len().min(self.left);
        let got = self.inner.read(&mut buf[..n])?;
        self.left -= got;
        Ok(got)
    }
}

impl Requests {
    async fn post(&self, path: &str, body: Vec<u8>) -> Result<(u16, Body)> {
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("https://{}{path}", self.authority))
            .header("content-type", "application/json")
            .body(())
            .expect("valid request");
        let mut h2 = self
            .h2
            .clone()
            .ready()
            .await
            .map_err(|e| Error::Control(format!("control HTTP/2: {e}")))?;
        let (resp, mut send) = h2
            .send_request(req, false)
            .map_err(|e| Error::Control(format!("POST {path}: {e}")))?;
        send.send_data(Bytes::from(body), true)
            .map_err(|e| Error::Control(format!("POST {path}: {e}")))?;
        let resp = resp
            .await
            .map_err(|e| Error::Control(format!("POST {path}: {e}")))?;
        let status = resp.status().as_u16();
        Ok((
            status,
            Body {
                recv: resp.into_body(),
                buf: vec![],
                zstd: zstd::zstd_safe::DCtx::create(),
                ended: self.ended.clone(),
            },
        ))
    }

    async fn register(&self, req: &RegisterRequest) -> Result<RegisterResponse> {
        let body = serde_json::to_vec(req).expect("serializes");
        let (status, bytes) = deadline("POST /machine/register", REGISTER_TIMEOUT, async {
            let (status, body) = self.post("/machine/register", body).await?;
            Ok((status, body.read_all().await?))
        })
        .await?;
        if status != 200 {
            return Err(Error::Control(format!(
                "POST /machine/register: HTTP {status}: {}",
                String::from_utf8_lossy(&bytes).trim()
            )));
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::Control(format!(
                "POST /machine/register: not a RegisterResponse: {e}"
            ))
        })
    }

    /// `POST /machine/map` (see [`Session::map`]).
    pub async fn map(&self, req: &MapRequest) -> Result<Body> {
        let (status, body) = self
            .post("/machine/map", serde_json::to_vec(req).expect("serializes"))
            .await?;
        if status != 200 {
            let bytes = body.read_all().await.unwrap_or_default();
            let text = String::from_utf8_lossy(&bytes).trim().to_string();
            // headscale's answer for a node key it does not know (deleted node).
            if status == 404 {
                return Err(Error::NodeGone(format!(
                    "headscale no longer knows this node (POST /machine/map: HTTP 404: {text}); \
                     deleted with `headscale nodes delete`? It needs a new pre-auth key"
                )));
            }
            return Err(Error::Control(format!(
                "POST /machine/map: HTTP {status}: {text}"
            )));
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls() {
        let u = ServerUrl::parse("https://192.0.2.1:443").unwrap();
        assert_eq!((u.https, u.host.as_str(), u.port), (true, "192.0.2.1", 443));
        assert_eq!(u.host_header(), "192.0.2.1");
        let u = ServerUrl::parse("https://hs.example:8443/").unwrap();
        assert_eq!(u.host_header(), "hs.example:8443");
        let u = ServerUrl::parse("http://[fd00::1]:8080").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("fd00::1", 8080));
        assert_eq!(u.host_header(), "[fd00::1]:8080");
        assert!(ServerUrl::parse("hs.example").is_err());
        assert!(ServerUrl::parse("https://:443").is_err());
    }

    #[test]
    fn ping_urls_split_into_server_and_path() {
        assert_eq!(
            split_url("https://hs.example:8443/machine/ping-response?id=abc").unwrap(),
            ("https://hs.example:8443", "/machine/ping-response?id=abc")
        );
        assert_eq!(split_url("https://hs").unwrap(), ("https://hs", "/"));
        assert!(split_url("hs/x").is_err());
    }

    #[test]
    fn chunked_bodies() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), b"abcde");
    }

    #[test]
    fn one_zstd_context_decodes_a_stream_of_messages_even_after_a_broken_one() {
        let mut ctx = zstd::zstd_safe::DCtx::create();
        let keep_alive = zstd::encode_all(&br#"{"KeepAlive":true}"#[..], 3).unwrap();
        let patch = zstd::encode_all(
            &br#"{"PeersChangedPatch":[{"NodeID":7,"Endpoints":["192.0.2.7:41641"]}]}"#[..],
            3,
        )
        .unwrap();
        let mut decode = |raw: &[u8]| decode_capped(raw, MAX_MAP_MESSAGE, &mut ctx);
        assert!(decode(&keep_alive).unwrap().keep_alive);
        // Cut off mid-frame: the context holds half a frame afterwards.
        assert!(decode(&patch[..patch.len() / 2]).is_err());
        assert!(decode(b"not zstd").is_err());
        let p = decode(&patch).unwrap();
        assert_eq!(p.peers_changed_patch[0].node_id, 7);
        assert!(!p.keep_alive);
        assert!(decode(&keep_alive).unwrap().keep_alive);
    }

    #[test]
    fn map_messages_are_zstd_json() {
        let raw = zstd::encode_all(&br#"{"KeepAlive":true}"#[..], 3).unwrap();
        assert!(decode_map_message(&raw).unwrap().keep_alive);
        assert!(decode_map_message(b"not zstd").is_err());
        let bad_json = zstd::encode_all(&b"{\"Peers\": 3}"[..], 3).unwrap();
        assert!(decode_map_message(&bad_json).is_err());
        let truncated = &raw[..raw.len() - 2];
        assert!(decode_map_message(truncated).is_err());
    }

    #[test]
    fn large_maps_pass_and_the_limit_holds() {
        // Past the old 10 MiB limit: a map of a large tailnet.
        let peer = r#"{"ID":1,"Key":"nodekey:00","Name":"n","Addresses":["100.64.0.1/32"]}"#;
        let n = (12 << 20) / peer.len();
        let json = format!(r#"{{"Peers":[{}]}}"#, vec![peer; n].join(","));
        let raw = zstd::encode_all(json.as_bytes(), 3).unwrap();
        assert_eq!(decode_map_message(&raw).unwrap().peers.unwrap().len(), n);
        let e = decode_capped(&raw, 8 << 20, &mut zstd::zstd_safe::DCtx::create())
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than the limit of 8 MiB"), "{e}");
    }
}
