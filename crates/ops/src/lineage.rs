//! Where one record of a pipeline is, from the ledger and the target: every message that carried it
//! into a stage with what the stage settled, the dead letters it is in, and its row at the target.

use conveyor_ledger::letters::{self, LetterQuery, LetterSummary};
use conveyor_ledger::read::{self, Step};
use conveyor_pipeline::Pipeline;
use conveyor_pipeline::target::TargetSpec;
use conveyor_postgres::Database;
use serde::Serialize;

use crate::reconcile::TargetTable;

/// The record at the target.
#[derive(Debug, Clone, Serialize)]
pub enum TargetRow {
    /// The row the target holds under the record's id.
    Held(serde_json::Value),
    Absent,
    /// The target cannot be read here, and why.
    NotRead(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct Lineage {
    /// Oldest first.
    pub steps: Vec<Step>,
    /// Every state, newest first.
    pub letters: Vec<LetterSummary>,
    pub target: TargetRow,
}

/// The lineage of `record_id` in `pipeline`, whose ledger (and postgres target) are in `database`.
pub async fn lineage(
    database: &Database,
    pipeline: &Pipeline,
    record_id: &str,
) -> anyhow::Result<Lineage> {
    let name = pipeline.name();
    let steps = read::lineage(database, name, record_id).await?;
    let query = LetterQuery {
        record_id: Some(record_id.to_owned()),
        state: None,
        ..LetterQuery::dead(name)
    };
    let letters = letters::page(database, &query, None, 100).await?;
    let target = match &pipeline.spec.target {
        TargetSpec::Postgres(_) => {
            let table = TargetTable::open(pipeline, database.clone()).await?;
            match table.row(record_id).await? {
                Some(row) => TargetRow::Held(row),
                None => TargetRow::Absent,
            }
        }
        TargetSpec::Http(_) => TargetRow::NotRead(
            "an HTTP target: conveyorctl reconcile reads it by id, with its credentials".to_owned(),
        ),
        TargetSpec::Noop(_) => {
            TargetRow::NotRead("the target is the no-op one: it keeps nothing".to_owned())
        }
    };
    Ok(Lineage {
        steps,
        letters,
        target,
    })
}
