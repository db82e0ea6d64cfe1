//! A RabbitMQ cluster of the test's own: three [`OwnBroker`] nodes on free ports, each with its own
//! data directory, sharing an Erlang cookie and an epmd on a port of their own (the machine's broker
//! and epmd are never touched), joined with `rabbitmqctl join_cluster`. Dropping it kills the nodes
//! and their epmd, whatever happened.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use conveyor_base::Secret;
use rand::RngExt as _;

use crate::own_broker::OwnBroker;
use crate::ports::free_port;

pub struct OwnCluster {
    pub nodes: Vec<OwnBroker>,
    epmd_port: u16,
}

fn ctl_binary() -> PathBuf {
    let debian = Path::new("/usr/lib/rabbitmq/bin/rabbitmqctl");
    if debian.is_file() {
        return debian.to_owned();
    }
    "rabbitmqctl".into()
}

impl OwnCluster {
    /// Starts `size` fresh nodes named `{name}-1`… and joins them into one cluster.
    pub async fn start(name: &str, size: usize) -> anyhow::Result<Self> {
        let epmd_port = free_port()?;
        let cookie: String = (0..20)
            .map(|_| char::from(b'A' + rand::rng().random_range(0..26u8)))
            .collect();
        let mut nodes = Vec::new();
        for index in 1..=size {
            let node = OwnBroker::start_member(&format!("{name}-{index}"), epmd_port, &cookie)
                .await
                .with_context(|| format!("starting node {index} of the test's cluster"))?;
            nodes.push(node);
        }
        let cluster = Self { nodes, epmd_port };
        let first = cluster.nodes[0].node.clone();
        for node in &cluster.nodes[1..] {
            cluster.ctl(node, &["stop_app"]).await?;
            cluster.ctl(node, &["join_cluster", &first]).await?;
            cluster.ctl(node, &["start_app"]).await?;
        }
        // A quorum queue is declared with a member on each node running then: every node must run
        // before the first queue is declared, or a queue of two members dies with one of them.
        for node in &cluster.nodes {
            cluster.ctl(node, &["await_startup"]).await?;
        }
        let running = cluster.running_nodes(&cluster.nodes[0]).await?;
        if running != size {
            bail!("the test's cluster runs {running} of {size} nodes after the joins");
        }
        Ok(cluster)
    }

    /// How many nodes `asked` sees running in the cluster.
    async fn running_nodes(&self, asked: &OwnBroker) -> anyhow::Result<usize> {
        let status = self
            .ctl(asked, &["cluster_status", "--formatter", "json"])
            .await?;
        let status: serde_json::Value =
            serde_json::from_str(&status).context("reading rabbitmqctl cluster_status")?;
        Ok(status["running_nodes"].as_array().map_or(0, Vec::len))
    }

    /// The nodes holding a member of `queue` (a quorum queue).
    pub async fn members_of(&self, queue: &str) -> anyhow::Result<usize> {
        Ok(self
            .queue_info(queue, "members")
            .await?
            .matches('@')
            .count())
    }

    /// One column of `rabbitmqctl list_queues` for `queue`, asked of a node that answers.
    async fn queue_info(&self, queue: &str, column: &str) -> anyhow::Result<String> {
        let listed = self.list(&["list_queues", "name", column]).await?;
        listed
            .into_iter()
            .find(|(name, _)| name == queue)
            .map(|(_, value)| value)
            .with_context(|| format!("no queue {queue} in the cluster"))
    }

    /// The nodes that hold a connection whose name starts with `name` (conveyor names a worker's
    /// connections `conveyor-{stage}:{pipeline}`).
    pub async fn nodes_with_connections(&self, name: &str) -> anyhow::Result<Vec<usize>> {
        // RabbitMQ 3.10 has no column for the name a client gave: it is among the client properties.
        let listed = self
            .list(&["list_connections", "port", "client_properties"])
            .await?;
        let mut nodes: Vec<usize> = listed
            .iter()
            .filter(|(_, properties)| properties.contains(&format!("\"{name}")))
            .filter_map(|(port, _)| {
                self.nodes
                    .iter()
                    .position(|node| node.amqp_port.to_string() == *port)
            })
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        Ok(nodes)
    }

    /// A two-column `rabbitmqctl list_*` as pairs, asked of a node that answers.
    async fn list(&self, command: &[&str]) -> anyhow::Result<Vec<(String, String)>> {
        let asked = self
            .nodes
            .iter()
            .find(|node| node.answers())
            .context("no node of the cluster answers")?;
        let mut args = command.to_vec();
        args.extend(["-q", "--no-table-headers"]);
        let listed = self.ctl(asked, &args).await?;
        Ok(listed
            .lines()
            .filter_map(|line| line.split_once('\t'))
            .map(|(first, second)| (first.trim().to_owned(), second.trim().to_owned()))
            .collect())
    }

    /// Waits until every node runs in the cluster again (after a restart), as `asked` sees it.
    pub async fn await_all_running(&self) -> anyhow::Result<()> {
        for node in &self.nodes {
            self.ctl(node, &["await_startup"]).await?;
        }
        let started = std::time::Instant::now();
        loop {
            let asked = self
                .nodes
                .iter()
                .find(|node| node.answers())
                .context("no node answers")?;
            if self.running_nodes(asked).await? == self.nodes.len() {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the cluster does not run all its nodes again within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs `rabbitmqctl` against `node`.
    pub async fn ctl(&self, node: &OwnBroker, args: &[&str]) -> anyhow::Result<String> {
        let output = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new(ctl_binary())
                .envs(node.tool_env())
                .arg("-n")
                .arg(&node.node)
                .args(args)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .with_context(|| format!("rabbitmqctl {args:?} did not answer within 60 s"))?
        .context("running rabbitmqctl")?;
        if !output.status.success() {
            bail!(
                "rabbitmqctl {args:?} on {}: {}{}",
                node.node,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Every node's AMQP URL, comma-separated, as CONVEYOR_AMQP_URL takes a cluster.
    pub fn url(&self) -> Secret {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .map(|node| node.url().expose().to_owned())
            .collect();
        Secret::new(urls.join(","))
    }

    /// The node that leads `queue` (a quorum queue), asked of a running node.
    pub async fn leader_of(&self, queue: &str) -> anyhow::Result<usize> {
        let leader = self.queue_info(queue, "leader").await?;
        self.nodes
            .iter()
            .position(|node| node.node == leader)
            .with_context(|| format!("queue {queue}'s leader {leader} is no node of the cluster"))
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        // The nodes first (each kills its own process group), then the epmd they shared.
        self.nodes.clear();
        let _ = std::process::Command::new("epmd")
            .args(["-port", &self.epmd_port.to_string(), "-kill"])
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}
