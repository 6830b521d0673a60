//! The Redis layer: key names, profile parsing, the request-path store, listener primitives, the
//! request stream and the append of ingested behaviour events. It knows nothing of models or HTTP.

pub mod ingest;
pub mod keys;
mod listen;
pub mod profile;
pub mod store;
pub mod stream;

pub use store::Store;
