//! edge_attribution: circuit discovery's edge scores (EAP, EAP-IG, their clean/corrupted mean),
//! one row per edge of the graph of heads, MLPs, the input and the logits; circuits chosen from
//! them (`top_n`, `greedy`) with their faithfulness, one row per circuit in `<run>-circuits`.
use std::path::Path;
use std::time::Instant;

use tch::Kind;
use toml::Spanned;

use crate::analysis::circuits::Scored;
use crate::analysis::edge_attribution::{edge_scores, evaluate, Ablation, Graph, Method, Qkv, Receiver, Sender};
use crate::error::{Error, Result};
use crate::kinds::options::Located;
use crate::kinds::shared::context::RunContext;
use crate::kinds::{
    no_prompt_check, only_note, whole_job_key, Captures, JobDraft, JobOutput, KindInfo, Needs, Part, RunKind, RunSpec,
    Sizing,
};
use crate::model::config::ModelConfig;
use crate::model::Model;
use crate::output::figure::{Bars, Figure, RunFacts};
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
    /// What edges outside a circuit carry when its faithfulness is measured.
    pub intervention: Ablation,
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
    let edges = Graph::new(cfg).edges().len();
    for (key, sizes) in [("top_n", &o.top_n), ("greedy", &o.greedy)] {
        if let Some(&n) = sizes.iter().find(|&&n| n > edges) {
            problems.push(format!(
                "{}: run '{}': {key} = {n} is more edges than the model's graph has ({edges}: {} senders, {} receivers); use at most {edges}",
                run.key_at(key, file),
                run.name,
                Graph::new(cfg).senders.len(),
                Graph::new(cfg).receivers.len()
            ));
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum MethodName {
    Eap,
    EapIg,
    CleanCorrupted,
}

pub(crate) fn resolve(cx: &mut Ctx, r: &Raw, at: &mut Located, i: usize, _: &Path) -> Option<RunKind> {
    at.key(cx, "top_n", r.top_n.as_ref());
    at.key(cx, "greedy", r.greedy.as_ref());
    let key = |k: &str| format!("run[{i}].{k}");
    let name = choice(
        cx,
        &r.method,
        key("method"),
        &[("eap", MethodName::Eap), ("eap_ig", MethodName::EapIg), ("clean_corrupted", MethodName::CleanCorrupted)],
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
    };
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
    if let (Some(i), true) = (&r.intervention, top_n.is_empty() && greedy.is_empty()) {
        cx.at(
            i,
            key("intervention"),
            "intervention applies to the circuits' faithfulness: add top_n = [...] or greedy = [...]",
        );
    }
    Some(RunKind::EdgeAttribution(Options { method, top_n, greedy, intervention }))
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
    let evaluations = if o.circuits() > 0 { o.circuits() + 2 } else { 0 };
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
    }
}

fn run(cx: &RunContext, run: &RunSpec, _: Part) -> Result<JobOutput> {
    let RunKind::EdgeAttribution(o) = &run.kind else {
        return Err(Error::Other(format!("run '{}' is not an edge_attribution run", run.name)));
    };
    let (model, prep) = (cx.model, cx.clean_corrupted()?);
    let graph = Graph::new(&model.cfg);
    let t = Instant::now();
    let scores = edge_scores(model, prep, &graph, o.method)?;
    let seconds = t.elapsed().as_secs_f64();
    let r = graph.receivers.len();
    let all: Vec<f64> = Vec::try_from(scores.flatten(0, -1).to_kind(Kind::Double))?;
    let edges = graph.edges();
    let edge_scores: Vec<f64> = edges.iter().map(|&(s, rc)| all[s * r + rc]).collect();
    let rows = edges.iter().zip(&edge_scores).map(|(&(s, rc), &v)| edge_row(run, &graph, s, rc, v)).collect();
    let mut note = serde_json::json!({
        "method": o.method, "senders": graph.senders.len(), "receivers": r, "edges": edges.len(),
        "kv_receivers": if graph.grouped { "per key-value head" } else { "per head" },
        "seconds": seconds,
        "value": "estimated change of the metric when the edge carries the corrupted run's activation (per prompt)"
    });
    if o.circuits() > 0 {
        let t = Instant::now();
        let scored = Scored { graph: &graph, edges: &edges, scores: &edge_scores };
        let circuits = circuit_rows(cx, &run.name, o, &scored)?;
        note["faithfulness_seconds"] = t.elapsed().as_secs_f64().into();
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
    let per_prompt = evaluate(model, prep, scored.graph, &masks, o.intervention)?;
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

/// The 30 edges with the largest |score|.
fn figures(run: &str, rows: &[&Row], _: &RunFacts, metric: &str, suffix: &str) -> Vec<Figure> {
    let mut top: Vec<&Row> = rows.to_vec();
    top.sort_by(|a, b| b.value.abs().total_cmp(&a.value.abs()));
    top.truncate(30);
    if top.is_empty() {
        return Vec::new();
    }
    vec![Figure::Bars(Bars {
        title: format!("{run}: the {} edges with the largest |score|{suffix}", top.len()),
        labels: top.iter().map(|r| r.label.clone().unwrap_or_default()).collect(),
        values: top.iter().map(|r| r.value).collect(),
        baseline: None,
        value_label: format!("estimated change of {metric}"),
    })]
}
