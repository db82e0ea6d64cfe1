//! The console's pages, one module per concern, and what they share: the routes, the login, and
//! posted forms checked against the session's CSRF token.

mod actions;
mod letters;
mod lineage;
mod overview;
mod preview;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, FromRequest, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::html;

use crate::Console;
use crate::auth::{self, Session};
use crate::html::Failure;

pub(crate) type Shared = State<Arc<Console>>;

pub(crate) fn routes() -> Router<Arc<Console>> {
    Router::new()
        .route("/", get(overview::page))
        .route("/overview/live", get(overview::live))
        .route("/letters", get(letters::groups))
        .route("/letters/list", get(letters::list))
        .route(
            "/letters/{pipeline}/{stage}/{message_id}",
            get(letters::one),
        )
        .route("/actions/plan", post(actions::plan))
        .route("/actions/run", post(actions::run))
        .route("/jobs", get(actions::jobs))
        .route("/jobs/{id}", get(actions::job))
        .route("/jobs/{id}/live", get(actions::job_live))
        .route("/jobs/{id}/resume", post(actions::resume))
        .route("/lineage", get(lineage::page))
        .route("/preview", get(preview::show).post(preview::run))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/healthz", get(|| async { "ok" }))
        .route("/assets/console.css", get(stylesheet))
        .route("/assets/console.js", get(script))
}

async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../../assets/console.css"),
    )
        .into_response()
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../../assets/console.js"),
    )
        .into_response()
}

/// A posted form's fields, in order (a name may repeat), once its CSRF token matched the session's.
pub(crate) struct Posted {
    pub session: Session,
    pub fields: Vec<(String, String)>,
}

impl Posted {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
            .filter(|value| !value.is_empty())
    }

    pub fn all(&self, name: &str) -> impl Iterator<Item = &str> {
        self.fields
            .iter()
            .filter(move |(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Reads a form body into its fields.
async fn fields_of(request: Request) -> Result<Vec<(String, String)>, Failure> {
    let body = axum::body::to_bytes(request.into_body(), 4 << 20)
        .await
        .map_err(|err| Failure::bad_request(format!("reading the form: {err}")))?;
    Ok(form_urlencoded::parse(&body).into_owned().collect())
}

impl<S: Send + Sync> FromRequest<S> for Posted {
    type Rejection = Failure;

    async fn from_request(request: Request, _state: &S) -> Result<Self, Failure> {
        let session = request
            .extensions()
            .get::<Session>()
            .cloned()
            .ok_or_else(|| Failure::new(StatusCode::UNAUTHORIZED, "log in first"))?;
        let fields = fields_of(request).await?;
        let given = fields
            .iter()
            .find(|(name, _)| name == "csrf")
            .map(|(_, value)| value.as_str())
            .unwrap_or_default();
        if !auth::same_secret(given, &session.csrf) {
            return Err(Failure::new(
                StatusCode::FORBIDDEN,
                "refused: the form's CSRF token is missing or stale (reload the page and try again)",
            ));
        }
        Ok(Self { session, fields })
    }
}

/// Refuses a viewer.
pub(crate) fn operator_only(session: &Session) -> Result<(), Failure> {
    if session.may_act() {
        return Ok(());
    }
    Err(Failure::new(
        StatusCode::FORBIDDEN,
        format!(
            "{} is a {}: viewers see everything and change nothing",
            session.user,
            session.role.as_str()
        ),
    ))
}

async fn login_form(State(console): Shared) -> Response {
    login_page(&console, None, StatusCode::OK)
}

fn login_page(console: &Console, problem: Option<&str>, status: StatusCode) -> Response {
    let body = html! {
        (maud::DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "Log in · conveyor" }
                link rel="stylesheet" href="/assets/console.css";
            }
            body.login {
                main {
                    h1 { "conveyor" }
                    @if !console.has_users() {
                        p { "No users are configured (CONVEYOR_CONSOLE_USERS_FILE): the console is read-only, no login needed. "
                            a href="/" { "Go to the overview" } }
                    } @else {
                        @if let Some(problem) = problem { p.error role="alert" { (problem) } }
                        form method="post" action="/login" {
                            label { "User" input name="user" autocomplete="username" required autofocus; }
                            label { "Password" input name="password" type="password" autocomplete="current-password" required; }
                            button type="submit" { "Log in" }
                        }
                    }
                }
            }
        }
    };
    (status, axum::response::Html(body.into_string())).into_response()
}

async fn login(State(console): Shared, request: Request) -> Response {
    let address = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(address)| address.ip());
    let fields = match fields_of(request).await {
        Ok(fields) => fields,
        Err(failure) => return failure.into_response(),
    };
    let field = |name: &str| {
        fields
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
            .unwrap_or_default()
    };
    let (user, password) = (field("user"), field("password"));
    if let Some(wait) = console.logins.blocked(address, user) {
        let mut response = login_page(
            &console,
            Some("Too many failed logins: wait a minute and try again."),
            StatusCode::TOO_MANY_REQUESTS,
        );
        if let Ok(value) = HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        return response;
    }
    let Some(role) = console.login(user, password) else {
        console.logins.failed(address, user);
        tracing::warn!(user, address = ?address, "a failed console login");
        return login_page(
            &console,
            Some("Wrong user or password."),
            StatusCode::UNAUTHORIZED,
        );
    };
    tracing::info!(user, role = role.as_str(), "logged in to the console");
    let id = console.sessions.open(user, role);
    let mut response = Redirect::to("/").into_response();
    if let Ok(cookie) = HeaderValue::from_str(&console.session_cookie(&id)) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

async fn logout(State(console): Shared, request: Request) -> Response {
    if let Some(id) = crate::cookie(request.headers(), auth::COOKIE) {
        console.sessions.close(&id);
    }
    let mut response = Redirect::to("/login").into_response();
    let gone = format!(
        "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
        auth::COOKIE
    );
    if let Ok(cookie) = HeaderValue::from_str(&gone) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}
