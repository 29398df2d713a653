//! Device names as users write them (cpu, cuda, cuda:N), checked against what is present.
use crate::error::{Error, Result};

pub fn parse(s: &str) -> Result<tch::Device> {
    if s != "cpu" {
        load_cuda_backend();
    }
    match s {
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" if tch::Cuda::is_available() => Ok(tch::Device::Cuda(0)),
        "cuda" => Err(Error::Config("device 'cuda' was asked for but CUDA is not available here".into())),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) if n < tch::Cuda::device_count().max(0) as usize => Ok(tch::Device::Cuda(n)),
            Some(n) => Err(Error::Config(format!(
                "device '{s}': there are {} CUDA devices here, so cuda:{n} does not exist",
                tch::Cuda::device_count()
            ))),
            None => Err(Error::Config(format!("unknown device '{s}' (use cpu, cuda or cuda:N)"))),
        },
    }
}

/// Registers libtorch's CUDA backend by opening libtorch_cuda.so, once, before CUDA is first
/// queried. The binary does not link it (see build.rs), so a CPU run never pays its start-up.
/// The library is looked up as the loader would (LD_LIBRARY_PATH, then the binary's runpath),
/// then in the libtorch the binary was built against. Absent (a CPU-only libtorch, no driver),
/// CUDA simply reports no devices.
pub fn load_cuda_backend() {
    static LOADED: std::sync::Once = std::sync::Once::new();
    LOADED.call_once(|| {
        let built = option_env!("TL_RUN_LIBTORCH_LIB").map(|d| format!("{d}/libtorch_cuda.so"));
        for name in std::iter::once("libtorch_cuda.so".to_string()).chain(built) {
            let Ok(c) = std::ffi::CString::new(name.clone()) else { continue };
            // SAFETY: dlopen with a valid C string; the handle is kept open for the process's
            // life (never dlclosed), as libtorch's registrations point into the library.
            let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if !handle.is_null() {
                tracing::debug!(library = %name, "CUDA backend loaded");
                return;
            }
        }
        tracing::debug!("libtorch_cuda.so not found: CUDA unavailable");
    });
}
