//! Figures as standalone SVG documents (built with the `svg` crate, which escapes text). Every
//! cell, bar and point carries a <title>, which browsers show as hover text; no script.
use svg::node::element::{Group, Line, Rectangle, Text, Title};
use svg::Document;

use crate::output::figure::{Bars, CircuitGraph, Figure, Heatmap, Lines, Scale, Scatter, Table, CORRUPTED_NOTE};
use crate::report::ticks::{nice_ticks, tick_label};

const FONT: &str = "font-family:system-ui,sans-serif;font-size:11px";
const TITLE_H: f64 = 28.0;
/// Position ticks the corruption changes: set apart by colour as well as by their `*`.
const MARKED_STYLE: &str = "font-family:system-ui,sans-serif;font-size:11px;font-weight:600";
const MARKED_FILL: &str = "#c0560b";
/// About how many ticks a value axis gets.
const VALUE_TICKS: usize = 5;

/// The SVG of a figure; None for tables, which the page shows as HTML.
pub fn render(f: &Figure) -> Option<String> {
    match f {
        Figure::Heatmap(h) => Some(heatmap(h).to_string()),
        Figure::Bars(b) => Some(bars(b).to_string()),
        Figure::Lines(l) => Some(lines(l).to_string()),
        Figure::Scatter(s) => Some(scatter(s).to_string()),
        Figure::Table(_) => None,
        Figure::Circuit(c) => Some(circuit(c).to_string()),
    }
}

/// A layered circuit: one column per layer (the input first, the logits last), a node's row
/// within its column, cubic edges from the sender's right to the receiver's left.
fn circuit(c: &CircuitGraph) -> Document {
    let (col_w, row_h, node_w, node_h, top, left) = (110.0, 24.0, 64.0, 16.0, TITLE_H + 24.0, 20.0);
    let rows = c.nodes.iter().map(|n| n.2 + 1).max().unwrap_or(1) as f64;
    let width = (left * 2.0 + col_w * c.columns.len() as f64).max(title_width(&c.title));
    let height = top + rows * row_h + 20.0;
    let at = |i: usize| {
        let (_, col, row) = &c.nodes[i];
        (left + *col as f64 * col_w, top + *row as f64 * row_h)
    };
    let mut d = doc(width, height).add(title_text(&c.title));
    for (i, label) in c.columns.iter().enumerate() {
        d = d.add(text(left + i as f64 * col_w, top - 8.0, label));
    }
    let biggest = c.edges.iter().map(|e| e.2.abs()).fold(0.0, f64::max).max(1e-12);
    for (from, to, score, input) in &c.edges {
        let ((x1, y1), (x2, y2)) = (at(*from), at(*to));
        let (sx, sy, ex, ey) = (x1 + node_w, y1 + node_h / 2.0, x2, y2 + node_h / 2.0);
        let bend = ((ex - sx) / 2.0).max(20.0);
        let dash = match input.as_str() {
            "k" => "5 3",
            "v" => "1.5 2.5",
            _ => "none",
        };
        let name = format!(
            "{}->{}{}",
            c.nodes[*from].0,
            c.nodes[*to].0,
            if input.is_empty() { String::new() } else { format!("<{input}>") }
        );
        d = d.add(
            svg::node::element::Path::new()
                .set(
                    "d",
                    format!("M{sx:.1},{sy:.1} C{:.1},{sy:.1} {:.1},{ey:.1} {ex:.1},{ey:.1}", sx + bend, ex - bend),
                )
                .set("fill", "none")
                .set("stroke", if *score >= 0.0 { "#2166ac" } else { "#b2182b" })
                .set("stroke-opacity", 0.75)
                .set("stroke-dasharray", dash)
                .set("stroke-width", 0.6 + 4.0 * score.abs() / biggest)
                .set("data-value", format!("{score:e}"))
                .add(Title::new(format!("{name}: {score:.4}"))),
        );
    }
    for (i, (name, _, _)) in c.nodes.iter().enumerate() {
        let (x, y) = at(i);
        d = d
            .add(
                Rectangle::new()
                    .set("x", x)
                    .set("y", y)
                    .set("width", node_w)
                    .set("height", node_h)
                    .set("rx", 3)
                    .set("fill", "#f4f4f4")
                    .set("stroke", "#555")
                    .add(Title::new(name.clone())),
            )
            .add(text(x + 4.0, y + 12.0, name));
    }
    d
}

/// CSS colour of `v` on `scale`: ColorBrewer RdBu (below the centre red, above it blue, white at
/// it, as TransformerLens's demos draw with plotly's RdBu around 0) or viridis; grey where there
/// is no value.
pub fn colour(scale: &Scale, v: Option<f64>) -> String {
    let Some(v) = v.filter(|v| v.is_finite()) else { return "#d9d9d9".into() };
    let c = match *scale {
        Scale::Diverging { centre, limit } => {
            colorous::RED_BLUE.eval_continuous((((v - centre) / limit).clamp(-1.0, 1.0) + 1.0) / 2.0)
        }
        Scale::Sequential { min, max } => colorous::VIRIDIS.eval_continuous(((v - min) / (max - min)).clamp(0.0, 1.0)),
    };
    format!("#{:x}", c)
}

pub use crate::output::figure::num;

/// Room for a title of `s` in the figure's width.
fn title_width(s: &str) -> f64 {
    20.0 + 8.0 * s.chars().count() as f64
}

fn text(x: f64, y: f64, s: &str) -> Text {
    Text::new(s).set("x", x).set("y", y).set("style", FONT)
}

fn title_text(s: &str) -> Text {
    text(8.0, 18.0, s).set("style", "font-family:system-ui,sans-serif;font-size:13px;font-weight:600")
}

/// Shows at most ~`max` tick labels: every k-th.
fn tick_step(n: usize, max: usize) -> usize {
    n.div_ceil(max).max(1)
}

fn doc(width: f64, height: f64) -> Document {
    Document::new().set("viewBox", (0, 0, width, height)).set("width", width).set("height", height).set("role", "img")
}

fn heatmap(h: &Heatmap) -> Document {
    let ny = h.cells.len().max(1);
    let nx = h.cells.first().map_or(1, |r| r.len()).max(1);
    let cw = (720.0 / nx as f64).clamp(5.0, 34.0);
    let ch = (420.0 / ny as f64).clamp(4.0, 24.0);
    let longest_x = h.x_ticks.iter().map(|t| t.chars().count()).max().unwrap_or(1) as f64;
    let longest_y = h.y_ticks.iter().map(|t| t.chars().count()).max().unwrap_or(1) as f64;
    let (left, top) = (28.0 + 7.0 * longest_y, TITLE_H + 8.0);
    let bottom = 30.0 + 6.0 * longest_x.min(24.0);
    let (pw, ph) = (cw * nx as f64, ch * ny as f64);
    let marked = !h.x_marked.is_empty() || !h.y_marked.is_empty();
    // Without the page's caption, the last line also says what the marked ticks are.
    let bottom_line = if marked {
        format!("colour: {}; {CORRUPTED_NOTE}", h.value_label)
    } else {
        format!("colour: {}", h.value_label)
    };
    let width =
        (left + pw + 100.0).max(420.0).max(title_width(&h.title)).max(16.0 + 6.5 * bottom_line.chars().count() as f64);
    // The last line names what the colours measure, so an SVG taken out of the page keeps it.
    let height = top + ph + bottom + 16.0;
    let mut cells = Group::new().set("class", "cells");
    for (y, row) in h.cells.iter().enumerate() {
        for (x, v) in row.iter().enumerate() {
            let hover = h.hover.get(y).and_then(|r| r.get(x)).cloned().unwrap_or_default();
            let hover = if hover.is_empty() {
                format!("{} {}, {} {}: no value", h.y_title, h.y_ticks[y], h.x_title, h.x_ticks[x])
            } else {
                hover
            };
            cells = cells.add(
                Rectangle::new()
                    .set("x", left + x as f64 * cw)
                    .set("y", top + y as f64 * ch)
                    .set("width", cw)
                    .set("height", ch)
                    .set("fill", colour(&h.scale, *v))
                    .set("data-y", y)
                    .set("data-x", x)
                    .set("data-value", v.map(|v| format!("{v:e}")).unwrap_or_default())
                    .add(Title::new(hover)),
            );
        }
    }
    let mut axes = Group::new();
    let ys = tick_step(ny, (ph / 11.0) as usize);
    for (y, t) in h.y_ticks.iter().enumerate().step_by(ys) {
        let tick = axis_tick(left - 4.0, top + (y as f64 + 0.5) * ch + 4.0, t, "ytick", h.y_marked.contains(&y));
        axes = axes.add(tick.set("text-anchor", "end"));
    }
    let xs = tick_step(nx, (pw / 11.0) as usize);
    for (x, t) in h.x_ticks.iter().enumerate().step_by(xs) {
        let (tx, ty) = (left + (x as f64 + 0.5) * cw + 3.0, top + ph + 6.0);
        axes = axes.add(
            axis_tick(tx, ty, t, "xtick", h.x_marked.contains(&x))
                .set("text-anchor", "end")
                .set("transform", format!("rotate(-60 {tx} {ty})")),
        );
    }
    axes = axes
        .add(text(left + pw / 2.0, height - 22.0, &h.x_title).set("text-anchor", "middle"))
        .add(text(8.0, height - 5.0, &bottom_line).set("class", "scale-label").set("fill", "#555"))
        .add(
            text(12.0, top + ph / 2.0, &h.y_title)
                .set("text-anchor", "middle")
                .set("transform", format!("rotate(-90 12 {})", top + ph / 2.0)),
        );
    doc(width, height).add(title_text(&h.title)).add(cells).add(axes).add(colour_bar(
        &h.scale,
        &h.value_label,
        left + pw + 24.0,
        top,
        ph.max(80.0),
    ))
}

/// A heatmap's tick label of class `class`; a marked one (a position the corruption changes)
/// ends in `*` and is drawn bold in another colour.
fn axis_tick(x: f64, y: f64, label: &str, class: &str, marked: bool) -> Text {
    if marked {
        text(x, y, &format!("{label}*"))
            .set("class", format!("{class} corrupted"))
            .set("style", MARKED_STYLE)
            .set("fill", MARKED_FILL)
    } else {
        text(x, y, label).set("class", class)
    }
}

/// A vertical colour bar with its ends, its centre (diverging) and the measured quantity.
fn colour_bar(scale: &Scale, label: &str, x: f64, y: f64, h: f64) -> Group {
    let (lo, hi) = scale.range();
    let steps = 40;
    let mut g = Group::new().set("class", "colourbar");
    for i in 0..steps {
        let v = hi - (hi - lo) * (i as f64 + 0.5) / steps as f64;
        g = g.add(
            Rectangle::new()
                .set("x", x)
                .set("y", y + h * i as f64 / steps as f64)
                .set("width", 12)
                .set("height", h / steps as f64 + 0.5)
                .set("fill", colour(scale, Some(v))),
        );
    }
    g = g.add(text(x + 16.0, y + 8.0, &num(hi))).add(text(x + 16.0, y + h, &num(lo)));
    if let Scale::Diverging { centre, .. } = *scale {
        let mid = if centre == 0.0 { "0".to_string() } else { num(centre) };
        g = g.add(text(x + 16.0, y + h / 2.0 + 4.0, &mid).set("class", "scale-centre"));
    }
    // The full name of the measure is in the caption; the bar's <title> carries it on hover.
    g.add(Title::new(label.to_string()))
}

/// y axis for values in [lo, hi] drawn over [top, top + h]: the pixel of a value.
fn y_of(lo: f64, hi: f64, top: f64, h: f64) -> impl Fn(f64) -> f64 {
    let span = if hi > lo { hi - lo } else { 1.0 };
    move |v: f64| top + h * (hi - v) / span
}

/// A value axis: round ticks (ticks.rs) covering the values and 0, and the range it draws,
/// from the first tick to the last.
struct ValueAxis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl ValueAxis {
    fn of(values: impl Iterator<Item = f64>) -> ValueAxis {
        let (lo, hi) = values.filter(|v| v.is_finite()).fold((0.0f64, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
        let ticks = nice_ticks(lo, hi, VALUE_TICKS);
        match (ticks.first(), ticks.last()) {
            (Some(&first), Some(&last)) if last > first => ValueAxis { lo: first, hi: last, ticks },
            _ => ValueAxis { lo, hi, ticks },
        }
    }
}

fn y_axis(axis: &ValueAxis, left: f64, top: f64, h: f64, w: f64, label: &str) -> Group {
    let (lo, hi) = (axis.lo, axis.hi);
    let y = y_of(lo, hi, top, h);
    let mut g = Group::new().set("class", "axis");
    for &v in &axis.ticks {
        g = g.add(
            Line::new().set("x1", left).set("x2", left + w).set("y1", y(v)).set("y2", y(v)).set("stroke", "#e5e5e5"),
        );
        g = g.add(text(left - 4.0, y(v) + 4.0, &tick_label(v)).set("text-anchor", "end"));
    }
    g.add(Line::new().set("x1", left).set("x2", left + w).set("y1", y(0.0)).set("y2", y(0.0)).set("stroke", "#777"))
        .add(
            text(12.0, top + h / 2.0, label)
                .set("text-anchor", "middle")
                .set("transform", format!("rotate(-90 12 {})", top + h / 2.0)),
        )
}

fn bars(b: &Bars) -> Document {
    let n = b.values.len().max(1);
    let bw = (640.0 / n as f64).clamp(4.0, 36.0);
    let longest = b.labels.iter().map(|t| t.chars().count()).max().unwrap_or(1) as f64;
    let (left, top, h) = (70.0, TITLE_H + 10.0, 260.0);
    let pw = bw * n as f64;
    let width = (left + pw + 30.0).max(420.0).max(title_width(&b.title));
    let height = top + h + 24.0 + 6.0 * longest.min(28.0);
    let axis = ValueAxis::of(b.values.iter().copied().chain(b.baseline));
    let y = y_of(axis.lo, axis.hi, top, h);
    let scale = Scale::symmetric(b.values.iter());
    let mut g = Group::new().set("class", "bars");
    for (i, (label, v)) in b.labels.iter().zip(&b.values).enumerate() {
        let (y0, y1) = (y(0.0), y(*v));
        g = g.add(
            Rectangle::new()
                .set("x", left + i as f64 * bw + bw * 0.1)
                .set("y", y0.min(y1))
                .set("width", bw * 0.8)
                .set("height", (y1 - y0).abs().max(0.5))
                .set("fill", colour(&scale, Some(*v)))
                .set("stroke", "#555")
                .set("stroke-width", 0.3)
                .set("data-value", format!("{v:e}"))
                .add(Title::new(format!("{label}: {}", num(*v)))),
        );
    }
    let step = tick_step(n, (pw / 11.0) as usize);
    let mut ticks = Group::new();
    for (i, label) in b.labels.iter().enumerate().step_by(step) {
        let (tx, ty) = (left + (i as f64 + 0.5) * bw + 3.0, top + h + 8.0);
        ticks =
            ticks.add(text(tx, ty, label).set("text-anchor", "end").set("transform", format!("rotate(-60 {tx} {ty})")));
    }
    let mut d = doc(width, height)
        .add(title_text(&b.title))
        .add(y_axis(&axis, left, top, h, pw, &b.value_label))
        .add(g)
        .add(ticks);
    if let Some(base) = b.baseline {
        d = d.add(
            Line::new()
                .set("x1", left)
                .set("x2", left + pw)
                .set("y1", y(base))
                .set("y2", y(base))
                .set("stroke", "#000")
                .set("stroke-dasharray", "5 3")
                .add(Title::new(format!("baseline (nothing ablated): {base:.4}"))),
        );
        d = d.add(text(left + pw + 2.0, y(base) - 3.0, "baseline"));
    }
    d
}

fn lines(l: &Lines) -> Document {
    let n = l.x_ticks.len().max(2);
    let step_w = (640.0 / (n - 1) as f64).clamp(8.0, 48.0);
    let longest = l.x_ticks.iter().map(|t| t.chars().count()).max().unwrap_or(1) as f64;
    let (left, top, h) = (70.0, TITLE_H + 10.0, 240.0);
    let pw = step_w * (n - 1) as f64;
    let width = (left + pw + 40.0).max(420.0).max(title_width(&l.title));
    let height = top + h + 24.0 + 6.0 * longest.min(24.0);
    let axis = ValueAxis::of(l.series.iter().flat_map(|(_, v)| v.iter().copied()));
    let y = y_of(axis.lo, axis.hi, top, h);
    let mut d = doc(width, height).add(title_text(&l.title)).add(y_axis(&axis, left, top, h, pw, &l.value_label));
    let palette = ["#1f4e99", "#b2182b", "#4d9221", "#762a83"];
    for (si, (name, values)) in l.series.iter().enumerate() {
        let pts: Vec<String> = values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, v)| format!("{:.2},{:.2}", left + i as f64 * step_w, y(*v)))
            .collect();
        let c = palette[si % palette.len()];
        d = d.add(
            svg::node::element::Polyline::new()
                .set("points", pts.join(" "))
                .set("fill", "none")
                .set("stroke", c)
                .set("stroke-width", 1.8)
                .add(Title::new(name.clone())),
        );
        for (i, v) in values.iter().enumerate().filter(|(_, v)| v.is_finite()) {
            d = d.add(
                svg::node::element::Circle::new()
                    .set("cx", left + i as f64 * step_w)
                    .set("cy", y(*v))
                    .set("r", 3)
                    .set("fill", c)
                    .set("data-value", format!("{v:e}"))
                    .add(Title::new(format!("{}: {v:.4}", l.x_ticks[i]))),
            );
        }
    }
    let step = tick_step(n, (pw / 11.0).max(1.0) as usize);
    for (i, t) in l.x_ticks.iter().enumerate().step_by(step) {
        let (tx, ty) = (left + i as f64 * step_w + 3.0, top + h + 8.0);
        d = d.add(text(tx, ty, t).set("text-anchor", "end").set("transform", format!("rotate(-60 {tx} {ty})")));
    }
    d
}

fn scatter(s: &Scatter) -> Document {
    let (left, top, side): (f64, f64, f64) = (70.0, TITLE_H + 10.0, 300.0);
    let width = (left + side + 40.0).max(title_width(&s.title));
    let height = top + side + 50.0;
    // One axis for x and y, so that the y = x line is the diagonal.
    let axis = ValueAxis::of(s.points.iter().flat_map(|(x, y, _)| [*x, *y]));
    let (lo, hi) = (axis.lo, axis.hi);
    let px = |v: f64| left + side * (v - lo) / (hi - lo).max(1e-12);
    let py = y_of(lo, hi, top, side);
    let mut d = doc(width, height).add(title_text(&s.title)).add(y_axis(&axis, left, top, side, side, &s.y_title));
    d = d.add(
        Line::new()
            .set("x1", px(lo))
            .set("y1", py(lo))
            .set("x2", px(hi))
            .set("y2", py(hi))
            .set("stroke", "#999")
            .set("stroke-dasharray", "4 3")
            .add(Title::new("y = x")),
    );
    for (x, y, label) in &s.points {
        if x.is_finite() && y.is_finite() {
            d = d.add(
                svg::node::element::Circle::new()
                    .set("cx", px(*x))
                    .set("cy", py(*y))
                    .set("r", 3.2)
                    .set("fill", "#2166ac")
                    .set("fill-opacity", 0.8)
                    .add(Title::new(format!("{label}: estimate {x:.4}, patched {y:.4}"))),
            );
        }
    }
    for &v in &axis.ticks {
        d = d.add(text(px(v), top + side + 14.0, &tick_label(v)).set("text-anchor", "middle"));
    }
    d = d.add(text(left + side / 2.0, top + side + 32.0, &s.x_title).set("text-anchor", "middle"));
    if let Some(r) = s.pearson {
        d = d.add(text(left + 8.0, top + 14.0, &format!("Pearson r = {r:.3}")).set("class", "pearson"));
    }
    d
}

/// A table figure as an HTML <table> (escaped).
pub fn table_html(t: &Table) -> String {
    let esc = crate::report::html::escape;
    let mut s = String::from("<table class=\"topk\"><thead><tr>");
    for h in &t.header {
        s.push_str(&format!("<th>{}</th>", esc(h)));
    }
    s.push_str("</tr></thead><tbody>");
    for r in &t.rows {
        s.push_str("<tr>");
        for c in r {
            s.push_str(&format!("<td>{}</td>", esc(c)));
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table>");
    s
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn value_axes_span_round_ticks_over_the_values_and_zero() {
        let a = ValueAxis::of([-1.919, 6.342].into_iter());
        assert_eq!(a.ticks, vec![-2.0, 0.0, 2.0, 4.0, 6.0, 8.0]);
        assert_eq!((a.lo, a.hi), (-2.0, 8.0), "drawn from the first tick to the last");
        let a = ValueAxis::of([0.3, 0.7].into_iter());
        assert_eq!(a.ticks.first(), Some(&0.0), "0 is on every value axis");
    }

    #[test]
    fn marked_ticks_end_in_a_star_and_have_their_class() {
        let mut f = Figure::Heatmap(Heatmap {
            title: "t".into(),
            x_title: "position".into(),
            y_title: "layer".into(),
            x_ticks: vec!["0 <s>".into(), "1 ␣Tim".into()],
            y_ticks: vec!["0".into()],
            cells: vec![vec![Some(0.1), Some(0.2)]],
            hover: vec![vec![String::new(), String::new()]],
            scale: Scale::diverging_around(0.1, [0.1, 0.2].iter()),
            value_label: "probability of the answer".into(),
            x_marked: BTreeSet::new(),
            y_marked: BTreeSet::new(),
        });
        crate::output::figure::mark_positions(&mut f, &BTreeSet::from([1, 5]));
        let Figure::Heatmap(h) = &f else { unreachable!() };
        assert_eq!(h.x_marked, BTreeSet::from([1]), "only positions on the axis");
        assert!(h.y_marked.is_empty(), "the layer axis counts no positions");
        let svg = render(&f).unwrap();
        assert!(svg.contains("class=\"xtick corrupted\""), "{svg}");
        assert!(svg.contains("1 ␣Tim*"), "{svg}");
        assert!(!svg.contains("0 &lt;s&gt;*") && !svg.contains("0 <s>*"), "{svg}");
        assert!(svg.contains(CORRUPTED_NOTE), "an SVG out of the page says what * means");
        assert!(f.caption().contains(CORRUPTED_NOTE));
        // The colour bar's middle is the centre the scale diverges around.
        assert!(svg.contains("class=\"scale-centre\""), "{svg}");
        assert!(svg.contains("0.100"), "{svg}");
    }
}
