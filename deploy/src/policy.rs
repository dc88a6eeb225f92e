//! The IAM policy that `deploy`, `bootstrap` and `destroy` of one manifest need, and no
//! more: every action the tool calls (the emulator tests record each call and check it is
//! here), the permissions AWS checks on the caller behind them (tagging on create,
//! passing the task roles, the service-linked roles AWS makes on first use, the alarms of
//! target tracking), with resources narrowed to the manifest's names where the service's
//! ARNs carry names, and to the `fjord:deployment` tag where they carry only ids (EC2).

use serde_json::{Value, json};

use crate::config::Blueprint;
use crate::plan::DEPLOYMENT_TAG;

/// A command whose permissions the policy grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Command {
    /// `deploy`, and the commands that read or change only what a deploy does: `diff`,
    /// `status`, `rollback`, `verify`.
    Deploy,
    /// `bootstrap`.
    Bootstrap,
    /// `destroy`.
    Destroy,
}

impl Command {
    /// Every command.
    pub const ALL: [Self; 3] = [Self::Deploy, Self::Bootstrap, Self::Destroy];

    fn sid(self) -> &'static str {
        match self {
            Self::Deploy => "Deploy",
            Self::Bootstrap => "Bootstrap",
            Self::Destroy => "Destroy",
        }
    }
}

/// What ARNs of the deployment look like: partition, region, account, names.
struct Arns {
    partition: String,
    region: String,
    account: String,
    name: String,
    cluster: String,
    log_group: String,
    roles: Vec<String>,
    execution_role: String,
}

impl Arns {
    fn of(blueprint: &Blueprint) -> Self {
        let deploy = &blueprint.deploy;
        // The account and partition, from any ARN the manifest names; `*` otherwise (the
        // credentials' account is the only one they reach anyway).
        let named: Vec<&str> = [
            deploy.roles.execution_role_arn.as_deref(),
            deploy.roles.task_role_arn.as_deref(),
            deploy.target_group_arn(),
        ]
        .into_iter()
        .flatten()
        .chain(deploy.secrets.values().map(String::as_str))
        .collect();
        let field = |index: usize| {
            named
                .iter()
                .find_map(|arn| arn.split(':').nth(index).filter(|f| !f.is_empty()))
                .map(str::to_owned)
        };
        let partition = field(1).unwrap_or_else(|| "aws".to_owned());
        let account = field(4).unwrap_or_else(|| "*".to_owned());
        let role = |name: String| format!("arn:{partition}:iam::{account}:role/{name}");
        let execution_role = deploy
            .roles
            .execution_role_arn
            .clone()
            .unwrap_or_else(|| role(format!("{}-execution", deploy.name)));
        let task_role = deploy
            .roles
            .task_role_arn
            .clone()
            .unwrap_or_else(|| role(format!("{}-task", deploy.name)));
        Self {
            region: deploy.region.clone(),
            name: deploy.name.clone(),
            cluster: deploy.cluster_name().to_owned(),
            log_group: deploy.log_group(),
            roles: vec![execution_role.clone(), task_role],
            execution_role,
            partition,
            account,
        }
    }

    /// `arn:PARTITION:SERVICE:REGION:ACCOUNT:RESOURCE`.
    fn arn(&self, service: &str, resource: &str) -> String {
        format!(
            "arn:{}:{service}:{}:{}:{resource}",
            self.partition, self.region, self.account
        )
    }

    fn cluster(&self) -> String {
        self.arn("ecs", &format!("cluster/{}", self.cluster))
    }

    /// The services, task definitions and tasks the deploy makes: all named
    /// `<name>-…`, in the cluster.
    fn ecs_resources(&self) -> Vec<String> {
        vec![
            self.cluster(),
            self.arn("ecs", &format!("service/{}/{}-*", self.cluster, self.name)),
            self.arn("ecs", &format!("task-definition/{}-*:*", self.name)),
            self.arn("ecs", &format!("task/{}/*", self.cluster)),
        ]
    }

    fn log_group(&self) -> Vec<String> {
        vec![
            self.arn("logs", &format!("log-group:{}", self.log_group)),
            self.arn("logs", &format!("log-group:{}:*", self.log_group)),
        ]
    }

    fn repositories(&self) -> String {
        self.arn("ecr", &format!("repository/{}/*", self.name))
    }

    fn bootstrap_roles(&self) -> String {
        format!(
            "arn:{}:iam::{}:role/{}-*",
            self.partition, self.account, self.name
        )
    }

    fn secrets(&self) -> String {
        self.arn("secretsmanager", &format!("secret:{}/*", self.name))
    }

    fn load_balancing(&self) -> Vec<String> {
        let name = &self.name;
        vec![
            self.arn(
                "elasticloadbalancing",
                &format!("loadbalancer/app/{name}/*"),
            ),
            self.arn(
                "elasticloadbalancing",
                &format!("targetgroup/{name}-server/*"),
            ),
            self.arn("elasticloadbalancing", &format!("listener/app/{name}/*")),
        ]
    }

    /// ElastiCache: its create call authorises on the group, its clusters, its subnet
    /// group and the default parameter group; all named after the deployment but the
    /// last.
    fn elasticache(&self) -> Vec<String> {
        let name = &self.name;
        vec![
            self.arn("elasticache", &format!("replicationgroup:{name}")),
            self.arn("elasticache", &format!("cluster:{name}-*")),
            self.arn("elasticache", &format!("subnetgroup:{name}")),
            self.arn("elasticache", "parametergroup:*"),
        ]
    }

    /// The alarms Application Auto Scaling makes for the server's target tracking.
    fn alarms(&self) -> String {
        self.arn(
            "cloudwatch",
            &format!(
                "alarm:TargetTracking-service/{}/{}-server-*",
                self.cluster, self.name
            ),
        )
    }
}

fn statement(sid: &str, actions: &[&str], resources: &[String]) -> Value {
    json!({ "Sid": sid, "Effect": "Allow", "Action": actions, "Resource": resources })
}

fn service_linked_roles(sid: &str, services: &[&str]) -> Value {
    json!({
        "Sid": sid,
        "Effect": "Allow",
        "Action": "iam:CreateServiceLinkedRole",
        "Resource": "*",
        "Condition": { "StringEquals": { "iam:AWSServiceName": services } }
    })
}

/// What reads and the prune of a deploy (and `destroy`'s removal of services) call.
const SERVICE_READS: &[&str] = &[
    "ecs:DescribeTaskDefinition",
    "ecs:ListTaskDefinitionFamilies",
    "ecs:ListTaskDefinitions",
    "ecs:ListServices",
    "ecs:ListTasks",
    "logs:DescribeLogGroups",
    "application-autoscaling:DescribeScalableTargets",
    "application-autoscaling:DescribeScalingPolicies",
    "elasticloadbalancing:DescribeTargetGroups",
    "elasticloadbalancing:DescribeTargetGroupAttributes",
    "elasticloadbalancing:DescribeListeners",
    "elasticloadbalancing:DescribeRules",
    "elasticloadbalancing:DescribeLoadBalancers",
    "elasticloadbalancing:DescribeLoadBalancerAttributes",
];

fn deploy(arns: &Arns) -> Vec<Value> {
    let sid = |s: &str| format!("{}{s}", Command::Deploy.sid());
    let mut reads = SERVICE_READS.to_vec();
    reads.extend([
        "ecr:GetAuthorizationToken",
        // Registering takes no resource; the tags it is given are checked with TagResource.
        "ecs:RegisterTaskDefinition",
        "ecs:DeregisterTaskDefinition",
        "ecs:DeleteTaskDefinitions",
        "application-autoscaling:RegisterScalableTarget",
        "application-autoscaling:PutScalingPolicy",
        "application-autoscaling:DeleteScalingPolicy",
        "application-autoscaling:DeregisterScalableTarget",
        // `verify`: that the secrets are there.
        "secretsmanager:DescribeSecret",
    ]);
    vec![
        statement(&sid("Read"), &reads, &["*".into()]),
        statement(
            &sid("Images"),
            &[
                "ecr:DescribeRepositories",
                "ecr:CreateRepository",
                "ecr:TagResource",
                "ecr:GetLifecyclePolicy",
                "ecr:PutLifecyclePolicy",
                "ecr:DescribeImages",
                "ecr:BatchCheckLayerAvailability",
                "ecr:InitiateLayerUpload",
                "ecr:UploadLayerPart",
                "ecr:CompleteLayerUpload",
                "ecr:PutImage",
                "ecr:BatchGetImage",
            ],
            &[arns.repositories()],
        ),
        statement(
            &sid("Logs"),
            &[
                "logs:CreateLogGroup",
                "logs:TagResource",
                "logs:PutRetentionPolicy",
            ],
            &arns.log_group(),
        ),
        statement(
            &sid("Services"),
            &[
                "ecs:DescribeClusters",
                "ecs:DescribeServices",
                "ecs:CreateService",
                "ecs:UpdateService",
                "ecs:DeleteService",
                "ecs:TagResource",
                "ecs:DescribeTasks",
            ],
            &arns.ecs_resources(),
        ),
        statement(
            &sid("Alarms"),
            &[
                "cloudwatch:PutMetricAlarm",
                "cloudwatch:DescribeAlarms",
                "cloudwatch:DeleteAlarms",
            ],
            &[arns.alarms()],
        ),
        json!({
            "Sid": sid("PassRoles"),
            "Effect": "Allow",
            "Action": "iam:PassRole",
            "Resource": arns.roles,
            "Condition": { "StringEquals": { "iam:PassedToService": "ecs-tasks.amazonaws.com" } }
        }),
        // `verify`: that the roles are there, and what the execution role may do.
        statement(&sid("Roles"), &["iam:GetRole"], &arns.roles),
        statement(
            &sid("ExecutionRolePolicy"),
            &[
                "iam:GetRolePolicy",
                "iam:PutRolePolicy",
                "iam:ListRolePolicies",
                "iam:ListAttachedRolePolicies",
            ],
            std::slice::from_ref(&arns.execution_role),
        ),
        statement(
            &sid("AttachedPolicies"),
            &["iam:GetPolicy", "iam:GetPolicyVersion"],
            &[format!("arn:{}:iam::*:policy/*", arns.partition)],
        ),
        service_linked_roles(
            &sid("ServiceLinkedRoles"),
            &[
                "ecs.amazonaws.com",
                "ecs.application-autoscaling.amazonaws.com",
            ],
        ),
    ]
}

/// EC2 reads, for bootstrap's lookups and destroy's.
const NETWORK_READS: &[&str] = &[
    "ec2:DescribeAvailabilityZones",
    "ec2:DescribeVpcs",
    "ec2:DescribeSubnets",
    "ec2:DescribeInternetGateways",
    "ec2:DescribeNatGateways",
    "ec2:DescribeAddresses",
    "ec2:DescribeRouteTables",
    "ec2:DescribeSecurityGroups",
];

/// What bootstrap's and destroy's lookups of the other parts read.
const PART_READS: &[&str] = &[
    "elasticloadbalancing:DescribeLoadBalancers",
    "elasticloadbalancing:DescribeLoadBalancerAttributes",
    "elasticloadbalancing:DescribeTargetGroups",
    "elasticloadbalancing:DescribeTargetGroupAttributes",
    "elasticloadbalancing:DescribeListeners",
    "elasticloadbalancing:DescribeTags",
    "elasticache:DescribeReplicationGroups",
    "elasticache:DescribeCacheSubnetGroups",
    "logs:DescribeLogGroups",
    "secretsmanager:GetRandomPassword",
];

/// Changes to EC2 resources that exist, allowed on those tagged as the deployment's.
fn tagged(sid: &str, actions: &[&str], name: &str) -> Value {
    json!({
        "Sid": sid,
        "Effect": "Allow",
        "Action": actions,
        "Resource": "*",
        "Condition": { "StringEquals": { format!("aws:ResourceTag/{DEPLOYMENT_TAG}"): name } }
    })
}

fn bootstrap(arns: &Arns) -> Vec<Value> {
    let sid = |s: &str| format!("{}{s}", Command::Bootstrap.sid());
    let mut reads = NETWORK_READS.to_vec();
    reads.extend(PART_READS);
    let creates = [
        "ec2:CreateVpc",
        "ec2:CreateSubnet",
        "ec2:CreateInternetGateway",
        "ec2:CreateRouteTable",
        "ec2:CreateSecurityGroup",
        "ec2:CreateNatGateway",
        "ec2:AllocateAddress",
    ];
    vec![
        statement(&sid("Read"), &reads, &["*".into()]),
        // What bootstrap creates in EC2 carries the tag from the start: allowed only so.
        json!({
            "Sid": sid("NetworkCreate"),
            "Effect": "Allow",
            "Action": creates,
            "Resource": "*",
            "Condition": { "StringEquals": { format!("aws:RequestTag/{DEPLOYMENT_TAG}"): arns.name } }
        }),
        json!({
            "Sid": sid("NetworkTags"),
            "Effect": "Allow",
            "Action": "ec2:CreateTags",
            "Resource": "*",
            "Condition": { "StringEquals": { "ec2:CreateAction": creates } }
        }),
        tagged(
            &sid("Network"),
            &[
                "ec2:ModifyVpcAttribute",
                "ec2:AttachInternetGateway",
                "ec2:CreateRoute",
                "ec2:AssociateRouteTable",
                "ec2:AuthorizeSecurityGroupIngress",
                // Creating in a VPC (subnets, security groups) authorises on the VPC too.
                "ec2:CreateSubnet",
                "ec2:CreateSecurityGroup",
                "ec2:CreateNatGateway",
            ],
            &arns.name,
        ),
        statement(
            &sid("LoadBalancer"),
            &[
                "elasticloadbalancing:CreateLoadBalancer",
                "elasticloadbalancing:CreateTargetGroup",
                "elasticloadbalancing:CreateListener",
                "elasticloadbalancing:AddTags",
                "elasticloadbalancing:ModifyLoadBalancerAttributes",
                "elasticloadbalancing:ModifyTargetGroupAttributes",
                "elasticloadbalancing:ModifyListener",
            ],
            &arns.load_balancing(),
        ),
        statement(
            &sid("Redis"),
            &[
                "elasticache:CreateCacheSubnetGroup",
                "elasticache:CreateReplicationGroup",
                "elasticache:AddTagsToResource",
                "elasticache:ListTagsForResource",
            ],
            &arns.elasticache(),
        ),
        statement(
            &sid("RedisSecret"),
            &[
                "secretsmanager:CreateSecret",
                "secretsmanager:TagResource",
                "secretsmanager:DescribeSecret",
                "secretsmanager:GetSecretValue",
            ],
            &[arns.secrets()],
        ),
        statement(
            &sid("Cluster"),
            &[
                "ecs:CreateCluster",
                "ecs:DescribeClusters",
                "ecs:TagResource",
            ],
            &[arns.cluster()],
        ),
        statement(
            &sid("Roles"),
            &[
                "iam:GetRole",
                "iam:CreateRole",
                "iam:TagRole",
                "iam:GetRolePolicy",
                "iam:PutRolePolicy",
            ],
            &[arns.bootstrap_roles()],
        ),
        statement(
            &sid("Logs"),
            &[
                "logs:CreateLogGroup",
                "logs:TagResource",
                "logs:ListTagsForResource",
                "logs:PutRetentionPolicy",
            ],
            &arns.log_group(),
        ),
        service_linked_roles(
            &sid("ServiceLinkedRoles"),
            &[
                "elasticloadbalancing.amazonaws.com",
                "elasticache.amazonaws.com",
                "ecs.amazonaws.com",
            ],
        ),
    ]
}

fn destroy(arns: &Arns) -> Vec<Value> {
    let sid = |s: &str| format!("{}{s}", Command::Destroy.sid());
    let mut reads = NETWORK_READS.to_vec();
    reads.extend(PART_READS);
    reads.extend(SERVICE_READS);
    reads.extend([
        "ecs:DeregisterTaskDefinition",
        "ecs:DeleteTaskDefinitions",
        "application-autoscaling:DeleteScalingPolicy",
        "application-autoscaling:DeregisterScalableTarget",
    ]);
    reads.sort_unstable();
    reads.dedup();
    vec![
        statement(&sid("Read"), &reads, &["*".into()]),
        statement(
            &sid("Services"),
            &[
                "ecs:DescribeClusters",
                "ecs:DescribeServices",
                "ecs:UpdateService",
                "ecs:DeleteService",
                "ecs:DeleteCluster",
            ],
            &arns.ecs_resources(),
        ),
        statement(
            &sid("Alarms"),
            &["cloudwatch:DescribeAlarms", "cloudwatch:DeleteAlarms"],
            &[arns.alarms()],
        ),
        statement(
            &sid("Repositories"),
            &[
                "ecr:DescribeRepositories",
                "ecr:ListTagsForResource",
                "ecr:DeleteRepository",
            ],
            &[arns.repositories()],
        ),
        statement(
            &sid("Logs"),
            &["logs:ListTagsForResource", "logs:DeleteLogGroup"],
            &arns.log_group(),
        ),
        tagged(
            &sid("Network"),
            &[
                "ec2:DeleteNatGateway",
                "ec2:ReleaseAddress",
                "ec2:DisassociateRouteTable",
                "ec2:DeleteRouteTable",
                "ec2:DetachInternetGateway",
                "ec2:DeleteInternetGateway",
                "ec2:DeleteSecurityGroup",
                "ec2:DeleteSubnet",
                "ec2:DeleteVpc",
            ],
            &arns.name,
        ),
        statement(
            &sid("LoadBalancer"),
            &[
                "elasticloadbalancing:DeleteLoadBalancer",
                "elasticloadbalancing:DeleteTargetGroup",
            ],
            &arns.load_balancing(),
        ),
        statement(
            &sid("Redis"),
            &[
                "elasticache:ListTagsForResource",
                "elasticache:DeleteReplicationGroup",
                "elasticache:DeleteCacheSubnetGroup",
            ],
            &arns.elasticache(),
        ),
        statement(
            &sid("RedisSecret"),
            &[
                "secretsmanager:DescribeSecret",
                "secretsmanager:DeleteSecret",
            ],
            &[arns.secrets()],
        ),
        statement(
            &sid("Roles"),
            &[
                "iam:GetRole",
                "iam:ListRolePolicies",
                "iam:DeleteRolePolicy",
                "iam:ListAttachedRolePolicies",
                "iam:DetachRolePolicy",
                "iam:DeleteRole",
            ],
            &[arns.bootstrap_roles()],
        ),
    ]
}

/// The policy document that lets `commands` run on the manifest's deployment.
pub fn document(blueprint: &Blueprint, commands: &[Command]) -> Value {
    let arns = Arns::of(blueprint);
    let mut commands = commands.to_vec();
    commands.sort_unstable();
    commands.dedup();
    let statements: Vec<Value> = commands
        .iter()
        .flat_map(|command| match command {
            Command::Deploy => deploy(&arns),
            Command::Bootstrap => bootstrap(&arns),
            Command::Destroy => destroy(&arns),
        })
        .collect();
    json!({ "Version": "2012-10-17", "Statement": statements })
}

/// Every action `document` grants, as `service:Action`.
pub fn actions(document: &Value) -> Vec<String> {
    let mut actions: Vec<String> = document["Statement"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| match &s["Action"] {
            Value::String(action) => vec![action.clone()],
            Value::Array(actions) => actions
                .iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        })
        .collect();
    actions.sort_unstable();
    actions.dedup();
    actions
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn example(commands: &[Command]) -> Value {
        let blueprint =
            Blueprint::parse(fjord_config::EXAMPLE, Path::new("manifest.json")).unwrap();
        document(&blueprint, commands)
    }

    fn statement<'a>(document: &'a Value, sid: &str) -> &'a Value {
        document["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["Sid"] == sid)
            .unwrap_or_else(|| panic!("no {sid} in {document}"))
    }

    #[test]
    fn resources_are_the_manifests_names() {
        let policy = example(&[Command::Deploy]);
        assert_eq!(
            statement(&policy, "DeployImages")["Resource"],
            json!(["arn:aws:ecr:eu-west-1:123456789012:repository/fjord/*"])
        );
        let logs = statement(&policy, "DeployLogs");
        assert!(
            logs["Action"]
                .as_array()
                .unwrap()
                .contains(&json!("logs:TagResource"))
        );
        assert_eq!(
            logs["Resource"][0],
            "arn:aws:logs:eu-west-1:123456789012:log-group:/ecs/fjord"
        );
        assert_eq!(
            statement(&policy, "DeployPassRoles")["Resource"],
            json!([
                "arn:aws:iam::123456789012:role/fjord-execution",
                "arn:aws:iam::123456789012:role/fjord-task"
            ])
        );
        assert!(
            policy["Statement"]
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s["Sid"].as_str().unwrap().starts_with("Deploy"))
        );
    }

    #[test]
    fn the_first_load_balancer_and_replication_group_may_make_their_service_linked_roles() {
        let policy = example(&[Command::Bootstrap]);
        let roles = statement(&policy, "BootstrapServiceLinkedRoles");
        assert_eq!(roles["Action"], "iam:CreateServiceLinkedRole");
        let services = &roles["Condition"]["StringEquals"]["iam:AWSServiceName"];
        for service in [
            "elasticloadbalancing.amazonaws.com",
            "elasticache.amazonaws.com",
        ] {
            assert!(
                services.as_array().unwrap().contains(&json!(service)),
                "{services}"
            );
        }
        // EC2's ids carry no name: what bootstrap changes is the deployment's by its tag.
        assert_eq!(
            statement(&policy, "BootstrapNetwork")["Condition"]["StringEquals"]["aws:ResourceTag/fjord:deployment"],
            "fjord"
        );
    }

    #[test]
    fn every_command_by_default() {
        let all = actions(&example(&Command::ALL));
        for action in [
            "ecs:CreateService",
            "ec2:CreateVpc",
            "ec2:DeleteVpc",
            "kms:Decrypt",
        ] {
            assert_eq!(
                all.contains(&action.to_owned()),
                action != "kms:Decrypt",
                "{action}: the deployer never decrypts; the execution role does"
            );
        }
    }
}
