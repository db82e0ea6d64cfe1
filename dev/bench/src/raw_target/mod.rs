//! The raw target ceilings of `bench pipeline`: the run's rows upserted again, into fresh tables made by
//! the pipeline's migrations, by plain SQL on tokio-postgres: no broker, no ledger, no writer. Each
//! method runs on the connections it is given (the run's writers × their pool: each its share of the
//! batches), in batches of one message's records, all inserts as in the run.
//!
//! - **jsonb statement**: `INSERT ... SELECT FROM jsonb_populate_recordset($1) ON CONFLICT ... WHERE
//!   newer`, one autocommitted statement per batch: the writer's own statement.
//! - **COPY then merge**: per batch one transaction: `COPY` into a temporary table ([`copy`]), then
//!   `INSERT ... SELECT ... ON CONFLICT ... WHERE newer` from it. Measured here: slower than the jsonb
//!   statement at one message's 100 records (its five round trips), even at 1,000 (see
//!   docs/benchmarks.md).

mod copy;

use std::time::Instant;

use anyhow::bail;
use bytes::Bytes;
use conveyor_harness::{Scenario, pg_client};
use conveyor_pipeline::TargetSpec;
use conveyor_postgres::{Database, PostgresArgs, quote};
use conveyor_writer::target::postgres::{
    PostgresTarget, TableSpec, merge_clause, upsert_statement,
};

use copy::{Column, ColumnKind, push_row};
use futures_util::SinkExt as _;
use serde::Serialize;
use tokio_postgres::types::Json;

/// Records per second of each raw method.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RawTarget {
    pub jsonb_statement: f64,
    pub copy_merge: f64,
}

impl RawTarget {
    pub fn fastest(&self) -> f64 {
        self.jsonb_statement.max(self.copy_merge)
    }
}

#[derive(Debug, Clone, Copy)]
enum Method {
    JsonbStatement,
    CopyMerge,
}

/// Measures both methods with the rows of the run's table, on `connections` connections, in batches
/// of `batch` records (None: one message's, the source's page size).
pub async fn measure(
    scenario: &Scenario,
    connections: usize,
    batch: Option<usize>,
) -> anyhow::Result<RawTarget> {
    let connections = connections.max(1);
    let TargetSpec::Postgres(target) = &scenario.pipeline.spec.target else {
        bail!("the raw target is measured for a postgres target only");
    };
    let spec = TableSpec::of(&scenario.pipeline, target);
    let client = pg_client(&scenario.services.pg_url).await?;
    let rows = client
        .query(
            &format!(
                "SELECT to_jsonb(t)::text FROM {} t ORDER BY {}",
                scenario.table()?,
                quote(&spec.version)
            ),
            &[],
        )
        .await?;
    let records: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
    let batch = batch
        .unwrap_or(scenario.pipeline.spec.source.page_size as usize)
        .max(1);
    let batches: Vec<&[String]> = records.chunks(batch).collect();
    let mut speeds = [0.0; 2];
    for (speed, method) in speeds
        .iter_mut()
        .zip([Method::JsonbStatement, Method::CopyMerge])
    {
        let schema = format!("{}_raw", scenario.schema);
        let drop = format!("DROP SCHEMA IF EXISTS {} CASCADE", quote(&schema));
        client.batch_execute(&drop).await?;
        let args = PostgresArgs {
            pg_pool_size: connections,
            ..PostgresArgs::at(scenario.services.pg_url.clone(), schema.clone())
        };
        // The pipeline's migrations make the table, as for the writer.
        PostgresTarget::open(&scenario.pipeline, target, &args, None).await?;
        let database = Database::connect(&args)?;
        let columns = columns(&*database.client().await?, &schema, &spec).await?;
        let started = Instant::now();
        let shares = (0..connections).map(|share| {
            let mine: Vec<&[String]> = batches
                .iter()
                .skip(share)
                .step_by(connections)
                .copied()
                .collect();
            write_share(&database, &spec, &columns, method, mine)
        });
        futures_util::future::try_join_all(shares).await?;
        *speed = records.len() as f64 / started.elapsed().as_secs_f64();
        client.batch_execute(&drop).await?;
    }
    Ok(RawTarget {
        jsonb_statement: speeds[0],
        copy_merge: speeds[1],
    })
}

/// One connection's batches, written by `method`.
async fn write_share(
    database: &Database,
    spec: &TableSpec,
    columns: &[Column],
    method: Method,
    batches: Vec<&[String]>,
) -> anyhow::Result<()> {
    let mut client = database.client().await?;
    let table = quote(&spec.table);
    let list = spec.column_list();
    let merge = merge_clause(spec);
    match method {
        Method::JsonbStatement => {
            let statement = client.prepare(&upsert_statement(spec)).await?;
            for batch in batches {
                let rows: Vec<&serde_json::value::RawValue> = batch
                    .iter()
                    .map(|row| serde_json::from_str(row))
                    .collect::<Result<_, _>>()?;
                client.execute(&statement, &[&Json(&rows)]).await?;
            }
        }
        Method::CopyMerge => {
            client
                .batch_execute(&format!(
                    "CREATE TEMP TABLE raw_staging ON COMMIT DELETE ROWS AS \
                     SELECT {list} FROM {table} WITH NO DATA"
                ))
                .await?;
            let copy = client
                .prepare(&format!("COPY pg_temp.raw_staging ({list}) FROM STDIN"))
                .await?;
            let insert = client
                .prepare(&format!(
                    "INSERT INTO {table} ({list}) SELECT {list} FROM pg_temp.raw_staging {merge}"
                ))
                .await?;
            for batch in batches {
                let mut lines = Vec::new();
                for row in batch {
                    push_row(&mut lines, row, columns).map_err(anyhow::Error::msg)?;
                }
                let transaction = client.transaction().await?;
                let sink = transaction.copy_in(&copy).await?;
                futures_util::pin_mut!(sink);
                sink.send(Bytes::from(lines)).await?;
                sink.finish().await?;
                transaction.execute(&insert, &[]).await?;
                transaction.commit().await?;
            }
        }
    }
    Ok(())
}

/// The mapped columns with the kinds their text input wants.
async fn columns(
    client: &tokio_postgres::Client,
    schema: &str,
    spec: &TableSpec,
) -> anyhow::Result<Vec<Column>> {
    let mut columns = Vec::new();
    for name in &spec.columns {
        let row = client
            .query_one(
                "SELECT data_type::text FROM information_schema.columns \
                 WHERE table_schema = $1 AND table_name = $2 AND column_name = $3",
                &[&schema, &spec.table, name],
            )
            .await?;
        columns.push(Column {
            name: name.clone(),
            kind: ColumnKind::of_data_type(row.get(0)),
        });
    }
    Ok(columns)
}
