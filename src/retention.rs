//! Retention: old deliveries, attempts and outbox rows are deleted in small batches.
//!
//! Each batch is one statement (its own short transaction) over at most `retention.batch_size` rows, found
//! by walking the primary key from the oldest row, so no lock is held for long and no index is needed beyond
//! the keys: ids grow with creation time, so a pass stops at the first batch whose rows are all too young.
//! Rows that must stay (pending deliveries, recent dead ones) are stepped over by the cursor, not re-read in
//! the same pass. Several instances may prune at once: deletes of the same rows simply serialise.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::RetentionConfig;
use crate::store::{self, Pruned, StoreError};

pub struct Retention {
    pub db: crate::conninfo::ConnInfo,
    pub config: RetentionConfig,
    /// Outbox rows are pruned only with the replication source, which streams events from the WAL.
    pub prune_outbox: bool,
    /// `replication.slot`: outbox rows the slot may not have streamed yet are kept.
    pub slot: String,
}

impl Retention {
    pub async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut client: Option<tokio_postgres::Client> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                match store::connect_client(&self.db).await {
                    Ok(c) => client = Some(c),
                    Err(e) => {
                        tracing::warn!("retention cannot connect: {e}");
                        continue;
                    }
                }
            }
            let c = client.as_ref().expect("connected above");
            if let Err(e) = self.pass(c, &stop).await {
                tracing::warn!(
                    "retention pass failed, retrying in {:?}: {e}",
                    self.config.interval
                );
            }
        }
    }

    /// One pass over deliveries, then the outbox (whose rows may have just lost their last delivery).
    pub async fn pass(
        &self,
        client: &tokio_postgres::Client,
        stop: &CancellationToken,
    ) -> Result<(), StoreError> {
        let limit = self.config.batch_size as i64;
        let (succeeded, dead) = (self.config.succeeded, self.config.dead);
        let deleted = walk(stop, |after| {
            store::prune_deliveries(client, after, limit, succeeded, dead)
        })
        .await?;
        if deleted.rows > 0 {
            metrics::counter!(crate::metrics::RETENTION_DELETED, "table" => "deliveries")
                .increment(deleted.rows as u64);
            metrics::counter!(crate::metrics::RETENTION_DELETED, "table" => "attempts")
                .increment(deleted.attempts as u64);
            tracing::info!(
                deliveries = deleted.rows,
                attempts = deleted.attempts,
                "retention removed old deliveries"
            );
        }
        if self.prune_outbox {
            let outbox = self.config.outbox;
            let deleted = walk(stop, |after| {
                store::prune_outbox(client, after, limit, outbox, &self.slot)
            })
            .await?;
            if deleted.rows > 0 {
                metrics::counter!(crate::metrics::RETENTION_DELETED, "table" => "outbox")
                    .increment(deleted.rows as u64);
                tracing::info!(outbox = deleted.rows, "retention removed old outbox rows");
            }
        }
        Ok(())
    }
}

/// Runs batches from the oldest id until one says done; returns the totals.
async fn walk<F, Fut>(stop: &CancellationToken, mut batch: F) -> Result<Pruned, StoreError>
where
    F: FnMut(i64) -> Fut,
    Fut: std::future::Future<Output = Result<Pruned, StoreError>>,
{
    let mut total = Pruned::default();
    let mut after = 0;
    while !stop.is_cancelled() {
        let b = batch(after).await?;
        total.rows += b.rows;
        total.attempts += b.attempts;
        match b.last_id {
            Some(id) if !b.done => after = id,
            _ => break,
        }
        // leave room for the hot path between batches
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(total)
}
