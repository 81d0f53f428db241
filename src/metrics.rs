//! Metric names, described once. Prometheus conventions: `walhook_` prefix, `_total` counters, base units.
//!
//! Labels stay bounded whatever the number of endpoints: outcomes and phases only, never endpoint ids.

pub const EVENTS_RECEIVED: &str = "walhook_events_received_total";
pub const DELIVERIES: &str = "walhook_deliveries_total";
pub const ATTEMPT_DURATION: &str = "walhook_attempt_duration_seconds";
pub const RECORD_BATCHES: &str = "walhook_record_batches_total";
pub const RECORD_ROWS: &str = "walhook_record_rows_total";
pub const PARKED: &str = "walhook_deliveries_parked_total";
pub const RECONNECTS: &str = "walhook_source_reconnects_total";

/// Registers descriptions with whatever recorder is installed (none by default: the calls are no-ops).
pub fn describe() {
    metrics::describe_counter!(
        EVENTS_RECEIVED,
        "committed outbox events read from the source"
    );
    metrics::describe_counter!(
        DELIVERIES,
        "delivery attempts by outcome (delivered, retry, dead)"
    );
    metrics::describe_histogram!(
        ATTEMPT_DURATION,
        metrics::Unit::Seconds,
        "duration of HTTP attempts"
    );
    metrics::describe_counter!(RECORD_BATCHES, "batched writes of delivery outcomes");
    metrics::describe_counter!(RECORD_ROWS, "delivery outcomes written");
    metrics::describe_counter!(
        PARKED,
        "deliveries parked as pending because their endpoint was saturated"
    );
    metrics::describe_counter!(RECONNECTS, "source sessions restarted after an error");
}
