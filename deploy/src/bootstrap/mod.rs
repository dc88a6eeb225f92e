//! `fjord-deploy bootstrap`: creates what a deploy runs on, from an empty account — the
//! network, the security groups, the load balancer, ElastiCache with its AUTH token, the
//! ECS cluster, the roles and the log group — and writes their ids into the manifest.
//! Every part is looked up before it is made (by its name and the `fjord:deployment` tag),
//! so a second run changes nothing and an interrupted one resumes; a part the manifest
//! already names is used as it is. A dry run reads and reports the plan only.

mod network;
mod parts;

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::clients::Clients;
use crate::config::{Blueprint, BootstrapConfig, Deployment};
use crate::document::Json;
use crate::error::DeployError;
use crate::output::{Ledger, say};
use network::Source;
pub(crate) use network::{describe_nat_gateway, tagged};
pub use parts::percent_decode;
pub(crate) use parts::{
    Names, describe_load_balancer, describe_replication_group, find_cluster, find_load_balancer,
    find_redis, find_role, find_secret, find_subnet_group, find_target_group,
    refresh_execution_policy,
};

/// The id shown for what a dry run would create.
const PLANNED: &str = "(new)";
/// The environment variable of the Redis AUTH token when the manifest names none.
const REDIS_PASSWORD_ENV: &str = "FJORD_REDIS_PASSWORD";
/// Days of logs kept when the manifest says nothing.
const DEFAULT_RETENTION_DAYS: i32 = 30;

/// How to run a bootstrap.
#[derive(Debug, Clone)]
pub struct BootstrapOptions {
    /// Report the plan, create nothing, write nothing.
    pub dry_run: bool,
    /// Send AWS calls here instead of AWS (an emulator).
    pub endpoint_url: Option<String>,
    /// Write the ids into the manifest; otherwise print the lines to add.
    pub write: bool,
    /// How long to wait for each slow part (NAT gateways, ElastiCache, load balancer).
    pub timeout: Duration,
    /// How often to look while waiting.
    pub poll: Duration,
}

/// What the parts share.
pub(crate) struct Ctx<'a> {
    aws: &'a Clients,
    /// `$.deploy.name`.
    name: &'a str,
    region: &'a str,
    settings: &'a BootstrapConfig,
    dry_run: bool,
    timeout: Duration,
    poll: Duration,
}

impl<'a> Ctx<'a> {
    /// The context of a teardown, which creates nothing.
    pub(crate) fn removing(
        aws: &'a Clients,
        name: &'a str,
        region: &'a str,
        settings: &'a BootstrapConfig,
        dry_run: bool,
    ) -> Self {
        Self {
            aws,
            name,
            region,
            settings,
            dry_run,
            timeout: Duration::ZERO,
            poll: Duration::ZERO,
        }
    }
}

/// A value for the manifest, at its JSON path.
struct Edit {
    path: Vec<String>,
    value: Option<Json>,
}

impl Edit {
    fn set(path: &[&str], value: serde_json::Value) -> Self {
        Self {
            path: path.iter().map(|p| (*p).to_owned()).collect(),
            value: Some(Json::from_value(value)),
        }
    }

    fn remove(path: &[&str]) -> Self {
        Self {
            path: path.iter().map(|p| (*p).to_owned()).collect(),
            value: None,
        }
    }

    fn json_path(&self) -> String {
        format!("$.{}", self.path.join("."))
    }
}

/// Creates what the manifest at `file` needs and does not name, as `options` say.
pub async fn bootstrap(
    file: &Path,
    blueprint: &Blueprint,
    options: &BootstrapOptions,
) -> Result<(), DeployError> {
    let deploy = &blueprint.deploy;
    let aws = Clients::connect(&deploy.region, options.endpoint_url.as_deref()).await;
    let ctx = Ctx {
        aws: &aws,
        name: &deploy.name,
        region: &deploy.region,
        settings: &deploy.bootstrap,
        dry_run: options.dry_run,
        timeout: options.timeout,
        poll: options.poll,
    };
    say(format_args!(
        "{} what Fjord deployment {} runs on in {}{}",
        if options.dry_run {
            "Planning"
        } else {
            "Creating"
        },
        deploy.name,
        deploy.region,
        if options.dry_run {
            " (dry run: nothing will be changed)"
        } else {
            ""
        },
    ));
    let names = Names::of(&deploy.name);
    let settings = &deploy.bootstrap;
    let mut edits = Vec::new();
    let mut ledger = Ledger::new(
        [
            "network",
            "security groups",
            "load balancer",
            "Redis",
            "ECS cluster",
            "log group",
            "IAM roles",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect(),
    );

    // The network: the deployment's own, else the one the manifest names, else a new one.
    let own_vpc = network::find_vpc(&ctx).await?;
    let named_subnets = &deploy.network.subnets;
    let byo_network = own_vpc.is_none() && !named_subnets.is_empty();
    let net = if byo_network {
        let vpc = network::vpc_of(&ctx, named_subnets).await?;
        let net = network::Network {
            vpc: vpc.clone(),
            public: settings.load_balancer_subnets.clone(),
            private: named_subnets.clone(),
            nat_addresses: Vec::new(),
        };
        ledger
            .run("network".to_owned(), async {
                Ok((net, format!("yours: {vpc} ($.deploy.network.subnets)")))
            })
            .await?
    } else {
        let zones = network::zones(&ctx, settings.availability_zones).await?;
        let net = ledger
            .run(
                "network".to_owned(),
                Box::pin(network::ensure(&ctx, &zones)),
            )
            .await?;
        edits.push(Edit::set(
            &["deploy", "network", "subnets"],
            json!(net.private),
        ));
        net
    };

    // The load balancer, unless the manifest names a target group of its own.
    let own_target_group = find_target_group(&ctx)
        .await?
        .usable(&format!("target group {}", names.target_group))?;
    let byo_balancer = own_target_group.is_none() && deploy.target_group_arn().is_some();
    let own_redis = find_redis(&ctx)
        .await?
        .usable(&format!("ElastiCache replication group {}", names.redis))?;
    let byo_redis = own_redis.is_none() && !settings.redis.create;
    let port = blueprint.manifest.server.port;

    // Security groups: load balancer → tasks on the server port, tasks → Redis.
    let (task_groups, lb_group, redis_group, byo_groups) = ledger
        .run("security groups".to_owned(), async {
            let mut made = Vec::new();
            let lb_group = if byo_balancer {
                None
            } else {
                let ports: &[i32] = if settings.certificate_arn.is_some() {
                    &[443, 80]
                } else {
                    &[80]
                };
                let name = format!("{}-lb", deploy.name);
                let (id, new) = network::security_group(
                    &ctx,
                    &net.vpc,
                    &name,
                    "Fjord load balancer: HTTP(S) from anywhere",
                    ports,
                    &Source::Anywhere,
                )
                .await?;
                if new {
                    made.push(name);
                }
                Some(id)
            };
            let own_tasks = format!("{}-tasks", deploy.name);
            let named_groups = &deploy.network.security_groups;
            let byo_groups = !named_groups.is_empty()
                && network::find_security_group(&ctx, &own_tasks)
                    .await?
                    .is_none();
            let task_groups = if !byo_groups {
                let from = Source::Groups(lb_group.iter().cloned().collect());
                let server_port = [i32::from(port)];
                let ports: &[i32] = if lb_group.is_some() {
                    &server_port
                } else {
                    &[]
                };
                let (id, new) = network::security_group(
                    &ctx,
                    &net.vpc,
                    &own_tasks,
                    "Fjord tasks: the server port from the load balancer",
                    ports,
                    &from,
                )
                .await?;
                if new {
                    made.push(own_tasks);
                }
                vec![id]
            } else {
                named_groups.clone()
            };
            let redis_group = if byo_redis {
                None
            } else {
                let name = format!("{}-redis", deploy.name);
                let (id, new) = network::security_group(
                    &ctx,
                    &net.vpc,
                    &name,
                    "Fjord Redis: from the tasks",
                    &[6379],
                    &Source::Groups(task_groups.clone()),
                )
                .await?;
                if new {
                    made.push(name);
                }
                Some(id)
            };
            let outcome = if made.is_empty() {
                format!("exist: tasks {}", task_groups.join(", "))
            } else if ctx.dry_run {
                format!("would create or complete {}", made.join(", "))
            } else {
                format!("created or completed {}", made.join(", "))
            };
            Ok(((task_groups, lb_group, redis_group, byo_groups), outcome))
        })
        .await?;
    if !byo_groups {
        edits.push(Edit::set(
            &["deploy", "network", "security_groups"],
            json!(task_groups),
        ));
        edits.push(Edit::set(
            &["deploy", "network", "assign_public_ip"],
            json!(false),
        ));
    }

    let balancer = match lb_group {
        Some(lb_group) => {
            if net.public.is_empty() {
                return Err(DeployError::Precondition {
                    resource: "$.deploy.bootstrap.load_balancer_subnets".into(),
                    message: "with subnets of your own, name the public subnets the load balancer goes in (or name your target group in $.deploy.services.server.target_group_arn)".into(),
                });
            }
            let balancer = ledger
                .run(
                    "load balancer".to_owned(),
                    Box::pin(parts::load_balancer(
                        &ctx,
                        &net.vpc,
                        &net.public,
                        &lb_group,
                        port,
                        blueprint.manifest.server.heartbeat_secs,
                    )),
                )
                .await?;
            edits.push(Edit::set(
                &["deploy", "services", "server", "target_group_arn"],
                json!(balancer.target_group_arn),
            ));
            Some(balancer)
        }
        None => {
            ledger
                .run("load balancer".to_owned(), async {
                    Ok((
                        (),
                        "yours ($.deploy.services.server.target_group_arn)".into(),
                    ))
                })
                .await?;
            None
        }
    };

    let mut secret_arns: Vec<String> = deploy.secrets.values().cloned().collect();
    match redis_group {
        Some(group) => {
            let redis = ledger
                .run(
                    "Redis".to_owned(),
                    Box::pin(parts::redis(&ctx, &net.private, &group)),
                )
                .await?;
            let env = blueprint
                .manifest
                .redis
                .password_env
                .as_ref()
                .map_or(REDIS_PASSWORD_ENV, |secret| secret.env_name())
                .to_owned();
            edits.push(Edit::set(&["redis", "url"], json!(redis.url)));
            // ElastiCache's AUTH token is the `default` user's password.
            edits.push(Edit::remove(&["redis", "username"]));
            edits.push(Edit::set(&["redis", "password_env"], json!(env)));
            edits.push(Edit::set(
                &["deploy", "secrets", &env],
                json!(redis.secret_arn),
            ));
            secret_arns.push(redis.secret_arn);
        }
        None => {
            ledger
                .run("Redis".to_owned(), async {
                    Ok(((), format!("yours: {}", blueprint.manifest.redis.url)))
                })
                .await?;
        }
    }

    let cluster = ledger
        .run(
            "ECS cluster".to_owned(),
            parts::cluster(&ctx, deploy.cluster_name(), deploy.cluster.is_some()),
        )
        .await?;
    edits.push(Edit::set(&["deploy", "cluster"], json!(cluster)));

    let log_group = deploy.log_group();
    let retention = deploy
        .logs
        .as_ref()
        .and_then(|l| l.retention_days)
        .unwrap_or(DEFAULT_RETENTION_DAYS);
    ledger
        .run(
            "log group".to_owned(),
            parts::log_group(&ctx, &log_group, retention),
        )
        .await?;
    edits.push(Edit::set(&["deploy", "logs", "group"], json!(log_group)));
    if deploy
        .logs
        .as_ref()
        .and_then(|l| l.retention_days)
        .is_none()
    {
        edits.push(Edit::set(
            &["deploy", "logs", "retention_days"],
            json!(retention),
        ));
    }

    let roles = ledger
        .run("IAM roles".to_owned(), async {
            let mut lines = Vec::new();
            let mut arns = (None, None);
            let named_execution = deploy.roles.execution_role_arn.as_deref();
            let own_execution = find_role(&ctx, &names.execution_role).await?.ours();
            if own_execution.is_none() && named_execution.is_some() {
                lines.push("execution role yours".to_owned());
            } else {
                let (arn, new) = parts::role(&ctx, &names.execution_role).await?;
                let secrets: Vec<&str> = secret_arns
                    .iter()
                    .map(String::as_str)
                    .filter(|arn| *arn != PLANNED)
                    .collect();
                let policy = parts::execution_policy(
                    &arn,
                    &deploy.region,
                    &deploy.name,
                    &log_group,
                    &secrets,
                    &deploy.kms_key_arns,
                );
                let changed = if arn == PLANNED {
                    true
                } else {
                    parts::put_policy(&ctx, &names.execution_role, &policy).await?
                };
                lines.push(role_line(&ctx, &names.execution_role, new, changed));
                arns.0 = Some(arn);
            }
            let own_task = find_role(&ctx, &names.task_role).await?.ours();
            if own_task.is_none() && deploy.roles.task_role_arn.is_some() {
                lines.push("task role yours".to_owned());
            } else {
                // Fjord's processes call no AWS API (metrics leave as log lines), so the
                // task role has no policy at all.
                let (arn, new) = parts::role(&ctx, &names.task_role).await?;
                lines.push(role_line(&ctx, &names.task_role, new, false));
                arns.1 = Some(arn);
            }
            Ok((arns, lines.join("; ")))
        })
        .await?;
    if let Some(arn) = roles.0 {
        edits.push(Edit::set(
            &["deploy", "roles", "execution_role_arn"],
            json!(arn),
        ));
    }
    if let Some(arn) = roles.1 {
        edits.push(Edit::set(&["deploy", "roles", "task_role_arn"], json!(arn)));
    }

    if !net.nat_addresses.is_empty() {
        say(format_args!(
            "Kafka must accept connections from the NAT gateways' addresses: {}",
            net.nat_addresses.join(", ")
        ));
    }
    if let Some(balancer) = &balancer {
        say(format_args!(
            "Load balancer: {}://{}{} (answers once a deploy has run)",
            if balancer.https { "https" } else { "http" },
            balancer.dns_name,
            crate::plan::HEALTH_CHECK_PATH
        ));
    }
    write_back(file, &edits, options)
}

fn role_line(ctx: &Ctx<'_>, name: &str, new: bool, policy_changed: bool) -> String {
    match (new, policy_changed, ctx.dry_run) {
        (true, _, true) => format!("would create {name}"),
        (true, _, false) => format!("created {name}"),
        (false, true, true) => format!("{name} exists, would update its policy"),
        (false, true, false) => format!("{name} exists, updated its policy"),
        (false, false, _) => format!("{name} exists"),
    }
}

/// Writes the edits into the manifest (or prints them), then says whether a deploy can
/// run on it as it now is.
fn write_back(file: &Path, edits: &[Edit], options: &BootstrapOptions) -> Result<(), DeployError> {
    let resource = format!("manifest {}", file.display());
    let failed = |message: String| DeployError::Aws {
        resource: resource.clone(),
        message,
    };
    let text = std::fs::read_to_string(file).map_err(|e| failed(format!("reading it: {e}")))?;
    let mut document = Json::parse(&text).map_err(|e| failed(format!("parsing it: {e}")))?;
    let mut changed = Vec::new();
    for edit in edits {
        let path: Vec<&str> = edit.path.iter().map(String::as_str).collect();
        let done = match &edit.value {
            Some(value) => document.set(&path, value.clone()),
            None => document.remove(&path),
        };
        if done {
            changed.push(edit);
        }
    }
    if changed.is_empty() {
        say(format_args!(
            "The manifest {} already names all of it.",
            file.display()
        ));
        return check(file, &text);
    }
    if options.dry_run || !options.write {
        say(format_args!(
            "{} {}:",
            if options.dry_run {
                "Would set in"
            } else {
                "Set these in"
            },
            file.display()
        ));
        for edit in &changed {
            match &edit.value {
                Some(value) => say(format_args!(
                    "  {} = {}",
                    edit.json_path(),
                    value.pretty().trim_end().replace('\n', "\n    ")
                )),
                None => say(format_args!("  remove {}", edit.json_path())),
            }
        }
        return Ok(());
    }
    let written = document.pretty();
    std::fs::write(file, &written).map_err(|e| failed(format!("writing it: {e}")))?;
    say(format_args!(
        "Wrote {} value(s) into {}: {}",
        changed.len(),
        file.display(),
        changed
            .iter()
            .map(|e| e.json_path())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    check(file, &written)
}

/// Says whether a deploy accepts the manifest as it is now.
fn check(file: &Path, text: &str) -> Result<(), DeployError> {
    match Deployment::parse(text, file) {
        Ok(_) => say(format_args!(
            "Next: fjord-deploy deploy {} (with the image archives)",
            file.display()
        )),
        Err(error) => say(format_args!(
            "Before a deploy, the manifest still needs a fix by hand: {error}"
        )),
    }
    Ok(())
}
