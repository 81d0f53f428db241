//! Tenants in the daemon: its fan-out applies the rule SQL applies (tenant, firehose, filter), every delivery
//! records its event's tenant (what a tenant's session may read), and a tenant's rate limit holds across its
//! endpoints without stopping them.

use crate::support::*;
use walhook::receiver::Receiver;

/// Inserts an endpoint with a tenant, the firehose flag and a filter; returns its id.
async fn endpoint(
    client: &tokio_postgres::Client,
    url: &str,
    tenant: Option<&str>,
    all_tenants: bool,
    filter: Option<&str>,
) -> i64 {
    client
        .query_one(
            "insert into walhook.endpoints (url, tenant, all_tenants, filter)
             values ($1, $2, $3, $4::text::jsonb) returning id",
            &[&url, &tenant, &all_tenants, &filter],
        )
        .await
        .unwrap()
        .get(0)
}

async fn publish_for(client: &tokio_postgres::Client, tenant: Option<&str>, payload: &str) -> i64 {
    client
        .query_one(
            "insert into walhook.outbox (event_type, payload, tenant) values ('order.created', $1::text::jsonb, $2)
             returning id",
            &[&payload, &tenant],
        )
        .await
        .unwrap()
        .get(0)
}

both_sources!(each_endpoint_gets_its_tenants_events_and_the_firehose_everyones);
async fn each_endpoint_gets_its_tenants_events_and_the_firehose_everyones(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    endpoint(&client, &rx.url("/acme"), Some("acme"), false, None).await;
    endpoint(&client, &rx.url("/globex"), Some("globex"), false, None).await;
    endpoint(&client, &rx.url("/nobody"), None, false, None).await;
    endpoint(&client, &rx.url("/firehose"), None, true, None).await;
    endpoint(
        &client,
        &rx.url("/acme-eu"),
        Some("acme"),
        false,
        Some(r#"{"region": "eu"}"#),
    )
    .await;
    let daemon = Daemon::start(pg.config_for(source));
    wait_ready(source, &client).await;
    publish_for(&client, Some("acme"), r#"{"region": "eu", "n": 1}"#).await;
    publish_for(&client, Some("acme"), r#"{"region": "us", "n": 2}"#).await;
    publish_for(&client, Some("globex"), r#"{"region": "eu", "n": 3}"#).await;
    publish_for(&client, None, r#"{"region": "eu", "n": 4}"#).await;
    // 2 + 1 + 1 + 4 + 1
    wait_succeeded(&client, 9).await;
    if source == Source::Notify {
        wait_all_processed(&client).await;
    }
    let got = |path: &str| rx.distinct_ids(path).len();
    assert_eq!(got("/acme"), 2);
    assert_eq!(got("/globex"), 1);
    assert_eq!(
        got("/nobody"),
        1,
        "no tenant receives only events without one"
    );
    assert_eq!(got("/firehose"), 4);
    assert_eq!(got("/acme-eu"), 1, "the filter");
    // every delivery records its event's tenant
    assert_eq!(
        count(
            &client,
            "select count(*) from walhook.deliveries d join walhook.outbox o on o.id = d.event_id
              where d.tenant is distinct from o.tenant"
        )
        .await,
        0
    );
    // so a tenant's session sees its own deliveries (not the firehose's copies of its events)
    client
        .batch_execute("create role webapp login in role walhook_tenant")
        .await
        .unwrap();
    let webapp = pg.client_as("webapp").await;
    webapp
        .batch_execute("set walhook.tenant = 'acme'")
        .await
        .unwrap();
    assert_eq!(
        count(&webapp, "select count(*) from walhook.deliveries").await,
        3
    );
    daemon.stop().await;
}

/// `walhook.tenants.rate_limit` caps deliveries per second to all of a tenant's endpoints together; the rest
/// wait (parked, no attempt used) and all are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_rate_limit_spans_its_endpoints_and_delays_without_losing() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    client
        .batch_execute("insert into walhook.tenants (tenant, rate_limit) values ('acme', 4)")
        .await
        .unwrap();
    endpoint(&client, &rx.url("/a"), Some("acme"), false, None).await;
    endpoint(&client, &rx.url("/b"), Some("acme"), false, None).await;
    endpoint(&client, &rx.url("/other"), Some("globex"), false, None).await;
    let daemon = Daemon::start(pg.config());
    wait_streaming(&client).await;
    for i in 0..10 {
        publish_for(&client, Some("acme"), &format!("{{\"n\": {i}}}")).await;
        publish_for(&client, Some("globex"), &format!("{{\"n\": {i}}}")).await;
    }
    wait_succeeded(&client, 30).await;
    assert_eq!(rx.distinct_ids("/a").len(), 10);
    assert_eq!(rx.distinct_ids("/b").len(), 10);
    // 20 of acme's deliveries at 4/s with a burst of 4: at least (20 - 4) / 4 = 4 s from the first to the last
    let spread: f64 = client
        .query_one(
            "select extract(epoch from max(a.attempted_at) - min(a.attempted_at))::float8
               from walhook.attempts a join walhook.deliveries d on d.id = a.delivery_id
              where d.tenant = 'acme'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        spread >= 3.5,
        "acme's 20 deliveries took {spread:.1} s at 4/s"
    );
    assert_eq!(
        count(&client, "select count(*) from walhook.attempts").await,
        30,
        "waiting for the rate limit uses no attempt"
    );
    daemon.stop().await;
}

both_sources!(a_tenants_hanging_endpoints_do_not_stop_another_tenants_deliveries);
/// One tenant's endpoints that never answer hold at most `delivery.max_in_flight_per_tenant` requests (a
/// quarter of `delivery.concurrency` by default), so another tenant's deliveries keep flowing; the first
/// tenant's backlog waits (queued, then parked) without loss, through a `kill -9`, and is delivered once its
/// endpoints answer.
async fn a_tenants_hanging_endpoints_do_not_stop_another_tenants_deliveries(source: Source) {
    use walhook::receiver::Reply;
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    let hanging = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let hang = hanging.clone();
    rx.set_responder(move |r, _| {
        if r.path.starts_with("/a") && hang.load(std::sync::atomic::Ordering::SeqCst) {
            Reply::Hang
        } else {
            Reply::Status(200)
        }
    });
    // four endpoints of 32 requests each would take all 64 request slots without the tenant's limit (16)
    for i in 0..4 {
        endpoint(&client, &rx.url(&format!("/a{i}")), Some("a"), false, None).await;
    }
    endpoint(&client, &rx.url("/b"), Some("b"), false, None).await;
    let mut env = pg.env_for(source);
    for (k, v) in [
        ("WALHOOK_DELIVERY__CONCURRENCY", "64"),
        ("WALHOOK_DELIVERY__TIMEOUT", "120s"),
        ("WALHOOK_SHUTDOWN__DRAIN_TIMEOUT", "1s"),
    ] {
        env.push((k.to_string(), v.to_string()));
    }
    let mut daemon = KillOnDrop(spawn_binary(&["run"], &env));
    wait_ready(source, &client).await;
    // tenant A's backlog first, then tenant B's events one transaction each
    client
        .execute(
            "insert into walhook.outbox (event_type, payload, tenant)
             select 'order.created', jsonb_build_object('n', g), 'a' from generate_series(1, 300) g",
            &[],
        )
        .await
        .unwrap();
    for n in 0..40 {
        publish_for(&client, Some("b"), &format!(r#"{{"n": {n}}}"#)).await;
    }
    assert!(
        rx.wait_until(DEADLINE, |r| r.iter().filter(|r| r.path == "/b").count()
            >= 40)
            .await,
        "tenant B's deliveries stalled behind tenant A's hanging endpoints"
    );
    let to_a = rx
        .received()
        .iter()
        .filter(|r| r.path.starts_with("/a"))
        .count();
    assert!(
        (1..=16).contains(&to_a),
        "{to_a} requests open to tenant A's endpoints; its limit is 16"
    );

    // a crash with the limit engaged loses nothing: once A's endpoints answer, everything arrives
    daemon.0.kill().unwrap();
    daemon.0.wait().unwrap();
    hanging.store(false, std::sync::atomic::Ordering::SeqCst);
    let _daemon = KillOnDrop(spawn_binary(&["run"], &env));
    wait_succeeded(&client, 300 * 4 + 40).await;
    for i in 0..4 {
        assert_eq!(rx.distinct_ids(&format!("/a{i}")).len(), 300, "/a{i}");
    }
    assert_eq!(rx.distinct_ids("/b").len(), 40);
}
