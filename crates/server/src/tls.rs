//! HTTPS: the `[server.tls]` section, and the certificate the listener presents. The
//! certificate and key are re-read when either file's modification time changes (looked
//! at most once a second, on a handshake) or on [`Tls::reload`]; a pair that does not
//! load (unparseable, or a key that is not the certificate's) leaves the pair in service
//! serving, with a warning, so a half-finished renewal never takes the listener down.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// How often, at most, a handshake looks at the files' modification times.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The `[server.tls]` section: when present, the listener speaks only HTTPS.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The server's certificate (PEM), followed by any intermediates.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Why a certificate and key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or parsed.
    #[error("{}: {message}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The key is not usable, or is not the certificate's.
    #[error("{} with {}: {source}", key.display(), cert.display())]
    Pair {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls found.
        source: rustls::Error,
    },
    /// The TLS configuration could not be built.
    #[error("TLS configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// The listener's TLS side: an acceptor whose certificate follows its files.
#[derive(Clone)]
pub struct Tls {
    certificate: Arc<ReloadingCert>,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("certificate", &self.certificate)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Load the pair `config` names (failing if it does not load) and build the acceptor:
    /// TLS 1.2 and 1.3, ALPN `http/1.1`.
    pub fn load(config: &Config) -> Result<Tls, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certificate = Arc::new(ReloadingCert::load(config, Arc::clone(&provider))?);
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(Error::Config)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&certificate) as Arc<dyn ResolvesServerCert>);
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            certificate,
            acceptor: TlsAcceptor::from(Arc::new(server)),
        })
    }

    /// Re-read the certificate and key now (on `SIGHUP`), whether or not they changed.
    pub fn reload(&self) {
        self.certificate.reload();
    }

    /// What accepts a connection's handshake.
    pub(crate) fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}

/// The modification times of the certificate and key files.
type Stamp = (Option<SystemTime>, Option<SystemTime>);

/// The pair in service, and when its files were last looked at.
#[derive(Debug)]
struct Loaded {
    current: Arc<CertifiedKey>,
    /// The files' times when last loaded (or last tried): a change means try again.
    stamp: Stamp,
    checked: Instant,
}

/// A certificate resolver that follows its files.
#[derive(Debug)]
struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    loaded: Mutex<Loaded>,
}

impl ReloadingCert {
    fn load(config: &Config, provider: Arc<CryptoProvider>) -> Result<ReloadingCert, Error> {
        let stamp = stamp(&config.cert, &config.key);
        let current = Arc::new(read_pair(&config.cert, &config.key, &provider)?);
        Ok(ReloadingCert {
            cert: config.cert.clone(),
            key: config.key.clone(),
            provider,
            loaded: Mutex::new(Loaded {
                current,
                stamp,
                checked: Instant::now(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Read the pair into `loaded`, or keep the one in service and say why.
    fn replace(&self, loaded: &mut Loaded) {
        loaded.stamp = stamp(&self.cert, &self.key);
        match read_pair(&self.cert, &self.key, &self.provider) {
            Ok(pair) => {
                loaded.current = Arc::new(pair);
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate not reloaded: still serving the previous one");
            }
        }
    }

    fn reload(&self) {
        let mut loaded = self.lock();
        loaded.checked = Instant::now();
        self.replace(&mut loaded);
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut loaded = self.lock();
        if loaded.checked.elapsed() >= CHECK_EVERY {
            loaded.checked = Instant::now();
            if stamp(&self.cert, &self.key) != loaded.stamp {
                self.replace(&mut loaded);
            }
        }
        Some(Arc::clone(&loaded.current))
    }
}

fn stamp(cert: &Path, key: &Path) -> Stamp {
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    (modified(cert), modified(key))
}

/// The certificate chain in `cert` and the key in `key`, checked to belong together.
fn read_pair(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, Error> {
    let file_error = |path: &Path, message: String| Error::File {
        path: path.to_owned(),
        message,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| file_error(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(file_error(cert, "no PEM certificate in it".into()));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key, e.to_string()))?;
    CertifiedKey::from_der(chain, private, provider).map_err(|source| Error::Pair {
        cert: cert.to_owned(),
        key: key.to_owned(),
        source,
    })
}
