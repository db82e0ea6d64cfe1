//! A record's way through a pipeline ([`conveyor_ops::lineage`]): each message that carried it into a
//! stage, what the stage settled, the dead letters it is in, and its row at the target.

use axum::Extension;
use axum::extract::Query;
use axum::response::Response;
use conveyor_ops::lineage::TargetRow;
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
    let lineage = match console.pipeline(&pipeline) {
        Some(shown) if !record_id.is_empty() => {
            Some(conveyor_ops::lineage::lineage(&console.database, shown, record_id).await?)
        }
        _ => None,
    };
    let body = html! {
        form.filters method="get" action="/lineage" {
            label { "Pipeline" select name="pipeline" {
                @for p in &console.pipelines { option value=(p.name()) selected[p.name() == pipeline] { (p.name()) } }
            } }
            label { "Record id" input name="record_id" value=(record_id) required; }
            button type="submit" { "Trace" }
        }
        @if let Some(lineage) = &lineage {
            @if lineage.steps.is_empty() && lineage.letters.is_empty() {
                p { "The ledger holds nothing of record " code { (record_id) } " in " (pipeline) " (within its retention)." }
            }
            @if !lineage.steps.is_empty() {
                h2 { "Through the stages" }
                table { thead { tr { th { "sent at" } th { "into" } th { "by" } th { "message" } th { "from" } th { "settled" } th { "at" } } }
                    tbody { @for step in &lineage.steps { tr {
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
            @if !lineage.letters.is_empty() {
                h2 { "Dead letters" }
                ul { @for letter in &lineage.letters { li {
                    a href=(format!("/letters/{pipeline}/{}/{}", letter.stage, letter.message_id)) { (html::time(&letter.failed_at)) }
                    " at " (letter.stage) ", " (letter.state) ": " (letter.reason)
                } } }
            }
            h2 { "At the target" }
            @match &lineage.target {
                TargetRow::Held(row) => { (html::json_marked(&row.to_string(), &[])) }
                TargetRow::Absent => { p.alarm.target-absent { "The target holds no row " code { (record_id) } "." } }
                TargetRow::NotRead(why) => { p.hint { "Not read: " (why) "." } }
            }
        }
    };
    Ok(html::page(&console, &session, "Lineage", body))
}
