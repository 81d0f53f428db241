//! Metric names, described once, and the Prometheus recorder behind `/metrics`.
//!
//! Prometheus conventions: `walhook_` prefix, `_total` counters, base units (`_seconds`, `_bytes`). Labels
//! stay bounded whatever the number of endpoints: outcomes, statuses and tables only, never endpoint or event
//! ids (per-endpoint numbers are one SQL query away: `walhook status`). The recorder is process-global (the
//! `metrics` facade allows one), so it is installed once and every daemon in the process shares it; without
//! it every `counter!`/`gauge!` call is a no-op.
//!
//! A series the recorder has never seen is absent from `/metrics`, and a dashboard shows "no data" rather
//! than 0 for a standby that never stood by or a counter that never moved. So [`register_all`] exports every
//! series at start, labelled ones with each of their label values, at zero.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const EVENTS_RECEIVED: &str = "walhook_events_received_total";
pub const DELIVERIES: &str = "walhook_deliveries_total";
pub const ATTEMPT_DURATION: &str = "walhook_attempt_duration_seconds";
pub const DELIVERY_LATENCY: &str = "walhook_delivery_latency_seconds";
pub const IN_FLIGHT: &str = "walhook_requests_in_flight";
pub const PENDING: &str = "walhook_pending_deliveries";
pub const DEAD: &str = "walhook_dead_deliveries";
pub const STREAMING: &str = "walhook_streaming";
pub const STANDBY: &str = "walhook_standby";
pub const LAG_BYTES: &str = "walhook_replication_lag_bytes";
pub const LAG_SECONDS: &str = "walhook_replication_lag_seconds";
pub const RETAINED_WAL: &str = "walhook_slot_retained_wal_bytes";
pub const SLOT_LOST: &str = "walhook_slot_lost";
pub const RECORD_BATCHES: &str = "walhook_record_batches_total";
pub const RECORD_ROWS: &str = "walhook_record_rows_total";
pub const PARKED: &str = "walhook_deliveries_parked_total";
pub const RECONNECTS: &str = "walhook_source_reconnects_total";
pub const RETENTION_DELETED: &str = "walhook_retention_deleted_rows_total";
pub const BREAKERS: &str = "walhook_circuit_breakers";
pub const SOURCE: &str = "walhook_source";
pub const TRACE_EXPORT_FAILURES: &str = "walhook_trace_export_failures_total";

/// Outcomes of `walhook_deliveries_total`: sent, to be retried, given up, disabled by a 410 Gone.
pub const OUTCOMES: &[&str] = &["delivered", "retry", "dead", "gone"];
/// States of `walhook_circuit_breakers`.
pub const BREAKER_STATES: &[&str] = &["closed", "open", "half_open"];
/// Values of `walhook_source`: 1 for the configured one.
pub const SOURCES: &[&str] = &["replication", "notify"];
/// Tables of `walhook_retention_deleted_rows_total`.
pub const RETENTION_TABLES: &[&str] = &["deliveries", "attempts", "outbox"];

/// Histogram buckets (seconds): HTTP attempts are bounded by `delivery.timeout`; commit-to-delivery latency
/// spans from milliseconds (streamed) to a day (the last retries of the default schedule).
const ATTEMPT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const LATENCY_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 7200.0, 21600.0,
    86400.0,
];

/// Installs the Prometheus recorder on first use and returns its handle; `None` when another recorder was
/// installed first (an embedding application's), in which case `/metrics` says so.
pub fn install() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(ATTEMPT_DURATION.into()), ATTEMPT_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(DELIVERY_LATENCY.into()),
                        LATENCY_BUCKETS,
                    )
                })
                .expect("bucket lists are non-empty constants")
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            Some(handle)
        })
        .clone()
}

/// Exports every series at zero, unless it already has a value (several daemons in one process share the
/// recorder: adding zero leaves theirs alone).
pub fn register_all() {
    use metrics::{counter, gauge, histogram};
    for name in [
        EVENTS_RECEIVED,
        PARKED,
        RECONNECTS,
        RECORD_BATCHES,
        RECORD_ROWS,
        TRACE_EXPORT_FAILURES,
    ] {
        counter!(name).increment(0);
    }
    for outcome in OUTCOMES {
        counter!(DELIVERIES, "outcome" => *outcome).increment(0);
    }
    for table in RETENTION_TABLES {
        counter!(RETENTION_DELETED, "table" => *table).increment(0);
    }
    for name in [
        IN_FLIGHT,
        PENDING,
        DEAD,
        STREAMING,
        STANDBY,
        LAG_BYTES,
        LAG_SECONDS,
        RETAINED_WAL,
        SLOT_LOST,
    ] {
        gauge!(name).increment(0.0);
    }
    for state in BREAKER_STATES {
        gauge!(BREAKERS, "state" => *state).increment(0.0);
    }
    for source in SOURCES {
        gauge!(SOURCE, "source" => *source).increment(0.0);
    }
    for name in [ATTEMPT_DURATION, DELIVERY_LATENCY] {
        // a handle registers the histogram; its buckets render with zero counts
        let _ = histogram!(name);
    }
}

/// Registers descriptions with whatever recorder is installed (none by default: the calls are no-ops).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        EVENTS_RECEIVED,
        "committed outbox events read from the source"
    );
    describe_counter!(
        DELIVERIES,
        "delivery attempts by outcome (delivered, retry, dead, gone)"
    );
    describe_histogram!(ATTEMPT_DURATION, Unit::Seconds, "duration of HTTP attempts");
    describe_histogram!(
        DELIVERY_LATENCY,
        Unit::Seconds,
        "time from the event's commit to its successful delivery"
    );
    describe_gauge!(IN_FLIGHT, "HTTP requests in flight");
    describe_gauge!(
        BREAKERS,
        "circuit breakers by state (closed, open, half_open), one per enabled destination"
    );
    describe_gauge!(PENDING, "deliveries waiting for a retry (sampled from SQL)");
    describe_gauge!(DEAD, "deliveries that gave up (sampled from SQL)");
    describe_gauge!(
        STREAMING,
        "1 while the replication stream is up, 0 otherwise (always 0 with source = notify)"
    );
    describe_gauge!(
        SOURCE,
        "1 for the configured source (replication or notify), 0 for the other"
    );
    describe_gauge!(
        STANDBY,
        "1 while another instance streams the slot and this one waits to take over"
    );
    describe_gauge!(
        LAG_BYTES,
        Unit::Bytes,
        "WAL written since the slot's confirmed position"
    );
    describe_gauge!(
        LAG_SECONDS,
        Unit::Seconds,
        "age of the oldest committed transaction read but not yet confirmed (0 when caught up)"
    );
    describe_gauge!(
        RETAINED_WAL,
        Unit::Bytes,
        "WAL the server keeps for the slot (from its restart position)"
    );
    describe_gauge!(
        SLOT_LOST,
        "1 when the replication slot is missing or invalidated (wal_status = lost)"
    );
    describe_counter!(RECORD_BATCHES, "batched writes of delivery outcomes");
    describe_counter!(RECORD_ROWS, "delivery outcomes written");
    describe_counter!(
        PARKED,
        "deliveries parked as pending because their endpoint was saturated"
    );
    describe_counter!(RECONNECTS, "source sessions restarted after an error");
    describe_counter!(
        TRACE_EXPORT_FAILURES,
        "batches of attempt spans that could not be exported to tracing.otlp_endpoint"
    );
    describe_counter!(RETENTION_DELETED, "rows removed by retention, by table");
}
