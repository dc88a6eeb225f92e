//! `fjord`: the developer CLI.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use fjord::config::Manifest;
use fjord::dev::DevOptions;

/// Fjord: a real-time API proxy for Kafka.
#[derive(Debug, Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
        /// Use this Redis (redis://host:port) instead of the in-process bus.
        #[arg(long, value_name = "URL")]
        redis: Option<String>,
        /// Do not produce demo records.
        #[arg(long)]
        no_demo_producer: bool,
    },
    /// Validates a manifest and exits non-zero, naming the JSON path, if it is invalid.
    Check {
        /// The manifest.
        #[arg(default_value = "manifest.json")]
        manifest: PathBuf,
    },
    /// Prints the manifest's JSON Schema.
    Schema,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    fjord::process::init_logging();
    match cli.command {
        Command::Dev {
            port,
            host,
            kafka,
            redis,
            no_demo_producer,
        } => {
            fjord::dev::run(DevOptions {
                host,
                port,
                kafka,
                redis,
                demo_producer: !no_demo_producer,
            })
            .await?;
        }
        Command::Check { manifest } => {
            Manifest::load(&manifest)?;
            tracing::info!(manifest = %manifest.display(), "manifest is valid");
        }
        Command::Schema => {
            #[allow(clippy::print_stdout, reason = "the schema is the command's output")]
            {
                println!("{}", fjord::config::SCHEMA);
            }
        }
    }
    Ok(())
}
