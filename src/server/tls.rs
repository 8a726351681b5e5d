//! TLS on the public listener: the certificate and key files (`[server.tls]`), checked the way
//! an operator needs (a missing or unreadable file, a key that does not match the
//! certificate, an expired certificate: each named by field), and served through a resolver
//! whose certificate a reload replaces: new handshakes present the new one, open connections
//! keep theirs. ALPN offers `h2` and `http/1.1`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{FieldError, TlsConfig};

/// A certificate ready to serve, with what operators are told about it.
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    /// The leaf's serial number, hex (shown in `/admin/config` and logged on reload).
    pub serial: String,
    /// The leaf's notAfter.
    pub not_after: Option<SystemTime>,
}

impl LoadedCert {
    /// `Some(warning)` when the certificate has expired: clients will refuse it, but the
    /// gateway still starts (an operator may be replacing it); the words are the same in
    /// `check-config` and the log.
    pub fn expiry_warning(&self) -> Option<String> {
        let not_after = self.not_after?;
        let now = SystemTime::now();
        (not_after <= now).then(|| {
            let ago = now.duration_since(not_after).unwrap_or_default();
            format!(
                "server.tls.cert_file: the certificate expired {} ago (notAfter {}); clients will refuse it",
                humantime::format_duration(Duration::from_secs(ago.as_secs())),
                humantime::format_rfc3339_seconds(not_after)
            )
        })
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Reads and checks the files of `tls`; every problem is a field error.
pub fn load(tls: &TlsConfig) -> Result<LoadedCert, Vec<FieldError>> {
    let mut errors = Vec::new();
    let certs: Vec<CertificateDer<'static>> = match std::fs::read(&tls.cert_file) {
        Err(e) => {
            errors.push(FieldError::new(
                "server.tls.cert_file",
                format!("cannot read {:?}: {e}", tls.cert_file),
            ));
            Vec::new()
        }
        Ok(pem) => match CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>() {
            Ok(certs) if !certs.is_empty() => certs,
            Ok(_) => {
                errors.push(FieldError::new(
                    "server.tls.cert_file",
                    format!("{:?} holds no PEM certificate", tls.cert_file),
                ));
                Vec::new()
            }
            Err(e) => {
                errors.push(FieldError::new(
                    "server.tls.cert_file",
                    format!("{:?} is not a PEM certificate chain: {e}", tls.cert_file),
                ));
                Vec::new()
            }
        },
    };
    let key = match std::fs::read(&tls.key_file) {
        Err(e) => {
            errors.push(FieldError::new(
                "server.tls.key_file",
                format!("cannot read {:?}: {e}", tls.key_file),
            ));
            None
        }
        Ok(pem) => match PrivateKeyDer::from_pem_slice(&pem) {
            Ok(key) => Some(key),
            Err(e) => {
                errors.push(FieldError::new(
                    "server.tls.key_file",
                    format!("{:?} holds no PEM private key: {e}", tls.key_file),
                ));
                None
            }
        },
    };
    let (Some(key), false) = (key, certs.is_empty()) else {
        return Err(errors);
    };
    let signing = match provider().key_provider.load_private_key(key) {
        Ok(k) => k,
        Err(e) => {
            return Err(vec![FieldError::new(
                "server.tls.key_file",
                format!("{:?}: unusable private key: {e}", tls.key_file),
            )])
        }
    };
    let (serial, not_after) = leaf_facts(&certs[0]);
    let certified = CertifiedKey::new(certs, signing);
    if let Err(e) = certified.keys_match() {
        return Err(vec![FieldError::new(
            "server.tls.key_file",
            format!(
                "{:?} does not match the certificate in {:?}: {e}",
                tls.key_file, tls.cert_file
            ),
        )]);
    }
    Ok(LoadedCert {
        key: Arc::new(certified),
        serial,
        not_after,
    })
}

/// The serial number (hex) of a DER certificate; empty if it cannot be read.
pub fn certificate_serial(der: &[u8]) -> String {
    leaf_facts(&CertificateDer::from(der)).0
}

/// The serial (hex) and notAfter of a certificate, read from its DER.
fn leaf_facts(cert: &CertificateDer<'_>) -> (String, Option<SystemTime>) {
    use simple_asn1::ASN1Block as B;
    let Ok(blocks) = simple_asn1::from_der(cert.as_ref()) else {
        return (String::new(), None);
    };
    let Some(B::Sequence(_, outer)) = blocks.first() else {
        return (String::new(), None);
    };
    let Some(B::Sequence(_, tbs)) = outer.first() else {
        return (String::new(), None);
    };
    // TBSCertificate: [0] version (explicit, optional), serial, signature, issuer, validity...
    let rest: Vec<&B> = tbs
        .iter()
        .skip_while(|b| matches!(b, B::Explicit(..) | B::Unknown(..)))
        .collect();
    let serial = match rest.first() {
        Some(B::Integer(_, n)) => hex::encode(n.to_signed_bytes_be()),
        _ => String::new(),
    };
    let not_after = match rest.get(3) {
        Some(B::Sequence(_, validity)) => match validity.get(1) {
            Some(B::UTCTime(_, t)) | Some(B::GeneralizedTime(_, t)) => {
                let secs = t.assume_utc().unix_timestamp();
                u64::try_from(secs)
                    .ok()
                    .map(|s| UNIX_EPOCH + Duration::from_secs(s))
            }
            _ => None,
        },
        _ => None,
    };
    (serial, not_after)
}

/// The certificate served, replaced whole by a reload.
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
    serial: ArcSwap<String>,
}

/// Exports the served certificate's notAfter (`gateway_tls_certificate_expiry_timestamp_seconds`,
/// what the certificate-expiry alerts read); called wherever a certificate starts being served.
fn report_expiry(cert: &LoadedCert) {
    if let Some(secs) = cert
        .not_after
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
    {
        metrics::gauge!("gateway_tls_certificate_expiry_timestamp_seconds")
            .set(secs.as_secs() as f64);
    }
}

impl CertStore {
    pub fn new(cert: &LoadedCert) -> Arc<CertStore> {
        report_expiry(cert);
        Arc::new(CertStore {
            current: ArcSwap::new(cert.key.clone()),
            serial: ArcSwap::from_pointee(cert.serial.clone()),
        })
    }

    /// New handshakes present `cert` from now on; established connections keep theirs.
    pub fn replace(&self, cert: &LoadedCert) {
        report_expiry(cert);
        self.current.store(cert.key.clone());
        self.serial.store(Arc::new(cert.serial.clone()));
    }

    pub fn serial(&self) -> String {
        self.serial.load().to_string()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The rustls server configuration for the public listener.
pub fn server_config(
    tls: &TlsConfig,
    store: Arc<CertStore>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let versions: &[&'static rustls::SupportedProtocolVersion] = match tls.min_version.as_str() {
        "1.3" => &[&rustls::version::TLS13],
        _ => &[&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| format!("server.tls.min_version: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
