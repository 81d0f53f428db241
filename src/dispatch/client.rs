//! The HTTP client: pooled keep-alive HTTP/1.1 (hyper-util), HTTPS with rustls, a guarded connector, no
//! redirects, and optionally an egress proxy.
//!
//! TLS certificates are always verified, against the system store or the bundled Mozilla roots, plus an
//! optional extra CA file; there is no switch to turn verification off.
//! The connector resolves the host itself and checks every address against the network policy before
//! dialling, then dials exactly the vetted address, so a DNS answer cannot change between check and connect
//! (DNS rebinding). IP-literal hosts go through the same check. The whole exchange (request and the capped
//! read of the response body) runs under one timeout: hyper only bounds the connect.
//!
//! Through a proxy ([`super::proxy`]) the connector dials the proxy instead, and for `https://` endpoints
//! opens a `CONNECT` tunnel that rustls then runs TLS through, verified against the endpoint's host name;
//! `http://` endpoints get absolute-form requests on the proxy connection. The proxy's own address is vetted
//! like any other unless it is the operator's `delivery.proxy`; the endpoint's host is the proxy's to resolve,
//! so only an IP-literal host can be vetted here. hyper-util pools connections by the endpoint's scheme and
//! authority, so each proxy gets a client (and a pool) of its own: a pooled connection is keyed by
//! (proxy, endpoint authority) and never reused for another route.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::guard::{self, NetworkPolicy};
use super::proxy::{self, EndpointProxy, NoProxy, ProxyUrl};
use crate::config::TlsRoots;

/// The most of a proxy's answer to `CONNECT` that is read (its status line and headers).
const MAX_CONNECT_ANSWER: usize = 16 * 1024;

/// Why no response was obtained. Texts go into `walhook.attempts.error`.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Blocked(String),
    #[error("connection failed: {0}")]
    Connect(String),
    /// The proxy could not be reached, or refused the delivery (`407`, a refused `CONNECT`); retried like a
    /// connection failure.
    #[error("{0}")]
    Proxy(String),
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
    /// `application/json`, or `application/cloudevents+json` for CloudEvents' structured mode.
    pub content_type: &'static str,
    /// The format's own headers (CloudEvents binary mode's `ce-*`).
    pub extra_headers: &'a [(&'static str, String)],
    /// Bounds the whole exchange, connection included.
    pub timeout: Duration,
    /// The endpoint's static extra headers (validated by the schema).
    pub headers: &'a [(http::HeaderName, HeaderValue)],
    /// The endpoint's `proxy` column.
    pub proxy: &'a EndpointProxy,
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
    Proxy(String),
    #[error("{0}")]
    Other(String),
}

/// The proxy a connector goes through.
struct Hop {
    url: Arc<ProxyUrl>,
    /// The operator's `delivery.proxy`: its addresses are not vetted (it is usually in a private network).
    /// A proxy named in an endpoint row is vetted like an endpoint, since endpoint rows are written by users
    /// of the database.
    trusted: bool,
}

impl Hop {
    fn describe(&self) -> String {
        describe_proxy(&self.url, self.trusted)
    }
}

/// "the proxy 10.0.5.7:3128 (delivery.proxy)" or "the endpoint's proxy 10.0.5.7:3128": which one, never its
/// credentials.
fn describe_proxy(url: &ProxyUrl, configured: bool) -> String {
    match configured {
        true => format!("the proxy {} (delivery.proxy)", url.address()),
        false => format!("the endpoint's proxy {}", url.address()),
    }
}

/// A proxy's refusal, status first (`walhook status` shows the start of an error): "407 Proxy
/// Authentication Required from the proxy 10.0.5.7:3128 (delivery.proxy) for the tunnel to host:443; check …".
fn refusal(status: &str, proxy: &str, what: &str) -> String {
    let mut message = format!("{status} from {proxy} for {what}");
    if status.starts_with("407") {
        message.push_str("; check the user name and password in the proxy URL");
    }
    message
}

/// Resolves, vets and dials: the endpoint, or its proxy (and opens the tunnel for https).
#[derive(Clone)]
struct GuardedConnector {
    policy: Arc<NetworkPolicy>,
    connect_timeout: Duration,
    https_only: bool,
    user_agent: HeaderValue,
    proxy: Option<Arc<Hop>>,
}

impl tower_service::Service<Uri> for GuardedConnector {
    type Response = Conn;
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
    async fn connect(&self, uri: Uri) -> Result<Conn, ConnectError> {
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
        let Some(hop) = &self.proxy else {
            let stream = self.dial(host, port, true).await?;
            return Ok(Conn::new(stream, false));
        };
        let target = proxy::tunnel_target(&self.policy, host, port)
            .map_err(|blocked| ConnectError::Blocked(blocked.to_string()))?;
        let stream = self
            .dial(hop.url.host(), hop.url.port(), !hop.trusted)
            .await
            .map_err(|e| match e {
                ConnectError::Blocked(m) => {
                    ConnectError::Blocked(format!("{}: {m}", hop.describe()))
                }
                other => {
                    ConnectError::Proxy(format!("could not connect to {}: {other}", hop.describe()))
                }
            })?;
        if default_port == 80 {
            // absolute-form requests on the proxy connection (hyper-util writes them for a proxied one)
            return Ok(Conn::new(stream, true));
        }
        let tunnel = tokio::time::timeout(self.connect_timeout, self.tunnel(stream, hop, &target));
        match tunnel.await {
            Ok(result) => result.map(|stream| Conn::new(stream, false)),
            Err(_) => Err(ConnectError::Proxy(format!(
                "{} did not answer CONNECT {target} within {:?} (delivery.connect_timeout)",
                hop.describe(),
                self.connect_timeout
            ))),
        }
    }

    /// Resolves `host` (unless it is an IP literal), vets every address unless `vet` is false, and connects
    /// to the first allowed one that answers.
    async fn dial(&self, host: &str, port: u16, vet: bool) -> Result<TcpStream, ConnectError> {
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
                Err(_) if !vet => allowed.push(addr),
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
                    return Ok(stream);
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

    /// Asks the proxy for a tunnel to `target` (`host:port`); the stream is the tunnel once it says yes.
    async fn tunnel(
        &self,
        mut stream: TcpStream,
        hop: &Hop,
        target: &str,
    ) -> Result<TcpStream, ConnectError> {
        let failed = |what: String| ConnectError::Proxy(format!("{}: {what}", hop.describe()));
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Ok(agent) = self.user_agent.to_str() {
            request.push_str(&format!("User-Agent: {agent}\r\n"));
        }
        if let Some(authorization) = hop.url.authorization() {
            request.push_str(&format!("Proxy-Authorization: {authorization}\r\n"));
        }
        request.push_str("\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| failed(format!("sending CONNECT {target} failed: {e}")))?;
        // Read up to the end of the answer's head. Nothing follows a 2xx head until TLS starts from our side,
        // so whatever came with it would be a protocol error.
        let mut head = Vec::with_capacity(512);
        let end = loop {
            if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            if head.len() >= MAX_CONNECT_ANSWER {
                return Err(failed(format!(
                    "its answer to CONNECT {target} has no end within {MAX_CONNECT_ANSWER} bytes"
                )));
            }
            let mut chunk = [0u8; 1024];
            let n = stream.read(&mut chunk).await.map_err(|e| {
                failed(format!(
                    "reading its answer to CONNECT {target} failed: {e}"
                ))
            })?;
            if n == 0 {
                return Err(failed(format!(
                    "it closed the connection instead of answering CONNECT {target}"
                )));
            }
            head.extend_from_slice(&chunk[..n]);
        };
        let Some((code, reason)) = proxy::connect_status(&head) else {
            return Err(failed(format!(
                "its answer to CONNECT {target} is not HTTP; is {} an HTTP proxy?",
                hop.url.address()
            )));
        };
        let status = format!("{code} {reason}").trim_end().to_string();
        match code {
            200..=299 if head.len() == end => Ok(stream),
            200..=299 => Err(failed(format!(
                "it sent data after its {status} to CONNECT {target}, before the TLS handshake"
            ))),
            _ => Err(ConnectError::Proxy(refusal(
                &status,
                &hop.describe(),
                &format!("the tunnel to {target}"),
            ))),
        }
    }
}

/// A connection from the connector: to the endpoint, a tunnel through a proxy, or a connection to a proxy
/// that takes absolute-form requests (`proxied`).
struct Conn {
    io: TokioIo<TcpStream>,
    proxied: bool,
}

impl Conn {
    fn new(stream: TcpStream, proxied: bool) -> Conn {
        Conn {
            io: TokioIo::new(stream),
            proxied,
        }
    }
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.proxied)
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
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
    /// `delivery.http2`: offer HTTP/2 to `https://` endpoints.
    pub http2: bool,
    pub tls_roots: TlsRoots,
    /// Extra CA certificates (PEM), if any.
    pub ca_file: Option<PathBuf>,
    /// `delivery.proxy`.
    pub proxy: Option<ProxyUrl>,
    /// `delivery.no_proxy`.
    pub no_proxy: NoProxy,
}

/// Why the client could not be built (a bad CA file).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("delivery.ca_file {path}: {message}")]
    CaFile { path: String, message: String },
    #[error("tls setup failed: {0}")]
    Setup(#[from] rustls::Error),
}

/// The rustls configuration: roots as configured, verification always on (ALPN is the connector's).
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
type PooledClient = Client<Connector, Full<Bytes>>;

pub struct HttpClient {
    /// Deliveries without a proxy.
    direct: PooledClient,
    /// One client per proxy URL (credentials included), made on first use: hyper-util keys its pool by the
    /// endpoint's authority only, so separate pools keep each connection to its own route. Proxies are few
    /// (the configured one, and those endpoint rows name), and an unused client holds nothing once its idle
    /// connections time out (`delivery.pool_idle_timeout`).
    proxied: Mutex<HashMap<Arc<ProxyUrl>, PooledClient>>,
    routes: Routes,
    no_proxy: NoProxy,
    response_excerpt_bytes: usize,
}

/// What every client is built from.
struct Routes {
    policy: Arc<NetworkPolicy>,
    tls: rustls::ClientConfig,
    settings: ClientSettings,
    configured_proxy: Option<Arc<ProxyUrl>>,
    user_agent: HeaderValue,
}

impl Routes {
    /// A client whose connections go directly, or through `proxy`.
    fn client(&self, proxy: Option<&Arc<ProxyUrl>>) -> PooledClient {
        let hop = proxy.map(|url| {
            let trusted = self
                .configured_proxy
                .as_ref()
                .is_some_and(|configured| configured.same_address(url));
            Arc::new(Hop {
                url: url.clone(),
                trusted,
            })
        });
        let guarded = GuardedConnector {
            policy: self.policy.clone(),
            connect_timeout: self.settings.connect_timeout,
            https_only: self.settings.https_only,
            user_agent: self.user_agent.clone(),
            proxy: hop,
        };
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(self.tls.clone())
            .https_or_http()
            .enable_http1();
        let connector = match self.settings.http2 {
            // ALPN offers h2 then http/1.1: the endpoint's TLS server picks, plain http:// stays HTTP/1.1
            true => builder.enable_http2().wrap_connector(guarded),
            false => builder.wrap_connector(guarded),
        };
        Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(self.settings.pool_idle_timeout)
            .pool_max_idle_per_host(self.settings.pool_max_idle_per_host)
            .build(connector)
    }
}

impl HttpClient {
    pub fn new(settings: ClientSettings, policy: NetworkPolicy) -> Result<HttpClient, TlsError> {
        let user_agent = HeaderValue::from_str(&settings.user_agent).unwrap_or_else(|_| {
            HeaderValue::from_static(concat!("walhook/", env!("CARGO_PKG_VERSION")))
        });
        let routes = Routes {
            policy: Arc::new(policy),
            tls: tls_config(&settings)?,
            configured_proxy: settings.proxy.clone().map(Arc::new),
            user_agent,
            settings,
        };
        Ok(HttpClient {
            direct: routes.client(None),
            proxied: Mutex::default(),
            no_proxy: routes.settings.no_proxy.clone(),
            response_excerpt_bytes: routes.settings.response_excerpt_bytes,
            routes,
        })
    }

    /// The client for a proxy, made on first use.
    fn via(&self, proxy: &Arc<ProxyUrl>) -> PooledClient {
        let mut clients = self.proxied.lock().expect("never poisoned");
        clients
            .entry(proxy.clone())
            .or_insert_with(|| self.routes.client(Some(proxy)))
            .clone()
    }

    /// POSTs a signed webhook.
    pub async fn post(&self, out: Outgoing<'_>) -> Result<Response, SendError> {
        let header =
            |v: &str| HeaderValue::from_str(v).map_err(|e| SendError::Request(e.to_string()));
        let host = out.uri.host().unwrap_or_default();
        let route = proxy::route(
            self.routes.configured_proxy.as_ref(),
            &self.no_proxy,
            out.proxy,
            host,
        );
        // absolute-form through a proxy: the request line carries the endpoint's authority
        let plain_via_proxy = route.is_some() && out.uri.scheme_str() == Some("http");
        let client = match &route {
            Some(proxy) => self.via(proxy),
            None => self.direct.clone(),
        };
        let uri = match plain_via_proxy {
            true => absolute_uri(out.uri, &self.routes.policy).map_err(SendError::Blocked)?,
            false => out.uri.clone(),
        };
        let target =
            plain_via_proxy.then(|| uri.authority().map(|a| a.to_string()).unwrap_or_default());
        // built again for a stream refused unprocessed, rather than cloned: a clone kept for every request
        // in flight would double what their heads hold
        let build = || -> Result<Request<Full<Bytes>>, SendError> {
            let mut builder = Request::post(uri.clone());
            for (name, value) in out.headers {
                // the attempt's own trace context replaces an endpoint's static one
                if out.traceparent.is_none() || name != "traceparent" {
                    builder = builder.header(name, value);
                }
            }
            if let Some(traceparent) = out.traceparent {
                builder = builder.header("traceparent", header(traceparent)?);
            }
            if plain_via_proxy {
                // the endpoint's own Host, as a direct request would carry it
                if let Some(authority) = out.uri.authority() {
                    let host = authority.as_str().rsplit('@').next().unwrap_or_default();
                    builder = builder.header(http::header::HOST, header(host)?);
                }
                if let Some(authorization) = route.as_ref().and_then(|p| p.authorization()) {
                    builder =
                        builder.header(http::header::PROXY_AUTHORIZATION, header(authorization)?);
                }
            }
            for (name, value) in out.extra_headers {
                builder = builder.header(*name, header(value)?);
            }
            builder
                .header(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static(out.content_type),
                )
                .header(http::header::USER_AGENT, self.routes.user_agent.clone())
                .header("webhook-id", header(out.webhook_id)?)
                .header("webhook-timestamp", HeaderValue::from(out.timestamp))
                .header("webhook-signature", header(out.signature)?)
                .body(Full::new(out.body.clone()))
                .map_err(|e| SendError::Request(e.to_string()))
        };
        let mut request = build()?;
        let timeout = out.timeout;
        let limit = self.response_excerpt_bytes;
        let exchange = async {
            let mut refusals = 0;
            let response = loop {
                match client.request(request).await {
                    // an HTTP/2 endpoint refused the stream unprocessed (it had not yet told how many streams
                    // it takes, or it was closing the connection): sending it again is not a duplicate
                    Err(e) if refusals < MAX_REFUSED_STREAMS && refused_unprocessed(&e) => {
                        refusals += 1;
                        request = build()?;
                    }
                    result => break result.map_err(classify)?,
                }
            };
            let status = response.status().as_u16();
            if plain_via_proxy && status == 407 {
                // only a proxy answers 407: it refused the request, the endpoint never saw it
                let proxy = route.as_ref().expect("plain_via_proxy implies a route");
                let configured = self
                    .routes
                    .configured_proxy
                    .as_ref()
                    .is_some_and(|c| c.same_address(proxy));
                let what = format!("the request to {}", target.as_deref().unwrap_or(host));
                return Err(SendError::Proxy(refusal(
                    "407 Proxy Authentication Required",
                    &describe_proxy(proxy, configured),
                    &what,
                )));
            }
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

/// The URI of an absolute-form request through a proxy: without userinfo (RFC 9112 forbids it there, and it
/// would show the endpoint's credentials to the proxy), an IP-literal host vetted and written canonically.
fn absolute_uri(uri: &Uri, policy: &NetworkPolicy) -> Result<Uri, String> {
    let host = uri.host().unwrap_or_default();
    let port = uri.port_u16().unwrap_or(80);
    let target = proxy::tunnel_target(policy, host, port).map_err(|b| b.to_string())?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    format!("http://{target}{path}")
        .parse()
        .map_err(|e| format!("url is not usable through a proxy: {e}"))
}

/// How often one attempt's request is sent again after its HTTP/2 stream was refused unprocessed.
const MAX_REFUSED_STREAMS: u32 = 3;

/// True when the endpoint provably did not process the request (RFC 9113, section 8.7): an HTTP/2 stream
/// reset with REFUSED_STREAM, or one above the last stream of the endpoint's graceful (NO_ERROR) GOAWAY. A
/// GOAWAY with an error code is left out: h2 reports it to the streams below that last one as well, when the
/// connection then ends, and those may have been processed.
fn refused_unprocessed(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return match h2.reason() {
                Some(h2::Reason::REFUSED_STREAM) => true,
                Some(h2::Reason::NO_ERROR) => h2.is_go_away() && h2.is_remote(),
                _ => false,
            };
        }
        source = s.source();
    }
    false
}

/// Maps hyper-util's error to ours, finding the connector's own error in the chain.
fn classify(e: hyper_util::client::legacy::Error) -> SendError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
    while let Some(s) = source {
        if let Some(c) = s.downcast_ref::<ConnectError>() {
            return match c {
                ConnectError::Blocked(m) => SendError::Blocked(m.clone()),
                ConnectError::Proxy(m) => SendError::Proxy(m.clone()),
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
