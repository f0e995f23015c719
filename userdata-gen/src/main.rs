//! `userdata-gen`: the CLI metal-api runs. All IO lives here; the merge is in the library.
//!
//! Exit codes: 0 success, 2 bad input, 3 headscale unreachable or refusing, 1 anything else.
//! On any failure nothing is written to `--output` or `--metadata-out`.

use clap::{Args, Parser, Subcommand};
use serde_json::json;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use userdata_gen::headscale::{self, Client, KeyRequest, MintedKey};
use userdata_gen::payload::RemoteBinary;
use userdata_gen::{
    AgentSettings, Error, Format, MeshSettings, Payload, Result, Secret, Target, generate,
};

/// `--version`: the release and the commit it was built from.
const VERSION: &str = concat!(
    env!("VPN_BUILD_VERSION"),
    " (commit ",
    env!("VPN_BUILD_COMMIT"),
    ")"
);

#[derive(Parser)]
#[command(name = "userdata-gen", version = VERSION, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Merge the mesh agent into a firewall's userdata (what metal-api runs at allocation).
    Generate(Box<GenerateArgs>),
    /// Mint a pre-auth key for an operator's own device (printed on stdout).
    AuthKey(AuthKeyArgs),
    /// List a project's nodes: name, addresses, online, last seen, agent version. Read-only.
    Nodes(NodesArgs),
}

#[derive(Args)]
struct NodesArgs {
    /// The project whose nodes to list.
    #[arg(long)]
    project: String,
    #[command(flatten)]
    headscale: HeadscaleArgs,
    /// headscale's debug listener (its metrics_listen_addr, e.g. http://127.0.0.1:9090), for
    /// the agent versions: its REST API does not report them. It answers loopback, private
    /// and tailnet addresses only.
    #[arg(long)]
    headscale_debug_url: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct HeadscaleArgs {
    /// headscale's REST API base URL; defaults to --login-server.
    #[arg(long)]
    headscale_api_url: Option<String>,
    /// A file holding the headscale API key (else the HEADSCALE_API_KEY environment variable).
    #[arg(long)]
    headscale_api_key_file: Option<PathBuf>,
    /// PEM file of a CA to trust for headscale besides the system roots (also shipped to the
    /// firewall for the agent).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Timeout for each call to headscale.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Accept http:// URLs for headscale. The API key and the pre-auth key then cross the
    /// network in clear: for labs only.
    #[arg(long)]
    allow_plaintext: bool,
}

/// Refuses an http:// `url` given as `flag` unless plaintext was allowed: the API key (and,
/// through the agent, the pre-auth key) would travel in clear.
fn require_tls(url: &str, flag: &str, h: &HeadscaleArgs) -> Result<()> {
    if url.starts_with("http://") && !h.allow_plaintext {
        return Err(Error::Input(format!(
            "{flag} {url:?} is plain http: keys would cross the network in clear; use https://, \
             or --allow-plaintext in a lab"
        )));
    }
    Ok(())
}

#[derive(Args)]
struct GenerateArgs {
    /// The machine's id; it becomes the node's hostname in the mesh.
    #[arg(long)]
    machine_id: String,
    /// The project; its headscale user is created if missing.
    #[arg(long)]
    project: String,
    /// headscale's URL for clients. Without it the userdata passes through byte for byte.
    #[arg(long)]
    login_server: Option<String>,
    #[command(flatten)]
    headscale: HeadscaleArgs,
    /// A pre-auth key metal-api minted itself, in a file; then no headscale call is made.
    #[arg(long)]
    auth_key_file: Option<PathBuf>,
    /// How long the minted key stays valid.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    auth_key_ttl: Duration,
    /// ACL tags for the firewall, e.g. tag:firewall (comma-separated).
    #[arg(long, value_delimiter = ',')]
    tags: Vec<String>,
    /// The user's userdata: a file, or - for stdin. None means no userdata.
    #[arg(long)]
    userdata: Option<PathBuf>,
    /// Where to write the result (default stdout).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Where to write JSON metadata for the caller (key id, expiry, format, what was added).
    #[arg(long)]
    metadata_out: Option<PathBuf>,
    /// The format for empty userdata: ignition-2.3.0 (default), ignition-3.x.0 or cloud-config.
    #[arg(long, default_value = "ignition-2.3.0")]
    format: String,
    /// The Ignition on the target image; a format it cannot run is reported.
    #[arg(long, value_enum, default_value = "metal-stack-v036")]
    target: Target,
    /// The VRF whose table holds the firewall's routes to headscale and the peers, e.g.
    /// vrf104009: the agent binds its own sockets to it (`bind_device` in agent.json), where
    /// metal-stack runs tailscaled through `ip vrf exec`.
    #[arg(long)]
    vrf: Option<String>,
    /// The tunnel interface name on the firewall.
    #[arg(long, default_value = "tailscale0")]
    interface: String,
    /// The SSH port reachable over the mesh.
    #[arg(long, default_value_t = 22)]
    ssh_port: u16,
    /// TCP ports to close on every interface but the tunnel (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "22")]
    closed_tcp_ports: Vec<u16>,
    /// A service besides SSH reachable only over the mesh, as NAME:tcp/PORT or
    /// NAME:udp/PORT (repeatable), e.g. bmc-reverse-proxy:tcp/3333.
    #[arg(long = "mesh-service")]
    mesh_services: Vec<userdata_gen::payload::Service>,
    /// A subnet the node routes into from the mesh once headscale approves it
    /// (tailscaled's AdvertiseRoutes; repeatable or comma-separated), e.g. 198.51.100.0/24.
    #[arg(long, value_delimiter = ',')]
    advertise_routes: Vec<String>,
    /// Where the firewall downloads vpn-agent at first boot (metal-api's pinned release);
    /// without it the image's /usr/local/bin/vpn-agent runs.
    #[arg(long, requires = "agent_sha512")]
    agent_url: Option<String>,
    /// The sha512 of that binary (hex, as in the release's SHA512SUMS): any other bytes
    /// fail the boot instead of running.
    #[arg(long, requires = "agent_url")]
    agent_sha512: Option<String>,
    /// PEM file of the CA that signed --agent-url's server certificate, if not a public one.
    #[arg(long, requires = "agent_url")]
    agent_ca_file: Option<PathBuf>,
}

#[derive(Args)]
struct AuthKeyArgs {
    /// The project whose headscale user the key belongs to.
    #[arg(long)]
    project: String,
    #[command(flatten)]
    headscale: HeadscaleArgs,
    /// How long the key stays valid.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Let the key register more than one device.
    #[arg(long)]
    reusable: bool,
    /// Devices registered with it vanish when they go offline.
    #[arg(long)]
    ephemeral: bool,
    /// ACL tags (comma-separated).
    #[arg(long, value_delimiter = ',')]
    tags: Vec<String>,
    /// Print JSON (key, id, user, expiration) instead of the bare key.
    #[arg(long)]
    json: bool,
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Generate(a) => run_generate(*a),
        Cmd::AuthKey(a) => run_auth_key(a),
        Cmd::Nodes(a) => run_nodes(a),
    };
    if let Err(e) = res {
        eprintln!("userdata-gen: error: {e}");
        std::process::exit(e.exit_code());
    }
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::Input(format!("cannot read {what} {}: {e}", path.display())))
}

/// A CA file's bytes as PEM text.
fn pem_text(bytes: &[u8], flag: &str) -> Result<String> {
    match std::str::from_utf8(bytes) {
        Ok(t) if t.contains("-----BEGIN CERTIFICATE-----") => Ok(t.to_string()),
        _ => Err(Error::Input(format!(
            "{flag}: not a PEM certificate (no BEGIN CERTIFICATE line)"
        ))),
    }
}

fn read_userdata(arg: &Option<PathBuf>) -> Result<Vec<u8>> {
    match arg {
        None => Ok(vec![]),
        Some(p) if p.as_os_str() == "-" => {
            let mut buf = vec![];
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| Error::Input(format!("cannot read userdata from stdin: {e}")))?;
            Ok(buf)
        }
        Some(p) => read_file(p, "--userdata"),
    }
}

fn read_secret(path: &Path, what: &str) -> Result<Secret> {
    let bytes = read_file(path, what)?;
    let s = String::from_utf8(bytes)
        .map_err(|_| Error::Input(format!("{what} {} is not text", path.display())))?;
    let s = s.trim();
    if s.is_empty() {
        return Err(Error::Input(format!("{what} {} is empty", path.display())));
    }
    Ok(Secret::new(s))
}

fn api_key(h: &HeadscaleArgs) -> Result<Secret> {
    if let Some(p) = &h.headscale_api_key_file {
        return read_secret(p, "--headscale-api-key-file");
    }
    match std::env::var("HEADSCALE_API_KEY") {
        Ok(k) if !k.trim().is_empty() => Ok(Secret::new(k.trim())),
        _ => Err(Error::Input(
            "no headscale API key: give --headscale-api-key-file or set HEADSCALE_API_KEY".into(),
        )),
    }
}

fn ca_pem(h: &HeadscaleArgs) -> Result<Option<Vec<u8>>> {
    h.ca_file
        .as_deref()
        .map(|p| read_file(p, "--ca-file"))
        .transpose()
}

fn client(h: &HeadscaleArgs, default_url: &str, ca: Option<&[u8]>) -> Result<Client> {
    let url = h.headscale_api_url.as_deref().unwrap_or(default_url);
    require_tls(url, "--headscale-api-url", h)?;
    Client::new(url, api_key(h)?, ca, h.timeout)
}

/// The client for a command that talks only to headscale's API (`command` names it in the
/// error when --headscale-api-url is missing).
fn api_client(h: &HeadscaleArgs, command: &str) -> Result<Client> {
    let ca = ca_pem(h)?;
    let url = h
        .headscale_api_url
        .as_deref()
        .ok_or_else(|| Error::Input(format!("{command} needs --headscale-api-url")))?;
    client(h, url, ca.as_deref())
}

/// Writes `data` to `path` atomically: a temporary file in the same directory, then rename;
/// the file is 0600.
fn stage(path: &Path, data: &[u8]) -> Result<PathBuf> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    // 0600 from the start (the userdata holds the pre-auth key), and created here or not at
    // all: never through a file or link someone put at that name.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io(&tmp, e))?;
    f.write_all(data).and_then(|_| f.sync_all()).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(&tmp, e)
    })?;
    Ok(tmp)
}

/// Writes all outputs or none.
fn write_outputs(outputs: &[(Option<&PathBuf>, Vec<u8>)]) -> Result<()> {
    let mut staged = vec![];
    for (path, data) in outputs {
        if let Some(p) = path {
            match stage(p, data) {
                Ok(tmp) => staged.push((tmp, (*p).clone())),
                Err(e) => {
                    staged
                        .iter()
                        .for_each(|(t, _)| drop(std::fs::remove_file(t)));
                    return Err(e);
                }
            }
        }
    }
    for (tmp, dest) in &staged {
        std::fs::rename(tmp, dest).map_err(|e| Error::io(dest, e))?;
    }
    if let Some((None, data)) = outputs.first() {
        std::io::stdout()
            .write_all(data)
            .and_then(|_| std::io::stdout().flush())
            .map_err(|e| Error::io("stdout", e))?;
    }
    Ok(())
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    let input = read_userdata(&a.userdata)?;
    let Some(login_server) = a.login_server.clone() else {
        // headscale not configured: today's flow, byte for byte.
        let meta = a
            .metadata_out
            .as_ref()
            .map(|_| json!({ "mesh": false }).to_string().into_bytes());
        let mut outs = vec![(a.output.as_ref(), input)];
        if let Some(m) = meta {
            outs.push((a.metadata_out.as_ref(), m));
        }
        return write_outputs(&outs);
    };
    require_tls(&login_server, "--login-server", &a.headscale)?;
    let fresh: Format = a.format.parse()?;
    if let Some(v) = &a.vrf
        && !userdata_gen::payload::valid_vrf(v)
    {
        return Err(Error::Input(format!(
            "--vrf {v:?} is not a VRF device name (1-15 letters, digits, '-' or '_')"
        )));
    }
    for r in &a.advertise_routes {
        userdata_gen::payload::subnet_route(r)
            .map_err(|e| Error::Input(format!("--advertise-routes: {e}")))?;
    }
    let ca = ca_pem(&a.headscale)?;
    let ca_text = ca
        .as_deref()
        .map(|b| pem_text(b, "--ca-file"))
        .transpose()?;
    let agent_binary = match (&a.agent_url, &a.agent_sha512) {
        (Some(url), Some(sha)) => {
            let ca = a
                .agent_ca_file
                .as_ref()
                .map(|p| pem_text(&read_file(p, "--agent-ca-file")?, "--agent-ca-file"))
                .transpose()?;
            Some(RemoteBinary::new(url, sha, ca)?)
        }
        _ => None,
    };
    let settings = MeshSettings {
        login_server: login_server.clone(),
        hostname: a.machine_id.clone(),
        ca_pem: ca_text,
        vrf: a.vrf.clone(),
        advertise_routes: a.advertise_routes.clone(),
        agent: AgentSettings {
            interface: a.interface.clone(),
            ssh_port: a.ssh_port,
            closed_tcp_ports: a.closed_tcp_ports.clone(),
            advertise_tags: a.tags.clone(),
            services: a.mesh_services.clone(),
            ..AgentSettings::default()
        },
        agent_binary,
    };
    let source = match &a.userdata {
        Some(p) if p.as_os_str() == "-" => "userdata from stdin".to_string(),
        Some(p) => format!("--userdata {}", p.display()),
        None => "no userdata".to_string(),
    };
    let named = |e: Error| match e {
        Error::Input(m) => Error::Input(format!("{source}: {m}")),
        Error::Conflict(m) => Error::Conflict(format!("{source}: {m}")),
        other => other,
    };
    // Check the userdata before a key is minted, so bad input never burns one.
    generate(
        &input,
        &Payload::new(&settings, &Secret::new("")),
        fresh,
        a.target,
    )
    .map_err(named)?;

    let minted: Option<MintedKey>;
    let key = match &a.auth_key_file {
        Some(p) => {
            minted = None;
            read_secret(p, "--auth-key-file")?
        }
        None => {
            let c = client(&a.headscale, &login_server, ca.as_deref())?;
            let user = c.ensure_user(&a.project)?;
            let k = c.create_preauth_key(
                &user,
                &KeyRequest {
                    reusable: false,
                    ephemeral: false,
                    expiration: SystemTime::now() + a.auth_key_ttl,
                    tags: a.tags.clone(),
                },
            )?;
            let key = k.key.clone();
            minted = Some(k);
            key
        }
    };
    let payload = Payload::new(&settings, &key);
    let out = generate(&input, &payload, fresh, a.target).map_err(named)?;
    for w in &out.warnings {
        eprintln!("userdata-gen: warning: {w}");
    }
    let meta = json!({
        "mesh": true,
        "key_id": minted.as_ref().map(|k| k.id.clone()),
        "user": minted.as_ref().map(|k| k.user.clone()).unwrap_or(a.project.clone()),
        "expiration": minted.as_ref().map(|k| k.expiration.clone()),
        "reusable": false,
        "ephemeral": false,
        "tags": a.tags,
        "hostname": a.machine_id,
        "login_server": login_server,
        "format": out.format.to_string(),
        "encoding": out.encoding,
        "target": a.target,
        "files_added": payload.file_paths(),
        "units_added": payload.unit_names(),
        "agent_url": payload.agent_binary.as_ref().map(|b| b.url.clone()),
        "agent_sha512": payload.agent_binary.as_ref().map(|b| b.sha512.clone()),
        "warnings": out.warnings,
    });
    let meta = serde_json::to_vec_pretty(&meta).expect("metadata serializes");
    let mut outs = vec![(a.output.as_ref(), out.bytes)];
    outs.push((a.metadata_out.as_ref(), meta));
    write_outputs(&outs)
}

fn run_nodes(a: NodesArgs) -> Result<()> {
    let c = api_client(&a.headscale, "nodes")?;
    let mut nodes = headscale::project_nodes(&c.list_nodes()?, &a.project)?;
    match &a.headscale_debug_url {
        Some(debug) => {
            let versions = headscale::versions_from_nodestore(&headscale::fetch_nodestore(
                debug,
                a.headscale.timeout,
            )?);
            for n in &mut nodes {
                n.version = versions.get(&n.id).cloned();
            }
        }
        None => eprintln!(
            "userdata-gen: note: no agent versions: headscale's REST API does not report them; \
             give --headscale-debug-url"
        ),
    }
    let out = if a.json {
        serde_json::to_string_pretty(&nodes).expect("nodes serialize") + "\n"
    } else {
        nodes_table(&nodes)
    };
    std::io::stdout()
        .write_all(out.as_bytes())
        .map_err(|e| Error::io("stdout", e))
}

/// The nodes as a table with aligned columns.
fn nodes_table(nodes: &[headscale::NodeInfo]) -> String {
    let dash = || "-".to_string();
    let mut rows = vec![
        [
            "NAME",
            "HOSTNAME",
            "ADDRESSES",
            "ONLINE",
            "LAST SEEN",
            "VERSION",
        ]
        .map(String::from),
    ];
    for n in nodes {
        rows.push([
            n.name.clone(),
            n.hostname.clone(),
            n.addresses.join(","),
            if n.online { "yes" } else { "no" }.into(),
            n.last_seen.clone().unwrap_or_else(dash),
            n.version.clone().unwrap_or_else(dash),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            let cells: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            cells.join("  ").trim_end().to_string() + "\n"
        })
        .collect()
}

fn run_auth_key(a: AuthKeyArgs) -> Result<()> {
    let c = api_client(&a.headscale, "auth-key")?;
    let user = c.ensure_user(&a.project)?;
    let k = c.create_preauth_key(
        &user,
        &KeyRequest {
            reusable: a.reusable,
            ephemeral: a.ephemeral,
            expiration: SystemTime::now() + a.ttl,
            tags: a.tags,
        },
    )?;
    let out = if a.json {
        serde_json::to_string_pretty(&json!({
            "key": k.key.expose(),
            "id": k.id,
            "user": k.user,
            "expiration": k.expiration,
            "reusable": k.reusable,
            "ephemeral": k.ephemeral,
            "tags": k.tags,
        }))
        .expect("serializes")
    } else {
        k.key.expose().to_string()
    };
    println!("{out}");
    Ok(())
}
