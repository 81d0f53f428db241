//! Operational events: walhook publishes what happened to endpoints and deliveries through its own pipeline,
//! scoped to the tenant of the endpoint it is about, to the endpoints that name the reserved `walhook.`
//! prefix (never to `*` alone), without a loop when the operations endpoint itself fails.

use std::collections::BTreeMap;

use serde_json::Value;
use walhook::receiver::{Receiver, Reply};

use crate::support::*;

async fn endpoint(
    client: &tokio_postgres::Client,
    url: &str,
    tenant: Option<&str>,
    all_tenants: bool,
    patterns: &[&str],
) -> i64 {
    let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
    client
        .query_one(
            "insert into walhook.endpoints (url, tenant, all_tenants, event_types)
             values ($1, $2, $3, $4) returning id",
            &[&url, &tenant, &all_tenants, &patterns],
        )
        .await
        .unwrap()
        .get(0)
}

async fn publish_for(client: &tokio_postgres::Client, tenant: &str, payload: &str) -> i64 {
    client
        .query_one(
            "insert into walhook.outbox (event_type, payload, tenant)
             values ('order.created', $1::text::jsonb, $2) returning id",
            &[&payload, &tenant],
        )
        .await
        .unwrap()
        .get(0)
}

/// The bodies (type, data) a path received with a 2xx answer, one per webhook-id.
fn events_at(rx: &Receiver, path: &str) -> Vec<(String, Value)> {
    let mut by_id = BTreeMap::new();
    for r in rx.received() {
        if r.path == path && (200..300).contains(&r.status_sent) {
            let body: Value = serde_json::from_slice(&r.body).unwrap();
            by_id.insert(
                r.webhook_id.clone(),
                (
                    body["type"].as_str().unwrap().to_string(),
                    body["data"].clone(),
                ),
            );
        }
    }
    let mut events: Vec<_> = by_id.into_values().collect();
    events.sort_by(|a, b| a.0.cmp(&b.0));
    events
}

fn types(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(t, _)| t.as_str()).collect()
}

async fn wait_received(rx: &Receiver, path: &str, n: usize) {
    let p = path.to_string();
    let held = rx
        .wait_until(LONG, move |log| {
            log.iter()
                .filter(|r| r.path == p && (200..300).contains(&r.status_sent))
                .map(|r| r.webhook_id.as_str())
                .collect::<std::collections::HashSet<_>>()
                .len()
                >= n
        })
        .await;
    assert!(
        held,
        "{path} did not receive {n} events: {:?}",
        types(&events_at(rx, path))
    );
}

const LONG: std::time::Duration = std::time::Duration::from_secs(120);

both_sources!(each_tenant_hears_of_its_own_endpoints_and_the_operator_of_all);
async fn each_tenant_hears_of_its_own_endpoints_and_the_operator_of_all(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    rx.set_responder(|r, _| match r.path.as_str() {
        "/acme-gone" => Reply::Status(410),
        "/acme-failing" => Reply::Status(500),
        _ => Reply::Status(200),
    });
    let ops = ["walhook.*"];
    endpoint(&client, &rx.url("/acme-ops"), Some("acme"), false, &ops).await;
    endpoint(&client, &rx.url("/globex-ops"), Some("globex"), false, &ops).await;
    endpoint(&client, &rx.url("/operator"), None, true, &ops).await;
    endpoint(&client, &rx.url("/acme-all"), Some("acme"), false, &["*"]).await;
    let gone = endpoint(
        &client,
        &rx.url("/acme-gone"),
        Some("acme"),
        false,
        &["order.*"],
    )
    .await;
    let failing = endpoint(
        &client,
        &rx.url("/acme-failing"),
        Some("acme"),
        false,
        &["order.*"],
    )
    .await;
    let globex = endpoint(
        &client,
        &rx.url("/globex-app"),
        Some("globex"),
        false,
        &["order.*"],
    )
    .await;
    let daemon = Daemon::start(pg.config_for_with(source, |f| {
        f.merge(("delivery.retry_schedule", vec!["200ms"]))
            .merge(("delivery.breaker_threshold", 1000))
    }));
    wait_ready(source, &client).await;
    let acme_event = publish_for(&client, "acme", r#"{"n": 1}"#).await;
    publish_for(&client, "globex", r#"{"n": 2}"#).await;
    wait_received(&rx, "/globex-app", 1).await;
    client
        .execute(
            "update walhook.endpoints set enabled = false, disabled_reason = 'moving to a new URL'
              where id = $1",
            &[&globex],
        )
        .await
        .unwrap();

    // acme: its endpoint that answered 410 was disabled and its delivery is dead; the failing one's is dead
    wait_received(&rx, "/acme-ops", 3).await;
    let acme = events_at(&rx, "/acme-ops");
    assert_eq!(
        types(&acme),
        [
            "walhook.delivery.dead",
            "walhook.delivery.dead",
            "walhook.endpoint.disabled"
        ]
    );
    let disabled = &acme[2].1;
    assert_eq!(disabled["endpoint_id"], gone);
    assert_eq!(disabled["tenant"], "acme");
    assert_eq!(disabled["cause"], "gone");
    assert!(disabled["url"].as_str().unwrap().ends_with("/acme-gone"));
    assert!(disabled["reason"].as_str().unwrap().contains("410"));
    let mut dead: Vec<&Value> = acme[..2].iter().map(|(_, d)| d).collect();
    dead.sort_by_key(|d| d["endpoint_id"].as_i64());
    let failing_dead = dead
        .iter()
        .find(|d| d["endpoint_id"] == failing)
        .expect("the failing endpoint's dead delivery");
    assert_eq!(failing_dead["event_id"], acme_event);
    assert_eq!(failing_dead["event_type"], "order.created");
    assert_eq!(failing_dead["tenant"], "acme");
    assert_eq!(
        failing_dead["attempts"], 2,
        "the retry schedule's one retry"
    );
    assert_eq!(failing_dead["last_status_code"], 500);
    let webhook_id: String = client
        .query_one(
            "select 'msg_' || replace(uid::text, '-', '') from walhook.outbox where id = $1",
            &[&acme_event],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(failing_dead["webhook_id"], webhook_id.as_str());
    assert!(dead.iter().any(|d| d["endpoint_id"] == gone));

    // globex: disabled by hand, with the reason it was given
    wait_received(&rx, "/globex-ops", 1).await;
    let globex_events = events_at(&rx, "/globex-ops");
    assert_eq!(types(&globex_events), ["walhook.endpoint.disabled"]);
    assert_eq!(globex_events[0].1["cause"], "manual");
    assert_eq!(globex_events[0].1["reason"], "moving to a new URL");
    assert_eq!(globex_events[0].1["endpoint_id"], globex);

    // the operator's firehose hears of both tenants; '*' alone hears of neither
    wait_received(&rx, "/operator", 4).await;
    assert_eq!(events_at(&rx, "/operator").len(), 4);
    assert_eq!(types(&events_at(&rx, "/acme-all")), ["order.created"]);
    // every operational event is the tenant's of the endpoint it is about
    assert_eq!(
        count(
            &client,
            "select count(*) from walhook.outbox o join walhook.endpoints e on e.id = (o.payload->>'endpoint_id')::bigint
              where o.event_type like 'walhook.%' and o.tenant is distinct from e.tenant"
        )
        .await,
        0
    );
    daemon.stop().await;
}

both_sources!(an_operations_endpoint_that_fails_does_not_loop);
/// The operations endpoint is down too: the deliveries of the events about dead deliveries go dead in turn,
/// and publish nothing more.
async fn an_operations_endpoint_that_fails_does_not_loop(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    rx.set_responder(|r, _| match r.path.as_str() {
        "/healthy" => Reply::Status(200),
        _ => Reply::Status(500),
    });
    endpoint(&client, &rx.url("/ops"), None, false, &["walhook.*"]).await;
    endpoint(&client, &rx.url("/app"), None, false, &["order.*"]).await;
    endpoint(&client, &rx.url("/healthy"), None, false, &["order.*"]).await;
    let daemon = Daemon::start(pg.config_for_with(source, |f| {
        f.merge(("delivery.retry_schedule", vec!["200ms"]))
            .merge(("delivery.breaker_threshold", 1000))
    }));
    wait_ready(source, &client).await;
    for i in 0..3 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    // 3 to /app and then 3 operational events to /ops, all dead
    eventually("six deliveries dead", || async {
        count(
            &client,
            "select count(*) from walhook.deliveries where status = 'dead'",
        )
        .await
            == 6
    })
    .await;
    wait_succeeded(&client, 3).await;
    // each delivery's outcome and its operational event are one transaction: nothing more can come
    assert_eq!(
        count(
            &client,
            "select count(*) from walhook.outbox where event_type like 'walhook.%'"
        )
        .await,
        3
    );
    assert_eq!(rx.distinct_ids("/healthy").len(), 3);
    daemon.stop().await;
}

/// An endpoint that is down opens its breaker, and when it is back the breaker closes: both are published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opening_and_closing_is_published() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let u = up.clone();
    rx.set_responder(move |r, _| {
        if r.path == "/down" && !u.load(std::sync::atomic::Ordering::SeqCst) {
            Reply::Status(503)
        } else {
            Reply::Status(200)
        }
    });
    endpoint(
        &client,
        &rx.url("/ops"),
        Some("acme"),
        false,
        &["walhook.endpoint.*"],
    )
    .await;
    let down = endpoint(&client, &rx.url("/down"), Some("acme"), false, &["order.*"]).await;
    let daemon = Daemon::start(pg.config_with(|f| {
        f.merge(("delivery.breaker_threshold", 3))
            .merge(("delivery.breaker_cooldown", "3s"))
            .merge(("delivery.breaker_max_cooldown", "3s"))
            .merge((
                "delivery.retry_schedule",
                vec!["1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s"],
            ))
            .merge(("delivery.max_in_flight_per_endpoint", 1))
    }));
    wait_streaming(&client).await;
    for i in 0..10 {
        publish_for(&client, "acme", &format!("{{\"i\": {i}}}")).await;
    }
    wait_received(&rx, "/ops", 1).await;
    let opened = events_at(&rx, "/ops");
    assert_eq!(types(&opened), ["walhook.endpoint.breaker_opened"]);
    assert_eq!(opened[0].1["endpoint_id"], down);
    assert_eq!(opened[0].1["tenant"], "acme");
    assert!(opened[0].1["open_until"].is_string());
    assert!(opened[0].1["consecutive_failures"].as_i64().unwrap() >= 3);
    assert_eq!(opened[0].1["last_status_code"], 503);
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_received(&rx, "/ops", 2).await;
    let events = events_at(&rx, "/ops");
    assert_eq!(
        types(&events),
        [
            "walhook.endpoint.breaker_closed",
            "walhook.endpoint.breaker_opened"
        ]
    );
    assert_eq!(events[0].1["endpoint_id"], down);
    assert!(events[0].1["open_until"].is_null());
    wait_succeeded(&client, 12).await;
    daemon.stop().await;
}

/// Applications cannot publish walhook's types, whatever their rights on the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_types_are_refused_to_applications() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    client
        .batch_execute("create role app login in role walhook_writer")
        .await
        .unwrap();
    let app = pg.client_as("app").await;
    for who in [&app, &client] {
        let err = who
            .execute(
                "insert into walhook.outbox (event_type, payload) values ('walhook.endpoint.disabled', '{}')",
                &[],
            )
            .await
            .unwrap_err();
        let db = err.as_db_error().expect("a server error");
        assert_eq!(db.code(), &tokio_postgres::error::SqlState::CHECK_VIOLATION);
        assert!(db.message().contains("is reserved"), "{}", db.message());
    }
    // an ordinary type that only starts alike is the application's
    app.execute(
        "insert into walhook.outbox (event_type, payload) values ('walhooks.thing', '{}')",
        &[],
    )
    .await
    .unwrap();
}

/// A tenant's recovery is recorded in walhook.recoveries, which only its tenant (and the operator) reads, and
/// published to that tenant alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_is_recorded_and_published_to_its_tenant() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    client
        .batch_execute(
            "create role webapp login in role walhook_tenant;
             insert into walhook.endpoints (url, tenant, event_types)
               values ('http://127.0.0.1:9/a', 'acme', '{order.*}'),
                      ('http://127.0.0.1:9/g', 'globex', '{order.*}');
             insert into walhook.outbox (event_type, payload, tenant)
               values ('order.created', '{}', 'acme'), ('order.created', '{}', 'acme'),
                      ('order.created', '{}', 'globex');",
        )
        .await
        .unwrap();
    let acme = pg.client_as("webapp").await;
    acme.batch_execute("set walhook.tenant = 'acme'")
        .await
        .unwrap();
    // the endpoint exists since after the events: recover them by endpoint
    let id: i64 = acme
        .query_one("select id from walhook.endpoints", &[])
        .await
        .unwrap()
        .get(0);
    let n: i64 = acme
        .query_one(
            "select walhook.recover($1, since => now() - interval '1 hour')",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    let row = acme
        .query_one(
            "select kind, tenant, deliveries, recovered_by from walhook.recoveries",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "recover");
    assert_eq!(row.get::<_, &str>(1), "acme");
    assert_eq!(row.get::<_, i64>(2), 2);
    assert_eq!(row.get::<_, &str>(3), "webapp");
    let published = client
        .query_one(
            "select tenant, payload::text from walhook.outbox where event_type = 'walhook.recovery.finished'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(published.get::<_, &str>(0), "acme");
    let payload: Value = serde_json::from_str(published.get(1)).unwrap();
    assert_eq!(payload["deliveries"], 2);
    assert_eq!(payload["endpoint_id"], id);
    assert_eq!(payload["kind"], "recover");

    // globex sees none of it, and cannot record a recovery in acme's name
    let globex = pg.client_as("webapp").await;
    globex
        .batch_execute("set walhook.tenant = 'globex'")
        .await
        .unwrap();
    assert_eq!(
        count(&globex, "select count(*) from walhook.recoveries").await,
        0
    );
    let err = globex
        .execute(
            "insert into walhook.recoveries (kind, tenant, deliveries) values ('recover', 'acme', 1)",
            &[],
        )
        .await
        .unwrap_err();
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("row-level security"),
        "{err:?}"
    );
    assert_eq!(
        count(&globex, "select count(*) from walhook.outbox").await,
        1,
        "globex's own event only"
    );
}

/// The README's section, block by block as the role each names; then an endpoint of acme disabled by hand
/// reaches both subscribers, and the README's example of a payload has the keys walhook sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_operational_events_run_as_written() {
    let pg = Pg::start().await;
    let superuser = pg.client().await;
    let roles = crate::schema::readme_blocks("## Roles", "sql");
    let create_roles = roles
        .iter()
        .find(|b| b.contains("CREATE ROLE webapp"))
        .expect("the Roles section creates webapp");
    superuser.batch_execute(create_roles).await.unwrap();
    let ops = pg.client_as("ops").await;
    let webapp = pg.client_as("webapp").await;
    let blocks = crate::schema::readme_blocks("## Operational events", "sql");
    assert_eq!(blocks.len(), 2, "{blocks:?}");
    for block in &blocks {
        let first = block.lines().next().unwrap_or_default();
        let client = if first.starts_with("-- as the operator (walhook_admin)") {
            &ops
        } else if first.starts_with("-- as the web application (webapp)") {
            &webapp
        } else {
            panic!("a README block does not say as whom to run it: {block}");
        };
        client
            .batch_execute(block)
            .await
            .unwrap_or_else(|e| panic!("{block}: {e:?}"));
    }
    let app_endpoint: i64 = superuser
        .query_one(
            "insert into walhook.endpoints (tenant, url) values ('acme', 'https://hooks.acme.example/orders')
             returning id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    superuser
        .batch_execute(&format!(
            "insert into walhook.outbox (event_type, payload, tenant) values ('order.created', '{{}}', 'acme');
             insert into walhook.deliveries (event_id, endpoint_id, webhook_id, status, attempts, last_error, tenant)
               select id, {app_endpoint}, uid, 'dead', 9, 'HTTP 500', tenant from walhook.outbox;
             update walhook.endpoints set enabled = false where id = {app_endpoint};"
        ))
        .await
        .unwrap();
    for event_type in ["walhook.delivery.dead", "walhook.endpoint.disabled"] {
        let receivers: String = superuser
            .query_one(
                "select string_agg(e.url, ',' order by e.id) from walhook.outbox o, walhook.endpoints e
                  where o.event_type = $1 and e.enabled
                    and walhook.endpoint_accepts(o.event_type, o.tenant, o.payload, e.event_types, e.tenant,
                                                 e.all_tenants, e.filter)",
                &[&event_type],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            receivers, "https://ops.internal.example/walhook,https://hooks.acme.example/alerts",
            "{event_type}"
        );
    }
    // the README's example of a body, against what was published
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("`{\"type\": \"walhook.delivery.dead\"")
        .expect("the README shows a delivery.dead body");
    let end = start + 1 + readme[start + 1..].find('`').unwrap();
    let example: Value = serde_json::from_str(&readme[start + 1..end].replace('\n', " ")).unwrap();
    let published: String = superuser
        .query_one(
            "select payload::text from walhook.outbox where event_type = 'walhook.delivery.dead'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let published: Value = serde_json::from_str(&published).unwrap();
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&example["data"]), keys(&published));
}
