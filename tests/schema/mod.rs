//! The schema on a live primary: migrations in steps (the catalog they leave is the same whichever way a
//! database got there, and an application's inserts never wait long behind them), the checks by which SQL
//! refuses what the daemon cannot send, functions pinned against search_path shadowing, and the README's roles
//! set up exactly as written and each doing its job, with both sources.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use walhook::cluster::{ClusterOptions, WalLevel};
use walhook::receiver::Receiver;
use walhook::schema::{self, MigrateError, MigrateOptions};
use walhook::sign::{Ed25519Signer, Signer};

use crate::support::*;

/// The old one-transaction files of migrations 3 and 4, as shipped before they were split into steps.
const SHIPPED: &[(i32, &str, &str)] = &[
    (3, "policies", include_str!("shipped/003_policies.sql")),
    (4, "ops", include_str!("shipped/004_ops.sql")),
];

/// The versions a database at `version` still has to apply.
fn versions_after(version: i32) -> Vec<i32> {
    schema::MIGRATIONS
        .iter()
        .map(|m| m.0)
        .filter(|v| *v > version)
        .collect()
}

fn options_up_to(version: i32) -> MigrateOptions {
    MigrateOptions {
        target: Some(version),
        ..Default::default()
    }
}

async fn connect(url: &str) -> Client {
    walhook::store::connect_client(&url.parse().unwrap())
        .await
        .expect("connect")
}

/// A new database in `pg`'s cluster, migrated up to `version` (no grants before the latest).
async fn database_at(pg: &Pg, name: &str, version: i32) -> (String, Client) {
    let url = pg.cluster.create_database(name).await.unwrap();
    let mut client = connect(&url).await;
    schema::migrate_with(&mut client, &options_up_to(version))
        .await
        .expect("migrate to the starting version");
    (url, client)
}

/// Everything about the walhook schema that users or the daemon could tell apart, one sorted line per item:
/// relations (row-level security on or off, options such as a view's security_invoker), row-level security
/// policies, columns (with position, default and grants), constraints (validated or not), indexes (valid or
/// not), functions (definition with its settings, grants), triggers, views, the publication, grants on the
/// schema and tables, and the recorded versions. Grants are compared as sets: their order in an ACL depends on
/// the history of GRANTs, not on what they allow.
async fn catalog(client: &Client) -> Vec<String> {
    let queries = [
        "select format('relation %s %s row security %s options %s', c.relname, c.relkind, c.relrowsecurity,
                       c.reloptions) from pg_class c
          where c.relnamespace = 'walhook'::regnamespace",
        "select format('policy %s.%s %s %s to %s using %s check %s', p.tablename, p.policyname, p.permissive, p.cmd,
                       p.roles, p.qual, p.with_check)
           from pg_policies p where p.schemaname = 'walhook'",
        "select format('column %s.%s #%s %s not null %s default %s identity %s grants %s', c.relname, a.attname,
                       a.attnum, format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid),
                       a.attidentity, (select array_agg(x::text order by x::text) from unnest(a.attacl) x))
           from pg_attribute a join pg_class c on c.oid = a.attrelid
           left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
          where c.relnamespace = 'walhook'::regnamespace and c.relkind in ('r', 'v') and a.attnum > 0
            and not a.attisdropped",
        "select format('grants %s %s', c.relname, (select array_agg(x::text order by x::text) from unnest(c.relacl) x))
           from pg_class c where c.relnamespace = 'walhook'::regnamespace",
        "select format('constraint %s.%s %s validated %s', c.relname, k.conname, pg_get_constraintdef(k.oid), k.convalidated)
           from pg_constraint k join pg_class c on c.oid = k.conrelid where c.relnamespace = 'walhook'::regnamespace",
        "select format('index %s valid %s ready %s', pg_get_indexdef(i.indexrelid), i.indisvalid, i.indisready)
           from pg_index i join pg_class c on c.oid = i.indexrelid where c.relnamespace = 'walhook'::regnamespace",
        "select format('function %s grants %s', pg_get_functiondef(p.oid),
                       (select array_agg(x::text order by x::text) from unnest(p.proacl) x))
           from pg_proc p where p.pronamespace = 'walhook'::regnamespace",
        "select format('trigger %s', pg_get_triggerdef(t.oid)) from pg_trigger t join pg_class c on c.oid = t.tgrelid
          where not t.tgisinternal and c.relnamespace = 'walhook'::regnamespace",
        "select format('view %s %s', c.relname, pg_get_viewdef(c.oid)) from pg_class c
          where c.relnamespace = 'walhook'::regnamespace and c.relkind = 'v'",
        "select format('publication %s insert %s update %s delete %s truncate %s tables %s', p.pubname, p.pubinsert,
                       p.pubupdate, p.pubdelete, p.pubtruncate,
                       (select array_agg(t.schemaname || '.' || t.tablename) from pg_publication_tables t
                         where t.pubname = p.pubname))
           from pg_publication p",
        "select format('schema grants %s', (select array_agg(x::text order by x::text) from unnest(n.nspacl) x))
           from pg_namespace n where n.nspname = 'walhook'",
        "select format('version %s %s', version, name) from walhook.schema_migrations",
    ];
    let mut lines = Vec::new();
    for q in queries {
        for row in client.query(q, &[]).await.expect(q) {
            lines.push(row.get::<_, String>(0));
        }
    }
    lines.sort();
    lines
}

/// Fails with the lines that differ, rather than two walls of text.
fn assert_same_catalog(what: &str, expected: &[String], found: &[String]) {
    let expected_set: HashSet<&String> = expected.iter().collect();
    let found_set: HashSet<&String> = found.iter().collect();
    let missing: Vec<&&String> = expected_set.difference(&found_set).collect();
    let extra: Vec<&&String> = found_set.difference(&expected_set).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: the catalog differs from a fresh install\nmissing: {missing:#?}\nextra: {extra:#?}"
    );
}

/// Applies a shipped one-transaction file the way the old runner did, and records its version.
async fn apply_shipped(client: &mut Client, version: i32, name: &str, sql: &str) {
    let tx = client.transaction().await.unwrap();
    tx.batch_execute(sql).await.unwrap();
    tx.execute(
        "insert into walhook.schema_migrations (version, name) values ($1, $2)",
        &[&version, &name],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

/// Rows of every kind a version-2 database holds, so upgrades run over data: `events` outbox rows with a
/// delivery and an attempt each, and `deliveries` deliveries in all.
async fn populate_v2(client: &Client, events: i64, deliveries: i64) {
    client
        .batch_execute(&format!(
            "insert into walhook.endpoints (url, event_types) values ('https://a.example/hook', '{{order.*}}'),
                                                                 ('https://b.example/hook', '{{*}}');
             insert into walhook.outbox (event_type, payload)
               select 'order.created', jsonb_build_object('n', g, 'pad', repeat('x', 100))
                 from generate_series(1, {events}) g;
             insert into walhook.deliveries (event_id, endpoint_id, webhook_id, status, attempts, next_attempt_at)
               select g, 1 + g % 2, gen_random_uuid(),
                      case when g % 50 = 0 then 'pending' when g % 77 = 0 then 'dead' else 'succeeded' end,
                      1, now()
                 from generate_series(1, {deliveries}) g;
             insert into walhook.attempts (delivery_id, attempt, attempted_at, duration_ms, status_code)
               select g, 1, now(), 5, 200 from generate_series(1, {events}) g;"
        ))
        .await
        .expect("populate a version-2 database");
}

/// Fresh install, the shipped one-transaction files of 3 and 4, an upgrade of a populated version-2 database,
/// and every way a multi-step migration can be interrupted between steps: all end with the same catalog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_path_to_the_latest_schema_gives_the_same_catalog() {
    let pg = Pg::start().await;
    let expected = catalog(&pg.client().await).await;
    assert!(
        expected
            .iter()
            .any(|l| l.starts_with("trigger ") && l.contains("outbox_payload_limit")),
        "the payload limit is checked on a fresh install"
    );

    // the shipped files of 3 and 4, then this binary's migrate (005 and the grants)
    let (_, mut client) = database_at(&pg, "shipped", 2).await;
    for &(version, name, sql) in SHIPPED {
        apply_shipped(&mut client, version, name, sql).await;
    }
    assert_eq!(
        schema::migrate(&mut client).await.unwrap(),
        versions_after(4)
    );
    assert_same_catalog("shipped 003/004", &expected, &catalog(&client).await);

    let (_, mut client) = database_at(&pg, "upgraded", 2).await;
    populate_v2(&client, 2000, 2000).await;
    assert_eq!(
        schema::migrate(&mut client).await.unwrap(),
        versions_after(2)
    );
    assert_same_catalog(
        "upgraded from version 2",
        &expected,
        &catalog(&client).await,
    );

    // interrupted after each step but the last: the next migrate runs the migration again from its start
    for &(version, _, sql) in schema::MIGRATIONS {
        let steps = schema::steps(sql);
        for done in 1..steps.len() {
            let name = format!("interrupted_{version}_{done}");
            let (_, mut client) = database_at(&pg, &name, version - 1).await;
            populate_v2(&client, 100, 100).await;
            for step in &steps[..done] {
                client
                    .batch_execute(step.sql)
                    .await
                    .unwrap_or_else(|e| panic!("{name}: {}: {e:?}", step.what));
            }
            schema::migrate(&mut client)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_same_catalog(&name, &expected, &catalog(&client).await);
        }
    }
}

/// A concurrent index build cancelled midway leaves an invalid index behind, which `if not exists` alone
/// would keep: the next migrate drops it and builds it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_build_interrupted_midway_is_built_again() {
    let pg = Pg::start().await;
    let expected = catalog(&pg.client().await).await;
    let (url, mut client) = database_at(&pg, "interrupted", 3).await;
    let steps = schema::steps(schema::MIGRATIONS[3].2);
    client.batch_execute(steps[0].sql).await.unwrap();
    let build = steps[1].sql.to_string();
    assert!(
        steps[1].concurrent,
        "004's second step builds deliveries_dead"
    );

    // an open snapshot makes the build wait in its last phase, where it is cancelled
    let holder = connect(&url).await;
    holder
        .batch_execute("begin isolation level repeatable read; select 1")
        .await
        .unwrap();
    let builder = connect(&url).await;
    let pid: i32 = builder
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let building = tokio::spawn(async move { builder.batch_execute(&build).await });
    eventually("the index build waits for the open snapshot", || async {
        count(
            &client,
            &format!(
                "select count(*) from pg_stat_activity where pid = {pid} and wait_event_type = 'Lock'"
            ),
        )
        .await
            == 1
    })
    .await;
    client
        .execute("select pg_cancel_backend($1)", &[&pid])
        .await
        .unwrap();
    let err = building
        .await
        .unwrap()
        .expect_err("the build was cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err:?}");
    holder.batch_execute("commit").await.unwrap();
    assert_eq!(
        count(
            &client,
            "select count(*) from pg_index where indexrelid = 'walhook.deliveries_dead'::regclass and not indisvalid"
        )
        .await,
        1,
        "the cancelled build left an invalid index"
    );

    assert_eq!(
        schema::migrate(&mut client).await.unwrap(),
        versions_after(3)
    );
    assert_same_catalog(
        "after an interrupted index build",
        &expected,
        &catalog(&client).await,
    );
}

/// The issue's test: a version-2 database with a populated outbox and deliveries, an application inserting
/// events in a loop on its own connection, a dashboard reading deliveries in a transaction of a few seconds,
/// and `walhook migrate` to the latest version meanwhile. No insert waits a second: the outbox is only locked
/// by catalog-only changes of its own, never while a step waits for deliveries, its payload check is validated
/// under a lock that inserts pass, and the indexes on deliveries are built concurrently. (The shipped
/// one-transaction migration 3 held the outbox from its first change until the dashboard was done.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_a_populated_database_never_holds_an_insert_for_a_second() {
    let pg = Pg::start().await;
    let (url, client) = database_at(&pg, "busy", 2).await;
    populate_v2(&client, 200_000, 200_000).await;
    client.batch_execute("vacuum analyze").await.unwrap();

    let app = connect(&url).await;
    let stop = Arc::new(AtomicBool::new(false));
    let inserting = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                app.execute(
                    "insert into walhook.outbox (event_type, payload) values ('order.paid', '{\"n\": 1}')",
                    &[],
                )
                .await
                .expect("the application's insert succeeds");
                latencies.push((started, started.elapsed()));
            }
            latencies
        })
    };
    eventually("the application inserts", || async {
        count(
            &client,
            "select count(*) from walhook.outbox where event_type = 'order.paid'",
        )
        .await
            >= 10
    })
    .await;

    // a dashboard's transaction reads deliveries for a few seconds: whatever changes deliveries waits for it,
    // and must not hold the outbox meanwhile
    let dashboard = connect(&url).await;
    dashboard
        .batch_execute("begin; select count(*) from walhook.deliveries")
        .await
        .unwrap();
    let reading = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        dashboard.batch_execute("commit").await.unwrap();
    });

    let migrating = Instant::now();
    let env = [("WALHOOK_DATABASE_URL", url.clone())];
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_walhook"))
            .arg("migrate")
            .envs(env)
            .env("RUST_LOG", "info")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let migrated = Instant::now();
    stop.store(true, Ordering::Relaxed);
    reading.await.unwrap();
    let latencies = inserting.await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "migrate failed: {stderr}");
    assert!(
        String::from_utf8_lossy(&output.stdout)
            .contains(&format!("applied migrations {:?}", versions_after(2))),
        "{stderr}"
    );

    let during: Vec<Duration> = latencies
        .iter()
        .filter(|(started, took)| *started + *took >= migrating && *started <= migrated)
        .map(|(_, took)| *took)
        .collect();
    assert!(
        !during.is_empty(),
        "the application kept inserting while migrate ran"
    );
    let longest = during.iter().max().unwrap();
    assert!(
        *longest < Duration::from_secs(1),
        "an insert waited {longest:?} while migrate ran ({} inserts meanwhile); migrate said:\n{stderr}",
        during.len()
    );
    assert_eq!(
        count(
            &client,
            "select count(*) from pg_trigger where tgname = 'outbox_payload_limit'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &client,
            "select count(*) from pg_index i join pg_class c on c.oid = i.indexrelid
              where c.relnamespace = 'walhook'::regnamespace and not i.indisvalid"
        )
        .await,
        0
    );
}

/// A transaction holding the outbox makes a step give up after its lock timeout, a few times, and the error
/// names that session; once it ends, migrate goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_cannot_get_its_lock_names_who_holds_it() {
    let pg = Pg::start().await;
    let (url, mut client) = database_at(&pg, "held", 2).await;
    let report = connect(&url).await;
    report
        .batch_execute(
            "set application_name = 'nightly_report'; begin; select count(*) from walhook.outbox",
        )
        .await
        .unwrap();
    let quick = MigrateOptions {
        lock_timeout: Duration::from_millis(200),
        lock_attempts: 3,
        first_backoff: Duration::from_millis(50),
        target: None,
    };
    let err = schema::migrate_with(&mut client, &quick)
        .await
        .expect_err("the outbox is held");
    let text = err.to_string();
    assert!(
        matches!(err, MigrateError::Locked { attempts: 3, .. }),
        "{text}"
    );
    assert!(text.contains("migration 3 (policies)"), "{text}");
    assert!(text.contains("nightly_report"), "{text}");
    assert!(
        text.contains("select count(*) from walhook.outbox"),
        "{text}"
    );
    assert!(text.contains("run `walhook migrate` again"), "{text}");
    // the steps before it were applied, the migration is not recorded yet
    assert_eq!(
        count(
            &client,
            "select max(version)::int8 from walhook.schema_migrations"
        )
        .await,
        2
    );

    // the holder ends while migrate is retrying: it goes through
    let patient = MigrateOptions {
        lock_attempts: 20,
        ..quick
    };
    let ending = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        report.batch_execute("commit").await.unwrap();
    });
    assert_eq!(
        schema::migrate_with(&mut client, &patient).await.unwrap(),
        versions_after(2)
    );
    ending.await.unwrap();
}

/// `walhook migrate` run twice prints what it applied, then only that the schema is up to date: no notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_migrate_prints_only_that_it_is_up_to_date() {
    let pg = Pg::start_unmigrated(ClusterOptions::default()).await;
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_walhook"))
            .arg("migrate")
            .env("WALHOOK_DATABASE_URL", &pg.url)
            // the throwaway cluster has no TLS: prefer's warning about that is tested in connect::
            .env("PGSSLMODE", "disable")
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let first = run();
    assert!(first.status.success());
    assert!(String::from_utf8_lossy(&first.stdout)
        .contains(&format!("applied migrations {:?}", versions_after(0))));
    let second = run();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&second.stdout).trim(),
        "walhook schema is up to date"
    );
    assert!(
        stderr.trim().is_empty(),
        "a second migrate printed: {stderr}"
    );
}

/// SQL refuses at INSERT (and UPDATE) the endpoint values the daemon could not send, each with the constraint
/// named in the error and a message that says what to fix; for secrets, signing keys and header values it
/// agrees with the daemon's own parsers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_rows_the_daemon_cannot_send_are_refused() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let insert = |column: &'static str, value: String| {
        let client = &client;
        async move {
            client
                .query_one(
                    &format!(
                        "insert into walhook.endpoints (url, {column}) values ('https://example.com/h', $1::text::{})
                         returning id",
                        match column {
                            "headers" => "jsonb",
                            "rate_limit" => "float8",
                            "retry_schedule" => "interval[]",
                            _ => "text",
                        }
                    ),
                    &[&value],
                )
                .await
        }
    };
    let refused = |result: Result<tokio_postgres::Row, tokio_postgres::Error>,
                   constraint: &str,
                   needle: &str,
                   what: &str| {
        let err = result.expect_err(what);
        let db = err
            .as_db_error()
            .unwrap_or_else(|| panic!("{what}: {err:?}"));
        assert_eq!(db.code(), &SqlState::CHECK_VIOLATION, "{what}: {db}");
        assert_eq!(db.constraint(), Some(constraint), "{what}: {db}");
        assert!(db.message().contains(needle), "{what}: {}", db.message());
    };

    // secrets: accepted exactly when the daemon's signer accepts them
    let mut non_canonical = STANDARD.encode([0u8; 25]);
    non_canonical.replace_range(non_canonical.len() - 3..non_canonical.len() - 2, "B");
    for (secret, needle) in [
        (walhook::sign::generate_secret(), None),
        (format!("whsec_{}", STANDARD.encode([7u8; 24])), None),
        // 64 bytes: PostgreSQL's encode() breaks the line after 76 characters
        (format!("whsec_{}", STANDARD.encode([9u8; 64])), None),
        (format!("whsec_{non_canonical}"), Some("canonical")),
    ] {
        let result = insert("secret", secret.clone()).await;
        assert_eq!(
            result.is_ok(),
            Signer::new(&secret).is_ok(),
            "{secret}: {result:?}"
        );
        if let Some(needle) = needle {
            refused(result, "endpoints_secret_canonical", needle, &secret);
        }
    }

    // signing keys likewise (whether the halves belong together is left to the daemon)
    let (key, _) = Ed25519Signer::generate();
    // the character before "==" carries 4 bits after the last byte: set the lowest
    let mut bent = key.clone();
    let at = bent.len() - 3;
    let with_a_stray_bit = match bent.as_bytes()[at] {
        b'A' => "B",
        b'Q' => "R",
        b'g' => "h",
        b'w' => "x",
        other => panic!(
            "a canonical key ends in A, Q, g or w before its padding, not {}",
            other as char
        ),
    };
    bent.replace_range(at..at + 1, with_a_stray_bit);
    assert!(Ed25519Signer::new(&bent).is_err());
    insert("signing_key", key.clone())
        .await
        .expect("a generated key");
    refused(
        insert("signing_key", bent.clone()).await,
        "endpoints_signing_key_canonical",
        "walhook keygen",
        &bent,
    );

    // header values: accepted exactly when the http crate accepts them
    for value in [
        "a\u{1}b",
        "a\u{7f}b",
        "a\u{1f}b",
        "tab\there",
        "Zoë ü",
        "plain value",
    ] {
        let headers = serde_json::json!({ "x-k": value }).to_string();
        let result = insert("headers", headers).await;
        let sendable = http::HeaderValue::from_str(value).is_ok();
        assert_eq!(result.is_ok(), sendable, "{value:?}: {result:?}");
        if !sendable {
            refused(
                result,
                "endpoints_header_values_valid",
                "invalid value for header 'x-k': it has a control character",
                value,
            );
        }
    }

    // control characters in a URL (spaces and line breaks were refused already)
    for url in [
        "https://example.com/a\u{1}b",
        "https://example.com/?q=\u{7f}",
    ] {
        assert!(http::Uri::try_from(url).is_err());
        let result = client
            .query_one(
                "insert into walhook.endpoints (url) values ($1) returning id",
                &[&url],
            )
            .await;
        refused(result, "endpoints_url_characters", "control character", url);
    }

    // policy bounds
    for ok in ["0.001", "1", "1000000"] {
        insert("rate_limit", ok.into()).await.expect(ok);
    }
    for bad in ["0.0009", "1e-20", "1000000.5", "NaN", "Infinity"] {
        refused(
            insert("rate_limit", bad.into()).await,
            "endpoints_rate_limit_range",
            "between 0.001",
            bad,
        );
    }
    for ok in ["{1s,30 days}", "{1 mon}", "{720 hours}"] {
        insert("retry_schedule", ok.into()).await.expect(ok);
    }
    for bad in ["{30 days 1 second}", "{1s,1 year}"] {
        refused(
            insert("retry_schedule", bad.into()).await,
            "endpoints_retry_schedule_range",
            "longer than 30 days",
            bad,
        );
    }

    // an update is checked as well: the row keeps its value
    let id: i64 = insert("rate_limit", "5".into()).await.unwrap().get(0);
    let err = client
        .execute(
            "update walhook.endpoints set rate_limit = 1e-9 where id = $1",
            &[&id],
        )
        .await
        .expect_err("an absurd rate limit");
    assert_eq!(
        err.as_db_error().unwrap().constraint(),
        Some("endpoints_rate_limit_range")
    );
}

/// Endpoints stored before the stricter checks existed do not fail the migration: those checks stay NOT VALID
/// (new and changed rows are checked), the others are validated, and migrate warns naming the rows to fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_rows_that_break_new_checks_do_not_fail_the_migration() {
    let pg = Pg::start().await;
    let (url, client) = database_at(&pg, "old_rows", 4).await;
    client
        .batch_execute(
            "insert into walhook.endpoints (url, headers) values ('https://a.example/h', '{\"x-k\": \"a\\u0001b\"}');
             insert into walhook.endpoints (url, rate_limit) values ('https://b.example/h', 1e-20);
             insert into walhook.endpoints (url, retry_schedule) values ('https://c.example/h', '{1s,400 days}');
             insert into walhook.endpoints (url) values ('https://d.example/h');",
        )
        .await
        .unwrap();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_walhook"))
            .arg("migrate")
            .env("WALHOOK_DATABASE_URL", &url)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    for (constraint, ids) in [
        ("endpoints_header_values_valid", "1"),
        ("endpoints_rate_limit_range", "2"),
        ("endpoints_retry_schedule_range", "3"),
    ] {
        assert!(
            stderr.contains(&format!(
                "endpoints {ids} break the new constraint {constraint}"
            )) && stderr.contains(&format!("VALIDATE CONSTRAINT {constraint}")),
            "{constraint}: {stderr}"
        );
    }
    let unvalidated: Vec<String> = client
        .query(
            "select conname::text from pg_constraint
              where conrelid = 'walhook.endpoints'::regclass and not convalidated order by 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        unvalidated,
        [
            "endpoints_header_values_valid",
            "endpoints_rate_limit_range",
            "endpoints_retry_schedule_range"
        ]
    );
    let err = client
        .batch_execute(
            "insert into walhook.endpoints (url, rate_limit) values ('https://e.example/h', 1e-20)",
        )
        .await
        .expect_err("new rows are checked");
    assert_eq!(err.code(), Some(&SqlState::CHECK_VIOLATION));
    // fixed as the warning says, the constraint validates
    client
        .batch_execute(
            "update walhook.endpoints set rate_limit = null where id = 2;
             alter table walhook.endpoints validate constraint endpoints_rate_limit_range;",
        )
        .await
        .unwrap();
}

/// Review 14: a role that may create objects in a schema on the caller's search_path shadows `cardinality`
/// with an exact-type function. Pinned, walhook's functions never call it, whoever inserts an endpoint; the
/// same insert with the pin removed shows that the trap is real. And every walhook function is pinned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_resolve_names_in_pg_catalog_first_whoever_calls_them() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    client
        .batch_execute(
            "create role mallory login;
             grant create on schema public to mallory;
             create role ops login in role walhook_admin;",
        )
        .await
        .unwrap();
    let mallory = pg.client_as("mallory").await;
    mallory
        .batch_execute(
            "create table public.loot (secret text);
             grant insert on public.loot to public;
             create function public.cardinality(text[]) returns integer language plpgsql as $$
             begin
               insert into public.loot select secret from walhook.endpoints;
               return 1;
             end $$;",
        )
        .await
        .unwrap();
    assert_eq!(
        mallory
            .batch_execute("select * from walhook.endpoints")
            .await
            .unwrap_err()
            .code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "mallory cannot read secrets herself"
    );
    let ops = pg.client_as("ops").await;
    add_endpoint(&ops, "https://a.example/hook", &["order.*"]).await;
    assert_eq!(count(&client, "select count(*) from public.loot").await, 0);

    client
        .batch_execute("alter function walhook.check_event_patterns(text[]) reset search_path")
        .await
        .unwrap();
    add_endpoint(&ops, "https://b.example/hook", &["order.*"]).await;
    assert!(
        count(&client, "select count(*) from public.loot").await > 0,
        "without the pin the admin's insert runs mallory's function"
    );

    client
        .batch_execute(
            "alter function walhook.check_event_patterns(text[]) set search_path = pg_catalog, walhook, pg_temp",
        )
        .await
        .unwrap();
    let unpinned = client
        .query(
            "select p.oid::regprocedure::text from pg_proc p
              where p.pronamespace = 'walhook'::regnamespace
                and not coalesce(p.proconfig @> array['search_path=pg_catalog, walhook, pg_temp'], false)",
            &[],
        )
        .await
        .unwrap();
    let unpinned: Vec<String> = unpinned.iter().map(|r| r.get(0)).collect();
    assert!(
        unpinned.is_empty(),
        "functions without `set search_path = pg_catalog, walhook, pg_temp`: {unpinned:?}"
    );
}

/// Changing the payload limit replaces a function and takes no lock on the outbox: it succeeds at once while
/// a long transaction holds the table, and rows already committed are never checked again (with the notify
/// source, claims and marks update them: lowering the limit below one of them must not stop it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_payload_limit_takes_no_lock_and_never_rechecks_committed_rows() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let report = pg.client().await;
    report
        .batch_execute(
            "set application_name = 'nightly_report'; begin; select count(*) from walhook.outbox",
        )
        .await
        .unwrap();
    client
        .batch_execute("set lock_timeout = '1s'; select walhook.set_max_payload_bytes(1048576)")
        .await
        .expect("no lock on the outbox is needed");
    report.batch_execute("commit").await.unwrap();
    let big = format!("{{\"blob\": \"{}\"}}", "x".repeat(300 * 1024));
    client
        .execute(
            "insert into walhook.outbox (event_type, payload) values ('big.event', $1::text::jsonb)",
            &[&big],
        )
        .await
        .expect("within the raised limit");
    client
        .batch_execute("select walhook.set_max_payload_bytes(262144)")
        .await
        .unwrap();
    let err = client
        .execute(
            "insert into walhook.outbox (event_type, payload) values ('big.event', $1::text::jsonb)",
            &[&big],
        )
        .await
        .expect_err("over the lowered limit");
    let message = err
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(
        message.contains("over the limit of 262144 bytes"),
        "{err:?}"
    );
    // the committed row may still be updated (as the notify source claims and marks rows)
    client
        .batch_execute(
            "update walhook.outbox set claimed_until = now() where event_type = 'big.event'",
        )
        .await
        .expect("a committed row is not checked again");
}

/// A migrating role that may not create roles still grants every group role that exists, and names the
/// statement for each one missing; once a superuser created it, the next migrate grants it. (A role that may
/// not even create the schema is told as whom to run migrate.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrator_that_cannot_create_roles_grants_those_that_exist() {
    let pg = Pg::start_unmigrated(ClusterOptions::default()).await;
    let client = pg.client().await;
    client
        .batch_execute(
            "create role app_owner login;
             alter database app owner to app_owner;
             create role walhook_writer nologin;
             create role app login in role walhook_writer;",
        )
        .await
        .unwrap();
    let migrate = || {
        let url = pg.url_as("app_owner");
        std::process::Command::new(env!("CARGO_BIN_EXE_walhook"))
            .arg("migrate")
            .env("WALHOOK_DATABASE_URL", url)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    // a role that owns nothing is told as whom to run it
    client
        .batch_execute("create role stranger login")
        .await
        .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_walhook"))
        .arg("migrate")
        .env("WALHOOK_DATABASE_URL", pg.url_as("stranger"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("permission denied for database app")
            && stderr.contains("SQLSTATE 42501")
            && stderr.contains("the database's owner"),
        "{stderr}"
    );

    let output = migrate();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    for role in ["walhook_reader", "walhook_admin", "walhook_daemon"] {
        assert!(
            stderr.contains(&format!("CREATE ROLE {role} NOLOGIN;"))
                && stderr.contains("then run `walhook migrate` again"),
            "{role}: {stderr}"
        );
    }
    assert!(!stderr.contains("CREATE ROLE walhook_writer"), "{stderr}");
    let app = pg.client_as("app").await;
    publish(&app, "order.created", "{}").await;

    client
        .batch_execute(
            "create role walhook_daemon nologin; create role daemon login in role walhook_daemon",
        )
        .await
        .unwrap();
    let output = migrate();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("CREATE ROLE walhook_daemon"), "{stderr}");
    let daemon = pg.client_as("daemon").await;
    daemon
        .batch_execute("select * from walhook.slots; delete from walhook.outbox where false")
        .await
        .expect("the daemon's grants arrive with the next migrate");
}

/// Runs `sql` and expects PostgreSQL to refuse it for lack of privilege.
async fn denied(client: &Client, who: &str, sql: &str) {
    let err = client
        .batch_execute(sql)
        .await
        .expect_err(&format!("{who} must not: {sql}"));
    assert_eq!(
        err.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{who}: {sql}: {err:?}"
    );
}

/// The fenced blocks of `lang` in the README section under `heading` (up to the next heading of its level or
/// higher), as written.
pub(crate) fn readme_blocks(heading: &str, lang: &str) -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let level = heading.chars().take_while(|c| *c == '#').count();
    let mut lines = readme.lines();
    lines
        .by_ref()
        .find(|l| *l == heading)
        .unwrap_or_else(|| panic!("README.md has no heading {heading:?}"));
    let mut blocks = Vec::new();
    let mut fence: Option<(bool, String)> = None;
    for line in lines {
        if let Some(info) = line.strip_prefix("```") {
            match fence.take() {
                Some((ours, text)) => {
                    if ours {
                        blocks.push(text);
                    }
                }
                None => fence = Some((info.trim() == lang, String::new())),
            }
        } else if let Some((_, text)) = fence.as_mut() {
            text.push_str(line);
            text.push('\n');
        } else if line.starts_with('#') && line.chars().take_while(|c| *c == '#').count() <= level {
            break;
        }
    }
    blocks
}

/// The README's host and port, replaced by the test cluster's.
fn on_this_cluster(pg: &Pg, url: &str) -> String {
    url.replace(
        "db.internal:5432",
        &format!("127.0.0.1:{}", pg.cluster.port()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_roles_do_their_jobs_with_replication() {
    the_readme_roles_do_their_jobs(Source::Replication).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_roles_do_their_jobs_with_notify() {
    the_readme_roles_do_their_jobs(Source::Notify).await
}

/// Quick start steps 1 and 2 and every SQL block of "Roles", exactly as written, on a stock cluster whose
/// database belongs to `app_owner`; then each role does its job and no more: the daemon (only
/// `walhook_daemon`, and `REPLICATION` for replication) delivers, disables an endpoint that answers 410, runs
/// `status` and `recover-slot`, and its retention prunes; the application publishes; the dashboard reads
/// status but no secret; the operator manages endpoints, rotates secrets and redelivers; the customers' pages
/// see nothing before they name a tenant, then manage that tenant's endpoints and no more.
async fn the_readme_roles_do_their_jobs(source: Source) {
    let pg = Pg::start_unmigrated(ClusterOptions {
        wal_level: match source {
            Source::Replication => WalLevel::Logical,
            Source::Notify => WalLevel::Replica,
        },
        ..Default::default()
    })
    .await;
    let superuser = pg.client().await;
    // the user's own database, before walhook
    superuser
        .batch_execute("create role app_owner login; alter database app owner to app_owner;")
        .await
        .unwrap();

    // quick start step 1, as a superuser
    let step1 = readme_blocks("### 1. PostgreSQL settings and roles", "sql");
    assert_eq!(step1.len(), 1, "{step1:?}");
    superuser.batch_execute(&step1[0]).await.expect("step 1");

    // step 2: the command as written, against this cluster; then once more, quietly
    let step2 = readme_blocks("### 2. Create the schema", "sh");
    let command = step2[0]
        .lines()
        .find(|l| l.contains("walhook migrate"))
        .expect("step 2 runs walhook migrate");
    let (assignment, rest) = command.split_once(' ').unwrap();
    assert_eq!(rest.trim(), "walhook migrate");
    let migrate_url = on_this_cluster(
        &pg,
        assignment.strip_prefix("WALHOOK_DATABASE_URL=").unwrap(),
    );
    let migrate = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_walhook"))
            .arg("migrate")
            .env("WALHOOK_DATABASE_URL", &migrate_url)
            // the throwaway cluster has no TLS: prefer's warning about that is tested in connect::
            .env("PGSSLMODE", "disable")
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let output = migrate();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "step 2 as written: {stderr}");
    assert!(!stderr.contains("WARN"), "{stderr}");
    let output = migrate();
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).trim().is_empty());

    // the Roles section, block by block: its first line says as whom, and whether for notify only
    for block in readme_blocks("## Roles", "sql") {
        let first = block.lines().next().unwrap_or_default();
        if first.contains("source = \"notify\" only") && source != Source::Notify {
            continue;
        }
        if first.contains("as a superuser") {
            superuser.batch_execute(&block).await.expect(&block);
        } else if first.contains("as the role that migrates") {
            let owner = pg.client_as("app_owner").await;
            for statement in block
                .lines()
                .filter(|l| !l.starts_with("--") && !l.trim().is_empty())
            {
                owner.batch_execute(statement).await.expect(statement);
            }
        } else {
            panic!("a README block under Roles does not say as whom to run it: {block}");
        }
    }
    let attributes = superuser
        .query_one(
            "select rolsuper, rolreplication, rolcreaterole, rolcreatedb,
                    array(select b.rolname::text from pg_auth_members m join pg_roles b on b.oid = m.roleid
                           where m.member = r.oid)
               from pg_roles r where rolname = 'walhook'",
            &[],
        )
        .await
        .unwrap();
    assert!(
        !attributes.get::<_, bool>(0)
            && !attributes.get::<_, bool>(2)
            && !attributes.get::<_, bool>(3)
    );
    assert_eq!(attributes.get::<_, bool>(1), source == Source::Replication);
    assert_eq!(attributes.get::<_, Vec<String>>(4), ["walhook_daemon"]);

    let app = pg.client_as("app").await;
    let dashboard = pg.client_as("dashboard").await;
    let ops = pg.client_as("ops").await;

    // the operator subscribes an endpoint, and one that is off, whose URL carries credentials
    let rx = Receiver::start().await.unwrap();
    let (endpoint, secret) = add_endpoint(&ops, &rx.url("/hook"), &["order.*"]).await;
    rx.set_secret("/hook", &secret);
    ops.batch_execute(
        "insert into walhook.endpoints (url, enabled, headers)
         values ('https://user:password@hooks.example/in?token=abc', false, '{\"x-api-key\": \"k\"}')",
    )
    .await
    .expect("the operator adds endpoints");
    // and one that answers 410 Gone, which the daemon disables
    rx.set_responder(|r, _| match r.path.as_str() {
        "/gone" => walhook::receiver::Reply::Status(410),
        _ => walhook::receiver::Reply::Status(200),
    });
    let (gone, _) = add_endpoint(&ops, &rx.url("/gone"), &["order.*"]).await;

    // the daemon, as the README's `walhook` role
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let daemon_url = readme
        .split("database_url = \"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .find(|url| url.starts_with("postgres://walhook:"))
        .map(|url| on_this_cluster(&pg, url))
        .expect("the README names the daemon's database_url");
    let config = |retention: bool| {
        pg.config_for_with(source, |f| {
            let f = f.merge(("database_url", daemon_url.as_str()));
            if retention {
                f.merge(("retention.succeeded", "1s"))
                    .merge(("retention.dead", "1s"))
                    .merge(("retention.outbox", "1s"))
                    .merge(("retention.interval", "1s"))
            } else {
                f.merge(("retention.enabled", false))
            }
        })
    };
    let daemon = Daemon::start(config(false));
    wait_ready(source, &superuser).await;

    // the application publishes, and reads back what identifies its events
    for i in 0..10 {
        app.query_one(
            "insert into walhook.outbox (event_type, payload, ordering_key) values ('order.created', $1::text::jsonb, 'k')
             returning id, uid, created_at",
            &[&format!("{{\"n\": {i}}}")],
        )
        .await
        .expect("the application publishes");
    }
    wait_succeeded(&superuser, 10).await;
    if source == Source::Notify {
        wait_all_processed(&superuser).await;
    }
    let hook_requests = || {
        rx.received()
            .into_iter()
            .filter(|r| r.path == "/hook")
            .collect::<Vec<_>>()
    };
    assert!(hook_requests().iter().all(|r| r.verified == Some(true)));
    eventually(
        "the daemon disables the endpoint that answered 410",
        || async {
            count(
                &superuser,
                &format!(
                    "select count(*) from walhook.endpoints
                  where id = {gone} and not enabled and disabled_reason like '%410%'"
                ),
            )
            .await
                == 1
        },
    )
    .await;
    for sql in [
        "select * from walhook.endpoints",
        "select secret from walhook.endpoints",
        "select secret from walhook.endpoint_secrets",
        "select * from walhook.deliveries",
        "select payload from walhook.outbox",
        "insert into walhook.outbox (event_type, payload, created_at) values ('order.created', '{}', now() - interval '30 days')",
        "update walhook.outbox set payload = '{}'",
        "delete from walhook.outbox",
        "insert into walhook.endpoints (url) values ('https://evil.example/x')",
        "select walhook.redeliver()",
    ] {
        denied(&app, "the application", sql).await;
    }

    // the dashboard reads status, never a secret
    dashboard
        .batch_execute(
            "select * from walhook.deliveries;
             select id, delivery_id, attempt, attempted_at, duration_ms, status_code, error from walhook.attempts;
             select id, event_types, enabled, description, disabled_reason, metadata from walhook.endpoints;
             select * from walhook.endpoint_state;
             select event_type, payload, created_at from walhook.outbox;",
        )
        .await
        .expect("the dashboard reads status");
    let urls: Vec<String> = dashboard
        .query(
            "select url from walhook.endpoint_health order by endpoint_id",
            &[],
        )
        .await
        .expect("and health")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        urls,
        [
            rx.url("/hook"),
            "https://hooks.example/in".to_string(),
            rx.url("/gone")
        ]
    );
    for sql in [
        "select url from walhook.endpoints",
        "select secret from walhook.endpoints",
        "select headers from walhook.endpoints",
        "select signing_key from walhook.endpoints",
        "select proxy from walhook.endpoints",
        "select * from walhook.endpoint_secrets",
        "select response_body from walhook.attempts",
        "update walhook.endpoints set enabled = false",
        "insert into walhook.outbox (event_type, payload) values ('order.created', '{}')",
        "select walhook.redeliver()",
    ] {
        denied(&dashboard, "the dashboard", sql).await;
    }

    // the operator rotates the secret and redelivers; the old secret still signs during the grace period
    let rotated: String = ops
        .query_one("select walhook.rotate_secret($1)", &[&endpoint])
        .await
        .expect("the operator rotates secrets")
        .get(0);
    assert!(rotated != secret && Signer::new(&rotated).is_ok());
    let redelivered: i64 = ops
        .query_one(
            "select walhook.redeliver(endpoint_id => $1, status => 'succeeded')",
            &[&endpoint],
        )
        .await
        .expect("and redelivers")
        .get(0);
    assert_eq!(redelivered, 10);
    eventually("the redelivered events arrive", || async {
        hook_requests().len() >= 20
            && count(
                &superuser,
                "select count(*) from walhook.deliveries where status = 'succeeded' and attempts = 2",
            )
            .await
                == 10
    })
    .await;
    assert!(hook_requests().iter().all(|r| r.verified == Some(true)));
    ops.batch_execute(
        "select url, secret, headers from walhook.endpoints;
         select response_body from walhook.attempts;
         select * from walhook.endpoint_secrets;
         update walhook.endpoints set rate_limit = 50 where enabled;
         delete from walhook.endpoints where not enabled;",
    )
    .await
    .expect("the operator reads everything and manages endpoints");
    denied(&ops, "the operator", "delete from walhook.deliveries").await;

    // the customers' pages: no row before they name a tenant, then that tenant's only (tests/tenants has the rest)
    let webapp = pg.client_as("webapp").await;
    let operators = count(&superuser, "select count(*) from walhook.endpoints").await;
    for table in [
        "endpoints",
        "deliveries",
        "attempts",
        "outbox",
        "endpoint_health",
    ] {
        let sql = format!("select count(*) from walhook.{table}");
        assert_eq!(count(&webapp, &sql).await, 0, "{sql}");
    }
    webapp
        .batch_execute("set walhook.tenant = 'acme'")
        .await
        .unwrap();
    assert_eq!(
        count(&webapp, "select count(*) from walhook.endpoints").await,
        0,
        "the operator's endpoints belong to no tenant"
    );
    let (_, tenant_secret) =
        add_endpoint(&webapp, "https://hooks.acme.example/in", &["order.*"]).await;
    assert!(Signer::new(&tenant_secret).is_ok());
    for sql in [
        "select proxy from walhook.endpoints",
        "update walhook.endpoints set tenant = 'globex'",
        "update walhook.endpoints set timeout = '1 minute'",
        "insert into walhook.outbox (event_type, payload, tenant) values ('order.created', '{}', 'acme')",
        "update walhook.endpoints_generation set generation = 0",
        "select * from walhook.slots",
        "update walhook.tenants set max_endpoints = null",
        "delete from walhook.deliveries",
    ] {
        denied(&webapp, "the customers' pages", sql).await;
    }
    webapp
        .batch_execute("delete from walhook.endpoints")
        .await
        .expect("the customers' pages delete their endpoints");
    assert_eq!(
        count(&superuser, "select count(*) from walhook.endpoints").await,
        operators,
        "and only theirs"
    );

    // `walhook status` as the daemon's role
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_walhook"))
        .arg("status")
        .env("WALHOOK_DATABASE_URL", &daemon_url)
        .env(
            "WALHOOK_SOURCE",
            if source == Source::Notify {
                "notify"
            } else {
                "replication"
            },
        )
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    daemon.stop().await;

    // retention, as the daemon's role: old deliveries and attempts go, and with replication the outbox rows
    let daemon = Daemon::start(config(true));
    // (pending deliveries and their events stay, whatever else may have left some)
    eventually("retention removes what it may", || async {
        count(
            &superuser,
            "select count(*) from walhook.deliveries where status <> 'pending'",
        )
        .await
            == 0
            && count(
                &superuser,
                "select count(*) from walhook.attempts a
                  where not exists (select 1 from walhook.deliveries d where d.id = a.delivery_id)",
            )
            .await
                == 0
            && (source == Source::Notify
                || count(
                    &superuser,
                    "select count(*) from walhook.outbox o
                      where not exists (select 1 from walhook.deliveries d
                                         where d.event_id = o.id and d.status = 'pending')",
                )
                .await
                    == 0)
    })
    .await;
    if source == Source::Replication {
        assert!(
            count(&superuser, "select count(*) from walhook.outbox").await < 10,
            "the daemon's role deleted outbox rows"
        );
    }
    daemon.stop().await;

    // `walhook recover-slot` as the daemon's role: a healthy slot, then one dropped by hand
    if source == Source::Replication {
        let recover = || {
            let output = std::process::Command::new(env!("CARGO_BIN_EXE_walhook"))
                .arg("recover-slot")
                .env("WALHOOK_DATABASE_URL", &daemon_url)
                .env_remove("RUST_LOG")
                .output()
                .unwrap();
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
        };
        let said = recover();
        assert!(said.contains("is healthy"), "{said}");
        superuser
            .batch_execute("select pg_drop_replication_slot('walhook')")
            .await
            .unwrap();
        let said = recover();
        assert!(said.contains("re-created"), "{said}");
    }
}

/// A function that runs with its caller's rights (not SECURITY DEFINER) needs the caller to be allowed every
/// walhook function it calls: a check that calls another check failed for the tenant role with "permission
/// denied for function check_event_type" until that was granted. For each role grants.sql sets up, every
/// invoker function it may execute, and every invoker trigger function on a table it may write, may call only
/// functions the role may execute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_function_a_role_runs_calls_only_functions_it_may_execute() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let missing: Vec<String> = client
        .query(include_str!("grant_gaps.sql"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{}: {} calls {}",
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2)
            )
        })
        .collect();
    assert!(
        missing.is_empty(),
        "grants.sql misses:\n{}",
        missing.join("\n")
    );
}
