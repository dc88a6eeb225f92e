//! Carries a deploy out: reads the image archives, checks with read-only calls that the
//! cluster and the target group are there, then works through the steps in order — ECR
//! repositories, image pushes, log group, task definitions, services, autoscaling — each
//! reading what AWS has first and changing only what differs from the plan. A dry run
//! reads and reports but never changes. Everything created is tagged with the deployment's
//! name; the services of consumer groups gone from the manifest are pruned once the wanted
//! ones are in place. Each
//! step reports as it finishes; a failing step ends the deploy with what was done and what
//! was not.

use std::path::PathBuf;
use std::time::Duration;

use aws_sdk_applicationautoscaling::types::{PolicyType, ScalableDimension, ServiceNamespace};
use aws_sdk_ecr::types::{ImageScanningConfiguration, ImageTagMutability};
use aws_sdk_ecs::types::ServiceField;
use aws_sdk_ecs::types::{
    Compatibility, LaunchType, NetworkMode, PropagateTags, Service, Tag, TaskDefinitionField,
};
use aws_sdk_elasticloadbalancingv2::types::{Action, ActionTypeEnum};
use base64::Engine as _;

use crate::archive::Image;
use crate::bootstrap;
use crate::clients::Clients;
use crate::config::Deployment;
use crate::destroy::{self, Family, FoundService};
use crate::error::DeployError;
use crate::output::{Ledger, Outcome, announce, revision, say};
use crate::ownership::Named;
use crate::plan::{
    self, DEPLOYMENT_TAG, DEREGISTRATION_DELAY_SECS, FINGERPRINT_TAG, HEALTH_CHECK_PATH, Plan,
    Role, ServiceSpec, TaskDefinitionSpec,
};
use crate::registry::{Endpoint, Registry};
use crate::wait;

/// How to run a deploy.
#[derive(Debug, Clone)]
pub struct Options {
    /// The server's image archive.
    pub server_image: PathBuf,
    /// The consumer's image archive.
    pub consumer_image: PathBuf,
    /// Report what would change, change nothing.
    pub dry_run: bool,
    /// Send AWS calls here instead of AWS (an emulator).
    pub endpoint_url: Option<String>,
    /// Push images here instead of the ECR registry.
    pub registry: Option<Endpoint>,
    /// How long to wait for the services to become stable; `None`: do not wait.
    pub wait: Option<Duration>,
    /// How often to look while waiting.
    pub poll: Duration,
}

/// How long a pruned service may take to stop its tasks when the deploy does not wait.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(900);
/// The images an ECR repository keeps, newest first.
const KEPT_IMAGES: u32 = 30;
/// The step that keeps the execution role's policy up to the manifest's secrets.
const EXECUTION_ROLE_STEP: &str = "execution role";
/// Why a service or task definition is pruned.
const GONE: &str = "(consumer group no longer in the manifest)";

/// Deploys `deployment` as `options` say.
pub async fn deploy(deployment: &Deployment, options: &Options) -> Result<(), DeployError> {
    let deploy = &deployment.deploy;
    let images = [
        (
            Role::Server,
            Image::read(&options.server_image, deploy.architecture)?,
        ),
        (
            Role::Consumer,
            Image::read(&options.consumer_image, deploy.architecture)?,
        ),
    ];
    let aws = Clients::connect(&deploy.region, options.endpoint_url.as_deref()).await;
    let addresses = check_prerequisites(&aws, deployment).await?;
    let (ecr_host, registry) = login(&aws, options.registry.clone()).await?;
    let image_ref = |role: Role| {
        images
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, image)| {
                format!(
                    "{ecr_host}/{}@{}",
                    plan::repository(deployment, role),
                    image.manifest.digest
                )
            })
            .unwrap_or_default()
    };
    let plan = Plan::new(
        deployment,
        &image_ref(Role::Server),
        &image_ref(Role::Consumer),
    );
    plan.check_size()
        .map_err(|message| DeployError::Precondition {
            resource: "task definitions".into(),
            message,
        })?;

    let (name, cluster, region) = (&deploy.name, &deploy.cluster, &deploy.region);
    let what = format!("{name} to ECS cluster {cluster} in {region}");
    announce(
        options.dry_run,
        ["Planning the deploy of", "Deploying"],
        &what,
    );
    for (role, image) in &images {
        say(format_args!(
            "  image {}: {} ({}, revision {})",
            role.as_str(),
            image.source.display(),
            image.manifest.digest,
            image.revision.as_deref().unwrap_or("unknown"),
        ));
    }

    let names: Vec<&str> = plan.services.iter().map(|s| s.name.as_str()).collect();
    let families: Vec<&str> = plan
        .task_definitions
        .iter()
        .map(|t| t.family.as_str())
        .collect();
    let stale = Stale {
        services: destroy::services(&aws, deployment, &names).await?,
        families: destroy::families(&aws, deployment, &families).await?,
    };

    let step = Step {
        aws: &aws,
        deployment,
        dry_run: options.dry_run,
        drain_timeout: options.wait.unwrap_or(DRAIN_TIMEOUT),
        poll: options.poll,
    };
    let mut ledger = Ledger::new(step_labels(deployment, &plan, &stale, options));
    for (role, _) in &images {
        let repository = plan::repository(deployment, *role);
        ledger
            .run(
                format!("ECR repository {repository}"),
                step.repository(&repository),
            )
            .await?;
    }
    for (role, image) in &images {
        let repository = plan::repository(deployment, *role);
        ledger
            .run(
                format!("image {repository}"),
                Box::pin(step.push(&registry, &repository, image)),
            )
            .await?;
    }
    ledger
        .run(
            format!("log group {}", deploy.logs.group),
            Box::pin(step.log_group()),
        )
        .await?;
    ledger
        .run(
            EXECUTION_ROLE_STEP.to_owned(),
            Box::pin(bootstrap::refresh_execution_policy(
                &aws,
                deployment,
                options.dry_run,
            )),
        )
        .await?;
    let mut arns = Vec::with_capacity(plan.task_definitions.len());
    for spec in &plan.task_definitions {
        arns.push(
            ledger
                .run(
                    format!("task definition {}", spec.family),
                    Box::pin(step.task_definition(spec)),
                )
                .await?,
        );
    }
    for (spec, arn) in plan.services.iter().zip(&arns) {
        ledger
            .run(
                format!("service {}", spec.name),
                Box::pin(step.service(spec, arn)),
            )
            .await?;
    }
    ledger
        .run(
            format!("autoscaling of {}", plan.scaling.resource_id),
            Box::pin(step.scaling(&plan.scaling)),
        )
        .await?;
    for service in &stale.services {
        ledger
            .run(
                format!("service {} {GONE}", service.name),
                Box::pin(destroy::remove_service(
                    &aws,
                    &deploy.cluster,
                    service,
                    options.dry_run,
                    options.wait.unwrap_or(DRAIN_TIMEOUT),
                    options.poll,
                )),
            )
            .await?;
    }
    for family in &stale.families {
        ledger
            .run(
                format!("task definition {} {GONE}", family.name),
                destroy::remove_family(&aws, family, options.dry_run),
            )
            .await?;
    }

    if options.dry_run {
        say("Dry run: nothing was changed.");
        return Ok(());
    }
    let (timeout, poll) = (options.wait, options.poll);
    wait::stable_step(
        &mut ledger,
        &aws.ecs,
        &deploy.cluster,
        &names,
        &arns,
        timeout,
        poll,
    )
    .await?;
    wait::print_status(
        &aws.ecs,
        &deploy.cluster,
        &names,
        &addresses,
        &deploy.services.server.target_group_arn,
    )
    .await
}

/// What earlier deploys made that the manifest no longer wants.
struct Stale {
    services: Vec<FoundService>,
    families: Vec<Family>,
}

/// The labels of every step, in order, for the report of what was not done.
fn step_labels(
    deployment: &Deployment,
    plan: &Plan,
    stale: &Stale,
    options: &Options,
) -> Vec<String> {
    let mut labels: Vec<String> = Role::ALL
        .iter()
        .map(|role| format!("ECR repository {}", plan::repository(deployment, *role)))
        .collect();
    labels.extend(
        Role::ALL
            .iter()
            .map(|role| format!("image {}", plan::repository(deployment, *role))),
    );
    labels.push(format!("log group {}", deployment.deploy.logs.group));
    labels.push(EXECUTION_ROLE_STEP.to_owned());
    labels.extend(
        plan.task_definitions
            .iter()
            .map(|spec| format!("task definition {}", spec.family)),
    );
    labels.extend(
        plan.services
            .iter()
            .map(|spec| format!("service {}", spec.name)),
    );
    labels.push(format!("autoscaling of {}", plan.scaling.resource_id));
    labels.extend(
        stale
            .services
            .iter()
            .map(|s| format!("service {} {GONE}", s.name)),
    );
    labels.extend(
        stale
            .families
            .iter()
            .map(|f| format!("task definition {} {GONE}", f.name)),
    );
    if options.wait.is_some() && !options.dry_run {
        labels.push(wait::STABLE_STEP.to_owned());
    }
    labels
}

/// What ELB uses when the attribute was never set.
const DEFAULT_DEREGISTRATION_DELAY_SECS: u64 = 300;

/// Read-only checks before the first change: the cluster is active; the target group
/// routes to IP targets, probes `/readyz`, lets a task go within the drain, and a
/// listener forwards to it; its load balancers keep idle connections longer than the
/// heartbeat. Returns the load balancers' addresses.
async fn check_prerequisites(
    aws: &Clients,
    deployment: &Deployment,
) -> Result<Vec<String>, DeployError> {
    let deploy = &deployment.deploy;
    let cluster = format!("ECS cluster {}", deploy.cluster);
    let clusters = aws
        .ecs
        .describe_clusters()
        .clusters(&deploy.cluster)
        .send()
        .await
        .map_err(|e| DeployError::aws(&cluster, "DescribeClusters", &e))?;
    let active = clusters
        .clusters()
        .iter()
        .any(|c| c.status() == Some("ACTIVE"));
    if !active {
        return Err(DeployError::Precondition {
            resource: cluster,
            message: "not found or not active; create the cluster first".into(),
        });
    }

    let arn = &deploy.services.server.target_group_arn;
    let resource = format!("target group {arn}");
    let refuse = |message: String| DeployError::Precondition {
        resource: resource.clone(),
        message,
    };
    let groups = aws
        .elb
        .describe_target_groups()
        .target_group_arns(arn)
        .send()
        .await
        .map_err(|e| DeployError::aws(&resource, "DescribeTargetGroups", &e))?;
    let Some(group) = groups.target_groups().first() else {
        return Err(refuse("not found".into()));
    };
    if group.target_type().is_some_and(|t| t.as_str() != "ip") {
        return Err(refuse(
            "Fargate tasks register by IP: the target group needs target type `ip`".into(),
        ));
    }
    if group.health_check_path() != Some(HEALTH_CHECK_PATH) {
        return Err(refuse(format!(
            "its health check path is {}; it must be {HEALTH_CHECK_PATH}, which answers 503 while a server cannot stream (bus unreachable or behind), where other paths would send clients to it",
            group.health_check_path().unwrap_or("unset")
        )));
    }
    let delay = deregistration_delay(aws, arn, &resource).await?;
    if !DEREGISTRATION_DELAY_SECS.contains(&delay) {
        let (low, high) = (
            DEREGISTRATION_DELAY_SECS.start(),
            DEREGISTRATION_DELAY_SECS.end(),
        );
        return Err(refuse(format!(
            "its deregistration delay is {delay} s; it must be {low} to {high} s. ECS waits out the whole delay before it sends SIGTERM to a stopping task (streams never end by themselves), and the load balancer then cuts the task's streams: {} Set it with `aws elbv2 modify-target-group-attributes --target-group-arn {arn} --attributes Key=deregistration_delay.timeout_seconds,Value=20`",
            if delay < *low {
                format!(
                    "below {low} s, load balancer nodes still send new streams to a task that is already shutting down."
                )
            } else {
                "a longer delay only holds up every deploy wave.".to_owned()
            }
        )));
    }
    let balancers = group.load_balancer_arns().to_vec();
    if balancers.is_empty() || !forwarded_to(aws, &balancers, arn, &resource).await? {
        return Err(refuse(
            "no load balancer listener forwards to it: ECS would refuse the server's service midway; add a listener (or a listener rule) that forwards to it".into(),
        ));
    }
    let described = aws
        .elb
        .describe_load_balancers()
        .set_load_balancer_arns(Some(balancers.clone()))
        .send()
        .await
        .map_err(|e| DeployError::aws(&resource, "DescribeLoadBalancers", &e))?;
    let heartbeat = deployment.manifest.server.heartbeat_secs;
    for balancer in &balancers {
        let attributes = aws
            .elb
            .describe_load_balancer_attributes()
            .load_balancer_arn(balancer)
            .send()
            .await
            .map_err(|e| {
                DeployError::aws(
                    format!("load balancer {balancer}"),
                    "DescribeLoadBalancerAttributes",
                    &e,
                )
            })?;
        let idle = attributes
            .attributes()
            .iter()
            .find(|a| a.key() == Some("idle_timeout.timeout_seconds"))
            .and_then(|a| a.value())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(idle) = idle.filter(|idle| *idle <= heartbeat) {
            return Err(DeployError::Precondition {
                resource: format!("load balancer {balancer}"),
                message: format!(
                    "its idle timeout ({idle} s) must be above the heartbeat ($.server.heartbeat_secs = {heartbeat} s), or it cuts idle streams"
                ),
            });
        }
    }
    Ok(described
        .load_balancers()
        .iter()
        .filter_map(|lb| lb.dns_name())
        .map(str::to_owned)
        .collect())
}

/// The target group's deregistration delay, seconds.
async fn deregistration_delay(
    aws: &Clients,
    arn: &str,
    resource: &str,
) -> Result<u64, DeployError> {
    let attributes = aws
        .elb
        .describe_target_group_attributes()
        .target_group_arn(arn)
        .send()
        .await
        .map_err(|e| DeployError::aws(resource, "DescribeTargetGroupAttributes", &e))?;
    Ok(attributes
        .attributes()
        .iter()
        .find(|a| a.key() == Some("deregistration_delay.timeout_seconds"))
        .and_then(|a| a.value())
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_DEREGISTRATION_DELAY_SECS))
}

/// Whether a listener of `balancers`, by its default action or by a rule, forwards to the
/// target group `arn`.
async fn forwarded_to(
    aws: &Clients,
    balancers: &[String],
    arn: &str,
    resource: &str,
) -> Result<bool, DeployError> {
    let forwards = |action: &Action| {
        action.r#type() == Some(&ActionTypeEnum::Forward)
            && (action.target_group_arn() == Some(arn)
                || action.forward_config().is_some_and(|config| {
                    config
                        .target_groups()
                        .iter()
                        .any(|group| group.target_group_arn() == Some(arn))
                }))
    };
    for balancer in balancers {
        let listeners = aws
            .elb
            .describe_listeners()
            .load_balancer_arn(balancer)
            .send()
            .await
            .map_err(|e| DeployError::aws(resource, "DescribeListeners", &e))?;
        for listener in listeners.listeners() {
            if listener.default_actions().iter().any(forwards) {
                return Ok(true);
            }
            let Some(listener_arn) = listener.listener_arn() else {
                continue;
            };
            let rules = aws
                .elb
                .describe_rules()
                .listener_arn(listener_arn)
                .send()
                .await
                .map_err(|e| DeployError::aws(resource, "DescribeRules", &e))?;
            if rules
                .rules()
                .iter()
                .any(|rule| rule.actions().iter().any(forwards))
            {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Logs in to ECR's registry (or `registry`, standing in for it) with an authorization
/// token; returns ECR's registry host, which task definitions name, and the client.
async fn login(
    aws: &Clients,
    registry: Option<Endpoint>,
) -> Result<(String, Registry), DeployError> {
    let resource = "ECR registry";
    let token = aws
        .ecr
        .get_authorization_token()
        .send()
        .await
        .map_err(|e| DeployError::aws(resource, "GetAuthorizationToken", &e))?;
    let data = token.authorization_data().first();
    let proxy = data.and_then(|d| d.proxy_endpoint());
    let credentials = data
        .and_then(|d| d.authorization_token())
        .and_then(|t| base64::engine::general_purpose::STANDARD.decode(t).ok())
        .and_then(|t| String::from_utf8(t).ok())
        .and_then(|t| {
            t.split_once(':')
                .map(|(user, password)| (user.to_owned(), password.to_owned()))
        });
    let (Some(proxy), Some((username, password))) = (proxy, credentials) else {
        return Err(DeployError::Aws {
            resource: resource.into(),
            message: "GetAuthorizationToken returned no usable token".into(),
        });
    };
    let ecr = Endpoint::parse(proxy).map_err(|message| DeployError::Aws {
        resource: resource.into(),
        message,
    })?;
    let host = ecr.host.clone();
    Ok((
        host,
        Registry::new(registry.unwrap_or(ecr), username, password),
    ))
}

/// The steps, each reading first and changing what differs (unless a dry run).
struct Step<'a> {
    aws: &'a Clients,
    deployment: &'a Deployment,
    dry_run: bool,
    /// How long a deleted service of the same name may stay DRAINING.
    drain_timeout: Duration,
    poll: Duration,
}

impl Step<'_> {
    /// The tags of a task definition or service: its fingerprint, and the deployment that
    /// made it (what prune and destroy go by).
    fn tags(&self, fingerprint: &str) -> Vec<Tag> {
        vec![
            Tag::builder()
                .key(FINGERPRINT_TAG)
                .value(fingerprint)
                .build(),
            Tag::builder()
                .key(DEPLOYMENT_TAG)
                .value(&self.deployment.deploy.name)
                .build(),
        ]
    }

    /// "would create" in a dry run, "created" otherwise.
    fn would(&self, action: &str, done: &str) -> String {
        if self.dry_run {
            format!("would {action}")
        } else {
            done.to_owned()
        }
    }

    async fn repository(&self, name: &str) -> Outcome<()> {
        let resource = format!("ECR repository {name}");
        // Used whoever made it: the manifest names it.
        let deployment = &self.deployment.deploy.name;
        if aws_sdk_ecr::types::Repository::find_by_name(self.aws, deployment, name)
            .await?
            .is_some()
        {
            // A repository made before the tool set a lifecycle policy gets one; a policy
            // of anyone's own is left as it is.
            let policy = self
                .aws
                .ecr
                .get_lifecycle_policy()
                .repository_name(name)
                .send()
                .await;
            return match policy {
                Ok(_) => Ok(((), "exists".into())),
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|e| e.is_lifecycle_policy_not_found_exception()) =>
                {
                    if !self.dry_run {
                        self.lifecycle_policy(name, &resource).await?;
                    }
                    Ok((
                        (),
                        format!(
                            "exists; {} lifecycle policy (keeps the newest {KEPT_IMAGES} images)",
                            self.would("add its", "added its")
                        ),
                    ))
                }
                Err(e) => Err(DeployError::aws(&resource, "GetLifecyclePolicy", &e)),
            };
        }
        if !self.dry_run {
            self.aws
                .ecr
                .create_repository()
                .repository_name(name)
                .image_tag_mutability(ImageTagMutability::Mutable)
                .image_scanning_configuration(
                    ImageScanningConfiguration::builder()
                        .scan_on_push(true)
                        .build(),
                )
                .tags(
                    aws_sdk_ecr::types::Tag::builder()
                        .key(DEPLOYMENT_TAG)
                        .value(&self.deployment.deploy.name)
                        .build()
                        .map_err(|e| DeployError::request(&resource, &e))?,
                )
                .send()
                .await
                .map_err(|e| DeployError::aws(&resource, "CreateRepository", &e))?;
            self.lifecycle_policy(name, &resource).await?;
        }
        Ok((
            (),
            format!(
                "{} (its lifecycle policy keeps the newest {KEPT_IMAGES} images)",
                self.would("create", "created")
            ),
        ))
    }

    /// Every deploy pushes an image to each repository: without an end, they would be
    /// kept (and paid for) forever. The newest [`KEPT_IMAGES`] stay, which covers the
    /// task definitions a rollback goes back to.
    async fn lifecycle_policy(&self, name: &str, resource: &str) -> Result<(), DeployError> {
        let policy = serde_json::json!({
            "rules": [{
                "rulePriority": 1,
                "description": format!("fjord-deploy: keep the newest {KEPT_IMAGES} images"),
                "selection": {
                    "tagStatus": "any",
                    "countType": "imageCountMoreThan",
                    "countNumber": KEPT_IMAGES
                },
                "action": { "type": "expire" }
            }]
        });
        self.aws
            .ecr
            .put_lifecycle_policy()
            .repository_name(name)
            .lifecycle_policy_text(policy.to_string())
            .send()
            .await
            .map_err(|e| DeployError::aws(resource, "PutLifecyclePolicy", &e))?;
        Ok(())
    }

    async fn push(&self, registry: &Registry, repository: &str, image: &Image) -> Outcome<()> {
        let total = image.layers.len() + 1;
        if self.dry_run {
            let missing = registry.missing_blobs(repository, image).await?;
            if missing == 0 && registry.tagged(repository, image).await {
                return Ok((
                    (),
                    format!(
                        "unchanged: all {total} blobs already there and {} already tagged {}",
                        image.manifest.digest, image.tag
                    ),
                ));
            }
            return Ok((
                (),
                format!(
                    "would push {missing} of {total} blobs to {}, then tag {} as {}",
                    registry.host(),
                    image.manifest.digest,
                    image.tag
                ),
            ));
        }
        let pushed = registry.push(repository, image).await?;
        if !pushed.tagged {
            return Ok((
                (),
                format!(
                    "unchanged: all {total} blobs already there and {} already tagged {}; nothing sent",
                    image.manifest.digest, image.tag
                ),
            ));
        }
        #[allow(clippy::cast_precision_loss, reason = "a size shown to one decimal")]
        let mib = pushed.bytes as f64 / (1024.0 * 1024.0);
        Ok((
            (),
            format!(
                "pushed {} of {total} blobs ({} already there) to {}, {mib:.1} MiB, tagged {} as {}",
                pushed.sent,
                pushed.present,
                registry.host(),
                image.manifest.digest,
                image.tag
            ),
        ))
    }

    async fn log_group(&self) -> Outcome<()> {
        let deploy = &self.deployment.deploy;
        let (group, days) = (&deploy.logs.group, deploy.logs.retention_days);
        let created =
            bootstrap::ensure_log_group(self.aws, &deploy.name, group, days, self.dry_run);
        if !created.await? {
            return Ok(((), "exists".into()));
        }
        Ok(((), self.would("create", "created")))
    }

    /// Registers the task definition unless the family's latest revision carries the
    /// spec's fingerprint; returns the ARN services should run (the family name alone in
    /// a dry run that would register).
    async fn task_definition(&self, spec: &TaskDefinitionSpec) -> Outcome<String> {
        let resource = format!("task definition {}", spec.family);
        let fingerprint = spec.fingerprint();
        let latest = self
            .aws
            .ecs
            .describe_task_definition()
            .task_definition(&spec.family)
            .include(TaskDefinitionField::Tags)
            .send()
            .await;
        match latest {
            Ok(latest) => {
                let arn = latest
                    .task_definition()
                    .and_then(|t| t.task_definition_arn())
                    .unwrap_or_default();
                if has_fingerprint(latest.tags(), &fingerprint) && !arn.is_empty() {
                    return Ok((arn.to_owned(), format!("unchanged ({})", revision(arn))));
                }
            }
            // ECS answers ClientException for a family it does not know.
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_client_exception()) => {}
            Err(e) => return Err(DeployError::aws(resource, "DescribeTaskDefinition", &e)),
        }
        if self.dry_run {
            return Ok((spec.family.clone(), "would register a new revision".into()));
        }
        let container = spec
            .container_definition()
            .map_err(|e| DeployError::request(&resource, &e))?;
        let registered = self
            .aws
            .ecs
            .register_task_definition()
            .family(&spec.family)
            .network_mode(NetworkMode::Awsvpc)
            .requires_compatibilities(Compatibility::Fargate)
            .cpu(spec.cpu.to_string())
            .memory(spec.memory.to_string())
            .runtime_platform(spec.runtime_platform())
            .execution_role_arn(&spec.execution_role_arn)
            .set_task_role_arn(spec.task_role_arn.clone())
            .container_definitions(container)
            .set_tags(Some(self.tags(&fingerprint)))
            .send()
            .await
            .map_err(|e| DeployError::aws(&resource, "RegisterTaskDefinition", &e))?;
        let arn = registered
            .task_definition()
            .and_then(|t| t.task_definition_arn())
            .unwrap_or_default()
            .to_owned();
        let outcome = format!("registered {}", revision(&arn));
        Ok((arn, outcome))
    }

    async fn service(&self, spec: &ServiceSpec, task_definition: &str) -> Outcome<()> {
        let deploy = &self.deployment.deploy;
        let resource = format!("ECS service {}", spec.name);
        let fingerprint = spec.fingerprint();
        let existing = self
            .aws
            .ecs
            .describe_services()
            .cluster(&deploy.cluster)
            .services(&spec.name)
            .include(ServiceField::Tags)
            .send()
            .await
            .map_err(|e| DeployError::aws(&resource, "DescribeServices", &e))?;
        let network = spec
            .network_configuration()
            .map_err(|e| DeployError::request(&resource, &e))?;
        let current: Option<&Service> = existing
            .services()
            .iter()
            .find(|s| s.status() == Some("ACTIVE"));
        let Some(current) = current else {
            // ECS refuses to create a service while one of the same name drains (deleted
            // by a destroy or a prune moments ago).
            let draining = existing
                .services()
                .iter()
                .any(|s| s.status() == Some("DRAINING"));
            if draining && self.dry_run {
                return Ok((
                    (),
                    format!(
                        "would create with {} tasks once the deleted service of that name has drained",
                        spec.desired_count
                    ),
                ));
            }
            if draining {
                wait::until_inactive(
                    &self.aws.ecs,
                    &deploy.cluster,
                    &spec.name,
                    self.drain_timeout,
                    self.poll,
                )
                .await?;
            }
            if !self.dry_run {
                self.aws
                    .ecs
                    .create_service()
                    .cluster(&deploy.cluster)
                    .service_name(&spec.name)
                    .task_definition(task_definition)
                    .desired_count(spec.desired_count)
                    .launch_type(LaunchType::Fargate)
                    .network_configuration(network)
                    .set_load_balancers(Some(spec.load_balancers()))
                    .set_health_check_grace_period_seconds(spec.health_check_grace_secs)
                    .deployment_configuration(spec.deployment_configuration())
                    .propagate_tags(PropagateTags::Service)
                    .enable_ecs_managed_tags(true)
                    .set_tags(Some(self.tags(&fingerprint)))
                    .send()
                    .await
                    .map_err(|e| DeployError::aws(&resource, "CreateService", &e))?;
            }
            return Ok((
                (),
                format!(
                    "{} with {} tasks",
                    self.would("create", "created"),
                    spec.desired_count
                ),
            ));
        };

        let mut changes = Vec::new();
        if current.task_definition() != Some(task_definition) {
            changes.push(format!("task definition {}", revision(task_definition)));
        }
        let count = (!spec.autoscaled && current.desired_count() != spec.desired_count)
            .then_some(spec.desired_count);
        if let Some(count) = count {
            changes.push(format!(
                "desired count {} → {count}",
                current.desired_count()
            ));
        }
        if !has_fingerprint(current.tags(), &fingerprint) {
            changes.push("settings".to_owned());
        }
        if changes.is_empty() {
            return Ok(((), "unchanged".into()));
        }
        if !self.dry_run {
            self.aws
                .ecs
                .update_service()
                .cluster(&deploy.cluster)
                .service(&spec.name)
                .task_definition(task_definition)
                .set_desired_count(count)
                .network_configuration(network)
                .set_load_balancers(Some(spec.load_balancers()))
                .set_health_check_grace_period_seconds(spec.health_check_grace_secs)
                .deployment_configuration(spec.deployment_configuration())
                .send()
                .await
                .map_err(|e| DeployError::aws(&resource, "UpdateService", &e))?;
            if let Some(arn) = current.service_arn() {
                self.aws
                    .ecs
                    .tag_resource()
                    .resource_arn(arn)
                    .set_tags(Some(self.tags(&fingerprint)))
                    .send()
                    .await
                    .map_err(|e| DeployError::aws(&resource, "TagResource", &e))?;
            }
        }
        Ok((
            (),
            format!(
                "{}: {}",
                self.would("update", "updated"),
                changes.join(", ")
            ),
        ))
    }

    async fn scaling(&self, spec: &plan::ScalingSpec) -> Outcome<()> {
        let resource = format!("scalable target {}", spec.resource_id);
        let targets = self
            .aws
            .scaling
            .describe_scalable_targets()
            .service_namespace(ServiceNamespace::Ecs)
            .scalable_dimension(ScalableDimension::EcsServiceDesiredCount)
            .resource_ids(&spec.resource_id)
            .send()
            .await
            .map_err(|e| DeployError::aws(&resource, "DescribeScalableTargets", &e))?;
        let mut changes = Vec::new();
        let same_bounds = targets
            .scalable_targets()
            .iter()
            .any(|t| t.min_capacity() == spec.min_count && t.max_capacity() == spec.max_count);
        if !same_bounds {
            changes.push(format!("{} to {} tasks", spec.min_count, spec.max_count));
            if !self.dry_run {
                self.aws
                    .scaling
                    .register_scalable_target()
                    .service_namespace(ServiceNamespace::Ecs)
                    .scalable_dimension(ScalableDimension::EcsServiceDesiredCount)
                    .resource_id(&spec.resource_id)
                    .min_capacity(spec.min_count)
                    .max_capacity(spec.max_count)
                    .send()
                    .await
                    .map_err(|e| DeployError::aws(&resource, "RegisterScalableTarget", &e))?;
            }
        }
        let policies = self
            .aws
            .scaling
            .describe_scaling_policies()
            .service_namespace(ServiceNamespace::Ecs)
            .resource_id(&spec.resource_id)
            .scalable_dimension(ScalableDimension::EcsServiceDesiredCount)
            .send()
            .await
            .map_err(|e| DeployError::aws(&resource, "DescribeScalingPolicies", &e))?;
        for policy in &spec.policies {
            let same = policies.scaling_policies().iter().any(|existing| {
                existing.policy_name() == policy.name
                    && existing
                        .target_tracking_scaling_policy_configuration()
                        .is_some_and(|configuration| policy.matches(configuration))
            });
            if same {
                continue;
            }
            changes.push(format!("policy {} (target {})", policy.name, policy.target));
            if !self.dry_run {
                let resource = format!("scaling policy {}", policy.name);
                let configuration = policy
                    .configuration()
                    .map_err(|e| DeployError::request(&resource, &e))?;
                self.aws
                    .scaling
                    .put_scaling_policy()
                    .policy_name(&policy.name)
                    .service_namespace(ServiceNamespace::Ecs)
                    .scalable_dimension(ScalableDimension::EcsServiceDesiredCount)
                    .resource_id(&spec.resource_id)
                    .policy_type(PolicyType::TargetTrackingScaling)
                    .target_tracking_scaling_policy_configuration(configuration)
                    .send()
                    .await
                    .map_err(|e| DeployError::aws(&resource, "PutScalingPolicy", &e))?;
            }
        }
        if changes.is_empty() {
            return Ok(((), "unchanged".into()));
        }
        Ok((
            (),
            format!("{}: {}", self.would("set", "set"), changes.join(", ")),
        ))
    }
}

fn has_fingerprint(tags: &[Tag], fingerprint: &str) -> bool {
    tags.iter()
        .any(|t| t.key() == Some(FINGERPRINT_TAG) && t.value() == Some(fingerprint))
}
