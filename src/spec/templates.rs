//! Prompt sets from templates, as TransformerLens's IOIDataset builds them: templates with named
//! slots (`{S}`, `{IO}`, `{PLACE}`), each slot filled from its list by a seeded draw, every prompt
//! recording where each slot's filler landed. A slot written once names the role `S`; one
//! written several times names `S1`, `S2`, … in order (the IOI paper's S1 and S2); `END` is the
//! prompt's last token. Roles are byte spans here; tokenization turns them into positions.
use std::collections::BTreeMap;
use std::ops::Range;

/// A template set as the spec gives it.
#[derive(Debug, Clone)]
pub struct TemplateSet {
    pub templates: Vec<String>,
    pub slots: BTreeMap<String, Vec<String>>,
    /// The correct answer, a template of slots (e.g. "{IO}").
    pub answer: String,
    /// The incorrect answer (e.g. "{S}"), if any.
    pub wrong_answer: Option<String>,
    pub count: usize,
    pub seed: u64,
}

/// One generated prompt: its text, the slot values drawn and each role's byte span.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub text: String,
    pub template: usize,
    pub values: BTreeMap<String, String>,
    pub roles: Vec<(String, Range<usize>)>,
    pub answer: String,
    pub wrong_answer: Option<String>,
}

/// The slots of a template in order of appearance, each `{NAME}` with its byte range.
pub fn slots_of(template: &str) -> Result<Vec<(String, Range<usize>)>, String> {
    let mut out = Vec::new();
    let mut rest = 0;
    while let Some(open) = template[rest..].find('{').map(|i| i + rest) {
        let close = template[open..].find('}').map(|i| i + open).ok_or_else(|| {
            format!("a '{{' at byte {open} is not closed: write slots as {{NAME}} (letters, digits, _)")
        })?;
        let name = &template[open + 1..close];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("slot {{{name}}} is not a name: write slots as {{NAME}} (letters, digits, _)"));
        }
        out.push((name.to_string(), open..close + 1));
        rest = close + 1;
    }
    Ok(out)
}

/// Role names of a template's slots: a slot written once is its name, one written k > 1 times
/// is NAME1..NAMEk.
fn role_names(slots: &[(String, Range<usize>)]) -> Vec<String> {
    let count = |n: &str| slots.iter().filter(|(m, _)| m == n).count();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    slots
        .iter()
        .map(|(n, _)| {
            let k = seen.entry(n).or_insert(0);
            *k += 1;
            if count(n) == 1 {
                n.clone()
            } else {
                format!("{n}{k}")
            }
        })
        .collect()
}

/// splitmix64: a fixed, documented sequence for a seed (the prompt set must not change with a
/// library's version).
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Every problem of a template set, each as (key, message): slots a template names that have no
/// list, empty lists, answers naming slots their template lacks, too few distinct fillers.
pub fn problems(set: &TemplateSet) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if set.templates.is_empty() {
        out.push(("prompts.templates".into(), "no templates: give at least one".into()));
    }
    for (name, list) in &set.slots {
        if list.is_empty() {
            out.push((format!("prompts.slots.{name}"), "an empty list: give at least one filler".into()));
        }
    }
    for (t, template) in set.templates.iter().enumerate() {
        let slots = match slots_of(template) {
            Ok(s) => s,
            Err(e) => {
                out.push((format!("prompts.templates[{t}]"), e));
                continue;
            }
        };
        let mut distinct: Vec<&str> = slots.iter().map(|(n, _)| n.as_str()).collect();
        distinct.sort_unstable();
        distinct.dedup();
        for name in &distinct {
            if !set.slots.contains_key(*name) {
                let known: Vec<&str> = set.slots.keys().map(String::as_str).collect();
                out.push((
                    format!("prompts.templates[{t}]"),
                    format!(
                        "slot {{{name}}} has no fillers: add {name} = [...] under [prompts.slots] (slots given: {})",
                        known.join(", ")
                    ),
                ));
            }
        }
        for (key, answer) in
            [("prompts.answer", Some(&set.answer)), ("prompts.wrong_answer", set.wrong_answer.as_ref())]
        {
            let Some(answer) = answer else { continue };
            match slots_of(answer) {
                Err(e) => out.push((key.into(), e)),
                Ok(a) => {
                    if let Some((n, _)) = a.iter().find(|(n, _)| !distinct.contains(&n.as_str())) {
                        out.push((
                            key.into(),
                            format!("names slot {{{n}}}, which template {t} ({template:?}) does not have"),
                        ));
                    }
                }
            }
        }
        // Distinct slots draw distinct fillers: a template needs as many as it has slots.
        let pool: std::collections::BTreeSet<&String> =
            distinct.iter().filter_map(|n| set.slots.get(*n)).flatten().collect();
        if pool.len() < distinct.len() && distinct.iter().all(|n| set.slots.contains_key(*n)) {
            out.push((
                format!("prompts.templates[{t}]"),
                format!(
                    "has {} slots but their lists hold only {} distinct fillers; every slot of a prompt gets its own",
                    distinct.len(),
                    pool.len()
                ),
            ));
        }
    }
    out
}

/// Fills `template` with a draw of distinct values (`avoid`: values none of them may take).
fn fill(
    set: &TemplateSet,
    template: &str,
    slots: &[(String, Range<usize>)],
    draw: &mut Draw,
    avoid: &BTreeMap<String, String>,
    redraw: Option<&[String]>,
) -> BTreeMap<String, String> {
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    for (name, _) in slots {
        if values.contains_key(name) {
            continue;
        }
        if let (Some(keep), Some(v)) = (redraw, avoid.get(name)) {
            if !keep.contains(name) {
                values.insert(name.clone(), v.clone());
                continue;
            }
        }
        let list = &set.slots[name];
        // A value no other slot of the prompt (nor, redrawing, the clean prompt) holds; lists
        // were checked to hold enough.
        let taken = |v: &String| values.values().any(|u| u == v) || avoid.values().any(|u| u == v);
        let free: Vec<&String> = list.iter().filter(|v| !taken(v)).collect();
        let pick = if free.is_empty() { &list[draw.below(list.len())] } else { free[draw.below(free.len())] };
        values.insert(name.clone(), pick.clone());
    }
    let _ = template;
    values
}

/// Writes `template` with `values`: the text and each role's byte span.
fn render(template: &str, slots: &[(String, Range<usize>)], values: &BTreeMap<String, String>) -> Generated {
    let names = role_names(slots);
    let (mut text, mut roles, mut at) = (String::new(), Vec::new(), 0);
    for ((name, span), role) in slots.iter().zip(names) {
        text.push_str(&template[at..span.start]);
        let start = text.len();
        text.push_str(&values[name]);
        roles.push((role, start..text.len()));
        at = span.end;
    }
    text.push_str(&template[at..]);
    Generated { text, template: 0, values: values.clone(), roles, answer: String::new(), wrong_answer: None }
}

fn answer_text(answer: &str, values: &BTreeMap<String, String>) -> String {
    let slots = slots_of(answer).unwrap_or_default();
    render(answer, &slots, values).text
}

/// The prompts of a checked template set (`problems` empty): prompt i fills template i mod T.
pub fn generate(set: &TemplateSet) -> Vec<Generated> {
    let mut draw = Draw(set.seed);
    (0..set.count)
        .map(|i| {
            let t = i % set.templates.len();
            let template = &set.templates[t];
            let slots = slots_of(template).expect("checked");
            let values = fill(set, template, &slots, &mut draw, &BTreeMap::new(), None);
            let mut g = render(template, &slots, &values);
            g.template = t;
            g.answer = answer_text(&set.answer, &values);
            g.wrong_answer = set.wrong_answer.as_ref().map(|w| answer_text(w, &values));
            g
        })
        .collect()
}

/// Each prompt's corrupted twin: the same template with the slots `redraw` drawn again, from
/// values none of the clean prompt's slots hold (IOI's ABC corruption redraws every name).
pub fn corrupt(set: &TemplateSet, prompts: &[Generated], redraw: &[String]) -> Vec<Generated> {
    let mut draw = Draw(set.seed ^ 0x5eed_c0de);
    prompts
        .iter()
        .map(|g| {
            let template = &set.templates[g.template];
            let slots = slots_of(template).expect("checked");
            let values = fill(set, template, &slots, &mut draw, &g.values, Some(redraw));
            let mut c = render(template, &slots, &values);
            c.template = g.template;
            c
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ioi() -> TemplateSet {
        TemplateSet {
            templates: vec![
                "When{IO} and{S} went to the{PLACE},{S} gave a bag to".into(),
                "When{S} and{IO} went to the{PLACE},{S} gave a bag to".into(),
            ],
            slots: [
                (
                    "IO".to_string(),
                    vec![" Mary".to_string(), " John".into(), " Tom".into(), " Ann".into(), " Bob".into()],
                ),
                (
                    "S".to_string(),
                    vec![" Mary".to_string(), " John".into(), " Tom".into(), " Ann".into(), " Bob".into()],
                ),
                ("PLACE".to_string(), vec![" shop".to_string(), " park".into()]),
            ]
            .into(),
            answer: "{IO}".into(),
            wrong_answer: Some("{S}".into()),
            count: 8,
            seed: 3,
        }
    }

    #[test]
    fn roles_name_each_slot_and_repeated_slots_in_order() {
        let set = ioi();
        assert!(problems(&set).is_empty(), "{:?}", problems(&set));
        let prompts = generate(&set);
        assert_eq!(prompts.len(), 8);
        for g in &prompts {
            let names: Vec<&str> = g.roles.iter().map(|(n, _)| n.as_str()).collect();
            let (io, s) = (&g.values["IO"], &g.values["S"]);
            assert_ne!(io, s, "distinct slots draw distinct fillers");
            match g.template {
                0 => assert_eq!(names, ["IO", "S1", "PLACE", "S2"]),
                _ => assert_eq!(names, ["S1", "IO", "PLACE", "S2"]),
            }
            for (name, span) in &g.roles {
                let want = if name.starts_with('S') && name != "S" { s } else { &g.values[name.as_str()] };
                assert_eq!(&g.text[span.clone()], want.as_str(), "{name} in {:?}", g.text);
            }
            assert_eq!(&g.answer, io);
            assert_eq!(g.wrong_answer.as_ref(), Some(s));
        }
        assert_eq!(generate(&set), prompts, "a seed gives one prompt set");
        let corrupted = corrupt(&set, &prompts, &["IO".into(), "S".into()]);
        for (c, g) in corrupted.iter().zip(&prompts) {
            assert_eq!(c.values["PLACE"], g.values["PLACE"], "slots not redrawn keep their value");
            assert!(c.values["IO"] != g.values["IO"] && c.values["IO"] != g.values["S"]);
        }
    }

    #[test]
    fn template_problems_are_named() {
        let mut set = ioi();
        set.templates.push("At the {TIME}, {S} left".into());
        set.answer = "{NAME}".into();
        set.slots.insert("EMPTY".into(), vec![]);
        let p = problems(&set);
        let text = format!("{p:?}");
        assert!(text.contains("slot {TIME} has no fillers"), "{text}");
        assert!(text.contains("names slot {NAME}"), "{text}");
        assert!(text.contains("prompts.slots.EMPTY"), "{text}");
        assert!(slots_of("a {b").is_err() && slots_of("a {b c}").is_err());
    }
}
