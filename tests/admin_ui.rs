//! The embedded web UI as the admin port serves it: the app for every UI
//! path, hashed assets cached for good and pre-compressed, a strict CSP, and
//! API paths never answered with the app.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Gateway, MockUpstream};

async fn ui_gateway() -> Gateway {
    let mock = MockUpstream::start().await;
    let config = format!("upstreams:\n  u: {{provider: http, endpoints: ['{}']}}\n", mock.url());
    Gateway::start(
        &config,
        &[(
            "r.yaml",
            "routes:\n  - { name: r, match: { path: '/{*rest}' }, auth: none, upstream: u }\n",
        )],
    )
    .await
}

#[tokio::test]
async fn the_app_is_served_at_every_ui_path_with_a_strict_policy() {
    let gw = ui_gateway().await;
    let c = reqwest::Client::new();
    let mut script = String::new();
    for path in ["/", "/pools", "/keys/k_1234"] {
        let r = c.get(gw.admin_url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
        assert_eq!(r.headers()["cache-control"], "no-cache", "index.html is never cached");
        let csp = r.headers()["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"),
            "{csp}"
        );
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
        let html = r.text().await.unwrap();
        assert!(html.contains(r#"<div id="app">"#), "{html}");
        assert!(!html.contains("<script>"), "no inline script: {html}");
        script = html
            .split(r#"src=""#)
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap()
            .to_string();
    }
    assert!(
        script.starts_with("/assets/index-") && script.ends_with(".js"),
        "{script}"
    );

    // The hashed script: cached for a year, brotli or gzip when accepted.
    for (accept, encoding) in [("br, gzip", Some("br")), ("gzip", Some("gzip")), ("identity", None)] {
        let r = c
            .get(gw.admin_url(&script))
            .header("accept-encoding", accept)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["cache-control"], "public, max-age=31536000, immutable");
        assert!(r.headers()["content-type"].to_str().unwrap().contains("javascript"));
        assert_eq!(
            r.headers().get("content-encoding").map(|v| v.to_str().unwrap()),
            encoding,
            "{accept}"
        );
        assert_eq!(r.headers()["vary"], "accept-encoding");
        let body = r.bytes().await.unwrap();
        if encoding.is_none() {
            assert!(body.len() > 10_000, "the plain script");
        }
    }
    // The whole first load stays within budget (150 KB compressed).
    let mut total = 0;
    for path in ["/", script.as_str()] {
        total += c
            .get(gw.admin_url(path))
            .header("accept-encoding", "br")
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .len();
    }
    assert!(total < 150_000, "first load is {total} bytes");
}

#[tokio::test]
async fn api_paths_and_missing_files_are_not_the_app() {
    let gw = ui_gateway().await;
    let c = reqwest::Client::new();
    let r = c.get(gw.admin_url("/api/no-such-endpoint")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/api/no-such-endpoint"),
        "{body}"
    );
    assert_eq!(
        c.get(gw.admin_url("/assets/index-gone.js"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(c.post(gw.admin_url("/pools")).send().await.unwrap().status(), 405);
    // The API and health endpoints answer as before.
    assert_eq!(c.get(gw.admin_url("/health")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(gw.admin_url("/api/me")).send().await.unwrap().status(), 401);
}
