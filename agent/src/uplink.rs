//! The device the agent's own sockets go out on (`bind_device` in agent.json). On a VRF
//! firewall the routes to headscale and to the peers live in the VRF's table; instead of
//! running the whole agent inside the VRF (`ip vrf exec` needs cgroup and BPF privileges
//! the hardened unit does not grant), every socket the agent opens is bound to the device
//! with `SO_BINDTODEVICE` (CAP_NET_RAW, which the unit has): the UDP port, the control and
//! DERP connections, and with the UDP port STUN.

use std::net::SocketAddr;
use std::sync::OnceLock;
use tokio::net::{TcpSocket, TcpStream};

static DEVICE: OnceLock<String> = OnceLock::new();

/// Sets the device for the rest of the process; the first call wins.
pub fn set(device: Option<&str>) {
    if let Some(d) = device {
        let _ = DEVICE.set(d.to_string());
    }
}

/// The device sockets are bound to, if any.
pub fn device() -> Option<&'static str> {
    DEVICE.get().map(String::as_str)
}

/// Binds a socket about to be used to the device, if one is set.
pub fn bind(socket: &socket2::Socket) -> std::io::Result<()> {
    match device() {
        Some(d) => socket.bind_device(Some(d.as_bytes())),
        None => Ok(()),
    }
}

/// A TCP connection to `host:port` through the device, if one is set: each resolved
/// address in turn, the first that answers.
pub async fn connect(host: &str, port: u16) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        match connect_addr(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "the name resolved to nothing")
    }))
}

async fn connect_addr(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(d) = device() {
        socket.bind_device(Some(d.as_bytes()))?;
    }
    socket.connect(addr).await
}
