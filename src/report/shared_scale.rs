//! One colour scale for every heatmap of a run (`[output] shared_scale = true`, `tl-run report
//! --shared-scale`): by default each panel spans its own values, so the same colour means
//! different values in the resid_pre and mlp_out panels of one run, or in two prompts' panels.
//! The attention patterns keep their fixed 0 to 1 scale.
use crate::output::figure::{Figure, Heatmap, RunFigures, Scale};

/// Puts every heatmap of `run` (the mean rows' and each prompt's) on one scale: sequential ones
/// on the union of their ranges; diverging ones on the largest distance any value has from its
/// panel's centre, each panel keeping its centre (a prompt's own corrupted baseline), so that a
/// colour is the same change from the centre in every panel. Should any panel diverge, all do
/// (sequential panels around 0), since one scale cannot be both.
pub fn share(run: &mut RunFigures) {
    let mut maps: Vec<&mut Heatmap> = run
        .figures
        .iter_mut()
        .chain(run.per_prompt.iter_mut().flat_map(|(_, figs)| figs.iter_mut()))
        .filter_map(|f| match f {
            Figure::Heatmap(h) => Some(h),
            _ => None,
        })
        .collect();
    if maps.len() < 2 {
        return;
    }
    if maps.iter().any(|h| matches!(h.scale, Scale::Diverging { .. })) {
        let limit = maps.iter().map(|h| distance_from_centre(h)).fold(0.0f64, f64::max);
        let limit = if limit > 0.0 { limit } else { 1.0 };
        for h in maps.iter_mut() {
            h.scale = Scale::Diverging { centre: centre(h), limit };
        }
    } else {
        let (min, max) = maps
            .iter()
            .map(|h| h.scale.range())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (a, b)| (lo.min(a), hi.max(b)));
        for h in maps.iter_mut() {
            h.scale = Scale::Sequential { min, max };
        }
    }
}

/// The value a panel's colours diverge around (0 for a sequential one).
fn centre(h: &Heatmap) -> f64 {
    match h.scale {
        Scale::Diverging { centre, .. } => centre,
        Scale::Sequential { .. } => 0.0,
    }
}

/// The largest |value − centre| of a panel's cells.
fn distance_from_centre(h: &Heatmap) -> f64 {
    let c = centre(h);
    h.cells.iter().flatten().flatten().filter(|v| v.is_finite()).fold(0.0f64, |m, v| m.max((v - c).abs()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn heatmap(values: &[f64], scale: Scale) -> Figure {
        Figure::Heatmap(Heatmap {
            title: "t".into(),
            x_title: "position".into(),
            y_title: "layer".into(),
            x_ticks: (0..values.len()).map(|i| i.to_string()).collect(),
            y_ticks: vec!["0".into()],
            cells: vec![values.iter().map(|v| Some(*v)).collect()],
            hover: vec![vec![String::new(); values.len()]],
            scale,
            value_label: "v".into(),
            x_marked: BTreeSet::new(),
            y_marked: BTreeSet::new(),
        })
    }

    fn run(figures: Vec<Figure>, per_prompt: Vec<(i32, Vec<Figure>)>) -> RunFigures {
        RunFigures {
            run: "r".into(),
            kind: "activation_patching".into(),
            figures,
            per_prompt,
            patterns: vec![heatmap(&[0.5], Scale::Sequential { min: 0.0, max: 1.0 })],
            patterns_note: None,
        }
    }

    fn scales(r: &RunFigures) -> Vec<Scale> {
        r.figures
            .iter()
            .chain(r.per_prompt.iter().flat_map(|(_, f)| f))
            .filter_map(|f| match f {
                Figure::Heatmap(h) => Some(h.scale.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn diverging_panels_share_the_largest_distance_and_keep_their_centres() {
        let mut r = run(
            vec![
                heatmap(&[-1.0, 2.0], Scale::Diverging { centre: 0.0, limit: 2.0 }),
                heatmap(&[0.5], Scale::Diverging { centre: 0.0, limit: 0.5 }),
            ],
            vec![(0, vec![heatmap(&[0.2, -3.8], Scale::Diverging { centre: 0.2, limit: 4.0 })])],
        );
        share(&mut r);
        assert_eq!(
            scales(&r),
            vec![
                Scale::Diverging { centre: 0.0, limit: 4.0 },
                Scale::Diverging { centre: 0.0, limit: 4.0 },
                Scale::Diverging { centre: 0.2, limit: 4.0 },
            ]
        );
        assert_eq!(
            match &r.patterns[0] {
                Figure::Heatmap(h) => h.scale.clone(),
                _ => unreachable!(),
            },
            Scale::Sequential { min: 0.0, max: 1.0 },
            "attention patterns keep their own scale"
        );
    }

    #[test]
    fn sequential_panels_share_the_union_of_their_ranges() {
        let mut r = run(
            vec![
                heatmap(&[0.0, 0.4], Scale::Sequential { min: 0.0, max: 0.4 }),
                heatmap(&[0.0, 3.0], Scale::Sequential { min: 0.0, max: 3.0 }),
            ],
            Vec::new(),
        );
        share(&mut r);
        assert_eq!(scales(&r), vec![Scale::Sequential { min: 0.0, max: 3.0 }; 2]);
    }

    #[test]
    fn one_diverging_panel_makes_them_all_diverge() {
        let mut r = run(
            vec![
                heatmap(&[0.0, 0.4], Scale::Sequential { min: 0.0, max: 0.4 }),
                heatmap(&[-0.5, 0.1], Scale::Diverging { centre: 0.0, limit: 0.5 }),
            ],
            Vec::new(),
        );
        share(&mut r);
        assert_eq!(scales(&r), vec![Scale::Diverging { centre: 0.0, limit: 0.5 }; 2]);
    }

    #[test]
    fn a_lone_panel_is_left_as_it_is() {
        let mut r = run(vec![heatmap(&[0.0, 0.4], Scale::Sequential { min: 0.0, max: 0.4 })], Vec::new());
        share(&mut r);
        assert_eq!(scales(&r), vec![Scale::Sequential { min: 0.0, max: 0.4 }]);
    }
}
