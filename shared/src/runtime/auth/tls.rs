//! TLS on every port, mutual TLS between services (rustls through tonic).
//!
//! A service's certificate, key and CA come from files named by settings
//! (`TLS_CERT_FILE`, `TLS_KEY_FILE`, `TLS_CA_FILE`: the `*_FILE`
//! convention of Docker and Kubernetes secrets). They are checked at start:
//! unreadable files, a key that does not match the certificate or a CA that
//! does not parse stop the service with a message naming the setting.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Where a service's TLS files are.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// A service's TLS identity and the CA it trusts, checked.
#[derive(Clone)]
pub struct TlsMaterial {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    ca_pem: Vec<u8>,
    /// The SPIFFE id the certificate carries, if any.
    pub spiffe_id: Option<String>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("spiffe_id", &self.spiffe_id)
            .finish()
    }
}

fn read(path: &Path, var: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{var} {}: cannot read it: {e}", path.display()))
}

fn certs(
    pem: &[u8],
    var: &str,
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{var} {}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{var} {}: holds no certificate", path.display()));
    }
    Ok(certs)
}

/// The URI SANs of a DER certificate.
pub fn uri_sans(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some(sans)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    sans.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect()
}

impl TlsMaterial {
    /// Reads and checks the files.
    pub fn load(files: &TlsFiles) -> Result<Self, String> {
        let cert_pem = read(&files.cert, "TLS_CERT_FILE")?;
        let key_pem = read(&files.key, "TLS_KEY_FILE")?;
        let ca_pem = read(&files.ca, "TLS_CA_FILE")?;
        Self::from_pem(cert_pem, key_pem, ca_pem, files)
    }

    fn from_pem(
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
        ca_pem: Vec<u8>,
        files: &TlsFiles,
    ) -> Result<Self, String> {
        use rustls::pki_types::PrivateKeyDer;
        use rustls::pki_types::pem::PemObject;
        let chain = certs(&cert_pem, "TLS_CERT_FILE", &files.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            format!(
                "TLS_KEY_FILE {}: not a PEM private key: {e}",
                files.key.display()
            )
        })?;
        let provider = rustls::crypto::ring::default_provider();
        rustls::sign::CertifiedKey::from_der(chain.clone(), key, &provider).map_err(|e| {
            format!(
                "TLS_KEY_FILE {} does not match TLS_CERT_FILE {}: {e}",
                files.key.display(),
                files.cert.display()
            )
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in certs(&ca_pem, "TLS_CA_FILE", &files.ca)? {
            roots.add(ca).map_err(|e| {
                format!(
                    "TLS_CA_FILE {}: not a CA certificate: {e}",
                    files.ca.display()
                )
            })?;
        }
        // The CA must be able to verify client certificates.
        rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(provider),
        )
        .build()
        .map_err(|e| format!("TLS_CA_FILE {}: {e}", files.ca.display()))?;
        let spiffe_id = uri_sans(&chain[0])
            .into_iter()
            .find(|uri| uri.starts_with("spiffe://"));
        Ok(Self {
            cert_pem,
            key_pem,
            ca_pem,
            spiffe_id,
        })
    }

    /// The server side: this certificate, and client certificates verified
    /// against the CA when presented (members come without one).
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(true)
    }

    /// The client side: the CA to verify servers, and this certificate as
    /// the client identity (mutual TLS). Verifies the DNS name or address
    /// only (the operator's tool, which may reach any service).
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
    }

    /// The client side towards `service` (mutual TLS): the server's chain is
    /// verified against the CA and it must be `spiffe://inmail/<service>`
    /// (its DNS names are not needed). Pass both to
    /// `Endpoint::tls_config_with_verifier`.
    pub fn client_config_for(
        &self,
        service: &str,
    ) -> Result<(ClientTlsConfig, Arc<SpiffeServerVerifier>), String> {
        let verifier = SpiffeServerVerifier::new(
            &self.ca_pem,
            vec![format!("spiffe://{}/{service}", super::TRUST_DOMAIN)],
        )?;
        let tls =
            ClientTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        Ok((tls, Arc::new(verifier)))
    }

    /// Only the CA (a client with no identity of its own, e.g. the
    /// healthcheck).
    pub fn trust_only(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem))
    }
}

/// Verifies a server's certificate chain against our CA (rustls's
/// [`WebPkiServerVerifier`]: signatures, validity, the serverAuth usage)
/// and then its identity by its SPIFFE id, not its DNS name: a peer is who
/// its URI SAN says, so a certificate of our CA for another identity (the
/// operator's, another service's) is refused even at the right address, and
/// a certificate with only a URI SAN is enough.
///
/// [`WebPkiServerVerifier`]: rustls::client::WebPkiServerVerifier
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    chain: Arc<rustls::client::WebPkiServerVerifier>,
    accepted: Vec<String>,
}

impl SpiffeServerVerifier {
    /// `ca_pem`: the CA certificates; `accepted`: the SPIFFE ids a server
    /// may present (one, for a service calling another).
    pub fn new(ca_pem: &[u8], accepted: Vec<String>) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in certs(ca_pem, "TLS_CA_FILE", Path::new("(the CA)"))? {
            roots
                .add(ca)
                .map_err(|e| format!("TLS_CA_FILE: not a CA certificate: {e}"))?;
        }
        let chain = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| format!("TLS_CA_FILE: {e}"))?;
        Ok(Self { chain, accepted })
    }
}

impl rustls::client::danger::ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError, Error};
        // WebPkiServerVerifier checks the chain (and usage) first, the name
        // last: a name mismatch means the chain held, and the name is what
        // the SPIFFE id replaces.
        match self.chain.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(_)
            | Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(other) => return Err(other),
        }
        let presented = uri_sans(end_entity);
        if presented.iter().any(|uri| self.accepted.contains(uri)) {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        }
        Err(Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(WrongPeer {
                expected: self.accepted.join(" or "),
                presented: presented.join(", "),
            })),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// A server of our CA that is not the service we meant to call.
#[derive(Debug)]
struct WrongPeer {
    expected: String,
    presented: String,
}

impl std::fmt::Display for WrongPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the server is not {} (its certificate names: {})",
            self.expected,
            if self.presented.is_empty() {
                "no SPIFFE id"
            } else {
                &self.presented
            }
        )
    }
}

impl std::error::Error for WrongPeer {}

/// Makes rustls use ring for everything (the only provider compiled in).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// How an operator's command-line tool reaches a service: its certificate
/// (`spiffe://inmail/operator/...`), key and the CA, for an `https://` URL.
#[derive(Debug, Clone, clap::Args)]
pub struct OperatorArgs {
    /// The operator's certificate (PEM).
    #[arg(long, env = "OPERATOR_CERT_FILE")]
    pub operator_cert_file: Option<PathBuf>,
    /// The operator's private key (PEM).
    #[arg(long, env = "OPERATOR_KEY_FILE")]
    pub operator_key_file: Option<PathBuf>,
    /// The CA the services' certificates are signed by.
    #[arg(long, env = "OPERATOR_CA_FILE")]
    pub operator_ca_file: Option<PathBuf>,
}

impl OperatorArgs {
    /// A connected channel to `url` as the operator (plaintext for an
    /// `http://` URL, to a service in INSECURE_PLAINTEXT mode).
    pub async fn connect(&self, url: &str) -> Result<tonic::transport::Channel, String> {
        install_crypto_provider();
        let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
            .map_err(|e| format!("{url:?} is not a valid URL: {e}"))?;
        if url.starts_with("https://") {
            let (Some(cert), Some(key), Some(ca)) = (
                &self.operator_cert_file,
                &self.operator_key_file,
                &self.operator_ca_file,
            ) else {
                return Err(
                    "OPERATOR_CERT_FILE, OPERATOR_KEY_FILE and OPERATOR_CA_FILE are needed for an https:// URL"
                        .into(),
                );
            };
            let files = TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            };
            let material = TlsMaterial::load(&files).map_err(|e| {
                e.replace("TLS_CERT_FILE", "OPERATOR_CERT_FILE")
                    .replace("TLS_KEY_FILE", "OPERATOR_KEY_FILE")
                    .replace("TLS_CA_FILE", "OPERATOR_CA_FILE")
            })?;
            endpoint = endpoint
                .tls_config(material.client_config())
                .map_err(|e| format!("{url}: {e}"))?;
        }
        endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot reach {url}: {e}"))
    }
}
