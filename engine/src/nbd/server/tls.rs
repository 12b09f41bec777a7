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

/// Which of the two files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    /// The certificate chain.
    Cert,
    /// The private key.
    Key,
}

/// Why a certificate or key cannot be used; every variant names its file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// Which file (the same path may hold both).
        file: TlsFile,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not PEM, or holds nothing of the kind wanted.
    #[error("{path}: {what}")]
    Pem {
        /// Which file.
        file: TlsFile,
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

impl TlsError {
    /// The one file at fault; `None` when it is the pair (see [`TlsError::Pair`]).
    pub fn file(&self) -> Option<TlsFile> {
        match self {
            Self::Read { file, .. } | Self::Pem { file, .. } => Some(*file),
            Self::Pair { .. } => None,
        }
    }
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

fn read(file: TlsFile, path: &Path) -> Result<Vec<u8>, TlsError> {
    // a certificate chain or key is a few KiB; /dev/zero or a FIFO must not be read
    nbdfmt::small::read_small_file(path, 1 << 20).map_err(|source| TlsError::Read {
        file,
        path: path.to_path_buf(),
        source,
    })
}

fn pem_err(file: TlsFile, path: &Path, what: impl Into<String>) -> TlsError {
    TlsError::Pem {
        file,
        path: path.to_path_buf(),
        what: what.into(),
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(TlsFile::Cert, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            pem_err(
                TlsFile::Cert,
                path,
                format!("not a PEM certificate file ({e})"),
            )
        })?;
    if certs.is_empty() {
        return Err(pem_err(
            TlsFile::Cert,
            path,
            "no certificate in it (expected PEM \"BEGIN CERTIFICATE\" blocks)",
        ));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(TlsFile::Key, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => pem_err(
            TlsFile::Key,
            path,
            "no private key in it (expected a PEM PKCS#8, RSA or EC private key)",
        ),
        e => pem_err(TlsFile::Key, path, format!("not a PEM key file ({e})")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate and its key as PEM.
    fn pair() -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("rcgen");
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    fn err(cert: &Path, key: &Path) -> String {
        TlsConfig::from_pem_files(cert, key)
            .expect_err("refused")
            .to_string()
    }

    #[test]
    fn loads_a_matching_pair_and_names_the_file_of_every_failure() {
        let tmp = tempfile::tempdir().expect("tmp");
        let d = tmp.path();
        let (cert_pem, key_pem) = pair();
        let (other_cert, _) = pair();
        let cert = write(d, "cert.pem", &cert_pem);
        let key = write(d, "key.pem", &key_pem);
        let ok = TlsConfig::from_pem_files(&cert, &key).expect("loads");
        assert_eq!(ok.cert_path(), cert);

        let missing = d.join("nope.pem");
        let e = err(&missing, &key);
        assert!(e.contains("cannot read") && e.contains("nope.pem"), "{e}");
        let e = err(&cert, &missing);
        assert!(e.contains("nope.pem"), "{e}");

        let junk = write(d, "junk.pem", "not PEM at all\n");
        let e = err(&junk, &key);
        assert!(
            e.contains("junk.pem") && e.contains("no certificate"),
            "{e}"
        );
        // a key where the certificate belongs, a certificate where the key belongs
        let e = err(&key, &key);
        assert!(e.contains("key.pem: no certificate"), "{e}");
        let e = err(&cert, &cert);
        assert!(e.contains("cert.pem: no private key"), "{e}");
        let broken = write(
            d,
            "broken.pem",
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        );
        let e = err(&broken, &key);
        assert!(e.contains("broken.pem: not a PEM certificate"), "{e}");

        let other = write(d, "other.pem", &other_cert);
        let e = err(&other, &key);
        assert!(
            e.contains("key.pem") && e.contains("other.pem") && e.contains("cannot serve"),
            "{e}"
        );
    }
}
