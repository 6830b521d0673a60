//! Every Prometheus metric, named once, in one registry with the `model_service_` prefix.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

const PREFIX: &str = "model_service";

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub stage_duration: HistogramVec,
    pub stage_candidates: HistogramVec,
    pub unknown_items: IntCounter,
    pub cold_starts: IntCounter,
    pub single_flight_shared: IntCounter,
    pub writes_superseded: IntCounter,
    pub cache_answers: IntCounterVec,
    pub recommendations: IntCounterVec,
    pub shadow: IntCounterVec,
    pub shadow_overlap: Histogram,
    pub scan_skipped_keys: IntCounter,
    pub batch_size: Histogram,
    pub queue_depth: IntGauge,
    pub queue_wait: Histogram,
    pub inference_cpu: prometheus::Counter,
    pub jobs_abandoned: IntCounter,
    pub listener_events: IntCounterVec,
    pub listener_lag: HistogramVec,
    pub listener_pending: IntGauge,
    pub listener_queue: IntGauge,
    pub reloads: IntCounterVec,
    pub ingest_events: IntCounterVec,
    pub ingest_unknown_items: IntCounter,
    pub ingest_consumer_lag: IntGaugeVec,
    pub ingest_freshness: Histogram,
    pub ingest_assigned_partitions: IntGauge,
    pub webhook_deliveries: IntCounterVec,
    pub webhook_attempt_duration: HistogramVec,
    pub webhook_queue: IntGauge,
    pub impressions: IntCounterVec,
    pub impressions_queue_depth: IntGauge,
    pub ingest_dead_letter_failures: IntCounterVec,
    pub ingest_dead_letter_failing: IntGauge,
    pub ingest_dead_letter_fallbacks: IntCounterVec,
    pub filtered_items: IntCounterVec,
    pub exclude_unknown_items: IntCounter,
    pub unavailable_items: IntGauge,
    pub unavailable_age: Gauge,
    pub unavailable_refresh_failures: IntCounterVec,
    pub unavailable_recomputes: IntCounter,
    model_info: IntGaugeVec,
}

const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some(PREFIX.into()), None).expect("registry");
        let http_requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests by route and status code"),
            &["route", "status"],
        )
        .expect("metric");
        let http_duration = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP request latency by route")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("metric");
        let stage_duration = HistogramVec::new(
            HistogramOpts::new(
                "stage_duration_seconds",
                "Latency of one pipeline stage (redis_read, lightgcn, din, ranknet, redis_write) by variant",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["stage", "variant"],
        )
        .expect("metric");
        let stage_candidates = HistogramVec::new(
            HistogramOpts::new("stage_candidates", "Items a stage hands on per request (lightgcn, din, ranknet)")
                .buckets(vec![1.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0]),
            &["stage"],
        )
        .expect("metric");
        let unknown_items =
            IntCounter::new("unknown_items_total", "Profile entries skipped because they are not in the catalog")
                .expect("metric");
        let single_flight_shared = IntCounter::new(
            "single_flight_shared_total",
            "Requests answered with the result of a computation already in flight for the same profile value, k and model version",
        )
        .expect("metric");
        let writes_superseded = IntCounter::new(
            "writes_superseded_total",
            "Computed lists not written because the profile changed while they were computed",
        )
        .expect("metric");
        let recommendations = IntCounterVec::new(
            Opts::new(
                "recommendations_total",
                "Recommendation requests by variant and outcome: computed, cache (a stored list served), error",
            ),
            &["variant", "outcome"],
        )
        .expect("metric");
        let shadow = IntCounterVec::new(
            Opts::new(
                "shadow_total",
                "Shadow computations by outcome: computed, dropped_full (its queue was full), late (waited past the \
                 request deadline), failed",
            ),
            &["outcome"],
        )
        .expect("metric");
        let shadow_overlap = Histogram::with_opts(
            HistogramOpts::new(
                "shadow_overlap_ratio",
                "Share of the served list's items that the shadow set's list of the same length also holds (overlap@k)",
            )
            .buckets(vec![0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]),
        )
        .expect("metric");
        let cache_answers = IntCounterVec::new(
            Opts::new("cache_answers_total", "Cache-first reads (GET /recommendations) by outcome: hit or miss"),
            &["outcome"],
        )
        .expect("metric");
        let scan_skipped_keys = IntCounter::new(
            "scan_skipped_keys_total",
            "Profile keys skipped by catch-up and backfill scans because their name is not UTF-8",
        )
        .expect("metric");
        let cold_starts =
            IntCounter::new("cold_starts_total", "Requests answered with the popular list (no usable history)")
                .expect("metric");
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("inference_batch_size", "Requests run together in one inference batch")
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
        )
        .expect("metric");
        let queue_depth =
            IntGauge::new("inference_queue_depth", "Requests waiting for an inference worker").expect("metric");
        let queue_wait = Histogram::with_opts(
            HistogramOpts::new("inference_queue_wait_seconds", "Time a request waited for an inference worker")
                .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("metric");
        let inference_cpu = prometheus::Counter::new(
            "inference_cpu_seconds_total",
            "CPU time the inference workers' threads spent ranking batches (the three stages and the \
             candidate selection)",
        )
        .expect("metric");
        let jobs_abandoned = IntCounter::new(
            "inference_abandoned_total",
            "Queued requests not ranked because their caller had gone (client disconnected or timed out)",
        )
        .expect("metric");
        let listener_events = IntCounterVec::new(
            Opts::new(
                "listener_events_total",
                "Listener events by source (keyspace, stream, catchup) and outcome \
                 (received, processed, skipped, failed, dead_lettered, dropped)",
            ),
            &["source", "outcome"],
        )
        .expect("metric");
        let listener_lag = HistogramVec::new(
            HistogramOpts::new(
                "listener_lag_seconds",
                "From the profile write (or stream entry) to the written recommendations",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
            &["source"],
        )
        .expect("metric");
        let listener_pending = IntGauge::new(
            "listener_pending_entries",
            "Request-stream entries delivered to the group and not acknowledged",
        )
        .expect("metric");
        let listener_queue =
            IntGauge::new("listener_queue_users", "Users waiting in the listener's coalescing queue").expect("metric");
        let reloads = IntCounterVec::new(
            Opts::new("model_reloads_total", "Model reloads by outcome (success, refused)"),
            &["outcome"],
        )
        .expect("metric");
        let ingest_events = IntCounterVec::new(
            Opts::new(
                "ingest_events_total",
                "Kafka behaviour events by outcome (received, applied, duplicate, ignored, dead_lettered, retried)",
            ),
            &["outcome"],
        )
        .expect("metric");
        let ingest_unknown_items = IntCounter::new(
            "ingest_unknown_items_total",
            "Applied events whose item is not in the catalog (kept in the profile; skipped by the models)",
        )
        .expect("metric");
        let ingest_consumer_lag = IntGaugeVec::new(
            Opts::new("ingest_consumer_lag", "Events in a partition after the group's committed offset"),
            &["topic", "partition"],
        )
        .expect("metric");
        let ingest_freshness = Histogram::with_opts(
            HistogramOpts::new(
                "ingest_freshness_seconds",
                "From an applied event's timestamp to its user's recommendations written from the new profile",
            )
            .buckets(vec![
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
        )
        .expect("metric");
        let ingest_assigned_partitions =
            IntGauge::new("ingest_assigned_partitions", "Partitions of the topic assigned to this consumer")
                .expect("metric");
        let webhook_deliveries = IntCounterVec::new(
            Opts::new(
                "webhook_deliveries_total",
                "Webhooks by outcome: delivered, retried (an attempt failed and another follows), dead_lettered, \
                 dropped (queue full or shutting down), lost (the dead letter itself could not be written)",
            ),
            &["outcome"],
        )
        .expect("metric");
        // exported at 0 from the start (alerts and rate() see the series before the first webhook)
        for outcome in ["delivered", "retried", "dead_lettered", "dropped", "lost"] {
            webhook_deliveries.with_label_values(&[outcome]);
        }
        let webhook_attempt_duration = HistogramVec::new(
            HistogramOpts::new(
                "webhook_attempt_duration_seconds",
                "One webhook POST, by result: 2xx, 3xx, 4xx, 5xx, timeout, connect, error",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            &["result"],
        )
        .expect("metric");
        let webhook_queue = IntGauge::new(
            "webhook_queue_depth",
            "Webhooks accepted and not yet delivered or dead-lettered (queued, in flight or waiting to retry)",
        )
        .expect("metric");
        let impressions = IntCounterVec::new(
            Opts::new(
                "impressions_total",
                "Impressions (lists served, shadow lists computed) by outcome: written to the sink, \
                 dropped_full (IMPRESSIONS_BUFFER full), dropped_sink (the sink failed)",
            ),
            &["outcome"],
        )
        .expect("metric");
        for outcome in ["written", "dropped_full", "dropped_sink"] {
            impressions.with_label_values(&[outcome]);
        }
        let impressions_queue_depth =
            IntGauge::new("impressions_queue_depth", "Impressions waiting for the sink").expect("metric");
        let ingest_dead_letter_failures = IntCounterVec::new(
            Opts::new(
                "ingest_dead_letter_failures_total",
                "Sends to the dead-letter topic that failed, by reason (unknown_topic, message_too_large, \
                 authorization, invalid_record: not retried; transient: retried up to 3 times)",
            ),
            &["reason"],
        )
        .expect("metric");
        let ingest_dead_letter_failing = IntGauge::new(
            "ingest_dead_letter_failing",
            "1 while the last send to the dead-letter topic failed (events go to the dead-letter file), else 0",
        )
        .expect("metric");
        let ingest_dead_letter_fallbacks = IntCounterVec::new(
            Opts::new(
                "ingest_dead_letter_fallbacks_total",
                "Dead letters the topic did not take, by where they went: file (INGEST_DEAD_LETTER_FILE) \
                 or log (no file, or writing it failed: only an ERROR log line)",
            ),
            &["to"],
        )
        .expect("metric");
        // exported from the start (at 0), so that an alert's increase() sees the first one
        for to in ["file", "log"] {
            ingest_dead_letter_fallbacks.with_label_values(&[to]);
        }
        let filtered_items = IntCounterVec::new(
            Opts::new(
                "filtered_items_total",
                "Items kept out of answers and stored lists, by source: unavailable (items:unavailable) or \
                 excluded (a request's exclude)",
            ),
            &["source"],
        )
        .expect("metric");
        for source in ["unavailable", "excluded"] {
            filtered_items.with_label_values(&[source]);
        }
        let exclude_unknown_items = IntCounter::new(
            "exclude_unknown_items_total",
            "Ids of a request's exclude that are not in the catalog (ignored)",
        )
        .expect("metric");
        let unavailable_items =
            IntGauge::new("unavailable_items", "Items in the cached set of unavailable items").expect("metric");
        let unavailable_age = Gauge::new(
            "unavailable_set_age_seconds",
            "Age of the cached set of unavailable items (since it was last read good from Redis)",
        )
        .expect("metric");
        let unavailable_refresh_failures = IntCounterVec::new(
            Opts::new(
                "unavailable_refresh_failures_total",
                "Reads of items:unavailable that kept the last good set, by reason: wrong_type, too_large, redis",
            ),
            &["reason"],
        )
        .expect("metric");
        for reason in ["wrong_type", "too_large", "redis"] {
            unavailable_refresh_failures.with_label_values(&[reason]);
        }
        let unavailable_recomputes = IntCounter::new(
            "unavailable_recomputes_total",
            "Stored lists recomputed because they held an item that became unavailable",
        )
        .expect("metric");
        let model_info = IntGaugeVec::new(
            Opts::new("model_info", "Models in service by variant (and shadow set), value 1"),
            &["variant", "version", "device", "lightgcn", "din", "ranknet"],
        )
        .expect("metric");
        for m in [
            Box::new(http_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(http_duration.clone()),
            Box::new(stage_duration.clone()),
            Box::new(stage_candidates.clone()),
            Box::new(unknown_items.clone()),
            Box::new(cold_starts.clone()),
            Box::new(single_flight_shared.clone()),
            Box::new(writes_superseded.clone()),
            Box::new(cache_answers.clone()),
            Box::new(recommendations.clone()),
            Box::new(shadow.clone()),
            Box::new(shadow_overlap.clone()),
            Box::new(scan_skipped_keys.clone()),
            Box::new(batch_size.clone()),
            Box::new(queue_depth.clone()),
            Box::new(queue_wait.clone()),
            Box::new(inference_cpu.clone()),
            Box::new(jobs_abandoned.clone()),
            Box::new(listener_events.clone()),
            Box::new(listener_lag.clone()),
            Box::new(listener_pending.clone()),
            Box::new(listener_queue.clone()),
            Box::new(reloads.clone()),
            Box::new(ingest_events.clone()),
            Box::new(ingest_unknown_items.clone()),
            Box::new(ingest_consumer_lag.clone()),
            Box::new(ingest_freshness.clone()),
            Box::new(ingest_assigned_partitions.clone()),
            Box::new(webhook_deliveries.clone()),
            Box::new(webhook_attempt_duration.clone()),
            Box::new(webhook_queue.clone()),
            Box::new(impressions.clone()),
            Box::new(impressions_queue_depth.clone()),
            Box::new(ingest_dead_letter_failures.clone()),
            Box::new(ingest_dead_letter_failing.clone()),
            Box::new(ingest_dead_letter_fallbacks.clone()),
            Box::new(filtered_items.clone()),
            Box::new(exclude_unknown_items.clone()),
            Box::new(unavailable_items.clone()),
            Box::new(unavailable_age.clone()),
            Box::new(unavailable_refresh_failures.clone()),
            Box::new(unavailable_recomputes.clone()),
            Box::new(model_info.clone()),
        ] {
            registry.register(m).expect("metric registered once");
        }
        Self {
            registry,
            http_requests,
            http_duration,
            stage_duration,
            stage_candidates,
            unknown_items,
            cold_starts,
            single_flight_shared,
            writes_superseded,
            cache_answers,
            recommendations,
            shadow,
            shadow_overlap,
            scan_skipped_keys,
            batch_size,
            queue_depth,
            queue_wait,
            inference_cpu,
            jobs_abandoned,
            listener_events,
            listener_lag,
            listener_pending,
            listener_queue,
            reloads,
            ingest_events,
            ingest_unknown_items,
            ingest_consumer_lag,
            ingest_freshness,
            ingest_assigned_partitions,
            webhook_deliveries,
            webhook_attempt_duration,
            webhook_queue,
            impressions,
            impressions_queue_depth,
            ingest_dead_letter_failures,
            ingest_dead_letter_failing,
            ingest_dead_letter_fallbacks,
            filtered_items,
            exclude_unknown_items,
            unavailable_items,
            unavailable_age,
            unavailable_refresh_failures,
            unavailable_recomputes,
            model_info,
        }
    }

    /// `model_info`: the sets in service, one row of labels each: variant (or shadow set),
    /// version, device, and the stages' versions (lightgcn, din, ranknet).
    pub fn set_model_info(&self, sets: &[[&str; 6]]) {
        self.model_info.reset();
        for labels in sets {
            self.model_info.with_label_values(labels).set(1);
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
