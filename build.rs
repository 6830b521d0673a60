//! Link settings for the final binary that torch-sys does not emit itself:
//! an rpath to the libtorch it was built against (so no LD_LIBRARY_PATH is needed), and, when the
//! libtorch is CUDA-enabled, `--no-as-needed` around torch_cuda so the linker keeps it even though
//! no symbol of it is referenced directly (otherwise CUDA is never available at run time).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let lib = PathBuf::from(lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
