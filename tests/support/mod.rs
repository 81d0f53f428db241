//! Test harness: a throwaway cluster per test, a database in it, the daemon in-process or as a child
//! process, and helpers that wait on conditions with generous deadlines (never on sleeps).

#![allow(dead_code)]

pub mod browser;
pub mod proxy;
pub mod tls;

use std::future::Future;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use figment::Figment;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use walhook::cluster::{Cluster, ClusterOptions, WalLevel};
use walhook::config::Config;

/// How long any condition may take on a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Where the daemon under test reads committed events from. Tests of behaviour that does not depend on it
/// take one as a parameter and run once for each (see `both_sources!` in relay.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A logical replication slot: the cluster has `wal_level = logical`.
    Replication,
    /// Claims of unprocessed outbox rows: the cluster has `wal_level = replica`, which proves that this
    /// source needs no logical replication.
    Notify,
}

pub struct Pg {
    pub cluster: Cluster,
    pub url: String,
}

impl Pg {
    /// A new cluster (wal_level=logical) with a migrated database.
    pub async fn start() -> Pg {
        Pg::start_with(ClusterOptions::default()).await
    }

    /// A new cluster fit for `source`, and no more: notify gets `wal_level = replica`.
    pub async fn start_for(source: Source) -> Pg {
        match source {
            Source::Replication => Pg::start().await,
            Source::Notify => {
                Pg::start_with(ClusterOptions {
                    wal_level: WalLevel::Replica,
                    ..Default::default()
                })
                .await
            }
        }
    }

    pub async fn start_with(options: ClusterOptions) -> Pg {
        let pg = Pg::start_unmigrated(options).await;
        let mut client = pg.client().await;
        walhook::schema::migrate(&mut client)
            .await
            .expect("migrate");
        pg
    }

    /// A new cluster with an empty database `app` (no walhook schema, no walhook roles).
    pub async fn start_unmigrated(options: ClusterOptions) -> Pg {
        // a failing test's output shows the daemon's warnings (RUST_LOG=walhook=debug shows more); a passing
        // test's output is captured and dropped
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("walhook=warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_test_writer()
            .try_init();
        let cluster = tokio::task::spawn_blocking(move || Cluster::start(options))
            .await
            .unwrap()
            .expect("start a throwaway cluster");
        let url = cluster
            .create_database("app")
            .await
            .expect("create database");
        Pg { cluster, url }
    }

    /// This database's URL for another role (the cluster trusts loopback, so any password passes).
    pub fn url_as(&self, user: &str) -> String {
        self.url.replacen("postgres@", &format!("{user}@"), 1)
    }

    /// A connection as another role.
    pub async fn client_as(&self, user: &str) -> Client {
        walhook::store::connect_client(&self.url_as(user).parse().unwrap())
            .await
            .unwrap_or_else(|e| panic!("connect as {user}: {e}"))
    }

    pub async fn client(&self) -> Client {
        walhook::store::connect_client(&self.url.parse().unwrap())
            .await
            .expect("connect")
    }

    /// Config for this database: loopback allowed, no http listener, fast polling, short retries.
    pub fn config(&self) -> Config {
        self.config_with(|f| f)
    }

    /// `config()` with more settings merged on top.
    pub fn config_with(&self, more: impl FnOnce(Figment) -> Figment) -> Config {
        let figment = Config::figment(None)
            .merge(("database_url", self.url.as_str()))
            .merge(("delivery.allow_private_networks", true))
            .merge(("http.listen", "off"))
            .merge(("delivery.retry_schedule", vec!["1s", "1s", "1s"]))
            .merge(("delivery.retry_jitter", 0.0))
            .merge(("delivery.timeout", "5s"))
            .merge(("scheduler.poll_interval", "100ms"))
            .merge(("scheduler.lease", "5s"))
            .merge(("delivery.breaker_cooldown", "1s"))
            .merge(("delivery.breaker_max_cooldown", "2s"))
            .merge(("endpoints.refresh_interval", "100ms"));
        Config::from_figment(more(figment)).expect("test config is valid")
    }

    /// `config()` reading from `source`; notify polls every 200ms.
    pub fn config_for(&self, source: Source) -> Config {
        self.config_for_with(source, |f| f)
    }

    /// `config_for(source)` with more settings merged on top (so they may override the source's).
    pub fn config_for_with(&self, source: Source, more: impl FnOnce(Figment) -> Figment) -> Config {
        self.config_with(|f| {
            more(match source {
                Source::Replication => f,
                Source::Notify => f
                    .merge(("source", "notify"))
                    .merge(("notify.poll_interval", "200ms")),
            })
        })
    }

    /// Environment for the real binary, equivalent to `config_for(source)`.
    pub fn env_for(&self, source: Source) -> Vec<(String, String)> {
        let mut env = self.env();
        if source == Source::Notify {
            for (k, v) in [
                ("WALHOOK_SOURCE", "notify"),
                ("WALHOOK_NOTIFY__POLL_INTERVAL", "200ms"),
            ] {
                env.push((k.to_string(), v.to_string()));
            }
        }
        env
    }

    /// Environment for the real binary, equivalent to `config()`.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("WALHOOK_DATABASE_URL", self.url.as_str()),
            ("WALHOOK_DELIVERY__ALLOW_PRIVATE_NETWORKS", "true"),
            ("WALHOOK_HTTP__LISTEN", "off"),
            ("WALHOOK_DELIVERY__RETRY_SCHEDULE", "1s,1s,1s"),
            ("WALHOOK_DELIVERY__RETRY_JITTER", "0"),
            ("WALHOOK_DELIVERY__TIMEOUT", "5s"),
            ("WALHOOK_SCHEDULER__POLL_INTERVAL", "100ms"),
            ("WALHOOK_ENDPOINTS__REFRESH_INTERVAL", "100ms"),
            ("WALHOOK_SCHEDULER__LEASE", "5s"),
            ("WALHOOK_DELIVERY__BREAKER_COOLDOWN", "1s"),
            ("WALHOOK_DELIVERY__BREAKER_MAX_COOLDOWN", "2s"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

/// The daemon running in this test's runtime.
pub struct Daemon {
    stop: CancellationToken,
    abort: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), walhook::daemon::RunError>>,
}

impl Daemon {
    pub fn start(config: Config) -> Daemon {
        let stop = CancellationToken::new();
        let abort = CancellationToken::new();
        let task = tokio::spawn(walhook::daemon::run(config, stop.clone(), abort.clone()));
        Daemon { stop, abort, task }
    }

    /// Graceful drain; panics if the daemon failed.
    pub async fn stop(self) {
        self.stop.cancel();
        let result = tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("daemon drains in time");
        result.unwrap().expect("daemon ran without error");
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    pub async fn result(self) -> Result<(), walhook::daemon::RunError> {
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("daemon ends in time")
            .unwrap()
    }

    pub fn abort(&self) {
        self.abort.cancel();
    }
}

/// The real binary as a child process.
pub fn spawn_binary(args: &[&str], env: &[(String, String)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_walhook"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn walhook")
}

/// Kills the child when dropped, so a failing assertion leaves no daemon behind.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // a no-op once the child has been waited for
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls an async condition until it holds or `DEADLINE` passes.
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = Instant::now() + DEADLINE;
    while !condition().await {
        assert!(Instant::now() < until, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Inserts an endpoint and returns (id, secret).
pub async fn add_endpoint(client: &Client, url: &str, patterns: &[&str]) -> (i64, String) {
    let patterns: Vec<String> = patterns.iter().map(|s| s.to_string()).collect();
    let row = client
        .query_one(
            "insert into walhook.endpoints (url, event_types) values ($1, $2) returning id, secret",
            &[&url, &patterns],
        )
        .await
        .expect("insert endpoint");
    (row.get(0), row.get(1))
}

/// Commits one event per transaction; returns its outbox id.
pub async fn publish(client: &Client, event_type: &str, payload: &str) -> i64 {
    client
        .query_one(
            "insert into walhook.outbox (event_type, payload) values ($1, $2::text::jsonb) returning id",
            &[&event_type, &payload],
        )
        .await
        .expect("insert event")
        .get(0)
}

pub async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

/// Waits until exactly `n` deliveries have succeeded.
pub async fn wait_succeeded(client: &Client, n: i64) {
    eventually(&format!("{n} deliveries succeeded"), || async {
        count(
            client,
            "select count(*) from walhook.deliveries where status = 'succeeded'",
        )
        .await
            == n
    })
    .await;
}

/// Waits until the daemon holds the slot (it is streaming).
pub async fn wait_streaming(client: &Client) {
    eventually("the daemon streams from its slot", || async {
        count(
            client,
            "select count(*) from pg_replication_slots where slot_name = 'walhook' and active",
        )
        .await
            == 1
    })
    .await;
}

/// Waits until `n` notify sources have subscribed to the wake-up channel.
pub async fn wait_listening(client: &Client, n: i64) {
    eventually(&format!("{n} notify sources listen"), || async {
        count(
            client,
            "select count(*) from pg_stat_activity where query = 'listen walhook_outbox'",
        )
        .await
            >= n
    })
    .await;
}

/// Waits until a daemon reading from `source` takes events: it streams from its slot, or it listens for
/// wake-ups (its first poll follows the subscription at once).
pub async fn wait_ready(source: Source, client: &Client) {
    match source {
        Source::Replication => wait_streaming(client).await,
        Source::Notify => wait_listening(client, 1).await,
    }
}

/// Waits until every outbox row is marked processed: the notify source's acknowledgement, given only once
/// the row's deliveries are recorded. (With the replication source `processed_at` stays null.)
pub async fn wait_all_processed(client: &Client) {
    eventually("every outbox row is marked processed", || async {
        count(
            client,
            "select count(*) from walhook.outbox where processed_at is null",
        )
        .await
            == 0
    })
    .await;
}
