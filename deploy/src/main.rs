//! `fjord-deploy`: creates what Fjord runs on in an empty account, pushes the images and
//! deploys Fjord to ECS from the manifest, or takes down what it made; shows, diffs,
//! verifies and rolls back a deployment; prints the IAM policy all that needs.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use fjord_deploy::config::Blueprint;
use fjord_deploy::policy;
use fjord_deploy::registry::Endpoint;
use fjord_deploy::{BootstrapOptions, Deployment, DestroyOptions, Options};

/// Deploys Fjord to AWS ECS (Fargate) from the manifest's `deploy` section: ECR
/// repositories and images, task definitions, services, autoscaling.
///
/// `fjord-deploy bootstrap manifest.json` creates what a deploy runs on;
/// `fjord-deploy manifest.json` and `fjord-deploy deploy manifest.json` deploy;
/// `fjord-deploy destroy manifest.json` removes what bootstrap and deploys created;
/// `status`, `diff`, `verify`, `rollback` and `policy` look after a deployment.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create what a deploy runs on, from an empty account: VPC (public and private
    /// subnets, internet gateway, NAT gateways), security groups, load balancer with its
    /// target group and listener, ElastiCache with an AUTH token in Secrets Manager, the
    /// ECS cluster, the roles and the log group; then write their ids into the manifest.
    /// What the manifest already names is used as it is. Everything is tagged
    /// `fjord:deployment=<name>`; running it again changes nothing, or resumes.
    Bootstrap(BootstrapArgs),
    /// Deploy (also what runs when the first argument is not a subcommand).
    Deploy(DeployArgs),
    /// Remove what deploys of the manifest created: services (drained first), their
    /// autoscaling, task definitions; the log group and the ECR repositories only when
    /// asked; then what bootstrap created, in dependency order, waiting for each deletion.
    /// Resources are recognised by name and by the `fjord:deployment` tag put on what the
    /// tool creates: nothing else is touched. Running it again is harmless.
    Destroy(DestroyArgs),
    /// Show each service of the manifest: its state and counts, its deployments (the task
    /// definition each runs, rollout state, failed tasks), the images it runs (by
    /// digest), its latest events. Reads only.
    Status(Where),
    /// Show what a deploy would change in each task definition and service, as a unified
    /// diff of their JSON. Reads only. Without image archives, the images stay those the
    /// task definitions run.
    Diff(DiffArgs),
    /// Put each service back on the task definition revision before the one it runs, and
    /// wait as a deploy does.
    Rollback(RollbackArgs),
    /// Check, before anything changes, that the roles exist and ECS tasks may assume them,
    /// that the secrets exist, and that the execution role may read them, decrypt them,
    /// write to the log group and pull the images.
    Verify(Where),
    /// Print the least-privilege IAM policy for deploy (with status, diff, rollback and
    /// verify), bootstrap and destroy of the manifest's deployment.
    Policy(PolicyArgs),
}

/// The manifest, and where the AWS calls go.
#[derive(Debug, Args)]
struct Where {
    /// The manifest (the same file every Fjord binary reads).
    manifest: PathBuf,
    /// Send AWS API calls to this endpoint (an emulator) instead of AWS.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    endpoint_url: Option<String>,
}

/// Where the AWS calls go, what a run may change, and how it waits.
#[derive(Debug, Args)]
struct Common {
    #[command(flatten)]
    at: Where,
    /// Print what would change, and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Seconds between looks while waiting.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    poll_secs: u64,
}

#[derive(Debug, Args)]
struct DeployArgs {
    #[command(flatten)]
    common: Common,
    /// The server's image archive (`nix build .#images`: result/fjord-server.tar.gz).
    #[arg(long, env = "FJORD_SERVER_IMAGE")]
    server_image: PathBuf,
    /// The consumer's image archive.
    #[arg(long, env = "FJORD_CONSUMER_IMAGE")]
    consumer_image: PathBuf,
    /// Push images to this registry (http:// or https://) instead of the account's ECR.
    #[arg(long, env = "FJORD_REGISTRY_URL")]
    registry_url: Option<String>,
    /// Seconds to wait for the services to become stable (and for the services of removed
    /// consumer groups to stop their tasks).
    #[arg(long, default_value_t = 900)]
    wait_timeout: u64,
    /// Do not wait for the services to become stable.
    #[arg(long)]
    no_wait: bool,
}

#[derive(Debug, Args)]
struct BootstrapArgs {
    #[command(flatten)]
    common: Common,
    /// Print the values to add to the manifest instead of writing them into it.
    #[arg(long)]
    no_write: bool,
    /// Seconds to wait for each slow part (NAT gateways, ElastiCache, load balancer).
    #[arg(long, default_value_t = 1800)]
    wait_timeout: u64,
}

#[derive(Debug, Args)]
struct DestroyArgs {
    #[command(flatten)]
    common: Common,
    /// Also delete the ECR repositories the deploy created, with every image in them.
    #[arg(long)]
    repositories: bool,
    /// Also delete the log group the deploy created, with its logs.
    #[arg(long)]
    log_group: bool,
    /// Seconds to wait for each service's tasks to stop, and for each slow deletion
    /// (load balancer, ElastiCache, NAT gateways, network interfaces).
    #[arg(long, default_value_t = 900)]
    drain_timeout: u64,
}

#[derive(Debug, Args)]
struct DiffArgs {
    #[command(flatten)]
    at: Where,
    /// The server's image archive, to compare its digest too.
    #[arg(long, env = "FJORD_SERVER_IMAGE")]
    server_image: Option<PathBuf>,
    /// The consumer's image archive, to compare its digest too.
    #[arg(long, env = "FJORD_CONSUMER_IMAGE")]
    consumer_image: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct RollbackArgs {
    #[command(flatten)]
    common: Common,
    /// Seconds to wait for the services to become stable.
    #[arg(long, default_value_t = 900)]
    wait_timeout: u64,
    /// Do not wait for the services to become stable.
    #[arg(long)]
    no_wait: bool,
}

#[derive(Debug, Args)]
struct PolicyArgs {
    /// The manifest.
    manifest: PathBuf,
    /// Only the permissions of these commands (repeatable); all three by default.
    #[arg(long = "for", value_enum)]
    commands: Vec<PolicyFor>,
}

/// A command `policy` grants.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum PolicyFor {
    /// deploy, status, diff, rollback, verify.
    Deploy,
    Bootstrap,
    Destroy,
}

/// The arguments, with `deploy` put first when they do not start with a subcommand or a
/// help or version flag: `fjord-deploy manifest.json ...` deploys, as it always has.
fn arguments() -> Vec<OsString> {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let first = args.get(1).and_then(|a| a.to_str());
    let explicit = matches!(
        first,
        Some(
            "bootstrap"
                | "deploy"
                | "destroy"
                | "status"
                | "diff"
                | "rollback"
                | "verify"
                | "policy"
                | "help"
                | "-h"
                | "--help"
                | "-V"
                | "--version"
        )
    );
    if !explicit && args.len() > 1 {
        args.insert(1, "deploy".into());
    }
    args
}

#[tokio::main]
async fn main() -> ExitCode {
    let result = match Cli::parse_from(arguments()).command {
        Command::Bootstrap(args) => bootstrap(args).await,
        Command::Destroy(args) => destroy(args).await,
        Command::Deploy(args) => deploy(args).await,
        Command::Status(args) => status(&args).await,
        Command::Diff(args) => diff(args).await,
        Command::Rollback(args) => rollback(args).await,
        Command::Verify(args) => verify(&args).await,
        Command::Policy(args) => policy(&args),
    };
    match result {
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

async fn deploy(args: DeployArgs) -> anyhow::Result<()> {
    // Everything in the manifest is checked before the first AWS call.
    let deployment = Deployment::load(&args.common.at.manifest)?;
    let registry = args
        .registry_url
        .as_deref()
        .map(Endpoint::parse)
        .transpose()
        .map_err(|message| anyhow::anyhow!("--registry-url: {message}"))?;
    let options = Options {
        server_image: args.server_image,
        consumer_image: args.consumer_image,
        dry_run: args.common.dry_run,
        endpoint_url: args.common.at.endpoint_url,
        registry,
        wait: (!args.no_wait).then(|| Duration::from_secs(args.wait_timeout)),
        poll: Duration::from_secs(args.common.poll_secs),
    };
    Box::pin(fjord_deploy::deploy(&deployment, &options)).await?;
    Ok(())
}

async fn bootstrap(args: BootstrapArgs) -> anyhow::Result<()> {
    let blueprint = Blueprint::load(&args.common.at.manifest)?;
    let options = BootstrapOptions {
        dry_run: args.common.dry_run,
        endpoint_url: args.common.at.endpoint_url,
        write: !args.no_write,
        timeout: Duration::from_secs(args.wait_timeout),
        poll: Duration::from_secs(args.common.poll_secs),
    };
    Box::pin(fjord_deploy::bootstrap(
        &args.common.at.manifest,
        &blueprint,
        &options,
    ))
    .await?;
    Ok(())
}

async fn destroy(args: DestroyArgs) -> anyhow::Result<()> {
    let options = DestroyOptions {
        dry_run: args.common.dry_run,
        endpoint_url: args.common.at.endpoint_url,
        repositories: args.repositories,
        log_group: args.log_group,
        drain_timeout: Duration::from_secs(args.drain_timeout),
        poll: Duration::from_secs(args.common.poll_secs),
    };
    let deployment = match Deployment::load(&args.common.at.manifest) {
        Ok(deployment) => deployment,
        Err(error) => {
            // A bootstrap interrupted before it wrote the ids back leaves a manifest a
            // deploy cannot read; what it created is still found by its tags.
            let Ok(blueprint) = Blueprint::load(&args.common.at.manifest) else {
                return Err(error.into());
            };
            #[allow(clippy::print_stdout, reason = "the CLI's report")]
            {
                println!(
                    "The manifest is not complete for a deploy ({error}): removing only what bootstrap created."
                );
            }
            Box::pin(fjord_deploy::destroy::destroy_bootstrapped(
                &blueprint, &options,
            ))
            .await?;
            return Ok(());
        }
    };
    Box::pin(fjord_deploy::destroy(&deployment, &options)).await?;
    Ok(())
}

async fn status(args: &Where) -> anyhow::Result<()> {
    let deployment = Deployment::load(&args.manifest)?;
    Box::pin(fjord_deploy::status(
        &deployment,
        args.endpoint_url.as_deref(),
    ))
    .await?;
    Ok(())
}

async fn diff(args: DiffArgs) -> anyhow::Result<()> {
    let deployment = Deployment::load(&args.at.manifest)?;
    let images = fjord_deploy::diff::DiffImages {
        server: args.server_image,
        consumer: args.consumer_image,
    };
    Box::pin(fjord_deploy::diff(
        &deployment,
        &images,
        args.at.endpoint_url.as_deref(),
    ))
    .await?;
    Ok(())
}

async fn rollback(args: RollbackArgs) -> anyhow::Result<()> {
    let deployment = Deployment::load(&args.common.at.manifest)?;
    let options = fjord_deploy::rollback::RollbackOptions {
        endpoint_url: args.common.at.endpoint_url,
        dry_run: args.common.dry_run,
        wait: (!args.no_wait).then(|| Duration::from_secs(args.wait_timeout)),
        poll: Duration::from_secs(args.common.poll_secs),
    };
    Box::pin(fjord_deploy::rollback(&deployment, &options)).await?;
    Ok(())
}

async fn verify(args: &Where) -> anyhow::Result<()> {
    let deployment = Deployment::load(&args.manifest)?;
    Box::pin(fjord_deploy::verify(
        &deployment,
        args.endpoint_url.as_deref(),
    ))
    .await?;
    Ok(())
}

fn policy(args: &PolicyArgs) -> anyhow::Result<()> {
    let blueprint = Blueprint::load(&args.manifest)?;
    let commands: Vec<policy::Command> = if args.commands.is_empty() {
        policy::Command::ALL.to_vec()
    } else {
        args.commands
            .iter()
            .map(|c| match c {
                PolicyFor::Deploy => policy::Command::Deploy,
                PolicyFor::Bootstrap => policy::Command::Bootstrap,
                PolicyFor::Destroy => policy::Command::Destroy,
            })
            .collect()
    };
    let document = policy::document(&blueprint, &commands);
    #[allow(clippy::print_stdout, reason = "the policy is the command's output")]
    {
        println!("{}", serde_json::to_string_pretty(&document)?);
    }
    Ok(())
}
