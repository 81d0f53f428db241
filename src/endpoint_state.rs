//! Endpoint health, written back: `walhook.endpoint_state` (and so the `walhook.endpoint_health` view), and
//! endpoints disabled for cause.
//!
//! Breakers and counters live in memory on the hot path; this task copies the ones that changed to SQL every
//! couple of seconds in one statement, so health costs no write per delivery. It also disables endpoints:
//! at once after `410 Gone`, and when one has been failing continuously for `delivery.disable_after`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::dispatch::Disable;
use crate::fanout::EndpointCache;
use crate::store::{EndpointStateRow, Store};

const EVERY: Duration = Duration::from_secs(2);

pub struct EndpointStateWriter {
    pub db: tokio_postgres::Config,
    pub endpoints: Arc<EndpointCache>,
    pub disable_after: Duration,
    pub disable: mpsc::UnboundedReceiver<Disable>,
}

impl EndpointStateWriter {
    pub async fn run(mut self, stop: CancellationToken) {
        let mut store: Option<Store> = None;
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending: Vec<Disable> = Vec::new();
        let mut last_breakers: std::collections::HashMap<i64, &'static str> = Default::default();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                Some(d) = self.disable.recv() => {
                    pending.push(d);
                }
            }
            if store.as_ref().is_none_or(|s| s.is_closed()) {
                match Store::connect(&self.db).await {
                    Ok(s) => store = Some(s),
                    Err(e) => {
                        tracing::warn!("endpoint state writer cannot connect: {e}");
                        continue;
                    }
                }
            }
            let s = store.as_ref().expect("connected above");
            let now = SystemTime::now();
            let mut rows = Vec::new();
            let mut by_state = [("closed", 0u32), ("open", 0), ("half_open", 0)];
            for e in self.endpoints.snapshot().iter() {
                let breaker =
                    e.rt.limits
                        .lock()
                        .expect("never poisoned")
                        .breaker
                        .state()
                        .as_str();
                if let Some(slot) = by_state.iter_mut().find(|s| s.0 == breaker) {
                    slot.1 += 1;
                }
                let consecutive =
                    e.rt.limits
                        .lock()
                        .expect("never poisoned")
                        .breaker
                        .consecutive_failures();
                let mut health = e.rt.health.lock().expect("never poisoned");
                if let Some(since) = health.failing_since {
                    let failing_for = now.duration_since(since).unwrap_or_default();
                    if !self.disable_after.is_zero() && failing_for >= self.disable_after {
                        pending.push(Disable {
                            endpoint_id: e.id,
                            reason: format!(
                                "failing continuously since {} (longer than delivery.disable_after); last error: {}",
                                humantime::format_rfc3339_seconds(since),
                                health.last_error.as_deref().unwrap_or("unknown")
                            ),
                        });
                        health.failing_since = None;
                    }
                }
                if !health.dirty && last_breakers.get(&e.id) == Some(&breaker) {
                    continue;
                }
                health.dirty = false;
                last_breakers.insert(e.id, breaker);
                let (ok, failed) = health.last_hour(now);
                rows.push(EndpointStateRow {
                    endpoint_id: e.id,
                    breaker,
                    consecutive_failures: consecutive.min(i32::MAX as u32) as i32,
                    failing_since: health.failing_since,
                    last_success_at: health.last_success_at,
                    last_failure_at: health.last_failure_at,
                    last_status_code: health.last_status_code,
                    last_error: health.last_error.clone(),
                    successes_1h: ok as i64,
                    failures_1h: failed as i64,
                });
            }
            for (state, n) in by_state {
                metrics::gauge!(crate::metrics::BREAKERS, "state" => state).set(n as f64);
            }
            let mut failed = false;
            if !rows.is_empty() {
                if let Err(e) = s.write_endpoint_state(&rows).await {
                    tracing::warn!("writing endpoint state failed: {e}");
                    failed = true;
                }
            }
            for d in std::mem::take(&mut pending) {
                tracing::warn!(
                    endpoint_id = d.endpoint_id,
                    "disabling endpoint: {}",
                    d.reason
                );
                if let Err(e) = s.disable_endpoint(d.endpoint_id, &d.reason).await {
                    tracing::warn!("disabling endpoint {} failed: {e}", d.endpoint_id);
                    pending.push(d);
                    failed = true;
                    break;
                }
            }
            if failed {
                store = None;
            }
        }
    }
}
