//! A PostgreSQL server of the test's own, that takes connections over TLS only, with the server
//! certificate of a test CA: the machine's shared PostgreSQL is never reconfigured.
//!
//! It runs `initdb` and `postgres` from the newest installation under `/usr/lib/postgresql` (Debian's;
//! installed with apt when missing), as the `postgres` user when the test runs as root (the server
//! refuses to run as root), on a free port of 127.0.0.1 and 127.0.0.2, with its socket and data in a
//! directory of its own. Every connection must be TLS (`hostssl` only); the role `conveyor-worker`
//! must also show a client certificate the test CA signed. Dropping it kills the server.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::ports::free_port;
use crate::tls::TestPki;

/// The role that logs in with its client certificate alone (the test PKI's client certificate's
/// common name).
pub const CERT_ROLE: &str = "conveyor-worker";

pub struct OwnPostgres {
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

/// The directory of the newest PostgreSQL installation's programs, installing one if there is none.
fn bin_dir() -> anyhow::Result<PathBuf> {
    let newest = || {
        std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .flatten()
            .filter_map(|entry| {
                let version: u32 = entry.file_name().to_str()?.parse().ok()?;
                let bin = entry.path().join("bin");
                bin.join("initdb").is_file().then_some((version, bin))
            })
            .max()
            .map(|(_, bin)| bin)
    };
    if let Some(bin) = newest() {
        return Ok(bin);
    }
    eprintln!("installing postgresql (apt-get) for the PostgreSQL TLS tests");
    let status = std::process::Command::new("apt-get")
        .args(["install", "-y", "-q", "postgresql"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get to install postgresql")?;
    match newest() {
        Some(bin) if status.success() => Ok(bin),
        _ => bail!("PostgreSQL's initdb is needed for the TLS tests: apt-get install postgresql"),
    }
}

/// The uid and gid to run the server as: `postgres`'s when running as root.
fn server_user() -> anyhow::Result<Option<(u32, u32)>> {
    let id = |args: &[&str]| -> anyhow::Result<u32> {
        let output = std::process::Command::new("id")
            .args(args)
            .output()
            .context("running id")?;
        if !output.status.success() {
            bail!("running PostgreSQL as root needs a postgres user (apt-get install postgresql)");
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().parse()?)
    };
    if id(&["-u"])? != 0 {
        return Ok(None);
    }
    Ok(Some((id(&["-u", "postgres"])?, id(&["-g", "postgres"])?)))
}

impl OwnPostgres {
    /// Initializes a fresh server with `pki`'s server certificate and waits until it takes
    /// connections (over TLS).
    pub async fn start_with_tls(name: &str, pki: &TestPki) -> anyhow::Result<Self> {
        let bin = bin_dir()?;
        let user = server_user()?;
        let dir = std::env::temp_dir().join("conveyor-postgres").join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        // The server reads its certificate and key itself, and wants the key private to it.
        for (from, to) in [
            (&pki.server_cert_file, "server.pem"),
            (&pki.server_key_file, "server-key.pem"),
            (&pki.ca_file, "ca.pem"),
        ] {
            std::fs::copy(from, dir.join(to))?;
        }
        set_mode(&dir.join("server-key.pem"), 0o600)?;
        if let Some((uid, gid)) = user {
            for entry in std::fs::read_dir(&dir)? {
                std::os::unix::fs::chown(entry?.path(), Some(uid), Some(gid))?;
            }
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        }
        let data = dir.join("data");
        let run = |program: &str| {
            let mut command = Command::new(bin.join(program));
            if let Some((uid, gid)) = user {
                command.uid(uid).gid(gid);
            }
            command
        };
        let output = run("initdb")
            .args(["--auth=trust", "--username=postgres", "--encoding=UTF8"])
            .arg("-D")
            .arg(&data)
            .output()
            .await
            .context("running initdb")?;
        if !output.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        std::fs::write(
            data.join("pg_hba.conf"),
            format!(
                "local all all trust\n\
                 hostssl all {CERT_ROLE} 127.0.0.0/8 cert\n\
                 hostssl all all 127.0.0.0/8 trust\n"
            ),
        )?;
        let port = free_port()?;
        let path = |file: &str| dir.join(file).display().to_string();
        let log = std::fs::File::create(dir.join("server.log"))?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.join("server.log"), Some(uid), Some(gid))?;
        }
        let child = run("postgres")
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1,127.0.0.2"])
            .args(["-c", &format!("unix_socket_directories={}", dir.display())])
            .args(["-c", "ssl=on"])
            .args(["-c", &format!("ssl_cert_file={}", path("server.pem"))])
            .args(["-c", &format!("ssl_key_file={}", path("server-key.pem"))])
            .args(["-c", &format!("ssl_ca_file={}", path("ca.pem"))])
            .args(["-c", "fsync=off"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .context("starting postgres")?;
        let mut own = Self { port, dir, child };
        own.wait_accepting().await?;
        let role = run("psql")
            .args([
                "-h",
                &own.dir.display().to_string(),
                "-p",
                &port.to_string(),
            ])
            .args(["-U", "postgres", "-d", "postgres", "-c"])
            .arg(format!("CREATE ROLE \"{CERT_ROLE}\" LOGIN SUPERUSER"))
            .output()
            .await?;
        if !role.status.success() {
            bail!(
                "creating the role: {}",
                String::from_utf8_lossy(&role.stderr)
            );
        }
        Ok(own)
    }

    async fn wait_accepting(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the test's PostgreSQL exited with {status}; see {}",
                    self.dir.join("server.log").display()
                );
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!(
                    "the test's PostgreSQL did not listen within 60 s; see {}",
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A connection URL as `user` to `host` (which must resolve to 127.0.0.1 or 127.0.0.2), database
    /// `postgres`, with the query `params` (e.g. `sslmode=verify-full`).
    pub fn url(&self, user: &str, host: &str, params: &str) -> String {
        format!("postgres://{user}@{host}:{}/postgres?{params}", self.port)
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
}
