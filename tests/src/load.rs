//! Load for headscale: many nodes registered over ts2021 with the agent's own control client
//! (throwaway machine, node and disco keys, one reusable pre-auth key), some of them online
//! with a map stream, coming and going and changing endpoints at a given rate. They carry no
//! traffic: they exist so that the nodes under test (the agent, a stock tailscaled) get the
//! maps and patches of a large, busy tailnet from real headscale.
//!
//! `vdc-load` (`src/bin/vdc-load.rs`) runs it inside a lab host; its progress is a JSON file
//! the tests read ([`Progress`]).
//!
//! SIGUSR1 turns the churn into endpoint changes only, sent without a map stream: each is one
//! lite map request, which headscale passes on to every streaming node as a patch. The
//! churn of nodes coming online costs headscale a full map per event, which at thousands of
//! nodes it cannot make several times a second.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vpn_agent::control::client::{self, ServerUrl, Session};
use vpn_agent::control::types::{
    AuthInfo, CAPABILITY_VERSION, Hostinfo, MapRequest, RegisterRequest, ZERO_TIME,
};
use vpn_agent::keys;
use x25519_dalek::{PublicKey, StaticSecret};

/// Tries per node to register (and come online) before the load gives up.
const REGISTER_ATTEMPTS: usize = 4;

/// What to do.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub server: String,
    pub ca_file: Option<PathBuf>,
    /// A reusable pre-auth key.
    pub auth_key: String,
    /// Nodes to register (`<prefix>-<i>`).
    pub nodes: usize,
    /// How many of them keep a map stream open (the first ones); the churn happens among them.
    pub online: usize,
    /// Changes per second once all are registered: an online node goes offline or comes back,
    /// or changes its endpoints, in turn. 0: none.
    pub churn_per_sec: f64,
    pub prefix: String,
    /// Registrations in flight at once.
    pub parallel: usize,
    /// Where [`Progress`] is written, about once a second.
    pub progress: PathBuf,
}

/// How far the load got.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    pub registered: usize,
    pub online: usize,
    /// Churn events done: streams closed, streams opened, endpoint changes.
    pub went_offline: u64,
    pub came_online: u64,
    pub endpoint_changes: u64,
    /// Errors talking to headscale (each retried at the next turn).
    pub errors: u64,
    pub last_error: Option<String>,
    /// Whether the churn is endpoint changes only (after SIGUSR1).
    #[serde(default)]
    pub endpoints_only: bool,
    /// Seconds from the start until every node was registered.
    pub registered_after_secs: Option<f64>,
    /// The first message of a map stream opened once all were registered: its size as
    /// headscale sent it (zstd) and as JSON.
    pub first_map_zstd_bytes: Option<u64>,
    pub first_map_json_bytes: Option<u64>,
}

impl Progress {
    pub fn churn_events(&self) -> u64 {
        self.went_offline + self.came_online + self.endpoint_changes
    }
}

/// One load node's identity.
struct Node {
    name: String,
    machine: StaticSecret,
    node: StaticSecret,
    disco: StaticSecret,
    /// Its session and the task that reads its map stream, while online.
    online: Option<(Session, tokio::task::JoinHandle<()>)>,
    /// A session without a map stream, for endpoint changes while offline.
    lite: Option<Session>,
    /// Bumped at each endpoint change, so each change is a new endpoint.
    generation: u32,
}

impl Node {
    fn new(prefix: &str, i: usize) -> Node {
        Node {
            name: format!("{prefix}-{i}"),
            machine: keys::generate(),
            node: keys::generate(),
            disco: keys::generate(),
            online: None,
            lite: None,
            generation: 0,
        }
    }

    fn node_key(&self) -> String {
        keys::public_text("nodekey", &PublicKey::from(&self.node))
    }

    fn hostinfo(&self) -> Hostinfo {
        Hostinfo {
            ipn_version: "vdc-load".into(),
            os: "linux".into(),
            hostname: self.name.clone(),
            routable_ips: vec![],
            arch: "amd64".into(),
            net_info: None,
        }
    }

    /// A TEST-NET-3 endpoint no packet ever reaches: it only has to differ per change.
    fn endpoint(&self, index: usize) -> String {
        let n = (index as u32).wrapping_mul(7919) ^ self.generation;
        format!("203.0.113.{}:{}", 1 + n % 254, 20000 + (n / 254) % 40000)
    }

    fn map_request(&self, index: usize, stream: bool) -> MapRequest {
        MapRequest {
            version: CAPABILITY_VERSION,
            compress: "zstd".into(),
            keep_alive: stream,
            node_key: self.node_key(),
            disco_key: keys::public_text("discokey", &PublicKey::from(&self.disco)),
            stream,
            omit_peers: !stream,
            hostinfo: self.hostinfo(),
            endpoints: vec![self.endpoint(index)],
            endpoint_types: vec![1],
        }
    }
}

struct Ctx {
    url: ServerUrl,
    tls: Arc<rustls::ClientConfig>,
    auth_key: String,
}

async fn register(ctx: &Ctx, n: &Node) -> Result<Session> {
    let mut s = client::connect(&ctx.url, &ctx.tls, &n.machine).await?;
    let r = s
        .register(&RegisterRequest {
            version: CAPABILITY_VERSION,
            node_key: n.node_key(),
            old_node_key: keys::public_text("nodekey", &PublicKey::from([0u8; 32])),
            auth: Some(AuthInfo {
                auth_key: ctx.auth_key.clone(),
            }),
            expiry: ZERO_TIME.into(),
            hostinfo: n.hostinfo(),
        })
        .await?;
    anyhow::ensure!(
        r.error.is_empty() && r.machine_authorized,
        "{}: not registered: {:?}",
        n.name,
        r.error
    );
    Ok(s)
}

/// Opens `n`'s map stream on `s` and reads it in the background, discarding what comes.
async fn go_online(ctx: &Ctx, n: &mut Node, index: usize, s: Option<Session>) -> Result<()> {
    let mut s = match s {
        Some(s) => s,
        None => client::connect(&ctx.url, &ctx.tls, &n.machine).await?,
    };
    let mut body = s.map(&n.map_request(index, true)).await?;
    // Read, never parsed: at thousands of peers parsing each full map would cost the load
    // more CPU than the daemons under test spend.
    let reader =
        tokio::spawn(async move { while let Ok(Some(_)) = body.next_raw_message().await {} });
    n.online = Some((s, reader));
    Ok(())
}

fn go_offline(n: &mut Node) {
    if let Some((s, reader)) = n.online.take() {
        reader.abort();
        drop(s);
    }
}

/// A new endpoint, as tailscaled reports one: a non-streaming map request, on the map
/// stream's session or, offline, a session of its own (made again if it broke).
async fn change_endpoint(ctx: &Ctx, n: &mut Node, index: usize) -> Result<()> {
    n.generation += 1;
    let req = n.map_request(index, false);
    let s = match (&mut n.online, &mut n.lite) {
        (Some((s, _)), _) => s,
        (None, Some(s)) => s,
        (None, lite @ None) => lite.insert(client::connect(&ctx.url, &ctx.tls, &n.machine).await?),
    };
    let r = async { s.map(&req).await?.read_all().await }.await;
    if r.is_err() && n.online.is_none() {
        n.lite = None;
    }
    r?;
    Ok(())
}

/// The size of the full map of a new map stream for `n` (zstd, JSON): the first message
/// that is one, as the agent takes it (headscale may send a change before it).
async fn first_map_size(ctx: &Ctx, n: &Node, index: usize) -> Result<(u64, u64)> {
    let mut s = client::connect(&ctx.url, &ctx.tls, &n.machine).await?;
    let mut body = s.map(&n.map_request(index, true)).await?;
    loop {
        let raw = body
            .next_raw_message()
            .await?
            .context("the map stream ended before its full map")?;
        let json = zstd::stream::decode_all(&raw[..]).context("a map message is not zstd")?;
        let msg: vpn_agent::control::types::MapResponse =
            serde_json::from_slice(&json).context("a map message is not a MapResponse")?;
        if vpn_agent::control::netmap::is_full_map(&msg) {
            return Ok((raw.len() as u64, json.len() as u64));
        }
    }
}

fn write_progress(path: &PathBuf, p: &Progress) {
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, serde_json::to_vec(p).expect("serializes")).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

/// Registers the nodes, brings the first `online` of them online, then churns until killed.
pub async fn run(spec: LoadSpec) -> Result<()> {
    // Installed first: until then SIGUSR1 would end the process.
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    let ctx = Arc::new(Ctx {
        url: ServerUrl::parse(&spec.server)?,
        tls: client::tls_config(spec.ca_file.as_deref())?,
        auth_key: spec.auth_key.clone(),
    });
    let start = Instant::now();
    let mut progress = Progress::default();
    // The nodes that stay online, kept with their sessions; the others are done once
    // registered.
    let online = spec.online.min(spec.nodes);
    let mut kept: Vec<Option<Node>> = (0..online).map(|_| None).collect();
    let mut last: Option<Node> = None;

    // Registration, `parallel` at a time.
    let mut i = 0;
    while i < spec.nodes {
        let end = (i + spec.parallel.max(1)).min(spec.nodes);
        let mut batch = tokio::task::JoinSet::new();
        for j in i..end {
            let (ctx, prefix) = (ctx.clone(), spec.prefix.clone());
            batch.spawn(async move {
                let mut node = Node::new(&prefix, j);
                // A busy headscale drops a registration now and then (a broken pipe); a
                // client tries again, and so does the load, a few times.
                let mut r = Ok(());
                for attempt in 0..REGISTER_ATTEMPTS {
                    if attempt > 0 {
                        tokio::time::sleep(Duration::from_secs(attempt as u64)).await;
                    }
                    r = async {
                        let s = register(&ctx, &node).await?;
                        if j < online {
                            go_online(&ctx, &mut node, j, Some(s)).await?;
                        }
                        anyhow::Ok(())
                    }
                    .await;
                    if r.is_ok() {
                        break;
                    }
                }
                (j, node, r)
            });
        }
        while let Some(done) = batch.join_next().await {
            let (j, node, r) = done?;
            if let Err(e) = r {
                // Said in the progress too: whoever waits on it learns at once.
                let e = e.context(format!("registering {}", node.name));
                progress.errors += 1;
                progress.last_error = Some(format!("{e:#}"));
                write_progress(&spec.progress, &progress);
                return Err(e);
            }
            progress.registered += 1;
            if j < online {
                progress.online += 1;
                kept[j] = Some(node);
            } else if j + 1 == spec.nodes {
                last = Some(node);
            }
        }
        write_progress(&spec.progress, &progress);
        i = end;
    }
    progress.registered_after_secs = Some(start.elapsed().as_secs_f64());
    if let Some(n) = last.as_ref().or(kept.iter().flatten().last()) {
        match first_map_size(&ctx, n, spec.nodes - 1).await {
            Ok((zstd, json)) => {
                progress.first_map_zstd_bytes = Some(zstd);
                progress.first_map_json_bytes = Some(json);
            }
            Err(e) => {
                progress.errors += 1;
                progress.last_error = Some(format!("{}: first map: {e:#}", n.name));
            }
        }
    }
    write_progress(&spec.progress, &progress);

    if spec.churn_per_sec <= 0.0 || online == 0 {
        return std::future::pending().await;
    }
    // Each event runs as a task of its own: a node coming online takes a connection and a
    // full map, and must not hold up the next events.
    let nodes: Vec<Arc<tokio::sync::Mutex<Node>>> = kept
        .into_iter()
        .map(|n| Arc::new(tokio::sync::Mutex::new(n.expect("registered above"))))
        .collect();
    let progress = Arc::new(std::sync::Mutex::new(progress));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / spec.churn_per_sec));
    // Not the default burst: after a SIGSTOP (the scale benchmark freezes the load) it would
    // make up for every tick missed while frozen, several times the rate asked for.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut report = tokio::time::interval(Duration::from_secs(1));
    let mut endpoints_only = false;
    let mut turn: u64 = 0;
    loop {
        tokio::select! {
            _ = usr1.recv() => {
                endpoints_only = true;
                progress.lock().expect("progress lock").endpoints_only = true;
            }
            _ = tick.tick() => {
                // Node by node, each event of three kinds in turn: offline, online again,
                // then a new endpoint.
                let index = (turn as usize) % online;
                let kind = (turn / online as u64) % 3;
                turn += 1;
                let (node, ctx, progress) = (nodes[index].clone(), ctx.clone(), progress.clone());
                tokio::spawn(async move {
                    let mut n = node.lock().await;
                    let r = churn(&ctx, &mut n, index, kind, endpoints_only).await;
                    let mut p = progress.lock().expect("progress lock");
                    match r {
                        Ok(Event::Offline) => {
                            p.went_offline += 1;
                            p.online -= 1;
                        }
                        Ok(Event::Online) => {
                            p.came_online += 1;
                            p.online += 1;
                        }
                        Ok(Event::Endpoint) => p.endpoint_changes += 1,
                        Err(e) => {
                            p.errors += 1;
                            p.last_error = Some(format!("{}: {e:#}", n.name));
                        }
                    }
                });
            }
            _ = report.tick() => {
                let p = progress.lock().expect("progress lock").clone();
                write_progress(&spec.progress, &p);
            }
        }
    }
}

enum Event {
    Offline,
    Online,
    Endpoint,
}

/// One churn event of `kind` (0 offline, 1 online, 2 new endpoint) for node `n`; an offline
/// node comes online whatever the kind. With `endpoints_only`, whatever the kind, an online
/// node goes offline (after a headscale restart its stream would cost a full map) and an
/// offline one changes endpoints.
async fn churn(
    ctx: &Ctx,
    n: &mut Node,
    index: usize,
    kind: u64,
    endpoints_only: bool,
) -> Result<Event> {
    // A stream that ended (headscale restarted, as the scale benchmark does) left the node
    // offline: this event counts it so, and its next one brings it back.
    if n.online
        .as_ref()
        .is_some_and(|(_, reader)| reader.is_finished())
    {
        go_offline(n);
        return Ok(Event::Offline);
    }
    match (kind, n.online.is_some(), endpoints_only) {
        (0, true, _) | (_, true, true) => {
            go_offline(n);
            Ok(Event::Offline)
        }
        (_, false, false) => go_online(ctx, n, index, None).await.map(|()| Event::Online),
        _ => change_endpoint(ctx, n, index)
            .await
            .map(|()| Event::Endpoint),
    }
}

/// `vdc-load` running in a lab host.
pub struct Load {
    pub progress: PathBuf,
    /// Its log name on its host (`Lab::stop(host, log)` ends it).
    pub log: String,
}

impl Load {
    /// Starts `vdc-load` on lab host `host`: `nodes` nodes of headscale user `user` named
    /// `<prefix>-<i>`, the first `online` with a map stream, churning at `churn_per_sec`.
    /// Its log is `<prefix>`; loads with different prefixes run side by side.
    pub fn start(
        lab: &crate::Lab,
        host: &str,
        prefix: &str,
        user: &str,
        nodes: usize,
        online: usize,
        churn_per_sec: f64,
    ) -> Result<Load> {
        Self::spawn(lab, host, prefix, user, nodes, online, churn_per_sec, None)
    }

    /// Registers `nodes` nodes, `parallel` at a time, none of them online and no churn.
    pub fn register(
        lab: &crate::Lab,
        host: &str,
        prefix: &str,
        user: &str,
        nodes: usize,
        parallel: usize,
    ) -> Result<Load> {
        Self::spawn(lab, host, prefix, user, nodes, 0, 0.0, Some(parallel))
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        lab: &crate::Lab,
        host: &str,
        prefix: &str,
        user: &str,
        nodes: usize,
        online: usize,
        churn_per_sec: f64,
        parallel: Option<usize>,
    ) -> Result<Load> {
        let hs = lab.headscale();
        let user = hs.user(user).or_else(|_| hs.create_user(user))?;
        let key = hs.create_preauth_key(
            &user,
            &crate::headscale::KeyOptions {
                reusable: true,
                ..Default::default()
            },
        )?;
        let dir = lab.host_dir(host).join(prefix);
        std::fs::create_dir_all(&dir)?;
        crate::headscale::write_private(&dir.join("key"), key.key.as_bytes())?;
        let progress = dir.join("progress.json");
        let _ = std::fs::remove_file(&progress);
        let mut c = lab
            .host(host)
            .ns()
            .command(crate::tools::project_bin("vdc-load"));
        c.args(["--server", &hs.url()])
            .arg("--ca-file")
            .arg(hs.ca_path())
            .arg("--auth-key-file")
            .arg(dir.join("key"))
            .args(["--nodes", &nodes.to_string()])
            .args(["--online", &online.to_string()])
            .args(["--churn-per-sec", &churn_per_sec.to_string()])
            .args(["--prefix", prefix])
            .args(parallel.map(|p| format!("--parallel={p}")))
            .arg("--progress")
            .arg(&progress);
        lab.spawn(host, prefix, c)?;
        Ok(Load {
            progress,
            log: prefix.into(),
        })
    }

    /// The load's progress so far.
    pub fn progress(&self) -> Progress {
        std::fs::read(&self.progress)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Waits until `pred` holds of the progress, for up to `limit`.
    pub fn wait(
        &self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&Progress) -> bool,
    ) -> Result<Progress> {
        let start = Instant::now();
        loop {
            let p = self.progress();
            if pred(&p) {
                return Ok(p);
            }
            anyhow::ensure!(
                start.elapsed() < limit,
                "load: {what} not reached within {limit:?}: {p:?}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}
