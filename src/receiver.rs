//! A loopback webhook receiver: records every request, verifies Standard Webhooks signatures, and answers
//! as a test or benchmark tells it to (fail, delay, hang).
//!
//! It is the other end of every delivery in `walhook demo`, `walhook bench` and the integration tests, so it
//! must not be the bottleneck: each request costs one HMAC, a read of the (small) secret and responder maps,
//! and two short mutex sections (the attempt counter and the log push). Requests are recorded when they
//! arrive, before the reply, so a test can see a request that is hanging or delayed; `status_sent` is filled
//! in once the reply is actually handed to the connection. Waiters are woken by a `Notify`, never by polling.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::sign::Signer;

/// Signed timestamps further than this from the receiver's clock fail verification (Standard Webhooks).
const TIMESTAMP_TOLERANCE_SECS: i64 = 5 * 60;
/// Bodies larger than this are refused with 413 and not recorded.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Received {
    /// The URL path, without the query.
    pub path: String,
    /// The `webhook-id` header, empty when absent or not text.
    pub webhook_id: String,
    /// The `webhook-timestamp` header, 0 when absent or not a number.
    pub timestamp: i64,
    /// The `webhook-signature` header, empty when absent or not text.
    pub signature: String,
    /// Empty when recording of bodies is off.
    pub body: Bytes,
    pub arrived: SystemTime,
    /// `None` when no secret is registered for this path; otherwise whether the signature matched and the
    /// timestamp was within five minutes of the receiver's clock.
    pub verified: Option<bool>,
    /// The status answered; 0 while a `Delay` is running, and for good for `Hang` or when the client went
    /// away before the delayed answer.
    pub status_sent: u16,
    /// Empty when recording of bodies is off.
    pub headers: HeaderMap,
}

/// How the receiver answers one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Status(u16),
    StatusWithBody(u16, String),
    /// Answer with this status after the delay.
    Delay(Duration, u16),
    /// Never answer (the connection stays open until the client gives up or the receiver shuts down).
    Hang,
    /// Full control, e.g. `429` with `retry-after`. Header names or values that are not valid HTTP are skipped.
    Response {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
}

type Responder = dyn Fn(&Received, u32) -> Reply + Send + Sync;

/// A running receiver on `127.0.0.1:<random port>`. Cheap to clone; the server stops when `shutdown` is
/// called or the last clone is dropped.
#[derive(Clone)]
pub struct Receiver {
    shared: Arc<Shared>,
    server: Arc<Server>,
}

/// State the connection tasks use. They hold this, not `Server`, so dropping every `Receiver` stops them.
struct Shared {
    port: u16,
    /// Serving HTTPS (its URLs say `https`).
    tls: bool,
    log: Mutex<Vec<Received>>,
    /// Requests seen per `path \n webhook-id`, for the responder's attempt number.
    seen: Mutex<HashMap<String, u32>>,
    /// `None` for a path whose secret could not be decoded: its requests never verify.
    secrets: RwLock<HashMap<String, Option<Signer>>>,
    responder: RwLock<Arc<Responder>>,
    record_bodies: AtomicBool,
    /// Notified after every change to `log`.
    changed: Notify,
}

struct Server {
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Receiver {
    /// Binds `127.0.0.1:0` and starts serving (HTTP/1.1, keep-alive); every request is answered 200 until
    /// `set_responder` says otherwise.
    pub async fn start() -> std::io::Result<Receiver> {
        Receiver::start_on(0).await
    }

    /// Like `start`, on a chosen loopback port (tests bring a receiver up on a port an endpoint already
    /// points at).
    pub async fn start_on(port: u16) -> std::io::Result<Receiver> {
        Receiver::start_with(port, None).await
    }

    /// Like `start`, serving HTTPS with `tls` (whose ALPN protocols say whether HTTP/2 is offered: a
    /// connection that negotiates `h2` is served HTTP/2, any other HTTP/1.1).
    pub async fn start_tls(tls: Arc<rustls::ServerConfig>) -> std::io::Result<Receiver> {
        Receiver::start_with(0, Some(tokio_rustls::TlsAcceptor::from(tls))).await
    }

    async fn start_with(
        port: u16,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<Receiver> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
        let shared = Arc::new(Shared {
            port: listener.local_addr()?.port(),
            tls: tls.is_some(),
            log: Mutex::new(Vec::new()),
            seen: Mutex::new(HashMap::new()),
            secrets: RwLock::new(HashMap::new()),
            responder: RwLock::new(Arc::new(|_: &Received, _: u32| Reply::Status(200))),
            record_bodies: AtomicBool::new(true),
            changed: Notify::new(),
        });
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(listener, tls, Arc::clone(&shared), stop.clone()));
        Ok(Receiver {
            shared,
            server: Arc::new(Server {
                stop,
                task: Mutex::new(Some(task)),
            }),
        })
    }

    pub fn port(&self) -> u16 {
        self.shared.port
    }

    /// `http://127.0.0.1:<port><path>` (`https` when serving TLS; a missing leading `/` is added).
    pub fn url(&self, path: &str) -> String {
        let slash = if path.starts_with('/') { "" } else { "/" };
        let scheme = if self.shared.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}{slash}{path}", self.shared.port)
    }

    /// Verifies the signatures of requests to `path` with this `whsec_` secret from now on. A secret that
    /// cannot be decoded makes every request to the path unverified (`Some(false)`).
    pub fn set_secret(&self, path: &str, secret: &str) {
        let signer = match Signer::new(secret) {
            Ok(signer) => Some(signer),
            Err(e) => {
                tracing::warn!(path, error = %e, "receiver secret is unusable; requests to this path will not verify");
                None
            }
        };
        write(&self.shared.secrets).insert(path.to_string(), signer);
    }

    /// Decides the reply for each request; the default answers 200. Called with the request and how many
    /// times this (path, webhook-id) has been seen, including this one (1 = first). `status_sent` is 0 in
    /// the `Received` it is given.
    pub fn set_responder(&self, f: impl Fn(&Received, u32) -> Reply + Send + Sync + 'static) {
        *write(&self.shared.responder) = Arc::new(f);
    }

    /// Every request so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.shared.log).clone()
    }

    pub fn count(&self) -> usize {
        lock(&self.shared.log).len()
    }

    /// The webhook ids of requests to `path` that were answered 2xx.
    pub fn distinct_ids(&self, path: &str) -> HashSet<String> {
        lock(&self.shared.log)
            .iter()
            .filter(|r| r.path == path && (200..300).contains(&r.status_sent))
            .map(|r| r.webhook_id.clone())
            .collect()
    }

    /// Waits until `pred` holds for the requests so far, or `deadline` passes; returns whether it held.
    /// `pred` runs under the log's lock, once now and once after each change, so keep it cheap.
    pub async fn wait_until(&self, deadline: Duration, pred: impl Fn(&[Received]) -> bool) -> bool {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            // Register interest before checking, so a change between the check and the wait is not missed.
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if pred(&lock(&self.shared.log)) {
                return true;
            }
            if tokio::time::timeout_at(until, changed).await.is_err() {
                return false;
            }
        }
    }

    /// Whether bodies and headers are kept (default true). Benchmarks turn it off to save memory; id,
    /// timestamp, signature, arrival, verification and status are always kept.
    pub fn set_record_bodies(&self, on: bool) {
        self.shared.record_bodies.store(on, Ordering::Relaxed);
    }

    /// Stops accepting and closes every connection, including hanging ones; the log stays readable through
    /// other clones.
    pub async fn shutdown(self) {
        self.server.stop.cancel();
        let task = lock(&self.server.task).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// Accepts connections until stopped; dropping the `JoinSet` at the end aborts every connection task.
async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut builder = http1::Builder::new();
    // No idle or header timeout: closing a pooled connection under a client mid-send would turn into a
    // spurious failed delivery in tests.
    builder.keep_alive(true).header_read_timeout(None);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            // Reap finished connections so the set does not grow with every connection ever made.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let shared = Arc::clone(&shared);
                    let service = service_fn(move |request| handle(Arc::clone(&shared), request));
                    let http1 = builder.clone();
                    let tls = tls.clone();
                    // Errors here are clients going away, which is theirs to report.
                    connections.spawn(async move {
                        let Some(tls) = tls else {
                            let _ = http1.serve_connection(TokioIo::new(stream), service).await;
                            return;
                        };
                        let Ok(stream) = tls.accept(stream).await else {
                            return;
                        };
                        if stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice()) {
                            let _ = http2::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        } else {
                            let _ = http1.serve_connection(TokioIo::new(stream), service).await;
                        }
                    });
                }
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "receiver could not accept a connection");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
            },
        }
    }
}

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let arrived = SystemTime::now();
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return Ok(plain(StatusCode::PAYLOAD_TOO_LARGE, String::new())),
    };
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let webhook_id = header("webhook-id");
    let timestamp = header("webhook-timestamp").trim().parse::<i64>().ok();
    let signature = header("webhook-signature");
    let path = parts.uri.path().to_string();

    let verified = read(&shared.secrets)
        .get(&path)
        .map(|signer| match (signer, timestamp) {
            (Some(signer), Some(timestamp)) => {
                fresh(timestamp, arrived)
                    && signer.verify(&webhook_id, timestamp, &body, &signature)
            }
            _ => false,
        });
    let mut received = Received {
        path,
        webhook_id,
        timestamp: timestamp.unwrap_or(0),
        signature,
        body,
        arrived,
        verified,
        status_sent: 0,
        headers: parts.headers,
    };

    let attempt = {
        let key = format!("{}\n{}", received.path, received.webhook_id);
        let mut seen = lock(&shared.seen);
        let count = seen.entry(key).or_insert(0);
        *count = count.saturating_add(1);
        *count
    };
    // Clone the responder out of the lock so a slow responder never blocks `set_responder`.
    let responder = Arc::clone(&read(&shared.responder));
    let reply = responder(&received, attempt);

    if !shared.record_bodies.load(Ordering::Relaxed) {
        received.body = Bytes::new();
        received.headers = HeaderMap::new();
    }
    let (status, headers, body, delay) = match reply {
        Reply::Status(status) => (status, Vec::new(), String::new(), None),
        Reply::StatusWithBody(status, body) => (status, Vec::new(), body, None),
        Reply::Delay(delay, status) => (status, Vec::new(), String::new(), Some(delay)),
        Reply::Response {
            status,
            headers,
            body,
        } => (status, headers, body, None),
        Reply::Hang => {
            shared.record(received);
            return std::future::pending().await;
        }
    };
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match delay {
        None => {
            received.status_sent = status.as_u16();
            shared.record(received);
        }
        Some(delay) => {
            // Recorded now with status 0; if the client leaves during the delay hyper drops this future and
            // the entry keeps 0, which is the truth: nothing was answered.
            let index = shared.record(received);
            tokio::time::sleep(delay).await;
            lock(&shared.log)[index].status_sent = status.as_u16();
            shared.changed.notify_waiters();
        }
    }
    let mut response = plain(status, body);
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    Ok(response)
}

impl Shared {
    /// Appends to the log, wakes waiters, and returns the entry's index.
    fn record(&self, received: Received) -> usize {
        let index = {
            let mut log = lock(&self.log);
            log.push(received);
            log.len() - 1
        };
        self.changed.notify_waiters();
        index
    }
}

/// Whether a signed timestamp is within the tolerance of the arrival time.
fn fresh(timestamp: i64, arrived: SystemTime) -> bool {
    let now = arrived
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    now.abs_diff(timestamp) <= TIMESTAMP_TOLERANCE_SECS as u64
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

// A panicking responder or predicate must not make every later request panic too: ignore poisoning.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// A certificate authority made for one run and a server certificate it signed for `localhost` and
/// 127.0.0.1: what a loopback HTTPS receiver serves (`walhook bench --tls`, the tests), and the CA a relay
/// trusts through `delivery.ca_file`.
pub struct LoopbackTls {
    /// The CA's certificate, PEM.
    pub ca_pem: String,
    certificate: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl LoopbackTls {
    /// A new CA (named `ca_name`) and certificate.
    pub fn new(ca_name: &str) -> Result<LoopbackTls, rcgen::Error> {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, ca_name);
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate()?)?;
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()])?;
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca)?;
        Ok(LoopbackTls {
            ca_pem: ca.pem(),
            certificate: CertificateDer::from(cert.der().to_vec()),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        })
    }

    /// A server configuration presenting the certificate and offering `alpn` (e.g. `h2`, `http/1.1`; none:
    /// HTTP/1.1 without negotiation).
    pub fn server(&self, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![self.certificate.clone()],
                PrivateKeyDer::Pkcs8(self.key.clone_key()),
            )?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    const WAIT: Duration = Duration::from_secs(60);
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    type HttpClient = Client<HttpConnector, Full<Bytes>>;

    fn client() -> HttpClient {
        Client::builder(TokioExecutor::new()).build_http()
    }

    fn now() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    /// POSTs `body` with webhook headers (those given as `Some`); returns status and response body.
    async fn post(
        client: &HttpClient,
        url: &str,
        headers: Option<(&str, i64, &str)>,
        body: &'static str,
    ) -> (u16, String) {
        let mut request = Request::post(url).header("content-type", "application/json");
        if let Some((id, timestamp, signature)) = headers {
            request = request
                .header("webhook-id", id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", signature);
        }
        let response = client
            .request(request.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn records_requests_and_answers_200() {
        let receiver = Receiver::start().await.unwrap();
        assert_eq!(
            receiver.url("/a"),
            format!("http://127.0.0.1:{}/a", receiver.port())
        );
        assert_eq!(receiver.url("a"), receiver.url("/a"));
        let client = client();
        let (status, _) = post(
            &client,
            &receiver.url("/a?x=1"),
            Some(("msg_1", 1234, "v1,xyz")),
            "{}",
        )
        .await;
        assert_eq!(status, 200);
        let (status, _) = post(
            &client,
            &receiver.url("/a"),
            Some(("msg_1", 1234, "v1,xyz")),
            "{}",
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(receiver.count(), 2);
        let first = &receiver.received()[0];
        assert_eq!(first.path, "/a");
        assert_eq!(first.webhook_id, "msg_1");
        assert_eq!(first.timestamp, 1234);
        assert_eq!(first.signature, "v1,xyz");
        assert_eq!(&first.body[..], b"{}");
        assert_eq!(first.verified, None);
        assert_eq!(first.status_sent, 200);
        assert_eq!(first.headers["content-type"], "application/json");
        assert_eq!(
            receiver.distinct_ids("/a"),
            HashSet::from(["msg_1".to_string()])
        );
        assert!(receiver.distinct_ids("/b").is_empty());
        receiver.shutdown().await;
    }

    #[tokio::test]
    async fn verifies_signatures_with_the_registered_secret() {
        let receiver = Receiver::start().await.unwrap();
        receiver.set_secret("/signed", SECRET);
        receiver.set_secret("/broken", "not-a-secret");
        let signer = Signer::new(SECRET).unwrap();
        let client = client();
        let url = receiver.url("/signed");
        let body = r#"{"type":"order.created"}"#;
        let ts = now();
        let good = signer.sign("msg_ok", ts, body.as_bytes());
        post(&client, &url, Some(("msg_ok", ts, &good)), body).await;
        // a signature of another body
        let other = signer.sign("msg_bad", ts, b"{}");
        post(&client, &url, Some(("msg_bad", ts, &other)), body).await;
        // correctly signed but ten minutes old
        let stale = signer.sign("msg_old", ts - 600, body.as_bytes());
        post(&client, &url, Some(("msg_old", ts - 600, &stale)), body).await;
        // no webhook headers at all
        post(&client, &url, None, body).await;
        post(
            &client,
            &receiver.url("/broken"),
            Some(("msg_ok", ts, &good)),
            body,
        )
        .await;
        post(
            &client,
            &receiver.url("/open"),
            Some(("msg_ok", ts, &good)),
            body,
        )
        .await;

        let received = receiver.received();
        let verified: Vec<_> = received.iter().map(|r| r.verified).collect();
        assert_eq!(
            verified,
            [
                Some(true),
                Some(false),
                Some(false),
                Some(false),
                Some(false),
                None
            ]
        );
        assert_eq!(
            (received[3].webhook_id.as_str(), received[3].timestamp),
            ("", 0)
        );
        assert_eq!(received[3].signature, "");
        receiver.shutdown().await;
    }

    #[tokio::test]
    async fn responder_sees_attempt_numbers() {
        let receiver = Receiver::start().await.unwrap();
        receiver.set_responder(
            |received, attempt| match (received.webhook_id.as_str(), attempt) {
                ("always_fails", _) => Reply::StatusWithBody(503, "down".into()),
                (_, 1) => Reply::Status(500),
                _ => Reply::Response {
                    status: 202,
                    headers: vec![
                        ("x-seen".into(), attempt.to_string()),
                        ("bad header".into(), "x".into()),
                    ],
                    body: "ok".into(),
                },
            },
        );
        let client = client();
        let url = receiver.url("/r");
        assert_eq!(
            post(&client, &url, Some(("msg_a", 1, "")), "{}").await.0,
            500
        );
        assert!(receiver.distinct_ids("/r").is_empty());
        assert_eq!(
            post(&client, &url, Some(("msg_a", 1, "")), "{}").await,
            (202, "ok".into())
        );
        // same id on another path counts separately
        assert_eq!(
            post(&client, &receiver.url("/s"), Some(("msg_a", 1, "")), "{}")
                .await
                .0,
            500
        );
        assert_eq!(
            post(&client, &url, Some(("always_fails", 1, "")), "{}").await,
            (503, "down".into())
        );
        let statuses: Vec<u16> = receiver.received().iter().map(|r| r.status_sent).collect();
        assert_eq!(statuses, [500, 202, 500, 503]);
        assert_eq!(
            receiver.distinct_ids("/r"),
            HashSet::from(["msg_a".to_string()])
        );
        receiver.shutdown().await;
    }

    #[tokio::test]
    async fn hang_does_not_block_other_requests_or_shutdown() {
        let receiver = Receiver::start().await.unwrap();
        receiver.set_responder(|received, _| {
            if received.path == "/hang" {
                Reply::Hang
            } else {
                Reply::Status(204)
            }
        });
        let client = client();
        let hanging = {
            let request = Request::post(receiver.url("/hang"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let client = client.clone();
            tokio::spawn(async move { client.request(request).await.map(|r| r.status()) })
        };
        assert!(
            receiver
                .wait_until(WAIT, |r| r.iter().any(|r| r.path == "/hang"))
                .await
        );
        let ok = tokio::time::timeout(WAIT, post(&client, &receiver.url("/ok"), None, "{}")).await;
        assert_eq!(ok.unwrap().0, 204);
        assert_eq!(receiver.received()[0].status_sent, 0);
        // shutdown closes the hanging connection, which fails the hanging request
        let handle = receiver.clone();
        tokio::time::timeout(WAIT, receiver.shutdown())
            .await
            .unwrap();
        assert!(tokio::time::timeout(WAIT, hanging)
            .await
            .unwrap()
            .unwrap()
            .is_err());
        assert_eq!(handle.count(), 2);
    }

    #[tokio::test]
    async fn delay_records_on_arrival_and_status_when_answered() {
        let receiver = Receiver::start().await.unwrap();
        receiver.set_responder(|_, _| Reply::Delay(Duration::from_millis(200), 201));
        let client = client();
        let url = receiver.url("/slow");
        let request =
            tokio::spawn(async move { post(&client, &url, Some(("msg_d", 1, "")), "{}").await });
        assert!(receiver.wait_until(WAIT, |r| r.len() == 1).await);
        assert_eq!(request.await.unwrap().0, 201);
        // the status is set before the response goes out, so it is visible by now
        assert_eq!(receiver.received()[0].status_sent, 201);
        assert!(receiver.wait_until(WAIT, |r| r[0].status_sent == 201).await);
        receiver.shutdown().await;
    }

    #[tokio::test]
    async fn wait_until_wakes_on_arrival_and_times_out() {
        let receiver = Receiver::start().await.unwrap();
        assert!(
            !receiver
                .wait_until(Duration::from_millis(50), |r| !r.is_empty())
                .await
        );
        let waiter = {
            let receiver = receiver.clone();
            tokio::spawn(async move { receiver.wait_until(WAIT, |r| r.len() >= 3).await })
        };
        let client = client();
        for _ in 0..3 {
            post(&client, &receiver.url("/w"), None, "{}").await;
        }
        // with a one-minute deadline, true means it was woken by the arrivals
        assert!(tokio::time::timeout(WAIT, waiter).await.unwrap().unwrap());
        receiver.shutdown().await;
    }

    #[tokio::test]
    async fn bodies_can_be_left_out() {
        let receiver = Receiver::start().await.unwrap();
        receiver.set_secret("/b", SECRET);
        receiver.set_record_bodies(false);
        let signer = Signer::new(SECRET).unwrap();
        let ts = now();
        let signature = signer.sign("msg_b", ts, b"{\"big\":1}");
        post(
            &client(),
            &receiver.url("/b"),
            Some(("msg_b", ts, &signature)),
            "{\"big\":1}",
        )
        .await;
        let received = &receiver.received()[0];
        assert!(received.body.is_empty() && received.headers.is_empty());
        assert_eq!(
            (received.webhook_id.as_str(), received.verified),
            ("msg_b", Some(true))
        );
        drop(receiver);
    }
}
