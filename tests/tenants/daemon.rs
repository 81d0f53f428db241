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
