//! The house's floors point one way: no import cycle between the crate's
//! top-level modules (`src/lib.rs`'s `mod` items). Each module's files are
//! parsed (`syn`), following `mod` declarations and skipping `#[cfg(test)]`
//! items (tests may assemble higher floors), and every `crate::<module>`
//! path, in `use` trees and in code, is an edge. A new cycle fails here
//! with the edges that close it and the files that make them.

#![allow(clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};
use syn::visit::Visit;

type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<PathBuf>>>;

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs
        .iter()
        .any(|a| a.path().is_ident("cfg") && a.parse_args::<syn::Meta>().is_ok_and(|m| m.path().is_ident("test")))
}

fn item_attrs(item: &syn::Item) -> &[syn::Attribute] {
    match item {
        syn::Item::Const(i) => &i.attrs,
        syn::Item::Enum(i) => &i.attrs,
        syn::Item::Fn(i) => &i.attrs,
        syn::Item::Impl(i) => &i.attrs,
        syn::Item::Macro(i) => &i.attrs,
        syn::Item::Mod(i) => &i.attrs,
        syn::Item::Static(i) => &i.attrs,
        syn::Item::Struct(i) => &i.attrs,
        syn::Item::Trait(i) => &i.attrs,
        syn::Item::Type(i) => &i.attrs,
        syn::Item::Union(i) => &i.attrs,
        syn::Item::Use(i) => &i.attrs,
        _ => &[],
    }
}

/// The top-level modules a file names through `crate::`.
#[derive(Default)]
struct Names {
    found: BTreeSet<String>,
}

impl Names {
    fn use_tree(&mut self, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                self.found.insert(p.ident.to_string());
            }
            syn::UseTree::Name(n) => {
                self.found.insert(n.ident.to_string());
            }
            syn::UseTree::Rename(r) => {
                self.found.insert(r.ident.to_string());
            }
            syn::UseTree::Group(g) => g.items.iter().for_each(|t| self.use_tree(t)),
            syn::UseTree::Glob(_) => {}
        }
    }
}

impl<'ast> Visit<'ast> for Names {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        if !is_cfg_test(item_attrs(item)) {
            syn::visit::visit_item(self, item);
        }
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if !is_cfg_test(&f.attrs) {
            syn::visit::visit_impl_item_fn(self, f);
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        // `use crate::{a, b::c}` / `use crate::a::b`.
        if let syn::UseTree::Path(p) = &u.tree
            && p.ident == "crate"
        {
            self.use_tree(&p.tree);
        }
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let mut segments = path.segments.iter();
        if let (Some(first), Some(second)) = (segments.next(), segments.next())
            && first.ident == "crate"
        {
            self.found.insert(second.ident.to_string());
        }
        syn::visit::visit_path(self, path);
    }
}

/// The `mod x;` declarations of a file, not under `#[cfg(test)]`, with the
/// inline modules' contents visited as part of the file.
fn child_files(file: &Path, ast: &syn::File) -> Vec<PathBuf> {
    let name = file.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
    let dir = file.parent().unwrap_or(Path::new("."));
    // `a/mod.rs` and `lib.rs` hold their children beside them; `a.rs` in `a/`.
    let base = if matches!(name, "mod" | "lib" | "main") {
        dir.to_path_buf()
    } else {
        dir.join(name)
    };
    let mut out = Vec::new();
    fn walk(items: &[syn::Item], base: &Path, out: &mut Vec<PathBuf>) {
        for item in items {
            let syn::Item::Mod(m) = item else { continue };
            if is_cfg_test(&m.attrs) {
                continue;
            }
            let child = base.join(m.ident.to_string());
            match &m.content {
                Some((_, inner)) => walk(inner, &child, out),
                None => {
                    let flat = child.with_extension("rs");
                    out.push(if flat.exists() { flat } else { child.join("mod.rs") });
                }
            }
        }
    }
    walk(&ast.items, &base, &mut out);
    out
}

fn parse(file: &Path) -> syn::File {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

/// Edges between the top-level modules of the crate rooted at `src`.
fn crate_graph(src: &Path) -> Graph {
    let lib = src.join("lib.rs");
    let roots = child_files(&lib, &parse(&lib));
    let modules: BTreeSet<String> = roots
        .iter()
        .map(|p| {
            let stem = p.file_stem().unwrap().to_string_lossy();
            if stem == "mod" {
                p.parent().unwrap().file_name().unwrap().to_string_lossy().into_owned()
            } else {
                stem.into_owned()
            }
        })
        .collect();
    let mut graph = Graph::new();
    for (module, root) in modules.iter().zip(&roots) {
        graph.entry(module.clone()).or_default();
        let mut files = vec![root.clone()];
        while let Some(file) = files.pop() {
            let ast = parse(&file);
            files.extend(child_files(&file, &ast));
            let mut names = Names::default();
            names.visit_file(&ast);
            for target in names.found.into_iter().filter(|t| t != module && modules.contains(t)) {
                graph
                    .entry(module.clone())
                    .or_default()
                    .entry(target)
                    .or_default()
                    .insert(file.clone());
            }
        }
    }
    graph
}

/// The strongly connected components with more than one module (Tarjan).
fn cycles(graph: &Graph) -> Vec<BTreeSet<String>> {
    struct Walk<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        found: Vec<BTreeSet<String>>,
    }
    impl<'g> Walk<'g> {
        fn visit(&mut self, v: &'g str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            for w in self.graph.get(v).into_iter().flat_map(|e| e.keys()) {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if self.stack.contains(&w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = BTreeSet::new();
                while let Some(w) = self.stack.pop() {
                    component.insert(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(v);
        }
    }
    walk.found
}

#[test]
fn top_level_modules_import_each_other_in_no_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = crate_graph(&src);
    assert!(
        graph.len() > 15,
        "the walk found the crate's modules: {:?}",
        graph.keys()
    );
    assert!(
        graph.values().map(|e| e.len()).sum::<usize>() > 40,
        "the walk found the crate's imports"
    );
    let mut report = String::new();
    for component in cycles(&graph) {
        report.push_str(&format!("\ncircle: {component:?}\n"));
        for from in &component {
            for (to, files) in &graph[from] {
                if component.contains(to) {
                    report.push_str(&format!("  {from} -> {to}: {files:?}\n"));
                }
            }
        }
    }
    assert!(
        report.is_empty(),
        "top-level modules import each other in a circle; give the lower one a narrow handle or move the shared type down:{report}"
    );
}

#[test]
fn the_check_sees_a_circle_through_uses_paths_and_inline_modules() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::write(
        src.join("lib.rs"),
        "pub mod a;\npub mod b;\npub mod c;\n#[cfg(test)]\nmod t;\n",
    )
    .unwrap();
    std::fs::create_dir(src.join("b")).unwrap();
    // a -> b through a grouped `use`; b -> c through a path in a child file;
    // c -> a through an inline module. A test-only `c -> b` is not an edge.
    std::fs::write(src.join("a.rs"), "use crate::{b::{self, X}, clock};\n").unwrap();
    std::fs::write(src.join("b/mod.rs"), "mod inner;\n").unwrap();
    std::fs::write(src.join("b/inner.rs"), "fn f() { crate::c::g(); }\n").unwrap();
    std::fs::write(
        src.join("c.rs"),
        "mod deep { fn h() -> crate::a::T { todo!() } }\n#[cfg(test)]\nmod tests { use crate::b; }\n",
    )
    .unwrap();
    let graph = crate_graph(src);
    assert_eq!(graph["a"].keys().collect::<Vec<_>>(), ["b"]);
    assert_eq!(graph["b"].keys().collect::<Vec<_>>(), ["c"]);
    assert_eq!(
        graph["c"].keys().collect::<Vec<_>>(),
        ["a"],
        "test-only imports are not edges"
    );
    let found = cycles(&graph);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0], ["a", "b", "c"].map(String::from).into());
    // Break one edge: no circle.
    std::fs::write(src.join("c.rs"), "fn h() {}\n").unwrap();
    assert!(cycles(&crate_graph(src)).is_empty());
}
