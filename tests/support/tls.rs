//! A loopback HTTPS receiver with a certificate authority generated at test time
//! ([`walhook::receiver::LoopbackTls`], which `walhook bench --tls` uses too).

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub struct TlsReceiver {
    pub port: u16,
    /// PEM file of the CA that signed the receiver's certificate.
    pub ca_file: PathBuf,
    pub requests: Arc<AtomicUsize>,
    /// Every request, in arrival order: which connection carried it (numbered from 0 as accepted) and in
    /// which HTTP version.
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Open unless [`TlsReceiver::hold`] closed it: requests wait at a closed gate, unanswered.
    gate: Arc<tokio::sync::watch::Sender<bool>>,
    /// Requests waiting at the gate.
    pub held: Arc<AtomicUsize>,
    _dir: TempDir,
}

/// What a [`TlsReceiver`] offers and how it answers.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// Offer HTTP/2 by ALPN (`h2`, then `http/1.1`); without it the server negotiates nothing (HTTP/1.1).
    pub http2: bool,
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` of its HTTP/2 connections.
    pub max_concurrent_streams: Option<u32>,
    /// Wait this long before each answer.
    pub delay: Duration,
    /// Answer every request whose arrival number (from 1) is a multiple of this 500; 0 for none.
    pub fail_every: usize,
}

/// One request a [`TlsReceiver`] answered.
#[derive(Clone, Debug)]
pub struct Seen {
    pub connection: usize,
    pub version: http::Version,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl TlsReceiver {
    /// Serves HTTPS (HTTP/1.1) on 127.0.0.1 with a certificate for `localhost` and 127.0.0.1, answering 200.
    pub async fn start() -> TlsReceiver {
        TlsReceiver::start_with(TlsOptions::default()).await
    }

    /// [`TlsReceiver::start`], offering and answering as `options` say.
    pub async fn start_with(options: TlsOptions) -> TlsReceiver {
        let tls = walhook::receiver::LoopbackTls::new("walhook test CA").unwrap();

        let dir = std::env::temp_dir().join(format!(
            "walhook-tls-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, &tls.ca_pem).unwrap();

        let alpn: &[&[u8]] = match options.http2 {
            true => &[b"h2", b"http/1.1"],
            false => &[],
        };
        let config = tls.server(alpn).unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (gate, _) = tokio::sync::watch::channel(true);
        let gate = Arc::new(gate);
        let held = Arc::new(AtomicUsize::new(0));
        let (counter, log, waiting, opened) =
            (requests.clone(), seen.clone(), held.clone(), gate.clone());
        tokio::spawn(async move {
            for connection in 0.. {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let (counter, log, options) = (counter.clone(), log.clone(), options.clone());
                let (waiting, opened) = (waiting.clone(), opened.clone());
                tokio::spawn(async move {
                    // failed handshakes (an untrusted client) are expected in some tests
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        log.lock().unwrap().push(Seen {
                            connection,
                            version: req.version(),
                        });
                        let arrival = counter.fetch_add(1, Ordering::SeqCst) + 1;
                        let status = match options.fail_every {
                            0 => 200,
                            every if arrival % every == 0 => 500,
                            _ => 200,
                        };
                        let (mut gate, waiting) = (opened.subscribe(), waiting.clone());
                        async move {
                            if !*gate.borrow() {
                                waiting.fetch_add(1, Ordering::SeqCst);
                                let _ = gate.wait_for(|open| *open).await;
                                waiting.fetch_sub(1, Ordering::SeqCst);
                            }
                            tokio::time::sleep(options.delay).await;
                            let mut response =
                                hyper::Response::new(Full::new(Bytes::from_static(b"ok")));
                            *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let io = TokioIo::new(tls);
                    let _ = if h2 {
                        let mut builder = http2::Builder::new(TokioExecutor::new());
                        if let Some(streams) = options.max_concurrent_streams {
                            builder.max_concurrent_streams(streams);
                        }
                        builder.serve_connection(io, service).await
                    } else {
                        http1::Builder::new().serve_connection(io, service).await
                    };
                });
            }
        });
        TlsReceiver {
            port,
            ca_file,
            requests,
            seen,
            gate,
            held,
            _dir: TempDir(dir),
        }
    }

    pub fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.port)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Requests from now on wait, unanswered, until [`TlsReceiver::release`].
    pub fn hold(&self) {
        self.gate.send_replace(false);
    }

    /// Answers the requests held and those to come.
    pub fn release(&self) {
        self.gate.send_replace(true);
    }
}

fn rand_suffix() -> u64 {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    nanos ^ ((COUNTER.fetch_add(1, Ordering::Relaxed) as u64) << 32)
}

/// Certificates for a PostgreSQL server and its clients, generated at test time: a CA, a server certificate
/// for `localhost` only (so that connecting to 127.0.0.1 is a host-name mismatch), client certificates, and an
/// unrelated CA for the unknown-CA case. Files live in a temporary directory, keys with mode 0600.
pub struct PgCerts {
    /// PEM of the CA that signed the server's and the clients' certificates.
    pub ca_file: PathBuf,
    /// PEM of a CA that signed nothing here.
    pub other_ca_file: PathBuf,
    pub server: walhook::cluster::ServerTls,
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: TempDir,
}

impl PgCerts {
    pub fn new() -> PgCerts {
        let dir = std::env::temp_dir().join(format!(
            "walhook-pgtls-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let issuer = new_ca("walhook test CA");
        let other = new_ca("some other CA");
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, issuer.pem()).unwrap();
        let other_ca_file = dir.join("other-ca.pem");
        std::fs::write(&other_ca_file, other.pem()).unwrap();
        let params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let server = walhook::cluster::ServerTls {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            client_ca_pem: Some(issuer.pem()),
        };
        PgCerts {
            ca_file,
            other_ca_file,
            server,
            issuer,
            dir: TempDir(dir),
        }
    }

    /// A client certificate whose common name is `user` (what `cert` authentication checks), and its key
    /// (mode 0600): (certificate file, key file).
    pub fn client(&self, user: &str) -> (PathBuf, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, user);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let cert_file = self.dir.0.join(format!("{user}.crt"));
        let key_file = self.dir.0.join(format!("{user}.key"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        (cert_file, key_file)
    }

    /// A directory for other files of the test, removed with the certificates.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir.0
    }
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}
