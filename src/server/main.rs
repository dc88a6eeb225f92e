//! `fjord-server`: streams the bus to clients over Server-Sent Events.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use fjord_bus::process::ManifestArgs;
use fjord_config::Manifest;

/// jemalloc returns freed memory in smaller pieces than glibc: fewer resident bytes per
/// idle connection (see BENCHMARKS.md).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Streams Kafka records from the bus to clients over Server-Sent Events.
#[derive(Debug, Parser)]
#[command(name = "fjord-server", version)]
struct Args {
    #[command(flatten)]
    common: ManifestArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    fjord_bus::process::init_logging();
    fjord_bus::process::exit_code(run(&args).await, args.common.verbose)
}

async fn run(args: &Args) -> anyhow::Result<()> {
    let manifest = Manifest::load_from_env_or(&args.common.manifest)?;
    let bus = fjord_bus::connect_redis(&manifest.redis)
        .await
        .context("connecting to redis")?;
    let bound = fjord_server::bind(&manifest).await?;
    fjord_server::serve(
        &manifest,
        &bus,
        bound,
        &[],
        fjord_bus::process::shutdown_signal(),
    )
    .await?;
    Ok(())
}
