//! Makes the binary find libtorch without LD_LIBRARY_PATH, and keeps libtorch_cuda linked even
//! though no symbol of it is referenced directly, so one build uses CUDA wherever it is present.
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
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
