//! The operators' web console: the overview of every pipeline, the dead letters (grouped, filtered,
//! paged, opened one by one), replay and purge jobs with a dry run first, a record's lineage, and a
//! preview of a pipeline's rules. Server-rendered HTML that reads without JavaScript; a small script
//! refreshes live parts in place.
//!
//! Every number and every action comes from `conveyor_ops` (the operator library `conveyorctl` uses
//! too): the console renders and asks, it does no operator logic of its own. Who may do what is in
//! [`auth`].

pub mod auth;
mod html;
mod pages;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use conveyor_amqp::settings::BrokerArgs;
use conveyor_base::telemetry::LogFormat;
use conveyor_pipeline::Pipeline;
use conveyor_postgres::{Database, PostgresArgs};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use auth::{LoginLimiter, Role, Session, Sessions, Users};

/// The console's settings (every flag also reads an environment variable).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "conveyor-console",
    version,
    about = "The operators' web console"
)]
pub struct Cli {
    /// The pipelines shown: pipeline files (TOML) and directories of them, comma-separated.
    #[arg(
        long = "pipeline",
        env = "CONVEYOR_PIPELINE",
        value_delimiter = ',',
        required = true
    )]
    pub pipelines: Vec<PathBuf>,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Where the ledger is (the console needs it: it browses the ledger's letter index).
    #[command(flatten)]
    pub postgres: PostgresArgs,
    /// The address to serve on. Anything but a loopback address needs CONVEYOR_CONSOLE_USERS_FILE.
    #[arg(long, env = "CONVEYOR_CONSOLE_ADDR", default_value = "127.0.0.1:9480")]
    pub listen: SocketAddr,
    /// The users: a secret file of `name:role:password` lines (role operator or viewer). Without
    /// it the console is read-only, and serves on a loopback address only.
    #[arg(long, env = "CONVEYOR_CONSOLE_USERS_FILE")]
    pub users_file: Option<PathBuf>,
    /// The URLs browsers reach the console at (scheme://host[:port], comma-separated): requests for
    /// other hosts, and actions posted from other origins, are refused. Defaults to the listen
    /// address, as `localhost` and as itself.
    #[arg(
        long = "public-url",
        env = "CONVEYOR_CONSOLE_PUBLIC_URL",
        value_delimiter = ','
    )]
    pub public_urls: Vec<String>,
    /// Workers' metrics URLs (comma-separated): their readiness is shown, each address a host name
    /// resolves to on its own (a scaled compose service).
    #[arg(
        long = "workers",
        env = "CONVEYOR_CONSOLE_WORKERS",
        value_delimiter = ','
    )]
    pub workers: Vec<String>,
    /// The Grafana dashboard, linked from every page.
    #[arg(long, env = "CONVEYOR_CONSOLE_GRAFANA_URL")]
    pub grafana_url: Option<String>,
    /// Log format.
    #[arg(long, env = "CONVEYOR_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log filter: a level, or comma-separated target=level (e.g. info,conveyor_amqp=debug).
    #[arg(long, env = "CONVEYOR_LOG", default_value = "info")]
    pub log_filter: String,
}

/// What every request of the console shares.
pub struct Console {
    pub broker: BrokerArgs,
    pub database: Database,
    pub pipelines: Vec<Pipeline>,
    users: Option<Users>,
    sessions: Sessions,
    logins: LoginLimiter,
    /// `scheme://host[:port]` of every URL the console is reached at.
    origins: Vec<String>,
    secure_cookie: bool,
    pub workers: Vec<String>,
    pub grafana_url: Option<String>,
    /// The session of every request when no users are configured: read-only.
    anonymous: Session,
    /// Replay and purge jobs running in this process.
    jobs: TaskTracker,
}

impl Console {
    /// Checks the settings (naming the wrong one), loads the pipelines and the users, connects to
    /// the ledger.
    pub async fn open(cli: &Cli) -> anyhow::Result<Arc<Self>> {
        let users = cli.users_file.as_deref().map(Users::load).transpose()?;
        if users.is_none() && !cli.listen.ip().is_loopback() {
            anyhow::bail!(
                "CONVEYOR_CONSOLE_ADDR: {} is not a loopback address, and no CONVEYOR_CONSOLE_USERS_FILE \
                 is set: the console serves other hosts only behind a login",
                cli.listen
            );
        }
        let files = conveyor_runtime::settings::pipeline_files(&cli.pipelines)?;
        let pipelines = files
            .iter()
            .map(Pipeline::load)
            .collect::<Result<Vec<_>, _>>()?;
        let database = Database::connect(&cli.postgres)?;
        conveyor_ledger::migrate(&database)
            .await
            .context("opening the ledger (the console browses its letter index)")?;
        let origins = origins(cli)?;
        let secure_cookie = origins.iter().all(|origin| origin.starts_with("https://"));
        Ok(Arc::new(Self {
            broker: cli.broker.clone(),
            database,
            pipelines,
            users,
            sessions: Sessions::default(),
            logins: LoginLimiter::default(),
            origins,
            secure_cookie,
            workers: cli.workers.clone(),
            grafana_url: cli.grafana_url.clone(),
            anonymous: Session::anonymous(),
            jobs: TaskTracker::new(),
        }))
    }

    pub fn pipeline(&self, name: &str) -> Option<&Pipeline> {
        self.pipelines.iter().find(|p| p.name() == name)
    }

    /// Runs job `id` in the background (a job another console runs already is left to it).
    pub fn spawn_job(self: &Arc<Self>, id: i64) {
        let console = self.clone();
        self.jobs.spawn(async move {
            if let Err(err) =
                conveyor_ops::letters::run_job(&console.broker, &console.database, id).await
            {
                tracing::error!(job = id, error = %format!("{err:#}"), "a replay or purge job stopped; it resumes when the console starts again");
            }
        });
    }
}

fn origins(cli: &Cli) -> anyhow::Result<Vec<String>> {
    if cli.public_urls.is_empty() {
        let port = cli.listen.port();
        let mut origins = vec![format!("http://localhost:{port}")];
        if !cli.listen.ip().is_unspecified() {
            origins.push(format!("http://{}", cli.listen));
        } else {
            origins.push(format!("http://127.0.0.1:{port}"));
        }
        return Ok(origins);
    }
    cli.public_urls
        .iter()
        .map(|url| {
            let parsed = reqwest::Url::parse(url).map_err(|err| {
                anyhow::anyhow!("CONVEYOR_CONSOLE_PUBLIC_URL: {url:?} is no URL: {err}")
            })?;
            let host = parsed.host_str().unwrap_or_default();
            Ok(match parsed.port() {
                Some(port) => format!("{}://{host}:{port}", parsed.scheme()),
                None => format!("{}://{host}", parsed.scheme()),
            })
        })
        .collect()
}

/// The console's routes, behind its guard.
pub fn router(console: Arc<Console>) -> Router {
    pages::routes()
        .layer(middleware::from_fn_with_state(console.clone(), guard))
        .with_state(console)
}

/// Serves the console until `shutdown`; resumes the jobs left running first.
/// The `conveyor-console` process: its command line, then [`run`] until SIGTERM. Here and not in the
/// binary, so that the async code is compiled in this crate, once.
pub fn main() -> std::process::ExitCode {
    let cli = <Cli as clap::Parser>::parse();
    let (format, filter) = (cli.log_format, cli.log_filter.clone());
    conveyor_runtime::process::run_service(format, &filter, |shutdown| run(cli, shutdown))
}

pub async fn run(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<()> {
    let console = Console::open(&cli).await?;
    for id in conveyor_ledger::jobs::running(&console.database).await? {
        tracing::info!(job = id, "resuming a replay or purge job");
        console.spawn_job(id);
    }
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("CONVEYOR_CONSOLE_ADDR: cannot listen on {}", cli.listen))?;
    tracing::info!(
        address = %cli.listen,
        users = console.users.is_some(),
        "the console is serving"
    );
    let app = router(console.clone()).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    console.jobs.close();
    console.jobs.wait().await;
    Ok(())
}

/// The Content-Security-Policy of every page: nothing but the console's own script and styles, no
/// framing, forms only to itself.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
    connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Paths served without a session.
fn public(path: &str) -> bool {
    path == "/login" || path == "/healthz" || path.starts_with("/assets/")
}

/// Every request: the host must be the console's own (no DNS rebinding), a POST must come from the
/// console's origin, a session is needed past the login page; every answer carries the security
/// headers.
async fn guard(State(console): State<Arc<Console>>, mut request: Request, next: Next) -> Response {
    let headers = request.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .unwrap_or_default();
    // The health check answers whatever the host name (a container's probe uses its own address).
    let health = request.uri().path() == "/healthz";
    let known_host = console
        .origins
        .iter()
        .any(|origin| origin_host(origin) == host);
    let mut response = if !health && !known_host {
        refuse(
            StatusCode::MISDIRECTED_REQUEST,
            "this console is not served at that host name (CONVEYOR_CONSOLE_PUBLIC_URL)",
        )
    } else if request.method() == Method::POST && !from_own_origin(&console, headers) {
        refuse(
            StatusCode::FORBIDDEN,
            "refused: the request did not come from the console's own pages",
        )
    } else if public(request.uri().path()) {
        next.run(request).await
    } else {
        match console.session_of(request.headers()) {
            Some(session) => {
                request.extensions_mut().insert(session);
                next.run(request).await
            }
            None if request.method() == Method::GET => Redirect::to("/login").into_response(),
            None => refuse(StatusCode::UNAUTHORIZED, "log in first"),
        }
    };
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

fn origin_host(origin: &str) -> &str {
    origin.split_once("://").map_or(origin, |(_, host)| host)
}

fn from_own_origin(console: &Console, headers: &HeaderMap) -> bool {
    let text = |name| {
        headers
            .get(name)
            .and_then(|value: &HeaderValue| value.to_str().ok())
    };
    auth::same_origin(
        text(header::ORIGIN),
        text(header::REFERER),
        &console.origins,
    )
}

fn refuse(status: StatusCode, why: &'static str) -> Response {
    (status, why).into_response()
}

impl Console {
    /// The session a request's cookie names, or the read-only one when no users are configured.
    fn session_of(&self, headers: &HeaderMap) -> Option<Session> {
        if self.users.is_none() {
            return Some(self.anonymous.clone());
        }
        let id = cookie(headers, auth::COOKIE)?;
        self.sessions.get(&id)
    }

    /// The `Set-Cookie` value of a new session.
    fn session_cookie(&self, id: &str) -> String {
        let secure = if self.secure_cookie { "; Secure" } else { "" };
        format!(
            "{}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
            auth::COOKIE,
            auth::SESSION_TTL.as_secs()
        )
    }

    fn has_users(&self) -> bool {
        self.users.is_some()
    }

    fn login(&self, user: &str, password: &str) -> Option<Role> {
        self.users.as_ref()?.check(user, password)
    }
}

/// A cookie's value from a request's `Cookie` headers.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key == name).then(|| value.to_owned())
        })
}
