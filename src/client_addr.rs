//! The client's real address behind load balancers: `server.trusted_proxies`
//! decides whose word is taken, from `X-Forwarded-For` (the right-most hop
//! that is not a trusted proxy) or from a PROXY protocol v1/v2 header sent by
//! an L4 balancer before the first byte (`server.proxy_protocol`). A peer
//! outside the trusted list is the client, whatever it sends.

use async_trait::async_trait;
use http::HeaderMap;
use ipnet::IpNet;
use pingora::{
    listeners::PreTlsProcess,
    protocols::{IO, SocketDigest, l4::socket::SocketAddr as PeerAddr},
};
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The CIDRs whose forwarding headers (and PROXY headers) are believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parse CIDRs (`10.0.0.0/8`) or single addresses; every bad entry named.
    pub fn parse(list: &[String]) -> Result<Self, Vec<String>> {
        let (mut nets, mut bad) = (Vec::new(), Vec::new());
        for entry in list {
            match entry
                .parse::<IpNet>()
                .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
            {
                Ok(n) => nets.push(n),
                Err(_) => bad.push(format!(
                    "server.trusted_proxies: {entry:?} is not a CIDR like 10.0.0.0/8 or an address"
                )),
            }
        }
        if bad.is_empty() {
            Ok(TrustedProxies(nets))
        } else {
            Err(bad)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// The client of a request that arrived from `peer`: when the peer is a
    /// trusted proxy, the right-most `X-Forwarded-For` hop that is not one
    /// (the left-most if all are; the last good hop if one is garbled).
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        self.resolve(peer, headers).0
    }

    /// `client_ip`, and whether `peer` is a trusted proxy (one lookup).
    pub fn resolve(&self, peer: IpAddr, headers: &HeaderMap) -> (IpAddr, bool) {
        let peer = peer.to_canonical();
        if !self.contains(peer) {
            return (peer, false);
        }
        let values: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let mut client = peer;
        for hop in values.iter().rev().flat_map(|v| v.rsplit(',')) {
            let Some(ip) = parse_hop(hop.trim()) else { break };
            client = ip;
            if !self.contains(ip) {
                break;
            }
        }
        (client, true)
    }
}

/// One `X-Forwarded-For` entry: an address, maybe with a port or brackets.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .or_else(|_| hop.parse::<SocketAddr>().map(|s| s.ip()))
        .or_else(|_| hop.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>())
        .ok()
        .map(|ip| ip.to_canonical())
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
    #[error("no PROXY protocol header from a trusted proxy")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
    #[error("no PROXY protocol header within {0:?}")]
    Timeout(Duration),
}

/// The v2 signature; a v1 header starts with `PROXY `.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, CRLF included.
const V1_MAX: usize = 107;
/// How long a balancer has to send its header after connecting.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Read one PROXY protocol header (v1 or v2) and nothing after it; the
/// client address it carries, or `None` for a balancer's own connection
/// (v2 `LOCAL`, v1 `UNKNOWN`: health checks).
pub async fn read_proxy_header<S: AsyncRead + Unpin + Send + ?Sized>(
    s: &mut S,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    match tokio::time::timeout(HEADER_TIMEOUT, read_header(s)).await {
        Ok(r) => r,
        Err(_) => Err(ProxyHeaderError::Timeout(HEADER_TIMEOUT)),
    }
}

async fn read_header<S: AsyncRead + Unpin + Send + ?Sized>(s: &mut S) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    // Both versions are at least 12 bytes long (`PROXY UNKNOWN\r\n` is 15).
    let mut buf = vec![0u8; 12];
    s.read_exact(&mut buf).await?;
    if buf.as_slice() == V2_SIGNATURE {
        let mut rest = [0u8; 4];
        s.read_exact(&mut rest).await?;
        buf.extend_from_slice(&rest);
        let len = u16::from_be_bytes([rest[2], rest[3]]) as usize;
        let start = buf.len();
        buf.resize(start + len, 0);
        s.read_exact(&mut buf[start..]).await?;
        let header =
            ppp::v2::Header::try_from(buf.as_slice()).map_err(|e| ProxyHeaderError::Malformed(e.to_string()))?;
        if header.command == ppp::v2::Command::Local {
            return Ok(None);
        }
        return Ok(match header.addresses {
            ppp::v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            ppp::v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            _ => None,
        });
    }
    if !buf.starts_with(b"PROXY ") {
        return Err(ProxyHeaderError::Missing);
    }
    // Byte by byte up to CRLF: nothing of the request after it is consumed.
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n") {
        if buf.len() >= V1_MAX {
            return Err(ProxyHeaderError::Malformed("a v1 header longer than 107 bytes".into()));
        }
        s.read_exact(&mut byte).await?;
        buf.push(byte[0]);
    }
    let text = std::str::from_utf8(&buf).map_err(|e| ProxyHeaderError::Malformed(e.to_string()))?;
    let header = ppp::v1::Header::try_from(text).map_err(|e| ProxyHeaderError::Malformed(e.to_string()))?;
    Ok(match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Unknown => None,
    })
}

/// A socket digest whose peer is `client`: what Pingora reports as the
/// session's client address from here on.
fn digest_with_peer(fd: i32, client: SocketAddr) -> SocketDigest {
    let digest = SocketDigest::from_raw_fd(fd);
    let _ = digest.peer_addr.set(Some(PeerAddr::Inet(client)));
    digest
}

/// From a trusted peer, read its PROXY header and make the client it names
/// the stream's peer; other peers are left alone. An error means the
/// connection is to be dropped (logged here).
pub(crate) async fn take_proxy_header(trusted: &TrustedProxies, stream: &mut dyn IO) -> Result<(), ProxyHeaderError> {
    let peer = stream
        .get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
    if !peer.is_some_and(|ip| trusted.contains(ip)) {
        return Ok(());
    }
    match read_proxy_header(stream).await {
        Ok(Some(client)) => {
            let fd = stream.id();
            stream.set_socket_digest(digest_with_peer(fd, client));
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) => {
            tracing::warn!(error = %e, "Dropping a connection from a trusted proxy.");
            Err(e)
        }
    }
}

/// PROXY protocol on a TLS listener: read before the handshake.
pub struct ProxyProtocolBeforeTls {
    pub trusted: TrustedProxies,
}

#[async_trait]
impl PreTlsProcess for ProxyProtocolBeforeTls {
    async fn process(&self, stream: &mut pingora::protocols::l4::stream::Stream) -> pingora::Result<()> {
        take_proxy_header(&self.trusted, stream)
            .await
            .map_err(|e| pingora::Error::explain(pingora::ErrorType::ConnectError, e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(list: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_trusted_peers_are_believed_and_the_right_most_untrusted_hop_wins() {
        let t = trusted(&["10.0.0.0/8", "192.168.1.7"]);
        // An untrusted peer cannot spoof.
        assert_eq!(t.client_ip(ip("203.0.113.9"), &xff(&["1.1.1.1"])), ip("203.0.113.9"));
        // Through one trusted proxy.
        assert_eq!(t.client_ip(ip("10.1.2.3"), &xff(&["198.51.100.4"])), ip("198.51.100.4"));
        // A client-supplied left part is not believed: right-most untrusted.
        assert_eq!(
            t.client_ip(ip("10.1.2.3"), &xff(&["6.6.6.6, 198.51.100.4, 192.168.1.7"])),
            ip("198.51.100.4")
        );
        // Several headers read as one list, in order.
        assert_eq!(
            t.client_ip(ip("10.1.2.3"), &xff(&["6.6.6.6", "198.51.100.4", "10.9.9.9"])),
            ip("198.51.100.4")
        );
        // All trusted: the left-most; garbled: the last good hop.
        assert_eq!(
            t.client_ip(ip("10.1.2.3"), &xff(&["10.0.0.1, 10.0.0.2"])),
            ip("10.0.0.1")
        );
        assert_eq!(
            t.client_ip(ip("10.1.2.3"), &xff(&["nonsense, 10.0.0.2"])),
            ip("10.0.0.2")
        );
        // Ports and brackets; IPv4-mapped IPv6 peers.
        assert_eq!(
            t.client_ip(ip("10.1.2.3"), &xff(&["198.51.100.4:5555"])),
            ip("198.51.100.4")
        );
        assert_eq!(
            t.client_ip(ip("10.1.2.3"), &xff(&["[2001:db8::1]:443"])),
            ip("2001:db8::1")
        );
        assert_eq!(
            t.client_ip(ip("::ffff:10.1.2.3"), &xff(&["198.51.100.4"])),
            ip("198.51.100.4")
        );
        // No header: the peer.
        assert_eq!(t.client_ip(ip("10.1.2.3"), &HeaderMap::new()), ip("10.1.2.3"));
        let errors = TrustedProxies::parse(&["10.0.0.0/33".into(), "x".into()]).unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
    }

    #[tokio::test]
    async fn proxy_headers_v1_and_v2_are_read_and_nothing_after_them() {
        let mut v1: &[u8] = b"PROXY TCP4 198.51.100.4 10.0.0.1 51234 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            read_proxy_header(&mut v1).await.unwrap(),
            Some("198.51.100.4:51234".parse().unwrap())
        );
        assert_eq!(v1, b"GET / HTTP/1.1\r\n");
        let mut unknown: &[u8] = b"PROXY UNKNOWN\r\nGET";
        assert_eq!(read_proxy_header(&mut unknown).await.unwrap(), None);
        assert_eq!(unknown, b"GET");

        let header = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (
                "[2001:db8::7]:40000".parse::<SocketAddr>().unwrap(),
                "[2001:db8::1]:443".parse::<SocketAddr>().unwrap(),
            ),
        )
        .build()
        .unwrap();
        let mut bytes = header.clone();
        bytes.extend_from_slice(b"GET");
        let mut v2: &[u8] = &bytes;
        assert_eq!(
            read_proxy_header(&mut v2).await.unwrap(),
            Some("[2001:db8::7]:40000".parse().unwrap())
        );
        assert_eq!(v2, b"GET");

        let mut http: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(matches!(
            read_proxy_header(&mut http).await,
            Err(ProxyHeaderError::Missing)
        ));
        let mut bad: &[u8] = b"PROXY TCP4 999.1.1.1 10.0.0.1 1 2\r\n";
        assert!(matches!(
            read_proxy_header(&mut bad).await,
            Err(ProxyHeaderError::Malformed(_))
        ));
    }
}
