//! model-service: reads `user_profile:<id>` from Redis, ranks the catalog with
//! LightGCN -> DIN -> RankNet (TorchScript via libtorch), writes `recommendations:<id>`.
//! The binary (src/main.rs) runs the modes; the library is what it and the fuzz targets share.

pub mod app;
pub mod backfill;
pub mod catalog;
pub mod clock;
pub mod config;
pub mod docs;
pub mod engine;
pub mod error;
pub mod http;
pub mod inference_mode;
pub mod ingest;
pub mod ivf;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod model_set;
pub mod models;
pub mod redis;
pub mod server;
pub mod service;
pub mod webhook;
