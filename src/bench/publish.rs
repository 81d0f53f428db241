//! The `publish` scenario: what an event costs the application through `walhook.publish()` (a logical
//! decoding message) against `INSERT INTO walhook.outbox`, with the same writers.
//!
//! The scratch database has walhook's slot, recorded in `walhook.slots`, so publish() writes messages. No relay
//! runs: this is the application's side, the ceiling each path leaves it (as `baseline` is the outbox's). Each
//! path gets one full-speed window of single-event transactions from `--writers` connections; WAL is read from
//! the server's position, PostgreSQL's CPU from `/proc` (throwaway cluster only), both per event, with the
//! writers still connected (a backend that exits hands its CPU time to the postmaster only once reaped). Then
//! the slot decodes what the window wrote with pgoutput, as the walsender would for the relay
//! (`pg_logical_slot_get_binary_changes`, the same plugin and options, into a result instead of onto the
//! network); the CPU of the backend doing it, per event, is the decoding's. What the table costs later
//! (vacuum, retention's deletes) is not in these figures.

use std::time::Instant;

use super::report::Publish;
use super::server::{write_cost, Scratch};
use super::stats::{per_sec, ratio};
use super::{db_err, procfs, workload, Bench, BenchError};

/// What the writers of each path run, one event per transaction (the baseline's insert, and the same event
/// through publish()).
const INSERT: &str = "/* walhook-bench */ insert into walhook.outbox (event_type, payload)
  values ('order.created', $1::text::jsonb)";
const PUBLISH: &str =
    "/* walhook-bench */ select walhook.publish('order.created', $1::text::jsonb)";

/// One path's window.
struct Path {
    per_sec: f64,
    wal_bytes_per_event: Option<f64>,
    postgres_cpu_us_per_event: Option<f64>,
    decode_cpu_us_per_event: Option<f64>,
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
        // publish() first: autovacuum, woken by the table's inserts, would otherwise run in its window
        let message = self.path(scratch, PUBLISH).await?;
        if self.outbox_rows(scratch).await? != 0 {
            return Err(BenchError::Internal(
                "walhook.publish() inserted outbox rows although walhook's slot exists".into(),
            ));
        }
        let table = self.path(scratch, INSERT).await?;
        Ok(Publish {
            writers: self.plan.writers,
            inserts_per_sec: message.per_sec,
            wal_bytes_per_event: message.wal_bytes_per_event,
            postgres_cpu_us_per_event: message.postgres_cpu_us_per_event,
            table_inserts_per_sec: table.per_sec,
            table_wal_bytes_per_event: table.wal_bytes_per_event,
            table_postgres_cpu_us_per_event: table.postgres_cpu_us_per_event,
            decode_cpu_us_per_event: message.decode_cpu_us_per_event,
            table_decode_cpu_us_per_event: table.decode_cpu_us_per_event,
            inserts_ratio: ratio(message.per_sec, table.per_sec),
            wal_ratio: message
                .wal_bytes_per_event
                .zip(table.wal_bytes_per_event)
                .and_then(|(m, t)| ratio(m, t)),
        })
    }

    /// One full-speed window of the writers running `sql`, then the decoding of what it wrote.
    async fn path(&self, scratch: &Scratch, sql: &'static str) -> Result<Path, BenchError> {
        let mut writers = Vec::with_capacity(self.plan.writers);
        for _ in 0..self.plan.writers {
            let client = workload::connect(&scratch.db).await?;
            let statement = client
                .prepare(sql)
                .await
                .map_err(db_err("preparing the writers' statement"))?;
            writers.push((client, statement));
        }
        let before = self.server.snapshot(scratch, None).await?;
        let start = Instant::now();
        let end = start + self.plan.window;
        let count = writers.len() as u64;
        let mut tasks = tokio::task::JoinSet::new();
        for (w, (client, statement)) in writers.into_iter().enumerate() {
            tasks.spawn(async move {
                let mut events = 0u64;
                while Instant::now() < end {
                    let payload = workload::payload(events * count + w as u64);
                    client.execute(&statement, &[&payload]).await?;
                    events += 1;
                }
                // the connection goes back with the count, to close after the snapshot
                Ok::<_, tokio_postgres::Error>((client, events))
            });
        }
        let mut clients = Vec::with_capacity(count as usize);
        let mut events = 0;
        while let Some(joined) = tasks.join_next().await {
            let (client, n) = joined
                .map_err(|e| BenchError::Internal(format!("a writer task failed: {e}")))?
                .map_err(db_err("writing events"))?;
            clients.push(client);
            events += n;
        }
        let elapsed = start.elapsed();
        let after = self.server.snapshot(scratch, None).await?;
        drop(clients);
        let (wal_bytes_per_event, postgres_cpu_us_per_event) = write_cost(&before, &after, events);
        Ok(Path {
            per_sec: per_sec(events, elapsed),
            wal_bytes_per_event,
            postgres_cpu_us_per_event,
            decode_cpu_us_per_event: self.decode(scratch, events).await?,
        })
    }

    /// Decodes (and consumes) everything the slot has not confirmed, as the walsender would for the relay;
    /// the CPU of the backend that does it, per event (throwaway cluster only: its `/proc` is ours to read).
    async fn decode(&self, scratch: &Scratch, events: u64) -> Result<Option<f64>, BenchError> {
        let pid: i32 = scratch
            .client
            .query_one("/* walhook-bench */ select pg_backend_pid()", &[])
            .await
            .map_err(db_err("reading the session's pid"))?
            .get(0);
        let local = self.server.postgres_cpu().is_some();
        let cpu = || {
            u32::try_from(pid)
                .ok()
                .filter(|_| local)
                .and_then(procfs::cpu_seconds)
        };
        let before = cpu();
        scratch
            .client
            .query_one(
                "/* walhook-bench */ select count(*) from pg_logical_slot_get_binary_changes($1, null, null,
                   'proto_version', '1', 'publication_names', 'walhook', 'messages', 'true')",
                &[&scratch.name],
            )
            .await
            .map_err(db_err("decoding the window's WAL with pgoutput"))?;
        let after = cpu();
        Ok(before
            .zip(after)
            .filter(|_| events > 0)
            .map(|(b, a)| (a - b).max(0.0) * 1e6 / events as f64))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_carry_the_marker() {
        for sql in [INSERT, PUBLISH] {
            assert!(sql.starts_with(workload::MARKER));
        }
    }
}
