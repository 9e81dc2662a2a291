//! Transparent capture: the listeners a pod's capture rules redirect its TCP to (Istio's
//! ports: 15001 for the app's outbound connections, 15006 for inbound ones; see
//! `hypha_pod::Capture`), and the destination each redirected connection was for, which the
//! kernel keeps for it (`SO_ORIGINAL_DST`, `IP6T_SO_ORIGINAL_DST`).

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

/// The address the client connected to before a REDIRECT rule sent it here.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let local = stream.local_addr()?;
    let addr = match local {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        // An IPv4 connection on a dual-stack socket has an IPv4-mapped local address; its
        // conntrack entry is IPv4's.
        SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some() => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket()
        .ok_or_else(|| io::Error::other("the original destination is not an IP address"))
}

/// Listeners on `port` of every address, IPv4 and IPv6 apart (`[::]` IPv6-only), so each
/// connection's family is its own. A host without IPv6 gets the IPv4 listener only.
pub fn bind_all(port: u16) -> io::Result<Vec<TcpListener>> {
    let v4 = bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
    let mut out = vec![v4];
    match bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))) {
        Ok(v6) => out.push(v6),
        Err(e) => tracing::warn!(port, error = %e, "no IPv6 capture listener"),
    }
    Ok(out)
}

/// One listener; an IPv6 one is IPv6-only, so an IPv4 one may share its port.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}
