//! `fjord-deploy verify`: before anything changes, that what the tasks need is there and
//! theirs — the roles exist and ECS tasks may assume them; each Secrets Manager secret
//! exists; the execution role may read every secret, decrypt it with its customer key,
//! write to the log group and pull the images. The role's permissions are read from its
//! policies (inline and attached) and matched here, Allow against Deny, wildcards
//! included; conditions are not evaluated, and SSM parameters are checked only against
//! the policies (the tool has no SSM client).

use aws_sdk_iam::types::Role;
use aws_sdk_secretsmanager::operation::describe_secret::DescribeSecretOutput;

use crate::bootstrap::{percent_decode, role_policies};
use crate::clients::Clients;
use crate::config::Deployment;
use crate::config::secret_arn;
use crate::error::DeployError;
use crate::output::say;
use crate::ownership::Named;
use crate::plan;

/// What the tasks' principal is.
const TASKS_PRINCIPAL: &str = "ecs-tasks.amazonaws.com";

/// Checks `deployment`'s roles, secrets and log group; prints each finding and fails
/// when any is a problem.
pub async fn verify(
    deployment: &Deployment,
    endpoint_url: Option<&str>,
) -> Result<(), DeployError> {
    let deploy = &deployment.deploy;
    let aws = Clients::connect(&deploy.region, endpoint_url).await;
    let mut problems = Vec::new();
    let mut check = |ok: bool, line: String| {
        say(format_args!(
            "  {}: {line}",
            if ok { "ok" } else { "PROBLEM" }
        ));
        if !ok {
            problems.push(line);
        }
    };
    say(format_args!(
        "Verifying what the tasks of {} need in {}",
        deploy.name, deploy.region
    ));

    let execution = &deploy.roles.execution_role_arn;
    let policies = match role(&aws, &deploy.name, execution).await? {
        Some(trusted) => {
            check(
                trusted,
                format!(
                    "execution role {execution} exists; ECS tasks {} assume it",
                    may(trusted)
                ),
            );
            Some(Policies::of(&aws, name_of(execution)).await?)
        }
        None => {
            check(false, format!("execution role {execution} does not exist"));
            None
        }
    };
    if let Some(task) = &deploy.roles.task_role_arn {
        match role(&aws, &deploy.name, task).await? {
            Some(trusted) => check(
                trusted,
                format!(
                    "task role {task} exists; ECS tasks {} assume it",
                    may(trusted)
                ),
            ),
            None => check(false, format!("task role {task} does not exist")),
        }
    }

    let group = &deploy.logs.group;
    let found = aws
        .logs
        .describe_log_groups()
        .log_group_name_prefix(group)
        .send()
        .await
        .map_err(|e| DeployError::aws(format!("log group {group}"), "DescribeLogGroups", &e))?;
    let exists = found
        .log_groups()
        .iter()
        .any(|g| g.log_group_name() == Some(group.as_str()));
    say(format_args!(
        "  ok: log group {group} {}",
        if exists {
            "exists"
        } else {
            "does not exist yet (a deploy creates it)"
        }
    ));
    // Every role ARN carries the partition and account the other ARNs need.
    let mut parts = execution.split(':');
    let partition = parts.nth(1).unwrap_or("aws");
    let account = parts.nth(2).unwrap_or_default();
    let region = &deploy.region;

    let mut wanted: Vec<(String, String, String)> = vec![(
        "logs:PutLogEvents".into(),
        format!("arn:{partition}:logs:{region}:{account}:log-group:{group}:log-stream:fjord"),
        format!("write to log group {group}"),
    )];
    for role in plan::Role::ALL {
        let repository = plan::repository(deployment, role);
        wanted.push((
            "ecr:BatchGetImage".into(),
            format!("arn:{partition}:ecr:{region}:{account}:repository/{repository}"),
            format!("pull images from {repository}"),
        ));
    }
    for (env, value_from) in &deploy.secrets {
        if value_from.contains(":ssm:") {
            wanted.push((
                "ssm:GetParameters".into(),
                value_from.clone(),
                format!("read {env} (SSM parameter {value_from})"),
            ));
            continue;
        }
        let id = secret_arn(value_from).to_owned();
        let described = DescribeSecretOutput::find_by_name(&aws, &deploy.name, &id).await?;
        let Some(described) = described else {
            check(false, format!("secret {id} ({env}) does not exist"));
            continue;
        };
        check(true, format!("secret {id} ({env}) exists"));
        let arn = described.arn().unwrap_or(&id).to_owned();
        wanted.push((
            "secretsmanager:GetSecretValue".into(),
            arn,
            format!("read {env} (secret {id})"),
        ));
        if let Some(key) = described.kms_key_id().filter(|k| !k.contains("alias/aws/")) {
            let key = if key.starts_with("arn:") {
                key.to_owned()
            } else {
                format!("arn:{partition}:kms:{region}:{account}:key/{key}")
            };
            wanted.push((
                "kms:Decrypt".into(),
                key.clone(),
                format!("decrypt {env} with its key {key} (name it in deploy.kms_key_arns)"),
            ));
        }
    }
    if let Some(policies) = &policies {
        for (action, resource, what) in &wanted {
            let allowed = policies.allow(action, resource);
            check(
                allowed,
                format!("the execution role {} {what}", may(allowed)),
            );
        }
    }
    if problems.is_empty() {
        say("Everything the tasks need is there.");
        return Ok(());
    }
    Err(DeployError::Precondition {
        resource: format!("deployment {}", deploy.name),
        message: format!("{} problem(s): {}", problems.len(), problems.join("; ")),
    })
}

fn may(allowed: bool) -> &'static str {
    if allowed { "may" } else { "may not" }
}

fn name_of(role_arn: &str) -> &str {
    role_arn.rsplit('/').next().unwrap_or(role_arn)
}

/// Whether the role `arn` exists (`None` if not) and trusts the ECS tasks' principal;
/// whoever made it (`deployment` names the deployment verified).
async fn role(aws: &Clients, deployment: &str, arn: &str) -> Result<Option<bool>, DeployError> {
    let found = Role::find_by_name(aws, deployment, name_of(arn)).await?;
    Ok(found.map(|role| {
        role.assume_role_policy_document()
            .is_some_and(|trust| percent_decode(trust).contains(TASKS_PRINCIPAL))
    }))
}

/// A role's policy statements, inline and attached.
struct Policies {
    statements: Vec<serde_json::Value>,
}

impl Policies {
    async fn of(aws: &Clients, role: &str) -> Result<Self, DeployError> {
        let resource = Role::resource(role);
        let mut documents = Vec::new();
        let (inline, attached) = role_policies(aws, role).await?;
        for name in inline {
            let policy = aws
                .iam
                .get_role_policy()
                .role_name(role)
                .policy_name(name)
                .send()
                .await
                .map_err(|e| DeployError::aws(&resource, "iam:GetRolePolicy", &e))?;
            documents.push(percent_decode(policy.policy_document()));
        }
        for arn in &attached {
            let described = aws
                .iam
                .get_policy()
                .policy_arn(arn)
                .send()
                .await
                .map_err(|e| DeployError::aws(&resource, "iam:GetPolicy", &e))?;
            let Some(version) = described.policy().and_then(|p| p.default_version_id()) else {
                continue;
            };
            let version = aws
                .iam
                .get_policy_version()
                .policy_arn(arn)
                .version_id(version)
                .send()
                .await
                .map_err(|e| DeployError::aws(&resource, "iam:GetPolicyVersion", &e))?;
            if let Some(document) = version.policy_version().and_then(|v| v.document()) {
                documents.push(percent_decode(document));
            }
        }
        let statements = documents
            .iter()
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .flat_map(|d| match &d["Statement"] {
                serde_json::Value::Array(list) => list.clone(),
                single @ serde_json::Value::Object(_) => vec![single.clone()],
                _ => Vec::new(),
            })
            .collect();
        Ok(Self { statements })
    }

    /// Whether some statement allows `action` on `resource` and none denies it.
    fn allow(&self, action: &str, resource: &str) -> bool {
        let matching = |effect: &str| {
            self.statements.iter().any(|s| {
                s["Effect"] == effect
                    && listed(&s["Action"], |a| {
                        wildcard(&a.to_ascii_lowercase(), &action.to_ascii_lowercase())
                    })
                    && listed(&s["Resource"], |r| wildcard(r, resource))
            })
        };
        matching("Allow") && !matching("Deny")
    }
}

/// Whether `value` (a string or a list of them) has one that `matches`.
fn listed(value: &serde_json::Value, matches: impl Fn(&str) -> bool) -> bool {
    match value {
        serde_json::Value::String(one) => matches(one),
        serde_json::Value::Array(many) => many.iter().filter_map(|v| v.as_str()).any(matches),
        _ => false,
    }
}

/// IAM's wildcards: `*` any run of characters, `?` any one.
fn wildcard(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iam_wildcards() {
        assert!(wildcard(
            "arn:aws:secretsmanager:*:secret:db-??????",
            "arn:aws:secretsmanager:eu-west-1:1:secret:db-AbC123"
        ));
        assert!(!wildcard(
            "arn:aws:secretsmanager:*:secret:db-??????",
            "arn:aws:secretsmanager:eu-west-1:1:secret:db-AbC1234"
        ));
        assert!(wildcard("logs:*", "logs:putlogevents"));
        assert!(wildcard("*", ""));
        assert!(!wildcard("a*b", "ac"));
    }
}
