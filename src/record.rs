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
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::source::ack::EventAck;
use crate::store::{RecordRow, Store};

/// One outcome to record, with the acknowledgement of the streamed event it belongs to (if any).
#[derive(Debug)]
pub struct Outcome {
    pub row: RecordRow,
    pub ack: Option<Arc<EventAck>>,
}

/// Sending side, cloned into dispatch and the scheduler.
#[derive(Clone, Debug)]
pub struct Recorder {
    tx: mpsc::UnboundedSender<Outcome>,
}

impl Recorder {
    /// Queues an outcome. The queue is bounded by what is in flight upstream (events held by the source's
    /// budget, claims held by the scheduler), so it needs no bound of its own.
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
    db: tokio_postgres::Config,
    batch_size: usize,
    flush_interval: Duration,
}

pub fn channel(
    db: tokio_postgres::Config,
    batch_size: usize,
    flush_interval: Duration,
    wake: Arc<Notify>,
) -> (Recorder, RecorderTask) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Recorder { tx },
        RecorderTask {
            rx,
            wake,
            db,
            batch_size: batch_size.max(1),
            flush_interval,
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
            self.write(&mut store, &batch, &abort).await;
            if batch.iter().any(|o| o.row.ordering.is_some()) {
                self.wake.notify_one();
            }
            if abort.is_cancelled() {
                return;
            }
            for outcome in batch.drain(..) {
                if let Some(ack) = outcome.ack {
                    ack.recorded();
                }
            }
        }
    }

    /// Adds what arrives within the flush interval, up to the batch size. A second outcome for the same
    /// (event, endpoint) cannot share the statement (an upsert touches a row once), so it is carried over.
    async fn fill(&mut self, batch: &mut Vec<Outcome>) -> Option<Outcome> {
        let mut keys: HashSet<(i64, i64)> = batch
            .iter()
            .map(|o| (o.row.event_id, o.row.endpoint_id))
            .collect();
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
            if !keys.insert((next.row.event_id, next.row.endpoint_id)) {
                return Some(next);
            }
            batch.push(next);
        }
        None
    }

    async fn write(&self, store: &mut Option<Store>, batch: &[Outcome], abort: &CancellationToken) {
        let rows: Vec<&RecordRow> = batch.iter().map(|o| &o.row).collect();
        let processed = completed_rows(batch);
        let mut backoff = Duration::from_millis(100);
        loop {
            let result = match store {
                Some(s) if !s.is_closed() => s.record(&rows, &processed).await,
                _ => match Store::connect(&self.db).await {
                    Ok(s) => {
                        *store = Some(s);
                        continue;
                    }
                    Err(e) => Err(e),
                },
            };
            match result {
                Ok(()) => {
                    metrics::counter!(crate::metrics::RECORD_BATCHES).increment(1);
                    metrics::counter!(crate::metrics::RECORD_ROWS).increment(rows.len() as u64);
                    return;
                }
                Err(e) => {
                    tracing::warn!(
                        "recording {} outcomes failed, retrying in {backoff:?}: {e}",
                        rows.len()
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
        }
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
