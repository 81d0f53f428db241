//! `walhook.publish()` (sql/016_publish.sql) beside `INSERT INTO walhook.outbox`: the two capture paths side by
//! side against a real cluster and the real daemon, with the guarantees of the table (committed only, nothing
//! lost across `kill -9`, no duplicates after a restart), both of publish()'s branches (a message while
//! walhook's slot exists, an outbox row otherwise), the writer's privileges as the README grants them, and
//! messages that publish() did not write.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio_postgres::Client;
use walhook::cluster::{ClusterOptions, WalLevel};
use walhook::receiver::{Receiver, Reply};

use crate::support::*;

/// The application's role, exactly as the README's Roles section creates it.
const WRITER_ROLE: &str = "CREATE ROLE app LOGIN PASSWORD 'secret' IN ROLE walhook_writer;";

/// A connection as a role holding only `walhook_writer`.
async fn writer(pg: &Pg) -> Client {
    pg.client()
        .await
        .batch_execute(WRITER_ROLE)
        .await
        .expect("the README's writer role");
    pg.client_as("app").await
}

/// `walhook.publish()` in a transaction of its own; returns the event's id.
async fn publish_fn(client: &Client, event_type: &str, payload: &str) -> i64 {
    client
        .query_one(
            "select walhook.publish($1, $2::text::jsonb)",
            &[&event_type, &payload],
        )
        .await
        .expect("walhook.publish")
        .get(0)
}

/// Whether the event has an outbox row (publish() wrote a message when it has none).
async fn in_outbox(client: &Client, id: i64) -> bool {
    count(
        client,
        &format!("select count(*) from walhook.outbox where id = {id}"),
    )
    .await
        == 1
}

/// Waits until publish() writes messages: walhook's slot is created and its backfill done. (The slot is
/// `active` earlier, held by the connection that creates it, while publish() still inserts rows.)
async fn wait_publishing(client: &Client) {
    eventually("walhook.publish() writes messages", || async {
        walhook::store::publishing_slot(client)
            .await
            .unwrap()
            .is_some()
    })
    .await;
}

/// What publish() looks at, for assertion messages.
async fn slots(client: &Client) -> String {
    client
        .query_one(
            "select format('slots %s; walhook.slots %s',
                    (select json_agg(r) from pg_get_replication_slots() r),
                    (select json_agg(w) from walhook.slots w))",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Requests answered 2xx per (path, webhook-id).
fn successes(rx: &Receiver) -> HashMap<(String, String), usize> {
    let mut n = HashMap::new();
    for r in rx.received() {
        if (200..300).contains(&r.status_sent) {
            *n.entry((r.path.clone(), r.webhook_id.clone())).or_default() += 1;
        }
    }
    n
}

/// The payloads the receiver got at `path`.
fn payloads(rx: &Receiver, path: &str) -> Vec<serde_json::Value> {
    rx.received()
        .iter()
        .filter(|r| r.path == path)
        .map(|r| serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["data"].clone())
        .collect()
}

/// Committed only, nothing lost across `kill -9`: a writer with only `walhook_writer` commits events through
/// both paths, alternately and mixed in one transaction, with rolled-back ones in between, while the daemon is
/// killed four times. publish() wrote outbox rows before the daemon's first start (its slot did not exist
/// yet) and messages after; every committed event reaches every matching endpoint, nothing rolled back does,
/// and message events' deliveries keep their copy of the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_paths_lose_nothing_across_kill_9_and_deliver_only_what_committed() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let app = writer(&pg).await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/a"), &["*"]).await;
    add_endpoint(&client, &rx.url("/b"), &["order.*"]).await;

    // before the first start there is no slot: publish() inserts the row, which the first start backfills
    let early = publish_fn(&app, "order.created", r#"{"early": "publish"}"#).await;
    assert!(
        in_outbox(&client, early).await,
        "no slot yet: an outbox row"
    );
    publish(&app, "order.created", r#"{"early": "insert"}"#).await;

    let env = pg.env();
    let child = KillOnDrop(spawn_binary(&["run"], &env));
    wait_publishing(&client).await;
    let streamed = publish_fn(&app, "user.created", r#"{"streamed": true}"#).await;
    assert!(
        !in_outbox(&client, streamed).await,
        "the slot exists: a message, no row; {}",
        slots(&client).await
    );
    drop(child);

    let writer_task = {
        let url = pg.url_as("app");
        tokio::spawn(async move {
            let mut app = walhook::store::connect_client(&url.parse().unwrap())
                .await
                .unwrap();
            for i in 0..600 {
                let t = if i % 2 == 0 {
                    "order.created"
                } else {
                    "user.created"
                };
                let payload = format!("{{\"i\": {i}}}");
                let tx = app.transaction().await.unwrap();
                match i % 3 {
                    0 => {
                        tx.execute(
                            "insert into walhook.outbox (event_type, payload) values ($1, $2::text::jsonb)",
                            &[&t, &payload],
                        )
                        .await
                        .unwrap();
                    }
                    1 => {
                        tx.query_one(
                            "select walhook.publish($1, $2::text::jsonb)",
                            &[&t, &payload],
                        )
                        .await
                        .unwrap();
                    }
                    _ => {
                        // both paths in one transaction, and a rolled-back one of each beside it
                        tx.query_one(
                            "select walhook.publish($1, $2::text::jsonb)",
                            &[&t, &payload],
                        )
                        .await
                        .unwrap();
                        let rolled_back = format!("{{\"rolled_back\": {i}}}");
                        tx.batch_execute("savepoint s").await.unwrap();
                        tx.query_one(
                            "select walhook.publish('order.created', $1::text::jsonb)",
                            &[&rolled_back],
                        )
                        .await
                        .unwrap();
                        tx.execute(
                            "insert into walhook.outbox (event_type, payload)
                             values ('order.created', $1::text::jsonb)",
                            &[&rolled_back],
                        )
                        .await
                        .unwrap();
                        tx.batch_execute("rollback to savepoint s").await.unwrap();
                        let other = app_payload_twin(i);
                        tx.execute(
                            "insert into walhook.outbox (event_type, payload) values ($1, $2::text::jsonb)",
                            &[&t, &other],
                        )
                        .await
                        .unwrap();
                    }
                }
                tx.commit().await.unwrap();
                if i % 25 == 0 {
                    // a whole transaction of each kind rolled back
                    let tx = app.transaction().await.unwrap();
                    tx.query_one(
                        "select walhook.publish('order.created', '{\"rolled_back\": \"txn\"}')",
                        &[],
                    )
                    .await
                    .unwrap();
                    tx.execute(
                        "insert into walhook.outbox (event_type, payload)
                         values ('order.created', '{\"rolled_back\": \"txn\"}')",
                        &[],
                    )
                    .await
                    .unwrap();
                    tx.rollback().await.unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
    };
    for round in 0..4 {
        let child = KillOnDrop(spawn_binary(&["run"], &env));
        let before = rx.count();
        assert!(
            rx.wait_until(DEADLINE, |r| r.len() > before + 20 + round * 7)
                .await
                || writer_task.is_finished(),
            "the daemon makes progress"
        );
        drop(child); // kill -9
    }
    writer_task.await.unwrap();
    let _child = KillOnDrop(spawn_binary(&["run"], &env));

    // 3 before the loop; 600 committed in it plus the twin inserted beside every third one's publish()
    let events = 3 + 600 + 200;
    let orders = 2 + 300 + 100;
    eventually(
        "every committed event delivered to every matching endpoint",
        || async {
            count(
                &client,
                "select count(*) from walhook.deliveries where status = 'succeeded'",
            )
            .await
                == events + orders
        },
    )
    .await;
    assert_eq!(rx.distinct_ids("/a").len() as i64, events);
    assert_eq!(rx.distinct_ids("/b").len() as i64, orders);
    assert_eq!(
        count(
            &client,
            "select count(*) from walhook.deliveries where status <> 'succeeded'"
        )
        .await,
        0
    );
    for path in ["/a", "/b"] {
        assert!(
            payloads(&rx, path)
                .iter()
                .all(|p| p.get("rolled_back").is_none()),
            "{path} received a rolled-back event"
        );
    }
    // about a third of the events were messages: no outbox row, and their deliveries carry the event
    let messages = count(
        &client,
        "select count(distinct d.event_id) from walhook.deliveries d
          where not exists (select 1 from walhook.outbox o where o.id = d.event_id)",
    )
    .await;
    assert_eq!(messages, 1 + 400, "publish() after the slot existed");
    assert_eq!(
        count(
            &client,
            "select count(*) from walhook.deliveries d
              where not exists (select 1 from walhook.outbox o where o.id = d.event_id)
                and (d.event_type is null or d.payload is null or d.event_created_at is null)"
        )
        .await,
        0,
        "a message event's succeeded delivery keeps its copy"
    );
    assert_eq!(
        count(
            &client,
            "select count(*) from walhook.deliveries d
              where exists (select 1 from walhook.outbox o where o.id = d.event_id) and d.payload is not null"
        )
        .await,
        0,
        "an outbox event's succeeded delivery needs no copy"
    );
}

/// The payload of the row inserted beside a publish() in one transaction.
fn app_payload_twin(i: usize) -> String {
    format!("{{\"twin\": {i}}}")
}

/// Replay-safe: the daemon killed right after everything was delivered and recorded (its slot's confirmed
/// position may lag behind), then a graceful restart: the slot replays events of both paths, none is sent
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_paths_are_not_sent_again_after_a_restart() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let app = writer(&pg).await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/a"), &["*"]).await;
    let env = pg.env();
    let child = KillOnDrop(spawn_binary(&["run"], &env));
    wait_publishing(&client).await;
    for round in 0..3 {
        for i in 0..50 {
            let payload = format!("{{\"round\": {round}, \"i\": {i}}}");
            if i % 2 == 0 {
                publish_fn(&app, "order.created", &payload).await;
            } else {
                publish(&app, "order.created", &payload).await;
            }
        }
        wait_succeeded(&client, 50 * (round + 1)).await;
    }
    assert!(count(&client, "select count(*) from walhook.outbox").await < 150);
    drop(child); // kill -9 as soon as all is recorded
    let before = rx.count();
    let child = KillOnDrop(spawn_binary(&["run"], &env));
    wait_publishing(&client).await;
    // one more of each, then a graceful stop and start, and one more of each
    publish_fn(
        &app,
        "order.created",
        r#"{"after": "kill", "path": "publish"}"#,
    )
    .await;
    publish(
        &app,
        "order.created",
        r#"{"after": "kill", "path": "insert"}"#,
    )
    .await;
    wait_succeeded(&client, 152).await;
    let mut child = child;
    // SAFETY: kill(2) with a pid we own
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let status = tokio::task::block_in_place(|| child.0.wait()).unwrap();
    assert!(status.success(), "exit status {status:?}");
    let _child = KillOnDrop(spawn_binary(&["run"], &env));
    wait_publishing(&client).await;
    publish_fn(
        &app,
        "order.created",
        r#"{"after": "restart", "path": "publish"}"#,
    )
    .await;
    publish(
        &app,
        "order.created",
        r#"{"after": "restart", "path": "insert"}"#,
    )
    .await;
    wait_succeeded(&client, 154).await;
    assert!(
        rx.wait_until(DEADLINE, |r| r.len() >= before + 4).await,
        "the four new events arrive"
    );
    assert_eq!(rx.count(), before + 4, "nothing replayed was sent again");
    let twice: Vec<_> = successes(&rx).into_iter().filter(|(_, n)| *n > 1).collect();
    assert!(twice.is_empty(), "sent twice: {twice:?}");
}

/// A message event is the event its row would have been: the same envelope (type, timestamp in the same
/// format, data), the tenant, ordering key and trace context; a retry sends the same bytes from the
/// delivery's copy; a dead delivery raises `walhook.delivery.dead` with the event's type, and `redeliver`
/// sends it again without any outbox row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_event_is_delivered_like_its_row() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let app = writer(&pg).await;
    let rx = Receiver::start().await.unwrap();
    // /flaky fails each event's first attempt; /acme is the tenant's; /dead always fails; /ops hears of it
    rx.set_responder(|r, attempt| match r.path.as_str() {
        "/flaky" if attempt == 1 => Reply::Status(500),
        "/dead" => Reply::Status(400),
        _ => Reply::Status(200),
    });
    let (_, secret) = add_endpoint(&client, &rx.url("/flaky"), &["order.*"]).await;
    rx.set_secret("/flaky", &secret);
    client
        .batch_execute(&format!(
            "insert into walhook.endpoints (url, event_types, tenant, ordered)
             values ('{}', '{{invoice.*}}', 'acme', true);
             insert into walhook.endpoints (url, event_types) values ('{}', '{{dead.*}}');
             insert into walhook.endpoints (url, event_types) values ('{}', '{{walhook.delivery.dead}}');",
            rx.url("/acme"),
            rx.url("/dead"),
            rx.url("/ops")
        ))
        .await
        .unwrap();
    let daemon = Daemon::start(pg.config());
    wait_publishing(&client).await;

    // the session's own time zone and date style change nothing in what is sent
    app.batch_execute("set timezone = 'Asia/Kolkata'; set datestyle = 'SQL, DMY'")
        .await
        .unwrap();
    let payload = r#"{"id": 42, "note": "é\n\"x\"", "n": 1.50}"#;
    let by_message = publish_fn(&app, "order.created", payload).await;
    let by_row = publish(&app, "order.created", payload).await;
    assert!(
        !in_outbox(&client, by_message).await,
        "{}",
        slots(&client).await
    );
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for i in 0..5 {
        app.query_one(
            "select walhook.publish('invoice.paid', $1::text::jsonb, tenant => 'acme', ordering_key => 'inv-1',
                                    traceparent => $2)",
            &[&format!("{{\"i\": {i}}}"), &trace],
        )
        .await
        .unwrap();
    }
    // another tenant's invoice and a tenantless one: not acme's
    app.batch_execute(
        "select walhook.publish('invoice.paid', '{\"other\": 1}', tenant => 'globex');
         select walhook.publish('invoice.paid', '{\"other\": 2}');",
    )
    .await
    .unwrap();
    let dead = publish_fn(&app, "dead.letter", "{}").await;

    // /flaky: each event twice (500, then 200), the same bytes both times
    assert!(
        rx.wait_until(DEADLINE, |r| r
            .iter()
            .filter(|r| r.path == "/flaky" && r.status_sent == 200)
            .count()
            == 2)
            .await
    );
    let flaky: Vec<_> = rx
        .received()
        .into_iter()
        .filter(|r| r.path == "/flaky")
        .collect();
    assert!(flaky.iter().all(|r| r.verified == Some(true)));
    let mut bodies: HashMap<String, HashSet<Vec<u8>>> = HashMap::new();
    for r in &flaky {
        bodies
            .entry(r.webhook_id.clone())
            .or_default()
            .insert(r.body.to_vec());
    }
    assert_eq!(bodies.len(), 2);
    assert!(
        bodies.values().all(|b| b.len() == 1),
        "a retry sends the first attempt's bytes: {bodies:?}"
    );
    let mut envelopes = Vec::new();
    for id in [by_message, by_row] {
        let webhook_id = webhook_id(&client, id).await;
        let body = flaky.iter().find(|r| r.webhook_id == webhook_id).unwrap();
        envelopes.push(serde_json::from_slice::<serde_json::Value>(&body.body).unwrap());
    }
    let (m, r) = (&envelopes[0], &envelopes[1]);
    assert_eq!(m["type"], r["type"]);
    assert_eq!(m["data"], r["data"]);
    let timestamp = |v: &serde_json::Value| v["timestamp"].as_str().unwrap().to_string();
    // the same format: RFC 3339 in UTC, fractional digits without trailing zeros; the same moment, give or
    // take the time between the two commits
    let parse = |t: String| humantime::parse_rfc3339(&t).unwrap();
    let apart = parse(timestamp(r))
        .duration_since(parse(timestamp(m)))
        .expect("the row was published after the message");
    assert!(apart < Duration::from_secs(30), "{apart:?}");
    for t in [timestamp(m), timestamp(r)] {
        assert!(
            t.ends_with('Z') && t.len() >= 20 && !t.contains(".0Z"),
            "{t}"
        );
        assert!(
            !t.contains('.') || !t.trim_end_matches('Z').ends_with('0'),
            "{t}"
        );
    }

    // acme's ordered endpoint: its five invoices, in order, with the trace context; not globex's nor the
    // tenantless one
    assert!(
        rx.wait_until(DEADLINE, |r| r.iter().filter(|r| r.path == "/acme").count()
            >= 5)
            .await
    );
    let acme = payloads(&rx, "/acme");
    assert_eq!(
        acme,
        (0..5)
            .map(|i| serde_json::json!({ "i": i }))
            .collect::<Vec<_>>()
    );
    let traced = rx
        .received()
        .into_iter()
        .filter(|r| r.path == "/acme")
        .all(|r| {
            r.headers
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"))
        });
    assert!(traced, "the application's trace is the attempts' parent");
    assert_eq!(
        count(
            &client,
            "select count(*) from walhook.deliveries where tenant = 'acme' and event_type = 'invoice.paid'
                and payload is not null and traceparent is not null and status = 'succeeded'"
        )
        .await,
        5,
        "the copy of a message event: type, tenant, trace context"
    );

    // the dead one: walhook.delivery.dead names its type (from the delivery's copy), then redeliver sends it
    // again though there is no outbox row
    eventually("the delivery.dead event arrives", || async {
        payloads(&rx, "/ops")
            .iter()
            .any(|p| p["event_id"] == serde_json::json!(dead) && p["event_type"] == "dead.letter")
    })
    .await;
    let attempts = rx.received().iter().filter(|r| r.path == "/dead").count();
    client
        .batch_execute(&format!(
            "select walhook.redeliver(array(select id from walhook.deliveries where event_id = {dead}))"
        ))
        .await
        .unwrap();
    assert!(
        rx.wait_until(DEADLINE, |r| r.iter().filter(|r| r.path == "/dead").count()
            > attempts)
            .await,
        "redelivered from the delivery's copy"
    );
    daemon.stop().await;
}

/// The server's message of a failed statement.
fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

/// The `webhook-id` of event `id`, from its deliveries.
async fn webhook_id(client: &Client, id: i64) -> String {
    client
        .query_one(
            "select 'msg_' || replace(webhook_id::text, '-', '') from walhook.deliveries where event_id = $1 limit 1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0)
}

/// The README's example, as the writer.
async fn run_readme_example(app: &Client) {
    let blocks = crate::schema::readme_blocks(README_SECTION, "sql");
    assert_eq!(blocks.len(), 1, "{blocks:?}");
    app.batch_execute(&blocks[0])
        .await
        .expect("the README's walhook.publish() example as walhook_writer");
}

const README_SECTION: &str = "### Publishing without an outbox row: `walhook.publish()`";

/// The README's example publishes one `order.created` and one `invoice.paid` of tenant acme.
async fn readme_endpoints(client: &Client, rx: &Receiver) {
    add_endpoint(client, &rx.url("/orders"), &["order.*"]).await;
    client
        .execute(
            "insert into walhook.endpoints (url, event_types, tenant) values ($1, '{invoice.*}', 'acme')",
            &[&rx.url("/acme")],
        )
        .await
        .unwrap();
}

/// Without logical replication no slot can exist: publish() inserts the outbox row, and the notify source
/// delivers it like any other (the README's example, as the writer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_slot_publish_inserts_the_row_and_notify_delivers_it() {
    let pg = Pg::start_with(ClusterOptions {
        wal_level: WalLevel::Replica,
        ..Default::default()
    })
    .await;
    let client = pg.client().await;
    let app = writer(&pg).await;
    let rx = Receiver::start().await.unwrap();
    readme_endpoints(&client, &rx).await;
    add_endpoint(&client, &rx.url("/all"), &["*"]).await;
    let daemon = Daemon::start(pg.config_for(Source::Notify));
    wait_ready(Source::Notify, &client).await;
    run_readme_example(&app).await;
    let id = publish_fn(&app, "user.created", r#"{"u": 1}"#).await;
    assert!(in_outbox(&client, id).await);
    assert_eq!(
        count(&client, "select count(*) from walhook.outbox").await,
        3
    );
    // /all is tenantless: acme's invoice is not its
    wait_succeeded(&client, 2 + 2).await;
    wait_all_processed(&client).await;
    assert_eq!(rx.distinct_ids("/orders").len(), 1);
    assert_eq!(rx.distinct_ids("/acme").len(), 1);
    assert_eq!(rx.distinct_ids("/all").len(), 2);
    daemon.stop().await;
}

/// While walhook's slot exists publish() writes messages, which only the replication source reads: the
/// notify source refuses to start, naming the fix. Once the slot is dropped, publish() inserts rows again
/// (what a dropped slot's recovery and the notify source need), and the notify source delivers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notify_source_refuses_to_start_while_publish_writes_messages() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let app = writer(&pg).await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/a"), &["*"]).await;
    let daemon = Daemon::start(pg.config());
    wait_publishing(&client).await;
    let message = publish_fn(&app, "order.created", r#"{"by": "message"}"#).await;
    assert!(
        !in_outbox(&client, message).await,
        "{}",
        slots(&client).await
    );
    wait_succeeded(&client, 1).await;
    daemon.stop().await;

    let notify = Daemon::start(pg.config_for(Source::Notify));
    let err = notify.result().await.expect_err("refused").to_string();
    assert!(
        err.contains("walhook.publish()")
            && err.contains("SELECT pg_drop_replication_slot('walhook')"),
        "{err}"
    );
    // check-config --connect finds it too
    let output = check_config(&pg);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("SELECT pg_drop_replication_slot('walhook')"),
        "{stderr}"
    );

    client
        .batch_execute("SELECT pg_drop_replication_slot('walhook')")
        .await
        .unwrap();
    let row = publish_fn(&app, "order.created", r#"{"by": "row"}"#).await;
    assert!(in_outbox(&client, row).await, "no slot: an outbox row");
    let output = check_config(&pg);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let notify = Daemon::start(pg.config_for(Source::Notify));
    wait_succeeded(&client, 2).await;
    assert_eq!(rx.distinct_ids("/a").len(), 2);
    notify.stop().await;
}

/// `walhook check-config --connect` with the notify source.
fn check_config(pg: &Pg) -> std::process::Output {
    tokio::task::block_in_place(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_walhook"))
            .args(["check-config", "--connect"])
            .envs(pg.env_for(Source::Notify))
            .output()
            .unwrap()
    })
}

/// `walhook_writer` may publish and no more: not read the messages' key, not draw ids; a role without it may
/// not call publish(). publish() applies the outbox's checks with the outbox's messages, its payload limit
/// included. Messages that publish() did not write (any role may emit one) are not events: a look-alike
/// prefix, a non-transactional message, malformed content under the real prefix. The README's example runs
/// as the writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_writer_publishes_and_messages_publish_did_not_write_are_not_events() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let app = writer(&pg).await;
    let rx = Receiver::start().await.unwrap();
    readme_endpoints(&client, &rx).await;
    add_endpoint(&client, &rx.url("/all"), &["*"]).await;
    let daemon = Daemon::start(pg.config());
    wait_publishing(&client).await;

    let denied = |sql: &'static str, who: &'static Client| async move {
        let err = who.batch_execute(sql).await.expect_err(sql);
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {err:?}"
        );
    };
    let app: &'static Client = Box::leak(Box::new(app));
    denied("select prefix from walhook.publish_settings", app).await;
    denied("select nextval('walhook.outbox_id_seq')", app).await;
    client
        .batch_execute("create role stranger login")
        .await
        .unwrap();
    let stranger: &'static Client = Box::leak(Box::new(pg.client_as("stranger").await));
    denied("select walhook.publish('order.created', '{}')", stranger).await;

    // the outbox's checks, with the same messages as an insert
    for (event_type, payload, extra) in [
        ("walhook.endpoint.disabled", "{}", ""),
        ("not a type", "{}", ""),
        ("order.created", "{}", ", tenant => ''"),
        ("order.created", "{}", ", traceparent => '00-bad'"),
    ] {
        let (tenant, traceparent) = match extra {
            ", tenant => ''" => ("''", "null"),
            ", traceparent => '00-bad'" => ("null", "'00-bad'"),
            _ => ("null", "null"),
        };
        let by_publish = app
            .batch_execute(&format!(
                "select walhook.publish('{event_type}', '{payload}'{extra})"
            ))
            .await
            .expect_err("refused");
        let by_insert = app
            .batch_execute(&format!(
                "insert into walhook.outbox (event_type, payload, tenant, traceparent)
                 values ('{event_type}', '{payload}', {tenant}, {traceparent})"
            ))
            .await
            .expect_err("refused");
        assert_eq!(db_message(&by_publish), db_message(&by_insert));
    }
    let err = app
        .batch_execute("select walhook.publish('order.created', null)")
        .await
        .expect_err("a null payload");
    assert!(db_message(&err).contains("payload is null"), "{err:?}");
    // the payload limit follows set_max_payload_bytes, for both paths
    client
        .batch_execute("select walhook.set_max_payload_bytes(1024)")
        .await
        .unwrap();
    let big = format!("{{\"x\": \"{}\"}}", "y".repeat(2000));
    for sql in [
        "select walhook.publish('order.created', $1::text::jsonb)",
        "insert into walhook.outbox (event_type, payload) values ('order.created', $1::text::jsonb)",
    ] {
        let err = app.execute(sql, &[&big]).await.expect_err(sql);
        assert!(
            db_message(&err).contains("over the limit of 1024 bytes"),
            "{sql}: {err:?}"
        );
    }

    // messages publish() did not write, then the README's example as the writer
    let prefix: String = client
        .query_one("select prefix from walhook.publish_settings", &[])
        .await
        .unwrap()
        .get(0);
    let forged = "{\"id\":999999,\"uid\":\"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11\",\
                  \"created_at\":\"2026-11-29 20:18:59+00\",\"event_type\":\"order.created\"}\n\
                  {\"forged\": true}";
    for (prefix, transactional) in [
        ("walhook", true),
        ("walhook:00000000000000000000000000000000", true),
        (prefix.as_str(), false),
    ] {
        stranger
            .execute(
                "select pg_logical_emit_message($1, $2, $3)",
                &[&transactional, &prefix, &forged],
            )
            .await
            .unwrap();
    }
    client
        .execute(
            "select pg_logical_emit_message(true, $1, 'not an event')",
            &[&prefix],
        )
        .await
        .unwrap();
    run_readme_example(app).await;
    assert!(
        rx.wait_until(DEADLINE, |r| r.len() >= 3).await,
        "the README's two events, at their endpoints (and the order at the tenantless /all)"
    );
    // messages arrive in commit order: once this one is delivered, every earlier one was read
    publish_fn(app, "user.created", r#"{"last": true}"#).await;
    eventually("the last event arrives", || async {
        payloads(&rx, "/all")
            .iter()
            .any(|p| p.get("last").is_some())
    })
    .await;
    assert_eq!(rx.distinct_ids("/orders").len(), 1);
    assert_eq!(rx.distinct_ids("/acme").len(), 1);
    assert_eq!(rx.distinct_ids("/all").len(), 2, "no forged event");
    assert_eq!(
        count(&client, "select count(*) from walhook.outbox").await,
        0,
        "every event above was a message"
    );
    assert!(payloads(&rx, "/all")
        .iter()
        .all(|p| p.get("forged").is_none()));
    daemon.stop().await;
}

/// A slot that is still being created decodes no transaction that held an id when its creation began, whatever
/// walhook.slots says (a REPEATABLE READ snapshot taken before a re-creation still lists it as ready):
/// publish() in such a transaction inserts the row. Once the slot is consistent, publish() writes a message,
/// and the slot streams it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_being_created_gets_no_message_it_could_miss() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let mut app = writer(&pg).await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/a"), &["*"]).await;
    client
        .batch_execute("insert into walhook.slots (slot_name) values ('walhook')")
        .await
        .unwrap();
    // a transaction that holds an id before the slot's creation begins: the creation waits for it
    let tx = app.transaction().await.unwrap();
    tx.batch_execute("select pg_current_xact_id()")
        .await
        .unwrap();
    let creating = {
        let superuser = pg.client().await;
        tokio::spawn(async move {
            superuser
                .batch_execute("select pg_create_logical_replication_slot('walhook', 'pgoutput')")
                .await
        })
    };
    eventually("the slot exists and is not consistent yet", || async {
        count(
            &client,
            "select count(*) from pg_replication_slots
              where slot_name = 'walhook' and confirmed_flush_lsn is null",
        )
        .await
            == 1
    })
    .await;
    let during: i64 = tx
        .query_one("select walhook.publish('order.created', '{\"n\": 1}')", &[])
        .await
        .unwrap()
        .get(0);
    tx.commit().await.unwrap();
    creating.await.unwrap().expect("the slot is created");
    assert!(in_outbox(&client, during).await, "not consistent: a row");

    let after = publish_fn(&app, "order.created", r#"{"n": 2}"#).await;
    assert!(!in_outbox(&client, after).await, "consistent: a message");
    let daemon = Daemon::start(pg.config());
    eventually("the message is delivered", || async {
        payloads(&rx, "/a").contains(&serde_json::json!({ "n": 2 }))
    })
    .await;
    daemon.stop().await;
}

/// After a failover (PostgreSQL 15: the promoted standby has no logical slot), publish() inserts rows until
/// walhook has re-created its slot, so the recovery finds them, then writes messages again; every event is
/// delivered. (What the old primary's slot had not streamed of its messages is what a message gives up.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_publish_inserts_rows_until_the_slot_is_back() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let app = writer(&pg).await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/f"), &["*"]).await;
    let standby: walhook::cluster::Cluster =
        tokio::task::block_in_place(|| pg.cluster.start_standby()).expect("standby");
    // the standby first: every connection passes over it while it is one
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/app?target_session_attrs=read-write",
        standby.port(),
        pg.cluster.port()
    );
    let config = || {
        pg.config_with(|f| {
            f.merge(("database_url", url.as_str()))
                .merge(("replication.status_interval", "1s"))
        })
    };
    let daemon = Daemon::start(config());
    wait_publishing(&client).await;
    for i in 0..5 {
        let id = publish_fn(&app, "order.created", &format!("{{\"before\": {i}}}")).await;
        assert!(!in_outbox(&client, id).await);
    }
    wait_succeeded(&client, 5).await;
    eventually("the slot's timeline and progress are recorded", || async {
        count(
            &client,
            "select count(*) from walhook.slots where timeline = 1 and confirmed_at is not null",
        )
        .await
            == 1
    })
    .await;
    daemon.stop().await;
    let on_standby = walhook::store::connect_client(&standby.url("app").parse().unwrap())
        .await
        .unwrap();
    eventually("the standby has replayed the deliveries", || async {
        count(&on_standby, "select count(*) from walhook.deliveries").await == 5
    })
    .await;
    drop((client, app));
    tokio::task::block_in_place(|| pg.cluster.crash()).unwrap();
    tokio::task::block_in_place(|| standby.promote()).unwrap();

    // the slot did not come over: rows, which walhook's recovery queues when it starts
    let promoted = walhook::store::connect_client(&standby.url("app").parse().unwrap())
        .await
        .unwrap();
    let app_url = standby.url("app").replacen("postgres@", "app@", 1);
    let app = walhook::store::connect_client(&app_url.parse().unwrap())
        .await
        .unwrap();
    for i in 0..5 {
        let id = publish_fn(&app, "order.created", &format!("{{\"after\": {i}}}")).await;
        assert!(in_outbox(&promoted, id).await, "{}", slots(&promoted).await);
    }
    let daemon = Daemon::start(config());
    wait_succeeded(&promoted, 10).await;
    wait_publishing(&promoted).await;
    let id = publish_fn(&app, "order.created", r#"{"again": "message"}"#).await;
    assert!(
        !in_outbox(&promoted, id).await,
        "the slot is back: a message"
    );
    wait_succeeded(&promoted, 11).await;
    assert_eq!(rx.distinct_ids("/f").len(), 11);
    daemon.stop().await;
}

/// Upgrading keeps the payload limit an operator set before: publish() applies the outbox's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_takes_over_the_payload_limit_set_before() {
    let pg = Pg::start_unmigrated(ClusterOptions::default()).await;
    let mut client = pg.client().await;
    let before = walhook::schema::MigrateOptions {
        target: Some(14),
        ..Default::default()
    };
    walhook::schema::migrate_with(&mut client, &before)
        .await
        .unwrap();
    client
        .batch_execute("select walhook.set_max_payload_bytes(2048)")
        .await
        .unwrap();
    walhook::schema::migrate(&mut client).await.unwrap();
    assert_eq!(
        count(
            &client,
            "select max_payload_bytes::int8 from walhook.publish_settings"
        )
        .await,
        2048
    );
}
