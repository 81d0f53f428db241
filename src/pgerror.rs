//! How a PostgreSQL failure reads to the person who must fix it: the server's own words (message, severity,
//! SQLSTATE, detail, hint) or, when no server answered, the client-side cause; then, for the common causes,
//! what to do.
//!
//! tokio-postgres prints "db error" and keeps the rest behind `source()`, and printing that chain in every
//! layer repeated it ("database error: db error: db error: …"). So every error type that wraps a database
//! error renders it here, once, and exposes no `source()` of its own: anyhow's `{:#}` then adds nothing. The
//! fix depends on what the session was for ([`Job`]): a missing privilege means `walhook_daemon` for `run`
//! and `walhook_reader` for `status`. Nothing here ever prints a password: server messages do not contain it,
//! and connection settings are described by host, port, user and database only ([`Target`]).

use std::fmt;
use std::io;

/// An error the server sent (ErrorResponse), from tokio-postgres or from the replication connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerError {
    /// `ERROR`, `FATAL`, `PANIC` (possibly localized).
    pub severity: String,
    /// The SQLSTATE, such as `28P01`.
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ServerError {
    pub fn from_db(e: &tokio_postgres::error::DbError) -> ServerError {
        ServerError {
            severity: e.severity().to_string(),
            code: e.code().code().to_string(),
            message: e.message().to_string(),
            detail: e.detail().map(str::to_string),
            hint: e.hint().map(str::to_string),
        }
    }
}

/// `permission denied for table slots (ERROR, SQLSTATE 42501; detail: …; hint: …)`: the facts, no fix.
impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}, SQLSTATE {}",
            self.message, self.severity, self.code
        )?;
        if let Some(detail) = &self.detail {
            write!(f, "; detail: {detail}")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "; hint: {hint}")?;
        }
        f.write_str(")")
    }
}

/// What the failed session was for: decides the fix for a missing privilege.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Job {
    /// `walhook run`, `recover-slot`: the role needs `walhook_daemon`.
    #[default]
    Daemon,
    /// The replication connection: the role needs the `REPLICATION` attribute.
    Replication,
    /// `walhook migrate`: the role must be able to create the schema.
    Migrate,
    /// `walhook status`: the role needs `walhook_reader`.
    Status,
    /// `walhook send-test`, `walhook listen --endpoint`: the role needs `walhook_admin`.
    Manage,
}

/// Where a session connects and as whom, for messages; never the password.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Target {
    /// `127.0.0.1:5432`, `/run/postgresql/.s.PGSQL.5432`, or several joined by ", ".
    pub server: String,
    pub user: Option<String>,
    pub database: Option<String>,
}

impl Target {
    /// The hosts, user and database of `config`, with libpq's defaults (port 5432, database = user).
    pub fn of(config: &tokio_postgres::Config) -> Target {
        use tokio_postgres::config::Host;
        let ports = config.get_ports();
        let port = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let hosts = config.get_hosts();
        let addrs = config.get_hostaddrs();
        let servers: Vec<String> = (0..hosts.len().max(addrs.len()))
            .map(|i| match (addrs.get(i), hosts.get(i)) {
                (Some(ip), _) => std::net::SocketAddr::from((*ip, port(i))).to_string(),
                (None, Some(Host::Tcp(host))) => format!("{host}:{}", port(i)),
                (None, Some(Host::Unix(dir))) => dir
                    .join(format!(".s.PGSQL.{}", port(i)))
                    .display()
                    .to_string(),
                (None, None) => unreachable!("i < max(hosts, addrs)"),
            })
            .collect();
        let user = config.get_user().map(str::to_string);
        Target {
            server: servers.join(", "),
            database: config.get_dbname().map(str::to_string).or(user.clone()),
            user,
        }
    }
}

/// `postgres at 127.0.0.1:5432 (user "app", database "app")`.
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "postgres at {}", self.server)?;
        match (&self.user, &self.database) {
            (Some(user), Some(db)) => write!(f, " (user {user:?}, database {db:?})"),
            (Some(user), None) => write!(f, " (user {user:?})"),
            (None, Some(db)) => write!(f, " (database {db:?})"),
            (None, None) => Ok(()),
        }
    }
}

/// A database error for a person, as the daemon's sessions see it: the facts, then the fix when one is known.
pub fn describe(e: &tokio_postgres::Error) -> String {
    describe_for(e, Job::Daemon, None)
}

/// [`describe`] for a session of `job`; `target` (when known) names the user and server in the fix.
pub fn describe_for(e: &tokio_postgres::Error, job: Job, target: Option<&Target>) -> String {
    match e.as_db_error() {
        Some(db) => describe_server(&ServerError::from_db(db), job, target),
        None => with_fix(client_facts(e), client_fix(e, target)),
    }
}

/// The facts alone, without a fix: for callers that know the fix better (`create publication` refused: the
/// statement to run as the table's owner).
pub fn facts(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => ServerError::from_db(db).to_string(),
        None => client_facts(e),
    }
}

/// A connection that could not be opened: where to, why, and what to do.
pub fn describe_connect(e: &tokio_postgres::Error, job: Job, target: &Target) -> String {
    format!(
        "cannot connect to {target}: {}",
        describe_for(e, job, Some(target))
    )
}

/// A server error for a person: its facts, then the fix when one is known.
pub fn describe_server(e: &ServerError, job: Job, target: Option<&Target>) -> String {
    with_fix(e.to_string(), server_fix(e, job, target))
}

fn with_fix(facts: String, fix: Option<String>) -> String {
    match fix {
        Some(fix) => format!("{facts}; {fix}"),
        None => facts,
    }
}

/// What a fix says for the role when the error was rendered without knowing it.
pub const UNKNOWN_USER: &str = "<user>";

/// What a fix says for the database when the error was rendered without knowing it.
pub const UNKNOWN_DATABASE: &str = "<database>";

/// Puts the role's and the database's names where a message rendered without them says [`UNKNOWN_USER`] or
/// [`UNKNOWN_DATABASE`]: errors of sessions whose connection settings are out of reach (a statement deep in a
/// source) get them from the caller that has the settings.
pub fn name_target(message: &str, config: &tokio_postgres::Config) -> String {
    let target = Target::of(config);
    let mut message = message.to_string();
    if let Some(user) = target.user.as_deref().filter(|u| !u.is_empty()) {
        message = message.replace(UNKNOWN_USER, &quote_role(user));
    }
    if let Some(database) = target.database.as_deref().filter(|d| !d.is_empty()) {
        message = message.replace(UNKNOWN_DATABASE, &quote_role(database));
    }
    message
}

/// The fix for a server error whose cause is usually the setup, not a passing condition.
pub fn server_fix(e: &ServerError, job: Job, target: Option<&Target>) -> Option<String> {
    let user = target
        .and_then(|t| t.user.as_deref())
        .map_or(UNKNOWN_USER.to_string(), quote_role);
    let database = target
        .and_then(|t| t.database.as_deref())
        .map_or(UNKNOWN_DATABASE.to_string(), quote_role);
    let fix = match e.code.as_str() {
        // invalid_password, or a pg_hba.conf rule that rejects the connection
        "28P01" => "check the user and password in database_url, and the pg_hba.conf line that matches this \
                    user, database and client address"
            .to_string(),
        "28000" if e.message.contains("not permitted to log in") => {
            format!("allow the role to log in: ALTER ROLE {user} LOGIN (as a superuser or the role's owner)")
        }
        // pg_hba.conf has only hostssl lines for this client, and the session had no TLS
        "28000" if e.message.ends_with("no encryption") => "pg_hba.conf admits this connection only over TLS \
            (hostssl): set sslmode=verify-full with sslrootcert (or sslmode=require) in database_url or \
            PGSSLMODE instead of disable; if sslmode already asks for TLS, the server has ssl = off"
            .to_string(),
        "28000" if e.message.contains("certificate") => "the server requires a client certificate for this \
            user: set sslcert and sslkey (or PGSSLCERT and PGSSLKEY) to a certificate signed by a CA in the \
            server's ssl_ca_file, whose common name is the user name (for cert authentication)"
            .to_string(),
        "28000" if e.message.contains("does not exist") => format!(
            "create the role (CREATE ROLE {user} LOGIN PASSWORD '…', see the README's \"Roles\") or correct the \
             user in database_url"
        ),
        "28000" => "add a pg_hba.conf line that lets this user connect to this database from this address (and \
                    reload PostgreSQL), or correct the user and host in database_url"
            .to_string(),
        "3D000" => format!(
            "create the database (CREATE DATABASE {database}) or correct the database name in database_url"
        ),
        // refused at log-in: the CONNECT privilege (later, "for database" is about CREATE)
        "42501" if e.severity == "FATAL" && e.message.starts_with("permission denied for database") => format!(
            "as the database's owner, run GRANT CONNECT ON DATABASE {database} TO {user}"
        ),
        "42501" => match job {
            Job::Daemon => format!(
                "the role lacks a privilege walhook needs: as the owner of the walhook schema, run GRANT \
                 walhook_daemon TO {user} (README, \"Roles\")"
            ),
            Job::Status => format!(
                "the role lacks a privilege `walhook status` needs: as the owner of the walhook schema, run \
                 GRANT walhook_reader TO {user} (README, \"Roles\")"
            ),
            Job::Manage => format!(
                "the role lacks a privilege `walhook send-test` and `walhook listen --endpoint` need: as the \
                 owner of the walhook schema, run GRANT walhook_admin TO {user} (README, \"Roles\")"
            ),
            Job::Migrate => "run `walhook migrate` as a role that may create the walhook schema: the \
                             database's owner or a superuser (README, \"Roles\")"
                .to_string(),
            Job::Replication => format!(
                "the role may not use replication: run ALTER ROLE {user} REPLICATION as a superuser, or use \
                 source = \"notify\""
            ),
        },
        "53300" => "the server has no connection slot left (max_connections, or the role's CONNECTION LIMIT): \
                    close idle sessions or raise the limit; each walhook instance uses about 10 connections"
            .to_string(),
        "57P03" => "the server is starting up or recovering: try again once it accepts connections".to_string(),
        _ => return None,
    };
    Some(fix)
}

/// The client-side cause: "error connecting to server: Connection refused (os error 111)".
fn client_facts(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // some causes repeat their own source's text; print each once
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The fix for a connection that failed before (or without) the server answering.
fn client_fix(e: &tokio_postgres::Error, target: Option<&Target>) -> Option<String> {
    let server = target.map_or("the server".to_string(), |t| t.server.clone());
    let mut kind = None;
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<io::Error>() {
            kind = Some(io.kind());
        }
        if cause.to_string() == "password missing" {
            return Some(password_missing_fix().to_string());
        }
        source = cause.source();
    }
    if let Some(tls) = crate::pgtls::find_tls_error(e) {
        return Some(tls.fix());
    }
    let text = client_facts(e);
    if text.ends_with(crate::pgtls::NOT_OFFERED_BY_TOKIO_POSTGRES) {
        return Some(crate::pgtls::not_offered_fix().to_string());
    }
    match kind.and_then(|kind| io_fix(kind, &server)) {
        Some(fix) => Some(fix),
        None if text.contains("failed to lookup address") || text.contains("could not resolve") => {
            Some("the host name does not resolve: correct the host in database_url".to_string())
        }
        None if text.starts_with("timeout waiting for server") => Some(format!(
            "{server} did not answer in time: check that it is up and reachable"
        )),
        None => None,
    }
}

/// What to check when connecting to `server` failed with an I/O error of this kind.
pub fn io_fix(kind: io::ErrorKind, server: &str) -> Option<String> {
    match kind {
        io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound => Some(format!(
            "is PostgreSQL running and listening on {server}? check host and port in database_url (and \
             listen_addresses on the server)"
        )),
        io::ErrorKind::TimedOut => Some(format!(
            "{server} did not answer in time: check host and port in database_url, and that no firewall drops \
             the connection"
        )),
        _ => None,
    }
}

/// What to do when the server asks for a password and the connection settings have none (neither
/// `database_url`, `PGPASSWORD` nor a matching line of the password file).
pub fn password_missing_fix() -> &'static str {
    "the server asks for a password but database_url has none: put it in database_url \
     (postgres://user:password@host/db), for example through WALHOOK_DATABASE_URL in the service's \
     environment file, or in PGPASSWORD, or in the password file (~/.pgpass or PGPASSFILE, mode 0600, lines \
     host:port:database:user:password), or let this user in without a password in pg_hba.conf (peer over \
     the local socket)"
}

/// A role name as SQL would need it: bare when it is a plain lowercase identifier, quoted otherwise.
fn quote_role(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str, message: &str) -> ServerError {
        ServerError {
            severity: "FATAL".into(),
            code: code.into(),
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    fn target() -> Target {
        Target::of(
            &"postgres://app_daemon:hunter2@db.internal:6432/shop"
                .parse()
                .unwrap(),
        )
    }

    #[test]
    fn server_errors_show_code_detail_and_hint_once() {
        let e = ServerError {
            detail: Some("the detail".into()),
            hint: Some("the hint".into()),
            ..server("42501", "permission denied for table slots")
        };
        let text = describe_server(&e, Job::Daemon, Some(&target()));
        assert_eq!(
            text,
            "permission denied for table slots (FATAL, SQLSTATE 42501; detail: the detail; hint: the hint); \
             the role lacks a privilege walhook needs: as the owner of the walhook schema, run GRANT \
             walhook_daemon TO app_daemon (README, \"Roles\")"
        );
    }

    #[test]
    fn fixes_depend_on_the_job() {
        let e = server("42501", "permission denied for schema walhook");
        let fix = |job| server_fix(&e, job, None).unwrap();
        assert!(fix(Job::Daemon).contains("GRANT walhook_daemon TO <user>"));
        assert!(fix(Job::Status).contains("GRANT walhook_reader TO <user>"));
        assert!(fix(Job::Migrate).contains("walhook migrate"));
        assert!(fix(Job::Manage).contains("GRANT walhook_admin TO <user>"));
        assert!(fix(Job::Replication).contains("ALTER ROLE <user> REPLICATION"));
    }

    #[test]
    fn common_codes_have_fixes() {
        let t = target();
        for (code, message, expected) in [
            (
                "28P01",
                "password authentication failed for user \"app\"",
                "pg_hba.conf",
            ),
            (
                "28000",
                "role \"app\" is not permitted to log in",
                "ALTER ROLE app_daemon LOGIN",
            ),
            (
                "28000",
                "role \"app\" does not exist",
                "CREATE ROLE app_daemon",
            ),
            (
                "28000",
                "no pg_hba.conf entry for host",
                "add a pg_hba.conf line",
            ),
            (
                "3D000",
                "database \"shop\" does not exist",
                "CREATE DATABASE shop",
            ),
            (
                "53300",
                "sorry, too many clients already",
                "max_connections",
            ),
            ("57P03", "the database system is starting up", "starting up"),
        ] {
            let fix = server_fix(&server(code, message), Job::Daemon, Some(&t)).unwrap();
            assert!(fix.contains(expected), "{code}: {fix}");
        }
        assert_eq!(
            server_fix(&server("23505", "duplicate"), Job::Daemon, None),
            None
        );
    }

    #[test]
    fn targets_never_show_the_password() {
        let t = target();
        assert_eq!(
            t.to_string(),
            "postgres at db.internal:6432 (user \"app_daemon\", database \"shop\")"
        );
        let socket = Target::of(&"host=/run/postgresql user=app".parse().unwrap());
        assert_eq!(
            socket.to_string(),
            "postgres at /run/postgresql/.s.PGSQL.5432 (user \"app\", database \"app\")"
        );
    }

    #[test]
    fn unknown_users_are_named_by_the_caller() {
        let e = server("42501", "permission denied for table slots");
        let text = describe_server(&e, Job::Daemon, None);
        let named = name_target(&text, &"postgres://App@h/db".parse().unwrap());
        assert!(
            named.contains("GRANT walhook_daemon TO \"App\" "),
            "{named}"
        );
        assert!(!named.contains(UNKNOWN_USER), "{named}");
    }

    #[test]
    fn role_names_are_quoted_when_needed() {
        assert_eq!(quote_role("app_1"), "app_1");
        assert_eq!(quote_role("App"), "\"App\"");
        assert_eq!(quote_role("a\"b"), "\"a\"\"b\"");
    }

    #[tokio::test]
    async fn refused_connections_name_the_server_and_the_fix() {
        // a port nobody listens on: bind one, note it, close it
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config: tokio_postgres::Config = format!("postgres://u:s3cr3t-pw@127.0.0.1:{port}/db")
            .parse()
            .unwrap();
        let e = config.connect(tokio_postgres::NoTls).await.err().unwrap();
        let text = describe_connect(&e, Job::Daemon, &Target::of(&config));
        assert!(
            text.starts_with(&format!(
                "cannot connect to postgres at 127.0.0.1:{port} (user \"u\", database \"db\"): error \
                 connecting to server: "
            )),
            "{text}"
        );
        assert!(
            text.contains("is PostgreSQL running and listening on 127.0.0.1:"),
            "{text}"
        );
        assert_eq!(text.matches("onnection refused").count(), 1, "{text}");
        assert!(!text.contains("s3cr3t"), "{text}");
    }
}
