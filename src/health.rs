//! What the daemon knows about its own health, and the operator's HTTP endpoint on `http.listen`.
//!
//! [`Health`] is written by the source (streaming or not, how far behind) and by the periodic sampler
//! (`crate::monitor`: slot and backlog numbers from SQL), and read by `/readyz`, the systemd notifier and
//! `STATUS=` lines. Reads are atomics or a short mutex: a probe never waits on PostgreSQL.
//!
//! Routes: `/healthz` (the process is alive and its runtime answers), `/readyz` (streaming, and the lag is
//! under `health.max_lag`), `/metrics` (Prometheus text). Webhook traffic never shares this listener, so a
//! flood of deliveries does not delay a probe.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The numbers the sampler reads from PostgreSQL every `health.interval`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlotSample {
    /// `pg_current_wal_lsn() - confirmed_flush_lsn`; `None` when the slot does not exist.
    pub lag_bytes: Option<u64>,
    /// `pg_current_wal_lsn() - restart_lsn`: what the server keeps for the slot.
    pub retained_bytes: Option<u64>,
    /// `pg_replication_slots.wal_status`: reserved, extended, unreserved or lost.
    pub wal_status: Option<String>,
    pub pending: i64,
    pub dead: i64,
}

/// What a ready source is doing, for `STATUS=` lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// The replication stream.
    Streaming = 0,
    /// The notify source's claims of outbox rows.
    Polling = 1,
    /// The first start's backfill of rows committed before the slot.
    Backfilling = 2,
}

/// Shared health state of one daemon.
#[derive(Debug)]
pub struct Health {
    streaming: watch::Sender<bool>,
    /// What the source does while it counts as streaming (ready): [`Activity`] as a number.
    activity: AtomicU8,
    /// Another instance streams the slot; this one dispatches retries and waits to take over.
    standby: watch::Sender<bool>,
    /// Seconds (as f64 bits) since the oldest transaction read and not yet confirmed was committed.
    lag_seconds: AtomicU64,
    /// Set once the drain has begun: not ready any more.
    draining: AtomicBool,
    sample: Mutex<Option<SlotSample>>,
    max_lag: Duration,
}

impl Health {
    pub fn new(max_lag: Duration) -> Arc<Health> {
        Arc::new(Health {
            streaming: watch::Sender::new(false),
            activity: AtomicU8::new(Activity::Streaming as u8),
            standby: watch::Sender::new(false),
            lag_seconds: AtomicU64::new(0f64.to_bits()),
            draining: AtomicBool::new(false),
            sample: Mutex::new(None),
            max_lag,
        })
    }

    pub fn set_streaming(&self, streaming: bool) {
        self.activity
            .store(Activity::Streaming as u8, Ordering::Relaxed);
        self.streaming.send_replace(streaming);
        metrics::gauge!(crate::metrics::STREAMING).set(if streaming { 1.0 } else { 0.0 });
    }

    /// The notify source is prepared: ready as a stream would be, but `walhook_streaming` stays 0, since
    /// there is no replication stream (dashboards tell the sources apart by it).
    pub fn set_polling(&self) {
        self.activity
            .store(Activity::Polling as u8, Ordering::Relaxed);
        self.streaming.send_replace(true);
    }

    /// The first start's backfill delivers the rows committed before it: ready (it delivers, and a long one
    /// must not outlast systemd's start timeout), `walhook_streaming` 0 until the stream starts.
    pub fn set_backfilling(&self) {
        self.activity
            .store(Activity::Backfilling as u8, Ordering::Relaxed);
        self.streaming.send_replace(true);
    }

    /// What the source does while ready: meaningful while [`Health::is_streaming`].
    pub fn activity(&self) -> Activity {
        match self.activity.load(Ordering::Relaxed) {
            1 => Activity::Polling,
            2 => Activity::Backfilling,
            _ => Activity::Streaming,
        }
    }

    pub fn is_streaming(&self) -> bool {
        *self.streaming.borrow()
    }

    /// Resolves once the source streams (immediately if it already does).
    pub async fn wait_streaming(&self) {
        let mut rx = self.streaming.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Another instance holds the slot (`true`) or this one has taken it over (`false`).
    pub fn set_standby(&self, standby: bool) {
        self.standby.send_replace(standby);
        metrics::gauge!(crate::metrics::STANDBY).set(if standby { 1.0 } else { 0.0 });
    }

    pub fn is_standby(&self) -> bool {
        *self.standby.borrow()
    }

    /// Resolves once this instance does its job: it streams, or it stands by for another that does.
    pub async fn wait_working(&self) {
        let mut streaming = self.streaming.subscribe();
        let mut standby = self.standby.subscribe();
        tokio::select! {
            _ = streaming.wait_for(|s| *s) => {}
            _ = standby.wait_for(|s| *s) => {}
        }
    }

    pub fn set_lag(&self, lag: Duration) {
        let secs = lag.as_secs_f64();
        self.lag_seconds.store(secs.to_bits(), Ordering::Relaxed);
        metrics::gauge!(crate::metrics::LAG_SECONDS).set(secs);
    }

    pub fn lag(&self) -> Duration {
        Duration::from_secs_f64(f64::from_bits(self.lag_seconds.load(Ordering::Relaxed)))
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn set_sample(&self, sample: SlotSample) {
        *self.sample.lock().expect("never poisoned") = Some(sample);
    }

    pub fn sample(&self) -> Option<SlotSample> {
        self.sample.lock().expect("never poisoned").clone()
    }

    /// `Ok` when ready; otherwise why not, in a few words.
    pub fn readiness(&self) -> Result<(), String> {
        if self.is_draining() {
            return Err("draining".into());
        }
        if self.is_standby() {
            // a standby is doing its job: retries, and taking over when the streaming instance goes
            return Ok(());
        }
        if !self.is_streaming() {
            return Err("not streaming from the replication slot".into());
        }
        let lag = self.lag();
        if lag > self.max_lag {
            return Err(format!(
                "replication lag {:.1}s exceeds health.max_lag {:?}",
                lag.as_secs_f64(),
                self.max_lag
            ));
        }
        Ok(())
    }
}

/// Serves `/healthz`, `/readyz` and `/metrics` until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    metrics: Option<PrometheusHandle>,
    stop: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("http listener: {e}");
                    continue;
                }
            },
        };
        let (health, metrics) = (health.clone(), metrics.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = route(req.uri().path(), &health, metrics.as_ref());
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(path: &str, health: &Health, metrics: Option<&PrometheusHandle>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" => match health.readiness() {
            Ok(()) => (StatusCode::OK, "text/plain", "ready\n".to_string()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        "/metrics" => match metrics {
            Some(handle) => (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                handle.render(),
            ),
            None => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "metrics are not available: another metrics recorder is installed in this process\n"
                    .to_string(),
            ),
        },
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".to_string()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_streaming_and_small_lag() {
        let h = Health::new(Duration::from_secs(10));
        assert!(h.readiness().unwrap_err().contains("not streaming"));
        h.set_streaming(true);
        assert_eq!(h.readiness(), Ok(()));
        h.set_lag(Duration::from_secs(11));
        assert!(h.readiness().unwrap_err().contains("health.max_lag"));
        h.set_lag(Duration::ZERO);
        h.set_draining();
        assert_eq!(h.readiness().unwrap_err(), "draining");
    }

    #[test]
    fn a_standby_is_ready_until_it_drains() {
        let h = Health::new(Duration::from_secs(10));
        h.set_standby(true);
        assert_eq!(h.readiness(), Ok(()));
        h.set_draining();
        assert_eq!(h.readiness().unwrap_err(), "draining");
    }

    #[test]
    fn routes_answer_with_status_codes() {
        let h = Health::new(Duration::from_secs(10));
        assert_eq!(route("/healthz", &h, None).status(), StatusCode::OK);
        assert_eq!(
            route("/readyz", &h, None).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        h.set_streaming(true);
        assert_eq!(route("/readyz", &h, None).status(), StatusCode::OK);
        assert_eq!(route("/metrics", &h, None).status(), StatusCode::NOT_FOUND);
        assert_eq!(route("/nope", &h, None).status(), StatusCode::NOT_FOUND);
    }
}
