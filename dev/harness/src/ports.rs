//! Free loopback ports for processes started next.
use std::net::SocketAddr;

use rand::RngExt as _;

/// A loopback address with a port that was free a moment ago (see [`free_port`]).
pub(crate) fn free_local_addr() -> std::io::Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
}

/// A loopback port, free when asked, for a process started next to listen on. It is taken below the
/// kernel's ephemeral range: a port from that range can be given to an outgoing connection (the
/// workers open many) between this check and the process's bind.
pub fn free_port() -> std::io::Result<u16> {
    const LOWEST: u16 = 10_000;
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if ephemeral_start > LOWEST + 1_000 {
        for _ in 0..100 {
            let port = rand::rng().random_range(LOWEST..ephemeral_start);
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}
