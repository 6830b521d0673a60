//! The Redis layer: key names, profile parsing, the request-path store, listener primitives, the
//! request stream, the append of ingested behaviour events and the topology (one node, a cluster,
//! or Sentinel). It knows nothing of models or HTTP.

pub mod append;
pub mod error;
pub mod filters;
pub mod ingest;
pub mod keys;
pub mod listen;
pub mod profile;
pub mod settings;
pub mod store;
pub mod stream;
pub mod topology;

pub use error::Error;
pub use store::Store;
