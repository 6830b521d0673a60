// AOTInductor packages (model.pt2, torch.export + aoti_compile_and_package) for the Rust side:
// tch 0.24 binds TorchScript modules only. src/inference/compiled.rs holds the loader. Tensors
// cross as tch's handles (at::Tensor*); exceptions become an error message.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <vector>

namespace {
void set_error(char *err, size_t len, const char *what) {
  if (err && len > 0) {
    std::strncpy(err, what, len - 1);
    err[len - 1] = '\0';
  }
}

// Loaders are made and destroyed one at a time in the process: constructing them from several
// threads at once (the copies of a model set load in parallel, a reload frees the old set while
// the new one loads) corrupted the heap ("double free or corruption", "unaligned tcache chunk")
// within a few dozen reloads (tests/compiled_stages.rs). Running a loaded package needs no lock.
std::mutex &lifecycle() {
  static std::mutex m;
  return m;
}
}  // namespace

extern "C" void *model_service_aoti_load(const char *path, char *err, size_t err_len) {
  try {
    std::lock_guard<std::mutex> one_at_a_time(lifecycle());
    return new torch::inductor::AOTIModelPackageLoader(path);
  } catch (const std::exception &e) {
    set_error(err, err_len, e.what());
  } catch (...) {
    set_error(err, err_len, "unknown C++ exception");
  }
  return nullptr;
}

// Runs the package on `n` inputs; its first output is returned as a new at::Tensor* (owned by the
// caller), or null with the reason in `err`.
extern "C" at::Tensor *model_service_aoti_run(void *loader, at::Tensor **inputs, size_t n, char *err,
                                              size_t err_len) {
  try {
    std::vector<at::Tensor> in;
    in.reserve(n);
    for (size_t i = 0; i < n; i++) in.push_back(*inputs[i]);
    auto out = static_cast<torch::inductor::AOTIModelPackageLoader *>(loader)->run(in);
    if (out.empty()) {
      set_error(err, err_len, "the package returned no output");
      return nullptr;
    }
    return new at::Tensor(std::move(out[0]));
  } catch (const std::exception &e) {
    set_error(err, err_len, e.what());
  } catch (...) {
    set_error(err, err_len, "unknown C++ exception");
  }
  return nullptr;
}

extern "C" void model_service_aoti_free(void *loader) {
  std::lock_guard<std::mutex> one_at_a_time(lifecycle());
  delete static_cast<torch::inductor::AOTIModelPackageLoader *>(loader);
}
