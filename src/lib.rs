//! model-service: reads `user_profile:<id>` from Redis, ranks the catalog with
//! LightGCN -> DIN -> RankNet (TorchScript via libtorch), writes `recommendations:<id>`.
//! The binary (src/main.rs) runs the modes; the library is what it, the tests and the fuzz
//! targets share. README's "Architecture" section draws the units and their walls.

pub mod api;
pub mod app;
pub mod clock;
pub mod config;
pub mod error;
pub mod impressions;
pub mod inference;
pub mod kafka;
pub mod logging;
pub mod metrics;
pub mod redis;
pub mod service;
pub mod webhook;
pub mod workers;
