//! `tl-run report`: the data → figure mapping against the Parquet it reads, and the page as a
//! person sees it: Chromium (headless, installed by scripts/chromium.sh in the test set-up)
//! opens the reports of the default experiment and of experiments/induction.toml from file://.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use tl_run::output::figure::{hook_family, pos_label, run_figures, top_heads, Figure, RunFacts, Scale, PATTERN_HEADS};
use tl_run::output::table::read_parquet;
use tl_run::output::token_label::token_label;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tl_run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tl-run")).args(args).current_dir(repo()).output().expect("tl-run runs");
    assert!(
        out.status.success(),
        "tl-run {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn heatmap_cells_axes_and_scale_are_the_parquet_values() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ioi");
    tl_run(&[
        "run",
        "experiments/ioi.toml",
        "--model-id",
        "tests/models/stories260K",
        "--prompts",
        "experiments/prompts/stories.jsonl",
        "--out",
        s(&out),
        "--quiet",
    ]);
    let (rows, _) = read_parquet(&out.join("resid.parquet")).unwrap();
    let kind = tl_run::kinds::by_name("activation_patching").unwrap();
    let figs = run_figures("resid", kind.name, kind.figures, &rows, &RunFacts::default(), "metric");
    let Some(Figure::Heatmap(h)) = figs.figures.iter().find(|f| f.title() == "resid: blocks.*.hook_resid_pre") else {
        panic!("no resid_pre heatmap in {:?}", figs.figures.iter().map(Figure::title).collect::<Vec<_>>())
    };
    let mean: Vec<_> =
        rows.iter().filter(|r| r.prompt.is_none() && hook_family(&r.hook) == "blocks.*.hook_resid_pre").collect();
    let cell = mean.iter().find(|r| r.layer == Some(3) && r.pos == Some(7)).expect("a (layer 3, pos 7) row");
    assert_eq!(h.cells[3][7], Some(cell.value), "the cell carries exactly the Parquet value");
    assert_eq!((h.y_title.as_str(), h.x_title.as_str()), ("layer", "position"));
    assert_eq!(h.cells.len(), 5, "one row per layer of stories260K");
    for r in &mean {
        let (l, p) = (r.layer.unwrap() as usize, r.pos.unwrap() as usize);
        assert_eq!(h.cells[l][p], Some(r.value));
        assert_eq!(h.x_ticks[p], pos_label(p as i32, r.token.as_deref()), "x axis labels are the tokens");
    }
    assert!(h.x_ticks[7].contains(&token_label(cell.token.as_deref().unwrap())), "{:?}", h.x_ticks);
    // "7 ␣Tim", not "7 \" Tim\"": the label after the position has no quote, escape or space.
    let token_part = |t: &String| t.split_once(' ').map_or(String::new(), |(_, tok)| tok.to_string());
    assert!(
        !h.x_ticks.iter().map(token_part).any(|t| t.contains('"') || t.contains("\\u{") || t.contains(' ')),
        "tokens without Debug quotes, escapes or invisible spaces: {:?}",
        h.x_ticks
    );
    let max = mean.iter().map(|r| r.value.abs()).fold(0.0, f64::max);
    assert_eq!(h.scale, Scale::Diverging { centre: 0.0, limit: max }, "symmetric around zero");
    let blue = tl_run::report::svg::colour(&h.scale, Some(max));
    let red = tl_run::report::svg::colour(&h.scale, Some(-max));
    assert_eq!(
        (red.as_str(), blue.as_str()),
        ("#67001f", "#042f60"),
        "RdBu ends (d3's scheme): negative red, positive blue"
    );
    // The drawn cell: its colour, its value and its hover text.
    let svg = tl_run::report::svg::render(&figs.figures[0]).unwrap();
    let rect =
        svg.split("<rect").find(|r| r.contains("data-x=\"7\"") && r.contains("data-y=\"3\"")).expect("the (3, 7) cell");
    assert!(rect.contains(&format!("data-value=\"{:e}\"", cell.value)), "{rect}");
    assert!(rect.contains(&format!("fill=\"{}\"", tl_run::report::svg::colour(&h.scale, Some(cell.value)))), "{rect}");
    assert!(rect.contains("<title>L3 pos 7"), "{rect}");

    // A patched probability (metric_centre: the corrupted baseline, which the report reads from
    // the manifest for prob and logprob) diverges around that baseline, white there; attribution
    // (changes of the metric) stays around 0.
    let centred = RunFacts { metric_centre: Some(0.25), ..RunFacts::default() };
    let figs_c = run_figures("resid", kind.name, kind.figures, &rows, &centred, "metric");
    let resid_pre = |f: &&Figure| f.title() == "resid: blocks.*.hook_resid_pre";
    let Some(Figure::Heatmap(hc)) = figs_c.figures.iter().find(resid_pre) else { panic!("no resid_pre heatmap") };
    let limit = mean.iter().map(|r| (r.value - 0.25).abs()).fold(0.0, f64::max);
    assert_eq!(hc.scale, Scale::Diverging { centre: 0.25, limit }, "symmetric around the corrupted baseline");
    assert_eq!(
        tl_run::report::svg::colour(&hc.scale, Some(0.25)),
        tl_run::report::svg::colour(&h.scale, Some(0.0)),
        "the baseline is the white of a scale around 0"
    );
    let (attr_rows, _) = read_parquet(&out.join("attribution.parquet")).unwrap();
    let attr = tl_run::kinds::by_name("attribution_patching").unwrap();
    let attr_figs = run_figures("attribution", attr.name, attr.figures, &attr_rows, &centred, "metric");
    let attr_maps: Vec<&Scale> = attr_figs
        .figures
        .iter()
        .filter_map(|f| match f {
            Figure::Heatmap(h) => Some(&h.scale),
            _ => None,
        })
        .collect();
    assert!(!attr_maps.is_empty());
    for sc in attr_maps {
        assert!(matches!(sc, Scale::Diverging { centre, .. } if *centre == 0.0), "{sc:?}");
    }

    // Per-kind figures of the whole spec, and the page: self-contained, no script.
    let said = tl_run(&["report", s(&out)]);
    assert!(said.contains("report.html"), "{said}");
    let page = std::fs::read_to_string(out.join("report.html")).unwrap();
    for section in [
        "resid",
        "heads",
        "logit-lens",
        "dla-layers",
        "dla-heads",
        "head-scores",
        "attribution",
        "attribution-heads",
        "ablate-name-mover",
    ] {
        assert!(page.contains(&format!("id=\"run-{section}\"")), "no section for {section}");
    }
    assert!(
        page.contains("attribution against real patching") && page.contains("Pearson r = "),
        "the verify_top scatter with its r"
    );
    assert!(page.contains("most probable next tokens"), "the logit lens top-k table");
    assert!(page.contains("baseline (nothing ablated)"), "the ablation baseline line");
    assert!(!page.to_ascii_lowercase().contains("<script"), "no script");
    assert_eq!(
        page.matches("http").count(),
        page.matches("http://www.w3.org/2000/svg").count(),
        "nothing to fetch: the only URLs are the SVG namespace"
    );
    let figures = std::fs::read_dir(out.join("figures")).unwrap().count();
    assert!(figures >= 15, "one SVG per figure, got {figures}");
    assert!(page.contains("<td>dtype, device</td><td>float32, cpu</td>"), "the spec's names, not tch's Debug names");
    assert!(!page.contains("\\u{"), "no Rust escape codes");

    // Corrupted positions marked on the position axis: where any prompt's corrupted tokens
    // (swap_pairs: the other prompt of its pair) differ from its clean ones, as the rows count
    // positions (left padding included), read here straight from the manifest.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let ids = |which: &str| -> Vec<Vec<i64>> { serde_json::from_value(manifest["tokens"][which].clone()).unwrap() };
    let (clean, corrupted) = (ids("clean"), ids("corrupted"));
    let seq = clean.iter().map(Vec::len).max().unwrap();
    let mut want = BTreeSet::new();
    for (c, k) in clean.iter().zip(&corrupted) {
        want.extend((0..c.len()).filter(|&i| c[i] != k[i]).map(|i| seq - c.len() + i));
    }
    assert!(!want.is_empty(), "swap_pairs changes some tokens");
    let resid_svg = page
        .split("<svg")
        .find(|f| f.contains("\nresid: blocks.*.hook_resid_pre\n"))
        .expect("the resid_pre heatmap in the page");
    assert_eq!(marked_ticks(resid_svg, "xtick"), want, "the marked x ticks");
    assert!(page.contains("* marks the positions the corruption changes"), "the caption says what * means");

    // The logit lens's value axis: round ticks (1, 2 or 5 × 10^k apart) printed without noise.
    let lens_svg = page
        .split("<svg")
        .find(|f| f.contains("\nlogit-lens: accumulated residual along the answer direction\n"))
        .expect("the logit lens in the page");
    let axis = lens_svg.split("class=\"axis\"").nth(1).unwrap().split("</g>").next().unwrap();
    let ticks: Vec<f64> = texts(axis).iter().filter_map(|t| t.parse().ok()).collect();
    assert!(ticks.len() >= 3, "{axis}");
    let step = ticks[1] - ticks[0];
    let mantissa = step / 10f64.powf(step.log10().floor());
    assert!([1.0, 2.0, 5.0, 10.0].iter().any(|m| (mantissa - m).abs() < 1e-9), "step {step}: {ticks:?}");
    for w in ticks.windows(2) {
        assert!((w[1] - w[0] - step).abs() < 1e-9 * step.abs().max(1.0), "{ticks:?}");
    }
    for t in texts(axis).iter().filter(|t| t.parse::<f64>().is_ok()) {
        assert!(t.len() <= 8, "a tick label with float noise: {t}");
    }

    // Dest × src attention patterns of the top heads of the by-head run: the heads with the
    // largest |value| in heads.parquet, each cell exactly hook_pattern of prompt 0 as
    // `tl-run cache` captures it from the same model.
    let (head_rows, _) = read_parquet(&out.join("heads.parquet")).unwrap();
    assert!(tl_run::kinds::by_name("activation_patching").unwrap().pattern_heads);
    let top = top_heads(&head_rows, PATTERN_HEADS);
    assert_eq!(top.len(), PATTERN_HEADS);
    let best = head_rows
        .iter()
        .filter(|r| r.prompt.is_none() && r.head.is_some())
        .max_by(|a, b| a.value.abs().total_cmp(&b.value.abs()))
        .unwrap();
    assert_eq!(
        top[0],
        (best.layer.unwrap() as usize, best.head.unwrap() as usize),
        "the first pattern is the head with the largest |value|"
    );
    assert!(
        page.contains("Attention patterns of the 4 heads with the largest |value| (prompt 0, clean run)"),
        "no pattern section"
    );
    let prompt0: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(repo().join("experiments/prompts/stories.jsonl")).unwrap().lines().next().unwrap(),
    )
    .unwrap();
    let acts = dir.path().join("patterns.safetensors");
    let hooks: Vec<String> = top.iter().map(|(l, _)| format!("blocks.{l}.attn.hook_pattern")).collect();
    tl_run(&[
        "cache",
        "tests/models/stories260K",
        "--prompt",
        prompt0["clean"].as_str().unwrap(),
        "--hooks",
        &hooks.join(","),
        "--out",
        s(&acts),
    ]);
    let cached = tch::Tensor::read_safetensors(&acts).unwrap();
    for (layer, head) in &top {
        let want = &cached.iter().find(|(n, _)| *n == format!("blocks.{layer}.attn.hook_pattern")).unwrap().1;
        let title = format!("heads: L{layer}H{head} attention, prompt 0");
        let svg = page
            .split("<svg")
            .find(|f| f.contains(&format!("\n{title}\n")))
            .unwrap_or_else(|| panic!("no figure titled {title}"));
        let n = want.size()[2];
        let mut seen = 0;
        for rect in svg.split("<rect").filter(|r| r.contains("data-x=")) {
            let attr = |k: &str| rect.split(&format!("{k}=\"")).nth(1).unwrap().split('"').next().unwrap().to_string();
            let (x, y, v) = (
                attr("data-x").parse::<i64>().unwrap(),
                attr("data-y").parse::<i64>().unwrap(),
                attr("data-value").parse::<f64>().unwrap(),
            );
            assert_eq!(v, want.double_value(&[0, *head as i64, y, x]), "L{layer}H{head} dest {y} src {x}");
            seen += 1;
        }
        assert_eq!(seen, n * n, "one cell per (dest, src) of the {n}-token prompt");
        // Prompt 0's changed tokens (its own positions, no padding) marked on both axes.
        let own: BTreeSet<usize> = (0..clean[0].len()).filter(|&i| clean[0][i] != corrupted[0][i]).collect();
        assert_eq!(marked_ticks(svg, "xtick"), own, "L{layer}H{head} source positions");
        assert_eq!(marked_ticks(svg, "ytick"), own, "L{layer}H{head} destination positions");
    }
    assert!(!page.contains(".multiples svg{width:420px"), "patterns at their own size: labels of 11 px, not 6");

    // --png: a PNG (twice the size) beside every SVG, not blank; --no-patterns leaves them out.
    tl_run(&["report", s(&out), "--png"]);
    let listed: Vec<PathBuf> = std::fs::read_dir(out.join("figures")).unwrap().map(|e| e.unwrap().path()).collect();
    let svgs: Vec<&PathBuf> = listed.iter().filter(|p| p.extension().unwrap() == "svg").collect();
    assert_eq!(listed.len(), 2 * svgs.len(), "{listed:?}");
    for svg in svgs.iter().take(3) {
        let text = std::fs::read_to_string(svg).unwrap();
        let width: f64 = text.split("width=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap();
        let (w, _, var) = png_stats(&svg.with_extension("png"));
        assert_eq!(w as f64, 2.0 * width.ceil(), "{}", svg.display());
        assert!(var > 200.0, "{}: blank PNG (variance {var:.1})", svg.display());
    }
    tl_run(&["report", s(&out), "--no-patterns"]);
    let page = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(!page.contains("attention, prompt 0") && page.contains("left out (--no-patterns)"));
}

/// The text of every <text> element in `svg`, trimmed.
fn texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| {
            t.split_once('>').map(|(_, rest)| rest.split("</text>").next().unwrap_or("").trim().to_string())
        })
        .collect()
}

/// The positions (the number each tick label starts with) of the ticks of class `class`
/// ("xtick", "ytick") drawn marked as corrupted.
fn marked_ticks(svg: &str, class: &str) -> BTreeSet<usize> {
    svg.split("<text")
        .skip(1)
        .filter(|t| t.split('>').next().unwrap().contains(&format!("class=\"{class} corrupted\"")))
        .map(|t| {
            let label = texts(&format!("<text{t}")).remove(0);
            assert!(label.ends_with('*'), "a marked tick ends in *: {label}");
            label.split_whitespace().next().unwrap().parse().unwrap()
        })
        .collect()
}

/// Width, height and luminance variance of a PNG.
fn png_stats(path: &Path) -> (u32, u32, f64) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let lum: Vec<f64> = buf[..info.buffer_size()]
        .chunks(channels)
        .map(|p| 0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64)
        .collect();
    let mean = lum.iter().sum::<f64>() / lum.len() as f64;
    (info.width, info.height, lum.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / lum.len() as f64)
}

/// Chromium, found on PATH (scripts/chromium.sh installs it in the test set-up).
fn chromium() -> PathBuf {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if let Ok(out) = Command::new("which").arg(name).output() {
            if out.status.success() {
                return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            }
        }
    }
    panic!("no chromium on PATH: the test set-up (scripts/test.sh → scripts/chromium.sh) installs Debian's chromium");
}

fn headless(args: &[String]) -> (String, String) {
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .args(args)
        .output()
        .expect("chromium runs");
    assert!(out.status.success(), "chromium {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Opens `page` as a person would and checks what they would see.
fn check_in_browser(page: &Path, work: &Path) {
    let url = format!("file://{}", page.display());
    // A probe page beside it loads the report in an iframe and reports, as text in its DOM,
    // each figure's box and every resource the report requested.
    let probe = page.with_file_name("probe.html");
    std::fs::write(
        &probe,
        format!(
            r#"<!DOCTYPE html><html><body><iframe id="f" src="{url}" style="width:1400px;height:4000px"></iframe><pre id="out">waiting</pre>
<script>document.getElementById("f").onload = function () {{
  var d = this.contentDocument, w = this.contentWindow;
  var boxes = Array.prototype.map.call(d.querySelectorAll("figure"), function (f) {{ var r = f.getBoundingClientRect(); return [r.width, r.height]; }});
  var resources = w.performance.getEntriesByType("resource").map(function (e) {{ return e.name; }});
  document.getElementById("out").textContent = "RESULT " + JSON.stringify({{figures: boxes, resources: resources, title: d.title}});
}};</script></body></html>"#
        ),
    )
    .unwrap();
    let (dom, log) = headless(&[
        "--allow-file-access-from-files".into(),
        "--virtual-time-budget=10000".into(),
        "--dump-dom".into(),
        format!("file://{}", probe.display()),
    ]);
    let result = dom
        .split("RESULT ")
        .nth(1)
        .and_then(|r| r.split("</pre>").next())
        .unwrap_or_else(|| panic!("the probe did not report:\n{dom}\n{log}"));
    let v: serde_json::Value = serde_json::from_str(
        &result.replace("&quot;", "\"").replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"),
    )
    .unwrap();
    let boxes = v["figures"].as_array().unwrap();
    assert!(!boxes.is_empty(), "no figure on {url}");
    for (i, b) in boxes.iter().enumerate() {
        let (w, h) = (b[0].as_f64().unwrap(), b[1].as_f64().unwrap());
        assert!(w > 50.0 && h > 50.0, "figure {i} of {url} has an empty box: {w} x {h}");
    }
    assert_eq!(v["resources"].as_array().unwrap().len(), 0, "the report requested resources: {}", v["resources"]);
    assert!(v["title"].as_str().unwrap().starts_with("tl-run report"), "{v}");

    // The report itself: no console message, no failed load, and a screenshot that is not blank.
    let shot = work.join(format!("{}.png", page.parent().unwrap().file_name().unwrap().to_string_lossy()));
    let (_, log) =
        headless(&["--window-size=1400,1600".into(), format!("--screenshot={}", shot.display()), url.clone()]);
    for line in log.lines() {
        assert!(
            !line.contains("CONSOLE") && !line.contains("Failed to load") && !line.contains("net::ERR"),
            "{url}: {line}"
        );
    }
    let (_, _, var) = png_stats(&shot);
    assert!(var > 200.0, "{url}: the screenshot looks blank (luminance variance {var:.1})");
}

#[test]
fn chromium_shows_the_reports_of_the_default_and_induction_experiments() {
    let work = tempfile::tempdir().unwrap();
    let default = work.path().join("default");
    // The default experiment's spec asks for its report (`[output] report = true`).
    let said = tl_run(&["run", "experiments/default.toml", "--out", s(&default), "--quiet"]);
    assert!(said.contains("report.html"), "{said}");
    let induction = work.path().join("induction");
    let said = tl_run(&[
        "run",
        "experiments/induction.toml",
        "--model-id",
        "tests/models/stories260K",
        "--out",
        s(&induction),
        "--quiet",
        "--report",
    ]);
    assert!(said.contains("report.html"), "{said}");
    for dir in [&default, &induction] {
        check_in_browser(&dir.join("report.html"), work.path());
    }
}

#[test]
fn a_directory_that_is_not_a_finished_run_is_a_named_error() {
    let dir = tempfile::tempdir().unwrap();
    let fail = |d: &Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_tl-run")).args(["report", s(d)]).output().unwrap();
        assert_eq!(o.status.code(), Some(1));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = fail(dir.path());
    assert!(e.contains("is") && e.contains("a tl-run results directory"), "{e}");
    std::fs::write(dir.path().join("manifest.shard-0-of-2.json"), "{}").unwrap();
    let e = fail(dir.path());
    assert!(e.contains("tl-run merge"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    // Another tool's manifest.json: named, and no empty report written.
    let other = tempfile::tempdir().unwrap();
    for foreign in [r#"{"spec": 5}"#, r#"{"tl_run": {}, "runs": []}"#, "[]"] {
        std::fs::write(other.path().join("manifest.json"), foreign).unwrap();
        let e = fail(other.path());
        assert!(e.contains("is not a tl-run manifest") && e.contains("a tl-run results directory"), "{foreign}: {e}");
        assert!(!other.path().join("report.html").exists(), "{foreign}");
    }
}
