//! `walhook bench`: how fast walhook relays on this machine and this PostgreSQL, and what it costs.
//!
//! Speed is measured here, never asserted by a timed test. Every scenario runs in a scratch database of its
//! own (created on the given server, or on a throwaway cluster, and dropped afterwards: never the user's own
//! database) with a replication slot of its own name, against a loopback receiver in this process, with the
//! relay as a child process (`walhook run`) so that its memory and CPU time can be read from `/proc`.
//!
//! - `baseline`: the insert rate the database sustains with no relay, one event per transaction and 100 per
//!   transaction: the ceiling the relay is asked to follow.
//! - `drain`: a backlog committed first, then the relay started: deliveries per second until every delivery is
//!   received *and* recorded as succeeded; time to the first delivery.
//! - `live`: writers at 1,000/s, 5,000/s and full speed with the relay running: delivered rate, commit-to-receive
//!   latency (writer's clock right after COMMIT returned vs the receiver's arrival time, same clock), backlog.
//! - `fanout`: a backlog delivered to 10 endpoints that all match every event.
//! - `retries`: full-speed writers while 10 % of first attempts are answered 500.
//!
//! The relay's own SQL is told from the benchmark's by pg_stat_statements (when the server has it loaded):
//! every statement the benchmark runs carries the `/* walhook-bench */` marker, and the relay's statements are
//! the rest of the scratch database's. Replication protocol commands are not statements and are not counted.

mod procfs;
mod relay;
mod report;
mod server;
mod stats;
mod workload;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::cluster::ClusterError;
use crate::receiver::{Receiver, Reply};
use relay::Relay;
pub use report::{
    Baseline, Cost, Drain, Fanout, Live, LivePhase, Machine, Report, Retries, Settings,
    StatementUse,
};
use server::{cost, Scratch, Server};
pub use stats::Latency;
use stats::{per_sec, ratio};
use workload::Pace;

/// Offered rates of the `live` scenario, events per second.
const LIVE_RATES: [f64; 2] = [1_000.0, 5_000.0];
/// Endpoints of the `fanout` scenario.
const FANOUT_ENDPOINTS: u64 = 10;
/// One first attempt in this many is answered 500 in the `retries` scenario.
const FAIL_ONE_IN: u64 = 10;
/// How long the relay may take to start streaming.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// A live phase's backlog is bounded when the relay is at most this far behind when the writers stop.
const BOUNDED_BEHIND_S: f64 = 0.25;
/// How often the backlog of a live phase is sampled.
const BACKLOG_SAMPLE: Duration = Duration::from_millis(100);
/// Statements listed per measurement, most frequent first.
const TOP_STATEMENTS: usize = 6;

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
}

impl BenchError {
    fn db(what: &str, e: tokio_postgres::Error) -> BenchError {
        let detail = match e.as_db_error() {
            Some(db) => db.message().to_string(),
            None => {
                let mut text = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(cause) = source {
                    let _ = write!(text, ": {cause}");
                    source = cause.source();
                }
                text
            }
        };
        BenchError::Db {
            what: what.to_string(),
            detail,
        }
    }
}

fn db_err(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> BenchError {
    move |e| BenchError::db(what, e)
}

/// A part of the benchmark that can be chosen with `--scenarios`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scenario {
    Baseline,
    Drain,
    Live,
    Fanout,
    Retries,
}

impl Scenario {
    pub const ALL: [Scenario; 5] = [
        Scenario::Baseline,
        Scenario::Drain,
        Scenario::Live,
        Scenario::Fanout,
        Scenario::Retries,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Baseline => "baseline",
            Scenario::Drain => "drain",
            Scenario::Live => "live",
            Scenario::Fanout => "fanout",
            Scenario::Retries => "retries",
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
                format!("unknown scenario {s:?}; expected baseline, drain, live, fanout or retries")
            })
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
}

/// Sizes and durations, from the options.
struct Plan {
    quick: bool,
    events: u64,
    fanout_events: u64,
    window: Duration,
    writers: usize,
    scenarios: Vec<Scenario>,
    relay_settings: Vec<(String, String)>,
}

impl Plan {
    fn new(options: &BenchOptions) -> Plan {
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
        Plan {
            quick: options.quick,
            events,
            fanout_events: (events / FANOUT_ENDPOINTS).max(1),
            window: options.duration.unwrap_or(window),
            writers: options.writers.unwrap_or(4).max(1),
            scenarios,
            relay_settings: options.relay_settings.clone(),
        }
    }

    /// How long `deliveries` may take before the benchmark gives up: generous, at 500 per second.
    fn deadline(&self, deliveries: u64) -> Duration {
        Duration::from_secs(60) + Duration::from_secs_f64(deliveries as f64 / 500.0)
    }
}

/// Runs the chosen scenarios and returns what was measured. Progress goes to stderr.
pub async fn run(options: BenchOptions) -> Result<Report, BenchError> {
    let started = Instant::now();
    let plan = Plan::new(&options);
    let server = match &options.database_url {
        Some(url) => Server::given(url).await?,
        None => {
            eprintln!("bench: starting a throwaway PostgreSQL cluster");
            Server::throwaway().await?
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
        live,
        fanout,
        retries,
    } = result?;
    Ok(Report {
        machine: machine?,
        settings: Settings {
            quick: plan.quick,
            events: plan.events,
            fanout_events: plan.fanout_events,
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
        live,
        fanout,
        retries,
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

/// What the scenarios run so far measured.
#[derive(Default)]
struct Results {
    baseline: Option<Baseline>,
    drain: Option<Drain>,
    live: Option<Live>,
    fanout: Option<Fanout>,
    retries: Option<Retries>,
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
                .scratch(scenario, scenario != Scenario::Baseline)
                .await?;
            eprintln!("bench: {} (database {})", scenario.name(), scratch.name);
            let r = &mut results;
            let outcome = match scenario {
                Scenario::Baseline => self.baseline(&scratch).await.map(|b| r.baseline = Some(b)),
                Scenario::Drain => self.drain(&scratch).await.map(|d| r.drain = Some(d)),
                Scenario::Live => {
                    let baseline = r.baseline.as_ref().map(|b| b.inserts_per_sec);
                    let live = self.live(&scratch, baseline).await;
                    live.map(|l| r.live = Some(l))
                }
                Scenario::Fanout => self.fanout(&scratch).await.map(|f| r.fanout = Some(f)),
                Scenario::Retries => self.retries(&scratch).await.map(|x| r.retries = Some(x)),
            };
            let removed = self.server.remove(scratch).await;
            outcome?;
            removed?;
        }
        Ok(results)
    }

    async fn baseline(&self, scratch: &Scratch) -> Result<Baseline, BenchError> {
        let p = &self.plan;
        let single = workload::write(
            &scratch.db,
            p.writers,
            Pace::FullSpeed,
            false,
            p.window,
            Arc::default(),
        )
        .await?;
        let batched = workload::write(
            &scratch.db,
            p.writers,
            Pace::FullSpeed,
            true,
            p.window,
            Arc::default(),
        )
        .await?;
        Ok(Baseline {
            writers: p.writers,
            inserts_per_sec: per_sec(single.events, single.elapsed),
            inserts_per_sec_batched: per_sec(batched.events, batched.elapsed),
            batch: workload::BATCH,
        })
    }

    /// A backlog of `events` for `endpoints` endpoints, then the relay: shared by `drain` and `fanout`.
    async fn backlog(
        &self,
        scratch: &Scratch,
        events: u64,
        endpoints: u64,
    ) -> Result<BacklogRun, BenchError> {
        let receiver = BenchReceiver::start(scratch, endpoints, false).await?;
        let preload = workload::preload(&scratch.db, self.plan.writers, events).await?;
        eprintln!(
            "bench:   {events} events committed in {:.1} s; starting the relay",
            preload.as_secs_f64()
        );
        let deliveries = events * endpoints;
        let before = self.server.snapshot(scratch, None).await?;
        let mut relay = self.start_relay(scratch).await?;
        let deadline = Instant::now() + self.plan.deadline(deliveries);
        receiver
            .wait_ok(deliveries, deadline, &mut relay, "deliveries")
            .await?;
        let delivered = since(relay.spawned);
        wait_recorded(scratch, deliveries, deadline, &mut relay).await?;
        let recorded = since(relay.spawned);
        let after = self.server.snapshot(scratch, Some(&relay)).await?;
        let cost = cost(&before, &after, &relay, deliveries);
        let spawned = relay.spawned;
        relay.stop().await?;
        let received = receiver.finish().await?;
        let first = received.iter().map(|r| r.arrived).min();
        Ok(BacklogRun {
            deliveries,
            preload,
            delivered,
            recorded,
            first_delivery_ms: first.map(|t| ms_between(spawned, t)),
            duplicates: (received.len() as u64).saturating_sub(deliveries),
            cost,
        })
    }

    async fn drain(&self, scratch: &Scratch) -> Result<Drain, BenchError> {
        let events = self.plan.events;
        let run = self.backlog(scratch, events, 1).await?;
        Ok(Drain {
            events,
            deliveries_per_sec: per_sec(run.deliveries, run.recorded),
            first_delivery_ms: run.first_delivery_ms,
            delivered_s: run.delivered.as_secs_f64(),
            recorded_s: run.recorded.as_secs_f64(),
            preload_s: run.preload.as_secs_f64(),
            duplicates: run.duplicates,
            cost: run.cost,
        })
    }

    async fn fanout(&self, scratch: &Scratch) -> Result<Fanout, BenchError> {
        let events = self.plan.fanout_events;
        let run = self.backlog(scratch, events, FANOUT_ENDPOINTS).await?;
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

    async fn live(&self, scratch: &Scratch, baseline: Option<f64>) -> Result<Live, BenchError> {
        let receiver = BenchReceiver::start(scratch, 1, false).await?;
        let mut relay = self.start_relay(scratch).await?;
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
        let peak_rss_mib = relay.peak_rss_mib();
        relay.stop().await?;
        receiver.finish().await?;
        let p99_at = |rate: f64| {
            phases
                .iter()
                .find(|p| p.offered_per_sec == Some(rate))
                .and_then(|p| p.latency.as_ref().map(|l| l.p99_ms))
        };
        let full = phases.iter().find(|p| p.offered_per_sec.is_none());
        Ok(Live {
            full_speed_ratio: full
                .zip(baseline)
                .and_then(|(f, b)| ratio(f.delivered_per_sec, b)),
            p99_ms_at_1000: p99_at(LIVE_RATES[0]),
            p99_ms_at_5000: p99_at(LIVE_RATES[1]),
            peak_rss_mib,
            phases,
        })
    }

    async fn retries(&self, scratch: &Scratch) -> Result<Retries, BenchError> {
        let receiver = BenchReceiver::start(scratch, 1, true).await?;
        let mut relay = self.start_relay(scratch).await?;
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
        receiver.finish().await?;
        let latency_first_attempt = phase.latency(|s| s.attempts == 1);
        Ok(Retries {
            deliveries_per_sec: per_sec(phase.ok_in_window, phase.commits.elapsed),
            committed_per_sec: per_sec(phase.commits.events, phase.commits.elapsed),
            p99_ms: latency_first_attempt.as_ref().map(|l| l.p99_ms),
            latency_first_attempt,
            latency_retried: phase.latency(|s| s.attempts > 1),
            failed_first_attempts,
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
        relay: &mut Relay,
        pace: Pace,
        recorded: &mut u64,
    ) -> Result<Phase, BenchError> {
        let before = self.server.snapshot(scratch, Some(relay)).await?;
        let ok_before = receiver.tally.ok.load(Ordering::Relaxed);
        let log_before = receiver.inner.count();
        let committed = Arc::new(AtomicU64::new(0));
        let started = SystemTime::now();
        let writers = tokio::spawn({
            let db = scratch.db.clone();
            let (writers, window, committed) =
                (self.plan.writers, self.plan.window, committed.clone());
            async move { workload::write(&db, writers, pace, false, window, committed).await }
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

        // match arrivals to commits by webhook-id; the first successful arrival of each event counts
        let received = receiver.inner.received();
        let received = &received[log_before.min(received.len())..];
        let committed_at: HashMap<u128, SystemTime> = commits.stamps.iter().copied().collect();
        let mut attempts: HashMap<u128, u32> = HashMap::new();
        let mut latencies = Vec::with_capacity(commits.stamps.len());
        let (mut early, mut ok_in_window) = (0, 0);
        for r in received {
            let Some(key) = workload::uid_key(&r.webhook_id) else {
                continue;
            };
            let n = attempts.entry(key).or_insert(0);
            *n += 1;
            if !(200..300).contains(&r.status_sent) {
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
            backlog,
            backlog_end,
            cost,
        })
    }

    /// Starts the relay on the scratch database and waits until it streams from its slot.
    async fn start_relay(&self, scratch: &Scratch) -> Result<Relay, BenchError> {
        let mut settings = vec![
            ("database_url".to_string(), scratch.url.clone()),
            ("replication.slot".to_string(), scratch.name.clone()),
        ];
        settings.extend(relay_defaults());
        settings.extend(self.plan.relay_settings.iter().cloned());
        let log = std::env::temp_dir().join(format!("{}.log", scratch.name));
        let mut relay = Relay::spawn(&settings, log)?;
        let until = Instant::now() + START_DEADLINE;
        loop {
            let active: bool = scratch
                .client
                .query_one(
                    "/* walhook-bench */ select coalesce(bool_or(active), false) from pg_replication_slots
                      where slot_name = $1",
                    &[&scratch.name],
                )
                .await
                .map_err(db_err("checking the relay's replication slot"))?
                .get(0);
            if active {
                return Ok(relay);
            }
            relay.check()?;
            if Instant::now() > until {
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

/// The loopback receiver with the benchmark's answers: 200, or 500 for one first attempt in ten when
/// `failing`. `tally` counts the answers without the receiver log's lock, for cheap progress checks.
struct BenchReceiver {
    inner: Receiver,
    tally: Arc<Tally>,
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
}

/// Whether the first attempt of this event is answered 500 in the `retries` scenario (FNV-1a of the id).
fn fails_first(webhook_id: &str) -> bool {
    let hash = webhook_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    hash % FAIL_ONE_IN == 0
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
        inner.set_responder(move |request, attempt| {
            if failing && attempt == 1 && fails_first(&request.webhook_id) {
                counts.failed.fetch_add(1, Ordering::Relaxed);
                Reply::Status(500)
            } else {
                counts.ok.fetch_add(1, Ordering::Relaxed);
                Reply::Status(200)
            }
        });
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

    /// Waits until `target` requests have been answered 200 in all.
    async fn wait_ok(
        &self,
        target: u64,
        deadline: Instant,
        relay: &mut Relay,
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
    relay: &mut Relay,
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
        let full = Plan::new(&BenchOptions::default());
        assert_eq!(
            (full.events, full.fanout_events, full.writers),
            (200_000, 20_000, 4)
        );
        assert_eq!(full.scenarios, Scenario::ALL);
        let quick = Plan::new(&BenchOptions {
            quick: true,
            scenarios: vec![Scenario::Retries, Scenario::Drain],
            ..Default::default()
        });
        assert!(quick.events <= 10_000 && quick.window <= Duration::from_secs(2));
        // run in the canonical order whatever the order given
        assert_eq!(quick.scenarios, [Scenario::Drain, Scenario::Retries]);
    }

    #[test]
    fn about_one_event_in_ten_fails_first() {
        let failing = (0..10_000u64)
            .filter(|i| {
                fails_first(&format!(
                    "msg_{:032x}",
                    i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                ))
            })
            .count();
        assert!((800..1200).contains(&failing), "{failing}");
    }
}
