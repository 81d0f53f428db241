//! `walhook listen`: a local receiver for developers building one, which verifies each request the way a
//! receiver must, says loudly why one fails, and can hand verified requests to the developer's app.
//!
//! Verification is the Standard Webhooks order of checks (headers present, timestamp within five minutes,
//! a `v1` signature that matches), as a pure function so that each refusal and its reason are unit-tested;
//! the first check that fails is the reason given, since that is the one to fix. With `--endpoint` the
//! secrets are the endpoint's own (current and those in a rotation's grace period), read from the database,
//! and read again when a request matches none of them (the secret was rotated while listening), at most once
//! a second so a stream of bad requests cannot hammer the database.
//!
//! Verified requests are kept (the last `keep`) so `POST /replay/{webhook-id}` can forward one again while
//! the developer fixes their app. A replay is signed again with a fresh timestamp, as a retry would be,
//! because the original one is soon older than any receiver's tolerance.
//!
//! It binds loopback unless told otherwise: the only way to listen elsewhere is an explicit `--host`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::conninfo::ConnInfo;
use crate::pgerror::{Job, Target};
use crate::sign::Signer;

/// Signed timestamps further than this from the listener's clock are refused (Standard Webhooks).
pub const TOLERANCE_SECS: i64 = 5 * 60;
/// The default port of `walhook listen`.
pub const DEFAULT_PORT: u16 = 9000;
/// Bodies larger than this are refused with 413.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// How long the developer's app may take to answer a forwarded request.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);
/// Printed bodies are cut here.
const MAX_PRINTED_BYTES: usize = 64 * 1024;
/// Reloads of an endpoint's secrets after a miss are at least this far apart.
const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// What `walhook listen` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// `None`: loopback (127.0.0.1). A non-loopback address only when the user names it.
    pub host: Option<IpAddr>,
    pub port: u16,
    pub secrets: Secrets,
    pub forward_to: Option<Uri>,
    /// How many verified requests `POST /replay/{id}` can find.
    pub keep: usize,
}

/// Where the secrets that verify requests come from.
#[derive(Clone)]
pub enum Secrets {
    /// A `whsec_` secret given on the command line.
    Given(String),
    /// An endpoint's current secret and those in its rotation's grace period, read from the database.
    Endpoint { id: i64, database: Box<ConnInfo> },
}

impl std::fmt::Debug for Secrets {
    // never the secret (DESIGN.md invariant 7)
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secrets::Given(_) => f.write_str("Given(..)"),
            Secrets::Endpoint { id, .. } => write!(f, "Endpoint({id})"),
        }
    }
}

/// Why `walhook listen` could not start.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("--secret: {0}; pass the endpoint's secret (SELECT secret FROM walhook.endpoints WHERE id = …) or use --endpoint ID")]
    Secret(crate::sign::SecretError),
    #[error("--forward-to {url:?}: {why}")]
    ForwardTo { url: String, why: String },
    #[error(
        "--endpoint {id}: no such endpoint (SELECT id, url FROM walhook.endpoints lists them)"
    )]
    NoEndpoint { id: i64 },
    #[error("--endpoint {id}: its secret is unusable: {error}")]
    EndpointSecret {
        id: i64,
        error: crate::sign::SecretError,
    },
    #[error("--endpoint {id}: {message}")]
    Database { id: i64, message: String },
    #[error("cannot listen on {addr}: {error}{hint}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
        hint: &'static str,
    },
}

/// Checks a `--forward-to` URL: http, with a host. The developer's app runs on their machine, so https is
/// not needed and not offered.
pub fn parse_forward_to(url: &str) -> Result<Uri, ListenError> {
    let refuse = |why: &str| ListenError::ForwardTo {
        url: url.to_string(),
        why: why.to_string(),
    };
    let uri: Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| refuse(&format!("not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(refuse(
                "use http:// for your local app (https is not supported here)",
            ))
        }
        _ => return Err(refuse("expected a URL like http://localhost:3000/webhooks")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(refuse(
            "the URL has no host; e.g. http://localhost:3000/webhooks",
        ));
    }
    Ok(uri)
}

/// One secret that may verify requests, and how to name it in the output.
#[derive(Clone, Debug)]
pub struct Key {
    pub signer: Signer,
    /// "the secret", "endpoint 7's current secret", "a secret in endpoint 7's grace period (until …)".
    pub name: String,
}

/// A request that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub webhook_id: String,
    pub timestamp: i64,
    /// Index into the keys of the one that matched.
    pub key: usize,
}

/// Why a request failed verification: the first check that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// These of `webhook-id`, `webhook-timestamp`, `webhook-signature` are absent (or not text).
    MissingHeaders(Vec<&'static str>),
    /// `webhook-timestamp` is not a number of seconds.
    BadTimestamp(String),
    /// More than the tolerance away from this clock; `signature_matches` says whether the rest would pass.
    Stale {
        timestamp: i64,
        now: i64,
        signature_matches: bool,
    },
    /// `webhook-signature` holds no `v1,` entry; `found` lists the versions it holds.
    NoV1Signature { found: Vec<String> },
    /// None of the `v1` signatures matches any key.
    NoMatch { signatures: usize, keys: usize },
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::MissingHeaders(names) => write!(
                f,
                "missing header{} {}: not a Standard Webhooks request (walhook sends webhook-id, \
                 webhook-timestamp and webhook-signature)",
                if names.len() > 1 { "s" } else { "" },
                names.join(", ")
            ),
            Rejection::BadTimestamp(text) => {
                write!(f, "webhook-timestamp {text:?} is not a number of seconds since 1970")
            }
            Rejection::Stale {
                timestamp,
                now,
                signature_matches,
            } => {
                let age = now - timestamp;
                let when = if age > 0 {
                    format!("signed {age} s ago")
                } else {
                    format!("signed {} s in the future", -age)
                };
                write!(
                    f,
                    "stale timestamp: {when} ({}), beyond the {TOLERANCE_SECS} s tolerance: a replayed \
                     request, or a clock that is off",
                    rfc3339(*timestamp)
                )?;
                match signature_matches {
                    true => write!(f, " (the signature itself matches)"),
                    false => write!(f, " (and no signature matches either)"),
                }
            }
            Rejection::NoV1Signature { found } => write!(
                f,
                "webhook-signature has no v1 (HMAC) entry{}; walhook listen checks v1 signatures",
                match found.is_empty() {
                    true => String::new(),
                    false => format!(" (it has {})", found.join(", ")),
                }
            ),
            Rejection::NoMatch { signatures, keys } => write!(
                f,
                "no matching signature: {} in webhook-signature, none made with {}; the body, \
                 webhook-id or webhook-timestamp changed on the way, or the secret is not the endpoint's",
                plural(*signatures, "v1 signature"),
                match keys {
                    1 => "the secret".to_string(),
                    n => format!("any of the {n} secrets"),
                },
            ),
        }
    }
}

fn plural(n: usize, what: &str) -> String {
    match n {
        1 => format!("1 {what}"),
        n => format!("{n} {what}s"),
    }
}

/// Checks a request as a Standard Webhooks receiver must, at `now` (Unix seconds).
pub fn verify(
    headers: &HeaderMap,
    body: &[u8],
    keys: &[Key],
    now: i64,
) -> Result<Verified, Rejection> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    let (id, timestamp, signature) = (
        text("webhook-id"),
        text("webhook-timestamp"),
        text("webhook-signature"),
    );
    let (Some(id), Some(timestamp), Some(signature)) = (id, timestamp, signature) else {
        let missing = [
            ("webhook-id", id),
            ("webhook-timestamp", timestamp),
            ("webhook-signature", signature),
        ]
        .into_iter()
        .filter(|(_, value)| value.is_none())
        .map(|(name, _)| name)
        .collect();
        return Err(Rejection::MissingHeaders(missing));
    };
    let timestamp: i64 = timestamp
        .parse()
        .map_err(|_| Rejection::BadTimestamp(timestamp.to_string()))?;
    let matching = keys
        .iter()
        .position(|key| key.signer.verify(id, timestamp, body, signature));
    if now.abs_diff(timestamp) > TOLERANCE_SECS as u64 {
        return Err(Rejection::Stale {
            timestamp,
            now,
            signature_matches: matching.is_some(),
        });
    }
    match matching {
        Some(key) => Ok(Verified {
            webhook_id: id.to_string(),
            timestamp,
            key,
        }),
        None => {
            let versions: Vec<&str> = signature
                .split(' ')
                .filter_map(|entry| entry.split_once(',').map(|(version, _)| version))
                .collect();
            let signatures = versions.iter().filter(|v| **v == "v1").count();
            if signatures == 0 {
                let mut found: Vec<String> = versions.iter().map(|v| v.to_string()).collect();
                found.dedup();
                return Err(Rejection::NoV1Signature { found });
            }
            Err(Rejection::NoMatch {
                signatures,
                keys: keys.len(),
            })
        }
    }
}

/// `2026-12-02T01:53:50Z`, or the number when it is out of range.
fn rfc3339(timestamp: i64) -> String {
    u64::try_from(timestamp)
        .ok()
        .and_then(|secs| UNIX_EPOCH.checked_add(Duration::from_secs(secs)))
        .map(|at| humantime::format_rfc3339_seconds(at).to_string())
        .unwrap_or_else(|| timestamp.to_string())
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Reads an endpoint's secrets: the current one first, then those in a rotation's grace period.
async fn load_keys(id: i64, database: &ConnInfo) -> Result<Vec<Key>, ListenError> {
    let target = Target::of(database);
    let db_error = |e: crate::store::StoreError| ListenError::Database {
        id,
        message: e.describe_with(Job::Manage, Some(&target)),
    };
    let client = crate::store::connect_client(database)
        .await
        .map_err(db_error)?;
    let row = client
        .query_opt(
            "select e.secret,
                    array(select s.secret from walhook.endpoint_secrets s
                           where s.endpoint_id = e.id and s.expires_at > now() order by s.expires_at desc),
                    array(select s.expires_at::text from walhook.endpoint_secrets s
                           where s.endpoint_id = e.id and s.expires_at > now() order by s.expires_at desc)
               from walhook.endpoints e where e.id = $1",
            &[&id],
        )
        .await
        .map_err(|e| db_error(e.into()))?
        .ok_or(ListenError::NoEndpoint { id })?;
    let signer = |secret: &str| {
        Signer::new(secret).map_err(|error| ListenError::EndpointSecret { id, error })
    };
    let mut keys = vec![Key {
        signer: signer(&row.get::<_, String>(0))?,
        name: format!("endpoint {id}'s current secret"),
    }];
    let old: Vec<String> = row.get(1);
    let until: Vec<String> = row.get(2);
    for (secret, until) in old.iter().zip(until) {
        keys.push(Key {
            signer: signer(secret)?,
            name: format!("a secret in endpoint {id}'s rotation grace period (until {until})"),
        });
    }
    Ok(keys)
}

/// A verified request as it came, for replays.
#[derive(Clone)]
struct Kept {
    webhook_id: String,
    headers: HeaderMap,
    body: Bytes,
}

struct Shared {
    options: Options,
    /// http://host:port of the listener, for the replay hint.
    base: String,
    keys: Mutex<Vec<Key>>,
    last_reload: Mutex<Option<Instant>>,
    kept: Mutex<VecDeque<Kept>>,
    client: Client<HttpConnector, Full<Bytes>>,
    colour: bool,
}

/// A bound listener, not yet serving.
pub struct Listener {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl Listener {
    /// Loads the secrets (failing now if they are unusable) and binds the address.
    pub async fn bind(options: Options) -> Result<Listener, ListenError> {
        let keys = match &options.secrets {
            Secrets::Given(secret) => vec![Key {
                signer: Signer::new(secret).map_err(ListenError::Secret)?,
                name: "the secret".to_string(),
            }],
            Secrets::Endpoint { id, database } => load_keys(*id, database).await?,
        };
        let addr = SocketAddr::new(
            options.host.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            options.port,
        );
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|error| ListenError::Bind {
                addr,
                hint: match error.kind() {
                    std::io::ErrorKind::AddrInUse => {
                        "; another program uses this port: pick another with --port"
                    }
                    _ => "",
                },
                error,
            })?;
        let local = listener.local_addr().map_err(|error| ListenError::Bind {
            addr,
            error,
            hint: "",
        })?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(FORWARD_TIMEOUT));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        Ok(Listener {
            listener,
            shared: Arc::new(Shared {
                base: format!("http://{local}"),
                options,
                keys: Mutex::new(keys),
                last_reload: Mutex::new(None),
                kept: Mutex::new(VecDeque::new()),
                client,
                colour,
            }),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// What the listener does, for the start of its output.
    pub fn banner(&self) -> String {
        let shared = &self.shared;
        let options = &shared.options;
        let mut out = String::new();
        let keys = lock(&shared.keys);
        let _ = match &options.secrets {
            Secrets::Given(_) => writeln!(out, "walhook listen: verifying with the given secret"),
            Secrets::Endpoint { id, .. } => writeln!(
                out,
                "walhook listen: verifying with endpoint {id}'s secret{}",
                match keys.len() {
                    1 => String::new(),
                    n => format!(
                        " and {} in its rotation grace period",
                        plural(n - 1, "older secret")
                    ),
                }
            ),
        };
        let addr = self.local_addr();
        if !addr.ip().is_loopback() {
            let _ = writeln!(
                out,
                "warning: listening on {}, not loopback: other machines can reach this listener",
                addr.ip()
            );
        }
        let _ = writeln!(out, "listening on {}/", shared.base);
        if let Secrets::Endpoint { id, .. } = &options.secrets {
            let _ = writeln!(
                out,
                "point the endpoint here: UPDATE walhook.endpoints SET url = '{}/' WHERE id = {id};",
                shared.base
            );
        }
        let _ = match &options.forward_to {
            Some(to) => writeln!(
                out,
                "forwarding verified requests to {to}; POST {}/replay/<webhook-id> forwards one again",
                shared.base
            ),
            None => writeln!(out, "answering 200 to verified requests, 401 to the others"),
        };
        out
    }

    /// Serves until `stop` is cancelled.
    pub async fn serve(self, stop: CancellationToken) {
        let mut connections = JoinSet::new();
        let mut builder = http1::Builder::new();
        builder.keep_alive(true);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let shared = Arc::clone(&self.shared);
                        let service = service_fn(move |request| handle(Arc::clone(&shared), peer, request));
                        let connection = builder.serve_connection(TokioIo::new(stream), service);
                        connections.spawn(async move {
                            let _ = connection.await;
                        });
                    }
                    Err(e) => {
                        eprintln!("walhook listen: could not accept a connection: {e}");
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                    }
                },
            }
        }
    }
}

/// `walhook listen`: binds, prints what it does, serves until `stop`.
pub async fn run(options: Options, stop: CancellationToken) -> Result<(), ListenError> {
    let listener = Listener::bind(options).await?;
    print!("{}", listener.banner());
    listener.serve(stop).await;
    Ok(())
}

async fn handle(
    shared: Arc<Shared>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Ok(plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("walhook listen: bodies over {MAX_BODY_BYTES} bytes are refused\n"),
            ))
        }
    };
    if parts.method == Method::GET || parts.method == Method::HEAD {
        return Ok(plain(
            StatusCode::OK,
            format!(
                "walhook listen: POST webhooks to any path here; POST {}/replay/<webhook-id> forwards a verified one again\n",
                shared.base
            ),
        ));
    }
    if parts.method == Method::POST {
        if let Some(id) = parts.uri.path().strip_prefix("/replay/") {
            return Ok(replay(&shared, id).await);
        }
    }
    Ok(webhook(
        &shared,
        peer,
        &parts.method,
        &parts.uri,
        parts.headers,
        body,
    )
    .await)
}

/// Verifies one request, prints it, and answers (or forwards it).
async fn webhook(
    shared: &Shared,
    peer: SocketAddr,
    method: &Method,
    uri: &Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let now = unix_now();
    let mut verdict = verify(&headers, &body, &lock(&shared.keys), now);
    if matches!(verdict, Err(Rejection::NoMatch { .. })) && reload(shared).await {
        verdict = verify(&headers, &body, &lock(&shared.keys), now);
    }
    let paint = Paint(shared.colour);
    let mut out = String::new();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    match verdict {
        Err(why) => {
            let _ = writeln!(
                out,
                "{} {method} {} from {peer}{}: {why} → 401",
                paint.red("✗ REJECTED"),
                uri.path(),
                match header("webhook-id") {
                    id if id.is_empty() => String::new(),
                    id => format!(" (webhook-id {id})"),
                },
            );
            out.push_str(&pretty(&body));
            emit(&out);
            plain(
                StatusCode::UNAUTHORIZED,
                format!("walhook listen: signature verification failed: {why}\n"),
            )
        }
        Ok(verified) => {
            let key = lock(&shared.keys)
                .get(verified.key)
                .map(|k| k.name.clone())
                .unwrap_or_default();
            // the body's type (Standard Webhooks, CloudEvents structured) or CloudEvents binary mode's header
            let event_type = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_string))
                .or_else(|| (!header("ce-type").is_empty()).then(|| header("ce-type").to_string()))
                .unwrap_or_else(|| "(no type)".to_string());
            let _ = writeln!(
                out,
                "{} {}  {}  {}",
                paint.bold("━━"),
                paint.bold(&event_type),
                verified.webhook_id,
                rfc3339(verified.timestamp)
            );
            keep(
                shared,
                Kept {
                    webhook_id: verified.webhook_id.clone(),
                    headers: headers.clone(),
                    body: body.clone(),
                },
            );
            let response = match &shared.options.forward_to {
                None => {
                    let _ = writeln!(out, "{} with {key} → 200", paint.green("✓ verified"));
                    plain(StatusCode::OK, String::new())
                }
                Some(to) => {
                    let (response, outcome) = forward(shared, to, &headers, body.clone()).await;
                    let _ = writeln!(out, "{} with {key} → {outcome}", paint.green("✓ verified"));
                    let _ = writeln!(
                        out,
                        "  replay: curl -X POST {}/replay/{}",
                        shared.base, verified.webhook_id
                    );
                    response
                }
            };
            out.push_str(&pretty(&body));
            emit(&out);
            response
        }
    }
}

/// Reads the endpoint's secrets again (they may have been rotated), unless that was done less than a second
/// ago or the secret was given; returns whether the keys may have changed.
async fn reload(shared: &Shared) -> bool {
    let Secrets::Endpoint { id, database } = &shared.options.secrets else {
        return false;
    };
    {
        let mut last = lock(&shared.last_reload);
        if last.is_some_and(|at| at.elapsed() < RELOAD_INTERVAL) {
            return false;
        }
        *last = Some(Instant::now());
    }
    match load_keys(*id, database).await {
        Ok(keys) => {
            *lock(&shared.keys) = keys;
            true
        }
        Err(e) => {
            emit(&format!(
                "walhook listen: could not read the endpoint's secrets again: {e}\n"
            ));
            false
        }
    }
}

fn keep(shared: &Shared, kept: Kept) {
    let mut all = lock(&shared.kept);
    all.retain(|k| k.webhook_id != kept.webhook_id);
    all.push_back(kept);
    while all.len() > shared.options.keep.max(1) {
        all.pop_front();
    }
}

/// Sends a verified request on to the developer's app; returns the answer to give and a line saying how it
/// went.
async fn forward(
    shared: &Shared,
    to: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> (Response<Full<Bytes>>, String) {
    let mut request = Request::post(to.clone());
    for (name, value) in headers {
        if !is_hop_by_hop(name) {
            request = request.header(name, value);
        }
    }
    let request = request
        .body(Full::new(body))
        .expect("a request from a valid URI and headers");
    let started = Instant::now();
    let sent = tokio::time::timeout(FORWARD_TIMEOUT, async {
        let response = shared.client.request(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((parts, body))
    })
    .await;
    let took = started.elapsed().as_millis();
    match sent {
        Ok(Ok((parts, body))) => {
            let mut response = Response::new(Full::new(body));
            *response.status_mut() = parts.status;
            if let Some(kind) = parts.headers.get(CONTENT_TYPE) {
                response.headers_mut().insert(CONTENT_TYPE, kind.clone());
            }
            (
                response,
                format!("forwarded to {to}: {} in {took} ms", parts.status),
            )
        }
        Ok(Err(e)) => (
            plain(
                StatusCode::BAD_GATEWAY,
                format!(
                    "walhook listen: forwarding to {to} failed: {}\n",
                    root_cause(&*e)
                ),
            ),
            format!(
                "forwarding to {to} failed: {} (is your app running?) → 502",
                root_cause(&*e)
            ),
        ),
        Err(_) => (
            plain(
                StatusCode::GATEWAY_TIMEOUT,
                format!("walhook listen: {to} did not answer within {FORWARD_TIMEOUT:?}\n"),
            ),
            format!("{to} did not answer within {FORWARD_TIMEOUT:?} → 504"),
        ),
    }
}

/// Forwards a kept request again, signed anew with a fresh timestamp.
async fn replay(shared: &Shared, webhook_id: &str) -> Response<Full<Bytes>> {
    let Some(to) = &shared.options.forward_to else {
        return plain(
            StatusCode::CONFLICT,
            "walhook listen: nothing to replay to: start it with --forward-to URL\n".to_string(),
        );
    };
    let kept = lock(&shared.kept)
        .iter()
        .find(|k| k.webhook_id == webhook_id)
        .cloned();
    let Some(kept) = kept else {
        return plain(
            StatusCode::NOT_FOUND,
            format!(
                "walhook listen: no verified request with webhook-id {webhook_id:?} among the last {} kept\n",
                shared.options.keep
            ),
        );
    };
    let mut headers = kept.headers;
    let timestamp = unix_now();
    let signature = lock(&shared.keys)
        .first()
        .map(|key| key.signer.sign(webhook_id, timestamp, &kept.body));
    if let Some(signature) = signature {
        headers.insert(
            HeaderName::from_static("webhook-timestamp"),
            HeaderValue::from(timestamp),
        );
        headers.insert(
            HeaderName::from_static("webhook-signature"),
            HeaderValue::from_str(&signature).expect("base64 is a valid header value"),
        );
    }
    let (response, outcome) = forward(shared, to, &headers, kept.body).await;
    emit(&format!(
        "{} {webhook_id} (signed again at {}) → {outcome}\n",
        Paint(shared.colour).bold("↻ replayed"),
        rfc3339(timestamp)
    ));
    plain(
        response.status(),
        format!("walhook listen: replayed {webhook_id}: {outcome}\n"),
    )
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

/// The innermost cause of an error: hyper's outer layers ("client error (Connect)") say less than the
/// operating system's "Connection refused".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost = e;
    while let Some(cause) = innermost.source() {
        innermost = cause;
    }
    innermost.to_string()
}

/// The body as indented JSON, or as text when it is not JSON; cut at `MAX_PRINTED_BYTES`.
fn pretty(body: &[u8]) -> String {
    let mut text = match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
        Ok(_) => indent_json(&String::from_utf8_lossy(body)),
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    if text.len() > MAX_PRINTED_BYTES {
        let mut end = MAX_PRINTED_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("\n… (cut)");
    }
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

/// Re-indents valid JSON text two spaces a level, keeping keys in the order they were sent (parsing into
/// a `serde_json::Value` would sort them) and every number and string exactly as written.
fn indent_json(json: &str) -> String {
    let mut out = String::with_capacity(json.len() * 2);
    let mut depth = 0usize;
    let (mut in_string, mut escaped) = (false, false);
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.extend(std::iter::repeat_n("  ", depth));
    };
    let mut chars = json.chars().peekable();
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                // an empty object or array stays on its line
                while chars.peek().is_some_and(|c| c.is_whitespace()) {
                    chars.next();
                }
                if let Some(&close @ ('}' | ']')) = chars.peek() {
                    out.push(close);
                    chars.next();
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    out
}

/// Writes one request's lines at once, so concurrent requests do not interleave.
fn emit(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
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

/// ANSI colours, only for a person at a terminal.
#[derive(Clone, Copy)]
struct Paint(bool);

impl Paint {
    fn wrap(self, code: &str, text: &str) -> String {
        match self.0 {
            true => format!("\x1b[{code}m{text}\x1b[0m"),
            false => text.to_string(),
        }
    }
    fn red(self, text: &str) -> String {
        self.wrap("1;31", text)
    }
    fn green(self, text: &str) -> String {
        self.wrap("32", text)
    }
    fn bold(self, text: &str) -> String {
        self.wrap("1", text)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const OTHER: &str = "whsec_dGhpcyBpcyBhbm90aGVyIHNlY3JldCBrZXkhIQ==";
    const NOW: i64 = 1_800_000_000;

    fn key(secret: &str) -> Key {
        Key {
            signer: Signer::new(secret).unwrap(),
            name: "k".into(),
        }
    }

    fn headers(id: Option<&str>, ts: Option<&str>, sig: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in [
            ("webhook-id", id),
            ("webhook-timestamp", ts),
            ("webhook-signature", sig),
        ] {
            if let Some(value) = value {
                h.insert(name, HeaderValue::from_str(value).unwrap());
            }
        }
        h
    }

    fn signed(secret: &str, ts: i64, body: &[u8]) -> String {
        Signer::new(secret).unwrap().sign("msg_1", ts, body)
    }

    #[test]
    fn a_correctly_signed_request_verifies_with_the_key_that_made_it() {
        let body = br#"{"type":"order.created"}"#;
        let keys = [key(OTHER), key(SECRET)];
        let sig = format!("v1,bm9wZQ== {}", signed(SECRET, NOW - 10, body));
        let ts = (NOW - 10).to_string();
        assert_eq!(
            verify(
                &headers(Some("msg_1"), Some(&ts), Some(&sig)),
                body,
                &keys,
                NOW
            ),
            Ok(Verified {
                webhook_id: "msg_1".into(),
                timestamp: NOW - 10,
                key: 1
            })
        );
    }

    #[test]
    fn each_failed_check_is_named() {
        let body = b"{}";
        let keys = [key(SECRET)];
        let good = signed(SECRET, NOW, body);
        let now = NOW.to_string();
        let check = |h: HeaderMap| verify(&h, body, &keys, NOW).unwrap_err();

        let missing = check(headers(None, Some(&now), None));
        assert_eq!(
            missing,
            Rejection::MissingHeaders(vec!["webhook-id", "webhook-signature"])
        );
        assert!(missing
            .to_string()
            .starts_with("missing headers webhook-id, webhook-signature"));
        assert_eq!(
            check(headers(Some("msg_1"), Some("soon"), Some(&good))),
            Rejection::BadTimestamp("soon".into())
        );
        // stale, either way, and whether the signature would have matched
        let old = (NOW - 600).to_string();
        let stale = check(headers(
            Some("msg_1"),
            Some(&old),
            Some(&signed(SECRET, NOW - 600, body)),
        ));
        assert_eq!(
            stale,
            Rejection::Stale {
                timestamp: NOW - 600,
                now: NOW,
                signature_matches: true
            }
        );
        assert!(stale.to_string().contains("signed 600 s ago"), "{stale}");
        assert!(stale.to_string().contains("the signature itself matches"));
        let future = (NOW + 400).to_string();
        let ahead = check(headers(Some("msg_1"), Some(&future), Some(&good)));
        assert!(ahead.to_string().contains("400 s in the future"), "{ahead}");
        assert!(ahead.to_string().contains("no signature matches either"));
        // another body, another id, another secret
        let wrong = check(headers(
            Some("msg_1"),
            Some(&now),
            Some(&signed(OTHER, NOW, body)),
        ));
        assert_eq!(
            wrong,
            Rejection::NoMatch {
                signatures: 1,
                keys: 1
            }
        );
        assert!(wrong
            .to_string()
            .starts_with("no matching signature: 1 v1 signature"));
        assert_eq!(
            check(headers(Some("msg_2"), Some(&now), Some(&good))),
            Rejection::NoMatch {
                signatures: 1,
                keys: 1
            }
        );
        assert_eq!(
            check(headers(Some("msg_1"), Some(&now), Some("v1a,abc v1a,def"))),
            Rejection::NoV1Signature {
                found: vec!["v1a".into()]
            }
        );
        assert!(verify(
            &headers(Some("msg_1"), Some(&now), Some(&good)),
            b"{ }",
            &keys,
            NOW
        )
        .is_err());
    }

    #[test]
    fn within_the_tolerance_either_way_verifies() {
        let body = b"{}";
        let keys = [key(SECRET)];
        for ts in [NOW - TOLERANCE_SECS, NOW + TOLERANCE_SECS] {
            let h = headers(
                Some("msg_1"),
                Some(&ts.to_string()),
                Some(&signed(SECRET, ts, body)),
            );
            assert!(verify(&h, body, &keys, NOW).is_ok(), "{ts}");
        }
    }

    #[test]
    fn forward_to_must_be_a_local_http_url() {
        assert!(parse_forward_to("http://localhost:3000/webhooks").is_ok());
        for (url, why) in [
            ("https://localhost:3000/", "use http://"),
            ("localhost:3000", "expected a URL like"),
            ("ftp://x/", "expected a URL like"),
            ("http:///x", "not a URL"),
        ] {
            let e = parse_forward_to(url).unwrap_err().to_string();
            assert!(e.contains(why), "{url}: {e}");
        }
    }

    #[test]
    fn bodies_print_as_indented_json_or_text() {
        assert_eq!(pretty(br#"{"a":1}"#), "{\n  \"a\": 1\n}\n");
        // keys in the order sent, numbers and strings as written, empty containers kept short
        let sent = br#" {"type":"x", "data":{"z":1.50,"a":[1, {}, [ ]],"s":"a, \"b\": {c}\\"}} "#;
        assert_eq!(
            pretty(sent),
            r#"{
  "type": "x",
  "data": {
    "z": 1.50,
    "a": [
      1,
      {},
      []
    ],
    "s": "a, \"b\": {c}\\"
  }
}
"#
        );
        assert_eq!(pretty(b"not json"), "not json\n");
        assert_eq!(pretty(b""), "");
        let long = vec![b'x'; MAX_PRINTED_BYTES + 10];
        assert!(pretty(&long).ends_with("… (cut)\n"));
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let debug = format!("{:?}", Secrets::Given(SECRET.into()));
        assert!(!debug.contains("whsec_"), "{debug}");
    }
}
