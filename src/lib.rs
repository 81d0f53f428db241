//! walhook: committed rows of a PostgreSQL outbox table become signed webhook deliveries.
//!
//! The data's path: an application commits `INSERT INTO walhook.outbox`; the **source** reads it from a
//! logical replication slot in commit order (or, with `source = "notify"`, claims it from the table);
//! **fan-out** picks the enabled endpoints whose patterns match; **dispatch** signs and POSTs each delivery;
//! **record** writes outcomes to `walhook.deliveries` and `walhook.attempts` in batches; only then is the slot
//! position (or the outbox row) **acknowledged**. Failed deliveries wait in `walhook.deliveries` and the
//! **scheduler** sends them again when due.
//!
//! Several instances may share a database: one leads the slot (an advisory lock) while the others stand by;
//! retries and notify claims are shared through leases that lapse when their instance dies.
//!
//! Module map, in the order the data flows:
//! - [`config`]: figment layers (defaults < TOML < `WALHOOK_*`), validation naming the key; [`conninfo`]: the
//!   connection settings as libpq reads them (`database_url`, the `PG*` variables, the password file);
//!   [`pgtls`]: TLS to PostgreSQL with libpq's `sslmode`, for the SQL sessions and the replication connection.
//! - [`schema`]: the embedded, numbered migrations under `sql/`, applied in steps, then the roles' grants (`walhook migrate`).
//! - [`source`]: where events come from: the replication slot ([`source::replication`]) over a hand-written
//!   walsender client ([`source::walconn`]) with leadership among instances, or leased claims of outbox rows woken by `LISTEN/NOTIFY`
//!   ([`source::notify`]); the rows committed before the slot existed, read under its snapshot on the first
//!   start ([`source::backfill`]); the shared fan-out ([`source::Pipeline`]) and acknowledgements ([`source::ack`]);
//!   the events `walhook.publish()` writes as logical decoding messages instead of rows ([`source::message`]).
//! - [`pgoutput`]: pure decoder of the pgoutput protocol.
//! - [`event`]: an outbox row and its Standard Webhooks envelope.
//! - [`fanout`]: the endpoint cache and event-type patterns; [`catalog`]: event types' JSON Schemas and
//!   versions, checked before a request and rendered for endpoints pinned to an older version.
//! - [`dispatch`]: signing ([`sign`]), the guarded HTTP client (directly or through an egress proxy), the retry
//!   policy, per-endpoint limits; [`trace`]: each attempt as a span, child of the row's `traceparent`, sent
//!   along and exported over OTLP.
//! - [`record`]: batched writes of outcomes, releasing acknowledgements once durable.
//! - [`scheduler`]: claims due retries with `FOR UPDATE SKIP LOCKED` leases.
//! - [`store`]: every SQL statement the daemon runs.
//! - [`daemon`]: `walhook run`, wiring and graceful drain; [`health`]: health state and `/healthz`,
//!   `/readyz`, `/metrics`; [`monitor`]: samples slot and backlog from SQL; [`systemd`]: the notify protocol.
//! - [`retention`]: batched cleanup of old deliveries, attempts and outbox rows; [`status`]: `walhook status`;
//!   [`preflight`]: the start-up checks of `walhook check-config --connect`.
//! - [`demo`], [`cluster`], [`receiver`]: the self-contained demo, a throwaway PostgreSQL cluster and a
//!   loopback webhook receiver (also used by the tests and benchmarks).
//! - [`portal`]: `walhook portal`, the pages where an application's customers manage their own webhooks, a
//!   thin client of the SQL contract whose transactions row-level security holds to one tenant.
//! - [`bench`]: `walhook bench`, throughput, latency and cost of the relay on this machine.
//! - [`listen`]: `walhook listen`, a local verifying receiver for developers (forwards to their app, replays);
//!   [`send_test`]: `walhook send-test`, a `walhook.test` event to one endpoint, followed attempt by attempt.
//! - [`lsn`], [`metrics`]: WAL positions; metric names. [`pgerror`]: how a database failure reads (the
//!   server's message, SQLSTATE, detail, hint, and the fix), for every error that wraps one.

pub mod bench;
pub mod catalog;
pub mod cluster;
pub mod config;
pub mod conninfo;
pub mod daemon;
pub mod demo;
pub mod dispatch;
pub mod endpoint_state;
pub mod event;
pub mod fanout;
pub mod health;
pub mod listen;
pub mod lsn;
pub mod metrics;
pub mod monitor;
pub mod pgerror;
pub mod pgoutput;
pub mod pgtls;
pub mod portal;
pub mod preflight;
pub mod receiver;
pub mod record;
pub mod retention;
pub mod scheduler;
pub mod schema;
pub mod send_test;
pub mod sign;
pub mod source;
pub mod status;
pub mod store;
pub mod systemd;
pub mod trace;
