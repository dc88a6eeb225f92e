//! What bootstrap creates besides the network: the load balancer (with its target group
//! and listener), ElastiCache with its AUTH token in Secrets Manager, the ECS cluster, the
//! IAM roles and the log group. Each is looked up by its name first; one that exists is
//! used when it carries the deployment's tag (an earlier, maybe interrupted, run made it)
//! and refused otherwise, since a name the manifest does not name is not the user's to
//! share.

use aws_sdk_elasticache::types::ReplicationGroup;
use aws_sdk_elasticloadbalancingv2::types::{
    Action, ActionTypeEnum, Certificate, LoadBalancer, LoadBalancerAttribute,
    LoadBalancerSchemeEnum, LoadBalancerTypeEnum, Matcher, ProtocolEnum, RedirectActionConfig,
    RedirectActionStatusCodeEnum, TargetGroupAttribute, TargetTypeEnum,
};

use super::{Ctx, PLANNED};
use crate::clients::Clients;
use crate::config::{Deployment, secret_arn};
use crate::error::{DeployError, none_if};
use crate::output::Outcome;
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

/// A resource looked up by its name.
#[derive(Debug, Clone)]
pub(crate) enum Owned<T> {
    /// There is none.
    Absent,
    /// There is one, tagged as this deployment's.
    Ours(T),
    /// There is one that fjord-deploy did not make for this deployment.
    Theirs,
}

impl<T> Owned<T> {
    /// What bootstrap may use: its own, or nothing; another's is refused.
    pub(crate) fn usable(self, resource: &str) -> Result<Option<T>, DeployError> {
        match self {
            Self::Absent => Ok(None),
            Self::Ours(value) => Ok(Some(value)),
            Self::Theirs => Err(not_ours(resource)),
        }
    }

    /// Only what the deployment owns (what destroy removes).
    pub(crate) fn ours(self) -> Option<T> {
        match self {
            Self::Ours(value) => Some(value),
            _ => None,
        }
    }
}

fn judge<'a, T>(
    ctx: &Ctx<'_>,
    tags: impl Iterator<Item = (&'a str, &'a str)>,
    value: T,
) -> Owned<T> {
    if is_ours(ctx, tags) {
        Owned::Ours(value)
    } else {
        Owned::Theirs
    }
}

fn not_ours(resource: &str) -> DeployError {
    DeployError::Precondition {
        resource: resource.to_owned(),
        message: format!(
            "exists but was not created by fjord-deploy (no {DEPLOYMENT_TAG} tag for this deployment): name it in the manifest to use it as it is, or choose another $.deploy.name"
        ),
    }
}

fn is_ours<'a>(ctx: &Ctx<'_>, mut tags: impl Iterator<Item = (&'a str, &'a str)>) -> bool {
    tags.any(|(k, v)| k == DEPLOYMENT_TAG && v == ctx.name)
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

/// Judges a load balancer or target group by the tags of `arn`.
async fn elb_owned<T>(
    ctx: &Ctx<'_>,
    arn: &str,
    resource: &str,
    value: T,
) -> Result<Owned<T>, DeployError> {
    let described = ctx
        .aws
        .elb
        .describe_tags()
        .resource_arns(arn)
        .send()
        .await
        .map_err(|e| DeployError::aws(resource, "elasticloadbalancing:DescribeTags", &e))?;
    Ok(judge(
        ctx,
        described
            .tag_descriptions()
            .iter()
            .flat_map(|d| d.tags())
            .filter_map(|t| Some((t.key()?, t.value()?))),
        value,
    ))
}

/// The deployment's target group, by name: its ARN.
pub(crate) async fn find_target_group(ctx: &Ctx<'_>) -> Result<Owned<String>, DeployError> {
    let name = Names::of(ctx.name).target_group;
    let resource = format!("target group {name}");
    let found = none_if(
        ctx.aws
            .elb
            .describe_target_groups()
            .names(&name)
            .send()
            .await,
        |e| e.is_target_group_not_found_exception(),
        &resource,
        "elasticloadbalancing:DescribeTargetGroups",
    )?;
    let Some(arn) = found
        .as_ref()
        .and_then(|found| found.target_groups().first())
        .and_then(|g| g.target_group_arn())
    else {
        return Ok(Owned::Absent);
    };
    elb_owned(ctx, arn, &resource, arn.to_owned()).await
}

/// The deployment's load balancer, by name: its ARN and DNS name.
pub(crate) async fn find_load_balancer(
    ctx: &Ctx<'_>,
) -> Result<Owned<(String, String)>, DeployError> {
    let name = Names::of(ctx.name).load_balancer;
    let resource = format!("load balancer {name}");
    let found = none_if(
        ctx.aws
            .elb
            .describe_load_balancers()
            .names(&name)
            .send()
            .await,
        |e| e.is_load_balancer_not_found_exception(),
        &resource,
        "elasticloadbalancing:DescribeLoadBalancers",
    )?;
    let Some(balancer) = found
        .as_ref()
        .and_then(|found| found.load_balancers().first())
    else {
        return Ok(Owned::Absent);
    };
    let arn = balancer.load_balancer_arn().unwrap_or_default();
    let dns = balancer.dns_name().unwrap_or_default();
    elb_owned(ctx, arn, &resource, (arn.to_owned(), dns.to_owned())).await
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
    let (balancer_arn, dns_name) = match find_load_balancer(ctx).await?.usable(&resource)? {
        Some(found) => found,
        None if ctx.dry_run => {
            created.push("load balancer");
            (PLANNED.to_owned(), PLANNED.to_owned())
        }
        None => {
            created.push("load balancer");
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
            let balancer = made.load_balancers().first();
            (
                balancer
                    .and_then(|b| b.load_balancer_arn())
                    .unwrap_or_default()
                    .to_owned(),
                balancer
                    .and_then(|b| b.dns_name())
                    .unwrap_or_default()
                    .to_owned(),
            )
        }
    };
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

    let group_resource = format!("target group {}", names.target_group);
    let target_group_arn = match find_target_group(ctx).await?.usable(&group_resource)? {
        Some(arn) => arn,
        None if ctx.dry_run => {
            created.push("target group");
            PLANNED.to_owned()
        }
        None => {
            created.push("target group");
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
            made.target_groups()
                .first()
                .and_then(|g| g.target_group_arn())
                .unwrap_or_default()
                .to_owned()
        }
    };
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

/// The AUTH token's secret, by name: its ARN.
pub(crate) async fn find_secret(ctx: &Ctx<'_>, name: &str) -> Result<Owned<String>, DeployError> {
    let resource = format!("secret {name}");
    let found = none_if(
        ctx.aws
            .secrets
            .describe_secret()
            .secret_id(name)
            .send()
            .await,
        |e| e.is_resource_not_found_exception(),
        &resource,
        "secretsmanager:DescribeSecret",
    )?;
    Ok(found.map_or(Owned::Absent, |found| {
        judge(
            ctx,
            found
                .tags()
                .iter()
                .filter_map(|t| Some((t.key()?, t.value()?))),
            found.arn().unwrap_or_default().to_owned(),
        )
    }))
}

/// The deployment's replication group, by name.
pub(crate) async fn find_redis(ctx: &Ctx<'_>) -> Result<Owned<ReplicationGroup>, DeployError> {
    let name = Names::of(ctx.name).redis;
    let resource = format!("ElastiCache replication group {name}");
    let Some(group) = describe_replication_group(ctx.aws, &name, &resource).await? else {
        return Ok(Owned::Absent);
    };
    let arn = group.arn().unwrap_or_default().to_owned();
    cache_owned(ctx, &arn, &resource, group).await
}

/// The replication group `id` as ElastiCache describes it; `None` where there is none.
pub(crate) async fn describe_replication_group(
    aws: &Clients,
    id: &str,
    resource: &str,
) -> Result<Option<ReplicationGroup>, DeployError> {
    let found = none_if(
        aws.elasticache
            .describe_replication_groups()
            .replication_group_id(id)
            .send()
            .await,
        |e| e.is_replication_group_not_found_fault(),
        resource,
        "elasticache:DescribeReplicationGroups",
    )?;
    Ok(found.and_then(|found| found.replication_groups().first().cloned()))
}

/// Judges an ElastiCache resource by the tags of `arn`.
async fn cache_owned<T>(
    ctx: &Ctx<'_>,
    arn: &str,
    resource: &str,
    value: T,
) -> Result<Owned<T>, DeployError> {
    let tags = ctx
        .aws
        .elasticache
        .list_tags_for_resource()
        .resource_name(arn)
        .send()
        .await
        .map_err(|e| DeployError::aws(resource, "elasticache:ListTagsForResource", &e))?;
    Ok(judge(
        ctx,
        tags.tag_list()
            .iter()
            .filter_map(|t| Some((t.key()?, t.value()?))),
        value,
    ))
}

/// The deployment's cache subnet group, by name.
pub(crate) async fn find_subnet_group(ctx: &Ctx<'_>) -> Result<Owned<String>, DeployError> {
    let name = Names::of(ctx.name).redis;
    let resource = format!("cache subnet group {name}");
    let found = none_if(
        ctx.aws
            .elasticache
            .describe_cache_subnet_groups()
            .cache_subnet_group_name(&name)
            .send()
            .await,
        |e| e.is_cache_subnet_group_not_found_fault(),
        &resource,
        "elasticache:DescribeCacheSubnetGroups",
    )?;
    let Some(group) = found
        .as_ref()
        .and_then(|found| found.cache_subnet_groups().first())
    else {
        return Ok(Owned::Absent);
    };
    let arn = group.arn().unwrap_or_default();
    cache_owned(ctx, arn, &resource, name).await
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

    let secret_arn = match find_secret(ctx, &names.secret)
        .await?
        .usable(&format!("secret {}", names.secret))?
    {
        Some(arn) => arn,
        None if ctx.dry_run => {
            created.push("AUTH token secret");
            PLANNED.to_owned()
        }
        None => {
            created.push("AUTH token secret");
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
            ctx.aws
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
                .to_owned()
        }
    };

    let subnet_group = format!("cache subnet group {}", names.redis);
    let exists = find_subnet_group(ctx)
        .await?
        .usable(&subnet_group)?
        .is_some();
    if !exists {
        created.push("cache subnet group");
        if !ctx.dry_run {
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
        }
    }

    let group = match find_redis(ctx).await?.usable(&resource)? {
        Some(group) => Some(group),
        None if ctx.dry_run => {
            created.push("replication group");
            None
        }
        None => {
            created.push("replication group");
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
            made.replication_group().cloned()
        }
    };

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

/// The active ECS cluster `name`.
pub(crate) async fn find_cluster(ctx: &Ctx<'_>, name: &str) -> Result<Owned<()>, DeployError> {
    let resource = format!("ECS cluster {name}");
    let found = ctx
        .aws
        .ecs
        .describe_clusters()
        .clusters(name)
        .include(aws_sdk_ecs::types::ClusterField::Tags)
        .send()
        .await
        .map_err(|e| DeployError::aws(&resource, "ecs:DescribeClusters", &e))?;
    Ok(
        match found
            .clusters()
            .iter()
            .find(|c| c.status() == Some("ACTIVE"))
        {
            Some(cluster) => judge(
                ctx,
                cluster
                    .tags()
                    .iter()
                    .filter_map(|t| Some((t.key()?, t.value()?))),
                (),
            ),
            None => Owned::Absent,
        },
    )
}

/// Finds or creates the ECS cluster `name`; one that exists is used when the manifest
/// names it (`named`) or the deployment's tag says bootstrap made it.
pub(super) async fn cluster(ctx: &Ctx<'_>, name: &str, named: bool) -> Outcome<String> {
    let resource = format!("ECS cluster {name}");
    match find_cluster(ctx, name).await? {
        Owned::Ours(()) => return Ok((name.to_owned(), "exists".into())),
        Owned::Theirs if named => {
            return Ok((name.to_owned(), "exists (yours, used as it is)".into()));
        }
        Owned::Theirs => return Err(not_ours(&resource)),
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

/// The deployment's role `name`: its ARN.
pub(crate) async fn find_role(ctx: &Ctx<'_>, name: &str) -> Result<Owned<String>, DeployError> {
    let resource = format!("IAM role {name}");
    let found = none_if(
        ctx.aws.iam.get_role().role_name(name).send().await,
        |e| e.is_no_such_entity_exception(),
        &resource,
        "iam:GetRole",
    )?;
    Ok(match found.as_ref().and_then(|found| found.role()) {
        Some(role) => judge(
            ctx,
            role.tags().iter().map(|t| (t.key(), t.value())),
            role.arn().to_owned(),
        ),
        None => Owned::Absent,
    })
}

/// Finds or creates the role `name` that ECS tasks assume; returns its ARN and whether it
/// was (or would be) created.
pub(super) async fn role(ctx: &Ctx<'_>, name: &str) -> Result<(String, bool), DeployError> {
    if let Some(arn) = find_role(ctx, name)
        .await?
        .usable(&format!("IAM role {name}"))?
    {
        return Ok((arn, false));
    }
    if ctx.dry_run {
        return Ok((PLANNED.to_owned(), true));
    }
    let resource = format!("IAM role {name}");
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
    Ok((
        made.role().map(|r| r.arn().to_owned()).unwrap_or_default(),
        true,
    ))
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
    let resource = format!("log group {group}");
    let found = ctx
        .aws
        .logs
        .describe_log_groups()
        .log_group_name_prefix(group)
        .send()
        .await
        .map_err(|e| DeployError::aws(&resource, "logs:DescribeLogGroups", &e))?;
    if found
        .log_groups()
        .iter()
        .any(|g| g.log_group_name() == Some(group))
    {
        return Ok(((), "exists".into()));
    }
    if !ctx.dry_run {
        ctx.aws
            .logs
            .create_log_group()
            .log_group_name(group)
            .tags(DEPLOYMENT_TAG, ctx.name)
            .send()
            .await
            .map_err(|e| DeployError::aws(&resource, "logs:CreateLogGroup", &e))?;
        ctx.aws
            .logs
            .put_retention_policy()
            .log_group_name(group)
            .retention_in_days(retention_days)
            .send()
            .await
            .map_err(|e| DeployError::aws(&resource, "logs:PutRetentionPolicy", &e))?;
    }
    Ok((
        (),
        would(ctx, &format!("the group, keeping {retention_days} days")),
    ))
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
