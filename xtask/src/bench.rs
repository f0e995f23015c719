//! `cargo xtask bench`: runs the benchmarks and writes their tables into the README between
//! markers, so the numbers there are always ones this command measured.

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::process::Command;

const START: &str = "<!-- bench:userdata-gen:start -->";
const END: &str = "<!-- bench:userdata-gen:end -->";

pub fn run() -> Result<()> {
    let root = vdc::tools::workspace_root();
    println!("==> bench: userdata-gen generation, no network (release build)");
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["bench", "-q", "-p", "userdata-gen", "--bench", "generate"])
        .current_dir(&root)
        .output()
        .context("cannot run cargo bench")?;
    if !out.status.success() {
        bail!(
            "cargo bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut table = String::from("| case | input | runs | median | p95 |\n|---|---|---|---|---|\n");
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
    {
        let v: Value = serde_json::from_str(line)?;
        table.push_str(&format!(
            "| {} | {} bytes | {} | {:.2} ms | {:.2} ms |\n",
            v["case"].as_str().unwrap_or_default(),
            v["input_bytes"],
            v["runs"],
            v["median_ms"].as_f64().unwrap_or_default(),
            v["p95_ms"].as_f64().unwrap_or_default(),
        ));
    }
    print!("{table}");
    let readme = root.join("README.md");
    let text = std::fs::read_to_string(&readme)?;
    let (Some(a), Some(b)) = (text.find(START), text.find(END)) else {
        bail!("README.md has no {START} ... {END} markers");
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let new = format!(
        "{START}\nMeasured by `cargo xtask bench` on {} cores of {cpu}:\n\n{table}{END}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    std::fs::write(
        &readme,
        format!("{}{new}{}", &text[..a], &text[b + END.len()..]),
    )?;
    println!("==> bench: table written to README.md");
    Ok(())
}
