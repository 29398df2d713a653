//! `tl-run tokenize`: how texts tokenize for a model, position by position, and how answers
//! tokenize, so a researcher can pick positions and single-token answers before writing a spec.
use anyhow::Result;
use tl_run::model::Described;

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
    let mut out_answers = Vec::new();
    for answer in answers {
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
        println!("  {:>4}  {:>7}  token", "pos", "id");
        for k in toks {
            let (pos, id) = (k["pos"].as_u64().unwrap_or(0), k["id"].as_i64().unwrap_or(0));
            println!("  {pos:>4}  {id:>7}  {}", shown(k["token"].as_str().unwrap_or("")));
        }
    }
    for a in answers {
        let toks = a["tokens"].as_array().map_or(&[][..], Vec::as_slice);
        let list: Vec<String> =
            toks.iter().map(|k| format!("{} {}", k["id"], shown(k["token"].as_str().unwrap_or("")))).collect();
        let verdict = if a["single_token"].as_bool() == Some(true) {
            "one token: usable as an answer".to_string()
        } else {
            format!("{} tokens: not usable as a single-token answer", toks.len())
        };
        println!("answer {}: {verdict} [{}]", shown(a["answer"].as_str().unwrap_or("")), list.join(", "));
    }
}
