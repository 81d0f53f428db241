//! Per-endpoint limits: a token bucket for `rate_limit` and a circuit breaker.
//!
//! Both are small state machines driven by an explicit `now`, so they are tested without clocks. Neither
//! ever makes a job wait in memory: dispatch asks them whether a request may go *now*, and if not, parks the
//! delivery in `walhook.deliveries` until the returned instant (a skipped request consumes no attempt).

use std::time::{Duration, Instant};

/// Deliveries per second with a burst of one second's worth (at least one).
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, now: Instant) -> TokenBucket {
        let burst = rate.max(1.0);
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes a token, or says how long until one is available.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }

    /// Whole tokens available now (how many deliveries the scheduler may claim for this endpoint).
    pub fn available(&mut self, now: Instant) -> usize {
        self.refill(now);
        self.tokens.floor() as usize
    }
}

/// Breaker states as shown in `walhook.endpoint_health`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// Breaker settings.
#[derive(Clone, Copy, Debug)]
pub struct BreakerPolicy {
    /// Consecutive failed attempts that open the breaker (provided at least half of the last 20 failed).
    pub threshold: u32,
    /// First cool-down; doubles after each failed probe, up to `max_cooldown`.
    pub cooldown: Duration,
    pub max_cooldown: Duration,
}

/// What the breaker says about sending now.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Send.
    Go,
    /// Send: this request is the probe of a half-open breaker.
    Probe,
    /// Do not send before this instant.
    Wait(Instant),
}

/// Outcomes the breaker remembers to tell a failing endpoint from one failing at random.
const RECENT: u32 = 20;

#[derive(Debug)]
pub struct Breaker {
    state: BreakerState,
    consecutive_failures: u32,
    /// The last `RECENT` outcomes, newest in bit 0 (1 = failure), and how many of them there are.
    recent: u32,
    seen: u32,
    open_until: Instant,
    cooldown: Duration,
    probe_in_flight: bool,
}

impl Breaker {
    pub fn new(now: Instant) -> Breaker {
        Breaker {
            state: BreakerState::Closed,
            consecutive_failures: 0,
            recent: 0,
            seen: 0,
            open_until: now,
            cooldown: Duration::ZERO,
            probe_in_flight: false,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// May a request go now? An open breaker turns half-open when its cool-down has passed, and then lets
    /// exactly one probe through.
    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.state {
            BreakerState::Closed => Admission::Go,
            BreakerState::Open if now < self.open_until => Admission::Wait(self.open_until),
            BreakerState::Open | BreakerState::HalfOpen => {
                if self.probe_in_flight {
                    // one probe at a time; look again after a short while
                    return Admission::Wait(now + Duration::from_secs(1));
                }
                self.state = BreakerState::HalfOpen;
                self.probe_in_flight = true;
                Admission::Probe
            }
        }
    }

    /// A request that was admitted was not sent after all (for example parked by another limit).
    pub fn release(&mut self, admission: &Admission) {
        if *admission == Admission::Probe {
            self.probe_in_flight = false;
        }
    }

    fn remember(&mut self, failed: bool) {
        let mask = (1u32 << RECENT) - 1;
        self.recent = ((self.recent << 1) | u32::from(failed)) & mask;
        self.seen = (self.seen + 1).min(RECENT);
    }

    /// At least half of the recent outcomes failed: the endpoint is failing, not unlucky. At thousands of
    /// deliveries per second, an endpoint that fails one request in ten at random sees `threshold` failures
    /// in a row every few seconds; that alone must not park all its traffic for a cool-down.
    fn mostly_failing(&self) -> bool {
        self.recent.count_ones() * 2 >= self.seen
    }

    pub fn success(&mut self) {
        self.remember(false);
        self.state = BreakerState::Closed;
        self.consecutive_failures = 0;
        self.cooldown = Duration::ZERO;
        self.probe_in_flight = false;
    }

    pub fn failure(&mut self, policy: &BreakerPolicy, now: Instant) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.remember(true);
        let reopen = match self.state {
            BreakerState::HalfOpen => {
                self.probe_in_flight = false;
                true
            }
            BreakerState::Closed => {
                self.consecutive_failures >= policy.threshold.max(1) && self.mostly_failing()
            }
            BreakerState::Open => false,
        };
        if reopen {
            self.cooldown = if self.cooldown.is_zero() {
                policy.cooldown
            } else {
                (self.cooldown * 2).min(policy.max_cooldown)
            };
            self.state = BreakerState::Open;
            self.open_until = now + self.cooldown;
        }
    }

    /// Until when requests are refused (meaningful when open).
    pub fn open_until(&self) -> Instant {
        self.open_until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_failures_in_a_row_do_not_open_a_mostly_healthy_endpoint() {
        let policy = BreakerPolicy {
            threshold: 5,
            cooldown: Duration::from_secs(30),
            max_cooldown: Duration::from_secs(600),
        };
        let now = Instant::now();
        let mut b = Breaker::new(now);
        for _ in 0..15 {
            b.success();
        }
        for _ in 0..5 {
            b.failure(&policy, now);
        }
        assert_eq!(b.state(), BreakerState::Closed, "5 of the last 20 failed");
        for _ in 0..5 {
            b.failure(&policy, now);
        }
        assert_eq!(b.state(), BreakerState::Open, "10 of the last 20 failed");
    }

    #[test]
    fn bucket_allows_the_rate_and_says_how_long_to_wait() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2.0, t0);
        assert!(b.take(t0).is_ok());
        assert!(b.take(t0).is_ok());
        let wait = b.take(t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(450) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        assert!(b.take(t0 + Duration::from_millis(500)).is_ok());
        assert_eq!(
            b.available(t0 + Duration::from_secs(10)),
            2,
            "burst is capped"
        );
        let mut slow = TokenBucket::new(0.5, t0);
        assert!(slow.take(t0).is_ok());
        assert_eq!(slow.take(t0).unwrap_err(), Duration::from_secs(2));
    }

    #[test]
    fn breaker_opens_probes_and_closes() {
        let policy = BreakerPolicy {
            threshold: 3,
            cooldown: Duration::from_secs(10),
            max_cooldown: Duration::from_secs(35),
        };
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        for _ in 0..2 {
            assert_eq!(b.admit(t0), Admission::Go);
            b.failure(&policy, t0);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.failure(&policy, t0);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(
            b.admit(t0 + Duration::from_secs(5)),
            Admission::Wait(t0 + Duration::from_secs(10))
        );
        // after the cool-down exactly one probe goes
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.admit(t1), Admission::Probe);
        assert!(matches!(b.admit(t1), Admission::Wait(_)));
        // a failed probe re-opens for twice as long
        b.failure(&policy, t1);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.open_until(), t1 + Duration::from_secs(20));
        let t2 = t1 + Duration::from_secs(20);
        assert_eq!(b.admit(t2), Admission::Probe);
        b.failure(&policy, t2);
        assert_eq!(b.open_until(), t2 + Duration::from_secs(35), "capped");
        // a successful probe closes it
        let t3 = t2 + Duration::from_secs(35);
        assert_eq!(b.admit(t3), Admission::Probe);
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.consecutive_failures(), 0);
        assert_eq!(b.admit(t3), Admission::Go);
    }

    #[test]
    fn a_released_probe_lets_the_next_one_go() {
        let policy = BreakerPolicy {
            threshold: 1,
            cooldown: Duration::from_secs(1),
            max_cooldown: Duration::from_secs(1),
        };
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        b.failure(&policy, t0);
        let t1 = t0 + Duration::from_secs(1);
        let probe = b.admit(t1);
        assert_eq!(probe, Admission::Probe);
        b.release(&probe);
        assert_eq!(b.admit(t1), Admission::Probe);
    }
}
