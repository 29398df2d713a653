//! The README's pandas/polars example, run with real pandas and polars on the output of the
//! default experiment as shipped (SmolLM2-135M, experiments/default.toml).
mod common;

use std::process::Command;

use common::*;

#[test]
fn readme_python_example_reads_our_parquet() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let start = readme.find("<!-- readme-example:start -->").expect("README example start marker");
    let end = readme.find("<!-- readme-example:end -->").expect("README example end marker");
    let block = &readme[start..end];
    let code: String = block
        .lines()
        .skip_while(|l| !l.starts_with("```python"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(code.contains("pd.read_parquet") && code.contains("pl.read_parquet"));

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("results");
    let status = Command::new(env!("CARGO_BIN_EXE_tl-run"))
        .args([
            repo_root().join("experiments/default.toml").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let py = repo_root().join(".venv/bin/python");
    assert!(py.exists(), "no .venv: run scripts/setup.sh");
    let run = Command::new(py).arg("-c").arg(&code).env("TL_RUN_RESULTS", &out).output().unwrap();
    assert!(
        run.status.success(),
        "README example failed:\n{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let printed = String::from_utf8_lossy(&run.stdout);
    assert!(printed.contains("blocks.") && printed.contains("layer"), "{printed}");
}

/// The spec README shows as the first result is experiments/default.toml as it is.
#[test]
fn readme_shows_the_default_spec_as_shipped() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let after = &readme[readme.find("The spec, `experiments/default.toml`:").expect("README shows the default spec")..];
    let block: String = after
        .lines()
        .skip_while(|l| !l.starts_with("```toml"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .map(|l| format!("{l}\n"))
        .collect();
    let shipped = std::fs::read_to_string(repo_root().join("experiments/default.toml")).unwrap();
    assert_eq!(block.trim_end(), shipped.trim_end(), "README's copy of experiments/default.toml differs from the file");
}
