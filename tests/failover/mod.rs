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
