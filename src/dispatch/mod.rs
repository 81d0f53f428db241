//! Dispatch: sign, send, decide, and hand the outcome to the recorder.
//!
//! `submit` never blocks the caller (the source's read loop or the scheduler): each job becomes a task that
//! waits for a slot of the global concurrency limit. An endpoint that already has
//! `delivery.max_in_flight_per_endpoint` requests open gets its further jobs *parked* (recorded as pending,
//! due now, without an attempt) instead of queued in memory, so a slow or hanging endpoint never holds other
//! endpoints' events or the slot position back for longer than one request timeout (DESIGN.md invariant 5);
//! the scheduler sends parked deliveries as soon as the endpoint has room again.

pub mod client;
pub mod guard;
pub mod retry;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::event::Event;
use crate::fanout::Endpoint;
use crate::record::{Outcome, Recorder};
use crate::source::ack::EventAck;
use crate::store::{AttemptRow, RecordRow, Status};
use client::{HttpClient, SendError};
use retry::{Attempted, Decision, RetryPolicy};

/// One delivery attempt to make.
#[derive(Debug)]
pub struct Job {
    pub event: Arc<Event>,
    pub endpoint: Arc<Endpoint>,
    /// Attempts already made in the current run of the retry schedule.
    pub schedule_step: i32,
    /// The streamed event's acknowledgement (`None` for retries claimed by the scheduler).
    pub ack: Option<Arc<EventAck>>,
    /// The scheduler's share of its claim budget, released when the job ends.
    pub claim: Option<OwnedSemaphorePermit>,
}

pub struct Dispatcher {
    client: HttpClient,
    recorder: Recorder,
    policy: RetryPolicy,
    concurrency: Arc<Semaphore>,
    per_endpoint: usize,
    /// HTTP requests in flight (all endpoints).
    in_flight: AtomicUsize,
    /// `log.payloads`: payloads at debug level, for troubleshooting only.
    log_payloads: bool,
}

impl Dispatcher {
    pub fn new(
        client: HttpClient,
        recorder: Recorder,
        policy: RetryPolicy,
        concurrency: usize,
        per_endpoint: usize,
    ) -> Dispatcher {
        Dispatcher {
            client,
            recorder,
            policy,
            concurrency: Arc::new(Semaphore::new(concurrency.max(1))),
            per_endpoint: per_endpoint.max(1),
            in_flight: AtomicUsize::new(0),
            log_payloads: false,
        }
    }

    /// Logs every attempt's payload at debug level (`log.payloads`); off by default, payloads may be
    /// personal data.
    pub fn with_payload_logging(mut self, on: bool) -> Dispatcher {
        self.log_payloads = on;
        self
    }

    /// HTTP requests in flight right now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// True when the endpoint has no room for another request now.
    pub fn saturated(&self, endpoint: &Endpoint) -> bool {
        endpoint.in_flight.load(Ordering::Relaxed) >= self.per_endpoint
    }

    /// Starts the job, or parks it if its endpoint is saturated.
    pub fn submit(self: &Arc<Self>, job: Job) {
        let previous = job.endpoint.in_flight.fetch_add(1, Ordering::AcqRel);
        if previous >= self.per_endpoint {
            job.endpoint.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.park(job);
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let permit = this
                .concurrency
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore is never closed");
            this.in_flight.fetch_add(1, Ordering::Relaxed);
            metrics::gauge!(crate::metrics::IN_FLIGHT).increment(1.0);
            let row = this.attempt(&job).await;
            metrics::gauge!(crate::metrics::IN_FLIGHT).decrement(1.0);
            this.in_flight.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
            job.endpoint.in_flight.fetch_sub(1, Ordering::AcqRel);
            this.recorder.record(Outcome { row, ack: job.ack });
        });
    }

    fn park(&self, job: Job) {
        metrics::counter!(crate::metrics::PARKED).increment(1);
        let row = RecordRow {
            event_id: job.event.id,
            endpoint_id: job.endpoint.id,
            uid_hex: job.event.uid_hex().to_string(),
            status: Status::Pending,
            schedule_step: job.schedule_step,
            next_attempt_at: Some(SystemTime::now()),
            attempt: None,
            copy: Some(copy_of(&job.event)),
        };
        self.recorder.record(Outcome { row, ack: job.ack });
    }

    /// Makes one attempt and decides what it leaves behind.
    async fn attempt(&self, job: &Job) -> RecordRow {
        let event = &job.event;
        let endpoint = &job.endpoint;
        let attempted_at = SystemTime::now();
        let timestamp = attempted_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let signature = endpoint
            .signer
            .sign(&event.webhook_id, timestamp, &event.body);
        let started = tokio::time::Instant::now();
        let result = self
            .client
            .post(
                &endpoint.uri,
                &event.webhook_id,
                timestamp,
                &signature,
                event.body.clone(),
            )
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
        let attempt_no = (job.schedule_step + 1) as u32;
        let decision = retry::decide(
            &self.policy,
            attempt_no,
            &attempted,
            SystemTime::now(),
            rand::random::<f64>(),
        );
        let (status, next_attempt_at, outcome) = match &decision {
            Decision::Delivered => {
                let since = event.committed_or_created().and_then(|t| t.elapsed().ok());
                if let Some(latency) = since {
                    metrics::histogram!(crate::metrics::DELIVERY_LATENCY)
                        .record(latency.as_secs_f64());
                }
                (Status::Succeeded, None, "delivered")
            }
            Decision::Retry { after } => {
                (Status::Pending, Some(SystemTime::now() + *after), "retry")
            }
            Decision::Dead { .. } | Decision::Gone => (Status::Dead, None, "dead"),
        };
        metrics::counter!(crate::metrics::DELIVERIES, "outcome" => outcome).increment(1);
        // one line per failed attempt, with what an operator greps for; never the payload or the secret
        // (the error is the client's own text or "HTTP <code>", never the response body)
        if let Some(error) = &error {
            tracing::info!(
                endpoint_id = endpoint.id,
                event_id = event.id,
                webhook_id = %event.webhook_id,
                status = status_code,
                attempt = attempt_no,
                next = outcome,
                error = %error,
                "delivery attempt failed"
            );
        }
        if self.log_payloads {
            tracing::debug!(
                endpoint_id = endpoint.id,
                event_id = event.id,
                payload = event.payload(),
                "delivery payload (log.payloads = true)"
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
        }
    }
}

fn copy_of(event: &Event) -> (String, String, String) {
    (
        event.event_type.clone(),
        event.payload().to_string(),
        event.created_at.clone(),
    )
}
