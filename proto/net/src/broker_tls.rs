//! TLS to the fleet's MQTT broker, for the hub's and the devices' clients.
//!
//! The broker's certificate is checked against the fleet's broker CA alone (the
//! `broker-ca.pem` enrollment gives a device, pinned: no system roots), under the fixed
//! name [`BROKER_NAME`] whatever host the URL names — so a hub reached by a bare IP
//! address, or by a name that changed, is still checked. The client shows a certificate
//! the hub's CA issued for its own ed25519 key (a device's `device.key`), so its private
//! key never leaves it.

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::sync::Arc;

/// The largest MQTT packet (its remaining length) the fleet's clients and the embedded
/// broker take: announcements are < 1 KiB, status reports < 8 KiB, the trust records
/// < 16 KiB (`proto::revocation::MAX_SPREAD_BYTES`), each with its topic.
pub const MAX_PACKET: usize = 16 * 1024 + 512;

/// The name every broker certificate the hub issues carries, and the one clients check.
pub const BROKER_NAME: &str = "unifleet-broker";

/// The ring provider, the one this workspace builds rustls with.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A broker URL: `mqtt://host[:1883]` or, with TLS, `mqtts://host[:8883]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl BrokerUrl {
    pub fn parse(url: &str) -> Result<BrokerUrl, crate::BrokerUrlError> {
        let (rest, tls, default) = if let Some(r) = url.strip_prefix("mqtts://") {
            (r, true, 8883)
        } else if let Some(r) = url.strip_prefix("mqtt://") {
            (r, false, 1883)
        } else {
            return Err(crate::BrokerUrlError::Scheme(url.into()));
        };
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse()
                    .map_err(|_| crate::BrokerUrlError::Port(url.into()))?,
            ),
            None => (rest.to_string(), default),
        };
        Ok(BrokerUrl { host, port, tls })
    }
}

/// Why a TLS client configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    #[error("the broker CA file holds no PEM certificate")]
    NoCa,
    #[error("the broker CA certificate")]
    Ca(#[source] rustls::Error),
    #[error("the client certificate holds no PEM certificate")]
    NoCert,
    #[error("the client certificate or key")]
    Client(#[source] rustls::Error),
}

/// The PKCS#8 v1 document of an ed25519 key from its 32-byte seed (RFC 8410): the fixed
/// 16-byte header, then the seed.
pub fn ed25519_pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(seed);
    der
}

/// The certificates in a PEM file's bytes.
pub fn certs(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect()
}

/// A client configuration trusting only `ca_pem`, showing `cert_pem` for the key whose
/// seed is `seed`.
pub fn client_config(
    ca_pem: &[u8],
    cert_pem: &[u8],
    seed: &[u8; 32],
) -> Result<rustls::ClientConfig, ClientTlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let cas = certs(ca_pem);
    if cas.is_empty() {
        return Err(ClientTlsError::NoCa);
    }
    for ca in cas {
        roots.add(ca).map_err(ClientTlsError::Ca)?;
    }
    let chain = certs(cert_pem);
    if chain.is_empty() {
        return Err(ClientTlsError::NoCert);
    }
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| ClientTlsError::Ca(rustls::Error::General(e.to_string())))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ed25519_pkcs8(seed)));
    rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(ClientTlsError::Client)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(FleetBroker { inner }))
        .with_client_auth_cert(chain, key)
        .map_err(ClientTlsError::Client)
}

/// MQTT options for `url` (with `tls` when it is `mqtts://`).
pub fn mqtt_options(
    client_id: &str,
    url: &BrokerUrl,
    tls: Option<rustls::ClientConfig>,
) -> MqttOptions {
    let mut opts = MqttOptions::new(client_id, &url.host, url.port);
    if let Some(tls) = tls {
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls),
        )));
    }
    opts
}

/// Checks the broker's chain against the fleet's CA under [`BROKER_NAME`].
#[derive(Debug)]
struct FleetBroker {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
}

impl ServerCertVerifier for FleetBroker {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = ServerName::try_from(BROKER_NAME).expect("a DNS name");
        self.inner
            .verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_name_their_transport() {
        let u = BrokerUrl::parse("mqtts://203.0.113.10").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.tls),
            ("203.0.113.10", 8883, true)
        );
        let u = BrokerUrl::parse("mqtt://h:1884").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.tls), ("h", 1884, false));
        assert!(BrokerUrl::parse("tcp://h").is_err());
        assert!(BrokerUrl::parse("mqtts://h:x").is_err());
    }

    #[test]
    fn an_ed25519_seed_makes_a_pkcs8_key_rustls_signs_with() {
        let der = ed25519_pkcs8(&[7; 32]);
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der));
        let signer = provider().key_provider.load_private_key(key).unwrap();
        assert_eq!(signer.algorithm(), rustls::SignatureAlgorithm::ED25519);
    }
}
