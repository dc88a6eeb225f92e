//! `fjord-deploy status`: where the manifest's services stand, read only — each
//! service's state and counts, its deployments (the task definition each runs, rollout
//! state, failed tasks), the images its task definition runs (by digest), and its
//! latest events.

use aws_sdk_ecs::primitives::DateTimeFormat;
use aws_sdk_ecs::types::Service;

use crate::clients::Clients;
use crate::config::Deployment;
use crate::error::DeployError;
use crate::output::{revision, say};
use crate::plan::Plan;

/// How many of a service's events `status` shows, newest first.
const EVENTS_SHOWN: usize = 5;

/// The names of the services the manifest wants: the server's, then each consumer
/// group's (names do not depend on the images).
pub(crate) fn service_names(deployment: &Deployment) -> Vec<String> {
    Plan::new(deployment, "", "")
        .services
        .into_iter()
        .map(|s| s.name)
        .collect()
}

/// Prints the state of every service of `deployment`.
pub async fn status(
    deployment: &Deployment,
    endpoint_url: Option<&str>,
) -> Result<(), DeployError> {
    let deploy = &deployment.deploy;
    let aws = Clients::connect(&deploy.region, endpoint_url).await;
    say(format_args!(
        "{} in ECS cluster {} ({})",
        deploy.name, deploy.cluster, deploy.region
    ));
    let names = service_names(deployment);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let services = crate::wait::describe(&aws.ecs, &deploy.cluster, &names).await?;
    for name in names {
        match services
            .iter()
            .find(|s| s.service_name() == Some(name) && s.status() != Some("INACTIVE"))
        {
            Some(service) => show(&aws, service).await?,
            None => say(format_args!("Service {name}: not deployed")),
        }
    }
    Ok(())
}

async fn show(aws: &Clients, service: &Service) -> Result<(), DeployError> {
    let name = service.service_name().unwrap_or_default();
    say(format_args!(
        "Service {name}: {}, {}/{} running, {} pending",
        service.status().unwrap_or("UNKNOWN"),
        service.running_count(),
        service.desired_count(),
        service.pending_count(),
    ));
    for deployment in service.deployments() {
        say(format_args!(
            "  deployment {} ({}): task definition {}, {}/{} running, {} pending, {} failed{}",
            deployment.id().unwrap_or("?"),
            deployment.status().unwrap_or("?"),
            revision(deployment.task_definition().unwrap_or("none")),
            deployment.running_count(),
            deployment.desired_count(),
            deployment.pending_count(),
            deployment.failed_tasks(),
            deployment
                .rollout_state()
                .map(|state| format!(
                    ", rollout {}{}",
                    state.as_str(),
                    deployment
                        .rollout_state_reason()
                        .map(|why| format!(": {why}"))
                        .unwrap_or_default()
                ))
                .unwrap_or_default(),
        ));
    }
    if let Some(task_definition) = service.task_definition() {
        let described = aws
            .ecs
            .describe_task_definition()
            .task_definition(task_definition)
            .send()
            .await
            .map_err(|e| {
                DeployError::aws(
                    format!("task definition {}", revision(task_definition)),
                    "DescribeTaskDefinition",
                    &e,
                )
            })?;
        for container in described
            .task_definition()
            .map(|t| t.container_definitions())
            .unwrap_or_default()
        {
            say(format_args!(
                "  image of {} ({}): {}",
                container.name().unwrap_or("?"),
                revision(task_definition),
                container.image().unwrap_or("?")
            ));
        }
    }
    for event in service.events().iter().take(EVENTS_SHOWN) {
        say(format_args!(
            "  event {}: {}",
            event
                .created_at()
                .and_then(|at| at.fmt(DateTimeFormat::DateTime).ok())
                .unwrap_or_default(),
            event.message().unwrap_or_default()
        ));
    }
    Ok(())
}
