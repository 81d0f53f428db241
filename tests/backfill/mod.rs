//! The first start's backfill: outbox rows committed before the slot existed, read under its snapshot and
//! fanned out through the pipeline (`src/source/backfill.rs`). Delivered once per (event, endpoint) under a
//! small events budget, by the same rule as the SQL backfill, in key order before streamed events, through a
//! partly failing receiver, and across `kill -9`s in the middle of it.

use std::collections::HashMap;

use crate::support::*;
use walhook::receiver::{Receiver, Reply};

/// `n` events committed in one statement: every other one `order.created`, the rest `user.created`.
async fn commit_backlog(client: &tokio_postgres::Client, n: i64) {
    client
        .execute(
            "insert into walhook.outbox (event_type, payload)
             select case when i % 2 = 0 then 'order.created' else 'user.created' end,
                    jsonb_build_object('i', i)
               from generate_series(0, $1::bigint - 1) i",
            &[&n],
        )
        .await
        .unwrap();
}

async fn backfilled(client: &tokio_postgres::Client) -> bool {
    count(
        client,
        "select count(*) from walhook.slots where slot_name = 'walhook' and backfilled",
    )
    .await
        == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_backfill_is_delivered_once_per_event_and_endpoint() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/all"), &["*"]).await;
    add_endpoint(&client, &rx.url("/orders"), &["order.*"]).await;
    let (off, _) = add_endpoint(&client, &rx.url("/off"), &["*"]).await;
    client
        .execute(
            "update walhook.endpoints set enabled = false where id = $1",
            &[&off],
        )
        .await
        .unwrap();
    commit_backlog(&client, 6_000).await;
    // rows the notify source already processed (their deliveries are recorded) are not backfilled
    client
        .batch_execute(
            "insert into walhook.outbox (event_type, payload, processed_at)
             select 'order.created', '{}', now() from generate_series(1, 10)",
        )
        .await
        .unwrap();
    // a budget far below the backlog: reading waits for deliveries to be recorded
    let daemon = Daemon::start(pg.config_with(|f| f.merge(("delivery.max_in_flight_events", 64))));
    // (the slot shows active while the connection that created it exports its snapshot, so wait for the mark)
    eventually("the backfill is recorded", || backfilled(&client)).await;
    for i in 0..10 {
        publish(&client, "order.created", &format!("{{\"late\": {i}}}")).await;
    }
    wait_succeeded(&client, 6_000 + 3_000 + 2 * 10).await;
    assert_eq!(rx.distinct_ids("/all").len(), 6_010);
    assert_eq!(rx.distinct_ids("/orders").len(), 3_010);
    assert_eq!(rx.distinct_ids("/off").len(), 0);
    assert_eq!(rx.count(), 9_020, "no delivery sent twice");
    assert_eq!(
        count(
            &client,
            "select count(*) from walhook.deliveries where status <> 'succeeded'"
        )
        .await,
        0
    );
    daemon.stop().await;
}

/// The backfill fans out by the rule the SQL backfill applies (tenants, filters, firehose endpoints): the same
/// (event, endpoint) pairs, with the event's tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backfill_fans_out_by_the_sql_rule() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    for (path, tenant, all, filter, types) in [
        ("/a", Some("acme"), false, None, "{*}"),
        (
            "/g",
            Some("globex"),
            false,
            Some("{\"region\": \"eu\"}"),
            "{*}",
        ),
        ("/ops", None, true, None, "{order.*}"),
        ("/none", None, false, None, "{*}"),
    ] {
        client
            .execute(
                "insert into walhook.endpoints (url, tenant, all_tenants, filter, event_types)
                 values ($1, $2, $3, $4::text::jsonb, $5::text::text[])",
                &[&rx.url(path), &tenant, &all, &filter, &types],
            )
            .await
            .unwrap();
    }
    client
        .batch_execute(
            "insert into walhook.outbox (event_type, payload, tenant) values
               ('order.created', '{\"region\": \"eu\"}', 'acme'),
               ('order.created', '{\"region\": \"eu\"}', 'globex'),
               ('order.created', '{\"region\": \"us\"}', 'globex'),
               ('user.created', '{}', null);",
        )
        .await
        .unwrap();
    // what the SQL backfill queues under a snapshot of this outbox, then deleted again
    let pairs =
        "select string_agg(event_id || ':' || endpoint_id || ':' || coalesce(tenant, ''), ','
                                   order by event_id, endpoint_id)
                   from walhook.deliveries";
    let mut sql = pg.client().await;
    let exporter = pg.client().await;
    exporter
        .batch_execute("begin isolation level repeatable read")
        .await
        .unwrap();
    let snapshot: String = exporter
        .query_one("select pg_export_snapshot()", &[])
        .await
        .unwrap()
        .get(0);
    walhook::store::backfill_before_slot(&mut sql, &snapshot)
        .await
        .unwrap();
    let expected: Option<String> = sql.query_one(pairs, &[]).await.unwrap().get(0);
    sql.batch_execute("delete from walhook.deliveries")
        .await
        .unwrap();
    exporter.batch_execute("commit").await.unwrap();
    assert_eq!(
        expected.as_deref(),
        Some("1:1:acme,1:3:acme,2:2:globex,2:3:globex,3:3:globex,4:4:")
    );
    let daemon = Daemon::start(pg.config());
    wait_streaming(&client).await;
    wait_succeeded(&client, 6).await;
    let got: Option<String> = client.query_one(pairs, &[]).await.unwrap().get(0);
    assert_eq!(got, expected);
    daemon.stop().await;
}

/// An ordered endpoint gets each key's backfilled events in order, and before the key's streamed ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfilled_keys_keep_their_order_before_streamed_events() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    rx.set_record_bodies(true);
    let (id, _) = add_endpoint(&client, &rx.url("/ordered"), &["*"]).await;
    client
        .execute(
            "update walhook.endpoints set ordered = true where id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let insert = "insert into walhook.outbox (event_type, payload, ordering_key)
                  values ('item.changed', $1::text::jsonb, $2)";
    for n in 0..20 {
        for key in ["a", "b", "c"] {
            let payload = format!("{{\"key\": \"{key}\", \"n\": {n}}}");
            client.execute(insert, &[&payload, &key]).await.unwrap();
        }
    }
    let daemon = Daemon::start(pg.config());
    wait_streaming(&client).await;
    for n in 20..30 {
        for key in ["a", "b", "c"] {
            let payload = format!("{{\"key\": \"{key}\", \"n\": {n}}}");
            client.execute(insert, &[&payload, &key]).await.unwrap();
        }
    }
    wait_succeeded(&client, 90).await;
    let mut order: HashMap<String, Vec<i64>> = HashMap::new();
    for r in rx.received().iter().filter(|r| r.status_sent == 200) {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        order
            .entry(v["data"]["key"].as_str().unwrap().to_string())
            .or_default()
            .push(v["data"]["n"].as_i64().unwrap());
    }
    for key in ["a", "b", "c"] {
        assert_eq!(
            order[key],
            (0..30).collect::<Vec<_>>(),
            "key {key} in order"
        );
    }
    daemon.stop().await;
}

/// A receiver that fails a third of first attempts still gets every backfilled event (must-not-stop): the
/// failures are recorded pending and retried by the scheduler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partly_failing_receiver_gets_the_whole_backfill() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    rx.set_responder(|r, seen| {
        let fail = seen == 1 && r.webhook_id.bytes().map(u32::from).sum::<u32>() % 3 == 0;
        Reply::Status(if fail { 500 } else { 200 })
    });
    add_endpoint(&client, &rx.url("/flaky"), &["*"]).await;
    commit_backlog(&client, 1_500).await;
    let daemon = Daemon::start(pg.config_with(|f| {
        f.merge(("delivery.retry_schedule", vec!["200ms", "200ms", "200ms"]))
            .merge(("delivery.max_in_flight_events", 100))
    }));
    wait_succeeded(&client, 1_500).await;
    assert_eq!(rx.distinct_ids("/flaky").len(), 1_500);
    assert!(
        rx.count() > 1_500,
        "some first attempts failed and were retried"
    );
    assert!(backfilled(&client).await);
    daemon.stop().await;
}

/// `kill -9` in the middle of the backfill, three times: the next start creates the slot again, backfills
/// what was not recorded per (event, endpoint), and in the end every event reached every matching endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_backfill_loses_nothing() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/a"), &["*"]).await;
    add_endpoint(&client, &rx.url("/b"), &["order.*"]).await;
    let events = 20_000;
    commit_backlog(&client, events).await;
    let mut env = pg.env();
    // a small budget keeps the backfill going long enough to be killed in its middle
    env.push((
        "WALHOOK_DELIVERY__MAX_IN_FLIGHT_EVENTS".into(),
        "200".into(),
    ));
    for round in 0..3 {
        let child = KillOnDrop(spawn_binary(&["run"], &env));
        let before = count(&client, "select count(*) from walhook.deliveries").await;
        eventually("the backfill makes progress", || async {
            count(&client, "select count(*) from walhook.deliveries").await > before + 500
        })
        .await;
        drop(child); // kill -9
        assert!(
            !backfilled(&client).await,
            "round {round}: killed in the middle of the backfill"
        );
    }
    // some events have deliveries for one endpoint only: the next run completes them, pair by pair
    let _child = KillOnDrop(spawn_binary(&["run"], &env));
    wait_succeeded(&client, events + events / 2).await;
    assert!(backfilled(&client).await);
    assert_eq!(rx.distinct_ids("/a").len(), events as usize);
    assert_eq!(rx.distinct_ids("/b").len(), (events / 2) as usize);
    assert_eq!(
        count(
            &client,
            "select count(*) from walhook.deliveries where status <> 'succeeded'"
        )
        .await,
        0
    );
    // re-sent: at most what was in flight at each kill, never what was recorded
    let resent = rx.count() - (events + events / 2) as usize;
    assert!(resent <= 3 * 200 * 2, "{resent} requests sent twice");
}

/// Deliveries recorded before walhook set out to create its slot (another slot's, `walhook.recover`'s) leave
/// their event alone, as the SQL backfill did; only an unfinished backfill's own are completed pair by pair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_delivered_before_the_slot_are_left_alone() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    let (a, _) = add_endpoint(&client, &rx.url("/a"), &["*"]).await;
    add_endpoint(&client, &rx.url("/b"), &["*"]).await;
    commit_backlog(&client, 10).await;
    // event 1 went to /a under an earlier slot
    client
        .execute(
            "insert into walhook.deliveries (event_id, endpoint_id, webhook_id, status, created_at)
             select id, $1, uid, 'succeeded', now() - interval '1 minute' from walhook.outbox where id = 1",
            &[&a],
        )
        .await
        .unwrap();
    let daemon = Daemon::start(pg.config());
    // marked once every delivery it handed out is recorded: what is there now is all it did
    eventually("the backfill is recorded", || backfilled(&client)).await;
    assert_eq!(
        count(&client, "select count(*) from walhook.deliveries").await,
        1 + 2 * 9
    );
    wait_succeeded(&client, 1 + 2 * 9).await;
    assert_eq!(rx.distinct_ids("/a").len(), 9);
    assert_eq!(rx.distinct_ids("/b").len(), 9);
    daemon.stop().await;
}
