//! A record's way through a pipeline, from the ledger: each message that carried it into a stage,
//! what the stage settled, and the dead letters it is in.

use axum::Extension;
use axum::extract::Query;
use axum::response::Response;
use conveyor_ledger::letters::{self, LetterQuery};
use conveyor_ledger::read;
use maud::html;
use serde::Deserialize;

use super::Shared;
use crate::auth::Session;
use crate::html::{self, Failure};

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Asked {
    #[serde(default)]
    pipeline: String,
    #[serde(default)]
    record_id: String,
}

pub(crate) async fn page(
    console: Shared,
    Extension(session): Extension<Session>,
    Query(asked): Query<Asked>,
) -> Result<Response, Failure> {
    let record_id = asked.record_id.trim();
    let pipeline = if asked.pipeline.is_empty() {
        console
            .pipelines
            .first()
            .map(|p| p.name().to_owned())
            .unwrap_or_default()
    } else {
        asked.pipeline.clone()
    };
    super::letters::shown(&console, &pipeline)?;
    let (steps, found) = if record_id.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        let query = LetterQuery {
            record_id: Some(record_id.to_owned()),
            ..LetterQuery::dead(&pipeline)
        };
        let any_state = LetterQuery {
            state: None,
            ..query
        };
        (
            read::lineage(&console.database, &pipeline, record_id).await?,
            letters::page(&console.database, &any_state, None, 100).await?,
        )
    };
    let body = html! {
        form.filters method="get" action="/lineage" {
            label { "Pipeline" select name="pipeline" {
                @for p in &console.pipelines { option value=(p.name()) selected[p.name() == pipeline] { (p.name()) } }
            } }
            label { "Record id" input name="record_id" value=(record_id) required; }
            button type="submit" { "Trace" }
        }
        @if !record_id.is_empty() {
            @if steps.is_empty() && found.is_empty() {
                p { "The ledger holds nothing of record " code { (record_id) } " in " (pipeline) " (within its retention)." }
            }
            @if !steps.is_empty() {
                h2 { "Through the stages" }
                table { thead { tr { th { "sent at" } th { "into" } th { "by" } th { "message" } th { "from" } th { "settled" } th { "at" } } }
                    tbody { @for step in &steps { tr {
                        td { (html::time(&step.sent_at)) }
                        td { (step.stage) } td { (step.sent_by) }
                        td { code { (step.message_id) } } td { code { (step.parent_id) } }
                        td { @match step.outcome.as_deref() {
                            None => { span.alarm { "in flight" } }
                            Some(_) if step.dead_lettered => { span.alarm { "dead-lettered" } }
                            Some(_) if step.filtered => { "filtered by a rule" }
                            Some(outcome) => { (outcome) }
                        } }
                        td { (html::maybe_time(step.settled_at.as_ref())) }
                    } } }
                }
            }
            @if !found.is_empty() {
                h2 { "Dead letters" }
                ul { @for letter in &found { li {
                    a href=(format!("/letters/{pipeline}/{}/{}", letter.stage, letter.message_id)) { (html::time(&letter.failed_at)) }
                    " at " (letter.stage) ", " (letter.state) ": " (letter.reason)
                } } }
            }
        }
    };
    Ok(html::page(&console, &session, "Lineage", body))
}
