//! The `slow` scenario: receivers as real ones are, slow and sometimes hanging.
//!
//! 1,000 endpoints, each of its own tenant and on its own loopback port (so that, as with real customers'
//! hosts, each has a connection pool of its own); each answers after its own latency, drawn once from
//! 50–300 ms, and 2 % of them never answer, so that the relay's `delivery.timeout` (5 s here) ends their
//! requests. Every event goes to exactly one endpoint (its tenant's).
//!
//! - The backlog: `--events ÷ 2` events committed, then the relay started: the healthy endpoints' deliveries
//!   per second until all of them are recorded as succeeded, against the bound
//!   `min(in-flight limit ÷ mean latency, the drain scenario's rate)`: with a request limit of N and requests
//!   taking L on average, no relay delivers more than N ÷ L per second, nor more than it does to a receiver
//!   that answers at once. The relay's peak RSS and its open sockets (sampled) go beside it.
//! - Then writers at `PACED_RATE` for one window, with the hanging endpoints still hanging: the healthy
//!   endpoints' commit-to-arrival p99 (the endpoint's own answer time is not in it: the receiver stamps a
//!   request when it arrives).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::report::Slow;
use super::server::Scratch;
use super::stats::{per_sec, ratio};
use super::tls::BenchTls;
use super::workload::{self, Pace, Tenancy};
use super::{db_err, Bench, BenchError, Drain, Latency, Relays};
use crate::receiver::{Receiver, Reply};

/// Endpoints (one per tenant).
const ENDPOINTS: u32 = 1_000;
/// One endpoint in this many never answers: 2 %.
const HANG_EVERY: u32 = 50;
/// The healthy endpoints' answer times are drawn from this range, in milliseconds.
const LATENCY_MS: (u64, u64) = (50, 300);
/// `delivery.timeout` in this scenario: what a hanging endpoint's request costs.
const TIMEOUT: &str = "5s";
/// The offered rate of the paced phase.
const PACED_RATE: f64 = 2_000.0;
/// How often the relay's sockets are counted.
const SAMPLE: Duration = Duration::from_millis(100);
/// The backlog's arrivals are reported per step of this length (`slow.healthy_per_sec_every_500ms`).
const TIMELINE_STEP: Duration = Duration::from_millis(500);

/// Whether endpoint `i` never answers.
fn hangs(i: u32) -> bool {
    i % HANG_EVERY == HANG_EVERY / 2
}

/// Endpoint `i`'s answer time: drawn from `LATENCY_MS` by a fixed hash of `i`, the same in every run.
fn latency(i: u32) -> Duration {
    // splitmix64
    let mut z = u64::from(i).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let (lo, hi) = LATENCY_MS;
    Duration::from_millis(lo + z % (hi - lo + 1))
}

/// The mean answer time of the healthy endpoints (each gets the same share of the events).
fn mean_latency() -> Duration {
    let healthy: Vec<Duration> = (0..ENDPOINTS).filter(|i| !hangs(*i)).map(latency).collect();
    healthy.iter().sum::<Duration>() / healthy.len().max(1) as u32
}

/// The most requests the relay keeps in flight to these endpoints with `settings` (its configuration keys,
/// later ones winning): the global limit, the events held in memory (a request holds its event), and each
/// endpoint's limit (its tenant's, when lower) times the endpoints.
pub(super) fn in_flight_limit(settings: &[(String, String)]) -> usize {
    let defaults = crate::config::DeliveryConfig::default();
    let value = |key: &str| {
        settings
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.trim().parse::<usize>().ok())
    };
    let concurrency = value("delivery.concurrency").unwrap_or(defaults.concurrency);
    let events = value("delivery.max_in_flight_events").unwrap_or(defaults.max_in_flight_events);
    let endpoint =
        value("delivery.max_in_flight_per_endpoint").unwrap_or(defaults.max_in_flight_per_endpoint);
    let tenant = value("delivery.max_in_flight_per_tenant").unwrap_or((concurrency / 4).max(1));
    concurrency
        .min(events)
        .min(endpoint.min(tenant).max(1) * ENDPOINTS as usize)
        .max(1)
}

/// One receiver per endpoint, counting arrivals at the healthy ones.
struct Endpoints {
    receivers: Vec<Receiver>,
    /// Requests that arrived at healthy endpoints (each is answered 200).
    arrived: Arc<AtomicU64>,
    /// Requests that arrived at hanging endpoints.
    hung: Arc<AtomicU64>,
}

impl Endpoints {
    async fn start(scratch: &Scratch, tls: Option<&BenchTls>) -> Result<Endpoints, BenchError> {
        let arrived = Arc::new(AtomicU64::new(0));
        let hung = Arc::new(AtomicU64::new(0));
        let mut receivers = Vec::with_capacity(ENDPOINTS as usize);
        let path = format!("/{}", scratch.scenario.name());
        for i in 0..ENDPOINTS {
            let receiver = match tls {
                Some(tls) => Receiver::start_tls(tls.server.clone()).await,
                None => Receiver::start().await,
            };
            let receiver = receiver.map_err(|source| BenchError::Io {
                what: "starting a loopback receiver".into(),
                source,
            })?;
            receiver.set_record_bodies(false);
            let (arrived, hung) = (arrived.clone(), hung.clone());
            let answer = latency(i);
            receiver.set_responder(move |_, _| {
                if hangs(i) {
                    hung.fetch_add(1, Ordering::Relaxed);
                    Reply::Hang
                } else {
                    arrived.fetch_add(1, Ordering::Relaxed);
                    Reply::Delay(answer, 200)
                }
            });
            receivers.push(receiver);
        }
        let urls: Vec<String> = receivers.iter().map(|r| r.url(&path)).collect();
        let tenants: Vec<String> = (0..ENDPOINTS).map(workload::tenant_name).collect();
        let secrets: HashMap<String, String> = scratch
            .client
            .query(
                "/* walhook-bench */ insert into walhook.endpoints (url, tenant, description)
                 select u, t, 'walhook bench' from unnest($1::text[], $2::text[]) as x(u, t)
                 returning url, secret",
                &[&urls, &tenants],
            )
            .await
            .map_err(db_err("registering the endpoints"))?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        for (receiver, url) in receivers.iter().zip(&urls) {
            let secret = secrets.get(url).ok_or_else(|| {
                BenchError::Internal(format!("endpoint {url} was not registered"))
            })?;
            receiver.set_secret(&path, secret);
        }
        Ok(Endpoints {
            receivers,
            arrived,
            hung,
        })
    }

    fn arrived(&self) -> u64 {
        self.arrived.load(Ordering::Relaxed)
    }

    /// Waits until `target` requests have arrived at healthy endpoints, counting the relay's sockets; with
    /// `timeline`, also the arrivals per second in each `TIMELINE_STEP` since the call (the relay's requests
    /// in flight are about that rate × the mean latency: where the rate sags, requests were held back).
    async fn wait(
        &self,
        target: u64,
        deadline: Instant,
        relays: &mut Relays,
        sockets: &mut u64,
        mut timeline: Option<&mut Vec<f64>>,
    ) -> Result<(), BenchError> {
        let (start, from) = (Instant::now(), self.arrived());
        let mut step_start = from;
        loop {
            *sockets = (*sockets).max(relays.sockets());
            let n = self.arrived();
            if let Some(rates) = timeline.as_deref_mut() {
                let steps = (start.elapsed().as_secs_f64() / TIMELINE_STEP.as_secs_f64()) as usize;
                while rates.len() < steps {
                    rates.push((n - step_start) as f64 / TIMELINE_STEP.as_secs_f64());
                    step_start = n;
                }
                if n >= target {
                    rates.push(
                        (n - step_start) as f64
                            / (start.elapsed().as_secs_f64()
                                - steps as f64 * TIMELINE_STEP.as_secs_f64())
                            .max(f64::EPSILON),
                    );
                }
            }
            if n >= target {
                return Ok(());
            }
            relays.check()?;
            if Instant::now() > deadline {
                return Err(BenchError::Stalled(format!(
                    "only {n} of {target} deliveries to healthy endpoints arrived before the deadline; the \
                     relay may be stuck"
                )));
            }
            tokio::time::sleep(SAMPLE).await;
        }
    }

    /// Commit → first arrival at a healthy endpoint, per committed event of a healthy endpoint.
    fn latency(&self, commits: &workload::Commits) -> Option<Latency> {
        let committed: HashMap<u128, SystemTime> = commits
            .stamps
            .iter()
            .zip(&commits.tenants)
            .filter(|(_, t)| !hangs(**t))
            .map(|(s, _)| *s)
            .collect();
        let mut first: HashMap<u128, SystemTime> = HashMap::with_capacity(committed.len());
        for (i, receiver) in self.receivers.iter().enumerate() {
            if hangs(i as u32) {
                continue;
            }
            for r in receiver.received() {
                if let Some(key) = workload::uid_key(&r.webhook_id) {
                    if committed.contains_key(&key) {
                        let at = first.entry(key).or_insert(r.arrived);
                        *at = (*at).min(r.arrived);
                    }
                }
            }
        }
        let ms = first
            .iter()
            .map(|(key, arrived)| {
                arrived
                    .duration_since(committed[key])
                    .unwrap_or_default()
                    .as_secs_f64()
                    * 1000.0
            })
            .collect();
        Latency::from_ms(ms)
    }

    async fn finish(self) -> Result<(), BenchError> {
        let (mut bad, mut total) = (0, 0);
        for receiver in self.receivers {
            let received = receiver.received();
            receiver.shutdown().await;
            total += received.len();
            bad += received
                .iter()
                .filter(|r| r.verified == Some(false))
                .count();
        }
        if bad > 0 {
            return Err(BenchError::Unverified { bad, total });
        }
        Ok(())
    }
}

impl Bench {
    pub(super) async fn slow(
        &self,
        scratch: &Scratch,
        drain: Option<&Drain>,
    ) -> Result<Slow, BenchError> {
        let tls = match self.plan.tls {
            true => Some(BenchTls::new()?),
            false => None,
        };
        let endpoints = Endpoints::start(scratch, tls.as_ref()).await?;
        let events = (self.plan.events / 2).max(u64::from(ENDPOINTS));
        let tenancy = Tenancy::Spread(ENDPOINTS);
        let preload =
            workload::preload_as(&scratch.db, self.plan.writers, events, &tenancy).await?;
        // event n is endpoint (n mod ENDPOINTS)'s
        let healthy = (0..events)
            .filter(|n| !hangs((n % u64::from(ENDPOINTS)) as u32))
            .count() as u64;
        eprintln!(
            "bench:   {events} events for {ENDPOINTS} endpoints committed in {:.1} s; starting the relay",
            preload.as_secs_f64()
        );
        let before = self.server.snapshot(scratch, None).await?;
        let ca_file = tls.as_ref().map(|t| t.ca_file().display().to_string());
        let mut scenario_settings = vec![("delivery.timeout", TIMEOUT)];
        if let Some(ca_file) = &ca_file {
            scenario_settings.push(("delivery.ca_file", ca_file.as_str()));
        }
        let mut relays = self.start_relays_with(scratch, &scenario_settings).await?;
        let spawned = relays.spawned();
        let mut sockets = 0;
        let deadline = Instant::now() + self.plan.deadline(events);
        let mut timeline = Vec::new();
        endpoints
            .wait(
                healthy,
                deadline,
                &mut relays,
                &mut sockets,
                Some(&mut timeline),
            )
            .await?;
        super::wait_recorded(scratch, healthy, deadline, &mut relays).await?;
        let recorded = super::since(spawned);
        let after = self.server.snapshot(scratch, Some(&relays)).await?;
        let cost = super::server::cost(&before, &after, &relays, healthy);
        let deliveries_per_sec = per_sec(healthy, recorded);

        let mut settings: Vec<(String, String)> = super::relay_defaults();
        settings.extend(
            scenario_settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        settings.extend(self.plan.relay_settings.iter().cloned());
        let limit = in_flight_limit(&settings);
        let mean = mean_latency();
        let by_latency = limit as f64 / mean.as_secs_f64();
        let drain_rate = drain.map(|d| d.deliveries_per_sec);
        let bound = drain_rate.map_or(by_latency, |d| by_latency.min(d));
        eprintln!(
            "bench:   backlog: {deliveries_per_sec:.0} healthy deliveries/s, bound {bound:.0}/s ({limit} in \
             flight ÷ {} ms{}), peak RSS {:.0} MiB, {sockets} sockets",
            mean.as_millis(),
            drain_rate.map_or(String::new(), |d| format!(", drain {d:.0}/s")),
            relays.peak_rss_mib_sum()
        );

        // paced, beside the hanging endpoints
        let arrived_before = endpoints.arrived();
        let commits = workload::write(
            &scratch.db,
            self.plan.writers,
            Pace::PerSecond(PACED_RATE),
            false,
            self.plan.window,
            Arc::default(),
            &tenancy,
        )
        .await?;
        let paced_healthy = commits.tenants.iter().filter(|t| !hangs(**t)).count() as u64;
        let deadline = Instant::now() + self.plan.deadline(commits.events);
        endpoints
            .wait(
                arrived_before + paced_healthy,
                deadline,
                &mut relays,
                &mut sockets,
                None,
            )
            .await?;
        let healthy_latency = endpoints.latency(&commits);
        eprintln!(
            "bench:   {PACED_RATE:.0}/s beside the hanging endpoints: healthy p99 {}",
            healthy_latency
                .as_ref()
                .map_or("-".into(), |l| format!("{:.1} ms", l.p99_ms))
        );
        let peak_rss_mib = relays.peak_rss_mib_sum();
        relays.stop().await?;
        let hanging_requests = endpoints.hung.load(Ordering::Relaxed);
        endpoints.finish().await?;
        Ok(Slow {
            endpoints: ENDPOINTS,
            tls: tls.is_some(),
            hanging_endpoints: (0..ENDPOINTS).filter(|i| hangs(*i)).count() as u32,
            latency_ms: [LATENCY_MS.0, LATENCY_MS.1],
            timeout_s: 5.0,
            events,
            healthy_deliveries: healthy,
            deliveries_per_sec,
            in_flight_limit: limit,
            mean_latency_ms: mean.as_secs_f64() * 1000.0,
            bound_per_sec: bound,
            bound_by_latency_per_sec: by_latency,
            drain_per_sec: drain_rate,
            ratio_to_bound: ratio(deliveries_per_sec, bound),
            recorded_s: recorded.as_secs_f64(),
            peak_rss_mib,
            peak_sockets: sockets,
            hanging_requests,
            healthy_per_sec_every_500ms: timeline,
            paced_per_sec: PACED_RATE,
            healthy_p99_ms: healthy_latency.as_ref().map(|l| l.p99_ms),
            healthy_latency,
            cost,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_as_described() {
        let hanging = (0..ENDPOINTS).filter(|i| hangs(*i)).count();
        assert_eq!(hanging, 20, "2 % of 1,000");
        let ms: Vec<u64> = (0..ENDPOINTS)
            .map(|i| latency(i).as_millis() as u64)
            .collect();
        assert!(ms.iter().all(|m| (50..=300).contains(m)));
        // spread over the whole range, and the same in every run
        assert!(ms.iter().any(|m| *m < 60) && ms.iter().any(|m| *m > 290));
        assert_eq!(latency(7), latency(7));
        let mean = mean_latency().as_millis();
        assert!((160..=190).contains(&mean), "{mean}");
    }

    #[test]
    fn the_in_flight_limit_is_the_tightest_of_the_limits() {
        let set = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let defaults = crate::config::DeliveryConfig::default();
        assert_eq!(
            in_flight_limit(&[]),
            defaults.concurrency.min(defaults.max_in_flight_events)
        );
        assert_eq!(
            in_flight_limit(&set(&[
                ("delivery.concurrency", "100000"),
                ("delivery.max_in_flight_events", "100000"),
                ("delivery.max_in_flight_per_endpoint", "4"),
            ])),
            4_000
        );
        // the last setting wins, as in the relay's environment
        assert_eq!(
            in_flight_limit(&set(&[
                ("delivery.concurrency", "10"),
                ("delivery.concurrency", "500"),
                ("delivery.max_in_flight_events", "100000"),
            ])),
            500
        );
    }
}
