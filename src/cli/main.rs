//! `fjord`: the developer CLI.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fjord_cli::dev::{DevAuth, DevOptions, DevRedis};
use fjord_config::Manifest;

/// Fjord: a real-time API proxy for Kafka.
#[derive(Debug, Parser)]
#[command(name = "fjord", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// On failure, print the error's full chain and backtrace, not one line.
    #[arg(long, global = true)]
    verbose: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs everything in one process: Kafka, bus, consumer, server, demo producer and page.
    Dev {
        /// The HTTP port.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// The address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: IpAddr,
        /// Use these Kafka brokers (host:port,...) instead of the in-process cluster.
        #[arg(long, value_name = "BROKERS")]
        kafka: Option<String>,
        /// Use this Redis (redis://host:port, or rediss:// for TLS) instead of the in-process bus.
        #[arg(long, value_name = "URL")]
        redis: Option<String>,
        /// Authenticate to --redis as this ACL user.
        #[arg(long, value_name = "NAME", requires = "redis")]
        redis_user: Option<String>,
        /// The variable holding the --redis password [default: FJORD_REDIS_PASSWORD, when set].
        #[arg(long, value_name = "VAR", requires = "redis")]
        redis_password_env: Option<String>,
        /// Do not produce demo records.
        #[arg(long)]
        no_demo_producer: bool,
        /// Read the topics through this Confluent-compatible Schema Registry (its API's base
        /// URL): Avro, Protobuf and JSON Schema records in its wire format arrive as JSON.
        #[arg(long, value_name = "URL")]
        schema_registry: Option<String>,
        /// Turn access control on: streams need a JWT, signed by a key pair made for this run
        /// in a temporary folder; the banner prints a token and how to mint others.
        #[arg(long)]
        auth: bool,
        /// With --auth, use the key pair in DIR (`fjord setup`'s files), made there if missing.
        #[arg(long, value_name = "DIR", requires = "auth")]
        keys: Option<PathBuf>,
        /// Send streams gzip- or deflate-compressed to clients that accept it, as the
        /// manifest's `server.compression` does.
        #[arg(long)]
        compression: bool,
    },
    /// Prints TypeScript types for the records of an endpoint (every endpoint by default),
    /// from the latest schemas of its topics' `<topic>-value` subjects in the manifest's
    /// Schema Registry, with an `Endpoints` map for `connect<Endpoints>()`.
    Types {
        /// The manifest.
        manifest: PathBuf,
        /// The endpoint.
        endpoint: Option<String>,
    },
    /// Writes an Ed25519 key pair and a manifest skeleton (never overwriting keys).
    Setup {
        /// Where to write them.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Mints a token with the private key `fjord setup` wrote, and prints it.
    Token {
        /// The subject (`sub`).
        #[arg(long, default_value = "test-user")]
        sub: String,
        /// An endpoint the token opens (repeatable; `*` for all).
        #[arg(long = "endpoint", required = true)]
        endpoints: Vec<String>,
        /// A record key the token pins (repeatable); none for all keys.
        #[arg(long = "key")]
        keys: Vec<String>,
        /// A filter the token pins, as ENDPOINT=FILTER (`*=FILTER` for every endpoint;
        /// repeatable): a request's own filter can only narrow it (docs/filters.md).
        #[arg(long = "filter", value_parser = endpoint_filter, value_name = "ENDPOINT=FILTER")]
        filters: Vec<(String, String)>,
        /// How long it lives, in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// The private key.
        #[arg(long, default_value = fjord_cli::setup::PRIVATE_KEY_FILE)]
        private_key: PathBuf,
        /// `iss`.
        #[arg(long, default_value = fjord_cli::setup::DEFAULT_ISSUER)]
        issuer: String,
        /// `aud`.
        #[arg(long, default_value = fjord_cli::setup::DEFAULT_AUDIENCE)]
        audience: String,
        /// `kid` in the header.
        #[arg(long, default_value = "fjord-setup")]
        key_id: String,
    },
    /// Validates a manifest and exits non-zero, naming the JSON path, if it is invalid.
    Check {
        /// The manifest.
        #[arg(default_value = "manifest.json")]
        manifest: PathBuf,
    },
    /// Prints the manifest's JSON Schema.
    Schema,
    /// Load generator and standard benchmark scenarios (see BENCHMARKS.md).
    Bench {
        #[command(subcommand)]
        command: fjord_cli::bench::BenchCommand,
    },
}

/// `ENDPOINT=FILTER`, split at the first `=` (endpoint names have none).
fn endpoint_filter(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((endpoint, filter)) if !endpoint.is_empty() => {
            Ok((endpoint.to_owned(), filter.to_owned()))
        }
        _ => Err("expected ENDPOINT=FILTER, e.g. orders='value.total >= 1000'".into()),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    fjord_bus::process::init_logging();
    fjord_bus::process::exit_code(run(cli.command).await, cli.verbose)
}

/// Prints a command's result, which is its output (not a log line).
macro_rules! say {
    ($($arg:tt)*) => {{
        #[allow(clippy::print_stdout, reason = "a command's result is its output")]
        {
            println!($($arg)*);
        }
    }};
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Dev {
            port,
            host,
            kafka,
            redis,
            redis_user,
            redis_password_env,
            no_demo_producer,
            schema_registry,
            auth,
            keys,
            compression,
        } => {
            fjord_cli::dev::run(DevOptions {
                host,
                port,
                kafka,
                redis: redis.map(|url| DevRedis {
                    url,
                    username: redis_user,
                    password_env: redis_password_env,
                }),
                demo_producer: !no_demo_producer,
                schema_registry,
                auth: match (auth, keys) {
                    (false, _) => DevAuth::Off,
                    (true, None) => DevAuth::TemporaryKeys,
                    (true, Some(dir)) => DevAuth::Keys(dir),
                },
                compression,
            })
            .await?;
        }
        Command::Setup { dir } => {
            let outcome = fjord_cli::setup::setup(&dir)?;
            for path in &outcome.written {
                say!("wrote {}", path.display());
            }
            for path in &outcome.kept {
                say!("kept  {} (it exists; left as it was)", path.display());
            }
            say!(
                "\nnext: fjord token --endpoint orders\nKeep fjord-private.pem secret; servers need only the public key, which is in the manifest."
            );
        }
        Command::Token {
            sub,
            endpoints,
            keys,
            filters,
            ttl,
            private_key,
            issuer,
            audience,
            key_id,
        } => {
            let request = fjord_cli::setup::TokenRequest {
                subject: sub,
                endpoints,
                keys,
                filters,
                ttl: std::time::Duration::from_secs(ttl),
                issuer,
                audience,
                key_id: Some(key_id),
            };
            let token = fjord_cli::setup::mint(&private_key, &request)?;
            say!("{token}");
        }
        Command::Check { manifest } => {
            Manifest::load(&manifest)?;
            say!("{} is valid", manifest.display());
        }
        Command::Bench { command } => fjord_cli::bench::run(command).await?,
        Command::Schema => say!("{}", fjord_config::SCHEMA),
        Command::Types { manifest, endpoint } => {
            let manifest = Manifest::load(&manifest)?;
            say!(
                "{}",
                fjord_cli::types::types(&manifest, endpoint.as_deref()).await?
            );
        }
    }
    Ok(())
}
