//! The pipeline file's `[target]` for a JSON write API (`kind = "http"`): paths, method, headers, body
//! shape, limits, authentication and the id check. The base URL and every secret come from the
//! environment, never from the file.

use std::collections::BTreeMap;

use serde::Deserialize;

/// A generic JSON write API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTargetSpec {
    /// Path of the write endpoint, appended to CONVEYOR_HTTP_TARGET_URL.
    pub path: String,
    /// Method of writes.
    #[serde(default = "default_post")]
    pub method: String,
    /// Extra headers of every call (no secrets: those come from the environment through `auth`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// One record per call (a JSON object), or a batch per call (a JSON array).
    #[serde(default)]
    pub body: BodyShape,
    /// Most records in one batch call.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Time allowed for one call, connecting included.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Calls in flight at once, per writer process.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    #[serde(default)]
    pub auth: AuthSpec,
    #[serde(default)]
    pub id_check: IdCheckSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BodyShape {
    Record,
    #[default]
    Batch,
}

/// How calls authenticate.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthSpec {
    #[default]
    None,
    /// `Authorization: Bearer` with a fixed token from CONVEYOR_HTTP_TARGET_TOKEN (or `_FILE`).
    Bearer,
    /// OAuth2 client credentials: a token from this endpoint (path on the target), cached until shortly
    /// before it expires and fetched again after a 401. The client id and secret come from
    /// CONVEYOR_HTTP_TARGET_CLIENT_ID and CONVEYOR_HTTP_TARGET_CLIENT_SECRET (or `_FILE`).
    TokenEndpoint { path: String },
}

/// The id check (idCheck): how a write avoids doubling a record that the target already holds.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum IdCheckSpec {
    /// The target upserts by key (a 409 "already exists" counts as written).
    #[default]
    Upsert,
    /// Each call carries a header with the record's key and version; the target drops repeats.
    IdempotencyKey {
        #[serde(default = "default_idempotency_header")]
        header: String,
    },
    /// Ask first: GET `path` (with `{key}`) answers 200 if the record exists, 404 if not. New records
    /// are written; existing ones are skipped, or updated when `on_exists = "update"` (with
    /// `update_method` on `update_path`) unless the target's copy is as new (its `version` field).
    Exists {
        path: String,
        #[serde(default)]
        on_exists: OnExists,
        #[serde(default = "default_put")]
        update_method: String,
        /// Path of updates, with `{key}`; the existence path if omitted.
        update_path: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExists {
    #[default]
    Skip,
    Update,
}

fn default_post() -> String {
    "POST".into()
}
fn default_put() -> String {
    "PUT".into()
}
fn default_batch_size() -> usize {
    200
}
fn default_timeout() -> u64 {
    10
}
fn default_concurrency() -> usize {
    8
}
fn default_idempotency_header() -> String {
    "Idempotency-Key".into()
}

/// Header names that carry credentials: they must come from the environment.
const SECRET_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-api-key",
];

impl HttpTargetSpec {
    /// Checks what can be checked without a network: (field under `target.`, problem).
    pub fn check(&self) -> Result<(), (String, String)> {
        let err = |field: &str, problem: &str| Err((format!("target.{field}"), problem.to_owned()));
        if !self.path.starts_with('/') {
            return err(
                "path",
                "must start with '/' (the base URL is CONVEYOR_HTTP_TARGET_URL)",
            );
        }
        for (field, method) in [("method", &self.method)] {
            if !matches!(method.as_str(), "POST" | "PUT" | "PATCH") {
                return err(field, "must be POST, PUT or PATCH");
            }
        }
        for name in self.headers.keys() {
            if SECRET_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                return err(
                    "headers",
                    "credentials do not belong in the pipeline file: use target.auth and the environment",
                );
            }
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return err("headers", "header names are letters, digits, '-' and '_'");
            }
        }
        if !(1..=10_000).contains(&self.batch_size) {
            return err("batch_size", "must be 1 to 10000");
        }
        if !(1..=600).contains(&self.timeout_secs) {
            return err("timeout_secs", "must be 1 to 600");
        }
        if !(1..=1024).contains(&self.concurrency) {
            return err("concurrency", "must be 1 to 1024");
        }
        if let AuthSpec::TokenEndpoint { path } = &self.auth
            && !path.starts_with('/')
        {
            return err("auth.path", "must start with '/'");
        }
        match &self.id_check {
            IdCheckSpec::Upsert => {}
            IdCheckSpec::IdempotencyKey { header } => {
                if self.body != BodyShape::Record {
                    return err(
                        "id_check.mode",
                        "an idempotency key names one record: it needs body = \"record\"",
                    );
                }
                if header.is_empty() {
                    return err("id_check.header", "must not be empty");
                }
            }
            IdCheckSpec::Exists {
                path,
                update_method,
                update_path,
                ..
            } => {
                if !path.starts_with('/') || !path.contains("{key}") {
                    return err("id_check.path", "must start with '/' and contain {key}");
                }
                if update_path
                    .as_ref()
                    .is_some_and(|update| !update.starts_with('/') || !update.contains("{key}"))
                {
                    return err(
                        "id_check.update_path",
                        "must start with '/' and contain {key}",
                    );
                }
                if !matches!(update_method.as_str(), "POST" | "PUT" | "PATCH") {
                    return err("id_check.update_method", "must be POST, PUT or PATCH");
                }
            }
        }
        Ok(())
    }
}
