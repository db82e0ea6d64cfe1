//! Replays and purges: a dry run first (what would move, and where), then the action, run as a job
//! whose progress and failures its page shows. A purge, and a replay of a whole pipeline's letters,
//! need the operator to type what they confirm.

use std::collections::{BTreeMap, HashSet};

use axum::Extension;
use axum::extract::Path;
use axum::response::{Html, IntoResponse, Redirect, Response};
use conveyor_amqp::Topology;
use conveyor_base::Stage;
use conveyor_ledger::action::ActionKind;
use conveyor_ledger::jobs::{self, Job};
use conveyor_ledger::letters::LetterSummary;
use maud::{Markup, html};

use super::letters::Filters;
use super::{Posted, Shared, operator_only};
use crate::Console;
use crate::auth::Session;
use crate::html::{self, Failure, csrf};

/// Letters a dry run lists by name at most.
const PLAN_SHOWN: usize = 20;

/// What a posted form selects.
struct Chosen {
    kind: ActionKind,
    filters: Filters,
    /// Letters ticked one by one, as (stage, message id).
    ticked: Option<HashSet<(String, String)>>,
    letters: Vec<LetterSummary>,
}

impl Chosen {
    async fn read(console: &Console, posted: &Posted) -> Result<Self, Failure> {
        let kind = posted
            .get("action")
            .and_then(ActionKind::parse)
            .ok_or_else(|| Failure::bad_request("action: replay or purge"))?;
        let text = |name: &str| posted.get(name).unwrap_or_default().to_owned();
        let filters = Filters {
            pipeline: text("pipeline"),
            stage: text("stage"),
            class: text("class"),
            reason: text("reason"),
            record_id: text("record_id"),
            since: text("since"),
            until: text("until"),
            ..Filters::default()
        };
        let ticked: HashSet<(String, String)> = posted
            .all("letter")
            .filter_map(|letter| letter.split_once('/'))
            .map(|(stage, id)| (stage.to_owned(), id.to_owned()))
            .collect();
        let ticked = (posted.all("letter").next().is_some()).then_some(ticked);
        if ticked.as_ref().is_some_and(HashSet::is_empty) {
            return Err(Failure::bad_request("letter: each is stage/message_id"));
        }
        let query = filters.query(console)?;
        let letters =
            conveyor_ops::letters::select(&console.database, &query, ticked.as_ref()).await?;
        Ok(Self {
            kind,
            filters,
            ticked,
            letters,
        })
    }

    /// Everything of the pipeline, unfiltered.
    fn everything(&self) -> bool {
        self.ticked.is_none()
            && [
                &self.filters.stage,
                &self.filters.class,
                &self.filters.reason,
                &self.filters.record_id,
                &self.filters.since,
                &self.filters.until,
            ]
            .iter()
            .all(|value| value.is_empty())
    }

    /// What the operator must type, if anything.
    fn confirmation(&self) -> Option<String> {
        let needed = self.kind == ActionKind::Purge || self.everything();
        needed.then(|| format!("{} {}", self.kind.as_str(), self.letters.len()))
    }

    /// The selection again, as hidden fields.
    fn hidden(&self) -> Markup {
        html! {
            input type="hidden" name="action" value=(self.kind.as_str());
            (self.filters.hidden())
            @if let Some(ticked) = &self.ticked {
                @for (stage, id) in ticked { input type="hidden" name="letter" value=(format!("{stage}/{id}")); }
            }
        }
    }
}

pub(crate) async fn plan(console: Shared, posted: Posted) -> Result<Response, Failure> {
    operator_only(&posted.session)?;
    let chosen = Chosen::read(&console, &posted).await?;
    let pipeline = chosen.filters.pipeline(&console)?.to_owned();
    let topology = Topology::new(&console.broker, &pipeline);
    let mut by_stage: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for letter in &chosen.letters {
        let entry = by_stage.entry(letter.stage.as_str()).or_default();
        entry.0 += 1;
        entry.1 += letter.record_ids.len();
    }
    let verb = chosen.kind.as_str();
    let session = &posted.session;
    let body = html! {
        p.dry { "Dry run: nothing has moved yet." }
        @if chosen.letters.is_empty() {
            p { "The selection holds no letter still in its queue: nothing to " (verb) "." }
        } @else {
            table {
                thead { tr { th { "stage" } th { "letters" } th { "records" } th { "where they go" } } }
                tbody { @for (stage, (letters, records)) in &by_stage { tr {
                    td { (stage) } td.num { (letters) } td.num { (records) }
                    td { @match chosen.kind {
                        ActionKind::Replay => { "back to " code { (work_queue(&topology, stage)) } " (the stage where they failed)" }
                        ActionKind::Purge => { "removed for good (recorded in the ledger)" }
                    } }
                } } }
            }
            p { "Letters (the first " (PLAN_SHOWN.min(chosen.letters.len())) " of " (chosen.letters.len()) "):" }
            ul.ids { @for letter in chosen.letters.iter().take(PLAN_SHOWN) {
                li { code { (letter.stage) "/" (letter.message_id) } " " (letter.reason) }
            } }
            form method="post" action="/actions/run" {
                (csrf(session)) (chosen.hidden())
                @if let Some(phrase) = chosen.confirmation() {
                    label { "Type " code.phrase { (phrase) } " to confirm "
                        input name="confirm" autocomplete="off" required; }
                }
                button.(if chosen.kind == ActionKind::Purge { "danger" } else { "" }) type="submit" {
                    (if chosen.kind == ActionKind::Purge { "Purge" } else { "Replay" }) " " (chosen.letters.len()) " letter(s)"
                }
            }
        }
    };
    Ok(html::page(
        &console,
        session,
        &format!("Plan: {verb}"),
        body,
    ))
}

fn work_queue(topology: &Topology, stage: &str) -> String {
    let stage = Stage::ALL
        .into_iter()
        .find(|s| s.as_str() == stage)
        .unwrap_or(Stage::Transform);
    topology.queue(stage)
}

pub(crate) async fn run(console: Shared, posted: Posted) -> Result<Response, Failure> {
    operator_only(&posted.session)?;
    let chosen = Chosen::read(&console, &posted).await?;
    if let Some(phrase) = chosen.confirmation()
        && posted.get("confirm").map(str::trim) != Some(phrase.as_str())
    {
        return Err(Failure::bad_request(format!(
            "not confirmed: type {phrase:?} (the selection now holds {} letter(s)); go back and try again",
            chosen.letters.len()
        )));
    }
    if chosen.letters.is_empty() {
        return Err(Failure::bad_request(
            "the selection holds no letter still in its queue",
        ));
    }
    let pipeline = chosen.filters.pipeline(&console)?.to_owned();
    let who = format!("{} (console)", posted.session.user);
    let id = conveyor_ops::letters::start_job(
        &console.database,
        &pipeline,
        chosen.kind,
        &who,
        &chosen.letters,
    )
    .await?;
    tracing::info!(job = id, action = chosen.kind.as_str(), letters = chosen.letters.len(), user = %posted.session.user, "an operator started a job");
    console.spawn_job(id);
    Ok(Redirect::to(&format!("/jobs/{id}")).into_response())
}

pub(crate) async fn jobs(
    console: Shared,
    Extension(session): Extension<Session>,
) -> Result<Response, Failure> {
    let recent = jobs::recent(&console.database, 100).await?;
    let body = html! {
        @if recent.is_empty() { p.hint { "No replay or purge job yet." } }
        @else {
            table {
                thead { tr { th { "job" } th { "pipeline" } th { "action" } th { "by" } th { "asked at" } th { "moved" } th { "failed" } th { "state" } } }
                tbody { @for job in &recent { tr {
                    td { a href=(format!("/jobs/{}", job.id)) { "#" (job.id) } }
                    td { (job.pipeline) } td { (job.action) } td { (job.requested_by) }
                    td { (html::time(&job.requested_at)) }
                    td.num { (job.moved) " / " (job.total) } td.num { (job.failed.len()) } td { (job.state) }
                } } }
            }
        }
    };
    Ok(html::page(&console, &session, "Jobs", body))
}

async fn read_job(console: &Console, id: i64) -> Result<Job, Failure> {
    jobs::get(&console.database, id)
        .await?
        .ok_or_else(|| Failure::not_found(format!("there is no job {id}")))
}

pub(crate) async fn job(
    console: Shared,
    Extension(session): Extension<Session>,
    Path(id): Path<i64>,
) -> Result<Response, Failure> {
    let job = read_job(&console, id).await?;
    let body = html! {
        div data-refresh=(format!("/jobs/{id}/live")) data-every="2" { (job_markup(&job)) }
        @if job.state == "running" && session.may_act() {
            form method="post" action=(format!("/jobs/{id}/resume")) {
                (csrf(&session))
                button type="submit" { "Resume" }
                span.hint { " if it stopped (its failures say so)" }
            }
        }
    };
    Ok(html::page(&console, &session, &format!("Job #{id}"), body))
}

pub(crate) async fn job_live(console: Shared, Path(id): Path<i64>) -> Result<Response, Failure> {
    let job = read_job(&console, id).await?;
    Ok(Html(job_markup(&job).into_string()).into_response())
}

fn job_markup(job: &Job) -> Markup {
    html! {
        dl.facts data-state=(job.state) {
            div { dt { "action" } dd { (job.action) } }
            div { dt { "pipeline" } dd { (job.pipeline) } }
            div { dt { "asked by" } dd { (job.requested_by) } }
            div { dt { "asked at" } dd { (html::time(&job.requested_at)) } }
            div { dt { "state" } dd.state { (job.state) } }
            div { dt { "moved" } dd.moved { (job.moved) " of " (job.total) } }
            div { dt { "finished" } dd { (html::maybe_time(job.finished_at.as_ref())) } }
        }
        progress max=(job.total.max(1)) value=(job.moved) {}
        h2 { "Failed (" (job.failed.len()) ")" }
        @if job.failed.is_empty() { p.hint { "Nothing failed." } }
        @else { ul.failed { @for failure in &job.failed { li { (failure) } } } }
        p.hint { "Letters that failed stay in their dead-letter queue." }
    }
}

/// Runs a job again that stopped (the broker was gone) or whose console stopped; harmless while it
/// runs: one runner holds a job at a time.
pub(crate) async fn resume(
    console: Shared,
    Path(id): Path<i64>,
    posted: Posted,
) -> Result<Response, Failure> {
    operator_only(&posted.session)?;
    read_job(&console, id).await?;
    console.spawn_job(id);
    Ok(Redirect::to(&format!("/jobs/{id}")).into_response())
}
