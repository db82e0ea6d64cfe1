//! A RabbitMQ node of the test's own, on free ports with its own data directory, that the test may stop
//! and start again: the machine's shared broker is never restarted.
//!
//! It runs `rabbitmq-server` from the RabbitMQ installation (`CONVEYOR_RABBITMQ_SERVER`, else Debian's
//! `/usr/lib/rabbitmq/bin/rabbitmq-server`, else `rabbitmq-server` on the PATH) in a process group of
//! its own, with `HOME` in its directory so that it has its own Erlang cookie. Stopping sends SIGTERM
//! (the node shuts down cleanly and keeps its durable queues); dropping kills the group.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use conveyor_amqp::BrokerAddress;
use conveyor_base::Secret;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::ports::free_port;
use crate::tls::TestPki;

pub struct OwnBroker {
    pub amqp_port: u16,
    /// The TLS listener's port, when started with [`OwnBroker::start_with_tls`].
    pub amqps_port: Option<u16>,
    dir: PathBuf,
    /// The Erlang node name, `conveyor-{name}@localhost`.
    pub node: String,
    dist_port: u16,
    /// The port of the epmd of the test's nodes, when they form a cluster (the machine's epmd is
    /// left alone).
    epmd_port: Option<u16>,
    child: Option<Child>,
    /// Stopped with SIGSTOP ([`OwnBroker::freeze`]).
    frozen: bool,
}

fn server_binary() -> PathBuf {
    if let Ok(path) = std::env::var("CONVEYOR_RABBITMQ_SERVER") {
        return path.into();
    }
    let debian = Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server");
    if debian.is_file() {
        return debian.to_owned();
    }
    "rabbitmq-server".into()
}

impl OwnBroker {
    /// Starts a fresh node and waits until it takes AMQP connections.
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        Self::start_node(name, None).await
    }

    /// Starts a fresh node that also listens for amqps:// with the server certificate of `pki`, and
    /// requires mutual TLS there: a client must show a certificate the test CA signed.
    pub async fn start_with_tls(name: &str, pki: &TestPki) -> anyhow::Result<Self> {
        Self::start_node(name, Some(pki)).await
    }

    /// Starts a fresh node of a cluster: registered with the epmd on `epmd_port`, with `cookie`.
    pub(crate) async fn start_member(
        name: &str,
        epmd_port: u16,
        cookie: &str,
    ) -> anyhow::Result<Self> {
        let dir = Self::fresh_dir(name)?;
        let path = dir.join("home/.erlang.cookie");
        std::fs::write(&path, cookie)?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o400))?;
        let mut own = Self::new(name, dir, None, Some(epmd_port))?;
        own.resume().await?;
        Ok(own)
    }

    fn fresh_dir(name: &str) -> anyhow::Result<PathBuf> {
        let dir = std::env::temp_dir().join("conveyor-brokers").join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("home"))?;
        // Debian's rabbitmq-env.conf forces the node name: the test's nodes read an empty one.
        std::fs::write(dir.join("rabbitmq-env.conf"), "")?;
        Ok(dir)
    }

    fn new(
        name: &str,
        dir: PathBuf,
        amqps_port: Option<u16>,
        epmd_port: Option<u16>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            amqps_port,
            amqp_port: free_port()?,
            dist_port: free_port()?,
            node: format!("conveyor-{name}@localhost"),
            dir,
            epmd_port,
            child: None,
            frozen: false,
        })
    }

    /// The environment every RabbitMQ tool needs to reach this node (its cookie, its epmd).
    pub(crate) fn tool_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("HOME", self.dir.join("home").display().to_string()),
            (
                "RABBITMQ_CONF_ENV_FILE",
                self.dir.join("rabbitmq-env.conf").display().to_string(),
            ),
        ];
        if let Some(port) = self.epmd_port {
            env.push(("ERL_EPMD_PORT", port.to_string()));
        }
        env
    }

    async fn start_node(name: &str, pki: Option<&TestPki>) -> anyhow::Result<Self> {
        let dir = Self::fresh_dir(name)?;
        let amqps_port = match pki {
            Some(pki) => {
                let port = free_port()?;
                let path = |file: &Path| file.display().to_string();
                std::fs::write(
                    dir.join("rabbitmq.conf"),
                    [
                        format!("listeners.ssl.default = {port}"),
                        format!("ssl_options.cacertfile = {}", path(&pki.ca_file)),
                        format!("ssl_options.certfile = {}", path(&pki.server_cert_file)),
                        format!("ssl_options.keyfile = {}", path(&pki.server_key_file)),
                        "ssl_options.verify = verify_peer".into(),
                        "ssl_options.fail_if_no_peer_cert = true".into(),
                        String::new(),
                    ]
                    .join("\n"),
                )?;
                Some(port)
            }
            None => None,
        };
        let mut own = Self::new(name, dir, amqps_port, None)?;
        own.resume().await?;
        Ok(own)
    }

    pub fn url(&self) -> Secret {
        Secret::new(format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f",
            self.amqp_port
        ))
    }

    /// The node's TLS listener as an amqps:// URL for `localhost` (the name its certificate carries).
    pub fn amqps_url(&self) -> Option<Secret> {
        self.amqps_port
            .map(|port| Secret::new(format!("amqps://guest:guest@localhost:{port}/%2f")))
    }

    /// Starts the node again (after [`OwnBroker::stop`]) and waits until it takes connections.
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.join("server.log"))?;
        let child = Command::new(server_binary())
            .envs(self.tool_env())
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", self.dir.join("plugins"))
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq"))
            .env(
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                self.dir.join("advanced.config"),
            )
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (install RabbitMQ, or set CONVEYOR_RABBITMQ_SERVER)",
                    server_binary().display()
                )
            })?;
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if let Ok(connection) =
                conveyor_amqp::connect(&BrokerAddress::new(self.url()), "conveyor-harness").await
            {
                conveyor_amqp::close(&connection).await;
                // The TLS listener opens just after the plain one.
                let tls_open = self
                    .amqps_port
                    .is_none_or(|port| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
                if tls_open {
                    return Ok(());
                }
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "the test's RabbitMQ node exited with {status}; see {}",
                    self.dir.join("server.log").display()
                );
            }
            if started.elapsed() > Duration::from_secs(90) {
                bail!(
                    "the test's RabbitMQ node did not take connections within 90 s; see {}",
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the node cleanly (SIGTERM to its process group) and waits for it to exit.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Some(pid) = child.id() {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        match tokio::time::timeout(Duration::from_secs(60), child.wait()).await {
            Ok(status) => {
                status?;
            }
            Err(_) => {
                self.kill_group(&child);
                bail!("the test's RabbitMQ node did not stop within 60 s");
            }
        }
        // The node is an Erlang VM under the script: wait until its port is free again.
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.amqp_port)).is_ok()
            && started.elapsed() < Duration::from_secs(30)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Kills the node at once (SIGKILL to its process group: the script and its `beam.smp`), as a
    /// machine lost would; [`OwnBroker::resume`] starts it again.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            self.kill_group(&child);
            let _ = child.wait().await;
        }
    }

    /// Freezes the node's Erlang VM (SIGSTOP of its `beam.smp`), as a hung machine would: its sockets
    /// stay open and nothing answers. [`OwnBroker::thaw`] lets it go on.
    pub fn freeze(&mut self) -> anyhow::Result<()> {
        nix::sys::signal::kill(self.beam()?, Signal::SIGSTOP)?;
        self.frozen = true;
        Ok(())
    }

    pub fn thaw(&mut self) -> anyhow::Result<()> {
        nix::sys::signal::kill(self.beam()?, Signal::SIGCONT)?;
        self.frozen = false;
        Ok(())
    }

    /// Whether the node runs and is not frozen: it answers.
    pub fn answers(&self) -> bool {
        self.child.is_some() && !self.frozen
    }

    /// The node's `beam.smp`: the process of its group (the script's) by that name.
    fn beam(&self) -> anyhow::Result<Pid> {
        let group = self
            .child
            .as_ref()
            .and_then(Child::id)
            .context("the node does not run")?;
        for entry in std::fs::read_dir("/proc")? {
            let Ok(pid) = entry?.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            // /proc/PID/stat: "pid (comm) state ppid pgrp ..."; comm may hold spaces.
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some((head, rest)) = stat.rsplit_once(") ") else {
                continue;
            };
            let pgrp = rest.split(' ').nth(2).and_then(|f| f.parse::<u32>().ok());
            if head.ends_with("(beam.smp") && pgrp == Some(group) {
                return Ok(Pid::from_raw(pid));
            }
        }
        bail!("no beam.smp in the process group of {}", self.node)
    }

    fn kill_group(&self, child: &Child) {
        if let Some(pid) = child.id() {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            self.kill_group(child);
        }
    }
}
