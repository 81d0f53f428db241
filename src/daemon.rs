//! `walhook run`: wires source → fan-out → dispatch → record, plus the retry scheduler, the endpoint cache
//! refresher and the health endpoint, under one cancellation token.
//!
//! Shutdown order matters for "ack after record": the source and the scheduler stop taking work first;
//! in-flight attempts finish and their outcomes are recorded; the source confirms the recorded position; only
//! then does the recorder stop. `shutdown.drain_timeout` bounds all of it, and a second signal aborts at
//! once; whatever was not confirmed is replayed by the slot on the next start (or, with the notify source, claimed again once its lease lapses).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, SourceKind};
use crate::dispatch::client::{ClientSettings, HttpClient};
use crate::dispatch::guard::{Cidr, NetworkPolicy};
use crate::dispatch::limits::BreakerPolicy;
use crate::dispatch::retry::RetryPolicy;
use crate::dispatch::{DispatchSettings, Dispatcher};
use crate::endpoint_state::EndpointStateWriter;
use crate::fanout::EndpointCache;
use crate::health::Health;
use crate::monitor::Monitor;
use crate::record;
use crate::retention::Retention;
use crate::scheduler::Scheduler;
use crate::source::notify::NotifySource;
use crate::source::replication::ReplicationSource;
use crate::source::replication::SlotKeeper;
use crate::source::{Pipeline, SourceError};
use crate::store::Store;
use crate::trace::Collector;

/// Why `walhook run` (or `recover-slot`) stopped. Each message is complete on its own: no variant exposes
/// a `source()` that `{:#}` would print a second time.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Config(ConfigError),
    #[error("{0}")]
    Source(SourceError),
    #[error("cannot listen on http.listen {addr}: {error}{}", listen_fix(.error))]
    Listen {
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
    #[error("{0}")]
    Tls(crate::dispatch::client::TlsError),
    #[error("{0}")]
    Trace(crate::trace::TraceError),
}

impl From<ConfigError> for RunError {
    fn from(e: ConfigError) -> Self {
        RunError::Config(e)
    }
}

impl From<SourceError> for RunError {
    fn from(e: SourceError) -> Self {
        RunError::Source(e)
    }
}

impl RunError {
    /// Names the role of `db` in fixes rendered without it (a statement deep in a source only knows its
    /// session, not the settings it was opened with).
    fn naming_user(self, db: &crate::conninfo::ConnInfo) -> RunError {
        let name = |m: String| crate::pgerror::name_target(&m, db);
        match self {
            RunError::Source(SourceError::Fatal(m)) => {
                RunError::Source(SourceError::Fatal(name(m)))
            }
            RunError::Source(SourceError::Transient(m)) => {
                RunError::Source(SourceError::Transient(name(m)))
            }
            other => other,
        }
    }
}

impl From<crate::dispatch::client::TlsError> for RunError {
    fn from(e: crate::dispatch::client::TlsError) -> Self {
        RunError::Tls(e)
    }
}

impl From<crate::trace::TraceError> for RunError {
    fn from(e: crate::trace::TraceError) -> Self {
        RunError::Trace(e)
    }
}

fn listen_fix(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            "; another process (another walhook?) listens there: stop it, or set http.listen to a free \
             address or \"off\""
        }
        std::io::ErrorKind::PermissionDenied => {
            "; ports below 1024 need privileges: set http.listen to a port above 1024"
        }
        std::io::ErrorKind::AddrNotAvailable => {
            "; no interface of this host has that address: set http.listen to one of its addresses"
        }
        _ => "",
    }
}

/// What `run` builds from the configuration before it connects: the connection settings, the delivery
/// client (`delivery.ca_file`, `delivery.allowed_networks`) and the span exporter (`[tracing]`, when on).
/// `walhook check-config` builds the same, so it refuses exactly what `run` would refuse before touching the
/// database.
fn build(
    config: &Config,
) -> Result<(crate::conninfo::ConnInfo, HttpClient, Option<Collector>), RunError> {
    let db = config.database_url()?;
    let allowed = config
        .delivery
        .allowed_networks
        .iter()
        .map(|s| {
            s.parse::<Cidr>().map_err(|e| {
                RunError::Config(ConfigError::InvalidValue {
                    key: "delivery.allowed_networks".into(),
                    message: format!("{s:?}: {e}"),
                    origin: None,
                })
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let policy = NetworkPolicy {
        allow_private: config.delivery.allow_private_networks,
        allowed,
    };
    let client = HttpClient::new(
        ClientSettings {
            connect_timeout: config.delivery.connect_timeout,
            pool_idle_timeout: config.delivery.pool_idle_timeout,
            pool_max_idle_per_host: config.delivery.pool_max_idle_per_host,
            response_excerpt_bytes: config.delivery.response_excerpt_bytes,
            user_agent: config.delivery.user_agent.clone(),
            https_only: config.delivery.https_only,
            http2: config.delivery.http2,
            tls_roots: config.delivery.tls_roots,
            ca_file: (!config.delivery.ca_file.is_empty())
                .then(|| config.delivery.ca_file.clone().into()),
            proxy: config.delivery.proxy()?,
            no_proxy: config.delivery.no_proxy()?,
        },
        policy,
    )?;
    let collector = config
        .tracing
        .settings()
        .map(|settings| Collector::new(&settings))
        .transpose()?;
    Ok((db, client, collector))
}

/// Binds `http.listen` (`None` when it is off).
async fn listen(config: &Config) -> Result<Option<tokio::net::TcpListener>, RunError> {
    match config.http.listen {
        Some(addr) => Ok(Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|error| RunError::Listen { addr, error })?,
        )),
        None => Ok(None),
    }
}

/// `walhook check-config`: every check `run` makes before connecting (the configuration, `database_url`, the
/// delivery client, binding `http.listen`), with nothing kept.
pub async fn check_offline(config: &Config) -> Result<(), RunError> {
    build(config)?;
    drop(listen(config).await?);
    Ok(())
}

/// The configured source.
enum Source {
    Replication(ReplicationSource),
    Notify(NotifySource),
}

impl Source {
    async fn prepare(&self) -> Result<(), SourceError> {
        match self {
            Source::Replication(s) => s.prepare().await,
            Source::Notify(s) => s.prepare().await,
        }
    }

    async fn run(self, stop: CancellationToken) -> Result<(), SourceError> {
        match self {
            Source::Replication(s) => s.run(stop).await,
            Source::Notify(s) => s.run(stop).await,
        }
    }
}

/// Runs the daemon until `stop` is cancelled (graceful drain) or `abort` is (immediate).
pub async fn run(
    config: Config,
    stop: CancellationToken,
    abort: CancellationToken,
) -> Result<(), RunError> {
    let (db, client, collector) = build(&config)?;
    // bound before anything is created in the database, so a taken port fails the start without side effects
    let listener = listen(&config).await?;
    let metrics = crate::metrics::install();
    crate::metrics::register_all();
    let source_label = match config.source {
        SourceKind::Replication => "replication",
        SourceKind::Notify => "notify",
    };
    metrics::gauge!(crate::metrics::SOURCE, "source" => source_label).set(1.0);
    let health = Health::new(config.health.max_lag);
    let settings = DispatchSettings {
        retry: RetryPolicy {
            schedule: config.delivery.retry_schedule.clone(),
            jitter: config.delivery.retry_jitter,
            min_backoff_throttled: config.delivery.throttled_min_backoff,
        },
        breaker: BreakerPolicy {
            threshold: config.delivery.breaker_threshold,
            cooldown: config.delivery.breaker_cooldown,
            max_cooldown: config.delivery.breaker_max_cooldown,
        },
        timeout: config.delivery.timeout,
        concurrency: config.delivery.concurrency,
        max_in_flight_per_endpoint: config.delivery.max_in_flight_per_endpoint,
        max_in_flight_per_tenant: config.delivery.max_in_flight_per_tenant(),
        queue_wait: config.delivery.queue_wait,
    };
    let wake = Arc::new(tokio::sync::Notify::new());
    let (recorder, recorder_task) = record::channel(
        db.clone(),
        config.record.batch_size,
        config.record.flush_interval,
        wake.clone(),
    );
    let (disable_tx, disable_rx) = tokio::sync::mpsc::unbounded_channel();
    let spans = collector.map(Collector::start);
    let catalog = Arc::new(crate::catalog::CatalogCell::default());
    let dispatcher = Arc::new(
        Dispatcher::new(client, recorder.clone(), settings, disable_tx)
            .with_payload_logging(config.log.payloads)
            .with_span_export(spans.clone())
            .with_catalog(catalog.clone(), crate::catalog::Renderer::new(db.clone())),
    );
    tokio::spawn(Dispatcher::sweep(Arc::downgrade(&dispatcher)));
    let endpoints = Arc::new(EndpointCache::default());

    // the first endpoint load happens before streaming, so no event is matched against an empty cache
    let pipeline = Arc::new(Pipeline {
        endpoints: endpoints.clone(),
        dispatcher: dispatcher.clone(),
        budget: Arc::new(Semaphore::new(config.delivery.max_in_flight_events.max(1))),
        budget_size: config.delivery.max_in_flight_events.max(1),
    });
    let source = match config.source {
        SourceKind::Replication => Source::Replication(ReplicationSource {
            db: db.clone(),
            slot: config.replication.slot.clone(),
            publication: config.replication.publication.clone(),
            status_interval: config.replication.status_interval,
            standby_interval: config.replication.standby_interval,
            pipeline,
            health: health.clone(),
            settle_within: config.delivery.timeout
                + config.delivery.queue_wait
                + Duration::from_secs(5),
            prepared: Default::default(),
        }),
        SourceKind::Notify => Source::Notify(NotifySource {
            db: db.clone(),
            poll_interval: config.notify.poll_interval,
            max_poll_interval: config.notify.max_poll_interval,
            wake_trigger: config.notify.wake_trigger,
            batch_size: config.notify.batch_size,
            lease: config.notify.lease,
            replication_slot: config.replication.slot.clone(),
            pipeline,
        }),
    };
    source
        .prepare()
        .await
        .map_err(|e| RunError::from(e).naming_user(&db))?;
    if config.source == SourceKind::Notify {
        // polling has no stream to wait for: ready once prepared
        health.set_polling();
    }
    let mut refresher = EndpointRefresher {
        db: db.clone(),
        cache: endpoints.clone(),
        catalog,
        generation: None,
        store: None,
        next_expiry: None,
    };
    while let Err(e) = refresher.refresh().await {
        tracing::warn!("loading endpoints failed, retrying: {e}");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.cancelled() => return Ok(()),
        }
    }

    let workers = CancellationToken::new();
    let recorder_handle = tokio::spawn(recorder_task.run(abort.clone()));
    let refresh_interval = config.endpoints.refresh_interval;
    let refresher_handle = tokio::spawn({
        let stop = workers.clone();
        async move { refresher.run(refresh_interval, stop).await }
    });
    let state_handle = tokio::spawn(
        EndpointStateWriter {
            db: db.clone(),
            endpoints: endpoints.clone(),
            disable_after: config.delivery.disable_after,
            disable: disable_rx,
        }
        .run(workers.clone()),
    );
    // the drain starts with the first signal: no new claims, not ready, systemd told; the timeout aborts
    let drain_timer = tokio::spawn({
        let (stop, abort, health) = (stop.clone(), abort.clone(), health.clone());
        let timeout = config.shutdown.drain_timeout;
        async move {
            stop.cancelled().await;
            health.set_draining();
            crate::systemd::stopping();
            tokio::select! {
                _ = tokio::time::sleep(timeout) => {
                    tracing::warn!(
                        "drain did not finish within shutdown.drain_timeout ({}); aborting: what was not \
                         recorded is replayed from the slot on the next start",
                        humantime::format_duration(timeout)
                    );
                    abort.cancel();
                }
                _ = abort.cancelled() => {}
            }
        }
    });
    // the scheduler stops claiming at the first signal, or when the source ends for any other reason
    let claims = stop.child_token();
    let notifier_handle = tokio::spawn(crate::systemd::run(health.clone(), workers.clone()));
    let monitor_handle = tokio::spawn(
        Monitor {
            db: db.clone(),
            slot: (config.source == SourceKind::Replication)
                .then(|| config.replication.slot.clone()),
            interval: config.health.interval,
            health: health.clone(),
            dispatcher: dispatcher.clone(),
            metrics: metrics.clone(),
        }
        .run(workers.clone()),
    );
    let retention_handle = config.retention.enabled.then(|| {
        tokio::spawn(
            Retention {
                db: db.clone(),
                config: config.retention.clone(),
                prune_outbox: config.source == SourceKind::Replication,
                slot: config.replication.slot.clone(),
            }
            .run(workers.clone()),
        )
    });
    let scheduler_handle = tokio::spawn(
        Scheduler {
            wake,
            db: db.clone(),
            poll_interval: config.scheduler.poll_interval,
            batch_size: config.scheduler.batch_size,
            lease: config.scheduler.lease,
            attempt_bound: config.delivery.timeout + config.delivery.queue_wait,
            queue_wait: config.delivery.queue_wait,
            ordered_by_outbox: config.source == SourceKind::Notify,
            endpoints: endpoints.clone(),
            dispatcher: dispatcher.clone(),
            recorder: recorder.clone(),
        }
        .run(claims.clone()),
    );
    let health_handle = listener.map(|listener| {
        tokio::spawn(crate::health::serve(
            listener,
            health.clone(),
            metrics,
            workers.clone(),
        ))
    });

    tracing::info!("walhook running");
    let result = tokio::select! {
        r = source.run(stop.clone()) => r,
        _ = abort.cancelled() => Ok(()),
    };
    // drain: no new work; in-flight attempts finish and are recorded, then the recorder ends
    claims.cancel();
    workers.cancel();
    let _ = scheduler_handle.await;
    let _ = refresher_handle.await;
    let _ = state_handle.await;
    // queued jobs are parked (recorded as pending) rather than sent during the drain
    dispatcher.park_queued();
    let _ = monitor_handle.await;
    if let Some(h) = retention_handle {
        let _ = h.await;
    }
    let _ = notifier_handle.await;
    drop(dispatcher);
    drop(recorder);
    let _ = recorder_handle.await;
    // the last attempts' spans, unless aborting: then they are dropped with the export thread's queue
    if let Some(spans) = spans.filter(|_| !abort.is_cancelled()) {
        let timeout = config.tracing.otlp_timeout.min(Duration::from_secs(5));
        let _ = tokio::task::spawn_blocking(move || spans.shutdown(timeout)).await;
    }
    drain_timer.abort();
    if let Some(h) = health_handle {
        h.abort();
    }
    result.map_err(|e| RunError::from(e).naming_user(&db))
}

/// `walhook recover-slot`: see [`SlotKeeper::recover`].
pub async fn recover_slot(
    config: Config,
    since: Option<std::time::SystemTime>,
) -> Result<crate::source::replication::Recovery, RunError> {
    let db = config.database_url()?;
    let keeper = SlotKeeper {
        db: db.clone(),
        slot: config.replication.slot.clone(),
        publication: config.replication.publication.clone(),
    };
    keeper
        .recover(since)
        .await
        .map_err(|e| RunError::from(e).naming_user(&db))
}

/// Keeps the endpoint cache in step with `walhook.endpoints`.
struct EndpointRefresher {
    db: crate::conninfo::ConnInfo,
    cache: Arc<EndpointCache>,
    /// The event catalog, reloaded with the endpoints (its tables bump the same generation).
    catalog: Arc<crate::catalog::CatalogCell>,
    generation: Option<i64>,
    store: Option<Store>,
    /// When the first old secret of a rotation expires: the cache reloads then to stop signing with it.
    next_expiry: Option<std::time::SystemTime>,
}

impl EndpointRefresher {
    async fn refresh(&mut self) -> Result<(), crate::store::StoreError> {
        if self.store.as_ref().is_none_or(|s| s.is_closed()) {
            self.store = Some(Store::connect(&self.db).await?);
            self.generation = None; // changes may have happened while disconnected
        }
        let store = self.store.as_ref().expect("connected above");
        let generation = store.endpoints_generation().await?;
        let expired = self
            .next_expiry
            .is_some_and(|t| t <= std::time::SystemTime::now());
        if self.generation != Some(generation) || expired {
            let (rows, next_expiry) = store.enabled_endpoints().await?;
            self.catalog
                .set(crate::catalog::Catalog::build(store.catalog().await?));
            self.next_expiry = next_expiry;
            tracing::debug!(generation, endpoints = rows.len(), "endpoints reloaded");
            self.cache.replace(rows);
            self.generation = Some(generation);
        }
        self.cache.loaded_at(generation);
        Ok(())
    }

    async fn run(mut self, every: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                _ = self.cache.wanted.notified() => {}
            }
            if let Err(e) = self.refresh().await {
                tracing::warn!("refreshing endpoints failed: {e}");
                if e.is_connection() {
                    self.store = None;
                }
            }
        }
    }
}
