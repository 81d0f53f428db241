//! Every SQL statement the daemon runs, in one place.
//!
//! Each component (recorder, scheduler, endpoint refresher, source) owns a `Store`: one connection with its
//! statements prepared once, so a slow batch write never queues behind a claim and the hot path pays no
//! parse/plan round trip. Batches travel as arrays and are expanded with `unnest`, one statement per batch.
//! The notify source's statements ([`OutboxQueue`], [`install_notify`], [`listen_outbox`]) touch columns and
//! objects that only it needs, so they are prepared on its connections alone.
//! Sessions run with `TimeZone=UTC` and `DateStyle=ISO` so timestamps read here print exactly as pgoutput
//! prints them (the envelope of a retry is byte-identical to the first attempt's).

use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, Statement};

use crate::conninfo::ConnInfo;
use crate::fanout::EndpointRow;
use crate::lsn::Lsn;

/// A failed statement or connection. Database errors are rendered by [`crate::pgerror`] (the server's message,
/// SQLSTATE, detail and hint, and the fix) and are not exposed as `source()`, so no chain repeats them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}", crate::pgerror::describe(.0))]
    Db(tokio_postgres::Error),
    /// Opening a session failed: `target` says where to and as whom (never the password).
    #[error("{}", crate::pgerror::describe_connect(.error, crate::pgerror::Job::Daemon, .target))]
    Connect {
        target: crate::pgerror::Target,
        error: tokio_postgres::Error,
    },
    #[error(
        "the walhook schema is missing or older than this walhook: run `walhook migrate` first"
    )]
    NotMigrated,
    #[error(
        "the walhook schema is at version {found} but this walhook needs version {needed}: run `walhook migrate`"
    )]
    Outdated { found: i32, needed: i32 },
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        StoreError::Db(e)
    }
}

impl StoreError {
    /// True when the connection is gone and a new one may succeed.
    pub fn is_connection(&self) -> bool {
        match self {
            // class 08: connection exception; class 57: operator intervention (shutdown, restart); 53300: no
            // connection slot left
            StoreError::Db(e) | StoreError::Connect { error: e, .. } => {
                e.is_closed()
                    || e.code().is_none_or(|c| {
                        c.code().starts_with("08")
                            || c.code().starts_with("57")
                            || c.code() == "53300"
                    })
            }
            StoreError::NotMigrated | StoreError::Outdated { .. } => false,
        }
    }

    /// The database error inside, if any (its SQLSTATE, its server message).
    pub fn db_error(&self) -> Option<&tokio_postgres::Error> {
        match self {
            StoreError::Db(e) | StoreError::Connect { error: e, .. } => Some(e),
            StoreError::NotMigrated | StoreError::Outdated { .. } => None,
        }
    }

    /// The message for a session of `job` (the fix for a missing privilege depends on it) as `target` (whose
    /// user the fix names; a connection error knows its own).
    pub fn describe_with(
        &self,
        job: crate::pgerror::Job,
        target: Option<&crate::pgerror::Target>,
    ) -> String {
        use crate::pgerror::{describe_connect, describe_for};
        match self {
            StoreError::Db(e) => describe_for(e, job, target),
            StoreError::Connect { target, error } => describe_connect(error, job, target),
            other => other.to_string(),
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
    /// The event, whose copy (type, payload, created_at, traceparent) is kept with deliveries that are not
    /// final-succeeded. Shared with the job, not cloned: a failed fan-out to many endpoints holds one payload.
    pub copy: Option<std::sync::Arc<crate::event::Event>>,
    /// For ordered endpoints: the key and the commit position that orders deliveries within it.
    pub ordering: Option<(String, Lsn)>,
    /// The event's tenant (`walhook.deliveries.tenant`: what a tenant's session may see).
    pub tenant: Option<String>,
}

impl RecordRow {
    /// Roughly what the row adds to a batch statement, in bytes.
    pub fn size(&self) -> usize {
        let attempt = self.attempt.as_ref().map_or(0, |a| {
            a.error.as_ref().map_or(0, String::len)
                + a.response_body.as_ref().map_or(0, String::len)
        });
        200 + attempt + self.copy.as_ref().map_or(0, |e| e.body.len())
    }
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
    /// The application's trace context, from the same copy or row.
    pub traceparent: Option<String>,
    pub ordering_key: Option<String>,
    pub commit_lsn: Option<Lsn>,
    /// `walhook.endpoints_generation` when it was claimed: the endpoint rows it must be judged by.
    pub endpoints_generation: i64,
    pub tenant: Option<String>,
    /// The catalog version of the copy's payload.
    pub version: Option<i32>,
    /// The event still has its outbox row (an event `walhook.publish()` wrote as a message never has one).
    pub in_outbox: bool,
}

/// Writes a batch of outcomes: deliveries upserted, attempts inserted, and with `processed` (the notify
/// source) the outbox rows whose last delivery is in the batch marked, in the same statement. The statement
/// without the mark is a separate one: a cached generic plan for `id = any($18)` made while the outbox was
/// small scans the whole outbox on every batch once it is large, even for an empty array.
///
/// Without `upsert` the deliveries are plainly inserted: the statement for a batch of first outcomes (events
/// the source just read), which have no row yet unless a replay or another instance recorded one. The
/// upsert's speculative insertion wrote 8 % more WAL per delivery in the drain benchmark; a batch that meets
/// an existing row fails whole on the unique constraint and is written again as an upsert
/// ([`Store::record`]).
fn record_sql(processed: bool, upsert: bool) -> String {
    let (tenant, version, processed) = if processed {
        (
            "$19",
            "$20",
            ", processed as (
  -- notify source: outbox rows whose last delivery is in this batch, in the same transaction
  update walhook.outbox set processed_at = now()
   where id = any($18::bigint[]) and processed_at is null
)",
        )
    } else {
        ("$18", "$19", "")
    };
    let conflict = if upsert {
        "  on conflict (event_id, endpoint_id) do update set
    status = excluded.status,
    attempts = d.attempts + excluded.attempts,
    schedule_step = excluded.schedule_step,
    next_attempt_at = excluded.next_attempt_at,
    last_status_code = case when excluded.last_attempt_at is null then d.last_status_code
                            else excluded.last_status_code end,
    last_error = case when excluded.last_attempt_at is null then d.last_error else excluded.last_error end,
    last_attempt_at = coalesce(excluded.last_attempt_at, d.last_attempt_at),
    -- a success drops the copy unless it comes with one (an event without an outbox row keeps it)
    event_type = case when excluded.status = 'succeeded' and excluded.event_type is null then null
                      else coalesce(d.event_type, excluded.event_type) end,
    payload = case when excluded.status = 'succeeded' and excluded.event_type is null then null
                   else coalesce(d.payload, excluded.payload) end,
    -- the version of whichever copy is kept
    event_version = case when excluded.status = 'succeeded' and excluded.event_type is null then null
                         when d.payload is not null then d.event_version else excluded.event_version end,
    event_created_at = case when excluded.status = 'succeeded' and excluded.event_type is null then null
                            else coalesce(d.event_created_at, excluded.event_created_at) end,
    traceparent = case when excluded.status = 'succeeded' and excluded.event_type is null then null
                       else coalesce(d.traceparent, excluded.traceparent) end,
    tenant = coalesce(d.tenant, excluded.tenant),
    updated_at = now()"
    } else {
        ""
    };
    format!(
        "
with input as (
  select * from unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::int[], $6::timestamptz[],
                       $7::int[], $8::text[], $9::timestamptz[], $10::int[], $11::text[],
                       $12::text[], $13::text[], $14::text[], $15::text[], $16::text[], $17::text[],
                       {tenant}::text[], {version}::int[])
    as t(event_id, endpoint_id, uid, status, schedule_step, next_attempt_at,
         status_code, error, attempted_at, duration_ms, response_body,
         event_type, payload, event_created_at, ordering_key, commit_lsn, traceparent, tenant, event_version)
), upserted as (
  insert into walhook.deliveries as d
    (event_id, endpoint_id, webhook_id, status, attempts, schedule_step, next_attempt_at,
     last_status_code, last_error, last_attempt_at, event_type, payload, event_created_at,
     ordering_key, commit_lsn, traceparent, tenant, event_version)
  select event_id, endpoint_id, uid::uuid, status, (attempted_at is not null)::int, schedule_step,
         next_attempt_at, status_code, error, attempted_at, event_type, payload::jsonb,
         event_created_at::timestamptz, ordering_key, commit_lsn::pg_lsn, traceparent, tenant, event_version
    from input
{conflict}
  returning d.id, d.event_id, d.endpoint_id, d.attempts
){processed}
insert into walhook.attempts (delivery_id, attempt, attempted_at, duration_ms, status_code, error, response_body)
select u.id, u.attempts, i.attempted_at, i.duration_ms, i.status_code, i.error, i.response_body
  from input i join upserted u using (event_id, endpoint_id)
 where i.attempted_at is not null"
    )
}

const ENDPOINTS: &str = "
select e.id, e.url, e.event_types, e.secret,
       (extract(epoch from e.timeout) * 1000)::bigint,
       case when e.retry_schedule is null then null
            else array(select (extract(epoch from d) * 1000)::bigint from unnest(e.retry_schedule) with ordinality u(d, n)
                        order by n) end,
       e.rate_limit, e.max_in_flight, e.headers::text, e.ordered, e.signing_key,
       array(select s.secret from walhook.endpoint_secrets s
              where s.endpoint_id = e.id and s.expires_at > now() order by s.expires_at desc),
       (select min(s.expires_at) from walhook.endpoint_secrets s where s.endpoint_id = e.id and s.expires_at > now()),
       e.paused, e.proxy, e.tenant, e.all_tenants, e.filter::text, t.rate_limit, e.event_versions::text,
       e.format, not e.enabled
  from walhook.endpoints e
  left join walhook.tenants t on t.tenant = e.tenant
 -- an endpoint awaiting its verification is loaded only to be sent that request (it accepts no event)
 where e.enabled or e.verification = 'pending'
 order by e.id";

const CATALOG: &str = "
select t.name, t.current_version, v.version, v.schema::text
  from walhook.event_types t
  left join walhook.event_type_versions v on v.event_type = t.name
 order by t.name, v.version";

/// Claims due deliveries for `lease` (their `next_attempt_at` moves past it) and returns them with the event
/// content, from the delivery's own copy or the outbox. `due` selects the ids to claim, locked.
fn claim_sql(due: &str) -> String {
    format!(
        "with due as ({due}), claimed as (
  update walhook.deliveries d
     set next_attempt_at = now() + make_interval(secs => $2::float8)
    from due
   where d.id = due.id
  returning d.id, d.event_id, d.endpoint_id, d.attempts, d.schedule_step, d.webhook_id::text as uid,
            d.event_type, d.payload::text as payload, d.event_created_at::text as event_created_at,
            d.ordering_key, d.commit_lsn::text as commit_lsn, d.traceparent, d.tenant, d.event_version
)
select c.id, c.event_id, c.endpoint_id, c.attempts, c.schedule_step, c.uid,
       coalesce(c.event_type, o.event_type), coalesce(c.payload, o.payload::text),
       coalesce(c.event_created_at, o.created_at::text), c.ordering_key, c.commit_lsn,
       (select generation from walhook.endpoints_generation),
       coalesce(c.traceparent, o.traceparent), coalesce(c.tenant, o.tenant), o.id is not null,
       case when c.payload is not null then c.event_version else o.event_version end
  from claimed c left join walhook.outbox o on o.id = c.event_id"
    )
}

/// Due unordered deliveries, oldest first per endpoint, at most `cap` for each endpoint listed in $3/$4 (the
/// endpoints with room now, with how much): no claim ever exceeds what an endpoint can take, so nothing claimed
/// is parked straight back.
const DUE: &str = "
  select d.id
    from unnest($3::bigint[], $4::int[]) as c(endpoint_id, cap)
   cross join lateral (
         select d.id from walhook.deliveries d
          where d.endpoint_id = c.endpoint_id and d.status = 'pending' and d.ordering_key is null
            and d.next_attempt_at <= now()
          order by d.next_attempt_at
          limit c.cap
            for update skip locked) d
   limit $1";

/// Ordered deliveries: per (endpoint, key) only the head (oldest in commit order) may go, and only when it is
/// due; a head in flight or backing off holds its key back and no other. Like [`DUE`], only the endpoints in
/// $3/$4 (those with room now) are looked at, each for at most its cap, so an endpoint that is down or busy
/// costs nothing however many deliveries it has pending.
///
/// Heads are found key by key, one probe of `deliveries_ordered_heads` per key (a skip scan: PostgreSQL 15
/// has none of its own, and `distinct on` would read every pending row of the endpoint), stopping as soon as
/// the cap is reached. The cost is the number of keys passed over, not the number of rows waiting behind them.
///
/// "Pending" and "due" are tested again on the locked row `d`: under READ COMMITTED, a row that another
/// instance claimed (or finished) after this statement's snapshot is locked in its new version and only the
/// conditions on the locked row are evaluated again (EvalPlanQual); the head's columns still show it due.
const DUE_ORDERED: &str = "
  select d.id
    from unnest($3::bigint[], $4::int[]) as c(endpoint_id, cap)
   cross join lateral (
         with recursive heads as (
           (select h.id, h.event_id, h.ordering_key, h.next_attempt_at
              from walhook.deliveries h
             where h.endpoint_id = c.endpoint_id and h.status = 'pending' and h.ordering_key is not null
             order by h.ordering_key, h.commit_lsn, h.event_id
             limit 1)
           union all
           select n.* from heads p
            cross join lateral (
                  select h.id, h.event_id, h.ordering_key, h.next_attempt_at
                    from walhook.deliveries h
                   where h.endpoint_id = c.endpoint_id and h.status = 'pending'
                     and h.ordering_key is not null and h.ordering_key > p.ordering_key
                   order by h.ordering_key, h.commit_lsn, h.event_id
                   limit 1) n
         )
         select heads.id from heads
          where heads.next_attempt_at <= now()
            -- notify source ($5): no outbox row of the key with a lower id is still unprocessed (its
            -- deliveries are recorded in the statement that marks it, so a head is never chosen before an
            -- older row is parked); `outbox_unprocessed_keys` makes this one probe
            and ($5::bool is not true or not exists (
                  select 1 from walhook.outbox o
                   where o.processed_at is null and o.ordering_key is not null
                     and o.ordering_key = heads.ordering_key and o.id < heads.event_id))
          limit c.cap) h
    join walhook.deliveries d on d.id = h.id
   where d.status = 'pending' and d.next_attempt_at <= now()
   limit $1
     for update of d skip locked";

/// A repeatable-read transaction that sees exactly what the exported `snapshot` saw.
async fn snapshot_transaction<'a>(
    client: &'a mut Client,
    snapshot: &str,
) -> Result<tokio_postgres::Transaction<'a>, StoreError> {
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
    Ok(tx)
}

/// Fans out, as pending deliveries due now, every committed outbox row that has no delivery yet, as seen by
/// the snapshot exported when the slot was created: exactly the rows the slot will never stream. The daemon
/// streams those rows through its pipeline instead ([`crate::source::backfill`]); this is the same rule in one
/// statement, which the tests hold the two to.
pub async fn backfill_before_slot(client: &mut Client, snapshot: &str) -> Result<u64, StoreError> {
    let tx = snapshot_transaction(client, snapshot).await?;
    let n = tx
        .execute(
            // with their own copy of the event: retention (of another instance) may delete the outbox row
            "insert into walhook.deliveries (event_id, endpoint_id, webhook_id, status, next_attempt_at,
                                             event_type, payload, event_created_at, ordering_key, traceparent,
                                             tenant, event_version)
             select o.id, e.id, o.uid, 'pending', now(), o.event_type, o.payload, o.created_at,
                    case when e.ordered then o.ordering_key end, o.traceparent, o.tenant, o.event_version
               from walhook.outbox o
               join walhook.endpoints e
                 on e.enabled and walhook.endpoint_accepts(o.event_type, o.tenant, o.payload, e.event_types,
                                                           e.tenant, e.all_tenants, e.filter)
              where not exists (select 1 from walhook.deliveries d where d.event_id = o.id)
                and o.processed_at is null
             on conflict (event_id, endpoint_id) do nothing",
            &[],
        )
        .await?;
    tx.commit().await?;
    Ok(n)
}

/// Opens a session whose read-only, repeatable-read transaction sees exactly what `snapshot` saw: the first
/// start's backfill reads the outbox rows the new slot will never stream through it, page by page, for as long
/// as that takes (so neither idle-in-transaction nor statement timeouts apply to it). The snapshot must still
/// be exported (its replication connection idle) until this returns; the transaction keeps it after that.
/// The session plans only [`backfill_page`], always as a walk of the primary key.
pub async fn open_snapshot(config: &ConnInfo, snapshot: &str) -> Result<Client, StoreError> {
    let client = connect_client(config).await?;
    client
        .batch_execute(
            // the pages walk the primary key: without that a freshly loaded outbox (no statistics yet) got a
            // parallel scan and sort of the whole table for every page of 1,000 rows (0.4 s each at 1M rows)
            "set idle_in_transaction_session_timeout = 0; set statement_timeout = 0;
             set enable_seqscan = off; set enable_sort = off; set max_parallel_workers_per_gather = 0;
             begin isolation level repeatable read read only",
        )
        .await?;
    client
        .batch_execute(&format!(
            "set transaction snapshot '{}'",
            snapshot.replace('\'', "''")
        ))
        .await?;
    Ok(client)
}

/// Up to `limit` outbox rows after `after` (by id) as the snapshot session of [`open_snapshot`] sees them:
/// committed before the slot, and not processed by the notify source (whose deliveries are recorded).
pub async fn backfill_page(
    client: &Client,
    after: i64,
    limit: i64,
) -> Result<Vec<OutboxRow>, StoreError> {
    let rows = client
        .query(
            "select id, uid::text, event_type, payload::text, created_at::text, ordering_key, traceparent,
                    tenant, event_version
               from walhook.outbox
              where id > $1 and processed_at is null
              order by id
              limit $2",
            &[&after, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| OutboxRow {
            id: r.get(0),
            uid: r.get(1),
            event_type: r.get(2),
            payload: r.get(3),
            created_at: r.get(4),
            recorded: Vec::new(),
            ordering_key: r.get(5),
            traceparent: r.get(6),
            tenant: r.get(7),
            version: r.get(8),
        })
        .collect())
}

/// When walhook first set out to create `slot` (`walhook.slots.created_at`, kept when an unfinished backfill
/// makes it create the slot again): deliveries recorded since are the backfill's own.
pub async fn slot_created_at(
    client: &Client,
    slot: &str,
) -> Result<Option<SystemTime>, StoreError> {
    Ok(client
        .query_opt(
            "select created_at from walhook.slots where slot_name = $1",
            &[&slot],
        )
        .await?
        .map(|r| r.get(0)))
}

fn claimed(r: &tokio_postgres::Row) -> Claimed {
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
        ordering_key: r.get(9),
        commit_lsn: r.get::<_, Option<String>>(10).and_then(|s| s.parse().ok()),
        endpoints_generation: r.get(11),
        traceparent: r.get(12),
        tenant: r.get(13),
        in_outbox: r.get(14),
        version: r.get(15),
    }
}

/// A row of `walhook.endpoint_state`: what this instance saw, merged in SQL with what others saw.
#[derive(Clone, Debug)]
pub struct EndpointStateRow {
    pub endpoint_id: i64,
    pub breaker: &'static str,
    pub open_until: Option<SystemTime>,
    /// When this instance's breaker last changed state; `None` if it never did.
    pub breaker_changed_at: Option<SystemTime>,
    pub consecutive_failures: i32,
    pub failing_since: Option<SystemTime>,
    pub last_success_at: Option<SystemTime>,
    pub last_failure_at: Option<SystemTime>,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
}

/// Attempts of one endpoint in one 10-minute bucket, to add to `walhook.endpoint_stats`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatsRow {
    pub endpoint_id: i64,
    pub bucket: SystemTime,
    pub successes: i64,
    pub failures: i64,
}

/// A breaker state some instance wrote, for the others to adopt.
#[derive(Clone, Debug)]
pub struct SharedBreaker {
    pub endpoint_id: i64,
    pub breaker: String,
    pub open_until: Option<SystemTime>,
    pub changed_at: SystemTime,
}

/// Upserts instances' views of endpoint health. Every instance writes what it saw; the row keeps the newest
/// breaker change, the latest success and failure, and as `failing_since` the first failure after the
/// latest success any instance saw (`delivery.disable_after` measures from it, across restarts).
const WRITE_ENDPOINT_STATE: &str = "
insert into walhook.endpoint_state as s
  (endpoint_id, breaker, open_until, breaker_changed_at, consecutive_failures, failing_since, last_success_at,
   last_failure_at, last_status_code, last_error, updated_at)
select *, now() from unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::int[],
                            $6::timestamptz[], $7::timestamptz[], $8::timestamptz[], $9::int[], $10::text[])
on conflict (endpoint_id) do update set
  breaker = case when excluded.breaker_changed_at > coalesce(s.breaker_changed_at, '-infinity')
                 then excluded.breaker else s.breaker end,
  open_until = case when excluded.breaker_changed_at > coalesce(s.breaker_changed_at, '-infinity')
                    then excluded.open_until else s.open_until end,
  breaker_changed_at = greatest(s.breaker_changed_at, excluded.breaker_changed_at),
  consecutive_failures = excluded.consecutive_failures,
  failing_since = least(
    case when s.last_failure_at > coalesce(greatest(s.last_success_at, excluded.last_success_at), '-infinity')
         then greatest(s.failing_since, s.last_success_at, excluded.last_success_at) end,
    case when excluded.last_failure_at > coalesce(greatest(s.last_success_at, excluded.last_success_at), '-infinity')
         then greatest(excluded.failing_since, s.last_success_at, excluded.last_success_at) end),
  last_success_at = greatest(s.last_success_at, excluded.last_success_at),
  last_failure_at = greatest(s.last_failure_at, excluded.last_failure_at),
  last_status_code = case
    when coalesce(greatest(excluded.last_success_at, excluded.last_failure_at), '-infinity')
         >= coalesce(greatest(s.last_success_at, s.last_failure_at), '-infinity')
    then excluded.last_status_code else s.last_status_code end,
  last_error = case when coalesce(excluded.last_failure_at, '-infinity') >= coalesce(s.last_failure_at, '-infinity')
                    then excluded.last_error else s.last_error end,
  updated_at = now()";

/// One connection with prepared statements.
pub struct Store {
    client: Client,
    record: Statement,
    record_processed: Statement,
    /// The same without the upsert, for batches of first outcomes.
    record_new: Statement,
    record_new_processed: Statement,
    claim: Statement,
    claim_ordered: Statement,
}

/// Session settings every walhook connection runs with.
fn session_config(config: &ConnInfo) -> ConnInfo {
    let mut config = config.clone();
    // jit first, so that options the user gives win: walhook's statements are short and run over and over,
    // and JIT compilation only ever added to them; with statistics taken while a table was small (a new
    // installation filling up, a burst), the server costed a claim of ordered heads high enough to compile
    // it, 0.3-1.2 s of CPU per claim instead of 1-30 ms
    let mut options = format!("-c jit=off {}", config.get_options().unwrap_or(""));
    // synchronous_commit: a recorded outcome releases its acknowledgement, and the slot may then be
    // confirmed (and saved) at once; with the server set to `off` a crash could lose the record after the
    // slot moved past it, so walhook's own commits always wait for their WAL flush
    options.push_str(
        " -c TimeZone=UTC -c DateStyle=ISO -c extra_float_digits=3 -c synchronous_commit=on",
    );
    config.options(options.trim());
    if config.get_application_name().is_none() {
        config.application_name("walhook");
    }
    config
}

/// Opens a plain (non-replication) connection with walhook's session settings; the connection task is
/// spawned and ends when the client is dropped.
pub async fn connect_client(config: &ConnInfo) -> Result<Client, StoreError> {
    connect_with(session_config(config)).await
}

/// [`connect_client`] for the session that holds a slot's leadership: its `application_name` names this
/// process and host (`walhook (pid 1234 on web-1)`), which is how `walhook status` and a standby's log tell
/// which instance leads. pg_stat_activity shows `application_name` to every role, unlike the client address.
pub async fn connect_leader(config: &ConnInfo) -> Result<Client, StoreError> {
    let mut session = session_config(config);
    let name = leader_application_name(session.get_application_name().unwrap_or("walhook"));
    session.application_name(&name);
    connect_with(session).await
}

/// `walhook (pid 1234 on web-1)`, cut to the 63 bytes PostgreSQL keeps.
fn leader_application_name(base: &str) -> String {
    let mut name = format!("{base} (pid {} on {})", std::process::id(), host_name());
    while name.len() > 63 {
        name.pop();
    }
    name
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates what fits
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match rc {
        0 if len > 0 => String::from_utf8_lossy(&buf[..len]).into_owned(),
        _ => "unknown host".to_string(),
    }
}

/// Opens a session with the TLS that `session.tls()` asks for ([`crate::pgtls::connect`]).
async fn open(session: &ConnInfo) -> Result<(Client, crate::pgtls::Connection), StoreError> {
    crate::pgtls::connect(session.pg(), session.tls())
        .await
        .map_err(|error| StoreError::Connect {
            target: crate::pgerror::Target::of(session),
            error,
        })
}

async fn connect_with(session: ConnInfo) -> Result<Client, StoreError> {
    let (client, connection) = open(&session).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("database connection ended: {e}");
        }
    });
    Ok(client)
}

/// Fails unless `walhook migrate` has applied every migration this binary knows: statements here rely on the
/// latest one's columns.
pub async fn check_schema(client: &Client) -> Result<(), StoreError> {
    let migrated: bool = client
        .query_one("select to_regclass('walhook.deliveries') is not null", &[])
        .await?
        .get(0);
    if !migrated {
        return Err(StoreError::NotMigrated);
    }
    let found: i32 = client
        .query_one(
            "select coalesce(max(version), 0) from walhook.schema_migrations",
            &[],
        )
        .await?
        .get(0);
    let needed = crate::schema::MIGRATIONS.last().map_or(0, |m| m.0);
    if found < needed {
        return Err(StoreError::Outdated { found, needed });
    }
    Ok(())
}

impl Store {
    pub async fn connect(config: &ConnInfo) -> Result<Store, StoreError> {
        let client = connect_client(config).await?;
        check_schema(&client).await?;
        let record = client.prepare(&record_sql(false, true)).await?;
        let record_processed = client.prepare(&record_sql(true, true)).await?;
        let record_new = client.prepare(&record_sql(false, false)).await?;
        let record_new_processed = client.prepare(&record_sql(true, false)).await?;
        let claim = client.prepare(&claim_sql(DUE)).await?;
        let claim_ordered = client.prepare(&claim_sql(DUE_ORDERED)).await?;
        Ok(Store {
            client,
            record,
            record_processed,
            record_new,
            record_new_processed,
            claim,
            claim_ordered,
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

    /// Enabled endpoints with their policies and the old secrets still in a grace period, and the time the
    /// first of those expires (the cache must reload then even if no row changes).
    pub async fn enabled_endpoints(
        &self,
    ) -> Result<(Vec<EndpointRow>, Option<SystemTime>), StoreError> {
        let rows = self.client.query(ENDPOINTS, &[]).await?;
        let mut next_expiry: Option<SystemTime> = None;
        let endpoints = rows
            .iter()
            .map(|r| {
                if let Some(t) = r.get::<_, Option<SystemTime>>(12) {
                    next_expiry = Some(next_expiry.map_or(t, |n| n.min(t)));
                }
                EndpointRow {
                    id: r.get(0),
                    url: r.get(1),
                    event_types: r.get(2),
                    secret: r.get(3),
                    timeout_ms: r.get(4),
                    retry_schedule_ms: r.get(5),
                    rate_limit: r.get(6),
                    max_in_flight: r.get(7),
                    headers: r.get(8),
                    ordered: r.get(9),
                    signing_key: r.get(10),
                    old_secrets: r.get(11),
                    paused: r.get(13),
                    proxy: r.get(14),
                    tenant: r.get(15),
                    all_tenants: r.get(16),
                    filter: r.get(17),
                    tenant_rate_limit: r.get(18),
                    event_versions: r.get(19),
                    format: r.get(20),
                    awaiting_verification: r.get(21),
                }
            })
            .collect();
        Ok((endpoints, next_expiry))
    }

    /// The event catalog: every type with each of its versions (a type without versions once, with none).
    pub async fn catalog(&self) -> Result<Vec<crate::catalog::CatalogRow>, StoreError> {
        let rows = self.client.query(CATALOG, &[]).await?;
        Ok(rows
            .iter()
            .map(|r| crate::catalog::CatalogRow {
                event_type: r.get(0),
                current_version: r.get(1),
                version: r.get(2),
                schema: r.get(3),
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

    /// The deliveries recorded for these events, as (event_id, endpoint_id, recorded before `since`).
    pub async fn deliveries_since(
        &self,
        event_ids: &[i64],
        since: SystemTime,
    ) -> Result<Vec<(i64, i64, bool)>, StoreError> {
        let rows = self
            .client
            .query(
                "select event_id, endpoint_id, created_at < $2 from walhook.deliveries
                  where event_id = any($1::bigint[])",
                &[&event_ids, &since],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    /// Writes a batch of outcomes in one statement (and so one transaction).
    /// Writes `rows` and marks the outbox rows `processed` (notify source), all in one statement.
    /// Records a batch (see [`record_sql`]). `first`: every row is the first outcome of its delivery this
    /// process writes (none was parked or claimed), so the batch is inserted and upserted only if some
    /// delivery turns out to be recorded already.
    pub async fn record(
        &self,
        rows: &[&RecordRow],
        processed: &[i64],
        first: bool,
    ) -> Result<(), StoreError> {
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
        let mut key = Vec::with_capacity(n);
        let mut lsn = Vec::with_capacity(n);
        let mut traceparent = Vec::with_capacity(n);
        let mut tenant = Vec::with_capacity(n);
        let mut version = Vec::with_capacity(n);
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
            let c = r.copy.as_deref();
            event_type.push(c.map(|c| c.event_type.as_str()));
            payload.push(c.map(|c| c.payload()));
            created.push(c.map(|c| c.created_at.as_str()));
            key.push(r.ordering.as_ref().map(|o| o.0.as_str()));
            lsn.push(r.ordering.as_ref().map(|o| o.1.to_string()));
            traceparent.push(c.and_then(|c| c.traceparent).map(|t| t.to_string()));
            tenant.push(r.tenant.as_deref());
            version.push(c.and_then(|c| c.version));
        }
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![
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
            &key,
            &lsn,
            &traceparent,
        ];
        let (upsert, insert) = if processed.is_empty() {
            (&self.record, &self.record_new)
        } else {
            params.push(&processed);
            (&self.record_processed, &self.record_new_processed)
        };
        params.push(&tenant);
        params.push(&version);
        if first {
            match self.client.execute(insert, &params).await {
                Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                    // a replay, or an instance that streamed before this one, recorded some of them: the
                    // statement wrote nothing, and the upsert merges them
                    tracing::debug!(
                        "a batch of first outcomes met recorded deliveries; upserting it"
                    );
                }
                result => {
                    result?;
                    return Ok(());
                }
            }
        }
        self.client.execute(upsert, &params).await?;
        Ok(())
    }

    /// Claims up to `limit` due unordered deliveries, at most `caps[i]` of endpoint `endpoints[i]`. The lease
    /// is the time the claimer has to record an outcome before the delivery is due again (a crashed
    /// claimer's work is retaken).
    pub async fn claim_due(
        &self,
        limit: i64,
        lease: Duration,
        endpoints: &[i64],
        caps: &[i32],
    ) -> Result<Vec<Claimed>, StoreError> {
        let rows = self
            .client
            .query(
                &self.claim,
                &[&limit, &lease.as_secs_f64(), &endpoints, &caps],
            )
            .await?;
        Ok(rows.iter().map(claimed).collect())
    }

    /// Writes this instance's view of endpoint health (merged with other instances' in SQL) and adds its
    /// attempt counts to `walhook.endpoint_stats`, in one transaction.
    pub async fn write_endpoint_state(
        &mut self,
        rows: &[EndpointStateRow],
        stats: &[StatsRow],
    ) -> Result<(), StoreError> {
        let col = |f: &dyn Fn(&EndpointStateRow) -> Option<SystemTime>| {
            rows.iter().map(f).collect::<Vec<_>>()
        };
        let ids: Vec<i64> = rows.iter().map(|r| r.endpoint_id).collect();
        let breaker: Vec<&str> = rows.iter().map(|r| r.breaker).collect();
        let failures: Vec<i32> = rows.iter().map(|r| r.consecutive_failures).collect();
        let codes: Vec<Option<i32>> = rows.iter().map(|r| r.last_status_code).collect();
        let errors: Vec<Option<&str>> = rows.iter().map(|r| r.last_error.as_deref()).collect();
        let tx = self.client.transaction().await?;
        if !rows.is_empty() {
            tx.execute(
                WRITE_ENDPOINT_STATE,
                &[
                    &ids,
                    &breaker,
                    &col(&|r| r.open_until),
                    &col(&|r| r.breaker_changed_at),
                    &failures,
                    &col(&|r| r.failing_since),
                    &col(&|r| r.last_success_at),
                    &col(&|r| r.last_failure_at),
                    &codes,
                    &errors,
                ],
            )
            .await?;
        }
        if !stats.is_empty() {
            let ids: Vec<i64> = stats.iter().map(|r| r.endpoint_id).collect();
            let buckets: Vec<SystemTime> = stats.iter().map(|r| r.bucket).collect();
            let ok: Vec<i64> = stats.iter().map(|r| r.successes).collect();
            let failed: Vec<i64> = stats.iter().map(|r| r.failures).collect();
            tx.execute(
                "insert into walhook.endpoint_stats as t (endpoint_id, bucket, successes, failures)
                 select * from unnest($1::bigint[], $2::timestamptz[], $3::bigint[], $4::bigint[])
                 on conflict (endpoint_id, bucket) do update
                   set successes = t.successes + excluded.successes, failures = t.failures + excluded.failures",
                &[&ids, &buckets, &ok, &failed],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Breaker states changed after `since` (by any instance), for this one to adopt.
    pub async fn breakers_changed_since(
        &self,
        since: SystemTime,
    ) -> Result<Vec<SharedBreaker>, StoreError> {
        let rows = self
            .client
            .query(
                "select endpoint_id, breaker, open_until, breaker_changed_at from walhook.endpoint_state
                  where breaker_changed_at > $1 order by breaker_changed_at",
                &[&since],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| SharedBreaker {
                endpoint_id: r.get(0),
                breaker: r.get(1),
                open_until: r.get(2),
                changed_at: r.get(3),
            })
            .collect())
    }

    /// Disables the endpoints that have been failing, by every instance's account, for longer than
    /// `after` since the later of their first failure and their last resumption; returns (id, reason).
    /// It runs every few seconds and finds none almost always, so it looks first and updates only what it
    /// found: an UPDATE of `walhook.endpoints` fires the generation trigger even when it changes no row, and
    /// every bump makes each daemon reload its endpoints before the events committed after it.
    pub async fn disable_failing(&self, after: Duration) -> Result<Vec<(i64, String)>, StoreError> {
        const FAILING: &str = "e.enabled and not e.paused
                    and greatest(s.failing_since, e.resumed_at) <= now() - make_interval(secs => $1)";
        let found: Vec<i64> = self
            .client
            .query(
                &format!(
                    "select e.id from walhook.endpoints e join walhook.endpoint_state s on s.endpoint_id = e.id
                      where {FAILING}"
                ),
                &[&after.as_secs_f64()],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if found.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self
            .client
            .query(
                &format!(
                    "update walhook.endpoints e
                    set enabled = false,
                        disabled_reason = format(
                          'failing continuously since %s (longer than delivery.disable_after); last error: %s; '
                          'once it is fixed: UPDATE walhook.endpoints SET enabled = true, then '
                          'SELECT walhook.recover(%s, since => ''%s'') re-creates what it missed',
                          to_char(s.failing_since, 'YYYY-MM-DD HH24:MI:SSOF'), coalesce(s.last_error, 'unknown'),
                          e.id, to_char(s.failing_since, 'YYYY-MM-DD HH24:MI:SSOF'))
                   from walhook.endpoint_state s
                  where s.endpoint_id = e.id and e.id = any($2) and {FAILING}
                 returning e.id, e.disabled_reason"
                ),
                &[&after.as_secs_f64(), &found],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Forgets attempt counts older than two hours (the health view shows the last one).
    pub async fn prune_endpoint_stats(&self) -> Result<u64, StoreError> {
        Ok(self
            .client
            .execute(
                "delete from walhook.endpoint_stats where bucket < now() - interval '2 hours'",
                &[],
            )
            .await?)
    }

    /// Disables an endpoint with the reason (410 Gone, or failing for too long).
    pub async fn disable_endpoint(&self, id: i64, reason: &str) -> Result<(), StoreError> {
        self.client
            .execute(
                "update walhook.endpoints set enabled = false, disabled_reason = $2 where id = $1 and enabled",
                &[&id, &reason],
            )
            .await?;
        Ok(())
    }

    /// Claims due heads of ordered keys, up to `limit` in all and `caps[i]` of endpoint `endpoints[i]` (the
    /// endpoints with room now). `by_outbox` (the notify source): a key's head also waits for older outbox
    /// rows of the key that are not processed yet.
    pub async fn claim_ordered(
        &self,
        limit: i64,
        lease: Duration,
        endpoints: &[i64],
        caps: &[i32],
        by_outbox: bool,
    ) -> Result<Vec<Claimed>, StoreError> {
        let rows = self
            .client
            .query(
                &self.claim_ordered,
                &[&limit, &lease.as_secs_f64(), &endpoints, &caps, &by_outbox],
            )
            .await?;
        Ok(rows.iter().map(claimed).collect())
    }
}

/// The notify source's wake-up channel; the trigger installed by [`install_notify`] notifies it.
const OUTBOX_CHANNEL: &str = "walhook_outbox";

/// The partial index the claim scans, and the statement-level trigger that wakes pollers. Only the notify
/// source needs them: in replication mode `processed_at` stays null, so the index would grow with every row.
const UNPROCESSED_INDEX: &str = "walhook.outbox_unprocessed";
const CREATE_UNPROCESSED_INDEX: &str =
    "create index concurrently if not exists outbox_unprocessed \
     on walhook.outbox (id) where processed_at is null";
/// The same rows by key, for the ordered-head claim's check that no older row of a key is still unprocessed
/// (without it, that check reads every unprocessed row below the head). Optional: an older installation
/// whose role may not create it keeps working, only slower, and is told how to add it.
const KEYS_INDEX: &str = "walhook.outbox_unprocessed_keys";
const CREATE_KEYS_INDEX: &str = "create index concurrently if not exists outbox_unprocessed_keys \
     on walhook.outbox (ordering_key, id) where processed_at is null and ordering_key is not null";
const CREATE_WAKE_TRIGGER: &str =
    "create or replace trigger outbox_wake after insert on walhook.outbox \
     for each statement execute function walhook.outbox_wake()";
const DROP_WAKE_TRIGGER: &str = "drop trigger if exists outbox_wake on walhook.outbox";

/// Serialises installations by several daemons (session advisory lock, "notify" in ASCII).
const INSTALL_LOCK: i64 = 0x6e6f_7469_6679;

/// Claims the oldest unprocessed rows whose lease is free. Rows commit out of id order, so there is no cursor:
/// whatever is committed, unprocessed and unleased is eligible, and a rolled-back insert is never visible.
/// Each row comes with the endpoints it already has deliveries for (a lapsed claim of a crashed daemon).
const CLAIM_OUTBOX: &str = "
with next as (
  select id
    from walhook.outbox
   where processed_at is null and (claimed_until is null or claimed_until <= now())
   order by id
   limit $1
     for update skip locked
)
update walhook.outbox o
   set claimed_until = now() + make_interval(secs => $2::float8)
  from next
 where o.id = next.id
returning o.id, o.uid::text, o.event_type, o.payload::text, o.created_at::text,
          array(select d.endpoint_id from walhook.deliveries d where d.event_id = o.id), o.ordering_key,
          o.traceparent, o.tenant, o.event_version,
          (select g.generation from walhook.endpoints_generation g)";

const MARK_PROCESSED: &str = "
update walhook.outbox set processed_at = now() where id = any($1::bigint[]) and processed_at is null";

const RENEW_CLAIMS: &str = "
update walhook.outbox set claimed_until = now() + make_interval(secs => $2::float8)
 where id = any($1::bigint[]) and processed_at is null";

/// What [`install_notify`] had to create.
#[derive(Debug, Default)]
pub struct Installed {
    pub index: bool,
    pub trigger: bool,
    /// `notify.wake_trigger = false` and the trigger was there.
    pub trigger_dropped: bool,
    /// The index by key was created now.
    pub keys_index: bool,
    /// Why the optional index by key could not be created (the server's refusal), when it could not.
    pub keys_index_refused: Option<String>,
}

/// Creates the unprocessed-rows indexes and the wake-up trigger when they are missing. Creating them needs
/// ownership of `walhook.outbox`; checking first lets an owner create them once for a less privileged role.
/// The index by key came later and is optional: a role that may not create it is not stopped for it
/// (`keys_index_refused` says why, for a warning).
/// The index is built `concurrently` so applications keep inserting meanwhile; an advisory lock makes a
/// second daemon wait instead of racing the build, so an invalid index found under it is a leftover of an
/// interrupted build and is rebuilt. The trigger takes a short lock that queues inserts, so it waits at most
/// `lock_timeout` for transactions holding the table.
pub async fn install_notify(
    config: &ConnInfo,
    wake_trigger: bool,
) -> Result<Installed, StoreError> {
    let client = connect_client(config).await?;
    // try-and-sleep rather than a blocking wait: a blocked statement would hold a snapshot that the other
    // daemon's concurrent index build has to wait for (a deadlock)
    while !client
        .query_one("select pg_try_advisory_lock($1)", &[&INSTALL_LOCK])
        .await?
        .get::<_, bool>(0)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut installed = Installed::default();
    let valid: Option<bool> = client
        .query_opt(
            "select indisvalid from pg_index where indexrelid = to_regclass($1)",
            &[&UNPROCESSED_INDEX],
        )
        .await?
        .map(|r| r.get(0));
    if valid == Some(false) {
        client
            .batch_execute(&format!("drop index concurrently {UNPROCESSED_INDEX}"))
            .await?;
    }
    if valid != Some(true) {
        client.batch_execute(CREATE_UNPROCESSED_INDEX).await?;
        installed.index = true;
    }
    let valid: Option<bool> = client
        .query_opt(
            "select indisvalid from pg_index where indexrelid = to_regclass($1)",
            &[&KEYS_INDEX],
        )
        .await?
        .map(|r| r.get(0));
    if valid != Some(true) {
        // one statement per call: a concurrent build refuses to run inside the implicit transaction of several
        let drop_invalid = format!("drop index concurrently {KEYS_INDEX}");
        let build = async {
            if valid == Some(false) {
                client.batch_execute(&drop_invalid).await?;
            }
            client.batch_execute(CREATE_KEYS_INDEX).await
        };
        match build.await {
            Ok(()) => installed.keys_index = true,
            Err(e) if e.code().is_some_and(|c| c.code() == "42501") => {
                installed.keys_index_refused = Some(crate::pgerror::facts(&e));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let trigger = client
        .query_opt(
            "select 1 from pg_trigger where tgrelid = 'walhook.outbox'::regclass and tgname = 'outbox_wake'",
            &[],
        )
        .await?;
    if trigger.is_some() && !wake_trigger {
        client
            .batch_execute(&format!(
                "set lock_timeout = '5s'; {DROP_WAKE_TRIGGER}; reset lock_timeout"
            ))
            .await?;
        installed.trigger_dropped = true;
    }
    if trigger.is_none() && wake_trigger {
        client
            .batch_execute(&format!(
                "set lock_timeout = '5s'; {CREATE_WAKE_TRIGGER}; reset lock_timeout"
            ))
            .await?;
        installed.trigger = true;
    }
    // dropping the client closes the session, which releases the advisory lock
    Ok(installed)
}

/// The statements an owner of `walhook.outbox` can run to create what [`install_notify`] creates (or, without
/// `wake_trigger`, to drop the trigger): one per line, each to be run on its own, since `create index
/// concurrently` cannot run inside a transaction block (which `psql -c` with several statements is).
pub fn notify_install_sql(wake_trigger: bool) -> String {
    let trigger = if wake_trigger {
        CREATE_WAKE_TRIGGER
    } else {
        DROP_WAKE_TRIGGER
    };
    format!("{CREATE_UNPROCESSED_INDEX};\n{CREATE_KEYS_INDEX};\n{trigger};")
}

/// The statement an owner of `walhook.outbox` runs to add the optional index by key (see [`install_notify`]).
pub fn notify_keys_index_sql() -> String {
    format!("{CREATE_KEYS_INDEX};")
}

/// Why the notify source cannot start when its role may not create its index and trigger (`facts`: the
/// server's refusal), with the statements for the table's owner and how to run them.
pub fn notify_owner_message(facts: &str, wake_trigger: bool) -> String {
    format!(
        "cannot create the notify source's index and trigger on walhook.outbox: {facts}; as the owner of \
         walhook.outbox run these statements one at a time (CREATE INDEX CONCURRENTLY cannot run inside a \
         transaction block: use psql -f with a file holding them, or one psql -c per statement), then start \
         walhook again:\n{}",
        notify_install_sql(wake_trigger)
    )
}

/// Whether [`install_notify`] would have to create or drop something: the index is missing or invalid, or
/// the trigger's presence differs from `wake_trigger`.
pub async fn notify_install_needed(
    client: &Client,
    wake_trigger: bool,
) -> Result<bool, StoreError> {
    let row = client
        .query_one(
            "select coalesce((select indisvalid from pg_index where indexrelid = to_regclass($1)), false),
                    exists (select 1 from pg_trigger
                             where tgrelid = 'walhook.outbox'::regclass and tgname = 'outbox_wake')",
            &[&UNPROCESSED_INDEX],
        )
        .await?;
    let (index, trigger): (bool, bool) = (row.get(0), row.get(1));
    Ok(!index || trigger != wake_trigger)
}

/// Whether a logical replication slot of this name exists in this database (and so retains WAL).
pub async fn replication_slot_exists(client: &Client, slot: &str) -> Result<bool, StoreError> {
    Ok(client
        .query_opt(
            "select 1 from pg_replication_slots where slot_name = $1 and database = current_database()",
            &[&slot],
        )
        .await?
        .is_some())
}

/// The prefix of the messages `walhook.publish()` writes (sql/016_publish.sql): the replication source
/// streams messages with exactly this prefix as events.
pub async fn publish_prefix(client: &Client) -> Result<String, StoreError> {
    Ok(client
        .query_one("select prefix from walhook.publish_settings", &[])
        .await?
        .get(0))
}

/// The slot whose existence makes `walhook.publish()` write messages rather than outbox rows (the same
/// condition as the function's): walhook's slot of this database, consistent, usable and backfilled.
pub async fn publishing_slot(client: &Client) -> Result<Option<String>, StoreError> {
    Ok(client
        .query_opt(
            "select w.slot_name
               from walhook.slots w
               join pg_catalog.pg_replication_slots r on r.slot_name = w.slot_name
              where w.backfilled and r.database = current_database() and r.slot_type = 'logical'
                and r.plugin = 'pgoutput' and r.confirmed_flush_lsn is not null
                and r.wal_status is distinct from 'lost'
                and current_setting('server_version_num')::integer >= 140000
              limit 1",
            &[],
        )
        .await?
        .map(|r| r.get(0)))
}

/// How often an idle listener checks that its connection still answers (a silently dropped TCP connection
/// would otherwise go unnoticed for hours), and how long the answer may take.
const LISTENER_PING: Duration = Duration::from_secs(30);
const LISTENER_PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Listens on the outbox channel on a connection of its own, waking `wake` once subscribed (rows committed
/// while nobody listened are found by the poll that follows) and on every notification. Returns when the
/// connection ends; the error says why.
pub async fn listen_outbox(
    config: &ConnInfo,
    wake: &Notify,
    listening: &std::sync::atomic::AtomicBool,
) -> Result<(), StoreError> {
    let result = listen_outbox_until_closed(config, wake, listening).await;
    listening.store(false, std::sync::atomic::Ordering::Relaxed);
    result
}

async fn listen_outbox_until_closed(
    config: &ConnInfo,
    wake: &Notify,
    listening: &std::sync::atomic::AtomicBool,
) -> Result<(), StoreError> {
    let (client, mut connection) = open(&session_config(config)).await?;
    // the connection is driven here, not spawned, to see its asynchronous messages
    let drive = async {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(StoreError::from(e)),
                None => return Ok(()),
            }
        }
    };
    let subscribe = async {
        client
            .batch_execute(&format!("listen {OUTBOX_CHANNEL}"))
            .await?;
        listening.store(true, std::sync::atomic::Ordering::Relaxed);
        wake.notify_one();
        loop {
            tokio::time::sleep(LISTENER_PING).await;
            match tokio::time::timeout(LISTENER_PING_TIMEOUT, client.simple_query("")).await {
                Ok(result) => drop(result?),
                Err(_) => return Ok(()),
            }
        }
    };
    tokio::select! {
        r = drive => r,
        r = subscribe => r,
    }
}

/// An outbox row claimed by the notify source.
#[derive(Debug)]
pub struct OutboxRow {
    pub id: i64,
    pub uid: String,
    pub event_type: String,
    pub payload: String,
    pub created_at: String,
    /// Endpoints that already have a delivery of this row.
    pub recorded: Vec<i64>,
    pub ordering_key: Option<String>,
    pub traceparent: Option<String>,
    pub tenant: Option<String>,
    pub version: Option<i32>,
}

/// The notify source's connection: claims, marks and lease renewals on `walhook.outbox`.
pub struct OutboxQueue {
    store: Store,
    claim: Statement,
    mark: Statement,
    renew: Statement,
}

impl OutboxQueue {
    pub async fn connect(config: &ConnInfo) -> Result<OutboxQueue, StoreError> {
        let store = Store::connect(config).await?;
        let claim = store.client.prepare(CLAIM_OUTBOX).await?;
        let mark = store.client.prepare(MARK_PROCESSED).await?;
        let renew = store.client.prepare(RENEW_CLAIMS).await?;
        Ok(OutboxQueue {
            store,
            claim,
            mark,
            renew,
        })
    }

    pub fn is_closed(&self) -> bool {
        self.store.is_closed()
    }

    pub fn client(&self) -> &Client {
        self.store.client()
    }

    /// Claims up to `limit` rows for `lease`, in id order, with the `walhook.endpoints_generation` the claim
    /// saw (None when it claimed no row): every endpoint change committed before the rows is in it, so rows
    /// fanned out by a cache that has caught up with it go to the endpoints as they were when the rows
    /// committed, or newer.
    pub async fn claim(
        &self,
        limit: i64,
        lease: Duration,
    ) -> Result<(Vec<OutboxRow>, Option<i64>), StoreError> {
        let rows = self
            .store
            .client
            .query(&self.claim, &[&limit, &lease.as_secs_f64()])
            .await?;
        let generation = rows.first().map(|r| r.get::<_, i64>(10));
        let mut claimed: Vec<OutboxRow> = rows
            .iter()
            .map(|r| OutboxRow {
                id: r.get(0),
                uid: r.get(1),
                event_type: r.get(2),
                payload: r.get(3),
                created_at: r.get(4),
                recorded: r.get(5),
                ordering_key: r.get(6),
                traceparent: r.get(7),
                tenant: r.get(8),
                version: r.get(9),
            })
            .collect();
        claimed.sort_unstable_by_key(|r| r.id);
        Ok((claimed, generation))
    }

    /// Marks rows processed, all in one statement.
    pub async fn mark_processed(&self, ids: &[i64]) -> Result<(), StoreError> {
        self.store.client.execute(&self.mark, &[&ids]).await?;
        Ok(())
    }

    /// Extends the lease of rows still being delivered, so a live daemon's claims never lapse.
    pub async fn renew(&self, ids: &[i64], lease: Duration) -> Result<(), StoreError> {
        self.store
            .client
            .execute(&self.renew, &[&ids, &lease.as_secs_f64()])
            .await?;
        Ok(())
    }
}

// ---- operations: sampling, status, retention, slot bookkeeping ----

/// Slot position, retained WAL and backlog in one statement, for the periodic sampler; with no slot the slot
/// columns are null. Every instance runs it every `health.interval`, so it reads indexes only: pending rows
/// are counted in two parts whose conditions are exactly those of the partial indexes `deliveries_due` and
/// `deliveries_ordered_heads` (`status = 'pending'` alone implies neither, and would scan the table), dead ones
/// through `deliveries_dead`.
const SLOT_SAMPLE: &str = "
select (pg_current_wal_lsn() - s.confirmed_flush_lsn)::int8,
       (pg_current_wal_lsn() - s.restart_lsn)::int8,
       s.wal_status,
       (select count(*) from walhook.deliveries where status = 'pending' and ordering_key is null)
         + (select count(*) from walhook.deliveries where status = 'pending' and ordering_key is not null),
       (select count(*) from walhook.deliveries where status = 'dead')
  from (select 1) one
  left join pg_replication_slots s on s.slot_name = $1 and s.database = current_database()";

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

/// The columns of `walhook.outbox` an event is made of: a publication that leaves one out streams events
/// walhook cannot build (or, for `traceparent`, builds without their trace context).
pub const OUTBOX_COLUMNS: [&str; 8] = [
    "id",
    "uid",
    "event_type",
    "payload",
    "created_at",
    "ordering_key",
    "traceparent",
    "tenant",
];

/// Columns of [`OUTBOX_COLUMNS`] added after the slot may have started: WAL written before the migration
/// that added one is decoded with the table as it was then, without it (an upgrade with a backlog), so the
/// stream takes a relation without it and its events have none. A publication leaving it out is refused.
pub const OUTBOX_COLUMNS_ADDED_LATER: [&str; 2] = ["traceparent", "tenant"];

/// What is wrong with `publication` for walhook, each with its fix; empty when it streams every insert into
/// `walhook.outbox` with all its columns. A publication is trusted by more than its name: one that leaves out
/// the table, inserts, columns or rows would have the slot confirmed past events that were never streamed.
pub async fn publication_problems(
    client: &Client,
    publication: &str,
) -> Result<Vec<String>, StoreError> {
    let quoted = format!("\"{}\"", publication.replace('"', "\"\""));
    let Some(row) = client
        .query_opt(
            "select p.pubinsert,
                    (select to_jsonb(t)::text from pg_publication_tables t
                      where t.pubname = p.pubname and t.schemaname = 'walhook' and t.tablename = 'outbox')
               from pg_publication p where p.pubname = $1",
            &[&publication],
        )
        .await?
    else {
        return Ok(vec![format!(
            "publication {publication:?} does not exist; create it as the owner of walhook.outbox: CREATE \
             PUBLICATION {quoted} FOR TABLE walhook.outbox WITH (publish = 'insert')"
        )]);
    };
    let mut problems = Vec::new();
    if !row.get::<_, bool>(0) {
        problems.push(format!(
            "publication {publication:?} does not publish inserts; as its owner: ALTER PUBLICATION {quoted} \
             SET (publish = 'insert')"
        ));
    }
    let reset = format!("ALTER PUBLICATION {quoted} SET TABLE walhook.outbox");
    let table = row
        .get::<_, Option<String>>(1)
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    match table {
        None => problems.push(format!(
            "publication {publication:?} does not include walhook.outbox; as its owner: ALTER PUBLICATION \
             {quoted} ADD TABLE walhook.outbox"
        )),
        Some(table) => {
            // PostgreSQL 15 and later: a row filter, or a column list
            if let Some(filter) = table.get("rowfilter").and_then(|f| f.as_str()) {
                problems.push(format!(
                    "publication {publication:?} filters the rows of walhook.outbox (WHERE {filter}): the \
                     events it leaves out would never be delivered; remove the filter as its owner: {reset}"
                ));
            }
            if let Some(names) = table.get("attnames").and_then(|a| a.as_array()) {
                let missing: Vec<&str> = OUTBOX_COLUMNS
                    .iter()
                    .filter(|c| !names.iter().any(|n| n.as_str() == Some(**c)))
                    .copied()
                    .collect();
                if !missing.is_empty() {
                    problems.push(format!(
                        "publication {publication:?} leaves out columns of walhook.outbox ({}); remove its \
                         column list as its owner: {reset}",
                        missing.join(", ")
                    ));
                }
            }
        }
    }
    Ok(problems)
}

/// A slot row of `pg_replication_slots`.
#[derive(Clone, Debug)]
pub struct SlotRow {
    pub wal_status: Option<String>,
    /// The database a logical slot decodes (`None` for a physical slot).
    pub database: Option<String>,
    pub plugin: Option<String>,
    /// True when the slot is a logical slot of this database: slot names are cluster-wide, so a slot of
    /// this name may belong to another deployment.
    pub ours: bool,
}

/// The slot as the server lists it, and when walhook recorded creating it (text, for messages); `None`s
/// when absent. Fails with `NotMigrated` before `walhook.slots` exists.
pub async fn slot_state(
    client: &Client,
    slot: &str,
) -> Result<(Option<SlotRow>, Option<RecordedSlot>), StoreError> {
    let migrated: bool = client
        .query_one("select to_regclass('walhook.slots') is not null", &[])
        .await?
        .get(0);
    if !migrated {
        return Err(StoreError::NotMigrated);
    }
    let slot_row = client
        .query_opt(
            "select wal_status, database::text, plugin::text,
                    slot_type = 'logical' and database = current_database() and plugin = 'pgoutput'
               from pg_replication_slots where slot_name = $1",
            &[&slot],
        )
        .await?
        .map(|row| SlotRow {
            wal_status: row.get(0),
            database: row.get(1),
            plugin: row.get(2),
            ours: row.get::<_, Option<bool>>(3).unwrap_or(false),
        });
    let recorded = client
        .query_opt(
            "select to_char(created_at, 'YYYY-MM-DD HH24:MI:SS TZ'), timeline, confirmed_at
               from walhook.slots where slot_name = $1",
            &[&slot],
        )
        .await?
        .map(|r| RecordedSlot {
            created_at: r.get(0),
            timeline: r.get(1),
            confirmed_at: r.get(2),
        });
    Ok((slot_row, recorded))
}

/// What `walhook.slots` says of a slot walhook created.
#[derive(Clone, Debug)]
pub struct RecordedSlot {
    /// When it was created, as text for messages.
    pub created_at: String,
    /// The timeline of the server it was created or last streamed on (`None` before walhook recorded it).
    pub timeline: Option<i32>,
    /// The commit time of the newest transaction it confirmed.
    pub confirmed_at: Option<SystemTime>,
}

/// Records the timeline of the server the slot streams from.
pub async fn record_slot_timeline(
    client: &Client,
    slot: &str,
    timeline: i32,
) -> Result<(), StoreError> {
    client
        .execute(
            "update walhook.slots set timeline = $2 where slot_name = $1 and timeline is distinct from $2",
            &[&slot, &timeline],
        )
        .await?;
    Ok(())
}

/// The pid of the walsender holding the slot, if any.
pub async fn slot_active_pid(client: &Client, slot: &str) -> Result<Option<i32>, StoreError> {
    Ok(client
        .query_opt(
            "select active_pid from pg_replication_slots where slot_name = $1 and database = current_database()",
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
               set recovered_at = coalesce(excluded.recovered_at, walhook.slots.recovered_at),
                   backfilled = true",
            &[&slot, &recovered],
        )
        .await?;
    Ok(())
}

/// Marks the slot as about to be created, its backfill not done yet (see `walhook.slots.backfilled`).
pub async fn mark_slot_backfill_pending(client: &Client, slot: &str) -> Result<(), StoreError> {
    client
        .execute(
            // not once the slot exists: another instance created it and owns its backfill
            "insert into walhook.slots (slot_name, backfilled)
             select $1::text, false
              where not exists (select 1 from pg_replication_slots where slot_name = $1::text)
             on conflict (slot_name) do update set backfilled = false",
            &[&slot],
        )
        .await?;
    Ok(())
}

/// True when a slot was being created and the rows committed before it were never queued.
pub async fn slot_backfill_pending(client: &Client, slot: &str) -> Result<bool, StoreError> {
    let row = client
        .query_opt(
            "select not backfilled from walhook.slots where slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.is_some_and(|r| r.get(0)))
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
    let tx = snapshot_transaction(client, snapshot).await?;
    let n = tx
        .execute(
            "insert into walhook.deliveries (event_id, endpoint_id, webhook_id, status, next_attempt_at,
                                             event_type, payload, event_created_at, ordering_key, traceparent,
                                             tenant, event_version)
             select o.id, e.id, o.uid, 'pending', now(), o.event_type, o.payload, o.created_at,
                    case when e.ordered then o.ordering_key end, o.traceparent, o.tenant, o.event_version
               from walhook.outbox o
               join walhook.endpoints e
                 on e.enabled and e.created_at <= o.created_at
                and walhook.endpoint_accepts(o.event_type, o.tenant, o.payload, e.event_types, e.tenant,
                                             e.all_tenants, e.filter)
              where o.created_at >= coalesce($1::timestamptz, '-infinity')
                and not exists (select 1 from walhook.deliveries d
                                 where d.event_id = o.id and d.endpoint_id = e.id)
             on conflict (event_id, endpoint_id) do nothing",
            &[&since],
        )
        .await?;
    // recorded (and published as walhook.recovery.finished) with what it queued, in the same transaction
    let deliveries = n as i64;
    tx.execute(
        "insert into walhook.recoveries (kind, since, deliveries) values ('slot', $1, $2)",
        &[&since, &deliveries],
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
    /// Set when a slot of this name exists but is not this database's (another deployment's): whose it is.
    pub foreign: Option<String>,
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
    /// Successful attempts and dead deliveries in the last hour, pending deliveries now.
    pub succeeded: i64,
    pub pending: i64,
    pub dead: i64,
    pub last_error: Option<String>,
    /// Seconds since the last error.
    pub last_error_age: Option<f64>,
    /// The circuit breaker as the daemon last wrote it (`walhook.endpoint_state`).
    pub breaker: String,
}

/// Who leads a slot (several instances on one database) and how many instances stand by.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Leadership {
    /// "walhook (pid 123 on web-1), connected from 10.0.0.5" (the application name [`connect_leader`] sets,
    /// and where the session comes from: an address, a local socket, or hidden from this role); `None` when no
    /// instance holds the leadership lock.
    pub leader: Option<String>,
    /// Sessions whose last statement was a try for the lock (standbys polling); `None` when this role may
    /// not see other sessions' statements.
    pub standbys: Option<i64>,
}

/// Reads the leadership lock of `slot` (advisory lock `(class, hashtext(slot))`) from `pg_locks`.
pub async fn slot_leadership(
    client: &Client,
    slot: &str,
    class: i32,
) -> Result<Leadership, StoreError> {
    let holder = "select l.pid from pg_locks l
              where l.locktype = 'advisory' and l.granted and l.objsubid = 2
                and l.classid = $2::int4::int8::oid
                and l.objid = (hashtext($1)::int8 & 4294967295)::oid
                and l.database = (select oid from pg_database where datname = current_database())";
    let row = client
        .query_one(
            &format!(
                "select (select format('%s, connected %s',
                                       case when a.application_name like '% (pid % on %)'
                                            then a.application_name
                                            else format('server process %s (%s)', a.pid,
                                                        coalesce(nullif(a.application_name, ''), '?')) end,
                                       case when a.client_port = -1 then 'over a local socket'
                                            when a.client_addr is not null then 'from ' || host(a.client_addr)
                                            else 'from an address this role may not see' end)
                           from pg_stat_activity a where a.pid in ({holder})),
                        (select count(*) filter (where a.query like 'select pg_try_advisory_lock($1, hashtext(%')
                           from pg_stat_activity a
                          where a.datname = current_database() and a.pid <> pg_backend_pid()
                            and a.pid not in ({holder})),
                        (select count(*) from pg_stat_activity a
                          where a.datname = current_database() and a.query = '<insufficient privilege>')"
            ),
            &[&slot, &class],
        )
        .await?;
    let hidden: i64 = row.get(2);
    Ok(Leadership {
        leader: row.get(0),
        standbys: (hidden == 0).then(|| row.get(1)),
    })
}

pub async fn slot_status(client: &Client, slot: &str) -> Result<Option<SlotStatus>, StoreError> {
    let row = client
        .query_opt(
            "select s.active_pid, host(r.client_addr), s.wal_status, s.confirmed_flush_lsn::text,
                    (pg_current_wal_lsn() - s.confirmed_flush_lsn)::int8,
                    (pg_current_wal_lsn() - s.restart_lsn)::int8,
                    s.safe_wal_size, extract(epoch from r.replay_lag)::float8,
                    case when s.slot_type <> 'logical' then 'a physical slot'
                         when s.database <> current_database() then format('database %s', s.database)
                         when s.plugin <> 'pgoutput' then format('plugin %s', s.plugin) end
               from pg_replication_slots s left join pg_stat_replication r on r.pid = s.active_pid
              where s.slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| SlotStatus {
        foreign: r.get(8),
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

/// The notify source's share of the outbox, for `walhook status`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OutboxBacklog {
    /// Rows not yet marked processed.
    pub unprocessed: i64,
    /// Seconds since the oldest of them was created.
    pub oldest_unprocessed: Option<f64>,
    /// Of those, rows an instance holds under a live lease (being delivered).
    pub claimed: i64,
}

/// Reads the unprocessed outbox rows (through the notify source's partial index when it exists).
pub async fn outbox_backlog(client: &Client) -> Result<OutboxBacklog, StoreError> {
    let r = client
        .query_one(
            "select count(*), extract(epoch from now() - min(created_at))::float8,
                    count(*) filter (where claimed_until > now())
               from walhook.outbox where processed_at is null",
            &[],
        )
        .await?;
    Ok(OutboxBacklog {
        unprocessed: r.get(0),
        oldest_unprocessed: r.get(1),
        claimed: r.get(2),
    })
}

/// The deliveries that are pending now, as a query whose two parts match the partial indexes
/// `deliveries_due` and `deliveries_ordered_heads` (a plain `status = 'pending'` matches neither and scans).
const PENDING: &str = "
  select endpoint_id, status, next_attempt_at, created_at, last_error, last_attempt_at
    from walhook.deliveries where status = 'pending' and ordering_key is null
  union all
  select endpoint_id, status, next_attempt_at, created_at, last_error, last_attempt_at
    from walhook.deliveries where status = 'pending' and ordering_key is not null";

/// The backlog for `walhook status`: pending deliveries through their partial indexes, dead ones through
/// `deliveries_dead`. It reads every pending and dead row (no table scan), so it costs what the backlog holds.
pub async fn backlog(client: &Client) -> Result<Backlog, StoreError> {
    let r = client
        .query_one(
            &format!(
                "select count(*), count(*) filter (where next_attempt_at <= now()),
                        extract(epoch from now() - min(created_at))::float8,
                        (select count(*) from walhook.deliveries where status = 'dead')
                   from ({PENDING}) p"
            ),
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

/// Per endpoint: successful attempts of the last hour (`walhook.endpoint_stats`, which the daemons add to
/// every couple of seconds, as `walhook.endpoint_health` shows them), pending deliveries now, dead ones of the
/// last hour, and the most recent error of the last hour. Pending deliveries are read through their partial
/// indexes and dead ones through `deliveries_dead`; succeeded deliveries, the bulk of the table, are not read
/// at all (counting them by `updated_at` would scan it: no index serves that, and one would cost every write).
/// Only pending and dead rows carry an error: a success clears it.
pub async fn endpoint_status(client: &Client) -> Result<Vec<EndpointStatus>, StoreError> {
    let rows = client
        .query(
            &format!(
                "with recent as materialized (
                   {PENDING}
                   union all
                   select endpoint_id, status, next_attempt_at, created_at, last_error, last_attempt_at
                     from walhook.deliveries where status = 'dead' and updated_at > now() - interval '1 hour'
                 ), counts as (
                   select endpoint_id,
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
                 select e.endpoint_id, e.url, e.enabled, e.successes_1h, coalesce(c.pending, 0),
                        coalesce(c.dead, 0), x.last_error, x.age, e.breaker
                   -- the health view: URLs without credentials, readable by walhook_reader
                   from walhook.endpoint_health e
                   left join counts c on c.endpoint_id = e.endpoint_id
                   left join errors x on x.endpoint_id = e.endpoint_id
                  order by coalesce(c.dead, 0) desc, coalesce(c.pending, 0) desc, e.endpoint_id"
            ),
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
            breaker: r.get(8),
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

/// One retention batch over the outbox (replication source): rows older than `now - outbox`, committed
/// well before what the slot has confirmed, with no pending delivery. Deleting a row never loses its event:
/// the slot streams inserts from the WAL, and a pending or dead delivery keeps its own copy of the event
/// (the check covers deliveries queued by releases that did not copy it).
const PRUNE_OUTBOX: &str = "
with batch as (
  select id, created_at from walhook.outbox where id > $1 order by id limit $2
), horizon as (
  -- rows committed after the slot's confirmed commit time may not be streamed yet: `recover-slot` would need
  -- them. created_at is when the inserting transaction began, so a margin (an hour, or the retention if
  -- shorter) covers transactions that ran long between their insert and their commit. No recorded time (a
  -- slot from before walhook recorded it, or none yet): nothing is old enough.
  select case when s.confirmed_at is not null  -- (least() would ignore a null)
              then least(now() - make_interval(secs => $3),
                         s.confirmed_at - least(interval '1 hour', make_interval(secs => $3))) end as before
    from (select 1) one left join walhook.slots s on s.slot_name = $4
), gone as (
  delete from walhook.outbox o using batch b, horizon h
   where o.id = b.id and o.created_at < h.before
     and not exists (select 1 from walhook.deliveries d where d.event_id = o.id and d.status = 'pending')
  returning o.id
)
select (select max(id) from batch), (select count(*) from gone),
       coalesce((select max(created_at) from batch) >= (select coalesce(before, '-infinity') from horizon), true)";

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
    slot: &str,
) -> Result<Pruned, StoreError> {
    let r = client
        .query_one(
            PRUNE_OUTBOX,
            &[&after, &limit, &older_than.as_secs_f64(), &slot],
        )
        .await?;
    Ok(Pruned {
        last_id: r.get(0),
        rows: r.get(1),
        attempts: 0,
        done: r.get(2),
    })
}
