//! Inference: the model directory as a unit (catalog, the three TorchScript stages, the IVF index)
//! and the engine that serves it (bounded queue, batching workers, reload). Knows nothing of Redis
//! or HTTP.

pub mod catalog;
pub mod compiled;
pub mod device;
pub mod engine;
pub mod error;
pub mod exclusion;
pub mod experiment;
#[cfg(test)]
pub mod fake;
pub mod ivf;
pub mod lineup;
pub mod mode;
pub mod model_set;
pub mod models;
pub mod settings;
pub mod topk;
