//! The receiver guide (docs/receivers.md) against the real daemon: its Python and Node samples run as
//! subprocesses on loopback with the endpoint's secret while walhook delivers events (before and after a
//! secret rotation), a redelivery of one of them, a test event and operational events; each sample must
//! process every event exactly once, refuse forged, stale and unsigned requests, and raise an alert for a
//! dead delivery and a disabled endpoint. The guide shows both files verbatim, and its inbox SQL runs as written.
//!
//! A runtime that is missing (python3 with `standardwebhooks`, or node with the sample's `npm ci`) skips its
//! test with a message saying how to install it; `.ci/run` installs both, so CI runs them.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio_postgres::types::{ToSql, Type};
use walhook::sign::Signer;

use crate::support::*;

/// One of the guide's runnable samples.
struct Sample {
    /// Its file under docs/receivers.
    file: &'static str,
    /// The guide's code-fence language for it.
    fence: &'static str,
    /// The runtime that runs it.
    program: &'static str,
    /// Arguments of `program` that succeed only when the Standard Webhooks library is installed, run in the
    /// sample's folder.
    probe: &'static [&'static str],
    /// How to install what the probe needs, as the guide says.
    install: &'static str,
    /// How the guide says to start it (the test starts `program` with the file's path and the same secret).
    start: &'static str,
}

const PYTHON: Sample = Sample {
    file: "python/receiver.py",
    fence: "python",
    program: "python3",
    probe: &["-c", "import standardwebhooks"],
    install: "pip install -r docs/receivers/python/requirements.txt",
    start: "WEBHOOK_SECRET=whsec_… python3 docs/receivers/python/receiver.py",
};

const NODE: Sample = Sample {
    file: "node/receiver.mjs",
    fence: "js",
    program: "node",
    probe: &["--input-type=module", "-e", "import 'standardwebhooks'"],
    install: "cd docs/receivers/node && npm ci",
    start: "WEBHOOK_SECRET=whsec_… node receiver.mjs",
};

fn docs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs")
}

impl Sample {
    fn path(&self) -> PathBuf {
        docs().join("receivers").join(self.file)
    }

    /// Whether the runtime and the library are installed; prints that `what` is skipped, and why, when not.
    fn installed(&self, what: &str) -> bool {
        let probe = Command::new(self.program)
            .args(self.probe)
            .current_dir(self.path().parent().unwrap())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let installed = matches!(probe, Ok(status) if status.success());
        if !installed {
            println!(
                "{} with the Standard Webhooks library not installed: {what} skipped ({})",
                self.program, self.install
            );
        }
        installed
    }
}

/// A folder of the test's own for the sample's inbox and events log, removed when dropped.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new(name: &str) -> WorkDir {
        let path = std::env::temp_dir().join(format!(
            "walhook-receiver-{name}-{}-{}",
            std::process::id(),
            now()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create the sample's folder");
        WorkDir(path)
    }

    /// The events the sample processed, as it logged them: (webhook-id, type), in order.
    fn processed(&self) -> Vec<(String, String)> {
        let log = std::fs::read_to_string(self.0.join("events.log")).unwrap_or_default();
        log.lines()
            .map(|line| {
                let (id, kind) = line.split_once(' ').expect("'webhook-id type'");
                (id.to_string(), kind.to_string())
            })
            .collect()
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The sample running with the endpoint's secret on a free loopback port; killed when dropped.
struct Running {
    child: Mutex<Child>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Running {
    fn spawn(sample: &Sample, secret: &str, dir: &WorkDir) -> Running {
        let mut child = Command::new(sample.program)
            .arg(sample.path())
            .current_dir(&dir.0)
            .env("WEBHOOK_SECRET", secret)
            .env("PORT", "0")
            .env("INBOX", dir.0.join("inbox"))
            .env("EVENTS_LOG", dir.0.join("events.log"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", sample.file));
        let collect = |pipe: Box<dyn Read + Send>| {
            let text = Arc::new(Mutex::new(String::new()));
            let sink = Arc::clone(&text);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { return };
                    let mut text = sink.lock().unwrap();
                    text.push_str(&line);
                    text.push('\n');
                }
            });
            text
        };
        Running {
            stdout: collect(Box::new(child.stdout.take().expect("piped"))),
            stderr: collect(Box::new(child.stderr.take().expect("piped"))),
            child: Mutex::new(child),
        }
    }

    fn output(&self) -> String {
        format!(
            "stdout:\n{}stderr:\n{}",
            self.stdout.lock().unwrap(),
            self.stderr.lock().unwrap()
        )
    }

    /// Fails at once, with what the sample printed, if it has exited.
    fn assert_running(&self) {
        if let Ok(Some(exit)) = self.child.lock().unwrap().try_wait() {
            panic!("the sample exited ({exit}):\n{}", self.output());
        }
    }

    /// The URL the sample prints once it listens.
    async fn url(&self) -> String {
        eventually("the sample listens", || {
            self.assert_running();
            let listening = self.stdout.lock().unwrap().contains("listening on ");
            async move { listening }
        })
        .await;
        let out = self.stdout.lock().unwrap().clone();
        out.lines()
            .find_map(|line| line.strip_prefix("listening on "))
            .expect("the listening line")
            .to_string()
    }

    /// Waits until the sample has processed at least `n` events.
    async fn wait_processed(&self, dir: &WorkDir, n: usize) {
        eventually(&format!("the sample processed {n} events"), || {
            self.assert_running();
            let done = dir.processed().len() >= n;
            async move { done }
        })
        .await;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// POSTs `body` with these headers; returns the status and the response's body.
async fn post(url: &str, headers: &[(&str, String)], body: &str) -> (u16, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = Request::post(url).header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let request = request.body(Full::new(Bytes::from(body.to_string())));
    let response = client.request(request.unwrap()).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The webhook headers of a request signed at `timestamp` with each secret in turn, one signature each.
fn signed(secrets: &[&str], id: &str, timestamp: i64, body: &str) -> Vec<(&'static str, String)> {
    let signatures: Vec<String> = secrets
        .iter()
        .map(|secret| {
            Signer::new(secret)
                .unwrap()
                .sign(id, timestamp, body.as_bytes())
        })
        .collect();
    vec![
        ("webhook-id", id.to_string()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", signatures.join(" ")),
    ]
}

/// The (webhook-id, type) of every delivery to `endpoint` that succeeded, sorted.
async fn succeeded(client: &tokio_postgres::Client, endpoint: i64) -> Vec<(String, String)> {
    let rows = client
        .query(
            "select 'msg_' || replace(d.webhook_id::text, '-', ''), coalesce(d.event_type, o.event_type)
               from walhook.deliveries d left join walhook.outbox o on o.id = d.event_id
              where d.endpoint_id = $1 and d.status = 'succeeded' order by 1",
            &[&endpoint],
        )
        .await
        .unwrap();
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

async fn a_sample_processes_each_event_once(sample: Sample) {
    if !sample.installed(&format!("docs/receivers/{}", sample.file)) {
        return;
    }
    let pg = Pg::start().await;
    let client = pg.client().await;
    let (endpoint, secret) =
        add_endpoint(&client, "http://127.0.0.1:9/", &["order.*", "walhook.*"]).await;
    // an endpoint that will be disabled, which publishes walhook.endpoint.disabled to the sample
    let (other, _) = add_endpoint(&client, "http://127.0.0.1:9/", &["nothing.*"]).await;
    let dir = WorkDir::new(sample.fence);
    let receiver = Running::spawn(&sample, &secret, &dir);
    let url = receiver.url().await;
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    client
        .execute(
            "update walhook.endpoints set url = $1 where id = $2",
            &[&url, &endpoint],
        )
        .await
        .unwrap();
    let daemon = Daemon::start(pg.config());
    wait_streaming(&client).await;

    let created = publish(&client, "order.created", r#"{"order": 1}"#).await;
    publish(&client, "order.paid", r#"{"order": 1, "amount": "12.50"}"#).await;
    receiver.wait_processed(&dir, 2).await;

    // a rotation: walhook signs with both secrets for the grace period, and the sample still holds the
    // old one; a request carrying the new secret's signature first (and a v1a one) verifies too
    let new_secret: String = client
        .query_one("select walhook.rotate_secret($1)", &[&endpoint])
        .await
        .unwrap()
        .get(0);
    publish(&client, "order.shipped", r#"{"order": 1}"#).await;
    let body = r#"{"type": "order.rotated", "timestamp": "2026-12-02T10:00:00Z", "data": {}}"#;
    let mut headers = signed(&[&new_secret, &secret], "msg_rotation", now(), body);
    headers[2]
        .1
        .push_str(" v1a,c2lnbmVkIHdpdGggYW4gZWQyNTUxOSBrZXk=");
    assert_eq!(post(&url, &headers, body).await.0, 204);
    receiver.wait_processed(&dir, 4).await;

    // a redelivery of the first event: the same webhook-id, answered 2xx, not processed again
    let first: i64 = client
        .query_one(
            "select id from walhook.deliveries where endpoint_id = $1 and event_id = $2",
            &[&endpoint, &created],
        )
        .await
        .unwrap()
        .get(0);
    client
        .execute("select walhook.redeliver(array[$1::bigint])", &[&first])
        .await
        .unwrap();
    eventually("the redelivery succeeded", || async {
        count(
            &client,
            &format!(
                "select count(*) from walhook.attempts a join walhook.deliveries d on d.id = a.delivery_id
                  where d.id = {first} and d.status = 'succeeded' and a.status_code between 200 and 299"
            ),
        )
        .await
            == 2
    })
    .await;

    // forged, stale and unsigned requests are refused and never recorded
    let body = r#"{"type": "order.forged", "timestamp": "2026-12-02T10:00:00Z", "data": {}}"#;
    let forged = signed(
        &["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
        "msg_forged",
        now(),
        body,
    );
    let stale = signed(&[&secret], "msg_stale", now() - 600, body);
    for (what, headers) in [("forged", forged), ("stale", stale), ("unsigned", vec![])] {
        let (status, answer) = post(&url, &headers, body).await;
        assert!(status == 401 || status == 400, "{what}: {status} {answer}");
    }

    // walhook's own events: a test event, a delivery to the other endpoint dead after its schedule (nothing
    // listens there), then that endpoint disabled by hand
    client
        .execute("select walhook.send_test($1)", &[&endpoint])
        .await
        .unwrap();
    let doomed = publish(&client, "nothing.heard", "{}").await;
    eventually("the other endpoint's delivery is dead", || async {
        count(
            &client,
            &format!("select count(*) from walhook.deliveries where event_id = {doomed} and status = 'dead'"),
        )
        .await
            == 1
    })
    .await;
    client
        .execute(
            "update walhook.endpoints set enabled = false where id = $1",
            &[&other],
        )
        .await
        .unwrap();
    publish(&client, "order.delivered", r#"{"order": 1}"#).await;
    receiver.wait_processed(&dir, 8).await;
    eventually("every delivery recorded", || async {
        succeeded(&client, endpoint).await.len() == 7
    })
    .await;

    // exactly once each: every delivery walhook recorded as succeeded, and the test's rotated request
    let mut processed = dir.processed();
    processed.sort();
    let mut expected = succeeded(&client, endpoint).await;
    expected.push(("msg_rotation".to_string(), "order.rotated".to_string()));
    expected.sort();
    assert_eq!(processed, expected, "{}", receiver.output());
    let types: Vec<&str> = expected.iter().map(|(_, kind)| kind.as_str()).collect();
    for kind in [
        "walhook.test",
        "walhook.delivery.dead",
        "walhook.endpoint.disabled",
    ] {
        assert!(types.contains(&kind), "{types:?}");
    }
    // the alerts name the endpoint, and the dead delivery by the webhook-id its requests carried
    let dead_id: String = client
        .query_one(
            "select 'msg_' || replace(webhook_id::text, '-', '') from walhook.deliveries where event_id = $1",
            &[&doomed],
        )
        .await
        .unwrap()
        .get(0);
    for alert in [
        format!("ALERT nothing.heard {dead_id} to endpoint {other} dead after 4 attempts"),
        format!("ALERT endpoint {other} disabled (manual)"),
    ] {
        assert!(
            receiver.output().contains(&alert),
            "{alert}:\n{}",
            receiver.output()
        );
    }
    receiver.assert_running();
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sample_processes_each_event_once() {
    a_sample_processes_each_event_once(PYTHON).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_sample_processes_each_event_once() {
    a_sample_processes_each_event_once(NODE).await
}

fn guide() -> String {
    std::fs::read_to_string(docs().join("receivers.md")).unwrap()
}

/// The code blocks of the guide's section `heading` (up to the next `## `), with their language.
fn blocks(heading: &str) -> Vec<(String, String)> {
    let guide = guide();
    let section = guide
        .split(&format!("\n{heading}\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("docs/receivers.md: no section {heading:?}"))
        .split("\n## ")
        .next()
        .unwrap()
        .to_string();
    section
        .split("```")
        .skip(1)
        .step_by(2)
        .map(|block| {
            let (language, code) = block.split_once('\n').unwrap();
            (language.to_string(), code.to_string())
        })
        .collect()
}

#[test]
fn the_guide_shows_the_samples_as_they_run() {
    let guide = guide();
    let shown = [
        (PYTHON.file, PYTHON.fence),
        (NODE.file, NODE.fence),
        ("node/verify.ts", "ts"),
    ];
    for sample in [PYTHON, NODE] {
        let commands = format!("```sh\n{}\n{}\n```\n", sample.install, sample.start);
        assert!(
            guide.contains(&commands),
            "docs/receivers.md must show how to install and start {}:\n{commands}",
            sample.file
        );
        let ci = std::fs::read_to_string(docs().join("../.ci/run")).unwrap();
        let installs = sample.install.rsplit("&& ").next().unwrap();
        let installs = installs.replace("pip install", "pip install -q --root-user-action=ignore");
        assert!(ci.contains(&installs), ".ci/run must run {installs}");
    }
    for (file, fence) in shown {
        let code = std::fs::read_to_string(docs().join("receivers").join(file)).unwrap();
        assert!(
            guide.contains(&format!("```{fence}\n{code}```\n")),
            "docs/receivers.md must show docs/receivers/{file} verbatim in a {fence} block"
        );
    }
}

/// The guide's TypeScript types check against the library's own declarations, with the compiler the
/// sample's `npm ci` installs.
#[test]
fn the_guides_typescript_checks() {
    let node = docs().join("receivers/node");
    let tsc = node.join("node_modules/.bin/tsc");
    if !NODE.installed("docs/receivers/node/verify.ts") {
        return;
    }
    if !tsc.exists() {
        println!(
            "typescript not installed: docs/receivers/node/verify.ts skipped ({})",
            NODE.install
        );
        return;
    }
    let out = Command::new(&tsc)
        .args(["-p", "."])
        .current_dir(&node)
        .output()
        .expect("run tsc");
    assert!(
        out.status.success(),
        "tsc -p docs/receivers/node:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The inbox SQL as the guide writes it: the table, the insert a redelivery leaves alone, and two workers
/// taking different events side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guides_inbox_sql_runs_as_written() {
    let mut blocks = blocks("## Deduplicating on `webhook-id`");
    blocks.extend(self::blocks("## Answering fast, processing later"));
    let [(l1, table), (l2, insert), (l3, worker)] = &blocks[..] else {
        panic!("expected 3 blocks, found {blocks:?}");
    };
    assert_eq!([l1, l2, l3], ["sql", "sql", "sql"]);
    let pg = Pg::start().await;
    let client = pg.client().await;
    client.batch_execute(table).await.unwrap();

    // the first request of each event inserts a row; its redelivery inserts nothing
    let events = [
        (
            "msg_1",
            r#"{"type": "order.created", "data": {"order": 1}}"#,
        ),
        ("msg_2", r#"{"type": "order.paid", "data": {"order": 1}}"#),
        (
            "msg_1",
            r#"{"type": "order.created", "data": {"order": 1}}"#,
        ),
    ];
    // (the body's parameter is text, cast to jsonb as the guide writes it)
    let insert = client
        .prepare_typed(insert, &[Type::TEXT, Type::TEXT])
        .await
        .unwrap();
    let mut inserted = Vec::new();
    for (id, body) in events {
        inserted.push(client.execute(&insert, &[&id, &body]).await.unwrap());
    }
    assert_eq!(inserted, [1, 1, 0]);

    // the worker's statements, one at a time: two workers in their own transactions get different events
    let statements: Vec<&str> = worker
        .split(";\n")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let [begin, select, update, commit] = &statements[..] else {
        panic!("expected BEGIN, SELECT, UPDATE, COMMIT: {statements:?}");
    };
    let other = pg.client().await;
    let mut taken = Vec::new();
    for worker in [&client, &other] {
        worker.batch_execute(begin).await.unwrap();
        let row = worker.query_one(*select, &[]).await.unwrap();
        let (id, kind): (String, String) = (row.get("webhook_id"), row.get("type"));
        taken.push((id, kind));
    }
    assert_eq!(
        taken,
        [
            ("msg_1".to_string(), "order.created".to_string()),
            ("msg_2".to_string(), "order.paid".to_string())
        ]
    );
    for (worker, (id, _)) in [&client, &other].into_iter().zip(&taken) {
        let params: [&(dyn ToSql + Sync); 1] = [id];
        assert_eq!(worker.execute(*update, &params).await.unwrap(), 1);
        worker
            .batch_execute(commit.trim_end_matches(';'))
            .await
            .unwrap();
    }
    let left = client
        .query(select.trim_end_matches(';'), &[])
        .await
        .unwrap();
    assert!(left.is_empty(), "every event processed");
}
