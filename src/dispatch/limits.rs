//! Per-endpoint limits: a token bucket for `rate_limit` and a circuit breaker.
//!
//! Both are small state machines driven by an explicit `now`, so they are tested without clocks. Neither
//! ever makes a job wait in memory: dispatch asks them whether a request may go *now*, and if not, parks the
//! delivery in `walhook.deliveries` until the returned instant (a skipped request consumes no attempt).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The longest a rate limit makes a delivery wait for its token.
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

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
            // a rate from SQL is at least 0.001/s; the cap keeps any other value from overflowing
            let wait = (1.0 - self.tokens) / self.rate;
            Err(Duration::try_from_secs_f64(wait).map_or(MAX_WAIT, |w| w.min(MAX_WAIT)))
        }
    }

    /// How long until a token is available (`None`: now), without taking it.
    pub fn wait(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        (self.tokens < 1.0).then(|| {
            let wait = (1.0 - self.tokens) / self.rate;
            Duration::try_from_secs_f64(wait).map_or(MAX_WAIT, |w| w.min(MAX_WAIT))
        })
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

    pub fn parse(s: &str) -> Option<BreakerState> {
        match s {
            "closed" => Some(BreakerState::Closed),
            "open" => Some(BreakerState::Open),
            "half_open" => Some(BreakerState::HalfOpen),
            _ => None,
        }
    }
}

/// Breaker settings.
#[derive(Clone, Copy, Debug)]
pub struct BreakerPolicy {
    /// Consecutive failed attempts that open the breaker (provided nearly all recent attempts failed).
    pub threshold: u32,
    /// First cool-down; doubles after each round of failed probes, up to `max_cooldown`.
    pub cooldown: Duration,
    pub max_cooldown: Duration,
}

/// What the breaker says about sending now.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Send.
    Go,
    /// Send: this request is one of a half-open breaker's probes.
    Probe,
    /// Do not send before this instant.
    Wait(Instant),
}

/// A change of state worth a log line and a write to `walhook.endpoint_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Opened after `failed` of the last `of` attempts failed; probes again after `cooldown`.
    Opened {
        failed: u32,
        of: u32,
        cooldown: Duration,
    },
    /// Every probe of a round failed: open again, for `cooldown`.
    Reopened { cooldown: Duration },
    /// A probe succeeded.
    Closed,
}

/// Outcomes the breaker remembers. With this many, an endpoint that answers half of its requests at
/// random shows `OPEN_PERCENT` failures about once in 10^9 windows: it keeps flowing.
const RECENT: u32 = 50;
/// The breaker is for an endpoint that is down (refusing, timing out, failing nearly everything), never for
/// one that answers a good share of its requests: at least this share of the remembered outcomes must have
/// failed before it opens. Below it, an endpoint's throughput falls only in proportion to its failures.
const OPEN_PERCENT: u32 = 90;
/// Requests a half-open breaker lets through per round; the first success closes it. More than one, so
/// that one unlucky request (say, a delivery the receiver always refuses) does not keep a working endpoint
/// shut for a whole cool-down.
pub const PROBES: u32 = 3;

#[derive(Debug)]
pub struct Breaker {
    state: BreakerState,
    consecutive_failures: u32,
    /// The last `RECENT` outcomes, newest in bit 0 (1 = failure), and how many of them there are.
    recent: u64,
    seen: u32,
    open_until: Instant,
    cooldown: Duration,
    /// When the current run of failures began, and whether a retry (a delivery that had failed before) is
    /// among them.
    streak_began: Instant,
    retry_failed: bool,
    /// Probes admitted in the current half-open round, and those still unanswered.
    probes_started: u32,
    probes_in_flight: u32,
    /// When the state last changed (wall clock, to compare with other instances' changes in SQL).
    changed_at: SystemTime,
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
            streak_began: now,
            retry_failed: false,
            probes_started: 0,
            probes_in_flight: 0,
            changed_at: UNIX_EPOCH,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// When the state last changed (`UNIX_EPOCH` if it never did).
    pub fn changed_at(&self) -> SystemTime {
        self.changed_at
    }

    /// May a request go now? An open breaker turns half-open when its cool-down has passed, and then lets
    /// `PROBES` requests through.
    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.state {
            BreakerState::Closed => Admission::Go,
            BreakerState::Open if now < self.open_until => Admission::Wait(self.open_until),
            BreakerState::Open | BreakerState::HalfOpen => {
                if self.state == BreakerState::Open {
                    // a new round of probes
                    self.state = BreakerState::HalfOpen;
                    self.probes_started = 0;
                    self.probes_in_flight = 0;
                }
                if self.probes_started >= PROBES {
                    // the round's probes are out; look again after a short while
                    return Admission::Wait(now + Duration::from_secs(1));
                }
                self.probes_started += 1;
                self.probes_in_flight += 1;
                Admission::Probe
            }
        }
    }

    /// How many requests may start now: all of them when closed, the probes left when half-open (or when
    /// the cool-down is over), none while open.
    pub fn room(&self, now: Instant) -> usize {
        match self.state {
            BreakerState::Closed => usize::MAX,
            BreakerState::Open if now < self.open_until => 0,
            BreakerState::Open => PROBES as usize,
            BreakerState::HalfOpen => PROBES.saturating_sub(self.probes_started) as usize,
        }
    }

    /// A request that was admitted was not sent after all (for example parked by another limit).
    pub fn release(&mut self, admission: &Admission) {
        if *admission == Admission::Probe {
            self.probes_started = self.probes_started.saturating_sub(1);
            self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
        }
    }

    fn remember(&mut self, failed: bool) {
        let mask = (1u64 << RECENT) - 1;
        self.recent = ((self.recent << 1) | u64::from(failed)) & mask;
        self.seen = (self.seen + 1).min(RECENT);
    }

    /// The endpoint is down, not unlucky, and not refusing particular deliveries: nearly all of the recent
    /// outcomes failed, and the failures are not only new deliveries. A receiver that fails the first
    /// request of every delivery and accepts its retry fails every new delivery of a burst in a row, just as
    /// a receiver that is down does; the two differ once a retry fails too, or once the failures have gone
    /// on for a whole cool-down.
    fn down(&self, policy: &BreakerPolicy, now: Instant) -> bool {
        self.consecutive_failures >= policy.threshold.max(1)
            && self.recent.count_ones() * 100 >= self.seen * OPEN_PERCENT
            && (self.retry_failed
                || now.saturating_duration_since(self.streak_began) >= policy.cooldown)
    }

    pub fn success(&mut self) -> Option<Transition> {
        self.remember(false);
        self.consecutive_failures = 0;
        if self.state == BreakerState::Closed {
            return None;
        }
        self.state = BreakerState::Closed;
        self.cooldown = Duration::ZERO;
        self.probes_started = 0;
        self.probes_in_flight = 0;
        self.changed_at = SystemTime::now();
        Some(Transition::Closed)
    }

    /// A failed attempt that began at `began`; `retry` when the delivery had failed before.
    pub fn failure(
        &mut self,
        policy: &BreakerPolicy,
        now: Instant,
        began: Instant,
        retry: bool,
    ) -> Option<Transition> {
        if self.consecutive_failures == 0 {
            self.streak_began = began;
            self.retry_failed = false;
        }
        self.streak_began = self.streak_began.min(began);
        self.retry_failed |= retry;
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.remember(true);
        let transition = match self.state {
            BreakerState::HalfOpen => {
                self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
                // the round is over when every probe was sent and answered, and none succeeded
                if self.probes_in_flight > 0 || self.probes_started < PROBES {
                    return None;
                }
                self.cooldown = (self.cooldown * 2).clamp(policy.cooldown, policy.max_cooldown);
                Transition::Reopened {
                    cooldown: self.cooldown,
                }
            }
            BreakerState::Closed if self.down(policy, now) => {
                self.cooldown = policy.cooldown;
                Transition::Opened {
                    failed: self.recent.count_ones(),
                    of: self.seen,
                    cooldown: self.cooldown,
                }
            }
            BreakerState::Closed | BreakerState::Open => return None,
        };
        self.state = BreakerState::Open;
        self.open_until = now + self.cooldown;
        self.changed_at = SystemTime::now();
        Some(transition)
    }

    /// Until when requests are refused (meaningful when open).
    pub fn open_until(&self) -> Instant {
        self.open_until
    }

    /// The state another instance wrote to SQL, if it changed after this one's: an open breaker stays open
    /// until `open_until` (wall clock), a closed one closes here too. The outcomes remembered here are kept.
    pub fn adopt(
        &mut self,
        state: BreakerState,
        open_until: Option<SystemTime>,
        changed_at: SystemTime,
        now: Instant,
    ) -> bool {
        if changed_at <= self.changed_at || state == self.state {
            return false;
        }
        self.changed_at = changed_at;
        self.probes_started = 0;
        self.probes_in_flight = 0;
        match state {
            BreakerState::Closed => {
                self.state = BreakerState::Closed;
                self.consecutive_failures = 0;
                self.cooldown = Duration::ZERO;
            }
            BreakerState::Open | BreakerState::HalfOpen => {
                let left = open_until
                    .and_then(|t| t.duration_since(SystemTime::now()).ok())
                    .unwrap_or_default();
                self.state = BreakerState::Open;
                self.open_until = now + left;
                if self.cooldown.is_zero() {
                    self.cooldown = left;
                }
            }
        }
        true
    }

    /// When an open breaker lets probes through again, on the wall clock (for `walhook.endpoint_state`).
    pub fn open_until_wall(&self, now: Instant) -> Option<SystemTime> {
        (self.state != BreakerState::Closed)
            .then(|| SystemTime::now() + self.open_until.saturating_duration_since(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(threshold: u32) -> BreakerPolicy {
        BreakerPolicy {
            threshold,
            cooldown: Duration::from_secs(10),
            max_cooldown: Duration::from_secs(35),
        }
    }

    /// A small deterministic generator, so the "random" outcomes are the same on every run.
    fn coin(state: &mut u64) -> bool {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*state >> 33) & 1 == 1
    }

    #[test]
    fn an_endpoint_answering_half_of_its_requests_is_never_shut() {
        let now = Instant::now();
        // failures at random, half of them, over a million attempts
        let mut b = Breaker::new(now);
        let mut state = 7;
        for _ in 0..1_000_000 {
            if coin(&mut state) {
                assert_eq!(b.failure(&policy(5), now, now, true), None);
            } else {
                b.success();
            }
        }
        assert_eq!(b.state(), BreakerState::Closed);
        // every first attempt fails and every retry succeeds: bursts of failed new deliveries (all of them at
        // first, or after a pause), then their retries succeed
        let mut b = Breaker::new(now);
        for round in 0..10_000u32 {
            let burst = 1 + round % 64;
            for _ in 0..burst {
                assert_eq!(b.failure(&policy(5), now, now, false), None);
            }
            for _ in 0..burst {
                b.success();
            }
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn failures_of_new_deliveries_open_only_once_a_retry_fails_or_a_cool_down_passed() {
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        for _ in 0..100 {
            assert_eq!(b.failure(&policy(5), t0, t0, false), None);
        }
        assert!(matches!(
            b.failure(&policy(5), t0, t0, true),
            Some(Transition::Opened { .. })
        ));
        let mut b = Breaker::new(t0);
        for _ in 0..10 {
            assert_eq!(b.failure(&policy(5), t0, t0, false), None);
        }
        let t1 = t0 + Duration::from_secs(10);
        assert!(matches!(
            b.failure(&policy(5), t1, t1, false),
            Some(Transition::Opened { .. })
        ));
    }

    #[test]
    fn an_endpoint_that_is_down_opens_the_breaker() {
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        for _ in 0..2 {
            assert_eq!(b.admit(t0), Admission::Go);
            assert_eq!(b.failure(&policy(3), t0, t0, true), None);
        }
        assert_eq!(
            b.failure(&policy(3), t0, t0, true),
            Some(Transition::Opened {
                failed: 3,
                of: 3,
                cooldown: Duration::from_secs(10)
            })
        );
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.room(t0), 0);
        // a working endpoint that goes down opens once nearly all of its recent attempts failed
        let mut b = Breaker::new(t0);
        for _ in 0..50 {
            b.success();
        }
        let mut opened_after = 0;
        for i in 1..=100 {
            if b.failure(&policy(5), t0, t0, true).is_some() {
                opened_after = i;
                break;
            }
        }
        assert_eq!(opened_after, 45, "90 % of the last 50");
    }

    #[test]
    fn breaker_probes_in_rounds_and_closes_on_a_success() {
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        for _ in 0..3 {
            b.failure(&policy(3), t0, t0, true);
        }
        assert_eq!(
            b.admit(t0 + Duration::from_secs(5)),
            Admission::Wait(t0 + Duration::from_secs(10))
        );
        // after the cool-down a round of PROBES requests goes
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.room(t1), PROBES as usize);
        for _ in 0..PROBES {
            assert_eq!(b.admit(t1), Admission::Probe);
        }
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.room(t1), 0);
        assert!(matches!(b.admit(t1), Admission::Wait(_)));
        // the round fails only when all of its probes failed: then open for twice as long
        for _ in 0..PROBES - 1 {
            assert_eq!(b.failure(&policy(3), t1, t1, true), None);
        }
        assert_eq!(
            b.failure(&policy(3), t1, t1, true),
            Some(Transition::Reopened {
                cooldown: Duration::from_secs(20)
            })
        );
        assert_eq!(b.open_until(), t1 + Duration::from_secs(20));
        let t2 = t1 + Duration::from_secs(20);
        for _ in 0..PROBES {
            assert_eq!(b.admit(t2), Admission::Probe);
            b.failure(&policy(3), t2, t2, true);
        }
        assert_eq!(b.open_until(), t2 + Duration::from_secs(35), "capped");
        // one successful probe closes it
        let t3 = t2 + Duration::from_secs(35);
        assert_eq!(b.admit(t3), Admission::Probe);
        assert_eq!(b.admit(t3), Admission::Probe);
        assert_eq!(b.failure(&policy(3), t3, t3, true), None);
        assert_eq!(b.success(), Some(Transition::Closed));
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.consecutive_failures(), 0);
        assert_eq!(b.admit(t3), Admission::Go);
        assert_eq!(b.success(), None, "already closed");
    }

    #[test]
    fn a_released_probe_lets_the_next_one_go() {
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        b.failure(&policy(1), t0, t0, true);
        let t1 = t0 + Duration::from_secs(10);
        for _ in 0..PROBES {
            assert_eq!(b.admit(t1), Admission::Probe);
        }
        b.release(&Admission::Probe);
        assert_eq!(b.admit(t1), Admission::Probe);
    }

    #[test]
    fn another_instances_newer_state_is_adopted() {
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        let later = SystemTime::now() + Duration::from_secs(60);
        assert!(b.adopt(BreakerState::Open, Some(later), SystemTime::now(), t0));
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.open_until() > t0 + Duration::from_secs(50));
        // an older change is ignored; a newer close is adopted
        assert!(!b.adopt(BreakerState::Closed, None, UNIX_EPOCH, t0));
        assert!(b.adopt(
            BreakerState::Closed,
            None,
            SystemTime::now() + Duration::from_secs(1),
            t0
        ));
        assert_eq!(b.state(), BreakerState::Closed);
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
}
