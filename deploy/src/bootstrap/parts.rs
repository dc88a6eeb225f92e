//! What bootstrap creates besides the network: the load balancer (with its target group
//! and listener), ElastiCache with its AUTH token in Secrets Manager, the ECS cluster, the
//! IAM roles and the log group. Each is looked up by its name first; one that exists is
//! used when it carries the deployment's tag (an earlier, maybe interrupted, run made it)
//! and refused otherwise, since a name the manifest does not name is not the user's to
//! share.

use aws_sdk_cloudwatchlogs::types::LogGroup;
use aws_sdk_ecs::types::Cluster;
use aws_sdk_elasticache::types::{CacheSubnetGroup, ReplicationGroup};
use aws_sdk_elasticloadbalancingv2::types::{
    Action, ActionTypeEnum, Certificate, LoadBalancer, LoadBalancerAttribute,
    LoadBalancerSchemeEnum, LoadBalancerTypeEnum, Matcher, ProtocolEnum, RedirectActionConfig,
    RedirectActionStatusCodeEnum, TargetGroup, TargetGroupAttribute, TargetTypeEnum,
};
use aws_sdk_iam::types::Role;
use aws_sdk_secretsmanager::operation::describe_secret::DescribeSecretOutput;

use super::{Ctx, PLANNED, id};
use crate::clients::Clients;
use crate::config::{Deployment, secret_arn};
use crate::error::{DeployError, none_if};
use crate::output::Outcome;
use crate::ownership::{Named, Owned, describe_replication_group, not_ours};
use crate::plan::{DEPLOYMENT_TAG, DEREGISTRATION_DELAY_SECS, HEALTH_CHECK_PATH};
use crate::wait;

/// The deregistration delay bootstrap sets: inside what a deploy accepts, short enough
/// that deploy waves do not wait long, long enough for load balancer nodes to stop
/// sending new streams to a stopping task.
const DEREGISTRATION_DELAY: u64 = 20;
/// The Redis port.
const REDIS_PORT: i32 = 6379;

/// The names bootstrap gives what it creates.
pub(crate) struct Names {
    pub(crate) load_balancer: String,
    pub(crate) target_group: String,
    pub(crate) redis: String,
    pub(crate) secret: String,
    pub(crate) execution_role: String,
    pub(crate) task_role: String,
}

impl Names {
    pub(crate) fn of(deployment: &str) -> Self {
        Self {
            load_balancer: deployment.to_owned(),
            target_group: format!("{deployment}-server"),
            redis: deployment.to_owned(),
            secret: format!("{deployment}/redis-auth-token"),
            execution_role: format!("{deployment}-execution"),
            task_role: format!("{deployment}-task"),
        }
    }
}

/// What a wait reports when the resource it waits on is no longer there.
fn gone(resource: &str) -> DeployError {
    DeployError::Aws {
        resource: resource.to_owned(),
        message: "gone while bootstrap waited for it".into(),
    }
}

fn would(ctx: &Ctx<'_>, what: &str) -> String {
    if ctx.dry_run {
        format!("would create {what}")
    } else {
        format!("created {what}")
    }
}

// ------------------------------------------------------------------------ load balancer

/// The load balancer bootstrap made or makes.
pub(super) struct Balancer {
    pub(super) target_group_arn: String,
    pub(super) dns_name: String,
    pub(super) https: bool,
}

fn elb_tag(ctx: &Ctx<'_>) -> aws_sdk_elasticloadbalancingv2::types::Tag {
    aws_sdk_elasticloadbalancingv2::types::Tag::builder()
        .key(DEPLOYMENT_TAG)
        .value(ctx.name)
        .build()
}

/// A load balancer's ARN and DNS name.
fn arn_and_dns(balancer: Option<&LoadBalancer>) -> (String, String) {
    (
        id(balancer.and_then(|b| b.load_balancer_arn())),
        balancer
            .and_then(|b| b.dns_name())
            .unwrap_or_default()
            .to_owned(),
    )
}

/// Finds or creates the load balancer, its target group and its listener(s).
pub(super) async fn load_balancer(
    ctx: &Ctx<'_>,
    vpc: &str,
    subnets: &[String],
    security_group: &str,
    port: u16,
    heartbeat_secs: u64,
) -> Outcome<Balancer> {
    let elb = &ctx.aws.elb;
    let names = Names::of(ctx.name);
    let resource = format!("load balancer {}", names.load_balancer);
    let mut created = Vec::new();
    let https = ctx.settings.certificate_arn.is_some();
    let found = ctx.find_or_create(
        &names.load_balancer,
        "load balancer",
        &mut created,
        |found: LoadBalancer| arn_and_dns(Some(&found)),
        || async {
            let made = elb
                .create_load_balancer()
                .name(&names.load_balancer)
                .set_subnets(Some(subnets.to_vec()))
                .security_groups(security_group)
                .scheme(LoadBalancerSchemeEnum::InternetFacing)
                .r#type(LoadBalancerTypeEnum::Application)
                .tags(elb_tag(ctx))
                .send()
                .await
                .map_err(|e| {
                    DeployError::aws(&resource, "elasticloadbalancing:CreateLoadBalancer", &e)
                })?;
            Ok(arn_and_dns(made.load_balancers().first()))
        },
    );
    let (balancer_arn, dns_name) = found
        .await?
        .unwrap_or_else(|| (PLANNED.to_owned(), PLANNED.to_owned()));
    // Streams are idle between heartbeats: the load balancer must wait longer.
    let idle = (heartbeat_secs * 4).clamp(60, 4000).to_string();
    if balancer_arn != PLANNED
        && set_attribute(
            ctx,
            Attribute::Balancer(&balancer_arn),
            "idle_timeout.timeout_seconds",
            &idle,
        )
        .await?
    {
        created.push("idle timeout");
    }

    let found = ctx.find_or_create(
        &names.target_group,
        "target group",
        &mut created,
        |found: TargetGroup| id(found.target_group_arn()),
        || async {
            let group = format!("target group {}", names.target_group);
            let made = elb
                .create_target_group()
                .name(&names.target_group)
                .protocol(ProtocolEnum::Http)
                .port(i32::from(port))
                .vpc_id(vpc)
                .target_type(TargetTypeEnum::Ip)
                .health_check_path(HEALTH_CHECK_PATH)
                .health_check_interval_seconds(10)
                .healthy_threshold_count(2)
                .matcher(Matcher::builder().http_code("200").build())
                .tags(elb_tag(ctx))
                .send()
                .await
                .map_err(|e| {
                    DeployError::aws(&group, "elasticloadbalancing:CreateTargetGroup", &e)
                })?;
            Ok(id(made
                .target_groups()
                .first()
                .and_then(|g| g.target_group_arn())))
        },
    );
    let target_group_arn = found.await?.unwrap_or_else(|| PLANNED.to_owned());
    debug_assert!(DEREGISTRATION_DELAY_SECS.contains(&DEREGISTRATION_DELAY));
    if target_group_arn != PLANNED
        && set_attribute(
            ctx,
            Attribute::TargetGroup(&target_group_arn),
            "deregistration_delay.timeout_seconds",
            &DEREGISTRATION_DELAY.to_string(),
        )
        .await?
    {
        created.push("deregistration delay");
    }

    // Listeners of what is still to be made are to be made too.
    if balancer_arn == PLANNED
        || target_group_arn == PLANNED
        || listeners(ctx, &balancer_arn, &target_group_arn).await?
    {
        created.push("listener");
    }
    if !ctx.dry_run {
        wait_until_active(ctx, &balancer_arn, &resource).await?;
    }
    let outcome = if created.is_empty() {
        format!("exists: {dns_name}")
    } else {
        format!(
            "{}: {}",
            if dns_name == PLANNED {
                &names.load_balancer
            } else {
                &dns_name
            },
            if ctx.dry_run {
                format!("would set {}", created.join(", "))
            } else {
                format!("set {}", created.join(", "))
            }
        )
    };
    Ok((
        Balancer {
            target_group_arn,
            dns_name,
            https,
        },
        outcome,
    ))
}

#[derive(Clone, Copy)]
enum Attribute<'a> {
    Balancer(&'a str),
    TargetGroup(&'a str),
}

/// Sets an attribute of a load balancer or target group when it differs; returns whether
/// it did (or would).
async fn set_attribute(
    ctx: &Ctx<'_>,
    of: Attribute<'_>,
    key: &str,
    value: &str,
) -> Result<bool, DeployError> {
    let elb = &ctx.aws.elb;
    let current = match of {
        Attribute::Balancer(arn) => elb
            .describe_load_balancer_attributes()
            .load_balancer_arn(arn)
            .send()
            .await
            .map_err(|e| {
                DeployError::aws(
                    format!("load balancer {arn}"),
                    "elasticloadbalancing:DescribeLoadBalancerAttributes",
                    &e,
                )
            })?
            .attributes()
            .iter()
            .find(|a| a.key() == Some(key))
            .and_then(|a| a.value())
            .map(str::to_owned),
        Attribute::TargetGroup(arn) => elb
            .describe_target_group_attributes()
            .target_group_arn(arn)
            .send()
            .await
            .map_err(|e| {
                DeployError::aws(
                    format!("target group {arn}"),
                    "elasticloadbalancing:DescribeTargetGroupAttributes",
                    &e,
                )
            })?
            .attributes()
            .iter()
            .find(|a| a.key() == Some(key))
            .and_then(|a| a.value())
            .map(str::to_owned),
    };
    if current.as_deref() == Some(value) {
        return Ok(false);
    }
    if ctx.dry_run {
        return Ok(true);
    }
    match of {
        Attribute::Balancer(arn) => {
            elb.modify_load_balancer_attributes()
                .load_balancer_arn(arn)
                .attributes(
                    LoadBalancerAttribute::builder()
                        .key(key)
                        .value(value)
                        .build(),
                )
                .send()
                .await
                .map_err(|e| {
                    DeployError::aws(
                        format!("load balancer {arn}"),
                        "elasticloadbalancing:ModifyLoadBalancerAttributes",
                        &e,
                    )
                })?;
        }
        Attribute::TargetGroup(arn) => {
            elb.modify_target_group_attributes()
                .target_group_arn(arn)
                .attributes(
                    TargetGroupAttribute::builder()
                        .key(key)
                        .value(value)
                        .build(),
                )
                .send()
                .await
                .map_err(|e| {
                    DeployError::aws(
                        format!("target group {arn}"),
                        "elasticloadbalancing:ModifyTargetGroupAttributes",
                        &e,
                    )
                })?;
        }
    }
    Ok(true)
}

/// The HTTPS listener's security policy: TLS 1.3 and 1.2 only, the one AWS recommends.
pub(crate) const SSL_POLICY: &str = "ELBSecurityPolicy-TLS13-1-2-2021-06";

/// Creates the listeners that are missing: HTTPS on 443 forwarding to the target group
/// and HTTP on 80 redirecting to it with a certificate, HTTP on 80 forwarding without;
/// gives an HTTPS listener made before [`SSL_POLICY`] that policy.
async fn listeners(ctx: &Ctx<'_>, balancer: &str, target_group: &str) -> Result<bool, DeployError> {
    let elb = &ctx.aws.elb;
    let resource = format!("listeners of load balancer {}", ctx.name);
    let found = elb
        .describe_listeners()
        .load_balancer_arn(balancer)
        .send()
        .await
        .map_err(|e| DeployError::aws(&resource, "elasticloadbalancing:DescribeListeners", &e))?;
    let listener = |port: i32| found.listeners().iter().find(|l| l.port() == Some(port));
    let forward = Action::builder()
        .r#type(ActionTypeEnum::Forward)
        .target_group_arn(target_group)
        .build();
    let mut wanted = Vec::new();
    match &ctx.settings.certificate_arn {
        Some(certificate) => {
            let redirect = Action::builder()
                .r#type(ActionTypeEnum::Redirect)
                .redirect_config(
                    RedirectActionConfig::builder()
                        .protocol("HTTPS")
                        .port("443")
                        .status_code(RedirectActionStatusCodeEnum::Http301)
                        .build(),
                )
                .build();
            wanted.push((443, ProtocolEnum::Https, forward, Some(certificate)));
            wanted.push((80, ProtocolEnum::Http, redirect, None));
        }
        None => wanted.push((80, ProtocolEnum::Http, forward, None)),
    }
    let mut changed = false;
    for (port, protocol, action, certificate) in wanted {
        // Without a policy, ELB's API gives HTTPS listeners ELBSecurityPolicy-2016-08,
        // which still accepts TLS 1.0 and 1.1.
        let ssl_policy = certificate.is_some().then_some(SSL_POLICY);
        if let Some(existing) = listener(port) {
            let outdated = ssl_policy.is_some_and(|p| existing.ssl_policy() != Some(p));
            if let (true, Some(arn)) = (outdated, existing.listener_arn()) {
                changed = true;
                if !ctx.dry_run {
                    elb.modify_listener()
                        .listener_arn(arn)
                        .set_ssl_policy(ssl_policy.map(str::to_owned))
                        .send()
                        .await
                        .map_err(|e| {
                            DeployError::aws(&resource, "elasticloadbalancing:ModifyListener", &e)
                        })?;
                }
            }
            continue;
        }
        changed = true;
        if ctx.dry_run {
            continue;
        }
        elb.create_listener()
            .load_balancer_arn(balancer)
            .port(port)
            .protocol(protocol)
            .set_certificates(
                certificate.map(|arn| vec![Certificate::builder().certificate_arn(arn).build()]),
            )
            .set_ssl_policy(ssl_policy.map(str::to_owned))
            .default_actions(action)
            .tags(elb_tag(ctx))
            .send()
            .await
            .map_err(|e| DeployError::aws(&resource, "elasticloadbalancing:CreateListener", &e))?;
    }
    Ok(changed)
}

/// The load balancer `arn` as ELB describes it; `None` where there is none.
pub(crate) async fn describe_load_balancer(
    aws: &Clients,
    arn: &str,
    resource: &str,
) -> Result<Option<LoadBalancer>, DeployError> {
    let found = none_if(
        aws.elb
            .describe_load_balancers()
            .load_balancer_arns(arn)
            .send()
            .await,
        |e| e.is_load_balancer_not_found_exception(),
        resource,
        "elasticloadbalancing:DescribeLoadBalancers",
    )?;
    Ok(found.and_then(|found| found.load_balancers().first().cloned()))
}

async fn wait_until_active(ctx: &Ctx<'_>, arn: &str, resource: &str) -> Result<(), DeployError> {
    wait::until(resource, ctx.timeout, ctx.poll, move || async move {
        let balancer = describe_load_balancer(ctx.aws, arn, resource)
            .await?
            .ok_or_else(|| gone(resource))?;
        let state = balancer.state().and_then(|s| s.code()).map(|c| c.as_str());
        Ok(match state {
            Some("active") | None => None,
            Some(state) => Some(state.to_owned()),
        })
    })
    .await
    .map(drop)
}

// -------------------------------------------------------------------------------- Redis

/// The ElastiCache replication group bootstrap made or makes.
pub(super) struct Redis {
    pub(super) url: String,
    pub(super) secret_arn: String,
}

fn cache_tag(ctx: &Ctx<'_>) -> aws_sdk_elasticache::types::Tag {
    aws_sdk_elasticache::types::Tag::builder()
        .key(DEPLOYMENT_TAG)
        .value(ctx.name)
        .build()
}

/// Finds or creates the AUTH token's secret, the cache subnet group and the replication
/// group (with in-transit encryption and the token), and waits until it is available.
pub(super) async fn redis(
    ctx: &Ctx<'_>,
    subnets: &[String],
    security_group: &str,
) -> Outcome<Redis> {
    let names = Names::of(ctx.name);
    let resource = format!("ElastiCache replication group {}", names.redis);
    let mut created = Vec::new();

    let found = ctx.find_or_create(
        &names.secret,
        "AUTH token secret",
        &mut created,
        |found: DescribeSecretOutput| id(found.arn()),
        || async {
            let secret = format!("secret {}", names.secret);
            // ElastiCache takes 16 to 128 printable characters but `@`, `"` and `/`.
            let token = ctx
                .aws
                .secrets
                .get_random_password()
                .password_length(64)
                .exclude_punctuation(true)
                .send()
                .await
                .map_err(|e| DeployError::aws(&secret, "secretsmanager:GetRandomPassword", &e))?;
            Ok(ctx
                .aws
                .secrets
                .create_secret()
                .name(&names.secret)
                .description(format!(
                    "AUTH token of the Redis of Fjord deployment {}",
                    ctx.name
                ))
                .secret_string(token.random_password().unwrap_or_default())
                .tags(
                    aws_sdk_secretsmanager::types::Tag::builder()
                        .key(DEPLOYMENT_TAG)
                        .value(ctx.name)
                        .build(),
                )
                .send()
                .await
                .map_err(|e| DeployError::aws(&secret, "secretsmanager:CreateSecret", &e))?
                .arn()
                .unwrap_or_default()
                .to_owned())
        },
    );
    let secret_arn = found.await?.unwrap_or_else(|| PLANNED.to_owned());

    let subnet_group = CacheSubnetGroup::resource(&names.redis);
    let found = ctx.find_or_create(
        &names.redis,
        "cache subnet group",
        &mut created,
        |_: CacheSubnetGroup| (),
        || async {
            ctx.aws
                .elasticache
                .create_cache_subnet_group()
                .cache_subnet_group_name(&names.redis)
                .cache_subnet_group_description(format!("Fjord deployment {}", ctx.name))
                .set_subnet_ids(Some(subnets.to_vec()))
                .tags(cache_tag(ctx))
                .send()
                .await
                .map_err(|e| {
                    DeployError::aws(&subnet_group, "elasticache:CreateCacheSubnetGroup", &e)
                })?;
            Ok(())
        },
    );
    found.await?;

    let found = ctx.find_or_create(
        &names.redis,
        "replication group",
        &mut created,
        Some,
        || async {
            let token = ctx
                .aws
                .secrets
                .get_secret_value()
                .secret_id(&secret_arn)
                .send()
                .await
                .map_err(|e| {
                    DeployError::aws(
                        format!("secret {}", names.secret),
                        "secretsmanager:GetSecretValue",
                        &e,
                    )
                })?;
            let redis = &ctx.settings.redis;
            let made = ctx
                .aws
                .elasticache
                .create_replication_group()
                .replication_group_id(&names.redis)
                .replication_group_description(format!("Fjord deployment {}", ctx.name))
                .engine(&redis.engine)
                .cache_node_type(&redis.node_type)
                .num_cache_clusters(1)
                .cache_subnet_group_name(&names.redis)
                .security_group_ids(security_group)
                .transit_encryption_enabled(true)
                .at_rest_encryption_enabled(true)
                .auth_token(token.secret_string().unwrap_or_default())
                .port(REDIS_PORT)
                .tags(cache_tag(ctx))
                .send()
                .await
                .map_err(|e| {
                    DeployError::aws(&resource, "elasticache:CreateReplicationGroup", &e)
                })?;
            Ok(made.replication_group().cloned())
        },
    );
    let group = found.await?.flatten();

    let url = match group {
        None => format!("rediss://{PLANNED}:{REDIS_PORT}"),
        Some(group) => {
            let group = if group.status() == Some("available") || ctx.dry_run {
                group
            } else {
                wait_for_redis(ctx, &names.redis, &resource).await?
            };
            let endpoint = group
                .node_groups()
                .first()
                .and_then(|g| g.primary_endpoint())
                .and_then(|e| Some((e.address()?.to_owned(), e.port().unwrap_or(REDIS_PORT))));
            match endpoint {
                Some((host, port)) => format!("rediss://{host}:{port}"),
                None => format!("rediss://{PLANNED}:{REDIS_PORT}"),
            }
        }
    };
    let outcome = if created.is_empty() {
        format!("exists: {url}")
    } else {
        format!("{}; {url}", would(ctx, &created.join(", ")))
    };
    Ok((Redis { url, secret_arn }, outcome))
}

/// Waits for the replication group to become available (several minutes in AWS), then
/// describes it again for its endpoint.
async fn wait_for_redis(
    ctx: &Ctx<'_>,
    id: &str,
    resource: &str,
) -> Result<ReplicationGroup, DeployError> {
    let describe = move || async move {
        describe_replication_group(ctx.aws, id, resource)
            .await?
            .ok_or_else(|| gone(resource))
    };
    wait::until(resource, ctx.timeout, ctx.poll, move || async move {
        match describe().await?.status() {
            Some("available") => Ok(None),
            Some(status @ ("create-failed" | "deleting")) => Err(DeployError::Aws {
                resource: resource.to_owned(),
                message: format!("the replication group is {status}"),
            }),
            status => Ok(Some(status.unwrap_or("unknown").to_owned())),
        }
    })
    .await?;
    describe().await
}

// ----------------------------------------------------------------------------- cluster

/// Finds or creates the ECS cluster `name`; one that exists is used when the manifest
/// names it (`named`) or the deployment's tag says bootstrap made it.
pub(super) async fn cluster(ctx: &Ctx<'_>, name: &str, named: bool) -> Outcome<String> {
    let resource = format!("ECS cluster {name}");
    match ctx.lookup::<Cluster>(name).await? {
        Owned::Ours(_) => return Ok((name.to_owned(), "exists".into())),
        Owned::Theirs(_) if named => {
            return Ok((name.to_owned(), "exists (yours, used as it is)".into()));
        }
        Owned::Theirs(_) => return Err(not_ours(&resource)),
        Owned::Absent => {}
    }
    if !ctx.dry_run {
        ctx.aws
            .ecs
            .create_cluster()
            .cluster_name(name)
            .tags(
                aws_sdk_ecs::types::Tag::builder()
                    .key(DEPLOYMENT_TAG)
                    .value(ctx.name)
                    .build(),
            )
            .send()
            .await
            .map_err(|e| DeployError::aws(&resource, "ecs:CreateCluster", &e))?;
    }
    Ok((name.to_owned(), would(ctx, "the cluster")))
}

// ------------------------------------------------------------------------------- roles

/// A role's trust policy: ECS tasks assume it.
const TRUST_POLICY: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ecs-tasks.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#;
/// The name of the execution role's inline policy.
const EXECUTION_POLICY: &str = "fjord-execution";

/// Finds or creates the role `name` that ECS tasks assume; returns its ARN and whether it
/// was (or would be) created.
pub(super) async fn role(ctx: &Ctx<'_>, name: &str) -> Result<(String, bool), DeployError> {
    let mut created = Vec::new();
    let found = ctx.find_or_create(
        name,
        "role",
        &mut created,
        |found: Role| found.arn().to_owned(),
        || async {
            let resource = Role::resource(name);
            let tag = aws_sdk_iam::types::Tag::builder()
                .key(DEPLOYMENT_TAG)
                .value(ctx.name)
                .build()
                .map_err(|e| DeployError::request(&resource, &e))?;
            let made = ctx
                .aws
                .iam
                .create_role()
                .role_name(name)
                .assume_role_policy_document(TRUST_POLICY)
                .description(format!("Fjord deployment {}", ctx.name))
                .tags(tag)
                .send()
                .await
                .map_err(|e| DeployError::aws(&resource, "iam:CreateRole", &e))?;
            Ok(made.role().map(|r| r.arn().to_owned()).unwrap_or_default())
        },
    );
    let arn = found.await?.unwrap_or_else(|| PLANNED.to_owned());
    Ok((arn, !created.is_empty()))
}

/// What the execution role may do, and no more: pull the deployment's images, write to its
/// log group, read the secrets ECS injects, and decrypt them with the customer-managed
/// keys the manifest names.
pub(crate) fn execution_policy(
    role_arn: &str,
    region: &str,
    deployment: &str,
    log_group: &str,
    secrets: &[&str],
    kms_keys: &[String],
) -> serde_json::Value {
    // The role's ARN carries the partition and the account the other ARNs need.
    let mut parts = role_arn.split(':');
    let partition = parts.nth(1).unwrap_or("aws");
    let account = parts.nth(2).unwrap_or_default();
    let mut statements = vec![
        serde_json::json!({
            "Sid": "EcrLogin", "Effect": "Allow",
            "Action": "ecr:GetAuthorizationToken", "Resource": "*"
        }),
        serde_json::json!({
            "Sid": "PullImages", "Effect": "Allow",
            "Action": ["ecr:BatchCheckLayerAvailability", "ecr:GetDownloadUrlForLayer", "ecr:BatchGetImage"],
            "Resource": format!("arn:{partition}:ecr:{region}:{account}:repository/{deployment}/*")
        }),
        serde_json::json!({
            "Sid": "WriteLogs", "Effect": "Allow",
            "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
            "Resource": format!("arn:{partition}:logs:{region}:{account}:log-group:{log_group}:*")
        }),
    ];
    let of = |service: &str| -> Vec<String> {
        let prefix = format!("arn:{partition}:{service}:");
        let mut arns: Vec<String> = secrets
            .iter()
            .copied()
            .filter(|arn| arn.starts_with(&prefix))
            .flat_map(secret_resources)
            .collect();
        arns.sort_unstable();
        arns.dedup();
        arns
    };
    let from_secrets_manager = of("secretsmanager");
    if !from_secrets_manager.is_empty() {
        statements.push(serde_json::json!({
            "Sid": "ReadSecrets", "Effect": "Allow",
            "Action": "secretsmanager:GetSecretValue", "Resource": from_secrets_manager
        }));
    }
    let from_ssm = of("ssm");
    if !from_ssm.is_empty() {
        statements.push(serde_json::json!({
            "Sid": "ReadParameters", "Effect": "Allow",
            "Action": "ssm:GetParameters", "Resource": from_ssm
        }));
    }
    if !kms_keys.is_empty() {
        statements.push(serde_json::json!({
            "Sid": "DecryptSecrets", "Effect": "Allow",
            "Action": "kms:Decrypt", "Resource": kms_keys
        }));
    }
    serde_json::json!({ "Version": "2012-10-17", "Statement": statements })
}

/// The IAM resources that grant reading the secret ECS injects from `value_from`. ECS
/// takes a Secrets Manager ARN with a JSON key, a version stage or a version id after
/// the name (`…:secret:NAME:KEY:STAGE:ID`), and with or without the six characters
/// Secrets Manager appends to the name; IAM matches the secret's own ARN, which has them
/// and nothing after. Hence the ARN cut after the name, as it is and with `-??????`. An
/// SSM parameter's ARN is its own resource.
fn secret_resources(value_from: &str) -> Vec<String> {
    let secret = secret_arn(value_from);
    if !value_from.contains(":secret:") {
        return vec![secret.to_owned()];
    }
    vec![secret.to_owned(), format!("{secret}-??????")]
}

/// Puts the inline policy on the role when it differs from what it has; returns whether
/// it did (or would).
pub(super) async fn put_policy(
    ctx: &Ctx<'_>,
    role: &str,
    policy: &serde_json::Value,
) -> Result<bool, DeployError> {
    let current = role_policy(&ctx.aws.iam, role).await?;
    put_if_changed(&ctx.aws.iam, role, current.as_ref(), policy, ctx.dry_run).await
}

/// The execution role's inline policy, as fjord-deploy put it there; `None` where the
/// role has none (a role of your own).
async fn role_policy(
    iam: &aws_sdk_iam::Client,
    role: &str,
) -> Result<Option<serde_json::Value>, DeployError> {
    let resource = format!("IAM role {role}");
    let found = none_if(
        iam.get_role_policy()
            .role_name(role)
            .policy_name(EXECUTION_POLICY)
            .send()
            .await,
        |e| e.is_no_such_entity_exception(),
        &resource,
        "iam:GetRolePolicy",
    )?;
    // IAM hands policy documents back URL-encoded.
    Ok(found.map(|found| {
        serde_json::from_str(&percent_decode(found.policy_document())).unwrap_or_default()
    }))
}

async fn put_if_changed(
    iam: &aws_sdk_iam::Client,
    role: &str,
    current: Option<&serde_json::Value>,
    policy: &serde_json::Value,
    dry_run: bool,
) -> Result<bool, DeployError> {
    if current == Some(policy) {
        return Ok(false);
    }
    if !dry_run {
        iam.put_role_policy()
            .role_name(role)
            .policy_name(EXECUTION_POLICY)
            .policy_document(policy.to_string())
            .send()
            .await
            .map_err(|e| DeployError::aws(format!("IAM role {role}"), "iam:PutRolePolicy", &e))?;
    }
    Ok(true)
}

/// A deploy's look at the execution role: where bootstrap made it (it carries
/// fjord-deploy's inline policy), the policy is brought up to the manifest's secrets and
/// keys, so that a secret added after bootstrap does not stop the tasks from starting. A
/// role of your own is left as it is.
pub(crate) async fn refresh_execution_policy(
    aws: &Clients,
    deployment: &Deployment,
    dry_run: bool,
) -> Outcome<()> {
    let deploy = &deployment.deploy;
    let arn = &deploy.roles.execution_role_arn;
    let role = arn.rsplit('/').next().unwrap_or(arn);
    let Some(current) = role_policy(&aws.iam, role).await? else {
        return Ok(((), "yours: left as it is".into()));
    };
    let secrets: Vec<&str> = deploy.secrets.values().map(String::as_str).collect();
    let policy = execution_policy(
        arn,
        &deploy.region,
        &deploy.name,
        &deploy.logs.group,
        &secrets,
        &deploy.kms_key_arns,
    );
    let changed = put_if_changed(&aws.iam, role, Some(&current), &policy, dry_run).await?;
    Ok((
        (),
        match (changed, dry_run) {
            (false, _) => "unchanged".into(),
            (true, true) => "would update its policy to the manifest's secrets".into(),
            (true, false) => "policy updated to the manifest's secrets".into(),
        },
    ))
}

/// The role's policies: the names of its inline ones and the ARNs of those attached to it.
pub(crate) async fn role_policies(
    aws: &Clients,
    role: &str,
) -> Result<(Vec<String>, Vec<String>), DeployError> {
    let resource = Role::resource(role);
    let inline = aws
        .iam
        .list_role_policies()
        .role_name(role)
        .send()
        .await
        .map_err(|e| DeployError::aws(&resource, "iam:ListRolePolicies", &e))?;
    let attached = aws
        .iam
        .list_attached_role_policies()
        .role_name(role)
        .send()
        .await
        .map_err(|e| DeployError::aws(&resource, "iam:ListAttachedRolePolicies", &e))?;
    let attached = attached
        .attached_policies()
        .iter()
        .filter_map(|p| p.policy_arn().map(str::to_owned))
        .collect();
    Ok((inline.policy_names().to_vec(), attached))
}

/// `text` with its `%XX` escapes decoded: IAM hands policy documents back URL-encoded.
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (byte, hex) {
            (b'%', Some(decoded)) => {
                out.push(decoded);
                i += 3;
            }
            _ => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// --------------------------------------------------------------------------- log group

/// Finds or creates the log group, tagged, with `retention_days`.
pub(super) async fn log_group(ctx: &Ctx<'_>, group: &str, retention_days: i32) -> Outcome<()> {
    let created = ensure_log_group(ctx.aws, ctx.name, group, Some(retention_days), ctx.dry_run);
    if !created.await? {
        return Ok(((), "exists".into()));
    }
    Ok((
        (),
        would(ctx, &format!("the group, keeping {retention_days} days")),
    ))
}

/// Creates the log group `group` of `deployment`, tagged, keeping `retention_days` where
/// given, unless it exists: one that does is used whoever made it, since tasks write to
/// the group the manifest names. Returns whether it was (or would be) created.
pub(crate) async fn ensure_log_group(
    aws: &Clients,
    deployment: &str,
    group: &str,
    retention_days: Option<i32>,
    dry_run: bool,
) -> Result<bool, DeployError> {
    if LogGroup::find_by_name(aws, deployment, group)
        .await?
        .is_some()
    {
        return Ok(false);
    }
    if dry_run {
        return Ok(true);
    }
    let resource = LogGroup::resource(group);
    aws.logs
        .create_log_group()
        .log_group_name(group)
        .tags(DEPLOYMENT_TAG, deployment)
        .send()
        .await
        .map_err(|e| DeployError::aws(&resource, "logs:CreateLogGroup", &e))?;
    if let Some(days) = retention_days {
        aws.logs
            .put_retention_policy()
            .log_group_name(group)
            .retention_in_days(days)
            .send()
            .await
            .map_err(|e| DeployError::aws(&resource, "logs:PutRetentionPolicy", &e))?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_execution_policy_names_only_what_the_tasks_need() {
        let policy = execution_policy(
            "arn:aws:iam::123456789012:role/fjord-execution",
            "eu-west-1",
            "fjord",
            "/ecs/fjord",
            &[
                "arn:aws:secretsmanager:eu-west-1:123456789012:secret:fjord/redis-auth-token-AbCdEf",
                "arn:aws:ssm:eu-west-1:123456789012:parameter/fjord/kafka",
                // A JSON key and a version stage; a name without its six characters.
                "arn:aws:secretsmanager:eu-west-1:123456789012:secret:fjord/kafka-XyZ123:password:AWSCURRENT:",
                "arn:aws:secretsmanager:eu-west-1:123456789012:secret:fjord/jwt",
            ],
            &[
                "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
                    .to_owned(),
            ],
        );
        let statements = policy["Statement"].as_array().unwrap();
        assert_eq!(statements.len(), 6);
        assert_eq!(
            statements[3]["Resource"],
            serde_json::json!([
                "arn:aws:secretsmanager:eu-west-1:123456789012:secret:fjord/jwt",
                "arn:aws:secretsmanager:eu-west-1:123456789012:secret:fjord/jwt-??????",
                "arn:aws:secretsmanager:eu-west-1:123456789012:secret:fjord/kafka-XyZ123",
                "arn:aws:secretsmanager:eu-west-1:123456789012:secret:fjord/kafka-XyZ123-??????",
                "arn:aws:secretsmanager:eu-west-1:123456789012:secret:fjord/redis-auth-token-AbCdEf",
                "arn:aws:secretsmanager:eu-west-1:123456789012:secret:fjord/redis-auth-token-AbCdEf-??????",
            ])
        );
        assert_eq!(statements[5]["Action"], "kms:Decrypt");
        assert_eq!(
            statements[5]["Resource"][0],
            "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
        );
        assert_eq!(
            statements[1]["Resource"],
            "arn:aws:ecr:eu-west-1:123456789012:repository/fjord/*"
        );
        assert_eq!(
            statements[2]["Resource"],
            "arn:aws:logs:eu-west-1:123456789012:log-group:/ecs/fjord:*"
        );
        assert_eq!(
            statements[4]["Resource"][0],
            "arn:aws:ssm:eu-west-1:123456789012:parameter/fjord/kafka"
        );
        assert_eq!(percent_decode("%7B%22a%22%3A1%7D"), r#"{"a":1}"#);
    }
}
