//! The PostgreSQL target: one upsert statement per batch into a table made by the pipeline's migrations.
//!
//! The batch travels as one JSON array parameter and `jsonb_populate_recordset` turns it into rows of the
//! table's own types, so exact decimals stay exact and RFC 3339 times become `timestamptz` without any
//! conversion code here. `ON CONFLICT (key) DO UPDATE ... WHERE old.version < new.version` makes the
//! write idempotent and keeps the newest version whatever order batches arrive in.

use std::path::Path;

use conveyor_base::Record;
use conveyor_pipeline::Pipeline;
use conveyor_pipeline::target::postgres::{PostgresTargetSpec, SqlErrorOverrides};
use conveyor_postgres::{Database, DatabaseError, quote};
use deadpool_postgres::Pool;
use serde_json::value::RawValue;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Json;

use super::{Target, WriteError, WriteReport, newest_per_id};

pub use conveyor_postgres::PostgresArgs;

/// Why the target could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Database(#[from] DatabaseError),
    #[error("migrations in {dir}: {message}")]
    Migrations { dir: String, message: String },
    #[error("table {table}: {problem}")]
    Table { table: String, problem: String },
}

/// What to write where.
#[derive(Debug, Clone)]
pub struct TableSpec {
    pub table: String,
    pub key: String,
    pub version: String,
    pub columns: Vec<String>,
}

impl TableSpec {
    /// The table of `pipeline`'s postgres target, with the mapping's columns.
    pub fn of(pipeline: &Pipeline, spec: &PostgresTargetSpec) -> Self {
        let mapping = &pipeline.mapping;
        Self {
            table: spec.table.clone(),
            key: mapping.key_field().to_owned(),
            version: mapping.version_field().to_owned(),
            columns: mapping.output_fields().map(str::to_owned).collect(),
        }
    }

    /// The mapped columns, quoted, comma-separated.
    pub fn column_list(&self) -> String {
        let columns: Vec<String> = self.columns.iter().map(|c| quote(c)).collect();
        columns.join(", ")
    }
}

pub struct PostgresTarget {
    pool: Pool,
    upsert: String,
    /// The upsert that also records the message's settlement, when the ledger lives in this
    /// database and schema.
    upsert_settling: Option<String>,
    pipeline: String,
    overrides: SqlErrorOverrides,
}

impl PostgresTarget {
    /// The target of `pipeline`'s `[target]` (a postgres one): its table with the mapping's columns.
    pub async fn open(
        pipeline: &Pipeline,
        spec: &PostgresTargetSpec,
        args: &PostgresArgs,
        ledger_home: Option<&str>,
    ) -> Result<Self, SetupError> {
        Self::connect(
            args,
            pipeline.name(),
            &spec.migrations,
            &TableSpec::of(pipeline, spec),
            spec.errors.clone(),
            ledger_home,
        )
        .await
    }

    /// Checks, changing nothing, that `pipeline`'s migrations make a table its mapping can be written
    /// to: in one transaction, they run in a scratch schema, the table is checked as a writer would,
    /// and everything is rolled back. What `conveyorctl check --pg-url` does.
    pub async fn dry_run(
        pipeline: &Pipeline,
        spec: &PostgresTargetSpec,
        args: &PostgresArgs,
    ) -> Result<(), SetupError> {
        let migrations = &spec.migrations;
        let loaded = load_migrations(migrations)?;
        let database = Database::connect(args)?;
        let mut client = database.own_client().await?;
        let transaction = client
            .transaction()
            .await
            .map_err(conveyor_postgres::failed("beginning the dry run"))?;
        let scratch = format!("conveyor_check_{}", uuid::Uuid::new_v4().simple());
        transaction
            .batch_execute(&format!(
                "CREATE SCHEMA {0}; SET LOCAL search_path TO {0}",
                quote(&scratch)
            ))
            .await
            .map_err(conveyor_postgres::failed("creating the scratch schema"))?;
        for migration in &loaded {
            transaction
                .batch_execute(migration.sql().unwrap_or_default())
                .await
                .map_err(|err| SetupError::Migrations {
                    dir: migrations.display().to_string(),
                    message: format!("{migration}: {}", conveyor_base::tls::error_chain(&err)),
                })?;
        }
        let checked = check_table(&transaction, &scratch, &TableSpec::of(pipeline, spec)).await;
        // Nothing of the dry run stays, whatever it found.
        let _ = transaction.rollback().await;
        checked.map_err(|err| match err {
            SetupError::Table { problem, .. } => SetupError::Table {
                table: spec.table.clone(),
                problem,
            },
            other => other,
        })
    }

    /// Connects, runs the pipeline's migrations (one writer at a time), checks the table against the
    /// mapping and prepares the upsert. When `ledger_home` (`host/db/schema`) is this database's,
    /// each batch's settlement is recorded in the upsert's own statement.
    pub async fn connect(
        args: &PostgresArgs,
        pipeline: &str,
        migrations: &Path,
        spec: &TableSpec,
        overrides: SqlErrorOverrides,
        ledger_home: Option<&str>,
    ) -> Result<Self, SetupError> {
        let database = Database::connect(args)?;
        let loaded = load_migrations(migrations)?;
        // Each pipeline keeps its own history, so that pipelines sharing a schema number migrations freely.
        let history = format!("conveyor_migrations_{}", pipeline.replace('-', "_"));
        database
            .migrate(
                &format!("of pipeline {pipeline} in {}", migrations.display()),
                &loaded,
                &history,
            )
            .await?;
        let client = database.client().await?;
        check_table(&client, &database.schema, spec).await?;
        let upsert = upsert_statement(spec);
        client
            .prepare(&upsert)
            .await
            .map_err(conveyor_postgres::failed(&format!(
                "preparing the upsert into {}",
                spec.table
            )))?;
        let home = format!("{}/{}", database.endpoint, database.schema);
        let upsert_settling = match ledger_home {
            Some(ledger) if ledger == home => {
                let statement = conveyor_ledger::with_settled_write(&upsert);
                client
                    .prepare(&statement)
                    .await
                    .map_err(conveyor_postgres::failed(&format!(
                        "preparing the upsert into {} with its ledger row",
                        spec.table
                    )))?;
                Some(statement)
            }
            _ => None,
        };
        tracing::info!(postgres = %database.endpoint, schema = database.schema, table = spec.table, ledger_in_same_commit = upsert_settling.is_some(), "postgres target ready");
        Ok(Self {
            pool: database.pool,
            upsert,
            upsert_settling,
            pipeline: pipeline.to_owned(),
            overrides,
        })
    }
}

impl PostgresTarget {
    /// Runs the upsert of a batch: with `settling`, the statement that also records the message
    /// `settling` names (then `$2` to `$4` are the pipeline, the message id and the record count).
    /// Within the batch, only the newest version of each id is sent, and rows go in id order so that
    /// concurrent writers lock rows in the same order.
    async fn upsert(
        &self,
        records: &[Record],
        settling: Option<(&str, &str)>,
    ) -> Result<WriteReport, WriteError> {
        let rows: Vec<&RawValue> = newest_per_id(records)
            .into_iter()
            .map(|record| &*record.data)
            .collect();
        let client = self
            .pool
            .get()
            .await
            .map_err(|err| WriteError::Unavailable(format!("no database connection: {err}")))?;
        let classify = |error| classify(error, &self.overrides);
        let statement = settling.map_or(self.upsert.as_str(), |(statement, _)| statement);
        let prepared = client.prepare_cached(statement).await.map_err(classify)?;
        let applied = match settling {
            None => client
                .execute(&prepared, &[&Json(&rows)])
                .await
                .map_err(classify)?,
            Some((_, message_id)) => {
                let total = records.len() as i64;
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
                    [&Json(&rows), &self.pipeline, &message_id, &total];
                let row = client
                    .query_one(&prepared, &params)
                    .await
                    .map_err(classify)?;
                row.get::<_, i64>(0).max(0) as u64
            }
        };
        Ok(WriteReport {
            applied,
            stale: records.len() as u64 - applied,
        })
    }
}

impl Target for PostgresTarget {
    /// Writes a batch in one statement.
    async fn write(&self, records: &[Record]) -> Result<WriteReport, WriteError> {
        self.upsert(records, None).await
    }

    /// The batch's upsert and its ledger row in one statement: both commit, or neither.
    async fn write_settling(
        &self,
        records: &[Record],
        message_id: &str,
    ) -> Option<Result<WriteReport, WriteError>> {
        let statement = self.upsert_settling.as_deref()?;
        Some(self.upsert(records, Some((statement, message_id))).await)
    }

    /// Whether the database answers.
    async fn ping(&self) -> bool {
        match self.pool.get().await {
            Ok(client) => client.simple_query("SELECT 1").await.is_ok(),
            Err(_) => false,
        }
    }
}

/// `INSERT ... SELECT FROM jsonb_populate_recordset ... ON CONFLICT (key) DO UPDATE ... WHERE newer`.
pub fn upsert_statement(spec: &TableSpec) -> String {
    let table = quote(&spec.table);
    let list = spec.column_list();
    format!(
        "INSERT INTO {table} ({list}) SELECT {list} FROM jsonb_populate_recordset(NULL::{table}, $1::jsonb) {}",
        merge_clause(spec)
    )
}

/// `ON CONFLICT (key) DO UPDATE SET ... WHERE` the stored version is older than the incoming one.
pub fn merge_clause(spec: &TableSpec) -> String {
    let table = quote(&spec.table);
    let updates = spec
        .columns
        .iter()
        .filter(|column| **column != spec.key)
        .map(|column| format!("{c} = EXCLUDED.{c}", c = quote(column)))
        .collect::<Vec<_>>()
        .join(", ");
    let version = quote(&spec.version);
    format!(
        "ON CONFLICT ({key}) DO UPDATE SET {updates} \
         WHERE {table}.{version} IS NULL OR {table}.{version} < EXCLUDED.{version}",
        key = quote(&spec.key),
    )
}

/// Sorts a database error: unavailable (the database cannot be reached at all), transient (try this
/// write again later) or permanent (the data is at fault). The pipeline file's overrides come first.
fn classify(error: tokio_postgres::Error, overrides: &SqlErrorOverrides) -> WriteError {
    let message = match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => error.to_string(),
    };
    let Some(code) = error.code() else {
        // No SQL state: the connection broke, was refused or timed out.
        return WriteError::Unavailable(message);
    };
    match class_of(code.code(), overrides) {
        SqlClass::Unavailable => WriteError::Unavailable(message),
        SqlClass::Transient => WriteError::Transient(message),
        SqlClass::Permanent => WriteError::Permanent(message),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SqlClass {
    Unavailable,
    Transient,
    Permanent,
}

/// The class of a SQLSTATE: an override naming the code, then one naming its class, then the defaults.
fn class_of(code: &str, overrides: &SqlErrorOverrides) -> SqlClass {
    let class = &code[..2.min(code.len())];
    for candidate in [code, class] {
        if overrides.permanent.iter().any(|c| c == candidate) {
            return SqlClass::Permanent;
        }
        if overrides.transient.iter().any(|c| c == candidate) {
            return SqlClass::Transient;
        }
    }
    let transient = [
        SqlState::T_R_SERIALIZATION_FAILURE,
        SqlState::T_R_DEADLOCK_DETECTED,
        SqlState::LOCK_NOT_AVAILABLE,
        SqlState::QUERY_CANCELED,
    ];
    // 08 connection exceptions, 53 insufficient resources (e.g. too many connections), 57P01–57P03
    // the server shutting down or starting, 58 system errors.
    if matches!(class, "08" | "53" | "58") || matches!(code, "57P01" | "57P02" | "57P03") {
        SqlClass::Unavailable
    } else if class == "40" || transient.iter().any(|state| state.code() == code) {
        SqlClass::Transient
    } else {
        SqlClass::Permanent
    }
}

/// The SQL migrations in `dir`, as refinery reads them.
fn load_migrations(dir: &Path) -> Result<Vec<refinery::Migration>, SetupError> {
    refinery::load_sql_migrations(dir).map_err(|err| SetupError::Migrations {
        dir: dir.display().to_string(),
        message: err.to_string(),
    })
}

/// Checks that the table has every mapped column and a unique index on the key alone.
async fn check_table(
    client: &impl deadpool_postgres::GenericClient,
    schema: &str,
    spec: &TableSpec,
) -> Result<(), SetupError> {
    let problem = |problem: String| SetupError::Table {
        table: format!("{schema}.{}", spec.table),
        problem,
    };
    let rows = client
        .query(
            "SELECT column_name::text FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2",
            &[&schema, &spec.table],
        )
        .await
        .map_err(conveyor_postgres::failed("reading the table's columns"))?;
    if rows.is_empty() {
        return Err(problem(
            "does not exist; create it in the pipeline's migrations".into(),
        ));
    }
    let existing: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
    let missing: Vec<&String> = spec
        .columns
        .iter()
        .filter(|c| !existing.contains(c))
        .collect();
    if !missing.is_empty() {
        return Err(problem(format!(
            "has no column for the mapped field(s) {missing:?}; add them in a migration"
        )));
    }
    let unique = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
             WHERE i.indrelid = format('%I.%I', $1::text, $2::text)::regclass AND i.indisunique AND i.indnkeyatts = 1 AND a.attname = $3)",
            &[&schema, &spec.table, &spec.key],
        )
        .await
        .map_err(conveyor_postgres::failed("reading the table's indexes"))?;
    if !unique.get::<_, bool>(0) {
        return Err(problem(format!(
            "needs a primary key or unique index on {:?} alone (the pipeline's transform.key)",
            spec.key
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_errors_are_classified_with_overrides_first() {
        let none = SqlErrorOverrides::default();
        assert_eq!(class_of("08006", &none), SqlClass::Unavailable);
        assert_eq!(class_of("57P01", &none), SqlClass::Unavailable);
        assert_eq!(class_of("40001", &none), SqlClass::Transient);
        assert_eq!(class_of("55P03", &none), SqlClass::Transient);
        assert_eq!(class_of("23502", &none), SqlClass::Permanent);
        assert_eq!(class_of("22P02", &none), SqlClass::Permanent);
        let overrides = SqlErrorOverrides {
            transient: vec!["23".into()],
            permanent: vec!["23505".into(), "40P01".into()],
        };
        assert_eq!(class_of("23502", &overrides), SqlClass::Transient);
        assert_eq!(class_of("23505", &overrides), SqlClass::Permanent);
        assert_eq!(class_of("40P01", &overrides), SqlClass::Permanent);
    }

    #[test]
    fn upsert_keeps_the_newest_version() {
        let statement = upsert_statement(&TableSpec {
            table: "orders".into(),
            key: "id".into(),
            version: "modify_time".into(),
            columns: vec!["id".into(), "modify_time".into(), "total".into()],
        });
        assert_eq!(
            statement,
            "INSERT INTO \"orders\" (\"id\", \"modify_time\", \"total\") SELECT \"id\", \"modify_time\", \"total\" \
             FROM jsonb_populate_recordset(NULL::\"orders\", $1::jsonb) ON CONFLICT (\"id\") DO UPDATE SET \
             \"modify_time\" = EXCLUDED.\"modify_time\", \"total\" = EXCLUDED.\"total\" \
             WHERE \"orders\".\"modify_time\" IS NULL OR \"orders\".\"modify_time\" < EXCLUDED.\"modify_time\""
        );
    }
}
