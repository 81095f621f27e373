//! The data port's connection guard: what one connection and one client
//! address may cost before a route is known (`server.limits`).
//!
//! Why it exists: Pingora 0.9 bounds a request header only by a per-read
//! timeout (60 s per read) and by 1 MiB / 256 headers, so a slowloris that
//! sends a byte every few seconds is never cut, and every connection may
//! buffer a megabyte. Pingora has no hook between the socket and its
//! HTTP/1 parser, so this module puts one there:
//!
//! - [`ConnGuard`] wraps the proxy as the listener's `ServerApp` (plain, h2c
//!   and TLS listeners alike). It reads the PROXY header where configured,
//!   counts open connections per client address (refusing over
//!   `max_connections_per_client`), and runs the HTTP/1 keep-alive loop
//!   itself, so it can re-arm the header clock before each request. HTTP/2
//!   connections (ALPN or h2c prior knowledge) go to Pingora's own loop,
//!   with `h2_idle_timeout` set from `keepalive_timeout`.
//! - [`GuardedIo`] wraps the stream and implements Pingora's `IO` traits by
//!   delegation. While a request header is awaited its `poll_read` enforces
//!   `client_header_timeout` for the whole header (from the connection's
//!   start for the first request, from the first byte for later ones) and
//!   caps the request line and header section; it scans the bytes for the
//!   blank line that ends the header and then stands aside for the body.
//!   An oversized header is answered by the adapter itself with a `414` or
//!   `431` in the client's error shape (guessed from the path) and the
//!   connection closes, so no connection buffers more than the limits plus
//!   one read. Finer checks (per header, exact totals, HTTP/2) are made by
//!   the proxy's `request_filter` from the parsed header (`check_header`).

use crate::{
    client_addr::{TrustedProxies, take_proxy_header},
    config::TransportLimits,
    config::routes_d::Format,
    proxy::errors::{GatewayError, guess_format},
};
use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use pingora::{
    apps::{HttpServerApp, ServerApp},
    protocols::{
        GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream, TimingDigest,
        UniqueID, UniqueIDType, http::ServerSession, raw_connect::ProxyDigest, tls::SslDigest,
    },
    server::ShutdownWatch,
};
use prometheus::IntCounterVec;
use std::{
    collections::HashMap,
    net::IpAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    time::{Instant, Sleep},
};

/// Why the transport refused: the `reason` label of
/// `fastgate_transport_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    PerClientCap,
    HeaderTimeout,
    HeaderTooLarge,
    UriTooLong,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::PerClientCap => "per_client_cap",
            Refusal::HeaderTimeout => "header_timeout",
            Refusal::HeaderTooLarge => "header_too_large",
            Refusal::UriTooLong => "uri_too_long",
        }
    }
}

/// Slack over `max_uri_bytes` for the request line's method and version,
/// and over `max_header_bytes` for the section's line ends, before the
/// adapter cuts; below it the proxy answers with the exact limits.
const LINE_SLACK: usize = 1024;
/// The start of the request line kept to guess the error shape from.
const HEAD_KEPT: usize = 2048;
/// How long, and how many bytes, a refused header is read and dropped
/// after its answer (nginx's lingering close).
const LINGER: Duration = Duration::from_secs(1);
const LINGER_MAX: usize = 2 * 1024 * 1024;
/// How long a refused client gets to take its short answer.
const REFUSAL_WRITE: Duration = Duration::from_secs(1);
/// HTTP/2's connection preface (h2c with prior knowledge starts with it).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The settings one listener's guard applies.
#[derive(Debug, Clone)]
pub struct GuardSettings {
    pub limits: TransportLimits,
    pub refusals: IntCounterVec,
}

impl GuardSettings {
    fn refused(&self, why: Refusal) {
        self.refusals.with_label_values(&[why.label()]).inc();
    }

    /// Pingora's keep-alive seconds: `None` = off, at least 1 s otherwise.
    fn keepalive_secs(&self) -> Option<u64> {
        let d = self.limits.keepalive_timeout.0;
        (!d.is_zero()).then(|| d.as_secs_f64().ceil().max(1.0) as u64)
    }
}

/// The parsed request header against `server.limits` (exact byte counts,
/// HTTP/1 and HTTP/2 alike): the error to answer with, if any.
pub fn check_header(limits: &TransportLimits, req: &pingora::http::RequestHeader) -> Option<(Refusal, GatewayError)> {
    let uri = req.raw_path().len();
    if uri as u64 > limits.max_uri_bytes.0 {
        return Some((
            Refusal::UriTooLong,
            GatewayError::UriTooLong {
                limit: limits.max_uri_bytes.0,
            },
        ));
    }
    let mut total: u64 = 0;
    for (name, value) in req.headers.iter() {
        // `name: value\r\n`
        let line = (name.as_str().len() + value.len() + 4) as u64;
        if line > limits.max_header_value_bytes.0 {
            return Some((
                Refusal::HeaderTooLarge,
                GatewayError::HeaderFieldTooLarge {
                    limit: limits.max_header_value_bytes.0,
                },
            ));
        }
        total += line;
    }
    (total > limits.max_header_bytes.0).then_some((
        Refusal::HeaderTooLarge,
        GatewayError::HeadersTooLarge {
            limit: limits.max_header_bytes.0,
        },
    ))
}

/// Open connections per client address. An entry lives while its address
/// has a connection open, so the map is bounded by the open connections.
#[derive(Debug, Default)]
pub struct ClientSlots {
    open: Mutex<HashMap<IpAddr, u32>>,
}

impl ClientSlots {
    /// A slot for `ip`, or `None` when it already holds `cap` (0 = no cap).
    fn acquire(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<Slot> {
        let mut open = self.open.lock();
        let n = open.entry(ip).or_insert(0);
        if cap > 0 && *n as usize >= cap {
            if *n == 0 {
                open.remove(&ip);
            }
            return None;
        }
        *n += 1;
        Some(Slot {
            slots: self.clone(),
            ip,
        })
    }

    /// Addresses with a connection open (tests, diagnostics).
    pub fn addresses(&self) -> usize {
        self.open.lock().len()
    }
}

/// One open connection of `ip`, given back on drop.
struct Slot {
    slots: Arc<ClientSlots>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock();
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// The data port's `ServerApp`: guards each connection, then serves it
/// with `inner` (see the module docs).
pub struct ConnGuard<A> {
    pub inner: Arc<A>,
    pub settings: Arc<GuardSettings>,
    pub slots: Arc<ClientSlots>,
    /// PROXY protocol on a plain listener: the balancers believed. On a TLS
    /// listener the header is read before the handshake instead.
    pub proxy_protocol: Option<TrustedProxies>,
    /// `server.trusted_proxies`: their connections carry many clients (an
    /// HTTP balancer's pool), so they are not capped per address.
    pub uncapped: TrustedProxies,
}

impl<A> ConnGuard<A> {
    pub fn new(
        inner: A,
        settings: GuardSettings,
        proxy_protocol: Option<TrustedProxies>,
        uncapped: TrustedProxies,
    ) -> Self {
        ConnGuard {
            inner: Arc::new(inner),
            settings: Arc::new(settings),
            slots: Arc::new(ClientSlots::default()),
            proxy_protocol,
            uncapped,
        }
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for ConnGuard<A> {
    async fn process_new(self: &Arc<Self>, mut stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let accepted = Instant::now();
        let limits = &self.settings.limits;
        if let Some(trusted) = &self.proxy_protocol {
            take_proxy_header(trusted, stream.as_mut()).await.ok()?;
        }
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip().to_canonical()));
        let _slot = match peer.filter(|ip| !self.uncapped.contains(*ip)) {
            Some(ip) => match self.slots.acquire(ip, limits.max_connections_per_client) {
                Some(slot) => Some(slot),
                None => {
                    self.settings.refused(Refusal::PerClientCap);
                    tracing::debug!(client = %ip, cap = limits.max_connections_per_client, "Refusing a connection: the client is at its connection cap.");
                    refuse_connection(stream).await;
                    return None;
                }
            },
            None => None,
        };

        let h2_alpn = matches!(stream.selected_alpn_proto(), Some(pingora::protocols::ALPN::H2));
        let h2c = stream.get_ssl_digest().is_none() && self.inner.server_options().is_some_and(|o| o.h2c);
        if h2_alpn {
            // Pingora's HTTP/2 handshake waits for the client's preface
            // without a timeout: the preface gets the header clock.
            let io = GuardedIo::preface(stream, self.settings.clone(), accepted);
            return ServerApp::process_new(&self.inner, Box::new(io), shutdown).await;
        }
        if h2c {
            // The preface, or the first bytes of an HTTP/1 request, must come
            // within the header timeout like any request header.
            let mut buf = [0u8; H2_PREFACE.len()];
            let left = limits.client_header_timeout.0.saturating_sub(accepted.elapsed());
            match tokio::time::timeout(left, stream.try_peek(&mut buf)).await {
                Ok(Ok(true)) if buf == H2_PREFACE => {
                    let io = GuardedIo::preface(stream, self.settings.clone(), accepted);
                    return ServerApp::process_new(&self.inner, Box::new(io), shutdown).await;
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return None,
                Err(_) => {
                    self.settings.refused(Refusal::HeaderTimeout);
                    return None;
                }
            }
        }

        let io = GuardedIo::new(stream, self.settings.clone(), accepted);
        let mut session = ServerSession::new_http1(Box::new(io));
        if *shutdown.borrow() {
            session.set_keepalive(None);
        } else {
            session.set_keepalive(self.settings.keepalive_secs());
        }
        session.set_keepalive_reuses_remaining(self.inner.server_options().and_then(|o| o.keepalive_request_limit));
        let mut result = self.inner.process_new_http(session, shutdown).await;
        while let Some((stream, persistent)) = result.map(|r| r.consume()) {
            let Ok(mut io) = stream.into_any().downcast::<GuardedIo>() else {
                tracing::error!("A reused data-plane connection lost its guard; closing it.");
                return None;
            };
            io.next_request();
            let mut session = ServerSession::new_http1(io);
            if let Some(persistent) = persistent {
                persistent.apply_to_session(&mut session);
            }
            result = self.inner.process_new_http(session, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.inner.http_cleanup().await;
    }
}

/// Tell a client over its connection cap, briefly, and close.
async fn refuse_connection(mut stream: Stream) {
    if !matches!(stream.selected_alpn_proto(), Some(pingora::protocols::ALPN::H2)) {
        const BUSY: &[u8] =
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\nConnection: close\r\n\r\n";
        let _ = tokio::time::timeout(REFUSAL_WRITE, async {
            stream.write_all(BUSY).await?;
            stream.flush().await
        })
        .await;
    }
    Shutdown::shutdown(stream.as_mut()).await;
}

/// Where the adapter is in the request's bytes.
#[derive(Debug)]
enum Phase {
    /// Between keep-alive requests: the clock starts at the next byte.
    Idle,
    /// Inside a request header, the clock running.
    Header,
    /// HTTP/2: this many bytes of the connection preface still to come,
    /// the clock running; then the HTTP/2 layer bounds the rest.
    Preface(usize),
    /// The header is complete: body bytes pass untouched.
    Body,
    /// Writing a refusal before failing the read.
    Refusing {
        answer: Bytes,
        written: usize,
        why: Refusal,
    },
    /// The refusal is sent and the write side shut: what the client still
    /// sends is read and dropped for a moment, so that closing does not
    /// reset the connection before the client has read the answer.
    Lingering {
        until: Pin<Box<Sleep>>,
        drained: usize,
        why: Refusal,
    },
    /// Refused or timed out: every read fails.
    Failed(Refusal),
}

/// The stream adapter that bounds request headers in time and size (see
/// the module docs). Everything but reading is plain delegation.
pub struct GuardedIo {
    inner: Stream,
    settings: Arc<GuardSettings>,
    phase: Phase,
    deadline: Option<Pin<Box<Sleep>>>,
    scan: HeaderScan,
}

/// Where the bytes of one request header stand.
#[derive(Debug, Default)]
struct HeaderScan {
    /// The last two bytes seen, to find `\n\n` or `\n\r\n` across reads.
    tail: [u8; 2],
    /// Bytes of the request line so far, and whether it ended.
    line: usize,
    line_done: bool,
    /// Bytes of the header section after the request line.
    section: usize,
    /// The start of the request line, for the error shape.
    head: Vec<u8>,
}

impl HeaderScan {
    /// Account header bytes just read: `Ok(true)` at the blank line that
    /// ends the header, `Ok(false)` while within the limits, else why the
    /// header is refused.
    fn scan(&mut self, bytes: &[u8], limits: &TransportLimits) -> Result<bool, Refusal> {
        let max_line = limits.max_uri_bytes.0 as usize + LINE_SLACK;
        let max_section = limits.max_header_bytes.0 as usize + LINE_SLACK;
        for &b in bytes {
            if !self.line_done {
                self.line += 1;
                if self.head.len() < HEAD_KEPT {
                    self.head.push(b);
                }
                if b == b'\n' {
                    self.line_done = true;
                } else if self.line > max_line {
                    return Err(Refusal::UriTooLong);
                }
            } else {
                self.section += 1;
                if self.section > max_section {
                    return Err(Refusal::HeaderTooLarge);
                }
            }
            if b == b'\n' && (self.tail[1] == b'\n' || (self.tail[1] == b'\r' && self.tail[0] == b'\n')) {
                return Ok(true);
            }
            self.tail = [self.tail[1], b];
        }
        Ok(false)
    }

    /// The error shape the request's path suggests.
    fn format(&self) -> Format {
        std::str::from_utf8(&self.head)
            .ok()
            .and_then(|line| line.split(' ').nth(1))
            .map_or(Format::Openai, |path| guess_format(path, &http::HeaderMap::new()))
    }
}

impl std::fmt::Debug for GuardedIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedIo")
            .field("inner", &self.inner)
            .field("phase", &self.phase)
            .finish()
    }
}

impl GuardedIo {
    /// Guard a new connection's first request, its clock started at `since`.
    fn new(inner: Stream, settings: Arc<GuardSettings>, since: Instant) -> Self {
        let deadline = since + settings.limits.client_header_timeout.0;
        GuardedIo {
            inner,
            settings,
            phase: Phase::Header,
            deadline: Some(Box::pin(tokio::time::sleep_until(deadline))),
            scan: HeaderScan::default(),
        }
    }

    /// Guard an HTTP/2 connection until its preface has arrived.
    fn preface(inner: Stream, settings: Arc<GuardSettings>, since: Instant) -> Self {
        let mut io = GuardedIo::new(inner, settings, since);
        io.phase = Phase::Preface(H2_PREFACE.len());
        io
    }

    /// Await the next keep-alive request: its header clock starts at its
    /// first byte; until then `keepalive_timeout` bounds the wait. (Pingora
    /// turns its own keep-alive timeout into "infinite" on every HTTP/1.1
    /// request, so the idle bound is kept here.)
    fn next_request(&mut self) {
        self.phase = Phase::Idle;
        let idle = self.settings.limits.keepalive_timeout.0;
        self.deadline = (!idle.is_zero()).then(|| Box::pin(tokio::time::sleep(idle)));
        self.scan = HeaderScan::default();
    }

    /// A complete HTTP/1.1 answer for `why`, in the shape the path suggests.
    fn refusal(limits: &TransportLimits, scan: &HeaderScan, why: Refusal) -> Bytes {
        let (status, reason, err) = match why {
            Refusal::UriTooLong => (
                414,
                "URI Too Long",
                GatewayError::UriTooLong {
                    limit: limits.max_uri_bytes.0,
                },
            ),
            _ => (
                431,
                "Request Header Fields Too Large",
                GatewayError::HeadersTooLarge {
                    limit: limits.max_header_bytes.0,
                },
            ),
        };
        let body = err.body(scan.format());
        let mut out = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(&body);
        Bytes::from(out)
    }

    fn fail(&mut self, why: Refusal, kind: std::io::ErrorKind) -> std::io::Error {
        self.phase = Phase::Failed(why);
        std::io::Error::new(kind, format!("request header refused: {}", why.label()))
    }
}

impl AsyncRead for GuardedIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.phase {
                Phase::Body => return Pin::new(&mut this.inner).poll_read(cx, buf),
                Phase::Failed(why) => {
                    let why = *why;
                    return Poll::Ready(Err(this.fail(why, std::io::ErrorKind::InvalidData)));
                }
                Phase::Refusing { answer, written, why } => {
                    while *written < answer.len() {
                        match ready!(Pin::new(&mut this.inner).poll_write(cx, &answer[*written..])) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => *written += n,
                        }
                    }
                    let why = *why;
                    let _ = ready!(Pin::new(&mut this.inner).poll_flush(cx));
                    let _ = ready!(Pin::new(&mut this.inner).poll_shutdown(cx));
                    this.phase = Phase::Lingering {
                        until: Box::pin(tokio::time::sleep(LINGER)),
                        drained: 0,
                        why,
                    };
                }
                Phase::Lingering { until, drained, why } => {
                    let why = *why;
                    if until.as_mut().poll(cx).is_ready() || *drained > LINGER_MAX {
                        return Poll::Ready(Err(this.fail(why, std::io::ErrorKind::InvalidData)));
                    }
                    let before = buf.filled().len();
                    let read = ready!(Pin::new(&mut this.inner).poll_read(cx, buf));
                    let n = buf.filled().len() - before;
                    buf.set_filled(before);
                    if read.is_err() || n == 0 {
                        return Poll::Ready(Err(this.fail(why, std::io::ErrorKind::InvalidData)));
                    }
                    *drained += n;
                }
                Phase::Preface(left) => {
                    if let Some(deadline) = this.deadline.as_mut()
                        && deadline.as_mut().poll(cx).is_ready()
                    {
                        this.settings.refused(Refusal::HeaderTimeout);
                        return Poll::Ready(Err(this.fail(Refusal::HeaderTimeout, std::io::ErrorKind::TimedOut)));
                    }
                    let before = buf.filled().len();
                    ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                    let n = buf.filled().len() - before;
                    *left = left.saturating_sub(n);
                    if *left == 0 {
                        this.phase = Phase::Body;
                        this.deadline = None;
                    }
                    return Poll::Ready(Ok(()));
                }
                Phase::Idle | Phase::Header => {
                    if let Some(deadline) = this.deadline.as_mut()
                        && deadline.as_mut().poll(cx).is_ready()
                    {
                        if matches!(this.phase, Phase::Idle) {
                            // keepalive_timeout: an ordinary end, nothing read.
                            this.phase = Phase::Failed(Refusal::HeaderTimeout);
                            return Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()));
                        }
                        this.settings.refused(Refusal::HeaderTimeout);
                        tracing::debug!(
                            timeout_ms = this.settings.limits.client_header_timeout.0.as_millis() as u64,
                            "Closing a connection: its request header did not arrive in time."
                        );
                        return Poll::Ready(Err(this.fail(Refusal::HeaderTimeout, std::io::ErrorKind::TimedOut)));
                    }
                    let before = buf.filled().len();
                    ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                    if buf.filled().len() == before {
                        return Poll::Ready(Ok(())); // end of stream
                    }
                    if matches!(this.phase, Phase::Idle) {
                        this.phase = Phase::Header;
                        let at = Instant::now() + this.settings.limits.client_header_timeout.0;
                        this.deadline = Some(Box::pin(tokio::time::sleep_until(at)));
                    }
                    match this.scan.scan(&buf.filled()[before..], &this.settings.limits) {
                        Ok(ended) => {
                            if ended {
                                this.phase = Phase::Body;
                                this.deadline = None;
                            }
                            return Poll::Ready(Ok(()));
                        }
                        Err(why) => {
                            // The bytes just read are not handed on: the
                            // answer is written, then the read fails.
                            buf.set_filled(before);
                            this.settings.refused(why);
                            tracing::debug!(reason = why.label(), "Refusing an oversized request header.");
                            this.phase = Phase::Refusing {
                                answer: GuardedIo::refusal(&this.settings.limits, &this.scan, why),
                                written: 0,
                                why,
                            };
                        }
                    }
                }
            }
        }
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for GuardedIo {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(self.inner.as_mut()).await
    }
}

impl UniqueID for GuardedIo {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for GuardedIo {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for GuardedIo {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for GuardedIo {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for GuardedIo {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for GuardedIo {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_end_is_found_across_reads_and_with_bare_newlines() {
        let limits = TransportLimits::default();
        let mut h = HeaderScan::default();
        assert_eq!(h.scan(b"GET / HTTP/1.1\r\nHost: x\r", &limits), Ok(false));
        assert_eq!(h.scan(b"\n\r", &limits), Ok(false));
        assert_eq!(h.scan(b"\n{\"body\":1}", &limits), Ok(true));
        let mut h = HeaderScan::default();
        assert_eq!(h.scan(b"GET / HTTP/1.1\nHost: x\n\n", &limits), Ok(true));
        let mut h = HeaderScan::default();
        assert_eq!(h.scan(b"GET / HTTP/1.1\r\nA: \n\rb\r\n", &limits), Ok(false));
    }

    #[test]
    fn long_request_lines_and_header_sections_are_refused_in_shape() {
        let limits = TransportLimits::default();
        let mut h = HeaderScan::default();
        let line = vec![b'a'; 8 * 1024 + LINE_SLACK + 1];
        assert_eq!(h.scan(&line, &limits), Err(Refusal::UriTooLong));
        let mut h = HeaderScan::default();
        assert_eq!(h.scan(b"POST /v1/messages HTTP/1.1\r\n", &limits), Ok(false));
        let section = vec![b'a'; 32 * 1024 + LINE_SLACK + 1];
        assert_eq!(h.scan(&section, &limits), Err(Refusal::HeaderTooLarge));
        let answer = GuardedIo::refusal(&limits, &h, Refusal::HeaderTooLarge);
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
        assert!(
            text.contains(r#""type":"error""#),
            "Anthropic shape for /v1/messages: {text}"
        );
    }

    #[test]
    fn slots_are_capped_per_address_and_freed_to_zero() {
        let slots = Arc::new(ClientSlots::default());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = slots.acquire(ip, 2).unwrap();
        let b = slots.acquire(ip, 2).unwrap();
        assert!(slots.acquire(ip, 2).is_none());
        assert!(slots.acquire("192.0.2.2".parse().unwrap(), 2).is_some());
        drop(a);
        let c = slots.acquire(ip, 2).unwrap();
        drop((b, c));
        assert_eq!(slots.addresses(), 0);
        assert!(slots.acquire(ip, 0).is_some(), "0 = unlimited");
    }
}
