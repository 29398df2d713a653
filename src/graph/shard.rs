//! Shards: a deterministic, cost-balanced share of a plan's work jobs per process, so a Slurm
//! array (or any set of processes) splits a sweep and each part is written where the union of
//! all parts reads as one dataset.
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::graph::Plan;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// `i/n` with 0 <= i < n.
    pub fn parse(s: &str) -> Result<Shard> {
        let bad = || Error::Config(format!("--shard {s:?}: expected i/n with 0 <= i < n, e.g. 0/4"));
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) =
            (i.trim().parse::<usize>().map_err(|_| bad())?, n.trim().parse::<usize>().map_err(|_| bad())?);
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    /// The shard a Slurm array task runs: SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT (the
    /// array must start at 0 and step by 1, as `tl-run slurm` writes it).
    pub fn from_slurm_env() -> Result<Option<Shard>> {
        let (Ok(id), Ok(count)) = (std::env::var("SLURM_ARRAY_TASK_ID"), std::env::var("SLURM_ARRAY_TASK_COUNT"))
        else {
            return Ok(None);
        };
        let min = std::env::var("SLURM_ARRAY_TASK_MIN").unwrap_or_else(|_| "0".into());
        if min != "0" {
            return Err(Error::Config(format!("this Slurm array starts at task {min}; tl-run shards an array 0-(N-1) (write it with `tl-run slurm`, or pass --shard i/n)")));
        }
        Shard::parse(&format!("{id}/{count}")).map(Some).map_err(|_| {
            Error::Config(format!("SLURM_ARRAY_TASK_ID={id} and SLURM_ARRAY_TASK_COUNT={count} do not name a shard"))
        })
    }

    /// `shard=<i>-of-<n>`: the directory (a hive-style partition) this shard's part of a run goes in.
    pub fn dir_name(&self) -> String {
        format!("shard={}-of-{}", self.index, self.count)
    }

    /// Where this shard writes its part of run `run`.
    pub fn part_path(&self, output_dir: &Path, run: &str) -> Result<PathBuf> {
        crate::output::atomic::check_file_stem(run)
            .map_err(|why| Error::Config(format!("output name {run:?} {why}")))?;
        Ok(output_dir.join(run).join(self.dir_name()).join("part-0.parquet"))
    }

    pub fn manifest_name(&self) -> String {
        format!("manifest.shard-{}-of-{}.json", self.index, self.count)
    }
}

/// The shard of every job of `plan` (work jobs only; others get None): longest job first, each
/// to the shard with the least work so far (ties: the lower shard), ties between jobs by id.
pub fn assign(plan: &Plan, count: usize) -> Vec<Option<usize>> {
    let mut out = vec![None; plan.jobs.len()];
    let mut order: Vec<&crate::graph::Job> = plan.work().collect();
    order.sort_by(|a, b| b.cost.total_cmp(&a.cost).then(a.id.cmp(&b.id)));
    let mut load = vec![0.0f64; count.max(1)];
    for j in order {
        let s =
            (0..load.len()).min_by(|&a, &b| load[a].total_cmp(&load[b]).then(a.cmp(&b))).expect("at least one shard");
        // Every job costs something, so empty jobs still spread.
        load[s] += j.cost.max(1.0);
        out[j.id] = Some(s);
    }
    out
}
