//! TLS to PostgreSQL, as libpq's parameters say, so that a managed database's connection string works
//! as its provider gives it: `sslmode` (`disable`, `allow`, `prefer` — the default —, `require`,
//! `verify-ca`, `verify-full`), `sslrootcert`, `sslcert` and `sslkey`. The files may also come from
//! CONVEYOR_PG_TLS_CA_FILE, _CERT_FILE and _KEY_FILE, like the broker's.
//!
//! The driver knows only `disable`, `prefer` and `require`, and no files: the parameters are taken out
//! of the connection string here, and the certificate check is the connector's
//! ([`conveyor_base::tls::ServerCheck`]). As in libpq, `prefer` and `require` do not check the
//! server's certificate unless a CA is given (then it must be signed by it, as with `verify-ca`).

use std::path::{Path, PathBuf};

use conveyor_base::SettingsError;
use conveyor_base::tls::{CaBundle, ClientIdentity, ServerCheck, client_config_checking};
use percent_encoding::percent_decode_str;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

pub(crate) const CA_SETTING: &str = "CONVEYOR_PG_TLS_CA_FILE";
const CERT_SETTING: &str = "CONVEYOR_PG_TLS_CERT_FILE";
const KEY_SETTING: &str = "CONVEYOR_PG_TLS_KEY_FILE";

/// The TLS files given besides the URL (flags or environment).
#[derive(Debug, Clone, Default)]
pub(crate) struct TlsFiles<'a> {
    pub ca: Option<&'a Path>,
    pub cert: Option<&'a Path>,
    pub key: Option<&'a Path>,
}

/// A connection string with its TLS parameters taken out, and what they ask for.
pub(crate) struct Encryption {
    /// The connection string for the driver, its `sslmode` one the driver knows.
    pub url: String,
    pub mode: SslMode,
    pub connector: MakeRustlsConnect,
    /// What is checked of the server's certificate, as the URL's `sslmode` said it: for logs.
    pub described: &'static str,
}

/// The libpq TLS parameters of a connection string.
#[derive(Debug, Default, PartialEq, Eq)]
struct TlsParams {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    sslcert: Option<String>,
    sslkey: Option<String>,
}

impl TlsParams {
    /// Keeps `value` if `key` is a TLS parameter; `false` for any other key.
    fn take(&mut self, key: &str, value: String) -> bool {
        let slot = match key {
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.sslrootcert,
            "sslcert" => &mut self.sslcert,
            "sslkey" => &mut self.sslkey,
            _ => return false,
        };
        *slot = Some(value);
        true
    }
}

/// Reads the TLS parameters of `url` and `files`: the driver's connection string and connector.
pub(crate) fn encryption(url: &str, files: &TlsFiles<'_>) -> Result<Encryption, SettingsError> {
    let (rest, params) = take_tls_params(url);
    let url_setting = |problem: String| SettingsError::new("CONVEYOR_PG_URL", problem);
    let (driver_mode, check, described) = match params.sslmode.as_deref().unwrap_or("prefer") {
        "disable" => (SslMode::Disable, ServerCheck::Nothing, "disable"),
        // The driver cannot try plain first: it tries TLS first, which asks no less.
        "allow" | "prefer" => (SslMode::Prefer, ServerCheck::Nothing, "prefer"),
        "require" => (SslMode::Require, ServerCheck::Nothing, "require"),
        "verify-ca" => (SslMode::Require, ServerCheck::Chain, "verify-ca"),
        "verify-full" => (SslMode::Require, ServerCheck::Full, "verify-full"),
        other => {
            return Err(url_setting(format!(
                "sslmode={other:?}: expected disable, allow, prefer, require, verify-ca or verify-full"
            )));
        }
    };
    // libpq's `sslrootcert=system` is the public roots alone, which every connection trusts.
    let root = params.sslrootcert.filter(|root| root != "system");
    let ca_path = one_path(CA_SETTING, files.ca, "sslrootcert", root)?;
    let cert_path = one_path(CERT_SETTING, files.cert, "sslcert", params.sslcert)?;
    let key_path = one_path(KEY_SETTING, files.key, "sslkey", params.sslkey)?;
    if driver_mode == SslMode::Disable
        && (ca_path.is_some() || cert_path.is_some() || key_path.is_some())
    {
        return Err(url_setting(
            "sslmode=disable, but TLS files are given (CONVEYOR_PG_TLS_* or sslrootcert, sslcert, sslkey): that connection would not be encrypted".into(),
        ));
    }
    let ca = CaBundle::load_optional(CA_SETTING, ca_path.as_deref())?;
    let identity = ClientIdentity::load_optional(
        (CERT_SETTING, cert_path.as_deref()),
        (KEY_SETTING, key_path.as_deref()),
    )?;
    let check = match check {
        ServerCheck::Nothing if ca.is_some() => ServerCheck::Chain,
        check => check,
    };
    let config = client_config_checking(ca.as_ref(), identity.as_ref(), check)
        .map_err(|err| SettingsError::new(CERT_SETTING, format!("unusable: {err}")))?;
    Ok(Encryption {
        url: rest,
        mode: driver_mode,
        connector: MakeRustlsConnect::new(config),
        described,
    })
}

/// The path of a TLS file given by the setting or by the URL's parameter: not both, unless equal.
fn one_path(
    setting: &str,
    given: Option<&Path>,
    parameter: &str,
    in_url: Option<String>,
) -> Result<Option<PathBuf>, SettingsError> {
    match (given, in_url) {
        (Some(given), Some(in_url)) if given != Path::new(&in_url) => Err(SettingsError::new(
            setting,
            format!("and the URL's {parameter} name different files: give one"),
        )),
        (Some(given), _) => Ok(Some(given.to_owned())),
        (None, in_url) => Ok(in_url.map(PathBuf::from)),
    }
}

/// Splits the TLS parameters off a connection string, a URL (`postgres://…?sslmode=…`) or key=value
/// pairs (`host=… sslmode=…`).
fn take_tls_params(url: &str) -> (String, TlsParams) {
    let mut params = TlsParams::default();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_owned(), params);
        };
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                let value = percent_decode_str(value).decode_utf8_lossy().into_owned();
                !params.take(key, value)
            })
            .collect();
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return (rest, params);
    }
    let kept: Vec<String> = key_values(url)
        .into_iter()
        .filter_map(|(key, value)| {
            (!params.take(&key, value.clone())).then(|| {
                let quoted = value.replace('\\', "\\\\").replace('\'', "\\'");
                format!("{key}='{quoted}'")
            })
        })
        .collect();
    (kept.join(" "), params)
}

/// The pairs of a key=value connection string: spaces around `=` allowed, values in single quotes
/// with `\` escapes.
fn key_values(text: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let key: String =
            std::iter::from_fn(|| chars.next_if(|c| *c != '=' && !c.is_whitespace())).collect();
        if key.is_empty() {
            break;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        chars.next_if_eq(&'=');
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            while let Some(c) = chars.next() {
                match c {
                    '\'' => break,
                    '\\' => value.extend(chars.next()),
                    c => value.push(c),
                }
            }
        } else {
            value.extend(std::iter::from_fn(|| chars.next_if(|c| !c.is_whitespace())));
        }
        pairs.push((key, value));
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_a_url_and_the_rest_kept() {
        let (rest, params) = take_tls_params(
            "postgres://u:p@db:5433/app?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        );
        assert_eq!(rest, "postgres://u:p@db:5433/app?application_name=x");
        assert_eq!(params.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(params.sslrootcert.as_deref(), Some("/etc/ca.pem"));
        let (rest, params) = take_tls_params("postgresql://db/app?sslmode=require");
        assert_eq!(rest, "postgresql://db/app");
        assert_eq!(params.sslmode.as_deref(), Some("require"));
        let (rest, _) = take_tls_params("postgres://db/app");
        assert_eq!(rest, "postgres://db/app");
    }

    #[test]
    fn tls_parameters_are_taken_out_of_key_value_pairs() {
        let (rest, params) = take_tls_params(
            "host=db port = 5433 sslmode=verify-ca password='it\\'s x' sslcert='/a b/c.pem'",
        );
        assert_eq!(params.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(params.sslcert.as_deref(), Some("/a b/c.pem"));
        let config: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(config.get_hosts().len(), 1);
        assert_eq!(config.get_ports(), [5433]);
        assert_eq!(config.get_password(), Some(&b"it's x"[..]));
        assert!(!rest.contains("sslmode"));
    }

    #[test]
    fn a_wrong_mode_or_files_without_encryption_are_refused_naming_the_setting() {
        let none = TlsFiles::default();
        let err = encryption("postgres://db/app?sslmode=verify", &none)
            .err()
            .unwrap();
        assert!(err.to_string().contains("expected disable, allow"), "{err}");
        let files = TlsFiles {
            ca: Some(Path::new("/etc/ca.pem")),
            ..TlsFiles::default()
        };
        let err = encryption("postgres://db/app?sslmode=disable", &files)
            .err()
            .unwrap();
        assert!(err.to_string().contains("would not be encrypted"), "{err}");
        let err = encryption("postgres://db/app?sslrootcert=/other.pem", &files)
            .err()
            .unwrap();
        assert!(err.to_string().contains(CA_SETTING), "{err}");
        let plain = encryption("postgres://db/app", &none).unwrap();
        assert_eq!(plain.mode, SslMode::Prefer);
        assert_eq!(plain.described, "prefer");
    }
}
