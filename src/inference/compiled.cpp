// AOTInductor packages (model.pt2, torch.export + aoti_compile_and_package) for the Rust side:
// tch 0.24 binds TorchScript modules only. src/inference/compiled.rs holds the loader. Tensors
// cross as tch's handles (at::Tensor*); exceptions become an error message.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <system_error>
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

// The directories the loaders unpacked packages into, as mapped in this process: a package's
// library is <temp dir>/<archive>/data/aotinductor/<model>/<hash>.wrapper.so.
std::set<std::filesystem::path> unpacked_dirs() {
  std::set<std::filesystem::path> dirs;
  std::ifstream maps("/proc/self/maps");
  const std::string marker = "/data/aotinductor/", suffix = ".wrapper.so";
  std::string line;
  while (std::getline(maps, line)) {
    auto slash = line.find('/');
    if (slash == std::string::npos) continue;
    std::string path = line.substr(slash);
    auto at = path.find(marker);
    if (at == std::string::npos || path.size() < suffix.size() ||
        path.compare(path.size() - suffix.size(), suffix.size(), suffix) != 0)
      continue;
    dirs.insert(std::filesystem::path(path.substr(0, at)).parent_path());
  }
  return dirs;
}

// The loader unpacks each package into a directory of its own, /tmp/XXXXXX (TMPDIR is not read),
// and removes it in its destructor, which a killed or crashed process never runs (each start of
// a server left 6.7 MB per package and copy behind). A CPU package needs none of those files once
// loaded (its library is mapped, its weights are in memory), so its directory goes at once; a
// CUDA package may still load kernels from it, so its directory stays for the destructor.
void remove_unpacked(const std::set<std::filesystem::path> &before) {
  std::error_code ec;
  for (const auto &dir : unpacked_dirs()) {
    if (before.count(dir) == 0 && dir.parent_path() == "/tmp") std::filesystem::remove_all(dir, ec);
  }
}
}  // namespace

extern "C" void *model_service_aoti_load(const char *path, char *err, size_t err_len) {
  try {
    std::lock_guard<std::mutex> one_at_a_time(lifecycle());
    auto before = unpacked_dirs();
    std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader(
        new torch::inductor::AOTIModelPackageLoader(path));
    if (loader->get_metadata()["AOTI_DEVICE_KEY"] == "cpu") remove_unpacked(before);
    return loader.release();
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
