//! A forward proxy on loopback: `CONNECT` tunnels and absolute-form requests, with Basic credentials, a
//! record of what it was asked, and a switch to refuse everything.
//!
//! It connects only to loopback destinations and answers 403 for any other: that is the rule the README
//! asks of a production proxy (refuse what the network guard would refuse), narrowed to this machine, so a
//! test can never send traffic anywhere else through it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// One request the proxy got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// `CONNECT` or the method of an absolute-form request.
    pub method: String,
    /// `host:port` for `CONNECT`, the absolute URL otherwise.
    pub target: String,
    /// The `Proxy-Authorization` header, as sent.
    pub authorization: Option<String>,
    /// What the proxy answered (200 for a tunnel it opened).
    pub answered: u16,
}

pub struct TestProxy {
    pub port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    refuse: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `Basic base64(user:password)`.
pub fn basic(user: &str, password: &str) -> String {
    let pair = format!("{user}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

struct Shared {
    expected: Option<String>,
    seen: Arc<Mutex<Vec<Seen>>>,
    refuse: Arc<AtomicBool>,
}

impl TestProxy {
    /// A proxy on `127.0.0.1:<random port>`; with `credentials`, it answers 407 to requests without them.
    pub async fn start(credentials: Option<(&str, &str)>) -> TestProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            expected: credentials.map(|(u, p)| basic(u, p)),
            seen: Arc::default(),
            refuse: Arc::default(),
        });
        let (seen, refuse) = (shared.seen.clone(), shared.refuse.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(&shared, req).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        TestProxy {
            port,
            seen,
            refuse,
            task,
        }
    }

    /// `http://127.0.0.1:<port>`, with `user:password@` when given.
    pub fn url(&self, credentials: Option<(&str, &str)>) -> String {
        match credentials {
            Some((u, p)) => format!("http://{u}:{p}@127.0.0.1:{}", self.port),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Requests it let through (tunnels opened, requests forwarded) whose target contains `needle`.
    pub fn passed(&self, needle: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.answered == 200 && s.target.contains(needle))
            .count()
    }

    /// While on, every request is answered 403.
    pub fn refuse(&self, on: bool) {
        self.refuse.store(on, Ordering::SeqCst);
    }
}

fn answer(status: u16) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    if status == 407 {
        response.headers_mut().insert(
            "proxy-authenticate",
            hyper::header::HeaderValue::from_static("Basic realm=\"test\""),
        );
    }
    response
}

/// A loopback address of `host:port`, or `None` when it has none (the proxy's own SSRF rule).
async fn loopback(host: &str, port: u16) -> Option<SocketAddr> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs = tokio::net::lookup_host((host, port)).await.ok()?;
    addrs
        .into_iter()
        .map(|a| SocketAddr::new(a.ip().to_canonical(), port))
        .find(|a| a.ip().is_loopback())
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let authorization = req
        .headers()
        .get(hyper::header::PROXY_AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let connect = req.method() == Method::CONNECT;
    let target = match connect {
        true => req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default(),
        false => req.uri().to_string(),
    };
    let method = req.method().to_string();
    let record = |answered: u16| {
        shared.seen.lock().unwrap().push(Seen {
            method: method.clone(),
            target: target.clone(),
            authorization: authorization.clone(),
            answered,
        })
    };
    if shared.refuse.load(Ordering::SeqCst) {
        record(403);
        return answer(403);
    }
    if shared.expected.is_some() && authorization != shared.expected {
        record(407);
        return answer(407);
    }
    let host = req.uri().host().unwrap_or_default().to_string();
    let port = req.uri().port_u16().unwrap_or(80);
    let Some(addr) = loopback(&host, port).await else {
        record(403);
        return answer(403);
    };
    if connect {
        let Ok(upstream) = TcpStream::connect(addr).await else {
            record(502);
            return answer(502);
        };
        record(200);
        tokio::spawn(async move {
            if let Ok(upgraded) = hyper::upgrade::on(req).await {
                let mut upgraded = TokioIo::new(upgraded);
                let mut upstream = upstream;
                let _ = tokio::io::copy_bidirectional(&mut upgraded, &mut upstream).await;
            }
        });
        return answer(200);
    }
    match forward(addr, req).await {
        Some(response) => {
            record(200);
            response
        }
        None => {
            record(502);
            answer(502)
        }
    }
}

/// Sends an absolute-form request on to `addr` in origin form, without the proxy's own headers.
async fn forward(addr: SocketAddr, req: Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    let (mut parts, body) = req.into_parts();
    parts.uri = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()
        .ok()?;
    parts.headers.remove(hyper::header::PROXY_AUTHORIZATION);
    parts.headers.remove("proxy-connection");
    let body = body.collect().await.ok()?.to_bytes();
    let response = sender
        .send_request(Request::from_parts(parts, Full::new(body)))
        .await
        .ok()?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.ok()?.to_bytes();
    Some(Response::from_parts(parts, Full::new(body)))
}
