//! Dispatch: admit, sign, send, decide, and hand the outcome to the recorder.
//!
//! `submit` never blocks the caller (the source's read loop or the scheduler). A job goes out at once unless
//! one of its endpoint's limits says no: the breaker is open, the rate limit has no token, or
//! `max_in_flight` requests are already open. Then the delivery is *parked*: recorded as pending, due when
//! the limit will allow it, without an attempt. Nothing waits in memory for a slow endpoint, so a slow,
//! failing or throttled endpoint never holds other endpoints' events or the slot position back for longer
//! than one request timeout (DESIGN.md invariant 5), and a skipped request consumes no attempt.
//!
//! Ordered endpoints are the exception to "send at once": a keyed event is always parked with its commit
//! position, and the scheduler sends only the oldest pending delivery of each key (one in flight per key).

pub mod client;
pub mod guard;
pub mod limits;
pub mod retry;

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::event::Event;
use crate::fanout::Endpoint;
use crate::record::{Outcome, Recorder};
use crate::source::ack::EventAck;
use crate::store::{AttemptRow, RecordRow, Status};
use client::{HttpClient, Outgoing, SendError};
use limits::{Admission, BreakerPolicy};
use retry::{Attempted, Decision, RetryPolicy};

/// One delivery attempt to make.
#[derive(Debug)]
pub struct Job {
    pub event: Arc<Event>,
    pub endpoint: Arc<Endpoint>,
    /// Attempts already made in the current run of the retry schedule.
    pub schedule_step: i32,
    /// The streamed event's acknowledgement (`None` for deliveries claimed by the scheduler).
    pub ack: Option<Arc<EventAck>>,
    /// The scheduler's share of its claim budget, released when the job ends.
    pub claim: Option<OwnedSemaphorePermit>,
}

impl Job {
    /// Keyed events of ordered endpoints go through the scheduler's per-key queue; a job the scheduler
    /// claimed is already the head of its key.
    fn must_queue(&self) -> bool {
        self.endpoint.policy.ordered && self.event.ordering_key.is_some() && self.claim.is_none()
    }
}

/// A request to disable an endpoint, with the reason shown in `walhook.endpoints.disabled_reason`.
#[derive(Debug)]
pub struct Disable {
    pub endpoint_id: i64,
    pub reason: String,
}

/// Defaults that endpoints may override.
#[derive(Clone, Debug)]
pub struct DispatchSettings {
    pub retry: RetryPolicy,
    pub breaker: BreakerPolicy,
    pub timeout: Duration,
    /// Global limit on requests in flight.
    pub concurrency: usize,
    pub max_in_flight_per_endpoint: usize,
}

pub struct Dispatcher {
    client: HttpClient,
    recorder: Recorder,
    settings: DispatchSettings,
    concurrency: Arc<Semaphore>,
    disable: mpsc::UnboundedSender<Disable>,
}

impl Dispatcher {
    pub fn new(
        client: HttpClient,
        recorder: Recorder,
        settings: DispatchSettings,
        disable: mpsc::UnboundedSender<Disable>,
    ) -> Dispatcher {
        let concurrency = Arc::new(Semaphore::new(settings.concurrency.max(1)));
        Dispatcher {
            client,
            recorder,
            settings,
            concurrency,
            disable,
        }
    }

    fn max_in_flight(&self, endpoint: &Endpoint) -> usize {
        endpoint
            .policy
            .max_in_flight
            .unwrap_or(self.settings.max_in_flight_per_endpoint)
            .max(1)
    }

    /// How many more requests the endpoint accepts now (the scheduler claims no more than that), counting
    /// its in-flight limit, an open breaker and its rate limit.
    pub fn room(&self, endpoint: &Endpoint) -> usize {
        let open = self
            .max_in_flight(endpoint)
            .saturating_sub(endpoint.rt.in_flight.load(Ordering::Relaxed));
        let now = Instant::now();
        let mut limits = endpoint.rt.limits.lock().expect("never poisoned");
        if limits.breaker.state() != limits::BreakerState::Closed {
            let probe_due = limits.breaker.open_until() <= now;
            return if probe_due { open.min(1) } else { 0 };
        }
        match limits.bucket.as_mut() {
            Some(bucket) => open.min(bucket.available(now)),
            None => open,
        }
    }

    /// Starts the job, or parks it if a limit of its endpoint says no.
    pub fn submit(self: &Arc<Self>, job: Job) {
        if job.must_queue() {
            self.park(job, SystemTime::now());
            return;
        }
        let endpoint = job.endpoint.clone();
        let previous = endpoint.rt.in_flight.fetch_add(1, Ordering::AcqRel);
        if previous >= self.max_in_flight(&endpoint) {
            endpoint.rt.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.park(job, SystemTime::now());
            return;
        }
        let now = Instant::now();
        let admission = {
            let mut limits = endpoint.rt.limits.lock().expect("never poisoned");
            match limits.breaker.admit(now) {
                Admission::Wait(until) => Err(until),
                admission => match limits.bucket.as_mut().map(|b| b.take(now)) {
                    Some(Err(wait)) => {
                        limits.breaker.release(&admission);
                        Err(now + wait)
                    }
                    _ => Ok(admission),
                },
            }
        };
        let admission = match admission {
            Ok(a) => a,
            Err(until) => {
                endpoint.rt.in_flight.fetch_sub(1, Ordering::AcqRel);
                self.park(
                    job,
                    SystemTime::now() + until.saturating_duration_since(now),
                );
                return;
            }
        };
        let this = self.clone();
        tokio::spawn(async move {
            let permit = this
                .concurrency
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore is never closed");
            let row = this.attempt(&job, admission).await;
            drop(permit);
            job.endpoint.rt.in_flight.fetch_sub(1, Ordering::AcqRel);
            this.recorder.record(Outcome { row, ack: job.ack });
        });
    }

    /// Records the delivery as pending, due at `at`, without an attempt.
    fn park(&self, job: Job, at: SystemTime) {
        metrics::counter!(crate::metrics::PARKED).increment(1);
        let ordering = self.ordering(&job);
        let row = RecordRow {
            event_id: job.event.id,
            endpoint_id: job.endpoint.id,
            uid_hex: job.event.uid_hex().to_string(),
            status: Status::Pending,
            schedule_step: job.schedule_step,
            next_attempt_at: Some(at),
            attempt: None,
            copy: Some(copy_of(&job.event)),
            ordering,
        };
        self.recorder.record(Outcome { row, ack: job.ack });
    }

    fn ordering(&self, job: &Job) -> Option<(String, crate::lsn::Lsn)> {
        if !job.endpoint.policy.ordered {
            return None;
        }
        let key = job.event.ordering_key.clone()?;
        Some((key, job.event.commit_lsn.unwrap_or_default()))
    }

    /// Makes one attempt and decides what it leaves behind.
    async fn attempt(&self, job: &Job, admission: Admission) -> RecordRow {
        let event = &job.event;
        let endpoint = &job.endpoint;
        let attempted_at = SystemTime::now();
        let timestamp = attempted_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let signature = endpoint.signature(&event.webhook_id, timestamp, &event.body);
        let started = tokio::time::Instant::now();
        let result = self
            .client
            .post(Outgoing {
                uri: &endpoint.uri,
                webhook_id: &event.webhook_id,
                timestamp,
                signature: &signature,
                body: event.body.clone(),
                timeout: endpoint.policy.timeout.unwrap_or(self.settings.timeout),
                headers: &endpoint.policy.headers,
            })
            .await;
        let elapsed = started.elapsed();
        metrics::histogram!(crate::metrics::ATTEMPT_DURATION).record(elapsed.as_secs_f64());

        let (attempted, status_code, error, response_body) = match &result {
            Ok(r) => {
                let retry_after = r
                    .retry_after
                    .as_deref()
                    .and_then(|v| retry::parse_retry_after(v, SystemTime::now()));
                let error = (!(200..300).contains(&r.status)).then(|| format!("HTTP {}", r.status));
                (
                    Attempted::Status {
                        code: r.status,
                        retry_after,
                    },
                    Some(r.status as i32),
                    error,
                    Some(r.body_excerpt.clone()),
                )
            }
            Err(e) => {
                let attempted = match e {
                    SendError::Timeout(_) => Attempted::Timeout,
                    SendError::Blocked(_) => Attempted::Blocked,
                    SendError::Connect(_) | SendError::Request(_) => Attempted::ConnectError,
                };
                (
                    attempted,
                    None,
                    Some(client::text_excerpt(e.to_string().as_bytes())),
                    None,
                )
            }
        };
        self.observe(
            endpoint,
            &attempted,
            admission,
            attempted_at,
            status_code,
            error.as_deref(),
        );

        let attempt_no = (job.schedule_step + 1) as u32;
        let policy = match &endpoint.policy.retry_schedule {
            Some(schedule) => Cow::Owned(RetryPolicy {
                schedule: schedule.clone(),
                ..self.settings.retry.clone()
            }),
            None => Cow::Borrowed(&self.settings.retry),
        };
        let decision = retry::decide(
            &policy,
            attempt_no,
            &attempted,
            SystemTime::now(),
            rand::random::<f64>(),
        );
        let (status, next_attempt_at, outcome) = match &decision {
            Decision::Delivered => (Status::Succeeded, None, "delivered"),
            Decision::Retry { after } => {
                (Status::Pending, Some(SystemTime::now() + *after), "retry")
            }
            Decision::Dead { .. } => (Status::Dead, None, "dead"),
            Decision::Gone => {
                let reason = format!(
                    "the endpoint answered 410 Gone at {}; re-enable it with UPDATE walhook.endpoints SET enabled = true",
                    humantime::format_rfc3339_seconds(attempted_at)
                );
                let _ = self.disable.send(Disable {
                    endpoint_id: endpoint.id,
                    reason,
                });
                (Status::Dead, None, "gone")
            }
        };
        metrics::counter!(crate::metrics::DELIVERIES, "outcome" => outcome).increment(1);
        if let Some(error) = &error {
            tracing::info!(
                endpoint_id = endpoint.id,
                event_id = event.id,
                webhook_id = %event.webhook_id,
                status = status_code,
                attempt = attempt_no,
                next = outcome,
                "delivery attempt failed: {error}"
            );
        }
        RecordRow {
            event_id: event.id,
            endpoint_id: endpoint.id,
            uid_hex: event.uid_hex().to_string(),
            status,
            schedule_step: job.schedule_step + 1,
            next_attempt_at,
            attempt: Some(AttemptRow {
                attempted_at,
                duration_ms: elapsed.as_millis().min(i32::MAX as u128) as i32,
                status_code,
                error,
                response_body,
            }),
            copy: (status != Status::Succeeded).then(|| copy_of(event)),
            ordering: if status == Status::Pending {
                self.ordering(job)
            } else {
                None
            },
        }
    }

    /// Feeds the attempt to the endpoint's breaker and health counters. The breaker counts only signs that
    /// the endpoint is unavailable (timeouts, connection failures, 5xx, 408, 429); a 4xx rejection is the
    /// receiver working as designed.
    fn observe(
        &self,
        endpoint: &Endpoint,
        attempted: &Attempted,
        admission: Admission,
        at: SystemTime,
        status: Option<i32>,
        error: Option<&str>,
    ) {
        let ok = matches!(attempted, Attempted::Status { code, .. } if (200..300).contains(code));
        let unavailable = match attempted {
            Attempted::Status { code, .. } => *code >= 500 || *code == 408 || *code == 429,
            Attempted::Timeout | Attempted::ConnectError => true,
            Attempted::Blocked => false,
        };
        {
            let mut limits = endpoint.rt.limits.lock().expect("never poisoned");
            if ok {
                limits.breaker.success();
            } else if unavailable {
                limits
                    .breaker
                    .failure(&self.settings.breaker, Instant::now());
            } else {
                limits.breaker.release(&admission);
            }
        }
        endpoint
            .rt
            .health
            .lock()
            .expect("never poisoned")
            .observe(ok, at, status, error);
    }
}

fn copy_of(event: &Event) -> (String, String, String) {
    (
        event.event_type.clone(),
        event.payload().to_string(),
        event.created_at.clone(),
    )
}
