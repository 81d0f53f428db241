//! End-to-end tests of the relay: a real PostgreSQL cluster per test, real HTTP receivers on loopback, the
//! real daemon (in-process, or the real binary as a child process for crash tests).
//!
//! What does not depend on where events come from (delivery, filtering, retries, crash safety, restarts,
//! redelivery, delivery policy) is written once as `async fn name(source: Source)` and run for both sources
//! by `both_sources!`: the replication slot on a `wal_level = logical` cluster, and the notify source on a
//! `wal_level = replica` one. Tests of one source's own machinery (the slot, or notify's claims and leases)
//! run for that source alone.

mod backfill;
mod browser;
mod catalog;
mod demo;
mod failover;
mod http2;
mod listen;
mod ops;
mod receivers;
mod scale;
mod schema;
mod startup;
mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::*;
use walhook::receiver::{Receiver, Reply};
use walhook::sign::Signer;

/// `both_sources!(name);` above `async fn name(source: Source)` makes two tests of it, `name::replication` and
/// `name::notify`. Attributes for one of them follow its name:
/// `both_sources!(name, notify: #[ignore = "why"]);`.
macro_rules! both_sources {
    ($name:ident $(, replication: $(#[$r:meta])+)? $(, notify: $(#[$n:meta])+)? $(,)?) => {
        mod $name {
            $($(#[$r])+)?
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn replication() {
                super::$name(super::Source::Replication).await
            }

            $($(#[$n])+)?
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn notify() {
                super::$name(super::Source::Notify).await
            }
        }
    };
}

// after the macro, which they use
mod connect;
mod portal;
mod proxy;
mod publish;
mod queries;
mod tenants;
mod traces;
mod trust;

both_sources!(committed_events_reach_every_matching_endpoint_once_signed);
async fn committed_events_reach_every_matching_endpoint_once_signed(source: Source) {
    let pg = Pg::start_for(source).await;
    let mut client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    let (a, secret_a) = add_endpoint(&client, &rx.url("/a"), &["*"]).await;
    let (b, secret_b) = add_endpoint(&client, &rx.url("/b"), &["order.*"]).await;
    rx.set_secret("/a", &secret_a);
    rx.set_secret("/b", &secret_b);
    let daemon = Daemon::start(pg.config_for(source));
    wait_ready(source, &client).await;

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
    if source == Source::Notify {
        wait_all_processed(&client).await;
    }
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
    // webhook-id is the row's uid, whichever source read the row
    let uid: String = client
        .query_one(
            "select replace(uid::text, '-', '') from walhook.outbox where event_type = 'order.created' order by id limit 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(rx.distinct_ids("/b").contains(&format!("msg_{uid}")));

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

both_sources!(rolled_back_events_are_never_delivered);
async fn rolled_back_events_are_never_delivered(source: Source) {
    let pg = Pg::start_for(source).await;
    let mut client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/all"), &["*"]).await;
    let daemon = Daemon::start(pg.config_for(source));
    wait_ready(source, &client).await;

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
    if source == Source::Notify {
        wait_all_processed(&client).await;
    }
    let received = rx.received();
    assert!(!received
        .iter()
        .any(|r| r.body.windows(11).any(|w| w == b"secret.plan")));
    assert_eq!(received.len(), 2);
    daemon.stop().await;
}

both_sources!(patterns_filter_and_endpoint_changes_apply_while_running);
async fn patterns_filter_and_endpoint_changes_apply_while_running(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    let (orders, _) = add_endpoint(
        &client,
        &rx.url("/orders"),
        &["order.created", "order.paid"],
    )
    .await;
    let daemon = Daemon::start(pg.config_for(source));
    wait_ready(source, &client).await;

    publish(&client, "order.created", "{}").await;
    publish(&client, "order.cancelled", "{}").await;
    publish(&client, "user.created", "{}").await;
    publish(&client, "order.paid", "{}").await;
    wait_succeeded(&client, 2).await;

    // an endpoint added while running receives the next events
    let (users, _) = add_endpoint(&client, &rx.url("/users"), &["user.*"]).await;
    // probes until one is delivered to it (counting every probe, so a slow one is not missed)
    eventually("the new endpoint takes effect", || async {
        publish(&client, "user.probe", "{}").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        count(
            &client,
            &format!("select count(*) from walhook.deliveries where endpoint_id = {users}"),
        )
        .await
            >= 1
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

both_sources!(failed_attempt_is_retried_and_both_attempts_recorded);
async fn failed_attempt_is_retried_and_both_attempts_recorded(source: Source) {
    let pg = Pg::start_for(source).await;
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
    let daemon = Daemon::start(pg.config_for(source));
    wait_ready(source, &client).await;
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

both_sources!(always_failing_delivery_goes_dead_and_redeliver_sends_it_again);
async fn always_failing_delivery_goes_dead_and_redeliver_sends_it_again(source: Source) {
    let pg = Pg::start_for(source).await;
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
    let daemon = Daemon::start(pg.config_for_with(source, |f| {
        f.merge(("delivery.retry_schedule", vec!["200ms", "200ms"]))
    }));
    wait_ready(source, &client).await;
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

both_sources!(receiver_down_at_start_gets_everything_once_up);
async fn receiver_down_at_start_gets_everything_once_up(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    // a free loopback port with nothing listening yet
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/late");
    add_endpoint(&client, &url, &["*"]).await;
    let daemon = Daemon::start(pg.config_for_with(source, |f| {
        f.merge(("delivery.retry_schedule", vec!["300ms"; 50]))
    }));
    wait_ready(source, &client).await;
    for i in 0..10 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    eventually("connection failures are recorded", || async {
        count(&client, "select count(*) from walhook.attempts where status_code is null and error like 'connection failed%'")
            .await
            >= 1
    })
    .await;
    let rx = Receiver::start_on(port).await.unwrap();
    wait_succeeded(&client, 10).await;
    assert_eq!(rx.distinct_ids("/late").len(), 10);
    daemon.stop().await;
}

both_sources!(events_committed_before_the_first_start_are_delivered);
async fn events_committed_before_the_first_start_are_delivered(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/early"), &["*"]).await;
    for i in 0..25 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    let daemon = Daemon::start(pg.config_for(source));
    wait_ready(source, &client).await;
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
        "no duplicates (replication: the snapshot splits backfill and stream exactly)"
    );
    if source == Source::Notify {
        wait_all_processed(&client).await;
    }
    daemon.stop().await;
}

both_sources!(a_huge_transaction_streams_under_a_small_in_flight_budget);
async fn a_huge_transaction_streams_under_a_small_in_flight_budget(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/bulk"), &["*"]).await;
    let daemon = Daemon::start(
        pg.config_for_with(source, |f| f.merge(("delivery.max_in_flight_events", 16))),
    );
    wait_ready(source, &client).await;
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

both_sources!(postgres_restart_under_the_daemon_loses_nothing);
async fn postgres_restart_under_the_daemon_loses_nothing(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/r"), &["*"]).await;
    let daemon = Daemon::start(pg.config_for(source));
    wait_ready(source, &client).await;
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
    if source == Source::Notify {
        wait_all_processed(&client).await;
    }
    assert_eq!(rx.distinct_ids("/r").len(), 40);
    // it took events again after the restart, and is ready for more
    wait_ready(source, &client).await;
    daemon.stop().await;
}

both_sources!(kill_9_mid_stream_loses_no_committed_event);
async fn kill_9_mid_stream_loses_no_committed_event(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/a"), &["*"]).await;
    add_endpoint(&client, &rx.url("/b"), &["order.*"]).await;
    let mut env = pg.env_for(source);
    if source == Source::Notify {
        // a killed daemon's claims lapse soon; small claims leave some rows claimed at every kill
        for (k, v) in [
            ("WALHOOK_NOTIFY__LEASE", "2s"),
            ("WALHOOK_NOTIFY__BATCH_SIZE", "20"),
        ] {
            env.push((k.to_string(), v.to_string()));
        }
    }
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
        let child = KillOnDrop(spawn_binary(&["run"], &env));
        // let it get going, then kill it at an arbitrary point
        let before = rx.count();
        assert!(
            rx.wait_until(DEADLINE, |r| r.len() > before + 20 + round * 7)
                .await
                || writer.is_finished(),
            "the daemon makes progress"
        );
        drop(child); // kill -9
    }
    writer.await.unwrap();
    let _child = KillOnDrop(spawn_binary(&["run"], &env));
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
    if source == Source::Notify {
        wait_all_processed(&client).await;
    }
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
    let (ok, _) = run(&[
        ("WALHOOK_DATABASE_URL", "postgres://u@localhost/db"),
        ("WALHOOK_HTTP__LISTEN", "off"),
    ]);
    assert!(ok);
    // the example file is valid, with database_url from the environment as under systemd (and a free port)
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walhook"))
        .args([
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/walhook.toml"),
            "check-config",
        ])
        .env(
            "WALHOOK_DATABASE_URL",
            "postgres://walhook@127.0.0.1:5432/app",
        )
        .env("WALHOOK_HTTP__LISTEN", "127.0.0.1:0")
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

both_sources!(healthz_answers_on_http_listen);
async fn healthz_answers_on_http_listen(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let daemon =
        Daemon::start(pg.config_for_with(source, |f| f.merge(("http.listen", listen.as_str()))));
    wait_ready(source, &client).await;
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

both_sources!(sigterm_drains_in_flight_deliveries_and_exits_zero);
async fn sigterm_drains_in_flight_deliveries_and_exits_zero(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    // every request takes a while, so some are in flight when the signal arrives
    rx.set_responder(|_, _| Reply::Delay(Duration::from_millis(300), 200));
    add_endpoint(&client, &rx.url("/slow"), &["*"]).await;
    let mut child = KillOnDrop(spawn_binary(&["run"], &pg.env_for(source)));
    wait_ready(source, &client).await;
    for i in 0..30 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    assert!(rx.wait_until(DEADLINE, |r| r.len() >= 5).await);
    // SAFETY: kill(2) with a pid we own
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let status = tokio::task::block_in_place(|| child.0.wait()).unwrap();
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
    if source == Source::Notify {
        // what is recorded was acknowledged before the exit (the slot's side is checked in ops)
        assert_eq!(
            count(
                &client,
                "select count(*) from walhook.outbox o where processed_at is null
                   and exists (select 1 from walhook.deliveries d where d.event_id = o.id)"
            )
            .await,
            0,
            "rows with recorded deliveries are marked processed"
        );
    }
    // and a restart delivers the rest
    let _child = KillOnDrop(spawn_binary(&["run"], &pg.env_for(source)));
    wait_succeeded(&client, 30).await;
    if source == Source::Notify {
        wait_all_processed(&client).await;
    }
}

both_sources!(replayed_events_already_recorded_are_not_sent_again);
async fn replayed_events_already_recorded_are_not_sent_again(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/once"), &["*"]).await;
    let daemon = Daemon::start(pg.config_for(source));
    wait_ready(source, &client).await;
    if source == Source::Replication {
        // a copy of the slot keeps today's position: streaming from it later replays everything below
        client
            .batch_execute("select pg_copy_logical_replication_slot('walhook', 'walhook_behind')")
            .await
            .unwrap();
    }
    for i in 0..40 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    wait_succeeded(&client, 40).await;
    if source == Source::Notify {
        wait_all_processed(&client).await;
    }
    daemon.stop().await;
    assert_eq!(rx.count(), 40);

    // the replay is checked against walhook.deliveries: nothing is sent twice
    let daemon = match source {
        Source::Replication => {
            let daemon = Daemon::start(
                pg.config_for_with(source, |f| f.merge(("replication.slot", "walhook_behind"))),
            );
            eventually("the daemon streams from the copy", || async {
                count(&client, "select count(*) from pg_replication_slots where slot_name = 'walhook_behind' and active")
                    .await
                    == 1
            })
            .await;
            daemon
        }
        Source::Notify => {
            // as if the marks had been lost: every row unprocessed and unclaimed, so it is claimed again
            client
                .batch_execute(
                    "update walhook.outbox set processed_at = null, claimed_until = null",
                )
                .await
                .unwrap();
            let daemon = Daemon::start(pg.config_for(source));
            wait_ready(source, &client).await;
            daemon
        }
    };
    let marker = publish(&client, "marker.done", "{}").await;
    eventually("the marker after the replayed events is delivered", || async {
        count(&client, &format!("select count(*) from walhook.deliveries where event_id = {marker} and status = 'succeeded'"))
            .await
            == 1
    })
    .await;
    if source == Source::Notify {
        // the rows claimed again were processed, without a request
        wait_all_processed(&client).await;
    }
    assert_eq!(rx.count(), 41, "only the marker was sent");
    daemon.stop().await;
}

// ---- delivery policy: HTTPS, network guard ----

both_sources!(https_endpoints_are_verified_against_the_configured_ca);
async fn https_endpoints_are_verified_against_the_configured_ca(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let tls = support::tls::TlsReceiver::start().await;
    add_endpoint(&client, &tls.url("localhost", "/secure"), &["trusted.*"]).await;
    add_endpoint(&client, &tls.url("127.0.0.1", "/by-ip"), &["trusted.*"]).await;
    let ca_file = tls.ca_file.display().to_string();
    let daemon = Daemon::start(
        pg.config_for_with(source, |f| f.merge(("delivery.ca_file", ca_file.as_str()))),
    );
    wait_ready(source, &client).await;
    publish(&client, "trusted.event", "{}").await;
    wait_succeeded(&client, 2).await;
    assert_eq!(tls.requests.load(std::sync::atomic::Ordering::SeqCst), 2);
    daemon.stop().await;

    // without the CA the certificate is not trusted: verification is always on
    let daemon =
        Daemon::start(pg.config_for_with(source, |f| f.merge(("delivery.tls_roots", "bundled"))));
    publish(&client, "trusted.event", "{}").await;
    eventually("the untrusted certificate fails the attempt", || async {
        count(
            &client,
            "select count(*) from walhook.attempts where error ilike '%certificate%'",
        )
        .await
            >= 2
    })
    .await;
    assert_eq!(tls.requests.load(std::sync::atomic::Ordering::SeqCst), 2);
    daemon.stop().await;
}

both_sources!(https_only_refuses_plain_http_endpoints);
async fn https_only_refuses_plain_http_endpoints(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/plain"), &["*"]).await;
    let daemon =
        Daemon::start(pg.config_for_with(source, |f| f.merge(("delivery.https_only", true))));
    wait_ready(source, &client).await;
    publish(&client, "order.created", "{}").await;
    eventually("the attempt fails with the reason", || async {
        count(
            &client,
            "select count(*) from walhook.attempts where error like '%delivery.https_only%'",
        )
        .await
            >= 1
    })
    .await;
    assert_eq!(rx.count(), 0);
    daemon.stop().await;
}

both_sources!(loopback_targets_are_refused_by_default_and_delivered_when_allowed);
async fn loopback_targets_are_refused_by_default_and_delivered_when_allowed(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/guarded"), &["*"]).await;
    add_endpoint(
        &client,
        &format!("http://localhost:{}/by-name", rx.port()),
        &["*"],
    )
    .await;
    add_endpoint(
        &client,
        &format!("http://[::ffff:127.0.0.1]:{}/mapped", rx.port()),
        &["*"],
    )
    .await;
    // the default policy: private networks refused
    let daemon = Daemon::start(pg.config_for_with(source, |f| {
        f.merge(("delivery.allow_private_networks", false))
    }));
    wait_ready(source, &client).await;
    publish(&client, "order.created", "{}").await;
    eventually("all three attempts are refused with the reason", || async {
        count(
            &client,
            "select count(*) from walhook.attempts where status_code is null
               and error like '%loopback%delivery.allow_private_networks%'",
        )
        .await
            >= 3
    })
    .await;
    assert_eq!(rx.count(), 0, "nothing was sent");
    daemon.stop().await;

    // an allow-listed network is delivered to (the pending retries go through)
    let daemon = Daemon::start(pg.config_for_with(source, |f| {
        f.merge(("delivery.allow_private_networks", false))
            .merge(("delivery.allowed_networks", vec!["127.0.0.0/8"]))
    }));
    wait_succeeded(&client, 3).await;
    assert_eq!(rx.count(), 3);
    daemon.stop().await;
}

// ---- delivery policy: per-endpoint settings, status handling, breaker, isolation ----

both_sources!(per_endpoint_timeout_schedule_and_headers_apply);
async fn per_endpoint_timeout_schedule_and_headers_apply(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    rx.set_responder(|r, _| {
        if r.path == "/slow" {
            Reply::Delay(Duration::from_secs(3), 200)
        } else {
            Reply::Status(200)
        }
    });
    let (slow, _) = add_endpoint(&client, &rx.url("/slow"), &["*"]).await;
    let (hdr, _) = add_endpoint(&client, &rx.url("/headers"), &["*"]).await;
    client
        .execute(
            "update walhook.endpoints set timeout = '200ms', retry_schedule = '{100ms}' where id = $1",
            &[&slow],
        )
        .await
        .unwrap();
    client
        .execute(
            "update walhook.endpoints set headers = '{\"x-api-key\": \"k-123\", \"authorization\": \"Bearer t\"}',
                    metadata = '{\"team\": \"billing\"}' where id = $1",
            &[&hdr],
        )
        .await
        .unwrap();
    // timeouts normally back off at least delivery.throttled_min_backoff (60 s)
    let daemon = Daemon::start(pg.config_for_with(source, |f| {
        f.merge(("delivery.throttled_min_backoff", "0s"))
    }));
    wait_ready(source, &client).await;
    publish(&client, "order.created", "{}").await;
    eventually("the slow endpoint's delivery is dead after its own schedule (2 attempts)", || async {
        count(&client, &format!("select count(*) from walhook.deliveries where endpoint_id = {slow} and status = 'dead' and attempts = 2")).await == 1
    })
    .await;
    let timeouts = count(
        &client,
        "select count(*) from walhook.attempts where error like 'timed out after 200ms%'",
    )
    .await;
    assert_eq!(timeouts, 2);
    let got = rx
        .received()
        .into_iter()
        .find(|r| r.path == "/headers")
        .unwrap();
    assert_eq!(got.headers["x-api-key"], "k-123");
    assert_eq!(got.headers["authorization"], "Bearer t");
    daemon.stop().await;
}

both_sources!(gone_disables_the_endpoint_and_retry_after_is_honoured);
async fn gone_disables_the_endpoint_and_retry_after_is_honoured(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    rx.set_responder(|r, seen| match (r.path.as_str(), seen) {
        ("/gone", _) => Reply::Status(410),
        ("/busy", 1) => Reply::Response {
            status: 429,
            headers: vec![("retry-after".into(), "2".into())],
            body: String::new(),
        },
        _ => Reply::Status(200),
    });
    let (gone, _) = add_endpoint(&client, &rx.url("/gone"), &["*"]).await;
    let (busy, _) = add_endpoint(&client, &rx.url("/busy"), &["*"]).await;
    let daemon = Daemon::start(pg.config_for_with(source, |f| {
        f.merge(("delivery.throttled_min_backoff", "0s"))
    }));
    wait_ready(source, &client).await;
    publish(&client, "order.created", "{}").await;
    eventually("410: the delivery is dead and the endpoint disabled with a reason", || async {
        let row = client
            .query_one(
                "select e.enabled, coalesce(e.disabled_reason, ''), d.status
                   from walhook.endpoints e join walhook.deliveries d on d.endpoint_id = e.id where e.id = $1",
                &[&gone],
            )
            .await;
        matches!(row, Ok(r) if !r.get::<_, bool>(0) && r.get::<_, String>(1).contains("410") && r.get::<_, String>(2) == "dead")
    })
    .await;
    // 429 with Retry-After: 2 on a 1 s schedule waits 2 s (clamped to [1 s, 2 s])
    eventually("the throttled delivery succeeds on its second attempt", || async {
        count(&client, &format!("select count(*) from walhook.deliveries where endpoint_id = {busy} and status = 'succeeded' and attempts = 2")).await == 1
    })
    .await;
    let gap: f64 = client
        .query_one(
            "select extract(epoch from max(a.attempted_at) - min(a.attempted_at))::float8
               from walhook.attempts a join walhook.deliveries d on d.id = a.delivery_id where d.endpoint_id = $1",
            &[&busy],
        )
        .await
        .unwrap()
        .get(0);
    assert!(gap >= 1.9, "waited {gap} s, Retry-After asked for 2");
    // re-enabling is an UPDATE, and it clears the reason
    client
        .execute(
            "update walhook.endpoints set enabled = true where id = $1",
            &[&gone],
        )
        .await
        .unwrap();
    let reason: Option<String> = client
        .query_one(
            "select disabled_reason from walhook.endpoints where id = $1",
            &[&gone],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(reason, None);
    daemon.stop().await;
}

both_sources!(an_open_breaker_parks_deliveries_without_using_attempts);
async fn an_open_breaker_parks_deliveries_without_using_attempts(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = healthy.clone();
    rx.set_responder(move |_, _| {
        if h.load(std::sync::atomic::Ordering::SeqCst) {
            Reply::Status(200)
        } else {
            Reply::Status(503)
        }
    });
    let (id, _) = add_endpoint(&client, &rx.url("/flaky"), &["*"]).await;
    let daemon = Daemon::start(pg.config_for_with(source, |f| {
        f.merge(("delivery.breaker_threshold", 3))
            .merge(("delivery.breaker_cooldown", "2s"))
            .merge(("delivery.breaker_max_cooldown", "2s"))
            .merge(("delivery.retry_schedule", vec!["100ms"; 20]))
            .merge(("delivery.max_in_flight_per_endpoint", 1))
    }));
    wait_ready(source, &client).await;
    // the breaker opens once retries fail too (the endpoint is down, not refusing new deliveries)
    for i in 0..5 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    eventually("the breaker is open in walhook.endpoint_health", || async {
        count(&client, &format!("select count(*) from walhook.endpoint_health where endpoint_id = {id} and breaker = 'open' and consecutive_failures >= 3")).await == 1
    })
    .await;
    let first_later = publish(&client, "order.created", "{\"later\": 0}").await;
    for i in 1..20 {
        publish(&client, "order.created", &format!("{{\"later\": {i}}}")).await;
    }
    eventually("every event is recorded", || async {
        count(&client, "select count(*) from walhook.deliveries").await == 25
    })
    .await;
    // far fewer attempts than deliveries: skipped requests consume none
    let attempts = count(
        &client,
        &format!(
            "select count(*) from walhook.attempts a join walhook.deliveries d on d.id = a.delivery_id
              where d.event_id >= {first_later}"
        ),
    )
    .await;
    assert!(
        attempts < 20,
        "{attempts} attempts for 20 deliveries behind an open breaker"
    );
    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_succeeded(&client, 25).await;
    assert_eq!(
        count(
            &client,
            &format!("select count(*) from walhook.deliveries where event_id >= {first_later} and attempts > 3")
        )
        .await,
        0
    );
    eventually("the breaker closes after the probe succeeds", || async {
        count(&client, &format!("select count(*) from walhook.endpoint_health where endpoint_id = {id} and breaker = 'closed' and successes_1h > 0")).await == 1
    })
    .await;
    daemon.stop().await;
}

both_sources!(a_hanging_or_throttled_endpoint_does_not_hold_others_or_the_slot_back);
async fn a_hanging_or_throttled_endpoint_does_not_hold_others_or_the_slot_back(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    rx.set_responder(|r, _| {
        if r.path == "/hang" {
            Reply::Hang
        } else {
            Reply::Status(200)
        }
    });
    let (hang, _) = add_endpoint(&client, &rx.url("/hang"), &["*"]).await;
    let (slow, _) = add_endpoint(&client, &rx.url("/throttled"), &["*"]).await;
    add_endpoint(&client, &rx.url("/healthy"), &["*"]).await;
    client
        .execute(
            "update walhook.endpoints set timeout = '5s', max_in_flight = 4 where id = $1",
            &[&hang],
        )
        .await
        .unwrap();
    client
        .execute(
            "update walhook.endpoints set rate_limit = 1 where id = $1",
            &[&slow],
        )
        .await
        .unwrap();
    let daemon = Daemon::start(
        pg.config_for_with(source, |f| f.merge(("delivery.retry_schedule", vec!["1h"]))),
    );
    wait_ready(source, &client).await;
    for i in 0..200 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    let end: String = client
        .query_one("select pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    // the healthy endpoint gets everything while the hanging one has not answered a single request
    assert!(
        rx.wait_until(DEADLINE, |r| r
            .iter()
            .filter(|r| r.path == "/healthy")
            .count()
            == 200)
            .await
    );
    assert_eq!(
        count(
            &client,
            "select count(*) from walhook.attempts where error like 'timed out%'"
        )
        .await,
        0,
        "the healthy endpoint finished before the first timeout"
    );
    match source {
        // the slot passes every event within about one request timeout
        Source::Replication => {
            eventually("the confirmed position passes the last event", || async {
                client
                    .query_one("select confirmed_flush_lsn >= $1::text::pg_lsn from pg_replication_slots where slot_name = 'walhook'", &[&end])
                    .await
                    .unwrap()
                    .get::<_, bool>(0)
            })
            .await
        }
        // every row is marked processed within about one request timeout
        Source::Notify => wait_all_processed(&client).await,
    }
    // the throttled endpoint got few requests so far, the rest wait in walhook.deliveries
    let throttled = rx
        .received()
        .iter()
        .filter(|r| r.path == "/throttled")
        .count();
    assert!(
        throttled < 200,
        "{throttled} requests to an endpoint limited to 1/s"
    );
    daemon.abort();
}

both_sources!(an_endpoint_that_has_answered_nothing_holds_only_its_first_window_of_requests);
/// The in-flight window (`fanout::Progress::window`): an endpoint that has answered nothing gets
/// `FIRST_WINDOW` (4) requests at a time, not its whole `max_in_flight` (32 by default), so hanging endpoints
/// leave the global request slots to the others.
async fn an_endpoint_that_has_answered_nothing_holds_only_its_first_window_of_requests(
    source: Source,
) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    rx.set_responder(|r, _| {
        if r.path == "/hang" {
            Reply::Hang
        } else {
            Reply::Status(200)
        }
    });
    let (hang, _) = add_endpoint(&client, &rx.url("/hang"), &["*"]).await;
    add_endpoint(&client, &rx.url("/healthy"), &["*"]).await;
    // its requests outlast the test
    client
        .execute(
            "update walhook.endpoints set timeout = '10min' where id = $1",
            &[&hang],
        )
        .await
        .unwrap();
    let daemon = Daemon::start(pg.config_for(source));
    wait_ready(source, &client).await;
    let events = 40;
    for i in 0..events {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    assert!(
        rx.wait_until(DEADLINE, |r| r
            .iter()
            .filter(|r| r.path == "/healthy")
            .count()
            == events)
            .await
    );
    // 40 deliveries and a limit of 32, but only the first window went out
    let hung = rx.received().iter().filter(|r| r.path == "/hang").count();
    assert_eq!(hung, 4, "requests to an endpoint that has answered nothing");
    daemon.abort();
}

both_sources!(an_endpoint_that_leaves_half_of_its_requests_unanswered_keeps_flowing);
/// The window closes by one for each request left unanswered, never below its floor: an endpoint that
/// answers only some requests is slowed, never stopped. Every delivery gets its request, and every answered
/// one succeeds.
async fn an_endpoint_that_leaves_half_of_its_requests_unanswered_keeps_flowing(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    // about half of the deliveries get no answer
    let hangs = |id: &str| id.ends_with(['1', '3', '5', '7', '9', 'b', 'd', 'f']);
    rx.set_responder(move |r, _| {
        if hangs(&r.webhook_id) {
            Reply::Hang
        } else {
            Reply::Status(200)
        }
    });
    let (partly, _) = add_endpoint(&client, &rx.url("/partly"), &["*"]).await;
    client
        .execute(
            "update walhook.endpoints set timeout = '1s' where id = $1",
            &[&partly],
        )
        .await
        .unwrap();
    let daemon = Daemon::start(
        pg.config_for_with(source, |f| f.merge(("delivery.retry_schedule", vec!["1h"]))),
    );
    wait_ready(source, &client).await;
    let events = 40;
    for i in 0..events {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    let distinct = |r: &[walhook::receiver::Received]| {
        r.iter()
            .map(|r| r.webhook_id.clone())
            .collect::<HashSet<_>>()
    };
    assert!(
        rx.wait_until(DEADLINE, |r| distinct(r).len() == events)
            .await,
        "{} of {events} deliveries got a request",
        distinct(&rx.received()).len()
    );
    let answered = distinct(&rx.received())
        .iter()
        .filter(|id| !hangs(id))
        .count() as i64;
    eventually("every answered delivery is recorded as succeeded", || async {
        count(
            &client,
            &format!("select count(*) from walhook.deliveries where endpoint_id = {partly} and status = 'succeeded'"),
        )
        .await
            == answered
    })
    .await;
    daemon.abort();
}

both_sources!(an_endpoint_that_times_out_every_first_request_still_gets_every_delivery);
/// The first request of every delivery gets no answer (a receiver that warms up per event, say) and every
/// retry is answered: the window, the breaker and parking slow it down, and every delivery still succeeds on
/// its retry. (A timeout's retry waits `delivery.throttled_min_backoff`, 60 s by default; 1 s here.)
async fn an_endpoint_that_times_out_every_first_request_still_gets_every_delivery(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(HashSet::new()));
    let first = seen.clone();
    rx.set_responder(move |r, _| {
        if first.lock().unwrap().insert(r.webhook_id.clone()) {
            Reply::Hang
        } else {
            Reply::Status(200)
        }
    });
    let (id, _) = add_endpoint(&client, &rx.url("/warming"), &["*"]).await;
    client
        .execute(
            "update walhook.endpoints set timeout = '1s' where id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let daemon = Daemon::start(pg.config_for_with(source, |f| {
        f.merge(("delivery.throttled_min_backoff", "1s"))
    }));
    wait_ready(source, &client).await;
    for i in 0..40 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    wait_succeeded(&client, 40).await;
    daemon.abort();
}

// ---- signing: rotation and ed25519 ----

both_sources!(rotated_secrets_sign_side_by_side_during_the_grace_period);
async fn rotated_secrets_sign_side_by_side_during_the_grace_period(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    let (id, old) = add_endpoint(&client, &rx.url("/r"), &["*"]).await;
    let (sk, pk) = walhook::sign::Ed25519Signer::generate();
    client
        .execute(
            "update walhook.endpoints set signing_key = $2 where id = $1",
            &[&id, &sk],
        )
        .await
        .unwrap();
    let new: String = client
        .query_one("select walhook.rotate_secret($1)", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_ne!(new, old);
    let daemon = Daemon::start(pg.config_for(source));
    wait_ready(source, &client).await;
    publish(&client, "order.created", "{}").await;
    assert!(rx.wait_until(DEADLINE, |r| !r.is_empty()).await);
    let r = rx.received().remove(0);
    let sigs: Vec<&str> = r.signature.split(' ').collect();
    assert_eq!(
        sigs.iter().filter(|s| s.starts_with("v1,")).count(),
        2,
        "{}",
        r.signature
    );
    assert!(Signer::new(&new)
        .unwrap()
        .verify(&r.webhook_id, r.timestamp, &r.body, &r.signature));
    assert!(Signer::new(&old)
        .unwrap()
        .verify(&r.webhook_id, r.timestamp, &r.body, &r.signature));
    // the v1a signature verifies with the public key alone
    let v1a = sigs
        .iter()
        .find(|s| s.starts_with("v1a,"))
        .expect("a v1a signature");
    assert!(verify_ed25519(
        &pk,
        &r.webhook_id,
        r.timestamp,
        &r.body,
        &v1a[4..]
    ));

    // a rotation without grace drops the replaced secret at once (the first one keeps its 24 h grace)
    let newest: String = client
        .query_one("select walhook.rotate_secret($1, '0s')", &[&id])
        .await
        .unwrap()
        .get(0);
    eventually("the cache follows the rotation", || async {
        let before = rx.count();
        publish(&client, "order.created", "{}").await;
        rx.wait_until(DEADLINE, |r| r.len() > before).await;
        let last = rx.received().pop().unwrap();
        let verifies = |s: &str| {
            Signer::new(s).unwrap().verify(
                &last.webhook_id,
                last.timestamp,
                &last.body,
                &last.signature,
            )
        };
        verifies(&newest) && verifies(&old) && !verifies(&new)
    })
    .await;
    daemon.stop().await;
}

fn verify_ed25519(public: &str, id: &str, ts: i64, body: &[u8], sig_b64: &str) -> bool {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let key: [u8; 32] = b64
        .decode(public.strip_prefix("whpk_").unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let sig: [u8; 64] = b64.decode(sig_b64).unwrap().try_into().unwrap();
    let key = ed25519_dalek::VerifyingKey::from_bytes(&key).unwrap();
    let mut content = format!("{id}.{ts}.").into_bytes();
    content.extend_from_slice(body);
    key.verify_strict(&content, &ed25519_dalek::Signature::from_bytes(&sig))
        .is_ok()
}

// ---- ordered delivery ----

both_sources!(ordered_endpoints_get_each_key_in_commit_order_and_a_failure_holds_back_only_its_key);
async fn ordered_endpoints_get_each_key_in_commit_order_and_a_failure_holds_back_only_its_key(
    source: Source,
) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    // the first event of key "a" fails once
    rx.set_responder(|r, seen| {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
        if v["data"]["key"] == "a" && v["data"]["n"] == 0 && seen == 1 {
            Reply::Status(500)
        } else {
            Reply::Delay(Duration::from_millis(20), 200)
        }
    });
    let (id, _) = add_endpoint(&client, &rx.url("/ordered"), &["*"]).await;
    client
        .execute(
            "update walhook.endpoints set ordered = true where id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let daemon = Daemon::start(
        pg.config_for_with(source, |f| f.merge(("delivery.retry_schedule", vec!["5s"]))),
    );
    wait_ready(source, &client).await;
    for n in 0..8 {
        for key in ["a", "b", "c"] {
            client
                .execute(
                    "insert into walhook.outbox (event_type, payload, ordering_key) values ('item.changed', $1::text::jsonb, $2)",
                    &[&format!("{{\"key\": \"{key}\", \"n\": {n}}}"), &key],
                )
                .await
                .unwrap();
        }
    }
    wait_succeeded(&client, 24).await;
    let received = rx.received();
    let delivered: Vec<(String, i64)> = received
        .iter()
        .filter(|r| r.status_sent == 200)
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            (
                v["data"]["key"].as_str().unwrap().to_string(),
                v["data"]["n"].as_i64().unwrap(),
            )
        })
        .collect();
    for key in ["a", "b", "c"] {
        let order: Vec<i64> = delivered
            .iter()
            .filter(|d| d.0 == key)
            .map(|d| d.1)
            .collect();
        assert_eq!(
            order,
            (0..8).collect::<Vec<_>>(),
            "key {key} in commit order"
        );
    }
    // b and c were not held back by a's failure: all of them arrived before a's first event was retried
    let key_of = |r: &walhook::receiver::Received| {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        (
            v["data"]["key"].as_str().unwrap().to_string(),
            v["data"]["n"].as_i64().unwrap(),
        )
    };
    let a_retry = received
        .iter()
        .find(|r| r.status_sent == 200 && key_of(r) == ("a".into(), 0))
        .unwrap()
        .arrived;
    for key in ["b", "c"] {
        let last = received
            .iter()
            .filter(|r| key_of(r).0 == key)
            .map(|r| r.arrived)
            .max()
            .unwrap();
        assert!(last < a_retry, "key {key} was held back by key a's failure");
    }
    daemon.stop().await;
}

// ---- least privilege and payload limits ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_payloads_and_reserved_headers_are_refused_at_insert() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let big = format!("{{\"blob\": \"{}\"}}", "x".repeat(300 * 1024));
    let err = client
        .execute("insert into walhook.outbox (event_type, payload) values ('big.event', $1::text::jsonb)", &[&big])
        .await
        .expect_err("over 256 KiB");
    let message = err.as_db_error().unwrap().message().to_string();
    assert!(
        message.contains("over the limit of 262144 bytes"),
        "{message}"
    );
    client
        .batch_execute("select walhook.set_max_payload_bytes(1048576)")
        .await
        .unwrap();
    client
        .execute("insert into walhook.outbox (event_type, payload) values ('big.event', $1::text::jsonb)", &[&big])
        .await
        .expect("within the raised limit");
    for (headers, needle) in [
        (r#"{"content-type": "text/plain"}"#, "cannot be set"),
        (r#"{"Webhook-Id": "x"}"#, "cannot be set"),
        (r#"{"host": "x"}"#, "cannot be set"),
        (r#"{"x-ok": "line\nbreak"}"#, "single-line"),
        (r#"{"bad name": "x"}"#, "invalid header name"),
    ] {
        let err = client
            .execute(
                "insert into walhook.endpoints (url, headers) values ('https://example.com/h', $1::text::jsonb)",
                &[&headers],
            )
            .await
            .expect_err(headers);
        let message = err.as_db_error().unwrap().message().to_string();
        assert!(message.contains(needle), "{headers}: {message}");
    }
    let err = client
        .batch_execute("insert into walhook.endpoints (url, signing_key) values ('https://example.com/k', 'whsk_AAAA')")
        .await
        .unwrap_err();
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .contains("walhook keygen"));
}

both_sources!(an_endpoint_failing_for_longer_than_disable_after_is_disabled);
async fn an_endpoint_failing_for_longer_than_disable_after_is_disabled(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    rx.set_responder(|_, _| Reply::Status(500));
    let (id, _) = add_endpoint(&client, &rx.url("/down"), &["*"]).await;
    let daemon = Daemon::start(pg.config_for_with(source, |f| {
        f.merge(("delivery.disable_after", "1s"))
            .merge(("delivery.retry_schedule", vec!["200ms"; 30]))
    }));
    wait_ready(source, &client).await;
    publish(&client, "order.created", "{}").await;
    eventually("the endpoint is disabled with the reason", || async {
        let r = client
            .query_one("select enabled, coalesce(disabled_reason, '') from walhook.endpoints where id = $1", &[&id])
            .await
            .unwrap();
        !r.get::<_, bool>(0) && r.get::<_, String>(1).contains("failing continuously")
    })
    .await;
    daemon.stop().await;
}

// ----------------------------------------------------------------------------------------------------------
// source = "notify" alone: its own machinery, on clusters with wal_level = replica (no logical replication
// at all). Rows are claimed under a lease with SKIP LOCKED, marked processed once their deliveries are
// recorded, and a trigger's NOTIFY wakes the poller early. What it shares with the slot runs above, for both.
// ----------------------------------------------------------------------------------------------------------

fn has_type(r: &walhook::receiver::Received, event_type: &str) -> bool {
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    body["type"] == event_type
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_source_delivers_signed_events_without_logical_replication_or_replication_role() {
    let pg = Pg::start_for(Source::Notify).await;
    let mut client = pg.client().await;
    // a role that may not replicate and is no superuser; owning the outbox lets it create index and trigger
    client
        .batch_execute(
            "create role app_user login in role walhook_daemon;
             grant usage, create on schema walhook to app_user;
             alter table walhook.outbox owner to app_user;",
        )
        .await
        .unwrap();
    let exists =
        "select count(*) from pg_class where oid = to_regclass('walhook.outbox_unprocessed')";
    let trigger = "select count(*) from pg_trigger where tgname = 'outbox_wake'";
    assert_eq!(count(&client, exists).await, 0, "migrate leaves no index");
    assert_eq!(
        count(&client, trigger).await,
        0,
        "migrate leaves no trigger"
    );

    let rx = Receiver::start().await.unwrap();
    let (a, secret_a) = add_endpoint(&client, &rx.url("/a"), &["order.*", "user.*"]).await;
    let (b, secret_b) = add_endpoint(&client, &rx.url("/b"), &["order.*"]).await;
    rx.set_secret("/a", &secret_a);
    rx.set_secret("/b", &secret_b);
    let url = pg.url.replacen("postgres@", "app_user@", 1);
    let daemon = Daemon::start(
        pg.config_for_with(Source::Notify, |f| f.merge(("database_url", url.as_str()))),
    );
    wait_listening(&client, 1).await;
    assert_eq!(
        count(&client, exists).await,
        1,
        "the notify source creates its index"
    );
    assert_eq!(count(&client, trigger).await, 1, "and its trigger");

    for i in 0..20 {
        publish(&client, "order.created", &format!("{{\"n\": {i}}}")).await;
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
    // matches no endpoint: marked processed all the same
    let unmatched = publish(&client, "audit.logged", "{}").await;

    wait_succeeded(&client, 70).await;
    wait_all_processed(&client).await;
    assert_eq!(rx.distinct_ids("/a").len(), 50);
    assert_eq!(rx.distinct_ids("/b").len(), 20);
    let received = rx.received();
    assert_eq!(received.len(), 70, "exactly once per (endpoint, event)");
    assert!(
        received.iter().all(|r| r.verified == Some(true)),
        "every signature verifies"
    );
    let first = received.iter().find(|r| r.path == "/b").unwrap();
    let body: serde_json::Value = serde_json::from_slice(&first.body).unwrap();
    assert_eq!(body["type"], "order.created");
    assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
    assert!(Signer::new(&secret_b).unwrap().verify(
        &first.webhook_id,
        first.timestamp,
        &first.body,
        &first.signature
    ));
    assert!(rx.distinct_ids("/b").is_subset(&rx.distinct_ids("/a")));
    // webhook-id is the row's uid, as with the replication source
    let uid: String = client
        .query_one(
            "select replace(uid::text, '-', '') from walhook.outbox where event_type = 'order.created' order by id limit 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(rx.distinct_ids("/b").contains(&format!("msg_{uid}")));
    assert_eq!(
        count(
            &client,
            &format!("select count(*) from walhook.deliveries where endpoint_id in ({a}, {b}) and attempts = 1")
        )
        .await,
        70
    );
    assert_eq!(
        count(
            &client,
            &format!("select count(*) from walhook.deliveries where event_id = {unmatched}")
        )
        .await,
        0
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_source_skips_rolled_back_rows_and_waits_for_late_commits() {
    let pg = Pg::start_for(Source::Notify).await;
    let mut client = pg.client().await;
    let other = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/all"), &["*"]).await;
    let daemon = Daemon::start(pg.config_for(Source::Notify));
    wait_listening(&client, 1).await;

    let tx = client.transaction().await.unwrap();
    tx.execute(
        "insert into walhook.outbox (event_type, payload) values ('secret.plan', '{}')",
        &[],
    )
    .await
    .unwrap();
    tx.rollback().await.unwrap();
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

    // a row with a lower id that commits after a higher one is still delivered: there is no id cursor
    let slow = client.transaction().await.unwrap();
    let slow_id: i64 = slow
        .query_one(
            "insert into walhook.outbox (event_type, payload) values ('slow.commit', '{}') returning id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let fast_id = publish(&other, "fast.commit", "{}").await;
    assert!(slow_id < fast_id);
    assert!(
        rx.wait_until(DEADLINE, |r| r.iter().any(|r| has_type(r, "fast.commit")))
            .await
    );
    slow.commit().await.unwrap();
    assert!(
        rx.wait_until(DEADLINE, |r| r.iter().any(|r| has_type(r, "slow.commit")))
            .await
    );
    // a marker committed last: once it arrives, everything before it has been claimed
    publish(&client, "marker.done", "{}").await;
    assert!(
        rx.wait_until(DEADLINE, |r| r.iter().any(|r| has_type(r, "marker.done")))
            .await
    );
    wait_succeeded(&client, 4).await;
    wait_all_processed(&client).await;
    let received = rx.received();
    assert!(!received.iter().any(|r| has_type(r, "secret.plan")));
    assert_eq!(received.len(), 4);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_notify_daemons_share_the_outbox_without_duplicates() {
    let pg = Pg::start_for(Source::Notify).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/s"), &["*"]).await;
    // small claims and slowish answers, so both daemons have work in flight at once
    rx.set_responder(|_, _| Reply::Delay(Duration::from_millis(20), 200));
    let config = || pg.config_for_with(Source::Notify, |f| f.merge(("notify.batch_size", 10)));
    let first = Daemon::start(config());
    let second = Daemon::start(config());
    wait_listening(&client, 2).await;
    for batch in 0..30 {
        client
            .execute(
                "insert into walhook.outbox (event_type, payload)
                 select 'order.created', jsonb_build_object('n', $1::int * 10 + n) from generate_series(1, 10) n",
                &[&batch],
            )
            .await
            .unwrap();
    }
    wait_succeeded(&client, 300).await;
    wait_all_processed(&client).await;
    assert_eq!(rx.distinct_ids("/s").len(), 300);
    assert_eq!(rx.count(), 300, "no crash, so no duplicates");
    first.stop().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_wake_trigger_polling_alone_delivers_everything() {
    let pg = Pg::start_for(Source::Notify).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/n"), &["*"]).await;
    let trigger = "select count(*) from pg_trigger where tgname = 'outbox_wake'";
    // a first start creates the trigger; notify.wake_trigger = false drops it
    let daemon = Daemon::start(pg.config_for(Source::Notify));
    wait_listening(&client, 1).await;
    assert_eq!(count(&client, trigger).await, 1);
    daemon.stop().await;
    // the first daemon's listening session may outlive it for a moment: wait until it is gone
    eventually("the first daemon's listener has left", || async {
        count(
            &client,
            "select count(*) from pg_stat_activity where query = 'listen walhook_outbox'",
        )
        .await
            == 0
    })
    .await;
    let daemon = Daemon::start(pg.config_for_with(Source::Notify, |f| {
        f.merge(("notify.wake_trigger", false))
            .merge(("notify.poll_interval", "100ms"))
    }));
    wait_listening(&client, 1).await;
    assert_eq!(count(&client, trigger).await, 0, "the trigger is dropped");
    for i in 0..20 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    wait_succeeded(&client, 20).await;
    wait_all_processed(&client).await;
    assert_eq!(rx.distinct_ids("/n").len(), 20);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_wakes_the_notify_poller() {
    let pg = Pg::start_for(Source::Notify).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/n"), &["*"]).await;
    // polls alone would come 30 s apart
    let daemon = Daemon::start(
        pg.config_for_with(Source::Notify, |f| f.merge(("notify.poll_interval", "30s"))),
    );
    wait_listening(&client, 1).await;
    for n in 1..=2 {
        publish(&client, "order.created", "{}").await;
        assert!(
            rx.wait_until(Duration::from_secs(10), |r| r.len() == n)
                .await,
            "the NOTIFY of insert {n} woke the poller"
        );
    }
    wait_all_processed(&client).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_delivery_keeps_its_row_leased() {
    let pg = Pg::start_for(Source::Notify).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/slow"), &["*"]).await;
    rx.set_responder(|_, _| Reply::Hang);
    let daemon = Daemon::start(pg.config_for_with(Source::Notify, |f| {
        f.merge(("notify.lease", "1s"))
            .merge(("delivery.timeout", "60s"))
    }));
    wait_listening(&client, 1).await;
    let id = publish(&client, "order.created", "{}").await;
    assert!(rx.wait_until(DEADLINE, |r| r.len() == 1).await);
    let lease = format!("select claimed_until::text from walhook.outbox where id = {id}");
    let first: String = client.query_one(&lease, &[]).await.unwrap().get(0);
    let renewed = format!(
        "select count(*) from walhook.outbox where id = {id} and claimed_until > '{first}'::timestamptz"
    );
    eventually("the lease is renewed while the request hangs", || async {
        count(&client, &renewed).await == 1
    })
    .await;
    assert_eq!(
        count(
            &client,
            &format!(
                "select count(*) from walhook.outbox where id = {id} and processed_at is null"
            )
        )
        .await,
        1,
        "not processed while its delivery is unrecorded"
    );
    // the receiver goes away: the attempt fails, is recorded as pending, and only then is the row processed
    rx.shutdown().await;
    wait_all_processed(&client).await;
    assert_eq!(
        count(
            &client,
            &format!("select count(*) from walhook.deliveries where event_id = {id} and status = 'pending'")
        )
        .await,
        1
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notify_backlog_is_claimed_within_the_in_flight_budget() {
    let pg = Pg::start_for(Source::Notify).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/bulk"), &["*"]).await;
    client
        .batch_execute(
            "insert into walhook.outbox (event_type, payload)
             select 'bulk.item', jsonb_build_object('n', n) from generate_series(1, 2000) n",
        )
        .await
        .unwrap();
    let daemon = Daemon::start(pg.config_for_with(Source::Notify, |f| {
        f.merge(("delivery.max_in_flight_events", 16))
    }));
    // leased and unprocessed: at most the budget in flight plus what became ready since the last marking
    let leased =
        "select count(*) from walhook.outbox where processed_at is null and claimed_until > now()";
    eventually("the backlog is delivered", || async {
        let n = count(&client, leased).await;
        assert!(n <= 32, "{n} rows leased at once with a budget of 16");
        count(
            &client,
            "select count(*) from walhook.deliveries where status = 'succeeded'",
        )
        .await
            == 2000
    })
    .await;
    wait_all_processed(&client).await;
    assert_eq!(rx.distinct_ids("/bulk").len(), 2000);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_whose_backfill_never_finished_is_created_again() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/gap"), &["*"]).await;
    for i in 0..10 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    // as if an earlier start created the slot and died before queuing the rows committed before it
    client
        .batch_execute(
            "select pg_create_logical_replication_slot('walhook', 'pgoutput');
             insert into walhook.slots (slot_name, backfilled) values ('walhook', false);",
        )
        .await
        .unwrap();
    for i in 10..15 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    let daemon = Daemon::start(pg.config());
    wait_streaming(&client).await;
    wait_succeeded(&client, 15).await;
    assert_eq!(rx.distinct_ids("/gap").len(), 15);
    assert_eq!(
        count(
            &client,
            "select count(*) from walhook.slots where backfilled"
        )
        .await,
        1
    );
    daemon.stop().await;
}
