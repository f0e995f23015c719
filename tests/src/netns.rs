//! Network namespaces: the lab's hosts and its switch.

use crate::cmd;
use anyhow::{Context, Result};
use std::fs::File;
use std::process::Command;
use std::time::{Duration, Instant};

/// A named network namespace (`ip netns`), the lab's notion of a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace with its loopback up and nothing else: no route anywhere.
    pub fn create(name: &str) -> Result<Self> {
        cmd::run_quiet(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Self {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A handle to a namespace that already exists (for `lab status`, `lab exec`).
    pub fn existing(name: &str) -> Self {
        Self {
            name: name.to_string(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NS ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        cmd::run_quiet(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs `program` inside this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// A command that runs `program` inside this namespace as the firewall would after
    /// Ignition wrote `root`: in a private mount namespace where `root/etc` is `/etc`.
    pub fn command_in_root(
        &self,
        root: &std::path::Path,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Command {
        let mut c = self.command("unshare");
        c.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind "$0/etc" /etc && exec "$@""#)
            .arg(root)
            .arg(program);
        c
    }

    /// Runs `f` on a new thread that has entered this namespace. Sockets it opens stay in
    /// the namespace, so the test process can talk to a lab host without any route from
    /// the host's own namespace.
    pub fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let path = format!("/var/run/netns/{}", self.name);
        let file = File::open(&path).with_context(|| format!("cannot open namespace {path}"))?;
        std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("setns into the lab namespace")?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread inside namespace {} panicked", self.name))?
    }

    /// The processes that live in this namespace.
    pub fn pids(&self) -> Vec<i32> {
        cmd::quiet_output(Command::new("ip").args(["netns", "pids", &self.name]))
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Stops every process in the namespace (TERM, then KILL after a grace period) and
    /// deletes it. Safe to call on a namespace that is already gone.
    pub fn destroy(&self) {
        let grace = Duration::from_secs(3);
        kill_all(&self.pids(), nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while !self.pids().is_empty() && start.elapsed() < grace {
            std::thread::sleep(Duration::from_millis(50));
        }
        kill_all(&self.pids(), nix::sys::signal::Signal::SIGKILL);
        let _ = cmd::quiet_output(Command::new("ip").args(["netns", "delete", &self.name]));
    }
}

fn kill_all(pids: &[i32], sig: nix::sys::signal::Signal) {
    for pid in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), sig);
    }
}

/// Names of all network namespaces on the machine.
pub fn list() -> Vec<String> {
    cmd::quiet_output(Command::new("ip").args(["netns", "list"]))
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}
