//! What may be acknowledged once deliveries are recorded: DESIGN.md invariant 3, "ack after record".
//!
//! Replication: transactions arrive in commit order. Each gets an entry counting the deliveries of its events
//! that are not yet durably recorded; the confirmable position is the end LSN of the newest transaction such
//! that it and every older one are committed-and-recorded. Deliveries complete out of order (HTTP is
//! concurrent), so the entries wait in a queue until the oldest ones are done. One queue per stream session:
//! after a reconnect, late completions of the previous session land on its own (dropped) tracker and confirm
//! nothing.
//!
//! Notify: there is no position, only rows. A row is marked processed by the very statement that records its
//! last delivery ([`EventAck::completes_row`] tells the recorder which rows a batch completes), so "recorded"
//! and "processed" commit together. A row that matched no endpoint has nothing to record: it joins [`Marks`]
//! and the notify source marks those in one statement of their own.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::{Notify, OwnedSemaphorePermit};

use crate::lsn::Lsn;

#[derive(Debug)]
struct Txn {
    /// Set when the Commit message arrives.
    end: Option<Lsn>,
    /// Deliveries (and pending duplicate checks) not yet recorded.
    remaining: usize,
    /// Commit time, when the source knows it (for the lag metric).
    committed_at: Option<SystemTime>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Sequence number of `txns[0]`.
    first: u64,
    txns: VecDeque<Txn>,
    confirmed: Lsn,
    /// Every transaction committed before this was read and recorded (when known): retention keeps the
    /// outbox rows committed after it.
    confirmed_commit: Option<SystemTime>,
}

/// Tracks in-flight transactions of one stream session.
#[derive(Debug, Default)]
pub struct Tracker {
    inner: Mutex<Inner>,
    /// Woken whenever the confirmable position advances.
    pub advanced: Notify,
}

impl Tracker {
    pub fn new(start: Lsn) -> Arc<Tracker> {
        let tracker = Tracker::default();
        tracker.inner.lock().expect("never poisoned").confirmed = start;
        Arc::new(tracker)
    }

    /// A transaction begins; returns its sequence number.
    pub fn begin(&self) -> u64 {
        self.push(None)
    }

    /// A transaction committed at `committed_at` begins (pgoutput's Begin carries the commit time).
    pub fn begin_at(&self, committed_at: SystemTime) -> u64 {
        self.push(Some(committed_at))
    }

    fn push(&self, committed_at: Option<SystemTime>) -> u64 {
        let mut inner = self.lock();
        inner.txns.push_back(Txn {
            end: None,
            remaining: 0,
            committed_at,
        });
        inner.first + inner.txns.len() as u64 - 1
    }

    /// Commit time of the oldest transaction not yet confirmable: how far behind the relay is.
    pub fn oldest_commit(&self) -> Option<SystemTime> {
        self.lock().txns.front().and_then(|t| t.committed_at)
    }

    /// True when every transaction whose Commit arrived is confirmable: what is left (at most the one being
    /// read) cannot be confirmed anyway. The drain waits for this before its last status update.
    pub fn settled(&self) -> bool {
        self.lock().txns.iter().all(|t| t.end.is_none())
    }

    /// `n` more deliveries of transaction `seq` must be recorded before it can be confirmed.
    pub fn add(&self, seq: u64, n: usize) {
        let mut inner = self.lock();
        let idx = (seq - inner.first) as usize;
        inner.txns[idx].remaining += n;
    }

    /// The transaction's Commit arrived, ending at `end`.
    pub fn commit(&self, seq: u64, end: Lsn) {
        let mut inner = self.lock();
        let idx = (seq - inner.first) as usize;
        inner.txns[idx].end = Some(end);
        self.settle(&mut inner);
    }

    /// One delivery of transaction `seq` is durably recorded.
    pub fn done(&self, seq: u64) {
        let mut inner = self.lock();
        let Some(idx) = seq.checked_sub(inner.first) else {
            return;
        };
        if let Some(txn) = inner.txns.get_mut(idx as usize) {
            txn.remaining = txn.remaining.saturating_sub(1);
            if idx == 0 {
                self.settle(&mut inner);
            }
        }
    }

    /// The newest position whose transactions are all recorded.
    pub fn confirmed(&self) -> Lsn {
        self.lock().confirmed
    }

    /// The commit time of the newest confirmed transaction (or, when the position follows an idle server,
    /// a moment before the keepalive): every transaction committed before it was read and recorded.
    pub fn confirmed_commit(&self) -> Option<SystemTime> {
        self.lock().confirmed_commit
    }

    /// Transactions begun and not yet confirmable.
    pub fn outstanding(&self) -> usize {
        self.lock().txns.len()
    }

    /// With nothing outstanding, the position may follow the server (keepalive `wal_end`), so an idle
    /// outbox does not make the slot retain WAL written to other tables.
    pub fn follow_if_idle(&self, server: Lsn) -> bool {
        let mut inner = self.lock();
        if inner.txns.is_empty() && server >= inner.confirmed {
            // the keepalive was sent after every commit before `server`: a second of margin for the trip
            let idle_since = SystemTime::now() - std::time::Duration::from_secs(1);
            inner.confirmed_commit = Some(
                inner
                    .confirmed_commit
                    .map_or(idle_since, |t| t.max(idle_since)),
            );
        }
        if inner.txns.is_empty() && server > inner.confirmed {
            inner.confirmed = server;
            self.advanced.notify_waiters();
            return true;
        }
        false
    }

    fn settle(&self, inner: &mut Inner) {
        let mut advanced = false;
        while let Some(front) = inner.txns.front() {
            match front.end {
                Some(end) if front.remaining == 0 => {
                    inner.confirmed = inner.confirmed.max(end);
                    if let Some(at) = front.committed_at {
                        inner.confirmed_commit =
                            Some(inner.confirmed_commit.map_or(at, |t| t.max(at)));
                    }
                    inner.txns.pop_front();
                    inner.first += 1;
                    advanced = true;
                }
                _ => break,
            }
        }
        if advanced {
            self.advanced.notify_waiters();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("tracker lock holders never panic")
    }
}

/// Outbox rows (notify source) whose deliveries are all recorded, waiting to be marked processed.
#[derive(Debug, Default)]
pub struct Marks {
    /// Rows to mark processed: they had no delivery to record.
    ready: Mutex<Vec<i64>>,
    /// Rows already marked processed along with their last delivery: only to be forgotten.
    marked: Mutex<Vec<i64>>,
    /// Woken when a row is ready or marked.
    pub wake: Notify,
}

impl Marks {
    /// Row `id` had no delivery to record: it may be marked processed.
    pub fn ready(&self, id: i64) {
        self.ready.lock().expect("never poisoned").push(id);
        self.wake.notify_one();
    }

    /// Row `id` was marked processed by the statement that recorded its last delivery.
    pub fn marked(&self, id: i64) {
        self.marked.lock().expect("never poisoned").push(id);
        self.wake.notify_one();
    }

    /// The rows to mark, gathered since the last call.
    pub fn take(&self) -> Vec<i64> {
        std::mem::take(&mut *self.ready.lock().expect("never poisoned"))
    }

    /// The rows marked since the last call.
    pub fn take_marked(&self) -> Vec<i64> {
        std::mem::take(&mut *self.marked.lock().expect("never poisoned"))
    }
}

/// What the recorded deliveries of one event release.
#[derive(Debug)]
pub enum AckTarget {
    /// Replication: transaction `txn` of a stream session's tracker.
    Txn { tracker: Arc<Tracker>, txn: u64 },
    /// Notify: the outbox row `id`, marked processed once all its deliveries are recorded.
    Row { marks: Arc<Marks>, id: i64 },
}

/// Held by every delivery of one event until it is recorded; also holds the event's share of the in-flight
/// budget (`delivery.max_in_flight_events`), released when the last delivery lets go.
#[derive(Debug)]
pub struct EventAck {
    target: AckTarget,
    /// Deliveries of this event not yet recorded (the transaction tracker keeps its own count).
    remaining: AtomicUsize,
    _permit: OwnedSemaphorePermit,
}

impl EventAck {
    /// An event with `deliveries` deliveries to record. With none there is nothing to wait for: the target is
    /// released now and no `EventAck` is needed (the permit is dropped).
    pub fn new(
        target: AckTarget,
        deliveries: usize,
        permit: OwnedSemaphorePermit,
    ) -> Option<Arc<EventAck>> {
        if deliveries == 0 {
            if let AckTarget::Row { marks, id } = &target {
                marks.ready(*id);
            }
            return None;
        }
        if let AckTarget::Txn { tracker, txn } = &target {
            tracker.add(*txn, deliveries);
        }
        Some(Arc::new(EventAck {
            target,
            remaining: AtomicUsize::new(deliveries),
            _permit: permit,
        }))
    }

    /// One delivery of this event is durably recorded.
    /// The outbox row that a batch holding `n` of this event's deliveries completes: the recorder marks it
    /// processed in the same statement. Only the recorder counts deliveries down, one batch at a time, so
    /// this holds exactly when [`EventAck::recorded`], called `n` times after the write, reaches zero.
    pub fn completes_row(&self, n: usize) -> Option<i64> {
        match &self.target {
            AckTarget::Row { id, .. } if self.remaining.load(Ordering::Acquire) == n => Some(*id),
            _ => None,
        }
    }

    pub fn recorded(&self) {
        match &self.target {
            AckTarget::Txn { tracker, txn } => tracker.done(*txn),
            AckTarget::Row { marks, id } => {
                let before =
                    self.remaining
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
                if before == Ok(1) {
                    marks.marked(*id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirms_only_fully_recorded_prefixes() {
        let t = Tracker::new(Lsn(10));
        let a = t.begin();
        t.add(a, 2);
        t.commit(a, Lsn(100));
        let b = t.begin();
        t.add(b, 1);
        t.commit(b, Lsn(200));
        assert_eq!(t.confirmed(), Lsn(10));
        t.done(b); // later transaction done first: nothing confirmable yet
        assert_eq!(t.confirmed(), Lsn(10));
        t.done(a);
        assert_eq!(t.confirmed(), Lsn(10));
        t.done(a);
        assert_eq!(t.confirmed(), Lsn(200));
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn uncommitted_transaction_holds_the_position() {
        let t = Tracker::new(Lsn(0));
        let a = t.begin();
        assert!(!t.follow_if_idle(Lsn(50)));
        t.commit(a, Lsn(60));
        assert_eq!(t.confirmed(), Lsn(60));
        assert!(t.follow_if_idle(Lsn(90)));
        assert_eq!(t.confirmed(), Lsn(90));
        assert!(!t.follow_if_idle(Lsn(80)));
        assert_eq!(t.confirmed(), Lsn(90));
    }

    #[test]
    fn settled_ignores_the_transaction_being_read() {
        let t = Tracker::new(Lsn(0));
        assert!(t.settled());
        let a = t.begin_at(SystemTime::UNIX_EPOCH);
        t.add(a, 1);
        assert!(t.settled(), "no commit yet: nothing to wait for");
        assert_eq!(t.oldest_commit(), Some(SystemTime::UNIX_EPOCH));
        t.commit(a, Lsn(10));
        assert!(!t.settled());
        let b = t.begin();
        t.add(b, 1);
        t.done(a);
        assert!(t.settled());
        assert_eq!(t.confirmed(), Lsn(10));
        assert_eq!(t.oldest_commit(), None);
    }

    #[test]
    fn stale_completions_are_ignored() {
        let t = Tracker::new(Lsn(0));
        let a = t.begin();
        t.commit(a, Lsn(5));
        t.done(a);
        t.done(a + 7);
        assert_eq!(t.confirmed(), Lsn(5));
    }

    #[test]
    fn a_row_is_marked_with_its_last_delivery_only() {
        let budget = Arc::new(tokio::sync::Semaphore::new(2));
        let permit = || budget.clone().try_acquire_owned().unwrap();
        let marks = Arc::new(Marks::default());
        let row = |id| AckTarget::Row {
            marks: marks.clone(),
            id,
        };
        let ack = EventAck::new(row(7), 2, permit()).expect("two deliveries to wait for");
        assert!(EventAck::new(row(8), 0, permit()).is_none());
        assert_eq!(
            marks.take(),
            vec![8],
            "a row without deliveries is ready at once"
        );
        assert_eq!(budget.available_permits(), 1);
        assert_eq!(
            ack.completes_row(1),
            None,
            "a batch with one of two deliveries"
        );
        assert_eq!(ack.completes_row(2), Some(7), "a batch with both");
        ack.recorded();
        assert!(marks.take_marked().is_empty());
        assert_eq!(ack.completes_row(1), Some(7), "the batch with the last one");
        ack.recorded();
        ack.recorded(); // more reports than deliveries never mark twice
        assert_eq!(marks.take_marked(), vec![7]);
        assert!(marks.take().is_empty(), "marked by the recorder, not again");
        drop(ack);
        assert_eq!(budget.available_permits(), 2);
    }

    #[test]
    fn a_transaction_waits_for_its_events_deliveries() {
        let budget = Arc::new(tokio::sync::Semaphore::new(1));
        let t = Tracker::new(Lsn(0));
        let a = t.begin();
        let target = AckTarget::Txn {
            tracker: t.clone(),
            txn: a,
        };
        let ack = EventAck::new(target, 2, budget.try_acquire_owned().unwrap()).unwrap();
        t.commit(a, Lsn(40));
        ack.recorded();
        assert_eq!(t.confirmed(), Lsn(0));
        ack.recorded();
        assert_eq!(t.confirmed(), Lsn(40));
    }
}
