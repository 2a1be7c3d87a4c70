//! DICOM over TLS (PS3.15 B.1, the BCP 195 profiles): the server side, on rustls with the ring
//! provider. TLS 1.2 and 1.3 with rustls' safe defaults (ECDHE key exchange, AES-GCM and
//! ChaCha20-Poly1305), which BCP 195 requires; with `client_ca`, every client must present a
//! certificate that chains to one of those CAs (mutual TLS), else the handshake fails and no
//! DICOM byte is read.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// Why the TLS listener cannot be set up; each names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("node.tls.{key} {path}: {why}")]
    File {
        key: &'static str,
        path: String,
        why: String,
    },
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |why: String| TlsError::File {
        key,
        path: path.display().to_string(),
        why,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

/// Builds the acceptor from `[node.tls]`.
pub fn acceptor(cfg: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let chain = certificates("cert", &cfg.cert)?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key).map_err(|e| TlsError::File {
        key: "key",
        path: cfg.key.display().to_string(),
        why: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = if cfg.client_ca.as_os_str().is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for ca in certificates("client_ca", &cfg.client_ca)? {
            roots.add(ca).map_err(|e| TlsError::File {
                key: "client_ca",
                path: cfg.client_ca.display().to_string(),
                why: e.to_string(),
            })?;
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Rustls(e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Rustls(format!("certificate and key: {e}")))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The names a client certificate goes by, to match `[peers.NAME] tls_names`: its DNS subject
/// alternative names (RFC 5280 §4.2.1.6), or, only when it has none, its subject's common names
/// (§4.1.2.6) — as RFC 6125 §6.4.4 has it, since a CA that checks and constrains SANs may copy
/// the CN from the request unchecked. Empty without a certificate, or for one that does not
/// parse (so no binding can match it). The certificate is the leaf rustls has already verified
/// against `client_ca`.
pub fn certificate_names(leaf: Option<&CertificateDer<'_>>) -> Vec<String> {
    use x509_cert::der::asn1::{Ia5StringRef, PrintableStringRef, Utf8StringRef};
    use x509_cert::der::Decode;
    use x509_cert::ext::pkix::name::GeneralName;
    use x509_cert::ext::pkix::SubjectAltName;
    let Some(der) = leaf else {
        return Vec::new();
    };
    let Ok(cert) = x509_cert::Certificate::from_der(der.as_ref()) else {
        return Vec::new();
    };
    let mut dns = Vec::new();
    if let Ok(Some((_, san))) = cert.tbs_certificate.get::<SubjectAltName>() {
        for name in san.0 {
            if let GeneralName::DnsName(name) = name {
                dns.push(name.to_string());
            }
        }
    }
    if !dns.is_empty() {
        return dns;
    }
    let mut names = Vec::new();
    for rdn in cert.tbs_certificate.subject.0.iter() {
        for atv in rdn.0.iter() {
            if atv.oid != x509_cert::der::oid::db::rfc4519::CN {
                continue;
            }
            let v = &atv.value;
            let text = v
                .decode_as::<Utf8StringRef<'_>>()
                .map(|s| s.to_string())
                .or_else(|_| {
                    v.decode_as::<PrintableStringRef<'_>>()
                        .map(|s| s.to_string())
                })
                .or_else(|_| v.decode_as::<Ia5StringRef<'_>>().map(|s| s.to_string()));
            if let Ok(t) = text {
                names.push(t);
            }
        }
    }
    names
}
