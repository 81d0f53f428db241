//! The logical-replication connection: startup, authentication, replication commands and the CopyBoth stream.
//!
//! tokio-postgres has no replication mode and postgres-protocol's parser rejects CopyBothResponse, so this
//! module frames the wire itself: it owns the socket and one read buffer, handles the tags postgres-protocol
//! does not know (`W`, and `d` so that XLogData is split off the buffer without a copy), and delegates every
//! other complete frame to `postgres_protocol::message::backend::Message::parse`. Reads only ever consume whole
//! frames, which is what makes `WalStream::next_message` safe to cancel inside `select!`. TLS follows
//! libpq's `sslmode` through [`crate::pgtls`] (the same rules as the SQL sessions): `SSLRequest`, then a
//! rustls session under the framing, and SCRAM-SHA-256-PLUS (channel binding) when the server offers it.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{
    ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use postgres_protocol::message::backend::{
    AuthenticationSaslBody, DataRowBody, ErrorResponseBody, Message,
};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::config::{ChannelBinding as ChannelBindingSetting, Host};
use tokio_postgres::fallible_iterator::FallibleIterator;

use crate::conninfo::ConnInfo;
use crate::lsn::Lsn;
use crate::pgerror::{self, Job, ServerError};
use crate::pgtls::{self, RequestError, SslMode, TlsError};

const DEFAULT_PORT: u16 = 5432;
/// Read granularity; large frames reserve their full length up front instead.
const READ_CHUNK: usize = 64 * 1024;
const MIN_SPARE: usize = 4 * 1024;
/// Postgres never builds a message above 1 GiB (MaxAllocSize); a larger length is garbage, not a frame to
/// allocate for.
const MAX_MESSAGE_LEN: usize = (1 << 30) + 1024;
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Microseconds between the Unix epoch and the Postgres epoch (2000-01-01 00:00 UTC).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;
const COPY_BOTH_RESPONSE_TAG: u8 = b'W';
const COPY_DATA_TAG: u8 = b'd';

/// What went wrong on the replication connection. Server errors read as [`crate::pgerror`] renders them, with
/// the fix for a replication connection (a missing privilege there is the `REPLICATION` attribute).
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("replication connection failed: {}", io_message(.0))]
    Io(io::Error),
    /// An ErrorResponse from the server; `target` is set when it refused the connection itself.
    #[error("{}", server_message(.error, .target))]
    Server {
        error: Box<ServerError>,
        target: Option<Box<pgerror::Target>>,
    },
    #[error("postgres authentication failed: {0}")]
    Auth(String),
    #[error("unexpected reply from postgres: {0}")]
    Protocol(String),
    #[error("postgres closed the replication connection")]
    Closed,
    /// TLS could not be set up or established with `server`, or the settings require it and the server has
    /// none.
    #[error("cannot open a replication connection to postgres at {server}: {error}; {}", .error.fix())]
    Tls { server: String, error: TlsError },
    /// The caller asked for something this client cannot do or say: no host or user, a name the
    /// replication grammar cannot express.
    #[error("{0}")]
    Config(String),
}

impl From<io::Error> for WalError {
    fn from(e: io::Error) -> Self {
        WalError::Io(e)
    }
}

impl WalError {
    /// The SQLSTATE of a server error (`42501`, `55000`, ...).
    pub fn code(&self) -> Option<&str> {
        match self {
            WalError::Server { error, .. } => Some(&error.code),
            _ => None,
        }
    }

    /// The server's error, if the server sent one.
    pub fn server_error(&self) -> Option<&ServerError> {
        match self {
            WalError::Server { error, .. } => Some(error),
            _ => None,
        }
    }
}

fn server_message(error: &ServerError, target: &Option<Box<pgerror::Target>>) -> String {
    let text = pgerror::describe_server(error, Job::Replication, target.as_deref());
    match target {
        Some(target) => format!("cannot open a replication connection to {target}: {text}"),
        None => text,
    }
}

/// The I/O error (it names the address) and, for a refused or timed-out connection, what to check.
fn io_message(e: &io::Error) -> String {
    match pgerror::io_fix(e.kind(), "that address") {
        Some(fix) => format!("{e}; {fix}"),
        None => e.to_string(),
    }
}

/// The answer to IDENTIFY_SYSTEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemInfo {
    pub systemid: String,
    pub timeline: u32,
    pub xlogpos: Lsn,
    pub dbname: Option<String>,
}

/// One message of the replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalMessage {
    /// `data` is one pgoutput message, split from the read buffer without a copy.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        server_time_us: i64,
        data: Bytes,
    },
    Keepalive {
        wal_end: Lsn,
        server_time_us: i64,
        reply_requested: bool,
    },
}

/// A `replication=database` walsender session, before streaming.
///
/// After a `WalError::Server` from `simple_query` (and the helpers built on it) the session is still usable;
/// after any other error, drop it.
pub struct WalConnection {
    wire: Wire,
}

impl fmt::Debug for WalConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WalConnection").finish_non_exhaustive()
    }
}

impl WalConnection {
    /// Connects with `replication=database`, trying each host of `config` in order until one works.
    ///
    /// Supports trust, cleartext password, md5 and SCRAM-SHA-256 (with channel binding over TLS), and TLS as
    /// `sslmode` says ([`crate::pgtls`]). `connect_timeout` bounds each host's attempt.
    pub async fn connect(config: &ConnInfo) -> Result<WalConnection, WalError> {
        let user = config.get_user().ok_or_else(|| {
            WalError::Config(
                "the connection settings name no user; add user=... to database_url".into(),
            )
        })?;
        let mut last_error = None;
        for target in targets(config)? {
            let attempt = Self::connect_with_tls(&target, config, user);
            let result = match config.get_connect_timeout() {
                Some(limit) => tokio::time::timeout(*limit, attempt)
                    .await
                    .unwrap_or_else(|_| {
                        Err(WalError::Io(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("{target}: no answer within connect_timeout ({limit:?})"),
                        )))
                    }),
                None => attempt.await,
            };
            match result {
                Ok(mut connection) => {
                    // target_session_attrs=read-write (a primary and its standbys in one URL): like libpq,
                    // pass over a server that does not accept writes
                    if config.get_target_session_attrs()
                        != tokio_postgres::config::TargetSessionAttrs::ReadWrite
                        || connection.accepts_writes().await?
                    {
                        return Ok(connection);
                    }
                    tracing::debug!(%target, "server is read-only (a standby): trying the next host");
                    // transient: during a failover the standby is promoted in a moment
                    last_error = Some(WalError::Io(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!(
                            "{target} does not accept writes (a standby?), and target_session_attrs=read-write \
                             asks for one that does: no host of database_url is a primary now"
                        ),
                    )));
                }
                Err(WalError::Server { error, .. }) => {
                    // the server refused the session itself: say where to and as whom
                    let error = WalError::Server {
                        error,
                        target: Some(Box::new(pgerror::Target::of(config))),
                    };
                    tracing::debug!(%target, %error, "replication connection attempt failed");
                    last_error = Some(error);
                }
                Err(error) => {
                    tracing::debug!(%target, %error, "replication connection attempt failed");
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.expect("targets() returns at least one target"))
    }

    /// libpq's `sslmode` for one target: `allow` tries plaintext first and TLS if the server refuses it,
    /// `prefer` tries TLS and goes on without it when the server has none or the handshake fails (logged
    /// once), `require` and stronger insist. Never TLS over a Unix socket.
    async fn connect_with_tls(
        target: &Target,
        config: &ConnInfo,
        user: &str,
    ) -> Result<WalConnection, WalError> {
        if matches!(target, Target::Unix(_)) {
            return Self::connect_to(target, config, user, Encryption::Plain).await;
        }
        match config.tls().mode {
            SslMode::Disable => Self::connect_to(target, config, user, Encryption::Plain).await,
            SslMode::Allow => match Self::connect_to(target, config, user, Encryption::Plain).await
            {
                Err(WalError::Server { .. }) => {
                    Self::connect_to(target, config, user, Encryption::Required).await
                }
                other => other,
            },
            SslMode::Prefer => {
                match Self::connect_to(target, config, user, Encryption::IfOffered).await {
                    // plaintext after a failed handshake; if that fails too, the TLS error says more
                    Err(
                        e @ WalError::Tls {
                            error: TlsError::Handshake(_),
                            ..
                        },
                    ) => match Self::connect_to(target, config, user, Encryption::Plain).await {
                        Ok(connection) => {
                            pgtls::note_plaintext_fallback(
                                &target.to_string(),
                                "the TLS handshake failed",
                            );
                            Ok(connection)
                        }
                        Err(_) => Err(e),
                    },
                    other => other,
                }
            }
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                Self::connect_to(target, config, user, Encryption::Required).await
            }
        }
    }

    async fn connect_to(
        target: &Target,
        config: &ConnInfo,
        user: &str,
        encryption: Encryption,
    ) -> Result<WalConnection, WalError> {
        let socket = match (target.open().await?, encryption) {
            (Socket::Tcp(tcp), Encryption::IfOffered | Encryption::Required) => {
                let tls_error = |error| WalError::Tls {
                    server: target.to_string(),
                    error,
                };
                match pgtls::request_tls(tcp, config.tls(), target.tls_name()).await {
                    Ok(Ok(tls)) => Socket::Tls(Box::new(tls)),
                    Ok(Err(_)) if encryption == Encryption::Required => {
                        return Err(tls_error(TlsError::NotOffered))
                    }
                    Ok(Err(tcp)) => {
                        pgtls::note_plaintext_fallback(
                            &target.to_string(),
                            "the server does not offer TLS",
                        );
                        Socket::Tcp(tcp)
                    }
                    Err(RequestError::Io(e)) => return Err(WalError::Io(e)),
                    Err(RequestError::Tls(e)) => return Err(tls_error(e)),
                    Err(RequestError::Protocol(m)) => return Err(WalError::Protocol(m)),
                }
            }
            (socket, _) => socket,
        };
        let mut connection = WalConnection {
            wire: Wire::new(socket),
        };
        let mut params = vec![
            ("user", user),
            ("database", config.get_dbname().unwrap_or(user)),
            ("replication", "database"),
            ("DateStyle", "ISO"),
            ("TimeZone", "UTC"),
            ("client_encoding", "UTF8"),
            ("extra_float_digits", "3"),
        ];
        if let Some(name) = config.get_application_name() {
            params.push(("application_name", name));
        }
        if let Some(options) = config.get_options() {
            params.push(("options", options));
        }
        connection
            .wire
            .encode(|buf| frontend::startup_message(params, buf))?;
        connection.wire.flush().await?;
        connection
            .authenticate(user, config.get_password(), config.get_channel_binding())
            .await?;
        connection.wait_ready().await?;
        Ok(connection)
    }

    async fn authenticate(
        &mut self,
        user: &str,
        password: Option<&[u8]>,
        binding: ChannelBindingSetting,
    ) -> Result<(), WalError> {
        // channel_binding=require: only SCRAM with channel binding may authenticate the server
        let unbound = |method: &str| {
            match binding {
            ChannelBindingSetting::Require => Err(WalError::Auth(format!(
                "channel_binding=require, but the server authenticated with {method}, not with SCRAM and channel \
                 binding: use scram-sha-256 in pg_hba.conf and TLS (sslmode=verify-full), or remove \
                 channel_binding=require"
            ))),
            _ => Ok(()),
        }
        };
        // whether a method already answered for channel_binding=require (trust answers nothing)
        let mut checked = false;
        let need_password = |method: &str| {
            password.ok_or_else(|| {
                WalError::Auth(format!(
                    "{} (method {method})",
                    pgerror::password_missing_fix()
                ))
            })
        };
        loop {
            match self.wire.next_message().await? {
                Message::AuthenticationOk if checked => return Ok(()),
                Message::AuthenticationOk => return unbound("trust (no password)"),
                Message::AuthenticationCleartextPassword => {
                    unbound("a cleartext password")?;
                    checked = true;
                    let password = need_password("cleartext")?;
                    self.wire
                        .encode(|buf| frontend::password_message(password, buf))?;
                    self.wire.flush().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    unbound("md5")?;
                    checked = true;
                    let hash = md5_hash(user.as_bytes(), need_password("md5")?, body.salt());
                    self.wire
                        .encode(|buf| frontend::password_message(hash.as_bytes(), buf))?;
                    self.wire.flush().await?;
                }
                Message::AuthenticationSasl(body) => {
                    let password = need_password("SCRAM-SHA-256")?;
                    let bound = self.scram(&body, password, binding).await?;
                    if !bound {
                        unbound("SCRAM without channel binding")?;
                    }
                    checked = true;
                }
                Message::ErrorResponse(body) => return Err(server_error(&body)),
                Message::NoticeResponse(_) => {}
                Message::AuthenticationKerberosV5
                | Message::AuthenticationScmCredential
                | Message::AuthenticationGss
                | Message::AuthenticationGssContinue(_)
                | Message::AuthenticationSspi => {
                    return Err(WalError::Auth(
                        "the server asks for an authentication method walhook does not support (GSS, SSPI or \
                         Kerberos); use scram-sha-256, md5 or password in pg_hba.conf"
                            .into(),
                    ))
                }
                _ => return Err(unexpected("during authentication")),
            }
        }
    }

    /// SCRAM-SHA-256, with channel binding (`-PLUS`, `tls-server-end-point`) when the session runs over TLS,
    /// the server offers it and `channel_binding` is not `disable`. Returns whether the binding was used.
    async fn scram(
        &mut self,
        offer: &AuthenticationSaslBody,
        password: &[u8],
        setting: ChannelBindingSetting,
    ) -> Result<bool, WalError> {
        let mut mechanisms = offer.mechanisms();
        let mut offered = Vec::new();
        while let Some(mechanism) = mechanisms.next().map_err(malformed)? {
            offered.push(mechanism.to_string());
        }
        let end_point = match (&self.wire.socket, setting) {
            (_, ChannelBindingSetting::Disable) => None,
            (Socket::Tls(tls), _) => tls.server_end_point(),
            _ => None,
        };
        let plus = offered.iter().any(|m| m == SCRAM_SHA_256_PLUS);
        let (binding, mechanism) = match end_point {
            Some(data) if plus => (
                ChannelBinding::tls_server_end_point(data),
                SCRAM_SHA_256_PLUS,
            ),
            // 'y': we could bind but the server did not offer it (a downgrade the server can detect)
            Some(_) => (ChannelBinding::unrequested(), SCRAM_SHA_256),
            None => (ChannelBinding::unsupported(), SCRAM_SHA_256),
        };
        if mechanism == SCRAM_SHA_256 && !offered.iter().any(|m| m == SCRAM_SHA_256) {
            return Err(WalError::Auth(format!(
                "the server offers SASL mechanisms {offered:?} but walhook supports {SCRAM_SHA_256} and, over \
                 TLS, {SCRAM_SHA_256_PLUS}"
            )));
        }
        let bound = mechanism == SCRAM_SHA_256_PLUS;
        let mut scram = ScramSha256::new(password, binding);
        self.wire
            .encode(|buf| frontend::sasl_initial_response(mechanism, scram.message(), buf))?;
        self.wire.flush().await?;
        match self.wire.next_message().await? {
            Message::AuthenticationSaslContinue(body) => {
                scram.update(body.data()).map_err(|e| {
                    WalError::Auth(format!("invalid SCRAM challenge from the server: {e}"))
                })?
            }
            Message::ErrorResponse(body) => return Err(server_error(&body)),
            _ => return Err(unexpected("during SCRAM authentication")),
        }
        self.wire
            .encode(|buf| frontend::sasl_response(scram.message(), buf))?;
        self.wire.flush().await?;
        match self.wire.next_message().await? {
            Message::AuthenticationSaslFinal(body) => {
                scram.finish(body.data()).map(|()| bound).map_err(|e| {
                    WalError::Auth(format!("the server's SCRAM signature did not verify: {e}"))
                })
            }
            Message::ErrorResponse(body) => Err(server_error(&body)),
            _ => Err(unexpected("during SCRAM authentication")),
        }
    }

    /// After AuthenticationOk: parameter statuses and the backend key, then ReadyForQuery (or a FATAL error,
    /// such as a role without REPLICATION).
    async fn wait_ready(&mut self) -> Result<(), WalError> {
        loop {
            match self.wire.next_message().await? {
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => return Err(server_error(&body)),
                Message::ParameterStatus(_)
                | Message::BackendKeyData(_)
                | Message::NoticeResponse(_) => {}
                _ => return Err(unexpected("while starting the session")),
            }
        }
    }

    /// Whether the server accepts writes (`transaction_read_only` is off: a primary, not a standby).
    async fn accepts_writes(&mut self) -> Result<bool, WalError> {
        let rows = self.simple_query("SHOW transaction_read_only").await?;
        let [value] = single_row::<1>(rows, "SHOW transaction_read_only")?;
        Ok(value.as_deref() == Some("off"))
    }

    /// Runs IDENTIFY_SYSTEM.
    pub async fn identify_system(&mut self) -> Result<SystemInfo, WalError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let [systemid, timeline, xlogpos, dbname] = single_row::<4>(rows, "IDENTIFY_SYSTEM")?;
        let systemid = systemid.ok_or_else(|| missing("IDENTIFY_SYSTEM", "systemid"))?;
        let timeline = timeline.ok_or_else(|| missing("IDENTIFY_SYSTEM", "timeline"))?;
        let timeline = timeline.parse().map_err(|_| {
            WalError::Protocol(format!("IDENTIFY_SYSTEM returned timeline {timeline:?}"))
        })?;
        let xlogpos = parse_lsn(xlogpos, "IDENTIFY_SYSTEM", "xlogpos")?;
        Ok(SystemInfo {
            systemid,
            timeline,
            xlogpos,
            dbname,
        })
    }

    /// Runs `sql` with the simple-query protocol and returns every row of every result as text columns.
    ///
    /// A replication=database walsender accepts both replication commands and plain SQL. On a server error the
    /// session is drained to ReadyForQuery, so it stays usable.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, WalError> {
        self.wire.encode(|buf| frontend::query(sql, buf))?;
        self.wire.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.wire.next_frame().await? {
                Frame::Message(Message::DataRow(body)) => {
                    if error.is_none() {
                        rows.push(text_row(&body)?);
                    }
                }
                Frame::Message(Message::ErrorResponse(body)) => error = Some(server_error(&body)),
                Frame::Message(Message::ReadyForQuery(_)) => {
                    return match error {
                        Some(error) => Err(error),
                        None => Ok(rows),
                    }
                }
                // COPY FROM STDIN has no data to send here: fail it so the server answers and moves on.
                Frame::Message(Message::CopyInResponse(_)) => {
                    self.wire.encode(|buf| {
                        frontend::copy_fail(
                            "COPY FROM STDIN is not supported on this connection",
                            buf,
                        )
                    })?;
                    self.wire.flush().await?;
                }
                // COPY TO STDOUT output is not rows: skip it.
                Frame::Message(
                    Message::RowDescription(_)
                    | Message::CommandComplete(_)
                    | Message::EmptyQueryResponse
                    | Message::CopyOutResponse(_)
                    | Message::CopyDone
                    | Message::NoticeResponse(_)
                    | Message::ParameterStatus(_)
                    | Message::NotificationResponse(_),
                )
                | Frame::CopyData(_) => {}
                Frame::CopyBoth => return Err(WalError::Protocol(
                    "the server started streaming; use start_replication, not simple_query, for \
                         START_REPLICATION"
                        .into(),
                )),
                Frame::Message(_) => return Err(unexpected("in a simple query")),
            }
        }
    }

    /// Creates a logical slot for pgoutput without exporting a snapshot; returns its consistent point.
    /// Like `create_logical_slot`, exporting the snapshot of the consistent point: until this connection runs
    /// another command, `SET TRANSACTION SNAPSHOT '<name>'` on another session sees exactly the transactions
    /// committed before the slot's first streamed one. Returns (consistent point, snapshot name).
    pub async fn create_logical_slot_exporting(
        &mut self,
        slot: &str,
    ) -> Result<(Lsn, String), WalError> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
            replication_ident(slot)?
        );
        let rows = self.simple_query(&sql).await?;
        let [_, consistent_point, snapshot, _] = single_row::<4>(rows, "CREATE_REPLICATION_SLOT")?;
        let lsn = parse_lsn(
            consistent_point,
            "CREATE_REPLICATION_SLOT",
            "consistent_point",
        )?;
        let snapshot = snapshot.ok_or_else(|| {
            WalError::Protocol("CREATE_REPLICATION_SLOT returned no snapshot name".into())
        })?;
        Ok((lsn, snapshot))
    }

    pub async fn create_logical_slot(&mut self, slot: &str) -> Result<Lsn, WalError> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput NOEXPORT_SNAPSHOT",
            replication_ident(slot)?
        );
        let rows = self.simple_query(&sql).await?;
        let [_, consistent_point, _, _] = single_row::<4>(rows, "CREATE_REPLICATION_SLOT")?;
        parse_lsn(
            consistent_point,
            "CREATE_REPLICATION_SLOT",
            "consistent_point",
        )
    }

    /// Starts streaming `slot` from `start` (`Lsn::INVALID`: from the slot's confirmed position).
    ///
    /// Sends `proto_version '1'` (unless `options` names `proto_version`), `publication_names` with
    /// `publication` quoted as an identifier, then `options` in order; names and values are quoted. Names
    /// containing a double quote are refused: the replication grammar has no way to write one.
    pub async fn start_replication(
        mut self,
        slot: &str,
        publication: &str,
        start: Lsn,
        options: &[(&str, &str)],
    ) -> Result<WalStream, WalError> {
        let sql = start_replication_command(slot, publication, start, options)?;
        self.wire.encode(|buf| frontend::query(&sql, buf))?;
        self.wire.flush().await?;
        loop {
            match self.wire.next_frame().await? {
                Frame::CopyBoth => {
                    return Ok(WalStream {
                        wire: self.wire,
                        state: CopyState::Streaming,
                    })
                }
                Frame::Message(Message::ErrorResponse(body)) => return Err(server_error(&body)),
                Frame::Message(
                    Message::NoticeResponse(_)
                    | Message::ParameterStatus(_)
                    | Message::NotificationResponse(_),
                ) => {}
                _ => return Err(unexpected("in answer to START_REPLICATION")),
            }
        }
    }
}

/// The CopyBoth stream opened by START_REPLICATION.
pub struct WalStream {
    wire: Wire,
    state: CopyState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyState {
    Streaming,
    /// The server sent CopyDone or CommandComplete: no more data, ReadyForQuery may follow.
    Ended,
    /// ReadyForQuery seen: the session is out of copy mode.
    Idle,
}

impl fmt::Debug for WalStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WalStream")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl WalStream {
    /// The next XLogData or keepalive; `Ok(None)` once the server has ended the copy.
    ///
    /// Cancellation-safe: bytes read by a cancelled call stay in the buffer and only complete frames are
    /// consumed. After an error, drop the stream.
    pub async fn next_message(&mut self) -> Result<Option<WalMessage>, WalError> {
        while self.state == CopyState::Streaming {
            match self.wire.next_frame().await? {
                Frame::CopyData(body) => {
                    if let Some(message) = decode_copy_data(body)? {
                        return Ok(Some(message));
                    }
                }
                Frame::Message(Message::CopyDone | Message::CommandComplete(_)) => {
                    self.state = CopyState::Ended
                }
                Frame::Message(Message::ReadyForQuery(_)) => self.state = CopyState::Idle,
                Frame::Message(Message::ErrorResponse(body)) => return Err(server_error(&body)),
                Frame::Message(
                    Message::NoticeResponse(_)
                    | Message::ParameterStatus(_)
                    | Message::NotificationResponse(_),
                ) => {}
                _ => return Err(unexpected("in the replication stream")),
            }
        }
        Ok(None)
    }

    /// Sends a standby status update: positions written, flushed (what the slot may release) and applied.
    ///
    /// One write per call. If a call is cancelled mid-write, the unsent rest goes out first on the next call,
    /// so the stream never carries a torn frame.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<(), WalError> {
        encode_status(
            &mut self.wire.write,
            write,
            flush,
            apply,
            now_pg_micros(),
            reply_requested,
        );
        self.wire.flush().await
    }

    /// Ends the copy (CopyDone), discards what is still in flight until ReadyForQuery, then terminates the
    /// session. Gives up after 10 s; the socket is closed either way.
    pub async fn close(mut self) -> Result<(), WalError> {
        match tokio::time::timeout(CLOSE_TIMEOUT, self.finish()).await {
            Ok(result) => result,
            Err(_) => Err(WalError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the server did not end the replication stream within {CLOSE_TIMEOUT:?}"),
            ))),
        }
    }

    async fn finish(&mut self) -> Result<(), WalError> {
        let mut error = None;
        if self.state != CopyState::Idle {
            frontend::copy_done(&mut self.wire.write);
            self.wire.flush().await?;
            loop {
                match self.wire.next_frame().await {
                    Ok(Frame::Message(Message::ReadyForQuery(_))) => break,
                    Ok(Frame::Message(Message::ErrorResponse(body))) => {
                        error = Some(server_error(&body))
                    }
                    Ok(_) => {}
                    // The server may end the session after a FATAL error or on shutdown: closed is closed.
                    Err(WalError::Closed) => return error.map_or(Ok(()), Err),
                    Err(other) => return Err(other),
                }
            }
        }
        frontend::terminate(&mut self.wire.write);
        // Best effort: the server may already be gone.
        let _ = self.wire.flush().await;
        let _ = self.wire.socket.shutdown().await;
        error.map_or(Ok(()), Err)
    }
}

/// Where to connect: a host name to resolve, an address (`hostaddr`, with the host name TLS checks) or a
/// Unix socket path.
enum Target {
    Tcp {
        host: String,
        port: u16,
    },
    Ip {
        addr: std::net::SocketAddr,
        name: String,
    },
    Unix(std::path::PathBuf),
}

/// What [`WalConnection::connect_to`] asks of TLS on a TCP connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encryption {
    Plain,
    IfOffered,
    Required,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp { host, port } => write!(f, "{host}:{port}"),
            Target::Ip { addr, .. } => write!(f, "{addr}"),
            Target::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

impl Target {
    /// The name the server's certificate is checked against.
    fn tls_name(&self) -> &str {
        match self {
            Target::Tcp { host, .. } => host,
            Target::Ip { name, .. } => name,
            Target::Unix(_) => "",
        }
    }

    async fn open(&self) -> Result<Socket, WalError> {
        let context = |e: io::Error| WalError::Io(io::Error::new(e.kind(), format!("{self}: {e}")));
        match self {
            Target::Unix(path) => Ok(Socket::Unix(
                UnixStream::connect(path).await.map_err(context)?,
            )),
            Target::Ip { addr, .. } => tcp(TcpStream::connect(addr).await.map_err(context)?),
            Target::Tcp { host, port } => {
                let mut last =
                    io::Error::new(io::ErrorKind::NotFound, "the name resolves to no address");
                for addr in tokio::net::lookup_host((host.as_str(), *port))
                    .await
                    .map_err(context)?
                {
                    match TcpStream::connect(addr).await {
                        Ok(stream) => return tcp(stream),
                        Err(e) => last = e,
                    }
                }
                Err(context(last))
            }
        }
    }
}

fn tcp(stream: TcpStream) -> Result<Socket, WalError> {
    // Status updates are tiny and latency matters more than packet count.
    stream.set_nodelay(true)?;
    Ok(Socket::Tcp(stream))
}

/// The hosts of `config` in order, with libpq's pairing rules: `hostaddr[i]` overrides `host[i]`, and one
/// port applies to every host.
fn targets(config: &tokio_postgres::Config) -> Result<Vec<Target>, WalError> {
    let hosts = config.get_hosts();
    let addrs = config.get_hostaddrs();
    let ports = config.get_ports();
    let count = hosts.len().max(addrs.len());
    if count == 0 {
        return Err(WalError::Config(
            "the connection settings name no host; add host=... to database_url".into(),
        ));
    }
    if ports.len() > 1 && ports.len() != count {
        return Err(WalError::Config(format!(
            "the connection settings name {count} hosts but {} ports; give one port or one per host",
            ports.len()
        )));
    }
    let mut targets = Vec::with_capacity(count);
    for i in 0..count {
        let port = ports
            .get(i)
            .or(ports.first())
            .copied()
            .unwrap_or(DEFAULT_PORT);
        let target = match (addrs.get(i), hosts.get(i)) {
            (Some(ip), host) => Target::Ip {
                addr: (*ip, port).into(),
                name: match host {
                    Some(Host::Tcp(name)) => name.clone(),
                    _ => ip.to_string(),
                },
            },
            (None, Some(Host::Tcp(host))) => Target::Tcp {
                host: host.clone(),
                port,
            },
            (None, Some(Host::Unix(dir))) => Target::Unix(dir.join(format!(".s.PGSQL.{port}"))),
            (None, None) => unreachable!("i < max(hosts, addrs)"),
        };
        targets.push(target);
    }
    Ok(targets)
}

/// TCP, TLS over TCP, or Unix socket; all are `Unpin`, so the I/O traits just delegate.
enum Socket {
    Tcp(TcpStream),
    Tls(Box<pgtls::TlsStream<TcpStream>>),
    Unix(UnixStream),
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A complete backend frame.
enum Frame {
    CopyBoth,
    /// The CopyData payload, without the 5-byte header.
    CopyData(Bytes),
    Message(Message),
}

/// The socket with its buffers: `read` holds bytes not yet framed, `write` bytes not yet sent.
struct Wire {
    socket: Socket,
    read: BytesMut,
    write: BytesMut,
}

impl Wire {
    fn new(socket: Socket) -> Wire {
        Wire {
            socket,
            read: BytesMut::with_capacity(READ_CHUNK),
            write: BytesMut::with_capacity(256),
        }
    }

    /// Appends a frontend message, leaving the buffer untouched if it cannot be encoded (a NUL in a string).
    fn encode(&mut self, f: impl FnOnce(&mut BytesMut) -> io::Result<()>) -> Result<(), WalError> {
        let mark = self.write.len();
        f(&mut self.write).map_err(|e| {
            self.write.truncate(mark);
            WalError::Protocol(format!("cannot encode the message: {e}"))
        })
    }

    /// Sends everything buffered. `write_all_buf` advances the buffer as it goes, so a cancelled flush
    /// resumes where it stopped.
    async fn flush(&mut self) -> Result<(), WalError> {
        self.socket.write_all_buf(&mut self.write).await?;
        Ok(())
    }

    /// Reads until one complete frame is buffered. Cancellation-safe.
    async fn next_frame(&mut self) -> Result<Frame, WalError> {
        loop {
            if let Some(frame) = parse_frame(&mut self.read)? {
                return Ok(frame);
            }
            if self.read.capacity() - self.read.len() < MIN_SPARE {
                self.read.reserve(READ_CHUNK);
            }
            if self.socket.read_buf(&mut self.read).await? == 0 {
                return Err(WalError::Closed);
            }
        }
    }

    /// The next frame outside copy mode.
    async fn next_message(&mut self) -> Result<Message, WalError> {
        match self.next_frame().await? {
            Frame::Message(message) => Ok(message),
            Frame::CopyBoth | Frame::CopyData(_) => Err(unexpected("outside copy mode")),
        }
    }
}

/// Splits one complete frame off `buf`, or returns `None` (having reserved room for the rest) if it is
/// incomplete.
fn parse_frame(buf: &mut BytesMut) -> Result<Option<Frame>, WalError> {
    let Some(&[tag, a, b, c, d]) = buf.get(..5) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    if !(4..=MAX_MESSAGE_LEN).contains(&len) {
        return Err(WalError::Protocol(format!(
            "message '{}' declares an invalid length of {len} bytes",
            tag.escape_ascii()
        )));
    }
    let total = len + 1;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    match tag {
        COPY_BOTH_RESPONSE_TAG => {
            // The column formats that follow mean nothing for replication.
            buf.advance(total);
            Ok(Some(Frame::CopyBoth))
        }
        COPY_DATA_TAG => {
            let mut frame = buf.split_to(total).freeze();
            frame.advance(5);
            Ok(Some(Frame::CopyData(frame)))
        }
        _ => match Message::parse(buf) {
            Ok(Some(message)) => Ok(Some(Frame::Message(message))),
            Ok(None) => Err(WalError::Protocol("a complete frame did not parse".into())),
            Err(e) => Err(WalError::Protocol(format!(
                "malformed message '{}': {e}",
                tag.escape_ascii()
            ))),
        },
    }
}

/// Decodes a CopyData payload of the replication stream. Unknown kinds are skipped (`None`): newer servers
/// may add some, and none of them carries changes.
fn decode_copy_data(mut body: Bytes) -> Result<Option<WalMessage>, WalError> {
    match body.first() {
        Some(b'w') => {
            if body.len() < 25 {
                return Err(WalError::Protocol(format!(
                    "XLogData message of {} bytes is shorter than its 25-byte header",
                    body.len()
                )));
            }
            body.advance(1);
            let wal_start = Lsn(body.get_u64());
            let wal_end = Lsn(body.get_u64());
            let server_time_us = body.get_i64();
            Ok(Some(WalMessage::XLogData {
                wal_start,
                wal_end,
                server_time_us,
                data: body,
            }))
        }
        Some(b'k') => {
            if body.len() < 18 {
                return Err(WalError::Protocol(format!(
                    "keepalive message of {} bytes is shorter than 18",
                    body.len()
                )));
            }
            body.advance(1);
            Ok(Some(WalMessage::Keepalive {
                wal_end: Lsn(body.get_u64()),
                server_time_us: body.get_i64(),
                reply_requested: body.get_u8() != 0,
            }))
        }
        Some(kind) => {
            tracing::debug!(kind = %kind.escape_ascii(), "skipping unknown replication message");
            Ok(None)
        }
        None => Err(WalError::Protocol(
            "empty CopyData message in the replication stream".into(),
        )),
    }
}

/// Appends a standby status update: CopyData wrapping `'r'`, three positions, the clock and the reply flag.
fn encode_status(buf: &mut BytesMut, write: Lsn, flush: Lsn, apply: Lsn, now_us: i64, reply: bool) {
    const BODY_LEN: i32 = 1 + 8 + 8 + 8 + 8 + 1;
    buf.reserve(5 + BODY_LEN as usize);
    buf.put_u8(COPY_DATA_TAG);
    buf.put_i32(4 + BODY_LEN);
    buf.put_u8(b'r');
    buf.put_u64(write.0);
    buf.put_u64(flush.0);
    buf.put_u64(apply.0);
    buf.put_i64(now_us);
    buf.put_u8(u8::from(reply));
}

/// Microseconds since 2000-01-01 UTC, the replication protocol's clock.
fn now_pg_micros() -> i64 {
    let unix_us = match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(elapsed) => i64::try_from(elapsed.as_micros()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_micros()).unwrap_or(i64::MAX),
    };
    unix_us.saturating_sub(PG_EPOCH_OFFSET_US)
}

fn start_replication_command(
    slot: &str,
    publication: &str,
    start: Lsn,
    options: &[(&str, &str)],
) -> Result<String, WalError> {
    // pgoutput splits this value with SplitIdentifierString, which does read doubled quotes.
    let publication_names = format!("\"{}\"", publication.replace('"', "\"\""));
    let mut all: Vec<(&str, &str)> = Vec::with_capacity(options.len() + 2);
    if !options.iter().any(|(name, _)| *name == "proto_version") {
        all.push(("proto_version", "1"));
    }
    all.push(("publication_names", &publication_names));
    all.extend_from_slice(options);
    let mut options = Vec::with_capacity(all.len());
    for (name, value) in all {
        options.push(format!(
            "{} {}",
            replication_ident(name)?,
            quote_literal(value)
        ));
    }
    Ok(format!(
        "START_REPLICATION SLOT {} LOGICAL {start} ({})",
        replication_ident(slot)?,
        options.join(", ")
    ))
}

/// `"name"`, so that case and any character reach the server as written (it validates slot names itself).
/// The replication grammar, unlike SQL, does not read `""` inside a quoted identifier, so a name with a
/// double quote cannot be written at all.
fn replication_ident(name: &str) -> Result<String, WalError> {
    if name.is_empty() || name.contains('"') {
        return Err(WalError::Config(format!(
            "{name:?} cannot be used as a replication slot or option name; use lowercase letters, digits \
             and underscores"
        )));
    }
    Ok(format!("\"{name}\""))
}

/// `'value'` with embedded quotes doubled; the replication grammar has no backslash escapes.
fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

fn server_error(body: &ErrorResponseBody) -> WalError {
    let (mut severity, mut code, mut message, mut detail, mut hint) =
        (None, None, None, None, None);
    let mut fields = body.fields();
    // A malformed field list still yields what was read so far: the error is more useful than a parse error.
    while let Ok(Some(field)) = fields.next() {
        let value = || String::from_utf8_lossy(field.value_bytes()).into_owned();
        match field.type_() {
            b'S' => severity = Some(value()),
            b'C' => code = Some(value()),
            b'M' => message = Some(value()),
            b'D' => detail = Some(value()),
            b'H' => hint = Some(value()),
            _ => {}
        }
    }
    WalError::Server {
        error: Box::new(ServerError {
            severity: severity.unwrap_or_else(|| "ERROR".into()),
            // XX000 is internal_error: the closest thing to "the server gave no code".
            code: code.unwrap_or_else(|| "XX000".into()),
            message: message.unwrap_or_else(|| "(no message)".into()),
            detail,
            hint,
        }),
        target: None,
    }
}

fn text_row(body: &DataRowBody) -> Result<Vec<Option<String>>, WalError> {
    let buffer = body.buffer();
    let mut ranges = body.ranges();
    let mut row = Vec::new();
    while let Some(range) = ranges.next().map_err(malformed)? {
        row.push(match range {
            None => None,
            Some(range) => Some(
                std::str::from_utf8(&buffer[range])
                    .map_err(|_| WalError::Protocol("a column value is not UTF-8".into()))?
                    .to_owned(),
            ),
        });
    }
    Ok(row)
}

fn single_row<const N: usize>(
    rows: Vec<Vec<Option<String>>>,
    command: &str,
) -> Result<[Option<String>; N], WalError> {
    let shape = || WalError::Protocol(format!("{command} did not return one row of {N} columns"));
    let [row] = <[_; 1]>::try_from(rows).map_err(|_| shape())?;
    row.try_into().map_err(|_| shape())
}

fn parse_lsn(value: Option<String>, command: &str, column: &str) -> Result<Lsn, WalError> {
    let value = value.ok_or_else(|| missing(command, column))?;
    value.parse().map_err(|_| {
        WalError::Protocol(format!("{command} returned {column} {value:?}, not an LSN"))
    })
}

fn missing(command: &str, column: &str) -> WalError {
    WalError::Protocol(format!("{command} returned no {column}"))
}

fn malformed(e: io::Error) -> WalError {
    WalError::Protocol(format!("malformed message: {e}"))
}

fn unexpected(when: &str) -> WalError {
    WalError::Protocol(format!("unexpected message {when}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn xlogdata(start: u64, end: u64, time: i64, data: &[u8]) -> Vec<u8> {
        let mut body = vec![b'w'];
        body.extend_from_slice(&start.to_be_bytes());
        body.extend_from_slice(&end.to_be_bytes());
        body.extend_from_slice(&time.to_be_bytes());
        body.extend_from_slice(data);
        frame(b'd', &body)
    }

    fn keepalive(end: u64, time: i64, reply: u8) -> Vec<u8> {
        let mut body = vec![b'k'];
        body.extend_from_slice(&end.to_be_bytes());
        body.extend_from_slice(&time.to_be_bytes());
        body.push(reply);
        frame(b'd', &body)
    }

    fn wal_message(buf: &mut BytesMut) -> Result<Option<WalMessage>, WalError> {
        match parse_frame(buf)? {
            Some(Frame::CopyData(body)) => decode_copy_data(body),
            Some(_) => panic!("not a CopyData frame"),
            None => panic!("incomplete frame"),
        }
    }

    #[test]
    fn frames_arriving_a_byte_at_a_time_parse_once_complete() {
        let mut wire = frame(b'W', &[0, 0, 0]);
        wire.extend(xlogdata(0x10, 0x20, 7, b"BEGIN"));
        wire.extend(keepalive(0x30, -1, 1));
        let mut buf = BytesMut::new();
        let mut seen = Vec::new();
        for byte in wire {
            buf.put_u8(byte);
            match parse_frame(&mut buf).unwrap() {
                None => {}
                Some(Frame::CopyBoth) => seen.push(None),
                Some(Frame::CopyData(body)) => seen.push(decode_copy_data(body).unwrap()),
                Some(Frame::Message(_)) => panic!("unexpected message"),
            }
        }
        assert!(buf.is_empty());
        assert_eq!(
            seen,
            vec![
                None,
                Some(WalMessage::XLogData {
                    wal_start: Lsn(0x10),
                    wal_end: Lsn(0x20),
                    server_time_us: 7,
                    data: Bytes::from_static(b"BEGIN"),
                }),
                Some(WalMessage::Keepalive {
                    wal_end: Lsn(0x30),
                    server_time_us: -1,
                    reply_requested: true,
                }),
            ]
        );
    }

    #[test]
    fn other_tags_are_delegated_to_postgres_protocol() {
        let mut buf = BytesMut::from(&frame(b'Z', b"I")[..]);
        assert!(matches!(
            parse_frame(&mut buf).unwrap(),
            Some(Frame::Message(Message::ReadyForQuery(_)))
        ));
        let mut buf = BytesMut::from(&frame(b'E', b"SERROR\0C42501\0Mno\0Dwhy\0Hfix\0\0")[..]);
        let Some(Frame::Message(Message::ErrorResponse(body))) = parse_frame(&mut buf).unwrap()
        else {
            panic!("not an error response");
        };
        let error = server_error(&body);
        assert_eq!(error.code(), Some("42501"));
        assert_eq!(
            error.to_string(),
            "no (ERROR, SQLSTATE 42501; detail: why; hint: fix); the role may not use replication: run ALTER \
             ROLE <user> REPLICATION as a superuser, or use source = \"notify\""
        );
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        let cases: Vec<Vec<u8>> = vec![
            vec![b'd', 0, 0, 0, 3],             // length below 4
            vec![b'd', 0x7f, 0xff, 0xff, 0xff], // length above 1 GiB
            frame(b'?', b""),                   // unknown tag
            frame(b'Z', b""),                   // ReadyForQuery without status
        ];
        for case in cases {
            let mut buf = BytesMut::from(&case[..]);
            assert!(
                matches!(parse_frame(&mut buf), Err(WalError::Protocol(_))),
                "{case:?}"
            );
        }
        for body in [&b""[..], b"w\0\0", b"k\0\0\0\0\0\0\0\0"] {
            let mut buf = BytesMut::from(&frame(b'd', body)[..]);
            assert!(
                matches!(wal_message(&mut buf), Err(WalError::Protocol(_))),
                "{body:?}"
            );
        }
        // Unknown kinds are skipped, not fatal.
        let mut buf = BytesMut::from(&frame(b'd', b"s123")[..]);
        assert_eq!(wal_message(&mut buf).unwrap(), None);
    }

    #[test]
    fn status_update_layout() {
        let mut buf = BytesMut::new();
        encode_status(&mut buf, Lsn(1), Lsn(2), Lsn(3), 4, true);
        let mut expected = vec![b'd', 0, 0, 0, 38, b'r'];
        for n in [1u64, 2, 3, 4] {
            expected.extend_from_slice(&n.to_be_bytes());
        }
        expected.push(1);
        assert_eq!(&buf[..], &expected[..]);
    }

    #[test]
    fn clock_counts_from_2000() {
        // 2020-01-01 is 631 152 000 s after 2000-01-01; any run of this test is later.
        assert!(now_pg_micros() > 631_152_000_000_000);
    }

    #[test]
    fn commands_quote_names_and_values() {
        assert_eq!(
            start_replication_command(
                "S-1",
                "Pub\"x",
                Lsn(0x16_B374_D848),
                &[("messages", "it's")]
            )
            .unwrap(),
            "START_REPLICATION SLOT \"S-1\" LOGICAL 16/B374D848 (\"proto_version\" '1', \
             \"publication_names\" '\"Pub\"\"x\"', \"messages\" 'it''s')"
        );
        assert_eq!(
            start_replication_command("s", "p", Lsn::INVALID, &[("proto_version", "2")]).unwrap(),
            "START_REPLICATION SLOT \"s\" LOGICAL 0/0 (\"publication_names\" '\"p\"', \"proto_version\" '2')"
        );
        for (slot, option) in [("s\"", "o"), ("", "o"), ("s", "o\"")] {
            let result = start_replication_command(slot, "p", Lsn::INVALID, &[(option, "v")]);
            assert!(
                matches!(result, Err(WalError::Config(_))),
                "{slot:?} {option:?}"
            );
        }
    }

    #[test]
    fn settings_without_host_or_user_are_refused() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for settings in ["user=u", "host=127.0.0.1", "host=a,b port=1,2,3 user=u"] {
            let config: tokio_postgres::Config = settings.parse().unwrap();
            let error = runtime
                .block_on(WalConnection::connect(&config.into()))
                .unwrap_err();
            assert!(matches!(error, WalError::Config(_)), "{settings}: {error}");
        }
    }

    /// A throwaway cluster run as the `postgres` user, stopped (immediate) and deleted on drop.
    mod cluster {
        use std::os::unix::fs::{chown, PermissionsExt};
        use std::os::unix::process::CommandExt;
        use std::path::{Path, PathBuf};
        use std::process::Command;
        use std::sync::atomic::{AtomicU32, Ordering};

        pub struct Cluster {
            pub base: PathBuf,
            pub port: u16,
            bindir: PathBuf,
            data: PathBuf,
            uid: u32,
            gid: u32,
        }

        fn id(flag: &str) -> u32 {
            let out = Command::new("id")
                .args([flag, "postgres"])
                .output()
                .expect("run id");
            assert!(out.status.success(), "no postgres user");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("numeric id")
        }

        impl Cluster {
            pub fn start(wal_level: &str, hba: &str) -> Cluster {
                static COUNTER: AtomicU32 = AtomicU32::new(0);
                let out = Command::new("pg_config")
                    .arg("--bindir")
                    .output()
                    .expect("run pg_config");
                let bindir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                let base = std::env::temp_dir().join(format!(
                    "walconn-{}-{}",
                    std::process::id(),
                    COUNTER.fetch_add(1, Ordering::Relaxed)
                ));
                let _ = std::fs::remove_dir_all(&base);
                std::fs::create_dir(&base).unwrap();
                std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
                let (uid, gid) = (id("-u"), id("-g"));
                chown(&base, Some(uid), Some(gid)).unwrap();
                let mut cluster = Cluster {
                    data: base.join("data"),
                    base,
                    port: 0,
                    bindir,
                    uid,
                    gid,
                };
                cluster.run(
                    "initdb",
                    &[
                        "-D",
                        path(&cluster.data),
                        "-U",
                        "postgres",
                        "-A",
                        "trust",
                        "-E",
                        "UTF8",
                        "--locale=C",
                        "--no-sync",
                    ],
                );
                let conf = format!(
                    "\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nwal_level = {wal_level}\n\
                     max_wal_senders = 10\nmax_replication_slots = 10\nfsync = off\nwal_sender_timeout = '20s'\n",
                    cluster.base.display()
                );
                let mut postgresql_conf =
                    std::fs::read_to_string(cluster.data.join("postgresql.conf")).unwrap();
                postgresql_conf.push_str(&conf);
                std::fs::write(cluster.data.join("postgresql.conf"), postgresql_conf).unwrap();
                std::fs::write(cluster.data.join("pg_hba.conf"), hba).unwrap();
                // A free port can be taken between probing and binding: retry with another.
                for _ in 0..5 {
                    cluster.port = std::net::TcpListener::bind("127.0.0.1:0")
                        .unwrap()
                        .local_addr()
                        .unwrap()
                        .port();
                    let log = cluster.base.join("postgres.log");
                    let status = cluster
                        .command("pg_ctl")
                        .args([
                            "start",
                            "-w",
                            "-t",
                            "120",
                            "-D",
                            path(&cluster.data),
                            "-l",
                            path(&log),
                            "-o",
                            &format!("-p {}", cluster.port),
                        ])
                        .output()
                        .unwrap()
                        .status;
                    if status.success() {
                        return cluster;
                    }
                    let log = std::fs::read_to_string(&log).unwrap_or_default();
                    assert!(
                        log.contains("could not bind") || log.contains("already in use"),
                        "pg_ctl start failed:\n{log}"
                    );
                }
                panic!("no free port after 5 attempts");
            }

            fn command(&self, program: &str) -> Command {
                let mut command = Command::new(self.bindir.join(program));
                command.uid(self.uid).gid(self.gid).current_dir(&self.base);
                command
            }

            fn run(&self, program: &str, args: &[&str]) {
                let out = self.command(program).args(args).output().unwrap();
                assert!(
                    out.status.success(),
                    "{program} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }

            /// Settings for a TCP connection to 127.0.0.1.
            pub fn tcp(&self, user: &str) -> crate::conninfo::ConnInfo {
                let mut config = tokio_postgres::Config::new();
                config
                    .host("127.0.0.1")
                    .port(self.port)
                    .user(user)
                    .dbname("postgres");
                config.into()
            }

            /// Settings for a connection over the Unix socket.
            pub fn unix(&self, user: &str) -> crate::conninfo::ConnInfo {
                let mut config = tokio_postgres::Config::new();
                config
                    .host_path(&self.base)
                    .port(self.port)
                    .user(user)
                    .dbname("postgres");
                config.into()
            }

            pub async fn client(&self) -> tokio_postgres::Client {
                let (client, connection) = self
                    .tcp("postgres")
                    .connect(tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(connection);
                client
            }
        }

        fn path(p: &Path) -> &str {
            p.to_str().expect("temp paths are UTF-8")
        }

        impl Drop for Cluster {
            fn drop(&mut self) {
                if self.port != 0 {
                    let _ = self
                        .command("pg_ctl")
                        .args(["stop", "-m", "immediate", "-D", path(&self.data)])
                        .output();
                }
                let _ = std::fs::remove_dir_all(&self.base);
            }
        }
    }

    use cluster::Cluster;
    use tokio::time::{sleep, Instant};

    const HBA: &str = "\
local all all trust
host all scram_user 127.0.0.1/32 scram-sha-256
host all md5_user 127.0.0.1/32 md5
host all pw_user 127.0.0.1/32 password
host all all 127.0.0.1/32 trust
";

    /// Generous: the box may be busy compiling.
    const DEADLINE: Duration = Duration::from_secs(120);

    fn lsn_at(data: &[u8], at: usize) -> Lsn {
        Lsn(u64::from_be_bytes(data[at..at + 8].try_into().unwrap()))
    }

    async fn slot_position(client: &tokio_postgres::Client, column: &str) -> Option<Lsn> {
        let row = client
            .query_one(
                &format!("select {column}::text from pg_replication_slots where slot_name = 'walconn_slot'"),
                &[],
            )
            .await
            .unwrap();
        row.get::<_, Option<String>>(0).map(|s| s.parse().unwrap())
    }

    #[tokio::test]
    async fn streams_changes_from_a_logical_cluster() {
        let cluster = Cluster::start("logical", HBA);
        let client = cluster.client().await;
        client
            .batch_execute(
                "create table items (id int primary key, body text);
                 create publication walconn_pub for table items;",
            )
            .await
            .unwrap();

        let mut config = cluster.unix("postgres");
        config.application_name("walconn-test");
        let mut conn = WalConnection::connect(&config).await.unwrap();
        let info = conn.identify_system().await.unwrap();
        assert!(
            info.timeline >= 1 && info.xlogpos > Lsn::INVALID,
            "{info:?}"
        );
        assert!(info.systemid.parse::<u64>().is_ok(), "{info:?}");
        assert_eq!(info.dbname.as_deref(), Some("postgres"));

        // Plain SQL works on the walsender, the startup parameters took effect, and a server error leaves the
        // session usable.
        let rows = conn
            .simple_query("select 1, null::text, 'é'; show TimeZone")
            .await
            .unwrap();
        let text = |s: &str| Some(s.to_string());
        assert_eq!(
            rows,
            vec![vec![text("1"), None, text("é")], vec![text("UTC")]]
        );
        let error = conn.simple_query("select 1/0").await.unwrap_err();
        assert_eq!(error.code(), Some("22012"), "{error}");
        assert_eq!(
            conn.simple_query("select 2").await.unwrap(),
            vec![vec![text("2")]]
        );
        // The name reaches the server as written (invalid_name), not folded or as a syntax error.
        let error = conn.create_logical_slot("Bad-Name").await.unwrap_err();
        assert_eq!(error.code(), Some("42602"), "{error}");
        let error = conn.create_logical_slot("bad\"name").await.unwrap_err();
        assert!(matches!(error, WalError::Config(_)), "{error}");

        let consistent = conn.create_logical_slot("walconn_slot").await.unwrap();
        assert!(consistent > Lsn::INVALID);
        let mut stream = conn
            .start_replication(
                "walconn_slot",
                "walconn_pub",
                consistent,
                &[("messages", "true")],
            )
            .await
            .unwrap();
        let apps = client
            .query("select application_name from pg_stat_replication", &[])
            .await
            .unwrap();
        assert!(apps.iter().any(|r| r.get::<_, String>(0) == "walconn-test"));

        // Three transactions (one simple query would be one implicit transaction).
        for sql in [
            "insert into items values (1, 'a'), (2, 'b')",
            "insert into items values (3, repeat('x', 4000000))",
            "select pg_logical_emit_message(true, 'walconn', 'hello')",
        ] {
            client.batch_execute(sql).await.unwrap();
        }

        // A 1 ms timer races every read, so the 4 MB row arrives across many cancelled calls.
        let deadline = Instant::now() + DEADLINE;
        let (mut tags, mut keepalives, mut largest, mut last_end) =
            (Vec::new(), 0, 0, Lsn::INVALID);
        // Until the message's transaction has committed and a keepalive came.
        while !tags.ends_with(b"MC") || keepalives == 0 {
            assert!(
                Instant::now() < deadline,
                "stream stalled; tags so far {}, {keepalives} keepalives",
                tags.escape_ascii()
            );
            let message = tokio::select! {
                message = stream.next_message() => message.unwrap().expect("stream ended early"),
                _ = sleep(Duration::from_millis(1)) => continue,
            };
            match message {
                WalMessage::XLogData { data, .. } => {
                    tags.push(data[0]);
                    largest = largest.max(data.len());
                    if data[0] == b'C' {
                        last_end = lsn_at(&data, 10);
                    }
                }
                WalMessage::Keepalive {
                    reply_requested,
                    wal_end,
                    ..
                } => {
                    keepalives += 1;
                    assert!(wal_end > Lsn::INVALID);
                    if reply_requested {
                        stream
                            .send_status(last_end, Lsn::INVALID, Lsn::INVALID, false)
                            .await
                            .unwrap();
                    }
                }
            }
        }
        // Servers before 15 also send empty transactions (B C) for unrelated writes such as ANALYZE.
        let tags = tags.escape_ascii().to_string().replace("BC", "");
        assert_eq!(tags, "BRIICBICBMC");
        assert!(largest > 4_000_000, "the large row arrived whole");

        // Acknowledge the last commit and wait for the slot to record it, answering keepalives meanwhile.
        stream
            .send_status(last_end, last_end, last_end, false)
            .await
            .unwrap();
        loop {
            if slot_position(&client, "confirmed_flush_lsn").await >= Some(last_end) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "confirmed_flush_lsn never reached {last_end}"
            );
            tokio::select! {
                message = stream.next_message() => {
                    if let Some(WalMessage::Keepalive { reply_requested: true, .. }) = message.unwrap() {
                        stream.send_status(last_end, last_end, last_end, false).await.unwrap();
                    }
                }
                _ = sleep(Duration::from_millis(50)) => {}
            }
        }
        assert_eq!(
            slot_position(&client, "confirmed_flush_lsn").await,
            Some(last_end)
        );

        // A graceful close ends the walsender, which releases the slot.
        stream.close().await.unwrap();
        loop {
            let active: bool = client
                .query_one(
                    "select active from pg_replication_slots where slot_name = 'walconn_slot'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if !active {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the slot stayed active after close"
            );
            sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn authenticates_and_reports_server_errors() {
        let cluster = Cluster::start("logical", HBA);
        let client = cluster.client().await;
        client
            .batch_execute(
                "create role r login;
                 set password_encryption = 'scram-sha-256';
                 create role scram_user login replication password 'scram pw ü';
                 create role pw_user login replication password 'clear pw';
                 set password_encryption = 'md5';
                 create role md5_user login replication password 'md5 pw';",
            )
            .await
            .unwrap();
        let stored: String = client
            .query_one(
                "select rolpassword from pg_authid where rolname = 'md5_user'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(
            stored.starts_with("md5"),
            "md5_user's password is stored as md5"
        );

        for (user, password) in [
            ("scram_user", "scram pw ü"),
            ("md5_user", "md5 pw"),
            ("pw_user", "clear pw"),
        ] {
            let mut config = cluster.tcp(user);
            config.password(password);
            let mut conn = WalConnection::connect(&config)
                .await
                .unwrap_or_else(|e| panic!("{user}: {e}"));
            assert_eq!(
                conn.identify_system().await.unwrap().dbname.as_deref(),
                Some("postgres")
            );

            config.password("wrong");
            let error = WalConnection::connect(&config).await.unwrap_err();
            assert_eq!(error.code(), Some("28P01"), "{user}: {error}");
            let error = WalConnection::connect(&cluster.tcp(user))
                .await
                .unwrap_err();
            assert!(matches!(error, WalError::Auth(_)), "{user}: {error}");
        }

        // Without REPLICATION the walsender refuses to start.
        let error = WalConnection::connect(&cluster.tcp("r")).await.unwrap_err();
        assert_eq!(error.code(), Some("42501"), "{error}");

        // Hosts are tried in order: a missing socket first, then TCP.
        let mut hosts = tokio_postgres::Config::new();
        hosts
            .host_path(cluster.base.join("nowhere"))
            .host("127.0.0.1")
            .port(cluster.port)
            .user("postgres")
            .dbname("postgres");
        let mut conn = WalConnection::connect(&hosts.into()).await.unwrap();
        conn.identify_system().await.unwrap();

        // A missing host alone reports the I/O error with the path.
        let mut nowhere = tokio_postgres::Config::new();
        nowhere
            .host_path(cluster.base.join("nowhere"))
            .port(cluster.port)
            .user("postgres");
        let error = WalConnection::connect(&nowhere.into()).await.unwrap_err();
        assert!(
            matches!(&error, WalError::Io(_)) && error.to_string().contains("nowhere"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn replica_cluster_refuses_logical_slots() {
        let cluster = Cluster::start("replica", HBA);
        let mut conn = WalConnection::connect(&cluster.tcp("postgres"))
            .await
            .unwrap();
        let error = conn.create_logical_slot("walconn_slot").await.unwrap_err();
        assert_eq!(error.code(), Some("55000"), "{error}");
    }
}
