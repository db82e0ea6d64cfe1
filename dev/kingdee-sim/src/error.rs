//! How the API reports a business error, and reading the query string.

use axum::Json;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// A business error the way the API reports one: HTTP 200 with a non-zero errcode.
#[derive(Debug)]
pub(crate) struct BusinessError {
    pub(crate) errcode: u64,
    pub(crate) description: String,
}

pub(crate) fn business_error(errcode: u64, description: String) -> BusinessError {
    BusinessError {
        errcode,
        description,
    }
}

impl IntoResponse for BusinessError {
    fn into_response(self) -> Response {
        Json(json!({"errcode": self.errcode, "description": self.description, "data": null}))
            .into_response()
    }
}

pub(crate) fn query_value<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
        .filter(|value| !value.is_empty())
}
