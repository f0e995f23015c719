//! The agent's configuration: tailscale's `--config` file (`alpha0`) for the mesh, and our
//! own settings file (the format `userdata-gen` writes).

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
pub use userdata_gen::payload::AgentSettings;
use userdata_gen::payload::Secret;

/// Where the pre-auth key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthKey {
    Inline(Secret),
    /// `file:<path>`: the file is scrubbed once registration succeeded.
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub server_url: String,
    pub auth_key: Option<AuthKey>,
    pub hostname: String,
    pub enabled: bool,
    pub settings: AgentSettings,
}

fn field<'a>(v: &'a Value, name: &str, path: &Path) -> Result<Option<&'a str>> {
    match &v[name] {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s)),
        other => Err(Error::Config(format!(
            "{}: {name} must be a string, found {other}",
            path.display()
        ))),
    }
}

/// Parses a tailscale `alpha0` config file's text.
pub fn parse_mesh(
    text: &str,
    path: &Path,
) -> Result<(String, Option<AuthKey>, Option<String>, bool)> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| Error::Config(format!("{} is not valid JSON: {e}", path.display())))?;
    match field(&v, "Version", path)? {
        Some("alpha0") => {}
        other => {
            return Err(Error::Config(format!(
                "{}: Version is {other:?}; this agent reads \"alpha0\"",
                path.display()
            )));
        }
    }
    let server = field(&v, "ServerURL", path)?.ok_or_else(|| {
        Error::Config(format!(
            "{}: ServerURL is missing (the headscale URL)",
            path.display()
        ))
    })?;
    if !server.starts_with("https://") && !server.starts_with("http://") {
        return Err(Error::Config(format!(
            "{}: ServerURL {server:?} must start with https://",
            path.display()
        )));
    }
    let auth = field(&v, "AuthKey", path)?
        .filter(|s| !s.is_empty())
        .map(|s| match s.strip_prefix("file:") {
            Some(p) => AuthKey::File(PathBuf::from(p)),
            None => AuthKey::Inline(Secret::new(s)),
        });
    let hostname = field(&v, "Hostname", path)?.map(str::to_string);
    let enabled = match &v["Enabled"] {
        Value::Null => true,
        Value::Bool(b) => *b,
        Value::String(s) if s == "true" || s == "false" => s == "true",
        other => {
            return Err(Error::Config(format!(
                "{}: Enabled must be true or false, found {other}",
                path.display()
            )));
        }
    };
    Ok((
        server.trim_end_matches('/').to_string(),
        auth,
        hostname,
        enabled,
    ))
}

/// Reads the agent's own settings file.
pub fn load_settings(path: &Path) -> Result<AgentSettings> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let s: AgentSettings = serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    if s.version != 1 {
        return Err(Error::Config(format!(
            "{}: version {} is not supported (expected 1)",
            path.display(),
            s.version
        )));
    }
    Ok(s)
}

impl Config {
    /// Reads both files; any problem names the file and the field.
    pub fn load(mesh: &Path, settings: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(mesh).map_err(|e| Error::io(mesh, e))?;
        let (server_url, auth_key, hostname, enabled) = parse_mesh(&text, mesh)?;
        let settings_v = load_settings(settings)?;
        let hostname = match hostname {
            Some(h) => h,
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "vpn-agent".into()),
        };
        Ok(Config {
            server_url,
            auth_key,
            hostname,
            enabled,
            settings: settings_v,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_userdata_gen_writes() {
        let settings = userdata_gen::MeshSettings {
            login_server: "https://hs.example:443".into(),
            hostname: "m1".into(),
            ca_pem: None,
            vrf: None,
            agent: AgentSettings::default(),
        };
        let text = userdata_gen::payload::mesh_config(&settings);
        let (url, auth, host, enabled) = parse_mesh(&text, Path::new("t.conf")).unwrap();
        assert_eq!(url, "https://hs.example:443");
        assert_eq!(auth, Some(AuthKey::File("/etc/vpn-agent/authkey".into())));
        assert_eq!(host.as_deref(), Some("m1"));
        assert!(enabled);
    }

    #[test]
    fn errors_name_the_field() {
        for (text, want) in [
            ("{", "not valid JSON"),
            (r#"{"Version":"beta"}"#, "Version"),
            (r#"{"Version":"alpha0"}"#, "ServerURL is missing"),
            (
                r#"{"Version":"alpha0","ServerURL":"hs:443"}"#,
                "must start with https://",
            ),
            (
                r#"{"Version":"alpha0","ServerURL":"https://h","Enabled":3}"#,
                "Enabled",
            ),
            (
                r#"{"Version":"alpha0","ServerURL":"https://h","Hostname":1}"#,
                "Hostname must be a string",
            ),
        ] {
            let e = parse_mesh(text, Path::new("/etc/x.conf"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want) && e.contains("/etc/x.conf"), "{text}: {e}");
        }
    }
}
