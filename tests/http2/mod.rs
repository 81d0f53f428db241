//! HTTP/2 to endpoints that offer it (TLS ALPN, `delivery.http2`, on by default): requests to one endpoint
//! share a connection, an endpoint that allows few streams at once still gets every event without a failed
//! attempt, one that fails every other request still gets every event, a `kill -9` with requests in flight
//! on its streams loses none, and `delivery.http2 = false` speaks HTTP/1.1 to the same endpoint. Plain
//! `http://` endpoints stay on HTTP/1.1 (every other test).

use std::sync::atomic::Ordering;

use crate::support::tls::{TlsOptions, TlsReceiver};
use crate::support::*;

fn offering_h2(max_concurrent_streams: Option<u32>) -> TlsOptions {
    TlsOptions {
        http2: true,
        max_concurrent_streams,
        ..TlsOptions::default()
    }
}

async fn publish_many(client: &tokio_postgres::Client, n: i32) {
    client
        .execute(
            "insert into walhook.outbox (event_type, payload)
             select 'order.created', jsonb_build_object('n', n) from generate_series(1, $1) n",
            &[&n],
        )
        .await
        .unwrap();
}

fn daemon_trusting(pg: &Pg, tls: &TlsReceiver, http2: bool) -> Daemon {
    let ca_file = tls.ca_file.display().to_string();
    Daemon::start(pg.config_with(|f| {
        f.merge(("delivery.ca_file", ca_file.as_str()))
            .merge(("delivery.http2", http2))
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_to_an_endpoint_offering_http2_share_one_connection() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let tls = TlsReceiver::start_with(offering_h2(None)).await;
    add_endpoint(&client, &tls.url("localhost", "/h2"), &["order.*"]).await;
    let daemon = daemon_trusting(&pg, &tls, true);
    wait_ready(Source::Replication, &client).await;
    publish(&client, "order.created", "{}").await;
    wait_succeeded(&client, 1).await;

    // the next ones are in flight at once, held unanswered (as many as a new endpoint's window lets go at
    // once, so that the relay sends them together): on HTTP/1.1 each would take a connection of its own
    let n = walhook::fanout::FIRST_WINDOW;
    tls.hold();
    publish_many(&client, n as i32).await;
    eventually("the requests in flight at once", || async {
        tls.held.load(Ordering::SeqCst) == n
    })
    .await;
    let seen = tls.seen();
    assert_eq!(seen.len(), 1 + n, "{seen:?}");
    assert!(
        seen.iter().all(|s| s.version == http::Version::HTTP_2),
        "every request went over HTTP/2: {seen:?}"
    );
    assert!(
        seen.iter().all(|s| s.connection == seen[0].connection),
        "the first request's connection carried them all: {seen:?}"
    );
    tls.release();
    wait_succeeded(&client, 1 + n as i64).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_endpoint_allowing_two_streams_at_once_gets_every_event() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let tls = TlsReceiver::start_with(TlsOptions {
        delay: std::time::Duration::from_millis(20),
        ..offering_h2(Some(2))
    })
    .await;
    add_endpoint(&client, &tls.url("localhost", "/two-streams"), &["order.*"]).await;
    let daemon = daemon_trusting(&pg, &tls, true);
    wait_ready(Source::Replication, &client).await;
    // 40 at once, up to 32 of them in flight to the endpoint (delivery.max_in_flight_per_endpoint): the
    // requests beyond its two streams wait for one, they do not fail
    publish_many(&client, 40).await;
    wait_succeeded(&client, 40).await;
    let row = client
        .query_one(
            "select count(*) filter (where status_code = 200),
                    string_agg(coalesce(error, status_code::text), '; ') filter (where status_code is distinct from 200)
               from walhook.attempts",
            &[],
        )
        .await
        .unwrap();
    let failed: Option<String> = row.get(1);
    assert_eq!(
        (row.get::<_, i64>(0), failed),
        (40, None),
        "no attempt failed"
    );
    let seen = tls.seen();
    assert_eq!(seen.len(), 40, "each event was sent once");
    assert!(seen.iter().all(|s| s.version == http::Version::HTTP_2));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_false_speaks_http1_to_an_endpoint_offering_both() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let tls = TlsReceiver::start_with(offering_h2(None)).await;
    add_endpoint(&client, &tls.url("localhost", "/h1"), &["order.*"]).await;
    let daemon = daemon_trusting(&pg, &tls, false);
    wait_ready(Source::Replication, &client).await;
    publish_many(&client, 3).await;
    wait_succeeded(&client, 3).await;
    let seen = tls.seen();
    assert_eq!(seen.len(), 3);
    assert!(
        seen.iter().all(|s| s.version == http::Version::HTTP_11),
        "{seen:?}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_endpoint_failing_every_other_request_gets_every_event() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let tls = TlsReceiver::start_with(TlsOptions {
        fail_every: 2,
        ..offering_h2(None)
    })
    .await;
    add_endpoint(&client, &tls.url("localhost", "/half"), &["order.*"]).await;
    // each round of retries meets half failures again: enough retries that none runs out of them
    let ca_file = tls.ca_file.display().to_string();
    let daemon = Daemon::start(pg.config_with(|f| {
        f.merge(("delivery.ca_file", ca_file.as_str()))
            .merge(("delivery.retry_schedule", vec!["200ms"; 12]))
    }));
    wait_ready(Source::Replication, &client).await;
    // arrivals alternate 200 and 500, whatever the order: half of the first attempts fail, then retries
    publish_many(&client, 40).await;
    wait_succeeded(&client, 40).await;
    assert!(
        count(
            &client,
            "select count(*) from walhook.attempts where status_code = 500"
        )
        .await
            >= 1,
        "some attempts failed"
    );
    assert!(tls
        .seen()
        .iter()
        .all(|s| s.version == http::Version::HTTP_2));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_requests_in_flight_on_http2_streams_loses_no_event() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let tls = TlsReceiver::start_with(offering_h2(None)).await;
    add_endpoint(&client, &tls.url("localhost", "/crash"), &["order.*"]).await;
    let mut env = pg.env();
    env.push((
        "WALHOOK_DELIVERY__CA_FILE".into(),
        tls.ca_file.display().to_string(),
    ));
    let child = KillOnDrop(spawn_binary(&["run"], &env));
    wait_ready(Source::Replication, &client).await;
    publish(&client, "order.created", "{}").await;
    wait_succeeded(&client, 1).await;
    // requests held unanswered on the connection's streams when the daemon is killed
    tls.hold();
    publish_many(&client, 20).await;
    eventually("requests in flight on the streams", || async {
        tls.held.load(Ordering::SeqCst) >= 1
    })
    .await;
    drop(child); // SIGKILL
    tls.release();
    let daemon = daemon_trusting(&pg, &tls, true);
    wait_succeeded(&client, 21).await;
    assert!(tls
        .seen()
        .iter()
        .all(|s| s.version == http::Version::HTTP_2));
    daemon.stop().await;
}
