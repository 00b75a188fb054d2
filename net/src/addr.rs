//! Parsing of the addresses an operator writes: `host:port` or a libp2p TCP multiaddr,
//! optionally ending in `/p2p/<peer id>` (for seeds).

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

pub use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    #[error("address {0:?}: {1}")]
    Invalid(String, String),
}

/// A parsed address: where to dial or listen, and the peer expected there, if given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddr {
    pub addr: Multiaddr,
    pub peer: Option<PeerId>,
}

/// Parses `host:port`, `[v6]:port` or a TCP multiaddr such as `/ip4/10.0.0.1/tcp/7700`
/// (with or without `/p2p/<id>`). QUIC and other transports are refused: the cluster
/// secret (pnet) protects TCP only.
pub fn parse_peer_addr(input: &str) -> Result<PeerAddr, AddrError> {
    let bad = |why: &str| AddrError::Invalid(input.to_string(), why.to_string());
    let s = input.trim();
    if s.starts_with('/') {
        let mut addr: Multiaddr = s
            .parse()
            .map_err(|e| bad(&format!("not a multiaddr: {e}")))?;
        let peer = match addr.iter().last() {
            Some(Protocol::P2p(p)) => {
                addr.pop();
                Some(p)
            }
            _ => None,
        };
        let mut parts = addr.iter();
        match parts.next() {
            Some(Protocol::Ip4(_) | Protocol::Ip6(_) | Protocol::Dns(_) | Protocol::Dns4(_))
            | Some(Protocol::Dns6(_)) => {}
            _ => return Err(bad("must start with /ip4, /ip6 or /dns")),
        }
        match (parts.next(), parts.next()) {
            (Some(Protocol::Tcp(_)), None) => {}
            _ => return Err(bad("only TCP multiaddrs (/ip4/A/tcp/P) are supported; the cluster secret protects TCP only")),
        }
        if matches!(
            addr.iter().next(),
            Some(Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_))
        ) {
            return Err(bad(
                "use an IP address or host:port; /dns multiaddrs are not resolved",
            ));
        }
        return Ok(PeerAddr { addr, peer });
    }
    let sock: SocketAddr = match s.parse() {
        Ok(sa) => sa,
        Err(_) => {
            let (host, port) = s
                .rsplit_once(':')
                .ok_or_else(|| bad("expected host:port or a multiaddr"))?;
            let port: u16 = port
                .parse()
                .map_err(|_| bad("port is not a number 0-65535"))?;
            (host, port)
                .to_socket_addrs()
                .map_err(|e| bad(&format!("cannot resolve host {host:?}: {e}")))?
                .next()
                .ok_or_else(|| bad(&format!("host {host:?} has no address")))?
        }
    };
    Ok(PeerAddr {
        addr: socket_multiaddr(sock.ip(), sock.port()),
        peer: None,
    })
}

/// The TCP multiaddr of an IP and port.
pub fn socket_multiaddr(ip: IpAddr, port: u16) -> Multiaddr {
    let mut m = Multiaddr::empty();
    match ip {
        IpAddr::V4(v4) => m.push(Protocol::Ip4(v4)),
        IpAddr::V6(v6) => m.push(Protocol::Ip6(v6)),
    }
    m.push(Protocol::Tcp(port));
    m
}

/// Whether a listen address is unspecified (`0.0.0.0`, `::`), so needs an advertised address.
pub fn is_unspecified(addr: &Multiaddr) -> bool {
    matches!(addr.iter().next(), Some(Protocol::Ip4(ip)) if ip.is_unspecified())
        || matches!(addr.iter().next(), Some(Protocol::Ip6(ip)) if ip.is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_and_multiaddr() {
        let a = parse_peer_addr("127.0.0.1:7701").unwrap();
        assert_eq!(a.addr.to_string(), "/ip4/127.0.0.1/tcp/7701");
        assert_eq!(a.peer, None);
        let b = parse_peer_addr("[::1]:7701").unwrap();
        assert_eq!(b.addr.to_string(), "/ip6/::1/tcp/7701");
        let c = parse_peer_addr("localhost:7701").unwrap();
        assert!(c.addr.to_string().ends_with("/tcp/7701"));
        let id = PeerId::random();
        let d = parse_peer_addr(&format!("/ip4/10.1.2.3/tcp/7700/p2p/{id}")).unwrap();
        assert_eq!(d.addr.to_string(), "/ip4/10.1.2.3/tcp/7700");
        assert_eq!(d.peer, Some(id));
    }

    #[test]
    fn bad_addresses_say_why() {
        for bad in [
            "",
            "nonsense",
            "1.2.3.4:99999",
            "/ip4/1.2.3.4/udp/1/quic-v1",
            "/ip4/1.2.3.4",
        ] {
            assert!(parse_peer_addr(bad).is_err(), "{bad} should fail");
        }
    }
}
