//! Process lifecycle from the outside: a drain in the right order (stop
//! accepting and turn unready at once, finish what is in flight, flush the
//! audit log, exit 0) and a zero-downtime binary upgrade (SIGQUIT hands the
//! listening socket to `serve --upgrade`).
#![allow(clippy::unwrap_used)]

mod common;

use common::{ADMIN_PASSWORD, Gateway, MockUpstream, bin};
use futures_util::StreamExt;
use std::{
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

const SSE_ROUTE: &str = "routes:\n  - { name: r, match: { path: '/{*rest}' }, auth: none, upstream: u }\n";

fn sse_config(mock: &MockUpstream) -> String {
    format!("upstreams:\n  u: {{provider: http, endpoints: ['{}']}}\n", mock.url())
}

async fn wait_exit(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "process did not exit within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Read a whole streamed answer; the text and whether it ended cleanly.
async fn read_all(r: reqwest::Response) -> (String, bool) {
    let mut text = String::new();
    let mut s = r.bytes_stream();
    while let Some(chunk) = s.next().await {
        match chunk {
            Ok(c) => text.push_str(&String::from_utf8_lossy(&c)),
            Err(_) => return (text, false),
        }
    }
    (text, true)
}

#[tokio::test]
async fn sigterm_refuses_new_connections_and_turns_unready_at_once_then_finishes_streams() {
    let mock = MockUpstream::start().await;
    mock.behaviour.sse_interval_ms.store(300, Ordering::SeqCst);
    let mut gw = Gateway::start(&sse_config(&mock), &[("r.yaml", SSE_ROUTE)]).await;
    let c = reqwest::Client::new();
    assert_eq!(c.get(gw.admin_url("/health/ready")).send().await.unwrap().status(), 200);

    let r = c.get(gw.url("/sse")).send().await.unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut stream = r.bytes_stream();
    let mut text = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();
    // Load on fresh connections while the stream flows: every one is served
    // (nothing is refused before the signal).
    let mut loads = Vec::new();
    for _ in 0..4 {
        let url = gw.url("/json");
        loads.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..15 {
                let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
                let r = fresh.get(&url).send().await.expect("refused before the signal");
                assert_eq!(r.status(), 200);
                ids.push(r.headers()["x-request-id"].to_str().unwrap().to_string());
            }
            ids
        }));
    }
    let mut before = Vec::new();
    for l in loads {
        before.extend(l.await.unwrap());
    }
    let signalled = Instant::now();
    gw.signal("TERM");

    // Readiness is 503 from the signal on, while the stream still flows.
    let ready = common::until_status(|| c.get(gw.admin_url("/health/ready")), |s| s == 503).await;
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["lifecycle"], "draining", "{body}");
    // New connections are refused at once, not after the drain.
    let refused = loop {
        match tokio::net::TcpStream::connect(("127.0.0.1", gw.port)).await {
            Err(e) => break e,
            Ok(_) => {
                assert!(
                    signalled.elapsed() < Duration::from_secs(1),
                    "still accepting a second after SIGTERM"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(
        gw.child.try_wait().unwrap().is_none(),
        "the process is still draining its stream"
    );

    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.expect("the stream was cut by the drain")).unwrap());
    }
    assert!(text.ends_with("data: [DONE]\n\n"), "stream cut short: {text}");
    let status = wait_exit(&mut gw.child, Duration::from_secs(5)).await;
    assert!(status.success(), "a drain ends in exit 0: {status:?}\n{}", gw.logs());
    let rows = gw.audit_rows();
    let row = rows
        .iter()
        .find(|r| r.request_id == id)
        .expect("the stream's audit row");
    assert_eq!(row.status, 200);
    assert!(row.chunks > 1, "{row:?}");
    for id in &before {
        let n = rows.iter().filter(|r| &r.request_id == id).count();
        assert_eq!(n, 1, "request {id} has {n} audit rows");
    }
}

#[tokio::test]
async fn the_grace_period_bounds_a_drain() {
    let mock = MockUpstream::start().await;
    // An answer that takes 5 s, against a 1 s grace period.
    let mut gw = Gateway::start(&sse_config(&mock), &[("r.yaml", SSE_ROUTE)]).await;
    let yaml = std::fs::read_to_string(gw.config_path())
        .unwrap()
        .replace("grace_period: 5s", "grace_period: 1s");
    std::fs::write(gw.config_path(), yaml).unwrap();
    gw.restart().await;
    let slow = tokio::spawn({
        let url = gw.url("/slow");
        async move { reqwest::Client::new().get(url).send().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let signalled = Instant::now();
    gw.signal("TERM");
    let status = wait_exit(&mut gw.child, Duration::from_secs(4)).await;
    assert!(status.success(), "{status:?}\n{}", gw.logs());
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "exit after the 1 s grace period, not before and not after Pingora's backstop: {took:?}"
    );
    assert!(slow.await.unwrap().is_err(), "the request still running was cut");
    assert!(gw.logs().contains("Grace period over"), "{}", gw.logs());
}

#[tokio::test]
async fn a_second_sigterm_stops_at_once() {
    let mock = MockUpstream::start().await;
    let mut gw = Gateway::start(&sse_config(&mock), &[("r.yaml", SSE_ROUTE)]).await;
    let slow = tokio::spawn({
        let url = gw.url("/slow");
        async move { reqwest::Client::new().get(url).send().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(gw.child.try_wait().unwrap().is_none(), "still draining its 5 s request");
    let second = Instant::now();
    gw.signal("TERM");
    let status = wait_exit(&mut gw.child, Duration::from_secs(3)).await;
    assert!(second.elapsed() < Duration::from_secs(2), "{:?}", second.elapsed());
    assert_eq!(
        status.code(),
        Some(1),
        "a forced stop is not a clean one\n{}",
        gw.logs()
    );
    assert!(slow.await.unwrap().is_err());
    assert!(gw.logs().contains("Second signal"), "{}", gw.logs());
}

/// SIGQUIT to the running process after `serve --upgrade` started: no
/// request fails during the handover, a stream that began on the old
/// process completes there, and every request has its audit row.
#[tokio::test]
async fn sigquit_hands_the_listening_socket_to_an_upgraded_process() {
    let mock = MockUpstream::start().await;
    mock.behaviour.sse_interval_ms.store(300, Ordering::SeqCst);
    let mut gw = Gateway::start(&sse_config(&mock), &[("r.yaml", SSE_ROUTE)]).await;
    let c = reqwest::Client::new();

    // A stream that began on the old process.
    let r = c.get(gw.url("/sse")).send().await.unwrap();
    let stream_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let old_stream = tokio::spawn(read_all(r));

    // Load on fresh connections throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let ids = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let load = {
        let (stop, ok, failed, ids, url) = (stop.clone(), ok.clone(), failed.clone(), ids.clone(), gw.url("/json"));
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                // A new connection each time: the one that matters during a handover.
                let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
                match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        ids.lock()
                            .push(r.headers()["x-request-id"].to_str().unwrap().to_string());
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let mut new = Command::new(bin())
        .args(["serve", "--upgrade", "-c"])
        .arg(gw.config_path())
        .env("FASTGATE_LOG", "info,fastgate=debug")
        .env("FASTGATE_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(gw.dir.path().join("new.log")).unwrap())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    gw.signal("QUIT");
    let old_status = wait_exit(&mut gw.child, Duration::from_secs(15)).await;
    let new_log = || std::fs::read_to_string(gw.dir.path().join("new.log")).unwrap_or_default();
    assert!(old_status.success(), "{old_status:?}\n{}", gw.logs());
    assert!(
        new.try_wait().unwrap().is_none(),
        "the new process keeps serving:\n{}",
        new_log()
    );
    let served_before = ok.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();

    let (text, clean) = old_stream.await.unwrap();
    assert!(
        clean && text.ends_with("data: [DONE]\n\n"),
        "the old process cut its stream: {text}"
    );
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "requests failed during the handover ({} succeeded)\nold:\n{}\nnew:\n{}",
        ok.load(Ordering::SeqCst),
        gw.logs(),
        new_log()
    );
    assert!(
        ok.load(Ordering::SeqCst) > served_before,
        "the new process answered after the old one left"
    );
    // The admin port moved to the new process too.
    let ready = common::until_status(|| c.get(gw.admin_url("/health/ready")), |s| s == 200).await;
    assert_eq!(ready.status(), 200, "{}", new_log());

    // Every answered request has exactly one audit row, from either process.
    let _ = Command::new("kill").args(["-TERM", &new.id().to_string()]).status();
    let status = wait_exit(&mut new, Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}\n{}", new_log());
    let rows = gw.audit_rows();
    let mut expected = ids.lock().clone();
    expected.push(stream_id);
    for id in &expected {
        let n = rows.iter().filter(|r| &r.request_id == id).count();
        assert_eq!(n, 1, "request {id} has {n} audit rows");
    }
}
