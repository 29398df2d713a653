//! Prompt sets from files: JSONL (one {"clean", "answers": [correct, incorrect]} or
//! {"prompt", "answer", "wrong_answer"} per line) and AutoCircuit-style prompt-pair JSON
//! ({"prompts": [{"clean", "corrupt", "answers", "wrong_answers"}]}).
use serde::Deserialize;

/// One prompt with its answers and, when the source gives it, its corrupted twin.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PromptPair {
    pub clean: String,
    pub corrupted: Option<String>,
    pub correct: String,
    pub incorrect: Option<String>,
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
                let correct = e.answers.first().cloned().ok_or_else(|| format!("prompts[{i}] has no answers"))?;
                Ok(PromptPair {
                    clean: e.clean,
                    corrupted: Some(e.corrupt),
                    correct,
                    incorrect: e.wrong_answers.first().cloned(),
                })
            })
            .collect();
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let l: JsonlLine = serde_json::from_str(line).map_err(|e| format!("{} line {}: {e}", path.display(), i + 1))?;
        let (correct, incorrect) = match (l.answers, l.answer) {
            (Some(a), _) if !a.is_empty() => (a[0].clone(), a.get(1).cloned()),
            (_, Some(a)) => (a, l.wrong_answer),
            _ => {
                return Err(format!(
                    "{} line {}: no answers (give \"answers\": [correct, incorrect] or \"answer\")",
                    path.display(),
                    i + 1
                ))
            }
        };
        out.push(PromptPair { clean: l.clean, corrupted: l.corrupted, correct, incorrect });
    }
    if out.is_empty() {
        return Err(format!("{} holds no prompts", path.display()));
    }
    Ok(out)
}
