//! Running walhook in production: the systemd notify protocol, `/metrics` and `/readyz`, the graceful drain
//! under load, the shipped unit, alert rules and dashboard. Process-wide state (the notify socket, the
//! metrics recorder) means most of these run the real binary.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::support::*;
use walhook::receiver::{Receiver, Reply};

/// A free TCP port on loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on 127.0.0.1:port: (status code, body); `None` while nothing listens.
async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let code = response.get(9..12)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_string();
    Some((code, body))
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "walhook-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The real binary as a child process, killed if the test ends (or panics) while it runs.
struct Running(std::process::Child);

impl Running {
    fn spawn(args: &[&str], env: &[(String, String)]) -> Running {
        Running(spawn_binary(args, env))
    }
}

impl std::ops::Deref for Running {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // a no-op once the child has been waited for
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sigterm(child: &std::process::Child) {
    // SAFETY: kill(2) with the pid of a child we own
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
}

fn env_with(pg: &Pg, more: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = pg.env();
    env.retain(|(k, _)| !more.iter().any(|(m, _)| m == k));
    env.extend(more.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_status_watchdog_then_stopping_in_order() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/x"), &["*"]).await;
    let dir = TempDir::new("notify");
    let socket_path = dir.0.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    // read continuously, as systemd does: a datagram socket's queue is short and a full one drops messages
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (log, done) = (log.clone(), done.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    log.lock().unwrap().push(text);
                }
            }
        })
    };
    let env = env_with(
        &pg,
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            // systemd sets these with WatchdogSec=; the daemon pings at half the period
            ("WATCHDOG_USEC", "400000"),
            ("WALHOOK_HEALTH__INTERVAL", "100ms"),
        ],
    );
    let mut child = Running::spawn(&["run"], &env);

    let has = |m: &[String], what: &str| m.iter().any(|s| s.lines().any(|l| l == what));
    eventually(
        "READY=1, two WATCHDOG=1 and a streaming STATUS=",
        || async {
            let m = log.lock().unwrap();
            has(&m, "READY=1")
                && m.iter().filter(|s| s.contains("WATCHDOG=1")).count() >= 2
                && m.iter().any(|s| s.contains("STATUS=streaming; lag"))
        },
    )
    .await;
    publish(&client, "order.created", "{}").await;
    wait_succeeded(&client, 1).await;
    sigterm(&child);
    eventually("STOPPING=1", || async {
        has(&log.lock().unwrap(), "STOPPING=1")
    })
    .await;
    let status = tokio::task::block_in_place(|| child.wait()).unwrap();
    assert!(status.success(), "exit status {status:?}");
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().unwrap();
    let messages = log.lock().unwrap().clone();

    // only STATUS= lines come before READY=1, which comes once; no "streaming" status follows STOPPING=1
    let ready = messages.iter().position(|m| m.contains("READY=1")).unwrap();
    assert!(
        messages[..ready]
            .iter()
            .all(|m| m.lines().all(|l| l.starts_with("STATUS="))),
        "{messages:?}"
    );
    assert_eq!(messages.iter().filter(|m| m.contains("READY=1")).count(), 1);
    let stopping = messages
        .iter()
        .position(|m| m.contains("STOPPING=1"))
        .unwrap();
    let watchdog = messages
        .iter()
        .position(|m| m.contains("WATCHDOG=1"))
        .unwrap();
    assert!(ready < watchdog && watchdog < stopping, "{messages:?}");
    let status_line = messages
        .iter()
        .find(|m| m.contains("STATUS=streaming; lag"))
        .unwrap();
    assert!(status_line.contains("requests in flight"), "{status_line}");
    assert!(
        messages[stopping..]
            .iter()
            .all(|m| !m.contains("STATUS=streaming")),
        "{messages:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_readyz_and_healthz_on_http_listen() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    rx.set_responder(|r, _| match r.path.as_str() {
        "/fail" => Reply::Status(500),
        _ => Reply::Status(200),
    });
    // many endpoints: the number of series must not grow with them
    for i in 0..40 {
        add_endpoint(&client, &rx.url(&format!("/ok{i}")), &["order.*"]).await;
    }
    add_endpoint(&client, &rx.url("/fail"), &["order.*"]).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let env = env_with(
        &pg,
        &[
            ("WALHOOK_HTTP__LISTEN", listen.as_str()),
            ("WALHOOK_HEALTH__INTERVAL", "100ms"),
            ("WALHOOK_DELIVERY__RETRY_SCHEDULE", ""),
        ],
    );
    let mut child = Running::spawn(&["run"], &env);
    // right after start, before anything happened: every documented series is there (dashboards show 0,
    // not "no data"), labelled ones with each label value
    let first = loop {
        if let Some((200, text)) = http_get(port, "/metrics").await {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let documented = documented_metrics();
    assert!(documented.len() >= 19, "{documented:?}");
    for name in &documented {
        assert!(
            first.lines().any(|l| l.starts_with(name.as_str())),
            "{name} missing at start from\n{first}"
        );
    }
    for outcome in walhook::metrics::OUTCOMES {
        let series = format!("walhook_deliveries_total{{outcome=\"{outcome}\"}} 0");
        assert!(first.lines().any(|l| l == series), "{series}: {first}");
    }
    for state in walhook::metrics::BREAKER_STATES {
        let series = format!("walhook_circuit_breakers{{state=\"{state}\"}}");
        assert!(first.contains(&series), "{series}: {first}");
    }
    assert!(
        first
            .lines()
            .any(|l| l == "walhook_source{source=\"replication\"} 1"),
        "{first}"
    );
    for table in walhook::metrics::RETENTION_TABLES {
        let series = format!("walhook_retention_deleted_rows_total{{table=\"{table}\"}} 0");
        assert!(first.lines().any(|l| l == series), "{series}: {first}");
    }
    wait_streaming(&client).await;
    eventually("/readyz answers 200 once streaming", || async {
        matches!(http_get(port, "/readyz").await, Some((200, _)))
    })
    .await;
    assert_eq!(http_get(port, "/healthz").await.unwrap().0, 200);
    for i in 0..5 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    eventually("every delivery is final", || async {
        count(
            &client,
            "select count(*) from walhook.deliveries where status in ('succeeded', 'dead')",
        )
        .await
            == 5 * 41
    })
    .await;
    let until = Instant::now() + DEADLINE;
    let text = loop {
        // the sampler reads the dead count from SQL every health.interval
        let text = http_get(port, "/metrics").await.unwrap().1;
        if text.lines().any(|l| l == "walhook_dead_deliveries 5") {
            break text;
        }
        assert!(Instant::now() < until, "dead count never sampled:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for needle in [
        // 5 published, 5 walhook.delivery.dead (the dead deliveries, told through the pipeline)
        "walhook_events_received_total 10",
        "walhook_deliveries_total{outcome=\"delivered\"} 200",
        "walhook_deliveries_total{outcome=\"dead\"} 5",
        "walhook_attempt_duration_seconds_bucket{le=\"+Inf\"} 205",
        "walhook_delivery_latency_seconds_bucket{le=\"+Inf\"} 200",
        "walhook_requests_in_flight 0",
        "walhook_pending_deliveries 0",
        "walhook_streaming 1",
        "walhook_slot_lost 0",
        "walhook_replication_lag_seconds ",
        "walhook_replication_lag_bytes ",
        "walhook_slot_retained_wal_bytes ",
        "# TYPE walhook_delivery_latency_seconds histogram",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(needle)),
            "{needle:?} missing from\n{text}"
        );
    }
    // bounded cardinality: no label carries an endpoint or event identity
    let series = text.lines().filter(|l| !l.starts_with('#')).count();
    assert!(series < 120, "{series} series:\n{text}");
    // (descriptions, on # lines, may say "endpoint"; series may not)
    let samples: String = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(!samples.contains("endpoint"), "{text}");
    assert!(!samples.contains("127.0.0.1"), "{text}");

    sigterm(&child);
    let status = tokio::task::block_in_place(|| child.wait()).unwrap();
    assert!(status.success(), "exit status {status:?}");
}

/// The metric names in the README's metrics table.
fn documented_metrics() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    readme
        .lines()
        .skip_while(|l| !l.starts_with("## Metrics"))
        .skip(1)
        .take_while(|l| !l.starts_with("## "))
        .filter(|l| l.starts_with("| `walhook_"))
        .flat_map(|l| l.split('|').nth(1).unwrap_or("").split('`'))
        .filter(|w| w.starts_with("walhook_"))
        .map(|w| w.split('{').next().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_notify_walhook_streaming_is_0_and_readyz_answers_200() {
    let pg = Pg::start_for(Source::Notify).await;
    let client = pg.client().await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut env = env_with(&pg, &[("WALHOOK_HTTP__LISTEN", listen.as_str())]);
    env.extend(
        pg.env_for(Source::Notify)
            .into_iter()
            .filter(|(k, _)| k.starts_with("WALHOOK_SOURCE") || k.starts_with("WALHOOK_NOTIFY")),
    );
    let mut child = Running::spawn(&["run"], &env);
    wait_listening(&client, 1).await;
    eventually(
        "/readyz answers 200 once the notify source is prepared",
        || async { matches!(http_get(port, "/readyz").await, Some((200, _))) },
    )
    .await;
    let text = http_get(port, "/metrics").await.unwrap().1;
    assert!(text.lines().any(|l| l == "walhook_streaming 0"), "{text}");
    assert!(text.lines().any(|l| l == "walhook_standby 0"), "{text}");
    assert!(
        text.lines()
            .any(|l| l == "walhook_source{source=\"notify\"} 1"),
        "{text}"
    );
    sigterm(&child);
    let status = tokio::task::block_in_place(|| child.wait()).unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_under_load_loses_nothing_confirms_the_slot_and_exits_in_time() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    // slow answers keep many attempts in flight when the signal arrives
    rx.set_responder(|_, _| Reply::Delay(Duration::from_millis(400), 200));
    add_endpoint(&client, &rx.url("/slow"), &["*"]).await;
    let drain_timeout = Duration::from_secs(20);
    let env = env_with(&pg, &[("WALHOOK_SHUTDOWN__DRAIN_TIMEOUT", "20s")]);
    let mut child = Running::spawn(&["run"], &env);
    wait_streaming(&client).await;

    // a writer commits events throughout, before and after the signal
    let writer = {
        let client = pg.client().await;
        tokio::spawn(async move {
            for i in 0..400 {
                publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
            }
        })
    };
    assert!(rx.wait_until(DEADLINE, |r| r.len() >= 40).await);
    let signalled = Instant::now();
    sigterm(&child);
    let status = tokio::task::block_in_place(|| child.wait()).unwrap();
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status:?}");
    // generous slack on a loaded machine, but well under "the timeout fired and then some"
    assert!(
        took < drain_timeout + Duration::from_secs(10),
        "drain took {took:?}"
    );
    writer.await.unwrap();

    // every request that reached the receiver has its outcome recorded
    let answered = rx.distinct_ids("/slow");
    let recorded = count(
        &client,
        "select count(*) from walhook.deliveries where status = 'succeeded'",
    )
    .await;
    assert!(
        recorded >= answered.len() as i64,
        "recorded {recorded} < answered {}",
        answered.len()
    );
    assert!(recorded > 0);
    // the slot was confirmed up to what is recorded: what it still holds is the unrecorded rest ...
    eventually("the walsender has let go of the slot", || async {
        count(
            &client,
            "select count(*) from pg_replication_slots where slot_name = 'walhook' and active",
        )
        .await
            == 0
    })
    .await;
    // the test cluster commits asynchronously and decoding reads only flushed WAL: wait for the WAL writer
    let written: String = client
        .query_one("select pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    eventually("the WAL is flushed", || async {
        client
            .query_one(
                "select pg_current_wal_flush_lsn() >= $1::text::pg_lsn",
                &[&written],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
    let still_in_slot = count(
        &client,
        "select count(*) from pg_logical_slot_peek_binary_changes('walhook', null, null,
           'proto_version', '1', 'publication_names', 'walhook') where get_byte(data, 0) = ascii('I')",
    )
    .await;
    let unrecorded = count(
        &client,
        "select count(*) from walhook.outbox o
          where not exists (select 1 from walhook.deliveries d where d.event_id = o.id)",
    )
    .await;
    // ... plus, at most, the one-event transaction whose Commit had not been read when the drain began
    // (dispatched and recorded, but not confirmable)
    assert!(
        (unrecorded..=unrecorded + 1).contains(&still_in_slot),
        "slot holds {still_in_slot} events, {unrecorded} are unrecorded"
    );

    // and a restart delivers the rest, each event once
    let mut child = Running::spawn(&["run"], &env);
    wait_succeeded(&client, 400).await;
    assert_eq!(rx.distinct_ids("/slow").len(), 400);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn the_systemd_unit_is_hardened_and_outlasts_the_drain() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/walhook.service"
    ))
    .unwrap();
    let value = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
            .collect()
    };
    let one = |key: &str| value(key).pop().unwrap_or_else(|| panic!("{key} missing"));
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("DynamicUser"), "yes");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("PrivateTmp"), "yes");
    assert_eq!(one("CapabilityBoundingSet"), "");
    assert!(one("RestrictAddressFamilies").contains("AF_UNIX"));
    assert!(one("EnvironmentFile").starts_with("/etc/walhook/"));
    assert!(one("ExecStart").ends_with(" run"));
    // the offline form: a bad key fails the start, a database that is briefly down does not
    assert!(one("ExecStartPre").ends_with(" check-config"));
    let stop = humantime::parse_duration(&one("TimeoutStopSec")).unwrap();
    let drain = walhook::config::Config::default().shutdown.drain_timeout;
    assert!(stop > drain, "TimeoutStopSec {stop:?} <= drain {drain:?}");
    assert!(drain > walhook::config::Config::default().delivery.timeout);
    humantime::parse_duration(&one("WatchdogSec")).unwrap();
}

#[test]
fn alert_rules_and_dashboard_parse_and_name_real_metrics() {
    let root = env!("CARGO_MANIFEST_DIR");
    let metrics_rs = std::fs::read_to_string(format!("{root}/src/metrics.rs")).unwrap();
    let known = |expr: &str| {
        // every walhook_* name used in an expression is defined in src/metrics.rs
        expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("walhook_"))
            .map(|w| {
                w.trim_end_matches("_bucket")
                    .trim_end_matches("_count")
                    .trim_end_matches("_sum")
            })
            .all(|w| metrics_rs.contains(&format!("\"{w}\"")))
    };

    let alerts: serde_json::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(format!("{root}/config/prometheus-alerts.yml")).unwrap(),
    )
    .expect("alert rules are YAML");
    let rules: Vec<&serde_json::Value> = alerts["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    let names: Vec<&str> = rules.iter().map(|r| r["alert"].as_str().unwrap()).collect();
    for want in [
        "WalhookSlotRetainingWal",
        "WalhookDeadDeliveriesRising",
        "WalhookNotStreaming",
        "WalhookReplicationLag",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    for rule in &rules {
        let expr = rule["expr"].as_str().unwrap();
        assert!(known(expr), "unknown metric in {expr}");
        assert!(rule["annotations"]["summary"].is_string(), "{rule}");
    }

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/config/grafana-dashboard.json")).unwrap(),
    )
    .expect("dashboard is JSON");
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 6);
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            assert!(known(expr), "unknown metric in {expr}");
        }
    }
}

/// Runs the real binary to completion: (success, stdout, stderr).
fn run_binary(args: &[&str], env: &[(String, String)]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walhook"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "warn")
        .output()
        .expect("run walhook");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walhook_status_summarises_slot_backlog_and_endpoints() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    rx.set_responder(|r, _| match r.path.as_str() {
        "/fail" => Reply::Status(500),
        _ => Reply::Status(200),
    });
    let (ok, _) = add_endpoint(&client, &rx.url("/ok"), &["*"]).await;
    let (failing, _) = add_endpoint(&client, &rx.url("/fail"), &["order.*"]).await;
    client
        .batch_execute(&format!(
            "update walhook.endpoints set url = 'http://user:hunter2@127.0.0.1:{}/fail?token=hunter2'
              where id = {failing}",
            rx.port()
        ))
        .await
        .unwrap();
    let daemon = Daemon::start(pg.config_with(|f| f.merge(("delivery.retry_schedule", ""))));
    wait_streaming(&client).await;
    for _ in 0..3 {
        publish(&client, "order.created", "{}").await;
    }
    publish(&client, "user.created", "{}").await;
    eventually("all deliveries final", || async {
        count(
            &client,
            "select count(*) from walhook.deliveries where status in ('succeeded', 'dead')",
        )
        .await
            == 7
    })
    .await;
    // the succeeded column counts attempts as the daemon writes them to walhook.endpoint_stats
    eventually("the successes are counted", || async {
        count(
            &client,
            &format!("select successes_1h from walhook.endpoint_health where endpoint_id = {ok}"),
        )
        .await
            == 4
    })
    .await;

    let env = pg.env();
    let (success, out, err) = tokio::task::block_in_place(|| run_binary(&["status"], &env));
    assert!(success, "{err}");
    assert!(
        out.contains("slot       walhook: streaming to walsender pid"),
        "{out}"
    );
    assert!(
        out.contains("backlog    0 pending (0 due now), 3 dead"),
        "{out}"
    );
    assert!(out.contains("WAL kept   "), "{out}");
    // the leader is walhook's own process (here, the test's), not a server backend
    assert!(
        out.contains(&format!(
            "leader     walhook (pid {} on ",
            std::process::id()
        )),
        "{out}"
    );
    assert!(out.contains("), connected from 127.0.0.1"), "{out}");
    let line = |id: i64| {
        out.lines()
            .find(|l| l.trim_start().starts_with(&format!("{id} ")))
            .unwrap_or_else(|| panic!("no line for endpoint {id} in\n{out}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(line(ok)[2..5], ["4", "0", "0"], "{out}");
    let failing_line = line(failing);
    assert_eq!(failing_line[2..5], ["0", "0", "3"], "{out}");
    assert!(failing_line.join(" ").contains("HTTP 500"), "{out}");
    assert!(!out.contains("hunter2"), "{out}");
    daemon.stop().await;

    let (success, out, _) = tokio::task::block_in_place(|| run_binary(&["status"], &env));
    assert!(success);
    assert!(out.contains("NOT STREAMING"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_tells_a_socket_leader_from_one_whose_address_is_hidden() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let socket_dir = pg.cluster.data_dir().parent().unwrap().join("sock");
    let socket_url = format!(
        "host={} port={} user=postgres dbname=app",
        socket_dir.display(),
        pg.cluster.port()
    );
    let daemon = Daemon::start(pg.config_with(|f| f.merge(("database_url", socket_url.as_str()))));
    wait_streaming(&client).await;
    let (success, out, err) = tokio::task::block_in_place(|| run_binary(&["status"], &pg.env()));
    assert!(success, "{err}");
    assert!(out.contains("), connected over a local socket"), "{out}");

    // a dashboard role (walhook_reader) may not see other roles' client addresses
    client
        .batch_execute("create role dashboard login in role walhook_reader")
        .await
        .unwrap();
    let url = pg.url.replacen("postgres@", "dashboard@", 1);
    let mut env = pg.env();
    env.retain(|(k, _)| k != "WALHOOK_DATABASE_URL");
    env.push(("WALHOOK_DATABASE_URL".into(), url));
    let (success, out, err) = tokio::task::block_in_place(|| run_binary(&["status"], &env));
    assert!(success, "{err}");
    assert!(
        out.contains(&format!(
            "leader     walhook (pid {} on ",
            std::process::id()
        )),
        "{out}"
    );
    assert!(
        out.contains("), connected from an address this role may not see"),
        "{out}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_under_notify_shows_unprocessed_rows_not_a_missing_slot() {
    let pg = Pg::start_for(Source::Notify).await;
    let client = pg.client().await;
    for i in 0..3 {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    let env = pg.env_for(Source::Notify);
    let (success, out, err) = tokio::task::block_in_place(|| run_binary(&["status"], &env));
    assert!(success, "{err}");
    assert!(
        out.contains("source     notify: 3 unprocessed outbox rows, oldest "),
        "{out}"
    );
    assert!(out.contains("; 0 claimed by an instance now"), "{out}");
    assert!(
        !out.contains("MISSING") && !out.contains("recover-slot"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_stops_walhook_with_the_steps_and_recover_slot_fills_the_gap() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/x"), &["*"]).await;
    let daemon = Daemon::start(pg.config());
    wait_streaming(&client).await;
    publish(&client, "order.created", "{\"before\": true}").await;
    wait_succeeded(&client, 1).await;
    daemon.stop().await;

    // while walhook is down: events are committed and the slot is dropped; they were never streamed
    for i in 0..3 {
        publish(&client, "order.created", &format!("{{\"gap\": {i}}}")).await;
    }
    eventually("the walsender has let go of the slot", || async {
        count(
            &client,
            "select count(*) from pg_replication_slots where slot_name = 'walhook' and active",
        )
        .await
            == 0
    })
    .await;
    client
        .batch_execute("select pg_drop_replication_slot('walhook')")
        .await
        .unwrap();
    // an endpoint added after those events does not get them on recovery
    let late = Receiver::start().await.unwrap();
    add_endpoint(&client, &late.url("/late"), &["*"]).await;

    let err = Daemon::start(pg.config()).result().await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("does not exist, but walhook created it"),
        "{text}"
    );
    assert!(text.contains("walhook recover-slot"), "{text}");

    let env = pg.env();
    let (success, out, err) = tokio::task::block_in_place(|| run_binary(&["recover-slot"], &env));
    assert!(success, "{err}");
    assert!(out.contains("3 deliveries queued"), "{out}");
    // recorded, and published to whoever subscribes to walhook.recovery.finished
    assert_eq!(
        count(
            &client,
            "select count(*) from walhook.recoveries r join walhook.outbox o
                on o.event_type = 'walhook.recovery.finished' and (o.payload->>'recovery_id')::bigint = r.id
             where r.kind = 'slot' and r.deliveries = 3 and o.payload->>'kind' = 'slot'"
        )
        .await,
        1
    );
    // running it again finds a healthy slot and changes nothing
    let (success, out, _) = tokio::task::block_in_place(|| run_binary(&["recover-slot"], &env));
    assert!(success);
    assert!(out.contains("healthy"), "{out}");

    let daemon = Daemon::start(pg.config());
    wait_succeeded(&client, 4).await;
    let after = publish(&client, "order.created", "{\"after\": true}").await;
    eventually("the event after recovery reaches both endpoints", || async {
        count(
            &client,
            &format!("select count(*) from walhook.deliveries where event_id = {after} and status = 'succeeded'"),
        )
        .await
            == 2
    })
    .await;
    assert_eq!(rx.distinct_ids("/x").len(), 5, "each event once");
    assert_eq!(rx.count(), 5, "nothing sent twice");
    assert_eq!(late.distinct_ids("/late").len(), 1, "only the event after");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_slot_is_reported_and_recovered() {
    let pg = Pg::start_with(walhook::cluster::ClusterOptions {
        extra_settings: vec![
            ("max_slot_wal_keep_size".into(), "1MB".into()),
            ("max_wal_size".into(), "32MB".into()),
            ("min_wal_size".into(), "32MB".into()),
        ],
        ..Default::default()
    })
    .await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/x"), &["*"]).await;
    let daemon = Daemon::start(pg.config());
    wait_streaming(&client).await;
    publish(&client, "order.created", "{}").await;
    wait_succeeded(&client, 1).await;
    daemon.stop().await;

    // walhook is down while the database writes far more WAL than the slot may keep
    publish(&client, "order.created", "{\"while_down\": 1}").await;
    publish(&client, "order.created", "{\"while_down\": 2}").await;
    client
        .batch_execute("create table filler (x text)")
        .await
        .unwrap();
    eventually("the slot is invalidated", || async {
        client
            .batch_execute(
                "insert into filler select repeat('x', 200) from generate_series(1, 20000);
                 select pg_switch_wal(); checkpoint;",
            )
            .await
            .unwrap();
        count(
            &client,
            "select count(*) from pg_replication_slots where slot_name = 'walhook' and wal_status = 'lost'",
        )
        .await
            == 1
    })
    .await;

    let err = Daemon::start(pg.config()).result().await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("invalidated (wal_status = lost)"), "{text}");
    assert!(text.contains("max_slot_wal_keep_size"), "{text}");
    assert!(text.contains("walhook recover-slot"), "{text}");

    let env = pg.env();
    let (success, out, err) = tokio::task::block_in_place(|| run_binary(&["recover-slot"], &env));
    assert!(success, "{err}");
    assert!(out.contains("2 deliveries queued"), "{out}");
    let daemon = Daemon::start(pg.config());
    wait_succeeded(&client, 3).await;
    assert_eq!(rx.count(), 3);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_old_final_rows_in_batches_and_keeps_the_rest() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    // history written directly: (outbox age, [(delivery status, age of its last update)])
    client
        .batch_execute(
            "create function pg_temp.event(age interval, statuses text[], ages interval[]) returns bigint
             language plpgsql as $$
             declare
               eid bigint;
               did bigint;
             begin
               insert into walhook.outbox (event_type, payload, created_at)
                 values ('order.created', '{}', now() - age) returning id into eid;
               for i in 1 .. coalesce(array_length(statuses, 1), 0) loop
                 insert into walhook.deliveries (event_id, endpoint_id, webhook_id, status, created_at, updated_at)
                   values (eid, i, gen_random_uuid(), statuses[i], now() - age, now() - ages[i])
                   returning id into did;
                 insert into walhook.attempts (delivery_id, attempt, attempted_at, duration_ms)
                   values (did, 1, now() - ages[i], 5), (did, 2, now() - ages[i], 5);
               end loop;
               return eid;
             end $$;
             create table pg_temp.expect (event_id bigint, outbox_kept boolean, deliveries_kept int);
             insert into expect values
               (pg_temp.event('10 days', '{succeeded,succeeded}', '{9 days,8 days}'), false, 0),
               (pg_temp.event('10 days', '{succeeded,dead}', '{9 days,9 days}'), false, 1),
               (pg_temp.event('40 days', '{dead}', '{31 days}'), false, 0),
               (pg_temp.event('10 days', '{succeeded,pending}', '{9 days,9 days}'), true, 1),
               (pg_temp.event('10 days', '{}', '{}'), false, 0),
               (pg_temp.event('10 days', '{succeeded}', '{1 day}'), false, 1),
               (pg_temp.event('2 days', '{succeeded}', '{2 days}'), true, 1),
               (pg_temp.event('1 hour', '{}', '{}'), true, 0);
             -- history, not news: the walhook.delivery.dead events its dead rows raised just now would sit
             -- between the backdated rows, and retention stops at the first row too young
             delete from walhook.outbox where event_type like 'walhook.%';",
        )
        .await
        .unwrap();
    // the daemon's retention task, with tiny batches so that a pass takes several
    let daemon = Daemon::start(pg.config_with(|f| {
        f.merge(("retention.interval", "100ms"))
            .merge(("retention.batch_size", 2))
    }));
    eventually("retention removes what is old and final", || async {
        count(
            &client,
            "select count(*) from pg_temp.expect x
              where exists (select 1 from walhook.outbox o where o.id = x.event_id) <> x.outbox_kept
                 or (select count(*) from walhook.deliveries d where d.event_id = x.event_id)
                    <> x.deliveries_kept",
        )
        .await
            == 0
    })
    .await;
    // attempts went with their deliveries, and only with them
    assert_eq!(
        count(
            &client,
            "select count(*) from walhook.attempts a
              where not exists (select 1 from walhook.deliveries d where d.id = a.delivery_id)"
        )
        .await,
        0
    );
    assert_eq!(
        count(&client, "select count(*) from walhook.attempts").await,
        2 * count(&client, "select count(*) from walhook.deliveries").await
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_row_deleted_in_its_own_transaction_is_still_delivered() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/x"), &["*"]).await;
    let daemon = Daemon::start(pg.config());
    wait_streaming(&client).await;
    // the application keeps its outbox empty as the README shows: a walhook_writer role granted DELETE
    // runs the README's snippet, as written, in its own transaction
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let grant = "GRANT DELETE ON walhook.outbox TO app;";
    assert!(readme.contains(grant), "the README grants DELETE");
    let snippet = readme
        .split("```sql\n")
        .filter_map(|block| block.split("```").next())
        .find(|block| block.contains("DELETE FROM walhook.outbox WHERE id = event_id"))
        .expect("the README's keep-the-outbox-empty snippet");
    client
        .batch_execute(&format!(
            "create role app login in role walhook_writer; {grant}"
        ))
        .await
        .unwrap();
    let url = pg.url.replacen("postgres@", "app@", 1);
    let mut app = walhook::store::connect_client(&url.parse().unwrap())
        .await
        .unwrap();
    let tx = app.transaction().await.unwrap();
    tx.batch_execute(snippet).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        count(&client, "select count(*) from walhook.outbox").await,
        0
    );
    wait_succeeded(&client, 1).await;
    let received = rx.received();
    assert_eq!(received.len(), 1);
    let body: serde_json::Value = serde_json::from_slice(&received[0].body).unwrap();
    assert_eq!(body["data"]["id"], 42);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_give_one_line_per_failed_attempt_without_secrets_or_payloads() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    rx.set_responder(|_, _| Reply::Status(503));
    let (endpoint, secret) = add_endpoint(&client, &rx.url("/down?token=hunter2"), &["*"]).await;
    let run = |payloads: &str, level: &str| {
        let env = env_with(
            &pg,
            &[
                ("WALHOOK_LOG__FORMAT", "json"),
                ("WALHOOK_LOG__PAYLOADS", payloads),
                ("WALHOOK_DELIVERY__RETRY_SCHEDULE", ""),
            ],
        );
        std::process::Command::new(env!("CARGO_BIN_EXE_walhook"))
            .arg("run")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", level)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let finish = |child: std::process::Child| {
        sigterm(&child);
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };

    let child = run("false", "debug");
    wait_streaming(&client).await;
    let event = publish(&client, "order.created", "{\"card\": \"PAYLOAD-MARKER\"}").await;
    eventually("the delivery is dead", || async {
        count(
            &client,
            "select count(*) from walhook.deliveries where status = 'dead'",
        )
        .await
            == 1
    })
    .await;
    let logs = tokio::task::block_in_place(|| finish(child));
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let failed: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "delivery attempt failed")
        .collect();
    assert_eq!(failed.len(), 1, "{logs}");
    let f = &failed[0]["fields"];
    assert_eq!(f["endpoint_id"], endpoint);
    assert_eq!(f["event_id"], event);
    assert_eq!(f["status"], 503);
    assert_eq!(f["error"], "HTTP 503");
    assert_eq!(f["next"], "dead");
    assert_eq!(failed[0]["level"], "INFO");
    for secret_or_payload in ["PAYLOAD-MARKER", "hunter2", secret.as_str(), "whsec_"] {
        assert!(
            !logs.contains(secret_or_payload),
            "{secret_or_payload} logged:\n{logs}"
        );
    }

    // opted in, at debug level: the payload appears, the secret still does not
    let child = run("true", "walhook=debug");
    wait_streaming(&client).await;
    publish(&client, "order.created", "{\"card\": \"OPTED-IN\"}").await;
    eventually("the second delivery is dead", || async {
        count(
            &client,
            "select count(*) from walhook.deliveries where status = 'dead'",
        )
        .await
            == 2
    })
    .await;
    let logs = tokio::task::block_in_place(|| finish(child));
    assert!(logs.contains("OPTED-IN"), "{logs}");
    assert!(
        !logs.contains(secret.as_str()) && !logs.contains("hunter2"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_wal_stays_bounded_while_only_another_database_is_written() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/x"), &["*"]).await;
    let daemon =
        Daemon::start(pg.config_with(|f| f.merge(("replication.status_interval", "200ms"))));
    wait_streaming(&client).await;
    publish(&client, "order.created", "{}").await;
    wait_succeeded(&client, 1).await;

    // the outbox is idle; another database of the cluster writes ~30 MiB of WAL
    let other_url = pg.cluster.create_database("other").await.unwrap();
    let other = walhook::store::connect_client(&other_url.parse().unwrap())
        .await
        .unwrap();
    other
        .batch_execute("create table busy (x text)")
        .await
        .unwrap();
    for _ in 0..6 {
        other
            .batch_execute(
                "insert into busy select repeat('x', 500) from generate_series(1, 10000)",
            )
            .await
            .unwrap();
    }
    // a checkpoint logs the running transactions, which lets the slot move its restart position
    eventually("the slot retains less than 4 MiB of WAL", || async {
        client.batch_execute("checkpoint").await.unwrap();
        count(
            &client,
            "select (pg_current_wal_lsn() - restart_lsn)::int8 from pg_replication_slots
              where slot_name = 'walhook'",
        )
        .await
            < 4 << 20
    })
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_or_the_drain_timeout_aborts_and_nothing_is_lost() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    // requests hang until the receiver is told otherwise; the attempt timeout is far away
    rx.set_responder(|_, _| Reply::Hang);
    add_endpoint(&client, &rx.url("/hang"), &["*"]).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let env = env_with(
        &pg,
        &[
            ("WALHOOK_DELIVERY__TIMEOUT", "120s"),
            ("WALHOOK_SHUTDOWN__DRAIN_TIMEOUT", "120s"),
            ("WALHOOK_HTTP__LISTEN", listen.as_str()),
        ],
    );

    // a second signal ends a drain that would otherwise wait for the hanging requests
    let mut child = Running::spawn(&["run"], &env);
    wait_streaming(&client).await;
    // as many as an endpoint that has answered nothing gets at once: all of them in flight, none parked
    let n = walhook::fanout::FIRST_WINDOW;
    for i in 0..n {
        publish(&client, "order.created", &format!("{{\"i\": {i}}}")).await;
    }
    assert!(rx.wait_until(DEADLINE, |r| r.len() >= n).await);
    sigterm(&child);
    eventually("/readyz reports the drain", || async {
        matches!(http_get(port, "/readyz").await, Some((503, body)) if body.contains("draining"))
    })
    .await;
    let signalled = Instant::now();
    sigterm(&child);
    let status = tokio::task::block_in_place(|| child.wait()).unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(60),
        "the second signal did not abort"
    );

    // the drain timeout alone does the same
    let env = env_with(
        &pg,
        &[
            ("WALHOOK_DELIVERY__TIMEOUT", "120s"),
            ("WALHOOK_SHUTDOWN__DRAIN_TIMEOUT", "1s"),
        ],
    );
    let before = rx.count();
    let mut child = Running::spawn(&["run"], &env);
    // the events are replayed from the slot and hang again
    assert!(rx.wait_until(DEADLINE, |r| r.len() >= before + n).await);
    let signalled = Instant::now();
    sigterm(&child);
    let status = tokio::task::block_in_place(|| child.wait()).unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(60),
        "the drain timeout did not abort"
    );

    // nothing was recorded or confirmed: the next run delivers every event
    assert_eq!(
        count(&client, "select count(*) from walhook.deliveries").await,
        0
    );
    rx.set_responder(|_, _| Reply::Status(200));
    let mut child = Running::spawn(&["run"], &pg.env());
    wait_succeeded(&client, n as i64).await;
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `walhook run` turns transparent huge pages off for itself: its heap is many small per-connection and
/// per-request buffers, which 2 MiB pages made grow in 2 MiB steps (see `no_transparent_huge_pages` in
/// src/main.rs for what it measured).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_runs_without_transparent_huge_pages() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let daemon = KillOnDrop(spawn_binary(&["run"], &pg.env()));
    let status = format!("/proc/{}/status", daemon.0.id());
    eventually("the daemon streams", || async {
        client
            .query_one(
                "select count(*) from pg_replication_slots where active",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    })
    .await;
    let status = std::fs::read_to_string(&status).expect("the daemon's /proc status");
    match status.lines().find(|l| l.starts_with("THP_enabled:")) {
        Some(line) => assert_eq!(
            line.split_whitespace().nth(1),
            Some("0"),
            "transparent huge pages are off for the daemon: {line}"
        ),
        // kernels before 5.0 do not report it
        None => eprintln!("this kernel does not report THP_enabled; nothing to check"),
    }
}
