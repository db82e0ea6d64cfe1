//! PostgreSQL as every conveyor process uses it: where it is (its settings), TLS as libpq's
//! `sslmode` says ([`tls`]), a pool whose connections have the configured schema as their search
//! path, and migrations run one process at a time.

mod tls;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::Config;
use tokio_postgres_rustls::MakeRustlsConnect;

use std::path::PathBuf;

use conveyor_base::{Secret, SettingsError, is_sql_identifier};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;

/// Where PostgreSQL is: the writer's target and the fetcher's sync state (every flag also reads an
/// environment variable).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "PostgreSQL")]
pub struct PostgresArgs {
    /// PostgreSQL connection URL (postgres://user:password@host/db); never logged.
    #[arg(long, env = "CONVEYOR_PG_URL", hide_env_values = true)]
    pub pg_url: Option<Secret>,
    /// File holding the PostgreSQL URL (for Docker secrets), instead of CONVEYOR_PG_URL.
    #[arg(long, env = "CONVEYOR_PG_URL_FILE")]
    pub pg_url_file: Option<PathBuf>,
    /// CA certificates (PEM) that sign the server's certificate, besides the public roots (the URL's
    /// `sslrootcert` may say it instead). With it, `sslmode=require` checks the certificate too.
    #[arg(long, env = "CONVEYOR_PG_TLS_CA_FILE")]
    pub pg_tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for a server that asks for one (or the URL's `sslcert`).
    #[arg(long, env = "CONVEYOR_PG_TLS_CERT_FILE")]
    pub pg_tls_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM), never logged (or the URL's `sslkey`).
    #[arg(long, env = "CONVEYOR_PG_TLS_KEY_FILE")]
    pub pg_tls_key_file: Option<PathBuf>,
    /// Schema of conveyor's tables: the targets, the migration history and the sync state.
    #[arg(long, env = "CONVEYOR_PG_SCHEMA", default_value = "public")]
    pub pg_schema: String,
    /// Connections per process (for a writer: concurrent batch writes).
    #[arg(long, env = "CONVEYOR_PG_POOL_SIZE", default_value_t = DEFAULT_POOL_SIZE)]
    pub pg_pool_size: usize,
    /// The `lock_timeout` of every session, in milliseconds, when a process asks for one (the writer
    /// does, from CONVEYOR_PG_LOCK_TIMEOUT_MS, so that a blocked write fails and is retried later).
    #[arg(skip)]
    pub lock_timeout_ms: Option<u64>,
}

impl PostgresArgs {
    /// The settings of a database at `url`, schema `schema`, the rest as their defaults: for tools
    /// and tests that build them in code.
    pub fn at(url: Secret, schema: impl Into<String>) -> Self {
        Self {
            pg_url: Some(url),
            pg_url_file: None,
            pg_tls_ca_file: None,
            pg_tls_cert_file: None,
            pg_tls_key_file: None,
            pg_schema: schema.into(),
            pg_pool_size: DEFAULT_POOL_SIZE,
            lock_timeout_ms: None,
        }
    }

    pub fn url(&self) -> Result<Secret, SettingsError> {
        Secret::from_value_or_file(
            "CONVEYOR_PG_URL",
            self.pg_url.as_ref().map(Secret::expose),
            self.pg_url_file.as_deref(),
        )?
        .ok_or_else(|| SettingsError::new("CONVEYOR_PG_URL", "required"))
    }
}

/// Why the database could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("setting CONVEYOR_PG_SCHEMA: {0:?} is not a plain SQL name")]
    Schema(String),
    // The driver's error is shown in the message and not chained as a source: an `{:#}` would say
    // it twice ("error connecting to server: … : error connecting to server: …").
    #[error("cannot connect to PostgreSQL at {endpoint}: {cause}")]
    Connect { endpoint: String, cause: String },
    #[error("PostgreSQL: {action}: {cause}")]
    Sql {
        action: String,
        cause: tokio_postgres::Error,
    },
    #[error("migrations {name}: {message}")]
    Migrations { name: String, message: String },
    #[error("connection pool: {0}")]
    Pool(String),
}

/// Connections per process unless CONVEYOR_PG_POOL_SIZE says otherwise.
pub const DEFAULT_POOL_SIZE: usize = 8;

/// A connected database.
#[derive(Clone)]
pub struct Database {
    pub pool: Pool,
    pub schema: String,
    /// Host and database name: what may be logged of the URL.
    pub endpoint: String,
    config: Config,
    tls: MakeRustlsConnect,
}

/// `host:port,…/dbname` of a connection's settings: what may be logged of them (a port not given is
/// PostgreSQL's 5432, as the driver takes it).
fn endpoint(config: &Config) -> String {
    let ports = config.get_ports();
    let hosts = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(index, host)| {
            let name = match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            // One port for every host, or one each.
            let port = ports.get(index).or(ports.first()).copied().unwrap_or(5432);
            format!("{name}:{port}")
        })
        .collect::<Vec<_>>()
        .join(",");
    format!("{hosts}/{}", config.get_dbname().unwrap_or(""))
}

/// What a failed connection says, with what to do about a TLS failure.
fn connect_failure(endpoint: &str, cause: &tokio_postgres::Error) -> DatabaseError {
    let cause = match conveyor_base::tls::tls_failure(cause) {
        Some(failure) => conveyor_base::tls::advice(failure, tls::CA_SETTING),
        // The server's own words ("password authentication failed for user …") are the driver's
        // error's source.
        None => conveyor_base::tls::error_chain(cause),
    };
    DatabaseError::Connect {
        endpoint: endpoint.to_owned(),
        cause,
    }
}

/// Why a database cannot be used now, by what waiting can do about it.
#[derive(Debug)]
pub enum Unusable {
    /// It does not answer (down, starting, unreachable): it may later.
    Unreachable(DatabaseError),
    /// It refuses the user, the password or the database name: a setup error, for a human.
    Refused(DatabaseError),
    /// A setting it cannot work with (a certificate not trusted): waiting does not fix that.
    Misconfigured(DatabaseError),
}

/// Maps a driver error to [`DatabaseError::Sql`], saying what was being done.
pub fn failed(action: &str) -> impl Fn(tokio_postgres::Error) -> DatabaseError {
    let action = action.to_owned();
    move |cause| DatabaseError::Sql {
        action: action.clone(),
        cause,
    }
}

/// Quotes an SQL identifier.
pub fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

impl Database {
    /// Builds the pool (connections open lazily) with `CONVEYOR_PG_SCHEMA` as the search path: every
    /// statement of conveyor's, and of the migrations, names tables without a schema.
    pub fn connect(args: &PostgresArgs) -> Result<Self, DatabaseError> {
        if !is_sql_identifier(&args.pg_schema) {
            return Err(DatabaseError::Schema(args.pg_schema.clone()));
        }
        let url = args.url()?;
        let encryption = tls::encryption(
            url.expose(),
            &tls::TlsFiles {
                ca: args.pg_tls_ca_file.as_deref(),
                cert: args.pg_tls_cert_file.as_deref(),
                key: args.pg_tls_key_file.as_deref(),
            },
        )?;
        let mut config: Config = encryption
            .url
            .parse()
            .map_err(|cause| connect_failure("CONVEYOR_PG_URL", &cause))?;
        config.ssl_mode(encryption.mode);
        let mut options = format!("-c search_path={}", args.pg_schema);
        if let Some(ms) = args.lock_timeout_ms {
            options.push_str(&format!(" -c lock_timeout={ms}"));
        }
        config.options(options);
        // A database that does not answer must fail fast (the writer's circuit breaker takes over).
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(std::time::Duration::from_secs(5));
        }
        let endpoint = endpoint(&config);
        tracing::debug!(endpoint, sslmode = encryption.described, "PostgreSQL");
        let manager = Manager::from_config(
            config.clone(),
            encryption.connector.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(args.pg_pool_size.max(1))
            .build()
            .map_err(|err| DatabaseError::Pool(err.to_string()))?;
        Ok(Self {
            pool,
            schema: args.pg_schema.clone(),
            endpoint,
            config,
            tls: encryption.connector,
        })
    }

    /// Opens one connection, to tell whether the database can be used now.
    ///
    /// Boxed, like the other ways to a connection here: the connecting code (TLS included) is
    /// compiled once, in this crate, not in every crate that awaits it (docs/development.md,
    /// "Build time").
    pub fn check(&self) -> BoxFuture<'_, Result<(), Unusable>> {
        async move {
            match self.config.connect(self.tls.clone()).await {
                Ok((client, connection)) => {
                    drop(client);
                    let _ = connection.await;
                    Ok(())
                }
                Err(cause) => {
                    let refused = cause.as_db_error().is_some_and(|db| {
                        let code = db.code().code();
                        // Class 28: invalid authorization; 3D000: no such database.
                        code.starts_with("28") || code == "3D000"
                    });
                    let tls = conveyor_base::tls::tls_failure(&cause).is_some();
                    let failure = connect_failure(&self.endpoint, &cause);
                    Err(if tls {
                        Unusable::Misconfigured(failure)
                    } else if refused {
                        Unusable::Refused(failure)
                    } else {
                        Unusable::Unreachable(failure)
                    })
                }
            }
        }
        .boxed()
    }

    /// A pooled connection.
    pub fn client(&self) -> BoxFuture<'_, Result<deadpool_postgres::Object, DatabaseError>> {
        async move {
            self.pool.get().await.map_err(|err| match err {
                deadpool_postgres::PoolError::Backend(cause) => {
                    connect_failure(&self.endpoint, &cause)
                }
                err => DatabaseError::Pool(format!("{} ({})", err, self.endpoint)),
            })
        }
        .boxed()
    }

    /// A connection taken out of the pool, closed when dropped: for a session-level lock, which the
    /// server then releases whatever happens to this process.
    pub async fn own_client(&self) -> Result<deadpool_postgres::ClientWrapper, DatabaseError> {
        Ok(deadpool_postgres::Object::take(self.client().await?))
    }

    /// Creates the schema if needed and runs `migrations`, recording them in `history_table`, under an
    /// advisory lock so that processes starting together do not race. `name` names them in errors.
    pub fn migrate<'a>(
        &'a self,
        name: &'a str,
        migrations: &'a [refinery::Migration],
        history_table: &'a str,
    ) -> BoxFuture<'a, Result<(), DatabaseError>> {
        async move {
            let (mut client, connection) = self
                .config
                .connect(self.tls.clone())
                .await
                .map_err(|cause| connect_failure(&self.endpoint, &cause))?;
            let connection = tokio::spawn(connection);
            let sql = failed;
            let lock_key = format!("conveyor-migrations:{}", self.schema);
            client
                .execute("SELECT pg_advisory_lock(hashtext($1))", &[&lock_key])
                .await
                .map_err(sql("taking the migration lock"))?;
            let result = async {
                client
                    .batch_execute(&format!(
                        "CREATE SCHEMA IF NOT EXISTS {}",
                        quote(&self.schema)
                    ))
                    .await
                    .map_err(sql("creating the schema"))?;
                let mut runner = refinery::Runner::new(migrations);
                runner.set_migration_table_name(history_table);
                let report =
                    runner
                        .run_async(&mut client)
                        .await
                        .map_err(|err| DatabaseError::Migrations {
                            name: name.to_owned(),
                            message: err.to_string(),
                        })?;
                for migration in report.applied_migrations() {
                    tracing::info!(schema = self.schema, migration = %migration, "applied migration");
                }
                Ok(())
            }
            .await;
            let _ = client
                .execute("SELECT pg_advisory_unlock(hashtext($1))", &[&lock_key])
                .await;
            drop(client);
            let _ = connection.await;
            result
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_names_hosts_ports_and_database_never_the_password() {
        let config: Config = "postgres://u:hunter2@db.example/prod".parse().unwrap();
        assert_eq!(endpoint(&config), "db.example:5432/prod");
        let config: Config = "host=a,b port=5433,5434 dbname=x password=hunter2"
            .parse()
            .unwrap();
        assert_eq!(endpoint(&config), "a:5433,b:5434/x");
    }
}
