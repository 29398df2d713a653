//! Makes the binary find libtorch without LD_LIBRARY_PATH. libtorch_cuda is deliberately not
//! linked: its static initialisers (and the CUDA libraries it pulls in) cost 0.15-0.4 s at every
//! start, even of a CPU run; `engine::device` opens it when a CUDA device is first named, and
//! this records where to find it.
use std::path::PathBuf;

fn main() {
    // The commit the binary was built from, for manifests.
    if let Ok(out) = std::process::Command::new("git").args(["rev-parse", "HEAD"]).output() {
        if out.status.success() {
            println!("cargo:rustc-env=TL_RUN_GIT_COMMIT={}", String::from_utf8_lossy(&out.stdout).trim());
        }
    }
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    // `.libtorch` is a symlink into the shared virtualenv; the rpath gets the real directory.
    let lib_dir = std::fs::canonicalize(&lib_dir).unwrap_or_else(|_| PathBuf::from(&lib_dir));
    println!("cargo:rustc-link-arg=-Wl,-rpath={}", lib_dir.display());
    println!("cargo:rustc-env=TL_RUN_LIBTORCH_LIB={}", lib_dir.display());
}
