//! The rule preview: a pipeline's own mapping applied to a source row pasted in, or to the records of
//! a dead letter, shown field by field with each error in words. Nothing typed into the page is run
//! as an expression: only the pipeline file's rules, compiled at start, under the transformer's own
//! limits.

use axum::Extension;
use axum::extract::Query;
use axum::response::Response;
use conveyor_ledger::letters;
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::Value;

use super::{Posted, Shared};
use crate::Console;
use crate::auth::Session;
use crate::html::{self, Failure, csrf};

/// Source rows previewed at once at most.
const MOST_ROWS: usize = 1000;

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Asked {
    #[serde(default)]
    pipeline: String,
    /// `stage/message_id` of a dead letter whose records fill the form.
    #[serde(default)]
    letter: String,
}

/// The source rows of a letter's payload: its records' data (an envelope), or the payload itself.
fn rows_of(payload: &str) -> String {
    let Ok(value) = serde_json::from_str::<Value>(payload) else {
        return payload.to_owned();
    };
    let rows: Option<Vec<Value>> = value
        .get("records")
        .and_then(Value::as_array)
        .map(|records| {
            records
                .iter()
                .map(|record| {
                    record
                        .get("data")
                        .cloned()
                        .unwrap_or_else(|| record.clone())
                })
                .collect()
        });
    let shown = match rows {
        Some(rows) if rows.len() == 1 => rows.into_iter().next().unwrap_or_default(),
        Some(rows) => Value::Array(rows),
        None => value,
    };
    serde_json::to_string_pretty(&shown).unwrap_or_else(|_| payload.to_owned())
}

fn form(console: &Console, session: &Session, pipeline: &str, sample: &str) -> Markup {
    html! {
        form method="post" action="/preview" {
            (csrf(session))
            label { "Pipeline" select name="pipeline" {
                @for p in &console.pipelines { option value=(p.name()) selected[p.name() == pipeline] { (p.name()) } }
            } }
            label.wide { "Source rows (JSON: one row, an array of rows, or a list response)"
                textarea name="sample" rows="14" spellcheck="false" required { (sample) } }
            button type="submit" { "Preview" }
        }
    }
}

fn form_page(
    console: &Console,
    session: &Session,
    pipeline: &str,
    sample: &str,
    result: Markup,
) -> Response {
    let body = html! { (form(console, session, pipeline, sample)) (result) };
    html::page(console, session, "Rule preview", body)
}

pub(crate) async fn show(
    console: Shared,
    Extension(session): Extension<Session>,
    Query(asked): Query<Asked>,
) -> Result<Response, Failure> {
    let mut sample = String::new();
    let mut pipeline = asked.pipeline.clone();
    if let Some((stage, id)) = asked.letter.split_once('/') {
        super::letters::shown(&console, &asked.pipeline)?;
        let letter = letters::letter(&console.database, &asked.pipeline, stage, id)
            .await?
            .ok_or_else(|| Failure::not_found(format!("no dead letter {id} at {stage}")))?;
        sample = rows_of(&letter.payload);
        pipeline = letter.pipeline;
    }
    Ok(form_page(&console, &session, &pipeline, &sample, html! {}))
}

pub(crate) async fn run(console: Shared, posted: Posted) -> Result<Response, Failure> {
    let name = posted.get("pipeline").unwrap_or_default();
    let pipeline = console
        .pipeline(name)
        .ok_or_else(|| Failure::not_found(format!("no pipeline is named {name:?}")))?;
    let sample_text = posted.get("sample").unwrap_or_default();
    let result = match serde_json::from_str::<Value>(sample_text) {
        Err(err) => html! { p.error { "The rows are not JSON: " (err) } },
        Ok(sample) if sample.as_array().is_some_and(|rows| rows.len() > MOST_ROWS) => {
            html! { p.error { "At most " (MOST_ROWS) " rows at once." } }
        }
        Ok(sample) => {
            let preview = conveyor_transformer::preview(
                &pipeline.mapping,
                &pipeline.spec.source.id_field,
                sample,
            );
            render(&preview)
        }
    };
    Ok(form_page(
        &console,
        &posted.session,
        name,
        sample_text,
        result,
    ))
}

fn render(preview: &conveyor_transformer::Preview) -> Markup {
    html! {
        section.preview {
            h2 { "Output: " (preview.records.len()) " record(s), " (preview.errors.len()) " error(s), " (preview.filtered) " filtered" }
            @for error in &preview.errors {
                p.error.mapping-error {
                    "Row " (error.index + 1)
                    @if let Some(id) = &error.id { " (id " code { (id.to_string()) } ")" }
                    ": field " code { (error.field) } ": " (error.reason)
                }
            }
            @for record in &preview.records {
                h3 { "Record " code { (record.id) } }
                table.fields {
                    thead { tr { th { "field" } th { "value" } } }
                    tbody {
                        @match record.fields() {
                            Ok(Value::Object(fields)) => {
                                @for (name, value) in &fields { tr { th { (name) } td { code { (value.to_string()) } } } }
                            }
                            Ok(other) => { tr { td colspan="2" { code { (other.to_string()) } } } }
                            Err(err) => { tr { td colspan="2" { "unreadable: " (err) } } }
                        }
                    }
                }
            }
        }
    }
}
