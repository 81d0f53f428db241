//! Summary statistics of the benchmark: nearest-rank percentiles of latencies, and rates.
//!
//! Nearest-rank (the smallest sample with at least p % of the samples at or below it) always reports a latency
//! that was actually observed, and never interpolates across a gap, which matters for tails such as p99 of a
//! few thousand samples.

use std::time::Duration;

use serde::Serialize;

/// Percentiles of a set of latencies, in milliseconds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Latency {
    pub samples: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    /// `None` when there are no samples. NaN samples are ignored.
    pub fn from_ms(mut samples: Vec<f64>) -> Option<Latency> {
        samples.retain(|s| !s.is_nan());
        samples.sort_by(f64::total_cmp);
        Some(Latency {
            samples: samples.len(),
            p50_ms: percentile(&samples, 50.0)?,
            p95_ms: percentile(&samples, 95.0)?,
            p99_ms: percentile(&samples, 99.0)?,
            max_ms: *samples.last()?,
        })
    }
}

/// The nearest-rank percentile `p` (0 < p <= 100) of ascending `sorted` samples; `None` when empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// `count` per second of `elapsed`; 0 for an empty interval.
pub fn per_sec(count: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

/// `x / y`, or `None` when `y` is zero (a figure per delivery when nothing was delivered).
pub fn ratio(x: f64, y: f64) -> Option<f64> {
    (y != 0.0).then(|| x / y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&samples, 50.0), Some(50.0));
        assert_eq!(percentile(&samples, 95.0), Some(95.0));
        assert_eq!(percentile(&samples, 99.0), Some(99.0));
        assert_eq!(percentile(&samples, 100.0), Some(100.0));
        assert_eq!(percentile(&samples, 0.1), Some(1.0));
        // few samples: the tail is the largest one, never an interpolation
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 99.0), Some(3.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[7.0], 50.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn latency_summary_sorts_and_skips_nan() {
        let summary = Latency::from_ms(vec![5.0, f64::NAN, 1.0, 3.0, 2.0, 4.0]).unwrap();
        assert_eq!(
            summary,
            Latency {
                samples: 5,
                p50_ms: 3.0,
                p95_ms: 5.0,
                p99_ms: 5.0,
                max_ms: 5.0
            }
        );
        assert_eq!(Latency::from_ms(vec![]), None);
        assert_eq!(Latency::from_ms(vec![f64::NAN]), None);
    }

    #[test]
    fn rates_and_ratios() {
        assert_eq!(per_sec(500, Duration::from_millis(250)), 2000.0);
        assert_eq!(per_sec(5, Duration::ZERO), 0.0);
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
        assert_eq!(ratio(3.0, 0.0), None);
    }
}
