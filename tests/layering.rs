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

/// The code of a file without comments, string and char literals (which may mention paths), and
/// with no whitespace around `::`.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let rest = &text[i..];
        if rest.starts_with("//") {
            i += rest.find('\n').unwrap_or(rest.len());
        } else if rest.starts_with("/*") {
            i += rest.find("*/").map_or(rest.len(), |e| e + 2);
        } else if rest.starts_with("r#\"") || rest.starts_with("r\"") {
            let hashes = rest[1..].chars().take_while(|&c| c == '#').count();
            let close = format!("\"{}", "#".repeat(hashes));
            let body = 2 + hashes;
            i += body + rest[body..].find(&close).map_or(rest.len() - body, |e| e + close.len());
            out.push_str("\"\"");
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            i = j + 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && (rest.len() > 2 && (rest.as_bytes()[2] == b'\'' || rest.as_bytes()[1] == b'\\')) {
            // A char literal ('x' or '\n'), not a lifetime.
            let end = rest[1..].find('\'').map_or(1, |e| e + 2);
            i += end;
            out.push_str("' '");
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    let mut s = out;
    for (from, to) in [(" ::", "::"), (":: ", "::"), ("\n::", "::"), ("::\n", "::")] {
        while s.contains(from) {
            s = s.replace(from, to);
        }
    }
    s
}

/// The module path of a file under src/ (src/graph/executor.rs is graph::executor,
/// src/graph/mod.rs is graph).
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string()).collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "main" || p == "lib") {
        parts.pop();
    }
    parts
}

/// Every (file, imported module) that goes up, or out of the beside modules to a layer, and every
/// construct that would hide an import from this check.
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
        let code = code_only(&std::fs::read_to_string(&f).unwrap());
        for hidden in ["#[path", "include!(", "crate as ", "extern crate self"] {
            if code.contains(hidden) {
                bad.push(format!("src/{}: `{hidden}` hides what it imports from this check", rel.display()));
            }
        }
        let mut named: Vec<String> = Vec::new();
        for (at, _) in code.match_indices("crate::") {
            let before = code[..at].chars().last();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue; // e.g. `my_crate::`
            }
            named.extend(named_modules(&code[at + "crate::".len()..]));
        }
        // `super::` chains that climb to the crate root name a top-level module after them.
        let depth = module_path(rel).len();
        for (at, _) in code.match_indices("super::") {
            if code[..at].ends_with("super::")
                || code[..at].chars().last().is_some_and(|c| c.is_alphanumeric() || c == '_')
            {
                continue; // counted from the chain's first `super`
            }
            let mut rest = &code[at..];
            let mut ups = 0;
            while let Some(r) = rest.strip_prefix("super::") {
                ups += 1;
                rest = r;
            }
            // Only a top-level module's name counts: code in an inline `mod tests` climbs one
            // more level than its file to reach the same items (`use super::*`).
            if ups >= depth {
                named.extend(
                    named_modules(rest).into_iter().filter(|m| rank(m).is_some() || BESIDE.contains(&m.as_str())),
                );
            }
        }
        for m in named {
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
    write(
        "engine/z.rs",
        "// crate::cli in a comment is not an import\nuse crate::{Hooks, Result};\nconst S: &str = \"crate::cli\";\n/* crate::graph */\n",
    );
    write("engine/w.rs", "use super::forward;\nfn g() { super::super::kinds::f(); crate :: graph :: h(); }\n");
    write("spec/v.rs", "#[path = \"../graph/x.rs\"]\nmod x;\n");
    let bad = violations(dir.path());
    assert_eq!(
        bad,
        [
            "src/analysis/x.rs: analysis imports crate::kinds",
            "src/engine/w.rs: engine imports crate::graph",
            "src/engine/w.rs: engine imports crate::kinds",
            "src/model/mod.rs: model imports crate::graph",
            "src/output/y.rs: output imports crate::model",
            "src/spec/v.rs: `#[path` hides what it imports from this check",
        ]
    );
}
