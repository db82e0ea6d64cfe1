//! TLS for every connection conveyor opens as a client: `amqps://` to RabbitMQ, HTTPS to the source
//! and to HTTP targets, and PostgreSQL.
//!
//! One policy everywhere: rustls with the ring provider; the trusted roots are Mozilla's (compiled in:
//! the container image has no system certificate store) plus, per connection, the certificates of a CA
//! bundle file the operator names (for a broker or an API with a private CA). Hostnames are always
//! verified, except where PostgreSQL's `sslmode` asks for less ([`ServerCheck`]). Files are read and
//! checked when a process starts, so a wrong path or a file that holds no certificate fails at once,
//! naming the setting.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::SettingsError;

/// The certificates of a CA bundle file (PEM), each checked to be usable as a trust anchor.
#[derive(Clone)]
pub struct CaBundle {
    pem: String,
    certs: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CaBundle({} certificates)", self.certs.len())
    }
}

impl CaBundle {
    /// Reads and checks the bundle `path`, given by the setting `setting` (named in every error).
    pub fn load(setting: &str, path: &Path) -> Result<Self, SettingsError> {
        let problem =
            |what: String| SettingsError::new(setting, format!("{}: {what}", path.display()));
        let pem = std::fs::read_to_string(path)
            .map_err(|err| problem(format!("cannot read it: {err}")))?;
        let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| problem(format!("not a PEM certificate bundle: {err}")))?;
        if certs.is_empty() {
            return Err(problem(
                "holds no certificate (expected PEM blocks \"-----BEGIN CERTIFICATE-----\")".into(),
            ));
        }
        let mut store = rustls::RootCertStore::empty();
        for (index, cert) in certs.iter().enumerate() {
            store.add(cert.clone()).map_err(|err| {
                problem(format!(
                    "certificate {} cannot be a trusted CA: {err}",
                    index + 1
                ))
            })?;
        }
        Ok(Self { pem, certs })
    }

    /// [`CaBundle::load`] when the setting is given.
    pub fn load_optional(
        setting: &str,
        path: Option<&Path>,
    ) -> Result<Option<Self>, SettingsError> {
        path.map(|path| Self::load(setting, path)).transpose()
    }

    /// [`CaBundle::load_optional`] for the HTTPS server at `url` (given by `url_setting`): a CA with an
    /// `http://` URL is refused, since the operator expects encryption that would not happen.
    pub fn load_for_https(
        setting: &str,
        path: Option<&Path>,
        url_setting: &str,
        url: &str,
    ) -> Result<Option<Self>, SettingsError> {
        if path.is_some() && !url.starts_with("https://") {
            return Err(SettingsError::new(
                url_setting,
                format!(
                    "{setting} is set, but the URL is not https://: that connection would not be encrypted"
                ),
            ));
        }
        Self::load_optional(setting, path)
    }

    /// The bundle as it was read (PEM).
    pub fn pem(&self) -> &str {
        &self.pem
    }
}

/// A client certificate (with its chain) and its private key, for servers that require mutual TLS.
/// The key is never printed.
#[derive(Clone)]
pub struct ClientIdentity {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientIdentity(***)")
    }
}

impl ClientIdentity {
    /// Reads and checks a certificate file and a key file (PEM; PKCS#8, PKCS#1 or SEC1 keys), each
    /// named by its setting in errors. Both or neither must be given.
    pub fn load_optional(
        (cert_setting, cert_path): (&str, Option<&Path>),
        (key_setting, key_path): (&str, Option<&Path>),
    ) -> Result<Option<Self>, SettingsError> {
        let (cert_path, key_path) = match (cert_path, key_path) {
            (None, None) => return Ok(None),
            (Some(_), None) => {
                return Err(SettingsError::new(
                    key_setting,
                    format!("required with {cert_setting} (the client certificate's private key)"),
                ));
            }
            (None, Some(_)) => {
                return Err(SettingsError::new(
                    cert_setting,
                    format!("required with {key_setting} (the key's client certificate)"),
                ));
            }
            (Some(cert), Some(key)) => (cert, key),
        };
        let read = |setting: &str, path: &Path| {
            std::fs::read(path).map_err(|err| {
                SettingsError::new(
                    setting,
                    format!("{}: cannot read it: {err}", path.display()),
                )
            })
        };
        let cert_pem = read(cert_setting, cert_path)?;
        let certs = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| {
                SettingsError::new(
                    cert_setting,
                    format!("{}: not a PEM certificate: {err}", cert_path.display()),
                )
            })?;
        if certs.is_empty() {
            return Err(SettingsError::new(
                cert_setting,
                format!("{}: holds no certificate", cert_path.display()),
            ));
        }
        let key_pem = read(key_setting, key_path)?;
        // The error says what is wrong with the file, never what is in it.
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|err| {
            SettingsError::new(
                key_setting,
                format!("{}: no usable PEM private key: {err}", key_path.display()),
            )
        })?;
        Ok(Some(Self { cert_pem, key_pem }))
    }

    /// The certificate chain (PEM).
    pub fn cert_pem(&self) -> &[u8] {
        &self.cert_pem
    }

    /// The private key (PEM): for the one place that hands it to the TLS library.
    pub fn key_pem(&self) -> &[u8] {
        &self.key_pem
    }
}

/// Mozilla's roots, parsed once per process.
fn public_roots() -> &'static rustls::RootCertStore {
    static ROOTS: OnceLock<rustls::RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().cloned());
        roots
    })
}

/// A rustls client configuration with the ring provider, trusting the public roots and `ca`.
pub(crate) fn client_config(ca: Option<&CaBundle>) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_root_certificates(trusted_roots(ca))
        .with_no_client_auth()
}

/// The public roots and the certificates of `ca`.
fn trusted_roots(ca: Option<&CaBundle>) -> rustls::RootCertStore {
    let mut roots = public_roots().clone();
    for cert in ca.map(|ca| ca.certs.as_slice()).unwrap_or_default() {
        // Each was checked by CaBundle::load.
        let _ = roots.add(cert.clone());
    }
    roots
}

/// How much of a server's certificate a connection checks: PostgreSQL's `sslmode` levels. HTTPS and
/// amqps connections always check it all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerCheck {
    /// Encrypted, the certificate unchecked (`sslmode=require` without a CA): safe from eavesdroppers,
    /// not from a server that pretends.
    Nothing,
    /// Signed by a trusted CA, whatever host it was made for (`verify-ca`).
    Chain,
    /// Signed by a trusted CA, for the host connected to (`verify-full`).
    Full,
}

/// A rustls client configuration with the ring provider that checks the server's certificate as
/// `check` says (against the public roots and `ca`), and presents `identity` when the server asks
/// for a client certificate.
pub fn client_config_checking(
    ca: Option<&CaBundle>,
    identity: Option<&ClientIdentity>,
    check: ServerCheck,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(trusted_roots(ca)),
        provider.clone(),
    )
    .build()
    .map_err(|err| rustls::Error::General(err.to_string()))?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PartialCheck { webpki, check }));
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some(identity) => {
            // Both were parsed when the files were loaded.
            let certs = CertificateDer::pem_slice_iter(identity.cert_pem())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|err| rustls::Error::General(err.to_string()))?;
            let key = PrivateKeyDer::from_pem_slice(identity.key_pem())
                .map_err(|err| rustls::Error::General(err.to_string()))?;
            builder.with_client_auth_cert(certs, key)
        }
    }
}

/// The standard verifier, with the parts of the certificate check that [`ServerCheck`] leaves out
/// skipped. The handshake's signatures are always verified.
#[derive(Debug)]
struct PartialCheck {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    check: ServerCheck,
}

impl rustls::client::danger::ServerCertVerifier for PartialCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        if self.check == ServerCheck::Nothing {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        }
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                NotValidForName | NotValidForNameContext { .. },
            )) if self.check == ServerCheck::Chain => {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            verified => verified,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// The start of every HTTP client conveyor builds: HTTPS trusts the public roots and `ca`. (reqwest
/// is built without a TLS provider of its own, so a client built any other way cannot be built.)
pub fn http_client(ca: Option<&CaBundle>) -> reqwest::ClientBuilder {
    reqwest::Client::builder().tls_backend_preconfigured(client_config(ca))
}

/// The TLS failure behind an error, if a handshake failed: a certificate no trusted CA vouches for,
/// a name it does not cover, a client certificate the server refused...
pub fn tls_failure<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // An io::Error's source() skips the error it wraps (often another io::Error): step into it.
        current = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

/// Whether the server of an `https://` URL can be trusted, asked once when a process starts, so that
/// a wrong CA setting stops it with a clear error instead of failing every call. Only a TLS failure is
/// an error here (its [`advice`]); a server that is down, or answers with any status, is left to the
/// retries of the calls themselves.
pub async fn check_server(
    client: &reqwest::Client,
    url: &str,
    ca_setting: &str,
) -> Result<(), String> {
    if !url.starts_with("https://") {
        return Ok(());
    }
    match client.head(url).send().await {
        Err(err) => match tls_failure(&err) {
            Some(failure) => Err(advice(failure, ca_setting)),
            None => Ok(()),
        },
        Ok(_) => Ok(()),
    }
}

/// An error with its causes, `outer: inner: innermost` (reqwest's own message leaves them out).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut current = err.source();
    while let Some(cause) = current {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        current = cause.source();
    }
    text
}

/// What an operator can do about a TLS failure, for error messages. `ca_setting` is the setting of
/// the connection's CA bundle.
pub fn advice(tls: &rustls::Error, ca_setting: &str) -> String {
    use rustls::CertificateError;
    match tls {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
            "TLS: the server's certificate is signed by an unknown issuer (set {ca_setting} to the CA bundle that signed it)"
        ),
        rustls::Error::InvalidCertificate(CertificateError::BadSignature) => format!(
            "TLS: the server's certificate is not signed by the trusted CA of its issuer's name (set {ca_setting} to the CA bundle that signed it)"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => "TLS: the server's certificate is not valid for the host name in the URL".to_owned(),
        other => format!("TLS: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("conveyor-tls-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_bundle_without_certificates_is_refused_naming_the_setting() {
        let path = temp_file("empty.pem", "not a certificate\n");
        let err = CaBundle::load("CONVEYOR_X_CA_FILE", &path).unwrap_err();
        assert!(err.to_string().contains("CONVEYOR_X_CA_FILE"), "{err}");
        assert!(err.to_string().contains("holds no certificate"), "{err}");
        let err =
            CaBundle::load("CONVEYOR_X_CA_FILE", Path::new("/nonexistent/ca.pem")).unwrap_err();
        assert!(err.to_string().contains("cannot read"), "{err}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_ca_for_a_plain_http_url_is_refused_naming_the_url_setting() {
        let ca = Some(Path::new("/nonexistent/ca.pem"));
        let err =
            CaBundle::load_for_https("X_CA_FILE", ca, "X_URL", "http://api.example").unwrap_err();
        assert!(err.to_string().contains("X_URL"), "{err}");
        assert!(
            err.to_string()
                .contains("X_CA_FILE is set, but the URL is not https://"),
            "{err}"
        );
        // With https://, the file itself is read (and here found missing).
        let err =
            CaBundle::load_for_https("X_CA_FILE", ca, "X_URL", "https://api.example").unwrap_err();
        assert!(err.to_string().contains("cannot read"), "{err}");
        assert!(
            CaBundle::load_for_https("X_CA_FILE", None, "X_URL", "http://api.example")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_key_without_its_certificate_is_refused() {
        let err =
            ClientIdentity::load_optional(("C", None), ("K", Some(Path::new("/k")))).unwrap_err();
        assert!(err.to_string().contains("setting C"), "{err}");
        assert!(
            ClientIdentity::load_optional(("C", None), ("K", None))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn an_http_client_builds_without_a_process_wide_provider() {
        http_client(None).build().unwrap();
    }
}
