//! `walhook listen` and `walhook send-test`, the real binary: the daemon delivers to the listener, which
//! verifies, prints and answers (or forwards to a loopback app and replays); bad requests get 401 and the
//! reason; `--endpoint` reads the endpoint's secrets, a rotation's included; `send-test --wait` follows a
//! test delivery to its end; docs/receivers.md's commands run as written.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use walhook::receiver::{Receiver, Reply};
use walhook::sign::Signer;

use crate::support::*;

/// The real binary with its stdout collected as it comes; killed when dropped.
struct Running {
    child: Mutex<Child>,
    output: Arc<Mutex<String>>,
}

impl Running {
    fn spawn(args: &[&str], env: &[(String, String)]) -> Running {
        let mut child = Command::new(env!("CARGO_BIN_EXE_walhook"))
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn walhook");
        let stdout = child.stdout.take().expect("piped stdout");
        let output = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&output);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let mut out = sink.lock().unwrap();
                out.push_str(&line);
                out.push('\n');
            }
        });
        Running {
            child: Mutex::new(child),
            output,
        }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits until the output contains `text`; returns the whole output. Fails at once if walhook exits.
    async fn wait_output(&self, text: &str) -> String {
        eventually(&format!("walhook prints {text:?}"), || {
            let found = self.output().contains(text);
            if !found {
                if let Ok(Some(exit)) = self.child.lock().unwrap().try_wait() {
                    panic!(
                        "walhook exited ({exit}) without printing {text:?}:\n{}",
                        self.output()
                    );
                }
            }
            async move { found }
        })
        .await;
        self.output()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A listener started with `args` and waited for; returns it and its base URL (`http://127.0.0.1:port`).
async fn listener(args: &[&str], env: &[(String, String)]) -> (Running, String) {
    let running = Running::spawn(&[&["listen"][..], args].concat(), env);
    let out = running.wait_output("listening on http://").await;
    let base = out
        .lines()
        .find_map(|l| l.strip_prefix("listening on "))
        .expect("the listening line")
        .trim_end_matches('/')
        .to_string();
    (running, base)
}

/// Runs the binary to its end (killed after `DEADLINE`): (success, stdout, stderr).
async fn run(args: &[&str], env: &[(String, String)]) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_walhook"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn walhook");
    // read both pipes while it runs, so a full pipe cannot stall it
    let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = read(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read(child.stderr.take().map(|p| Box::new(p) as _));
    let until = std::time::Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("walhook {args:?} did not finish in time");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    (
        status.success(),
        stdout.join().unwrap(),
        stderr.join().unwrap(),
    )
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// POSTs `body` with these webhook headers; returns status and response body.
async fn post(url: &str, headers: &[(&str, String)], body: &str) -> (u16, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = Request::post(url).header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = client
        .request(
            request
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The three webhook headers for `body`, signed with `secret` at `timestamp`.
fn signed(secret: &str, id: &str, timestamp: i64, body: &str) -> Vec<(&'static str, String)> {
    vec![
        ("webhook-id", id.to_string()),
        ("webhook-timestamp", timestamp.to_string()),
        (
            "webhook-signature",
            Signer::new(secret)
                .unwrap()
                .sign(id, timestamp, body.as_bytes()),
        ),
    ]
}

async fn webhook_id(client: &tokio_postgres::Client, delivery_filter: &str) -> String {
    client
        .query_one(
            &format!(
                "select 'msg_' || replace(webhook_id::text, '-', '') from walhook.deliveries where {delivery_filter}"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn set_url(client: &tokio_postgres::Client, endpoint: i64, url: &str) {
    client
        .execute(
            "update walhook.endpoints set url = $1 where id = $2",
            &[&url, &endpoint],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_prints_what_the_daemon_delivers_and_refuses_bad_signatures() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let (endpoint, secret) = add_endpoint(&client, "http://127.0.0.1:9/", &["*"]).await;
    let (listen, base) = listener(&["--secret", &secret, "--port", "0"], &[]).await;
    assert!(
        base.starts_with("http://127.0.0.1:"),
        "loopback by default: {base}"
    );
    set_url(&client, endpoint, &format!("{base}/hooks")).await;
    let daemon = Daemon::start(pg.config());
    wait_streaming(&client).await;
    publish(&client, "order.created", r#"{"order": 42}"#).await;
    wait_succeeded(&client, 1).await;
    let id = webhook_id(&client, "true").await;
    let out = listen.wait_output("✓ verified").await;
    assert!(out.contains(&format!("order.created  {id}")), "{out}");
    assert!(out.contains("✓ verified with the secret → 200"), "{out}");
    assert!(out.contains("\"order\": 42"), "the body, indented: {out}");
    assert_eq!(
        count(
            &client,
            "select count(*) from walhook.attempts where status_code = 200"
        )
        .await,
        1
    );
    daemon.stop().await;

    // each failed check answers 401 with its reason, and is printed loudly
    let url = format!("{base}/hooks");
    let body = r#"{"type":"order.created","data":{}}"#;
    let other = walhook::sign::generate_secret();
    let cases = [
        (
            signed(&other, "msg_wrong", now(), body),
            "no matching signature",
        ),
        (
            signed(&secret, "msg_stale", now() - 600, body),
            "stale timestamp",
        ),
        (
            vec![("webhook-id", "msg_bare".to_string())],
            "missing headers webhook-timestamp, webhook-signature",
        ),
    ];
    for (headers, why) in cases {
        let (status, answer) = post(&url, &headers, body).await;
        assert_eq!(status, 401, "{why}: {answer}");
        assert!(answer.contains(why), "{answer}");
        let out = listen.wait_output(why).await;
        assert!(
            out.lines()
                .any(|l| l.starts_with("✗ REJECTED POST /hooks") && l.contains(why)),
            "{out}"
        );
    }
    // a correct one still passes
    let (status, _) = post(&url, &signed(&secret, "msg_good", now(), body), body).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_forwards_to_the_app_and_replays() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let app = Receiver::start().await.unwrap();
    app.set_responder(|_, _| Reply::StatusWithBody(202, "queued".into()));
    let (endpoint, secret) = add_endpoint(&client, "http://127.0.0.1:9/", &["*"]).await;
    app.set_secret("/webhooks", &secret);
    let (listen, base) = listener(
        &[
            "--secret",
            &secret,
            "--port",
            "0",
            "--forward-to",
            &app.url("/webhooks"),
        ],
        &[],
    )
    .await;
    set_url(&client, endpoint, &format!("{base}/")).await;
    let daemon = Daemon::start(pg.config());
    wait_streaming(&client).await;
    publish(&client, "invoice.paid", r#"{"invoice": 7}"#).await;
    wait_succeeded(&client, 1).await;
    let id = webhook_id(&client, "true").await;

    // the app got the request as walhook sent it, and its answer is what walhook recorded
    let first = app.received();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].webhook_id, id);
    assert_eq!(first[0].verified, Some(true));
    assert_eq!(
        count(
            &client,
            "select count(*) from walhook.attempts where status_code = 202 and response_body = 'queued'"
        )
        .await,
        1
    );
    let out = listen
        .wait_output(&format!("replay: curl -X POST {base}/replay/{id}"))
        .await;
    assert!(
        out.contains(&format!(
            "forwarded to {}: 202 Accepted",
            app.url("/webhooks")
        )),
        "{out}"
    );

    // a replay: the same request, signed again, to the app
    let (status, answer) = post(&format!("{base}/replay/{id}"), &[], "").await;
    assert_eq!(status, 202, "{answer}");
    assert!(answer.contains(&format!("replayed {id}")), "{answer}");
    let both = app.received();
    assert_eq!(both.len(), 2);
    assert_eq!(both[1].webhook_id, id);
    assert_eq!(both[1].body, first[0].body);
    assert_eq!(both[1].verified, Some(true), "signed again with the secret");
    listen.wait_output(&format!("↻ replayed {id}")).await;
    let (status, answer) = post(&format!("{base}/replay/msg_unknown"), &[], "").await;
    assert_eq!(status, 404, "{answer}");

    // the app is down: the listener answers 502 and says so; walhook records the failure
    app.shutdown().await;
    publish(&client, "invoice.paid", r#"{"invoice": 8}"#).await;
    eventually("walhook records the 502", || async {
        count(
            &client,
            "select count(*) from walhook.attempts where status_code = 502",
        )
        .await
            >= 1
    })
    .await;
    listen.wait_output("(is your app running?) → 502").await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_with_an_endpoint_reads_its_secrets_and_follows_a_rotation() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let env = pg.env();
    let (endpoint, old) = add_endpoint(&client, "http://127.0.0.1:9/", &["*"]).await;
    let rotate = |grace: &'static str| {
        let client = &client;
        async move {
            client
                .query_one(
                    "select walhook.rotate_secret($1, $2::text::interval)",
                    &[&endpoint, &grace],
                )
                .await
                .unwrap()
                .get::<_, String>(0)
        }
    };
    let current = rotate("1 hour").await;
    let id = endpoint.to_string();
    let (listen, base) = listener(&["--endpoint", &id, "--port", "0"], &env).await;
    assert!(
        listen
            .output()
            .contains(&format!("verifying with endpoint {endpoint}'s secret and 1 older secret in its rotation grace period")),
        "{}",
        listen.output()
    );
    let body = r#"{"type":"a","data":{}}"#;
    let (status, _) = post(&base, &signed(&old, "msg_old", now(), body), body).await;
    assert_eq!(status, 200, "the secret in its grace period verifies");
    listen
        .wait_output(&format!(
            "✓ verified with a secret in endpoint {endpoint}'s rotation grace period"
        ))
        .await;
    let (status, _) = post(&base, &signed(&current, "msg_new", now(), body), body).await;
    assert_eq!(status, 200);
    listen
        .wait_output(&format!(
            "✓ verified with endpoint {endpoint}'s current secret"
        ))
        .await;

    // rotated while listening: the first request with the new secret makes it read the secrets again
    let newest = rotate("0").await;
    let (status, answer) = post(&base, &signed(&newest, "msg_newest", now(), body), body).await;
    assert_eq!(status, 200, "{answer}");

    // and the daemon's deliveries (signed with the current and the grace secrets) verify
    set_url(&client, endpoint, &format!("{base}/")).await;
    let daemon = Daemon::start(pg.config());
    wait_streaming(&client).await;
    publish(&client, "order.created", "{}").await;
    wait_succeeded(&client, 1).await;
    listen.wait_output("order.created").await;
    daemon.stop().await;

    let (ok, _, err) = run(&["listen", "--endpoint", "999", "--port", "0"], &env).await;
    assert!(!ok);
    assert!(err.contains("--endpoint 999: no such endpoint"), "{err}");
    let (ok, _, err) = run(&["listen", "--port", "0"], &[]).await;
    assert!(!ok);
    assert!(
        err.contains("--secret") && err.contains("--endpoint"),
        "{err}"
    );
    let (ok, _, err) = run(
        &[
            "listen",
            "--secret",
            &newest,
            "--forward-to",
            "https://localhost/",
        ],
        &[],
    )
    .await;
    assert!(!ok);
    assert!(err.contains("use http://"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_waits_for_its_delivery() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    // both commands as an operator (walhook_admin), as the README's roles table says
    client
        .batch_execute("create role ops login in role walhook_admin; create role nobody login;")
        .await
        .unwrap();
    let as_role = |role: &str| {
        let mut env = pg.env();
        env.push(("WALHOOK_DATABASE_URL".into(), pg.url_as(role)));
        env
    };
    let env = as_role("ops");
    let (endpoint, _) = add_endpoint(&client, "http://127.0.0.1:9/", &["order.*"]).await;
    let id = endpoint.to_string();
    let (listen, base) = listener(&["--endpoint", &id, "--port", "0"], &env).await;
    set_url(&client, endpoint, &format!("{base}/")).await;
    let daemon = Daemon::start(pg.config());
    wait_streaming(&client).await;

    let (ok, out, err) = run(&["send-test", "--endpoint", &id, "--wait"], &env).await;
    assert!(ok, "{out}{err}");
    let delivery = webhook_id(
        &client,
        "event_id in (select id from walhook.outbox where event_type = 'walhook.test')",
    )
    .await;
    assert!(
        out.contains(&format!(
            "walhook.test event (webhook-id {delivery}) to endpoint {endpoint}"
        )),
        "{out}"
    );
    assert!(out.contains("attempt 1: 200 in "), "{out}");
    assert!(out.lines().last().unwrap().ends_with("succeeded"), "{out}");
    let printed = listen
        .wait_output(&format!("walhook.test  {delivery}"))
        .await;
    assert!(printed.contains("a test event from walhook"), "{printed}");

    // a payload of one's own; without --wait it says how to follow the delivery
    let (ok, out, err) = run(
        &[
            "send-test",
            "--endpoint",
            &id,
            "--payload",
            r#"{"hello": "world"}"#,
        ],
        &env,
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("FROM walhook.deliveries WHERE id = "), "{out}");
    listen.wait_output("\"hello\": \"world\"").await;

    // mistakes name themselves
    let (ok, _, err) = run(&["send-test", "--endpoint", &id, "--payload", "{"], &env).await;
    assert!(!ok);
    assert!(err.contains("--payload is not JSON"), "{err}");
    let (ok, _, err) = run(&["send-test", "--endpoint", "999"], &env).await;
    assert!(!ok);
    assert!(err.contains("no endpoint 999"), "{err}");
    assert!(
        err.contains("SELECT id, url FROM walhook.endpoints"),
        "the hint: {err}"
    );
    let (ok, _, err) = run(&["send-test", "--endpoint", &id], &as_role("nobody")).await;
    assert!(!ok);
    assert!(
        err.contains("GRANT walhook_admin TO nobody"),
        "the fix: {err}"
    );
    let (ok, _, err) = run(
        &["listen", "--endpoint", &id, "--port", "0"],
        &as_role("nobody"),
    )
    .await;
    assert!(!ok);
    assert!(
        err.contains("GRANT walhook_admin TO nobody"),
        "the fix: {err}"
    );

    // an endpoint that refuses every attempt (the listener has another secret): dead, and it says so
    let (refusing, _) = add_endpoint(&client, "http://127.0.0.1:9/", &["order.*"]).await;
    let other = walhook::sign::generate_secret();
    let (strict, strict_base) = listener(&["--secret", &other, "--port", "0"], &[]).await;
    set_url(&client, refusing, &format!("{strict_base}/")).await;
    let (ok, out, err) = run(
        &["send-test", "--endpoint", &refusing.to_string(), "--wait"],
        &env,
    )
    .await;
    assert!(!ok, "{out}");
    assert!(out.contains("attempt 1: 401 in "), "{out}");
    assert!(out.contains("attempt 4: 401 in "), "{out}");
    assert!(out.contains("pending: next attempt at "), "{out}");
    assert!(err.contains("is dead after 4 attempts"), "{err}");
    strict.wait_output("no matching signature").await;
    daemon.stop().await;
}

/// The code blocks of docs/receivers.md's "Developing a receiver locally", in order, with their language.
fn doc_blocks() -> Vec<(String, String)> {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/receivers.md")).unwrap();
    let section = doc
        .split("## Developing a receiver locally")
        .nth(1)
        .expect("the section")
        .split("\n## ")
        .next()
        .unwrap();
    section
        .split("```")
        .skip(1)
        .step_by(2)
        .map(|block| {
            let (language, code) = block.split_once('\n').unwrap();
            (language.to_string(), code.trim().to_string())
        })
        .collect()
}

/// The words of a one-line command (the doc's commands quote nothing).
fn words(command: &str) -> Vec<&str> {
    command.split_whitespace().collect()
}

/// docs/receivers.md as written: the listener on its default port 9000 forwarding to an app on
/// localhost:3000, the endpoint pointed at it, a test event followed to its end, and a replay. The ports are
/// fixed by the doc, so this is the one test that binds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receivers_doc_runs_as_written() {
    let blocks = doc_blocks();
    let [(l1, listen_cmd), (l2, point_sql), (l3, send_cmd), (l4, replay_cmd)] = &blocks[..] else {
        panic!("docs/receivers.md: expected 4 blocks, found {blocks:?}");
    };
    assert_eq!([l1, l2, l3, l4], ["sh", "sql", "sh", "sh"]);
    // the README's pointer to the doc shows the same commands
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for command in [listen_cmd, send_cmd] {
        assert!(
            readme.contains(&format!("`{command}`")),
            "README: {command}"
        );
    }
    let pg = Pg::start().await;
    let client = pg.client().await;
    let env = pg.env();
    // the doc's endpoint 1 and app on localhost:3000
    let (endpoint, secret) = add_endpoint(&client, "http://127.0.0.1:9/", &["*"]).await;
    assert_eq!(endpoint, 1);
    let app = Receiver::start_on(3000)
        .await
        .expect("port 3000 is free for the doc's app");
    app.set_secret("/webhooks", &secret);

    let listen_words = words(listen_cmd);
    assert_eq!(listen_words[..2], ["walhook", "listen"]);
    let listen = Running::spawn(&listen_words[1..], &env);
    listen
        .wait_output("listening on http://127.0.0.1:9000/")
        .await;
    client.batch_execute(point_sql).await.unwrap();
    let daemon = Daemon::start(pg.config());
    wait_streaming(&client).await;

    let send_words = words(send_cmd);
    assert_eq!(send_words[..2], ["walhook", "send-test"]);
    let (ok, out, err) = run(&send_words[1..], &env).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("succeeded"), "{out}");
    let id = webhook_id(
        &client,
        "event_id in (select id from walhook.outbox where event_type = 'walhook.test')",
    )
    .await;
    let printed = listen.wait_output(&format!("walhook.test  {id}")).await;
    assert!(
        printed.contains("forwarded to http://localhost:3000/webhooks: 200 OK"),
        "{printed}"
    );
    assert_eq!(app.distinct_ids("/webhooks").len(), 1);

    // the replay command as the doc shows it, with the id the listener printed
    let replay = replay_cmd.replace("<webhook-id>", &id);
    assert!(printed.contains(&format!("replay: {replay}")), "{printed}");
    let replay_words = words(&replay);
    assert_eq!(replay_words[..3], ["curl", "-X", "POST"]);
    let (status, answer) = post(replay_words[3], &[], "").await;
    assert_eq!(status, 200, "{answer}");
    assert!(app.wait_until(DEADLINE, |r| r.len() == 2).await);
    assert!(app.received().iter().all(|r| r.verified == Some(true)));
    daemon.stop().await;
}
