//! What should exist in AWS, computed from the validated manifest and the image digests
//! alone, without calling AWS: the repository names, one task definition and one service
//! for the server and for each consumer group, and the server's scaling target and
//! policies. Each spec turns into the AWS SDK's request types here, and carries a
//! fingerprint of everything it sets, so that the deploy can tell whether what AWS has is
//! what it would create. The tags and the target group settings that bootstrap, deploy
//! and destroy agree on are named here too, so that each reads them from what is wanted
//! rather than from another step.

use std::collections::BTreeMap;

use aws_sdk_applicationautoscaling::types::{
    CustomizedMetricSpecification, MetricDimension, MetricStatistic, MetricType,
    PredefinedMetricSpecification, TargetTrackingScalingPolicyConfiguration,
};
use aws_sdk_ecs::error::BuildError;
use aws_sdk_ecs::types::{
    AssignPublicIp, AwsVpcConfiguration, ContainerDefinition, CpuArchitecture,
    DeploymentCircuitBreaker, DeploymentConfiguration, HealthCheck, KeyValuePair, LoadBalancer,
    LogConfiguration, LogDriver, NetworkConfiguration, OsFamily, PortMapping, RuntimePlatform,
    Secret, TransportProtocol, Ulimit, UlimitName,
};
use fjord_config::Process;
use serde::Serialize;

use crate::archive::sha256;
use crate::config::{Architecture, Deployment};

/// The tag a deploy and bootstrap put on everything they create; its value is
/// `$.deploy.name`.
pub const DEPLOYMENT_TAG: &str = "fjord:deployment";
/// The tag that holds a spec's fingerprint on task definitions and services.
pub const FINGERPRINT_TAG: &str = "fjord:fingerprint";
/// The route the target group's health check must probe: whether a server can stream
/// (bus reachable and caught up), where `/healthz` only says that the process lives.
pub(crate) const HEALTH_CHECK_PATH: &str = "/readyz";
/// The target group's deregistration delay that fits a drain, seconds. ECS deregisters a
/// task, waits out the whole delay (an SSE stream never ends by itself, so the target
/// never empties early), then sends SIGTERM; the load balancer cuts the task's streams
/// when the delay ends. The low end covers the seconds in which load balancer nodes still
/// send new streams to a deregistered task, which must still be serving them; above the
/// high end each deploy wave only waits longer. docs/deploy.md says more.
pub(crate) const DEREGISTRATION_DELAY_SECS: std::ops::RangeInclusive<u64> = 15..=60;
/// Seconds ECS waits after SIGTERM before it kills a container; the server drains in 20.
pub const STOP_TIMEOUT_SECS: i32 = 30;
/// The health probe the server image carries (`deploy/healthcheck`).
pub const HEALTHCHECK_BIN: &str = "/bin/fjord-healthcheck";

/// Which of the two images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// `fjord-server`.
    Server,
    /// `fjord-consumer`.
    Consumer,
}

impl Role {
    /// Both roles, server first.
    pub const ALL: [Self; 2] = [Self::Server, Self::Consumer];

    /// `server` or `consumer`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Server => "server",
            Self::Consumer => "consumer",
        }
    }
}

impl Role {
    /// The process the role's image runs.
    fn process(self) -> Process {
        match self {
            Self::Server => Process::Server,
            Self::Consumer => Process::Consumer,
        }
    }
}

/// The secrets a role's container gets: those its process reads, and no other.
fn secrets_of(deployment: &Deployment, role: Role) -> BTreeMap<String, String> {
    deployment
        .manifest
        .secrets()
        .iter()
        .filter(|named| named.readers.contains(&role.process()))
        .filter_map(|named| {
            deployment
                .deploy
                .secrets
                .get_key_value(named.secret.env_name())
        })
        .map(|(env, arn)| (env.clone(), arn.clone()))
        .collect()
}

/// The ECR repository of a role's image: `<name>/server`, `<name>/consumer`.
pub fn repository(deployment: &Deployment, role: Role) -> String {
    format!("{}/{}", deployment.deploy.name, role.as_str())
}

/// Everything the deploy wants to exist, in the order it creates them.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Task definitions: the server's, then one per consumer group.
    pub task_definitions: Vec<TaskDefinitionSpec>,
    /// Services, in the same order as their task definitions.
    pub services: Vec<ServiceSpec>,
    /// The server service's autoscaling.
    pub scaling: ScalingSpec,
}

impl Plan {
    /// The plan for `deployment`, with the images at `server_image` and `consumer_image`
    /// (`registry/repository@sha256:...`).
    pub fn new(deployment: &Deployment, server_image: &str, consumer_image: &str) -> Self {
        let deploy = &deployment.deploy;
        let server_name = format!("{}-server", deploy.name);
        let port = deployment.manifest.server.port;
        let base = |family: &str, role: Role, image: &str, size: crate::config::TaskSize| {
            TaskDefinitionSpec {
                family: family.to_owned(),
                cpu: size.cpu,
                memory: size.memory,
                architecture: deploy.architecture,
                execution_role_arn: deploy.roles.execution_role_arn.clone(),
                task_role_arn: deploy.roles.task_role_arn.clone(),
                container: ContainerSpec {
                    name: role,
                    image: image.to_owned(),
                    ports: Vec::new(),
                    environment: BTreeMap::from([
                        (
                            "FJORD_MANIFEST_JSON".to_owned(),
                            deployment.runtime_manifest.clone(),
                        ),
                        ("FJORD_LOG_FORMAT".to_owned(), "json".to_owned()),
                    ]),
                    secrets: secrets_of(deployment, role),
                    health_check: None,
                    log_group: deploy.logs.group.clone(),
                    log_region: deploy.region.clone(),
                    log_stream_prefix: family.to_owned(),
                },
            }
        };

        let mut server = base(
            &server_name,
            Role::Server,
            server_image,
            deploy.services.server.size(),
        );
        server.container.ports.push(port);
        // A scraper inside the VPC reaches the metrics listener; the target group never does.
        if let Some(metrics) = &deployment.manifest.server.metrics_listener {
            server.container.ports.push(metrics.port);
        }
        server.container.health_check = Some(vec![
            "CMD".to_owned(),
            HEALTHCHECK_BIN.to_owned(),
            format!("http://127.0.0.1:{port}/healthz"),
        ]);
        server.container.environment.extend([
            ("FJORD_EMF_CLUSTER".to_owned(), deploy.cluster.clone()),
            ("FJORD_EMF_SERVICE".to_owned(), server_name.clone()),
        ]);
        let mut task_definitions = vec![server];
        let network = NetworkSpec {
            subnets: deploy.network.subnets.clone(),
            security_groups: deploy.network.security_groups.clone(),
            assign_public_ip: deploy.network.assign_public_ip,
        };
        let server_service = &deploy.services.server;
        let mut services = vec![ServiceSpec {
            name: server_name.clone(),
            family: server_name.clone(),
            desired_count: i32::try_from(server_service.desired_count).unwrap_or(i32::MAX),
            autoscaled: true,
            network: network.clone(),
            load_balancer: Some(LoadBalancerSpec {
                target_group_arn: server_service.target_group_arn.clone(),
                container_name: Role::Server.as_str().to_owned(),
                container_port: port,
            }),
            health_check_grace_secs: Some(
                i32::try_from(server_service.health_check_grace_secs).unwrap_or(i32::MAX),
            ),
        }];

        for group in &deployment.manifest.consumer_groups {
            let family = consumer_name(&deploy.name, &group.id);
            let mut consumer = base(
                &family,
                Role::Consumer,
                consumer_image,
                deploy.services.consumer,
            );
            consumer
                .container
                .environment
                .insert("FJORD_CONSUMER_GROUP".to_owned(), group.id.clone());
            task_definitions.push(consumer);
            services.push(ServiceSpec {
                name: family.clone(),
                family,
                desired_count: i32::try_from(group.members).unwrap_or(i32::MAX),
                autoscaled: false,
                network: network.clone(),
                load_balancer: None,
                health_check_grace_secs: None,
            });
        }

        let scaling = &server_service.autoscaling;
        let policy = |suffix: &str, target: f64, metric: PolicyMetric| PolicySpec {
            name: format!("{server_name}-{suffix}"),
            target,
            metric,
            scale_in_cooldown_secs: scaling.scale_in_cooldown_secs,
            scale_out_cooldown_secs: scaling.scale_out_cooldown_secs,
        };
        let scaling = ScalingSpec {
            resource_id: format!("service/{}/{server_name}", deploy.cluster),
            min_count: i32::try_from(scaling.min_count).unwrap_or(i32::MAX),
            max_count: i32::try_from(scaling.max_count).unwrap_or(i32::MAX),
            policies: vec![
                policy("cpu", scaling.cpu_target, PolicyMetric::Cpu),
                policy(
                    "connections",
                    scaling.connections_target,
                    PolicyMetric::OpenConnections {
                        cluster: deploy.cluster.clone(),
                        service: server_name.clone(),
                    },
                ),
            ],
        };
        Self {
            task_definitions,
            services,
            scaling,
        }
    }

    /// Refuses a task definition above ECS's size limit before anything is changed,
    /// where RegisterTaskDefinition would refuse it midway.
    pub fn check_size(&self) -> Result<(), String> {
        for spec in &self.task_definitions {
            let size = spec.size();
            if size > TASK_DEFINITION_LIMIT {
                let manifest = spec
                    .container
                    .environment
                    .get("FJORD_MANIFEST_JSON")
                    .map_or(0, String::len);
                return Err(format!(
                    "task definition {} would be {size} bytes, above ECS's limit of {TASK_DEFINITION_LIMIT} (64 KiB); the manifest the tasks read (FJORD_MANIFEST_JSON, without `deploy`) takes {manifest} bytes of it: shorten it (fewer endpoints, shorter descriptions)",
                    spec.family
                ));
            }
        }
        Ok(())
    }
}

/// The service (and task family) of a consumer group: `<name>-consumer-<group>`, with
/// what ECS does not allow in a name replaced by `-`.
pub fn consumer_name(name: &str, group: &str) -> String {
    let group: String = group
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut service = format!("{name}-consumer-{group}");
    service.truncate(255);
    service
}

fn fingerprint(spec: &impl Serialize) -> String {
    // Serialising plain structs and BTreeMaps cannot fail; an empty string would only make
    // the deploy re-register, never skip.
    sha256(&serde_json::to_vec(spec).unwrap_or_default())
}

/// A Fargate task definition with one container.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskDefinitionSpec {
    /// The family, which is also the service's name.
    pub family: String,
    /// CPU units.
    pub cpu: u32,
    /// Memory, MiB.
    pub memory: u32,
    /// The CPU architecture.
    pub architecture: Architecture,
    /// The execution role.
    pub execution_role_arn: String,
    /// The task role.
    pub task_role_arn: Option<String>,
    /// The container.
    pub container: ContainerSpec,
}

/// The container of a task definition.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ContainerSpec {
    /// The container's name: `server` or `consumer`.
    pub name: Role,
    /// The image, pinned by digest.
    pub image: String,
    /// The TCP ports it listens on: the public one first.
    pub ports: Vec<u16>,
    /// Plain environment: the runtime manifest and the deploy's own variables.
    pub environment: BTreeMap<String, String>,
    /// Variable → secret ARN, injected by ECS.
    pub secrets: BTreeMap<String, String>,
    /// The container health check command.
    pub health_check: Option<Vec<String>>,
    /// CloudWatch Logs group.
    pub log_group: String,
    /// Its region.
    pub log_region: String,
    /// Stream prefix.
    pub log_stream_prefix: String,
}

/// The largest task definition ECS registers, bytes (its service quota "task definition
/// size", 64 KiB, not adjustable).
pub const TASK_DEFINITION_LIMIT: usize = 64 * 1024;

impl TaskDefinitionSpec {
    /// The fingerprint of everything this spec sets.
    pub fn fingerprint(&self) -> String {
        fingerprint(self)
    }

    /// The size of the task definition this spec registers, bytes, as its JSON counts
    /// it: every value the request carries (the runtime manifest in
    /// `FJORD_MANIFEST_JSON` above all), escaped as JSON escapes it.
    pub fn size(&self) -> usize {
        serde_json::to_vec(self).map_or(0, |json| json.len())
    }

    /// The runtime platform.
    pub fn runtime_platform(&self) -> RuntimePlatform {
        let architecture = match self.architecture {
            Architecture::X86_64 => CpuArchitecture::X8664,
            Architecture::Arm64 => CpuArchitecture::Arm64,
        };
        RuntimePlatform::builder()
            .cpu_architecture(architecture)
            .operating_system_family(OsFamily::Linux)
            .build()
    }

    /// The container definition.
    pub fn container_definition(&self) -> Result<ContainerDefinition, BuildError> {
        let container = &self.container;
        let environment = container
            .environment
            .iter()
            .map(|(name, value)| KeyValuePair::builder().name(name).value(value).build())
            .collect();
        let secrets = container
            .secrets
            .iter()
            .map(|(name, arn)| Secret::builder().name(name).value_from(arn).build())
            .collect::<Result<Vec<_>, _>>()?;
        let logs = LogConfiguration::builder()
            .log_driver(LogDriver::Awslogs)
            .options("awslogs-group", &container.log_group)
            .options("awslogs-region", &container.log_region)
            .options("awslogs-stream-prefix", &container.log_stream_prefix)
            .options("mode", "non-blocking")
            .options("max-buffer-size", "4m")
            .build()?;
        let health_check = container
            .health_check
            .as_ref()
            .map(|command| {
                HealthCheck::builder()
                    .set_command(Some(command.clone()))
                    .interval(15)
                    .timeout(5)
                    .retries(3)
                    .start_period(10)
                    .build()
            })
            .transpose()?;
        let port_mappings = container
            .ports
            .iter()
            .map(|&port| {
                PortMapping::builder()
                    .container_port(i32::from(port))
                    .protocol(TransportProtocol::Tcp)
                    .build()
            })
            .collect();
        Ok(ContainerDefinition::builder()
            .name(container.name.as_str())
            .image(&container.image)
            .essential(true)
            .readonly_root_filesystem(true)
            .set_port_mappings(Some(port_mappings))
            .set_environment(Some(environment))
            .set_secrets(Some(secrets))
            .set_health_check(health_check)
            .log_configuration(logs)
            .stop_timeout(STOP_TIMEOUT_SECS)
            .ulimits(
                Ulimit::builder()
                    .name(UlimitName::Nofile)
                    .soft_limit(65_535)
                    .hard_limit(65_535)
                    .build()?,
            )
            .build())
    }
}

/// The awsvpc network of a service's tasks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkSpec {
    /// Subnet ids.
    pub subnets: Vec<String>,
    /// Security group ids.
    pub security_groups: Vec<String>,
    /// Public IP or not.
    pub assign_public_ip: bool,
}

/// Where a service registers its tasks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoadBalancerSpec {
    /// The ALB target group.
    pub target_group_arn: String,
    /// The container to register.
    pub container_name: String,
    /// Its port.
    pub container_port: u16,
}

/// An ECS service on Fargate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceSpec {
    /// The service's name.
    pub name: String,
    /// Its task definition family.
    pub family: String,
    /// Tasks to run (for an autoscaled service: when it is created).
    #[serde(skip)]
    pub desired_count: i32,
    /// Whether autoscaling owns the desired count once the service exists.
    #[serde(skip)]
    pub autoscaled: bool,
    /// The network.
    pub network: NetworkSpec,
    /// The target group, for the server.
    pub load_balancer: Option<LoadBalancerSpec>,
    /// Grace period for load balancer health checks.
    pub health_check_grace_secs: Option<i32>,
}

impl ServiceSpec {
    /// The fingerprint of everything this spec sets, except the task definition revision
    /// and the desired count, which the deploy compares directly.
    pub fn fingerprint(&self) -> String {
        fingerprint(self)
    }

    /// The awsvpc configuration.
    pub fn network_configuration(&self) -> Result<NetworkConfiguration, BuildError> {
        let public_ip = if self.network.assign_public_ip {
            AssignPublicIp::Enabled
        } else {
            AssignPublicIp::Disabled
        };
        Ok(NetworkConfiguration::builder()
            .awsvpc_configuration(
                AwsVpcConfiguration::builder()
                    .set_subnets(Some(self.network.subnets.clone()))
                    .set_security_groups(Some(self.network.security_groups.clone()))
                    .assign_public_ip(public_ip)
                    .build()?,
            )
            .build())
    }

    /// The target group registration, if any.
    pub fn load_balancers(&self) -> Vec<LoadBalancer> {
        self.load_balancer
            .iter()
            .map(|lb| {
                LoadBalancer::builder()
                    .target_group_arn(&lb.target_group_arn)
                    .container_name(&lb.container_name)
                    .container_port(i32::from(lb.container_port))
                    .build()
            })
            .collect()
    }

    /// Rolling deployments that keep every task until its replacement is healthy, with
    /// the circuit breaker rolling back a deployment that cannot get healthy.
    pub fn deployment_configuration(&self) -> DeploymentConfiguration {
        DeploymentConfiguration::builder()
            .maximum_percent(200)
            .minimum_healthy_percent(100)
            .deployment_circuit_breaker(
                DeploymentCircuitBreaker::builder()
                    .enable(true)
                    .rollback(true)
                    .build(),
            )
            .build()
    }
}

/// The server service as an Application Auto Scaling target.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalingSpec {
    /// `service/<cluster>/<service>`.
    pub resource_id: String,
    /// Fewest tasks.
    pub min_count: i32,
    /// Most tasks.
    pub max_count: i32,
    /// Target-tracking policies.
    pub policies: Vec<PolicySpec>,
}

/// What a target-tracking policy holds steady.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyMetric {
    /// ECS's average CPU utilisation of the service.
    Cpu,
    /// `Fjord/OpenConnections`, averaged over the service's tasks, which each server
    /// publishes in Embedded Metric Format.
    OpenConnections {
        /// `ClusterName` dimension.
        cluster: String,
        /// `ServiceName` dimension.
        service: String,
    },
}

/// A target-tracking scaling policy.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicySpec {
    /// The policy's name.
    pub name: String,
    /// The value to hold.
    pub target: f64,
    /// The metric.
    pub metric: PolicyMetric,
    /// Seconds between scale-in steps.
    pub scale_in_cooldown_secs: i32,
    /// Seconds between scale-out steps.
    pub scale_out_cooldown_secs: i32,
}

impl PolicySpec {
    /// The policy configuration.
    pub fn configuration(&self) -> Result<TargetTrackingScalingPolicyConfiguration, BuildError> {
        let builder = TargetTrackingScalingPolicyConfiguration::builder()
            .target_value(self.target)
            .scale_in_cooldown(self.scale_in_cooldown_secs)
            .scale_out_cooldown(self.scale_out_cooldown_secs)
            .disable_scale_in(false);
        let builder = match &self.metric {
            PolicyMetric::Cpu => builder.predefined_metric_specification(
                PredefinedMetricSpecification::builder()
                    .predefined_metric_type(MetricType::EcsServiceAverageCpuUtilization)
                    .build()?,
            ),
            PolicyMetric::OpenConnections { cluster, service } => builder
                .customized_metric_specification(
                    CustomizedMetricSpecification::builder()
                        .namespace("Fjord")
                        .metric_name("OpenConnections")
                        .dimensions(
                            MetricDimension::builder()
                                .name("ClusterName")
                                .value(cluster)
                                .build()?,
                        )
                        .dimensions(
                            MetricDimension::builder()
                                .name("ServiceName")
                                .value(service)
                                .build()?,
                        )
                        .statistic(MetricStatistic::Average)
                        .build(),
                ),
        };
        builder.build()
    }

    /// Whether an existing policy configuration holds the same target on the same metric.
    pub fn matches(&self, existing: &TargetTrackingScalingPolicyConfiguration) -> bool {
        let metric_matches = match &self.metric {
            PolicyMetric::Cpu => existing
                .predefined_metric_specification()
                .is_some_and(|spec| {
                    spec.predefined_metric_type() == &MetricType::EcsServiceAverageCpuUtilization
                }),
            PolicyMetric::OpenConnections { cluster, service } => existing
                .customized_metric_specification()
                .is_some_and(|spec| {
                    let mut dimensions: Vec<(&str, &str)> = spec
                        .dimensions()
                        .iter()
                        .map(|d| (d.name(), d.value()))
                        .collect();
                    dimensions.sort_unstable();
                    spec.namespace() == Some("Fjord")
                        && spec.metric_name() == Some("OpenConnections")
                        && spec.statistic() == Some(&MetricStatistic::Average)
                        && dimensions
                            == [
                                ("ClusterName", cluster.as_str()),
                                ("ServiceName", service.as_str()),
                            ]
                }),
        };
        metric_matches
            && existing.target_value() == self.target
            && existing.scale_in_cooldown() == Some(self.scale_in_cooldown_secs)
            && existing.scale_out_cooldown() == Some(self.scale_out_cooldown_secs)
            && existing.disable_scale_in() != Some(true)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use aws_sdk_ecs::types::{AssignPublicIp, LogDriver};

    use super::*;

    const SERVER_IMAGE: &str =
        "123456789012.dkr.ecr.eu-west-1.amazonaws.com/fjord/server@sha256:aa";
    const CONSUMER_IMAGE: &str =
        "123456789012.dkr.ecr.eu-west-1.amazonaws.com/fjord/consumer@sha256:bb";

    fn example() -> (Deployment, Plan) {
        let deployment =
            Deployment::parse(fjord_config::EXAMPLE, Path::new("manifest.json")).unwrap();
        let plan = Plan::new(&deployment, SERVER_IMAGE, CONSUMER_IMAGE);
        (deployment, plan)
    }

    fn secrets(container: &ContainerDefinition) -> Vec<(&str, &str)> {
        container
            .secrets()
            .iter()
            .map(|s| (s.name(), s.value_from()))
            .collect()
    }

    fn env(container: &ContainerDefinition) -> BTreeMap<&str, &str> {
        container
            .environment()
            .iter()
            .map(|kv| (kv.name().unwrap(), kv.value().unwrap()))
            .collect()
    }

    #[test]
    fn a_task_definition_above_64_kib_is_refused_before_any_call() {
        let (mut deployment, _) = example();
        assert!(
            Plan::new(&deployment, SERVER_IMAGE, CONSUMER_IMAGE)
                .check_size()
                .is_ok()
        );
        deployment.runtime_manifest = format!(
            "{{\"pad\":\"{}\"}}",
            "\\\"".repeat(TASK_DEFINITION_LIMIT / 3)
        );
        let plan = Plan::new(&deployment, SERVER_IMAGE, CONSUMER_IMAGE);
        let refused = plan.check_size().unwrap_err();
        assert!(
            refused.starts_with("task definition fjord-server would be "),
            "{refused}"
        );
        assert!(refused.contains("above ECS's limit of 65536"), "{refused}");
    }

    #[test]
    fn server_task_definition() {
        let (deployment, plan) = example();
        let spec = &plan.task_definitions[0];
        assert_eq!(spec.family, "fjord-server");
        assert_eq!((spec.cpu, spec.memory), (1024, 2048));
        let container = spec.container_definition().unwrap();
        assert_eq!(container.name(), Some("server"));
        assert_eq!(container.image(), Some(SERVER_IMAGE));
        assert_eq!(container.essential(), Some(true));
        assert_eq!(container.stop_timeout(), Some(30));
        let ports: Vec<_> = container
            .port_mappings()
            .iter()
            .map(|mapping| mapping.container_port())
            .collect();
        assert_eq!(
            ports,
            [Some(8080), Some(9090)],
            "the public port, then metrics"
        );
        assert_eq!(
            container.health_check().unwrap().command(),
            [
                "CMD",
                "/bin/fjord-healthcheck",
                "http://127.0.0.1:8080/healthz"
            ]
        );
        let env = env(&container);
        assert_eq!(env["FJORD_MANIFEST_JSON"], deployment.runtime_manifest);
        assert_eq!(env["FJORD_EMF_CLUSTER"], "fjord");
        assert_eq!(env["FJORD_EMF_SERVICE"], "fjord-server");
        assert_eq!(env["FJORD_LOG_FORMAT"], "json");
        assert!(!env.contains_key("FJORD_CONSUMER_GROUP"));
        // The server reads the bus, never Kafka: no Kafka password.
        assert_eq!(
            secrets(&container),
            [(
                "FJORD_REDIS_PASSWORD",
                "arn:aws:ssm:eu-west-1:123456789012:parameter/fjord/redis-password"
            )]
        );
        // No secret reaches the plain environment.
        assert!(env.values().all(|value| !value.contains("arn:aws:s")));
        let logs = container.log_configuration().unwrap();
        assert_eq!(logs.log_driver(), &LogDriver::Awslogs);
        let options = logs.options().unwrap();
        assert_eq!(options["awslogs-group"], "/ecs/fjord");
        assert_eq!(options["awslogs-region"], "eu-west-1");
        assert_eq!(options["awslogs-stream-prefix"], "fjord-server");
        assert_eq!(
            spec.runtime_platform().cpu_architecture(),
            Some(&CpuArchitecture::X8664)
        );
    }

    #[test]
    fn one_consumer_task_definition_and_service_per_group() {
        let (_, plan) = example();
        let families: Vec<&str> = plan
            .task_definitions
            .iter()
            .map(|t| t.family.as_str())
            .collect();
        assert_eq!(families, ["fjord-server", "fjord-consumer-fjord-superEats"]);
        let consumer = plan.task_definitions[1].container_definition().unwrap();
        assert_eq!(consumer.image(), Some(CONSUMER_IMAGE));
        assert_eq!(env(&consumer)["FJORD_CONSUMER_GROUP"], "fjord-superEats");
        assert!(consumer.port_mappings().is_empty() && consumer.health_check().is_none());
        assert_eq!(
            secrets(&consumer),
            [
                (
                    "FJORD_KAFKA_PASSWORD",
                    "arn:aws:secretsmanager:eu-west-1:123456789012:secret:fjord/kafka-AbCdEf"
                ),
                (
                    "FJORD_REDIS_PASSWORD",
                    "arn:aws:ssm:eu-west-1:123456789012:parameter/fjord/redis-password"
                ),
            ]
        );
        assert_eq!(
            (
                plan.task_definitions[1].cpu,
                plan.task_definitions[1].memory
            ),
            (512, 1024)
        );

        let service = &plan.services[1];
        assert_eq!(service.name, "fjord-consumer-fjord-superEats");
        assert_eq!(service.desired_count, 2, "members");
        assert!(!service.autoscaled && service.load_balancers().is_empty());
        assert_eq!(
            consumer_name("fjord", "eats.v2:eu"),
            "fjord-consumer-eats-v2-eu"
        );
    }

    #[test]
    fn server_service_sits_behind_its_target_group_with_rollback() {
        let (deployment, plan) = example();
        let service = &plan.services[0];
        assert_eq!(
            (
                service.name.as_str(),
                service.desired_count,
                service.autoscaled
            ),
            ("fjord-server", 2, true)
        );
        let balancer = &service.load_balancers()[0];
        assert_eq!(
            balancer.target_group_arn(),
            Some(deployment.deploy.services.server.target_group_arn.as_str())
        );
        assert_eq!(
            (balancer.container_name(), balancer.container_port()),
            (Some("server"), Some(8080))
        );
        assert_eq!(service.health_check_grace_secs, Some(60));
        let network = service.network_configuration().unwrap();
        let vpc = network.awsvpc_configuration().unwrap();
        assert_eq!(vpc.subnets(), deployment.deploy.network.subnets);
        assert_eq!(
            vpc.security_groups(),
            deployment.deploy.network.security_groups
        );
        assert_eq!(vpc.assign_public_ip(), Some(&AssignPublicIp::Disabled));
        let breaker = service
            .deployment_configuration()
            .deployment_circuit_breaker()
            .cloned()
            .unwrap();
        assert!(breaker.enable() && breaker.rollback());
    }

    #[test]
    fn server_scales_on_cpu_and_open_connections() {
        let (_, plan) = example();
        let scaling = &plan.scaling;
        assert_eq!(scaling.resource_id, "service/fjord/fjord-server");
        assert_eq!((scaling.min_count, scaling.max_count), (2, 20));
        let [cpu, connections] = scaling.policies.as_slice() else {
            panic!("two policies")
        };
        let cpu_config = cpu.configuration().unwrap();
        assert_eq!(cpu.name, "fjord-server-cpu");
        assert_eq!(cpu_config.target_value(), 60.0);
        assert_eq!(
            cpu_config
                .predefined_metric_specification()
                .unwrap()
                .predefined_metric_type(),
            &MetricType::EcsServiceAverageCpuUtilization
        );
        let config = connections.configuration().unwrap();
        assert_eq!(config.target_value(), 5000.0);
        assert_eq!(
            (config.scale_in_cooldown(), config.scale_out_cooldown()),
            (Some(300), Some(60))
        );
        let metric = config.customized_metric_specification().unwrap();
        assert_eq!(
            (metric.namespace(), metric.metric_name()),
            (Some("Fjord"), Some("OpenConnections"))
        );
        assert_eq!(metric.statistic(), Some(&MetricStatistic::Average));
        let dimensions: Vec<(&str, &str)> = metric
            .dimensions()
            .iter()
            .map(|d| (d.name(), d.value()))
            .collect();
        assert_eq!(
            dimensions,
            [("ClusterName", "fjord"), ("ServiceName", "fjord-server")]
        );

        assert!(connections.matches(&config) && cpu.matches(&cpu_config));
        assert!(!connections.matches(&cpu_config));
        let mut other = connections.clone();
        other.target = 4000.0;
        assert!(!other.matches(&config));
    }

    #[test]
    fn fingerprints_follow_what_is_set() {
        let (deployment, plan) = example();
        let again = Plan::new(&deployment, SERVER_IMAGE, CONSUMER_IMAGE);
        assert_eq!(
            plan.task_definitions[0].fingerprint(),
            again.task_definitions[0].fingerprint()
        );
        let new_image = Plan::new(&deployment, "r/fjord/server@sha256:cc", CONSUMER_IMAGE);
        assert_ne!(
            plan.task_definitions[0].fingerprint(),
            new_image.task_definitions[0].fingerprint()
        );
        assert_eq!(
            plan.task_definitions[1].fingerprint(),
            new_image.task_definitions[1].fingerprint()
        );
        // The desired count is compared directly, not through the fingerprint.
        let mut more = plan.services[1].clone();
        more.desired_count = 5;
        assert_eq!(more.fingerprint(), plan.services[1].fingerprint());
        assert_ne!(
            plan.services[0].fingerprint(),
            plan.services[1].fingerprint()
        );
    }
}
