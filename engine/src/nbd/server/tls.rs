//! TLS for the server ([`TlsConfig`]): a PEM certificate chain and key, loaded and
//! checked before anything listens. With TLS the server runs in the protocol's
//! FORCEDTLS mode (see `handshake`): nothing but `NBD_OPT_STARTTLS` and
//! `NBD_OPT_ABORT` is answered before the TLS handshake. No client certificates are
//! asked for: TLS encrypts and authenticates the server, not the clients.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// Why a certificate or key cannot be used; every variant names its file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not PEM, or holds nothing of the kind wanted.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// rustls refused the pair (key and certificate do not match, unsupported key).
    #[error("{key} cannot serve the certificate {cert}: {message}")]
    Pair {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' reason.
        message: String,
    },
}

/// The server side of TLS: what [`ServeOptions::tls`](super::ServeOptions::tls) holds.
#[derive(Clone)]
pub struct TlsConfig {
    acceptor: TlsAcceptor,
    cert: PathBuf,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Loads a PEM certificate chain (leaf first) and its PEM private key (PKCS#8,
    /// PKCS#1 or SEC1) and checks that they belong together.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let chain = load_certs(cert)?;
        let private = load_key(key)?;
        let provider = Arc::new(ring_provider());
        let pair_err = |e: rustls::Error| TlsError::Pair {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            message: e.to_string(),
        };
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(pair_err)?
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .map_err(pair_err)?;
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            cert: cert.to_path_buf(),
        })
    }

    /// The certificate file this came from.
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }

    pub(super) fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}

/// The *ring* provider, named explicitly: a process-wide default could be another one
/// (or none, when feature unification links a second provider in). rustls 0.23.48
/// deprecates it for lacking post-quantum key exchange; the alternative, aws-lc-rs,
/// needs cmake to build, and NBD clients (qemu's GnuTLS) negotiate X25519 anyway.
#[allow(deprecated)]
fn ring_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn pem_err(path: &Path, what: impl Into<String>) -> TlsError {
    TlsError::Pem {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, format!("not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(pem_err(
            path,
            "no certificate in it (expected PEM \"BEGIN CERTIFICATE\" blocks)",
        ));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => pem_err(
            path,
            "no private key in it (expected a PEM PKCS#8, RSA or EC private key)",
        ),
        e => pem_err(path, format!("not a PEM key file ({e})")),
    })
}
