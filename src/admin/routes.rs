//! `/api/routes`: routes as written in `routes.d`. Writes validate the whole
//! resulting table first, then change one file atomically and reload, so the
//! files stay the single source of truth. `POST /api/routes/test` explains
//! which route a request would take and what would be sent upstream.

use super::{AdminState, error::ApiError, session::Caller};
use crate::{
    config::{
        env::{self, EnvMask},
        routes_d::{self, RouteConfig},
    },
    proxy::{intake, rewrite},
    router::{RouteEdit, RouteEditError},
};
use axum::{
    Json,
    extract::{Path, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde::Deserialize;
use serde_json::{Value, json};
use std::{collections::BTreeMap, sync::Arc};

impl From<RouteEditError> for ApiError {
    fn from(e: RouteEditError) -> Self {
        match e {
            RouteEditError::NotFound(n) => ApiError::NotFound(format!("no route named {n:?}")),
            RouteEditError::Invalid(errors) => ApiError::Invalid(errors.to_string()),
            RouteEditError::Io(m) => ApiError::Internal(m),
        }
    }
}

fn view(file: &std::path::Path, route: &RouteConfig) -> Value {
    let mut v = json!(route);
    v["file"] = Value::String(
        file.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    v
}

async fn read_all(s: &AdminState) -> Result<Vec<(std::path::PathBuf, RouteConfig)>, ApiError> {
    let dir = s.app.config.routes_dir.clone();
    tokio::task::spawn_blocking(move || crate::router::read_route_configs(&dir))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(ApiError::from)
}

pub async fn list(caller: Caller, State(s): State<Arc<AdminState>>) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    let routes: Vec<Value> = read_all(&s).await?.iter().map(|(f, r)| view(f, r)).collect();
    let reload = s.app.reload.lock().clone();
    let mut out = json!({"routes": routes, "last_reload_error": reload.last_error});
    env_mask(&s).await?.mask_json(&mut out);
    Ok(Json(out))
}

pub async fn get(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    let mut out = read_all(&s)
        .await?
        .iter()
        .find(|(_, r)| r.name == name)
        .map(|(f, r)| view(f, r))
        .ok_or_else(|| ApiError::NotFound(format!("no route named {name:?}")))?;
    env_mask(&s).await?.mask_json(&mut out);
    Ok(Json(out))
}

/// The mask for values that came from the environment: every variable the
/// config file and the route files reference, and every `FASTGATE_*` one.
/// Read afresh (the files change under the API) on a blocking thread.
pub(super) async fn env_mask(s: &AdminState) -> Result<EnvMask, ApiError> {
    let config_path = s.app.config.path.clone();
    let dir = s.app.config.routes_dir.clone();
    tokio::task::spawn_blocking(move || {
        let mut names: Vec<String> = std::env::vars_os()
            .filter_map(|(k, _)| k.into_string().ok())
            .filter(|k| k.starts_with("FASTGATE_"))
            .collect();
        let mut texts: Vec<String> = std::fs::read_to_string(&config_path).into_iter().collect();
        for file in routes_d::route_files(&dir).unwrap_or_default() {
            texts.extend(std::fs::read_to_string(file));
        }
        for t in &texts {
            names.extend(env::referenced(t));
        }
        EnvMask::new(names, |n| std::env::var(n).ok())
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))
}

/// Every `${NAME}` in a route's strings (and map keys), with the field it is in.
fn variable_uses(v: &Value, field: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::String(text) => out.extend(env::referenced(text).into_iter().map(|n| (field.to_string(), n))),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                variable_uses(item, &format!("{field}[{i}]"), out);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                let at = if field.is_empty() {
                    k.clone()
                } else {
                    format!("{field}.{k}")
                };
                out.extend(env::referenced(k).into_iter().map(|n| (at.clone(), n)));
                variable_uses(item, &at, out);
            }
        }
        _ => {}
    }
}

/// Refuse a route written through the API that references a secret's
/// variable (`FASTGATE_*`, or one the config file uses under `secrets`,
/// `admin`, `database`, `cluster` or `key_pools.*.keys`) which the route's
/// version on disk did not already use: such a route would carry the value
/// to an upstream the admin chooses. Operators still write them in files.
async fn refuse_secret_variables(
    s: &AdminState,
    uses: &[(String, String)],
    before: Option<&Value>,
) -> Result<(), ApiError> {
    let config_path = s.app.config.path.clone();
    let secret = tokio::task::spawn_blocking(move || {
        std::fs::read_to_string(config_path)
            .map(|t| env::secret_vars(&t))
            .unwrap_or_default()
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut had = Vec::new();
    if let Some(b) = before {
        variable_uses(b, "", &mut had);
    }
    if let Some((field, name)) = uses
        .iter()
        .find(|(_, n)| env::is_secret_var(n, &secret) && !had.iter().any(|(_, h)| h == n))
    {
        return Err(ApiError::Invalid(format!(
            "{field}: a route written through the admin API may not reference ${{{name}}} \
             (FASTGATE_* variables and those the config file uses under secrets, admin, database, \
             cluster or key_pools.*.keys hold secrets); write it in a routes.d file instead"
        )));
    }
    Ok(())
}

/// Longest route name; names become file names (`routes.d/{name}.yaml`).
const NAME_MAX: usize = 128;
/// Longest header name (map key) in a route.
const KEY_MAX: usize = 256;
/// Longest other string (paths, templates, header values, model names).
const TEXT_MAX: usize = 8 * 1024;
/// Most entries in one list or map of a route (`model_map` excepted).
const ENTRIES_MAX: usize = 64;
/// Most `model_map` entries.
const MODEL_MAP_MAX: usize = 1024;
/// Largest `set_body`, serialized.
const SET_BODY_MAX: usize = 64 * 1024;

/// Bounds on what a route written through the API may hold, each refusal
/// naming the field: the file is read on every reload and the route on
/// every request it matches.
///
/// The name's charset binds new routes only: a route an operator named in a
/// file keeps its name through API edits (it is not a new file name).
fn check_limits(route: &RouteConfig, new: bool) -> Result<(), ApiError> {
    fn walk(v: &Value, field: &str) -> Result<(), ApiError> {
        let too_many = |n: usize| {
            let max = if field == "model_map" {
                MODEL_MAP_MAX
            } else {
                ENTRIES_MAX
            };
            (n > max).then(|| ApiError::Invalid(format!("{field}: at most {max} entries")))
        };
        match v {
            Value::String(t) if t.len() > TEXT_MAX => {
                Err(ApiError::Invalid(format!("{field}: at most {TEXT_MAX} bytes")))
            }
            Value::Array(items) => {
                if let Some(e) = too_many(items.len()) {
                    return Err(e);
                }
                items
                    .iter()
                    .enumerate()
                    .try_for_each(|(i, item)| walk(item, &format!("{field}[{i}]")))
            }
            Value::Object(map) => {
                if let Some(e) = too_many(map.len()) {
                    return Err(e);
                }
                for (k, item) in map {
                    let at = if field.is_empty() {
                        k.clone()
                    } else {
                        format!("{field}.{k}")
                    };
                    if k.len() > KEY_MAX {
                        return Err(ApiError::Invalid(format!("{field}: a key longer than {KEY_MAX} bytes")));
                    }
                    if at == "transform.set_body" {
                        continue; // bounded as a whole below
                    }
                    walk(item, &at)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
    let name_ok = !new
        || (!route.name.is_empty()
            && route.name.len() <= NAME_MAX
            && !route.name.starts_with('.')
            && route
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')));
    if !name_ok {
        return Err(ApiError::Invalid(format!(
            "name: 1 to {NAME_MAX} letters, digits, '-', '_' or '.', not starting with '.'"
        )));
    }
    if let Some(body) = &route.transform.set_body
        && body.to_string().len() > SET_BODY_MAX
    {
        return Err(ApiError::Invalid(format!(
            "transform.set_body: at most {SET_BODY_MAX} bytes"
        )));
    }
    walk(&json!(route), "")
}

/// Apply an edit, record it, reload the live table.
async fn apply(s: &Arc<AdminState>, caller: &Caller, edit: RouteEdit, action: &str) -> Result<Value, ApiError> {
    if !s.app.config.file.cluster.route_api_allowed() {
        return Err(ApiError::Conflict(
            "in cluster mode routes.d is managed as files on every node (ship them and send SIGHUP); \
             cluster.route_api: true lets the admin API edit this node's files"
                .into(),
        ));
    }
    let _serialized = s.route_edits.lock().await;
    let name = match &edit {
        RouteEdit::Upsert(r) => r.name.clone(),
        RouteEdit::Delete(n) => n.clone(),
    };
    let before = read_all(s)
        .await?
        .into_iter()
        .find(|(_, r)| r.name == name)
        .map(|(f, r)| view(&f, &r));
    if let RouteEdit::Upsert(route) = &edit {
        // A toggle changes `enabled` only: the rest is the file's as written.
        if action != "route.toggle" {
            check_limits(route, before.is_none())?;
        }
        let mut uses = Vec::new();
        variable_uses(&json!(route), "", &mut uses);
        refuse_secret_variables(s, &uses, before.as_ref()).await?;
    }
    let app = s.app.clone();
    let e = edit.clone();
    let file = tokio::task::spawn_blocking(move || {
        let file = crate::router::edit_routes(&app.config.routes_dir, &app.config.file, &e)?;
        // Apply now rather than waiting for the file watcher.
        let _ = app.reload_routes();
        Ok::<_, RouteEditError>(file)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    let file = match file {
        Ok(f) => f,
        // Compile errors may quote interpolated text.
        Err(RouteEditError::Invalid(errors)) => {
            return Err(ApiError::Invalid(
                env_mask(s).await?.mask_str(&errors.to_string()).into_owned(),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    let after = match &edit {
        RouteEdit::Upsert(r) => Some(view(&file, r)),
        RouteEdit::Delete(_) => None,
    };
    let (actor, action, target) = (caller.username.clone(), action.to_string(), name.clone());
    let (b, a) = (before.clone(), after.clone());
    s.db(move |c| crate::store::admin_audit::record(c, &actor, &action, Some(&target), b.as_ref(), a.as_ref()))
        .await?;
    let mut out = after.unwrap_or(Value::Null);
    env_mask(s).await?.mask_json(&mut out);
    Ok(out)
}

pub async fn create(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Json(route): Json<RouteConfig>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require_admin()?;
    if read_all(&s).await?.iter().any(|(_, r)| r.name == route.name) {
        return Err(ApiError::Conflict(format!(
            "route {:?} exists; use PUT to change it",
            route.name
        )));
    }
    Ok((
        StatusCode::CREATED,
        Json(apply(&s, &caller, RouteEdit::Upsert(Box::new(route)), "route.create").await?),
    ))
}

pub async fn replace(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Path(name): Path<String>,
    Json(route): Json<RouteConfig>,
) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    if route.name != name {
        return Err(ApiError::Invalid(
            "the body's name must match the route in the URL (renames: create + delete)".into(),
        ));
    }
    if !read_all(&s).await?.iter().any(|(_, r)| r.name == name) {
        return Err(ApiError::NotFound(format!("no route named {name:?}")));
    }
    Ok(Json(
        apply(&s, &caller, RouteEdit::Upsert(Box::new(route)), "route.update").await?,
    ))
}

pub async fn delete(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_admin()?;
    apply(&s, &caller, RouteEdit::Delete(name), "route.delete").await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn toggle(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    let mut route = read_all(&s)
        .await?
        .into_iter()
        .find(|(_, r)| r.name == name)
        .map(|(_, r)| r)
        .ok_or_else(|| ApiError::NotFound(format!("no route named {name:?}")))?;
    route.enabled = !route.enabled;
    Ok(Json(
        apply(&s, &caller, RouteEdit::Upsert(Box::new(route)), "route.toggle").await?,
    ))
}

/// `GET /api/routes/{name}/yaml`: the route as a routes file, for editing.
pub async fn get_yaml(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let route = read_all(&s)
        .await?
        .into_iter()
        .find(|(_, r)| r.name == name)
        .map(|(_, r)| r)
        .ok_or_else(|| ApiError::NotFound(format!("no route named {name:?}")))?;
    let yaml = env_mask(&s).await?.mask_str(&routes_d::route_yaml(&route)).into_owned();
    Ok(([(header::CONTENT_TYPE, "application/yaml")], yaml).into_response())
}

/// `PUT /api/routes/{name}/yaml`: create or replace the route from the text
/// of a routes file holding it. A refusal lists every problem with its line
/// in that text (`error.diagnostics`), so an editor can mark it there.
pub async fn put_yaml(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Path(name): Path<String>,
    text: String,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    // Checked before the text is interpolated and compiled, so that no
    // error message can carry a secret's value.
    let before = read_all(&s)
        .await?
        .into_iter()
        .find(|(_, r)| r.name == name)
        .map(|(f, r)| view(&f, &r));
    let uses: Vec<(String, String)> = env::referenced(&text)
        .into_iter()
        .map(|n| ("yaml".to_string(), n))
        .collect();
    refuse_secret_variables(&s, &uses, before.as_ref()).await?;
    let mask = env_mask(&s).await?;
    let config = s.app.runtime.load().file.clone();
    let route = match crate::router::parse_route_yaml(&text, &config) {
        Ok(r) => r,
        Err(errors) => {
            let diagnostics: Vec<Value> = errors
                .0
                .iter()
                .map(|d| json!({"line": d.line, "message": mask.mask_str(&d.message)}))
                .collect();
            let body = json!({"error": {
                "code": "invalid",
                "message": mask.mask_str(&errors.0.iter().map(|d| format!("line {}: {}", d.line, d.message)).collect::<Vec<_>>().join("\n")),
                "diagnostics": diagnostics,
            }});
            return Ok((StatusCode::BAD_REQUEST, Json(body)).into_response());
        }
    };
    if route.name != name {
        return Err(ApiError::Invalid(format!(
            "the route is named {:?} in the text but {name:?} in the URL (renames: create + delete)",
            route.name
        )));
    }
    let exists = read_all(&s).await?.iter().any(|(_, r)| r.name == name);
    let action = if exists { "route.update" } else { "route.create" };
    let view = apply(&s, &caller, RouteEdit::Upsert(Box::new(route)), action).await?;
    let status = if exists { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(view)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestRequest {
    #[serde(default = "default_method")]
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub body: Option<Value>,
}

fn default_method() -> String {
    "POST".into()
}

/// `POST /api/routes/test`: a dry run against the live table.
pub async fn test(
    caller: Caller,
    State(s): State<Arc<AdminState>>,
    Json(t): Json<TestRequest>,
) -> Result<Json<Value>, ApiError> {
    caller.require_admin()?;
    let table = s.app.routes.load_full();
    let mut out = explain(&table, &s.app.runtime.load().upstreams, &t)?;
    // The rewritten request is built from the live, interpolated routes.
    env_mask(&s).await?.mask_json(&mut out);
    Ok(Json(out))
}

/// Which route `t` would take, why, and the request the upstream would get.
/// Shared by the admin API and `fastgate routes test`.
pub fn explain(
    table: &crate::router::RouteTable,
    upstreams: &std::collections::HashMap<String, Arc<crate::upstream::Upstream>>,
    t: &TestRequest,
) -> Result<Value, ApiError> {
    let method =
        Method::from_bytes(t.method.to_ascii_uppercase().as_bytes()).map_err(|_| ApiError::Invalid("method".into()))?;
    let uri: http::Uri = t
        .path
        .parse()
        .map_err(|_| ApiError::Invalid("path is not a valid URI path".into()))?;
    let mut headers = HeaderMap::new();
    for (k, v) in &t.headers {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()),
            HeaderValue::from_str(v),
        ) else {
            return Err(ApiError::Invalid(format!("header {k:?}")));
        };
        headers.insert(name, value);
    }
    let host = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| h.split(':').next().unwrap_or(h).to_string());
    let candidates = table.candidates(&method, host.as_deref(), uri.path(), &headers);
    let body_bytes = t.body.as_ref().map(|b| bytes::Bytes::from(b.to_string()));
    let model = t
        .body
        .as_ref()
        .and_then(|b| b["model"].as_str().map(str::to_string))
        .or_else(|| {
            uri.path()
                .contains("/models/")
                .then(|| intake::model_from_gemini_path(uri.path()).map(str::to_string))
                .flatten()
        });
    let picked = table.pick(&candidates, model.as_deref());
    let considered: Vec<Value> = candidates
        .iter()
        .map(|r| {
            let why = if picked.is_some_and(|p| p.name == r.name) {
                "selected: lowest priority whose conditions all hold"
            } else if !r.matches_model(model.as_deref()) {
                "model does not match match.model"
            } else {
                "a route with a lower priority (or earlier in load order) was selected"
            };
            json!({"name": r.name, "priority": r.priority, "file": r.file.display().to_string(), "result": why})
        })
        .collect();
    let Some(route) = picked else {
        return Ok(json!({"matched": false, "model": model, "candidates": considered,
            "reason": if candidates.is_empty() { "no enabled route matches this path, method, host and headers" } else { "no candidate accepts this model" }}));
    };
    let upstream = upstreams.get(&route.upstreams[0]);
    let rewritten_path = upstream
        .and_then(|u| u.endpoints.first())
        .map(|ep| rewrite::upstream_path(route, ep, uri.path(), uri.query(), true));
    let rewritten_body = match &body_bytes {
        Some(b) => rewrite::rewrite_body(route, b)
            .map_err(|e| ApiError::Invalid(e.to_string()))?
            .map(|nb| serde_json::from_slice::<Value>(&nb).unwrap_or(Value::Null)),
        None => None,
    };
    let mut sent_headers: BTreeMap<String, String> = t
        .headers
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.to_ascii_lowercase().as_str(),
                "authorization" | "x-api-key" | "x-goog-api-key"
            )
        })
        // As on the data plane: a header holding a gateway key never goes.
        .filter(|(k, v)| !crate::auth::header_holds_gateway_key(k.to_ascii_lowercase().as_bytes(), v.as_bytes()))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    // As on the data plane: a client never picks the account of a pool key.
    if upstream.is_some_and(|u| u.key_pool.is_some()) && !route.forward_account_headers {
        sent_headers.retain(|k, _| !rewrite::is_account_header(k));
    }
    for h in &route.transform.remove_headers {
        sent_headers.remove(h.as_str());
    }
    for (k, v) in &route.transform.set_headers {
        sent_headers.insert(k.to_string(), v.to_str().unwrap_or_default().to_string());
    }
    if let Some(u) = upstream {
        if let Some(ep) = u.endpoints.first() {
            sent_headers.insert("host".into(), ep.authority.clone());
        }
        if u.key_pool.is_some() {
            let header = match u.provider {
                crate::config::Provider::Anthropic => "x-api-key",
                crate::config::Provider::Gemini => "x-goog-api-key",
                _ => "authorization",
            };
            sent_headers.insert(header.into(), "<pool key>".into());
        }
    }
    Ok(json!({
        "matched": true,
        "route": route.name,
        "file": route.file.display().to_string(),
        "model": model,
        "format": route.format.name(),
        "auth": if route.auth == crate::config::routes_d::AuthMode::Required { "required" } else { "none" },
        "upstreams": route.upstreams,
        "reads_body": route.buffers_body || route.model.is_some(),
        "candidates": considered,
        "upstream_request": {
            "method": method.as_str(),
            // The data plane answers 400 instead of sending such a path.
            "refused": rewritten_path.as_deref().and_then(|p| rewrite::safe_path(p).err()).map(|e| e.to_string()),
            "path": rewritten_path,
            "headers": sent_headers,
            "body": rewritten_body.or(t.body.clone()),
        }
    }))
}
