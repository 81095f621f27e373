//! The compiled route table: what `routes.d` says, in a form that matches a
//! request in a few hash and prefix lookups.
//!
//! Matching is two-phase because the JSON body is only read when needed:
//! [`RouteTable::candidates`] filters on path, method, host and headers;
//! if any candidate matches on `model`, the proxy reads the body and calls
//! [`pick`] with the model it found.

mod edit;
mod load;

pub use edit::{RouteEdit, RouteEditError, edit_routes, read_route_configs};
pub use load::{compile_sources, load_routes, parse_route_yaml};

use crate::config::{
    FileConfig, Provider,
    routes_d::{AuthMode, Format, RouteConfig},
};
use globset::{Glob, GlobSet, GlobSetBuilder};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

/// The most `retries` a route may ask for: one request never makes more
/// than `MAX_RETRIES + 1` attempts per upstream.
pub const MAX_RETRIES: u32 = 10;

/// One compiled route.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub file: PathBuf,
    /// The `match.path` pattern, in matchit syntax.
    pub pattern: String,
    pub priority: i32,
    /// Load order; breaks priority ties (earlier file / earlier entry wins).
    pub order: usize,
    pub enabled: bool,
    pub methods: Vec<Method>,
    pub host: Option<HostMatch>,
    pub headers: Vec<(HeaderName, String)>,
    pub model: Option<GlobSet>,
    /// The `match.model` patterns as written.
    pub model_globs: Vec<String>,
    /// The API format clients speak here (resolved from the upstream for `passthrough`).
    pub format: Format,
    pub auth: AuthMode,
    pub permissions: Vec<String>,
    /// Primary upstream first, then fallbacks, in the order they are tried.
    pub upstreams: Vec<String>,
    pub model_map: HashMap<String, String>,
    pub transform: Transform,
    pub timeout: Option<Duration>,
    pub retries: u32,
    /// Client headers that pick the provider account pass to a pooled
    /// upstream (`forward_account_headers`).
    pub forward_account_headers: bool,
    /// Retries after the body was sent are allowed on any failure (the
    /// route's `idempotent`); otherwise only on answers proving the
    /// provider did not act (see `proxy::retry`).
    pub idempotent: bool,
    /// Per gateway key on this route.
    pub rate_limit: crate::ratelimit::Limits,
    /// Money per period through this route (`budget`).
    pub budget: Option<crate::budget::Budget>,
    /// `fake_stream`: the keepalive interval of streams made from whole
    /// answers (`None`: streams pass as the upstream sends them).
    pub fake_stream: Option<Duration>,
    /// The request body is read before proxying (model routing, body rewrites,
    /// replay for retries or fallback, the in-process mock).
    pub buffers_body: bool,
    /// Clients speak OpenAI's API to an upstream that does too: streamed chat
    /// completions are asked for usage (`stream_options.include_usage`).
    pub openai_usage: bool,
    /// Model names this route can name (literal globs, `model_map`, the
    /// upstreams' `models`): the bounded label set of `tokens_total`.
    pub known_models: Vec<String>,
    /// This route's metric series, resolved once (label lookups are not free).
    pub metrics: crate::metrics::RouteSeries,
    path_router: matchit::Router<()>,
}

#[derive(Debug, Default)]
pub struct Transform {
    pub strip_prefix: Option<String>,
    pub rewrite_path: Option<String>,
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    pub remove_headers: Vec<HeaderName>,
    pub set_body: Option<serde_json::Value>,
}

/// `llm.example.com` or `*.example.com`, compared without port and case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Exact(String),
    Suffix(String),
}

impl HostMatch {
    fn parse(s: &str) -> Self {
        let s = s.to_ascii_lowercase();
        match s.strip_prefix("*.") {
            Some(rest) => Self::Suffix(format!(".{rest}")),
            None => Self::Exact(s),
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(h) => h.eq_ignore_ascii_case(host),
            Self::Suffix(s) => host.len() > s.len() && host[host.len() - s.len()..].eq_ignore_ascii_case(s),
        }
    }
}

/// Whether clients speaking `format` reach an upstream speaking `provider`
/// through format conversion (both sides one of OpenAI, Anthropic, Gemini,
/// and different). `http` and `mock` upstreams take any format as is.
pub fn converts(provider: Provider, format: Format) -> bool {
    let upstream = provider_format(provider);
    // OpenAI itself serves the Responses API; OpenAI-compatible servers
    // are asked through Chat Completions.
    let native = upstream == format || (format == Format::Responses && provider == Provider::Openai);
    format != Format::Passthrough && upstream != Format::Passthrough && !native
}

/// The API format an upstream provider speaks natively.
pub fn provider_format(provider: Provider) -> Format {
    match provider {
        Provider::Openai | Provider::OpenaiCompatible => Format::Openai,
        Provider::Anthropic => Format::Anthropic,
        Provider::Gemini => Format::Gemini,
        Provider::Http | Provider::Mock => Format::Passthrough,
    }
}

/// The default interval of a fake stream's keepalives.
pub const FAKE_STREAM_KEEPALIVE: Duration = Duration::from_secs(5);

/// A route's `fake_stream` keepalive interval, when the option is on and
/// valid: the route must speak a known format (FastGate writes that
/// format's stream) and keep its keepalives between 1 s and 60 s.
fn fake_stream_interval(rc: &RouteConfig, format: Format, errs: &mut Vec<String>) -> Option<Duration> {
    let every = rc.fake_stream_keepalive.map_or(FAKE_STREAM_KEEPALIVE, |d| d.0);
    if rc.fake_stream_keepalive.is_some() && !rc.fake_stream {
        errs.push("fake_stream_keepalive is set but fake_stream is not".to_string());
    }
    if !rc.fake_stream {
        return None;
    }
    if format == Format::Passthrough {
        errs.push(
            "fake_stream needs the route's format (openai, anthropic, gemini or responses): FastGate writes that format's stream"
                .to_string(),
        );
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&every) {
        errs.push(format!(
            "fake_stream_keepalive must be between 1s and 60s (got {}ms)",
            every.as_millis()
        ));
    }
    Some(every)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Route {
    /// Validate and compile one route; every problem is returned, not just the first.
    pub fn compile(rc: &RouteConfig, order: usize, file: &Path, config: &FileConfig) -> Result<Route, Vec<String>> {
        let mut errs = Vec::new();
        if !valid_name(&rc.name) {
            errs.push("name must be 1-128 characters of A-Z a-z 0-9 - _ .".to_string());
        }
        let m = &rc.matcher;
        let mut path_router = matchit::Router::new();
        if !m.path.starts_with('/') {
            errs.push(format!("match.path {:?} must start with '/'", m.path));
        } else if let Err(e) = path_router.insert(m.path.as_str(), ()) {
            errs.push(format!("match.path {:?}: {e}", m.path));
        }
        let mut methods = Vec::new();
        for name in &m.methods {
            match Method::from_bytes(name.to_ascii_uppercase().as_bytes()) {
                Ok(method) => methods.push(method),
                Err(_) => errs.push(format!("match.methods: {name:?} is not an HTTP method")),
            }
        }
        let mut headers = Vec::new();
        for (name, value) in &m.headers {
            match HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
                Ok(h) => headers.push((h, value.clone())),
                Err(_) => errs.push(format!("match.headers: {name:?} is not a header name")),
            }
        }
        let globs = m.model.to_vec();
        let model = if globs.is_empty() {
            None
        } else {
            let mut b = GlobSetBuilder::new();
            for g in &globs {
                match Glob::new(g) {
                    Ok(glob) => {
                        b.add(glob);
                    }
                    Err(e) => errs.push(format!("match.model: {e}")),
                }
            }
            b.build().ok()
        };

        let mut upstreams = rc.upstream.to_vec();
        upstreams.extend(rc.fallback.iter().cloned());
        if upstreams.is_empty() {
            errs.push("upstream is required".to_string());
        }
        let mut format = rc.format;
        let mut any_mock = false;
        let mut any_conversion = false;
        let mut known_models: Vec<String> = globs.iter().filter(|g| !is_glob(g)).cloned().collect();
        known_models.extend(rc.model_map.iter().flat_map(|(a, b)| [a.clone(), b.clone()]));
        for (i, name) in upstreams.iter().enumerate() {
            let Some(up) = config.upstreams.get(name) else {
                errs.push(format!("no upstream named {name:?} in the config's upstreams"));
                continue;
            };
            any_mock |= up.provider == Provider::Mock;
            known_models.extend(up.models.iter().cloned());
            if up.provider == Provider::Mock {
                known_models.push(crate::config::MOCK_MODEL.to_string());
            }
            if i == 0 && format == Format::Passthrough {
                format = provider_format(up.provider);
            }
            any_conversion |= converts(up.provider, format);
        }

        let t = &rc.transform;
        if let Some(p) = &t.strip_prefix
            && (!p.starts_with('/') || p.len() < 2 || p.ends_with('/'))
        {
            errs.push(format!(
                "transform.strip_prefix {p:?} must start with '/' and not end with '/'"
            ));
        }
        if let Some(p) = &t.rewrite_path {
            if !p.starts_with('/') {
                errs.push(format!("transform.rewrite_path {p:?} must start with '/'"));
            }
            for param in template_params(p) {
                if !m.path.contains(&format!("{{{param}}}")) && !m.path.contains(&format!("{{*{param}}}")) {
                    errs.push(format!(
                        "transform.rewrite_path uses {{{param}}} but match.path has no such parameter"
                    ));
                }
            }
        }
        let mut set_headers = Vec::new();
        for (name, value) in &t.set_headers {
            match (
                HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()),
                HeaderValue::from_str(value),
            ) {
                (Ok(n), Ok(v)) => set_headers.push((n, v)),
                _ => errs.push(format!("transform.set_headers: {name:?} is not a valid header")),
            }
        }
        let mut remove_headers = Vec::new();
        for name in &t.remove_headers {
            match HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
                Ok(n) => remove_headers.push(n),
                Err(_) => errs.push(format!("transform.remove_headers: {name:?} is not a header name")),
            }
        }
        if let Some(body) = &t.set_body
            && !body.is_object()
        {
            errs.push("transform.set_body must be a mapping (it is JSON-merged into the body)".to_string());
        }
        for (from, to) in &rc.model_map {
            if from.is_empty() || to.is_empty() {
                errs.push("model_map entries must not be empty".to_string());
            }
        }
        if rc.retries > MAX_RETRIES {
            errs.push(format!(
                "retries: {} is more than {MAX_RETRIES} (each attempt may reach the provider; a route with more keys fails over through them within this)",
                rc.retries
            ));
        }
        if let Some(Err(e)) = rc.budget.map(|b| b.check()) {
            errs.push(e);
        }
        let fake_stream = fake_stream_interval(rc, format, &mut errs);
        if !errs.is_empty() {
            return Err(errs);
        }

        let buffers_body = model.is_some()
            || !rc.model_map.is_empty()
            || t.set_body.is_some()
            || rc.retries > 0
            || upstreams.len() > 1
            || any_mock
            || any_conversion
            || fake_stream.is_some();
        let openai_usage = format == Format::Openai
            && upstreams.iter().all(|name| {
                config.upstreams.get(name).is_some_and(|u| {
                    matches!(
                        u.provider,
                        Provider::Openai | Provider::OpenaiCompatible | Provider::Mock
                    )
                })
            });
        Ok(Route {
            name: rc.name.clone(),
            file: file.to_path_buf(),
            pattern: m.path.clone(),
            priority: rc.priority,
            order,
            enabled: rc.enabled,
            methods,
            host: m.host.as_deref().map(HostMatch::parse),
            headers,
            model,
            model_globs: globs,
            format,
            auth: rc.auth,
            permissions: rc.permissions.clone(),
            upstreams,
            model_map: rc.model_map.iter().map(|(a, b)| (a.clone(), b.clone())).collect(),
            transform: Transform {
                strip_prefix: t.strip_prefix.clone(),
                rewrite_path: t.rewrite_path.clone(),
                set_headers,
                remove_headers,
                set_body: t.set_body.clone(),
            },
            timeout: rc.timeout.map(|d| d.0),
            retries: rc.retries,
            forward_account_headers: rc.forward_account_headers,
            idempotent: rc.idempotent,
            rate_limit: crate::ratelimit::Limits {
                rpm: rc.rate_limit.and_then(|r| r.rpm),
                tpm: rc.rate_limit.and_then(|r| r.tpm),
            },
            budget: rc.budget,
            fake_stream,
            buffers_body,
            openai_usage,
            known_models,
            metrics: crate::metrics::RouteSeries::default(),
            path_router,
        })
    }

    /// Whether the route's non-body conditions hold for a request.
    fn matches_head(&self, method: &Method, host: Option<&str>, headers: &HeaderMap) -> bool {
        (self.methods.is_empty() || self.methods.contains(method))
            && self
                .host
                .as_ref()
                .is_none_or(|h| host.is_some_and(|host| h.matches(host)))
            && self
                .headers
                .iter()
                .all(|(name, want)| headers.get(name).is_some_and(|v| v.as_bytes() == want.as_bytes()))
    }

    /// Whether `model` satisfies the route's `match.model` globs.
    pub fn matches_model(&self, model: Option<&str>) -> bool {
        match (&self.model, model) {
            (None, _) => true,
            (Some(set), Some(m)) => set.is_match(m),
            (Some(_), None) => false,
        }
    }

    /// Named parameters captured by `match.path` (for `rewrite_path`).
    pub fn path_params(&self, path: &str) -> Vec<(String, String)> {
        self.path_router
            .at(path)
            .map(|m| m.params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
            .unwrap_or_default()
    }
}

/// `{name}` and `{*name}` placeholders of a rewrite template.
pub fn template_params(template: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let Some(len) = rest[start..].find('}') else {
            break;
        };
        out.push(rest[start + 1..start + len].trim_start_matches('*').to_string());
        rest = &rest[start + len + 1..];
    }
    out
}

/// Expand `{name}` placeholders of `template` with `params`.
pub fn expand_template(template: &str, params: &[(String, String)]) -> String {
    let mut out = template.to_string();
    for (k, v) in params {
        out = out.replace(&format!("{{{k}}}"), v).replace(&format!("{{*{k}}}"), v);
    }
    out
}

/// All routes of `routes.d`, indexed for matching.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
    /// Static paths: one hash lookup; each list already in (priority, order).
    exact: HashMap<String, Vec<usize>>,
    /// Patterns with parameters, by the first path segment of their static
    /// prefix (`/v1/{*rest}` under `v1`), so only plausible ones are tried.
    dynamic: HashMap<String, Vec<(String, usize)>>,
    /// Patterns whose first segment is itself a parameter (`/{*any}`).
    dynamic_root: Vec<(String, usize)>,
    /// Every route's model globs in one automaton, and which route owns each.
    models: GlobSet,
    model_owner: Vec<usize>,
    /// Every route's `known_models`.
    known_models: std::collections::HashSet<String>,
}

/// Whether a `match.model` entry is a pattern rather than one name.
fn is_glob(s: &str) -> bool {
    s.contains(['*', '?', '[', '{'])
}

/// The first path segment of `path` (`/v1/chat` -> `v1`), if complete.
fn first_segment(path: &str) -> Option<&str> {
    let rest = path.strip_prefix('/')?;
    rest.find('/').map(|i| &rest[..i]).or(Some(rest))
}

impl RouteTable {
    /// Index `routes` (already validated by [`Route::compile`]; `order` is
    /// each route's position).
    pub fn new(routes: Vec<Route>) -> Self {
        let mut table = RouteTable::default();
        let mut models = GlobSetBuilder::new();
        for route in routes {
            let idx = table.routes.len();
            if route.enabled {
                match route.pattern.find('{') {
                    None => table.exact.entry(route.pattern.clone()).or_default().push(idx),
                    Some(i) => {
                        let prefix = route.pattern[..i].to_string();
                        // Only a segment followed by '/' is complete: `/v1/{x}` yes, `/v{x}` no.
                        match first_segment(&prefix).filter(|seg| prefix.len() > seg.len() + 1) {
                            Some(seg) => table.dynamic.entry(seg.to_string()).or_default().push((prefix, idx)),
                            None => table.dynamic_root.push((prefix, idx)),
                        }
                    }
                }
                table.known_models.extend(route.known_models.iter().cloned());
                for glob in &route.model_globs {
                    if let Ok(g) = Glob::new(glob) {
                        models.add(g);
                        table.model_owner.push(idx);
                    }
                }
            }
            table.routes.push(Arc::new(route));
        }
        let routes = &table.routes;
        for list in table.exact.values_mut() {
            list.sort_by_key(|&i| (routes[i].priority, routes[i].order));
        }
        table.models = models.build().unwrap_or_default();
        table
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// The `tokens_total{model}` label for a requested model: the name
    /// itself if a route or upstream names it, else `other`, so clients
    /// cannot grow the label set.
    pub fn model_label<'a>(&self, model: Option<&'a str>) -> &'a str {
        match model {
            None => "-",
            Some(m) if self.known_models.contains(m) => m,
            Some(_) => "other",
        }
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.name == name)
    }

    /// Enabled routes whose path, method, host and headers match, best first
    /// (lowest priority, then load order). The model is checked by [`Self::pick`].
    pub fn candidates(&self, method: &Method, host: Option<&str>, path: &str, headers: &HeaderMap) -> Vec<&Arc<Route>> {
        let mut out: Vec<&Arc<Route>> = Vec::new();
        if let Some(list) = self.exact.get(path) {
            out.extend(
                list.iter()
                    .map(|&i| &self.routes[i])
                    .filter(|r| r.matches_head(method, host, headers)),
            );
        }
        let sorted_so_far = out.len();
        let dynamic = first_segment(path).and_then(|seg| self.dynamic.get(seg));
        for (prefix, idx) in dynamic.into_iter().flatten().chain(self.dynamic_root.iter()) {
            let r = &self.routes[*idx];
            if path.starts_with(prefix.as_str())
                && r.path_router.at(path).is_ok()
                && r.matches_head(method, host, headers)
            {
                out.push(r);
            }
        }
        if out.len() > sorted_so_far && out.len() > 1 {
            out.sort_by_key(|r| (r.priority, r.order));
        }
        out
    }

    /// The first candidate whose model globs accept `model`: one pass of the
    /// shared glob automaton, however many routes match on models.
    pub fn pick<'a>(&self, candidates: &[&'a Arc<Route>], model: Option<&str>) -> Option<&'a Arc<Route>> {
        let owners: Vec<usize> = match model {
            Some(m) if candidates.iter().any(|r| r.model.is_some()) => self
                .models
                .matches(m)
                .into_iter()
                .map(|g| self.model_owner[g])
                .collect(),
            _ => Vec::new(),
        };
        candidates
            .iter()
            .copied()
            .find(|r| r.model.is_none() || owners.contains(&r.order))
    }
}

#[cfg(test)]
mod tests {
    use super::compile_sources;
    use super::*;

    fn config() -> FileConfig {
        serde_norway::from_str(
            "upstreams:\n  a: {provider: openai, endpoints: ['http://127.0.0.1:1']}\n  b: {provider: anthropic, endpoints: ['http://127.0.0.1:2']}\n",
        )
        .unwrap()
    }

    fn table(yaml: &str) -> RouteTable {
        compile_sources(&[(PathBuf::from("t.yaml"), yaml.to_string())], &config()).unwrap()
    }

    #[test]
    fn priority_then_order_and_model_globs() {
        let t = table(
            "routes:\n- {name: any, match: {path: '/v1/{*rest}'}, upstream: a, priority: 200}\n- {name: gpt, match: {path: /v1/chat/completions, methods: [post], model: ['gpt-4*']}, upstream: a}\n- {name: other, match: {path: /v1/chat/completions}, upstream: a, priority: 150}\n",
        );
        let h = HeaderMap::new();
        let c = t.candidates(&Method::POST, None, "/v1/chat/completions", &h);
        let names: Vec<&str> = c.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["gpt", "other", "any"]);
        assert_eq!(t.pick(&c, Some("gpt-4o")).unwrap().name, "gpt");
        assert_eq!(t.pick(&c, Some("claude")).unwrap().name, "other");
        let c = t.candidates(&Method::GET, None, "/v1/chat/completions", &h);
        assert_eq!(c[0].name, "other");
        assert!(t.candidates(&Method::GET, None, "/v2/x", &h).is_empty());
    }

    #[test]
    fn host_and_header_conditions() {
        let t = table(
            "routes:\n- {name: h, match: {path: /x, host: '*.example.com', headers: {x-team: ml}}, upstream: a}\n",
        );
        let mut h = HeaderMap::new();
        assert!(t.candidates(&Method::GET, Some("a.example.com"), "/x", &h).is_empty());
        h.insert("x-team", HeaderValue::from_static("ml"));
        assert_eq!(t.candidates(&Method::GET, Some("A.Example.com"), "/x", &h).len(), 1);
        assert!(t.candidates(&Method::GET, Some("example.com"), "/x", &h).is_empty());
        assert!(t.candidates(&Method::GET, None, "/x", &h).is_empty());
    }

    #[test]
    fn rewrite_templates_use_path_params() {
        let t = table(
            "routes:\n- {name: p, match: {path: '/openai/{*rest}'}, upstream: a, transform: {rewrite_path: '/v1/{rest}'}}\n",
        );
        let r = t.get("p").unwrap();
        let params = r.path_params("/openai/chat/completions");
        assert_eq!(expand_template("/v1/{rest}", &params), "/v1/chat/completions");
    }

    #[test]
    fn invalid_routes_report_every_problem() {
        let err = compile_sources(
            &[(
                PathBuf::from("bad.yaml"),
                "routes:\n- name: ok\n  match: {path: /a}\n  upstream: a\n- name: broken\n  match: {path: nope, methods: ['GE T']}\n  upstream: missing\n  format: anthropic\n- name: ok\n  match: {path: /b}\n  upstream: a\n".into(),
            )],
            &config(),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("bad.yaml:5: route \"broken\": match.path \"nope\" must start with '/'"),
            "{text}"
        );
        assert!(text.contains("not an HTTP method"), "{text}");
        assert!(text.contains("no upstream named \"missing\""), "{text}");
        assert!(
            text.contains("bad.yaml:9: route \"ok\": duplicate route name"),
            "{text}"
        );
    }

    #[test]
    fn retries_are_bounded() {
        let compile = |n: u32| {
            compile_sources(
                &[(
                    PathBuf::from("r.yaml"),
                    format!("routes:\n- {{name: r, match: {{path: /a}}, upstream: a, retries: {n}}}\n"),
                )],
                &config(),
            )
        };
        assert!(compile(MAX_RETRIES).is_ok());
        let text = compile(200).unwrap_err().to_string();
        assert!(text.contains("retries: 200 is more than 10"), "{text}");
    }

    #[test]
    fn routes_that_convert_read_the_body() {
        let table = compile_sources(
            &[(
                PathBuf::from("c.yaml"),
                "routes:\n- {name: c, match: {path: /v1/messages}, upstream: a, format: anthropic}\n".into(),
            )],
            &config(),
        )
        .unwrap();
        assert!(table.routes()[0].buffers_body);
        assert!(converts(Provider::Openai, Format::Anthropic));
        assert!(!converts(Provider::Openai, Format::Openai));
        assert!(!converts(Provider::Http, Format::Gemini));
        assert!(!converts(Provider::Gemini, Format::Passthrough));
        assert!(
            !converts(Provider::Openai, Format::Responses),
            "OpenAI serves /v1/responses itself"
        );
        assert!(converts(Provider::OpenaiCompatible, Format::Responses));
        assert!(converts(Provider::Anthropic, Format::Responses));
        assert!(converts(Provider::Gemini, Format::Responses));
    }

    #[test]
    fn fake_stream_routes_read_the_body_and_keep_their_keepalive_in_bounds() {
        let compile = |extra: &str| {
            compile_sources(
                &[(
                    PathBuf::from("f.yaml"),
                    format!("routes:\n- {{name: f, match: {{path: /v1/chat/completions}}, upstream: a{extra}}}\n"),
                )],
                &config(),
            )
        };
        let table = compile(", fake_stream: true").unwrap();
        assert!(table.routes()[0].buffers_body, "a same-format route reads the body too");
        assert_eq!(table.routes()[0].fake_stream, Some(FAKE_STREAM_KEEPALIVE));
        let every = compile(", fake_stream: true, fake_stream_keepalive: 2s").unwrap();
        assert_eq!(every.routes()[0].fake_stream, Some(Duration::from_secs(2)));
        assert_eq!(compile("").unwrap().routes()[0].fake_stream, None);
        for (extra, problem) in [
            (
                ", fake_stream: true, fake_stream_keepalive: 100ms",
                "between 1s and 60s",
            ),
            (", fake_stream: true, fake_stream_keepalive: 2m", "between 1s and 60s"),
            (", fake_stream_keepalive: 2s", "fake_stream is not"),
        ] {
            let text = compile(extra).unwrap_err().to_string();
            assert!(text.contains(problem), "{extra}: {text}");
        }
    }
}
