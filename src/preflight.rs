//! `walhook check-config --connect`: the start-up checks of `walhook run` that need the database, each failure
//! with its fix, without starting anything.
//!
//! The offline part (configuration, `database_url`, delivery client, `http.listen`) is
//! [`crate::daemon::check_offline`], the very code `run` calls. This part connects as `run` does
//! ([`crate::store::connect_client`], and for `source = "replication"` the walsender connection itself) and
//! asks the server what `run` would run into: the schema version, the privileges of the statements the daemon
//! runs, `wal_level` and the `REPLICATION` attribute, the publication, the slot, or the notify source's index
//! and trigger. It reports every problem it finds rather than the first, since each needs its own fix, and it
//! changes nothing: no publication, slot, index or trigger is created.

use tokio_postgres::Client;

use crate::config::{Config, SourceKind};
use crate::pgerror::{Job, Target};
use crate::source::walconn::WalConnection;
use crate::store::{self, StoreError};

/// What was checked, for the line printed when everything passed.
#[derive(Debug, Default)]
pub struct Passed {
    pub target: Target,
    pub schema_version: i32,
}

/// Connects and checks; `Err` holds every problem found, each a complete message with its fix.
pub async fn check(config: &Config) -> Result<Passed, Vec<String>> {
    let db = config.database_url().map_err(|e| vec![e.to_string()])?;
    let target = Target::of(&db);
    // nothing else can be checked without a session
    let client = store::connect_client(&db)
        .await
        .map_err(|e| vec![e.to_string()])?;
    let mut problems = Vec::new();
    let mut passed = Passed {
        target,
        ..Default::default()
    };
    let render = |e: StoreError| e.describe_with(Job::Daemon, Some(&passed.target));
    // the schema is there and readable: the checks of the source's objects can run
    let readable = match store::check_schema(&client).await {
        Ok(()) => {
            passed.schema_version = crate::schema::MIGRATIONS.last().map_or(0, |m| m.0);
            // what the role may not read is reported once, here, not again by the checks below
            match privileges(&client, config, &passed.target).await {
                Ok(()) => true,
                Err(e) => {
                    problems.push(e);
                    false
                }
            }
        }
        Err(e) => {
            problems.push(render(e));
            false
        }
    };
    let source = match config.source {
        SourceKind::Replication => replication(&client, &db, config, readable).await,
        SourceKind::Notify if readable => notify(&client, config).await,
        SourceKind::Notify => Vec::new(),
    };
    problems.extend(source.into_iter().map(|p| p.unwrap_or_else(render)));
    match problems.is_empty() {
        true => Ok(passed),
        false => Err(problems),
    }
}

/// The table privileges of the statements `walhook run` runs with this configuration.
fn needed(config: &Config) -> Vec<(&'static str, &'static str)> {
    let mut needed = vec![
        ("walhook.schema_migrations", "SELECT"),
        ("walhook.outbox", "SELECT"),
        ("walhook.endpoints", "SELECT"),
        ("walhook.endpoints", "UPDATE"),
        ("walhook.endpoint_secrets", "SELECT"),
        ("walhook.endpoints_generation", "SELECT"),
        ("walhook.endpoints_generation", "UPDATE"),
        ("walhook.endpoint_state", "SELECT"),
        ("walhook.endpoint_state", "INSERT"),
        ("walhook.endpoint_state", "UPDATE"),
        ("walhook.endpoint_stats", "INSERT"),
        ("walhook.endpoint_stats", "UPDATE"),
        ("walhook.endpoint_stats", "DELETE"),
        ("walhook.deliveries", "SELECT"),
        ("walhook.deliveries", "INSERT"),
        ("walhook.deliveries", "UPDATE"),
        ("walhook.attempts", "INSERT"),
    ];
    match config.source {
        SourceKind::Replication => needed.extend([
            ("walhook.slots", "SELECT"),
            ("walhook.slots", "INSERT"),
            ("walhook.slots", "UPDATE"),
            // the prefix of walhook.publish()'s messages
            ("walhook.publish_settings", "SELECT"),
        ]),
        SourceKind::Notify => needed.push(("walhook.outbox", "UPDATE")),
    }
    if config.retention.enabled {
        needed.extend([
            ("walhook.deliveries", "DELETE"),
            ("walhook.attempts", "DELETE"),
        ]);
        // outbox rows are pruned only under the replication source
        if config.source == SourceKind::Replication {
            needed.push(("walhook.outbox", "DELETE"));
        }
    }
    needed
}

/// Fails naming every missing privilege. Column grants count (the daemon's role updates some columns only).
async fn privileges(client: &Client, config: &Config, target: &Target) -> Result<(), String> {
    let (tables, privileges): (Vec<&str>, Vec<&str>) = needed(config).into_iter().unzip();
    let missing = client
        .query(
            "select p || ' on ' || t from unnest($1::text[], $2::text[]) with ordinality as n(t, p, i)
              where to_regclass(t) is not null
                and not case when p = 'DELETE' then has_table_privilege(t, p)
                             else has_any_column_privilege(t, p) end
              order by i",
            &[&tables, &privileges],
        )
        .await
        .map_err(|e| StoreError::from(e).describe_with(Job::Daemon, Some(target)))?;
    if missing.is_empty() {
        return Ok(());
    }
    let missing: Vec<String> = missing.iter().map(|r| r.get(0)).collect();
    let user = target.user.as_deref().unwrap_or("<user>");
    Err(format!(
        "role {user:?} lacks privileges walhook run needs: {}; as the owner of the walhook schema, run GRANT \
         walhook_daemon TO {user} (README, \"Roles\")",
        missing.join(", ")
    ))
}

/// A problem found, or a database error met while looking (rendered by the caller, who knows the role).
type Finding = Result<String, StoreError>;

/// `source = "replication"`: logical WAL, a role that may replicate, and when the schema is `readable`, the
/// publication and a usable slot.
async fn replication(
    client: &Client,
    db: &crate::conninfo::ConnInfo,
    config: &Config,
    readable: bool,
) -> Vec<Finding> {
    let mut problems = Vec::new();
    let wal_level = client
        .query_one("select current_setting('wal_level')", &[])
        .await
        .map(|r| r.get::<_, String>(0));
    match wal_level {
        Ok(level) if level == "logical" => {
            // the walsender connection run opens: authentication, pg_hba.conf and the REPLICATION attribute
            if let Err(e) = WalConnection::connect(db).await {
                problems.push(Ok(e.to_string()));
            }
        }
        Ok(_) => problems.push(Ok(crate::source::replication::WAL_LEVEL_FIX.to_string())),
        Err(e) => problems.push(Err(e.into())),
    }
    if !readable {
        return problems;
    }
    let publication = &config.replication.publication;
    let creatable = client
        .query_one(
            "select exists (select 1 from pg_publication where pubname = $1),
                    coalesce((select pg_has_role(c.relowner, 'USAGE') from pg_class c
                               where c.oid = to_regclass('walhook.outbox')), false)
                      and has_database_privilege(current_database(), 'CREATE')",
            &[publication],
        )
        .await;
    match creatable {
        Ok(row) if !row.get::<_, bool>(0) && !row.get::<_, bool>(1) => problems.push(Ok(format!(
            "publication {publication:?} does not exist and this role may not create it (it must own \
             walhook.outbox and may create in the database); create it as the table's owner with: create \
             publication {publication} for table walhook.outbox with (publish = 'insert')"
        ))),
        Ok(_) => {}
        Err(e) => problems.push(Err(e.into())),
    }
    let slot = &config.replication.slot;
    match store::slot_state(client, slot).await {
        Ok((Some(row), _)) if row.wal_status.as_deref() == Some("lost") => problems.push(Ok(format!(
            "replication slot {slot:?} was invalidated (wal_status = lost): stop every walhook instance and run \
             `walhook recover-slot`"
        ))),
        Ok((None, Some(recorded))) => problems.push(Ok(format!(
            "replication slot {slot:?} does not exist, but walhook created it on {} (after a failover, \
             `walhook run` re-creates it by itself): otherwise stop every walhook instance and run `walhook \
             recover-slot`",
            recorded.created_at
        ))),
        Ok((Some(row), _)) if !row.ours => problems.push(Ok(format!(
            "replication slot {slot:?} is not this database's pgoutput slot (database {:?}, plugin {:?}): \
             set replication.slot to a name of this database's own",
            row.database.unwrap_or_default(),
            row.plugin.unwrap_or_default()
        ))),
        Ok(_) => {}
        Err(e) => problems.push(Err(e)),
    }
    problems
}

/// `source = "notify"`: no slot of walhook's makes `walhook.publish()` write messages it cannot read, and its
/// index and trigger exist as configured, or this role may create them.
async fn notify(client: &Client, config: &Config) -> Vec<Finding> {
    match store::publishing_slot(client).await {
        Ok(Some(slot)) => {
            return vec![Ok(format!(
                "replication slot {slot:?} still exists, so walhook.publish() writes events as messages that \
                 only source = \"replication\" reads; drop it once its events are delivered: SELECT \
                 pg_drop_replication_slot('{slot}')"
            ))]
        }
        Ok(None) => {}
        Err(e) => return vec![Err(e)],
    }
    let wake_trigger = config.notify.wake_trigger;
    let owner = client
        .query_one(
            "select coalesce((select pg_has_role(c.relowner, 'USAGE') from pg_class c
                               where c.oid = to_regclass('walhook.outbox')), true)",
            &[],
        )
        .await;
    let needed = async {
        match owner {
            // the owner creates what is missing at start; without the table, the schema check reports it
            Ok(row) if row.get::<_, bool>(0) => Ok(false),
            Ok(_) => store::notify_install_needed(client, wake_trigger).await,
            Err(e) => Err(StoreError::from(e)),
        }
    };
    match needed.await {
        Ok(false) => Vec::new(),
        Ok(true) => vec![Ok(store::notify_owner_message(
            "this role does not own the table",
            wake_trigger,
        ))],
        Err(e) => vec![Err(e)],
    }
}

/// The line printed when every check passed.
pub fn summary(config: &Config, passed: &Passed) -> String {
    let source = match config.source {
        SourceKind::Replication => "source replication: wal_level logical, the role may replicate",
        SourceKind::Notify => "source notify: index and trigger in place or creatable",
    };
    format!(
        "configuration is valid; connected to {}: schema version {}, privileges complete, {source}",
        passed.target, passed.schema_version
    )
}
