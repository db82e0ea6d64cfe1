//! Dead letters as the console sees them: browsed from the ledger's letter index
//! ([`conveyor_ledger::letters`]), never by holding the queues, and moved by jobs that replay or purge
//! a fixed set of letters through [`crate::dead_letters`], resumable when their runner stops.
//!
//! Why an index: a queue can only be read front to back, and a letter read is held from every other
//! reader until it is handed back. Browsing 10,000 letters (grouping, filtering, paging, opening one
//! far down) from the queue would hold all of them for every page view. The index keeps what
//! browsing needs (reason, class, record ids, headers, the payload as text) in PostgreSQL; the queue
//! keeps each letter byte for byte and is read only to move letters, for as long as the move takes.

use std::collections::{BTreeMap, HashSet};

use anyhow::Context as _;
use conveyor_amqp::Topology;
use conveyor_amqp::dead_letters::{self, Filter, Held};
use conveyor_amqp::settings::BrokerArgs;
use conveyor_base::Stage;
use conveyor_ledger::action::{ActionKind, By};
use conveyor_ledger::jobs::{self, Job, JobLetter};
use conveyor_ledger::letters::{self, LetterQuery, LetterSummary};
use conveyor_postgres::Database;
use lapin::Connection;

use crate::dead_letters::{Selection, purge, replay};

/// Letters read from one dead-letter queue at most by one action or refresh.
pub const MAX_MESSAGES: usize = 100_000;

/// Letters found in a queue indexed in one statement.
const INDEXED_AT_ONCE: usize = 500;

/// Indexes the letters of a pipeline's dead-letter queues that the index lacks (the broker's own, or
/// sent while the ledger was off). A queue is read only when the letters ready in it are not as many
/// as the index counts there, and then for as long as one pass over it takes. Returns how many were
/// indexed.
pub async fn refresh_index(
    connection: &Connection,
    database: &Database,
    topology: &Topology,
) -> anyhow::Result<u64> {
    let pipeline = topology.pipeline();
    let indexed: BTreeMap<String, u64> = letters::dead_by_stage(database, pipeline)
        .await?
        .into_iter()
        .collect();
    let channel = connection.create_channel().await?;
    let mut added = 0;
    for (stage, queue) in dead_letters::queues(topology) {
        let ready = conveyor_amqp::queue_depth(&channel, &queue)
            .await
            .with_context(|| format!("inspecting queue {queue} (is the topology declared?)"))?;
        if u64::from(ready) == indexed.get(stage.as_str()).copied().unwrap_or(0) {
            continue;
        }
        // Indexed a few hundred at a time, so that memory holds no more however long the queue.
        let mut held = Held::open(connection, &queue, MAX_MESSAGES).await?;
        let indexing = async {
            let mut found = Vec::new();
            while let Some(letter) = held.next().await? {
                found.push(letter.indexed());
                if found.len() == INDEXED_AT_ONCE {
                    added += letters::index_found(database, pipeline, stage, &found).await?;
                    found.clear();
                }
            }
            added += letters::index_found(database, pipeline, stage, &found).await?;
            anyhow::Ok(())
        }
        .await;
        held.release().await;
        indexing?;
    }
    let _ = channel.close(200, "done".into()).await;
    Ok(added)
}

/// The letters still in their queues that `query` selects, oldest first; only those of `only`
/// (stage, message id) when given.
pub async fn select(
    database: &Database,
    query: &LetterQuery,
    only: Option<&HashSet<(String, String)>>,
) -> anyhow::Result<Vec<LetterSummary>> {
    let query = LetterQuery {
        state: Some("dead".to_owned()),
        ..query.clone()
    };
    let mut selected = letters::page(database, &query, None, u32::MAX).await?;
    if let Some(only) = only {
        selected.retain(|letter| only.contains(&(letter.stage.clone(), letter.message_id.clone())));
    }
    selected.reverse();
    Ok(selected)
}

/// Records a job of `kind` on `selected` letters of `pipeline`, asked for by `who`; returns its id.
pub async fn start_job(
    database: &Database,
    pipeline: &str,
    kind: ActionKind,
    who: &str,
    selected: &[LetterSummary],
) -> anyhow::Result<i64> {
    let letters: Vec<JobLetter> = selected
        .iter()
        .map(|letter| JobLetter {
            stage: letter.stage.clone(),
            message_id: letter.message_id.clone(),
        })
        .collect();
    Ok(jobs::create(database, pipeline, kind, who, &letters).await?)
}

/// Runs (or resumes) job `id` to its end: moves each of its letters still in its queue, stage by
/// stage; letters that cannot be moved are listed in the job and stay in their queue. A job another
/// runner holds is left to it. A job stopped by an error (the broker gone) stays running, with the
/// error listed, to be resumed.
pub async fn run_job(broker: &BrokerArgs, database: &Database, id: i64) -> anyhow::Result<()> {
    let Some(job) = jobs::get(database, id).await? else {
        anyhow::bail!("there is no job {id}");
    };
    let Some(kind) = ActionKind::parse(&job.action) else {
        anyhow::bail!("job {id} asks for {:?}, which is no action", job.action);
    };
    // One runner per job (two consoles may both find it running): the lock is the session's, on a
    // connection of its own.
    let lock = database.client().await?;
    let key = id as i32;
    let locked: bool = lock
        .query_one(
            "SELECT pg_try_advisory_lock(hashtext('conveyor-job'), $1)",
            &[&key],
        )
        .await?
        .get(0);
    if !locked {
        tracing::info!(job = id, "another console runs this job");
        return Ok(());
    }
    let mut failures = Vec::new();
    let result = move_letters(broker, database, &job, kind, &mut failures).await;
    let recorded = match &result {
        Ok(()) => jobs::progress(database, id, &failures, true).await,
        Err(err) => {
            failures.push(format!("stopped: {err:#}; resume the job"));
            jobs::progress(database, id, &failures, false).await
        }
    };
    let _ = lock
        .execute(
            "SELECT pg_advisory_unlock(hashtext('conveyor-job'), $1)",
            &[&key],
        )
        .await;
    result?;
    Ok(recorded?)
}

async fn move_letters(
    broker: &BrokerArgs,
    database: &Database,
    job: &Job,
    kind: ActionKind,
    failures: &mut Vec<String>,
) -> anyhow::Result<()> {
    let by = By {
        who: job.requested_by.clone(),
        job_id: Some(job.id),
    };
    let dead = || async {
        anyhow::Ok(
            letters::ids(database, &LetterQuery::dead(&job.pipeline))
                .await?
                .into_iter()
                .collect::<HashSet<(String, String)>>(),
        )
    };
    // Letters moved by an earlier run of the job (or by anyone since) are no longer dead.
    let still_dead = dead().await?;
    for stage in Stage::ALL {
        let ids: HashSet<String> = job
            .letters
            .iter()
            .filter(|letter| letter.stage == stage.as_str())
            .filter(|letter| {
                still_dead.contains(&(letter.stage.clone(), letter.message_id.clone()))
            })
            .map(|letter| letter.message_id.clone())
            .collect();
        if ids.is_empty() {
            continue;
        }
        let selection = Selection {
            pipeline: job.pipeline.clone(),
            stage: Some(stage),
            filter: Filter {
                message_ids: Some(ids),
                ..Default::default()
            },
            limit: None,
            max_messages: MAX_MESSAGES,
        };
        match kind {
            ActionKind::Replay => {
                let replayed = replay(broker, Some(database), &selection, &by, |_| {}).await?;
                failures.extend(replayed.failed);
            }
            ActionKind::Purge => {
                purge(broker, Some(database), &selection, &by, |_| Ok(true)).await?;
            }
        }
        jobs::progress(database, job.id, failures, false).await?;
    }
    // A letter neither moved nor failed was not in its queue when read: held by another reader, or
    // removed outside conveyor.
    let dead_now = dead().await?;
    let named = failures.join("\n");
    for letter in &job.letters {
        if dead_now.contains(&(letter.stage.clone(), letter.message_id.clone()))
            && !named.contains(&letter.message_id)
        {
            failures.push(format!(
                "{} {}: not found in its dead-letter queue (another reader held it, or it was removed \
                 outside conveyor); resume the job",
                letter.stage, letter.message_id
            ));
        }
    }
    Ok(())
}
