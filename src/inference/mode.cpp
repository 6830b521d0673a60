// libtorch's InferenceMode for the Rust side (tch 0.24 exposes only the no-grad guard).
// Inside it, operators skip autograd's view and version-counter bookkeeping as well as the graph:
// the per-operator cost that dominates the cascade's many small tensors. src/inference/mode.rs
// holds the guard.
#include <c10/core/InferenceMode.h>

extern "C" void *model_service_inference_mode_enter() {
  return new c10::InferenceMode(true);
}

extern "C" void model_service_inference_mode_exit(void *guard) {
  delete static_cast<c10::InferenceMode *>(guard);
}
