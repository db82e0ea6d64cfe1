//! The workers as processes: started, waited for, signalled, their logs kept.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::Child;

/// A worker binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Worker {
    Fetcher,
    Transformer,
    Writer,
}

impl Worker {
    pub fn binary(self) -> &'static str {
        match self {
            Worker::Fetcher => "conveyor-fetcher",
            Worker::Transformer => "conveyor-transformer",
            Worker::Writer => "conveyor-writer",
        }
    }
}

/// A running worker process. Killed when dropped, so a failing test leaves nothing behind.
pub struct WorkerProcess {
    pub worker: Worker,
    pub http_addr: SocketAddr,
    pub log: PathBuf,
    pub(crate) child: Child,
}

impl WorkerProcess {
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id().expect("a running child has a pid") as i32)
    }

    /// Asks the worker to stop (SIGTERM).
    pub fn terminate(&self) -> anyhow::Result<()> {
        kill(self.pid(), Signal::SIGTERM).context("sending SIGTERM")
    }

    /// Kills the worker at once (SIGKILL): no chance to finish or ack anything.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await.context("sending SIGKILL")
    }

    /// Waits until the worker's `/readyz` answers 200 (`ready`), or answers with another status
    /// (`!ready`); fails with its log after `timeout`.
    pub async fn wait_ready(&self, ready: bool, timeout: Duration) -> anyhow::Result<()> {
        let http = conveyor_base::tls::http_client(None)
            .timeout(Duration::from_secs(5))
            .build()?;
        let url = format!("http://{}/readyz", self.http_addr);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(answer) = http.get(&url).send().await
                && answer.status().is_success() == ready
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{} did not become {} within {timeout:?}:\n{}",
                    self.worker.binary(),
                    if ready { "ready" } else { "not ready" },
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The worker's exit status if it exits within `timeout`; `None` while it still runs.
    pub async fn exited_within(&mut self, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => Ok(Some(status?)),
            Err(_) => Ok(None),
        }
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        match self.exited_within(timeout).await? {
            Some(status) => Ok(status),
            None => bail!(
                "{} did not exit within {timeout:?}; log: {}",
                self.worker.binary(),
                self.log.display()
            ),
        }
    }

    /// The last lines of the worker's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// SIGTERMs every worker, then waits for each; fails naming a worker that did not exit 0, with its log.
pub async fn stop_all(workers: &mut [WorkerProcess]) -> anyhow::Result<()> {
    for worker in workers.iter() {
        worker.terminate()?;
    }
    for worker in workers.iter_mut() {
        let status = worker.wait(Duration::from_secs(30)).await?;
        if !status.success() {
            bail!(
                "{} exited with {status} after SIGTERM:\n{}",
                worker.worker.binary(),
                worker.log_tail(30)
            );
        }
    }
    Ok(())
}
