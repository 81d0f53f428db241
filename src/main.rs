//! The `walhook` command: parse, load config, build the runtime, call the library, map errors to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use walhook::config::{Config, LogFormat};

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
    Demo,
    /// Validate the configuration and exit (non-zero with the offending key).
    CheckConfig,
    /// One-screen summary: slot, lag, retained WAL, backlog, per-endpoint counts of the last hour.
    Status,
    /// After the slot was dropped or invalidated: re-create it and queue the outbox rows without deliveries.
    /// Stop every walhook instance first.
    RecoverSlot {
        /// Only outbox rows created at or after this: an RFC 3339 time or a duration ago ("36h").
        #[arg(long, value_name = "TIME|DURATION")]
        since: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("walhook: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Command::Demo = cli.command {
        init_logs("warn", LogFormat::Text, false);
        return runtime.block_on(walhook::demo::run());
    }
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::CheckConfig => {
            println!("configuration is valid");
            Ok(())
        }
        Command::Migrate => {
            init_logs(&config.log.level, config.log.format, config.log.payloads);
            runtime.block_on(async {
                let db = config.database_url()?;
                let mut client = walhook::store::connect_client(&db)
                    .await
                    .context("connecting to postgres")?;
                let applied = walhook::schema::migrate(&mut client).await?;
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
                let status = walhook::status::read(&db, &config.replication.slot).await?;
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
        Command::Demo => unreachable!("handled above"),
    }
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
    if !payloads && !directives.contains("tokio_postgres") {
        filter = filter.add_directive("tokio_postgres=info".parse().expect("a valid directive"));
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
