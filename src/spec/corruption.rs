//! The spec's [prompts] and [corruption]: the prompt pairs (inline or from a file, or the
//! `--prompts` override) and how each clean prompt is corrupted, checked with every problem
//! reported at its line and key.
use std::path::Path;

use crate::spec::prompts::{self, PromptPair};
use crate::spec::raw::*;
use crate::spec::resolve::Ctx;
use crate::spec::templates::{self, TemplateSet};
use toml::Spanned;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Corruption {
    /// Corrupted prompt i = clean prompt i^1; answers stay with the clean prompt.
    SwapPairs,
    /// Corrupted prompts given explicitly (in the spec or the prompt file).
    Prompts,
    /// A template set's prompts with these slots drawn again (values the clean prompt's slots
    /// do not hold), everything else kept.
    Slots(Vec<String>),
    /// Each (from, to) word replaced in every clean prompt.
    ReplaceTokens(Vec<(String, String)>),
    /// Gaussian noise on the token embeddings at given token positions or at the tokens of given
    /// words (ROME's causal tracing): `noise` × the std of W_E, `samples` noised copies of every
    /// prompt drawn with `seed`.
    Noise { positions: Option<Vec<i64>>, words: Option<Vec<String>>, noise: f64, samples: usize, seed: u64 },
}

impl Corruption {
    /// How many corrupted copies each clean prompt has.
    pub fn samples(&self) -> usize {
        match self {
            Corruption::Noise { samples, .. } => *samples,
            _ => 1,
        }
    }
}

/// The prompts (none when the spec has no [prompts]: only runs that need none may then be
/// given) and the corruption (None when the spec gives none and the prompts carry none).
pub(crate) fn resolve_prompts(
    cx: &mut Ctx,
    raw: &RawSpec,
    base: &Path,
    prompts_file: Option<&Path>,
) -> (Vec<PromptPair>, Option<Corruption>) {
    let Some(p) = &raw.prompts else {
        if let Some(c) = &raw.corruption {
            cx.at(&c.kind, "corruption", "a [corruption] needs [prompts] to corrupt");
        }
        return (Vec::new(), None);
    };
    let mut prompts = read_prompts(cx, p, base, prompts_file);
    if let (Some(c), Some(set)) = (&raw.corruption, template_set(p.get_ref())) {
        if c.kind.get_ref() == "slots" && templates::problems(&set).is_empty() && prompts.len() == set.count {
            redraw_slots(cx, c, &set, &mut prompts);
        }
    }
    let corruption = match &raw.corruption {
        None if prompts.iter().all(|p| p.corrupted.is_some()) && !prompts.is_empty() => Some(Corruption::Prompts),
        None => None,
        Some(c) => {
            let corruption = resolve_corruption(cx, c, &mut prompts);
            check_noise_only_keys(cx, c);
            Some(corruption)
        }
    };
    (prompts, corruption)
}

/// The [prompts] section: clean prompts with their answers, or a prompt file.
fn read_prompts(
    cx: &mut Ctx,
    section: &Spanned<RawPrompts>,
    base: &Path,
    prompts_file: Option<&Path>,
) -> Vec<PromptPair> {
    let mut prompts: Vec<PromptPair> = Vec::new();
    let p = section.get_ref();
    if let Some(t) = &p.templates {
        let other =
            [p.clean.as_ref().map(|c| c.span()), p.file.as_ref().map(|f| f.span())].into_iter().flatten().next();
        if let Some(other) = other {
            cx.at_offset(other.start, "prompts", "give templates, clean + answers, or file: one of them");
        }
        return from_templates(cx, p, t);
    }
    match (&p.clean, &p.file) {
        (Some(clean), None) => {
            if clean.get_ref().is_empty() {
                cx.at(clean, "prompts.clean", "no prompts: give at least one clean prompt");
            }
            if let Some(i) = clean.get_ref().iter().position(|c| c.trim().is_empty()) {
                cx.at(clean, format!("prompts.clean[{i}]"), "an empty prompt: every prompt needs some text");
            }
            let answers = p.answers.as_ref();
            let wrong = p.wrong_answers.as_ref();
            let n = clean.get_ref().len();
            match (answers, wrong) {
                (None, _) => {
                    cx.at(clean, "prompts.answers", "missing: give one [correct, incorrect] pair per clean prompt")
                }
                (Some(a), _) if a.get_ref().len() != n => cx.at(
                    a,
                    "prompts.answers",
                    format!("{} answer entries for {n} clean prompts: give one per prompt", a.get_ref().len()),
                ),
                (_, Some(w)) if w.get_ref().len() != n => cx.at(
                    w,
                    "prompts.wrong_answers",
                    format!("{} wrong-answer sets for {n} clean prompts: give one per prompt", w.get_ref().len()),
                ),
                (Some(a), None) => {
                    for (i, (c, pair)) in clean.get_ref().iter().zip(a.get_ref()).enumerate() {
                        if pair.get_ref().is_empty() || pair.get_ref().len() > 2 {
                            cx.at(pair, format!("prompts.answers[{i}]"), "give [correct] or [correct, incorrect] (for token sets, give answers = [[correct…], …] and wrong_answers = [[incorrect…], …])");
                            continue;
                        }
                        prompts.push(PromptPair::new(
                            c.clone(),
                            None,
                            pair.get_ref()[0].clone(),
                            pair.get_ref().get(1).cloned(),
                        ));
                    }
                }
                (Some(a), Some(w)) => {
                    for (i, ((c, set), wrong)) in clean.get_ref().iter().zip(a.get_ref()).zip(w.get_ref()).enumerate() {
                        if set.get_ref().is_empty() {
                            cx.at(
                                set,
                                format!("prompts.answers[{i}]"),
                                "an empty set: give at least one correct answer",
                            );
                            // Still counted: the prompt count stays right for the checks after.
                            prompts.push(PromptPair::new(c.clone(), None, String::new(), None));
                            continue;
                        }
                        if let Some(both) = set.get_ref().iter().find(|t| wrong.get_ref().contains(t)) {
                            cx.at(
                                wrong,
                                format!("prompts.wrong_answers[{i}]"),
                                format!("{both:?} is both a correct and a wrong answer: the sets must not overlap"),
                            );
                        }
                        prompts.push(PromptPair::with_sets(c.clone(), None, set.get_ref(), wrong.get_ref()));
                    }
                }
            }
        }
        (None, Some(f)) => {
            match prompts::read(&prompts_file.map(Path::to_path_buf).unwrap_or_else(|| base.join(f.get_ref()))) {
                Ok(v) => prompts = v,
                Err(e) if prompts_file.is_some() => cx.at(f, "prompts.file (replaced by --prompts)", e),
                Err(e) => cx.at(f, "prompts.file", e),
            }
        }
        (Some(c), Some(_)) => cx.at(c, "prompts", "give either clean + answers or file, not both"),
        (None, None) => cx.at(section, "prompts", "give clean + answers, or file"),
    }
    prompts
}

/// The most prompts templates generate (they are all held, tokenized, at once).
const MAX_TEMPLATE_PROMPTS: i64 = 1_000_000;

/// The template set of a [prompts] section that gives templates.
fn template_set(p: &RawPrompts) -> Option<TemplateSet> {
    Some(TemplateSet {
        templates: p.templates.as_ref()?.get_ref().clone(),
        slots: p.slots.as_ref().map(|s| s.get_ref().clone()).unwrap_or_default(),
        answer: p.answer.as_ref().map(|a| a.get_ref().clone()).unwrap_or_default(),
        wrong_answer: p.wrong_answer.as_ref().map(|a| a.get_ref().clone()),
        count: p.count.as_ref().map_or(0, |c| (*c.get_ref()).max(0) as usize),
        seed: p.seed.as_ref().map_or(0, |s| *s.get_ref() as u64),
    })
}

/// The prompts of a template set, each with its roles; every problem at its key.
fn from_templates(cx: &mut Ctx, p: &RawPrompts, t: &Spanned<Vec<String>>) -> Vec<PromptPair> {
    let set = template_set(p).expect("templates given");
    let at = |key: &str| -> usize {
        let span = match key {
            "prompts.answer" => p.answer.as_ref().map(|a| a.span()),
            "prompts.wrong_answer" => p.wrong_answer.as_ref().map(|a| a.span()),
            k if k.starts_with("prompts.slots") => p.slots.as_ref().map(|s| s.span()),
            _ => None,
        };
        span.unwrap_or(t.span()).start
    };
    let mut ok = true;
    if p.answer.is_none() {
        cx.at(t, "prompts.answer", "templates need answer = \"{SLOT}\" (the correct answer, e.g. \"{IO}\")");
        ok = false;
    }
    match &p.count {
        None => {
            cx.at(t, "prompts.count", "templates need count = N, the number of prompts to generate");
            ok = false;
        }
        Some(c) if *c.get_ref() < 1 || *c.get_ref() > MAX_TEMPLATE_PROMPTS => {
            cx.at(c, "prompts.count", format!("must be 1 to {MAX_TEMPLATE_PROMPTS}, got {}", c.get_ref()));
            ok = false;
        }
        _ => {}
    }
    for (key, given) in [
        ("answers", p.answers.as_ref().map(|a| a.span())),
        ("wrong_answers", p.wrong_answers.as_ref().map(|a| a.span())),
    ] {
        if let Some(span) = given {
            cx.at_offset(
                span.start,
                format!("prompts.{key}"),
                "templates take answer = \"{SLOT}\" (and wrong_answer), not per-prompt lists",
            );
            ok = false;
        }
    }
    for (key, message) in templates::problems(&set) {
        cx.at_offset(at(&key), key, message);
        ok = false;
    }
    if !ok {
        return Vec::new();
    }
    templates::generate(&set)
        .into_iter()
        .map(|g| {
            let mut pair = PromptPair::new(g.text, None, g.answer, g.wrong_answer);
            pair.source = Some(format!("template {}", g.template));
            pair.roles = g.roles;
            pair
        })
        .collect()
}

/// kind = "slots": each template prompt's corrupted twin, the slots named drawn again.
fn redraw_slots(cx: &mut Ctx, c: &RawCorruption, set: &TemplateSet, prompts: &mut [PromptPair]) {
    let Some(slots) = &c.slots else { return };
    let unknown: Vec<&String> = slots.get_ref().iter().filter(|s| !set.slots.contains_key(*s)).collect();
    if !unknown.is_empty() {
        let known: Vec<&str> = set.slots.keys().map(String::as_str).collect();
        cx.at(
            slots,
            "corruption.slots",
            format!("{unknown:?} are not slots of the templates (slots: {})", known.join(", ")),
        );
        return;
    }
    let generated = templates::generate(set);
    for (p, c) in prompts.iter_mut().zip(templates::corrupt(set, &generated, slots.get_ref())) {
        p.corrupted = Some(c.text);
    }
}

/// The [corruption] section applied to the prompts (their corrupted prompts set or cleared).
fn resolve_corruption(cx: &mut Ctx, c: &RawCorruption, prompts: &mut [PromptPair]) -> Corruption {
    match c.kind.get_ref().as_str() {
        "swap_pairs" => {
            if !prompts.len().is_multiple_of(2) {
                cx.at(
                    &c.kind,
                    "corruption.kind",
                    format!("swap_pairs needs an even number of prompts, got {}", prompts.len()),
                );
            }
            // The pair partner is the corruption; a file's own "corrupt" prompts are not used.
            for p in prompts.iter_mut() {
                p.corrupted = None;
            }
            Corruption::SwapPairs
        }
        "prompts" => {
            match &c.prompts {
                Some(list) if list.get_ref().len() == prompts.len() => {
                    for (p, c) in prompts.iter_mut().zip(list.get_ref()) {
                        p.corrupted = Some(c.clone());
                    }
                }
                Some(list) => cx.at(
                    list,
                    "corruption.prompts",
                    format!("{} corrupted prompts for {} clean prompts", list.get_ref().len(), prompts.len()),
                ),
                None if prompts.iter().all(|p| p.corrupted.is_some()) => {}
                None => cx.at(
                    &c.kind,
                    "corruption.prompts",
                    "kind = \"prompts\" needs prompts = [...] (or a prompt file with corrupt prompts)",
                ),
            }
            Corruption::Prompts
        }
        "replace_tokens" => match &c.replace {
            Some(map) if !map.get_ref().is_empty() => {
                let pairs: Vec<(String, String)> = map.get_ref().iter().map(|(a, b)| (a.clone(), b.clone())).collect();
                for i in replace_words(prompts, &pairs) {
                    cx.at(
                        map,
                        "corruption.replace",
                        format!("prompt {i} contains none of the words to replace: {:?}", prompts[i].clean),
                    );
                }
                Corruption::ReplaceTokens(pairs)
            }
            _ => {
                cx.at(&c.kind, "corruption.replace", "replace_tokens needs replace = { word = \"replacement\", ... }");
                Corruption::SwapPairs
            }
        },
        "noise" => resolve_noise(cx, c),
        "slots" => match &c.slots {
            _ if prompts.iter().any(|p| p.roles.is_empty()) => {
                cx.at(&c.kind, "corruption.kind", "kind = \"slots\" redraws template slots: give [prompts] templates");
                Corruption::SwapPairs
            }
            Some(s) if !s.get_ref().is_empty() => Corruption::Slots(s.get_ref().clone()),
            Some(s) => {
                cx.at(s, "corruption.slots", "give the slots to draw again, e.g. [\"IO\", \"S\"]");
                Corruption::SwapPairs
            }
            None => {
                cx.at(
                    &c.kind,
                    "corruption.slots",
                    "kind = \"slots\" needs slots = [\"IO\", \"S\"]: the template slots to draw again",
                );
                Corruption::SwapPairs
            }
        },
        other => {
            cx.at(
                &c.kind,
                "corruption.kind",
                format!("unknown corruption '{other}' (valid: swap_pairs, prompts, replace_tokens, noise, slots)"),
            );
            Corruption::SwapPairs
        }
    }
}

/// Noise's own keys given with another kind of corruption are errors, not ignored.
fn check_noise_only_keys(cx: &mut Ctx, c: &RawCorruption) {
    let kind = c.kind.get_ref().as_str();
    let noise_only = [
        ("positions", c.positions.as_ref().map(|v| v.span().start)),
        ("words", c.words.as_ref().map(|v| v.span().start)),
        ("noise", c.noise.as_ref().map(|v| v.span().start)),
        ("samples", c.samples.as_ref().map(|v| v.span().start)),
        ("seed", c.seed.as_ref().map(|v| v.span().start)),
    ];
    for (name, at) in noise_only {
        if let (Some(at), false) = (at, kind == "noise") {
            cx.at_offset(
                at,
                format!("corruption.{name}"),
                format!("'{name}' is an option of kind = \"noise\", not of '{kind}'"),
            );
        }
    }
}

fn resolve_noise(cx: &mut Ctx, c: &RawCorruption) -> Corruption {
    let positions = c.positions.as_ref().map(|p| p.get_ref().clone());
    let words = c.words.as_ref().map(|w| w.get_ref().clone());
    match (&c.positions, &c.words) {
        (None, None) | (Some(_), Some(_)) => cx.at(
            &c.kind,
            "corruption.positions",
            "noise needs either positions = [token indices] or words = [\"words to noise\"]",
        ),
        (Some(p), None) if p.get_ref().is_empty() || p.get_ref().iter().any(|&x| x < 0) => {
            cx.at(p, "corruption.positions", format!("give non-negative token positions, got {:?}", p.get_ref()))
        }
        (None, Some(w)) if w.get_ref().is_empty() => cx.at(w, "corruption.words", "give at least one word"),
        _ => {}
    }
    let noise = match &c.noise {
        Some(n) if !(*n.get_ref() > 0.0 && n.get_ref().is_finite()) => {
            cx.at(
                n,
                "corruption.noise",
                format!("noise must be a positive number of embedding standard deviations, got {}", n.get_ref()),
            );
            3.0
        }
        Some(n) => *n.get_ref(),
        None => 3.0,
    };
    let samples = match &c.samples {
        Some(s) if *s.get_ref() < 1 => {
            cx.at(s, "corruption.samples", format!("samples must be at least 1, got {}", s.get_ref()));
            1
        }
        Some(s) => *s.get_ref() as usize,
        None => 1,
    };
    let seed = c.seed.as_ref().map(|s| *s.get_ref() as u64).unwrap_or(0);
    Corruption::Noise { positions, words, noise, samples, seed }
}

/// Sets every prompt's corrupted twin to its clean text with each (from, to) word replaced;
/// returns the prompts none of the words occur in.
pub(crate) fn replace_words(prompts: &mut [PromptPair], pairs: &[(String, String)]) -> Vec<usize> {
    let mut unchanged = Vec::new();
    for (i, p) in prompts.iter_mut().enumerate() {
        let mut s = p.clean.clone();
        for (from, to) in pairs {
            s = s.replace(from.as_str(), to);
        }
        if s == p.clean {
            unchanged.push(i);
        }
        p.corrupted = Some(s);
    }
    unchanged
}
