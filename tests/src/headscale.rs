//! The lab's control server: a real headscale with a generated config, real TLS from the
//! lab CA, its embedded DERP relay (with STUN) and no outside DERP map.

use crate::cmd;
use crate::netns::Netns;
use crate::pki;
use crate::tools;
use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;
use serde_json::Value;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// The port headscale serves HTTPS (control, REST API, DERP) on; 443 as in production.
pub const HTTPS_PORT: u16 = 443;
/// The embedded DERP server's STUN port.
pub const STUN_PORT: u16 = 3478;
/// The embedded DERP region's code, as `tailscale status` shows it.
pub const DERP_REGION_CODE: &str = "headscale";
/// The ACL policy file in headscale's directory, when the lab has a policy.
const POLICY_FILE: &str = "policy.hujson";

/// A running headscale inside the lab's control-plane host.
#[derive(Debug, Clone)]
pub struct Headscale {
    ns: Netns,
    addr: Ipv4Addr,
    dir: PathBuf,
    /// Which of [`tools::HEADSCALE_VERSIONS`] runs.
    version: &'static str,
}

/// Options for a pre-auth key.
#[derive(Debug, Clone)]
pub struct KeyOptions {
    pub reusable: bool,
    pub ephemeral: bool,
    pub expiration: Duration,
    pub tags: Vec<String>,
}

impl Default for KeyOptions {
    fn default() -> Self {
        Self {
            reusable: false,
            ephemeral: false,
            expiration: Duration::from_secs(3600),
            tags: vec![],
        }
    }
}

/// A user as headscale reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: u64,
    pub name: String,
}

/// A pre-auth key. `key` is a secret: tests pass it through files, never argv or logs.
#[derive(Clone)]
pub struct PreAuthKey {
    pub id: u64,
    pub key: String,
}

impl std::fmt::Debug for PreAuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PreAuthKey {{ id: {}, key: <redacted> }}", self.id)
    }
}

/// A node as headscale reports it.
#[derive(Debug, Clone)]
pub struct Node {
    pub id: u64,
    pub name: String,
    pub given_name: String,
    pub user: String,
    pub online: bool,
    pub addresses: Vec<String>,
    pub tags: Vec<String>,
}

/// How long a started headscale may take to answer its health check, unless told otherwise.
pub const HEALTHY_WITHIN: Duration = Duration::from_secs(30);

impl Headscale {
    /// Writes config, TLS material and state dir under `dir`, starts headscale in `ns`
    /// listening on `addr`, and waits until it answers its health check over TLS.
    /// With `expired_tls`, headscale's certificate and its CA have expired (to test that
    /// clients refuse them); headscale then cannot be health-checked and is not waited for.
    /// With a `policy` (HuJSON), headscale enforces it from a file; without, it allows all.
    /// `version` is one of [`tools::HEADSCALE_VERSIONS`]; its config has only keys it knows.
    pub fn start(
        ns: &Netns,
        addr: Ipv4Addr,
        dir: &Path,
        expired_tls: bool,
        policy: Option<&str>,
        version: &'static str,
    ) -> Result<(Self, Child)> {
        std::fs::create_dir_all(dir)?;
        let pki = pki::generate_with(addr.into(), "headscale.vdc.test", expired_tls)?;
        std::fs::write(dir.join("ca.pem"), &pki.ca_pem)?;
        std::fs::write(dir.join("tls.pem"), &pki.cert_pem)?;
        write_private(&dir.join("tls.key"), pki.key_pem.as_bytes())?;
        let policy_path = policy
            .map(|p| {
                let path = dir.join(POLICY_FILE);
                std::fs::write(&path, p).map(|()| path)
            })
            .transpose()?;
        std::fs::write(
            dir.join("config.yaml"),
            config_yaml(addr, dir, policy_path.as_deref(), version),
        )?;
        let hs = Self {
            ns: ns.clone(),
            addr,
            dir: dir.to_path_buf(),
            version,
        };
        let child = hs.spawn(!expired_tls)?;
        Ok((hs, child))
    }

    /// Starts the server process on the prepared config (again, for a restart: same keys,
    /// database and certificate), waiting for its health check when `wait`.
    pub fn spawn(&self, wait: bool) -> Result<Child> {
        self.spawn_within(wait.then_some(HEALTHY_WITHIN))
    }

    /// [`Self::spawn`], waiting up to `healthy_within` for its health check if given: with
    /// thousands of nodes in its database, headscale (v0.28) takes minutes to start.
    pub fn spawn_within(&self, healthy_within: Option<Duration>) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = self
            .ns
            .command(self.bin())
            .arg("-c")
            .arg(self.config_path())
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start headscale")?;
        if let Some(limit) = healthy_within {
            self.wait_healthy(limit)?;
        }
        Ok(child)
    }

    /// Reattaches to a headscale started earlier (a persistent `lab up`).
    pub fn attach(ns: Netns, addr: Ipv4Addr, dir: PathBuf, version: &'static str) -> Self {
        Self {
            ns,
            addr,
            dir,
            version,
        }
    }

    /// The version that runs.
    pub fn version(&self) -> &'static str {
        self.version
    }

    /// Switches to another version's binary and config, on the same keys, database and
    /// certificate (an upgrade in place); the server must be stopped.
    pub fn set_version(&mut self, version: &'static str) -> Result<()> {
        std::fs::write(
            self.config_path(),
            config_yaml(self.addr, &self.dir, self.policy_path().as_deref(), version),
        )?;
        self.version = version;
        Ok(())
    }

    fn bin(&self) -> PathBuf {
        tools::headscale_at(self.version).bin("headscale")
    }

    /// The policy file headscale reads, if the lab started with a policy.
    pub fn policy_path(&self) -> Option<PathBuf> {
        Some(self.dir.join(POLICY_FILE)).filter(|p| p.exists())
    }

    /// The URL clients log in to, as `--login-server`.
    pub fn url(&self) -> String {
        format!("https://{}:{}", self.addr, HTTPS_PORT)
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.yaml")
    }

    /// The lab CA that signed headscale's certificate; clients must trust it.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("headscale.log")
    }

    /// headscale's SQLite database (touch it only while headscale is stopped).
    pub fn db_path(&self) -> PathBuf {
        self.dir.join("db.sqlite")
    }

    /// Adds `count` nodes named `<prefix>-<i>` straight into the database of a stopped
    /// headscale, each a copy of the newest node named like `like` (an SQL `LIKE` pattern)
    /// with keys, addresses and names of its own; an error if none is named like that.
    /// For the scale benchmark: headscale v0.28 registers ever more slowly as the tailnet
    /// grows (its peer map is rebuilt over all pairs of nodes at every batch of writes), but
    /// reads a database of thousands at start-up in one go. The copies never connect, like
    /// the nodes the benchmark registers; their IPv4 addresses come from 100.96.0.0/11,
    /// which headscale's sequential allocation reaches only after 2 million nodes.
    pub fn seed_nodes(&self, like: &str, prefix: &str, count: usize) -> Result<()> {
        let db = self.db_path();
        let sqlite = |sql: &str| -> Result<String> {
            crate::cmd::run_quiet(
                std::process::Command::new("sqlite3")
                    .arg("-batch")
                    .arg(&db)
                    .arg(sql),
            )
        };
        let columns = sqlite("SELECT name FROM pragma_table_info('nodes');")?;
        let fresh = |c: &str| -> Option<String> {
            let key = |kind: &str| format!("'{kind}:' || lower(hex(randomblob(32)))");
            Some(match c {
                "id" => return None,
                "machine_key" => key("mkey"),
                "node_key" => key("nodekey"),
                "disco_key" => key("discokey"),
                "ipv4" => {
                    "'100.' || (96 + i / 65536) || '.' || (i / 256 % 256) || '.' || (i % 256)"
                        .into()
                }
                "ipv6" => "'fd7a:115c:a1e0::2:' || printf('%x', i)".into(),
                "hostname" | "given_name" => format!("'{prefix}-' || (i - 1)"),
                other => format!("t.{other}"),
            })
        };
        let (names, values): (Vec<&str>, Vec<String>) =
            columns.lines().filter_map(|c| Some((c, fresh(c)?))).unzip();
        let sql = format!(
            "WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < {count}) \
             INSERT INTO nodes ({}) SELECT {} FROM k, \
             (SELECT * FROM nodes WHERE hostname LIKE '{like}' ORDER BY id DESC LIMIT 1) t; \
             SELECT changes();",
            names.join(", "),
            values.join(", ")
        );
        let added = sqlite(&sql)?;
        if added.trim() != count.to_string() {
            bail!(
                "{}: {} nodes written, not {count}: is there a node named like {like:?} to copy?",
                db.display(),
                added.trim()
            );
        }
        Ok(())
    }

    /// headscale's Prometheus metrics as text, from its metrics listener (read one with
    /// [`metric_value`]).
    pub fn metrics(&self) -> Result<String> {
        self.ns.enter(|| {
            use std::io::{Read, Write};
            let mut c = std::net::TcpStream::connect("127.0.0.1:9090")?;
            c.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
            c.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
            let mut text = String::new();
            c.read_to_string(&mut text)?;
            Ok(text)
        })
    }

    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let client = self.rest_unauthenticated();
        loop {
            match client.get_json("/health") {
                Ok(v) if v["status"] == "pass" => return Ok(()),
                Ok(v) => tracing_like(&format!("headscale health: {v}")),
                Err(e) if start.elapsed() > timeout => {
                    bail!(
                        "headscale did not become healthy within {timeout:?}: {e:#}\n--- {} ---\n{}",
                        self.log_path().display(),
                        crate::lab::tail(&self.log_path(), 30)
                    )
                }
                Err(_) => {}
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A `headscale` CLI command aimed at this server (over its unix socket), uncoloured.
    pub fn cli(&self) -> std::process::Command {
        let mut c = self.ns.command("env");
        c.arg("NO_COLOR=1")
            .arg(self.bin())
            .arg("-c")
            .arg(self.config_path());
        c
    }

    /// Runs the headscale CLI with JSON output. Never echoed: some of its answers are
    /// secrets, and polling would flood the demo.
    pub fn cli_json(&self, args: &[&str]) -> Result<Value> {
        let out = cmd::run_quiet(self.cli().args(args).args(["-o", "json"]))?;
        serde_json::from_str(&out)
            .with_context(|| format!("headscale {} printed no JSON: {out}", args.join(" ")))
    }

    /// Creates a user with the CLI.
    pub fn create_user(&self, name: &str) -> Result<User> {
        user_from(&self.cli_json(&["users", "create", name])?)
    }

    /// Creates a pre-auth key with the CLI.
    pub fn create_preauth_key(&self, user: &User, opts: &KeyOptions) -> Result<PreAuthKey> {
        let user_id = user.id.to_string();
        let exp = format!("{}s", opts.expiration.as_secs());
        let mut args = vec![
            "preauthkeys",
            "create",
            "--user",
            &user_id,
            "--expiration",
            &exp,
        ];
        if opts.reusable {
            args.push("--reusable");
        }
        if opts.ephemeral {
            args.push("--ephemeral");
        }
        let tags = opts.tags.join(",");
        if !tags.is_empty() {
            args.extend(["--tags", &tags]);
        }
        preauth_key_from(&self.cli_json(&args)?)
    }

    /// Creates an API key for the REST API with the CLI. The result is a secret.
    pub fn create_api_key(&self) -> Result<String> {
        let v = self.cli_json(&["apikeys", "create", "--expiration", "1d"])?;
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("`headscale apikeys create` printed no key string"))
    }

    /// Lists nodes with the CLI.
    pub fn nodes(&self) -> Result<Vec<Node>> {
        let v = self.cli_json(&["nodes", "list"])?;
        match v {
            Value::Null => Ok(vec![]),
            Value::Array(items) => items.iter().map(node_from).collect(),
            other => bail!("`headscale nodes list` printed {other}, expected a list"),
        }
    }

    /// The node named `name` as `headscale nodes list -o json` prints it (keys included).
    pub fn node_json(&self, name: &str) -> Result<Value> {
        let v = self.cli_json(&["nodes", "list"])?;
        v.as_array()
            .and_then(|n| n.iter().find(|n| n["name"] == name))
            .cloned()
            .ok_or_else(|| anyhow!("headscale lists no node {name}"))
    }

    /// The user `name`, as `headscale users list` knows it.
    pub fn user(&self, name: &str) -> Result<User> {
        let v = self.cli_json(&["users", "list"])?;
        v.as_array()
            .and_then(|u| u.iter().find(|u| u["name"] == name))
            .map(user_from)
            .ok_or_else(|| anyhow!("headscale lists no user {name}"))?
    }

    /// The id of the node named `name`.
    pub fn node_id(&self, name: &str) -> Result<u64> {
        id_of(&self.node_json(name)?["id"])
    }

    /// `headscale nodes <verb> -i <id of name>` (`expire`, `delete --force`), as an admin
    /// would.
    pub fn node_command(&self, verb: &[&str], name: &str) -> Result<()> {
        let id = self.node_id(name)?.to_string();
        cmd::run(self.cli().arg("nodes").args(verb).args(["-i", &id])).map(drop)
    }

    /// Approves `routes` (replacing what was approved) for the node named `name`, as an
    /// admin would with `headscale nodes approve-routes`.
    pub fn approve_routes(&self, name: &str, routes: &[&str]) -> Result<()> {
        let id = self.node_id(name)?;
        cmd::run(self.cli().args([
            "nodes",
            "approve-routes",
            "-i",
            &id.to_string(),
            "-r",
            &routes.join(","),
        ]))
        .map(drop)
    }

    /// A REST client authenticated with `api_key`, running inside the control-plane host.
    pub fn rest(&self, api_key: &str) -> Rest {
        Rest {
            ns: self.ns.clone(),
            base: self.url(),
            api_key: Some(api_key.to_string()),
            ca: self.ca_path(),
        }
    }

    fn rest_unauthenticated(&self) -> Rest {
        Rest {
            ns: self.ns.clone(),
            base: self.url(),
            api_key: None,
            ca: self.ca_path(),
        }
    }

    /// Waits until `pred` holds for the node list (e.g. a node is online).
    pub fn wait_nodes(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[Node]) -> bool,
    ) -> Result<Vec<Node>> {
        let start = Instant::now();
        loop {
            let nodes = self.nodes()?;
            if pred(&nodes) {
                return Ok(nodes);
            }
            if start.elapsed() > timeout {
                bail!("headscale: {what} not seen within {timeout:?}; nodes now: {nodes:?}");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

/// headscale's REST API (`/api/v1`), called with a bearer API key over TLS that trusts
/// only the lab CA. Requests are made from inside the control-plane namespace.
#[derive(Clone)]
pub struct Rest {
    ns: Netns,
    base: String,
    api_key: Option<String>,
    ca: PathBuf,
}

impl Rest {
    fn request(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}{}", self.base, path);
        let ca = std::fs::read(&self.ca)?;
        let key = self.api_key.clone();
        let shown = format!("{method} {url}");
        self.ns.enter(move || {
            let ca = reqwest::Certificate::from_pem(&ca)?;
            let client = reqwest::blocking::Client::builder()
                .tls_certs_only([ca])
                .timeout(Duration::from_secs(10))
                .build()?;
            let mut req = client.request(method, &url);
            if let Some(key) = key {
                req = req.bearer_auth(key);
            }
            if let Some(body) = body {
                req = req.json(&body);
            }
            let resp = req.send().with_context(|| shown.clone())?;
            let status = resp.status();
            let text = resp.text()?;
            if !status.is_success() {
                bail!("{shown}: HTTP {status}: {text}");
            }
            serde_json::from_str(&text).with_context(|| format!("{shown}: not JSON: {text}"))
        })
    }

    pub fn get_json(&self, path: &str) -> Result<Value> {
        self.request(reqwest::Method::GET, path, None)
    }

    pub fn post_json(&self, path: &str, body: Value) -> Result<Value> {
        self.request(reqwest::Method::POST, path, Some(body))
    }

    /// Finds the user `name`, or creates it.
    pub fn ensure_user(&self, name: &str) -> Result<User> {
        let found = self.get_json(&format!("/api/v1/user?name={name}"))?;
        if let Some(u) = found["users"].as_array().and_then(|a| a.first()) {
            return user_from(u);
        }
        user_from(&self.post_json("/api/v1/user", serde_json::json!({ "name": name }))?["user"])
    }

    pub fn create_preauth_key(&self, user: &User, opts: &KeyOptions) -> Result<PreAuthKey> {
        let expiration = humantime::format_rfc3339_seconds(SystemTime::now() + opts.expiration);
        let body = serde_json::json!({
            "user": user.id.to_string(),
            "reusable": opts.reusable,
            "ephemeral": opts.ephemeral,
            "expiration": expiration.to_string(),
            "aclTags": opts.tags,
        });
        preauth_key_from(&self.post_json("/api/v1/preauthkey", body)?["preAuthKey"])
    }

    pub fn nodes(&self) -> Result<Vec<Node>> {
        let v = self.get_json("/api/v1/node")?;
        v["nodes"]
            .as_array()
            .map(|a| a.iter().map(node_from).collect())
            .unwrap_or_else(|| Ok(vec![]))
    }
}

/// Reads a number that the CLI prints as a number and the REST API as a string.
fn id_of(v: &Value) -> Result<u64> {
    match v {
        Value::Number(n) => n.as_u64().ok_or_else(|| anyhow!("id {n} is not a u64")),
        Value::String(s) => s
            .parse()
            .with_context(|| format!("id {s:?} is not a number")),
        other => bail!("expected an id, found {other}"),
    }
}

fn user_from(v: &Value) -> Result<User> {
    Ok(User {
        id: id_of(&v["id"]).with_context(|| format!("user without id: {v}"))?,
        name: v["name"].as_str().unwrap_or_default().to_string(),
    })
}

fn preauth_key_from(v: &Value) -> Result<PreAuthKey> {
    Ok(PreAuthKey {
        id: id_of(&v["id"]).context("pre-auth key without id")?,
        key: v["key"]
            .as_str()
            .ok_or_else(|| anyhow!("pre-auth key response holds no key"))?
            .to_string(),
    })
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Both the CLI (protobuf field names) and the REST API (lowerCamelCase) shapes.
fn node_from(v: &Value) -> Result<Node> {
    let pick = |snake: &str, camel: &str| {
        if v[snake].is_null() {
            &v[camel]
        } else {
            &v[snake]
        }
    };
    #[derive(Deserialize)]
    struct U {
        #[serde(default)]
        name: String,
    }
    let user: U = serde_json::from_value(v["user"].clone()).unwrap_or(U {
        name: String::new(),
    });
    let mut tags = strings(&v["tags"]);
    tags.extend(strings(pick("forced_tags", "forcedTags")));
    Ok(Node {
        id: id_of(&v["id"]).with_context(|| format!("node without id: {v}"))?,
        name: v["name"].as_str().unwrap_or_default().to_string(),
        given_name: pick("given_name", "givenName")
            .as_str()
            .unwrap_or_default()
            .to_string(),
        user: user.name,
        online: v["online"].as_bool().unwrap_or(false),
        addresses: strings(pick("ip_addresses", "ipAddresses")),
        tags,
    })
}

fn tracing_like(msg: &str) {
    if cmd::echo_enabled() {
        println!("    {msg}");
    }
}

/// Writes a file only its owner can read (keys, secrets).
pub fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}

/// The generated headscale configuration: everything local to the lab, nothing reaching
/// out (no DERP map URLs, no update checks, no logtail). Without a policy file headscale
/// allows all traffic. Only keys `version` knows: v0.29 refuses to start on
/// `randomize_client_port` and deprecates `ephemeral_node_inactivity_timeout`.
pub fn config_yaml(addr: Ipv4Addr, dir: &Path, policy: Option<&Path>, version: &str) -> String {
    let d = dir.display();
    let policy = policy.map(|p| p.display().to_string()).unwrap_or_default();
    let before_v029 = version.starts_with("v0.27") || version.starts_with("v0.28");
    let (ephemeral, randomize) = if before_v029 {
        (
            "ephemeral_node_inactivity_timeout: 30m\n",
            "randomize_client_port: false\n",
        )
    } else {
        ("", "")
    };
    format!(
        r#"# Generated by the vdc lab; see tests/src/headscale.rs.
server_url: https://{addr}:{HTTPS_PORT}
listen_addr: {addr}:{HTTPS_PORT}
metrics_listen_addr: 127.0.0.1:9090
grpc_listen_addr: 127.0.0.1:50443
grpc_allow_insecure: false
tls_cert_path: {d}/tls.pem
tls_key_path: {d}/tls.key
noise:
  private_key_path: {d}/noise_private.key
prefixes:
  v4: 100.64.0.0/10
  v6: fd7a:115c:a1e0::/48
  allocation: sequential
derp:
  server:
    enabled: true
    region_id: 999
    region_code: "{DERP_REGION_CODE}"
    region_name: "Headscale Embedded DERP"
    verify_clients: true
    stun_listen_addr: "{addr}:{STUN_PORT}"
    private_key_path: {d}/derp_server_private.key
    automatically_add_embedded_derp_region: true
    ipv4: {addr}
  urls: []
  paths: []
  auto_update_enabled: false
disable_check_updates: true
{ephemeral}database:
  type: sqlite
  sqlite:
    path: {d}/db.sqlite
    write_ahead_log: true
log:
  level: info
  format: text
policy:
  mode: file
  path: "{policy}"
dns:
  magic_dns: true
  base_domain: mesh.vdc.test
  override_local_dns: false
  nameservers:
    global: []
unix_socket: {d}/headscale.sock
unix_socket_permission: "0770"
logtail:
  enabled: false
{randomize}"#
    )
}

/// `name`'s value in a Prometheus text exposition: a counter, a gauge, or a histogram's
/// `_sum` or `_count`, without labels; none if it is not there.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_metric_is_read_by_its_whole_name() {
        let text = "# HELP x_sum y\nheadscale_a_seconds_sum 37.8\nheadscale_a_seconds_count 1\n\
                    headscale_a{op=\"get\"} 3\n";
        assert_eq!(
            super::metric_value(text, "headscale_a_seconds_sum"),
            Some(37.8)
        );
        assert_eq!(
            super::metric_value(text, "headscale_a_seconds_count"),
            Some(1.0)
        );
        assert_eq!(super::metric_value(text, "headscale_a_seconds"), None);
        assert_eq!(super::metric_value(text, "headscale_a"), None);
    }
}
