//! The user's userdata as metal-stack sees it: how it is encoded, what format it is, and
//! [`generate`], the pure core that turns it into the firewall's userdata.

use crate::cloud_config;
use crate::error::{Error, Result};
use crate::ignition::{self, DEFAULT_SPEC, Spec};
use crate::payload::Payload;
use base64::Engine;
use serde::Serialize;

/// How the userdata arrived; the output goes back the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Raw,
    /// Standard base64, which metal-hammer decodes before writing the userdata.
    Base64,
}

/// A userdata format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Ignition(Spec),
    CloudConfig,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Format::Ignition(s) => write!(f, "ignition-{s}"),
            Format::CloudConfig => f.write_str("cloud-config"),
        }
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Format> {
        if s == "cloud-config" {
            return Ok(Format::CloudConfig);
        }
        let v = s.strip_prefix("ignition-").ok_or_else(|| {
            Error::input(format!(
                "--format {s:?}: expected cloud-config or ignition-MAJOR.MINOR.0 (e.g. ignition-{DEFAULT_SPEC})"
            ))
        })?;
        Ok(Format::Ignition(Spec::parse(v).map_err(|e| {
            Error::input(format!("--format {s:?}: {e}"))
        })?))
    }
}

/// The Ignition that will run the userdata on the target image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// metal-stack's images: flatcar Ignition v0.36, spec 2.0-2.4 only.
    MetalStackV036,
    /// An image with a current coreos Ignition: spec 3.x only.
    Coreos,
}

impl Target {
    /// Why `format` cannot run on this target, if it cannot.
    pub fn cannot_run(self, format: Format) -> Option<String> {
        match (self, format) {
            (Target::MetalStackV036, Format::Ignition(s)) if s.major != 2 => Some(format!(
                "Ignition spec {s} cannot run on metal-stack's images: their flatcar Ignition v0.36 \
                 reads spec 2.x only and would apply nothing of this userdata, the mesh agent included"
            )),
            (Target::Coreos, Format::Ignition(s)) if s.major != 3 => Some(format!(
                "Ignition spec {s} cannot run on an image with coreos Ignition, which reads spec 3.x only"
            )),
            _ => None,
        }
    }
}

/// What [`generate`] produced.
#[derive(Debug, Clone)]
pub struct Generated {
    pub bytes: Vec<u8>,
    pub format: Format,
    pub encoding: Encoding,
    pub warnings: Vec<String>,
}

/// Decodes userdata the way metal-hammer does: standard base64 if it decodes (ignoring line
/// breaks) to UTF-8, the text itself otherwise.
pub fn decode(input: &[u8]) -> Result<(String, Encoding)> {
    let text = std::str::from_utf8(input).map_err(|e| {
        Error::input(format!(
            "userdata is neither text nor base64: invalid UTF-8 at byte {}",
            e.valid_up_to()
        ))
    })?;
    // Only the base64 alphabet and line breaks can be base64: JSON and YAML never are, and
    // this check spares them a copy and a failed decode.
    let b64_alphabet =
        |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'\r' | b'\n');
    if !input.is_empty() && input.iter().all(b64_alphabet) {
        let compact: Vec<u8> = input
            .iter()
            .copied()
            .filter(|b| !matches!(b, b'\r' | b'\n'))
            .collect();
        if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(&compact)
            && let Ok(decoded) = String::from_utf8(bytes)
        {
            return Ok((decoded, Encoding::Base64));
        }
    }
    Ok((text.to_string(), Encoding::Raw))
}

fn encode(text: String, encoding: Encoding) -> Vec<u8> {
    match encoding {
        Encoding::Raw => text.into_bytes(),
        Encoding::Base64 => base64::engine::general_purpose::STANDARD
            .encode(text)
            .into_bytes(),
    }
}

/// What kind of userdata a text is, before its content is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ignition,
    CloudConfig,
}

/// Classifies decoded userdata like the runtime does; `None` is empty userdata.
pub fn classify(text: &str) -> Result<Option<Kind>> {
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        return Ok(None);
    }
    // os-installer: `#cloud-config` anywhere in the first three lines.
    if text
        .lines()
        .take(3)
        .any(|l| l.contains(cloud_config::HEADER))
    {
        return Ok(Some(Kind::CloudConfig));
    }
    let unsupported = |what: &str| {
        Err(Error::input(format!(
            "userdata is {what}: nothing on metal-stack's images executes that (only Ignition JSON \
             and #cloud-config are applied); convert it to one of those"
        )))
    };
    let head = trimmed
        .get(..trimmed.len().min(64))
        .unwrap_or(trimmed)
        .to_ascii_lowercase();
    if trimmed.starts_with("#!") {
        return unsupported("a script (#!)");
    }
    if head.starts_with("content-type:") || head.starts_with("mime-version:") {
        return unsupported("a MIME multipart document");
    }
    if head.starts_with("#include")
        || head.starts_with("#cloud-boothook")
        || head.starts_with("## template")
    {
        return unsupported("a cloud-init include, boothook or template");
    }
    if trimmed.starts_with('{') {
        return Ok(Some(Kind::Ignition));
    }
    Err(Error::input(
        "userdata is in no format we recognise: expected Ignition JSON (an object with \
         ignition.version), a #cloud-config document, or nothing",
    ))
}

/// Merges `payload` into the user's userdata `input`; `fresh` is the format for empty input.
/// Pure: no IO, no clock.
pub fn generate(
    input: &[u8],
    payload: &Payload,
    fresh: Format,
    target: Target,
) -> Result<Generated> {
    let (text, encoding) = decode(input)?;
    let (text, kind) = match classify(&text)? {
        Some(k) => (text, k),
        None => match fresh {
            Format::Ignition(spec) => (ignition::empty(spec), Kind::Ignition),
            Format::CloudConfig => (format!("{}\n", cloud_config::HEADER), Kind::CloudConfig),
        },
    };
    let mut warnings = vec![];
    let (merged, format) = match kind {
        Kind::Ignition => {
            let m = ignition::merge(&text, payload)?;
            warnings.extend(m.warnings);
            (m.text, Format::Ignition(m.spec))
        }
        Kind::CloudConfig => (cloud_config::merge(&text, payload)?, Format::CloudConfig),
    };
    warnings.extend(target.cannot_run(format));
    Ok(Generated {
        bytes: encode(merged, encoding),
        format,
        encoding,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_follows_metal_hammer() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("#cloud-config\n");
        assert_eq!(
            decode(b64.as_bytes()).unwrap(),
            ("#cloud-config\n".into(), Encoding::Base64)
        );
        let wrapped = format!("{}\n{}\n", &b64[..8], &b64[8..]);
        assert_eq!(decode(wrapped.as_bytes()).unwrap().1, Encoding::Base64);
        assert_eq!(decode(b"{\"a\":1}").unwrap().1, Encoding::Raw);
        assert!(decode(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn classification() {
        assert_eq!(classify("  \n").unwrap(), None);
        assert_eq!(
            classify("#cloud-config\na: 1").unwrap(),
            Some(Kind::CloudConfig)
        );
        assert_eq!(
            classify(r#"{"ignition":{}}"#).unwrap(),
            Some(Kind::Ignition)
        );
        for (text, want) in [
            ("#!/bin/sh\necho", "script"),
            ("Content-Type: multipart/mixed; boundary=x\n", "MIME"),
            ("hello", "no format we recognise"),
        ] {
            let e = classify(text).unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
            assert_eq!(e.exit_code(), 2);
        }
    }

    #[test]
    fn formats_parse_and_print() {
        for f in ["ignition-2.3.0", "ignition-3.6.0", "cloud-config"] {
            assert_eq!(f.parse::<Format>().unwrap().to_string(), f);
        }
        assert!("ignition-3.7.0".parse::<Format>().is_err());
        assert!("yaml".parse::<Format>().is_err());
    }

    #[test]
    fn targets_warn_about_versions_they_cannot_run() {
        let v3 = Format::Ignition(Spec { major: 3, minor: 0 });
        assert!(Target::MetalStackV036.cannot_run(v3).is_some());
        assert!(
            Target::MetalStackV036
                .cannot_run(Format::Ignition(DEFAULT_SPEC))
                .is_none()
        );
        assert!(
            Target::Coreos
                .cannot_run(Format::Ignition(DEFAULT_SPEC))
                .is_some()
        );
        assert!(
            Target::MetalStackV036
                .cannot_run(Format::CloudConfig)
                .is_none()
        );
    }
}
