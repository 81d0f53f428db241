//! The `walhook` command: parse, load config, build the runtime, call the library, map errors to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use walhook::config::{Config, LogFormat};
use walhook::pgerror::{name_target, Job, Target};

// mimalloc: the relay allocates and frees small buffers per request (headers, bodies, futures); the
// benchmark showed ~19 % of the relay's CPU in the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "walhook",
    version,
    about = "PostgreSQL outbox → signed webhooks, nothing lost"
)]
struct Cli {
    /// Configuration file (TOML); WALHOOK_* environment variables override it.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create or upgrade the walhook schema (idempotent, safe to run concurrently).
    Migrate,
    /// Run the relay until SIGTERM/SIGINT.
    Run,
    /// Self-contained demo: throwaway PostgreSQL, a verifying receiver, sample events, a summary.
    Demo {
        /// Then serve the portal on 127.0.0.1 (with the relay running) and print links to it, until Ctrl-C.
        #[arg(long)]
        portal: bool,
    },
    /// Validate the configuration as `run` does before it connects, and exit (non-zero naming the key and the
    /// fix): `database_url`, the delivery client (`delivery.ca_file`, `delivery.allowed_networks`), binding
    /// `http.listen`.
    CheckConfig {
        /// Also connect and make the start-up checks of `run`: authentication, schema version, privileges,
        /// and what the source needs (wal_level and REPLICATION, or the notify index and trigger).
        #[arg(long)]
        connect: bool,
    },
    /// One-screen summary: slot, lag, retained WAL, backlog, per-endpoint counts of the last hour.
    Status,
    /// After the slot was dropped or invalidated: re-create it and queue the outbox rows without deliveries.
    /// Stop every walhook instance first.
    RecoverSlot {
        /// Only outbox rows created at or after this: an RFC 3339 time or a duration ago ("36h").
        #[arg(long, value_name = "TIME|DURATION")]
        since: Option<String>,
    },
    /// Serve the portal, where your customers manage their own webhooks (the [portal] section), until
    /// SIGTERM/SIGINT. Connects as portal.database_url (else database_url): a role holding only walhook_portal.
    Portal,
    /// Mint a single-use portal link for a tenant's customer (or an operator) and print it on portal.public_url.
    /// Connects as database_url: a walhook_admin role (or a walhook_tenant role, for its own tenant).
    PortalLink {
        /// The tenant whose pages the link opens.
        #[arg(
            long,
            value_name = "TENANT",
            required_unless_present = "operator",
            conflicts_with = "operator"
        )]
        tenant: Option<String>,
        /// How long the link may be used (once), 1m to 7days.
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// An operator's link: every tenant's health, and any tenant's pages (needs walhook_admin).
        #[arg(long)]
        operator: bool,
    },
    /// Print a new ed25519 key pair for asymmetric (v1a) signing: the whsk_ key goes into
    /// walhook.endpoints.signing_key, the whpk_ key to the receiver.
    Keygen,
    /// Measure throughput, latency and cost on this machine (a throwaway PostgreSQL unless --database-url).
    Bench(BenchArgs),
    /// A local receiver for developing one: verifies each request's signature, prints the event, says why a
    /// request fails (401), and can forward verified requests to your app and replay them.
    Listen(ListenArgs),
    /// Queue a walhook.test event to one endpoint (walhook.send_test), signed, sent and recorded by the
    /// running daemon like any delivery.
    SendTest {
        /// The endpoint's id (SELECT id, url FROM walhook.endpoints).
        #[arg(long, value_name = "ID")]
        endpoint: i64,
        /// The event's payload (JSON) [default: a message naming the endpoint].
        #[arg(long, value_name = "JSON", conflicts_with = "event_type")]
        payload: Option<String>,
        /// Send the event catalog's example of this type (in the version the endpoint pinned) instead of a
        /// walhook.test event.
        #[arg(long, value_name = "TYPE")]
        event_type: Option<String>,
        /// Follow the delivery until it succeeds or is dead, printing each attempt (status, latency, error).
        #[arg(long)]
        wait: bool,
    },
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("verify").required(true).args(["secret", "endpoint"])))]
struct ListenArgs {
    /// Port to listen on (0: any free port, printed).
    #[arg(long, value_name = "N", default_value_t = walhook::listen::DEFAULT_PORT)]
    port: u16,
    /// Address to listen on [default: 127.0.0.1]. The listener stays on loopback unless another address is
    /// named here: with e.g. 0.0.0.0 other machines can reach it.
    #[arg(long, value_name = "ADDRESS")]
    host: Option<std::net::IpAddr>,
    /// Verify with this secret (whsec_…, the endpoint's walhook.endpoints.secret).
    #[arg(long, value_name = "SECRET")]
    secret: Option<String>,
    /// Verify with this endpoint's secrets (current and in a rotation's grace period), read with the
    /// configuration's database_url (a role with walhook_admin).
    #[arg(long, value_name = "ID")]
    endpoint: Option<i64>,
    /// Forward each verified request to your app (e.g. http://localhost:3000/webhooks) and answer with its
    /// status; POST /replay/<webhook-id> to the listener forwards one again.
    #[arg(long, value_name = "URL")]
    forward_to: Option<String>,
    /// How many verified requests are kept for replay.
    #[arg(long, value_name = "N", default_value_t = 100)]
    keep: usize,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Server to benchmark on: scratch databases are created there and dropped afterwards (the role needs
    /// CREATEDB and REPLICATION). Without it, a throwaway cluster is started.
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
    /// Also write the figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// A few seconds in all, small sizes, every scenario (for CI: the command keeps working).
    #[arg(long)]
    quick: bool,
    /// Backlog of the drain scenario (fanout uses a tenth of it) [default: 200000, --quick 5000].
    #[arg(long, value_name = "N")]
    events: Option<u64>,
    /// Each timed window, e.g. "10s" [default: 10s, --quick 1.5s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Concurrent writer connections [default: 4].
    #[arg(long, value_name = "K")]
    writers: Option<usize>,
    /// Scenarios to run, comma-separated: baseline, drain, live, fanout, retries, fairness, tenants, slow,
    /// portal, publish [default: all].
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    scenarios: Vec<walhook::bench::Scenario>,
    /// The relays' source: replication (a logical slot) or notify (claims of outbox rows, NOTIFY wake-ups).
    #[arg(long, value_name = "SOURCE", default_value = "replication", value_parser = walhook::bench::parse_source)]
    source: walhook::bench::SourceKind,
    /// Relay processes sharing the database in drain, live, fanout and retries (1 to 16) [default: 1].
    #[arg(long, value_name = "N")]
    instances: Option<usize>,
    /// Run the throwaway cluster with fsync on, as production servers run (the default turns it off: the
    /// disk is not what is measured). The report's top-level `durable` says which it was.
    #[arg(long)]
    durable: bool,
    /// The slow scenario's receivers serve HTTPS, offering HTTP/2 and HTTP/1.1 by ALPN as production
    /// endpoints do (the relay trusts a CA made for the run). `--relay-setting delivery.http2=false` makes
    /// the relay speak HTTP/1.1 to them.
    #[arg(long)]
    tls: bool,
    /// Relay configuration for every scenario, repeatable: --relay-setting delivery.concurrency=1024.
    #[arg(long = "relay-setting", value_name = "KEY=VALUE", value_parser = key_value)]
    relay_settings: Vec<(String, String)>,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE, e.g. delivery.concurrency=1024"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Run | Command::Portal) {
        no_transparent_huge_pages();
    }
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("walhook: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Turns transparent huge pages off for this process (as mimalloc's `MIMALLOC_ALLOW_THP=0` would): the
/// daemon's heap is many small buffers, per connection and per request, spread over mimalloc's per-thread
/// pages, and backing them with 2 MiB pages made its resident memory grow in 2 MiB steps: measured with
/// `walhook bench`, peak RSS in drain 46 → 37 MiB, fan-out 61 → 42 MiB, slow receivers at 2,048 requests in
/// flight 192 → 139 MiB and at 5,000 334–352 → 265 MiB, at the same CPU. Only the long-running commands: `demo` and `bench` start PostgreSQL, which would
/// inherit the setting.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_THP_DISABLE takes plain integers and touches no memory of ours; a kernel
    // without it answers EINVAL, which leaves the default (a cost in memory, not in correctness)
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Command::Keygen = cli.command {
        let (signing, public) = walhook::sign::Ed25519Signer::generate();
        println!("signing_key {signing}");
        println!("public_key  {public}");
        return Ok(());
    }
    if let Command::Demo { portal } = cli.command {
        init_logs("warn", LogFormat::Text, false);
        return runtime.block_on(walhook::demo::run(portal));
    }
    if let Command::Bench(args) = cli.command {
        init_logs("warn", LogFormat::Text, false);
        return bench(&runtime, args);
    }
    if let Command::Listen(args) = cli.command {
        return listen(&runtime, args, cli.config.as_deref());
    }
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::CheckConfig { connect } => runtime.block_on(async {
            walhook::daemon::check_offline(&config).await?;
            // where each connection setting came from (database_url, PG* variables, the password file,
            // libpq's defaults), printed last whatever the outcome
            let db = config.database_url()?;
            for warning in db.warnings() {
                eprintln!("walhook: warning: {warning}");
            }
            let settings = format!(
                "connection settings (and where each comes from):\n{}",
                db.describe()
            );
            if !connect {
                println!("configuration is valid\n{settings}");
                return Ok(());
            }
            let checked = walhook::preflight::check(&config).await;
            if let Ok(passed) = &checked {
                println!("{}", walhook::preflight::summary(&config, passed));
            }
            println!("{settings}");
            match checked {
                Ok(_) => Ok(()),
                Err(problems) => {
                    for problem in &problems {
                        eprintln!("walhook: {problem}");
                    }
                    match problems.len() {
                        1 => anyhow::bail!("this would stop `walhook run`; fix it and check again"),
                        n => anyhow::bail!(
                            "these {n} problems would stop `walhook run`; fix them and check again"
                        ),
                    }
                }
            }
        }),
        Command::Migrate => {
            init_logs(&config.log.level, config.log.format, config.log.payloads);
            runtime.block_on(async {
                let db = config.database_url()?;
                let mut client = walhook::store::connect_client(&db)
                    .await
                    .map_err(|e| anyhow::anyhow!(e.describe_with(Job::Migrate, None)))?;
                let applied = walhook::schema::migrate(&mut client)
                    .await
                    .map_err(|e| anyhow::anyhow!(name_target(&e.to_string(), &db)))?;
                if applied.is_empty() {
                    println!("walhook schema is up to date");
                } else {
                    println!("applied migrations {applied:?}");
                }
                Ok(())
            })
        }
        Command::Run => {
            init_logs(&config.log.level, config.log.format, config.log.payloads);
            runtime.block_on(async {
                let stop = CancellationToken::new();
                let abort = CancellationToken::new();
                tokio::spawn(signals(stop.clone(), abort.clone()));
                walhook::daemon::run(config, stop, abort).await?;
                Ok(())
            })
        }
        Command::Status => {
            init_logs("warn", config.log.format, false);
            runtime.block_on(async {
                let db = config.database_url()?;
                let status = walhook::status::read_for(&db, &config).await.map_err(|e| {
                    anyhow::anyhow!(e.describe_with(Job::Status, Some(&Target::of(&db))))
                })?;
                print!("{}", status.render());
                Ok(())
            })
        }
        Command::RecoverSlot { since } => {
            init_logs(&config.log.level, config.log.format, config.log.payloads);
            let since = since.as_deref().map(parse_since).transpose()?;
            runtime.block_on(async {
                use walhook::source::replication::Recovery;
                let slot = config.replication.slot.clone();
                match walhook::daemon::recover_slot(config, since).await? {
                    Recovery::Healthy => println!("replication slot {slot:?} is healthy: nothing to recover"),
                    Recovery::Recreated { queued } => println!(
                        "replication slot {slot:?} re-created; {queued} deliveries queued for outbox rows \
                         without deliveries; start walhook to send them"
                    ),
                }
                Ok(())
            })
        }
        Command::Portal => {
            init_logs(&config.log.level, config.log.format, config.log.payloads);
            runtime.block_on(async {
                let stop = CancellationToken::new();
                tokio::spawn(signals(stop.clone(), CancellationToken::new()));
                walhook::portal::run(&config, stop).await?;
                Ok(())
            })
        }
        Command::PortalLink {
            tenant,
            ttl,
            operator,
        } => {
            init_logs("warn", config.log.format, false);
            runtime.block_on(async {
                let link =
                    walhook::portal::mint_link(&config, tenant.as_deref(), ttl, operator).await?;
                println!("{link}");
                Ok(())
            })
        }
        Command::SendTest {
            endpoint,
            payload,
            event_type,
            wait,
        } => {
            init_logs("warn", config.log.format, false);
            runtime.block_on(send_test(
                &config,
                endpoint,
                payload.as_deref(),
                event_type.as_deref(),
                wait,
            ))
        }
        Command::Demo { .. } | Command::Keygen | Command::Bench(_) | Command::Listen(_) => {
            unreachable!("handled above")
        }
    }
}

fn bench(runtime: &tokio::runtime::Runtime, args: BenchArgs) -> anyhow::Result<()> {
    let options = walhook::bench::BenchOptions {
        database_url: args.database_url,
        quick: args.quick,
        events: args.events,
        duration: args.duration,
        writers: args.writers,
        scenarios: args.scenarios,
        relay_settings: args.relay_settings,
        source: args.source,
        instances: args.instances,
        durable: args.durable,
        tls: args.tls,
    };
    let report = runtime.block_on(walhook::bench::run(options))?;
    print!("{}", report.table());
    if let Some(path) = args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(&path, json + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `walhook listen`: the configuration is read only for --endpoint (its database_url).
fn listen(
    runtime: &tokio::runtime::Runtime,
    args: ListenArgs,
    config: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use walhook::listen::{Options, Secrets};
    init_logs("warn", LogFormat::Text, false);
    let secrets = match (args.secret, args.endpoint) {
        (Some(secret), _) => Secrets::Given(secret),
        (None, Some(id)) => Secrets::Endpoint {
            id,
            database: Box::new(Config::load(config)?.database_url()?),
        },
        (None, None) => unreachable!("clap requires --secret or --endpoint"),
    };
    let forward_to = args
        .forward_to
        .as_deref()
        .map(walhook::listen::parse_forward_to)
        .transpose()?;
    let options = Options {
        host: args.host,
        port: args.port,
        secrets,
        forward_to,
        keep: args.keep,
    };
    runtime.block_on(async {
        let stop = CancellationToken::new();
        tokio::spawn(signals(stop.clone(), CancellationToken::new()));
        walhook::listen::run(options, stop).await?;
        Ok(())
    })
}

/// `walhook send-test`: queue, then (with --wait) follow the delivery; fails when it ends dead.
async fn send_test(
    config: &Config,
    endpoint: i64,
    payload: Option<&str>,
    event_type: Option<&str>,
    wait: bool,
) -> anyhow::Result<()> {
    use walhook::send_test;
    let db = config.database_url()?;
    let client = send_test::connect(&db).await?;
    let queued = send_test::queue(&client, &db, endpoint, payload, event_type).await?;
    let what = match event_type {
        Some(t) => format!("the catalog's example of {t}"),
        None => "a walhook.test event".to_string(),
    };
    println!(
        "queued delivery {} of {what} (webhook-id {}) to endpoint {endpoint} ({})",
        queued.delivery, queued.webhook_id, queued.endpoint_url
    );
    if !wait {
        println!(
            "the daemon sends it now; follow it with: SELECT status, attempts, last_status_code, last_error \
             FROM walhook.deliveries WHERE id = {};",
            queued.delivery
        );
        return Ok(());
    }
    send_test::wait(&client, &db, queued.delivery, |line| println!("{line}")).await?;
    Ok(())
}

/// First SIGTERM/SIGINT drains, a second one aborts.
async fn signals(stop: CancellationToken, abort: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    for (token, what) in [
        (stop, "draining in-flight deliveries"),
        (abort, "second signal: aborting"),
    ] {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("signal received: {what}");
        token.cancel();
    }
}

/// `--since`: RFC 3339 (`2026-11-29T20:00:00Z`) or a duration ago (`36h`).
fn parse_since(text: &str) -> anyhow::Result<std::time::SystemTime> {
    if let Ok(at) = humantime::parse_rfc3339_weak(text) {
        return Ok(at);
    }
    let ago = humantime::parse_duration(text).with_context(|| {
        format!(
            "--since {text:?}: expected a time like 2026-11-29T20:00:00Z or a duration like 36h"
        )
    })?;
    Ok(std::time::SystemTime::now() - ago)
}

fn init_logs(level: &str, format: LogFormat, payloads: bool) {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| level.to_string());
    let mut filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // tokio-postgres logs statement parameters (payloads) at debug: only with log.payloads, or when named
    let verbose = directives.contains("debug") || directives.contains("trace");
    if !payloads && verbose && !directives.contains("tokio_postgres") {
        filter = filter.add_directive("tokio_postgres=info".parse().expect("a valid directive"));
    }
    // colour only for a person at a terminal: files, pipes and the journal get plain text
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench_args(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        let cli = Cli::try_parse_from(["walhook", "bench"].iter().chain(args))?;
        match cli.command {
            Command::Bench(args) => Ok(args),
            _ => unreachable!("parsed a bench command"),
        }
    }

    #[test]
    fn bench_source_and_instances() {
        let args = bench_args(&[]).unwrap();
        assert_eq!(args.source, walhook::bench::SourceKind::Replication);
        assert_eq!(args.instances, None);
        let args = bench_args(&["--quick", "--source", "notify", "--instances", "2"]).unwrap();
        assert_eq!(args.source, walhook::bench::SourceKind::Notify);
        assert_eq!(args.instances, Some(2));
        let e = bench_args(&["--source", "kafka"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("unknown source \"kafka\""), "{e}");
        assert!(bench_args(&["--instances", "two"]).is_err());
    }
}
