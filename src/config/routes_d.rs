//! `routes.d/*.yaml`: route files, loaded in name order into one route table.
//! Any invalid file fails the whole load, so a reload either swaps in a table
//! built from every file or keeps the previous one.

use super::{ConfigErrors, Diagnostic, FileConfig, OneOrMany};
use crate::router::{Route, RouteTable};
use serde::{Deserialize, Serialize};
use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesFile {
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

/// The API format clients speak on a route.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Openai,
    Anthropic,
    Gemini,
    /// OpenAI's Responses API (`POST /v1/responses`, Codex CLI): passed
    /// through to OpenAI, converted toward every other provider.
    Responses,
    /// Whatever the upstream speaks; FastGate does not look into it.
    #[default]
    Passthrough,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Self::Openai => "openai",
            Self::Anthropic => "anthropic",
            Self::Gemini => "gemini",
            Self::Responses => "responses",
            Self::Passthrough => "passthrough",
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    #[default]
    Required,
    None,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: MatchConfig,
    #[serde(default = "default_priority")]
    pub priority: i32,
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default)]
    pub format: Format,
    #[serde(default)]
    pub auth: AuthMode,
    #[serde(default)]
    pub permissions: Vec<String>,
    /// One upstream, or a list tried in order (the rest act as `fallback`).
    pub upstream: OneOrMany<String>,
    #[serde(default)]
    pub fallback: Vec<String>,
    #[serde(default)]
    pub model_map: BTreeMap<String, String>,
    #[serde(default)]
    pub transform: TransformConfig,
    /// Overrides the upstream's `first_byte` timeout on this route.
    #[serde(default)]
    pub timeout: Option<super::HumanDuration>,
    #[serde(default)]
    pub retries: u32,
    /// Forward the client's provider-account headers (`OpenAI-Organization`,
    /// `OpenAI-Project`, `x-goog-user-project`) to a pooled upstream. Off by
    /// default: with them a client picks the account the pool key is billed
    /// to, and a wrong one makes the provider refuse (and FastGate disable)
    /// the pool key.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forward_account_headers: bool,
    /// The endpoint may be called twice for one request (a retry after a
    /// 5xx, a timeout or a connection lost after the body was sent cannot
    /// double-bill): off for generation endpoints, which bill each call.
    #[serde(default)]
    pub idempotent: bool,
    /// Per gateway key, on this route.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// Clients that ask to stream get a stream made from the upstream's
    /// whole answer: the upstream is asked without streaming, the client
    /// gets its stream header and keepalives at once (short first-byte
    /// timeouts survive slow reasoning models), then the whole answer as
    /// its format's stream.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fake_stream: bool,
    /// How often a fake stream's keepalive is sent while the upstream
    /// thinks (default 5 s; 1 s to 60 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fake_stream_keepalive: Option<super::HumanDuration>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
}

fn default_priority() -> i32 {
    100
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    pub path: String,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub model: OneOrMany<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TransformConfig {
    #[serde(default)]
    pub strip_prefix: Option<String>,
    #[serde(default)]
    pub rewrite_path: Option<String>,
    #[serde(default)]
    pub set_headers: BTreeMap<String, String>,
    #[serde(default)]
    pub remove_headers: Vec<String>,
    #[serde(default)]
    pub set_body: Option<serde_json::Value>,
}

/// The `*.yaml` / `*.yml` files of `dir`, in name order.
pub fn route_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    Ok(files)
}

/// Load and compile every route file of `dir` against `config`.
pub fn load_routes(dir: &Path, config: &FileConfig) -> Result<RouteTable, ConfigErrors> {
    let files = route_files(dir).map_err(|e| {
        ConfigErrors(vec![Diagnostic {
            file: dir.to_path_buf(),
            line: 1,
            message: format!("cannot read routes directory: {e}"),
        }])
    })?;
    let mut sources = Vec::with_capacity(files.len());
    let mut errors = Vec::new();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => sources.push((file, text)),
            Err(e) => errors.push(Diagnostic {
                file,
                line: 1,
                message: format!("cannot read: {e}"),
            }),
        }
    }
    match compile_sources(&sources, config) {
        Ok(table) if errors.is_empty() => Ok(table),
        Ok(_) => Err(ConfigErrors(errors)),
        Err(mut e) => {
            errors.append(&mut e.0);
            Err(ConfigErrors(errors))
        }
    }
}

/// Compile route files given as `(path, text)` pairs, in the given order.
pub fn compile_sources(sources: &[(PathBuf, String)], config: &FileConfig) -> Result<RouteTable, ConfigErrors> {
    let mut errors = Vec::new();
    let mut routes = Vec::new();
    let mut seen: HashMap<String, PathBuf> = HashMap::new();
    let mut seen_in_file: HashMap<String, usize> = HashMap::new();
    for (file, raw) in sources {
        let text = match super::interpolate(file, raw) {
            Ok(t) => t,
            Err(mut e) => {
                errors.append(&mut e.0);
                continue;
            }
        };
        let parsed: RoutesFile = match super::parse_yaml(file, &text) {
            Ok(p) => p,
            Err(mut e) => {
                errors.append(&mut e.0);
                continue;
            }
        };
        seen_in_file.clear();
        for rc in parsed.routes {
            // The n-th route with this name in this file sits at the n-th `name:` line.
            let nth = seen_in_file.entry(rc.name.clone()).or_insert(0);
            let line = nth_line_of(&text, &format!("name: {}", rc.name), *nth);
            *nth += 1;
            let mut diag = |message: String| {
                errors.push(Diagnostic {
                    file: file.clone(),
                    line,
                    message: format!("route {:?}: {message}", rc.name),
                })
            };
            if let Some(first) = seen.get(&rc.name) {
                diag(format!("duplicate route name (first defined in {})", first.display()));
                continue;
            }
            seen.insert(rc.name.clone(), file.clone());
            match Route::compile(&rc, routes.len(), file, config) {
                Ok(route) => routes.push(route),
                Err(problems) => problems.into_iter().for_each(&mut diag),
            }
        }
    }
    if errors.is_empty() {
        Ok(RouteTable::new(routes))
    } else {
        Err(ConfigErrors(errors))
    }
}

/// One route as the text of a routes file (`routes: [ … ]`), for editing.
pub fn route_yaml(route: &RouteConfig) -> String {
    serde_norway::to_string(&RoutesFile {
        routes: vec![route.clone()],
    })
    .unwrap_or_default()
}

/// Parse and check the text of a routes file holding one route, as an
/// editor sends it: every problem with its line in that text.
pub fn parse_route_yaml(text: &str, config: &FileConfig) -> Result<RouteConfig, ConfigErrors> {
    let file = PathBuf::from("route.yaml");
    compile_sources(&[(file.clone(), text.to_string())], config)?;
    let parsed: RoutesFile = super::parse_yaml(&file, text)?;
    let mut routes = parsed.routes;
    if routes.len() != 1 {
        return Err(ConfigErrors(vec![Diagnostic {
            file,
            line: 1,
            message: format!("expected exactly one route under `routes:`, found {}", routes.len()),
        }]));
    }
    Ok(routes.remove(0))
}

/// The line of the `n`-th (0-based) line containing `needle`; line 1 if absent.
fn nth_line_of(text: &str, needle: &str, n: usize) -> usize {
    // `name: ok` must not match `name: okay`: the needle ends at a boundary.
    let holds = |line: &str| {
        line.match_indices(needle).any(|(i, _)| {
            line[i + needle.len()..]
                .chars()
                .next()
                .is_none_or(|c| c.is_whitespace() || matches!(c, ',' | '}' | '#'))
        })
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| holds(l))
        .nth(n)
        .map_or(1, |(i, _)| i + 1)
}

/// A change to the route files made through the admin API.
#[derive(Debug, Clone)]
pub enum RouteEdit {
    /// Create the route, or replace the route with this name where it is defined.
    Upsert(Box<RouteConfig>),
    Delete(String),
}

#[derive(Debug, thiserror::Error)]
pub enum RouteEditError {
    #[error("no route named {0:?}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(ConfigErrors),
    #[error("routes.d: {0}")]
    Io(String),
}

/// Every route as written in the files (not interpolated), with its file.
pub fn read_route_configs(dir: &Path) -> Result<Vec<(PathBuf, RouteConfig)>, RouteEditError> {
    let mut out = Vec::new();
    for file in route_files(dir).map_err(|e| RouteEditError::Io(e.to_string()))? {
        let text = std::fs::read_to_string(&file).map_err(|e| RouteEditError::Io(e.to_string()))?;
        let parsed: RoutesFile = super::parse_yaml(&file, &text).map_err(RouteEditError::Invalid)?;
        out.extend(parsed.routes.into_iter().map(|r| (file.clone(), r)));
    }
    Ok(out)
}

/// Drop nulls, empty lists and empty maps, so written files stay readable.
fn tidy(v: serde_json::Value) -> Option<serde_json::Value> {
    use serde_json::Value;
    match v {
        Value::Null => None,
        Value::Array(a) if a.is_empty() => None,
        Value::Array(a) => Some(Value::Array(a.into_iter().filter_map(tidy).collect())),
        Value::Object(m) => {
            let m: serde_json::Map<String, Value> =
                m.into_iter().filter_map(|(k, v)| tidy(v).map(|v| (k, v))).collect();
            (!m.is_empty()).then_some(Value::Object(m))
        }
        other => Some(other),
    }
}

fn to_yaml(file: &RoutesFile) -> Result<String, RouteEditError> {
    let mut routes = Vec::new();
    for r in &file.routes {
        let v = serde_json::to_value(r).map_err(|e| RouteEditError::Io(e.to_string()))?;
        let mut v = tidy(v).unwrap_or_default();
        // `match` must stay even when only `path` is set; tidy never drops it since path is required.
        if let Some(obj) = v.as_object_mut() {
            obj.entry("enabled").or_insert(serde_json::Value::Bool(r.enabled));
        }
        routes.push(v);
    }
    let doc = serde_json::json!({ "routes": routes });
    let yaml = serde_norway::to_string(&doc).map_err(|e| RouteEditError::Io(e.to_string()))?;
    Ok(format!(
        "# Written by the FastGate admin API; edits here are fine too.\n{yaml}"
    ))
}

/// Apply `edit`: validate the whole resulting route table in memory, then
/// write the one changed file atomically (temp file + rename). Nothing is
/// written when validation fails. Returns the file written or removed.
pub fn edit_routes(dir: &Path, config: &FileConfig, edit: &RouteEdit) -> Result<PathBuf, RouteEditError> {
    let io = |e: std::io::Error| RouteEditError::Io(e.to_string());
    let files = route_files(dir).map_err(io)?;
    let mut sources: Vec<(PathBuf, String)> = Vec::with_capacity(files.len() + 1);
    for f in &files {
        sources.push((f.clone(), std::fs::read_to_string(f).map_err(io)?));
    }
    let name = match edit {
        RouteEdit::Upsert(r) => r.name.clone(),
        RouteEdit::Delete(n) => n.clone(),
    };
    let mut holder = None;
    for (i, (file, text)) in sources.iter().enumerate() {
        let parsed: RoutesFile = super::parse_yaml(file, text).map_err(RouteEditError::Invalid)?;
        if let Some(pos) = parsed.routes.iter().position(|r| r.name == name) {
            holder = Some((i, parsed, pos));
            break;
        }
    }
    let (target, new_text): (PathBuf, Option<String>) = match (edit, holder) {
        (RouteEdit::Upsert(route), Some((i, mut parsed, pos))) => {
            parsed.routes[pos] = (**route).clone();
            (sources[i].0.clone(), Some(to_yaml(&parsed)?))
        }
        (RouteEdit::Upsert(route), None) => {
            let file = dir.join(format!("{}.yaml", route.name));
            if file.exists() {
                return Err(RouteEditError::Io(format!(
                    "{} exists but does not define {name:?}",
                    file.display()
                )));
            }
            (
                file,
                Some(to_yaml(&RoutesFile {
                    routes: vec![(**route).clone()],
                })?),
            )
        }
        (RouteEdit::Delete(_), Some((i, mut parsed, pos))) => {
            parsed.routes.remove(pos);
            let text = (!parsed.routes.is_empty()).then(|| to_yaml(&parsed)).transpose()?;
            (sources[i].0.clone(), text)
        }
        (RouteEdit::Delete(n), None) => return Err(RouteEditError::NotFound(n.clone())),
    };
    sources.retain(|(f, _)| f != &target);
    if let Some(text) = &new_text {
        sources.push((target.clone(), text.clone()));
        sources.sort_by(|a, b| a.0.cmp(&b.0));
    }
    compile_sources(&sources, config).map_err(RouteEditError::Invalid)?;
    match new_text {
        Some(text) => {
            let tmp = target.with_extension("yaml.tmp");
            std::fs::write(&tmp, text).map_err(io)?;
            std::fs::rename(&tmp, &target).map_err(io)?;
        }
        None => std::fs::remove_file(&target).map_err(io)?,
    }
    Ok(target)
}

#[cfg(test)]
mod yaml_edit_tests {
    use super::*;

    #[test]
    fn an_edited_route_reports_a_typo_at_its_own_line() {
        let config: FileConfig =
            serde_norway::from_str("upstreams:\n  oai: {provider: openai, endpoints: ['http://127.0.0.1:1']}\n")
                .unwrap();
        let file: RoutesFile = serde_norway::from_str(
            "routes:\n  - { name: keyed, match: { path: /keyed/v1/chat/completions }, format: openai, upstream: oai, transform: { strip_prefix: /keyed } }\n",
        )
        .unwrap();
        let text = route_yaml(&file.routes[0]);
        assert_eq!(
            parse_route_yaml(&text, &config).unwrap().name,
            "keyed",
            "what it writes, it reads"
        );
        // A misspelt key at the route's own indentation, after every other key.
        let indent = text
            .lines()
            .find_map(|l| l.strip_suffix("retries: 0").filter(|i| i.trim().is_empty()))
            .unwrap();
        let broken = format!("{}\n{indent}retires: 2\n", text.trim_end());
        let line = broken.trim_end().lines().count();
        let errors = parse_route_yaml(&broken, &config).unwrap_err();
        assert_eq!(errors.0[0].line, line, "{}", errors.0[0].message);
        assert!(errors.0[0].message.contains("retires"), "{}", errors.0[0].message);
        // Two routes where one is expected.
        let two = format!(
            "{text}{}",
            text.trim_start_matches("routes:\n").replace("keyed", "other")
        );
        let errors = parse_route_yaml(&two, &config).unwrap_err();
        assert!(errors.0[0].message.contains("exactly one route"), "{errors:?}");
    }
}
