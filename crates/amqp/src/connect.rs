//! Connecting to RabbitMQ: the address (URLs and TLS, never printed), a connect with a bounded
//! handshake, failover across a cluster's nodes, and a close that cannot hang.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use conveyor_base::tls::{self, CaBundle, ClientIdentity};
use conveyor_base::{Secret, SettingsError};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::Heartbeat;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Channel, Connection, ConnectionProperties};
use rand::RngExt as _;

use crate::error::BrokerError;

/// Where the broker is and how to trust it: the URL(s), which carry the password, and the TLS
/// settings of `amqps://` connections. Neither is ever printed.
#[derive(Clone)]
pub struct BrokerAddress {
    url: Secret,
    tls: OwnedTLSConfig,
    heartbeat: Heartbeat,
}

/// Seconds between heartbeats unless the URL (`?heartbeat=`) or [`BrokerAddress::with_heartbeat`]
/// says otherwise. A broker that sends nothing for two heartbeats is taken for lost: a node that hangs
/// (frozen, or cut off without a TCP reset) is left within about 10 s rather than RabbitMQ's 60 s
/// heartbeat would allow (2 minutes).
pub const DEFAULT_HEARTBEAT_SECS: Heartbeat = 5;

impl fmt::Debug for BrokerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BrokerAddress(***)")
    }
}

impl BrokerAddress {
    /// A broker whose `amqps://` certificate the public roots vouch for (or a plain `amqp://` one).
    pub fn new(url: Secret) -> Self {
        Self {
            url,
            tls: OwnedTLSConfig::default(),
            heartbeat: DEFAULT_HEARTBEAT_SECS,
        }
    }

    /// Heartbeats every `seconds` (0: none) on connections whose URL does not set its own.
    pub fn with_heartbeat(mut self, seconds: Heartbeat) -> Self {
        self.heartbeat = seconds;
        self
    }

    /// A broker trusted through `ca` too, with a client certificate for mutual TLS. TLS files with a
    /// plain `amqp://` URL are refused: the operator expects encryption that would not happen.
    pub(crate) fn with_tls(
        url: Secret,
        ca: Option<CaBundle>,
        identity: Option<ClientIdentity>,
    ) -> Result<Self, SettingsError> {
        if (ca.is_some() || identity.is_some())
            && broker_urls(&url).any(|one| !one.starts_with("amqps://"))
        {
            return Err(SettingsError::new(
                "CONVEYOR_AMQP_URL",
                "TLS files are set (CONVEYOR_AMQP_TLS_*), but a broker URL is not amqps://: that connection would not be encrypted",
            ));
        }
        Ok(Self {
            url,
            tls: OwnedTLSConfig {
                identity: identity.map(|identity| OwnedIdentity::PKCS8 {
                    pem: identity.cert_pem().to_vec(),
                    key: identity.key_pem().to_vec(),
                }),
                cert_chain: ca.map(|ca| ca.pem().to_owned()),
            },
            heartbeat: DEFAULT_HEARTBEAT_SECS,
        })
    }

    pub fn url(&self) -> &Secret {
        &self.url
    }
}

/// The brokers of a setting: one AMQP URL, or several separated by commas (the nodes of a cluster,
/// tried in turn from a random one). A comma inside a URL must be percent-encoded (`%2C`).
fn broker_urls(url: &Secret) -> impl Iterator<Item = &str> {
    url.expose()
        .split(',')
        .map(str::trim)
        .filter(|one| !one.is_empty())
}

/// The host, port and vhost of each AMQP URL (comma-separated): what may be logged of them.
pub fn endpoint(url: &Secret) -> Result<String, BrokerError> {
    let mut shown = Vec::new();
    for one in broker_urls(url) {
        let uri = AMQPUri::from_str(one).map_err(BrokerError::Url)?;
        let scheme = match uri.scheme {
            AMQPScheme::AMQPS => "amqps://",
            AMQPScheme::AMQP => "",
        };
        shown.push(format!(
            "{scheme}{}:{}/{}",
            uri.authority.host, uri.authority.port, uri.vhost
        ));
    }
    if shown.is_empty() {
        return Err(BrokerError::Url("no broker address given".into()));
    }
    Ok(shown.join(","))
}

/// Connects once, to the first of the brokers (comma-separated URLs) that answers, from one picked at
/// random; fails with the last broker's error. `name` shows in the broker's connection list.
/// Boxed, like the other connecting functions here: the connection code is compiled once, in this
/// crate, not again in every crate that awaits it (docs/development.md, "Build time").
pub fn connect<'a>(
    address: &'a BrokerAddress,
    name: &'a str,
) -> BoxFuture<'a, Result<Connection, BrokerError>> {
    async move { Ok(connect_after(address, name, None).await?.connection) }.boxed()
}

/// A connection, and which of the setting's URLs (by position) it went to.
pub struct Connected {
    pub connection: Connection,
    pub node: usize,
}

/// Like [`connect`], but after losing the connection to node `lost` starts at the node after it: a
/// node that hung takes TCP connections and never finishes the handshake, so it is tried last.
pub fn connect_after<'a>(
    address: &'a BrokerAddress,
    name: &'a str,
    lost: Option<usize>,
) -> BoxFuture<'a, Result<Connected, BrokerError>> {
    async move {
        // Every URL is checked before any is tried, so a typo fails at once rather than at failover.
        endpoint(&address.url)?;
        let mut last_error = None;
        let urls: Vec<&str> = broker_urls(&address.url).collect();
        let count = urls.len().max(1);
        // Otherwise each connection starts at a node of its own choosing: workers spread over a
        // cluster's nodes without anyone ordering the URLs by hand.
        let start = lost.map_or_else(
            || rand::rng().random_range(0..count),
            |lost| (lost + 1) % count,
        );
        for (node, one) in in_turn(&urls, start) {
            match connect_one(one, address, name).await {
                Ok(connection) => return Ok(Connected { connection, node }),
                Err(err) => {
                    tracing::debug!(error = %err, "broker not reachable, trying the next");
                    last_error = Some(err);
                }
            }
        }
        Err(last_error.expect("endpoint() proved there is at least one URL"))
    }
    .boxed()
}

/// `urls` with their positions, from the one at `start`, then on round to the one before it.
fn in_turn<'a>(urls: &'a [&'a str], start: usize) -> impl Iterator<Item = (usize, &'a str)> {
    let (before, from) = urls.split_at(start.min(urls.len()));
    let positions = (start..urls.len()).chain(0..start);
    positions.zip(from.iter().chain(before).copied())
}

async fn connect_one(
    url: &str,
    address: &BrokerAddress,
    name: &str,
) -> Result<Connection, BrokerError> {
    let endpoint = endpoint(&Secret::new(url))?;
    let mut uri = AMQPUri::from_str(url).map_err(BrokerError::Url)?;
    uri.query.heartbeat.get_or_insert(address.heartbeat);
    let properties = ConnectionProperties::default().with_connection_name(name.to_owned().into());
    let runtime = lapin::runtime::default_runtime().map_err(|cause| BrokerError::Connect {
        endpoint: endpoint.clone(),
        cause,
    })?;
    // A broker that takes the TCP connection but never finishes the handshake (still starting, or
    // overloaded) must not hold a worker forever: give up and let the caller retry.
    let connecting =
        Connection::connect_uri_with_config(uri, properties, address.tls.clone(), runtime);
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(source)) => match tls::tls_failure(&source) {
            Some(failure) => Err(BrokerError::Tls {
                endpoint,
                advice: tls::advice(failure, "CONVEYOR_AMQP_TLS_CA_FILE"),
            }),
            None => match refusal(&source) {
                Some(message) => Err(BrokerError::Refused { endpoint, message }),
                None => Err(BrokerError::Connect {
                    endpoint,
                    cause: source,
                }),
            },
        },
        Err(_) => Err(BrokerError::ConnectTimeout(endpoint)),
    }
}

/// The broker's words when it refused the login (ACCESS_REFUSED) or the vhost (NOT_ALLOWED).
fn refusal(error: &lapin::Error) -> Option<String> {
    use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
    let lapin::ErrorKind::ProtocolError(amqp) = error.kind() else {
        return None;
    };
    matches!(
        amqp.kind(),
        AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
            | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
    )
    .then(|| amqp.get_message().to_string())
}

/// The longest a connection attempt (TCP and AMQP handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest a close of a connection or a channel may take: lapin's has been seen to take minutes.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Closes a channel without hanging, saying `why` to the broker; one that does not close in time
/// goes with its connection.
pub(crate) async fn close_channel(channel: &Channel, why: &str) {
    if let Err(err) = tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, why.into())).await {
        tracing::debug!(error = %err, "closing a channel timed out");
    }
}

/// Closes a connection without hanging.
pub fn close(connection: &Connection) -> BoxFuture<'_, ()> {
    async move {
        let closing = connection.close(200, "worker stopping".into());
        match tokio::time::timeout(CLOSE_TIMEOUT, closing).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::debug!(error = %err, "closing the broker connection"),
            Err(_) => tracing::warn!("closing the broker connection timed out"),
        }
    }
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_hides_credentials() {
        let url = Secret::new("amqp://user:hunter2@broker.example:5673/prod");
        let shown = endpoint(&url).unwrap();
        assert_eq!(shown, "broker.example:5673/prod");
        let several = Secret::new("amqp://u:hunter2@a:5672/%2f, amqp://u:hunter2@b:5673/%2f");
        assert_eq!(endpoint(&several).unwrap(), "a:5672//,b:5673//");
        assert!(endpoint(&Secret::new(" , ")).is_err());
        assert!(endpoint(&Secret::new("amqp://a:5672/%2f,nonsense://")).is_err());
    }

    #[test]
    fn every_node_is_tried_once_from_the_start() {
        let urls = ["a", "b", "c"];
        let order = |urls, start| in_turn(urls, start).collect::<Vec<_>>();
        assert_eq!(order(&urls, 0), [(0, "a"), (1, "b"), (2, "c")]);
        assert_eq!(order(&urls, 2), [(2, "c"), (0, "a"), (1, "b")]);
        assert_eq!(order(&urls[..1], 0), [(0, "a")]);
    }
}
