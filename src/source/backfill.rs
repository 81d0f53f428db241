//! The first start's backfill: outbox rows committed before the replication slot existed, read under the
//! slot's exported snapshot and fanned out through the same pipeline as streamed events.
//!
//! The slot streams only what commits after its consistent point; the snapshot it exports sees exactly what
//! committed before, so the two split the outbox with nothing missed and nothing twice. Those rows used to be
//! inserted as pending deliveries in one statement, which the retry scheduler then claimed, sent and updated:
//! three writes and a claim round trip per delivery, a third of the streaming rate. Here they are read in
//! keyset pages (one page read ahead) and each event goes to dispatch as a streamed one would, under the same
//! events budget (`delivery.max_in_flight_events`), so memory stays bounded whatever the backlog, and its
//! outcome is recorded once.
//!
//! Crash safety: the slot is marked backfilled only once every delivery handed out here is recorded. A start
//! that finds it unmarked creates the slot again with a new snapshot and backfills again, skipping per
//! (event, endpoint) what the unfinished run recorded, as the stream's replay does. Deliveries recorded
//! before the slot was first set out to be created (another slot's, `walhook.recover`'s) keep the old rule:
//! an event that has any is left alone.
//!
//! Ordering: events carry no commit position, which parks an ordered endpoint's keyed events at position 0/0,
//! in id order among themselves and before every streamed event of the key (streaming starts only after the
//! backfill is recorded).

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::ack::{AckTarget, Tracker};
use super::{Pipeline, SourceError};
use crate::event::Event;
use crate::lsn::Lsn;
use crate::store::{self, OutboxRow, Store, StoreError};

/// Outbox rows read per round trip.
const PAGE: i64 = 1_000;
/// Pages read ahead of fan-out.
const READ_AHEAD: usize = 1;
/// How often the wait for the last deliveries looks again (it is also woken when they are recorded).
const CHECK_EVERY: Duration = Duration::from_millis(50);

/// A session holding the new slot's snapshot, opened while the slot's replication connection still exported it.
pub struct Snapshot {
    /// Boxed: it waits in the source's `Prepared` beside the leadership session.
    client: Box<tokio_postgres::Client>,
}

impl Snapshot {
    pub async fn open(
        db: &crate::conninfo::ConnInfo,
        snapshot: &str,
    ) -> Result<Snapshot, StoreError> {
        Ok(Snapshot {
            client: Box::new(store::open_snapshot(db, snapshot).await?),
        })
    }

    /// Whether the session holding the snapshot is still there (a lost one cannot be resumed).
    pub fn is_alive(&self) -> bool {
        !self.client.is_closed()
    }
}

/// Fans out every row the snapshot sees and waits until all their deliveries are recorded. Returns the
/// deliveries handed to dispatch, or `None` when `stop` fired first (the slot then stays unmarked, and the
/// next start backfills again).
pub async fn run(
    snapshot: Snapshot,
    slot: &str,
    store: &Store,
    pipeline: &Pipeline,
    stop: &CancellationToken,
) -> Result<Option<u64>, SourceError> {
    let since = store::slot_created_at(store.client(), slot)
        .await?
        .unwrap_or(SystemTime::UNIX_EPOCH);
    // rows above it have no delivery but those this run makes
    let recorded_max = store.max_recorded_event_id().await?;
    let (pages, mut next) = mpsc::channel::<Vec<OutboxRow>>(READ_AHEAD);
    let reader = tokio::spawn(read(snapshot, pages));

    let tracker = Tracker::new(Lsn(0));
    let txn = tracker.begin();
    let mut deliveries = 0u64;
    let mut events = 0u64;
    loop {
        let page = tokio::select! {
            page = next.recv() => page,
            _ = stop.cancelled() => return Ok(None),
        };
        let Some(page) = page else { break };
        let (skip, recorded) = match page.first() {
            Some(first) if first.id <= recorded_max => {
                let ids: Vec<i64> = page.iter().map(|r| r.id).collect();
                earlier(store, &ids, since).await?
            }
            _ => Default::default(),
        };
        for row in page {
            if skip.contains(&row.id) {
                continue;
            }
            let event = Event::new(
                row.id,
                &row.uid,
                &row.event_type,
                &row.created_at,
                &row.payload,
            )
            .with_ordering(row.ordering_key, None)
            .with_traceparent(row.traceparent.as_deref())
            .with_tenant(row.tenant)
            .with_version(row.version);
            let n = pipeline.endpoints.count_matching(&event);
            let wanted = n.clamp(1, pipeline.budget_size) as u32;
            let permit = tokio::select! {
                p = pipeline.budget.clone().acquire_many_owned(wanted) => p.expect("budget is never closed"),
                _ = stop.cancelled() => return Ok(None),
            };
            metrics::counter!(crate::metrics::EVENTS_RECEIVED).increment(1);
            let target = AckTarget::Txn {
                tracker: tracker.clone(),
                txn,
            };
            deliveries += pipeline.fan_out(event, &recorded, target, permit) as u64;
            events += 1;
        }
    }
    match reader.await {
        Ok(result) => result?,
        Err(e) => {
            return Err(SourceError::Transient(format!(
                "the backfill's reader ended: {e}"
            )))
        }
    }
    // every event is handed out: the "transaction" ends, and is confirmable once all are recorded
    tracker.commit(txn, Lsn(1));
    let mut tick = tokio::time::interval(CHECK_EVERY);
    while tracker.confirmed() < Lsn(1) {
        tokio::select! {
            _ = tracker.advanced.notified() => {}
            _ = tick.tick() => {}
            _ = stop.cancelled() => return Ok(None),
        }
    }
    tracing::info!(
        events,
        deliveries,
        "backfilled the events committed before the slot"
    );
    Ok(Some(deliveries))
}

/// Reads the snapshot's rows page by page into `pages`, then ends the snapshot's transaction.
async fn read(snapshot: Snapshot, pages: mpsc::Sender<Vec<OutboxRow>>) -> Result<(), SourceError> {
    let client = snapshot.client;
    let mut after = 0;
    loop {
        let page = store::backfill_page(&client, after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        let full = page.len() as i64 == PAGE;
        if pages.send(page).await.is_err() || !full {
            break;
        }
    }
    client
        .batch_execute("commit")
        .await
        .map_err(StoreError::from)?;
    Ok(())
}

/// Of these events: those with a delivery recorded before `since` (left alone), and the (event, endpoint)
/// pairs recorded since (an unfinished backfill's, not sent again).
async fn earlier(
    store: &Store,
    ids: &[i64],
    since: SystemTime,
) -> Result<(HashSet<i64>, HashSet<(i64, i64)>), SourceError> {
    let mut skip = HashSet::new();
    let mut recorded = HashSet::new();
    for (event, endpoint, before) in store.deliveries_since(ids, since).await? {
        if before {
            skip.insert(event);
        } else {
            recorded.insert((event, endpoint));
        }
    }
    Ok((skip, recorded))
}
