//! The `publish` scenario: what an event costs the application through `walhook.publish()` (a logical
//! decoding message) against `INSERT INTO walhook.outbox`, with the same writers.
//!
//! The scratch database has walhook's slot, recorded in `walhook.slots`, so publish() writes messages. No relay
//! runs: this is the application's side, the ceiling each path leaves it (as `baseline` is the outbox's). Each
//! path gets one full-speed window of single-event transactions; WAL is read from the server's position and
//! PostgreSQL's CPU from `/proc` (throwaway cluster only), both per event. What the table costs later
//! (vacuum, retention's deletes) and what decoding costs the walsender are not in these figures.

use super::report::Publish;
use super::server::{write_cost, Scratch};
use super::stats::{per_sec, ratio};
use super::workload;
use super::{db_err, Bench, BenchError};

/// One path's window.
struct Path {
    per_sec: f64,
    wal_bytes_per_event: Option<f64>,
    postgres_cpu_us_per_event: Option<f64>,
}

impl Bench {
    pub(super) async fn publish(&self, scratch: &Scratch) -> Result<Publish, BenchError> {
        // the bench's slot as walhook's own: publish() writes a message only while walhook.slots lists it
        scratch
            .client
            .execute(
                "/* walhook-bench */ insert into walhook.slots (slot_name) values ($1) on conflict do nothing",
                &[&scratch.name],
            )
            .await
            .map_err(db_err("recording the slot in walhook.slots"))?;
        let table = self.path(scratch, false).await?;
        let rows = self.outbox_rows(scratch).await?;
        let message = self.path(scratch, true).await?;
        if self.outbox_rows(scratch).await? != rows {
            return Err(BenchError::Internal(
                "walhook.publish() inserted outbox rows although walhook's slot exists".into(),
            ));
        }
        Ok(Publish {
            writers: self.plan.writers,
            inserts_per_sec: message.per_sec,
            wal_bytes_per_event: message.wal_bytes_per_event,
            postgres_cpu_us_per_event: message.postgres_cpu_us_per_event,
            table_inserts_per_sec: table.per_sec,
            table_wal_bytes_per_event: table.wal_bytes_per_event,
            table_postgres_cpu_us_per_event: table.postgres_cpu_us_per_event,
            inserts_ratio: ratio(message.per_sec, table.per_sec),
            wal_ratio: message
                .wal_bytes_per_event
                .zip(table.wal_bytes_per_event)
                .and_then(|(m, t)| ratio(m, t)),
        })
    }

    /// One full-speed window of the writers through publish() or the insert.
    async fn path(&self, scratch: &Scratch, published: bool) -> Result<Path, BenchError> {
        let (db, writers, window) = (&scratch.db, self.plan.writers, self.plan.window);
        let before = self.server.snapshot(scratch, None).await?;
        let commits = if published {
            workload::write_published(db, writers, window).await?
        } else {
            workload::write(
                db,
                writers,
                workload::Pace::FullSpeed,
                false,
                window,
                Default::default(),
                &workload::Tenancy::None,
            )
            .await?
        };
        let after = self.server.snapshot(scratch, None).await?;
        let (wal_bytes_per_event, postgres_cpu_us_per_event) =
            write_cost(&before, &after, commits.events);
        Ok(Path {
            per_sec: per_sec(commits.events, commits.elapsed),
            wal_bytes_per_event,
            postgres_cpu_us_per_event,
        })
    }

    async fn outbox_rows(&self, scratch: &Scratch) -> Result<i64, BenchError> {
        Ok(scratch
            .client
            .query_one(
                "/* walhook-bench */ select count(*) from walhook.outbox",
                &[],
            )
            .await
            .map_err(db_err("counting outbox rows"))?
            .get(0))
    }
}
