//! edge_attribution: circuit discovery's edge scores (EAP, EAP-IG, their clean/corrupted mean),
//! one row per edge of the graph of heads, MLPs, the input and the logits; circuits chosen from
//! them (`top_n`, `greedy`) with their faithfulness, one row per circuit in `<run>-circuits`.
use std::path::Path;
use std::time::Instant;

use tch::Kind;
use toml::Spanned;

use crate::analysis::attribution::{correlations, largest_first};
use crate::analysis::circuits::Scored;
use crate::analysis::edge_attribution::{
    edge_scores, evaluate, exact_changes, Ablation, Graph, Method, Qkv, Receiver, Sender,
};
use crate::error::{Error, Result};
use crate::kinds::options::Located;
use crate::kinds::shared::context::RunContext;
use crate::kinds::{
    no_prompt_check, only_note, whole_job_key, Captures, JobDraft, JobOutput, KindInfo, Needs, Part, RunKind, RunSpec,
    Sizing,
};
use crate::model::config::ModelConfig;
use crate::model::Model;
use crate::output::figure::{Bars, CircuitGraph, Figure, Lines, RunFacts};
use crate::output::table::Row;
use crate::spec::resolve::{choice, positive, Ctx};

pub const KIND: KindInfo = KindInfo {
    name: "edge_attribution",
    needs,
    captures,
    check_model,
    check_prompts: no_prompt_check,
    jobs,
    run,
    note: only_note,
    key: whole_job_key,
    figures,
    pattern_heads: false,
};

/// An edge_attribution [[run]]'s keys as written.
#[derive(Debug, serde::Deserialize)]
pub struct Raw {
    pub method: Option<Spanned<String>>,
    pub steps: Option<Spanned<i64>>,
    pub top_n: Option<Spanned<Sizes>>,
    pub greedy: Option<Spanned<Sizes>>,
    pub intervention: Option<Spanned<String>>,
    pub verify_top: Option<Spanned<i64>>,
}

/// `top_n = 100` or `top_n = [10, 100, 1000]`.
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
pub enum Sizes {
    One(i64),
    Many(Vec<i64>),
}

impl Sizes {
    fn list(&self) -> Vec<i64> {
        match self {
            Sizes::One(n) => vec![*n],
            Sizes::Many(v) => v.clone(),
        }
    }
}

/// An edge_attribution run's options.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Options {
    pub method: Method,
    /// Circuits of the n edges with the largest |score|, pruned.
    pub top_n: Vec<usize>,
    /// Circuits grown greedily from the logits to n edges, pruned.
    pub greedy: Vec<usize>,
    /// What edges outside a circuit carry when its faithfulness is measured (and when an edge
    /// is patched alone: `exact`, `verify_top`).
    pub intervention: Ablation,
    /// The edges with the largest |score| patched alone for real.
    pub verify_top: usize,
}

impl Options {
    fn circuits(&self) -> usize {
        self.top_n.len() + self.greedy.len()
    }
}

/// EAP-IG's default number of interpolation points (the paper's experiments use 5 or more).
const DEFAULT_STEPS: usize = 5;

/// Seconds per cost unit relative to patching, measured on gpt2-tiny: a forward keeping every
/// receiver's graph and its backward cost about three forwards.
const COST_SCALE: f64 = 3.0;

fn needs(_: &RunKind) -> Needs {
    Needs { prompts: true, corruption: true, answers: true, clean_corrupted: true, ..Needs::default() }
}

/// Circuit sizes within the model's graph.
fn check_model(run: &RunSpec, cfg: &ModelConfig, file: &str, problems: &mut Vec<String>) {
    let RunKind::EdgeAttribution(o) = &run.kind else { return };
    let graph = Graph::new(cfg);
    let edges = graph.edges().len();
    for (key, sizes) in [("top_n", &o.top_n), ("greedy", &o.greedy), ("verify_top", &vec![o.verify_top])] {
        if let Some(&n) = sizes.iter().find(|&&n| n > edges) {
            problems.push(format!(
                "{}: run '{}': {key} = {n} is more edges than the model's graph has ({edges}: {} senders, {} receivers); use at most {edges}",
                run.key_at(key, file),
                run.name,
                graph.senders.len(),
                graph.receivers.len()
            ));
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum MethodName {
    Eap,
    EapIg,
    CleanCorrupted,
    Exact,
}

pub(crate) fn resolve(cx: &mut Ctx, r: &Raw, at: &mut Located, i: usize, _: &Path) -> Option<RunKind> {
    at.key(cx, "top_n", r.top_n.as_ref());
    at.key(cx, "greedy", r.greedy.as_ref());
    let key = |k: &str| format!("run[{i}].{k}");
    let name = choice(
        cx,
        &r.method,
        key("method"),
        &[
            ("eap", MethodName::Eap),
            ("eap_ig", MethodName::EapIg),
            ("clean_corrupted", MethodName::CleanCorrupted),
            ("exact", MethodName::Exact),
        ],
        MethodName::EapIg,
    );
    if let (Some(s), false) = (&r.steps, name == MethodName::EapIg) {
        cx.at(s, key("steps"), "steps is the number of interpolation points of method = \"eap_ig\"");
    }
    let steps = positive(cx, &r.steps, key("steps"), DEFAULT_STEPS as i64, 1) as usize;
    let method = match name {
        MethodName::Eap => Method::Eap,
        MethodName::EapIg => Method::EapIg { steps },
        MethodName::CleanCorrupted => Method::CleanCorrupted,
        MethodName::Exact => Method::Exact,
    };
    let verify_top = positive(cx, &r.verify_top, key("verify_top"), 0, 0) as usize;
    if let (Some(v), Method::Exact) = (&r.verify_top, method) {
        cx.at(v, key("verify_top"), "method = \"exact\" patches every edge already; verify_top checks an estimate");
    }
    at.key(cx, "verify_top", r.verify_top.as_ref());
    let mut sizes = |v: &Option<Spanned<Sizes>>, k: &str| -> Vec<usize> {
        let Some(v) = v else { return Vec::new() };
        let list = v.get_ref().list();
        if list.is_empty() || list.iter().any(|&n| n < 1) {
            cx.at(
                v,
                key(k),
                format!("{k} takes circuit sizes of at least 1 edge, e.g. {k} = [10, 100, 1000]; got {list:?}"),
            );
            return Vec::new();
        }
        list.into_iter().map(|n| n as usize).collect()
    };
    let (top_n, greedy) = (sizes(&r.top_n, "top_n"), sizes(&r.greedy, "greedy"));
    let intervention = choice(
        cx,
        &r.intervention,
        key("intervention"),
        &[("patching", Ablation::Patching), ("zero", Ablation::Zero), ("mean", Ablation::Mean)],
        Ablation::Patching,
    );
    if let (Some(i), true) =
        (&r.intervention, top_n.is_empty() && greedy.is_empty() && verify_top == 0 && method != Method::Exact)
    {
        cx.at(i, key("intervention"), "intervention applies to real patching (circuits' faithfulness, exact, verify_top): add top_n = [...] or greedy = [...]");
    }
    Some(RunKind::EdgeAttribution(Options { method, top_n, greedy, intervention, verify_top }))
}

/// Its passes are its own (they capture every receiver with gradients).
fn captures(_: &RunSpec, _: &Model) -> Result<Captures> {
    Ok(Captures::default())
}

fn jobs(run: &RunSpec, z: &Sizing) -> Vec<JobDraft> {
    let RunKind::EdgeAttribution(o) = &run.kind else { return vec![] };
    let edges = Graph::new(z.cfg).edges().len();
    let passes = 1 + o.method.gradient_passes();
    // Faithfulness: the circuits with the empty circuit and the whole graph, one forward each
    // (batched where memory allows).
    let mut evaluations = if o.circuits() > 0 { o.circuits() + 2 } else { 0 };
    evaluations += match o.method {
        Method::Exact => edges + 1,
        _ if o.verify_top > 0 => o.verify_top + 1,
        _ => 0,
    };
    let also = if evaluations > 0 { format!(", faithfulness of {} circuits", o.circuits()) } else { String::new() };
    vec![JobDraft {
        cells: edges,
        forwards: passes + evaluations,
        tl_forwards: passes + evaluations,
        ..JobDraft::whole(
            format!("{}: {} scores of {edges} edges{also}", run.name, method_name(o.method)),
            COST_SCALE * z.full(passes) + z.full(evaluations),
        )
    }]
}

fn method_name(m: Method) -> &'static str {
    match m {
        Method::Eap => "eap",
        Method::EapIg { .. } => "eap_ig",
        Method::CleanCorrupted => "clean_corrupted",
        Method::Exact => "exact",
    }
}

fn run(cx: &RunContext, run: &RunSpec, _: Part) -> Result<JobOutput> {
    let RunKind::EdgeAttribution(o) = &run.kind else {
        return Err(Error::Other(format!("run '{}' is not an edge_attribution run", run.name)));
    };
    let (model, prep) = (cx.model, cx.clean_corrupted()?);
    let graph = Graph::new(&model.cfg);
    let t = Instant::now();
    let edges = graph.edges();
    let r = graph.receivers.len();
    let edge_scores: Vec<f64> = if o.method == Method::Exact {
        let pb = cx.bar(edges.len(), format!("{}: patch {} edges one at a time", run.name, edges.len()));
        let all: Vec<usize> = (0..edges.len()).collect();
        let v = exact_changes(model, prep, &graph, &all, o.intervention, |k| pb.inc(k as u64))?;
        pb.finish_and_clear();
        v
    } else {
        let n = prep.n_prompts() as usize;
        let passes = 1 + o.method.gradient_passes();
        let pb = cx.bar(n, format!("{}: {} scores, {passes} passes over {n} prompts", run.name, method_name(o.method)));
        let scores = edge_scores(model, prep, &graph, o.method, |k| pb.inc(k as u64))?;
        pb.finish_and_clear();
        let all: Vec<f64> = Vec::try_from(scores.flatten(0, -1).to_kind(Kind::Double))?;
        edges.iter().map(|&(s, rc)| all[s * r + rc]).collect()
    };
    let seconds = t.elapsed().as_secs_f64();
    // verify_top: the largest |estimates| patched for real.
    let top = largest_first(&edge_scores, if o.method == Method::Exact { 0 } else { o.verify_top });
    let mut patched: Vec<Option<f64>> = vec![None; edges.len()];
    let mut verify = serde_json::Value::Null;
    if !top.is_empty() {
        let pb = cx.bar(top.len(), format!("{}: verify the top {} edges", run.name, top.len()));
        let real = exact_changes(model, prep, &graph, &top, o.intervention, |k| pb.inc(k as u64))?;
        pb.finish_and_clear();
        for (&i, &v) in top.iter().zip(&real) {
            patched[i] = Some(v);
        }
        let est: Vec<f64> = top.iter().map(|&i| edge_scores[i]).collect();
        let (pearson, spearman) = correlations(&est, &real);
        verify = serde_json::json!({"edges": top.len(), "pearson": pearson, "spearman": spearman});
    }
    let rows = edges
        .iter()
        .zip(&edge_scores)
        .zip(&patched)
        .map(|((&(s, rc), &v), &p)| Row { patched: p, ..edge_row(run, &graph, s, rc, v) })
        .collect();
    let value = if o.method == Method::Exact {
        "the real change of the metric's mean over prompts when the edge alone carries the ablated activation"
    } else {
        "estimated change of the metric when the edge carries the corrupted run's activation (per prompt)"
    };
    let mut note = serde_json::json!({
        "method": o.method, "senders": graph.senders.len(), "receivers": r, "edges": edges.len(),
        "kv_receivers": if graph.grouped { "per key-value head" } else { "per head" },
        "seconds": seconds, "value": value, "verify_top": verify,
    });
    if o.circuits() > 0 {
        let t = Instant::now();
        let scored = Scored { graph: &graph, edges: &edges, scores: &edge_scores };
        let circuits = circuit_rows(cx, &run.name, o, &scored)?;
        note["faithfulness_seconds"] = t.elapsed().as_secs_f64().into();
        note["circuits"] = circuits
            .iter()
            .map(|c| {
                let keys = ["selection", "requested", "edges", "nodes", "metric", "faithfulness"];
                keys.iter().map(|k| (k.to_string(), c[*k].clone())).collect::<serde_json::Map<_, _>>().into()
            })
            .collect::<Vec<serde_json::Value>>()
            .into();
        note["drawn_circuit"] = drawn(&circuits);
        note["tables"] = serde_json::json!({ "circuits": circuits });
    }
    Ok((rows, note))
}

/// The circuits' rows: each requested circuit, then the empty circuit and the whole graph (the
/// ends faithfulness is measured between), with the metric over the prompts and faithfulness
/// (m(C) − m(∅)) / (m(graph) − m(∅)); with intervention = "patching", m(∅) is the corrupted run's
/// metric and m(graph) the clean run's.
fn circuit_rows(cx: &RunContext, run: &str, o: &Options, scored: &Scored) -> Result<Vec<serde_json::Value>> {
    let (model, prep) = (cx.model, cx.clean_corrupted()?);
    let n_edges = scored.edges.len();
    let mut chosen: Vec<(&str, Option<usize>, Vec<bool>)> = Vec::new();
    for &n in &o.top_n {
        chosen.push(("top_n", Some(n), scored.top_n(n)));
    }
    for &n in &o.greedy {
        chosen.push(("greedy", Some(n), scored.greedy(n)));
    }
    chosen.push(("none", None, vec![false; n_edges]));
    chosen.push(("graph", None, vec![true; n_edges]));
    let masks: Vec<Vec<bool>> = chosen.iter().map(|c| c.2.clone()).collect();
    let pb = cx.bar(masks.len(), format!("{run}: faithfulness of {} circuits", masks.len() - 2));
    let per_prompt = evaluate(model, prep, scored.graph, &masks, o.intervention, |k| pb.inc(k as u64))?;
    pb.finish_and_clear();
    let means: Vec<f64> = per_prompt.iter().map(|v| crate::analysis::mean(v)).collect();
    let (empty, full) = (means[means.len() - 2], means[means.len() - 1]);
    let names = |keep: &[bool]| -> String {
        let g = scored.graph;
        let mut v: Vec<String> = (0..n_edges)
            .filter(|&i| keep[i])
            .map(|i| {
                let (s, r) = scored.edges[i];
                format!("{}->{}", g.sender_name(g.senders[s]), g.receiver_name(g.receivers[r]))
            })
            .collect();
        v.sort();
        v.join(" ")
    };
    Ok(chosen
        .iter()
        .zip(&means)
        .map(|((selection, requested, keep), &m)| {
            serde_json::json!({
                "run": run,
                "selection": selection,
                "requested": requested,
                "edges": keep.iter().filter(|&&k| k).count(),
                "nodes": scored.nodes(keep),
                "metric": m,
                "faithfulness": (m - empty) / (full - empty),
                "intervention": o.intervention,
                // The whole graph's edges are every row of the run's table.
                "edge_names": if *selection == "graph" { String::new() } else { names(keep) },
            })
        })
        .collect())
}

/// The circuit the report draws: the smallest requested circuit whose faithfulness is at least
/// 0.8 (the most faithful when none is), if it has at most `DRAWN_EDGES` edges.
fn drawn(circuits: &[serde_json::Value]) -> serde_json::Value {
    const DRAWN_EDGES: u64 = 300;
    let requested: Vec<&serde_json::Value> =
        circuits.iter().filter(|c| !matches!(c["selection"].as_str(), Some("none" | "graph"))).collect();
    let edges = |c: &&serde_json::Value| c["edges"].as_u64().unwrap_or(u64::MAX);
    let faith = |c: &&serde_json::Value| c["faithfulness"].as_f64().unwrap_or(f64::NAN);
    let pick = requested
        .iter()
        .filter(|c| faith(c) >= 0.8)
        .min_by_key(|c| edges(c))
        .or_else(|| requested.iter().max_by(|a, b| faith(a).total_cmp(&faith(b))));
    match pick {
        Some(c) if edges(c) <= DRAWN_EDGES && edges(c) > 0 => serde_json::json!({
            "selection": c["selection"], "requested": c["requested"], "faithfulness": c["faithfulness"],
            "edge_names": c["edge_names"].as_str().unwrap_or_default().split(' ').collect::<Vec<_>>(),
        }),
        _ => serde_json::Value::Null,
    }
}

fn edge_row(run: &RunSpec, graph: &Graph, s: usize, r: usize, value: f64) -> Row {
    let (sender, receiver) = (graph.senders[s], graph.receivers[r]);
    let (sender_name, receiver_name) = (graph.sender_name(sender), graph.receiver_name(receiver));
    let (sender_layer, sender_head) = match sender {
        Sender::Input => (None, None),
        Sender::Head { layer, head } => (Some(layer as i32), Some(head as i32)),
        Sender::Mlp { layer } => (Some(layer as i32), None),
    };
    let (layer, head, input) = match receiver {
        Receiver::Head { layer, head, input } => (
            Some(layer as i32),
            Some(head as i32),
            match input {
                Qkv::Q => "q",
                Qkv::K => "k",
                Qkv::V => "v",
            },
        ),
        Receiver::Mlp { layer } => (Some(layer as i32), None, "mlp"),
        Receiver::Logits => (None, None, "logits"),
    };
    Row {
        run: run.name.clone(),
        kind: KIND.name.into(),
        hook: graph.receiver_point(receiver).0.to_string(),
        layer,
        head,
        value,
        computed: true,
        label: Some(format!("{sender_name}->{receiver_name}")),
        sender: Some(sender_name),
        receiver: Some(receiver_name),
        input: Some(input.into()),
        sender_layer,
        sender_head,
        ..Row::default()
    }
}

/// The 30 edges with the largest |score|; the circuits' faithfulness against their size; the
/// drawn circuit (the smallest with faithfulness ≥ 0.8) as a layered graph.
fn figures(run: &str, rows: &[&Row], facts: &RunFacts, metric: &str, suffix: &str) -> Vec<Figure> {
    let mut top: Vec<&Row> = rows.to_vec();
    top.sort_by(|a, b| b.value.abs().total_cmp(&a.value.abs()));
    top.truncate(30);
    if top.is_empty() {
        return Vec::new();
    }
    let mut out = vec![Figure::Bars(Bars {
        title: format!("{run}: the {} edges with the largest |score|{suffix}", top.len()),
        labels: top.iter().map(|r| r.label.clone().unwrap_or_default()).collect(),
        values: top.iter().map(|r| r.value).collect(),
        baseline: None,
        value_label: format!("estimated change of {metric}"),
    })];
    if !facts.faithfulness.is_empty() {
        out.push(Figure::Lines(Lines {
            title: format!("{run}: faithfulness of each circuit{suffix}"),
            x_ticks: facts.faithfulness.iter().map(|(l, _)| l.clone()).collect(),
            series: vec![("faithfulness".into(), facts.faithfulness.iter().map(|(_, f)| *f).collect())],
            value_label: "(m(circuit) − m(none)) / (m(graph) − m(none))".into(),
        }));
    }
    if let Some((title, edges)) = &facts.circuit {
        out.extend(circuit_graph(&format!("{run}: {title}{suffix}"), edges, rows).map(Figure::Circuit));
    }
    out
}

/// The circuit of `edges` (names) with their scores from `rows`, laid out by layer.
fn circuit_graph(title: &str, edges: &[String], rows: &[&Row]) -> Option<CircuitGraph> {
    let score: std::collections::HashMap<&str, f64> =
        rows.iter().filter_map(|r| Some((r.label.as_deref()?, r.value))).collect();
    // A node's column: the input 0, layer l's heads and MLP l + 1, the logits last.
    let layer_of = |name: &str| -> Option<usize> {
        let digits: String = name.chars().skip(1).take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()
    };
    let mut parsed = Vec::new();
    for e in edges {
        let (from, to) = e.split_once("->")?;
        let (to, input) = match to.split_once('<') {
            Some((node, rest)) => (node, rest.trim_end_matches('>')),
            None => (to, ""),
        };
        parsed.push((from.to_string(), to.to_string(), *score.get(e.as_str())?, input.to_string()));
    }
    let layers = parsed.iter().flat_map(|(f, t, _, _)| [layer_of(f), layer_of(t)]).flatten().max().unwrap_or(0) + 1;
    let column = |n: &str| match n {
        "input" => 0,
        "logits" => layers + 1,
        other => layer_of(other).map_or(0, |l| l + 1),
    };
    let mut names: Vec<String> = parsed.iter().flat_map(|(f, t, _, _)| [f.clone(), t.clone()]).collect();
    // Heads in head order, then the MLP, within each column.
    names.sort_by_key(|n| {
        let head: String = n.rsplit(['h', 'v']).next().unwrap_or_default().to_string();
        (column(n), n.starts_with('m'), n.contains(".kv"), head.parse::<usize>().unwrap_or(0), n.clone())
    });
    names.dedup();
    // Only the columns with a node in them (a circuit skips most layers).
    let mut used: Vec<usize> = names.iter().map(|n| column(n)).collect();
    used.dedup();
    let mut rows_used = vec![0usize; used.len()];
    let mut nodes = Vec::new();
    for n in &names {
        let c = used.iter().position(|&u| u == column(n)).expect("every node's column is used");
        nodes.push((n.clone(), c, rows_used[c]));
        rows_used[c] += 1;
    }
    let index = |n: &str| names.iter().position(|x| x == n).expect("every end is a node");
    let edges = parsed.iter().map(|(f, t, s, i)| (index(f), index(t), *s, i.clone())).collect();
    let columns = used
        .iter()
        .map(|&u| match u {
            0 => "input".to_string(),
            u if u == layers + 1 => "logits".to_string(),
            u => format!("layer {}", u - 1),
        })
        .collect();
    Some(CircuitGraph { title: title.to_string(), columns, nodes, edges })
}
