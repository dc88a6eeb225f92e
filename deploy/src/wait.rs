//! After the changes: watches the services until each runs its desired count on a single
//! deployment (or a deployment fails, or time runs out), printing each change of state,
//! then prints where the load balancer answers and each service's state. Also watches a
//! service being removed until its last task has stopped, and any slow AWS resource
//! (a NAT gateway, an ElastiCache group, a load balancer) until it is ready or gone.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use aws_sdk_ecs::types::{DeploymentRolloutState, Service};

use crate::error::DeployError;
use crate::output::{revision, say};

/// Looks at a slow resource every `poll` until `look` says it is done (`None`), printing
/// each new state it reports (`Some(state)`) with the seconds waited, up to `timeout`.
pub(crate) async fn until<F, Fut>(
    what: &str,
    timeout: Duration,
    poll: Duration,
    mut look: F,
) -> Result<Duration, DeployError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<String>, DeployError>>,
{
    let started = Instant::now();
    let mut last = None;
    loop {
        let Some(state) = look().await? else {
            return Ok(started.elapsed());
        };
        if last.as_ref() != Some(&state) {
            say(format_args!(
                "  … {what}: {state} ({} s)",
                started.elapsed().as_secs()
            ));
            last = Some(state.clone());
        }
        if started.elapsed() >= timeout {
            return Err(DeployError::NotStable(format!(
                "{what}: still {state} after {} s; running the command again resumes the wait",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(poll).await;
    }
}

/// Waits until every service in `names` is stable, up to `timeout`.
pub(crate) async fn until_stable(
    ecs: &aws_sdk_ecs::Client,
    cluster: &str,
    names: &[&str],
    timeout: Duration,
    poll: Duration,
) -> Result<(), DeployError> {
    let started = Instant::now();
    let mut last: HashMap<String, String> = HashMap::new();
    loop {
        let services = describe(ecs, cluster, names).await?;
        for service in &services {
            let name = service.service_name().unwrap_or_default().to_owned();
            let line = state(service);
            if last.get(&name) != Some(&line) {
                say(format_args!(
                    "  … {name}: {line} ({} s)",
                    started.elapsed().as_secs()
                ));
                last.insert(name, line);
            }
        }
        if let Some((service, reason)) = services
            .iter()
            .find_map(|s| failed(s).map(|reason| (s, reason)))
        {
            return Err(DeployError::NotStable(format!(
                "ECS service {}: the deployment failed and the circuit breaker rolls it back: {reason}",
                service.service_name().unwrap_or_default()
            )));
        }
        if services.len() == names.len() && services.iter().all(stable) {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            let states: Vec<String> = services
                .iter()
                .filter(|s| !stable(s))
                .map(|s| format!("{}: {}", s.service_name().unwrap_or_default(), state(s)))
                .collect();
            return Err(DeployError::NotStable(format!(
                "services not stable after {} s: {}",
                timeout.as_secs(),
                states.join("; ")
            )));
        }
        tokio::time::sleep(poll).await;
    }
}

/// Waits until the service `name` runs no task (after its desired count went to 0), up
/// to `timeout`, printing each change; returns how long it took.
pub(crate) async fn until_drained(
    ecs: &aws_sdk_ecs::Client,
    cluster: &str,
    name: &str,
    timeout: Duration,
    poll: Duration,
) -> Result<Duration, DeployError> {
    let started = Instant::now();
    let mut last = None;
    loop {
        let services = describe(ecs, cluster, &[name]).await?;
        let Some(service) = services.first() else {
            return Ok(started.elapsed());
        };
        let tasks = (service.running_count(), service.pending_count());
        if tasks == (0, 0) {
            return Ok(started.elapsed());
        }
        if last != Some(tasks) {
            say(format_args!(
                "  … {name}: draining, {} running, {} pending ({} s)",
                tasks.0,
                tasks.1,
                started.elapsed().as_secs()
            ));
            last = Some(tasks);
        }
        if started.elapsed() >= timeout {
            return Err(DeployError::NotStable(format!(
                "ECS service {name}: tasks still running after {} s: {}",
                timeout.as_secs(),
                state(service)
            )));
        }
        tokio::time::sleep(poll).await;
    }
}

/// Prints the load balancer's addresses and every service's state.
pub(crate) async fn print_status(
    ecs: &aws_sdk_ecs::Client,
    cluster: &str,
    names: &[&str],
    addresses: &[String],
    target_group: &str,
) -> Result<(), DeployError> {
    say(format_args!("Target group: {target_group}"));
    if addresses.is_empty() {
        say("Load balancer: none attached to the target group yet");
    }
    for address in addresses {
        say(format_args!("Load balancer: {address}"));
    }
    for service in describe(ecs, cluster, names).await? {
        say(format_args!(
            "Service {}: {}",
            service.service_name().unwrap_or_default(),
            state(&service)
        ));
    }
    Ok(())
}

async fn describe(
    ecs: &aws_sdk_ecs::Client,
    cluster: &str,
    names: &[&str],
) -> Result<Vec<Service>, DeployError> {
    let mut services = Vec::with_capacity(names.len());
    // DescribeServices takes at most 10 services per call.
    for chunk in names.chunks(10) {
        let described = ecs
            .describe_services()
            .cluster(cluster)
            .set_services(Some(chunk.iter().map(|name| (*name).to_owned()).collect()))
            .send()
            .await
            .map_err(|e| {
                DeployError::aws(format!("ECS services in {cluster}"), "DescribeServices", &e)
            })?;
        services.extend(described.services().iter().cloned());
    }
    Ok(services)
}

fn state(service: &Service) -> String {
    let rollout = service
        .deployments()
        .iter()
        .find(|d| d.status() == Some("PRIMARY"))
        .and_then(|d| d.rollout_state())
        .map(|state| format!(", rollout {}", state.as_str()))
        .unwrap_or_default();
    format!(
        "{}, {}/{} running, {} pending, {} deployment(s), task definition {}{rollout}",
        service.status().unwrap_or("UNKNOWN"),
        service.running_count(),
        service.desired_count(),
        service.pending_count(),
        service.deployments().len(),
        revision(service.task_definition().unwrap_or("none")),
    )
}

fn stable(service: &Service) -> bool {
    service.status() == Some("ACTIVE")
        && service.deployments().len() == 1
        && service.running_count() == service.desired_count()
        && service.pending_count() == 0
}

fn failed(service: &Service) -> Option<String> {
    service
        .deployments()
        .iter()
        .find(|d| d.rollout_state() == Some(&DeploymentRolloutState::Failed))
        .map(|d| {
            d.rollout_state_reason()
                .unwrap_or("no reason given")
                .to_owned()
        })
}
