//! Imports point down: cli → check, report → graph → kinds → spec → analysis → engine → model,
//! with error, output and panics beside (importable from anywhere, importing only each other).
//! Every `crate::` path in src/ (in `use` lines and inline) is read, resolved to the top-level
//! module it names, and must not name a module above its own file's (docs/architecture.md).
mod common;

use std::collections::BTreeMap;
use std::path::Path;

/// Top-level modules from the top down; a module may import its own rank or below.
const LAYERS: &[&[&str]] = &[
    &["main", "cli"],
    &["check", "report"],
    &["graph"],
    &["kinds"],
    &["spec"],
    &["analysis"],
    &["engine"],
    &["model"],
];

/// Used by every layer; they import nothing but each other.
const BESIDE: &[&str] = &["error", "output", "panics"];

/// What lib.rs re-exports at the crate root, by the module that defines it.
const ROOT_REEXPORTS: &[(&str, &str)] = &[
    ("Input", "engine"),
    ("Stop", "engine"),
    ("Edit", "engine"),
    ("Hooks", "engine"),
    ("Intervention", "engine"),
    ("Sel", "engine"),
    ("Error", "error"),
    ("Result", "error"),
    ("HookPoint", "model"),
    ("NormHook", "model"),
    ("Site", "model"),
    ("LoadOptions", "model"),
    ("Model", "model"),
];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The top-level module a `crate::` path starts with (`crate::{a::x, b}` gives a and b).
fn named_modules(after_crate: &str) -> Vec<String> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    if let Some(group) = after_crate.strip_prefix('{') {
        // A grouped import: its first-level entries, split at top-level commas.
        let mut depth = 0;
        let mut items = vec![String::new()];
        for c in group.chars() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    items.push(String::new());
                    continue;
                }
                _ => {}
            }
            items.last_mut().unwrap().push(c);
        }
        items.iter().map(|i| ident(i.trim())).filter(|i| !i.is_empty()).collect()
    } else {
        vec![ident(after_crate)]
    }
}

fn resolve(name: &str) -> String {
    ROOT_REEXPORTS.iter().find(|(n, _)| *n == name).map_or(name.to_string(), |(_, m)| m.to_string())
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every (file, line, imported module) that goes up or sideways out of the beside modules.
fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut bad = Vec::new();
    for f in files {
        let rel = f.strip_prefix(src).unwrap();
        let top = rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
        if top == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        // Joined, so a `use crate::{...}` over several lines reads as one.
        let joined: String = text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join(" ");
        for (at, _) in joined.match_indices("crate::") {
            for m in named_modules(&joined[at + "crate::".len()..]) {
                let m = resolve(&m);
                if m == top {
                    continue;
                }
                let ok = if BESIDE.contains(&top.as_str()) {
                    BESIDE.contains(&m.as_str())
                } else if BESIDE.contains(&m.as_str()) {
                    true
                } else {
                    match (rank(&top), rank(&m)) {
                        (Some(a), Some(b)) => b >= a,
                        _ => false,
                    }
                };
                if !ok {
                    bad.push(format!("src/{}: {top} imports crate::{m}", rel.display()));
                }
            }
        }
    }
    bad.sort();
    bad.dedup();
    bad
}

#[test]
fn every_import_points_down_the_layers() {
    let src = common::repo_root().join("src");
    let mut tops: BTreeMap<String, ()> = BTreeMap::new();
    for e in std::fs::read_dir(&src).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().trim_end_matches(".rs").to_string();
        if name != "lib" {
            tops.insert(name, ());
        }
    }
    for t in tops.keys() {
        assert!(
            rank(t).is_some() || BESIDE.contains(&t.as_str()),
            "src/{t} is in no layer: add it to LAYERS or BESIDE"
        );
    }
    let bad = violations(&src);
    assert!(bad.is_empty(), "imports that go up the layers:\n{}", bad.join("\n"));
}

#[test]
fn the_layering_check_catches_an_import_that_goes_up() {
    let dir = tempfile::tempdir().unwrap();
    let write = |p: &str, t: &str| {
        let p = dir.path().join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, t).unwrap();
    };
    write("model/mod.rs", "use crate::{error::Result, graph::keys};\n");
    write("analysis/x.rs", "use crate::engine::forward;\nfn f() { crate::kinds::by_name(\"x\"); }\n");
    write("output/y.rs", "use crate::Model;\n");
    write("engine/z.rs", "// crate::cli in a comment is not an import\nuse crate::{Hooks, Result};\n");
    let bad = violations(dir.path());
    assert_eq!(
        bad,
        [
            "src/analysis/x.rs: analysis imports crate::kinds",
            "src/model/mod.rs: model imports crate::graph",
            "src/output/y.rs: output imports crate::model",
        ]
    );
}
