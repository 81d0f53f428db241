//! `walhook demo`: the whole product in one command, with nothing installed but the PostgreSQL server.
//!
//! It starts a throwaway cluster and a loopback receiver that verifies every signature, registers two
//! endpoints with different patterns, commits events (and one transaction that rolls back), runs the real
//! daemon in-process, and prints what SQL says happened. One endpoint fails its first request on purpose so
//! the summary shows a retry. Everything is removed on exit.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;

use crate::cluster::{Cluster, ClusterOptions};
use crate::config::Config;
use crate::receiver::{Receiver, Reply};

const ORDERS: usize = 12;
const USERS: usize = 12;

pub async fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    println!("walhook demo: starting a throwaway PostgreSQL cluster…");
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default()))
        .await?
        .context("starting PostgreSQL")?;
    let url = cluster.create_database("walhook_demo").await?;
    let db: crate::conninfo::ConnInfo = url.parse()?;
    let mut client = crate::store::connect_client(&db).await?;
    crate::schema::migrate(&mut client).await?;

    let receiver = Receiver::start().await?;
    // the orders endpoint fails the first delivery of the first order once, to show a retry
    receiver.set_responder(|req, seen| {
        if req.path == "/orders" && seen == 1 && req.body.windows(8).any(|w| w == b"\"id\": 1,") {
            Reply::StatusWithBody(503, "busy, try later".into())
        } else {
            Reply::Status(200)
        }
    });
    let mut endpoint_ids = Vec::new();
    for (path, patterns, description) in [
        ("/orders", "{order.*}", "order events only"),
        ("/all", "{*}", "every event"),
    ] {
        let row = client
            .query_one(
                "insert into walhook.endpoints (url, event_types, description) values ($1, $2::text::text[], $3)
                 returning id, secret",
                &[&receiver.url(path), &patterns, &description],
            )
            .await?;
        let secret: String = row.get(1);
        receiver.set_secret(path, &secret);
        endpoint_ids.push((row.get::<_, i64>(0), path));
    }
    println!(
        "registered endpoints {} (order.*) and {} (*)",
        receiver.url("/orders"),
        receiver.url("/all")
    );

    let mut config = Config::from_figment(
        Config::figment(None)
            .merge(("database_url", url.as_str()))
            .merge(("delivery.allow_private_networks", true))
            .merge(("http.listen", "off"))
            .merge(("delivery.retry_schedule", vec!["2s", "5s", "10s"])),
    )?;
    // the throwaway cluster is plaintext and trusts us: PGSSLMODE and friends are for the user's servers
    config.self_contained = true;
    let stop = CancellationToken::new();
    let abort = CancellationToken::new();
    let daemon = tokio::spawn(crate::daemon::run(config, stop.clone(), abort.clone()));
    // wait until the daemon holds its slot: from here on every commit is streamed
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let active: i64 = client
            .query_one(
                "select count(*) from pg_replication_slots where slot_name = 'walhook' and active",
                &[],
            )
            .await?
            .get(0);
        if active == 1 {
            break;
        }
        if daemon.is_finished() {
            bail!("the daemon stopped early: {:?}", daemon.await?);
        }
        if Instant::now() > deadline {
            bail!("the daemon did not start streaming within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("walhook is running and streaming from its replication slot");

    // events: orders in one transaction each, users in one batch transaction, and a rolled-back one
    for i in 1..=ORDERS {
        client
            .execute(
                "insert into walhook.outbox (event_type, payload) values ('order.created', $1::text::jsonb)",
                &[&format!("{{\"id\": {i}, \"total_cents\": {}}}", 1000 + i * 7)],
            )
            .await?;
    }
    let tx = client.transaction().await?;
    for i in 1..=USERS {
        tx.execute(
            "insert into walhook.outbox (event_type, payload) values ('user.signed_up', $1::text::jsonb)",
            &[&format!("{{\"user\": \"user{i}@example.com\"}}")],
        )
        .await?;
    }
    tx.commit().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "insert into walhook.outbox (event_type, payload) values ('order.refunded', '{\"id\": 999}')",
        &[],
    )
    .await?;
    tx.rollback().await?;
    println!(
        "committed {} events ({ORDERS} order.created, {USERS} user.signed_up), rolled back 1 order.refunded",
        ORDERS + USERS
    );
    println!("waiting for every delivery to be recorded…");

    let expected = (ORDERS * 2 + USERS) as i64;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done: i64 = client
            .query_one(
                "select count(*) from walhook.deliveries where status = 'succeeded'",
                &[],
            )
            .await?
            .get(0);
        if done >= expected {
            break;
        }
        if daemon.is_finished() {
            bail!("the daemon stopped early: {:?}", daemon.await?);
        }
        if Instant::now() > deadline {
            bail!("only {done} of {expected} deliveries succeeded within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    daemon.await??;

    println!();
    println!("summary (read back with SQL):");
    let events: i64 = client
        .query_one("select count(*) from walhook.outbox", &[])
        .await?
        .get(0);
    println!("  outbox events committed:        {events}");
    for (id, path) in &endpoint_ids {
        let rows = client
            .query(
                "select status, count(*), sum(attempts) from walhook.deliveries where endpoint_id = $1
                 group by status order by status",
                &[id],
            )
            .await?;
        for r in rows {
            let (status, n, attempts): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
            println!(
                "  endpoint {id} {path:<8} {status:<10} {n:>3} deliveries, {attempts} attempts"
            );
        }
    }
    let retried: i64 = client
        .query_one(
            "select count(*) from walhook.attempts where status_code = 503",
            &[],
        )
        .await?
        .get(0);
    println!("  attempts answered 503 then retried: {retried}");
    let received = receiver.received();
    let verified = received.iter().filter(|r| r.verified == Some(true)).count();
    println!(
        "  requests received: {}, signatures verified: {verified}",
        received.len()
    );
    let refunded = received
        .iter()
        .any(|r| r.body.windows(14).any(|w| w == b"order.refunded"));
    let refunded_rows: i64 = client
        .query_one(
            "select count(*) from walhook.outbox where event_type = 'order.refunded'",
            &[],
        )
        .await?
        .get(0);
    println!(
        "  rolled-back event: {} in the outbox, {}",
        refunded_rows,
        if refunded {
            "DELIVERED (bug!)"
        } else {
            "never delivered"
        }
    );
    if verified != received.len() || refunded || refunded_rows != 0 {
        bail!("the demo found a problem (see the summary above)");
    }
    println!();
    println!("next: the README's production quick start runs the same against your own database");
    println!(
        "demo finished in {:.1} s; cleaning up",
        started.elapsed().as_secs_f64()
    );
    receiver.shutdown().await;
    drop(client);
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    Ok(())
}
