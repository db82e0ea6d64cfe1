//! Dead letters: grouped by stage, class and reason; one group's letters, paged; one letter.

use axum::Extension;
use axum::extract::{Path, Query};
use axum::response::Response;
use chrono::{DateTime, NaiveDateTime, Utc};
use conveyor_amqp::Topology;
use conveyor_ledger::letters::{self, After, LetterQuery, LetterSummary};
use maud::{Markup, html};
use serde::Deserialize;

use super::Shared;
use crate::Console;
use crate::auth::Session;
use crate::html::{self, Failure, csrf, json_marked, query};

/// Letters a list page shows.
pub(crate) const PAGE_SIZE: u32 = 100;

/// The filters of the letter pages, as query parameters.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct Filters {
    #[serde(default)]
    pub pipeline: String,
    #[serde(default)]
    pub stage: String,
    #[serde(default)]
    pub class: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub record_id: String,
    #[serde(default)]
    pub since: String,
    #[serde(default)]
    pub until: String,
    /// `dead` (the default), `replayed`, `purged` or `any`.
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub after_at: String,
    #[serde(default)]
    pub after_id: String,
}

/// A time typed in a filter: RFC 3339, or a browser's `datetime-local` (taken as UTC).
fn parse_time(name: &str, text: &str) -> Result<Option<DateTime<Utc>>, Failure> {
    if text.is_empty() {
        return Ok(None);
    }
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(Some(at.with_timezone(&Utc)));
    }
    for format in ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"] {
        if let Ok(at) = NaiveDateTime::parse_from_str(text, format) {
            return Ok(Some(at.and_utc()));
        }
    }
    Err(Failure::bad_request(format!(
        "{name}: {text:?} is not a time (2026-12-07T14:30 or RFC 3339)"
    )))
}

impl Filters {
    /// The pipeline named, or the only one there is.
    pub fn pipeline<'a>(&'a self, console: &'a Console) -> Result<&'a str, Failure> {
        if !self.pipeline.is_empty() {
            return console
                .pipeline(&self.pipeline)
                .map(|pipeline| pipeline.name())
                .ok_or_else(|| {
                    Failure::not_found(format!("no pipeline is named {:?}", self.pipeline))
                });
        }
        console
            .pipelines
            .first()
            .map(|pipeline| pipeline.name())
            .ok_or_else(|| Failure::not_found("no pipeline is configured"))
    }

    pub fn query(&self, console: &Console) -> Result<LetterQuery, Failure> {
        let some = |text: &str| (!text.is_empty()).then(|| text.to_owned());
        Ok(LetterQuery {
            pipeline: self.pipeline(console)?.to_owned(),
            stage: some(&self.stage),
            class: some(&self.class),
            reason: some(&self.reason),
            record_id: some(self.record_id.trim()),
            since: parse_time("since", &self.since)?,
            until: parse_time("until", &self.until)?,
            state: match self.state.as_str() {
                "" => Some("dead".to_owned()),
                "any" => None,
                other => Some(other.to_owned()),
            },
        })
    }

    /// The filters as query pairs (paging left out).
    pub fn pairs(&self) -> Vec<(&'static str, &str)> {
        vec![
            ("pipeline", self.pipeline.as_str()),
            ("stage", &self.stage),
            ("class", &self.class),
            ("reason", &self.reason),
            ("record_id", &self.record_id),
            ("since", &self.since),
            ("until", &self.until),
            ("state", &self.state),
        ]
    }

    /// The filters narrowed to one group of letters.
    pub fn of_group(&self, group: &letters::Group) -> Self {
        Self {
            stage: group.stage.clone(),
            class: group.class.clone(),
            reason: group.reason.clone(),
            ..self.clone()
        }
    }

    /// The query string of the page after `last`.
    pub fn after(&self, last: &LetterSummary) -> String {
        let at = last.failed_at.to_rfc3339();
        let mut pairs = self.pairs();
        pairs.extend([
            ("after_at", at.as_str()),
            ("after_id", last.message_id.as_str()),
        ]);
        query(&pairs)
    }

    /// The filters as hidden fields of a form that acts on the selection.
    pub fn hidden(&self) -> Markup {
        html! {
            @for (name, value) in self.pairs() {
                @if !value.is_empty() { input type="hidden" name=(name) value=(value); }
            }
        }
    }
}

fn filter_form(console: &Console, filters: &Filters, action: &str) -> Markup {
    let selected = filters.pipeline(console).unwrap_or_default();
    html! {
        form.filters method="get" action=(action) {
            label { "Pipeline" select name="pipeline" {
                @for pipeline in &console.pipelines {
                    option value=(pipeline.name()) selected[pipeline.name() == selected] { (pipeline.name()) }
                }
            } }
            label { "Stage" select name="stage" {
                @for stage in ["", "fetch", "transform", "write"] {
                    option value=(stage) selected[filters.stage == stage] { (if stage.is_empty() { "any" } else { stage }) }
                }
            } }
            label { "Class" select name="class" {
                @for class in ["", "permanent", "transient", "malformed", "broker"] {
                    option value=(class) selected[filters.class == class] { (if class.is_empty() { "any" } else { class }) }
                }
            } }
            label { "Record id" input name="record_id" value=(filters.record_id); }
            label { "Failed since" input name="since" type="datetime-local" value=(filters.since); }
            label { "until" input name="until" type="datetime-local" value=(filters.until); }
            label { "State" select name="state" {
                @for (state, shown) in [("", "in the queue"), ("replayed", "replayed"), ("purged", "purged"), ("any", "any")] {
                    option value=(state) selected[filters.state == state] { (shown) }
                }
            } }
            @if !filters.reason.is_empty() { input type="hidden" name="reason" value=(filters.reason); }
            button type="submit" { "Filter" }
        }
    }
}

/// The buttons that plan a replay or purge of a selection (a dry run comes first).
fn act_buttons(session: &Session, hidden: Markup, what: &str) -> Markup {
    if !session.may_act() {
        return html! {};
    }
    html! {
        form.inline method="post" action="/actions/plan" {
            (csrf(session)) (hidden)
            button name="action" value="replay" { "Replay " (what) "…" }
            " "
            button.danger name="action" value="purge" { "Purge " (what) "…" }
        }
    }
}

pub(crate) async fn groups(
    console: Shared,
    Extension(session): Extension<Session>,
    Query(filters): Query<Filters>,
) -> Result<Response, Failure> {
    let query = filters.query(&console)?;
    // Letters the index lacks (the broker's own) are indexed first: a short read of a queue only
    // when its count and the index's differ.
    let topology = Topology::new(&console.broker, &query.pipeline);
    let connection = conveyor_amqp::connect(
        &console.broker.address().map_err(anyhow::Error::from)?,
        "conveyor-console",
    )
    .await
    .map_err(anyhow::Error::from)?;
    let refreshed =
        conveyor_ops::letters::refresh_index(&connection, &console.database, &topology).await;
    conveyor_amqp::close(&connection).await;
    refreshed?;
    let groups = letters::groups(&console.database, &query).await?;
    let total: u64 = groups.iter().map(|group| group.letters).sum();
    let body = html! {
        (filter_form(&console, &filters, "/letters"))
        p { (total) " letter(s) in " (groups.len()) " group(s). "
            a href=(format!("/letters/list?{}", query_of(&filters))) { "List them all" } }
        @if total > 0 { (act_buttons(&session, filters.hidden(), "all of these")) }
        table.groups {
            thead { tr { th { "stage" } th { "class" } th { "reason" } th { "letters" } th { "records" } th { "first failed" } th { "last failed" } th {} } }
            tbody {
                @for group in &groups {
                    @let of_group = filters.of_group(group);
                    tr {
                        td { (group.stage) }
                        td { span.tag { (group.class) } }
                        td.reason { a href=(format!("/letters/list?{}", query_of(&of_group))) { (group.reason) } }
                        td.num { (group.letters) }
                        td.num { (group.records) }
                        td { (html::time(&group.first_failed_at)) }
                        td { (html::time(&group.last_failed_at)) }
                        td { (act_buttons(&session, of_group.hidden(), "group")) }
                    }
                }
            }
        }
    };
    Ok(html::page(&console, &session, "Dead letters", body))
}

fn query_of(filters: &Filters) -> String {
    query(&filters.pairs())
}

pub(crate) async fn list(
    console: Shared,
    Extension(session): Extension<Session>,
    Query(filters): Query<Filters>,
) -> Result<Response, Failure> {
    let query = filters.query(&console)?;
    let after = match parse_time("after_at", &filters.after_at)? {
        Some(failed_at) => Some(After {
            failed_at,
            message_id: filters.after_id.clone(),
        }),
        None => None,
    };
    let total = letters::count(&console.database, &query).await?;
    let page = letters::page(&console.database, &query, after.as_ref(), PAGE_SIZE).await?;
    let next = (page.len() as u32 == PAGE_SIZE)
        .then(|| page.last())
        .flatten();
    let body = html! {
        (filter_form(&console, &filters, "/letters/list"))
        @if !filters.reason.is_empty() { p { "Reason: " q.reason { (filters.reason) } " " a href=(format!("/letters/list?{}", html::query(&filters.pairs().into_iter().filter(|(n, _)| *n != "reason").collect::<Vec<_>>()))) { "(any reason)" } } }
        p { (total) " letter(s)." }
        @if total > 0 { (act_buttons(&session, filters.hidden(), "all of these")) }
        form method="post" action="/actions/plan" {
            (csrf(&session))
            input type="hidden" name="pipeline" value=(query.pipeline);
            (letter_table(&query.pipeline, &page, session.may_act()))
            @if session.may_act() && !page.is_empty() {
                p { button name="action" value="replay" { "Replay the ticked letters…" } " "
                    button.danger name="action" value="purge" { "Purge the ticked letters…" } }
            }
        }
        @if let Some(last) = next {
            p { a.next href=(format!("/letters/list?{}", filters.after(last))) { "Next " (PAGE_SIZE) " →" } }
        }
    };
    Ok(html::page(&console, &session, "Dead letters: list", body))
}

fn letter_table(pipeline: &str, letters: &[LetterSummary], selectable: bool) -> Markup {
    html! {
        table.letters {
            thead { tr { @if selectable { th {} } th { "failed" } th { "stage" } th { "class" } th { "reason" } th { "records" } th { "replays" } th { "state" } } }
            tbody {
                @for letter in letters {
                    tr {
                        @if selectable { td { input type="checkbox" name="letter" value=(format!("{}/{}", letter.stage, letter.message_id)) aria-label="select"; } }
                        td { a href=(format!("/letters/{pipeline}/{}/{}", letter.stage, letter.message_id)) { (html::time(&letter.failed_at)) } }
                        td { (letter.stage) }
                        td { span.tag { (letter.class) } }
                        td.reason { (letter.reason) }
                        td { (ids_shown(&letter.record_ids)) }
                        td.num { @if letter.replays > 0 { span.alarm title="died again after a replay" { (letter.replays) } } @else { "0" } }
                        td { (letter.state) }
                    }
                }
            }
        }
    }
}

fn ids_shown(ids: &[String]) -> String {
    match ids {
        [] => "—".to_owned(),
        [one] => one.clone(),
        [first, rest @ ..] => format!("{first} and {} more", rest.len()),
    }
}

/// Refuses a pipeline this console does not show (the ledger may hold others').
pub(crate) fn shown(console: &Console, pipeline: &str) -> Result<(), Failure> {
    match console.pipeline(pipeline) {
        Some(_) => Ok(()),
        None => Err(Failure::not_found(format!(
            "no pipeline is named {pipeline:?}"
        ))),
    }
}

/// Field names a reason mentions: the payload lines of those keys are marked.
fn fields_named(reason: &str, payload: &str) -> Vec<String> {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(payload) else {
        return Vec::new();
    };
    let mut keys = Vec::new();
    collect_keys(&value, &mut keys);
    let words: Vec<&str> = reason
        .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'))
        .flat_map(|word| word.split('.'))
        .filter(|word| !word.is_empty())
        .collect();
    keys.retain(|key| words.contains(&key.as_str()));
    keys.sort();
    keys.dedup();
    keys
}

fn collect_keys(value: &serde_json::Value, keys: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(object) => {
            for (key, value) in object {
                keys.push(key.clone());
                collect_keys(value, keys);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|item| collect_keys(item, keys)),
        _ => {}
    }
}

pub(crate) async fn one(
    console: Shared,
    Extension(session): Extension<Session>,
    Path((pipeline, stage, message_id)): Path<(String, String, String)>,
) -> Result<Response, Failure> {
    shown(&console, &pipeline)?;
    let Some(letter) = letters::letter(&console.database, &pipeline, &stage, &message_id).await?
    else {
        return Err(Failure::not_found(format!(
            "pipeline {pipeline} has no dead letter {message_id} at its {stage} stage"
        )));
    };
    let summary = &letter.summary;
    let marked = fields_named(&summary.reason, &letter.payload);
    let work_queue = Topology::new(&console.broker, &pipeline).queue(
        conveyor_base::Stage::ALL
            .into_iter()
            .find(|s| s.as_str() == stage)
            .unwrap_or(conveyor_base::Stage::Transform),
    );
    let body = html! {
        dl.facts {
            div { dt { "pipeline" } dd { (pipeline) } }
            div { dt { "stage" } dd { (summary.stage) } }
            div { dt { "class" } dd { span.tag { (summary.class) } } }
            div { dt { "state" } dd { (summary.state) @if let Some(action) = letter.action_id { " (action #" (action) ")" } } }
            div { dt { "failed at" } dd { (html::time(&summary.failed_at)) } }
            div { dt { "tries" } dd { (summary.attempts) } }
            div { dt { "replayed before" } dd { (summary.replays) " time(s)" } }
            div { dt { "message id" } dd { code { (summary.message_id) } } }
        }
        h2 { "Reason" }
        p.error.reason { (summary.reason) }
        @if let Some(earlier) = &letter.replay_of {
            p.alarm { "This letter died again after a replay of letter "
                a href=(format!("/letters/{pipeline}/{stage}/{earlier}")) { code { (earlier) } } "." }
        }
        h2 { "Failure history" }
        @if letter.earlier.is_empty() { p.hint { "No earlier letter of these records." } }
        @else { (letter_table(&pipeline, &letter.earlier, false)) }
        h2 { "Records" }
        ul.ids { @for id in &summary.record_ids {
            li { a href=(format!("/lineage?{}", query(&[("pipeline", &pipeline), ("record_id", id)]))) { code { (id) } } }
        } }
        @if session.may_act() && summary.state == "dead" {
            form.inline method="post" action="/actions/plan" {
                (csrf(&session))
                input type="hidden" name="pipeline" value=(pipeline);
                input type="hidden" name="letter" value=(format!("{stage}/{message_id}"));
                button name="action" value="replay" { "Replay this letter…" } " "
                button.danger name="action" value="purge" { "Purge this letter…" }
            }
            p.hint { "A replay sends it back to " code { (work_queue) } "." }
        }
        p { a href=(format!("/preview?{}", query(&[("pipeline", &pipeline), ("letter", &format!("{stage}/{message_id}"))]))) { "Try the pipeline's rules on this letter's records" } }
        h2 { "Payload" }
        @if letter.payload_bytes as usize > letter.payload.len() {
            p.hint { "Cut at " (letter.payload.len()) " of " (letter.payload_bytes) " bytes (the queue keeps all of it)." }
        }
        @if !marked.is_empty() { p.hint { "Marked: the field(s) the reason names: " (marked.join(", ")) } }
        (json_marked(&letter.payload, &marked))
        h2 { "Headers" }
        table.headers { tbody {
            @if let serde_json::Value::Object(headers) = &letter.headers {
                @for (name, value) in headers { tr { th { (name) } td { (value.as_str().map(str::to_owned).unwrap_or_else(|| value.to_string())) } } }
            }
        } }
    };
    Ok(html::page(&console, &session, "Dead letter", body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_marks_the_fields_it_names() {
        let payload = r#"{"records":[{"id":"A","data":{"amount":"x","customer":{"name":"n"}}}]}"#;
        assert_eq!(
            fields_named("field amount: not a decimal: \"x\"", payload),
            ["amount"]
        );
        assert_eq!(
            fields_named("customer.name is too long", payload),
            ["customer", "name"]
        );
        assert!(fields_named("the target refused it", payload).is_empty());
        assert!(fields_named("amount", "not json").is_empty());
    }

    #[test]
    fn times_typed_in_filters_are_read_or_named() {
        assert!(parse_time("since", "2026-12-07T14:30").unwrap().is_some());
        assert!(
            parse_time("since", "2026-12-07T14:30:00+08:00")
                .unwrap()
                .is_some()
        );
        assert!(parse_time("since", "").unwrap().is_none());
        let err = parse_time("since", "yesterday").err().unwrap();
        assert!(
            err.message.contains("since: \"yesterday\""),
            "{}",
            err.message
        );
    }
}
