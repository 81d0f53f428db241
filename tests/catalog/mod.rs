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
fn doc_blocks() -> Vec<String> {
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
