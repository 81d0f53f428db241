//! Primary failover: a logical slot does not survive the promotion of a standby (PostgreSQL 15), so walhook
//! finds its slot missing on the new primary and recovers without losing an event.

use crate::support::*;
use walhook::cluster::{Cluster, ClusterOptions};

/// The throwaway pair works: the standby follows the primary and is promoted with a new timeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_follows_its_primary_and_is_promoted() {
    let pg = Pg::start_with(ClusterOptions::default()).await;
    let client = pg.client().await;
    publish(&client, "order.created", "{}").await;
    let primary = &pg.cluster;
    let standby: Cluster =
        tokio::task::block_in_place(|| primary.start_standby()).expect("standby");
    let standby_url = standby.url("app");
    let on_standby = walhook::store::connect_client(&standby_url.parse().unwrap())
        .await
        .unwrap();
    eventually("the standby has the primary's rows", || async {
        count(&on_standby, "select count(*) from walhook.outbox").await == 1
    })
    .await;
    assert_eq!(
        count(&on_standby, "select pg_is_in_recovery()::int::int8").await,
        1
    );
    tokio::task::block_in_place(|| primary.crash()).unwrap();
    tokio::task::block_in_place(|| standby.promote()).unwrap();
    let promoted = walhook::store::connect_client(&standby_url.parse().unwrap())
        .await
        .unwrap();
    assert_eq!(
        count(&promoted, "select pg_is_in_recovery()::int::int8").await,
        0
    );
    publish(&promoted, "order.created", "{}").await;
}

/// The URL of a primary and its standby, for a client that wants whichever accepts writes. The standby comes
/// first, so every connection must pass over it while it is one (the replication connection included).
fn pair_url(primary: &Cluster, standby: &Cluster) -> String {
    format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/app?target_session_attrs=read-write",
        standby.port(),
        primary.port()
    )
}

/// After a failover the slot is missing on the promoted standby (PostgreSQL 15 does not carry logical slots
/// over). walhook sees the server's timeline is past the slot's, re-creates the slot and queues what the old
/// primary committed but walhook had not streamed, then streams: every event delivered, both while it was
/// stopped across the switch and while it ran through it.
async fn a_failover_loses_no_event(running_through: bool) {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = walhook::receiver::Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/f"), &["*"]).await;
    let standby: Cluster =
        tokio::task::block_in_place(|| pg.cluster.start_standby()).expect("standby");
    let url = pair_url(&pg.cluster, &standby);
    let config = || {
        pg.config_with(|f| {
            f.merge(("database_url", url.as_str()))
                .merge(("replication.status_interval", "1s"))
        })
    };
    let daemon = Daemon::start(config());
    wait_streaming(&client).await;
    for i in 0..10 {
        publish(&client, "order.created", &format!("{{\"before\": {i}}}")).await;
    }
    wait_succeeded(&client, 10).await;
    eventually("the slot's timeline and progress are recorded", || async {
        count(
            &client,
            "select count(*) from walhook.slots where timeline = 1 and confirmed_at is not null",
        )
        .await
            == 1
    })
    .await;
    let daemon = if running_through {
        Some(daemon)
    } else {
        daemon.stop().await;
        // committed on the primary while walhook is stopped: never streamed from the old slot
        for i in 0..5 {
            publish(
                &client,
                "order.created",
                &format!("{{\"unstreamed\": {i}}}"),
            )
            .await;
        }
        None
    };
    let on_standby = walhook::store::connect_client(&standby.url("app").parse().unwrap())
        .await
        .unwrap();
    let committed = count(&client, "select count(*) from walhook.outbox").await;
    eventually("the standby has replayed everything", || async {
        count(&on_standby, "select count(*) from walhook.outbox").await == committed
    })
    .await;
    drop(client);
    tokio::task::block_in_place(|| pg.cluster.crash()).unwrap();
    tokio::task::block_in_place(|| standby.promote()).unwrap();
    let daemon = match daemon {
        Some(d) => d,
        None => Daemon::start(config()),
    };
    let promoted = walhook::store::connect_client(&standby.url("app").parse().unwrap())
        .await
        .unwrap();
    for i in 0..5 {
        publish(&promoted, "order.created", &format!("{{\"after\": {i}}}")).await;
    }
    let total = committed + 5;
    eventually("every event is delivered after the failover", || async {
        rx.distinct_ids("/f").len() as i64 == total
    })
    .await;
    wait_succeeded(&promoted, total).await;
    assert_eq!(
        count(
            &promoted,
            "select count(*) from pg_replication_slots where slot_name = 'walhook'"
        )
        .await,
        1,
        "the slot exists on the new primary"
    );
    assert_eq!(
        count(
            &promoted,
            "select count(*) from walhook.slots where timeline = 2"
        )
        .await,
        1
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_while_walhook_is_stopped_loses_no_event() {
    a_failover_loses_no_event(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_while_walhook_runs_loses_no_event() {
    a_failover_loses_no_event(true).await;
}
