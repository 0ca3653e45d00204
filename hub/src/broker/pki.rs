//! The fleet's broker CA: an ed25519 key of the hub's (`keys/broker-ca.key`) that
//! certifies the broker (embedded, or mosquitto through `hub broker-config`), the hub's
//! own MQTT client and each enrolled device's own key.
//!
//! The CA certificate is made the same way from the key every time (fixed dates and
//! serial; ed25519 signatures are deterministic), so it is not state of its own:
//! `broker-ca.pem` in the hub's directory is that certificate, for devices to pin at
//! enrollment, and a hub restored with its keys makes the same one.

use crate::home::{read_secret, write_atomic, write_secret, Home, KeyError, WriteError};
use net::broker_tls::{ed25519_pkcs8, BROKER_NAME};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, PKCS_ED25519,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The common name of the hub's own client certificate: upper case, so no device can be
/// enrolled under it (`proto::names`).
pub const HUB_CN: &str = "Unifleet-Hub";

/// The CA certificate devices pin, in the hub's directory.
pub const CA_FILE: &str = "broker-ca.pem";
const CA_KEY: &str = "keys/broker-ca.key";

/// How long a device's certificate is valid. A device asks for a new one when the one it
/// keeps is a month old, and when the broker refuses it.
pub const VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long the broker's certificate and the hub's own are valid: the embedded broker's
/// and the hub's keys live in memory for one run (a hub may run for years), mosquitto's
/// is renewed by running `hub broker-config` again.
pub const SERVER_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Why the broker CA could not be opened or could not issue.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("the broker CA key")]
    Key(#[from] KeyError),
    #[error("making the broker CA key")]
    Write(#[from] WriteError),
    #[error("making a certificate")]
    Cert(#[from] rcgen::Error),
    #[error("the broker's TLS configuration")]
    Tls(#[from] rustls::Error),
    #[error("{0}")]
    Client(#[from] net::broker_tls::ClientTlsError),
}

/// The broker CA, ready to issue.
pub struct BrokerCa {
    key: KeyPair,
    cert: rcgen::Certificate,
}

impl std::fmt::Debug for BrokerCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerCa").finish_non_exhaustive()
    }
}

/// An ed25519 public key given as its 32 bytes, for rcgen to certify.
struct Ed25519Public([u8; 32]);

impl rcgen::PublicKeyData for Ed25519Public {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &rcgen::SignatureAlgorithm {
        &PKCS_ED25519
    }
}

fn at(unix: u64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

impl BrokerCa {
    /// The hub's CA, its key made on first use (`hub init`, or the first `hub serve` of a
    /// home from before it), and `broker-ca.pem` written when missing.
    pub fn open(home: &Home) -> Result<BrokerCa, PkiError> {
        let path = home.dir.join(CA_KEY);
        if !path.exists() {
            write_secret(&path, &crate::home::new_key()?)?;
        }
        let seed = read_secret(&path)?.seed();
        let ca = BrokerCa::from_seed(&seed, &home.config.fleet)?;
        let pem_path = ca_path(&home.dir);
        if std::fs::read_to_string(&pem_path).ok().as_deref() != Some(&ca.pem()) {
            write_atomic(&pem_path, ca.pem().as_bytes())?;
        }
        Ok(ca)
    }

    fn from_seed(seed: &[u8; 32], fleet: &str) -> Result<BrokerCa, PkiError> {
        let key = KeyPair::try_from(ed25519_pkcs8(seed).as_slice())?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&format!("unifleet broker CA ({fleet})"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = at(1_577_836_800); // 2020-01-01
        params.not_after = at(4_102_444_800); // 2100-01-01
        params.serial_number = Some(rcgen::SerialNumber::from(vec![1]));
        let cert = params.self_signed(&key)?;
        Ok(BrokerCa { key, cert })
    }

    /// The CA certificate (PEM): what devices pin.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    fn leaf(
        &self,
        cn: &str,
        now: u64,
        valid: Duration,
        server_names: &[String],
    ) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(cn);
        params.not_before = at(now.saturating_sub(3600));
        params.not_after = at(now + valid.as_secs());
        params.subject_alt_names = server_names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.clone().try_into().expect("a DNS name")),
            })
            .collect();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if server_names.is_empty() {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        params
    }

    /// A client certificate (PEM) for `key`, named `cn` (a device's name, or [`HUB_CN`]).
    /// Its serial number is the key's ([`serial_of`]), so a revocation list can name every
    /// certificate ever issued for a key.
    pub fn issue_client(&self, cn: &str, key: &[u8; 32], now: u64) -> Result<String, PkiError> {
        // The hub's own: a key that lives in its memory for one run.
        let valid = if cn == HUB_CN {
            SERVER_VALIDITY
        } else {
            VALIDITY
        };
        let mut params = self.leaf(cn, now, valid, &[]);
        params.serial_number = Some(serial_of(key));
        let cert = params.signed_by(&Ed25519Public(*key), &self.cert, &self.key)?;
        Ok(cert.pem())
    }

    /// A certificate revocation list (PEM) of every certificate issued for `revoked`
    /// keys, for mosquitto (the embedded broker checks the enrolled devices instead). It
    /// lasts until 2100: an expired list would make OpenSSL refuse every client.
    pub fn crl(&self, revoked: &[[u8; 32]], now: u64) -> Result<String, PkiError> {
        let params = rcgen::CertificateRevocationListParams {
            this_update: at(now.saturating_sub(3600)),
            next_update: at(4_102_444_800),
            crl_number: rcgen::SerialNumber::from(now.to_be_bytes().to_vec()),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|k| rcgen::RevokedCertParams {
                    serial_number: serial_of(k),
                    revocation_time: at(now.saturating_sub(3600)),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.cert, &self.key)?.pem()?)
    }

    /// A broker certificate and its new key (both PEM), for [`BROKER_NAME`] and `extra`
    /// names (host names or IP addresses outsiders such as `mosquitto_sub` check).
    pub fn issue_server(&self, extra: &[String], now: u64) -> Result<(String, String), PkiError> {
        // From a seed as PKCS#8 v1: OpenSSL 3.0 (mosquitto's) cannot read the v2 documents
        // ring generates.
        let key = KeyPair::try_from(ed25519_pkcs8(&random_seed()?).as_slice())?;
        let mut names = vec![BROKER_NAME.to_string()];
        names.extend(extra.iter().cloned());
        let cert = self
            .leaf(BROKER_NAME, now, SERVER_VALIDITY, &names)
            .signed_by(&key, &self.cert, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// The embedded broker's TLS configuration: its own certificate (for `extra` names
    /// too), and client certificates required, chained to this CA.
    pub fn server_config(
        &self,
        extra: &[String],
        now: u64,
    ) -> Result<rustls::ServerConfig, PkiError> {
        let (cert, key) = self.issue_server(extra, now)?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone())?;
        let provider = net::broker_tls::provider();
        let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
            KeyPair::from_pem(&key)?.serialize_der().into(),
        );
        Ok(rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(clients)
            .with_single_cert(net::broker_tls::certs(cert.as_bytes()), key)?)
    }

    /// The hub's own client configuration: a new key, certified as [`HUB_CN`].
    pub fn hub_client(&self, now: u64) -> Result<rustls::ClientConfig, PkiError> {
        let seed = random_seed()?;
        let public = proto::SecretKey::from_seed(seed).public();
        let cert = self.issue_client(HUB_CN, &public.0, now)?;
        Ok(net::broker_tls::client_config(
            self.pem().as_bytes(),
            cert.as_bytes(),
            &seed,
        )?)
    }
}

/// The serial number of every client certificate issued for `key`: 16 bytes of its
/// BLAKE3 digest, positive.
fn serial_of(key: &[u8; 32]) -> rcgen::SerialNumber {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"unifleet broker client certificate\0");
    hasher.update(key);
    let mut serial = hasher.finalize().as_bytes()[..16].to_vec();
    serial[0] = (serial[0] & 0x7f) | 0x01;
    rcgen::SerialNumber::from(serial)
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn random_seed() -> Result<[u8; 32], KeyError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(KeyError::Random)?;
    Ok(seed)
}

/// Where the CA certificate is, in a hub's directory.
pub fn ca_path(dir: &Path) -> PathBuf {
    dir.join(CA_FILE)
}

/// A random secret for the hub's in-process login (hex).
pub fn random_secret() -> String {
    let mut b = [0u8; 32];
    // No randomness at all is not survivable for anything else the hub does either.
    getrandom::fill(&mut b).expect("the OS random source");
    hex::encode(b)
}

/// Why a TLS client was refused.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("TLS handshake: {0}")]
    Handshake(#[source] std::io::Error),
    #[error("no TLS handshake within {0:?}")]
    Timeout(Duration),
    #[error("its certificate cannot be read")]
    Certificate,
    #[error("its certificate names {0:?}, which is not an enrolled device")]
    NotEnrolled(String),
    #[error(
        "its certificate for {0:?} carries another key than the one enrolled (replaced or revoked)"
    )]
    WrongKey(String),
}

/// The TLS handshake (client certificate required and chained to the CA), then who the
/// certificate names: the hub, or an enrolled device with its enrolled key. A client with
/// a valid certificate that names no enrolled device is told so at CONNECT.
pub async fn accept(
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    enrolled: &tokio::sync::watch::Receiver<super::Enrolled>,
    deadline: Duration,
) -> Result<
    (
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        super::Proven,
    ),
    AcceptError,
> {
    let tls = tokio::time::timeout(deadline, acceptor.accept(stream))
        .await
        .map_err(|_| AcceptError::Timeout(deadline))?
        .map_err(AcceptError::Handshake)?;
    let der = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or(AcceptError::Certificate)?;
    let (cn, key) = subject(der).ok_or(AcceptError::Certificate)?;
    let proven = if cn == HUB_CN {
        super::Proven::Tls(super::Identity::Hub, key)
    } else {
        match enrolled.borrow().get(&cn) {
            None => super::Proven::Refused(AcceptError::NotEnrolled(cn)),
            Some(k) if *k != key => super::Proven::Refused(AcceptError::WrongKey(cn)),
            Some(_) => super::Proven::Tls(super::Identity::Device(cn), key),
        }
    };
    Ok((tls, proven))
}

/// A certificate's common name and ed25519 key.
fn subject(der: &[u8]) -> Option<(String, [u8; 32])> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let key = cert
        .public_key()
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .ok()?;
    Some((cn, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_certificate_is_made_the_same_from_its_key() {
        let a = BrokerCa::from_seed(&[1; 32], "f").unwrap();
        let b = BrokerCa::from_seed(&[1; 32], "f").unwrap();
        assert_eq!(a.pem(), b.pem());
        assert_ne!(a.pem(), BrokerCa::from_seed(&[2; 32], "f").unwrap().pem());
    }

    #[test]
    fn a_client_certificate_names_the_device_and_carries_its_own_key() {
        let ca = BrokerCa::from_seed(&[1; 32], "f").unwrap();
        let device = proto::SecretKey::from_seed([9; 32]).public();
        let pem = ca
            .issue_client("kitchen-1", &device.0, 1_800_000_000)
            .unwrap();
        let der = net::broker_tls::certs(pem.as_bytes()).remove(0);
        assert_eq!(subject(&der), Some(("kitchen-1".into(), device.0)));
        // A device can build its TLS client from it and its seed.
        net::broker_tls::client_config(ca.pem().as_bytes(), pem.as_bytes(), &[9; 32]).unwrap();
        ca.server_config(&["203.0.113.10".into()], 1_800_000_000)
            .unwrap();
    }
}
