//! Route files edited through the admin API: the whole resulting table is
//! compiled in memory before one file is written.

use super::compile_sources;
use crate::config::{
    self, ConfigErrors, FileConfig,
    routes_d::{RouteConfig, RoutesFile, route_files},
};
use std::path::{Path, PathBuf};

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
        let parsed: RoutesFile = config::parse_yaml(&file, &text).map_err(RouteEditError::Invalid)?;
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
        let parsed: RoutesFile = config::parse_yaml(file, text).map_err(RouteEditError::Invalid)?;
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
    use crate::{config::routes_d::route_yaml, router::parse_route_yaml};

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
