//! The unit graph of `src/`: a unit is a folder directly under `src/` or a top-level file; an arrow
//! is a `crate::<unit>` path (or `model_service::<unit>` in the binary) written anywhere in a
//! unit's code. Prints the graph floor by floor, and fails on an import circle between units or on
//! an arrow through one of the walls README's "Architecture" section names.
//!
//! `cargo test --release --test architecture -- --nocapture` prints it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The unit a file belongs to: its first path component under `src/`, without `.rs`.
fn unit_of(root: &Path, file: &Path) -> String {
    let first = file.strip_prefix(root).unwrap().components().next().unwrap();
    first.as_os_str().to_string_lossy().trim_end_matches(".rs").to_string()
}

/// Code without comments (a path named in a comment is not an import).
fn code_of(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first path segments after each `prefix` (`crate::a::b` and `crate::{a, b::c}` give `a` and
/// `a`, `b`).
fn first_segments(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (at, _) in code.match_indices(prefix) {
        let before = code[..at].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item = String::new();
            let mut items = Vec::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 1 => items.push(std::mem::take(&mut item)),
                    _ => {}
                }
                if depth == 0 {
                    items.push(std::mem::take(&mut item));
                    break;
                }
                if depth == 1 && c != ',' || depth > 1 {
                    item.push(c);
                }
            }
            for item in items {
                let name: String = item.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

fn unit_graph() -> Graph {
    let root = src();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let units: BTreeSet<String> = files.iter().map(|f| unit_of(&root, f)).collect();
    let mut graph = Graph::new();
    for file in &files {
        let unit = unit_of(&root, file);
        if unit == "lib" {
            continue; // declares the units, imports none
        }
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        let prefix = if unit == "main" { "model_service::" } else { "crate::" };
        let mut targets = first_segments(&code, prefix);
        // `super::x` in a top-level file is the crate root's `x`
        if file.parent() == Some(root.as_path()) {
            targets.extend(first_segments(&code, "super::"));
        }
        let arrows = graph.entry(unit.clone()).or_default();
        arrows.extend(targets.into_iter().filter(|t| units.contains(t) && *t != unit && t != "lib"));
    }
    graph
}

/// Floors from the bottom: a unit's floor is one above the highest unit it imports. `None` when
/// there is a circle.
fn floors(graph: &Graph) -> Option<BTreeMap<String, usize>> {
    let mut floor = BTreeMap::new();
    while floor.len() < graph.len() {
        let before = floor.len();
        for (unit, deps) in graph {
            if floor.contains_key(unit) {
                continue;
            }
            if deps.iter().all(|d| floor.contains_key(d) || !graph.contains_key(d)) {
                let f = deps.iter().filter_map(|d| floor.get(d)).max().map_or(0, |f| f + 1);
                floor.insert(unit.clone(), f);
            }
        }
        if floor.len() == before {
            return None;
        }
    }
    Some(floor)
}

/// One circle, as a path that comes back to its start.
fn a_circle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(g: &Graph, u: &str, stack: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|s| s == u) {
            let mut circle = stack[at..].to_vec();
            circle.push(u.to_string());
            return Some(circle);
        }
        if done.contains(u) {
            return None;
        }
        stack.push(u.to_string());
        for d in g.get(u).into_iter().flatten() {
            if let Some(c) = visit(g, d, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(u.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|u| visit(graph, u, &mut Vec::new(), &mut done))
}

fn print(graph: &Graph) {
    match floors(graph) {
        Some(floor) => {
            let top = floor.values().copied().max().unwrap_or(0);
            for f in (0..=top).rev() {
                for (unit, _) in floor.iter().filter(|(_, uf)| **uf == f) {
                    let deps: Vec<_> = graph[unit].iter().map(String::as_str).collect();
                    println!("floor {f}  {unit:<10} -> {}", deps.join(", "));
                }
            }
        }
        None => {
            for (unit, deps) in graph {
                println!("{unit:<10} -> {}", deps.iter().cloned().collect::<Vec<_>>().join(", "));
            }
        }
    }
}

#[test]
fn the_units_of_src_import_each_other_without_a_circle() {
    let graph = unit_graph();
    print(&graph);
    assert!(graph.len() >= 10, "too few units found: {graph:?}");
    if let Some(circle) = a_circle(&graph) {
        panic!("import circle between units of src/: {}", circle.join(" -> "));
    }
}

/// README "Architecture": the walls. Each unit on the left never imports those on the right.
#[test]
fn the_walls_between_the_units_hold() {
    let walls: [(&str, &[&str]); 4] = [
        ("redis", &["inference", "api", "workers", "service", "webhook", "config", "error", "metrics", "app"]),
        ("inference", &["redis", "api", "workers", "service", "webhook", "app"]),
        ("service", &["api", "workers", "app"]),
        ("workers", &["api", "app"]),
    ];
    let graph = unit_graph();
    let mut breaches = Vec::new();
    for (unit, never) in walls {
        for target in graph.get(unit).into_iter().flatten() {
            if never.contains(&target.as_str()) {
                breaches.push(format!("{unit} -> {target}"));
            }
        }
    }
    assert!(breaches.is_empty(), "arrows through a wall: {breaches:?}");
}

#[test]
fn the_graph_reader_finds_grouped_imports_and_circles() {
    let code = code_of("use crate::{a::X, b};\n// crate::c in a comment\nlet v = crate::d::f();\nmy_crate::e();");
    assert_eq!(first_segments(&code, "crate::").into_iter().collect::<Vec<_>>(), ["a", "b", "d"]);
    let mut g = Graph::new();
    g.insert("x".into(), ["y".to_string()].into());
    g.insert("y".into(), ["z".to_string()].into());
    g.insert("z".into(), BTreeSet::new());
    assert!(a_circle(&g).is_none());
    assert_eq!(floors(&g).unwrap()["x"], 2);
    g.get_mut("z").unwrap().insert("x".into());
    assert_eq!(a_circle(&g).unwrap(), ["x", "y", "z", "x"]);
    assert!(floors(&g).is_none());
}
