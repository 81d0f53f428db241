//! `walhook demo`: the whole product in one command, with nothing installed but the PostgreSQL server.
//!
//! It starts a throwaway cluster and a loopback receiver that verifies every signature, registers two
//! endpoints with different patterns, commits events (and one transaction that rolls back), runs the real
//! daemon in-process, and prints what SQL says happened. One endpoint fails its first request on purpose so
//! the summary shows a retry. Two tenants, acme and globex, each register an endpoint from their own
//! `walhook_tenant` session and get events of the same type in one transaction; the summary proves from what
//! the receiver got (webhook-ids and bodies against the outbox rows), from `walhook.deliveries.tenant` and
//! from each tenant's row-level-security view that neither saw the other's events. Any problem found makes
//! the demo fail. Everything is removed on exit.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::cluster::{Cluster, ClusterOptions};
use crate::config::Config;
use crate::receiver::{Received, Receiver, Reply};

const ORDERS: usize = 12;
const USERS: usize = 12;
/// The tenants: each registers an endpoint at its path and gets this many `order.created` events. Different
/// counts, so that a leak shows in the numbers too.
const TENANTS: [(&str, &str, usize); 2] = [("acme", "/acme", 5), ("globex", "/globex", 3)];
/// The endpoints without a tenant (registered by the operator).
const UNTENANTED: [&str; 2] = ["/orders", "/all"];

pub async fn run(portal: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    println!("walhook demo: starting a throwaway PostgreSQL cluster…");
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default()))
        .await?
        .context("starting PostgreSQL")?;
    // the throwaway cluster speaks plaintext only: say so, rather than warn that TLS was not offered
    let url = format!(
        "{}?sslmode=disable",
        cluster.create_database("walhook_demo").await?
    );
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
    for (tenant, path, _) in TENANTS {
        let (id, secret) = register_as_tenant(&mut client, tenant, &receiver.url(path))
            .await
            .with_context(|| {
                format!("registering {tenant}'s endpoint in its walhook_tenant session")
            })?;
        receiver.set_secret(path, &secret);
        endpoint_ids.push((id, path));
    }
    println!(
        "tenants acme and globex registered their own endpoints {} and {} (order.*), each from a \
         walhook_tenant session",
        receiver.url("/acme"),
        receiver.url("/globex")
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
    let daemon = tokio::spawn(crate::daemon::run(
        config.clone(),
        stop.clone(),
        abort.clone(),
    ));
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
    // the tenants' orders, interleaved in one transaction: only the tenant column tells them apart
    let tx = client.transaction().await?;
    let most = TENANTS.iter().map(|(_, _, n)| *n).max().unwrap_or(0);
    for i in 1..=most {
        for (tenant, _, _) in TENANTS.iter().filter(|(_, _, n)| i <= *n) {
            tx.execute(
                "insert into walhook.outbox (event_type, payload, tenant)
                 values ('order.created', $1::text::jsonb, $2)",
                &[
                    &format!("{{\"id\": {i}, \"customer\": \"{tenant}\"}}"),
                    tenant,
                ],
            )
            .await?;
        }
    }
    tx.commit().await?;
    let tenant_events: usize = TENANTS.iter().map(|(_, _, n)| n).sum();
    let tx = client.transaction().await?;
    tx.execute(
        "insert into walhook.outbox (event_type, payload) values ('order.refunded', '{\"id\": 999}')",
        &[],
    )
    .await?;
    tx.rollback().await?;
    println!(
        "committed {} events: {ORDERS} order.created and {USERS} user.signed_up without a tenant, {} order.created \
         for acme and {} for globex; rolled back 1 order.refunded",
        ORDERS + USERS + tenant_events,
        TENANTS[0].2,
        TENANTS[1].2
    );
    println!("waiting for every delivery to be recorded…");

    let expected = (ORDERS * 2 + USERS + tenant_events) as i64;
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
    let isolated = report_tenants(&mut client, &received).await?;
    if verified != received.len() || refunded || refunded_rows != 0 || !isolated {
        bail!("the demo found a problem (see the summary above)");
    }
    println!();
    if portal {
        serve_portal(&cluster, &client, config, &receiver).await?;
    } else {
        println!(
            "next: the README's production quick start runs the same against your own database"
        );
        println!(
            "demo finished in {:.1} s; cleaning up",
            started.elapsed().as_secs_f64()
        );
    }
    receiver.shutdown().await;
    drop(client);
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    Ok(())
}

/// `--portal`: the relay again and the portal beside it, on 127.0.0.1:8090 (or a free port), connecting as a
/// log-in role that holds only `walhook_portal`, as docs/portal.md creates it; prints a link for acme and one
/// for an operator, and serves until SIGINT or SIGTERM. Test events sent from the portal reach the demo's
/// receiver, which verifies them as before.
async fn serve_portal(
    cluster: &Cluster,
    client: &Client,
    mut config: Config,
    receiver: &Receiver,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // listening for the signals first: from the moment a link is printed, Ctrl-C means "clean up"
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let password: String = client
        .query_one("select gen_random_uuid()::text", &[])
        .await?
        .get(0);
    client
        .batch_execute(&format!(
            "CREATE ROLE portal LOGIN PASSWORD '{password}' IN ROLE walhook_portal"
        ))
        .await
        .context("creating the portal's role")?;
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:8090").await {
        Ok(listener) => listener,
        Err(_) => tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    };
    let addr = listener.local_addr()?;
    config.portal.listen = addr;
    config.portal.public_url = format!("http://{addr}");
    config.portal.database_url = Some(format!(
        "postgres://portal:{password}@127.0.0.1:{}/walhook_demo?sslmode=disable",
        cluster.port()
    ));
    let settings = crate::portal::settings(&config)?;
    let db = config.portal_database_url()?;
    crate::portal::check_role(&db).await?;

    let stop = CancellationToken::new();
    let abort = CancellationToken::new();
    let mut relay = tokio::spawn(crate::daemon::run(
        config.clone(),
        stop.clone(),
        abort.clone(),
    ));
    let portal = tokio::spawn(crate::portal::serve(
        listener,
        settings,
        db,
        config.portal.connections,
        stop.clone(),
    ));
    let mint = |tenant: Option<&'static str>| async move {
        let row = client
            .query_one(
                "select path from walhook.portal_link($1, interval '1 hour', operator => $2)",
                &[&tenant, &tenant.is_none()],
            )
            .await?;
        anyhow::Ok(format!("http://{addr}{}", row.get::<_, String>(0)))
    };
    println!("the portal, where each tenant's customers manage their own webhooks, is serving on http://{addr}");
    println!(
        "  as role portal (LOGIN, member of walhook_portal only: row-level security decides what a page sees)"
    );
    println!(
        "  acme's customer (single-use link, 1 hour):  {}",
        mint(Some("acme")).await?
    );
    println!(
        "  an operator, every tenant (single-use):      {}",
        mint(None).await?
    );
    println!(
        "  the relay is running: a test event sent from the portal reaches the demo's receiver"
    );
    println!("press Ctrl-C to stop and clean up");
    let before = receiver.received().len();
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
        done = &mut relay => bail!("the relay stopped early: {done:?}"),
    }
    stop.cancel();
    portal.await?;
    relay.await??;
    let received = receiver.received();
    let verified = received[before..]
        .iter()
        .filter(|r| r.verified == Some(true))
        .count();
    println!(
        "stopping: the receiver got {} more requests while the portal ran, {verified} verified; cleaning up",
        received.len() - before
    );
    Ok(())
}

/// Registers `url` as `tenant`'s endpoint the way a customer-facing settings page does: as `walhook_tenant`,
/// with the tenant set for the transaction (the endpoint takes the session's tenant). Returns (id, secret).
async fn register_as_tenant(
    client: &mut Client,
    tenant: &str,
    url: &str,
) -> anyhow::Result<(i64, String)> {
    let tx = client.transaction().await?;
    tx.batch_execute("set local role walhook_tenant").await?;
    tx.execute("select set_config('walhook.tenant', $1, true)", &[&tenant])
        .await?;
    let row = tx
        .query_one(
            "insert into walhook.endpoints (url, event_types, description)
             values ($1, '{order.*}', 'the tenant''s own endpoint') returning id, secret",
            &[&url],
        )
        .await?;
    tx.commit().await?;
    Ok((row.get(0), row.get(1)))
}

/// Prints the tenants' part of the summary and says whether neither tenant saw the other's events, checked
/// three ways: every request the receiver got, matched to its outbox row by `webhook-id` with the body's
/// `data` equal to the row's payload; `walhook.deliveries.tenant` against the endpoints' tenants; and each
/// tenant's own view through row-level security.
async fn report_tenants(client: &mut Client, received: &[Received]) -> anyhow::Result<bool> {
    // webhook-id (msg_ and the uid without dashes) -> (tenant, payload) of every outbox row
    let rows = client
        .query(
            "select 'msg_' || replace(uid::text, '-', ''), tenant, payload::text from walhook.outbox",
            &[],
        )
        .await?;
    let mut outbox = HashMap::new();
    for row in rows {
        let payload: Value = serde_json::from_str(row.get(2))?;
        outbox.insert(
            row.get::<_, String>(0),
            (row.get::<_, Option<String>>(1), payload),
        );
    }
    // the tenant whose event a request carried; None for an event without one, Err for a request that
    // matches no outbox row (unknown webhook-id, or a body that is not that row's)
    let owner = |r: &Received| -> Result<Option<String>, ()> {
        let (tenant, payload) = outbox.get(&r.webhook_id).ok_or(())?;
        let body: Value = serde_json::from_slice(&r.body).map_err(|_| ())?;
        match body.get("data") == Some(payload) {
            true => Ok(tenant.clone()),
            false => Err(()),
        }
    };

    let mut isolated = true;
    println!("  tenants (each request matched to its outbox row by webhook-id and body):");
    for (tenant, path, n) in TENANTS {
        let other = other_than(tenant);
        let (mut own, mut others, mut unmatched, mut untenanted) = (HashSet::new(), 0, 0, 0);
        for r in received.iter().filter(|r| r.path == path) {
            match owner(r) {
                Ok(Some(t)) if t == tenant => {
                    own.insert(r.webhook_id.as_str());
                }
                Ok(Some(_)) => others += 1,
                Ok(None) => untenanted += 1,
                Err(()) => unmatched += 1,
            }
        }
        let ok = own.len() == n && others == 0 && untenanted == 0 && unmatched == 0;
        isolated &= ok;
        print!(
            "    {tenant:<6} {path:<8} got {} of its {n} events, {others} of {other}'s, {untenanted} without a tenant",
            own.len()
        );
        if unmatched > 0 {
            print!(", {unmatched} matching no outbox row");
        }
        println!("{}", if ok { "" } else { " (bug!)" });
    }
    let leaked = received
        .iter()
        .filter(|r| UNTENANTED.contains(&r.path.as_str()))
        .filter(|r| !matches!(owner(r), Ok(None)))
        .count();
    isolated &= leaked == 0;
    println!(
        "    {:<15} (no tenant) got {leaked} of the tenants' events{}",
        UNTENANTED.join(", "),
        if leaked == 0 { "" } else { " (bug!)" }
    );

    // what SQL recorded: each delivery's tenant is its event's, and its endpoint's
    let mut recorded = Vec::new();
    for (tenant, _, _) in TENANTS {
        let n: i64 = client
            .query_one(
                "select count(*) from walhook.deliveries where tenant = $1",
                &[&tenant],
            )
            .await?
            .get(0);
        recorded.push(format!("{n} for {tenant}"));
    }
    let crossed: i64 = client
        .query_one(
            "select count(*) from walhook.deliveries d
               join walhook.endpoints e on e.id = d.endpoint_id
               join walhook.outbox o on o.id = d.event_id
              where not e.all_tenants and (d.tenant is distinct from e.tenant or o.tenant is distinct from e.tenant)",
            &[],
        )
        .await?
        .get(0);
    isolated &= crossed == 0;
    println!(
        "    walhook.deliveries: {}, {crossed} to an endpoint of another tenant{}",
        recorded.join(", "),
        if crossed == 0 { "" } else { " (bug!)" }
    );

    // each tenant's own view, as its settings page would read it: row-level security shows its rows only
    for (tenant, _, n) in TENANTS {
        let tx = client.transaction().await?;
        tx.batch_execute("set local role walhook_tenant").await?;
        tx.execute("select set_config('walhook.tenant', $1, true)", &[&tenant])
            .await?;
        let row = tx
            .query_one(
                "select (select count(*) from walhook.endpoints), (select count(*) from walhook.outbox),
                        (select count(*) from walhook.deliveries),
                        (select count(*) from walhook.outbox where tenant is distinct from $1)
                        + (select count(*) from walhook.deliveries where tenant is distinct from $1)
                        + (select count(*) from walhook.endpoints where tenant is distinct from $1)",
                &[&tenant],
            )
            .await?;
        tx.rollback().await?;
        let (endpoints, events, deliveries, foreign): (i64, i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let ok = endpoints == 1 && events == n as i64 && deliveries == n as i64 && foreign == 0;
        isolated &= ok;
        println!(
            "    {tenant:<6} as walhook_tenant (row-level security) sees {endpoints} endpoint, {events} events, \
             {deliveries} deliveries, {foreign} rows not its own{}",
            if ok { "" } else { " (bug!)" }
        );
    }
    println!(
        "    {}",
        match isolated {
            true => "isolated: neither tenant saw the other's events",
            false => "NOT ISOLATED: a tenant saw what is not its own (bug!)",
        }
    );
    Ok(isolated)
}

/// The other demo tenant's name.
fn other_than(tenant: &str) -> &'static str {
    TENANTS
        .iter()
        .find(|(t, _, _)| *t != tenant)
        .map_or("", |t| t.0)
}
