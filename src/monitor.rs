//! The periodic sampler: slot position, retained WAL and backlog from PostgreSQL, every `health.interval`.
//!
//! One cheap statement per tick on a connection of its own (never per event, so the hot path's statement
//! budget is untouched). It feeds the gauges behind `/metrics`, the `STATUS=` line sent to systemd and the
//! state `/readyz` reads, and runs the Prometheus recorder's upkeep. A missing or invalidated slot shows as
//! `walhook_slot_lost 1`; the source is what stops the daemon over it, with the recovery steps.

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::dispatch::Dispatcher;
use crate::health::Health;
use crate::store;

pub struct Monitor {
    pub db: crate::conninfo::ConnInfo,
    /// The replication slot to watch; `None` for sources without one (only the backlog is sampled).
    pub slot: Option<String>,
    pub interval: Duration,
    pub health: Arc<Health>,
    pub dispatcher: Arc<Dispatcher>,
    pub metrics: Option<PrometheusHandle>,
}

impl Monitor {
    pub async fn run(self, stop: CancellationToken) {
        let mut client: Option<tokio_postgres::Client> = None;
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_status = String::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Some(handle) = &self.metrics {
                handle.run_upkeep();
            }
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = store::connect_client(&self.db).await.ok();
            }
            if let Some(c) = &client {
                match store::slot_sample(c, self.slot.as_deref().unwrap_or("")).await {
                    Ok(sample) => {
                        let gauge = |name: &'static str, v: Option<u64>| {
                            if let Some(v) = v {
                                metrics::gauge!(name).set(v as f64);
                            }
                        };
                        if self.slot.is_some() {
                            gauge(crate::metrics::LAG_BYTES, sample.lag_bytes);
                            gauge(crate::metrics::RETAINED_WAL, sample.retained_bytes);
                            let lost = sample.wal_status.as_deref().is_none_or(|s| s == "lost");
                            let lost = if lost { 1.0 } else { 0.0 };
                            metrics::gauge!(crate::metrics::SLOT_LOST).set(lost);
                        }
                        metrics::gauge!(crate::metrics::PENDING).set(sample.pending as f64);
                        metrics::gauge!(crate::metrics::DEAD).set(sample.dead as f64);
                        self.health.set_sample(sample);
                    }
                    Err(e) => tracing::debug!("sampling the slot and backlog failed: {e}"),
                }
            }
            let line = crate::systemd::status_line(&self.health, self.dispatcher.in_flight());
            if line != last_status {
                crate::systemd::status(&line);
                last_status = line;
            }
        }
    }
}
