//! Every signature vector from Kingdee's documentation and from running Kingdee's own Java SDK must
//! reproduce.

use conveyor_kingdee::sign::{SignatureInput, app_signature, canonical_query, hmac_hex};
use serde_json::Value;

fn vectors() -> Value {
    let text = include_str!("signature-vectors.json");
    serde_json::from_str(text).expect("the vector file is JSON")
}

fn text<'a>(value: &'a Value, field: &str) -> &'a str {
    value[field]
        .as_str()
        .unwrap_or_else(|| panic!("vector field {field} is text"))
}

#[test]
fn request_signatures_reproduce() {
    let vectors = vectors();
    let cases = vectors["request_signatures"].as_array().unwrap();
    assert!(cases.len() >= 3);
    for case in cases {
        let name = text(case, "name");
        let query: Vec<(String, String)> = case["query"]
            .as_array()
            .unwrap()
            .iter()
            .map(|pair| {
                (
                    pair[0].as_str().unwrap().to_owned(),
                    pair[1].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let input = SignatureInput {
            method: text(case, "method"),
            path: text(case, "path"),
            query: &query,
            nonce: text(case, "nonce"),
            timestamp: text(case, "timestamp"),
        };
        if let Some(expected) = case["canonical_query"].as_str() {
            assert_eq!(canonical_query(&query), expected, "{name}: canonical query");
        }
        if let Some(expected) = case["string_to_sign"].as_str() {
            assert_eq!(input.string_to_sign(), expected, "{name}: string to sign");
        }
        let secret = text(case, "client_secret");
        if let Some(expected) = case["hmac_hex"].as_str() {
            assert_eq!(
                hmac_hex(secret, &input.string_to_sign()),
                expected,
                "{name}: hmac"
            );
        }
        assert_eq!(
            input.signature(secret),
            text(case, "signature"),
            "{name}: signature"
        );
    }
}

#[test]
fn app_signatures_reproduce() {
    let vectors = vectors();
    for case in vectors["app_signatures"].as_array().unwrap() {
        let signature = app_signature(text(case, "app_key"), text(case, "app_secret"));
        assert_eq!(
            hmac_hex(text(case, "app_secret"), text(case, "app_key")),
            text(case, "hmac_hex")
        );
        assert_eq!(
            signature,
            text(case, "app_signature"),
            "{}",
            text(case, "name")
        );
        assert_eq!(signature.len(), 88);
    }
}
