//! Merging into `#cloud-config` userdata by inserting lines, never by re-serialising: every
//! key, comment and scalar the user wrote stays byte-identical (PyYAML reads YAML 1.1, so a
//! YAML 1.2 round trip could change what plain scalars mean). Our entries go into the
//! user's existing `write_files` and `runcmd` lists; the result is parsed again and compared
//! with the input before it is accepted.

use crate::error::{Error, Result};
use crate::ignition::{Taken, check_conflicts, normalize};
use crate::payload::{
    AGENT_BINARY_PATH, AGENT_SETTINGS_PATH, CONFIG_DIR, FIREWALL_UNIT, NFT_TABLE, Payload,
    Protocol, RemoteBinary, UNIT_DIR, UNITS,
};
use base64::Engine;
use std::collections::HashMap;
use yaml_rust2::parser::{Event, EventReceiver, Parser};
use yaml_rust2::{Yaml, YamlLoader};

/// The most nodes a cloud-config may stand for with its aliases followed. YAML aliases copy
/// what they name, so ten levels of ten aliases ("billion laughs") are 10^10 nodes from a
/// few hundred bytes of text; real cloud-configs have hundreds.
pub const MAX_YAML_NODES: u64 = 100_000;

/// Counts what a YAML text expands to, aliases followed, without expanding anything.
#[derive(Default)]
struct Expansion {
    nodes: u64,
    /// Collections still open: their anchor id (0: none) and the count when they opened.
    open: Vec<(usize, u64)>,
    /// Per anchor id, the nodes an alias to it stands for.
    sizes: HashMap<usize, u64>,
}

impl EventReceiver for Expansion {
    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Scalar(_, _, anchor, _) => {
                self.nodes = self.nodes.saturating_add(1);
                if anchor > 0 {
                    self.sizes.insert(anchor, 1);
                }
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                self.nodes = self.nodes.saturating_add(1);
                self.open.push((anchor, self.nodes));
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((anchor, start)) = self.open.pop()
                    && anchor > 0
                {
                    self.sizes.insert(anchor, self.nodes - start + 1);
                }
            }
            Event::Alias(id) => {
                let size = self.sizes.get(&id).copied().unwrap_or(1);
                self.nodes = self.nodes.saturating_add(size);
            }
            _ => {}
        }
    }
}

/// The header both metal-stack detectors look for.
pub const HEADER: &str = "#cloud-config";

/// Commands for `runcmd`. metal-stack runs `runcmd` on every boot, so they must be
/// idempotent; `--no-block` because they run inside a boot-time oneshot.
pub fn commands(payload: &Payload) -> Vec<Vec<String>> {
    let mut enable: Vec<String> = ["systemctl", "enable", "--now", "--no-block"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    enable.extend(payload.unit_names());
    vec![vec!["systemctl".into(), "daemon-reload".into()], enable]
}

/// Commands for `bootcmd`, which cloud-init runs early on every boot, before sshd starts and
/// (on the first boot) before `write_files` and `runcmd`: write our settings if they are
/// not there yet, then load our table with the early unit's own command. Without them the
/// public port would be open on a first boot until `runcmd` enables our units.
pub fn boot_commands(payload: &Payload) -> Vec<Vec<String>> {
    let settings = payload
        .files
        .iter()
        .find(|f| f.path == AGENT_SETTINGS_PATH)
        .expect("the payload has the agent's settings");
    let b64 = base64::engine::general_purpose::STANDARD.encode(&settings.contents);
    let write = vec![
        "sh".into(),
        "-c".into(),
        format!(
            "[ -e {p} ] || {{ mkdir -p {d} && echo \"$1\" | base64 -d > {p}; }}",
            p = AGENT_SETTINGS_PATH,
            d = CONFIG_DIR
        ),
        "sh".into(),
        b64,
    ];
    let apply = UNITS
        .iter()
        .find(|(name, _)| *name == FIREWALL_UNIT)
        .and_then(|(_, unit)| unit.lines().find_map(|l| l.strip_prefix("ExecStart=")))
        .expect("the firewall unit has an ExecStart")
        .split_whitespace()
        .map(String::from)
        .collect();
    let mut out = vec![];
    if let Some(binary) = &payload.agent_binary {
        out.push(fetch_command(binary, &lockdown_ruleset(payload)));
    }
    out.extend([write, apply]);
    out
}

/// Fetches the agent's binary unless the one in place has the pinned sha512, and installs
/// it only if the download has it too: what Ignition's `verification.hash` does. A failed
/// fetch leaves no binary (the image's would be another version than metal-api pinned) and
/// loads [`lockdown_ruleset`] instead, since the early unit cannot run without the agent.
/// The URL, hash and CA are arguments, never spliced into the script.
const FETCH_SCRIPT: &str = r#"set -u
url=$1 sum=$2 ca_b64=$3 lockdown=$4
p=/usr/local/bin/vpn-agent
if [ -f "$p" ] && printf '%s  %s\n' "$sum" "$p" | sha512sum -c --status; then exit 0; fi
t="$p.download"
trap 'rm -f "$t" "$t.ca"' EXIT
fail() { echo "vpn-agent: $1; the agent is not installed, the public ports stay closed" >&2; printf '%s' "$lockdown" | nft -f -; rm -f "$p"; exit 1; }
mkdir -p /usr/local/bin
ca=""
if [ -n "$ca_b64" ]; then printf '%s' "$ca_b64" | base64 -d > "$t.ca" || fail "bad CA"; ca="--cacert $t.ca"; fi
curl -fsSL --proto =https,http --retry 10 --retry-connrefused --retry-delay 3 --max-time 900 $ca -o "$t" "$url" || fail "the download failed"
printf '%s  %s\n' "$sum" "$t" | sha512sum -c --status || fail "the download does not have the pinned sha512"
chmod 0755 "$t" && mv -f "$t" "$p"
"#;

fn fetch_command(binary: &RemoteBinary, lockdown: &str) -> Vec<String> {
    debug_assert!(FETCH_SCRIPT.contains(AGENT_BINARY_PATH));
    let ca = binary
        .ca_pem
        .as_ref()
        .map(|c| base64::engine::general_purpose::STANDARD.encode(c))
        .unwrap_or_default();
    [
        "sh",
        "-c",
        FETCH_SCRIPT,
        "sh",
        &binary.url,
        &binary.sha512,
        &ca,
        lockdown,
    ]
    .map(String::from)
    .to_vec()
}

/// An nft script for a boot without the agent: our table, dropping every port the agent
/// would keep off the public interfaces (no tunnel exists, so nothing is accepted on one).
/// The agent replaces the whole table when it first runs.
pub fn lockdown_ruleset(payload: &Payload) -> String {
    let s = &payload.agent;
    let mut rules = vec![];
    for proto in [Protocol::Tcp, Protocol::Udp] {
        let mut ports = s.closed_ports(proto);
        // No tunnel yet: SSH is for nobody.
        if proto == Protocol::Tcp && !ports.contains(&s.ssh_port) {
            ports.push(s.ssh_port);
        }
        if !ports.is_empty() {
            let list: Vec<String> = ports.iter().map(u16::to_string).collect();
            rules.push(format!(
                "{} dport {{ {} }} drop",
                proto.as_str(),
                list.join(", ")
            ));
        }
    }
    format!(
        "table inet {NFT_TABLE} {{\n\tchain input {{\n\t\ttype filter hook input priority 0; policy accept;\n\t\t{}\n\t}}\n}}\n",
        rules.join("\n\t\t")
    )
}

/// Adds `payload` to the cloud-config `text`.
pub fn merge(text: &str, payload: &Payload) -> Result<String> {
    let before = parse(text, "userdata")?;
    let root = match &before {
        Yaml::Hash(_) => before.clone(),
        Yaml::Null | Yaml::BadValue => Yaml::Hash(Default::default()),
        other => {
            return Err(Error::input(format!(
                "cloud-config userdata must be a mapping at the top level, found {}",
                kind(other)
            )));
        }
    };
    let files = list(&root, "write_files")?;
    let cmds = list(&root, "runcmd")?;
    let boot = list(&root, "bootcmd")?;
    let mut taken = vec![];
    for (i, f) in files.iter().enumerate() {
        if let Some(p) = f["path"].as_str() {
            taken.push(Taken {
                path: normalize(p),
                is_dir: false,
                at: format!("write_files[{i}]"),
            });
        }
    }
    check_conflicts(payload, &taken)?;

    let nl = if text.contains("\r\n") { "\r\n" } else { "\n" };
    let mut out = insert(text, "write_files", &file_items(payload), nl)?;
    out = insert(&out, "runcmd", &command_items(&commands(payload)), nl)?;
    let early = boot_commands(payload);
    out = insert(&out, "bootcmd", &command_items(&early), nl)?;

    let ours = payload.files.len() + payload.units.len();
    verify(
        &root,
        &out,
        &[
            ("write_files", files.len() + ours),
            ("runcmd", cmds.len() + 2),
            ("bootcmd", boot.len() + early.len()),
        ],
    )?;
    Ok(out)
}

fn parse(text: &str, what: &str) -> Result<Yaml> {
    // Counted on the event stream first: loading expands aliases as copies.
    let mut count = Expansion::default();
    if Parser::new_from_str(text).load(&mut count, true).is_ok() && count.nodes > MAX_YAML_NODES {
        return Err(Error::input(format!(
            "{what} stands for more than {MAX_YAML_NODES} YAML nodes once its aliases are \
             followed; refused (a cloud-config this size is an attack, not a config)"
        )));
    }
    let mut docs = YamlLoader::load_from_str(text)
        .map_err(|e| Error::input(format!("{what} is not valid cloud-config YAML: {e}")))?;
    if docs.len() > 1 {
        return Err(Error::input(format!(
            "{what} holds {} YAML documents; cloud-config is one",
            docs.len()
        )));
    }
    Ok(docs.pop().unwrap_or(Yaml::Null))
}

fn kind(v: &Yaml) -> &'static str {
    match v {
        Yaml::Hash(_) => "a mapping",
        Yaml::Array(_) => "a list",
        Yaml::Null => "null",
        _ => "a scalar",
    }
}

fn list(root: &Yaml, key: &str) -> Result<Vec<Yaml>> {
    match &root[key] {
        Yaml::BadValue | Yaml::Null => Ok(vec![]),
        Yaml::Array(a) => Ok(a.clone()),
        other => Err(Error::input(format!(
            "cloud-config userdata: {key} must be a list, found {}",
            kind(other)
        ))),
    }
}

/// A YAML scalar for `s` on one line: single-quoted, or double-quoted with escapes when it
/// spans lines (a single-quoted scalar would fold its line breaks into spaces).
fn quote(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return format!("'{}'", s.replace('\'', "''"));
    }
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Our `write_files` items, each as lines relative to the item's dash.
fn file_items(payload: &Payload) -> Vec<Vec<String>> {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let item = |path: &str, perm: u32, contents: &[u8]| {
        vec![
            format!("path: {}", quote(path)),
            "encoding: b64".into(),
            format!("content: {}", b64(contents)),
            format!("permissions: '{perm:04o}'"),
            "owner: 'root:root'".into(),
        ]
    };
    let mut items: Vec<Vec<String>> = payload
        .files
        .iter()
        .map(|f| item(&f.path, f.mode, &f.contents))
        .collect();
    for u in &payload.units {
        items.push(item(
            &format!("{UNIT_DIR}/{}", u.name),
            0o644,
            u.contents.as_bytes(),
        ));
    }
    items
}

fn command_items(commands: &[Vec<String>]) -> Vec<Vec<String>> {
    commands
        .iter()
        .map(|c| {
            vec![format!(
                "[{}]",
                c.iter().map(|a| quote(a)).collect::<Vec<_>>().join(", ")
            )]
        })
        .collect()
}

/// Whether `line` opens the top-level block key `key`, and what follows its colon.
fn key_rest<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(key)?.trim_start_matches([' ', '\t']);
    rest.strip_prefix(':')
}

/// Appends `items` to the top-level block list `key`, or adds the key at the end.
fn insert(text: &str, key: &str, items: &[Vec<String>], nl: &str) -> Result<String> {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let found: Vec<usize> = (0..lines.len())
        .filter(|&i| key_rest(lines[i], key).is_some())
        .collect();
    let render = |indent: &str| -> String {
        let mut s = String::new();
        for item in items {
            for (j, l) in item.iter().enumerate() {
                let lead = if j == 0 { "- " } else { "  " };
                s.push_str(&format!("{indent}{lead}{l}{nl}"));
            }
        }
        s
    };
    match found.as_slice() {
        [] => {
            let mut out = text.to_string();
            if !out.is_empty() && !out.ends_with('\n') {
                out.push_str(nl);
            }
            out.push_str(&format!("{key}:{nl}"));
            out.push_str(&render("  "));
            Ok(out)
        }
        [k] => {
            let rest = key_rest(lines[*k], key).unwrap().trim();
            if !(rest.is_empty() || rest.starts_with('#')) {
                return Err(Error::input(format!(
                    "cloud-config userdata: line {}: `{key}` is written in flow style; \
                     write it as a block list (one `- ` item per line) so entries can be added",
                    k + 1
                )));
            }
            // The block runs while lines are indented, list items at column 0, blank or
            // comments; it ends before the next top-level key.
            let mut last = *k;
            let mut indent: Option<String> = None;
            for (i, l) in lines.iter().enumerate().skip(k + 1) {
                let t = l.trim_end_matches(['\r', '\n']);
                let content = t.trim_start();
                if content.is_empty() || content.starts_with('#') {
                    continue;
                }
                let at_col0 = t.len() == content.len();
                if at_col0 && !content.starts_with('-') {
                    break;
                }
                if indent.is_none() && content.starts_with('-') {
                    indent = Some(t[..t.len() - content.len()].to_string());
                }
                last = i;
            }
            let indent = indent.unwrap_or_else(|| "  ".into());
            let mut out: String = lines[..=last].concat();
            if !out.ends_with('\n') {
                out.push_str(nl);
            }
            out.push_str(&render(&indent));
            out.push_str(&lines[last + 1..].concat());
            Ok(out)
        }
        many => Err(Error::input(format!(
            "cloud-config userdata has `{key}` {} times (lines {}); PyYAML would silently keep only the last",
            many.len(),
            many.iter()
                .map(|i| (i + 1).to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The merged text must hold exactly the user's document plus our list items: `lists` says
/// how long each of our lists must be now.
fn verify(before: &Yaml, out: &str, lists: &[(&str, usize)]) -> Result<()> {
    let after = parse(out, "the merged cloud-config")?;
    let (Yaml::Hash(b), Yaml::Hash(a)) = (before, &after) else {
        return Err(Error::input(
            "the merged cloud-config is not a mapping; the userdata's layout is not one we can extend safely",
        ));
    };
    let mismatch = |what: &str| {
        Error::input(format!(
            "merging into this cloud-config would change {what}; its layout is not one we can extend safely \
             (write `write_files`, `runcmd` and `bootcmd` as top-level block lists)"
        ))
    };
    for (k, v) in b {
        let key = k.as_str().unwrap_or_default();
        if lists.iter().any(|(l, _)| *l == key) {
            let prefix = v.as_vec().cloned().unwrap_or_default();
            let now = a
                .get(k)
                .and_then(|x| x.as_vec())
                .ok_or_else(|| mismatch(key))?;
            if now.len() < prefix.len() || now[..prefix.len()] != prefix[..] {
                return Err(mismatch(key));
            }
        } else if a.get(k) != Some(v) {
            return Err(mismatch(&format!("`{key}`")));
        }
    }
    let len = |k: &str| after[k].as_vec().map_or(0, Vec::len);
    if lists.iter().any(|(k, n)| len(k) != *n) || a.len() < b.len() {
        return Err(mismatch("the lists"));
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
    fn a_remote_binary_is_fetched_first_and_a_failure_locks_down() {
        let mut p = payload();
        assert_eq!(boot_commands(&p).len(), 2);
        p.agent.services = vec!["bmc:tcp/3333".parse().unwrap(), "x:udp/53".parse().unwrap()];
        p.agent_binary =
            Some(RemoteBinary::new("https://r/a?x='$(reboot)'", &"b".repeat(128), None).unwrap());
        let cmds = boot_commands(&p);
        assert_eq!(cmds.len(), 3);
        assert_eq!(cmds[0][..3], ["sh", "-c", FETCH_SCRIPT]);
        // The URL is an argument, not script text.
        assert_eq!(cmds[0][4], "https://r/a?x='$(reboot)'");
        assert_eq!(cmds[0][5], "b".repeat(128));
        assert_eq!(cmds[0][6], "");
        let lockdown = &cmds[0][7];
        assert!(lockdown.starts_with("table inet vpn_agent {"), "{lockdown}");
        assert!(
            lockdown.contains("tcp dport { 22, 3333 } drop"),
            "{lockdown}"
        );
        assert!(lockdown.contains("udp dport { 53 } drop"), "{lockdown}");
        let merged = merge("#cloud-config\n", &p).unwrap();
        let boot = &merged[merged.find("\nbootcmd:").unwrap()..];
        assert!(
            boot.find("sha512sum").unwrap() < boot.find("'apply'").unwrap(),
            "{boot}"
        );
    }

    #[test]
    fn aliases_that_expand_past_the_limit_are_refused_before_loading() {
        let mut laughs = String::from("#cloud-config\nl0: &l0 [a,a,a,a,a,a,a,a,a,a]\n");
        for i in 1..8 {
            let refs = vec![format!("*l{}", i - 1); 10].join(",");
            laughs.push_str(&format!("l{i}: &l{i} [{refs}]\n"));
        }
        let e = merge(&laughs, &payload()).unwrap_err().to_string();
        assert!(e.contains("more than 100000 YAML nodes"), "{e}");
        // A few aliases, as real configs use them, are fine.
        let ok = "#cloud-config\nbase: &b {a: 1}\nx: *b\ny: *b\n";
        assert!(merge(ok, &payload()).is_ok());
    }

    const USER: &str = "#cloud-config\n# keep me\nhostname: fw-1 # trailing\nwrite_files:\n  - path: /etc/motd\n    content: hi\n    permissions: 0644\n\n# between\nruncmd:\n- echo one\npackages: [yes, on, 1:20]\n";

    #[test]
    fn inserts_into_existing_lists_and_keeps_everything_else() {
        let out = merge(USER, &payload()).unwrap();
        assert!(out.starts_with("#cloud-config\n# keep me\nhostname: fw-1 # trailing\nwrite_files:\n  - path: /etc/motd\n    content: hi\n    permissions: 0644\n  - path: '/etc/vpn-agent/tailscaled.conf'"), "{out}");
        assert!(
            out.contains("\n\n# between\nruncmd:\n- echo one\n- ['systemctl', 'daemon-reload']\n"),
            "{out}"
        );
        // bootcmd did not exist: it is added at the end, after the user's last key.
        assert!(
            out.contains("packages: [yes, on, 1:20]\nbootcmd:\n  - ['sh', '-c', '[ -e /etc/vpn-agent/agent.json ] ||"),
            "{out}"
        );
        assert!(
            out.ends_with("  - ['/usr/local/bin/vpn-agent', 'firewall', 'apply', '--settings', '/etc/vpn-agent/agent.json']\n"),
            "{out}"
        );
        assert_eq!(out.matches("write_files:").count(), 1);
        assert_eq!(out.matches("runcmd:").count(), 1);
    }

    #[test]
    fn boot_commands_write_the_settings_then_load_the_table() {
        let p = payload();
        let [write, apply] = &boot_commands(&p)[..] else {
            panic!()
        };
        let settings = p
            .files
            .iter()
            .find(|f| f.path == AGENT_SETTINGS_PATH)
            .unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(&write[4])
            .unwrap();
        assert_eq!(decoded, settings.contents);
        assert_eq!(apply[0], "/usr/local/bin/vpn-agent");
        assert_eq!(apply[1..3], ["firewall", "apply"]);
        // An existing bootcmd keeps its items first.
        let user = "#cloud-config\nbootcmd:\n  - echo early\n";
        let out = merge(user, &p).unwrap();
        assert!(
            out.starts_with("#cloud-config\nbootcmd:\n  - echo early\n  - ['sh'"),
            "{out}"
        );
    }

    #[test]
    fn adds_missing_lists_at_the_end() {
        let out = merge("#cloud-config\nhostname: x", &payload()).unwrap();
        assert!(out.starts_with("#cloud-config\nhostname: x\nwrite_files:\n  - path: "));
        let out = merge("#cloud-config\n", &payload()).unwrap();
        let y = parse(&out, "t").unwrap();
        assert_eq!(y["runcmd"].as_vec().unwrap().len(), 2);
    }

    #[test]
    fn refuses_what_it_cannot_extend_safely() {
        for (text, want) in [
            ("#cloud-config\nwrite_files: []\n", "flow style"),
            ("#cloud-config\nruncmd: echo hi\n", "runcmd must be a list"),
            (
                "#cloud-config\nruncmd:\n- a\nruncmd:\n- b\n",
                "duplicated key",
            ),
            ("#cloud-config\n- a\n", "mapping at the top level"),
            ("#cloud-config\na: [\n", "not valid cloud-config YAML"),
            ("#cloud-config\na: 1\n---\nb: 2\n", "2 YAML documents"),
            (
                "#cloud-config\nwrite_files:\n- path: /etc/vpn-agent/../vpn-agent/authkey\n",
                "write_files[0]",
            ),
        ] {
            let e = merge(text, &payload()).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{text}");
            assert!(e.to_string().contains(want), "{text}: {e}");
        }
    }
}
