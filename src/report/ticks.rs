//! Round value-axis ticks ("nice" numbers: steps of 1, 2 or 5 × 10^k) and their labels, so that
//! an axis reads −2, 0, 2, 4 rather than the quarters of the data's range (−1.919, 0.146, …).

/// Ticks at a round step, about `target_count` of them, from the last multiple of the step at or
/// below `min` to the first at or above `max`: they cover the range, so an axis drawn from the
/// first tick to the last holds every value. Each tick is the double nearest its decimal value
/// (0.3, not 0.30000000000000004). Empty when a bound is not finite.
pub fn nice_ticks(min: f64, max: f64, target_count: usize) -> Vec<f64> {
    if !min.is_finite() || !max.is_finite() {
        return Vec::new();
    }
    let (mut lo, mut hi) = if min <= max { (min, max) } else { (max, min) };
    if hi - lo <= f64::EPSILON * lo.abs().max(hi.abs()) {
        // One value: a range around it, so that it gets ticks on both sides.
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        (lo, hi) = (lo - pad, hi + pad);
    }
    let (mantissa, exponent) = nice_step((hi - lo) / target_count.max(1) as f64);
    let step = at(1, mantissa, exponent);
    if !step.is_finite() || step <= 0.0 {
        // A span beyond f64 (−1e308 to 1e308): no round step, the bounds themselves.
        return vec![lo, hi];
    }
    // The tolerance keeps a bound that is itself a tick (0.3 / 0.1 = 2.9999999999999996) from
    // adding a tick beyond it.
    let first = (lo / step + 1e-9).floor() as i64;
    let last = (hi / step - 1e-9).ceil() as i64;
    (first..=last).map(|k| at(k, mantissa, exponent)).collect()
}

/// The round step nearest `raw` on a log scale, as (mantissa 1, 2 or 5; power of ten), the way
/// d3's ticks choose theirs.
fn nice_step(raw: f64) -> (i64, i32) {
    let exponent = raw.log10().floor() as i32;
    let fraction = raw / 10f64.powi(exponent);
    let mantissa = if fraction >= 50f64.sqrt() {
        10
    } else if fraction >= 10f64.sqrt() {
        5
    } else if fraction >= 2f64.sqrt() {
        2
    } else {
        1
    };
    if mantissa == 10 {
        (1, exponent + 1)
    } else {
        (mantissa, exponent)
    }
}

/// k × mantissa × 10^exponent. Dividing by an exact power of ten for negative exponents rounds
/// once, to the double nearest the decimal (multiplying by 0.1 would round twice).
fn at(k: i64, mantissa: i64, exponent: i32) -> f64 {
    let n = (k * mantissa) as f64;
    if exponent >= 0 {
        n * 10f64.powi(exponent)
    } else {
        n / 10f64.powi(-exponent)
    }
}

/// A tick's label: its shortest decimal, without float noise ("0.3", "-2", "1500", "0.0005"),
/// in scientific notation outside [1e-4, 1e6) ("2e-6"). Rounds to 12 significant digits first,
/// so a value computed with rounding error prints as the round number it stands for.
pub fn tick_label(v: f64) -> String {
    if v == 0.0 {
        // -0 too, which would print as "-0".
        return "0".into();
    }
    if !v.is_finite() {
        return v.to_string();
    }
    let rounded: f64 = format!("{v:.11e}").parse().unwrap_or(v);
    if (1e-4..1e6).contains(&rounded.abs()) {
        format!("{rounded}")
    } else {
        format!("{rounded:e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_logit_lens_range_gets_round_ticks_covering_it() {
        // The range behind issue #32's −1.919 … 6.342 ticks.
        let t = nice_ticks(-1.919, 6.342, 5);
        assert_eq!(t, vec![-2.0, 0.0, 2.0, 4.0, 6.0, 8.0]);
        assert!(t[0] <= -1.919 && *t.last().unwrap() >= 6.342, "covers the range");
    }

    #[test]
    fn steps_are_one_two_or_five_times_a_power_of_ten() {
        assert_eq!(nice_ticks(0.0, 1.0, 5), vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        assert_eq!(nice_ticks(0.0, 1.0, 2), vec![0.0, 0.5, 1.0]);
        assert_eq!(nice_ticks(0.0, 100.0, 10), (0..=10).map(|k| k as f64 * 10.0).collect::<Vec<_>>());
        assert_eq!(nice_ticks(-0.03, 0.012, 4), vec![-0.03, -0.02, -0.01, 0.0, 0.01, 0.02]);
        assert_eq!(nice_ticks(1200.0, 4800.0, 3), vec![1000.0, 2000.0, 3000.0, 4000.0, 5000.0]);
        for (lo, hi) in [(-1.919, 6.342), (0.0013, 0.0871), (-750.0, 20.0), (3.0, 3.7), (-1e-7, 4e-7)] {
            let t = nice_ticks(lo, hi, 5);
            let step = t[1] - t[0];
            let k = (step / 10f64.powf(step.log10().floor())).round();
            assert!([1.0, 2.0, 5.0, 10.0].contains(&k), "{lo}..{hi}: step {step} in {t:?}");
            assert!(t[0] <= lo && *t.last().unwrap() >= hi, "{lo}..{hi}: {t:?} does not cover it");
            assert!((3..=12).contains(&t.len()), "{lo}..{hi}: {} ticks for about 5", t.len());
        }
    }

    #[test]
    fn ticks_are_the_doubles_of_their_decimals() {
        let t = nice_ticks(0.0, 0.9, 9);
        assert_eq!(t[3], 0.3, "not 3 × 0.1 = 0.30000000000000004");
        assert_eq!(t[7], 0.7);
        assert!(t.iter().all(|v| tick_label(*v).len() <= 3), "{t:?}");
    }

    #[test]
    fn bounds_that_are_ticks_add_no_tick_beyond_them() {
        assert_eq!(nice_ticks(0.3, 0.9, 6), vec![0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]);
    }

    #[test]
    fn degenerate_ranges() {
        assert_eq!(nice_ticks(0.0, 0.0, 5), vec![-1.0, -0.5, 0.0, 0.5, 1.0]);
        assert_eq!(nice_ticks(5.0, 5.0, 5), vec![4.4, 4.6, 4.8, 5.0, 5.2, 5.4, 5.6]);
        assert_eq!(nice_ticks(2.0, -2.0, 4), nice_ticks(-2.0, 2.0, 4), "bounds in either order");
        assert!(nice_ticks(f64::NAN, 1.0, 5).is_empty());
        assert!(nice_ticks(0.0, f64::INFINITY, 5).is_empty());
        assert!(!nice_ticks(0.0, 1.0, 0).is_empty(), "a target of 0 still gives an axis");
    }

    #[test]
    fn labels_have_no_float_noise() {
        assert_eq!(tick_label(0.1 + 0.2), "0.3");
        assert_eq!(tick_label(-2.0), "-2");
        assert_eq!(tick_label(-0.0), "0");
        assert_eq!(tick_label(1500.0), "1500");
        assert_eq!(tick_label(0.0005), "0.0005");
        assert_eq!(tick_label(2e-6), "2e-6");
        assert_eq!(tick_label(3e7), "3e7");
        assert_eq!(tick_label(6.342), "6.342");
    }
}
