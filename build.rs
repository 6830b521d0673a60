//! Link settings for the final binary that torch-sys does not emit itself:
//! an rpath to the libtorch it was built against (so no LD_LIBRARY_PATH is needed), and, when the
//! libtorch is CUDA-enabled, `--no-as-needed` around torch_cuda so the linker keeps it even though
//! no symbol of it is referenced directly (otherwise CUDA is never available at run time); and
//! src/inference/mode.cpp, the one libtorch guard tch does not expose, compiled against the same
//! libtorch headers.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let lib = PathBuf::from(lib);
    compile_inference_mode(&lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // A compiled stage's shared library (model.pt2) needs libtorch.so, which nothing else pulls
    // in: loaded with the binary, dlopen finds it by its soname.
    if lib.join("libtorch.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

/// libtorch keeps its headers beside its lib directory, in a pip wheel (torch/include) as in the
/// standalone archive (libtorch/include). The ABI flag is LIBTORCH_CXX11_ABI as torch-sys reads it
/// for a standalone libtorch (default 1, as PyTorch's wheels are built); the guard passes no
/// standard-library type, so it does not depend on the flag.
fn compile_inference_mode(lib: &std::path::Path) {
    println!("cargo:rerun-if-changed=src/inference/mode.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let include = lib.parent().map(|p| p.join("include")).unwrap_or_default();
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .include(&include)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .file("src/inference/mode.cpp")
        .compile("model_service_inference_mode");
    println!("cargo:rerun-if-changed=src/inference/compiled.cpp");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .file("src/inference/compiled.cpp")
        .compile("model_service_compiled");
}
