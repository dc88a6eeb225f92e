//! `fjord-deploy diff`: what a deploy of the manifest would change in each task
//! definition and service, as a unified diff of their JSON (what ECS has against what the
//! manifest wants), read only. Both sides go through the same SDK types and the same
//! view, so that only real differences show. Without image archives, the images stay
//! those the task definitions run.

use std::collections::BTreeMap;
use std::path::PathBuf;

use aws_sdk_ecs::types::{
    ContainerDefinition, DeploymentConfiguration, LoadBalancer, NetworkConfiguration, Service,
    TaskDefinition,
};
use serde_json::{Value, json};

use crate::archive::Image;
use crate::clients::Clients;
use crate::config::Deployment;
use crate::error::DeployError;
use crate::output::{revision, say};
use crate::plan::{self, Plan, Role, ServiceSpec, TaskDefinitionSpec};

/// The image archives a diff compares with, when at hand.
#[derive(Debug, Clone, Default)]
pub struct DiffImages {
    /// The server's image archive.
    pub server: Option<PathBuf>,
    /// The consumer's image archive.
    pub consumer: Option<PathBuf>,
}

/// Lines of context around each change.
const CONTEXT: usize = 3;

/// Prints what a deploy of `deployment` would change; returns whether anything would.
pub async fn diff(
    deployment: &Deployment,
    images: &DiffImages,
    endpoint_url: Option<&str>,
) -> Result<bool, DeployError> {
    let deploy = &deployment.deploy;
    let aws = Clients::connect(&deploy.region, endpoint_url).await;
    // `registry/repository@sha256:…` of each archive given; "" keeps the running image.
    let mut refs = [String::new(), String::new()];
    for (slot, (role, archive)) in refs.iter_mut().zip([
        (Role::Server, &images.server),
        (Role::Consumer, &images.consumer),
    ]) {
        if let Some(archive) = archive {
            let image = Image::read(archive, deploy.architecture)?;
            *slot = format!(
                "{}/{}@{}",
                ecr_host(&aws).await?,
                plan::repository(deployment, role),
                image.manifest.digest
            );
        }
    }
    let plan = Plan::new(deployment, &refs[0], &refs[1]);
    let mut changed = false;
    for (spec, service) in plan.task_definitions.iter().zip(&plan.services) {
        let current = current_task_definition(&aws, &spec.family).await?;
        let mut spec = spec.clone();
        if spec.container.image.is_empty() {
            // No archive: the image the family runs stays.
            spec.container.image = current
                .as_ref()
                .and_then(|t| t.container_definitions().first())
                .and_then(|c| c.image())
                .unwrap_or("(no image given)")
                .to_owned();
        }
        let old = current.as_ref().map(task_definition_view);
        let new = wanted_task_definition(&spec)
            .map_err(|e| DeployError::request(format!("task definition {}", spec.family), &e))?;
        let label = current
            .as_ref()
            .and_then(|t| t.task_definition_arn())
            .map_or_else(|| spec.family.clone(), |arn| revision(arn).to_owned());
        changed |= show(&format!("task definition {label}"), old.as_ref(), &new);

        let existing = crate::wait::describe(&aws.ecs, &deploy.cluster, &[&service.name])
            .await?
            .into_iter()
            .find(|s| s.status() == Some("ACTIVE"));
        let old = existing
            .as_ref()
            .map(|s| service_view(s, service.autoscaled));
        let new = wanted_service(service)
            .map_err(|e| DeployError::request(format!("ECS service {}", service.name), &e))?;
        changed |= show(&format!("service {}", service.name), old.as_ref(), &new);
    }
    if !changed {
        say("No changes.");
    }
    Ok(changed)
}

async fn ecr_host(aws: &Clients) -> Result<String, DeployError> {
    let token = aws
        .ecr
        .get_authorization_token()
        .send()
        .await
        .map_err(|e| DeployError::aws("ECR registry", "GetAuthorizationToken", &e))?;
    let proxy = token
        .authorization_data()
        .first()
        .and_then(|d| d.proxy_endpoint())
        .unwrap_or_default();
    Ok(proxy
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned())
}

async fn current_task_definition(
    aws: &Clients,
    family: &str,
) -> Result<Option<TaskDefinition>, DeployError> {
    match aws
        .ecs
        .describe_task_definition()
        .task_definition(family)
        .send()
        .await
    {
        Ok(found) => Ok(found.task_definition().cloned()),
        // ECS answers ClientException for a family it does not know.
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_client_exception()) =>
        {
            Ok(None)
        }
        Err(e) => Err(DeployError::aws(
            format!("task definition {family}"),
            "DescribeTaskDefinition",
            &e,
        )),
    }
}

/// Prints the diff of `old` (absent: nothing there yet) and `new` under `label`;
/// returns whether they differ.
fn show(label: &str, old: Option<&Value>, new: &Value) -> bool {
    let new_text = pretty(new);
    let old_text = old.map(pretty).unwrap_or_default();
    match unified(&old_text, &new_text) {
        None => {
            say(format_args!("{label}: unchanged"));
            false
        }
        Some(hunks) => {
            let from = if old.is_some() { "in ECS" } else { "(none)" };
            say(format_args!(
                "--- {label} {from}\n+++ {label} wanted\n{hunks}"
            ));
            true
        }
    }
}

fn pretty(value: &Value) -> String {
    // serde_json's maps are sorted: the same keys print in the same order on both sides.
    serde_json::to_string_pretty(value).unwrap_or_default() + "\n"
}

fn task_definition_view(task: &TaskDefinition) -> Value {
    json!({
        "cpu": task.cpu(),
        "memory": task.memory(),
        "cpuArchitecture": task.runtime_platform().and_then(|p| p.cpu_architecture()).map(|a| a.as_str()),
        "executionRoleArn": task.execution_role_arn(),
        "taskRoleArn": task.task_role_arn(),
        "container": task.container_definitions().first().map(container_view),
    })
}

fn wanted_task_definition(
    spec: &TaskDefinitionSpec,
) -> Result<Value, aws_sdk_ecs::error::BuildError> {
    let platform = spec.runtime_platform();
    Ok(json!({
        "cpu": spec.cpu.to_string(),
        "memory": spec.memory.to_string(),
        "cpuArchitecture": platform.cpu_architecture().map(|a| a.as_str()),
        "executionRoleArn": spec.execution_role_arn,
        "taskRoleArn": spec.task_role_arn,
        "container": container_view(&spec.container_definition()?),
    }))
}

/// A container as the diff shows it: environment and secrets by name, the runtime
/// manifest as JSON (so that a change shows on its own line).
fn container_view(container: &ContainerDefinition) -> Value {
    let environment: BTreeMap<&str, Value> = container
        .environment()
        .iter()
        .filter_map(|kv| {
            let (name, value) = (kv.name()?, kv.value()?);
            let value = if name == "FJORD_MANIFEST_JSON" {
                serde_json::from_str(value).unwrap_or_else(|_| json!(value))
            } else {
                json!(value)
            };
            Some((name, value))
        })
        .collect();
    let secrets: BTreeMap<&str, &str> = container
        .secrets()
        .iter()
        .map(|s| (s.name(), s.value_from()))
        .collect();
    let logs = container.log_configuration().map(|l| {
        json!({
            "driver": l.log_driver().as_str(),
            "options": l.options().map(|o| o.iter().collect::<BTreeMap<_, _>>()),
        })
    });
    json!({
        "name": container.name(),
        "image": container.image(),
        "ports": container.port_mappings().iter().filter_map(|p| p.container_port()).collect::<Vec<_>>(),
        "environment": environment,
        "secrets": secrets,
        "healthCheck": container.health_check().map(|h| json!({
            "command": h.command(),
            "interval": h.interval(),
            "timeout": h.timeout(),
            "retries": h.retries(),
            "startPeriod": h.start_period(),
        })),
        "logConfiguration": logs,
        "stopTimeout": container.stop_timeout(),
        "readonlyRootFilesystem": container.readonly_root_filesystem(),
        "ulimits": container.ulimits().iter().map(|u| json!({
            "name": u.name().as_str(), "soft": u.soft_limit(), "hard": u.hard_limit()
        })).collect::<Vec<_>>(),
    })
}

fn service_view(service: &Service, autoscaled: bool) -> Value {
    settings_view(
        (!autoscaled).then(|| service.desired_count()),
        service.network_configuration(),
        service.load_balancers(),
        service.health_check_grace_period_seconds(),
        service.deployment_configuration(),
    )
}

fn wanted_service(spec: &ServiceSpec) -> Result<Value, aws_sdk_ecs::error::BuildError> {
    let network = spec.network_configuration()?;
    Ok(settings_view(
        (!spec.autoscaled).then_some(spec.desired_count),
        Some(&network),
        &spec.load_balancers(),
        spec.health_check_grace_secs,
        Some(&spec.deployment_configuration()),
    ))
}

/// A service's settings as the diff shows them (the task definition is diffed on its
/// own; the desired count only where autoscaling does not set it).
fn settings_view(
    desired_count: Option<i32>,
    network: Option<&NetworkConfiguration>,
    load_balancers: &[LoadBalancer],
    grace: Option<i32>,
    deployment: Option<&DeploymentConfiguration>,
) -> Value {
    let vpc = network.and_then(|n| n.awsvpc_configuration());
    let sorted = |list: &[String]| {
        let mut list = list.to_vec();
        list.sort();
        list
    };
    json!({
        "desiredCount": desired_count,
        "subnets": vpc.map(|v| sorted(v.subnets())),
        "securityGroups": vpc.map(|v| sorted(v.security_groups())),
        "assignPublicIp": vpc.and_then(|v| v.assign_public_ip()).map(|a| a.as_str()),
        "loadBalancers": load_balancers.iter().map(|lb| json!({
            "targetGroupArn": lb.target_group_arn(),
            "containerName": lb.container_name(),
            "containerPort": lb.container_port(),
        })).collect::<Vec<_>>(),
        "healthCheckGracePeriodSeconds": grace,
        "maximumPercent": deployment.and_then(DeploymentConfiguration::maximum_percent),
        "minimumHealthyPercent": deployment.and_then(DeploymentConfiguration::minimum_healthy_percent),
        "circuitBreaker": deployment.and_then(|d| d.deployment_circuit_breaker()).map(|c| json!({
            "enable": c.enable(), "rollback": c.rollback()
        })),
    })
}

/// The unified diff of two texts by lines, `CONTEXT` lines around each change; `None`
/// when they are the same.
fn unified(old: &str, new: &str) -> Option<String> {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    if a == b {
        return None;
    }
    // Longest common subsequence, from the end, then walked from the start.
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    // Each line of the edit: (tag, old line number, new line number, text).
    let mut edits: Vec<(char, usize, usize, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            edits.push((' ', i, j, a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            // Removals before additions, as diff(1) prints them.
            edits.push(('-', i, j, a[i]));
            i += 1;
        } else {
            edits.push(('+', i, j, b[j]));
            j += 1;
        }
    }
    let changes: Vec<usize> = (0..edits.len()).filter(|&k| edits[k].0 != ' ').collect();
    let mut out = String::new();
    let mut k = 0;
    while k < changes.len() {
        let start = changes[k].saturating_sub(CONTEXT);
        let mut end = changes[k];
        while k < changes.len() && changes[k] <= end + 2 * CONTEXT {
            end = changes[k];
            k += 1;
        }
        let end = (end + CONTEXT + 1).min(edits.len());
        let hunk = &edits[start..end];
        let old_count = hunk.iter().filter(|e| e.0 != '+').count();
        let new_count = hunk.iter().filter(|e| e.0 != '-').count();
        let (old_at, new_at) = (hunk[0].1, hunk[0].2);
        out.push_str(&format!(
            "@@ -{},{old_count} +{},{new_count} @@\n",
            if old_count == 0 { old_at } else { old_at + 1 },
            if new_count == 0 { new_at } else { new_at + 1 },
        ));
        for (tag, _, _, line) in hunk {
            out.push(*tag);
            out.push_str(line);
            out.push('\n');
        }
    }
    Some(out.trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unified_diff_of_lines() {
        assert_eq!(unified("a\nb\n", "a\nb\n"), None);
        let old = "1\n2\n3\n4\n5\n6\n7\n8\n9\n";
        let new = "1\n2\n3\n4\nfive\n6\n7\n8\n9\n";
        assert_eq!(
            unified(old, new).unwrap(),
            "@@ -2,7 +2,7 @@\n 2\n 3\n 4\n-5\n+five\n 6\n 7\n 8"
        );
        assert_eq!(unified("", "x\n").unwrap(), "@@ -0,0 +1,1 @@\n+x");
    }
}
