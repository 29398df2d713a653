//! Panics (libtorch reports its errors through them) turned into one readable line: the hook
//! records the message and where it was raised instead of printing it, and whoever catches the
//! panic reports it with what it was doing — a run, a stage, a prompt — or, at the top, as an
//! internal failure.
use std::sync::Mutex;

static LAST: Mutex<Option<String>> = Mutex::new(None);

/// Installs the recording hook (the binary does, once, at start).
pub fn install_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info.payload().downcast_ref::<String>().cloned().or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()));
        let msg = msg.unwrap_or_else(|| "unknown".into());
        // libtorch's messages carry a C++ backtrace after the first line (escaped as \n inside
        // an unwrapped Result's Debug text): keep only what comes before it.
        let first = msg.split("\\n").next().unwrap_or("").lines().next().unwrap_or("");
        // tch's unwrap of a libtorch error: keep libtorch's own words.
        let first = first.strip_prefix("called `Result::unwrap()` on an `Err` value: Torch(\"").unwrap_or(first).trim_end_matches(['"', ')']).to_string();
        let at = info.location().map(|l| format!(" (at {}:{})", l.file(), l.line())).unwrap_or_default();
        if let Ok(mut last) = LAST.lock() {
            *last = Some(format!("{first}{at}"));
        }
    }));
}

/// The last panic's message (taken), or the payload's when no hook recorded one.
pub fn take_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(m) = LAST.lock().ok().and_then(|mut l| l.take()) {
        return m;
    }
    payload.downcast_ref::<String>().cloned().or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "unknown".into())
}

/// Runs `f`; a panic inside becomes an error saying what was being done.
pub fn guarded<T>(what: &str, f: impl FnOnce() -> crate::Result<T>) -> crate::Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => Err(crate::Error::Other(format!("{what}: internal failure: {}; please report it with the spec and model", take_message(payload.as_ref())))),
    }
}

/// Fault injection for tests (TL_RUN_INJECT_PANIC=text): panics as a libtorch binding would
/// inside the job whose name contains the text, so the report of a panic is tested end to end.
pub fn injected(job: &str) {
    if let Ok(needle) = std::env::var("TL_RUN_INJECT_PANIC") {
        if !needle.is_empty() && job.contains(&needle) {
            panic!("injected panic (TL_RUN_INJECT_PANIC={needle:?})");
        }
    }
}

/// Slowness injection for tests (TL_RUN_INJECT_DELAY_MS=n): each work job waits n ms before its
/// result is stored, so a test can stop a process between two stored jobs (a Slurm task cancelled
/// mid-run) however fast the jobs themselves are.
pub fn injected_delay() {
    if let Some(ms) = std::env::var("TL_RUN_INJECT_DELAY_MS").ok().and_then(|v| v.parse::<u64>().ok()) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_libtorch_panic_becomes_one_line_naming_what_was_done() {
        super::install_hook();
        let r: crate::Result<()> = super::guarded("run 'x' (logit_lens)", || {
            let t = tch::Tensor::zeros([2], (tch::Kind::Float, tch::Device::Cpu));
            let _ = t.get(5); // out of range: tch unwraps libtorch's error
            Ok(())
        });
        let e = r.unwrap_err().to_string();
        let _ = std::panic::take_hook();
        assert!(e.starts_with("run 'x' (logit_lens): internal failure: ") && e.contains("select(): index 5 out of range for tensor of size [2]"), "{e}");
        assert!(!e.contains("frame #") && !e.contains('\n'), "{e}");
    }
}
