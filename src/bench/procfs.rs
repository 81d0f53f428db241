//! CPU time and peak memory of processes, read from `/proc`.
//!
//! The relay runs as a child process so that these figures are its own: `VmHWM` in `/proc/<pid>/status` is
//! the peak resident set, and `utime + stime` in `/proc/<pid>/stat` the CPU time, in clock ticks. A
//! PostgreSQL server is a tree (postmaster, one backend per connection, walsenders, background workers) whose
//! backends come and go; a child that has exited and been reaped adds its time to the postmaster's `cutime` and
//! `cstime`, so the tree's total is the postmaster's four counters plus the live children's own.

use std::fs;

/// The fields of `/proc/<pid>/stat` we use, in clock ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Stat {
    ppid: u32,
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

/// Parses a `/proc/<pid>/stat` line. The command name is in parentheses and may itself contain spaces and
/// parentheses, so fields are counted from the last `)`.
fn parse_stat(line: &str) -> Option<Stat> {
    let (_, rest) = line.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    Some(Stat {
        ppid: u32::try_from(field(4)?).ok()?,
        utime: field(14)?,
        stime: field(15)?,
        cutime: field(16)?,
        cstime: field(17)?,
    })
}

fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// CPU seconds (user + system) the process has used so far; `None` once it is gone.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = stat(pid)?;
    Some((s.utime + s.stime) as f64 / ticks_per_second())
}

/// CPU seconds of this process.
pub fn own_cpu_seconds() -> f64 {
    cpu_seconds(std::process::id()).unwrap_or(0.0)
}

/// CPU seconds of `root` and all its children, including children that have exited and been reaped.
pub fn tree_cpu_seconds(root: u32) -> Option<f64> {
    let r = stat(root)?;
    let mut ticks = r.utime + r.stime + r.cutime + r.cstime;
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // a child may exit between the listing and the read: it then counts in the root's cutime instead
        if let Some(s) = stat(pid).filter(|s| s.ppid == root) {
            ticks += s.utime + s.stime + s.cutime + s.cstime;
        }
    }
    Some(ticks as f64 / ticks_per_second())
}

/// Peak resident set size (`VmHWM`) in KiB; `None` once the process is gone.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_hwm(&status)
}

/// Open sockets (file descriptors that are sockets); `None` once the process is gone.
pub fn sockets(pid: u32) -> Option<u64> {
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(
        fds.flatten()
            .filter(|fd| {
                fs::read_link(fd.path())
                    .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
            })
            .count() as u64,
    )
}

fn parse_hwm(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let line = "4242 (post gres: a) b) S 17 4242 4242 0 -1 4194560 500 0 0 0 \
                    1234 567 89 10 20 0 1 0 100 1000 200 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                ppid: 17,
                utime: 1234,
                stime: 567,
                cutime: 89,
                cstime: 10
            })
        );
        assert_eq!(parse_stat("4242 (x) S 17 1 2"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn parses_peak_rss() {
        let status = "Name:\twalhook\nVmPeak:\t  900 kB\nVmHWM:\t   23456 kB\nVmRSS:\t 20000 kB\n";
        assert_eq!(parse_hwm(status), Some(23456));
        assert_eq!(parse_hwm("Name:\tzombie\n"), None);
    }

    #[test]
    fn reads_this_process() {
        assert!(cpu_seconds(std::process::id()).is_some());
        assert!(peak_rss_kib(std::process::id()).unwrap() > 0);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(sockets(std::process::id()).unwrap() >= 1);
        drop(listener);
        let own = std::process::id();
        // the process alone first: other test threads keep using CPU, so a later reading is never lower
        let alone = cpu_seconds(own).unwrap();
        assert!(tree_cpu_seconds(own).unwrap() >= alone);
    }
}
