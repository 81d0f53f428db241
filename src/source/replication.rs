//! The replication source: a pgoutput slot on a publication of `walhook.outbox`, streamed in commit order.
//!
//! Each session: make sure the publication and the slot exist, start streaming from the slot's confirmed
//! position, decode Begin/Relation/Insert/Commit and the messages `walhook.publish()` writes (pgoutput sends
//! messages when asked; only those under the database's key are events, see [`super::message`]), fan each
//! event out to dispatch, and confirm positions as the tracker releases them. Reading pauses when
//! `delivery.max_in_flight_events` events are held (backpressure reaches the server through TCP), while status
//! updates keep flowing so the walsender does not time us out. After a restart the slot replays what was not
//! confirmed; events at or below the highest event id already recorded are checked against
//! `walhook.deliveries` in batches and their recorded deliveries are not sent again.
//!
//! Several instances may run on one database; exactly one streams the slot. Leadership is a session-level
//! advisory lock keyed by the slot's name, held on a plain SQL session for as long as the instance prepares
//! and streams: the server releases it the moment that session ends (a crash, `kill -9`, a lost network), and
//! a standby, trying every `replication.standby_interval`, takes the slot over. The lock rather than the slot's
//! own `active` flag, because preparing (creating the slot, its backfill, re-creating it after an unfinished
//! backfill) happens while no walsender holds the slot, and two instances must never do that at once.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::ack::{AckTarget, Tracker};
use super::backfill;
use super::walconn::{WalConnection, WalError, WalMessage, WalStream};
use super::{Pipeline, SourceError};
use crate::event::Event;
use crate::health::Health;
use crate::lsn::Lsn;
use crate::pgoutput::{self, Datum, Message};
use crate::store::{self, Store, StoreError};

/// Events checked against `walhook.deliveries` per round trip during a replay.
const REPLAY_CHECK_BATCH: usize = 512;
/// How often a position that advanced is reported (at most).
const CONFIRM_EVERY: Duration = Duration::from_millis(50);
/// How long the leadership session may take to answer its periodic ping.
const LEADER_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failover, the slot is re-created and the outbox rows committed since this long before the last
/// commit time it had confirmed are queued: transactions that ran that long between insert and commit.
const FAILOVER_MARGIN: Duration = Duration::from_secs(3600);
/// Advisory-lock class of slot leadership ("whsl" in ASCII); the second key is `hashtext(slot)`.
pub const LEADER_LOCK_CLASS: i32 = 0x7768_736c;
/// Microseconds between the Unix epoch and the PostgreSQL epoch (2000-01-01 00:00 UTC).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

impl From<WalError> for SourceError {
    fn from(e: WalError) -> Self {
        classify_wal(e, "")
    }
}

pub(crate) const WAL_LEVEL_FIX: &str = "logical replication is not available: wal_level is not \"logical\"; set \
     wal_level = logical in postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL, \
     or use source = \"notify\"";

/// Turns server errors whose cause is the user's setup into one clear message with the fix.
fn classify_wal(e: WalError, user: &str) -> SourceError {
    match e.code() {
        Some("55000") if e.to_string().contains("wal_level") => {
            SourceError::Fatal(WAL_LEVEL_FIX.into())
        }
        // the fix names the role: a refused connection carries it, a refused command gets it here
        Some("42501") => SourceError::Fatal(match e {
            WalError::Server {
                error,
                target: None,
            } => crate::pgerror::describe_server(
                &error,
                crate::pgerror::Job::Replication,
                Some(&crate::pgerror::Target {
                    user: (!user.is_empty()).then(|| user.to_string()),
                    ..Default::default()
                }),
            ),
            e => e.to_string(),
        }),
        Some("28000") | Some("28P01") | Some("3D000") | Some("42704") => {
            SourceError::Fatal(e.to_string())
        }
        _ => match e {
            WalError::Auth(_) | WalError::Config(_) => SourceError::Fatal(e.to_string()),
            e => SourceError::Transient(e.to_string()),
        },
    }
}

pub struct ReplicationSource {
    pub db: crate::conninfo::ConnInfo,
    pub slot: String,
    pub publication: String,
    pub status_interval: Duration,
    /// How often a standby tries to take the slot's leadership.
    pub standby_interval: Duration,
    pub pipeline: Arc<Pipeline>,
    pub health: Arc<Health>,
    /// How long a new session waits for the previous one's deliveries to be recorded (the longest attempt
    /// and its recording).
    pub settle_within: Duration,
    /// What [`ReplicationSource::prepare`] took and made, handed on to the first session.
    pub prepared: std::sync::Mutex<Prepared>,
}

/// The leadership session taken by [`ReplicationSource::prepare`] and, when it created the slot for a first
/// start, the session holding the slot's snapshot for the backfill.
#[derive(Default)]
pub struct Prepared {
    leader: Option<tokio_postgres::Client>,
    backfill: Option<backfill::Snapshot>,
}

/// The leadership session and, on a first start, the backfill's snapshot.
type Led = (tokio_postgres::Client, Option<backfill::Snapshot>);

/// The slot as found at start.
enum SlotState {
    /// Present and usable; `recorded` when `walhook.slots` lists it.
    Healthy { recorded: bool },
    /// Present but invalidated: the WAL it needs is gone.
    Lost,
    /// Absent although walhook created it (at `created_at`) on timeline `timeline`; the commit time it had
    /// confirmed when last recorded.
    Dropped {
        created_at: String,
        timeline: Option<i32>,
        confirmed_at: Option<SystemTime>,
    },
    /// Absent and never created: a first start.
    Missing,
    /// A slot of this name that is not this database's pgoutput slot: another deployment's (slot names are
    /// cluster-wide), or made by hand for something else. Never adopted, never dropped.
    Foreign {
        database: Option<String>,
        plugin: Option<String>,
    },
}

/// Which outbox rows a new slot's snapshot hands over.
#[derive(Clone, Copy)]
enum Backfill {
    /// First start: every row without a delivery, read under the snapshot and streamed through the pipeline
    /// ([`backfill`]).
    BeforeSlot,
    /// `recover-slot`: rows without a delivery for an endpoint that existed when they were written.
    Recovery { since: Option<SystemTime> },
}

/// What `walhook recover-slot` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// The slot exists and is usable: nothing was changed.
    Healthy,
    /// The slot was (dropped and) created again; `queued` deliveries were queued.
    Recreated { queued: u64 },
}

/// Column positions of `walhook.outbox` in the relation message.
#[derive(Clone, Copy, Debug)]
struct OutboxColumns {
    id: usize,
    uid: usize,
    event_type: usize,
    payload: usize,
    created_at: usize,
    ordering_key: usize,
    /// Absent from relations decoded from WAL written before migration 9.
    traceparent: Option<usize>,
    tenant: Option<usize>,
    /// Absent before migration 15.
    event_version: Option<usize>,
}

/// The publication and the slot: created on first start, checked on every (re)connect, re-created by
/// `walhook recover-slot`.
pub struct SlotKeeper {
    pub db: crate::conninfo::ConnInfo,
    pub slot: String,
    pub publication: String,
}

impl SlotKeeper {
    /// Makes sure the publication and the slot exist. Fails with a clear message when the database cannot
    /// do logical replication or the role may not. When it creates the slot for a first start, returns the
    /// session holding the slot's snapshot: the slot is not marked backfilled until [`backfill::run`] is done.
    pub async fn prepare(&self) -> Result<Option<backfill::Snapshot>, SourceError> {
        let client = store::connect_client(&self.db)
            .await
            .map_err(|e| SourceError::Transient(e.to_string()))?;
        // the backfill below must not fail after the slot exists: it would never run again
        store::check_schema(&client).await?;
        self.prepare_publication(&client).await?;
        if store::slot_backfill_pending(&client, &self.slot).await? {
            // an earlier start created the slot but never queued the rows committed before it: nothing was
            // streamed from it yet, so start over with a new slot and snapshot
            tracing::warn!(slot = %self.slot, "the slot's backfill did not finish: creating the slot again");
            client
                .execute(
                    "select pg_drop_replication_slot(slot_name) from pg_replication_slots
                      where slot_name = $1 and database = current_database()",
                    &[&self.slot],
                )
                .await
                .map_err(StoreError::from)?;
            let mut client = client;
            let (_, snapshot) = self.create_slot(&mut client, Backfill::BeforeSlot).await?;
            return Ok(snapshot);
        }
        match self.slot_state(&client).await? {
            SlotState::Healthy { recorded: true } => Ok(None),
            SlotState::Healthy { recorded: false } => {
                // a slot from before walhook kept this record, or created by hand: adopt it
                store::record_slot(&client, &self.slot, false).await?;
                Ok(None)
            }
            SlotState::Lost => Err(SourceError::Fatal(format!(
                "replication slot {:?} was invalidated (wal_status = lost): PostgreSQL removed WAL it still \
                 needed, most likely because max_slot_wal_keep_size was exceeded while walhook was stopped \
                 or behind, so events committed since its confirmed position cannot be streamed any more. \
                 To recover: stop every walhook instance, run `walhook recover-slot` (it re-creates the slot \
                 and queues the outbox rows that have no deliveries yet), then start walhook again",
                self.slot
            ))),
            SlotState::Dropped {
                timeline: Some(made_on),
                confirmed_at,
                ..
            } if self.timeline().await? > made_on => {
                // a standby was promoted: its server never had the slot, and what the old primary
                // streamed is recorded here; queue what it had not, then stream
                let since = confirmed_at.map(|t| t - FAILOVER_MARGIN);
                tracing::warn!(
                    slot = %self.slot,
                    "replication slot {:?} is missing on this server, whose timeline is past the one the slot \
                     was made on ({made_on}): a standby was promoted, and logical slots do not survive that \
                     before PostgreSQL 17. Creating it again and queueing the outbox rows committed since {} \
                     that have no deliveries yet, then streaming",
                    self.slot,
                    since.map_or("the oldest row".to_string(), |t| {
                        humantime::format_rfc3339_seconds(t).to_string()
                    })
                );
                let mut client = client;
                let (queued, _) = self
                    .create_slot(&mut client, Backfill::Recovery { since })
                    .await?;
                tracing::warn!(slot = %self.slot, queued, "recovered from the failover");
                Ok(None)
            }
            SlotState::Dropped { created_at, .. } => Err(SourceError::Fatal(format!(
                "replication slot {:?} does not exist, but walhook created it on {created_at}: it was \
                 dropped, so events committed since its confirmed position were never streamed. To recover: \
                 stop every walhook instance, run `walhook recover-slot` (it re-creates the slot and queues \
                 the outbox rows that have no deliveries yet), then start walhook again",
                self.slot
            ))),
            SlotState::Missing => {
                let mut client = client;
                let (_, snapshot) = self.create_slot(&mut client, Backfill::BeforeSlot).await?;
                Ok(snapshot)
            }
            SlotState::Foreign { database, plugin } => Err(self.foreign(database, plugin)),
        }
    }

    /// The error for a slot of our name that is not ours, with the fix.
    fn foreign(&self, database: Option<String>, plugin: Option<String>) -> SourceError {
        let whose = match (database, plugin) {
            (Some(db), Some(plugin)) if plugin == "pgoutput" => {
                format!(
                    "the logical slot of database {db:?} (another walhook deployment, most likely)"
                )
            }
            (Some(db), plugin) => format!(
                "a logical slot of database {db:?} with plugin {:?}",
                plugin.unwrap_or_default()
            ),
            (None, _) => "a physical slot (a standby's)".to_string(),
        };
        SourceError::Fatal(format!(
            "replication slot {:?} is {whose}; slot names are shared by every database of a cluster, and \
             walhook never adopts or drops a slot that is not its own: give this database's walhook a slot \
             of its own, e.g. replication.slot = \"walhook_{}\" (WALHOOK_REPLICATION__SLOT=walhook_{})",
            self.slot,
            self.database_hint(),
            self.database_hint()
        ))
    }

    /// The timeline of the server the replication connection reaches.
    async fn timeline(&self) -> Result<i32, SourceError> {
        let mut conn = self.connect().await?;
        Ok(conn
            .identify_system()
            .await
            .map_err(SourceError::from)?
            .timeline as i32)
    }

    /// The configured database name as a slot-name suffix (lowercase letters, digits, underscores).
    fn database_hint(&self) -> String {
        self.db
            .get_dbname()
            .or(self.db.get_user())
            .unwrap_or("app")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(40)
            .collect()
    }

    /// Tries once to take the slot's leadership on `client`'s session; it is held until that session ends.
    async fn try_lead(&self, client: &tokio_postgres::Client) -> Result<bool, SourceError> {
        Ok(client
            .query_one(
                "select pg_try_advisory_lock($1, hashtext($2))",
                &[&LEADER_LOCK_CLASS, &self.slot],
            )
            .await
            .map_err(StoreError::from)?
            .get(0))
    }

    /// Who holds the slot's leadership, for the log: "walhook (pid 123 on web-1), connected from 10.0.0.5".
    async fn leader(&self, client: &tokio_postgres::Client) -> Option<String> {
        store::slot_leadership(client, &self.slot, LEADER_LOCK_CLASS)
            .await
            .ok()?
            .leader
    }

    /// What a standby checks at start, without touching the slot: the schema, `wal_level`, and that its role
    /// may replicate, so a misconfigured instance fails now rather than when it takes over.
    async fn check(&self, client: &tokio_postgres::Client) -> Result<(), SourceError> {
        store::check_schema(client).await?;
        let wal_level: String = client
            .query_one("select current_setting('wal_level')", &[])
            .await
            .map_err(StoreError::from)?
            .get(0);
        if wal_level != "logical" {
            return Err(SourceError::Fatal(WAL_LEVEL_FIX.into()));
        }
        self.verify_publication(client).await?;
        drop(self.connect().await?);
        Ok(())
    }

    /// What `walhook.slots` and `pg_replication_slots` say about the slot.
    async fn slot_state(&self, client: &tokio_postgres::Client) -> Result<SlotState, SourceError> {
        let (slot, recorded) =
            store::slot_state(client, &self.slot)
                .await
                .map_err(|e| match e {
                    StoreError::NotMigrated => SourceError::Fatal(
                        "walhook.slots does not exist: run `walhook migrate` to upgrade the schema"
                            .into(),
                    ),
                    e => SourceError::from(e),
                })?;
        Ok(match (slot, recorded) {
            (Some(other), _) if !other.ours => SlotState::Foreign {
                database: other.database,
                plugin: other.plugin,
            },
            (Some(status), _) if status.wal_status.as_deref() == Some("lost") => SlotState::Lost,
            (Some(_), recorded) => SlotState::Healthy {
                recorded: recorded.is_some(),
            },
            (None, Some(recorded)) => SlotState::Dropped {
                created_at: recorded.created_at,
                timeline: recorded.timeline,
                confirmed_at: recorded.confirmed_at,
            },
            (None, None) => SlotState::Missing,
        })
    }

    /// Creates the slot with an exported snapshot. `Recovery`: under that snapshot, queues the outbox rows
    /// the slot will never stream and records the slot in `walhook.slots`; returns the deliveries queued.
    /// `BeforeSlot`: returns a session holding the snapshot, for [`backfill::run`] once the pipeline runs (the
    /// slot stays marked unfinished until then). Neither when another instance created the slot meanwhile.
    async fn create_slot(
        &self,
        client: &mut tokio_postgres::Client,
        backfill: Backfill,
    ) -> Result<(u64, Option<backfill::Snapshot>), SourceError> {
        let mut conn = self.connect().await?;
        // before the slot: the exported snapshot lasts only until the connection's next command
        let timeline = conn
            .identify_system()
            .await
            .map_err(SourceError::from)?
            .timeline;
        store::mark_slot_backfill_pending(client, &self.slot).await?;
        let (lsn, snapshot) = match conn.create_logical_slot_exporting(&self.slot).await {
            Ok(created) => created,
            // another instance created it at the same moment and does the backfill
            Err(e) if e.code() == Some("42710") => return Ok((0, None)),
            Err(e) => return Err(classify_wal(e, self.user())),
        };
        tracing::info!(slot = %self.slot, %lsn, "created replication slot");
        // the snapshot lives as long as the replication connection stays idle: `conn` is dropped after this
        let n = match backfill {
            Backfill::BeforeSlot => {
                // imported into a transaction of its own, which keeps it once `conn` is gone
                let held = backfill::Snapshot::open(&self.db, &snapshot).await?;
                drop(conn);
                store::record_slot_timeline(client, &self.slot, timeline as i32).await?;
                return Ok((0, Some(held)));
            }
            Backfill::Recovery { since } => {
                store::backfill_recovery(client, &snapshot, since).await?
            }
        };
        drop(conn);
        store::record_slot(
            client,
            &self.slot,
            matches!(backfill, Backfill::Recovery { .. }),
        )
        .await?;
        store::record_slot_timeline(client, &self.slot, timeline as i32).await?;
        if n > 0 {
            tracing::info!(
                deliveries = n,
                "queued deliveries for events the slot will not stream"
            );
        }
        Ok((n, None))
    }

    /// `walhook recover-slot`: drops a lost slot (or notices a dropped one), creates it afresh and queues, as
    /// pending deliveries due now, every committed outbox row (created at or after `since`) that has no
    /// delivery yet for an enabled, matching endpoint that already existed when the row was written.
    /// Refuses while a walhook instance holds the slot.
    pub async fn recover(&self, since: Option<SystemTime>) -> Result<Recovery, SourceError> {
        let mut client = store::connect_client(&self.db)
            .await
            .map_err(|e| SourceError::Transient(e.to_string()))?;
        self.prepare_publication(&client).await?;
        // holding the leadership keeps every instance started meanwhile standing by
        if !self.try_lead(&client).await? {
            let holder = self
                .leader(&client)
                .await
                .unwrap_or_else(|| "another session".into());
            return Err(SourceError::Fatal(format!(
                "a walhook instance ({holder}) leads replication slot {:?}: stop every walhook instance first",
                self.slot
            )));
        }
        if let Some(pid) = store::slot_active_pid(&client, &self.slot).await? {
            return Err(SourceError::Fatal(format!(
                "replication slot {:?} is in use by process {pid}: stop every walhook instance first",
                self.slot
            )));
        }
        match self.slot_state(&client).await? {
            SlotState::Foreign { database, plugin } => return Err(self.foreign(database, plugin)),
            SlotState::Healthy { recorded } => {
                if !recorded {
                    store::record_slot(&client, &self.slot, false).await?;
                }
                return Ok(Recovery::Healthy);
            }
            SlotState::Lost => {
                client
                    .execute("select pg_drop_replication_slot($1)", &[&self.slot])
                    .await
                    .map_err(StoreError::from)?;
                tracing::info!(slot = %self.slot, "dropped the invalidated slot");
            }
            SlotState::Dropped { .. } | SlotState::Missing => {}
        }
        let (queued, _) = self
            .create_slot(&mut client, Backfill::Recovery { since })
            .await?;
        Ok(Recovery::Recreated { queued })
    }

    /// Creates the publication of `walhook.outbox` (inserts only) if it is missing.
    async fn prepare_publication(
        &self,
        client: &tokio_postgres::Client,
    ) -> Result<(), SourceError> {
        let exists = client
            .query_opt(
                "select 1 from pg_publication where pubname = $1",
                &[&self.publication],
            )
            .await
            .map_err(StoreError::from)?
            .is_some();
        if !exists {
            let sql = format!(
                "create publication {} for table walhook.outbox with (publish = 'insert')",
                quote_ident(&self.publication)
            );
            match client.batch_execute(&sql).await {
                Ok(()) => tracing::info!(publication = %self.publication, "created publication"),
                // another instance created it at the same moment
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) => {}
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                    return Err(SourceError::Fatal(
                        "walhook.outbox does not exist: run `walhook migrate` first".into(),
                    ))
                }
                Err(e) => {
                    return Err(SourceError::Fatal(format!(
                        "could not create publication {:?}: {}; create it as the table owner with: {sql}",
                        self.publication,
                        crate::pgerror::facts(&e)
                    )))
                }
            }
        }
        self.verify_publication(client).await
    }

    /// Fails unless the publication streams every insert into `walhook.outbox` with all its columns.
    async fn verify_publication(&self, client: &tokio_postgres::Client) -> Result<(), SourceError> {
        let problems = store::publication_problems(client, &self.publication).await?;
        if problems.is_empty() {
            return Ok(());
        }
        Err(SourceError::Fatal(format!(
            "{}; walhook does not stream from a publication that would skip events",
            problems.join("; ")
        )))
    }

    fn user(&self) -> &str {
        self.db.get_user().unwrap_or("")
    }

    async fn connect(&self) -> Result<WalConnection, SourceError> {
        WalConnection::connect(&self.db)
            .await
            .map_err(|e| classify_wal(e, self.user()))
    }
}

impl ReplicationSource {
    /// Makes sure the publication and the slot exist and are usable ([`SlotKeeper::prepare`]) when this
    /// instance can lead the slot, and keeps the leadership for [`ReplicationSource::run`]. When another
    /// instance leads, checks only what this one needs to take over.
    pub async fn prepare(&self) -> Result<(), SourceError> {
        let keeper = self.keeper();
        let client = store::connect_leader(&self.db)
            .await
            .map_err(|e| SourceError::Transient(e.to_string()))?;
        if !keeper.try_lead(&client).await? {
            return keeper.check(&client).await;
        }
        let backfill = keeper.prepare().await?;
        *self.prepared.lock().expect("never poisoned") = Prepared {
            leader: Some(client),
            backfill,
        };
        Ok(())
    }

    /// Waits until this instance leads the slot, standing by meanwhile; `None` when `stop` fires first. With
    /// the leadership [`ReplicationSource::prepare`] took (if it still holds), the backfill it prepared.
    async fn lead(&self, stop: &CancellationToken) -> Result<Option<Led>, SourceError> {
        let prepared = std::mem::take(&mut *self.prepared.lock().expect("never poisoned"));
        if let Some(client) = prepared.leader.filter(|c| !c.is_closed()) {
            return Ok(Some((client, prepared.backfill)));
        }
        // a backfill prepared under a leadership since lost is dropped: the next `prepare` starts it afresh
        let keeper = self.keeper();
        let client = store::connect_leader(&self.db)
            .await
            .map_err(|e| SourceError::Transient(e.to_string()))?;
        let mut stood_by = false;
        loop {
            if keeper.try_lead(&client).await? {
                if stood_by {
                    tracing::info!(slot = %self.slot, "taking the slot over");
                }
                self.health.set_standby(false);
                return Ok(Some((client, None)));
            }
            if !stood_by {
                let holder = keeper
                    .leader(&client)
                    .await
                    .unwrap_or_else(|| "another session".into());
                tracing::info!(
                    slot = %self.slot,
                    "standing by: a walhook instance ({holder}) streams the slot; this one dispatches \
                     retries and tries to take the slot over every {}",
                    humantime::format_duration(self.standby_interval)
                );
                stood_by = true;
                self.health.set_standby(true);
            }
            tokio::select! {
                _ = tokio::time::sleep(self.standby_interval) => {}
                _ = stop.cancelled() => return Ok(None),
            }
        }
    }

    fn keeper(&self) -> SlotKeeper {
        SlotKeeper {
            db: self.db.clone(),
            slot: self.slot.clone(),
            publication: self.publication.clone(),
        }
    }

    async fn connect(&self) -> Result<WalConnection, SourceError> {
        self.keeper().connect().await
    }

    /// Streams until `stop` fires, reconnecting after transient failures. Returns a fatal error.
    pub async fn run(self, stop: CancellationToken) -> Result<(), SourceError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = tokio::time::Instant::now();
            let result = match self.lead(&stop).await {
                Ok(None) => return Ok(()),
                Ok(Some((leader, backfill))) => {
                    let prepared = match backfill.filter(backfill::Snapshot::is_alive) {
                        Some(snapshot) => Ok(Some(snapshot)),
                        None => self.keeper().prepare().await,
                    };
                    match prepared {
                        Ok(backfill) => self.session(&stop, leader, backfill).await,
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(SourceError::Fatal(m)) => return Err(SourceError::Fatal(m)),
                Err(SourceError::Transient(m)) => {
                    if stop.is_cancelled() {
                        return Ok(());
                    }
                    if started.elapsed() > Duration::from_secs(30) {
                        backoff = Duration::from_millis(100);
                    }
                    metrics::counter!(crate::metrics::RECONNECTS).increment(1);
                    tracing::warn!(
                        "replication stream interrupted, reconnecting in {backoff:?}: {m}"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => return Ok(()),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// After a reconnect, waits (up to `settle_within`) until every event of the previous session is recorded:
    /// its in-flight requests finish and the recorder writes their outcomes once the server is back. Only
    /// then is the highest recorded event read, so the replay finds those outcomes and does not send again
    /// what receivers already answered; without the wait, a server restart re-sent every event whose outcome
    /// was still queued for the recorder.
    async fn settle_previous_session(&self) {
        let budget = &self.pipeline.budget;
        let all = self.pipeline.budget_size as u32;
        if budget.available_permits() >= all as usize {
            return;
        }
        tracing::info!("waiting for the previous session's deliveries to be recorded");
        if tokio::time::timeout(self.settle_within, budget.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!(
                "deliveries of the previous session are still unrecorded after {}; streaming again, \
                 events whose outcome was not yet recorded may be sent twice",
                humantime::format_duration(self.settle_within)
            );
        }
    }

    /// Streams while `leader` (the session holding the slot's leadership) lives; first, on a first start,
    /// backfills what the new slot's snapshot sees and marks the slot backfilled.
    async fn session(
        &self,
        stop: &CancellationToken,
        leader: tokio_postgres::Client,
        backfill: Option<backfill::Snapshot>,
    ) -> Result<(), SourceError> {
        let store = Store::connect(&self.db).await?;
        self.settle_previous_session().await;
        if let Some(snapshot) = backfill {
            // ready while it runs, since it delivers (a long one must not outlast systemd's start timeout),
            // though `walhook_streaming` stays 0 until the stream starts
            self.health.set_backfilling();
            // streaming waits for it: an ordered key's backfilled events are parked before its streamed ones
            let backfilled =
                backfill::run(snapshot, &self.slot, &store, &self.pipeline, stop).await;
            self.health.set_streaming(false);
            match backfilled? {
                // stopped: the slot stays unmarked, and the next start backfills again
                None => return Ok(()),
                Some(_) => store::record_slot(store.client(), &self.slot, false).await?,
            }
        }
        let replay_max = store.max_recorded_event_id().await?;
        let start: Lsn = store
            .client()
            .query_opt(
                "select confirmed_flush_lsn::text from pg_replication_slots
                  where slot_name = $1 and database = current_database()",
                &[&self.slot],
            )
            .await
            .map_err(StoreError::from)?
            .and_then(|r| r.get::<_, Option<String>>(0))
            .and_then(|s| s.parse().ok())
            .unwrap_or(Lsn::INVALID);
        let mut conn = self.connect().await?;
        // the timeline this slot streams on: after a failover, a missing slot on a later timeline means the
        // slot was lost with the old primary, not dropped by hand
        let timeline = conn.identify_system().await?.timeline;
        store::record_slot_timeline(store.client(), &self.slot, timeline as i32).await?;
        // walhook.publish()'s events are messages, which pgoutput sends only when asked; servers before
        // PostgreSQL 14 refuse the option (and there publish() inserts outbox rows: sql/016_publish.sql)
        let message_prefix = store::publish_prefix(store.client()).await?;
        let messages: bool = store
            .client()
            .query_one(
                "select current_setting('server_version_num')::int >= 140000",
                &[],
            )
            .await
            .map_err(StoreError::from)?
            .get(0);
        let mut options = vec![("proto_version", "1")];
        if messages {
            options.push(("messages", "true"));
        }
        let stream = conn
            .start_replication(&self.slot, &self.publication, Lsn::INVALID, &options)
            .await?;
        tracing::info!(slot = %self.slot, %start, "streaming");
        self.health.set_streaming(true);
        let mut session = Session {
            stream,
            store,
            leader,
            pipeline: self.pipeline.clone(),
            tracker: Tracker::new(start),
            relations: HashMap::new(),
            txn: None,
            commit_lsn: Lsn::INVALID,
            committed_at: None,
            replay_max,
            replay: Vec::new(),
            sent: start,
            sent_at: tokio::time::Instant::now(),
            status_interval: self.status_interval,
            health: self.health.clone(),
            slot: self.slot.clone(),
            publication: self.publication.clone(),
            publication_ok_at: SystemTime::now(),
            checked_at: tokio::time::Instant::now(),
            message_prefix,
        };
        let result = session.run(stop).await;
        self.health.set_streaming(false);
        result
    }
}

/// One streaming session's state.
struct Session {
    stream: WalStream,
    store: Store,
    /// Holds the slot's leadership; if it ends, another instance may take over, so this one stops.
    leader: tokio_postgres::Client,
    pipeline: Arc<Pipeline>,
    tracker: Arc<Tracker>,
    relations: HashMap<u32, Option<OutboxColumns>>,
    txn: Option<u64>,
    /// The commit position of the current transaction (from Begin): orders events of one ordering key.
    commit_lsn: Lsn,
    /// Commit time of the transaction being read (from its Begin), for the latency metric.
    committed_at: Option<SystemTime>,
    replay_max: i64,
    /// Replayed events awaiting the duplicate check, with their transaction and budget permit.
    replay: Vec<(Event, u64, OwnedSemaphorePermit)>,
    /// The last position reported to the server, and when.
    sent: Lsn,
    sent_at: tokio::time::Instant,
    status_interval: Duration,
    health: Arc<Health>,
    slot: String,
    publication: String,
    /// When the publication was last found right.
    publication_ok_at: SystemTime,
    /// When the leadership session last checked the publication (and recorded the slot's progress).
    checked_at: tokio::time::Instant,
    /// The prefix of `walhook.publish()`'s messages (it holds a key: never logged).
    message_prefix: String,
}

impl Session {
    async fn run(&mut self, stop: &CancellationToken) -> Result<(), SourceError> {
        let mut tick = tokio::time::interval(CONFIRM_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if !self.replay.is_empty() {
                // check replayed events as soon as the stream has nothing more ready right now
                match tokio::time::timeout(Duration::ZERO, self.stream.next_message()).await {
                    Ok(message) => {
                        self.handle(message?).await?;
                        continue;
                    }
                    Err(_) => self.check_replay().await?,
                }
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => return self.drain().await,
                message = self.stream.next_message() => self.handle(message?).await?,
                _ = tick.tick() => {
                    // A fast shutdown terminates ordinary sessions but waits for walsenders to see every
                    // position confirmed, which cannot happen while the recorder is cut off: leave, and
                    // replay from the confirmed position once the server is back.
                    if self.lost_connection() {
                        return Err(SourceError::Transient(
                            "lost the database connection (is the server shutting down?)".into(),
                        ));
                    }
                    self.report(false).await?
                }
            }
        }
    }

    /// The recorder's session or the leadership session ended (a server shutting down, a lost network).
    fn lost_connection(&self) -> bool {
        self.store.is_closed() || self.leader.is_closed()
    }

    async fn handle(&mut self, message: Option<WalMessage>) -> Result<(), SourceError> {
        match message {
            None => Err(SourceError::Transient(
                "the server ended the replication stream".into(),
            )),
            Some(WalMessage::Keepalive {
                wal_end,
                reply_requested,
                ..
            }) => {
                // a shutting-down server pings in a tight loop, which can starve the timer branch
                if self.lost_connection() {
                    return Err(SourceError::Transient(
                        "lost the database connection (is the server shutting down?)".into(),
                    ));
                }
                if self.replay.is_empty() {
                    self.tracker.follow_if_idle(wal_end);
                }
                if reply_requested {
                    self.report(true).await?;
                }
                Ok(())
            }
            Some(WalMessage::XLogData { data, .. }) => self.decode(&data).await,
        }
    }

    async fn decode(&mut self, data: &[u8]) -> Result<(), SourceError> {
        let message = pgoutput::decode(data).map_err(|e| SourceError::Transient(e.to_string()))?;
        match message {
            Message::Begin { final_lsn, commit_time_us, .. } => {
                let committed_at = u64::try_from(commit_time_us + PG_EPOCH_OFFSET_US)
                    .map_or(UNIX_EPOCH, |us| UNIX_EPOCH + Duration::from_micros(us));
                self.txn = Some(self.tracker.begin_at(committed_at));
                self.committed_at = Some(committed_at);
                self.commit_lsn = final_lsn;
            }
            Message::Commit { end_lsn, .. } => {
                if let Some(txn) = self.txn.take() {
                    self.tracker.commit(txn, end_lsn);
                }
            }
            Message::Relation { id, namespace, name, columns, .. } => {
                if namespace != "walhook" || name != "outbox" {
                    // another table of the publication: its inserts are not events
                    self.relations.insert(id, None);
                    return Ok(());
                }
                let find = |n: &str| columns.iter().position(|c| c.name == n);
                let missing: Vec<&str> = store::OUTBOX_COLUMNS
                    .iter()
                    .filter(|c| find(c).is_none() && !store::OUTBOX_COLUMNS_ADDED_LATER.contains(c))
                    .copied()
                    .collect();
                if !missing.is_empty() {
                    // refuse before any of its inserts is read, so nothing past here is confirmed
                    return Err(SourceError::Fatal(format!(
                        "the publication streams walhook.outbox without its columns {}: was a column list \
                         set on publication {:?}, or the table altered? Remove the column list as the \
                         publication's owner (ALTER PUBLICATION ... SET TABLE walhook.outbox). Nothing from \
                         here on was acknowledged, but this slot decodes the inserts made while the list was \
                         set with it: then stop walhook, drop the slot (SELECT \
                         pg_drop_replication_slot('{}')) and run `walhook recover-slot --since <when the list \
                         was set>`, which queues them from the outbox",
                        missing.join(", "),
                        self.publication,
                        self.slot
                    )));
                }
                let at = |n: &str| find(n).expect("checked above");
                self.relations.insert(
                    id,
                    Some(OutboxColumns {
                        id: at("id"),
                        uid: at("uid"),
                        event_type: at("event_type"),
                        payload: at("payload"),
                        created_at: at("created_at"),
                        ordering_key: at("ordering_key"),
                        traceparent: find("traceparent"),
                        tenant: find("tenant"),
                        event_version: find("event_version"),
                    }),
                );
            }
            Message::Insert { relation_id, tuple } => {
                let cols = match self.relations.get(&relation_id) {
                    Some(Some(cols)) => *cols,
                    Some(None) => return Ok(()), // not the outbox
                    None => {
                        return Err(SourceError::Transient(format!(
                            "an insert into relation {relation_id} arrived before its description; \
                             streaming again from the confirmed position"
                        )))
                    }
                };
                let text = |i: usize| match tuple.columns.get(i) {
                    Some(Datum::Text(b)) => std::str::from_utf8(b).ok(),
                    _ => None,
                };
                let (Some(id), Some(uid), Some(event_type), Some(payload), Some(created_at)) = (
                    text(cols.id).and_then(|s| s.parse::<i64>().ok()),
                    text(cols.uid),
                    text(cols.event_type),
                    text(cols.payload),
                    text(cols.created_at),
                ) else {
                    return Err(SourceError::Fatal(
                        "an outbox row arrived without its id, uid, event_type, payload or created_at text; \
                         was walhook.outbox altered?"
                            .into(),
                    ));
                };
                let ordering_key = text(cols.ordering_key).map(str::to_string);
                let event = Event::new(id, uid, event_type, created_at, payload)
                    .with_ordering(ordering_key, Some(self.commit_lsn))
                    .with_traceparent(cols.traceparent.and_then(text))
                    .with_tenant(cols.tenant.and_then(text).map(str::to_string))
                    .with_version(
                        cols.event_version
                            .and_then(text)
                            .and_then(|v| v.parse().ok()),
                    );
                self.submit(event).await?;
            }
            Message::LogicalMessage {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                if let Some(generation) = self.endpoints_changed(transactional, prefix, content) {
                    return self.catch_up(generation).await;
                }
                if prefix != self.message_prefix {
                    // other applications' messages; one that looks like walhook's but lacks its key was not
                    // written by walhook.publish() (any role may emit messages), so it is no event
                    if prefix.starts_with("walhook") {
                        tracing::warn!(
                            %lsn,
                            "ignored a logical decoding message with a \"walhook\" prefix that is not the one \
                             walhook.publish() writes: it was emitted by other means (pg_logical_emit_message \
                             is open to every role), so it is not an event; publish events with \
                             walhook.publish(event_type, payload)"
                        );
                    }
                    return Ok(());
                }
                if !transactional {
                    tracing::warn!(
                        %lsn,
                        "ignored a non-transactional message with walhook.publish()'s prefix: only \
                         walhook.publish() writes events, inside the caller's transaction"
                    );
                    return Ok(());
                }
                match super::message::event(content, self.commit_lsn) {
                    Ok(event) => self.submit(event).await?,
                    // not one of publish()'s messages, though it has the key: nothing to deliver, no id to
                    // record it under; said loudly, and the stream goes on
                    Err(e) => tracing::error!(
                        %lsn,
                        "ignored a message with walhook.publish()'s prefix that is no event ({e}); was it \
                         emitted by hand? Publish events with walhook.publish(event_type, payload)"
                    ),
                }
            }
            Message::Other { tag } => {
                return Err(SourceError::Fatal(format!(
                    "the server sent pgoutput message tag {tag:#04x}, unknown to protocol version 1: is this \
                     PostgreSQL older than 10 or a proxy in between?"
                )))
            }
            _ => {}
        }
        Ok(())
    }

    /// The generation of `walhook.endpoints` a message of `walhook.endpoints_bump()` announces (its prefix is
    /// publish()'s keyed one with `:endpoints`, so no other role can write it), or None for any other message.
    fn endpoints_changed(&self, transactional: bool, prefix: &str, content: &[u8]) -> Option<i64> {
        let rest = prefix.strip_prefix(self.message_prefix.as_str())?;
        if rest != ":endpoints" || !transactional {
            return None;
        }
        std::str::from_utf8(content).ok()?.parse().ok()
    }

    /// An endpoint change in commit order: the events read before it and still waiting for their duplicate
    /// check go first, by the endpoints they were committed under; the ones after it wait for the reload.
    /// Meanwhile the server hears from us as usual (the confirmed position, answers to its keepalives), so
    /// a slow reload never looks like a dead client.
    async fn catch_up(&mut self, generation: i64) -> Result<(), SourceError> {
        if !self.replay.is_empty() {
            self.check_replay().await?;
        }
        let pipeline = self.pipeline.clone();
        let reloaded = pipeline.endpoints_at(generation, Duration::MAX);
        tokio::pin!(reloaded);
        let mut tick = tokio::time::interval(CONFIRM_EVERY);
        loop {
            tokio::select! {
                () = &mut reloaded => return Ok(()),
                _ = tick.tick() => {
                    if self.lost_connection() {
                        return Err(SourceError::Transient(
                            "lost the database connection (is the server shutting down?)".into(),
                        ));
                    }
                    self.report(false).await?
                }
            }
        }
    }

    /// Hands a committed event (an outbox row's insert, or a `walhook.publish()` message) to fan-out within
    /// its transaction, through the duplicate check when it may have been recorded before a restart.
    async fn submit(&mut self, mut event: Event) -> Result<(), SourceError> {
        event.committed_at = self.committed_at;
        metrics::counter!(crate::metrics::EVENTS_RECEIVED).increment(1);
        let Some(txn) = self.txn else {
            return Err(SourceError::Transient(
                "an event outside a transaction".into(),
            ));
        };
        let deliveries = self.pipeline.endpoints.count_matching(&event);
        let permit = self
            .acquire(deliveries.clamp(1, self.pipeline.budget_size))
            .await?;
        // Once one event waits for the duplicate check, every later one waits behind it, so events reach
        // dispatch in stream order (an ordered key's older event is never parked after a newer one); those
        // above `replay_max` are not in the table, the check finds nothing.
        if event.id <= self.replay_max || !self.replay.is_empty() {
            self.tracker.add(txn, 1); // holds the transaction until the check is done
            self.replay.push((event, txn, permit));
            if self.replay.len() >= REPLAY_CHECK_BATCH {
                self.check_replay().await?;
            }
        } else {
            self.fan_out(event, txn, permit, &HashSet::new());
        }
        Ok(())
    }

    /// The drain: reads nothing more, waits until every transaction read to its Commit has its deliveries
    /// recorded (in-flight attempts finish; `shutdown.drain_timeout` bounds this from outside), then confirms
    /// that position, so the next start replays nothing that was recorded. A transaction cut off mid-read is
    /// not confirmed: its events are recorded if dispatched, and replayed (without resending) next time.
    async fn drain(&mut self) -> Result<(), SourceError> {
        if !self.replay.is_empty() {
            self.check_replay().await?;
        }
        let mut tick = tokio::time::interval(CONFIRM_EVERY);
        while !self.tracker.settled() {
            tokio::select! {
                _ = self.tracker.advanced.notified() => {}
                _ = tick.tick() => {
                    if self.lost_connection() {
                        return Err(SourceError::Transient(
                            "lost the database connection while draining".into(),
                        ));
                    }
                    self.report(false).await?
                }
            }
        }
        self.report(true).await?;
        tracing::info!(confirmed = %self.sent, "drained: slot position confirmed");
        Ok(())
    }

    /// Waits for `n` permits of the in-flight budget, reporting status meanwhile so the server keeps us.
    /// Replayed events waiting for their duplicate check hold permits that only the check releases (those
    /// already recorded need no request), so the check runs before any wait: otherwise a replay that
    /// fills the budget would wait for itself forever.
    async fn acquire(&mut self, n: usize) -> Result<OwnedSemaphorePermit, SourceError> {
        let n = n as u32;
        if let Ok(p) = self.pipeline.budget.clone().try_acquire_many_owned(n) {
            return Ok(p);
        }
        if !self.replay.is_empty() {
            self.check_replay().await?;
            if let Ok(p) = self.pipeline.budget.clone().try_acquire_many_owned(n) {
                return Ok(p);
            }
        }
        let mut tick = tokio::time::interval(CONFIRM_EVERY);
        loop {
            tokio::select! {
                p = self.pipeline.budget.clone().acquire_many_owned(n) => return Ok(p.expect("budget is never closed")),
                _ = tick.tick() => {
                    // A fast shutdown terminates ordinary sessions but waits for walsenders to see every
                    // position confirmed, which cannot happen while the recorder is cut off: leave, and
                    // replay from the confirmed position once the server is back.
                    if self.lost_connection() {
                        return Err(SourceError::Transient(
                            "lost the database connection (is the server shutting down?)".into(),
                        ));
                    }
                    self.report(false).await?
                }
            }
        }
    }

    async fn check_replay(&mut self) -> Result<(), SourceError> {
        let batch = std::mem::take(&mut self.replay);
        let ids: Vec<i64> = batch.iter().map(|(e, _, _)| e.id).collect();
        let recorded: HashSet<(i64, i64)> =
            self.store.recorded_pairs(&ids).await?.into_iter().collect();
        for (event, txn, permit) in batch {
            self.fan_out(event, txn, permit, &recorded);
            self.tracker.done(txn);
        }
        Ok(())
    }

    fn fan_out(
        &self,
        event: Event,
        txn: u64,
        permit: OwnedSemaphorePermit,
        recorded: &HashSet<(i64, i64)>,
    ) {
        let target = AckTarget::Txn {
            tracker: self.tracker.clone(),
            txn,
        };
        self.pipeline.fan_out(event, recorded, target, permit);
    }

    /// Sends a standby status update when the confirmed position advanced, when asked, or every
    /// `status_interval` (asking for a reply then, so an idle stream's keepalive lets us follow the server).
    async fn report(&mut self, force: bool) -> Result<(), SourceError> {
        let lag = self
            .tracker
            .oldest_commit()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or_default();
        self.health.set_lag(lag);
        let confirmed = self.tracker.confirmed();
        let due = self.sent_at.elapsed() >= self.status_interval;
        // on its own clock: the server's requests for a reply (answered with `force`) may come more often
        // than `status_interval` and must not postpone it forever
        let check = self.checked_at.elapsed() >= self.status_interval;
        if !(force || due || check || confirmed > self.sent) {
            return Ok(());
        }
        if check {
            // before confirming more: is the publication still what walhook needs? (The leadership session
            // is idle otherwise, so this also keeps `idle_session_timeout` away and notices a connection
            // that died silently, so that a standby can take over.)
            self.check_publication().await?;
            self.checked_at = tokio::time::Instant::now();
        }
        let pos = confirmed.max(self.sent);
        self.stream
            .send_status(pos, pos, pos, due && !force)
            .await?;
        if check {
            if let Some(at) = self.tracker.confirmed_commit() {
                // retention keeps the outbox rows the slot may not have streamed yet
                let written = self
                    .leader
                    .execute(
                        "update walhook.slots set confirmed_at = $2
                          where slot_name = $1 and confirmed_at is distinct from $2",
                        &[&self.slot, &at],
                    )
                    .await;
                match written {
                    Ok(n) => tracing::debug!(rows = n, "recorded the slot's confirmed commit time"),
                    Err(e) => {
                        tracing::debug!("recording the slot's confirmed commit time failed: {e}")
                    }
                }
            }
        }
        self.sent = pos;
        self.sent_at = tokio::time::Instant::now();
        Ok(())
    }
}

impl Session {
    /// Checks the publication on the leadership session (within `LEADER_PING_TIMEOUT`). A publication
    /// changed while streaming (inserts no longer published, a row filter, a column list) stops the daemon:
    /// the events it left out since the last check were never streamed, and the message says how to bring
    /// them back.
    async fn check_publication(&mut self) -> Result<(), SourceError> {
        let check = store::publication_problems(&self.leader, &self.publication);
        let problems = match tokio::time::timeout(LEADER_PING_TIMEOUT, check).await {
            Ok(Ok(problems)) => problems,
            Ok(Err(e)) if e.is_connection() => {
                return Err(SourceError::Transient(format!(
                    "lost the session holding the slot's leadership: {e}"
                )))
            }
            Ok(Err(e)) => return Err(SourceError::from(e)),
            Err(_) => {
                return Err(SourceError::Transient(
                    "the session holding the slot's leadership does not answer".into(),
                ))
            }
        };
        if problems.is_empty() {
            self.publication_ok_at = SystemTime::now();
            return Ok(());
        }
        let since = humantime::format_rfc3339_seconds(self.publication_ok_at);
        Err(SourceError::Fatal(format!(
            "{}. The publication was still right at {since}; events committed since then may not have been \
             streamed. Once it is fixed, re-create what the endpoints missed with: SELECT e.id, \
             walhook.recover(e.id, since => '{since}') FROM walhook.endpoints e WHERE e.enabled; then start \
             walhook again",
            problems.join("; ")
        )))
    }
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}
