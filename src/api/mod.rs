//! The HTTP API: routes and extractors, the HTTP/1 connection loop with its limits, the OpenAPI
//! document and the interactive docs.

pub mod docs;
pub mod error;
pub mod routes;
pub mod server;
pub mod settings;
