//! The command line: `serve` (the default) and `check-config`.
//!
//! The edge of the program: the only place that prints to the terminal, reads signals and
//! decides the exit code. Everything it runs is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::config::{Config, ConfigError};

/// dispatchd: an observability-first message dispatch runtime.
#[derive(Debug, Parser)]
#[command(name = "dispatchd", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service (the default). With no config file it runs the embedded defaults: HTTP
    /// on 127.0.0.1:9000, every event logged and appended to ./dispatchd-data/messages.jsonl.
    Serve(ServeArgs),
    /// Validate a config file and print every problem with its location; exit 1 when invalid.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Send realistic traffic (successes, slow calls, failures, duplicates, denied commands) so
    /// the dashboards and alerts can be seen working. Without --target it runs dispatchd
    /// in-process, with demonstration dispatchers, on the configured address.
    Simulate(SimulateArgs),
}

#[derive(Debug, Args)]
struct SimulateArgs {
    /// A running dispatchd to send to, such as http://127.0.0.1:9000.
    #[arg(long, value_name = "URL")]
    target: Option<String>,
    /// Messages per second.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// How long to send for, such as 30s or 10m.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: std::time::Duration,
    /// A TOML config file for the in-process dispatchd.
    #[arg(long, env = "DISPATCHD_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// A TOML config file laid over the embedded defaults.
    #[arg(long, env = "DISPATCHD_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

/// Parses the command line and runs it. The binary's whole `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { file }) => check_config(&file),
        Some(Command::Serve(args)) => serve(args),
        Some(Command::Simulate(args)) => simulate(args),
        None => serve(cli.serve),
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match Config::load(Some(file)) {
        Ok(config) => {
            println!(
                "{} is valid: {} dispatchers, {} routes, listening on {}",
                file.display(),
                config.dispatchers.len(),
                config.routes.len(),
                config.server.listen
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            print_config_error(&error);
            ExitCode::FAILURE
        }
    }
}

fn print_config_error(error: &ConfigError) {
    match error {
        ConfigError::Invalid(problems) => {
            eprintln!(
                "error: invalid configuration ({} problems):",
                problems.len()
            );
            for problem in problems {
                eprintln!("  {problem}");
            }
        }
        other => eprintln!("error: {other}"),
    }
}

fn simulate(args: SimulateArgs) -> ExitCode {
    if !(args.rate > 0.0 && args.rate <= 100_000.0) {
        eprintln!("error: --rate must be above 0 and at most 100000 messages a second");
        return ExitCode::FAILURE;
    }
    let config = match Config::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            print_config_error(&error);
            return ExitCode::FAILURE;
        }
    };
    // Every message would be an info line from the log dispatcher; warnings are what matter.
    let filter = if std::env::var_os("DISPATCHD_LOG").is_some() {
        config.log.filter.as_str()
    } else {
        "warn"
    };
    init_logging(filter);
    let options = crate::simulate::Options {
        target: args.target,
        rate: args.rate,
        duration: args.duration,
        progress_every: std::time::Duration::from_secs(5),
    };
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let outcome = runtime.block_on(async {
        let stop = CancellationToken::new();
        tokio::spawn(cancel_on_signal(stop.clone()));
        let (serving, address) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            if let Ok(address) = address.await {
                println!("dispatchd (simulation) serves http://{address} (/metrics, /ready, /api/v1/stats)");
            }
        });
        crate::simulate::run(config, options, stop, Some(serving)).await
    });
    match outcome {
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let config = match Config::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            print_config_error(&error);
            return ExitCode::FAILURE;
        }
    };
    init_logging(&config.log.filter);
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let app = App::builder(config)
        .build()
        .await
        .context("cannot start dispatchd")?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    app.run(shutdown).await
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "Cannot listen for SIGTERM; only SIGINT will stop dispatchd.");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => tracing::info!("Received SIGINT."),
        () = terminate => tracing::info!("Received SIGTERM."),
    }
    shutdown.cancel();
}

/// The multi-threaded runtime every long-running command uses; `None` (reported) if it cannot
/// start.
fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => Some(runtime),
        Err(error) => {
            eprintln!("error: cannot start the tokio runtime: {error}");
            None
        }
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .init();
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn verify_cli() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_is_the_default_and_takes_a_config() {
        let cli = Cli::try_parse_from(["dispatchd", "--config", "x.toml"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(
            cli.serve.config.as_deref(),
            Some(std::path::Path::new("x.toml"))
        );
        let cli = Cli::try_parse_from(["dispatchd", "serve", "--config", "y.toml"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Serve(ServeArgs { config: Some(_) }))
        ));
        let cli = Cli::try_parse_from(["dispatchd", "simulate", "--rate", "5", "--duration", "2s"])
            .unwrap();
        let Some(Command::Simulate(args)) = cli.command else {
            panic!("simulate")
        };
        assert_eq!(
            (args.rate, args.duration),
            (5.0, std::time::Duration::from_secs(2))
        );
        assert!(Cli::try_parse_from(["dispatchd", "simulate", "--duration", "soon"]).is_err());
        let cli = Cli::try_parse_from(["dispatchd", "check-config", "z.toml"]).unwrap();
        assert!(matches!(cli.command, Some(Command::CheckConfig { .. })));
        assert!(Cli::try_parse_from(["dispatchd", "check-config"]).is_err());
    }
}
