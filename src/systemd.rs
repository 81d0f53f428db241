//! The systemd notify protocol (`Type=notify`): `READY=1`, `STATUS=…`, `WATCHDOG=1`, `STOPPING=1`.
//!
//! Every call is a no-op without `NOTIFY_SOCKET` (not started by systemd), so the daemon calls these
//! unconditionally. `READY=1` is sent once the source streams, not when the process starts: a unit that
//! depends on walhook (or `systemctl start` itself) then waits until events actually flow. The watchdog is
//! fed from a task on the daemon's runtime at half of `WatchdogSec`, so a wedged runtime stops feeding it
//! and systemd restarts the service. A failed send is logged once at debug level and otherwise ignored: the
//! relay must not stop because its supervisor went away.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::health::{Activity, Health};

fn send(states: &[NotifyState]) {
    static FAILED: AtomicBool = AtomicBool::new(false);
    if let Err(e) = sd_notify::notify(states) {
        if !FAILED.swap(true, Ordering::Relaxed) {
            tracing::debug!("systemd notification failed: {e}");
        }
    }
}

/// One-line `STATUS=` text, e.g. "streaming; lag 0.0s, 12 B; 3 requests in flight; 0 pending, 1 dead".
pub fn status_line(health: &Health, in_flight: usize) -> String {
    let mut line = if health.is_draining() {
        "draining".to_string()
    } else if health.is_streaming() {
        match health.activity() {
            Activity::Streaming => format!("streaming; lag {:.1}s", health.lag().as_secs_f64()),
            Activity::Polling => "polling walhook.outbox".to_string(),
            Activity::Backfilling => {
                "backfilling the outbox rows committed before the first start".to_string()
            }
        }
    } else if health.is_standby() {
        "standby: another instance streams the slot".to_string()
    } else {
        "not streaming".to_string()
    };
    if let Some(sample) = health.sample() {
        if let Some(bytes) = sample.lag_bytes {
            line.push_str(&format!(", {}", human_bytes(bytes)));
        }
        line.push_str(&format!(
            "; {in_flight} requests in flight; {} pending, {} dead",
            sample.pending, sample.dead
        ));
    } else {
        line.push_str(&format!("; {in_flight} requests in flight"));
    }
    line
}

pub fn status(line: &str) {
    send(&[NotifyState::Status(line)]);
}

pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("draining in-flight deliveries"),
    ]);
}

/// Sends `READY=1` once the source streams or stands by for another instance, then feeds the watchdog (if `WatchdogSec` is set) until `stop`.
pub async fn run(health: Arc<Health>, stop: CancellationToken) {
    tokio::select! {
        _ = health.wait_working() => {}
        _ = stop.cancelled() => return,
    }
    let line = status_line(&health, 0);
    send(&[NotifyState::Ready, NotifyState::Status(&line)]);
    let Some(period) = sd_notify::watchdog_enabled().map(|d| d / 2) else {
        return;
    };
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(10)));
    loop {
        tokio::select! {
            _ = tick.tick() => send(&[NotifyState::Watchdog]),
            _ = stop.cancelled() => return,
        }
    }
}

/// `1536` → "1.5 KiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{n} B"),
        _ => format!("{value:.1} {}", UNITS[unit]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_like_people_write_them() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(16 << 20), "16.0 MiB");
    }

    #[test]
    fn the_status_line_says_what_the_source_does() {
        let health = Health::new(Duration::from_secs(60));
        assert!(status_line(&health, 0).starts_with("not streaming"));
        health.set_backfilling();
        assert!(status_line(&health, 3).starts_with(
            "backfilling the outbox rows committed before the first start; 3 requests in flight"
        ));
        health.set_streaming(true);
        assert!(status_line(&health, 0).starts_with("streaming; lag 0.0s"));
        health.set_polling();
        assert!(status_line(&health, 0).starts_with("polling walhook.outbox; 0 requests in flight"));
        health.set_draining();
        assert!(status_line(&health, 0).starts_with("draining"));
    }
}
