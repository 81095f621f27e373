//! Reading `fastgate.yaml`: environment interpolation, parsing, and
//! validation that reports every problem at once as `file:line: message`.

use super::*;

/// Read the main config file, interpolate, parse and validate it.
pub fn load_config(path: &Path) -> Result<Config, ConfigErrors> {
    let raw = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![Diagnostic {
            file: path.to_path_buf(),
            line: 1,
            message: format!("cannot read: {e}"),
        }])
    })?;
    parse_config(path, &raw)
}

/// Parse and validate config text as if read from `path`.
pub fn parse_config(path: &Path, raw: &str) -> Result<Config, ConfigErrors> {
    let text = interpolate(path, raw)?;
    let file: FileConfig = parse_yaml(path, &text)?;
    let mut errors = Vec::new();
    let at = |needle: &str| line_of(&text, needle);
    let diag = |line: usize, message: String| Diagnostic {
        file: path.to_path_buf(),
        line,
        message,
    };

    let listen = match file.server.listen.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            errors.push(diag(
                at("listen:"),
                format!(
                    "server.listen: {:?} is not an address like 0.0.0.0:8080",
                    file.server.listen
                ),
            ));
            None
        }
    };
    let admin_listen = match file.admin.listen.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            errors.push(diag(
                at("listen:"),
                format!(
                    "admin.listen: {:?} is not an address like 127.0.0.1:9090",
                    file.admin.listen
                ),
            ));
            None
        }
    };
    if let Some(tls) = &file.server.tls {
        if tls.cert.is_some() != tls.key.is_some() {
            errors.push(diag(at("tls:"), "server.tls: `cert` and `key` go together".into()));
        } else if tls.pairs().is_empty() {
            errors.push(diag(
                at("tls:"),
                "server.tls: needs `cert` and `key`, or `certificates: [{cert, key}, ...]`".into(),
            ));
        }
        if file.server.h2c {
            errors.push(diag(
                at("h2c:"),
                "server.h2c: h2c is for plain listeners; with TLS, HTTP/2 is offered by ALPN (`tls.h2`)".into(),
            ));
        }
    }
    match crate::client_addr::TrustedProxies::parse(&file.server.trusted_proxies) {
        Ok(t) if t.is_empty() && file.server.proxy_protocol => errors.push(diag(
            at("proxy_protocol:"),
            "server.proxy_protocol: list the balancers' addresses in server.trusted_proxies (no one else may send a PROXY header)".into(),
        )),
        Ok(_) => {}
        Err(bad) => errors.extend(bad.into_iter().map(|m| diag(at("trusted_proxies:"), m))),
    }
    let limits = &file.server.limits;
    if limits.max_header_bytes.0 < 1024 || limits.max_uri_bytes.0 < 256 || limits.max_header_value_bytes.0 < 256 {
        errors.push(diag(
            at("limits:"),
            "server.limits: max_header_bytes must be at least 1KiB, max_uri_bytes and max_header_value_bytes at least 256 bytes".into(),
        ));
    }
    if limits.client_body_timeout.0 < Duration::from_millis(100) {
        errors.push(diag(
            at("client_body_timeout:"),
            "server.limits.client_body_timeout must be at least 100ms".into(),
        ));
    }
    if limits.client_header_timeout.0 < Duration::from_millis(100) {
        errors.push(diag(
            at("client_header_timeout:"),
            "server.limits.client_header_timeout must be at least 100ms".into(),
        ));
    }
    if file.audit.queue_size == 0 || file.audit.batch_size == 0 {
        errors.push(diag(
            at("audit:"),
            "audit.queue_size and audit.batch_size must be greater than zero".into(),
        ));
    }
    if let Err(bad) = crate::pricing::PriceTable::build(&file.pricing) {
        errors.extend(bad.into_iter().map(|e| diag(at("pricing:"), e.to_string())));
    }
    errors.extend(file.budgets.check().into_iter().map(|e| diag(at("budgets:"), e)));
    for (name, up) in &file.upstreams {
        let line = at(&format!("{name}:"));
        if up.provider == Provider::Mock {
            if !up.endpoints.is_empty() {
                errors.push(diag(
                    line,
                    format!("upstreams.{name}: a mock upstream has no endpoints"),
                ));
            }
        } else {
            if up.endpoints.is_empty() {
                errors.push(diag(
                    line,
                    format!("upstreams.{name}.endpoints: at least one endpoint is required"),
                ));
            }
            if up.mock.is_some() {
                errors.push(diag(
                    line,
                    format!("upstreams.{name}.mock: only a `provider: mock` upstream takes mock settings"),
                ));
            }
        }
        for ep in &up.endpoints {
            if let Err(e) = endpoint::EndpointUrl::parse(ep) {
                errors.push(diag(at(ep), format!("upstreams.{name}.endpoints: {e}")));
            }
        }
        for rule in &up.capabilities {
            if let Err(e) = capabilities::valid_pattern(&rule.pattern) {
                errors.push(diag(
                    line,
                    format!("upstreams.{name}.capabilities: match {:?}: {e}", rule.pattern),
                ));
            }
        }
        if let Some(pool) = &up.key_pool
            && !file.key_pools.contains_key(pool)
        {
            errors.push(diag(
                at(&format!("key_pool: {pool}")),
                format!("upstreams.{name}.key_pool: no key pool named {pool:?} in key_pools"),
            ));
        }
        if up.timeouts.connect.0.is_zero() || up.timeouts.first_byte.0.is_zero() || up.timeouts.idle.0.is_zero() {
            errors.push(diag(
                line,
                format!("upstreams.{name}.timeouts: timeouts must be greater than zero"),
            ));
        }
    }
    for (name, pool) in &file.key_pools {
        let line = at(&format!("{name}:"));
        let c = &pool.cooldown;
        if c.initial.0.is_zero() || c.max.0 < c.initial.0 || !(c.multiplier >= 1.0 && c.multiplier <= 100.0) {
            errors.push(diag(
                line,
                format!("key_pools.{name}.cooldown: needs initial > 0, max >= initial and 1 <= multiplier <= 100"),
            ));
        }
        if c.max_wait.0 < c.initial.0 || c.max_wait.0 > Duration::from_secs(366 * 24 * 3600) || c.after_5xx == 0 {
            errors.push(diag(
                line,
                format!("key_pools.{name}.cooldown: needs initial <= max_wait <= 366d and after_5xx >= 1"),
            ));
        }
        if pool.keys.iter().any(|k| k.weight() == 0) {
            errors.push(diag(
                line,
                format!("key_pools.{name}.keys: a weight must be at least 1"),
            ));
        }
        if pool.stuck_after.0.is_zero() {
            errors.push(diag(
                line,
                format!("key_pools.{name}.stuck_after must be greater than zero"),
            ));
        }
        let reprobe = pool.reprobe_interval.0;
        if !reprobe.is_zero() && reprobe < Duration::from_secs(1) {
            errors.push(diag(
                line,
                format!("key_pools.{name}.reprobe_interval must be 0 (never) or at least 1s"),
            ));
        }
    }
    for (name, up) in &file.upstreams {
        if let Some(hc) = &up.health_check
            && (hc.interval.0.is_zero() || hc.timeout.0.is_zero() || hc.rise == 0 || hc.fall == 0)
        {
            errors.push(diag(
                at("health_check"),
                format!("upstreams.{name}.health_check: interval, timeout, rise and fall must be greater than zero"),
            ));
        }
        let pct = up.retry_budget.percent;
        if !(0.0..=100.0).contains(&pct) {
            errors.push(diag(
                at("retry_budget"),
                format!("upstreams.{name}.retry_budget.percent must be between 0 and 100 (got {pct})"),
            ));
        }
    }
    if !file.cluster.postgres.is_empty()
        && let Err(e) = file.cluster.postgres.parse::<tokio_postgres::Config>()
    {
        errors.push(diag(at("postgres:"), format!("cluster.postgres: {e}")));
    }
    if let Some(ca) = &file.cluster.ca_file
        && let Err(e) = ca_roots::load(ca)
    {
        errors.push(diag(at("ca_file:"), format!("cluster.ca_file: {e}")));
    }
    if file.cluster.enabled() {
        let c = &file.cluster;
        if let Err(e) = url::Url::parse(&c.redis)
            .map_err(|e| e.to_string())
            .and_then(|u| match u.scheme() {
                "redis" | "rediss" => Ok(()),
                s => Err(format!("scheme {s}: use redis:// or rediss://")),
            })
        {
            errors.push(diag(at("redis:"), format!("cluster.redis: {e}")));
        }
        if c.timeout.0.is_zero() || c.rate_window.0 < Duration::from_secs(1) {
            errors.push(diag(
                at("cluster:"),
                "cluster: timeout must be greater than zero and rate_window at least 1s".into(),
            ));
        }
    }
    // Secrets: each guards the whole gateway alone (see `strength`).
    for (setting, key, value) in [
        ("admin.token", "token:", &file.admin.token),
        ("admin.jwt_secret", "jwt_secret:", &file.admin.jwt_secret),
        ("admin.metrics_token", "metrics_token:", &file.admin.metrics_token),
        ("secrets.master_key", "master_key:", &file.secrets.master_key),
    ] {
        if let Some(message) = strength::weakness(setting, value) {
            errors.push(diag(key_line(&text, key), message));
        }
    }
    let a = &file.admin;
    if a.header_timeout.0.is_zero() || a.idle_timeout.0.is_zero() || a.max_connections == 0 || a.max_body.0 == 0 {
        errors.push(diag(
            at("admin:"),
            "admin: header_timeout, idle_timeout, max_connections and max_body must be greater than zero".into(),
        ));
    }
    if let Some(tls) = &a.tls
        && (tls.cert.is_some() != tls.key.is_some() || tls.pairs().is_empty())
    {
        errors.push(diag(
            key_line(&text, "tls:").max(at("admin:")),
            "admin.tls: needs `cert` and `key`, or `certificates: [{cert, key}, ...]`".into(),
        ));
    }
    if let Some(otel) = &file.otel {
        errors.extend(otel.problems().into_iter().map(|m| diag(key_line(&text, "otel:"), m)));
    }
    if file.server.max_request_body.0 == 0 {
        errors.push(diag(
            at("max_request_body"),
            "server.max_request_body must be greater than zero".into(),
        ));
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    // Relative paths are relative to the working directory, like nginx's
    // prefix: run from the install directory (systemd: WorkingDirectory=).
    let routes_dir = file.routes_dir.clone();
    let database_path = file.database.path.clone();
    Ok(Config {
        listen: listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080))),
        admin_listen: admin_listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9090))),
        file,
        path: path.to_path_buf(),
        routes_dir,
        database_path,
    })
}

/// Interpolate environment variables, reporting unset ones with their line.
pub(crate) fn interpolate(path: &Path, raw: &str) -> Result<String, ConfigErrors> {
    env::interpolate(raw, |name| std::env::var(name).ok()).map_err(|missing| {
        ConfigErrors(
            missing
                .into_iter()
                .map(|m| Diagnostic {
                    file: path.to_path_buf(),
                    line: m.line,
                    message: format!(
                        "environment variable {} is not set (write ${{{}:-default}} to make it optional)",
                        m.name, m.name
                    ),
                })
                .collect(),
        )
    })
}

/// Parse YAML into `T`, turning serde errors into a located diagnostic.
pub(crate) fn parse_yaml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigErrors> {
    serde_norway::from_str(text).map_err(|e| {
        let line = e.location().map_or(1, |l| l.line());
        // serde_norway appends " at line X column Y"; the prefix says it already.
        let msg = e.to_string();
        let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
        ConfigErrors(vec![Diagnostic {
            file: path.to_path_buf(),
            line,
            message: msg,
        }])
    })
}

/// The first line whose key is `key` (`token:` finds `  token: x`, not
/// `  metrics_token: x`); falls back to line 1.
fn key_line(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| l.trim_start().starts_with(key))
        .map_or(1, |i| i + 1)
}

/// The first line containing `needle`, for pointing at semantic errors that
/// serde cannot locate. Falls back to line 1.
pub(crate) fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).map_or(1, |i| i + 1)
}
