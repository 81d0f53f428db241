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
use tokio_postgres::Client;
use walhook::receiver::{Receiver, Reply};

/// Sequential scans of the large tables so far, as the statistics system last heard of them.
async fn seq_scans(client: &Client) -> HashMap<String, i64> {
    client
        .query(
            "select relname::text, seq_scan from pg_stat_user_tables
              where schemaname = 'walhook' and relname in ('deliveries', 'attempts', 'outbox')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// How many times the dead deliveries' index was read: once per sample of the monitor (nothing else the
/// daemon runs reads it while retention has nothing to delete), so it counts the monitor's samples.
async fn samples(client: &Client) -> i64 {
    count(
        client,
        "select coalesce(sum(idx_scan), 0)::int8 from pg_stat_user_indexes
          where schemaname = 'walhook' and indexrelname = 'deliveries_dead'",
    )
    .await
}

/// Waits until the monitor has sampled `n` more times; statistics reach the server at most a second after
/// the statement, so this also lets what ran before reach them.
async fn wait_samples(client: &Client, n: i64) {
    let from = samples(client).await;
    eventually(&format!("the monitor samples {n} more times"), || async {
        samples(client).await >= from + n
    })
    .await;
}

/// Loads a day of history: 200k outbox rows (processed), a delivery of each (mostly succeeded, 1 % pending and
/// not due, 1 % dead, some pending ones keyed for the ordered endpoint) and an attempt of each, then analyzes
/// the tables so the planner knows their size.
async fn load_history(client: &Client, endpoints: &[i64], ordered: i64) {
    client
        .batch_execute(
            "insert into walhook.outbox (event_type, payload, created_at, processed_at)
             select 'history.item', jsonb_build_object('n', g), now() - interval '1 day',
                    now() - interval '1 day'
               from generate_series(1, 200000) g",
        )
        .await
        .unwrap();
    client
        .execute(
            "insert into walhook.deliveries
               (event_id, endpoint_id, webhook_id, status, attempts, next_attempt_at, last_attempt_at, last_error,
                ordering_key, commit_lsn, created_at, updated_at)
             select o.id, e.id, o.uid, s.status, 1,
                    case when s.status = 'pending' then now() + interval '1 day' end, now() - interval '1 day',
                    case when s.status <> 'succeeded' then 'HTTP 500' end,
                    case when s.status = 'pending' and e.id = $2 then 'history-' || (o.id % 50) end,
                    case when s.status = 'pending' and e.id = $2 then '0/0'::pg_lsn end,
                    now() - interval '1 day', now() - interval '1 day'
               from walhook.outbox o
              cross join lateral (select ($1::int8[])[1 + (o.id % cardinality($1::int8[]))::int] as id) e
              cross join lateral (select case when o.id % 100 = 0 then 'pending'
                                              when o.id % 100 = 1 then 'dead'
                                              else 'succeeded' end as status) s",
            &[&endpoints, &ordered],
        )
        .await
        .unwrap();
    client
        .batch_execute(
            "insert into walhook.attempts (delivery_id, attempt, attempted_at, duration_ms, status_code)
             select id, 1, last_attempt_at, 3, case when status = 'succeeded' then 200 else 500 end
               from walhook.deliveries;
             analyze walhook.outbox;
             analyze walhook.deliveries;
             analyze walhook.attempts;",
        )
        .await
        .unwrap();
}

both_sources!(periodic_statements_read_indexes_not_the_large_tables);
/// Issue "Trust" item 10 and review finding 3: the monitor counted pending deliveries with a scan of the whole
/// table, every `health.interval`, on every instance. Every periodic statement must read indexes only.
async fn periodic_statements_read_indexes_not_the_large_tables(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    rx.set_record_bodies(false);
    let (all, _) = add_endpoint(&client, &rx.url("/all"), &["*"]).await;
    let (ordered, _) = add_endpoint(&client, &rx.url("/ordered"), &["keyed.*"]).await;
    let (quiet, _) = add_endpoint(&client, &rx.url("/quiet"), &["quiet.*"]).await;
    client
        .execute(
            "update walhook.endpoints set ordered = true where id = $1",
            &[&ordered],
        )
        .await
        .unwrap();
    load_history(&client, &[all, ordered, quiet], ordered).await;

    // the monitor samples every 200ms; retention passes every second (it finds nothing old enough)
    let daemon = Daemon::start(pg.config_for_with(source, |f| {
        f.merge(("health.interval", "200ms"))
            .merge(("retention.interval", "1s"))
    }));
    wait_ready(source, &client).await;
    // warm up: every task has run its statements more than five times (prepared statements switch to a
    // generic plan after five), and what start-up read has reached the statistics
    let first = publish(&client, "order.created", "{}").await;
    assert!(
        rx.wait_until(DEADLINE, |r| r.iter().any(|r| r.path == "/all"))
            .await
    );
    wait_samples(&client, 15).await;
    let before = seq_scans(&client).await;

    // work while being watched: unordered and keyed events, the ordered endpoint's claims, status reads
    for i in 0..10 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
        client
            .execute(
                "insert into walhook.outbox (event_type, payload, ordering_key) values ('keyed.changed', $1::text::jsonb, $2)",
                &[&format!("{{\"i\": {i}}}"), &format!("live-{}", i % 3)],
            )
            .await
            .unwrap();
    }
    assert!(
        rx.wait_until(DEADLINE, |r| r
            .iter()
            .filter(|r| r.path == "/ordered" && r.status_sent == 200)
            .count()
            >= 10)
            .await,
        "the ordered endpoint gets its keyed events"
    );
    let db: walhook::conninfo::ConnInfo = pg.url.parse().unwrap();
    let status = match source {
        Source::Replication => walhook::status::read(&db, "walhook").await,
        Source::Notify => walhook::status::read_notify(&db).await,
    }
    .expect("walhook status reads");
    assert!(status.backlog.pending >= 2000, "{:?}", status.backlog);
    wait_samples(&client, 10).await;
    // a marker published after several samples: once it is delivered, every task has had its turns
    let marker = publish(&client, "marker.done", "{}").await;
    let marker_id: String = client
        .query_one(
            "select 'msg_' || replace(uid::text, '-', '') from walhook.outbox where id = $1",
            &[&marker],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        rx.wait_until(DEADLINE, |r| r.iter().any(|r| r.webhook_id == marker_id))
            .await,
        "the marker is delivered"
    );
    wait_samples(&client, 10).await;
    let after = seq_scans(&client).await;
    assert!(first < marker);
    for table in ["deliveries", "attempts", "outbox"] {
        assert_eq!(
            after[table], before[table],
            "walhook.{table} was scanned {} times while the daemon did its periodic work (and `walhook status` read)",
            after[table] - before[table]
        );
    }
    daemon.stop().await;
}

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

/// A store whose session is named `name` (the test's trigger tells the claimers apart by it).
async fn claimer(pg: &Pg, name: &str) -> walhook::store::Store {
    let mut config: walhook::conninfo::ConnInfo = pg.url.parse().unwrap();
    config.application_name(name);
    walhook::store::Store::connect(&config).await.unwrap()
}

/// Review finding 8 (issue "Trust" item 13): the ordered-head claim tested "pending" and "due" on the head as
/// its snapshot saw it, not on the row it locked. Under READ COMMITTED, a claimer that reaches a row another
/// claimer changed and committed after its snapshot locks the new version and re-evaluates only the
/// conditions on that row (EvalPlanQual), so it claimed a head already claimed, or already delivered.
///
/// Deterministic: a trigger holds claimer B on an advisory lock right after it locked its first head, with the
/// rest of its statement still to run under its old snapshot; meanwhile claimer A claims the other heads and
/// one of them is finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_head_claimed_or_finished_meanwhile_is_not_claimed_again() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let (endpoint, _) = add_endpoint(&client, "http://127.0.0.1:9/ordered", &["*"]).await;
    client
        .batch_execute(&format!(
            "update walhook.endpoints set ordered = true where id = {endpoint};
             -- one due head per key, a and b and c, each with a follower
             insert into walhook.deliveries
               (event_id, endpoint_id, webhook_id, status, next_attempt_at, ordering_key, commit_lsn,
                event_type, payload, event_created_at)
             select n, {endpoint}, gen_random_uuid(), 'pending', now() - interval '1 minute',
                    chr(ascii('a') + (n - 1) % 3), ('0/' || to_hex(n * 16))::pg_lsn,
                    'item.changed', '{{}}', now()
               from generate_series(1, 6) n;
             -- and some history, so the planner claims row by row as it does on a real table
             insert into walhook.deliveries (event_id, endpoint_id, webhook_id, status)
             select n, {endpoint}, gen_random_uuid(), 'succeeded' from generate_series(7, 5000) n;
             analyze walhook.deliveries;
             create function public.hold_claims() returns trigger language plpgsql as $$
             begin
               if current_setting('application_name') = 'claimer-b' then
                 perform pg_advisory_xact_lock(4242);
               end if;
               return new;
             end $$;
             create trigger hold_claims before update on walhook.deliveries
               for each row execute function public.hold_claims();
             select pg_advisory_lock(4242);"
        ))
        .await
        .unwrap();
    let head = |key: &'static str| {
        let client = &client;
        async move {
            count(
                client,
                &format!(
                    "select id from walhook.deliveries where ordering_key = '{key}' order by commit_lsn limit 1"
                ),
            )
            .await
        }
    };
    let (a, b, c) = (head("a").await, head("b").await, head("c").await);
    let lease = Duration::from_secs(60);

    let claimer_b = claimer(&pg, "claimer-b").await;
    let b_claims = tokio::spawn(async move {
        claimer_b
            .claim_ordered(10, lease, &[endpoint], &[10], false)
            .await
            .unwrap()
    });
    eventually("claimer B holds its first head and waits", || async {
        count(
            &client,
            "select count(*) from pg_stat_activity
              where application_name = 'claimer-b' and wait_event_type = 'Lock'",
        )
        .await
            == 1
    })
    .await;

    // A finds the head B holds locked and skips it; it claims the other two, and one of them is delivered
    let claimer_a = claimer(&pg, "claimer-a").await;
    let got_a: HashSet<i64> = claimer_a
        .claim_ordered(10, lease, &[endpoint], &[10], false)
        .await
        .unwrap()
        .iter()
        .map(|c| c.delivery_id)
        .collect();
    assert_eq!(got_a, HashSet::from([b, c]));
    client
        .execute(
            "update walhook.deliveries set status = 'succeeded', next_attempt_at = null where id = $1",
            &[&c],
        )
        .await
        .unwrap();
    client
        .batch_execute("select pg_advisory_unlock(4242)")
        .await
        .unwrap();

    let got_b: HashSet<i64> = b_claims
        .await
        .unwrap()
        .iter()
        .map(|c| c.delivery_id)
        .collect();
    assert_eq!(
        got_b,
        HashSet::from([a]),
        "B claims only the head it locked first: not b, which A holds, nor c, which A delivered"
    );
}

/// The notify source's index by key came after its first release: a daemon whose role may not create it (the
/// owner ran the statements printed by an older walhook) starts without it, warns, and delivers ordered
/// endpoints' events in order all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notify_installation_without_the_index_by_key_keeps_delivering_in_order() {
    let pg = Pg::start_for(Source::Notify).await;
    let client = pg.client().await;
    client
        .batch_execute(
            "create role app_daemon login in role walhook_daemon;
             create index outbox_unprocessed on walhook.outbox (id) where processed_at is null;
             create trigger outbox_wake after insert on walhook.outbox
               for each statement execute function walhook.outbox_wake();",
        )
        .await
        .unwrap();
    let rx = Receiver::start().await.unwrap();
    let (ordered, _) = add_endpoint(&client, &rx.url("/ordered"), &["*"]).await;
    client
        .execute(
            "update walhook.endpoints set ordered = true where id = $1",
            &[&ordered],
        )
        .await
        .unwrap();
    let url = pg.url_as("app_daemon");
    let daemon = Daemon::start(
        pg.config_for_with(Source::Notify, |f| f.merge(("database_url", url.as_str()))),
    );
    wait_listening(&client, 1).await;
    for n in 0..6 {
        client
            .execute(
                "insert into walhook.outbox (event_type, payload, ordering_key) values ('item.changed', $1::text::jsonb, 'k')",
                &[&format!("{{\"n\": {n}}}")],
            )
            .await
            .unwrap();
    }
    wait_succeeded(&client, 6).await;
    let order: Vec<i64> = rx
        .received()
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            v["data"]["n"].as_i64().unwrap()
        })
        .collect();
    assert_eq!(order, (0..6).collect::<Vec<_>>());
    assert_eq!(
        count(
            &client,
            "select count(*) from pg_class where oid = to_regclass('walhook.outbox_unprocessed_keys')"
        )
        .await,
        0,
        "the daemon's role may not create it"
    );
    daemon.stop().await;
}

/// A delivery's outcome as the recorder writes it: a parked row (no attempt) or an answered attempt.
fn outcome(event_id: i64, endpoint_id: i64, answered: Option<i32>) -> walhook::store::RecordRow {
    use walhook::store::{AttemptRow, RecordRow, Status};
    RecordRow {
        event_id,
        endpoint_id,
        uid_hex: format!("{event_id:032x}"),
        status: if answered.is_some() {
            Status::Succeeded
        } else {
            Status::Pending
        },
        schedule_step: answered.map_or(0, |_| 1),
        next_attempt_at: answered.is_none().then(SystemTime::now),
        attempt: answered.map(|code| AttemptRow {
            attempted_at: SystemTime::now(),
            duration_ms: 3,
            status_code: Some(code),
            error: None,
            response_body: Some("ok".into()),
        }),
        copy: None,
        ordering: None,
        tenant: None,
    }
}

/// First outcomes are written with a plain insert (cheaper than the upsert). When one of them was recorded
/// meanwhile (a replay, an instance that streamed before), the batch is merged as an upsert instead: nothing
/// is refused, lost or written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_first_outcomes_that_meets_a_recorded_delivery_is_merged() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let (endpoint, _) = add_endpoint(&client, "http://127.0.0.1:9/", &["*"]).await;
    let store = walhook::store::Store::connect(&pg.url.parse().unwrap())
        .await
        .unwrap();
    // event 1 parked by another instance; then this one's batch of first outcomes holds 1, 2 and 3
    store
        .record(&[&outcome(1, endpoint, None)], &[], true)
        .await
        .expect("a parked first outcome is inserted");
    let batch = [
        outcome(1, endpoint, Some(200)),
        outcome(2, endpoint, Some(200)),
        outcome(3, endpoint, Some(200)),
    ];
    store
        .record(&batch.iter().collect::<Vec<_>>(), &[], true)
        .await
        .expect("the batch is merged, not refused");
    let rows = client
        .query(
            "select d.event_id, d.status, d.attempts, count(a.id)
               from walhook.deliveries d left join walhook.attempts a on a.delivery_id = d.id
              group by d.id order by d.event_id",
            &[],
        )
        .await
        .unwrap();
    let seen: Vec<(i64, String, i32, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let succeeded = |id| (id, "succeeded".to_string(), 1, 1);
    assert_eq!(seen, vec![succeeded(1), succeeded(2), succeeded(3)]);
    // and a batch without a recorded delivery is simply inserted
    store
        .record(&[&outcome(4, endpoint, Some(204))], &[], true)
        .await
        .unwrap();
    assert_eq!(
        count(&client, "select count(*) from walhook.attempts").await,
        4
    );
}

/// walhook's sessions run without JIT: its statements are short and run over and over, and a plan costed on
/// statistics taken while a table was small made the server compile a claim for most of a second. Options
/// the user gives in `database_url` still win.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walhook_sessions_run_without_jit_unless_the_url_says_otherwise() {
    let pg = Pg::start().await;
    let show = |url: String| async move {
        let client = walhook::store::connect_client(&url.parse().unwrap())
            .await
            .unwrap();
        let row = client
            .query_one(
                "select current_setting('jit'), current_setting('synchronous_commit')",
                &[],
            )
            .await
            .unwrap();
        (row.get::<_, String>(0), row.get::<_, String>(1))
    };
    assert_eq!(show(pg.url.clone()).await, ("off".into(), "on".into()));
    let sep = if pg.url.contains('?') { '&' } else { '?' };
    assert_eq!(
        show(format!("{}{sep}options=-c%20jit%3Don", pg.url)).await,
        ("on".into(), "on".into())
    );
}
