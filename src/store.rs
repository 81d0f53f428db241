//! Every SQL statement the daemon runs, in one place.
//!
//! Each component (recorder, scheduler, endpoint refresher, source) owns a `Store`: one connection with its
//! statements prepared once, so a slow batch write never queues behind a claim and the hot path pays no
//! parse/plan round trip. Batches travel as arrays and are expanded with `unnest`, one statement per batch.
//! Sessions run with `TimeZone=UTC` and `DateStyle=ISO` so timestamps read here print exactly as pgoutput
//! prints them (the envelope of a retry is byte-identical to the first attempt's).

use std::time::{Duration, SystemTime};

use tokio_postgres::{Client, NoTls, Statement};

use crate::fanout::EndpointRow;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("the walhook schema is missing: run `walhook migrate` first")]
    NotMigrated,
}

impl StoreError {
    /// True when the connection is gone and a new one may succeed.
    pub fn is_connection(&self) -> bool {
        match self {
            // class 08: connection exception; class 57: operator intervention (shutdown, restart)
            StoreError::Db(e) => {
                e.is_closed()
                    || e.code()
                        .is_none_or(|c| c.code().starts_with("08") || c.code().starts_with("57"))
            }
            StoreError::NotMigrated => false,
        }
    }
}

/// The final or intermediate state of a delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Pending,
    Succeeded,
    Dead,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Succeeded => "succeeded",
            Status::Dead => "dead",
        }
    }
}

/// What an attempt (or a parking without attempt) leaves in `walhook.deliveries` and `walhook.attempts`.
#[derive(Clone, Debug)]
pub struct RecordRow {
    pub event_id: i64,
    pub endpoint_id: i64,
    /// The event's uid in hex (`webhook-id` without `msg_`).
    pub uid_hex: String,
    pub status: Status,
    pub schedule_step: i32,
    pub next_attempt_at: Option<SystemTime>,
    /// `None` when the delivery is only parked (no attempt was made).
    pub attempt: Option<AttemptRow>,
    /// Copy of the event kept with deliveries that are not final-succeeded: (type, payload, created_at).
    pub copy: Option<(String, String, String)>,
}

#[derive(Clone, Debug)]
pub struct AttemptRow {
    pub attempted_at: SystemTime,
    pub duration_ms: i32,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    pub response_body: Option<String>,
}

/// A due delivery claimed by the scheduler, with the event content to resend.
#[derive(Clone, Debug)]
pub struct Claimed {
    pub delivery_id: i64,
    pub event_id: i64,
    pub endpoint_id: i64,
    pub attempts: i32,
    pub schedule_step: i32,
    pub uid: String,
    /// (type, payload, created_at) from the delivery's copy or the outbox; `None` when both are gone.
    pub content: Option<(String, String, String)>,
}

const RECORD: &str = "
with input as (
  select * from unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::int[], $6::timestamptz[],
                       $7::int[], $8::text[], $9::timestamptz[], $10::int[], $11::text[],
                       $12::text[], $13::text[], $14::text[])
    as t(event_id, endpoint_id, uid, status, schedule_step, next_attempt_at,
         status_code, error, attempted_at, duration_ms, response_body,
         event_type, payload, event_created_at)
), upserted as (
  insert into walhook.deliveries as d
    (event_id, endpoint_id, webhook_id, status, attempts, schedule_step, next_attempt_at,
     last_status_code, last_error, last_attempt_at, event_type, payload, event_created_at)
  select event_id, endpoint_id, uid::uuid, status, (attempted_at is not null)::int, schedule_step,
         next_attempt_at, status_code, error, attempted_at, event_type, payload::jsonb,
         event_created_at::timestamptz
    from input
  on conflict (event_id, endpoint_id) do update set
    status = excluded.status,
    attempts = d.attempts + excluded.attempts,
    schedule_step = excluded.schedule_step,
    next_attempt_at = excluded.next_attempt_at,
    last_status_code = case when excluded.last_attempt_at is null then d.last_status_code
                            else excluded.last_status_code end,
    last_error = case when excluded.last_attempt_at is null then d.last_error else excluded.last_error end,
    last_attempt_at = coalesce(excluded.last_attempt_at, d.last_attempt_at),
    event_type = case when excluded.status = 'succeeded' then null
                      else coalesce(d.event_type, excluded.event_type) end,
    payload = case when excluded.status = 'succeeded' then null else coalesce(d.payload, excluded.payload) end,
    event_created_at = case when excluded.status = 'succeeded' then null
                            else coalesce(d.event_created_at, excluded.event_created_at) end,
    updated_at = now()
  returning d.id, d.event_id, d.endpoint_id, d.attempts
)
insert into walhook.attempts (delivery_id, attempt, attempted_at, duration_ms, status_code, error, response_body)
select u.id, u.attempts, i.attempted_at, i.duration_ms, i.status_code, i.error, i.response_body
  from input i join upserted u using (event_id, endpoint_id)
 where i.attempted_at is not null";

const CLAIM: &str = "
with due as (
  select d.id
    from walhook.deliveries d
    join walhook.endpoints e on e.id = d.endpoint_id and e.enabled
   where d.status = 'pending' and d.next_attempt_at <= now()
     and d.endpoint_id <> all($3::bigint[])
   order by d.next_attempt_at
   limit $1
     for update of d skip locked
), claimed as (
  update walhook.deliveries d
     set next_attempt_at = now() + make_interval(secs => $2::float8)
    from due
   where d.id = due.id
  returning d.id, d.event_id, d.endpoint_id, d.attempts, d.schedule_step, d.webhook_id::text as uid,
            d.event_type, d.payload::text as payload, d.event_created_at::text as event_created_at
)
select c.id, c.event_id, c.endpoint_id, c.attempts, c.schedule_step, c.uid,
       coalesce(c.event_type, o.event_type), coalesce(c.payload, o.payload::text),
       coalesce(c.event_created_at, o.created_at::text)
  from claimed c left join walhook.outbox o on o.id = c.event_id";

/// Fans out, as pending deliveries due now, every committed outbox row that has no delivery yet, as seen by
/// the snapshot exported when the slot was created: exactly the rows the slot will never stream.
pub async fn backfill_before_slot(client: &mut Client, snapshot: &str) -> Result<u64, StoreError> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await?;
    tx.batch_execute(&format!(
        "set transaction snapshot '{}'",
        snapshot.replace('\'', "''")
    ))
    .await?;
    let n = tx
        .execute(
            "insert into walhook.deliveries (event_id, endpoint_id, webhook_id, status, next_attempt_at)
             select o.id, e.id, o.uid, 'pending', now()
               from walhook.outbox o
               join walhook.endpoints e on e.enabled and walhook.matches(o.event_type, e.event_types)
              where not exists (select 1 from walhook.deliveries d where d.event_id = o.id)
             on conflict (event_id, endpoint_id) do nothing",
            &[],
        )
        .await?;
    tx.commit().await?;
    Ok(n)
}

/// One connection with prepared statements.
pub struct Store {
    client: Client,
    record: Statement,
    claim: Statement,
}

/// Session settings every walhook connection runs with.
fn session_config(config: &tokio_postgres::Config) -> tokio_postgres::Config {
    let mut config = config.clone();
    let mut options = config.get_options().unwrap_or("").to_string();
    options.push_str(" -c TimeZone=UTC -c DateStyle=ISO -c extra_float_digits=3");
    config.options(options.trim());
    if config.get_application_name().is_none() {
        config.application_name("walhook");
    }
    config
}

/// Opens a plain (non-replication) connection with walhook's session settings; the connection task is
/// spawned and ends when the client is dropped.
pub async fn connect_client(
    config: &tokio_postgres::Config,
) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = session_config(config).connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("database connection ended: {e}");
        }
    });
    Ok(client)
}

impl Store {
    pub async fn connect(config: &tokio_postgres::Config) -> Result<Store, StoreError> {
        let client = connect_client(config).await?;
        let migrated: bool = client
            .query_one("select to_regclass('walhook.deliveries') is not null", &[])
            .await?
            .get(0);
        if !migrated {
            return Err(StoreError::NotMigrated);
        }
        let record = client.prepare(RECORD).await?;
        let claim = client.prepare(CLAIM).await?;
        Ok(Store {
            client,
            record,
            claim,
        })
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The committed generation of `walhook.endpoints` (bumped by a trigger on every change).
    pub async fn endpoints_generation(&self) -> Result<i64, StoreError> {
        let row = self
            .client
            .query_one("select generation from walhook.endpoints_generation", &[])
            .await?;
        Ok(row.get(0))
    }

    pub async fn enabled_endpoints(&self) -> Result<Vec<EndpointRow>, StoreError> {
        let rows = self
            .client
            .query("select id, url, event_types, secret from walhook.endpoints where enabled order by id", &[])
            .await?;
        Ok(rows
            .iter()
            .map(|r| EndpointRow {
                id: r.get(0),
                url: r.get(1),
                event_types: r.get(2),
                secret: r.get(3),
            })
            .collect())
    }

    /// The highest outbox id with a recorded delivery: replayed events above it cannot be recorded yet.
    pub async fn max_recorded_event_id(&self) -> Result<i64, StoreError> {
        let row = self
            .client
            .query_one(
                "select coalesce(max(event_id), 0) from walhook.deliveries",
                &[],
            )
            .await?;
        Ok(row.get(0))
    }

    /// (event_id, endpoint_id) pairs already recorded among these events.
    pub async fn recorded_pairs(&self, event_ids: &[i64]) -> Result<Vec<(i64, i64)>, StoreError> {
        let rows = self
            .client
            .query(
                "select event_id, endpoint_id from walhook.deliveries where event_id = any($1::bigint[])",
                &[&event_ids],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Writes a batch of outcomes in one statement (and so one transaction).
    pub async fn record(&self, rows: &[&RecordRow]) -> Result<(), StoreError> {
        let n = rows.len();
        let mut event_id = Vec::with_capacity(n);
        let mut endpoint_id = Vec::with_capacity(n);
        let mut uid = Vec::with_capacity(n);
        let mut status = Vec::with_capacity(n);
        let mut step = Vec::with_capacity(n);
        let mut next = Vec::with_capacity(n);
        let mut code = Vec::with_capacity(n);
        let mut error = Vec::with_capacity(n);
        let mut at = Vec::with_capacity(n);
        let mut duration = Vec::with_capacity(n);
        let mut body = Vec::with_capacity(n);
        let mut event_type = Vec::with_capacity(n);
        let mut payload = Vec::with_capacity(n);
        let mut created = Vec::with_capacity(n);
        for r in rows {
            event_id.push(r.event_id);
            endpoint_id.push(r.endpoint_id);
            uid.push(r.uid_hex.as_str());
            status.push(r.status.as_str());
            step.push(r.schedule_step);
            next.push(r.next_attempt_at);
            let a = r.attempt.as_ref();
            code.push(a.and_then(|a| a.status_code));
            error.push(a.and_then(|a| a.error.as_deref()));
            at.push(a.map(|a| a.attempted_at));
            duration.push(a.map(|a| a.duration_ms));
            body.push(a.and_then(|a| a.response_body.as_deref()));
            let c = r.copy.as_ref();
            event_type.push(c.map(|c| c.0.as_str()));
            payload.push(c.map(|c| c.1.as_str()));
            created.push(c.map(|c| c.2.as_str()));
        }
        self.client
            .execute(
                &self.record,
                &[
                    &event_id,
                    &endpoint_id,
                    &uid,
                    &status,
                    &step,
                    &next,
                    &code,
                    &error,
                    &at,
                    &duration,
                    &body,
                    &event_type,
                    &payload,
                    &created,
                ],
            )
            .await?;
        Ok(())
    }

    /// Claims up to `limit` due pending deliveries for `lease` (their `next_attempt_at` moves past the
    /// lease, so a crashed claimer's work becomes due again), skipping the listed endpoints.
    pub async fn claim_due(
        &self,
        limit: i64,
        lease: Duration,
        skip: &[i64],
    ) -> Result<Vec<Claimed>, StoreError> {
        let rows = self
            .client
            .query(&self.claim, &[&limit, &lease.as_secs_f64(), &skip])
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let t: Option<String> = r.get(6);
                let p: Option<String> = r.get(7);
                let c: Option<String> = r.get(8);
                Claimed {
                    delivery_id: r.get(0),
                    event_id: r.get(1),
                    endpoint_id: r.get(2),
                    attempts: r.get(3),
                    schedule_step: r.get(4),
                    uid: r.get(5),
                    content: match (t, p, c) {
                        (Some(t), Some(p), Some(c)) => Some((t, p, c)),
                        _ => None,
                    },
                }
            })
            .collect())
    }
}

// ---- operations: sampling, status, retention, slot bookkeeping ----

/// Slot position, retained WAL and backlog in one statement, for the periodic sampler. The counts use the
/// partial indexes on pending and dead deliveries; with no slot the slot columns are null.
const SLOT_SAMPLE: &str = "
select (pg_current_wal_lsn() - s.confirmed_flush_lsn)::int8,
       (pg_current_wal_lsn() - s.restart_lsn)::int8,
       s.wal_status,
       (select count(*) from walhook.deliveries where status = 'pending'),
       (select count(*) from walhook.deliveries where status = 'dead')
  from (select 1) one left join pg_replication_slots s on s.slot_name = $1";

pub async fn slot_sample(
    client: &Client,
    slot: &str,
) -> Result<crate::health::SlotSample, StoreError> {
    let row = client.query_one(SLOT_SAMPLE, &[&slot]).await?;
    let bytes = |i: usize| row.get::<_, Option<i64>>(i).map(|v| v.max(0) as u64);
    Ok(crate::health::SlotSample {
        lag_bytes: bytes(0),
        retained_bytes: bytes(1),
        wal_status: row.get(2),
        pending: row.get(3),
        dead: row.get(4),
    })
}

/// A slot row of `pg_replication_slots`.
#[derive(Clone, Debug)]
pub struct SlotRow {
    pub wal_status: Option<String>,
}

/// The slot as the server lists it, and when walhook recorded creating it (text, for messages); `None`s
/// when absent. Fails with `NotMigrated` before `walhook.slots` exists.
pub async fn slot_state(
    client: &Client,
    slot: &str,
) -> Result<(Option<SlotRow>, Option<String>), StoreError> {
    let row = client
        .query_one(
            "select to_regclass('walhook.slots') is not null,
                    (select wal_status from pg_replication_slots where slot_name = $1),
                    exists (select 1 from pg_replication_slots where slot_name = $1)",
            &[&slot],
        )
        .await?;
    if !row.get::<_, bool>(0) {
        return Err(StoreError::NotMigrated);
    }
    let slot_row = row.get::<_, bool>(2).then(|| SlotRow {
        wal_status: row.get(1),
    });
    let recorded = client
        .query_opt(
            "select to_char(created_at, 'YYYY-MM-DD HH24:MI:SS TZ') from walhook.slots where slot_name = $1",
            &[&slot],
        )
        .await?
        .map(|r| r.get(0));
    Ok((slot_row, recorded))
}

/// The pid of the walsender holding the slot, if any.
pub async fn slot_active_pid(client: &Client, slot: &str) -> Result<Option<i32>, StoreError> {
    Ok(client
        .query_opt(
            "select active_pid from pg_replication_slots where slot_name = $1",
            &[&slot],
        )
        .await?
        .and_then(|r| r.get(0)))
}

/// Notes that walhook owns this slot (`recovered` after `walhook recover-slot`).
pub async fn record_slot(client: &Client, slot: &str, recovered: bool) -> Result<(), StoreError> {
    client
        .execute(
            "insert into walhook.slots (slot_name, recovered_at) values ($1, case when $2 then now() end)
             on conflict (slot_name) do update
               set recovered_at = coalesce(excluded.recovered_at, walhook.slots.recovered_at)",
            &[&slot, &recovered],
        )
        .await?;
    Ok(())
}

/// `recover-slot`'s backfill, under the new slot's exported snapshot: every committed outbox row (created at
/// or after `since`) without a delivery for an enabled, matching endpoint that already existed when the row
/// was written. The per-pair check also completes events that were recorded for some endpoints only; the
/// endpoint's age keeps an endpoint added later from receiving history it never subscribed to.
pub async fn backfill_recovery(
    client: &mut Client,
    snapshot: &str,
    since: Option<SystemTime>,
) -> Result<u64, StoreError> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await?;
    tx.batch_execute(&format!(
        "set transaction snapshot '{}'",
        snapshot.replace('\'', "''")
    ))
    .await?;
    let n = tx
        .execute(
            "insert into walhook.deliveries (event_id, endpoint_id, webhook_id, status, next_attempt_at)
             select o.id, e.id, o.uid, 'pending', now()
               from walhook.outbox o
               join walhook.endpoints e on e.enabled and e.created_at <= o.created_at
                                       and walhook.matches(o.event_type, e.event_types)
              where o.created_at >= coalesce($1::timestamptz, '-infinity')
                and not exists (select 1 from walhook.deliveries d
                                 where d.event_id = o.id and d.endpoint_id = e.id)
             on conflict (event_id, endpoint_id) do nothing",
            &[&since],
        )
        .await?;
    tx.commit().await?;
    Ok(n)
}

/// The slot as `walhook status` shows it.
#[derive(Clone, Debug, Default)]
pub struct SlotStatus {
    pub active_pid: Option<i32>,
    pub client_addr: Option<String>,
    pub wal_status: Option<String>,
    pub confirmed: Option<String>,
    pub lag_bytes: Option<i64>,
    pub retained_bytes: Option<i64>,
    /// `safe_wal_size`: WAL that may still be written before the slot is invalidated (null: no limit).
    pub safe_bytes: Option<i64>,
    /// The walsender's `replay_lag` in seconds (null when caught up or idle).
    pub replay_lag: Option<f64>,
}

/// Backlog and per-endpoint numbers for `walhook status`.
#[derive(Clone, Debug, Default)]
pub struct Backlog {
    pub pending: i64,
    pub due: i64,
    pub dead: i64,
    /// Age in seconds of the oldest pending delivery.
    pub oldest_pending: Option<f64>,
}

#[derive(Clone, Debug, Default)]
pub struct EndpointStatus {
    pub id: i64,
    pub url: String,
    pub enabled: bool,
    /// Succeeded and dead in the last hour, pending now.
    pub succeeded: i64,
    pub pending: i64,
    pub dead: i64,
    pub last_error: Option<String>,
    /// Seconds since the last error.
    pub last_error_age: Option<f64>,
}

pub async fn slot_status(client: &Client, slot: &str) -> Result<Option<SlotStatus>, StoreError> {
    let row = client
        .query_opt(
            "select s.active_pid, host(r.client_addr), s.wal_status, s.confirmed_flush_lsn::text,
                    (pg_current_wal_lsn() - s.confirmed_flush_lsn)::int8,
                    (pg_current_wal_lsn() - s.restart_lsn)::int8,
                    s.safe_wal_size, extract(epoch from r.replay_lag)::float8
               from pg_replication_slots s left join pg_stat_replication r on r.pid = s.active_pid
              where s.slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| SlotStatus {
        active_pid: r.get(0),
        client_addr: r.get(1),
        wal_status: r.get(2),
        confirmed: r.get(3),
        lag_bytes: r.get(4),
        retained_bytes: r.get(5),
        safe_bytes: r.get(6),
        replay_lag: r.get(7),
    }))
}

pub async fn backlog(client: &Client) -> Result<Backlog, StoreError> {
    let r = client
        .query_one(
            "select count(*), count(*) filter (where next_attempt_at <= now()),
                    extract(epoch from now() - min(created_at))::float8,
                    (select count(*) from walhook.deliveries where status = 'dead')
               from walhook.deliveries where status = 'pending'",
            &[],
        )
        .await?;
    Ok(Backlog {
        pending: r.get(0),
        due: r.get(1),
        oldest_pending: r.get(2),
        dead: r.get(3),
    })
}

/// Per endpoint: succeeded and dead deliveries updated in the last hour, pending ones now, and the most
/// recent error of the last hour. One pass over the recent and pending deliveries.
pub async fn endpoint_status(client: &Client) -> Result<Vec<EndpointStatus>, StoreError> {
    let rows = client
        .query(
            "with recent as (
               select endpoint_id, status, last_error, last_attempt_at
                 from walhook.deliveries
                where status = 'pending' or updated_at > now() - interval '1 hour'
             ), counts as (
               select endpoint_id,
                      count(*) filter (where status = 'succeeded') as succeeded,
                      count(*) filter (where status = 'pending') as pending,
                      count(*) filter (where status = 'dead') as dead
                 from recent group by endpoint_id
             ), errors as (
               select distinct on (endpoint_id) endpoint_id, last_error,
                      extract(epoch from now() - last_attempt_at)::float8 as age
                 from recent
                where last_error is not null and last_attempt_at > now() - interval '1 hour'
                order by endpoint_id, last_attempt_at desc
             )
             select e.id, e.url, e.enabled, coalesce(c.succeeded, 0), coalesce(c.pending, 0),
                    coalesce(c.dead, 0), x.last_error, x.age
               from walhook.endpoints e
               left join counts c on c.endpoint_id = e.id
               left join errors x on x.endpoint_id = e.id
              order by coalesce(c.dead, 0) desc, coalesce(c.pending, 0) desc, e.id",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| EndpointStatus {
            id: r.get(0),
            url: r.get(1),
            enabled: r.get(2),
            succeeded: r.get(3),
            pending: r.get(4),
            dead: r.get(5),
            last_error: r.get(6),
            last_error_age: r.get(7),
        })
        .collect())
}

/// One retention batch over deliveries, walking the primary key from `after`: succeeded rows last updated
/// before `now - succeeded`, dead ones before `now - dead`, and their attempts, in one short transaction.
/// The conditions are repeated in the DELETE so that a row changed meanwhile (redelivered) is re-checked
/// and kept. Returns (last id looked at, deliveries deleted, attempts deleted, done): done once the batch is
/// empty or reaches rows younger than the shorter retention (ids grow with creation time).
const PRUNE_DELIVERIES: &str = "
with batch as (
  select id, created_at from walhook.deliveries where id > $1 order by id limit $2
), gone as (
  delete from walhook.deliveries d using batch b
   where d.id = b.id
     and ((d.status = 'succeeded' and d.updated_at < now() - make_interval(secs => $3))
       or (d.status = 'dead' and d.updated_at < now() - make_interval(secs => $4)))
  returning d.id
), attempts_gone as (
  delete from walhook.attempts a using gone where a.delivery_id = gone.id returning 1
)
select (select max(id) from batch), (select count(*) from gone), (select count(*) from attempts_gone),
       coalesce((select max(created_at) from batch) >= now() - make_interval(secs => least($3, $4)), true)";

/// One retention batch over the outbox (replication source): rows older than `now - outbox` with no
/// pending delivery. Deleting a row never loses its event: the slot streams inserts from the WAL, and a
/// pending or dead delivery keeps its own copy of the event (backfilled ones have none, hence the check).
const PRUNE_OUTBOX: &str = "
with batch as (
  select id, created_at from walhook.outbox where id > $1 order by id limit $2
), gone as (
  delete from walhook.outbox o using batch b
   where o.id = b.id and o.created_at < now() - make_interval(secs => $3)
     and not exists (select 1 from walhook.deliveries d where d.event_id = o.id and d.status = 'pending')
  returning o.id
)
select (select max(id) from batch), (select count(*) from gone),
       coalesce((select max(created_at) from batch) >= now() - make_interval(secs => $3), true)";

/// What one retention batch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Resume after this id; `None` when the batch was empty.
    pub last_id: Option<i64>,
    pub rows: i64,
    pub attempts: i64,
    /// No later row can be old enough yet.
    pub done: bool,
}

pub async fn prune_deliveries(
    client: &Client,
    after: i64,
    limit: i64,
    succeeded: Duration,
    dead: Duration,
) -> Result<Pruned, StoreError> {
    let r = client
        .query_one(
            PRUNE_DELIVERIES,
            &[
                &after,
                &limit,
                &succeeded.as_secs_f64(),
                &dead.as_secs_f64(),
            ],
        )
        .await?;
    Ok(Pruned {
        last_id: r.get(0),
        rows: r.get(1),
        attempts: r.get(2),
        done: r.get(3),
    })
}

pub async fn prune_outbox(
    client: &Client,
    after: i64,
    limit: i64,
    older_than: Duration,
) -> Result<Pruned, StoreError> {
    let r = client
        .query_one(PRUNE_OUTBOX, &[&after, &limit, &older_than.as_secs_f64()])
        .await?;
    Ok(Pruned {
        last_id: r.get(0),
        rows: r.get(1),
        attempts: 0,
        done: r.get(2),
    })
}
