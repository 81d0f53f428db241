//! The HTTP client: pooled keep-alive HTTP/1.1 (hyper-util), HTTPS with rustls, a guarded connector, no
//! redirects.
//!
//! TLS certificates are always verified, against the system store or the bundled Mozilla roots, plus an
//! optional extra CA file; there is no switch to turn verification off.
//! The connector resolves the host itself and checks every address against the network policy before
//! dialling, then dials exactly the vetted address, so a DNS answer cannot change between check and connect
//! (DNS rebinding). IP-literal hosts go through the same check. The whole exchange (request and the capped
//! read of the response body) runs under one timeout: hyper only bounds the connect.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;

use super::guard::{self, NetworkPolicy};
use crate::config::TlsRoots;

/// Why no response was obtained. Texts go into `walhook.attempts.error`.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Blocked(String),
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("request failed: {0}")]
    Request(String),
}

/// One request to make.
pub struct Outgoing<'a> {
    pub uri: &'a Uri,
    pub webhook_id: &'a str,
    pub timestamp: i64,
    /// The complete `webhook-signature` value.
    pub signature: &'a str,
    pub body: Bytes,
    /// Bounds the whole exchange, connection included.
    pub timeout: Duration,
    /// The endpoint's static extra headers (validated by the schema).
    pub headers: &'a [(http::HeaderName, HeaderValue)],
    /// The attempt's W3C trace context, when it has one.
    pub traceparent: Option<&'a str>,
}

/// A response: status, `Retry-After` and the start of the body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub retry_after: Option<String>,
    pub body_excerpt: String,
}

#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("{0}")]
    Blocked(String),
    #[error("{0}")]
    Other(String),
}

/// Resolves, vets and dials.
#[derive(Clone)]
struct GuardedConnector {
    policy: Arc<NetworkPolicy>,
    connect_timeout: Duration,
    https_only: bool,
}

impl tower_service::Service<Uri> for GuardedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.connect(uri).await })
    }
}

impl GuardedConnector {
    async fn connect(&self, uri: Uri) -> Result<TokioIo<TcpStream>, ConnectError> {
        let default_port = match uri.scheme_str() {
            Some("http") if self.https_only => {
                return Err(ConnectError::Blocked(
                    "http:// endpoints are refused because delivery.https_only = true; use an https:// url"
                        .into(),
                ))
            }
            Some("http") => 80,
            Some("https") => 443,
            other => return Err(ConnectError::Other(format!("unsupported url scheme {other:?}"))),
        };
        let host = uri
            .host()
            .ok_or_else(|| ConnectError::Other("url has no host".into()))?;
        let port = uri.port_u16().unwrap_or(default_port);
        let candidates: Vec<SocketAddr> = match guard::parse_host(host) {
            guard::Host::Ip(ip) => vec![SocketAddr::new(ip, port)],
            guard::Host::Name(name) => tokio::net::lookup_host((name, port))
                .await
                .map_err(|e| ConnectError::Other(format!("could not resolve {name}: {e}")))?
                .collect(),
        };
        let mut last_block = None;
        let mut allowed = Vec::new();
        for addr in candidates {
            match self.policy.permits(addr.ip()) {
                Ok(()) => allowed.push(addr),
                Err(blocked) => last_block = Some(blocked.to_string()),
            }
        }
        if allowed.is_empty() {
            let reason = last_block.unwrap_or_else(|| format!("{host} resolved to no address"));
            return Err(ConnectError::Blocked(reason));
        }
        let mut last_err = None;
        for addr in allowed {
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(TokioIo::new(stream));
                }
                Ok(Err(e)) => last_err = Some(format!("{addr}: {e}")),
                Err(_) => {
                    last_err = Some(format!(
                        "{addr}: connect timed out after {:?}",
                        self.connect_timeout
                    ))
                }
            }
        }
        Err(ConnectError::Other(last_err.unwrap_or_default()))
    }
}

/// Settings of the client.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    pub response_excerpt_bytes: usize,
    pub user_agent: String,
    pub https_only: bool,
    pub tls_roots: TlsRoots,
    /// Extra CA certificates (PEM), if any.
    pub ca_file: Option<PathBuf>,
}

/// Why the client could not be built (a bad CA file).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("delivery.ca_file {path}: {message}")]
    CaFile { path: String, message: String },
    #[error("tls setup failed: {0}")]
    Setup(#[from] rustls::Error),
}

/// The rustls configuration: roots as configured, verification always on, HTTP/1.1 only.
fn tls_config(settings: &ClientSettings) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    if settings.tls_roots == TlsRoots::System {
        let native = rustls_native_certs::load_native_certs();
        let (added, _ignored) = roots.add_parsable_certificates(native.certs);
        if added == 0 {
            tracing::warn!("no usable system CA certificates found; using the bundled roots");
        }
    }
    if roots.is_empty() {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if let Some(path) = &settings.ca_file {
        let fail = |message: String| TlsError::CaFile {
            path: path.display().to_string(),
            message,
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| fail(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| fail(e.to_string()))?;
        if certs.is_empty() {
            return Err(fail("no PEM certificate in the file".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| fail(e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

type Connector = hyper_rustls::HttpsConnector<GuardedConnector>;

pub struct HttpClient {
    client: Client<Connector, Full<Bytes>>,
    settings: ClientSettings,
    user_agent: HeaderValue,
}

impl HttpClient {
    pub fn new(settings: ClientSettings, policy: NetworkPolicy) -> Result<HttpClient, TlsError> {
        let guarded = GuardedConnector {
            policy: Arc::new(policy),
            connect_timeout: settings.connect_timeout,
            https_only: settings.https_only,
        };
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(&settings)?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(guarded);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(settings.pool_idle_timeout)
            .pool_max_idle_per_host(settings.pool_max_idle_per_host)
            .build(connector);
        let user_agent = HeaderValue::from_str(&settings.user_agent).unwrap_or_else(|_| {
            HeaderValue::from_static(concat!("walhook/", env!("CARGO_PKG_VERSION")))
        });
        Ok(HttpClient {
            client,
            settings,
            user_agent,
        })
    }

    /// POSTs a signed webhook.
    pub async fn post(&self, out: Outgoing<'_>) -> Result<Response, SendError> {
        let header =
            |v: &str| HeaderValue::from_str(v).map_err(|e| SendError::Request(e.to_string()));
        let mut builder = Request::post(out.uri.clone());
        for (name, value) in out.headers {
            // the attempt's own trace context replaces an endpoint's static one
            if out.traceparent.is_none() || name != "traceparent" {
                builder = builder.header(name, value);
            }
        }
        if let Some(traceparent) = out.traceparent {
            builder = builder.header("traceparent", header(traceparent)?);
        }
        let request = builder
            .header(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )
            .header(http::header::USER_AGENT, self.user_agent.clone())
            .header("webhook-id", header(out.webhook_id)?)
            .header("webhook-timestamp", HeaderValue::from(out.timestamp))
            .header("webhook-signature", header(out.signature)?)
            .body(Full::new(out.body))
            .map_err(|e| SendError::Request(e.to_string()))?;
        let timeout = out.timeout;
        let limit = self.settings.response_excerpt_bytes;
        let exchange = async {
            let response = self.client.request(request).await.map_err(classify)?;
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let mut body = response.into_body();
            let mut excerpt = Vec::new();
            while excerpt.len() < limit {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            let take = data.len().min(limit - excerpt.len());
                            excerpt.extend_from_slice(&data[..take]);
                        }
                    }
                    // a broken body after the status line still leaves a status to judge by
                    Some(Err(_)) | None => break,
                }
            }
            Ok(Response {
                status,
                retry_after,
                body_excerpt: text_excerpt(&excerpt),
            })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(SendError::Timeout(timeout)),
        }
    }
}

/// Maps hyper-util's error to ours, finding the connector's own error in the chain.
fn classify(e: hyper_util::client::legacy::Error) -> SendError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
    while let Some(s) = source {
        if let Some(c) = s.downcast_ref::<ConnectError>() {
            return match c {
                ConnectError::Blocked(m) => SendError::Blocked(m.clone()),
                ConnectError::Other(m) => SendError::Connect(m.clone()),
            };
        }
        source = s.source();
    }
    if e.is_connect() {
        SendError::Connect(error_chain(&e))
    } else {
        SendError::Request(error_chain(&e))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Body bytes as text for a `text` column: lossy UTF-8, without NUL (PostgreSQL text cannot hold it).
pub fn text_excerpt(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace('\0', "\u{FFFD}")
}
