//! `fjord-deploy`: pushes the images and deploys Fjord to ECS from the manifest.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use fjord_deploy::registry::Endpoint;
use fjord_deploy::{Deployment, Options};

/// Deploys Fjord to AWS ECS (Fargate) from the manifest's `deploy` section: ECR
/// repositories and images, task definitions, services, autoscaling.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The manifest (the same file every Fjord binary reads).
    manifest: PathBuf,
    /// The server's image archive (`nix build .#images`: result/fjord-server.tar.gz).
    #[arg(long, env = "FJORD_SERVER_IMAGE")]
    server_image: PathBuf,
    /// The consumer's image archive.
    #[arg(long, env = "FJORD_CONSUMER_IMAGE")]
    consumer_image: PathBuf,
    /// Print what would change, and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Send AWS API calls to this endpoint (an emulator) instead of AWS.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    endpoint_url: Option<String>,
    /// Push images to this registry (http:// or https://) instead of the account's ECR.
    #[arg(long, env = "FJORD_REGISTRY_URL")]
    registry_url: Option<String>,
    /// Seconds to wait for the services to become stable.
    #[arg(long, default_value_t = 900)]
    wait_timeout: u64,
    /// Do not wait for the services to become stable.
    #[arg(long)]
    no_wait: bool,
    /// Seconds between looks while waiting.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    poll_secs: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Each error's message already carries its cause, and a failure midway its
            // report of what was done: printed once, without a backtrace.
            #[allow(clippy::print_stderr, reason = "the CLI's error report")]
            {
                eprintln!("fjord-deploy: {error}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Everything in the manifest is checked before the first AWS call.
    let deployment = Deployment::load(&args.manifest)?;
    let registry = args
        .registry_url
        .as_deref()
        .map(Endpoint::parse)
        .transpose()
        .map_err(|message| anyhow::anyhow!("--registry-url: {message}"))?;
    let options = Options {
        server_image: args.server_image,
        consumer_image: args.consumer_image,
        dry_run: args.dry_run,
        endpoint_url: args.endpoint_url,
        registry,
        wait: (!args.no_wait).then(|| Duration::from_secs(args.wait_timeout)),
        poll: Duration::from_secs(args.poll_secs),
    };
    Box::pin(fjord_deploy::deploy(&deployment, &options)).await?;
    Ok(())
}
