//! Takes down what deploys made. A deploy tags everything it creates with
//! `fjord:deployment = <name>`; this module finds a deployment's services, task definition
//! families, log group and ECR repositories by their names *and* that tag (a service or
//! task definition from before the tag existed is known by its `fjord:fingerprint` tag),
//! so that nothing the tool did not create is touched. A deploy uses it to prune the
//! services of consumer groups gone from the manifest; `fjord-deploy destroy` uses it to
//! remove the whole deployment. Services are drained (desired count 0, then waited on
//! until no task is left) before they are deleted, with their scaling target. What
//! `bootstrap` created goes last, by [`crate::teardown`].

use std::time::Duration;

use aws_sdk_applicationautoscaling::types::{ScalableDimension, ServiceNamespace};
use aws_sdk_cloudwatchlogs::types::LogGroup;
use aws_sdk_ecr::types::Repository;
use aws_sdk_ecs::types::{
    ServiceField, TaskDefinitionFamilyStatus, TaskDefinitionField, TaskDefinitionStatus,
};

use crate::clients::Clients;
use crate::config::{Blueprint, Deployment};
use crate::error::{DeployError, none_if};
use crate::output::{Ledger, Outcome, REMOVING, announce, say};
use crate::ownership::{Owned, deployed_by, lookup};
use crate::plan::{self, DEPLOYMENT_TAG, Role};
use crate::teardown::Removal;
use crate::wait;

/// How to run a teardown.
#[derive(Debug, Clone)]
pub struct DestroyOptions {
    /// Report what would be removed, remove nothing.
    pub dry_run: bool,
    /// Send AWS calls here instead of AWS (an emulator).
    pub endpoint_url: Option<String>,
    /// Also delete the ECR repositories the deploy created, with their images.
    pub repositories: bool,
    /// Also delete the log group the deploy created, with its logs.
    pub log_group: bool,
    /// How long to wait for a service's tasks to stop.
    pub drain_timeout: Duration,
    /// How often to look while waiting.
    pub poll: Duration,
}

impl DestroyOptions {
    /// The teardown of what bootstrap created for `name`, as these options say.
    fn removal<'a>(&self, aws: &'a Clients, name: &'a str) -> Removal<'a> {
        Removal {
            aws,
            name,
            dry_run: self.dry_run,
            timeout: self.drain_timeout,
            poll: self.poll,
        }
    }
}

/// Whether `name` is one the deployment gives its services and task families.
fn named_like(deployment: &Deployment, name: &str) -> bool {
    let deploy = &deployment.deploy.name;
    name == server_name(deployment) || name.starts_with(&plan::consumer_name(deploy, ""))
}

fn server_name(deployment: &Deployment) -> String {
    format!("{}-server", deployment.deploy.name)
}

fn ecs_tags(tags: &[aws_sdk_ecs::types::Tag]) -> impl Iterator<Item = (&str, &str)> {
    tags.iter()
        .filter_map(|t| Some((t.key()?, t.value().unwrap_or_default())))
}

/// A service of the deployment, as found.
#[derive(Debug, Clone)]
pub(crate) struct FoundService {
    pub(crate) name: String,
    /// Deleted already, its tasks still stopping (`DRAINING`): only waited on.
    draining: bool,
    /// Tasks running or pending.
    tasks: i32,
}

/// The deployment's services in its cluster but those named in `except` (none if the
/// cluster is gone).
pub(crate) async fn services(
    aws: &Clients,
    deployment: &Deployment,
    except: &[&str],
) -> Result<Vec<FoundService>, DeployError> {
    let cluster = &deployment.deploy.cluster;
    let resource = format!("ECS services in {cluster}");
    let listed = aws
        .ecs
        .list_services()
        .cluster(cluster)
        .into_paginator()
        .items()
        .send()
        .collect::<Result<Vec<String>, _>>()
        .await;
    let Some(arns) = none_if(
        listed,
        |e| e.is_cluster_not_found_exception(),
        &resource,
        "ListServices",
    )?
    else {
        return Ok(Vec::new());
    };
    let candidates: Vec<String> = arns
        .iter()
        .map(|arn| arn.rsplit('/').next().unwrap_or(arn).to_owned())
        .filter(|name| named_like(deployment, name) && !except.contains(&name.as_str()))
        .collect();
    let mut found = Vec::new();
    // DescribeServices takes at most 10 services per call.
    for chunk in candidates.chunks(10) {
        let described = aws
            .ecs
            .describe_services()
            .cluster(cluster)
            .set_services(Some(chunk.to_vec()))
            .include(ServiceField::Tags)
            .send()
            .await
            .map_err(|e| DeployError::aws(&resource, "DescribeServices", &e))?;
        for service in described.services() {
            let status = service.status().unwrap_or_default();
            if !matches!(status, "ACTIVE" | "DRAINING")
                || !deployed_by(&deployment.deploy.name, ecs_tags(service.tags()))
            {
                continue;
            }
            found.push(FoundService {
                name: service.service_name().unwrap_or_default().to_owned(),
                draining: status == "DRAINING",
                tasks: service.running_count() + service.pending_count(),
            });
        }
    }
    Ok(found)
}

/// A task definition family of the deployment, with its revisions' ARNs.
#[derive(Debug, Clone)]
pub(crate) struct Family {
    pub(crate) name: String,
    active: Vec<String>,
    inactive: Vec<String>,
}

async fn revisions(
    aws: &Clients,
    family: &str,
    status: TaskDefinitionStatus,
) -> Result<Vec<String>, DeployError> {
    aws.ecs
        .list_task_definitions()
        .family_prefix(family)
        .status(status)
        .into_paginator()
        .items()
        .send()
        .collect::<Result<Vec<String>, _>>()
        .await
        .map_err(|e| {
            DeployError::aws(
                format!("task definition {family}"),
                "ListTaskDefinitions",
                &e,
            )
        })
}

/// The deployment's task definition families that still have revisions, but those named
/// in `except`, told apart by the tags of their newest revision.
pub(crate) async fn families(
    aws: &Clients,
    deployment: &Deployment,
    except: &[&str],
) -> Result<Vec<Family>, DeployError> {
    let prefix = format!("{}-", deployment.deploy.name);
    let names = aws
        .ecs
        .list_task_definition_families()
        .family_prefix(&prefix)
        // A family whose revisions are all inactive still has revisions to delete.
        .status(TaskDefinitionFamilyStatus::All)
        .into_paginator()
        .items()
        .send()
        .collect::<Result<Vec<String>, _>>()
        .await
        .map_err(|e| {
            DeployError::aws(
                format!("task definitions {prefix}*"),
                "ListTaskDefinitionFamilies",
                &e,
            )
        })?;
    let mut found = Vec::new();
    let names = names
        .into_iter()
        .filter(|n| named_like(deployment, n) && !except.contains(&n.as_str()));
    for name in names {
        let active = revisions(aws, &name, TaskDefinitionStatus::Active).await?;
        let inactive = revisions(aws, &name, TaskDefinitionStatus::Inactive).await?;
        let Some(newest) = active
            .iter()
            .chain(&inactive)
            .max_by_key(|arn| revision_number(arn))
        else {
            continue;
        };
        let described = aws
            .ecs
            .describe_task_definition()
            .task_definition(newest)
            .include(TaskDefinitionField::Tags)
            .send()
            .await
            .map_err(|e| {
                DeployError::aws(
                    format!("task definition {name}"),
                    "DescribeTaskDefinition",
                    &e,
                )
            })?;
        if deployed_by(&deployment.deploy.name, ecs_tags(described.tags())) {
            found.push(Family {
                name,
                active,
                inactive,
            });
        }
    }
    Ok(found)
}

fn revision_number(arn: &str) -> u64 {
    arn.rsplit_once(':')
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(0)
}

/// Removes a service: its scaling target and policies, then its tasks (desired count 0,
/// waited on), then the service. A dry run only says so.
pub(crate) async fn remove_service(
    aws: &Clients,
    cluster: &str,
    service: &FoundService,
    dry_run: bool,
    timeout: Duration,
    poll: Duration,
) -> Outcome<()> {
    let name = &service.name;
    let scaling = remove_scaling(aws, cluster, name, dry_run).await?;
    if dry_run {
        return Ok((
            (),
            format!(
                "would remove{scaling}: drain {} task(s), then delete",
                service.tasks
            ),
        ));
    }
    let resource = format!("ECS service {name}");
    if !service.draining {
        aws.ecs
            .update_service()
            .cluster(cluster)
            .service(name)
            .desired_count(0)
            .send()
            .await
            .map_err(|e| DeployError::aws(&resource, "UpdateService", &e))?;
    }
    let mut took = wait::until_drained(&aws.ecs, cluster, name, timeout, poll).await?;
    if !service.draining {
        aws.ecs
            .delete_service()
            .cluster(cluster)
            .service(name)
            .send()
            .await
            .map_err(|e| DeployError::aws(&resource, "DeleteService", &e))?;
    }
    // A deleted service stays DRAINING for a while: the cluster cannot be deleted, nor a
    // service of the same name created (a consumer group added back), until it is not.
    took += wait::until_inactive(&aws.ecs, cluster, name, timeout, poll).await?;
    Ok((
        (),
        format!(
            "removed{scaling}: drained {} task(s) in {} s, deleted",
            service.tasks,
            took.as_secs()
        ),
    ))
}

/// Removes the scaling policies and target of a service, if it has any; returns what it
/// did for the outcome line.
async fn remove_scaling(
    aws: &Clients,
    cluster: &str,
    service: &str,
    dry_run: bool,
) -> Result<String, DeployError> {
    let resource_id = format!("service/{cluster}/{service}");
    let resource = format!("scalable target {resource_id}");
    let targets = aws
        .scaling
        .describe_scalable_targets()
        .service_namespace(ServiceNamespace::Ecs)
        .scalable_dimension(ScalableDimension::EcsServiceDesiredCount)
        .resource_ids(&resource_id)
        .send()
        .await
        .map_err(|e| DeployError::aws(&resource, "DescribeScalableTargets", &e))?;
    if targets.scalable_targets().is_empty() {
        return Ok(String::new());
    }
    let policies = aws
        .scaling
        .describe_scaling_policies()
        .service_namespace(ServiceNamespace::Ecs)
        .scalable_dimension(ScalableDimension::EcsServiceDesiredCount)
        .resource_id(&resource_id)
        .send()
        .await
        .map_err(|e| DeployError::aws(&resource, "DescribeScalingPolicies", &e))?;
    let count = policies.scaling_policies().len();
    if !dry_run {
        // Deregistering a target deletes its policies in AWS; deleting them first keeps a
        // teardown complete wherever that is not so.
        for policy in policies.scaling_policies() {
            aws.scaling
                .delete_scaling_policy()
                .policy_name(policy.policy_name())
                .service_namespace(ServiceNamespace::Ecs)
                .scalable_dimension(ScalableDimension::EcsServiceDesiredCount)
                .resource_id(&resource_id)
                .send()
                .await
                .map_err(|e| {
                    DeployError::aws(
                        format!("scaling policy {}", policy.policy_name()),
                        "DeleteScalingPolicy",
                        &e,
                    )
                })?;
        }
        aws.scaling
            .deregister_scalable_target()
            .service_namespace(ServiceNamespace::Ecs)
            .scalable_dimension(ScalableDimension::EcsServiceDesiredCount)
            .resource_id(&resource_id)
            .send()
            .await
            .map_err(|e| DeployError::aws(&resource, "DeregisterScalableTarget", &e))?;
    }
    Ok(format!(" (with its scaling target and {count} policies)"))
}

/// Deregisters every active revision of a family, then deletes every inactive one.
pub(crate) async fn remove_family(aws: &Clients, family: &Family, dry_run: bool) -> Outcome<()> {
    let total = family.active.len() + family.inactive.len();
    if dry_run {
        return Ok((
            (),
            format!(
                "would deregister {} and delete {total} revision(s)",
                family.active.len()
            ),
        ));
    }
    let resource = format!("task definition {}", family.name);
    for arn in &family.active {
        aws.ecs
            .deregister_task_definition()
            .task_definition(arn)
            .send()
            .await
            .map_err(|e| DeployError::aws(&resource, "DeregisterTaskDefinition", &e))?;
    }
    let all: Vec<&String> = family.active.iter().chain(&family.inactive).collect();
    // DeleteTaskDefinitions takes at most 10 revisions per call.
    for chunk in all.chunks(10) {
        let deleted = aws
            .ecs
            .delete_task_definitions()
            .set_task_definitions(Some(chunk.iter().map(|arn| (*arn).clone()).collect()))
            .send()
            .await
            .map_err(|e| DeployError::aws(&resource, "DeleteTaskDefinitions", &e))?;
        if let Some(failure) = deleted.failures().first() {
            return Err(DeployError::Aws {
                resource,
                message: format!(
                    "DeleteTaskDefinitions: {}: {}",
                    failure.arn().unwrap_or_default(),
                    failure.reason().unwrap_or("no reason given")
                ),
            });
        }
    }
    Ok((
        (),
        format!(
            "deregistered {} and deleted {total} revision(s)",
            family.active.len()
        ),
    ))
}

/// Removes what bootstrap created for a manifest that a deploy cannot read yet (a
/// bootstrap that was interrupted before it wrote the ids back): there are no services.
pub async fn destroy_bootstrapped(
    blueprint: &Blueprint,
    options: &DestroyOptions,
) -> Result<(), DeployError> {
    let deploy = &blueprint.deploy;
    let aws = Clients::connect(&deploy.region, options.endpoint_url.as_deref()).await;
    let (name, region) = (&deploy.name, &deploy.region);
    let what = format!("what bootstrap created for {name} in {region}");
    announce(options.dry_run, REMOVING, &what);
    let removal = options.removal(&aws, &deploy.name);
    let infrastructure = removal.find(deploy.cluster_name()).await?;
    let labels = infrastructure.labels();
    if labels.is_empty() {
        say(format_args!(
            "Nothing left of {} that fjord-deploy created and this run removes.",
            deploy.name
        ));
    }
    let mut ledger = Ledger::new(labels);
    Box::pin(infrastructure.remove(&removal, &mut ledger)).await?;
    if options.dry_run {
        say("Dry run: nothing was changed.");
    }
    Ok(())
}

/// Removes what deploys of `deployment` created, as `options` say.
pub async fn destroy(deployment: &Deployment, options: &DestroyOptions) -> Result<(), DeployError> {
    let deploy = &deployment.deploy;
    let aws = Clients::connect(&deploy.region, options.endpoint_url.as_deref()).await;
    let (name, cluster, region) = (&deploy.name, &deploy.cluster, &deploy.region);
    let what = format!("{name} from ECS cluster {cluster} in {region}");
    announce(options.dry_run, REMOVING, &what);

    // Everything is found first, with read-only calls, so that a failure midway can say
    // what was removed and what was not.
    let services = services(&aws, deployment, &[]).await?;
    let families = families(&aws, deployment, &[]).await?;
    let mut kept = Vec::new();
    let log_group = if options.log_group {
        lookup::<LogGroup>(&aws, &deploy.name, &deploy.logs.group).await?
    } else {
        kept.push(format!(
            "log group {} (kept; --log-group removes it)",
            deploy.logs.group
        ));
        Owned::Absent
    };
    let mut repositories = Vec::new();
    for role in Role::ALL {
        let name = plan::repository(deployment, role);
        if options.repositories {
            repositories.push((lookup::<Repository>(&aws, &deploy.name, &name).await?, name));
        } else {
            kept.push(format!(
                "ECR repository {name} (kept; --repositories removes it)"
            ));
        }
    }
    let not_ours = |resource: &str| {
        format!("{resource} (not created by fjord-deploy: no {DEPLOYMENT_TAG} tag)")
    };
    let log_group = match log_group {
        Owned::Ours(_) => true,
        Owned::Theirs(resource) => {
            kept.push(not_ours(&resource));
            false
        }
        Owned::Absent => false,
    };
    let repositories: Vec<String> = repositories
        .into_iter()
        .filter_map(|(found, name)| match found {
            Owned::Ours(_) => Some(name),
            Owned::Theirs(resource) => {
                kept.push(not_ours(&resource));
                None
            }
            Owned::Absent => None,
        })
        .collect();

    let removal = options.removal(&aws, &deploy.name);
    let infrastructure = removal.find(&deploy.cluster).await?;

    let mut labels: Vec<String> = services
        .iter()
        .map(|s| format!("service {}", s.name))
        .collect();
    labels.extend(
        families
            .iter()
            .map(|f| format!("task definition {}", f.name)),
    );
    if log_group {
        labels.push(format!("log group {}", deploy.logs.group));
    }
    labels.extend(repositories.iter().map(|r| format!("ECR repository {r}")));
    labels.extend(infrastructure.labels());
    let nothing = labels.is_empty();

    let mut ledger = Ledger::new(labels);
    for service in &services {
        ledger
            .run(
                format!("service {}", service.name),
                Box::pin(remove_service(
                    &aws,
                    &deploy.cluster,
                    service,
                    options.dry_run,
                    options.drain_timeout,
                    options.poll,
                )),
            )
            .await?;
    }
    for family in &families {
        ledger
            .run(
                format!("task definition {}", family.name),
                remove_family(&aws, family, options.dry_run),
            )
            .await?;
    }
    if log_group {
        let group = &deploy.logs.group;
        ledger
            .run(format!("log group {group}"), async {
                if !options.dry_run {
                    aws.logs
                        .delete_log_group()
                        .log_group_name(group)
                        .send()
                        .await
                        .map_err(|e| {
                            DeployError::aws(format!("log group {group}"), "DeleteLogGroup", &e)
                        })?;
                }
                Ok(((), would(options.dry_run, "delete", "deleted")))
            })
            .await?;
    }
    for name in &repositories {
        ledger
            .run(format!("ECR repository {name}"), async {
                if !options.dry_run {
                    aws.ecr
                        .delete_repository()
                        .repository_name(name)
                        .force(true)
                        .send()
                        .await
                        .map_err(|e| {
                            DeployError::aws(
                                format!("ECR repository {name}"),
                                "DeleteRepository",
                                &e,
                            )
                        })?;
                }
                Ok((
                    (),
                    would(
                        options.dry_run,
                        "delete, with its images",
                        "deleted, with its images",
                    ),
                ))
            })
            .await?;
    }
    Box::pin(infrastructure.remove(&removal, &mut ledger)).await?;
    for line in &kept {
        say(format_args!("  left: {line}"));
    }
    if nothing {
        say(format_args!(
            "Nothing left of {} that fjord-deploy created and this run removes.",
            deploy.name
        ));
    }
    if options.dry_run {
        say("Dry run: nothing was changed.");
    }
    Ok(())
}

fn would(dry_run: bool, action: &str, done: &str) -> String {
    if dry_run {
        format!("would {action}")
    } else {
        done.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn names_follow_the_deployment() {
        let deployment =
            Deployment::parse(fjord_config::EXAMPLE, Path::new("manifest.json")).unwrap();
        assert!(named_like(&deployment, "fjord-server"));
        assert!(named_like(&deployment, "fjord-consumer-orders"));
        assert!(!named_like(&deployment, "fjord-server-old"));
        assert!(!named_like(&deployment, "fjord-web"));
        assert_eq!(revision_number("arn:aws:ecs:r:1:task-definition/f:12"), 12);
    }
}
