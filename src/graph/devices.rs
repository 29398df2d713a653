//! Data parallelism over devices: one model replica per device, each pulling the next
//! unfinished work job from a shared queue (in plan order, so early runs finish first) and
//! storing its result; the executor takes the results in plan order and writes as before. A job
//! computes the same on any replica, so the rows equal a one-device run's.
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Mutex;
use std::thread::Scope;
use std::time::Instant;

use tch::Device;

use crate::engine::nonfinite::Finding;
use crate::error::{Error, Result};
use crate::graph::store::Store;
use crate::graph::Plan;
use crate::kinds::shared::context::RunContext;
use crate::kinds::shared::inputs::Tokenized;
use crate::kinds::JobOutput;
use crate::kinds::Spec;
use crate::model::Model;
use crate::output::table::Row;

/// Loads a replica of the model on a device.
pub type Loader<'a> = dyn Fn(Device) -> Result<Model> + Sync + 'a;

enum Msg {
    Done { id: usize, result: Result<JobOutput>, seconds: f64, device: Device },
    Nonfinite(Finding),
    Failed(Error),
}

pub struct Pool<'env> {
    rx: Receiver<Msg>,
    abort: &'env AtomicBool,
    done: HashMap<usize, (Result<JobOutput>, f64, Device)>,
}

/// What every replica shares.
#[derive(Clone, Copy)]
pub struct Shared<'env> {
    pub spec: &'env Spec,
    pub plan: &'env Plan,
    pub store: Option<&'env Store>,
    pub load: &'env Loader<'env>,
    pub abort: &'env AtomicBool,
    /// Whether a replica already reported non-finite weights or baselines (once is enough).
    pub reported: &'env AtomicBool,
    pub queue: &'env Mutex<VecDeque<usize>>,
}

impl<'env> Pool<'env> {
    /// Starts one worker per device on `scope`; `toks` gives each worker its own copy.
    pub fn start<'scope>(
        scope: &'scope Scope<'scope, 'env>,
        devices: &[Device],
        shared: Shared<'env>,
        toks: Option<&Tokenized>,
    ) -> Pool<'env> {
        let (tx, rx) = channel();
        let abort = shared.abort;
        for &device in devices {
            let tx = tx.clone();
            let toks = toks.map(Tokenized::duplicate);
            let sh = shared;
            scope.spawn(move || {
                let model = match crate::panics::guarded("loading a model replica", || (sh.load)(device)) {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = tx.send(Msg::Failed(Error::Other(format!("loading the model on {device:?}: {e}"))));
                        return;
                    }
                };
                if let Some(f) = crate::engine::nonfinite::first_in_weights(&model) {
                    if !sh.reported.swap(true, Ordering::SeqCst) {
                        let _ = tx.send(Msg::Nonfinite(f));
                    }
                }
                let cx = RunContext::new(sh.spec, &model, toks.as_ref(), None);
                let mut baseline_checked = false;
                while !sh.abort.load(Ordering::SeqCst) {
                    let Some(id) = sh.queue.lock().ok().and_then(|mut q| q.pop_front()) else { break };
                    let job = &sh.plan.jobs[id];
                    let t = Instant::now();
                    let mut result = crate::graph::job::run_and_store(&cx, job, sh.store);
                    if !baseline_checked && cx.clean_corrupted_if_made().is_some() {
                        baseline_checked = true;
                        match crate::graph::job::baseline_finding(&cx) {
                            Ok(Some(f)) if !sh.reported.swap(true, Ordering::SeqCst) => {
                                let _ = tx.send(Msg::Nonfinite(f));
                            }
                            Err(e) => result = Err(e),
                            _ => {}
                        }
                    }
                    if tx.send(Msg::Done { id, result, seconds: t.elapsed().as_secs_f64(), device }).is_err() {
                        break;
                    }
                }
            });
        }
        Pool { rx, abort, done: HashMap::new() }
    }

    /// The result of job `id` (waiting for it), with its seconds and device. A non-finite finding
    /// a replica reports on the way goes to `on_finding` (which stops the run unless allowed).
    pub fn wait(
        &mut self,
        id: usize,
        mut on_finding: impl FnMut(Finding) -> Result<()>,
    ) -> Result<(Vec<Row>, serde_json::Value, f64, Device)> {
        let stop = |e: Error, abort: &AtomicBool| {
            abort.store(true, Ordering::SeqCst);
            Err(e)
        };
        loop {
            if let Some((result, seconds, device)) = self.done.remove(&id) {
                return match result {
                    Ok((rows, note)) => Ok((rows, note, seconds, device)),
                    Err(e) => stop(e, self.abort),
                };
            }
            match self.rx.recv() {
                Ok(Msg::Done { id, result, seconds, device }) => {
                    self.done.insert(id, (result, seconds, device));
                }
                Ok(Msg::Nonfinite(f)) => {
                    if let Err(e) = on_finding(f) {
                        return stop(e, self.abort);
                    }
                }
                Ok(Msg::Failed(e)) => return stop(e, self.abort),
                Err(_) => {
                    return stop(
                        Error::Other(format!("every device worker stopped before job {id} was done")),
                        self.abort,
                    )
                }
            }
        }
    }

    /// Stops the workers after their current job (the run is over or failed).
    pub fn stop(&self) {
        self.abort.store(true, Ordering::SeqCst);
    }
}
