//! The Redis layer: key names, profile parsing, the request-path store, listener primitives and the
//! request stream. It knows nothing of models or HTTP.

pub mod keys;
mod listen;
pub mod profile;
pub mod store;
pub mod stream;

pub use store::Store;
