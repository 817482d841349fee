//! HTTPS for clients (`--https-addr` with `--http-tls-cert`, `--http-tls-key`, and optionally
//! `--http-tls-client-ca`).
//!
//! Why it is built this way:
//! - *On the node, not in front of it.* Clients point DNS at any node and there is no load
//!   balancer to terminate TLS, so a node must do it itself, as Consul's and NATS' servers do.
//! - *A listener of its own.* `--https-addr` is a second listener beside `--http-addr` (Consul's
//!   `ports.http`/`ports.https`): probes, a sidecar app and the CLI keep plain HTTP, which can be
//!   bound to loopback, while other clients get TLS. Both serve the same API through the same
//!   stack (`api::run`); TLS only wraps the byte stream.
//! - *HTTP/1.1 and HTTP/2*, offered by ALPN (`h2`, `http/1.1`); hyper's auto builder serves
//!   either.
//! - *Client certificates are optional.* With `--http-tls-client-ca`, a client must present a
//!   certificate that chains to that CA (mutual TLS, for service-to-service callers); without it
//!   any client may connect, as with plain HTTP.
//! - *Reloadable* like the peer certificates (SIGHUP and a change of the files, `node`), through
//!   the same `Reloadable`. A reload that fails keeps what was loaded.
//! - The handshake counts against the connection limit (shared with the plain listener) and must
//!   finish within the header read timeout (10 s; the request headers then get that long again,
//!   as on plain HTTP), so a client that opens sockets and stalls holds a slot for a bounded time.
//! - Its own certificate is checked at load for its dates (rustls checks only that the key
//!   matches it), but not for its chain: its issuer may be a public CA whose roots the node does
//!   not have. An expired certificate is refused at start and a reload to one keeps the old
//!   (`peer::tls::check_dates`).

use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::peer::tls::Read;
use crate::peer::tls::Reloadable;
use crate::peer::tls::check_dates;
use crate::peer::tls::TlsError;
use crate::peer::tls::read_chain;
use crate::peer::tls::read_key;
use crate::peer::tls::read_roots;

/// What HTTPS serves with: certificate, key, and the CA of client certificates if required;
/// cheap to clone (all clones see a reload).
#[derive(Clone)]
pub struct HttpTls {
    /// Swapped whole by `reload`; a handshake takes the current one.
    current: Arc<Reloadable<tokio_rustls::TlsAcceptor>>,
    source: Arc<Source>,
}

struct Source {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

impl std::fmt::Debug for HttpTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpTls").field("cert", &self.source.cert).field("client_ca", &self.source.client_ca).finish_non_exhaustive()
    }
}

impl HttpTls {
    /// Reads the PEM files and builds the server configuration.
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<HttpTls, TlsError> {
        let source = Source { cert: cert.into(), key: key.into(), client_ca: client_ca.map(Into::into) };
        let mut paths = vec![source.cert.clone(), source.key.clone()];
        paths.extend(source.client_ca.clone());
        let current = Reloadable::load(paths, || source.read())?;
        Ok(HttpTls { current: Arc::new(current), source: Arc::new(source) })
    }

    /// Reads the files again and uses them for every new connection; on an error the
    /// configuration loaded before stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.current.reload(|| self.source.read())
    }

    /// `reload` when a file's modification time moved since the last load. `Ok(true)` when it
    /// reloaded.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        self.current.reload_if_changed(|| self.source.read())
    }

    /// When the loaded certificate chain stops working (`check_dates`), if known.
    pub fn expires(&self) -> Option<std::time::SystemTime> {
        self.current.expires()
    }

    /// The server side of the handshake over an accepted connection.
    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        self.current.get().accept(stream).await
    }
}

impl Source {
    fn read(&self) -> Read<tokio_rustls::TlsAcceptor> {
        let chain = read_chain("certificate", &self.cert)?;
        let expires = check_dates("certificate", &self.cert, &chain, std::time::SystemTime::now())?;
        let key = read_key(&self.key)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config_err = |e: rustls::Error| TlsError::Https(e.to_string());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(config_err)?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(read_roots(ca)?), provider)
                    .build()
                    .map_err(|e| TlsError::Https(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key).map_err(config_err)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok((tokio_rustls::TlsAcceptor::from(Arc::new(config)), expires))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::tls::tests::dated;

    #[test]
    fn an_expired_certificate_is_refused_at_load_and_a_reload_to_one_keeps_the_old() {
        let dir = std::env::temp_dir().join(format!("rb-https-dates-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let write = |(c, k): (String, String)| {
            std::fs::write(&cert, c).unwrap();
            std::fs::write(&key, k).unwrap();
        };
        write(dated(-30, -1));
        let err = HttpTls::load(&cert, &key, None).unwrap_err().to_string();
        assert!(err.contains("cert.pem") && err.contains("expired at"), "{err}");

        write(dated(-1, 30));
        let tls = HttpTls::load(&cert, &key, None).unwrap();
        let first = tls.expires().expect("dates read");
        let days = first.duration_since(std::time::SystemTime::now()).unwrap().as_secs() / 86_400;
        assert!((29..=30).contains(&days), "{days}");
        write(dated(-30, -1));
        assert!(tls.reload().unwrap_err().to_string().contains("expired at"));
        assert_eq!(tls.expires(), Some(first), "the certificate loaded before stays, and its date");
        write(dated(-1, 90));
        tls.reload().unwrap();
        assert!(tls.expires().expect("dates read") > first + std::time::Duration::from_secs(50 * 86_400), "a renewed certificate's date");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
