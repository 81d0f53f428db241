//! The relay under test: this very binary's `walhook run`, as a child process.
//!
//! A child rather than a task in the benchmark's runtime, so that its peak memory and CPU time are its own
//! (read from `/proc/<pid>`) and the writers and the receiver do not share its threads. It is configured only
//! through `WALHOOK_*` variables: inherited ones are removed first, so a user's environment cannot change what
//! is measured except through `--relay-setting`. Its log goes to a file that is quoted when it fails and
//! deleted when it succeeds. Dropping a `Relay` that is still running kills it.
//!
//! `--instances N` runs N of them on the same database ([`Relays`]), as several daemons would run in
//! production: each has its own process, log and `/proc` figures, and they are stopped together (all
//! signalled first, then waited for), so that none takes over work the others are draining.

use std::ffi::OsString;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use super::{procfs, BenchError};

/// How long a graceful drain may take before the relay is killed and the benchmark fails.
const STOP_DEADLINE: Duration = Duration::from_secs(60);
/// Lines of the relay's log quoted in errors.
const LOG_TAIL_LINES: usize = 15;

pub struct Relay {
    child: Child,
    pid: u32,
    log: PathBuf,
    /// When the process was started (wall clock, comparable with the receiver's arrival times).
    pub spawned: SystemTime,
}

/// `delivery.max_in_flight_per_endpoint` → `WALHOOK_DELIVERY__MAX_IN_FLIGHT_PER_ENDPOINT`.
pub fn env_name(key: &str) -> String {
    format!("WALHOOK_{}", key.replace('.', "__").to_uppercase())
}

impl Relay {
    /// Starts `walhook run` with `settings` (dotted config keys) on top of the benchmark's defaults.
    pub fn spawn(settings: &[(String, String)], log: PathBuf) -> Result<Relay, BenchError> {
        let exe = std::env::current_exe().map_err(|source| BenchError::Io {
            what: "finding the walhook binary to run the relay".into(),
            source,
        })?;
        let file = File::create(&log).map_err(|source| BenchError::Io {
            what: format!("creating the relay log {}", log.display()),
            source,
        })?;
        let mut command = Command::new(exe);
        command.arg("run");
        // the benchmark names its database completely: the relays read no PG* variables, as its own
        // sessions do not
        let inherited: Vec<OsString> = std::env::vars_os()
            .map(|(k, _)| k)
            .filter(|k| {
                let k = k.to_string_lossy();
                k.starts_with("WALHOOK_") || k.starts_with("PG")
            })
            .collect();
        for key in inherited {
            command.env_remove(key);
        }
        command.env_remove("RUST_LOG");
        for (key, value) in settings {
            command.env(env_name(key), value);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file));
        let spawned = SystemTime::now();
        let child = command.spawn().map_err(|source| BenchError::Io {
            what: "starting the relay (walhook run)".into(),
            source,
        })?;
        Ok(Relay {
            pid: child.id(),
            child,
            log,
            spawned,
        })
    }

    pub fn cpu_seconds(&self) -> f64 {
        procfs::cpu_seconds(self.pid).unwrap_or(0.0)
    }

    /// Peak resident memory so far, in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        procfs::peak_rss_kib(self.pid).unwrap_or(0) as f64 / 1024.0
    }

    /// Sockets open right now (connections to endpoints and to PostgreSQL, listeners).
    pub fn sockets(&self) -> u64 {
        procfs::sockets(self.pid).unwrap_or(0)
    }

    /// An error, quoting the log, if the relay has exited.
    pub fn check(&mut self) -> Result<(), BenchError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(self.failure(&format!("the relay exited early ({status})"))),
            Err(e) => Err(BenchError::Relay(format!("cannot watch the relay: {e}"))),
        }
    }

    /// SIGTERM: a graceful drain.
    fn terminate(&self) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
    }

    /// Waits for the exit that `terminate` asked for; an error if it does not exit cleanly in time.
    async fn wait_exit(mut self) -> Result<(), BenchError> {
        let until = Instant::now() + STOP_DEADLINE;
        let status: ExitStatus = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Ok(None) => {
                    return Err(self.failure(&format!(
                        "the relay did not drain within {} s of SIGTERM",
                        STOP_DEADLINE.as_secs()
                    )))
                }
                Err(e) => return Err(BenchError::Relay(format!("cannot wait for the relay: {e}"))),
            }
        };
        if !status.success() {
            return Err(self.failure(&format!("the relay ended with {status}")));
        }
        let _ = std::fs::remove_file(&self.log);
        Ok(())
    }

    fn failure(&self, what: &str) -> BenchError {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
        BenchError::Relay(format!(
            "{what}; its log is {}:\n{tail}",
            self.log.display()
        ))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The relay instances of one scenario, all on the same database.
pub struct Relays {
    all: Vec<Relay>,
}

impl Relays {
    /// Starts `instances` relays with the same settings; instance `i` logs to `<log_stem>-<i>.log`.
    pub fn spawn(
        instances: usize,
        settings: &[(String, String)],
        log_stem: &str,
    ) -> Result<Relays, BenchError> {
        let mut all = Vec::with_capacity(instances);
        for i in 0..instances.max(1) {
            let log = std::env::temp_dir().join(format!("{log_stem}-{i}.log"));
            // an error drops the ones already started, which kills them
            all.push(Relay::spawn(settings, log)?);
        }
        Ok(Relays { all })
    }

    /// When the first instance was started.
    pub fn spawned(&self) -> SystemTime {
        self.all
            .iter()
            .map(|r| r.spawned)
            .min()
            .expect("at least one instance")
    }

    pub fn len(&self) -> usize {
        self.all.len()
    }

    /// CPU seconds of each instance so far.
    pub fn cpu_seconds(&self) -> Vec<f64> {
        self.all.iter().map(Relay::cpu_seconds).collect()
    }

    /// Peak resident memory of each instance so far, in MiB.
    pub fn peak_rss_mib(&self) -> Vec<f64> {
        self.all.iter().map(Relay::peak_rss_mib).collect()
    }

    /// The sum of every instance's peak resident memory, in MiB (at least the peak of their sum).
    pub fn peak_rss_mib_sum(&self) -> f64 {
        self.peak_rss_mib().iter().fold(0.0, |a, b| a + b)
    }

    /// Sockets open right now, all instances together.
    pub fn sockets(&self) -> u64 {
        self.all.iter().map(Relay::sockets).sum()
    }

    /// An error, quoting its log, if any instance has exited.
    pub fn check(&mut self) -> Result<(), BenchError> {
        self.all.iter_mut().try_for_each(Relay::check)
    }

    /// SIGTERM to every instance, then waits for each; the first error once all have been waited for.
    pub async fn stop(self) -> Result<(), BenchError> {
        for relay in &self.all {
            relay.terminate();
        }
        let mut result = Ok(());
        for relay in self.all {
            let stopped = relay.wait_exit().await;
            if result.is_ok() {
                result = stopped;
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_follow_the_config_layer() {
        assert_eq!(
            env_name("delivery.max_in_flight_per_endpoint"),
            "WALHOOK_DELIVERY__MAX_IN_FLIGHT_PER_ENDPOINT"
        );
        assert_eq!(env_name("database_url"), "WALHOOK_DATABASE_URL");
    }
}
