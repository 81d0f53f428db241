//! Record: outcomes become rows in `walhook.deliveries` and `walhook.attempts`, in batches.
//!
//! Dispatch sends at once and hands every outcome here; the recorder writes whatever has accumulated as one
//! statement (group commit: while one batch is being written the next one fills, so batches grow with load and
//! a lone event waits at most `record.flush_interval`). Only after the statement commits are the events'
//! acknowledgements released, which is what lets the source confirm the slot position (ack after record).
//! A failed write keeps its batch and retries on a new connection: nothing is acknowledged that is not
//! durable. Outbox rows of the notify source whose last delivery is in a batch are marked processed by the
//! batch's own statement, so a row is never processed without its deliveries, nor recorded and left unmarked.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::source::ack::EventAck;
use crate::store::{AttemptRow, RecordRow, Status, Store, StoreError};

/// One outcome to record, with the acknowledgement of the streamed event it belongs to (if any), or the
/// scheduler's claim permit: both are released only once the outcome is durable, so neither source can run
/// ahead of the recorder (a stuck recorder stops new claims instead of piling up outcomes in memory).
#[derive(Debug)]
pub struct Outcome {
    pub row: RecordRow,
    pub ack: Option<Arc<EventAck>>,
    pub claim: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Sending side, cloned into dispatch and the scheduler.
#[derive(Clone, Debug)]
pub struct Recorder {
    tx: mpsc::UnboundedSender<Outcome>,
    failing: Arc<AtomicBool>,
}

impl Recorder {
    /// True while the last write failed and is being retried: claiming more work would only send requests
    /// whose outcomes cannot be recorded (and would be sent again).
    pub fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// Queues an outcome. The queue is bounded by what is in flight upstream (events held by the source's
    /// budget, claims held by the scheduler, both released after the write), so it needs no bound of its
    /// own.
    pub fn record(&self, outcome: Outcome) {
        if self.tx.send(outcome).is_err() {
            tracing::error!(
                "recorder has stopped; outcome dropped (the source replays or reclaims its event)"
            );
        }
    }
}

pub struct RecorderTask {
    rx: mpsc::UnboundedReceiver<Outcome>,
    /// Woken after a batch with ordered deliveries: the next delivery of their keys may go.
    wake: Arc<Notify>,
    db: crate::conninfo::ConnInfo,
    batch_size: usize,
    flush_interval: Duration,
    failing: Arc<AtomicBool>,
}

pub fn channel(
    db: crate::conninfo::ConnInfo,
    batch_size: usize,
    flush_interval: Duration,
    wake: Arc<Notify>,
) -> (Recorder, RecorderTask) {
    let (tx, rx) = mpsc::unbounded_channel();
    let failing = Arc::new(AtomicBool::new(false));
    (
        Recorder {
            tx,
            failing: failing.clone(),
        },
        RecorderTask {
            rx,
            wake,
            db,
            batch_size: batch_size.max(1),
            flush_interval,
            failing,
        },
    )
}

impl RecorderTask {
    /// Runs until every sender is gone and the queue is empty (so a drain records everything handed over),
    /// or until `abort` fires.
    pub async fn run(mut self, abort: CancellationToken) {
        let mut store: Option<Store> = None;
        let mut batch: Vec<Outcome> = Vec::with_capacity(self.batch_size);
        let mut carry: Option<Outcome> = None;
        loop {
            if let Some(first) = carry.take() {
                batch.push(first);
            } else {
                // hanging attempts hold senders open: an abort must not wait for them
                let next = tokio::select! {
                    o = self.rx.recv() => o,
                    _ = abort.cancelled() => None,
                };
                match next {
                    Some(o) => batch.push(o),
                    None => return,
                }
            }
            carry = self.fill(&mut batch).await;
            let ordered = batch.iter().any(|o| o.row.ordering.is_some());
            self.write(&mut store, &mut batch, &abort).await;
            if ordered {
                self.wake.notify_one();
            }
            if abort.is_cancelled() {
                return;
            }
        }
    }

    /// Adds what arrives within the flush interval, up to the batch size and `MAX_BATCH_BYTES`. A second
    /// outcome for the same (event, endpoint) cannot share the statement (an upsert touches a row once),
    /// so it is carried over, like the outcome that would make the batch too large.
    async fn fill(&mut self, batch: &mut Vec<Outcome>) -> Option<Outcome> {
        let mut keys: HashSet<(i64, i64)> = batch
            .iter()
            .map(|o| (o.row.event_id, o.row.endpoint_id))
            .collect();
        let mut bytes: usize = batch.iter().map(|o| o.row.size()).sum();
        let deadline = tokio::time::Instant::now() + self.flush_interval;
        while batch.len() < self.batch_size {
            let next = match self.rx.try_recv() {
                Ok(o) => o,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                        Ok(Some(o)) => o,
                        _ => break,
                    }
                }
            };
            bytes += next.row.size();
            if !keys.insert((next.row.event_id, next.row.endpoint_id)) || bytes > MAX_BATCH_BYTES {
                return Some(next);
            }
            batch.push(next);
        }
        None
    }

    /// Writes the batch and releases what it held (acknowledgements, claim permits), retrying lost
    /// connections and server errors until it is durable: nothing is acknowledged that is not. A batch that
    /// fails because of what one outcome holds (a value out of range, a row too large, a check the server
    /// refuses) is split until that outcome is found; it is then recorded dead with the reason, and the rest
    /// go on. One bad outcome never stops recording.
    async fn write(
        &self,
        store: &mut Option<Store>,
        batch: &mut Vec<Outcome>,
        abort: &CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(100);
        while !batch.is_empty() {
            let result = match self.connected(store).await {
                Ok(s) => isolate(s, batch).await,
                Err(e) => Err(e),
            };
            let Err(e) = result else {
                self.failing.store(false, Ordering::Relaxed);
                return;
            };
            self.failing.store(true, Ordering::Relaxed);
            tracing::warn!(
                "recording {} outcomes failed, retrying in {backoff:?}: {e}",
                batch.len()
            );
            if e.is_connection() {
                *store = None;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = abort.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn connected<'a>(&self, store: &'a mut Option<Store>) -> Result<&'a Store, StoreError> {
        if store.as_ref().is_none_or(|s| s.is_closed()) {
            *store = Some(Store::connect(&self.db).await?);
        }
        Ok(store.as_ref().expect("connected above"))
    }
}

/// The most a batch carries in payload copies, response excerpts and errors: far below the server's 1 GB
/// limit on a message, and on what one statement should hold in memory.
const MAX_BATCH_BYTES: usize = 32 << 20;

/// Writes `batch` in one statement and releases what its outcomes held; the batch is emptied.
async fn write_all(store: &Store, batch: &mut Vec<Outcome>) -> Result<(), StoreError> {
    let rows: Vec<&RecordRow> = batch.iter().map(|o| &o.row).collect();
    let processed = completed_rows(batch);
    // an outcome of an event the source handed over is its delivery's first (those of the scheduler's claims
    // update rows)
    let first = batch.iter().all(|o| o.ack.is_some() && o.claim.is_none());
    store.record(&rows, &processed, first).await?;
    metrics::counter!(crate::metrics::RECORD_BATCHES).increment(1);
    metrics::counter!(crate::metrics::RECORD_ROWS).increment(rows.len() as u64);
    for outcome in batch.drain(..) {
        if let Some(ack) = outcome.ack {
            ack.recorded();
        }
    }
    Ok(())
}

/// An error caused by what the batch holds rather than by the server or the connection: writing the same
/// rows again would fail again. Data exceptions (22), integrity violations (23), program limits (54), and
/// client-side encoding failures (no SQLSTATE while the connection lives).
fn is_poison(e: &StoreError, store: &Store) -> bool {
    let StoreError::Db(error) = e else {
        return false;
    };
    match error.code() {
        Some(code) => matches!(code.code().get(..2), Some("22" | "23" | "54")),
        // tokio-postgres's own words for a parameter it cannot encode (too large, say)
        None => {
            let text = error.to_string();
            !store.is_closed()
                && !error.is_closed()
                && (text.starts_with("error serializing") || text.starts_with("error encoding"))
        }
    }
}

/// Writes `batch`; when it is poisoned, halves it until each bad outcome is alone and records that one dead
/// with the reason. Written outcomes leave `batch`; an error leaves the unwritten ones in it.
async fn isolate(store: &Store, batch: &mut Vec<Outcome>) -> Result<(), StoreError> {
    let e = match write_all(store, batch).await {
        Ok(()) => return Ok(()),
        Err(e) if is_poison(&e, store) => e,
        Err(e) => return Err(e),
    };
    if batch.len() == 1 {
        return record_refused(store, batch, &e).await;
    }
    let mut rest = batch.split_off(batch.len() / 2);
    Box::pin(isolate(store, batch)).await?;
    let result = Box::pin(isolate(store, &mut rest)).await;
    batch.append(&mut rest);
    result
}

/// The one outcome the server refuses: recorded dead with the reason, first with its event copy (so that
/// `redeliver` can send it again) and, if that is what the server refuses, without.
async fn record_refused(
    store: &Store,
    batch: &mut Vec<Outcome>,
    e: &StoreError,
) -> Result<(), StoreError> {
    let row = &mut batch[0].row;
    tracing::error!(
        event_id = row.event_id,
        endpoint_id = row.endpoint_id,
        "the server refuses to record an outcome; recording the delivery dead instead: {e}"
    );
    let attempted_at = row
        .attempt
        .as_ref()
        .map_or_else(SystemTime::now, |a| a.attempted_at);
    row.status = Status::Dead;
    row.next_attempt_at = None;
    row.ordering = None;
    // only what is needed to say what happened: the response and its status may be what is refused
    row.attempt = Some(AttemptRow {
        attempted_at,
        duration_ms: row.attempt.as_ref().map_or(0, |a| a.duration_ms),
        status_code: None,
        error: Some(crate::dispatch::client::text_excerpt(
            format!(
                "walhook could not record this delivery's outcome and recorded it dead instead: {e}; \
                 walhook.redeliver() sends it again"
            )
            .as_bytes(),
        )),
        response_body: None,
    });
    match write_all(store, batch).await {
        Err(e) if is_poison(&e, store) => {
            batch[0].row.copy = None;
            write_all(store, batch).await
        }
        other => other,
    }
}

/// The notify source's outbox rows whose last outstanding delivery is in `batch`.
fn completed_rows(batch: &[Outcome]) -> Vec<i64> {
    let mut per_event: HashMap<*const EventAck, (&EventAck, usize)> = HashMap::new();
    for ack in batch.iter().filter_map(|o| o.ack.as_deref()) {
        per_event
            .entry(ack as *const EventAck)
            .or_insert((ack, 0))
            .1 += 1;
    }
    per_event
        .values()
        .filter_map(|(ack, n)| ack.completes_row(*n))
        .collect()
}
