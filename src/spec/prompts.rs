//! Prompt sets from files: JSONL (one {"clean", "answers": [correct, incorrect]},
//! {"prompt", "answer", "wrong_answer"} or {"clean", "answers": [correct…], "wrong_answers":
//! [incorrect…]} per line) and AutoCircuit-style prompt-pair JSON ({"prompts": [{"clean",
//! "corrupt", "answers", "wrong_answers"}]}, its answer lists read as token sets).
use serde::Deserialize;

/// One prompt with its answers and, when the source gives it, its corrupted twin.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PromptPair {
    pub clean: String,
    pub corrupted: Option<String>,
    pub correct: String,
    pub incorrect: Option<String>,
    /// Further correct answers: `correct` and these are a token set (recorded only when given,
    /// so manifests of single answers read as before sets existed).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub more_correct: Vec<String>,
    /// Further incorrect answers, with `incorrect` a token set.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub more_incorrect: Vec<String>,
    /// Where the prompt was written, "prompts.jsonl:7", for messages about it.
    #[serde(skip)]
    pub source: Option<String>,
    /// A template's prompt: each role ("S1", "IO", ...) with the byte span of its filler.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<(String, std::ops::Range<usize>)>,
}

impl PromptPair {
    /// A prompt with one correct and at most one incorrect answer.
    pub fn new(clean: String, corrupted: Option<String>, correct: String, incorrect: Option<String>) -> PromptPair {
        PromptPair {
            clean,
            corrupted,
            correct,
            incorrect,
            more_correct: vec![],
            more_incorrect: vec![],
            source: None,
            roles: vec![],
        }
    }

    /// A prompt whose answers are token sets (`correct` non-empty).
    pub fn with_sets(clean: String, corrupted: Option<String>, correct: &[String], incorrect: &[String]) -> PromptPair {
        PromptPair {
            clean,
            corrupted,
            correct: correct[0].clone(),
            incorrect: incorrect.first().cloned(),
            more_correct: correct[1..].to_vec(),
            more_incorrect: incorrect.iter().skip(1).cloned().collect(),
            source: None,
            roles: vec![],
        }
    }

    /// The correct answers, the first one first.
    pub fn correct_set(&self) -> Vec<&str> {
        std::iter::once(self.correct.as_str()).chain(self.more_correct.iter().map(String::as_str)).collect()
    }

    /// The incorrect answers (none, one or a set).
    pub fn incorrect_set(&self) -> Vec<&str> {
        self.incorrect.iter().chain(&self.more_incorrect).map(String::as_str).collect()
    }

    /// "prompt 3" or "prompt 3 (prompts.jsonl:4)".
    pub fn name(&self, i: usize) -> String {
        match &self.source {
            Some(s) => format!("prompt {i} ({s})"),
            None => format!("prompt {i}"),
        }
    }
}

#[derive(Deserialize)]
struct JsonlLine {
    #[serde(alias = "prompt")]
    clean: String,
    #[serde(alias = "corrupt")]
    corrupted: Option<String>,
    answers: Option<Vec<String>>,
    answer: Option<String>,
    wrong_answer: Option<String>,
    /// With it, `answers` is the correct set (AutoCircuit's reading) rather than a pair.
    wrong_answers: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct PairFile {
    prompts: Vec<PairEntry>,
}

#[derive(Deserialize)]
struct PairEntry {
    clean: String,
    corrupt: String,
    answers: Vec<String>,
    #[serde(default)]
    wrong_answers: Vec<String>,
}

/// Reads a prompt file; errors say which line or entry is wrong.
pub fn read(path: &std::path::Path) -> Result<Vec<PromptPair>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if text.trim_start().starts_with('{') && serde_json::from_str::<PairFile>(&text).is_ok() {
        let file: PairFile = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        return file
            .prompts
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                if e.answers.is_empty() {
                    return Err(format!("{}: prompts[{i}] has no answers", path.display()));
                }
                let mut p = PromptPair::with_sets(e.clean, Some(e.corrupt), &e.answers, &e.wrong_answers);
                p.source = Some(format!("{}: prompts[{i}]", path.display()));
                Ok(p)
            })
            .collect();
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = format!("{}:{}", path.display(), i + 1);
        let l: JsonlLine = serde_json::from_str(line).map_err(|e| format!("{at}: {e}"))?;
        let mut p = match (l.answers, l.answer, l.wrong_answers) {
            (Some(a), _, Some(w)) if !a.is_empty() => PromptPair::with_sets(l.clean, l.corrupted, &a, &w),
            (Some(a), _, None) if !a.is_empty() && a.len() <= 2 => {
                PromptPair::new(l.clean, l.corrupted, a[0].clone(), a.get(1).cloned())
            }
            (Some(a), _, None) if a.len() > 2 => {
                return Err(format!(
                    "{at}: \"answers\" has {} entries: without \"wrong_answers\" it is [correct, incorrect]; for token sets give \"answers\": [correct…] and \"wrong_answers\": [incorrect…]",
                    a.len()
                ))
            }
            (_, Some(a), _) => PromptPair::new(l.clean, l.corrupted, a, l.wrong_answer),
            _ => {
                return Err(format!(
                    "{at}: no answers (give \"answers\": [correct, incorrect], \"answer\", or \"answers\" with \"wrong_answers\")"
                ))
            }
        };
        p.source = Some(at);
        out.push(p);
    }
    if out.is_empty() {
        return Err(format!("{} holds no prompts", path.display()));
    }
    Ok(out)
}
