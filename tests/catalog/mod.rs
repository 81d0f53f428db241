//! The event catalog, versions and formats, end to end with docs/catalog.md's SQL run as written by the roles
//! it names: payloads checked against their version's JSON Schema before any request (a malformed event is
//! recorded dead with the path and never sent), a pinned endpoint receiving the payload rendered down by the
//! catalog's SQL function, the body naming its version, CloudEvents structured and binary bodies read by the
//! CloudEvents SDK and signed like any delivery, a failing downgrade recorded dead and sent after the fix, the
//! catalog's constraints, types outside the catalog untouched, and `send_test` with the catalog's example.

use serde_json::Value;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use walhook::receiver::Receiver;

use crate::support::*;

/// The port docs/catalog.md's endpoints point at.
const DOC_PORT: u16 = 9001;

/// The ```sql blocks of docs/catalog.md, in order.
pub(crate) fn doc_blocks() -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/catalog.md"))
        .expect("docs/catalog.md");
    let mut blocks = Vec::new();
    let mut current: Option<(bool, String)> = None;
    for line in doc.lines() {
        if let Some(info) = line.strip_prefix("```") {
            match current.take() {
                Some((true, text)) => blocks.push(text),
                Some((false, _)) => {}
                None => current = Some((info.trim() == "sql", String::new())),
            }
        } else if let Some((_, text)) = current.as_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    blocks
}

async fn refused(client: &Client, sql: &str) -> tokio_postgres::error::DbError {
    let e = client
        .batch_execute(sql)
        .await
        .expect_err(&format!("refused: {sql}"));
    e.as_db_error()
        .unwrap_or_else(|| panic!("a server error for {sql}: {e}"))
        .clone()
}

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body).expect("a JSON body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_checks_renders_and_formats_deliveries_as_documented() {
    let pg = Pg::start().await;
    let owner = pg.client().await;
    owner
        .batch_execute(
            "create role catalog_admin login in role walhook_admin;
             create role app_writer login in role walhook_writer;
             create role relay login replication in role walhook_daemon;",
        )
        .await
        .unwrap();
    let blocks = doc_blocks();
    assert_eq!(blocks.len(), 7, "docs/catalog.md's SQL blocks");
    let admin = pg.client_as("catalog_admin").await;
    let writer = pg.client_as("app_writer").await;
    owner.batch_execute(&blocks[0]).await.expect("the function");
    admin.batch_execute(&blocks[1]).await.expect("the catalog");

    // the catalog's constraints, each naming the fix
    let e = refused(
        &admin,
        "insert into walhook.endpoints (url, event_versions) values ('http://127.0.0.1:9/x', '{\"order.created\": 3}')",
    )
    .await;
    assert_eq!(e.code(), &SqlState::CHECK_VIOLATION);
    assert!(
        e.message()
            .contains("order.created version 3 is not in the catalog"),
        "{e}"
    );
    assert_eq!(e.hint(), Some("order.created has versions 1, 2"));
    let e = refused(
        &admin,
        "insert into walhook.endpoints (url, format) values ('http://127.0.0.1:9/x', 'xml')",
    )
    .await;
    assert_eq!(e.code(), &SqlState::CHECK_VIOLATION);
    let e = refused(
        &admin,
        "insert into walhook.event_type_versions (event_type, version) values ('order.created', 3)",
    )
    .await;
    assert_eq!(e.code(), &SqlState::CHECK_VIOLATION, "{e}");
    assert!(
        e.constraint() == Some("event_type_versions_downgrade_needed"),
        "{e}"
    );
    let e = refused(
        &admin,
        "insert into walhook.event_type_versions (event_type, version, downgrade)
         values ('order.created', 3, 'pg_catalog.jsonb_typeof(jsonb)')",
    )
    .await;
    assert!(e.message().contains("taking one jsonb"), "{e}");
    let e = refused(
        &admin,
        "insert into walhook.event_type_versions (event_type, version, downgrade)
         values ('order.created', 4, 'app.order_created_v2_to_v1(jsonb)')",
    )
    .await;
    assert_eq!(
        e.code(),
        &SqlState::FOREIGN_KEY_VIOLATION,
        "versions without gaps: {e}"
    );
    let e = refused(
        &admin,
        "delete from walhook.event_type_versions where event_type = 'order.created' and version = 1",
    )
    .await;
    assert_eq!(e.code(), &SqlState::FOREIGN_KEY_VIOLATION, "{e}");
    let e = refused(
        &admin,
        "insert into walhook.event_types (name) values ('walhook.mine')",
    )
    .await;
    assert_eq!(e.code(), &SqlState::CHECK_VIOLATION);

    // the documented endpoints, one unpinned Standard Webhooks endpoint, and one for a type outside the catalog
    let rx = Receiver::start_on(DOC_PORT).await.expect("port 9001 free");
    admin
        .batch_execute(&blocks[4])
        .await
        .expect("the pinned endpoint");
    admin
        .batch_execute(&blocks[5])
        .await
        .expect("the CloudEvents endpoints");
    admin
        .batch_execute(
            "insert into walhook.endpoints (url, event_types) values
               ('http://127.0.0.1:9001/standard', '{order.*}'), ('http://127.0.0.1:9001/users', '{user.*}')",
        )
        .await
        .unwrap();
    for row in admin
        .query("select url, secret from walhook.endpoints", &[])
        .await
        .unwrap()
    {
        let url: String = row.get(0);
        let path = url.trim_start_matches("http://127.0.0.1:9001").to_string();
        rx.set_secret(&path, &row.get::<_, String>(1));
    }

    let daemon = Daemon::start(pg.config_with(|f| f.merge(("database_url", pg.url_as("relay")))));
    wait_streaming(&owner).await;
    writer
        .batch_execute(&blocks[2])
        .await
        .expect("valid events");
    writer
        .batch_execute(&blocks[3])
        .await
        .expect("an event its schema refuses");
    writer
        .batch_execute(
            "insert into walhook.outbox (event_type, payload) values ('user.signed_up', '{\"amount_cents\": \"any\"}')",
        )
        .await
        .unwrap();

    // 2 valid orders x 4 endpoints, the user event once; the malformed order dead at its 4 endpoints
    eventually("deliveries reach their end", || async {
        count(
            &owner,
            "select count(*) from walhook.deliveries where status = 'succeeded'",
        )
        .await
            == 9
            && count(
                &owner,
                "select count(*) from walhook.deliveries where status = 'dead'",
            )
            .await
                == 4
    })
    .await;
    for row in owner
        .query(
            "select d.last_error, d.attempts from walhook.deliveries d where d.status = 'dead'",
            &[],
        )
        .await
        .unwrap()
    {
        let error: String = row.get(0);
        assert!(error.contains("order.created version 2"), "{error}");
        assert!(error.contains("at /amount_cents"), "{error}");
        assert!(error.contains("integer"), "{error}");
    }
    let received = rx.received();
    assert!(
        received
            .iter()
            .all(|r| !String::from_utf8_lossy(&r.body).contains("1003")),
        "the malformed event was never sent"
    );
    assert!(
        received.iter().all(|r| r.verified == Some(true)),
        "every request is signed"
    );
    let at = |path: &str, order: i64| {
        received
            .iter()
            .find(|r| {
                r.path == path && String::from_utf8_lossy(&r.body).contains(&order.to_string())
            })
            .unwrap_or_else(|| panic!("{path} received order {order}"))
            .clone()
    };

    // unpinned: the published version, named in the body
    let body = json(&at("/standard", 1001).body);
    assert_eq!(body["type"], "order.created");
    assert_eq!(body["version"], 2);
    assert_eq!(body["data"]["amount_cents"], 2500);
    assert_eq!(
        json(&at("/standard", 1002).body)["version"],
        2,
        "NULL is the newest version"
    );

    // pinned to version 1: rendered by the catalog's function
    let body = json(&at("/legacy", 1001).body);
    assert_eq!(body["version"], 1);
    assert_eq!(
        body["data"].to_string(),
        r#"{"amount":25.00,"order_id":1001}"#
    );

    // CloudEvents, structured and binary, as the SDK reads them
    let structured = at("/cloudevents", 1001);
    assert_eq!(
        structured.headers["content-type"],
        "application/cloudevents+json"
    );
    let event: cloudevents::Event = serde_json::from_slice(&structured.body).expect("a CloudEvent");
    {
        use cloudevents::AttributesReader;
        assert_eq!(event.ty(), "order.created");
        assert_eq!(event.id(), structured.webhook_id);
        assert_eq!(event.source().to_string(), "/walhook");
        assert_eq!(event.datacontenttype(), Some("application/json"));
        assert!(event.time().is_some());
    }
    assert_eq!(
        event.extension("dataversion").map(|v| v.to_string()),
        Some("2".into())
    );
    let Some(cloudevents::Data::Json(data)) = event.data() else {
        panic!("JSON data: {event}");
    };
    assert_eq!(data["amount_cents"], 2500);
    let binary = at("/binary", 1001);
    let event = cloudevents::binding::http::to_event(&binary.headers, binary.body.to_vec())
        .expect("a binary-mode CloudEvent");
    {
        use cloudevents::AttributesReader;
        assert_eq!(event.ty(), "order.created");
        assert_eq!(event.id(), binary.webhook_id);
    }
    assert_eq!(
        json(&binary.body)["amount_cents"],
        2500,
        "the payload is the body"
    );

    // outside the catalog: as before, no version, no check
    let body = json(
        &rx.received()
            .iter()
            .find(|r| r.path == "/users")
            .unwrap()
            .body,
    );
    assert_eq!(body["data"]["amount_cents"], "any");
    assert!(body.get("version").is_none());

    // a downgrade that fails: that delivery is dead with the error, the others go; fixed, it is sent
    owner
        .batch_execute(
            "create or replace function app.order_created_v2_to_v1(p jsonb) returns jsonb
             language plpgsql as $$ begin raise exception 'not today'; end $$",
        )
        .await
        .unwrap();
    writer
        .batch_execute(
            "insert into walhook.outbox (event_type, payload) values ('order.created', '{\"order_id\": 1004, \"amount_cents\": 100}')",
        )
        .await
        .unwrap();
    eventually("the legacy delivery of 1004 is dead", || async {
        count(
            &owner,
            "select count(*) from walhook.deliveries d join walhook.endpoints e on e.id = d.endpoint_id
              where d.status = 'dead' and e.url like '%/legacy' and d.last_error like '%not today%'",
        )
        .await
            == 1
    })
    .await;
    wait_succeeded(&owner, 12).await;
    owner
        .batch_execute(
            &blocks[0]
                .replace("CREATE SCHEMA IF NOT EXISTS app;", "")
                .replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION"),
        )
        .await
        .unwrap();
    admin
        .batch_execute(
            "select walhook.redeliver(array(select d.id from walhook.deliveries d
                                              join walhook.endpoints e on e.id = d.endpoint_id
                                             where d.status = 'dead' and e.url like '%/legacy'
                                               and d.last_error like '%not today%'))",
        )
        .await
        .unwrap();
    wait_succeeded(&owner, 13).await;
    assert_eq!(
        json(&at_latest(&rx, "/legacy", 1004).body)["data"].to_string(),
        r#"{"amount":1.00,"order_id":1004}"#
    );

    // a test event from the catalog: the pinned version's example, to that endpoint only
    admin.batch_execute(&blocks[6]).await.expect("send_test");
    wait_succeeded(&owner, 14).await;
    let test = at_latest(&rx, "/legacy", 42);
    let body = json(&test.body);
    assert_eq!(body["type"], "order.created");
    assert_eq!(body["version"], 1);
    assert_eq!(body["data"]["amount"], serde_json::json!(19.99));
    daemon.stop().await;
}

fn at_latest(rx: &Receiver, path: &str, order: i64) -> walhook::receiver::Received {
    rx.received()
        .into_iter()
        .rev()
        .find(|r| r.path == path && String::from_utf8_lossy(&r.body).contains(&order.to_string()))
        .unwrap_or_else(|| panic!("{path} received order {order}"))
}

/// The notify source reads the row's version too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notify_source_sends_the_rows_version() {
    let pg = Pg::start_for(Source::Notify).await;
    let owner = pg.client().await;
    owner
        .batch_execute(
            "insert into walhook.event_types (name) values ('order.shipped');
             insert into walhook.event_type_versions (event_type, version, schema)
             values ('order.shipped', 1, '{\"required\": [\"id\"]}');",
        )
        .await
        .unwrap();
    let rx = Receiver::start().await.unwrap();
    let (_, secret) = add_endpoint(&owner, &rx.url("/a"), &["order.*"]).await;
    rx.set_secret("/a", &secret);
    let daemon = Daemon::start(pg.config_for(Source::Notify));
    owner
        .batch_execute(
            "insert into walhook.outbox (event_type, event_version, payload) values ('order.shipped', 1, '{\"id\": 1}');
             insert into walhook.outbox (event_type, payload) values ('order.shipped', '{\"no_id\": 2}');",
        )
        .await
        .unwrap();
    eventually("one sent, one dead", || async {
        count(
            &owner,
            "select count(*) from walhook.deliveries where status = 'succeeded'",
        )
        .await
            == 1
            && count(
                &owner,
                "select count(*) from walhook.deliveries where status = 'dead'",
            )
            .await
                == 1
    })
    .await;
    let body = json(&rx.received()[0].body);
    assert_eq!(body["version"], 1);
    assert_eq!(body["data"]["id"], 1);
    daemon.stop().await;
}

/// The README's handshake: an endpoint inserted with `verification = 'pending'` gets nothing but its signed
/// verification request until it answers 2xx (a first 401, as from a receiver without the secret yet, is
/// retried), then every event; an endpoint subscribed to `walhook.*` never sees a verification; a verification
/// that ends dead says why, and `verify_endpoint` tries again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_awaiting_verification_gets_only_its_verification_until_it_answers() {
    let pg = Pg::start().await;
    let owner = pg.client().await;
    let rx = Receiver::start_on(9002).await.expect("port 9002 free");
    let (_, ops_secret) = add_endpoint(&owner, &rx.url("/ops"), &["walhook.*"]).await;
    rx.set_secret("/ops", &ops_secret);
    // the first request to /hooks is refused, as by a receiver that does not have the secret yet
    rx.set_responder(|r, _| {
        let first = r.path == "/hooks" && r.verified != Some(true);
        walhook::receiver::Reply::Status(if first || r.path == "/broken" {
            401
        } else {
            200
        })
    });
    let daemon = Daemon::start(pg.config());
    wait_streaming(&owner).await;
    let blocks =
        crate::schema::readme_blocks("### Verifying an endpoint before it receives events", "sql");
    assert_eq!(blocks.len(), 2);
    let row = owner
        .query_one(blocks[0].as_str(), &[])
        .await
        .expect("the README's insert");
    let (id, secret): (i64, String) = (row.get(0), row.get(1));
    let state = owner.query_one(blocks[1].as_str(), &[]).await.unwrap();
    assert!(!state.get::<_, bool>(0));
    assert_eq!(
        state.get::<_, Option<String>>(1).as_deref(),
        Some("pending")
    );
    let reason: String = state.get(3);
    assert!(reason.starts_with("awaiting verification"), "{reason}");
    publish(&owner, "order.created", r#"{"before": true}"#).await;
    // the receiver gets its secret only now: the first attempt was refused, the retry verifies
    eventually("the first verification attempt", || async {
        rx.count() >= 1
    })
    .await;
    rx.set_secret("/hooks", &secret);
    eventually("the endpoint is verified and enabled", || async {
        let s = owner.query_one(blocks[1].as_str(), &[]).await.unwrap();
        s.get::<_, bool>(0) && s.get::<_, Option<String>>(1).as_deref() == Some("verified")
    })
    .await;
    let state = owner.query_one(blocks[1].as_str(), &[]).await.unwrap();
    assert!(state.get::<_, Option<std::time::SystemTime>>(2).is_some());
    assert_eq!(state.get::<_, Option<String>>(3), None);
    // a test event goes through the scheduler, which waits for the endpoint cache to catch up with the claim:
    // once it arrives, the daemon knows the endpoint is enabled
    owner
        .execute("select walhook.send_test($1)", &[&id])
        .await
        .unwrap();
    eventually("the test event arrives", || async {
        rx.received().iter().any(|r| {
            r.path == "/hooks" && String::from_utf8_lossy(&r.body).contains("walhook.test")
        })
    })
    .await;
    publish(&owner, "order.created", r#"{"after": true}"#).await;
    eventually("the event after verification arrives", || async {
        rx.received()
            .iter()
            .any(|r| r.path == "/hooks" && String::from_utf8_lossy(&r.body).contains("after"))
    })
    .await;
    let hooks: Vec<Value> = rx
        .received()
        .iter()
        .filter(|r| r.path == "/hooks")
        .map(|r| json(&r.body))
        .collect();
    assert!(
        hooks.iter().all(|b| b["data"].get("before").is_none()),
        "nothing before it was verified"
    );
    assert_eq!(hooks[0]["type"], "walhook.endpoint.verification");
    assert_eq!(hooks[0]["data"]["endpoint_id"], id);
    let last = rx
        .received()
        .into_iter()
        .rfind(|r| r.path == "/hooks")
        .unwrap();
    assert_eq!(last.verified, Some(true));
    assert!(
        rx.received().iter().all(|r| r.path != "/ops"
            || !String::from_utf8_lossy(&r.body).contains("walhook.endpoint.verification")),
        "a verification goes only to its endpoint"
    );

    // a receiver that never answers 2xx: dead, the reason says how to try again
    let broken: i64 = owner
        .query_one(
            "insert into walhook.endpoints (url, verification) values ('http://127.0.0.1:9002/broken', 'pending') returning id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    eventually("the broken endpoint's verification is dead", || async {
        let reason: Option<String> = owner
            .query_one(
                "select disabled_reason from walhook.endpoints where id = $1",
                &[&broken],
            )
            .await
            .unwrap()
            .get(0);
        reason.is_some_and(|r| r.starts_with("verification failed: HTTP 401"))
    })
    .await;
    let reason: String = owner
        .query_one(
            "select disabled_reason from walhook.endpoints where id = $1",
            &[&broken],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        reason.ends_with(&format!("SELECT walhook.verify_endpoint({broken})")),
        "{reason}"
    );
    owner
        .execute(
            "update walhook.endpoints set url = 'http://127.0.0.1:9002/fixed' where id = $1",
            &[&broken],
        )
        .await
        .unwrap();
    owner
        .execute("select walhook.verify_endpoint($1)", &[&broken])
        .await
        .unwrap();
    eventually("verified after the fix", || async {
        owner
            .query_one(
                "select enabled from walhook.endpoints where id = $1",
                &[&broken],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
    daemon.stop().await;
}

/// A `kill -9` while the catalog refuses some events and renders others for a pinned endpoint loses nothing:
/// after a restart every valid event reaches both endpoints (the pinned one in its version), every malformed
/// one is dead at both and was never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_the_catalog_checks_and_renders_loses_nothing() {
    let pg = Pg::start().await;
    let owner = pg.client().await;
    let blocks = doc_blocks();
    owner.batch_execute(&blocks[0]).await.unwrap();
    owner.batch_execute(&blocks[1]).await.unwrap();
    let rx = Receiver::start().await.unwrap();
    // the receivers are slow enough that the kill lands mid-stream
    rx.set_responder(|_, _| {
        walhook::receiver::Reply::Delay(std::time::Duration::from_millis(20), 200)
    });
    let (_, current) = add_endpoint(&owner, &rx.url("/current"), &["order.*"]).await;
    rx.set_secret("/current", &current);
    let pinned: String = owner
        .query_one(
            "insert into walhook.endpoints (url, event_types, event_versions) values ($1, '{order.*}', '{\"order.created\": 1}')
             returning secret",
            &[&rx.url("/pinned")],
        )
        .await
        .unwrap()
        .get(0);
    rx.set_secret("/pinned", &pinned);
    // committed before the first start, in version 1: backfilled with their version
    owner
        .execute(
            "insert into walhook.outbox (event_type, event_version, payload)
             select 'order.created', 1, jsonb_build_object('order_id', 10000 + g, 'amount', 1.5)
               from generate_series(1, 10) g",
            &[],
        )
        .await
        .unwrap();
    let mut daemon = KillOnDrop(spawn_binary(&["run"], &pg.env()));
    wait_ready(Source::Replication, &owner).await;
    // every fifth event breaks version 2's schema
    owner
        .execute(
            "insert into walhook.outbox (event_type, payload)
             select 'order.created', case when g % 5 = 0 then jsonb_build_object('order_id', g, 'amount_cents', 'x')
                                          else jsonb_build_object('order_id', g, 'amount_cents', g) end
               from generate_series(1, 500) g",
            &[],
        )
        .await
        .unwrap();
    assert!(
        rx.wait_until(DEADLINE, |r| r.len() >= 50).await,
        "deliveries started"
    );
    daemon.0.kill().unwrap();
    daemon.0.wait().unwrap();
    let _daemon = KillOnDrop(spawn_binary(&["run"], &pg.env()));
    eventually("every delivery at its end", || async {
        count(
            &owner,
            "select count(*) from walhook.deliveries where status = 'succeeded'",
        )
        .await
            == 820
            && count(
                &owner,
                "select count(*) from walhook.deliveries where status = 'dead'",
            )
            .await
                == 200
    })
    .await;
    assert_eq!(rx.distinct_ids("/current").len(), 410);
    assert_eq!(rx.distinct_ids("/pinned").len(), 410);
    for r in rx.received() {
        let body = json(&r.body);
        assert_ne!(
            body["data"]["amount_cents"], "x",
            "a malformed event was sent"
        );
        assert_eq!(r.verified, Some(true));
        let backfilled = body["data"]["order_id"].as_i64().unwrap() > 10000;
        if r.path == "/pinned" || backfilled {
            assert_eq!(body["version"], 1, "{body}");
            assert!(body["data"].get("amount").is_some(), "{body}");
        } else {
            assert_eq!(body["version"], 2);
        }
    }
}

/// `walhook.publish(…, event_version => n)` carries the version in its message as the row's column does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_message_carries_its_version() {
    let pg = Pg::start().await;
    let owner = pg.client().await;
    owner
        .batch_execute(
            "insert into walhook.event_types (name) values ('order.shipped');
             insert into walhook.event_type_versions (event_type, version, schema)
             values ('order.shipped', 1, '{\"required\": [\"id\"]}');",
        )
        .await
        .unwrap();
    let rx = Receiver::start().await.unwrap();
    let (_, secret) = add_endpoint(&owner, &rx.url("/a"), &["order.*"]).await;
    rx.set_secret("/a", &secret);
    let daemon = Daemon::start(pg.config());
    wait_streaming(&owner).await;
    eventually("walhook.publish() writes messages", || async {
        walhook::store::publishing_slot(&owner)
            .await
            .unwrap()
            .is_some()
    })
    .await;
    owner
        .batch_execute(
            "select walhook.publish('order.shipped', '{\"id\": 1}', event_version => 1);
             select walhook.publish('order.shipped', '{\"no_id\": 2}', event_version => 1);",
        )
        .await
        .unwrap();
    eventually("one sent, one dead", || async {
        count(
            &owner,
            "select count(*) from walhook.deliveries where status = 'succeeded'",
        )
        .await
            == 1
            && count(
                &owner,
                "select count(*) from walhook.deliveries where status = 'dead'",
            )
            .await
                == 1
    })
    .await;
    assert_eq!(
        count(
            &owner,
            "select count(*) from walhook.outbox where event_type = 'order.shipped'"
        )
        .await,
        0,
        "both were messages"
    );
    let body = json(&rx.received()[0].body);
    assert_eq!(body["version"], 1);
    assert_eq!(body["data"]["id"], 1);
    daemon.stop().await;
}
