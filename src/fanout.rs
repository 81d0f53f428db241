//! Fan-out: which enabled endpoints an event goes to.
//!
//! Matching runs once per event on the hot path, so it reads an in-memory snapshot of `walhook.endpoints`
//! (an `Arc` swapped under a short lock) rather than querying. The snapshot follows the table within one
//! `endpoints.refresh_interval`: a statement trigger bumps `walhook.endpoints_generation` in the writer's own
//! transaction, and the refresher reloads only when that committed generation changes. Unchanged endpoints keep
//! their `Arc` across reloads, so their prepared HMAC key and in-flight counters survive. The poll is the
//! fallback: a source that meets a change in commit order asks for the reload and waits for it
//! ([`EndpointCache::catch_up`]), so an event committed after an endpoint change is fanned out by it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

use crate::dispatch::limits::{Breaker, TokenBucket};
use crate::dispatch::proxy::EndpointProxy;
use crate::dispatch::Job;
use crate::event::Event;
use crate::sign::{Ed25519Signer, Signer};
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};

/// The type prefix reserved for the events walhook publishes about itself (`walhook.endpoint.disabled`, …);
/// applications cannot insert such types (sql/012_operational_events.sql).
pub const OPERATIONAL_PREFIX: &str = "walhook.";

/// The type of `walhook.send_test()`'s events: delivered only to the endpoint the test is for (its delivery is
/// queued by the function), never fanned out, whatever the patterns.
pub const TEST_EVENT: &str = "walhook.test";

/// The type of `walhook.verify_endpoint()`'s requests: like a test, only to the endpoint being verified.
pub const VERIFICATION_EVENT: &str = "walhook.endpoint.verification";

/// Types whose delivery is queued by SQL for one endpoint and that no pattern matches (`walhook.matches`
/// in SQL holds the same list).
const DIRECT_EVENTS: [&str; 2] = [TEST_EVENT, VERIFICATION_EVENT];

/// An event-type pattern: `*`, a prefix like `order.*`, or an exact type. `*` leaves out walhook's own
/// operational events (types under [`OPERATIONAL_PREFIX`]): a receiver written for the application's events
/// never gets them unless its patterns name them (`walhook.*`, or an exact type).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    All,
    /// Matches types starting with this prefix, which includes its trailing dot (`order.`).
    Prefix(String),
    Exact(String),
}

impl Pattern {
    pub fn parse(p: &str) -> Pattern {
        if p == "*" {
            Pattern::All
        } else if let Some(prefix) = p.strip_suffix('*') {
            Pattern::Prefix(prefix.to_string())
        } else {
            Pattern::Exact(p.to_string())
        }
    }

    pub fn matches(&self, event_type: &str) -> bool {
        if DIRECT_EVENTS.contains(&event_type) {
            return false;
        }
        match self {
            Pattern::All => !event_type.starts_with(OPERATIONAL_PREFIX),
            Pattern::Prefix(prefix) => {
                event_type.len() > prefix.len() && event_type.starts_with(prefix.as_str())
            }
            Pattern::Exact(t) => t == event_type,
        }
    }
}

/// Whether `payload` contains `filter` as PostgreSQL's `jsonb @>` decides it, so that the daemon's fan-out and
/// SQL (`walhook.matches` and recovery) agree on which endpoints an event goes to: an object contains an
/// object whose every key it has with a containing value; an array contains an array whose every element it
/// contains in some element (order and repetition do not matter); scalars contain equal scalars (numbers by
/// value, `1` and `1.0` alike); and, as PostgreSQL's one exception, an array at the top contains a scalar it
/// holds.
pub fn jsonb_contains(payload: &serde_json::Value, filter: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (payload, filter) {
        (Value::Array(items), scalar) if !scalar.is_array() && !scalar.is_object() => {
            items.iter().any(|item| same_scalar(item, scalar))
        }
        _ => contains_nested(payload, filter),
    }
}

fn contains_nested(payload: &serde_json::Value, filter: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (payload, filter) {
        (Value::Object(have), Value::Object(want)) => want
            .iter()
            .all(|(k, w)| have.get(k).is_some_and(|h| contains_nested(h, w))),
        (Value::Array(have), Value::Array(want)) => want
            .iter()
            .all(|w| have.iter().any(|h| contains_nested(h, w))),
        (Value::Object(_) | Value::Array(_), _) | (_, Value::Object(_) | Value::Array(_)) => false,
        (h, w) => same_scalar(h, w),
    }
}

fn same_scalar(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => same_number(&x.to_string(), &y.to_string()),
        (Value::Object(_) | Value::Array(_), _) | (_, Value::Object(_) | Value::Array(_)) => false,
        (x, y) => x == y,
    }
}

/// Whether two JSON number texts have the same value, exactly, as PostgreSQL's `numeric` compares them:
/// `1`, `1.0` and `1e0` are equal, `100000000000000000000000000001` and `…000` are not (serde_json keeps the
/// text, with its `arbitrary_precision` feature, so nothing is rounded through `f64`).
fn same_number(a: &str, b: &str) -> bool {
    decimal(a).is_some_and(|a| Some(a) == decimal(b))
}

/// A JSON number as (negative, significant digits without leading or trailing zeros, exponent of the last
/// digit); zero is (false, "", 0).
fn decimal(text: &str) -> Option<(bool, String, i64)> {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], rest[i + 1..].parse::<i64>().ok()?),
        None => (rest, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let mut digits: String = whole.chars().chain(fraction.chars()).collect();
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut exponent = exponent.checked_sub(fraction.len() as i64)?;
    let trailing = digits.len() - digits.trim_end_matches('0').len();
    digits.truncate(digits.len() - trailing);
    exponent = exponent.checked_add(trailing as i64)?;
    let digits = digits.trim_start_matches('0').to_string();
    if digits.is_empty() {
        return Some((false, digits, 0));
    }
    Some((negative, digits, exponent))
}

/// An enabled endpoint as the daemon uses it: its configuration (rebuilt when the row changes) and its
/// runtime state (kept across reloads, keyed by id).
#[derive(Debug)]
pub struct Endpoint {
    pub id: i64,
    pub url: String,
    pub uri: http::Uri,
    pub patterns: Vec<Pattern>,
    /// The current secret first, then secrets still in a rotation's grace period: one `v1` each.
    pub signers: Vec<Signer>,
    /// Optional ed25519 key: adds a `v1a` signature.
    pub ed25519: Option<Ed25519Signer>,
    pub policy: Policy,
    pub rt: Arc<Runtime>,
    /// Paused: its deliveries are recorded as pending and held until it is resumed.
    pub paused: bool,
    /// The tenant whose events it receives (`None`: events without a tenant), or every tenant's.
    pub tenant: Option<String>,
    pub all_tenants: bool,
    /// Events are sent only if their payload contains this (`payload @> filter`).
    pub filter: Option<serde_json::Value>,
    /// The tenant's rate limit (`walhook.tenants.rate_limit`), shared by all of its endpoints.
    pub tenant_bucket: Option<Arc<Mutex<TokenBucket>>>,
    /// Requests in flight to all of the tenant's endpoints (dispatch keeps it below the per-tenant limit);
    /// `None` for endpoints without a tenant, and the firehose.
    pub tenant_in_flight: Option<Arc<AtomicUsize>>,
    /// Why the row cannot be used (a key that does not verify, a URL no request can carry): its
    /// deliveries are recorded dead with this reason, never skipped. `None` for a usable endpoint.
    pub unusable: Option<String>,
    /// The catalog version each event type is pinned to (`walhook.endpoints.event_versions`).
    pub pins: std::collections::HashMap<String, i32>,
    /// The request's shape: Standard Webhooks or CloudEvents.
    pub format: crate::event::Format,
    /// Disabled until it answers its verification request: loaded only to be sent that, it accepts no event.
    pub awaiting_verification: bool,
    /// Fingerprint of the row's delivery-relevant columns, to reuse the `Arc` across reloads.
    fingerprint: String,
}

/// Per-endpoint settings; `None` means the configured default.
#[derive(Debug, Default)]
pub struct Policy {
    pub timeout: Option<Duration>,
    pub retry_schedule: Option<Vec<Duration>>,
    pub rate_limit: Option<f64>,
    pub max_in_flight: Option<usize>,
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    pub ordered: bool,
    /// The `proxy` column: the configured proxy, none, or the endpoint's own.
    pub proxy: EndpointProxy,
}

/// What changes while the endpoint is used: requests in flight, the breaker, the rate limiter, and health
/// counters for `walhook.endpoint_state`.
#[derive(Debug)]
pub struct Runtime {
    /// Requests to this endpoint now in flight (dispatch keeps it below the per-endpoint limit).
    pub in_flight: AtomicUsize,
    /// Jobs waiting for room at this endpoint, oldest first, each with the time it started waiting.
    pub queue: Mutex<VecDeque<(Instant, Job)>>,
    pub limits: Mutex<Limits>,
    pub health: Mutex<Health>,
    /// How fast the endpoint works through its requests: whether a queued job can start within
    /// `delivery.queue_wait` at all.
    pub progress: Mutex<Progress>,
}

/// The requests an endpoint may have in flight before it has answered any (and after it stops answering):
/// its window starts here and never falls below it.
pub const FIRST_WINDOW: usize = 4;

/// An endpoint's pace, as dispatch sees it.
#[derive(Debug)]
pub struct Progress {
    /// Moving average of its requests' durations (`None` before the first completes).
    pub latency: Option<Duration>,
    /// The last time one of its requests started or completed.
    pub at: Instant,
    /// How many requests it may have in flight now, within its limit (`max_in_flight`): one more for each
    /// request it answers (any HTTP status), one fewer for each it does not (a timeout, a failed
    /// connection), never below `FIRST_WINDOW`. An endpoint that answers reaches its limit within a few
    /// round trips (the window doubles per round trip, as TCP's slow start does); one that hangs keeps only
    /// `FIRST_WINDOW` of the global request slots busy instead of its whole limit, for a timeout each; one
    /// that answers some requests keeps a window between the two, and never less than `FIRST_WINDOW`.
    pub window: usize,
}

impl Progress {
    pub fn new(now: Instant) -> Progress {
        Progress {
            latency: None,
            at: now,
            window: FIRST_WINDOW,
        }
    }

    /// The requests it may have in flight now, with `max_in_flight` its limit.
    pub fn window(&self, max_in_flight: usize) -> usize {
        self.window.min(max_in_flight).max(1)
    }

    /// A request got an answer (`answered`) or ended without one.
    pub fn answered(&mut self, answered: bool, max_in_flight: usize) {
        self.window = if answered {
            (self.window + 1).min(max_in_flight.max(FIRST_WINDOW))
        } else {
            self.window.saturating_sub(1).max(FIRST_WINDOW)
        };
    }

    /// A request started.
    pub fn started(&mut self, now: Instant) {
        self.at = now;
    }

    /// A request that took `took` completed.
    pub fn completed(&mut self, took: Duration, now: Instant) {
        self.at = now;
        self.latency = Some(match self.latency {
            None => took,
            Some(average) => (average * 7 + took) / 8,
        });
    }

    /// Whether a job behind `queued` others, at an endpoint with `max_in_flight` requests in flight, would
    /// wait longer than `queue_wait` to start: several rounds of slow requests ahead of it, or nothing started
    /// or completed for longer than that (requests that hang).
    pub fn backed_up(
        &self,
        queued: usize,
        max_in_flight: usize,
        queue_wait: Duration,
        now: Instant,
    ) -> bool {
        let max = max_in_flight.max(1);
        if queued < max {
            return false;
        }
        let rounds = u32::try_from(queued / max + 1).unwrap_or(u32::MAX);
        self.latency
            .is_some_and(|l| l.saturating_mul(rounds) > queue_wait)
            || now.saturating_duration_since(self.at) > queue_wait
    }
}

#[derive(Debug)]
pub struct Limits {
    pub breaker: Breaker,
    pub bucket: Option<TokenBucket>,
}

/// Health as written to `walhook.endpoint_state` and `walhook.endpoint_stats`.
#[derive(Debug, Default, Clone)]
pub struct Health {
    /// The first failure since the last success seen here (SQL merges every instance's).
    pub failing_since: Option<SystemTime>,
    pub last_success_at: Option<SystemTime>,
    pub last_failure_at: Option<SystemTime>,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    /// Attempts not yet added to `walhook.endpoint_stats`: (10-minute bucket, successes, failures).
    pub unwritten: Vec<(SystemTime, i64, i64)>,
    /// Set when something changed since the state was last written.
    pub dirty: bool,
}

/// The statistics bucket `at` falls in: 10-minute buckets, so "the last hour" is six of them.
pub fn stats_bucket(at: SystemTime) -> SystemTime {
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    UNIX_EPOCH + Duration::from_secs(secs - secs % 600)
}

impl Health {
    pub fn observe(&mut self, ok: bool, at: SystemTime, status: Option<i32>, error: Option<&str>) {
        let bucket = stats_bucket(at);
        match self.unwritten.iter_mut().find(|b| b.0 == bucket) {
            Some(b) if ok => b.1 += 1,
            Some(b) => b.2 += 1,
            None => self.unwritten.push((bucket, ok as i64, !ok as i64)),
        }
        if ok {
            self.failing_since = None;
            self.last_success_at = Some(at);
        } else {
            self.failing_since.get_or_insert(at);
            self.last_failure_at = Some(at);
            self.last_error = error.map(str::to_string);
        }
        self.last_status_code = status;
        self.dirty = true;
    }
}

impl Runtime {
    fn new(rate_limit: Option<f64>) -> Runtime {
        let now = Instant::now();
        Runtime {
            in_flight: AtomicUsize::new(0),
            queue: Mutex::new(VecDeque::new()),
            limits: Mutex::new(Limits {
                breaker: Breaker::new(now),
                bucket: rate_limit.map(|r| TokenBucket::new(r, now)),
            }),
            health: Mutex::new(Health::default()),
            progress: Mutex::new(Progress::new(now)),
        }
    }
}

impl Endpoint {
    /// Whether the endpoint receives `event`: the rule of `walhook.endpoint_accepts` in SQL (recovery and
    /// backfills use it), applied here to every streamed or claimed event. Its type matches a pattern; its
    /// tenant is the endpoint's (no tenant matching no tenant), unless the endpoint is the firehose; and its
    /// payload contains the endpoint's filter.
    pub fn accepts(&self, event: &Event) -> bool {
        !self.awaiting_verification
            && self.patterns.iter().any(|p| p.matches(&event.event_type))
            && (self.all_tenants || self.tenant == event.tenant)
            && self.filter.as_ref().is_none_or(|f| {
                event
                    .payload_json()
                    .is_some_and(|payload| jsonb_contains(payload, f))
            })
    }

    /// The complete `webhook-signature` value for one attempt.
    pub fn signature(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut out = String::with_capacity(48 * self.signers.len() + 100);
        for (i, s) in self.signers.iter().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            s.sign_into(id, timestamp, body, &mut out);
        }
        if let Some(key) = &self.ed25519 {
            if !out.is_empty() {
                out.push(' ');
            }
            key.sign_into(id, timestamp, body, &mut out);
        }
        out
    }
}

/// A row of `walhook.endpoints` (enabled ones only), with its unexpired old secrets.
#[derive(Debug, Clone, Default)]
pub struct EndpointRow {
    pub id: i64,
    pub url: String,
    pub event_types: Vec<String>,
    pub secret: String,
    pub old_secrets: Vec<String>,
    pub timeout_ms: Option<i64>,
    pub retry_schedule_ms: Option<Vec<i64>>,
    pub rate_limit: Option<f64>,
    pub max_in_flight: Option<i32>,
    /// The `headers` jsonb as text.
    pub headers: String,
    pub ordered: bool,
    pub signing_key: Option<String>,
    pub paused: bool,
    pub tenant: Option<String>,
    pub all_tenants: bool,
    /// The `filter` jsonb as text.
    pub filter: Option<String>,
    /// The tenant's `walhook.tenants.rate_limit`: deliveries per second to all of its endpoints together.
    pub tenant_rate_limit: Option<f64>,
    /// NULL, `'direct'` or a proxy URL (which may hold a password).
    pub proxy: Option<String>,
    /// `event_versions` as JSON text: the catalog version pinned per event type (`{}`: none).
    pub event_versions: String,
    /// `format`: `standard`, `cloudevents` or `cloudevents-binary`.
    pub format: String,
    /// Disabled, awaiting its verification (`verification = 'pending'`).
    pub awaiting_verification: bool,
}

impl EndpointRow {
    fn fingerprint(&self) -> String {
        // secrets are part of the fingerprint but it never leaves this process
        format!("{self:?}")
    }
}

/// The endpoints of one load, with the indexes that keep fan-out from looking at every endpoint for every
/// event: with 1,000 tenants' endpoints, checking each of them per event was the relay's largest CPU cost.
#[derive(Default)]
struct Snapshot {
    endpoints: Arc<Vec<Arc<Endpoint>>>,
    /// Positions in `endpoints` of the endpoints of each tenant (`None`: endpoints without a tenant), the
    /// firehose left out; ascending.
    by_tenant: std::collections::HashMap<Option<String>, Vec<usize>>,
    /// Positions of the endpoints that receive every tenant's events; ascending.
    firehose: Vec<usize>,
    /// Position of each endpoint id.
    by_id: std::collections::HashMap<i64, usize>,
}

impl Snapshot {
    fn new(endpoints: Vec<Arc<Endpoint>>) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for (i, e) in endpoints.iter().enumerate() {
            snapshot.by_id.insert(e.id, i);
            if e.all_tenants {
                snapshot.firehose.push(i);
            } else {
                snapshot
                    .by_tenant
                    .entry(e.tenant.clone())
                    .or_default()
                    .push(i);
            }
        }
        snapshot.endpoints = Arc::new(endpoints);
        snapshot
    }

    /// The endpoints that may receive `event` by its tenant, in snapshot order: its tenant's and the
    /// firehose. [`Endpoint::accepts`] still decides.
    fn candidates<'a>(&'a self, event: &Event) -> impl Iterator<Item = &'a Arc<Endpoint>> + 'a {
        let own = self
            .by_tenant
            .get(&event.tenant)
            .map_or(&[][..], Vec::as_slice);
        let (mut a, mut b) = (own.iter().peekable(), self.firehose.iter().peekable());
        // both lists ascend: merge them, so that the order is the snapshot's
        std::iter::from_fn(move || {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x < y => a.next(),
                (Some(_), Some(_)) | (None, Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, None) => None,
            }?;
            Some(&self.endpoints[*next])
        })
    }
}

/// The snapshot of enabled endpoints, shared by the source, the scheduler and dispatch.
pub struct EndpointCache {
    snapshot: RwLock<Arc<Snapshot>>,
    /// Tenants' rate limits, kept across reloads while the rate stays the same.
    tenant_buckets: Mutex<std::collections::HashMap<String, Arc<Mutex<TokenBucket>>>>,
    /// Tenants' requests in flight, kept across reloads (requests outlive the snapshot they started in).
    tenant_flights: Mutex<std::collections::HashMap<String, Arc<AtomicUsize>>>,
    /// The `walhook.endpoints_generation` the snapshot was loaded at (-1 before the first load).
    generation: AtomicI64,
    /// The newest generation a source waited for in vain ([`crate::source::Pipeline::endpoints_at`]): until a
    /// load reaches it, sources do not wait again, so a reload that keeps failing delays events once.
    given_up: AtomicI64,
    /// Asks the refresher to reload now, rather than at its next tick.
    pub wanted: Notify,
    /// Woken after every load.
    loaded: Notify,
}

impl Default for EndpointCache {
    fn default() -> Self {
        EndpointCache {
            snapshot: Default::default(),
            tenant_buckets: Default::default(),
            tenant_flights: Default::default(),
            generation: AtomicI64::new(-1),
            given_up: AtomicI64::new(-1),
            wanted: Notify::new(),
            loaded: Notify::new(),
        }
    }
}

impl EndpointCache {
    /// The generation of `walhook.endpoints` the snapshot reflects.
    pub fn generation(&self) -> i64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether a source already waited in vain for a generation not loaded since: the reload is failing,
    /// and waiting again would only delay events once more.
    pub fn reload_failing(&self) -> bool {
        self.given_up.load(Ordering::Acquire) > self.generation()
    }

    /// Records that a source waited in vain for `generation`.
    pub fn give_up(&self, generation: i64) {
        self.given_up.fetch_max(generation, Ordering::AcqRel);
    }

    /// Records that the snapshot now reflects `generation`.
    pub fn loaded_at(&self, generation: i64) {
        self.generation.store(generation, Ordering::Release);
        self.loaded.notify_waiters();
    }

    /// The rate limit of every tenant that has one, reusing a bucket whose rate did not change (so its
    /// tokens carry over a reload).
    fn tenant_buckets(
        &self,
        rows: &[EndpointRow],
    ) -> std::collections::HashMap<String, Arc<Mutex<TokenBucket>>> {
        let mut buckets = self.tenant_buckets.lock().expect("never poisoned");
        let mut next = std::collections::HashMap::new();
        for row in rows {
            let (Some(tenant), Some(rate)) = (&row.tenant, row.tenant_rate_limit) else {
                continue;
            };
            if next.contains_key(tenant) {
                continue;
            }
            let bucket = match buckets.get(tenant) {
                Some(b) if b.lock().expect("never poisoned").rate() == rate => b.clone(),
                _ => Arc::new(Mutex::new(TokenBucket::new(rate, Instant::now()))),
            };
            next.insert(tenant.clone(), bucket);
        }
        *buckets = next.clone();
        next
    }

    /// The in-flight counter of every tenant with an endpoint, the existing one where there is one.
    fn tenant_flights(
        &self,
        rows: &[EndpointRow],
    ) -> std::collections::HashMap<String, Arc<AtomicUsize>> {
        let mut flights = self.tenant_flights.lock().expect("never poisoned");
        let mut next = std::collections::HashMap::new();
        for tenant in rows.iter().filter_map(|r| r.tenant.as_ref()) {
            if !next.contains_key(tenant) {
                let counter = flights.get(tenant).cloned().unwrap_or_default();
                next.insert(tenant.clone(), counter);
            }
        }
        *flights = next.clone();
        next
    }

    /// Waits (at most `within`) until the snapshot reflects `generation`, asking for a reload: work claimed
    /// under a newer endpoint row (say, fixed and then redelivered in one transaction) must not be judged by
    /// the old one. False if it did not catch up in time.
    pub async fn catch_up(&self, generation: i64, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        // a load can read an older generation than asked for (a change decoded before it is visible, as
        // while its commit waits for a synchronous standby): ask again after a pause, not at once
        let mut pause = Duration::ZERO;
        loop {
            let loaded = self.loaded.notified();
            if self.generation() >= generation {
                return true;
            }
            if !pause.is_zero()
                && tokio::time::timeout_at(deadline, tokio::time::sleep(pause))
                    .await
                    .is_err()
            {
                return false;
            }
            pause = (pause * 2).clamp(Duration::from_millis(5), Duration::from_millis(200));
            self.wanted.notify_one();
            if tokio::time::timeout_at(deadline, loaded).await.is_err() {
                return self.generation() >= generation;
            }
        }
    }

    fn indexed(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .expect("lock holders never panic")
            .clone()
    }

    pub fn snapshot(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.indexed().endpoints.clone()
    }

    /// The endpoints that receive `event`.
    pub fn matching(&self, event: &Event) -> Vec<Arc<Endpoint>> {
        self.indexed()
            .candidates(event)
            .filter(|e| e.accepts(event))
            .cloned()
            .collect()
    }

    /// How many endpoints `event` goes to.
    pub fn count_matching(&self, event: &Event) -> usize {
        self.indexed()
            .candidates(event)
            .filter(|e| e.accepts(event))
            .count()
    }

    pub fn get(&self, id: i64) -> Option<Arc<Endpoint>> {
        let snapshot = self.indexed();
        let i = *snapshot.by_id.get(&id)?;
        Some(snapshot.endpoints[i].clone())
    }

    /// Replaces the snapshot. A row that cannot be used (a URL the constraints let through but no request
    /// can carry, an unreadable secret or key) stays in it, marked unusable, so its deliveries are
    /// recorded dead with the reason instead of being skipped; the warning never holds the secret.
    pub fn replace(&self, rows: Vec<EndpointRow>) {
        let old = self.indexed();
        let mut next = Vec::with_capacity(rows.len());
        let buckets = self.tenant_buckets(&rows);
        let flights = self.tenant_flights(&rows);
        for row in rows {
            let fingerprint = row.fingerprint();
            let previous = old.by_id.get(&row.id).map(|i| &old.endpoints[*i]);
            if let Some(same) = previous.filter(|e| e.fingerprint == fingerprint) {
                next.push(same.clone());
                continue;
            }
            let rt = previous.map(|p| p.rt.clone());
            let tenant_bucket = row.tenant.as_ref().and_then(|t| buckets.get(t).cloned());
            let tenant_in_flight = row.tenant.as_ref().and_then(|t| flights.get(t).cloned());
            let endpoint = match build(&row, fingerprint.clone(), rt.clone()) {
                Ok(endpoint) => Endpoint {
                    tenant_bucket,
                    tenant_in_flight,
                    ..endpoint
                },
                Err(why) => {
                    tracing::warn!(
                        endpoint_id = row.id,
                        "endpoint cannot be used, its deliveries are recorded dead until its row is \
                         fixed: {why}"
                    );
                    unusable(&row, fingerprint, rt, why)
                }
            };
            next.push(Arc::new(endpoint));
        }
        *self.snapshot.write().expect("lock holders never panic") = Arc::new(Snapshot::new(next));
    }
}

fn build(
    row: &EndpointRow,
    fingerprint: String,
    rt: Option<Arc<Runtime>>,
) -> Result<Endpoint, String> {
    let uri = request_uri(&row.url)?;
    let mut signers = vec![Signer::new(&row.secret).map_err(|e| e.to_string())?];
    for old in &row.old_secrets {
        signers.push(Signer::new(old).map_err(|e| format!("old secret: {e}"))?);
    }
    let ed25519 = match &row.signing_key {
        Some(k) => Some(Ed25519Signer::new(k).map_err(|e| format!("signing_key: {e}"))?),
        None => None,
    };
    let headers: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&row.headers).map_err(|e| format!("headers: {e}"))?;
    let headers = headers
        .iter()
        .map(|(k, v)| {
            let name = http::HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| format!("header {k:?}: {e}"))?;
            let value = http::HeaderValue::from_str(v.as_str().unwrap_or_default())
                .map_err(|e| format!("the value of header {k:?}: {e}"))?;
            Ok((name, value))
        })
        .collect::<Result<Vec<_>, String>>()?;
    // the message never repeats the URL: it may hold the proxy's password
    let proxy = EndpointProxy::parse(row.proxy.as_deref())
        .map_err(|e| format!("proxy: invalid proxy URL: {e}"))?;
    let ms = |v: i64| Duration::from_millis(v.max(1) as u64);
    let policy = Policy {
        timeout: row.timeout_ms.map(ms),
        retry_schedule: row
            .retry_schedule_ms
            .as_ref()
            .map(|s| s.iter().map(|v| ms(*v)).collect()),
        rate_limit: row.rate_limit,
        max_in_flight: row.max_in_flight.map(|v| v.max(1) as usize),
        headers,
        ordered: row.ordered,
        proxy,
    };
    let rt = match rt {
        Some(rt) => {
            // a changed rate limit gets a fresh bucket; the breaker and counters carry over
            let mut limits = rt.limits.lock().expect("never poisoned");
            if limits.bucket.as_ref().map(|b| b.rate()) != policy.rate_limit {
                limits.bucket = policy
                    .rate_limit
                    .map(|r| TokenBucket::new(r, Instant::now()));
            }
            drop(limits);
            rt
        }
        None => Arc::new(Runtime::new(policy.rate_limit)),
    };
    let filter = match &row.filter {
        Some(text) => Some(
            serde_json::from_str::<serde_json::Value>(text).map_err(|e| format!("filter: {e}"))?,
        ),
        None => None,
    };
    let pins: std::collections::HashMap<String, i32> = if row.event_versions.is_empty() {
        Default::default()
    } else {
        serde_json::from_str(&row.event_versions).map_err(|e| format!("event_versions: {e}"))?
    };
    let format = crate::event::Format::parse(if row.format.is_empty() {
        "standard"
    } else {
        &row.format
    })
    .ok_or_else(|| format!("format: {:?} is not one walhook knows", row.format))?;
    Ok(Endpoint {
        pins,
        format,
        awaiting_verification: row.awaiting_verification,
        tenant_bucket: None,
        tenant_in_flight: None,
        tenant: row.tenant.clone(),
        all_tenants: row.all_tenants,
        filter,
        id: row.id,
        url: row.url.clone(),
        uri,
        patterns: row.event_types.iter().map(|p| Pattern::parse(p)).collect(),
        signers,
        ed25519,
        policy,
        rt,
        paused: row.paused,
        unusable: None,
        fingerprint,
    })
}

/// An endpoint whose row cannot be used: it matches events like any other, and dispatch records their
/// deliveries dead with `why`.
fn unusable(
    row: &EndpointRow,
    fingerprint: String,
    rt: Option<Arc<Runtime>>,
    why: String,
) -> Endpoint {
    Endpoint {
        pins: Default::default(),
        format: Default::default(),
        awaiting_verification: row.awaiting_verification,
        tenant_bucket: None,
        tenant_in_flight: None,
        tenant: row.tenant.clone(),
        all_tenants: row.all_tenants,
        // (the filter is a JSON object: SQL checks it)
        filter: row
            .filter
            .as_deref()
            .and_then(|f| serde_json::from_str(f).ok()),
        id: row.id,
        url: row.url.clone(),
        uri: http::Uri::default(),
        patterns: row.event_types.iter().map(|p| Pattern::parse(p)).collect(),
        signers: Vec::new(),
        ed25519: None,
        policy: Policy::default(),
        rt: rt.unwrap_or_else(|| Arc::new(Runtime::new(None))),
        paused: row.paused,
        unusable: Some(format!(
            "the endpoint's row cannot be used: {why}; fix the row, then walhook.redeliver(endpoint_id => {}) \
             sends these again",
            row.id
        )),
        fingerprint,
    }
}

/// Characters a request target cannot carry as they are: controls, space, non-ASCII (always encoded by
/// `utf8_percent_encode`) and the few ASCII characters RFC 3986 excludes (`"<>\^`{|}`). `%` is kept, so an
/// already encoded URL is not encoded twice.
const NOT_IN_TARGET: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'<')
    .add(b'>')
    .add(b'\\')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// The URI a request to `url` goes to: the path and query percent-encoded where they hold characters a
/// request line cannot carry (`/ü?name=Zoë` becomes `/%C3%BC?name=Zo%C3%AB`), the fragment dropped (it is
/// never sent). A host must already be ASCII: an international domain name is written in punycode.
pub fn request_uri(url: &str) -> Result<http::Uri, String> {
    let url = url.split('#').next().unwrap_or_default();
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let target_at = url[after_scheme..]
        .find(['/', '?'])
        .map_or(url.len(), |i| after_scheme + i);
    let (origin, target) = url.split_at(target_at);
    if !origin.is_ascii() {
        return Err(format!(
            "the host of url {url:?} is not ASCII: write an international domain name in punycode (xn--…)"
        ));
    }
    let encoded = format!("{origin}{}", utf8_percent_encode(target, NOT_IN_TARGET));
    encoded
        .parse()
        .map_err(|e| format!("url {url:?} is not usable: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_is_backed_up_when_slow_or_hanging_requests_are_ahead() {
        let t0 = Instant::now();
        let wait = Duration::from_secs(1);
        let mut p = Progress::new(t0);
        // less than one round queued always waits
        assert!(!p.backed_up(31, 32, wait, t0 + Duration::from_secs(60)));
        // nothing known yet, and recent progress: wait
        assert!(!p.backed_up(5_000, 32, wait, t0));
        // fast requests: 157 rounds of 1 ms ahead start within the second
        p.completed(Duration::from_millis(1), t0);
        assert!(!p.backed_up(5_000, 32, wait, t0));
        // one-second requests: the second round ahead would start too late
        for _ in 0..50 {
            p.completed(Duration::from_secs(1), t0);
        }
        assert!(!p.backed_up(31, 32, wait, t0));
        assert!(p.backed_up(32, 32, wait, t0));
        // requests that hang: nothing started or completed for longer than the wait
        let mut hanging = Progress::new(t0);
        hanging.started(t0);
        assert!(!hanging.backed_up(64, 32, wait, t0 + Duration::from_millis(500)));
        assert!(hanging.backed_up(64, 32, wait, t0 + Duration::from_millis(1_500)));
    }

    #[test]
    fn the_window_opens_with_answers_and_closes_to_a_floor_without_them() {
        let mut p = Progress::new(Instant::now());
        assert_eq!(p.window(32), FIRST_WINDOW);
        // a limit below the first window is the limit
        assert_eq!(p.window(2), 2);
        // one more per answer (doubling per round trip), up to the limit
        for _ in 0..FIRST_WINDOW {
            p.answered(true, 32);
        }
        assert_eq!(p.window(32), 2 * FIRST_WINDOW);
        for _ in 0..100 {
            p.answered(true, 32);
        }
        assert_eq!((p.window, p.window(32)), (32, 32));
        // a whole window of timeouts brings it back to the floor, never below
        for _ in 0..100 {
            p.answered(false, 32);
        }
        assert_eq!(p.window(32), FIRST_WINDOW);
        // an endpoint that answers half of its requests keeps its window between the two: never stopped
        for i in 0..1_000 {
            p.answered(i % 2 == 0, 32);
            assert!((FIRST_WINDOW..=32).contains(&p.window(32)));
        }
        // any HTTP answer counts, and a raised limit lets it grow further
        for _ in 0..100 {
            p.answered(true, 64);
        }
        assert_eq!(p.window(64), 64);
    }

    fn row(id: i64, patterns: &[&str]) -> EndpointRow {
        EndpointRow {
            id,
            url: format!("http://127.0.0.1:9/{id}"),
            event_types: patterns.iter().map(|s| s.to_string()).collect(),
            secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
            headers: "{}".into(),
            ..Default::default()
        }
    }

    #[test]
    fn patterns_match_all_prefix_and_exact() {
        assert!(Pattern::parse("*").matches("order.created"));
        let prefix = Pattern::parse("order.*");
        assert!(prefix.matches("order.created"));
        assert!(prefix.matches("order.created.v2"));
        assert!(!prefix.matches("order"));
        assert!(!prefix.matches("order."));
        assert!(!prefix.matches("orders.created"));
        let exact = Pattern::parse("order.created");
        assert!(exact.matches("order.created"));
        assert!(!exact.matches("order.created.v2"));
    }

    #[test]
    fn cache_matches_and_keeps_unchanged_endpoints() {
        let cache = EndpointCache::default();
        cache.replace(vec![
            row(1, &["*"]),
            row(2, &["order.*"]),
            row(3, &["user.created", "user.deleted"]),
        ]);
        let ids = |t: &str| {
            cache
                .matching(&event(t))
                .iter()
                .map(|e| e.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids("order.paid"), vec![1, 2]);
        assert_eq!(ids("user.deleted"), vec![1, 3]);
        assert_eq!(ids("invoice.sent"), vec![1]);
        let before = cache.get(1).unwrap();
        cache.replace(vec![row(1, &["*"]), row(3, &["user.created"])]);
        assert!(Arc::ptr_eq(&before, &cache.get(1).unwrap()));
        assert!(cache.get(2).is_none());
        assert_eq!(ids("user.deleted"), vec![1]);
    }

    #[test]
    fn the_tenant_index_finds_what_checking_every_endpoint_finds_in_the_same_order() {
        let cache = EndpointCache::default();
        let with = |id, tenant: Option<&str>, all: bool| EndpointRow {
            tenant: tenant.map(str::to_string),
            all_tenants: all,
            ..row(id, &["order.*"])
        };
        cache.replace(vec![
            with(1, Some("b"), false),
            with(2, None, true),
            with(3, Some("a"), false),
            with(4, None, false),
            with(5, Some("a"), false),
            with(6, None, true),
            with(7, Some("b"), false),
        ]);
        for tenant in [Some("a"), Some("b"), Some("c"), None] {
            for event_type in ["order.paid", "user.created"] {
                let mut e = event(event_type);
                e.tenant = tenant.map(str::to_string);
                let every: Vec<i64> = cache
                    .snapshot()
                    .iter()
                    .filter(|x| x.accepts(&e))
                    .map(|x| x.id)
                    .collect();
                let indexed: Vec<i64> = cache.matching(&e).iter().map(|x| x.id).collect();
                assert_eq!(indexed, every, "{tenant:?} {event_type}");
                assert_eq!(cache.count_matching(&e), every.len());
            }
        }
        let mut e = event("order.paid");
        e.tenant = Some("a".into());
        let ids: Vec<i64> = cache.matching(&e).iter().map(|x| x.id).collect();
        assert_eq!(ids, [2, 3, 5, 6]);
        e.tenant = None;
        let ids: Vec<i64> = cache.matching(&e).iter().map(|x| x.id).collect();
        assert_eq!(ids, [2, 4, 6]);
        assert_eq!(cache.get(7).map(|x| x.id), Some(7));
    }

    #[test]
    fn unusable_rows_are_kept_with_the_reason() {
        let cache = EndpointCache::default();
        let mut bad = row(5, &["*"]);
        bad.secret = "whsec_short".into();
        let mut bad_header = row(7, &["*"]);
        bad_header.headers = r#"{"x-k": "a\u007fb"}"#.into();
        cache.replace(vec![bad, row(6, &["*"]), bad_header]);
        let matching = cache.matching(&event("order.created"));
        assert_eq!(matching.len(), 3, "an unusable row still matches");
        let why = |id| cache.get(id).unwrap().unusable.clone();
        assert!(why(5).unwrap().contains("secret"), "{:?}", why(5));
        assert!(why(7).unwrap().contains("x-k"), "{:?}", why(7));
        assert_eq!(why(6), None);
        assert!(!why(5).unwrap().contains("whsec_short"), "never the secret");
    }

    fn event(t: &str) -> Event {
        Event::new(
            1,
            "00000000-0000-0000-0000-000000000001",
            t,
            "2026-12-01 00:00:00+00",
            "{}",
        )
    }

    /// The cases `tests/tenants` checks against PostgreSQL's `walhook.endpoint_accepts` and `@>`: the
    /// daemon's fan-out must decide each the same way.
    #[test]
    fn fan_out_agrees_with_sql_on_the_shared_vectors() {
        let vectors: serde_json::Value = serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/tenants/containment_vectors.json"
        )))
        .unwrap();
        for case in vectors["containment"].as_array().unwrap() {
            let parse = |k: &str| {
                serde_json::from_str::<serde_json::Value>(case[k].as_str().unwrap()).unwrap()
            };
            assert_eq!(
                jsonb_contains(&parse("payload"), &parse("filter")),
                case["expected"].as_bool().unwrap(),
                "{case}"
            );
        }
        for case in vectors["accepts"].as_array().unwrap() {
            let text = |k: &str| case[k].as_str().map(str::to_string);
            let mut r = row(1, &[]);
            r.event_types = case["event_types"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap().to_string())
                .collect();
            r.tenant = text("endpoint_tenant");
            r.all_tenants = case["all_tenants"].as_bool().unwrap();
            r.filter = text("filter");
            let cache = EndpointCache::default();
            cache.replace(vec![r]);
            let e = Event::new(
                1,
                "00000000-0000-0000-0000-000000000001",
                case["event_type"].as_str().unwrap(),
                "2026-12-01 00:00:00+00",
                case["payload"].as_str().unwrap(),
            )
            .with_tenant(text("tenant"));
            assert_eq!(
                cache.count_matching(&e) == 1,
                case["expected"].as_bool().unwrap(),
                "{case}"
            );
        }
    }

    #[test]
    fn containment_follows_jsonb() {
        use serde_json::json;
        let yes = |p: serde_json::Value, f: serde_json::Value| {
            assert!(jsonb_contains(&p, &f), "{p} @> {f}")
        };
        let no = |p: serde_json::Value, f: serde_json::Value| {
            assert!(!jsonb_contains(&p, &f), "not {p} @> {f}")
        };
        yes(json!({"region": "eu", "n": 1}), json!({"region": "eu"}));
        yes(json!({"a": {"b": 1, "c": 2}}), json!({"a": {"b": 1}}));
        yes(
            json!({"tags": ["x", "y", "z"]}),
            json!({"tags": ["z", "x", "x"]}),
        );
        yes(json!({"n": 1.0}), json!({"n": 1}));
        yes(json!({}), json!({}));
        yes(json!(["a", "b"]), json!("a"));
        yes(json!([[1, 2], [3]]), json!([[1]]));
        no(json!({"region": "us"}), json!({"region": "eu"}));
        no(json!({"tags": ["x"]}), json!({"tags": "x"}));
        no(json!({"a": {"b": 1}}), json!({"a": {"b": 1, "c": 2}}));
        no(json!({"n": "1"}), json!({"n": 1}));
        no(json!({"a": null}), json!({"b": null}));
        no(json!(["a"]), json!({"a": 1}));
    }

    #[test]
    fn request_targets_are_percent_encoded_once() {
        let uri = |u: &str| request_uri(u).map(|u| u.to_string());
        assert_eq!(
            uri("http://127.0.0.1:9/ü?name=Zoë").unwrap(),
            "http://127.0.0.1:9/%C3%BC?name=Zo%C3%AB"
        );
        assert_eq!(
            uri("https://h.example/a%20b?q=<x>&r=`y`#frag").unwrap(),
            "https://h.example/a%20b?q=%3Cx%3E&r=%60y%60"
        );
        assert_eq!(
            uri("http://user:pw@h.example:8080?x=1").unwrap(),
            "http://user:pw@h.example:8080/?x=1"
        );
        assert!(uri("https://bücher.example/hooks")
            .unwrap_err()
            .contains("punycode"));
        assert_eq!(
            uri("https://xn--bcher-kva.example/hooks").unwrap(),
            "https://xn--bcher-kva.example/hooks"
        );
    }
}
