//! Merging our files and units into an Ignition config, spec 2.x or 3.x, on the JSON
//! document itself: key order, unknown fields and everything else the user wrote survive.
//!
//! Ignition's own merge rules make a field-by-field patch of a user entry unsafe (a parent's
//! `mode` or `compression` would leak into ours), so any user entry at one of our paths or
//! with one of our unit names is a conflict, never a patch.

use crate::error::{Error, Result};
use crate::payload::{AGENT_BINARY_PATH, Payload, RemoteBinary, UNIT_DIR};
use base64::Engine;
use serde_json::{Map, Value, json};
use std::io::Read;

/// An Ignition spec version `major.minor.0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Spec {
    pub major: u8,
    pub minor: u8,
}

/// What metal-stack's firewall-controller-manager sends, and what we write for no userdata.
pub const DEFAULT_SPEC: Spec = Spec { major: 2, minor: 3 };
/// The newest 2.x that flatcar Ignition v0.36.2 accepts.
pub const MAX_V2_MINOR: u8 = 4;
/// The newest 3.x that the `ignition-config` crate knows.
pub const MAX_V3_MINOR: u8 = 6;

impl Spec {
    /// Parses `"2.3.0"`; refuses versions no supported Ignition reads.
    pub fn parse(v: &str) -> Result<Spec> {
        let bad = || {
            Error::input(format!(
                "$.ignition.version is {v:?}: supported are 2.0.0 to 2.{MAX_V2_MINOR}.0 and 3.0.0 to 3.{MAX_V3_MINOR}.0"
            ))
        };
        let parts: Vec<&str> = v.split('.').collect();
        let [major, minor, "0"] = parts.as_slice() else {
            return Err(bad());
        };
        let spec = Spec {
            major: major.parse().map_err(|_| bad())?,
            minor: minor.parse().map_err(|_| bad())?,
        };
        match spec.major {
            2 if spec.minor <= MAX_V2_MINOR => Ok(spec),
            3 if spec.minor <= MAX_V3_MINOR => Ok(spec),
            _ => Err(bad()),
        }
    }

    /// The key under `ignition.config` that lists child configs: `append` in 2.x, `merge` in 3.x.
    fn children_key(self) -> &'static str {
        if self.major == 2 { "append" } else { "merge" }
    }
}

impl std::fmt::Display for Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.0", self.major, self.minor)
    }
}

/// The result of a merge.
#[derive(Debug, Clone)]
pub struct Merged {
    pub text: String,
    pub spec: Spec,
    /// Things a person should know (a remote child config we could not check, ...).
    pub warnings: Vec<String>,
}

/// A fresh, empty config of `spec`.
pub fn empty(spec: Spec) -> String {
    json!({ "ignition": { "version": spec.to_string() } }).to_string()
}

/// Adds `payload` to the Ignition config `text`, after the user's own entries.
pub fn merge(text: &str, payload: &Payload) -> Result<Merged> {
    let mut doc = parse_doc(text, "userdata")?;
    let spec = version(&doc, "userdata")?;
    let mut taken = vec![];
    let mut warnings = vec![];
    let mut inflate = MAX_INFLATED;
    collect(&doc, spec, "$", 0, &mut taken, &mut warnings, &mut inflate)?;
    check_conflicts(payload, &taken)?;
    add(&mut doc, spec, payload)?;
    let out = if text.contains('\n') {
        serde_json::to_string_pretty(&doc).expect("JSON value serializes") + "\n"
    } else {
        serde_json::to_string(&doc).expect("JSON value serializes")
    };
    if spec.major == 3 {
        // Our own check against the published 3.x schema: the output must parse as its version.
        ignition_config::Config::parse_str(&out).map_err(|e| {
            Error::input(format!(
                "the merged config does not parse as Ignition {spec}: {e}"
            ))
        })?;
    }
    Ok(Merged {
        text: out,
        spec,
        warnings,
    })
}

fn parse_doc(text: &str, what: &str) -> Result<Value> {
    let doc: Value = serde_json::from_str(text)
        .map_err(|e| Error::input(format!("{what} is not valid Ignition JSON: {e}")))?;
    if !doc.is_object() {
        return Err(Error::input(format!(
            "{what} is JSON but not an object, so not an Ignition config"
        )));
    }
    Ok(doc)
}

fn version(doc: &Value, what: &str) -> Result<Spec> {
    match &doc["ignition"]["version"] {
        Value::String(v) => Spec::parse(v).map_err(|e| Error::input(format!("{what}: {e}"))),
        Value::Null => Err(Error::input(format!(
            "{what} is JSON without $.ignition.version, so not an Ignition config"
        ))),
        other => Err(Error::input(format!(
            "{what}: $.ignition.version must be a string, found {other}"
        ))),
    }
}

/// A path or unit the user's config already claims, and where it does.
#[derive(Debug)]
pub(crate) struct Taken {
    /// Normalised absolute path on the target.
    pub path: String,
    /// Whether the entry is a directory (a directory above our files is fine).
    pub is_dir: bool,
    /// Where the entry is, e.g. `$.storage.files[2]`.
    pub at: String,
}

fn array<'a>(v: &'a Value, at: &str) -> Result<&'a [Value]> {
    match v {
        Value::Null => Ok(&[]),
        Value::Array(a) => Ok(a),
        other => Err(Error::input(format!(
            "userdata: {at} must be a list, found {}",
            type_name(other)
        ))),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The most bytes gzip-compressed `data:` children may inflate to, all together. The tenant
/// writes the userdata and metal-api runs us in its allocation path: a few kilobytes of
/// gzip must not take gigabytes there. Real child configs are kilobytes.
pub const MAX_INFLATED: usize = 16 << 20;

/// Collects every path and unit `doc` claims, following `data:` child configs; `inflate` is
/// what is left of [`MAX_INFLATED`].
fn collect(
    doc: &Value,
    spec: Spec,
    origin: &str,
    depth: usize,
    taken: &mut Vec<Taken>,
    warnings: &mut Vec<String>,
    inflate: &mut usize,
) -> Result<()> {
    let config = &doc["ignition"]["config"];
    let replace = &config["replace"]["source"];
    if replace.as_str().is_some_and(|s| !s.is_empty()) {
        return Err(Error::input(format!(
            "userdata: {origin}.ignition.config.replace makes Ignition discard this config, \
             the mesh agent included; merge the other config instead ({origin}.ignition.config.{})",
            spec.children_key()
        )));
    }
    for kind in ["files", "directories", "links"] {
        let at = format!("{origin}.storage.{kind}");
        for (i, entry) in array(&doc["storage"][kind], &at)?.iter().enumerate() {
            if let Some(p) = entry["path"].as_str() {
                taken.push(Taken {
                    path: normalize(p),
                    is_dir: kind == "directories",
                    at: format!("{at}[{i}]"),
                });
            }
        }
    }
    let at = format!("{origin}.systemd.units");
    for (i, unit) in array(&doc["systemd"]["units"], &at)?.iter().enumerate() {
        let Some(name) = unit["name"].as_str() else {
            continue;
        };
        taken.push(Taken {
            path: format!("{UNIT_DIR}/{name}"),
            is_dir: false,
            at: format!("{at}[{i}] (unit {name})"),
        });
        let dat = format!("{at}[{i}].dropins");
        for (j, d) in array(&unit["dropins"], &dat)?.iter().enumerate() {
            if let Some(dn) = d["name"].as_str() {
                taken.push(Taken {
                    path: format!("{UNIT_DIR}/{name}.d/{dn}"),
                    is_dir: false,
                    at: format!("{dat}[{j}]"),
                });
            }
        }
    }
    let key = spec.children_key();
    let at = format!("{origin}.ignition.config.{key}");
    for (i, child) in array(&config[key], &at)?.iter().enumerate() {
        let cat = format!("{at}[{i}]");
        let source = child["source"].as_str().unwrap_or_default();
        if source.starts_with("data:") {
            if depth >= 8 {
                return Err(Error::input(format!(
                    "userdata: {cat} nests data: configs more than 8 deep"
                )));
            }
            let bytes = data_url(source, child["compression"].as_str(), *inflate)
                .map_err(|e| Error::input(format!("userdata: {cat}.source: {e}")))?;
            if child["compression"].as_str() == Some("gzip") {
                *inflate -= bytes.len();
            }
            let text = String::from_utf8(bytes)
                .map_err(|_| Error::input(format!("userdata: {cat}.source is not UTF-8 text")))?;
            let child_doc = parse_doc(&text, &format!("userdata {cat} (data URL)"))?;
            let child_spec = version(&child_doc, &format!("userdata {cat} (data URL)"))?;
            collect(
                &child_doc,
                child_spec,
                &cat,
                depth + 1,
                taken,
                warnings,
                inflate,
            )?;
        } else if !source.is_empty() {
            warnings.push(format!(
                "userdata {cat} fetches {} at boot; it was not checked and could override \
                 the mesh agent's files or units",
                redact_url(source)
            ));
        }
    }
    Ok(())
}

/// A URL without its query and credentials, for messages.
fn redact_url(url: &str) -> String {
    let no_query = url.split(['?', '#']).next().unwrap_or_default();
    match no_query.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((_, host)) => format!("{scheme}://<credentials>@{host}"),
            None => no_query.to_string(),
        },
        None => no_query.to_string(),
    }
}

pub(crate) fn check_conflicts(payload: &Payload, taken: &[Taken]) -> Result<()> {
    // Each owned path with a trailing slash, built once: `taken` can hold thousands of entries.
    let owned: Vec<(String, String)> = payload
        .owned_paths()
        .into_iter()
        .map(|p| {
            let dir = format!("{p}/");
            (p, dir)
        })
        .collect();
    for t in taken {
        for (ours, ours_dir) in &owned {
            let inside_ours = t.path == *ours || t.path.starts_with(ours_dir.as_str());
            let blocks_ours = !t.is_dir
                && ours.len() > t.path.len()
                && ours.starts_with(t.path.as_str())
                && ours.as_bytes()[t.path.len()] == b'/';
            if inside_ours || blocks_ours {
                return Err(Error::Conflict(format!(
                    "{} claims {}, which the mesh agent owns ({}); remove that entry",
                    t.at,
                    t.path,
                    if inside_ours {
                        "same path"
                    } else {
                        "a file where our directory must be"
                    }
                )));
            }
        }
    }
    Ok(())
}

/// Lexically normalises an absolute path: no `.`, `..`, repeated or trailing slashes.
pub fn normalize(p: &str) -> String {
    let mut parts: Vec<&str> = vec![];
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Decodes an RFC 2397 data URL, and gzip when `compression` says so.
/// Decodes a `data:` URL; gzip content may inflate to `max_inflated` bytes at most.
pub fn data_url(
    url: &str,
    compression: Option<&str>,
    max_inflated: usize,
) -> Result<Vec<u8>, String> {
    let rest = url.strip_prefix("data:").ok_or("not a data: URL")?;
    let (header, data) = rest.split_once(',').ok_or("data URL without a comma")?;
    let raw = if header.ends_with(";base64") {
        let cleaned: String = data.chars().filter(|c| !c.is_whitespace()).collect();
        base64::engine::general_purpose::STANDARD
            .decode(cleaned.trim_end_matches('='))
            .or_else(|_| {
                base64::engine::general_purpose::STANDARD_NO_PAD
                    .decode(cleaned.trim_end_matches('='))
            })
            .map_err(|e| format!("bad base64 in data URL: {e}"))?
    } else {
        percent_decode(data)?
    };
    match compression {
        None | Some("") => Ok(raw),
        Some("gzip") => {
            let mut out = vec![];
            flate2::read::GzDecoder::new(raw.as_slice())
                .take(max_inflated as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| format!("bad gzip in data URL: {e}"))?;
            if out.len() > max_inflated {
                return Err(format!(
                    "gzip data inflates past the limit of {} MiB for all compressed children \
                     together; refused",
                    MAX_INFLATED >> 20
                ));
            }
            Ok(out)
        }
        Some(other) => Err(format!("unknown compression {other:?}")),
    }
}

fn percent_decode(s: &str) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-escape at byte {i} of the data URL"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// `data:;base64,...`: valid in every spec version and in flatcar's 2.x (no compression).
fn to_data_url(bytes: &[u8]) -> String {
    format!(
        "data:;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn object<'a>(
    parent: &'a mut Map<String, Value>,
    key: &str,
    at: &str,
) -> Result<&'a mut Map<String, Value>> {
    let v = parent.entry(key).or_insert_with(|| json!({}));
    if v.is_null() {
        *v = json!({});
    }
    v.as_object_mut()
        .ok_or_else(|| Error::input(format!("userdata: {at}.{key} must be an object")))
}

fn list<'a>(parent: &'a mut Map<String, Value>, key: &str, at: &str) -> Result<&'a mut Vec<Value>> {
    let v = parent.entry(key).or_insert_with(|| json!([]));
    if v.is_null() {
        *v = json!([]);
    }
    v.as_array_mut()
        .ok_or_else(|| Error::input(format!("userdata: {at}.{key} must be a list")))
}

/// A file entry owned by root, in fields valid in every minor version of `spec`'s major.
fn file_entry(spec: Spec, path: &str, contents: Value, mode: u32) -> Value {
    let mut entry = Map::new();
    if spec.major == 2 {
        // flatcar's 2.x requires the filesystem; `overwrite` defaults to true there.
        entry.insert("filesystem".into(), json!("root"));
    }
    entry.insert("path".into(), json!(path));
    if spec.major == 3 {
        entry.insert("overwrite".into(), json!(true));
    }
    entry.insert("contents".into(), contents);
    // Always explicit: a 2.x file without a mode is created 0000.
    entry.insert("mode".into(), json!(mode));
    // By id: a name needs /etc/passwd in the target root.
    entry.insert("user".into(), json!({ "id": 0 }));
    entry.insert("group".into(), json!({ "id": 0 }));
    Value::Object(entry)
}

/// The agent's binary as a remote file Ignition verifies (a mismatch fails the boot), and
/// the CA for its server in `ignition.security.tls`, beside any the user trusts.
fn add_remote_binary(
    root: &mut Map<String, Value>,
    spec: Spec,
    binary: &RemoteBinary,
) -> Result<()> {
    if let Some(ca) = &binary.ca_pem {
        if spec < (Spec { major: 2, minor: 2 }) {
            return Err(Error::input(format!(
                "--agent-ca-file needs Ignition spec 2.2.0 or later (ignition.security.tls);                  the userdata is {spec}: raise its version, or serve the agent from a server                  with a public certificate"
            )));
        }
        let ignition = object(root, "ignition", "$")?;
        let security = object(ignition, "security", "$.ignition")?;
        let tls = object(security, "tls", "$.ignition.security")?;
        let cas = list(tls, "certificateAuthorities", "$.ignition.security.tls")?;
        cas.push(json!({ "source": to_data_url(ca.as_bytes()) }));
    }
    let storage = object(root, "storage", "$")?;
    let files = list(storage, "files", "$.storage")?;
    let contents = json!({
        "source": binary.url,
        "verification": { "hash": format!("sha512-{}", binary.sha512) },
    });
    files.push(file_entry(spec, AGENT_BINARY_PATH, contents, 0o755));
    Ok(())
}

/// Appends our entries, in fields valid in every minor version of `spec`'s major.
fn add(doc: &mut Value, spec: Spec, payload: &Payload) -> Result<()> {
    let root = doc.as_object_mut().expect("checked to be an object");
    if let Some(binary) = &payload.agent_binary {
        add_remote_binary(root, spec, binary)?;
    }
    let storage = object(root, "storage", "$")?;
    let files = list(storage, "files", "$.storage")?;
    for f in &payload.files {
        let contents = json!({ "source": to_data_url(&f.contents) });
        files.push(file_entry(spec, &f.path, contents, f.mode));
    }
    let systemd = object(root, "systemd", "$")?;
    let units = list(systemd, "units", "$.systemd")?;
    let enable_key = if spec == (Spec { major: 2, minor: 0 }) {
        "enable"
    } else {
        "enabled"
    };
    for u in &payload.units {
        let mut entry = Map::new();
        entry.insert("name".into(), json!(u.name));
        entry.insert(enable_key.into(), json!(true));
        entry.insert("contents".into(), json!(u.contents));
        units.push(Value::Object(entry));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload() -> Payload {
        crate::payload::test_payload()
    }

    #[test]
    fn a_gzip_bomb_is_cut_off_at_the_limit() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(vec![], flate2::Compression::best());
        gz.write_all(&vec![b' '; MAX_INFLATED + 1]).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(gz.finish().unwrap());
        let config = format!(
            r#"{{"ignition":{{"version":"3.3.0","config":{{"merge":[{{"source":"data:;base64,{b64}","compression":"gzip"}}]}}}}}}"#
        );
        let e = merge(&config, &payload()).unwrap_err().to_string();
        assert!(
            e.contains("limit of 16 MiB") && e.contains("merge[0]"),
            "{e}"
        );
    }

    #[test]
    fn versions() {
        assert_eq!(Spec::parse("2.3.0").unwrap(), DEFAULT_SPEC);
        assert!(Spec::parse("3.6.0").is_ok());
        for bad in ["3.7.0", "2.5.0", "3.4.0-experimental", "3.3", "1.0.0", "x"] {
            assert!(Spec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keeps_user_content_and_order() {
        let user = r#"{"ignition":{"version":"2.3.0","zzz":1},"storage":{"files":[{"filesystem":"root","path":"/etc/a","mode":384,"x-unknown":true}]},"networkd":{"units":[{"name":"a.network"}]},"passwd":{}}"#;
        let m = merge(user, &payload()).unwrap();
        let out: Value = serde_json::from_str(&m.text).unwrap();
        let keys: Vec<&String> = out.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            ["ignition", "storage", "networkd", "passwd", "systemd"]
        );
        assert_eq!(out["storage"]["files"][0]["x-unknown"], true);
        assert_eq!(out["ignition"]["zzz"], 1);
        assert_eq!(out["storage"]["files"][1]["filesystem"], "root");
        assert!(out["storage"]["files"][1].get("overwrite").is_none());
        assert_eq!(out["systemd"]["units"][0]["enabled"], true);
        assert!(!m.text.contains('\n'), "compact input stays compact");
    }

    #[test]
    fn spec_2_0_uses_enable_and_3_x_overwrite() {
        let m = merge(r#"{"ignition":{"version":"2.0.0"}}"#, &payload()).unwrap();
        assert!(m.text.contains(r#""enable":true"#));
        let m = merge(r#"{"ignition":{"version":"3.0.0"}}"#, &payload()).unwrap();
        assert!(m.text.contains(r#""overwrite":true"#));
        assert!(!m.text.contains("filesystem"));
    }

    #[test]
    fn conflicts_name_the_entry() {
        for (user, want) in [
            (
                r#"{"ignition":{"version":"2.3.0"},"storage":{"files":[{"path":"/etc/vpn-agent//authkey"}]}}"#,
                "$.storage.files[0]",
            ),
            (
                r#"{"ignition":{"version":"2.3.0"},"storage":{"links":[{"path":"/etc/vpn-agent"}]}}"#,
                "$.storage.links[0]",
            ),
            (
                r#"{"ignition":{"version":"3.3.0"},"systemd":{"units":[{"name":"tailscaled.service"}]}}"#,
                "unit tailscaled.service",
            ),
            (
                r#"{"ignition":{"version":"3.3.0"},"systemd":{"units":[{"name":"x.service","dropins":[]}]},"storage":{"files":[{"path":"/etc/systemd/system/tailscaled.service.d/10-x.conf"}]}}"#,
                "$.storage.files[0]",
            ),
        ] {
            let e = merge(user, &payload()).unwrap_err();
            assert!(matches!(e, Error::Conflict(_)), "{e}");
            assert!(e.to_string().contains(want), "{e}");
        }
        // A directory above our files is fine.
        merge(r#"{"ignition":{"version":"2.3.0"},"storage":{"directories":[{"filesystem":"root","path":"/etc/vpn-agent","mode":448}]}}"#, &payload()).unwrap();
    }

    #[test]
    fn conflicts_inside_data_children_are_found() {
        let child = r#"{"ignition":{"version":"3.0.0"},"systemd":{"units":[{"name":"vpn-agent-firewall.service","mask":true}]}}"#;
        let url = format!(
            "data:;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(child)
        );
        let user =
            json!({"ignition":{"version":"3.2.0","config":{"merge":[{"source":url}]}}}).to_string();
        let e = merge(&user, &payload()).unwrap_err();
        assert!(
            e.to_string()
                .contains("$.ignition.config.merge[0].systemd.units[0]"),
            "{e}"
        );
        let pct = "data:,%7B%22ignition%22%3A%7B%22version%22%3A%222.2.0%22%7D%7D";
        let user = json!({"ignition":{"version":"2.2.0","config":{"append":[{"source":pct}]}}})
            .to_string();
        merge(&user, &payload()).unwrap();
    }

    #[test]
    fn replace_and_remote_children() {
        let user =
            r#"{"ignition":{"version":"2.3.0","config":{"replace":{"source":"https://x/y.ign"}}}}"#;
        assert!(
            merge(user, &payload())
                .unwrap_err()
                .to_string()
                .contains("replace")
        );
        let user = r#"{"ignition":{"version":"2.3.0","config":{"append":[{"source":"https://u:p@x/y.ign?token=1"}]}}}"#;
        let m = merge(user, &payload()).unwrap();
        assert_eq!(m.warnings.len(), 1);
        assert!(!m.warnings[0].contains("token") && !m.warnings[0].contains("u:p"));
    }

    #[test]
    fn wrong_shapes_are_input_errors() {
        for (user, want) in [
            ("[1]", "not an object"),
            ("{\"ignition\":{}}", "without $.ignition.version"),
            (
                "{\"ignition\":{\"version\":\"2.3.0\"},\"storage\":{\"files\":{}}}",
                "$.storage.files must be a list",
            ),
            (
                "{\"ignition\":{\"version\":\"2.3.0\"},\n\"storage\":",
                "line 2",
            ),
        ] {
            let e = merge(user, &payload()).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().contains(want), "{e}");
        }
    }

    #[test]
    fn a_remote_binary_is_a_verified_file_and_its_ca_is_trusted() {
        let mut p = payload();
        p.agent_binary = Some(
            RemoteBinary::new(
                "https://repo/vpn-agent",
                &"a".repeat(128),
                Some("PEM".into()),
            )
            .unwrap(),
        );
        for (user, filesystem) in [
            (
                r#"{"ignition":{"version":"2.2.0","security":{"tls":{"certificateAuthorities":[{"source":"data:,x"}]}}}}"#,
                true,
            ),
            (r#"{"ignition":{"version":"3.4.0"}}"#, false),
        ] {
            let out: Value = serde_json::from_str(&merge(user, &p).unwrap().text).unwrap();
            let bin = &out["storage"]["files"][0];
            assert_eq!(bin["path"], AGENT_BINARY_PATH);
            assert_eq!(bin["mode"], 0o755);
            assert_eq!(bin["contents"]["source"], "https://repo/vpn-agent");
            assert_eq!(
                bin["contents"]["verification"]["hash"],
                format!("sha512-{}", "a".repeat(128))
            );
            assert_eq!(bin.get("filesystem").is_some(), filesystem);
            let cas = out["ignition"]["security"]["tls"]["certificateAuthorities"]
                .as_array()
                .unwrap();
            assert_eq!(cas.last().unwrap()["source"], to_data_url(b"PEM"));
        }
        let e = merge(r#"{"ignition":{"version":"2.1.0"}}"#, &p).unwrap_err();
        assert!(e.to_string().contains("spec 2.2.0 or later"), "{e}");
        p.agent_binary.as_mut().unwrap().ca_pem = None;
        let out = merge(r#"{"ignition":{"version":"2.0.0"}}"#, &p)
            .unwrap()
            .text;
        assert!(!out.contains("security") && out.contains("sha512-"));
        // The user cannot put a binary of their own in its place.
        let user = r#"{"ignition":{"version":"2.3.0"},"storage":{"files":[{"path":"/usr/local/bin/vpn-agent"}]}}"#;
        assert!(matches!(merge(user, &p).unwrap_err(), Error::Conflict(_)));
        assert!(merge(user, &payload()).is_ok());
    }

    #[test]
    fn normalizes_paths() {
        assert_eq!(normalize("/etc//a/./b/../c/"), "/etc/a/c");
    }
}
