//! The pipeline file's `[target]` for a JSON write API (`kind = "http"`): paths, method, headers, body
//! shape, limits, authentication and the id check. The base URL and every secret come from the
//! environment, never from the file.

use std::collections::BTreeMap;

use serde::Deserialize;

/// A generic JSON write API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTargetSpec {
    #[serde(default, rename = "kind")]
    pub(crate) _kind: super::Tag,
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
    /// How the target's answers are classified, overriding the built-in classes, and when a target
    /// failing call after call counts as down.
    #[serde(default)]
    pub errors: HttpErrorOverrides,
}

/// `[target.errors]` of an HTTP target: HTTP statuses (400 to 599) to treat otherwise than the built-in
/// classification, and the breaker's threshold.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpErrorOverrides {
    /// Statuses retried later (with backoff, up to the attempt limit), e.g. a 404 of a target that
    /// learns of referenced records a little later.
    #[serde(default)]
    pub transient: Vec<u16>,
    /// Statuses that dead-letter the record at once, e.g. a 500 a target answers for records it chokes
    /// on. A 409 listed in either list no longer counts as "already exists".
    #[serde(default)]
    pub permanent: Vec<u16>,
    /// Calls in a row that get no answer (refused, timed out) or one saying that the service is
    /// unavailable (429, 502, 503, 504), after which the target counts as down: the writer's circuit
    /// breaker then holds back all writes until the target answers again.
    #[serde(default = "default_unavailable_after")]
    pub unavailable_after: u32,
}

impl Default for HttpErrorOverrides {
    fn default() -> Self {
        Self {
            transient: Vec::new(),
            permanent: Vec::new(),
            unavailable_after: default_unavailable_after(),
        }
    }
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
fn default_unavailable_after() -> u32 {
    5
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
        let errors = &self.errors;
        for (list, statuses) in [
            ("transient", &errors.transient),
            ("permanent", &errors.permanent),
        ] {
            if let Some(bad) = statuses.iter().find(|s| !(400..=599).contains(*s)) {
                return Err((
                    format!("target.errors.{list}"),
                    format!("{bad} is not an HTTP error status (400 to 599)"),
                ));
            }
        }
        if let Some(both) = errors
            .transient
            .iter()
            .find(|status| errors.permanent.contains(status))
        {
            return Err((
                "target.errors.permanent".into(),
                format!("{both} is also listed as transient"),
            ));
        }
        if !(1..=1000).contains(&errors.unavailable_after) {
            return err("errors.unavailable_after", "must be 1 to 1000");
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::{Pipeline, PipelineError, TargetSpec};

    const LINES: &str = include_str!("../../../../ops/pipelines/sales_order_lines_http.toml");

    fn with_errors(errors: &str) -> Result<Pipeline, PipelineError> {
        let text = format!("{LINES}\n[target.errors]\n{errors}\n");
        Pipeline::parse(Path::new("ops/pipelines/lines.toml"), &text)
    }

    #[test]
    fn status_overrides_load_and_bad_ones_are_named() {
        let pipeline =
            with_errors("transient = [404, 409]\npermanent = [500]\nunavailable_after = 3")
                .unwrap();
        let TargetSpec::Http(spec) = &pipeline.spec.target else {
            panic!("an http target");
        };
        assert_eq!(spec.errors.transient, [404, 409]);
        assert_eq!(spec.errors.permanent, [500]);
        assert_eq!(spec.errors.unavailable_after, 3);
        let TargetSpec::Http(spec) = with_errors("").unwrap().spec.target else {
            panic!("an http target");
        };
        assert!(spec.errors.transient.is_empty() && spec.errors.permanent.is_empty());
        assert_eq!(spec.errors.unavailable_after, 5);

        for (errors, field, problem) in [
            (
                "transient = [200]",
                "target.errors.transient",
                "200 is not an HTTP error status",
            ),
            (
                "permanent = [404, 99]",
                "target.errors.permanent",
                "99 is not an HTTP error status",
            ),
            (
                "transient = [503]\npermanent = [503]",
                "target.errors.permanent",
                "503 is also listed as transient",
            ),
            (
                "unavailable_after = 0",
                "target.errors.unavailable_after",
                "1 to 1000",
            ),
            (
                "transient = [\"5xx\"]",
                "target.errors.transient[0]",
                "invalid type",
            ),
            (
                "retry = [503]",
                "target.errors.retry",
                "unknown field `retry`",
            ),
        ] {
            let err = with_errors(errors).unwrap_err();
            let message = err.to_string();
            assert_eq!(err.field, field, "{message}");
            assert!(
                message.starts_with("pipeline file ops/pipelines/lines.toml: "),
                "{message}"
            );
            assert!(message.contains(problem), "{message}");
        }
    }
}
