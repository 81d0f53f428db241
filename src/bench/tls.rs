//! `--tls`: the slow scenario's receivers serve HTTPS as production endpoints do, offering HTTP/2 and
//! HTTP/1.1 by ALPN, with a certificate for 127.0.0.1 from a certificate authority made for the run; the
//! relay trusts that CA through `delivery.ca_file` and verifies as always.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::BenchError;
use crate::receiver::LoopbackTls;

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
        let tls = LoopbackTls::new("walhook bench CA").map_err(|e| fail("certificate", &e))?;
        let server = tls
            .server(&[b"h2", b"http/1.1"])
            .map_err(|e| fail("TLS", &e))?;
        let ca_file =
            std::env::temp_dir().join(format!("walhook-bench-ca-{}.pem", std::process::id()));
        std::fs::write(&ca_file, &tls.ca_pem).map_err(|source| BenchError::Io {
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
