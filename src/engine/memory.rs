//! How much working memory a batch of patched forwards may take, and recognising a failed
//! allocation so a sweep can halve its batch and retry instead of failing.
use std::sync::atomic::{AtomicU64, Ordering};

use tch::Device;

/// Bytes a CPU batch may use unless set (`--batch-memory`, TL_RUN_BATCH_FLOATS): 256 MiB.
const CPU_DEFAULT_BYTES: u64 = 256 << 20;

/// 0 = not set on the command line.
static BUDGET_BYTES: AtomicU64 = AtomicU64::new(0);

/// Sets the batch budget for this process (the `--batch-memory` flag).
pub fn set_budget_bytes(bytes: u64) {
    BUDGET_BYTES.store(bytes, Ordering::SeqCst);
}

/// The working memory one batched forward may use on `device`, in f32 elements: the flag, else
/// TL_RUN_BATCH_FLOATS, else on CUDA half of the memory the device has free, else 256 MiB.
pub fn budget_floats(device: Device) -> i64 {
    let set = BUDGET_BYTES.load(Ordering::SeqCst);
    if set > 0 {
        return (set / 4) as i64;
    }
    if let Some(f) = std::env::var("TL_RUN_BATCH_FLOATS").ok().and_then(|v| v.parse::<i64>().ok()) {
        return f;
    }
    if let Device::Cuda(i) = device {
        if let Some(free) = cuda_free_bytes(i) {
            return (free / 2 / 4) as i64;
        }
    }
    (CPU_DEFAULT_BYTES / 4) as i64
}

/// Free memory of CUDA device `index` from the CUDA runtime that libtorch loaded
/// (cudaMemGetInfo on the current device, which is device 0 unless something set another).
pub(crate) fn cuda_free_bytes(index: usize) -> Option<u64> {
    type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> i32;
    type SetDevice = unsafe extern "C" fn(i32) -> i32;
    type GetDevice = unsafe extern "C" fn(*mut i32) -> i32;
    for lib in ["libcudart.so.13", "libcudart.so.12", "libcudart.so"] {
        let name = std::ffi::CString::new(lib).ok()?;
        // SAFETY: dlopen/dlsym with valid C strings; the symbols have the CUDA runtime's
        // documented signatures; the current device is restored after the query.
        unsafe {
            let h = libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
            let h = if h.is_null() { libc::dlopen(name.as_ptr(), libc::RTLD_NOW) } else { h };
            if h.is_null() {
                continue;
            }
            let sym = |s: &str| std::ffi::CString::new(s).ok().map(|c| libc::dlsym(h, c.as_ptr()));
            let (Some(info), Some(set), Some(get)) =
                (sym("cudaMemGetInfo"), sym("cudaSetDevice"), sym("cudaGetDevice"))
            else {
                continue;
            };
            if info.is_null() || set.is_null() || get.is_null() {
                continue;
            }
            let (info, set, get): (MemGetInfo, SetDevice, GetDevice) = (
                std::mem::transmute::<*mut libc::c_void, MemGetInfo>(info),
                std::mem::transmute::<*mut libc::c_void, SetDevice>(set),
                std::mem::transmute::<*mut libc::c_void, GetDevice>(get),
            );
            let mut current = 0i32;
            if get(&mut current) != 0 || set(index as i32) != 0 {
                continue;
            }
            let (mut free, mut total) = (0usize, 0usize);
            let ok = info(&mut free, &mut total) == 0;
            set(current);
            if ok {
                return Some(free as u64);
            }
        }
    }
    None
}

/// The host's memory when `bytes` (None: past a 64-bit count) exceed it, for the checks that
/// name inputs no run could hold before anything is loaded; None when they fit or the system
/// does not tell its memory.
pub fn past_host_memory(bytes: Option<u64>) -> Option<u64> {
    host_memory_bytes().filter(|&host| bytes.is_none_or(|b| b > host))
}

/// The host's physical memory (MemTotal of /proc/meminfo), where the system tells it.
fn host_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Fault injection for tests (TL_RUN_INJECT_OOM_ROWS=N): a batch of more than N rows fails as a
/// CUDA out-of-memory error would, so the halving path is tested on machines without a GPU.
pub fn injected_oom(rows: i64) -> Option<String> {
    let limit: i64 = std::env::var("TL_RUN_INJECT_OOM_ROWS").ok()?.parse().ok()?;
    (rows > limit)
        .then(|| format!("CUDA out of memory (injected by TL_RUN_INJECT_OOM_ROWS={limit}: a batch of {rows} rows)"))
}
