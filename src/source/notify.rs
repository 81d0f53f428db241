//! The notify source: claims unprocessed `walhook.outbox` rows under a lease, for servers without logical
//! replication (DESIGN.md, "source").
//!
//! Polling alone is correct: the source claims the oldest committed rows that are neither processed nor
//! leased, `FOR UPDATE SKIP LOCKED`, so several daemons share the work. Rows commit out of id order, so there
//! is no cursor: every claim looks at all unprocessed rows (through a partial index), and a rolled-back insert
//! is never visible to it. A statement trigger's `NOTIFY` only wakes the poller early.
//!
//! The interval adapts: `notify.poll_interval` while rows keep coming, then, while the listener is up and the
//! trigger exists, doubling with every empty poll up to `notify.max_poll_interval`, so an idle outbox costs a
//! few index probes a minute. Without a listener or without the trigger nothing would wake a backed-off
//! poller, so it stays at `notify.poll_interval`. Rows whose lease lapsed (their daemon died) are found by the
//! next poll.
//!
//! A claimed row goes through the same fan-out as a streamed event and is marked processed by the statement
//! that records its last delivery (ack after record, in one transaction); rows that matched no endpoint are
//! marked in batches of their own. Leases of rows still in flight are renewed, so
//! they lapse only when their daemon is gone; whoever claims such a row again skips the endpoints it already
//! has deliveries for. Duplicates are limited to what was in flight at a crash, as with the slot.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::ack::{AckTarget, Marks};
use super::{Pipeline, SourceError};
use crate::event::Event;
use crate::store::{self, OutboxQueue, StoreError};

pub struct NotifySource {
    pub db: crate::conninfo::ConnInfo,
    pub poll_interval: Duration,
    pub max_poll_interval: Duration,
    /// `notify.wake_trigger`: create the `outbox_wake` trigger (or drop it when false).
    pub wake_trigger: bool,
    pub batch_size: usize,
    pub lease: Duration,
    /// `replication.slot`: a slot of that name left behind by `source = "replication"` retains WAL forever.
    pub replication_slot: String,
    pub pipeline: Arc<Pipeline>,
}

impl NotifySource {
    /// Checks the schema and creates the unprocessed-rows index and the wake-up trigger if missing. Fails with
    /// a clear message when the schema is old or the role may not create them.
    pub async fn prepare(&self) -> Result<(), SourceError> {
        let client = store::connect_client(&self.db)
            .await
            .map_err(|e| SourceError::Transient(e.to_string()))?;
        store::check_schema(&client).await?;
        if let Some(slot) = store::publishing_slot(&client).await? {
            // walhook.publish() writes messages while this slot exists, and only the slot can read them
            return Err(SourceError::Fatal(format!(
                "replication slot {slot:?}, which source = \"replication\" created, still exists: while it \
                 does, walhook.publish() writes events as logical decoding messages that only the replication \
                 source streams, so this source would never deliver them. Run source = \"replication\" again, \
                 or, to stay with source = \"notify\", drop the slot once its events are delivered: SELECT \
                 pg_drop_replication_slot('{slot}')"
            )));
        }
        if store::replication_slot_exists(&client, &self.replication_slot).await? {
            tracing::warn!(
                slot = %self.replication_slot,
                "a replication slot left by source = \"replication\" retains WAL while unused; if it is no \
                 longer needed, drop it with: select pg_drop_replication_slot('{}')",
                self.replication_slot
            );
        }
        drop(client);
        let installed = store::install_notify(&self.db, self.wake_trigger)
            .await
            .map_err(|e| match e {
                StoreError::Db(ref db) if db.code().is_some_and(|c| c.code() == "42501") => {
                    SourceError::Fatal(store::notify_owner_message(
                        &crate::pgerror::facts(db),
                        self.wake_trigger,
                    ))
                }
                e => classify(e),
            })?;
        if installed.index {
            tracing::info!("created index walhook.outbox_unprocessed");
        }
        if installed.keys_index {
            tracing::info!("created index walhook.outbox_unprocessed_keys");
        }
        if let Some(why) = &installed.keys_index_refused {
            tracing::warn!(
                "cannot create index walhook.outbox_unprocessed_keys: {why}; ordered endpoints' deliveries \
                 read more of the outbox per claim until the owner of walhook.outbox runs (on its own, not in \
                 a transaction block): {}",
                store::notify_keys_index_sql()
            );
        }
        if installed.trigger {
            tracing::info!("created trigger outbox_wake on walhook.outbox");
        }
        if installed.trigger_dropped {
            tracing::info!(
                "dropped trigger outbox_wake on walhook.outbox (notify.wake_trigger = false): new rows wait \
                 up to notify.poll_interval"
            );
        }
        Ok(())
    }

    /// Claims and fans out rows until `stop` fires, then waits until the rows in flight are recorded and
    /// marked (or until the caller drops this future). Returns a fatal error.
    pub async fn run(self, stop: CancellationToken) -> Result<(), SourceError> {
        let wake = Notify::new();
        let listening = AtomicBool::new(false);
        let mut poller = Poller {
            listening: &listening,
            marks: Arc::new(Marks::default()),
            held: HashSet::new(),
            unmarked: Vec::new(),
            queue: None,
            source: &self,
        };
        // the listener never ends by itself: it goes when the poller is done
        tokio::select! {
            r = poller.run(&stop, &wake) => r,
            _ = listen(&self.db, &wake, &listening) => unreachable!("the listener loops forever"),
        }
    }
}

/// Keeps a `LISTEN` connection up, reconnecting with backoff, and wakes the poller on notifications.
async fn listen(db: &crate::conninfo::ConnInfo, wake: &Notify, listening: &AtomicBool) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = tokio::time::Instant::now();
        match store::listen_outbox(db, wake, listening).await {
            Ok(()) => tracing::debug!("outbox listener connection ended, reconnecting"),
            Err(e) => tracing::warn!("outbox listener failed, reconnecting in {backoff:?}: {e}"),
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(100);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Errors worth another try: lost connections, and conflicts with other sessions (deadlock, lock timeout).
fn classify(e: StoreError) -> SourceError {
    match &e {
        StoreError::Db(db)
            if db
                .code()
                .is_some_and(|c| c.code().starts_with("40") || c.code() == "55P03") =>
        {
            SourceError::Transient(e.to_string())
        }
        _ => SourceError::from(e),
    }
}

/// The wait before the next poll, after one that claimed `claimed` rows: the shortest while rows come or
/// nothing could wake a longer wait, else twice the last, up to `longest`.
fn next_interval(
    last: Duration,
    claimed: usize,
    wakeable: bool,
    shortest: Duration,
    longest: Duration,
) -> Duration {
    if claimed > 0 || !wakeable {
        shortest
    } else {
        (last * 2).clamp(shortest, longest.max(shortest))
    }
}

struct Poller<'a> {
    source: &'a NotifySource,
    /// The listener is subscribed: a notification would wake the poller.
    listening: &'a AtomicBool,
    marks: Arc<Marks>,
    /// Rows claimed and not yet marked processed; their leases are renewed.
    held: HashSet<i64>,
    /// Rows ready to be marked (taken from `marks`) whose marking has not succeeded yet.
    unmarked: Vec<i64>,
    queue: Option<OutboxQueue>,
}

impl Poller<'_> {
    async fn run(&mut self, stop: &CancellationToken, wake: &Notify) -> Result<(), SourceError> {
        let budget = self.source.pipeline.budget.clone();
        let shortest = self.source.poll_interval;
        let longest = self.source.max_poll_interval.max(shortest);
        let mut idle = shortest;
        let mut next_poll = tokio::time::Instant::now() + idle;
        // leases are renewed by the clock, checked on every turn of the loop: while a backlog keeps claims
        // full the loop never waits below, and rows in flight to a slow endpoint must not lose their lease
        let mut renew = Renewal::new(self.source.lease);
        let mut backoff = Duration::from_millis(100);
        // `want`: rows may be waiting (a wake-up, a tick, or the last claim was full)
        let (mut want, mut draining) = (true, false);
        loop {
            if draining && self.held.is_empty() {
                return Ok(());
            }
            let claim_now = want && !draining && budget.available_permits() > 0;
            if claim_now {
                draining = stop.is_cancelled();
            } else {
                tokio::select! {
                    biased;
                    _ = stop.cancelled(), if !draining => draining = true,
                    _ = self.marks.wake.notified() => {}
                    _ = wake.notified() => want = true,
                    _ = tokio::time::sleep_until(next_poll) => want = true,
                    _ = tokio::time::sleep_until(renew.at) => {}
                    // the budget has room again (the permit goes straight back)
                    _ = budget.acquire(), if want && !draining => {}
                }
            }
            match self.step(&mut want, &mut renew, draining).await {
                Ok(claimed) => {
                    backoff = Duration::from_millis(100);
                    if let Some(n) = claimed {
                        let wakeable =
                            self.source.wake_trigger && self.listening.load(Ordering::Relaxed);
                        idle = next_interval(idle, n, wakeable, shortest, longest);
                        next_poll = tokio::time::Instant::now() + idle;
                    }
                }
                Err(SourceError::Fatal(m)) => return Err(SourceError::Fatal(m)),
                Err(SourceError::Transient(m)) => {
                    self.queue = None;
                    metrics::counter!(crate::metrics::RECONNECTS).increment(1);
                    tracing::warn!("notify source interrupted, retrying in {backoff:?}: {m}");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled(), if !draining => draining = true,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    want = true;
                }
            }
        }
    }

    /// Marks what is ready, renews leases when due, then claims and fans out if rows are wanted. Returns how
    /// many rows it claimed, `None` when it did not claim.
    async fn step(
        &mut self,
        want: &mut bool,
        renew: &mut Renewal,
        draining: bool,
    ) -> Result<Option<usize>, SourceError> {
        if self.queue.as_ref().is_none_or(|q| q.is_closed()) {
            self.queue = Some(
                OutboxQueue::connect(&self.source.db)
                    .await
                    .map_err(classify)?,
            );
        }
        let queue = self.queue.as_ref().expect("connected above");

        for id in self.marks.take_marked() {
            self.held.remove(&id);
        }
        self.unmarked.extend(self.marks.take());
        if !self.unmarked.is_empty() {
            queue
                .mark_processed(&self.unmarked)
                .await
                .map_err(classify)?;
            for id in self.unmarked.drain(..) {
                self.held.remove(&id);
            }
        }
        if renew.due(tokio::time::Instant::now()) {
            if !self.held.is_empty() {
                let ids: Vec<i64> = self.held.iter().copied().collect();
                queue
                    .renew(&ids, self.source.lease)
                    .await
                    .map_err(classify)?;
            }
            // only once done: a failed renewal is tried again on the next turn
            renew.done(tokio::time::Instant::now());
        }

        let budget = &self.source.pipeline.budget;
        let room = budget.available_permits().min(self.source.batch_size);
        if draining || !*want || room == 0 {
            return Ok(None);
        }
        let (rows, generation) = queue
            .claim(room as i64, self.source.lease)
            .await
            .map_err(classify)?;
        if let Some(generation) = generation {
            // an endpoint added, enabled or changed before these rows committed applies to them; waiting no
            // longer than half the leases' renewal period, so that none lapses meanwhile
            self.source
                .pipeline
                .endpoints_at(generation, self.source.lease / 6)
                .await;
        }
        // a full batch means more rows may be waiting: claim again as soon as there is room
        *want = rows.len() == room;
        let claimed = rows.len();
        metrics::counter!(crate::metrics::EVENTS_RECEIVED).increment(rows.len() as u64);
        for row in rows {
            let permit = budget
                .clone()
                .try_acquire_owned()
                .expect("claimed no more rows than the budget had room for");
            let recorded: HashSet<(i64, i64)> = row.recorded.iter().map(|e| (row.id, *e)).collect();
            let event = Event::new(
                row.id,
                &row.uid,
                &row.event_type,
                &row.created_at,
                &row.payload,
            )
            // no commit position here: a key's deliveries go in outbox id order
            .with_ordering(row.ordering_key, None)
            .with_traceparent(row.traceparent.as_deref())
            .with_tenant(row.tenant)
            .with_version(row.version);
            self.held.insert(row.id);
            let target = AckTarget::Row {
                marks: self.marks.clone(),
                id: row.id,
            };
            self.source
                .pipeline
                .fan_out(event, &recorded, target, permit);
        }
        Ok(Some(claimed))
    }
}

/// When the leases of held rows are renewed next: every third of the lease, so two renewals may fail or come
/// late before a row's lease lapses.
struct Renewal {
    every: Duration,
    at: tokio::time::Instant,
}

impl Renewal {
    fn new(lease: Duration) -> Renewal {
        let every = (lease / 3).max(Duration::from_millis(100));
        Renewal {
            every,
            at: tokio::time::Instant::now() + every,
        }
    }

    fn due(&self, now: tokio::time::Instant) -> bool {
        now >= self.at
    }

    fn done(&mut self, now: tokio::time::Instant) {
        self.at = now + self.every;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_polls_back_off_only_while_a_notification_can_wake_them() {
        let (short, long) = (Duration::from_millis(250), Duration::from_secs(5));
        let mut wait = short;
        let mut waits = Vec::new();
        for _ in 0..7 {
            wait = next_interval(wait, 0, true, short, long);
            waits.push(wait.as_millis());
        }
        assert_eq!(waits, [500, 1000, 2000, 4000, 5000, 5000, 5000]);
        assert_eq!(
            next_interval(wait, 3, true, short, long),
            short,
            "rows came"
        );
        assert_eq!(
            next_interval(wait, 0, false, short, long),
            short,
            "listener down or no trigger: nothing would wake a longer wait"
        );
        assert_eq!(
            next_interval(short, 0, true, Duration::from_secs(30), long),
            Duration::from_secs(30),
            "a maximum below the minimum is the minimum"
        );
    }
}
