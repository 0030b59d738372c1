//! The command line: `serve` (the default), `check-config`, `sink`, `republish`, `requeue`, `simulate`,
//! `loadtest`, `top`, and for packaging `completions`, `man` and `health`.
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
#[command(name = "dispatchd", version)]
pub struct Cli {
    /// A TOML config file laid over the embedded defaults (before or after the subcommand).
    #[arg(long, global = true, env = "DISPATCHD_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Write the log as JSON lines (with trace and span ids inside a dispatch) instead of text.
    #[arg(long, global = true, value_parser = ["text", "json"])]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service (the default). With no config file it runs the embedded defaults: HTTP
    /// on 127.0.0.1:9000, every event logged and appended to ./dispatchd-data/messages.jsonl.
    Serve,
    /// Validate a config file and print every problem with its location; exit 1 when invalid.
    CheckConfig {
        /// The TOML file to check (default: --config, or DISPATCHD_CONFIG; with neither, the
        /// embedded defaults and the environment are checked).
        file: Option<PathBuf>,
    },
    /// Print the configuration `serve` would run with (the embedded defaults, the file and the
    /// environment merged) as TOML, every secret masked; exit 1 when it is invalid.
    Config,
    /// Run only the event-forwarding service: read dispatch events from a Redis stream as a member
    /// of a consumer group and forward them to one sink (or replay a dead-letter file). With
    /// --config and no --service (or a --name of the file's), the sink is that [[sinks]] element
    /// and the bus the file's [bus]. What neither a flag nor the file says comes from the
    /// embedded defaults, as for serve: [defaults.sinks] and [bus] (`dispatchd config` without a
    /// config file prints them).
    Sink(Box<SinkArgs>),
    /// Put the events of a dead-letter file (the bus's after a Redis outage, or a sink's) back on
    /// the Redis events stream, so every sink's consumer group receives them. The file is moved
    /// aside first (to <name>.republished.jsonl, or -2, -3 … when taken); events Redis refuses
    /// again go back to FILE. Safe while serve runs: its next dead letters go to a new FILE.
    Republish(RepublishArgs),
    /// Move the entries a [[sources]] consumer kept aside in <STREAM>:unreadable (messages its
    /// version could not read) back onto STREAM, oldest first, each one this version reads; the
    /// others stay. Run it with the version that will consume them, after an upgrade. Safe while
    /// serve runs, and to run twice: each entry is moved once.
    Requeue(RequeueArgs),
    /// Send realistic traffic (successes, slow calls, failures, duplicates, denied commands) so
    /// the dashboards and alerts can be seen working. Without --target it runs dispatchd
    /// in-process, with demonstration dispatchers, on the configured address.
    Simulate(SimulateArgs),
    /// Post messages to a running dispatchd at fixed rates (open loop), and print throughput,
    /// latency percentiles, errors and, with --pid, its resident memory, per step.
    Loadtest(LoadtestArgs),
    /// Print a shell completion script: `dispatchd completions bash > /etc/bash_completion.d/dispatchd`.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `dispatchd man > dispatchd.1`, and with a subcommand its
    /// own page: `dispatchd man sink > dispatchd-sink.1`.
    Man {
        /// A subcommand, for its page (dispatchd-<subcommand>.1).
        subcommand: Option<String>,
    },
    /// Probe a running dispatchd: exit 0 when URL answers 2xx within the timeout, 1 otherwise
    /// (the container image's HEALTHCHECK; the image has no curl).
    Health {
        /// What to probe, such as http://127.0.0.1:9000/health or .../ready.
        #[arg(
            long,
            value_name = "URL",
            default_value = "http://127.0.0.1:9000/health"
        )]
        url: String,
        /// How long the answer may take.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Watch a running dispatchd in the terminal: dispatchers with rate, error ratio, latency and
    /// breaker, sinks and bus, refreshed live (`q` quits).
    Top(TopArgs),
}

#[derive(Debug, Args)]
struct TopArgs {
    /// The dispatchd to watch.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:9000")]
    url: String,
    /// How often to refresh, such as 1s or 500ms.
    #[arg(long, default_value = "2s", value_parser = top_interval)]
    interval: std::time::Duration,
    /// A bearer token with the metrics scope (needed once the instance has such a token).
    #[arg(long, env = "DISPATCHD_METRICS_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

fn top_interval(text: &str) -> Result<std::time::Duration, String> {
    let interval = humantime::parse_duration(text).map_err(|error| error.to_string())?;
    if interval < std::time::Duration::from_millis(100)
        || interval > std::time::Duration::from_secs(3600)
    {
        return Err("the interval must be between 100ms and 1h".to_owned());
    }
    Ok(interval)
}

#[derive(Debug, Args)]
struct LoadtestArgs {
    /// The dispatchd to load, such as http://127.0.0.1:9000.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:9000")]
    target: String,
    /// Messages per second, one step each: 5000,10000,20000.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000,20000")]
    rates: Vec<u32>,
    /// How long each step lasts.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    step: std::time::Duration,
    /// Connections (requests in flight) at most.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// The topic messages are posted to.
    #[arg(long, default_value = "load.test.events")]
    topic: String,
    /// A bearer token with the ingest scope.
    #[arg(long, env = "DISPATCHD_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// dispatchd's process id, to report its resident memory.
    #[arg(long)]
    pid: Option<u32>,
}

#[derive(Debug, Args)]
struct SinkArgs {
    /// The sink plugin (default with --config: the service of its [[sinks]] element).
    #[arg(long, value_parser = ["file", "http", "lunary", "helicone"])]
    service: Option<String>,
    /// A path (file), a URL (http), or a base URL (lunary, helicone; default their cloud).
    #[arg(long)]
    endpoint: Option<String>,
    /// The service's API key.
    #[arg(long, env = "DISPATCHD_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Events queued for the sink at most (default: [defaults.sinks] buffer).
    #[arg(long)]
    buffer: Option<usize>,
    /// Events per batch at most (default: [defaults.sinks] batch_size).
    #[arg(long)]
    batch_size: Option<usize>,
    /// A partial batch is sent once its oldest event waited this long (default: [defaults.sinks]
    /// flush_interval).
    #[arg(long, value_parser = humantime::parse_duration)]
    flush_interval: Option<std::time::Duration>,
    /// The Redis to read from, such as redis://127.0.0.1:6379.
    #[arg(long, env = "DISPATCHD_REDIS_URL", value_name = "URL")]
    bus: Option<String>,
    /// The stream of dispatch events (default: [bus] events_stream).
    #[arg(long)]
    stream: Option<String>,
    /// The consumer group (default `dispatchd-sink-<name>`).
    #[arg(long)]
    group: Option<String>,
    /// This consumer's stable name (default the host name and the --listen port); a restart under the same name first
    /// re-reads its own pending entries.
    #[arg(long)]
    consumer: Option<String>,
    /// Entries pending with another consumer for longer are claimed (default: [bus] claim_idle).
    #[arg(long, value_parser = humantime::parse_duration)]
    claim_idle: Option<std::time::Duration>,
    /// Consumers of the group idle this long with nothing pending are removed from it (default:
    /// [bus] consumer_retention).
    #[arg(long, value_parser = humantime::parse_duration)]
    consumer_retention: Option<std::time::Duration>,
    /// How often the stream is trimmed of what every group has acknowledged (default: [bus]
    /// trim_every).
    #[arg(long, value_parser = humantime::parse_duration)]
    trim_every: Option<std::time::Duration>,
    /// The sink's name (the `sink` label; default the service). With --config, the [[sinks]]
    /// element of that name is run (needed when the file has several).
    #[arg(long)]
    name: Option<String>,
    /// Where undeliverable events go (default ./dispatchd-data/<name>.dead-letters.jsonl).
    #[arg(long, value_name = "FILE")]
    dead_letter: Option<PathBuf>,
    /// Send the events of this dead-letter file again, then exit (no listener is opened).
    #[arg(long, value_name = "FILE")]
    replay_dead_letters: Option<PathBuf>,
    /// Where /metrics and /health are served.
    #[arg(long, env = "DISPATCHD_LISTEN", default_value = "127.0.0.1:9100")]
    listen: std::net::SocketAddr,
}

#[derive(Debug, Args)]
struct RepublishArgs {
    /// The dead-letter file, such as ./dispatchd-data/bus.dead-letters.jsonl.
    file: PathBuf,
    /// The Redis, such as redis://127.0.0.1:6379.
    #[arg(long, env = "DISPATCHD_REDIS_URL", value_name = "URL")]
    bus: String,
    /// The stream of dispatch events (default: [bus] events_stream).
    #[arg(long)]
    stream: Option<String>,
}

#[derive(Debug, Args)]
struct RequeueArgs {
    /// The [[sources]] stream, such as orders:inbound.
    stream: String,
    /// The Redis, such as redis://127.0.0.1:6379.
    #[arg(long, env = "DISPATCHD_REDIS_URL", value_name = "URL")]
    bus: String,
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
    /// Print a progress line this often.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    progress_every: std::time::Duration,
    /// A bearer token for --target (ingest; admin too, to read its routes).
    #[arg(long, env = "DISPATCHD_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// Parses the command line and runs it. The binary's whole `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = cli.config;
    match cli.command {
        Some(Command::CheckConfig { file }) => check_config(file.or(config).as_deref()),
        Some(Command::Config) => print_config(config.as_deref()),
        Some(Command::Serve) | None => serve(config.as_deref(), cli.log_format.as_deref()),
        Some(Command::Simulate(args)) => simulate(config.as_deref(), args),
        Some(Command::Loadtest(args)) => loadtest(args),
        Some(Command::Sink(args)) => sink(config.as_deref(), *args),
        Some(Command::Top(args)) => top(args),
        Some(Command::Republish(args)) => republish(args),
        Some(Command::Requeue(args)) => requeue(args),
        Some(Command::Completions { shell }) => completions(shell),
        Some(Command::Man { subcommand }) => man(subcommand.as_deref()),
        Some(Command::Health { url, timeout }) => health(&url, timeout),
    }
}

fn completions(shell: clap_complete::Shell) -> ExitCode {
    let mut command = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut command, "dispatchd", &mut std::io::stdout());
    ExitCode::SUCCESS
}

/// `dispatchd.1`, or with a subcommand `dispatchd-<subcommand>.1` (its options in full).
fn man(subcommand: Option<&str>) -> ExitCode {
    let command = <Cli as clap::CommandFactory>::command();
    let command = match subcommand {
        None => command,
        Some(name) => match command.find_subcommand(name) {
            Some(sub) => {
                let name = format!("dispatchd-{}", sub.get_name());
                sub.clone()
                    .name(name)
                    .version(command.get_version().unwrap_or_default().to_owned())
            }
            None => {
                let known: Vec<&str> = command.get_subcommands().map(|c| c.get_name()).collect();
                eprintln!(
                    "error: no subcommand `{name}`; one of: {}",
                    known.join(", ")
                );
                return ExitCode::FAILURE;
            }
        },
    };
    let mut page = Vec::new();
    if let Err(error) = clap_mangen::Man::new(command).render(&mut page) {
        eprintln!("error: cannot render the manual page: {error}");
        return ExitCode::FAILURE;
    }
    use std::io::Write;
    match std::io::stdout().write_all(&page) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: cannot write the manual page: {error}");
            ExitCode::FAILURE
        }
    }
}

fn health(url: &str, timeout: std::time::Duration) -> ExitCode {
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let outcome = runtime.block_on(async {
        let client = reqwest::Client::builder().timeout(timeout).build()?;
        client.get(url).send().await
    });
    match outcome {
        Ok(response) if response.status().is_success() => {
            println!("{url}: {}", response.status());
            ExitCode::SUCCESS
        }
        Ok(response) => {
            eprintln!("unhealthy: {url} answered {}", response.status());
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("unhealthy: {url}: {error}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: Option<&std::path::Path>) -> ExitCode {
    let name = file.map_or_else(
        || "the embedded defaults".to_owned(),
        |file| file.display().to_string(),
    );
    match Config::load(file) {
        Ok(config) => {
            print_warnings(&config);
            println!(
                "{name} is valid: {} dispatchers, {} routes, listening on {}",
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

fn print_config(file: Option<&std::path::Path>) -> ExitCode {
    let (text, config) = Config::effective(file, |name| std::env::var(name).ok());
    if let Some(text) = text {
        print!("{text}");
    }
    match config {
        Ok(config) => {
            print_warnings(&config);
            ExitCode::SUCCESS
        }
        Err(error) => {
            print_config_error(&error);
            ExitCode::FAILURE
        }
    }
}

fn print_warnings(config: &Config) {
    for warning in &config.warnings {
        eprintln!("warning: {warning}");
    }
}

fn print_config_error(error: &ConfigError) {
    match error {
        ConfigError::Invalid(problems) => {
            let count = match problems.len() {
                1 => "1 problem".to_owned(),
                n => format!("{n} problems"),
            };
            eprintln!("error: invalid configuration ({count}):");
            for problem in problems {
                eprintln!("  {problem}");
            }
        }
        other => eprintln!("error: {other}"),
    }
}

fn loadtest(args: LoadtestArgs) -> ExitCode {
    let options = crate::loadtest::Options {
        target: args.target,
        rates: args.rates,
        step: args.step,
        connections: args.connections,
        topic: args.topic,
        token: args.token,
        pid: args.pid,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "loading {} for {} per step with {} connections",
        options.target,
        humantime::format_duration(options.step),
        options.connections
    );
    let outcome = runtime.block_on(crate::loadtest::run(&options, |step| println!("{step}")));
    match outcome {
        Ok(steps) if steps.iter().all(|s| s.ok > 0) => ExitCode::SUCCESS,
        Ok(steps) => {
            eprintln!("error: {}", crate::loadtest::diagnose(&steps, &options));
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn top(args: TopArgs) -> ExitCode {
    let options = crate::top::Options {
        url: args.url,
        interval: args.interval,
        token: args.token,
    };
    match crate::top::run(options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn simulate(config_file: Option<&std::path::Path>, args: SimulateArgs) -> ExitCode {
    if !(args.rate > 0.0 && args.rate <= 100_000.0) {
        eprintln!("error: --rate must be above 0 and at most 100000 messages a second");
        return ExitCode::FAILURE;
    }
    let config = match Config::load(config_file) {
        Ok(config) => config,
        Err(error) => {
            print_config_error(&error);
            return ExitCode::FAILURE;
        }
    };
    // The demonstration provokes failures on purpose, each logged as a warning: they are counted
    // for the progress lines, and printed (to stderr, away from the progress) only when asked for
    // with DISPATCHD_LOG.
    let warnings = crate::simulate::WarningCount::default();
    init_simulate_logging(
        std::env::var_os("DISPATCHD_LOG")
            .is_some()
            .then_some(config.log.filter.as_str()),
        warnings.clone(),
    );
    if args.progress_every.is_zero() {
        eprintln!("error: --progress-every must be above 0");
        return ExitCode::FAILURE;
    }
    let listen = config.server.listen;
    let options = crate::simulate::Options {
        target: args.target,
        rate: args.rate,
        duration: args.duration,
        progress_every: args.progress_every,
        token: args.token,
        warnings,
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
            report_error(&error, listen, "DISPATCHD_LISTEN or [server] listen");
            ExitCode::FAILURE
        }
    }
}

/// Prints a command's error once. An address already in use gets one line that names it and
/// says what to do, instead of the chain of contexts around `Address already in use (os error
/// 98)`.
fn report_error(error: &anyhow::Error, listen: std::net::SocketAddr, how_to_change: &str) {
    let in_use = error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)
    });
    if in_use {
        eprintln!(
            "error: {listen} is already in use by another process (another dispatchd?): stop it, or choose another address with {how_to_change}"
        );
    } else {
        eprintln!("error: {error:#}");
    }
}

fn republish(args: RepublishArgs) -> ExitCode {
    init_logging(&std::env::var("DISPATCHD_LOG").unwrap_or_else(|_| "warn".to_owned()));
    let stream = match args.stream {
        Some(stream) => stream,
        None => match Config::embedded() {
            Ok(embedded) => embedded.bus.events_stream,
            Err(error) => {
                print_config_error(&error);
                return ExitCode::FAILURE;
            }
        },
    };
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let outcome = runtime.block_on(crate::bus::redis::republish(&args.bus, &stream, &args.file));
    match outcome {
        Ok(done) => {
            println!(
                "republished {} events from {} on {} (the file is now {})",
                done.published,
                args.file.display(),
                stream,
                done.moved_to.display()
            );
            if done.returned == 0 {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "error: Redis refused {} events; they are back in {}",
                    done.returned,
                    args.file.display()
                );
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn requeue(args: RequeueArgs) -> ExitCode {
    init_logging(&std::env::var("DISPATCHD_LOG").unwrap_or_else(|_| "warn".to_owned()));
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(crate::bus::redis::requeue_unreadable(
        &args.bus,
        &args.stream,
    )) {
        Ok(done) => {
            println!(
                "moved {} entries from {}:unreadable back to {}; {} left there",
                done.moved, args.stream, args.stream, done.left
            );
            if let Some((id, why)) = done.first_left {
                println!("this version cannot read them either; the first, {id}: {why}");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn sink(config_file: Option<&std::path::Path>, args: SinkArgs) -> ExitCode {
    init_logging(&std::env::var("DISPATCHD_LOG").unwrap_or_else(|_| "info".to_owned()));
    // With --config (or DISPATCHD_CONFIG), the sink is the file's [[sinks]] element (its
    // headers, timeout, retries…) and the bus its [bus], the flags given still winning: when
    // --service is left out, or --name names one of its elements. Otherwise (--service given
    // for a sink the file does not have) the flags and the embedded defaults run it, as without
    // a file.
    let from_file = match config_file {
        None => None,
        Some(file) => match Config::load(Some(file)) {
            Ok(config) => {
                let named = args
                    .name
                    .as_deref()
                    .is_some_and(|name| config.sinks.iter().any(|s| s.sink.name == name));
                if args.service.is_none() || named {
                    match crate::app::FromFile::select(&config, args.name.as_deref()) {
                        Ok(selected) => Some(selected),
                        Err(error) => {
                            eprintln!("error: {}: {error}", file.display());
                            return ExitCode::FAILURE;
                        }
                    }
                } else {
                    None
                }
            }
            Err(error) => {
                print_config_error(&error);
                return ExitCode::FAILURE;
            }
        },
    };
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let listen = args.listen;
    match runtime.block_on(run_sink(args, from_file)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            report_error(&error, listen, "--listen or DISPATCHD_LISTEN");
            ExitCode::FAILURE
        }
    }
}

async fn run_sink(args: SinkArgs, from_file: Option<crate::app::FromFile>) -> anyhow::Result<()> {
    let Some(service) = args.service.or_else(|| {
        from_file
            .as_ref()
            .map(|file| file.sink.sink.service.clone())
    }) else {
        anyhow::bail!("--service is required without --config");
    };
    let service = crate::app::SinkService::build(crate::app::SinkServiceConfig {
        service,
        endpoint: args.endpoint,
        api_key: args.api_key,
        name: args.name,
        buffer: args.buffer,
        batch_size: args.batch_size,
        flush_interval: args.flush_interval,
        bus: args.bus,
        stream: args.stream,
        group: args.group,
        consumer: args.consumer,
        claim_idle: args.claim_idle,
        consumer_retention: args.consumer_retention,
        trim_every: args.trim_every,
        dead_letter: args.dead_letter,
        replay_dead_letters: args.replay_dead_letters,
        listen: args.listen,
        metrics_namespace: std::env::var("DISPATCHD_METRICS_NAMESPACE").unwrap_or_default(),
        from_file,
    })
    .await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    reopen_on_hangup(service.files());
    if let Some(replayed) = service.run(shutdown).await? {
        println!(
            "replayed {} events from {} (moved to {})",
            replayed.count,
            replayed.file.display(),
            replayed.moved_to.display()
        );
    }
    Ok(())
}

fn serve(config_file: Option<&std::path::Path>, log_format: Option<&str>) -> ExitCode {
    let config = match Config::load(config_file) {
        Ok(config) => config,
        Err(error) => {
            print_config_error(&error);
            return ExitCode::FAILURE;
        }
    };
    let mut config = config;
    if log_format == Some("json") {
        config.tracing.log_format = crate::telemetry::traces::LogFormat::Json;
    }
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    // The batch span processor starts its thread here; the subscriber feeds it from now on.
    let traces = match runtime
        .block_on(async { crate::telemetry::traces::Traces::install(&config.tracing) })
    {
        Ok(traces) => traces,
        Err(error) => {
            eprintln!("error: cannot set up tracing: {error}");
            return ExitCode::FAILURE;
        }
    };
    let listen = config.server.listen;
    let outcome = runtime.block_on(run(config, traces.tracer()));
    traces.shutdown();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The log may go to a collector or a JSON pipeline: the error is logged there too,
            // unless it was a start-up problem the terminal line below says better.
            if !error.chain().any(|cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)
            }) {
                tracing::error!("{error:#}");
            }
            report_error(&error, listen, "DISPATCHD_LISTEN or [server] listen");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, tracer: opentelemetry_sdk::trace::SdkTracer) -> anyhow::Result<()> {
    for warning in &config.warnings {
        tracing::warn!(%warning, "The configuration has a likely mistake.");
    }
    let app = App::builder(config)
        .tracer(tracer)
        .build()
        .await
        .context("cannot start dispatchd")?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    reopen_on_hangup(app.files().clone());
    app.run(shutdown).await
}

/// Reopens every appended file on SIGHUP (the logrotate convention: after `mv f f.1` and
/// SIGHUP, new lines go to a new `f`), instead of dying of it. Each writer reopens at its next
/// commit. The handler is installed before this returns, so a SIGHUP sent once the service
/// answers is never fatal.
fn reopen_on_hangup(files: crate::appender::Files) {
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hangup) => {
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    tracing::info!("Received SIGHUP: reopening the appended files.");
                    files.reopen();
                }
            });
        }
        Err(error) => {
            tracing::warn!(%error, "Cannot listen for SIGHUP; appended files are reopened only when moved.");
        }
    }
    #[cfg(not(unix))]
    drop(files);
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

/// `simulate`'s logging: warnings counted always; printed, to stderr, only with a filter
/// (DISPATCHD_LOG given), so they never interleave the progress lines on stdout.
fn init_simulate_logging(filter: Option<&str>, warnings: crate::simulate::WarningCount) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let printed = filter.map(|filter| {
        tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(
                tracing_subscriber::EnvFilter::try_new(filter)
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
    });
    tracing_subscriber::registry()
        .with(warnings.with_filter(tracing_subscriber::filter::LevelFilter::WARN))
        .with(printed)
        .init();
}

fn init_logging(filter: &str) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::FilterExt;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        // The SDK logs each failed OTLP export; `telemetry::otlp` counts them and logs a summary.
        .and(tracing_subscriber::filter::filter_fn(|metadata| {
            !crate::telemetry::otlp::is_sdk_export_failure(metadata)
        }));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_target(false)
                .with_ansi(ansi)
                .with_filter(filter),
        )
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
    fn top_takes_a_url_an_interval_within_bounds_and_a_token() {
        let cli = Cli::try_parse_from([
            "dispatchd",
            "top",
            "--url",
            "http://10.0.0.7:9000",
            "--interval",
            "500ms",
            "--token",
            "metrics-token-0123456789",
        ])
        .unwrap();
        let Some(Command::Top(args)) = cli.command else {
            panic!("top")
        };
        assert_eq!(args.url, "http://10.0.0.7:9000");
        assert_eq!(args.interval, std::time::Duration::from_millis(500));
        assert_eq!(args.token.as_deref(), Some("metrics-token-0123456789"));
        for interval in ["0s", "10ms", "2h", "soon"] {
            let parsed = Cli::try_parse_from(["dispatchd", "top", "--interval", interval]);
            assert!(parsed.is_err(), "{interval}");
        }
    }

    #[test]
    fn serve_is_the_default_and_takes_a_config() {
        let path = |cli: &Cli| cli.config.as_ref().map(|p| p.display().to_string());
        let cli = Cli::try_parse_from(["dispatchd", "--config", "x.toml"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(path(&cli).as_deref(), Some("x.toml"));
        let cli = Cli::try_parse_from(["dispatchd", "serve", "--config", "y.toml"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Serve)));
        assert_eq!(path(&cli).as_deref(), Some("y.toml"));
        let cli = Cli::try_parse_from(["dispatchd", "--config", "w.toml", "serve"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Serve)));
        assert_eq!(path(&cli).as_deref(), Some("w.toml"));
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
    }

    /// `dispatchd sink` holds no default of its own: what is not given is `None`, for the
    /// embedded `[defaults.sinks]` and `[bus]` to fill in.
    #[test]
    fn sink_flags_left_out_are_left_to_the_embedded_defaults() {
        let cli = Cli::try_parse_from(["dispatchd", "sink", "--service", "file"]).unwrap();
        let Some(Command::Sink(args)) = cli.command else {
            panic!("sink")
        };
        assert_eq!(
            (args.buffer, args.batch_size, args.flush_interval),
            (None, None, None)
        );
        assert_eq!(
            (args.claim_idle, args.consumer_retention, args.trim_every),
            (None, None, None)
        );
        assert_eq!(args.stream, None);
        let cli = Cli::try_parse_from(["dispatchd", "republish", "x.jsonl", "--bus", "redis://h"])
            .unwrap();
        let Some(Command::Republish(args)) = cli.command else {
            panic!("republish")
        };
        assert_eq!(args.stream, None);
    }

    #[test]
    fn check_config_and_config_take_the_file_before_or_after_the_subcommand() {
        let cli = Cli::try_parse_from(["dispatchd", "check-config", "z.toml"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::CheckConfig { file: Some(_) })
        ));
        for args in [
            ["dispatchd", "--config", "z.toml", "check-config"],
            ["dispatchd", "check-config", "--config", "z.toml"],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            assert!(matches!(
                cli.command,
                Some(Command::CheckConfig { file: None })
            ));
            assert_eq!(cli.config.as_deref(), Some(std::path::Path::new("z.toml")));
        }
        for args in [
            ["dispatchd", "--config", "z.toml", "config"],
            ["dispatchd", "config", "--config", "z.toml"],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            assert!(matches!(cli.command, Some(Command::Config)));
            assert_eq!(cli.config.as_deref(), Some(std::path::Path::new("z.toml")));
        }
    }
}
