//! Building the route table from `routes.d`: route files parsed by
//! `config::routes_d`, compiled here. Any invalid file fails the whole load,
//! so a reload either swaps in a table built from every file or keeps the
//! previous one.

use super::{Route, RouteTable};
use crate::config::{
    self, ConfigErrors, Diagnostic, FileConfig,
    routes_d::{RouteConfig, RoutesFile, nth_line_of, route_files},
};
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

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
        let text = match config::interpolate(file, raw) {
            Ok(t) => t,
            Err(mut e) => {
                errors.append(&mut e.0);
                continue;
            }
        };
        let parsed: RoutesFile = match config::parse_yaml(file, &text) {
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

/// Parse and check the text of a routes file holding one route, as an
/// editor sends it: every problem with its line in that text.
pub fn parse_route_yaml(text: &str, config: &FileConfig) -> Result<RouteConfig, ConfigErrors> {
    let file = PathBuf::from("route.yaml");
    compile_sources(&[(file.clone(), text.to_string())], config)?;
    let parsed: RoutesFile = config::parse_yaml(&file, text)?;
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
