//! From result rows to figures: the figure descriptions, and the building blocks each kind's
//! `figures` (src/kinds/) draws its runs with. Nothing here draws; report/svg.rs renders them.
use std::collections::{BTreeMap, BTreeSet};

use crate::output::table::Row;
use crate::output::token_label::token_label;

/// How values map to colour. Diverging scales are symmetric around their centre: zero, as in the
/// TransformerLens demos (`color_continuous_midpoint=0`), except for a patched probability or
/// log-probability, which diverges around the corrupted baseline (see `RunFacts::metric_centre`):
/// white at `centre`, red below, blue above, full colour at `centre ± limit`.
#[derive(Debug, Clone, PartialEq)]
pub enum Scale {
    Diverging { centre: f64, limit: f64 },
    Sequential { min: f64, max: f64 },
}

impl Scale {
    /// Diverging around 0, from −max|v| to +max|v|.
    pub fn symmetric<'a>(values: impl Iterator<Item = &'a f64>) -> Scale {
        Scale::diverging_around(0.0, values)
    }

    /// Diverging around `centre`, to the largest |v − centre| on either side.
    pub fn diverging_around<'a>(centre: f64, values: impl Iterator<Item = &'a f64>) -> Scale {
        let limit = values.filter(|v| v.is_finite()).fold(0.0f64, |m, v| m.max((v - centre).abs()));
        Scale::Diverging { centre, limit: if limit > 0.0 { limit } else { 1.0 } }
    }

    /// The values at the scale's two ends (lowest first).
    pub fn range(&self) -> (f64, f64) {
        match *self {
            Scale::Diverging { centre, limit } => (centre - limit, centre + limit),
            Scale::Sequential { min, max } => (min, max),
        }
    }

    /// Diverging when any value is negative, else sequential from 0 (or the minimum) to the maximum.
    pub fn for_values<'a>(values: impl Iterator<Item = &'a f64> + Clone) -> Scale {
        let finite = values.filter(|v| v.is_finite());
        let (min, max) = finite.clone().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        if !min.is_finite() {
            return Scale::Diverging { centre: 0.0, limit: 1.0 };
        }
        if min < 0.0 {
            Scale::symmetric(finite)
        } else {
            Scale::Sequential { min: min.min(0.0), max: if max > min.min(0.0) { max } else { min.min(0.0) + 1.0 } }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Heatmap {
    pub title: String,
    pub x_title: String,
    pub y_title: String,
    pub x_ticks: Vec<String>,
    pub y_ticks: Vec<String>,
    /// cells[y][x]; None where the results hold no value.
    pub cells: Vec<Vec<Option<f64>>>,
    /// Hover text per cell (SVG <title>).
    pub hover: Vec<Vec<String>>,
    pub scale: Scale,
    /// What the colour bar measures.
    pub value_label: String,
    /// Ticks (indices) of positions the corruption changes: the corrupted prompt's token differs
    /// there, or noise is added there. svg.rs draws them marked; empty when none is known.
    pub x_marked: BTreeSet<usize>,
    pub y_marked: BTreeSet<usize>,
}

#[derive(Debug, Clone)]
pub struct Bars {
    pub title: String,
    pub labels: Vec<String>,
    pub values: Vec<f64>,
    /// A reference value drawn as a line across the bars (ablation's unablated metric).
    pub baseline: Option<f64>,
    pub value_label: String,
}

#[derive(Debug, Clone)]
pub struct Lines {
    pub title: String,
    pub x_ticks: Vec<String>,
    pub series: Vec<(String, Vec<f64>)>,
    pub value_label: String,
}

#[derive(Debug, Clone)]
pub struct Scatter {
    pub title: String,
    pub x_title: String,
    pub y_title: String,
    /// (x, y, hover text)
    pub points: Vec<(f64, f64, String)>,
    pub pearson: Option<f64>,
}

/// A circuit drawn as a layered graph: nodes in columns (the input, each layer, the logits), edges
/// from sender to receiver, width by |score|, colour by sign, the head input (q, k, v) marked.
#[derive(Debug, Clone)]
pub struct CircuitGraph {
    pub title: String,
    /// Column labels, left to right.
    pub columns: Vec<String>,
    /// (name, column, row within the column)
    pub nodes: Vec<(String, usize, usize)>,
    /// (sender node, receiver node, score, head input "q" / "k" / "v", or "" for an MLP or the logits)
    pub edges: Vec<(usize, usize, f64, String)>,
}

#[derive(Debug, Clone)]
pub struct Table {
    pub title: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

#[derive(Debug, Clone)]
pub enum Figure {
    Heatmap(Heatmap),
    Bars(Bars),
    Lines(Lines),
    Scatter(Scatter),
    Table(Table),
    Circuit(CircuitGraph),
}

impl Figure {
    /// What the figure's values are, for the caption under it.
    pub fn caption(&self) -> String {
        match self {
            Figure::Heatmap(h) if !h.x_marked.is_empty() || !h.y_marked.is_empty() => {
                format!("hover a cell for its value; {CORRUPTED_NOTE}")
            }
            Figure::Heatmap(_) => "hover a cell for its value".into(),
            Figure::Bars(f) => format!("{}; hover a bar for its value", f.value_label),
            Figure::Lines(f) => f.value_label.clone(),
            Figure::Scatter(f) => format!("x: {}, y: {}; dashed: y = x", f.x_title, f.y_title),
            Figure::Table(_) => "probability of each token".into(),
            Figure::Circuit(_) => {
                "edge width by |score|; blue: positive, red: negative; into heads: q solid, k dashed, v dotted; hover an edge for its score".into()
            }
        }
    }

    pub fn title(&self) -> &str {
        match self {
            Figure::Heatmap(f) => &f.title,
            Figure::Bars(f) => &f.title,
            Figure::Lines(f) => &f.title,
            Figure::Scatter(f) => &f.title,
            Figure::Table(f) => &f.title,
            Figure::Circuit(f) => &f.title,
        }
    }
}

/// The figures of one run: those of the mean rows, and per prompt where the run kept them.
#[derive(Debug, Clone)]
pub struct RunFigures {
    pub run: String,
    pub kind: String,
    pub figures: Vec<Figure>,
    pub per_prompt: Vec<(i32, Vec<Figure>)>,
    /// Dest × src attention patterns of the run's top heads (patching by head), drawn as small
    /// multiples; `patterns_note` says why there are none when the run has heads but no patterns
    /// could be computed.
    pub patterns: Vec<Figure>,
    pub patterns_note: Option<String>,
}

/// What marked position ticks mean, in captions and under standalone SVGs.
pub const CORRUPTED_NOTE: &str = "* marks the positions the corruption changes";

/// What the manifest adds to a run's figures: attribution's correlations with real patching
/// (the run's entry), and what it records of the prompts (report/prompt_facts.rs), for the
/// figures being drawn: the mean rows' or, through `for_prompt`, one prompt's.
#[derive(Debug, Clone, Default)]
pub struct RunFacts {
    /// Pearson r by hook name suffix (e.g. "hook_resid_pre", "attn.hook_z").
    pub pearson_by_hook: Vec<(String, f64)>,
    /// Where a patched metric's colours diverge when not at 0: the corrupted baseline (the value
    /// the metric takes when patching restores nothing) of a probability or log-probability
    /// that is not normalised. None: around 0 (logit_diff, normalised metrics, no baseline known).
    pub metric_centre: Option<f64>,
    /// Positions, as the rows count them, whose tokens the corruption changes.
    pub corrupted_positions: BTreeSet<usize>,
    /// Each prompt's metric_centre and corrupted_positions, for its own figures.
    pub per_prompt: Vec<(Option<f64>, BTreeSet<usize>)>,
    /// Edge attribution: each circuit's faithfulness, labelled by its selection and size.
    pub faithfulness: Vec<(String, f64)>,
    /// Edge attribution: the circuit the report draws (its title and edge names).
    pub circuit: Option<(String, Vec<String>)>,
}

impl RunFacts {
    /// The run's own facts, from its manifest entry (the prompts' facts are the report's).
    pub fn from_manifest(run: &serde_json::Value) -> RunFacts {
        let mut pearson_by_hook = Vec::new();
        for t in run.get("targets").and_then(|t| t.as_array()).into_iter().flatten() {
            if let (Some(h), Some(r)) =
                (t.get("hook").and_then(|h| h.as_str()), t.pointer("/verify_top/pearson").and_then(|r| r.as_f64()))
            {
                pearson_by_hook.push((h.to_string(), r));
            }
        }
        let faithfulness = run
            .get("circuits")
            .and_then(|c| c.as_array())
            .into_iter()
            .flatten()
            .filter(|c| c["selection"].as_str().is_some_and(|s| s != "none" && s != "graph"))
            .filter_map(|c| {
                let label = format!("{} {} ({} edges)", c["selection"].as_str()?, c["requested"], c["edges"]);
                Some((label, c["faithfulness"].as_f64()?))
            })
            .collect();
        let circuit = run.get("drawn_circuit").filter(|d| !d.is_null()).map(|d| {
            let title = format!(
                "{} = {}: {} edges, faithfulness {}",
                d["selection"].as_str().unwrap_or_default(),
                d["requested"],
                d["edge_names"].as_array().map_or(0, |v| v.len()),
                d["faithfulness"].as_f64().map(|f| format!("{f:.3}")).unwrap_or_default()
            );
            let names = d["edge_names"].as_array().into_iter().flatten().filter_map(|e| e.as_str()).map(String::from);
            (title, names.collect())
        });
        RunFacts { pearson_by_hook, faithfulness, circuit, ..RunFacts::default() }
    }

    pub fn pearson(&self, hook: &str) -> Option<f64> {
        self.pearson_by_hook
            .iter()
            .filter(|(h, _)| hook.ends_with(h.as_str()))
            .max_by_key(|(h, _)| h.len())
            .map(|(_, r)| *r)
    }

    /// The facts as prompt `p`'s figures see them: its own baseline and changed positions (the
    /// mean rows' where the manifest has none per prompt).
    pub fn for_prompt(&self, p: i32) -> RunFacts {
        let own = usize::try_from(p).ok().and_then(|p| self.per_prompt.get(p));
        let (centre, positions) =
            own.cloned().unwrap_or_else(|| (self.metric_centre, self.corrupted_positions.clone()));
        RunFacts {
            pearson_by_hook: self.pearson_by_hook.clone(),
            metric_centre: centre,
            corrupted_positions: positions,
            per_prompt: Vec::new(),
            faithfulness: self.faithfulness.clone(),
            circuit: self.circuit.clone(),
        }
    }
}

/// Figures for a run of `kind` from its rows, drawn by its kind (`figures`). `metric` names the value's units for colour bars.
pub fn run_figures(
    run: &str,
    kind: &str,
    figures: KindFigures,
    rows: &[Row],
    facts: &RunFacts,
    metric: &str,
) -> RunFigures {
    let (mean, by_prompt) = split_by_prompt(rows);
    let per_prompt =
        by_prompt.into_iter().map(|(p, rs)| (p, kind_figures(run, figures, &rs, facts, metric, Some(p)))).collect();
    let figures = kind_figures(run, figures, &mean, facts, metric, None);
    RunFigures {
        run: run.to_string(),
        kind: kind.to_string(),
        figures,
        per_prompt,
        patterns: Vec::new(),
        patterns_note: None,
    }
}

fn split_by_prompt(rows: &[Row]) -> (Vec<&Row>, BTreeMap<i32, Vec<&Row>>) {
    let mut mean = Vec::new();
    let mut by = BTreeMap::new();
    for r in rows {
        match r.prompt {
            None => mean.push(r),
            Some(p) => by.entry(p).or_insert_with(Vec::new).push(r),
        }
    }
    (mean, by)
}

/// A kind's figures of some of a run's rows (`suffix` says which prompt, if one):
/// `KindInfo::figures`.
pub type KindFigures = fn(run: &str, rows: &[&Row], facts: &RunFacts, metric: &str, suffix: &str) -> Vec<Figure>;

/// No figures (a kind the report does not know).
pub fn no_figures(_: &str, _: &[&Row], _: &RunFacts, _: &str, _: &str) -> Vec<Figure> {
    Vec::new()
}

fn kind_figures(
    run: &str,
    figures: KindFigures,
    rows: &[&Row],
    facts: &RunFacts,
    metric: &str,
    prompt: Option<i32>,
) -> Vec<Figure> {
    if rows.is_empty() {
        return Vec::new();
    }
    let suffix = prompt.map(|p| format!(" (prompt {p})")).unwrap_or_default();
    let facts = match prompt {
        Some(p) => facts.for_prompt(p),
        None => facts.clone(),
    };
    let mut out = figures(run, rows, &facts, metric, &suffix);
    for f in &mut out {
        mark_positions(f, &facts.corrupted_positions);
    }
    out
}

/// Marks the ticks at `positions` on the axes of a heatmap that count positions (titled
/// "position", "source position", ...); other figures and axes are left as they are.
pub fn mark_positions(f: &mut Figure, positions: &BTreeSet<usize>) {
    let Figure::Heatmap(h) = f else { return };
    if h.x_title.ends_with("position") {
        h.x_marked = positions.iter().copied().filter(|&p| p < h.x_ticks.len()).collect();
    }
    if h.y_title.ends_with("position") {
        h.y_marked = positions.iter().copied().filter(|&p| p < h.y_ticks.len()).collect();
    }
}

/// A patching run's figures: a heatmap per hook, and where cells were patched for real to
/// verify estimates, estimate against patching. Heatmap colours diverge around `centre`: the
/// corrupted baseline for the patched metric itself, 0 for changes of it (attribution).
pub fn patching_figures(
    run: &str,
    rows: &[&Row],
    facts: &RunFacts,
    value_label: &str,
    suffix: &str,
    centre: f64,
) -> Vec<Figure> {
    let mut out = Vec::new();
    for (hook, rs) in group_by(rows, |r| hook_family(&r.hook)) {
        out.push(patching_figure(&format!("{run}: {hook}{suffix}"), &rs, value_label, centre));
        let verified: Vec<&Row> = rs.iter().copied().filter(|r| r.patched.is_some()).collect();
        if !verified.is_empty() {
            out.push(Figure::Scatter(Scatter {
                title: format!("{run}: {hook}, attribution against real patching{suffix}"),
                x_title: "attribution estimate".into(),
                y_title: "activation patching".into(),
                points: verified.iter().map(|r| (r.value, r.patched.unwrap_or(f64::NAN), cell_name(r))).collect(),
                pearson: facts.pearson(&hook),
            }));
        }
    }
    out
}

/// How many heads get their attention pattern drawn.
pub const PATTERN_HEADS: usize = 4;

/// The `k` heads (layer, head) with the largest |value| among a patching run's mean rows by
/// head, over all its hooks (z, v, pattern, ...), largest first (`KindInfo::pattern_heads`).
pub fn top_heads(rows: &[Row], k: usize) -> Vec<(usize, usize)> {
    let mut best: BTreeMap<(i32, i32), f64> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.prompt.is_none() && r.value.is_finite()) {
        if let (Some(l), Some(h)) = (r.layer, r.head) {
            let v = best.entry((l, h)).or_insert(0.0);
            *v = v.max(r.value.abs());
        }
    }
    let mut ranked: Vec<((i32, i32), f64)> = best.into_iter().filter(|((l, h), _)| *l >= 0 && *h >= 0).collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.into_iter().take(k).map(|((l, h), _)| (l as usize, h as usize)).collect()
}

/// One head's dest × src pattern on prompt 0 as a heatmap: rows are destination (query)
/// positions, columns source (key) positions, both labelled with the prompt's tokens; a
/// sequential scale from 0 to 1 (probabilities), as circuitsvis shows them.
pub fn pattern_figure(run: &str, layer: usize, head: usize, tokens: &[String], probabilities: &[Vec<f64>]) -> Figure {
    let labels: Vec<String> =
        (0..probabilities.len()).map(|i| pos_label(i as i32, tokens.get(i).map(String::as_str))).collect();
    let n = probabilities.len();
    let cells: Vec<Vec<Option<f64>>> = probabilities.iter().map(|row| row.iter().map(|&p| Some(p)).collect()).collect();
    let hover = (0..n)
        .map(|d| {
            (0..probabilities[d].len())
                .map(|s| {
                    format!(
                        "L{layer}H{head} dest {} → src {}: {}",
                        labels[d],
                        labels.get(s).cloned().unwrap_or_default(),
                        num(probabilities[d][s])
                    )
                })
                .collect()
        })
        .collect();
    Figure::Heatmap(Heatmap {
        title: format!("{run}: L{layer}H{head} attention, prompt 0"),
        x_title: "source position".into(),
        y_title: "destination position".into(),
        x_ticks: labels.clone(),
        y_ticks: labels,
        cells,
        hover,
        scale: Scale::Sequential { min: 0.0, max: 1.0 },
        value_label: "attention probability".into(),
        x_marked: BTreeSet::new(),
        y_marked: BTreeSet::new(),
    })
}

/// Rows grouped by `key`, groups in the order their first row appears.
pub fn group_by<'a>(rows: &[&'a Row], key: impl Fn(&Row) -> String) -> Vec<(String, Vec<&'a Row>)> {
    let mut out: Vec<(String, Vec<&Row>)> = Vec::new();
    for r in rows {
        let k = key(r);
        match out.iter_mut().find(|(g, _)| *g == k) {
            Some((_, v)) => v.push(r),
            None => out.push((k, vec![r])),
        }
    }
    out
}

/// A hook name with its layer made a wildcard ("blocks.3.attn.hook_z" → "blocks.*.attn.hook_z"):
/// one figure covers a hook at every layer.
pub fn hook_family(hook: &str) -> String {
    match hook.strip_prefix("blocks.").and_then(|rest| rest.split_once('.')) {
        Some((layer, rest)) if layer.chars().all(|c| c.is_ascii_digit()) => format!("blocks.*.{rest}"),
        _ => hook.to_string(),
    }
}

/// "L3H7", "L3 pos 5", ...: a cell's name for hover text.
pub fn cell_name(r: &Row) -> String {
    let mut s = String::new();
    if let Some(l) = r.layer {
        s.push_str(&format!("L{l}"));
    }
    if let Some(h) = r.head {
        s.push_str(&format!("H{h}"));
    }
    if let Some(n) = r.neuron {
        s.push_str(&format!("N{n}"));
    }
    if let Some(p) = r.pos {
        s.push_str(&format!(" pos {p}"));
    }
    if let Some(d) = r.dest_pos {
        s.push_str(&format!(" dest {d}"));
    }
    if let Some(p) = r.src_pos {
        s.push_str(&format!(" src {p}"));
    }
    if let Some(t) = &r.token {
        s.push_str(&format!(" {}", token_label(t)));
    }
    s.trim().to_string()
}

/// A position's axis label: its index and the token there (prompt 0's for mean rows).
pub fn pos_label(pos: i32, token: Option<&str>) -> String {
    match token {
        Some(t) => format!("{pos} {}", token_label(t)),
        None => pos.to_string(),
    }
}

/// One patching heatmap (or bars, with neither positions nor heads) of one hook's rows; heatmap
/// colours diverge around `centre`.
pub fn patching_figure(title: &str, rows: &[&Row], value_label: &str, centre: f64) -> Figure {
    let has = |f: fn(&Row) -> bool| rows.iter().any(|r| f(r));
    let (pos, head, dest) = (has(|r| r.pos.is_some()), has(|r| r.head.is_some()), has(|r| r.dest_pos.is_some()));
    if dest {
        // Pattern entries: the entry with the largest |value| per head, so the heads that
        // matter stand out; the hover text names the entry.
        let mut best: BTreeMap<(i32, i32), &Row> = BTreeMap::new();
        for r in rows {
            let k = (r.layer.unwrap_or(0), r.head.unwrap_or(0));
            if best.get(&k).is_none_or(|b| r.value.abs() > b.value.abs()) {
                best.insert(k, r);
            }
        }
        let picked: Vec<&Row> = best.into_values().collect();
        let title = format!("{title}, largest |value| over (dest, src) per head");
        return grid_on(&title, &picked, value_label, "head", "layer", Some(centre), layer_head);
    }
    let around = Some(centre);
    match (pos, head) {
        (true, false) => grid_on(title, rows, value_label, "position", "layer", around, |r| {
            (r.layer.unwrap_or(0), r.pos.unwrap_or(0))
        }),
        (false, true) => grid_on(title, rows, value_label, "head", "layer", around, layer_head),
        (true, true) => {
            let heads = rows.iter().filter_map(|r| r.head).max().unwrap_or(0) + 1;
            let mut f = grid_on(title, rows, value_label, "position", "layer, head", around, |r| {
                (r.layer.unwrap_or(0) * heads + r.head.unwrap_or(0), r.pos.unwrap_or(0))
            });
            if let Figure::Heatmap(h) = &mut f {
                h.y_ticks = (0..h.y_ticks.len() as i32).map(|i| format!("L{}H{}", i / heads, i % heads)).collect();
            }
            f
        }
        (false, false) => {
            let rs: Vec<&&Row> = rows.iter().collect();
            Figure::Bars(Bars {
                title: title.to_string(),
                labels: rs.iter().map(|r| r.label.clone().unwrap_or_else(|| cell_name(r))).collect(),
                values: rs.iter().map(|r| r.value).collect(),
                baseline: None,
                value_label: value_label.to_string(),
            })
        }
    }
}

/// A layer × head heatmap diverging around 0 (DLA).
pub fn layer_by_head(title: &str, rows: &[&Row], value_label: &str) -> Figure {
    grid(title, rows, value_label, "head", "layer", layer_head)
}

/// A row's (layer, head) cell.
fn layer_head(r: &Row) -> (i32, i32) {
    (r.layer.unwrap_or(0), r.head.unwrap_or(0))
}

/// A heatmap with a row per `at(r).0` and a column per `at(r).1`, diverging around 0; x ticks
/// carry the tokens when the columns are positions.
pub fn grid(
    title: &str,
    rows: &[&Row],
    value_label: &str,
    x_title: &str,
    y_title: &str,
    at: impl Fn(&Row) -> (i32, i32),
) -> Figure {
    grid_on(title, rows, value_label, x_title, y_title, Some(0.0), at)
}

/// `diverge_around`: a red-white-blue scale symmetric around that value (patching, attribution,
/// DLA), else one chosen from the values (head scores: viridis when none is negative).
pub fn grid_on(
    title: &str,
    rows: &[&Row],
    value_label: &str,
    x_title: &str,
    y_title: &str,
    diverge_around: Option<f64>,
    at: impl Fn(&Row) -> (i32, i32),
) -> Figure {
    let ny = rows.iter().map(|r| at(r).0).max().unwrap_or(0).max(0) as usize + 1;
    let nx = rows.iter().map(|r| at(r).1).max().unwrap_or(0).max(0) as usize + 1;
    let mut cells = vec![vec![None; nx]; ny];
    let mut hover = vec![vec![String::new(); nx]; ny];
    let mut tokens: Vec<Option<String>> = vec![None; nx];
    for r in rows {
        let (y, x) = at(r);
        if y < 0 || x < 0 {
            continue;
        }
        let (y, x) = (y as usize, x as usize);
        cells[y][x] = Some(r.value);
        hover[y][x] = format!("{}: {}", cell_name(r), num(r.value));
        if x_title == "position" && tokens[x].is_none() {
            tokens[x] = r.token.clone();
        }
    }
    let x_ticks = (0..nx)
        .map(|x| if x_title == "position" { pos_label(x as i32, tokens[x].as_deref()) } else { x.to_string() })
        .collect();
    let scale = match diverge_around {
        Some(centre) => Scale::diverging_around(centre, cells.iter().flatten().flatten()),
        None => Scale::for_values(cells.iter().flatten().flatten()),
    };
    Figure::Heatmap(Heatmap {
        title: title.to_string(),
        x_title: x_title.into(),
        y_title: y_title.into(),
        x_ticks,
        y_ticks: (0..ny).map(|y| y.to_string()).collect(),
        cells,
        hover,
        scale,
        value_label: value_label.to_string(),
        x_marked: BTreeSet::new(),
        y_marked: BTreeSet::new(),
    })
}

/// A tick or hover number: three decimals, or scientific notation for small magnitudes.
pub fn num(v: f64) -> String {
    if v == 0.0 || v.abs() >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.2e}")
    }
}
