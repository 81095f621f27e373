//! The admin API against the real server: login and throttling, who may see
//! what, gateway keys taking effect on the data plane at once, the admin
//! audit trail, and no secret in any answer.
#![allow(clippy::unwrap_used)]

mod common;

use common::{ADMIN_PASSWORD, Gateway, MockUpstream};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn gateway() -> (MockUpstream, Gateway) {
    let mock = MockUpstream::start().await;
    let config = format!(
        "admin:\n  token: static-admin-token-for-tests-0123456789abcdef\nupstreams:\n  oai: {{provider: openai, endpoints: ['{}'], key_pool: p}}\nkey_pools:\n  p: {{keys: [sk-upstream-secret]}}\n",
        mock.url()
    );
    let gw = Gateway::start_with_admin(
        &config,
        &[(
            "r.yaml",
            "routes:\n  - { name: chat, match: { path: /v1/chat/completions }, format: openai, upstream: oai }\n",
        )],
    )
    .await;
    (mock, gw)
}

struct Api {
    base: String,
    token: String,
    c: reqwest::Client,
}

impl Api {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = self
            .c
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }
    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }
    async fn patch(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::PATCH, path, Some(body)).await
    }
    async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::DELETE, path, None).await
    }
}

async fn as_user(gw: &Gateway, username: &str, password: &str) -> Api {
    Api {
        base: gw.admin_url(""),
        token: gw.login(username, password).await,
        c: reqwest::Client::new(),
    }
}

#[tokio::test]
async fn login_works_fails_and_is_throttled() {
    let (_mock, gw) = gateway().await;
    let c = reqwest::Client::new();
    let login = |u: &str, p: &str| {
        c.post(gw.admin_url("/api/auth/login"))
            .json(&json!({"username": u, "password": p}))
            .send()
    };
    let r = login("admin", ADMIN_PASSWORD).await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert!(body["token"].as_str().unwrap().split('.').count() == 3, "a JWT");
    assert!(body["expires_at"].as_i64().unwrap() > 0);
    assert!(body["user"].get("password_hash").is_none());

    let r = login("admin", "wrong-password").await.unwrap();
    assert_eq!(r.status(), 401);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["code"], "invalid_credentials");
    for _ in 0..4 {
        login("admin", "wrong-password").await.unwrap();
    }
    let r = login("admin", ADMIN_PASSWORD).await.unwrap();
    assert_eq!(r.status(), 429, "locked after 5 failures even with the right password");
    assert!(r.headers().contains_key("retry-after"));

    let r = c.get(gw.admin_url("/api/me")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .get(gw.admin_url("/api/me"))
        .bearer_auth("not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .get(gw.admin_url("/api/me"))
        .bearer_auth("static-admin-token-for-tests-0123456789abcdef")
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["role"], "admin");
    assert!(!gw.logs().contains(ADMIN_PASSWORD) && !gw.logs().contains("wrong-password"));
}

#[tokio::test]
async fn users_see_only_their_own_keys_and_logs_admins_see_all() {
    let (_mock, gw) = gateway().await;
    let admin = as_user(&gw, "admin", ADMIN_PASSWORD).await;
    for name in ["alice", "bob"] {
        let (s, u) = admin
            .post(
                "/api/users",
                json!({"username": name, "password": format!("{name}-password")}),
            )
            .await;
        assert_eq!(s, 201, "{u}");
        assert_eq!(u["role"], "user");
    }
    let alice = as_user(&gw, "alice", "alice-password").await;
    let bob = as_user(&gw, "bob", "bob-password").await;
    assert_eq!(alice.get("/api/users").await.0, 403);
    assert_eq!(
        alice
            .post("/api/users", json!({"username": "eve", "password": "eve-password"}))
            .await
            .0,
        403
    );

    let (s, key) = alice.post("/api/keys", json!({"name": "alice-app"})).await;
    assert_eq!(s, 201);
    let (id, secret) = (
        key["id"].as_str().unwrap().to_string(),
        key["secret"].as_str().unwrap().to_string(),
    );
    assert_eq!(key["owner"], "alice");
    assert_eq!(
        bob.post("/api/keys", json!({"name": "x", "owner": "alice"})).await.0,
        403
    );

    // The key works on the data plane immediately.
    let c = reqwest::Client::new();
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&secret)
        .json(&json!({"model": "m"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    assert_eq!(bob.get(&format!("/api/keys/{id}")).await.0, 404);
    assert_eq!(
        bob.patch(&format!("/api/keys/{id}"), json!({"enabled": false})).await.0,
        404
    );
    assert_eq!(bob.delete(&format!("/api/keys/{id}")).await.0, 404);
    assert_eq!(bob.get("/api/keys").await.1.as_array().unwrap().len(), 0);
    assert_eq!(alice.get("/api/keys").await.1.as_array().unwrap().len(), 1);
    assert!(!admin.get("/api/keys").await.1.as_array().unwrap().is_empty());

    // Logs: alice sees her request; bob sees none of it; admin sees it.
    let mut alice_logs = Value::Null;
    for _ in 0..50 {
        alice_logs = alice.get("/api/logs").await.1;
        if !alice_logs["items"].as_array().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let item = &alice_logs["items"][0];
    assert_eq!(item["key_id"], id.as_str());
    let log_id = item["id"].as_i64().unwrap();
    assert!(bob.get("/api/logs").await.1["items"].as_array().unwrap().is_empty());
    assert_eq!(bob.get(&format!("/api/logs/{log_id}")).await.0, 404);
    assert_eq!(admin.get(&format!("/api/logs/{log_id}")).await.0, 200);
    let (s, filtered) = admin.get(&format!("/api/logs?key_id={id}&status=200&limit=5")).await;
    assert_eq!(s, 200);
    assert_eq!(filtered["items"].as_array().unwrap().len(), 1);
    assert_eq!(admin.get("/api/logs?nonsense=1").await.0, 400);

    // Usage from the audit log.
    let (_, usage) = alice.get(&format!("/api/keys/{id}/usage")).await;
    assert_eq!(usage["requests"], 1);
    assert_eq!(usage["prompt_tokens"], 9);

    // Users change their own password but not their role.
    let alice_id = admin
        .get("/api/users")
        .await
        .1
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["username"] == "alice")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        alice
            .patch(&format!("/api/users/{alice_id}"), json!({"role": "admin"}))
            .await
            .0,
        403
    );
    let own = format!("/api/users/{alice_id}");
    let (s, e) = alice.patch(&own, json!({"password": "alice-new-password"})).await;
    assert_eq!(s, 400, "the current password is required: {e}");
    let (s, _) = alice
        .patch(
            &own,
            json!({"password": "alice-new-password", "current_password": "guess-guess"}),
        )
        .await;
    assert_eq!(s, 403);
    let (s, _) = alice
        .patch(
            &own,
            json!({"password": "alice-new-password", "current_password": "alice-password"}),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(alice.get("/api/me").await.0, 401, "a password change ends old sessions");
    gw.login("alice", "alice-new-password").await;
    // An admin reset ends the user's sessions too.
    let alice = as_user(&gw, "alice", "alice-new-password").await;
    assert_eq!(
        admin.patch(&own, json!({"password": "alice-reset-password"})).await.0,
        200
    );
    assert_eq!(alice.get("/api/me").await.0, 401);
}

async fn user_id(admin: &Api, name: &str) -> String {
    let (_, users) = admin.get("/api/users").await;
    users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["username"] == name)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn chat_status(gw: &Gateway, secret: &str) -> u16 {
    let r = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(secret)
        .json(&json!({"model": "m", "messages": []}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let _ = r.bytes().await;
    status
}

#[tokio::test]
async fn user_keys_stay_within_ceilings_and_admin_set_limits() {
    let (_mock, gw) = gateway().await;
    let admin = as_user(&gw, "admin", ADMIN_PASSWORD).await;
    let ceilings = json!({"permissions": ["chat"], "routes": ["chat"], "max_rpm": 100, "token_quota": 25});
    let (s, u) = admin
        .post(
            "/api/users",
            json!({"username": "carol", "password": "carol-password", "ceilings": ceilings}),
        )
        .await;
    assert_eq!(s, 201, "{u}");
    assert_eq!(u["ceilings"]["max_rpm"], 100);
    let carol = as_user(&gw, "carol", "carol-password").await;

    // Creation within the ceilings only; open limits take the ceiling's value.
    let (s, e) = carol
        .post("/api/keys", json!({"name": "k", "permissions": ["admin"]}))
        .await;
    assert_eq!(s, 403, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("permissions"), "{e}");
    assert_eq!(carol.post("/api/keys", json!({"name": "k", "rpm": 1000})).await.0, 403);
    assert_eq!(
        carol
            .post("/api/keys", json!({"name": "k", "allowed_routes": ["other"]}))
            .await
            .0,
        403
    );
    let (s, k1) = carol.post("/api/keys", json!({"name": "k1"})).await;
    assert_eq!(s, 201, "{k1}");
    assert_eq!(k1["rpm"], 100);
    assert_eq!(k1["allowed_routes"], json!(["chat"]));
    let (_, k2) = carol.post("/api/keys", json!({"name": "k2", "rpm": 50})).await;
    let (k1_id, k1_secret) = (k1["id"].as_str().unwrap(), k1["secret"].as_str().unwrap());
    let k2_secret = k2["secret"].as_str().unwrap();
    // Nor can she lift a key's limit above her ceiling later.
    assert_eq!(
        carol.patch(&format!("/api/keys/{k1_id}"), json!({"rpm": 1000})).await.0,
        403
    );

    // A limit an admin set is not hers to change, even downwards.
    assert_eq!(
        admin
            .patch(&format!("/api/keys/{k1_id}"), json!({"tpm": 100000}))
            .await
            .0,
        200
    );
    let (s, e) = carol.patch(&format!("/api/keys/{k1_id}"), json!({"tpm": null})).await;
    assert_eq!(s, 403, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("admin"), "{e}");
    assert_eq!(
        carol
            .patch(&format!("/api/keys/{k1_id}"), json!({"name": "renamed"}))
            .await
            .0,
        200
    );

    // The user's token quota is shared by all her keys: 10 tokens a call.
    assert_eq!(chat_status(&gw, k1_secret).await, 200);
    assert_eq!(chat_status(&gw, k2_secret).await, 200);
    assert_eq!(chat_status(&gw, k1_secret).await, 200);
    // A call is charged as its answer ends, just after the client has it;
    // its audit row is written after the charge. Wait for the third.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let hers = [Some(k1_id), k2["id"].as_str()];
    while gw
        .audit_rows()
        .iter()
        .filter(|r| r.status == 200 && hers.contains(&r.key_id.as_deref()))
        .count()
        < 3
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the three calls were never recorded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        chat_status(&gw, k2_secret).await,
        429,
        "30 of 25 tokens used by her two keys"
    );

    // Ceilings clamp keys at run time, admin-made ones too.
    let dave_ceilings = json!({"max_rpm": 2});
    admin
        .post(
            "/api/users",
            json!({"username": "dave", "password": "dave-password", "ceilings": dave_ceilings}),
        )
        .await;
    let (s, k) = admin
        .post("/api/keys", json!({"name": "d", "owner": "dave", "rpm": 100}))
        .await;
    assert_eq!(s, 201, "{k}");
    let secret = k["secret"].as_str().unwrap();
    let statuses = [
        chat_status(&gw, secret).await,
        chat_status(&gw, secret).await,
        chat_status(&gw, secret).await,
    ];
    assert_eq!(statuses, [200, 200, 429]);
}

#[tokio::test]
async fn disabling_or_deleting_a_user_stops_their_keys_and_sessions_at_once() {
    let (_mock, gw) = gateway().await;
    let admin = as_user(&gw, "admin", ADMIN_PASSWORD).await;
    admin
        .post("/api/users", json!({"username": "erin", "password": "erin-password"}))
        .await;
    let erin_id = user_id(&admin, "erin").await;
    let erin = as_user(&gw, "erin", "erin-password").await;
    let (_, key) = erin.post("/api/keys", json!({"name": "erin-app"})).await;
    let secret = key["secret"].as_str().unwrap().to_string();
    assert_eq!(chat_status(&gw, &secret).await, 200);

    assert_eq!(
        admin
            .patch(&format!("/api/users/{erin_id}"), json!({"disabled": true}))
            .await
            .0,
        200
    );
    assert_eq!(
        chat_status(&gw, &secret).await,
        401,
        "a disabled user's keys stop at once"
    );
    assert_eq!(erin.get("/api/me").await.0, 401);
    let r = reqwest::Client::new()
        .post(gw.admin_url("/api/auth/login"))
        .json(&json!({"username": "erin", "password": "erin-password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        admin
            .patch(&format!("/api/users/{erin_id}"), json!({"disabled": false}))
            .await
            .0,
        200
    );
    assert_eq!(chat_status(&gw, &secret).await, 200);

    let erin = as_user(&gw, "erin", "erin-password").await;
    assert_eq!(admin.delete(&format!("/api/users/{erin_id}")).await.0, 204);
    assert_eq!(
        chat_status(&gw, &secret).await,
        401,
        "a deleted user's keys stop at once"
    );
    assert_eq!(erin.get("/api/me").await.0, 401);

    // A new user with the same name inherits nothing.
    admin
        .post("/api/users", json!({"username": "erin", "password": "erin-password-2"}))
        .await;
    let new_erin = as_user(&gw, "erin", "erin-password-2").await;
    assert!(new_erin.get("/api/keys").await.1.as_array().unwrap().is_empty());
    assert!(
        new_erin.get("/api/logs").await.1["items"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(chat_status(&gw, &secret).await, 401);

    let conn = fastgate::store::open(&gw.db_path()).unwrap();
    let after: String = conn
        .query_row(
            "SELECT after FROM admin_audit WHERE action = 'user.delete' AND target = ?1",
            [&erin_id],
            |r| r.get(0),
        )
        .unwrap();
    assert!(after.contains("\"keys_revoked\":1"), "{after}");
}

#[tokio::test]
async fn login_throttling_counts_parallel_guesses_and_cannot_lock_admin_out() {
    let (_mock, gw) = gateway().await;
    let c = reqwest::Client::new();
    let guesses = (0..15).map(|i| {
        c.post(gw.admin_url("/api/auth/login"))
            .json(&json!({"username": "admin", "password": format!("guess-{i}")}))
            .send()
    });
    let statuses: Vec<u16> = futures_util::future::join_all(guesses)
        .await
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    let tried = statuses.iter().filter(|s| **s == 401).count();
    assert!(tried <= 5, "parallel guesses past the limit were checked: {statuses:?}");
    assert!(statuses.iter().all(|s| *s == 401 || *s == 429), "{statuses:?}");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    // The attacker's address is locked out; the real admin elsewhere is not.
    let from = |ip: [u8; 4]| {
        reqwest::Client::builder()
            .local_address(std::net::IpAddr::from(ip))
            .build()
            .unwrap()
            .post(gw.admin_url("/api/auth/login"))
            .json(&json!({"username": "admin", "password": ADMIN_PASSWORD}))
            .send()
    };
    assert_eq!(from([127, 0, 0, 1]).await.unwrap().status(), 429);
    assert_eq!(from([127, 0, 0, 2]).await.unwrap().status(), 200);
}

#[tokio::test]
async fn audit_writes_do_not_make_the_key_cache_reload() {
    let (_mock, gw) = gateway().await;
    let (_, secret) = gw.create_key(&[]);
    gw.wait_key(&secret, "/v1/chat/completions").await;
    let before = gw.logs().matches("Gateway keys reloaded").count();
    for _ in 0..15 {
        assert_eq!(chat_status(&gw, &secret).await, 200);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Every row is written (the writer commits) before counting.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    assert_eq!(
        gw.logs().matches("Gateway keys reloaded").count(),
        before,
        "{}",
        gw.logs()
    );
}

#[tokio::test]
async fn key_changes_reach_the_data_plane_at_once() {
    let (mock, gw) = gateway().await;
    let admin = as_user(&gw, "admin", ADMIN_PASSWORD).await;
    let c = reqwest::Client::new();
    let chat = |secret: &str| {
        c.post(gw.url("/v1/chat/completions"))
            .bearer_auth(secret)
            .json(&json!({"model": "m"}))
            .send()
    };
    let (_, key) = admin
        .post("/api/keys", json!({"name": "svc", "permissions": ["chat"]}))
        .await;
    let id = key["id"].as_str().unwrap().to_string();
    let first = key["secret"].as_str().unwrap().to_string();
    assert_eq!(chat(&first).await.unwrap().status(), 200);

    // Disable: refused at once (the admin API refreshes the data plane's cache).
    assert_eq!(
        admin
            .patch(&format!("/api/keys/{id}"), json!({"enabled": false}))
            .await
            .0,
        200
    );
    assert_eq!(chat(&first).await.unwrap().status(), 401);
    assert_eq!(
        admin
            .patch(&format!("/api/keys/{id}"), json!({"enabled": true}))
            .await
            .0,
        200
    );
    assert_eq!(chat(&first).await.unwrap().status(), 200);

    // Rotate without grace: the old secret stops, the new one works.
    let (s, rotated) = admin.post(&format!("/api/keys/{id}/rotate"), json!({})).await;
    assert_eq!(s, 200);
    let second = rotated["secret"].as_str().unwrap().to_string();
    assert_ne!(first, second);
    assert_eq!(chat(&first).await.unwrap().status(), 401);
    assert_eq!(chat(&second).await.unwrap().status(), 200);
    // Rotate with grace: both work for now.
    let (_, rotated) = admin
        .post(&format!("/api/keys/{id}/rotate"), json!({"grace_period": "10m"}))
        .await;
    let third = rotated["secret"].as_str().unwrap().to_string();
    assert_eq!(chat(&second).await.unwrap().status(), 200);
    assert_eq!(chat(&third).await.unwrap().status(), 200);

    // Expire in the past: refused at once. Delete: refused at once.
    assert_eq!(
        admin
            .patch(&format!("/api/keys/{id}"), json!({"expires_at": 1}))
            .await
            .0,
        200
    );
    assert_eq!(chat(&third).await.unwrap().status(), 401);
    assert_eq!(
        admin
            .patch(&format!("/api/keys/{id}"), json!({"expires_at": null}))
            .await
            .0,
        200
    );
    assert_eq!(chat(&third).await.unwrap().status(), 200);
    assert_eq!(admin.delete(&format!("/api/keys/{id}")).await.0, 204);
    assert_eq!(chat(&third).await.unwrap().status(), 401);
    assert_eq!(admin.get(&format!("/api/keys/{id}")).await.0, 404);

    // The admin audit trail has every write, with no secret in it.
    let (_, events) = admin.get("/api/audit").await;
    let actions: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for a in ["key.create", "key.update", "key.rotate", "key.delete", "user.bootstrap"] {
        assert!(actions.contains(&a), "{a} missing from {actions:?}");
    }
    let everything = format!("{events} {}", admin.get("/api/keys").await.1);
    for s in [&first, &second, &third] {
        assert!(
            !everything.contains(s.as_str()),
            "a key secret leaked into the admin API"
        );
    }
    assert!(!everything.contains("sk-upstream-secret"));
    assert_eq!(mock.seen().len(), 6);
}

#[tokio::test]
async fn routes_written_through_the_api_change_files_and_the_live_table() {
    let (mock, gw) = gateway().await;
    let admin = as_user(&gw, "admin", ADMIN_PASSWORD).await;
    let c = reqwest::Client::new();
    let files = || {
        let mut f: Vec<String> = std::fs::read_dir(gw.routes_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        f.sort();
        f
    };
    let before = files();

    // Invalid: refused with the validator's message, nothing written.
    let (s, err) = admin
        .post(
            "/api/routes",
            json!({"name": "bad", "match": {"path": "no-slash"}, "upstream": "nowhere"}),
        )
        .await;
    assert_eq!(s, 400);
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("must start with '/'") && msg.contains("no upstream named \"nowhere\""),
        "{msg}"
    );
    assert_eq!(files(), before);

    // Create: a new file, live at once.
    let route = json!({"name": "open", "match": {"path": "/open/{*rest}"}, "auth": "none", "upstream": "oai", "transform": {"strip_prefix": "/open"}});
    let (s, created) = admin.post("/api/routes", route.clone()).await;
    assert_eq!(s, 201, "{created}");
    assert_eq!(created["file"], "open.yaml");
    assert!(files().contains(&"open.yaml".to_string()));
    assert_eq!(c.get(gw.url("/open/v1/models")).send().await.unwrap().status(), 200);
    assert_eq!(mock.last().uri, "/v1/models");
    assert_eq!(admin.post("/api/routes", route).await.0, 409);

    // Update a route that lives in an operator's file.
    let (s, _) = admin.call(reqwest::Method::PUT, "/api/routes/chat", Some(json!({"name": "chat", "match": {"path": "/v2/chat"}, "format": "openai", "upstream": "oai", "auth": "none"}))).await;
    assert_eq!(s, 200);
    assert_eq!(
        c.post(gw.url("/v2/chat"))
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        c.post(gw.url("/v1/chat/completions"))
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let text = std::fs::read_to_string(gw.routes_dir().join("r.yaml")).unwrap();
    assert!(text.contains("/v2/chat"), "{text}");

    // Toggle off and on.
    let (_, toggled) = admin.post("/api/routes/open/toggle", json!({})).await;
    assert_eq!(toggled["enabled"], false);
    assert_eq!(c.get(gw.url("/open/v1/models")).send().await.unwrap().status(), 404);
    admin.post("/api/routes/open/toggle", json!({})).await;
    assert_eq!(c.get(gw.url("/open/v1/models")).send().await.unwrap().status(), 200);

    // Dry run.
    let (s, t) = admin
        .post(
            "/api/routes/test",
            json!({"method": "GET", "path": "/open/v1/models?x=1", "headers": {"authorization": "Bearer fg_whatever"}}),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(t["route"], "open");
    assert_eq!(t["upstream_request"]["path"], "/v1/models?x=1");
    assert_eq!(t["upstream_request"]["headers"]["authorization"], "<pool key>");
    let (_, miss) = admin.post("/api/routes/test", json!({"path": "/nothing"})).await;
    assert_eq!(miss["matched"], false);

    // Delete: the file goes when its last route goes.
    assert_eq!(admin.delete("/api/routes/open").await.0, 204);
    assert!(!files().contains(&"open.yaml".to_string()));
    assert_eq!(c.get(gw.url("/open/v1/models")).send().await.unwrap().status(), 404);
    assert_eq!(admin.delete("/api/routes/open").await.0, 404);
    let (_, events) = admin.get("/api/audit").await;
    let actions: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for a in ["route.create", "route.update", "route.toggle", "route.delete"] {
        assert!(actions.contains(&a), "{a} missing");
    }
    // Users may not touch routes.
    admin
        .post("/api/users", json!({"username": "carol", "password": "carol-password"}))
        .await;
    let carol = as_user(&gw, "carol", "carol-password").await;
    assert_eq!(carol.get("/api/routes").await.0, 403);
}

#[tokio::test]
async fn exports_stats_and_live_state() {
    let (_mock, gw) = gateway().await;
    let admin = as_user(&gw, "admin", ADMIN_PASSWORD).await;
    let (_, key) = admin.post("/api/keys", json!({"name": "exp"})).await;
    let secret = key["secret"].as_str().unwrap().to_string();
    let c = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..25 {
        let r = c
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(&secret)
            .json(&json!({"model": "m", "stream": i % 3 == 0}))
            .send()
            .await
            .unwrap();
        ids.push(r.headers()["x-request-id"].to_str().unwrap().to_string());
        let _ = r.bytes().await;
    }
    gw.wait_audit_ids(&ids).await;
    let key_id = key["id"].as_str().unwrap();

    // The API view, page by page (keyset cursor).
    let mut api_rows = Vec::new();
    let mut cursor: Option<i64> = None;
    loop {
        let q = match cursor {
            Some(c) => format!("/api/logs?key_id={key_id}&limit=10&cursor={c}"),
            None => format!("/api/logs?key_id={key_id}&limit=10"),
        };
        let (_, page) = admin.get(&q).await;
        api_rows.extend(page["items"].as_array().unwrap().clone());
        match page["next_cursor"].as_i64() {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(api_rows.len(), 25);

    let ndjson = c
        .get(gw.admin_url(&format!("/api/logs/export?format=ndjson&key_id={key_id}")))
        .bearer_auth(&admin.token)
        .send()
        .await
        .unwrap();
    assert_eq!(ndjson.headers()["content-type"], "application/x-ndjson");
    let ndjson: Vec<Value> = ndjson
        .text()
        .await
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ndjson, api_rows, "NDJSON parses back to the same rows");

    let csv_text = c
        .get(gw.admin_url(&format!("/api/logs/export?format=csv&key_id={key_id}")))
        .bearer_auth(&admin.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut reader = csv::Reader::from_reader(csv_text.as_bytes());
    let headers = reader.headers().unwrap().clone();
    let records: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
    assert_eq!(records.len(), 25);
    for (rec, row) in records.iter().zip(&api_rows) {
        for (h, v) in headers.iter().zip(rec.iter()) {
            let want = match &row[h] {
                Value::Null => String::new(),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            assert_eq!(v, want, "column {h}");
        }
    }

    let (_, summary) = admin.get("/api/stats/summary?window=1h").await;
    assert!(summary["requests"].as_i64().unwrap() >= 25);
    assert!(summary["p50_ms"].as_f64().unwrap() <= summary["p95_ms"].as_f64().unwrap());
    let (_, series) = admin.get("/api/stats/timeseries?bucket=minute&window=1h").await;
    let total: i64 = series["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["requests"].as_i64().unwrap())
        .sum();
    assert_eq!(total, summary["requests"].as_i64().unwrap());
    let (_, top) = admin.get("/api/stats/top?by=key").await;
    assert_eq!(top["items"][0]["value"], key_id);
    assert!(summary["p50_ttfb_ms"].as_f64().unwrap() <= summary["p95_ttfb_ms"].as_f64().unwrap());
    // One key's share (the per-key usage chart).
    let (_, mine) = admin
        .get(&format!("/api/stats/timeseries?bucket=hour&window=24h&key_id={key_id}"))
        .await;
    let mine: i64 = mine["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["requests"].as_i64().unwrap())
        .sum();
    assert_eq!(mine, 25);
    let (_, none) = admin.get("/api/stats/summary?key_id=key_nonexistent").await;
    assert_eq!(none["requests"], 0);
    assert_eq!(admin.get("/api/stats/top?by=nonsense").await.0, 400);

    let (_, ups) = admin.get("/api/upstreams").await;
    assert_eq!(ups[0]["name"], "oai");
    let (_, pool) = admin.get("/api/pools/p/keys").await;
    assert_eq!(pool[0]["totals"]["requests"], 25);
    let (_, config) = admin.get("/api/config").await;
    let everything = format!("{ups} {pool} {config}");
    assert!(
        !everything.contains("sk-upstream-secret")
            && !everything.contains("static-admin-token-for-tests-0123456789abcdef"),
        "{everything}"
    );
    assert_eq!(admin.post("/api/config/reload", json!({})).await.0, 200);
}

#[tokio::test]
async fn rate_limits_answer_429_in_the_clients_shape() {
    let mock = MockUpstream::start().await;
    let config = format!(
        "admin:\n  token: t0k3n-for-tests-0123456789abcdefghij\nupstreams:\n  oai: {{provider: openai, endpoints: ['{u}'], key_pool: p}}\n  ant: {{provider: anthropic, endpoints: ['{u}'], key_pool: p}}\nkey_pools:\n  p: {{keys: [sk-upstream-secret]}}\n",
        u = mock.url()
    );
    let routes = "routes:\n  - { name: chat, match: { path: /v1/chat/completions }, format: openai, upstream: oai }\n  - { name: messages, match: { path: /v1/messages }, format: anthropic, upstream: ant, rate_limit: { rpm: 2 } }\n";
    let gw = Gateway::start_with_admin(&config, &[("r.yaml", routes)]).await;
    let admin = as_user(&gw, "admin", ADMIN_PASSWORD).await;
    let c = reqwest::Client::new();

    // A key's own rpm.
    let (_, key) = admin.post("/api/keys", json!({"name": "limited", "rpm": 3})).await;
    let secret = key["secret"].as_str().unwrap().to_string();
    for _ in 0..3 {
        let r = c
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(&secret)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&secret)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    let seen = mock.seen().len();
    assert_eq!(seen, 3, "refused requests never reach the upstream");

    // A route's per-key rpm, in the Anthropic shape; another key is not affected.
    let (_, other) = admin.post("/api/keys", json!({"name": "other"})).await;
    let other = other["secret"].as_str().unwrap().to_string();
    for _ in 0..2 {
        assert_eq!(
            c.post(gw.url("/v1/messages"))
                .header("x-api-key", &other)
                .json(&json!({}))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let r = c
        .post(gw.url("/v1/messages"))
        .header("x-api-key", &other)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(
        c.post(gw.url("/v1/chat/completions"))
            .bearer_auth(&other)
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // Tokens per minute: the upstream reports 10 tokens per answer.
    let (_, tk) = admin.post("/api/keys", json!({"name": "tokens", "tpm": 10})).await;
    let tk = tk["secret"].as_str().unwrap().to_string();
    assert_eq!(
        c.post(gw.url("/v1/chat/completions"))
            .bearer_auth(&tk)
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = common::until_status(
        || c.post(gw.url("/v1/chat/completions")).bearer_auth(&tk).json(&json!({})),
        |s| s == 429,
    )
    .await;
    assert_eq!(r.status(), 429);

    let metrics = c
        .get(gw.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("fastgate_rate_limited_total{route=\"messages\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn token_quotas_count_the_audit_log_and_reset_by_period() {
    let (_mock, gw) = gateway().await;
    let admin = as_user(&gw, "admin", ADMIN_PASSWORD).await;
    let c = reqwest::Client::new();
    let chat = |s: &str| {
        c.post(gw.url("/v1/chat/completions"))
            .bearer_auth(s.to_string())
            .json(&json!({}))
            .send()
    };

    // Quota from the start: 10 tokens per answer, 15 per day.
    let (_, key) = admin
        .post(
            "/api/keys",
            json!({"name": "q", "token_quota": 15, "quota_period": "day"}),
        )
        .await;
    assert_eq!(key["quota_period"], "day");
    let secret = key["secret"].as_str().unwrap().to_string();
    assert_eq!(chat(&secret).await.unwrap().status(), 200);
    let r = common::until_status(
        || {
            c.post(gw.url("/v1/chat/completions"))
                .bearer_auth(&secret)
                .json(&json!({}))
        },
        |s| s == 429,
    )
    .await;
    assert_eq!(r.status(), 429, "20 tokens used of 15");
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry <= 86_400);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("token quota per day"),
        "{body}"
    );

    // A quota added later counts what the audit log already holds.
    let (_, key) = admin.post("/api/keys", json!({"name": "later"})).await;
    let (id, later) = (
        key["id"].as_str().unwrap().to_string(),
        key["secret"].as_str().unwrap().to_string(),
    );
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = chat(&later).await.unwrap();
        ids.push(r.headers()["x-request-id"].to_str().unwrap().to_string());
    }
    gw.wait_audit_ids(&ids).await;
    assert_eq!(
        admin
            .patch(
                &format!("/api/keys/{id}"),
                json!({"token_quota": 25, "quota_period": "month"})
            )
            .await
            .0,
        200
    );
    assert_eq!(
        chat(&later).await.unwrap().status(),
        429,
        "30 tokens in the audit log already exceed 25"
    );
    assert_eq!(
        admin
            .patch(&format!("/api/keys/{id}"), json!({"token_quota": null}))
            .await
            .0,
        200
    );
    assert_eq!(chat(&later).await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_long_stats_query_does_not_hold_up_the_rest_of_the_admin_api() {
    let (_mock, gw) = gateway().await;
    // A million audit rows over the last 30 days, written straight into the database.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let conn = fastgate::store::open(&gw.db_path()).unwrap();
    conn.execute_batch(&format!(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 999999)
         INSERT INTO audit_log (request_id, ts_ms, key_id, method, path, status, stream, duration_ms,
             request_bytes, response_bytes, chunks, retries, prompt_tokens, completion_tokens)
         SELECT 'bulk' || i, {now} - i * 2592, 'key_bulk', 'POST', '/v1/chat/completions',
             CASE WHEN i % 50 = 0 THEN 500 ELSE 200 END, 0, (i % 1000) / 10.0, 100, 200, 1, 0, 10, 5
         FROM n"
    ))
    .unwrap();
    drop(conn);
    let admin = as_user(&gw, "admin", ADMIN_PASSWORD).await;
    let stats_caller = as_user(&gw, "admin", ADMIN_PASSWORD).await;
    let stats = tokio::spawn(async move {
        let started = std::time::Instant::now();
        // One key's numbers are read from the rows (the whole gateway's
        // come from the per-minute rollup, which these rows bypass).
        let answer = stats_caller
            .get("/api/stats/summary?window=3650d&key_id=key_bulk")
            .await;
        (started.elapsed(), answer)
    });
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let mut keys_ms = Vec::new();
    let mut overlapped = 0;
    for _ in 0..10 {
        let started = std::time::Instant::now();
        assert_eq!(admin.get("/api/keys").await.0, 200);
        keys_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        overlapped += usize::from(!stats.is_finished());
    }
    let (stats_took, (status, summary)) = stats.await.unwrap();
    assert_eq!(status, 200, "{summary}");
    // 3650d is cut to the retention (30d), not refused; the oldest rows
    // leave the window as the clock moves on.
    let requests = summary["requests"].as_i64().unwrap();
    assert!((999_000..=1_000_000).contains(&requests), "{summary}");
    assert!(
        (19_950..=20_000).contains(&summary["errors"].as_i64().unwrap()),
        "{summary}"
    );
    let p50 = summary["p50_ms"].as_f64().unwrap();
    assert!((48.0..=52.0).contains(&p50), "p50 {p50} (true value ~50)");
    keys_ms.sort_by(f64::total_cmp);
    assert!(
        overlapped > 0,
        "the stats query ended before the key calls: it proves nothing ({stats_took:?})"
    );
    assert!(
        keys_ms[keys_ms.len() / 2] < 50.0,
        "/api/keys while a {stats_took:?} stats query runs: {keys_ms:?} ms"
    );
}

/// Values interpolated from the environment never come back through the
/// admin API (route list/get/yaml, the dry run, `/api/config`, error
/// messages), and a route written through the API cannot reference a
/// secret's variable: `FASTGATE_*`, or one the config file uses for the
/// admin token, pool keys or secrets. Operator-written `${VAR}` still works
/// on the data plane.
#[tokio::test]
async fn environment_values_never_leave_through_the_admin_api() {
    const POOL: &str = "sk-env-pool-secret-0123456789";
    const TOKEN: &str = "env-static-admin-token-abcdefghijklmnopqrstuvwxyz";
    const ROUTE_VALUE: &str = "rt-env-route-value-987654321";
    const EXTRA: &str = "fx-env-fastgate-extra-secret-5555";
    let mock = MockUpstream::start().await;
    let config = "admin:\n  token: ${ADMIN_TOKEN_VAR}\nupstreams:\n  oai: {provider: openai, endpoints: ['${UPSTREAM_URL_VAR}'], key_pool: p}\nkey_pools:\n  p: {keys: ['${POOL_KEY_VAR}']}\n";
    let upstream_url = mock.url();
    let gw = Gateway::start_with_env(
        config,
        &[(
            "r.yaml",
            "routes:\n  - { name: chat, match: { path: /v1/chat/completions }, format: openai, upstream: oai, transform: { set_headers: { x-route-value: '${ROUTE_VALUE_VAR}', x-admin: 'pw ${FASTGATE_ADMIN_PASSWORD}' } } }\n",
        )],
        &[
            ("ADMIN_TOKEN_VAR", TOKEN),
            ("POOL_KEY_VAR", POOL),
            ("ROUTE_VALUE_VAR", ROUTE_VALUE),
            ("FASTGATE_EXTRA_SECRET", EXTRA),
            ("UPSTREAM_URL_VAR", &upstream_url),
        ],
    )
    .await;
    let admin = Api {
        base: gw.admin_url(""),
        token: TOKEN.to_string(),
        c: reqwest::Client::new(),
    };
    let secrets = [POOL, TOKEN, ROUTE_VALUE, EXTRA, ADMIN_PASSWORD];
    let leaked = |text: &str| secrets.iter().find(|s| text.contains(*s)).map(|s| s.to_string());

    // The data plane still gets the operator's values.
    let (_, key) = admin.post("/api/keys", json!({"name": "k"})).await;
    let secret = key["secret"].as_str().unwrap().to_string();
    gw.wait_key(&secret, "/v1/chat/completions").await;
    let r = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&secret)
        .json(&json!({"model": "gpt-4o", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(mock.last().header("x-route-value"), Some(ROUTE_VALUE));

    // Every read: masked as `${NAME}`.
    let (status, dry) = admin
        .post(
            "/api/routes/test",
            json!({"path": "/v1/chat/completions", "body": {"model": "gpt-4o"}}),
        )
        .await;
    assert_eq!(status, 200, "{dry}");
    let sent = &dry["upstream_request"]["headers"];
    assert_eq!(sent["x-route-value"], "${ROUTE_VALUE_VAR}", "{dry}");
    assert_eq!(sent["x-admin"], "pw ${FASTGATE_ADMIN_PASSWORD}", "{dry}");
    let yaml = admin
        .c
        .get(gw.admin_url("/api/routes/chat/yaml"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let everything = format!(
        "{dry} {} {} {} {} {} {yaml}",
        admin.get("/api/routes").await.1,
        admin.get("/api/routes/chat").await.1,
        admin.get("/api/config").await.1,
        admin.get("/api/upstreams").await.1,
        admin.get("/api/pools/p/keys").await.1,
    );
    assert_eq!(leaked(&everything), None, "{everything}");
    // A value that is no secret is shown as its variable too.
    let (_, ups) = admin.get("/api/upstreams").await;
    assert!(
        ups[0]["endpoints"][0]
            .as_str()
            .unwrap()
            .starts_with("${UPSTREAM_URL_VAR}"),
        "{ups}"
    );
    assert!(!everything.contains(&upstream_url), "{everything}");

    // Writes may not reference a secret's variable (400 naming it), in JSON or YAML.
    let files_before = std::fs::read_dir(gw.routes_dir()).unwrap().count();
    for var in [
        "FASTGATE_ADMIN_PASSWORD",
        "FASTGATE_EXTRA_SECRET",
        "POOL_KEY_VAR",
        "ADMIN_TOKEN_VAR",
    ] {
        let route = json!({"name": "steal", "match": {"path": "/steal"}, "upstream": "oai",
            "transform": {"set_headers": {"x-a": format!("${{{var}}}")}}});
        let (status, body) = admin.post("/api/routes", route).await;
        assert_eq!(status, 400, "{var}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(var) && message.contains("transform.set_headers.x-a"),
            "{message}"
        );
        let text = format!(
            "routes:\n  - {{ name: steal, match: {{ path: /steal }}, upstream: oai, transform: {{ rewrite_path: '/${{{var}:-x}}' }} }}\n"
        );
        let r = admin
            .c
            .put(gw.admin_url("/api/routes/steal/yaml"))
            .bearer_auth(TOKEN)
            .body(text)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{var}");
        assert_eq!(leaked(&r.text().await.unwrap()), None);
    }
    assert_eq!(
        std::fs::read_dir(gw.routes_dir()).unwrap().count(),
        files_before,
        "nothing written"
    );
    // An operator's existing reference survives an API edit of the same route.
    let (status, toggled) = admin.post("/api/routes/chat/toggle", json!({})).await;
    assert_eq!(status, 200, "{toggled}");
    assert_eq!(leaked(&toggled.to_string()), None);
    // Other variables are fine, and masked when read back.
    let (status, created) = admin
        .post(
            "/api/routes",
            json!({"name": "ok", "match": {"path": "/ok"}, "upstream": "oai",
                "transform": {"set_headers": {"x-b": "${ROUTE_VALUE_VAR}"}}}),
        )
        .await;
    assert_eq!(status, 201, "{created}");

    // Field bounds, each refusal naming the field.
    for (route, field) in [
        (
            json!({"name": "n".repeat(200), "match": {"path": "/n"}, "upstream": "oai"}),
            "name",
        ),
        (
            json!({"name": "../evil", "match": {"path": "/n"}, "upstream": "oai"}),
            "name",
        ),
        (
            json!({"name": "big", "match": {"path": format!("/{}", "p".repeat(9000))}, "upstream": "oai"}),
            "match.path",
        ),
        (
            json!({"name": "big", "match": {"path": "/b"}, "upstream": "oai",
                "transform": {"set_headers": {"x-a": "v".repeat(9000)}}}),
            "transform.set_headers.x-a",
        ),
        (
            json!({"name": "big", "match": {"path": "/b"}, "upstream": "oai",
                "transform": {"remove_headers": vec!["x"; 100]}}),
            "transform.remove_headers",
        ),
    ] {
        let (status, body) = admin.post("/api/routes", route).await;
        assert_eq!(status, 400, "{field}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().starts_with(field),
            "{field}: {body}"
        );
    }
    assert_eq!(std::fs::read_dir(gw.routes_dir()).unwrap().count(), files_before + 1);
}
