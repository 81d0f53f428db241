//! Queries: what the daemon asks PostgreSQL over and over stays cheap and correct as the tables grow, and
//! claims made concurrently never hand the same row to two claimers.
//!
//! The daemon's periodic statements (the monitor's sample, the scheduler's claims, the endpoint refresh and
//! state writer, the notify source's claims and renewals, retention) run on every instance every few
//! milliseconds to seconds, for as long as it runs: each one that scanned `walhook.deliveries`,
//! `walhook.attempts` or `walhook.outbox` would cost more with every day of retention. The tests here load
//! those tables as a long-running deployment would, let the daemon work, and count sequential scans.
//!
//! Claims are tested where they race: two claimers interleaved at a chosen point (a trigger holds one on an
//! advisory lock the test releases), and the notify source's leases while a backlog keeps it claiming.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use crate::support::*;
use walhook::receiver::{Receiver, Reply};

/// Review finding 9 (issue "Trust" item 13): while a backlog kept the notify source's claims full, its loop
/// never reached the timer that renews leases, so rows held longer than `notify.lease` (an attempt to a slow
/// endpoint in flight) were claimed again and sent again, with no crash. Here the first rows' requests to B
/// take 8 s, the lease is 3 s, and rows keep coming faster than they are claimed until those requests have been
/// open well past their lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_leases_are_renewed_while_a_backlog_keeps_claims_full() {
    const SLOW: Duration = Duration::from_secs(8);
    const LEASE: Duration = Duration::from_secs(3);
    let pg = Pg::start_for(Source::Notify).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    rx.set_record_bodies(false);
    rx.set_responder(|r, _| {
        if r.path == "/b" {
            Reply::Delay(SLOW, 200)
        } else {
            Reply::Status(200)
        }
    });
    // the backlog's rows match no endpoint: nothing downstream fills the in-flight budget, so the source
    // itself is the bottleneck and claims come back full for as long as rows keep coming
    add_endpoint(&client, &rx.url("/a"), &["slow.*"]).await;
    let (b, _) = add_endpoint(&client, &rx.url("/b"), &["slow.*"]).await;
    // B takes every request at once (a re-sent row is not held back in its queue) and waits 20 s for answers
    client
        .execute(
            "update walhook.endpoints set timeout = '20s', max_in_flight = 1000 where id = $1",
            &[&b],
        )
        .await
        .unwrap();
    let daemon = Daemon::start(pg.config_for_with(Source::Notify, |f| {
        // small claims: fewer rows make the same number of turns of the claim loop
        f.merge(("notify.lease", "3s"))
            .merge(("notify.batch_size", 50))
    }));
    wait_ready(Source::Notify, &client).await;

    let slow = 20i64;
    client
        .execute(
            "insert into walhook.outbox (event_type, payload)
             select 'slow.item', jsonb_build_object('n', n) from generate_series(1, $1::int8) n",
            &[&slow],
        )
        .await
        .unwrap();
    // keep thousands of rows waiting, so that every claim comes back full, until B's first requests have been
    // open for longer than the lease and a renewal
    let mut added = 0i64;
    let until = std::time::Instant::now() + DEADLINE;
    loop {
        assert!(
            std::time::Instant::now() < until,
            "B's first requests never came"
        );
        let first_b = rx
            .received()
            .iter()
            .filter(|r| r.path == "/b")
            .map(|r| r.arrived)
            .min();
        if first_b.is_some_and(|t| {
            SystemTime::now().duration_since(t).unwrap_or_default() > LEASE + Duration::from_secs(2)
        }) {
            break;
        }
        let waiting = count(
            &client,
            "select count(*) from walhook.outbox
              where processed_at is null and (claimed_until is null or claimed_until <= now())",
        )
        .await;
        if waiting < 1000 {
            client
                .execute(
                    "insert into walhook.outbox (event_type, payload)
                     select 'bulk.item', jsonb_build_object('n', n) from generate_series(1, 1000) n",
                    &[],
                )
                .await
                .unwrap();
            added += 1000;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(added > 0, "the backlog was kept up");
    // B's requests complete, every row is recorded and marked
    assert!(
        rx.wait_until(DEADLINE, |r| {
            let answered: HashSet<&str> = r
                .iter()
                .filter(|r| r.path == "/b" && r.status_sent == 200)
                .map(|r| r.webhook_id.as_str())
                .collect();
            answered.len() == slow as usize
        })
        .await,
        "B answers every slow event"
    );
    wait_all_processed(&client).await;

    let to_b: Vec<_> = rx
        .received()
        .into_iter()
        .filter(|r| r.path == "/b")
        .collect();
    let mut per_id: HashMap<&str, Vec<SystemTime>> = HashMap::new();
    for r in &to_b {
        per_id.entry(&r.webhook_id).or_default().push(r.arrived);
    }
    // a second request for an id while the first (answered after SLOW) was still open
    let overlapping: Vec<&str> = per_id
        .iter()
        .filter(|(_, times)| {
            let first = times.iter().min().unwrap();
            times
                .iter()
                .any(|t| t > first && t.duration_since(*first).unwrap_or_default() < SLOW)
        })
        .map(|(id, _)| *id)
        .collect();
    assert!(
        overlapping.is_empty(),
        "B got {} webhook-ids again while their first request was open (leases lapsed): {overlapping:?}",
        overlapping.len()
    );
    let twice = per_id.values().filter(|t| t.len() > 1).count();
    assert_eq!(
        twice,
        0,
        "no webhook-id reaches B twice ({} requests)",
        to_b.len()
    );
    assert_eq!(per_id.len(), slow as usize);
    daemon.stop().await;
}
