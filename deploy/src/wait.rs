//! After the changes: watches the services until each one's PRIMARY deployment runs the
//! task definition the deploy registered, alone, with its desired count running (or a
//! deployment fails or is rolled back, or time runs out), printing each change of state,
//! then prints where the load balancer answers and each service's state. Also watches a
//! service being removed until its last task has stopped and it has left DRAINING, and
//! any slow AWS resource
//! (a NAT gateway, an ElastiCache group, a load balancer) until it is ready or gone.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use aws_sdk_ecs::types::{Deployment, DeploymentRolloutState, DesiredStatus, Service, Task};

use crate::error::DeployError;
use crate::output::{Ledger, Outcome, revision, say};

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

/// A service and the task definition it must end up running.
#[derive(Debug, Clone, Copy)]
struct Target<'a> {
    /// The service's name.
    service: &'a str,
    /// The ARN of the task definition the deploy registered (or kept) for it.
    task_definition: &'a str,
}

/// Where a service stands against its target.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// The PRIMARY deployment runs the target, alone, with every task running.
    Steady,
    /// Still rolling (or not started yet).
    Rolling,
    /// The deployment of the target failed, or ECS rolled it back: why.
    Failed(String),
}

/// Waits until every target's PRIMARY deployment runs its task definition, alone and
/// steady, up to `timeout`. A deployment that failed, or a PRIMARY deployment that runs
/// another task definition (the circuit breaker rolled back), ends the wait at once with
/// the stopped tasks' reasons; a service none of whose new tasks ever started says so
/// when the time is up.
async fn until_stable(
    ecs: &aws_sdk_ecs::Client,
    cluster: &str,
    targets: &[Target<'_>],
    timeout: Duration,
    poll: Duration,
) -> Result<(), DeployError> {
    let names: Vec<&str> = targets.iter().map(|t| t.service).collect();
    let started = Instant::now();
    let mut last: HashMap<String, String> = HashMap::new();
    loop {
        let services = describe(ecs, cluster, &names).await?;
        let mut steady = 0;
        for target in targets {
            let Some(service) = services
                .iter()
                .find(|s| s.service_name() == Some(target.service))
            else {
                continue;
            };
            let line = state(service);
            if last.get(target.service) != Some(&line) {
                say(format_args!(
                    "  … {}: {line} ({} s)",
                    target.service,
                    started.elapsed().as_secs()
                ));
                last.insert(target.service.to_owned(), line);
            }
            match verdict(service, target.task_definition) {
                Verdict::Steady => steady += 1,
                Verdict::Rolling => {}
                Verdict::Failed(why) => {
                    let stopped = stopped_reasons(ecs, cluster, target).await?;
                    return Err(DeployError::NotStable(format!(
                        "ECS service {}: {why}{stopped}",
                        target.service
                    )));
                }
            }
        }
        if steady == targets.len() {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            let mut states = Vec::new();
            for target in targets {
                let Some(service) = services
                    .iter()
                    .find(|s| s.service_name() == Some(target.service))
                else {
                    states.push(format!("{}: not found", target.service));
                    continue;
                };
                if verdict(service, target.task_definition) == Verdict::Steady {
                    continue;
                }
                let never = primary(service)
                    .filter(|d| d.running_count() == 0 && d.failed_tasks() == 0)
                    .map(|_| {
                        format!(
                            " (no task of {} has started, and none failed: ECS's circuit breaker never trips on tasks that do not start; look at the service's events)",
                            revision(target.task_definition)
                        )
                    })
                    .unwrap_or_default();
                let stopped = stopped_reasons(ecs, cluster, target).await?;
                states.push(format!(
                    "{}: {}{never}{stopped}",
                    target.service,
                    state(service)
                ));
            }
            return Err(DeployError::NotStable(format!(
                "services not stable after {} s: {}",
                timeout.as_secs(),
                states.join("; ")
            )));
        }
        tokio::time::sleep(poll).await;
    }
}

/// The label of the step that waits for the services.
pub(crate) const STABLE_STEP: &str = "services stable";

/// The last step of a deploy or a rollback where it waits (`wait` is the timeout): runs
/// [`services_stable`] as a step of `ledger`.
pub(crate) async fn stable_step(
    ledger: &mut Ledger,
    ecs: &aws_sdk_ecs::Client,
    cluster: &str,
    names: &[&str],
    task_definitions: &[String],
    wait: Option<Duration>,
    poll: Duration,
) -> Result<(), DeployError> {
    let Some(timeout) = wait else {
        return Ok(());
    };
    let stable = services_stable(ecs, cluster, names, task_definitions, timeout, poll);
    ledger.run(STABLE_STEP.to_owned(), stable).await
}

/// The "services stable" step of a deploy or a rollback: waits until each service of
/// `names` runs the task definition at the same place in `task_definitions`.
pub(crate) async fn services_stable(
    ecs: &aws_sdk_ecs::Client,
    cluster: &str,
    names: &[&str],
    task_definitions: &[String],
    timeout: Duration,
    poll: Duration,
) -> Outcome<()> {
    let targets: Vec<Target<'_>> = names
        .iter()
        .zip(task_definitions)
        .map(|(service, task_definition)| Target {
            service,
            task_definition,
        })
        .collect();
    until_stable(ecs, cluster, &targets, timeout, poll).await?;
    Ok(((), "yes".to_owned()))
}

/// The stopped tasks of `target`'s task definition, as `: task <id> stopped: <reason>`
/// lines (the latest few), or nothing when none stopped.
async fn stopped_reasons(
    ecs: &aws_sdk_ecs::Client,
    cluster: &str,
    target: &Target<'_>,
) -> Result<String, DeployError> {
    let resource = format!("ECS service {}", target.service);
    let listed = ecs
        .list_tasks()
        .cluster(cluster)
        .service_name(target.service)
        .desired_status(DesiredStatus::Stopped)
        .send()
        .await
        .map_err(|e| DeployError::aws(&resource, "ListTasks", &e))?;
    // DescribeTasks takes at most 100 tasks.
    let arns: Vec<String> = listed.task_arns().iter().take(100).cloned().collect();
    if arns.is_empty() {
        return Ok(String::new());
    }
    let described = ecs
        .describe_tasks()
        .cluster(cluster)
        .set_tasks(Some(arns))
        .send()
        .await
        .map_err(|e| DeployError::aws(&resource, "DescribeTasks", &e))?;
    let mut tasks: Vec<&Task> = described
        .tasks()
        .iter()
        .filter(|t| t.task_definition_arn() == Some(target.task_definition))
        .collect();
    tasks.sort_by_key(|t| std::cmp::Reverse(t.stopped_at().map(|at| at.secs())));
    let lines: Vec<String> = tasks
        .iter()
        .take(STOPPED_SHOWN)
        .map(|task| {
            let id = task
                .task_arn()
                .and_then(|arn| arn.rsplit('/').next())
                .unwrap_or("?");
            let containers: Vec<String> = task
                .containers()
                .iter()
                .filter_map(|c| {
                    let reason = c
                        .reason()
                        .map(str::to_owned)
                        .or_else(|| c.exit_code().map(|code| format!("exit code {code}")))?;
                    Some(format!("{}: {reason}", c.name().unwrap_or("container")))
                })
                .collect();
            let containers = if containers.is_empty() {
                String::new()
            } else {
                format!(" ({})", containers.join("; "))
            };
            format!(
                "\n    task {id} stopped: {}{containers}",
                task.stopped_reason().unwrap_or("no reason given")
            )
        })
        .collect();
    if lines.is_empty() {
        return Ok(String::new());
    }
    Ok(format!(
        "\n  stopped tasks of {}:{}",
        revision(target.task_definition),
        lines.concat()
    ))
}

/// How many stopped tasks a failure names.
const STOPPED_SHOWN: usize = 5;

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

/// Waits until the deleted service `name` has left DRAINING (INACTIVE, or gone), up to
/// `timeout`: until then ECS refuses a new service of the same name and the deletion of
/// its cluster. Returns how long it took.
pub(crate) async fn until_inactive(
    ecs: &aws_sdk_ecs::Client,
    cluster: &str,
    name: &str,
    timeout: Duration,
    poll: Duration,
) -> Result<Duration, DeployError> {
    until(
        &format!("ECS service {name}"),
        timeout,
        poll,
        move || async move {
            let services = describe(ecs, cluster, &[name]).await?;
            Ok(services
                .iter()
                .any(|s| s.status() == Some("DRAINING"))
                .then(|| "DRAINING".to_owned()))
        },
    )
    .await
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

pub(crate) async fn describe(
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
    let rollout = primary(service)
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

fn primary(service: &Service) -> Option<&Deployment> {
    service
        .deployments()
        .iter()
        .find(|d| d.status() == Some("PRIMARY"))
}

/// Where `service` stands against `task_definition`, the revision it must run. The
/// service's own task definition is what its PRIMARY deployment runs: after a rollback
/// both name the old revision, while the counts and the single deployment look settled.
fn verdict(service: &Service, task_definition: &str) -> Verdict {
    if let Some(failed) = service.deployments().iter().find(|d| {
        d.rollout_state() == Some(&DeploymentRolloutState::Failed)
            && d.task_definition() == Some(task_definition)
    }) {
        return Verdict::Failed(format!(
            "the deployment of {} failed and the circuit breaker rolls it back: {}",
            revision(task_definition),
            failed.rollout_state_reason().unwrap_or("no reason given")
        ));
    }
    let Some(primary) = primary(service) else {
        return Verdict::Rolling;
    };
    let running = primary.task_definition().unwrap_or_default();
    if running != task_definition {
        return Verdict::Failed(format!(
            "its PRIMARY deployment runs {}, not {} that this deploy registered: ECS rolled the deployment back",
            revision(running),
            revision(task_definition)
        ));
    }
    let steady = service.status() == Some("ACTIVE")
        && service.deployments().len() == 1
        && primary.rollout_state() != Some(&DeploymentRolloutState::InProgress)
        && primary.running_count() == primary.desired_count()
        && primary.pending_count() == 0
        && service.running_count() == service.desired_count();
    if steady {
        Verdict::Steady
    } else {
        Verdict::Rolling
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_ecs::types::Deployment;

    use super::*;

    const NEW: &str = "arn:aws:ecs:eu-west-1:123456789012:task-definition/fjord-server:2";
    const OLD: &str = "arn:aws:ecs:eu-west-1:123456789012:task-definition/fjord-server:1";

    fn deployment(
        status: &str,
        task_definition: &str,
        rollout: DeploymentRolloutState,
    ) -> Deployment {
        Deployment::builder()
            .status(status)
            .task_definition(task_definition)
            .desired_count(2)
            .running_count(2)
            .rollout_state(rollout)
            .rollout_state_reason("tasks failed to start")
            .build()
    }

    fn service(deployments: Vec<Deployment>) -> Service {
        Service::builder()
            .status("ACTIVE")
            .desired_count(2)
            .running_count(2)
            .set_deployments(Some(deployments))
            .build()
    }

    #[test]
    fn steady_only_on_the_registered_revision() {
        let done = service(vec![deployment(
            "PRIMARY",
            NEW,
            DeploymentRolloutState::Completed,
        )]);
        assert_eq!(verdict(&done, NEW), Verdict::Steady);
        // The same counts after the circuit breaker put the old revision back.
        let rolled_back = service(vec![deployment(
            "PRIMARY",
            OLD,
            DeploymentRolloutState::Completed,
        )]);
        assert!(
            matches!(verdict(&rolled_back, NEW), Verdict::Failed(why) if why.contains("runs fjord-server:1, not fjord-server:2"))
        );
        // Rolling back: the failed deployment is still listed.
        let rolling_back = service(vec![
            deployment("PRIMARY", OLD, DeploymentRolloutState::InProgress),
            deployment("ACTIVE", NEW, DeploymentRolloutState::Failed),
        ]);
        assert!(
            matches!(verdict(&rolling_back, NEW), Verdict::Failed(why) if why.contains("failed and the circuit breaker rolls it back: tasks failed to start"))
        );
        let rolling = service(vec![
            deployment("PRIMARY", NEW, DeploymentRolloutState::InProgress),
            deployment("ACTIVE", OLD, DeploymentRolloutState::Completed),
        ]);
        assert_eq!(verdict(&rolling, NEW), Verdict::Rolling);
    }
}
