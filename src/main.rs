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
    /// Print a new ed25519 key pair for asymmetric (v1a) signing: the whsk_ key goes into
    /// walhook.endpoints.signing_key, the whpk_ key to the receiver.
    Keygen,
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
    if let Command::Keygen = cli.command {
        let (signing, public) = walhook::sign::Ed25519Signer::generate();
        println!("signing_key {signing}");
        println!("public_key  {public}");
        return Ok(());
    }
    if let Command::Demo = cli.command {
        init_logs("warn", LogFormat::Text);
        return runtime.block_on(walhook::demo::run());
    }
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::CheckConfig => {
            println!("configuration is valid");
            Ok(())
        }
        Command::Migrate => {
            init_logs(&config.log.level, config.log.format);
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
            init_logs(&config.log.level, config.log.format);
            runtime.block_on(async {
                let stop = CancellationToken::new();
                let abort = CancellationToken::new();
                tokio::spawn(signals(stop.clone(), abort.clone()));
                walhook::daemon::run(config, stop, abort).await?;
                Ok(())
            })
        }
        Command::Demo | Command::Keygen => unreachable!("handled above"),
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

fn init_logs(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
