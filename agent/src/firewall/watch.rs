//! Noticing at once when anyone changes the nftables ruleset: the kernel announces every
//! change (an `nft flush ruleset` included) on the netlink group `NFNLGRP_NFTABLES`, so the
//! agent can check its table right then instead of at its next poll.

use crate::error::{Error, Result};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use tokio::io::unix::AsyncFd;

/// `NETLINK_NETFILTER` and its nftables multicast group (linux/netlink.h, nfnetlink.h).
const NETLINK_NETFILTER: libc::c_int = 12;
const NFNLGRP_NFTABLES: libc::c_int = 7;

/// A subscription to nftables' change announcements.
pub struct Watch(AsyncFd<OwnedFd>);

fn os(what: &str) -> Error {
    Error::io(what, std::io::Error::last_os_error())
}

impl Watch {
    /// Subscribes (needs CAP_NET_ADMIN, which the agent has for its table anyway).
    pub fn open() -> Result<Watch> {
        // SAFETY: plain system calls on a descriptor we own from here on.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(os("netlink socket for nftables events"));
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a zeroed sockaddr_nl is valid; we set the family.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        let len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: `sa` lives across the call and `len` is its size.
        if unsafe { libc::bind(fd.as_raw_fd(), (&raw const sa).cast(), len) } < 0 {
            return Err(os("bind the nftables event socket"));
        }
        let group = NFNLGRP_NFTABLES;
        // SAFETY: `group` is an int, as NETLINK_ADD_MEMBERSHIP expects.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_NETLINK,
                libc::NETLINK_ADD_MEMBERSHIP,
                (&raw const group).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(os("subscribe to nftables events"));
        }
        // SAFETY: `OwnedFd` keeps the descriptor open and the same for as long as the
        // `AsyncFd` owns it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| Error::io("nftables event socket", e.into()))?;
        Ok(Watch(fd))
    }

    /// Waits for the next change; everything announced meanwhile is read, so a burst (one
    /// transaction announces each object it touches) counts as one change.
    pub async fn changed(&mut self) -> Result<()> {
        let mut buf = [0u8; 16384];
        loop {
            let mut ready = self
                .0
                .readable()
                .await
                .map_err(|e| Error::io("nftables event socket", e))?;
            let mut got = false;
            loop {
                // SAFETY: `buf` is writable for its length.
                let n = unsafe {
                    libc::recv(
                        self.0.get_ref().as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                    )
                };
                if n >= 0 {
                    got = true;
                    continue;
                }
                match std::io::Error::last_os_error().raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    // The socket overflowed: announcements were lost, which means changes.
                    Some(libc::ENOBUFS) => got = true,
                    Some(libc::EINTR) => {}
                    _ => return Err(os("read nftables events")),
                }
            }
            ready.clear_ready();
            if got {
                return Ok(());
            }
        }
    }
}
