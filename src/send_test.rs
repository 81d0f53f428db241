//! `walhook send-test`: queue a `walhook.test` event to one endpoint and, with `--wait`, follow its delivery
//! until it is final, attempt by attempt.
//!
//! The SQL function `walhook.send_test` does the work (the same one the portal's button calls), so the
//! command is a thin client: it queues, then reads the delivery and its attempts as the daemon records them.
//! It never sends anything itself: what the developer sees is what the daemon did.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::conninfo::ConnInfo;
use crate::pgerror::{describe_for, Job, Target};

/// How often `--wait` reads the delivery again.
const POLL: Duration = Duration::from_millis(200);
/// After this long without an attempt, `--wait` says that no daemon seems to be sending.
const NO_ATTEMPT_HINT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SendTestError {
    #[error("--payload is not JSON: {0}")]
    Payload(serde_json::Error),
    #[error("{0}")]
    Database(String),
    #[error("delivery {delivery} is dead after {attempts} attempts: {reason}")]
    Dead {
        delivery: i64,
        attempts: i32,
        reason: String,
    },
}

/// A queued test delivery.
#[derive(Debug, Clone)]
pub struct Queued {
    pub delivery: i64,
    pub webhook_id: String,
    pub endpoint_url: String,
}

/// One recorded attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub attempt: i32,
    pub duration_ms: i32,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    pub response_body: Option<String>,
}

impl std::fmt::Display for Attempt {
    /// `attempt 1: 200 in 12 ms`, `attempt 2: no response after 5001 ms: connection refused`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Attempt {
            attempt,
            duration_ms,
            ..
        } = self;
        match self.status_code {
            Some(code) => write!(f, "attempt {attempt}: {code} in {duration_ms} ms")?,
            None => write!(f, "attempt {attempt}: no response after {duration_ms} ms")?,
        }
        if let Some(error) = self.error.as_deref().filter(|e| !e.is_empty()) {
            write!(f, ": {error}")?;
        }
        if let Some(body) = self
            .response_body
            .as_deref()
            .filter(|b| !b.trim().is_empty())
        {
            let body: String = body.trim().chars().take(200).collect();
            write!(f, " (response: {body})")?;
        }
        Ok(())
    }
}

/// Connects with the configuration's `database_url`.
pub async fn connect(database: &ConnInfo) -> Result<Client, SendTestError> {
    crate::store::connect_client(database).await.map_err(|e| {
        SendTestError::Database(e.describe_with(Job::Manage, Some(&Target::of(database))))
    })
}

fn db_error(e: tokio_postgres::Error, database: &ConnInfo) -> SendTestError {
    SendTestError::Database(describe_for(&e, Job::Manage, Some(&Target::of(database))))
}

/// Queues a test event for `endpoint`: a `walhook.test` event with `payload` (JSON text; `None`: walhook's
/// default message), or with `event_type`, the catalog's example of that type in the endpoint's version.
pub async fn queue(
    client: &Client,
    database: &ConnInfo,
    endpoint: i64,
    payload: Option<&str>,
    event_type: Option<&str>,
) -> Result<Queued, SendTestError> {
    if let Some(payload) = payload {
        serde_json::from_str::<serde_json::Value>(payload).map_err(SendTestError::Payload)?;
    }
    let queued = match event_type {
        Some(t) => {
            client
                .query_one("select walhook.send_test($1, $2::text)", &[&endpoint, &t])
                .await
        }
        None => {
            client
                .query_one(
                    "select walhook.send_test($1, $2::text::jsonb)",
                    &[&endpoint, &payload],
                )
                .await
        }
    };
    let delivery: i64 = queued.map_err(|e| db_error(e, database))?.get(0);
    let row = client
        .query_one(
            "select 'msg_' || replace(d.webhook_id::text, '-', ''), e.url
               from walhook.deliveries d join walhook.endpoints e on e.id = d.endpoint_id
              where d.id = $1",
            &[&delivery],
        )
        .await
        .map_err(|e| db_error(e, database))?;
    Ok(Queued {
        delivery,
        webhook_id: row.get(0),
        endpoint_url: row.get(1),
    })
}

/// Follows `delivery` until it is no longer pending, calling `report` with each line to show (each new
/// attempt, when the next one is due, a hint when nothing happens). Ok when it succeeded.
pub async fn wait(
    client: &Client,
    database: &ConnInfo,
    delivery: i64,
    mut report: impl FnMut(&str),
) -> Result<i32, SendTestError> {
    let started = Instant::now();
    let mut seen = 0;
    let mut hinted = false;
    loop {
        let attempts = client
            .query(
                "select attempt, duration_ms, status_code, error, response_body from walhook.attempts
                  where delivery_id = $1 and attempt > $2 order by attempt",
                &[&delivery, &seen],
            )
            .await
            .map_err(|e| db_error(e, database))?;
        let row = client
            .query_one(
                "select status, attempts, last_error, next_attempt_at::text from walhook.deliveries where id = $1",
                &[&delivery],
            )
            .await
            .map_err(|e| db_error(e, database))?;
        for a in &attempts {
            let attempt = Attempt {
                attempt: a.get(0),
                duration_ms: a.get(1),
                status_code: a.get(2),
                error: a.get(3),
                response_body: a.get(4),
            };
            seen = seen.max(attempt.attempt);
            report(&attempt.to_string());
        }
        let status: String = row.get(0);
        let count: i32 = row.get(1);
        match status.as_str() {
            "succeeded" => {
                report(&format!("delivery {delivery} succeeded"));
                return Ok(count);
            }
            "dead" => {
                return Err(SendTestError::Dead {
                    delivery,
                    attempts: count,
                    reason: row.get::<_, Option<String>>(2).unwrap_or_default(),
                })
            }
            _ => {}
        }
        if !attempts.is_empty() {
            if let Some(next) = row.get::<_, Option<String>>(3) {
                report(&format!("  pending: next attempt at {next}"));
            }
        }
        if seen == 0 && !hinted && started.elapsed() >= NO_ATTEMPT_HINT {
            hinted = true;
            let mut hint = String::new();
            let _ = write!(
                hint,
                "no attempt yet after {} s: is `walhook run` running on this database? (still waiting; Ctrl-C stops)",
                NO_ATTEMPT_HINT.as_secs()
            );
            report(&hint);
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_read_as_a_sentence() {
        let mut a = Attempt {
            attempt: 1,
            duration_ms: 12,
            status_code: Some(200),
            error: None,
            response_body: Some(String::new()),
        };
        assert_eq!(a.to_string(), "attempt 1: 200 in 12 ms");
        a.status_code = Some(503);
        a.response_body = Some(" busy \n".into());
        assert_eq!(a.to_string(), "attempt 1: 503 in 12 ms (response: busy)");
        a.status_code = None;
        a.response_body = None;
        a.error = Some("connection refused".into());
        a.duration_ms = 5001;
        assert_eq!(
            a.to_string(),
            "attempt 1: no response after 5001 ms: connection refused"
        );
    }
}
