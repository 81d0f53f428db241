//! Sources yield committed outbox events, each with something that can be acknowledged once recorded.
//!
//! `replication` (the default) streams a pgoutput slot in commit order; the ack tracker decides which
//! position is safe to confirm. `notify` claims unprocessed outbox rows under a lease and marks them processed.
//! `walhook.publish()`'s events arrive through the slot too, as logical decoding messages ([`message`]). Rows
//! committed before the slot existed are read under its snapshot on the first start ([`backfill`]).
//! Acknowledgement is the whole crash-safety story: nothing is confirmed or marked before it is recorded. Both
//! sources hand their events to the same [`Pipeline`], so fan-out and the in-flight budget behave alike, and
//! both fan an event out by the endpoints as they were when it committed, or newer: an endpoint change reaches
//! the slot as a message in commit order, and a claim reads the generation of the endpoints with its rows
//! ([`Pipeline::endpoints_at`]).

pub mod ack;
pub mod backfill;
pub mod message;
pub mod notify;
pub mod replication;
pub mod walconn;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::dispatch::{Dispatcher, Job};
use crate::event::Event;
use crate::fanout::EndpointCache;
use crate::store::StoreError;
use ack::{AckTarget, EventAck};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A problem the user must fix; retrying will not help.
    #[error("{0}")]
    Fatal(String),
    /// A lost connection or a server restart; the source reconnects.
    #[error("{0}")]
    Transient(String),
}

impl From<StoreError> for SourceError {
    fn from(e: StoreError) -> Self {
        match e {
            e if e.is_connection() => SourceError::Transient(e.to_string()),
            e => SourceError::Fatal(e.to_string()),
        }
    }
}

/// The shared pieces a source feeds.
pub struct Pipeline {
    pub endpoints: Arc<EndpointCache>,
    pub dispatcher: Arc<Dispatcher>,
    /// Permits for what is held in memory (`delivery.max_in_flight_events`): the replication source takes
    /// one per delivery an event fans out to (at least one per event), so fan-out to many endpoints cannot
    /// multiply what waits in memory; the notify source takes one per row.
    pub budget: Arc<Semaphore>,
    /// The budget's size, the most one event may take.
    pub budget_size: usize,
}

/// The longest a source waits for the endpoint cache to reload after an endpoint change (it takes
/// milliseconds); past it, events are fanned out by the endpoints loaded.
const ENDPOINTS_CATCH_UP: Duration = Duration::from_secs(10);

impl Pipeline {
    /// Waits until the endpoint cache holds `walhook.endpoints_generation` `generation`: every event committed
    /// after an endpoint change (an endpoint added, enabled, verified, edited) is fanned out by the endpoints
    /// as changed. Should the reload not come (the daemon's role may not read a table it loads, the database
    /// unreachable), the source goes on with what is loaded after `within` (at most `ENDPOINTS_CATCH_UP`), as
    /// when changes were only polled, says so, and waits for no change again until a reload succeeds.
    pub async fn endpoints_at(&self, generation: i64, within: Duration) {
        let within = within.min(ENDPOINTS_CATCH_UP);
        if self.endpoints.reload_failing() {
            return;
        }
        if !self.endpoints.catch_up(generation, within).await {
            self.endpoints.give_up(generation);
            tracing::warn!(
                generation,
                loaded = self.endpoints.generation(),
                "the endpoints changed, and reloading them took over {within:?}: events go on \
                 being fanned out by the endpoints loaded, until the reload succeeds"
            );
        }
    }

    /// Submits `event` to every matching endpoint except those in `recorded` ((event, endpoint) pairs already
    /// in `walhook.deliveries`, after a crash), with an acknowledgement that releases `target` once all of
    /// them are recorded (at once when there are none). Returns the number of deliveries submitted.
    pub fn fan_out(
        &self,
        event: Event,
        recorded: &HashSet<(i64, i64)>,
        target: AckTarget,
        permit: OwnedSemaphorePermit,
    ) -> usize {
        let endpoints: Vec<_> = self
            .endpoints
            .matching(&event)
            .into_iter()
            .filter(|e| !recorded.contains(&(event.id, e.id)))
            .collect();
        let n = endpoints.len();
        let Some(ack) = EventAck::new(target, n, permit) else {
            return 0;
        };
        let event = Arc::new(event);
        for endpoint in endpoints {
            self.dispatcher.submit(Job {
                event: event.clone(),
                endpoint,
                schedule_step: 0,
                ack: Some(ack.clone()),
                claim: None,
            });
        }
        n
    }
}
