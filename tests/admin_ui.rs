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

/// The routes page edits a route as YAML: problems come back with their
/// line in the text the editor sent.
#[tokio::test]
async fn a_route_edited_as_yaml_reports_problems_at_their_line() {
    let gw = ui_gateway().await;
    let token = gw.login("admin", common::ADMIN_PASSWORD).await;
    let c = reqwest::Client::new();
    let yaml = c
        .get(gw.admin_url("/api/routes/r/yaml"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(yaml.status(), 200);
    assert_eq!(yaml.headers()["content-type"], "application/yaml");
    let text = yaml.text().await.unwrap();
    assert!(text.starts_with("routes:") && text.contains("name: r"), "{text}");

    let put = |body: String| {
        c.put(gw.admin_url("/api/routes/r/yaml"))
            .bearer_auth(&token)
            .header("content-type", "application/yaml")
            .body(body)
            .send()
    };
    // An unknown upstream, reported at the route's line...
    let bad = "routes:\n  - name: r\n    match: { path: '/{*rest}' }\n    auth: none\n    upstream: nowhere\n";
    let r = put(bad.into()).await.unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    let d = &body["error"]["diagnostics"][0];
    assert_eq!(d["line"], 2, "{body}");
    assert!(d["message"].as_str().unwrap().contains("nowhere"), "{body}");
    // ...an unknown field at its own line, and nothing written meanwhile.
    let typo =
        "routes:\n  - name: r\n    match: { path: '/{*rest}' }\n    auth: none\n    upstream: u\n    retires: 2\n";
    let body: serde_json::Value = put(typo.into()).await.unwrap().json().await.unwrap();
    assert_eq!(body["error"]["diagnostics"][0]["line"], 6, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("retires"), "{body}");
    assert_eq!(
        reqwest::get(gw.url("/json")).await.unwrap().status(),
        200,
        "still served"
    );

    // A good edit is written and served: here it turns the route off.
    let off = text.replace("enabled: true", "enabled: false");
    assert_ne!(off, text);
    let r = put(off).await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let status = common::until_status(|| c.get(gw.url("/json")), |s| s == 404)
        .await
        .status();
    assert_eq!(status, 404);
}
