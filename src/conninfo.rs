//! Connection settings as libpq reads them, so that walhook connects wherever `psql` does.
//!
//! `database_url` is a URL (`postgres://user@host/db?sslmode=verify-full`) or a keyword string
//! (`host=... sslmode=...`); whatever it leaves unset comes from the `PG*` environment variables libpq reads
//! (`PGHOST`, `PGUSER`, `PGSSLMODE`, ...), then libpq's defaults (the local socket, the operating-system user).
//! A missing password is looked up in the password file (`passfile`, `PGPASSFILE`, else `~/.pgpass`), which is
//! ignored with a warning when others may read it, as libpq does. So `database_url` may be unset altogether.
//!
//! The parser is ours, not tokio-postgres', for three reasons: tokio-postgres refuses the TLS keywords
//! (`sslrootcert`, `sslcert`, `sslkey`, `verify-full`), it cannot tell a default from an explicit setting
//! (which the environment merge needs), and every setting must remember where it came from, for
//! `check-config` and for errors that name the variable to fix. The settings tokio-postgres knows are then
//! handed to it, so it validates their values itself. No message here ever contains a password: parse errors
//! name keywords and positions, never values of the password.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::pgtls::{RootCert, SslMode, TlsSettings, TlsVersions};

/// Where a setting came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    DatabaseUrl,
    /// A `PG*` environment variable.
    Env(&'static str),
    /// The password file, and the line that matched.
    PassFile {
        path: PathBuf,
        line: usize,
    },
    /// libpq's default, and which.
    Default(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::DatabaseUrl => f.write_str("database_url"),
            Origin::Env(var) => f.write_str(var),
            Origin::PassFile { path, line } => {
                write!(f, "password file {}, line {line}", path.display())
            }
            Origin::Default(what) => write!(f, "default: {what}"),
        }
    }
}

/// A setting walhook cannot use, named with where it came from. `key` is `database_url` or the variable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct SettingError {
    pub key: String,
    pub message: String,
}

impl SettingError {
    fn new(origin: &Origin, message: impl Into<String>) -> SettingError {
        let key = match origin {
            Origin::Env(var) => var.to_string(),
            Origin::PassFile { path, .. } => format!("password file {}", path.display()),
            Origin::DatabaseUrl | Origin::Default(_) => "database_url".to_string(),
        };
        SettingError {
            key,
            message: message.into(),
        }
    }
}

/// What walhook does with a libpq keyword.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Use {
    /// Handed to tokio-postgres under this name.
    Postgres(&'static str),
    /// Read here (TLS, the password file, the fallback application name).
    Walhook,
    /// Accepted and without effect here (GSSAPI tuning, compression libpq no longer does).
    Ignored,
    /// Refused, with why and what to do instead.
    Unsupported(&'static str),
}

struct Keyword {
    name: &'static str,
    env: Option<&'static str>,
    usage: Use,
}

const fn kw(name: &'static str, env: Option<&'static str>, usage: Use) -> Keyword {
    Keyword { name, env, usage }
}

/// libpq's keywords and their variables, in libpq's order.
const KEYWORDS: &[Keyword] = &[
    kw("host", Some("PGHOST"), Use::Postgres("host")),
    kw("hostaddr", Some("PGHOSTADDR"), Use::Postgres("hostaddr")),
    kw("port", Some("PGPORT"), Use::Postgres("port")),
    kw("dbname", Some("PGDATABASE"), Use::Postgres("dbname")),
    kw("user", Some("PGUSER"), Use::Postgres("user")),
    kw("password", Some("PGPASSWORD"), Use::Postgres("password")),
    kw("passfile", Some("PGPASSFILE"), Use::Walhook),
    kw("options", Some("PGOPTIONS"), Use::Postgres("options")),
    kw("application_name", Some("PGAPPNAME"), Use::Postgres("application_name")),
    kw("fallback_application_name", None, Use::Walhook),
    kw("connect_timeout", Some("PGCONNECT_TIMEOUT"), Use::Postgres("connect_timeout")),
    kw("tcp_user_timeout", None, Use::Postgres("tcp_user_timeout")),
    kw("keepalives", None, Use::Postgres("keepalives")),
    kw("keepalives_idle", None, Use::Postgres("keepalives_idle")),
    kw("keepalives_interval", None, Use::Postgres("keepalives_interval")),
    kw("keepalives_count", None, Use::Postgres("keepalives_retries")),
    kw("target_session_attrs", Some("PGTARGETSESSIONATTRS"), Use::Postgres("target_session_attrs")),
    kw("load_balance_hosts", Some("PGLOADBALANCEHOSTS"), Use::Postgres("load_balance_hosts")),
    kw("channel_binding", Some("PGCHANNELBINDING"), Use::Postgres("channel_binding")),
    kw("sslmode", Some("PGSSLMODE"), Use::Walhook),
    kw("sslrootcert", Some("PGSSLROOTCERT"), Use::Walhook),
    kw("sslcert", Some("PGSSLCERT"), Use::Walhook),
    kw("sslkey", Some("PGSSLKEY"), Use::Walhook),
    kw("sslsni", Some("PGSSLSNI"), Use::Walhook),
    kw("ssl_min_protocol_version", Some("PGSSLMINPROTOCOLVERSION"), Use::Walhook),
    kw("ssl_max_protocol_version", Some("PGSSLMAXPROTOCOLVERSION"), Use::Walhook),
    kw("sslnegotiation", Some("PGSSLNEGOTIATION"), Use::Walhook),
    kw("sslcompression", Some("PGSSLCOMPRESSION"), Use::Ignored),
    kw("gssencmode", Some("PGGSSENCMODE"), Use::Walhook),
    kw("krbsrvname", Some("PGKRBSRVNAME"), Use::Ignored),
    kw("gsslib", Some("PGGSSLIB"), Use::Ignored),
    kw("client_encoding", Some("PGCLIENTENCODING"), Use::Walhook),
    kw(
        "sslcrl",
        Some("PGSSLCRL"),
        Use::Unsupported("walhook does not check certificate revocation lists; remove it"),
    ),
    kw(
        "sslcrldir",
        Some("PGSSLCRLDIR"),
        Use::Unsupported("walhook does not check certificate revocation lists; remove it"),
    ),
    kw(
        "sslpassword",
        None,
        Use::Unsupported(
            "walhook reads unencrypted keys only; decrypt the key (openssl pkey -in key.pem -out plain.pem) and \
             protect it with file permissions (chmod 600)",
        ),
    ),
    kw(
        "sslcertmode",
        Some("PGSSLCERTMODE"),
        Use::Unsupported("remove it: walhook presents sslcert whenever the server asks for a certificate"),
    ),
    kw(
        "service",
        Some("PGSERVICE"),
        Use::Unsupported(
            "walhook does not read pg_service.conf; put the service's settings in database_url or PG* variables",
        ),
    ),
    kw(
        "requirepeer",
        Some("PGREQUIREPEER"),
        Use::Unsupported("remove it (walhook does not check the server process's user)"),
    ),
    kw(
        "require_auth",
        Some("PGREQUIREAUTH"),
        Use::Unsupported("remove it; channel_binding=require insists on SCRAM with channel binding"),
    ),
    kw(
        "replication",
        None,
        Use::Unsupported("remove it: walhook opens its replication connection itself"),
    ),
];

fn keyword(name: &str) -> Option<&'static Keyword> {
    KEYWORDS.iter().find(|k| k.name == name)
}

/// The environment libpq reads: the `PG*` variables, the home directory and the operating-system user.
/// Tests build one by hand; [`Environment::process`] reads this process's.
#[derive(Clone, Debug, Default)]
pub struct Environment {
    vars: BTreeMap<String, String>,
    home: Option<PathBuf>,
    os_user: Option<String>,
}

impl Environment {
    /// This process's `PG*` variables, `$HOME` (else the passwd entry's home) and effective user.
    pub fn process() -> Environment {
        let vars = KEYWORDS
            .iter()
            .filter_map(|k| k.env)
            .filter_map(|var| Some((var.to_string(), std::env::var(var).ok()?)))
            .collect();
        let account = os_account();
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .or_else(|| account.as_ref().map(|(_, home)| home.clone()));
        Environment {
            vars,
            home,
            os_user: account.map(|(name, _)| name),
        }
    }

    pub fn with_var(mut self, name: &str, value: &str) -> Environment {
        self.vars.insert(name.to_string(), value.to_string());
        self
    }

    pub fn with_home(mut self, home: &Path) -> Environment {
        self.home = Some(home.to_path_buf());
        self
    }

    pub fn with_os_user(mut self, user: &str) -> Environment {
        self.os_user = Some(user.to_string());
        self
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// `~/.postgresql/<file>` when it exists (libpq's default TLS files).
    fn home_file(&self, file: &str) -> Option<PathBuf> {
        let path = self.home.as_ref()?.join(".postgresql").join(file);
        path.exists().then_some(path)
    }
}

/// The effective user's name and home directory, from the passwd database (as libpq finds them).
fn os_account() -> Option<(String, PathBuf)> {
    use std::ffi::CStr;
    use std::os::unix::ffi::OsStrExt;
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer refers to live, correctly sized storage owned by this frame; geteuid cannot fail
    let rc = unsafe {
        libc::getpwuid_r(
            libc::geteuid(),
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return None;
    }
    // SAFETY: on success both fields point at NUL-terminated strings inside `buffer`
    let (name, dir) = unsafe { (CStr::from_ptr(entry.pw_name), CStr::from_ptr(entry.pw_dir)) };
    Some((
        name.to_string_lossy().into_owned(),
        PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes())),
    ))
}

#[derive(Clone, Debug)]
struct Setting {
    value: String,
    origin: Origin,
}

/// Settings by keyword, each with its origin.
type Settings = BTreeMap<&'static str, Setting>;

/// Resolved connection settings: what tokio-postgres connects with, the TLS settings, and where each came
/// from. Derefs to the tokio-postgres configuration, which holds everything but TLS.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pg: tokio_postgres::Config,
    tls: TlsSettings,
    /// Every setting with its origin; the password's value is not kept here.
    shown: Vec<(&'static str, String, Origin)>,
    warnings: Vec<String>,
}

impl std::ops::Deref for ConnInfo {
    type Target = tokio_postgres::Config;
    fn deref(&self) -> &tokio_postgres::Config {
        &self.pg
    }
}

impl std::ops::DerefMut for ConnInfo {
    fn deref_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.pg
    }
}

impl ConnInfo {
    /// `database_url` (if any), then the environment, then libpq's defaults and the password file.
    pub fn resolve(
        database_url: Option<&str>,
        env: &Environment,
    ) -> Result<ConnInfo, SettingError> {
        let mut settings = collect(database_url, env)?;
        let mut warnings = Vec::new();
        // hostaddr alone names the server too; otherwise the local socket, as libpq
        let port = settings.get("port").map_or("5432", |s| s.value.as_str());
        let port = port.split(',').next().unwrap_or("5432").to_string();
        if !settings.contains_key("host") && !settings.contains_key("hostaddr") {
            let dir = default_socket_dir(&port);
            settings.insert("host", default(dir, "the local socket"));
        }
        if !settings.contains_key("user") {
            match &env.os_user {
                Some(user) => {
                    settings.insert("user", default(user.clone(), "the operating-system user"));
                }
                None => {
                    return Err(SettingError::new(
                        &Origin::DatabaseUrl,
                        "names no user; add user=... (or set PGUSER)",
                    ))
                }
            }
        }
        let tls = tls_settings(&settings, env, true)?;
        if !settings.contains_key("sslmode") {
            let why = match tls.mode {
                SslMode::VerifyFull => "sslrootcert=system implies verify-full",
                _ => "libpq's default",
            };
            settings.insert("sslmode", default(tls.mode.as_str(), why));
        }
        if !settings.contains_key("password") {
            if let Some(found) = password_from_file(&settings, env, &mut warnings) {
                settings.insert("password", found);
            }
        }
        let mut pg = postgres_config(&settings)?;
        // hostaddr without host: the address is the name TLS checks (tokio-postgres would have none)
        if pg.get_hosts().is_empty() {
            let addrs: Vec<String> = pg.get_hostaddrs().iter().map(|a| a.to_string()).collect();
            for addr in addrs {
                pg.host(addr);
            }
        }
        let fallback = settings.get("fallback_application_name");
        if let (None, Some(name)) = (pg.get_application_name(), fallback) {
            pg.application_name(&name.value);
        }
        let shown = settings
            .iter()
            .map(|(name, s)| {
                let value = match *name {
                    "password" => "(set, not shown)".to_string(),
                    _ => s.value.clone(),
                };
                (*name, value, s.origin.clone())
            })
            .collect();
        Ok(ConnInfo {
            pg,
            tls,
            shown,
            warnings,
        })
    }

    /// The TLS half.
    pub fn tls(&self) -> &TlsSettings {
        &self.tls
    }

    /// The settings tokio-postgres connects with (everything but TLS).
    pub fn pg(&self) -> &tokio_postgres::Config {
        &self.pg
    }

    /// What the password file lookup had to say (a file others may read is ignored).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// One line per setting: `host  db.example.com  (PGHOST)`; the password shows only where it came from.
    pub fn describe(&self) -> String {
        let width = self
            .shown
            .iter()
            .map(|(n, _, _)| n.len())
            .max()
            .unwrap_or(0);
        let mut shown = self.shown.clone();
        shown.sort_by_key(|(name, _, _)| KEYWORDS.iter().position(|k| k.name == *name));
        shown
            .iter()
            .map(|(name, value, origin)| format!("  {name:width$}  {value}  ({origin})"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn default(value: impl Into<String>, what: &'static str) -> Setting {
    Setting {
        value: value.into(),
        origin: Origin::Default(what),
    }
}

/// Connection strings without the environment: tests, the demo and the benchmark name everything.
impl FromStr for ConnInfo {
    type Err = SettingError;
    fn from_str(s: &str) -> Result<ConnInfo, SettingError> {
        ConnInfo::resolve(Some(s), &Environment::default())
    }
}

/// tokio-postgres settings with its own `sslmode` (`disable`, `prefer` or `require`, without verification).
impl From<tokio_postgres::Config> for ConnInfo {
    fn from(pg: tokio_postgres::Config) -> ConnInfo {
        let mode = match pg.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => SslMode::Disable,
            tokio_postgres::config::SslMode::Require => SslMode::Require,
            _ => SslMode::Prefer,
        };
        ConnInfo {
            pg,
            tls: TlsSettings {
                mode,
                ..TlsSettings::default()
            },
            shown: Vec::new(),
            warnings: Vec::new(),
        }
    }
}

/// Checks `database_url` alone: its syntax, its keywords and their values. Files are checked when the
/// settings are resolved for a connection.
pub fn check_syntax(database_url: &str) -> Result<(), SettingError> {
    let settings = collect(Some(database_url), &Environment::default())?;
    tls_settings(&settings, &Environment::default(), false)?;
    postgres_config(&settings)?;
    Ok(())
}

/// Whether a connection string sets a password.
pub fn has_password(database_url: &str) -> Result<bool, SettingError> {
    Ok(parse(database_url)?.iter().any(|(k, _)| k == "password"))
}

/// The parsed `database_url`, then the environment's values for the keywords it leaves unset.
fn collect(database_url: Option<&str>, env: &Environment) -> Result<Settings, SettingError> {
    let mut settings = Settings::new();
    if let Some(url) = database_url {
        for (name, value) in parse(url)? {
            let keyword = keyword(&name).ok_or_else(|| {
                SettingError::new(
                    &Origin::DatabaseUrl,
                    format!(
                        "unknown connection setting {name:?}; known: {}",
                        KEYWORDS
                            .iter()
                            .filter(|k| !matches!(k.usage, Use::Unsupported(_)))
                            .map(|k| k.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?;
            // an empty value means "not set", as in libpq's environment handling
            if value.is_empty() {
                settings.remove(keyword.name);
                continue;
            }
            settings.insert(
                keyword.name,
                Setting {
                    value,
                    origin: Origin::DatabaseUrl,
                },
            );
        }
    }
    for keyword in KEYWORDS {
        if let Some(var) = keyword.env {
            if let (false, Some(value)) = (settings.contains_key(keyword.name), env.var(var)) {
                settings.insert(
                    keyword.name,
                    Setting {
                        value: value.to_string(),
                        origin: Origin::Env(var),
                    },
                );
            }
        }
    }
    for (name, setting) in &settings {
        let usage = keyword(name).expect("only known keywords are stored").usage;
        if let Use::Unsupported(why) = usage {
            return Err(SettingError::new(
                &setting.origin,
                format!("{name} is not supported: {why}"),
            ));
        }
        match (*name, setting.value.as_str()) {
            ("gssencmode", "disable" | "prefer") => {}
            ("gssencmode", _) => {
                return Err(SettingError::new(
                    &setting.origin,
                    "gssencmode: walhook has no GSSAPI encryption; use TLS (sslmode=verify-full) and \
                     gssencmode=disable",
                ))
            }
            ("client_encoding", v) if v.eq_ignore_ascii_case("utf8") || v == "auto" => {}
            ("client_encoding", v) => {
                return Err(SettingError::new(
                    &setting.origin,
                    format!("client_encoding {v:?}: walhook always speaks UTF8; remove it"),
                ))
            }
            ("sslnegotiation", "postgres") => {}
            ("sslnegotiation", _) => {
                return Err(SettingError::new(
                    &setting.origin,
                    "sslnegotiation: only \"postgres\" is supported (direct TLS needs PostgreSQL 17); remove it",
                ))
            }
            _ => {}
        }
    }
    Ok(settings)
}

/// The TLS settings, with libpq's rules for defaults: `~/.postgresql/root.crt` verifies the server whenever it
/// exists, `sslrootcert=system` means `verify-full` and refuses weaker modes, and the client certificate
/// defaults to `~/.postgresql/postgresql.crt` and `.key`. With `check_files`, the files must be usable.
fn tls_settings(
    settings: &Settings,
    env: &Environment,
    check_files: bool,
) -> Result<TlsSettings, SettingError> {
    let get = |name: &str| settings.get(name);
    let fail = |name: &str, message: String| {
        let origin = get(name).map_or(Origin::DatabaseUrl, |s| s.origin.clone());
        SettingError::new(&origin, message)
    };
    let explicit_root = get("sslrootcert").map(|s| match s.value.as_str() {
        "system" => RootCert::System,
        path => RootCert::File(PathBuf::from(path)),
    });
    let mode = match get("sslmode") {
        Some(s) => SslMode::parse(&s.value).ok_or_else(|| {
            fail(
                "sslmode",
                format!("invalid sslmode {:?}; expected {}", s.value, SslMode::NAMES),
            )
        })?,
        None if explicit_root == Some(RootCert::System) => SslMode::VerifyFull,
        None => SslMode::Prefer,
    };
    if explicit_root == Some(RootCert::System) && mode != SslMode::VerifyFull {
        return Err(fail(
            "sslmode",
            format!(
                "sslmode={mode} may not be used with sslrootcert=system (any public CA could vouch for any \
                 name): use sslmode=verify-full"
            ),
        ));
    }
    let versions = protocol_versions(settings)?;
    let sni = match get("sslsni").map(|s| s.value.as_str()) {
        None | Some("1") => true,
        Some("0") => false,
        Some(other) => {
            return Err(fail(
                "sslsni",
                format!("invalid sslsni {other:?}; expected 0 or 1"),
            ))
        }
    };
    // nothing to read when TLS is off, or never used (every host a Unix socket)
    let over_tcp = get("hostaddr").is_some()
        || get("host").is_none_or(|h| h.value.split(',').any(|h| !h.starts_with('/')));
    if mode == SslMode::Disable || !over_tcp {
        return Ok(TlsSettings {
            mode,
            root_cert: explicit_root,
            client_cert: None,
            sni,
            versions,
        });
    }
    let root_cert = explicit_root
        .clone()
        .or_else(|| env.home_file("root.crt").map(RootCert::File));
    if check_files {
        if let Some(RootCert::File(path)) = &explicit_root {
            if !path.exists() {
                return Err(fail(
                    "sslrootcert",
                    format!("sslrootcert {}: no such file", path.display()),
                ));
            }
        }
    }
    // alone, database_url cannot tell: PGSSLROOTCERT or ~/.postgresql/root.crt may provide the root
    if check_files && mode.verifies() && root_cert.is_none() {
        let home = match env.home.as_ref() {
            Some(home) => format!(
                " ({} does not exist)",
                home.join(".postgresql/root.crt").display()
            ),
            None => String::new(),
        };
        return Err(fail(
            "sslmode",
            format!(
                "sslmode={mode} needs the certificate of the CA that signed the server's: set sslrootcert to \
                 its PEM file, or sslrootcert=system for the system's trusted roots{home}"
            ),
        ));
    }
    let cert = match get("sslcert") {
        Some(s) => Some(PathBuf::from(&s.value)),
        None => env.home_file("postgresql.crt"),
    };
    let client_cert = match cert {
        None => None,
        Some(cert) => {
            let key = match get("sslkey") {
                Some(s) => PathBuf::from(&s.value),
                None => env
                    .home
                    .as_ref()
                    .map_or(PathBuf::from("postgresql.key"), |h| {
                        h.join(".postgresql/postgresql.key")
                    }),
            };
            if check_files {
                if !cert.exists() {
                    return Err(fail(
                        "sslcert",
                        format!("sslcert {}: no such file", cert.display()),
                    ));
                }
                crate::pgtls::check_key_access(&key).map_err(|m| {
                    fail(
                        if get("sslkey").is_some() {
                            "sslkey"
                        } else {
                            "sslcert"
                        },
                        m,
                    )
                })?;
            }
            Some((cert, key))
        }
    };
    let tls = TlsSettings {
        mode,
        root_cert,
        client_cert,
        sni,
        versions,
    };
    if check_files {
        // read every file once now, so that a bad one stops the start rather than every connection
        tls.client_config().map_err(|e| {
            let name = ["sslkey", "sslcert", "sslrootcert"]
                .into_iter()
                .find(|n| e.to_string().starts_with(n))
                .unwrap_or("sslmode");
            fail(name, e.to_string())
        })?;
    }
    Ok(tls)
}

/// `ssl_min_protocol_version` and `ssl_max_protocol_version` within what rustls speaks (TLS 1.2 and 1.3).
fn protocol_versions(settings: &Settings) -> Result<TlsVersions, SettingError> {
    let version = |name: &str| -> Result<Option<u8>, SettingError> {
        let Some(s) = settings.get(name) else {
            return Ok(None);
        };
        let v = match s.value.to_ascii_lowercase().as_str() {
            "tlsv1" => 10,
            "tlsv1.1" => 11,
            "tlsv1.2" => 12,
            "tlsv1.3" => 13,
            _ => {
                return Err(SettingError::new(
                    &s.origin,
                    format!("invalid {name} {:?}; expected TLSv1.2 or TLSv1.3", s.value),
                ))
            }
        };
        Ok(Some(v))
    };
    let min = version("ssl_min_protocol_version")?.unwrap_or(12);
    let max = version("ssl_max_protocol_version")?.unwrap_or(13);
    match (min.max(12), max) {
        (_, max) if max < 12 => Err(SettingError::new(
            &settings["ssl_max_protocol_version"].origin,
            "ssl_max_protocol_version below TLSv1.2: walhook speaks TLS 1.2 and 1.3 only",
        )),
        (13, 12) => Err(SettingError::new(
            &settings["ssl_max_protocol_version"].origin,
            "ssl_max_protocol_version is below ssl_min_protocol_version",
        )),
        (13, _) => Ok(TlsVersions::Only13),
        (_, 12) => Ok(TlsVersions::Only12),
        _ => Ok(TlsVersions::Both),
    }
}

/// The settings tokio-postgres knows, handed to its own parser (which checks their values).
fn postgres_config(settings: &Settings) -> Result<tokio_postgres::Config, SettingError> {
    let mut text = String::new();
    for (name, setting) in settings {
        if let Use::Postgres(pg_name) = keyword(name).expect("known").usage {
            let value = setting.value.replace('\\', "\\\\").replace('\'', "\\'");
            text.push_str(&format!("{pg_name}='{value}' "));
        }
    }
    tokio_postgres::Config::from_str(&text).map_err(|e| {
        let cause = std::error::Error::source(&e)
            .map(|c| c.to_string())
            .unwrap_or_default();
        // "invalid value for option `port`": name the keyword, its value (never a password's) and origin
        let pg_name = cause.split('`').nth(1).unwrap_or_default().to_string();
        let found = KEYWORDS
            .iter()
            .find(|k| matches!(k.usage, Use::Postgres(n) if n == pg_name))
            .and_then(|k| Some((k.name, settings.get(k.name)?)));
        match found {
            Some((name, setting)) if name != "password" => SettingError::new(
                &setting.origin,
                format!("invalid {name} {:?}", setting.value),
            ),
            _ => SettingError::new(
                &Origin::DatabaseUrl,
                format!("invalid connection settings ({cause})"),
            ),
        }
    })
}

/// What libpq calls the default socket directory: where a server's socket for `port` is, among the usual
/// places, else the first of them that exists.
fn default_socket_dir(port: &str) -> String {
    const DIRS: [&str; 3] = ["/var/run/postgresql", "/run/postgresql", "/tmp"];
    let socket = format!(".s.PGSQL.{port}");
    DIRS.iter()
        .find(|d| Path::new(d).join(&socket).exists())
        .or_else(|| DIRS.iter().find(|d| Path::new(d).is_dir()))
        .unwrap_or(&"/tmp")
        .to_string()
}

/// The password for the first host with a matching line of the password file, as libpq matches them.
fn password_from_file(
    settings: &Settings,
    env: &Environment,
    warnings: &mut Vec<String>,
) -> Option<Setting> {
    let path = match settings.get("passfile") {
        Some(s) => PathBuf::from(&s.value),
        None => env.home.as_ref()?.join(".pgpass"),
    };
    let text = read_password_file(&path, warnings)?;
    let value = |name: &str| settings.get(name).map(|s| s.value.as_str());
    let user = value("user").unwrap_or_default();
    let dbname = value("dbname").unwrap_or(user);
    let hosts: Vec<&str> = value("host").map_or(Vec::new(), |h| h.split(',').collect());
    let addrs: Vec<&str> = value("hostaddr").map_or(Vec::new(), |h| h.split(',').collect());
    let ports: Vec<&str> = value("port").map_or(vec!["5432"], |p| p.split(',').collect());
    for i in 0..hosts.len().max(addrs.len()) {
        let mut host = hosts.get(i).copied().filter(|h| !h.is_empty());
        host = host.or(addrs.get(i).copied());
        // the default socket directory reads as localhost; other socket paths as themselves
        let from_default = settings
            .get("host")
            .is_some_and(|h| matches!(h.origin, Origin::Default(_)));
        let host = match host {
            None => "localhost",
            Some(h)
                if from_default
                    || ["/var/run/postgresql", "/run/postgresql", "/tmp"].contains(&h) =>
            {
                "localhost"
            }
            Some(h) => h,
        };
        let port = ports
            .get(i)
            .or(ports.first())
            .copied()
            .filter(|p| !p.is_empty())
            .unwrap_or("5432");
        if let Some((password, line)) = match_password(&text, [host, port, dbname, user]) {
            return Some(Setting {
                value: password,
                origin: Origin::PassFile { path, line },
            });
        }
    }
    None
}

/// The file's text, or `None` (with a warning when it exists but may not be used).
fn read_password_file(path: &Path, warnings: &mut Vec<String>) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).ok()?;
    let shown = path.display();
    if !meta.is_file() {
        warnings.push(format!(
            "password file {shown} is not a plain file; it is ignored"
        ));
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        warnings.push(format!(
            "password file {shown} has group or world access; permissions should be u=rw (0600) or less: it is \
             ignored (chmod 600 {shown})"
        ));
        return None;
    }
    match std::fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(e) => {
            warnings.push(format!(
                "password file {shown} cannot be read ({e}); it is ignored"
            ));
            None
        }
    }
}

/// The first line of a password file whose host, port, database and user fields match `wanted` (a field
/// `*` matches anything), with its password and line number. libpq's format: `:`-separated fields in
/// which `\` escapes the next character; `#` starts a comment line.
pub fn match_password(text: &str, wanted: [&str; 4]) -> Option<(String, usize)> {
    for (number, line) in text.lines().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields = split_password_line(line);
        if fields.len() < 5 {
            continue;
        }
        let matches = fields
            .iter()
            .zip(wanted)
            .all(|((field, wildcard), want)| *wildcard || field == want);
        if matches {
            return Some((fields[4].0.clone(), number + 1));
        }
    }
    None
}

/// The fields of a line, unescaped, each with whether it was an unescaped `*`.
fn split_password_line(line: &str) -> Vec<(String, bool)> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut escaped_any = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                escaped_any = true;
                if let Some(next) = chars.next() {
                    field.push(next);
                }
            }
            ':' => {
                let wildcard = field == "*" && !escaped_any;
                fields.push((std::mem::take(&mut field), wildcard));
                escaped_any = false;
            }
            c => field.push(c),
        }
    }
    let wildcard = field == "*" && !escaped_any;
    fields.push((field, wildcard));
    fields
}

/// A connection string's keywords and values, in order: a URL (`postgres://` or `postgresql://`) or
/// `keyword=value` pairs. Errors never quote a value.
pub fn parse(text: &str) -> Result<Vec<(String, String)>, SettingError> {
    let fail = |message: String| SettingError::new(&Origin::DatabaseUrl, message);
    let text = text.trim();
    if text.is_empty() {
        return Err(fail(format!("is empty; {EXPECTED}, or leave it unset")));
    }
    let rest = text
        .strip_prefix("postgresql://")
        .or_else(|| text.strip_prefix("postgres://"));
    match rest {
        Some(rest) => parse_url(rest).map_err(|m| fail(format!("invalid URL: {m}; {EXPECTED}"))),
        None if text.contains("://") => Err(fail(format!(
            "the URL must start with postgres:// or postgresql://; {EXPECTED}"
        ))),
        None => parse_keywords(text)
            .map_err(|m| fail(format!("invalid connection string: {m}; {EXPECTED}"))),
    }
}

const EXPECTED: &str = "expected a URL like \"postgres://user:password@host:5432/db\" \
                        or \"host=... user=... dbname=...\"";

/// `[user[:password]@][host[:port][,...]][/dbname][?keyword=value&...]`, percent-decoded.
fn parse_url(rest: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = before_query.split_once('/').unwrap_or((before_query, ""));
    let hosts = match authority.split_once('@') {
        Some((userinfo, hosts)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((user, password)) => (user, Some(password)),
                None => (userinfo, None),
            };
            pairs.push(("user".to_string(), decode(user, "the user")?));
            if let Some(password) = password {
                pairs.push(("password".to_string(), decode(password, "the password")?));
            }
            hosts
        }
        None => authority,
    };
    let (mut host_list, mut port_list) = (Vec::new(), Vec::new());
    for chunk in hosts.split(',') {
        let (host, port) = if let Some(bracketed) = chunk.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or("an IPv6 address lacks its closing \"]\"")?;
            let port = match after {
                "" => "",
                after => after
                    .strip_prefix(':')
                    .ok_or("unexpected text after \"]\"")?,
            };
            (host.to_string(), port)
        } else {
            let (host, port) = chunk.split_once(':').unwrap_or((chunk, ""));
            (decode(host, "a host")?, port)
        };
        if !port.is_empty() && !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("invalid port {port:?}"));
        }
        host_list.push(host);
        port_list.push(port.to_string());
    }
    if host_list.iter().any(|h| !h.is_empty()) {
        pairs.push(("host".to_string(), host_list.join(",")));
    }
    if port_list.iter().any(|p| !p.is_empty()) {
        pairs.push(("port".to_string(), port_list.join(",")));
    }
    if !path.is_empty() {
        pairs.push(("dbname".to_string(), decode(path, "the database name")?));
    }
    for parameter in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = parameter
            .split_once('=')
            .ok_or("a parameter after \"?\" lacks \"=\"")?;
        let name = decode(name, "a parameter name")?;
        let value = decode(value, "a parameter value")?;
        // JDBC's spelling, which libpq also accepts
        match (name.as_str(), value.as_str()) {
            ("ssl", "true") => pairs.push(("sslmode".to_string(), "require".to_string())),
            _ => pairs.push((name, value)),
        }
    }
    Ok(pairs)
}

/// Percent-decoding; `what` names the part in the error (never its text, which may be a password).
fn decode(text: &str, what: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("{what} holds an invalid percent-encoding (\"%\" must be followed by two hex digits)"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{what} is not UTF-8 once percent-decoded"))
}

/// `keyword = value` pairs separated by spaces; values may be single-quoted; `\` escapes the next character.
fn parse_keywords(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut name = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            name.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(format!("missing \"=\" after {name:?}"));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => return Err(format!("the quoted value of {name:?} is not closed")),
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                match c {
                    '\\' => value.extend(chars.next()),
                    c => value.push(c),
                }
            }
        }
        pairs.push((name, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(text: &str) -> Vec<(String, String)> {
        parse(text).unwrap()
    }

    fn kv(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn urls_decode_as_libpq_does() {
        assert_eq!(
            pairs("postgres://app:p%40ss%3Aw%2Fd@db.example.com:6432/orders?sslmode=verify-full&application_name=a%20b"),
            kv(&[
                ("user", "app"),
                ("password", "p@ss:w/d"),
                ("host", "db.example.com"),
                ("port", "6432"),
                ("dbname", "orders"),
                ("sslmode", "verify-full"),
                ("application_name", "a b"),
            ])
        );
        assert_eq!(
            pairs("postgresql://h1:5433,[::1]:5434,h3/db"),
            kv(&[
                ("host", "h1,::1,h3"),
                ("port", "5433,5434,"),
                ("dbname", "db")
            ])
        );
        assert_eq!(
            pairs("postgresql://%2Fvar%2Frun%2Fpostgresql/db"),
            kv(&[("host", "/var/run/postgresql"), ("dbname", "db")])
        );
        assert_eq!(pairs("postgres://"), kv(&[]));
        assert_eq!(
            pairs("postgres:///db?host=/tmp"),
            kv(&[("dbname", "db"), ("host", "/tmp")])
        );
        assert_eq!(
            pairs("postgres://h/db?ssl=true"),
            kv(&[("host", "h"), ("dbname", "db"), ("sslmode", "require")])
        );
    }

    #[test]
    fn keyword_strings_quote_and_escape() {
        assert_eq!(
            pairs(r"host=h user = app password='it\'s a \\ secret' dbname=o\ rders"),
            kv(&[
                ("host", "h"),
                ("user", "app"),
                ("password", r"it's a \ secret"),
                ("dbname", "o rders"),
            ])
        );
        assert_eq!(pairs("sslmode=''"), kv(&[("sslmode", "")]));
    }

    #[test]
    fn parse_errors_never_quote_a_password() {
        let secret = "hunter2";
        for text in [
            format!("postgres://u:{secret}@h:notaport/db"),
            format!("postgres://u:{secret}%zz@h/db"),
            format!("host=h password='{secret}"),
            format!("host=h password={secret} user"),
            format!("mysql://u:{secret}@h/db"),
            format!("postgres://u:{secret}@[::1/db"),
        ] {
            let e = parse(&text).unwrap_err().to_string();
            assert!(
                e.starts_with("database_url: invalid ") || e.contains("must start"),
                "{e}"
            );
            assert!(!e.contains(secret), "{text}: {e}");
        }
    }

    fn env() -> Environment {
        Environment::default().with_os_user("osuser")
    }

    #[test]
    fn the_environment_fills_what_the_url_leaves_unset() {
        let env = env()
            .with_var("PGHOST", "env-host")
            .with_var("PGPORT", "6543")
            .with_var("PGUSER", "env-user")
            .with_var("PGDATABASE", "env-db")
            .with_var("PGPASSWORD", "env-secret")
            .with_var("PGAPPNAME", "env-app")
            .with_var("PGOPTIONS", "-c work_mem=64MB")
            .with_var("PGCONNECT_TIMEOUT", "7")
            .with_var("PGTARGETSESSIONATTRS", "read-write")
            .with_var("PGSSLMODE", "require");
        let info = ConnInfo::resolve(Some("postgres://url-user@url-host/url-db"), &env).unwrap();
        assert_eq!(info.get_user(), Some("url-user"));
        assert_eq!(info.get_dbname(), Some("url-db"));
        assert_eq!(
            info.get_hosts(),
            [tokio_postgres::config::Host::Tcp("url-host".into())]
        );
        assert_eq!(info.get_ports(), [6543]);
        assert_eq!(info.get_password(), Some(&b"env-secret"[..]));
        assert_eq!(info.get_application_name(), Some("env-app"));
        assert_eq!(info.get_options(), Some("-c work_mem=64MB"));
        assert_eq!(
            info.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(7))
        );
        assert_eq!(
            info.get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite
        );
        assert_eq!(info.tls().mode, SslMode::Require);
        let described = info.describe();
        let line = |name: &str| {
            let line = described
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{name} ")));
            line.unwrap_or_else(|| panic!("no {name} in {described}"))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(line("user"), "user url-user (database_url)");
        assert_eq!(line("port"), "port 6543 (PGPORT)");
        assert_eq!(line("password"), "password (set, not shown) (PGPASSWORD)");
        assert!(!described.contains("env-secret"), "{described}");

        // nothing but the environment, as psql
        let info = ConnInfo::resolve(None, &env).unwrap();
        assert_eq!(info.get_user(), Some("env-user"));
        assert_eq!(
            info.get_hosts(),
            [tokio_postgres::config::Host::Tcp("env-host".into())]
        );
        // nothing at all: the local socket as the operating-system user
        let info = ConnInfo::resolve(None, &Environment::default().with_os_user("osuser")).unwrap();
        assert_eq!(info.get_user(), Some("osuser"));
        assert!(matches!(
            info.get_hosts(),
            [tokio_postgres::config::Host::Unix(_)]
        ));
        assert_eq!(info.tls().mode, SslMode::Prefer);
        assert!(
            info.describe()
                .contains("(default: the operating-system user)"),
            "{}",
            info.describe()
        );
        // empty variables count as unset
        let info = ConnInfo::resolve(Some("host=h"), &env.clone().with_var("PGUSER", "")).unwrap();
        assert_eq!(info.get_user(), Some("osuser"));
    }

    #[test]
    fn bad_settings_name_their_origin() {
        let e = ConnInfo::resolve(
            Some("host=h user=u"),
            &env().with_var("PGSSLMODE", "verify"),
        )
        .unwrap_err();
        assert_eq!(e.key, "PGSSLMODE");
        assert!(
            e.message
                .starts_with("invalid sslmode \"verify\"; expected disable"),
            "{e}"
        );
        let e = ConnInfo::resolve(Some("host=h user=u port=x"), &env()).unwrap_err();
        assert_eq!(e.to_string(), "database_url: invalid port \"x\"");
        let e = ConnInfo::resolve(Some("host=h user=u"), &env().with_var("PGSERVICE", "prod"))
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("PGSERVICE: service is not supported"),
            "{e}"
        );
        let e = ConnInfo::resolve(Some("host=h user=u colour=blue"), &env()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("database_url: unknown connection setting \"colour\""),
            "{e}"
        );
        let e = ConnInfo::resolve(Some("host=h user=u sslmode=verify-full"), &env()).unwrap_err();
        assert!(e.message.contains("set sslrootcert to its PEM file"), "{e}");
        let e = ConnInfo::resolve(
            Some("host=h user=u sslmode=require sslrootcert=system"),
            &env(),
        )
        .unwrap_err();
        assert!(e.message.contains("use sslmode=verify-full"), "{e}");
        let info = ConnInfo::resolve(Some("host=h user=u sslrootcert=system"), &env()).unwrap();
        assert_eq!(info.tls().mode, SslMode::VerifyFull);
        let e = ConnInfo::resolve(
            Some("host=h user=u sslrootcert=/nonexistent/ca.pem"),
            &env(),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "database_url: sslrootcert /nonexistent/ca.pem: no such file"
        );
        // the syntax check alone does not look for files
        check_syntax("host=h user=u sslmode=verify-ca sslrootcert=/nonexistent/ca.pem").unwrap();
        assert!(check_syntax("host=h sslmode=sometimes").is_err());
        // a socket never uses TLS: verify-full there asks for no root certificate
        ConnInfo::resolve(Some("host=/tmp user=u sslmode=verify-full"), &env()).unwrap();
        let versions = |s: &str| {
            ConnInfo::resolve(Some(&format!("host=h user=u {s}")), &env()).map(|i| i.tls().versions)
        };
        assert_eq!(
            versions("ssl_min_protocol_version=TLSv1.3"),
            Ok(TlsVersions::Only13)
        );
        assert_eq!(
            versions("ssl_max_protocol_version=tlsv1.2"),
            Ok(TlsVersions::Only12)
        );
        assert!(versions("ssl_max_protocol_version=TLSv1.1").is_err());
    }

    #[test]
    fn password_file_lines_match_as_in_libpq() {
        let file = "\
# comment
db.example.com:5432:app:walhook:first
*:*:other:walhook:second
h\\:x:*:*:*:escaped\\:colon\\\\backslash
\\*:*:*:star:literal-star
*:*:*:*:fallback:ignored-extra-field
";
        assert_eq!(
            match_password(file, ["db.example.com", "5432", "app", "walhook"]),
            Some(("first".into(), 2))
        );
        assert_eq!(
            match_password(file, ["db.example.com", "5433", "other", "walhook"]),
            Some(("second".into(), 3))
        );
        assert_eq!(
            match_password(file, ["h:x", "1", "d", "u"]),
            Some(("escaped:colon\\backslash".into(), 4))
        );
        // an escaped * is the literal host name "*"
        assert_eq!(
            match_password(file, ["*", "1", "d", "star"]),
            Some(("literal-star".into(), 5))
        );
        assert_eq!(
            match_password(file, ["h", "1", "d", "star"]),
            Some(("fallback".into(), 6))
        );
        assert_eq!(
            match_password("a:b:c\nshort:line", ["a", "b", "c", "d"]),
            None
        );
        assert_eq!(
            match_password("h:1:d:u:crlf\r\n", ["h", "1", "d", "u"]),
            Some(("crlf".into(), 1))
        );
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("walhook-conninfo-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_password_file_fills_a_missing_password_unless_others_may_read_it() {
        use std::os::unix::fs::PermissionsExt;
        let home = temp_dir("pgpass");
        let file = home.join(".pgpass");
        std::fs::write(
            &file,
            "localhost:5432:app:walhook:from-file\ndb:*:*:*:for-db\n",
        )
        .unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let env = env().with_home(&home);
        // host unset: the local socket, which matches "localhost"
        let info = ConnInfo::resolve(Some("user=walhook dbname=app"), &env).unwrap();
        assert_eq!(info.get_password(), Some(&b"from-file"[..]));
        assert!(info
            .describe()
            .contains(&format!("(password file {}, line 1)", file.display())));
        assert!(!info.describe().contains("from-file"));
        // a second host matches where the first does not
        let info = ConnInfo::resolve(Some("host=elsewhere,db user=u"), &env).unwrap();
        assert_eq!(info.get_password(), Some(&b"for-db"[..]));
        // an explicit password wins
        let info = ConnInfo::resolve(Some("host=db user=u password=given"), &env).unwrap();
        assert_eq!(info.get_password(), Some(&b"given"[..]));
        // PGPASSFILE names another file
        let other = home.join("other");
        std::fs::write(&other, "*:*:*:*:other-file\n").unwrap();
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o400)).unwrap();
        let env_other = env.clone().with_var("PGPASSFILE", other.to_str().unwrap());
        let info = ConnInfo::resolve(Some("host=x user=u"), &env_other).unwrap();
        assert_eq!(info.get_password(), Some(&b"other-file"[..]));
        // readable by others: ignored, with a warning
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let info = ConnInfo::resolve(Some("user=walhook dbname=app"), &env).unwrap();
        assert_eq!(info.get_password(), None);
        assert_eq!(info.warnings().len(), 1);
        assert!(
            info.warnings()[0].contains("has group or world access"),
            "{:?}",
            info.warnings()
        );
        std::fs::remove_dir_all(&home).unwrap();
    }
}
