//! Fan-out: which enabled endpoints an event goes to.
//!
//! Matching runs once per event on the hot path, so it reads an in-memory snapshot of `walhook.endpoints`
//! (an `Arc` swapped under a short lock) rather than querying. The snapshot follows the table within one
//! `endpoints.refresh_interval`: a statement trigger bumps `walhook.endpoints_generation` in the writer's own
//! transaction, and the refresher reloads only when that committed generation changes. Unchanged endpoints keep
//! their `Arc` across reloads, so their prepared HMAC key and in-flight counters survive.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, RwLock};

use crate::sign::Signer;

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

/// An enabled endpoint as the daemon uses it.
#[derive(Debug)]
pub struct Endpoint {
    pub id: i64,
    pub url: String,
    pub uri: http::Uri,
    pub patterns: Vec<Pattern>,
    pub signer: Signer,
    /// Requests to this endpoint now in flight (dispatch keeps it below the per-endpoint limit).
    pub in_flight: AtomicUsize,
    /// Fingerprint of the row's delivery-relevant columns, to reuse the `Arc` across reloads.
    fingerprint: String,
}

impl Endpoint {
    pub fn matches(&self, event_type: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(event_type))
    }
}

/// A row of `walhook.endpoints` (enabled ones only).
#[derive(Debug, Clone)]
pub struct EndpointRow {
    pub id: i64,
    pub url: String,
    pub event_types: Vec<String>,
    pub secret: String,
}

impl EndpointRow {
    fn fingerprint(&self) -> String {
        // the secret is part of the fingerprint but never leaves this process
        format!(
            "{}\n{}\n{}",
            self.url,
            self.event_types.join(","),
            self.secret
        )
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

    pub fn get(&self, id: i64) -> Option<Arc<Endpoint>> {
        self.snapshot().iter().find(|e| e.id == id).cloned()
    }

    /// Replaces the snapshot; rows that cannot be used (a URL the constraints let through but `http::Uri`
    /// rejects, or an unreadable secret) are skipped with a warning, never with the secret in it.
    pub fn replace(&self, rows: Vec<EndpointRow>) {
        let old = self.snapshot();
        let mut next = Vec::with_capacity(rows.len());
        for row in rows {
            let fingerprint = row.fingerprint();
            if let Some(same) = old
                .iter()
                .find(|e| e.id == row.id && e.fingerprint == fingerprint)
            {
                next.push(same.clone());
                continue;
            }
            let uri: http::Uri = match row.url.parse() {
                Ok(uri) => uri,
                Err(e) => {
                    tracing::warn!(
                        endpoint_id = row.id,
                        "endpoint skipped: url is not usable: {e}"
                    );
                    continue;
                }
            };
            let signer = match Signer::new(&row.secret) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(endpoint_id = row.id, "endpoint skipped: {e}");
                    continue;
                }
            };
            next.push(Arc::new(Endpoint {
                id: row.id,
                url: row.url,
                uri,
                patterns: row.event_types.iter().map(|p| Pattern::parse(p)).collect(),
                signer,
                in_flight: AtomicUsize::new(0),
                fingerprint,
            }));
        }
        *self.snapshot.write().expect("lock holders never panic") = Arc::new(next);
    }
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
