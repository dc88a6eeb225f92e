//! `fjord-consumer`: one member of a consumer group, publishing Kafka records to the bus.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use fjord_bus::process::ManifestArgs;
use fjord_config::Manifest;

/// One member of a Kafka consumer group that publishes each record to the bus.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    common: ManifestArgs,
    /// The consumer group (its `id` in the manifest); may be left out when there is one.
    #[arg(long, env = "FJORD_CONSUMER_GROUP")]
    group: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    fjord_bus::process::init_logging();
    fjord_bus::process::exit_code(run(&args).await, args.common.verbose)
}

async fn run(args: &Args) -> anyhow::Result<()> {
    let manifest = Manifest::load_from_env_or(&args.common.manifest)?;
    let group = match (&args.group, manifest.consumer_groups.as_slice()) {
        (Some(id), _) => manifest
            .consumer_group(id)
            .with_context(|| format!("the manifest has no consumer group {id:?}"))?,
        (None, [only]) => only,
        (None, groups) => {
            let ids: Vec<&str> = groups.iter().map(|g| g.id.as_str()).collect();
            anyhow::bail!(
                "the manifest has several consumer groups ({}); choose one with --group",
                ids.join(", ")
            );
        }
    };
    let bus = fjord_bus::connect_redis(&manifest.redis)
        .await
        .context("connecting to redis")?;
    // No probe asks whether this member consumes: it serves no HTTP. A hold on the
    // registry is in its log.
    let (readiness, _) = fjord_consumer::readiness();
    fjord_consumer::run(
        &manifest,
        group,
        &bus,
        fjord_bus::process::shutdown_signal(),
        readiness,
    )
    .await?;
    Ok(())
}
