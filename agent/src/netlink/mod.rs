//! The tunnel interface: created with the `tun` crate (MTU 1280, up), addresses and routes
//! to the mesh prefixes applied with rtnetlink. `plan` is pure; `Tunnel` does the IO.

use crate::error::{Error, Result};
use futures::TryStreamExt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// tailscale's MTU, so packets fit in WireGuard over any path.
pub const MTU: u16 = 1280;
/// The mesh prefixes routed into the tunnel: tailscale's CGNAT range and its ULA.
pub const MESH_ROUTES: &[(IpAddr, u8)] = &[
    (IpAddr::V4(Ipv4Addr::new(100, 64, 0, 0)), 10),
    (
        IpAddr::V6(Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0)),
        48,
    ),
];

/// Parses the netmap's self addresses (`100.64.0.1/32`, `fd7a:…::1/128`).
pub fn plan(addresses: &[String]) -> Result<Vec<(IpAddr, u8)>> {
    addresses
        .iter()
        .map(|a| {
            let (ip, len) = a.split_once('/').unwrap_or((a, ""));
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| Error::Control(format!("headscale sent an invalid address {a:?}")))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len = if len.is_empty() {
                max
            } else {
                len.parse::<u8>()
                    .ok()
                    .filter(|l| *l <= max)
                    .ok_or_else(|| {
                        Error::Control(format!("headscale sent an invalid prefix {a:?}"))
                    })?
            };
            Ok((ip, len))
        })
        .collect()
}

/// Whether `ip` can be offered to peers as a direct endpoint.
/// Whether the prefix lies inside the mesh's own ranges (the TUN routes those already).
pub fn in_mesh((ip, len): (IpAddr, u8)) -> bool {
    MESH_ROUTES.iter().any(|(net, net_len)| {
        len >= *net_len
            && match (ip, net) {
                (IpAddr::V4(a), IpAddr::V4(n)) => {
                    u32::from(a) >> (32 - net_len) == u32::from(*n) >> (32 - net_len)
                }
                (IpAddr::V6(a), IpAddr::V6(n)) => {
                    u128::from(a) >> (128 - net_len) == u128::from(*n) >> (128 - net_len)
                }
                _ => false,
            }
    })
}

pub fn usable_endpoint(ip: IpAddr) -> bool {
    let in_mesh = in_mesh((ip, if ip.is_ipv4() { 32 } else { 128 }));
    let link_local = match ip {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
    };
    !ip.is_loopback() && !ip.is_unspecified() && !link_local && !in_mesh
}

/// Lets the kernel hand us partial checksums and TCP segments of up to 64 KiB (TSO), which
/// `dataplane::offload` completes and cuts: one read per 64 KiB instead of per packet.
fn enable_offloads(device: &tun::AsyncDevice) -> Result<()> {
    use std::os::fd::AsRawFd;
    const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
    const TUN_F_CSUM: libc::c_uint = 0x01;
    const TUN_F_TSO4: libc::c_uint = 0x02;
    const TUN_F_TSO6: libc::c_uint = 0x04;
    let flags = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
    // SAFETY: TUNSETOFFLOAD takes an unsigned int by value on a TUN file descriptor we own.
    let r = unsafe { libc::ioctl(device.as_raw_fd(), TUNSETOFFLOAD as _, flags) };
    if r < 0 {
        return Err(Error::Control(format!(
            "cannot enable TUN offloads: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

fn net(e: impl std::fmt::Display, what: &str) -> Error {
    Error::Control(format!("netlink: {what}: {e}"))
}

/// The TUN device and a netlink handle to configure it. Dropping it removes the device.
/// Creates the TUN device `name` (MTU 1280, up, with offloads). Synchronous: the caller
/// picks the runtime it registers with (the data plane's own, see `dataplane::shell`).
pub fn open_tun(name: &str) -> Result<tun::AsyncDevice> {
    let mut cfg = tun::Configuration::default();
    cfg.tun_name(name).mtu(MTU).up();
    // A virtio-net header on every packet lets us hand the kernel coalesced TCP (GSO).
    cfg.platform_config(|p| {
        p.vnet_hdr(true);
    });
    let device = tun::create_as_async(&cfg).map_err(|e| {
        Error::Control(format!(
            "cannot create the TUN device {name}: {e} (needs CAP_NET_ADMIN and /dev/net/tun)"
        ))
    })?;
    enable_offloads(&device)?;
    Ok(device)
}

pub struct Tunnel {
    pub name: String,
    pub device: std::sync::Arc<tun::AsyncDevice>,
    index: u32,
    handle: rtnetlink::Handle,
    /// Routes beyond the mesh's that we added (accepted subnet routes).
    routes: Vec<(IpAddr, u8)>,
}

impl Tunnel {
    /// Takes over the TUN device `name` that [`open_tun`] made, and routes the mesh
    /// prefixes into it.
    pub async fn create(name: &str, device: tun::AsyncDevice) -> Result<Tunnel> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| net(e, "open"))?;
        tokio::spawn(conn);
        let link = handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_next()
            .await
            .map_err(|e| net(e, "find the TUN link"))?
            .ok_or_else(|| Error::Control(format!("netlink: the TUN link {name} vanished")))?;
        let t = Tunnel {
            name: name.to_string(),
            device: std::sync::Arc::new(device),
            index: link.header.index,
            handle,
            routes: vec![],
        };
        for (ip, len) in MESH_ROUTES {
            t.handle
                .route()
                .add(t.route_message(*ip, *len))
                .replace()
                .execute()
                .await
                .map_err(|e| net(e, &format!("route {ip}/{len} to {name}")))?;
        }
        Ok(t)
    }

    fn route_message(&self, ip: IpAddr, len: u8) -> rtnetlink::packet_route::route::RouteMessage {
        match ip {
            IpAddr::V4(v4) => rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(v4, len)
                .output_interface(self.index)
                .build(),
            IpAddr::V6(v6) => rtnetlink::RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(v6, len)
                .output_interface(self.index)
                .build(),
        }
    }

    /// Makes the accepted subnet routes point at the tunnel: adds the new ones, removes
    /// those no longer wanted. A prefix the host already routes elsewhere (its own LAN) is
    /// left alone, with a warning: a route from the tailnet must not take over a network the
    /// firewall is attached to.
    pub async fn set_routes(&mut self, wanted: &[(IpAddr, u8)]) {
        for &(ip, len) in self.routes.clone().iter().filter(|r| !wanted.contains(r)) {
            match self
                .handle
                .route()
                .del(self.route_message(ip, len))
                .execute()
                .await
            {
                Ok(()) => tracing::info!(route = %format!("{ip}/{len}"), "subnet route removed"),
                Err(e) => {
                    tracing::warn!(route = %format!("{ip}/{len}"), error = %e, "cannot remove subnet route")
                }
            }
        }
        self.routes.retain(|r| wanted.contains(r));
        let new: Vec<_> = wanted
            .iter()
            .filter(|r| !self.routes.contains(r))
            .copied()
            .collect();
        for (ip, len) in new {
            let route = format!("{ip}/{len}");
            match self
                .handle
                .route()
                .add(self.route_message(ip, len))
                .execute()
                .await
            {
                Ok(()) => {
                    tracing::info!(%route, "subnet route from the tailnet accepted");
                    self.routes.push((ip, len));
                }
                Err(e) => {
                    tracing::warn!(%route, error = %e, "subnet route not added (the host routes it already?)")
                }
            }
        }
    }

    /// This host's addresses that peers could reach us on: not loopback, link-local, the
    /// tunnel's own, or inside the mesh prefixes.
    pub async fn local_addresses(&self) -> Result<Vec<IpAddr>> {
        use rtnetlink::packet_route::address::AddressAttribute;
        let mut out = vec![];
        let mut msgs = self.handle.address().get().execute();
        while let Some(m) = msgs
            .try_next()
            .await
            .map_err(|e| net(e, "list addresses"))?
        {
            if m.header.index == self.index {
                continue;
            }
            for a in m.attributes {
                if let AddressAttribute::Address(ip) = a
                    && usable_endpoint(ip)
                    && !out.contains(&ip)
                {
                    out.push(ip);
                }
            }
        }
        Ok(out)
    }

    /// Assigns the mesh addresses (idempotent).
    pub async fn set_addresses(&self, addrs: &[(IpAddr, u8)]) -> Result<()> {
        for (ip, len) in addrs {
            self.handle
                .address()
                .add(self.index, *ip, *len)
                .replace()
                .execute()
                .await
                .map_err(|e| net(e, &format!("address {ip}/{len} on {}", self.name)))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_addresses() {
        let p = plan(&["100.64.0.1/32".into(), "fd7a:115c:a1e0::1/128".into()]).unwrap();
        assert_eq!(p[0], ("100.64.0.1".parse().unwrap(), 32));
        assert_eq!(p[1], ("fd7a:115c:a1e0::1".parse().unwrap(), 128));
        assert!(plan(&["100.64.0.1/33".into()]).is_err());
        assert!(plan(&["nope/32".into()]).is_err());
    }

    #[test]
    fn endpoints_exclude_loopback_link_local_and_the_mesh() {
        for (ip, ok) in [
            ("192.0.2.11", true),
            ("127.0.0.1", false),
            ("169.254.1.1", false),
            ("fe80::1", false),
            ("100.64.0.7", false),
            ("100.128.0.1", true),
            ("fd7a:115c:a1e0::5", false),
            ("2001:db8::1", true),
        ] {
            assert_eq!(usable_endpoint(ip.parse().unwrap()), ok, "{ip}");
        }
    }
}
