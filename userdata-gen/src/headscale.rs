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

fn user_from(v: &Value, what: &str) -> Result<User> {
    let id = match &v["id"] {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    };
    Ok(User {
        id: id.ok_or_else(|| {
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
