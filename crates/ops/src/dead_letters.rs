//! The operator's actions on dead letters: count, show, replay, purge and export them. Each one
//! connects, takes the selected queues' letters (holding them, so that nothing leaves a queue until it
//! is replayed elsewhere or purged), acts, hands back the rest and returns what it did. A replay and a
//! purge are recorded in the ledger (who, when, which letters) before any letter leaves its queue.

use std::io::Write;

use conveyor_amqp::dead_letters::{self, DeadLetter, Filter, Held, QueueCounts};
use conveyor_amqp::settings::BrokerArgs;
use conveyor_amqp::{Publisher, Topology};
use conveyor_base::Stage;
use conveyor_ledger::action::{self, ActionKind, By, Moved};
use conveyor_postgres::Database;
use lapin::Connection;

/// Which dead letters an action applies to.
#[derive(Debug, Clone)]
pub struct Selection {
    /// The pipeline: its name, or its pipeline file.
    pub pipeline: String,
    /// Only this stage's dead-letter queue (every stage's if `None`).
    pub stage: Option<Stage>,
    pub filter: Filter,
    /// At most this many messages per stage.
    pub limit: Option<usize>,
    /// Messages read from one dead-letter queue at most (they are held in memory meanwhile).
    pub max_messages: usize,
}

/// The letters of the selected queues, taken and held, with the indexes of those that match.
struct Taken {
    connection: Connection,
    topology: Topology,
    queues: Vec<(Stage, Held, Vec<usize>)>,
}

impl Taken {
    async fn take(broker: &BrokerArgs, selection: &Selection) -> anyhow::Result<Self> {
        let name = crate::pipeline_name(&selection.pipeline)?;
        let topology = Topology::new(broker, &name);
        let connection = conveyor_amqp::connect(&broker.address()?, "conveyorctl").await?;
        let mut queues = Vec::new();
        for (stage, queue) in dead_letters::queues(&topology) {
            if selection.stage.is_some_and(|wanted| wanted != stage) {
                continue;
            }
            let held = Held::take(&connection, &queue, selection.max_messages).await?;
            let matching: Vec<usize> = held
                .letters
                .iter()
                .enumerate()
                .filter(|(_, letter)| selection.filter.matches(letter))
                .map(|(index, _)| index)
                .take(selection.limit.unwrap_or(usize::MAX))
                .collect();
            queues.push((stage, held, matching));
        }
        Ok(Self {
            connection,
            topology,
            queues,
        })
    }

    fn matching(&self) -> usize {
        self.queues
            .iter()
            .map(|(_, _, matching)| matching.len())
            .sum()
    }

    /// Hands every letter still held back to its queue, in order, makes sure that those removed are
    /// gone, and disconnects.
    async fn release(self) -> anyhow::Result<()> {
        let mut checked = Ok(());
        for (_, held, _) in self.queues {
            if let Err(err) = held.release_removed(&self.connection).await {
                checked = Err(err);
            }
        }
        conveyor_amqp::close(&self.connection).await;
        Ok(checked?)
    }
}

/// The dead letters of every stage of `pipelines`, counted per queue and by error class.
pub async fn list(broker: &BrokerArgs, pipelines: &[String]) -> anyhow::Result<Vec<QueueCounts>> {
    let connection = conveyor_amqp::connect(&broker.address()?, "conveyorctl").await?;
    let mut counts = Vec::new();
    for given in pipelines {
        let name = crate::pipeline_name(given)?;
        let topology = Topology::new(broker, &name);
        for (stage, queue) in dead_letters::queues(&topology) {
            let held = Held::take(&connection, &queue, usize::MAX).await?;
            counts.push(QueueCounts::of(&name, stage, &queue, &held.letters));
            held.release().await;
        }
    }
    conveyor_amqp::close(&connection).await;
    Ok(counts)
}

/// The selected dead letters, with their failure details; all of them stay where they are.
pub async fn show(broker: &BrokerArgs, selection: &Selection) -> anyhow::Result<Vec<DeadLetter>> {
    let taken = Taken::take(broker, selection).await?;
    let shown = taken
        .queues
        .iter()
        .flat_map(|(_, held, matching)| matching.iter().map(|&i| held.letters[i].clone()))
        .collect();
    taken.release().await?;
    Ok(shown)
}

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Replayed {
    pub messages: usize,
    pub records: usize,
    /// The letters that could not be replayed (they stay in their dead-letter queue), with the reason.
    pub failed: Vec<String>,
}

/// Letters replayed between two records in the ledger.
const REPLAYED_PER_RECORD: usize = 100;

/// What the ledger is told of a letter that moved.
fn moved(letter: &DeadLetter, replayed: bool) -> Moved {
    Moved {
        message_id: letter.message_id.clone(),
        class: letter.class.clone(),
        record_ids: letter.record_ids.clone(),
        replayed_as: replayed.then(|| letter.replayed_id()),
    }
}

/// Publishes each selected letter back into the stage where it failed, with a confirm; records the
/// replay in `ledger` (when kept), a hundred letters at a time; and only then removes those letters
/// from their dead-letter queue. `on_each` is called after each letter (for a progress bar).
pub async fn replay(
    broker: &BrokerArgs,
    ledger: Option<&Database>,
    selection: &Selection,
    by: &By,
    mut on_each: impl FnMut(usize),
) -> anyhow::Result<Replayed> {
    let taken = Taken::take(broker, selection).await?;
    let total = taken.matching();
    let publisher = Publisher::open(&taken.connection).await?;
    let pipeline = taken.topology.pipeline().to_owned();
    let mut replayed = Replayed::default();
    for (stage, held, matching) in &taken.queues {
        for chunk in matching.chunks(REPLAYED_PER_RECORD) {
            let mut published = Vec::new();
            for &index in chunk {
                let letter = &held.letters[index];
                match held.republish(letter, &publisher, &taken.topology).await {
                    Ok(()) => published.push(letter),
                    Err(err) => replayed
                        .failed
                        .push(format!("{} {}: {err}", letter.queue, letter.message_id)),
                }
                on_each(total);
            }
            if let Some(database) = ledger {
                let letters: Vec<Moved> = published.iter().map(|l| moved(l, true)).collect();
                if let Err(err) = action::record(
                    database,
                    &pipeline,
                    *stage,
                    ActionKind::Replay,
                    &letters,
                    by,
                )
                .await
                {
                    // The copies are out, under ids a retried replay gives them again: the stage
                    // settles each once.
                    replayed.failed.extend(published.iter().map(|letter| {
                        format!(
                            "{} {}: not recorded in the ledger, left in place: {err}",
                            letter.queue, letter.message_id
                        )
                    }));
                    continue;
                }
            }
            for letter in published {
                held.remove(letter).await?;
                replayed.messages += 1;
                replayed.records += letter.record_ids.len();
            }
        }
    }
    taken.release().await?;
    Ok(replayed)
}

/// Removes the selected letters for good, once `confirm` (given how many there are) says yes and
/// the purge is recorded in `ledger` (when kept); returns how many were removed, or `None` when it
/// said no (then nothing was removed).
pub async fn purge(
    broker: &BrokerArgs,
    ledger: Option<&Database>,
    selection: &Selection,
    by: &By,
    confirm: impl FnOnce(usize) -> anyhow::Result<bool>,
) -> anyhow::Result<Option<usize>> {
    let taken = Taken::take(broker, selection).await?;
    let total = taken.matching();
    if total > 0 && !confirm(total)? {
        taken.release().await?;
        return Ok(None);
    }
    let pipeline = taken.topology.pipeline().to_owned();
    for (stage, held, matching) in &taken.queues {
        if let Some(database) = ledger {
            let letters: Vec<Moved> = matching
                .iter()
                .map(|&index| moved(&held.letters[index], false))
                .collect();
            action::record(database, &pipeline, *stage, ActionKind::Purge, &letters, by).await?;
        }
        for &index in matching {
            held.remove(&held.letters[index]).await?;
        }
    }
    taken.release().await?;
    Ok(Some(total))
}

/// Writes the selected letters to `out` as JSON Lines, one message a line; removes nothing. Returns
/// how many were written.
pub async fn export(
    broker: &BrokerArgs,
    selection: &Selection,
    out: &mut dyn Write,
) -> anyhow::Result<usize> {
    let taken = Taken::take(broker, selection).await?;
    let mut written = 0;
    let result = (|| {
        for (_, held, matching) in &taken.queues {
            for &index in matching {
                serde_json::to_writer(&mut *out, &held.letters[index])?;
                out.write_all(b"\n")?;
                written += 1;
            }
        }
        out.flush()?;
        anyhow::Ok(())
    })();
    taken.release().await?;
    result.map(|()| written)
}
