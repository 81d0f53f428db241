//! Configuration: built-in defaults < TOML file (`--config`) < `WALHOOK_*` environment variables.
//!
//! figment merges the three layers; serde (with `deny_unknown_fields` everywhere) turns the merged tree into
//! [`Config`], and [`Config::validate`] checks what types cannot say (ranges, names, the connection string).
//! Every error is rewritten into a [`ConfigError`] that names the dotted key (`delivery.timeout`), says
//! which layer set it (file path or environment variable) and what is expected, because a daemon that
//! refuses to start should say exactly which line to fix. The database URL may carry a password, so no
//! message ever repeats it. Durations are humantime strings ("250ms", "5m", "1h30m"); a bare integer
//! means seconds, which also keeps `WALHOOK_DELIVERY__TIMEOUT=15` working (figment reads it as a number).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::{Figment, Metadata, Source};
use serde::{Deserialize, Serialize};

use crate::conninfo::{ConnInfo, Environment};
use crate::dispatch::proxy::{NoProxy, ProxyUrl, PROXY_URL_HINT};

/// Prefix of the environment layer; `__` separates nesting levels (`WALHOOK_DELIVERY__TIMEOUT`).
const ENV_PREFIX: &str = "WALHOOK_";
const ENV_SPLIT: &str = "__";

/// The longest entry of `delivery.retry_schedule`.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30 * 24 * 3600);

/// What every duration error says is expected.
const DURATION_HINT: &str = r#"expected a duration like "30s", "5m" or "1h30m""#;

/// The whole daemon configuration; see `config/walhook.toml` for every key with its default.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// libpq-style URL or `key=value` string; unset, the `PG*` variables and libpq's defaults apply (see
    /// [`crate::conninfo`]). Resolved by [`Config::database_url`].
    #[serde(serialize_with = "redacted_database_url")]
    pub database_url: Option<String>,
    pub source: SourceKind,
    pub replication: ReplicationConfig,
    pub notify: NotifyConfig,
    pub delivery: DeliveryConfig,
    pub record: RecordConfig,
    pub scheduler: SchedulerConfig,
    pub endpoints: EndpointsConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
    pub health: HealthConfig,
    pub shutdown: ShutdownConfig,
    pub retention: RetentionConfig,
    pub portal: PortalConfig,
    /// Set by `walhook demo`: `database_url` names its own throwaway cluster completely, so the `PG*`
    /// variables and the password file, meant for the user's servers, are not read. Not a configuration key.
    #[serde(skip)]
    pub self_contained: bool,
    pub tracing: TracingConfig,
}

/// Where committed outbox rows come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// Logical replication (pgoutput) from a slot: needs `wal_level = logical`.
    #[default]
    Replication,
    /// Polling plus `LISTEN/NOTIFY` wake-ups: works on any server.
    Notify,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicationConfig {
    #[serde(deserialize_with = "string_like")]
    pub slot: String,
    #[serde(deserialize_with = "string_like")]
    pub publication: String,
    #[serde(with = "duration")]
    pub status_interval: Duration,
    /// How often an instance standing by (another one streams the slot) tries to take the slot over.
    #[serde(with = "duration")]
    pub standby_interval: Duration,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            slot: "walhook".into(),
            publication: "walhook".into(),
            status_interval: Duration::from_secs(10),
            standby_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    /// The wait between polls while rows keep coming, while the listener is down, or without the trigger.
    #[serde(with = "duration")]
    pub poll_interval: Duration,
    /// How far an idle poller backs off while notifications can wake it (never below `poll_interval`).
    #[serde(with = "duration")]
    pub max_poll_interval: Duration,
    /// Whether the `outbox_wake` trigger (a `NOTIFY` per inserting statement) exists; `false` drops it.
    pub wake_trigger: bool,
    pub batch_size: usize,
    /// How long a claimed row stays a daemon's without renewal (renewed every third of it while in flight).
    #[serde(with = "duration")]
    pub lease: Duration,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            poll_interval: Duration::from_millis(250),
            max_poll_interval: Duration::from_secs(5),
            wake_trigger: true,
            batch_size: 500,
            lease: Duration::from_secs(30),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    #[serde(with = "duration")]
    pub timeout: Duration,
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Delays between attempts: attempts = 1 + len.
    #[serde(with = "duration_list")]
    pub retry_schedule: Vec<Duration>,
    /// Each delay is scaled by a random factor in `[1 - jitter, 1 + jitter]`.
    pub retry_jitter: f64,
    #[serde(with = "duration")]
    pub throttled_min_backoff: Duration,
    pub allow_private_networks: bool,
    /// CIDR networks (`10.0.0.0/8`) reachable even when private networks are refused.
    #[serde(deserialize_with = "string_list")]
    pub allowed_networks: Vec<String>,
    /// Global limit on HTTP requests in flight.
    pub concurrency: usize,
    /// Events held in memory before the source is paused.
    pub max_in_flight_events: usize,
    pub max_in_flight_per_endpoint: usize,
    /// Requests in flight to all of one tenant's endpoints together (`None`: a quarter of `concurrency`), so
    /// one tenant's slow or hanging endpoints never hold every request slot.
    pub max_in_flight_per_tenant: Option<usize>,
    /// Longest a delivery waits in memory for room at its endpoint before it is parked in the database.
    #[serde(with = "duration")]
    pub queue_wait: Duration,
    pub response_excerpt_bytes: usize,
    #[serde(with = "duration")]
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    #[serde(deserialize_with = "string_like")]
    pub user_agent: String,
    /// Refuse plain `http://` endpoints.
    pub https_only: bool,
    /// Offer HTTP/2 to `https://` endpoints (ALPN): one connection carries many requests to an endpoint that
    /// accepts it; the others answer HTTP/1.1 as before.
    pub http2: bool,
    /// Which certificate authorities HTTPS endpoints are verified against (verification is always on).
    pub tls_roots: TlsRoots,
    /// A PEM file of extra CA certificates to trust (for example a private CA); empty for none.
    #[serde(deserialize_with = "string_like")]
    pub ca_file: String,
    /// Egress proxy for deliveries, `http://[user:password@]host:port`; empty for none. May hold a password.
    #[serde(deserialize_with = "string_like", serialize_with = "redacted_proxy")]
    pub proxy: String,
    /// Hosts reached directly although `proxy` is set: domains (with their subdomains), addresses, networks,
    /// or `*`.
    #[serde(deserialize_with = "string_list")]
    pub no_proxy: Vec<String>,
    /// Consecutive failed attempts (timeouts, connection errors, 5xx, 408, 429) that open an endpoint's breaker
    /// (provided nearly all recent attempts failed, retries included).
    pub breaker_threshold: u32,
    /// How long an open breaker refuses requests before a round of probes; doubles per failed round.
    #[serde(with = "duration")]
    pub breaker_cooldown: Duration,
    #[serde(with = "duration")]
    pub breaker_max_cooldown: Duration,
    /// An endpoint failing continuously for this long is disabled ("0s" never disables).
    #[serde(with = "duration")]
    pub disable_after: Duration,
}

impl DeliveryConfig {
    /// `max_in_flight_per_tenant`, or a quarter of `concurrency` when unset.
    pub fn max_in_flight_per_tenant(&self) -> usize {
        self.max_in_flight_per_tenant
            .unwrap_or(self.concurrency / 4)
            .max(1)
    }

    /// `delivery.proxy`, parsed; `None` when empty. The error never repeats the URL (it may hold a password).
    pub fn proxy(&self) -> Result<Option<ProxyUrl>, ConfigError> {
        if self.proxy.trim().is_empty() {
            return Ok(None);
        }
        ProxyUrl::parse(self.proxy.trim()).map(Some).map_err(|e| {
            invalid(
                "delivery.proxy",
                format!("invalid proxy URL: {e}; {PROXY_URL_HINT}, or \"\" for none"),
            )
        })
    }

    /// `delivery.no_proxy`, parsed.
    pub fn no_proxy(&self) -> Result<NoProxy, ConfigError> {
        NoProxy::parse(&self.no_proxy).map_err(|message| invalid("delivery.no_proxy", message))
    }
}

/// Trusted roots for HTTPS deliveries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsRoots {
    /// The operating system's store (falls back to the bundled roots if it is empty).
    #[default]
    System,
    /// The Mozilla roots compiled into walhook.
    Bundled,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        let (min, hour) = (60, 3600);
        DeliveryConfig {
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            retry_schedule: [
                5,
                5 * min,
                30 * min,
                2 * hour,
                5 * hour,
                10 * hour,
                10 * hour,
            ]
            .into_iter()
            .map(Duration::from_secs)
            .collect(),
            retry_jitter: 0.2,
            throttled_min_backoff: Duration::from_secs(60),
            allow_private_networks: false,
            allowed_networks: Vec::new(),
            concurrency: 2048,
            max_in_flight_events: 5_000,
            max_in_flight_per_endpoint: 32,
            max_in_flight_per_tenant: None,
            queue_wait: Duration::from_secs(1),
            response_excerpt_bytes: 1024,
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 256,
            user_agent: concat!("walhook/", env!("CARGO_PKG_VERSION")).into(),
            https_only: false,
            http2: true,
            tls_roots: TlsRoots::System,
            ca_file: String::new(),
            proxy: String::new(),
            no_proxy: Vec::new(),
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(30),
            breaker_max_cooldown: Duration::from_secs(600),
            disable_after: Duration::from_secs(5 * 86400),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecordConfig {
    pub batch_size: usize,
    #[serde(with = "duration")]
    pub flush_interval: Duration,
}

impl Default for RecordConfig {
    fn default() -> Self {
        RecordConfig {
            batch_size: 1000,
            flush_interval: Duration::from_millis(5),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    #[serde(with = "duration")]
    pub poll_interval: Duration,
    pub batch_size: usize,
    #[serde(with = "duration")]
    pub lease: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            poll_interval: Duration::from_millis(500),
            batch_size: 500,
            lease: Duration::from_secs(5 * 60),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointsConfig {
    #[serde(with = "duration")]
    pub refresh_interval: Duration,
}

impl Default for EndpointsConfig {
    fn default() -> Self {
        EndpointsConfig {
            refresh_interval: Duration::from_millis(250),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Metrics and health listener; `None` ("" or "off") disables it.
    #[serde(with = "listen")]
    pub listen: Option<SocketAddr>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 9187))),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// How often the slot position, retained WAL and backlog are sampled from PostgreSQL.
    #[serde(with = "duration")]
    pub interval: Duration,
    /// `/readyz` fails while the oldest unconfirmed transaction is older than this.
    #[serde(with = "duration")]
    pub max_lag: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_secs(5),
            max_lag: Duration::from_secs(5 * 60),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Longest wait, after SIGTERM/SIGINT, for in-flight attempts to finish and be recorded.
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_timeout: Duration::from_secs(40),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    pub enabled: bool,
    /// Succeeded deliveries (and their attempts) are deleted this long after their last update.
    #[serde(with = "duration")]
    pub succeeded: Duration,
    /// Dead deliveries (and their attempts) likewise.
    #[serde(with = "duration")]
    pub dead: Duration,
    /// Outbox rows older than this whose deliveries are all final (or that have none).
    #[serde(with = "duration")]
    pub outbox: Duration,
    /// Pause between cleanup passes.
    #[serde(with = "duration")]
    pub interval: Duration,
    /// Rows deleted per statement (each its own short transaction).
    pub batch_size: usize,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        let day = 24 * 3600;
        RetentionConfig {
            enabled: true,
            succeeded: Duration::from_secs(7 * day),
            dead: Duration::from_secs(30 * day),
            outbox: Duration::from_secs(7 * day),
            interval: Duration::from_secs(60),
            batch_size: 1000,
        }
    }
}

/// Export of one span per delivery attempt over OTLP/HTTP; off while `otlp_endpoint` is empty.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector's OTLP/HTTP URL (`/v1/traces` is appended unless present); empty: nothing is exported.
    #[serde(deserialize_with = "string_like")]
    pub otlp_endpoint: String,
    /// Headers on every export request (an API key of a hosted backend); never logged.
    #[serde(serialize_with = "redacted_headers")]
    pub otlp_headers: std::collections::BTreeMap<String, String>,
    /// Bound on one export request, retries included.
    #[serde(with = "duration")]
    pub otlp_timeout: Duration,
    /// `service.name` of the exported spans.
    #[serde(deserialize_with = "string_like")]
    pub service_name: String,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: String::new(),
            otlp_headers: Default::default(),
            otlp_timeout: Duration::from_secs(10),
            service_name: "walhook".into(),
        }
    }
}

impl TracingConfig {
    /// The exporter's settings; `None` when nothing is exported.
    pub fn settings(&self) -> Option<crate::trace::TraceSettings> {
        (!self.otlp_endpoint.is_empty()).then(|| crate::trace::TraceSettings {
            otlp_endpoint: self.otlp_endpoint.clone(),
            otlp_headers: self.otlp_headers.clone(),
            otlp_timeout: self.otlp_timeout,
            service_name: self.service_name.clone(),
        })
    }
}

/// `walhook portal`: the customer-facing pages (see [`crate::portal`] and docs/portal.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PortalConfig {
    /// Where the portal's HTTP server listens.
    #[serde(with = "socket_addr")]
    pub listen: SocketAddr,
    /// The URL browsers use to reach the portal (`https://hooks.example.com`); links are built on it and
    /// cookies are `Secure` when it is https. Empty: `http://` + `listen`.
    #[serde(deserialize_with = "string_like")]
    pub public_url: String,
    /// The portal's own connection settings (a role holding only walhook_portal); unset: `database_url`.
    #[serde(serialize_with = "redacted_database_url")]
    pub database_url: Option<String>,
    /// The CSP `frame-ancestors` sources that may embed the portal: `'none'`, or e.g. `https://app.example.com`.
    #[serde(deserialize_with = "string_like")]
    pub frame_ancestors: String,
    #[serde(deserialize_with = "string_like")]
    pub brand_name: String,
    /// `#rrggbb`.
    #[serde(deserialize_with = "string_like")]
    pub brand_color: String,
    /// An https:// URL or a path on the portal's host; empty for none.
    #[serde(deserialize_with = "string_like")]
    pub logo_url: String,
    /// How long a session opened by a link lasts (1 minute to 7 days).
    #[serde(with = "duration")]
    pub session_ttl: Duration,
    /// Database connections the portal keeps (each request holds one for its transaction).
    pub connections: usize,
}

impl Default for PortalConfig {
    fn default() -> Self {
        PortalConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8090)),
            public_url: String::new(),
            database_url: None,
            frame_ancestors: "'none'".into(),
            brand_name: "Webhooks".into(),
            brand_color: "#2563eb".into(),
            logo_url: String::new(),
            session_ttl: Duration::from_secs(8 * 3600),
            connections: 8,
        }
    }
}

impl PortalConfig {
    /// `public_url` without its trailing slash, or `http://` + `listen` when it is empty.
    pub fn public_url(&self) -> String {
        match self.public_url.trim() {
            "" => format!("http://{}", self.listen),
            url => url.trim_end_matches('/').to_string(),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.database_url {
            crate::conninfo::check_syntax(url).map_err(|e| {
                let mut e = setting_error(e);
                if let ConfigError::InvalidValue { key, .. } = &mut e {
                    if key == "database_url" {
                        *key = "portal.database_url".into();
                    }
                }
                e
            })?;
        }
        check_public_url(&self.public_url)
            .map_err(|message| invalid("portal.public_url", message))?;
        check_frame_ancestors(&self.frame_ancestors)
            .map_err(|message| invalid("portal.frame_ancestors", message))?;
        let name = self.brand_name.trim();
        if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
            return Err(invalid(
                "portal.brand_name",
                "expected 1 to 100 printable characters, like \"Acme webhooks\"",
            ));
        }
        let color = self.brand_color.as_bytes();
        if color.len() != 7 || color[0] != b'#' || !color[1..].iter().all(u8::is_ascii_hexdigit) {
            let message = format!(
                "invalid colour {:?}; expected #rrggbb, like \"#2563eb\"",
                self.brand_color
            );
            return Err(invalid("portal.brand_color", message));
        }
        check_logo_url(&self.logo_url).map_err(|message| invalid("portal.logo_url", message))?;
        if self.session_ttl < Duration::from_secs(60)
            || self.session_ttl > Duration::from_secs(7 * 86400)
        {
            return Err(invalid(
                "portal.session_ttl",
                "expected 1m to 7days (walhook.portal_exchange refuses anything else)",
            ));
        }
        if !(1..=100).contains(&self.connections) {
            let message = format!("{} is out of range; expected 1 to 100", self.connections);
            return Err(invalid("portal.connections", message));
        }
        Ok(())
    }
}

/// An `http(s)://host[:port][/path]` URL without credentials, query or fragment.
fn check_public_url(url: &str) -> Result<(), String> {
    let url = url.trim();
    if url.is_empty() {
        return Ok(());
    }
    let expected = "expected the URL browsers use to reach the portal, like \"https://hooks.example.com\", or \"\" for http:// + portal.listen";
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("{url:?} is not an http:// or https:// URL; {expected}"))?;
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() {
        return Err(format!("{url:?} names no host; {expected}"));
    }
    if authority.contains('@') {
        return Err(format!("{url:?} holds credentials; {expected}"));
    }
    if url.contains(['?', '#'])
        || url
            .bytes()
            .any(|b| b <= b' ' || b >= 0x7f || b == b'"' || b == b'<' || b == b'>')
    {
        return Err(format!(
            "{url:?} has a query, a fragment or a character that needs escaping; {expected}"
        ));
    }
    Ok(())
}

/// CSP `frame-ancestors` sources: `'none'` alone, or `'self'` and scheme or host sources.
fn check_frame_ancestors(value: &str) -> Result<(), String> {
    let expected = "expected 'none' (no embedding), 'self', or the origins of the pages that embed the portal separated by spaces, like \"https://app.example.com\"";
    let sources: Vec<&str> = value.split_ascii_whitespace().collect();
    if sources.is_empty() {
        return Err(format!("is empty; {expected}"));
    }
    for source in &sources {
        let ok = match *source {
            "'none'" => sources.len() == 1,
            "'self'" => true,
            s => {
                !s.starts_with('\'')
                    && s.bytes().all(|b| {
                        b.is_ascii_graphic()
                            && !matches!(b, b';' | b',' | b'"' | b'<' | b'>' | b'\\')
                    })
            }
        };
        if !ok {
            return Err(format!(
                "invalid source {source:?} in {value:?}; {expected}"
            ));
        }
    }
    Ok(())
}

/// An `https://` URL or a path (`/logo.svg`) on the portal's host.
fn check_logo_url(url: &str) -> Result<(), String> {
    if url.is_empty() {
        return Ok(());
    }
    let https = url
        .strip_prefix("https://")
        .is_some_and(|rest| !rest.is_empty());
    let path = url.starts_with('/') && !url.starts_with("//");
    let clean = !url
        .bytes()
        .any(|b| b <= b' ' || b >= 0x7f || b == b'"' || b == b'<' || b == b'>' || b == b'\\');
    match (https || path) && clean {
        true => Ok(()),
        false => Err(format!(
            "invalid logo URL {url:?}; expected an https:// URL or a path on the portal's host like \"/logo.svg\" (the portal's CSP loads images from nowhere else), or \"\" for none"
        )),
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` EnvFilter directive such as `info` or `walhook=debug,info`.
    pub level: String,
    pub format: LogFormat,
    /// Log each attempt's payload at debug level (off: payloads may hold personal data).
    pub payloads: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
            payloads: false,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Why the configuration could not be loaded. Every message names the key or file to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {} does not exist; check the --config path", path.display())]
    FileNotFound { path: PathBuf },
    /// TOML syntax or I/O error; `origin` is e.g. "config file /etc/walhook.toml".
    #[error("cannot read {origin}: {message}")]
    Unreadable { origin: String, message: String },
    /// `known` lists the keys accepted where the unknown one was found.
    #[error("unknown key {key}{} ({known})", .origin.as_ref().map(|o| format!(" {o}")).unwrap_or_default())]
    UnknownKey {
        key: String,
        known: String,
        origin: Option<String>,
    },
    /// `origin` is the layer that set the value; `None` for built-in defaults or when validated alone.
    #[error("{key}: {message}{}", origin_suffix(.origin))]
    InvalidValue {
        key: String,
        message: String,
        origin: Option<String>,
    },
}

fn origin_suffix(origin: &Option<String>) -> String {
    origin
        .as_ref()
        .map(|o| format!(" ({o})"))
        .unwrap_or_default()
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::InvalidValue {
        key: key.into(),
        message: message.into(),
        origin: None,
    }
}

impl Config {
    /// The three layers, lowest first. Callers may `.merge()` more (the demo and tests do).
    pub fn figment(path: Option<&Path>) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = path {
            // `file_exact`: `Toml::file` would search parent directories for a relative path.
            figment = figment.merge(Toml::file_exact(path));
        }
        figment.merge(Env::prefixed(ENV_PREFIX).split(ENV_SPLIT))
    }

    /// Extracts and validates; errors are attributed to the layer that set the offending key.
    pub fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment.extract().map_err(|e| translate(&figment, e))?;
        config.validate().map_err(|e| match e {
            ConfigError::InvalidValue {
                key,
                message,
                origin: None,
            } => {
                let origin = figment
                    .find_metadata(&key)
                    .and_then(|md| describe_origin(md, &key));
                ConfigError::InvalidValue {
                    key,
                    message,
                    origin,
                }
            }
            other => other,
        })?;
        Ok(config)
    }

    /// Defaults, then the file at `path` (which must exist), then the environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        if let Some(path) = path {
            if !path.exists() {
                return Err(ConfigError::FileNotFound {
                    path: path.to_owned(),
                });
            }
        }
        Config::from_figment(Config::figment(path))
    }

    /// Checks what the types cannot: ranges, names, syntax. `database_url` is checked alone here; the
    /// environment and the files it names are read by [`Config::database_url`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.database_url {
            crate::conninfo::check_syntax(url).map_err(setting_error)?;
        }
        let r = &self.replication;
        check_pg_name("replication.slot", &r.slot)?;
        check_pg_name("replication.publication", &r.publication)?;
        positive("replication.status_interval", r.status_interval)?;
        positive("replication.standby_interval", r.standby_interval)?;
        positive("notify.poll_interval", self.notify.poll_interval)?;
        positive("notify.max_poll_interval", self.notify.max_poll_interval)?;
        at_least_one("notify.batch_size", self.notify.batch_size)?;
        if self.notify.lease < Duration::from_secs(1) {
            return Err(invalid("notify.lease", "must be at least 1s"));
        }

        let d = &self.delivery;
        positive("delivery.timeout", d.timeout)?;
        positive("delivery.connect_timeout", d.connect_timeout)?;
        if d.retry_schedule.len() > 100 {
            let n = d.retry_schedule.len();
            return Err(invalid(
                "delivery.retry_schedule",
                format!("{n} entries; at most 100 are allowed"),
            ));
        }
        if let Some(i) = d.retry_schedule.iter().position(|delay| delay.is_zero()) {
            let message = format!(
                "entry {} is 0s; every retry delay must be greater than zero",
                i + 1
            );
            return Err(invalid("delivery.retry_schedule", message));
        }
        // a longer delay is a mistake ("300d" for "300s") and would not fit a timestamp after years of retries
        if let Some(i) = d
            .retry_schedule
            .iter()
            .position(|delay| *delay > MAX_RETRY_DELAY)
        {
            let message = format!(
                "entry {} is longer than 30 days, the most a retry delay may be",
                i + 1
            );
            return Err(invalid("delivery.retry_schedule", message));
        }
        // `!(..)` rather than a range check so that NaN is refused too.
        if !(d.retry_jitter >= 0.0 && d.retry_jitter < 1.0) {
            let message = format!(
                "{} is out of range; expected a number from 0 up to (not including) 1",
                d.retry_jitter
            );
            return Err(invalid("delivery.retry_jitter", message));
        }
        for network in &d.allowed_networks {
            check_network(network)
                .map_err(|message| invalid("delivery.allowed_networks", message))?;
        }
        at_least_one("delivery.concurrency", d.concurrency)?;
        at_least_one("delivery.max_in_flight_events", d.max_in_flight_events)?;
        at_least_one(
            "delivery.max_in_flight_per_endpoint",
            d.max_in_flight_per_endpoint,
        )?;
        if let Some(n) = d.max_in_flight_per_tenant {
            at_least_one("delivery.max_in_flight_per_tenant", n)?;
        }
        if d.response_excerpt_bytes > 1 << 20 {
            return Err(invalid(
                "delivery.response_excerpt_bytes",
                "expected at most 1048576 (1 MiB)",
            ));
        }
        if d.breaker_threshold == 0 {
            return Err(invalid("delivery.breaker_threshold", "expected at least 1"));
        }
        positive("delivery.breaker_cooldown", d.breaker_cooldown)?;
        if d.breaker_max_cooldown < d.breaker_cooldown {
            return Err(invalid(
                "delivery.breaker_max_cooldown",
                "must be at least delivery.breaker_cooldown",
            ));
        }
        if d.user_agent.is_empty() || http::HeaderValue::from_str(&d.user_agent).is_err() {
            let message = "expected a non-empty header value of visible ASCII characters";
            return Err(invalid("delivery.user_agent", message));
        }
        d.proxy()?;
        d.no_proxy()?;

        if !(1..=10_000).contains(&self.record.batch_size) {
            let message = format!(
                "{} is out of range; expected 1 to 10000",
                self.record.batch_size
            );
            return Err(invalid("record.batch_size", message));
        }
        positive("scheduler.poll_interval", self.scheduler.poll_interval)?;
        at_least_one("scheduler.batch_size", self.scheduler.batch_size)?;
        positive("scheduler.lease", self.scheduler.lease)?;
        positive(
            "endpoints.refresh_interval",
            self.endpoints.refresh_interval,
        )?;
        positive("health.interval", self.health.interval)?;
        positive("health.max_lag", self.health.max_lag)?;
        positive("shutdown.drain_timeout", self.shutdown.drain_timeout)?;
        let r = &self.retention;
        positive("retention.succeeded", r.succeeded)?;
        positive("retention.dead", r.dead)?;
        positive("retention.outbox", r.outbox)?;
        positive("retention.interval", r.interval)?;
        if !(1..=100_000).contains(&r.batch_size) {
            let message = format!("{} is out of range; expected 1 to 100000", r.batch_size);
            return Err(invalid("retention.batch_size", message));
        }
        // An outbox row that outlived its succeeded deliveries would look undelivered to `recover-slot`.
        if r.outbox > r.succeeded {
            let message = format!(
                "{} is longer than retention.succeeded ({}); outbox rows must not outlive their \
                 deliveries' records",
                humantime::format_duration(r.outbox),
                humantime::format_duration(r.succeeded)
            );
            return Err(invalid("retention.outbox", message));
        }
        let t = &self.tracing;
        if !t.otlp_endpoint.is_empty() {
            crate::trace::traces_url(&t.otlp_endpoint)
                .map_err(|message| invalid("tracing.otlp_endpoint", message))?;
        }
        for (name, value) in &t.otlp_headers {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                let message = format!("{name:?} is not a header name; use letters, digits and -");
                return Err(invalid("tracing.otlp_headers", message));
            }
            if http::HeaderValue::from_str(value).is_err() {
                // the value may be a secret: never repeat it
                let message =
                    format!("the value of {name:?} is not one line of visible ASCII characters");
                return Err(invalid("tracing.otlp_headers", message));
            }
        }
        positive("tracing.otlp_timeout", t.otlp_timeout)?;
        if t.service_name.trim().is_empty() {
            return Err(invalid("tracing.service_name", "must not be empty"));
        }
        self.portal.validate()?;
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            let level = &self.log.level;
            let message = format!(
                "invalid filter {level:?} ({e}); expected a level like \"info\" or \"walhook=debug,info\""
            );
            return Err(invalid("log.level", message));
        }
        Ok(())
    }

    /// The connection settings as libpq would read them: `database_url` (which may be unset), then the `PG*`
    /// environment variables, libpq's defaults and the password file. What the password file lookup had to
    /// say is logged (and kept in [`ConnInfo::warnings`] for `check-config`).
    pub fn database_url(&self) -> Result<ConnInfo, ConfigError> {
        let env = match self.self_contained {
            true => Environment::default(),
            false => Environment::process(),
        };
        let info = ConnInfo::resolve(self.database_url.as_deref(), &env).map_err(setting_error)?;
        for warning in info.warnings() {
            tracing::warn!("{warning}");
        }
        Ok(info)
    }
}

impl Config {
    /// The portal's connection settings: `portal.database_url`, else `database_url`, with the `PG*` variables
    /// and libpq's defaults as for [`Config::database_url`].
    pub fn portal_database_url(&self) -> Result<ConnInfo, ConfigError> {
        let Some(url) = &self.portal.database_url else {
            return self.database_url();
        };
        let env = match self.self_contained {
            true => Environment::default(),
            false => Environment::process(),
        };
        let info = ConnInfo::resolve(Some(url.as_str()), &env).map_err(|e| {
            let mut e = setting_error(e);
            if let ConfigError::InvalidValue { key, .. } = &mut e {
                if key == "database_url" {
                    *key = "portal.database_url".into();
                }
            }
            e
        })?;
        for warning in info.warnings() {
            tracing::warn!("{warning}");
        }
        Ok(info)
    }
}

fn positive(key: &str, value: Duration) -> Result<(), ConfigError> {
    match value.is_zero() {
        true => Err(invalid(key, "must be greater than zero")),
        false => Ok(()),
    }
}

fn at_least_one(key: &str, value: usize) -> Result<(), ConfigError> {
    match value {
        0 => Err(invalid(key, "must be at least 1")),
        _ => Ok(()),
    }
}

/// Slot and publication names end up in SQL and in `pg_replication_slots`: keep to what needs no quoting.
fn check_pg_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    match ok {
        true => Ok(()),
        false => Err(invalid(
            key,
            format!(
                "invalid name {name:?}; expected 1 to 63 lowercase letters, digits or underscores"
            ),
        )),
    }
}

/// Syntax of one `delivery.allowed_networks` entry: an address with a prefix length and no host bits.
fn check_network(network: &str) -> Result<(), String> {
    let expected =
        r#"expected a network like "10.0.0.0/8" or "fd00::/8" (use /32 or /128 for one address)"#;
    let (addr, prefix) = network
        .split_once('/')
        .ok_or_else(|| format!("invalid network {network:?}; {expected}"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("invalid network {network:?}; {expected}"))?;
    let prefix: u32 = prefix
        .parse()
        .map_err(|_| format!("invalid network {network:?}; {expected}"))?;
    let (bits, width) = match addr {
        IpAddr::V4(a) => (u32::from(a) as u128, 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    };
    if prefix > width {
        return Err(format!(
            "invalid network {network:?}: the prefix length is at most {width}"
        ));
    }
    // Host bits set usually means a typo ("10.1.0.0/8"); say what was probably meant.
    let host_mask = if prefix == width {
        0
    } else {
        (1u128 << (width - prefix)) - 1
    };
    if bits & host_mask != 0 {
        let network_addr = match addr {
            IpAddr::V4(_) => IpAddr::from(Ipv4Addr::from((bits & !host_mask) as u32)),
            IpAddr::V6(_) => IpAddr::from(std::net::Ipv6Addr::from(bits & !host_mask)),
        };
        return Err(format!(
            "invalid network {network:?}: address bits are set past the prefix; \
             did you mean \"{network_addr}/{prefix}\"?"
        ));
    }
    Ok(())
}

/// A connection setting's error as a configuration error: the key is `database_url` or the `PG*` variable.
fn setting_error(e: crate::conninfo::SettingError) -> ConfigError {
    ConfigError::InvalidValue {
        key: e.key,
        message: e.message,
        origin: None,
    }
}

/// Rewrites figment's first error into a [`ConfigError`] with a dotted key and the layer that set it.
fn translate(figment: &Figment, error: figment::Error) -> ConfigError {
    use figment::error::Kind;

    let error = error
        .into_iter()
        .next()
        .expect("a figment error holds at least one error");
    let metadata = |key: &str| figment.find_metadata(key).or(error.metadata.as_ref());
    // Provider failures (TOML syntax, unreadable file) carry no path.
    if error.path.is_empty() {
        if let Kind::Message(message) = &error.kind {
            if let Some(Source::File(path)) =
                error.metadata.as_ref().and_then(|md| md.source.as_ref())
            {
                if !path.exists() {
                    return ConfigError::FileNotFound { path: path.clone() };
                }
                let origin = format!("config file {}", path.display());
                return ConfigError::Unreadable {
                    origin,
                    message: strip_toml_snippet(message),
                };
            }
        }
    }
    let key = dotted(&error.path);
    match &error.kind {
        Kind::UnknownField(_, known) => {
            // figment's path ends with the unknown key itself; the list is that of its table.
            let known = match key.rsplit_once('.') {
                Some((table, _)) => format!("known keys in [{table}]: {}", known.join(", ")),
                None => format!("known top-level keys: {}", known.join(", ")),
            };
            let origin = metadata(&key).and_then(|md| describe_origin(md, &key));
            ConfigError::UnknownKey { key, known, origin }
        }
        kind => {
            let origin = metadata(&key).and_then(|md| describe_origin(md, &key));
            let key = if key.is_empty() {
                "configuration".into()
            } else {
                key
            };
            ConfigError::InvalidValue {
                key,
                message: describe_kind(kind),
                origin,
            }
        }
    }
}

/// `["delivery", "retry_schedule", "2"]` → `delivery.retry_schedule[2]`.
fn dotted(path: &[String]) -> String {
    let mut key = String::new();
    for part in path {
        if part.bytes().all(|b| b.is_ascii_digit()) && !key.is_empty() {
            key.push_str(&format!("[{part}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(part);
        }
    }
    key
}

/// "in config file /etc/walhook.toml", "from environment variable WALHOOK_DELIVERY__TIMEOUT"; `None` for
/// the built-in defaults.
fn describe_origin(metadata: &Metadata, key: &str) -> Option<String> {
    match &metadata.source {
        Some(Source::File(path)) => Some(format!("in config file {}", path.display())),
        _ if metadata.name.contains("environment") => {
            // The variable's name is rebuilt from the key: list indices are not part of it.
            let table_path = key.split('[').next().unwrap_or(key);
            let var = table_path
                .split('.')
                .collect::<Vec<_>>()
                .join(ENV_SPLIT)
                .to_ascii_uppercase();
            Some(format!("from environment variable {ENV_PREFIX}{var}"))
        }
        _ if metadata.name == std::any::type_name::<Config>() => None,
        Some(Source::Code(location)) => Some(format!(
            "set in code at {}:{}",
            location.file(),
            location.line()
        )),
        // Tuples merged by callers name only their Rust type: saying nothing is clearer.
        _ => None,
    }
}

/// figment/serde error kinds in the words of this file: no Rust type names.
fn describe_kind(kind: &figment::error::Kind) -> String {
    use figment::error::Kind;

    fn expected(e: &str) -> String {
        match e {
            "usize" | "u64" | "u32" | "u16" | "u8" => "a non-negative integer".into(),
            "f64" | "f32" => "a number".into(),
            "a string" | "a boolean" => e.into(),
            _ if e.starts_with("struct ") => "a table of keys".into(),
            _ => e.into(),
        }
    }
    match kind {
        Kind::Message(message) => message.clone(),
        Kind::InvalidType(actual, e) => format!("expected {}, found {actual}", expected(e)),
        Kind::InvalidValue(actual, e) => {
            format!("invalid value {actual}; expected {}", expected(e))
        }
        Kind::UnknownVariant(found, valid) => {
            let valid: Vec<String> = valid.iter().map(|v| format!("{v:?}")).collect();
            format!(
                "invalid value {found:?}; expected one of {}",
                valid.join(", ")
            )
        }
        Kind::DuplicateField(field) => format!("key {field} is given twice"),
        other => other.to_string(),
    }
}

/// toml's errors quote the offending line, which could hold the database password; keep the
/// position line and the explanation, drop the quoted source (`  |`, `3 | ...`, `  |   ^`).
fn strip_toml_snippet(message: &str) -> String {
    message
        .lines()
        .filter(|line| {
            let rest = line
                .trim_start()
                .trim_start_matches(|c: char| c.is_ascii_digit())
                .trim_start();
            !rest.starts_with('|') && !line.trim().is_empty()
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Header values of `tracing.otlp_headers` may be API keys: serialised as `"<redacted>"`.
fn redacted_headers<S: serde::Serializer>(
    headers: &std::collections::BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(headers.len()))?;
    for name in headers.keys() {
        map.serialize_entry(name, "<redacted>")?;
    }
    map.end()
}

/// For `--print`-style dumps: a URL with a password (or one that cannot be checked) is not shown.
fn redacted_database_url<S: serde::Serializer>(
    url: &Option<String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match url {
        None => s.serialize_none(),
        Some(url) => match crate::conninfo::has_password(url) {
            Ok(false) => s.serialize_some(url),
            _ => s.serialize_some("(set; not shown because it may contain a password)"),
        },
    }
}

/// `delivery.proxy` for dumps: shown only when it carries no credentials.
fn redacted_proxy<S: serde::Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    match ProxyUrl::parse(url.trim()) {
        _ if url.trim().is_empty() => s.serialize_str(url),
        Ok(parsed) if parsed.authorization().is_none() => s.serialize_str(url),
        _ => s.serialize_str("(set; not shown because it may contain a password)"),
    }
}

/// Strings that figment's environment parser may have read as numbers or booleans (`SLOT=123`).
fn string_like<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct Visitor;
    impl serde::de::Visitor<'_> for Visitor {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_u64<E>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_bool<E>(self, v: bool) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(Visitor)
}

/// A list of strings, or one comma-separated string (handy in the environment).
fn string_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(r#"a list of strings like ["10.0.0.0/8"] or a comma-separated string"#)
        }
        fn visit_str<E>(self, v: &str) -> Result<Vec<String>, E> {
            Ok(split_list(v).map(str::to_owned).collect())
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Vec<String>, A::Error> {
            let mut out = Vec::new();
            while let Some(item) = seq.next_element::<String>()? {
                out.push(item);
            }
            Ok(out)
        }
    }
    d.deserialize_any(Visitor)
}

/// Comma-separated items, trimmed; an empty or blank string is an empty list.
fn split_list(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|item| !item.is_empty())
}

/// Parses one duration: humantime text, or whole seconds as an integer or digit string.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse()
            .map(Duration::from_secs)
            .map_err(|_| format!("duration {text} is too large"));
    }
    humantime::parse_duration(text)
        .map_err(|_| format!("invalid duration {text:?}; {DURATION_HINT}"))
}

/// Visitor shared by single durations and list items.
struct DurationVisitor;

impl serde::de::Visitor<'_> for DurationVisitor {
    type Value = Duration;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(r#"a duration like "30s", "5m" or "1h30m""#)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Duration, E> {
        parse_duration(v).map_err(E::custom)
    }
    fn visit_u64<E>(self, v: u64) -> Result<Duration, E> {
        Ok(Duration::from_secs(v))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Duration, E> {
        u64::try_from(v)
            .map(Duration::from_secs)
            .map_err(|_| E::custom(format!("invalid duration {v}; {DURATION_HINT}")))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Duration, E> {
        // Bare numbers are whole seconds; a fraction is more readable with a unit.
        Err(E::custom(format!(
            "invalid duration {v}; {DURATION_HINT} (bare numbers are whole seconds; write \"1500ms\" for 1.5s)"
        )))
    }
}

/// `#[serde(with = "duration")]`: humantime text in and out.
mod duration {
    use super::*;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurationVisitor)
    }
}

/// `#[serde(with = "duration_list")]`: a list of durations, one duration, or "1s, 2s".
mod duration_list {
    use super::*;

    struct Item(Duration);

    impl<'de> Deserialize<'de> for Item {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Item, D::Error> {
            d.deserialize_any(DurationVisitor).map(Item)
        }
    }

    pub fn serialize<S: serde::Serializer>(list: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(
            list.iter()
                .map(|d| humantime::format_duration(*d).to_string()),
        )
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Vec<Duration>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a list of durations like ["5s", "5m", "1h"]"#)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vec<Duration>, E> {
                split_list(v)
                    .enumerate()
                    .map(|(i, item)| {
                        parse_duration(item).map_err(|e| E::custom(format!("entry {}: {e}", i + 1)))
                    })
                    .collect()
            }
            fn visit_u64<E>(self, v: u64) -> Result<Vec<Duration>, E> {
                Ok(vec![Duration::from_secs(v)])
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Vec<Duration>, E> {
                DurationVisitor.visit_i64(v).map(|d| vec![d])
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Vec<Duration>, A::Error> {
                let mut out = Vec::new();
                while let Some(Item(d)) = seq.next_element()? {
                    out.push(d);
                }
                Ok(out)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `#[serde(with = "listen")]`: "ip:port", or "" / "off" for none.
mod socket_addr {
    use super::*;

    pub fn serialize<S: serde::Serializer>(addr: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(addr)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        let text = String::deserialize(d)?;
        text.trim().parse().map_err(|_| {
            serde::de::Error::custom(format!(
                "invalid listen address {text:?}; expected an IP address and port like \"127.0.0.1:8090\" \
                 or \"[::1]:8090\""
            ))
        })
    }
}

mod listen {
    use super::*;

    pub fn serialize<S: serde::Serializer>(
        addr: &Option<SocketAddr>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match addr {
            Some(addr) => s.collect_str(addr),
            None => s.serialize_str("off"),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        match text.trim() {
            "" | "off" => Ok(None),
            addr => addr.parse().map(Some).map_err(|_| {
                serde::de::Error::custom(format!(
                    "invalid listen address {addr:?}; expected an IP address and port \
                     like \"127.0.0.1:9187\" or \"[::1]:9187\", or \"off\""
                ))
            }),
        }
    }
}

#[cfg(test)]
// `Jail` closures must return figment's (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    fn example_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/walhook.toml")
    }

    /// Loads with only the file `walhook.toml` in the jail (if written) and the jail's environment.
    fn load_in(jail: &Jail, file: Option<&str>) -> Result<Config, ConfigError> {
        let path = jail.directory().join("walhook.toml");
        if let Some(contents) = file {
            jail.create_file(&path, contents).expect("jail file");
        }
        Config::load(file.map(|_| path.as_path()))
    }

    fn err_in(jail: &Jail, file: Option<&str>) -> String {
        load_in(jail, file)
            .expect_err("configuration should be refused")
            .to_string()
    }

    #[test]
    fn defaults() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let config = load_in(jail, None).expect("defaults load");
            assert_eq!(config, Config::default());
            assert_eq!(config.source, SourceKind::Replication);
            assert_eq!(config.delivery.timeout, Duration::from_secs(30));
            assert_eq!(config.delivery.retry_schedule.len(), 7);
            assert_eq!(config.delivery.retry_schedule[3], Duration::from_secs(7200));
            assert_eq!(config.record.flush_interval, Duration::from_millis(5));
            assert_eq!(config.http.listen, Some("127.0.0.1:9187".parse().unwrap()));
            assert!(config.delivery.user_agent.starts_with("walhook/"));
            // no database_url and no PG* variables: libpq's defaults, as psql (the local socket)
            let db = config.database_url().expect("libpq's defaults");
            assert!(matches!(
                db.get_hosts(),
                [tokio_postgres::config::Host::Unix(_)]
            ));
            Ok(())
        });
    }

    #[test]
    fn toml_overrides_defaults() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let config = load_in(
                jail,
                Some(
                    r#"
                    database_url = "postgres://walhook@127.0.0.1:5432/app"
                    source = "notify"
                    [delivery]
                    timeout = "15s"
                    connect_timeout = 3
                    retry_schedule = ["1s", "250ms", "1h30m"]
                    allowed_networks = ["10.0.0.0/8", "fd00::/8"]
                    [http]
                    listen = "[::1]:9000"
                    [log]
                    format = "json"
                    "#,
                ),
            )
            .expect("file loads");
            assert_eq!(config.source, SourceKind::Notify);
            assert_eq!(config.delivery.timeout, Duration::from_secs(15));
            assert_eq!(config.delivery.connect_timeout, Duration::from_secs(3));
            let schedule = [
                Duration::from_secs(1),
                Duration::from_millis(250),
                Duration::from_secs(5400),
            ];
            assert_eq!(config.delivery.retry_schedule, schedule);
            assert_eq!(config.delivery.allowed_networks, ["10.0.0.0/8", "fd00::/8"]);
            assert_eq!(config.http.listen, Some("[::1]:9000".parse().unwrap()));
            assert_eq!(config.log.format, LogFormat::Json);
            assert_eq!(
                config.scheduler,
                SchedulerConfig::default(),
                "untouched sections keep defaults"
            );
            let pg = config.database_url().expect("valid url");
            assert_eq!(pg.get_user(), Some("walhook"));
            assert_eq!(pg.get_dbname(), Some("app"));
            Ok(())
        });
    }

    #[test]
    fn env_overrides_toml() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("WALHOOK_DELIVERY__TIMEOUT", "15s");
            jail.set_env(
                "WALHOOK_DATABASE_URL",
                "host=127.0.0.1 user=walhook dbname=env",
            );
            jail.set_env("WALHOOK_SOURCE", "notify");
            let config = load_in(
                jail,
                Some(
                    r#"
                    database_url = "postgres://walhook@127.0.0.1/file"
                    source = "replication"
                    [delivery]
                    timeout = "1m"
                    concurrency = 8
                    "#,
                ),
            )
            .expect("loads");
            assert_eq!(config.delivery.timeout, Duration::from_secs(15));
            assert_eq!(
                config.delivery.concurrency, 8,
                "keys the environment leaves alone come from the file"
            );
            assert_eq!(config.source, SourceKind::Notify);
            assert_eq!(config.database_url().unwrap().get_dbname(), Some("env"));
            Ok(())
        });
    }

    #[test]
    fn env_nested_keys_and_lists() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env(
                "WALHOOK_DATABASE_URL",
                "postgres://u:secret@127.0.0.1/db?sslmode=disable",
            );
            jail.set_env("WALHOOK_DELIVERY__RETRY_SCHEDULE", r#"["1s","2s"]"#);
            jail.set_env(
                "WALHOOK_DELIVERY__ALLOWED_NETWORKS",
                "10.0.0.0/8, 192.168.0.0/16",
            );
            jail.set_env("WALHOOK_DELIVERY__RETRY_JITTER", "0");
            jail.set_env("WALHOOK_DELIVERY__ALLOW_PRIVATE_NETWORKS", "true");
            jail.set_env("WALHOOK_DELIVERY__CONNECT_TIMEOUT", "7");
            jail.set_env("WALHOOK_REPLICATION__SLOT", "123");
            jail.set_env("WALHOOK_RECORD__BATCH_SIZE", "50");
            jail.set_env("WALHOOK_HTTP__LISTEN", "off");
            jail.set_env("WALHOOK_LOG__LEVEL", "walhook=debug,info");
            let config = load_in(jail, None).expect("loads");
            assert_eq!(
                config.database_url().unwrap().get_password(),
                Some(&b"secret"[..])
            );
            assert_eq!(
                config.delivery.retry_schedule,
                [Duration::from_secs(1), Duration::from_secs(2)]
            );
            assert_eq!(
                config.delivery.allowed_networks,
                ["10.0.0.0/8", "192.168.0.0/16"]
            );
            assert_eq!(config.delivery.retry_jitter, 0.0);
            assert!(config.delivery.allow_private_networks);
            assert_eq!(config.delivery.connect_timeout, Duration::from_secs(7));
            assert_eq!(config.replication.slot, "123");
            assert_eq!(config.record.batch_size, 50);
            assert_eq!(config.http.listen, None);
            assert_eq!(config.log.level, "walhook=debug,info");

            jail.set_env("WALHOOK_DELIVERY__RETRY_SCHEDULE", "1s, 2m");
            let config = load_in(jail, None).expect("comma-separated schedule loads");
            assert_eq!(
                config.delivery.retry_schedule,
                [Duration::from_secs(1), Duration::from_secs(120)]
            );
            jail.set_env("WALHOOK_DELIVERY__RETRY_SCHEDULE", "");
            let config = load_in(jail, None).expect("empty schedule loads");
            assert!(
                config.delivery.retry_schedule.is_empty(),
                "no retries: one attempt"
            );
            Ok(())
        });
    }

    #[test]
    fn code_overrides_merge_last() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("WALHOOK_DELIVERY__TIMEOUT", "15s");
            let figment = Config::figment(None)
                .merge(("delivery.timeout", "2s"))
                .merge(("database_url", "postgres://demo@127.0.0.1:1/demo"));
            let config = Config::from_figment(figment).expect("loads");
            assert_eq!(config.delivery.timeout, Duration::from_secs(2));
            assert!(config.database_url().is_ok());
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_named() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let e = err_in(jail, Some("[delivery]\ntimout = \"5s\"\n"));
            assert!(
                e.starts_with("unknown key delivery.timout in config file "),
                "{e}"
            );
            assert!(e.contains("walhook.toml"), "{e}");
            assert!(
                e.contains("known keys in [delivery]: timeout, connect_timeout, retry_schedule"),
                "{e}"
            );

            let e = err_in(jail, Some("databse_url = \"x\"\n"));
            assert!(e.starts_with("unknown key databse_url "), "{e}");
            assert!(
                e.contains("known top-level keys: database_url, source,"),
                "{e}"
            );

            jail.set_env("WALHOOK_DELIVERY__TIMOUT", "5s");
            let e = err_in(jail, None);
            assert!(e.starts_with("unknown key delivery.timout from environment variable WALHOOK_DELIVERY__TIMOUT (known keys in [delivery]: "), "{e}");
            Ok(())
        });
    }

    #[test]
    fn bad_durations_are_named() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let e = err_in(jail, Some("[delivery]\ntimeout = \"15 parsecs\"\n"));
            assert!(
                e.starts_with(r#"delivery.timeout: invalid duration "15 parsecs"; expected a duration like "30s", "5m" or "1h30m" (in config file "#),
                "{e}"
            );
            let e = err_in(
                jail,
                Some("[delivery]\nretry_schedule = [\"1s\", \"soon\"]\n"),
            );
            assert!(
                e.starts_with(r#"delivery.retry_schedule[1]: invalid duration "soon""#),
                "{e}"
            );
            let e = err_in(jail, Some("[scheduler]\nlease = -5\n"));
            assert!(e.starts_with("scheduler.lease: invalid duration -5"), "{e}");
            let e = err_in(jail, Some("[scheduler]\nlease = 1.5\n"));
            assert!(e.contains("whole seconds"), "{e}");
            let e = err_in(jail, Some("[scheduler]\nlease = \"0s\"\n"));
            assert!(
                e.starts_with("scheduler.lease: must be greater than zero"),
                "{e}"
            );
            let e = err_in(jail, Some("[notify]\nlease = \"500ms\"\n"));
            assert!(e.starts_with("notify.lease: must be at least 1s"), "{e}");

            jail.set_env("WALHOOK_DELIVERY__TIMEOUT", "15 parsecs");
            let e = err_in(jail, None);
            assert!(e.starts_with("delivery.timeout: invalid duration"), "{e}");
            assert!(
                e.ends_with("(from environment variable WALHOOK_DELIVERY__TIMEOUT)"),
                "{e}"
            );
            Ok(())
        });
    }

    #[test]
    fn bad_source_lists_valid_values() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let e = err_in(jail, Some("source = \"kafka\"\n"));
            assert!(
                e.starts_with(
                    r#"source: invalid value "kafka"; expected one of "replication", "notify""#
                ),
                "{e}"
            );
            jail.set_env("WALHOOK_LOG__FORMAT", "xml");
            let e = err_in(jail, None);
            assert!(
                e.starts_with(r#"log.format: invalid value "xml"; expected one of "text", "json""#),
                "{e}"
            );
            Ok(())
        });
    }

    #[test]
    fn out_of_range_values_are_named() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let e = err_in(jail, Some("[delivery]\nretry_jitter = 1.5\n"));
            assert!(
                e.starts_with("delivery.retry_jitter: 1.5 is out of range"),
                "{e}"
            );
            assert!(e.contains("in config file"), "{e}");
            jail.set_env("WALHOOK_DELIVERY__RETRY_JITTER", "1");
            let e = err_in(jail, None);
            assert!(
                e.starts_with("delivery.retry_jitter: 1 is out of range"),
                "{e}"
            );
            assert!(
                e.ends_with("(from environment variable WALHOOK_DELIVERY__RETRY_JITTER)"),
                "{e}"
            );
            jail.clear_env();

            let cases = [
                ("[record]\nbatch_size = 0", "record.batch_size: 0 is out of range; expected 1 to 10000"),
                ("[record]\nbatch_size = 10001", "record.batch_size: 10001 is out of range"),
                ("[delivery]\nconcurrency = 0", "delivery.concurrency: must be at least 1"),
                ("[delivery]\nconcurrency = -1", "delivery.concurrency: invalid value signed int `-1`; expected a non-negative integer"),
                ("[delivery]\nconcurrency = \"lots\"", "delivery.concurrency: expected a non-negative integer, found string \"lots\""),
                ("[delivery]\nretry_schedule = [\"1s\", \"0s\"]", "delivery.retry_schedule: entry 2 is 0s"),
                ("[delivery]\nretry_schedule = [\"1s\", \"31days\"]", "delivery.retry_schedule: entry 2 is longer than 30 days, the most a retry delay may be"),
                ("[delivery]\nallowed_networks = [\"10.1.0.0/8\"]", "delivery.allowed_networks: invalid network \"10.1.0.0/8\": address bits are set past the prefix; did you mean \"10.0.0.0/8\"?"),
                ("[delivery]\nallowed_networks = [\"10.0.0.1\"]", "delivery.allowed_networks: invalid network \"10.0.0.1\"; expected"),
                ("[delivery]\nallowed_networks = [\"::/129\"]", "delivery.allowed_networks: invalid network \"::/129\": the prefix length is at most 128"),
                ("[delivery]\nuser_agent = \"\"", "delivery.user_agent: expected a non-empty header value"),
                ("[replication]\nslot = \"Walhook\"", "replication.slot: invalid name \"Walhook\""),
                ("[replication]\npublication = \"\"", "replication.publication: invalid name \"\""),
                ("[http]\nlisten = \"localhost:80\"", "http.listen: invalid listen address \"localhost:80\""),
                ("[log]\nlevel = \"walhook=loud\"", "log.level: invalid filter \"walhook=loud\""),
                ("delivery = 5", "delivery: expected a table of keys, found signed int `5`"),
                ("[shutdown]\ndrain_timeout = \"0s\"", "shutdown.drain_timeout: must be greater than zero"),
                ("[health]\nmax_lag = \"0s\"", "health.max_lag: must be greater than zero"),
                ("[retention]\nbatch_size = 0", "retention.batch_size: 0 is out of range; expected 1 to 100000"),
                ("[retention]\noutbox = \"30days\"", "retention.outbox: 30days is longer than retention.succeeded (7days)"),
                ("[retention]\ndead = \"forever\"", "retention.dead: invalid duration \"forever\""),
            ];
            for (file, want) in cases {
                let e = err_in(jail, Some(file));
                assert!(e.starts_with(want), "{file:?}: got {e:?}, want {want:?}");
            }
            let many = format!(
                "[delivery]\nretry_schedule = [{}]",
                vec!["\"1s\""; 101].join(",")
            );
            assert!(err_in(jail, Some(&many))
                .starts_with("delivery.retry_schedule: 101 entries; at most 100"));
            Ok(())
        });
    }

    #[test]
    fn database_url_errors_never_show_the_password() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let e = err_in(jail, Some("database_url = \"\""));
            assert!(
                e.starts_with("database_url: is empty; expected a URL like"),
                "{e}"
            );

            let secret = "hunter2";
            let cases = [
                format!("postgres://u:{secret}@127.0.0.1:notaport/db"),
                format!("host=127.0.0.1 user=u password={secret} sslmode=sometimes"),
                format!("host=127.0.0.1 user=u password='{secret}"),
                format!("host=127.0.0.1 password={secret} user"),
                format!("postgres://u:{secret}@127.0.0.1/db?sslmode=sometimes"),
                format!("postgres://u:{secret}@127.0.0.1/db?colour=blue"),
                format!("postgres://u:{secret}@127.0.0.1/db?sslrootcert=system&sslmode=require"),
            ];
            for url in &cases {
                jail.set_env("WALHOOK_DATABASE_URL", url);
                let e = err_in(jail, None);
                assert!(e.starts_with("database_url: "), "{url}: {e}");
                assert!(!e.contains(secret), "{url}: password shown in {e}");
                assert!(!e.contains("but got"), "{url}: {e}");
            }
            // A TOML syntax error on the database_url line must not quote the line.
            let e = err_in(
                jail,
                Some(&format!(
                    "database_url = \"postgres://u:{secret}@h/db\nsource = 1"
                )),
            );
            assert!(e.starts_with("cannot read config file "), "{e}");
            assert!(!e.contains(secret), "{e}");
            Ok(())
        });
    }

    #[test]
    fn proxy_settings_load_and_bad_ones_name_the_key_without_the_password() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let config = load_in(
                jail,
                Some(
                    "[delivery]\nproxy = \"http://walhook:s3cret@proxy.internal:3128\"\n\
                     no_proxy = [\"internal.example.com\", \"10.0.0.0/8\"]\n",
                ),
            )
            .expect("loads");
            let proxy = config.delivery.proxy().unwrap().expect("a proxy is set");
            assert_eq!(proxy.address(), "proxy.internal:3128");
            assert!(proxy.authorization().is_some());
            assert!(config
                .delivery
                .no_proxy()
                .unwrap()
                .matches("a.internal.example.com"));
            assert_eq!(Config::default().delivery.proxy().unwrap(), None);

            let secret = "s3cret";
            let cases = [
                ("http://walhook:s3cret@proxy.internal", "it names no port"),
                (
                    "https://walhook:s3cret@proxy.internal:3128",
                    "its scheme is \"https\"",
                ),
                ("walhook:s3cret@proxy.internal:3128", "it has no scheme"),
                (
                    "http://walhook:s3cret@proxy.internal:3128/path",
                    "it has a path",
                ),
                (
                    "http://walhook:s3 cret@proxy.internal:3128",
                    "its user name or password has a character",
                ),
            ];
            for (url, why) in cases {
                let e = err_in(jail, Some(&format!("[delivery]\nproxy = \"{url}\"\n")));
                assert!(
                    e.starts_with(&format!("delivery.proxy: invalid proxy URL: {why}")),
                    "{url}: {e}"
                );
                assert!(e.contains(PROXY_URL_HINT), "{url}: {e}");
                assert!(e.contains("in config file"), "{url}: {e}");
                assert!(!e.contains(secret), "{url}: password shown in {e}");
            }
            jail.set_env(
                "WALHOOK_DELIVERY__PROXY",
                "http://walhook:s3cret@proxy.internal",
            );
            let e = err_in(jail, None);
            assert!(
                e.starts_with("delivery.proxy: invalid proxy URL: it names no port"),
                "{e}"
            );
            assert!(
                e.ends_with("(from environment variable WALHOOK_DELIVERY__PROXY)"),
                "{e}"
            );
            assert!(!e.contains(secret), "{e}");
            jail.set_env(
                "WALHOOK_DELIVERY__PROXY",
                "http://walhook:s3cret@127.0.0.1:3128",
            );
            jail.set_env(
                "WALHOOK_DELIVERY__NO_PROXY",
                "localhost, .example.com, 10.0.0.1/8",
            );
            let e = err_in(jail, None);
            assert!(
                e.starts_with("delivery.no_proxy: entry \"10.0.0.1/8\": "),
                "{e}"
            );
            assert!(
                e.ends_with("(from environment variable WALHOOK_DELIVERY__NO_PROXY)"),
                "{e}"
            );
            jail.set_env("WALHOOK_DELIVERY__NO_PROXY", "localhost:8080");
            assert!(err_in(jail, None)
                .starts_with("delivery.no_proxy: entry \"localhost:8080\" is not a host name"));
            Ok(())
        });
    }

    #[test]
    fn tracing_keys_are_checked_and_header_values_never_shown() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            assert_eq!(
                Config::load(None).unwrap().tracing.settings().map(|_| ()),
                None
            );
            let cases = [
                (
                    "[tracing]\notlp_endpoint = \"collector:4318\"",
                    "tracing.otlp_endpoint: expected an http:// or https:// URL",
                ),
                (
                    "[tracing]\notlp_endpoint = \"http://u:pw@collector:4318\"",
                    "tracing.otlp_endpoint: holds credentials; put them in tracing.otlp_headers",
                ),
                (
                    "[tracing]\notlp_timeout = \"0s\"",
                    "tracing.otlp_timeout: must be greater than zero",
                ),
                (
                    "[tracing]\nservice_name = \" \"",
                    "tracing.service_name: must not be empty",
                ),
                (
                    "[tracing]\notlp_headers = { \"x key\" = \"v\" }",
                    "tracing.otlp_headers: \"x key\" is not a header name",
                ),
                (
                    "[tracing]\nendpoint = \"http://c:4318\"",
                    "unknown key tracing.endpoint",
                ),
            ];
            for (file, want) in cases {
                let e = err_in(jail, Some(file));
                assert!(e.starts_with(want), "{file:?}: got {e:?}, want {want:?}");
            }
            let e = err_in(
                jail,
                Some("[tracing]\notlp_headers = { \"x-api-key\" = \"hunter2\\n\" }"),
            );
            assert!(
                e.starts_with("tracing.otlp_headers: the value of \"x-api-key\""),
                "{e}"
            );
            assert!(!e.contains("hunter2"), "{e}");

            jail.set_env("WALHOOK_TRACING__OTLP_ENDPOINT", "http://127.0.0.1:4318");
            jail.set_env("WALHOOK_TRACING__OTLP_HEADERS__X_API_KEY", "hunter2");
            let config = Config::load(None).unwrap();
            let settings = config
                .tracing
                .settings()
                .expect("on once the endpoint is set");
            assert_eq!(settings.otlp_endpoint, "http://127.0.0.1:4318");
            assert_eq!(settings.otlp_headers["x_api_key"], "hunter2");
            assert!(!serde_json::to_string(&config).unwrap().contains("hunter2"));
            Ok(())
        });
    }

    #[test]
    fn portal_keys_are_checked_and_name_the_key() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let config = load_in(jail, None).unwrap();
            assert_eq!(config.portal.public_url(), "http://127.0.0.1:8090");
            let cases = [
                (
                    "[portal]\nlisten = \"localhost\"",
                    "portal.listen: invalid listen address",
                ),
                (
                    "[portal]\npublic_url = \"hooks.example.com\"",
                    "portal.public_url: \"hooks.example.com\" is not an http:// or https:// URL",
                ),
                (
                    "[portal]\npublic_url = \"https://u:p@hooks.example.com\"",
                    "portal.public_url: \"https://u:p@hooks.example.com\" holds credentials",
                ),
                (
                    "[portal]\npublic_url = \"https://hooks.example.com/?a=1\"",
                    "portal.public_url: \"https://hooks.example.com/?a=1\" has a query",
                ),
                (
                    "[portal]\nframe_ancestors = \"\"",
                    "portal.frame_ancestors: is empty; expected 'none'",
                ),
                (
                    "[portal]\nframe_ancestors = \"'none' https://a.example\"",
                    "portal.frame_ancestors: invalid source \"'none'\"",
                ),
                (
                    "[portal]\nframe_ancestors = \"https://a.example; script-src *\"",
                    "portal.frame_ancestors: invalid source \"https://a.example;\"",
                ),
                (
                    "[portal]\nbrand_color = \"blue\"",
                    "portal.brand_color: invalid colour \"blue\"; expected #rrggbb",
                ),
                (
                    "[portal]\nbrand_name = \" \"",
                    "portal.brand_name: expected 1 to 100 printable characters",
                ),
                (
                    "[portal]\nlogo_url = \"http://cdn.example/logo.png\"",
                    "portal.logo_url: invalid logo URL",
                ),
                (
                    "[portal]\nlogo_url = \"//cdn.example/logo.png\"",
                    "portal.logo_url: invalid logo URL",
                ),
                (
                    "[portal]\nsession_ttl = \"30s\"",
                    "portal.session_ttl: expected 1m to 7days",
                ),
                (
                    "[portal]\nconnections = 0",
                    "portal.connections: 0 is out of range; expected 1 to 100",
                ),
                (
                    "[portal]\ndatabase_url = \"postgres://u:hunter2@h:x/db\"",
                    "portal.database_url: ",
                ),
            ];
            for (file, want) in cases {
                let e = err_in(jail, Some(file));
                assert!(e.starts_with(want), "{file:?}: got {e:?}, want {want:?}");
                assert!(!e.contains("hunter2"), "{e}");
            }
            let config = load_in(
                jail,
                Some(
                    "[portal]\npublic_url = \"https://app.example.com/webhooks/\"\n\
                     frame_ancestors = \"'self' https://app.example.com\"\nlogo_url = \"/logo.svg\"\n\
                     brand_color = \"#0A0b0c\"\n",
                ),
            )
            .unwrap();
            assert_eq!(
                config.portal.public_url(),
                "https://app.example.com/webhooks"
            );
            jail.set_env("WALHOOK_PORTAL__BRAND_COLOR", "red");
            let e = err_in(jail, None);
            assert!(
                e.ends_with("(from environment variable WALHOOK_PORTAL__BRAND_COLOR)"),
                "{e}"
            );
            Ok(())
        });
    }

    #[test]
    fn print_redacts_proxy_passwords() {
        let mut config = Config::default();
        let shown = |c: &Config| serde_json::to_string(c).unwrap();
        config.delivery.proxy = "http://proxy.internal:3128".into();
        assert!(shown(&config).contains(r#""proxy":"http://proxy.internal:3128""#));
        config.delivery.proxy = "http://walhook:s3cret@proxy.internal:3128".into();
        assert!(!shown(&config).contains("s3cret"));
        // one that does not parse could hold a password anywhere
        config.delivery.proxy = "http://walhook:s3cret@proxy.internal".into();
        assert!(!shown(&config).contains("s3cret"));
    }

    #[test]
    fn print_redacts_passwords() {
        let mut config = Config::default();
        let shown = |c: &Config| serde_json::to_string(c).unwrap();
        config.database_url = Some("postgres://walhook@127.0.0.1/db".into());
        assert!(shown(&config).contains("postgres://walhook@127.0.0.1/db"));
        config.database_url = Some("postgres://walhook:hunter2@127.0.0.1/db".into());
        assert!(!shown(&config).contains("hunter2"));
        let json = shown(&Config::default());
        assert!(json.contains(r#""timeout":"30s""#), "{json}");
        assert!(
            json.contains(r#""retry_schedule":["5s","5m","30m","2h","5h","10h","10h"]"#),
            "{json}"
        );
    }

    #[test]
    fn http_listen_can_be_disabled() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            assert_eq!(
                load_in(jail, Some("[http]\nlisten = \"off\""))
                    .unwrap()
                    .http
                    .listen,
                None
            );
            assert_eq!(
                load_in(jail, Some("[http]\nlisten = \"\""))
                    .unwrap()
                    .http
                    .listen,
                None
            );
            jail.set_env("WALHOOK_HTTP__LISTEN", "");
            assert_eq!(load_in(jail, None).unwrap().http.listen, None);
            Ok(())
        });
    }

    #[test]
    fn missing_or_broken_file_is_named() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let path = jail.directory().join("nope.toml");
            let e = Config::load(Some(&path)).unwrap_err();
            assert!(matches!(e, ConfigError::FileNotFound { .. }));
            assert!(e.to_string().contains("nope.toml"), "{e}");
            // Through figment() + from_figment() the same error comes back.
            let e = Config::from_figment(Config::figment(Some(&path))).unwrap_err();
            assert!(matches!(e, ConfigError::FileNotFound { .. }), "{e}");

            let e = err_in(jail, Some("[delivery\ntimeout = 1"));
            assert!(e.starts_with("cannot read config file "), "{e}");
            assert!(e.contains("line 1"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn example_file_loads_and_matches_defaults() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let config = Config::from_figment(Config::figment(Some(&example_path())))
                .expect("example loads");
            // database_url is left to the environment (it carries the password), as the README's systemd
            // section says
            assert_eq!(config, Config::default());
            let text = std::fs::read_to_string(example_path()).unwrap();
            let example = text
                .lines()
                .find_map(|l| l.strip_prefix("# database_url = "))
                .expect("the example shows database_url, commented out");
            let url = example.trim_matches('"');
            let with_url = Config::from_figment(
                Config::figment(Some(&example_path())).merge(("database_url", url)),
            )
            .expect("the commented-out database_url is valid");
            assert!(with_url.database_url().is_ok());
            Ok(())
        });
    }

    #[test]
    fn example_file_names_every_key() {
        let text = std::fs::read_to_string(example_path()).expect("example file");
        let tree: figment::value::Dict = Figment::from(Serialized::defaults(Config::default()))
            .extract()
            .expect("defaults serialize");
        for (section, value) in &tree {
            let keys: Vec<String> = match value.as_dict() {
                Some(dict) => {
                    assert!(
                        text.contains(&format!("[{section}]")),
                        "example lacks [{section}]"
                    );
                    dict.keys().cloned().collect()
                }
                None => vec![section.clone()],
            };
            for key in keys {
                let line = format!("\n{key} = ");
                let commented = format!("\n# {key} = ");
                assert!(
                    text.contains(&line) || text.contains(&commented),
                    "example lacks {section}.{key}"
                );
            }
        }
    }
}
