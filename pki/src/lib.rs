//! Credentials, and the only crate that knows certificates.
//!
//! - [`Ca`]: the control plane's certificate authority, made on first start
//!   (`DATA_DIR/pki/ca.{crt,key}`, the key 0600); it issues the server's
//!   certificate, users' and agents' (from their CSRs).
//! - [`Identity`]: who a verified client certificate names. The subject's
//!   CN is the name, its O the role (`testbus:admin`, `testbus:viewer`,
//!   `testbus:agent`, `testbus:replica`): a certificate says both, signed,
//!   so nothing in a request can.
//! - [`JoinToken`]: what an agent needs to join: a secret the control plane
//!   keeps (hashed) and the fingerprint of its CA, which the agent pins
//!   instead of being given the CA file.
//! - [`ClientFile`]: `testbusctl`'s config (`$TESTBUS_CONFIG`).
//! - rustls configurations for both ends ([`server_config`],
//!   [`client_config`], [`pinned_client_config`]), all on the ring
//!   provider, named explicitly (never the process default).
#![forbid(unsafe_code)]

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls_pki_types::pem::PemObject;
use sha2::Digest;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The DNS name every server certificate carries besides its addresses:
/// what a client verifies when it reaches the control plane through a
/// socket (a relay's) rather than by address.
pub const SERVER_NAME: &str = "testbus-control-plane";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Rcgen(#[from] rcgen::Error),
    #[error(transparent)]
    Tls(#[from] rustls::Error),
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> PkiError {
    move |e| PkiError::Io(what.to_string(), e)
}

/// What a certificate lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Everything.
    Admin,
    /// Read everything, write nothing.
    Viewer,
    /// A node agent: its own host and what runs on it.
    Agent,
    /// Another control plane on the same store (copies blobs).
    Replica,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
            Role::Agent => "agent",
            Role::Replica => "replica",
        }
    }
    fn organization(self) -> String {
        format!("testbus:{}", self.as_str())
    }
}

/// A role name that is not one of the four.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a role: admin, viewer, agent or replica")]
pub struct NotARole(pub String);

impl std::str::FromStr for Role {
    type Err = NotARole;
    fn from_str(s: &str) -> Result<Role, NotARole> {
        match s {
            "admin" => Ok(Role::Admin),
            "viewer" => Ok(Role::Viewer),
            "agent" => Ok(Role::Agent),
            "replica" => Ok(Role::Replica),
            _ => Err(NotARole(s.into())),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a (verified) certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub role: Role,
    /// When it was issued (its not-before is [`BACKDATE`] earlier): a
    /// revocation of `name` refuses what was issued before it.
    pub issued: SystemTime,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// An agent of a HostPool's guest: the pool (the certificate's
    /// `OU=pool:NAME`, set by the control plane from the join token).
    pub pool: Option<String>,
}

impl Identity {
    /// The name in its space: hosts (agents), users (admins and viewers)
    /// and replicas never share one, whatever their names.
    pub fn subject(&self) -> Subject {
        Subject::of(self.role, &self.name)
    }
}

/// A name in its identity space: what a revocation names. `host:t3` is
/// never `user:t3`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subject(String);

impl Subject {
    pub fn of(role: Role, name: &str) -> Subject {
        let space = match role {
            Role::Agent => "host",
            Role::Admin | Role::Viewer => "user",
            Role::Replica => "replica",
        };
        Subject(format!("{space}:{name}"))
    }
    pub fn host(name: &str) -> Subject {
        Subject::of(Role::Agent, name)
    }
    pub fn user(name: &str) -> Subject {
        Subject::of(Role::Admin, name)
    }
    /// A subject as stored (`host:NAME`); a bare name (what earlier
    /// versions stored: they revoked agents only) is a host's.
    pub fn parse_stored(s: &str) -> Subject {
        match s.split_once(':') {
            Some(("host" | "user" | "replica", n)) if !n.is_empty() => Subject(s.to_string()),
            _ => Subject::host(s),
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The identity a certificate names. Only meaningful for a certificate
/// whose chain was verified against the CA (the TLS handshake did).
pub fn identity_of(der: &[u8]) -> Result<Identity, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Invalid(format!("not a certificate: {e}")))?;
    let first = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>>| {
        it.next().and_then(|a| a.as_str().ok()).map(str::to_string)
    };
    let name = first(&mut cert.subject().iter_common_name())
        .ok_or_else(|| PkiError::Invalid("the certificate names no CN".into()))?;
    let org = first(&mut cert.subject().iter_organization())
        .ok_or_else(|| PkiError::Invalid("the certificate names no O (role)".into()))?;
    let role = org
        .strip_prefix("testbus:")
        .and_then(|r| r.parse().ok())
        .ok_or_else(|| PkiError::Invalid(format!("O={org:?} is not a testbus role")))?;
    let at = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
    };
    let not_before = at(cert.validity().not_before);
    let pool = first(&mut cert.subject().iter_organizational_unit())
        .and_then(|ou| ou.strip_prefix("pool:").map(str::to_string))
        .filter(|_| role == Role::Agent);
    Ok(Identity {
        name,
        role,
        issued: not_before + BACKDATE,
        not_before,
        not_after: at(cert.validity().not_after),
        pool,
    })
}

/// The identity the first certificate of a PEM text names.
pub fn identity_of_pem(pem: &str) -> Result<Identity, PkiError> {
    identity_of(&first_cert(pem, "certificate")?)
}

/// The SHA-256 of a certificate's DER, in hex: what a join token pins.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(der))
}

fn first_cert(pem: &str, what: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| PkiError::Invalid(format!("{what}: no PEM certificate in it ({e})")))
}

fn certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let v = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Invalid(format!("{what}: {e}")))?;
    if v.is_empty() {
        return Err(PkiError::Invalid(format!("{what}: no PEM certificate in it")));
    }
    Ok(v)
}

fn private_key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::Invalid(format!("{what}: {e}")))
}

/// The fingerprint of the first certificate of a PEM text.
pub fn fingerprint_pem(pem: &str) -> Result<String, PkiError> {
    Ok(fingerprint(&first_cert(pem, "certificate")?))
}

/// Makes `dir` (and its parents) if missing, and gives it mode 0700
/// whatever the umask: what a daemon keeps there (secrets of tests, keys,
/// output) is its owner's alone.
pub fn private_dir(dir: &Path) -> Result<(), PkiError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(io(dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir.display()))
}

/// Writes `data` to `path` through a temporary file and a rename, with
/// `mode`: a reader never sees half a key, and a key is never readable by
/// others, not even for a moment.
pub fn write_private(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir.display()))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(tmp.display()))?;
    f.write_all(data).and_then(|_| f.sync_all()).map_err(io(tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(io(path.display()))
}

/// How much earlier than its issue a certificate is valid from: clocks of
/// agents and the control plane differ a little.
pub const BACKDATE: Duration = Duration::from_secs(60);

fn params(name: &str, role: Role, ttl: Duration) -> CertificateParams {
    pool_params(name, role, None, ttl)
}

fn pool_params(name: &str, role: Role, pool: Option<&str>, ttl: Duration) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, role.organization());
    if let Some(pool) = pool {
        dn.push(DnType::OrganizationalUnitName, format!("pool:{pool}"));
    }
    p.distinguished_name = dn;
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::try_from(BACKDATE).unwrap_or_default();
    p.not_after = now + time::Duration::try_from(ttl).unwrap_or(time::Duration::days(365));
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&rand::random::<[u8; 16]>().map(|b| b & 0x7f)));
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.use_authority_key_identifier_extension = true;
    p
}

/// A certificate and its key, in PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: String,
    pub key: String,
}

/// The control plane's certificate authority.
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

/// How long a CA made here is valid.
const CA_TTL: Duration = Duration::from_secs(10 * 365 * 86400);

impl Ca {
    /// A new CA (self-signed, ECDSA P-256).
    pub fn create() -> Result<(Ca, String), PkiError> {
        let key = KeyPair::generate()?;
        let mut p = params("testbus CA", Role::Admin, CA_TTL);
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, "testbus CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![];
        let cert = p.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        let ca = Ca::from_pem(&cert.pem(), &key_pem)?;
        Ok((ca, key_pem))
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::Invalid(format!("CA key: {e}")))?;
        let cert_der = first_cert(cert_pem, "CA certificate")?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Ca { cert_pem: cert_pem.to_string(), cert_der, issuer })
    }

    /// The CA kept in `dir` (`ca.crt`, `ca.key`), if there is one.
    pub fn load(dir: &Path) -> Result<Option<Ca>, PkiError> {
        let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
        match (std::fs::read_to_string(&crt), std::fs::read_to_string(&key)) {
            (Ok(c), Ok(k)) => Ok(Some(Ca::from_pem(&c, &k)?)),
            (Err(e), _) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            (Err(e), _) => Err(PkiError::Io(crt.display().to_string(), e)),
            (_, Err(e)) => Err(PkiError::Io(key.display().to_string(), e)),
        }
    }

    /// The CA kept in `dir`, made and kept there first if there is none.
    /// Returns whether it was made now.
    pub fn load_or_create(dir: &Path) -> Result<(Ca, bool), PkiError> {
        if let Some(ca) = Ca::load(dir)? {
            return Ok((ca, false));
        }
        let (ca, key) = Ca::create()?;
        // The key first: a ca.crt without its key would be a CA that
        // cannot sign, and `load` would refuse it.
        write_private(&dir.join("ca.key"), key.as_bytes(), 0o600)?;
        write_private(&dir.join("ca.crt"), ca.cert_pem.as_bytes(), 0o644)?;
        Ok((ca, true))
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    /// A server certificate naming `names` (IP addresses or DNS names) and
    /// [`SERVER_NAME`].
    pub fn issue_server(&self, names: &[String], ttl: Duration) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let mut p = params(SERVER_NAME, Role::Replica, ttl);
        let mut all: Vec<String> = names.to_vec();
        all.push(SERVER_NAME.into());
        all.sort();
        all.dedup();
        p.subject_alt_names = all
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()?;
        // A replica's server certificate is also its client certificate
        // toward the others.
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok(Issued { cert: cert.pem(), key: key.serialize_pem() })
    }

    /// A client certificate for `name` in `role`, with a new key.
    pub fn issue(&self, name: &str, role: Role, ttl: Duration) -> Result<Issued, PkiError> {
        check_name(name)?;
        let key = KeyPair::generate()?;
        let cert = params(name, role, ttl).signed_by(&key, &self.issuer)?;
        Ok(Issued { cert: cert.pem(), key: key.serialize_pem() })
    }

    /// A client certificate for `name` in `role` for the key of a CSR.
    /// Only the CSR's key is taken: what it asks for (its subject, its
    /// extensions) is ignored, so a CSR cannot ask for more.
    /// `pool`: an agent of a pool's guest (the certificate says so).
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        name: &str,
        role: Role,
        pool: Option<&str>,
        ttl: Duration,
    ) -> Result<String, PkiError> {
        check_name(name)?;
        if csr_pem.len() > 16 << 10 {
            return Err(PkiError::Invalid("csr: larger than 16 KiB".into()));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Invalid(format!("csr: not a valid certificate signing request ({e})")))?;
        let cert = pool_params(name, role, pool, ttl).signed_by(&csr.public_key, &self.issuer)?;
        Ok(cert.pem())
    }
}

/// A name a certificate may carry.
pub fn check_name(name: &str) -> Result<(), PkiError> {
    if name.is_empty() || name.len() > 253 || name.chars().any(|c| c.is_control()) {
        return Err(PkiError::Invalid(format!("name {name:?}: 1 to 253 printable characters")));
    }
    Ok(())
}

/// A new key and a CSR for it (the key never leaves who made it).
pub fn new_csr(name: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    let csr = p.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// When a certificate should be renewed: two thirds into its life (from
/// its issue, not its backdated not-before).
pub fn renew_at(id: &Identity) -> SystemTime {
    let life = id.not_after.duration_since(id.issued).unwrap_or_default();
    id.issued + life * 2 / 3
}

/// A bootstrap token: `tbjoin.<CA fingerprint>.<id>.<secret>`. The id
/// names it in the store, the secret is kept there only as a hash, and the
/// fingerprint lets the agent check it reached the right control plane.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub ca: String,
    pub id: String,
    pub secret: String,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JoinToken({}, id {})", &self.ca[..12.min(self.ca.len())], self.id)
    }
}

impl JoinToken {
    pub fn new(ca_fingerprint: &str) -> JoinToken {
        JoinToken {
            ca: ca_fingerprint.to_string(),
            id: hex::encode(rand::random::<[u8; 4]>()),
            secret: hex::encode(rand::random::<[u8; 16]>()),
        }
    }

    /// What the store keeps of the secret.
    pub fn secret_hash(&self) -> String {
        hex::encode(sha2::Sha256::digest(self.secret.as_bytes()))
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tbjoin.{}.{}.{}", self.ca, self.id, self.secret)
    }
}

/// Text that is not a join token (its secret is never repeated back).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a join token (tbjoin.<64 hex>.<8 hex>.<32 hex>, as `token create` prints)")]
pub struct NotAJoinToken;

impl std::str::FromStr for JoinToken {
    type Err = NotAJoinToken;
    fn from_str(s: &str) -> Result<JoinToken, NotAJoinToken> {
        let hexlen = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit());
        match s.trim().split('.').collect::<Vec<_>>()[..] {
            ["tbjoin", ca, id, secret] if hexlen(ca, 64) && hexlen(id, 8) && hexlen(secret, 32) => {
                Ok(JoinToken { ca: ca.to_lowercase(), id: id.to_lowercase(), secret: secret.to_lowercase() })
            }
            _ => Err(NotAJoinToken),
        }
    }
}

/// `testbusctl`'s configuration file: where the control plane is and how
/// to prove who we are. Written by `testbus-control-plane user create`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientFile {
    /// `https://HOST:PORT`, a comma-separated list of them, or `unix:/path`.
    pub server: String,
    /// The CA that signed the server's certificate (PEM).
    #[serde(default)]
    pub certificate_authority: String,
    /// This user's certificate and key (PEM).
    #[serde(default)]
    pub client_certificate: String,
    #[serde(default)]
    pub client_key: String,
}

impl ClientFile {
    pub fn load(path: &Path) -> Result<ClientFile, PkiError> {
        let text = std::fs::read_to_string(path).map_err(io(path.display()))?;
        serde_norway::from_str(&text).map_err(|e| PkiError::Invalid(format!("{}: {e}", path.display())))
    }

    pub fn save(&self, path: &Path) -> Result<(), PkiError> {
        let text = serde_norway::to_string(self).map_err(|e| PkiError::Invalid(e.to_string()))?;
        write_private(path, text.as_bytes(), 0o600)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_pem: &str) -> Result<Arc<rustls::RootCertStore>, PkiError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca_pem, "CA")? {
        roots.add(c)?;
    }
    Ok(Arc::new(roots))
}

/// The server's TLS: `chain` (its certificate, then the CA's, so that a
/// joining agent can find the CA it pinned), verifying client certificates
/// against `client_ca` when one is sent. A client without one still
/// connects (it may join, and is refused everything else).
pub fn server_config(chain_pem: &str, key_pem: &str, client_ca_pem: &str) -> Result<rustls::ServerConfig, PkiError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(client_ca_pem)?, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| PkiError::Invalid(format!("client CA: {e}")))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(chain_pem, "server certificate")?, private_key(key_pem, "server key")?)?;
    // HTTP/2 first (gRPC); HTTP/1.1 for a scraper or browser that asks.
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A client's TLS: the server verified against `ca_pem`; `identity` (a
/// certificate and key in PEM) sent when asked.
pub fn client_config(ca_pem: &str, identity: Option<(&str, &str)>) -> Result<rustls::ClientConfig, PkiError> {
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_pem)?);
    let mut cfg = match identity {
        Some((cert, key)) => {
            b.with_client_auth_cert(certs(cert, "client certificate")?, private_key(key, "client key")?)?
        }
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// A client's TLS for joining: no CA file, but the fingerprint of the CA.
/// The server sends its CA after its certificate; the one with this
/// fingerprint becomes the root the server is verified against, as usual
/// (name included). A server whose chain has no such CA is refused.
pub fn pinned_client_config(ca_fingerprint: &str) -> Result<rustls::ClientConfig, PkiError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa { fingerprint: ca_fingerprint.to_lowercase() }))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
}

impl PinnedCa {
    fn algorithms() -> rustls::crypto::WebPkiSupportedAlgorithms {
        rustls::crypto::ring::default_provider().signature_verification_algorithms
    }
}

impl rustls::client::danger::ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|c| fingerprint(c) == self.fingerprint) else {
            return Err(rustls::Error::General(format!(
                "the server's CA is not the one the join token names (sha256 {})",
                self.fingerprint
            )));
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &Self::algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &Self::algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        Self::algorithms().supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_names_who_and_in_what_role() {
        let (ca, _) = Ca::create().unwrap();
        let u = ca.issue("alice", Role::Viewer, Duration::from_secs(3600)).unwrap();
        let id = identity_of(&first_cert(&u.cert, "c").unwrap()).unwrap();
        assert_eq!((id.name.as_str(), id.role), ("alice", Role::Viewer));
        let life = id.not_after.duration_since(id.not_before).unwrap();
        assert_eq!(life, Duration::from_secs(3660));
        assert_eq!(renew_at(&id), id.issued + Duration::from_secs(2400));
    }

    #[test]
    fn a_csr_gets_the_name_and_role_of_the_signer_not_its_own() {
        let (ca, _) = Ca::create().unwrap();
        let (csr, _key) = new_csr("admin").unwrap();
        let cert = ca.sign_csr(&csr, "host-a", Role::Agent, None, Duration::from_secs(60)).unwrap();
        let id = identity_of(&first_cert(&cert, "c").unwrap()).unwrap();
        assert_eq!((id.name.as_str(), id.role, id.pool), ("host-a", Role::Agent, None));
        let cert = ca.sign_csr(&csr, "vms-0a1b2", Role::Agent, Some("vms"), Duration::from_secs(60)).unwrap();
        let id = identity_of(&first_cert(&cert, "c").unwrap()).unwrap();
        assert_eq!(id.pool.as_deref(), Some("vms"));
        assert_eq!(id.subject().as_str(), "host:vms-0a1b2");
        for bad in ["", "garbage", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"] {
            let e = ca.sign_csr(bad, "h", Role::Agent, None, Duration::from_secs(60)).unwrap_err();
            assert!(e.to_string().starts_with("csr:"), "{e}");
        }
        assert!(ca.sign_csr(&"x".repeat(20 << 10), "h", Role::Agent, None, Duration::from_secs(60)).is_err());
    }

    #[test]
    fn hosts_users_and_replicas_are_apart() {
        assert_ne!(Subject::host("t3"), Subject::user("t3"));
        assert_eq!(Subject::of(Role::Viewer, "alice"), Subject::user("alice"));
        assert_eq!(Subject::parse_stored("t3"), Subject::host("t3"), "what earlier versions stored");
        assert_eq!(Subject::parse_stored("user:t3"), Subject::user("t3"));
        assert_eq!(Subject::parse_stored("replica:cp-b"), Subject::of(Role::Replica, "cp-b"));
    }

    #[test]
    fn a_ca_is_kept_with_its_key_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (a, made) = Ca::load_or_create(dir.path()).unwrap();
        assert!(made);
        let (b, made) = Ca::load_or_create(dir.path()).unwrap();
        assert!(!made);
        assert_eq!(a.fingerprint(), b.fingerprint());
        let mode = std::fs::metadata(dir.path().join("ca.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn join_tokens_round_trip_and_junk_is_refused() {
        let t = JoinToken::new(&"ab".repeat(32));
        let back: JoinToken = t.to_string().parse().unwrap();
        assert_eq!(back, t);
        for bad in ["", "tbjoin", "tbjoin.x.y.z", &format!("tbjoin.{}.{}.{}", "a".repeat(64), "0", "1".repeat(32))] {
            assert!(bad.parse::<JoinToken>().is_err(), "{bad}");
        }
        assert!(!format!("{t:?}").contains(&t.secret), "Debug shows no secret");
    }

    #[test]
    fn a_client_file_round_trips_and_unknown_fields_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = ClientFile { server: "https://127.0.0.1:7780".into(), ..Default::default() };
        f.save(&dir.path().join("c.yaml")).unwrap();
        assert_eq!(ClientFile::load(&dir.path().join("c.yaml")).unwrap(), f);
        std::fs::write(dir.path().join("bad.yaml"), "server: x\nservre: y\n").unwrap();
        let e = ClientFile::load(&dir.path().join("bad.yaml")).unwrap_err().to_string();
        assert!(e.contains("servre"), "{e}");
    }
}
