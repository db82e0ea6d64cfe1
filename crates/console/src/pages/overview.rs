//! The overview: every pipeline's books, stage by stage, its watermark, its dead letters; the call
//! budgets; the workers. The live part refreshes itself in place every few seconds.

use axum::Extension;
use axum::response::{Html, IntoResponse, Response};
use conveyor_ops::overview::{Overview, overview};
use maud::{Markup, html};

use super::Shared;
use crate::auth::Session;
use crate::html::{self, Failure, age, maybe_time, query};

pub(crate) async fn page(
    console: Shared,
    Extension(session): Extension<Session>,
) -> Result<Response, Failure> {
    let live = live_markup(&console).await?;
    let body = html! {
        div data-refresh="/overview/live" data-every="5" { (live) }
        noscript { p.hint { "Reload the page to refresh (with JavaScript it refreshes itself)." } }
    };
    Ok(html::page(&console, &session, "Overview", body))
}

/// The live part alone, for the page's script to swap in.
pub(crate) async fn live(console: Shared) -> Result<Response, Failure> {
    Ok(Html(live_markup(&console).await?.into_string()).into_response())
}

async fn live_markup(console: &Shared) -> Result<Markup, Failure> {
    let read = overview(
        &console.broker,
        &console.database,
        &console.pipelines,
        &console.workers,
    )
    .await?;
    Ok(render(&read))
}

fn render(read: &Overview) -> Markup {
    html! {
        p.hint { "Read at " (html::time(&read.read_at)) "." }
        @for pipeline in &read.pipelines {
            @let status = &pipeline.status;
            section.pipeline id=(format!("pipeline-{}", status.pipeline)) {
                h2 { (status.pipeline) }
                dl.counts {
                    div { dt { "fetched" } dd data-count="fetched" { (status.fetched) } }
                    div { dt { "written" } dd data-count="written" { (status.written) } }
                    div { dt { "dead-lettered" } dd data-count="dead_lettered" {
                        a href=(format!("/letters?{}", query(&[("pipeline", &status.pipeline)]))) { (status.dead_lettered) }
                    } }
                    div { dt { "filtered" } dd data-count="filtered" { (status.filtered) } }
                    div { dt { "in flight" } dd data-count="in_flight" { (status.in_flight) } }
                    div.(if status.unaccounted > 0 { "alarm" } else { "" }) {
                        dt { "unaccounted" } dd data-count="unaccounted" { (status.unaccounted) }
                    }
                }
                @if !status.dead_lettered_by_class.is_empty() {
                    p { "Dead-lettered by class: "
                        @for (class, records) in &status.dead_lettered_by_class {
                            a.tag href=(format!("/letters?{}", query(&[("pipeline", &status.pipeline), ("class", class)]))) {
                                (class) " " (records)
                            } " "
                        }
                    }
                }
                p {
                    "Watermark " strong { (maybe_time(pipeline.watermark.as_ref())) }
                    @if let Some(lag) = pipeline.lag_secs { ", " (age(lag)) " behind now" }
                    "; " (pipeline.pending_windows) " window(s) in progress; the source allows "
                    (pipeline.calls_per_minute) " calls a minute."
                }
                table {
                    thead { tr {
                        th { "stage" } th { "records/s" } th { "entered" } th { "queued msgs" }
                        th { "held msgs" } th { "in flight" } th { "oldest in flight" } th { "dead-lettered" }
                    } }
                    tbody {
                        @for stage in &status.stages {
                            tr {
                                td { (stage.stage) }
                                td.num { (format!("{:.1}", pipeline.rates.get(&stage.stage).copied().unwrap_or(0.0))) }
                                td.num { (stage.entered) }
                                td.num { (stage.queued_messages) }
                                td.num { (stage.held_messages) }
                                td.num { (stage.in_flight) }
                                td { @match stage.oldest_in_flight_at {
                                    Some(at) => { (age((read.read_at - at).num_seconds())) }
                                    None => { "—" }
                                } }
                                td.num { (stage.dead_lettered.values().sum::<u64>()) }
                            }
                        }
                    }
                }
                @if !status.unaccounted_messages.is_empty() {
                    p.alarm { "Unaccounted for: "
                        @for message in status.unaccounted_messages.iter().take(20) {
                            code { (message.stage) " " (message.message_id) } " "
                        }
                    }
                }
            }
        }
        section {
            h2 { "Source call budgets" }
            @if read.budgets.is_empty() { p.hint { "No fetcher has called a source yet." } }
            @else {
                table {
                    thead { tr { th { "budget" } th { "calls/min now" } th { "reserved ahead" } th { "last throttled (429)" } } }
                    tbody { @for budget in &read.budgets { tr {
                        td { code { (budget.key) } }
                        td { @match budget.rate_now { Some(rate) => { (format!("{rate:.1} (cut after throttling)")) } None => { "the configured limit" } } }
                        td { (format!("{:.1}s", budget.reserved_ahead_secs)) }
                        td { (maybe_time(budget.throttled_at.as_ref())) }
                    } } }
                }
            }
        }
        section {
            h2 { "Workers" }
            @if read.workers.is_empty() { p.hint { "No worker addresses given (CONVEYOR_CONSOLE_WORKERS)." } }
            @else {
                table {
                    thead { tr { th { "address" } th { "ready" } } }
                    tbody { @for worker in &read.workers { tr {
                        td { code { (worker.url) } }
                        td { @if let Some(error) = &worker.error { span.alarm { "not answering: " (error) } }
                            @else { @for (what, ready) in &worker.ready {
                                span.(if *ready { "ok" } else { "alarm" }) { (what) (if *ready { " ready" } else { " not ready" }) } " "
                            } } }
                    } } }
                }
            }
        }
    }
}
