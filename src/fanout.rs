//! Fan-out: which enabled endpoints an event goes to.
//!
//! Matching runs once per event on the hot path, so it reads an in-memory snapshot of `walhook.endpoints`
//! (an `Arc` swapped under a short lock) rather than querying. The snapshot follows the table within one
//! `endpoints.refresh_interval`: a statement trigger bumps `walhook.endpoints_generation` in the writer's own
//! transaction, and the refresher reloads only when that committed generation changes. Unchanged endpoints keep
//! their `Arc` across reloads, so their prepared HMAC key and in-flight counters survive.

use std::collections::VecDeque;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::dispatch::limits::{Breaker, TokenBucket};
use crate::dispatch::Job;
use crate::sign::{Ed25519Signer, Signer};

/// An event-type pattern: `*`, a prefix like `order.*`, or an exact type.
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
        match self {
            Pattern::All => true,
            Pattern::Prefix(prefix) => {
                event_type.len() > prefix.len() && event_type.starts_with(prefix.as_str())
            }
            Pattern::Exact(t) => t == event_type,
        }
    }
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
}

#[derive(Debug)]
pub struct Limits {
    pub breaker: Breaker,
    pub bucket: Option<TokenBucket>,
}

/// Health as written to `walhook.endpoint_state`.
#[derive(Debug, Default, Clone)]
pub struct Health {
    pub failing_since: Option<SystemTime>,
    pub last_success_at: Option<SystemTime>,
    pub last_failure_at: Option<SystemTime>,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    /// Attempts per 10-minute bucket over the last hour: (bucket start, successes, failures).
    pub buckets: Vec<(u64, u64, u64)>,
    /// Set when something changed since the state was last written.
    pub dirty: bool,
}

impl Health {
    pub fn observe(&mut self, ok: bool, at: SystemTime, status: Option<i32>, error: Option<&str>) {
        let bucket = at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / 600);
        self.buckets.retain(|b| b.0 + 6 > bucket);
        match self.buckets.iter_mut().find(|b| b.0 == bucket) {
            Some(b) if ok => b.1 += 1,
            Some(b) => b.2 += 1,
            None => self.buckets.push((bucket, ok as u64, !ok as u64)),
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

    /// (successes, failures) over the last hour.
    pub fn last_hour(&self, now: SystemTime) -> (u64, u64) {
        let bucket = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / 600);
        self.buckets
            .iter()
            .filter(|b| b.0 + 6 > bucket)
            .fold((0, 0), |acc, b| (acc.0 + b.1, acc.1 + b.2))
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
        }
    }
}

impl Endpoint {
    pub fn matches(&self, event_type: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(event_type))
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
}

impl EndpointRow {
    fn fingerprint(&self) -> String {
        // secrets are part of the fingerprint but it never leaves this process
        format!("{self:?}")
    }
}

/// The snapshot of enabled endpoints, shared by the source, the scheduler and dispatch.
#[derive(Default)]
pub struct EndpointCache {
    snapshot: RwLock<Arc<Vec<Arc<Endpoint>>>>,
}

impl EndpointCache {
    pub fn snapshot(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.snapshot
            .read()
            .expect("lock holders never panic")
            .clone()
    }

    /// The endpoints whose patterns match `event_type`.
    pub fn matching(&self, event_type: &str) -> Vec<Arc<Endpoint>> {
        self.snapshot()
            .iter()
            .filter(|e| e.matches(event_type))
            .cloned()
            .collect()
    }

    /// How many endpoints `event_type` goes to.
    pub fn count_matching(&self, event_type: &str) -> usize {
        self.snapshot()
            .iter()
            .filter(|e| e.matches(event_type))
            .count()
    }

    pub fn get(&self, id: i64) -> Option<Arc<Endpoint>> {
        self.snapshot().iter().find(|e| e.id == id).cloned()
    }

    /// Replaces the snapshot; rows that cannot be used (a URL the constraints let through but `http::Uri`
    /// rejects, an unreadable secret or key) are skipped with a warning, never with the secret in it.
    pub fn replace(&self, rows: Vec<EndpointRow>) {
        let old = self.snapshot();
        let mut next = Vec::with_capacity(rows.len());
        for row in rows {
            let fingerprint = row.fingerprint();
            let previous = old.iter().find(|e| e.id == row.id);
            if let Some(same) = previous.filter(|e| e.fingerprint == fingerprint) {
                next.push(same.clone());
                continue;
            }
            match build(row, fingerprint, previous.map(|p| p.rt.clone())) {
                Ok(endpoint) => next.push(Arc::new(endpoint)),
                Err((id, why)) => tracing::warn!(endpoint_id = id, "endpoint skipped: {why}"),
            }
        }
        *self.snapshot.write().expect("lock holders never panic") = Arc::new(next);
    }
}

fn build(
    row: EndpointRow,
    fingerprint: String,
    rt: Option<Arc<Runtime>>,
) -> Result<Endpoint, (i64, String)> {
    let id = row.id;
    let fail = |why: String| (id, why);
    let uri: http::Uri = row
        .url
        .parse()
        .map_err(|e| fail(format!("url is not usable: {e}")))?;
    let mut signers = vec![Signer::new(&row.secret).map_err(|e| fail(e.to_string()))?];
    for old in &row.old_secrets {
        signers.push(Signer::new(old).map_err(|e| fail(format!("old secret: {e}")))?);
    }
    let ed25519 = match &row.signing_key {
        Some(k) => Some(Ed25519Signer::new(k).map_err(|e| fail(e.to_string()))?),
        None => None,
    };
    let headers: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&row.headers).map_err(|e| fail(format!("headers: {e}")))?;
    let headers = headers
        .iter()
        .map(|(k, v)| {
            let name = http::HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| fail(format!("header {k:?}: {e}")))?;
            let value = http::HeaderValue::from_str(v.as_str().unwrap_or_default())
                .map_err(|e| fail(format!("header {k:?}: {e}")))?;
            Ok((name, value))
        })
        .collect::<Result<Vec<_>, _>>()?;
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
    Ok(Endpoint {
        id,
        url: row.url,
        uri,
        patterns: row.event_types.iter().map(|p| Pattern::parse(p)).collect(),
        signers,
        ed25519,
        policy,
        rt,
        fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let ids = |t: &str| cache.matching(t).iter().map(|e| e.id).collect::<Vec<_>>();
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
    fn unusable_rows_are_skipped() {
        let cache = EndpointCache::default();
        let mut bad = row(5, &["*"]);
        bad.secret = "whsec_short".into();
        cache.replace(vec![bad, row(6, &["*"])]);
        assert_eq!(cache.snapshot().len(), 1);
    }
}
