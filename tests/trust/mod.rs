//! Trust: the relay never wedges, never skips an event silently, and re-sends little after a crash.
//!
//! Each test here reproduces a failure found by trying walhook as a user would or by the reliability review
//! (issue "Trust"), and would fail without its fix: a replay that fills the in-flight budget, a server crash
//! re-sending what receivers already answered, an endpoint that answers half of its requests, rows the daemon
//! cannot use, disabled and paused endpoints, a poisoned batch.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::*;
use walhook::receiver::{Receiver, Reply};

/// Inserts `n` events of type `t` in one transaction.
async fn publish_many(client: &tokio_postgres::Client, t: &str, n: i64) {
    client
        .execute(
            "insert into walhook.outbox (event_type, payload)
             select $1, jsonb_build_object('n', n) from generate_series(1, $2::int8) n",
            &[&t, &n],
        )
        .await
        .unwrap();
}

/// A replay (after a crash, a takeover or a reconnect) holds budget permits for the events waiting for their
/// duplicate check; when those fill the budget, reading must go on rather than wait for itself. The copy of
/// the slot makes the replay deterministic: streaming from it replays everything recorded since.
async fn a_replay_that_fills_the_in_flight_budget_goes_on(endpoints: usize, budget: Option<usize>) {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    rx.set_record_bodies(false);
    for i in 0..endpoints {
        add_endpoint(&client, &rx.url(&format!("/e{i}")), &["*"]).await;
    }
    let daemon = Daemon::start(pg.config());
    wait_streaming(&client).await;
    client
        .batch_execute("select pg_copy_logical_replication_slot('walhook', 'walhook_behind')")
        .await
        .unwrap();
    // one large transaction (the stream always has the next message ready) and a few small ones
    publish_many(&client, "bulk.item", 1200).await;
    for i in 0..5 {
        publish(&client, "small.item", &format!("{{\"i\": {i}}}")).await;
    }
    let total = 1205 * endpoints as i64;
    wait_succeeded(&client, total).await;
    daemon.stop().await;
    let sent = rx.count();

    let daemon = Daemon::start(pg.config_with(|f| {
        let f = f.merge(("replication.slot", "walhook_behind"));
        match budget {
            Some(b) => f.merge(("delivery.max_in_flight_events", b)),
            None => f,
        }
    }));
    let marker = publish(&client, "marker.done", "{}").await;
    eventually("the marker after the replayed events is delivered", || async {
        count(
            &client,
            &format!(
                "select count(*) from walhook.deliveries where event_id = {marker} and status = 'succeeded'"
            ),
        )
        .await
            == endpoints as i64
    })
    .await;
    assert_eq!(
        rx.count(),
        sent + endpoints,
        "only the marker was sent: the replayed events were all recorded"
    );
    // and the copy's position passed the replay
    eventually("the replayed slot is confirmed past the marker", || async {
        count(
            &client,
            "select count(*) from pg_replication_slots
              where slot_name = 'walhook_behind' and confirmed_flush_lsn >= pg_current_wal_insert_lsn()",
        )
        .await
            == 1
    })
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_to_ten_endpoints_under_the_default_budget_goes_on() {
    a_replay_that_fills_the_in_flight_budget_goes_on(10, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_under_a_budget_of_64_goes_on() {
    a_replay_that_fills_the_in_flight_budget_goes_on(1, Some(64)).await;
}

/// The same, as a user met it: `kill -9` mid-stream, with ten endpoints or a budget of 64, then a restart.
async fn kill_9_mid_stream_then_every_event_is_delivered(endpoints: usize, budget: Option<usize>) {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    rx.set_record_bodies(false);
    for i in 0..endpoints {
        add_endpoint(&client, &rx.url(&format!("/e{i}")), &["*"]).await;
    }
    let mut env = pg.env();
    if let Some(b) = budget {
        env.push((
            "WALHOOK_DELIVERY__MAX_IN_FLIGHT_EVENTS".into(),
            b.to_string(),
        ));
    }
    // transactions of 1,000 events: one is confirmed only once all its deliveries are recorded, so the kill
    // leaves hundreds of recorded events to replay
    let events: i64 = 2000;
    let child = KillOnDrop(spawn_binary(&["run"], &env));
    wait_streaming(&client).await;
    for _ in 0..2 {
        publish_many(&client, "bulk.item", 1000).await;
    }
    let total = events * endpoints as i64;
    assert!(
        rx.wait_until(DEADLINE, |r| r.len() as i64 > total / 3)
            .await,
        "the daemon makes progress"
    );
    drop(child); // kill -9
    let _child = KillOnDrop(spawn_binary(&["run"], &env));
    eventually("every event delivered to every endpoint", || async {
        count(
            &client,
            "select count(*) from walhook.deliveries where status = 'succeeded'",
        )
        .await
            == total
    })
    .await;
    for i in 0..endpoints {
        assert_eq!(rx.distinct_ids(&format!("/e{i}")).len() as i64, events);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_ten_endpoints_then_delivery_resumes() {
    kill_9_mid_stream_then_every_event_is_delivered(10, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_a_budget_of_64_then_delivery_resumes() {
    kill_9_mid_stream_then_every_event_is_delivered(1, Some(64)).await;
}

/// A PostgreSQL crash mid-stream loses nothing, and what receivers already answered is not sent again:
/// re-sends stay within what was in flight when the server went away (the outcomes the recorder could not
/// write yet are written when the server is back, before the replay is checked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_crash_re_sends_no_more_than_was_in_flight() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    rx.set_record_bodies(false);
    // each request takes a moment, so a few are always in flight
    rx.set_responder(|_, _| Reply::Delay(Duration::from_millis(20), 200));
    add_endpoint(&client, &rx.url("/c"), &["*"]).await;
    let in_flight_limit = 16;
    let daemon = Daemon::start(
        pg.config_with(|f| f.merge(("delivery.max_in_flight_per_endpoint", in_flight_limit))),
    );
    wait_streaming(&client).await;
    drop(client);
    let writer = {
        let url = pg.url.clone();
        tokio::spawn(async move {
            let mut published = 0;
            let mut client: Option<tokio_postgres::Client> = None;
            while published < 3000 {
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    client = walhook::store::connect_client(&url.parse().unwrap())
                        .await
                        .ok();
                    if client.is_none() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
                let c = client.as_ref().unwrap();
                let ok = c
                    .execute(
                        "insert into walhook.outbox (event_type, payload)
                         select 'crash.item', '{}' from generate_series(1, 20)",
                        &[],
                    )
                    .await
                    .is_ok();
                if ok {
                    published += 20;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    assert!(
        rx.wait_until(DEADLINE, |r| r.len() > 500).await,
        "the daemon makes progress"
    );
    let cluster = &pg.cluster;
    tokio::task::block_in_place(|| cluster.crash_and_restart()).expect("crash postgres");
    writer.await.unwrap();
    let client = pg.client().await;
    wait_succeeded(&client, 3000).await;
    assert_eq!(rx.distinct_ids("/c").len(), 3000, "nothing lost");
    // requests per webhook-id beyond the first
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in rx.received() {
        *seen.entry(r.webhook_id).or_default() += 1;
    }
    let again: usize = seen.values().map(|n| n - 1).sum();
    assert!(
        again <= in_flight_limit * 2,
        "{again} requests were sent again after the crash; at most {in_flight_limit} were in flight"
    );
    daemon.stop().await;
}
