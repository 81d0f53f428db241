//! Trace context: the W3C `traceparent` an application stores on its outbox row is carried to the receiver as
//! the parent of each delivery attempt, and with `tracing.otlp_endpoint` every attempt is exported as a span.
//!
//! An attempt is a span of its own, a child of the row's: the receiver gets a `traceparent` with the row's
//! trace id and the attempt's new span id (flags copied), so its spans hang under the attempt that caused
//! them, and a retry is a sibling in the same trace. A row without a traceparent gets no header, unless spans
//! are exported: then the attempt starts a trace whose id is the event's uid (the hex of `webhook-id`), so
//! every attempt of one event, to every endpoint, lands in one trace that is found from the `webhook-id`.
//!
//! Spans are built here as the SDK's `SpanData` and handed to its batch processor, which queues them (bounded,
//! dropping the surplus) and exports them over OTLP/HTTP from a thread of its own. The SDK's tracer and
//! context machinery are not used: an attempt's parent comes from a database column, never from the task
//! that runs it. The exporter's HTTP client is walhook's hyper stack (HTTP/1.1, rustls), run on the daemon's
//! runtime. Nothing here can fail or slow a delivery: a full queue drops spans, an export that fails is
//! counted and logged at most once a minute.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, SpanData, SpanEvents, SpanExporter, SpanLinks, SpanProcessor,
};
use opentelemetry_sdk::Resource;

use crate::event::Event;

/// The `traceparent` flag that says the trace is sampled (recorded).
const SAMPLED: u8 = 0x01;
/// The attempt span's name.
const SPAN_NAME: &str = "webhook.deliver";
/// Path of the OTLP/HTTP traces service, appended to `tracing.otlp_endpoint` unless it is there already.
const TRACES_PATH: &str = "/v1/traces";
/// Failed exports are logged at most this often (with how many failed meanwhile).
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// The largest collector response read (OTLP responses are a few bytes).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// A W3C trace context (`traceparent`, version 00): the trace, the span that is the parent, sampling flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// Parses `00-<32 hex>-<16 hex>-<2 hex>` as the outbox's constraint admits it: lowercase hex, version
    /// 00, neither id all zeros. `None` for anything else.
    pub fn parse(text: &str) -> Option<TraceParent> {
        let b = text.as_bytes();
        if b.len() != 55 || &b[..3] != b"00-" || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        let mut flags = [0u8; 1];
        hex_into(&b[3..35], &mut trace_id)?;
        hex_into(&b[36..52], &mut span_id)?;
        hex_into(&b[53..55], &mut flags)?;
        let parent = TraceParent {
            trace_id,
            span_id,
            flags: flags[0],
        };
        (trace_id != [0; 16] && span_id != [0; 8]).then_some(parent)
    }

    /// Whether the application's tracer records this trace.
    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// The trace id as 32 lowercase hex digits, as logs and tracing backends show it.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            self.flags
        )
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Decodes lowercase hex digits into `out` (exactly twice as many digits as bytes).
fn hex_into(digits: &[u8], out: &mut [u8]) -> Option<()> {
    let value = |d: u8| match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        _ => None,
    };
    if digits.len() != out.len() * 2 {
        return None;
    }
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = value(pair[0])? << 4 | value(pair[1])?;
    }
    Some(())
}

/// A new span id: random, never all zeros.
fn new_span_id() -> [u8; 8] {
    loop {
        let id = rand::random::<u64>();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

/// One delivery attempt as a span: started before the request, so its context can go in the header.
#[derive(Debug)]
pub struct AttemptSpan {
    /// This attempt's context, sent as `traceparent`; `None` when the row has none and nothing is exported.
    pub context: Option<TraceParent>,
    /// The row's context: the attempt span's parent.
    parent: Option<TraceParent>,
    /// Read only for a span that may be exported.
    started: Option<SystemTime>,
}

impl AttemptSpan {
    /// The span of an attempt at `event`, starting now. `exporting` gives a row without a traceparent a trace
    /// of its own (whose id is the event's uid); without it such a row's attempt has no context at all.
    pub fn start(event: &Event, exporting: bool) -> AttemptSpan {
        let parent = event.traceparent;
        let context = match parent {
            Some(p) => Some(TraceParent {
                span_id: new_span_id(),
                ..p
            }),
            None if exporting => Some(TraceParent {
                trace_id: event_trace_id(event),
                span_id: new_span_id(),
                flags: SAMPLED,
            }),
            None => None,
        };
        AttemptSpan {
            context,
            parent,
            started: exporting.then(SystemTime::now),
        }
    }

    /// The trace id for logs, when the attempt has a context.
    pub fn trace_id(&self) -> Option<String> {
        self.context.map(|c| c.trace_id_hex())
    }
}

/// The trace id of an event's attempts, for its logs: the row's, or with spans exported the event's own.
pub fn trace_id_of(event: &Event, exporting: bool) -> Option<String> {
    match event.traceparent {
        Some(p) => Some(p.trace_id_hex()),
        None if exporting => Some(hex(&event_trace_id(event))),
        None => None,
    }
}

/// The trace id of an event whose row has no traceparent: its uid, which is 128 random bits already and is
/// what `webhook-id` shows, so the trace is found from a delivery. (A random id if the uid were unusable.)
fn event_trace_id(event: &Event) -> [u8; 16] {
    let mut id = [0u8; 16];
    match hex_into(event.uid_hex().to_ascii_lowercase().as_bytes(), &mut id) {
        Some(()) if id != [0; 16] => id,
        _ => {
            let random = rand::random::<u128>().max(1);
            random.to_be_bytes()
        }
    }
}

/// How an attempt ended, for its span.
#[derive(Debug)]
pub struct AttemptEnd<'a> {
    pub endpoint_id: i64,
    /// The endpoint's URL: only its host and port are exported (its path or query may hold tokens).
    pub uri: &'a Uri,
    pub event: &'a Event,
    /// 1 for the first attempt of the delivery's current run of the schedule.
    pub attempt: u32,
    pub status_code: Option<i32>,
    /// `delivered`, `retry`, `dead` or `gone`, as `walhook_deliveries_total` counts it.
    pub outcome: &'static str,
    /// A short class of the failure (`timeout`, `connect`, `blocked`, `request`, or the HTTP status).
    pub error_type: Option<Cow<'a, str>>,
    /// The attempt's error as `walhook.attempts.error` has it.
    pub error: Option<&'a str>,
}

/// Why the `[tracing]` settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("tracing.otlp_endpoint {endpoint:?}: {message}")]
    Endpoint { endpoint: String, message: String },
    #[error("tracing.otlp_headers: {0}")]
    Headers(String),
    #[error("tracing: the OTLP exporter could not be set up: {0}")]
    Exporter(String),
}

/// The `[tracing]` settings the exporter is built from.
#[derive(Clone, Debug)]
pub struct TraceSettings {
    pub otlp_endpoint: String,
    pub otlp_headers: BTreeMap<String, String>,
    pub otlp_timeout: Duration,
    pub service_name: String,
}

/// The full URL spans are POSTed to: the endpoint as given when its path already ends in `/v1/traces`,
/// otherwise with that path appended (the collector's base URL, as `OTEL_EXPORTER_OTLP_ENDPOINT` is read).
pub fn traces_url(endpoint: &str) -> Result<Uri, String> {
    let uri: Uri = endpoint
        .parse()
        .map_err(|e| format!("not a URL ({e}); expected one like \"http://127.0.0.1:4318\""))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            return Err(
                "expected an http:// or https:// URL of an OTLP/HTTP collector, like \"http://127.0.0.1:4318\""
                    .into(),
            )
        }
    }
    let Some(authority) = uri.authority() else {
        return Err("names no host; expected a URL like \"http://127.0.0.1:4318\"".into());
    };
    if authority.as_str().contains('@') {
        return Err(
            "holds credentials; put them in tracing.otlp_headers (e.g. authorization) instead"
                .into(),
        );
    }
    if uri.query().is_some() {
        return Err("has a query; OTLP/HTTP takes none".into());
    }
    let path = uri.path().trim_end_matches('/');
    let path = if path.ends_with(TRACES_PATH) {
        path.to_string()
    } else {
        format!("{path}{TRACES_PATH}")
    };
    Uri::builder()
        .scheme(uri.scheme_str().expect("checked above"))
        .authority(authority.as_str())
        .path_and_query(path)
        .build()
        .map_err(|e| e.to_string())
}

/// The configured collector: the OTLP exporter and its HTTP client, built and checked, nothing running yet
/// (`walhook check-config` builds it too). [`Collector::start`] starts exporting.
#[derive(Debug)]
pub struct Collector {
    exporter: CountedExport,
    resource: Resource,
}

impl Collector {
    /// Builds the exporter; must run inside the daemon's Tokio runtime, whose handle its HTTP client keeps.
    pub fn new(settings: &TraceSettings) -> Result<Collector, TraceError> {
        let url = traces_url(&settings.otlp_endpoint).map_err(|message| TraceError::Endpoint {
            endpoint: settings.otlp_endpoint.clone(),
            message,
        })?;
        let mut headers = std::collections::HashMap::new();
        for (name, value) in &settings.otlp_headers {
            if http::HeaderName::from_str(name).is_err() {
                return Err(TraceError::Headers(format!(
                    "{name:?} is not a header name; use letters, digits and -"
                )));
            }
            if HeaderValue::from_str(value).is_err() {
                // the value may be a secret: never repeat it
                return Err(TraceError::Headers(format!(
                    "the value of {name:?} is not a header value; use one line of visible ASCII"
                )));
            }
            headers.insert(name.clone(), value.clone());
        }
        let client = CollectorClient::new(settings.otlp_timeout)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url.to_string())
            .with_timeout(settings.otlp_timeout)
            .with_headers(headers)
            .build()
            .map_err(|e| TraceError::Exporter(e.to_string()))?;
        let resource = Resource::builder()
            .with_service_name(settings.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Collector {
            exporter: CountedExport {
                inner: exporter,
                endpoint: url.to_string(),
                failures: Mutex::new(FailureLog::default()),
            },
            resource,
        })
    }

    /// Starts the batch processor's export thread.
    pub fn start(self) -> Exporter {
        let mut processor = BatchSpanProcessor::builder(self.exporter).build();
        processor.set_resource(&self.resource);
        Exporter {
            processor: Arc::new(processor),
            scope: InstrumentationScope::builder("walhook")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        }
    }
}

/// Exports attempt spans in the background. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Exporter {
    processor: Arc<BatchSpanProcessor>,
    scope: InstrumentationScope,
}

impl Exporter {
    /// Queues the finished attempt's span (never blocks; dropped when the queue is full). An attempt whose
    /// row says its trace is not sampled is not exported: the application's sampling decision holds.
    pub fn export(&self, span: AttemptSpan, end: AttemptEnd<'_>) {
        let Some(context) = span.context.filter(TraceParent::sampled) else {
            return;
        };
        let port = end.uri.port_u16().unwrap_or(match end.uri.scheme_str() {
            Some("http") => 80,
            _ => 443,
        });
        let mut attributes = vec![
            KeyValue::new("http.request.method", "POST"),
            KeyValue::new(
                "server.address",
                end.uri.host().unwrap_or_default().to_string(),
            ),
            KeyValue::new("server.port", i64::from(port)),
            KeyValue::new("walhook.endpoint.id", end.endpoint_id),
            KeyValue::new("walhook.event.id", end.event.id),
            KeyValue::new("walhook.webhook.id", end.event.webhook_id.clone()),
            KeyValue::new("walhook.event.type", end.event.event_type.clone()),
            KeyValue::new("walhook.attempt", i64::from(end.attempt)),
            KeyValue::new("walhook.outcome", end.outcome),
        ];
        if let Some(code) = end.status_code {
            attributes.push(KeyValue::new("http.response.status_code", i64::from(code)));
        }
        if let Some(kind) = end.error_type {
            attributes.push(KeyValue::new("error.type", kind.into_owned()));
        }
        let status = match end.error {
            Some(error) => Status::error(error.to_string()),
            None => Status::Unset,
        };
        let parent = span
            .parent
            .map_or(SpanId::INVALID, |p| SpanId::from_bytes(p.span_id));
        self.processor.on_end(SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(context.trace_id),
                SpanId::from_bytes(context.span_id),
                TraceFlags::new(context.flags),
                false,
                TraceState::NONE,
            ),
            parent_span_id: parent,
            parent_span_is_remote: span.parent.is_some(),
            span_kind: SpanKind::Client,
            name: Cow::Borrowed(SPAN_NAME),
            start_time: span.started.unwrap_or_else(SystemTime::now),
            end_time: SystemTime::now(),
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        });
    }

    /// Exports what is queued and stops the export thread, waiting at most `timeout`. Blocking: call it
    /// from a blocking task, while the runtime that carries the exports still runs.
    pub fn shutdown(&self, timeout: Duration) {
        if let Err(e) = self.processor.shutdown_with_timeout(timeout) {
            tracing::warn!("exporting the last spans failed: {e}");
        }
    }
}

/// The OTLP exporter, counting and logging its failures (never more than once a minute).
#[derive(Debug)]
struct CountedExport {
    inner: opentelemetry_otlp::SpanExporter,
    endpoint: String,
    failures: Mutex<FailureLog>,
}

impl SpanExporter for CountedExport {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len() as u64;
        let result = self.inner.export(batch).await;
        let report = {
            let mut failures = self.failures.lock().expect("never poisoned");
            match &result {
                Ok(()) => failures.succeeded(),
                Err(_) => failures.failed(Instant::now(), spans),
            }
        };
        if result.is_err() {
            metrics::counter!(crate::metrics::TRACE_EXPORT_FAILURES).increment(1);
        }
        match (report, &result) {
            (Some(Report::Failing { batches, spans }), Err(e)) => tracing::warn!(
                endpoint = %self.endpoint,
                "exporting spans to tracing.otlp_endpoint failed: {e}; {spans} spans in {batches} batches \
                 lost since the last message (deliveries are not affected); next message in a minute at \
                 the earliest"
            ),
            (Some(Report::Recovered { batches, spans }), _) => tracing::info!(
                endpoint = %self.endpoint,
                "exporting spans to tracing.otlp_endpoint works again ({spans} more spans in {batches} \
                 batches were lost since the last message)"
            ),
            _ => {}
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// What to log about export failures: a failure at most once per [`FAILURE_LOG_INTERVAL`] (with what failed
/// since the last message), and a recovery once after each logged failure.
#[derive(Debug, Default)]
struct FailureLog {
    last_logged: Option<Instant>,
    /// Failed batches and their spans since the last message.
    batches: u64,
    spans: u64,
    /// A failure was logged and no recovery since.
    logged_failing: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Report {
    Failing { batches: u64, spans: u64 },
    Recovered { batches: u64, spans: u64 },
}

impl FailureLog {
    fn failed(&mut self, now: Instant, spans: u64) -> Option<Report> {
        self.batches += 1;
        self.spans += spans;
        let due = self
            .last_logged
            .is_none_or(|at| now.saturating_duration_since(at) >= FAILURE_LOG_INTERVAL);
        if !due {
            return None;
        }
        self.last_logged = Some(now);
        self.logged_failing = true;
        Some(Report::Failing {
            batches: std::mem::take(&mut self.batches),
            spans: std::mem::take(&mut self.spans),
        })
    }

    fn succeeded(&mut self) -> Option<Report> {
        if !std::mem::take(&mut self.logged_failing) {
            return None;
        }
        Some(Report::Recovered {
            batches: std::mem::take(&mut self.batches),
            spans: std::mem::take(&mut self.spans),
        })
    }
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The exporter's HTTP client: hyper-util's pooled HTTP/1.1 client with rustls, as deliveries use. The SDK
/// calls it from its export thread, outside any runtime, so each request runs as a task on the daemon's.
#[derive(Clone)]
struct CollectorClient {
    client: Client<Connector, Full<Bytes>>,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
}

impl fmt::Debug for CollectorClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CollectorClient")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl CollectorClient {
    fn new(timeout: Duration) -> Result<CollectorClient, TraceError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| TraceError::Exporter(format!("no async runtime: {e}")))?;
        // the system's roots, where an operator installs a private CA; the bundled ones when it has none
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) =
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        if added == 0 {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TraceError::Exporter(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(CollectorClient {
            client: Client::builder(TokioExecutor::new()).build(connector),
            runtime,
            timeout,
        })
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for CollectorClient {
    async fn send_bytes(
        &self,
        request: Request<Bytes>,
    ) -> Result<Response<Bytes>, opentelemetry_http::HttpError> {
        let (client, timeout) = (self.client.clone(), self.timeout);
        let (parts, body) = request.into_parts();
        let request = Request::from_parts(parts, Full::new(body));
        let exchange = async move {
            let response = client.request(request).await?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await?
                .to_bytes();
            Ok::<_, opentelemetry_http::HttpError>(Response::from_parts(parts, body))
        };
        let task = self
            .runtime
            .spawn(async move { tokio::time::timeout(timeout, exchange).await });
        match task.await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => {
                Err(format!("no answer within tracing.otlp_timeout ({timeout:?})").into())
            }
            Err(e) => Err(format!("the export task ended: {e}").into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_parses_and_prints_back() {
        let p = TraceParent::parse(SAMPLE).unwrap();
        assert_eq!(p.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(p.span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert!(p.sampled());
        assert_eq!(p.to_string(), SAMPLE);
        let unsampled = TraceParent::parse(&SAMPLE.replace("-01", "-00")).unwrap();
        assert!(!unsampled.sampled());
    }

    #[test]
    fn traceparent_refuses_what_the_constraint_refuses() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    fn event(traceparent: Option<&str>) -> Event {
        Event::new(
            1,
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "order.created",
            "2026-11-29 20:18:59+00",
            "{}",
        )
        .with_traceparent(traceparent)
    }

    #[test]
    fn an_attempt_is_a_child_of_the_rows_span() {
        let e = event(Some(SAMPLE));
        let a = AttemptSpan::start(&e, false);
        let b = AttemptSpan::start(&e, true);
        for span in [&a, &b] {
            let c = span.context.unwrap();
            assert_eq!(c.trace_id, e.traceparent.unwrap().trace_id);
            assert_eq!(c.flags, 0x01);
            assert_ne!(c.span_id, e.traceparent.unwrap().span_id);
            assert_eq!(span.parent, e.traceparent);
        }
        assert_ne!(a.context.unwrap().span_id, b.context.unwrap().span_id);
        assert_eq!(
            a.trace_id().as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }

    #[test]
    fn a_row_without_traceparent_has_no_context_unless_exported() {
        let e = event(None);
        assert_eq!(AttemptSpan::start(&e, false).context, None);
        assert_eq!(AttemptSpan::start(&e, false).trace_id(), None);
        let span = AttemptSpan::start(&e, true);
        let c = span.context.unwrap();
        assert_eq!(c.trace_id_hex(), "a0eebc999c0b4ef8bb6d6bb9bd380a11");
        assert!(c.sampled());
        assert_eq!(span.parent, None);
    }

    #[test]
    fn collector_urls_get_the_traces_path() {
        let url = |s: &str| traces_url(s).map(|u| u.to_string());
        assert_eq!(
            url("http://127.0.0.1:4318").unwrap(),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            url("http://collector:4318/").unwrap(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            url("https://otlp.example.com/otlp").unwrap(),
            "https://otlp.example.com/otlp/v1/traces"
        );
        assert_eq!(
            url("https://otlp.example.com/otlp/v1/traces").unwrap(),
            "https://otlp.example.com/otlp/v1/traces"
        );
        assert!(url("collector:4318").is_err());
        assert!(url("grpc://collector:4317").is_err());
        assert!(url("http://user:pw@collector:4318")
            .unwrap_err()
            .contains("otlp_headers"));
        assert!(url("http://collector:4318/v1/traces?x=1").is_err());
    }

    #[test]
    fn export_failures_are_reported_once_a_minute_and_recovery_once() {
        let mut log = FailureLog::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(log.succeeded(), None);
        let failing = |batches, spans| Some(Report::Failing { batches, spans });
        assert_eq!(log.failed(at(0), 10), failing(1, 10));
        assert_eq!(log.failed(at(1), 5), None);
        assert_eq!(log.failed(at(59), 5), None);
        assert_eq!(log.failed(at(60), 1), failing(3, 11));
        assert_eq!(log.failed(at(61), 2), None);
        let recovered = Some(Report::Recovered {
            batches: 1,
            spans: 2,
        });
        assert_eq!(log.succeeded(), recovered);
        assert_eq!(log.succeeded(), None);
        // flapping: within the minute, failures are counted but neither they nor the recovery are logged
        assert_eq!(log.failed(at(62), 1), None);
        assert_eq!(log.succeeded(), None);
        assert_eq!(log.failed(at(121), 1), failing(2, 2));
    }
}
