//! End-to-end tests of the relay: a real PostgreSQL cluster per test, real HTTP receivers on loopback, the
//! real daemon (in-process, or the real binary as a child process for crash tests).

mod ops;
mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::*;
use walhook::receiver::{Receiver, Reply};
use walhook::sign::Signer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_events_reach_every_matching_endpoint_once_signed() {
    let pg = Pg::start().await;
    let mut client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    let (a, secret_a) = add_endpoint(&client, &rx.url("/a"), &["*"]).await;
    let (b, secret_b) = add_endpoint(&client, &rx.url("/b"), &["order.*"]).await;
    rx.set_secret("/a", &secret_a);
    rx.set_secret("/b", &secret_b);
    let daemon = Daemon::start(pg.config());
    wait_streaming(&client).await;

    // several transactions: single events and a batch
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(publish(&client, "order.created", &format!("{{\"n\": {i}}}")).await);
    }
    let tx = client.transaction().await.unwrap();
    for i in 0..30 {
        tx.execute(
            "insert into walhook.outbox (event_type, payload) values ('user.created', $1::text::jsonb)",
            &[&format!("{{\"u\": {i}}}")],
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();

    wait_succeeded(&client, 70).await;
    assert_eq!(rx.distinct_ids("/a").len(), 50);
    assert_eq!(rx.distinct_ids("/b").len(), 20);
    let received = rx.received();
    assert!(
        received.iter().all(|r| r.verified == Some(true)),
        "every signature verifies"
    );
    // exactly once per (endpoint, event) in a clean run
    let pairs: HashSet<(String, String)> = received
        .iter()
        .map(|r| (r.path.clone(), r.webhook_id.clone()))
        .collect();
    assert_eq!(pairs.len(), received.len());

    // the envelope and the headers follow Standard Webhooks
    let first = received.iter().find(|r| r.path == "/b").unwrap();
    let body: serde_json::Value = serde_json::from_slice(&first.body).unwrap();
    assert_eq!(body["type"], "order.created");
    assert!(body["data"]["n"].is_number());
    assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
    assert!(first.webhook_id.starts_with("msg_") && !first.webhook_id.contains('.'));
    assert_eq!(first.headers["content-type"], "application/json");
    assert!(first.headers["user-agent"]
        .to_str()
        .unwrap()
        .starts_with("walhook/"));
    let signer = Signer::new(&secret_b).unwrap();
    assert!(signer.verify(
        &first.webhook_id,
        first.timestamp,
        &first.body,
        &first.signature
    ));

    // the same event has the same webhook-id at both endpoints
    let at_a: HashSet<String> = rx.distinct_ids("/a");
    assert!(rx.distinct_ids("/b").is_subset(&at_a));

    // every delivery has exactly one attempt row, with status code and duration
    assert_eq!(
        count(
            &client,
            "select count(*) from walhook.attempts where status_code = 200"
        )
        .await,
        70
    );
    assert_eq!(
        count(
            &client,
            &format!("select count(*) from walhook.deliveries where endpoint_id in ({a}, {b}) and attempts = 1")
        )
        .await,
        70
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_events_are_never_delivered() {
    let pg = Pg::start().await;
    let mut client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/all"), &["*"]).await;
    let daemon = Daemon::start(pg.config());
    wait_streaming(&client).await;

    let tx = client.transaction().await.unwrap();
    tx.execute(
        "insert into walhook.outbox (event_type, payload) values ('secret.plan', '{}')",
        &[],
    )
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    // a savepoint rolled back inside a committed transaction is not delivered either
    let tx = client.transaction().await.unwrap();
    tx.batch_execute(
        "savepoint s;
         insert into walhook.outbox (event_type, payload) values ('secret.plan', '{}');
         rollback to savepoint s;
         insert into walhook.outbox (event_type, payload) values ('public.plan', '{}');",
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    // a marker committed after: once it arrives, everything before it has been processed
    publish(&client, "marker.done", "{}").await;
    assert!(
        rx.wait_until(DEADLINE, |r| r
            .iter()
            .any(|r| r.body.windows(11).any(|w| w == b"marker.done")))
            .await
    );
    wait_succeeded(&client, 2).await;
    let received = rx.received();
    assert!(!received
        .iter()
        .any(|r| r.body.windows(11).any(|w| w == b"secret.plan")));
    assert_eq!(received.len(), 2);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patterns_filter_and_endpoint_changes_apply_while_running() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    let (orders, _) = add_endpoint(
        &client,
        &rx.url("/orders"),
        &["order.created", "order.paid"],
    )
    .await;
    let daemon = Daemon::start(pg.config());
    wait_streaming(&client).await;

    publish(&client, "order.created", "{}").await;
    publish(&client, "order.cancelled", "{}").await;
    publish(&client, "user.created", "{}").await;
    publish(&client, "order.paid", "{}").await;
    wait_succeeded(&client, 2).await;

    // an endpoint added while running receives the next events
    let (users, _) = add_endpoint(&client, &rx.url("/users"), &["user.*"]).await;
    eventually("the new endpoint takes effect", || async {
        let id = publish(&client, "user.probe", "{}").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        count(
            &client,
            &format!("select count(*) from walhook.deliveries where event_id = {id}"),
        )
        .await
            == 1
    })
    .await;
    // disabled: no more deliveries to it
    client
        .execute(
            "update walhook.endpoints set enabled = false where id = $1",
            &[&orders],
        )
        .await
        .unwrap();
    eventually("disabling takes effect", || async {
        let id = publish(&client, "order.created", "{}").await;
        let user = publish(&client, "user.created", "{}").await;
        // wait until the user event (committed after) is recorded, then check the order event
        let mut recorded = false;
        for _ in 0..100 {
            if count(
                &client,
                &format!("select count(*) from walhook.deliveries where event_id = {user}"),
            )
            .await
                == 1
            {
                recorded = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        recorded
            && count(
                &client,
                &format!("select count(*) from walhook.deliveries where event_id = {id}"),
            )
            .await
                == 0
    })
    .await;
    // deleted: likewise
    client
        .execute("delete from walhook.endpoints where id = $1", &[&users])
        .await
        .unwrap();
    eventually("deleting takes effect", || async {
        let id = publish(&client, "user.created", "{}").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        count(
            &client,
            &format!("select count(*) from walhook.deliveries where event_id = {id}"),
        )
        .await
            == 0
    })
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_attempt_is_retried_and_both_attempts_recorded() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    rx.set_responder(|_, seen| {
        if seen == 1 {
            Reply::StatusWithBody(500, "boom".into())
        } else {
            Reply::Status(200)
        }
    });
    let (_, secret) = add_endpoint(&client, &rx.url("/flaky"), &["*"]).await;
    rx.set_secret("/flaky", &secret);
    let daemon = Daemon::start(pg.config());
    wait_streaming(&client).await;
    let id = publish(&client, "order.created", "{\"id\": 1}").await;

    eventually("the retry succeeds", || async {
        count(
            &client,
            "select count(*) from walhook.deliveries where status = 'succeeded' and attempts = 2",
        )
        .await
            == 1
    })
    .await;
    let rows = client
        .query(
            "select attempt, status_code, response_body from walhook.attempts order by attempt",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].get::<_, Option<i32>>(1), Some(500));
    assert_eq!(rows[0].get::<_, Option<String>>(2).as_deref(), Some("boom"));
    assert_eq!(rows[1].get::<_, Option<i32>>(1), Some(200));
    let received = rx.received();
    assert_eq!(received.len(), 2);
    assert_eq!(
        received[0].webhook_id, received[1].webhook_id,
        "same webhook-id on retry"
    );
    assert_eq!(received[0].body, received[1].body, "same body on retry");
    assert!(received.iter().all(|r| r.verified == Some(true)));
    // the retry copy is dropped once delivered
    assert_eq!(
        count(
            &client,
            &format!(
                "select count(*) from walhook.deliveries where event_id = {id} and payload is null"
            )
        )
        .await,
        1
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_failing_delivery_goes_dead_and_redeliver_sends_it_again() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = healthy.clone();
    rx.set_responder(move |_, _| {
        if h.load(std::sync::atomic::Ordering::SeqCst) {
            Reply::Status(204)
        } else {
            Reply::Status(503)
        }
    });
    add_endpoint(&client, &rx.url("/down"), &["*"]).await;
    let daemon = Daemon::start(
        pg.config_with(|f| f.merge(("delivery.retry_schedule", vec!["200ms", "200ms"]))),
    );
    wait_streaming(&client).await;
    publish(&client, "order.created", "{}").await;

    eventually("the delivery is dead after 3 attempts", || async {
        count(
            &client,
            "select count(*) from walhook.deliveries where status = 'dead' and attempts = 3",
        )
        .await
            == 1
    })
    .await;
    let last_error: String = client
        .query_one("select last_error from walhook.deliveries", &[])
        .await
        .unwrap()
        .get(0);
    assert!(last_error.contains("503"), "{last_error}");
    assert_eq!(
        count(&client, "select count(*) from walhook.attempts").await,
        3
    );

    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    let redone: i64 = client
        .query_one("select walhook.redeliver()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(redone, 1);
    eventually("the redelivered delivery succeeds", || async {
        count(
            &client,
            "select count(*) from walhook.deliveries where status = 'succeeded' and attempts = 4",
        )
        .await
            == 1
    })
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_down_at_start_gets_everything_once_up() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    // a free loopback port with nothing listening yet
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/late");
    add_endpoint(&client, &url, &["*"]).await;
    let daemon =
        Daemon::start(pg.config_with(|f| f.merge(("delivery.retry_schedule", vec!["300ms"; 50]))));
    wait_streaming(&client).await;
    for i in 0..10 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    eventually("connection failures are recorded", || async {
        count(&client, "select count(*) from walhook.attempts where status_code is null and error like 'connection failed%'")
            .await
            >= 10
    })
    .await;
    let rx = Receiver::start_on(port).await.unwrap();
    wait_succeeded(&client, 10).await;
    assert_eq!(rx.distinct_ids("/late").len(), 10);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_committed_before_the_first_start_are_delivered() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/early"), &["*"]).await;
    for i in 0..25 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    let daemon = Daemon::start(pg.config());
    wait_streaming(&client).await;
    for i in 25..40 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    eventually(
        "events from before and after the slot existed arrive",
        || async {
            count(
                &client,
                "select count(*) from walhook.deliveries where status = 'succeeded'",
            )
            .await
                == 40
        },
    )
    .await;
    assert_eq!(rx.distinct_ids("/early").len(), 40);
    assert_eq!(
        rx.count(),
        40,
        "no duplicates: the snapshot splits backfill and stream exactly"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_transaction_streams_under_a_small_in_flight_budget() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/bulk"), &["*"]).await;
    let daemon = Daemon::start(pg.config_with(|f| f.merge(("delivery.max_in_flight_events", 16))));
    wait_streaming(&client).await;
    client
        .batch_execute(
            "insert into walhook.outbox (event_type, payload)
             select 'bulk.item', jsonb_build_object('n', n) from generate_series(1, 3000) n",
        )
        .await
        .unwrap();
    wait_succeeded(&client, 3000).await;
    assert_eq!(rx.distinct_ids("/bulk").len(), 3000);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_under_the_daemon_loses_nothing() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/r"), &["*"]).await;
    let daemon = Daemon::start(pg.config());
    wait_streaming(&client).await;
    for i in 0..20 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    drop(client);
    let cluster = &pg.cluster;
    tokio::task::block_in_place(|| cluster.restart()).expect("restart postgres");
    let client = pg.client().await;
    for i in 20..40 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    wait_succeeded(&client, 40).await;
    assert_eq!(rx.distinct_ids("/r").len(), 40);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_no_committed_event() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/a"), &["*"]).await;
    add_endpoint(&client, &rx.url("/b"), &["order.*"]).await;
    let env = pg.env();
    let writer = {
        let url = pg.url.clone();
        tokio::spawn(async move {
            let client = walhook::store::connect_client(&url.parse().unwrap())
                .await
                .unwrap();
            for i in 0..600 {
                let t = if i % 2 == 0 {
                    "order.created"
                } else {
                    "user.created"
                };
                publish(&client, t, &format!("{{\"i\": {i}}}")).await;
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
    };
    for round in 0..4 {
        let mut child = spawn_binary(&["run"], &env);
        // let it get going, then kill it at an arbitrary point
        let before = rx.count();
        assert!(
            rx.wait_until(DEADLINE, |r| r.len() > before + 20 + round * 7)
                .await
                || writer.is_finished(),
            "the daemon makes progress"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }
    writer.await.unwrap();
    let mut child = spawn_binary(&["run"], &env);
    eventually(
        "every committed event delivered to every matching endpoint",
        || async {
            count(
                &client,
                "select count(*) from walhook.deliveries where status = 'succeeded'",
            )
            .await
                == 600 + 300
        },
    )
    .await;
    assert_eq!(rx.distinct_ids("/a").len(), 600);
    assert_eq!(rx.distinct_ids("/b").len(), 300);
    assert_eq!(
        count(
            &client,
            "select count(*) from walhook.deliveries where status <> 'succeeded'"
        )
        .await,
        0
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_rows_are_refused_with_clear_messages() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let refused = |sql: &'static str, needle: &'static str| {
        let client = &client;
        async move {
            let err = client.batch_execute(sql).await.expect_err(sql);
            let message = err
                .as_db_error()
                .map(|e| e.message().to_string())
                .unwrap_or_default();
            assert!(message.contains(needle), "{sql}: {message}");
        }
    };
    refused(
        "insert into walhook.endpoints (url) values ('ftp://example.com/x')",
        "absolute http:// or https://",
    )
    .await;
    refused(
        "insert into walhook.endpoints (url) values ('/relative/path')",
        "invalid endpoint url",
    )
    .await;
    refused(
        "insert into walhook.endpoints (url) values ('http://')",
        "invalid endpoint url",
    )
    .await;
    refused(
        "insert into walhook.endpoints (url, event_types) values ('http://127.0.0.1/x', '{}')",
        "event_types is empty",
    )
    .await;
    refused(
        "insert into walhook.endpoints (url, event_types) values ('http://127.0.0.1/x', '{\"order..x\"}')",
        "invalid event_types pattern",
    )
    .await;
    refused(
        "insert into walhook.endpoints (url, secret) values ('http://127.0.0.1/x', 'plain')",
        "whsec_",
    )
    .await;
    refused(
        "insert into walhook.endpoints (url, secret) values ('http://127.0.0.1/x', 'whsec_AAAA')",
        "decodes to 3 bytes",
    )
    .await;
    refused(
        "insert into walhook.outbox (event_type, payload) values ('', '{}')",
        "invalid event_type",
    )
    .await;
    refused(
        "insert into walhook.outbox (event_type, payload) values ('order created', '{}')",
        "invalid event_type",
    )
    .await;
    refused(
        "insert into walhook.outbox (event_type, payload) values ('order.', '{}')",
        "invalid event_type",
    )
    .await;

    // valid rows: a generated secret comes back with RETURNING
    let secret: String = client
        .query_one("insert into walhook.endpoints (url) values ('https://example.com/hook') returning secret", &[])
        .await
        .unwrap()
        .get(0);
    assert!(Signer::new(&secret).is_ok(), "generated secret is valid");
    client
        .batch_execute(
            "insert into walhook.endpoints (url, event_types, secret)
               values ('http://127.0.0.1:8080/x?y=1', '{order.*,user.created,*}', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
             insert into walhook.outbox (event_type, payload) values ('order.created_v2', '{\"a\": [1]}');",
        )
        .await
        .unwrap();
    // the SQL pattern function agrees with the daemon's matching
    let m: bool = client
        .query_one("select walhook.matches('order.paid', '{order.*}')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(m);
    let m: bool = client
        .query_one("select walhook.matches('order', '{order.*}')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent_and_safe_concurrently() {
    let pg = Pg::start().await; // already migrated once
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = pg.url.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = walhook::store::connect_client(&url.parse().unwrap())
                .await
                .unwrap();
            walhook::schema::migrate(&mut client).await.unwrap()
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap().is_empty(), "nothing left to apply");
    }
    // a fresh database migrated by several instances at once ends with one version row each
    let url = pg.cluster.create_database("fresh").await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = walhook::store::connect_client(&url.parse().unwrap())
                .await
                .unwrap();
            walhook::schema::migrate(&mut client).await.unwrap()
        }));
    }
    let mut applied = 0;
    for t in tasks {
        applied += t.await.unwrap().len();
    }
    assert_eq!(applied, walhook::schema::MIGRATIONS.len());
    // the binary does the same
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_walhook"))
        .arg("migrate")
        .env("WALHOOK_DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(status.status.success());
    assert!(String::from_utf8_lossy(&status.stdout).contains("up to date"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_reported_with_the_fix() {
    let pg = Pg::start_with(walhook::cluster::ClusterOptions {
        wal_level: walhook::cluster::WalLevel::Replica,
        ..Default::default()
    })
    .await;
    let daemon = Daemon::start(pg.config());
    let err = daemon.result().await.expect_err("must refuse to run");
    let text = err.to_string();
    assert!(
        text.contains("wal_level") && text.contains("wal_level = logical"),
        "{text}"
    );
    assert!(text.contains("notify"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_replication_is_told_how_to_fix_it() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    client
        .batch_execute(
            "create role app_user login;
             grant create on database app to app_user;
             grant usage, create on schema walhook to app_user;
             grant all on all tables in schema walhook to app_user;
             alter table walhook.outbox owner to app_user;",
        )
        .await
        .unwrap();
    let url = pg.url.replacen("postgres@", "app_user@", 1);
    let config = pg.config_with(|f| f.merge(("database_url", url.as_str())));
    let err = Daemon::start(config)
        .result()
        .await
        .expect_err("must refuse to run");
    let text = err.to_string();
    assert!(text.contains("ALTER ROLE app_user REPLICATION"), "{text}");
}

#[test]
fn invalid_configuration_names_the_key() {
    let run = |env: &[(&str, &str)]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_walhook"))
            .arg("check-config")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, err) = run(&[("WALHOOK_DELIVERY__TIMEOUT", "15 parsecs")]);
    assert!(!ok);
    assert!(err.contains("delivery.timeout"), "{err}");
    let (ok, err) = run(&[("WALHOOK_DELIVERY__TIMOUT", "15s")]);
    assert!(!ok);
    assert!(err.contains("delivery.timout"), "{err}");
    let (ok, err) = run(&[("WALHOOK_SOURCE", "kafka")]);
    assert!(!ok);
    assert!(
        err.contains("source") && err.contains("replication"),
        "{err}"
    );
    let (ok, _) = run(&[("WALHOOK_DATABASE_URL", "postgres://u@localhost/db")]);
    assert!(ok);
    // the example file is valid
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walhook"))
        .args([
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/walhook.toml"),
            "check-config",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // a missing file names the path
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walhook"))
        .args(["--config", "/nonexistent/walhook.toml", "check-config"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/walhook.toml"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_outbox_does_not_make_the_slot_retain_wal() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/x"), &["*"]).await;
    let daemon =
        Daemon::start(pg.config_with(|f| f.merge(("replication.status_interval", "200ms"))));
    wait_streaming(&client).await;
    publish(&client, "order.created", "{}").await;
    wait_succeeded(&client, 1).await;
    // other tables are written, the outbox is idle: the confirmed position must follow the server
    client
        .batch_execute("create table busy (n int)")
        .await
        .unwrap();
    let target: String = client
        .query_one("select pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    eventually("the slot's confirmed position passes WAL written to other tables", || async {
        client.batch_execute("insert into busy select generate_series(1, 100)").await.unwrap();
        client
            .query_one(
                "select confirmed_flush_lsn >= $1::text::pg_lsn from pg_replication_slots where slot_name = 'walhook'",
                &[&target],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_on_http_listen() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let daemon = Daemon::start(pg.config_with(|f| f.merge(("http.listen", listen.as_str()))));
    wait_streaming(&client).await;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_deliveries_and_exits_zero() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    // every request takes a while, so some are in flight when the signal arrives
    rx.set_responder(|_, _| Reply::Delay(Duration::from_millis(300), 200));
    add_endpoint(&client, &rx.url("/slow"), &["*"]).await;
    let mut child = spawn_binary(&["run"], &pg.env());
    wait_streaming(&client).await;
    for i in 0..30 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    assert!(rx.wait_until(DEADLINE, |r| r.len() >= 5).await);
    // SAFETY: kill(2) with a pid we own
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = tokio::task::block_in_place(|| child.wait()).unwrap();
    assert!(status.success(), "exit status {status:?}");
    // every request that reached the receiver before the exit has its outcome recorded
    let arrived = rx.distinct_ids("/slow").len() as i64;
    let recorded = count(
        &client,
        "select count(*) from walhook.deliveries where status = 'succeeded'",
    )
    .await;
    assert!(
        recorded >= arrived,
        "recorded {recorded} < answered {arrived}"
    );
    // and a restart delivers the rest
    let mut child = spawn_binary(&["run"], &pg.env());
    wait_succeeded(&client, 30).await;
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_events_already_recorded_are_not_sent_again() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/once"), &["*"]).await;
    let daemon = Daemon::start(pg.config());
    wait_streaming(&client).await;
    // a copy of the slot keeps today's position: streaming from it later replays everything below
    client
        .batch_execute("select pg_copy_logical_replication_slot('walhook', 'walhook_behind')")
        .await
        .unwrap();
    for i in 0..40 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    wait_succeeded(&client, 40).await;
    daemon.stop().await;
    assert_eq!(rx.count(), 40);

    // the replay from the copy is checked against walhook.deliveries: nothing is sent twice
    let daemon = Daemon::start(pg.config_with(|f| f.merge(("replication.slot", "walhook_behind"))));
    let marker = {
        eventually("the daemon streams from the copy", || async {
            count(&client, "select count(*) from pg_replication_slots where slot_name = 'walhook_behind' and active")
                .await
                == 1
        })
        .await;
        publish(&client, "marker.done", "{}").await
    };
    eventually("the marker after the replayed events is delivered", || async {
        count(&client, &format!("select count(*) from walhook.deliveries where event_id = {marker} and status = 'succeeded'"))
            .await
            == 1
    })
    .await;
    assert_eq!(rx.count(), 41, "only the marker was sent");
    daemon.stop().await;
}
