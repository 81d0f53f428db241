//! The PostgreSQL side of the benchmark: the server, one scratch database per scenario, and snapshots of the
//! counters that say what the relay cost.
//!
//! A scratch database is created on the given server (or the throwaway cluster), migrated, given what the
//! relay's source needs before any event is written (the publication and the relay's slot, named after the
//! database so it can never collide with a real walhook's slot; or the notify source's index and trigger),
//! and dropped afterwards with its slot, once the relay's walsender has let go of it. Costs are
//! differences between two snapshots: the relay's CPU time, PostgreSQL's (the throwaway cluster's process
//! tree), this process's, the WAL position, and pg_stat_statements of the scratch database without the
//! benchmark's own marked statements. Of the relay's statements, those that update `walhook.outbox` are the
//! notify source's (claims, `processed_at` marks, lease renewals) and are also summed apart: what polling
//! costs beyond recording. The application's inserts are the benchmark's, so never in these figures.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::relay::Relays;
use super::report::{Cost, InstanceCost, Machine, StatementUse};
use super::stats::ratio;
use super::workload::MARKER;
use super::{db_err, procfs, BenchError, Scenario, TOP_STATEMENTS};
use crate::cluster::{Cluster, ClusterOptions};
use crate::lsn::Lsn;

/// The PostgreSQL server the scratch databases live on.
pub struct Server {
    admin: Client,
    admin_url: String,
    /// Dropped (stopped and deleted) by `close`.
    cluster: Option<Cluster>,
    /// The throwaway cluster's postmaster, for the server's CPU time.
    postmaster: Option<u32>,
    /// pg_stat_statements could be read in a scratch database.
    statements: AtomicBool,
}

/// What a scratch database gets before any event is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setup {
    /// Only the schema (the baseline: no relay).
    Plain,
    /// The publication and the relay's replication slot.
    Slot,
    /// The notify source's partial index and wake-up trigger (as `walhook run` would install them).
    Notify,
}

/// The notify source's statements among the relay's: the only ones that update the outbox.
const SOURCE_STATEMENT: &str = "update walhook.outbox";

/// A database of one scenario, with the relay's slot named after it.
pub struct Scratch {
    pub scenario: Scenario,
    pub name: String,
    pub url: String,
    pub db: crate::conninfo::ConnInfo,
    pub client: Client,
    /// pg_stat_statements can be read here.
    statements: bool,
}

/// Counters of the server and the processes at one instant.
pub struct Snapshot {
    at: Instant,
    /// Per relay instance.
    relay_cpu: Vec<f64>,
    postgres_cpu: Option<f64>,
    /// CPU of the scratch database's walsenders and of the relay's own SQL sessions (throwaway cluster only).
    walsender_cpu: Option<f64>,
    relay_sql_cpu: Option<f64>,
    bench_cpu: f64,
    wal: Lsn,
    /// The relay's statements in the scratch database: query → totals.
    statements: Option<HashMap<String, Totals>>,
}

/// pg_stat_statements' counters of one statement.
#[derive(Clone, Copy, Debug, Default)]
pub struct Totals {
    calls: i64,
    rows: i64,
    wal_bytes: f64,
    exec_ms: f64,
}

impl Server {
    /// With `durable`, the cluster flushes WAL to disk on every commit as production servers do (`fsync`,
    /// `full_page_writes` on): the relay's commits then compete for WAL flushes, not only for CPU.
    pub async fn throwaway(durable: bool) -> Result<Server, BenchError> {
        // without `durable` fsync stays off (the disk is not what is measured), but commits wait for the WAL
        // write as on a production server: with synchronous_commit = off the walsender only sees a commit once
        // the WAL writer wakes (wal_writer_delay, 200 ms), which would dominate every latency figure.
        let settings = move |statements: bool| {
            let mut extra = vec![("synchronous_commit".to_string(), "on".to_string())];
            if statements {
                extra.push((
                    "shared_preload_libraries".into(),
                    "pg_stat_statements".into(),
                ));
            }
            ClusterOptions {
                extra_settings: extra,
                fsync: durable,
                ..ClusterOptions::default()
            }
        };
        let with_statements = settings(true);
        let cluster = match blocking(move || Cluster::start(with_statements)).await? {
            Ok(cluster) => cluster,
            Err(e) => {
                eprintln!(
                    "bench: PostgreSQL did not start with pg_stat_statements ({e}); \
                     statement and WAL figures will be null"
                );
                let without = settings(false);
                blocking(move || Cluster::start(without)).await??
            }
        };
        let postmaster = std::fs::read_to_string(cluster.data_dir().join("postmaster.pid"))
            .ok()
            .and_then(|pid| pid.lines().next()?.trim().parse().ok());
        let url = cluster.url("postgres");
        Server::connect(url, Some(cluster), postmaster).await
    }

    pub async fn given(url: &str) -> Result<Server, BenchError> {
        Server::connect(url.to_string(), None, None).await
    }

    async fn connect(
        url: String,
        cluster: Option<Cluster>,
        postmaster: Option<u32>,
    ) -> Result<Server, BenchError> {
        // the URL may carry a password: never quote it
        let db: crate::conninfo::ConnInfo = url.parse().map_err(|_| BenchError::InvalidUrl)?;
        let admin = crate::store::connect_client(&db)
            .await
            .map_err(db_err("connecting to PostgreSQL"))?;
        Ok(Server {
            admin,
            admin_url: url,
            cluster,
            postmaster,
            statements: Default::default(),
        })
    }

    /// Creates the scenario's database, migrated, with what `setup` says created before any event is written.
    pub async fn scratch(&self, scenario: Scenario, setup: Setup) -> Result<Scratch, BenchError> {
        let name = scratch_name(scenario);
        self.drop_database(&name).await?;
        self.admin
            .batch_execute(&format!("{MARKER} create database {name}"))
            .await
            .map_err(db_err(
                "creating a scratch database (the role needs CREATEDB)",
            ))?;
        match self.prepare(scenario, &name, setup).await {
            Ok(scratch) => Ok(scratch),
            Err(e) => {
                let _ = self.drop_database(&name).await;
                Err(e)
            }
        }
    }

    async fn prepare(
        &self,
        scenario: Scenario,
        name: &str,
        setup: Setup,
    ) -> Result<Scratch, BenchError> {
        let url = with_dbname(&self.admin_url, name);
        let db: crate::conninfo::ConnInfo = url.parse().map_err(|e| {
            BenchError::Internal(format!("the scratch database URL is invalid: {e}"))
        })?;
        let mut client = crate::store::connect_client(&db)
            .await
            .map_err(db_err("connecting to the scratch database"))?;
        crate::schema::migrate(&mut client).await.map_err(|e| {
            BenchError::Internal(format!("migrating the scratch database failed: {e}"))
        })?;
        if setup == Setup::Notify {
            crate::store::install_notify(&db, true).await.map_err(|e| {
                BenchError::Internal(format!(
                    "installing the notify source's index and trigger failed: {e}"
                ))
            })?;
        }
        if setup == Setup::Slot {
            client
                .batch_execute(&format!(
                    "{MARKER} do $$ begin if not exists (select 1 from pg_publication where pubname = 'walhook') then
                       create publication walhook for table walhook.outbox with (publish = 'insert'); end if; end $$"
                ))
                .await
                .map_err(db_err("creating the publication"))?;
            client
                .execute(
                    "/* walhook-bench */ select pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&name],
                )
                .await
                .map_err(db_err(
                    "creating the replication slot (needs wal_level = logical and a role with REPLICATION)",
                ))?;
        }
        let statements = client
            .batch_execute(&format!(
                "{MARKER} create extension if not exists pg_stat_statements"
            ))
            .await
            .is_ok()
            && client
                .query(
                    "/* walhook-bench */ select 1 from pg_stat_statements limit 1",
                    &[],
                )
                .await
                .is_ok();
        self.statements.fetch_or(statements, Ordering::Relaxed);
        Ok(Scratch {
            scenario,
            name: name.to_string(),
            url,
            db,
            client,
            statements,
        })
    }

    pub async fn remove(&self, scratch: Scratch) -> Result<(), BenchError> {
        let name = scratch.name.clone();
        drop(scratch);
        self.drop_database(&name).await
    }

    /// Drops the database and its slot, if they exist. The walsender of a relay that just exited may hold
    /// the slot a moment longer, so an active slot is waited for.
    pub async fn drop_database(&self, name: &str) -> Result<(), BenchError> {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let slot = self
                .admin
                .query_opt(
                    "/* walhook-bench */ select active from pg_replication_slots where slot_name = $1",
                    &[&name],
                )
                .await
                .map_err(db_err("looking up the scratch replication slot"))?;
            match slot {
                None => break,
                Some(row) if !row.get::<_, bool>(0) => {
                    // a concurrent activation makes this fail; the loop looks again
                    let _ = self
                        .admin
                        .execute(
                            "/* walhook-bench */ select pg_drop_replication_slot($1)",
                            &[&name],
                        )
                        .await;
                }
                Some(_) if Instant::now() > until => {
                    return Err(BenchError::Stalled(format!(
                        "replication slot {name} is still in use 30 s after the relay stopped; drop it with \
                         select pg_drop_replication_slot('{name}') and drop database {name}"
                    )))
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        self.admin
            .batch_execute(&format!(
                "{MARKER} drop database if exists {name} with (force)"
            ))
            .await
            .map_err(db_err("dropping a scratch database"))
    }

    pub async fn snapshot(
        &self,
        scratch: &Scratch,
        relays: Option<&Relays>,
    ) -> Result<Snapshot, BenchError> {
        let wal: String = scratch
            .client
            .query_one("/* walhook-bench */ select pg_current_wal_lsn()::text", &[])
            .await
            .map_err(db_err("reading the WAL position"))?
            .get(0);
        let statements = if scratch.statements {
            let rows = scratch
                .client
                .query(
                    "/* walhook-bench */ select s.query, s.calls, s.rows, s.wal_bytes::float8, s.total_exec_time
                       from pg_stat_statements s join pg_database d on d.oid = s.dbid
                      where d.datname = current_database() and s.query not like '%walhook-bench%'",
                    &[],
                )
                .await
                .map_err(db_err("reading pg_stat_statements"))?;
            let mut totals: HashMap<String, Totals> = HashMap::new();
            for row in rows {
                let query: Option<String> = row.get(0);
                let query = query
                    .unwrap_or_else(|| "<insufficient privilege>".into())
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ");
                let entry = totals.entry(query).or_default();
                entry.calls += row.get::<_, i64>(1);
                entry.rows += row.get::<_, i64>(2);
                entry.wal_bytes += row.get::<_, f64>(3);
                entry.exec_ms += row.get::<_, f64>(4);
            }
            Some(totals)
        } else {
            None
        };
        let (mut walsender_cpu, mut relay_sql_cpu) = (None, None);
        if self.postmaster.is_some() {
            // sessions of the relay live as long as it does; the writers' come and go, and count in the rest
            let sessions = scratch
                .client
                .query(
                    "/* walhook-bench */ select pid, backend_type = 'walsender' from pg_stat_activity
                      where datname = current_database() and (backend_type = 'walsender' or application_name = 'walhook')",
                    &[],
                )
                .await
                .map_err(db_err("reading pg_stat_activity"))?;
            let (mut wal_sender, mut sql) = (0.0, 0.0);
            for row in sessions {
                let pid = u32::try_from(row.get::<_, i32>(0)).unwrap_or(0);
                let cpu = procfs::cpu_seconds(pid).unwrap_or(0.0);
                if row.get::<_, bool>(1) {
                    wal_sender += cpu;
                } else {
                    sql += cpu;
                }
            }
            (walsender_cpu, relay_sql_cpu) = (Some(wal_sender), Some(sql));
        }
        Ok(Snapshot {
            at: Instant::now(),
            relay_cpu: relays.map_or_else(Vec::new, Relays::cpu_seconds),
            postgres_cpu: self.postmaster.and_then(procfs::tree_cpu_seconds),
            walsender_cpu,
            relay_sql_cpu,
            bench_cpu: procfs::own_cpu_seconds(),
            wal: wal.parse().unwrap_or_default(),
            statements,
        })
    }

    /// CPU seconds the whole server has used so far (throwaway cluster only).
    pub fn postgres_cpu(&self) -> Option<f64> {
        self.postmaster.and_then(procfs::tree_cpu_seconds)
    }

    pub async fn machine(&self) -> Result<Machine, BenchError> {
        let setting = |name: &'static str| async move {
            self.admin
                .query_one("/* walhook-bench */ select current_setting($1)", &[&name])
                .await
                .map(|r| r.get::<_, String>(0))
                .map_err(db_err("reading server settings"))
        };
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        Ok(Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map_or("unknown".into(), |(_, v)| v.trim().to_string()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or("unknown".into(), |k| k.trim().to_string()),
            memory_gib: memory_kib / (1024.0 * 1024.0),
            postgres: format!("PostgreSQL {}", setting("server_version").await?),
            server: if self.cluster.is_some() {
                "throwaway cluster".into()
            } else {
                "given server".into()
            },
            fsync: setting("fsync").await?,
            load_average: std::fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|l| l.split_whitespace().next()?.parse().ok()),
            synchronous_commit: setting("synchronous_commit").await?,
            pg_stat_statements: self.statements.load(Ordering::Relaxed),
        })
    }

    pub async fn close(self) {
        let Server { admin, cluster, .. } = self;
        drop(admin);
        if let Some(cluster) = cluster {
            let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BenchError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BenchError::Internal(format!("a blocking task failed: {e}")))
}

/// The same connection string with another database: the path of a URL (a `dbname` query parameter is
/// dropped), or a `dbname=` appended to a `key=value` string (the last one wins).
fn with_dbname(url: &str, name: &str) -> String {
    for scheme in ["postgres://", "postgresql://"] {
        if let Some(rest) = url.strip_prefix(scheme) {
            let (target, query) = rest.split_once('?').unwrap_or((rest, ""));
            let authority = target.split('/').next().unwrap_or_default();
            let params: Vec<&str> = query
                .split('&')
                .filter(|p| !p.is_empty() && !p.starts_with("dbname="))
                .collect();
            let query = if params.is_empty() {
                String::new()
            } else {
                format!("?{}", params.join("&"))
            };
            return format!("{scheme}{authority}/{name}{query}");
        }
    }
    format!("{url} dbname={name}")
}

/// The scratch database (and slot) of a scenario: unique per benchmark process.
pub fn scratch_name(scenario: Scenario) -> String {
    format!("walhook_bench_{}_{}", scenario.name(), std::process::id())
}

/// What the application's writes cost the server between two snapshots with no relay running: WAL bytes and
/// PostgreSQL CPU microseconds (throwaway cluster only) per event.
pub fn write_cost(before: &Snapshot, after: &Snapshot, events: u64) -> (Option<f64>, Option<f64>) {
    if events == 0 {
        return (None, None);
    }
    let e = events as f64;
    let wal = after.wal.0.checked_sub(before.wal.0).map(|b| b as f64 / e);
    let cpu = after
        .postgres_cpu
        .zip(before.postgres_cpu)
        .map(|(a, b)| (a - b).max(0.0) * 1e6 / e);
    (wal, cpu)
}

/// What the relays cost between two snapshots, per delivery: CPU and memory summed over the instances, and
/// each instance's share.
pub fn cost(before: &Snapshot, after: &Snapshot, relays: &Relays, deliveries: u64) -> Cost {
    let seconds = after.at.duration_since(before.at).as_secs_f64();
    let d = deliveries as f64;
    // a relay started after `before` (none in practice) counts from zero
    let cpu_each: Vec<f64> = after
        .relay_cpu
        .iter()
        .enumerate()
        .map(|(i, a)| (a - before.relay_cpu.get(i).copied().unwrap_or(0.0)).max(0.0))
        .collect();
    let relay_cpu = cpu_each.iter().fold(0.0, |a, b| a + b);
    let delta = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| (a - b).max(0.0));
    let postgres_cpu = delta(after.postgres_cpu, before.postgres_cpu);
    let walsender_cpu = delta(after.walsender_cpu, before.walsender_cpu);
    let relay_sql_cpu = delta(after.relay_sql_cpu, before.relay_sql_cpu);
    let bench_cpu = after.bench_cpu - before.bench_cpu;
    let mut used = Vec::new();
    if let (Some(b), Some(a)) = (&before.statements, &after.statements) {
        for (query, now) in a {
            let then = b.get(query).copied().unwrap_or_default();
            if now.calls > then.calls {
                used.push(StatementUse {
                    query: query.clone(),
                    calls: now.calls - then.calls,
                    rows: now.rows - then.rows,
                    wal_bytes: now.wal_bytes - then.wal_bytes,
                    exec_ms: now.exec_ms - then.exec_ms,
                });
            }
        }
    }
    used.sort_by_key(|s| std::cmp::Reverse(s.calls));
    let measured = before.statements.is_some() && after.statements.is_some();
    let calls: i64 = used.iter().map(|s| s.calls).sum();
    // folded from 0.0: a float sum of nothing is -0.0, which would print as "-0"
    let wal = used.iter().fold(0.0, |a, s| a + s.wal_bytes);
    let source: Vec<&StatementUse> = used
        .iter()
        .filter(|s| s.query.to_lowercase().contains(SOURCE_STATEMENT))
        .collect();
    let source_calls: i64 = source.iter().map(|s| s.calls).sum();
    let source_wal = source.iter().fold(0.0, |a, s| a + s.wal_bytes);
    used.truncate(TOP_STATEMENTS);
    for s in &mut used {
        if s.query.len() > 100 {
            let cut = (0..=100)
                .rev()
                .find(|i| s.query.is_char_boundary(*i))
                .unwrap_or(0);
            s.query = format!("{}…", &s.query[..cut]);
        }
    }
    let per_core = |cpu: f64| if seconds > 0.0 { cpu / seconds } else { 0.0 };
    let instances = relays
        .peak_rss_mib()
        .into_iter()
        .zip(cpu_each)
        .map(|(peak_rss_mib, cpu)| InstanceCost {
            peak_rss_mib,
            cpu_s_per_10k: ratio(cpu * 10_000.0, d),
            cores: per_core(cpu),
        })
        .collect();
    Cost {
        deliveries,
        seconds,
        peak_rss_mib: relays.peak_rss_mib_sum(),
        cpu_s_per_10k: ratio(relay_cpu * 10_000.0, d),
        relay_cores: per_core(relay_cpu),
        statements_per_delivery: measured.then(|| ratio(calls as f64, d)).flatten(),
        wal_bytes_per_delivery: measured.then(|| ratio(wal, d)).flatten(),
        source_statements_per_delivery: measured.then(|| ratio(source_calls as f64, d)).flatten(),
        source_wal_bytes_per_delivery: measured.then(|| ratio(source_wal, d)).flatten(),
        total_wal_bytes_per_delivery: ratio(after.wal.0.saturating_sub(before.wal.0) as f64, d),
        postgres_cpu_s_per_10k: postgres_cpu.and_then(|c| ratio(c * 10_000.0, d)),
        postgres_cores: postgres_cpu.map(per_core),
        walsender_cpu_s_per_10k: walsender_cpu.and_then(|c| ratio(c * 10_000.0, d)),
        relay_sql_cpu_s_per_10k: relay_sql_cpu.and_then(|c| ratio(c * 10_000.0, d)),
        bench_cpu_s_per_10k: ratio(bench_cpu * 10_000.0, d),
        bench_cores: per_core(bench_cpu),
        statements: used,
        instances,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_urls_name_the_scratch_database() {
        let cases = [
            ("postgres://u:p@h:5432/app", "postgres://u:p@h:5432/scratch"),
            ("postgres://u@h", "postgres://u@h/scratch"),
            (
                "postgresql://u@h/app?sslmode=disable",
                "postgresql://u@h/scratch?sslmode=disable",
            ),
            (
                "postgres://u@h/app?dbname=app&application_name=x",
                "postgres://u@h/scratch?application_name=x",
            ),
            ("postgres://u@h/?dbname=app", "postgres://u@h/scratch"),
            (
                "host=h user=u dbname=app",
                "host=h user=u dbname=app dbname=scratch",
            ),
        ];
        for (url, expected) in cases {
            assert_eq!(with_dbname(url, "scratch"), expected, "{url}");
            let parsed: crate::conninfo::ConnInfo = with_dbname(url, "scratch").parse().unwrap();
            assert_eq!(parsed.get_dbname(), Some("scratch"), "{url}");
        }
    }
}
