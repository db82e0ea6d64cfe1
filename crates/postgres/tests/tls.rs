//! TLS to PostgreSQL as libpq's `sslmode` says, against a PostgreSQL server of the test's own that
//! takes TLS connections only, with a certificate of a test CA: `verify-full` with the private CA
//! (given by the setting or by the URL's `sslrootcert`), `verify-ca` to a host name the certificate
//! does not carry, `require` unchecked, a client certificate, and the refusals: an untrusted
//! certificate, a host name mismatch, no client certificate, and no TLS at all.

use std::path::PathBuf;

use conveyor_base::Secret;
use conveyor_harness::own_postgres::{CERT_ROLE, OwnPostgres};
use conveyor_harness::tls::TestPki;
use conveyor_postgres::{Database, PostgresArgs};

/// Settings for `url` with the TLS files given.
fn args(url: String, ca: Option<&PathBuf>, identity: Option<&TestPki>) -> PostgresArgs {
    PostgresArgs {
        pg_tls_ca_file: ca.cloned(),
        pg_tls_cert_file: identity.map(|pki| pki.client_cert_file.clone()),
        pg_tls_key_file: identity.map(|pki| pki.client_key_file.clone()),
        pg_pool_size: 1,
        ..PostgresArgs::at(Secret::new(url), "tls_check")
    }
}

/// Connects (pool and migrations), and asks the server whether the session is encrypted.
async fn encrypted(args: &PostgresArgs) -> Result<bool, String> {
    let database = Database::connect(args).map_err(|err| err.to_string())?;
    database
        .migrate("tls check", &[], "tls_check_history")
        .await
        .map_err(|err| err.to_string())?;
    let client = database.client().await.map_err(|err| err.to_string())?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|err| err.to_string())?;
    Ok(row.get(0))
}

async fn refused(args: &PostgresArgs) -> String {
    match encrypted(args).await {
        Ok(_) => panic!("connected, but should have been refused"),
        Err(err) => err,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_postgres_checks_what_sslmode_says() {
    let dir = std::env::temp_dir().join(format!("conveyor-pg-tls-{}", std::process::id()));
    let pki = TestPki::generate(&dir.join("pki")).unwrap();
    let stranger = TestPki::generate(&dir.join("stranger")).unwrap();
    let server = OwnPostgres::start_with_tls(&format!("tls-{}", std::process::id()), &pki)
        .await
        .unwrap_or_else(|err| panic!("the test's PostgreSQL starts: {err:#}"));
    let url = |user: &str, host: &str, params: &str| server.url(user, host, params);

    // verify-full with the private CA, by the setting or by the URL's sslrootcert.
    let ca = Some(&pki.ca_file);
    let full = url("postgres", "localhost", "sslmode=verify-full");
    assert_eq!(encrypted(&args(full.clone(), ca, None)).await, Ok(true));
    let in_url = url(
        "postgres",
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={}", pki.ca_file.display()),
    );
    assert_eq!(encrypted(&args(in_url, None, None)).await, Ok(true));

    // A certificate no trusted CA signed is refused, saying which setting trusts one.
    for untrusted in [None, Some(&stranger.ca_file)] {
        let err = refused(&args(full.clone(), untrusted, None)).await;
        // A stranger CA of the same name makes the signature wrong rather than the issuer unknown.
        assert!(
            (err.contains("unknown issuer") || err.contains("not signed by the trusted CA"))
                && err.contains("set CONVEYOR_PG_TLS_CA_FILE to the CA bundle that signed it"),
            "{err}"
        );
        assert!(err.contains(&format!("localhost:{}", server.port)), "{err}");
    }
    // 127.0.0.2 is not a name the certificate carries: verify-full refuses it, verify-ca does not.
    let other_name = |mode: &str| url("postgres", "127.0.0.2", &format!("sslmode={mode}"));
    let err = refused(&args(other_name("verify-full"), ca, None)).await;
    assert!(err.contains("not valid for the host name"), "{err}");
    assert_eq!(
        encrypted(&args(other_name("verify-ca"), ca, None)).await,
        Ok(true)
    );
    // require: encrypted, the certificate unchecked (unless a CA is given: then it must have signed it).
    assert_eq!(
        encrypted(&args(other_name("require"), None, None)).await,
        Ok(true)
    );
    let err = refused(&args(other_name("require"), Some(&stranger.ca_file), None)).await;
    assert!(err.contains("not signed by the trusted CA"), "{err}");
    // The default (prefer) takes TLS where the server offers it.
    assert_eq!(
        encrypted(&args(url("postgres", "localhost", ""), None, None)).await,
        Ok(true)
    );

    // The certificate role needs a client certificate the server's CA signed.
    let cert_user = url(CERT_ROLE, "localhost", "sslmode=verify-full");
    assert_eq!(
        encrypted(&args(cert_user.clone(), ca, Some(&pki))).await,
        Ok(true)
    );
    let err = refused(&args(cert_user.clone(), ca, None)).await;
    assert!(err.contains("certificate"), "{err}");
    let err = refused(&args(cert_user, ca, Some(&stranger))).await;
    assert!(err.contains("cannot connect"), "{err}");

    // The server takes no connection in the clear: the checks above all went through TLS.
    let err = refused(&args(
        url("postgres", "localhost", "sslmode=disable"),
        None,
        None,
    ))
    .await;
    assert!(err.contains("no pg_hba.conf entry"), "{err}");

    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}
