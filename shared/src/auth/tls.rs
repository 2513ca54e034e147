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
    /// the client identity (mutual TLS).
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
    }

    /// Only the CA (a client with no identity of its own, e.g. the
    /// healthcheck).
    pub fn trust_only(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem))
    }
}

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
