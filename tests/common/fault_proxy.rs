//! A TCP proxy that injects network faults between a gateway and the
//! servers it shares state through (redis-server, PostgreSQL): delays,
//! partitions that hold bytes (the peer times out), cuts that drop every
//! connection, and lost replies (the server ran the command, the answer
//! never arrives). The server behind it keeps its memory throughout, which
//! a kill and restart would not.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering},
};
use std::time::Duration;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::AbortHandle,
};

/// What the proxy does with traffic now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    /// Bytes pass (after the configured delay).
    Pass = 0,
    /// Bytes are held until the fault ends; connections stay open.
    Blackhole = 1,
    /// Every connection is dropped and new ones are closed at once.
    Cut = 2,
    /// Requests reach the server; its answers are thrown away.
    DropReplies = 3,
}

impl Fault {
    fn from_u8(v: u8) -> Fault {
        match v {
            1 => Fault::Blackhole,
            2 => Fault::Cut,
            3 => Fault::DropReplies,
            _ => Fault::Pass,
        }
    }
}

struct Shared {
    target: u16,
    fault: AtomicU8,
    delay_ms: AtomicU64,
    accepted: AtomicUsize,
    /// Byte chunks thrown away under [`Fault::DropReplies`].
    dropped_replies: AtomicUsize,
    connections: Mutex<Vec<AbortHandle>>,
}

impl Shared {
    fn fault(&self) -> Fault {
        Fault::from_u8(self.fault.load(Ordering::SeqCst))
    }
}

/// A proxy on a loopback port in front of `127.0.0.1:target`.
pub struct FaultProxy {
    pub port: u16,
    shared: Arc<Shared>,
    accept: AbortHandle,
}

impl FaultProxy {
    pub async fn start(target: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            target,
            fault: AtomicU8::new(Fault::Pass as u8),
            delay_ms: AtomicU64::new(0),
            accepted: AtomicUsize::new(0),
            dropped_replies: AtomicUsize::new(0),
            connections: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                s.accepted.fetch_add(1, Ordering::SeqCst);
                if s.fault() == Fault::Cut {
                    drop(client);
                    continue;
                }
                let conn = tokio::spawn(serve(client, s.clone()));
                let mut all = s.connections.lock().unwrap();
                all.retain(|h| !h.is_finished());
                all.push(conn.abort_handle());
            }
        })
        .abort_handle();
        FaultProxy { port, shared, accept }
    }

    /// Replace the port of `url` (`scheme://user@127.0.0.1:PORT/...`) with
    /// this proxy's.
    pub fn url_for(&self, url: &str) -> String {
        let target = format!(":{}", self.shared.target);
        assert!(url.contains(&target), "{url} does not name port {}", self.shared.target);
        url.replacen(&target, &format!(":{}", self.port), 1)
    }

    pub fn set(&self, fault: Fault) {
        self.shared.fault.store(fault as u8, Ordering::SeqCst);
        if fault == Fault::Cut {
            for c in self.shared.connections.lock().unwrap().drain(..) {
                c.abort();
            }
        }
    }

    /// Heal: bytes pass again (held bytes are delivered).
    pub fn pass(&self) {
        self.set(Fault::Pass);
    }

    /// A partition that holds bytes: the peer sees a timeout, not an error.
    pub fn blackhole(&self) {
        self.set(Fault::Blackhole);
    }

    /// A partition that drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.set(Fault::Cut);
    }

    /// The server runs what it is sent; the answers are lost.
    pub fn drop_replies(&self) {
        self.set(Fault::DropReplies);
    }

    /// Each chunk waits `d` before it is passed on (both directions).
    pub fn delay(&self, d: Duration) {
        self.shared.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn fault(&self) -> Fault {
        self.shared.fault()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Reply chunks thrown away so far.
    pub fn dropped_replies(&self) -> usize {
        self.shared.dropped_replies.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for c in self.shared.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

async fn serve(client: TcpStream, shared: Arc<Shared>) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", shared.target)).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pipe(cr, sw, shared.clone(), false);
    let down = pipe(sr, cw, shared.clone(), true);
    // Either side closing ends the connection.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: Arc<Shared>,
    is_reply: bool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        loop {
            match shared.fault() {
                Fault::Blackhole => tokio::time::sleep(Duration::from_millis(10)).await,
                Fault::Cut => return,
                _ => break,
            }
        }
        if is_reply && shared.fault() == Fault::DropReplies {
            shared.dropped_replies.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let delay = shared.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
