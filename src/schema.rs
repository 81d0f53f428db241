//! `walhook migrate`: the numbered SQL files under `sql/`, embedded in the binary and applied in order.
//!
//! Everything runs in one transaction that first takes a transaction-scoped advisory lock, so two instances
//! migrating at once serialise (the second sees the first's versions and applies nothing) and a failure
//! leaves the database as it was. Applied versions are recorded in `walhook.schema_migrations`; shipped files
//! are never edited, only added.

use tokio_postgres::Client;

/// The migrations, in order: (version, name, SQL).
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "core", include_str!("../sql/001_core.sql")),
    (2, "notify", include_str!("../sql/002_notify.sql")),
    (3, "policies", include_str!("../sql/003_policies.sql")),
    (4, "ops", include_str!("../sql/004_ops.sql")),
    (6, "trust", include_str!("../sql/006_trust.sql")),
];

/// Advisory lock key taken while migrating ("walhook" in ASCII).
const MIGRATION_LOCK: i64 = 0x77_616c_686f_6f6b;

/// Database errors read as [`crate::pgerror`] renders them for `walhook migrate` (a missing privilege means
/// the role may not create the schema); they are not exposed as `source()`, so no chain repeats them.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migration {version} ({name}) failed: {}", describe(.error))]
    Migration {
        version: i32,
        name: &'static str,
        error: tokio_postgres::Error,
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

fn describe(e: &tokio_postgres::Error) -> String {
    crate::pgerror::describe_for(e, crate::pgerror::Job::Migrate, None)
}

/// Applies every migration not yet applied; returns the versions applied now (empty when up to date).
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, MigrateError> {
    let tx = client.transaction().await?;
    tx.execute("select pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "create schema if not exists walhook;
         create table if not exists walhook.schema_migrations (
           version integer primary key,
           name text not null,
           applied_at timestamptz not null default now())",
    )
    .await?;
    let applied: Vec<i32> = tx
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
        if applied.contains(&version) {
            continue;
        }
        let fail = |error| MigrateError::Migration {
            version,
            name,
            error,
        };
        tx.batch_execute(sql).await.map_err(fail)?;
        tx.execute(
            "insert into walhook.schema_migrations (version, name) values ($1, $2)",
            &[&version, &name],
        )
        .await
        .map_err(fail)?;
        now_applied.push(version);
    }
    tx.commit().await?;
    Ok(now_applied)
}
