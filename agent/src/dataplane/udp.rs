//! The UDP sockets' batching, as tailscaled does it on Linux: `recvmmsg` with UDP GRO (the
//! kernel hands over a run of same-size datagrams from one sender as one buffer) and
//! `sendmmsg` with UDP GSO (a run of datagrams to one destination as one message, cut by
//! the kernel as late as possible). Where the kernel lacks GSO it falls back to plain
//! `sendmmsg`. The unsafe code is confined to filling the kernel's message headers.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::UdpSocket;
use tracing::{debug, info};

/// Messages per `recvmmsg`, each with room for a GRO run of up to 64 KiB.
const BATCH: usize = 32;
const MESSAGE: usize = 65536;
/// Messages per `sendmmsg`, and the limits of one GSO message.
const SEND_BATCH: usize = 64;
const GSO_MAX_SEGMENTS: usize = 64;
const GSO_MAX_BYTES: usize = 65000;
const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// Room for one cmsg carrying an int (GRO) or a u16 (GSO), 8-byte aligned.
const CONTROL: usize = 32;

/// Whether the kernel takes UDP GSO; cleared on the first refusal.
static GSO: AtomicBool = AtomicBool::new(true);

/// The UDP sockets for WireGuard, disco and STUN on `port`: IPv4, and IPv6 (v6-only, so
/// both can have the port) where the host has it. Both ask for UDP GRO.
pub fn bind(port: u16) -> crate::Result<(UdpSocket, Option<UdpSocket>)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let open = |v6: bool| -> std::io::Result<UdpSocket> {
        let (domain, addr): (Domain, SocketAddr) = if v6 {
            (Domain::IPV6, (std::net::Ipv6Addr::UNSPECIFIED, port).into())
        } else {
            (Domain::IPV4, (std::net::Ipv4Addr::UNSPECIFIED, port).into())
        };
        let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
        if v6 {
            s.set_only_v6(true)?;
        }
        s.set_nonblocking(true)?;
        crate::uplink::bind(&s)?;
        s.bind(&addr.into())?;
        enable_gro(&s);
        grow_buffers(&s);
        UdpSocket::from_std(s.into())
    };
    let v4 = open(false).map_err(|e| crate::Error::io(format!("UDP port {port}"), e))?;
    let v6 = match open(true) {
        Ok(s) => Some(s),
        Err(e) => {
            info!(error = %e, "no IPv6 UDP socket; IPv4 only");
            None
        }
    };
    Ok((v4, v6))
}

/// tailscaled's socket buffers: 7 MiB each way, so bursts from a fast peer are not dropped
/// before we read them (drops cost TCP inside the tunnel its window). The FORCE options
/// pass the sysctl limits with CAP_NET_ADMIN; without it the limits apply.
const SOCKET_BUFFER: libc::c_int = 7 << 20;

fn grow_buffers(s: &impl AsRawFd) {
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if setsockopt_int(s, libc::SOL_SOCKET, force, SOCKET_BUFFER).is_err() {
            let _ = setsockopt_int(s, libc::SOL_SOCKET, plain, SOCKET_BUFFER);
        }
    }
}

fn setsockopt_int(
    s: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: setsockopt reads an int from a valid pointer for the given length.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn enable_gro(s: &impl AsRawFd) {
    if let Err(e) = setsockopt_int(s, SOL_UDP, UDP_GRO, 1) {
        debug!(error = %e, "UDP GRO not available");
    }
}

/// Buffers and headers for one `recvmmsg` call.
pub struct RecvBatch {
    data: Vec<u8>,
    lens: [usize; BATCH],
    /// The GRO segment size of each message (0: one datagram).
    segs: [usize; BATCH],
    names: [libc::sockaddr_storage; BATCH],
    name_lens: [libc::socklen_t; BATCH],
    control: [[u64; CONTROL / 8]; BATCH],
}

impl RecvBatch {
    pub fn new() -> Box<RecvBatch> {
        Box::new(RecvBatch {
            data: vec![0u8; BATCH * MESSAGE],
            lens: [0; BATCH],
            segs: [0; BATCH],
            // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
            names: unsafe { std::mem::zeroed() },
            name_lens: [0; BATCH],
            control: [[0; CONTROL / 8]; BATCH],
        })
    }

    /// One non-blocking `recvmmsg`; the number of messages, or WouldBlock.
    pub fn recv(&mut self, udp: &UdpSocket) -> std::io::Result<usize> {
        let mut iov: [libc::iovec; BATCH] = std::array::from_fn(|i| libc::iovec {
            iov_base: self.data[i * MESSAGE..].as_mut_ptr().cast(),
            iov_len: MESSAGE,
        });
        // SAFETY: mmsghdr is plain old data; zeroed, then every pointer is set below to
        // memory (`iov`, `self.names`, `self.control`) that outlives the call.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (i, h) in hdrs.iter_mut().enumerate() {
            h.msg_hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            h.msg_hdr.msg_iov = &mut iov[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = self.control[i].as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = CONTROL as _;
        }
        // SAFETY: `hdrs` holds BATCH valid headers whose buffers are MESSAGE bytes each.
        let n = unsafe {
            libc::recvmmsg(
                udp.as_raw_fd(),
                hdrs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT as _,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        for (i, h) in hdrs.iter().take(n as usize).enumerate() {
            // A truncated message is not one we could use: mark it empty.
            let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            self.lens[i] = if truncated { 0 } else { h.msg_len as usize };
            self.name_lens[i] = h.msg_hdr.msg_namelen;
            self.segs[i] = gro_size(&h.msg_hdr);
        }
        Ok(n as usize)
    }

    /// The datagrams of message `i` of the last `recv`, with their sender.
    pub fn datagrams(&self, i: usize) -> Option<(SocketAddr, std::slice::Chunks<'_, u8>)> {
        if self.lens[i] == 0 {
            return None;
        }
        let from = socket_addr(&self.names[i], self.name_lens[i])?;
        let data = &self.data[i * MESSAGE..i * MESSAGE + self.lens[i]];
        let seg = if self.segs[i] == 0 {
            data.len()
        } else {
            self.segs[i]
        };
        Some((from, data.chunks(seg)))
    }
}

/// The UDP_GRO segment size the kernel attached to a received message, if any.
fn gro_size(msg: &libc::msghdr) -> usize {
    // SAFETY: the CMSG_* walkers stay within msg_control/msg_controllen as the kernel set
    // them, and a UDP_GRO cmsg carries an int.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return v.max(0) as usize;
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    0
}

/// A socket address the kernel wrote into `storage` (`len` bytes).
fn socket_addr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match storage.ss_family as i32 {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says it is a sockaddr_in, and it fits in the storage.
            let a =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::new(ip.into(), u16::from_be(a.sin_port)))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the family says it is a sockaddr_in6, and it fits in the storage.
            let a = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                a.sin6_addr.s6_addr.into(),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Runs of datagrams one GSO message can carry: same destination, the same size except a
/// shorter last one. Pure; `(start, count)` per message.
pub fn gso_runs(datagrams: &[(SocketAddr, Vec<u8>)], gso: bool) -> Vec<(usize, usize)> {
    let mut runs = vec![];
    let mut i = 0;
    while i < datagrams.len() && runs.len() < SEND_BATCH {
        let (to, first) = &datagrams[i];
        let (seg, mut n, mut total) = (first.len(), 1, first.len());
        while gso && i + n < datagrams.len() && n < GSO_MAX_SEGMENTS {
            let (next_to, p) = &datagrams[i + n];
            if next_to != to || p.len() > seg || total + p.len() > GSO_MAX_BYTES {
                break;
            }
            n += 1;
            total += p.len();
            if p.len() < seg {
                break;
            }
        }
        runs.push((i, n));
        i += n;
    }
    runs
}

/// Sends all `datagrams`, batched; one that cannot be sent is skipped, not retried forever.
pub async fn send_all(udp: &UdpSocket, datagrams: &[(SocketAddr, Vec<u8>)]) {
    let mut sent = 0;
    while sent < datagrams.len() {
        let rest = &datagrams[sent..];
        let gso = GSO.load(Ordering::Relaxed);
        match udp
            .async_io(tokio::io::Interest::WRITABLE, || sendmmsg(udp, rest, gso))
            .await
        {
            Ok(n) => sent += n.max(1),
            Err(e) if gso && matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL)) => {
                info!(error = %e, "the kernel refuses UDP GSO; sending datagram by datagram");
                GSO.store(false, Ordering::Relaxed);
            }
            Err(e) => {
                debug!(to = %rest[0].0, error = %e, "UDP send failed");
                sent += 1;
            }
        }
    }
}

/// One `sendmmsg`; returns how many datagrams went out.
fn sendmmsg(
    udp: &UdpSocket,
    datagrams: &[(SocketAddr, Vec<u8>)],
    gso: bool,
) -> std::io::Result<usize> {
    let runs = gso_runs(datagrams, gso);
    let names: Vec<socket2::SockAddr> = runs.iter().map(|(i, _)| datagrams[*i].0.into()).collect();
    let mut iov: Vec<libc::iovec> = runs
        .iter()
        .flat_map(|(i, n)| &datagrams[*i..i + n])
        .map(|(_, p)| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect();
    let mut control = vec![[0u64; CONTROL / 8]; runs.len()];
    // SAFETY: mmsghdr is plain old data; every pointer set below points into `names`,
    // `iov` and `control`, which outlive the call; the kernel only reads through them.
    let mut hdrs: Vec<libc::mmsghdr> = (0..runs.len())
        .map(|_| unsafe { std::mem::zeroed() })
        .collect();
    let mut first_iov = 0;
    for (k, ((start, n), h)) in runs.iter().zip(hdrs.iter_mut()).enumerate() {
        h.msg_hdr.msg_name = names[k].as_ptr() as *mut libc::c_void;
        h.msg_hdr.msg_namelen = names[k].len();
        h.msg_hdr.msg_iov = &mut iov[first_iov];
        h.msg_hdr.msg_iovlen = *n as _;
        first_iov += n;
        if *n > 1 {
            let seg = datagrams[*start].1.len() as u16;
            h.msg_hdr.msg_control = control[k].as_mut_ptr().cast();
            // SAFETY: the control buffer has room for one cmsg with a u16 (CONTROL bytes,
            // 8-byte aligned); CMSG_* compute offsets within it.
            unsafe {
                h.msg_hdr.msg_controllen = libc::CMSG_SPACE(2) as _;
                let c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                (*c).cmsg_level = SOL_UDP;
                (*c).cmsg_type = UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(2) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
            }
        }
    }
    // SAFETY: `hdrs` holds `runs.len()` valid headers.
    let m = unsafe {
        libc::sendmmsg(
            udp.as_raw_fd(),
            hdrs.as_mut_ptr(),
            hdrs.len() as u32,
            libc::MSG_DONTWAIT as _,
        )
    };
    if m < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(runs.iter().take(m as usize).map(|(_, n)| n).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gso_runs_group_equal_sizes_to_one_destination() {
        let (a, b): (SocketAddr, SocketAddr) = (
            "192.0.2.12:41641".parse().unwrap(),
            "192.0.2.13:41641".parse().unwrap(),
        );
        let d = |to, len| (to, vec![0u8; len]);
        let batch = vec![
            d(a, 1312),
            d(a, 1312),
            d(a, 100), // a shorter last one ends the run
            d(a, 1312),
            d(b, 1312), // another destination
            d(b, 1400), // a longer one cannot follow
        ];
        assert_eq!(gso_runs(&batch, true), vec![(0, 3), (3, 1), (4, 1), (5, 1)]);
        assert_eq!(gso_runs(&batch, false).len(), 6);
        let many = vec![d(a, 1312); 200];
        let runs = gso_runs(&many, true);
        assert!(runs.iter().all(|(_, n)| n * 1312 <= GSO_MAX_BYTES));
        assert_eq!(runs.iter().map(|r| r.1).sum::<usize>(), 200);
    }
}
