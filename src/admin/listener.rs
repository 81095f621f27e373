//! The admin port's transport: accepting connections and serving HTTP/1.1
//! on them with bounds `axum::serve` does not offer.
//!
//! * **Connection cap** (`admin.max_connections`): a semaphore slot per open
//!   connection, taken at accept. Past the cap a connection gets a canned
//!   `503` and is closed: by a small task that lets the client's request
//!   arrive first (so it reads the answer, not a reset) for at most
//!   [`REFUSAL_LINGER`], [`REFUSALS`] at a time; past those, at once. A flood
//!   costs a file descriptor for a moment, not for ever.
//! * **Header timeout** (`admin.header_timeout`): hyper's header-read timer,
//!   armed whenever a connection waits for a request head, so it bounds both
//!   a half-sent head (slowloris) and an idle kept-alive connection. A TLS
//!   handshake gets the same time.
//! * **Idle timeout** (`admin.idle_timeout`): [`IdleIo`] closes a connection
//!   on which no byte moved either way for that long: bodies sent a byte a
//!   minute, answers (exports, event streams) nobody reads.
//! * **TLS** (`admin.tls`): the data plane's certificate loader
//!   ([`crate::tls::CertResolver`]), so the same files, SNI choice and checks.
//!
//! Shutdown: on the stop signal the listener is dropped at once (a new
//! process started with `serve --upgrade` binds the port next) and open
//! connections finish their current request, for up to [`DRAIN`].

use crate::config::AdminConfig;
use axum::{Router, extract::ConnectInfo};
use hyper::{Request, body::Incoming};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::{GracefulShutdown, Watcher},
};
use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    time::{Instant, Sleep},
};

/// Longest wait for open connections after the stop signal.
const DRAIN: Duration = Duration::from_secs(10);
/// Refusals that wait for the client's request before closing.
const REFUSALS: usize = 64;
/// How long a refusal waits for it.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);

/// The transport bounds, from `admin.*`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl Limits {
    pub fn from_config(cfg: &AdminConfig) -> Self {
        Limits {
            header_timeout: cfg.header_timeout.0,
            idle_timeout: cfg.idle_timeout.0,
            max_connections: cfg.max_connections.max(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("admin.tls: {0}")]
    Tls(String),
}

/// A TLS acceptor over the data plane's certificate loader.
pub fn tls_acceptor(resolver: Arc<crate::tls::CertResolver>) -> Result<tokio_rustls::TlsAcceptor, ListenerError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ListenerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serve `app` on `listener` until `stop` resolves, then drain.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refusals = Arc::new(Semaphore::new(REFUSALS));
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, most likely: let some close.
                    tracing::warn!(error = %e, "Admin service cannot accept a connection.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refuse(stream, peer, limits.max_connections, &refusals);
            continue;
        };
        let (app, watcher, tls) = (app.clone(), graceful.watcher(), tls.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let _ = stream.set_nodelay(true);
            let io = IdleIo::new(stream, limits.idle_timeout);
            match tls {
                None => serve_connection(io, peer, app, limits, watcher).await,
                Some(acceptor) => match tokio::time::timeout(limits.header_timeout, acceptor.accept(io)).await {
                    Ok(Ok(tls)) => serve_connection(tls, peer, app, limits, watcher).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "Admin TLS handshake failed."),
                    Err(_) => tracing::debug!(%peer, "Admin TLS handshake timed out."),
                },
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
        tracing::info!("Admin connections still open after the drain; closing them.");
    }
}

/// Over the cap: answer 503 and close. With a refusal slot free, the
/// close waits (briefly) for the client's request and reads it, so the
/// client sees the answer rather than a reset; without one, at once.
fn refuse(stream: TcpStream, peer: SocketAddr, cap: usize, refusals: &Arc<Semaphore>) {
    const BODY: &str = r#"{"error":{"code":"unavailable","message":"too many admin connections; retry shortly"}}"#;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\ncache-control: no-store\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    tracing::debug!(%peer, cap, "Admin connection refused: at the connection cap.");
    let Ok(slot) = refusals.clone().try_acquire_owned() else {
        // A write now may find the new socket not yet known writable: close.
        let _ = stream.try_write(answer.as_bytes());
        return;
    };
    tokio::spawn(async move {
        let _slot = slot;
        let mut stream = stream;
        let _ = tokio::time::timeout(REFUSAL_LINGER, async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut sink = [0u8; 1024];
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    });
}

async fn serve_connection<I>(io: I, peer: SocketAddr, app: Router, limits: Limits, watcher: Watcher)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        // What `into_make_service_with_connect_info` gave handlers (login
        // throttles by address).
        req.extensions_mut().insert(ConnectInfo(peer));
        tower_service::Service::call(&mut app.clone(), req)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service);
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(%peer, error = %e, "Admin connection closed.");
    }
}

/// A stream that fails with `TimedOut` once no byte has been read or
/// written for `timeout` while the server waits on it.
struct IdleIo<T> {
    inner: T,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<T> IdleIo<T> {
    fn new(inner: T, timeout: Duration) -> Self {
        IdleIo {
            inner,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    fn moved(&mut self) {
        let next = Instant::now() + self.timeout;
        self.deadline.as_mut().reset(next);
    }

    /// The inner stream is not ready: fail if the connection has been idle too long.
    fn pending<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "admin connection idle for too long",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.moved();
                }
                Poll::Ready(result)
            }
            Poll::Pending => this.pending(cx),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, data) {
            Poll::Ready(result) => {
                if matches!(result, Ok(n) if n > 0) {
                    this.moved();
                }
                Poll::Ready(result)
            }
            Poll::Pending => this.pending(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(result) => {
                if matches!(result, Ok(n) if n > 0) {
                    this.moved();
                }
                Poll::Ready(result)
            }
            Poll::Pending => this.pending(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(result) => Poll::Ready(result),
            Poll::Pending => this.pending(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
