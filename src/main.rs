//! tl-run: parse arguments, dispatch one function per command, map errors to exit codes.
use clap::Parser;

mod cli;

fn main() {
    // Past a file-size limit (ulimit -f, common under batch schedulers) a write should fail with
    // EFBIG and reach the user as an error naming the file, not kill the process with SIGXFSZ.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        // `tl-run plan ... | head` ends quietly when the reader goes away, like any Unix tool,
        // instead of a failed print.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // glibc gives large freed blocks back to the kernel (each its own mmap, or a trimmed heap top),
    // so every batched forward's activations landed on fresh pages the kernel had to zero: on the
    // causal-tracing bench (benches/causal_tracing_smollm2.toml, 2-core CPU) 13-14 s of system
    // time in a 35-43 s run, 1.5 s with freed memory kept for reuse. Peak memory is unchanged;
    // up to 1 GiB freed stays mapped between batches.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
    // `tl-run SPEC.toml` is short for `tl-run run SPEC.toml`.
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(pos) = argv.iter().skip(1).position(|a| !a.to_string_lossy().starts_with('-')) {
        if argv[pos + 1].to_string_lossy().ends_with(".toml") {
            argv.insert(pos + 1, "run".into());
        }
    }
    let args = match cli::Args::try_parse_from(argv) {
        Ok(args) => args,
        // --help, --version and argument errors: clap's text and exit code, through `exit_now`.
        Err(e) => {
            let _ = e.print();
            exit_now(e.exit_code())
        }
    };
    cli::init_logging(args.verbose);
    // A panic inside libtorch bindings must still reach the user as one readable line.
    tl_run::panics::install_hook();
    let code = match std::panic::catch_unwind(|| cli::dispatch(args)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("error: {e:#}");
            1
        }
        Err(payload) => {
            eprintln!(
                "error: internal failure: {}; please report it with the command that caused it",
                tl_run::panics::take_message(payload.as_ref())
            );
            101
        }
    };
    exit_now(code)
}

/// Ends the process without running C++ static destructors: libtorch's deregister every
/// operator one by one, 0.08-0.13 s of every command (measured on `tl-run --version`) for
/// memory the exit reclaims anyway. Everything of ours is finished by now: `dispatch` has
/// returned, so its files are written and renamed, its threads joined and its values dropped;
/// only the standard streams' buffers are left to flush.
fn exit_now(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: _exit only ends the process; nothing runs after it.
    unsafe { libc::_exit(code) }
}
