//! `fjord-server`: streams the bus to clients over Server-Sent Events.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use fjord::config::Manifest;

/// jemalloc returns freed memory in smaller pieces than glibc: fewer resident bytes per
/// idle connection (see BENCHMARKS.md).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Streams Kafka records from the bus to clients over Server-Sent Events.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The manifest (`FJORD_MANIFEST_JSON`, when set, holds the manifest itself instead).
    #[arg(long, env = "FJORD_MANIFEST", default_value = "manifest.json")]
    manifest: PathBuf,
    /// On failure, print the error's full chain and backtrace, not one line.
    #[arg(long)]
    verbose: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    fjord::process::init_logging();
    fjord::process::exit_code(run(&args).await, args.verbose)
}

async fn run(args: &Args) -> anyhow::Result<()> {
    let manifest = Manifest::load_from_env_or(&args.manifest)?;
    let bus = fjord::bus::connect_redis(&manifest.redis)
        .await
        .context("connecting to redis")?;
    let bound = fjord::server::bind(&manifest).await?;
    fjord::server::serve(
        &manifest,
        &bus,
        bound,
        &[],
        fjord::process::shutdown_signal(),
    )
    .await?;
    Ok(())
}
