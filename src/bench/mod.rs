//! `walhook bench`: how fast walhook relays on this machine and this PostgreSQL, and what it costs.
//!
//! Speed is measured here, never asserted by a timed test. Every scenario runs in a scratch database of its
//! own (created on the given server, or on a throwaway cluster, and dropped afterwards: never the user's own
//! database) with a replication slot of its own name, against a loopback receiver in this process, with the
//! relay as a child process (`walhook run`) so that its memory and CPU time can be read from `/proc`.
//!
//! - `baseline`: the insert rate the database sustains with no relay, one event per transaction and 100 per
//!   transaction: the ceiling the relay is asked to follow. Then the same with the notify source's
//!   `outbox_wake` trigger (and partial index) installed and a session listening, because every `NOTIFY`
//!   takes a cluster-wide lock at commit: what `source = "notify"` costs the application's insert rate.
//! - `drain`: a backlog committed first, then the relay started: deliveries per second until every delivery is
//!   received *and* recorded as succeeded; time to the first delivery.
//! - `backfill`: a backlog committed before the relay's *first* start (no slot yet, 1,000,000 events in a full
//!   run): deliveries per second until every delivery is recorded, peak RSS, and the ratio to `drain`'s rate
//!   in the same run. With replication these rows are read under the new slot's snapshot, not streamed.
//! - `live`: writers at 1,000/s, 5,000/s and full speed with the relay running: delivered rate, commit-to-receive
//!   latency (writer's clock right after COMMIT returned vs the receiver's arrival time, same clock), backlog.
//! - `fanout`: a backlog delivered to 10 endpoints that all match every event.
//! - `retries`: full-speed writers while 10 % of first attempts are answered 500.
//! - `fairness` and `tenants`: one tenant's backlog beside another's trickle, and 1,000 tenants with a few
//!   broken endpoints (see `tenants.rs`).
//! - `slow`: a backlog over 1,000 endpoints answering in 50–300 ms, 2 % of them hanging: deliveries per second
//!   against what the in-flight limit allows (see `slow.rs`); with `--tls` over HTTPS, offering HTTP/2 (`tls.rs`).
//! - `portal`: the portal's pages over a million deliveries (see `portal.rs`).
//! - `publish`: an event through `walhook.publish()` (a logical decoding message) against an outbox insert,
//!   with the same writers: rate, WAL and PostgreSQL CPU per event (see `publish.rs`).
//!
//! `--source` picks the relays' source (the scratch database then gets a slot, or the notify source's index
//! and trigger, before any event is written); `--instances N` runs N relays on the same database, as several
//! daemons would share one. Deliveries are counted once per (endpoint, webhook-id): a request for a pair
//! already answered 2xx is a duplicate, counted and reported (a retry after a 500 is not one).
//!
//! The relay's own SQL is told from the benchmark's by pg_stat_statements (when the server has it loaded):
//! every statement the benchmark runs carries the `/* walhook-bench */` marker, and the relay's statements are
//! the rest of the scratch database's. Replication protocol commands are not statements and are not counted.

mod portal;
mod procfs;
mod publish;
mod relay;
mod report;
mod server;
mod slow;
mod stats;
mod tenants;
mod tls;
mod workload;

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::cluster::ClusterError;
pub use crate::config::SourceKind;
use crate::receiver::{Receiver, Reply};
use relay::Relays;
pub use report::{
    Backfill, Baseline, Cost, Drain, Fairness, Fanout, InstanceCost, Live, LivePhase, Machine,
    Portal, PortalPage, Publish, Report, Retries, Settings, Slow, StatementUse, Tenants,
    TenantsPhase,
};
use server::{cost, Scratch, Server, Setup};
pub use stats::Latency;
use stats::{per_sec, ratio};
use workload::Pace;

/// Backlog of the `backfill` scenario in a full run (`--quick`: the drain's; `--events` sets both).
const BACKFILL_EVENTS: u64 = 1_000_000;
/// Offered rates of the `live` scenario, events per second.
const LIVE_RATES: [f64; 2] = [1_000.0, 5_000.0];
/// Endpoints of the `fanout` scenario.
const FANOUT_ENDPOINTS: u64 = 10;
/// Share of first attempts answered 500 in the `retries` scenario, drawn at random: runs of failures happen
/// as they do with real receivers, and the circuit breaker must let such an endpoint flow.
const FAIL_SHARE: f64 = 0.1;
/// How long the relay may take to start streaming.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// A live phase's backlog is bounded when the relay is at most this far behind when the writers stop.
const BOUNDED_BEHIND_S: f64 = 0.25;
/// How often the backlog of a live phase is sampled.
const BACKLOG_SAMPLE: Duration = Duration::from_millis(100);
/// Statements listed per measurement, most frequent first.
const TOP_STATEMENTS: usize = 6;
/// How long to look for the notify relays' `LISTEN` sessions before going on without seeing them (polling
/// finds the rows anyway; only the first events' latency could suffer).
const LISTEN_DEADLINE: Duration = Duration::from_secs(5);
/// Most relay instances `--instances` accepts: each is a process with its own connections.
pub const MAX_INSTANCES: usize = 16;

/// Why the benchmark could not run to the end.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("starting the throwaway PostgreSQL cluster failed: {0}")]
    Cluster(#[from] ClusterError),
    #[error("{what} failed: {detail}")]
    Db { what: String, detail: String },
    #[error("{what} failed: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The relay process failed, with the tail of its log.
    #[error("{0}")]
    Relay(String),
    /// Deliveries stopped short of the expected count before the deadline.
    #[error("{0}")]
    Stalled(String),
    #[error(
        "--database-url is not a valid connection string; expected a URL like \
         postgres://user:password@host:5432/db or \"host=... user=... dbname=...\""
    )]
    InvalidUrl,
    #[error("{0}")]
    Internal(String),
    /// The receiver could not verify some signatures: a bug in walhook, not in the setup.
    #[error("{bad} of {total} requests failed signature verification: this is a bug in walhook")]
    Unverified { bad: usize, total: usize },
    #[error("interrupted; the scratch databases were dropped")]
    Interrupted,
    /// Options that contradict each other.
    #[error("{0}")]
    Options(String),
}

impl BenchError {
    /// A database failure, as [`crate::pgerror`] renders it (the server's message and the fix).
    fn db(what: &str, e: impl Into<crate::store::StoreError>) -> BenchError {
        BenchError::Db {
            what: what.to_string(),
            detail: e.into().to_string(),
        }
    }
}

fn db_err<E: Into<crate::store::StoreError>>(what: &'static str) -> impl FnOnce(E) -> BenchError {
    move |e| BenchError::db(what, e)
}

/// A part of the benchmark that can be chosen with `--scenarios`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scenario {
    Baseline,
    Drain,
    Backfill,
    Live,
    Fanout,
    Retries,
    Fairness,
    Tenants,
    Slow,
    Portal,
    Publish,
}

impl Scenario {
    pub const ALL: [Scenario; 11] = [
        Scenario::Baseline,
        Scenario::Drain,
        Scenario::Backfill,
        Scenario::Live,
        Scenario::Fanout,
        Scenario::Retries,
        Scenario::Fairness,
        Scenario::Tenants,
        Scenario::Slow,
        Scenario::Portal,
        Scenario::Publish,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Baseline => "baseline",
            Scenario::Drain => "drain",
            Scenario::Backfill => "backfill",
            Scenario::Live => "live",
            Scenario::Fanout => "fanout",
            Scenario::Retries => "retries",
            Scenario::Fairness => "fairness",
            Scenario::Tenants => "tenants",
            Scenario::Slow => "slow",
            Scenario::Portal => "portal",
            Scenario::Publish => "publish",
        }
    }
}

impl FromStr for Scenario {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scenario::ALL
            .into_iter()
            .find(|c| c.name() == s.trim())
            .ok_or_else(|| {
                let names: Vec<&str> = Scenario::ALL.iter().map(|c| c.name()).collect();
                format!(
                    "unknown scenario {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// `--source`: `replication` or `notify`, as in the configuration.
pub fn parse_source(s: &str) -> Result<SourceKind, String> {
    match s.trim() {
        "replication" => Ok(SourceKind::Replication),
        "notify" => Ok(SourceKind::Notify),
        other => Err(format!(
            "unknown source {other:?}; expected replication or notify"
        )),
    }
}

fn source_name(source: SourceKind) -> &'static str {
    match source {
        SourceKind::Replication => "replication",
        SourceKind::Notify => "notify",
    }
}

/// What to run; `None` fields take the defaults (of `--quick` when set).
#[derive(Clone, Debug, Default)]
pub struct BenchOptions {
    /// A server to create scratch databases on; a throwaway cluster when `None`.
    pub database_url: Option<String>,
    /// A few seconds in all, every scenario, small sizes: keeps the command working in CI.
    pub quick: bool,
    /// Backlog of the `drain` scenario (`fanout` uses a tenth of it per endpoint).
    pub events: Option<u64>,
    /// Length of each timed window (each baseline mode, each live rate, retries).
    pub duration: Option<Duration>,
    /// Concurrent writer connections.
    pub writers: Option<usize>,
    /// Empty means all.
    pub scenarios: Vec<Scenario>,
    /// Relay configuration (dotted keys, e.g. `delivery.concurrency`) on top of the benchmark's.
    pub relay_settings: Vec<(String, String)>,
    /// The relays' source.
    pub source: SourceKind,
    /// Relay processes on the same database [default: 1].
    pub instances: Option<usize>,
    /// The throwaway cluster with `fsync` on, as users run it (ignored with a given server, whose own
    /// settings apply; the report says which).
    pub durable: bool,
    /// The slow scenario's receivers serve HTTPS (HTTP/2 and HTTP/1.1 by ALPN).
    pub tls: bool,
}

/// Sizes and durations, from the options.
struct Plan {
    quick: bool,
    events: u64,
    fanout_events: u64,
    backfill_events: u64,
    window: Duration,
    writers: usize,
    scenarios: Vec<Scenario>,
    relay_settings: Vec<(String, String)>,
    source: SourceKind,
    instances: usize,
    tls: bool,
}

impl Plan {
    fn new(options: &BenchOptions) -> Result<Plan, BenchError> {
        if let Some((key, _)) = options
            .relay_settings
            .iter()
            .find(|(k, _)| k == "source" || k == "replication.slot" || k == "database_url")
        {
            return Err(BenchError::Options(format!(
                "--relay-setting {key}=… is set by the benchmark itself{}",
                if key == "source" {
                    "; use --source replication|notify"
                } else {
                    ""
                }
            )));
        }
        let instances = options.instances.unwrap_or(1);
        if !(1..=MAX_INSTANCES).contains(&instances) {
            return Err(BenchError::Options(format!(
                "--instances {instances}: expected 1 to {MAX_INSTANCES}"
            )));
        }
        let (events, window) = if options.quick {
            (5_000, Duration::from_millis(1_500))
        } else {
            (200_000, Duration::from_secs(10))
        };
        let events = options.events.unwrap_or(events).max(1);
        let scenarios = if options.scenarios.is_empty() {
            Scenario::ALL.to_vec()
        } else {
            Scenario::ALL
                .into_iter()
                .filter(|s| options.scenarios.contains(s))
                .collect()
        };
        Ok(Plan {
            quick: options.quick,
            events,
            fanout_events: (events / FANOUT_ENDPOINTS).max(1),
            backfill_events: match options.events {
                Some(_) => events,
                None if options.quick => events,
                None => BACKFILL_EVENTS,
            },
            window: options.duration.unwrap_or(window),
            writers: options.writers.unwrap_or(4).max(1),
            scenarios,
            relay_settings: options.relay_settings.clone(),
            source: options.source,
            instances,
            tls: options.tls,
        })
    }

    /// What the scratch database of `scenario` gets before any event is written.
    fn setup(&self, scenario: Scenario) -> Setup {
        match (scenario, self.source) {
            (Scenario::Baseline | Scenario::Portal, _) => Setup::Plain,
            // publish() writes messages only while walhook's slot exists, whatever the relays' source
            (Scenario::Publish, _) => Setup::Slot,
            // no slot: the relay's first start creates it, and the backlog is what it backfills
            (Scenario::Backfill, SourceKind::Replication) => Setup::Plain,
            (_, SourceKind::Replication) => Setup::Slot,
            (_, SourceKind::Notify) => Setup::Notify,
        }
    }

    /// The settings of every relay on `scratch`: what ties it to the database, the benchmark's defaults,
    /// then `--relay-setting`.
    fn relay_settings(&self, scratch_url: &str, scratch_name: &str) -> Vec<(String, String)> {
        let mut settings = vec![
            ("database_url".to_string(), scratch_url.to_string()),
            ("replication.slot".to_string(), scratch_name.to_string()),
            ("source".to_string(), source_name(self.source).to_string()),
        ];
        settings.extend(relay_defaults());
        settings.extend(self.relay_settings.iter().cloned());
        settings
    }

    /// How long `deliveries` may take before the benchmark gives up: generous, at 500 per second.
    fn deadline(&self, deliveries: u64) -> Duration {
        Duration::from_secs(60) + Duration::from_secs_f64(deliveries as f64 / 500.0)
    }
}

/// Runs the chosen scenarios and returns what was measured. Progress goes to stderr.
pub async fn run(options: BenchOptions) -> Result<Report, BenchError> {
    let started = Instant::now();
    let plan = Plan::new(&options)?;
    let server = match &options.database_url {
        Some(url) => Server::given(url).await?,
        None => {
            eprintln!(
                "bench: starting a throwaway PostgreSQL cluster{}",
                if options.durable {
                    " with fsync on (--durable)"
                } else {
                    ""
                }
            );
            Server::throwaway(options.durable).await?
        }
    };
    let bench = Bench { plan, server };
    // On Ctrl-C the scenario in progress is dropped, which kills its relay; its scratch database is dropped
    // here, so that nothing is left behind on a given server (a throwaway cluster goes away anyway).
    let result = tokio::select! {
        result = bench.run_all() => result,
        _ = tokio::signal::ctrl_c() => {
            for scenario in &bench.plan.scenarios {
                let _ = bench.server.drop_database(&server::scratch_name(*scenario)).await;
            }
            Err(BenchError::Interrupted)
        }
    };
    let Bench { plan, server } = bench;
    let machine = server.machine().await;
    server.close().await;
    let Results {
        baseline,
        drain,
        backfill,
        live,
        fanout,
        retries,
        fairness,
        tenants,
        slow,
        portal,
        publish,
    } = result?;
    let machine = machine?;
    Ok(Report {
        durable: machine.fsync == "on",
        source: source_name(plan.source).to_string(),
        instances: plan.instances,
        machine,
        settings: Settings {
            quick: plan.quick,
            events: plan.events,
            fanout_events: plan.fanout_events,
            backfill_events: plan.backfill_events,
            window_s: plan.window.as_secs_f64(),
            writers: plan.writers,
            relay_settings: relay_defaults()
                .into_iter()
                .chain(plan.relay_settings.iter().cloned())
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
        },
        baseline,
        drain,
        backfill,
        live,
        fanout,
        retries,
        fairness,
        tenants,
        slow,
        portal,
        publish,
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

/// What the scenarios run so far measured.
#[derive(Default)]
struct Results {
    baseline: Option<Baseline>,
    drain: Option<Drain>,
    backfill: Option<Backfill>,
    live: Option<Live>,
    fanout: Option<Fanout>,
    retries: Option<Retries>,
    fairness: Option<Fairness>,
    tenants: Option<Tenants>,
    slow: Option<Slow>,
    portal: Option<Portal>,
    publish: Option<Publish>,
}

/// The relay configuration every scenario uses, beyond what ties it to its scratch database: loopback
/// endpoints allowed, no HTTP listener, quiet logs, retries one second apart without jitter. Everything
/// else is walhook's default (`--relay-setting` changes it).
fn relay_defaults() -> Vec<(String, String)> {
    [
        ("delivery.allow_private_networks", "true"),
        ("http.listen", "off"),
        ("log.level", "warn"),
        ("delivery.retry_schedule", "1s,1s,1s"),
        ("delivery.retry_jitter", "0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

struct Bench {
    plan: Plan,
    server: Server,
}

impl Bench {
    async fn run_all(&self) -> Result<Results, BenchError> {
        let mut results = Results::default();
        for scenario in self.plan.scenarios.clone() {
            let scratch = self
                .server
                .scratch(scenario, self.plan.setup(scenario))
                .await?;
            eprintln!("bench: {} (database {})", scenario.name(), scratch.name);
            let r = &mut results;
            let outcome = match scenario {
                Scenario::Baseline => self.baseline(&scratch).await.map(|b| r.baseline = Some(b)),
                Scenario::Drain => self.drain(&scratch).await.map(|d| r.drain = Some(d)),
                Scenario::Backfill => {
                    let backfill = self.backfill(&scratch, r.drain.as_ref()).await;
                    backfill.map(|b| r.backfill = Some(b))
                }
                Scenario::Live => {
                    let live = self.live(&scratch, r.baseline.as_ref()).await;
                    live.map(|l| r.live = Some(l))
                }
                Scenario::Fanout => self.fanout(&scratch).await.map(|f| r.fanout = Some(f)),
                Scenario::Retries => self.retries(&scratch).await.map(|x| r.retries = Some(x)),
                Scenario::Fairness => self.fairness(&scratch).await.map(|x| r.fairness = Some(x)),
                Scenario::Tenants => self.tenants(&scratch).await.map(|x| r.tenants = Some(x)),
                Scenario::Slow => {
                    let slow = self.slow(&scratch, r.drain.as_ref()).await;
                    slow.map(|x| r.slow = Some(x))
                }
                Scenario::Portal => self.portal(&scratch).await.map(|x| r.portal = Some(x)),
                Scenario::Publish => self.publish(&scratch).await.map(|x| r.publish = Some(x)),
            };
            let removed = self.server.remove(scratch).await;
            outcome?;
            removed?;
        }
        Ok(results)
    }

    /// Both insert modes without the notify source's trigger, then (on an emptied outbox) with it installed
    /// and a session listening, as `walhook run` with `source = "notify"` would have it. A server where the
    /// trigger cannot be installed leaves those figures `null`.
    async fn baseline(&self, scratch: &Scratch) -> Result<Baseline, BenchError> {
        let single = self.insert_rate(scratch, false).await?;
        let batched = self.insert_rate(scratch, true).await?;
        let with_trigger = self.with_notify_trigger(scratch).await?;
        let (single_notify, batched_notify) =
            (with_trigger.map(|(s, _)| s), with_trigger.map(|(_, b)| b));
        Ok(Baseline {
            writers: self.plan.writers,
            inserts_per_sec: single,
            inserts_per_sec_batched: batched,
            batch: workload::BATCH,
            inserts_per_sec_with_notify_trigger: single_notify,
            inserts_per_sec_batched_with_notify_trigger: batched_notify,
            notify_trigger_ratio: single_notify.and_then(|r| ratio(r, single)),
            notify_trigger_ratio_batched: batched_notify.and_then(|r| ratio(r, batched)),
        })
    }

    /// Insert rates, one event and `BATCH` events per transaction, with the notify source's index and trigger
    /// installed on an emptied outbox and a `LISTEN` session like the relay's (each notifying commit then also
    /// signals a listening backend). `None`, with a note, when they cannot be installed here.
    async fn with_notify_trigger(
        &self,
        scratch: &Scratch,
    ) -> Result<Option<(f64, f64)>, BenchError> {
        scratch
            .client
            .batch_execute(&format!("{} truncate walhook.outbox", workload::MARKER))
            .await
            .map_err(db_err("emptying the outbox between baseline runs"))?;
        if let Err(e) = crate::store::install_notify(&scratch.db, true).await {
            eprintln!(
                "bench:   the notify source's index and trigger cannot be installed ({e}); the baseline \
                 with the trigger is left out"
            );
            return Ok(None);
        }
        let wake = Arc::new(tokio::sync::Notify::new());
        let mut listener = tokio::spawn({
            let (db, wake) = (scratch.db.clone(), wake.clone());
            async move {
                let listening = std::sync::atomic::AtomicBool::new(false);
                crate::store::listen_outbox(&db, &wake, &listening).await
            }
        });
        // `listen_outbox` wakes once subscribed
        let subscribed = tokio::select! {
            _ = wake.notified() => Ok(()),
            ended = &mut listener => Err(match ended {
                Ok(Err(e)) => e.to_string(),
                _ => "its connection ended".into(),
            }),
            _ = tokio::time::sleep(START_DEADLINE) => Err("timed out".into()),
        };
        if let Err(why) = subscribed {
            listener.abort();
            return Err(BenchError::Stalled(format!(
                "the baseline's LISTEN session did not subscribe: {why}"
            )));
        }
        let measured = async {
            let single = self.insert_rate(scratch, false).await?;
            let batched = self.insert_rate(scratch, true).await?;
            Ok(Some((single, batched)))
        }
        .await;
        listener.abort();
        measured
    }

    /// Full-speed writers for one window, with no relay: inserts per second.
    async fn insert_rate(&self, scratch: &Scratch, batched: bool) -> Result<f64, BenchError> {
        let p = &self.plan;
        let commits = workload::write(
            &scratch.db,
            p.writers,
            Pace::FullSpeed,
            batched,
            p.window,
            Arc::default(),
            &workload::Tenancy::None,
        )
        .await?;
        Ok(per_sec(commits.events, commits.elapsed))
    }

    /// A backlog of `events` for `endpoints` endpoints, then the relay: shared by `drain`, `fanout` and
    /// `backfill` (`first_start`: the relay creates its slot and backfills, so it is not waited for to
    /// stream; the clock runs from its start either way).
    async fn backlog(
        &self,
        scratch: &Scratch,
        events: u64,
        endpoints: u64,
        first_start: bool,
    ) -> Result<BacklogRun, BenchError> {
        let receiver = BenchReceiver::start(scratch, endpoints, false).await?;
        let preload = workload::preload(&scratch.db, self.plan.writers, events, None).await?;
        eprintln!(
            "bench:   {events} events committed in {:.1} s; starting the relay",
            preload.as_secs_f64()
        );
        let deliveries = events * endpoints;
        let before = self.server.snapshot(scratch, None).await?;
        let mut relays = if first_start {
            self.spawn_relays(scratch, &[])?
        } else {
            self.start_relays(scratch).await?
        };
        let spawned = relays.spawned();
        let deadline = Instant::now() + self.plan.deadline(deliveries);
        receiver
            .wait_ok(deliveries, deadline, &mut relays, "deliveries")
            .await?;
        let delivered = since(spawned);
        wait_recorded(scratch, deliveries, deadline, &mut relays).await?;
        let recorded = since(spawned);
        let after = self.server.snapshot(scratch, Some(&relays)).await?;
        let cost = cost(&before, &after, &relays, deliveries);
        relays.stop().await?;
        let duplicates = receiver.tally.duplicates.load(Ordering::Relaxed);
        let received = receiver.finish().await?;
        let first = received.iter().map(|r| r.arrived).min();
        Ok(BacklogRun {
            deliveries,
            preload,
            delivered,
            recorded,
            first_delivery_ms: first.map(|t| ms_between(spawned, t)),
            duplicates,
            cost,
        })
    }

    async fn drain(&self, scratch: &Scratch) -> Result<Drain, BenchError> {
        let events = self.plan.events;
        let run = self.backlog(scratch, events, 1, false).await?;
        Ok(Drain {
            events,
            deliveries_per_sec: per_sec(run.deliveries, run.recorded),
            first_delivery_ms: run.first_delivery_ms,
            delivered_s: run.delivered.as_secs_f64(),
            recorded_s: run.recorded.as_secs_f64(),
            preload_s: run.preload.as_secs_f64(),
            duplicates: run.duplicates,
            postgres_cpu_us_per_delivery: run.cost.relay_postgres_cpu_us_per_delivery(),
            cost: run.cost,
        })
    }

    /// Like `drain`, but committed before the relay's first start: with replication, what the new slot's
    /// snapshot hands over rather than what it streams.
    async fn backfill(
        &self,
        scratch: &Scratch,
        drain: Option<&Drain>,
    ) -> Result<Backfill, BenchError> {
        let events = self.plan.backfill_events;
        let run = self.backlog(scratch, events, 1, true).await?;
        let rate = per_sec(run.deliveries, run.recorded);
        let drain_per_sec = drain.map(|d| d.deliveries_per_sec);
        Ok(Backfill {
            events,
            deliveries_per_sec: rate,
            drain_per_sec,
            ratio_to_drain: drain_per_sec.and_then(|d| ratio(rate, d)),
            first_delivery_ms: run.first_delivery_ms,
            recorded_s: run.recorded.as_secs_f64(),
            preload_s: run.preload.as_secs_f64(),
            duplicates: run.duplicates,
            cost: run.cost,
        })
    }

    async fn fanout(&self, scratch: &Scratch) -> Result<Fanout, BenchError> {
        let events = self.plan.fanout_events;
        let run = self
            .backlog(scratch, events, FANOUT_ENDPOINTS, false)
            .await?;
        Ok(Fanout {
            endpoints: FANOUT_ENDPOINTS,
            events,
            deliveries_per_sec: per_sec(run.deliveries, run.recorded),
            first_delivery_ms: run.first_delivery_ms,
            recorded_s: run.recorded.as_secs_f64(),
            duplicates: run.duplicates,
            cost: run.cost,
        })
    }

    /// The full-speed ratio compares with the baseline the application gets under this source: with the
    /// notify source's trigger for `notify`.
    async fn live(
        &self,
        scratch: &Scratch,
        baseline: Option<&Baseline>,
    ) -> Result<Live, BenchError> {
        let receiver = BenchReceiver::start(scratch, 1, false).await?;
        let mut relay = self.start_relays(scratch).await?;
        let mut phases = Vec::new();
        let paces = LIVE_RATES
            .iter()
            .map(|r| Pace::PerSecond(*r))
            .chain([Pace::FullSpeed]);
        let mut recorded = 0;
        for pace in paces {
            let phase = self
                .timed_phase(scratch, &receiver, &mut relay, pace, &mut recorded)
                .await?;
            let latency = phase.latency(|_| true);
            let catch_up = phase
                .caught_up
                .duration_since(phase.ended)
                .unwrap_or_default();
            let delivered_per_sec = per_sec(phase.ok_in_window, phase.commits.elapsed);
            let committed_per_sec = per_sec(phase.commits.events, phase.commits.elapsed);
            let behind = ratio(phase.backlog_end as f64, committed_per_sec).unwrap_or(0.0);
            eprintln!(
                "bench:   {}: {:.0} committed/s, {:.0} delivered/s, p99 {} ms",
                pace_name(pace),
                committed_per_sec,
                delivered_per_sec,
                latency
                    .as_ref()
                    .map_or("-".into(), |l| format!("{:.1}", l.p99_ms))
            );
            phases.push(LivePhase {
                name: pace_name(pace),
                offered_per_sec: match pace {
                    Pace::PerSecond(r) => Some(r),
                    Pace::FullSpeed => None,
                },
                committed: phase.commits.events,
                committed_per_sec,
                delivered_per_sec,
                latency,
                arrived_before_commit_returned: phase.early,
                duplicates: phase.duplicates,
                backlog_max: phase
                    .backlog
                    .iter()
                    .copied()
                    .max()
                    .unwrap_or(0)
                    .max(phase.backlog_end),
                backlog_end: phase.backlog_end,
                backlog_every_100ms: phase.backlog.clone(),
                p99_ms_by_second: phase.p99_by_second(),
                behind_s: behind,
                catch_up_s: catch_up.as_secs_f64(),
                bounded: behind <= BOUNDED_BEHIND_S,
                cost: phase.cost,
            });
        }
        let peak_rss_mib = relay.peak_rss_mib_sum();
        relay.stop().await?;
        let duplicates = receiver.tally.duplicates.load(Ordering::Relaxed);
        receiver.finish().await?;
        let p99_at = |rate: f64| {
            phases
                .iter()
                .find(|p| p.offered_per_sec == Some(rate))
                .and_then(|p| p.latency.as_ref().map(|l| l.p99_ms))
        };
        let full = phases.iter().find(|p| p.offered_per_sec.is_none());
        let to = |rate: fn(&Baseline) -> Option<f64>| {
            full.zip(baseline.and_then(rate))
                .and_then(|(f, b)| ratio(f.delivered_per_sec, b))
        };
        let without_trigger = to(|b| Some(b.inserts_per_sec));
        let with_trigger = to(|b| b.inserts_per_sec_with_notify_trigger);
        let notify = self.plan.source == SourceKind::Notify;
        Ok(Live {
            full_speed_ratio: if notify {
                with_trigger
            } else {
                without_trigger
            },
            full_speed_ratio_to_baseline_without_trigger: if notify {
                without_trigger
            } else {
                None
            },
            p99_ms_at_1000: p99_at(LIVE_RATES[0]),
            p99_ms_at_5000: p99_at(LIVE_RATES[1]),
            peak_rss_mib,
            duplicates,
            phases,
        })
    }

    async fn retries(&self, scratch: &Scratch) -> Result<Retries, BenchError> {
        let receiver = BenchReceiver::start(scratch, 1, true).await?;
        let mut relay = self.start_relays(scratch).await?;
        let mut recorded = 0;
        let phase = self
            .timed_phase(
                scratch,
                &receiver,
                &mut relay,
                Pace::FullSpeed,
                &mut recorded,
            )
            .await?;
        relay.stop().await?;
        let failed_first_attempts = receiver.tally.failed.load(Ordering::Relaxed);
        let duplicates = receiver.tally.duplicates.load(Ordering::Relaxed);
        receiver.finish().await?;
        let latency_first_attempt = phase.latency(|s| s.attempts == 1);
        Ok(Retries {
            deliveries_per_sec: per_sec(phase.ok_in_window, phase.commits.elapsed),
            committed_per_sec: per_sec(phase.commits.events, phase.commits.elapsed),
            p99_ms: latency_first_attempt.as_ref().map(|l| l.p99_ms),
            latency_first_attempt,
            latency_retried: phase.latency(|s| s.attempts > 1),
            failed_first_attempts,
            duplicates,
            all_succeeded_s: phase
                .recorded_at
                .duration_since(phase.ended)
                .unwrap_or_default()
                .as_secs_f64(),
            cost: phase.cost,
        })
    }

    /// Writers for one window with the relay running, then waits until everything they committed is
    /// received and recorded; `recorded` is the running total of succeeded deliveries in the database.
    async fn timed_phase(
        &self,
        scratch: &Scratch,
        receiver: &BenchReceiver,
        relay: &mut Relays,
        pace: Pace,
        recorded: &mut u64,
    ) -> Result<Phase, BenchError> {
        let before = self.server.snapshot(scratch, Some(relay)).await?;
        let ok_before = receiver.tally.ok.load(Ordering::Relaxed);
        let duplicates_before = receiver.tally.duplicates.load(Ordering::Relaxed);
        let log_before = receiver.inner.count();
        let committed = Arc::new(AtomicU64::new(0));
        let started = SystemTime::now();
        let writers = tokio::spawn({
            let db = scratch.db.clone();
            let (writers, window, committed) =
                (self.plan.writers, self.plan.window, committed.clone());
            async move {
                let tenancy = workload::Tenancy::None;
                workload::write(&db, writers, pace, false, window, committed, &tenancy).await
            }
        });
        // sample the backlog while the writers run
        let mut backlog = Vec::new();
        let mut tick = tokio::time::interval(BACKLOG_SAMPLE);
        while !writers.is_finished() {
            tick.tick().await;
            let ok = receiver.tally.ok.load(Ordering::Relaxed) - ok_before;
            backlog.push(committed.load(Ordering::Relaxed).saturating_sub(ok));
            relay.check()?;
        }
        let commits = writers
            .await
            .map_err(|e| BenchError::Internal(format!("the writers' task failed: {e}")))??;
        let ended = SystemTime::now();
        let backlog_end = commits
            .events
            .saturating_sub(receiver.tally.ok.load(Ordering::Relaxed) - ok_before);
        let deadline = Instant::now() + self.plan.deadline(commits.events);
        receiver
            .wait_ok(ok_before + commits.events, deadline, relay, "deliveries")
            .await?;
        let caught_up = SystemTime::now();
        *recorded += commits.events;
        wait_recorded(scratch, *recorded, deadline, relay).await?;
        let recorded_at = SystemTime::now();
        let after = self.server.snapshot(scratch, Some(relay)).await?;
        let cost = cost(&before, &after, relay, commits.events);
        let duplicates = receiver.tally.duplicates.load(Ordering::Relaxed) - duplicates_before;

        // match arrivals to commits by webhook-id; the first successful arrival of each event counts
        let received = receiver.inner.received();
        let received = &received[log_before.min(received.len())..];
        let committed_at: HashMap<u128, SystemTime> = commits.stamps.iter().copied().collect();
        let mut attempts: HashMap<u128, u32> = HashMap::new();
        let mut succeeded: HashSet<u128> = HashSet::with_capacity(commits.stamps.len());
        let mut latencies = Vec::with_capacity(commits.stamps.len());
        let (mut early, mut ok_in_window) = (0, 0);
        for r in received {
            let Some(key) = workload::uid_key(&r.webhook_id) else {
                continue;
            };
            let n = attempts.entry(key).or_insert(0);
            *n += 1;
            // a duplicate (another instance's, or a replay) is not a second delivery
            if !(200..300).contains(&r.status_sent) || !succeeded.insert(key) {
                continue;
            }
            if r.arrived <= ended {
                ok_in_window += 1;
            }
            if let Some(commit) = committed_at.get(&key) {
                let ms = match r.arrived.duration_since(*commit) {
                    Ok(d) => d.as_secs_f64() * 1000.0,
                    Err(_) => {
                        early += 1;
                        0.0
                    }
                };
                latencies.push(Sample {
                    attempts: *n,
                    second: commit.duration_since(started).unwrap_or_default().as_secs() as usize,
                    ms,
                });
            }
        }
        Ok(Phase {
            commits,
            ended,
            caught_up,
            recorded_at,
            ok_in_window,
            latencies,
            early,
            duplicates,
            backlog,
            backlog_end,
            cost,
        })
    }

    /// Starts the relays on the scratch database and waits until they are ready: with replication, until
    /// one of them streams from the slot (the others stand by or retry, whichever this build does); with
    /// notify, until each has its `LISTEN` session, or `LISTEN_DEADLINE` has passed.
    async fn start_relays(&self, scratch: &Scratch) -> Result<Relays, BenchError> {
        self.start_relays_with(scratch, &[]).await
    }

    /// Starts the relays with a scenario's own settings (which `--relay-setting` still overrides), without
    /// waiting for them.
    fn spawn_relays(
        &self,
        scratch: &Scratch,
        scenario_settings: &[(&str, &str)],
    ) -> Result<Relays, BenchError> {
        let mut settings = self.plan.relay_settings(&scratch.url, &scratch.name);
        let given = settings.len() - self.plan.relay_settings.len();
        for (k, v) in scenario_settings.iter().rev() {
            settings.insert(given, (k.to_string(), v.to_string()));
        }
        Relays::spawn(self.plan.instances, &settings, &scratch.name)
    }

    /// `start_relays` with a scenario's own settings (which `--relay-setting` still overrides).
    async fn start_relays_with(
        &self,
        scratch: &Scratch,
        scenario_settings: &[(&str, &str)],
    ) -> Result<Relays, BenchError> {
        let mut relays = self.spawn_relays(scratch, scenario_settings)?;
        let started = Instant::now();
        loop {
            let ready = match self.plan.source {
                SourceKind::Replication => scratch
                    .client
                    .query_one(
                        "/* walhook-bench */ select coalesce(bool_or(active), false) from pg_replication_slots
                          where slot_name = $1",
                        &[&scratch.name],
                    )
                    .await
                    .map_err(db_err("checking the relay's replication slot"))?
                    .get(0),
                SourceKind::Notify => {
                    let listening: i64 = scratch
                        .client
                        .query_one(
                            "/* walhook-bench */ select count(*) from pg_stat_activity
                              where datname = current_database() and backend_type = 'client backend'
                                and query ilike 'listen %'",
                            &[],
                        )
                        .await
                        .map_err(db_err("looking for the relays' LISTEN sessions"))?
                        .get(0);
                    if listening as usize >= relays.len() {
                        true
                    } else if started.elapsed() > LISTEN_DEADLINE {
                        eprintln!(
                            "bench:   {listening} of {} relays seen listening after {} s; going on",
                            relays.len(),
                            LISTEN_DEADLINE.as_secs()
                        );
                        true
                    } else {
                        false
                    }
                }
            };
            relays.check()?;
            if ready {
                return Ok(relays);
            }
            if started.elapsed() > START_DEADLINE {
                return Err(BenchError::Stalled(format!(
                    "the relay did not start streaming within {} s",
                    START_DEADLINE.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// What one backlog run measured.
struct BacklogRun {
    deliveries: u64,
    preload: Duration,
    delivered: Duration,
    recorded: Duration,
    first_delivery_ms: Option<f64>,
    duplicates: u64,
    cost: Cost,
}

/// What one timed phase measured.
struct Phase {
    commits: workload::Commits,
    ended: SystemTime,
    caught_up: SystemTime,
    recorded_at: SystemTime,
    ok_in_window: u64,
    /// One per committed event.
    latencies: Vec<Sample>,
    early: u64,
    duplicates: u64,
    /// Committed but not yet received, every `BACKLOG_SAMPLE` while the writers ran.
    backlog: Vec<u64>,
    backlog_end: u64,
    cost: Cost,
}

/// The latency of one event.
struct Sample {
    /// Requests seen for the event when it succeeded (1: the first attempt did).
    attempts: u32,
    /// Second of the window in which it was committed.
    second: usize,
    /// Commit returned → received.
    ms: f64,
}

impl Phase {
    fn latency(&self, keep: impl Fn(&Sample) -> bool) -> Option<Latency> {
        Latency::from_ms(
            self.latencies
                .iter()
                .filter(|s| keep(s))
                .map(|s| s.ms)
                .collect(),
        )
    }

    /// p99 of the events committed in each second of the window: shows stalls and growth over time.
    fn p99_by_second(&self) -> Vec<Option<f64>> {
        let seconds = self
            .latencies
            .iter()
            .map(|s| s.second + 1)
            .max()
            .unwrap_or(0);
        (0..seconds)
            .map(|sec| self.latency(|s| s.second == sec).map(|l| l.p99_ms))
            .collect()
    }
}

fn pace_name(pace: Pace) -> String {
    match pace {
        Pace::PerSecond(r) => format!("{r:.0}/s"),
        Pace::FullSpeed => "full speed".into(),
    }
}

fn since(t: SystemTime) -> Duration {
    SystemTime::now().duration_since(t).unwrap_or_default()
}

fn ms_between(from: SystemTime, to: SystemTime) -> f64 {
    to.duration_since(from).unwrap_or_default().as_secs_f64() * 1000.0
}

/// The loopback receiver with the benchmark's answers: 200, or 500 for about one first attempt in ten (at random) when
/// `failing`. `tally` counts the answers without the receiver log's lock, for cheap progress checks, and
/// tells deliveries (the first 2xx of an endpoint and webhook-id) from duplicates (any request after it).
struct BenchReceiver {
    inner: Receiver,
    tally: Arc<Tally>,
}

#[derive(Default)]
struct Tally {
    /// Requests answered 2xx for an (endpoint, webhook-id) not answered 2xx before: deliveries, once each.
    ok: AtomicU64,
    failed: AtomicU64,
    /// Requests for an (endpoint, webhook-id) already answered 2xx.
    duplicates: AtomicU64,
    /// `path \n webhook-id` of every delivery answered 2xx.
    succeeded: Mutex<HashSet<String>>,
}

impl Tally {
    /// The answer to one request, counted.
    fn answer(&self, request: &crate::receiver::Received, attempt: u32, failing: bool) -> Reply {
        let key = format!("{}\n{}", request.path, request.webhook_id);
        let mut succeeded = self.succeeded.lock().expect("no panic while counting");
        if succeeded.contains(&key) {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        } else if failing && attempt == 1 && rand::random::<f64>() < FAIL_SHARE {
            self.failed.fetch_add(1, Ordering::Relaxed);
            return Reply::Status(500);
        } else {
            succeeded.insert(key);
            self.ok.fetch_add(1, Ordering::Relaxed);
        }
        Reply::Status(200)
    }
}

impl BenchReceiver {
    /// Starts a receiver and registers `endpoints` endpoints for every event, each on a path of its own
    /// whose signatures are verified.
    async fn start(
        scratch: &Scratch,
        endpoints: u64,
        failing: bool,
    ) -> Result<BenchReceiver, BenchError> {
        let inner = Receiver::start().await.map_err(|source| BenchError::Io {
            what: "starting the loopback receiver".into(),
            source,
        })?;
        inner.set_record_bodies(false);
        let tally = Arc::new(Tally::default());
        let counts = tally.clone();
        inner.set_responder(move |request, attempt| counts.answer(request, attempt, failing));
        for i in 0..endpoints {
            let path = format!("/{}/{i}", scratch.scenario.name());
            let secret: String = scratch
                .client
                .query_one(
                    "/* walhook-bench */ insert into walhook.endpoints (url, description)
                     values ($1, 'walhook bench') returning secret",
                    &[&inner.url(&path)],
                )
                .await
                .map_err(db_err("registering an endpoint"))?
                .get(0);
            inner.set_secret(&path, &secret);
        }
        Ok(BenchReceiver { inner, tally })
    }

    /// Waits until `target` deliveries have been answered 200 in all (duplicates not counted).
    async fn wait_ok(
        &self,
        target: u64,
        deadline: Instant,
        relay: &mut Relays,
        what: &str,
    ) -> Result<(), BenchError> {
        loop {
            let ok = self.tally.ok.load(Ordering::Relaxed);
            if ok >= target {
                return Ok(());
            }
            relay.check()?;
            if Instant::now() > deadline {
                return Err(BenchError::Stalled(format!(
                    "only {ok} of {target} {what} arrived before the deadline; the relay may be stuck \
                     (or this machine is slow: try fewer --events)"
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops the receiver and returns every request; an error if any signature did not verify.
    async fn finish(self) -> Result<Vec<crate::receiver::Received>, BenchError> {
        let received = self.inner.received();
        self.inner.shutdown().await;
        let bad = received
            .iter()
            .filter(|r| r.verified == Some(false))
            .count();
        if bad > 0 {
            return Err(BenchError::Unverified {
                bad,
                total: received.len(),
            });
        }
        Ok(received)
    }
}

/// Waits until `target` deliveries are recorded as succeeded.
async fn wait_recorded(
    scratch: &Scratch,
    target: u64,
    deadline: Instant,
    relay: &mut Relays,
) -> Result<(), BenchError> {
    loop {
        let done: i64 = scratch
            .client
            .query_one(
                "/* walhook-bench */ select count(*) from walhook.deliveries where status = 'succeeded'",
                &[],
            )
            .await
            .map_err(db_err("counting succeeded deliveries"))?
            .get(0);
        if done as u64 >= target {
            return Ok(());
        }
        relay.check()?;
        if Instant::now() > deadline {
            return Err(BenchError::Stalled(format!(
                "only {done} of {target} deliveries were recorded as succeeded before the deadline"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_parse_by_name() {
        for s in Scenario::ALL {
            assert_eq!(s.name().parse::<Scenario>(), Ok(s));
        }
        assert_eq!(" live".parse::<Scenario>(), Ok(Scenario::Live));
        let e = "speed".parse::<Scenario>().unwrap_err();
        assert!(e.starts_with("unknown scenario \"speed\"; expected"), "{e}");
    }

    #[test]
    fn plan_defaults_and_quick() {
        let full = Plan::new(&BenchOptions::default()).unwrap();
        assert_eq!(
            (full.events, full.fanout_events, full.writers),
            (200_000, 20_000, 4)
        );
        assert_eq!(full.scenarios, Scenario::ALL);
        let quick = Plan::new(&BenchOptions {
            quick: true,
            scenarios: vec![Scenario::Retries, Scenario::Drain],
            ..Default::default()
        })
        .unwrap();
        assert!(quick.events <= 10_000 && quick.window <= Duration::from_secs(2));
        // run in the canonical order whatever the order given
        assert_eq!(quick.scenarios, [Scenario::Drain, Scenario::Retries]);
    }

    #[test]
    fn sources_parse_by_name() {
        assert_eq!(parse_source("replication"), Ok(SourceKind::Replication));
        assert_eq!(parse_source(" notify "), Ok(SourceKind::Notify));
        let e = parse_source("kafka").unwrap_err();
        assert_eq!(
            e,
            "unknown source \"kafka\"; expected replication or notify"
        );
        for s in [SourceKind::Replication, SourceKind::Notify] {
            assert_eq!(parse_source(source_name(s)), Ok(s));
        }
    }

    #[test]
    fn plan_source_and_instances() {
        let default = Plan::new(&BenchOptions::default()).unwrap();
        assert_eq!(
            (default.source, default.instances),
            (SourceKind::Replication, 1)
        );
        assert_eq!(default.setup(Scenario::Baseline), Setup::Plain);
        assert_eq!(default.setup(Scenario::Drain), Setup::Slot);

        let notify = Plan::new(&BenchOptions {
            source: SourceKind::Notify,
            instances: Some(2),
            relay_settings: vec![("notify.batch_size".into(), "500".into())],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(notify.instances, 2);
        assert_eq!(notify.setup(Scenario::Baseline), Setup::Plain);
        for s in [
            Scenario::Drain,
            Scenario::Live,
            Scenario::Fanout,
            Scenario::Retries,
        ] {
            assert_eq!(notify.setup(s), Setup::Notify, "{s:?}");
        }
        // walhook.publish() writes messages only while a slot exists, whatever the relays read
        assert_eq!(notify.setup(Scenario::Publish), Setup::Slot);
        let settings = notify.relay_settings("postgres://h/scratch", "scratch");
        let value = |key: &str| {
            settings
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(value("source"), Some("notify"));
        assert_eq!(value("database_url"), Some("postgres://h/scratch"));
        assert_eq!(value("replication.slot"), Some("scratch"));
        // --relay-setting comes last, so it wins over the benchmark's defaults
        assert_eq!(settings.last().unwrap().0, "notify.batch_size");
    }

    #[test]
    fn plan_refuses_contradicting_options() {
        for instances in [0, MAX_INSTANCES + 1] {
            let e = Plan::new(&BenchOptions {
                instances: Some(instances),
                ..Default::default()
            })
            .err()
            .unwrap()
            .to_string();
            assert_eq!(e, format!("--instances {instances}: expected 1 to 16"));
        }
        let e = Plan::new(&BenchOptions {
            relay_settings: vec![("source".into(), "notify".into())],
            ..Default::default()
        })
        .err()
        .unwrap()
        .to_string();
        assert!(e.ends_with("use --source replication|notify"), "{e}");
        for key in ["database_url", "replication.slot"] {
            let e = Plan::new(&BenchOptions {
                relay_settings: vec![(key.into(), "x".into())],
                ..Default::default()
            })
            .err()
            .unwrap()
            .to_string();
            assert!(e.contains("is set by the benchmark itself"), "{e}");
        }
    }

    fn request(path: &str, webhook_id: &str) -> crate::receiver::Received {
        crate::receiver::Received {
            path: path.into(),
            webhook_id: webhook_id.into(),
            timestamp: 0,
            signature: String::new(),
            body: Default::default(),
            arrived: SystemTime::now(),
            verified: None,
            status_sent: 0,
            headers: Default::default(),
        }
    }

    #[test]
    fn deliveries_count_once_and_duplicates_are_counted() {
        let tally = Tally::default();
        let status = |reply: Reply| match reply {
            Reply::Status(s) => s,
            other => panic!("{other:?}"),
        };
        assert_eq!(status(tally.answer(&request("/a", "msg_1"), 1, false)), 200);
        // the same id at another endpoint is another delivery
        assert_eq!(status(tally.answer(&request("/b", "msg_1"), 1, false)), 200);
        // received again at the same endpoint: a duplicate, answered 200 and not counted as a delivery
        assert_eq!(status(tally.answer(&request("/a", "msg_1"), 2, false)), 200);
        let counts = |t: &Tally| {
            (
                t.ok.load(Ordering::Relaxed),
                t.failed.load(Ordering::Relaxed),
                t.duplicates.load(Ordering::Relaxed),
            )
        };
        assert_eq!(counts(&tally), (2, 0, 1));

        // a retry after a 500 is not a duplicate
        let failing = Tally::default();
        let mut i = 0;
        let failed_id = loop {
            let id = format!("msg_{i}");
            i += 1;
            if status(failing.answer(&request("/r", &id), 1, true)) == 500 {
                break id;
            }
        };
        let (ok, failed, dup) = counts(&failing);
        assert_eq!((ok + 1, failed, dup), (i, 1, 0));
        assert_eq!(
            status(failing.answer(&request("/r", &failed_id), 2, true)),
            200
        );
        assert_eq!(counts(&failing), (ok + 1, 1, 0));
        assert_eq!(
            status(failing.answer(&request("/r", &failed_id), 3, true)),
            200
        );
        assert_eq!(counts(&failing), (ok + 1, 1, 1));
    }

    #[test]
    fn about_one_first_attempt_in_ten_fails_at_random() {
        let tally = Tally::default();
        let answers: Vec<bool> = (0..10_000u64)
            .map(|i| {
                let reply = tally.answer(&request("/r", &format!("msg_{i}")), 1, true);
                reply == Reply::Status(500)
            })
            .collect();
        let failed = answers.iter().filter(|f| **f).count();
        assert!((800..=1200).contains(&failed), "{failed} of 10,000 failed");
        // drawn at random, so failures come in runs too
        assert!(answers.windows(2).any(|w| w[0] && w[1]));
        // later attempts and other scenarios never fail
        assert_eq!(
            tally.answer(&request("/r", "msg_9"), 2, true),
            Reply::Status(200)
        );
        assert_eq!(
            tally.answer(&request("/r", "msg_new"), 1, false),
            Reply::Status(200)
        );
    }
}
