//! headscale's REST API (`/api/v1`, v0.28), with a bearer API key over TLS (rustls; a custom
//! CA allowed): one user per project, single-use pre-auth keys.

use crate::error::{Error, Result};
use crate::payload::Secret;
use serde_json::{Value, json};
use std::time::{Duration, SystemTime};

/// A headscale user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: u64,
    pub name: String,
}

/// What to mint.
#[derive(Debug, Clone)]
pub struct KeyRequest {
    pub reusable: bool,
    pub ephemeral: bool,
    pub expiration: SystemTime,
    pub tags: Vec<String>,
}

/// A minted pre-auth key. Only `key` is secret.
#[derive(Debug, Clone)]
pub struct MintedKey {
    pub id: String,
    pub key: Secret,
    pub user: String,
    pub expiration: String,
    pub reusable: bool,
    pub ephemeral: bool,
    pub tags: Vec<String>,
}

pub struct Client {
    base: String,
    api_key: Secret,
    http: reqwest::blocking::Client,
}

/// Formats an error with its causes (reqwest hides the interesting part, e.g. a TLS
/// verification failure, in its source chain).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

impl Client {
    /// A client for headscale at `base` (e.g. `https://headscale.example:443`).
    pub fn new(
        base: &str,
        api_key: Secret,
        ca_pem: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Client> {
        let base = base.trim_end_matches('/').to_string();
        if !base.starts_with("https://") && !base.starts_with("http://") {
            return Err(Error::input(format!(
                "headscale API URL {base:?} must start with https:// (or http://)"
            )));
        }
        let mut b = reqwest::blocking::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("userdata-gen/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| {
                Error::input(format!("--ca-file holds no usable PEM certificate: {e}"))
            })?;
            if certs.is_empty() {
                return Err(Error::input("--ca-file holds no PEM certificate"));
            }
            b = b.tls_certs_merge(certs);
        }
        let http = b.build().map_err(|e| {
            Error::Headscale(format!("cannot set up the HTTP client: {}", chain(&e)))
        })?;
        Ok(Client {
            base,
            api_key,
            http,
        })
    }

    fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let what = format!("{method} {url}");
        let mut req = self
            .http
            .request(method, &url)
            .bearer_auth(self.api_key.expose());
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().map_err(|e| {
            let cause = chain(&e);
            if cause.contains("certificate") {
                Error::Headscale(format!(
                    "headscale's TLS certificate was not accepted ({what}): {cause}; \
                     give the CA that signed it with --ca-file"
                ))
            } else {
                Error::Headscale(format!("cannot reach headscale ({what}): {cause}"))
            }
        })?;
        let status = resp.status();
        let text = resp.text().unwrap_or_default();
        let snippet: String = text.chars().take(300).collect();
        match status.as_u16() {
            200..=299 => serde_json::from_str(&text).map_err(|_| {
                Error::Headscale(format!(
                    "{what} answered with something that is not JSON ({snippet:?}); \
                     this server does not speak headscale v0.28's REST API"
                ))
            }),
            401 | 403 => Err(Error::Headscale(format!(
                "{what} refused the API key (HTTP {status}); check the key in --headscale-api-key-file \
                 or HEADSCALE_API_KEY and that it has not expired"
            ))),
            404 | 405 => Err(Error::Headscale(format!(
                "{what}: HTTP {status}; this server does not speak headscale v0.28's REST API"
            ))),
            _ => Err(Error::Headscale(format!(
                "{what}: HTTP {status}: {}",
                snippet.trim()
            ))),
        }
    }

    /// Finds the user `name`, creating it if missing (tolerating a concurrent create).
    pub fn ensure_user(&self, name: &str) -> Result<User> {
        if let Some(u) = self.find_user(name)? {
            return Ok(u);
        }
        match self.call(
            reqwest::Method::POST,
            "/api/v1/user",
            Some(json!({ "name": name })),
        ) {
            Ok(v) => user_from(&v["user"], "POST /api/v1/user"),
            Err(e) => self.find_user(name)?.ok_or(e),
        }
    }

    fn find_user(&self, name: &str) -> Result<Option<User>> {
        let v = self.call(
            reqwest::Method::GET,
            &format!("/api/v1/user?name={}", url_escape(name)),
            None,
        )?;
        let users = v["users"].as_array().ok_or_else(|| {
            Error::Headscale(
                "GET /api/v1/user: no `users` list in the answer; is this headscale v0.28?".into(),
            )
        })?;
        users
            .iter()
            .find(|u| u["name"].as_str() == Some(name))
            .map(|u| user_from(u, "GET /api/v1/user"))
            .transpose()
    }

    /// Mints a pre-auth key for `user`.
    pub fn create_preauth_key(&self, user: &User, req: &KeyRequest) -> Result<MintedKey> {
        let expiration = humantime::format_rfc3339_seconds(req.expiration).to_string();
        let body = json!({
            "user": user.id.to_string(),
            "reusable": req.reusable,
            "ephemeral": req.ephemeral,
            "expiration": expiration,
            "aclTags": req.tags,
        });
        let v = self.call(reqwest::Method::POST, "/api/v1/preauthkey", Some(body))?;
        let k = &v["preAuthKey"];
        let bad = |what: &str| {
            Error::Headscale(format!(
                "POST /api/v1/preauthkey: the answer has no {what}; is this headscale v0.28?"
            ))
        };
        let key = k["key"]
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("preAuthKey.key"))?;
        let id = match &k["id"] {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => return Err(bad("preAuthKey.id")),
        };
        Ok(MintedKey {
            id,
            key: Secret::new(key),
            user: user.name.clone(),
            expiration: k["expiration"].as_str().unwrap_or(&expiration).to_string(),
            reusable: k["reusable"].as_bool().unwrap_or(req.reusable),
            ephemeral: k["ephemeral"].as_bool().unwrap_or(req.ephemeral),
            tags: k["aclTags"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|t| t.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_else(|| req.tags.clone()),
        })
    }
}

/// A node as an operator asks about it: headscale's REST API, plus the agent's version where
/// headscale's debug listener gave it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeInfo {
    pub id: u64,
    /// The name in the mesh (headscale's given name).
    pub name: String,
    /// The hostname it registered with: the machine id, for a firewall.
    pub hostname: String,
    pub addresses: Vec<String>,
    pub online: bool,
    pub last_seen: Option<String>,
    pub expiry: Option<String>,
    pub tags: Vec<String>,
    /// `Hostinfo.IPNVersion`: e.g. `vpn-agent-0.1.0-abc123`, or tailscale's `1.102.3-t…`.
    pub version: Option<String>,
}

impl Client {
    /// Every node headscale has (`GET /api/v1/node`), as its API answers.
    pub fn list_nodes(&self) -> Result<Value> {
        self.call(reqwest::Method::GET, "/api/v1/node", None)
    }
}

/// The nodes of `project` in a `GET /api/v1/node` answer: those of its user, and tagged
/// ones (owned by their tags since v0.28) registered with one of its user's keys. Only the
/// listed fields are read: the answer also holds each node's pre-auth key.
pub fn project_nodes(answer: &Value, project: &str) -> Result<Vec<NodeInfo>> {
    let nodes = answer["nodes"].as_array().ok_or_else(|| {
        Error::Headscale("GET /api/v1/node: no `nodes` list in the answer".into())
    })?;
    let text = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(String::from);
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().filter_map(&text).collect())
            .unwrap_or_default()
    };
    let mut out = vec![];
    for n in nodes {
        let ours = n["user"]["name"].as_str() == Some(project)
            || n["preAuthKey"]["user"]["name"].as_str() == Some(project);
        if !ours {
            continue;
        }
        // v0.27 lists tags as forced/valid; v0.28 and later as `tags`.
        let mut tags = strings(&n["tags"]);
        for t in strings(&n["validTags"])
            .into_iter()
            .chain(strings(&n["forcedTags"]))
        {
            if !tags.contains(&t) {
                tags.push(t);
            }
        }
        out.push(NodeInfo {
            id: id_of(&n["id"]).ok_or_else(|| {
                Error::Headscale("GET /api/v1/node: a node without a numeric id".into())
            })?,
            name: text(&n["givenName"]).unwrap_or_default(),
            hostname: text(&n["name"]).unwrap_or_default(),
            addresses: strings(&n["ipAddresses"]),
            online: n["online"].as_bool().unwrap_or(false),
            last_seen: text(&n["lastSeen"]),
            expiry: text(&n["expiry"]).filter(|e| !e.starts_with("0001-01-01")),
            tags,
            version: None,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Node id to `Hostinfo.IPNVersion` from headscale's `/debug/nodestore` (JSON), which its
/// REST API does not carry (v0.27 to v0.29).
pub fn versions_from_nodestore(store: &Value) -> std::collections::HashMap<u64, String> {
    store
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(id, node)| {
                    let id = id.parse().ok().or_else(|| id_of(&node["ID"]))?;
                    let v = node["Hostinfo"]["IPNVersion"].as_str()?;
                    Some((id, v.to_string()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Fetches headscale's `/debug/nodestore` from its debug listener (`metrics_listen_addr`),
/// which answers loopback, private and tailnet addresses only and takes no API key (none is
/// sent).
pub fn fetch_nodestore(debug_url: &str, timeout: Duration) -> Result<Value> {
    let url = format!("{}/debug/nodestore", debug_url.trim_end_matches('/'));
    let http = reqwest::blocking::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| Error::Headscale(format!("cannot set up the HTTP client: {}", chain(&e))))?;
    let resp = http
        .get(&url)
        .header("Accept", "application/json")
        .send()
        .map_err(|e| Error::Headscale(format!("cannot reach {url}: {}", chain(&e))))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(Error::Headscale(format!(
            "GET {url}: HTTP {status} (headscale's debug listener answers loopback, private \
             and tailnet addresses only)"
        )));
    }
    resp.json().map_err(|e| {
        Error::Headscale(format!(
            "GET {url}: not the JSON of headscale's node store: {}",
            chain(&e)
        ))
    })
}

fn id_of(v: &Value) -> Option<u64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

fn user_from(v: &Value, what: &str) -> Result<User> {
    Ok(User {
        id: id_of(&v["id"]).ok_or_else(|| {
            Error::Headscale(format!(
                "{what}: a user without a numeric id; is this headscale v0.28?"
            ))
        })?,
        name: v["name"].as_str().unwrap_or_default().to_string(),
    })
}

fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_projects_nodes_are_its_users_and_its_keys_tagged_ones() {
        let answer = json!({ "nodes": [
            { "id": "2", "givenName": "fw-b", "name": "m2", "user": { "name": "tagged-devices" },
              "preAuthKey": { "user": { "name": "p1" }, "key": "hskey-auth-SECRET" },
              "ipAddresses": ["100.64.0.2"], "online": true, "tags": ["tag:firewall"],
              "lastSeen": "2026-12-02T07:00:00Z", "expiry": "0001-01-01T00:00:00Z" },
            { "id": "1", "givenName": "fw-a", "name": "m1", "user": { "name": "p1" },
              "validTags": ["tag:fw"], "forcedTags": ["tag:fw", "tag:x"] },
            { "id": "3", "givenName": "other", "user": { "name": "p2" } },
        ]});
        let nodes = project_nodes(&answer, "p1").unwrap();
        assert_eq!(
            nodes
                .iter()
                .map(|n| (n.id, n.name.as_str()))
                .collect::<Vec<_>>(),
            [(1, "fw-a"), (2, "fw-b")]
        );
        assert_eq!(nodes[0].tags, ["tag:fw", "tag:x"]);
        assert_eq!(nodes[1].expiry, None);
        assert!(nodes[1].online && !nodes[0].online);
        assert!(!format!("{nodes:?}").contains("SECRET"));
        assert!(project_nodes(&json!({}), "p1").is_err());

        let store = json!({ "2": { "ID": 2, "Hostinfo": { "IPNVersion": "vpn-agent-1-abc" } },
                            "1": { "ID": 1, "Hostinfo": null } });
        let v = versions_from_nodestore(&store);
        assert_eq!(v.get(&2).map(String::as_str), Some("vpn-agent-1-abc"));
        assert_eq!(v.len(), 1);
    }

    #[test]
    fn escapes_query_values() {
        assert_eq!(url_escape("proj-1_a.b"), "proj-1_a.b");
        assert_eq!(url_escape("a b&c"), "a%20b%26c");
    }

    #[test]
    fn refuses_urls_without_scheme() {
        let e = Client::new(
            "headscale:443",
            Secret::new("k"),
            None,
            Duration::from_secs(1),
        )
        .err()
        .unwrap();
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn a_dead_server_is_exit_3_without_the_key() {
        // Port 9 on loopback: nothing listens there.
        let c = Client::new(
            "http://127.0.0.1:9",
            Secret::new("SECRET-API-KEY"),
            None,
            Duration::from_secs(2),
        )
        .unwrap();
        let e = c.ensure_user("p").unwrap_err();
        assert_eq!(e.exit_code(), 3);
        let msg = e.to_string();
        assert!(msg.contains("cannot reach headscale"), "{msg}");
        assert!(!msg.contains("SECRET"), "{msg}");
    }
}
