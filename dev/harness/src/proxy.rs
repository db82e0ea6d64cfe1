//! A TCP proxy the test controls, put between a worker and a service to make the service "go away":
//! while down, it cuts every open connection and drops new ones at once (as a crashed or unreachable
//! server would look to a client); when up again it forwards as before.

use std::net::SocketAddr;

use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct TcpProxy {
    addr: SocketAddr,
    /// `true` while the service is made unreachable.
    down: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (down, _) = watch::channel(false);
        let watcher = down.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *watcher.borrow() {
                    drop(client);
                    continue;
                }
                let mut cut = watcher.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let mut client = client;
                    tokio::select! {
                        _ = copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.wait_for(|down| *down) => {}
                    }
                });
            }
        });
        Ok(Self { addr, down, task })
    }

    /// The address clients connect to instead of the service's.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts every connection and refuses new ones until [`TcpProxy::up`].
    pub fn down(&self) {
        self.down.send_replace(true);
    }

    pub fn up(&self) {
        self.down.send_replace(false);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn forwards_cuts_and_forwards_again() {
        let echo = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut buffer = [0u8; 64];
                    while let Ok(n) = socket.read(&mut buffer).await {
                        if n == 0 || socket.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let proxy = TcpProxy::start(echo_addr).await.unwrap();
        let roundtrip = |addr| async move {
            let mut socket = TcpStream::connect(addr).await?;
            socket.write_all(b"ping").await?;
            let mut reply = [0u8; 4];
            socket.read_exact(&mut reply).await?;
            std::io::Result::Ok(reply)
        };
        assert_eq!(&roundtrip(proxy.addr()).await.unwrap(), b"ping");
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        open.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        open.read_exact(&mut one).await.unwrap();
        proxy.down();
        assert_eq!(
            open.read(&mut one).await.unwrap_or(0),
            0,
            "open connections are cut"
        );
        assert!(roundtrip(proxy.addr()).await.is_err(), "new ones refused");
        proxy.up();
        assert_eq!(&roundtrip(proxy.addr()).await.unwrap(), b"ping");
    }
}
