//! head_scores: TransformerLens's head_detector patterns over the prompts, or the attention
//! stripes on repeated random tokens.
use toml::Spanned;

use crate::analysis::head_detector::{self, DetectOptions, Detection, ErrorMeasure};
use crate::error::{Error, Result};
use crate::kinds::options::Located;
use crate::kinds::shared::context::RunContext;
use crate::kinds::{
    only_note, whole_job_key, Captures, JobDraft, JobOutput, KindInfo, Needs, Part, RunKind, RunSpec, Sizing,
};
use crate::model::config::ModelConfig;
use crate::model::hook_point::{nearest, HookPoint, Site};
use crate::model::Model;
use crate::output::figure::{grid_on, group_by, Figure, RunFacts};
use crate::output::table::Row;
use crate::spec::resolve::Ctx;
use crate::spec::resolve::{choice, positive};

pub const KIND: KindInfo = KindInfo {
    name: "head_scores",
    needs,
    captures,
    check_model,
    check_prompts,
    jobs,
    run,
    note: only_note,
    key: whole_job_key,
    figures,
    pattern_heads: false,
};

/// Where head_scores reads attention from.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadSource {
    /// The spec's clean prompts, scored with head_detector's patterns.
    Prompts,
    /// The Exploratory Analysis demo: `batch` rows of `seq_len` random tokens in [lo, hi),
    /// repeated twice, scored by attention stripes.
    RepeatedRandom { seq_len: i64, batch: i64, seed: u64, token_range: Option<(i64, i64)> },
}

/// A head_scores [[run]]'s keys as written.
#[derive(Debug, serde::Deserialize)]
pub struct Raw {
    pub patterns: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub custom: Vec<RawCustomPattern>,
    pub error_measure: Option<Spanned<String>>,
    pub exclude_bos: Option<bool>,
    pub exclude_current_token: Option<bool>,
    pub source: Option<Spanned<String>>,
    pub seq_len: Option<Spanned<i64>>,
    pub batch: Option<Spanned<i64>>,
    pub seed: Option<Spanned<i64>>,
    pub token_range: Option<Spanned<Vec<i64>>>,
}

/// A head_scores detection pattern of the spec's own: a matrix or a rule.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCustomPattern {
    pub name: Spanned<String>,
    pub matrix: Option<Spanned<Vec<Vec<f64>>>>,
    /// "same_token" (attend `offset` after an earlier copy of the current token) or "relative"
    /// (attend `offset` tokens back).
    pub rule: Option<Spanned<String>>,
    pub offset: Option<Spanned<i64>>,
}

/// A head_scores run's options.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Options {
    pub detections: Vec<(String, Detection)>,
    pub options: DetectOptions,
    pub source: HeadSource,
}

/// Seconds per cost unit relative to patching, measured: scoring the cached patterns is cheap.
const COST_SCALE: f64 = 0.25;

/// Repeated random tokens need nothing of the spec; the prompts' patterns need the prompts and
/// the cached clean run.
fn needs(kind: &RunKind) -> Needs {
    let prompts = matches!(kind, RunKind::HeadScores(Options { source: HeadSource::Prompts, .. }));
    Needs { prompts, analysis_cache: prompts, ..Needs::default() }
}

/// Repeated random tokens within the context, the vocabulary and the host's memory.
fn check_model(run: &RunSpec, cfg: &ModelConfig, file: &str, problems: &mut Vec<String>) {
    let RunKind::HeadScores(Options { source: HeadSource::RepeatedRandom { seq_len, batch, token_range, .. }, .. }) =
        &run.kind
    else {
        return;
    };
    // The random tokens twice (no BOS, as the Exploratory Analysis demo's stripes).
    let needed = 2 * *seq_len as usize;
    // Every layer's pattern [batch, heads, 2·seq_len, 2·seq_len] is kept (f32 at
    // least): past the host's memory the run could only end out of memory.
    let per_row = (cfg.n_layers * cfg.n_heads) as u64 * (needed as u64).pow(2) * 4;
    if let Some(host) = crate::engine::memory::past_host_memory((*batch as u64).checked_mul(per_row)) {
        problems.push(format!(
            "{}: run '{}': batch = {batch} rows of repeated tokens keep {} layers × {} heads of {needed}×{needed} attention patterns, {:.1} MiB a row, more than this machine's {:.1} GiB of memory; {}",
            run.key_at("batch", file),
            run.name,
            cfg.n_layers,
            cfg.n_heads,
            per_row as f64 / (1u64 << 20) as f64,
            host as f64 / (1u64 << 30) as f64,
            match host / per_row.max(1) {
                0 => "use a smaller seq_len (not even one row fits)".to_string(),
                most => format!("use batch ≤ {most}"),
            }
        ));
    }
    if needed > cfg.n_ctx {
        problems.push(format!(
            "{}: run '{}': seq_len = {seq_len} makes {needed} tokens (twice {seq_len}), more than the model's context of {}; use seq_len ≤ {}",
            run.key_at("seq_len", file),
            run.name,
            cfg.n_ctx,
            cfg.n_ctx / 2
        ));
    }
    if let Some((_, hi)) = token_range {
        if *hi as usize > cfg.d_vocab {
            problems.push(format!(
                "{}: run '{}': token_range ends at {hi}, past the model's vocabulary of {}",
                run.key_at("token_range", file),
                run.name,
                cfg.d_vocab
            ));
        }
    }
}

/// A custom matrix scores prompts of its own token count (head_detector scores each prompt
/// unpadded), so every prompt must have that many tokens.
fn check_prompts(run: &RunSpec, _: usize, lengths: &[usize], file: &str) -> Vec<String> {
    let RunKind::HeadScores(Options { detections, source: HeadSource::Prompts, .. }) = &run.kind else {
        return Vec::new();
    };
    let at = run.key_at("custom", file);
    let mut problems = Vec::new();
    for (name, d) in detections {
        let Detection::Matrix(rows) = d else { continue };
        let other: Vec<String> = lengths
            .iter()
            .enumerate()
            .filter(|(_, &t)| t != rows.len())
            .map(|(p, t)| format!("prompt {p} is {t}"))
            .collect();
        if !other.is_empty() {
            let shown = match lengths.first() {
                Some(t) if other.len() == lengths.len() && lengths.iter().all(|l| l == t) => {
                    format!("the prompts are {t}")
                }
                _ if other.len() > 3 => format!("{}, … ({} prompts)", other[..3].join(", "), other.len()),
                _ => other.join(", "),
            };
            problems.push(format!(
                "{at}: run '{}': custom pattern '{name}' is a {n}x{n} matrix, so it scores prompts of {n} tokens (BOS included), but {shown}; give prompts of that length or a matrix of theirs",
                run.name,
                n = rows.len()
            ));
        }
    }
    problems
}

pub(crate) fn resolve(cx: &mut Ctx, r: &Raw, at: &mut Located, i: usize, _: &std::path::Path) -> Option<RunKind> {
    for (key, v) in [("seq_len", r.seq_len.as_ref()), ("batch", r.batch.as_ref())] {
        at.key(cx, key, v);
    }
    at.key(cx, "token_range", r.token_range.as_ref());
    at.key(cx, "custom", r.custom.first().map(|c| &c.name));
    resolve_head_scores(cx, r, i)
}

/// The prompts' patterns come from the cached clean run; repeated random tokens run their own.
fn captures(run: &RunSpec, model: &Model) -> Result<Captures> {
    let prompts = matches!(run.kind, RunKind::HeadScores(Options { source: HeadSource::Prompts, .. }));
    Ok(Captures {
        analysis_points: if prompts { head_detector::pattern_points(model) } else { vec![] },
        ..Captures::default()
    })
}

fn jobs(run: &RunSpec, z: &Sizing) -> Vec<JobDraft> {
    if matches!(run.kind, RunKind::HeadScores(Options { source: HeadSource::Prompts, .. })) {
        vec![JobDraft::whole(format!("{}: head_scores from the cached clean run", run.name), COST_SCALE * z.full(1))]
    } else {
        vec![JobDraft {
            forwards: 1,
            tl_forwards: 1,
            ..JobDraft::whole(format!("{}: head_scores (one forward)", run.name), z.full(1))
        }]
    }
}

fn run(cx: &RunContext, run: &RunSpec, _: Part) -> Result<JobOutput> {
    let RunKind::HeadScores(Options { detections, options, source }) = &run.kind else {
        return Err(Error::Other(format!("run '{}' is not a head_scores run", run.name)));
    };
    head_score_rows(cx, run, detections, *options, source)
}

/// The run's source (prompts or repeated random tokens) and detection patterns (named, custom
/// matrices and rules), each key checked with its line; over 80 lines, one key after another.
fn resolve_head_scores(cx: &mut Ctx, r: &Raw, i: usize) -> Option<RunKind> {
    let key = |k: &str| format!("run[{i}].{k}");
    const NAMED: &[&str] = &["previous_token", "duplicate_token", "induction"];
    let source = match r.source.as_ref().map(|s| s.get_ref().as_str()) {
        None | Some("prompts") => HeadSource::Prompts,
        Some("repeated_random") => {
            let range = match &r.token_range {
                None => None,
                Some(v) if v.get_ref().len() == 2 && v.get_ref()[0] >= 0 && v.get_ref()[0] < v.get_ref()[1] => {
                    Some((v.get_ref()[0], v.get_ref()[1]))
                }
                Some(v) => {
                    cx.at(
                        v,
                        key("token_range"),
                        format!("give [low, high) with 0 <= low < high, got {:?}", v.get_ref()),
                    );
                    None
                }
            };
            HeadSource::RepeatedRandom {
                seq_len: positive(cx, &r.seq_len, key("seq_len"), 50, 2),
                batch: positive(cx, &r.batch, key("batch"), 4, 1),
                seed: positive(cx, &r.seed, key("seed"), 0, 0) as u64,
                token_range: range,
            }
        }
        Some(other) => {
            let s = r.source.as_ref()?;
            cx.at(s, key("source"), format!("unknown source '{other}' (valid: prompts, repeated_random)"));
            return None;
        }
    };
    let mut detections = Vec::new();
    let named: Vec<Spanned<String>> = match &r.patterns {
        Some(p) => p.get_ref().clone(),
        None => vec![],
    };
    let default_named = r.patterns.is_none() && r.custom.is_empty();
    for name in if default_named {
        NAMED.iter().map(|s| s.to_string()).collect()
    } else {
        named.iter().map(|s| s.get_ref().clone()).collect::<Vec<_>>()
    } {
        let d = match name.as_str() {
            "previous_token" => Detection::PreviousToken,
            "duplicate_token" => Detection::DuplicateToken,
            "induction" => Detection::Induction,
            other => {
                let at = named.iter().find(|s| s.get_ref() == other)?;
                cx.at(
                    at,
                    key("patterns"),
                    format!(
                        "unknown pattern '{other}' (valid: {}; or give [[run.custom]] patterns); did you mean '{}'?",
                        NAMED.join(", "),
                        nearest(other, NAMED.iter().copied())[0]
                    ),
                );
                continue;
            }
        };
        detections.push((name, d));
    }
    if matches!(source, HeadSource::RepeatedRandom { .. }) && !r.custom.is_empty() {
        cx.at(&r.custom[0].name, key("custom"), "repeated_random scores the demo's stripes (previous_token, duplicate_token, induction); custom patterns need source = \"prompts\"");
    }
    for (j, c) in r.custom.iter().enumerate() {
        let ck = |k: &str| format!("run[{i}].custom[{j}].{k}");
        let d = match (&c.matrix, &c.rule) {
            (Some(m), None) => match matrix_problem(m.get_ref()) {
                Some(problem) => {
                    cx.at(m, ck("matrix"), problem);
                    continue;
                }
                None => Detection::Matrix(m.get_ref().clone()),
            },
            (None, Some(rule)) => {
                let offset = positive(cx, &c.offset, ck("offset"), 1, 0) as usize;
                match rule.get_ref().as_str() {
                    "same_token" => Detection::SameToken { offset },
                    "relative" => Detection::Relative { offset },
                    other => {
                        cx.at(rule, ck("rule"), format!("unknown rule '{other}' (valid: same_token, relative)"));
                        continue;
                    }
                }
            }
            _ => {
                cx.at(
                    &c.name,
                    ck("matrix"),
                    "give either matrix = [[...]] or rule = \"same_token\" | \"relative\" (with offset)",
                );
                continue;
            }
        };
        detections.push((c.name.get_ref().clone(), d));
    }
    let options = DetectOptions {
        measure: choice(
            cx,
            &r.error_measure,
            key("error_measure"),
            &[("mul", ErrorMeasure::Mul), ("abs", ErrorMeasure::Abs)],
            ErrorMeasure::Mul,
        ),
        exclude_bos: r.exclude_bos.unwrap_or(false),
        exclude_current_token: r.exclude_current_token.unwrap_or(false),
    };
    Some(RunKind::HeadScores(Options { detections, options, source }))
}

fn head_score_rows(
    cx: &RunContext,
    run: &RunSpec,
    detections: &[(String, Detection)],
    options: DetectOptions,
    source: &HeadSource,
) -> Result<JobOutput> {
    let model = cx.model;
    let mut rows = Vec::new();
    let mut push = |pattern: &str, label: &str, per_layer: &[Vec<f64>]| {
        for (l, heads) in per_layer.iter().enumerate() {
            for (h, v) in heads.iter().enumerate() {
                rows.push(Row {
                    run: run.name.clone(),
                    kind: "head_scores".into(),
                    hook: HookPoint::Block(l, Site::Pattern).to_string(),
                    layer: Some(l as i32),
                    head: Some(h as i32),
                    pattern: Some(pattern.to_string()),
                    label: Some(label.to_string()),
                    value: *v,
                    computed: true,
                    ..Row::default()
                });
            }
        }
    };
    let note = match source {
        HeadSource::Prompts => {
            let toks = cx.toks()?;
            let dets: Vec<Detection> = detections.iter().map(|(_, d)| d.clone()).collect();
            let scores = head_detector::detect_from(
                model,
                cx.analysis_cache()?,
                &toks.clean,
                toks.mask.as_ref(),
                &dets,
                options,
            )?;
            for ((name, _), s) in detections.iter().zip(&scores) {
                push(name, "prompts", s);
            }
            serde_json::json!({"source": "prompts", "options": options, "prompts": toks.n_prompts()})
        }
        HeadSource::RepeatedRandom { seq_len, batch, seed, token_range } => {
            let v = model.cfg.d_vocab as i64;
            let (lo, hi) = token_range.unwrap_or(if v > 10_000 { (1000, 10_000) } else { (0, v) });
            if hi > v || 2 * seq_len > model.cfg.n_ctx as i64 {
                return Err(Error::Config(format!("repeated random tokens need token_range within the vocabulary (0..{v}) and 2·seq_len <= {} positions", model.cfg.n_ctx)));
            }
            let tokens = head_detector::repeated_random_tokens(*seed, *batch, *seq_len, lo, hi);
            for (name, s) in head_detector::repeated_stripes(model, &tokens)? {
                push(name, "repeated_random", &s);
            }
            serde_json::json!({"source": "repeated_random", "seq_len": seq_len, "batch": batch, "seed": seed, "token_range": [lo, hi]})
        }
    };
    Ok((rows, note))
}

/// What is wrong with a custom detection matrix, if anything: one row and one column per token
/// (square), no attention to later tokens (lower triangular), finite weights.
fn matrix_problem(rows: &[Vec<f64>]) -> Option<String> {
    let n = rows.len();
    if n == 0 || rows.iter().any(|r| r.len() != n) {
        let lengths: Vec<usize> = rows.iter().map(Vec::len).collect();
        return Some(format!("a detection matrix is square, one row and one column per token (BOS included): got {n} rows of lengths {lengths:?}"));
    }
    for (i, r) in rows.iter().enumerate() {
        for (j, v) in r.iter().enumerate() {
            if !v.is_finite() {
                return Some(format!("row {i} has {v} at column {j}; the matrix's weights must be finite"));
            }
            if j > i && *v != 0.0 {
                return Some(format!("a detection matrix is lower triangular (a token attends to itself and earlier tokens only): row {i} has {v} at column {j}"));
            }
        }
    }
    None
}

/// A layer × head grid per detection pattern.
fn figures(run: &str, rows: &[&Row], _: &RunFacts, _: &str, suffix: &str) -> Vec<Figure> {
    group_by(rows, |r| format!("{} ({})", r.pattern.clone().unwrap_or_default(), r.label.clone().unwrap_or_default()))
        .into_iter()
        .map(|(p, rs)| {
            grid_on(&format!("{run}: {p}{suffix}"), &rs, "score", "head", "layer", None, |r| {
                (r.layer.unwrap_or(0), r.head.unwrap_or(0))
            })
        })
        .collect()
}
