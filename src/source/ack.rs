//! Which stream position may be confirmed: DESIGN.md invariant 3, "ack after record".
//!
//! Transactions arrive in commit order. Each gets an entry counting the deliveries of its events that are not
//! yet durably recorded; the confirmable position is the end LSN of the newest transaction such that it and
//! every older one are committed-and-recorded. Deliveries complete out of order (HTTP is concurrent), so the
//! entries wait in a queue until the oldest ones are done. One queue per stream session: after a reconnect,
//! late completions of the previous session land on its own (dropped) tracker and confirm nothing.

use std::collections::VecDeque;
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

    /// Transactions begun and not yet confirmable.
    pub fn outstanding(&self) -> usize {
        self.lock().txns.len()
    }

    /// With nothing outstanding, the position may follow the server (keepalive `wal_end`), so an idle
    /// outbox does not make the slot retain WAL written to other tables.
    pub fn follow_if_idle(&self, server: Lsn) -> bool {
        let mut inner = self.lock();
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

/// Held by every delivery of one streamed event until it is recorded; also holds the event's share of the
/// in-flight budget (`delivery.max_in_flight_events`), released when the last delivery lets go.
#[derive(Debug)]
pub struct EventAck {
    tracker: Arc<Tracker>,
    txn: u64,
    _permit: OwnedSemaphorePermit,
}

impl EventAck {
    pub fn new(tracker: Arc<Tracker>, txn: u64, permit: OwnedSemaphorePermit) -> EventAck {
        EventAck {
            tracker,
            txn,
            _permit: permit,
        }
    }

    /// One delivery of this event is durably recorded.
    pub fn recorded(&self) {
        self.tracker.done(self.txn);
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
}
