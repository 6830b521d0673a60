//! A stage compiled ahead of time: an AOTInductor package (`model.pt2`, written by
//! `python -m model_service_py.compile_stages`), loaded through libtorch's
//! `AOTIModelPackageLoader` (src/inference/compiled.cpp, compiled by build.rs; tch binds
//! TorchScript only). Called on the inference worker that owns it, like a `CModule`.

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;

use tch::Tensor;

extern "C" {
    fn model_service_aoti_load(path: *const c_char, err: *mut c_char, err_len: usize) -> *mut c_void;
    fn model_service_aoti_run(
        loader: *mut c_void,
        inputs: *const *mut torch_sys::C_tensor,
        n: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut torch_sys::C_tensor;
    fn model_service_aoti_free(loader: *mut c_void);
}

const ERR_LEN: usize = 1024;

/// One loaded package (one copy, owned by one inference worker).
pub struct Compiled {
    loader: *mut c_void,
}

// SAFETY: the loader is used by one thread at a time (each worker owns its copy, behind the same
// discipline as its `CModule`s) and libtorch's loader holds no thread-affine state.
unsafe impl Send for Compiled {}
unsafe impl Sync for Compiled {}

impl Compiled {
    pub fn load(path: &Path) -> Result<Self, String> {
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| format!("{}: the path holds a NUL byte", path.display()))?;
        let mut err = [0 as c_char; ERR_LEN];
        // SAFETY: a NUL-terminated path and an error buffer of ERR_LEN bytes.
        let loader = unsafe { model_service_aoti_load(c_path.as_ptr(), err.as_mut_ptr(), ERR_LEN) };
        if loader.is_null() {
            return Err(format!("{}: {}", path.display(), message(&err)));
        }
        Ok(Self { loader })
    }

    /// Runs the package on `inputs`; its first output.
    pub fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor, String> {
        let ptrs: Vec<*mut torch_sys::C_tensor> = inputs.iter().map(|t| t.as_ptr() as *mut _).collect();
        let mut err = [0 as c_char; ERR_LEN];
        // SAFETY: `ptrs` are live tensors borrowed for the call; the result is a new tensor we own.
        let out = unsafe { model_service_aoti_run(self.loader, ptrs.as_ptr(), ptrs.len(), err.as_mut_ptr(), ERR_LEN) };
        if out.is_null() {
            return Err(message(&err));
        }
        // SAFETY: a tensor allocated by the shim, owned from here on (freed by Tensor's Drop).
        Ok(unsafe { Tensor::from_ptr(out) })
    }
}

impl Drop for Compiled {
    fn drop(&mut self) {
        // SAFETY: created by model_service_aoti_load, freed once.
        unsafe { model_service_aoti_free(self.loader) }
    }
}

fn message(err: &[c_char]) -> String {
    // SAFETY: the shim NUL-terminates within the buffer (it is zeroed beforehand).
    unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned()
}

/// Which form of the stages runs (STAGE_RUNTIME).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum StageRuntime {
    /// The compiled package where one matches (its model.pt, this CPU, TORCH_THREADS), else
    /// TorchScript.
    #[default]
    Auto,
    /// TorchScript only.
    Torchscript,
    /// The compiled packages of DIN and RankNet, or the directory is refused.
    Compiled,
}

/// How the stages of a set are loaded.
#[derive(Debug, Clone, Copy)]
pub struct RuntimeSpec {
    pub runtime: StageRuntime,
    /// libtorch threads per worker: a package runs with the count it was compiled for.
    pub threads: usize,
}

/// What `<stage>/model.pt2.json` records of a package (`model_service_py.compile_stages`).
#[derive(Debug, serde::Deserialize)]
struct PackageMeta {
    source_sha256: String,
    threads: usize,
    cpu: String,
    /// Absent in the packages of the first compile_stages (RankNet's then took a padded batch).
    #[serde(default)]
    inputs: Vec<String>,
}

/// The inputs each stage's package takes (`compile_stages.INPUTS`, model_output/README.md): DIN
/// one profile's history at a time, RankNet the batch's history items packed with their rows.
fn package_inputs(stage: &str) -> &'static [&'static str] {
    match stage {
        "din" => &["history", "mask", "cands", "s1"],
        _ => &["hist", "rows", "cands", "s1", "s2"],
    }
}

/// `<dir>/<stage>/model.pt2` when the runtime asks for it and it was compiled from this model.pt,
/// for this CPU and this thread count: Ok(None) means TorchScript (with `auto`, and why in the
/// log); with `compiled`, a missing or mismatched package is an error.
pub fn load_stage(dir: &Path, stage: &str, spec: RuntimeSpec, on_cpu: bool) -> Result<Option<Compiled>, String> {
    if spec.runtime == StageRuntime::Torchscript {
        return Ok(None);
    }
    let usable = || -> Result<Compiled, String> {
        if !on_cpu {
            return Err("the packages are compiled for the CPU, and the models run on CUDA".into());
        }
        let package = dir.join(stage).join("model.pt2");
        let meta_file = dir.join(stage).join("model.pt2.json");
        let meta = std::fs::read(&meta_file).map_err(|e| format!("{}: {e}", meta_file.display()))?;
        let meta: PackageMeta = serde_json::from_slice(&meta).map_err(|e| format!("{}: {e}", meta_file.display()))?;
        let source = dir.join(stage).join("model.pt");
        let bytes = std::fs::read(&source).map_err(|e| format!("{}: {e}", source.display()))?;
        if sha256_hex(&bytes) != meta.source_sha256 {
            return Err(format!("{} was compiled from another {}", package.display(), source.display()));
        }
        if meta.threads != spec.threads {
            return Err(format!(
                "{} is compiled for {} libtorch threads, the workers run {} (TORCH_THREADS)",
                package.display(),
                meta.threads,
                spec.threads
            ));
        }
        if meta.inputs != package_inputs(stage) {
            return Err(format!(
                "{} takes {:?}, this server calls it with {:?} (made by an older compile_stages: run it again)",
                package.display(),
                meta.inputs,
                package_inputs(stage)
            ));
        }
        if meta.cpu != cpu_signature() {
            return Err(format!("{} is compiled for another CPU", package.display()));
        }
        Compiled::load(&package)
    };
    match usable() {
        Ok(compiled) => Ok(Some(compiled)),
        Err(why) if spec.runtime == StageRuntime::Compiled => Err(format!("STAGE_RUNTIME=compiled: {why}")),
        Err(why) => {
            tracing::info!(stage, %why, "TorchScript runs this stage");
            Ok(None)
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The CPU a package's kernels were compiled for: SHA-256 of its model name and sorted flags
/// (/proc/cpuinfo), 16 hex digits, as `model_service_py.compile_stages.cpu_signature` computes it.
pub fn cpu_signature() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == name).then(|| value.trim().to_string())
        })
    };
    let model = field("model name").unwrap_or_default();
    let mut flags: Vec<String> = field("flags").unwrap_or_default().split_whitespace().map(str::to_string).collect();
    flags.sort();
    sha256_hex(format!("{model}\n{}", flags.join(" ")).as_bytes())[..16].to_string()
}
