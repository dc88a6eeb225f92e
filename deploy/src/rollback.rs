//! `fjord-deploy rollback`: puts each of the manifest's services back on the revision of
//! its task definition before the one it runs, then waits as a deploy does (the PRIMARY
//! deployment on that revision, alone and steady). The images need not be at hand: the
//! earlier revision names them by digest.

use std::time::Duration;

use aws_sdk_ecs::types::{SortOrder, TaskDefinitionStatus};

use crate::clients::Clients;
use crate::config::Deployment;
use crate::error::DeployError;
use crate::output::{Ledger, Outcome, announce, revision, say};
use crate::status::service_names;
use crate::wait;

/// How to run a rollback.
#[derive(Debug, Clone)]
pub struct RollbackOptions {
    /// Send AWS calls here instead of AWS (an emulator).
    pub endpoint_url: Option<String>,
    /// Say what would change, change nothing.
    pub dry_run: bool,
    /// How long to wait for the services to become stable; `None`: do not wait.
    pub wait: Option<Duration>,
    /// How often to look while waiting.
    pub poll: Duration,
}

/// Rolls every service of `deployment` back one revision.
pub async fn rollback(
    deployment: &Deployment,
    options: &RollbackOptions,
) -> Result<(), DeployError> {
    let deploy = &deployment.deploy;
    let aws = Clients::connect(&deploy.region, options.endpoint_url.as_deref()).await;
    let (name, cluster) = (&deploy.name, &deploy.cluster);
    let what = format!("{name} in ECS cluster {cluster} to the revisions before the ones they run");
    announce(
        options.dry_run,
        ["Planning the rollback of", "Rolling back"],
        &what,
    );
    let names = service_names(deployment);
    let mut labels: Vec<String> = names.iter().map(|n| format!("service {n}")).collect();
    if options.wait.is_some() && !options.dry_run {
        labels.push(wait::STABLE_STEP.to_owned());
    }
    let mut ledger = Ledger::new(labels);
    let mut targets = Vec::with_capacity(names.len());
    for name in &names {
        let previous = ledger
            .run(
                format!("service {name}"),
                Box::pin(back_one(&aws, &deploy.cluster, name, options.dry_run)),
            )
            .await?;
        targets.push(previous);
    }
    if options.dry_run {
        say("Dry run: nothing was changed.");
        return Ok(());
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let (timeout, poll) = (options.wait, options.poll);
    wait::stable_step(
        &mut ledger,
        &aws.ecs,
        &deploy.cluster,
        &names,
        &targets,
        timeout,
        poll,
    )
    .await?;
    Ok(())
}

/// Puts the service `name` on the revision before the one it runs; returns that
/// revision's ARN.
async fn back_one(aws: &Clients, cluster: &str, name: &str, dry_run: bool) -> Outcome<String> {
    let resource = format!("ECS service {name}");
    let services = wait::describe(&aws.ecs, cluster, &[name]).await?;
    let current = services
        .iter()
        .find(|s| s.status() == Some("ACTIVE"))
        .and_then(|s| s.task_definition())
        .ok_or_else(|| DeployError::Precondition {
            resource: resource.clone(),
            message: "not deployed: nothing to roll back".into(),
        })?;
    let (family, number) = family_and_number(current).ok_or_else(|| DeployError::Aws {
        resource: resource.clone(),
        message: format!("runs {current}, not a task definition ARN"),
    })?;
    let listed = aws
        .ecs
        .list_task_definitions()
        .family_prefix(family)
        .status(TaskDefinitionStatus::Active)
        .sort(SortOrder::Desc)
        .send()
        .await
        .map_err(|e| DeployError::aws(&resource, "ListTaskDefinitions", &e))?;
    let previous = listed
        .task_definition_arns()
        .iter()
        .filter(|arn| family_and_number(arn).is_some_and(|(f, n)| f == family && n < number))
        .max_by_key(|arn| family_and_number(arn).map(|(_, n)| n))
        .ok_or_else(|| DeployError::Precondition {
            resource: resource.clone(),
            message: format!(
                "runs {}, and the family has no earlier active revision",
                revision(current)
            ),
        })?
        .clone();
    if !dry_run {
        aws.ecs
            .update_service()
            .cluster(cluster)
            .service(name)
            .task_definition(&previous)
            .send()
            .await
            .map_err(|e| DeployError::aws(&resource, "UpdateService", &e))?;
    }
    let line = format!(
        "{} {} → {}",
        if dry_run {
            "would roll back"
        } else {
            "rolled back"
        },
        revision(current),
        revision(&previous)
    );
    Ok((previous, line))
}

/// A task definition ARN's family and revision number.
fn family_and_number(arn: &str) -> Option<(&str, u64)> {
    let (family, number) = revision(arn).rsplit_once(':')?;
    Some((family, number.parse().ok()?))
}
