//! Endpoint health, shared through SQL: `walhook.endpoint_state` and `walhook.endpoint_stats` (and so the
//! `walhook.endpoint_health` view), and endpoints disabled for cause.
//!
//! Breakers and counters live in memory on the hot path; this task copies what changed to SQL every couple of
//! seconds, so health costs no write per delivery. SQL, not memory, is the authority between instances and
//! across restarts: each instance adopts a breaker change another one made after its own (an endpoint found
//! down by one instance is left alone by the others, and a successful probe anywhere reopens it everywhere),
//! attempt counts are added up from every instance, and the failing streak that `delivery.disable_after`
//! measures is merged in SQL, so a restart does not reset the clock. It also disables endpoints: at once
//! after `410 Gone`, and when one has been failing for longer than `delivery.disable_after`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::dispatch::limits::BreakerState;
use crate::dispatch::Disable;
use crate::fanout::EndpointCache;
use crate::store::{EndpointStateRow, StatsRow, Store};

const EVERY: Duration = Duration::from_secs(2);
/// How often old attempt counts are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

pub struct EndpointStateWriter {
    pub db: crate::conninfo::ConnInfo,
    pub endpoints: Arc<EndpointCache>,
    /// Zero turns automatic disabling off.
    pub disable_after: Duration,
    pub disable: mpsc::UnboundedReceiver<Disable>,
}

/// What the writer carries from one tick to the next.
#[derive(Default)]
struct Carried {
    /// 410 disables not yet written.
    disables: Vec<Disable>,
    /// Attempt counts taken from endpoints but not yet written.
    stats: Vec<StatsRow>,
    /// The breaker change last written per endpoint.
    written: HashMap<i64, SystemTime>,
    /// The newest breaker change read from SQL.
    seen: Option<SystemTime>,
    pruned: Option<Instant>,
}

impl EndpointStateWriter {
    pub async fn run(mut self, stop: CancellationToken) {
        let mut store: Option<Store> = None;
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut carried = Carried::default();
        let mut backoff = EVERY;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                Some(d) = self.disable.recv() => carried.disables.push(d),
            }
            if store.as_ref().is_none_or(|s| s.is_closed()) {
                match Store::connect(&self.db).await {
                    Ok(s) => {
                        store = Some(s);
                        backoff = EVERY;
                    }
                    Err(e) => {
                        tracing::warn!("endpoint state writer cannot connect: {e}");
                        // no reconnection storm when the server refuses connections
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        continue;
                    }
                }
            }
            let s = store.as_mut().expect("connected above");
            if let Err(e) = self.sync(s, &mut carried).await {
                tracing::warn!("writing endpoint state failed: {e}");
                if e.is_connection() {
                    store = None;
                }
            }
        }
    }

    /// One round: write what changed here, adopt what changed elsewhere, disable what must be.
    async fn sync(
        &self,
        store: &mut Store,
        carried: &mut Carried,
    ) -> Result<(), crate::store::StoreError> {
        let now = Instant::now();
        let snapshot = self.endpoints.snapshot();
        let mut rows = Vec::new();
        let mut by_state = [("closed", 0u32), ("open", 0), ("half_open", 0)];
        for e in snapshot.iter() {
            let (state, changed_at, open_until, consecutive) = {
                let limits = e.rt.limits.lock().expect("never poisoned");
                let b = &limits.breaker;
                (
                    b.state(),
                    b.changed_at(),
                    b.open_until_wall(now),
                    b.consecutive_failures(),
                )
            };
            if let Some(slot) = by_state.iter_mut().find(|s| s.0 == state.as_str()) {
                slot.1 += 1;
            }
            let mut health = e.rt.health.lock().expect("never poisoned");
            for (bucket, successes, failures) in health.unwritten.drain(..) {
                carried.stats.push(StatsRow {
                    endpoint_id: e.id,
                    bucket,
                    successes,
                    failures,
                });
            }
            let breaker_written = carried.written.get(&e.id) == Some(&changed_at);
            if !health.dirty && (breaker_written || changed_at == UNIX_EPOCH) {
                continue;
            }
            health.dirty = false;
            carried.written.insert(e.id, changed_at);
            rows.push(EndpointStateRow {
                endpoint_id: e.id,
                breaker: state.as_str(),
                open_until,
                breaker_changed_at: (changed_at != UNIX_EPOCH).then_some(changed_at),
                consecutive_failures: consecutive.min(i32::MAX as u32) as i32,
                failing_since: health.failing_since,
                last_success_at: health.last_success_at,
                last_failure_at: health.last_failure_at,
                last_status_code: health.last_status_code,
                last_error: health.last_error.clone(),
            });
        }
        for (state, n) in by_state {
            metrics::gauge!(crate::metrics::BREAKERS, "state" => state).set(n as f64);
        }
        if !rows.is_empty() || !carried.stats.is_empty() {
            if let Err(e) = store.write_endpoint_state(&rows, &carried.stats).await {
                // the rows are written again next time (their endpoints stay dirty), the counts are kept
                for r in &rows {
                    carried.written.remove(&r.endpoint_id);
                    if let Some(endpoint) = snapshot.iter().find(|x| x.id == r.endpoint_id) {
                        endpoint.rt.health.lock().expect("never poisoned").dirty = true;
                    }
                }
                return Err(e);
            }
            carried.stats.clear();
        }

        // breaker changes made by other instances (or by this one before a restart)
        let since = carried.seen.unwrap_or(UNIX_EPOCH);
        for shared in store.breakers_changed_since(since).await? {
            carried.seen = Some(
                carried
                    .seen
                    .map_or(shared.changed_at, |s| s.max(shared.changed_at)),
            );
            let (Some(endpoint), Some(state)) = (
                snapshot.iter().find(|e| e.id == shared.endpoint_id),
                BreakerState::parse(&shared.breaker),
            ) else {
                continue;
            };
            let adopted = endpoint
                .rt
                .limits
                .lock()
                .expect("never poisoned")
                .breaker
                .adopt(state, shared.open_until, shared.changed_at, Instant::now());
            if adopted {
                carried.written.insert(endpoint.id, shared.changed_at);
                tracing::info!(
                    endpoint_id = endpoint.id,
                    "circuit breaker {} by another instance (or before a restart): following it",
                    if state == BreakerState::Closed {
                        "closed"
                    } else {
                        "opened"
                    }
                );
            }
        }

        if !self.disable_after.is_zero() {
            for (id, reason) in store.disable_failing(self.disable_after).await? {
                tracing::warn!(endpoint_id = id, "disabling endpoint: {reason}");
            }
        }
        while let Some(d) = carried.disables.first() {
            tracing::warn!(
                endpoint_id = d.endpoint_id,
                "disabling endpoint: {}",
                d.reason
            );
            store.disable_endpoint(d.endpoint_id, &d.reason).await?;
            carried.disables.remove(0);
        }
        if carried.pruned.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            store.prune_endpoint_stats().await?;
            carried.pruned = Some(Instant::now());
        }
        Ok(())
    }
}
