//! The retry schedule and the outcome decision: what to do after an attempt, as one pure function.
//!
//! Delivery outcomes are data, not errors (STYLE.md): [`decide`] maps (policy, attempt number, what happened,
//! the time, a random number) to [`Decision`]. Time and randomness come in as arguments so that every rule
//! (status classes, jitter bounds, `Retry-After`, the last attempt) is tested exhaustively without clocks.
//!
//! The rules, from DESIGN.md: 2xx is delivered; 410 is gone (dead, and the endpoint gets disabled); anything
//! else, 3xx included (redirects are not followed), is a failure retried after `schedule[n-1]` ± jitter, until
//! the schedule runs out. Receivers that say they are overloaded (429, 503) are listened to: their
//! `Retry-After` can stretch the wait up to twice the scheduled delay, never beyond, so a hostile or confused
//! receiver cannot park a delivery for a year. Timeouts and 429s wait at least `min_backoff_throttled`,
//! because retrying a struggling receiver within seconds makes things worse. An attempt refused by the SSRF
//! guard is retried like a connection failure: the operator may fix the allow-list before the schedule ends.

use std::fmt;
use std::time::{Duration, SystemTime};

/// When to retry failed deliveries.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Delays between attempts: attempts = 1 + `schedule.len()`.
    pub schedule: Vec<Duration>,
    /// Relative spread of each delay: 0.2 means ±20%. Clamped to [0, 1].
    pub jitter: f64,
    /// Minimum delay after a timeout or a 429.
    pub min_backoff_throttled: Duration,
}

impl Default for RetryPolicy {
    /// 5s, 5m, 30m, 2h, 5h, 10h, 10h (8 attempts over about a day), ±20%, 60s after throttling.
    fn default() -> Self {
        const MINUTE: u64 = 60;
        const HOUR: u64 = 60 * MINUTE;
        RetryPolicy {
            schedule: [
                5,
                5 * MINUTE,
                30 * MINUTE,
                2 * HOUR,
                5 * HOUR,
                10 * HOUR,
                10 * HOUR,
            ]
            .into_iter()
            .map(Duration::from_secs)
            .collect(),
            jitter: 0.2,
            min_backoff_throttled: Duration::from_secs(MINUTE),
        }
    }
}

/// What happened on one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempted {
    /// The receiver answered; `retry_after` is its parsed `Retry-After` header, if any.
    Status {
        code: u16,
        retry_after: Option<RetryAfter>,
    },
    /// No complete response within the timeout.
    Timeout,
    /// No connection (refused, unreachable, DNS or TLS failure).
    ConnectError,
    /// The SSRF guard refused every address of the host.
    Blocked,
}

/// A `Retry-After` header value (RFC 9110 §10.2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAfter {
    Seconds(u64),
    Date(SystemTime),
}

impl RetryAfter {
    /// How long the receiver asked us to wait, counted from `now`.
    fn delay(self, now: SystemTime) -> Duration {
        match self {
            RetryAfter::Seconds(s) => Duration::from_secs(s),
            RetryAfter::Date(at) => at.duration_since(now).unwrap_or(Duration::ZERO),
        }
    }
}

/// Parses a `Retry-After` value: delta-seconds or an HTTP-date (IMF-fixdate, or the obsolete RFC 850 and
/// asctime forms that recipients must accept). A date at or before `now` becomes `Seconds(0)`, so a receiver
/// with a slow clock reads as "retry whenever the schedule says". `None` for anything unparsable, which
/// callers treat as no header at all.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<RetryAfter> {
    let value = value.trim_matches([' ', '\t']);
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // All digits but too large for u64: still "a very long time", which decide() caps anyway.
        return Some(RetryAfter::Seconds(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(if at <= now {
        RetryAfter::Seconds(0)
    } else {
        RetryAfter::Date(at)
    })
}

/// What to do with a delivery after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Delivered,
    Retry {
        after: Duration,
    },
    Dead {
        reason: DeadReason,
    },
    /// 410 Gone: the delivery is dead and the endpoint is to be disabled.
    Gone,
}

/// Why a delivery was given up: the attempts made and how the last one failed. Its Display is what goes
/// into `walhook.deliveries.last_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadReason {
    pub attempts: u32,
    pub last: Failure,
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = if self.attempts == 1 { "" } else { "s" };
        write!(
            f,
            "gave up after {} attempt{plural}; last attempt: {}",
            self.attempts, self.last
        )
    }
}

/// How an attempt failed, in summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Status(u16),
    Timeout,
    ConnectError,
    Blocked,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Status(code) => write!(f, "HTTP {code}"),
            Failure::Timeout => f.write_str("timeout"),
            Failure::ConnectError => f.write_str("connection failed"),
            Failure::Blocked => f.write_str("blocked by network policy"),
        }
    }
}

/// Decides what follows attempt number `attempt_no` (1-based; 0 is taken as 1). `unit_random` in [0, 1)
/// places the delay within the jitter band; `now` is when the response arrived (for `Retry-After` dates).
///
/// With a `Retry-After` on a 429 or 503, the delay is the jittered scheduled delay or the receiver's request,
/// whichever is longer, with the request capped at twice the scheduled delay. Never panics, whatever the
/// inputs (out-of-range jitter or randomness are clamped).
pub fn decide(
    policy: &RetryPolicy,
    attempt_no: u32,
    outcome: &Attempted,
    now: SystemTime,
    unit_random: f64,
) -> Decision {
    let failure = match *outcome {
        Attempted::Status {
            code: 200..=299, ..
        } => return Decision::Delivered,
        Attempted::Status { code: 410, .. } => return Decision::Gone,
        Attempted::Status { code, .. } => Failure::Status(code),
        Attempted::Timeout => Failure::Timeout,
        Attempted::ConnectError => Failure::ConnectError,
        Attempted::Blocked => Failure::Blocked,
    };
    let attempts = attempt_no.max(1);
    let scheduled = usize::try_from(attempts - 1)
        .ok()
        .and_then(|i| policy.schedule.get(i));
    let Some(&scheduled) = scheduled else {
        return Decision::Dead {
            reason: DeadReason {
                attempts,
                last: failure,
            },
        };
    };
    let mut after = jittered(scheduled, policy.jitter, unit_random);
    if let Attempted::Status {
        code: 429 | 503,
        retry_after: Some(asked),
    } = *outcome
    {
        after = after.max(asked.delay(now).min(scheduled.saturating_mul(2)));
    }
    if matches!(failure, Failure::Timeout | Failure::Status(429)) {
        after = after.max(policy.min_backoff_throttled);
    }
    Decision::Retry { after }
}

/// `delay` scaled by a factor in [1 - jitter, 1 + jitter), chosen by `unit_random`.
fn jittered(delay: Duration, jitter: f64, unit_random: f64) -> Duration {
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let unit = if unit_random.is_finite() {
        unit_random.clamp(0.0, 1.0)
    } else {
        0.5
    };
    let factor = 1.0 + jitter * (2.0 * unit - 1.0);
    // Out of Duration's range only for absurd configured delays; keep those unjittered.
    Duration::try_from_secs_f64(delay.as_secs_f64() * factor).unwrap_or(delay)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    /// 2015-10-21 07:28:00 UTC, the example date of RFC 9110.
    const RFC_DATE_SECS: u64 = 1_445_412_480;
    const MID: f64 = 0.5; // no jitter: factor exactly 1
    const ALMOST_ONE: f64 = 0.999_999_999;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(RFC_DATE_SECS - 3600)
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn status(code: u16) -> Attempted {
        Attempted::Status {
            code,
            retry_after: None,
        }
    }

    fn status_after(code: u16, seconds: u64) -> Attempted {
        Attempted::Status {
            code,
            retry_after: Some(RetryAfter::Seconds(seconds)),
        }
    }

    fn decide_mid(attempt_no: u32, outcome: Attempted) -> Decision {
        decide(&RetryPolicy::default(), attempt_no, &outcome, now(), MID)
    }

    fn retry(s: u64) -> Decision {
        Decision::Retry { after: secs(s) }
    }

    #[test]
    fn default_schedule() {
        let p = RetryPolicy::default();
        let expected = [5, 300, 1800, 7200, 18000, 36000, 36000].map(secs);
        assert_eq!(p.schedule, expected);
        assert_eq!(p.jitter, 0.2);
        assert_eq!(p.min_backoff_throttled, secs(60));
    }

    #[test]
    fn success_and_gone_at_any_attempt() {
        for attempt in [0, 1, 2, 7, 8, 9, u32::MAX] {
            for code in [200, 201, 202, 204, 250, 299] {
                assert_eq!(
                    decide_mid(attempt, status(code)),
                    Decision::Delivered,
                    "{code} at {attempt}"
                );
            }
            assert_eq!(decide_mid(attempt, status(410)), Decision::Gone);
            assert_eq!(decide_mid(attempt, status_after(410, 5)), Decision::Gone);
        }
    }

    #[test]
    fn failures_follow_the_schedule() {
        let codes = [
            0, 100, 101, 199, 300, 301, 302, 304, 307, 308, 400, 401, 403, 404, 408, 409, 411, 413,
            422, 500, 501, 502, 503, 504, 599, 600, 999,
        ];
        let schedule = RetryPolicy::default().schedule;
        for (i, &delay) in schedule.iter().enumerate() {
            let attempt = i as u32 + 1;
            let expected = Decision::Retry { after: delay };
            for code in codes {
                assert_eq!(
                    decide_mid(attempt, status(code)),
                    expected,
                    "HTTP {code} after attempt {attempt}"
                );
            }
            assert_eq!(decide_mid(attempt, Attempted::ConnectError), expected);
            assert_eq!(decide_mid(attempt, Attempted::Blocked), expected);
        }
        assert_eq!(
            decide_mid(0, status(500)),
            retry(5),
            "attempt 0 is taken as 1"
        );
    }

    #[test]
    fn timeouts_and_429_wait_at_least_the_throttle_minimum() {
        assert_eq!(decide_mid(1, Attempted::Timeout), retry(60));
        assert_eq!(decide_mid(1, status(429)), retry(60));
        assert_eq!(decide_mid(2, Attempted::Timeout), retry(300));
        assert_eq!(decide_mid(2, status(429)), retry(300));
        // 503, connection errors and blocks follow the plain schedule.
        assert_eq!(decide_mid(1, status(503)), retry(5));
        assert_eq!(decide_mid(1, Attempted::ConnectError), retry(5));
        // The minimum also holds against a short Retry-After.
        assert_eq!(decide_mid(1, status_after(429, 1)), retry(60));
        assert_eq!(decide_mid(1, status_after(429, 10)), retry(60));
    }

    #[test]
    fn retry_after_is_clamped_to_one_to_two_scheduled_delays() {
        for code in [429, 503] {
            // Attempt 3: scheduled 30m, so Retry-After counts within [30m, 60m].
            assert_eq!(decide_mid(3, status_after(code, 0)), retry(1800));
            assert_eq!(decide_mid(3, status_after(code, 60)), retry(1800));
            assert_eq!(decide_mid(3, status_after(code, 1800)), retry(1800));
            assert_eq!(decide_mid(3, status_after(code, 2500)), retry(2500));
            assert_eq!(decide_mid(3, status_after(code, 3600)), retry(3600));
            assert_eq!(decide_mid(3, status_after(code, 3601)), retry(3600));
            assert_eq!(decide_mid(3, status_after(code, u64::MAX)), retry(3600));
        }
        assert_eq!(decide_mid(1, status_after(503, 7)), retry(7));
        assert_eq!(decide_mid(1, status_after(503, 3600)), retry(10));
        // Only 429 and 503 are listened to.
        assert_eq!(decide_mid(3, status_after(500, 2500)), retry(1800));
        assert_eq!(decide_mid(3, status_after(301, 2500)), retry(1800));
    }

    #[test]
    fn retry_after_dates_count_from_now() {
        let in_40m = Attempted::Status {
            code: 503,
            retry_after: Some(RetryAfter::Date(now() + secs(2400))),
        };
        assert_eq!(decide_mid(3, in_40m), retry(2400));
        let past = Attempted::Status {
            code: 503,
            retry_after: Some(RetryAfter::Date(now() - secs(10))),
        };
        assert_eq!(decide_mid(3, past), retry(1800));
        let far = Attempted::Status {
            code: 429,
            retry_after: Some(RetryAfter::Date(now() + secs(86400 * 365))),
        };
        assert_eq!(decide_mid(3, far), retry(3600));
    }

    #[test]
    fn retry_after_does_not_undercut_jitter() {
        let p = RetryPolicy::default();
        // At the top of the band, 1.2 × 30m exceeds a Retry-After of 31m.
        let Decision::Retry { after } = decide(&p, 3, &status_after(503, 1860), now(), ALMOST_ONE)
        else {
            panic!()
        };
        assert!(after > secs(2150) && after < secs(2160), "{after:?}");
        // At the bottom, a Retry-After above 0.8 × 30m but below 30m is still honoured.
        let Decision::Retry { after } = decide(&p, 3, &status_after(503, 1700), now(), 0.0) else {
            panic!()
        };
        assert_eq!(after, secs(1700));
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let p = RetryPolicy::default();
        for (i, &scheduled) in p.schedule.iter().enumerate() {
            let attempt = i as u32 + 1;
            let at = |u: f64| match decide(&p, attempt, &Attempted::ConnectError, now(), u) {
                Decision::Retry { after } => after,
                other => panic!("{other:?}"),
            };
            let low = scheduled.mul_f64(0.8);
            let high = scheduled.mul_f64(1.2);
            let ns = Duration::from_nanos(1);
            assert!(
                at(0.0) + ns >= low && at(0.0) <= low + ns,
                "{:?} vs {low:?}",
                at(0.0)
            );
            assert!(
                at(ALMOST_ONE) < high && at(ALMOST_ONE) > scheduled.mul_f64(1.199),
                "{:?}",
                at(ALMOST_ONE)
            );
            assert_eq!(at(MID), scheduled);
            let mut previous = Duration::ZERO;
            for k in 0..100 {
                let d = at(k as f64 / 100.0);
                assert!(d + ns >= low && d < high && d >= previous, "{d:?}");
                previous = d;
            }
        }
    }

    #[test]
    fn odd_policies_and_randomness_never_panic() {
        let mut p = RetryPolicy {
            schedule: vec![Duration::MAX, Duration::ZERO, secs(10)],
            ..RetryPolicy::default()
        };
        for jitter in [f64::NAN, f64::INFINITY, -1.0, 0.0, 1.0, 5.0] {
            p.jitter = jitter;
            for u in [
                f64::NAN,
                f64::NEG_INFINITY,
                -3.0,
                0.0,
                0.5,
                ALMOST_ONE,
                1.0,
                7.0,
            ] {
                for attempt in 1..=3 {
                    for outcome in [
                        status(500),
                        status_after(429, u64::MAX),
                        status_after(503, 3),
                        Attempted::Timeout,
                    ] {
                        assert!(matches!(
                            decide(&p, attempt, &outcome, now(), u),
                            Decision::Retry { .. }
                        ));
                    }
                }
            }
        }
        p.jitter = 1.0;
        assert_eq!(decide(&p, 3, &status(500), now(), 0.0), retry(0));
        assert_eq!(decide(&p, 2, &status(500), now(), 0.3), retry(0));
        assert_eq!(
            decide(&p, 1, &status(500), now(), 0.5),
            Decision::Retry {
                after: Duration::MAX
            }
        );
        p.jitter = 7.0; // clamped to 1
        assert_eq!(decide(&p, 3, &status(500), now(), 0.0), retry(0));
        p.jitter = f64::NAN; // no jitter
        assert_eq!(decide(&p, 3, &status(500), now(), 0.0), retry(10));
    }

    #[test]
    fn the_last_attempt_ends_dead_with_a_summary() {
        let p = RetryPolicy::default();
        assert_eq!(decide_mid(7, status(500)), retry(36000));
        let dead = |outcome| match decide(&p, 8, &outcome, now(), MID) {
            Decision::Dead { reason } => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            dead(status(500)),
            DeadReason {
                attempts: 8,
                last: Failure::Status(500)
            }
        );
        assert_eq!(
            dead(status(500)).to_string(),
            "gave up after 8 attempts; last attempt: HTTP 500"
        );
        assert_eq!(
            dead(status(302)).to_string(),
            "gave up after 8 attempts; last attempt: HTTP 302"
        );
        assert_eq!(
            dead(status_after(429, 10)).to_string(),
            "gave up after 8 attempts; last attempt: HTTP 429"
        );
        assert_eq!(
            dead(Attempted::Timeout).to_string(),
            "gave up after 8 attempts; last attempt: timeout"
        );
        assert_eq!(
            dead(Attempted::ConnectError).to_string(),
            "gave up after 8 attempts; last attempt: connection failed"
        );
        assert_eq!(
            dead(Attempted::Blocked).to_string(),
            "gave up after 8 attempts; last attempt: blocked by network policy"
        );
        assert!(matches!(
            decide_mid(9, status(500)),
            Decision::Dead {
                reason: DeadReason { attempts: 9, .. }
            }
        ));
        assert!(matches!(
            decide_mid(u32::MAX, Attempted::Timeout),
            Decision::Dead { .. }
        ));
    }

    #[test]
    fn empty_schedule_means_one_attempt() {
        let p = RetryPolicy {
            schedule: vec![],
            ..RetryPolicy::default()
        };
        let reason = DeadReason {
            attempts: 1,
            last: Failure::Status(503),
        };
        assert_eq!(
            decide(&p, 1, &status_after(503, 5), now(), MID),
            Decision::Dead { reason }
        );
        assert_eq!(
            reason.to_string(),
            "gave up after 1 attempt; last attempt: HTTP 503"
        );
        assert!(matches!(
            decide(&p, 1, &Attempted::Timeout, now(), MID),
            Decision::Dead { .. }
        ));
        assert_eq!(decide(&p, 1, &status(204), now(), MID), Decision::Delivered);
        assert_eq!(decide(&p, 1, &status(410), now(), MID), Decision::Gone);
    }

    #[test]
    fn parses_retry_after_seconds() {
        let n = now();
        assert_eq!(parse_retry_after("120", n), Some(RetryAfter::Seconds(120)));
        assert_eq!(parse_retry_after("0", n), Some(RetryAfter::Seconds(0)));
        assert_eq!(
            parse_retry_after(" \t120 ", n),
            Some(RetryAfter::Seconds(120))
        );
        assert_eq!(parse_retry_after("007", n), Some(RetryAfter::Seconds(7)));
        assert_eq!(
            parse_retry_after("99999999999999999999999", n),
            Some(RetryAfter::Seconds(u64::MAX))
        );
        for bad in [
            "", " ", "-1", "+5", "1.5", "1e3", "5 s", "soon", "120, 60", "0x10", "１２",
        ] {
            assert_eq!(parse_retry_after(bad, n), None, "{bad:?}");
        }
    }

    #[test]
    fn parses_retry_after_dates() {
        let at = UNIX_EPOCH + secs(RFC_DATE_SECS);
        let before = at - secs(1);
        for form in [
            "Wed, 21 Oct 2015 07:28:00 GMT",
            "Wednesday, 21-Oct-15 07:28:00 GMT",
            "Wed Oct 21 07:28:00 2015",
            " Wed, 21 Oct 2015 07:28:00 GMT ",
        ] {
            assert_eq!(
                parse_retry_after(form, before),
                Some(RetryAfter::Date(at)),
                "{form:?}"
            );
            // Now or in the past: retry as the schedule allows.
            assert_eq!(
                parse_retry_after(form, at),
                Some(RetryAfter::Seconds(0)),
                "{form:?}"
            );
            assert_eq!(
                parse_retry_after(form, at + secs(5)),
                Some(RetryAfter::Seconds(0)),
                "{form:?}"
            );
        }
        for bad in [
            "Wed, 21 Oct 2015 07:28:00",
            "Wed, 32 Oct 2015 07:28:00 GMT",
            "2015-10-21T07:28:00Z",
            "Wed, 21 Oct 2015 25:28:00 GMT",
        ] {
            assert_eq!(parse_retry_after(bad, before), None, "{bad:?}");
        }
    }
}
