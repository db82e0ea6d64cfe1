//! The pipeline file's `[target]` for a PostgreSQL table (`kind = "postgres"`): the table, the
//! migrations that create it, and how database errors are classified. Where the database is comes
//! from the environment.

use std::path::{Path, PathBuf};

use conveyor_base::is_sql_identifier;
use serde::Deserialize;

/// Upsert into a PostgreSQL table created by the pipeline's migrations.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresTargetSpec {
    #[serde(default, rename = "kind")]
    pub(crate) _kind: super::Tag,
    /// The table (in the schema given by CONVEYOR_PG_SCHEMA).
    pub table: String,
    /// Directory of SQL migrations (`V1__name.sql`), relative to the pipeline file.
    pub migrations: PathBuf,
    /// How to treat database errors, overriding the built-in classification.
    #[serde(default)]
    pub errors: SqlErrorOverrides,
}

/// SQLSTATE codes (5 characters, e.g. `23505`) or classes (2 characters, e.g. `23`) to treat otherwise
/// than the PostgreSQL target's built-in classification. A code wins over a class.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlErrorOverrides {
    /// Retried later (with backoff, up to the attempt limit).
    #[serde(default)]
    pub transient: Vec<String>,
    /// Dead-lettered at once.
    #[serde(default)]
    pub permanent: Vec<String>,
}

impl PostgresTargetSpec {
    /// Checks the table name and the error codes, and that the migrations directory (made relative
    /// to `base`) exists: (field, problem).
    pub fn check(&mut self, base: &Path) -> Result<(), (String, String)> {
        let err = |field: &str, problem: String| Err((format!("target.{field}"), problem));
        for (list, codes) in [
            ("transient", &self.errors.transient),
            ("permanent", &self.errors.permanent),
        ] {
            if let Some(bad) = codes.iter().find(|code| {
                !matches!(code.len(), 2 | 5) || !code.bytes().all(|b| b.is_ascii_alphanumeric())
            }) {
                return err(
                    &format!("errors.{list}"),
                    format!(
                        "{bad:?} is not a SQLSTATE code (5 characters) or class (2 characters)"
                    ),
                );
            }
        }
        if !is_sql_identifier(&self.table) {
            return err(
                "table",
                "must be a plain SQL name (letters, digits, '_'; not starting with a digit)".into(),
            );
        }
        self.migrations = base.join(&self.migrations);
        if !self.migrations.is_dir() {
            return err(
                "migrations",
                format!("{} is not a directory", self.migrations.display()),
            );
        }
        Ok(())
    }
}
