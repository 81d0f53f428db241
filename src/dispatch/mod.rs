//! Dispatch: admit, sign, send, decide, and hand the outcome to the recorder.
//!
//! `submit` never blocks the caller (the source's read loop or the scheduler). A job goes out at once when its
//! endpoint has room. Otherwise it waits in the endpoint's in-memory queue, started as soon as one of the
//! endpoint's requests completes, but for at most `delivery.queue_wait`: a job that waited longer, or one
//! that a limit would hold back for longer (an open breaker, a rate limit with no token soon), is *parked*:
//! recorded as pending, due when the limit will allow it, without an attempt. So a busy but healthy endpoint
//! drains its queue from memory at full speed, while a slow, failing or throttled endpoint never holds other
//! endpoints' events or the slot position back for longer than one request timeout (DESIGN.md invariant 5),
//! and a skipped request consumes no attempt.
//!
//! An endpoint's room is its window, not straight away its whole `max_in_flight`: the window opens by one
//! request per answer and closes by one per request left unanswered, down to a floor (see
//! [`crate::fanout::Progress`]). Endpoints that hang thus hold a few of the global request slots each
//! instead of their whole limit, for a timeout at a time, which kept healthy endpoints waiting for slots.
//!
//! Ordered endpoints are the exception to "send at once": a keyed event is always parked with its commit
//! position, and the scheduler sends only the oldest pending delivery of each key (one in flight per key).

pub mod client;
pub mod guard;
pub mod limits;
pub mod proxy;
pub mod retry;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::event::Event;
use crate::fanout::Endpoint;
use crate::record::{Outcome, Recorder};
use crate::source::ack::EventAck;
use crate::store::{AttemptRow, RecordRow, Status};
use client::{HttpClient, Outgoing, SendError};
use limits::{Admission, BreakerPolicy, Transition};
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
    /// For deliveries claimed by the scheduler: its share of the claim budget (released when the outcome is
    /// written) and the lease's deadline.
    pub claim: Option<Claim>,
}

/// A scheduler claim: the delivery is this instance's until its lease lapses.
#[derive(Debug)]
pub struct Claim {
    pub permit: OwnedSemaphorePermit,
    /// The latest moment the attempt may begin and still end within the lease. A job that waited past it
    /// for the global concurrency limit is dropped unsent: another instance may have claimed it since.
    pub start_by: Instant,
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
    /// Requests in flight to one tenant's endpoints together.
    pub max_in_flight_per_tenant: usize,
    /// Longest a job waits in memory for room at its endpoint before it is parked.
    pub queue_wait: Duration,
}

pub struct Dispatcher {
    client: HttpClient,
    recorder: Recorder,
    settings: DispatchSettings,
    concurrency: Arc<Semaphore>,
    disable: mpsc::UnboundedSender<Disable>,
    /// Endpoints with jobs queued in memory, for the sweeper.
    waiting: std::sync::Mutex<HashMap<i64, Arc<Endpoint>>>,
    /// HTTP requests in flight (all endpoints).
    in_flight: AtomicUsize,
    /// `log.payloads`: payloads at debug level, for troubleshooting only.
    log_payloads: bool,
    /// `tracing.otlp_endpoint`: each attempt's span is exported.
    spans: Option<crate::trace::Exporter>,
    /// The event catalog, checked before each request, and what renders payloads for pinned endpoints.
    catalog: Option<(Arc<crate::catalog::CatalogCell>, crate::catalog::Renderer)>,
}

/// Why a job is not sent now.
enum Unsent {
    /// The catalog refuses it: recorded dead with the reason.
    Refuse(String),
    /// Its rendering needs the database, which is unreachable: parked, tried again later.
    Later(String),
}

/// Gives back what `try_start` took for a request that is not made: the breaker's admission and the slot.
fn unused(endpoint: &Endpoint, admission: &Admission) {
    endpoint
        .rt
        .limits
        .lock()
        .expect("never poisoned")
        .breaker
        .release(admission);
    release_slot(endpoint);
}

/// Gives back the in-flight slot `try_start` took at the endpoint (and its tenant).
fn release_slot(endpoint: &Endpoint) {
    endpoint.rt.in_flight.fetch_sub(1, Ordering::AcqRel);
    if let Some(tenant) = &endpoint.tenant_in_flight {
        tenant.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What an endpoint's limits say about one more request.
enum Start {
    Go(Admission),
    /// No room now; the job may wait in the queue.
    Full,
    /// Held back for longer than it should wait in memory: park it, due then.
    Park(SystemTime),
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
            waiting: Default::default(),
            in_flight: AtomicUsize::new(0),
            log_payloads: false,
            spans: None,
            catalog: None,
        }
    }

    /// Checks events against the catalog and renders them for pinned endpoints.
    pub fn with_catalog(
        mut self,
        catalog: Arc<crate::catalog::CatalogCell>,
        renderer: crate::catalog::Renderer,
    ) -> Dispatcher {
        self.catalog = Some((catalog, renderer));
        self
    }

    /// The event as this endpoint gets it: checked against its version's schema, in its pinned version.
    async fn prepare(&self, job: &Job) -> Result<Arc<Event>, Unsent> {
        use crate::catalog::{Plan, RenderError};
        let Some((cell, renderer)) = &self.catalog else {
            return Ok(job.event.clone());
        };
        let catalog = cell.get();
        if catalog.is_empty() && job.event.version.is_none() {
            return Ok(job.event.clone()); // no catalog: nothing to check or render
        }
        let pin = job.endpoint.pins.get(&job.event.event_type).copied();
        match catalog.plan(&job.event, pin) {
            Plan::Send(event) => Ok(event),
            Plan::Refuse(why) => Err(Unsent::Refuse(why)),
            Plan::Render { event, from, to } => renderer
                .render(&catalog, &event, from, to)
                .await
                .map(Arc::new)
                .map_err(|e| match e {
                    RenderError::Refuse(why) => Unsent::Refuse(why),
                    RenderError::Later(why) => Unsent::Later(why),
                }),
        }
    }

    /// Logs every attempt's payload at debug level (`log.payloads`); off by default, payloads may be
    /// personal data.
    pub fn with_payload_logging(mut self, on: bool) -> Dispatcher {
        self.log_payloads = on;
        self
    }

    /// Exports a span per attempt (`tracing.otlp_endpoint`).
    pub fn with_span_export(mut self, spans: Option<crate::trace::Exporter>) -> Dispatcher {
        self.spans = spans;
        self
    }

    /// The trace id an event's logs carry: its row's, or with spans exported the one its attempts start.
    fn trace_id(&self, event: &Event) -> Option<String> {
        crate::trace::trace_id_of(event, self.spans.is_some())
    }

    /// HTTP requests in flight right now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn max_in_flight(&self, endpoint: &Endpoint) -> usize {
        endpoint
            .policy
            .max_in_flight
            .unwrap_or(self.settings.max_in_flight_per_endpoint)
            .max(1)
    }

    /// The requests the endpoint may have in flight now: its limit, or less while its window is opening (or
    /// closed again by requests it does not answer; see [`crate::fanout::Progress::window`]).
    fn window(&self, endpoint: &Endpoint) -> usize {
        endpoint
            .rt
            .progress
            .lock()
            .expect("never poisoned")
            .window(self.max_in_flight(endpoint))
    }

    /// How many more requests the endpoint accepts now (the scheduler claims no more than that), counting
    /// its in-flight limit, an open breaker and its rate limit.
    /// `depth` is how many rounds of its in-flight limit it may have started or queued (the scheduler asks
    /// for 2, so an endpoint's next requests are ready when the current ones complete).
    pub fn room(&self, endpoint: &Endpoint, depth: usize) -> usize {
        if endpoint.paused {
            return 0; // its deliveries wait in SQL until it is resumed
        }
        let queued = endpoint.rt.queue.lock().expect("never poisoned").len();
        let open = (self.window(endpoint) * depth)
            .saturating_sub(endpoint.rt.in_flight.load(Ordering::Relaxed) + queued);
        let open = match &endpoint.tenant_in_flight {
            Some(tenant) => open.min(
                (self.settings.max_in_flight_per_tenant * depth)
                    .saturating_sub(tenant.load(Ordering::Relaxed)),
            ),
            None => open,
        };
        let now = Instant::now();
        let mut limits = endpoint.rt.limits.lock().expect("never poisoned");
        let open = open.min(limits.breaker.room(now));
        let open = match limits.bucket.as_mut() {
            Some(bucket) => open.min(bucket.available(now)),
            None => open,
        };
        match &endpoint.tenant_bucket {
            Some(bucket) => open.min(bucket.lock().expect("never poisoned").available(now)),
            None => open,
        }
    }

    /// Starts the job, queues it behind its endpoint's requests in flight, or parks it.
    pub fn submit(self: &Arc<Self>, job: Job) {
        if let Some(why) = &job.endpoint.unusable {
            let why = why.clone();
            self.refuse(job, why);
            return;
        }
        if job.must_queue() || job.endpoint.paused {
            self.park(job, SystemTime::now());
            return;
        }
        let endpoint = job.endpoint.clone();
        let mut queue = endpoint.rt.queue.lock().expect("never poisoned");
        if queue.is_empty() {
            match self.try_start(&endpoint) {
                Start::Go(admission) => {
                    drop(queue);
                    self.spawn(job, admission);
                    return;
                }
                Start::Park(at) => {
                    drop(queue);
                    self.park(job, at);
                    return;
                }
                Start::Full => {}
            }
        }
        // a queue that cannot move within queue_wait (slow or hanging requests ahead) does not hold the job
        // in memory, and so neither the events budget nor the stream behind it: it is parked at once. Jobs the
        // scheduler claimed are within the endpoint's room already, and wait.
        let now = Instant::now();
        if job.claim.is_none()
            && endpoint
                .rt
                .progress
                .lock()
                .expect("never poisoned")
                .backed_up(
                    queue.len(),
                    self.max_in_flight(&endpoint),
                    self.settings.queue_wait,
                    now,
                )
        {
            drop(queue);
            self.park(job, SystemTime::now());
            return;
        }
        queue.push_back((now, job));
        // registered under the queue's lock, so the sweeper cannot drop an endpoint that just got a job
        self.waiting
            .lock()
            .expect("never poisoned")
            .insert(endpoint.id, endpoint.clone());
        drop(queue);
    }

    /// Whether the endpoint takes one more request now; on `Go` its in-flight count is already taken.
    fn try_start(&self, endpoint: &Endpoint) -> Start {
        let previous = endpoint.rt.in_flight.fetch_add(1, Ordering::AcqRel);
        if previous >= self.window(endpoint) {
            endpoint.rt.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Start::Full;
        }
        if let Some(tenant) = &endpoint.tenant_in_flight {
            // the tenant's endpoints together: one customer's slow endpoints never take every request slot
            if tenant.fetch_add(1, Ordering::AcqRel) >= self.settings.max_in_flight_per_tenant {
                tenant.fetch_sub(1, Ordering::AcqRel);
                endpoint.rt.in_flight.fetch_sub(1, Ordering::AcqRel);
                return Start::Full;
            }
        }
        let now = Instant::now();
        let mut limits = endpoint.rt.limits.lock().expect("never poisoned");
        let verdict = match limits.breaker.admit(now) {
            Admission::Wait(until) => Start::Park(later(until.saturating_duration_since(now))),
            admission => {
                // the endpoint's rate limit and its tenant's (shared by the tenant's endpoints): a token of
                // each is taken only when both have one
                let mut tenant = endpoint
                    .tenant_bucket
                    .as_ref()
                    .map(|b| b.lock().expect("never poisoned"));
                let wait = limits
                    .bucket
                    .as_mut()
                    .and_then(|b| b.wait(now))
                    .max(tenant.as_mut().and_then(|b| b.wait(now)));
                match wait {
                    Some(wait) => {
                        limits.breaker.release(&admission);
                        if wait > self.settings.queue_wait {
                            Start::Park(later(wait))
                        } else {
                            Start::Full
                        }
                    }
                    None => {
                        if let Some(b) = limits.bucket.as_mut() {
                            let _ = b.take(now);
                        }
                        if let Some(b) = tenant.as_mut() {
                            let _ = b.take(now);
                        }
                        Start::Go(admission)
                    }
                }
            }
        };
        if !matches!(verdict, Start::Go(_)) {
            release_slot(endpoint);
        }
        verdict
    }

    fn spawn(self: &Arc<Self>, job: Job, admission: Admission) {
        let this = self.clone();
        tokio::spawn(async move {
            let permit = this
                .concurrency
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore is never closed");
            if job
                .claim
                .as_ref()
                .is_some_and(|c| Instant::now() > c.start_by)
            {
                // its lease ends before the attempt could: leave the row to whoever claims it next (writing
                // anything now could overwrite that instance's outcome)
                tracing::debug!(
                    endpoint_id = job.endpoint.id,
                    event_id = job.event.id,
                    trace_id = this.trace_id(&job.event),
                    "a claimed delivery waited past its lease for the concurrency limit; left for the next claim"
                );
                drop(permit);
                unused(&job.endpoint, &admission);
                let endpoint = job.endpoint.clone();
                drop(job);
                this.pump(&endpoint, false);
                return;
            }
            // the request's futures are boxed, so that a task still waiting for a permit above is small: with
            // thousands of jobs waiting for the global limit, their futures' full size was most of the RSS
            let send = match Box::pin(this.prepare(&job)).await {
                Ok(send) => send,
                Err(unsent) => {
                    // no request: the slot, the breaker's admission and the permit go back unused
                    drop(permit);
                    unused(&job.endpoint, &admission);
                    let endpoint = job.endpoint.clone();
                    match unsent {
                        Unsent::Refuse(why) => this.refuse(job, why),
                        Unsent::Later(why) => {
                            tracing::warn!(
                                endpoint_id = endpoint.id,
                                event_id = job.event.id,
                                "rendering the event in the endpoint's pinned version needs the database: \
                                 {why}; the delivery is parked and tried again"
                            );
                            this.park(job, later(Duration::from_secs(5)));
                        }
                    }
                    this.pump(&endpoint, false);
                    return;
                }
            };
            this.in_flight.fetch_add(1, Ordering::Relaxed);
            metrics::gauge!(crate::metrics::IN_FLIGHT).increment(1.0);
            let started = Instant::now();
            let progress = &job.endpoint.rt.progress;
            progress.lock().expect("never poisoned").started(started);
            let row = Box::pin(this.attempt(&job, &send, admission)).await;
            let now = Instant::now();
            let answered = row
                .attempt
                .as_ref()
                .is_some_and(|a| a.status_code.is_some());
            {
                let mut progress = progress.lock().expect("never poisoned");
                progress.completed(now - started, now);
                progress.answered(answered, this.max_in_flight(&job.endpoint));
            }
            metrics::gauge!(crate::metrics::IN_FLIGHT).decrement(1.0);
            this.in_flight.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
            release_slot(&job.endpoint);
            let endpoint = job.endpoint.clone();
            this.recorder.record(Outcome {
                row,
                ack: job.ack,
                claim: job.claim.map(|c| c.permit),
            });
            this.pump(&endpoint, false);
        });
    }

    /// Starts queued jobs while the endpoint has room; with `expire`, parks those that waited too long.
    fn pump(self: &Arc<Self>, endpoint: &Arc<Endpoint>, expire: bool) {
        let now = Instant::now();
        loop {
            let mut queue = endpoint.rt.queue.lock().expect("never poisoned");
            let Some((since, _)) = queue.front() else {
                return;
            };
            let verdict =
                if expire && now.saturating_duration_since(*since) > self.settings.queue_wait {
                    Start::Park(SystemTime::now())
                } else {
                    self.try_start(endpoint)
                };
            match verdict {
                Start::Full => return,
                Start::Go(admission) => {
                    let (_, job) = queue.pop_front().expect("front exists");
                    drop(queue);
                    self.spawn(job, admission);
                }
                Start::Park(at) => {
                    let (_, job) = queue.pop_front().expect("front exists");
                    drop(queue);
                    self.park(job, at);
                }
            }
        }
    }

    /// Every few milliseconds: parks queued jobs that waited longer than `delivery.queue_wait` and starts
    /// those a refilled rate limit now allows. Ends when the dispatcher is dropped.
    pub async fn sweep(this: std::sync::Weak<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(this) = this.upgrade() else { return };
            let endpoints: Vec<Arc<Endpoint>> = this
                .waiting
                .lock()
                .expect("never poisoned")
                .values()
                .cloned()
                .collect();
            for endpoint in endpoints {
                this.pump(&endpoint, true);
                let queue = endpoint.rt.queue.lock().expect("never poisoned");
                if queue.is_empty() {
                    this.waiting
                        .lock()
                        .expect("never poisoned")
                        .remove(&endpoint.id);
                }
                drop(queue);
            }
        }
    }

    /// At shutdown: parks every queued job (recorded as pending, so nothing waits in memory).
    pub fn park_queued(self: &Arc<Self>) {
        let endpoints: Vec<Arc<Endpoint>> = self
            .waiting
            .lock()
            .expect("never poisoned")
            .drain()
            .map(|(_, e)| e)
            .collect();
        for endpoint in endpoints {
            let jobs: Vec<Job> = endpoint
                .rt
                .queue
                .lock()
                .expect("never poisoned")
                .drain(..)
                .map(|(_, j)| j)
                .collect();
            for job in jobs {
                self.park(job, SystemTime::now());
            }
        }
    }

    /// Records the delivery dead without a request, with the reason (its endpoint's row cannot be used): an
    /// event is never acknowledged for an endpoint it matched without a delivery row saying what happened.
    fn refuse(&self, job: Job, why: String) {
        metrics::counter!(crate::metrics::DELIVERIES, "outcome" => "dead").increment(1);
        tracing::info!(
            endpoint_id = job.endpoint.id,
            event_id = job.event.id,
            webhook_id = %job.event.webhook_id,
            trace_id = self.trace_id(&job.event),
            next = "dead",
            error = %why,
            "delivery refused"
        );
        let row = RecordRow {
            event_id: job.event.id,
            endpoint_id: job.endpoint.id,
            uid_hex: job.event.uid_hex().to_string(),
            status: Status::Dead,
            schedule_step: job.schedule_step,
            next_attempt_at: None,
            attempt: Some(AttemptRow {
                attempted_at: SystemTime::now(),
                duration_ms: 0,
                status_code: None,
                error: Some(why),
                response_body: None,
            }),
            copy: Some(job.event.clone()),
            ordering: None,
            tenant: job.event.tenant.clone(),
        };
        self.recorder.record(Outcome {
            row,
            ack: job.ack,
            claim: job.claim.map(|c| c.permit),
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
            copy: Some(job.event.clone()),
            ordering,
            tenant: job.event.tenant.clone(),
        };
        self.recorder.record(Outcome {
            row,
            ack: job.ack,
            claim: job.claim.map(|c| c.permit),
        });
    }

    fn ordering(&self, job: &Job) -> Option<(String, crate::lsn::Lsn)> {
        if !job.endpoint.policy.ordered {
            return None;
        }
        let key = job.event.ordering_key.clone()?;
        Some((key, job.event.commit_lsn.unwrap_or_default()))
    }

    /// Makes one attempt and decides what it leaves behind.
    /// `send` is the job's event as its endpoint gets it (checked, in its pinned version); the job's own
    /// event stays the delivery's copy.
    async fn attempt(&self, job: &Job, send: &Event, admission: Admission) -> RecordRow {
        let event = &job.event;
        let endpoint = &job.endpoint;
        let attempted_at = SystemTime::now();
        let timestamp = attempted_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let rendition = send.rendition(endpoint.format);
        let signature = endpoint.signature(&event.webhook_id, timestamp, &rendition.body);
        let span = crate::trace::AttemptSpan::start(event, self.spans.is_some());
        let traceparent = span.context.map(|c| c.to_string());
        let started = tokio::time::Instant::now();
        let result = self
            .client
            .post(Outgoing {
                uri: &endpoint.uri,
                webhook_id: &event.webhook_id,
                timestamp,
                signature: &signature,
                body: rendition.body,
                content_type: rendition.content_type,
                extra_headers: &rendition.headers,
                timeout: endpoint.policy.timeout.unwrap_or(self.settings.timeout),
                headers: &endpoint.policy.headers,
                proxy: &endpoint.policy.proxy,
                traceparent: traceparent.as_deref(),
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
                    SendError::Connect(_) | SendError::Proxy(_) | SendError::Request(_) => {
                        Attempted::ConnectError
                    }
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
            job,
            &attempted,
            admission,
            started.into_std(),
            attempted_at,
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
            Decision::Delivered => {
                let since = event.committed_or_created().and_then(|t| t.elapsed().ok());
                if let Some(latency) = since {
                    metrics::histogram!(crate::metrics::DELIVERY_LATENCY)
                        .record(latency.as_secs_f64());
                }
                (Status::Succeeded, None, "delivered")
            }
            Decision::Retry { after } => (Status::Pending, Some(later(*after)), "retry"),
            Decision::Dead { .. } => (Status::Dead, None, "dead"),
            Decision::Gone => {
                let at = humantime::format_rfc3339_seconds(attempted_at);
                let reason = format!(
                    "the endpoint answered 410 Gone at {at}; once it takes deliveries again: UPDATE \
                     walhook.endpoints SET enabled = true, then SELECT walhook.recover({}, since => '{at}') \
                     re-creates what it missed",
                    endpoint.id
                );
                let _ = self.disable.send(Disable {
                    endpoint_id: endpoint.id,
                    reason,
                });
                (Status::Dead, None, "gone")
            }
        };
        metrics::counter!(crate::metrics::DELIVERIES, "outcome" => outcome).increment(1);
        // one line per failed attempt, with what an operator greps for; never the payload or the secret
        // (the error is the client's own text or "HTTP <code>", never the response body)
        let trace_id = span.trace_id();
        if let Some(error) = &error {
            tracing::info!(
                endpoint_id = endpoint.id,
                event_id = event.id,
                webhook_id = %event.webhook_id,
                trace_id,
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
                trace_id,
                payload = event.payload(),
                "delivery payload (log.payloads = true)"
            );
        }
        if let Some(spans) = &self.spans {
            let error_type = match &result {
                Ok(r) if !(200..300).contains(&r.status) => Some(Cow::Owned(r.status.to_string())),
                Ok(_) => None,
                Err(SendError::Timeout(_)) => Some(Cow::Borrowed("timeout")),
                Err(SendError::Blocked(_)) => Some(Cow::Borrowed("blocked")),
                Err(SendError::Connect(_)) => Some(Cow::Borrowed("connect")),
                Err(SendError::Request(_)) => Some(Cow::Borrowed("request")),
                Err(SendError::Proxy(_)) => Some(Cow::Borrowed("proxy")),
            };
            spans.export(
                span,
                crate::trace::AttemptEnd {
                    endpoint_id: endpoint.id,
                    uri: &endpoint.uri,
                    event,
                    attempt: attempt_no,
                    status_code,
                    outcome,
                    error_type,
                    error: error.as_deref(),
                },
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
            copy: (status != Status::Succeeded || !event.in_outbox).then(|| event.clone()),
            ordering: if status == Status::Pending {
                self.ordering(job)
            } else {
                None
            },
            tenant: event.tenant.clone(),
        }
    }

    /// Feeds the attempt to the endpoint's breaker and health counters. The breaker counts only signs that
    /// the endpoint is unavailable (timeouts, connection failures, 5xx, 408, 429); a 4xx rejection is the
    /// receiver working as designed.
    /// `began` and `at` are when the attempt began, on the monotonic and the wall clock.
    fn observe(
        &self,
        job: &Job,
        attempted: &Attempted,
        admission: Admission,
        began: Instant,
        at: SystemTime,
        error: Option<&str>,
    ) {
        let endpoint = &job.endpoint;
        // a delivery that failed before and fails again: the endpoint is not just refusing new deliveries
        let retry = job.schedule_step > 0;
        let status = match attempted {
            Attempted::Status { code, .. } => Some(i32::from(*code)),
            _ => None,
        };
        let ok = matches!(attempted, Attempted::Status { code, .. } if (200..300).contains(code));
        let unavailable = match attempted {
            Attempted::Status { code, .. } => *code >= 500 || *code == 408 || *code == 429,
            Attempted::Timeout | Attempted::ConnectError => true,
            Attempted::Blocked => false,
        };
        let transition = {
            let mut limits = endpoint.rt.limits.lock().expect("never poisoned");
            if ok {
                limits.breaker.success()
            } else if unavailable {
                limits
                    .breaker
                    .failure(&self.settings.breaker, Instant::now(), began, retry)
            } else {
                limits.breaker.release(&admission);
                None
            }
        };
        match transition {
            Some(Transition::Opened {
                failed,
                of,
                cooldown,
            }) => tracing::warn!(
                endpoint_id = endpoint.id,
                error = error.unwrap_or_default(),
                "circuit breaker opened: {failed} of the last {of} attempts failed; deliveries wait \
                 (without using attempts) and {} probes go in {}",
                limits::PROBES,
                humantime::format_duration(cooldown)
            ),
            Some(Transition::Reopened { cooldown }) => tracing::warn!(
                endpoint_id = endpoint.id,
                error = error.unwrap_or_default(),
                "circuit breaker probes failed; probing again in {}",
                humantime::format_duration(cooldown)
            ),
            Some(Transition::Closed) => tracing::info!(
                endpoint_id = endpoint.id,
                "circuit breaker closed: a probe succeeded, deliveries resume"
            ),
            None => {}
        }
        endpoint
            .rt
            .health
            .lock()
            .expect("never poisoned")
            .observe(ok, at, status, error);
    }
}

/// `now + wait` on the wall clock, saturating far in the future instead of overflowing.
fn later(wait: Duration) -> SystemTime {
    let now = SystemTime::now();
    now.checked_add(wait)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}
