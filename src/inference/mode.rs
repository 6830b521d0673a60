//! libtorch's inference mode (`c10::InferenceMode`), which tch does not expose: grad off, and
//! operators skip autograd's view tracking and version counters. Tensors made inside it are
//! inference tensors and may not be used later with autograd; the cascade's tensors live only
//! for one batch. The guard is compiled from src/inference_mode.cpp by build.rs.

use std::ffi::c_void;
use std::marker::PhantomData;

extern "C" {
    fn model_service_inference_mode_enter() -> *mut c_void;
    fn model_service_inference_mode_exit(guard: *mut c_void);
}

/// Inference mode on the current thread until dropped (it is thread-local in libtorch, so the
/// guard cannot move to another thread).
pub struct InferenceMode {
    guard: *mut c_void,
    _not_send: PhantomData<*mut ()>,
}

impl InferenceMode {
    pub fn enter() -> Self {
        // SAFETY: allocates a c10::InferenceMode, which only saves and sets thread-local state.
        Self { guard: unsafe { model_service_inference_mode_enter() }, _not_send: PhantomData }
    }
}

impl Drop for InferenceMode {
    fn drop(&mut self) {
        // SAFETY: `guard` came from enter on this thread (the type is not Send) and is freed once.
        unsafe { model_service_inference_mode_exit(self.guard) }
    }
}

#[cfg(test)]
mod tests {
    use super::InferenceMode;
    use tch::Tensor;

    #[test]
    fn tensors_made_inside_are_inference_tensors_and_the_mode_ends_with_the_guard() {
        let before = Tensor::from_slice(&[1.0f32, 2.0]);
        {
            let _mode = InferenceMode::enter();
            let inside = &before * 2.0;
            assert!(inside.is_inference());
            assert_eq!(Vec::<f32>::try_from(&inside).unwrap(), vec![2.0, 4.0]);
        }
        assert!(!(&before * 2.0).is_inference());
    }
}
