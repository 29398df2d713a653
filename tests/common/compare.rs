//! The one comparison every oracle test goes through: tl-run's values against the reference's,
//! with the reference's signal checked first, so that a comparison that could not tell a
//! do-nothing implementation from a working one refuses to run instead of passing.
//!
//! The signal is max |reference − baseline|, where the baseline is what a do-nothing
//! implementation would report for that quantity (the corrupted metric for patching, the
//! unpatched probability for causal tracing, zero for attribution scores and normalised values).
//! A comparison runs only when the signal is at least 20× the tolerance and the reference's
//! largest value is too (so an all-zero output fails as well); each one prints its measured
//! agreement and signal-to-tolerance ratio, and appends them to `$TL_RUN_SIGNAL_LOG` when that is
//! set (the closing note's table of the smallest ratio per test file comes from it).
use std::io::Write;

use tch::Tensor;

/// The smallest signal-to-tolerance ratio a comparison may run with.
pub const MIN_SIGNAL_RATIO: f64 = 20.0;

/// What a do-nothing implementation would report for each compared value.
#[derive(Clone, Copy, Debug)]
pub enum Baseline<'a> {
    /// Zero: attribution scores, normalised patching values (0 = the corrupted run), effects.
    Zero,
    /// One value for all (e.g. the corrupted metric, the unpatched probability).
    Value(f64),
    /// One value per compared value (e.g. the clean activation a patch replaces).
    Values(&'a [f64]),
}

impl Baseline<'_> {
    fn at(&self, i: usize) -> f64 {
        match self {
            Baseline::Zero => 0.0,
            Baseline::Value(v) => *v,
            Baseline::Values(v) => v[i],
        }
    }
}

/// The tolerance: an absolute bound, or a fraction of the reference's signal.
#[derive(Clone, Copy, Debug)]
pub enum Tol {
    Abs(f64),
    OfSignal(f64),
}

/// How a comparison went; `check` returns it when the values agree.
#[derive(Clone, Copy, Debug)]
pub struct Agreement {
    pub max_diff: f64,
    /// max |reference − baseline|.
    pub signal: f64,
    /// max |reference|: an all-zero output is that far off.
    pub magnitude: f64,
    pub tol: f64,
}

impl Agreement {
    /// The ratio the guard enforces (≥ 20): the smaller of the signal and the reference's
    /// largest value, over the tolerance.
    pub fn ratio(&self) -> f64 {
        self.signal.min(self.magnitude) / self.tol
    }
}

/// |a − b|, with equal infinities (masked attention scores) counting as equal and NaN as infinitely far.
fn diff(a: f64, b: f64) -> f64 {
    if a == b {
        0.0
    } else {
        let d = (a - b).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            d
        }
    }
}

/// The reference's signal against `baseline` (finite values only) and its largest magnitude.
fn signal(theirs: &[f64], baseline: Baseline) -> (f64, f64) {
    let finite = |x: &f64| x.is_finite();
    let against_baseline = theirs.iter().enumerate().map(|(i, t)| t - baseline.at(i)).filter(finite).map(f64::abs);
    let magnitude = theirs.iter().filter(|x| finite(x)).map(|x| x.abs());
    (against_baseline.fold(0.0, f64::max), magnitude.fold(0.0, f64::max))
}

/// Compares without panicking: Err says why the values differ or why the comparison cannot fail.
pub fn check(ours: &[f64], theirs: &[f64], baseline: Baseline, tol: Tol) -> Result<Agreement, String> {
    if ours.len() != theirs.len() {
        return Err(format!("{} values vs the reference's {}", ours.len(), theirs.len()));
    }
    if theirs.is_empty() {
        return Err("nothing to compare (both sides are empty)".into());
    }
    if let Baseline::Values(b) = baseline {
        assert_eq!(b.len(), theirs.len(), "the baseline has {} values for {} compared", b.len(), theirs.len());
    }
    let (signal, magnitude) = signal(theirs, baseline);
    let tol = match tol {
        Tol::Abs(t) => t,
        Tol::OfSignal(f) => f * signal,
    };
    let weakest = signal.min(magnitude);
    if !(weakest >= MIN_SIGNAL_RATIO * tol) || tol <= 0.0 {
        return Err(format!(
            "this comparison cannot fail: the reference's signal is {signal:.3e} against its baseline and its largest value {magnitude:.3e}, under {MIN_SIGNAL_RATIO}× the tolerance {tol:.1e}; pick a fixture or prompts with a larger effect"
        ));
    }
    let worst = ours
        .iter()
        .zip(theirs)
        .enumerate()
        .map(|(i, (a, b))| (i, diff(*a, *b)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    let (i, d) = worst;
    if d > tol {
        return Err(format!(
            "value {i} is {} vs the reference's {} (|diff| {d:.3e} > {tol:.1e}; signal {signal:.3e})",
            ours[i], theirs[i]
        ));
    }
    Ok(Agreement { max_diff: d, signal, magnitude, tol })
}

/// Asserts tl-run's values equal the reference's within `tol`, after checking the comparison can
/// fail: the reference's signal against `baseline` must be ≥ 20× the tolerance. Also asserts that
/// an output equal to the baseline and an all-zero output would both be rejected.
pub fn assert_oracle(what: &str, ours: &[f64], theirs: &[f64], baseline: Baseline, tol: Tol) -> Agreement {
    let a = check(ours, theirs, baseline, tol).unwrap_or_else(|e| panic!("{what}: {e}"));
    // The guard's own proof: what a broken implementation would report is rejected.
    let do_nothing: Vec<f64> = (0..theirs.len()).map(|i| baseline.at(i)).collect();
    assert!(check(&do_nothing, theirs, baseline, tol).is_err(), "{what}: the baseline itself would pass");
    assert!(check(&vec![0.0; theirs.len()], theirs, baseline, tol).is_err(), "{what}: an all-zero output would pass");
    eprintln!("max |diff| {:.2e}  signal {:.2e}  signal/tol {:.0}  {what}", a.max_diff, a.signal, a.ratio());
    if let Ok(path) = std::env::var("TL_RUN_SIGNAL_LOG") {
        let test = std::thread::current().name().unwrap_or("?").to_string();
        let file = std::env::args().next().unwrap_or_default();
        let binary =
            std::path::Path::new(&file).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let line = format!(
            "{binary}\t{test}\t{what}\t{:.3e}\t{:.3e}\t{:.3e}\t{:.1}\n",
            a.max_diff,
            a.signal,
            a.tol,
            a.ratio()
        );
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = f.write_all(line.as_bytes());
        }
    }
    a
}

/// Runs one comparison and returns its agreement, or its failure message (a difference or a
/// refused comparison) instead of panicking, so that a test reports every failing comparison,
/// not the first.
pub fn outcome<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| format!("{what}: panicked"))
    })
}

/// A tensor's values in row-major order, as f64.
pub fn flat(t: &Tensor) -> Vec<f64> {
    Vec::try_from(t.detach().flatten(0, -1).to_kind(tch::Kind::Double)).unwrap()
}

/// `assert_oracle` on tensors of the same shape.
pub fn assert_oracle_tensor(what: &str, ours: &Tensor, theirs: &Tensor, baseline: Baseline, tol: Tol) -> Agreement {
    assert_eq!(ours.size(), theirs.size(), "{what}: shapes differ");
    assert_oracle(what, &flat(ours), &flat(theirs), baseline, tol)
}

/// The guard's own test (run by tests/zoo_vs_transformer_lens.rs): comparisons without signal
/// are refused, broken outputs fail.
pub fn guard_self_test() {
    {
        let theirs = [0.5, 0.25, -0.1];
        assert!(check(&theirs, &theirs, Baseline::Zero, Tol::Abs(1e-4)).is_ok());
        // Signal 0.5 under 20 × 0.05: refused even though the values are equal.
        assert!(check(&theirs, &theirs, Baseline::Zero, Tol::Abs(0.05)).unwrap_err().contains("cannot fail"));
        // A baseline at the reference itself: no signal.
        assert!(check(&theirs, &theirs, Baseline::Values(&theirs), Tol::Abs(1e-6))
            .unwrap_err()
            .contains("cannot fail"));
        assert!(check(&[0.0; 3], &theirs, Baseline::Zero, Tol::Abs(1e-4)).is_err());
        assert!(check(&[0.5, 0.25, -0.0999], &theirs, Baseline::Zero, Tol::Abs(1e-5)).is_err());
        assert!(check(&[0.5, 0.25, f64::NAN], &theirs, Baseline::Zero, Tol::Abs(1e-5)).is_err());
        // A reference near its baseline but far from zero: the zero output is still refused.
        assert!(check(&[0.0; 2], &[1.0, 1.0], Baseline::Value(1.0 + 1e-9), Tol::Abs(1e-4))
            .unwrap_err()
            .contains("cannot fail"));
        // Signal-relative tolerance scales with the reference.
        let a = check(&[1.0005, 2.0], &[1.0, 2.0], Baseline::Zero, Tol::OfSignal(1e-3)).unwrap();
        assert_eq!(a.tol, 2e-3);
        assert_eq!(a.ratio(), 1000.0);
        assert!(check(&[1.005, 2.0], &[1.0, 2.0], Baseline::Zero, Tol::OfSignal(1e-3)).is_err());
        // Equal infinities (masked scores) count as equal; unequal ones do not.
        let masked = [f64::NEG_INFINITY, 1.0];
        assert!(check(&masked, &masked, Baseline::Zero, Tol::Abs(1e-4)).is_ok());
        assert!(check(&[1.0, 1.0], &masked, Baseline::Zero, Tol::Abs(1e-4)).is_err());
    }
}
