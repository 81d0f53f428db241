//! A throwaway PostgreSQL cluster: `initdb` into a temporary directory, a server on a free loopback port,
//! and everything stopped and deleted on drop.
//!
//! `walhook demo`, `walhook bench` and the integration tests need a real server (logical replication cannot be
//! faked), built from whatever server binaries the machine has: they are found through `pg_config --bindir`,
//! never by version or path. The server only listens on 127.0.0.1 and on a socket inside the temporary root,
//! so clusters never collide with each other or with a system server. PostgreSQL refuses to run as root, so
//! when we are root every server command runs as the `postgres` user, who owns the temporary root.
//!
//! The API is blocking (`std::process`) on purpose: starting a cluster is a second of process spawning, and
//! `Drop` must be able to stop the server without a runtime.

use std::ffi::{CString, OsStr};
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::TcpListener;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// How many times `start` picks another port when the one it chose was taken before the server bound it.
const PORT_ATTEMPTS: usize = 5;
/// Seconds `pg_ctl` waits for start, stop and restart; generous for loaded machines.
const PG_CTL_WAIT_SECS: &str = "120";
/// Lines of the server log quoted in start errors.
const LOG_TAIL_LINES: usize = 20;
/// The superuser created by initdb, and the OS user the server runs as when we are root.
const SUPERUSER: &str = "postgres";

/// The `wal_level` the cluster runs with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WalLevel {
    /// Needed by the `replication` source (pgoutput).
    #[default]
    Logical,
    /// For testing the error walhook gives, and the `notify` source.
    Replica,
}

impl WalLevel {
    fn setting(self) -> &'static str {
        match self {
            WalLevel::Logical => "logical",
            WalLevel::Replica => "replica",
        }
    }
}

/// How the superuser authenticates over TCP (the socket is always `trust`).
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Auth {
    #[default]
    Trust,
    /// `scram-sha-256` with this password; `Cluster::url` includes it.
    Scram(String),
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::Trust => f.write_str("Trust"),
            Auth::Scram(_) => f.write_str("Scram(..)"),
        }
    }
}

/// What kind of cluster to start. `ClusterOptions::default()` is a logical-replication cluster without fsync.
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    pub wal_level: WalLevel,
    /// `false` also turns off `synchronous_commit` and `full_page_writes`: data survives a clean restart but
    /// not a power loss, which is all a throwaway cluster needs.
    pub fsync: bool,
    pub auth: Auth,
    /// Extra `postgresql.conf` settings, written after (and so overriding) the ones above.
    pub extra_settings: Vec<(String, String)>,
    /// `ssl = on` with these certificates.
    pub tls: Option<ServerTls>,
    /// Replaces the TCP lines of `pg_hba.conf` (the socket stays `trust`), such as
    /// `hostssl all all 127.0.0.1/32 trust` for a server that admits TLS connections only.
    pub hba: Option<Vec<String>>,
}

/// The server's TLS material (PEM), written into the data directory, owned by the server's account, the key
/// with mode 0600 (the server refuses a key others may read).
#[derive(Clone, Default)]
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
    /// `ssl_ca_file`: the CA whose client certificates the server accepts (`clientcert`, `cert` auth).
    pub client_ca_pem: Option<String>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("client_ca", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// Why a cluster could not be started, stopped or used.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{0} not found: install the PostgreSQL server package (pg_config --bindir names its folder)")]
    BinaryNotFound(&'static str),
    #[error(
        "running as root but there is no 'postgres' user to run initdb as: create it (useradd postgres)"
    )]
    NoPostgresUser,
    #[error(
        "{0} is not searchable by the 'postgres' user: set TMPDIR to a directory every user can reach, such as /tmp"
    )]
    NotTraversable(PathBuf),
    #[error("could not {what} {path}: {source}; set TMPDIR to a writable directory")]
    Filesystem {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("could not find a free port on 127.0.0.1: {0}")]
    NoPort(io::Error),
    #[error("could not run {program}: {source}")]
    Spawn { program: PathBuf, source: io::Error },
    #[error("initdb failed ({status}): {output}")]
    Initdb { status: String, output: String },
    #[error(
        "postgres did not start on port {port}: {output}\nlast lines of the server log {log}:\n{log_tail}"
    )]
    Start {
        port: u16,
        output: String,
        log: PathBuf,
        log_tail: String,
    },
    #[error("pg_ctl {action} failed: {output}")]
    PgCtl {
        action: &'static str,
        output: String,
    },
    #[error("could not connect to the cluster on port {port}: {detail}")]
    Connect { port: u16, detail: String },
    #[error("could not create database {name:?}: {detail}")]
    CreateDatabase { name: String, detail: String },
}

/// A running throwaway cluster. Dropping it stops the server (`-m immediate`) and deletes its files.
#[derive(Debug)]
pub struct Cluster {
    root: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    password: Option<String>,
    pg_ctl: PathBuf,
    run_as: Option<Account>,
}

/// The OS account server commands run as when we are root.
#[derive(Clone, Copy, Debug)]
struct Account {
    uid: u32,
    gid: u32,
}

impl Cluster {
    /// Creates and starts a cluster; blocks for about a second (use `spawn_blocking` on a busy runtime).
    pub fn start(options: ClusterOptions) -> Result<Cluster, ClusterError> {
        let initdb = server_binary("initdb")?;
        let pg_ctl = server_binary("pg_ctl")?;
        let run_as = account_to_run_as()?;
        let root = make_root(run_as)?;
        let password = match &options.auth {
            Auth::Trust => None,
            Auth::Scram(password) => Some(password.clone()),
        };
        // From here on, dropping `cluster` cleans up whatever was created, on every error path.
        let mut cluster = Cluster {
            data: root.join("data"),
            log: root.join("postgres.log"),
            root,
            port: 0,
            password,
            pg_ctl,
            run_as,
        };
        cluster.initdb(&initdb)?;
        cluster.append_to_config(&options)?;
        let mut attempt = 1;
        loop {
            cluster.port = free_port()?;
            cluster.write_port()?;
            let log_start = fs::metadata(&cluster.log).map(|m| m.len()).unwrap_or(0);
            match cluster.pg_ctl_start() {
                Ok(()) => return Ok(cluster),
                // The port was free when we looked but someone bound it before the server did: pick another.
                Err(e)
                    if attempt < PORT_ATTEMPTS
                        && cluster.log_since(log_start).contains("already in use") =>
                {
                    tracing::debug!(port = cluster.port, error = %e, "port taken, retrying");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres[:password]@127.0.0.1:<port>/<dbname>`.
    pub fn url(&self, dbname: &str) -> String {
        let credentials = match &self.password {
            Some(password) => format!("{SUPERUSER}:{}", percent_encode(password)),
            None => SUPERUSER.to_string(),
        };
        format!(
            "postgres://{credentials}@127.0.0.1:{}/{}",
            self.port,
            percent_encode(dbname)
        )
    }

    /// The directory of the server's Unix socket, where the superuser is always trusted.
    pub fn socket_dir(&self) -> PathBuf {
        self.root.join("sock")
    }

    /// Creates a database (connecting to `postgres` over the socket, which any `hba` admits) and returns
    /// its URL.
    pub async fn create_database(&self, name: &str) -> Result<String, ClusterError> {
        let mut admin = tokio_postgres::Config::new();
        admin
            .host_path(self.socket_dir())
            .port(self.port)
            .user(SUPERUSER)
            .dbname("postgres");
        let (client, connection) =
            admin
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| ClusterError::Connect {
                    port: self.port,
                    detail: describe(&e),
                })?;
        let connection = tokio::spawn(connection);
        let created = client
            .batch_execute(&format!("create database {}", quote_ident(name)))
            .await;
        drop(client);
        // The connection ends once the client is gone; its own error would only repeat ours.
        let _ = connection.await;
        created.map_err(|e| ClusterError::CreateDatabase {
            name: name.to_string(),
            detail: describe(&e),
        })?;
        Ok(self.url(name))
    }

    /// A streaming standby of this cluster (`pg_basebackup -R`), started on a port of its own: a primary and
    /// its standby, for failover tests. It has this cluster's databases, roles and settings.
    pub fn start_standby(&self) -> Result<Cluster, ClusterError> {
        let basebackup = server_binary("pg_basebackup")?;
        let root = make_root(self.run_as)?;
        let mut standby = Cluster {
            data: root.join("data"),
            log: root.join("postgres.log"),
            root,
            port: 0,
            password: self.password.clone(),
            pg_ctl: self.pg_ctl.clone(),
            run_as: self.run_as,
        };
        let mut command = standby.command(&basebackup);
        command
            .arg("-D")
            .arg(&standby.data)
            .args(["-h", "127.0.0.1", "-U", SUPERUSER, "-R", "-X", "stream"])
            .args(["--checkpoint=fast", "--no-sync", "-p"])
            .arg(self.port.to_string());
        if let Some(password) = &self.password {
            command.env("PGPASSWORD", password);
        }
        let output = run(&mut command, &basebackup)?;
        if !output.status.success() {
            return Err(ClusterError::PgCtl {
                action: "pg_basebackup",
                output: output_text(&output),
            });
        }
        // its own socket directory, appended last so that it wins over the copied setting
        let socket_dir = standby.root.join("sock");
        fs::create_dir(&socket_dir).map_err(|source| fs_error("create", &socket_dir, source))?;
        standby.give_to_server(&socket_dir)?;
        let config = standby.data.join("postgresql.conf");
        fs::OpenOptions::new()
            .append(true)
            .open(&config)
            .and_then(|mut file| {
                file.write_all(
                    format!(
                        "\nunix_socket_directories = {}\n",
                        quote_literal(&socket_dir.to_string_lossy())
                    )
                    .as_bytes(),
                )
            })
            .map_err(|source| fs_error("append to", &config, source))?;
        let mut attempt = 1;
        loop {
            standby.port = free_port()?;
            standby.write_port()?;
            let log_start = fs::metadata(&standby.log).map(|m| m.len()).unwrap_or(0);
            match standby.pg_ctl_start() {
                Ok(()) => return Ok(standby),
                Err(e)
                    if attempt < PORT_ATTEMPTS
                        && standby.log_since(log_start).contains("already in use") =>
                {
                    tracing::debug!(port = standby.port, error = %e, "port taken, retrying");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Promotes a standby to primary (a new timeline), waiting until it accepts writes.
    pub fn promote(&self) -> Result<(), ClusterError> {
        let output = self.pg_ctl(&["promote"])?;
        check_pg_ctl("promote", output)
    }

    /// Stops the server as a crash would (`-m immediate`), keeping the data.
    pub fn crash(&self) -> Result<(), ClusterError> {
        let output = self.pg_ctl(&["stop", "-m", "immediate"])?;
        check_pg_ctl("stop", output)
    }

    /// Stops the server (`-m fast`), keeping the data for `start_again`.
    pub fn stop(&self) -> Result<(), ClusterError> {
        let output = self.pg_ctl(&["stop", "-m", "fast"])?;
        check_pg_ctl("stop", output)
    }

    /// Starts a stopped server again, on the same data directory and port.
    pub fn start_again(&self) -> Result<(), ClusterError> {
        self.pg_ctl_start()
    }

    /// Restarts the server (`-m fast`), waiting until it accepts connections again.
    pub fn restart(&self) -> Result<(), ClusterError> {
        let log = self.log.as_os_str();
        let output = self.pg_ctl(&[
            OsStr::new("restart"),
            "-m".as_ref(),
            "fast".as_ref(),
            "-l".as_ref(),
            log,
        ])?;
        self.check_restart(output)
    }

    /// Restarts the server as after a crash (`-m immediate`: no shutdown checkpoint, crash recovery at start),
    /// waiting until it accepts connections again.
    pub fn crash_and_restart(&self) -> Result<(), ClusterError> {
        let log = self.log.as_os_str();
        let output = self.pg_ctl(&[
            OsStr::new("restart"),
            "-m".as_ref(),
            "immediate".as_ref(),
            "-l".as_ref(),
            log,
        ])?;
        self.check_restart(output)
    }

    /// A failed restart says what the server logged last (a shutdown that waited, a port taken meanwhile).
    fn check_restart(&self, output: Output) -> Result<(), ClusterError> {
        check_pg_ctl("restart", output).map_err(|e| match e {
            ClusterError::PgCtl { action, output } => ClusterError::PgCtl {
                action,
                output: format!(
                    "{output}\nlast lines of the server log {}:\n{}",
                    self.log.display(),
                    last_lines(&self.log_since(0), LOG_TAIL_LINES)
                ),
            },
            e => e,
        })
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    fn initdb(&self, initdb: &Path) -> Result<(), ClusterError> {
        let mut command = self.command(initdb);
        command.arg("-D").arg(&self.data).args([
            "-U",
            SUPERUSER,
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        let pwfile = self.root.join("pwfile");
        match &self.password {
            None => {
                command.arg("--auth=trust");
            }
            Some(password) => {
                self.write_owned(&pwfile, format!("{password}\n").as_bytes(), 0o600)?;
                command
                    .args([
                        "--auth-local=trust",
                        "--auth-host=scram-sha-256",
                        "--pwfile",
                    ])
                    .arg(&pwfile);
            }
        }
        let output = run(&mut command, initdb);
        let _ = fs::remove_file(&pwfile);
        let output = output?;
        if !output.status.success() {
            return Err(ClusterError::Initdb {
                status: output.status.to_string(),
                output: output_text(&output),
            });
        }
        Ok(())
    }

    /// Appends our settings to `postgresql.conf`; the port lives in an included file so a retry can change it.
    fn append_to_config(&self, options: &ClusterOptions) -> Result<(), ClusterError> {
        let socket_dir = self.socket_dir();
        fs::create_dir(&socket_dir).map_err(|source| fs_error("create", &socket_dir, source))?;
        self.give_to_server(&socket_dir)?;
        let mut settings: Vec<(String, String)> = vec![
            ("wal_level".into(), options.wal_level.setting().into()),
            ("max_wal_senders".into(), "10".into()),
            ("max_replication_slots".into(), "10".into()),
            ("listen_addresses".into(), "127.0.0.1".into()),
            (
                "unix_socket_directories".into(),
                socket_dir.to_string_lossy().into_owned(),
            ),
        ];
        if !options.fsync {
            for name in ["fsync", "synchronous_commit", "full_page_writes"] {
                settings.push((name.into(), "off".into()));
            }
        }
        if let Some(tls) = &options.tls {
            self.write_owned(
                &self.data.join("server.crt"),
                tls.cert_pem.as_bytes(),
                0o644,
            )?;
            self.write_owned(&self.data.join("server.key"), tls.key_pem.as_bytes(), 0o600)?;
            settings.push(("ssl".into(), "on".into()));
            settings.push(("ssl_cert_file".into(), "server.crt".into()));
            settings.push(("ssl_key_file".into(), "server.key".into()));
            if let Some(ca) = &tls.client_ca_pem {
                self.write_owned(&self.data.join("client_ca.crt"), ca.as_bytes(), 0o644)?;
                settings.push(("ssl_ca_file".into(), "client_ca.crt".into()));
            }
        }
        if let Some(lines) = &options.hba {
            let mut hba = String::from("local all all trust\nlocal replication all trust\n");
            for line in lines {
                hba.push_str(line);
                hba.push('\n');
            }
            self.write_owned(&self.data.join("pg_hba.conf"), hba.as_bytes(), 0o600)?;
        }
        settings.extend(options.extra_settings.iter().cloned());
        let mut text =
            String::from("\n# walhook throwaway cluster\ninclude = 'walhook_port.conf'\n");
        for (name, value) in &settings {
            // Any value may be quoted in postgresql.conf, so quoting everything is safe for numbers too.
            text.push_str(&format!("{name} = {}\n", quote_literal(value)));
        }
        let config = self.data.join("postgresql.conf");
        fs::OpenOptions::new()
            .append(true)
            .open(&config)
            .and_then(|mut file| file.write_all(text.as_bytes()))
            .map_err(|source| fs_error("append to", &config, source))
    }

    fn write_port(&self) -> Result<(), ClusterError> {
        let path = self.data.join("walhook_port.conf");
        self.write_owned(&path, format!("port = {}\n", self.port).as_bytes(), 0o600)
    }

    fn pg_ctl_start(&self) -> Result<(), ClusterError> {
        let output = self.pg_ctl(&[OsStr::new("start"), "-l".as_ref(), self.log.as_os_str()])?;
        if output.status.success() {
            return Ok(());
        }
        Err(ClusterError::Start {
            port: self.port,
            output: output_text(&output),
            log: self.log.clone(),
            log_tail: last_lines(&self.log_since(0), LOG_TAIL_LINES),
        })
    }

    fn pg_ctl<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Output, ClusterError> {
        let mut command = self.command(&self.pg_ctl);
        command
            .args(args)
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", PG_CTL_WAIT_SECS]);
        run(&mut command, &self.pg_ctl)
    }

    /// A command run as the server's account, from the temporary root (the server's cwd must be readable).
    fn command(&self, program: &Path) -> Command {
        let mut command = Command::new(program);
        command
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .env("HOME", &self.root)
            // Variables that would point pg_ctl or initdb at another cluster.
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST");
        if let Some(account) = self.run_as {
            // std clears the supplementary groups when it switches uid from root.
            command
                .uid(account.uid)
                .gid(account.gid)
                .env("USER", SUPERUSER)
                .env("LOGNAME", SUPERUSER);
        }
        command
    }

    /// Writes a file the server's account owns, so that it can read it whoever we are.
    fn write_owned(&self, path: &Path, contents: &[u8], mode: u32) -> Result<(), ClusterError> {
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)
            .and_then(|mut file| file.write_all(contents))
            .map_err(|source| fs_error("write", path, source))?;
        self.give_to_server(path)
    }

    fn give_to_server(&self, path: &Path) -> Result<(), ClusterError> {
        match self.run_as {
            Some(account) => std::os::unix::fs::chown(path, Some(account.uid), Some(account.gid))
                .map_err(|source| fs_error("change the owner of", path, source)),
            None => Ok(()),
        }
    }

    /// The server log from byte `from` on (lossy), empty if it cannot be read.
    fn log_since(&self, from: u64) -> String {
        let bytes = fs::read(&self.log).unwrap_or_default();
        let from = usize::try_from(from).unwrap_or(usize::MAX).min(bytes.len());
        String::from_utf8_lossy(&bytes[from..]).into_owned()
    }

    /// Last resort when `pg_ctl stop` failed: SIGQUIT is what `-m immediate` sends.
    fn signal_postmaster(&self) {
        let Ok(pid_file) = fs::read_to_string(self.data.join("postmaster.pid")) else {
            return;
        };
        if let Some(Ok(pid)) = pid_file
            .lines()
            .next()
            .map(|line| line.trim().parse::<libc::pid_t>())
        {
            if pid > 0 {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGQUIT) };
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let stopped = self
            .pg_ctl(&["stop", "-m", "immediate"])
            .map(|output| output.status.success())
            .unwrap_or(false);
        // pg_ctl also fails when the server was already stopped; then there is no pid file and nothing to do.
        if !stopped {
            self.signal_postmaster();
        }
        if let Err(e) = fs::remove_dir_all(&self.root) {
            tracing::warn!(root = %self.root.display(), error = %e, "could not remove the throwaway cluster");
        }
    }
}

/// Finds a server binary in `pg_config --bindir`, then on PATH.
fn server_binary(name: &'static str) -> Result<PathBuf, ClusterError> {
    static BINDIR: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    let bindir = BINDIR.get_or_init(|| {
        let output = Command::new("pg_config")
            .arg("--bindir")
            .stdin(Stdio::null())
            .output()
            .ok()?;
        let dir = String::from_utf8(output.stdout).ok()?;
        output.status.success().then(|| PathBuf::from(dir.trim()))
    });
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    bindir
        .iter()
        .chain(on_path.iter())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
        .ok_or(ClusterError::BinaryNotFound(name))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `Some(postgres)` when we are root (the server refuses to run as root), `None` otherwise.
fn account_to_run_as() -> Result<Option<Account>, ClusterError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = CString::new(SUPERUSER).expect("constant has no NUL");
    // getpwnam_r rather than getpwnam: tests start clusters from several threads at once.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer refers to live, correctly sized storage owned by this frame.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(ClusterError::NoPostgresUser);
    }
    Ok(Some(Account {
        uid: entry.pw_uid,
        gid: entry.pw_gid,
    }))
}

/// Creates `$TMPDIR/walhook-pg-<pid>-<random>` (mode 0755), owned by the server's account.
fn make_root(run_as: Option<Account>) -> Result<PathBuf, ClusterError> {
    let parent = std::env::temp_dir();
    if run_as.is_some() {
        // The postgres user must be able to walk down to the root from `/`.
        for ancestor in parent.ancestors() {
            let searchable = fs::metadata(ancestor).is_ok_and(|m| m.mode() & 0o001 != 0);
            if !searchable {
                return Err(ClusterError::NotTraversable(ancestor.to_path_buf()));
            }
        }
    }
    let root = parent.join(format!(
        "walhook-pg-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    fs::DirBuilder::new()
        .mode(0o755)
        .create(&root)
        .map_err(|source| fs_error("create", &root, source))?;
    // The umask may have narrowed the mode; set it explicitly.
    let prepared = fs::set_permissions(&root, fs::Permissions::from_mode(0o755))
        .map_err(|source| fs_error("set the mode of", &root, source))
        .and_then(|()| match run_as {
            Some(account) => std::os::unix::fs::chown(&root, Some(account.uid), Some(account.gid))
                .map_err(|source| fs_error("change the owner of", &root, source)),
            None => Ok(()),
        });
    if let Err(e) = prepared {
        let _ = fs::remove_dir_all(&root);
        return Err(e);
    }
    Ok(root)
}

/// A port that was free a moment ago; `Cluster::start` retries if it is taken before the server binds it.
/// A port nothing listens on, below the kernel's ephemeral range when there is room: a port the kernel hands
/// out (to an outgoing connection, or to a listener on port 0 such as a test's receiver) could be taken while
/// the server restarts, and the restart would fail.
fn free_port() -> Result<u16, ClusterError> {
    if let Some(low) = ephemeral_low() {
        use rand::Rng;
        let below = low.saturating_sub(1024).min(10_000);
        for _ in 0..64 {
            let port = rand::rng().random_range(low - below..low);
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    let listener = TcpListener::bind(("127.0.0.1", 0)).map_err(ClusterError::NoPort)?;
    Ok(listener.local_addr().map_err(ClusterError::NoPort)?.port())
}

/// The first port of the kernel's ephemeral range (Linux), if at least 2048 ports lie below it above 1024.
fn ephemeral_low() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let low: u16 = range.split_whitespace().next()?.parse().ok()?;
    (low >= 1024 + 2048).then_some(low)
}

fn run(command: &mut Command, program: &Path) -> Result<Output, ClusterError> {
    command.output().map_err(|source| ClusterError::Spawn {
        program: program.to_path_buf(),
        source,
    })
}

fn check_pg_ctl(action: &'static str, output: Output) -> Result<(), ClusterError> {
    if output.status.success() {
        Ok(())
    } else {
        Err(ClusterError::PgCtl {
            action,
            output: output_text(&output),
        })
    }
}

fn output_text(output: &Output) -> String {
    let mut text = String::from_utf8_lossy(&output.stderr).trim().to_string();
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !stdout.trim().is_empty() {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(stdout.trim());
    }
    text
}

/// The server's message, or the error and its causes: tokio-postgres' own `Display` is only "db error".
fn describe(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return db.message().to_string();
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

fn fs_error(what: &'static str, path: &Path, source: io::Error) -> ClusterError {
    ClusterError::Filesystem {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// `"name"` with embedded quotes doubled.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'value'` with embedded quotes doubled (postgresql.conf syntax).
fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Percent-encodes everything but RFC 3986 unreserved characters, for URL userinfo and path segments.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_lie_below_the_ephemeral_range_when_there_is_room() {
        let port = free_port().unwrap();
        match ephemeral_low() {
            Some(low) => assert!(port < low && port > 1024, "{port} vs {low}"),
            None => assert!(port > 0),
        }
    }

    async fn query_one(url: &str, sql: &str) -> String {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let row = client.query_one(sql, &[]).await.unwrap();
        row.get(0)
    }

    #[tokio::test]
    async fn starts_a_logical_cluster_and_creates_databases() {
        let cluster = Cluster::start(ClusterOptions::default()).unwrap();
        let url = cluster.create_database("app_1").await.unwrap();
        assert_eq!(
            url,
            format!("postgres://postgres@127.0.0.1:{}/app_1", cluster.port())
        );
        assert_eq!(query_one(&url, "show wal_level").await, "logical");
        assert_eq!(
            query_one(&url, "select current_database()::text").await,
            "app_1"
        );
        assert_eq!(query_one(&url, "show fsync").await, "off");
        // a name that needs quoting and URL encoding
        let odd = cluster.create_database("odd name\"x").await.unwrap();
        assert_eq!(
            query_one(&odd, "select current_database()::text").await,
            "odd name\"x"
        );
        let again = cluster.create_database("app_1").await.unwrap_err();
        assert_eq!(
            again.to_string(),
            "could not create database \"app_1\": database \"app_1\" already exists"
        );
    }

    #[tokio::test]
    async fn replica_option_and_extra_settings() {
        let cluster = Cluster::start(ClusterOptions {
            wal_level: WalLevel::Replica,
            fsync: true,
            extra_settings: vec![("application_name".into(), "it's walhook".into())],
            ..ClusterOptions::default()
        })
        .unwrap();
        let url = cluster.url("postgres");
        assert_eq!(query_one(&url, "show wal_level").await, "replica");
        assert_eq!(query_one(&url, "show fsync").await, "on");
        assert_eq!(query_one(&url, "show max_replication_slots").await, "10");
    }

    #[tokio::test]
    async fn scram_needs_the_password() {
        let cluster = Cluster::start(ClusterOptions {
            auth: Auth::Scram("s3cret:/@".into()),
            ..ClusterOptions::default()
        })
        .unwrap();
        let url = cluster.create_database("app").await.unwrap();
        assert!(
            url.starts_with("postgres://postgres:s3cret%3A%2F%40@127.0.0.1:"),
            "{url}"
        );
        assert_eq!(
            query_one(&url, "select current_user::text").await,
            "postgres"
        );
        let without = format!("postgres://postgres@127.0.0.1:{}/app", cluster.port());
        assert!(tokio_postgres::connect(&without, tokio_postgres::NoTls)
            .await
            .is_err());
        let wrong = format!("postgres://postgres:wrong@127.0.0.1:{}/app", cluster.port());
        assert!(tokio_postgres::connect(&wrong, tokio_postgres::NoTls)
            .await
            .is_err());
        assert!(!format!(
            "{:?}",
            ClusterOptions {
                auth: Auth::Scram("s3cret".into()),
                ..Default::default()
            }
        )
        .contains("s3cret"));
    }

    #[tokio::test]
    async fn restart_and_stop_start_keep_data() {
        let cluster = Cluster::start(ClusterOptions::default()).unwrap();
        let url = cluster.create_database("kept").await.unwrap();
        {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            client
                .batch_execute("create table t (v text); insert into t values ('still here')")
                .await
                .unwrap();
        }
        let port = cluster.port();
        cluster.restart().unwrap();
        assert_eq!(query_one(&url, "select v from t").await, "still here");
        cluster.stop().unwrap();
        assert!(tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .is_err());
        cluster.start_again().unwrap();
        assert_eq!(cluster.port(), port);
        assert_eq!(query_one(&url, "select v from t").await, "still here");
    }

    #[tokio::test]
    async fn two_clusters_at_once_and_drop_cleans_up() {
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| Cluster::start(ClusterOptions::default()).unwrap());
            let b = s.spawn(|| Cluster::start(ClusterOptions::default()).unwrap());
            (a.join().unwrap(), b.join().unwrap())
        });
        assert_ne!(a.port(), b.port());
        assert_ne!(a.data_dir(), b.data_dir());
        assert_eq!(
            query_one(&a.url("postgres"), "show port").await,
            a.port().to_string()
        );
        assert_eq!(
            query_one(&b.url("postgres"), "show port").await,
            b.port().to_string()
        );

        let root = a.root.clone();
        let pid_file = fs::read_to_string(a.data_dir().join("postmaster.pid")).unwrap();
        let pid: u32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
        assert!(process_alive(pid));
        drop(a);
        assert!(!root.exists(), "{} still exists", root.display());
        // pg_ctl returns once the pid file is gone, a moment before the process itself exits
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while process_alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(!process_alive(pid), "postmaster {pid} still running");
        // the other cluster is unaffected
        assert_eq!(query_one(&b.url("postgres"), "select 'ok'").await, "ok");
    }

    /// Alive and not a zombie (the postmaster is not our child, so nobody here reaps it).
    fn process_alive(pid: u32) -> bool {
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            // state is the field after the parenthesised command name
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z')),
            Err(_) => false,
        }
    }

    #[test]
    fn helpers_quote_and_encode() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(percent_encode("a b/é"), "a%20b%2F%C3%A9");
        assert!(server_binary("initdb").is_ok());
        assert!(matches!(
            server_binary("no-such-binary-walhook"),
            Err(ClusterError::BinaryNotFound(_))
        ));
        let message = ClusterError::BinaryNotFound("initdb").to_string();
        assert!(
            message.starts_with("initdb not found: install"),
            "{message}"
        );
    }
}
