//! What `walhook bench` measured: the `--json` document and the table printed for people.
//!
//! The JSON keys named in the issue (`baseline.inserts_per_sec`, `drain.deliveries_per_sec`,
//! `live.full_speed_ratio`, …) are fields here and must keep their names; everything else is context for
//! reading them (the machine, the relay's CPU next to PostgreSQL's, the relay's most frequent statements).
//! Figures that could not be measured are `null`, never 0.

use std::fmt::Write as _;

use serde::Serialize;

use super::stats::Latency;

/// Everything measured; serialises to the `--json` document.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Whether the server flushed WAL to disk on commit (`fsync = on`), as production servers do: `--durable`
    /// on the throwaway cluster, or a given server's own setting.
    pub durable: bool,
    /// The relays' source: `replication` or `notify`.
    pub source: String,
    /// Relay processes on the same database in drain, live, fanout and retries.
    pub instances: usize,
    pub machine: Machine,
    pub settings: Settings,
    pub baseline: Option<Baseline>,
    pub drain: Option<Drain>,
    pub backfill: Option<Backfill>,
    pub live: Option<Live>,
    pub fanout: Option<Fanout>,
    pub retries: Option<Retries>,
    pub fairness: Option<Fairness>,
    pub tenants: Option<Tenants>,
    pub slow: Option<Slow>,
    pub portal: Option<Portal>,
    pub publish: Option<Publish>,
    pub elapsed_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub kernel: String,
    pub memory_gib: f64,
    pub postgres: String,
    /// "throwaway cluster" or "given server".
    pub server: String,
    pub fsync: String,
    pub synchronous_commit: String,
    /// 1-minute load average when the benchmark ended: other work on the machine skews every figure.
    pub load_average: Option<f64>,
    pub pg_stat_statements: bool,
}

#[derive(Debug, Serialize)]
pub struct Settings {
    pub quick: bool,
    pub events: u64,
    pub fanout_events: u64,
    pub backfill_events: u64,
    pub window_s: f64,
    pub writers: usize,
    /// The relay's configuration beyond its defaults, as `key=value`.
    pub relay_settings: Vec<String>,
}

/// What the relay cost over one measured interval.
#[derive(Debug, Serialize)]
pub struct Cost {
    /// Successful deliveries in the interval: the denominator of the figures below.
    pub deliveries: u64,
    pub seconds: f64,
    /// Summed over the relay instances: the sum of each one's peak (`instances` has them one by one).
    pub peak_rss_mib: f64,
    /// Summed over the relay instances.
    pub cpu_s_per_10k: Option<f64>,
    /// Share of one core the relays used, summed over the instances.
    pub relay_cores: f64,
    /// SQL statements the relay ran per delivery (pg_stat_statements; `null` without it).
    pub statements_per_delivery: Option<f64>,
    /// WAL the relay's own statements wrote per delivery (pg_stat_statements; `null` without it).
    pub wal_bytes_per_delivery: Option<f64>,
    /// Of the relay's statements, the notify source's (claims, `processed_at` marks, lease renewals: the
    /// statements that update `walhook.outbox`); 0 with replication. `null` without pg_stat_statements.
    pub source_statements_per_delivery: Option<f64>,
    /// WAL of those statements per delivery (the application's inserts are not counted).
    pub source_wal_bytes_per_delivery: Option<f64>,
    /// All WAL generated per delivery (application inserts, relay, everything else), for context.
    pub total_wal_bytes_per_delivery: Option<f64>,
    /// CPU of the whole PostgreSQL server per 10,000 deliveries (throwaway cluster only).
    pub postgres_cpu_s_per_10k: Option<f64>,
    pub postgres_cores: Option<f64>,
    /// Of the PostgreSQL CPU: the walsender decoding the WAL for the relay.
    pub walsender_cpu_s_per_10k: Option<f64>,
    /// Of the PostgreSQL CPU: the sessions running the relay's SQL (recording, retries, endpoint cache).
    pub relay_sql_cpu_s_per_10k: Option<f64>,
    /// CPU of this process (writers and receiver) per 10,000 deliveries.
    pub bench_cpu_s_per_10k: Option<f64>,
    pub bench_cores: f64,
    /// The relay's most frequent statements in the interval.
    pub statements: Vec<StatementUse>,
    /// Each relay instance's own figures, in start order.
    pub instances: Vec<InstanceCost>,
}

impl Cost {
    /// The walsender's and the relay's SQL sessions' CPU per delivery, in microseconds.
    pub fn relay_postgres_cpu_us_per_delivery(&self) -> Option<f64> {
        // seconds per 10,000 deliveries = 100 µs per delivery
        Some((self.walsender_cpu_s_per_10k? + self.relay_sql_cpu_s_per_10k?) * 100.0)
    }
}

/// One relay instance's share of an interval.
#[derive(Debug, Serialize)]
pub struct InstanceCost {
    pub peak_rss_mib: f64,
    pub cpu_s_per_10k: Option<f64>,
    pub cores: f64,
}

#[derive(Debug, Serialize)]
pub struct StatementUse {
    pub query: String,
    pub calls: i64,
    pub rows: i64,
    pub wal_bytes: f64,
    /// Time the server spent executing it, in all.
    pub exec_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct Baseline {
    pub writers: usize,
    /// One event per transaction.
    pub inserts_per_sec: f64,
    /// `batch` events per transaction (one statement).
    pub inserts_per_sec_batched: f64,
    pub batch: usize,
    /// The same with the notify source's `outbox_wake` trigger (and its partial index) installed and a
    /// session listening: every inserting transaction then sends a `NOTIFY` at commit.
    /// `null` where they cannot be installed.
    pub inserts_per_sec_with_notify_trigger: Option<f64>,
    pub inserts_per_sec_batched_with_notify_trigger: Option<f64>,
    /// With the trigger / without, one event per transaction.
    pub notify_trigger_ratio: Option<f64>,
    /// With the trigger / without, `batch` events per transaction.
    pub notify_trigger_ratio_batched: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Drain {
    pub events: u64,
    /// Events / (relay start → every delivery recorded as succeeded).
    pub deliveries_per_sec: f64,
    pub first_delivery_ms: Option<f64>,
    /// Relay start → last delivery received.
    pub delivered_s: f64,
    /// Relay start → every delivery recorded as succeeded.
    pub recorded_s: f64,
    pub preload_s: f64,
    /// Requests for an (endpoint, webhook-id) already answered 2xx: the same delivery received twice.
    pub duplicates: u64,
    /// PostgreSQL CPU per delivery that is the relay's doing: its walsender plus its SQL sessions, in
    /// microseconds (throwaway cluster only). The rest of the server's CPU (background writers, the
    /// application's inserts before the relay started) is in `postgres_cpu_s_per_10k`.
    pub postgres_cpu_us_per_delivery: Option<f64>,
    #[serde(flatten)]
    pub cost: Cost,
}

/// Events committed before the relay's first start (no slot yet): what the new slot's snapshot hands over.
#[derive(Debug, Serialize)]
pub struct Backfill {
    pub events: u64,
    /// Events / (relay start → every delivery recorded as succeeded).
    pub deliveries_per_sec: f64,
    /// The drain scenario's rate in the same run (`null` when it did not run).
    pub drain_per_sec: Option<f64>,
    /// `deliveries_per_sec ÷ drain_per_sec`: 0.8 or more is the target.
    pub ratio_to_drain: Option<f64>,
    pub first_delivery_ms: Option<f64>,
    pub recorded_s: f64,
    pub preload_s: f64,
    pub duplicates: u64,
    /// Peak RSS (`backfill.peak_rss_mib`), CPU and SQL per delivery.
    #[serde(flatten)]
    pub cost: Cost,
}

#[derive(Debug, Serialize)]
pub struct Live {
    /// Delivered rate at full speed / baseline insert rate (one event per transaction), same run: with the
    /// notify source, the baseline with its trigger installed (what the application gets).
    pub full_speed_ratio: Option<f64>,
    /// With the notify source: delivered rate at full speed / baseline insert rate without the trigger.
    pub full_speed_ratio_to_baseline_without_trigger: Option<f64>,
    pub p99_ms_at_1000: Option<f64>,
    pub p99_ms_at_5000: Option<f64>,
    /// Summed over the relay instances (the sum of each one's peak).
    pub peak_rss_mib: f64,
    /// Over all phases: requests for a webhook-id already answered 2xx.
    pub duplicates: u64,
    pub phases: Vec<LivePhase>,
}

#[derive(Debug, Serialize)]
pub struct LivePhase {
    pub name: String,
    /// `null` at full speed.
    pub offered_per_sec: Option<f64>,
    pub committed: u64,
    pub committed_per_sec: f64,
    /// Deliveries received during the writers' window, per second of it.
    pub delivered_per_sec: f64,
    /// Commit (returned to the writer) → received, over every event of the phase.
    pub latency: Option<Latency>,
    /// Deliveries that arrived before their writer had stamped the commit (counted as 0 ms).
    pub arrived_before_commit_returned: u64,
    /// Requests for a webhook-id already answered 2xx, from the start of the phase until it caught up.
    pub duplicates: u64,
    /// Committed but not yet received, sampled every 100 ms.
    pub backlog_max: u64,
    pub backlog_end: u64,
    pub backlog_every_100ms: Vec<u64>,
    /// p99 latency of the events committed in each second of the window (`null`: none committed).
    pub p99_ms_by_second: Vec<Option<f64>>,
    /// How far behind the relay was when the writers stopped: `backlog_end / committed_per_sec`.
    pub behind_s: f64,
    /// Writers stopped → everything received.
    pub catch_up_s: f64,
    /// The relay kept up: it was at most `behind_s` 0.25 s behind when the writers stopped (a backlog that
    /// grows for the whole window ends further behind).
    pub bounded: bool,
    #[serde(flatten)]
    pub cost: Cost,
}

#[derive(Debug, Serialize)]
pub struct Fanout {
    pub endpoints: u64,
    pub events: u64,
    /// Deliveries / (relay start → every delivery recorded as succeeded).
    pub deliveries_per_sec: f64,
    pub first_delivery_ms: Option<f64>,
    pub recorded_s: f64,
    /// Requests for an (endpoint, webhook-id) already answered 2xx.
    pub duplicates: u64,
    #[serde(flatten)]
    pub cost: Cost,
}

#[derive(Debug, Serialize)]
pub struct Retries {
    /// Successful deliveries received during the writers' window, per second of it.
    pub deliveries_per_sec: f64,
    pub committed_per_sec: f64,
    /// p99 commit → received of the events whose first attempt succeeded.
    pub p99_ms: Option<f64>,
    pub latency_first_attempt: Option<Latency>,
    /// Commit → successful retry, for the events whose first attempt was answered 500.
    pub latency_retried: Option<Latency>,
    pub failed_first_attempts: u64,
    /// Requests for a webhook-id already answered 2xx (a retry of a 500 is not one).
    pub duplicates: u64,
    /// Writers stopped → every event delivered and recorded as succeeded.
    pub all_succeeded_s: f64,
    #[serde(flatten)]
    pub cost: Cost,
}

/// Tenant B's trickle alone, beside tenant A's backlog for a slow endpoint, and during A's burst.
#[derive(Debug, Serialize)]
pub struct Fairness {
    /// Tenant B's events per second.
    pub offered_per_sec: f64,
    /// Events in tenant A's backlog (and in its later burst).
    pub backlog_events: u64,
    /// How long tenant A's endpoint takes to answer.
    pub slow_endpoint_ms: u64,
    /// A's backlog committed → a delivery row recorded for every event of it.
    pub backlog_recorded_s: f64,
    /// A's pending deliveries when B's second window began.
    pub backlog_pending: u64,
    /// A's deliveries started during B's second window.
    pub backlog_delivered_in_window: u64,
    /// B's commit → received, alone.
    pub b_alone: Option<Latency>,
    pub b_beside_backlog: Option<Latency>,
    pub b_during_burst: Option<Latency>,
    /// B's p99 beside A's backlog ÷ B's p99 alone: fair when at most 2.
    pub p99_ratio: Option<f64>,
    /// B's p99 during A's burst ÷ B's p99 alone.
    pub burst_p99_ratio: Option<f64>,
    pub peak_rss_mib: f64,
    /// What the relay cost during B's window beside A's backlog, per B's delivery.
    #[serde(flatten)]
    pub cost: Cost,
}

/// Many tenants with an endpoint each, a few of them broken.
#[derive(Debug, Serialize)]
pub struct Tenants {
    pub tenants: u32,
    /// Endpoints that answer 500 to everything (half) or never answer (half).
    pub broken: u32,
    /// Requests the broken endpoints received.
    pub broken_requests: u64,
    pub peak_rss_mib: f64,
    pub phases: Vec<TenantsPhase>,
}

#[derive(Debug, Serialize)]
pub struct TenantsPhase {
    pub name: String,
    /// `null` for full speed.
    pub offered_per_sec: Option<f64>,
    pub committed_per_sec: f64,
    /// Healthy tenants' deliveries received during the writers' window, per second of it.
    pub healthy_deliveries_per_sec: f64,
    /// Healthy tenants' commit → received.
    pub healthy_latency: Option<Latency>,
    /// Writers stopped → every healthy tenant's event received.
    pub caught_up_s: f64,
    #[serde(flatten)]
    pub cost: Cost,
}

/// `walhook.publish()` (a logical decoding message) against `INSERT INTO walhook.outbox`: the same writers at
/// full speed, one event per transaction, no relay. The unprefixed figures are publish()'s.
#[derive(Debug, Serialize)]
pub struct Publish {
    pub writers: usize,
    pub inserts_per_sec: f64,
    /// All WAL the server wrote in the window, per event.
    pub wal_bytes_per_event: Option<f64>,
    /// CPU of the whole PostgreSQL server in the window, per event (throwaway cluster only).
    pub postgres_cpu_us_per_event: Option<f64>,
    pub table_inserts_per_sec: f64,
    pub table_wal_bytes_per_event: Option<f64>,
    pub table_postgres_cpu_us_per_event: Option<f64>,
    /// CPU of decoding the window's WAL with pgoutput as the walsender would, per event (throwaway cluster
    /// only): what streaming each event to the relay costs PostgreSQL.
    pub decode_cpu_us_per_event: Option<f64>,
    pub table_decode_cpu_us_per_event: Option<f64>,
    /// publish() ÷ the insert.
    pub inserts_ratio: Option<f64>,
    pub wal_ratio: Option<f64>,
}

/// Realistic receivers: 1,000 endpoints answering in 50–300 ms, 2 % of them hanging until the timeout.
#[derive(Debug, Serialize)]
pub struct Slow {
    pub endpoints: u32,
    /// The receivers served HTTPS, offering HTTP/2 and HTTP/1.1 by ALPN (`--tls`).
    pub tls: bool,
    /// Endpoints that never answer (their requests end at the relay's `delivery.timeout`).
    pub hanging_endpoints: u32,
    /// The range the healthy endpoints' answer times are drawn from.
    pub latency_ms: [u64; 2],
    pub timeout_s: f64,
    /// The backlog, spread evenly over the endpoints.
    pub events: u64,
    /// The backlog's events for healthy endpoints.
    pub healthy_deliveries: u64,
    /// Healthy deliveries per second, from the relay's start until all of them were recorded as succeeded.
    pub deliveries_per_sec: f64,
    /// The most requests the relay's settings let it keep in flight to these endpoints.
    pub in_flight_limit: usize,
    /// The healthy endpoints' mean answer time.
    pub mean_latency_ms: f64,
    /// `min(in_flight_limit ÷ mean latency, drain_per_sec)`: what no relay with these limits exceeds.
    pub bound_per_sec: f64,
    pub bound_by_latency_per_sec: f64,
    /// The drain scenario's rate in the same run (`null` when it did not run).
    pub drain_per_sec: Option<f64>,
    /// `deliveries_per_sec ÷ bound_per_sec`: 0.8 or more is the target.
    pub ratio_to_bound: Option<f64>,
    pub recorded_s: f64,
    pub peak_rss_mib: f64,
    /// The relay's open sockets, at most (sampled every 100 ms).
    pub peak_sockets: u64,
    /// Requests the hanging endpoints received (backlog and paced phase).
    pub hanging_requests: u64,
    /// Arrivals at healthy endpoints per second, in each half second of the backlog from the relay's start:
    /// how its requests in flight rose, held and fell.
    pub healthy_per_sec_every_500ms: Vec<f64>,
    /// The paced phase's offered rate.
    pub paced_per_sec: f64,
    /// Healthy endpoints' commit → arrival p99 in the paced phase.
    pub healthy_p99_ms: Option<f64>,
    pub healthy_latency: Option<Latency>,
    /// What the backlog cost, per healthy delivery.
    #[serde(flatten)]
    pub cost: Cost,
}

/// The portal's pages over a large delivery log.
#[derive(Debug, Serialize)]
pub struct Portal {
    pub deliveries: u64,
    pub tenants: u64,
    /// Writing the deliveries, outbox rows and attempts.
    pub fill_s: f64,
    pub requests_per_page: usize,
    /// The highest of the pages' p99: under 50 ms is the target.
    pub slowest_page_p99_ms: Option<f64>,
    pub pages: Vec<PortalPage>,
}

#[derive(Debug, Serialize)]
pub struct PortalPage {
    pub name: String,
    pub path: String,
    /// Request sent → whole page received, one request at a time.
    pub latency: Option<Latency>,
}

impl Report {
    /// The machine line, then one line per scenario (per rate for `live`) with the key figures, then where
    /// the CPU went and the relay's most frequent statements.
    pub fn table(&self) -> String {
        let m = &self.machine;
        let s = &self.settings;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "walhook bench: {} cores ({}), {:.1} GiB, Linux {}, load {}; {} ({}, fsync={}, \
             synchronous_commit={}); {} writers, {} s windows{}; source {}, {} relay instance{}; ran {:.0} s",
            m.cores,
            m.cpu,
            m.memory_gib,
            m.kernel,
            m.load_average.map_or("?".into(), |l| format!("{l:.1}")),
            m.postgres,
            m.server,
            m.fsync,
            m.synchronous_commit,
            s.writers,
            s.window_s,
            if s.quick { ", --quick" } else { "" },
            self.source,
            self.instances,
            if self.instances == 1 { "" } else { "s" },
            self.elapsed_s
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<20} {:>22}  {:<30} {:>9} {:>9} {:>9} {:>9}",
            "scenario",
            "rate",
            "latency ms p50/p95/p99/max",
            "RSS MiB",
            "CPU s/10k",
            "stmts/dlv",
            "WAL B/dlv"
        );
        let row =
            |out: &mut String, name: &str, rate: String, latency: String, cost: Option<&Cost>| {
                let (rss, cpu, stmts, wal) = match cost {
                    Some(c) => (
                        format!("{:.1}", c.peak_rss_mib),
                        opt(c.cpu_s_per_10k, 2),
                        opt(c.statements_per_delivery, 3),
                        opt(c.wal_bytes_per_delivery, 0),
                    ),
                    None => ("-".into(), "-".into(), "-".into(), "-".into()),
                };
                let _ = writeln!(
                    out,
                    "{name:<20} {rate:>22}  {latency:<30} {rss:>9} {cpu:>9} {stmts:>9} {wal:>9}"
                );
            };
        if let Some(b) = &self.baseline {
            let with_trigger = |out: &mut String, rate: Option<f64>, ratio: Option<f64>| {
                let rate = rate.map_or("-".into(), |r| format!("{} inserts/s", thousands(r)));
                let ratio = ratio.map_or(String::new(), |r| format!("{r:.2} × without"));
                row(out, "  with outbox_wake", rate, ratio, None);
            };
            let rate = format!("{} inserts/s", thousands(b.inserts_per_sec));
            row(&mut out, "baseline 1/txn", rate, String::new(), None);
            with_trigger(
                &mut out,
                b.inserts_per_sec_with_notify_trigger,
                b.notify_trigger_ratio,
            );
            let rate = format!("{} inserts/s", thousands(b.inserts_per_sec_batched));
            let name = format!("baseline {}/txn", b.batch);
            row(&mut out, &name, rate, String::new(), None);
            with_trigger(
                &mut out,
                b.inserts_per_sec_batched_with_notify_trigger,
                b.notify_trigger_ratio_batched,
            );
        }
        if let Some(d) = &self.drain {
            let name = format!("drain {}", thousands(d.events as f64));
            let rate = format!("{} dlv/s", thousands(d.deliveries_per_sec));
            row(
                &mut out,
                &name,
                rate,
                first(d.first_delivery_ms),
                Some(&d.cost),
            );
        }
        if let Some(b) = &self.backfill {
            let name = format!("backfill {}", thousands(b.events as f64));
            let rate = format!("{} dlv/s", thousands(b.deliveries_per_sec));
            let ratio = b
                .ratio_to_drain
                .map_or(String::new(), |r| format!("{r:.2} × drain, "));
            let latency = format!("{ratio}{}", first(b.first_delivery_ms));
            row(&mut out, &name, rate, latency, Some(&b.cost));
        }
        if let Some(l) = &self.live {
            for p in &l.phases {
                let rate = format!("{} dlv/s", thousands(p.delivered_per_sec));
                let name = format!("live {}", p.name);
                row(
                    &mut out,
                    &name,
                    rate,
                    latency(p.latency.as_ref()),
                    Some(&p.cost),
                );
            }
        }
        if let Some(f) = &self.fanout {
            let name = format!("fanout {}×{}", f.endpoints, thousands(f.events as f64));
            let rate = format!("{} dlv/s", thousands(f.deliveries_per_sec));
            row(
                &mut out,
                &name,
                rate,
                first(f.first_delivery_ms),
                Some(&f.cost),
            );
        }
        if let Some(r) = &self.retries {
            let rate = format!("{} dlv/s", thousands(r.deliveries_per_sec));
            let l = latency(r.latency_first_attempt.as_ref());
            row(&mut out, "retries 10% 500", rate, l, Some(&r.cost));
        }

        if let Some(t) = &self.tenants {
            for p in &t.phases {
                let name = format!("tenants {}", p.name);
                let rate = format!("{} dlv/s", thousands(p.healthy_deliveries_per_sec));
                let l = latency(p.healthy_latency.as_ref());
                row(&mut out, &name, rate, l, Some(&p.cost));
            }
        }

        if let Some(x) = &self.slow {
            let https = if x.tls { " https" } else { "" };
            let name = format!("slow{https} {}", thousands(x.events as f64));
            let rate = format!("{} dlv/s", thousands(x.deliveries_per_sec));
            let l = latency(x.healthy_latency.as_ref());
            row(&mut out, &name, rate, l, Some(&x.cost));
        }

        let _ = writeln!(out);
        if let Some(f) = &self.fairness {
            let _ = writeln!(
                out,
                "fairness: tenant B at {:.0}/s, p50/p95/p99/max ms alone {}; beside tenant A's {} pending \
                 deliveries to a {} ms endpoint {} ({}× alone); while A commits a burst of {} {} ({}× alone)",
                f.offered_per_sec,
                latency(f.b_alone.as_ref()),
                thousands(f.backlog_pending as f64),
                f.slow_endpoint_ms,
                latency(f.b_beside_backlog.as_ref()),
                f.p99_ratio.map_or("-".into(), |r| format!("{r:.2}")),
                thousands(f.backlog_events as f64),
                latency(f.b_during_burst.as_ref()),
                f.burst_p99_ratio.map_or("-".into(), |r| format!("{r:.2}")),
            );
        }
        if let Some(p) = &self.publish {
            let _ = writeln!(
                out,
                "publish, {} writers, no relay: walhook.publish() {} events/s, {} WAL B, {} µs PostgreSQL CPU \
                 per event (decoding it {} µs); INSERT INTO walhook.outbox {} events/s, {} WAL B, {} µs \
                 (decoding {} µs); {}× the rate, {}× the WAL",
                p.writers,
                thousands(p.inserts_per_sec),
                opt(p.wal_bytes_per_event, 0),
                opt(p.postgres_cpu_us_per_event, 1),
                opt(p.decode_cpu_us_per_event, 1),
                thousands(p.table_inserts_per_sec),
                opt(p.table_wal_bytes_per_event, 0),
                opt(p.table_postgres_cpu_us_per_event, 1),
                opt(p.table_decode_cpu_us_per_event, 1),
                opt(p.inserts_ratio, 2),
                opt(p.wal_ratio, 2),
            );
        }
        if let Some(p) = &self.portal {
            let _ = writeln!(
                out,
                "portal, {} deliveries of {} tenants, {} requests per page, ms p50/p95/p99/max (slowest p99 {}):",
                thousands(p.deliveries as f64),
                p.tenants,
                p.requests_per_page,
                p.slowest_page_p99_ms.map_or("-".into(), |v| format!("{v:.1} ms"))
            );
            for page in &p.pages {
                let _ = writeln!(
                    out,
                    "  {:<26} {}",
                    page.name,
                    latency(page.latency.as_ref())
                );
            }
        }
        if let Some(t) = &self.tenants {
            let _ = writeln!(
                out,
                "tenants: {} of {} endpoints broken (500 to everything, or no answer within 5 s) got {} \
                 requests; healthy tenants caught up {} s after the writers stopped",
                t.broken,
                thousands(t.tenants as f64),
                thousands(t.broken_requests as f64),
                t.phases
                    .iter()
                    .map(|p| format!("{:.1}", p.caught_up_s))
                    .collect::<Vec<_>>()
                    .join(" / ")
            );
        }
        if let Some(x) = &self.slow {
            let _ = writeln!(
                out,
                "slow: {} endpoints answering in {}–{} ms (mean {:.0}), {} hanging until the {} s timeout: {} \
                 healthy deliveries/s = {} × the bound {}/s (min of {} in flight ÷ mean latency = {}/s, drain {}); \
                 peak RSS {:.1} MiB, {} sockets; at {}/s beside the hanging endpoints p50/p95/p99/max ms {}",
                thousands(x.endpoints as f64),
                x.latency_ms[0],
                x.latency_ms[1],
                x.mean_latency_ms,
                x.hanging_endpoints,
                x.timeout_s,
                thousands(x.deliveries_per_sec),
                opt(x.ratio_to_bound, 2),
                thousands(x.bound_per_sec),
                thousands(x.in_flight_limit as f64),
                thousands(x.bound_by_latency_per_sec),
                x.drain_per_sec.map_or("not run".into(), |d| format!("{}/s", thousands(d))),
                x.peak_rss_mib,
                thousands(x.peak_sockets as f64),
                thousands(x.paced_per_sec),
                latency(x.healthy_latency.as_ref()),
            );
        }
        if let Some(l) = &self.live {
            for p in &l.phases {
                let _ = writeln!(
                    out,
                    "live {:<11} committed {:>7}/s, delivered {:>7}/s, backlog max {} / at end {} \
                     ({:.2} s behind), caught up {:.2} s after the writers stopped: {}",
                    p.name,
                    thousands(p.committed_per_sec),
                    thousands(p.delivered_per_sec),
                    thousands(p.backlog_max as f64),
                    thousands(p.backlog_end as f64),
                    p.behind_s,
                    p.catch_up_s,
                    if p.bounded { "bounded" } else { "NOT bounded" }
                );
            }
            if let Some(ratio) = l.full_speed_ratio {
                let notify = l.full_speed_ratio_to_baseline_without_trigger;
                let _ = writeln!(
                    out,
                    "live full speed delivered {:.2} × the baseline insert rate (1/txn{})",
                    ratio,
                    notify.map_or(String::new(), |r| format!(
                        ", with the outbox_wake trigger; {r:.2} × the rate without it"
                    ))
                );
            }
        }
        if let Some(r) = &self.retries {
            let _ = writeln!(
                out,
                "retries: {} first attempts answered 500; retried ones delivered {} after commit; \
                 everything succeeded {:.1} s after the writers stopped",
                thousands(r.failed_first_attempts as f64),
                r.latency_retried.as_ref().map_or("-".into(), |l| format!(
                    "p50 {:.0} ms, p99 {:.0} ms",
                    l.p50_ms, l.p99_ms
                )),
                r.all_succeeded_s
            );
        }

        let duplicates: Vec<String> = [
            self.drain.as_ref().map(|d| ("drain", d.duplicates)),
            self.backfill.as_ref().map(|b| ("backfill", b.duplicates)),
            self.live.as_ref().map(|l| ("live", l.duplicates)),
            self.fanout.as_ref().map(|f| ("fanout", f.duplicates)),
            self.retries.as_ref().map(|r| ("retries", r.duplicates)),
        ]
        .into_iter()
        .flatten()
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
        if !duplicates.is_empty() {
            let _ = writeln!(
                out,
                "duplicates (a webhook-id received again at an endpoint that had answered it 2xx): {}",
                duplicates.join(", ")
            );
        }

        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "where the CPU went, seconds per 10,000 deliveries (cores busy); PostgreSQL's includes its \
             walsender and the relay's SQL sessions{}:",
            if self.instances > 1 {
                "; the relay's and its RSS are summed over its instances"
            } else {
                ""
            }
        );
        for (name, cost) in self.costs() {
            let _ = writeln!(
                out,
                "  {name:<18} relay {:>5} ({:.2})  postgres {:>5} ({}) [walsender {}, relay SQL {}]  \
                 bench {:>5} ({:.2})  all WAL {:>5} B/dlv",
                opt(cost.cpu_s_per_10k, 2),
                cost.relay_cores,
                opt(cost.postgres_cpu_s_per_10k, 2),
                cost.postgres_cores.map_or("-".into(), |c| format!("{c:.2}")),
                opt(cost.walsender_cpu_s_per_10k, 2),
                opt(cost.relay_sql_cpu_s_per_10k, 2),
                opt(cost.bench_cpu_s_per_10k, 2),
                cost.bench_cores,
                opt(cost.total_wal_bytes_per_delivery, 0),
            );
            if cost.instances.len() > 1 {
                for (i, instance) in cost.instances.iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "    instance {}: relay {:>5} ({:.2}), peak RSS {:.1} MiB",
                        i + 1,
                        opt(instance.cpu_s_per_10k, 2),
                        instance.cores,
                        instance.peak_rss_mib
                    );
                }
            }
        }
        if self.source == "notify" {
            let _ = writeln!(
                out,
                "the notify source's own SQL per delivery (claims, processed_at marks, lease renewals; the \
                 application's inserts not counted):"
            );
            for (name, cost) in self.costs() {
                let _ = writeln!(
                    out,
                    "  {name:<18} {:>6} statements  {:>5} WAL B  (all of the relay's: {} statements, {} WAL B)",
                    opt(cost.source_statements_per_delivery, 3),
                    opt(cost.source_wal_bytes_per_delivery, 0),
                    opt(cost.statements_per_delivery, 3),
                    opt(cost.wal_bytes_per_delivery, 0),
                );
            }
        }
        for (name, cost) in self.costs() {
            if cost.statements.is_empty() {
                continue;
            }
            let _ = writeln!(out, "relay statements in {name}:");
            for st in &cost.statements {
                let _ = writeln!(
                    out,
                    "  {:>9} calls {:>10} rows {:>12} WAL B {:>8.1} ms/call  {}",
                    thousands(st.calls as f64),
                    thousands(st.rows as f64),
                    thousands(st.wal_bytes),
                    st.exec_ms / st.calls.max(1) as f64,
                    st.query
                );
            }
        }
        out
    }

    /// Every measured interval, named as in the table.
    fn costs(&self) -> Vec<(String, &Cost)> {
        let mut costs = Vec::new();
        if let Some(d) = &self.drain {
            costs.push(("drain".to_string(), &d.cost));
        }
        if let Some(b) = &self.backfill {
            costs.push(("backfill".to_string(), &b.cost));
        }
        if let Some(l) = &self.live {
            for p in &l.phases {
                costs.push((format!("live {}", p.name), &p.cost));
            }
        }
        if let Some(f) = &self.fanout {
            costs.push(("fanout".to_string(), &f.cost));
        }
        if let Some(r) = &self.retries {
            costs.push(("retries".to_string(), &r.cost));
        }
        if let Some(f) = &self.fairness {
            costs.push(("fairness beside".to_string(), &f.cost));
        }
        if let Some(t) = &self.tenants {
            for p in &t.phases {
                costs.push((format!("tenants {}", p.name), &p.cost));
            }
        }
        if let Some(x) = &self.slow {
            costs.push(("slow".to_string(), &x.cost));
        }
        costs
    }
}

fn opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or("-".into(), |v| format!("{v:.decimals$}"))
}

fn first(ms: Option<f64>) -> String {
    ms.map_or(String::new(), |ms| format!("first after {ms:.0} ms"))
}

fn latency(l: Option<&Latency>) -> String {
    l.map_or("-".into(), |l| {
        format!(
            "{} / {} / {} / {}",
            short(l.p50_ms),
            short(l.p95_ms),
            short(l.p99_ms),
            short(l.max_ms)
        )
    })
}

/// Milliseconds with one decimal below 100, none above.
fn short(ms: f64) -> String {
    if ms < 100.0 {
        format!("{ms:.1}")
    } else {
        thousands(ms)
    }
}

/// Rounded, with thin thousands separators: 12,345.
fn thousands(value: f64) -> String {
    let rounded = value.round();
    let digits = format!("{}", rounded.abs() as u64);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if rounded < 0.0 {
        out.insert(0, '-');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(instances: &[(f64, f64)]) -> Cost {
        Cost {
            deliveries: 10_000,
            seconds: 1.0,
            peak_rss_mib: instances.iter().map(|i| i.0).sum(),
            cpu_s_per_10k: Some(instances.iter().map(|i| i.1).sum()),
            relay_cores: 0.5,
            statements_per_delivery: Some(0.007),
            wal_bytes_per_delivery: Some(1583.0),
            source_statements_per_delivery: Some(0.004),
            source_wal_bytes_per_delivery: Some(1009.0),
            total_wal_bytes_per_delivery: Some(1608.0),
            postgres_cpu_s_per_10k: None,
            postgres_cores: None,
            walsender_cpu_s_per_10k: None,
            relay_sql_cpu_s_per_10k: None,
            bench_cpu_s_per_10k: None,
            bench_cores: 0.1,
            statements: Vec::new(),
            instances: instances
                .iter()
                .map(|(rss, cpu)| InstanceCost {
                    peak_rss_mib: *rss,
                    cpu_s_per_10k: Some(*cpu),
                    cores: 0.25,
                })
                .collect(),
        }
    }

    #[test]
    fn table_shows_the_trigger_cost_the_instances_and_the_notify_source() {
        let report = Report {
            durable: false,
            source: "notify".into(),
            instances: 2,
            machine: Machine {
                cores: 2,
                cpu: "cpu".into(),
                kernel: "6".into(),
                memory_gib: 1.0,
                postgres: "PostgreSQL 15".into(),
                server: "throwaway cluster".into(),
                fsync: "off".into(),
                synchronous_commit: "on".into(),
                load_average: Some(1.0),
                pg_stat_statements: true,
            },
            settings: Settings {
                quick: true,
                events: 5_000,
                fanout_events: 500,
                backfill_events: 5_000,
                window_s: 1.5,
                writers: 4,
                relay_settings: Vec::new(),
            },
            baseline: Some(Baseline {
                writers: 4,
                inserts_per_sec: 20_000.0,
                inserts_per_sec_batched: 200_000.0,
                batch: 100,
                inserts_per_sec_with_notify_trigger: Some(12_000.0),
                inserts_per_sec_batched_with_notify_trigger: None,
                notify_trigger_ratio: Some(0.6),
                notify_trigger_ratio_batched: None,
            }),
            drain: Some(Drain {
                events: 5_000,
                deliveries_per_sec: 10_000.0,
                first_delivery_ms: Some(80.0),
                delivered_s: 0.5,
                recorded_s: 0.5,
                preload_s: 0.1,
                duplicates: 0,
                postgres_cpu_us_per_delivery: Some(14.0),
                cost: cost(&[(30.0, 0.1), (20.0, 0.05)]),
            }),
            backfill: None,
            live: None,
            fanout: None,
            retries: None,
            fairness: None,
            tenants: None,
            slow: None,
            portal: None,
            publish: Some(Publish {
                writers: 4,
                inserts_per_sec: 30_000.0,
                wal_bytes_per_event: Some(412.3),
                postgres_cpu_us_per_event: Some(40.25),
                table_inserts_per_sec: 20_000.0,
                table_wal_bytes_per_event: Some(824.6),
                table_postgres_cpu_us_per_event: None,
                decode_cpu_us_per_event: Some(3.04),
                table_decode_cpu_us_per_event: Some(9.96),
                inserts_ratio: Some(1.5),
                wal_ratio: Some(0.5),
            }),
            elapsed_s: 10.0,
        };
        let table = report.table();
        for expected in [
            "source notify, 2 relay instances",
            "  with outbox_wake         12,000 inserts/s  0.60 × without",
            "  with outbox_wake                        -      ",
            "summed over its instances",
            "    instance 1: relay  0.10 (0.25), peak RSS 30.0 MiB",
            "    instance 2: relay  0.05 (0.25), peak RSS 20.0 MiB",
            "duplicates (a webhook-id received again at an endpoint that had answered it 2xx): drain 0",
            "  drain               0.004 statements   1009 WAL B  (all of the relay's: 0.007 statements, 1583 WAL B)",
            "publish, 4 writers, no relay: walhook.publish() 30,000 events/s, 412 WAL B, 40.2 µs PostgreSQL CPU \
             per event (decoding it 3.0 µs); INSERT INTO walhook.outbox 20,000 events/s, 825 WAL B, - µs \
             (decoding 10.0 µs); 1.50× the rate, 0.50× the WAL",
        ] {
            assert!(table.contains(expected), "{expected:?} not in\n{table}");
        }
        // RSS and CPU summed over the instances in the scenario's row
        assert!(table.contains("50.0      0.15"), "{table}");
    }

    #[test]
    fn formats_numbers() {
        assert_eq!(thousands(0.4), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1234.6), "1,235");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
        assert_eq!(thousands(-4321.0), "-4,321");
        assert_eq!(short(2.345), "2.3");
        assert_eq!(short(1234.0), "1,234");
        assert_eq!(opt(None, 2), "-");
        assert_eq!(opt(Some(1.234), 2), "1.23");
    }
}
