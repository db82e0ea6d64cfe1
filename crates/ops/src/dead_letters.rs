//! The operator's actions on dead letters: count, show, replay, purge and export them. Each one
//! connects and reads the selected queues letter by letter, holding what it read (so that nothing
//! leaves a queue until it is replayed elsewhere or purged) but keeping in memory only what it acts on,
//! acts, hands back the rest and returns what it did. A replay and a purge are recorded in the ledger
//! (who, when, which letters) before any letter leaves its queue.

use std::collections::HashSet;
use std::io::Write;

use conveyor_amqp::dead_letters::{self, DeadLetter, Filter, Held, QueueCounts};
use conveyor_amqp::settings::BrokerArgs;
use conveyor_amqp::{Publisher, Topology};
use conveyor_base::Stage;
use conveyor_ledger::action::{self, ActionKind, By, Moved};
use conveyor_postgres::Database;

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
    /// Messages read from one dead-letter queue at most (they are held from other readers meanwhile).
    pub max_messages: usize,
}

impl Selection {
    /// The most letters of one queue it selects: its limit, or as many as the message ids it names
    /// (once all are found, the rest of the queue need not be read).
    fn most(&self) -> usize {
        self.limit.unwrap_or(usize::MAX).min(self.filter.most())
    }
}

/// Connects for the pipeline `given` (a name or a pipeline file), whose queues must be on the
/// broker: an unknown pipeline or namespace is named as such.
async fn connect_for(
    broker: &BrokerArgs,
    given: &str,
) -> anyhow::Result<(lapin::Connection, Topology)> {
    let topology = Topology::new(broker, &crate::pipeline_name(given)?);
    let connection = conveyor_amqp::connect(&broker.address()?, "conveyorctl").await?;
    require_declared(&connection, &topology).await?;
    Ok((connection, topology))
}

/// [`Topology::require_declared`], closing the connection when it fails.
async fn require_declared(
    connection: &lapin::Connection,
    topology: &Topology,
) -> anyhow::Result<()> {
    if let Err(err) = topology.require_declared(connection).await {
        conveyor_amqp::close(connection).await;
        return Err(err.into());
    }
    Ok(())
}

/// Reads the selected queues letter by letter and calls `each` with every selected letter (at most
/// `selection.limit` per queue); every letter goes back to its queue, in order.
async fn read_selected(
    broker: &BrokerArgs,
    selection: &Selection,
    mut each: impl FnMut(DeadLetter) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let (connection, topology) = connect_for(broker, &selection.pipeline).await?;
    let result = async {
        for (stage, queue) in dead_letters::queues(&topology) {
            if selection.stage.is_some_and(|wanted| wanted != stage) {
                continue;
            }
            let mut held = Held::open(&connection, &queue, selection.max_messages).await?;
            let mut matched = 0;
            let read = async {
                while matched < selection.most() {
                    let Some(letter) = held.next().await? else {
                        break;
                    };
                    if selection.filter.matches(&letter) {
                        matched += 1;
                        each(letter)?;
                    }
                }
                anyhow::Ok(())
            }
            .await;
            held.release().await;
            read?;
        }
        anyhow::Ok(())
    }
    .await;
    conveyor_amqp::close(&connection).await;
    result
}

/// The dead letters of every stage of `pipelines`, counted per queue and by error class.
pub async fn list(broker: &BrokerArgs, pipelines: &[String]) -> anyhow::Result<Vec<QueueCounts>> {
    let connection = conveyor_amqp::connect(&broker.address()?, "conveyorctl").await?;
    let mut counts = Vec::new();
    for given in pipelines {
        let name = crate::pipeline_name(given)?;
        let topology = Topology::new(broker, &name);
        require_declared(&connection, &topology).await?;
        for (stage, queue) in dead_letters::queues(&topology) {
            let mut held = Held::open(&connection, &queue, usize::MAX).await?;
            let mut counted = QueueCounts::new(&name, stage, &queue);
            while let Some(letter) = held.next().await? {
                counted.add(&letter);
            }
            held.release().await;
            counts.push(counted);
        }
    }
    conveyor_amqp::close(&connection).await;
    Ok(counts)
}

/// The selected dead letters, with their failure details; all of them stay where they are.
pub async fn show(broker: &BrokerArgs, selection: &Selection) -> anyhow::Result<Vec<DeadLetter>> {
    let mut shown = Vec::new();
    read_selected(broker, selection, |letter| {
        shown.push(letter);
        Ok(())
    })
    .await?;
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

/// Letters replayed together: their copies confirmed together, recorded in the ledger in one
/// transaction.
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

/// Publishes each selected letter back into the stage where it failed, and removes it from its
/// dead-letter queue once its copy is confirmed and the replay recorded in `ledger` (when kept).
/// The queues are read letter by letter, a hundred selected ones at a time: their copies are
/// published together, their confirms awaited together, the hundred recorded in the ledger in one
/// transaction, then removed. So memory holds a hundred letters however long the queue. `on_each` is
/// called after each letter moved or failed (for a progress bar, given the letters selected so far).
pub async fn replay(
    broker: &BrokerArgs,
    ledger: Option<&Database>,
    selection: &Selection,
    by: &By,
    mut on_each: impl FnMut(usize),
) -> anyhow::Result<Replayed> {
    let (connection, topology) = connect_for(broker, &selection.pipeline).await?;
    let result = async {
        let publisher = Publisher::open(&connection)
            .await?
            .with_confirm_timeout(broker.confirm_timeout());
        let mut replayed = Replayed::default();
        let mut selected = 0;
        // What this replay sent already: a copy that dies again while the replay reads on comes
        // back as a new letter of the same records (or, a whole message, under its copy's id), and
        // is left for the next replay, so that a replay of a whole queue ends.
        let mut sent = HashSet::new();
        let limit = selection.most();
        for (stage, queue) in dead_letters::queues(&topology) {
            if selection.stage.is_some_and(|wanted| wanted != stage) {
                continue;
            }
            let mut held = Held::open(&connection, &queue, selection.max_messages).await?;
            let mut chunk = Vec::new();
            let mut matched = 0;
            while matched < limit {
                let Some(letter) = held.next().await? else {
                    break;
                };
                if !selection.filter.matches(&letter) || sent_before(&sent, &letter) {
                    continue;
                }
                sent.insert(letter.replayed_id());
                sent.extend(letter.record_ids.iter().cloned());
                matched += 1;
                selected += 1;
                chunk.push(letter);
                if chunk.len() == REPLAYED_PER_RECORD {
                    let moving = Chunk {
                        held: &held,
                        stage,
                        topology: &topology,
                        publisher: &publisher,
                    };
                    moving
                        .replay(ledger, by, std::mem::take(&mut chunk), &mut replayed)
                        .await?;
                    (0..REPLAYED_PER_RECORD).for_each(|_| on_each(selected));
                }
            }
            let left = chunk.len();
            let moving = Chunk {
                held: &held,
                stage,
                topology: &topology,
                publisher: &publisher,
            };
            moving.replay(ledger, by, chunk, &mut replayed).await?;
            (0..left).for_each(|_| on_each(selected));
            held.release_removed(&connection).await?;
        }
        anyhow::Ok(replayed)
    }
    .await;
    conveyor_amqp::close(&connection).await;
    result
}

/// Whether `letter` came back from this replay: a copy it sent died again.
fn sent_before(sent: &HashSet<String>, letter: &DeadLetter) -> bool {
    sent.contains(&letter.message_id)
        || (!letter.record_ids.is_empty() && letter.record_ids.iter().all(|id| sent.contains(id)))
}

/// Letters of one queue moved together.
struct Chunk<'a> {
    held: &'a Held,
    stage: Stage,
    topology: &'a Topology,
    publisher: &'a Publisher,
}

impl Chunk<'_> {
    /// Publishes a copy of each letter, awaits the confirms, records those confirmed in `ledger`,
    /// then removes them from their queue; the others stay, named in `replayed.failed`.
    async fn replay(
        &self,
        ledger: Option<&Database>,
        by: &By,
        letters: Vec<DeadLetter>,
        replayed: &mut Replayed,
    ) -> anyhow::Result<()> {
        if letters.is_empty() {
            return Ok(());
        }
        let mut pending = Vec::with_capacity(letters.len());
        for letter in &letters {
            pending.push(
                self.held
                    .send_copy(letter, self.publisher, self.topology)
                    .await,
            );
        }
        let mut published = Vec::new();
        for (letter, sent) in letters.iter().zip(pending) {
            let confirmed = match sent {
                Ok(confirm) => confirm.wait().await,
                Err(err) => Err(err),
            };
            match confirmed {
                Ok(()) => published.push(letter),
                Err(err) => replayed
                    .failed
                    .push(format!("{} {}: {err}", letter.queue, letter.message_id)),
            }
        }
        if let Some(database) = ledger {
            let moved: Vec<Moved> = published.iter().map(|l| moved(l, true)).collect();
            let pipeline = self.topology.pipeline();
            if let Err(err) = action::record(
                database,
                pipeline,
                self.stage,
                ActionKind::Replay,
                &moved,
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
                return Ok(());
            }
        }
        for letter in published {
            self.held.remove(letter).await?;
            replayed.messages += 1;
            replayed.records += letter.record_ids.len();
        }
        Ok(())
    }
}

/// Removes the selected letters for good, once `confirm` (given how many there are) says yes; returns
/// how many were removed, or `None` when it said no (then nothing was removed). The queues are read
/// twice, letter by letter: once to count the selection (keeping only message ids), and, confirmed,
/// once to remove exactly the letters counted (a letter arriving in between is not removed), a
/// hundred at a time, each hundred recorded in `ledger` (when kept) before it goes.
pub async fn purge(
    broker: &BrokerArgs,
    ledger: Option<&Database>,
    selection: &Selection,
    by: &By,
    confirm: impl FnOnce(usize) -> anyhow::Result<bool>,
) -> anyhow::Result<Option<usize>> {
    let (connection, topology) = connect_for(broker, &selection.pipeline).await?;
    let result = async {
        let mut counted: Vec<(Stage, String, HashSet<String>)> = Vec::new();
        let limit = selection.most();
        for (stage, queue) in dead_letters::queues(&topology) {
            if selection.stage.is_some_and(|wanted| wanted != stage) {
                continue;
            }
            let mut held = Held::open(&connection, &queue, selection.max_messages).await?;
            let mut ids = HashSet::new();
            while ids.len() < limit {
                let Some(letter) = held.next().await? else {
                    break;
                };
                if selection.filter.matches(&letter) {
                    ids.insert(letter.message_id);
                }
            }
            held.release().await;
            counted.push((stage, queue, ids));
        }
        let total: usize = counted.iter().map(|(_, _, ids)| ids.len()).sum();
        if total == 0 {
            return Ok(Some(0));
        }
        if !confirm(total)? {
            return Ok(None);
        }
        let mut removed = 0;
        for (stage, queue, mut ids) in counted {
            let mut held = Held::open(&connection, &queue, selection.max_messages).await?;
            let mut chunk = Vec::new();
            while !ids.is_empty() {
                let Some(letter) = held.next().await? else {
                    break;
                };
                if ids.remove(&letter.message_id) {
                    chunk.push(letter);
                }
                if chunk.len() == REPLAYED_PER_RECORD || (ids.is_empty() && !chunk.is_empty()) {
                    removed += remove(
                        &held,
                        ledger,
                        topology.pipeline(),
                        stage,
                        by,
                        std::mem::take(&mut chunk),
                    )
                    .await?;
                }
            }
            removed += remove(&held, ledger, topology.pipeline(), stage, by, chunk).await?;
            held.release_removed(&connection).await?;
        }
        anyhow::Ok(Some(removed))
    }
    .await;
    conveyor_amqp::close(&connection).await;
    result
}

/// Records the purge of `letters` in `ledger` (when kept), then removes them; returns how many.
async fn remove(
    held: &Held,
    ledger: Option<&Database>,
    pipeline: &str,
    stage: Stage,
    by: &By,
    letters: Vec<DeadLetter>,
) -> anyhow::Result<usize> {
    if letters.is_empty() {
        return Ok(0);
    }
    if let Some(database) = ledger {
        let moved: Vec<Moved> = letters.iter().map(|letter| moved(letter, false)).collect();
        action::record(database, pipeline, stage, ActionKind::Purge, &moved, by).await?;
    }
    for letter in &letters {
        held.remove(letter).await?;
    }
    Ok(letters.len())
}

/// Writes the selected letters to `out` as JSON Lines, one message a line, as the queues are read;
/// removes nothing. Returns how many were written.
pub async fn export(
    broker: &BrokerArgs,
    selection: &Selection,
    out: &mut dyn Write,
) -> anyhow::Result<usize> {
    let mut written = 0;
    read_selected(broker, selection, |letter| {
        serde_json::to_writer(&mut *out, &letter)?;
        out.write_all(b"\n")?;
        written += 1;
        Ok(())
    })
    .await?;
    out.flush()?;
    Ok(written)
}
