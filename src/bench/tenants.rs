//! The multi-tenant scenarios: is one tenant's trouble everyone's?
//!
//! - `fairness`: tenant B publishes at 100/s to a healthy endpoint, alone; then beside tenant A's backlog of
//!   `--events ÷ 2` pending deliveries to an endpoint that answers after a second; then while A commits
//!   another burst of that size. B's commit-to-receive p99 beside the backlog is compared with B's alone:
//!   the relay is fair when the ratio stays within 2.
//! - `tenants`: 1,000 tenants with an endpoint each, 1 % of them broken (half answer 500 to everything,
//!   half never answer, with `delivery.timeout = 5s`), events spread over all tenants: at 1,000/s, then at
//!   full speed. The healthy tenants' deliveries per second and p99 are what counts.
//!
//! Both use one loopback receiver with a path per endpoint, and match arrivals to commits by `webhook-id`
//! like the other scenarios.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::report::{Fairness, Tenants, TenantsPhase};
use super::server::Scratch;
use super::stats::{per_sec, ratio};
use super::workload::{self, Pace, Tenancy};
use super::{db_err, Bench, BenchError, Latency, Relays};
use crate::receiver::{Received, Receiver, Reply};

/// Tenant B's pace in `fairness`.
const FAIR_RATE: f64 = 100.0;
/// How long tenant A's slow endpoint takes to answer.
const SLOW: Duration = Duration::from_secs(1);
/// Tenants of the `tenants` scenario, and how many of them have a broken endpoint.
const TENANTS: u32 = 1_000;
const BROKEN: u32 = 10;
/// The offered rate of the `tenants` scenario's paced phase.
const TENANTS_RATE: f64 = 1_000.0;

/// A loopback receiver with one path per endpoint, counting first 2xx answers per path.
struct PathReceiver {
    inner: Receiver,
    /// 2xx answers per endpoint index (a duplicate is counted too: `duplicates` tells them apart).
    ok: Arc<Vec<AtomicU64>>,
}

impl PathReceiver {
    /// Registers `n` endpoints `/<scenario>/<i>` (tenant `tenant(i)`, every event type) and answers with
    /// `answer(i)`.
    async fn start(
        scratch: &Scratch,
        n: u32,
        tenant: impl Fn(u32) -> String,
        answer: impl Fn(u32) -> Reply + Send + Sync + 'static,
    ) -> Result<PathReceiver, BenchError> {
        let inner = Receiver::start().await.map_err(|source| BenchError::Io {
            what: "starting the loopback receiver".into(),
            source,
        })?;
        inner.set_record_bodies(false);
        let prefix = format!("/{}/", scratch.scenario.name());
        let ok: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
        let counts = ok.clone();
        let strip = prefix.clone();
        inner.set_responder(move |request: &Received, _attempt| {
            let Some(i) = request
                .path
                .strip_prefix(&strip)
                .and_then(|i| i.parse::<u32>().ok())
            else {
                return Reply::Status(404);
            };
            let reply = answer(i);
            if matches!(reply, Reply::Status(s) | Reply::Delay(_, s) if (200..300).contains(&s)) {
                if let Some(c) = counts.get(i as usize) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
            reply
        });
        let urls: Vec<String> = (0..n).map(|i| inner.url(&format!("{prefix}{i}"))).collect();
        let tenants: Vec<String> = (0..n).map(tenant).collect();
        let rows = scratch
            .client
            .query(
                "/* walhook-bench */ insert into walhook.endpoints (url, tenant, description)
                 select u, t, 'walhook bench' from unnest($1::text[], $2::text[]) as x(u, t)
                 returning url, secret",
                &[&urls, &tenants],
            )
            .await
            .map_err(db_err("registering the endpoints"))?;
        for row in rows {
            let url: String = row.get(0);
            let path = url
                .splitn(4, '/')
                .nth(3)
                .map(|p| format!("/{p}"))
                .unwrap_or_default();
            inner.set_secret(&path, row.get::<_, &str>(1));
        }
        Ok(PathReceiver { inner, ok })
    }

    fn ok(&self, i: u32) -> u64 {
        self.ok[i as usize].load(Ordering::Relaxed)
    }

    fn ok_where(&self, keep: impl Fn(u32) -> bool) -> u64 {
        (0..self.ok.len() as u32)
            .filter(|i| keep(*i))
            .map(|i| self.ok(i))
            .sum()
    }

    /// Waits until `count()` reaches `target`.
    async fn wait(
        &self,
        count: impl Fn(&Self) -> u64,
        target: u64,
        deadline: Instant,
        relays: &mut Relays,
        what: &str,
    ) -> Result<(), BenchError> {
        loop {
            let n = count(self);
            if n >= target {
                return Ok(());
            }
            relays.check()?;
            if Instant::now() > deadline {
                return Err(BenchError::Stalled(format!(
                    "only {n} of {target} {what} arrived before the deadline; the relay may be stuck"
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Commit → first 2xx arrival of each committed event whose endpoint index passes `keep`.
    fn latency(
        &self,
        commits: &workload::Commits,
        endpoint_of: impl Fn(usize) -> u32,
        keep: impl Fn(u32) -> bool,
    ) -> Option<Latency> {
        let committed: HashMap<u128, SystemTime> = commits
            .stamps
            .iter()
            .enumerate()
            .filter(|(n, _)| keep(endpoint_of(*n)))
            .map(|(_, s)| *s)
            .collect();
        let mut seen = std::collections::HashSet::new();
        let mut ms = Vec::with_capacity(committed.len());
        for r in self.inner.received() {
            if !(200..300).contains(&r.status_sent) {
                continue;
            }
            let Some(key) = workload::uid_key(&r.webhook_id) else {
                continue;
            };
            if let Some(at) = committed.get(&key) {
                if seen.insert(key) {
                    ms.push(
                        r.arrived
                            .duration_since(*at)
                            .unwrap_or_default()
                            .as_secs_f64()
                            * 1000.0,
                    );
                }
            }
        }
        Latency::from_ms(ms)
    }

    async fn finish(self) -> Result<(), BenchError> {
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
        Ok(())
    }
}

impl Bench {
    /// Writers at `pace` for one window, committing `tenancy`'s events.
    async fn tenant_writers(
        &self,
        scratch: &Scratch,
        pace: Pace,
        tenancy: Tenancy,
        window: Duration,
    ) -> Result<workload::Commits, BenchError> {
        let writers = match pace {
            // a hundred events a second need no more than one connection
            Pace::PerSecond(r) if r <= FAIR_RATE => 1,
            _ => self.plan.writers,
        };
        workload::write(
            &scratch.db,
            writers,
            pace,
            false,
            window,
            Arc::default(),
            &tenancy,
        )
        .await
    }

    async fn count(
        &self,
        scratch: &Scratch,
        sql: &str,
        what: &'static str,
    ) -> Result<u64, BenchError> {
        let n: i64 = scratch
            .client
            .query_one(sql, &[])
            .await
            .map_err(db_err(what))?
            .get(0);
        Ok(n as u64)
    }

    pub(super) async fn fairness(&self, scratch: &Scratch) -> Result<Fairness, BenchError> {
        // endpoint 0 is tenant A's (slow), endpoint 1 tenant B's
        let receiver = PathReceiver::start(
            scratch,
            2,
            |i| if i == 0 { "a".into() } else { "b".into() },
            |i| {
                if i == 0 {
                    Reply::Delay(SLOW, 200)
                } else {
                    Reply::Status(200)
                }
            },
        )
        .await?;
        let mut relays = self.start_relays(scratch).await?;
        let backlog = (self.plan.events / 2).max(1);
        let b = || Tenancy::One("b".into());
        let all = |_: usize| 1;
        let only_b = |i: u32| i == 1;

        // B alone
        let alone = self
            .tenant_writers(scratch, Pace::PerSecond(FAIR_RATE), b(), self.plan.window)
            .await?;
        let deadline = Instant::now() + self.plan.deadline(alone.events);
        receiver
            .wait(
                |r| r.ok(1),
                alone.events,
                deadline,
                &mut relays,
                "B's deliveries",
            )
            .await?;
        let b_alone = receiver.latency(&alone, all, only_b);
        eprintln!(
            "bench:   B alone at {FAIR_RATE:.0}/s: p99 {}",
            p99(b_alone.as_ref())
        );

        // A's backlog: committed, then every delivery of it recorded (parked behind its slow endpoint)
        let committed = Instant::now();
        workload::preload(&scratch.db, self.plan.writers, backlog, Some("a")).await?;
        let deadline = Instant::now() + self.plan.deadline(backlog);
        loop {
            let rows = self
                .count(
                    scratch,
                    "/* walhook-bench */ select count(*) from walhook.deliveries where tenant = 'a'",
                    "counting tenant A's deliveries",
                )
                .await?;
            if rows >= backlog {
                break;
            }
            relays.check()?;
            if Instant::now() > deadline {
                return Err(BenchError::Stalled(format!(
                    "only {rows} of tenant A's {backlog} deliveries were recorded before the deadline"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ingest = committed.elapsed();
        let pending_sql =
            "/* walhook-bench */ select count(*) from walhook.deliveries where tenant = 'a' and status = 'pending'";
        let pending = self
            .count(
                scratch,
                pending_sql,
                "counting tenant A's pending deliveries",
            )
            .await?;
        eprintln!(
            "bench:   A's backlog of {backlog} recorded {:.1} s after its commit; {pending} pending",
            ingest.as_secs_f64()
        );

        // B beside A's backlog
        let before = self.server.snapshot(scratch, Some(&relays)).await?;
        let a_before = receiver.ok(0);
        let b_before = receiver.ok(1);
        let beside = self
            .tenant_writers(scratch, Pace::PerSecond(FAIR_RATE), b(), self.plan.window)
            .await?;
        let a_during = receiver.ok(0) - a_before;
        let deadline = Instant::now() + self.plan.deadline(beside.events);
        receiver
            .wait(
                |r| r.ok(1),
                b_before + beside.events,
                deadline,
                &mut relays,
                "B's deliveries",
            )
            .await?;
        let after = self.server.snapshot(scratch, Some(&relays)).await?;
        let cost = super::server::cost(&before, &after, &relays, beside.events);
        let b_beside = receiver.latency(&beside, all, only_b);
        eprintln!(
            "bench:   B beside A's backlog: p99 {}; A received {a_during} meanwhile",
            p99(b_beside.as_ref())
        );

        // B while A commits another burst
        let b_before = receiver.ok(1);
        let writers =
            self.tenant_writers(scratch, Pace::PerSecond(FAIR_RATE), b(), self.plan.window);
        let burst = async {
            tokio::time::sleep(self.plan.window / 5).await;
            workload::preload(&scratch.db, self.plan.writers, backlog, Some("a")).await
        };
        let (during, burst) = tokio::join!(writers, burst);
        let (during, _) = (during?, burst?);
        let deadline = Instant::now() + self.plan.deadline(during.events + backlog);
        receiver
            .wait(
                |r| r.ok(1),
                b_before + during.events,
                deadline,
                &mut relays,
                "B's deliveries",
            )
            .await?;
        let b_during_burst = receiver.latency(&during, all, only_b);
        eprintln!(
            "bench:   B while A commits a burst of {backlog}: p99 {}",
            p99(b_during_burst.as_ref())
        );
        let peak_rss_mib = relays.peak_rss_mib_sum();
        relays.stop().await?;
        receiver.finish().await?;
        let p99_ratio = b_alone
            .as_ref()
            .zip(b_beside.as_ref())
            .and_then(|(a, b)| ratio(b.p99_ms, a.p99_ms));
        let burst_ratio = b_alone
            .as_ref()
            .zip(b_during_burst.as_ref())
            .and_then(|(a, b)| ratio(b.p99_ms, a.p99_ms));
        Ok(Fairness {
            offered_per_sec: FAIR_RATE,
            backlog_events: backlog,
            slow_endpoint_ms: SLOW.as_millis() as u64,
            backlog_recorded_s: ingest.as_secs_f64(),
            backlog_pending: pending,
            backlog_delivered_in_window: a_during,
            b_alone,
            b_beside_backlog: b_beside,
            b_during_burst,
            p99_ratio,
            burst_p99_ratio: burst_ratio,
            peak_rss_mib,
            cost,
        })
    }

    pub(super) async fn tenants(&self, scratch: &Scratch) -> Result<Tenants, BenchError> {
        let broken = |i: u32| i < BROKEN;
        let receiver = PathReceiver::start(scratch, TENANTS, workload::tenant_name, |i| {
            match (i < BROKEN, i % 2) {
                (true, 0) => Reply::Status(500),
                (true, _) => Reply::Hang,
                (false, _) => Reply::Status(200),
            }
        })
        .await?;
        let mut relays = self
            .start_relays_with(scratch, &[("delivery.timeout", "5s")])
            .await?;
        let mut phases = Vec::new();
        for pace in [Pace::PerSecond(TENANTS_RATE), Pace::FullSpeed] {
            let before = self.server.snapshot(scratch, Some(&relays)).await?;
            let healthy_before = receiver.ok_where(|i| !broken(i));
            let commits = self
                .tenant_writers(scratch, pace, Tenancy::Spread(TENANTS), self.plan.window)
                .await?;
            let ended = Instant::now();
            let healthy_in_window = receiver.ok_where(|i| !broken(i)) - healthy_before;
            let healthy_events = commits.tenants.iter().filter(|i| !broken(**i)).count() as u64;
            let deadline = Instant::now() + self.plan.deadline(commits.events);
            receiver
                .wait(
                    |r| r.ok_where(|i| !broken(i)),
                    healthy_before + healthy_events,
                    deadline,
                    &mut relays,
                    "healthy tenants' deliveries",
                )
                .await?;
            let caught_up = ended.elapsed();
            let after = self.server.snapshot(scratch, Some(&relays)).await?;
            let cost = super::server::cost(&before, &after, &relays, commits.events);
            let tenants = commits.tenants.clone();
            let latency = receiver.latency(&commits, |n| tenants[n], |i| !broken(i));
            let phase = TenantsPhase {
                name: super::pace_name(pace),
                offered_per_sec: match pace {
                    Pace::PerSecond(r) => Some(r),
                    Pace::FullSpeed => None,
                },
                committed_per_sec: per_sec(commits.events, commits.elapsed),
                healthy_deliveries_per_sec: per_sec(healthy_in_window, commits.elapsed),
                healthy_latency: latency,
                caught_up_s: caught_up.as_secs_f64(),
                cost,
            };
            eprintln!(
                "bench:   {}: {:.0} committed/s, healthy tenants {:.0} delivered/s, p99 {}",
                phase.name,
                phase.committed_per_sec,
                phase.healthy_deliveries_per_sec,
                p99(phase.healthy_latency.as_ref())
            );
            phases.push(phase);
        }
        let broken_attempts = receiver
            .inner
            .received()
            .iter()
            .filter(|r| {
                r.path
                    .rsplit('/')
                    .next()
                    .and_then(|i| i.parse::<u32>().ok())
                    .is_some_and(broken)
            })
            .count() as u64;
        let peak_rss_mib = relays.peak_rss_mib_sum();
        relays.stop().await?;
        receiver.finish().await?;
        Ok(Tenants {
            tenants: TENANTS,
            broken: BROKEN,
            broken_requests: broken_attempts,
            peak_rss_mib,
            phases,
        })
    }
}

fn p99(l: Option<&Latency>) -> String {
    l.map_or("-".into(), |l| format!("{:.1} ms", l.p99_ms))
}
