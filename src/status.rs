//! `walhook status`: a one-screen summary read from SQL and the slot, for a person at a terminal.
//!
//! It needs no running daemon (several instances, or none, may be up): everything comes from
//! `pg_replication_slots`, `pg_stat_replication` and walhook's tables, in four queries. What the source part
//! shows follows the configured `source`: the slot, its leader and lag for `replication`; the unprocessed
//! outbox rows for `notify` (which has no slot, so a missing one is no news). Endpoint URLs are shown without
//! credentials or query strings, which may carry secrets; errors are the recorded excerpts.

use std::fmt::Write;

use crate::config::{Config, SourceKind};
use crate::store::{
    self, Backlog, EndpointStatus, Leadership, OutboxBacklog, SlotStatus, StoreError,
};
use crate::systemd::human_bytes;

/// Endpoints listed before "… and N more" (the busiest first: dead, then pending).
const MAX_ENDPOINTS: usize = 20;

/// Everything the summary shows.
#[derive(Clone, Debug, Default)]
pub struct Status {
    pub slot_name: String,
    pub slot: Option<SlotStatus>,
    pub leadership: Leadership,
    pub backlog: Backlog,
    pub endpoints: Vec<EndpointStatus>,
    /// `source = "notify"`: its unprocessed rows, shown instead of the slot.
    pub notify: Option<OutboxBacklog>,
}

/// Reads the summary for the configured source from `db` (`config.database_url()`).
pub async fn read_for(
    db: &crate::conninfo::ConnInfo,
    config: &Config,
) -> Result<Status, StoreError> {
    match config.source {
        SourceKind::Replication => read(db, &config.replication.slot).await,
        SourceKind::Notify => read_notify(db).await,
    }
}

/// Reads the summary of a notify source from the database.
pub async fn read_notify(config: &crate::conninfo::ConnInfo) -> Result<Status, StoreError> {
    let client = store::connect_client(config).await?;
    store::check_schema(&client).await?;
    Ok(Status {
        notify: Some(store::outbox_backlog(&client).await?),
        backlog: store::backlog(&client).await?,
        endpoints: store::endpoint_status(&client).await?,
        ..Default::default()
    })
}

/// Reads the summary of a replication source (its slot `slot`) from the database.
pub async fn read(config: &crate::conninfo::ConnInfo, slot: &str) -> Result<Status, StoreError> {
    let client = store::connect_client(config).await?;
    store::check_schema(&client).await?;
    Ok(Status {
        slot_name: slot.to_string(),
        slot: store::slot_status(&client, slot).await?,
        leadership: store::slot_leadership(
            &client,
            slot,
            crate::source::replication::LEADER_LOCK_CLASS,
        )
        .await?,
        backlog: store::backlog(&client).await?,
        endpoints: store::endpoint_status(&client).await?,
        notify: None,
    })
}

impl Status {
    /// The screen, as printed.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let name = &self.slot_name;
        if let Some(n) = &self.notify {
            let oldest = n
                .oldest_unprocessed
                .map_or(String::new(), |s| format!(", oldest {}", age(s)));
            let rows = match n.unprocessed {
                1 => "1 unprocessed outbox row".to_string(),
                n => format!("{n} unprocessed outbox rows"),
            };
            let _ = writeln!(
                out,
                "source     notify: {rows}{oldest}; {} claimed by an instance now",
                n.claimed
            );
        }
        match &self.slot {
            _ if self.notify.is_some() => {}
            None => {
                let _ = writeln!(
                    out,
                    "slot       {name}: MISSING (a first start creates it; otherwise see `walhook recover-slot`)"
                );
            }
            Some(s) if s.foreign.is_some() => {
                let _ = writeln!(
                    out,
                    "slot       {name}: NOT THIS DATABASE'S ({}): slot names are shared by the cluster; set \
                     replication.slot to a name of this database's own",
                    s.foreign.as_deref().unwrap_or_default()
                );
            }
            Some(s) => {
                let state = match (s.wal_status.as_deref(), s.active_pid) {
                    (Some("lost"), _) => {
                        "INVALIDATED (wal_status = lost): run `walhook recover-slot`".to_string()
                    }
                    (_, Some(pid)) => format!(
                        "streaming to walsender pid {pid}{}",
                        s.client_addr
                            .as_deref()
                            .map(|a| format!(" (client {a})"))
                            .unwrap_or_default()
                    ),
                    (_, None) => "NOT STREAMING (no walhook instance holds the slot)".to_string(),
                };
                let _ = writeln!(out, "slot       {name}: {state}");
                let l = &self.leadership;
                let standbys = match l.standbys {
                    Some(1) => ", 1 instance standing by".to_string(),
                    Some(n) => format!(", {n} instances standing by"),
                    None => String::new(),
                };
                if let Some(leader) = &l.leader {
                    let _ = writeln!(out, "leader     {leader}{standbys}");
                }
                let bytes = |b: Option<i64>| b.map_or("-".into(), |b| human_bytes(b.max(0) as u64));
                let seconds = s
                    .replay_lag
                    .map_or(String::new(), |l| format!(", {l:.1}s behind"));
                let _ = writeln!(
                    out,
                    "lag        {}{seconds} (confirmed {})",
                    bytes(s.lag_bytes),
                    s.confirmed.as_deref().unwrap_or("-")
                );
                let safe = s
                    .safe_bytes
                    .map_or("no max_slot_wal_keep_size limit".into(), |b| {
                        format!("{} more before invalidation", bytes(Some(b)))
                    });
                let _ = writeln!(
                    out,
                    "WAL kept   {} ({}; {safe})",
                    bytes(s.retained_bytes),
                    s.wal_status.as_deref().unwrap_or("-")
                );
            }
        }
        let b = &self.backlog;
        let oldest = b
            .oldest_pending
            .map_or(String::new(), |s| format!(", oldest {}", age(s)));
        let _ = writeln!(
            out,
            "backlog    {} pending ({} due now{oldest}), {} dead",
            b.pending, b.due, b.dead
        );
        let _ = writeln!(out);
        if self.endpoints.is_empty() {
            let _ = writeln!(
                out,
                "no endpoints: INSERT INTO walhook.endpoints (url) VALUES (…)"
            );
            return out;
        }
        let _ = writeln!(
            out,
            "{:>5}  {:<44} {:>9} {:>7} {:>5}  last error (last hour)",
            "id", "endpoint", "succeeded", "pending", "dead"
        );
        let _ = writeln!(
            out,
            "{:>5}  {:<44} {:>9} {:>7} {:>5}",
            "", "", "last hour", "now", "hour"
        );
        for e in self.endpoints.iter().take(MAX_ENDPOINTS) {
            let mut url = display_url(&e.url);
            if !e.enabled {
                url.push_str(" (disabled)");
            } else if e.breaker != "closed" && !e.breaker.is_empty() {
                url.push_str(&format!(" (breaker {})", e.breaker.replace('_', "-")));
            }
            let error = match (&e.last_error, e.last_error_age) {
                (Some(err), Some(a)) => format!("{}, {} ago", shorten(err, 48), age(a)),
                _ => "-".into(),
            };
            let _ = writeln!(
                out,
                "{:>5}  {:<44} {:>9} {:>7} {:>5}  {error}",
                e.id,
                shorten(&url, 44),
                e.succeeded,
                e.pending,
                e.dead
            );
        }
        if self.endpoints.len() > MAX_ENDPOINTS {
            let _ = writeln!(
                out,
                "       … and {} more endpoints",
                self.endpoints.len() - MAX_ENDPOINTS
            );
        }
        out
    }
}

/// `https://user:pw@host:8443/hooks?token=x` → `https://host:8443/hooks`.
fn display_url(url: &str) -> String {
    match url.parse::<http::Uri>() {
        Ok(uri) => {
            let host = uri.host().unwrap_or("?");
            let port = uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
            let scheme = uri.scheme_str().unwrap_or("http");
            format!("{scheme}://{host}{port}{}", uri.path())
        }
        Err(_) => "(unparsable url)".into(),
    }
}

fn shorten(s: &str, max: usize) -> String {
    let s = s.replace(['\n', '\r'], " ");
    if s.chars().count() <= max {
        return s;
    }
    let mut out: String = s.chars().take(max - 1).collect();
    out.push('…');
    out
}

/// `75.0` → "1m15s", `7200.0` → "2h0m".
fn age(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_credentials_and_queries() {
        assert_eq!(
            display_url("https://user:pw@api.example.com:8443/hooks?token=x"),
            "https://api.example.com:8443/hooks"
        );
        assert_eq!(display_url("http://127.0.0.1/x"), "http://127.0.0.1/x");
        assert_eq!(display_url("not a url"), "(unparsable url)");
    }

    #[test]
    fn ages_and_shortening() {
        assert_eq!(age(5.2), "5s");
        assert_eq!(age(75.0), "1m15s");
        assert_eq!(age(7200.0), "2h0m");
        assert_eq!(age(90000.0), "1d1h");
        assert_eq!(shorten("abcdef", 4), "abc…");
        assert_eq!(shorten("a\nb", 4), "a b");
    }

    #[test]
    fn renders_one_screen() {
        let status = Status {
            slot_name: "walhook".into(),
            slot: Some(SlotStatus {
                active_pid: Some(42),
                wal_status: Some("reserved".into()),
                confirmed: Some("0/1A2B3C8".into()),
                lag_bytes: Some(2048),
                retained_bytes: Some(16 << 20),
                ..Default::default()
            }),
            leadership: Leadership {
                leader: Some("walhook (pid 7 on web-1), connected from 10.0.0.5".into()),
                standbys: Some(2),
            },
            backlog: Backlog {
                pending: 3,
                due: 1,
                dead: 1,
                oldest_pending: Some(120.0),
            },
            endpoints: (1..=25)
                .map(|id| EndpointStatus {
                    id,
                    url: format!("https://u:secret@h{id}.example.com/x?token=secret"),
                    enabled: id != 2,
                    succeeded: 10,
                    last_error: (id == 1).then(|| "HTTP 503".to_string()),
                    last_error_age: Some(65.0),
                    ..Default::default()
                })
                .collect(),
            notify: None,
        };
        let screen = status.render();
        assert!(
            screen.contains("slot       walhook: streaming to walsender pid 42"),
            "{screen}"
        );
        assert!(
            screen.contains(
                "leader     walhook (pid 7 on web-1), connected from 10.0.0.5, 2 instances standing by"
            ),
            "{screen}"
        );
        assert!(
            screen.contains("lag        2.0 KiB (confirmed 0/1A2B3C8)"),
            "{screen}"
        );
        assert!(screen.contains("WAL kept   16.0 MiB (reserved; no max_slot_wal_keep_size limit)"));
        assert!(screen.contains("backlog    3 pending (1 due now, oldest 2m0s), 1 dead"));
        assert!(
            screen.contains("https://h2.example.com/x (disabled)"),
            "{screen}"
        );
        assert!(screen.contains("HTTP 503, 1m5s ago"), "{screen}");
        assert!(screen.contains("… and 5 more endpoints"), "{screen}");
        assert!(!screen.contains("secret"), "{screen}");
        assert!(screen.lines().count() <= 30, "{screen}");
    }

    #[test]
    fn notify_shows_unprocessed_rows_instead_of_a_slot() {
        let status = Status {
            slot_name: "walhook".into(),
            notify: Some(OutboxBacklog {
                unprocessed: 12,
                oldest_unprocessed: Some(75.0),
                claimed: 5,
            }),
            ..Default::default()
        };
        let screen = status.render();
        assert!(
            screen.contains(
                "source     notify: 12 unprocessed outbox rows, oldest 1m15s; 5 claimed by an instance now"
            ),
            "{screen}"
        );
        assert!(!screen.contains("slot"), "{screen}");
        assert!(!screen.contains("recover-slot"), "{screen}");
    }
}
