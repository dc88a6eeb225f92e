//! `fjord-deploy bootstrap`: creates what a deploy runs on, from an empty account — the
//! network, the security groups, the load balancer, ElastiCache with its AUTH token, the
//! ECS cluster, the roles and the log group — and writes their ids into the manifest.
//! Every part is looked up before it is made (by its name and the `fjord:deployment` tag),
//! so a second run changes nothing and an interrupted one resumes; a part the manifest
//! already names is used as it is. A dry run reads and reports the plan only.

mod network;
mod parts;

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use aws_sdk_ec2::types::SecurityGroup;
use aws_sdk_elasticache::types::ReplicationGroup;
use aws_sdk_elasticloadbalancingv2::types::TargetGroup;
use aws_sdk_iam::types::Role;
use serde_json::json;

use crate::clients::Clients;
use crate::config::{Blueprint, BootstrapConfig, Deployment};
use crate::document::Json;
use crate::error::DeployError;
use crate::output::{Ledger, announce, say};
use crate::ownership::{self, Named, Owned};
pub(crate) use network::describe_nat_gateway;
use network::{Network, Source};
use parts::Balancer;
pub use parts::percent_decode;
pub(crate) use parts::{
    Names, describe_load_balancer, ensure_log_group, refresh_execution_policy, role_policies,
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

impl Ctx<'_> {
    /// The resource `name` of kind `K`, judged for this deployment.
    async fn lookup<K: Named>(&self, name: &str) -> Result<Owned<K>, DeployError> {
        ownership::lookup(self.aws, self.name, name).await
    }

    /// The deployment's `K` named `name`, as `of` reads it; where there is none, `what` is
    /// noted in `created` and `create` makes it, but in a dry run (`None`: to be made).
    /// Another's of that name is refused.
    async fn find_or_create<K: Named, T, F>(
        &self,
        name: &str,
        what: &'static str,
        created: &mut Vec<&'static str>,
        of: impl FnOnce(K) -> T,
        create: impl FnOnce() -> F,
    ) -> Result<Option<T>, DeployError>
    where
        F: Future<Output = Result<T, DeployError>>,
    {
        if let Some(found) = self.lookup::<K>(name).await?.usable()? {
            return Ok(Some(of(found)));
        }
        created.push(what);
        if self.dry_run {
            return Ok(None);
        }
        create().await.map(Some)
    }
}

/// An id or ARN that the SDK may leave out, as the manifest takes it.
fn id(value: Option<&str>) -> String {
    value.unwrap_or_default().to_owned()
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

/// The steps of a bootstrap, in order: the ledger's labels.
const PHASES: [&str; 7] = [
    "network",
    "security groups",
    "load balancer",
    "Redis",
    "ECS cluster",
    "log group",
    "IAM roles",
];

/// Creates what the manifest at `file` needs and does not name, as `options` say.
pub async fn bootstrap(
    file: &Path,
    blueprint: &Blueprint,
    options: &BootstrapOptions,
) -> Result<(), DeployError> {
    let deploy = &blueprint.deploy;
    let aws = Clients::connect(&deploy.region, options.endpoint_url.as_deref()).await;
    let (name, region) = (&deploy.name, &deploy.region);
    let what = format!("what Fjord deployment {name} runs on in {region}");
    announce(options.dry_run, ["Planning", "Creating"], &what);
    let mut run = Run::new(&aws, blueprint, options);
    let net = run.network().await?;
    let groups = run.security_groups(&net).await?;
    let balancer = run.load_balancer(&net, groups.balancer.as_deref()).await?;
    let redis_secret = run.redis(&net, groups.redis.as_deref()).await?;
    run.cluster().await?;
    let log_group = run.log_group().await?;
    run.roles(&log_group, redis_secret.as_deref()).await?;
    report(&net, balancer.as_ref());
    write_back(file, &run.edits, options)
}

/// What the operator needs to know once it is all there.
fn report(net: &Network, balancer: Option<&Balancer>) {
    if !net.nat_addresses.is_empty() {
        say(format_args!(
            "Kafka must accept connections from the NAT gateways' addresses: {}",
            net.nat_addresses.join(", ")
        ));
    }
    if let Some(balancer) = balancer {
        say(format_args!(
            "Load balancer: {}://{}{} (answers once a deploy has run)",
            if balancer.https { "https" } else { "http" },
            balancer.dns_name,
            crate::plan::HEALTH_CHECK_PATH
        ));
    }
}

/// One bootstrap as it goes: each phase runs as a step of the ledger and adds what the
/// manifest is to name to the edits.
struct Run<'a> {
    ctx: Ctx<'a>,
    blueprint: &'a Blueprint,
    names: Names,
    ledger: Ledger,
    edits: Vec<Edit>,
}

/// The security groups bootstrap made or uses.
struct Groups {
    /// The load balancer's; none with a target group of your own.
    balancer: Option<String>,
    /// Redis's; none with a Redis of your own.
    redis: Option<String>,
}

impl<'a> Run<'a> {
    fn new(aws: &'a Clients, blueprint: &'a Blueprint, options: &BootstrapOptions) -> Self {
        let deploy = &blueprint.deploy;
        Self {
            ctx: Ctx {
                aws,
                name: &deploy.name,
                region: &deploy.region,
                settings: &deploy.bootstrap,
                dry_run: options.dry_run,
                timeout: options.timeout,
                poll: options.poll,
            },
            blueprint,
            names: Names::of(&deploy.name),
            ledger: Ledger::new(PHASES.iter().map(|s| (*s).to_owned()).collect()),
            edits: Vec::new(),
        }
    }

    /// Records a phase for which the manifest names a resource of yours.
    async fn yours<T>(&mut self, phase: &str, value: T, line: String) -> Result<T, DeployError> {
        self.ledger
            .run(phase.to_owned(), async { Ok((value, line)) })
            .await
    }

    /// The deployment's own network, else the one the manifest names, else a new one.
    async fn network(&mut self) -> Result<Network, DeployError> {
        let (ctx, deploy) = (&self.ctx, &self.blueprint.deploy);
        let own_vpc = network::find_vpc(ctx).await?;
        let named_subnets = &deploy.network.subnets;
        if own_vpc.is_none() && !named_subnets.is_empty() {
            let vpc = network::vpc_of(ctx, named_subnets).await?;
            let line = format!("yours: {vpc} ($.deploy.network.subnets)");
            let net = Network {
                vpc,
                public: deploy.bootstrap.load_balancer_subnets.clone(),
                private: named_subnets.clone(),
                nat_addresses: Vec::new(),
            };
            return self.yours("network", net, line).await;
        }
        let zones = network::zones(ctx, deploy.bootstrap.availability_zones).await?;
        let net = self
            .ledger
            .run("network".to_owned(), Box::pin(network::ensure(ctx, &zones)))
            .await?;
        self.edits.push(Edit::set(
            &["deploy", "network", "subnets"],
            json!(net.private),
        ));
        Ok(net)
    }

    /// Security groups: load balancer → tasks on the server port, tasks → Redis; none
    /// for a load balancer or Redis of your own, nor for tasks in groups you name.
    async fn security_groups(&mut self, net: &Network) -> Result<Groups, DeployError> {
        let (ctx, deploy, names) = (&self.ctx, &self.blueprint.deploy, &self.names);
        let own_target_group = ctx.lookup::<TargetGroup>(&names.target_group).await?;
        let byo_balancer =
            own_target_group.usable()?.is_none() && deploy.target_group_arn().is_some();
        let own_redis = ctx.lookup::<ReplicationGroup>(&names.redis).await?;
        let byo_redis = own_redis.usable()?.is_none() && !deploy.bootstrap.redis.create;
        let port = self.blueprint.manifest.server.port;
        let vpc = &net.vpc;
        let (tasks, groups, byo_groups) = self
            .ledger
            .run("security groups".to_owned(), async {
                let mut made = Vec::new();
                let balancer = if byo_balancer {
                    None
                } else {
                    let ports: &[i32] = if deploy.bootstrap.certificate_arn.is_some() {
                        &[443, 80]
                    } else {
                        &[80]
                    };
                    let name = format!("{}-lb", deploy.name);
                    let about = "Fjord load balancer: HTTP(S) from anywhere";
                    let id = network::security_group(
                        ctx,
                        vpc,
                        &name,
                        about,
                        ports,
                        &Source::Anywhere,
                        &mut made,
                    );
                    Some(id.await?)
                };
                let own_tasks = format!("{}-tasks", deploy.name);
                let named_groups = &deploy.network.security_groups;
                let byo_groups = !named_groups.is_empty()
                    && ctx
                        .lookup::<SecurityGroup>(&own_tasks)
                        .await?
                        .ours()
                        .is_none();
                let tasks = if byo_groups {
                    named_groups.clone()
                } else {
                    let from = Source::Groups(balancer.iter().cloned().collect());
                    let server_port = [i32::from(port)];
                    let ports: &[i32] = if balancer.is_some() {
                        &server_port
                    } else {
                        &[]
                    };
                    let about = "Fjord tasks: the server port from the load balancer";
                    let id = network::security_group(
                        ctx, vpc, &own_tasks, about, ports, &from, &mut made,
                    );
                    vec![id.await?]
                };
                let redis = if byo_redis {
                    None
                } else {
                    let name = format!("{}-redis", deploy.name);
                    let from = Source::Groups(tasks.clone());
                    let about = "Fjord Redis: from the tasks";
                    let id =
                        network::security_group(ctx, vpc, &name, about, &[6379], &from, &mut made);
                    Some(id.await?)
                };
                let outcome = if made.is_empty() {
                    format!("exist: tasks {}", tasks.join(", "))
                } else if ctx.dry_run {
                    format!("would create or complete {}", made.join(", "))
                } else {
                    format!("created or completed {}", made.join(", "))
                };
                Ok(((tasks, Groups { balancer, redis }, byo_groups), outcome))
            })
            .await?;
        if !byo_groups {
            self.edits.push(Edit::set(
                &["deploy", "network", "security_groups"],
                json!(tasks),
            ));
            self.edits.push(Edit::set(
                &["deploy", "network", "assign_public_ip"],
                json!(false),
            ));
        }
        Ok(groups)
    }

    /// The load balancer in the load balancer's `group`; none where the manifest names a
    /// target group of yours (no group).
    async fn load_balancer(
        &mut self,
        net: &Network,
        group: Option<&str>,
    ) -> Result<Option<Balancer>, DeployError> {
        let Some(group) = group else {
            let line = "yours ($.deploy.services.server.target_group_arn)".into();
            return self.yours("load balancer", None, line).await;
        };
        if net.public.is_empty() {
            return Err(DeployError::Precondition {
                resource: "$.deploy.bootstrap.load_balancer_subnets".into(),
                message: "with subnets of your own, name the public subnets the load balancer goes in (or name your target group in $.deploy.services.server.target_group_arn)".into(),
            });
        }
        let server = &self.blueprint.manifest.server;
        let balancer = self
            .ledger
            .run(
                "load balancer".to_owned(),
                Box::pin(parts::load_balancer(
                    &self.ctx,
                    &net.vpc,
                    &net.public,
                    group,
                    server.port,
                    server.heartbeat_secs,
                )),
            )
            .await?;
        self.edits.push(Edit::set(
            &["deploy", "services", "server", "target_group_arn"],
            json!(balancer.target_group_arn),
        ));
        Ok(Some(balancer))
    }

    /// ElastiCache with its AUTH token, in Redis's `group`; none where the manifest names
    /// a Redis of yours (no group). Returns the token's secret.
    async fn redis(
        &mut self,
        net: &Network,
        group: Option<&str>,
    ) -> Result<Option<String>, DeployError> {
        let manifest = &self.blueprint.manifest;
        let Some(group) = group else {
            let line = format!("yours: {}", manifest.redis.url);
            return self.yours("Redis", None, line).await;
        };
        let redis = self
            .ledger
            .run(
                "Redis".to_owned(),
                Box::pin(parts::redis(&self.ctx, &net.private, group)),
            )
            .await?;
        let env = manifest
            .redis
            .password_env
            .as_ref()
            .map_or(REDIS_PASSWORD_ENV, |secret| secret.env_name())
            .to_owned();
        self.edits
            .push(Edit::set(&["redis", "url"], json!(redis.url)));
        // ElastiCache's AUTH token is the `default` user's password.
        self.edits.push(Edit::remove(&["redis", "username"]));
        self.edits
            .push(Edit::set(&["redis", "password_env"], json!(env)));
        self.edits.push(Edit::set(
            &["deploy", "secrets", &env],
            json!(redis.secret_arn),
        ));
        Ok(Some(redis.secret_arn))
    }

    async fn cluster(&mut self) -> Result<(), DeployError> {
        let deploy = &self.blueprint.deploy;
        let named = deploy.cluster.is_some();
        let cluster = self
            .ledger
            .run(
                "ECS cluster".to_owned(),
                parts::cluster(&self.ctx, deploy.cluster_name(), named),
            )
            .await?;
        self.edits
            .push(Edit::set(&["deploy", "cluster"], json!(cluster)));
        Ok(())
    }

    /// The log group, keeping the days the manifest says; returns its name.
    async fn log_group(&mut self) -> Result<String, DeployError> {
        let deploy = &self.blueprint.deploy;
        let log_group = deploy.log_group();
        let named = deploy.logs.as_ref().and_then(|l| l.retention_days);
        let retention = named.unwrap_or(DEFAULT_RETENTION_DAYS);
        self.ledger
            .run(
                "log group".to_owned(),
                parts::log_group(&self.ctx, &log_group, retention),
            )
            .await?;
        self.edits
            .push(Edit::set(&["deploy", "logs", "group"], json!(log_group)));
        if named.is_none() {
            self.edits.push(Edit::set(
                &["deploy", "logs", "retention_days"],
                json!(retention),
            ));
        }
        Ok(log_group)
    }

    /// The execution role, with the policy that lets ECS start the tasks (pull, log, read
    /// the secrets, `redis_secret` among them), and the task role.
    async fn roles(
        &mut self,
        log_group: &str,
        redis_secret: Option<&str>,
    ) -> Result<(), DeployError> {
        let (ctx, deploy, names) = (&self.ctx, &self.blueprint.deploy, &self.names);
        let secrets: Vec<&str> = (deploy.secrets.values().map(String::as_str))
            .chain(redis_secret)
            .filter(|arn| *arn != PLANNED)
            .collect();
        let (execution, task) = self
            .ledger
            .run("IAM roles".to_owned(), async {
                let execution_policy = |arn: &str| {
                    let (region, name, keys) = (&deploy.region, &deploy.name, &deploy.kms_key_arns);
                    Some(parts::execution_policy(
                        arn, region, name, log_group, &secrets, keys,
                    ))
                };
                let named = deploy.roles.execution_role_arn.is_some();
                let execution = role(
                    ctx,
                    "execution",
                    &names.execution_role,
                    named,
                    execution_policy,
                );
                let execution = execution.await?;
                // Fjord's processes call no AWS API (metrics leave as log lines), so the
                // task role has no policy at all.
                let named = deploy.roles.task_role_arn.is_some();
                let task = role(ctx, "task", &names.task_role, named, |_| None).await?;
                Ok((
                    (execution.0, task.0),
                    format!("{}; {}", execution.1, task.1),
                ))
            })
            .await?;
        if let Some(arn) = execution {
            self.edits.push(Edit::set(
                &["deploy", "roles", "execution_role_arn"],
                json!(arn),
            ));
        }
        if let Some(arn) = task {
            self.edits
                .push(Edit::set(&["deploy", "roles", "task_role_arn"], json!(arn)));
        }
        Ok(())
    }
}

/// Finds or creates the `which` role `name`, with the inline `policy` of its ARN, unless
/// the manifest names one of yours (`named`) and bootstrap made none. Returns its ARN
/// where it is the deployment's, and the part of the outcome that says what was done.
async fn role(
    ctx: &Ctx<'_>,
    which: &str,
    name: &str,
    named: bool,
    policy: impl FnOnce(&str) -> Option<serde_json::Value>,
) -> Result<(Option<String>, String), DeployError> {
    if named && ctx.lookup::<Role>(name).await?.ours().is_none() {
        return Ok((None, format!("{which} role yours")));
    }
    let (arn, new) = parts::role(ctx, name).await?;
    let changed = match policy(&arn) {
        Some(_) if arn == PLANNED => true,
        Some(policy) => parts::put_policy(ctx, name, &policy).await?,
        None => false,
    };
    let line = role_line(ctx, name, new, changed);
    Ok((Some(arn), line))
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
