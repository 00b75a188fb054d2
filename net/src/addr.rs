//! Parsing of the addresses an operator writes: `host:port` or a libp2p TCP multiaddr,
//! optionally ending in `/p2p/<peer id>` (for seeds). Listen and advertised
//! addresses are resolved once, at start; a seed's host name is kept (as a
//! `/dns` multiaddr) and resolved each time the seed is dialled, so a seed whose
//! name does not resolve yet (a container starting at the same moment), or
//! whose address changed, is reached once it does.

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
/// secret binds the noise handshake of kiln's TCP transport only.
pub fn parse_peer_addr(input: &str) -> Result<PeerAddr, AddrError> {
    parse(input, false)
}

/// Like [`parse_peer_addr`], but a host name is kept as `/dns/<host>/tcp/<port>`
/// (and `/dns` multiaddrs are taken): see [`seed_host`].
pub fn parse_seed_addr(input: &str) -> Result<PeerAddr, AddrError> {
    parse(input, true)
}

/// A seed's host name to resolve before dialling it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedHost {
    pub host: String,
    pub port: u16,
    /// `/dns4` wants IPv4 addresses only, `/dns6` IPv6 only.
    pub family: Option<IpFamily>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpFamily {
    V4,
    V6,
}

impl SeedHost {
    /// Whether a resolved address is one this seed asked for.
    pub fn wants(&self, ip: &IpAddr) -> bool {
        match self.family {
            None => true,
            Some(IpFamily::V4) => ip.is_ipv4(),
            Some(IpFamily::V6) => ip.is_ipv6(),
        }
    }
}

/// The host name of a `/dns`, `/dns4` or `/dns6` TCP multiaddr; `None` for an
/// IP address.
pub fn seed_host(addr: &Multiaddr) -> Option<SeedHost> {
    let mut parts = addr.iter();
    let (host, family) = match parts.next()? {
        Protocol::Dns(h) => (h.to_string(), None),
        Protocol::Dns4(h) => (h.to_string(), Some(IpFamily::V4)),
        Protocol::Dns6(h) => (h.to_string(), Some(IpFamily::V6)),
        _ => return None,
    };
    match parts.next()? {
        Protocol::Tcp(port) => Some(SeedHost { host, port, family }),
        _ => None,
    }
}

fn parse(input: &str, keep_host: bool) -> Result<PeerAddr, AddrError> {
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
        if !keep_host
            && matches!(
                addr.iter().next(),
                Some(Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_))
            )
        {
            return Err(bad(
                "use an IP address or host:port here; /dns multiaddrs are taken for seeds only",
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
            let host_name = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
            if host.is_empty() || !host.chars().all(host_name) {
                return Err(bad(
                    "expected host:port (a host name, IPv4 or [IPv6] address) or a multiaddr",
                ));
            }
            if keep_host {
                let mut addr = Multiaddr::empty();
                addr.push(Protocol::Dns(host.to_string().into()));
                addr.push(Protocol::Tcp(port));
                return Ok(PeerAddr { addr, peer: None });
            }
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
    fn a_seed_keeps_its_host_name_for_each_dial() {
        let a = parse_seed_addr("kiln-0.kiln.svc:7700").unwrap();
        assert_eq!(a.addr.to_string(), "/dns/kiln-0.kiln.svc/tcp/7700");
        let h = seed_host(&a.addr).unwrap();
        assert_eq!(
            (h.host.as_str(), h.port, h.family),
            ("kiln-0.kiln.svc", 7700, None)
        );
        let b = parse_seed_addr("10.0.0.1:7700").unwrap();
        assert_eq!(b.addr.to_string(), "/ip4/10.0.0.1/tcp/7700");
        assert_eq!(seed_host(&b.addr), None);
        let c = parse_seed_addr("/dns4/seed.example/tcp/7700").unwrap();
        let h = seed_host(&c.addr).unwrap();
        assert_eq!((h.host.as_str(), h.port), ("seed.example", 7700));
        assert!(h.wants(&"10.0.0.1".parse().unwrap()) && !h.wants(&"::1".parse().unwrap()));
        // A name that does not resolve is no error for a seed, but is for a
        // listen or advertised address.
        assert!(parse_seed_addr("no-such-host.invalid:7700").is_ok());
        assert!(parse_peer_addr("no-such-host.invalid:7700").is_err());
        assert!(parse_peer_addr("/dns4/seed.example/tcp/7700").is_err());
        for bad in [
            ":7700",
            "host:",
            "host:99999",
            "/dns/h/udp/1",
            "http://x:7700",
            "a b:1",
        ] {
            assert!(parse_seed_addr(bad).is_err(), "{bad} should fail");
        }
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
