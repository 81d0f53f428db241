//! The retry scheduler: claims due `pending` deliveries and dispatches them again.
//!
//! Claims use `FOR UPDATE SKIP LOCKED` and move `next_attempt_at` past a lease, so several daemons share the
//! work without double-sending, and a claimer that dies simply lets its lease lapse (the delivery is due
//! again). The number of claimed jobs in flight is bounded by `scheduler.batch_size`; endpoints already at
//! their in-flight limit are left out of the claim instead of being claimed and parked again.
//!
//! A lease always outlasts the attempt it covers: it is at least the longest request timeout of any endpoint
//! plus `delivery.queue_wait` (the longest a claimed job waits in memory before it is parked) plus a margin,
//! whatever `scheduler.lease` says, so no delivery is attempted by two instances at once while one is live.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::dispatch::{Claim, Dispatcher, Job};
use crate::event::Event;
use crate::fanout::EndpointCache;
use crate::record::{Outcome, Recorder};
use crate::store::{AttemptRow, RecordRow, Status, Store};

/// What a lease adds to the longest attempt: time to record its outcome.
const LEASE_MARGIN: Duration = Duration::from_secs(5);
/// Waits after a failed connection or claim, doubling up to the maximum.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The longest a claim waits for the endpoint cache to reflect the rows it was claimed under.
const CATCH_UP: Duration = Duration::from_secs(5);
/// Pause between claims while a backlog lasts.
const BACKLOG_PAUSE: Duration = Duration::from_millis(10);

pub struct Scheduler {
    /// Woken when ordered deliveries were recorded (the next of their key may be due now).
    pub wake: Arc<tokio::sync::Notify>,
    pub db: crate::conninfo::ConnInfo,
    pub poll_interval: Duration,
    pub batch_size: usize,
    pub lease: Duration,
    /// `delivery.timeout` plus `delivery.queue_wait`: how long a claimed job may take before its outcome,
    /// for endpoints without a timeout of their own.
    pub attempt_bound: Duration,
    /// `delivery.queue_wait`, added to endpoints' own timeouts.
    pub queue_wait: Duration,
    /// The notify source: a key's head also waits for its older outbox rows that are not processed yet.
    pub ordered_by_outbox: bool,
    pub endpoints: Arc<EndpointCache>,
    pub dispatcher: Arc<Dispatcher>,
    pub recorder: Recorder,
}

impl Scheduler {
    pub async fn run(self, stop: CancellationToken) {
        let budget = Arc::new(Semaphore::new(self.batch_size.max(1)));
        let mut store: Option<Store> = None;
        let mut tick = tokio::time::interval(self.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backlog = false;
        // the last claim took every free permit of the budget: claim again as soon as half is free
        let mut budget_bound = false;
        let mut round = 0usize;
        let mut hungry: std::collections::HashSet<i64> = Default::default();
        let mut backoff = MIN_BACKOFF;
        loop {
            // with a backlog (the last claim filled the budget or an endpoint's share), claim again soon:
            // as soon as half the budget is free (when the budget was what limited it), or after a short pause
            // for endpoints to make room
            let half = (self.batch_size / 2).max(1) as u32;
            let ticked = tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => true,
                _ = self.wake.notified() => true,
                _ = tokio::time::sleep(BACKLOG_PAUSE), if backlog => false,
                Ok(p) = budget.clone().acquire_many_owned(half), if budget_bound => {
                    drop(p);
                    false
                }
            };
            let room = budget.available_permits();
            if room == 0 {
                continue;
            }
            if self.recorder.is_failing() {
                // outcomes cannot be recorded now: sending more would only send them again later
                (backlog, budget_bound) = (false, false);
                continue;
            }
            if store.as_ref().is_none_or(|s| s.is_closed()) {
                match Store::connect(&self.db).await {
                    Ok(s) => store = Some(s),
                    Err(e) => {
                        tracing::warn!("scheduler cannot connect, retrying in {backoff:?}: {e}");
                        (backlog, budget_bound) = (false, false);
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                }
            }
            let s = store.as_ref().expect("connected above");
            // what each endpoint accepts now (in-flight room, breaker, rate limit): the claim takes no more,
            // so nothing claimed is parked straight back; the order rotates so no endpoint starves the rest
            let snapshot = self.endpoints.snapshot();
            let mut open: Vec<(i64, i32, bool)> = Vec::new();
            for e in snapshot.iter() {
                match self.dispatcher.room(e, 2) {
                    0 => {}
                    r => open.push((e.id, r.min(i32::MAX as usize) as i32, e.policy.ordered)),
                }
            }
            if !open.is_empty() {
                let turn = round % open.len();
                open.rotate_left(turn);
            }
            round = round.wrapping_add(1);
            // ordered keys exist only where an endpoint is (or was) ordered: look for their heads at those
            // endpoints, and at every endpoint with room at each tick (one index probe each when it has none)
            let (ordered_ids, ordered_caps): (Vec<i64>, Vec<i32>) = open
                .iter()
                .filter(|(_, _, ordered)| ticked || *ordered)
                .map(|(id, cap, _)| (*id, *cap))
                .unzip();
            // between ticks (a backlog's quick rounds) only the endpoints that had more than their share are
            // asked again: the others' due deliveries wait for the next tick, and an endpoint with a backlog but
            // no room (a slow one) costs no query at all until it has room again
            let (ids, caps): (Vec<i64>, Vec<i32>) = open
                .into_iter()
                .filter(|(id, _, ordered)| ticked || *ordered || hungry.contains(id))
                .map(|(id, cap, _)| (id, cap))
                .unzip();
            let longest = snapshot
                .iter()
                .filter_map(|e| e.policy.timeout)
                .map(|t| t + self.queue_wait)
                .fold(self.attempt_bound, Duration::max);
            let lease = self.lease.max(longest + LEASE_MARGIN);
            if ids.is_empty() {
                // every endpoint with claimed work is still busy with it: nothing to ask the database
                continue;
            }
            // the leases run from about now (the statement sets them with the server's clock)
            let claimed_at = std::time::Instant::now();
            let result = async {
                let mut c = if ordered_ids.is_empty() {
                    Vec::new()
                } else {
                    s.claim_ordered(
                        room as i64,
                        lease,
                        &ordered_ids,
                        &ordered_caps,
                        self.ordered_by_outbox,
                    )
                    .await?
                };
                // what each endpoint got of its share there is not claimed again below
                let mut taken: std::collections::HashMap<i64, i32> = Default::default();
                for x in &c {
                    *taken.entry(x.endpoint_id).or_default() += 1;
                }
                let (due_ids, due_caps): (Vec<i64>, Vec<i32>) = ids
                    .iter()
                    .zip(&caps)
                    .map(|(id, cap)| (*id, cap - taken.get(id).copied().unwrap_or(0)))
                    .filter(|(_, cap)| *cap > 0)
                    .unzip();
                let rest = room - c.len();
                if rest > 0 && !due_ids.is_empty() {
                    c.extend(s.claim_due(rest as i64, lease, &due_ids, &due_caps).await?);
                }
                Ok::<_, crate::store::StoreError>(c)
            }
            .await;
            let claimed = match result {
                Ok(c) => {
                    backoff = MIN_BACKOFF;
                    c
                }
                Err(e) => {
                    tracing::warn!("claiming due deliveries failed, retrying in {backoff:?}: {e}");
                    if e.is_connection() {
                        store = None;
                    }
                    (backlog, budget_bound) = (false, false);
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            // an endpoint whose share was filled probably has more due: stay in backlog mode until a claim
            // for it comes back short (while it is busy with what was claimed, it is skipped, not forgotten)
            for (id, cap) in ids.iter().zip(&caps) {
                if claimed.iter().filter(|c| c.endpoint_id == *id).count() >= *cap as usize {
                    hungry.insert(*id);
                } else {
                    hungry.remove(id);
                }
            }
            hungry.retain(|id| snapshot.iter().any(|e| e.id == *id));
            budget_bound = claimed.len() == room;
            backlog = budget_bound || !hungry.is_empty();
            // an endpoint row changed since the cache was loaded (re-enabled, resumed, fixed): judge what was
            // claimed by the new rows, not the old ones
            if let Some(generation) = claimed.iter().map(|c| c.endpoints_generation).max() {
                if !self.endpoints.catch_up(generation, CATCH_UP).await {
                    tracing::debug!(generation, "endpoint cache behind the claim");
                }
            }
            for c in claimed {
                let Some(endpoint) = self.endpoints.get(c.endpoint_id) else {
                    // disabled or deleted since the claim; the lease lapses and the row waits
                    continue;
                };
                let Some((event_type, payload, created_at)) = c.content else {
                    self.recorder.record(Outcome {
                        row: gone(&c),
                        ack: None,
                        claim: None,
                    });
                    continue;
                };
                let permit = budget
                    .clone()
                    .try_acquire_owned()
                    .expect("claimed no more than the free permits");
                let mut event = Event::new(c.event_id, &c.uid, &event_type, &created_at, &payload)
                    .with_ordering(c.ordering_key, c.commit_lsn)
                    .with_traceparent(c.traceparent.as_deref())
                    .with_tenant(c.tenant)
                    .with_version(c.version);
                event.in_outbox = c.in_outbox;
                let attempt = endpoint
                    .policy
                    .timeout
                    .unwrap_or(self.attempt_bound.saturating_sub(self.queue_wait));
                let start_by = claimed_at + lease.saturating_sub(attempt + LEASE_MARGIN);
                self.dispatcher.submit(Job {
                    event: Arc::new(event),
                    endpoint,
                    schedule_step: c.schedule_step,
                    ack: None,
                    claim: Some(Claim { permit, start_by }),
                });
            }
        }
    }
}

/// A due delivery whose event content no longer exists anywhere cannot be sent: it is dead, with the reason.
fn gone(c: &crate::store::Claimed) -> RecordRow {
    RecordRow {
        event_id: c.event_id,
        endpoint_id: c.endpoint_id,
        uid_hex: c.uid.replace('-', ""),
        status: Status::Dead,
        schedule_step: c.schedule_step,
        next_attempt_at: None,
        attempt: Some(AttemptRow {
            attempted_at: SystemTime::now(),
            duration_ms: 0,
            status_code: None,
            error: Some(
                "event content is gone: its outbox row was deleted before it was delivered".into(),
            ),
            response_body: None,
        }),
        copy: None,
        ordering: None,
        tenant: c.tenant.clone(),
    }
}
