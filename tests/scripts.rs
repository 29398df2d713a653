//! The test set-up's scripts: the oracle outputs' cache keys follow every file that makes them.
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `scripts/oracle_deps.sh SCRIPT` run in `dir` (a copy of the oracle folder or the repository).
fn deps(dir: &Path, script: &str) -> Vec<String> {
    let o =
        Command::new("bash").arg(root().join("scripts/oracle_deps.sh")).arg(script).current_dir(dir).output().unwrap();
    assert!(o.status.success(), "oracle_deps.sh {script}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect()
}

/// The key scripts/fixtures.sh gives an oracle script's output, less the prompts and models.
fn key(dir: &Path, script: &str) -> Vec<u8> {
    deps(dir, script).iter().flat_map(|f| std::fs::read(dir.join(f)).unwrap()).collect()
}

#[test]
fn an_oracle_outputs_key_changes_when_the_script_or_any_module_it_imports_changes() {
    let oracle = root().join("tests/oracle");
    let scripts: Vec<String> = std::fs::read_dir(&oracle)
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.starts_with("dump_") && n.ends_with(".py"))
        .collect();
    assert!(scripts.len() >= 7, "{scripts:?}");
    for script in &scripts {
        let tmp = tempfile::tempdir().unwrap();
        for e in
            std::fs::read_dir(&oracle).unwrap().flatten().filter(|e| e.path().extension().is_some_and(|x| x == "py"))
        {
            std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
        }
        let listed = deps(tmp.path(), script);
        // Every local module a listed file imports is listed too (read here independently of the
        // script: any `import X` or `from X import` line naming a file of the folder).
        for file in &listed {
            let text = std::fs::read_to_string(tmp.path().join(file)).unwrap();
            for line in text.lines() {
                let words: Vec<&str> =
                    line.split(|c: char| c.is_whitespace() || c == ',').filter(|w| !w.is_empty()).collect();
                let modules: Vec<&str> = match words.first() {
                    Some(&"from") => words.get(1).into_iter().copied().collect(),
                    Some(&"import") => {
                        words[1..].iter().take_while(|w| !w.starts_with('#')).copied().filter(|w| *w != "as").collect()
                    }
                    _ => vec![],
                };
                for m in modules {
                    if tmp.path().join(format!("{m}.py")).is_file() {
                        assert!(
                            listed.contains(&format!("{m}.py")),
                            "{script}: {file} imports {m}, which its key leaves out: {listed:?}"
                        );
                    }
                }
            }
        }
        // Changing any listed file changes the key; the key is the script's whole closure.
        for file in &listed {
            let before = key(tmp.path(), script);
            let p = tmp.path().join(file);
            let mut text = std::fs::read(&p).unwrap();
            text.extend_from_slice(b"\n# changed\n");
            std::fs::write(&p, text).unwrap();
            assert_ne!(key(tmp.path(), script), before, "{script}: changing {file} leaves its key unchanged");
        }
    }
    // dump_zoo.py reuses dump_attribution.py's functions: the case the key once missed.
    let zoo = deps(&oracle, "dump_zoo.py");
    assert!(
        zoo.contains(&"dump_attribution.py".to_string()) && zoo.contains(&"oracle_common.py".to_string()),
        "{zoo:?}"
    );
    // A missing script is an error, not an empty key.
    let o = Command::new("bash")
        .arg(root().join("scripts/oracle_deps.sh"))
        .arg("no_such.py")
        .current_dir(&oracle)
        .output()
        .unwrap();
    assert!(!o.status.success());
}

/// `scripts/output_digests.sh` (the before/after proof of a refactor, docs/architecture.md) gives
/// the same digests for two runs of one binary: timings are removed and job keys pinned, so any
/// line that differs between two builds is a change in what they compute or write.
#[test]
fn output_digests_are_the_same_for_two_runs_of_one_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let digests = || {
        let o = Command::new("bash")
            .arg(root().join("scripts/output_digests.sh"))
            .arg(env!("CARGO_BIN_EXE_tl-run"))
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "output_digests.sh: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let first = digests();
    let lines: Vec<&str> = first.lines().collect();
    let count = |what: &str| lines.iter().filter(|l| l.ends_with(what)).count();
    // Every zoo-ci model's ioi and induction outputs (SmolLM2: default and induction), and both
    // causal-tracing runs.
    assert!(count("manifest.json") >= 40, "{first}");
    assert!(count(".parquet") >= 150, "{first}");
    let specs = std::fs::read_dir(root().join("experiments"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "toml"))
        .count();
    assert_eq!(count(".txt"), specs, "a plan per shipped spec: {first}");
    assert_eq!(first, digests(), "two runs of one binary gave different digests");
}
