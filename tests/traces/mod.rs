//! Tracing: a row's `traceparent` reaches the receiver as the parent of each attempt, and with
//! `tracing.otlp_endpoint` every attempt is exported as a span to an OTLP/HTTP collector written here (a
//! hyper server on loopback that decodes the protobuf with `opentelemetry-proto`'s types).

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode, Span};
use prost::Message;
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;

use crate::support::*;
use walhook::receiver::{Receiver, Reply};

/// A row's trace context: trace `4bf9…4736`, the application's span `00f0…02b7`, sampled.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const ROW_SPAN: &str = "00f067aa0ba902b7";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// An OTLP/HTTP collector on `127.0.0.1:<random port>`: every `POST /v1/traces` is decoded and kept.
struct Collector {
    port: u16,
    requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    stop: CancellationToken,
}

impl Collector {
    async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (kept, until) = (requests.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = until.cancelled() => return,
                    accepted = listener.accept() => accepted.unwrap().0,
                };
                let kept = kept.clone();
                tokio::spawn(async move {
                    let serve = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                        let kept = kept.clone();
                        async move {
                            let wanted = request.method() == http::Method::POST
                                && request.uri().path() == "/v1/traces"
                                && request.headers()["content-type"] == "application/x-protobuf";
                            let body = request.into_body().collect().await?.to_bytes();
                            let status = match ExportTraceServiceRequest::decode(body) {
                                Ok(export) if wanted => {
                                    kept.lock().unwrap().push(export);
                                    200
                                }
                                _ => 400,
                            };
                            let answer = ExportTraceServiceResponse::default().encode_to_vec();
                            Ok::<_, hyper::Error>(
                                http::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/x-protobuf")
                                    .body(Full::new(Bytes::from(answer)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), serve)
                        .await;
                });
            }
        });
        Collector {
            port,
            requests,
            stop,
        }
    }

    /// What `tracing.otlp_endpoint` is set to: the base URL (walhook appends `/v1/traces`).
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn spans(&self) -> Vec<Span> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| s.spans.clone())
            .collect()
    }

    /// `service.name` of every export.
    fn services(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| &r.resource_spans)
            .filter_map(|r| r.resource.as_ref())
            .flat_map(|r| &r.attributes)
            .filter(|a| a.key == "service.name")
            .filter_map(|a| match a.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr(span: &Span, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.clone())
}

fn int(span: &Span, key: &str) -> Option<i64> {
    match attr(span, key)? {
        Value::IntValue(i) => Some(i),
        other => panic!("{key} is {other:?}"),
    }
}

fn text(span: &Span, key: &str) -> Option<String> {
    match attr(span, key)? {
        Value::StringValue(s) => Some(s),
        other => panic!("{key} is {other:?}"),
    }
}

/// Commits an event with a traceparent; returns its outbox id and `webhook-id`.
async fn publish_traced(
    client: &tokio_postgres::Client,
    payload: &str,
    traceparent: Option<&str>,
) -> (i64, String) {
    let row = client
        .query_one(
            "insert into walhook.outbox (event_type, payload, traceparent)
             values ('order.created', $1::text::jsonb, $2) returning id, replace(uid::text, '-', '')",
            &[&payload, &traceparent],
        )
        .await
        .expect("insert a traced event");
    (row.get(0), format!("msg_{}", row.get::<_, String>(1)))
}

/// The `traceparent` a request carried, split into (trace id, span id, flags).
fn traceparent_of(r: &walhook::receiver::Received) -> Option<(String, String, String)> {
    let value = r.headers.get("traceparent")?.to_str().unwrap().to_string();
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    assert_eq!(parts[0], "00", "{value}");
    Some((parts[1].into(), parts[2].into(), parts[3].into()))
}

both_sources!(a_traceparent_reaches_the_receiver_and_the_collector_and_survives_a_retry);
/// The first attempt is answered 500, the retry 200. Between them the outbox row is deleted, so the retry
/// can only take the trace context from the delivery's own copy of the event.
async fn a_traceparent_reaches_the_receiver_and_the_collector_and_survives_a_retry(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let collector = Collector::start().await;
    let rx = Receiver::start().await.unwrap();
    rx.set_responder(|_, seen| Reply::Status(if seen == 1 { 500 } else { 200 }));
    let (endpoint, _) = add_endpoint(&client, &rx.url("/hook"), &["*"]).await;
    let daemon = Daemon::start(pg.config_for_with(source, |f| {
        f.merge(("tracing.otlp_endpoint", collector.endpoint()))
            .merge(("tracing.service_name", "relay-under-test"))
            // the retry waits until the test makes it due
            .merge(("delivery.retry_schedule", vec!["1h"]))
    }));
    wait_ready(source, &client).await;

    let (event, webhook_id) = publish_traced(&client, "{\"id\": 1}", Some(TRACEPARENT)).await;
    eventually("the first attempt failed and was recorded", || async {
        count(
            &client,
            "select count(*) from walhook.deliveries where status = 'pending' and attempts = 1",
        )
        .await
            == 1
    })
    .await;
    assert_eq!(
        count(
            &client,
            &format!(
                "select count(*) from walhook.deliveries where traceparent = '{TRACEPARENT}' \
                 and event_id = {event}"
            )
        )
        .await,
        1,
        "the pending delivery's copy of the event keeps the traceparent"
    );
    if source == Source::Notify {
        wait_all_processed(&client).await;
    }
    client
        .execute("delete from walhook.outbox where id = $1", &[&event])
        .await
        .unwrap();
    client
        .execute(
            "update walhook.deliveries set next_attempt_at = now() where event_id = $1",
            &[&event],
        )
        .await
        .unwrap();
    wait_succeeded(&client, 1).await;
    daemon.stop().await; // exports what is queued

    let received = rx.received();
    assert_eq!(received.len(), 2);
    let contexts: Vec<(String, String, String)> = received
        .iter()
        .map(|r| traceparent_of(r).expect("every attempt carries a traceparent"))
        .collect();
    for (trace, span, flags) in &contexts {
        assert_eq!(trace, TRACE_ID, "the row's trace");
        assert_ne!(span, ROW_SPAN, "a span of the attempt's own");
        assert_eq!(flags, "01", "flags copied");
    }
    assert_ne!(contexts[0].1, contexts[1].1, "each attempt is a span");

    let mut spans = collector.spans();
    spans.sort_by_key(|s| int(s, "walhook.attempt"));
    assert_eq!(spans.len(), 2, "{spans:#?}");
    assert!(collector.services().iter().all(|s| s == "relay-under-test"));
    for (i, span) in spans.iter().enumerate() {
        assert_eq!(span.name, "webhook.deliver");
        assert_eq!(span.kind, SpanKind::Client as i32);
        assert_eq!(hex(&span.trace_id), TRACE_ID);
        assert_eq!(
            hex(&span.parent_span_id),
            ROW_SPAN,
            "the row's span is the parent"
        );
        assert_eq!(
            hex(&span.span_id),
            contexts[i].1,
            "the span the receiver was told"
        );
        assert!(span.end_time_unix_nano >= span.start_time_unix_nano);
        assert_eq!(int(span, "walhook.endpoint.id"), Some(endpoint));
        assert_eq!(int(span, "walhook.event.id"), Some(event));
        assert_eq!(
            text(span, "walhook.webhook.id").as_deref(),
            Some(webhook_id.as_str())
        );
        assert_eq!(
            text(span, "walhook.event.type").as_deref(),
            Some("order.created")
        );
        assert_eq!(int(span, "walhook.attempt"), Some(i as i64 + 1));
        assert_eq!(text(span, "server.address").as_deref(), Some("127.0.0.1"));
        assert_eq!(int(span, "server.port"), Some(i64::from(rx.port())));
    }
    let (failed, delivered) = (&spans[0], &spans[1]);
    assert_eq!(int(failed, "http.response.status_code"), Some(500));
    assert_eq!(text(failed, "walhook.outcome").as_deref(), Some("retry"));
    assert_eq!(text(failed, "error.type").as_deref(), Some("500"));
    let status = failed.status.as_ref().unwrap();
    assert_eq!(status.code, StatusCode::Error as i32);
    assert_eq!(status.message, "HTTP 500");
    assert_eq!(int(delivered, "http.response.status_code"), Some(200));
    assert_eq!(
        text(delivered, "walhook.outcome").as_deref(),
        Some("delivered")
    );
    assert_eq!(text(delivered, "error.type"), None);
    assert_ne!(
        delivered.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );
}

/// With spans exported, a row without a traceparent starts a trace of its own, named by the event's uid, and
/// the receiver gets it; a row whose trace the application does not sample is sent along but not exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_attempts_of_untraced_rows_start_a_trace_and_unsampled_ones_are_not_exported() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let collector = Collector::start().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/hook"), &["*"]).await;
    let daemon =
        Daemon::start(pg.config_with(|f| f.merge(("tracing.otlp_endpoint", collector.endpoint()))));
    wait_streaming(&client).await;
    let (_, untraced) = publish_traced(&client, "{}", None).await;
    let unsampled = TRACEPARENT.replace("-01", "-00");
    let (_, not_sampled) = publish_traced(&client, "{}", Some(&unsampled)).await;
    wait_succeeded(&client, 2).await;
    daemon.stop().await;

    let received = rx.received();
    let by_id = |id: &str| received.iter().find(|r| r.webhook_id == id).unwrap();
    let (trace, span, flags) = traceparent_of(by_id(&untraced)).unwrap();
    assert_eq!(
        trace,
        untraced["msg_".len()..],
        "the event's uid names its trace"
    );
    assert_eq!(flags, "01");
    let (trace, _, flags) = traceparent_of(by_id(&not_sampled)).unwrap();
    assert_eq!(trace, TRACE_ID);
    assert_eq!(
        flags, "00",
        "the application's sampling decision is passed on"
    );

    let spans = collector.spans();
    assert_eq!(
        spans.len(),
        1,
        "only the sampled trace is exported: {spans:#?}"
    );
    assert_eq!(hex(&spans[0].trace_id), untraced["msg_".len()..]);
    assert_eq!(hex(&spans[0].span_id), span);
    assert!(spans[0].parent_span_id.is_empty(), "a root span");
    assert_eq!(collector.services(), ["walhook"]);
}

/// Off by default: no export, no header for rows without a traceparent (the request is exactly what it was
/// before tracing existed), and the row's context still reaches the receiver for rows that have one, here
/// inserted by the README's snippet, as written, by the application's role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_exporter_nothing_is_exported_and_untraced_deliveries_are_unchanged() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    client
        .batch_execute("create role app login in role walhook_writer")
        .await
        .unwrap();
    let app = pg.client_as("app").await;
    // listening, but not configured: it must hear nothing
    let collector = Collector::start().await;
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/hook"), &["*"]).await;
    let daemon = Daemon::start(pg.config());
    wait_streaming(&client).await;
    let (_, untraced) = publish_traced(&client, "{}", None).await;
    let snippet = crate::schema::readme_blocks("## Tracing", "sql");
    assert_eq!(snippet.len(), 1, "the Tracing section has one SQL block");
    assert!(snippet[0].contains(TRACEPARENT));
    app.batch_execute(&snippet[0]).await.unwrap();
    let traced: String = client
        .query_one(
            "select 'msg_' || replace(uid::text, '-', '') from walhook.outbox where payload = '{\"id\": 42}'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    wait_succeeded(&client, 2).await;
    daemon.stop().await;

    let received = rx.received();
    let plain = received.iter().find(|r| r.webhook_id == untraced).unwrap();
    let mut names: Vec<&str> = plain.headers.keys().map(|k| k.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "content-length",
            "content-type",
            "host",
            "user-agent",
            "webhook-id",
            "webhook-signature",
            "webhook-timestamp"
        ]
    );
    let traced = received.iter().find(|r| r.webhook_id == traced).unwrap();
    let (trace, span, flags) = traceparent_of(traced).unwrap();
    assert_eq!((trace.as_str(), flags.as_str()), (TRACE_ID, "01"));
    assert_ne!(span, ROW_SPAN);
    assert!(collector.requests.lock().unwrap().is_empty());
}

/// The outbox refuses a malformed traceparent with a message that says what is expected, for the
/// application's role (`walhook_writer`, which may insert the column); a valid one and NULL pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_traceparent_is_refused_at_insert_with_the_constraints_message() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    client
        .batch_execute("create role app login in role walhook_writer")
        .await
        .unwrap();
    let app = pg.client_as("app").await;
    let insert = "insert into walhook.outbox (event_type, payload, traceparent) values ('order.created', '{}', $1)";
    for bad in [
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", // no flags
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // uppercase
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // another version
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // no trace
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // no parent span
        "",
    ] {
        let err = app
            .execute(insert, &[&bad])
            .await
            .expect_err("a malformed traceparent is refused");
        let db = err.as_db_error().unwrap_or_else(|| panic!("{err:?}"));
        assert_eq!(db.code(), &SqlState::CHECK_VIOLATION, "{bad:?}: {db:?}");
        assert!(
            db.message().starts_with("invalid traceparent")
                && db.message().contains("00-<32 hex digits trace id>"),
            "{bad:?}: {}",
            db.message()
        );
        assert_eq!(db.constraint(), Some("outbox_traceparent_valid"));
    }
    for good in [Some(TRACEPARENT), None] {
        app.execute(insert, &[&good]).await.unwrap();
    }
    assert_eq!(
        count(
            &client,
            "select count(*) from walhook.outbox where traceparent is not null"
        )
        .await,
        1
    );
}

/// The failed-attempt log line carries the trace id: the row's, or with spans exported, the trace the attempt
/// started (the same id the exported span has).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_failed_attempt_log_line_carries_the_trace_id() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let collector = Collector::start().await;
    let rx = Receiver::start().await.unwrap();
    rx.set_responder(|_, _| Reply::Status(503));
    add_endpoint(&client, &rx.url("/down"), &["*"]).await;
    let mut env = pg.env();
    env.retain(|(k, _)| k != "WALHOOK_DELIVERY__RETRY_SCHEDULE");
    for (k, v) in [
        ("WALHOOK_LOG__FORMAT", "json".to_string()),
        ("WALHOOK_DELIVERY__RETRY_SCHEDULE", String::new()),
        ("WALHOOK_TRACING__OTLP_ENDPOINT", collector.endpoint()),
    ] {
        env.push((k.to_string(), v));
    }
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_walhook"))
        .arg("run")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_streaming(&client).await;
    let (traced, _) = publish_traced(&client, "{}", Some(TRACEPARENT)).await;
    let (untraced, untraced_id) = publish_traced(&client, "{}", None).await;
    eventually("both deliveries are dead", || async {
        count(
            &client,
            "select count(*) from walhook.deliveries where status = 'dead'",
        )
        .await
            == 2
    })
    .await;
    // SAFETY: kill(2) with the pid of a child we own
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = tokio::task::block_in_place(|| child.wait_with_output()).unwrap();
    assert!(out.status.success());
    let logs = String::from_utf8(out.stderr).unwrap();
    let trace_of = |event: i64| -> String {
        let line = logs
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|l| {
                l["fields"]["message"] == "delivery attempt failed"
                    && l["fields"]["event_id"] == event
            })
            .unwrap_or_else(|| panic!("no failed attempt of event {event}:\n{logs}"));
        line["fields"]["trace_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no trace_id: {line}"))
            .to_string()
    };
    assert_eq!(trace_of(traced), TRACE_ID);
    let untraced_trace = trace_of(untraced);
    assert_eq!(untraced_trace, untraced_id["msg_".len()..]);
    let mut exported: Vec<String> = collector.spans().iter().map(|s| hex(&s.trace_id)).collect();
    exported.sort();
    let mut logged = vec![TRACE_ID.to_string(), untraced_trace];
    logged.sort();
    assert_eq!(exported, logged, "the logs name the exported spans' traces");
}

/// WAL written before migration 9 describes the outbox without `traceparent`: a slot with such a backlog (an
/// upgrade while events kept coming) streams it, those events without trace context, and the rows written
/// after the migration with theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_from_before_the_column_streams_after_the_upgrade() {
    let pg = Pg::start_unmigrated(Default::default()).await;
    let mut client = pg.client().await;
    walhook::schema::migrate_with(
        &mut client,
        &walhook::schema::MigrateOptions {
            target: Some(7),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/hook"), &["*"]).await;
    client
        .batch_execute("select pg_create_logical_replication_slot('walhook', 'pgoutput')")
        .await
        .unwrap();
    let before = publish(&client, "order.created", "{\"n\": 1}").await;
    walhook::schema::migrate(&mut client).await.unwrap();
    let (after, _) = publish_traced(&client, "{\"n\": 2}", Some(TRACEPARENT)).await;

    let daemon = Daemon::start(pg.config());
    wait_succeeded(&client, 2).await;
    daemon.stop().await;
    let received = rx.received();
    let payload = |r: &walhook::receiver::Received| -> i64 {
        serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["data"]["n"]
            .as_i64()
            .unwrap()
    };
    let old = received.iter().find(|r| payload(r) == 1).unwrap();
    let new = received.iter().find(|r| payload(r) == 2).unwrap();
    assert!(traceparent_of(old).is_none(), "event {before}");
    assert_eq!(traceparent_of(new).unwrap().0, TRACE_ID, "event {after}");
}

/// A collector that cannot be reached changes nothing for deliveries: the event is delivered with its
/// header, the drain ends within its bound, and the lost export is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_never_affects_deliveries() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let rx = Receiver::start().await.unwrap();
    add_endpoint(&client, &rx.url("/hook"), &["*"]).await;
    let daemon = Daemon::start(pg.config_with(|f| {
        f.merge((
            "tracing.otlp_endpoint",
            format!("http://127.0.0.1:{closed}"),
        ))
        .merge(("tracing.otlp_timeout", "1s"))
    }));
    wait_streaming(&client).await;
    publish_traced(&client, "{}", Some(TRACEPARENT)).await;
    wait_succeeded(&client, 1).await;
    assert_eq!(
        traceparent_of(&rx.received()[0]).unwrap().0,
        TRACE_ID,
        "the header does not depend on the export"
    );
    daemon.stop().await; // the last export fails within tracing.otlp_timeout
    let metrics = walhook::metrics::install()
        .expect("walhook's recorder")
        .render();
    let failures: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("walhook_trace_export_failures_total "))
        .unwrap_or_else(|| panic!("no failure counter:\n{metrics}"))
        .parse()
        .unwrap();
    assert!(failures >= 1.0, "{metrics}");
}
