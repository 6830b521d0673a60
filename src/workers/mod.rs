//! The background entry points into the service: the listener (keyspace events, the request
//! stream, catch-up), the Kafka ingestion and the backfill.

pub mod backfill;
pub mod ingest;
pub mod listener;
