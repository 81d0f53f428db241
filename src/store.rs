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
use tokio_postgres::{AsyncMessage, Client, NoTls, Statement};

use crate::fanout::EndpointRow;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("the walhook schema is missing: run `walhook migrate` first")]
    NotMigrated,
    #[error(
        "the walhook schema is at version {found} but this walhook needs version {needed}: run `walhook migrate`"
    )]
    Outdated { found: i32, needed: i32 },
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
            StoreError::NotMigrated | StoreError::Outdated { .. } => false,
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
                and o.processed_at is null
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
    pub async fn connect(config: &tokio_postgres::Config) -> Result<Store, StoreError> {
        let client = connect_client(config).await?;
        check_schema(&client).await?;
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
    pub async fn record(&self, rows: &[RecordRow]) -> Result<(), StoreError> {
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

/// The notify source's wake-up channel; the trigger installed by [`install_notify`] notifies it.
const OUTBOX_CHANNEL: &str = "walhook_outbox";

/// The partial index the claim scans, and the statement-level trigger that wakes pollers. Only the notify
/// source needs them: in replication mode `processed_at` stays null, so the index would grow with every row.
const UNPROCESSED_INDEX: &str = "walhook.outbox_unprocessed";
const CREATE_UNPROCESSED_INDEX: &str =
    "create index concurrently if not exists outbox_unprocessed \
     on walhook.outbox (id) where processed_at is null";
const CREATE_WAKE_TRIGGER: &str =
    "create or replace trigger outbox_wake after insert on walhook.outbox \
     for each statement execute function walhook.outbox_wake()";

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
          array(select d.endpoint_id from walhook.deliveries d where d.event_id = o.id)";

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
}

/// Creates the unprocessed-rows index and the wake-up trigger when they are missing. Creating them needs
/// ownership of `walhook.outbox`; checking first lets an owner create them once for a less privileged role.
/// The index is built `concurrently` so applications keep inserting meanwhile; an advisory lock makes a
/// second daemon wait instead of racing the build, so an invalid index found under it is a leftover of an
/// interrupted build and is rebuilt. The trigger takes a short lock that queues inserts, so it waits at most
/// `lock_timeout` for transactions holding the table.
pub async fn install_notify(config: &tokio_postgres::Config) -> Result<Installed, StoreError> {
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
    let trigger = client
        .query_opt(
            "select 1 from pg_trigger where tgrelid = 'walhook.outbox'::regclass and tgname = 'outbox_wake'",
            &[],
        )
        .await?;
    if trigger.is_none() {
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

/// The SQL an owner of `walhook.outbox` can run to create what [`install_notify`] creates.
pub fn notify_install_sql() -> String {
    format!("{CREATE_UNPROCESSED_INDEX}; {CREATE_WAKE_TRIGGER};")
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

/// How often an idle listener checks that its connection still answers (a silently dropped TCP connection
/// would otherwise go unnoticed for hours), and how long the answer may take.
const LISTENER_PING: Duration = Duration::from_secs(30);
const LISTENER_PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Listens on the outbox channel on a connection of its own, waking `wake` once subscribed (rows committed
/// while nobody listened are found by the poll that follows) and on every notification. Returns when the
/// connection ends; the error says why.
pub async fn listen_outbox(
    config: &tokio_postgres::Config,
    wake: &Notify,
) -> Result<(), StoreError> {
    let (client, mut connection) = session_config(config).connect(NoTls).await?;
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
}

/// The notify source's connection: claims, marks and lease renewals on `walhook.outbox`.
pub struct OutboxQueue {
    store: Store,
    claim: Statement,
    mark: Statement,
    renew: Statement,
}

impl OutboxQueue {
    pub async fn connect(config: &tokio_postgres::Config) -> Result<OutboxQueue, StoreError> {
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

    /// Claims up to `limit` rows for `lease`, in id order.
    pub async fn claim(&self, limit: i64, lease: Duration) -> Result<Vec<OutboxRow>, StoreError> {
        let rows = self
            .store
            .client
            .query(&self.claim, &[&limit, &lease.as_secs_f64()])
            .await?;
        let mut claimed: Vec<OutboxRow> = rows
            .iter()
            .map(|r| OutboxRow {
                id: r.get(0),
                uid: r.get(1),
                event_type: r.get(2),
                payload: r.get(3),
                created_at: r.get(4),
                recorded: r.get(5),
            })
            .collect();
        claimed.sort_unstable_by_key(|r| r.id);
        Ok(claimed)
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
