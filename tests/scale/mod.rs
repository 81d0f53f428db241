//! Several daemons on one database (DESIGN.md, "Scaling past one machine"): with `replication` exactly one
//! streams the slot and the others stand by and take over when it dies; retries and notify claims are shared
//! through leases. Every instance is the real binary, killed with SIGKILL mid-load.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use crate::support::*;
use walhook::receiver::{Receiver, Reply};

/// How long a retried attempt takes to answer: a second request for the same delivery arriving within it
/// would mean two instances attempt it at once.
const SLOW_RETRY: Duration = Duration::from_millis(300);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Replication,
    Notify,
}

/// The environment of instance `n`: its own `application_name`, so the test can tell who streams.
fn instance_env(pg: &Pg, kind: Kind, n: usize) -> Vec<(String, String)> {
    let sep = if pg.url.contains('?') { '&' } else { '?' };
    let mut env: Vec<(String, String)> = pg
        .env()
        .into_iter()
        .filter(|(k, _)| k != "WALHOOK_DATABASE_URL")
        .collect();
    let mut more = vec![
        (
            "WALHOOK_DATABASE_URL".to_string(),
            format!("{}{sep}application_name=walhook-{n}", pg.url),
        ),
        (
            "WALHOOK_REPLICATION__STANDBY_INTERVAL".into(),
            "200ms".into(),
        ),
    ];
    if kind == Kind::Notify {
        more.extend([
            ("WALHOOK_SOURCE".to_string(), "notify".to_string()),
            ("WALHOOK_NOTIFY__POLL_INTERVAL".into(), "100ms".into()),
            ("WALHOOK_NOTIFY__LEASE".into(), "2s".into()),
            ("WALHOOK_NOTIFY__BATCH_SIZE".into(), "50".into()),
        ]);
    }
    env.extend(more);
    env
}

/// Kills the child (SIGKILL) when dropped, so a failing assertion leaves no daemon behind.
struct Instance(std::process::Child);

impl Instance {
    fn kill_9(mut self) {
        self.0.kill().expect("SIGKILL");
        self.0.wait().expect("reap");
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `application_name` of the session streaming the slot, if any.
async fn streaming_instance(client: &tokio_postgres::Client) -> Option<String> {
    client
        .query_opt(
            "select a.application_name from pg_replication_slots s join pg_stat_activity a on a.pid = s.active_pid
              where s.slot_name = 'walhook'",
            &[],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

/// Sessions holding a slot's leadership lock (advisory, class "whsl").
async fn leaders(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query(
            "select a.application_name from pg_locks l join pg_stat_activity a on a.pid = l.pid
              where l.locktype = 'advisory' and l.granted and l.classid = 2003333996::bigint::oid
              order by 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// About one first attempt in five fails: those deliveries go through the retry scheduler.
fn fails_first(webhook_id: &str) -> bool {
    webhook_id.bytes().map(u32::from).sum::<u32>() % 5 == 0
}

/// Commits events in small transactions until `total`, pausing a little between them.
fn start_writer(pg: &Pg, total: usize) -> tokio::task::JoinHandle<()> {
    let url = pg.url.clone();
    tokio::spawn(async move {
        let mut client = walhook::store::connect_client(&url.parse().unwrap())
            .await
            .unwrap();
        let mut i = 0;
        while i < total {
            let tx = client.transaction().await.unwrap();
            for _ in 0..5 {
                tx.execute(
                    "insert into walhook.outbox (event_type, payload) values ('order.created', $1::text::jsonb)",
                    &[&format!("{{\"i\": {i}}}")],
                )
                .await
                .unwrap();
                i += 1;
            }
            tx.commit().await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

/// No request for a delivery arrived while an earlier one for it was still being answered.
fn assert_never_attempted_twice_at_once(rx: &Receiver) {
    let mut by_id: HashMap<String, Vec<(SystemTime, u16)>> = HashMap::new();
    for r in rx.received() {
        by_id
            .entry(r.webhook_id.clone())
            .or_default()
            .push((r.arrived, r.status_sent));
    }
    // the receiver numbers requests per (path, webhook-id) in arrival order: the first is answered at once
    for (id, mut arrivals) in by_id {
        arrivals.sort();
        for (i, pair) in arrivals.windows(2).enumerate() {
            let (first, second) = (pair[0].0, pair[1].0);
            // only later requests are slow; the first one is answered at once
            let busy_until = if i == 0 { first } else { first + SLOW_RETRY };
            let gap = second.duration_since(first).unwrap_or_default();
            assert!(
                second >= busy_until || gap >= SLOW_RETRY,
                "{id} was requested again {gap:?} after an attempt that took {SLOW_RETRY:?}"
            );
        }
    }
}

/// Three instances under load; the one streaming (or, with notify, any one) is killed, then another: every
/// committed event is still delivered, retries included, and no delivery is attempted twice at once.
async fn three_instances_survive_two_kills(kind: Kind) {
    const EVENTS: usize = 900;
    let pg = match kind {
        Kind::Replication => Pg::start().await,
        Kind::Notify => {
            Pg::start_with(walhook::cluster::ClusterOptions {
                wal_level: walhook::cluster::WalLevel::Replica,
                ..Default::default()
            })
            .await
        }
    };
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    rx.set_record_bodies(false);
    rx.set_responder(|r, n| {
        if n == 1 && fails_first(&r.webhook_id) {
            Reply::Status(500)
        } else if n == 1 {
            Reply::Status(200)
        } else {
            Reply::Delay(SLOW_RETRY, 200)
        }
    });
    add_endpoint(&client, &rx.url("/a"), &["*"]).await;
    let mut instances: HashMap<String, Instance> = (1..=3)
        .map(|n| {
            let env = instance_env(&pg, kind, n);
            (
                format!("walhook-{n}"),
                Instance(spawn_binary(&["run"], &env)),
            )
        })
        .collect();
    if kind == Kind::Replication {
        eventually("one instance streams, two stand by", || async {
            streaming_instance(&client).await.is_some()
                && leaders(&client).await.len() == 1
                && count(
                    &client,
                    "select count(*) from pg_stat_activity where application_name like 'walhook-%'
                      and query like '%pg_try_advisory_lock%'",
                )
                .await
                    >= 3
        })
        .await;
    }

    let writer = start_writer(&pg, EVENTS);
    let mut killed = Vec::new();
    for round in 1..=2 {
        let progress = EVENTS / 3 * round;
        assert!(
            rx.wait_until(DEADLINE, |r| r.len() >= progress).await,
            "deliveries reach {progress} before kill {round}"
        );
        let victim = match kind {
            Kind::Replication => streaming_instance(&client)
                .await
                .expect("an instance streams"),
            Kind::Notify => format!("walhook-{round}"),
        };
        instances.remove(&victim).expect("a live instance").kill_9();
        killed.push(victim.clone());
        if kind == Kind::Replication {
            eventually("a standby takes the slot over", || async {
                streaming_instance(&client)
                    .await
                    .is_some_and(|s| !killed.contains(&s))
            })
            .await;
            assert_eq!(leaders(&client).await.len(), 1, "exactly one leader");
        }
    }
    writer.await.unwrap();

    wait_succeeded(&client, EVENTS as i64).await;
    assert_eq!(rx.distinct_ids("/a").len(), EVENTS);
    assert_eq!(
        count(
            &client,
            "select count(*) from walhook.deliveries where status <> 'succeeded'"
        )
        .await,
        0
    );
    let retried = count(
        &client,
        "select count(*) from walhook.deliveries where attempts > 1",
    )
    .await;
    assert!(
        retried >= (EVENTS / 10) as i64,
        "retries went through the shared scheduler: {retried}"
    );
    if kind == Kind::Notify {
        assert_eq!(
            count(
                &client,
                "select count(*) from walhook.outbox where processed_at is null"
            )
            .await,
            0
        );
    }
    assert_never_attempted_twice_at_once(&rx);
    // the survivor carries on alone
    let last = instances.keys().next().unwrap().clone();
    if kind == Kind::Replication {
        assert_eq!(streaming_instance(&client).await, Some(last));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replication_instances_survive_killing_the_streaming_one_twice() {
    three_instances_survive_two_kills(Kind::Replication).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_notify_instances_survive_killing_two() {
    three_instances_survive_two_kills(Kind::Notify).await;
}

/// A standby is told who streams, is ready, and takes over on a graceful stop too; `recover-slot` refuses
/// while an instance leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_after_a_graceful_stop_and_recover_slot_refuses_meanwhile() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/a"), &["*"]).await;
    let first = Daemon::start(pg.config());
    wait_streaming(&client).await;
    let second =
        Daemon::start(pg.config_with(|f| f.merge(("replication.standby_interval", "100ms"))));
    eventually("the second instance stands by", || async {
        count(
            &client,
            "select count(*) from pg_stat_activity where query like '%pg_try_advisory_lock%'",
        )
        .await
            >= 2
    })
    .await;
    assert!(!second.is_finished(), "a standby does not fail");
    let db: walhook::conninfo::ConnInfo = pg.url.parse().unwrap();
    eventually(
        "walhook status names the leader and one standby",
        || async {
            let screen = walhook::status::read(&db, "walhook")
                .await
                .unwrap()
                .render();
            screen.contains("leader     walhook (pid ")
                && screen.contains(", 1 instance standing by")
        },
    )
    .await;

    let recover = walhook::daemon::recover_slot(pg.config(), None).await;
    let err = recover.expect_err("recover-slot refuses while an instance leads");
    assert!(
        err.to_string().contains("stop every walhook instance"),
        "{err}"
    );

    publish(&client, "order.created", "{}").await;
    wait_succeeded(&client, 1).await;
    first.stop().await;
    wait_streaming(&client).await;
    publish(&client, "order.created", "{}").await;
    wait_succeeded(&client, 2).await;
    assert_eq!(rx.distinct_ids("/a").len(), 2);
    second.stop().await;
}
