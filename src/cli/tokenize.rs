//! `tl-run tokenize`: how texts tokenize for a model, position by position, and how answers
//! tokenize, so a researcher can pick positions and single-token answers before writing a spec.
use anyhow::Result;
use tl_run::model::Described;
use tl_run::spec::prompts::PromptPair;

/// The first `first` prompts of a spec (generated from its templates, with their roles).
pub fn spec_prompts(path: &std::path::Path, first: usize) -> Result<Vec<PromptPair>> {
    let spec = tl_run::kinds::resolve_file(path)?;
    Ok(spec.prompts.into_iter().take(first).collect())
}

/// A token as text with its spaces and unusual characters visible: quoted, control characters
/// escaped, everything else (a leading space, a non-breaking space, non-Latin text) as it is.
fn shown(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Each text's tokens (BOS as the spec's default or `bos`), then each answer's.
pub fn print(
    model: &str,
    revision: Option<&str>,
    texts: &[String],
    from_spec: &[PromptPair],
    answers: &[String],
    bos: Option<bool>,
    json: bool,
) -> Result<()> {
    let described = Described::read(model, revision, true)?;
    let tok = described.tokenizer()?;
    let bos = bos.unwrap_or(described.cfg.default_prepend_bos);
    let tokens = |ids: &[i64]| -> Vec<serde_json::Value> {
        ids.iter()
            .enumerate()
            .map(|(pos, &id)| serde_json::json!({"pos": pos, "id": id, "token": tok.token_str(id)}))
            .collect()
    };
    let mut out_texts = Vec::new();
    for text in texts {
        out_texts
            .push(serde_json::json!({"text": text, "prepend_bos": bos, "tokens": tokens(&tok.encode(text, bos)?)}));
    }
    // A spec's prompts: each token with the role its filler gives it (as patching by role reads
    // it: the last token of the filler), and the prompt's answers.
    let mut spec_answers: Vec<String> = Vec::new();
    for p in from_spec {
        let (ids, offsets) = tok.encode_with_offsets(&p.clean, bos)?;
        let mut toks = tokens(&ids);
        for (name, span) in &p.roles {
            if let Some(at) = tl_run::kinds::shared::inputs::role_token(&offsets, span) {
                toks[at]["role"] = name.clone().into();
            }
        }
        if let (Some(last), false) = (toks.last_mut(), p.roles.is_empty()) {
            if last.get("role").is_none() {
                last["role"] = "END".into();
            }
        }
        out_texts.push(serde_json::json!({"text": p.clean, "prepend_bos": bos, "tokens": toks}));
        for a in p.correct_set().into_iter().chain(p.incorrect_set()) {
            if !spec_answers.iter().any(|s| s == a) && !answers.iter().any(|s| s == a) {
                spec_answers.push(a.to_string());
            }
        }
    }
    let mut out_answers = Vec::new();
    for answer in answers.iter().chain(&spec_answers) {
        let ids = tok.encode(answer, false)?;
        out_answers.push(serde_json::json!({"answer": answer, "single_token": ids.len() == 1, "tokens": tokens(&ids)}));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"texts": out_texts, "answers": out_answers}))?);
        return Ok(());
    }
    print_table(&out_texts, &out_answers);
    Ok(())
}

/// The texts' tokens as a table, then one line per answer.
fn print_table(texts: &[serde_json::Value], answers: &[serde_json::Value]) {
    for t in texts {
        let toks = t["tokens"].as_array().map_or(&[][..], Vec::as_slice);
        println!(
            "{}: {} tokens{}",
            shown(t["text"].as_str().unwrap_or("")),
            toks.len(),
            if t["prepend_bos"].as_bool() == Some(true) { " (BOS prepended)" } else { "" }
        );
        let roles = toks.iter().any(|k| k.get("role").is_some());
        println!("  {:>4}  {:>7}  {}token", "pos", "id", if roles { "role    " } else { "" });
        for k in toks {
            let (pos, id) = (k["pos"].as_u64().unwrap_or(0), k["id"].as_i64().unwrap_or(0));
            let role = if roles { format!("{:<8}", k["role"].as_str().unwrap_or("")) } else { String::new() };
            println!("  {pos:>4}  {id:>7}  {role}{}", shown(k["token"].as_str().unwrap_or("")));
        }
    }
    for a in answers {
        let toks = a["tokens"].as_array().map_or(&[][..], Vec::as_slice);
        let list: Vec<String> =
            toks.iter().map(|k| format!("{} {}", k["id"], shown(k["token"].as_str().unwrap_or("")))).collect();
        let verdict = if a["single_token"].as_bool() == Some(true) {
            "one token: usable as an answer".to_string()
        } else {
            format!(
                "{} tokens: not usable as a single-token answer (logit_diff, prob_diff, token sets); metric logprob or prob reads it teacher-forced",
                toks.len()
            )
        };
        println!("answer {}: {verdict} [{}]", shown(a["answer"].as_str().unwrap_or("")), list.join(", "));
    }
}
