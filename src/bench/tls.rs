//! `--tls`: the slow scenario's receivers serve HTTPS as production endpoints do, offering HTTP/2 and
//! HTTP/1.1 by ALPN, with a certificate for 127.0.0.1 from a certificate authority made for the run; the
//! relay trusts that CA through `delivery.ca_file` and verifies as always.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::BenchError;

/// The receivers' TLS configuration and the file of the CA that signed their certificate (removed on drop).
pub struct BenchTls {
    pub server: Arc<rustls::ServerConfig>,
    ca_file: PathBuf,
}

impl BenchTls {
    pub fn new() -> Result<BenchTls, BenchError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            BenchError::Options(format!("--tls: {what}: {e}"))
        };
        let mut ca_params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| fail("CA", &e))?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "walhook bench CA");
        let ca_key = KeyPair::generate().map_err(|e| fail("CA key", &e))?;
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(|e| fail("CA", &e))?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| fail("certificate", &e))?;
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        let key = KeyPair::generate().map_err(|e| fail("key", &e))?;
        let cert = params
            .signed_by(&key, &ca)
            .map_err(|e| fail("certificate", &e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| fail("TLS", &e))?
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .map_err(|e| fail("TLS", &e))?;
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let ca_file =
            std::env::temp_dir().join(format!("walhook-bench-ca-{}.pem", std::process::id()));
        std::fs::write(&ca_file, ca.pem()).map_err(|source| BenchError::Io {
            what: format!("writing {}", ca_file.display()),
            source,
        })?;
        Ok(BenchTls {
            server: Arc::new(server),
            ca_file,
        })
    }

    /// The PEM file of the CA, for `delivery.ca_file`.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }
}

impl Drop for BenchTls {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.ca_file);
    }
}
