//! Tenants in SQL: who receives what (one rule, `walhook.endpoint_accepts`, checked here against the vectors
//! that the daemon's fan-out checks too), row-level security for `walhook_tenant` tried adversarially from one
//! tenant's session against another's rows, the per-tenant endpoint limit under concurrent inserts, `recover`
//! and `redeliver` in every form, the SQL backfills, a single-tenant install upgraded, and the README's recipe
//! for a customer-facing settings page run as written.
//!
//! None of these needs the daemon: what they test is decided in SQL, where a tenant's session cannot get
//! around it.

use std::collections::BTreeMap;

use serde_json::Value;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, SimpleQueryMessage};
use walhook::schema::{self, MigrateOptions};

use crate::schema::readme_blocks;
use crate::support::*;

mod daemon;
mod operational;

const VECTORS: &str = include_str!("containment_vectors.json");

/// A log-in role in `walhook_tenant`, like the README's `webapp`.
async fn tenant_role(superuser: &Client) {
    superuser
        .batch_execute("create role webapp login in role walhook_tenant")
        .await
        .unwrap();
}

/// A session of `webapp` scoped to `tenant` for as long as it lives (`set`, not `set local`).
async fn tenant_session(pg: &Pg, tenant: &str) -> Client {
    let client = pg.client_as("webapp").await;
    client
        .execute("select set_config('walhook.tenant', $1, false)", &[&tenant])
        .await
        .unwrap();
    client
}

/// Runs a statement and returns how many rows it returned or changed, or the error's SQLSTATE.
async fn outcome(client: &Client, sql: &str) -> Result<u64, SqlState> {
    match client.simple_query(sql).await {
        Ok(messages) => Ok(messages
            .iter()
            .map(|m| match m {
                SimpleQueryMessage::Row(_) => 1,
                SimpleQueryMessage::CommandComplete(n) => *n,
                _ => 0,
            })
            .max()
            .unwrap_or(0)),
        Err(e) => Err(e.code().cloned().unwrap_or(SqlState::INTERNAL_ERROR)),
    }
}

/// The first column of the first row, as text (simple query protocol: whatever the type).
async fn scalar(client: &Client, sql: &str) -> Option<String> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .into_iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_string)),
            _ => None,
        })
        .flatten()
}

async fn error_of(client: &Client, sql: &str) -> tokio_postgres::error::DbError {
    client
        .batch_execute(sql)
        .await
        .expect_err(sql)
        .as_db_error()
        .unwrap_or_else(|| panic!("{sql}: not a server error"))
        .clone()
}

/// Every row of every walhook table and view, as text: what "affects nothing" is measured against.
async fn everything(client: &Client) -> BTreeMap<String, String> {
    let relations: Vec<String> = client
        .query(
            "select c.relname::text from pg_class c
              where c.relnamespace = 'walhook'::regnamespace and c.relkind in ('r', 'v')
                and c.relname not in ('endpoints_generation', 'schema_migrations')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut state = BTreeMap::new();
    for relation in relations {
        let rows = scalar(
            client,
            &format!(
                "select string_agg(x::text, E'\\n' order by x::text) from walhook.{relation} x"
            ),
        )
        .await
        .unwrap_or_default();
        state.insert(relation, rows);
    }
    state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_matching_rule_agrees_with_the_shared_vectors() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let vectors: Value = serde_json::from_str(VECTORS).unwrap();
    let containment = vectors["containment"].as_array().unwrap();
    assert!(containment.len() > 40);
    for v in containment {
        let (payload, filter) = (
            v["payload"].as_str().unwrap(),
            v["filter"].as_str().unwrap(),
        );
        let row = client
            .query_one(
                "select $1::text::jsonb @> $2::text::jsonb,
                        walhook.endpoint_accepts('order.created', null, $1::text::jsonb, '{*}', null, false,
                                                 $2::text::jsonb)",
                &[&payload, &filter],
            )
            .await
            .unwrap_or_else(|e| panic!("{v}: {e:?}"));
        let expected = v["expected"].as_bool().unwrap();
        assert_eq!(row.get::<_, bool>(0), expected, "payload @> filter: {v}");
        assert_eq!(row.get::<_, bool>(1), expected, "endpoint_accepts: {v}");
    }
    let accepts = vectors["accepts"].as_array().unwrap();
    for v in accepts {
        let patterns: Vec<&str> = v["event_types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        let accepted: bool = client
            .query_one(
                "select walhook.endpoint_accepts($1, $2, $3::text::jsonb, $4, $5, $6, $7::text::jsonb)",
                &[
                    &v["event_type"].as_str().unwrap(),
                    &v["tenant"].as_str(),
                    &v["payload"].as_str().unwrap(),
                    &patterns,
                    &v["endpoint_tenant"].as_str(),
                    &v["all_tenants"].as_bool().unwrap(),
                    &v["filter"].as_str(),
                ],
            )
            .await
            .unwrap_or_else(|e| panic!("{v}: {e:?}"))
            .get(0);
        assert_eq!(accepted, v["expected"].as_bool().unwrap(), "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_filters_and_limits_are_checked_with_clear_errors() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let long = "t".repeat(256);
    for (sql, says) in [
        (
            "insert into walhook.outbox (event_type, payload, tenant) values ('a.b', '{}', '')".to_string(),
            "the empty string is refused",
        ),
        (
            format!("insert into walhook.outbox (event_type, payload, tenant) values ('a.b', '{{}}', '{long}')"),
            "it is 256 characters long; use 1 to 255",
        ),
        (
            "insert into walhook.outbox (event_type, payload, tenant) values ('a.b', '{}', E'ac\\nme')".to_string(),
            "control character (code 10) at position 3",
        ),
        (
            "insert into walhook.endpoints (url, tenant) values ('https://a.example/', E'\\u0085')".to_string(),
            "control character (code 133) at position 1",
        ),
        (
            "insert into walhook.endpoints (url, tenant, all_tenants) values ('https://a.example/', 'acme', true)"
                .to_string(),
            "cannot belong to tenant 'acme': set its tenant to NULL",
        ),
        (
            "insert into walhook.endpoints (url, filter) values ('https://a.example/', '[\"eu\"]')".to_string(),
            "it is a JSON array, it must be an object",
        ),
        (
            format!(
                "insert into walhook.endpoints (url, filter) values ('https://a.example/', '{{\"k\": \"{}\"}}')",
                "x".repeat(9000)
            ),
            "over 8192",
        ),
        (
            "insert into walhook.tenants (tenant, max_endpoints) values ('acme', -1)".to_string(),
            "invalid max_endpoints -1: use 0 or more",
        ),
        (
            "insert into walhook.tenants (tenant, rate_limit) values ('acme', 0)".to_string(),
            "between 0.001 (one every 1000 s) and 1000000",
        ),
        (
            "insert into walhook.tenants (tenant, rate_limit) values ('acme', 'NaN')".to_string(),
            "between 0.001",
        ),
        (
            "insert into walhook.tenants (tenant) values ('')".to_string(),
            "the empty string is refused",
        ),
    ] {
        let e = error_of(&client, &sql).await;
        assert_eq!(e.code(), &SqlState::CHECK_VIOLATION, "{sql}");
        assert!(e.message().contains(says), "{sql}: {}", e.message());
    }
    client
        .batch_execute(
            "insert into walhook.outbox (event_type, payload, tenant) values ('a.b', '{}', 'Acme Corp. #7 – ünïcode');
             insert into walhook.endpoints (url, all_tenants, filter) values ('https://a.example/', true, '{}');
             insert into walhook.tenants (tenant, max_endpoints, rate_limit) values ('acme', 0, 0.001);",
        )
        .await
        .expect("valid values are accepted");
}

/// What `walhook migrate` leaves of a single-tenant install: every tenant NULL, the same fan-out, and every
/// role that read or wrote before (walhook's, and a log-in role given rights by hand) still does, although
/// row-level security is now on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_tenant_install_works_unchanged_after_migrate() {
    let pg = Pg::start().await;
    let url = pg.cluster.create_database("old").await.unwrap();
    let mut owner = walhook::store::connect_client(&url.parse().unwrap())
        .await
        .unwrap();
    schema::migrate_with(
        &mut owner,
        &MigrateOptions {
            target: Some(10),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    owner
        .batch_execute(
            "insert into walhook.endpoints (url, event_types) values ('https://a.example/', '{order.*}');
             insert into walhook.outbox (event_type, payload) values ('order.created', '{\"n\": 1}');
             select walhook.recover(1, since => '-infinity', until => 'infinity');
             create role bi login;
             grant usage on schema walhook to bi;
             grant select on walhook.deliveries, walhook.outbox to bi;",
        )
        .await
        .unwrap();
    assert_eq!(
        schema::migrate(&mut owner).await.unwrap(),
        schema::MIGRATIONS
            .iter()
            .map(|m| m.0)
            .filter(|v| *v >= 11)
            .collect::<Vec<i32>>()
    );
    owner
        .batch_execute(
            "create role ops login in role walhook_admin; create role dash login in role walhook_reader;
             create role app login in role walhook_writer; create role daemon login in role walhook_daemon;",
        )
        .await
        .unwrap();
    let as_role = |role: &'static str| {
        let url = url.replacen("postgres@", &format!("{role}@"), 1);
        async move {
            walhook::store::connect_client(&url.parse().unwrap())
                .await
                .unwrap()
        }
    };
    assert_eq!(
        scalar(&owner, "select count(*) from walhook.endpoints where tenant is null and not all_tenants and filter is null").await.as_deref(),
        Some("1")
    );
    let app = as_role("app").await;
    app.batch_execute(
        "insert into walhook.outbox (event_type, payload) values ('order.created', '{\"n\": 2}')",
    )
    .await
    .expect("the application publishes as before");
    let ops = as_role("ops").await;
    assert_eq!(
        scalar(&ops, "select walhook.recover(1, since => '-infinity')")
            .await
            .as_deref(),
        Some("1"),
        "the operator recovers as before, by the same rule"
    );
    ops.batch_execute(
        "update walhook.endpoints set description = 'x'; select walhook.rotate_secret(1);
         select walhook.redeliver(endpoint_id => 1, status => 'pending');",
    )
    .await
    .expect("and manages endpoints");
    for (role, sql, n) in [
        ("ops", "select count(*) from walhook.endpoints", "1"),
        ("ops", "select count(*) from walhook.endpoint_secrets", "1"),
        ("dash", "select count(*) from walhook.deliveries", "2"),
        ("dash", "select count(*) from walhook.endpoint_health", "1"),
        (
            "daemon",
            "select count(*) from walhook.outbox where event_type not like 'walhook.%'",
            "2",
        ),
        // the operator's recovery, published
        (
            "daemon",
            "select count(*) from walhook.outbox where event_type = 'walhook.recovery.finished'",
            "1",
        ),
        ("daemon", "select count(*) from walhook.endpoints", "1"),
        ("bi", "select count(*) from walhook.deliveries", "2"),
        (
            "bi",
            "select count(*) from walhook.outbox where event_type not like 'walhook.%'",
            "2",
        ),
    ] {
        let client = as_role(role).await;
        assert_eq!(
            scalar(&client, sql).await.as_deref(),
            Some(n),
            "{role}: {sql}"
        );
    }
    let dash = as_role("dash").await;
    assert_eq!(
        scalar(&dash, "select url from walhook.endpoint_health")
            .await
            .as_deref(),
        Some("https://a.example/"),
        "the dashboard reads health with its own rights now"
    );
    let daemon = as_role("daemon").await;
    daemon
        .batch_execute(
            "update walhook.deliveries set status = 'succeeded';
             update walhook.endpoints set enabled = false, disabled_reason = 'test';
             insert into walhook.endpoint_state (endpoint_id) values (1);
             delete from walhook.outbox;",
        )
        .await
        .expect("the daemon records as before");
}

/// Tenants acme and globex, an endpoint of no tenant and a firehose, with events, deliveries, attempts, secrets
/// in a grace period, health and statistics for each; returns the ids by name.
async fn two_tenants(superuser: &Client) -> BTreeMap<&'static str, i64> {
    superuser
        .batch_execute(
            "insert into walhook.tenants (tenant, max_endpoints, rate_limit) values ('acme', 10, 5), ('globex', 3, 1);
             insert into walhook.endpoints (url, tenant, headers) values
               ('https://hooks.acme.example/a', 'acme', '{\"x-api-key\": \"acme-key\"}');
             insert into walhook.endpoints (url, tenant, headers, filter) values
               ('https://user:pw@hooks.globex.example/b?token=t', 'globex', '{\"x-api-key\": \"globex-key\"}',
                '{\"region\": \"eu\"}');
             insert into walhook.endpoints (url) values ('https://ops.internal.example/none');
             insert into walhook.endpoints (url, all_tenants, proxy) values
               ('https://ops.internal.example/all', true, 'http://op:pw@proxy.internal:3128');
             insert into walhook.outbox (event_type, payload, tenant) values
               ('order.created', '{\"n\": 1, \"region\": \"eu\"}', 'acme'),
               ('order.created', '{\"n\": 2, \"region\": \"eu\"}', 'acme'),
               ('order.created', '{\"n\": 3, \"region\": \"eu\"}', 'globex'),
               ('order.created', '{\"n\": 4, \"region\": \"eu\"}', 'globex'),
               ('order.created', '{\"n\": 5}', null);
             select walhook.recover(e.id, since => '-infinity', until => 'infinity') from walhook.endpoints e;
             update walhook.deliveries set status = 'dead', last_error = 'receiver said no';
             insert into walhook.attempts (delivery_id, attempt, attempted_at, duration_ms, status_code, response_body)
               select id, 1, now(), 5, 500, 'body of ' || endpoint_id from walhook.deliveries;
             select walhook.rotate_secret(e.id) from walhook.endpoints e;
             insert into walhook.endpoint_state (endpoint_id, breaker, last_error)
               select id, 'open', 'failing' from walhook.endpoints;
             insert into walhook.endpoint_stats (endpoint_id, bucket, successes, failures)
               select id, date_trunc('minute', now()), 1, 1 from walhook.endpoints;",
        )
        .await
        .expect("two tenants");
    let mut ids = BTreeMap::new();
    for (name, sql) in [
        ("acme", "select id from walhook.endpoints where tenant = 'acme'"),
        ("globex", "select id from walhook.endpoints where tenant = 'globex'"),
        ("none", "select id from walhook.endpoints where tenant is null and not all_tenants"),
        ("all", "select id from walhook.endpoints where all_tenants"),
        ("acme_event", "select min(id) from walhook.outbox where tenant = 'acme'"),
        ("globex_event", "select min(id) from walhook.outbox where tenant = 'globex'"),
        ("globex_delivery", "select min(d.id) from walhook.deliveries d join walhook.endpoints e on e.id = d.endpoint_id where e.tenant = 'globex'"),
        ("firehose_acme_delivery", "select min(d.id) from walhook.deliveries d join walhook.endpoints e on e.id = d.endpoint_id where e.all_tenants and d.tenant = 'acme'"),
    ] {
        ids.insert(name, superuser.query_one(sql, &[]).await.unwrap().get(0));
    }
    ids
}

/// Tenant acme's session tries every table, view and function against globex's rows, the operator's endpoints
/// and the firehose's deliveries of acme's own events: every attempt is refused or finds nothing, reveals
/// nothing, and changes nothing. Then the setting: unset, empty, after a `SET LOCAL`'s transaction, reset, or
/// another case, it matches no row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_session_never_reads_or_changes_another_tenants_rows() {
    let pg = Pg::start().await;
    let superuser = pg.client().await;
    tenant_role(&superuser).await;
    let ids = two_tenants(&superuser).await;
    superuser
        .batch_execute("analyze walhook.outbox, walhook.deliveries, walhook.endpoints")
        .await
        .unwrap();
    let (b, none, all) = (ids["globex"], ids["none"], ids["all"]);
    let (a_event, b_event) = (ids["acme_event"], ids["globex_event"]);
    let (b_delivery, f_delivery) = (ids["globex_delivery"], ids["firehose_acme_delivery"]);
    let secret: String = superuser
        .query_one("select walhook.generate_secret()", &[])
        .await
        .unwrap()
        .get(0);
    let before = everything(&superuser).await;
    let acme = tenant_session(&pg, "acme").await;

    // what acme sees: its own rows, all of them
    for (sql, n) in [
        ("select count(*) from walhook.endpoints", "1"),
        ("select count(*) from walhook.endpoint_secrets", "1"),
        ("select count(*) from walhook.endpoint_state", "1"),
        ("select count(*) from walhook.endpoint_stats", "1"),
        ("select count(*) from walhook.endpoint_health", "1"),
        (
            "select count(*) from walhook.outbox where event_type not like 'walhook.%'",
            "2",
        ),
        // operational events about its endpoint: its recovery, its two dead deliveries, its breaker opening
        (
            "select count(*) from walhook.outbox where event_type like 'walhook.%'",
            "4",
        ),
        ("select count(*) from walhook.recoveries", "1"),
        ("select count(*) from walhook.deliveries", "2"),
        ("select count(*) from walhook.attempts", "2"),
        ("select count(*) from walhook.tenants", "1"),
        (
            "select string_agg(distinct tenant, ',') from walhook.deliveries",
            "acme",
        ),
        (
            "select string_agg(response_body, ',') from walhook.attempts",
            &format!("body of {},body of {}", ids["acme"], ids["acme"]),
        ),
        ("select max_endpoints from walhook.tenants", "10"),
    ] {
        assert_eq!(scalar(&acme, sql).await.as_deref(), Some(n), "{sql}");
    }

    // reading another tenant's rows, the operator's, or the firehose's deliveries of acme's events: nothing
    let reads = [
        format!("select id, url, secret, headers from walhook.endpoints where id in ({b}, {none}, {all})"),
        "select id, url, secret from walhook.endpoints e where e.tenant is distinct from 'acme' or e.all_tenants".to_string(),
        format!("select secret from walhook.endpoint_secrets where endpoint_id in ({b}, {none}, {all})"),
        format!("select * from walhook.endpoint_state where endpoint_id in ({b}, {none}, {all})"),
        format!("select * from walhook.endpoint_stats where endpoint_id in ({b}, {none}, {all})"),
        format!("select * from walhook.endpoint_health where endpoint_id in ({b}, {none}, {all})"),
        "select * from walhook.outbox where tenant is distinct from 'acme'".to_string(),
        format!("select payload from walhook.outbox where id = {b_event}"),
        format!("select * from walhook.deliveries where id in ({b_delivery}, {f_delivery})"),
        format!("select * from walhook.deliveries where endpoint_id in ({b}, {none}, {all})"),
        format!("select * from walhook.attempts where delivery_id in ({b_delivery}, {f_delivery})"),
        "select * from walhook.tenants where tenant <> 'acme'".to_string(),
        "select * from walhook.recoveries where tenant is distinct from 'acme'".to_string(),
        // through joins, subqueries and views
        format!("select s.secret from walhook.endpoint_secrets s join walhook.endpoints e on e.id = s.endpoint_id where e.id = {b}"),
        format!("select (select secret from walhook.endpoints where id = {b}) where (select secret from walhook.endpoints where id = {b}) is not null"),
        format!("select * from walhook.attempts a where a.delivery_id = {f_delivery} or exists (select 1 from walhook.deliveries d where d.id = a.delivery_id and d.endpoint_id = {all})"),
        // statistics, which hold values of every row
        "select * from pg_stats where schemaname = 'walhook'".to_string(),
    ];
    for sql in &reads {
        assert_eq!(outcome(&acme, sql).await, Ok(0), "{sql}");
    }
    // changing them: nothing changes, nothing comes back
    let changes = [
        format!("update walhook.endpoints set url = 'https://evil.example/', enabled = false where id in ({b}, {none}, {all}) returning secret"),
        "update walhook.endpoints set description = 'mine' where tenant is distinct from 'acme' returning id, secret".to_string(),
        format!("delete from walhook.endpoints where id in ({b}, {none}, {all}) returning secret"),
        format!("update walhook.endpoint_secrets set expires_at = now() where endpoint_id in ({b}, {none}, {all}) returning secret"),
        format!("delete from walhook.endpoint_secrets where endpoint_id <> {} returning secret", ids["acme"]),
        format!("update walhook.deliveries set status = 'pending', next_attempt_at = now() where id in ({b_delivery}, {f_delivery}) returning *"),
    ];
    for sql in &changes {
        assert_eq!(outcome(&acme, sql).await, Ok(0), "{sql}");
    }
    // the functions, with their ids: nothing done
    let calls = [
        format!("select walhook.redeliver(array[{b_delivery}, {f_delivery}])"),
        format!("select walhook.redeliver(endpoint_id => {b})"),
        format!("select walhook.redeliver(endpoint_id => {all}, status => 'dead', since => '-infinity')"),
        format!("select walhook.redeliver({none}, 'dead')"),
    ];
    for sql in &calls {
        assert_eq!(scalar(&acme, sql).await.as_deref(), Some("0"), "{sql}");
    }
    // refused outright: row-level security (42501, like a missing privilege), a missing privilege, or an
    // endpoint that does not exist as far as acme can tell
    let refused = [
        "insert into walhook.endpoints (tenant, url) values ('globex', 'https://evil.example/')".to_string(),
        "insert into walhook.endpoints (tenant, url) values (null, 'https://evil.example/')".to_string(),
        "insert into walhook.endpoints (url, all_tenants) values ('https://evil.example/', true)".to_string(),
        format!("insert into walhook.endpoint_secrets (endpoint_id, secret, expires_at) values ({b}, '{secret}', now() + interval '1 day')"),
        format!("insert into walhook.endpoint_secrets (endpoint_id, secret, expires_at) values ({all}, '{secret}', now() + interval '1 day')"),
        format!("insert into walhook.deliveries (event_id, endpoint_id, webhook_id, tenant) values ({b_event}, {}, gen_random_uuid(), 'acme')", ids["acme"]),
        format!("insert into walhook.deliveries (event_id, endpoint_id, webhook_id, tenant) values ({a_event}, {b}, gen_random_uuid(), 'acme')"),
        format!("insert into walhook.deliveries (event_id, endpoint_id, webhook_id, tenant) values ({a_event}, {all}, gen_random_uuid(), 'acme')"),
        format!("insert into walhook.deliveries (event_id, endpoint_id, webhook_id, tenant) values ({b_event}, {b}, gen_random_uuid(), 'globex') on conflict (event_id, endpoint_id) do update set status = 'pending'"),
        format!("insert into walhook.deliveries (event_id, endpoint_id, webhook_id, tenant) values ({a_event}, {all}, gen_random_uuid(), 'acme') on conflict (event_id, endpoint_id) do update set status = 'pending' returning *"),
        format!("update walhook.endpoints set tenant = 'globex' where id = {}", ids["acme"]),
        format!("update walhook.endpoints set all_tenants = true, tenant = null where id = {}", ids["acme"]),
        format!("update walhook.endpoints set proxy = 'direct' where id = {}", ids["acme"]),
        "select proxy from walhook.endpoints".to_string(),
        "update walhook.deliveries set payload = '{}', event_id = 1".to_string(),
        "delete from walhook.deliveries".to_string(),
        "delete from walhook.attempts".to_string(),
        "insert into walhook.outbox (event_type, payload, tenant) values ('order.created', '{}', 'acme')".to_string(),
        "update walhook.outbox set tenant = 'acme'".to_string(),
        "insert into walhook.tenants (tenant) values ('acme2')".to_string(),
        "update walhook.tenants set max_endpoints = null".to_string(),
        "insert into walhook.endpoint_state (endpoint_id) values (1000)".to_string(),
        "update walhook.endpoints_generation set generation = 0".to_string(),
        "select * from walhook.endpoints_generation".to_string(),
        "select * from walhook.slots".to_string(),
        "select walhook.endpoints_bump()".to_string(),
        "select walhook.set_max_payload_bytes(2048)".to_string(),
        "truncate walhook.deliveries".to_string(),
        "alter table walhook.endpoints disable row level security".to_string(),
        format!("select walhook.rotate_secret({b})"),
        format!("select walhook.rotate_secret({all})"),
        format!("select walhook.recover({b}, since => '-infinity')"),
        format!("select walhook.recover({all}, since => '-infinity', tenant => 'acme')"),
        format!("select walhook.recover({none}, since => '-infinity')"),
        // a recovery is recorded in the name of its tenant, which must be the session's
        "select walhook.recover(tenant => 'globex', since => '-infinity')".to_string(),
        "insert into walhook.recoveries (kind, tenant, deliveries) values ('recover', 'globex', 0)".to_string(),
        // a test event to another tenant's endpoint or the firehose, a portal link for another tenant or an
        // operator's, the portal's own functions
        format!("select walhook.send_test({b})"),
        format!("select walhook.send_test({all})"),
        format!("select walhook.send_test({none})"),
        format!("select walhook.send_test({b}, 'order.created')"),
        format!("select walhook.send_test({all}, 'order.created')"),
        format!("select walhook.verify_endpoint({b})"),
        format!("select walhook.verify_endpoint({all})"),
        "select walhook.portal_link('globex')".to_string(),
        "select walhook.portal_link(null, operator => true)".to_string(),
        "select walhook.portal_exchange(repeat('0', 64))".to_string(),
        "select walhook.portal_overview(repeat('0', 64))".to_string(),
        "select * from walhook.portal_links".to_string(),
        "select * from walhook.portal_sessions".to_string(),
    ];
    for sql in &refused {
        let code = outcome(&acme, sql).await.expect_err(sql);
        assert!(
            [
                SqlState::INSUFFICIENT_PRIVILEGE,
                SqlState::NO_DATA_FOUND,
                SqlState::FEATURE_NOT_SUPPORTED
            ]
            .contains(&code),
            "{sql}: {code:?}"
        );
    }
    // what a refusal says names nothing of globex's: not its limit, nor whether its rows exist
    let hidden = error_of(&acme, &format!("select walhook.rotate_secret({b})")).await;
    let missing = error_of(&acme, "select walhook.rotate_secret(999999)").await;
    assert_eq!(
        hidden.message().replace(&b.to_string(), "N"),
        missing.message().replace("999999", "N")
    );
    superuser
        .batch_execute("update walhook.tenants set max_endpoints = 0 where tenant = 'globex'")
        .await
        .unwrap();
    let e = error_of(
        &acme,
        "insert into walhook.endpoints (tenant, url) values ('globex', 'https://evil.example/')",
    )
    .await;
    assert!(
        e.message().contains("row-level security") && !e.message().contains("globex"),
        "{}",
        e.message()
    );
    superuser
        .batch_execute("update walhook.tenants set max_endpoints = 3 where tenant = 'globex'")
        .await
        .unwrap();
    assert_eq!(everything(&superuser).await, before, "acme changed nothing");
    // its own endpoint, globex's events: nothing recovered, and the recovery is acme's
    assert_eq!(
        scalar(
            &acme,
            &format!(
                "select walhook.recover({}, since => '-infinity', tenant => 'globex')",
                ids["acme"]
            )
        )
        .await
        .as_deref(),
        Some("0")
    );
    assert_eq!(
        scalar(
            &superuser,
            "select tenant || ':' || deliveries from walhook.recoveries order by id desc limit 1"
        )
        .await
        .as_deref(),
        Some("acme:0")
    );

    // walhook's functions run with the caller's rights, but for the trigger functions that the statements
    // above could not call (the operational events' among them) and the portal's, which check their caller
    // themselves (tests/portal/sql.rs); none of them sets walhook.tenant
    let definers: Vec<String> = superuser
        .query(
            "select p.oid::regprocedure::text from pg_proc p
              where p.pronamespace = 'walhook'::regnamespace and p.prosecdef order by 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        definers,
        [
            "walhook.breaker_event()",
            "walhook.delivery_dead_event()",
            "walhook.endpoint_disabled_event()",
            "walhook.endpoint_verification_finished()",
            "walhook.endpoint_verification_requested()",
            "walhook.endpoints_bump()",
            "walhook.endpoints_tenant_limit()",
            "walhook.portal_exchange(text,interval)",
            "walhook.portal_link(text,interval,boolean)",
            "walhook.portal_logout(text)",
            "walhook.portal_operator(text)",
            "walhook.portal_overview(text)",
            "walhook.portal_session(text)",
            "walhook.portal_slots(text)",
            "walhook.portal_view(text,text)",
            "walhook.publish(text,jsonb,text,text,text,integer)",
            "walhook.recovery_event()",
            "walhook.send_test(bigint,jsonb)",
            "walhook.send_test(bigint,text)",
            "walhook.verify_endpoint(bigint)"
        ]
    );
    assert_eq!(
        scalar(
            &superuser,
            "select count(*) from pg_proc where pronamespace = 'walhook'::regnamespace
                and array_to_string(proconfig, ',') like '%walhook.tenant%'"
        )
        .await
        .as_deref(),
        Some("0")
    );

    // no tenant named: no row; the setting is exact
    let count_all = "select (select count(*) from walhook.endpoints) + (select count(*) from walhook.deliveries)
                          + (select count(*) from walhook.outbox) + (select count(*) from walhook.attempts)
                          + (select count(*) from walhook.endpoint_secrets) + (select count(*) from walhook.endpoint_health)
                          + (select count(*) from walhook.tenants)";
    let unset = pg.client_as("webapp").await;
    assert_eq!(
        scalar(&unset, count_all).await.as_deref(),
        Some("0"),
        "unset"
    );
    for setting in [
        "set walhook.tenant = ''",
        "begin; set local walhook.tenant = 'acme'; commit",
        "set walhook.tenant = 'acme'; reset walhook.tenant",
        "set walhook.tenant = 'acme'; reset all",
        "set walhook.tenant = 'ACME'",
        "set walhook.tenant = ' acme'",
    ] {
        unset.batch_execute(setting).await.unwrap();
        assert_eq!(
            scalar(&unset, count_all).await.as_deref(),
            Some("0"),
            "{setting}"
        );
        assert_eq!(
            outcome(&unset, "update walhook.endpoints set description = 'x'").await,
            Ok(0),
            "{setting}"
        );
        if !setting.contains("CME") && !setting.contains("' acme'") {
            assert_eq!(
                outcome(
                    &unset,
                    "insert into walhook.endpoints (url) values ('https://x.example/')"
                )
                .await,
                Err(SqlState::INSUFFICIENT_PRIVILEGE),
                "{setting}: an endpoint of no tenant"
            );
        }
    }
    unset
        .batch_execute("begin; set local walhook.tenant = 'acme'")
        .await
        .unwrap();
    assert_ne!(
        scalar(&unset, count_all).await.as_deref(),
        Some("0"),
        "set local"
    );
    unset.batch_execute("commit").await.unwrap();
}

/// Acme's settings page, end to end in SQL: it creates an endpoint (its tenant from the session), reads its
/// secret, changes it, rotates the secret and ends the grace period, reads health, recovers what its
/// endpoints missed, reads deliveries and attempts, redelivers in each form, pauses and deletes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_session_manages_its_own_endpoints_end_to_end() {
    let pg = Pg::start().await;
    let superuser = pg.client().await;
    tenant_role(&superuser).await;
    two_tenants(&superuser).await;
    let acme = tenant_session(&pg, "acme").await;

    let row = acme
        .query_one(
            "insert into walhook.endpoints (url, event_types, filter, headers)
             values ('https://hooks.acme.example/eu', '{order.*}', '{\"region\": \"eu\"}', '{\"x-k\": \"v\"}')
             returning id, secret, tenant",
            &[],
        )
        .await
        .expect("acme creates an endpoint");
    let (mine, secret, tenant): (i64, String, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(tenant, "acme", "the session's tenant by default");
    assert!(secret.starts_with("whsec_"));
    acme.batch_execute(&format!(
        "update walhook.endpoints set url = 'https://hooks.acme.example/eu2', event_types = '{{*}}',
                filter = '{{\"region\": \"eu\", \"tier\": \"gold\"}}', description = 'eu', paused = true,
                rate_limit = 2, metadata = '{{\"team\": \"ops\"}}'
          where id = {mine}"
    ))
    .await
    .expect("and changes it");
    let rotated = scalar(
        &acme,
        &format!("select walhook.rotate_secret({mine}, '1 hour')"),
    )
    .await
    .unwrap();
    assert_ne!(rotated, secret);
    assert_eq!(
        scalar(
            &acme,
            &format!("select secret from walhook.endpoint_secrets where endpoint_id = {mine}")
        )
        .await,
        Some(secret),
        "the old secret, during the grace period"
    );
    assert_eq!(
        outcome(
            &acme,
            &format!("delete from walhook.endpoint_secrets where endpoint_id = {mine}")
        )
        .await,
        Ok(1),
        "ends the grace period early"
    );
    assert_eq!(
        scalar(&acme, &format!("select url || ' ' || breaker from walhook.endpoint_health where endpoint_id = {mine}")).await.as_deref(),
        Some("https://hooks.acme.example/eu2 closed")
    );

    // events of acme after the endpoint was created: one it accepts, one its filter refuses
    superuser
        .batch_execute(
            "insert into walhook.outbox (event_type, payload, tenant) values
               ('order.paid', '{\"region\": \"eu\", \"tier\": \"gold\"}', 'acme'),
               ('order.paid', '{\"region\": \"us\", \"tier\": \"gold\"}', 'acme'),
               ('order.paid', '{\"region\": \"eu\", \"tier\": \"gold\"}', 'globex')",
        )
        .await
        .unwrap();
    assert_eq!(
        scalar(&acme, "select walhook.recover(tenant => 'acme', since => '-infinity')").await.as_deref(),
        Some("3"),
        "its first endpoint takes the two new events, the new one the event it accepts (not the older ones)"
    );
    assert_eq!(
        scalar(
            &acme,
            &format!("select walhook.recover({mine}, since => '-infinity')")
        )
        .await
        .as_deref(),
        Some("0"),
        "by endpoint: the older events are refused by its filter too (they lack the tier)"
    );
    assert_eq!(
        scalar(&acme, &format!("select string_agg(tenant || ':' || status, ',') from walhook.deliveries where endpoint_id = {mine}")).await.as_deref(),
        Some("acme:pending")
    );
    superuser
        .batch_execute(&format!(
            "update walhook.deliveries set status = 'dead', updated_at = now() - interval '1 day' where endpoint_id = {mine};
             insert into walhook.attempts (delivery_id, attempt, attempted_at, duration_ms, status_code, response_body)
               select id, 1, now(), 3, 503, 'busy' from walhook.deliveries where endpoint_id = {mine}"
        ))
        .await
        .unwrap();
    assert_eq!(
        scalar(&acme, &format!("select a.response_body from walhook.attempts a join walhook.deliveries d on d.id = a.delivery_id where d.endpoint_id = {mine}")).await.as_deref(),
        Some("busy")
    );
    // redeliver, each form: only acme's own rows (globex's and the firehose's are dead too)
    for (sql, n) in [
        (format!("select walhook.redeliver(endpoint_id => {mine}, since => now() - interval '1 hour')"), "0"),
        (format!("select walhook.redeliver(endpoint_id => {mine})"), "1"),
        (format!("select walhook.redeliver(endpoint_id => {mine}, status => 'pending')"), "1"),
        ("select walhook.redeliver(array(select id from walhook.deliveries))".to_string(), "5"),
        ("select walhook.redeliver(status => 'pending')".to_string(), "5"),
        ("select walhook.redeliver()".to_string(), "0"),
    ] {
        assert_eq!(scalar(&acme, &sql).await.as_deref(), Some(n), "{sql}");
    }
    assert_eq!(
        scalar(
            &superuser,
            "select count(*) from walhook.deliveries where status = 'dead'"
        )
        .await
        .as_deref(),
        Some("8"),
        "the other tenants' and the operator's dead deliveries stay dead"
    );
    assert_eq!(
        outcome(
            &acme,
            &format!("delete from walhook.endpoints where id = {mine}")
        )
        .await,
        Ok(1)
    );
    assert_eq!(
        scalar(&superuser, "select count(*) from walhook.endpoints")
            .await
            .as_deref(),
        Some("4"),
        "the others' endpoints are all there"
    );
}

/// max_endpoints under concurrent inserts: a second session's insert waits for the first's transaction and is
/// refused once it commits (READ COMMITTED), or fails to serialise (REPEATABLE READ); lowering the limit keeps
/// the endpoints a tenant has; no row, no limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_limit_holds_under_concurrent_inserts() {
    let pg = Pg::start().await;
    let superuser = pg.client().await;
    tenant_role(&superuser).await;
    superuser
        .batch_execute("insert into walhook.tenants (tenant, max_endpoints) values ('acme', 1)")
        .await
        .unwrap();
    let insert = "insert into walhook.endpoints (url) values ('https://hooks.acme.example/')";

    for isolation in ["read committed", "repeatable read"] {
        superuser
            .batch_execute("delete from walhook.endpoints")
            .await
            .unwrap();
        let first = tenant_session(&pg, "acme").await;
        let second = tenant_session(&pg, "acme").await;
        let second_pid = scalar(&second, "select pg_backend_pid()").await.unwrap();
        first
            .batch_execute(&format!("begin isolation level {isolation}; {insert}"))
            .await
            .unwrap();
        second
            .batch_execute(&format!("begin isolation level {isolation}; select 1"))
            .await
            .unwrap();
        let racing = tokio::spawn(async move {
            let result = second.batch_execute(insert).await;
            (second, result)
        });
        eventually("the second insert waits for the first transaction", || async {
            count(
                &superuser,
                &format!(
                    "select count(*) from pg_stat_activity where pid = {second_pid} and wait_event_type = 'Lock'"
                ),
            )
            .await
                == 1
        })
        .await;
        first.batch_execute("commit").await.unwrap();
        let (second, result) = racing.await.unwrap();
        let e = result.expect_err("the second insert is over the limit");
        let e = e.as_db_error().unwrap();
        if isolation == "read committed" {
            assert_eq!(e.code(), &SqlState::CHECK_VIOLATION);
            assert_eq!(
                e.message(),
                "tenant 'acme' may have at most 1 endpoints (walhook.tenants.max_endpoints), and this would make 2"
            );
            assert_eq!(
                e.hint(),
                Some("delete one of its endpoints first, or raise its limit: UPDATE walhook.tenants SET max_endpoints = 2 WHERE tenant = 'acme'")
            );
        } else {
            assert_eq!(e.code(), &SqlState::T_R_SERIALIZATION_FAILURE, "{e:?}");
        }
        second.batch_execute("rollback").await.unwrap();
        assert_eq!(
            count(&superuser, "select count(*) from walhook.endpoints").await,
            1,
            "{isolation}"
        );
    }

    // one statement of several rows, and the operator's inserts, count too
    superuser
        .batch_execute("update walhook.tenants set max_endpoints = 2")
        .await
        .unwrap();
    let e = error_of(
        &superuser,
        "insert into walhook.endpoints (url, tenant) values ('https://a.example/', 'acme'), ('https://b.example/', 'acme')",
    )
    .await;
    assert!(
        e.message().contains("at most 2 endpoints"),
        "{}",
        e.message()
    );
    superuser
        .batch_execute(
            "insert into walhook.endpoints (url, tenant) values ('https://a.example/', 'acme');
             insert into walhook.endpoints (url) values ('https://a.example/');
             update walhook.tenants set max_endpoints = 1;",
        )
        .await
        .expect("lowering the limit keeps what the tenant has");
    let e = error_of(
        &superuser,
        "update walhook.endpoints set tenant = 'acme' where tenant is null",
    )
    .await;
    assert!(e.message().contains("this would make 3"), "{}", e.message());
    superuser
        .batch_execute(
            "delete from walhook.tenants;
             insert into walhook.endpoints (url, tenant) select 'https://a.example/', 'acme' from generate_series(1, 5)",
        )
        .await
        .expect("no row, no limit");
}

/// recover() by endpoint (the existing forms), by tenant, by both (a firehose's share of one tenant), by event
/// type, and its refusals; every delivery it makes carries the event's tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_by_endpoint_tenant_and_event_type() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    client
        .batch_execute(
            "insert into walhook.endpoints (url, tenant, event_types) values ('https://a.example/1', 'acme', '{*}');
             insert into walhook.endpoints (url, tenant, enabled) values ('https://a.example/2', 'acme', false);
             insert into walhook.endpoints (url, tenant, filter) values ('https://g.example/', 'globex', '{\"region\": \"eu\"}');
             insert into walhook.endpoints (url, all_tenants) values ('https://ops.example/all', true);
             insert into walhook.endpoints (url) values ('https://ops.example/none');
             insert into walhook.outbox (event_type, payload, tenant) values
               ('order.created', '{\"region\": \"eu\"}', 'acme'),
               ('order.paid', '{\"region\": \"us\"}', 'acme'),
               ('user.created', '{}', 'acme'),
               ('order.created', '{\"region\": \"eu\"}', 'globex'),
               ('order.created', '{\"region\": \"us\"}', 'globex'),
               ('order.created', '{}', null);",
        )
        .await
        .unwrap();
    // created after the events
    client
        .batch_execute(
            "insert into walhook.endpoints (url, tenant) values ('https://a.example/3', 'acme')",
        )
        .await
        .unwrap();
    let n = |sql: &'static str| {
        let client = &client;
        async move {
            client
                .query_one(sql, &[])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
                .get::<_, i64>(0)
        }
    };
    let since = client
        .query_one("select min(created_at) from walhook.outbox", &[])
        .await
        .unwrap()
        .get::<_, std::time::SystemTime>(0);
    assert_eq!(
        n("select walhook.recover(tenant => 'acme', since => '-infinity', event_type => 'order.*')").await,
        2,
        "acme's enabled endpoint that existed, its order events"
    );
    assert_eq!(
        n("select walhook.recover(tenant => 'acme', since => '-infinity')").await,
        1,
        "then the user event; not the disabled endpoint, nor the one created afterwards"
    );
    assert_eq!(
        n("select walhook.recover(tenant => 'acme', since => '-infinity')").await,
        0,
        "idempotent"
    );
    assert_eq!(
        n("select walhook.recover(tenant => 'globex', since => '-infinity')").await,
        1,
        "the filter applies"
    );
    assert_eq!(
        n("select walhook.recover(4, since => '-infinity', tenant => 'acme')").await,
        3,
        "the firehose's share of acme's events"
    );
    // the existing call forms: positional, and `since` by name with a parameter
    let positional: i64 = client
        .query_one("select walhook.recover($1, $2)", &[&4i64, &since])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        positional, 3,
        "the rest, for the firehose: globex's two and the event of no tenant"
    );
    let named: i64 = client
        .query_one("select walhook.recover($1, since => $2)", &[&6i64, &since])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        named, 3,
        "by endpoint: every event of the window, whenever it was created"
    );
    assert_eq!(
        n("select walhook.recover(2, since => '-infinity', until => now(), event_type => 'user.created')").await,
        1,
        "by endpoint: disabled or not, as before"
    );
    assert_eq!(
        n("select walhook.recover(5, since => '-infinity')").await,
        1,
        "NULL matches NULL"
    );
    assert_eq!(
        n("select walhook.recover(1, since => '-infinity', until => '-infinity')").await,
        0,
        "until"
    );
    assert_eq!(
        scalar(
            &client,
            "select count(*) from walhook.deliveries d join walhook.outbox o on o.id = d.event_id
              where d.tenant is distinct from o.tenant or d.webhook_id <> o.uid or d.payload <> o.payload"
        )
        .await
        .as_deref(),
        Some("0"),
        "each delivery carries its event's tenant, identity and content"
    );
    for (sql, code, says) in [
        (
            "select walhook.recover(since => now())",
            SqlState::INVALID_PARAMETER_VALUE,
            "pass endpoint_id (one endpoint) or tenant",
        ),
        (
            "select walhook.recover(tenant => 'acme')",
            SqlState::INVALID_PARAMETER_VALUE,
            "since is null",
        ),
        (
            "select walhook.recover(tenant => 'acme', since => now(), event_type => 'order.')",
            SqlState::INVALID_PARAMETER_VALUE,
            "invalid event_type pattern 'order.'",
        ),
        (
            "select walhook.recover(999, since => now())",
            SqlState::NO_DATA_FOUND,
            "no endpoint with id 999",
        ),
    ] {
        let e = error_of(&client, sql).await;
        assert_eq!(e.code(), &code, "{sql}");
        assert!(e.message().contains(says), "{sql}: {}", e.message());
    }
}

/// redeliver() in every argument form, as the operator: by ids, by endpoint, by status, by time, and all at
/// once; each puts the deliveries back to pending, due now, for a fresh run of the schedule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeliver_in_every_argument_form() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    client
        .batch_execute(
            "create role ops login in role walhook_admin;
             insert into walhook.endpoints (url) values ('https://a.example/1'), ('https://a.example/2');
             insert into walhook.outbox (event_type, payload) select 'order.created', '{}' from generate_series(1, 6);
             select walhook.recover(e.id, since => '-infinity', until => 'infinity') from walhook.endpoints e;
             -- endpoint 1: two dead (one old), a succeeded one, pending ones; endpoint 2 likewise
             update walhook.deliveries set status = 'dead', schedule_step = 3, attempts = 4, next_attempt_at = null
              where event_id in (1, 2, 3);
             update walhook.deliveries set updated_at = now() - interval '2 days' where event_id = 1;
             update walhook.deliveries set status = 'succeeded', next_attempt_at = null where event_id = 4;",
        )
        .await
        .unwrap();
    let ops = pg.client_as("ops").await;
    let redeliver = |sql: &'static str| {
        let ops = &ops;
        async move {
            ops.query_one(sql, &[])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
                .get::<_, i64>(0)
        }
    };
    assert_eq!(
        redeliver("select walhook.redeliver(endpoint_id => 1, since => now() - interval '1 day')")
            .await,
        2,
        "endpoint 1's recent dead ones"
    );
    assert_eq!(
        redeliver("select walhook.redeliver(endpoint_id => 1)").await,
        1,
        "then its old one"
    );
    assert_eq!(
        redeliver("select walhook.redeliver(status => 'succeeded')").await,
        2,
        "by status, every endpoint"
    );
    let ids: Vec<i64> = client
        .query(
            "select id from walhook.deliveries where endpoint_id = 2 and status = 'dead' and event_id = 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let by_ids: i64 = ops
        .query_one("select walhook.redeliver($1::bigint[])", &[&ids])
        .await
        .unwrap()
        .get(0);
    assert_eq!(by_ids, 1, "by ids");
    assert_eq!(
        redeliver("select walhook.redeliver(2, 'dead', now() - interval '1 hour')").await,
        2,
        "positionally"
    );
    assert_eq!(
        redeliver("select walhook.redeliver()").await,
        0,
        "nothing dead is left"
    );
    assert_eq!(
        scalar(
            &client,
            "select count(*) from walhook.deliveries
              where status <> 'pending' or schedule_step <> 0 or next_attempt_at > now()"
        )
        .await
        .as_deref(),
        Some("0"),
        "every one pending for a fresh run, due now"
    );
    assert_eq!(
        scalar(&client, "select sum(attempts) from walhook.deliveries")
            .await
            .as_deref(),
        Some("24"),
        "their attempts are still counted"
    );
}

/// The backfills the daemon runs in SQL (before its slot streams, and after `recover-slot`) fan out by the same
/// rule and copy the event's tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backfills_fan_out_by_the_same_rule() {
    let pg = Pg::start().await;
    let mut client = pg.client().await;
    client
        .batch_execute(
            "insert into walhook.endpoints (url, tenant) values ('https://a.example/', 'acme');
             insert into walhook.endpoints (url, tenant, filter) values ('https://g.example/', 'globex', '{\"region\": \"eu\"}');
             insert into walhook.endpoints (url, all_tenants, event_types) values ('https://ops.example/', true, '{order.*}');
             insert into walhook.endpoints (url) values ('https://none.example/');
             insert into walhook.outbox (event_type, payload, tenant) values
               ('order.created', '{\"region\": \"eu\"}', 'acme'),
               ('order.created', '{\"region\": \"eu\"}', 'globex'),
               ('order.created', '{\"region\": \"us\"}', 'globex'),
               ('user.created', '{}', null);",
        )
        .await
        .unwrap();
    let expected = "1:1:acme,1:3:acme,2:2:globex,2:3:globex,3:3:globex,4:4:";
    let pairs = "select string_agg(event_id || ':' || endpoint_id || ':' || coalesce(tenant, ''), ',' order by event_id, endpoint_id)
                   from walhook.deliveries";
    for backfill in ["before the slot", "recover-slot"] {
        client
            .batch_execute("delete from walhook.deliveries")
            .await
            .unwrap();
        let exporter = pg.client().await;
        exporter
            .batch_execute("begin isolation level repeatable read")
            .await
            .unwrap();
        let snapshot = scalar(&exporter, "select pg_export_snapshot()")
            .await
            .unwrap();
        let n = if backfill == "before the slot" {
            walhook::store::backfill_before_slot(&mut client, &snapshot).await
        } else {
            walhook::store::backfill_recovery(&mut client, &snapshot, None).await
        }
        .unwrap();
        exporter.batch_execute("commit").await.unwrap();
        assert_eq!(n, 6, "{backfill}");
        assert_eq!(
            scalar(&client, pairs).await.as_deref(),
            Some(expected),
            "{backfill}"
        );
    }
}

/// The README's Tenants section, block by block as written, as the role each block names: the operator's
/// endpoints and the application's event, the settings page's requests as `webapp`, the limits and the
/// recoveries; then what they did, and that a request of another tenant sees none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_tenants_recipe_runs_as_written() {
    let pg = Pg::start().await;
    let superuser = pg.client().await;
    let roles = readme_blocks("## Roles", "sql");
    let create_roles = roles
        .iter()
        .find(|b| b.contains("CREATE ROLE webapp"))
        .expect("the Roles section creates webapp");
    superuser.batch_execute(create_roles).await.unwrap();
    let ops = pg.client_as("ops").await;
    let app = pg.client_as("app").await;
    let webapp = pg.client_as("webapp").await;
    let blocks = readme_blocks("## Tenants", "sql");
    assert!(blocks.len() >= 7, "{blocks:?}");
    for block in &blocks {
        let first = block.lines().next().unwrap_or_default();
        let client = if first.starts_with("-- as the operator (walhook_admin)") {
            &ops
        } else if first.starts_with("-- as the application (walhook_writer)") {
            &app
        } else if first.starts_with("-- as the web application (webapp)") {
            &webapp
        } else {
            panic!("a README block under Tenants does not say as whom to run it: {block}");
        };
        client
            .batch_execute(block)
            .await
            .unwrap_or_else(|e| panic!("{block}: {e:?}"));
    }
    for (sql, expected) in [
        (
            "select string_agg(id || ':' || coalesce(tenant, '-') || ':' || all_tenants || ':' || paused
                               || ':' || coalesce(filter::text, '-'), ',' order by id) from walhook.endpoints",
            "2:-:true:false:-,3:acme:false:false:{\"region\": \"eu\"}",
        ),
        ("select max_endpoints || ':' || rate_limit from walhook.tenants where tenant = 'acme'", "10:100"),
        (
            "select string_agg(endpoint_id || ':' || tenant, ',' order by endpoint_id) from walhook.deliveries",
            "1:acme,2:acme",
        ),
    ] {
        assert_eq!(scalar(&superuser, sql).await.as_deref(), Some(expected), "{sql}");
    }
    // the request of a customer of another tenant finds none of it
    let other = blocks
        .iter()
        .find(|b| b.contains("SELECT id, url, event_types, filter"))
        .unwrap()
        .replace("'acme'", "'globex'")
        .replace("COMMIT;", "");
    webapp.batch_execute(&other).await.unwrap();
    for table in [
        "endpoints",
        "deliveries",
        "outbox",
        "endpoint_health",
        "tenants",
    ] {
        assert_eq!(
            count(
                &webapp,
                &format!("select count(*) from walhook.{table} where tenant = 'acme'")
            )
            .await,
            0,
            "{table}"
        );
    }
    webapp.batch_execute("rollback").await.unwrap();
}
