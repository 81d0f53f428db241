//! `walhook migrate`: the numbered SQL files under `sql/`, embedded in the binary and applied in order, then
//! the repeatable `sql/grants.sql`.
//!
//! Migrations run on the application's live primary, so none may hold a lock that application statements
//! queue behind for long. A migration file is split into steps by lines starting with [`STEP_MARKER`]; each
//! step is its own transaction with a short `lock_timeout` (a statement waiting for a lock queues every later
//! conflicting statement behind it, so the wait itself must be short), retried with backoff while something
//! holds the lock, and reported with the sessions that held it when it never comes free. A step that is one
//! `create index concurrently` (or `drop index concurrently`) runs outside a transaction, without a lock
//! timeout: it blocks no reads or writes while it waits. Steps are idempotent (`if not exists`, guarded `do`
//! blocks), so a migration interrupted between steps is simply run again from its first step; its version is
//! recorded in `walhook.schema_migrations` with its last step.
//!
//! Concurrent migrators serialise on a session-level advisory lock held across the steps, taken by polling
//! rather than by a blocked statement: a blocked statement holds a snapshot that the other migrator's
//! concurrent index build would wait for (a deadlock). The second one then finds every version recorded and
//! applies nothing. Notices ("already exists, skipping") are silenced; warnings (a role that could not be
//! created, a constraint left `NOT VALID`) are not.

use std::time::Duration;

use tokio_postgres::Client;

/// The migrations, in order: (version, name, SQL). Shipped files are not edited, only added; the header of
/// `sql/003_policies.sql` says why 003 and 004 were split into steps after they shipped.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "core", include_str!("../sql/001_core.sql")),
    (2, "notify", include_str!("../sql/002_notify.sql")),
    (3, "policies", include_str!("../sql/003_policies.sql")),
    (4, "ops", include_str!("../sql/004_ops.sql")),
    (5, "hardening", include_str!("../sql/005_hardening.sql")),
    (6, "trust", include_str!("../sql/006_trust.sql")),
    (
        7,
        "payload_limit",
        include_str!("../sql/007_payload_limit.sql"),
    ),
    (8, "proxy", include_str!("../sql/008_proxy.sql")),
    (9, "tracing", include_str!("../sql/009_tracing.sql")),
    (10, "failover", include_str!("../sql/010_failover.sql")),
    (11, "tenants", include_str!("../sql/011_tenants.sql")),
    (
        12,
        "operational events",
        include_str!("../sql/012_operational_events.sql"),
    ),
    (13, "portal", include_str!("../sql/013_portal.sql")),
    (
        14,
        "portal overview",
        include_str!("../sql/014_portal_overview.sql"),
    ),
    (15, "catalog", include_str!("../sql/015_catalog.sql")),
    (16, "publish", include_str!("../sql/016_publish.sql")),
    (
        17,
        "cheap checks",
        include_str!("../sql/017_cheap_checks.sql"),
    ),
    (
        18,
        "endpoint changes",
        include_str!("../sql/018_endpoint_changes.sql"),
    ),
];

/// Privileges of walhook's group roles, applied after every migrate: repeatable and idempotent.
pub const GRANTS: &str = include_str!("../sql/grants.sql");

/// A line starting with this begins a new step; the rest of the line describes it (for logs and errors).
pub const STEP_MARKER: &str = "-- walhook:step";

/// Advisory lock key taken while migrating ("walhook" in ASCII).
const MIGRATION_LOCK: i64 = 0x77_616c_686f_6f6b;

/// How often a migrator waiting for another one checks whether it has finished.
const LOCK_POLL: Duration = Duration::from_millis(200);

/// How migrations wait for locks, and how far they go.
#[derive(Clone, Debug)]
pub struct MigrateOptions {
    /// The longest any step waits for a lock: what an application statement may queue behind it.
    pub lock_timeout: Duration,
    /// Tries per step before giving up while something holds a lock it needs.
    pub lock_attempts: u32,
    /// Wait before the second try; doubled for each further one.
    pub first_backoff: Duration,
    /// Stop after this version, without applying the grants (tests build older schemas with it).
    pub target: Option<i32>,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            lock_timeout: Duration::from_secs(1),
            lock_attempts: 5,
            first_backoff: Duration::from_millis(500),
            target: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{step} failed: {}", describe(error))]
    Migration {
        /// "migration 3 (policies), step 2 of 9: outbox: …", or the grants.
        step: String,
        error: tokio_postgres::Error,
    },
    #[error(
        "{step} could not lock what it changes within {timeout:?}, {attempts} times; held by: {holders}. \
         Nothing of this step was applied, and application statements waited at most {timeout:?} each time: \
         end those sessions or wait for them, then run `walhook migrate` again"
    )]
    Locked {
        step: String,
        timeout: Duration,
        attempts: u32,
        holders: String,
    },
    #[error("could not prepare the walhook schema: {}", describe(.0))]
    Setup(tokio_postgres::Error),
    #[error("the database has walhook schema version {found}, newer than this binary knows ({known}): upgrade walhook")]
    TooNew { found: i32, known: i32 },
}

impl From<tokio_postgres::Error> for MigrateError {
    fn from(e: tokio_postgres::Error) -> Self {
        MigrateError::Setup(e)
    }
}

/// The server's message with its SQLSTATE, detail and hint (or the client error and its cause), and the fix,
/// as [`crate::pgerror`] renders them for `walhook migrate`.
fn describe(e: &tokio_postgres::Error) -> String {
    crate::pgerror::describe_for(e, crate::pgerror::Job::Migrate, None)
}

/// One step of a migration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step<'a> {
    /// The text after the marker, or the step's first line of SQL.
    pub what: String,
    pub sql: &'a str,
    /// A `create index concurrently` or `drop index concurrently`: run outside a transaction.
    pub concurrent: bool,
}

/// Splits a migration into its steps: the text before the first marker (if it holds any SQL) and after each.
pub fn steps(sql: &str) -> Vec<Step<'_>> {
    let mut starts = vec![(0, None)];
    let mut offset = 0;
    for line in sql.split_inclusive('\n') {
        if let Some(rest) = line.strip_prefix(STEP_MARKER) {
            starts.push((offset, Some(rest.trim().to_string())));
        }
        offset += line.len();
    }
    let mut out = Vec::new();
    for (i, (start, what)) in starts.iter().enumerate() {
        let end = starts.get(i + 1).map_or(sql.len(), |s| s.0);
        let text = &sql[*start..end];
        let code = without_comments(text);
        if code.is_empty() {
            continue;
        }
        let what = match what {
            Some(w) if !w.is_empty() => w.clone(),
            _ => code.lines().next().unwrap_or_default().trim().to_string(),
        };
        out.push(Step {
            what,
            sql: text,
            concurrent: is_concurrent(&code),
        });
    }
    out
}

/// The SQL of a step without `--` comment lines, trimmed (enough for what `steps` needs to recognise).
fn without_comments(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_string()
}

fn is_concurrent(code: &str) -> bool {
    let words: Vec<String> = code
        .split_whitespace()
        .take(4)
        .map(str::to_ascii_lowercase)
        .collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    matches!(
        words.as_slice(),
        ["create", "index", "concurrently", ..]
            | ["create", "unique", "index", "concurrently"]
            | ["drop", "index", "concurrently", ..]
    )
}

/// The index a `create index concurrently if not exists <name> on walhook.…` step builds.
fn index_built(code: &str) -> Option<String> {
    let lower = code.to_ascii_lowercase();
    let words: Vec<&str> = lower.split_whitespace().collect();
    let at = words
        .windows(3)
        .position(|w| w == ["if", "not", "exists"])?;
    words.get(at + 3).map(|s| s.to_string())
}

/// Applies every migration not yet applied, then the grants; returns the versions applied now (empty when
/// up to date).
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, MigrateError> {
    migrate_with(client, &MigrateOptions::default()).await
}

/// [`migrate`] with explicit lock handling, or up to a given version.
pub async fn migrate_with(
    client: &mut Client,
    options: &MigrateOptions,
) -> Result<Vec<i32>, MigrateError> {
    // a role's statement_timeout is meant for the application: a validation scan may take longer, harmlessly
    client
        .batch_execute("set client_min_messages = warning; set statement_timeout = 0")
        .await?;
    let mut waiting_logged = false;
    while !client
        .query_one("select pg_try_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?
        .get::<_, bool>(0)
    {
        if !waiting_logged {
            tracing::info!("waiting for another `walhook migrate` on this database to finish");
            waiting_logged = true;
        }
        tokio::time::sleep(LOCK_POLL).await;
    }
    let result = migrate_locked(client, options).await;
    // best effort: ending the session releases the lock too
    let _ = client
        .batch_execute(&format!(
            "select pg_advisory_unlock({MIGRATION_LOCK}); reset lock_timeout; reset client_min_messages; \
             reset statement_timeout"
        ))
        .await;
    result
}

async fn migrate_locked(
    client: &mut Client,
    options: &MigrateOptions,
) -> Result<Vec<i32>, MigrateError> {
    bootstrap(client).await?;
    let applied: Vec<i32> = client
        .query("select version from walhook.schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    if let Some(&found) = applied.iter().max() {
        if found > known {
            return Err(MigrateError::TooNew { found, known });
        }
    }
    let mut now_applied = Vec::new();
    for &(version, name, sql) in MIGRATIONS {
        if applied.contains(&version) || options.target.is_some_and(|t| version > t) {
            continue;
        }
        let steps = steps(sql);
        for (i, step) in steps.iter().enumerate() {
            let last = i + 1 == steps.len();
            let record = (last && !step.concurrent).then_some((version, name));
            let label = format!(
                "migration {version} ({name}), step {} of {}: {}",
                i + 1,
                steps.len(),
                step.what
            );
            if steps.len() > 1 {
                tracing::info!("{label}");
            }
            run_step(client, step, record, options)
                .await
                .map_err(|failure| failure.into_error(label))?;
        }
        if steps.last().is_some_and(|s| s.concurrent) {
            record_version(client, version, name).await?;
        }
        now_applied.push(version);
    }
    if options.target.is_none_or(|t| t >= known) {
        apply_grants(client, options).await?;
    }
    Ok(now_applied)
}

/// Creates the schema and the version table when missing. Checked first: `create … if not exists` still
/// needs the privilege to create, which a role that only owns the schema may lack.
async fn bootstrap(client: &Client) -> Result<(), tokio_postgres::Error> {
    let row = client
        .query_one(
            "select to_regnamespace('walhook') is not null, to_regclass('walhook.schema_migrations') is not null",
            &[],
        )
        .await?;
    if !row.get::<_, bool>(0) {
        client.batch_execute("create schema walhook").await?;
    }
    if !row.get::<_, bool>(1) {
        client
            .batch_execute(
                "create table walhook.schema_migrations (
                   version integer primary key,
                   name text not null,
                   applied_at timestamptz not null default now())",
            )
            .await?;
    }
    Ok(())
}

async fn record_version(client: &Client, version: i32, name: &str) -> Result<(), MigrateError> {
    client
        .execute(
            "insert into walhook.schema_migrations (version, name) values ($1, $2)",
            &[&version, &name],
        )
        .await?;
    Ok(())
}

/// Why a step did not apply.
enum StepFailure {
    Error(tokio_postgres::Error),
    Locked {
        timeout: Duration,
        attempts: u32,
        holders: String,
    },
}

impl StepFailure {
    fn into_error(self, step: String) -> MigrateError {
        match self {
            StepFailure::Error(error) => MigrateError::Migration { step, error },
            StepFailure::Locked {
                timeout,
                attempts,
                holders,
            } => MigrateError::Locked {
                step,
                timeout,
                attempts,
                holders,
            },
        }
    }
}

impl From<tokio_postgres::Error> for StepFailure {
    fn from(e: tokio_postgres::Error) -> Self {
        StepFailure::Error(e)
    }
}

/// Lock waits that gave up (lock_timeout) and deadlocks: nothing was applied, trying again may succeed.
fn is_lock_conflict(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE
            || *c == tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED
    })
}

/// Runs one step, trying again with backoff while it cannot get its locks in time. `record` inserts the
/// migration's version in the step's own transaction.
async fn run_step(
    client: &mut Client,
    step: &Step<'_>,
    record: Option<(i32, &str)>,
    options: &MigrateOptions,
) -> Result<(), StepFailure> {
    let mut backoff = options.first_backoff;
    let mut attempt = 1;
    loop {
        let result = if step.concurrent {
            run_concurrent(client, step.sql).await
        } else {
            run_in_transaction(client, step.sql, record, options.lock_timeout).await
        };
        match result {
            Ok(()) => return Ok(()),
            Err(e) if is_lock_conflict(&e) => {
                let holders = lock_holders(client, step.sql).await;
                if attempt >= options.lock_attempts.max(1) {
                    return Err(StepFailure::Locked {
                        timeout: options.lock_timeout,
                        attempts: attempt,
                        holders,
                    });
                }
                tracing::warn!(
                    "{}: could not lock what it changes within {:?} (held by: {holders}); trying again in \
                     {backoff:?} (try {attempt} of {})",
                    step.what,
                    options.lock_timeout,
                    options.lock_attempts
                );
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn run_in_transaction(
    client: &mut Client,
    sql: &str,
    record: Option<(i32, &str)>,
    lock_timeout: Duration,
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute(&format!(
        "set local lock_timeout = '{}ms'",
        lock_timeout.as_millis().max(1)
    ))
    .await?;
    tx.batch_execute(sql).await?;
    if let Some((version, name)) = record {
        tx.execute(
            "insert into walhook.schema_migrations (version, name) values ($1, $2)",
            &[&version, &name],
        )
        .await?;
    }
    tx.commit().await
}

/// A concurrent index build or drop, alone and outside a transaction. A build interrupted earlier left an
/// invalid index of that name, which `if not exists` would keep: it is dropped first.
async fn run_concurrent(client: &Client, sql: &str) -> Result<(), tokio_postgres::Error> {
    let code = without_comments(sql);
    if let Some(index) = index_built(&code) {
        let invalid = client
            .query_opt(
                "select format('%I.%I', n.nspname, c.relname)
                   from pg_class c join pg_namespace n on n.oid = c.relnamespace
                   join pg_index i on i.indexrelid = c.oid
                  where n.nspname = 'walhook' and c.relname = $1 and not i.indisvalid",
                &[&index],
            )
            .await?;
        if let Some(row) = invalid {
            let name: String = row.get(0);
            tracing::info!(
                "dropping {name}, left invalid by an interrupted build, to build it again"
            );
            client
                .batch_execute(&format!("drop index concurrently if exists {name}"))
                .await?;
        }
    }
    // no lock timeout: waiting for older transactions blocks nobody, and giving up would waste the build
    client.batch_execute("set lock_timeout = 0").await?;
    client.batch_execute(&code).await
}

/// Who holds (or waits ahead for) locks on the walhook tables a step names (all walhook tables if it names
/// none): "pid 123 (user app, application \"report\", idle in transaction since …: <query>)".
async fn lock_holders(client: &Client, sql: &str) -> String {
    let tables = tables_named(sql);
    let rows = client
        .query(
            "select format('pid %s (user %s, application %s, %s since %s: %s)', a.pid,
                           coalesce(a.usename::text, '?'),
                           coalesce(quote_ident(nullif(a.application_name, '')), 'unnamed'),
                           coalesce(a.state, 'state hidden'),
                           coalesce(to_char(coalesce(a.xact_start, a.query_start), 'YYYY-MM-DD HH24:MI:SS TZ'), '?'),
                           coalesce(left(regexp_replace(a.query, '\\s+', ' ', 'g'), 120), '?'))
               from pg_stat_activity a
              where a.pid <> pg_backend_pid()
                and a.pid in (
                      select l.pid from pg_locks l
                       where l.locktype = 'relation'
                         and l.database = (select oid from pg_database where datname = current_database())
                         and l.relation in (
                               select c.oid from pg_class c
                                where c.relnamespace = 'walhook'::regnamespace and c.relkind in ('r', 'p', 'v', 'i')
                                  and (cardinality($1::text[]) = 0 or c.relname = any($1::text[]))))
              order by coalesce(a.xact_start, a.query_start)
              limit 5",
            &[&tables],
        )
        .await;
    match rows {
        Ok(rows) if rows.is_empty() => {
            "no session now (it has ended since, or holds a lock this role may not see)".into()
        }
        Ok(rows) => rows
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("; "),
        Err(e) => format!("unknown ({})", describe(&e)),
    }
}

/// The `walhook.<name>` relations a step's SQL mentions.
fn tables_named(sql: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (at, _) in sql.match_indices("walhook.") {
        let name: String = sql[at + "walhook.".len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// Runs `sql/grants.sql` in one transaction, with the same lock handling as a step.
async fn apply_grants(client: &mut Client, options: &MigrateOptions) -> Result<(), MigrateError> {
    let step = Step {
        what: "the grants of walhook's roles (sql/grants.sql)".into(),
        sql: GRANTS,
        concurrent: false,
    };
    run_step(client, &step, None, options)
        .await
        .map_err(|failure| failure.into_error(step.what.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_markers_is_one_step() {
        let s = steps("-- a comment\ncreate table t (id int);\ninsert into t values (1);\n");
        assert_eq!(s.len(), 1);
        assert!(!s[0].concurrent);
        assert_eq!(s[0].what, "create table t (id int);");
    }

    #[test]
    fn markers_split_steps_and_name_them() {
        let sql = "-- header only\n\
                   -- walhook:step outbox: a column\n\
                   alter table walhook.outbox add column if not exists x int;\n\
                   -- walhook:step\n\
                   -- the index\n\
                   create index concurrently if not exists i on walhook.deliveries (x);\n\
                   -- walhook:step empty\n\
                   -- nothing here\n";
        let s = steps(sql);
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[0].what, "outbox: a column");
        assert!(!s[0].concurrent);
        assert!(s[0].sql.contains("add column"));
        assert!(s[1].concurrent);
        assert_eq!(
            s[1].what,
            "create index concurrently if not exists i on walhook.deliveries (x);"
        );
        assert_eq!(
            index_built(&without_comments(s[1].sql)).as_deref(),
            Some("i")
        );
        assert_eq!(tables_named(s[0].sql), vec!["outbox".to_string()]);
    }

    #[test]
    fn drop_index_concurrently_is_concurrent_too() {
        assert!(is_concurrent("DROP INDEX CONCURRENTLY IF EXISTS walhook.x"));
        assert!(is_concurrent("create unique index concurrently x on t (a)"));
        assert!(!is_concurrent("create index x on t (a)"));
        assert!(!is_concurrent(
            "do $$ begin create index concurrently x on t (a); end $$"
        ));
    }

    /// What the runner relies on, for every shipped file: concurrent steps are one statement that survives
    /// a re-run, and every other multi-step migration step is written to be run again.
    #[test]
    fn shipped_steps_are_runnable() {
        for &(version, _, sql) in MIGRATIONS {
            let steps = steps(sql);
            assert!(!steps.is_empty(), "migration {version} has no SQL");
            for step in &steps {
                let code = without_comments(step.sql);
                if step.concurrent {
                    let body = code.trim_end().trim_end_matches(';');
                    assert!(
                        !body.contains(';'),
                        "migration {version}: a concurrent step must be one statement: {code}"
                    );
                    let lower = code.to_ascii_lowercase();
                    assert!(
                        lower.contains("if not exists") || lower.contains("if exists"),
                        "migration {version}: a concurrent step must survive a re-run: {code}"
                    );
                }
            }
        }
        let grants = steps(GRANTS);
        assert_eq!(grants.len(), 1, "grants.sql is one transaction");
    }
}
