//! The page shell and the small pieces every page uses. maud escapes every value it is given, so
//! nothing from a letter, a record or a reason can become markup.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use crate::Console;
use crate::auth::Session;

/// A rendered page.
pub fn page(console: &Console, session: &Session, title: &str, body: Markup) -> Response {
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    title { (title) " · conveyor" }
                    link rel="stylesheet" href="/assets/console.css";
                    script src="/assets/console.js" defer {}
                }
                body {
                    header {
                        nav {
                            a.brand href="/" { "conveyor" }
                            a href="/" { "Overview" }
                            a href="/letters" { "Dead letters" }
                            a href="/jobs" { "Jobs" }
                            a href="/lineage" { "Lineage" }
                            a href="/preview" { "Rule preview" }
                            @if let Some(grafana) = &console.grafana_url {
                                a href=(grafana) rel="noopener" { "Grafana ↗" }
                            }
                        }
                        div.who {
                            span.user { (session.user) } " "
                            span.role { (session.role.as_str()) }
                            @if console.has_users() {
                                form method="post" action="/logout" {
                                    (csrf(session))
                                    button.link type="submit" { "Log out" }
                                }
                            } @else {
                                " (read-only: no CONVEYOR_CONSOLE_USERS_FILE)"
                            }
                        }
                    }
                    main {
                        h1 { (title) }
                        (body)
                    }
                }
            }
        }
        .into_string(),
    )
    .into_response()
}

/// The hidden CSRF field of a form that changes something.
pub fn csrf(session: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(session.csrf); }
}

/// A time as operators read it, in UTC.
pub fn time(at: &DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// A time, or a dash.
pub fn maybe_time(at: Option<&DateTime<Utc>>) -> String {
    at.map(time).unwrap_or_else(|| "—".to_owned())
}

/// Seconds as `3d 4h`, `5m 2s`.
pub fn age(seconds: i64) -> String {
    let seconds = seconds.max(0);
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m {}s", seconds / 60, seconds % 60),
        3600..86400 => format!("{}h {}m", seconds / 3600, seconds % 3600 / 60),
        _ => format!("{}d {}h", seconds / 86400, seconds % 86400 / 3600),
    }
}

/// A query string from pairs, each escaped.
pub fn query(pairs: &[(&str, &str)]) -> String {
    let mut serializer = form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs.iter().filter(|(_, value)| !value.is_empty()) {
        serializer.append_pair(name, value);
    }
    serializer.finish()
}

/// An error page's answer: plain words, with the status.
#[derive(Debug)]
pub struct Failure {
    pub status: StatusCode,
    pub message: String,
}

impl Failure {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(err: anyhow::Error) -> Self {
        tracing::warn!(error = %format!("{err:#}"), "a console page failed");
        Self::new(StatusCode::SERVICE_UNAVAILABLE, format!("{err:#}"))
    }
}

impl From<conveyor_postgres::DatabaseError> for Failure {
    fn from(err: conveyor_postgres::DatabaseError) -> Self {
        anyhow::Error::from(err).into()
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let body = html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    title { "conveyor: " (self.status.as_u16()) }
                    link rel="stylesheet" href="/assets/console.css";
                }
                body {
                    main {
                        h1 { (self.status.canonical_reason().unwrap_or("Error")) }
                        p.error { (self.message) }
                        p { a href="/" { "Back to the overview" } }
                    }
                }
            }
        };
        (self.status, Html(body.into_string())).into_response()
    }
}

/// JSON pretty-printed, each line of a key in `marked` highlighted (the field a reason names).
pub fn json_marked(text: &str, marked: &[String]) -> Markup {
    let pretty = serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|value| serde_json::to_string_pretty(&value).ok());
    let Some(pretty) = pretty else {
        return html! { pre.payload { (text) } };
    };
    html! {
        pre.payload {
            @for line in pretty.lines() {
                @let key = line.trim_start().strip_prefix('"').and_then(|rest| rest.split_once("\":")).map(|(key, _)| key);
                @if key.is_some_and(|key| marked.iter().any(|m| m == key)) {
                    mark title="the field the reason names" { (line) } (PreEscaped("\n"))
                } @else {
                    (line) (PreEscaped("\n"))
                }
            }
        }
    }
}
