//! What `/proc` says of a process: its CPU time and its memory.

/// utime + stime of a process, seconds.
pub(crate) fn cpu_seconds(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ: 100 on every Linux this runs on.
    Some((utime + stime) / 100.0)
}

/// VmHWM of a process (its peak resident memory), MiB.
pub(crate) fn peak_rss_mib(pid: i32) -> Option<f64> {
    status_mib(pid, "VmHWM:")
}

/// VmRSS of a process (its resident memory now), MiB.
pub(crate) fn rss_mib(pid: i32) -> Option<f64> {
    status_mib(pid, "VmRSS:")
}

fn status_mib(pid: i32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
