//! TLS to PostgreSQL with libpq's `sslmode` semantics, over rustls, for every connection walhook opens.
//!
//! Both kinds of connection use this module: the SQL sessions through tokio-postgres ([`connect`], with
//! [`PgTls`] as its `MakeTlsConnect`), and the hand-written replication connection
//! ([`crate::source::walconn`], through [`request_tls`]). One place decides what each `sslmode` means, so the
//! two can never disagree:
//!
//! | sslmode       | TLS                                   | server certificate checked                     |
//! |---------------|---------------------------------------|------------------------------------------------|
//! | `disable`     | never                                 | -                                              |
//! | `allow`       | only if the server refuses plaintext  | against `sslrootcert` when there is one        |
//! | `prefer`      | if the server offers it (the default) | against `sslrootcert` when there is one        |
//! | `require`     | always                                | against `sslrootcert` when there is one        |
//! | `verify-ca`   | always                                | signed by `sslrootcert`                        |
//! | `verify-full` | always                                | signed by `sslrootcert`, and for the host name |
//!
//! As in libpq, a root certificate found for `require` (or weaker) is used to verify the chain, and TLS is
//! never attempted over a Unix socket. The rustls configuration is built at each connection from the files,
//! so renewed certificates are picked up without a restart. The connector, not tokio-postgres, renders TLS
//! failures ([`TlsError`]): a host-name mismatch or an unknown CA reads as the setting to change.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_postgres::config::{Host, SslMode as PgSslMode};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, Socket};

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub const NAMES: &'static str = "disable, allow, prefer, require, verify-ca or verify-full";

    pub fn parse(text: &str) -> Option<SslMode> {
        Some(match text {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// The modes that refuse a connection without TLS.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }

    /// The modes that refuse a server certificate that `sslrootcert` did not sign.
    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where trusted CA certificates come from (`sslrootcert`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file of one or more CA certificates.
    File(PathBuf),
    /// `sslrootcert=system`: the platform's trusted roots.
    System,
}

impl fmt::Display for RootCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RootCert::File(path) => write!(f, "{}", path.display()),
            RootCert::System => f.write_str("the system's trusted roots"),
        }
    }
}

/// Which TLS versions may be negotiated (`ssl_min_protocol_version`, `ssl_max_protocol_version`); rustls
/// speaks TLS 1.2 and 1.3 only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsVersions {
    #[default]
    Both,
    Only12,
    Only13,
}

/// The TLS half of the connection settings; the default is what a connection string without TLS settings
/// means (`sslmode=prefer`, nothing to verify against, SNI on).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    /// `None`: nothing to verify the server against (allowed for `require` and weaker).
    pub root_cert: Option<RootCert>,
    /// `sslcert` and `sslkey` (PEM), presented when the server asks for a client certificate.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// `sslsni`: send the host name in the handshake (never for an IP address).
    pub sni: bool,
    pub versions: TlsVersions,
}

impl Default for TlsSettings {
    fn default() -> TlsSettings {
        TlsSettings {
            mode: SslMode::Prefer,
            root_cert: None,
            client_cert: None,
            sni: true,
            versions: TlsVersions::Both,
        }
    }
}

impl TlsSettings {
    /// Reads the files and builds the rustls configuration; an error names the setting and the fix.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let algorithms = provider.signature_verification_algorithms;
        let versions: &[&'static rustls::SupportedProtocolVersion] = match self.versions {
            TlsVersions::Both => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersions::Only12 => &[&rustls::version::TLS12],
            TlsVersions::Only13 => &[&rustls::version::TLS13],
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .map_err(|e| TlsError::Setup(format!("cannot set up TLS: {e}")))?;
        let verifier: Arc<dyn ServerCertVerifier> = match &self.root_cert {
            None => Arc::new(AnyCertificate { algorithms }),
            Some(root) => {
                let roots = Arc::new(load_roots(root)?);
                let chain = ChainVerifier {
                    roots,
                    algorithms,
                    check_name: self.mode == SslMode::VerifyFull,
                };
                Arc::new(chain)
            }
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match &self.client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key_path)) => {
                let (chain, key) = load_client_cert(cert, key_path)?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    TlsError::Setup(format!(
                        "sslkey {} does not match sslcert {}: {e}",
                        key_path.display(),
                        cert.display()
                    ))
                })?
            }
        };
        config.enable_sni = self.sni;
        Ok(Arc::new(config))
    }

    /// What the handshake's errors need to name the fix.
    fn context(&self) -> Arc<HandshakeContext> {
        Arc::new(HandshakeContext {
            root: self.root_cert.clone(),
            client_cert: self.client_cert.as_ref().map(|(cert, _)| cert.clone()),
        })
    }
}

/// What a [`HandshakeError`] says about the settings.
#[derive(Debug)]
struct HandshakeContext {
    root: Option<RootCert>,
    client_cert: Option<PathBuf>,
}

/// Why TLS could not be set up or established. `Display` is the facts; [`TlsError::fix`] says what to do.
/// Nothing here holds a password or key material.
#[derive(Debug)]
pub enum TlsError {
    /// A file named by `sslrootcert`, `sslcert` or `sslkey` is missing or unusable (the message names it).
    Setup(String),
    /// The server answered `SSLRequest` with `N` and the settings require TLS.
    NotOffered,
    Handshake(HandshakeError),
}

impl std::error::Error for TlsError {}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Setup(message) => f.write_str(message),
            TlsError::NotOffered => f.write_str("the server does not support TLS"),
            TlsError::Handshake(e) => e.fmt(f),
        }
    }
}

impl TlsError {
    /// What to do about it.
    pub fn fix(&self) -> String {
        match self {
            TlsError::Setup(_) => {
                "correct the file named, or the setting (database_url or PGSSL* variables) that names it"
                    .to_string()
            }
            TlsError::NotOffered => not_offered_fix().to_string(),
            TlsError::Handshake(e) => e.fix(),
        }
    }
}

/// The fix when a server without TLS meets `sslmode=require` or stronger.
pub fn not_offered_fix() -> &'static str {
    "the server does not accept TLS: enable ssl on the server (ssl = on, with ssl_cert_file and ssl_key_file), \
     or use sslmode=prefer or sslmode=disable to connect without it"
}

/// A failed handshake, with what the settings said.
#[derive(Debug)]
pub struct HandshakeError {
    /// The name the certificate was checked against.
    pub server: String,
    error: io::Error,
    context: Arc<HandshakeContext>,
}

impl HandshakeError {
    fn rustls(&self) -> Option<&rustls::Error> {
        self.error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
    }

    /// What to do about it, by cause.
    pub fn fix(&self) -> String {
        let root = self
            .context
            .root
            .as_ref()
            .map_or("no sslrootcert".to_string(), |r| format!("sslrootcert {r}"));
        match self.rustls() {
            Some(rustls::Error::InvalidCertificate(cert)) => match cert {
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => {
                    "connect with a host name the certificate holds, or use sslmode=verify-ca to check the \
                     certificate's signature without the host name"
                        .to_string()
                }
                CertificateError::UnknownIssuer => format!(
                    "the certificate was not signed by a CA in {root}: set sslrootcert to the CA that signed the \
                     server's certificate"
                ),
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    "renew the server's certificate (ssl_cert_file) and reload PostgreSQL".to_string()
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    "the certificate is not valid yet: check the clocks of both machines".to_string()
                }
                _ => format!(
                    "check the server's certificate (ssl_cert_file) and {root}, or use sslmode=require to skip \
                     verification"
                ),
            },
            Some(rustls::Error::AlertReceived(_)) => match &self.context.client_cert {
                Some(cert) => format!(
                    "the server refused the handshake: check that the client certificate {} is signed by a CA \
                     in the server's ssl_ca_file, and the server's log",
                    cert.display()
                ),
                None => "the server refused the handshake: its log says why (a client certificate may be \
                         required: set sslcert and sslkey)"
                    .to_string(),
            },
            Some(_) => "check the server's TLS settings (ssl_min_protocol_version, ssl_ciphers) and log".into(),
            None => "the connection broke during the TLS handshake: check the server's log".into(),
        }
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rustls() {
            Some(rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                expected,
                presented,
            })) => {
                let names: Vec<String> = presented.iter().map(|n| presented_name(n)).collect();
                let names = match names.is_empty() {
                    true => "no host name".to_string(),
                    false => names.join(", "),
                };
                write!(
                    f,
                    "the server's certificate is for {names}, not {}",
                    expected.to_str()
                )
            }
            Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => write!(
                f,
                "the certificate of {} is signed by an unknown certificate authority",
                self.server
            ),
            Some(e) => write!(f, "TLS handshake with {} failed: {e}", self.server),
            None => write!(
                f,
                "TLS handshake with {} failed: {}",
                self.server, self.error
            ),
        }
    }
}

/// `DnsName("localhost")` (how webpki lists a certificate's names) as `localhost`.
fn presented_name(name: &str) -> String {
    let inner = name
        .strip_prefix("DnsName(")
        .or_else(|| name.strip_prefix("IpAddress("))
        .and_then(|n| n.strip_suffix(')'))
        .unwrap_or(name);
    inner.trim_matches('"').to_string()
}

fn load_roots(root: &RootCert) -> Result<RootCertStore, TlsError> {
    match root {
        RootCert::System => Ok(system_roots().clone()),
        RootCert::File(path) => {
            let fail = |message: String| {
                TlsError::Setup(format!("sslrootcert {}: {message}", path.display()))
            };
            let certs = read_certs(path).map_err(fail)?;
            let mut roots = RootCertStore::empty();
            for cert in certs {
                roots.add(cert).map_err(|e| fail(e.to_string()))?;
            }
            Ok(roots)
        }
    }
}

/// The platform's roots, read once; the bundled Mozilla roots if the platform has none.
fn system_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        if roots.is_empty() {
            tracing::warn!(
                "sslrootcert=system: no usable system CA certificates found; using the bundled Mozilla roots"
            );
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        roots
    })
}

/// The certificates of a PEM file, at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(&e))?;
    match certs.is_empty() {
        true => Err("no PEM certificate in the file".into()),
        false => Ok(certs),
    }
}

fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) if io.kind() == io::ErrorKind::NotFound => {
            "no such file".into()
        }
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        // the other variants describe the PEM structure, never the key bytes
        other => format!("not a valid PEM file ({other})"),
    }
}

/// The client certificate chain and its key (PKCS#8, PKCS#1 or SEC1), checked for access as libpq does.
fn load_client_cert(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = read_certs(cert)
        .map_err(|m| TlsError::Setup(format!("sslcert {}: {m}", cert.display())))?;
    check_key_access(key).map_err(TlsError::Setup)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        TlsError::Setup(format!(
            "sslkey {}: {}; expected a PEM private key (PKCS#8, PKCS#1 or SEC1), not encrypted",
            key.display(),
            pem_error(&e)
        ))
    })?;
    Ok((chain, key))
}

/// libpq refuses a private key that others may read: 0600 or less when the file is ours, 0640 or less when
/// root owns it (a key shared with a group through root's ownership).
pub fn check_key_access(key: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(key).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => format!("sslkey {}: no such file", key.display()),
        _ => format!("sslkey {}: {e}", key.display()),
    })?;
    if !meta.is_file() {
        return Err(format!("sslkey {} is not a regular file", key.display()));
    }
    let mode = meta.mode() & 0o777;
    let allowed = if meta.uid() == 0 { 0o640 } else { 0o600 };
    if mode & !allowed != 0 {
        return Err(format!(
            "private key file {} has group or world access (mode {mode:04o}); it must have permissions u=rw \
             (0600) or less if owned by the current user, or u=rw,g=r (0640) or less if owned by root: run \
             chmod 600 {}",
            key.display(),
            key.display()
        ));
    }
    Ok(())
}

/// `require` without a root certificate: any certificate, but the handshake's signatures are still checked
/// (the session's keys belong to whoever holds the presented certificate).
#[derive(Debug)]
struct AnyCertificate {
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The chain up to a root of `sslrootcert`, and with `check_name` (`verify-full`) the host name.
#[derive(Debug)]
struct ChainVerifier {
    roots: Arc<RootCertStore>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
    check_name: bool,
}

impl ServerCertVerifier for ChainVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        if self.check_name {
            rustls::client::verify_server_name(&cert, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A TLS session over `S`, with the channel-binding data SCRAM-SHA-256-PLUS needs.
pub struct TlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S> TlsStream<S> {
    /// `tls-server-end-point` (RFC 5929): the hash of the server's certificate, with the hash of its signature
    /// algorithm (SHA-256 for MD5 and SHA-1). `None` for algorithms that define none (Ed25519, RSA-PSS).
    pub fn server_end_point(&self) -> Option<Vec<u8>> {
        let cert = self.0.get_ref().1.peer_certificates()?.first()?;
        tls_server_end_point(cert.as_ref())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for TlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        match self.server_end_point() {
            Some(hash) => ChannelBinding::tls_server_end_point(hash),
            None => ChannelBinding::none(),
        }
    }
}

/// Reads one DER element: (tag, contents, the rest). Lengths of up to four bytes, which is any certificate.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let count = (first & 0x7f) as usize;
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count]
            .iter()
            .fold(0usize, |len, &b| (len << 8) | b as usize);
        (len, &rest[count..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// RFC 5929 section 4.1 over a DER certificate: `Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm
/// AlgorithmIdentifier, signature }`; the algorithm's OID picks the hash.
fn tls_server_end_point(cert: &[u8]) -> Option<Vec<u8>> {
    use sha2::Digest;
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    let (SEQUENCE, body, _) = der_element(cert)? else {
        return None;
    };
    let (SEQUENCE, _tbs, rest) = der_element(body)? else {
        return None;
    };
    let (SEQUENCE, algorithm, _) = der_element(rest)? else {
        return None;
    };
    let (OID, oid, _) = der_element(algorithm)? else {
        return None;
    };
    // 1.2.840.113549.1.1.{4,5,11,12,13} (RSA with MD5, SHA-1, SHA-256/384/512) and
    // 1.2.840.10045.4.{1, 3.2, 3.3, 3.4} (ECDSA with SHA-1, SHA-256/384/512)
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
    const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    enum Hash {
        Sha256,
        Sha384,
        Sha512,
    }
    let hash = match oid {
        [prefix @ .., last] if prefix == RSA => match last {
            0x04 | 0x05 | 0x0b => Hash::Sha256,
            0x0c => Hash::Sha384,
            0x0d => Hash::Sha512,
            _ => return None,
        },
        _ if oid == ECDSA_SHA1 => Hash::Sha256,
        [prefix @ .., last] if prefix == ECDSA_SHA2 => match last {
            0x02 => Hash::Sha256,
            0x03 => Hash::Sha384,
            0x04 => Hash::Sha512,
            _ => return None,
        },
        _ => return None,
    };
    Some(match hash {
        Hash::Sha256 => sha2::Sha256::digest(cert).to_vec(),
        Hash::Sha384 => sha2::Sha384::digest(cert).to_vec(),
        Hash::Sha512 => sha2::Sha512::digest(cert).to_vec(),
    })
}

/// Runs the TLS handshake over `stream` (after the server agreed to `SSLRequest`), checking the certificate
/// against `server` as the settings say.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    settings: &TlsSettings,
    server: &str,
    stream: S,
) -> Result<TlsStream<S>, TlsError> {
    let config = settings.client_config()?;
    handshake_with(config, settings.context(), server, stream).await
}

async fn handshake_with<S: AsyncRead + AsyncWrite + Unpin>(
    config: Arc<rustls::ClientConfig>,
    context: Arc<HandshakeContext>,
    server: &str,
    stream: S,
) -> Result<TlsStream<S>, TlsError> {
    let name = ServerName::try_from(server.to_string()).map_err(|_| {
        TlsError::Setup(format!(
            "{server:?} is not a host name TLS can check: give host= the name in the server's certificate"
        ))
    })?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map(TlsStream)
        .map_err(|error| {
            TlsError::Handshake(HandshakeError {
                server: server.to_string(),
                error,
                context,
            })
        })
}

/// The replication connection's negotiation: `SSLRequest`, then the handshake if the server answers `S`.
/// `Ok(Err(stream))`: the server answered `N` (no TLS), and the plaintext session may go on over `stream`.
pub async fn request_tls<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    settings: &TlsSettings,
    server: &str,
) -> Result<Result<TlsStream<S>, S>, RequestError> {
    // SSLRequest: length 8 and the code 1234.5679
    stream
        .write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await?;
    stream.flush().await?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await?;
    match answer[0] {
        // nothing may follow 'S' before the handshake: we read exactly one byte, so nothing was buffered
        b'S' => Ok(Ok(handshake(settings, server, stream).await?)),
        b'N' => Ok(Err(stream)),
        other => Err(RequestError::Protocol(format!(
            "the server answered the TLS request with {:?} instead of S or N",
            char::from(other)
        ))),
    }
}

/// Why [`request_tls`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Protocol(String),
}

/// Whether a plaintext fallback was logged already: once per process is enough to be noticed.
static FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);

/// Logs, once per process, that `sslmode=prefer` went on without TLS.
pub fn note_plaintext_fallback(server: &str, why: &str) {
    if !FALLBACK_LOGGED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "connected to postgres at {server} without TLS ({why}; sslmode is prefer, the default): passwords \
             and events cross the network in clear; set sslmode=verify-full with sslrootcert (or at least \
             sslmode=require) in database_url or PGSSLMODE to refuse plaintext"
        );
    }
}

/// tokio-postgres' connector: builds the rustls configuration for each connection attempt and remembers
/// whether the last attempt used TLS (for `prefer`'s fallback message).
#[derive(Clone)]
pub struct PgTls {
    settings: Arc<TlsSettings>,
    /// (host name of the last attempt, whether it used TLS)
    last: Arc<Mutex<(String, bool)>>,
}

impl PgTls {
    pub fn new(settings: TlsSettings) -> PgTls {
        PgTls {
            settings: Arc::new(settings),
            last: Arc::new(Mutex::new((String::new(), false))),
        }
    }

    fn last(&self) -> (String, bool) {
        self.last
            .lock()
            .expect("never poisoned: no panics while held")
            .clone()
    }
}

impl MakeTlsConnect<Socket> for PgTls {
    type Stream = TlsStream<Socket>;
    type TlsConnect = PgTlsConnect;
    type Error = TlsError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<PgTlsConnect, TlsError> {
        *self.last.lock().expect("never poisoned") = (domain.to_string(), false);
        Ok(PgTlsConnect {
            settings: self.settings.clone(),
            domain: domain.to_string(),
            last: self.last.clone(),
        })
    }
}

/// One attempt's connector.
pub struct PgTlsConnect {
    settings: Arc<TlsSettings>,
    domain: String,
    last: Arc<Mutex<(String, bool)>>,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = TlsStream<S>;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<TlsStream<S>, TlsError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        self.last.lock().expect("never poisoned").1 = true;
        Box::pin(async move { handshake(&self.settings, &self.domain, stream).await })
    }
}

/// A tokio-postgres connection over [`PgTls`].
pub type Connection = tokio_postgres::Connection<Socket, TlsStream<Socket>>;

/// Opens a SQL session with `pg`'s settings and `tls`'s sslmode (libpq's fallbacks included: `allow` retries
/// with TLS when the server refuses plaintext, `prefer` retries without TLS when the handshake fails).
pub async fn connect(
    pg: &tokio_postgres::Config,
    tls: &TlsSettings,
) -> Result<(Client, Connection), tokio_postgres::Error> {
    // TLS never runs over a Unix socket; a list of sockets only needs no negotiation at all
    let over_tcp =
        !pg.get_hostaddrs().is_empty() || pg.get_hosts().iter().any(|h| matches!(h, Host::Tcp(_)));
    let mode = if over_tcp { tls.mode } else { SslMode::Disable };
    let attempt = |ssl: PgSslMode| {
        let mut pg = pg.clone();
        pg.ssl_mode(ssl);
        let connector = PgTls::new(tls.clone());
        async move {
            let result = pg.connect(connector.clone()).await;
            (result, connector.last())
        }
    };
    match mode {
        SslMode::Disable => attempt(PgSslMode::Disable).await.0,
        SslMode::Allow => match attempt(PgSslMode::Disable).await.0 {
            // the server refused the session: libpq tries again with TLS
            Err(e) if e.as_db_error().is_some() => attempt(PgSslMode::Require).await.0,
            other => other,
        },
        SslMode::Prefer => match attempt(PgSslMode::Prefer).await {
            (Ok(connected), (host, false)) if !host.is_empty() => {
                note_plaintext_fallback(&host, "the server does not offer TLS");
                Ok(connected)
            }
            // libpq tries plaintext after a failed handshake; if that fails too, the TLS error says more
            (Err(e), (host, true)) if is_handshake_failure(&e) => {
                match attempt(PgSslMode::Disable).await.0 {
                    Ok(connected) => {
                        note_plaintext_fallback(&host, "the TLS handshake failed");
                        Ok(connected)
                    }
                    Err(_) => Err(e),
                }
            }
            (result, _) => result,
        },
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            attempt(PgSslMode::Require).await.0
        }
    }
}

/// Whether a connection failed in the handshake itself (not in setup, and not at the server's request).
fn is_handshake_failure(e: &tokio_postgres::Error) -> bool {
    matches!(find_tls_error(e), Some(TlsError::Handshake(_)))
}

/// The [`TlsError`] behind a tokio-postgres error, if any.
pub fn find_tls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a TlsError> {
    let mut source = Some(e);
    while let Some(cause) = source {
        if let Some(tls) = cause.downcast_ref::<TlsError>() {
            return Some(tls);
        }
        source = cause.source();
    }
    None
}

/// tokio-postgres' own words when the server answered `N` under `sslmode=require`.
pub const NOT_OFFERED_BY_TOKIO_POSTGRES: &str = "server does not support TLS";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for name in [
            "disable",
            "allow",
            "prefer",
            "require",
            "verify-ca",
            "verify-full",
        ] {
            assert_eq!(SslMode::parse(name).unwrap().as_str(), name);
        }
        assert_eq!(SslMode::parse("verify_full"), None);
        assert!(SslMode::VerifyCa.requires_tls() && SslMode::VerifyCa.verifies());
        assert!(SslMode::Require.requires_tls() && !SslMode::Require.verifies());
        assert!(!SslMode::Prefer.requires_tls());
    }

    #[test]
    fn presented_names_read_plainly() {
        assert_eq!(presented_name("DnsName(\"localhost\")"), "localhost");
        assert_eq!(presented_name("IpAddress(127.0.0.1)"), "127.0.0.1");
        assert_eq!(presented_name("DirectoryName"), "DirectoryName");
    }

    #[test]
    fn der_reader_handles_long_and_truncated_lengths() {
        assert_eq!(
            der_element(&[0x30, 0x01, 0xaa, 0xbb]),
            Some((0x30, &[0xaa][..], &[0xbb][..]))
        );
        let mut long = vec![0x04, 0x82, 0x01, 0x00];
        long.extend(std::iter::repeat_n(7u8, 256));
        let (_, body, rest) = der_element(&long).unwrap();
        assert_eq!((body.len(), rest.len()), (256, 0));
        assert_eq!(der_element(&[0x30, 0x05, 0x00]), None);
        assert_eq!(der_element(&[0x30, 0x80]), None);
        assert_eq!(der_element(&[]), None);
        assert_eq!(tls_server_end_point(b"not a certificate"), None);
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("walhook-pgtls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn pem(label: &str, der: &[u8]) -> String {
        use base64::Engine;
        let body = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }

    #[test]
    fn server_end_point_hashes_the_certificate_with_its_signature_hash() {
        use sha2::Digest;
        // rcgen signs with ECDSA P-256 and SHA-256 (1.2.840.10045.4.3.2) by default
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().as_ref();
        assert_eq!(
            tls_server_end_point(der),
            Some(sha2::Sha256::digest(der).to_vec())
        );
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&p384)
            .unwrap();
        let der = cert.der().as_ref();
        assert_eq!(
            tls_server_end_point(der),
            Some(sha2::Sha384::digest(der).to_vec())
        );
        // Ed25519 defines no hash for tls-server-end-point
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&ed)
            .unwrap();
        assert_eq!(tls_server_end_point(cert.der().as_ref()), None);
    }

    #[test]
    fn client_keys_load_as_pkcs8_and_sec1_and_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("keys");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["walhook".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_file = dir.join("client.crt");
        std::fs::write(&cert_file, cert.pem()).unwrap();
        // SEC1 is the ECPrivateKey inside PKCS#8's privateKey OCTET STRING
        let pkcs8 = key.serialize_der();
        let (_, body, _) = der_element(&pkcs8).unwrap();
        let (_, _, rest) = der_element(body).unwrap(); // version
        let (_, _, rest) = der_element(rest).unwrap(); // algorithm
        let (tag, sec1, _) = der_element(rest).unwrap();
        assert_eq!(tag, 0x04);
        for (name, text) in [
            ("pkcs8.key", key.serialize_pem()),
            ("sec1.key", pem("EC PRIVATE KEY", sec1)),
        ] {
            let key_file = dir.join(name);
            std::fs::write(&key_file, text).unwrap();
            std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
            let settings = TlsSettings {
                client_cert: Some((cert_file.clone(), key_file.clone())),
                ..TlsSettings::default()
            };
            settings
                .client_config()
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let key_file = dir.join("pkcs8.key");
        // world-readable is refused whoever owns the file (root may share it with a group: 0640)
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = check_key_access(&key_file).unwrap_err();
        assert!(e.contains("has group or world access (mode 0644)"), "{e}");
        std::fs::write(dir.join("garbage.key"), "not a key").unwrap();
        std::fs::set_permissions(
            dir.join("garbage.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let settings = TlsSettings {
            client_cert: Some((cert_file.clone(), dir.join("garbage.key"))),
            ..TlsSettings::default()
        };
        let e = settings.client_config().unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("sslkey {}: ", dir.join("garbage.key").display())),
            "{e}"
        );
        assert!(e.contains("expected a PEM private key"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_files_name_the_setting() {
        let settings = TlsSettings {
            mode: SslMode::VerifyFull,
            root_cert: Some(RootCert::File("/nonexistent/ca.pem".into())),
            ..TlsSettings::default()
        };
        let e = settings.client_config().unwrap_err().to_string();
        assert_eq!(e, "sslrootcert /nonexistent/ca.pem: no such file");
        let e = check_key_access(Path::new("/nonexistent/key.pem")).unwrap_err();
        assert_eq!(e, "sslkey /nonexistent/key.pem: no such file");
    }
}
