//! Progress as log lines, for runs whose stderr is not a terminal (a Slurm log, a CI job): the
//! share of the work done (in job cost), elapsed time and an estimate of the time left, at most
//! every `every` and always after the last job.
use std::time::{Duration, Instant};

pub(crate) struct ProgressLines {
    total: f64,
    done: f64,
    jobs: (usize, usize),
    started: Instant,
    last: Option<Instant>,
    every: Duration,
}

impl ProgressLines {
    /// `total_cost` over `jobs` work jobs to run; a line at most every `every`.
    pub fn new(total_cost: f64, jobs: usize, every: Duration) -> ProgressLines {
        ProgressLines { total: total_cost, done: 0.0, jobs: (0, jobs), started: Instant::now(), last: None, every }
    }

    /// A work job of `cost` finished: the line to log now, if one is due.
    pub fn job_done(&mut self, name: &str, cost: f64) -> Option<String> {
        self.done += cost;
        self.jobs.0 += 1;
        let now = Instant::now();
        let last_job = self.jobs.0 >= self.jobs.1;
        if !last_job && self.last.is_some_and(|t| now - t < self.every) {
            return None;
        }
        self.last = Some(now);
        let elapsed = (now - self.started).as_secs_f64();
        let share = if self.total > 0.0 { (self.done / self.total).min(1.0) } else { 1.0 };
        let left = if share > 0.0 { elapsed * (1.0 - share) / share } else { f64::NAN };
        Some(format!(
            "tl-run: {}/{} jobs, {:.0}% of the work, {} elapsed, about {} left (last: {name})",
            self.jobs.0,
            self.jobs.1,
            100.0 * share,
            clock(elapsed),
            clock(left)
        ))
    }
}

/// Seconds as 1h02m03s, 2m05s or 7s.
fn clock(s: f64) -> String {
    if !s.is_finite() {
        return "?".into();
    }
    let s = s.round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, sec) => format!("{h}h{m:02}m{sec:02}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_say_the_share_done_and_the_time_left_and_always_come_after_the_last_job() {
        let mut p = ProgressLines::new(4.0, 3, Duration::from_secs(3600));
        let first = p.job_done("a", 1.0).expect("the first job gives a line");
        assert!(first.starts_with("tl-run: 1/3 jobs, 25% of the work,"), "{first}");
        assert_eq!(p.job_done("b", 1.0), None, "within the interval");
        let last = p.job_done("c", 2.0).expect("the last job gives a line");
        assert!(last.starts_with("tl-run: 3/3 jobs, 100% of the work,") && last.contains("about 0s left"), "{last}");
        assert_eq!((clock(7.0), clock(125.0), clock(3723.0)), ("7s".into(), "2m05s".into(), "1h02m03s".into()));
    }
}
