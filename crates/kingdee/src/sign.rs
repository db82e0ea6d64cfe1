//! Request signing exactly as Kingdee's gateway SDK does it (X-Api-Auth-Version 2.0), and the
//! app_signature of the token call.
//!
//! The canonical query encodes values twice — once as Java's `URLEncoder` does (FORM), then again with
//! the gateway's own rules (ENC) — and the differences between the two (space, `*`, `~`) are where
//! hand-rolled clients go wrong. Every vector in `tests/signature-vectors.json` reproduces.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use sha2::Sha256;

/// ENC keeps `A-Z a-z 0-9 - _ . ~` (space is handled apart).
const ENC_KEEP: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
/// FORM (Java's URLEncoder) keeps `A-Z a-z 0-9 . - * _` (space is handled apart).
const FORM_KEEP: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'.')
    .remove(b'-')
    .remove(b'*')
    .remove(b'_');

/// Percent-encodes UTF-8 with upper-case hex, keeping `keep`, writing a space as `+`. A literal `%20`
/// cannot appear in the output otherwise (`%` itself becomes `%25`), so the replacement is exact.
fn encode(text: &str, keep: &'static AsciiSet) -> String {
    utf8_percent_encode(text, keep)
        .to_string()
        .replace("%20", "+")
}

/// The gateway's encoding (ENC): paths and the second pass over query pairs.
pub(crate) fn gateway_encode(text: &str) -> String {
    encode(text, ENC_KEEP)
}

/// Java's `URLEncoder.encode(text, UTF-8)` (FORM): the first pass over query values.
pub(crate) fn form_encode(text: &str) -> String {
    encode(text, FORM_KEEP)
}

/// The canonical query of decoded `(key, value)` pairs, as the gateway rebuilds it.
pub fn canonical_query<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> String {
    let mut texts: Vec<String> = pairs
        .iter()
        .filter(|(key, _)| !key.as_ref().is_empty())
        .map(|(key, value)| {
            format!(
                "{}={}",
                gateway_encode(key.as_ref()),
                form_encode(value.as_ref())
            )
        })
        .collect();
    texts.sort();
    texts
        .iter()
        .map(|text| {
            let (key, value) = text.split_once('=').expect("each text was built with '='");
            format!("{}={}", gateway_encode(key), gateway_encode(value))
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Everything that goes into a request signature.
#[derive(Debug, Clone, Copy)]
pub struct SignatureInput<'a, K, V> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a [(K, V)],
    pub nonce: &'a str,
    pub timestamp: &'a str,
}

impl<K: AsRef<str>, V: AsRef<str>> SignatureInput<'_, K, V> {
    /// The text that is signed: each part followed by a newline, the last one too.
    pub fn string_to_sign(&self) -> String {
        format!(
            "{}\n{}\n{}\nx-api-nonce:{}\nx-api-timestamp:{}\n",
            self.method.to_ascii_uppercase(),
            gateway_encode(self.path),
            canonical_query(self.query),
            self.nonce,
            self.timestamp
        )
    }

    /// `X-Api-Signature`, signed with the app's client_secret.
    pub fn signature(&self, client_secret: &str) -> String {
        hmac_hex_base64(client_secret, &self.string_to_sign())
    }
}

/// `base64(lowercase_hex(HMAC_SHA256(key, message)))`: the gateway's signature format.
pub(crate) fn hmac_hex_base64(key: &str, message: &str) -> String {
    BASE64.encode(hmac_hex(key, message))
}

/// Lower-case hex of `HMAC_SHA256(key, message)`.
pub fn hmac_hex(key: &str, message: &str) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(message.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The `app_signature` of the token call: the app_key signed with the account set's app_secret.
pub fn app_signature(app_key: &str, app_secret: &str) -> String {
    hmac_hex_base64(app_secret, app_key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_differ_where_the_sdk_says() {
        assert_eq!(gateway_encode("/a b*~"), "%2Fa+b%2A~");
        assert_eq!(form_encode("/a b*~"), "%2Fa+b*%7E");
    }

    #[test]
    fn canonical_query_encodes_values_twice() {
        let pairs = [("b", "x=y/z"), ("a", "客户 *~"), ("", "dropped")];
        assert_eq!(
            canonical_query(&pairs),
            "a=%25E5%25AE%25A2%25E6%2588%25B7%2B%2A%257E&b=x%253Dy%252Fz"
        );
    }

    #[test]
    fn pairs_sort_by_their_encoded_text() {
        // "a=2" sorts before "a_b=1" because '=' (0x3D) is below '_' (0x5F).
        let pairs = [("a_b", "1"), ("a", "2")];
        assert_eq!(canonical_query(&pairs), "a=2&a_b=1");
    }
}
