//! Panics (libtorch reports its errors through them) turned into one readable line: the hook
//! records the message and where it was raised instead of printing it, and whoever catches the
//! panic reports it with what it was doing — a run, a stage, a prompt — or, at the top, as an
//! internal failure.
use std::sync::Mutex;

static LAST: Mutex<Option<String>> = Mutex::new(None);

/// Installs the recording hook (the binary does, once, at start).
pub fn install_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()));
        let msg = msg.unwrap_or_else(|| "unknown".into());
        // libtorch's messages carry a C++ backtrace after the first line (escaped as \n inside
        // an unwrapped Result's Debug text): keep only what comes before it.
        let first = msg.split("\\n").next().unwrap_or("").lines().next().unwrap_or("");
        // tch's unwrap of a libtorch error: keep libtorch's own words.
        let first = first
            .strip_prefix("called `Result::unwrap()` on an `Err` value: Torch(\"")
            .unwrap_or(first)
            .trim_end_matches(['"', ')'])
            .to_string();
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
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown".into())
}

/// Runs `f`; a panic inside becomes an error saying what was being done.
pub fn guarded<T>(what: &str, f: impl FnOnce() -> crate::Result<T>) -> crate::Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let message = take_message(payload.as_ref());
            // A failed allocation is the input's size meeting the device's memory, not a defect.
            if crate::error::is_out_of_memory(&message) {
                let asked = requested_bytes(&message)
                    .map(|b| format!(" (it asked for {:.1} GiB at once)", b as f64 / (1u64 << 30) as f64))
                    .unwrap_or_default();
                return Err(crate::Error::Other(format!(
                    "{what}: out of memory{asked}: make the inputs smaller (fewer prompts, noise samples or repeated-token rows), give a smaller --batch-memory, or use a device with more memory"
                )));
            }
            Err(crate::Error::Other(format!(
                "{what}: internal failure: {message}; please report it with the spec and model"
            )))
        }
    }
}

/// The size of the allocation libtorch's CPU allocator refused ("you tried to allocate N bytes")
/// or CUDA's ("Tried to allocate 1.50 GiB"), in bytes.
fn requested_bytes(message: &str) -> Option<u64> {
    let lower = message.to_ascii_lowercase();
    let rest = &lower[lower.find("tried to allocate ")? + "tried to allocate ".len()..];
    let mut words = rest.split_whitespace();
    let number: f64 = words.next()?.parse().ok()?;
    let unit = match words.next()?.trim_end_matches(['.', ',', ';', ')']) {
        "bytes" | "b" => 1.0,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((number * unit) as u64)
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

/// Pause injection for tests (TL_RUN_INJECT_PAUSE_AFTER_STORED=k): once the k-th job of this
/// process is in the store, the store's writer stops for good, so a test kills a run at a known
/// point of its progress (exactly k jobs stored) instead of aiming at a wall-clock moment. With
/// TL_RUN_INJECT_PAUSE_MARKER=path the pause happens only while that file is absent, and creates
/// it, with the Slurm array task's index in it (or the process id), so only the first process of
/// an array to get there pauses, the test learns which one, and its rerun (a requeued Slurm task
/// inherits the environment) runs to the end.
pub fn injected_pause_after_stored(stored: usize) {
    let Some(k) = std::env::var("TL_RUN_INJECT_PAUSE_AFTER_STORED").ok().and_then(|v| v.parse::<usize>().ok()) else {
        return;
    };
    if stored != k {
        return;
    }
    if let Ok(marker) = std::env::var("TL_RUN_INJECT_PAUSE_MARKER") {
        use std::io::Write;
        let Ok(mut f) = std::fs::OpenOptions::new().write(true).create_new(true).open(&marker) else {
            return;
        };
        let who = std::env::var("SLURM_ARRAY_TASK_ID").unwrap_or_else(|_| std::process::id().to_string());
        let _ = f.write_all(who.as_bytes()).and_then(|()| f.sync_all());
    }
    tracing::info!("paused after {k} stored jobs (TL_RUN_INJECT_PAUSE_AFTER_STORED)");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
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
        // An allocation the host cannot give (4 TiB) is named as memory, not as a defect.
        let r: crate::Result<()> = super::guarded("the clean and corrupted runs", || {
            let _ = tch::Tensor::zeros([1i64 << 40], (tch::Kind::Float, tch::Device::Cpu));
            Ok(())
        });
        let oom = r.unwrap_err().to_string();
        let _ = std::panic::take_hook();
        assert!(
            e.starts_with("run 'x' (logit_lens): internal failure: ")
                && e.contains("select(): index 5 out of range for tensor of size [2]"),
            "{e}"
        );
        assert!(!e.contains("frame #") && !e.contains('\n'), "{e}");
        assert!(oom.starts_with("the clean and corrupted runs: out of memory (it asked for 4096.0 GiB at once): make the inputs smaller"), "{oom}");
        assert!(!oom.contains("internal failure") && !oom.contains('\n'), "{oom}");
    }

    #[test]
    fn the_refused_allocation_is_read_from_either_allocator() {
        assert_eq!(
            super::requested_bytes(
                "DefaultCPUAllocator: can't allocate memory: you tried to allocate 358400000000 bytes. Error code 12"
            ),
            Some(358_400_000_000)
        );
        assert_eq!(
            super::requested_bytes(
                "CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of 79.1 GiB"
            ),
            Some(1_610_612_736)
        );
        assert_eq!(super::requested_bytes("CUDA out of memory (injected)"), None);
    }
}
