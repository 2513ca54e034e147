//! A development PKI: a local CA, certificates for the services and an
//! operator, the member-token signing key with its public JWK set, and a
//! Redis password per service with the ACL files that admit them. What
//! `scripts/dev-up.sh`, the compose file's `secrets` job and the tests use;
//! never a production CA.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::TRUST_DOMAIN;

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// A CA that issues certificates.
pub struct Authority {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish()
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Authority {
    pub fn new(name: &str) -> Result<Self, String> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(err)?;
        let cert = params.self_signed(&key).map_err(err)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A certificate for `identity` (the path of its SPIFFE id, e.g.
    /// "messaging" or "operator/ana"), valid as server and client, for the
    /// host names and addresses in `hosts`.
    pub fn issue(&self, identity: &str, hosts: &[&str]) -> Result<Pem, String> {
        self.issue_for(
            identity,
            hosts,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    /// A certificate for `identity` that can only call (clientAuth), never
    /// serve: an operator's, which must not pass for a service.
    pub fn issue_client(&self, identity: &str) -> Result<Pem, String> {
        self.issue_for(identity, &[], vec![ExtendedKeyUsagePurpose::ClientAuth])
    }

    fn issue_for(
        &self,
        identity: &str,
        hosts: &[&str],
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> Result<Pem, String> {
        let mut params =
            CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())
                .map_err(err)?;
        let uri = format!("spiffe://{TRUST_DOMAIN}/{identity}");
        params
            .subject_alt_names
            .push(SanType::URI(uri.as_str().try_into().map_err(err)?));
        params.distinguished_name.push(DnType::CommonName, identity);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages;
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

/// The member-token signing key and its public JWK set.
#[derive(Debug, Clone)]
pub struct SigningKey {
    /// PKCS#8 PEM.
    pub private_pem: String,
    pub kid: String,
    /// `{"keys":[...]}`, what the services verify with.
    pub jwks: String,
}

impl SigningKey {
    pub fn generate(kid: &str) -> Result<Self, String> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(err)?;
        let x = URL_SAFE_NO_PAD.encode(key.public_key_raw());
        let jwks = serde_json::json!({
            "keys": [{ "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": kid, "x": x }]
        })
        .to_string();
        Ok(Self {
            private_pem: ed25519_pkcs8_v1_pem(&key.serialize_der())?,
            kid: kid.to_string(),
            jwks,
        })
    }
}

/// The Ed25519 key as PKCS#8 v1 (RFC 8410: the seed only), which OpenSSL
/// (`openssl pkey`), Python's `cryptography` and PyJWT read; `der` is what
/// rcgen writes, PKCS#8 v2 with the public key appended, which they refuse.
fn ed25519_pkcs8_v1_pem(der: &[u8]) -> Result<String, String> {
    // SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING (32 bytes:
    // the seed) }: the same in both versions.
    const HEADER: [u8; 11] = [
        0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
    ];
    let at = der
        .windows(HEADER.len())
        .position(|w| w == HEADER)
        .ok_or("the Ed25519 key is not PKCS#8")?;
    let seed = der
        .get(at + HEADER.len()..at + HEADER.len() + 32)
        .ok_or("the Ed25519 key is truncated")?;
    // SEQUENCE (46 bytes) { INTEGER 0 (v1), ... }
    let mut v1 = vec![0x30, 0x2e, 0x02, 0x01, 0x00];
    v1.extend_from_slice(&HEADER);
    v1.extend_from_slice(seed);
    // 48 bytes: one 64-character PEM line.
    let body = base64::engine::general_purpose::STANDARD.encode(&v1);
    Ok(format!(
        "-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n"
    ))
}

/// 64 random hex digits.
fn random_password() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// The services of the stack.
pub const SERVICES: &[&str] = &["subscription-plan", "billing-credits", "messaging"];

/// Everything a secured stack needs, in memory.
#[derive(Debug)]
pub struct DevPki {
    pub ca: Authority,
    /// One certificate per service, PostgreSQL's ("postgres"), then the
    /// operator's ("operator/dev").
    pub certs: Vec<(String, Pem)>,
    pub signing: SigningKey,
    /// One Redis password per service: (service, password).
    pub redis_passwords: Vec<(String, String)>,
    /// The Redis administrator's (the default user's) password.
    pub redis_admin_password: String,
    /// The history store's (PostgreSQL) superuser password, and one
    /// database user password per service that keeps history.
    pub database_admin_password: String,
    pub database_passwords: Vec<(String, String)>,
}

/// The services that keep history in PostgreSQL (each its own database and
/// user, `inmail_<service with _>`).
pub const HISTORY_SERVICES: &[&str] = &["billing-credits", "messaging"];

impl DevPki {
    /// `hosts`: the names and addresses the services are reached at.
    pub fn generate(hosts: &[&str]) -> Result<Self, String> {
        let ca = Authority::new("inmail development CA")?;
        let mut certs = Vec::new();
        for service in SERVICES {
            let mut names: Vec<&str> = hosts.to_vec();
            names.push(service);
            certs.push((service.to_string(), ca.issue(service, &names)?));
        }
        // The history store's server certificate (the services verify it
        // with DATABASE_CA_FILE).
        let mut names: Vec<&str> = hosts.to_vec();
        names.push("postgres");
        certs.push(("postgres".to_string(), ca.issue("postgres", &names)?));
        certs.push(("operator".to_string(), ca.issue_client("operator/dev")?));
        let signing = SigningKey::generate("dev-1")?;
        let password = random_password;
        let redis_passwords = SERVICES
            .iter()
            .map(|service| (service.to_string(), password()))
            .collect();
        Ok(Self {
            ca,
            certs,
            signing,
            redis_passwords,
            redis_admin_password: password(),
            database_admin_password: password(),
            database_passwords: HISTORY_SERVICES
                .iter()
                .map(|service| (service.to_string(), password()))
                .collect(),
        })
    }

    pub fn cert(&self, name: &str) -> &Pem {
        &self
            .certs
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no certificate {name}"))
            .1
    }

    /// Rewrites the Redis ACL files of a PKI written before, from its
    /// passwords: the rules follow the code (a release may grant a service
    /// a new key pattern); certificates, keys and passwords stay.
    pub fn refresh_acl_files(dir: &Path) -> Result<(), String> {
        // Passwords a release added (the history store's) are created for a
        // PKI written before it; existing ones stay.
        let mut names = vec!["postgres-admin.password".to_string()];
        names.extend(
            HISTORY_SERVICES
                .iter()
                .map(|s| format!("postgres-{s}.password")),
        );
        for name in names {
            let path = dir.join(&name);
            if !path.exists() {
                std::fs::write(&path, random_password())
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                }
            }
        }
        let read = |name: &str| -> Result<String, String> {
            let path = dir.join(name);
            std::fs::read_to_string(&path)
                .map(|s| s.trim().to_string())
                .map_err(|e| format!("{}: {e}", path.display()))
        };
        let admin = read("redis-admin.password")?;
        let mut passwords = Vec::new();
        for (service, _) in super::redis_acl::USERS {
            passwords.push((*service, read(&format!("redis-{service}.password"))?));
        }
        let passwords: Vec<(&str, &str)> =
            passwords.iter().map(|(s, p)| (*s, p.as_str())).collect();
        for (name, test_clock) in [
            ("redis-users.acl", false),
            ("redis-users-test-clock.acl", true),
        ] {
            let path = dir.join(name);
            std::fs::write(
                &path,
                super::redis_acl::acl_file(&admin, &passwords, test_clock),
            )
            .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(())
    }

    /// Writes `ca.crt`, `<name>.crt` / `<name>.key`, `jwt-signing.pem`,
    /// `jwks.json`, `redis-<service>.password`, `redis-admin.password`,
    /// `postgres-admin.password`, `postgres-<service>.password`, and the
    /// Redis ACL files
    /// `redis-users.acl` (test clock off) and `redis-users-test-clock.acl`
    /// into `dir` (keys and passwords readable by the owner only; the ACL
    /// files hold only hashes).
    pub fn write(&self, dir: &Path) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let write = |name: &str, text: &str, secret: bool| -> Result<(), String> {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
            #[cfg(unix)]
            if secret {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            Ok(())
        };
        write("ca.crt", &self.ca.cert_pem, false)?;
        for (name, pem) in &self.certs {
            write(&format!("{name}.crt"), &pem.cert, false)?;
            write(&format!("{name}.key"), &pem.key, true)?;
        }
        write("jwt-signing.pem", &self.signing.private_pem, true)?;
        write("jwks.json", &self.signing.jwks, false)?;
        for (service, password) in &self.redis_passwords {
            write(&format!("redis-{service}.password"), password, true)?;
        }
        write("redis-admin.password", &self.redis_admin_password, true)?;
        write(
            "postgres-admin.password",
            &self.database_admin_password,
            true,
        )?;
        for (service, password) in &self.database_passwords {
            write(&format!("postgres-{service}.password"), password, true)?;
        }
        let passwords: Vec<(&str, &str)> = self
            .redis_passwords
            .iter()
            .map(|(s, p)| (s.as_str(), p.as_str()))
            .collect();
        write(
            "redis-users.acl",
            &super::redis_acl::acl_file(&self.redis_admin_password, &passwords, false),
            false,
        )?;
        write(
            "redis-users-test-clock.acl",
            &super::redis_acl::acl_file(&self.redis_admin_password, &passwords, true),
            false,
        )?;
        Ok(())
    }
}
