//! `fastgate check`, the shipped configuration, and shutdown behaviour.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Gateway, MockUpstream, bin};
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::{
    path::Path,
    process::{Command, Stdio},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

#[test]
fn check_accepts_the_shipped_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (ok, out, err) = common::check(Path::new("conf/fastgate.yaml"), root);
    assert!(ok, "{err}");
    assert!(out.starts_with("fastgate: configuration ok"), "{out}");
    assert_eq!(out.lines().count(), 1);
}

#[test]
fn check_rejects_broken_files_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.d");
    std::fs::create_dir(&routes).unwrap();
    let conf = dir.path().join("fastgate.yaml");
    std::fs::write(&conf, "server:\n  listen: 127.0.0.1:1\n  listn: typo\n").unwrap();
    let (ok, _, err) = common::check(&conf, dir.path());
    assert!(!ok);
    assert!(err.contains("fastgate.yaml:3: server: unknown field `listn`"), "{err}");

    std::fs::write(
        &conf,
        "upstreams:\n  u: {provider: openai, endpoints: ['http://127.0.0.1:9']}\n",
    )
    .unwrap();
    std::fs::write(
        routes.join("a.yaml"),
        "routes:\n  - name: ok\n    match: {path: /a}\n    upstream: u\n",
    )
    .unwrap();
    std::fs::write(routes.join("b.yaml"), "routes:\n  - name: fine\n    match: {path: /b}\n    upstream: u\n  - name: bad\n    match: {path: /c}\n    upstream: missing\n").unwrap();
    std::fs::write(routes.join("c.yaml"), "routes:\n  - name: x\n    match: {path: /x\n").unwrap();
    let (ok, _, err) = common::check(&conf, dir.path());
    assert!(!ok);
    assert!(
        err.contains("b.yaml:5: route \"bad\": no upstream named \"missing\""),
        "{err}"
    );
    assert!(err.contains("c.yaml:"), "YAML syntax errors are reported too: {err}");
    assert!(err.contains("2 error(s)"), "{err}");

    std::fs::remove_file(routes.join("b.yaml")).unwrap();
    std::fs::remove_file(routes.join("c.yaml")).unwrap();
    let (ok, out, err) = common::check(&conf, dir.path());
    assert!(ok, "{err}");
    assert!(out.contains("1 routes in 1 files"), "{out}");
}

#[test]
fn missing_environment_variables_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("routes.d")).unwrap();
    let conf = dir.path().join("fastgate.yaml");
    std::fs::write(&conf, "server:\n  listen: ${FASTGATE_TEST_SURELY_UNSET}\n").unwrap();
    let (ok, _, err) = common::check(&conf, dir.path());
    assert!(!ok);
    assert!(
        err.contains("fastgate.yaml:2: environment variable FASTGATE_TEST_SURELY_UNSET is not set"),
        "{err}"
    );
}

/// The shipped config works offline: the mock upstream answers in all three
/// formats, streaming included, and the mock-* models route with a key.
#[tokio::test]
async fn the_shipped_config_serves_the_offline_demo() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("fastgate.log");
    let (mut child, port, _) = common::spawn_listening(&log, |port, admin_port| {
        let mut cmd = Command::new(bin());
        cmd.args(["serve"])
            .current_dir(root)
            .env("FASTGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("FASTGATE_DB", dir.path().join("fg.db"))
            .env("FASTGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
            .env_remove("OPENAI_API_KEY");
        cmd
    })
    .await;
    let base = format!("http://127.0.0.1:{port}");
    let c = reqwest::Client::new();
    let r: Value = c
        .post(format!("{base}/demo/v1/chat/completions"))
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["object"], "chat.completion");
    assert!(r["choices"][0]["message"]["content"].as_str().unwrap().contains("mock"));
    assert!(r["usage"]["total_tokens"].as_u64().unwrap() > 0);

    let text = c
        .post(format!("{base}/demo/v1/messages"))
        .json(&json!({"model": "claude", "max_tokens": 9, "stream": true, "messages": []}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert_eq!(events.first(), Some(&"message_start"));
    assert_eq!(events.last(), Some(&"message_stop"));
    for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        serde_json::from_str::<Value>(data).unwrap();
    }

    let text = c
        .post(format!(
            "{base}/demo/v1beta/models/mock-1:streamGenerateContent?alt=sse"
        ))
        .json(&json!({"contents": []}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let chunks: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks.len() > 3);
    assert_eq!(chunks.last().unwrap()["candidates"][0]["finishReason"], "STOP");

    let r = c
        .post(format!("{base}/demo/v1/chat/completions"))
        .json(&json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(r.ends_with("data: [DONE]\n\n"));
    assert!(r.contains("\"usage\""));

    // The real-provider routes need a gateway key; without OPENAI_API_KEY the
    // mock-* models still answer through model routing.
    let out = Command::new(bin())
        .args(["keys", "create", "--name", "demo", "--json"])
        .current_dir(root)
        .env("FASTGATE_DB", dir.path().join("fg.db"))
        .output()
        .unwrap();
    let secret = serde_json::from_slice::<Value>(&out.stdout).unwrap()["secret"]
        .as_str()
        .unwrap()
        .to_string();
    let chat = || {
        c.post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&secret)
            .json(&json!({"model": "mock-1", "messages": []}))
    };
    let status = common::until_status(chat, |s| s == 200).await.status().as_u16();
    assert_eq!(status, 200);
    let r = c
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&secret)
        .json(&json!({"model": "gpt-4o", "messages": []}))
        .send()
        .await
        .unwrap();
    assert!(
        matches!(r.status().as_u16(), 502 | 503),
        "a real model without a provider key: {}",
        r.status()
    );
    let body: Value = r.json().await.unwrap();
    assert!(body["error"]["message"].is_string());
    let _ = child.kill();
    let _ = child.wait();
}

/// SIGTERM lets an in-flight stream finish, then the process exits.
#[tokio::test]
async fn sigterm_drains_in_flight_streams() {
    let mock = MockUpstream::start().await;
    mock.behaviour.sse_interval_ms.store(200, Ordering::SeqCst);
    let config = format!("upstreams:\n  u: {{provider: http, endpoints: ['{}']}}\n", mock.url());
    let mut gw = Gateway::start(
        &config,
        &[(
            "r.yaml",
            "routes:\n  - { name: r, match: { path: /sse }, auth: none, upstream: u }\n",
        )],
    )
    .await;
    let r = reqwest::Client::new().get(gw.url("/sse")).send().await.unwrap();
    let mut stream = r.bytes_stream();
    stream.next().await.unwrap().unwrap();
    let sent_at = Instant::now();
    gw.signal("TERM");
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(text.ends_with("data: [DONE]\n\n"), "stream cut short: {text}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = gw.child.try_wait().unwrap() {
            assert!(
                status.success(),
                "a drain ends in a clean exit, not death by signal: {status:?}\n{}",
                gw.logs()
            );
            break;
        }
        assert!(Instant::now() < deadline, "did not exit after draining:\n{}", gw.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        sent_at.elapsed() < Duration::from_secs(5),
        "exit waited for the whole grace period"
    );
    // New connections are refused once it has stopped.
    assert!(reqwest::Client::new().get(gw.url("/sse")).send().await.is_err());
}

fn fastgate(gw: &Gateway, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let mut cmd = Command::new(bin());
    cmd.arg(args[0]).arg("-c").arg(gw.config_path()).args(&args[1..]);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn operator_commands_users_keys_logs_routes() {
    let mock = MockUpstream::start().await;
    let config = format!(
        "upstreams:\n  u: {{provider: openai, endpoints: ['{}'], key_pool: p}}\nkey_pools:\n  p: {{keys: [sk-x]}}\n",
        mock.url()
    );
    let routes = "routes:\n  - { name: chat, match: { path: /v1/chat/completions, model: ['gpt-*'] }, format: openai, upstream: u, model_map: { gpt-4: gpt-4o } }\n";
    let gw = Gateway::start(&config, &[("r.yaml", routes)]).await;

    // users add / passwd read the password from stdin; the new user can log in.
    let (ok, out, err) = fastgate(
        &gw,
        &["users", "add", "dana", "--role", "admin"],
        Some("dana-password-1\n"),
    );
    assert!(ok, "{err}");
    assert!(out.contains("added dana"));
    gw.login("dana", "dana-password-1").await;
    let (ok, _, err) = fastgate(&gw, &["users", "passwd", "dana"], Some("dana-password-2\n"));
    assert!(ok, "{err}");
    gw.login("dana", "dana-password-2").await;
    let (ok, _, err) = fastgate(&gw, &["users", "add", "eve"], Some("short\n"));
    assert!(!ok && err.contains("at least 8"), "{err}");

    // keys rotate: the old secret stops, the new one works.
    let (id, first) = gw.create_key(&[]);
    let c = reqwest::Client::new();
    let chat = |s: &str| {
        c.post(gw.url("/v1/chat/completions"))
            .bearer_auth(s.to_string())
            .json(&json!({"model": "gpt-4"}))
    };
    assert_eq!(common::until_status(|| chat(&first), |s| s == 200).await.status(), 200);
    let (ok, out, _) = fastgate(&gw, &["keys", "rotate", &id, "--json"], None);
    assert!(ok);
    let second = serde_json::from_str::<Value>(&out).unwrap()["secret"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(common::until_status(|| chat(&first), |s| s == 401).await.status(), 401);
    let r = common::until_status(|| chat(&second), |s| s == 200).await;
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_string();

    // logs query / export see the request.
    gw.wait_audit_ids([&request_id]).await;
    let (ok, out, _) = fastgate(
        &gw,
        &["logs", "query", "--route", "chat", "--status", "200", "--json"],
        None,
    );
    assert!(ok);
    let rows: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(rows.iter().any(|r| r["request_id"] == request_id.as_str()));
    let (ok, out, _) = fastgate(&gw, &["logs", "query", "--request-id", &request_id], None);
    assert!(ok && out.contains("route=chat model=gpt-4"), "{out}");
    let (ok, out, _) = fastgate(
        &gw,
        &["logs", "export", "--format", "csv", "--request-id", &request_id],
        None,
    );
    assert!(ok);
    let mut reader = csv::Reader::from_reader(out.as_bytes());
    assert_eq!(reader.records().count(), 1);

    // keys create --budget: an admin-locked budget in money that the key
    // runs into (the first answer spends past a millionth of a dollar).
    let (ok, out, err) = fastgate(
        &gw,
        &[
            "keys",
            "create",
            "--name",
            "capped",
            "--budget",
            "0.000001",
            "--budget-period",
            "day",
            "--json",
        ],
        None,
    );
    assert!(ok, "{err}");
    let capped: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(capped["budget"], json!({"amount": 0.000001, "period": "day"}));
    assert!(
        capped["admin_locked"].as_array().unwrap().contains(&json!("budget")),
        "{capped}"
    );
    let capped = capped["secret"].as_str().unwrap().to_string();
    let r = common::until_status(|| chat(&capped), |s| s == 429).await;
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry), "{retry}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("budget"), "{body}");
    for bad in [
        &["--budget=-1"][..],
        &["--budget", "NaN"],
        &["--budget", "1e300"],
        &["--budget", "5", "--budget-period", "year"],
        &["--budget-period", "day"],
    ] {
        let args: Vec<&str> = ["keys", "create", "--name", "bad"].iter().chain(bad).copied().collect();
        let (ok, _, err) = fastgate(&gw, &args, None);
        assert!(!ok && err.contains("budget"), "{bad:?}: {err}");
    }

    // routes test: explains and exits 0 on a match, 1 without.
    let (ok, out, _) = fastgate(
        &gw,
        &["routes", "test", "/v1/chat/completions", "-d", r#"{"model":"gpt-4"}"#],
        None,
    );
    assert!(ok);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["route"], "chat");
    assert_eq!(v["upstream_request"]["body"]["model"], "gpt-4o");
    let (ok, _, _) = fastgate(
        &gw,
        &["routes", "test", "/v1/chat/completions", "-d", r#"{"model":"claude"}"#],
        None,
    );
    assert!(!ok);
}

/// `-c` is a global option: before the command, between command and
/// action, or after the action's own options, as operators type it.
#[test]
fn the_config_option_is_accepted_anywhere_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("routes.d")).unwrap();
    let cfg = dir.path().join("fastgate.yaml");
    std::fs::write(
        &cfg,
        format!(
            "database:\n  path: {}\nroutes_dir: {}\n",
            dir.path().join("fg.db").display(),
            dir.path().join("routes.d").display()
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(bin()).args(args).current_dir(dir.path()).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&["-c", cfg, "keys", "create", "--name", "before"]);
    run(&["keys", "-c", cfg, "create", "--name", "between"]);
    run(&["keys", "create", "--name", "after", "-c", cfg]);
    let listed: Value = serde_json::from_str(&run(&["keys", "list", "--json", "--config", cfg])).unwrap();
    let mut names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["after", "before", "between"],
        "all three reached the same database"
    );
    assert!(run(&["check", "-c", cfg]).contains("configuration ok"));
}

#[test]
fn version_and_shell_completions_print() {
    let out = Command::new(bin()).arg("version").output().unwrap();
    let version = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success());
    assert!(
        version.starts_with(&format!("fastgate {} (", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef fastgate"),
        ("fish", "complete -c fastgate"),
    ] {
        let out = Command::new(bin()).args(["completions", shell]).output().unwrap();
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && script.contains(marker),
            "{shell}: {script:.200}"
        );
        assert!(script.contains("keys"), "{shell}: the subcommands are in the script");
    }
    let out = Command::new(bin()).args(["completions", "tcsh"]).output().unwrap();
    assert!(!out.status.success(), "an unknown shell is refused");
}
