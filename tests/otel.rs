//! OpenTelemetry traces through the real binary: an OTLP receiver in the
//! test (http/protobuf on a small hyper server, grpc on tonic), decoding
//! `ExportTraceServiceRequest`, against mock OpenAI and Anthropic upstreams.
//! Checks span names and GenAI attributes, one child per upstream attempt,
//! a client's `traceparent` continued and propagated, sampling (errors
//! always), hostile `traceparent` values, the queue's drops, and that no
//! gateway or upstream key appears in any attribute.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Gateway, KeyRule, MockUpstream, rule_all};
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, any_value::Value as V},
    trace::v1::Span,
};
use prost::Message;
use serde_json::json;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

const UPSTREAM_KEY_A: &str = "sk-upstream-secret-aaaa-0123456789";
const UPSTREAM_KEY_B: &str = "sk-upstream-secret-bbbb-0123456789";

/// Spans received, with the `service.name` of their resource.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(String, Span)>>>);

impl Received {
    fn add(&self, req: ExportTraceServiceRequest) {
        let mut all = self.0.lock().unwrap();
        for rs in req.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .and_then(|a| a.value.as_ref())
                .map(text)
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    all.push((service.clone(), s));
                }
            }
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.0.lock().unwrap().iter().map(|(_, s)| s.clone()).collect()
    }

    /// The spans of the request whose `fastgate.request_id` is `id`: its
    /// SERVER span first, then its attempts in order.
    async fn request(&self, id: &str, attempts: usize) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let spans = self.spans();
            if let Some(server) = spans
                .iter()
                .find(|s| attr(s, "fastgate.request_id").as_deref() == Some(id))
            {
                let mut children: Vec<Span> = spans
                    .iter()
                    .filter(|s| s.parent_span_id == server.span_id && s.trace_id == server.trace_id)
                    .cloned()
                    .collect();
                if children.len() >= attempts {
                    children.sort_by_key(|s| attr(s, "fastgate.attempt"));
                    let mut out = vec![server.clone()];
                    out.extend(children);
                    return out;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no spans for request {id}: {:#?}",
                self.spans()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// An OTLP/HTTP receiver: `POST /v1/traces` with a protobuf body.
async fn http_receiver() -> (String, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Received::default();
    let r = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let r = r.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let r = r.clone();
                    async move {
                        assert_eq!(req.uri().path(), "/v1/traces");
                        assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                        assert_eq!(req.headers()["x-collector-token"], "collector-secret-1234567890");
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        r.add(ExportTraceServiceRequest::decode(body).unwrap());
                        let answer = ExportTraceServiceResponse::default().encode_to_vec();
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .header("content-type", "application/x-protobuf")
                                .body(Full::new(bytes::Bytes::from(answer)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), received)
}

struct Grpc(Received);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        assert_eq!(
            request.metadata().get("x-collector-token").unwrap(),
            "collector-secret-1234567890"
        );
        self.0.add(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC receiver (the collector's `TraceService`).
async fn grpc_receiver() -> (String, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Received::default();
    let service = TraceServiceServer::new(Grpc(received.clone()));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    (format!("http://{addr}"), received)
}

fn text(v: &AnyValue) -> String {
    match &v.value {
        Some(V::StringValue(s)) => s.clone(),
        Some(V::IntValue(i)) => i.to_string(),
        Some(V::BoolValue(b)) => b.to_string(),
        Some(V::DoubleValue(d)) => d.to_string(),
        Some(V::ArrayValue(a)) => a.values.iter().map(text).collect::<Vec<_>>().join(","),
        other => format!("{other:?}"),
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .map(text)
}

fn attrs(span: &Span) -> HashMap<String, String> {
    span.attributes
        .iter()
        .map(|a| (a.key.clone(), a.value.as_ref().map(text).unwrap_or_default()))
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A counter's value from the metrics text (`prefix` ends with a space).
fn counter(metrics: &str, prefix: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in {metrics}"))
        .parse()
        .unwrap()
}

/// Span kinds as OTLP numbers them.
const SERVER: i32 = 2;
const CLIENT: i32 = 3;

fn otel_config(endpoint: &str, protocol: &str, extra: &str) -> String {
    format!(
        "otel:\n  endpoint: {endpoint}\n  protocol: {protocol}\n  headers: {{x-collector-token: collector-secret-1234567890}}\n  flush_interval: 50ms\n  service_name: fastgate-test\n{extra}"
    )
}

/// A gateway with OpenAI and Anthropic upstreams on `mock`, a two-key pool,
/// routes that need a gateway key (retries: 2), and `otel`.
async fn gateway(mock: &MockUpstream, otel: &str) -> (Gateway, String) {
    let routes = "routes:\n  - { name: chat, match: { path: /v1/chat/completions }, format: openai, upstream: oai, retries: 2 }\n  - { name: messages, match: { path: /v1/messages }, format: anthropic, upstream: ant, retries: 2 }\n";
    gateway_with(mock, otel, routes).await
}

async fn gateway_with(mock: &MockUpstream, otel: &str, routes: &str) -> (Gateway, String) {
    let u = mock.url();
    let config = format!(
        "upstreams:\n  oai: {{provider: openai, endpoints: ['{u}'], key_pool: p}}\n  ant: {{provider: anthropic, endpoints: ['{u}'], key_pool: p}}\n  down: {{provider: anthropic, endpoints: ['http://127.0.0.1:{closed}'], key_pool: p}}\nkey_pools:\n  p: {{keys: [{UPSTREAM_KEY_A}, {UPSTREAM_KEY_B}], strategy: round_robin}}\n{otel}",
        closed = common::free_port()
    );
    let gw = Gateway::start(&config, &[("r.yaml", routes)]).await;
    let (_, secret) = gw.create_key(&[]);
    gw.wait_key(&secret, "/v1/messages").await;
    (gw, secret)
}

async fn send(
    gw: &Gateway,
    key: &str,
    path: &str,
    body: serde_json::Value,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let mut req = reqwest::Client::new().post(gw.url(path)).bearer_auth(key).json(&body);
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    (status, id, r.text().await.unwrap())
}

fn chat(stream: bool) -> serde_json::Value {
    json!({"model": "gpt-4o", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

fn message(stream: bool) -> serde_json::Value {
    json!({"model": "claude-sonnet-4", "max_tokens": 64, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

/// No key, gateway or upstream, in any attribute of any span.
fn assert_no_secret(spans: &[Span], secrets: &[&str]) {
    for s in spans {
        for (k, v) in attrs(s) {
            for secret in secrets {
                assert!(!v.contains(secret), "attribute {k} of {:?} holds a key", s.name);
            }
        }
        assert!(secrets.iter().all(|x| !s.name.contains(x)));
    }
}

/// The `traceparent` an upstream request carried: (trace id, parent span id).
fn upstream_traceparent(seen: &common::Seen) -> (String, String) {
    let tp = seen.header("traceparent").expect("no traceparent upstream");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[0], "00");
    (parts[1].to_string(), parts[2].to_string())
}

#[tokio::test]
async fn http_protobuf_openai_spans_carry_the_genai_attributes_and_no_key() {
    let mock = MockUpstream::start().await;
    let (endpoint, rx) = http_receiver().await;
    let (gw, key) = gateway(&mock, &otel_config(&endpoint, "http/protobuf", "")).await;
    for stream in [false, true] {
        mock.clear();
        let (status, id, _) = send(&gw, &key, "/v1/chat/completions", chat(stream), &[]).await;
        assert_eq!(status, 200);
        let spans = rx.request(&id, 1).await;
        let (server, attempt) = (&spans[0], &spans[1]);
        assert_eq!(server.name, "chat gpt-4o");
        assert_eq!(server.kind, SERVER);
        assert_eq!(attempt.name, "chat gpt-4o");
        assert_eq!(attempt.kind, CLIENT);
        assert!(server.parent_span_id.is_empty(), "a fresh trace has no parent");
        let a = attrs(server);
        assert_eq!(a["gen_ai.operation.name"], "chat");
        assert_eq!(a["gen_ai.provider.name"], "openai");
        assert_eq!(a["gen_ai.request.model"], "gpt-4o");
        assert_eq!(a["gen_ai.usage.input_tokens"], "9");
        assert_eq!(a["gen_ai.usage.output_tokens"], if stream { "5" } else { "1" });
        assert_eq!(a["gen_ai.response.model"], "gpt-4o");
        assert_eq!(a["gen_ai.response.id"], "c1");
        if !stream {
            // The mock's stream never says why it ended (the chunks carry null).
            assert_eq!(a["gen_ai.response.finish_reasons"], "stop");
        }
        // The shipped table's gpt-4o: (9 × 2.50 + output × 10.00) / 1e6.
        let cost: f64 = a["fastgate.cost"].parse().unwrap();
        let want = if stream { 0.000_072_5 } else { 0.000_032_5 };
        assert!((cost - want).abs() < 1e-12, "{cost}");
        assert_eq!(a["http.response.status_code"], "200");
        assert_eq!(a["fastgate.route"], "chat");
        assert_eq!(a["fastgate.upstream"], "oai");
        assert_eq!(a["fastgate.stream"], stream.to_string());
        assert_eq!(a["fastgate.usage_estimated"], "false");
        assert_eq!(a["server.address"], "127.0.0.1");
        assert!(!a.contains_key("error.type"));
        let b = attrs(attempt);
        assert_eq!(b["server.address"], "127.0.0.1");
        assert_eq!(b["server.port"], mock.addr.port().to_string());
        assert_eq!(b["http.response.status_code"], "200");
        let key_id = b["fastgate.pool_key_id"].clone();
        assert!(
            [
                fastgate::pool::key_id(UPSTREAM_KEY_A),
                fastgate::pool::key_id(UPSTREAM_KEY_B)
            ]
            .contains(&key_id),
            "{key_id}"
        );
        assert!(attempt.start_time_unix_nano >= server.start_time_unix_nano);
        assert!(attempt.end_time_unix_nano <= server.end_time_unix_nano);
        // The upstream continues the trace under the attempt's span.
        let (trace, parent) = upstream_traceparent(&mock.last());
        assert_eq!(trace, hex(&server.trace_id));
        assert_eq!(parent, hex(&attempt.span_id));
        assert_no_secret(&spans, &[&key, UPSTREAM_KEY_A, UPSTREAM_KEY_B]);
    }
    assert!(rx.0.lock().unwrap().iter().all(|(svc, _)| svc == "fastgate-test"));
    // Four spans above, and those of `wait_key`'s probes.
    let metrics = gw.metrics().await;
    assert!(
        counter(&metrics, "fastgate_otel_spans_exported_total ") >= 4,
        "{metrics}"
    );
    assert!(!gw.logs().contains("collector-secret"), "a collector header in the log");
}

#[tokio::test]
async fn grpc_anthropic_continues_the_clients_trace_and_propagates_it() {
    let mock = MockUpstream::start().await;
    let (endpoint, rx) = grpc_receiver().await;
    let (gw, key) = gateway(&mock, &otel_config(&endpoint, "grpc", "  sample_ratio: 0\n")).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace}-{client_span}-01");
    for stream in [false, true] {
        mock.clear();
        // The streamed request's `tracestate` comes in two lines: one list.
        let (state, second) = if stream {
            ("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE", "congo=t61rcWkgMzE")
        } else {
            ("rojo=00f067aa0ba902b7", "")
        };
        let mut headers = vec![
            ("traceparent", traceparent.as_str()),
            ("tracestate", "rojo=00f067aa0ba902b7"),
        ];
        if stream {
            headers.push(("tracestate", second));
        }
        let (status, id, _) = send(&gw, &key, "/v1/messages", message(stream), &headers).await;
        assert_eq!(status, 200);
        // Sampled by the client's flag, though the ratio is 0.
        let spans = rx.request(&id, 1).await;
        let (server, attempt) = (&spans[0], &spans[1]);
        assert_eq!(server.name, "chat claude-sonnet-4");
        assert_eq!(hex(&server.trace_id), trace);
        assert_eq!(hex(&server.parent_span_id), client_span);
        assert_eq!(server.trace_state, state);
        let a = attrs(server);
        assert_eq!(a["gen_ai.provider.name"], "anthropic");
        assert_eq!(a["gen_ai.request.model"], "claude-sonnet-4");
        assert_eq!(a["gen_ai.usage.input_tokens"], "12");
        assert_eq!(a["gen_ai.usage.output_tokens"], "3");
        assert_eq!(a["gen_ai.response.model"], "claude-sonnet-4");
        assert_eq!(a["gen_ai.response.id"], "msg_1");
        assert_eq!(a["gen_ai.response.finish_reasons"], "end_turn");
        assert_eq!(a["fastgate.route"], "messages");
        let seen = mock.last();
        let (up_trace, up_parent) = upstream_traceparent(&seen);
        assert_eq!(up_trace, trace);
        assert_eq!(up_parent, hex(&attempt.span_id));
        assert!(seen.header("traceparent").unwrap().ends_with("-01"));
        assert_eq!(seen.header("tracestate"), Some(state));
        assert_no_secret(&spans, &[&key, UPSTREAM_KEY_A, UPSTREAM_KEY_B]);
    }
}

#[tokio::test]
async fn pingoras_path_traces_its_attempt_and_a_refused_connection() {
    let mock = MockUpstream::start().await;
    let (endpoint, rx) = http_receiver().await;
    // No retries, no model match: the body is streamed by Pingora's path.
    let routes = "routes:\n  - { name: messages, match: { path: /v1/messages }, format: anthropic, upstream: ant }\n  - { name: down, match: { path: /down/v1/messages }, format: anthropic, upstream: down }\n";
    let (gw, key) = gateway_with(&mock, &otel_config(&endpoint, "http/protobuf", ""), routes).await;
    mock.clear();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (status, id, _) = send(
        &gw,
        &key,
        "/v1/messages",
        message(false),
        &[("traceparent", traceparent)],
    )
    .await;
    assert_eq!(status, 200);
    let spans = rx.request(&id, 1).await;
    let (server, attempt) = (&spans[0], &spans[1]);
    assert_eq!(hex(&server.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(attr(server, "gen_ai.operation.name").as_deref(), Some("chat"));
    assert_eq!(attr(server, "gen_ai.usage.output_tokens").as_deref(), Some("3"));
    assert_eq!(attr(attempt, "http.response.status_code").as_deref(), Some("200"));
    let (trace, parent) = upstream_traceparent(&mock.last());
    assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(parent, hex(&attempt.span_id));
    // A refused connection: a 502, exported with its failed attempt.
    let (status, id, _) = send(&gw, &key, "/down/v1/messages", message(false), &[]).await;
    assert_eq!(status, 502);
    let spans = rx.request(&id, 1).await;
    assert_eq!(attr(&spans[0], "http.response.status_code").as_deref(), Some("502"));
    assert!(attr(&spans[0], "error.type").is_some());
    assert!(attr(&spans[1], "error.type").is_some(), "{:?}", attrs(&spans[1]));
    assert_eq!(attr(&spans[1], "http.response.status_code"), None);
    assert_no_secret(&spans, &[&key, UPSTREAM_KEY_A, UPSTREAM_KEY_B]);
}

#[tokio::test]
async fn tracing_is_turned_on_and_off_by_a_reload() {
    let mock = MockUpstream::start().await;
    let (endpoint, rx) = grpc_receiver().await;
    let (gw, key) = gateway(&mock, "").await;
    let (_, before, _) = send(&gw, &key, "/v1/chat/completions", chat(false), &[]).await;
    assert!(mock.last().header("traceparent").is_none(), "untraced: nothing added");
    let path = gw.config_path();
    let plain = std::fs::read_to_string(&path).unwrap();
    common::write(&path, &format!("{plain}{}", otel_config(&endpoint, "grpc", "")));
    gw.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    let id = loop {
        let (_, id, _) = send(&gw, &key, "/v1/chat/completions", chat(false), &[]).await;
        if mock.last().header("traceparent").is_some() {
            break id;
        }
        assert!(Instant::now() < deadline, "the reload never turned tracing on");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    rx.request(&id, 1).await;
    assert!(
        rx.spans()
            .iter()
            .all(|s| attr(s, "fastgate.request_id").as_deref() != Some(before.as_str()))
    );
    common::write(&path, &plain);
    gw.signal("HUP");
    common::eventually_text(
        || {
            reqwest::Client::new()
                .post(gw.url("/v1/chat/completions"))
                .bearer_auth(&key)
                .json(&chat(false))
        },
        |_| mock.last().header("traceparent").is_none(),
    )
    .await;
    assert!(
        mock.last().header("traceparent").is_none(),
        "the reload never turned tracing off"
    );
}

#[tokio::test]
async fn a_retried_attempt_is_its_own_child_span() {
    let mock = MockUpstream::start().await;
    let (endpoint, rx) = http_receiver().await;
    let (gw, key) = gateway(&mock, &otel_config(&endpoint, "http/protobuf", "")).await;
    mock.clear();
    mock.behaviour.fail_429.store(1, std::sync::atomic::Ordering::SeqCst);
    let (status, id, _) = send(&gw, &key, "/v1/chat/completions", chat(false), &[]).await;
    assert_eq!(status, 200);
    let spans = rx.request(&id, 2).await;
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let (server, first, second) = (&spans[0], &spans[1], &spans[2]);
    assert_eq!(attr(server, "fastgate.attempts").as_deref(), Some("2"));
    assert_eq!(attr(first, "http.response.status_code").as_deref(), Some("429"));
    assert_eq!(attr(first, "error.type").as_deref(), Some("429"));
    assert_eq!(first.status.as_ref().map(|s| s.code), Some(2), "an error status");
    assert_eq!(attr(second, "http.response.status_code").as_deref(), Some("200"));
    assert_eq!(attr(second, "error.type"), None);
    assert_ne!(
        attr(first, "fastgate.pool_key_id"),
        attr(second, "fastgate.pool_key_id"),
        "the retry takes the other key"
    );
    assert!(first.end_time_unix_nano <= second.start_time_unix_nano);
    // Each upstream request named its own attempt's span.
    let seen = mock.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(upstream_traceparent(&seen[0]).1, hex(&first.span_id));
    assert_eq!(upstream_traceparent(&seen[1]).1, hex(&second.span_id));
    assert_no_secret(&spans, &[&key, UPSTREAM_KEY_A, UPSTREAM_KEY_B]);
}

#[tokio::test]
async fn at_ratio_zero_only_failures_and_sampled_parents_are_exported() {
    let mock = MockUpstream::start().await;
    let (endpoint, rx) = http_receiver().await;
    let (gw, key) = gateway(&mock, &otel_config(&endpoint, "http/protobuf", "  sample_ratio: 0\n")).await;
    let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    let (s1, _, _) = send(&gw, &key, "/v1/chat/completions", chat(false), &[]).await;
    let (s2, _, _) = send(
        &gw,
        &key,
        "/v1/chat/completions",
        chat(false),
        &[("traceparent", unsampled)],
    )
    .await;
    assert_eq!((s1, s2), (200, 200));
    // The upstream is told the trace is not sampled.
    assert!(mock.last().header("traceparent").unwrap().ends_with("-00"));
    rule_all(&mock, KeyRule::Status(500));
    let (status, id, _) = send(
        &gw,
        &key,
        "/v1/chat/completions",
        chat(false),
        &[("traceparent", unsampled)],
    )
    .await;
    assert_eq!(status, 500);
    let spans = rx.request(&id, 1).await;
    let server = &spans[0];
    assert_eq!(hex(&server.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(attr(server, "error.type").as_deref(), Some("500"));
    assert_eq!(server.status.as_ref().map(|s| s.code), Some(2));
    // Flushed every 50 ms: the two 200s would be there by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids: Vec<String> = rx
        .spans()
        .iter()
        .filter_map(|s| attr(s, "fastgate.request_id"))
        .collect();
    assert_eq!(ids, vec![id], "only the failed request is exported");
}

#[tokio::test]
async fn hostile_traceparent_values_get_a_fresh_trace() {
    let mock = MockUpstream::start().await;
    let (endpoint, rx) = http_receiver().await;
    let (gw, key) = gateway(&mock, &otel_config(&endpoint, "http/protobuf", "")).await;
    let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let long = format!("{good}-{}", "a".repeat(4000));
    for bad in [
        good.to_uppercase(),
        good.replacen("00-", "ff-", 1),
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01".to_string(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01".to_string(),
        good[..40].to_string(),
        format!("{good}-extra"),
        long,
        "garbage".to_string(),
    ] {
        mock.clear();
        let (status, id, _) = send(&gw, &key, "/v1/chat/completions", chat(false), &[("traceparent", &bad)]).await;
        assert_eq!(status, 200, "{bad:.70}");
        let spans = rx.request(&id, 1).await;
        assert_ne!(hex(&spans[0].trace_id), "4bf92f3577b34da6a3ce929d0e0e4736", "{bad:.70}");
        assert!(spans[0].parent_span_id.is_empty(), "{bad:.70}");
        let (trace, parent) = upstream_traceparent(&mock.last());
        assert_eq!(trace, hex(&spans[0].trace_id));
        assert_eq!(parent, hex(&spans[1].span_id));
    }
}

#[tokio::test]
async fn a_collector_that_never_answers_costs_drops_not_latency() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let mock = MockUpstream::start().await;
    let extra = "  queue_size: 4\n  batch_size: 2\n  timeout: 30s\n";
    let (gw, key) = gateway(&mock, &otel_config(&endpoint, "http/protobuf", extra)).await;
    for _ in 0..10 {
        let started = Instant::now();
        let (status, _, _) = send(&gw, &key, "/v1/chat/completions", chat(false), &[]).await;
        assert_eq!(status, 200);
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }
    let metrics = gw.metrics().await;
    let dropped = counter(&metrics, "fastgate_otel_spans_dropped_total{reason=\"queue_full\"} ");
    // 20 spans: one batch of 2 is stuck in the export, 4 wait, the rest drop.
    assert!(dropped >= 12, "{metrics}");
}
