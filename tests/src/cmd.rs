//! Running programs with errors that say what ran, how it ended and what it printed.

use anyhow::{Context, Result, bail};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};

static ECHO: AtomicBool = AtomicBool::new(false);

/// When on, every command run through [`run`] is printed with its output, so a reader
/// can follow what the demo does.
pub fn set_echo(on: bool) {
    ECHO.store(on, Ordering::Relaxed);
}

pub fn echo_enabled() -> bool {
    ECHO.load(Ordering::Relaxed)
}

/// A short, shell-like rendering of a command for messages: the lab's cached tools are
/// shown by name, not by their long cache path.
pub fn render(cmd: &Command) -> String {
    let tools = crate::tools::tools_dir();
    let short = |a: &std::ffi::OsStr| {
        let p = std::path::Path::new(a);
        match (p.starts_with(&tools), p.file_name()) {
            (true, Some(name)) => name.to_string_lossy().into_owned(),
            _ => a.to_string_lossy().into_owned(),
        }
    };
    let mut s = short(cmd.get_program());
    for a in cmd.get_args() {
        let a = short(a);
        if a.is_empty() || a.contains(char::is_whitespace) {
            s.push_str(&format!(" '{a}'"));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

/// Runs `cmd` to completion and returns its stdout; fails with the command line, exit
/// status and stderr when it does not exit 0.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    checked(cmd, out)
}

fn checked(cmd: &Command, out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            render(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` to completion and returns whatever it did, success or not.
pub fn output(cmd: &mut Command) -> Result<Output> {
    let out = quiet_output(cmd)?;
    if echo_enabled() {
        println!("  $ {}", render(cmd));
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = text.lines().collect();
        for line in lines.iter().take(ECHO_LINES) {
            println!("    {line}");
        }
        if lines.len() > ECHO_LINES {
            println!("    ... ({} more lines)", lines.len() - ECHO_LINES);
        }
    }
    Ok(out)
}

/// At most this many lines of a command's output are echoed.
const ECHO_LINES: usize = 12;

/// Like [`output`], never echoed: for the lab's own plumbing and for polling.
pub fn quiet_output(cmd: &mut Command) -> Result<Output> {
    cmd.output()
        .with_context(|| format!("cannot start `{}`", render(cmd)))
}

/// Like [`run`], never echoed.
pub fn run_quiet(cmd: &mut Command) -> Result<String> {
    let out = quiet_output(cmd)?;
    checked(cmd, out)
}
