//! TLS for tests: a throwaway certificate authority made at test time, and a TLS-terminating proxy that
//! puts HTTPS (or amqps) in front of a plain service such as a simulator.
//!
//! The CA signs a server certificate for `localhost` and `127.0.0.1` and a client certificate (for
//! mutual TLS); every file is PEM, in a directory of the test's own. Nothing here is trusted by anything
//! but the processes a test points at it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};

/// The files of a test CA, a server certificate and a client certificate.
#[derive(Debug, Clone)]
pub struct TestPki {
    pub dir: PathBuf,
    /// The CA's certificate: what clients must trust.
    pub ca_file: PathBuf,
    /// Server certificate for `localhost` and `127.0.0.1`, and its key.
    pub server_cert_file: PathBuf,
    pub server_key_file: PathBuf,
    /// Client certificate (for mutual TLS) and its key.
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
}

impl TestPki {
    /// Makes a fresh CA and certificates in `dir` (created if missing).
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "conveyor test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, cn: &str| {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(names)?;
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![usage];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            let cert = params.signed_by(&key, &ca)?;
            anyhow::Ok((cert.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) = leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "localhost",
        )?;
        let (client_cert, client_key) = leaf(
            vec!["conveyor-worker".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
            "conveyor-worker",
        )?;

        let pki = Self {
            dir: dir.to_owned(),
            ca_file: dir.join("ca.pem"),
            server_cert_file: dir.join("server.pem"),
            server_key_file: dir.join("server-key.pem"),
            client_cert_file: dir.join("client.pem"),
            client_key_file: dir.join("client-key.pem"),
        };
        std::fs::write(&pki.ca_file, ca.pem())?;
        std::fs::write(&pki.server_cert_file, server_cert)?;
        std::fs::write(&pki.server_key_file, server_key)?;
        std::fs::write(&pki.client_cert_file, client_cert)?;
        std::fs::write(&pki.client_key_file, client_key)?;
        Ok(pki)
    }

    /// A rustls server configuration with the server certificate (no client certificate asked for).
    pub fn server_config(&self) -> anyhow::Result<rustls::ServerConfig> {
        let certs = CertificateDer::pem_file_iter(&self.server_cert_file)?
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(&self.server_key_file)?;
        Ok(rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?)
    }
}

/// Terminates TLS on a loopback port and forwards the plain bytes to `upstream`.
pub struct TlsProxy {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TlsProxy {
    pub async fn start(upstream: SocketAddr, pki: &TestPki) -> anyhow::Result<Self> {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
            pki.server_config()
                .context("the test PKI's server certificate")?,
        ));
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A client that refuses the certificate ends here: that is what some tests want.
                    let Ok(mut client) = acceptor.accept(client).await else {
                        return;
                    };
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        Ok(Self { addr, task })
    }

    /// The TLS address; its certificate is valid for `localhost` and `127.0.0.1`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_client_without_the_ca_sees_an_unknown_issuer() {
        let dir = std::env::temp_dir().join(format!("conveyor-pki-test-{}", std::process::id()));
        let pki = TestPki::generate(&dir).unwrap();
        let upstream = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let proxy = TlsProxy::start(upstream.local_addr().unwrap(), &pki)
            .await
            .unwrap();
        let url = format!("https://localhost:{}/", proxy.addr().port());
        let client = conveyor_base::tls::http_client(None).build().unwrap();
        let err = client.head(&url).send().await.unwrap_err();
        let failure = conveyor_base::tls::tls_failure(&err);
        assert!(
            failure.is_some(),
            "{}",
            conveyor_base::tls::error_chain(&err)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
