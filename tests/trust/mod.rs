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

/// The server's WAL insert position now (after what was just committed), as text.
async fn wal_position(client: &tokio_postgres::Client) -> String {
    client
        .query_one("select pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0)
}

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
    let after_marker = wal_position(&client).await;
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
            &format!(
                "select count(*) from pg_replication_slots
                  where slot_name = 'walhook_behind' and confirmed_flush_lsn >= '{after_marker}'"
            ),
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

// ---- an endpoint that answers part of its requests keeps flowing (item 1) ----

/// How a partly working receiver fails.
#[derive(Clone, Copy, Debug)]
enum Partly {
    /// 500 to the first request of every webhook-id, 200 to every retry.
    FirstAttemptFails,
    /// 500 to half of all requests, drawn at random (a fixed hash of the id and attempt, so a run is
    /// reproducible).
    HalfAtRandom,
}

fn coin(webhook_id: &str, attempt: u32) -> bool {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (webhook_id, attempt).hash(&mut h);
    h.finish() & 1 == 1
}

/// 300 events at about 100/s to a partly failing endpoint next to a healthy one, with the default breaker
/// (threshold 5, cool-down 30 s, up to 10 min): every delivery ends within its retry schedule, none is held
/// back by the breaker, and the health view reports the real success rate.
async fn a_partly_failing_endpoint_keeps_flowing(source: Source, how: Partly) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    rx.set_record_bodies(false);
    rx.set_responder(move |r, attempt| {
        let fail = match how {
            Partly::FirstAttemptFails => attempt == 1,
            Partly::HalfAtRandom => coin(&r.webhook_id, attempt),
        };
        if r.path == "/partly" && fail {
            Reply::Status(500)
        } else {
            Reply::Status(200)
        }
    });
    let (partly, _) = add_endpoint(&client, &rx.url("/partly"), &["*"]).await;
    let (healthy, _) = add_endpoint(&client, &rx.url("/healthy"), &["*"]).await;
    let schedule = ["1s", "1s", "2s", "2s", "5s"];
    // disable_after far shorter than the test: an endpoint that keeps answering is never disabled either
    let disable_after = match how {
        Partly::FirstAttemptFails => "3s",
        // (a delivery that dies last leaves a failure after the last success: that is failing)
        Partly::HalfAtRandom => "5days",
    };
    let daemon = Daemon::start(pg.config_for_with(source, |f| {
        f.merge(("delivery.retry_schedule", schedule.to_vec()))
            .merge(("delivery.breaker_threshold", 5))
            .merge(("delivery.breaker_cooldown", "30s"))
            .merge(("delivery.breaker_max_cooldown", "10m"))
            .merge(("delivery.disable_after", disable_after))
    }));
    wait_ready(source, &client).await;
    for i in 0..300 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
        if i % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eventually("every delivery to both endpoints is final", || async {
        count(
            &client,
            "select count(*) from walhook.deliveries where status in ('succeeded', 'dead')",
        )
        .await
            == 600
    })
    .await;
    assert_eq!(rx.distinct_ids("/healthy").len(), 300);
    let by_status = |status: &'static str| {
        let client = &client;
        async move {
            count(
                client,
                &format!(
                    "select count(*) from walhook.deliveries where endpoint_id = {partly} and status = '{status}'"
                ),
            )
            .await
        }
    };
    match how {
        Partly::FirstAttemptFails => {
            assert_eq!(by_status("succeeded").await, 300);
            assert_eq!(
                count(
                    &client,
                    &format!(
                        "select count(*) from walhook.deliveries where endpoint_id = {partly} and attempts <> 2"
                    )
                )
                .await,
                0,
                "each delivery: one failed attempt, one retry that succeeded"
            );
        }
        Partly::HalfAtRandom => {
            // a delivery dies only if all 6 attempts fail: about 1 in 64
            assert!(
                by_status("dead").await < 30,
                "{} dead",
                by_status("dead").await
            );
        }
    }
    // no attempt waited much longer than its schedule step: nothing was parked behind an open breaker (its
    // cool-down is 30 s)
    let longest_wait: f64 = client
        .query_one(
            "select coalesce(max(extract(epoch from b.attempted_at - a.attempted_at)), 0)::float8
               from walhook.attempts a
               join walhook.attempts b on b.delivery_id = a.delivery_id and b.attempt = a.attempt + 1
               join walhook.deliveries d on d.id = a.delivery_id
              where d.endpoint_id = $1",
            &[&partly],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        longest_wait < 5.0 + 15.0,
        "an attempt waited {longest_wait:.1} s after the previous one; the longest step is 5 s"
    );
    assert_eq!(
        count(
            &client,
            &format!(
                "select count(*) from walhook.endpoint_state where endpoint_id = {partly} and breaker_changed_at is not null"
            )
        )
        .await,
        0,
        "the breaker never opened"
    );
    // the health view reports what the receiver does: about half of the requests succeed
    eventually("the success rate of the last hour is written", || async {
        let rate: Option<f64> = client
            .query_one(
                "select success_rate_1h::float8 from walhook.endpoint_health where endpoint_id = $1",
                &[&partly],
            )
            .await
            .unwrap()
            .get(0);
        rate.is_some_and(|r| (0.35..=0.65).contains(&r))
    })
    .await;
    assert_eq!(
        count(
            &client,
            &format!("select count(*) from walhook.endpoints where id = {partly} and enabled")
        )
        .await,
        1,
        "a partly working endpoint is not disabled"
    );
    let _ = healthy;
    daemon.stop().await;
}

both_sources!(first_attempts_failing_do_not_stall_the_endpoint);
async fn first_attempts_failing_do_not_stall_the_endpoint(source: Source) {
    a_partly_failing_endpoint_keeps_flowing(source, Partly::FirstAttemptFails).await;
}

both_sources!(half_of_the_requests_failing_at_random_do_not_stall_the_endpoint);
async fn half_of_the_requests_failing_at_random_do_not_stall_the_endpoint(source: Source) {
    a_partly_failing_endpoint_keeps_flowing(source, Partly::HalfAtRandom).await;
}

/// The breaker of an endpoint that is down survives a `kill -9` (it is in SQL, not only in memory): the next
/// process keeps it open instead of sending everything again, and when the endpoint is back its probes close
/// it and everything is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_survives_kill_9_and_closes_when_the_endpoint_is_back() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let u = up.clone();
    rx.set_responder(move |_, _| {
        if u.load(std::sync::atomic::Ordering::SeqCst) {
            Reply::Status(200)
        } else {
            Reply::Status(503)
        }
    });
    let (id, _) = add_endpoint(&client, &rx.url("/down"), &["*"]).await;
    let mut env = pg.env();
    for (k, v) in [
        ("WALHOOK_DELIVERY__BREAKER_THRESHOLD", "3"),
        ("WALHOOK_DELIVERY__BREAKER_COOLDOWN", "20s"),
        ("WALHOOK_DELIVERY__BREAKER_MAX_COOLDOWN", "20s"),
        (
            "WALHOOK_DELIVERY__RETRY_SCHEDULE",
            "1s,1s,1s,1s,1s,1s,1s,1s",
        ),
        ("WALHOOK_DELIVERY__MAX_IN_FLIGHT_PER_ENDPOINT", "1"),
    ] {
        env.push((k.into(), v.into()));
    }
    let child = KillOnDrop(spawn_binary(&["run"], &env));
    wait_streaming(&client).await;
    for i in 0..10 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    eventually("the breaker is open in walhook.endpoint_state", || async {
        count(
            &client,
            &format!("select count(*) from walhook.endpoint_state where endpoint_id = {id} and breaker = 'open'"),
        )
        .await
            == 1
    })
    .await;
    drop(child); // kill -9
    let _child = KillOnDrop(spawn_binary(&["run"], &env));
    wait_streaming(&client).await;
    let first_new = publish(&client, "order.created", "{\"after\": 0}").await;
    for i in 1..10 {
        publish(&client, "order.created", &format!("{{\"after\": {i}}}")).await;
    }
    eventually("the new events are recorded", || async {
        count(
            &client,
            &format!("select count(*) from walhook.deliveries where event_id >= {first_new}"),
        )
        .await
            == 10
    })
    .await;
    // parked behind the breaker the new process took over: at most one round of probes was sent
    let attempted = count(
        &client,
        &format!(
            "select count(*) from walhook.attempts a join walhook.deliveries d on d.id = a.delivery_id
              where d.event_id >= {first_new}"
        ),
    )
    .await;
    assert!(
        attempted <= walhook::dispatch::limits::PROBES as i64,
        "{attempted} of the 10 new events were attempted although the endpoint's breaker is open"
    );
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_succeeded(&client, 20).await;
    assert_eq!(rx.distinct_ids("/down").len(), 20);
    eventually("the breaker is closed again", || async {
        count(
            &client,
            &format!("select count(*) from walhook.endpoint_state where endpoint_id = {id} and breaker = 'closed'"),
        )
        .await
            == 1
    })
    .await;
}

// ---- nothing is skipped unrecorded (items 6 and 8) ----

/// A `whsk_` key of 64 bytes (so SQL accepts it) whose second half is not the public key of its first: no
/// check in SQL can see that, only the daemon.
fn mismatched_signing_key() -> String {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    let (a, _) = walhook::sign::Ed25519Signer::generate();
    let (_, b_public) = walhook::sign::Ed25519Signer::generate();
    let mut bytes = STANDARD.decode(a.trim_start_matches("whsk_")).unwrap();
    bytes.truncate(32);
    bytes.extend(
        STANDARD
            .decode(b_public.trim_start_matches("whpk_"))
            .unwrap(),
    );
    format!("whsk_{}", STANDARD.encode(bytes))
}

both_sources!(rows_the_daemon_cannot_use_are_recorded_dead_with_the_reason);
async fn rows_the_daemon_cannot_use_are_recorded_dead_with_the_reason(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    let (ok, _) = add_endpoint(&client, &rx.url("/ok"), &["*"]).await;
    let (bad, _) = add_endpoint(&client, &rx.url("/bad"), &["*"]).await;
    client
        .execute(
            "update walhook.endpoints set signing_key = $2 where id = $1",
            &[&bad, &mismatched_signing_key()],
        )
        .await
        .expect("SQL accepts a 64-byte key");
    // non-ASCII in the path and the query: encoded in the request line, never sent raw
    let (utf8, _) = add_endpoint(&client, &rx.url("/ü?name=Zoë"), &["*"]).await;
    let daemon = Daemon::start(pg.config_for(source));
    wait_ready(source, &client).await;
    for i in 0..3 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    eventually("every delivery is final", || async {
        count(
            &client,
            "select count(*) from walhook.deliveries where status in ('succeeded', 'dead')",
        )
        .await
            == 9
    })
    .await;
    if source == Source::Notify {
        wait_all_processed(&client).await;
    }
    assert_eq!(rx.distinct_ids("/ok").len(), 3);
    assert_eq!(rx.distinct_ids("/%C3%BC").len(), 3, "{:?}", rx.received());
    let dead: Vec<(String, i32)> = client
        .query(
            "select last_error, attempts from walhook.deliveries where endpoint_id = $1 and status = 'dead'",
            &[&bad],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(dead.len(), 3, "recorded, not skipped: {dead:?}");
    assert!(
        dead.iter()
            .all(|(e, _)| e.contains("signing_key") && e.contains("redeliver")),
        "{dead:?}"
    );
    assert_eq!(rx.distinct_ids("/bad").len(), 0);
    // the row fixed, redeliver sends what was recorded dead
    client
        .batch_execute(&format!(
            "update walhook.endpoints set signing_key = null where id = {bad};
             select walhook.redeliver(endpoint_id => {bad});"
        ))
        .await
        .unwrap();
    eventually("the fixed endpoint gets its deliveries", || async {
        rx.distinct_ids("/bad").len() == 3
    })
    .await;
    let _ = (ok, utf8);
    daemon.stop().await;
}

both_sources!(a_paused_endpoint_holds_its_deliveries_and_sends_them_when_resumed);
async fn a_paused_endpoint_holds_its_deliveries_and_sends_them_when_resumed(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    let (paused, _) = add_endpoint(&client, &rx.url("/paused"), &["*"]).await;
    add_endpoint(&client, &rx.url("/other"), &["*"]).await;
    client
        .execute(
            "update walhook.endpoints set paused = true where id = $1",
            &[&paused],
        )
        .await
        .unwrap();
    let daemon = Daemon::start(pg.config_for(source));
    wait_ready(source, &client).await;
    for i in 0..5 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    eventually("the paused endpoint's deliveries are held as pending", || async {
        count(
            &client,
            &format!("select count(*) from walhook.deliveries where endpoint_id = {paused} and status = 'pending' and attempts = 0"),
        )
        .await
            == 5
    })
    .await;
    wait_succeeded(&client, 5).await; // the other endpoint's
    assert_eq!(
        rx.distinct_ids("/paused").len(),
        0,
        "nothing sent while paused"
    );
    client
        .execute(
            "update walhook.endpoints set paused = false where id = $1",
            &[&paused],
        )
        .await
        .unwrap();
    wait_succeeded(&client, 10).await;
    assert_eq!(rx.distinct_ids("/paused"), rx.distinct_ids("/other"));
    daemon.stop().await;
}

both_sources!(what_a_disabled_endpoint_missed_is_recovered);
async fn what_a_disabled_endpoint_missed_is_recovered(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    // /gone answers 410 to the first request it gets, then 200
    let answered = std::sync::atomic::AtomicBool::new(false);
    rx.set_responder(move |r, _| {
        if r.path == "/gone" && !answered.swap(true, std::sync::atomic::Ordering::SeqCst) {
            Reply::Status(410)
        } else {
            Reply::Status(200)
        }
    });
    let (by_hand, _) = add_endpoint(&client, &rx.url("/by-hand"), &["*"]).await;
    let (gone, _) = add_endpoint(&client, &rx.url("/gone"), &["*"]).await;
    add_endpoint(&client, &rx.url("/all"), &["*"]).await;
    let since: std::time::SystemTime = client.query_one("select now()", &[]).await.unwrap().get(0);
    // disabled by hand before the daemon starts (a change while it runs applies within
    // endpoints.refresh_interval)
    client
        .execute(
            "update walhook.endpoints set enabled = false where id = $1",
            &[&by_hand],
        )
        .await
        .unwrap();
    let daemon = Daemon::start(pg.config_for(source));
    wait_ready(source, &client).await;
    publish(&client, "order.created", "{\"first\": true}").await;
    eventually("one 410 disables the endpoint", || async {
        count(
            &client,
            &format!("select count(*) from walhook.endpoints where id = {gone} and not enabled and disabled_reason like '%410%recover%'"),
        )
        .await
            == 1
    })
    .await;
    // the daemon's cache follows within endpoints.refresh_interval (100 ms here): markers until one is no
    // longer fanned out to the disabled endpoint
    eventually("the daemon stops fanning out to the disabled endpoint", || async {
        let marker = publish(&client, "marker.sent", "{}").await;
        eventually("the marker is recorded", || async {
            count(&client, &format!("select count(*) from walhook.deliveries where event_id = {marker}")).await > 0
        })
        .await;
        count(
            &client,
            &format!("select count(*) from walhook.deliveries where event_id = {marker} and endpoint_id = {gone}"),
        )
        .await
            == 0
    })
    .await;
    for i in 0..10 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    // the disabled endpoints' walhook.endpoint.disabled events are not for `*` subscribers
    let events = count(
        &client,
        "select count(*) from walhook.outbox where event_type not like 'walhook.%'",
    )
    .await;
    eventually("the enabled endpoint gets everything", || async {
        rx.distinct_ids("/all").len() as i64 == events
    })
    .await;
    if source == Source::Notify {
        wait_all_processed(&client).await;
    }
    assert_eq!(
        count(
            &client,
            &format!("select count(*) from walhook.deliveries where endpoint_id = {by_hand}")
        )
        .await,
        0,
        "a disabled endpoint receives nothing"
    );
    // re-enabled, then recovered: every event it missed, with its own webhook-id; once
    client
        .execute(
            "update walhook.endpoints set enabled = true where id = any($1)",
            &[&vec![by_hand, gone]],
        )
        .await
        .unwrap();
    let recovered = |id: i64| {
        let client = &client;
        async move {
            client
                .query_one("select walhook.recover($1, since => $2)", &[&id, &since])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    assert_eq!(recovered(by_hand).await, events);
    let missed = count(
        &client,
        &format!("select count(*) from walhook.outbox o where o.event_type not like 'walhook.%' and not exists (select 1 from walhook.deliveries d where d.event_id = o.id and d.endpoint_id = {gone})"),
    )
    .await;
    assert!(
        missed >= 11,
        "{missed}: the markers' last and the 10 events"
    );
    assert_eq!(
        recovered(gone).await,
        missed,
        "the event answered 410 has its (dead) delivery already"
    );
    assert_eq!(recovered(by_hand).await, 0, "idempotent");
    client
        .query_one("select walhook.redeliver(endpoint_id => $1)", &[&gone])
        .await
        .unwrap();
    eventually("both endpoints get everything they missed", || async {
        rx.distinct_ids("/by-hand").len() as i64 == events
            && rx.distinct_ids("/gone").len() as i64 == events
    })
    .await;
    assert_eq!(rx.distinct_ids("/by-hand"), rx.distinct_ids("/all"));
    assert_eq!(rx.distinct_ids("/gone"), rx.distinct_ids("/all"));
    daemon.stop().await;
}

/// `delivery.disable_after` measures from the first failure after the last success, as every instance saw it,
/// in SQL: a restart does not start the clock again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disable_after_clock_survives_a_restart() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    rx.set_responder(|_, _| Reply::Status(503));
    let (id, _) = add_endpoint(&client, &rx.url("/down"), &["*"]).await;
    let config = || {
        pg.config_with(|f| {
            f.merge(("delivery.disable_after", "6s"))
                .merge(("delivery.retry_schedule", vec!["30s"]))
        })
    };
    let daemon = Daemon::start(config());
    wait_streaming(&client).await;
    publish(&client, "order.created", "{}").await;
    let failing_since = || {
        let client = &client;
        async move {
            client
                .query_opt(
                    "select failing_since from walhook.endpoint_state where endpoint_id = $1",
                    &[&id],
                )
                .await
                .unwrap()
                .and_then(|r| r.get::<_, Option<std::time::SystemTime>>(0))
        }
    };
    eventually("the failing streak is written", || async {
        failing_since().await.is_some()
    })
    .await;
    let began = failing_since().await.unwrap();
    daemon.stop().await;

    let daemon = Daemon::start(config());
    wait_streaming(&client).await;
    publish(&client, "order.created", "{}").await;
    eventually("the endpoint is disabled", || async {
        count(
            &client,
            &format!("select count(*) from walhook.endpoints where id = {id} and not enabled"),
        )
        .await
            == 1
    })
    .await;
    assert_eq!(
        failing_since().await,
        Some(began),
        "the streak is counted from before the restart"
    );
    let reason: String = client
        .query_one(
            "select disabled_reason from walhook.endpoints where id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        reason.contains("disable_after") && reason.contains("walhook.recover"),
        "{reason}"
    );
    daemon.stop().await;
}

// ---- a bad row or a stuck recorder never wedges the pipeline (items 9 and 13) ----

both_sources!(an_outcome_the_server_refuses_is_isolated_and_the_rest_recorded);
/// The server refuses to record one outcome (a trigger stands in for any value it cannot take: a timestamp
/// out of range, a row too large): that delivery is recorded dead with the reason, everything around it is
/// recorded, and the slot (or the notify rows) move on.
async fn an_outcome_the_server_refuses_is_isolated_and_the_rest_recorded(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    client
        .batch_execute(
            "create function public.refuse_418() returns trigger language plpgsql as $$
             begin
               if new.status_code = 418 then
                 raise exception 'no teapots here' using errcode = 'check_violation';
               end if;
               return new;
             end $$;
             create trigger refuse_418 before insert on walhook.attempts
               for each row execute function public.refuse_418();",
        )
        .await
        .unwrap();
    let rx = Receiver::start().await.unwrap();
    rx.set_record_bodies(true);
    rx.set_responder(|r, _| {
        if String::from_utf8_lossy(&r.body).contains("\"teapot\"") {
            Reply::Status(418)
        } else {
            Reply::Status(200)
        }
    });
    let (id, _) = add_endpoint(&client, &rx.url("/r"), &["*"]).await;
    let daemon = Daemon::start(pg.config_for(source));
    wait_ready(source, &client).await;
    // one transaction, so the refused outcome shares its batch with others
    client
        .batch_execute(
            "insert into walhook.outbox (event_type, payload)
             select 'order.created', case when n = 25 then '{\"teapot\": true}' else jsonb_build_object('n', n) end
               from generate_series(1, 50) n",
        )
        .await
        .unwrap();
    wait_succeeded(&client, 49).await;
    eventually("the refused outcome is recorded dead with the reason", || async {
        count(
            &client,
            &format!(
                "select count(*) from walhook.deliveries
                  where endpoint_id = {id} and status = 'dead' and last_error like '%could not record%no teapots here%'"
            ),
        )
        .await
            == 1
    })
    .await;
    let marker = publish(&client, "marker.done", "{}").await;
    let after_marker = wal_position(&client).await;
    eventually("recording and acknowledging go on", || async {
        count(
            &client,
            &format!("select count(*) from walhook.deliveries where event_id = {marker} and status = 'succeeded'"),
        )
        .await
            == 1
    })
    .await;
    match source {
        Source::Replication => {
            eventually("the slot is confirmed past the marker", || async {
                count(
                    &client,
                    &format!(
                        "select count(*) from pg_replication_slots
                          where slot_name = 'walhook' and confirmed_flush_lsn >= '{after_marker}'"
                    ),
                )
                .await
                    == 1
            })
            .await
        }
        Source::Notify => wait_all_processed(&client).await,
    }
    daemon.stop().await;
}

/// While outcomes cannot be written (a lost privilege, say), the scheduler stops claiming: it does not send
/// its due retries again every lease while their outcomes wait in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorder_that_cannot_write_stops_the_scheduler_claiming() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    client
        .batch_execute(
            "create table public.recording_refused (on_ boolean);
             create function public.refuse_all() returns trigger language plpgsql as $$
             begin
               if exists (select 1 from public.recording_refused) then
                 raise exception 'permission denied (test)' using errcode = 'insufficient_privilege';
               end if;
               return new;
             end $$;
             create trigger refuse_all before insert on walhook.attempts
               for each row execute function public.refuse_all();",
        )
        .await
        .unwrap();
    let rx = Receiver::start().await.unwrap();
    rx.set_responder(|_, _| Reply::Status(503));
    add_endpoint(&client, &rx.url("/r"), &["*"]).await;
    let daemon = Daemon::start(pg.config_with(|f| {
        f.merge(("delivery.retry_schedule", vec!["1s"; 30]))
            .merge(("delivery.breaker_threshold", 1000))
    }));
    wait_streaming(&client).await;
    for i in 0..20 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    eventually("retries are under way", || async {
        count(
            &client,
            "select count(*) from walhook.attempts where attempt >= 2",
        )
        .await
            >= 20
    })
    .await;
    client
        .batch_execute("insert into public.recording_refused values (true)")
        .await
        .unwrap();
    let since: std::time::SystemTime = client.query_one("select now()", &[]).await.unwrap().get(0);
    let before = rx.count();
    // two leases (the lease is at least the request timeout, 5 s, plus queue_wait and 5 s: 11 s)
    eventually("two leases have passed", || async {
        count(
            &client,
            &format!(
                "select (now() - '{}'::timestamptz > interval '23 seconds')::int::int8",
                humantime::format_rfc3339_micros(since)
            ),
        )
        .await
            == 1
    })
    .await;
    let sent = rx.count() - before;
    // what was in flight or claimed when recording began to fail, at most: one claim per delivery
    assert!(
        sent <= 40,
        "{sent} requests while no outcome could be recorded: claims were sent again"
    );
    client
        .batch_execute("delete from public.recording_refused")
        .await
        .unwrap();
    rx.set_responder(|_, _| Reply::Status(200));
    wait_succeeded(&client, 20).await;
    daemon.stop().await;
}

// ---- slots of other databases, publications that would skip events, retention (items 4, 7, 13/21) ----

/// Slot names are cluster-wide: a second deployment in another database with the default slot name must
/// stop with the fix instead of adopting the first one's slot; with a slot of its own it gets everything,
/// including what was committed before its first start, and the first deployment is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_databases_on_one_cluster_never_share_a_slot() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/one"), &["*"]).await;
    let first = Daemon::start(pg.config());
    wait_streaming(&client).await;

    let url2 = pg.cluster.create_database("shop").await.unwrap();
    let mut client2 = walhook::store::connect_client(&url2.parse().unwrap())
        .await
        .unwrap();
    walhook::schema::migrate(&mut client2).await.unwrap();
    add_endpoint(&client2, &rx.url("/two"), &["*"]).await;
    publish(&client2, "order.created", "{\"before\": true}").await;
    let second = Daemon::start(pg.config_with(|f| f.merge(("database_url", url2.as_str()))));
    let error = second
        .result()
        .await
        .expect_err("the other database's slot is refused");
    let message = error.to_string();
    assert!(
        message.contains("database \"app\"")
            && message.contains("replication.slot = \"walhook_shop\""),
        "{message}"
    );
    // the first deployment's slot is still its own, streaming
    publish(&client, "order.created", "{}").await;
    eventually("the first deployment delivers", || async {
        rx.distinct_ids("/one").len() == 1
    })
    .await;

    let second = Daemon::start(pg.config_with(|f| {
        f.merge(("database_url", url2.as_str()))
            .merge(("replication.slot", "walhook_shop"))
    }));
    publish(&client2, "order.created", "{\"after\": true}").await;
    eventually(
        "the second deployment delivers before and after its start",
        || async { rx.distinct_ids("/two").len() == 2 },
    )
    .await;
    assert_eq!(
        count(
            &client,
            "select count(*) from pg_replication_slots where slot_name = 'walhook' and database = 'app' and active"
        )
        .await,
        1
    );
    second.stop().await;
    first.stop().await;
}

/// A publication that leaves out inserts, rows or columns of the outbox is refused at start with the fix;
/// changed while streaming, it stops the daemon with the way to bring back what it skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_that_would_skip_events_is_refused() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    let (endpoint, _) = add_endpoint(&client, &rx.url("/p"), &["*"]).await;
    let reset = "alter publication walhook set table walhook.outbox;
                 alter publication walhook set (publish = 'insert')";
    for (change, expected) in [
        ("alter publication walhook set (publish = 'update')", "does not publish inserts"),
        (
            "alter publication walhook set table walhook.outbox where (event_type <> 'secret.thing')",
            "filters the rows",
        ),
        (
            "alter publication walhook set table walhook.outbox (id, event_type, payload, created_at)",
            "leaves out columns of walhook.outbox (uid, ordering_key, traceparent, tenant)",
        ),
        ("alter publication walhook drop table walhook.outbox", "does not include walhook.outbox"),
    ] {
        client.batch_execute(change).await.unwrap();
        let daemon = Daemon::start(pg.config());
        let message = daemon.result().await.expect_err(change).to_string();
        assert!(message.contains(expected), "{change}: {message}");
        assert!(message.contains("ALTER PUBLICATION"), "{change}: {message}");
        client.batch_execute(reset).await.unwrap();
    }

    // changed while streaming: the daemon stops and says how to recover what was skipped
    let daemon = Daemon::start(pg.config_with(|f| f.merge(("replication.status_interval", "1s"))));
    wait_streaming(&client).await;
    publish(&client, "order.created", "{\"n\": 1}").await;
    wait_succeeded(&client, 1).await;
    client
        .batch_execute("alter publication walhook set (publish = 'update')")
        .await
        .unwrap();
    publish(&client, "order.created", "{\"n\": 2}").await;
    let message = daemon
        .result()
        .await
        .expect_err("the changed publication stops the daemon")
        .to_string();
    assert!(
        message.contains("does not publish inserts") && message.contains("walhook.recover("),
        "{message}"
    );
    // the fix, as the message says it
    client.batch_execute(reset).await.unwrap();
    let since = message
        .split("since => '")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .expect("the message names the time to recover from")
        .to_string();
    client
        .query_one(
            "select walhook.recover($1, since => $2::text::timestamptz)",
            &[&endpoint, &since],
        )
        .await
        .unwrap();
    let daemon = Daemon::start(pg.config());
    wait_succeeded(&client, 2).await;
    assert_eq!(rx.distinct_ids("/p").len(), 2);
    daemon.stop().await;
}

/// Outbox retention never deletes a row the slot may not have streamed yet: the leader records the commit
/// time it has confirmed, and rows committed after it (less a margin) are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_retention_keeps_rows_the_slot_has_not_confirmed() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/r"), &["*"]).await;
    let daemon = Daemon::start(pg.config_with(|f| f.merge(("replication.status_interval", "1s"))));
    wait_streaming(&client).await;
    publish(&client, "order.created", "{}").await;
    wait_succeeded(&client, 1).await;
    eventually("the leader records the commit time it confirmed", || async {
        count(
            &client,
            "select count(*) from walhook.slots where slot_name = 'walhook' and confirmed_at > now() - interval '1 minute'",
        )
        .await
            == 1
    })
    .await;
    daemon.stop().await;
    // rows written two days ago (by the superuser: applications may not set created_at)
    client
        .batch_execute(
            "insert into walhook.outbox (event_type, payload, created_at)
             select 'old.event', '{}', now() - interval '2 days' from generate_series(1, 10)",
        )
        .await
        .unwrap();
    let retention = |slot_confirmed: &'static str| {
        let pg = &pg;
        let client = &client;
        async move {
            client
                .batch_execute(&format!(
                    "update walhook.slots set confirmed_at = {slot_confirmed} where slot_name = 'walhook'"
                ))
                .await
                .unwrap();
            let config = pg.config_with(|f| f.merge(("retention.outbox", "1d")));
            walhook::retention::Retention {
                db: pg.url.parse().unwrap(),
                config: config.retention.clone(),
                prune_outbox: true,
                slot: "walhook".into(),
            }
            .pass(client, &tokio_util::sync::CancellationToken::new())
            .await
            .unwrap();
            count(
                client,
                "select count(*) from walhook.outbox where event_type = 'old.event'",
            )
            .await
        }
    };
    // a slot stuck three days ago has not streamed them: they stay, recover-slot may need them
    assert_eq!(retention("now() - interval '3 days'").await, 10);
    assert_eq!(
        retention("null").await,
        10,
        "no recorded position: nothing is old enough"
    );
    assert_eq!(retention("now()").await, 0);
}

/// A claimed retry that waits for the global concurrency limit until its lease could end mid-attempt is left
/// unsent for the next claim (another instance may have taken it): that must delay it, never lose it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_that_wait_past_their_lease_for_the_concurrency_limit_are_delivered_later() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    rx.set_responder(|r, attempt| match (r.path.as_str(), attempt) {
        ("/hangs", _) => Reply::Hang,
        ("/retried", 1) => Reply::Status(500),
        _ => Reply::Status(200),
    });
    add_endpoint(&client, &rx.url("/hangs"), &["hang.*"]).await;
    add_endpoint(&client, &rx.url("/retried"), &["retry.*"]).await;
    // one request at a time, taken most of the time by requests that hang until their 3 s timeout
    let daemon = Daemon::start(pg.config_with(|f| {
        f.merge(("delivery.concurrency", 1))
            .merge(("delivery.timeout", "3s"))
            .merge(("delivery.retry_schedule", vec!["1s"; 10]))
            .merge(("delivery.breaker_threshold", 1000))
    }));
    wait_streaming(&client).await;
    for i in 0..5 {
        publish(&client, "retry.item", &format!("{{\"i\": {i}}}")).await;
        publish(&client, "hang.item", &format!("{{\"i\": {i}}}")).await;
    }
    eventually("every retried delivery succeeds", || async {
        count(
            &client,
            "select count(*) from walhook.deliveries d join walhook.endpoints e on e.id = d.endpoint_id
              where e.url like '%/retried' and d.status = 'succeeded'",
        )
        .await
            == 5
    })
    .await;
    daemon.stop().await;
}

/// Lowering the payload limit below a row already committed (and not yet delivered) must not stop the notify
/// source, whose claims update that row: the limit applies to inserts only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowering_the_payload_limit_below_a_waiting_row_does_not_stop_the_notify_source() {
    let pg = Pg::start_for(Source::Notify).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/big"), &["*"]).await;
    client
        .batch_execute("select walhook.set_max_payload_bytes(1048576)")
        .await
        .unwrap();
    let big = format!("{{\"blob\": \"{}\"}}", "x".repeat(500 * 1024));
    client
        .execute(
            "insert into walhook.outbox (event_type, payload) values ('big.event', $1::text::jsonb)",
            &[&big],
        )
        .await
        .unwrap();
    client
        .batch_execute("select walhook.set_max_payload_bytes(262144)")
        .await
        .unwrap();
    let daemon = Daemon::start(pg.config_for(Source::Notify));
    wait_succeeded(&client, 1).await;
    wait_all_processed(&client).await;
    assert_eq!(rx.distinct_ids("/big").len(), 1);
    daemon.stop().await;
}

both_sources!(an_endpoint_changed_while_the_daemon_runs_applies_to_every_event_committed_after_it);
/// The daemon fans events out by its copy of the endpoints, reloaded when they change. With changes only
/// polled, an event committed in the moment after an endpoint was added (or enabled) went by the copy from
/// before, and never reached it: nothing recorded, nothing said. Here the poll is an hour, so only the
/// change in commit order (a message in the slot, the generation read with a claim) can bring the new
/// endpoint in: added, it gets the event committed right after it, as does the existing one; disabled, it
/// gets none of those committed after that.
async fn an_endpoint_changed_while_the_daemon_runs_applies_to_every_event_committed_after_it(
    source: Source,
) {
    endpoint_changes_apply_to_later_events(source, false).await;
}

both_sources!(
    endpoint_changes_apply_with_the_smallest_budget_and_an_endpoint_failing_first_attempts
);
/// The same, must not stop: with `delivery.max_in_flight_events = 1` (one event in memory at a time) and
/// the existing endpoint refusing every first attempt (each event reaches it on its retry), the waits for
/// the endpoint cache still let every event through, to every endpoint it was committed after.
async fn endpoint_changes_apply_with_the_smallest_budget_and_an_endpoint_failing_first_attempts(
    source: Source,
) {
    endpoint_changes_apply_to_later_events(source, true).await;
}

/// Endpoints added and disabled while the daemon runs, an event after each change; `hard`: the smallest
/// budget, and `/first` answering 500 to each event's first attempt.
async fn endpoint_changes_apply_to_later_events(source: Source, hard: bool) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    if hard {
        rx.set_responder(|r, attempt| match (r.path.as_str(), attempt) {
            ("/first", 1) => Reply::Status(500),
            _ => Reply::Status(200),
        });
    }
    add_endpoint(&client, &rx.url("/first"), &["*"]).await;
    let daemon = Daemon::start(pg.config_for_with(source, |f| {
        let f = f.merge(("endpoints.refresh_interval", "1h"));
        match hard {
            true => f.merge(("delivery.max_in_flight_events", 1)),
            false => f,
        }
    }));
    wait_ready(source, &client).await;
    for i in 0..3 {
        let path = format!("/added-{i}");
        let (id, _) = add_endpoint(&client, &rx.url(&path), &["*"]).await;
        let event = publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
        eventually("both endpoints get the event", || async {
            count(
                &client,
                &format!("select count(*) from walhook.deliveries where event_id = {event} and status = 'succeeded'"),
            )
            .await
                == 2
        })
        .await;
        assert_eq!(rx.distinct_ids(&path).len(), 1);
        client
            .execute(
                "update walhook.endpoints set enabled = false where id = $1",
                &[&id],
            )
            .await
            .unwrap();
    }
    let after = publish(&client, "order.created", "{\"after\": true}").await;
    eventually("the last event is delivered", || async {
        count(
            &client,
            &format!("select count(*) from walhook.deliveries where event_id = {after} and status = 'succeeded'"),
        )
        .await
            == 1
    })
    .await;
    assert_eq!(rx.distinct_ids("/first").len(), 4);
    for i in 0..3 {
        assert_eq!(
            rx.distinct_ids(&format!("/added-{i}")).len(),
            1,
            "disabled after one event"
        );
    }
    daemon.stop().await;
}

both_sources!(
    a_reload_that_fails_after_an_endpoint_change_delays_events_once_and_a_crash_then_loses_none
);
/// Must not stop: after an endpoint change a source waits for the endpoint cache to reload before the events
/// committed after it. When the reload fails (here the daemon's role, holding only `walhook_daemon`, loses
/// its right to read the catalog the cache loads with the endpoints), the events go on by the endpoints
/// loaded after one bounded wait, not a wait per change, event or claim. `kill -9` meanwhile loses nothing,
/// and once the reload works again the next daemon fans out to every endpoint.
async fn a_reload_that_fails_after_an_endpoint_change_delays_events_once_and_a_crash_then_loses_none(
    source: Source,
) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    client
        .batch_execute("create role relay login replication in role walhook_daemon")
        .await
        .unwrap();
    let rx = Receiver::start().await.unwrap();
    let (first, _) = add_endpoint(&client, &rx.url("/first"), &["*"]).await;
    let mut env = pg.env_for(source);
    env.retain(|(k, _)| k != "WALHOOK_DATABASE_URL");
    for (k, v) in [
        ("WALHOOK_DATABASE_URL", pg.url_as("relay")),
        ("WALHOOK_ENDPOINTS__REFRESH_INTERVAL", "1h".into()),
        ("WALHOOK_NOTIFY__LEASE", "2s".into()),
    ] {
        env.push((k.into(), v));
    }
    if source == Source::Notify {
        // the notify source's index and trigger, which only the outbox's owner may create
        walhook::store::install_notify(&pg.config().database_url().unwrap(), true)
            .await
            .unwrap();
    }
    let revoke = "revoke select on walhook.event_type_versions from walhook_daemon";
    let grant = "grant select on walhook.event_type_versions to walhook_daemon";

    // must not stop: the reload fails, and the events still reach the endpoint already loaded, after one
    // wait, not one per change (seven waits of 10 s would outlast the deadline)
    let child = KillOnDrop(spawn_binary(&["run"], &env));
    wait_ready(source, &client).await;
    client.batch_execute(revoke).await.unwrap();
    for i in 0..7 {
        add_endpoint(&client, &rx.url(&format!("/late-{i}")), &["*"]).await;
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    eventually("the loaded endpoint gets every event", || async {
        rx.distinct_ids("/first").len() == 7
    })
    .await;

    // kill -9 with the reload failing: nothing is lost, and with the right back the next daemon has every
    // endpoint
    let mut events = Vec::new();
    for i in 0..5 {
        events.push(publish(&client, "order.created", &format!("{{\"j\": {i}}}")).await);
    }
    drop(child);
    client.batch_execute(grant).await.unwrap();
    let _child = KillOnDrop(spawn_binary(&["run"], &env));
    let ids = events
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(",");
    eventually(
        "every event published before the kill is delivered",
        || async {
            count(
                &client,
                &format!(
                    "select count(distinct event_id) from walhook.deliveries
                  where event_id in ({ids}) and endpoint_id = {first} and status = 'succeeded'"
                ),
            )
            .await
                == 5
        },
    )
    .await;
    let (added, _) = add_endpoint(&client, &rx.url("/added"), &["*"]).await;
    let after = publish(&client, "order.created", "{\"after\": true}").await;
    eventually("the existing and the added endpoint get the next event", || async {
        count(
            &client,
            &format!(
                "select count(*) from walhook.deliveries
                  where event_id = {after} and endpoint_id in ({first}, {added}) and status = 'succeeded'"
            ),
        )
        .await
            == 2
    })
    .await;
}

/// The daemon's periodic check for endpoints failing past `delivery.disable_after` runs every few seconds on
/// every instance: it must change `walhook.endpoints` (and so bump the generation every daemon reloads its
/// endpoints for, before the events committed after it) only when it has an endpoint to disable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_disable_check_touches_no_endpoint_when_none_is_failing() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let (id, _) = add_endpoint(&client, "http://127.0.0.1:9/x", &["*"]).await;
    let generation = "select generation from walhook.endpoints_generation";
    let before: i64 = client.query_one(generation, &[]).await.unwrap().get(0);
    let store = walhook::store::Store::connect(&pg.url.parse().unwrap())
        .await
        .unwrap();
    let week = Duration::from_secs(7 * 24 * 3600);
    assert!(store.disable_failing(week).await.unwrap().is_empty());
    let after: i64 = client.query_one(generation, &[]).await.unwrap().get(0);
    assert_eq!(after, before, "nothing to disable, nothing bumped");
    // failing for longer than the limit: disabled, and bumped
    client
        .execute(
            "insert into walhook.endpoint_state (endpoint_id, failing_since) values ($1, now() - interval '8 days')
             on conflict (endpoint_id) do update set failing_since = excluded.failing_since",
            &[&id],
        )
        .await
        .unwrap();
    let disabled = store.disable_failing(week).await.unwrap();
    assert_eq!(disabled.len(), 1, "{disabled:?}");
    assert_eq!(disabled[0].0, id);
    let bumped: i64 = client.query_one(generation, &[]).await.unwrap().get(0);
    assert!(bumped > before);
}
