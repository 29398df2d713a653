//! The report page: a header with what the manifest knows, then one section per run with its
//! figures inline. Self-contained: inline CSS and SVG, no script, nothing fetched. Figures are
//! shown at their own size: the attention patterns' small multiples were once squeezed to
//! 420 px wide, which set their 11 px labels at about 6 px.
use crate::output::figure::{Figure, RunFigures};
use crate::report::svg;

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

const CSS: &str = "body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}\
h1{font-size:20px;margin:0 0 8px}h2{font-size:16px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}\
table.facts{border-collapse:collapse;font-size:12px;margin:8px 0 16px}table.facts td{padding:2px 10px 2px 0;vertical-align:top}\
table.facts td:first-child{color:#666;white-space:nowrap}\
figure.fig{display:inline-block;margin:8px 16px 16px 0;vertical-align:top}figcaption{font-size:11px;color:#555;max-width:760px}\
table.topk{border-collapse:collapse;font-size:11px}table.topk td,table.topk th{border:1px solid #ddd;padding:2px 6px;text-align:left}\
.ttl{font-size:13px;font-weight:600;margin:4px 0 6px}details{margin:8px 0}summary{cursor:pointer;font-size:13px;color:#333}code{font-size:11px}\
h3{font-size:13px;margin:16px 0 4px}.multiples figure.fig{margin:4px 8px 8px 0}p.note{font-size:12px;color:#8a4b00}";

/// One header line: (label, HTML value already escaped).
pub type Fact = (String, String);

/// The page, with the figures' SVG inline.
pub fn page(title: &str, facts: &[Fact], runs: &[RunFigures]) -> String {
    let mut s = format!("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{CSS}</style></head><body>\n", escape(title));
    s.push_str(&format!("<h1>{}</h1>\n<table class=\"facts\">", escape(title)));
    for (k, v) in facts {
        s.push_str(&format!("<tr><td>{}</td><td>{v}</td></tr>", escape(k)));
    }
    s.push_str("</table>\n<nav>");
    for r in runs {
        s.push_str(&format!("<a href=\"#run-{0}\">{0}</a> ", escape(&r.run)));
    }
    s.push_str("</nav>\n");
    for r in runs {
        s.push_str(&format!(
            "<section id=\"run-{}\"><h2>{} <small>({})</small></h2>\n",
            escape(&r.run),
            escape(&r.run),
            escape(&r.kind)
        ));
        if r.figures.is_empty() && r.per_prompt.is_empty() && r.patterns.is_empty() {
            s.push_str("<p>No rows to draw.</p>");
        }
        for f in &r.figures {
            s.push_str(&figure(f));
        }
        if !r.patterns.is_empty() {
            s.push_str(&format!("<h3>Attention patterns of the {} heads with the largest |value| (prompt 0, clean run)</h3>\n<div class=\"multiples\">", r.patterns.len()));
            for f in &r.patterns {
                s.push_str(&figure(f));
            }
            s.push_str("</div>\n");
        }
        if let Some(note) = &r.patterns_note {
            s.push_str(&format!(
                "<p class=\"note\">Attention patterns of the top heads are not shown: {}</p>\n",
                escape(note)
            ));
        }
        if !r.per_prompt.is_empty() {
            s.push_str(&format!("<details><summary>Per prompt ({} prompts)</summary>\n", r.per_prompt.len()));
            for (p, figs) in &r.per_prompt {
                s.push_str(&format!("<details><summary>Prompt {p}</summary>\n"));
                for f in figs {
                    s.push_str(&figure(f));
                }
                s.push_str("</details>\n");
            }
            s.push_str("</details>\n");
        }
        s.push_str("</section>\n");
    }
    s.push_str("</body></html>\n");
    s
}

fn figure(f: &Figure) -> String {
    let body = match f {
        Figure::Table(t) => format!("<div class=\"ttl\">{}</div>{}", escape(&t.title), svg::table_html(t)),
        other => svg::render(other).unwrap_or_default(),
    };
    format!("<figure class=\"fig\">{body}<figcaption>{}</figcaption></figure>\n", escape(&f.caption()))
}
