//! The broker and database the harness runs against, proved to answer before anything starts.
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use conveyor_amqp::settings::{BrokerArgs, DEFAULT_AMQP_URL};
use conveyor_amqp::{BrokerAddress, Topology};
use conveyor_base::Secret;

/// The PostgreSQL used when CONVEYOR_PG_URL is not set: the local server's `test` database.
pub const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The broker and database the harness runs against (from CONVEYOR_AMQP_URL, CONVEYOR_AMQP_TLS_*
/// and CONVEYOR_PG_URL, or the local defaults).
#[derive(Debug, Clone)]
pub struct Services {
    pub amqp_url: Secret,
    /// TLS files of an amqps:// broker, handed to every worker as well.
    pub amqp_tls: AmqpTlsFiles,
    pub pg_url: Secret,
}

/// The files of CONVEYOR_AMQP_TLS_CA_FILE, CONVEYOR_AMQP_TLS_CERT_FILE and CONVEYOR_AMQP_TLS_KEY_FILE.
#[derive(Debug, Clone, Default)]
pub struct AmqpTlsFiles {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl AmqpTlsFiles {
    /// The settings as environment variables, for a worker process.
    pub fn environment(&self) -> Vec<(&'static str, String)> {
        [
            ("CONVEYOR_AMQP_TLS_CA_FILE", &self.ca_file),
            ("CONVEYOR_AMQP_TLS_CERT_FILE", &self.cert_file),
            ("CONVEYOR_AMQP_TLS_KEY_FILE", &self.key_file),
        ]
        .into_iter()
        .filter_map(|(name, file)| Some((name, file.as_ref()?.display().to_string())))
        .collect()
    }
}

impl Services {
    /// Reads the addresses and proves both services answer; fails with what to do if one does not.
    pub async fn check() -> anyhow::Result<Self> {
        let amqp_url = Secret::new(
            std::env::var("CONVEYOR_AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.into()),
        );
        let file = |name: &str| std::env::var_os(name).map(PathBuf::from);
        let amqp_tls = AmqpTlsFiles {
            ca_file: file("CONVEYOR_AMQP_TLS_CA_FILE"),
            cert_file: file("CONVEYOR_AMQP_TLS_CERT_FILE"),
            key_file: file("CONVEYOR_AMQP_TLS_KEY_FILE"),
        };
        let pg_url =
            Secret::new(std::env::var("CONVEYOR_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.into()));
        let services = Self {
            amqp_url,
            amqp_tls,
            pg_url,
        };
        let connection = conveyor_amqp::connect(&services.broker()?, "conveyor-harness").await.with_context(|| {
            "RabbitMQ is not reachable: start it (ops/services.sh, or `rabbitmq-server -detached`) or set CONVEYOR_AMQP_URL"
        })?;
        conveyor_amqp::close(&connection).await;
        pg_client(&services.pg_url).await.with_context(
            || "PostgreSQL is not reachable: start it (ops/services.sh) or set CONVEYOR_PG_URL",
        )?;
        Ok(services)
    }

    /// The broker's address with its TLS settings, files read: for the harness's own connections.
    pub fn broker(&self) -> anyhow::Result<BrokerAddress> {
        Ok(self.broker_args("conveyor").address()?)
    }

    /// Broker settings for `namespace` on these services.
    pub fn broker_args(&self, namespace: &str) -> BrokerArgs {
        BrokerArgs::local(namespace)
            .with_amqp_url(self.amqp_url.expose())
            .with_tls_files(
                self.amqp_tls.ca_file.clone(),
                self.amqp_tls.cert_file.clone(),
                self.amqp_tls.key_file.clone(),
            )
    }
}

impl Services {
    /// Deletes the queues of `topologies` and their namespace's exchanges.
    pub async fn delete_topology(&self, topologies: &[Topology]) -> anyhow::Result<()> {
        let connection = conveyor_amqp::connect(&self.broker()?, "conveyor-harness").await?;
        let channel = connection.create_channel().await?;
        for queue in topologies.iter().flat_map(Topology::queues) {
            channel
                .queue_delete(queue.as_str().into(), Default::default())
                .await
                .with_context(|| format!("deleting queue {queue}"))?;
        }
        if let Some(topology) = topologies.first() {
            for exchange in [topology.exchange(), topology.dead_letter_exchange()] {
                channel
                    .exchange_delete(exchange.as_str().into(), Default::default())
                    .await
                    .with_context(|| format!("deleting exchange {exchange}"))?;
            }
        }
        conveyor_amqp::close(&connection).await;
        Ok(())
    }
}

impl Services {
    /// The address of PostgreSQL (its first host), e.g. to put a proxy in front of it.
    pub fn pg_addr(&self) -> anyhow::Result<SocketAddr> {
        use std::net::ToSocketAddrs as _;
        let config: tokio_postgres::Config = self.pg_url.expose().parse()?;
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            _ => bail!("CONVEYOR_PG_URL must name a TCP host for this test"),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        (host.as_str(), port)
            .to_socket_addrs()?
            .next()
            .with_context(|| format!("{host} has no address"))
    }

    /// The PostgreSQL URL with `addr` in place of the server's address (same user, password, database).
    pub fn pg_url_via(&self, addr: SocketAddr) -> anyhow::Result<Secret> {
        let config: tokio_postgres::Config = self.pg_url.expose().parse()?;
        let user = config.get_user().unwrap_or("postgres");
        let password = config
            .get_password()
            .map(|p| format!(":{}", String::from_utf8_lossy(p)))
            .unwrap_or_default();
        let db = config.get_dbname().unwrap_or(user);
        Ok(Secret::new(format!(
            "postgres://{user}{password}@{addr}/{db}"
        )))
    }
}

/// Connects to PostgreSQL with a background connection task.
pub async fn pg_client(url: &Secret) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url.expose(), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}
